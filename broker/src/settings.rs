//! Broker settings and the limits derived from the memory budget.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rumqttd::RouterConfig;

use crate::error::BrokerError;

/// Settings of the embedded broker (built by the node from its `[mqtt]` config).
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Public MQTT 3.1.1 listener. (Each public listener accepts both MQTT 3.1.1 and 5.)
    pub listen_v4: SocketAddr,
    /// Optional public MQTT 5 listener.
    pub listen_v5: Option<SocketAddr>,
    /// Optional public MQTT-over-TLS listener (MQTT 3.1.1 and 5).
    pub tls: Option<TlsSettings>,
    /// Whether clients without credentials may connect (their principal is their client id).
    pub anonymous: bool,
    /// Credentials file written by `CredentialStore::add`; `None`: nobody can log in.
    pub credentials_path: Option<PathBuf>,
    /// Maximum concurrent client connections (further capped by the memory budget).
    pub max_connections: usize,
    /// Maximum PUBLISH payload in bytes; larger publishes close the connection.
    pub max_payload_bytes: usize,
    /// Memory budget of the broker (see [`BrokerLimits`] for what derives from it).
    pub memory_budget_bytes: u64,
    /// Time a client has to send its CONNECT after the TCP connection opens.
    pub connect_timeout: Duration,
    /// Depth of the inbound (to the node) and outbound (from the node) queues.
    pub queue_depth: usize,
    /// Let the proxy write messages into subscribers' connections itself when it can (see
    /// the `direct` module); `false`: everything passes through rumqttd.
    pub direct_delivery: bool,
}

/// The MQTT-over-TLS listener: its address and PEM files.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Private key of the leaf certificate (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that issue client certificates. `Some`: every client must
    /// present a certificate issued by one of them, and its subject CN is the principal.
    pub client_ca: Option<PathBuf>,
}

impl Default for BrokerSettings {
    /// The node's defaults: loopback listeners on 1883/1884, anonymous allowed, no
    /// credentials file.
    fn default() -> Self {
        Self {
            listen_v4: SocketAddr::from(([127, 0, 0, 1], 1883)),
            listen_v5: Some(SocketAddr::from(([127, 0, 0, 1], 1884))),
            tls: None,
            anonymous: true,
            credentials_path: None,
            max_connections: 10_000,
            max_payload_bytes: 256 * 1024,
            memory_budget_bytes: 256 * 1024 * 1024,
            connect_timeout: Duration::from_secs(5),
            queue_depth: 1024,
            direct_delivery: true,
        }
    }
}

/// Smallest accepted memory budget.
pub const MIN_MEMORY_BUDGET: u64 = 8 * 1024 * 1024;
/// Estimated memory of one client connection: rumqttd's per-connection buffers (two
/// 200-slot queues, network buffers, router state) plus the proxy's (two streaming
/// read buffers and two write buffers of 8 KiB).
pub const PER_CONNECTION_BYTES: u64 = 64 * 1024;
/// Router connection slots kept beyond the client limit: the node's link, watchdog probes.
/// The proxy admits at most `max_connections` clients, so rumqttd's router never has to
/// refuse a connection after CONNECT (which is what leaves the stale will sender behind
/// that later panics rumqttd's listener).
pub const INTERNAL_SLOTS: usize = 16;
/// Segments per commit log (rumqttd keeps this many full segments plus the active one).
pub const SEGMENT_COUNT: usize = 4;
/// Bytes allowed in a frame besides the PUBLISH payload (topic, properties, …).
pub const FRAME_OVERHEAD: usize = 64 * 1024;
/// Smallest and largest segment for ordinary filters.
const SEGMENT_MIN: u64 = 16 * 1024;
const SEGMENT_MAX: u64 = 4 * 1024 * 1024;

