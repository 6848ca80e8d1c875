//! Direct delivery: the proxy writes a message straight into its subscribers' connections,
//! instead of the message travelling through rumqttd (proxy → rumqttd's connection task →
//! router thread → connection task → proxy, ≈ 5 threads). Two kinds of message go this way:
//!
//! * **The node's messages to a principal's own topics** ([`Direct::offer`]). The ACL makes
//!   this sound: only principal `P` may subscribe to `fedmesh/v1/{agent|client}/P/…` (any
//!   depth below `P`, see [`acl`]), so the subscribers are `P`'s connections.
//! * **Client → client messages** ([`Direct::relay`]) on any topic outside `fedmesh/` and the
//!   `$` topics. Every client connection runs through this proxy, and the node's in-process
//!   link subscribes only under `fedmesh/`, so the proxy sees every subscriber rumqttd has.
//!   A publisher connection caches the subscribers of its topics ([`Routes`]), looked up in
//!   an index of the subscriptions outside `fedmesh/` ([`Index`]); a change of any such
//!   subscription invalidates the index and every cache.
//!
//! In both cases the proxy sees every subscriber's SUBSCRIBEs, rumqttd's SUBACKs and the
//! UNSUBSCRIBEs, so it knows who rumqttd would deliver to, as long as nothing is kept for an
//! absent client. A message goes direct only when all of these hold, and through rumqttd
//! otherwise (counted in `direct_fallbacks` / `relay_fallbacks`):
//!
//! * it is not retained (rumqttd must store a retained message), and is QoS 0 or 1;
//! * no subscriber it matches asked for a persistent session, and no filter of a persistent
//!   session that left matches it (rumqttd keeps an absent persistent session's
//!   subscriptions and queues for it; the proxy cannot). For the node's messages the rule
//!   is per principal: once any connection of `P` asked for a persistent session, `P`'s
//!   topics always go through rumqttd;
//! * no matching subscription is shared (`$share/…`), carries a v5 Subscription Identifier,
//!   or is still awaiting rumqttd's SUBACK;
//! * every matching connection can take it now: room in its direct queue ([`QUEUE`]
//!   frames), for QoS 1 fewer than [`MAX_INFLIGHT`] unacknowledged direct messages, no v5
//!   Receive Maximum of its own and the frame within its v5 Maximum Packet Size;
//! * a client's message carries no v5 property but a topic alias (the proxy rebuilds the
//!   frame for each subscriber; properties would have to be relayed exactly as rumqttd
//!   does), fits the proxy's inspection window, and, at QoS 1, its publisher has no QoS ≥ 1
//!   PUBLISH at rumqttd still awaiting its PUBACK (MQTT orders a connection's PUBACKs like
//!   its PUBLISHes; the proxy acknowledges a direct one at once).
//!
//! It is all or nothing per message: part direct and part through rumqttd would deliver
//! twice. Each matching connection gets one copy at the lower of the message's QoS and the
//! highest granted QoS of its matching subscriptions (MQTT 3.1.1 §3.3.5). A message nobody
//! subscribes to is dropped (and a QoS 1 one acknowledged), as rumqttd would.
//!
//! **Order.** MQTT keeps one publisher's messages to a topic in order. When such a message
//! goes through rumqttd, every connection it may reach there is marked *behind* with the
//! message's [`Mark`] (a keyed hash of topic, payload length and payload prefix), and takes
//! no direct message until the proxy has seen rumqttd deliver it. rumqttd may drop a message
//! (a slow subscriber past its log, a subscription that was refused): a connection that is
//! behind, has no QoS 1 message of rumqttd's unacknowledged and got nothing from rumqttd
//! for [`BEHIND_RESYNC`] is taken to have caught up (counted in `direct_behind_resyncs`).
//! rumqttd also sends a new subscription the retained messages it matches, after the
//! SUBACK: the proxy tracks which topics have a retained message ([`Retained`]: retained
//! PUBLISHes it forwards, the node's, and retained Wills that may fire), and a granted
//! subscription leaves its connection behind until as many messages with the RETAIN flag
//! (rumqttd clears it on live deliveries) as match have come from rumqttd, or until the
//! resync; else a direct message could overtake an older retained value.
//!
//! **Lock order.** A delivery holds the state of every target connection at once (to check
//! them all, then commit): targets are always locked in ascending connection id.
//!
//! **Packet ids.** rumqttd 0.20 numbers the QoS 1 messages it sends a client `1..=100`
//! (`MAX_PKID` in its `router/iobufs.rs`), so direct QoS 1 messages use `101..=65535` and the
//! proxy keeps the client's PUBACKs for them from rumqttd, which never sent those ids. If
//! rumqttd ever sends an id in that range (another rumqttd version), the connection stops
//! taking direct messages and the event is logged and counted (`direct_pkid_conflicts`).
//!
//! **Keep Alive.** A client that only publishes direct messages, or only acknowledges them,
//! sends rumqttd nothing, and it need not send PINGREQ while it sends other packets; so when
//! the proxy keeps a packet from rumqttd and has not pinged rumqttd for half the Keep Alive,
//! it sends rumqttd a PINGREQ of its own and drops the PINGRESP.
//!
//! **Output commit.** A message the node publishes during a flush ([`crate::Held`]) is queued
//! for its connections at once (so that the capacity check and the packet id are settled)
//! and written when the node releases it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::mpsc::{self, OwnedPermit};
use tracing::warn;

use crate::acl;
use crate::codec::{self, Version};
use crate::flow;
use crate::gate::Held;
use crate::link::{Outbound, Qos};
use crate::metrics::Metrics;

/// Direct frames queued for one connection.
pub(crate) const QUEUE: usize = 256;
/// Unacknowledged direct QoS 1 messages per connection (as many as its queue holds: past
/// this, messages go through rumqttd, and the paths alternate, which costs throughput).
pub(crate) const MAX_INFLIGHT: usize = QUEUE;
/// Highest packet id rumqttd 0.20 gives a QoS 1 message it sends.
pub(crate) const RUMQTTD_MAX_PKID: u16 = 100;
/// SUBSCRIBEs of one connection awaiting rumqttd's SUBACK that are tracked; past this the
/// connection's subscriptions are no longer known and it stops taking direct messages.
const MAX_PENDING_SUBSCRIBES: usize = 64;
/// Filters tracked per connection (past this, as above).
const MAX_FILTERS: usize = 1024;
/// Messages to one connection that went through rumqttd and have not reached it yet (past
/// this, as above).
const MAX_BEHIND: usize = 1024;
/// Principals tracked. A principal with a persistent session stays tracked after it leaves
/// (rumqttd keeps its session, so its topics must keep going through rumqttd); past this many,
/// direct delivery of the node's messages turns off for the node's lifetime, counted in
/// `direct_fallbacks`.
pub(crate) const MAX_PRINCIPALS: usize = 65_536;
/// Filters of persistent sessions that left, kept so that what they match goes through
/// rumqttd; past this many, client → client direct delivery turns off for the node's
/// lifetime.
pub(crate) const MAX_GHOSTS: usize = 4096;
/// Payload bytes a [`Mark`] covers (with the topic and the payload's length).
pub(crate) const MARK_PREFIX: usize = 4096;
/// Topics with a retained message tracked; past this many, every new subscription waits
/// for rumqttd as if a retained message matched it.
pub(crate) const MAX_RETAINED_TOPICS: usize = 65_536;
/// Retained messages a new subscription waits for at most (the rest: [`BEHIND_RESYNC`]).
const MAX_RETAINED_WAIT: usize = 64;
/// A connection behind rumqttd that got nothing from it for this long, with none of
/// rumqttd's QoS 1 messages unacknowledged, is taken to have caught up.
pub(crate) const BEHIND_RESYNC: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A frame with its reserved slot in a connection's direct queue.
type Ready = (OwnedPermit<BytesMut>, BytesMut);

