//! The libp2p side of the node: one task owns the [`Swarm`] and talks to the node's event loop
//! through two bounded channels ([`Command`] in, [`Event`] out). Only this module (and the node
//! shell) knows libp2p.
//!
//! * Transport: TCP + noise + yamux, plus QUIC (`/udp/<port>/quic-v1`, TLS 1.3 built in) when
//!   `p2p.quic` is on (`/memory/N` for in-process tests). Identity = the node key, so a peer's
//!   `PeerId` is its `NodeId`.
//! * Gossipsub on [`REGISTRY_TOPIC`] (Advertise/Withdraw) and [`HEARTBEAT_TOPIC`] (Heartbeat):
//!   `ValidationMode::Strict`, manual validation (the node reports Accept/Reject/Ignore for every
//!   message), **message id = `blake3(data)`** (32 bytes; part of the protocol: identical payloads
//!   are duplicates), peer scoring on, mesh parameters that work with 2–3 nodes.
//! * Request-response on [`RR_PROTOCOL`]: the request is one sealed envelope, the response a list
//!   of sealed envelopes (length-prefixed), see [`EnvelopeCodec`].
//! * Kademlia in server mode; only identified peers that list the Kademlia protocol are added.
//! * Identify with pushed listen-address updates; ping; connection limits.
//! * Bootstrap peers are redialled with backoff whenever they are not connected.
//! * mDNS (`p2p.mdns`): peers found on the LAN are added to Kademlia and dialled, at most
//!   [`MAX_MDNS_PEERS`] of them at a time ([`MdnsPeers`]).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use fedmesh_config::Config;
use fedmesh_protocol::limits::MAX_ENVELOPE_BYTES;
use fedmesh_protocol::{Envelope, NodeId, NodeKey, Rejection};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::gossipsub::{self, MessageAcceptance, MessageId};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, connection_limits, identify, identity,
    kad, mdns, noise, ping, tcp, yamux,
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::metrics::{Kind, Metrics};

/// Gossip topic of capability advertisements and withdrawals.
pub const REGISTRY_TOPIC: &str = "fedmesh/v1/registry";
/// Gossip topic of load heartbeats.
pub const HEARTBEAT_TOPIC: &str = "fedmesh/v1/heartbeat";
/// The request-response protocol (offers, results, anti-entropy).
pub const RR_PROTOCOL: &str = "/fedmesh/rr/2";
/// The identify protocol version string.
pub const IDENTIFY_VERSION: &str = "/fedmesh/1";
/// Largest request-response answer (a list of envelopes), in bytes.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Capacity of the command and event channels.
const CHANNEL: usize = 1024;
/// Most inbound requests waiting for the node's answer.
const MAX_OPEN_REQUESTS: usize = 1024;
/// Longest wait between two dials of a bootstrap peer.
const MAX_REDIAL: Duration = Duration::from_secs(10);
/// How often Kademlia bootstraps (discovers peers beyond the bootstrap nodes).
const KAD_BOOTSTRAP_EVERY: Duration = Duration::from_secs(30);
/// Most peers found by mDNS that are acted on (dialled, added to Kademlia) at a time; more are
/// ignored (counted as `queue_dropped{kind="mdns_peers"}`) until one expires.
pub const MAX_MDNS_PEERS: usize = 64;
/// Most addresses kept per peer found by mDNS.
pub const MAX_MDNS_ADDRS: usize = 4;

/// From the node to the swarm.
#[derive(Debug)]
pub enum Command {
    /// Publish on a gossip topic.
    Publish {
        /// [`REGISTRY_TOPIC`] or [`HEARTBEAT_TOPIC`].
        topic: &'static str,
        /// A sealed envelope.
        data: Vec<u8>,
    },
    /// The node's verdict on a gossip message.
    Report {
        /// The message.
        msg_id: MessageId,
        /// Who forwarded it to us.
        from: PeerId,
        /// The verdict.
        acceptance: MessageAcceptance,
    },
    /// Send a request; the answer comes back as [`Event::Response`] with the same `tag`.
    Request {
        /// The peer.
        peer: PeerId,
        /// A sealed envelope.
        data: Vec<u8>,
        /// The node's correlation tag.
        tag: u64,
    },
    /// Answer an [`Event::Request`].
    Respond {
        /// The id of the request.
        id: u64,
        /// Sealed envelopes (possibly none: a bare acknowledgement).
        frames: Vec<Vec<u8>>,
    },
}

/// From the swarm to the node.
#[derive(Debug)]
pub enum Event {
    /// A gossip message waiting for validation.
    Gossip {
        /// Its id.
        msg_id: MessageId,
        /// Who forwarded it.
        from: PeerId,
        /// Its author (signed by libp2p in Strict mode).
        source: Option<PeerId>,
        /// The topic.
        topic: String,
        /// The payload (a sealed envelope, if well-behaved).
        data: Vec<u8>,
    },
    /// A request from a peer; answer with [`Command::Respond`].
    Request {
        /// The peer (authenticated by noise).
        peer: PeerId,
        /// The id to answer.
        id: u64,
        /// The payload.
        data: Vec<u8>,
    },
    /// The answer to [`Command::Request`].
    Response {
        /// The tag of the request.
        tag: u64,
        /// The envelopes, or why there are none.
        result: Result<Vec<Vec<u8>>, String>,
    },
    /// First connection to a peer.
    Connected(PeerId),
    /// Last connection to a peer closed.
    Disconnected(PeerId),
    /// A connected peer subscribed to [`REGISTRY_TOPIC`]: from now on gossip reaches it.
    /// Whatever this node advertised between the connection (whose anti-entropy digest was
    /// sent then) and this moment reached it by neither, so the node sends another digest.
    RegistrySubscribed(PeerId),
}

/// What `/status` shows about the mesh.
#[derive(Debug, Default, Clone)]
pub struct P2pInfo {
    /// Listen addresses (with `/p2p/<peer id>`).
    pub listen: Vec<String>,
    /// Connected peers.
    pub peers: Vec<String>,
}

/// The node's side of the swarm task.
#[derive(Debug, Clone)]
pub struct Handle {
    cmd: mpsc::Sender<Command>,
    metrics: Arc<Metrics>,
    /// Shared view for `/status`.
    pub info: Arc<Mutex<P2pInfo>>,
}

