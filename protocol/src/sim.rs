//! A deterministic discrete-event simulator over many [`Federation`]s.
//!
//! One seed fixes everything: the mesh (a random regular graph of degree `degree`, built from a
//! ring lattice by degree-preserving edge swaps), per-link latencies, losses, timer phases,
//! churn and the forger's choices. Time is virtual (ms, starting at [`T0_MS`]); the event queue
//! orders by (time, sequence number), so the same [`Scenario`] always yields the same
//! [`Report`].
//!
//! Invariant checkers run every `check_interval_ms` and at the end:
//!
//! * **convergence**: every live honest node (up for at least `settle_ms`) holds every agent of
//!   every live honest owner at a version no older than the newest one issued `settle_ms` ago;
//! * **expiry**: no node holds a VCV more than one tick past its expiry (so the agents of a node
//!   that left are gone everywhere one TTL after its last re-issue);
//! * **withdrawal**: no node holds an agent withdrawn more than `settle_ms` ago;
//! * **authenticity**: every entry anywhere was sealed by its honest owner, and nothing the
//!   forger sent was ever accepted;
//! * **size**: no message sent exceeds [`MAX_ENVELOPE_BYTES`].
//!
//! Signatures are real. Each distinct envelope is verified once per run through a cache shared
//! by all simulated nodes ([`SharedVerify`]); every node still decodes and validates (time,
//! versions, host) on its own.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::rc::Rc;

use crate::envelope::{self, ContentId, Envelope};
use crate::error::Rejection;
use crate::gossip::{
    Bytes, Config, DropReason, Event, Federation, OutEvent, SplitMix64, Verify, Via,
};
use crate::keys::{AgentId, AgentName, NodeId, NodeKey};
use crate::limits::{MAX_CLOCK_SKEW_MS, MAX_ENVELOPE_BYTES};
use crate::message::Message;
use crate::vcv::{Resources, Vcv};

/// Virtual time zero of every simulation, ms since the Unix epoch.
pub const T0_MS: u64 = 1_790_000_000_000;
/// Most violation descriptions kept in a report (all are counted).
pub const MAX_VIOLATION_SAMPLES: usize = 20;
/// Most entries in the shared verification cache before it is cleared.
pub const MAX_VERIFY_CACHE: usize = 1 << 20;
/// Most genuine old envelopes the forger keeps for replays.
const MAX_REPLAY_POOL: usize = 256;

/// What happens to a node at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChurnKind {
    /// The node leaves (crashes): its state is lost; its agents expire elsewhere.
    Leave,
    /// The node (re)joins with an empty registry and re-advertises its agents.
    Join,
}

/// One churn event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Churn {
    /// When, ms after start.
    pub at_ms: u64,
    /// Which node (index).
    pub node: usize,
    /// What.
    pub kind: ChurnKind,
}

/// One withdrawal of an agent by its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Withdrawal {
    /// When, ms after start.
    pub at_ms: u64,
    /// The owner (index).
    pub node: usize,
    /// The agent (index on that node).
    pub agent: usize,
}

/// A malicious extra node wired into the mesh that sends forged advertisements (bad
/// signatures), advertisements and withdrawals for other nodes' agents signed with its own key,
/// and replays of superseded genuine advertisements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forger {
    /// Honest neighbours.
    pub degree: usize,
    /// First forgery, ms after start.
    pub start_ms: u64,
    /// Time between forgeries, ms.
    pub interval_ms: u64,
}

/// A simulation: plain data.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    /// Name, for reports.
    pub name: String,
    /// Honest nodes.
    pub nodes: usize,
    /// Agents hosted by each node.
    pub agents_per_node: usize,
    /// Mesh degree D.
    pub degree: usize,
    /// Per-link latency, drawn once per link uniformly in `[min, max]` ms.
    pub latency_ms: (u64, u64),
    /// Probability that a message is lost, in parts per million.
    pub loss_ppm: u32,
    /// The seed.
    pub seed: u64,
    /// Simulated time, ms.
    pub duration_ms: u64,
    /// Timer period of every node, ms.
    pub tick_ms: u64,
    /// Initial advertisements are spread uniformly over this window, ms.
    pub advertise_window_ms: u64,
    /// How long after an issue (or a join) the convergence invariant applies, ms.
    pub settle_ms: u64,
    /// Invariants are checked this often (0 = only at the end), ms.
    pub check_interval_ms: u64,
    /// How long past its expiry a VCV may linger before the expiry invariant fails, ms
    /// (nodes expire on their timer, so one tick).
    pub expiry_grace_ms: u64,
    /// The nodes' gossip configuration.
    pub config: Config,
    /// Churn.
    pub churn: Vec<Churn>,
    /// Withdrawals.
    pub withdrawals: Vec<Withdrawal>,
    /// The forger, if any.
    pub forger: Option<Forger>,
}