/// Recognises a message that went through rumqttd when rumqttd delivers it: a keyed hash
/// of its topic, its payload's length and the first [`MARK_PREFIX`] payload bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark(u64);

impl Mark {
    /// Stands for a retained message rumqttd sends after a SUBACK (recognised by its RETAIN
    /// flag: rumqttd clears it on live deliveries). Never the mark of a message.
    const RETAINED: Mark = Mark(0);
}

/// The topics that have a retained message at rumqttd, as far as the proxy has seen them
/// published (by clients, by the node, or as a Will that may fire).
#[derive(Debug, Default)]
pub(crate) struct Retained {
    topics: Mutex<HashSet<String>>,
    /// More than [`MAX_RETAINED_TOPICS`] were seen: any filter may match one.
    overflow: AtomicBool,
}

impl Retained {
    /// How many tracked retained messages `sub` matches (capped).
    fn matching(&self, sub: &Sub) -> usize {
        if self.overflow.load(Ordering::Acquire) {
            return 1;
        }
        lock(&self.topics)
            .iter()
            .filter(|t| sub.matches(t))
            .take(MAX_RETAINED_WAIT)
            .count()
    }
}

/// A message as direct delivery sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Message<'a> {
    pub(crate) topic: &'a str,
    pub(crate) payload: &'a [u8],
    /// 0 or 1.
    pub(crate) qos: u8,
    pub(crate) correlation: Option<&'a [u8]>,
}

/// What became of a client's message (see [`Direct::relay`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Relay {
    /// Written to every subscriber's direct queue.
    Delivered,
    /// Nobody subscribes: dropped, as rumqttd would.
    Nobody,
    /// It must go through rumqttd.
    Rumqttd,
}

/// The registry of connections, shared by the node's publishing side and every proxy
/// connection.
#[derive(Debug)]
pub(crate) struct Direct {
    /// The node's messages may go direct.
    enabled: bool,
    /// Client → client messages may go direct.
    relay: bool,
    next_conn: AtomicU64,
    principals: Mutex<HashMap<String, Principal>>,
    /// Every live connection, by id (ascending: the lock order).
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
    /// Bumped on every change of any connection's subscriptions, and when one leaves.
    generation: Arc<AtomicU64>,
    /// Filters of persistent sessions that left (see the module docs).
    ghosts: Mutex<Vec<Sub>>,
    /// More than [`MAX_GHOSTS`] ghost filters: no client message goes direct any more.
    ghosts_full: AtomicBool,
    /// Topics with a retained message (see [`Direct::retained`]).
    retained: Arc<Retained>,
    /// The relayable subscriptions, for the generation they were indexed at.
    index: Mutex<Option<(u64, Arc<Index>)>>,
    /// Frames of held messages, written when the node releases them.
    deferred: Mutex<HashMap<Held, Vec<Ready>>>,
    /// More than [`MAX_PRINCIPALS`] principals were seen: none of the node's messages goes
    /// direct any more.
    saturated: AtomicBool,
    marks: RandomState,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
struct Principal {
    conns: Vec<Arc<Conn>>,
    /// A connection of this principal asked for a persistent session.
    persistent: bool,
}

/// One subscription of a connection, as rumqttd granted it.
#[derive(Debug, Clone)]
struct Sub {
    filter: String,
    qos: u8,
    /// Shared, or with a Subscription Identifier: only rumqttd can deliver what it matches.
    plain: bool,
}

impl Sub {
    /// Matches every topic that is not a `$` topic.
    fn everything() -> Self {
        Self {
            filter: "#".into(),
            qos: 0,
            plain: false,
        }
    }

    /// Whether it may match a topic client → client delivery relays (outside `fedmesh/`):
    /// only those subscriptions concern the publishers' route caches.
    fn relayable(&self) -> bool {
        let f = match self.filter.strip_prefix("$share/") {
            Some(rest) => rest.split_once('/').map_or("", |(_, f)| f),
            None => &self.filter,
        };
        !f.starts_with("fedmesh/")
    }

    fn matches(&self, topic: &str) -> bool {
        let f = match self.filter.strip_prefix("$share/") {
            Some(rest) => rest.split_once('/').map_or("", |(_, f)| f),
            None => &self.filter,
        };
        flow::matches(f, topic)
    }
}

/// One connection's view for direct delivery.
#[derive(Debug)]
pub(crate) struct Conn {
    id: u64,
    version: Version,
    /// It asked for a session that outlives it: what it subscribes to goes through rumqttd.
    persistent: bool,
    /// Whether direct QoS 1 is allowed at all (no v5 Receive Maximum of the client's).
    qos1: bool,
    /// The client's v5 Maximum Packet Size, if it gave one.
    max_packet: Option<usize>,
    keep_alive: Duration,
    /// QoS ≥ 1 PUBLISHes of the client forwarded to rumqttd and not yet acknowledged by it.
    publishes_at_rumqttd: AtomicU32,
    /// QoS 1 PUBLISHes rumqttd sent the client that the client has not acknowledged.
    rumqttd_unacked: AtomicU32,
    tx: mpsc::Sender<BytesMut>,
    /// `!state.behind.is_empty()`, read without the lock for every relayed PUBLISH.
    behind: AtomicBool,
    /// The registry's subscription generation (bumped on every change here that may concern
    /// a relayed topic).
    generation: Arc<AtomicU64>,
    /// It subscribed (or asked to) to a filter that may match a relayed topic: only such
    /// connections are on routes.
    relayable: AtomicBool,
    /// The registry's retained topics (a new subscription waits for what matches).
    retained: Arc<Retained>,
    state: Mutex<ConnState>,
}

#[derive(Debug)]
struct ConnState {
    granted: Vec<Sub>,
    /// SUBSCRIBEs forwarded to rumqttd, by packet id, until their SUBACK.
    pending: Vec<(u16, Vec<Sub>)>,
    /// Packet ids of unacknowledged direct QoS 1 messages, oldest first (clients mostly
    /// acknowledge in order, so the search ends at the front).
    inflight: VecDeque<u16>,
    /// Marks of messages sent through rumqttd that this connection may get from rumqttd:
    /// until it has, direct messages would overtake them.
    behind: Vec<Mark>,
    next_pkid: u16,
    /// No longer takes direct messages (subscriptions unknown, too many, a packet id
    /// conflict, too far behind).
    off: bool,
    /// Its subscriptions are not all known (too many SUBSCRIBEs awaiting their SUBACK).
    unknown: bool,
    last_ping: Instant,
    synthetic_pings: u32,
}

impl ConnState {
    fn new() -> Self {
        Self {
            granted: Vec::new(),
            pending: Vec::new(),
            inflight: VecDeque::new(),
            behind: Vec::new(),
            next_pkid: RUMQTTD_MAX_PKID + 1,
            off: false,
            unknown: false,
            last_ping: Instant::now(),
            synthetic_pings: 0,
        }
    }

