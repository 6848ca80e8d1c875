//! Direct delivery: the node's messages to a principal's own topics are written to that
//! principal's live connections by the proxy, instead of travelling node link → rumqttd's
//! router → rumqttd's connection task → proxy.
//!
//! The ACL makes this sound: only principal `P` may subscribe to
//! `fedmesh/v1/{agent|client}/P/…` (any depth below `P`, see [`acl`]), and every connection of `P` runs through
//! this proxy, which sees its SUBSCRIBEs, rumqttd's SUBACKs and its UNSUBSCRIBEs. So for a
//! message on such a topic the proxy knows every subscriber rumqttd would deliver to, as long
//! as nothing is kept for an absent client. A message goes direct only when all of these
//! hold, and through rumqttd otherwise (counted in `direct_fallbacks`):
//!
//! * it is not retained (rumqttd must store a retained message);
//! * no connection of `P` since the node started asked for a persistent session (rumqttd
//!   keeps an absent persistent session's subscriptions and queues for it; the proxy cannot);
//! * at least one live connection of `P` has a granted subscription that matches, and none of
//!   the matching subscriptions is shared (`$share/…`) or carries a v5 Subscription
//!   Identifier;
//! * every matching connection can take it now: room in its direct queue
//!   ([`QUEUE`] frames), for QoS 1 fewer than [`MAX_INFLIGHT`] unacknowledged direct
//!   messages, no v5 Receive Maximum of its own and the frame within its v5 Maximum Packet
//!   Size.
//!
//! It is all or nothing per message: part direct and part through rumqttd would deliver
//! twice. Each matching connection gets one copy at the lower of the message's QoS and the
//! highest granted QoS of its matching subscriptions (MQTT 3.1.1 §3.3.5).
//!
//! **Packet ids.** rumqttd 0.20 numbers the QoS 1 messages it sends a client `1..=100`
//! (`MAX_PKID` in its `router/iobufs.rs`), so direct QoS 1 messages use `101..=65535` and the
//! proxy keeps the client's PUBACKs for them from rumqttd, which never sent those ids. If
//! rumqttd ever sends an id in that range (another rumqttd version), the connection stops
//! taking direct messages and the event is logged and counted (`direct_pkid_conflicts`).
//!
//! **Keep Alive.** A client that only acknowledges direct messages sends rumqttd nothing, and
//! it need not send PINGREQ while it sends PUBACKs; so when the proxy keeps a PUBACK from
//! rumqttd and has not pinged rumqttd for half the Keep Alive, it sends rumqttd a PINGREQ of
//! its own and drops the PINGRESP.
//!
//! **Output commit.** A message the node publishes during a flush ([`crate::Held`]) is queued
//! for its connections at once (so that the capacity check and the packet id are settled)
//! and written when the node releases it.

use std::collections::HashMap;
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
/// Unacknowledged direct QoS 1 messages per connection.
pub(crate) const MAX_INFLIGHT: usize = 64;
/// Highest packet id rumqttd 0.20 gives a QoS 1 message it sends.
pub(crate) const RUMQTTD_MAX_PKID: u16 = 100;
/// SUBSCRIBEs of one connection awaiting rumqttd's SUBACK that are tracked; past this the
/// connection's subscriptions are no longer known and it stops taking direct messages.
const MAX_PENDING_SUBSCRIBES: usize = 64;
/// Filters tracked per connection (past this, as above).
const MAX_FILTERS: usize = 1024;
/// The node's messages to one connection that went through rumqttd and have not reached it
/// yet (past this, as above).
const MAX_BEHIND: usize = 1024;
/// Principals tracked. A principal with a persistent session stays tracked after it leaves
/// (rumqttd keeps its session, so its topics must keep going through rumqttd); past this many,
/// direct delivery turns off for the node's lifetime, counted in `direct_fallbacks`.
pub(crate) const MAX_PRINCIPALS: usize = 65_536;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A frame with its reserved slot in a connection's direct queue.
type Ready = (OwnedPermit<BytesMut>, BytesMut);

