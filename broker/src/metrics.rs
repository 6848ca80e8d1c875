//! Broker counters: atomics updated on the hot paths, snapshotted for export.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! metrics {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Live counters (relaxed atomics).
        #[derive(Debug, Default)]
        pub(crate) struct Metrics {
            $( pub(crate) $name: AtomicU64, )*
        }

        /// A point-in-time copy of the broker's counters, for the node's Prometheus export.
        /// All are monotonic counters except `connections_active` and
        /// `internal_listeners_nodelay` (gauges).
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct MetricsSnapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl MetricsSnapshot {
            /// Every counter with its name, for export.
            pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
                [$( (stringify!($name), self.$name), )*].into_iter()
            }
        }

        impl Metrics {
            pub(crate) fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot {
                    $( $name: self.$name.load(Ordering::Relaxed), )*
                }
            }
        }
    };
}

metrics! {
    /// TCP connections accepted on the public listeners.
    connections_accepted,
    /// Client connections currently open (gauge).
    connections_active,
    /// CONNECTs refused for an invalid client id (`[A-Za-z0-9_.-]{1,64}` expected).
    connects_refused_bad_id,
    /// CONNECTs refused for missing or wrong credentials, or anonymous access.
    connects_refused_bad_auth,
    /// CONNECTs refused because the will topic is outside the principal's rights.
    connects_refused_acl,
    /// Connections closed because no CONNECT arrived within `connect_timeout`.
    connects_refused_timeout,
    /// Connections closed because the first packet was not a valid CONNECT.
    connects_refused_garbage,
    /// TLS handshakes completed on the `listen_tls` listener.
    tls_handshakes,
    /// Connections to the `listen_tls` listener closed because the TLS handshake failed or
    /// did not finish within `connect_timeout` (e.g. plain MQTT sent to the TLS port).
    tls_handshake_failures,
    /// Times the TLS listener's certificate was loaded again (files changed, or SIGHUP).
    tls_reloads,
    /// Reloads refused because the new files could not be used (the old certificate stays).
    tls_reload_failures,
    /// Connections refused because `max_connections` were open.
    connects_refused_limit,
    /// Connections refused because rumqttd did not accept the proxied CONNECT.
    connects_refused_unavailable,
    /// PUBLISHes denied by the ACL (dropped, answered 0x87 or connection closed).
    acl_denied_publish,
    /// SUBSCRIBE filters denied by the ACL.
    acl_denied_subscribe,
    /// Connections closed after CONNECT for malformed or oversized packets.
    protocol_errors,
    /// Frames from clients.
    frames_in,
    /// Frames to clients.
    frames_out,
    /// Bytes from clients.
    bytes_in,
    /// Bytes to clients.
    bytes_out,
    /// Messages for the node dropped because the inbound queue was full.
    inbound_dropped,
    /// Node-bound PUBLISHes handed over after 5 s without rumqttd
    /// having acknowledged the connection's earlier SUBSCRIBEs.
    suback_wait_timeouts,
    /// Messages to clients that waited at the proxy for the node's flush (see `gate`).
    held_waits,
    /// Held messages delivered because the node did not release them within 30 s.
    held_timeouts,
    /// Messages from the node dropped because the outbound queue was full.
    outbound_dropped,
    /// Messages on the node link whose topic names no principal (none expected).
    inbound_malformed,
    /// Watchdog probes of rumqttd's internal listeners that failed.
    watchdog_failures,
    /// rumqttd internal listeners replaced by the watchdog.
    listener_restarts,
    /// Current rumqttd internal listeners (of 2) whose accepted sockets get TCP_NODELAY
    /// from their listening socket (gauge; see `Mechanism`).
    internal_listeners_nodelay,
    /// Proxied connections that re-arm TCP_QUICKACK because their internal listener
    /// lacks TCP_NODELAY (the fallback mechanism).
    upstream_quickack_connections,
    /// Times a QoS ≥ 1 publisher was held because a QoS ≥ 1 subscriber of its topic
    /// was more than half a commit log behind (see `flow`).
    qos1_flow_waits,
    /// Subscriber counts reset: a held publisher waited `flow::MAX_WAIT` in vain, or a
    /// subscriber counted as behind took nothing for 200 ms (the count had drifted).
    qos1_flow_resyncs,
    /// QoS 0 publishes dropped by the proxy because every subscriber they reach is more than
    /// half a commit log behind (rumqttd would drop them for those subscribers anyway).
    qos0_dropped_early,
    /// Copies of the node's messages written to a principal's connections by the proxy
    /// directly, not through rumqttd (see `direct`).
    direct_delivered,
    /// Node messages on a principal's topic that had to go through rumqttd (persistent
    /// session, shared or identified subscription, full queue, nobody subscribed, ...).
    direct_fallbacks,
    /// Node messages on a principal's topic that no live connection of the principal
    /// subscribes to (and no persistent session may): delivered to nobody, as rumqttd would.
    direct_unsubscribed,
    /// PUBLISHes on node API topics the proxy answered itself instead of forwarding them to
    /// rumqttd (nobody but the node could receive them; see `direct`).
    direct_kept,
    /// Connections that stopped taking direct messages because rumqttd used a packet id
    /// in the direct range (none expected with rumqttd 0.20).
    direct_pkid_conflicts,
    /// Copies of clients' messages written to subscribers' connections by the proxy
    /// directly, not through rumqttd (see `direct`).
    relay_delivered,
    /// Clients' messages on relayed topics that had to go through rumqttd (retained,
    /// persistent session, shared or identified subscription, v5 properties, full queue, an
    /// earlier message still at rumqttd, ...).
    relay_fallbacks,
    /// Clients' messages on relayed topics that nobody subscribes to (and no persistent
    /// session may): dropped (a QoS 1 one acknowledged), as rumqttd would.
    relay_unsubscribed,
    /// Connections waiting for messages that went through rumqttd taken to have caught up
    /// because rumqttd sent them nothing for a second (it dropped what they waited for).
    direct_behind_resyncs,
}

impl Metrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn set(gauge: &AtomicU64, v: u64) {
        gauge.store(v, Ordering::Relaxed);
    }

    pub(crate) fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}