    /// Whether a granted or an asked-for subscription matches `topic`.
    fn may_match(&self, topic: &str) -> bool {
        self.granted.iter().any(|s| s.matches(topic))
            || self
                .pending
                .iter()
                .any(|(_, subs)| subs.iter().any(|s| s.matches(topic)))
    }
}

/// A connection's registration; deregisters on drop.
#[derive(Debug)]
pub(crate) struct Registration {
    direct: Arc<Direct>,
    principal: String,
    pub(crate) conn: Arc<Conn>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let d = &self.direct;
        {
            let mut map = lock(&d.principals);
            if let Some(p) = map.get_mut(&self.principal) {
                p.conns.retain(|c| c.id != self.conn.id);
                if p.conns.is_empty() && !p.persistent {
                    map.remove(&self.principal);
                }
            }
        }
        lock(&d.conns).remove(&self.conn.id);
        if self.conn.persistent {
            // rumqttd keeps the session's subscriptions: what they match stays its business.
            let subs: Vec<Sub> = {
                let st = lock(&self.conn.state);
                st.granted
                    .iter()
                    .chain(st.pending.iter().flat_map(|(_, s)| s))
                    .cloned()
                    .collect()
            };
            let mut ghosts = lock(&d.ghosts);
            for s in subs {
                if ghosts.iter().any(|g| g.filter == s.filter) {
                    continue;
                }
                if ghosts.len() >= MAX_GHOSTS {
                    if !d.ghosts_full.swap(true, Ordering::AcqRel) {
                        warn!(
                            max = MAX_GHOSTS,
                            "too many filters of absent persistent sessions; client messages go through rumqttd from now on"
                        );
                    }
                    break;
                }
                ghosts.push(s);
            }
        }
        if self.conn.relayable.load(Ordering::Acquire) {
            d.generation.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// What the proxy should do with a client's PUBACK.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ack {
    /// Not ours: forward it to rumqttd.
    Forward,
    /// Ours: drop it.
    Keep,
    /// Ours: drop it, and send rumqttd a PINGREQ (Keep Alive, see the module docs).
    KeepAndPing,
}

/// The connections a topic may reach, as one publisher connection last computed them.
#[derive(Debug, Default)]
pub(crate) struct Route {
    /// Connections with a granted or an asked-for subscription matching the topic, in
    /// ascending id.
    conns: Vec<Arc<Conn>>,
    /// A persistent session (present or absent) may want it: only rumqttd can deliver it.
    rumqttd_only: bool,
}

/// The subscriptions that may match relayed topics, by connection.
#[derive(Debug, Default)]
struct Index {
    /// Filters without wildcards (and not shared) → their connections.
    exact: HashMap<String, Vec<Arc<Conn>>>,
    /// The other subscriptions.
    other: Vec<(Sub, Arc<Conn>)>,
}

/// Topics a publisher connection caches routes for.
const ROUTE_CACHE: usize = 256;

/// One publisher connection's cache of routes, valid for one subscription generation.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    generation: u64,
    map: HashMap<String, Arc<Route>>,
}

impl Routes {
    /// The route of `topic`.
    pub(crate) fn get(&mut self, direct: &Direct, topic: &str) -> Arc<Route> {
        let generation = direct.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.map.clear();
            self.generation = generation;
        }
        if let Some(r) = self.map.get(topic) {
            return r.clone();
        }
        if self.map.len() >= ROUTE_CACHE {
            // Make room by dropping one (an arbitrary one: a publisher cycling through more
            // topics than the cache holds still hits on most of them).
            if let Some(k) = self.map.keys().next().cloned() {
                self.map.remove(&k);
            }
        }
        let r = Arc::new(direct.route(topic));
        self.map.insert(topic.to_owned(), r.clone());
        r
    }
}

impl Direct {
    /// `enabled`: the node's messages may go direct; `relay`: client → client messages may.
    pub(crate) fn new(enabled: bool, relay: bool, metrics: Arc<Metrics>) -> Self {
        Self {
            enabled,
            relay,
            next_conn: AtomicU64::new(1),
            principals: Mutex::default(),
            conns: Mutex::default(),
            generation: Arc::default(),
            ghosts: Mutex::default(),
            ghosts_full: AtomicBool::new(false),
            retained: Arc::default(),
            index: Mutex::default(),
            deferred: Mutex::default(),
            saturated: AtomicBool::new(false),
            marks: RandomState::new(),
            metrics,
        }
    }

    /// Whether client messages on `topic` are candidates for direct delivery: everything
    /// outside `fedmesh/` (the node's topics) and the `$` topics.
    pub(crate) fn relays(&self, topic: &str) -> bool {
        self.relay && !topic.starts_with("fedmesh/") && !topic.starts_with('$')
    }

    /// The [`Mark`] of a message with this topic, payload length and payload prefix (at
    /// least the first [`MARK_PREFIX`] bytes, or the whole payload if shorter).
    pub(crate) fn mark(&self, topic: &[u8], payload_len: usize, prefix: &[u8]) -> Mark {
        let mut h = self.marks.build_hasher();
        h.write_usize(topic.len());
        h.write(topic);
        h.write_usize(payload_len);
        h.write(&prefix[..prefix.len().min(MARK_PREFIX)]);
        Mark(h.finish().max(1))
    }

    /// A retained message on `topic` goes to rumqttd (`empty`: it deletes the retained
    /// message). rumqttd sends the retained messages a new subscription matches after its
    /// SUBACK: until they have arrived, direct messages would overtake them, so a granted
    /// subscription makes its connection wait for as many as match (see [`Conn::suback`]).
    pub(crate) fn retained(&self, topic: &str, empty: bool) {
        let mut topics = lock(&self.retained.topics);
        if empty {
            topics.remove(topic);
        } else if !topics.contains(topic) {
            if topics.len() >= MAX_RETAINED_TOPICS {
                self.retained.overflow.store(true, Ordering::Release);
            } else {
                topics.insert(topic.to_owned());
            }
        }
    }

    /// Registers a connection of `principal` that rumqttd accepted. A `persistent` one
    /// (a session that outlives it) keeps what it subscribes to rumqttd's, and its
    /// principal never takes the node's messages directly again.
    /// Returns the registration and the receiver of the connection's direct frames.
    pub(crate) fn register(
        self: &Arc<Self>,
        principal: &str,
        connect: &codec::Connect,
        keep_alive: u16,
    ) -> (Registration, mpsc::Receiver<BytesMut>) {
        let v5 = connect.version == Version::V5;
        let persistent = !connect.clean
            || (v5
                && connect
                    .properties
                    .get_u32(codec::prop::SESSION_EXPIRY)
                    .is_some_and(|s| s > 0));
        let (tx, rx) = mpsc::channel(QUEUE);
        let conn = Arc::new(Conn {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            version: connect.version,
            persistent,
            qos1: !(v5 && connect.properties.get(codec::prop::RECEIVE_MAX).is_some()),
            max_packet: if v5 {
                connect
                    .properties
                    .get_u32(codec::prop::MAX_PACKET_SIZE)
                    .map(|n| n as usize)
            } else {
                None
            },
            keep_alive: Duration::from_secs(u64::from(keep_alive)),
            publishes_at_rumqttd: AtomicU32::new(0),
            rumqttd_unacked: AtomicU32::new(0),
            tx,
            behind: AtomicBool::new(false),
            generation: self.generation.clone(),
            relayable: AtomicBool::new(false),
            retained: self.retained.clone(),
            state: Mutex::new(ConnState::new()),
        });
        {
            let mut map = lock(&self.principals);
            if map.len() >= MAX_PRINCIPALS && !map.contains_key(principal) {
                if !self.saturated.swap(true, Ordering::AcqRel) {
                    warn!(
                        max = MAX_PRINCIPALS,
                        "too many principals to track; the node's messages go through rumqttd from now on"
                    );
                }
            } else {
                let p = map.entry(principal.to_owned()).or_default();
                p.persistent |= persistent;
                p.conns.push(conn.clone());
                p.conns.sort_by_key(|c| c.id);
            }
        }
        lock(&self.conns).insert(conn.id, conn.clone());
        (
            Registration {
                direct: self.clone(),
                principal: principal.to_owned(),
                conn,
            },
            rx,
        )
    }

