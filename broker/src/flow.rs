//! Flow control between publishers and slow subscribers: QoS 1 publishers are held
//! (back-pressure, nothing lost), QoS 0 publishes are dropped early (best effort, cheaply).
//! Zenoh users know the pair as `CongestionControl::Block` and `::Drop`.
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
//! * a subscriber connection registers its filters here (with their QoS) when it subscribes;
//! * before the proxy forwards a PUBLISH to rumqttd, it adds the message's *cost* (what
//!   rumqttd's log charges: `4 + topic + payload` bytes) to the `pending` count of every
//!   registered subscriber whose filters match the topic, once per matching filter (rumqttd
//!   delivers once per matching filter);
//! * when the proxy writes a PUBLISH to a subscriber, it subtracts the cost;
//! * **QoS ≥ 1:** when a matched QoS ≥ 1 subscriber's `pending` is above the high-water
//!   mark (half the log), the publisher's relay stops reading from its client until the
//!   subscriber is back under the low-water mark. TCP then pushes back on the publisher;
//! * **QoS 0:** when *every* subscriber a QoS 0 publish matches is above the high-water
//!   mark, the proxy drops it instead of forwarding it: rumqttd would drop it for them
//!   anyway, after paying to ingest and store it. Measured: a subscriber of a 1 KiB QoS 0
//!   flood got 37 K msg/s with the drop left to rumqttd and 103 K msg/s with it done here
//!   (mosquitto 85 K; BENCHMARKS.md). Topics under `fedmesh/v1/` (the node's own link
//!   subscribes to them, unmetered) and topics a `$share/…` group subscribes to are never
//!   dropped early.
//!
//! The count is an estimate. Messages the subscriber never receives (it unsubscribed in
//! between, rumqttd dropped them anyway) would hold it up forever, so a publisher waits at
//! most [`MAX_WAIT`] per message, and a subscriber counted as behind that took nothing for
//! [`IDLE_RESYNC_MS`] is taken to have caught up; either way its count is reset (counted as
//! a resync) and traffic flows on. Deliveries the count did not see (retained messages, a
//! resumed session) never take it below zero.
//!
//! What this does not cover: `$share/…` subscriptions (not metered), and the node's
//! in-process link (drained by the node's own bounded queues, whose drops are counted).

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
/// Filters one subscriber connection may have metered.
const FILTERS_PER_SUBSCRIBER: usize = 1024;
/// A subscriber counted as behind that has taken nothing for this long is assumed to have
/// caught up with what rumqttd really holds for it (the count drifted: rumqttd dropped data,
/// or it unsubscribed in between), and its count is reset.
const IDLE_RESYNC_MS: u64 = 200;
/// Topics the node's in-process link subscribes to: never dropped early (the link is not
/// metered, and the node must see every principal message).
const NODE_TOPICS: &str = "fedmesh/v1/";
/// QoS marking a `$share/…` subscription: matched for interest, never metered.
const SHARED: u8 = u8::MAX;

/// What to do with a publish (see [`Conn::charge`]).
#[derive(Debug)]
pub(crate) enum Charge {
    /// Forward it; for QoS ≥ 1, then hold the publisher until these QoS ≥ 1 subscribers
    /// drained.
    Forward(Vec<Arc<Subscriber>>),
    /// QoS 0 only: every subscriber it matches is more than half a log behind, so rumqttd
    /// would drop it anyway; drop it here, before it costs anything.
    Drop,
}

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
    /// Filters with their QoS ([`SHARED`] for the filter inside a `$share/…` one), as rumqttd
    /// has them for this connection.
    filters: Mutex<Vec<(String, u8)>>,
    /// When a message was last written to it (ms since the flow's epoch).
    last_delivery_ms: AtomicU64,
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
    pub(crate) fn delivered(&self, cost: u64, low: u64, now_ms: u64) {
        self.last_delivery_ms.store(now_ms, Ordering::Relaxed);
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
    epoch: std::time::Instant,
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
            epoch: std::time::Instant::now(),
        }
    }

    pub(crate) fn low(&self) -> u64 {
        self.low
    }

    /// Milliseconds since this flow started (for delivery timestamps).
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
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
    /// topic → its route, valid for `generation`.
    routes: HashMap<String, Route>,
    generation: u64,
}

/// The subscribers a topic reaches.
#[derive(Debug, Default)]
struct Route {
    /// (subscriber, matching metered filters, whether one of them is QoS ≥ 1).
    subscribers: Vec<(Arc<Subscriber>, u64, bool)>,
    /// A `$share/…` subscription matches: someone not metered wants it.
    unmetered: bool,
}

