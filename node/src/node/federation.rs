//! Federation: the libp2p shell of registry replication, heartbeats and cross-node task offers.
//!
//! * **Registry replication is the sans-IO core** [`fedmesh_protocol::gossip::Federation`]
//!   (eager push with a seen-cache, re-advertisement, expiry, paged anti-entropy with
//!   withdrawals), the very code `protocol/src/sim.rs` simulates. This shell only carries its
//!   inputs and outputs ([`Node::pump_gossip`]):
//!   - local advertise / withdraw → `advertise_until` / `withdraw`;
//!   - a message on [`REGISTRY_TOPIC`] → the author check (the envelope's signer must be its
//!     libp2p author), then `receive(.., Via::Gossip, ..)`; `Forward` → report `Accept`,
//!     `Drop` → report its `Ignore` / `Reject`; refusals are counted per forwarding peer and
//!     reason in `fedmesh_p2p_rejected`. Every gossip message gets a verdict;
//!   - a request-response request → `receive(.., Via::Direct, ..)` and `Send` → a request
//!     (anti-entropy digests, requests and the owners' envelopes; answered by an empty
//!     acknowledgement);
//!   - `Publish` → gossipsub publish, `Sealed` → the `vcvs` tree (and the audit log for a
//!     withdrawal), peer connections → `peer_up` / `peer_down`, the node's tick → `tick`;
//!   - `Unhandled` (offers, progress, results) → the task-offer code below.
//! * **Heartbeats** every [`HEARTBEAT_EVERY`] on [`HEARTBEAT_TOPIC`]: the load of each local
//!   agent → `Tasks::set_remote_load` at the receivers.
//! * **Offers.** `Output::Deliver` for a remote agent becomes an `Offer` (a channel envelope:
//!   unsigned, the noise-authenticated connection vouches for the sender) sent by
//!   request-response to the agent's node. The host checks that the agent is local and has
//!   capacity, persists a [`Hosted`] record and flushes **before** it answers `Accept`, then
//!   delivers to the agent's inbox. A `Decline`, an error or a timeout (`routing.offer_timeout_ms`)
//!   makes the origin try the next candidate. The agent's progress and result go back to the
//!   origin by request-response, retried with backoff until acknowledged; the result is
//!   persisted in the hosted record until the origin acknowledges it, and the origin persists
//!   (group commit) before it acknowledges. Results are accepted only from the agent's own node
//!   (the noise-authenticated peer must be the envelope signer, which must be `agent.node`).

use std::collections::HashSet;

use fedmesh_protocol::gossip::{DropReason, OutEvent, Via};
use fedmesh_protocol::{DeclineReason, Envelope, Outcome};
use libp2p::PeerId;
use libp2p::gossipsub::{MessageAcceptance, MessageId};
use serde::{Deserialize, Serialize};

use super::*;
use crate::p2p::{self, Command, Event, HEARTBEAT_TOPIC, REGISTRY_TOPIC};

/// Heartbeat period.
pub(super) const HEARTBEAT_EVERY: Duration = Duration::from_secs(3);
/// Longest wait between two sends of an unacknowledged result.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long after its deadline an unacknowledged result or an unanswered hosted task is kept.
const HOSTED_GRACE_MS: u64 = 10 * 60 * 1000;
/// Most nodes whose heartbeat sequence is remembered.
const MAX_HEARTBEAT_NODES: usize = 4096;

/// A task this node runs for another node (persisted in the `hosted` tree).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Hosted {
    spec: TaskSpec,
    agent: AgentName,
    attempt: u32,
    /// Set when the agent answered; kept until the origin acknowledges it.
    outcome: Option<Outcome>,
}

#[derive(Debug)]
struct Outgoing {
    peer: PeerId,
    data: Vec<u8>,
    next_try: Instant,
    backoff: Duration,
    in_flight: bool,
    give_up_ms: u64,
}

#[derive(Debug)]
enum Pending {
    Offer(OfferSent),
    Send((TaskId, bool)),
    /// A message of the registry core (`OutEvent::Send`) to this peer.
    Sync(PeerId),
}

/// An offer in flight (kept to resend it after a transport failure).
#[derive(Debug, Clone)]
struct OfferSent {
    task: TaskId,
    agent: AgentId,
    peer: PeerId,
    data: Vec<u8>,
    tries: u32,
}

/// Sends of one offer before a transport failure counts as a decline. A failure does not say
/// whether the host accepted (it may have persisted the task and died before answering), so the
/// same offer (idempotent at the host) is tried again first.
const OFFER_TRIES: u32 = 3;
/// Wait before an offer is resent.
const OFFER_RETRY: Duration = Duration::from_millis(1000);

/// Federation state of the node.
#[derive(Debug)]
/// How an offer is answered.
enum OfferAnswer {
    /// Now (a decline).
    Now(Option<Vec<u8>>),
    /// After the batch's flush (an accept, with the hosted record to make durable first; the
    /// agent gets the task at once).
    AfterFlush(Option<Vec<u8>>),
}

