//! The replicated capability registry of one node: a sans-IO gossip state machine.
//!
//! [`Federation`] owns a [`Registry`] and keeps it in step with the rest of the federation:
//!
//! * **Eager push.** A local advertisement or withdrawal is sealed and published on the gossip
//!   topic; a valid, *new* advertisement or withdrawal received over gossip is forwarded
//!   ([`OutEvent::Forward`]; under gossipsub that is "report `Accept`"). Duplicates are dropped
//!   by a bounded seen-cache before any signature is checked.
//! * **Re-advertisement and expiry.** Every local agent is re-issued under a new version every
//!   `readvertise_interval_ms` (with jitter), valid for `vcv_ttl_ms`. A node that leaves stops
//!   re-issuing, so its agents expire everywhere within one TTL.
//! * **Anti-entropy** (FoA's Δ-gossip). When a peer comes up, and every
//!   `anti_entropy_interval_ms` to one random peer, the node sends its digest (agent, version;
//!   live entries and recent withdrawals) in [`Message::SyncDigest`] pages sized in bytes so that
//!   every envelope stays under [`MAX_ENVELOPE_BYTES`]. The receiver asks with
//!   [`Message::SyncRequest`] only for what is missing or newer there, and the answer is the
//!   owners' original signed envelopes, sent directly and never forwarded.
//!
//! Inputs are method calls (or [`InEvent`] through [`Federation::handle`]) with the time passed
//! in; outputs accumulate in an outbox drained by [`Federation::drain`]. A refused message is a
//! value ([`OutEvent::Drop`]) and is counted per peer ([`PeerStats`]). Nothing here reads a clock,
//! owns a socket or draws OS randomness: randomness is a [`SplitMix64`] seeded by the caller.
//!
//! **Driving it from libp2p** (the node's shell): feed gossipsub messages as
//! [`Via::Gossip`] and request-response messages as [`Via::Direct`]; map
//! [`OutEvent::Publish`] to `gossipsub.publish`, [`OutEvent::Forward`] to
//! `report_message_validation_result(Accept)`, [`OutEvent::Drop`] to the same call with its
//! [`Acceptance`] (`Ignore` or `Reject`), and [`OutEvent::Send`] to a request-response message;
//! call [`Federation::tick`] about once a second.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::envelope::{self, ContentId, Envelope};
use crate::error::{Acceptance, Rejection};
use crate::keys::{AgentId, AgentName, NodeId, NodeKey};
use crate::limits::{MAX_ENVELOPE_BYTES, MAX_SYNC_ENTRIES, MAX_VCV_TTL_MS};
use crate::message::{DigestEntry, Message};
use crate::registry::{Change, Entry, InsertError, Registry};
use crate::vcv::Vcv;

/// Shared, immutable message bytes (cheap to clone to many peers).
pub type Bytes = Arc<[u8]>;

/// Bytes of an envelope around a sync page: header (41), variant tag (1), entry count (≤ 3
/// bytes of varint) and signature (64).
const PAGE_OVERHEAD_BYTES: usize = 41 + 1 + 3 + 64;
/// The byte budget of the entries of one sync page.
pub const SYNC_PAGE_BUDGET_BYTES: usize = MAX_ENVELOPE_BYTES - PAGE_OVERHEAD_BYTES;

/// A small, seeded, deterministic PRNG (splitmix64). Not cryptographic: it only picks peers and
/// jitters timers.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// How envelopes are opened. [`Strict`] is [`envelope::open`]; the simulator plugs in a cache
/// shared by all simulated nodes so that each distinct envelope is verified once per run.
pub trait Verify {
    /// Decodes, verifies and validates `bytes` at `now_ms`, exactly like [`envelope::open`].
    fn open(&mut self, bytes: &[u8], now_ms: u64) -> Result<Envelope, Rejection>;
}

/// [`envelope::open`], with no cache.
#[derive(Clone, Copy, Debug, Default)]
pub struct Strict;

impl Verify for Strict {
    fn open(&mut self, bytes: &[u8], now_ms: u64) -> Result<Envelope, Rejection> {
        envelope::open(bytes, now_ms)
    }
}

/// Tuning of one node's registry gossip. All nodes of a federation should agree on the TTL and
/// the intervals; the bounds are local.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Most agents held (the registry's bound).
    pub max_agents: usize,
    /// Most agents hosted by this node.
    pub max_local_agents: usize,
    /// Most peers tracked (neighbours and their statistics).
    pub max_peers: usize,
    /// Entries of the seen-cache (dedup before verification); oldest evicted first.
    pub seen_capacity: usize,
    /// Most withdrawals remembered for anti-entropy.
    pub max_withdrawals: usize,
    /// Lifetime of every locally issued VCV, in ms.
    pub vcv_ttl_ms: u64,
    /// How often a local agent is re-issued, in ms (must be well under the TTL).
    pub readvertise_interval_ms: u64,
    /// How often a digest goes to one random peer, in ms (0 = only when a peer comes up).
    pub anti_entropy_interval_ms: u64,
    /// Forward new advertisements and withdrawals received over gossip (eager push). Off, the
    /// registry spreads by anti-entropy alone (a baseline for the simulator).
    pub eager_push: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_agents: 100_000,
            max_local_agents: 1024,
            max_peers: 256,
            seen_capacity: 16_384,
            max_withdrawals: 16_384,
            vcv_ttl_ms: 3_600_000,
            readvertise_interval_ms: 1_200_000,
            anti_entropy_interval_ms: 30_000,
            eager_push: true,
        }
    }
}

/// A configuration that cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A bound is zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// The TTL is longer than the protocol allows.
    #[error("vcv_ttl_ms {0} exceeds MAX_VCV_TTL_MS")]
    TtlTooLong(u64),
    /// Re-advertising no faster than the TTL lets agents blink out.
    #[error("readvertise_interval_ms must be less than vcv_ttl_ms")]
    ReadvertiseTooSlow,
}

impl Config {
    /// Checks the configuration, naming the bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("max_agents", self.max_agents),
            ("max_local_agents", self.max_local_agents),
            ("max_peers", self.max_peers),
            ("seen_capacity", self.seen_capacity),
            ("max_withdrawals", self.max_withdrawals),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.vcv_ttl_ms == 0 {
            return Err(ConfigError::Zero("vcv_ttl_ms"));
        }
        if self.readvertise_interval_ms == 0 {
            return Err(ConfigError::Zero("readvertise_interval_ms"));
        }
        if self.vcv_ttl_ms > MAX_VCV_TTL_MS {
            return Err(ConfigError::TtlTooLong(self.vcv_ttl_ms));
        }
        if self.readvertise_interval_ms >= self.vcv_ttl_ms {
            return Err(ConfigError::ReadvertiseTooSlow);
        }
        Ok(())
    }
}

