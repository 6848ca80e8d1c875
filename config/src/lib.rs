//! The fedmesh node's TOML configuration: schema, defaults, environment
//! overrides and validation.
//!
//! * [`Config::default`] works out of the box on one machine (loopback
//!   listeners, anonymous MQTT on loopback only, built-in hash embedder).
//! * [`DEFAULT_CONFIG_TOML`] is the documented default file
//!   (`config/fedmesh.default.toml`); it parses to exactly `Config::default()`.
//! * [`Config::load`] reads a file, applies `FEDMESH_<SECTION>__<KEY>`
//!   environment overrides and validates. Every error names the dotted key
//!   (`p2p.bootstrap[1]`) or the environment variable at fault.
#![deny(missing_docs)]

mod error;
mod load;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use error::ConfigError;
pub use validate::check_multiaddr;

/// The documented default configuration file; parses to `Config::default()`.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../fedmesh.default.toml");

/// The whole node configuration, one field per TOML section.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[node]`: identity, storage and logging.
    pub node: NodeConfig,
    /// `[mqtt]`: the embedded broker agents connect to.
    pub mqtt: MqttConfig,
    /// `[p2p]`: the libp2p federation mesh.
    pub p2p: P2pConfig,
    /// `[http]`: health, status and metrics endpoint.
    pub http: HttpConfig,
    /// `[limits]`: resource bounds.
    pub limits: LimitsConfig,
    /// `[routing]`: semantic task routing.
    pub routing: RoutingConfig,
}

/// `[node]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Data directory; empty means the platform default (see [`Config::data_dir`]).
    pub data_dir: String,
    /// Node signing key file; relative paths resolve against the data directory.
    pub key_file: String,
    /// Optional human-readable label.
    pub name: String,
    /// `tracing` filter directive, e.g. `info` or `fedmesh=debug,info`.
    pub log: String,
}

/// When MQTT clients may connect without credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllowAnonymous {
    /// Always require credentials.
    Never,
    /// Allow anonymous clients only when every MQTT listener is on loopback.
    Loopback,
    /// Always allow anonymous clients.
    Always,
}

/// `[mqtt]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// MQTT 3.1.1 listener address; empty disables it.
    pub listen_v4: String,
    /// MQTT 5 listener address; empty disables it.
    pub listen_v5: String,
    /// MQTT-over-TLS listener address (MQTT 3.1.1 and 5 on one port, like 8883); empty
    /// disables it.
    pub listen_tls: String,
    /// TLS certificate chain (PEM, leaf first); relative to the data directory.
    pub tls_cert: String,
    /// TLS private key of the leaf certificate (PEM); relative to the data directory.
    pub tls_key: String,
    /// CA certificates (PEM) that issue client certificates; relative to the data
    /// directory. Empty: no client certificates. Set: every TLS client must present one
    /// issued by them, and its subject CN is the client's principal.
    pub tls_client_ca: String,
    /// Anonymous access policy.
    pub allow_anonymous: AllowAnonymous,
    /// Hashed per-agent credentials file; relative to the data directory.
    pub credentials_file: String,
    /// Maximum concurrent client connections.
    pub max_connections: usize,
    /// Maximum MQTT publish payload.
    pub max_payload_bytes: usize,
    /// Broker buffer budget from which segment sizes and counts derive.
    pub memory_budget_mb: u64,
    /// Time a client has to send CONNECT.
    pub connect_timeout_ms: u64,
    /// Let the front proxy write messages straight into their subscribers' connections when
    /// it can match what the embedded broker would do; `false`: every message passes through
    /// rumqttd (slower; an escape hatch, and the baseline of the benchmarks).
    pub direct_delivery: bool,
}