pub(super) struct Fed {
    /// Accepted offers whose answers wait for the batch's flush: one sled flush covers every
    /// offer of a batch, and no offer is acknowledged before its hosted record is durable.
    after_flush: Vec<(u64, Option<Vec<u8>>)>,
    /// What the progress and results received in this batch of swarm events asked the task
    /// engine to do, and the requests to acknowledge once that is persisted: one flush covers
    /// the batch (see [`Node::finish_p2p_batch`]).
    batch_outputs: Vec<Output>,
    batch_acks: Vec<u64>,
    hosted: HashMap<TaskId, Hosted>,
    /// Unacknowledged progress (`false`) and results (`true`) of hosted tasks.
    outbox: HashMap<(TaskId, bool), Outgoing>,
    pending: HashMap<u64, (Instant, Pending)>,
    /// Offers waiting to be resent.
    offer_retry: Vec<(Instant, OfferSent)>,
    next_tag: u64,
    /// The remote load last set per agent from heartbeats (to subtract our own share).
    remote_load: HashMap<AgentId, u16>,
    connected: HashSet<PeerId>,
    heartbeat_seq: HashMap<NodeId, u64>,
    my_seq: u64,
    last_heartbeat: Instant,
}

impl Fed {
    pub(super) fn new() -> Self {
        Self {
            after_flush: Vec::new(),
            batch_outputs: Vec::new(),
            batch_acks: Vec::new(),
            hosted: HashMap::new(),
            outbox: HashMap::new(),
            pending: HashMap::new(),
            next_tag: 0,
            remote_load: HashMap::new(),
            offer_retry: Vec::new(),
            connected: HashSet::new(),
            heartbeat_seq: HashMap::new(),
            my_seq: 0,
            last_heartbeat: Instant::now(),
        }
    }
}

/// The `fedmesh_p2p_rejected` reason of a dropped registry message.
fn drop_label(reason: &DropReason) -> &'static str {
    match reason {
        DropReason::Duplicate => "duplicate",
        DropReason::Rejected(r) => r.label(),
        DropReason::NotKept => "not_kept",
    }
}

/// A message on the registry topic: the author check (the envelope's claimed signer is the
/// libp2p author: a node publishes only its own envelopes and a relayed copy keeps its author),
/// then `Federation::receive(.., Via::Gossip, ..)`. Returns the gossipsub verdict (`Forward` →
/// `Accept`, `Drop` → its acceptance, counted per forwarding peer) and the other outputs, for
/// [`Node::carry_out`].
pub(crate) fn receive_registry_gossip(
    core: &mut Federation,
    metrics: &Metrics,
    from: &PeerId,
    source: Option<&PeerId>,
    data: &[u8],
    now: u64,
) -> (MessageAcceptance, Vec<OutEvent>) {
    let (Some(from_node), Some(author)) = (p2p::node_id(from), source.and_then(p2p::node_id))
    else {
        metrics.p2p_reject(&from.to_string(), "host_mismatch");
        return (MessageAcceptance::Reject, Vec::new());
    };
    // Header: version (1 byte), then the signer (32 bytes). A forged claim fails the signature.
    if data
        .get(1..33)
        .is_some_and(|signer| signer != author.as_bytes())
    {
        metrics.p2p_reject(&from.to_string(), "host_mismatch");
        return (MessageAcceptance::Reject, Vec::new());
    }
    core.receive(from_node, Via::Gossip, data.into(), now);
    let mut acceptance = None;
    let mut rest = Vec::new();
    for o in core.drain() {
        match o {
            OutEvent::Forward { from: f, .. } if f == from_node => {
                acceptance = Some(MessageAcceptance::Accept);
            }
            OutEvent::Drop {
                from: f,
                acceptance: a,
                reason,
            } if f == from_node => {
                metrics.p2p_reject(&from.to_string(), drop_label(&reason));
                acceptance = Some(p2p::verdict(a));
            }
            OutEvent::Unhandled { from: f, .. } if f == from_node => {
                metrics.p2p_reject(&from.to_string(), "unexpected_message");
                acceptance = Some(MessageAcceptance::Reject);
            }
            other => rest.push(other),
        }
    }
    // Accepted but not forwarded (eager push off): valid, not relayed.
    (acceptance.unwrap_or(MessageAcceptance::Ignore), rest)
}

/// Opens the answer to a request sent to `peer`: a channel envelope must come from `peer` (the
/// connection the request went out on authenticated it); a signed one is verified.
fn open_answer(bytes: &[u8], peer: &NodeId, now: u64) -> Result<Envelope, Rejection> {
    if fedmesh_protocol::is_channel(bytes) {
        fedmesh_protocol::open_channel(bytes, peer, now)
    } else {
        fedmesh_protocol::open(bytes, now)
    }
}

impl Node {
    fn tag(&mut self, p: Pending) -> u64 {
        self.fed.next_tag += 1;
        self.fed
            .pending
            .insert(self.fed.next_tag, (Instant::now(), p));
        self.fed.next_tag
    }

    /// Sends a request; false (and nothing pending) when the command queue is full.
    fn request(&mut self, peer: PeerId, data: Vec<u8>, p: Pending) -> bool {
        let tag = self.tag(p);
        tracing::debug!(target: "fedmesh_hop", tag, "rr request out");
        let ok = self.p2p.send(Command::Request { peer, data, tag });
        if !ok {
            self.fed.pending.remove(&tag);
        } else {
            self.metrics
                .p2p_out
                .get_or_create(&Kind::of("request"))
                .inc();
        }
        ok
    }

    fn respond(&self, id: u64, frames: Vec<Vec<u8>>) {
        tracing::debug!(target: "fedmesh_hop", id, "rr respond");
        self.p2p.send(Command::Respond { id, frames });
    }