impl Scenario {
    /// A base scenario: `nodes` × `agents_per_node`, D = 6, 1–20 ms links, no loss, no churn.
    pub fn base(name: &str, nodes: usize, agents_per_node: usize, seed: u64) -> Self {
        Self {
            name: name.into(),
            nodes,
            agents_per_node,
            degree: 6,
            latency_ms: (1, 20),
            loss_ppm: 0,
            seed,
            duration_ms: 30_000,
            tick_ms: 1_000,
            advertise_window_ms: 1_000,
            settle_ms: 5_000,
            check_interval_ms: 10_000,
            expiry_grace_ms: 1_000,
            config: Config {
                max_agents: (nodes * agents_per_node * 2).max(16),
                vcv_ttl_ms: 60_000,
                readvertise_interval_ms: 20_000,
                anti_entropy_interval_ms: 10_000,
                ..Config::default()
            },
            churn: Vec::new(),
            withdrawals: Vec::new(),
            forger: None,
        }
    }

    /// Churn, withdrawals, 1 % loss and a forger over `duration_ms` (≥ 2 TTLs so that expiry is
    /// exercised): node 1 leaves for good, node 2 leaves and comes back, node 3 restarts, node 4
    /// withdraws an agent.
    pub fn eventful(name: &str, nodes: usize, agents_per_node: usize, seed: u64) -> Self {
        let mut s = Self::base(name, nodes, agents_per_node, seed);
        s.duration_ms = 150_000;
        s.loss_ppm = 10_000;
        s.settle_ms = 25_000;
        s.churn = vec![
            Churn {
                at_ms: 10_000,
                node: 1,
                kind: ChurnKind::Leave,
            },
            Churn {
                at_ms: 20_000,
                node: 2,
                kind: ChurnKind::Leave,
            },
            Churn {
                at_ms: 45_000,
                node: 2,
                kind: ChurnKind::Join,
            },
            Churn {
                at_ms: 30_000,
                node: 3,
                kind: ChurnKind::Leave,
            },
            Churn {
                at_ms: 30_000,
                node: 3,
                kind: ChurnKind::Join,
            },
        ];
        s.withdrawals = vec![Withdrawal {
            at_ms: 15_000,
            node: 4,
            agent: 0,
        }];
        s.forger = Some(Forger {
            degree: 4,
            start_ms: 2_000,
            interval_ms: 500,
        });
        s
    }

    /// 20 nodes × 5 agents, [`Scenario::eventful`].
    pub fn small(seed: u64) -> Self {
        Self::eventful("20 nodes", 20, 5, seed)
    }

    /// 100 nodes × 5 agents, [`Scenario::eventful`].
    pub fn medium(seed: u64) -> Self {
        Self::eventful("100 nodes", 100, 5, seed)
    }

    /// 1000 nodes × `agents_per_node` over 20 s: the initial flood, 10 nodes leaving at 5 s and
    /// 5 joining at 10 s, a forger; no re-advertisement falls inside the run.
    pub fn large(agents_per_node: usize, seed: u64) -> Self {
        let mut s = Self::base("1000 nodes", 1000, agents_per_node, seed);
        s.duration_ms = 20_000;
        s.check_interval_ms = 0;
        s.config.readvertise_interval_ms = 40_000;
        s.churn = (0..10)
            .map(|i| Churn {
                at_ms: 5_000,
                node: 10 + i * 97,
                kind: ChurnKind::Leave,
            })
            .chain((0..5).map(|i| Churn {
                at_ms: 10_000,
                node: 10 + i * 97,
                kind: ChurnKind::Join,
            }))
            .collect();
        s.forger = Some(Forger {
            degree: 6,
            start_ms: 2_000,
            interval_ms: 250,
        });
        s
    }

    /// The same scenario with eager push off: anti-entropy alone (the baseline), every
    /// `anti_entropy_ms`.
    pub fn anti_entropy_only(mut self, anti_entropy_ms: u64) -> Self {
        self.name = format!("{} (anti-entropy only)", self.name);
        self.config.eager_push = false;
        self.config.anti_entropy_interval_ms = anti_entropy_ms;
        self
    }
}