/// Why a local command failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FederationError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The agent is not hosted by this node (its id names another node, or the envelope was
    /// signed by another key).
    #[error("agent is not hosted by this node")]
    NotLocal,
    /// The envelope is not an advertisement.
    #[error("envelope is not an Advertise")]
    NotAdvertise,
    /// The envelope or VCV is invalid.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// Too many local agents.
    #[error("too many local agents (max {0})")]
    TooManyLocal(usize),
    /// The registry is full.
    #[error("registry full")]
    RegistryFull,
    /// No such local agent.
    #[error("unknown local agent {0}")]
    UnknownAgent(AgentName),
}

/// How a message arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Via {
    /// On the gossip topic (may be forwarded).
    Gossip,
    /// Point to point (anti-entropy; never forwarded).
    Direct,
}

/// Why a received message was dropped.
#[derive(Clone, Debug, PartialEq)]
pub enum DropReason {
    /// Already seen (the seen-cache), not re-verified.
    Duplicate,
    /// Refused: forged, stale, expired, malformed, ...
    Rejected(Rejection),
    /// Valid but not kept: the registry or the withdrawal store is full, or the message is
    /// valid but stale (an older withdrawal).
    NotKept,
}

/// Why an agent left the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveReason {
    /// Its host withdrew it.
    Withdrawn,
    /// Its VCV expired.
    Expired,
}

/// A change of the replicated registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A new agent.
    Added {
        /// The agent.
        agent: AgentId,
        /// Its version.
        version: u64,
        /// The content id of the envelope that carried it.
        id: ContentId,
    },
    /// A newer version of a known agent.
    Updated {
        /// The agent.
        agent: AgentId,
        /// Its new version.
        version: u64,
        /// The content id of the envelope that carried it.
        id: ContentId,
    },
    /// An agent left.
    Removed {
        /// The agent.
        agent: AgentId,
        /// Why.
        reason: RemoveReason,
    },
}

/// Something for the shell to do or know.
#[derive(Clone, Debug, PartialEq)]
pub enum OutEvent {
    /// Publish on the gossip topic (originated here).
    Publish {
        /// Content id of the envelope.
        id: ContentId,
        /// The envelope.
        bytes: Bytes,
    },
    /// A gossip message was valid and new: forward it to the other neighbours (gossipsub:
    /// report `Accept`).
    Forward {
        /// The peer it came from (not to be sent back).
        from: NodeId,
        /// Content id of the envelope.
        id: ContentId,
        /// The envelope.
        bytes: Bytes,
    },
    /// A received message was dropped (gossipsub: report `acceptance`).
    Drop {
        /// The peer it came from.
        from: NodeId,
        /// `Ignore` or `Reject` (penalise the peer).
        acceptance: Acceptance,
        /// Why.
        reason: DropReason,
    },
    /// Send to one peer directly (anti-entropy).
    Send {
        /// The peer.
        to: NodeId,
        /// The envelope.
        bytes: Bytes,
    },
    /// The registry changed.
    Event(Event),
    /// This node sealed an advertisement or withdrawal of one of its agents (the shell may
    /// persist it; the simulator tracks it).
    Sealed {
        /// Content id of the envelope.
        id: ContentId,
        /// The agent.
        agent: AgentId,
        /// The version sealed.
        version: u64,
        /// True for a withdrawal.
        withdrawn: bool,
        /// The envelope.
        bytes: Bytes,
    },
    /// A message that is not about the registry, verified (tasks, offers, ...): for the shell.
    Unhandled {
        /// The peer it came from.
        from: NodeId,
        /// How it came.
        via: Via,
        /// The verified envelope.
        envelope: Box<Envelope>,
    },
}

/// An input, for driving the machine as one `handle` call per event.
#[derive(Clone, Debug)]
pub enum InEvent {
    /// Advertise (or change) a local agent; the machine stamps, versions and seals it.
    Advertise(Box<Vcv>),
    /// Advertise an envelope sealed by the shell with this node's key.
    AdvertiseSealed(Vec<u8>),
    /// Withdraw a local agent.
    Withdraw(AgentName),
    /// A message from a peer.
    Recv {
        /// The peer (authenticated by the transport).
        from: NodeId,
        /// How it came.
        via: Via,
        /// The envelope.
        bytes: Bytes,
    },
    /// A peer connected.
    PeerUp(NodeId),
    /// A peer disconnected.
    PeerDown(NodeId),
    /// Timer.
    Tick,
}

/// What one peer has sent this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Messages accepted (new advertisements, withdrawals, sync messages).
    pub accepted: u64,
    /// Duplicates dropped by the seen-cache.
    pub duplicates: u64,
    /// Refusals, by [`Rejection::label`].
    pub rejected: BTreeMap<&'static str, u64>,
}

impl PeerStats {
    /// Refusals with this label.
    pub fn rejected(&self, label: &str) -> u64 {
        self.rejected.get(label).copied().unwrap_or(0)
    }

    /// All refusals.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// Counters of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Everything received, summed over peers (including peers no longer tracked).
    pub received: PeerStats,
    /// Envelopes published (local advertisements and withdrawals).
    pub published: u64,
    /// Gossip messages forwarded.
    pub forwarded: u64,
    /// Digest pages sent.
    pub digest_pages_sent: u64,
    /// Request pages sent.
    pub request_pages_sent: u64,
    /// Envelopes sent in answer to requests.
    pub sync_envelopes_sent: u64,
    /// Valid messages not kept (registry or withdrawal store full, stale withdrawal).
    pub not_kept: u64,
    /// Peers not tracked because `max_peers` was reached.
    pub peers_refused: u64,
}

#[derive(Clone, Debug)]
struct Local {
    vcv: Vcv,
    next_readvertise_ms: u64,
    /// The end of the agent's own lifetime (`u64::MAX`: as long as this node re-issues it).
    until_ms: u64,
}

#[derive(Clone, Debug)]
struct Withdrawal {
    version: u64,
    bytes: Bytes,
    until_ms: u64,
}

/// Hashes a dedup key (pseudo-random signature bytes) by mixing its first 8 bytes with a
/// per-node secret, so that a peer grinding signatures cannot aim at one bucket.
#[derive(Clone, Copy, Debug, Default)]
struct KeyHasher {
    secret: u64,
    h: u64,
}

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        let mut z = self.h ^ self.secret;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut b = [0u8; 8];
        let n = bytes.len().min(8);
        b[..n].copy_from_slice(&bytes[..n]);
        self.h = self.h.rotate_left(5) ^ u64::from_le_bytes(b);
    }

    fn write_usize(&mut self, _len: usize) {}
}