    /// Seals a federation message: task messages (offers, answers, progress, results) as
    /// channel envelopes, unsigned, because they travel only to one peer over a connection
    /// that authenticates this node (see `fedmesh_protocol::CHANNEL_VERSION`); everything else
    /// signed.
    fn seal(&self, m: &Message, now: u64) -> Option<Vec<u8>> {
        let sealed = if m.travels_unsigned() {
            fedmesh_protocol::seal_channel(&self.id, now, m)
        } else {
            fedmesh_protocol::seal(&self.key, now, m)
        };
        match sealed {
            Ok(b) => Some(b),
            Err(e) => {
                self.metrics.error("p2p_seal");
                tracing::warn!(kind = m.kind(), error = %e, "could not seal a federation message");
                None
            }
        }
    }

    /// Publishes a sealed envelope on a gossip topic (when any peer is connected; peers that
    /// join later catch up by anti-entropy).
    pub(super) fn broadcast(&self, topic: &'static str, data: Vec<u8>) {
        if !self.fed.connected.is_empty() {
            self.p2p.send(Command::Publish { topic, data });
        }
    }

    /// Carries out what the registry core asked for since the last call. Returns the last
    /// `Unhandled` envelope (a request that is not about the registry), for the caller.
    pub(super) fn pump_gossip(&mut self) -> Option<(NodeId, Box<Envelope>)> {
        let outs: Vec<OutEvent> = self.gossip.drain().collect();
        self.carry_out(outs)
    }

    /// Carries out outputs of the registry core (see [`Node::pump_gossip`]).
    fn carry_out(&mut self, outs: Vec<OutEvent>) -> Option<(NodeId, Box<Envelope>)> {
        let mut unhandled = None;
        for o in outs {
            match o {
                OutEvent::Publish { bytes, .. } => self.broadcast(REGISTRY_TOPIC, bytes.to_vec()),
                // Gossipsub forwards a message once it is reported `Accept`.
                OutEvent::Forward { .. } => {}
                OutEvent::Drop { from, reason, .. } => {
                    self.metrics
                        .p2p_reject(&from.to_string(), drop_label(&reason));
                }
                OutEvent::Send { to, bytes } => {
                    if let Some(peer) = p2p::peer_id(&to) {
                        self.request(peer, bytes.to_vec(), Pending::Sync(peer));
                    }
                }
                OutEvent::Event(e) => {
                    tracing::debug!(event = ?e, "registry changed");
                    self.dirty = true;
                }
                OutEvent::Sealed {
                    agent,
                    version,
                    withdrawn,
                    bytes,
                    ..
                } => {
                    let name = agent.name.to_string();
                    let write = if withdrawn {
                        self.audit_append(
                            "withdraw",
                            &agent.to_string(),
                            serde_json::json!({"version": version}),
                        );
                        Write::DeleteVcv(name)
                    } else {
                        Write::Vcv {
                            name,
                            envelope: bytes.to_vec(),
                        }
                    };
                    if let Err(e) = self.store.apply([write]) {
                        tracing::error!(error = %e, "storing a VCV");
                    }
                    self.unflushed = true;
                }
                OutEvent::Unhandled { from, envelope, .. } => unhandled = Some((from, envelope)),
            }
        }
        unhandled
    }

    /// Reloads hosted tasks after a restart; unacknowledged results are queued again.
    pub(super) fn restore_hosted(&mut self) {
        let now = now_ms();
        for bytes in self.store.hosted() {
            match postcard::from_bytes::<Hosted>(&bytes) {
                Ok(h) => {
                    let id = h.spec.id;
                    if let Some(o) = h.outcome.clone() {
                        self.queue_result(&h, o, now);
                    }
                    self.fed.hosted.insert(id, h);
                }
                Err(e) => tracing::error!(error = %e, "skipping an undecodable hosted task"),
            }
        }
        let names: Vec<AgentName> = self.fed.hosted.values().map(|h| h.agent.clone()).collect();
        for n in names {
            self.update_hosted_load(&n);
        }
    }

    fn update_hosted_load(&mut self, name: &AgentName) {
        let n = self
            .fed
            .hosted
            .values()
            .filter(|h| &h.agent == name && h.outcome.is_none())
            .count();
        self.tasks.set_remote_load(
            AgentId::new(self.id, name.clone()),
            u16::try_from(n).unwrap_or(u16::MAX),
        );
    }

    fn persist_hosted(&mut self, h: &Hosted) {
        match postcard::to_allocvec(h) {
            Ok(b) => {
                if let Err(e) = self.store.apply([Write::Hosted(h.spec.id, b)]) {
                    tracing::error!(error = %e, "storing a hosted task");
                }
                self.unflushed = true;
            }
            Err(e) => tracing::error!(error = %e, "encoding a hosted task"),
        }
    }

    /// Hands the tasks this node hosts for `name` to its inbox again (it (re)connected).
    pub(super) fn redeliver_hosted(&self, name: &AgentName) {
        for h in self.fed.hosted.values() {
            if &h.agent == name && h.outcome.is_none() {
                let topic = format!("fedmesh/v1/agent/{name}/inbox");
                self.publish(topic, api::task_message(&h.spec, h.attempt), None, "task");
            }
        }
    }

    /// An agent's progress on a task it runs for another node. False if not a hosted task.
    pub(super) fn hosted_progress(
        &mut self,
        name: &AgentName,
        task: TaskId,
        percent: u8,
        note: String,
        now: u64,
    ) -> bool {
        let Some(h) = self.fed.hosted.get(&task) else {
            return false;
        };
        if &h.agent != name || h.outcome.is_some() {
            return true;
        }
        let m = Message::Progress {
            task,
            agent: AgentId::new(self.id, name.clone()),
            percent: percent.min(100),
            note,
        };
        if let (Some(data), Some(peer)) = (self.seal(&m, now), p2p::peer_id(&h.spec.origin)) {
            let give_up_ms = h.spec.deadline_ms;
            self.fed.outbox.insert(
                (task, false),
                Outgoing {
                    peer,
                    data,
                    next_try: Instant::now(),
                    backoff: Duration::from_millis(500),
                    in_flight: false,
                    give_up_ms,
                },
            );
        }
        true
    }

