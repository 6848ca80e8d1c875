//! Issue #4.5, "a peer that sends a forged advertisement is rejected", end to end: a real
//! `fedmesh run` process and a raw libp2p peer (TCP + noise + yamux + gossipsub, configured like
//! the node in `node/src/p2p.rs`) that is not a fedmesh node. The peer first proves that its
//! gossip reaches the node (a validly signed advertisement of its own agent shows up in
//! `/status`), then publishes forgeries on the registry topic: a corrupted signature, an
//! envelope claiming the victim node as signer, an advertisement of an agent of the victim
//! node signed by the forger, a withdrawal of the victim's agent signed by the forger, an older
//! version of its own advertisement, and garbage. Each must be counted in
//! `fedmesh_p2p_rejected{peer,reason}` under its reason and none may reach `/status`. A forger
//! that keeps sending invalid messages must be graylisted by gossipsub's peer scoring (fewer of
//! its messages are judged than it sent) and PRUNEd from the node's registry mesh. Afterwards the
//! honest agent is unchanged and an honest task submitted over MQTT still completes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fedmesh_protocol::limits::MAX_ENVELOPE_BYTES;
use fedmesh_protocol::{AgentId, AgentName, Message, NodeId, NodeKey, sample, seal};
use fedmesh_tests::mqtt::{connect, spawn_echo_agent};
use fedmesh_tests::{TestNode, http_get};
use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageId, TopicHash};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, SwarmBuilder, identify, identity, noise, tcp, yamux};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