/// `[p2p]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct P2pConfig {
    /// Multiaddrs to listen on.
    pub listen: Vec<String>,
    /// Peers to dial at start-up; each multiaddr ends in `/p2p/<peer id>`.
    pub bootstrap: Vec<String>,
    /// Enable the QUIC transport (`/udp/<port>/quic-v1` listen and bootstrap addresses). When
    /// no listen address is QUIC, one is derived from each TCP one: see
    /// [`P2pConfig::listen_addrs`].
    pub quic: bool,
    /// Enable mDNS local peer discovery (dial and add to Kademlia the peers found on the LAN).
    pub mdns: bool,
    /// Maximum established connections.
    pub max_connections: u32,
    /// Maximum established connections per peer.
    pub max_connections_per_peer: u32,
    /// Gossipsub heartbeat interval.
    pub gossip_heartbeat_ms: u64,
    /// Lifetime of a capability advertisement.
    pub advertise_ttl_s: u64,
    /// How often this node re-advertises its agents (less than the TTL).
    pub readvertise_interval_s: u64,
    /// How often to anti-entropy sync capability tables with peers.
    pub sync_interval_s: u64,
}

/// `[http]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address for `/healthz`, `/status` and `/metrics`; empty disables.
    pub listen: String,
}

/// `[limits]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Maximum agents registered on this node.
    pub max_agents_per_node: usize,
    /// Maximum tasks in flight through this node.
    pub max_inflight_tasks: usize,
    /// Maximum size of one task's input.
    pub max_task_input_bytes: usize,
    /// Capacity of bounded internal queues.
    pub max_queue_depth: usize,
}

/// Which text embedder the router uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Embedder {
    /// Built-in feature-hashing embedder; zero set-up.
    Hash,
    /// WordLlama static embeddings, weights unpacked from its PyPI wheel.
    Wordllama,
}

/// `[routing]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Embedder used for capability matching.
    pub embedder: Embedder,
    /// Unpacked WordLlama wheel; empty means `<data_dir>/wordllama`.
    pub wordllama_dir: String,
    /// Minimum similarity (tau) for an agent to be a candidate, in [0, 1].
    pub threshold: f64,
    /// Number of fallback candidates kept per task.
    pub top_k: usize,
    /// Time an agent has to accept an offered task.
    pub offer_timeout_ms: u64,
    /// Time one attempt may run before the task is retried on another agent.
    pub attempt_timeout_ms: u64,
    /// Attempts (on different agents) before a task fails.
    pub max_attempts: u32,
    /// Deadline for tasks that do not set one.
    pub default_deadline_ms: u64,
    /// Penalty weight for an agent's current load, >= 0.
    pub load_weight: f64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            data_dir: String::new(),
            key_file: "node.key".into(),
            name: String::new(),
            log: "info".into(),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen_v4: "127.0.0.1:1883".into(),
            listen_v5: "127.0.0.1:1884".into(),
            listen_tls: String::new(),
            tls_cert: "tls/cert.pem".into(),
            tls_key: "tls/key.pem".into(),
            tls_client_ca: String::new(),
            allow_anonymous: AllowAnonymous::Loopback,
            credentials_file: "credentials.toml".into(),
            max_connections: 2_048,
            max_payload_bytes: 262_144,
            memory_budget_mb: 256,
            connect_timeout_ms: 5_000,
            direct_delivery: true,
        }
    }
}

impl Default for P2pConfig {
    fn default() -> Self {
        Self {
            listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
            bootstrap: Vec::new(),
            quic: false,
            mdns: false,
            max_connections: 256,
            max_connections_per_peer: 2,
            gossip_heartbeat_ms: 700,
            advertise_ttl_s: 3_600,
            readvertise_interval_s: 1_200,
            sync_interval_s: 30,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_agents_per_node: 10_000,
            max_inflight_tasks: 100_000,
            max_task_input_bytes: 262_144,
            max_queue_depth: 4_096,
        }
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            embedder: Embedder::Hash,
            wordllama_dir: String::new(),
            threshold: 0.3,
            top_k: 3,
            offer_timeout_ms: 2_000,
            attempt_timeout_ms: 60_000,
            max_attempts: 3,
            default_deadline_ms: 300_000,
            load_weight: 0.5,
        }
    }
}