    /// An agent's result for a task it runs for another node. False if not a hosted task.
    pub(super) fn hosted_result(
        &mut self,
        name: &AgentName,
        task: TaskId,
        outcome: Outcome,
        now: u64,
    ) -> bool {
        let Some(h) = self.fed.hosted.get_mut(&task) else {
            return false;
        };
        if &h.agent != name || h.outcome.is_some() {
            return true; // someone else's, or a duplicate
        }
        tracing::debug!(target: "fedmesh_hop", %task, "hosted result");
        h.outcome = Some(outcome.clone());
        let h = h.clone();
        self.persist_hosted(&h);
        self.fed.outbox.remove(&(task, false));
        self.queue_result(&h, outcome, now);
        self.update_hosted_load(name);
        true
    }

    fn queue_result(&mut self, h: &Hosted, outcome: Outcome, now: u64) {
        let m = Message::Result {
            task: h.spec.id,
            agent: AgentId::new(self.id, h.agent.clone()),
            outcome,
        };
        let data = self.seal(&m, now).or_else(|| {
            // Too large or otherwise unsealable: tell the origin it failed.
            let m = Message::Result {
                task: h.spec.id,
                agent: AgentId::new(self.id, h.agent.clone()),
                outcome: Outcome::Failed("result could not be sent (too large?)".into()),
            };
            self.seal(&m, now)
        });
        if let (Some(data), Some(peer)) = (data, p2p::peer_id(&h.spec.origin)) {
            self.fed.outbox.insert(
                (h.spec.id, true),
                Outgoing {
                    peer,
                    data,
                    next_try: Instant::now(),
                    backoff: Duration::from_millis(500),
                    in_flight: false,
                    give_up_ms: h.spec.deadline_ms.saturating_add(HOSTED_GRACE_MS),
                },
            );
        }
    }

    /// `Output::Deliver` for an agent on another node: offer it the task.
    pub(super) fn offer(
        &mut self,
        agent: AgentId,
        agent_version: u64,
        task: TaskSpec,
        attempt: u32,
        next: &mut Vec<Output>,
    ) {
        let now = now_ms();
        let id = task.id;
        let m = Message::Offer {
            task,
            agent: agent.clone(),
            agent_version,
            attempt,
        };
        let sent = match (self.seal(&m, now), p2p::peer_id(&agent.node)) {
            (Some(data), Some(peer)) => self.request(
                peer,
                data.clone(),
                Pending::Offer(OfferSent {
                    task: id,
                    agent: agent.clone(),
                    peer,
                    data,
                    tries: 1,
                }),
            ),
            _ => false,
        };
        if sent {
            self.metrics.p2p_out.get_or_create(&Kind::of("offer")).inc();
        } else {
            self.metrics.error("offer_not_sent");
            next.extend(self.tasks.declined(
                &agent,
                id,
                "offer not sent",
                self.gossip.registry(),
                now,
            ));
        }
    }

    /// Handles one event from the swarm.
    pub(super) async fn p2p_event(&mut self, ev: Event) -> anyhow::Result<()> {
        match ev {
            Event::Gossip {
                msg_id,
                from,
                source,
                topic,
                data,
            } => self.on_gossip(msg_id, from, source, &topic, &data),
            Event::Request { peer, id, data } => self.on_request(peer, id, &data).await?,
            Event::Response { tag, result } => {
                let out = self.on_response(tag, result);
                self.fed.batch_outputs.extend(out);
            }
            Event::Connected(peer) => {
                if self.fed.connected.len() < self.cfg.p2p.max_connections as usize {
                    self.fed.connected.insert(peer);
                }
                if let Some(node) = p2p::node_id(&peer) {
                    // Anti-entropy on join: the core sends the peer our digest.
                    self.gossip.peer_up(node, now_ms());
                    self.pump_gossip();
                }
            }
            Event::RegistrySubscribed(peer) => {
                if let Some(node) = p2p::node_id(&peer) {
                    // Anti-entropy again: what we advertised since the connection's digest
                    // was gossiped to nobody on this peer's side (see `Event`).
                    self.gossip.peer_up(node, now_ms());
                    self.pump_gossip();
                }
            }
            Event::Disconnected(peer) => {
                self.fed.connected.remove(&peer);
                if let Some(node) = p2p::node_id(&peer) {
                    self.gossip.peer_down(&node);
                }
            }
        }
        Ok(())
    }

    fn on_gossip(
        &mut self,
        msg_id: MessageId,
        from: PeerId,
        source: Option<PeerId>,
        topic: &str,
        data: &[u8],
    ) {
        let now = now_ms();
        let acceptance = if topic == REGISTRY_TOPIC {
            let (a, rest) = receive_registry_gossip(
                &mut self.gossip,
                &self.metrics,
                &from,
                source.as_ref(),
                data,
                now,
            );
            self.carry_out(rest);
            a
        } else if topic == HEARTBEAT_TOPIC {
            match p2p::check_gossip(data, source.as_ref(), now) {
                Err(r) => {
                    self.metrics.p2p_reject(&from.to_string(), r.label());
                    p2p::acceptance(&r)
                }
                Ok(env) => self.on_heartbeat(env, &from),
            }
        } else {
            self.metrics.p2p_reject(&from.to_string(), "unknown_topic");
            MessageAcceptance::Reject
        };
        self.p2p.send(Command::Report {
            msg_id,
            from,
            acceptance,
        });
    }