/// The limits derived from [`BrokerSettings`].
///
/// With `B = memory_budget_bytes`, `C = max_connections`, `M = max_payload_bytes`:
///
/// * **connections**: half the budget pays for connections at
///   `PER_CONNECTION_BYTES` (64 KiB) each: `connections = min(C, (B/2) / 64 KiB)`
///   (256 MiB → 2048). rumqttd's router gets `connections + INTERNAL_SLOTS` slots.
/// * **commit logs**: rumqttd keeps one in-memory log per distinct subscription filter,
///   of `SEGMENT_COUNT + 1` segments (older segments are dropped, and the data with them,
///   when a lagging subscriber falls behind: that is how a QoS 0 flood is bounded). The
///   other half of the budget pays for them: every filter gets `segment = clamp((B/4) / 64
///   / (SEGMENT_COUNT + 1), 16 KiB, 4 MiB)`, so 64 fully backed-up filters fit in a
///   quarter; a log holds `5 × segment` (plus one message of overflow). The other quarter
///   is headroom: it used to pay for the node link's two wildcard filters, which carried
///   all principal traffic until the proxy started handing that traffic to the node
///   directly (the link subscribes to nothing now).
/// * **QoS 0 batch**: `max_outgoing_packet_count = clamp(B / (connections × 1 KiB), 16,
///   200)` (128 at the defaults): messages the router hands a connection per pass. They are
///   reference-counted views of the log, not copies. With 32 (`× 4 KiB`) a subscriber of a QoS 0
///   flood got 18 % fewer messages per second (32 K vs 38 K msg/s, 1 KiB, A/B interleaved).
/// * **frames**: a PUBLISH payload is at most `M`; any frame at most `M + 64 KiB`.
///
/// What the budget cannot bound: rumqttd creates a log per distinct filter (and, with
/// dynamic filters, per distinct topic published with no matching filter) and never
/// frees one; retained messages and the per-client-id "graveyard" also grow with use.
///
/// # What happens under a flood, and the RSS to expect
///
/// A QoS 0 flood towards a slow subscriber is bounded by the filter's log: once the
/// subscriber is more than `5 × segment` behind, rumqttd drops the oldest segment and the
/// subscriber's read cursor jumps over it. Those messages are lost for it; the node counts
/// them in `fedmesh_broker_dropped_total{reason="slow_subscriber"}` (from rumqttd's
/// "Read cursor start jumped" warning, see the node's `droplog` module). QoS 1 traffic on
/// other filters keeps flowing meanwhile (it has its own logs).
///
/// The budget is the broker's estimated ceiling, not an allocation, and covers the broker
/// only. The whole node's RSS should stay under
///
/// ```text
/// RSS ≤ B + margin,   margin = 64 MiB + B/4
/// ```
///
/// where 64 MiB pays for the rest of the node (tokio, sled's cache, libp2p, the HTTP
/// server, the registry and task state at modest sizes: an idle node is ≈ 16 MiB) and
/// `B/4` for allocator slack (segments are freed and reallocated at flood rate). Measured
/// by `scripts/soak.sh` (BENCHMARKS.md, "QoS 0 flood soak"): a 60 s QoS 0 1 KiB flood at
/// ≈ 270 K msg/s towards a subscriber reading 10 K msg/s, with QoS 1 at 500 msg/s
/// alongside: max RSS 26.6 MiB with B = 64 MiB (limit 144 MiB), with no QoS 1 loss.
/// mosquitto, for comparison, queued the same flood up to 1.05 GiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerLimits {
    /// Client connections the proxy admits.
    pub max_connections: usize,
    /// Largest PUBLISH payload accepted from a client.
    pub max_payload_bytes: usize,
    /// Largest frame (remaining length) accepted from a client.
    pub max_frame_bytes: usize,
    /// rumqttd `max_connections`.
    pub router_max_connections: usize,
    /// rumqttd `max_segment_size` for ordinary filters.
    pub segment_bytes: usize,
    /// rumqttd `max_segment_count`.
    pub segment_count: usize,
    /// rumqttd `max_outgoing_packet_count`.
    pub max_outgoing_packet_count: u64,
}