/// What a run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Honest nodes.
    pub nodes: usize,
    /// Agents per node.
    pub agents_per_node: usize,
    /// Eager push on.
    pub eager_push: bool,
    /// Advertisements issued by honest owners (first issues and re-issues).
    pub adverts: u64,
    /// Of those, how many reached every honest node that was up when it was issued.
    pub adverts_converged: u64,
    /// Time for an advertisement to reach all nodes: median, ms.
    pub convergence_p50_ms: u64,
    /// 99th percentile, ms.
    pub convergence_p99_ms: u64,
    /// Maximum, ms.
    pub convergence_max_ms: u64,
    /// Messages sent (gossip and direct, all kinds).
    pub messages: u64,
    /// Gossip messages (publish and forward).
    pub gossip_messages: u64,
    /// Direct messages (digests, requests, replies).
    pub direct_messages: u64,
    /// Messages lost by the network.
    pub lost_messages: u64,
    /// Messages sent per honest node.
    pub messages_per_node: f64,
    /// Bytes sent per honest node.
    pub bytes_per_node: f64,
    /// Mean relative message redundancy over converged advertisements: `m / (n − 1) − 1`,
    /// where `m` counts the messages carrying it and `n` the nodes it reached.
    pub rmr: f64,
    /// Duplicates dropped by seen-caches.
    pub duplicates: u64,
    /// Rejections by label, all honest nodes, all peers.
    pub rejections: BTreeMap<&'static str, u64>,
    /// Messages the forger sent.
    pub forged_sent: u64,
    /// Forger messages accepted by an honest node (must be 0).
    pub forged_accepted: u64,
    /// What honest nodes did with the forger's messages: rejection labels, `duplicate`, and
    /// `accepted_genuine_replay` (a replayed owner-signed advertisement the node lacked: correct).
    pub forger_outcomes: BTreeMap<&'static str, u64>,
    /// Invariant checks run.
    pub checks: u64,
    /// Invariant violations found (must be 0).
    pub violations: u64,
    /// The first few violations.
    pub violation_samples: Vec<String>,
    /// Signature verifications actually performed (cache misses).
    pub verifications: u64,
    /// Events processed.
    pub events: u64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{}: {} nodes x {} agents, eager push {}",
            self.scenario, self.nodes, self.agents_per_node, self.eager_push
        )?;
        writeln!(
            f,
            "  convergence: {}/{} adverts reached all nodes; p50 {} ms, p99 {} ms, max {} ms",
            self.adverts_converged,
            self.adverts,
            self.convergence_p50_ms,
            self.convergence_p99_ms,
            self.convergence_max_ms
        )?;
        writeln!(
            f,
            "  messages: {} ({} gossip, {} direct, {} lost); {:.1} per node, {:.1} KiB per node; RMR {:.2}; duplicates {}",
            self.messages,
            self.gossip_messages,
            self.direct_messages,
            self.lost_messages,
            self.messages_per_node,
            self.bytes_per_node / 1024.0,
            self.rmr,
            self.duplicates
        )?;
        writeln!(f, "  rejections: {:?}", self.rejections)?;
        writeln!(
            f,
            "  forger: sent {}, forged accepted {}, outcomes {:?}",
            self.forged_sent, self.forged_accepted, self.forger_outcomes
        )?;
        writeln!(
            f,
            "  invariants: {} checks, {} violations {:?}",
            self.checks, self.violations, self.violation_samples
        )?;
        write!(
            f,
            "  work: {} events, {} signature verifications",
            self.events, self.verifications
        )
    }
}

// ---- shared verification cache ----------------------------------------------------------

#[derive(Debug, Default)]
struct VerifyCache {
    map: HashMap<[u8; 32], Result<Envelope, Rejection>>,
    misses: u64,
}

/// An envelope opener shared by all simulated nodes: each distinct envelope (by blake3 of all
/// its bytes) is opened once; later opens repeat only the time checks of [`envelope::open`].
#[derive(Clone, Debug, Default)]
pub struct SharedVerify(Rc<RefCell<VerifyCache>>);

impl SharedVerify {
    /// Signature verifications performed so far.
    pub fn verifications(&self) -> u64 {
        self.0.borrow().misses
    }
}

fn time_checks(env: &Envelope, now_ms: u64) -> Result<(), Rejection> {
    if env.sent_at_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(Rejection::IssuedInFuture {
            issued_at_ms: env.sent_at_ms,
            now_ms,
        });
    }
    match &env.message {
        Message::Advertise(vcv) => vcv.validate_time(now_ms),
        Message::Task(task) | Message::Offer { task, .. } if task.deadline_ms <= now_ms => {
            Err(Rejection::Expired {
                expires_at_ms: task.deadline_ms,
                now_ms,
            })
        }
        _ => Ok(()),
    }
}

impl Verify for SharedVerify {
    fn open(&mut self, bytes: &[u8], now_ms: u64) -> Result<Envelope, Rejection> {
        let key = *blake3::hash(bytes).as_bytes();
        let mut cache = self.0.borrow_mut();
        if let Some(hit) = cache.map.get(&key) {
            return match hit {
                Ok(env) => time_checks(env, now_ms).map(|()| env.clone()),
                Err(r) => Err(r.clone()),
            };
        }
        cache.misses += 1;
        let result = envelope::open(bytes, now_ms);
        let keep = match &result {
            Ok(env) => matches!(
                env.message,
                Message::Advertise(_) | Message::Withdraw { .. }
            ),
            Err(r) => matches!(r, Rejection::BadSignature | Rejection::HostMismatch),
        };
        if keep {
            if cache.map.len() >= MAX_VERIFY_CACHE {
                cache.map.clear();
            }
            cache.map.insert(key, result.clone());
        }
        result
    }
}

// ---- the simulator ----------------------------------------------------------------------

#[derive(Debug)]
enum Action {
    Deliver {
        to: u32,
        from: u32,
        via: Via,
        bytes: Bytes,
    },
    Tick {
        node: u32,
        epoch: u32,
    },
    Advertise {
        node: u32,
        agent: u32,
        epoch: u32,
    },
    Withdraw(usize),
    Churn(usize),
    Forge,
    Check,
}

#[derive(Debug)]
struct Queued {
    at: u64,
    seq: u64,
    action: Action,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: reverse for earliest first.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Debug)]
struct SimNode {
    key: NodeKey,
    id: NodeId,
    fed: Option<Federation<SharedVerify>>,
    honest: bool,
    up_since_ms: u64,
    epoch: u32,
    agents: Vec<Vcv>,
    withdrawn: Vec<bool>,
}

#[derive(Debug)]
struct AdvertStat {
    issued_ms: u64,
    target: u32,
    reached: u32,
    messages: u64,
    done_ms: Option<u64>,
}