    fn on_heartbeat(&mut self, env: Envelope, from: &PeerId) -> MessageAcceptance {
        let Message::Heartbeat { seq, load } = env.message else {
            self.metrics
                .p2p_reject(&from.to_string(), "unexpected_message");
            return MessageAcceptance::Reject;
        };
        if env.signer == self.id {
            return MessageAcceptance::Ignore;
        }
        if self
            .fed
            .heartbeat_seq
            .get(&env.signer)
            .is_some_and(|&s| seq <= s)
        {
            self.metrics
                .p2p_reject(&from.to_string(), "heartbeat_replay");
            return MessageAcceptance::Ignore;
        }
        if self.fed.heartbeat_seq.len() >= MAX_HEARTBEAT_NODES {
            self.fed.heartbeat_seq.clear();
        }
        self.fed.heartbeat_seq.insert(env.signer, seq);
        for l in load {
            // The host's count includes the tasks we gave it; ours are counted already.
            let agent = AgentId::new(env.signer, l.agent);
            let prev = self.fed.remote_load.get(&agent).copied().unwrap_or(0);
            let ours = self.tasks.load(&agent).saturating_sub(prev);
            let theirs = l.inflight.saturating_sub(ours);
            if theirs == 0 {
                self.fed.remote_load.remove(&agent);
            } else if self.fed.remote_load.len() < self.cfg.limits.max_agents_per_node {
                self.fed.remote_load.insert(agent.clone(), theirs);
            }
            self.tasks.set_remote_load(agent, theirs);
        }
        MessageAcceptance::Accept
    }

    async fn on_request(&mut self, peer: PeerId, id: u64, data: &[u8]) -> anyhow::Result<()> {
        tracing::debug!(target: "fedmesh_hop", id, "rr request in");
        let now = now_ms();
        let from = peer.to_string();
        let Some(node) = p2p::node_id(&peer) else {
            self.metrics.p2p_reject(&from, "signer_not_peer");
            self.respond(id, vec![]);
            return Ok(());
        };
        let env = if fedmesh_protocol::is_channel(data) {
            // A task message, unsigned: noise authenticated the peer, which must be its sender.
            self.dirty = true;
            match fedmesh_protocol::open_channel(data, &node, now) {
                Ok(env) => Box::new(env),
                Err(r) => {
                    tracing::info!(peer = %from, reason = %r, "rejected a request");
                    self.metrics.p2p_reject(&from, r.label());
                    self.respond(id, vec![]);
                    return Ok(());
                }
            }
        } else {
            // The core opens it: registry messages (anti-entropy) are its own, the rest comes
            // back as `Unhandled`.
            self.gossip.receive(node, Via::Direct, data.into(), now);
            let unhandled = self.pump_gossip();
            self.dirty = true;
            let Some((_, env)) = unhandled else {
                self.respond(id, vec![]);
                return Ok(());
            };
            env
        };
        if env.signer != node {
            // Requests are answered only for their signer (noise authenticated the peer).
            self.metrics.p2p_reject(&from, "signer_not_peer");
            self.respond(id, vec![]);
            return Ok(());
        }
        self.metrics
            .p2p_in
            .get_or_create(&Kind::of(env.message.kind()))
            .inc();
        let signer = env.signer;
        match env.message {
            Message::Offer {
                task,
                agent,
                attempt,
                ..
            } => {
                let task_id = task.id;
                match self.host_offer(signer, task, agent, attempt, now).await? {
                    OfferAnswer::Now(answer) => self.respond(id, answer.into_iter().collect()),
                    OfferAnswer::AfterFlush(answer) => {
                        // The agent gets the task now, while its hosted record is flushed; the
                        // Accept (our acknowledgement to the origin) waits for that flush. A
                        // crash before the flush loses nothing the origin was told: it gets no
                        // Accept, resends the offer and the task is delivered again.
                        if let Some(h) = self.fed.hosted.get(&task_id)
                            && h.outcome.is_none()
                        {
                            tracing::debug!(target: "fedmesh_hop", task = %task_id, "deliver hosted");
                            let topic = format!("fedmesh/v1/agent/{}/inbox", h.agent);
                            self.publish(
                                topic,
                                api::task_message(&h.spec, h.attempt),
                                None,
                                "task",
                            );
                        }
                        self.fed.after_flush.push((id, answer));
                    }
                }
            }
            Message::Progress {
                task,
                agent,
                percent,
                note,
            } => {
                let out = self.tasks.progress(&agent, task, percent, note, now);
                self.fed.batch_outputs.extend(out);
                self.fed.batch_acks.push(id);
            }
            Message::Result {
                task,
                agent,
                outcome,
            } => {
                let out = self
                    .tasks
                    .result(&agent, task, outcome, self.gossip.registry(), now);
                if out.is_empty() {
                    self.metrics.error("remote_result_ignored");
                }
                // Persisted (and flushed) with the batch before the acknowledgement.
                self.fed.batch_outputs.extend(out);
                self.fed.batch_acks.push(id);
            }
            other => {
                self.metrics.p2p_reject(&from, "unexpected_request");
                tracing::debug!(kind = other.kind(), "unexpected request");
                self.respond(id, vec![]);
            }
        }
        Ok(())
    }

