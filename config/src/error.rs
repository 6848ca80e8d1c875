//! The one error type of this crate. Every variant names the offending key
//! (dotted path such as `p2p.bootstrap[1]`) or environment variable.

use std::path::PathBuf;

/// Why a configuration could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// The underlying IO error.
        source: std::io::Error,
    },
    /// The file is not valid TOML (toml's message carries line and column).
    #[error("{origin} is not valid TOML: {message}")]
    Syntax {
        /// The file path, or `config` for an in-memory string.
        origin: String,
        /// toml's own message, with line, column and a snippet.
        message: String,
    },
    /// A key has the wrong type or is unknown to the schema.
    #[error("{key}: {message}{}", location.map(|(l, c)| format!(" (line {l}, column {c})")).unwrap_or_default())]
    Type {
        /// Dotted key path, e.g. `p2p.listen`.
        key: String,
        /// What serde found and expected.
        message: String,
        /// 1-based line and column in the file, when known.
        location: Option<(usize, usize)>,
    },
    /// A `FEDMESH_<SECTION>__<KEY>` variable that names no config key.
    #[error(
        "environment variable {var} does not name a config key \
         (expected FEDMESH_<SECTION>__<KEY>, e.g. FEDMESH_MQTT__LISTEN_V4)"
    )]
    UnknownEnvVar {
        /// The variable name.
        var: String,
    },
    /// An environment override whose value has the wrong type for its key.
    #[error("{var} (overrides {key}): {message}")]
    EnvType {
        /// The variable name, e.g. `FEDMESH_ROUTING__TOP_K`.
        var: String,
        /// The dotted key it overrides.
        key: String,
        /// What serde found and expected.
        message: String,
    },
    /// A value that should be a socket address (`ip:port`) is not one.
    #[error("{key}: {value:?} is not a socket address ({reason}); expected \"ip:port\" such as \"127.0.0.1:1883\"{}", if *optional { " or \"\" to disable" } else { "" })]
    SocketAddr {
        /// Dotted key path.
        key: String,
        /// The rejected value.
        value: String,
        /// The parser's complaint.
        reason: String,
        /// Whether the empty string (disabled) would have been accepted.
        optional: bool,
    },
    /// A value that should be a multiaddr is malformed.
    #[error("{key}: {value:?} is not a valid multiaddr: {reason}")]
    Multiaddr {
        /// Dotted key path, with the list index.
        key: String,
        /// The rejected value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A number outside its allowed range.
    #[error("{key}: {value} is out of range; expected {expected}")]
    OutOfRange {
        /// Dotted key path.
        key: String,
        /// The rejected value.
        value: String,
        /// The allowed range, in words.
        expected: String,
    },
    /// Any other rule about one key (or two keys that conflict).
    #[error("{key}: {problem}")]
    Invalid {
        /// Dotted key path.
        key: String,
        /// What is wrong and what is expected.
        problem: String,
    },
}
