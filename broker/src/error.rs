//! The crate's error type.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything that can go wrong in the public API of this crate.
///
/// Per-connection failures of MQTT clients never surface here: they close that one
/// connection, are logged and counted in [`crate::MetricsSnapshot`].
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A [`crate::BrokerSettings`] value is out of range.
    #[error("invalid broker setting {field}: {reason}")]
    InvalidSetting {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// [`crate::Broker::start`] was called outside a tokio runtime.
    #[error("Broker::start must be called inside a tokio runtime")]
    NoRuntime,
    /// A public listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address from the settings.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS certificate or key of `mqtt.listen_tls` cannot be used.
    #[error("TLS: {path}: {reason}")]
    Tls {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rumqttd's internal loopback listener did not come up.
    #[error("rumqttd internal listener did not start: {0}")]
    InternalListener(String),
    /// An OS thread for rumqttd could not be spawned.
    #[error("cannot spawn a thread: {0}")]
    Thread(std::io::Error),
    /// The in-process link to rumqttd's router failed (rumqttd's error, as text: its
    /// error type is over 800 bytes).
    #[error("rumqttd link: {0}")]
    Link(String),
    /// The outbound queue to the broker is full; the message was dropped and counted.
    #[error("outbound queue full; message dropped")]
    QueueFull,
    /// The broker has been shut down (or its router died).
    #[error("broker is stopped")]
    Stopped,
    /// The node tried to publish something it may not: a principal topic
    /// `fedmesh/v1/{agent|client}/{name}/{op}` (reserved to that principal), an invalid
    /// topic, or an oversized payload or correlation data.
    #[error("cannot publish on {topic:?}: {reason}")]
    InvalidOutbound {
        /// The topic.
        topic: String,
        /// Why.
        reason: &'static str,
    },
    /// A name is not `[A-Za-z0-9_.-]{1,64}`.
    #[error("invalid name {0:?}: expected 1 to 64 characters of A-Z a-z 0-9 _ . -")]
    InvalidName(String),
    /// `CredentialStore::add` without `force` for a name that already exists.
    #[error("credentials for {0:?} already exist (use force to replace them)")]
    NameExists(String),
    /// `CredentialStore::remove` for an unknown name.
    #[error("no credentials for {0:?}")]
    NameNotFound(String),
    /// Reading or writing the credentials file failed.
    #[error("credentials file {path}: {source}")]
    CredentialsIo {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The credentials file is not valid TOML of the expected shape.
    #[error("credentials file {path}: {source}")]
    CredentialsParse {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: toml::de::Error,
    },
    /// The credentials file has an entry whose salt or hash is not valid hex.
    #[error("credentials file {path}: entry {name:?}: {reason}")]
    CredentialsEntry {
        /// The file.
        path: PathBuf,
        /// The entry.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Serialising the credentials file failed.
    #[error("cannot serialise credentials: {0}")]
    CredentialsSerialize(#[from] toml::ser::Error),
}

impl From<rumqttd::local::LinkError> for BrokerError {
    fn from(e: rumqttd::local::LinkError) -> Self {
        BrokerError::Link(e.to_string())
    }
}