/// The node's registry topic (`REGISTRY_TOPIC` in node/src/p2p.rs).
const REGISTRY_TOPIC: &str = "fedmesh/v1/registry";
/// The node's identify protocol version (`IDENTIFY_VERSION` in node/src/p2p.rs).
const IDENTIFY_VERSION: &str = "/fedmesh/1";
/// The forger's own, legitimately hosted agent.
const OWN_AGENT: &str = "rawpeer-ok";
/// Names of forged agents that must never show up in the node's registry.
const FORGED_AGENTS: [&str; 3] = ["forged-sig", "impostor", "victim-agent"];

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Strictly increasing send times, so that every envelope (and so every gossipsub message id,
/// `blake3(data)`) is new: gossipsub silently drops a payload it has seen before.
#[derive(Debug, Default)]
struct Clock {
    last: u64,
}

impl Clock {
    fn next(&mut self) -> u64 {
        self.last = now_ms().max(self.last + 1);
        self.last
    }
}

#[derive(NetworkBehaviour)]
struct Forger {
    gossipsub: gossipsub::Behaviour,
    identify: identify::Behaviour,
}

/// What the forger's swarm task has seen of the node.
#[derive(Debug, Default)]
struct Seen {
    connected: bool,
    /// The node's subscription to the registry topic reached the forger.
    node_subscribed: bool,
    /// The node is in the forger's registry-topic mesh (it accepted our GRAFT or grafted us).
    in_mesh: bool,
    /// The node left that mesh (it PRUNEd us) since the test last cleared this.
    left_mesh: bool,
    /// The connection to the node closed since it was established.
    disconnected: bool,
}

type Publish = (Vec<u8>, oneshot::Sender<Result<MessageId, String>>);

/// The raw libp2p peer: a swarm task, a publish channel and what it has seen.
struct RawPeer {
    key: NodeKey,
    publish: mpsc::Sender<Publish>,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(m: &Mutex<Seen>) -> MutexGuard<'_, Seen> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The forger's swarm, with the node's gossipsub protocol settings (node/src/p2p.rs): strict
/// signing, message id = blake3(data), the same transmit size and mesh degrees, flood publish.
/// A short heartbeat makes it GRAFT the node quickly. It validates nothing itself.
fn forger_swarm(key: &NodeKey) -> Swarm<Forger> {
    let mut secret = key.secret_bytes();
    let kp = identity::Keypair::ed25519_from_bytes(&mut secret).expect("libp2p keypair");
    SwarmBuilder::with_existing_identity(kp)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp transport")
        .with_behaviour(|k| {
            let cfg = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(100))
                .validation_mode(gossipsub::ValidationMode::Strict)
                .message_id_fn(|m: &gossipsub::Message| {
                    MessageId::from(blake3::hash(&m.data).as_bytes().to_vec())
                })
                .max_transmit_size(MAX_ENVELOPE_BYTES + 4096)
                .mesh_n_low(1)
                .mesh_n(3)
                .mesh_n_high(6)
                .mesh_outbound_min(1)
                .flood_publish(true)
                .build()
                .expect("gossipsub config");
            let gossipsub =
                gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(k.clone()), cfg)
                    .expect("gossipsub");
            let identify = identify::Behaviour::new(identify::Config::new(
                IDENTIFY_VERSION.into(),
                k.public(),
            ));
            Forger {
                gossipsub,
                identify,
            }
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build()
}

impl RawPeer {
    /// Dials `addr` (the node's `/ip4/127.0.0.1/tcp/../p2p/<id>`) and subscribes to the registry
    /// topic.
    fn start(key: NodeKey, addr: Multiaddr, node: PeerId) -> Self {
        let mut swarm = forger_swarm(&key);
        let topic = IdentTopic::new(REGISTRY_TOPIC);
        let hash: TopicHash = topic.hash();
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&topic)
            .expect("subscribe");
        swarm.dial(addr).expect("dial the node");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (tx, mut rx) = mpsc::channel::<Publish>(16);
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tokio::select! {
                    p = rx.recv() => {
                        let Some((data, reply)) = p else { return };
                        let r = swarm
                            .behaviour_mut()
                            .gossipsub
                            .publish(hash.clone(), data)
                            .map_err(|e| e.to_string());
                        let _ = reply.send(r);
                    }
                    ev = swarm.select_next_some() => {
                        let mut s = lock(&shared);
                        match ev {
                            SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == node => {
                                s.connected = true;
                            }
                            SwarmEvent::ConnectionClosed {
                                peer_id,
                                num_established: 0,
                                ..
                            } if peer_id == node => {
                                s.connected = false;
                                s.disconnected = true;
                            }
                            SwarmEvent::Behaviour(ForgerEvent::Gossipsub(
                                gossipsub::Event::Subscribed { peer_id, topic, .. },
                            )) if peer_id == node && topic == hash => {
                                s.node_subscribed = true;
                            }
                            _ => {}
                        }
                    }
                    _ = tick.tick() => {
                        let in_mesh = swarm
                            .behaviour()
                            .gossipsub
                            .mesh_peers(&hash)
                            .any(|p| *p == node);
                        let mut s = lock(&shared);
                        if s.in_mesh && !in_mesh {
                            s.left_mesh = true;
                        }
                        s.in_mesh = in_mesh;
                    }
                }
            }
        });
        Self {
            key,
            publish: tx,
            seen,
            task,
        }
    }

    fn peer_id(&self) -> String {
        self.key.node_id().to_string()
    }

    fn seen(&self) -> MutexGuard<'_, Seen> {
        lock(&self.seen)
    }

    /// Publishes `data` on the registry topic (signed by libp2p as the forger, the author).
    async fn publish(&self, data: Vec<u8>) {
        let (tx, rx) = oneshot::channel();
        self.publish
            .send((data, tx))
            .await
            .expect("swarm task alive");
        let r = tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("publish answered in time")
            .expect("swarm task alive");
        if let Err(e) = r {
            panic!("gossipsub publish failed: {e}");
        }
    }
}

/// Polls `f` every 100 ms until it gives a value; panics after `timeout`.
async fn until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `fedmesh_p2p_rejected{peer,reason}` for `peer`, by reason.
fn rejections(node: &TestNode, peer: &str) -> BTreeMap<String, u64> {
    let (code, body) = http_get(node.http, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "/metrics: {body}");
    let peer_label = format!("peer=\"{peer}\"");
    let mut out = BTreeMap::new();
    for line in body.lines() {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        if !name.starts_with("fedmesh_p2p_rejected") || !rest.contains(&peer_label) {
            continue;
        }
        let reason = rest
            .split_once("reason=\"")
            .and_then(|(_, r)| r.split_once('"'))
            .map(|(r, _)| r.to_string())
            .expect("a reason label");
        let n: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("a counter value");
        *out.entry(reason).or_insert(0) += n as u64;
    }
    out
}

fn count(r: &BTreeMap<String, u64>, reason: &str) -> u64 {
    r.get(reason).copied().unwrap_or(0)
}

