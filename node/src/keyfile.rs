//! The node key file: 64 hex characters, mode 0600.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, bail};
use fedmesh_protocol::NodeKey;

/// Writes a new random key to `path`. Refuses to overwrite an existing file unless `force`.
pub fn generate(path: &Path, force: bool) -> anyhow::Result<NodeKey> {
    if path.exists() && !force {
        bail!(
            "{} already exists; pass --force to overwrite it (the node's identity changes)",
            path.display()
        );
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let key = NodeKey::generate(&mut rand::rng());
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    writeln!(f, "{}", key.to_secret_hex())?;
    f.sync_all()?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(key)
}

/// Reads the key at `path`.
pub fn load(path: &Path) -> anyhow::Result<NodeKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading key file {}", path.display()))?;
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "key file is readable by others; chmod 600 it");
    }
    NodeKey::from_secret_hex(&text).with_context(|| format!("key file {}", path.display()))
}

/// Loads the key, generating it on first run.
pub fn load_or_generate(path: &Path) -> anyhow::Result<NodeKey> {
    if path.exists() {
        load(path)
    } else {
        let key = generate(path, false)?;
        tracing::info!(path = %path.display(), node = %key.node_id(), "generated a new node key");
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_refuses_overwrite_and_sets_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("k/node.key");
        let k = generate(&p, false).expect("generate");
        assert_eq!(
            std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        assert!(generate(&p, false).is_err());
        assert_eq!(load(&p).expect("load").node_id(), k.node_id());
        let k2 = generate(&p, true).expect("force");
        assert_ne!(k2.node_id(), k.node_id());
    }
}