impl Handle {
    /// Queues a command; a full queue is counted as a drop and returns false.
    pub fn send(&self, c: Command) -> bool {
        match self.cmd.try_send(c) {
            Ok(()) => true,
            Err(_) => {
                self.metrics
                    .queue_dropped
                    .get_or_create(&Kind::of("p2p_commands"))
                    .inc();
                false
            }
        }
    }
}

/// The network behaviour.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    gossipsub: gossipsub::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    request_response: request_response::Behaviour<EnvelopeCodec>,
    connection_limits: connection_limits::Behaviour,
    /// mDNS discovery, when `p2p.mdns` is on.
    mdns: Toggle<mdns::tokio::Behaviour>,
}

impl Behaviour {
    /// Whether mDNS discovery runs.
    pub fn mdns_enabled(&self) -> bool {
        self.mdns.is_enabled()
    }
}

/// The libp2p `PeerId` of a node.
pub fn peer_id(node: &NodeId) -> Option<PeerId> {
    PeerId::from_bytes(&node.to_peer_id_bytes()).ok()
}

/// The node of a libp2p `PeerId` (ed25519 peers only).
pub fn node_id(peer: &PeerId) -> Option<NodeId> {
    NodeId::from_peer_id_bytes(&peer.to_bytes()).ok()
}

/// The libp2p keypair of the node key.
pub fn keypair(key: &NodeKey) -> anyhow::Result<identity::Keypair> {
    let mut secret = key.secret_bytes();
    identity::Keypair::ed25519_from_bytes(&mut secret).context("node key as a libp2p identity")
}

/// Gossip-level checks of one message: the envelope opens (`fedmesh_protocol::open`: framing,
/// signature, limits, clock) and its signer is the libp2p author of the message (a node
/// publishes only its own envelopes; a relayed copy keeps the author). Registry checks (version
/// supersede) come after, in the node.
pub fn check_gossip(
    data: &[u8],
    source: Option<&PeerId>,
    now_ms: u64,
) -> Result<Envelope, Rejection> {
    let env = fedmesh_protocol::open(data, now_ms)?;
    match (source, peer_id(&env.signer)) {
        (Some(s), Some(p)) if *s == p => Ok(env),
        _ => Err(Rejection::HostMismatch),
    }
}

/// The gossipsub verdict of a rejection.
pub fn acceptance(r: &Rejection) -> MessageAcceptance {
    verdict(r.acceptance())
}

/// The gossipsub form of a protocol verdict.
pub fn verdict(a: fedmesh_protocol::Acceptance) -> MessageAcceptance {
    match a {
        fedmesh_protocol::Acceptance::Accept => MessageAcceptance::Accept,
        fedmesh_protocol::Acceptance::Ignore => MessageAcceptance::Ignore,
        fedmesh_protocol::Acceptance::Reject => MessageAcceptance::Reject,
    }
}

/// Gossipsub peer scoring. The positive terms are small and capped (at most +10 in all), so
/// that one invalid message (−50) takes a peer below the gossip threshold (−10) and two in
/// quick succession below the graylist threshold (−80): its messages are then ignored
/// unseen. With gossipsub's defaults, the time-in-mesh reward alone reached +1800 within
/// seconds, and a forger that spaced its forgeries out was never graylisted
/// (`tests/tests/forger.rs` found it). Loopback peers are exempt from the IP colocation
/// penalty (a local testnet runs every node on 127.0.0.1); other IPs keep it.
fn score_params() -> gossipsub::PeerScoreParams {
    let mut params = gossipsub::PeerScoreParams {
        topic_score_cap: 10.0,
        ..Default::default()
    };
    params.ip_colocation_factor_whitelist.extend([
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ]);
    params
}

/// Per-topic scoring (see [`score_params`]): tiny meshes carry few messages, so quiet mesh
/// peers are not penalised; invalid messages are, heavily.
fn topic_score_params() -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 300.0,
        first_message_deliveries_weight: 0.1,
        first_message_deliveries_cap: 50.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -50.0,
        invalid_message_deliveries_decay: 0.5,
        ..Default::default()
    }
}

/// Sees every gossip message a behaviour computes a message id for: each one it publishes and
/// each copy it receives, duplicates included (gossipsub drops duplicates right after). Used by
/// `fedmesh bench gossip` to count redundant deliveries; `None` in the node.
pub(crate) type GossipObserver = Arc<dyn Fn(&gossipsub::Message) + Send + Sync>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn behaviour(
    key: &identity::Keypair,
    cfg: &Config,
    codec: EnvelopeCodec,
) -> Result<Behaviour, BoxError> {
    behaviour_observed(key, cfg, None, cfg.p2p.mdns, codec).map_err(Into::into)
}