    /// Ends a batch of swarm events: persists what its progress and results changed with one
    /// flush (and whatever else waits for one), carries out the effects, then acknowledges those
    /// requests.
    pub(super) async fn finish_p2p_batch(&mut self) -> anyhow::Result<()> {
        let out = std::mem::take(&mut self.fed.batch_outputs);
        if !out.is_empty() || self.unflushed {
            self.execute(out).await?;
        }
        for id in std::mem::take(&mut self.fed.batch_acks) {
            self.respond(id, vec![]);
        }
        Ok(())
    }

    /// Decides on an offer; returns the sealed Accept or Decline.
    async fn host_offer(
        &mut self,
        origin: NodeId,
        task: TaskSpec,
        agent: AgentId,
        attempt: u32,
        now: u64,
    ) -> anyhow::Result<OfferAnswer> {
        let id = task.id;
        let reason = if agent.node != self.id || !self.gossip.is_local(&agent.name) {
            Some(DeclineReason::UnknownAgent)
        } else if task.origin != origin {
            self.metrics
                .p2p_reject(&origin.to_string(), "origin_mismatch");
            Some(DeclineReason::UnknownAgent)
        } else if let Some(h) = self.fed.hosted.get(&id) {
            // A repeated offer (the origin restarted or our answer was lost): same answer.
            (h.agent != agent.name).then_some(DeclineReason::Overloaded)
        } else {
            match self.gossip.registry().get(&agent) {
                None => Some(DeclineReason::UnknownAgent),
                Some(e) if self.tasks.load(&agent) >= e.vcv.resources.capacity.max(1) => {
                    Some(DeclineReason::AtCapacity)
                }
                Some(_) if task.deadline_ms <= now.saturating_add(100) => {
                    Some(DeclineReason::DeadlineTooClose)
                }
                Some(_) if self.fed.hosted.len() >= self.cfg.limits.max_inflight_tasks => {
                    Some(DeclineReason::Overloaded)
                }
                Some(_) => None,
            }
        };
        if let Some(reason) = reason {
            self.metrics
                .p2p_out
                .get_or_create(&Kind::of("decline"))
                .inc();
            return Ok(OfferAnswer::Now(self.seal(
                &Message::Decline {
                    task: id,
                    agent,
                    reason,
                },
                now,
            )));
        }
        if !self.fed.hosted.contains_key(&id) {
            let h = Hosted {
                spec: task,
                agent: agent.name.clone(),
                attempt,
                outcome: None,
            };
            self.persist_hosted(&h);
            self.fed.hosted.insert(id, h);
            self.update_hosted_load(&agent.name);
            self.audit_append(
                "task_hosted",
                &id.to_string(),
                serde_json::json!({"origin": origin.to_string(), "agent": agent.to_string()}),
            );
        }
        // Durable before we say yes: the answer waits for the batch's flush (`after_flush`), so
        // a burst of offers costs one flush, not one each.
        self.unflushed = true;
        self.metrics
            .p2p_out
            .get_or_create(&Kind::of("accept"))
            .inc();
        Ok(OfferAnswer::AfterFlush(
            self.seal(&Message::Accept { task: id, agent }, now),
        ))
    }

    /// Sends the answers of offers accepted before the flush that just completed. Called by
    /// `execute` right after it flushes.
    pub(super) fn after_flush(&mut self) {
        for (request, answer) in std::mem::take(&mut self.fed.after_flush) {
            self.respond(request, answer.into_iter().collect());
        }
    }

