//! Prometheus metrics of the node (served at `/metrics`).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A label with one string value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// The value.
    pub kind: String,
}

impl Kind {
    /// A label.
    pub fn of(kind: impl Into<String>) -> Self {
        Self { kind: kind.into() }
    }
}

/// A peer and a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerReason {
    /// The peer (libp2p PeerId), or "other" past [`MAX_PEER_LABELS`] distinct peers.
    pub peer: String,
    /// Why.
    pub reason: String,
}

/// Distinct peer labels kept in `fedmesh_p2p_rejected` (bounds the metric's cardinality).
pub const MAX_PEER_LABELS: usize = 256;

/// Every metric the node exports.
#[derive(Debug)]
pub struct Metrics {
    /// Agents in the registry.
    pub agents: Gauge,
    /// Tasks by state (`kind` = state).
    pub tasks: Family<Kind, Gauge>,
    /// Submit → first delivery to an agent, seconds.
    pub route_latency: Histogram,
    /// Submit → final result, seconds.
    pub task_latency: Histogram,
    /// MQTT messages into the node, by op.
    pub messages_in: Family<Kind, Counter>,
    /// MQTT messages out of the node, by kind.
    pub messages_out: Family<Kind, Counter>,
    /// Errors by reason.
    pub errors: Family<Kind, Counter>,
    /// Messages dropped, by queue.
    pub queue_dropped: Family<Kind, Counter>,
    /// Broker counters, mirrored from the broker at scrape time (`kind` = counter name).
    pub broker: Family<Kind, Gauge<u64, AtomicU64>>,
    /// 1 when the broker's watchdog reports healthy.
    pub broker_healthy: Gauge,
    /// When the MQTT TLS listener's certificate expires (Unix seconds; absent without TLS).
    pub tls_cert_expiry: Gauge,
    /// Federation messages rejected or ignored, by forwarding peer and reason.
    pub p2p_rejected: Family<PeerReason, Counter>,
    /// Peers seen in `p2p_rejected` labels.
    rejected_peers: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Federation messages received, by topic or kind.
    pub p2p_in: Family<Kind, Counter>,
    /// Federation messages sent, by topic or kind.
    pub p2p_out: Family<Kind, Counter>,
    /// Connected libp2p peers.
    pub p2p_peers: Gauge,
    /// Request-response requests refused for their framing (announced length over the limit).
    /// libp2p does not say which peer sent a request that failed to read, so this has no peer.
    pub p2p_bad_framing: Counter,
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            agents: Gauge::default(),
            tasks: Family::default(),
            route_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 20)),
            task_latency: Histogram::new(exponential_buckets(0.000_1, 2.0, 24)),
            messages_in: Family::default(),
            messages_out: Family::default(),
            errors: Family::default(),
            queue_dropped: Family::default(),
            broker: Family::default(),
            broker_healthy: Gauge::default(),
            tls_cert_expiry: Gauge::default(),
            p2p_rejected: Family::default(),
            rejected_peers: Default::default(),
            p2p_in: Family::default(),
            p2p_out: Family::default(),
            p2p_peers: Gauge::default(),
            p2p_bad_framing: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("fedmesh");
        r.register(
            "agents",
            "Agents in the capability registry",
            m.agents.clone(),
        );
        r.register("tasks", "Tasks held, by state", m.tasks.clone());
        r.register(
            "route_latency_seconds",
            "Submit to first delivery to an agent",
            m.route_latency.clone(),
        );
        r.register(
            "task_latency_seconds",
            "Submit to final result (end to end)",
            m.task_latency.clone(),
        );
        r.register(
            "messages_in",
            "MQTT messages received by the node, by op",
            m.messages_in.clone(),
        );
        r.register(
            "messages_out",
            "MQTT messages published by the node, by kind",
            m.messages_out.clone(),
        );
        r.register("errors", "Errors, by reason", m.errors.clone());
        r.register(
            "queue_dropped",
            "Messages dropped by a full queue, by queue",
            m.queue_dropped.clone(),
        );
        r.register(
            "broker",
            "Embedded broker counters (connections, refusals, ACL denials, drops)",
            m.broker.clone(),
        );
        r.register(
            "broker_healthy",
            "1 when the broker watchdog reports healthy",
            m.broker_healthy.clone(),
        );
        r.register(
            "tls_cert_expiry_timestamp_seconds",
            "When the MQTT TLS listener's certificate expires, Unix seconds (0 without TLS)",
            m.tls_cert_expiry.clone(),
        );
        r.register(
            "p2p_rejected",
            "Federation messages rejected or ignored, by forwarding peer and reason",
            m.p2p_rejected.clone(),
        );
        r.register(
            "p2p_bad_framing",
            "Request-response requests refused for their framing (length over the limit)",
            m.p2p_bad_framing.clone(),
        );
        r.register(
            "p2p_in",
            "Federation messages received, by topic or kind",
            m.p2p_in.clone(),
        );
        r.register(
            "p2p_out",
            "Federation messages sent, by topic or kind",
            m.p2p_out.clone(),
        );
        r.register("p2p_peers", "Connected libp2p peers", m.p2p_peers.clone());
        // rumqttd's own drops, counted from its log events by `droplog::DropLog` (the
        // inbound/outbound queue drops are `fedmesh_broker{kind="…_dropped"}`).
        let drops = crate::droplog::DropCounters::global();
        let r = r.sub_registry_with_label((
            std::borrow::Cow::Borrowed("reason"),
            std::borrow::Cow::Borrowed(crate::droplog::REASON),
        ));
        r.register(
            "broker_dropped",
            "Messages the embedded broker dropped, by reason (slow_subscriber: skipped by a \
             subscriber that fell more than its filter's commit log behind)",
            drops.dropped,
        );
        r.register(
            "broker_drop_events",
            "Drop events of the embedded broker, by reason (slow_subscriber: read cursor jumps)",
            drops.events,
        );
        m
    }

    /// Counts one rejected federation message from `peer`.
    pub fn p2p_reject(&self, peer: &str, reason: &str) {
        let mut seen = self
            .rejected_peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let peer = if seen.contains(peer) || seen.len() < MAX_PEER_LABELS {
            seen.insert(peer.to_string());
            peer.to_string()
        } else {
            "other".to_string()
        };
        self.p2p_rejected
            .get_or_create(&PeerReason {
                peer,
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Rejections counted for `peer` and `reason`.
    #[cfg(test)]
    pub fn p2p_rejected_count(&self, peer: &str, reason: &str) -> u64 {
        self.p2p_rejected
            .get_or_create(&PeerReason {
                peer: peer.to_string(),
                reason: reason.to_string(),
            })
            .get()
    }

    /// Counts one error.
    pub fn error(&self, reason: &str) {
        self.errors.get_or_create(&Kind::of(reason)).inc();
    }
}