fn behaviour_observed(
    key: &identity::Keypair,
    cfg: &Config,
    observe: Option<GossipObserver>,
    with_mdns: bool,
    codec: EnvelopeCodec,
) -> anyhow::Result<Behaviour> {
    let p = &cfg.p2p;
    let gcfg = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(p.gossip_heartbeat_ms.max(50)))
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .message_id_fn(move |m: &gossipsub::Message| {
            if let Some(o) = &observe {
                o(m);
            }
            MessageId::from(blake3::hash(&m.data).as_bytes().to_vec())
        })
        .max_transmit_size(MAX_ENVELOPE_BYTES + 4096)
        .mesh_n_low(1)
        .mesh_n(3)
        .mesh_n_high(6)
        .mesh_outbound_min(1)
        .gossip_lazy(3)
        .flood_publish(true)
        .connection_handler_queue_len(1024)
        .build()
        .map_err(|e| anyhow::anyhow!("gossipsub config: {e}"))?;
    let mut gossipsub =
        gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), gcfg)
            .map_err(|e| anyhow::anyhow!("gossipsub: {e}"))?;
    let mut params = score_params();
    for t in [REGISTRY_TOPIC, HEARTBEAT_TOPIC] {
        let tp = topic_score_params();
        params
            .topics
            .insert(gossipsub::IdentTopic::new(t).hash(), tp);
    }
    gossipsub
        .with_peer_score(params, gossipsub::PeerScoreThresholds::default())
        .map_err(|e| anyhow::anyhow!("gossipsub scoring: {e}"))?;
    for t in [REGISTRY_TOPIC, HEARTBEAT_TOPIC] {
        gossipsub
            .subscribe(&gossipsub::IdentTopic::new(t))
            .map_err(|e| anyhow::anyhow!("subscribing to {t}: {e}"))?;
    }
    let pid = key.public().to_peer_id();
    let mut kad = kad::Behaviour::new(pid, kad::store::MemoryStore::new(pid));
    kad.set_mode(Some(kad::Mode::Server));
    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_VERSION.into(), key.public())
            .with_push_listen_addr_updates(true),
    );
    let rr_cfg = request_response::Config::default()
        .with_request_timeout(Duration::from_millis(cfg.routing.offer_timeout_ms.max(500)))
        .with_max_concurrent_streams(256);
    let request_response = request_response::Behaviour::with_codec(
        codec,
        [(
            StreamProtocol::new(RR_PROTOCOL),
            request_response::ProtocolSupport::Full,
        )],
        rr_cfg,
    );
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(p.max_connections))
        .with_max_established_per_peer(Some(p.max_connections_per_peer.max(1)))
        .with_max_pending_incoming(Some(p.max_connections))
        .with_max_pending_outgoing(Some(p.max_connections));
    let mdns = if with_mdns {
        let m = mdns::tokio::Behaviour::new(mdns::Config::default(), pid)
            .context("p2p.mdns = true: starting mDNS")?;
        Toggle::from(Some(m))
    } else {
        Toggle::from(None)
    };
    Ok(Behaviour {
        gossipsub,
        kad,
        identify,
        ping: ping::Behaviour::default(),
        request_response,
        connection_limits: connection_limits::Behaviour::new(limits),
        mdns,
    })
}

/// The node's swarm: TCP (NODELAY) + noise + yamux, plus QUIC when `p2p.quic` is on, behind
/// libp2p's DNS transport (`/dns4/`, `/dns6/`, `/dns/` addresses are resolved at each dial, so a
/// bootstrap host whose address changes is found again on the next redial), and mDNS when
/// `p2p.mdns` is on. `bad_framing` counts request-response requests refused for their framing
/// (`fedmesh_p2p_bad_framing_total`).
pub fn swarm(
    key: &NodeKey,
    cfg: &Config,
    bad_framing: Counter,
) -> anyhow::Result<Swarm<Behaviour>> {
    let codec = EnvelopeCodec { bad_framing };
    let kp = keypair(key)?;
    let (dns, dns_opts) = dns_config();
    let tcp_phase = SwarmBuilder::with_existing_identity(kp)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?;
    let idle = swarm_config;
    let built = if cfg.p2p.quic {
        tcp_phase
            .with_quic()
            .with_dns_config(dns, dns_opts)
            .with_behaviour(|k| behaviour(k, cfg, codec.clone()))
            .map_err(|e| anyhow::anyhow!("building the behaviour: {e}"))?
            .with_swarm_config(idle)
            .build()
    } else {
        tcp_phase
            .with_dns_config(dns, dns_opts)
            .with_behaviour(|k| behaviour(k, cfg, codec.clone()))
            .map_err(|e| anyhow::anyhow!("building the behaviour: {e}"))?
            .with_swarm_config(idle)
            .build()
    };
    Ok(built)
}

/// The resolver settings of the DNS transport: the system's (`/etc/resolv.conf`; the hosts
/// file is read too, so `/dns4/localhost/...` works), or, on a host without a readable
/// resolv.conf (a minimal container), no name servers: names then resolve through the hosts
/// file only, and a warning says so.
fn dns_config() -> (libp2p::dns::ResolverConfig, libp2p::dns::ResolverOpts) {
    match hickory_resolver::system_conf::read_system_conf() {
        Ok(conf) => conf,
        Err(e) => {
            tracing::warn!(error = %e, "no system DNS configuration: /dns addresses resolve through the hosts file only");
            (
                libp2p::dns::ResolverConfig::default(),
                libp2p::dns::ResolverOpts::default(),
            )
        }
    }
}

/// An in-process swarm on `/memory/N` addresses (tests).
#[cfg(test)]
pub fn memory_swarm(key: &NodeKey, cfg: &Config) -> anyhow::Result<Swarm<Behaviour>> {
    memory_swarm_observed(key, cfg, None)
}

/// [`memory_swarm`] with a [`GossipObserver`] (benchmarks).
pub(crate) fn memory_swarm_observed(
    key: &NodeKey,
    cfg: &Config,
    observe: Option<GossipObserver>,
) -> anyhow::Result<Swarm<Behaviour>> {
    use libp2p::Transport;
    use libp2p::core::{transport::MemoryTransport, upgrade};
    let kp = keypair(key)?;
    Ok(SwarmBuilder::with_existing_identity(kp)
        .with_tokio()
        .with_other_transport(|k| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            Ok(MemoryTransport::new()
                .upgrade(upgrade::Version::V1)
                .authenticate(noise::Config::new(k)?)
                .multiplex(yamux::Config::default()))
        })?
        .with_behaviour(|k| {
            behaviour_observed(k, cfg, observe, false, EnvelopeCodec::default())
                .map_err(Into::<BoxError>::into)
        })
        .map_err(|e| anyhow::anyhow!("building the behaviour: {e}"))?
        .with_swarm_config(swarm_config)
        .build())
}

/// Swarm settings shared by every transport. Substreams are negotiated with multistream-select
/// `V1Lazy`: a dialer proposing a single protocol (request-response, Kademlia, identify, ping)
/// sends its data right behind the proposal instead of waiting a round trip for the listener's
/// confirmation (a refusal then fails the stream as before). Proposals of several protocols
/// (gossipsub's versions) still wait, as with `V1`. This removes one round trip from every
/// request-response request (offers, results, anti-entropy).
fn swarm_config(c: libp2p::swarm::Config) -> libp2p::swarm::Config {
    c.with_idle_connection_timeout(Duration::from_secs(120))
        .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
}