    fn on_response(&mut self, tag: u64, result: Result<Vec<Vec<u8>>, String>) -> Vec<Output> {
        tracing::debug!(target: "fedmesh_hop", tag, "rr response in");
        let now = now_ms();
        let Some((_, p)) = self.fed.pending.remove(&tag) else {
            return vec![];
        };
        match p {
            Pending::Offer(sent) => {
                let (task, agent) = (sent.task, sent.agent.clone());
                if result.is_err()
                    && sent.tries < OFFER_TRIES
                    && self.fed.offer_retry.len() < self.cfg.limits.max_inflight_tasks
                {
                    tracing::debug!(%task, %agent, tries = sent.tries, "offer failed; resending");
                    self.fed
                        .offer_retry
                        .push((Instant::now() + OFFER_RETRY, sent));
                    return vec![];
                }
                let verdict = match &result {
                    Ok(frames) => match frames.first().map(|f| open_answer(f, &agent.node, now)) {
                        Some(Ok(env)) if env.signer == agent.node => match env.message {
                            Message::Accept { task: t, .. } if t == task => Ok(()),
                            Message::Decline {
                                task: t, reason, ..
                            } if t == task => Err(format!("{reason:?}")),
                            _ => Err("unexpected answer".into()),
                        },
                        _ => Err("no valid answer".into()),
                    },
                    Err(e) => Err(e.clone()),
                };
                match verdict {
                    Ok(()) => {
                        self.metrics.p2p_in.get_or_create(&Kind::of("accept")).inc();
                        vec![]
                    }
                    Err(reason) => {
                        tracing::info!(%task, %agent, %reason, "offer declined or failed");
                        self.metrics
                            .p2p_in
                            .get_or_create(&Kind::of("decline"))
                            .inc();
                        self.tasks
                            .declined(&agent, task, &reason, self.gossip.registry(), now)
                    }
                }
            }
            Pending::Send(key) => {
                match result {
                    Ok(_) => {
                        self.fed.outbox.remove(&key);
                        if key.1
                            && let Some(h) = self.fed.hosted.remove(&key.0)
                        {
                            if let Err(e) = self.store.apply([Write::DeleteHosted(key.0)]) {
                                tracing::error!(error = %e, "deleting a hosted task");
                            }
                            self.unflushed = true;
                            self.update_hosted_load(&h.agent);
                        }
                    }
                    Err(e) => {
                        if let Some(o) = self.fed.outbox.get_mut(&key) {
                            tracing::debug!(error = %e, task = %key.0, "send to origin failed; will retry");
                            o.in_flight = false;
                            o.next_try = Instant::now() + o.backoff;
                            o.backoff = (o.backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                }
                vec![]
            }
            Pending::Sync(peer) => {
                // The answer is an acknowledgement; any envelopes in it are for the core too.
                if let (Ok(frames), Some(node)) = (result, p2p::node_id(&peer)) {
                    for f in frames {
                        self.gossip.receive(node, Via::Direct, f.into(), now);
                    }
                    self.pump_gossip();
                }
                vec![]
            }
        }
    }

    /// Sends every due progress/result message of hosted tasks. Called once a batch of agent
    /// messages has been handled, before that batch's flush (so a result leaves at once, while
    /// its hosted record is being made durable; see the event loop), and from the tick (retries
    /// with backoff).
    pub(super) fn send_outbox(&mut self, now: u64) {
        let due: Vec<(TaskId, bool)> = self
            .fed
            .outbox
            .iter()
            .filter(|(_, o)| !o.in_flight && o.next_try <= Instant::now())
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            let Some(o) = self.fed.outbox.get(&key) else {
                continue;
            };
            if now > o.give_up_ms {
                self.metrics.error("hosted_send_gave_up");
                self.fed.outbox.remove(&key);
                if key.1 && self.fed.hosted.remove(&key.0).is_some() {
                    let _ = self.store.apply([Write::DeleteHosted(key.0)]);
                    self.unflushed = true;
                }
                continue;
            }
            let (peer, data) = (o.peer, o.data.clone());
            let sent = self.request(peer, data, Pending::Send(key));
            if let Some(o) = self.fed.outbox.get_mut(&key) {
                if sent {
                    o.in_flight = true;
                } else {
                    o.next_try = Instant::now() + o.backoff;
                }
            }
        }
    }

    /// Timers: the registry core (expiry, re-advertisement, anti-entropy), heartbeats, result
    /// retries, hosted expiry. Returns the outputs of requests whose answer was lost (counted
    /// as failures).
    pub(super) fn fed_tick(&mut self, now: u64) -> Vec<Output> {
        // A request always ends in a response or a failure event, unless the event queue was
        // full; such requests are failed here so nothing waits forever.
        let lost_after = Duration::from_millis(self.cfg.routing.offer_timeout_ms.max(500))
            + Duration::from_secs(5);
        let lost: Vec<u64> = self
            .fed
            .pending
            .iter()
            .filter(|(_, (at, _))| at.elapsed() > lost_after)
            .map(|(t, _)| *t)
            .collect();
        self.gossip.tick(now);
        self.pump_gossip();
        let mut out = Vec::new();
        for tag in lost {
            out.extend(self.on_response(tag, Err("answer lost".into())));
        }
        // Resend offers whose task is still assigned to that agent.
        let now_i = Instant::now();
        let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.fed.offer_retry)
            .into_iter()
            .partition(|(at, _)| *at <= now_i);
        self.fed.offer_retry = wait;
        for (_, mut sent) in due {
            let held = self.tasks.get(&sent.task).is_some_and(|r| {
                r.agent.as_ref() == Some(&sent.agent)
                    && r.state == fedmesh_protocol::task::TaskState::Assigned
            });
            if !held {
                continue;
            }
            sent.tries += 1;
            let (peer, data) = (sent.peer, sent.data.clone());
            let (task, agent) = (sent.task, sent.agent.clone());
            if !self.request(peer, data, Pending::Offer(sent)) {
                out.extend(self.tasks.declined(
                    &agent,
                    task,
                    "offer not sent",
                    self.gossip.registry(),
                    now,
                ));
            }
        }
        if self.fed.last_heartbeat.elapsed() >= HEARTBEAT_EVERY {
            self.fed.last_heartbeat = Instant::now();
            self.heartbeat(now);
        }
        self.send_outbox(now);
        // Hosted tasks whose agent never answered are dropped well after their deadline.
        let stale: Vec<(TaskId, AgentName)> = self
            .fed
            .hosted
            .values()
            .filter(|h| {
                h.outcome.is_none() && now > h.spec.deadline_ms.saturating_add(HOSTED_GRACE_MS)
            })
            .map(|h| (h.spec.id, h.agent.clone()))
            .collect();
        for (id, name) in stale {
            self.fed.hosted.remove(&id);
            let _ = self.store.apply([Write::DeleteHosted(id)]);
            self.unflushed = true;
            self.update_hosted_load(&name);
        }
        out
    }

    fn heartbeat(&mut self, now: u64) {
        if self.fed.connected.is_empty() {
            return;
        }
        self.fed.my_seq = (self.fed.my_seq + 1).max(now);
        let load: Vec<AgentLoad> = self
            .gossip
            .local_agents()
            .map(|(n, _)| n)
            .take(fedmesh_protocol::limits::MAX_HEARTBEAT_ENTRIES)
            .map(|n| AgentLoad {
                agent: n.clone(),
                inflight: self.tasks.load(&AgentId::new(self.id, n.clone())),
            })
            .collect();
        let m = Message::Heartbeat {
            seq: self.fed.my_seq,
            load,
        };
        if let Some(b) = self.seal(&m, now) {
            self.broadcast(HEARTBEAT_TOPIC, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_protocol::{gossip, sample};

    const NOW: u64 = 1_790_000_000_000;

    fn metrics() -> Metrics {
        Metrics::new(&mut prometheus_client::registry::Registry::default())
    }

    fn core() -> Federation {
        Federation::new(sample::key(9), gossip::Config::default(), 9, NOW).expect("config")
    }

    /// The verdict of one registry-topic message, as the node reports it.
    fn judge(
        core: &mut Federation,
        m: &Metrics,
        from: &PeerId,
        source: Option<&PeerId>,
        data: &[u8],
    ) -> MessageAcceptance {
        receive_registry_gossip(core, m, from, source, data, NOW).0
    }

    #[test]
    fn forged_advertisements_are_rejected_and_counted_per_peer() {
        let honest = sample::key(1);
        let forger = sample::key(2);
        let relay = p2p::peer_id(&sample::key(3).node_id()).expect("pid");
        let m = metrics();
        let mut core = core();
        let from = relay.to_string();

        // 1. The forger signs an advertisement for an agent of the honest node.
        let vcv = sample::vcv(&honest, "victim", 5, NOW);
        let forged =
            fedmesh_protocol::seal(&forger, NOW, &Message::Advertise(vcv.clone())).expect("seal");
        let src = p2p::peer_id(&forger.node_id());
        let a = judge(&mut core, &m, &relay, src.as_ref(), &forged);
        assert_eq!(a, MessageAcceptance::Reject);
        assert_eq!(m.p2p_rejected_count(&from, "host_mismatch"), 1);

        // 2. A genuine advertisement with a flipped signature bit.
        let good = fedmesh_protocol::seal(&honest, NOW, &Message::Advertise(vcv)).expect("seal");
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let hsrc = p2p::peer_id(&honest.node_id());
        let a = judge(&mut core, &m, &relay, hsrc.as_ref(), &bad);
        assert_eq!(a, MessageAcceptance::Reject);
        assert_eq!(m.p2p_rejected_count(&from, "bad_signature"), 1);

        // 3. Genuine bytes re-published under another author.
        let a = judge(&mut core, &m, &relay, src.as_ref(), &good);
        assert_eq!(a, MessageAcceptance::Reject);
        assert_eq!(m.p2p_rejected_count(&from, "host_mismatch"), 2);
        assert!(core.registry().is_empty(), "nothing forged got in");

        // 4. The genuine one is accepted (forwarded); its replay and an older version are
        //    ignored.
        let (a, rest) = receive_registry_gossip(&mut core, &m, &relay, hsrc.as_ref(), &good, NOW);
        assert_eq!(a, MessageAcceptance::Accept);
        assert!(
            rest.iter()
                .any(|o| matches!(o, OutEvent::Event(gossip::Event::Added { .. })))
        );
        assert_eq!(core.registry().len(), 1);
        let a = judge(&mut core, &m, &relay, hsrc.as_ref(), &good);
        assert_eq!(a, MessageAcceptance::Ignore);
        assert_eq!(m.p2p_rejected_count(&from, "duplicate"), 1);
        let old = sample::vcv(&honest, "victim", 4, NOW);
        let old = fedmesh_protocol::seal(&honest, NOW, &Message::Advertise(old)).expect("seal");
        let a = judge(&mut core, &m, &relay, hsrc.as_ref(), &old);
        assert_eq!(a, MessageAcceptance::Ignore);
        assert_eq!(m.p2p_rejected_count(&from, "version_not_newer"), 1);

        // 5. Garbage.
        let a = judge(&mut core, &m, &relay, hsrc.as_ref(), b"\x01junk");
        assert_eq!(a, MessageAcceptance::Reject);

        // 6. Anti-entropy messages do not belong on the topic.
        let digest = Message::SyncDigest { entries: vec![] };
        let page = fedmesh_protocol::seal(&honest, NOW, &digest).expect("seal");
        let a = judge(&mut core, &m, &relay, hsrc.as_ref(), &page);
        assert_eq!(a, MessageAcceptance::Reject);
    }

    #[test]
    fn withdrawals_by_another_node_are_rejected() {
        let honest = sample::key(1);
        let forger = sample::key(2);
        let relay = p2p::peer_id(&sample::key(3).node_id()).expect("pid");
        let m = metrics();
        let mut core = core();
        let vcv = sample::vcv(&honest, "victim", 5, NOW);
        let agent = vcv.agent.clone();
        let good = fedmesh_protocol::seal(&honest, NOW, &Message::Advertise(vcv)).expect("seal");
        let hsrc = p2p::peer_id(&honest.node_id());
        judge(&mut core, &m, &relay, hsrc.as_ref(), &good);
        let w = fedmesh_protocol::seal(
            &forger,
            NOW,
            &Message::Withdraw {
                agent: agent.clone(),
                version: 9,
            },
        )
        .expect("seal");
        let fsrc = p2p::peer_id(&forger.node_id());
        let a = judge(&mut core, &m, &relay, fsrc.as_ref(), &w);
        assert_eq!(a, MessageAcceptance::Reject);
        assert_eq!(core.registry().len(), 1);
        // The owner's withdrawal is accepted.
        let w = fedmesh_protocol::seal(&honest, NOW, &Message::Withdraw { agent, version: 9 })
            .expect("seal");
        let a = judge(&mut core, &m, &relay, hsrc.as_ref(), &w);
        assert_eq!(a, MessageAcceptance::Accept);
        assert!(core.registry().is_empty());
    }
}