/// The registry of connections by principal, shared by the node's publishing side and
/// every proxy connection.
#[derive(Debug)]
pub(crate) struct Direct {
    enabled: bool,
    next_conn: AtomicU64,
    principals: Mutex<HashMap<String, Principal>>,
    /// Frames of held messages, written when the node releases them.
    deferred: Mutex<HashMap<Held, Vec<Ready>>>,
    /// More than [`MAX_PRINCIPALS`] principals were seen: nothing goes direct any more.
    saturated: AtomicBool,
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
    /// Whether direct QoS 1 is allowed at all (no v5 Receive Maximum of the client's).
    qos1: bool,
    /// The client's v5 Maximum Packet Size, if it gave one.
    max_packet: Option<usize>,
    keep_alive: Duration,
    /// QoS ≥ 1 PUBLISHes of the client forwarded to rumqttd and not yet acknowledged by it.
    publishes_at_rumqttd: AtomicU32,
    tx: mpsc::Sender<BytesMut>,
    /// `!state.behind.is_empty()`, read without the lock for every relayed PUBLISH.
    behind: AtomicBool,
    state: Mutex<ConnState>,
}

#[derive(Debug)]
struct ConnState {
    granted: Vec<Sub>,
    /// SUBSCRIBEs forwarded to rumqttd, by packet id, until their SUBACK.
    pending: Vec<(u16, Vec<Sub>)>,
    inflight: Vec<u16>,
    /// Gate keys of the node's messages sent through rumqttd that this connection will get
    /// from rumqttd: until they have, direct messages would overtake them.
    behind: Vec<Held>,
    next_pkid: u16,
    /// No longer takes direct messages (subscriptions unknown, or a packet id conflict).
    off: bool,
    last_ping: Instant,
    synthetic_pings: u32,
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
        let mut map = lock(&self.direct.principals);
        if let Some(p) = map.get_mut(&self.principal) {
            p.conns.retain(|c| c.id != self.conn.id);
            if p.conns.is_empty() && !p.persistent {
                map.remove(&self.principal);
            }
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

impl Direct {
    pub(crate) fn new(enabled: bool, metrics: Arc<Metrics>) -> Self {
        Self {
            enabled,
            next_conn: AtomicU64::new(1),
            principals: Mutex::default(),
            deferred: Mutex::default(),
            saturated: AtomicBool::new(false),
            metrics,
        }
    }

    /// Registers a connection of `principal` that rumqttd accepted. `persistent`: it asked
    /// for a session that outlives it (the principal then never takes direct messages again).
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
            tx,
            behind: AtomicBool::new(false),
            state: Mutex::new(ConnState {
                granted: Vec::new(),
                pending: Vec::new(),
                inflight: Vec::new(),
                behind: Vec::new(),
                next_pkid: RUMQTTD_MAX_PKID + 1,
                off: false,
                last_ping: Instant::now(),
                synthetic_pings: 0,
            }),
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
            }
        }
        (
            Registration {
                direct: self.clone(),
                principal: principal.to_owned(),
                conn,
            },
            rx,
        )
    }

    /// Delivers `msg` (whose gate key is `key`) to its subscribers directly if it can (see
    /// the module docs); `held`: the frames wait for [`Direct::release`] of `key`. Returns
    /// `false` when the message must go through rumqttd.
    pub(crate) fn offer(&self, msg: &Outbound, key: Held, held: bool) -> bool {
        if !self.enabled {
            return false;
        }
        let Some(principal) = acl::namespace_owner(&msg.topic) else {
            return false;
        };
        if self.saturated.load(Ordering::Acquire) {
            return self.fallback(&[], msg, key);
        }
        let conns = {
            let map = lock(&self.principals);
            match map.get(principal) {
                Some(p) if !p.persistent => p.conns.clone(),
                Some(_) => return self.fallback(&[], msg, key),
                None => return false,
            }
        };
        if msg.retain {
            // rumqttd must store it.
            return self.fallback(&conns, msg, key);
        }
        let want = match msg.qos {
            Qos::AtMostOnce => 0,
            Qos::AtLeastOnce => 1,
        };
        // Check every connection first; build each frame with packet id 0 for now.
        let mut out = Vec::new();
        let mut states = Vec::new();
        for c in &conns {
            let st = lock(&c.state);
            let mut best: Option<u8> = None;
            let mut plain = true;
            for s in st.granted.iter().filter(|s| s.matches(&msg.topic)) {
                plain &= s.plain;
                best = best.max(Some(s.qos));
            }
            let pending_match = st
                .pending
                .iter()
                .any(|(_, subs)| subs.iter().any(|s| s.matches(&msg.topic)));
            let direct = match best {
                // rumqttd may have granted it already: only rumqttd knows.
                None if pending_match => false,
                None => continue,
                // Order: rumqttd still has earlier messages of the node's for this client.
                Some(_) if !plain || pending_match || st.off || !st.behind.is_empty() => false,
                Some(granted) => {
                    let qos = want.min(granted);
                    !(qos > 0 && (!c.qos1 || st.inflight.len() >= MAX_INFLIGHT))
                }
            };
            if !direct {
                drop(st);
                drop(states);
                return self.fallback(&conns, msg, key);
            }
            let qos = want.min(best.unwrap_or(0));
            let frame = codec::encode_publish(
                &msg.topic,
                (qos > 0).then_some(0),
                msg.correlation_data.as_deref(),
                &msg.payload,
                c.version,
            );
            // Reserve a queue slot before anything is sent.
            let permit = match c.tx.clone().try_reserve_owned() {
                Ok(p) if c.max_packet.is_none_or(|max| frame.len() <= max) => p,
                _ => {
                    drop(st);
                    drop(states);
                    return self.fallback(&conns, msg, key);
                }
            };
            out.push((permit, frame));
            states.push(st);
        }
        if out.is_empty() {
            // Nobody subscribed: rumqttd would deliver it to nobody either.
            Metrics::inc(&self.metrics.direct_unsubscribed);
            return true;
        }
        for ((_, frame), st) in out.iter_mut().zip(states.iter_mut()) {
            if frame[0] & 0x06 != 0 {
                set_pkid(frame, st.allocate());
            }
        }
        drop(states);
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

    /// The message goes through rumqttd: every connection it reaches there waits for it
    /// before it takes direct messages again (MQTT keeps one publisher's messages to a
    /// topic in order).
    fn fallback(&self, conns: &[Arc<Conn>], msg: &Outbound, key: Held) -> bool {
        Metrics::inc(&self.metrics.direct_fallbacks);
        for c in conns {
            let mut st = lock(&c.state);
            if st.granted.iter().any(|s| s.matches(&msg.topic)) {
                if st.behind.len() >= MAX_BEHIND {
                    st.off = true;
                } else {
                    st.behind.push(key);
                    c.behind.store(true, Ordering::Release);
                }
            }
        }
        false
    }

    /// Whether a PUBLISH of `principal` on `topic` (a node API topic, already handed to the
    /// node) can be answered by the proxy instead of going to rumqttd: no connection of the
    /// principal subscribes to it (granted or asked), no persistent session of it may, and
    /// `conn` has no QoS ≥ 1 PUBLISH at rumqttd awaiting its acknowledgement (MQTT orders
    /// a connection's PUBACKs like its PUBLISHes).
    pub(crate) fn keeps(&self, principal: &str, topic: &str, conn: &Conn) -> bool {
        if !self.enabled
            || self.saturated.load(Ordering::Acquire)
            || conn.publishes_at_rumqttd.load(Ordering::Acquire) > 0
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
            st.off
                || st.granted.iter().any(|s| s.matches(topic))
                || st
                    .pending
                    .iter()
                    .any(|(_, subs)| subs.iter().any(|s| s.matches(topic)))
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
                self.inflight.push(id);
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
    /// A SUBSCRIBE was forwarded to rumqttd.
    pub(crate) fn subscribing(&self, sub: &codec::Subscribe) {
        let mut st = lock(&self.state);
        if st.pending.len() >= MAX_PENDING_SUBSCRIBES {
            st.off = true;
            return;
        }
        let subs = sub
            .filters
            .iter()
            .zip(&sub.qos)
            .map(|(f, q)| Sub {
                filter: f.clone(),
                qos: *q,
                plain: !sub.sub_id && !f.starts_with("$share/"),
            })
            .collect();
        st.pending.push((sub.pkid, subs));
    }

    /// rumqttd answered a SUBSCRIBE: record what it granted.
    pub(crate) fn suback(&self, pkid: u16, codes: &[u8]) {
        let mut st = lock(&self.state);
        let Some(i) = st.pending.iter().position(|(p, _)| *p == pkid) else {
            return;
        };
        let (_, subs) = st.pending.remove(i);
        for (mut s, code) in subs.into_iter().zip(codes) {
            if *code >= 0x80 {
                continue;
            }
            s.qos = (*code).min(2);
            st.granted.retain(|g| g.filter != s.filter);
            st.granted.push(s);
        }
        if st.granted.len() > MAX_FILTERS {
            st.off = true;
        }
    }

    /// An UNSUBSCRIBE was forwarded to rumqttd.
    pub(crate) fn unsubscribed(&self, filters: &[String]) {
        lock(&self.state)
            .granted
            .retain(|g| !filters.contains(&g.filter));
    }

    /// The client acknowledged packet id `pkid`.
    pub(crate) fn puback(&self, pkid: u16) -> Ack {
        let mut st = lock(&self.state);
        let Some(i) = st.inflight.iter().position(|p| *p == pkid) else {
            return Ack::Forward;
        };
        st.inflight.swap_remove(i);
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

    /// rumqttd answered a PINGREQ: returns whether the proxy sent it (drop the PINGRESP).
    pub(crate) fn pingresp(&self) -> bool {
        let mut st = lock(&self.state);
        if st.synthetic_pings > 0 {
            st.synthetic_pings -= 1;
            return true;
        }
        false
    }

    /// Whether rumqttd still has messages of the node's for this connection.
    pub(crate) fn is_behind(&self) -> bool {
        self.behind.load(Ordering::Acquire)
    }

    /// rumqttd delivered a PUBLISH with gate key `key` to this connection.
    pub(crate) fn relayed(&self, key: Held) {
        let mut st = lock(&self.state);
        if let Some(i) = st.behind.iter().position(|k| *k == key) {
            st.behind.remove(i);
            if st.behind.is_empty() {
                self.behind.store(false, Ordering::Release);
            }
        }
    }

    /// rumqttd sent a QoS ≥ 1 PUBLISH with `pkid`: a conflict if it is in the direct range.
    pub(crate) fn rumqttd_pkid(&self, pkid: u16, metrics: &Metrics) {
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

    thread_local! {
        static GATE: crate::gate::Gate = crate::gate::Gate::default();
    }

    fn direct() -> Arc<Direct> {
        Arc::new(Direct::new(true, Arc::new(Metrics::default())))
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
        r.conn.relayed(k(inbox));
        assert!(r.conn.is_behind());
        r.conn.relayed(k(inbox));
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
        a.conn.relayed(k(t));
        a.conn.relayed(k(t));
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
        r.conn.relayed(k(t));
        assert!(d.offer(&msg(t), k(t), false));
        // Wrap-around skips 1..=100.
        let mut st = ConnState {
            granted: Vec::new(),
            pending: Vec::new(),
            inflight: Vec::new(),
            behind: Vec::new(),
            next_pkid: u16::MAX,
            off: false,
            last_ping: Instant::now(),
            synthetic_pings: 0,
        };
        assert_eq!(st.allocate(), u16::MAX);
        assert_eq!(st.allocate(), RUMQTTD_MAX_PKID + 1);
        // A conflict with rumqttd turns direct delivery off for the connection.
        r.conn.rumqttd_pkid(RUMQTTD_MAX_PKID + 5, &d.metrics);
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