/// Starts listening and dialling, spawns the swarm task. `listen` is
/// [`fedmesh_config::P2pConfig::listen_addrs`] in the node; peers found by mDNS are dialled on
/// their QUIC addresses only if one of `listen` is QUIC (the swarm then has the transport).
pub fn start(
    mut swarm: Swarm<Behaviour>,
    listen: &[String],
    bootstrap: &[String],
    metrics: Arc<Metrics>,
) -> anyhow::Result<(Handle, mpsc::Receiver<Event>)> {
    for (i, a) in listen.iter().enumerate() {
        let addr: Multiaddr = a
            .parse()
            .with_context(|| format!("p2p.listen[{i}] = {a:?}"))?;
        swarm
            .listen_on(addr)
            .with_context(|| format!("p2p.listen[{i}] = {a:?}"))?;
    }
    let quic = listen.iter().any(|a| fedmesh_config::is_quic(a));
    if swarm.behaviour().mdns_enabled() {
        tracing::info!(quic, "mDNS discovery on");
    }
    let mut boot = Vec::new();
    for (i, a) in bootstrap.iter().enumerate() {
        let addr: Multiaddr = a
            .parse()
            .with_context(|| format!("p2p.bootstrap[{i}] = {a:?}"))?;
        let Some(Protocol::P2p(peer)) = addr.iter().last() else {
            anyhow::bail!("p2p.bootstrap[{i}] = {a:?} must end in /p2p/<peer id>");
        };
        if peer == *swarm.local_peer_id() {
            continue;
        }
        boot.push(Bootstrap {
            peer,
            addr,
            next: Instant::now(),
            backoff: Duration::from_millis(500),
        });
    }
    let (cmd_tx, cmd_rx) = mpsc::channel(CHANNEL);
    let (ev_tx, ev_rx) = mpsc::channel(CHANNEL);
    let info = Arc::new(Mutex::new(P2pInfo::default()));
    let task = SwarmTask {
        swarm,
        events: ev_tx,
        metrics: metrics.clone(),
        info: info.clone(),
        boot,
        open: HashMap::new(),
        next_id: 0,
        outbound: HashMap::new(),
        connected: HashSet::new(),
        last_kad_bootstrap: None,
        mdns: MdnsPeers::default(),
        quic,
    };
    tokio::spawn(task.run(cmd_rx));
    Ok((
        Handle {
            cmd: cmd_tx,
            metrics,
            info,
        },
        ev_rx,
    ))
}

#[derive(Debug)]
struct Bootstrap {
    peer: PeerId,
    addr: Multiaddr,
    next: Instant,
    backoff: Duration,
}

struct SwarmTask {
    swarm: Swarm<Behaviour>,
    events: mpsc::Sender<Event>,
    metrics: Arc<Metrics>,
    info: Arc<Mutex<P2pInfo>>,
    boot: Vec<Bootstrap>,
    open: HashMap<u64, ResponseChannel<Vec<Vec<u8>>>>,
    next_id: u64,
    outbound: HashMap<OutboundRequestId, u64>,
    connected: HashSet<PeerId>,
    last_kad_bootstrap: Option<Instant>,
    mdns: MdnsPeers,
    quic: bool,
}

/// The peers found by mDNS that the swarm acts on: at most [`MAX_MDNS_PEERS`] peers with at
/// most [`MAX_MDNS_ADDRS`] usable addresses each (a LAN full of nodes, or a spoofer answering
/// with many peer ids, cannot make the node dial without bound). A peer leaves when all its
/// addresses expire.
#[derive(Debug, Default)]
pub struct MdnsPeers {
    known: HashMap<PeerId, Vec<Multiaddr>>,
}

/// What to do after an mDNS discovery.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MdnsActions {
    /// Peers with addresses new to us: add these to Kademlia and dial the peer (with all its
    /// known addresses) unless it is connected.
    pub dial: Vec<(PeerId, Vec<Multiaddr>)>,
    /// Peers ignored because [`MAX_MDNS_PEERS`] are already tracked.
    pub ignored: usize,
}

impl MdnsPeers {
    /// Handles `mdns::Event::Discovered`: skips our own id and addresses this swarm cannot dial
    /// (only `/ip4|ip6/../tcp/..`, and `/udp/../quic-v1` when `quic`).
    pub fn discovered(
        &mut self,
        local: &PeerId,
        found: Vec<(PeerId, Multiaddr)>,
        quic: bool,
    ) -> MdnsActions {
        let mut out = MdnsActions::default();
        let mut new: Vec<(PeerId, Vec<Multiaddr>)> = Vec::new();
        let mut ignored = HashSet::new();
        for (peer, addr) in found {
            if peer == *local || !dialable(&addr, quic) {
                continue;
            }
            if !self.known.contains_key(&peer) {
                if self.known.len() >= MAX_MDNS_PEERS {
                    ignored.insert(peer);
                    continue;
                }
                self.known.insert(peer, Vec::new());
            }
            let Some(addrs) = self.known.get_mut(&peer) else {
                continue;
            };
            if addrs.contains(&addr) || addrs.len() >= MAX_MDNS_ADDRS {
                continue;
            }
            addrs.push(addr.clone());
            match new.iter_mut().find(|(p, _)| *p == peer) {
                Some((_, a)) => a.push(addr),
                None => new.push((peer, vec![addr])),
            }
        }
        out.dial = new;
        out.ignored = ignored.len();
        out
    }

    /// Handles `mdns::Event::Expired`.
    pub fn expired(&mut self, gone: Vec<(PeerId, Multiaddr)>) {
        for (peer, addr) in gone {
            if let Some(addrs) = self.known.get_mut(&peer) {
                addrs.retain(|a| *a != addr);
                if addrs.is_empty() {
                    self.known.remove(&peer);
                }
            }
        }
    }

    /// The known addresses of a peer.
    pub fn addresses(&self, peer: &PeerId) -> &[Multiaddr] {
        self.known.get(peer).map_or(&[], Vec::as_slice)
    }
}