/// Parses an optional socket address: `None` when empty (disabled) or invalid
/// (validation rejects invalid ones).
fn opt_addr(s: &str) -> Option<SocketAddr> {
    if s.is_empty() { None } else { s.parse().ok() }
}

impl MqttConfig {
    /// The MQTT 3.1.1 listener, if enabled.
    pub fn listen_v4_addr(&self) -> Option<SocketAddr> {
        opt_addr(&self.listen_v4)
    }

    /// The MQTT 5 listener, if enabled.
    pub fn listen_v5_addr(&self) -> Option<SocketAddr> {
        opt_addr(&self.listen_v5)
    }

    /// The MQTT-over-TLS listener, if enabled.
    pub fn listen_tls_addr(&self) -> Option<SocketAddr> {
        opt_addr(&self.listen_tls)
    }

    /// Whether clients may connect without credentials. Under `loopback`
    /// this holds only if every enabled listener is on a loopback address
    /// (mosquitto 2's local-only mode).
    pub fn anonymous_allowed(&self) -> bool {
        match self.allow_anonymous {
            AllowAnonymous::Never => false,
            AllowAnonymous::Always => true,
            AllowAnonymous::Loopback => {
                let addrs = [&self.listen_v4, &self.listen_v5, &self.listen_tls];
                let enabled = addrs.iter().filter(|s| !s.is_empty());
                enabled
                    .map(|s| s.parse::<SocketAddr>())
                    .all(|a| a.is_ok_and(|a| a.ip().is_loopback()))
            }
        }
    }
}

impl P2pConfig {
    /// The multiaddrs the node listens on: `listen` as written, plus, when `quic` is on and no
    /// listen address is already `/quic-v1`, one `/ipX/<ip>/udp/<port>/quic-v1` per
    /// `/ipX/<ip>/tcp/<port>` address with the **same IP and the same port number** (UDP and TCP
    /// ports are separate, so `tcp/4001` gives `udp/4001/quic-v1` as usual for libp2p, and a
    /// random `tcp/0` gives a random `udp/0`). Other addresses (`/dns`, `/memory`) derive none.
    pub fn listen_addrs(&self) -> Vec<String> {
        let mut out = self.listen.clone();
        if !self.quic || self.listen.iter().any(|a| is_quic(a)) {
            return out;
        }
        for a in &self.listen {
            let parts: Vec<&str> = a.trim_end_matches('/').split('/').collect();
            if let ["", ip @ ("ip4" | "ip6"), host, "tcp", port] = parts.as_slice() {
                let derived = format!("/{ip}/{host}/udp/{port}/quic-v1");
                if !out.contains(&derived) {
                    out.push(derived);
                }
            }
        }
        out
    }
}

/// Whether a multiaddr uses the QUIC transport (`.../udp/<port>/quic-v1`).
pub fn is_quic(multiaddr: &str) -> bool {
    multiaddr.split('/').any(|p| p == "quic-v1")
}

impl HttpConfig {
    /// The HTTP listener, if enabled.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        opt_addr(&self.listen)
    }
}

impl Config {
    /// Parses and validates a TOML document (no environment overrides).
    pub fn from_toml_str(s: &str) -> Result<Config, ConfigError> {
        load::build(Some(("config", s)), std::iter::empty())
    }