    /// Delivers the node's `msg` (whose gate key is `key`) to its subscribers directly if it
    /// can (see the module docs); `held`: the frames wait for [`Direct::release`] of `key`.
    /// Returns `false` when the message must go through rumqttd.
    pub(crate) fn offer(&self, msg: &Outbound, key: Held, held: bool) -> bool {
        if !self.enabled {
            return false;
        }
        let Some(principal) = acl::namespace_owner(&msg.topic) else {
            return false;
        };
        let m = Message {
            topic: &msg.topic,
            payload: &msg.payload,
            qos: match msg.qos {
                Qos::AtMostOnce => 0,
                Qos::AtLeastOnce => 1,
            },
            correlation: msg.correlation_data.as_deref(),
        };
        if self.saturated.load(Ordering::Acquire) {
            Metrics::inc(&self.metrics.direct_fallbacks);
            return false;
        }
        let conns = {
            let map = lock(&self.principals);
            match map.get(principal) {
                Some(p) if !p.persistent => p.conns.clone(),
                Some(_) => {
                    Metrics::inc(&self.metrics.direct_fallbacks);
                    return false;
                }
                None => return false,
            }
        };
        let plan = if msg.retain {
            // rumqttd must store it.
            None
        } else {
            self.plan(&conns, &m)
        };
        let Some(out) = plan else {
            Metrics::inc(&self.metrics.direct_fallbacks);
            self.behind(&conns, m.topic, m.payload.len(), m.payload);
            return false;
        };
        if out.is_empty() {
            // Nobody subscribed: rumqttd would deliver it to nobody either.
            Metrics::inc(&self.metrics.direct_unsubscribed);
            return true;
        }
        Metrics::add(&self.metrics.direct_delivered, out.len() as u64);
        if held {
            lock(&self.deferred).entry(key).or_default().extend(out);
        } else {
            for (permit, frame) in out {
                permit.send(frame);
            }
        }
        true
    }

    /// The connections `topic` may reach (see [`Routes`]).
    fn route(&self, topic: &str) -> Route {
        let mut route = Route {
            rumqttd_only: self.ghosts_full.load(Ordering::Acquire)
                || lock(&self.ghosts).iter().any(|g| g.matches(topic)),
            conns: Vec::new(),
        };
        if route.rumqttd_only {
            return route;
        }
        let index = self.index();
        let mut conns = index.exact.get(topic).cloned().unwrap_or_default();
        conns.extend(
            index
                .other
                .iter()
                .filter(|(s, _)| s.matches(topic))
                .map(|(_, c)| c.clone()),
        );
        conns.sort_by_key(|c| c.id);
        conns.dedup_by_key(|c| c.id);
        if conns.iter().any(|c| c.persistent) {
            route.rumqttd_only = true;
        } else {
            route.conns = conns;
        }
        route
    }

    /// The subscriptions that may match relayed topics, indexed for the current
    /// subscription generation (rebuilt once after every change, for every publisher).
    fn index(&self) -> Arc<Index> {
        let mut current = lock(&self.index);
        let generation = self.generation.load(Ordering::Acquire);
        if let Some((g, index)) = current.as_ref()
            && *g == generation
        {
            return index.clone();
        }
        let conns: Vec<Arc<Conn>> = lock(&self.conns)
            .values()
            .filter(|c| c.relayable.load(Ordering::Acquire))
            .cloned()
            .collect();
        let mut index = Index::default();
        for c in conns {
            let st = lock(&c.state);
            if st.unknown {
                // Its subscriptions are not all known: it is on every route (and takes
                // nothing directly, so every message goes through rumqttd).
                index.other.push((Sub::everything(), c.clone()));
                continue;
            }
            let subs = st
                .granted
                .iter()
                .chain(st.pending.iter().flat_map(|(_, s)| s));
            for s in subs.filter(|s| s.relayable()) {
                if s.filter.contains(['+', '#']) || s.filter.starts_with("$share/") {
                    index.other.push((s.clone(), c.clone()));
                } else {
                    index
                        .exact
                        .entry(s.filter.clone())
                        .or_default()
                        .push(c.clone());
                }
            }
        }
        let index = Arc::new(index);
        *current = Some((generation, index.clone()));
        index
    }

    /// Delivers a client's message on `route` (its topic passed [`Direct::relays`]; QoS ≤ 1,
    /// not retained) directly if it can: `m` is `None` when the proxy cannot rebuild it for
    /// each subscriber (v5 properties other than a topic alias, or larger than the proxy
    /// inspects), which only a route without subscribers can take. On [`Relay::Rumqttd`] the
    /// caller forwards it to rumqttd and, if it does, calls [`Direct::route_behind`] first.
    pub(crate) fn relay(&self, route: &Route, m: Option<&Message<'_>>) -> Relay {
        let out = if route.rumqttd_only {
            None
        } else if route.conns.is_empty() {
            Some(Vec::new())
        } else {
            m.and_then(|m| self.plan(&route.conns, m))
        };
        match out {
            None => {
                self.relay_fallback();
                Relay::Rumqttd
            }
            Some(out) if out.is_empty() => {
                Metrics::inc(&self.metrics.relay_unsubscribed);
                Relay::Nobody
            }
            Some(out) => {
                Metrics::add(&self.metrics.relay_delivered, out.len() as u64);
                for (permit, frame) in out {
                    permit.send(frame);
                }
                Relay::Delivered
            }
        }
    }

    /// A client's message on a relayed topic goes through rumqttd without an attempt (counted).
    pub(crate) fn relay_fallback(&self) {
        Metrics::inc(&self.metrics.relay_fallbacks);
    }

    /// The frames that deliver `m` to every connection of `conns` (ascending id) whose
    /// granted subscriptions match, each in a reserved queue slot; empty if none matches;
    /// `None` if it must go through rumqttd (see the module docs).
    fn plan(&self, conns: &[Arc<Conn>], m: &Message<'_>) -> Option<Vec<Ready>> {
        // Check every connection first, holding their states (ascending id); build each
        // frame with packet id 0 for now.
        let mut out = Vec::new();
        let mut states = Vec::new();
        for c in conns {
            let st = lock(&c.state);
            if st.unknown {
                // It may subscribe to anything: only rumqttd knows.
                return None;
            }
            let mut best: Option<u8> = None;
            let mut plain = true;
            for s in st.granted.iter().filter(|s| s.matches(m.topic)) {
                plain &= s.plain;
                best = best.max(Some(s.qos));
            }
            let pending_match = st
                .pending
                .iter()
                .any(|(_, subs)| subs.iter().any(|s| s.matches(m.topic)));
            let granted = match best {
                // rumqttd may have granted it already: only rumqttd knows.
                None if pending_match => return None,
                None => continue,
                // Order: rumqttd still has earlier messages for this client.
                Some(_) if !plain || pending_match || st.off || !st.behind.is_empty() => {
                    return None;
                }
                Some(g) => g,
            };
            let qos = m.qos.min(granted);
            if qos > 0 && (!c.qos1 || st.inflight.len() >= MAX_INFLIGHT) {
                return None;
            }
            let frame = codec::encode_publish(
                m.topic,
                (qos > 0).then_some(0),
                m.correlation,
                m.payload,
                c.version,
            );
            if c.max_packet.is_some_and(|max| frame.len() > max) {
                return None;
            }
            // Reserve a queue slot before anything is sent.
            let permit = c.tx.clone().try_reserve_owned().ok()?;
            out.push((permit, frame));
            states.push(st);
        }
        for ((_, frame), st) in out.iter_mut().zip(states.iter_mut()) {
            if frame[0] & 0x06 != 0 {
                set_pkid(frame, st.allocate());
            }
        }
        Some(out)
    }