/// The simulator. Build with [`Sim::new`], run with [`Sim::run`].
#[derive(Debug)]
pub struct Sim {
    sc: Scenario,
    now: u64,
    seq: u64,
    rng: SplitMix64,
    verify: SharedVerify,
    nodes: Vec<SimNode>,
    adj: Vec<Vec<(u32, u64)>>,
    index: HashMap<NodeId, u32>,
    queue: BinaryHeap<Queued>,
    adverts: Vec<AdvertStat>,
    advert_ids: HashMap<ContentId, u32>,
    honest_ids: HashSet<ContentId>,
    versions: HashMap<AgentId, Vec<(u64, u64)>>,
    withdrawn_at: HashMap<AgentId, u64>,
    replay_pool: Vec<Bytes>,
    forger: Option<u32>,
    forge_round: u64,
    report: Report,
    bytes_sent: u64,
    outs: Vec<OutEvent>,
}

/// A small valid VCV (8-d embedding, no examples): the simulator keeps a million of them.
pub fn sim_vcv(key: &NodeKey, name: &str) -> Vcv {
    let node = key.node_id();
    let seed = u64::from_le_bytes([
        node.0[0], node.0[1], node.0[2], node.0[3], node.0[4], node.0[5], node.0[6], node.0[7],
    ]);
    let mut v = Vcv {
        agent: AgentId::new(
            node,
            AgentName::new(name).unwrap_or_else(|_| unreachable!("sim names are valid")),
        ),
        version: 1,
        issued_at_ms: T0_MS,
        expires_at_ms: T0_MS + 1,
        description: String::new(),
        examples: Vec::new(),
        capability: crate::sample::embedding(seed ^ name.len() as u64, 8),
        skills: vec!["sim".into()],
        skill_bloom: Default::default(),
        resources: Resources {
            capacity: 1,
            ..Resources::default()
        },
        policies: Vec::new(),
        spec: None,
        example_vectors: Vec::new(),
    };
    v.normalise();
    v
}

fn node_key(seed: u64, i: usize) -> NodeKey {
    let mut r = SplitMix64::new(seed ^ 0xF00D_0000_0000_0000 ^ (i as u64).wrapping_mul(0x9E37));
    let mut b = [0u8; 32];
    for chunk in b.chunks_mut(8) {
        chunk.copy_from_slice(&r.next_u64().to_le_bytes());
    }
    NodeKey::from_secret_bytes(b)
}

/// A random `degree`-regular graph on `n` nodes (ring lattice, then degree-preserving swaps).
pub fn random_regular_graph(n: usize, degree: usize, rng: &mut SplitMix64) -> Vec<Vec<u32>> {
    let d = degree.min(n.saturating_sub(1)) / 2 * 2;
    let mut adj: Vec<Vec<u32>> = vec![Vec::with_capacity(d); n];
    let mut edges: Vec<(u32, u32)> = Vec::with_capacity(n * d / 2);
    for i in 0..n {
        for k in 1..=d / 2 {
            let j = (i + k) % n;
            adj[i].push(j as u32);
            adj[j].push(i as u32);
            edges.push((i as u32, j as u32));
        }
    }
    let swaps = edges.len() * 10;
    for _ in 0..swaps {
        if edges.len() < 2 {
            break;
        }
        let x = rng.below(edges.len() as u64) as usize;
        let y = rng.below(edges.len() as u64) as usize;
        let (a, b) = edges[x];
        let (c, e) = edges[y];
        if x == y || a == c || a == e || b == c || b == e {
            continue;
        }
        if adj[a as usize].contains(&e) || adj[c as usize].contains(&b) {
            continue;
        }
        // (a,b),(c,e) -> (a,e),(c,b)
        for (u, old, new) in [(a, b, e), (b, a, c), (c, e, b), (e, c, a)] {
            if let Some(slot) = adj[u as usize].iter_mut().find(|v| **v == old) {
                *slot = new;
            }
        }
        edges[x] = (a, e);
        edges[y] = (c, b);
    }
    adj
}