    /// Reads `path` (or starts from defaults when `None`), applies
    /// `FEDMESH_*` overrides from the process environment, and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// Like [`Config::load`], with the environment given explicitly.
    ///
    /// `FEDMESH_<SECTION>__<KEY>=value` overrides `[section] key`;
    /// `FEDMESH_DATA_DIR` is short for `node.data_dir` and
    /// `FEDMESH_WORDLLAMA_DIR` for `routing.wordllama_dir`. String keys take
    /// the value verbatim; list keys take a TOML array or a comma-separated
    /// list; other keys take a TOML value. Other `FEDMESH_` variables without
    /// `__` are ignored.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => Some(
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
            ),
            None => None,
        };
        let origin = path.map(|p| p.display().to_string());
        let file = origin.as_deref().zip(text.as_deref());
        load::build(file, env)
    }

    /// Checks every rule; the error names the first offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate::validate(self)
    }

    /// Renders the configuration as TOML.
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// The data directory: `node.data_dir` if set, else
    /// `$XDG_DATA_HOME/fedmesh`, `$HOME/.local/share/fedmesh`, or
    /// `./fedmesh-data` when there is no home directory.
    pub fn data_dir(&self) -> PathBuf {
        if !self.node.data_dir.is_empty() {
            return PathBuf::from(&self.node.data_dir);
        }
        default_data_dir(std::env::var_os("XDG_DATA_HOME"), std::env::var_os("HOME"))
    }

    /// The node key file, resolved against the data directory.
    pub fn key_path(&self) -> PathBuf {
        self.data_dir().join(&self.node.key_file)
    }

    /// The MQTT credentials file, resolved against the data directory.
    pub fn credentials_path(&self) -> PathBuf {
        self.data_dir().join(&self.mqtt.credentials_file)
    }

    /// The TLS certificate and key files, resolved against the data directory.
    pub fn tls_paths(&self) -> (PathBuf, PathBuf) {
        let d = self.data_dir();
        (d.join(&self.mqtt.tls_cert), d.join(&self.mqtt.tls_key))
    }

    /// The client CA file (`mqtt.tls_client_ca`), resolved against the data directory;
    /// `None` when client certificates are off.
    pub fn tls_client_ca_path(&self) -> Option<PathBuf> {
        (!self.mqtt.tls_client_ca.is_empty())
            .then(|| self.data_dir().join(&self.mqtt.tls_client_ca))
    }

    /// The WordLlama directory: `routing.wordllama_dir` (resolved against the
    /// data directory) or `<data_dir>/wordllama`.
    pub fn wordllama_dir(&self) -> PathBuf {
        match self.routing.wordllama_dir.as_str() {
            "" => self.data_dir().join("wordllama"),
            d => self.data_dir().join(d),
        }
    }
}