impl BrokerLimits {
    /// Derives the limits (see the type docs for the formula).
    pub fn from_settings(s: &BrokerSettings) -> Result<Self, BrokerError> {
        let invalid = |field, reason: String| BrokerError::InvalidSetting { field, reason };
        if s.memory_budget_bytes < MIN_MEMORY_BUDGET {
            return Err(invalid(
                "memory_budget_bytes",
                format!(
                    "{} is below the minimum of {MIN_MEMORY_BUDGET}",
                    s.memory_budget_bytes
                ),
            ));
        }
        if s.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1".into()));
        }
        let max_payload_limit = crate::codec::MAX_REMAINING - FRAME_OVERHEAD;
        if s.max_payload_bytes == 0 || s.max_payload_bytes > max_payload_limit {
            return Err(invalid(
                "max_payload_bytes",
                format!("must be between 1 and {max_payload_limit}"),
            ));
        }
        if s.queue_depth == 0 {
            return Err(invalid("queue_depth", "must be at least 1".into()));
        }
        if s.connect_timeout.is_zero() {
            return Err(invalid("connect_timeout", "must be positive".into()));
        }
        let b = s.memory_budget_bytes;
        let by_budget = usize::try_from((b / 2) / PER_CONNECTION_BYTES).unwrap_or(usize::MAX);
        let max_connections = s.max_connections.min(by_budget).max(1);
        let segs = SEGMENT_COUNT as u64 + 1;
        let segment = ((b / 4) / 64 / segs).clamp(SEGMENT_MIN, SEGMENT_MAX);
        let per_pass = b / (max_connections as u64 * 1024);
        Ok(Self {
            max_connections,
            max_payload_bytes: s.max_payload_bytes,
            max_frame_bytes: s.max_payload_bytes + FRAME_OVERHEAD,
            router_max_connections: max_connections + INTERNAL_SLOTS,
            segment_bytes: usize::try_from(segment).unwrap_or(usize::MAX),
            segment_count: SEGMENT_COUNT,
            max_outgoing_packet_count: per_pass.clamp(16, 200),
        })
    }

    /// The rumqttd router configuration.
    pub(crate) fn router_config(&self) -> RouterConfig {
        RouterConfig {
            max_connections: self.router_max_connections,
            max_outgoing_packet_count: self.max_outgoing_packet_count,
            max_segment_size: self.segment_bytes,
            max_segment_count: self.segment_count,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_derive_sane_limits() {
        let l = BrokerLimits::from_settings(&BrokerSettings::default()).unwrap();
        assert_eq!(l.max_connections, 2048);
        assert_eq!(l.router_max_connections, 2048 + INTERNAL_SLOTS);
        assert_eq!(l.segment_count, 4);
        assert!(l.segment_bytes >= 16 * 1024 && l.segment_bytes <= 4 * 1024 * 1024);
        assert!((16..=200).contains(&l.max_outgoing_packet_count));
        assert_eq!(l.max_frame_bytes, 256 * 1024 + FRAME_OVERHEAD);
        let rc = l.router_config();
        assert!(rc.max_segment_size >= 1024, "rumqttd panics below 1 KiB");
        assert!(rc.max_segment_count >= 1, "rumqttd panics at 0");
        // 64 backed-up commit logs stay within a quarter of the budget.
        let logs = 64 * 5 * l.segment_bytes as u64;
        assert!(logs <= (256 << 20) / 4 + 1024, "{logs}");
    }

    #[test]
    fn small_budget_and_bad_values() {
        let s = BrokerSettings {
            memory_budget_bytes: MIN_MEMORY_BUDGET,
            max_connections: 5,
            ..BrokerSettings::default()
        };
        let l = BrokerLimits::from_settings(&s).unwrap();
        assert_eq!(l.max_connections, 5);
        assert_eq!(l.segment_bytes, 16 * 1024);
        for bad in [
            BrokerSettings {
                memory_budget_bytes: 1024,
                ..BrokerSettings::default()
            },
            BrokerSettings {
                max_connections: 0,
                ..BrokerSettings::default()
            },
            BrokerSettings {
                max_payload_bytes: 0,
                ..BrokerSettings::default()
            },
            BrokerSettings {
                queue_depth: 0,
                ..BrokerSettings::default()
            },
        ] {
            assert!(BrokerLimits::from_settings(&bad).is_err());
        }
    }
}