fn connected(adj: &[Vec<u32>]) -> bool {
    if adj.is_empty() {
        return true;
    }
    let mut seen = vec![false; adj.len()];
    let mut stack = vec![0usize];
    seen[0] = true;
    while let Some(u) = stack.pop() {
        for &v in &adj[u] {
            if !seen[v as usize] {
                seen[v as usize] = true;
                stack.push(v as usize);
            }
        }
    }
    seen.iter().all(|s| *s)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

impl Sim {
    /// Builds the mesh and schedules the scenario.
    pub fn new(sc: Scenario) -> Self {
        let mut rng = SplitMix64::new(sc.seed);
        let n = sc.nodes;
        let mut graph = random_regular_graph(n, sc.degree, &mut rng);
        let mesh_connected = connected(&graph);
        let mut nodes: Vec<SimNode> = (0..n)
            .map(|i| {
                let key = node_key(sc.seed, i);
                let agents = (0..sc.agents_per_node)
                    .map(|a| sim_vcv(&key, &format!("agent{a}")))
                    .collect();
                SimNode {
                    id: key.node_id(),
                    key,
                    fed: None,
                    honest: true,
                    up_since_ms: T0_MS,
                    epoch: 0,
                    agents,
                    withdrawn: vec![false; sc.agents_per_node],
                }
            })
            .collect();
        let mut forger = None;
        if let Some(f) = sc.forger {
            let fi = n as u32;
            graph.push(Vec::new());
            for _ in 0..f.degree.min(n) {
                let mut v = rng.below(n as u64) as u32;
                while graph[fi as usize].contains(&v) {
                    v = (v + 1) % n as u32;
                }
                graph[fi as usize].push(v);
                graph[v as usize].push(fi);
            }
            let key = node_key(sc.seed, usize::MAX);
            nodes.push(SimNode {
                id: key.node_id(),
                key,
                fed: None,
                honest: false,
                up_since_ms: T0_MS,
                epoch: 0,
                agents: Vec::new(),
                withdrawn: Vec::new(),
            });
            forger = Some(fi);
        }
        let (lo, hi) = sc.latency_ms;
        let mut adj: Vec<Vec<(u32, u64)>> = vec![Vec::new(); graph.len()];
        for (u, vs) in graph.iter().enumerate() {
            for &v in vs {
                if (v as usize) < u {
                    continue;
                }
                let lat = lo + rng.below(hi.saturating_sub(lo) + 1);
                adj[u].push((v, lat));
                adj[v as usize].push((u as u32, lat));
            }
        }
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, nd)| (nd.id, i as u32))
            .collect();
        let report = Report {
            scenario: sc.name.clone(),
            nodes: n,
            agents_per_node: sc.agents_per_node,
            eager_push: sc.config.eager_push,
            adverts: 0,
            adverts_converged: 0,
            convergence_p50_ms: 0,
            convergence_p99_ms: 0,
            convergence_max_ms: 0,
            messages: 0,
            gossip_messages: 0,
            direct_messages: 0,
            lost_messages: 0,
            messages_per_node: 0.0,
            bytes_per_node: 0.0,
            rmr: 0.0,
            duplicates: 0,
            rejections: BTreeMap::new(),
            forged_sent: 0,
            forged_accepted: 0,
            forger_outcomes: BTreeMap::new(),
            checks: 0,
            violations: 0,
            violation_samples: Vec::new(),
            verifications: 0,
            events: 0,
        };
        let mut sim = Self {
            now: T0_MS,
            seq: 0,
            verify: SharedVerify::default(),
            nodes,
            adj,
            index,
            queue: BinaryHeap::new(),
            adverts: Vec::new(),
            advert_ids: HashMap::new(),
            honest_ids: HashSet::new(),
            versions: HashMap::new(),
            withdrawn_at: HashMap::new(),
            replay_pool: Vec::new(),
            forger,
            forge_round: 0,
            report,
            bytes_sent: 0,
            outs: Vec::new(),
            rng,
            sc,
        };
        if !mesh_connected {
            sim.violation("the mesh is not connected".into());
        }
        for i in 0..n {
            sim.start_node(i, false);
        }
        for i in 0..sim.sc.churn.len() {
            let at = sim.sc.churn[i].at_ms;
            sim.schedule(T0_MS + at, Action::Churn(i));
        }
        for i in 0..sim.sc.withdrawals.len() {
            let at = sim.sc.withdrawals[i].at_ms;
            sim.schedule(T0_MS + at, Action::Withdraw(i));
        }
        if let Some(f) = sim.sc.forger {
            sim.schedule(T0_MS + f.start_ms, Action::Forge);
        }
        if sim.sc.check_interval_ms > 0 {
            sim.schedule(T0_MS + sim.sc.check_interval_ms, Action::Check);
        }
        sim
    }

    fn schedule(&mut self, at: u64, action: Action) {
        self.seq += 1;
        self.queue.push(Queued {
            at,
            seq: self.seq,
            action,
        });
    }

    /// Creates node `i`'s state machine, connects it to its live neighbours and schedules its
    /// advertisements and timer.
    fn start_node(&mut self, i: usize, rejoin: bool) {
        let seed = self.rng.next_u64();
        let fed = match Federation::with_verifier(
            self.nodes[i].key.clone(),
            self.sc.config.clone(),
            seed,
            self.now,
            self.verify.clone(),
        ) {
            Ok(f) => f,
            Err(e) => {
                self.violation(format!("invalid config: {e}"));
                return;
            }
        };
        let node = &mut self.nodes[i];
        node.fed = Some(fed);
        node.epoch += 1;
        node.up_since_ms = self.now;
        let epoch = node.epoch;
        if rejoin {
            let me = self.nodes[i].id;
            let neighbours: Vec<u32> = self.adj[i].iter().map(|&(v, _)| v).collect();
            for v in neighbours {
                let vid = self.nodes[v as usize].id;
                if let Some(f) = self.nodes[v as usize].fed.as_mut() {
                    f.peer_up(me, self.now);
                    self.flush(v);
                    if let Some(f) = self.nodes[i].fed.as_mut() {
                        f.peer_up(vid, self.now);
                    }
                    self.flush(i as u32);
                }
            }
        } else {
            // Everyone starts together: peers are up before anything is advertised.
            let ids: Vec<NodeId> = self.adj[i]
                .iter()
                .map(|&(v, _)| self.nodes[v as usize].id)
                .collect();
            if let Some(f) = self.nodes[i].fed.as_mut() {
                for id in ids {
                    f.peer_up(id, self.now);
                }
            }
            self.flush(i as u32);
        }
        let window = self.sc.advertise_window_ms.max(1);
        for a in 0..self.sc.agents_per_node {
            if self.nodes[i].withdrawn[a] {
                continue;
            }
            let at = self.now + self.rng.below(window);
            self.schedule(
                at,
                Action::Advertise {
                    node: i as u32,
                    agent: a as u32,
                    epoch,
                },
            );
        }
        let phase = self.rng.below(self.sc.tick_ms.max(1));
        self.schedule(
            self.now + phase,
            Action::Tick {
                node: i as u32,
                epoch,
            },
        );
    }

    /// Runs to the end and returns the report.
    pub fn run(mut self) -> Report {
        let end = T0_MS + self.sc.duration_ms;
        while let Some(q) = self.queue.pop() {
            if q.at > end {
                break;
            }
            self.now = q.at;
            self.report.events += 1;
            self.step(q.action);
        }
        self.now = end;
        self.check();
        self.finish()
    }

    fn step(&mut self, action: Action) {
        match action {
            Action::Deliver {
                to,
                from,
                via,
                bytes,
            } => {
                let from_id = self.nodes[from as usize].id;
                let Some(f) = self.nodes[to as usize].fed.as_mut() else {
                    return;
                };
                let genuine = Some(from) == self.forger
                    && envelope::content_id(&bytes).is_some_and(|id| self.honest_ids.contains(&id));
                f.receive(from_id, via, bytes, self.now);
                let mut outs = std::mem::take(&mut self.outs);
                outs.extend(f.drain());
                if Some(from) == self.forger {
                    self.forger_outcome(to, genuine, &outs);
                }
                self.apply(to, outs);
            }
            Action::Tick { node, epoch } => {
                if self.nodes[node as usize].epoch != epoch {
                    return;
                }
                if let Some(f) = self.nodes[node as usize].fed.as_mut() {
                    f.tick(self.now);
                    self.flush(node);
                    self.schedule(self.now + self.sc.tick_ms, Action::Tick { node, epoch });
                }
            }
            Action::Advertise { node, agent, epoch } => {
                let nd = &mut self.nodes[node as usize];
                if nd.epoch != epoch || nd.withdrawn[agent as usize] {
                    return;
                }
                let vcv = nd.agents[agent as usize].clone();
                if let Some(f) = nd.fed.as_mut() {
                    if let Err(e) = f.advertise(vcv, self.now) {
                        self.violation(format!("node {node} could not advertise: {e}"));
                    }
                    self.flush(node);
                }
            }
            Action::Withdraw(i) => {
                let w = self.sc.withdrawals[i];
                let Some(nd) = self.nodes.get_mut(w.node) else {
                    return;
                };
                let Some(vcv) = nd.agents.get(w.agent) else {
                    return;
                };
                let name = vcv.agent.name.clone();
                nd.withdrawn[w.agent] = true;
                if let Some(f) = nd.fed.as_mut() {
                    if let Err(e) = f.withdraw(&name, self.now) {
                        self.violation(format!("node {} could not withdraw: {e}", w.node));
                    }
                    self.flush(w.node as u32);
                }
            }
            Action::Churn(i) => {
                let c = self.sc.churn[i];
                if c.node >= self.sc.nodes {
                    return;
                }
                match c.kind {
                    ChurnKind::Leave => {
                        let nd = &mut self.nodes[c.node];
                        if nd.fed.take().is_none() {
                            return;
                        }
                        nd.epoch += 1;
                        let me = nd.id;
                        let neighbours: Vec<u32> =
                            self.adj[c.node].iter().map(|&(v, _)| v).collect();
                        for v in neighbours {
                            if let Some(f) = self.nodes[v as usize].fed.as_mut() {
                                f.peer_down(&me);
                                self.flush(v);
                            }
                        }
                    }
                    ChurnKind::Join => {
                        if self.nodes[c.node].fed.is_none() {
                            self.start_node(c.node, true);
                        }
                    }
                }
            }
            Action::Forge => self.forge(),
            Action::Check => {
                self.check();
                self.schedule(self.now + self.sc.check_interval_ms, Action::Check);
            }
        }
    }

    /// Classifies what an honest node did with a forger message. Accepting a *genuine* replay
    /// (an owner-signed advertisement the node lacked) is correct and counted apart; accepting
    /// anything else is a violation.
    fn forger_outcome(&mut self, to: u32, genuine: bool, outs: &[OutEvent]) {
        let accepted = outs
            .iter()
            .any(|o| matches!(o, OutEvent::Forward { .. } | OutEvent::Event(_)));
        let label = if accepted && genuine {
            "accepted_genuine_replay"
        } else if accepted {
            self.report.forged_accepted += 1;
            self.violation(format!("node {to} accepted a forged message"));
            "accepted"
        } else {
            match outs.iter().find_map(|o| match o {
                OutEvent::Drop { reason, .. } => Some(reason),
                _ => None,
            }) {
                Some(DropReason::Duplicate) => "duplicate",
                Some(DropReason::NotKept) => "not_kept",
                Some(DropReason::Rejected(r)) => r.label(),
                None => "no_effect",
            }
        };
        *self.report.forger_outcomes.entry(label).or_insert(0) += 1;
    }

    /// Carries node `u`'s outputs into the network and the bookkeeping.
    fn flush(&mut self, u: u32) {
        let outs: Vec<OutEvent> = match self.nodes[u as usize].fed.as_mut() {
            Some(f) => f.drain().collect(),
            None => return,
        };
        self.apply(u, outs);
    }

    fn apply(&mut self, u: u32, mut outs: Vec<OutEvent>) {
        for o in outs.drain(..) {
            match o {
                OutEvent::Publish { id, bytes } => {
                    let adv = self.advert_ids.get(&id).copied();
                    for i in 0..self.adj[u as usize].len() {
                        let (v, lat) = self.adj[u as usize][i];
                        self.send(u, v, lat, Via::Gossip, bytes.clone(), adv);
                    }
                }
                OutEvent::Forward { from, id, bytes } => {
                    let adv = self.advert_ids.get(&id).copied();
                    let from = self.index.get(&from).copied();
                    for i in 0..self.adj[u as usize].len() {
                        let (v, lat) = self.adj[u as usize][i];
                        if Some(v) != from {
                            self.send(u, v, lat, Via::Gossip, bytes.clone(), adv);
                        }
                    }
                }
                OutEvent::Send { to, bytes } => {
                    let Some(&v) = self.index.get(&to) else {
                        continue;
                    };
                    let lat = self.adj[u as usize]
                        .iter()
                        .find(|(w, _)| *w == v)
                        .map_or(self.sc.latency_ms.1, |&(_, l)| l);
                    let adv = envelope::content_id(&bytes)
                        .and_then(|id| self.advert_ids.get(&id).copied());
                    self.send(u, v, lat, Via::Direct, bytes, adv);
                }
                OutEvent::Event(Event::Added { id, .. } | Event::Updated { id, .. }) => {
                    if let Some(&a) = self.advert_ids.get(&id) {
                        let st = &mut self.adverts[a as usize];
                        st.reached += 1;
                        if st.done_ms.is_none() && st.reached >= st.target {
                            st.done_ms = Some(self.now);
                        }
                    }
                }
                OutEvent::Event(Event::Removed { .. }) => {}
                OutEvent::Sealed {
                    id,
                    agent,
                    version,
                    withdrawn,
                    bytes,
                } => {
                    if !self.nodes[u as usize].honest {
                        continue;
                    }
                    self.honest_ids.insert(id);
                    if withdrawn {
                        self.withdrawn_at.insert(agent, self.now);
                        continue;
                    }
                    let target = self
                        .nodes
                        .iter()
                        .filter(|n| n.honest && n.fed.is_some())
                        .count() as u32;
                    self.advert_ids.insert(id, self.adverts.len() as u32);
                    self.adverts.push(AdvertStat {
                        issued_ms: self.now,
                        target,
                        reached: 1,
                        messages: 0,
                        done_ms: (target <= 1).then_some(self.now),
                    });
                    let vs = self.versions.entry(agent).or_default();
                    if vs.len() >= 4 {
                        vs.remove(0);
                    }
                    vs.push((version, self.now));
                    if self.replay_pool.len() < MAX_REPLAY_POOL {
                        self.replay_pool.push(bytes);
                    }
                }
                OutEvent::Drop { reason, .. } => match reason {
                    DropReason::Duplicate => self.report.duplicates += 1,
                    DropReason::NotKept => {
                        *self.report.rejections.entry("not_kept").or_insert(0) += 1
                    }
                    DropReason::Rejected(r) => {
                        *self.report.rejections.entry(r.label()).or_insert(0) += 1
                    }
                },
                OutEvent::Unhandled { .. } => {}
            }
        }
        self.outs = outs;
    }

    fn send(&mut self, u: u32, v: u32, lat: u64, via: Via, bytes: Bytes, advert: Option<u32>) {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            self.violation(format!("node {u} sent a {}-byte message", bytes.len()));
        }
        self.report.messages += 1;
        match via {
            Via::Gossip => self.report.gossip_messages += 1,
            Via::Direct => self.report.direct_messages += 1,
        }
        self.bytes_sent += bytes.len() as u64;
        if let Some(a) = advert {
            self.adverts[a as usize].messages += 1;
        }
        if self.sc.loss_ppm > 0 && self.rng.below(1_000_000) < u64::from(self.sc.loss_ppm) {
            self.report.lost_messages += 1;
            return;
        }
        self.schedule(
            self.now + lat,
            Action::Deliver {
                to: v,
                from: u,
                via,
                bytes,
            },
        );
    }

    fn forge(&mut self) {
        let Some(fi) = self.forger else { return };
        let Some(f) = self.sc.forger else { return };
        self.schedule(self.now + f.interval_ms.max(1), Action::Forge);
        let victim = self.rng.below(self.sc.nodes as u64) as usize;
        let Some(template) = self.nodes[victim].agents.first().cloned() else {
            return;
        };
        let mut vcv = template;
        vcv.version = self.now + 1_000_000;
        vcv.issued_at_ms = self.now;
        vcv.expires_at_ms = self.now + self.sc.config.vcv_ttl_ms;
        let forger_key = self.nodes[fi as usize].key.clone();
        let round = self.forge_round;
        self.forge_round += 1;
        let bytes: Option<Vec<u8>> = match round % 4 {
            // A newer "version" of the victim's agent under the victim's id, signature garbage.
            0 => {
                let mut raw = vec![envelope::ENVELOPE_VERSION];
                raw.extend_from_slice(self.nodes[victim].id.as_bytes());
                raw.extend_from_slice(&self.now.to_le_bytes());
                match postcard::to_allocvec(&Message::Advertise(vcv)) {
                    Ok(body) => raw.extend_from_slice(&body),
                    Err(_) => return,
                }
                for _ in 0..8 {
                    raw.extend_from_slice(&self.rng.next_u64().to_le_bytes());
                }
                Some(raw)
            }
            // The victim's agent, validly signed by the forger.
            1 => envelope::seal(&forger_key, self.now, &Message::Advertise(vcv)).ok(),
            // A replay of a genuine, superseded advertisement.
            2 => {
                let n = self.replay_pool.len() as u64;
                if n == 0 {
                    return;
                }
                let i = self.rng.below(n) as usize;
                Some(self.replay_pool[i].to_vec())
            }
            // A withdrawal of the victim's agent, signed by the forger.
            _ => envelope::seal(
                &forger_key,
                self.now,
                &Message::Withdraw {
                    agent: vcv.agent,
                    version: u64::MAX,
                },
            )
            .ok(),
        };
        let Some(bytes) = bytes else { return };
        let bytes: Bytes = bytes.into();
        for i in 0..self.adj[fi as usize].len() {
            let (v, lat) = self.adj[fi as usize][i];
            self.report.forged_sent += 1;
            self.send(fi, v, lat, Via::Gossip, bytes.clone(), None);
        }
    }

    fn violation(&mut self, what: String) {
        self.report.violations += 1;
        if self.report.violation_samples.len() < MAX_VIOLATION_SAMPLES {
            self.report
                .violation_samples
                .push(format!("t={} ms: {what}", self.now - T0_MS));
        }
    }

    /// Checks every invariant now; violations go into the report.
    fn check(&mut self) {
        self.report.checks += 1;
        let now = self.now;
        let settled = now.saturating_sub(self.sc.settle_ms);
        let mut found = Vec::new();
        // Every agent of every settled live honest owner, with the version required.
        let mut required: Vec<(&AgentId, u64)> = Vec::new();
        for nd in &self.nodes {
            if !nd.honest || nd.fed.is_none() || nd.up_since_ms > settled {
                continue;
            }
            for (a, vcv) in nd.agents.iter().enumerate() {
                if nd.withdrawn[a] {
                    continue;
                }
                let need = self.versions.get(&vcv.agent).and_then(|vs| {
                    vs.iter()
                        .rev()
                        .find(|(_, at)| *at >= nd.up_since_ms && *at <= settled)
                        .map(|(v, _)| *v)
                });
                if let Some(v) = need {
                    required.push((&vcv.agent, v));
                }
            }
        }
        for (i, nd) in self.nodes.iter().enumerate() {
            let Some(f) = nd.fed.as_ref() else { continue };
            if !nd.honest {
                continue;
            }
            let reg = f.registry();
            for e in reg.iter() {
                if e.vcv.expires_at_ms.saturating_add(self.sc.expiry_grace_ms) < now {
                    found.push(format!("node {i} holds expired {:?}", e.vcv.agent));
                }
                if !self.honest_ids.contains(&e.id) {
                    found.push(format!("node {i} holds forged {:?}", e.vcv.agent));
                }
                if self
                    .withdrawn_at
                    .get(&e.vcv.agent)
                    .is_some_and(|&t| t <= settled && e.vcv.issued_at_ms <= t)
                    && nd.up_since_ms <= settled
                {
                    found.push(format!("node {i} holds withdrawn {:?}", e.vcv.agent));
                }
            }
            if nd.up_since_ms > settled {
                continue;
            }
            for (agent, v) in &required {
                match reg.get(agent) {
                    Some(e) if e.vcv.version >= *v => {}
                    Some(e) => found.push(format!(
                        "node {i} holds {agent:?} v{} < required v{v}",
                        e.vcv.version
                    )),
                    None => found.push(format!("node {i} lacks {agent:?} v{v}")),
                }
            }
        }
        for f in found {
            self.violation(f);
        }
    }

    fn finish(mut self) -> Report {
        let mut times: Vec<u64> = Vec::new();
        let mut rmr_sum = 0.0;
        let mut rmr_n = 0u64;
        for a in &self.adverts {
            if let Some(done) = a.done_ms {
                times.push(done - a.issued_ms);
                let n = f64::from(a.reached.max(2));
                rmr_sum += a.messages as f64 / (n - 1.0) - 1.0;
                rmr_n += 1;
            }
        }
        times.sort_unstable();
        let r = &mut self.report;
        r.adverts = self.adverts.len() as u64;
        r.adverts_converged = times.len() as u64;
        r.convergence_p50_ms = percentile(&times, 0.50);
        r.convergence_p99_ms = percentile(&times, 0.99);
        r.convergence_max_ms = times.last().copied().unwrap_or(0);
        let n = self.sc.nodes.max(1) as f64;
        r.messages_per_node = r.messages as f64 / n;
        r.bytes_per_node = self.bytes_sent as f64 / n;
        r.rmr = if rmr_n > 0 {
            rmr_sum / rmr_n as f64
        } else {
            0.0
        };
        r.verifications = self.verify.verifications();
        self.report
    }
}

/// Runs `scenario` and returns its report.
pub fn run(scenario: Scenario) -> Report {
    Sim::new(scenario).run()
}