/// Whether this swarm's transports can dial `addr`: `/ip4|ip6/<ip>/tcp/<port>[/p2p/..]`, or
/// `/ip4|ip6/<ip>/udp/<port>/quic-v1[/p2p/..]` when `quic`.
fn dialable(addr: &Multiaddr, quic: bool) -> bool {
    let mut it = addr.iter();
    if !matches!(it.next(), Some(Protocol::Ip4(_) | Protocol::Ip6(_))) {
        return false;
    }
    match (it.next(), it.next()) {
        (Some(Protocol::Tcp(_)), None | Some(Protocol::P2p(_))) => true,
        (Some(Protocol::Udp(_)), Some(Protocol::QuicV1)) => quic,
        _ => false,
    }
}

impl SwarmTask {
    async fn run(mut self, mut cmds: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                c = cmds.recv() => match c {
                    Some(c) => self.command(c),
                    None => return,
                },
                ev = self.swarm.select_next_some() => self.event(ev),
                _ = tick.tick() => self.timers(),
            }
        }
    }

    fn emit(&self, ev: Event, what: &str) -> bool {
        match self.events.try_send(ev) {
            Ok(()) => true,
            Err(_) => {
                self.metrics
                    .queue_dropped
                    .get_or_create(&Kind::of(format!("p2p_events_{what}")))
                    .inc();
                false
            }
        }
    }

    fn command(&mut self, c: Command) {
        let b = self.swarm.behaviour_mut();
        match c {
            Command::Publish { topic, data } => {
                if let Err(e) = b.gossipsub.publish(gossipsub::IdentTopic::new(topic), data) {
                    self.metrics.error("p2p_publish");
                    tracing::debug!(topic, error = %e, "gossip publish failed");
                } else {
                    self.metrics.p2p_out.get_or_create(&Kind::of(topic)).inc();
                }
            }
            Command::Report {
                msg_id,
                from,
                acceptance,
            } => {
                b.gossipsub
                    .report_message_validation_result(&msg_id, &from, acceptance);
            }
            Command::Request { peer, data, tag } => {
                tracing::debug!(target: "fedmesh_hop", tag, "swarm: send request");
                let id = b.request_response.send_request(&peer, data);
                self.outbound.insert(id, tag);
            }
            Command::Respond { id, frames } => {
                tracing::debug!(target: "fedmesh_hop", id, "swarm: send response");
                if let Some(ch) = self.open.remove(&id)
                    && b.request_response.send_response(ch, frames).is_err()
                {
                    tracing::debug!("a peer went away before our answer");
                }
            }
        }
    }

    fn timers(&mut self) {
        let now = Instant::now();
        for b in &mut self.boot {
            if self.connected.contains(&b.peer) || b.next > now {
                continue;
            }
            tracing::debug!(peer = %b.peer, addr = %b.addr, "dialling bootstrap peer");
            if let Err(e) = self.swarm.dial(b.addr.clone()) {
                tracing::debug!(error = %e, "dial failed");
            }
            b.next = now + b.backoff;
            b.backoff = (b.backoff * 2).min(MAX_REDIAL);
        }
        if !self.connected.is_empty()
            && self
                .last_kad_bootstrap
                .is_none_or(|t| t.elapsed() >= KAD_BOOTSTRAP_EVERY)
        {
            self.last_kad_bootstrap = Some(now);
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
    }

    fn refresh_info(&self) {
        let local = *self.swarm.local_peer_id();
        let listen = self
            .swarm
            .listeners()
            .map(|a| format!("{a}/p2p/{local}"))
            .collect();
        let peers = self.connected.iter().map(ToString::to_string).collect();
        *self
            .info
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = P2pInfo { listen, peers };
        self.metrics.p2p_peers.set(self.connected.len() as i64);
    }

    fn event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "p2p listening");
                self.refresh_info();
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                endpoint,
                ..
            } if num_established.get() == 1 => {
                tracing::info!(peer = %peer_id, addr = %endpoint.get_remote_address(), "peer connected");
                self.connected.insert(peer_id);
                if let Some(b) = self.boot.iter_mut().find(|b| b.peer == peer_id) {
                    b.backoff = Duration::from_millis(500);
                    let addr = b.addr.clone();
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    self.last_kad_bootstrap = None;
                }
                self.emit(Event::Connected(peer_id), "connected");
                self.refresh_info();
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                // At most one line per redial of each bootstrap peer (backoff up to MAX_REDIAL):
                // a wrong address, a name that does not resolve or a peer id that does not match
                // is visible at the default log level.
                if let Some(b) = self.boot.iter().find(|b| b.peer == peer) {
                    self.metrics.error("p2p_bootstrap_dial");
                    // libp2p's dial errors span lines; a log line does not.
                    let error = error.to_string().replace('\n', " ");
                    tracing::warn!(%peer, addr = %b.addr, %error, "dialling a bootstrap peer failed; retrying");
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                tracing::info!(peer = %peer_id, "peer disconnected");
                self.connected.remove(&peer_id);
                if let Some(b) = self.boot.iter_mut().find(|b| b.peer == peer_id) {
                    b.next = Instant::now() + b.backoff;
                }
                self.emit(Event::Disconnected(peer_id), "disconnected");
                self.refresh_info();
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                let kad_proto = info.protocols.contains(&kad::PROTOCOL_NAME);
                for a in info.listen_addrs.into_iter().take(16) {
                    self.swarm.add_peer_address(peer_id, a.clone());
                    if kad_proto {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, a);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed {
                peer_id,
                topic,
            })) if topic.as_str() == REGISTRY_TOPIC => {
                self.emit(Event::RegistrySubscribed(peer_id), "registry_subscribed");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                self.metrics
                    .p2p_in
                    .get_or_create(&Kind::of(message.topic.as_str()))
                    .inc();
                let ev = Event::Gossip {
                    msg_id: message_id.clone(),
                    from: propagation_source,
                    source: message.source,
                    topic: message.topic.into_string(),
                    data: message.data,
                };
                if !self.emit(ev, "gossip") {
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            MessageAcceptance::Ignore,
                        );
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::RequestResponse(ev)) => self.rr_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                let local = *self.swarm.local_peer_id();
                let acts = self.mdns.discovered(&local, found, self.quic);
                if acts.ignored > 0 {
                    self.metrics
                        .queue_dropped
                        .get_or_create(&Kind::of("mdns_peers"))
                        .inc_by(acts.ignored as u64);
                }
                for (peer, addrs) in acts.dial {
                    tracing::info!(%peer, ?addrs, "found by mDNS");
                    for a in addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer, a);
                    }
                    if self.connected.contains(&peer) {
                        continue;
                    }
                    // From a fresh port, not the listen port: peers on a LAN find each other
                    // at the same moment and dial each other at once, and two dials between
                    // the same two listen ports are one TCP simultaneous open, on which both
                    // sides start the handshake as the dialer and fail (seen in CI: the mDNS
                    // test's nodes never connected). Fresh ports give two connections instead.
                    let opts = DialOpts::peer_id(peer)
                        .addresses(self.mdns.addresses(&peer).to_vec())
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .allocate_new_port()
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        tracing::debug!(%peer, error = %e, "dialling an mDNS peer failed");
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(gone))) => {
                self.mdns.expired(gone);
            }
            _ => {}
        }
    }

    fn rr_event(&mut self, ev: request_response::Event<Vec<u8>, Vec<Vec<u8>>>) {
        use request_response::{Event as E, Message as M};
        match ev {
            E::Message {
                peer,
                message: M::Request {
                    request, channel, ..
                },
                ..
            } => {
                self.metrics
                    .p2p_in
                    .get_or_create(&Kind::of("request"))
                    .inc();
                if self.open.len() >= MAX_OPEN_REQUESTS {
                    self.metrics
                        .queue_dropped
                        .get_or_create(&Kind::of("p2p_open_requests"))
                        .inc();
                    return; // dropping the channel fails the peer's request
                }
                self.next_id += 1;
                let id = self.next_id;
                tracing::debug!(target: "fedmesh_hop", id, "swarm: request in");
                if self.emit(
                    Event::Request {
                        peer,
                        id,
                        data: request,
                    },
                    "request",
                ) {
                    self.open.insert(id, channel);
                }
            }
            E::Message {
                message:
                    M::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(tag) = self.outbound.remove(&request_id) {
                    tracing::debug!(target: "fedmesh_hop", tag, "swarm: response in");
                    self.emit(
                        Event::Response {
                            tag,
                            result: Ok(response),
                        },
                        "response",
                    );
                }
            }
            E::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(tag) = self.outbound.remove(&request_id) {
                    self.emit(
                        Event::Response {
                            tag,
                            result: Err(error.to_string()),
                        },
                        "response",
                    );
                }
            }
            E::InboundFailure { error, .. } => {
                tracing::debug!(%error, "inbound request failed");
                self.open.retain(|_, ch| ch.is_open());
            }
            E::ResponseSent { .. } => {}
        }
    }
}