impl Conn<'_> {
    /// This connection's meter, for the broker → client direction.
    pub(crate) fn meter(&self) -> Arc<Subscriber> {
        self.me.clone()
    }

    /// Records a SUBSCRIBE forwarded to rumqttd (a filter subscribed again replaces its QoS).
    /// Returns whether this connection is metered.
    pub(crate) fn subscribed(&mut self, filters: &[String], qos: &[u8]) -> bool {
        if !self.flow.enabled {
            return false;
        }
        if !self.registered {
            self.registered = true;
            self.me
                .last_delivery_ms
                .store(self.flow.now_ms(), Ordering::Relaxed);
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
                let (filter, q) = match f.strip_prefix("$share/") {
                    Some(rest) => match rest.split_once('/') {
                        Some((_group, inner)) => (inner, SHARED),
                        None => continue,
                    },
                    None if f.starts_with('$') => continue,
                    None => (f.as_str(), *q),
                };
                mine.retain(|(g, gq)| g != filter || (*gq == SHARED) != (q == SHARED));
                if mine.len() < FILTERS_PER_SUBSCRIBER {
                    mine.push((filter.to_owned(), q));
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
                .retain(|(g, q)| {
                    let name = if *q == SHARED {
                        filters.iter().any(|f| {
                            f.strip_prefix("$share/")
                                .and_then(|r| r.split_once('/'))
                                .is_some_and(|(_, inner)| inner == g)
                        })
                    } else {
                        filters.contains(g)
                    };
                    !name
                });
            self.flow.changed();
        }
    }

    /// Decides what happens to a publish on `topic` and charges it, *before* it is forwarded
    /// (so a delivery can never be counted before its charge), to every matching subscriber,
    /// once per matching filter. A QoS 0 publish that only reaches subscribers more than half
    /// a log behind is dropped instead (and charged to nobody); a QoS ≥ 1 publish returns the
    /// QoS ≥ 1 subscribers past the high-water mark, for [`wait`](Self::wait).
    pub(crate) fn charge(&mut self, topic: &str, cost: u64, qos: u8) -> Charge {
        if !self.flow.enabled {
            return Charge::Forward(Vec::new());
        }
        let generation = self.flow.generation();
        if generation != self.generation || self.routes.len() >= ROUTE_CACHE {
            self.routes.clear();
            self.generation = generation;
        }
        if !self.routes.contains_key(topic) {
            let mut route = Route::default();
            for s in self.flow.table().values() {
                let filters = s.filters.lock().unwrap_or_else(PoisonError::into_inner);
                let (mut n, mut qos1) = (0, false);
                for (_, q) in filters.iter().filter(|(f, _)| matches(f, topic)) {
                    if *q == SHARED {
                        route.unmetered = true;
                    } else {
                        n += 1;
                        qos1 |= *q > 0;
                    }
                }
                if n > 0 {
                    route.subscribers.push((s.clone(), n, qos1));
                }
            }
            self.routes.insert(topic.to_owned(), route);
        }
        let Some(route) = self.routes.get(topic) else {
            return Charge::Forward(Vec::new());
        };
        let high = self.flow.high;
        if qos == 0
            && !route.unmetered
            && !route.subscribers.is_empty()
            && !topic.starts_with(NODE_TOPICS)
        {
            let now = self.flow.now_ms();
            let all_behind = route.subscribers.iter().all(|(s, _, _)| {
                if s.pending() <= high {
                    return false;
                }
                let idle = now.saturating_sub(s.last_delivery_ms.load(Ordering::Relaxed));
                if idle > IDLE_RESYNC_MS {
                    s.pending.store(0, Ordering::Release);
                    Metrics::inc(&self.flow.metrics.qos1_flow_resyncs);
                    return false;
                }
                true
            });
            if all_behind {
                Metrics::inc(&self.flow.metrics.qos0_dropped_early);
                return Charge::Drop;
            }
        }
        let mut behind = Vec::new();
        for (s, n, qos1) in &route.subscribers {
            let p = s.pending.fetch_add(cost * n, Ordering::AcqRel) + cost * n;
            if qos > 0 && *qos1 && p > high {
                behind.push(s.clone());
            }
        }
        Charge::Forward(behind)
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
            let gave_up =
                crate::wait::until(&s.drained, self.flow.max_wait, || s.pending() <= low).await;
            if gave_up {
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

    /// The QoS ≥ 1 subscribers a publish must wait for (panics on a drop).
    fn hold(c: &mut Conn<'_>, topic: &str, cost: u64, qos: u8) -> Vec<Arc<Subscriber>> {
        match c.charge(topic, cost, qos) {
            Charge::Forward(behind) => behind,
            Charge::Drop => panic!("dropped"),
        }
    }

    fn flow(max_wait: Duration) -> Flow {
        Flow::new(true, 1000, max_wait, Arc::default())
    }

    #[test]
    fn charges_matching_subscribers_once_per_filter_and_holds_only_for_qos1() {
        let flow = flow(MAX_WAIT);
        let (_a, a) = subscriber(&flow, &["t/+", "t/#"], 1);
        let (_b, b) = subscriber(&flow, &["u"], 1);
        let (_c, c) = subscriber(&flow, &["t/x"], 0);
        let mut p = flow.connection();
        assert!(hold(&mut p, "t/x", 100, 1).is_empty());
        assert_eq!(a.pending(), 200);
        assert_eq!(b.pending(), 0);
        assert_eq!(c.pending(), 100, "QoS 0 subscribers are metered too");
        // Past high water (500): the QoS 1 subscriber holds a QoS 1 publish, the QoS 0 one
        // never does, and a QoS 0 publish is never held.
        assert_eq!(hold(&mut p, "t/x", 200, 1).len(), 1);
        assert!(
            hold(&mut p, "t/x", 1, 0).is_empty(),
            "a is behind, c is not"
        );
        a.delivered(10_000, flow.low(), flow.now_ms());
        assert_eq!(a.pending(), 0, "never below zero");
    }

    #[test]
    fn qos0_is_dropped_only_when_every_subscriber_is_behind() {
        let flow = flow(MAX_WAIT);
        let (_a, a) = subscriber(&flow, &["t"], 0);
        let (mut b_conn, b) = subscriber(&flow, &["t"], 1);
        let mut p = flow.connection();
        hold(&mut p, "t", 600, 0);
        assert!(a.pending() > 500 && b.pending() > 500);
        assert!(matches!(p.charge("t", 10, 0), Charge::Drop));
        assert_eq!(a.pending(), 600, "a dropped message is charged to nobody");
        assert!(
            matches!(p.charge("t", 10, 1), Charge::Forward(_)),
            "QoS 1 is never dropped"
        );
        // One subscriber catching up is enough to forward.
        b.delivered(10_000, flow.low(), flow.now_ms());
        assert!(matches!(p.charge("t", 10, 0), Charge::Forward(_)));
        // A `$share` subscription is not metered: its interest alone prevents drops.
        b.delivered(10_000, flow.low(), flow.now_ms());
        hold(&mut p, "t", 600, 1);
        b_conn.subscribed(&["$share/g/t".into()], &[0]);
        assert!(matches!(p.charge("t", 10, 0), Charge::Forward(_)));
        assert_eq!(flow.metrics.qos0_dropped_early.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn node_topics_are_never_dropped() {
        let flow = flow(MAX_WAIT);
        let (_a, a) = subscriber(&flow, &["fedmesh/v1/#"], 0);
        let mut p = flow.connection();
        hold(&mut p, "fedmesh/v1/agent/x/result", 600, 0);
        assert!(a.pending() > 500);
        assert!(matches!(
            p.charge("fedmesh/v1/agent/x/result", 10, 0),
            Charge::Forward(_)
        ));
    }

    #[test]
    fn an_idle_subscriber_counted_as_behind_is_resynced() {
        let flow = flow(MAX_WAIT);
        let (_a, a) = subscriber(&flow, &["t"], 0);
        let mut p = flow.connection();
        hold(&mut p, "t", 600, 0);
        // Its last delivery is long past: the count drifted, reset it and forward.
        a.last_delivery_ms.store(0, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(IDLE_RESYNC_MS + 20));
        assert!(matches!(p.charge("t", 10, 0), Charge::Forward(_)));
        assert_eq!(a.pending(), 10);
        assert_eq!(flow.metrics.qos1_flow_resyncs.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn resubscribing_at_qos0_stops_holding_and_unsubscribing_stops_metering() {
        let flow = flow(MAX_WAIT);
        let (mut a, me) = subscriber(&flow, &["t"], 1);
        let mut p = flow.connection();
        assert_eq!(hold(&mut p, "t", 600, 1).len(), 1);
        a.subscribed(&["t".into()], &[0]);
        assert!(
            hold(&mut p, "t", 10, 1).is_empty(),
            "the route cache follows the change"
        );
        assert_eq!(me.pending(), 610);
        a.unsubscribed(&["t".into()]);
        hold(&mut p, "t", 10, 1);
        assert_eq!(me.pending(), 610);
    }

    #[test]
    fn disabled_flow_meters_nothing() {
        let flow = Flow::new(false, 1000, MAX_WAIT, Arc::default());
        let mut c = flow.connection();
        assert!(!c.subscribed(&["t".into()], &[1]));
        assert!(hold(&mut flow.connection(), "t", 10_000, 1).is_empty());
    }

    #[tokio::test]
    async fn wait_returns_when_the_subscriber_drains_or_times_out() {
        let flow = flow(Duration::from_millis(200));
        let (_a, a) = subscriber(&flow, &["t"], 1);
        let mut p = flow.connection();
        let behind = hold(&mut p, "t", 600, 1);
        assert_eq!(behind.len(), 1);
        let drain = {
            let a = a.clone();
            let low = flow.low();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                a.delivered(400, low, 0);
            }
        };
        tokio::join!(p.wait(behind), drain);
        assert_eq!(a.pending(), 200);
        assert_eq!(flow.metrics.qos1_flow_resyncs.load(Ordering::Relaxed), 0);
        // Nobody drains: the wait ends at max_wait and the count is reset.
        let behind = hold(&mut p, "t", 600, 1);
        p.wait(behind).await;
        assert_eq!(a.pending(), 0);
        assert_eq!(flow.metrics.qos1_flow_resyncs.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_leaving_subscriber_releases_its_publishers() {
        let flow = flow(Duration::from_secs(60));
        let (a_conn, _a) = subscriber(&flow, &["t"], 1);
        let mut p = flow.connection();
        let behind = hold(&mut p, "t", 600, 1);
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