    /// A message on `topic` (payload `payload_len` bytes, starting with `prefix`) goes
    /// through rumqttd: every connection of `conns` it may reach there waits for it before
    /// it takes direct messages again (MQTT keeps one publisher's messages to a topic in
    /// order).
    fn behind(&self, conns: &[Arc<Conn>], topic: &str, payload_len: usize, prefix: &[u8]) {
        let mut mark = None;
        for c in conns {
            let mut st = lock(&c.state);
            if st.may_match(topic) {
                let mark =
                    *mark.get_or_insert_with(|| self.mark(topic.as_bytes(), payload_len, prefix));
                if st.behind.len() >= MAX_BEHIND {
                    st.off = true;
                } else {
                    st.behind.push(mark);
                    c.behind.store(true, Ordering::Release);
                }
            }
        }
    }

    /// A client's message on `route` goes through rumqttd after all (see
    /// [`Direct::behind`]); `prefix`: at least the first [`MARK_PREFIX`] bytes of its
    /// payload, or all of it.
    pub(crate) fn route_behind(
        &self,
        route: &Route,
        topic: &str,
        payload_len: usize,
        prefix: &[u8],
    ) {
        self.behind(&route.conns, topic, payload_len, prefix);
    }

    /// Whether a PUBLISH of `principal` on `topic` (a node API topic, already handed to the
    /// node) can be answered by the proxy instead of going to rumqttd: no connection of the
    /// principal subscribes to it (granted or asked), no persistent session of it may, and
    /// `conn` has no QoS ≥ 1 PUBLISH at rumqttd awaiting its acknowledgement (MQTT orders
    /// a connection's PUBACKs like its PUBLISHes).
    pub(crate) fn keeps(&self, principal: &str, topic: &str, conn: &Conn) -> bool {
        if !self.enabled
            || self.saturated.load(Ordering::Acquire)
            || conn.has_publishes_at_rumqttd()
        {
            return false;
        }
        let conns = {
            let map = lock(&self.principals);
            match map.get(principal) {
                Some(p) if !p.persistent => p.conns.clone(),
                _ => return false,
            }
        };
        let subscribed = conns.iter().any(|c| {
            let st = lock(&c.state);
            st.off || st.may_match(topic)
        });
        if subscribed {
            return false;
        }
        Metrics::inc(&self.metrics.direct_kept);
        true
    }

    /// Writes the frames of held messages (see [`Direct::offer`]).
    pub(crate) fn release(&self, keys: &[Held]) {
        let mut ready = Vec::new();
        {
            let mut d = lock(&self.deferred);
            if d.is_empty() {
                return;
            }
            for k in keys {
                if let Some(v) = d.remove(k) {
                    ready.extend(v);
                }
            }
        }
        for (permit, frame) in ready {
            permit.send(frame);
        }
    }
}

impl ConnState {
    fn allocate(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = if id == u16::MAX {
                RUMQTTD_MAX_PKID + 1
            } else {
                id + 1
            };
            if !self.inflight.contains(&id) {
                self.inflight.push_back(id);
                return id;
            }
        }
    }
}

/// Where the packet id of a QoS 1 PUBLISH frame built by `encode_publish` starts.
fn pkid_at(frame: &[u8]) -> Option<usize> {
    if frame.first()? & 0x06 == 0 {
        return None;
    }
    let h = codec::parse_fixed_header(frame).ok()??;
    let at = h.header_len;
    let tl = usize::from(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]));
    let at = at + 2 + tl;
    frame.get(at + 1).map(|_| at)
}

fn set_pkid(frame: &mut BytesMut, id: u16) {
    if let Some(at) = pkid_at(frame) {
        frame[at..at + 2].copy_from_slice(&id.to_be_bytes());
    }
}

#[cfg(test)]
fn publish_pkid(frame: &[u8]) -> Option<u16> {
    let at = pkid_at(frame)?;
    Some(u16::from_be_bytes([frame[at], frame[at + 1]]))
}