/// Request-response codec. A request is `u32 little-endian length ‖ one sealed envelope` (at
/// most `MAX_ENVELOPE_BYTES`); a response is `u32 length ‖ frames`, the frames a sequence of
/// `u32 length ‖ envelope` (at most [`MAX_RESPONSE_BYTES`] in all). Each side closes its write
/// half after writing, but a reader is done as soon as the announced bytes are in: waiting for
/// the close (a separate yamux frame) cost ≈ 90 µs per response on loopback.
#[derive(Debug, Clone, Default)]
pub struct EnvelopeCodec {
    /// Requests refused because their announced length is over the limit.
    bad_framing: Counter,
}

/// Allows one log line per second, from any thread.
#[derive(Debug)]
struct LogLimit(Mutex<Option<Instant>>);

impl LogLimit {
    fn allow(&self, now: Instant) -> bool {
        let mut last = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return false;
        }
        *last = Some(now);
        true
    }
}

static BAD_FRAMING_LOG: LogLimit = LogLimit(Mutex::new(None));

/// Reads one `u32 little-endian length ‖ body` message of at most `max` body bytes. The reader
/// is done when the body is in: it does not wait for the writer's close, which yamux sends as a
/// separate frame.
async fn read_limited<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    max: usize,
) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("message of {len} bytes is over the {max}-byte limit"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Writes `body` behind its length in one write (one yamux frame), then closes the write half.
async fn write_prefixed<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    body: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(body.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "message too large"))?;
    let mut buf = Vec::with_capacity(body.len() + 4);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(body);
    io.write_all(&buf).await?;
    io.close().await
}

/// Encodes response frames.
pub fn encode_frames(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frames.iter().map(|f| f.len() + 4).sum());
    for f in frames {
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f);
    }
    out
}

/// Decodes response frames.
pub fn decode_frames(mut buf: &[u8]) -> std::io::Result<Vec<Vec<u8>>> {
    let bad = |m: &'static str| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (len, rest) = buf
            .split_first_chunk::<4>()
            .ok_or(bad("truncated length"))?;
        let len = u32::from_le_bytes(*len) as usize;
        if len > MAX_ENVELOPE_BYTES || len > rest.len() {
            return Err(bad("bad frame length"));
        }
        let (f, rest) = rest.split_at(len);
        out.push(f.to_vec());
        buf = rest;
    }
    Ok(out)
}