/// The registry entries of `/status` whose agent name is `name` (any host).
fn agents_named(node: &TestNode, name: &str) -> Vec<serde_json::Value> {
    let s = node.status().expect("GET /status");
    s["agents"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|x| {
                    x["id"]
                        .as_str()
                        .and_then(|i| i.rsplit_once('@'))
                        .is_some_and(|(n, _)| n == name)
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

fn assert_no_forged_agent(node: &TestNode, after: &str) {
    for name in FORGED_AGENTS {
        let found = agents_named(node, name);
        assert!(
            found.is_empty(),
            "after {after}: the forged agent {name} is in the registry: {found:?}"
        );
    }
}

/// Publishes `make(attempt)` (fresh bytes each time) until the node counts one more rejection of
/// the forger for `reason`. A node that has just rejected the forger may graylist it for a moment
/// (gossipsub scoring, decaying each second), ignoring its messages before validation; then the
/// attempt is not counted and a fresh one follows. Returns the counts afterwards.
async fn until_rejected(
    node: &TestNode,
    peer: &RawPeer,
    what: &str,
    reason: &str,
    mut make: impl FnMut() -> Vec<u8>,
) -> BTreeMap<String, u64> {
    let me = peer.peer_id();
    let before = count(&rejections(node, &me), reason);
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut attempts = 0;
    loop {
        attempts += 1;
        peer.publish(make()).await;
        let retry_at = Instant::now() + Duration::from_secs(3);
        while Instant::now() < retry_at {
            let r = rejections(node, &me);
            if count(&r, reason) > before {
                eprintln!("{what}: counted as {reason} after {attempts} attempt(s)");
                assert_no_forged_agent(node, what);
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no {reason} rejection counted after {attempts} attempts; counts {:?}",
            rejections(node, &me)
        );
    }
}

fn advertise(key: &NodeKey, agent: AgentId, version: u64, at: u64) -> Vec<u8> {
    let mut vcv = sample::vcv(key, agent.name.as_str(), version, at);
    vcv.agent = agent;
    seal(key, at, &Message::Advertise(vcv)).expect("seal")
}

fn agent(node: NodeId, name: &str) -> AgentId {
    AgentId::new(node, AgentName::new(name).expect("agent name"))
}

/// Publishes validly signed advertisements of the forger's own agent `own`, from `version` up,
/// until `/status` lists one: each retry (every 3 s) is a newer version, since an identical
/// payload would be a gossipsub duplicate and a graylisted peer's messages are dropped before
/// validation. Returns the listed entry. The node handles one peer's gossip in order, so once
/// this is listed, everything the peer published before has been judged.
async fn advertise_until_listed(
    node: &TestNode,
    peer: &RawPeer,
    clock: &mut Clock,
    own: &AgentId,
    mut version: u64,
    what: &str,
) -> serde_json::Value {
    let first = version;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        peer.publish(advertise(&peer.key, own.clone(), version, clock.next()))
            .await;
        let retry_at = Instant::now() + Duration::from_secs(3);
        while Instant::now() < retry_at {
            if let Some(a) = agents_named(node, own.name.as_str())
                .into_iter()
                .find(|a| a["version"].as_u64() >= Some(first))
            {
                eprintln!(
                    "{what}: version {} listed (published up to {version})",
                    a["version"]
                );
                return a;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no valid advertisement of {own} from version {first} listed; status {:?}",
            node.status().ok()
        );
        version += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_gossip_from_a_raw_libp2p_peer_is_rejected_and_the_node_keeps_serving() {
    let node = TestNode::start().expect("node");
    // `/status` is filled in shortly after the node is healthy.
    let victim: NodeId = until("the node id in /status", Duration::from_secs(20), || {
        node.status()
            .ok()
            .and_then(|s| s["node_id"].as_str().and_then(|i| i.parse().ok()))
    })
    .await;
    // An honest agent on the victim node.
    let echo = spawn_echo_agent(node.mqtt_v4, "echo", Duration::from_secs(120))
        .await
        .expect("echo agent");
    let echo_id: AgentId = until("the echo agent in /status", Duration::from_secs(20), || {
        agents_named(&node, "echo")
            .first()
            .and_then(|a| a["id"].as_str())
            .and_then(|i| i.parse().ok())
    })
    .await;
    assert_eq!(echo_id.node, victim);

    let addr: Multiaddr = until("a loopback p2p address", Duration::from_secs(20), || {
        node.status().ok().and_then(|s| {
            s["p2p"]["listen"].as_array().and_then(|l| {
                l.iter()
                    .filter_map(|a| a.as_str())
                    .find(|a| a.starts_with("/ip4/127.0.0.1/tcp/"))
                    .and_then(|a| a.parse().ok())
            })
        })
    })
    .await;
    let node_peer = PeerId::from_bytes(&victim.to_peer_id_bytes()).expect("peer id");

    let forger_key = sample::key(0xF0);
    let me = forger_key.node_id();
    let peer = RawPeer::start(forger_key.clone(), addr, node_peer);
    until(
        "the node's registry subscription reaches the raw peer",
        Duration::from_secs(20),
        || {
            let s = peer.seen();
            (s.connected && s.node_subscribed).then_some(())
        },
    )
    .await;
    until(
        "the node shows the raw peer",
        Duration::from_secs(20),
        || {
            node.status().ok().and_then(|s| {
                s["p2p"]["peers"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|x| x.as_str() == Some(&me.to_string())))
                    .then_some(())
            })
        },
    )
    .await;

    let mut clock = Clock::default();

    // Sanity: the raw peer's gossip reaches the node and is judged on its merits. A validly
    // signed advertisement of its own agent (under its own node id) is accepted and listed, so
    // the rejections below are the node's verdicts, not lost messages.
    let own = agent(me, OWN_AGENT);
    let accepted = advertise_until_listed(&node, &peer, &mut clock, &own, 2, "sanity").await;
    assert_eq!(accepted["id"], own.to_string(), "{accepted}");
    assert_eq!(accepted["local"], false, "{accepted}");
    let accepted_version = accepted["version"].as_u64().expect("version");
    assert!(accepted_version >= 2, "{accepted}");
    let clean = rejections(&node, &me.to_string());
    assert!(
        clean.values().all(|&n| n == 0),
        "no rejection before any forgery: {clean:?}"
    );

    // The node GRAFTs the well-behaved peer into its registry mesh.
    until(
        "the raw peer and the node mesh on the registry topic",
        Duration::from_secs(20),
        || peer.seen().in_mesh.then_some(()),
    )
    .await;
    peer.seen().left_mesh = false;

    // (a) A corrupted signature on the forger's own advertisement.
    until_rejected(&node, &peer, "corrupted signature", "bad_signature", || {
        let mut b = advertise(&forger_key, agent(me, "forged-sig"), 1, clock.next());
        let last = b.len() - 1;
        b[last] ^= 0x01;
        b
    })
    .await;

    // (b) The envelope names the victim node as its signer (signed by the forger): the signer is
    //     not the libp2p author.
    until_rejected(&node, &peer, "victim as signer", "host_mismatch", || {
        let mut b = advertise(&forger_key, agent(victim, "impostor"), 1, clock.next());
        b[1..33].copy_from_slice(victim.as_bytes());
        b
    })
    .await;

    // (c) Correctly signed by the forger, but for an agent hosted by the victim node.
    until_rejected(&node, &peer, "agent of the victim", "host_mismatch", || {
        advertise(&forger_key, agent(victim, "victim-agent"), 1, clock.next())
    })
    .await;

    // (d) A withdrawal of the victim's honest agent, signed by the forger.
    until_rejected(
        &node,
        &peer,
        "withdrawal for the victim",
        "host_mismatch",
        || {
            let m = Message::Withdraw {
                agent: echo_id.clone(),
                version: u64::from(u32::MAX),
            };
            seal(&forger_key, clock.next(), &m).expect("seal")
        },
    )
    .await;

    // (e) A replay of an older version of the forger's own (honest) advertisement: validly
    //     signed, superseded, ignored. (Replaying the exact bytes of an earlier message is
    //     dropped by gossipsub itself as a duplicate id before validation, and another node's
    //     envelope cannot be re-published under its author: Strict signing binds the author.)
    until_rejected(&node, &peer, "older version", "version_not_newer", || {
        advertise(&forger_key, own.clone(), accepted_version - 1, clock.next())
    })
    .await;

    // (f) Garbage: a valid header (the forger as signer) followed by bytes that do not decode.
    until_rejected(&node, &peer, "garbage body", "malformed", || {
        let mut b = vec![2];
        b.extend_from_slice(me.as_bytes());
        b.extend_from_slice(&clock.next().to_le_bytes());
        b.extend_from_slice(&[0xFF; 48]);
        b.extend_from_slice(&[0; 64]);
        b
    })
    .await;

    // (g) Garbage without any envelope framing, shorter than an envelope header (from 33 bytes
    //     on, the node compares bytes 1..33 with the author first: `host_mismatch`).
    let fin = until_rejected(&node, &peer, "garbage bytes", "unknown_version", || {
        let mut b = b"\x00junk".to_vec();
        b.extend_from_slice(&clock.next().to_le_bytes());
        b
    })
    .await;
    eprintln!("rejections of the forger: {fin:?}");
    assert!(count(&fin, "bad_signature") >= 1, "{fin:?}");
    assert!(count(&fin, "host_mismatch") >= 3, "{fin:?}");
    assert!(count(&fin, "version_not_newer") >= 1, "{fin:?}");
    assert!(count(&fin, "malformed") >= 1, "{fin:?}");
    assert!(count(&fin, "unknown_version") >= 1, "{fin:?}");

    // Peer scoring against a persistent forger: it keeps sending bad signatures (every 25 ms,
    // at least 40) until the node PRUNEs it from its registry mesh (the invalid-message penalty
    // made its score negative). While its score is below the graylist threshold the node drops
    // its messages before validation, so fewer are judged (counted) than were sent.
    let flood_from = count(&fin, "bad_signature");
    let flood_deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = 0u64;
    while sent < 40 || !peer.seen().left_mesh {
        assert!(
            Instant::now() < flood_deadline,
            "the node never pruned the forger from its mesh after {sent} invalid messages; \
             rejections {:?}",
            rejections(&node, &me.to_string())
        );
        let mut b = advertise(&forger_key, agent(me, "forged-sig"), 1, clock.next());
        let last = b.len() - 1;
        b[last] ^= 0x01;
        peer.publish(b).await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // A valid message after the flood: once it is listed, the whole flood has been judged or
    // dropped (and the forger's score has decayed enough to be heard again).
    let marker = advertise_until_listed(
        &node,
        &peer,
        &mut clock,
        &own,
        accepted_version + 1,
        "after the flood",
    )
    .await;
    let marker_version = marker["version"].as_u64().expect("version");
    let after = rejections(&node, &me.to_string());
    let judged = count(&after, "bad_signature") - flood_from;
    eprintln!("flood: {sent} invalid messages sent, {judged} judged; rejections {after:?}");
    assert!(judged >= 1, "no flood message was judged: {after:?}");
    assert!(
        judged < sent,
        "every one of {sent} invalid messages was validated: the forger was never graylisted"
    );
    {
        let s = peer.seen();
        eprintln!(
            "forger after the forgeries: connected {}, in mesh {}, disconnected once {}",
            s.connected, s.in_mesh, s.disconnected
        );
    }

    // Nothing forged is in the registry; the honest agents are as they were.
    assert_no_forged_agent(&node, "all forgeries");
    let echo_now = agents_named(&node, "echo");
    assert_eq!(echo_now.len(), 1, "{echo_now:?}");
    assert_eq!(echo_now[0]["id"], echo_id.to_string());
    assert_eq!(echo_now[0]["local"], true);
    let own_now = agents_named(&node, OWN_AGENT);
    assert_eq!(own_now.len(), 1, "{own_now:?}");
    assert_eq!(
        own_now[0]["version"], marker_version,
        "the older version did not replace the newer"
    );

    // The node still serves.
    let (code, body) = http_get(node.http, "/healthz").expect("GET /healthz");
    assert_eq!(code, 200, "/healthz: {body}");
    let mut req = connect(node.mqtt_v4, "req", &["fedmesh/v1/client/req/inbox"])
        .await
        .expect("requester");
    req.send(
        "fedmesh/v1/client/req/submit",
        json!({
            "request_id": "after-forgeries",
            "description": "Echoes its input back",
            "input": "still serving",
            "deadline_ms": 60000,
        }),
    )
    .await
    .expect("submit");
    let r = req
        .expect_within("result", Duration::from_secs(30))
        .await
        .expect("the honest task completes");
    assert_eq!(r["output"], "still serving", "{r}");
    assert_eq!(r["request_id"], "after-forgeries", "{r}");
    echo.abort();
}