#[derive(Clone, Copy, Debug)]
struct KeyHasherBuilder(u64);

impl std::hash::BuildHasher for KeyHasherBuilder {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher {
            secret: self.0,
            h: 0,
        }
    }
}

/// A bounded FIFO set of dedup keys.
#[derive(Debug)]
struct SeenCache {
    set: HashSet<[u8; 32], KeyHasherBuilder>,
    order: VecDeque<[u8; 32]>,
    capacity: usize,
}

impl SeenCache {
    fn new(capacity: usize, secret: u64) -> Self {
        Self {
            set: HashSet::with_hasher(KeyHasherBuilder(secret)),
            order: VecDeque::new(),
            capacity,
        }
    }

    fn contains(&self, key: &[u8; 32]) -> bool {
        self.set.contains(key)
    }

    fn insert(&mut self, key: [u8; 32]) {
        if !self.set.insert(key) {
            return;
        }
        self.order.push_back(key);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

/// The dedup key of an envelope: the `R` half of its ed25519 signature. Signatures are
/// deterministic and `R` is derived from the signed content, so distinct valid envelopes have
/// distinct keys; it costs nothing to extract, unlike a content hash. Only envelopes whose
/// signature verified are entered, so a forgery cannot pre-empt the genuine message.
fn dedup_key(bytes: &[u8]) -> Option<[u8; 32]> {
    let n = bytes.len();
    let r = bytes.get(n.checked_sub(64)?..n.checked_sub(32)?)?;
    let mut k = [0u8; 32];
    k.copy_from_slice(r);
    Some(k)
}

/// The encoded size of a postcard varint.
fn varint_len(v: u64) -> usize {
    (64 - v.max(1).leading_zeros() as usize).div_ceil(7)
}

/// Encoded bytes of one digest entry.
pub fn digest_entry_bytes(e: &DigestEntry) -> usize {
    agent_id_bytes(&e.agent) + varint_len(e.version)
}

/// Encoded bytes of one agent id.
pub fn agent_id_bytes(a: &AgentId) -> usize {
    let name = a.name.as_str().len();
    32 + varint_len(name as u64) + name
}

/// Splits `items` into pages whose encoded entries fit [`SYNC_PAGE_BUDGET_BYTES`] and whose
/// length is at most [`MAX_SYNC_ENTRIES`].
pub fn paginate<T>(items: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut pages = Vec::new();
    let mut page = Vec::new();
    let mut used = 0usize;
    for item in items {
        let s = size(&item);
        if !page.is_empty() && (used + s > SYNC_PAGE_BUDGET_BYTES || page.len() >= MAX_SYNC_ENTRIES)
        {
            pages.push(std::mem::take(&mut page));
            used = 0;
        }
        used += s;
        page.push(item);
    }
    if !page.is_empty() {
        pages.push(page);
    }
    pages
}

/// One node's replicated capability registry and its gossip. See the module docs.
#[derive(Debug)]
pub struct Federation<V: Verify = Strict> {
    key: NodeKey,
    me: NodeId,
    cfg: Config,
    registry: Registry,
    verify: V,
    rng: SplitMix64,
    seen: SeenCache,
    peers: BTreeMap<NodeId, PeerStats>,
    local: BTreeMap<AgentName, Local>,
    withdrawals: BTreeMap<AgentId, Withdrawal>,
    next_expiry_ms: u64,
    next_anti_entropy_ms: u64,
    stats: Stats,
    out: Vec<OutEvent>,
}

impl Federation<Strict> {
    /// A node with an empty registry that verifies every envelope with [`envelope::open`].
    pub fn new(key: NodeKey, cfg: Config, seed: u64, now_ms: u64) -> Result<Self, ConfigError> {
        Self::with_verifier(key, cfg, seed, now_ms, Strict)
    }
}

impl<V: Verify> Federation<V> {
    /// A node with a custom envelope opener (see [`Verify`]).
    pub fn with_verifier(
        key: NodeKey,
        cfg: Config,
        seed: u64,
        now_ms: u64,
        verify: V,
    ) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let mut rng = SplitMix64::new(seed);
        let first_ae = now_ms.saturating_add(rng.below(cfg.anti_entropy_interval_ms.max(1)));
        let secret = rng.next_u64();
        Ok(Self {
            me: key.node_id(),
            key,
            registry: Registry::new(cfg.max_agents),
            seen: SeenCache::new(cfg.seen_capacity, secret),
            peers: BTreeMap::new(),
            local: BTreeMap::new(),
            withdrawals: BTreeMap::new(),
            next_expiry_ms: u64::MAX,
            next_anti_entropy_ms: first_ae,
            stats: Stats::default(),
            out: Vec::new(),
            verify,
            rng,
            cfg,
        })
    }

    /// Replaces the (still empty) registry by `registry`, e.g. one that keeps a candidate index
    /// in step ([`Registry::with_index`]). Call it before the first input.
    pub fn with_registry(mut self, registry: Registry) -> Self {
        assert!(
            self.registry.is_empty() && self.local.is_empty(),
            "with_registry after the first input"
        );
        self.next_expiry_ms = registry
            .iter()
            .map(|e| e.vcv.expires_at_ms)
            .min()
            .unwrap_or(u64::MAX);
        self.registry = registry;
        self
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.me
    }

    /// The replicated registry (read-only: it changes only through this machine).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// What `peer` has sent, while it is tracked.
    pub fn peer_stats(&self, peer: &NodeId) -> Option<&PeerStats> {
        self.peers.get(peer)
    }

    /// The tracked peers.
    pub fn peers(&self) -> impl Iterator<Item = &NodeId> {
        self.peers.keys()
    }

    /// The hosted agents and their current versions.
    pub fn local_agents(&self) -> impl Iterator<Item = (&AgentName, u64)> {
        self.local.iter().map(|(n, l)| (n, l.vcv.version))
    }

    /// Whether `name` is hosted (advertised and not withdrawn) by this node.
    pub fn is_local(&self, name: &AgentName) -> bool {
        self.local.contains_key(name)
    }

    /// Takes the accumulated outputs.
    pub fn drain(&mut self) -> std::vec::Drain<'_, OutEvent> {
        self.out.drain(..)
    }

