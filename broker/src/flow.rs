//! QoS 1 flow control: a publisher may not outrun a QoS ≥ 1 subscriber by more than
//! rumqttd's commit log can hold.
//!
//! rumqttd acknowledges a QoS 1 PUBLISH as soon as its router appended it to the filter's
//! commit log. The log is bounded (`SEGMENT_COUNT` segments, see `settings`): when a
//! subscriber lags by more than that, rumqttd drops the oldest segment and the
//! subscriber's cursor jumps over it, so the subscriber silently loses messages whose
//! publisher already got its PUBACK. mosquitto queues instead (and drops past
//! `max_queued_messages`).
//!
//! The proxy sees both ends, so it meters each subscriber:
//!
//! * a subscriber connection registers its QoS ≥ 1 filters here when it subscribes;
//! * before the proxy forwards a QoS ≥ 1 PUBLISH to rumqttd, it adds the message's
//!   *cost* (what rumqttd's log charges: `4 + topic + payload` bytes) to the `pending`
//!   count of every registered subscriber whose filters match the topic, once per
//!   matching filter (rumqttd delivers once per matching filter);
//! * when the proxy writes a QoS ≥ 1 PUBLISH to a subscriber, it subtracts the cost;
//! * when a matched subscriber's `pending` is above the high-water mark (half the log),
//!   the publisher's relay stops reading from its client until the subscriber is back
//!   under the low-water mark. TCP then pushes back on the publisher.
//!
//! The count is an estimate. Messages the subscriber never receives (it unsubscribed in
//! between, rumqttd dropped them anyway, a `$share` group) would hold it up forever, so a
//! publisher waits at most [`MAX_WAIT`] per message; on timeout the subscriber's count is
//! reset (counted as a resync) and traffic flows on. Deliveries the count did not see
//! (retained messages, a resumed session) never take it below zero.
//!
//! What this does not protect: QoS 0 subscriptions (QoS 0 may be dropped, by design: that
//! is how a flood stays bounded), `$share/...` subscriptions, and the node's in-process
//! link (drained by the node's own bounded queues, whose drops are counted).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use crate::metrics::Metrics;

/// Longest a publisher is held for one slow subscriber before its count is reset.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(5);
/// Topics a publisher connection caches its matching subscribers for.
const ROUTE_CACHE: usize = 256;
/// QoS ≥ 1 filters one subscriber connection may have metered.
const FILTERS_PER_SUBSCRIBER: usize = 1024;

/// What rumqttd's commit log charges for a message (`PublishData::size` in rumqttd 0.20).
pub(crate) fn cost(topic_len: usize, payload_len: usize) -> u64 {
    (4 + topic_len + payload_len) as u64
}

/// MQTT topic filter matching (MQTT 3.1.1 §4.7, MQTT 5 §4.7): `+` is one level, a
/// trailing `#` is any number of levels (including none), and wildcards at the first
/// level do not match topics that start with `$`.
pub(crate) fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// One subscriber connection's meter.
#[derive(Debug, Default)]
pub(crate) struct Subscriber {
    /// QoS ≥ 1 filters, as rumqttd has them for this connection.
    filters: Mutex<Vec<String>>,
    /// Cost of the messages forwarded to rumqttd for it and not yet written to it.
    pending: AtomicU64,
    /// Woken when `pending` falls to the low-water mark, and when the subscriber leaves.
    drained: Notify,
    /// Whether the connection has a metered subscription (only then are deliveries
    /// counted).
    active: AtomicBool,
}

impl Subscriber {
    /// Whether deliveries to this connection are metered.
    pub(crate) fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a message written to the subscriber.
    pub(crate) fn delivered(&self, cost: u64, low: u64) {
        let before = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                Some(p.saturating_sub(cost))
            })
            .unwrap_or_else(|p| p);
        if before > low && before.saturating_sub(cost) <= low {
            self.drained.notify_waiters();
        }
    }

    fn pending(&self) -> u64 {
        self.pending.load(Ordering::Acquire)
    }
}

/// The registry of metered subscribers, shared by all connections of a broker.
#[derive(Debug)]
pub(crate) struct Flow {
    /// Whether metering is on (tests turn it off to show the loss it prevents).
    enabled: bool,
    high: u64,
    low: u64,
    max_wait: Duration,
    subscribers: Mutex<HashMap<u64, Arc<Subscriber>>>,
    next_id: AtomicU64,
    /// Bumped on every change of any subscriber's filters (invalidates route caches).
    generation: AtomicU64,
    /// `qos1_flow_waits` and `qos1_flow_resyncs` are counted here.
    metrics: Arc<Metrics>,
}