impl Conn {
    /// Its subscriptions changed; `subs`: those concerned.
    fn changed<'a>(&self, mut subs: impl Iterator<Item = &'a Sub>) {
        if subs.any(Sub::relayable) {
            self.relayable.store(true, Ordering::Release);
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A SUBSCRIBE was forwarded to rumqttd.
    pub(crate) fn subscribing(&self, sub: &codec::Subscribe) {
        {
            let mut st = lock(&self.state);
            if st.pending.len() >= MAX_PENDING_SUBSCRIBES {
                // Its subscriptions are no longer known: on every route from now on.
                st.off = true;
                st.unknown = true;
                self.changed([Sub::everything()].iter());
                return;
            }
            let subs: Vec<Sub> = sub
                .filters
                .iter()
                .zip(&sub.qos)
                .map(|(f, q)| Sub {
                    filter: f.clone(),
                    qos: *q,
                    plain: !sub.sub_id && !f.starts_with("$share/"),
                })
                .collect();
            // Before rumqttd can have it (the caller forwards it next).
            self.changed(subs.iter());
            st.pending.push((sub.pkid, subs));
        }
    }

    /// rumqttd answered a SUBSCRIBE: record what it granted.
    pub(crate) fn suback(&self, pkid: u16, codes: &[u8]) {
        {
            let mut st = lock(&self.state);
            let Some(i) = st.pending.iter().position(|(p, _)| *p == pkid) else {
                return;
            };
            let (_, subs) = st.pending.remove(i);
            self.changed(subs.iter());
            for (mut s, code) in subs.into_iter().zip(codes) {
                if *code >= 0x80 {
                    continue;
                }
                s.qos = (*code).min(2);
                // rumqttd sends the retained messages it matches next (not for `$share/…`).
                let waits = if s.plain {
                    self.retained.matching(&s)
                } else {
                    0
                };
                for _ in 0..waits {
                    if st.behind.len() >= MAX_BEHIND {
                        st.off = true;
                        break;
                    }
                    st.behind.push(Mark::RETAINED);
                    self.behind.store(true, Ordering::Release);
                }
                st.granted.retain(|g| g.filter != s.filter);
                st.granted.push(s);
            }
            if st.granted.len() > MAX_FILTERS {
                st.off = true;
            }
        }
    }

    /// An UNSUBSCRIBE was forwarded to rumqttd.
    pub(crate) fn unsubscribed(&self, filters: &[String]) {
        let mut st = lock(&self.state);
        let (gone, kept) = std::mem::take(&mut st.granted)
            .into_iter()
            .partition::<Vec<Sub>, _>(|g| filters.contains(&g.filter));
        st.granted = kept;
        self.changed(gone.iter());
    }

    /// The client acknowledged packet id `pkid`.
    pub(crate) fn puback(&self, pkid: u16) -> Ack {
        let mut st = lock(&self.state);
        let Some(i) = st.inflight.iter().position(|p| *p == pkid) else {
            drop(st);
            let _ = self
                .rumqttd_unacked
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            return Ack::Forward;
        };
        st.inflight.remove(i);
        if self.ping_due_locked(&mut st) {
            return Ack::KeepAndPing;
        }
        Ack::Keep
    }

    /// The proxy kept a packet of the client's from rumqttd: whether to send rumqttd a
    /// PINGREQ now (at most every half Keep Alive; see the module docs).
    pub(crate) fn ping_due(&self) -> bool {
        self.ping_due_locked(&mut lock(&self.state))
    }

    fn ping_due_locked(&self, st: &mut ConnState) -> bool {
        if !self.keep_alive.is_zero() && st.last_ping.elapsed() >= self.keep_alive / 2 {
            st.last_ping = Instant::now();
            st.synthetic_pings += 1;
            return true;
        }
        false
    }

    /// A QoS ≥ 1 PUBLISH of the client's was forwarded to rumqttd.
    pub(crate) fn forwarded_publish(&self) {
        self.publishes_at_rumqttd.fetch_add(1, Ordering::AcqRel);
    }

    /// rumqttd acknowledged one (PUBACK or PUBREC to the client).
    pub(crate) fn publish_acked(&self) {
        let _ = self
            .publishes_at_rumqttd
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Whether a QoS ≥ 1 PUBLISH of the client's is at rumqttd awaiting its PUBACK.
    pub(crate) fn has_publishes_at_rumqttd(&self) -> bool {
        self.publishes_at_rumqttd.load(Ordering::Acquire) > 0
    }

    /// rumqttd answered a PINGREQ: returns whether the proxy sent it (drop the PINGRESP).
    pub(crate) fn pingresp(&self) -> bool {
        let mut st = lock(&self.state);
        if st.synthetic_pings > 0 {
            st.synthetic_pings -= 1;
            return true;
        }
        false
    }

    /// Whether rumqttd still has messages for this connection that direct ones must not
    /// overtake.
    pub(crate) fn is_behind(&self) -> bool {
        self.behind.load(Ordering::Acquire)
    }

    /// rumqttd delivered a PUBLISH with mark `mark` to this connection; `retained`: with
    /// the RETAIN flag (a retained message after a SUBACK).
    pub(crate) fn relayed(&self, mark: Mark, retained: bool) {
        let mark = if retained { Mark::RETAINED } else { mark };
        let mut st = lock(&self.state);
        if let Some(i) = st.behind.iter().position(|k| *k == mark) {
            st.behind.remove(i);
            if st.behind.is_empty() {
                self.behind.store(false, Ordering::Release);
            }
        }
    }

    /// rumqttd sent nothing for [`BEHIND_RESYNC`] while this connection was behind: unless
    /// one of rumqttd's QoS 1 messages is unacknowledged (rumqttd may be holding more behind
    /// it), what rumqttd still owed was dropped, and direct messages may flow again.
    /// Returns whether it resynced.
    pub(crate) fn resync(&self, metrics: &Metrics) -> bool {
        if self.rumqttd_unacked.load(Ordering::Acquire) > 0 {
            return false;
        }
        let mut st = lock(&self.state);
        if st.behind.is_empty() {
            return false;
        }
        st.behind.clear();
        self.behind.store(false, Ordering::Release);
        Metrics::inc(&metrics.direct_behind_resyncs);
        true
    }

    /// rumqttd sent a QoS `qos` ≥ 1 PUBLISH with `pkid`: a conflict if it is in the direct
    /// range.
    pub(crate) fn rumqttd_publish(&self, qos: u8, pkid: u16, metrics: &Metrics) {
        if qos == 1 {
            self.rumqttd_unacked.fetch_add(1, Ordering::AcqRel);
        }
        if pkid > RUMQTTD_MAX_PKID {
            let mut st = lock(&self.state);
            if !st.off {
                st.off = true;
                Metrics::inc(&metrics.direct_pkid_conflicts);
                warn!(
                    pkid,
                    "rumqttd used a packet id above {RUMQTTD_MAX_PKID}; no more direct delivery on this connection"
                );
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn connect(version: Version, clean: bool) -> codec::Connect {
        codec::Connect {
            version,
            clean,
            keep_alive: 60,
            properties: codec::Properties::default(),
            client_id: "c".into(),
            will: None,
            username: None,
            password: None,
        }
    }

    fn msg(topic: &str) -> Outbound {
        Outbound {
            topic: topic.into(),
            payload: Bytes::from_static(b"{}"),
            qos: Qos::AtLeastOnce,
            retain: false,
            correlation_data: None,
        }
    }

    fn subscribe(c: &Conn, pkid: u16, filter: &str, qos: u8, code: u8) {
        c.subscribing(&codec::Subscribe {
            pkid,
            filters: vec![filter.into()],
            qos: vec![qos],
            sub_id: false,
        });
        c.suback(pkid, &[code]);
    }

    /// The gate key of `msg(topic)`.
    fn k(topic: &str) -> Held {
        let m = msg(topic);
        GATE.with(|g| g.key(m.topic.as_bytes(), &m.payload))
    }

    /// The mark of `msg(topic)`.
    fn mk(d: &Direct, topic: &str) -> Mark {
        d.mark(topic.as_bytes(), 2, b"{}")
    }

    thread_local! {
        static GATE: crate::gate::Gate = crate::gate::Gate::default();
    }

    fn direct() -> Arc<Direct> {
        Arc::new(Direct::new(true, true, Arc::new(Metrics::default())))
    }

    #[test]
    fn delivers_to_a_granted_matching_subscription_only() {
        let d = direct();
        let (r, mut rx) = d.register("p", &connect(Version::V4, true), 60);
        let inbox = "fedmesh/v1/client/p/inbox";
        // Not subscribed: delivered to nobody, as rumqttd would.
        assert!(d.offer(&msg(inbox), k(inbox), false));
        assert_eq!(d.metrics.direct_unsubscribed.load(Ordering::Relaxed), 1);
        assert!(rx.try_recv().is_err());
        // Asked but not yet granted: rumqttd's business.
        r.conn.subscribing(&codec::Subscribe {
            pkid: 1,
            filters: vec!["fedmesh/v1/client/p/#".into()],
            qos: vec![1],
            sub_id: false,
        });
        assert!(!d.offer(&msg(inbox), k(inbox), false));
        r.conn.suback(1, &[1]);
        // rumqttd may deliver that one (the subscription was being made): direct messages
        // wait for it, or for a second of silence from rumqttd.
        assert!(r.conn.is_behind());
        assert!(!d.offer(&msg(inbox), k(inbox), false));
        r.conn.relayed(mk(&d, inbox), false);
        assert!(r.conn.resync(&d.metrics));
        assert!(!r.conn.is_behind());
        assert!(d.offer(&msg(inbox), k(inbox), false));
        let f = rx.try_recv().unwrap();
        assert_eq!(f[0], 0x32, "QoS 1 PUBLISH");
        let id = publish_pkid(&f).unwrap();
        assert!(id > RUMQTTD_MAX_PKID);
        // Its PUBACK stays here; any other goes on to rumqttd.
        assert_eq!(r.conn.puback(7), Ack::Forward);
        assert_ne!(r.conn.puback(id), Ack::Forward);
        assert_eq!(r.conn.puback(id), Ack::Forward);
        // A principal without connections, or a retained message: not direct.
        assert!(!d.offer(
            &msg("fedmesh/v1/client/q/inbox"),
            k("fedmesh/v1/client/q/inbox"),
            false
        ));
        let mut retained = msg(inbox);
        retained.retain = true;
        assert!(!d.offer(&retained, k(inbox), false));
        // The retained one went through rumqttd: rumqttd delivers it to this connection, and
        // until it has, the next message goes that way too (order).
        assert!(!d.offer(&msg(inbox), k(inbox), false));
        r.conn.relayed(mk(&d, inbox), false);
        assert!(r.conn.is_behind());
        r.conn.relayed(mk(&d, inbox), false);
        assert!(!r.conn.is_behind());
        assert!(d.offer(&msg(inbox), k(inbox), false));
        r.conn.unsubscribed(&["fedmesh/v1/client/p/#".into()]);
        assert!(d.offer(&msg(inbox), k(inbox), false));
        assert_eq!(rx.len(), 1);
    }

    #[test]
    fn qos_is_the_lower_of_message_and_subscription() {
        let d = direct();
        let (r, mut rx) = d.register("p", &connect(Version::V4, true), 60);
        subscribe(&r.conn, 1, "fedmesh/v1/agent/p/inbox", 0, 0);
        assert!(d.offer(
            &msg("fedmesh/v1/agent/p/inbox"),
            k("fedmesh/v1/agent/p/inbox"),
            false
        ));
        let f = rx.try_recv().unwrap();
        assert_eq!(f[0], 0x30, "QoS 0 PUBLISH");
        assert_eq!(publish_pkid(&f), None);
        // A refused filter is not a subscription.
        subscribe(&r.conn, 2, "fedmesh/v1/agent/p/other", 1, 0x80);
        assert!(d.offer(
            &msg("fedmesh/v1/agent/p/other"),
            k("fedmesh/v1/agent/p/other"),
            false
        ));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_persistent_session_shared_or_identified_subscription_goes_through_rumqttd() {
        let d = direct();
        let (r, _rx) = d.register("p", &connect(Version::V4, true), 60);
        subscribe(&r.conn, 1, "fedmesh/v1/client/p/inbox", 1, 1);
        assert!(d.offer(
            &msg("fedmesh/v1/client/p/inbox"),
            k("fedmesh/v1/client/p/inbox"),
            false
        ));
        // Another connection of p asks for a persistent session: rumqttd may hold messages
        // for it after it leaves, so p never takes direct messages again.
        let (r2, _rx2) = d.register("p", &connect(Version::V4, false), 60);
        drop(r2);
        assert!(!d.offer(
            &msg("fedmesh/v1/client/p/inbox"),
            k("fedmesh/v1/client/p/inbox"),
            false
        ));

        let (s, _srx) = d.register("s", &connect(Version::V4, true), 60);
        subscribe(&s.conn, 1, "$share/g/fedmesh/v1/client/s/inbox", 1, 1);
        assert!(!d.offer(
            &msg("fedmesh/v1/client/s/inbox"),
            k("fedmesh/v1/client/s/inbox"),
            false
        ));

        let (i, _irx) = d.register("i", &connect(Version::V5, true), 60);
        i.conn.subscribing(&codec::Subscribe {
            pkid: 1,
            filters: vec!["fedmesh/v1/client/i/inbox".into()],
            qos: vec![1],
            sub_id: true,
        });
        i.conn.suback(1, &[1]);
        assert!(!d.offer(
            &msg("fedmesh/v1/client/i/inbox"),
            k("fedmesh/v1/client/i/inbox"),
            false
        ));
    }

    #[test]
    fn all_or_nothing_when_one_connection_is_full() {
        let d = direct();
        let (a, mut arx) = d.register("p", &connect(Version::V4, true), 60);
        let (b, _brx) = d.register("p", &connect(Version::V4, true), 60);
        subscribe(&a.conn, 1, "fedmesh/v1/client/p/inbox", 0, 0);
        subscribe(&b.conn, 1, "fedmesh/v1/client/p/inbox", 0, 0);
        for _ in 0..QUEUE {
            assert!(d.offer(
                &msg("fedmesh/v1/client/p/inbox"),
                k("fedmesh/v1/client/p/inbox"),
                false
            ));
        }
        // b's queue is full (nobody reads it): the next goes through rumqttd, to both.
        let t = "fedmesh/v1/client/p/inbox";
        assert!(!d.offer(&msg(t), k(t), false));
        assert_eq!(arx.len(), QUEUE);
        while arx.try_recv().is_ok() {}
        // a must first get that one from rumqttd.
        drop(b);
        assert!(!d.offer(&msg(t), k(t), false));
        a.conn.relayed(mk(&d, t), false);
        a.conn.relayed(mk(&d, t), false);
        assert!(d.offer(&msg(t), k(t), false));
        assert_eq!(arx.len(), 1);
    }

    #[test]
    fn qos1_in_flight_is_bounded_and_ids_skip_rumqttds_range() {
        let d = direct();
        let (r, mut rx) = d.register("p", &connect(Version::V4, true), 60);
        subscribe(&r.conn, 1, "fedmesh/v1/client/p/inbox", 1, 1);
        let t = "fedmesh/v1/client/p/inbox";
        for _ in 0..MAX_INFLIGHT {
            assert!(d.offer(&msg(t), k(t), false));
        }
        assert!(!d.offer(&msg(t), k(t), false));
        let id = publish_pkid(&rx.try_recv().unwrap()).unwrap();
        assert_ne!(r.conn.puback(id), Ack::Forward);
        r.conn.relayed(mk(&d, t), false);
        assert!(d.offer(&msg(t), k(t), false));
        // Wrap-around skips 1..=100.
        let mut st = ConnState::new();
        st.next_pkid = u16::MAX;
        assert_eq!(st.allocate(), u16::MAX);
        assert_eq!(st.allocate(), RUMQTTD_MAX_PKID + 1);
        // A conflict with rumqttd turns direct delivery off for the connection.
        r.conn.rumqttd_publish(1, RUMQTTD_MAX_PKID + 5, &d.metrics);
        assert!(!d.offer(
            &msg("fedmesh/v1/client/p/inbox"),
            k("fedmesh/v1/client/p/inbox"),
            false
        ));
    }

    #[test]
    fn held_frames_wait_for_release() {
        let d = direct();
        let (r, mut rx) = d.register("p", &connect(Version::V5, true), 60);
        subscribe(&r.conn, 1, "fedmesh/v1/client/p/inbox", 1, 1);
        let mut m = msg("fedmesh/v1/client/p/inbox");
        m.correlation_data = Some(Bytes::from_static(b"corr"));
        let key = GATE.with(|g| g.key(m.topic.as_bytes(), &m.payload));
        assert!(d.offer(&m, key, true));
        assert!(rx.try_recv().is_err());
        d.release(&[key]);
        let f = rx.try_recv().unwrap();
        let h = codec::parse_fixed_header(&f).unwrap().unwrap();
        let (topic, props) = codec::publish_properties(h.flags(), &f[h.header_len..]).unwrap();
        assert_eq!(topic, "fedmesh/v1/client/p/inbox");
        assert_eq!(
            props.get_binary(codec::prop::CORRELATION_DATA),
            Some(&b"corr"[..])
        );
    }

    #[test]
    fn api_publishes_are_kept_from_rumqttd_only_when_nobody_else_can_get_them() {
        let d = direct();
        let (r, _rx) = d.register("p", &connect(Version::V4, true), 60);
        let submit = "fedmesh/v1/client/p/submit";
        assert!(d.keeps("p", submit, &r.conn));
        // A QoS 1 PUBLISH of this connection is at rumqttd: its PUBACK must come first.
        r.conn.forwarded_publish();
        assert!(!d.keeps("p", submit, &r.conn));
        r.conn.publish_acked();
        assert!(d.keeps("p", submit, &r.conn));
        // The principal subscribes to its own submit topic (asked, then granted).
        r.conn.subscribing(&codec::Subscribe {
            pkid: 1,
            filters: vec!["fedmesh/v1/client/p/+".into()],
            qos: vec![0],
            sub_id: false,
        });
        assert!(!d.keeps("p", submit, &r.conn));
        r.conn.suback(1, &[0]);
        assert!(!d.keeps("p", submit, &r.conn));
        r.conn.unsubscribed(&["fedmesh/v1/client/p/+".into()]);
        assert!(d.keeps("p", submit, &r.conn));
        // A persistent session of the principal may subscribe while absent.
        drop(d.register("p", &connect(Version::V4, false), 60));
        assert!(!d.keeps("p", submit, &r.conn));
    }

    #[test]
    fn too_many_principals_turn_direct_delivery_off() {
        let d = direct();
        let (r, _rx) = d.register("p", &connect(Version::V4, true), 60);
        subscribe(&r.conn, 1, "fedmesh/v1/client/p/inbox", 0, 0);
        let t = "fedmesh/v1/client/p/inbox";
        assert!(d.offer(&msg(t), k(t), false));
        // Persistent principals stay tracked after they leave.
        for i in 1..MAX_PRINCIPALS {
            drop(d.register(&format!("q{i}"), &connect(Version::V4, false), 60));
        }
        assert_eq!(lock(&d.principals).len(), MAX_PRINCIPALS);
        assert!(d.offer(&msg(t), k(t), false));
        drop(d.register("one-too-many", &connect(Version::V4, true), 60));
        assert_eq!(lock(&d.principals).len(), MAX_PRINCIPALS);
        assert!(!d.offer(&msg(t), k(t), false));
        assert!(!d.keeps("p", "fedmesh/v1/client/p/submit", &r.conn));
    }

    #[test]
    fn a_new_subscription_waits_for_the_retained_messages_it_matches() {
        let d = direct();
        let m = |t| Message {
            topic: t,
            payload: b"{}",
            qos: 0,
            correlation: None,
        };
        d.retained("r/a", false);
        d.retained("r/b", false);
        d.retained("r/b", true); // deleted
        let (r, rx) = d.register("p", &connect(Version::V4, true), 60);
        subscribe(&r.conn, 1, "r/#", 0, 0);
        // rumqttd sends r/a's retained message next: nothing direct until it has.
        let mut routes = Routes::default();
        assert_eq!(
            d.relay(&routes.get(&d, "r/x"), Some(&m("r/x"))),
            Relay::Rumqttd
        );
        r.conn.relayed(mk(&d, "r/a"), true);
        assert!(!r.conn.is_behind());
        assert_eq!(
            d.relay(&routes.get(&d, "r/x"), Some(&m("r/x"))),
            Relay::Delivered
        );
        assert_eq!(rx.len(), 1);
        // A filter no retained topic matches waits for nothing.
        subscribe(&r.conn, 2, "s/#", 0, 0);
        assert!(!r.conn.is_behind());
        // Past the bound, every subscription waits (for one).
        for i in 0..MAX_RETAINED_TOPICS {
            d.retained(&format!("t/{i}"), false);
        }
        subscribe(&r.conn, 3, "u/#", 0, 0);
        assert!(r.conn.is_behind());
        assert!(r.conn.resync(&d.metrics));
    }

    #[test]
    fn only_subscriptions_outside_fedmesh_concern_the_route_caches() {
        let d = direct();
        let generation = || d.generation.load(Ordering::Acquire);
        let (agent, _arx) = d.register("a", &connect(Version::V4, true), 60);
        let g0 = generation();
        subscribe(&agent.conn, 1, "fedmesh/v1/agent/a/inbox", 1, 1);
        subscribe(&agent.conn, 2, "$share/g/fedmesh/v1/public/x", 1, 1);
        drop(agent);
        assert_eq!(generation(), g0, "the node's topics are never relayed");
        let (s, _srx) = d.register("s", &connect(Version::V4, true), 60);
        subscribe(&s.conn, 1, "#", 0, 0);
        let g1 = generation();
        assert!(g1 > g0);
        assert_eq!(d.route("x/y").conns.len(), 1);
        s.conn.unsubscribed(&["#".into()]);
        assert!(generation() > g1);
        assert!(d.route("x/y").conns.is_empty());
    }

    #[test]
    fn the_route_cache_is_bounded_and_keeps_most_of_its_topics() {
        let d = direct();
        let mut routes = Routes::default();
        let first = routes.get(&d, "t/0");
        assert!(Arc::ptr_eq(&first, &routes.get(&d, "t/0")), "a hit");
        for i in 0..2 * ROUTE_CACHE {
            routes.get(&d, &format!("t/{i}"));
        }
        assert_eq!(routes.map.len(), ROUTE_CACHE);
        let (s, _rx) = d.register("s", &connect(Version::V4, true), 60);
        subscribe(&s.conn, 1, "t/+", 0, 0);
        // A subscription change empties it.
        assert_eq!(routes.get(&d, "t/1").conns.len(), 1);
        assert_eq!(routes.map.len(), 1);
    }

    #[test]
    fn routes_find_exact_wildcard_and_unknown_subscribers() {
        let d = direct();
        let (a, _arx) = d.register("a", &connect(Version::V4, true), 60);
        let (b, _brx) = d.register("b", &connect(Version::V4, true), 60);
        subscribe(&b.conn, 1, "dev/7/cmd", 1, 1);
        subscribe(&a.conn, 1, "dev/+/cmd", 0, 0);
        subscribe(&a.conn, 2, "dev/7/cmd", 0, 0);
        let ids = |t: &str| d.route(t).conns.iter().map(|c| c.id).collect::<Vec<_>>();
        assert_eq!(
            ids("dev/7/cmd"),
            [a.conn.id, b.conn.id],
            "ascending, once each"
        );
        assert_eq!(ids("dev/8/cmd"), [a.conn.id]);
        assert!(ids("other").is_empty());
        // Too many SUBSCRIBEs awaiting their SUBACK: its filters are unknown, so it is on
        // every route, and nothing goes direct while it is.
        let (c, _crx) = d.register("c", &connect(Version::V4, true), 60);
        for pkid in 1..=u16::try_from(MAX_PENDING_SUBSCRIBES).unwrap() + 1 {
            c.conn.subscribing(&codec::Subscribe {
                pkid,
                filters: vec![format!("x/{pkid}")],
                qos: vec![0],
                sub_id: false,
            });
        }
        assert_eq!(ids("other"), [c.conn.id]);
        let m = Message {
            topic: "other",
            payload: b"{}",
            qos: 0,
            correlation: None,
        };
        assert_eq!(d.relay(&d.route("other"), Some(&m)), Relay::Rumqttd);
        drop(c);
        assert!(ids("other").is_empty());
    }

    #[test]
    fn keep_alive_pings_rumqttd_for_kept_acks() {
        let d = direct();
        let (r, mut rx) = d.register("p", &connect(Version::V4, true), 2);
        subscribe(&r.conn, 1, "fedmesh/v1/client/p/inbox", 1, 1);
        assert!(d.offer(
            &msg("fedmesh/v1/client/p/inbox"),
            k("fedmesh/v1/client/p/inbox"),
            false
        ));
        let id = publish_pkid(&rx.try_recv().unwrap()).unwrap();
        lock(&r.conn.state).last_ping = Instant::now() - Duration::from_secs(2);
        assert_eq!(r.conn.puback(id), Ack::KeepAndPing);
        assert!(r.conn.pingresp());
        assert!(!r.conn.pingresp());
    }
}