/// Default data directory from the values of `XDG_DATA_HOME` and `HOME`.
/// Relative or empty values are ignored, as the XDG spec asks.
fn default_data_dir(
    xdg_data_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> PathBuf {
    let abs = |v: Option<std::ffi::OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(xdg) = abs(xdg_data_home) {
        xdg.join("fedmesh")
    } else if let Some(home) = abs(home) {
        home.join(".local/share/fedmesh")
    } else {
        PathBuf::from("./fedmesh-data")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_parses_to_default() {
        let parsed = Config::from_toml_str(DEFAULT_CONFIG_TOML).expect("default file is valid");
        assert_eq!(parsed, Config::default());
        Config::default().validate().expect("defaults are valid");
    }

    #[test]
    fn default_file_mentions_every_key() {
        let table: toml::Table = toml::from_str(&Config::default().to_toml_string()).expect("toml");
        for (section, keys) in &table {
            let keys = keys.as_table().expect("section table");
            assert!(
                DEFAULT_CONFIG_TOML.contains(&format!("[{section}]")),
                "{section}"
            );
            for key in keys.keys() {
                let line = format!("\n{key} = ");
                assert!(
                    DEFAULT_CONFIG_TOML.contains(&line),
                    "{section}.{key} missing"
                );
            }
        }
    }

    #[test]
    fn empty_document_is_default_and_round_trips() {
        assert_eq!(
            Config::from_toml_str("").expect("empty ok"),
            Config::default()
        );
        let mut c = Config::default();
        c.p2p.bootstrap = vec!["/dns4/a.example/tcp/4001/p2p/12D3KooWabc".into()];
        c.routing.threshold = 0.45;
        let back = Config::from_toml_str(&c.to_toml_string()).expect("round trip");
        assert_eq!(back, c);
    }

    #[test]
    fn quic_listen_addresses_are_derived_from_tcp_ones() {
        let mut p = P2pConfig {
            listen: vec![
                "/ip4/0.0.0.0/tcp/4001".into(),
                "/ip6/::/tcp/0".into(),
                "/dns4/x.example/tcp/5".into(),
                "/memory/7".into(),
            ],
            ..P2pConfig::default()
        };
        assert_eq!(p.listen_addrs(), p.listen, "quic off: as written");
        p.quic = true;
        assert_eq!(
            p.listen_addrs(),
            [
                "/ip4/0.0.0.0/tcp/4001",
                "/ip6/::/tcp/0",
                "/dns4/x.example/tcp/5",
                "/memory/7",
                "/ip4/0.0.0.0/udp/4001/quic-v1",
                "/ip6/::/udp/0/quic-v1",
            ]
        );
        // An explicit QUIC address: nothing derived, QUIC-only works.
        p.listen = vec![
            "/ip4/127.0.0.1/tcp/1".into(),
            "/ip4/127.0.0.1/udp/9/quic-v1".into(),
        ];
        assert_eq!(p.listen_addrs(), p.listen);
        p.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".into()];
        assert_eq!(p.listen_addrs(), p.listen);
    }

    #[test]
    fn quic_addresses_need_quic_on() {
        let mut c = Config::default();
        c.p2p.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".into()];
        let e = c.validate().expect_err("quic off").to_string();
        assert!(e.contains("p2p.listen[0]") && e.contains("p2p.quic"), "{e}");
        c.p2p.quic = true;
        c.validate().expect("quic on");
        c.p2p.quic = false;
        c.p2p.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
        c.p2p.bootstrap = vec![
            "/ip4/127.0.0.1/udp/4001/quic-v1/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
                .into(),
        ];
        let e = c.validate().expect_err("quic off").to_string();
        assert!(
            e.contains("p2p.bootstrap[0]") && e.contains("p2p.quic"),
            "{e}"
        );
        c.p2p.quic = true;
        c.validate().expect("quic on");
    }

    #[test]
    fn anonymous_rule() {
        let mut m = MqttConfig::default();
        assert!(m.anonymous_allowed());
        m.listen_v5 = String::new();
        assert!(m.anonymous_allowed());
        m.listen_v4 = "[::1]:1883".into();
        assert!(m.anonymous_allowed());
        m.listen_v5 = "0.0.0.0:1884".into();
        assert!(!m.anonymous_allowed());
        m.listen_v5 = "127.0.0.1:1884".into();
        m.listen_tls = "0.0.0.0:8883".into();
        assert!(!m.anonymous_allowed(), "the TLS listener counts");
        m.listen_tls = "127.0.0.1:8883".into();
        assert!(m.anonymous_allowed());
        m.allow_anonymous = AllowAnonymous::Always;
        assert!(m.anonymous_allowed());
        m = MqttConfig {
            allow_anonymous: AllowAnonymous::Never,
            ..MqttConfig::default()
        };
        assert!(!m.anonymous_allowed());
    }

    #[test]
    fn paths_resolve() {
        let p = |s: &str| Some(std::ffi::OsString::from(s));
        assert_eq!(
            default_data_dir(p("/x"), p("/h")),
            PathBuf::from("/x/fedmesh")
        );
        assert_eq!(
            default_data_dir(p("rel"), p("/h")),
            PathBuf::from("/h/.local/share/fedmesh")
        );
        assert_eq!(
            default_data_dir(None, None),
            PathBuf::from("./fedmesh-data")
        );
        let mut c = Config::default();
        c.node.data_dir = "/srv/fm".into();
        assert_eq!(c.key_path(), PathBuf::from("/srv/fm/node.key"));
        assert_eq!(
            c.credentials_path(),
            PathBuf::from("/srv/fm/credentials.toml")
        );
        assert_eq!(c.wordllama_dir(), PathBuf::from("/srv/fm/wordllama"));
        assert_eq!(
            c.tls_paths(),
            (
                PathBuf::from("/srv/fm/tls/cert.pem"),
                PathBuf::from("/srv/fm/tls/key.pem")
            )
        );
        c.node.key_file = "/etc/fm/key".into();
        assert_eq!(c.key_path(), PathBuf::from("/etc/fm/key"));
    }
}