impl Flow {
    /// `log_bytes` is what one filter's commit log holds before rumqttd drops data.
    pub(crate) fn new(
        enabled: bool,
        log_bytes: u64,
        max_wait: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let high = (log_bytes / 2).max(1);
        Self {
            enabled,
            high,
            low: high / 2,
            max_wait,
            subscribers: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            generation: AtomicU64::new(0),
            metrics,
        }
    }

    pub(crate) fn low(&self) -> u64 {
        self.low
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Subscriber>>> {
        self.subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The metering state of one connection; unregisters itself on drop.
    pub(crate) fn connection(&self) -> Conn<'_> {
        Conn {
            flow: self,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            me: Arc::default(),
            registered: false,
            routes: HashMap::new(),
            generation: u64::MAX,
        }
    }
}

/// One connection's view of the flow control, as a publisher and as a subscriber.
#[derive(Debug)]
pub(crate) struct Conn<'a> {
    flow: &'a Flow,
    id: u64,
    /// This connection's meter (in the table once it has a metered subscription).
    me: Arc<Subscriber>,
    registered: bool,
    /// topic → (subscriber, matching filters), valid for `generation`.
    routes: HashMap<String, Vec<(Arc<Subscriber>, u64)>>,
    generation: u64,
}

impl Conn<'_> {
    /// This connection's meter, for the broker → client direction.
    pub(crate) fn meter(&self) -> Arc<Subscriber> {
        self.me.clone()
    }

    /// Records a SUBSCRIBE forwarded to rumqttd: QoS ≥ 1 filters are metered, a filter
    /// resubscribed with QoS 0 no longer is. Returns whether this connection is metered.
    pub(crate) fn subscribed(&mut self, filters: &[String], qos: &[u8]) -> bool {
        if !self.flow.enabled {
            return false;
        }
        if !self.registered {
            if !qos.iter().any(|q| *q > 0) {
                return false;
            }
            self.registered = true;
            self.me.active.store(true, Ordering::Relaxed);
            self.flow.table().insert(self.id, self.me.clone());
        }
        {
            let mut mine = self
                .me
                .filters
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for (f, q) in filters.iter().zip(qos) {
                mine.retain(|g| g != f);
                if *q > 0 && !f.starts_with('$') && mine.len() < FILTERS_PER_SUBSCRIBER {
                    mine.push(f.clone());
                }
            }
        }
        self.flow.changed();
        true
    }

    /// Records an UNSUBSCRIBE forwarded to rumqttd.
    pub(crate) fn unsubscribed(&mut self, filters: &[String]) {
        if self.registered {
            self.me
                .filters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|g| !filters.contains(g));
            self.flow.changed();
        }
    }

    /// Charges a QoS ≥ 1 message on `topic` to every matching subscriber, *before* it is
    /// forwarded (so a delivery can never be counted before its charge). Returns the
    /// subscribers that are now past the high-water mark.
    pub(crate) fn charge(&mut self, topic: &str, cost: u64) -> Vec<Arc<Subscriber>> {
        if !self.flow.enabled {
            return Vec::new();
        }
        let generation = self.flow.generation();
        if generation != self.generation || self.routes.len() >= ROUTE_CACHE {
            self.routes.clear();
            self.generation = generation;
        }
        if !self.routes.contains_key(topic) {
            let route: Vec<_> = self
                .flow
                .table()
                .values()
                .filter_map(|s| {
                    let n = s
                        .filters
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .iter()
                        .filter(|f| matches(f, topic))
                        .count() as u64;
                    (n > 0).then(|| (s.clone(), n))
                })
                .collect();
            self.routes.insert(topic.to_owned(), route);
        }
        let mut behind = Vec::new();
        for (s, n) in self.routes.get(topic).into_iter().flatten() {
            let p = s.pending.fetch_add(cost * n, Ordering::AcqRel) + cost * n;
            if p > self.flow.high {
                behind.push(s.clone());
            }
        }
        behind
    }

    /// Holds the caller until every subscriber in `behind` is back under the low-water
    /// mark, at most `max_wait` each; a subscriber that does not drain in time has its
    /// count reset.
    pub(crate) async fn wait(&self, behind: Vec<Arc<Subscriber>>) {
        if behind.is_empty() {
            return;
        }
        Metrics::inc(&self.flow.metrics.qos1_flow_waits);
        let low = self.flow.low;
        for s in behind {
            let drained = tokio::time::timeout(self.flow.max_wait, async {
                loop {
                    let notified = s.drained.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if s.pending() <= low {
                        return;
                    }
                    notified.await;
                }
            })
            .await;
            if drained.is_err() {
                s.pending.store(0, Ordering::Release);
                Metrics::inc(&self.flow.metrics.qos1_flow_resyncs);
                tracing::debug!(
                    "flow control: a QoS 1 subscriber did not drain in time; count reset"
                );
            }
        }
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if self.registered {
            self.flow.table().remove(&self.id);
            self.flow.changed();
            // Publishers held for this subscriber go on.
            self.me.active.store(false, Ordering::Relaxed);
            self.me.pending.store(0, Ordering::Release);
            self.me.drained.notify_waiters();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn filter_matching() {
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/c"));
        assert!(matches("a/+", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(matches("+/+", "/b"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(!matches("a/b/c", "a/b"));
    }

    fn subscriber<'a>(flow: &'a Flow, filters: &[&str], qos: u8) -> (Conn<'a>, Arc<Subscriber>) {
        let mut c = flow.connection();
        let f: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        assert!(c.subscribed(&f, &vec![qos; f.len()]));
        let me = c.meter();
        (c, me)
    }

    #[test]
    fn charges_matching_qos1_subscribers_once_per_filter() {
        let flow = Flow::new(true, 1000, MAX_WAIT, Arc::default());
        let (_a, a) = subscriber(&flow, &["t/+", "t/#"], 1);
        let (_b, b) = subscriber(&flow, &["u"], 1);
        let mut c0 = flow.connection();
        assert!(
            !c0.subscribed(&["t/x".into()], &[0]),
            "QoS 0 is not metered"
        );
        let mut p = flow.connection();
        assert!(p.charge("t/x", 100).is_empty());
        assert_eq!(a.pending(), 200);
        assert_eq!(b.pending(), 0);
        // Past high water (500): reported as behind.
        assert_eq!(p.charge("t/x", 200).len(), 1);
        a.delivered(10_000, flow.low());
        assert_eq!(a.pending(), 0, "never below zero");
    }

    #[test]
    fn resubscribing_at_qos0_or_unsubscribing_stops_metering() {
        let flow = Flow::new(true, 1000, MAX_WAIT, Arc::default());
        let (mut a, me) = subscriber(&flow, &["t"], 1);
        let mut p = flow.connection();
        p.charge("t", 10);
        assert_eq!(me.pending(), 10);
        a.subscribed(&["t".into()], &[0]);
        p.charge("t", 10);
        assert_eq!(me.pending(), 10, "the route cache follows the change");
        a.subscribed(&["t".into()], &[1]);
        p.charge("t", 10);
        assert_eq!(me.pending(), 20);
        a.unsubscribed(&["t".into()]);
        p.charge("t", 10);
        assert_eq!(me.pending(), 20);
    }

    #[test]
    fn disabled_flow_meters_nothing() {
        let flow = Flow::new(false, 1000, MAX_WAIT, Arc::default());
        let mut c = flow.connection();
        assert!(!c.subscribed(&["t".into()], &[1]));
        assert!(flow.connection().charge("t", 10_000).is_empty());
    }

    #[tokio::test]
    async fn wait_returns_when_the_subscriber_drains_or_times_out() {
        let flow = Flow::new(true, 1000, Duration::from_millis(200), Arc::default());
        let (_a, a) = subscriber(&flow, &["t"], 1);
        let mut p = flow.connection();
        let behind = p.charge("t", 600);
        assert_eq!(behind.len(), 1);
        let drain = {
            let a = a.clone();
            let low = flow.low();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                a.delivered(400, low);
            }
        };
        tokio::join!(p.wait(behind), drain);
        assert_eq!(a.pending(), 200);
        assert_eq!(flow.metrics.qos1_flow_resyncs.load(Ordering::Relaxed), 0);
        // Nobody drains: the wait ends at max_wait and the count is reset.
        let behind = p.charge("t", 600);
        p.wait(behind).await;
        assert_eq!(a.pending(), 0);
        assert_eq!(flow.metrics.qos1_flow_resyncs.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_leaving_subscriber_releases_its_publishers() {
        let flow = Flow::new(true, 1000, Duration::from_secs(60), Arc::default());
        let (a_conn, _a) = subscriber(&flow, &["t"], 1);
        let mut p = flow.connection();
        let behind = p.charge("t", 600);
        let leave = async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(a_conn);
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(p.wait(behind), leave)
        })
        .await
        .unwrap();
    }
}