impl request_response::Codec for EnvelopeCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<Vec<u8>>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let read = read_limited(io, MAX_ENVELOPE_BYTES).await;
        // libp2p drops a request that fails to read without telling the behaviour, so the
        // codec is where a badly framed request can be counted and named.
        if let Err(e) = &read
            && e.kind() == std::io::ErrorKind::InvalidData
        {
            self.bad_framing.inc();
            // A peer chooses how often this happens: at most one line a second.
            if BAD_FRAMING_LOG.allow(Instant::now()) {
                tracing::warn!(error = %e, total = self.bad_framing.get(), "request-response: refused a badly framed request (at most one such line a second)");
            }
        }
        read
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Vec<Vec<u8>>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let buf = read_limited(io, MAX_RESPONSE_BYTES).await?;
        decode_frames(&buf)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_prefixed(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<Vec<u8>>,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_prefixed(io, &encode_frames(&res)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_protocol::{Message, sample};

    #[test]
    fn log_limit_allows_one_line_a_second() {
        let l = LogLimit(Mutex::new(None));
        let t = Instant::now();
        assert!(l.allow(t));
        assert!(!l.allow(t + Duration::from_millis(999)));
        assert!(l.allow(t + Duration::from_millis(1000)));
    }

    #[test]
    fn frames_round_trip_and_bad_frames_are_errors() {
        let f = vec![vec![1, 2, 3], vec![], vec![9; 100]];
        assert_eq!(decode_frames(&encode_frames(&f)).expect("decode"), f);
        assert!(decode_frames(&[1, 0, 0]).is_err());
        assert!(decode_frames(&[10, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn peer_ids_and_node_ids_agree() {
        let key = sample::key(3);
        let kp = keypair(&key).expect("keypair");
        let pid = kp.public().to_peer_id();
        assert_eq!(peer_id(&key.node_id()), Some(pid));
        assert_eq!(node_id(&pid), Some(key.node_id()));
        assert_eq!(pid.to_string(), key.node_id().to_string());
    }

    #[test]
    fn gossip_from_another_author_is_rejected() {
        let now = 1_790_000_000_000;
        let a = sample::key(1);
        let b = sample::key(2);
        let vcv = sample::vcv(&a, "x", 1, now);
        let env = fedmesh_protocol::seal(&a, now, &Message::Advertise(vcv)).expect("seal");
        let pa = peer_id(&a.node_id()).expect("pid");
        let pb = peer_id(&b.node_id()).expect("pid");
        assert!(check_gossip(&env, Some(&pa), now).is_ok());
        let r = check_gossip(&env, Some(&pb), now).expect_err("wrong author");
        assert_eq!(acceptance(&r), MessageAcceptance::Reject);
        assert!(check_gossip(&env, None, now).is_err());
    }

    async fn next(rx: &mut mpsc::Receiver<Event>, f: impl Fn(&Event) -> bool) -> Event {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ev = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("event in time")
                .expect("channel open");
            if f(&ev) {
                return ev;
            }
        }
    }

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(
            &mut prometheus_client::registry::Registry::default(),
        ))
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// Node 1 publishes a signed advertisement until node 2 receives it, then node 2 sends node
    /// 1 a signed task by request-response and gets two frames back.
    async fn advert_and_task_cross(
        (k1, h1, e1): (&NodeKey, &Handle, &mut mpsc::Receiver<Event>),
        (k2, h2, e2): (&NodeKey, &Handle, &mut mpsc::Receiver<Event>),
    ) {
        let p1 = peer_id(&k1.node_id()).expect("pid");
        let p2 = peer_id(&k2.node_id()).expect("pid");
        next(e1, |e| matches!(e, Event::Connected(p) if *p == p2)).await;
        next(e2, |e| matches!(e, Event::Connected(p) if *p == p1)).await;
        // Node 1 hears when node 2's registry subscription arrives (the node answers it with
        // an anti-entropy digest).
        next(
            e1,
            |e| matches!(e, Event::RegistrySubscribed(p) if *p == p2),
        )
        .await;

        // Gossip: publish (new versions: gossipsub drops identical payloads) until node 2 has
        // subscribed and receives one.
        let mut got = None;
        for v in 1u64..=50 {
            let vcv = sample::vcv(k1, "shouter", v, now());
            let env = fedmesh_protocol::seal(k1, now(), &Message::Advertise(vcv)).expect("seal");
            h1.send(Command::Publish {
                topic: REGISTRY_TOPIC,
                data: env,
            });
            if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), e2.recv()).await
                && let Event::Gossip {
                    source, from, data, ..
                } = &ev
            {
                assert_eq!(*source, Some(p1));
                assert_eq!(*from, p1);
                let env = check_gossip(data, source.as_ref(), now()).expect("a valid advert");
                assert!(matches!(env.message, Message::Advertise(_)));
                got = Some(ev);
                break;
            }
        }
        assert!(got.is_some(), "gossip never arrived");

        // Request-response: a signed task.
        let task = fedmesh_protocol::seal(k2, now(), &Message::Task(sample::task(k2, "r1", now())))
            .expect("seal");
        h2.send(Command::Request {
            peer: p1,
            data: task.clone(),
            tag: 7,
        });
        let Event::Request { id, data, peer } =
            next(e1, |e| matches!(e, Event::Request { .. })).await
        else {
            unreachable!()
        };
        assert_eq!((&data, peer), (&task, p2));
        let env = fedmesh_protocol::open(&data, now()).expect("the task opens");
        assert!(matches!(env.message, Message::Task(_)));
        h1.send(Command::Respond {
            id,
            frames: vec![b"a".to_vec(), b"bc".to_vec()],
        });
        let ev = next(e2, |e| matches!(e, Event::Response { .. })).await;
        let Event::Response { tag, result } = ev else {
            unreachable!()
        };
        assert_eq!(tag, 7);
        assert_eq!(result, Ok(vec![b"a".to_vec(), b"bc".to_vec()]));
    }

    #[tokio::test]
    async fn two_swarms_gossip_and_answer_requests_over_memory() {
        let cfg = Config::default();
        let metrics = metrics();
        let (k1, k2) = (sample::key(11), sample::key(12));
        let port = 1_000_000 + u64::from(rand::random::<u32>());
        let a1 = format!("/memory/{port}");
        let (h1, mut e1) = start(
            memory_swarm(&k1, &cfg).expect("swarm"),
            std::slice::from_ref(&a1),
            &[],
            metrics.clone(),
        )
        .expect("start 1");
        let boot = format!("{a1}/p2p/{}", k1.node_id());
        let (h2, mut e2) = start(
            memory_swarm(&k2, &cfg).expect("swarm"),
            &[format!("/memory/{}", port + 1)],
            &[boot],
            metrics,
        )
        .expect("start 2");
        advert_and_task_cross((&k1, &h1, &mut e1), (&k2, &h2, &mut e2)).await;
    }

    /// The listen addresses `/status` would show, once there are `n`.
    async fn listening(h: &Handle, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let l = h
                .info
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .listen
                .clone();
            if l.len() >= n {
                return l;
            }
            assert!(Instant::now() < deadline, "not listening: {l:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn two_swarms_connect_over_quic_only_on_loopback() {
        let mut cfg = Config::default();
        cfg.p2p.quic = true;
        cfg.p2p.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".into()];
        cfg.validate().expect("a valid QUIC-only config");
        let listen = cfg.p2p.listen_addrs();
        assert_eq!(listen, cfg.p2p.listen, "nothing derived: QUIC only");
        let metrics = metrics();
        let (k1, k2) = (sample::key(21), sample::key(22));
        let (h1, mut e1) = start(
            swarm(&k1, &cfg, Counter::default()).expect("swarm"),
            &listen,
            &[],
            metrics.clone(),
        )
        .expect("start 1");
        let l1 = listening(&h1, 1).await;
        assert_eq!(l1.len(), 1, "{l1:?}");
        let boot = l1[0].clone();
        assert!(
            boot.starts_with("/ip4/127.0.0.1/udp/") && boot.contains("/quic-v1/p2p/"),
            "{boot}"
        );
        let (h2, mut e2) = start(
            swarm(&k2, &cfg, Counter::default()).expect("swarm"),
            &listen,
            &[boot],
            metrics,
        )
        .expect("start 2");
        advert_and_task_cross((&k1, &h1, &mut e1), (&k2, &h2, &mut e2)).await;
    }

    #[tokio::test]
    async fn without_quic_a_quic_address_cannot_be_listened_on() {
        // The same QUIC-only start on a TCP-only swarm fails: the test above depends on the QUIC
        // transport being in the swarm.
        let cfg = Config::default();
        let r = start(
            swarm(&sample::key(23), &cfg, Counter::default()).expect("swarm"),
            &["/ip4/127.0.0.1/udp/0/quic-v1".into()],
            &[],
            metrics(),
        );
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn quic_on_listens_on_tcp_and_a_derived_quic_address() {
        let mut cfg = Config::default();
        cfg.p2p.quic = true;
        let (h, _e) = start(
            swarm(&sample::key(24), &cfg, Counter::default()).expect("swarm"),
            &cfg.p2p.listen_addrs(),
            &[],
            metrics(),
        )
        .expect("start");
        let l = listening(&h, 2).await;
        assert!(
            l.iter().any(|a| a.starts_with("/ip4/127.0.0.1/tcp/")),
            "{l:?}"
        );
        assert!(
            l.iter()
                .any(|a| a.starts_with("/ip4/127.0.0.1/udp/") && a.contains("/quic-v1/")),
            "{l:?}"
        );
    }

    #[tokio::test]
    async fn mdns_behaviour_is_enabled_only_when_configured() {
        // Built, never polled: no multicast leaves the host in tests.
        let mut cfg = Config::default();
        assert!(
            !swarm(&sample::key(25), &cfg, Counter::default())
                .expect("swarm")
                .behaviour()
                .mdns_enabled()
        );
        cfg.p2p.mdns = true;
        assert!(
            swarm(&sample::key(25), &cfg, Counter::default())
                .expect("swarm")
                .behaviour()
                .mdns_enabled()
        );
    }

    fn pid(seed: u8) -> PeerId {
        peer_id(&sample::key(seed).node_id()).expect("pid")
    }

    fn ma(s: &str) -> Multiaddr {
        s.parse().expect("multiaddr")
    }

    #[test]
    fn mdns_discoveries_are_filtered_and_deduplicated() {
        let mut m = MdnsPeers::default();
        let (me, a, b) = (pid(1), pid(2), pid(3));
        let found = vec![
            (me, ma("/ip4/192.168.1.2/tcp/4001")),
            (a, ma("/ip4/192.168.1.3/tcp/4001")),
            (a, ma("/ip4/192.168.1.3/udp/4001/quic-v1")),
            (a, ma("/dns4/x.example/tcp/4001")),
            (a, ma("/memory/5")),
            (b, ma(&format!("/ip6/fe80::1/tcp/4001/p2p/{b}"))),
        ];
        let acts = m.discovered(&me, found.clone(), false);
        assert_eq!(
            acts.dial,
            vec![
                (a, vec![ma("/ip4/192.168.1.3/tcp/4001")]),
                (b, vec![ma(&format!("/ip6/fe80::1/tcp/4001/p2p/{b}"))]),
            ]
        );
        assert_eq!(acts.ignored, 0);
        // The same answer again: nothing new to do.
        assert_eq!(
            m.discovered(&me, found.clone(), false),
            MdnsActions::default()
        );
        // With QUIC, the QUIC address is new.
        let acts = m.discovered(&me, found, true);
        assert_eq!(
            acts.dial,
            vec![(a, vec![ma("/ip4/192.168.1.3/udp/4001/quic-v1")])]
        );
        assert_eq!(m.addresses(&a).len(), 2);
        assert!(m.addresses(&me).is_empty());
    }

    #[test]
    fn mdns_peers_and_addresses_are_bounded_and_expire() {
        let mut m = MdnsPeers::default();
        let me = pid(0);
        let many: Vec<_> = (1..=u8::try_from(MAX_MDNS_PEERS + 10).expect("small"))
            .map(|i| (pid(i), ma(&format!("/ip4/10.0.0.{i}/tcp/4001"))))
            .collect();
        let acts = m.discovered(&me, many.clone(), false);
        assert_eq!(acts.dial.len(), MAX_MDNS_PEERS);
        assert_eq!(acts.ignored, 10);
        // One peer announcing many addresses keeps MAX_MDNS_ADDRS.
        let first = many[0].0;
        let addrs: Vec<_> = (1..20)
            .map(|p| (first, ma(&format!("/ip4/10.0.1.1/tcp/{p}"))))
            .collect();
        let acts = m.discovered(&me, addrs, false);
        assert_eq!(acts.dial.len(), 1);
        assert_eq!(m.addresses(&first).len(), MAX_MDNS_ADDRS);
        // A tracked peer expiring frees a slot for an ignored one.
        let second = many[1].clone();
        m.expired(vec![second.clone()]);
        assert!(m.addresses(&second.0).is_empty());
        let late = many[MAX_MDNS_PEERS].clone();
        let acts = m.discovered(&me, vec![late.clone()], false);
        assert_eq!(acts.dial, vec![(late.0, vec![late.1])]);
        assert_eq!(acts.ignored, 0);
        let acts = m.discovered(&me, vec![many[MAX_MDNS_PEERS + 1].clone()], false);
        assert_eq!((acts.dial.len(), acts.ignored), (0, 1));
    }
}
