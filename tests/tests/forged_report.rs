//! Issue #4.2, forgeries over request-response (gossip forgeries are `forger.rs`): a peer that
//! knows a task's id (as a host that was once offered it does) sends the origin a `Result` and a
//! `Progress`, signed by itself, for the agent that really runs the task on another node; then a
//! result with a broken signature, bytes that are no envelope, registry forgeries over the
//! anti-entropy path (another node's agent advertised by the peer, a digest signed by another
//! key, an exact-byte replay of its own advertisement: `duplicate`), and a request whose announced
//! length is over the limit (refused without an answer, counted in
//! `fedmesh_p2p_bad_framing_total`); and the same through unsigned channel envelopes (a sender
//! other than the authenticated peer, another node's agent, a relabelled advertisement). The origin must refuse each,
//! count it per peer under its reason (`host_mismatch`: a task report counts only when signed
//! by the node that hosts the agent, `Message::validate_static`), answer every request (so the
//! node's request handling keeps going), keep the task running, and deliver the genuine result
//! when the agent sends it. The forger is a raw libp2p peer (TCP + noise + yamux +
//! request-response with the node's `/fedmesh/rr/2` framing), not a fedmesh node.

use std::time::Duration;

use fedmesh_protocol::message::{Message, Outcome, TaskId};
use fedmesh_protocol::{AgentId, AgentName, CHANNEL_VERSION, NodeId, sample, seal, seal_channel};
use fedmesh_tests::mqtt::{advertised_agent, connect};
use fedmesh_tests::{TestNode, free_port, has_remote_agent, http_get};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, SwarmBuilder, identity, noise, tcp, yamux};
use serde_json::json;

/// The node's request-response framing (`EnvelopeCodec` in node/src/p2p.rs): a request is
/// `u32 little-endian length ‖ one sealed envelope`, a response `u32 length ‖ frames`. This
/// peer writes requests exactly as given ([`framed`] adds the length), so it can also send
/// what breaks the framing.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl request_response::Codec for Raw {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let mut buf = Vec::new();
        io.take(1 << 20).read_to_end(&mut buf).await?;
        Ok(buf)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await?;
        let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
        io.read_exact(&mut buf).await?;
        Ok(buf)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        io.write_all(&req).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        p: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        self.write_request(p, io, res).await
    }
}

