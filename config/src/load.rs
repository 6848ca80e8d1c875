//! Parsing, environment overrides and key-naming type errors.

use toml::{Table, Value};

use crate::{Config, ConfigError};

/// Builds a validated config from an optional `(origin, text)` file and an
/// environment. The file alone is deserialized first (so its type errors
/// carry line and column), then the overridden table if any variable applied.
pub(crate) fn build(
    file: Option<(&str, &str)>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let (mut config, mut table) = (Config::default(), Table::new());
    if let Some((origin, text)) = file {
        let syntax = |e: toml::de::Error| ConfigError::Syntax {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        };
        table = toml::from_str(text).map_err(syntax)?;
        let de = toml::Deserializer::parse(text).map_err(syntax)?;
        config = serde_path_to_error::deserialize(de).map_err(|e| {
            let (key, message) = describe(&e);
            let location = e.inner().span().map(|s| line_col(text, s.start));
            ConfigError::Type {
                key,
                message,
                location,
            }
        })?;
    }
    let overrides = apply_env(&mut table, env)?;
    if !overrides.is_empty() {
        config = serde_path_to_error::deserialize(table).map_err(|e| {
            let (key, message) = describe(&e);
            let by_env = overrides.iter().rev().find(|(k, _)| {
                key.strip_prefix(k.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(['[', '.']))
            });
            match by_env {
                Some((k, var)) => ConfigError::EnvType {
                    var: var.clone(),
                    key: k.clone(),
                    message,
                },
                None => ConfigError::Type {
                    key,
                    message,
                    location: None,
                },
            }
        })?;
    }
    config.validate()?;
    Ok(config)
}

/// The dotted key and serde's message. For unknown fields serde's path stops
/// at the enclosing table, so the unknown key is appended from the message.
fn describe(e: &serde_path_to_error::Error<toml::de::Error>) -> (String, String) {
    let path = e.path().to_string();
    let message = e.inner().message().trim_end().to_string();
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|m| m.split_once('`'))
        .map(|(field, _)| field);
    let key = match (path.as_str(), unknown) {
        (".", Some(f)) => f.to_string(),
        (p, Some(f)) if !p.ends_with(&format!(".{f}")) && p != f => format!("{p}.{f}"),
        (".", None) => "(top level)".to_string(),
        (p, _) => p.to_string(),
    };
    (key, message)
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Applies `FEDMESH_*` overrides to `table`; returns `(dotted key, var)` for
/// each applied variable, in application order.
fn apply_env(
    table: &mut Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let defaults = Table::try_from(Config::default()).unwrap_or_default();
    let mut found = Vec::new();
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix("FEDMESH_") else {
            continue;
        };
        // Shortcuts apply first (rank 0) so the explicit `__` form wins.
        let (rank, section, key) = match rest {
            "DATA_DIR" => (0, "node".to_string(), "data_dir".to_string()),
            "WORDLLAMA_DIR" => (0, "routing".into(), "wordllama_dir".into()),
            _ => match rest.split_once("__") {
                Some((s, k)) => (1, s.to_ascii_lowercase(), k.to_ascii_lowercase()),
                None => continue,
            },
        };
        let default = defaults
            .get(&section)
            .and_then(Value::as_table)
            .and_then(|t| t.get(&key))
            .ok_or_else(|| ConfigError::UnknownEnvVar { var: var.clone() })?;
        let value = env_value(default, &raw);
        found.push((rank, var, section, key, value));
    }
    found.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let mut applied = Vec::new();
    for (_, var, section, key, value) in found {
        let entry = table
            .entry(section.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        if let Value::Table(t) = entry {
            t.insert(key.clone(), value);
        }
        applied.push((format!("{section}.{key}"), var));
    }
    Ok(applied)
}

/// Interprets an environment value according to the type of the key's default:
/// strings verbatim, lists as a TOML array or comma-separated, else a TOML
/// value (falling back to a string, which then fails deserialization).
fn env_value(default: &Value, raw: &str) -> Value {
    match default {
        Value::String(_) => Value::String(raw.to_string()),
        Value::Array(_) if !raw.trim_start().starts_with('[') => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        _ => raw
            .trim()
            .parse::<Value>()
            .unwrap_or_else(|_| Value::String(raw.to_string())),
    }
}