    /// Applies one input and returns the outputs. Command errors are returned as `Err` with the
    /// outputs left in the outbox.
    pub fn handle(
        &mut self,
        event: InEvent,
        now_ms: u64,
    ) -> Result<std::vec::Drain<'_, OutEvent>, FederationError> {
        match event {
            InEvent::Advertise(vcv) => self.advertise(*vcv, now_ms)?,
            InEvent::AdvertiseSealed(bytes) => self.advertise_sealed(&bytes, now_ms)?,
            InEvent::Withdraw(name) => self.withdraw(&name, now_ms)?,
            InEvent::Recv { from, via, bytes } => self.receive(from, via, bytes, now_ms),
            InEvent::PeerUp(p) => self.peer_up(p, now_ms),
            InEvent::PeerDown(p) => self.peer_down(&p),
            InEvent::Tick => self.tick(now_ms),
        }
        Ok(self.drain())
    }

    // ---- local commands -------------------------------------------------------------------

    /// Advertises (or changes) a local agent. The VCV is stamped: `issued_at = now`,
    /// `expires_at = now + vcv_ttl_ms`, and `version = max(vcv.version, known + 1, now_ms)`
    /// (time-based versions keep increasing across restarts that lost state).
    pub fn advertise(&mut self, vcv: Vcv, now_ms: u64) -> Result<(), FederationError> {
        self.advertise_until(vcv, u64::MAX, now_ms)
    }

    /// [`Federation::advertise`] for an agent that asked for a bounded lifetime: every issue
    /// expires at `min(now + vcv_ttl_ms, until_ms)`, and the agent is no longer re-issued (it
    /// expires everywhere) once `until_ms` has passed, unless it is advertised again.
    pub fn advertise_until(
        &mut self,
        mut vcv: Vcv,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<(), FederationError> {
        if vcv.agent.node != self.me {
            return Err(FederationError::NotLocal);
        }
        if !self.local.contains_key(&vcv.agent.name)
            && self.local.len() >= self.cfg.max_local_agents
        {
            return Err(FederationError::TooManyLocal(self.cfg.max_local_agents));
        }
        let known = self.registry.known_version(&vcv.agent).unwrap_or(0);
        vcv.version = vcv.version.max(known.saturating_add(1)).max(now_ms);
        vcv.issued_at_ms = now_ms;
        vcv.expires_at_ms = now_ms.saturating_add(self.cfg.vcv_ttl_ms).min(until_ms);
        if vcv.expires_at_ms <= now_ms {
            return Err(Rejection::Expired {
                expires_at_ms: vcv.expires_at_ms,
                now_ms,
            }
            .into());
        }
        vcv.normalise();
        vcv.validate_static(&self.me)?;
        let bytes: Bytes =
            envelope::seal(&self.key, now_ms, &Message::Advertise(vcv.clone()))?.into();
        self.publish_local_advert(vcv, bytes, until_ms, now_ms)
    }

    /// Advertises an envelope the shell sealed with this node's key. It is re-issued (re-sealed
    /// by this machine) every `readvertise_interval_ms` from then on.
    pub fn advertise_sealed(&mut self, bytes: &[u8], now_ms: u64) -> Result<(), FederationError> {
        let env = self.verify.open(bytes, now_ms)?;
        if env.signer != self.me {
            return Err(FederationError::NotLocal);
        }
        let Message::Advertise(vcv) = env.message else {
            return Err(FederationError::NotAdvertise);
        };
        if !self.local.contains_key(&vcv.agent.name)
            && self.local.len() >= self.cfg.max_local_agents
        {
            return Err(FederationError::TooManyLocal(self.cfg.max_local_agents));
        }
        self.publish_local_advert(vcv, bytes.into(), u64::MAX, now_ms)
    }

    fn publish_local_advert(
        &mut self,
        vcv: Vcv,
        bytes: Bytes,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<(), FederationError> {
        let id = envelope::content_id(&bytes).ok_or(Rejection::Malformed("short envelope"))?;
        let agent = vcv.agent.clone();
        let version = vcv.version;
        let expires = vcv.expires_at_ms;
        let entry = Entry {
            vcv: vcv.clone(),
            id,
            envelope: bytes.to_vec(),
        };
        match self.registry.insert(entry, now_ms) {
            Ok(change) => self.changed(change, version, id),
            Err(InsertError::Rejected(r)) => return Err(r.into()),
            Err(InsertError::Full(_)) => return Err(FederationError::RegistryFull),
        }
        self.withdrawals.remove(&agent);
        self.next_expiry_ms = self.next_expiry_ms.min(expires);
        if let Some(k) = dedup_key(&bytes) {
            self.seen.insert(k);
        }
        let jitter = self.rng.below(self.cfg.readvertise_interval_ms / 10 + 1);
        self.local.insert(
            agent.name.clone(),
            Local {
                vcv,
                next_readvertise_ms: now_ms
                    .saturating_add(self.cfg.readvertise_interval_ms)
                    .saturating_sub(jitter),
                until_ms,
            },
        );
        self.stats.published += 1;
        self.out.push(OutEvent::Sealed {
            id,
            agent,
            version,
            withdrawn: false,
            bytes: bytes.clone(),
        });
        self.out.push(OutEvent::Publish { id, bytes });
        Ok(())
    }

    /// Withdraws a local agent: seals and publishes a withdrawal superseding every version.
    pub fn withdraw(&mut self, name: &AgentName, now_ms: u64) -> Result<(), FederationError> {
        let Some(local) = self.local.remove(name) else {
            return Err(FederationError::UnknownAgent(name.clone()));
        };
        let agent = local.vcv.agent;
        let known = self.registry.known_version(&agent).unwrap_or(0);
        let version = known.saturating_add(1).max(now_ms);
        let bytes: Bytes = envelope::seal(
            &self.key,
            now_ms,
            &Message::Withdraw {
                agent: agent.clone(),
                version,
            },
        )?
        .into();
        let id = envelope::content_id(&bytes).ok_or(Rejection::Malformed("short envelope"))?;
        if let Some(change) = self.registry.withdraw(&agent, version, now_ms)? {
            self.changed(change, version, id);
        }
        self.remember_withdrawal(agent.clone(), version, bytes.clone(), now_ms);
        if let Some(k) = dedup_key(&bytes) {
            self.seen.insert(k);
        }
        self.stats.published += 1;
        self.out.push(OutEvent::Sealed {
            id,
            agent,
            version,
            withdrawn: true,
            bytes: bytes.clone(),
        });
        self.out.push(OutEvent::Publish { id, bytes });
        Ok(())
    }

    // ---- peers ----------------------------------------------------------------------------

    /// A peer connected: track it and send it our digest (anti-entropy on join).
    pub fn peer_up(&mut self, peer: NodeId, now_ms: u64) {
        if peer == self.me {
            return;
        }
        if !self.peers.contains_key(&peer) {
            if self.peers.len() >= self.cfg.max_peers {
                self.stats.peers_refused += 1;
                return;
            }
            self.peers.insert(peer, PeerStats::default());
        }
        self.send_digest(peer, now_ms);
    }

    /// A peer disconnected: forget it (its agents expire on their own).
    pub fn peer_down(&mut self, peer: &NodeId) {
        self.peers.remove(peer);
    }

    // ---- timer ----------------------------------------------------------------------------

    /// Expires entries and withdrawals, re-issues due local agents and runs periodic
    /// anti-entropy. Call about once a second.
    pub fn tick(&mut self, now_ms: u64) {
        if now_ms >= self.next_expiry_ms {
            let mut gone = self.registry.expire(now_ms);
            gone.sort();
            for agent in gone {
                self.out.push(OutEvent::Event(Event::Removed {
                    agent,
                    reason: RemoveReason::Expired,
                }));
            }
            self.next_expiry_ms = self
                .registry
                .iter()
                .map(|e| e.vcv.expires_at_ms)
                .min()
                .unwrap_or(u64::MAX);
        }
        self.withdrawals.retain(|_, w| w.until_ms > now_ms);

        let due: Vec<AgentName> = self
            .local
            .iter()
            .filter(|(_, l)| l.next_readvertise_ms <= now_ms)
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            if let Some(l) = self.local.get(&name) {
                let (vcv, until_ms) = (l.vcv.clone(), l.until_ms);
                if until_ms <= now_ms {
                    // Its own lifetime is over: no longer hosted; it expires everywhere.
                    self.local.remove(&name);
                    continue;
                }
                if let Err(e) = self.advertise_until(vcv, until_ms, now_ms) {
                    // Keep the agent and retry next interval; the error is a value for the
                    // shell's logs, not a reason to stop.
                    let _ = e;
                    if let Some(l) = self.local.get_mut(&name) {
                        l.next_readvertise_ms =
                            now_ms.saturating_add(self.cfg.readvertise_interval_ms);
                    }
                }
            }
        }

        if self.cfg.anti_entropy_interval_ms > 0 && now_ms >= self.next_anti_entropy_ms {
            let n = self.peers.len() as u64;
            if n > 0 {
                let i = self.rng.below(n) as usize;
                if let Some(&peer) = self.peers.keys().nth(i) {
                    self.send_digest(peer, now_ms);
                }
            }
            let interval = self.cfg.anti_entropy_interval_ms;
            let jitter = self.rng.below(interval / 5 + 1);
            self.next_anti_entropy_ms = now_ms
                .saturating_add(interval)
                .saturating_sub(interval / 10)
                .saturating_add(jitter);
        }
    }

    // ---- receiving ------------------------------------------------------------------------

    /// A message from `from`.
    pub fn receive(&mut self, from: NodeId, via: Via, bytes: Bytes, now_ms: u64) {
        let key = dedup_key(&bytes);
        if let Some(k) = &key
            && self.seen.contains(k)
        {
            self.count(&from, |s| s.duplicates += 1);
            self.out.push(OutEvent::Drop {
                from,
                acceptance: Acceptance::Ignore,
                reason: DropReason::Duplicate,
            });
            return;
        }
        let env = match self.verify.open(&bytes, now_ms) {
            Ok(env) => env,
            Err(r) => return self.reject(from, r),
        };
        let registry_message = matches!(
            env.message,
            Message::Advertise(_)
                | Message::Withdraw { .. }
                | Message::SyncDigest { .. }
                | Message::SyncRequest { .. }
        );
        // Only registry messages enter the seen-cache: the shell dedups its own messages
        // (a re-sent, identical task offer must reach it again).
        if let Some(k) = key
            && registry_message
        {
            self.seen.insert(k);
        }
        match env.message {
            Message::Advertise(vcv) => self.on_advertise(from, via, env.id, vcv, bytes, now_ms),
            Message::Withdraw { agent, version } => {
                self.on_withdraw(from, via, env.id, agent, version, bytes, now_ms)
            }
            Message::SyncDigest { .. } | Message::SyncRequest { .. } if via == Via::Gossip => self
                .reject(
                    from,
                    Rejection::Malformed("sync message on the gossip topic"),
                ),
            Message::SyncDigest { .. } | Message::SyncRequest { .. } if env.signer != from => {
                self.reject(from, Rejection::HostMismatch)
            }
            Message::SyncDigest { entries } => {
                self.count(&from, |s| s.accepted += 1);
                let wanted = self.registry.wanted(&entries);
                for page in paginate(wanted, agent_id_bytes) {
                    if let Some(bytes) = self.seal(&Message::SyncRequest { agents: page }, now_ms) {
                        self.stats.request_pages_sent += 1;
                        self.out.push(OutEvent::Send { to: from, bytes });
                    }
                }
            }
            Message::SyncRequest { agents } => {
                self.count(&from, |s| s.accepted += 1);
                for agent in agents {
                    let bytes = if let Some(e) = self.registry.get(&agent) {
                        Bytes::from(e.envelope.as_slice())
                    } else if let Some(w) = self.withdrawals.get(&agent) {
                        w.bytes.clone()
                    } else {
                        continue;
                    };
                    self.stats.sync_envelopes_sent += 1;
                    self.out.push(OutEvent::Send { to: from, bytes });
                }
            }
            message => self.out.push(OutEvent::Unhandled {
                from,
                via,
                envelope: Box::new(Envelope { message, ..env }),
            }),
        }
    }

    fn on_advertise(
        &mut self,
        from: NodeId,
        via: Via,
        id: ContentId,
        vcv: Vcv,
        bytes: Bytes,
        now_ms: u64,
    ) {
        let version = vcv.version;
        let expires = vcv.expires_at_ms;
        let entry = Entry {
            vcv,
            id,
            envelope: bytes.to_vec(),
        };
        match self.registry.insert(entry, now_ms) {
            Ok(change) => {
                self.count(&from, |s| s.accepted += 1);
                self.next_expiry_ms = self.next_expiry_ms.min(expires);
                self.changed(change, version, id);
                self.forward(from, via, id, bytes);
            }
            Err(InsertError::Rejected(r)) => self.reject(from, r),
            Err(InsertError::Full(_)) => self.not_kept(from),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_withdraw(
        &mut self,
        from: NodeId,
        via: Via,
        id: ContentId,
        agent: AgentId,
        version: u64,
        bytes: Bytes,
        now_ms: u64,
    ) {
        let known = self.registry.known_version(&agent);
        if known.is_some_and(|k| k >= version) && self.registry.get(&agent).is_none() {
            // Already withdrawn at this version or later.
            return self.reject(
                from,
                Rejection::VersionNotNewer {
                    known: known.unwrap_or(0),
                    got: version,
                },
            );
        }
        if self.registry.get(&agent).is_none()
            && !self.withdrawals.contains_key(&agent)
            && self.withdrawals.len() >= self.cfg.max_withdrawals
        {
            // A tombstone for an agent we never knew, and no room to remember it.
            return self.not_kept(from);
        }
        match self.registry.withdraw(&agent, version, now_ms) {
            Err(r) => self.reject(from, r),
            Ok(change) => {
                self.count(&from, |s| s.accepted += 1);
                if let Some(change) = change {
                    self.changed(change, version, id);
                }
                self.remember_withdrawal(agent, version, bytes.clone(), now_ms);
                self.forward(from, via, id, bytes);
            }
        }
    }

    fn forward(&mut self, from: NodeId, via: Via, id: ContentId, bytes: Bytes) {
        if via == Via::Gossip && self.cfg.eager_push {
            self.stats.forwarded += 1;
            self.out.push(OutEvent::Forward { from, id, bytes });
        }
    }

    fn remember_withdrawal(&mut self, agent: AgentId, version: u64, bytes: Bytes, now_ms: u64) {
        if !self.withdrawals.contains_key(&agent)
            && self.withdrawals.len() >= self.cfg.max_withdrawals
        {
            self.stats.not_kept += 1;
            return;
        }
        // Long enough for every VCV it supersedes to have expired everywhere.
        let until_ms = now_ms.saturating_add(self.cfg.vcv_ttl_ms);
        self.withdrawals.insert(
            agent,
            Withdrawal {
                version,
                bytes,
                until_ms,
            },
        );
    }

    fn changed(&mut self, change: Change, version: u64, id: ContentId) {
        let ev = match change {
            Change::Added(agent) => Event::Added { agent, version, id },
            Change::Updated(agent) => Event::Updated { agent, version, id },
            Change::Removed(agent) => Event::Removed {
                agent,
                reason: RemoveReason::Withdrawn,
            },
        };
        self.out.push(OutEvent::Event(ev));
    }

    fn reject(&mut self, from: NodeId, r: Rejection) {
        let label = r.label();
        self.count(&from, |s| *s.rejected.entry(label).or_insert(0) += 1);
        self.out.push(OutEvent::Drop {
            from,
            acceptance: r.acceptance(),
            reason: DropReason::Rejected(r),
        });
    }

    fn not_kept(&mut self, from: NodeId) {
        self.stats.not_kept += 1;
        self.out.push(OutEvent::Drop {
            from,
            acceptance: Acceptance::Ignore,
            reason: DropReason::NotKept,
        });
    }

    fn count(&mut self, from: &NodeId, f: impl Fn(&mut PeerStats)) {
        f(&mut self.stats.received);
        if let Some(s) = self.peers.get_mut(from) {
            f(s);
        }
    }

    // ---- anti-entropy ---------------------------------------------------------------------

    /// The digest: live entries and remembered withdrawals, sorted by agent.
    pub fn digest(&self) -> Vec<DigestEntry> {
        let mut d = self.registry.digest();
        d.extend(
            self.withdrawals
                .iter()
                .filter(|(a, _)| self.registry.get(a).is_none())
                .map(|(a, w)| DigestEntry {
                    agent: a.clone(),
                    version: w.version,
                }),
        );
        d.sort_by(|a, b| a.agent.cmp(&b.agent));
        d
    }

    fn send_digest(&mut self, peer: NodeId, now_ms: u64) {
        for page in paginate(self.digest(), digest_entry_bytes) {
            if let Some(bytes) = self.seal(&Message::SyncDigest { entries: page }, now_ms) {
                self.stats.digest_pages_sent += 1;
                self.out.push(OutEvent::Send { to: peer, bytes });
            }
        }
    }

    fn seal(&mut self, message: &Message, now_ms: u64) -> Option<Bytes> {
        // Pages are sized to fit; a failure here is a sizing bug, caught by the tests.
        envelope::seal(&self.key, now_ms, message)
            .ok()
            .map(Bytes::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::AgentName;
    use crate::sample;

    const NOW: u64 = 1_790_000_000_000;

    fn fed(seed: u8) -> Federation {
        Federation::new(sample::key(seed), Config::default(), u64::from(seed), NOW).expect("cfg")
    }

    fn published(out: &[OutEvent]) -> Vec<Bytes> {
        out.iter()
            .filter_map(|o| match o {
                OutEvent::Publish { bytes, .. } => Some(bytes.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn advertise_publishes_and_peer_accepts_then_dedups() {
        let mut a = fed(1);
        let mut b = fed(2);
        a.advertise(sample::vcv(&sample::key(1), "ocr", 1, NOW), NOW)
            .expect("advertise");
        let out: Vec<_> = a.drain().collect();
        let msgs = published(&out);
        assert_eq!(msgs.len(), 1);
        assert!(out.iter().any(|o| matches!(o, OutEvent::Sealed { .. })));
        b.peer_up(a.node_id(), NOW);
        b.drain().for_each(drop);
        b.receive(a.node_id(), Via::Gossip, msgs[0].clone(), NOW + 5);
        let out: Vec<_> = b.drain().collect();
        assert!(out.iter().any(|o| matches!(o, OutEvent::Forward { .. })));
        assert!(
            out.iter()
                .any(|o| matches!(o, OutEvent::Event(Event::Added { .. })))
        );
        b.receive(a.node_id(), Via::Gossip, msgs[0].clone(), NOW + 6);
        let out: Vec<_> = b.drain().collect();
        assert!(matches!(
            out.as_slice(),
            [OutEvent::Drop {
                reason: DropReason::Duplicate,
                ..
            }]
        ));
        let s = b.peer_stats(&a.node_id()).expect("tracked");
        assert_eq!((s.accepted, s.duplicates), (1, 1));
    }

    #[test]
    fn forged_signature_and_foreign_agent_are_rejected_and_counted() {
        let mut a = fed(1);
        let mut b = fed(2);
        let forger = sample::key(9);
        b.peer_up(forger.node_id(), NOW);
        a.advertise(sample::vcv(&sample::key(1), "ocr", 1, NOW), NOW)
            .expect("advertise");
        let out: Vec<_> = a.drain().collect();
        let mut bad = published(&out)[0].to_vec();
        let n = bad.len();
        bad[n - 40] ^= 1; // in R: not a seen-cache hit
        b.receive(forger.node_id(), Via::Gossip, bad.into(), NOW);
        // Build it by hand: the forger's advert with the victim's agent id.
        let mut v = sample::vcv(&forger, "ocr", 99, NOW);
        v.agent.node = sample::key(1).node_id();
        let body = postcard::to_allocvec(&Message::Advertise(v)).expect("enc");
        let mut raw = vec![crate::envelope::ENVELOPE_VERSION];
        raw.extend_from_slice(forger.node_id().as_bytes());
        raw.extend_from_slice(&NOW.to_le_bytes());
        raw.extend_from_slice(&body);
        raw.extend_from_slice(&[7u8; 64]);
        b.receive(forger.node_id(), Via::Gossip, raw.into(), NOW);
        let s = b.peer_stats(&forger.node_id()).expect("tracked");
        assert_eq!(s.rejected("bad_signature"), 1);
        assert_eq!(s.rejected("host_mismatch"), 1);
        assert_eq!(s.accepted, 0);
        assert!(b.registry().is_empty());
        assert!(b.drain().all(|o| matches!(
            o,
            OutEvent::Drop {
                acceptance: Acceptance::Reject,
                ..
            } | OutEvent::Send { .. }
        )));
    }

    #[test]
    fn replay_of_superseded_version_is_refused() {
        let mut a = fed(1);
        let mut b = Federation::new(
            sample::key(2),
            Config {
                seen_capacity: 1,
                ..Config::default()
            },
            2,
            NOW,
        )
        .expect("cfg");
        a.advertise(sample::vcv(&sample::key(1), "ocr", 1, NOW), NOW)
            .expect("adv");
        let v1 = published(&a.drain().collect::<Vec<_>>())[0].clone();
        a.advertise(sample::vcv(&sample::key(1), "ocr", 1, NOW), NOW + 10)
            .expect("adv");
        let v2 = published(&a.drain().collect::<Vec<_>>())[0].clone();
        b.peer_up(a.node_id(), NOW);
        b.receive(a.node_id(), Via::Gossip, v1.clone(), NOW + 20);
        b.receive(a.node_id(), Via::Gossip, v2, NOW + 20);
        b.receive(a.node_id(), Via::Gossip, v1, NOW + 30);
        let s = b.peer_stats(&a.node_id()).expect("tracked");
        assert_eq!(s.rejected("version_not_newer"), 1);
        assert_eq!(s.accepted, 2);
    }

    #[test]
    fn anti_entropy_pulls_only_what_is_missing() {
        let mut a = fed(1);
        let mut b = fed(2);
        for name in ["x", "y", "z"] {
            a.advertise(sample::vcv(&sample::key(1), name, 1, NOW), NOW)
                .expect("adv");
        }
        let first = published(&a.drain().collect::<Vec<_>>())[0].clone();
        b.receive(a.node_id(), Via::Gossip, first, NOW);
        b.drain().for_each(drop);
        // a comes up at b: a sends its digest, b requests 2, a answers with 2 envelopes.
        a.peer_up(b.node_id(), NOW);
        let digest: Vec<_> = a.drain().collect();
        assert_eq!(digest.len(), 1);
        let mut to_a = Vec::new();
        for o in digest {
            if let OutEvent::Send { bytes, .. } = o {
                b.receive(a.node_id(), Via::Direct, bytes, NOW + 1);
            }
            for o in b.drain() {
                if let OutEvent::Send { bytes, .. } = o {
                    to_a.push(bytes);
                }
            }
        }
        assert_eq!(to_a.len(), 1, "one request page");
        a.receive(b.node_id(), Via::Direct, to_a[0].clone(), NOW + 2);
        let replies: Vec<_> = a
            .drain()
            .filter_map(|o| match o {
                OutEvent::Send { bytes, .. } => Some(bytes),
                _ => None,
            })
            .collect();
        assert_eq!(replies.len(), 2, "only the two missing VCVs");
        for r in replies {
            b.receive(a.node_id(), Via::Direct, r, NOW + 3);
        }
        assert!(
            !b.drain().any(|o| matches!(o, OutEvent::Forward { .. })),
            "direct replies are not forwarded"
        );
        assert_eq!(b.registry().len(), 3);
    }

    #[test]
    fn withdrawal_spreads_by_anti_entropy_too() {
        let mut a = fed(1);
        let mut b = fed(2);
        a.advertise(sample::vcv(&sample::key(1), "x", 1, NOW), NOW)
            .expect("adv");
        let adv = published(&a.drain().collect::<Vec<_>>())[0].clone();
        b.receive(a.node_id(), Via::Gossip, adv, NOW);
        b.drain().for_each(drop);
        let name = AgentName::new("x").expect("name");
        a.withdraw(&name, NOW + 100).expect("withdraw");
        a.drain().for_each(drop); // the flood is lost
        a.peer_up(b.node_id(), NOW + 200);
        let mut pending: Vec<(bool, Bytes)> = a
            .drain()
            .filter_map(|o| match o {
                OutEvent::Send { bytes, .. } => Some((true, bytes)),
                _ => None,
            })
            .collect();
        for _ in 0..4 {
            let mut next = Vec::new();
            for (to_b, bytes) in pending {
                let (rx, tx_id) = if to_b {
                    (&mut b, a.node_id())
                } else {
                    (&mut a, b.node_id())
                };
                rx.receive(tx_id, Via::Direct, bytes, NOW + 300);
                for o in rx.drain() {
                    if let OutEvent::Send { bytes, .. } = o {
                        next.push((!to_b, bytes));
                    }
                }
            }
            pending = next;
        }
        assert!(b.registry().is_empty(), "withdrawal pulled by anti-entropy");
    }

    #[test]
    fn readvertise_and_expiry() {
        let cfg = Config {
            vcv_ttl_ms: 10_000,
            readvertise_interval_ms: 4_000,
            anti_entropy_interval_ms: 0,
            ..Config::default()
        };
        let mut a = Federation::new(sample::key(1), cfg.clone(), 1, NOW).expect("cfg");
        let mut b = Federation::new(sample::key(2), cfg, 2, NOW).expect("cfg");
        a.advertise(sample::vcv(&sample::key(1), "x", 1, NOW), NOW)
            .expect("adv");
        let v1 = published(&a.drain().collect::<Vec<_>>())[0].clone();
        b.receive(a.node_id(), Via::Gossip, v1, NOW);
        let mut t = NOW;
        let mut reissued = 0;
        while t < NOW + 9_000 {
            t += 1_000;
            a.tick(t);
            reissued += published(&a.drain().collect::<Vec<_>>()).len();
        }
        assert!(reissued >= 2, "re-issued {reissued} times");
        b.tick(NOW + 9_999);
        assert_eq!(b.registry().len(), 1);
        b.tick(NOW + 10_000);
        assert!(b.registry().is_empty(), "expired without re-advertisement");
        assert!(b.drain().any(|o| matches!(
            o,
            OutEvent::Event(Event::Removed {
                reason: RemoveReason::Expired,
                ..
            })
        )));
    }

    #[test]
    fn advertise_until_bounds_every_issue_and_stops_re_issuing() {
        let cfg = Config {
            vcv_ttl_ms: 10_000,
            readvertise_interval_ms: 4_000,
            anti_entropy_interval_ms: 0,
            ..Config::default()
        };
        let mut a = Federation::new(sample::key(1), cfg, 1, NOW)
            .expect("cfg")
            .with_registry(Registry::new(10));
        let name = AgentName::new("x").expect("name");
        let agent = AgentId::new(a.node_id(), name.clone());
        a.advertise_until(sample::vcv(&sample::key(1), "x", 1, NOW), NOW + 6_000, NOW)
            .expect("adv");
        let e = a.registry().get(&agent).expect("held");
        assert_eq!(
            e.vcv.expires_at_ms,
            NOW + 6_000,
            "the agent's own end, not the TTL"
        );
        assert!(a.is_local(&name));
        a.drain().for_each(drop);
        let mut t = NOW;
        let mut issues = 0;
        while t < NOW + 12_000 {
            t += 500;
            a.tick(t);
            issues += published(&a.drain().collect::<Vec<_>>()).len();
        }
        assert_eq!(issues, 1, "re-issued once, within its lifetime");
        assert!(!a.is_local(&name), "no longer hosted after its end");
        assert!(a.registry().is_empty(), "expired");
        assert!(matches!(
            a.advertise_until(sample::vcv(&sample::key(1), "x", 1, NOW), t, t),
            Err(FederationError::Rejected(Rejection::Expired { .. }))
        ));
    }

    #[test]
    fn task_messages_bypass_the_seen_cache() {
        let mut b = fed(2);
        let a = sample::key(1);
        let hb = envelope::seal(
            &a,
            NOW,
            &Message::Heartbeat {
                seq: 1,
                load: vec![],
            },
        )
        .expect("seal");
        for _ in 0..2 {
            b.receive(a.node_id(), Via::Direct, hb.as_slice().into(), NOW);
            assert!(matches!(
                b.drain().collect::<Vec<_>>().as_slice(),
                [OutEvent::Unhandled { .. }]
            ));
        }
    }

    #[test]
    fn sync_pages_stay_under_the_envelope_limit() {
        // Worst case: 64-byte names and 10-byte versions.
        let key = sample::key(1);
        let entries: Vec<DigestEntry> = (0..5000u32)
            .map(|i| DigestEntry {
                agent: AgentId::new(
                    key.node_id(),
                    AgentName::new(format!("{i:0>64}")).expect("name"),
                ),
                version: u64::MAX - u64::from(i),
            })
            .collect();
        let pages = paginate(entries, digest_entry_bytes);
        assert!(pages.len() > 1);
        for p in pages {
            let bytes =
                envelope::seal(&key, NOW, &Message::SyncDigest { entries: p }).expect("page fits");
            assert!(bytes.len() <= MAX_ENVELOPE_BYTES);
        }
        // Typical: 8-byte names and time-based versions.
        let typical: Vec<DigestEntry> = (0..5000u32)
            .map(|i| DigestEntry {
                agent: AgentId::new(
                    key.node_id(),
                    AgentName::new(format!("agent{i:03}")).expect("name"),
                ),
                version: NOW,
            })
            .collect();
        let pages = paginate(typical, digest_entry_bytes);
        let first = pages[0].len();
        let bytes = envelope::seal(
            &key,
            NOW,
            &Message::SyncDigest {
                entries: pages[0].clone(),
            },
        )
        .expect("fits");
        assert!(bytes.len() <= MAX_ENVELOPE_BYTES && bytes.len() > MAX_ENVELOPE_BYTES - 64);
        assert!((1000..=MAX_SYNC_ENTRIES).contains(&first), "{first}");
    }

    #[test]
    fn sync_over_gossip_and_spoofed_sync_are_rejected() {
        let mut a = fed(1);
        let mut b = fed(2);
        a.advertise(sample::vcv(&sample::key(1), "x", 1, NOW), NOW)
            .expect("adv");
        a.drain().for_each(drop);
        let mut page = |t| {
            a.peer_up(b.node_id(), t);
            a.drain()
                .find_map(|o| match o {
                    OutEvent::Send { bytes, .. } => Some(bytes),
                    _ => None,
                })
                .expect("page")
        };
        let (p1, p2) = (page(NOW), page(NOW + 1));
        let c = sample::key(3).node_id();
        b.peer_up(c, NOW);
        b.receive(c, Via::Gossip, p1, NOW);
        b.receive(c, Via::Direct, p2, NOW);
        let s = b.peer_stats(&c).expect("tracked");
        assert_eq!(s.rejected("malformed"), 1);
        assert_eq!(s.rejected("host_mismatch"), 1);
    }

    #[test]
    fn bounds_hold() {
        let cfg = Config {
            max_local_agents: 1,
            max_peers: 1,
            seen_capacity: 2,
            ..Config::default()
        };
        let mut a = Federation::new(sample::key(1), cfg, 1, NOW).expect("cfg");
        a.advertise(sample::vcv(&sample::key(1), "x", 1, NOW), NOW)
            .expect("adv");
        assert_eq!(
            a.advertise(sample::vcv(&sample::key(1), "y", 1, NOW), NOW),
            Err(FederationError::TooManyLocal(1))
        );
        a.peer_up(sample::key(2).node_id(), NOW);
        a.peer_up(sample::key(3).node_id(), NOW);
        assert_eq!(a.peers().count(), 1);
        assert_eq!(a.stats().peers_refused, 1);
        for i in 0..10u8 {
            a.seen.insert([i; 32]);
        }
        assert_eq!(a.seen.set.len(), 2);
        assert_eq!(a.seen.order.len(), 2);
        assert_eq!(
            Config {
                readvertise_interval_ms: 10,
                vcv_ttl_ms: 10,
                ..Config::default()
            }
            .validate(),
            Err(ConfigError::ReadvertiseTooSlow)
        );
    }
}