/// `bytes` behind its `u32` little-endian length, as the node frames a request.
fn framed(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

fn p2p_env(port: u16, bootstrap: Option<&str>) -> Vec<(String, String)> {
    let mut env = vec![(
        "FEDMESH_P2P__LISTEN".to_string(),
        format!("/ip4/127.0.0.1/tcp/{port}"),
    )];
    if let Some(b) = bootstrap {
        env.push(("FEDMESH_P2P__BOOTSTRAP".to_string(), b.to_string()));
    }
    env
}

fn node_id(node: &TestNode) -> String {
    node.wait_status("node id in /status", Duration::from_secs(10), |s| {
        s["node_id"].is_string()
    })["node_id"]
        .as_str()
        .expect("node_id")
        .to_string()
}

/// `fedmesh_p2p_rejected{peer,reason}` for `peer` and `reason`.
fn bad_framing(node: &TestNode) -> u64 {
    let (_, body) = http_get(node.http, "/metrics").expect("GET /metrics");
    body.lines()
        .filter(|l| l.starts_with("fedmesh_p2p_bad_framing_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn rejected(node: &TestNode, peer: &str, reason: &str) -> u64 {
    let (_, body) = http_get(node.http, "/metrics").expect("GET /metrics");
    body.lines()
        .filter(|l| {
            l.starts_with("fedmesh_p2p_rejected")
                && l.contains(&format!("peer=\"{peer}\""))
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_task_reports_over_request_response_are_refused_and_counted() {
    let (pa, pc) = (free_port(), free_port());
    let a = TestNode::start_with(p2p_env(pa, None)).expect("node A");
    let a_id = node_id(&a);
    let boot = format!("/ip4/127.0.0.1/tcp/{pa}/p2p/{a_id}");
    let c = TestNode::start_with(p2p_env(pc, Some(&boot))).expect("node C");
    let c_id: NodeId = node_id(&c).parse().expect("C's node id");

    // An agent on C that holds its task until told to answer.
    let (mut holder, _) = advertised_agent(c.mqtt_v4, "holder", "Doubles numbers", 4)
        .await
        .expect("agent advertised");
    a.wait_status("A learns C's agent", Duration::from_secs(20), |s| {
        has_remote_agent(s, "holder")
    });
    let mut req = connect(a.mqtt_v4, "req", &["fedmesh/v1/client/req/inbox"])
        .await
        .expect("requester");
    req.send(
        "fedmesh/v1/client/req/submit",
        json!({"request_id": "r1", "description": "double", "input": "21", "deadline_ms": 60000}),
    )
    .await
    .expect("submit");
    let task = holder
        .expect_within("task", Duration::from_secs(15))
        .await
        .expect("the task reaches the agent on C");
    let task_id = TaskId::from_hex(task["task_id"].as_str().expect("task_id")).expect("hex id");

    // The forger: a libp2p peer of its own, connected to A.
    let fkey = sample::key(77);
    let mut secret = fkey.secret_bytes();
    let kp = identity::Keypair::ed25519_from_bytes(&mut secret).expect("keypair");
    let mut swarm = SwarmBuilder::with_existing_identity(kp)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| {
            request_response::Behaviour::<Raw>::new(
                [(StreamProtocol::new("/fedmesh/rr/2"), ProtocolSupport::Full)],
                request_response::Config::default(),
            )
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let a_peer: PeerId = a_id.parse().expect("A's peer id");
    let a_addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{pa}").parse().expect("addr");
    swarm.add_peer_address(a_peer, a_addr);
    let holder_id = AgentId::new(c_id, AgentName::new("holder").expect("name"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let report = |m: &Message, at: u64| seal(&fkey, at, m).expect("seal");
    let progress = Message::Progress {
        task: task_id,
        agent: holder_id.clone(),
        percent: 99,
        note: "forged progress".into(),
    };
    let result = Message::Result {
        task: task_id,
        agent: holder_id.clone(),
        outcome: Outcome::Ok(b"forged".to_vec()),
    };
    // Host checks come before the signature (cheap first), so the broken signature is on a
    // report that names one of the forger's own agents.
    let own = Message::Result {
        task: task_id,
        agent: AgentId::new(fkey.node_id(), AgentName::new("holder").expect("name")),
        outcome: Outcome::Ok(b"forged".to_vec()),
    };
    let mut broken = report(&own, now + 2);
    let last = broken.len() - 1;
    broken[last] ^= 1;
    // Anti-entropy goes over request-response too (a sync answer is the owners' own signed
    // advertisements, sent directly), so the same peer also tries registry forgeries there:
    // an advertisement of another node's agent signed by itself, a digest signed by another
    // key than its own, and an exact-byte replay of its own genuine advertisement.
    let other = sample::key(79);
    let mut stolen = sample::vcv(&other, "rr-stolen", 1, now);
    stolen.agent = AgentId::new(other.node_id(), AgentName::new("rr-stolen").expect("name"));
    let own_ad = report(
        &Message::Advertise(sample::vcv(&fkey, "rr-own", 1, now)),
        now + 3,
    );
    let foreign_digest = seal(
        &sample::key(78),
        now,
        &Message::SyncDigest { entries: vec![] },
    )
    .expect("seal");
    // Task reports also travel as unsigned channel envelopes, whose sender is checked against
    // the noise-authenticated peer: one that claims to come from C (the real host) over the
    // forger's own connection, one from the forger naming C's agent, and a signed
    // advertisement relabelled as a channel envelope (registry messages are always signed).
    let claims_c = seal_channel(&c_id, now + 5, &result).expect("seal");
    let names_c = seal_channel(&fkey.node_id(), now + 6, &result).expect("seal");
    let mut relabelled = report(
        &Message::Advertise(sample::vcv(&fkey, "rr-relabelled", 1, now)),
        now + 7,
    );
    relabelled.truncate(relabelled.len() - 64);
    relabelled[0] = CHANNEL_VERSION;
    let forged: Vec<(&str, Vec<u8>)> = vec![
        ("host_mismatch", claims_c),
        ("host_mismatch", names_c),
        ("malformed", relabelled),
        ("host_mismatch", report(&progress, now)),
        ("host_mismatch", report(&result, now + 1)),
        ("bad_signature", broken),
        ("malformed", b"\x02 not an envelope".to_vec()),
        (
            "host_mismatch",
            report(&Message::Advertise(stolen), now + 4),
        ),
        ("host_mismatch", foreign_digest),
        ("accepted", own_ad.clone()),
        ("duplicate", own_ad),
    ];
    for (_, bytes) in &forged {
        swarm.behaviour_mut().send_request(&a_peer, framed(bytes));
    }
    let mut answered = 0;
    tokio::time::timeout(Duration::from_secs(15), async {
        while answered < forged.len() {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Response { .. },
                    ..
                }) => answered += 1,
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                    error, ..
                }) => panic!("a forged request was not answered: {error}"),
                _ => {}
            }
        }
    })
    .await
    .expect("the node answers (acknowledges) both forged requests");

    // A request that announces more than the node accepts breaks the framing: the node drops
    // the stream without an answer and counts it against the peer.
    swarm
        .behaviour_mut()
        .send_request(&a_peer, u32::MAX.to_le_bytes().to_vec());
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure { .. }) => break,
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Response { .. },
                    ..
                }) => panic!("the node answered a badly framed request"),
                _ => {}
            }
        }
    })
    .await
    .expect("the badly framed request fails");
    let forger = fkey.node_id().to_string();
    // libp2p does not tell the behaviour who sent a request that failed to read, so this one
    // is counted without a peer. The forger may see its stream fail before the node counts.
    let counted = std::time::Instant::now();
    while bad_framing(&a) == 0 && counted.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(bad_framing(&a), 1, "the badly framed request is counted");

    for reason in ["host_mismatch", "bad_signature", "malformed", "duplicate"] {
        let expected = forged.iter().filter(|(r, _)| *r == reason).count() as u64;
        assert_eq!(
            rejected(&a, &forger, reason),
            expected,
            "forged requests counted for the forger under {reason}"
        );
    }
    // The genuine advertisement got in over request-response (so the second copy was a true
    // replay); the stolen one did not.
    let names = |s: &serde_json::Value| -> Vec<String> {
        s["agents"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|x| {
                        x["id"]
                            .as_str()?
                            .rsplit_once('@')
                            .map(|(n, _)| n.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let status = a.wait_status("own advertisement listed", Duration::from_secs(10), |s| {
        names(s).iter().any(|n| n == "rr-own")
    });
    let names = names(&status);
    assert!(
        !names.iter().any(|n| n == "rr-stolen"),
        "stolen advertisement listed: {names:?}"
    );
    // Neither reached the requester: no result, no status carrying the forged note.
    let early = tokio::time::timeout(Duration::from_millis(1500), async {
        loop {
            let (_, v) = req.rx.recv().await?;
            if v["type"] == "result" || v.to_string().contains("forged") {
                return Some(v);
            }
        }
    })
    .await;
    assert!(
        !matches!(early, Ok(Some(_))),
        "a forged report reached the requester: {early:?}"
    );

    // The genuine result still completes the task.
    holder
        .send(
            "fedmesh/v1/agent/holder/result",
            json!({"task_id": task["task_id"], "output": "42"}),
        )
        .await
        .expect("result");
    let r = req
        .expect_within("result", Duration::from_secs(15))
        .await
        .expect("the genuine result returns to A");
    assert_eq!(r["output"], "42", "{r}");
}
