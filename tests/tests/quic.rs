//! Federation over QUIC only: two real `fedmesh run` processes on 127.0.0.1 with
//! `p2p.quic = true` and nothing but a `/udp/<port>/quic-v1` listen address. The agent on C
//! serves a task submitted at A (advertisement by gossip, offer and result by request-response,
//! all over QUIC).

use std::net::UdpSocket;
use std::time::Duration;

use fedmesh_tests::mqtt::{advertised_agent, connect};
use fedmesh_tests::{TestNode, has_remote_agent};
use serde_json::json;

/// A free loopback UDP port (bound then released).
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free udp port")
}

fn quic_env(port: u16, bootstrap: Option<&str>) -> Vec<(String, String)> {
    let mut env = vec![
        ("FEDMESH_P2P__QUIC".to_string(), "true".to_string()),
        (
            "FEDMESH_P2P__LISTEN".to_string(),
            format!("/ip4/127.0.0.1/udp/{port}/quic-v1"),
        ),
        ("FEDMESH_P2P__SYNC_INTERVAL_S".to_string(), "2".to_string()),
    ];
    if let Some(b) = bootstrap {
        env.push(("FEDMESH_P2P__BOOTSTRAP".to_string(), b.to_string()));
    }
    env
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_route_a_task_over_quic_only() {
    let (pa, pc) = (free_udp_port(), free_udp_port());
    let a = TestNode::start_with(quic_env(pa, None)).expect("node A");
    let s = a.wait_status("A listens", Duration::from_secs(10), |s| {
        !strings(&s["p2p"]["listen"]).is_empty()
    });
    let listen = strings(&s["p2p"]["listen"]);
    assert!(
        listen
            .iter()
            .all(|l| l.starts_with(&format!("/ip4/127.0.0.1/udp/{pa}/quic-v1/p2p/"))),
        "A listens on QUIC only: {listen:?}"
    );
    let boot = listen[0].clone();
    let c = TestNode::start_with(quic_env(pc, Some(&boot))).expect("node C");
    a.wait_status("A and C connect", Duration::from_secs(20), |s| {
        !strings(&s["p2p"]["peers"]).is_empty()
    });
    assert!(
        a.log().contains("quic-v1"),
        "A logs a QUIC connection:\n{}",
        a.log()
    );

    let (mut w, _) = advertised_agent(c.mqtt_v4, "worker", "Doubles numbers", 4)
        .await
        .expect("agent advertised");
    a.wait_status("A learns C's agent", Duration::from_secs(20), |s| {
        has_remote_agent(s, "worker")
    });

    let mut req = connect(a.mqtt_v4, "req", &["fedmesh/v1/client/req/inbox"])
        .await
        .expect("requester");
    req.send(
        "fedmesh/v1/client/req/submit",
        json!({"request_id": "q1", "description": "double", "input": "21", "deadline_ms": 120000}),
    )
    .await
    .expect("submit");
    req.expect("accepted").await.expect("accepted");
    let task = w
        .expect_within("task", Duration::from_secs(15))
        .await
        .expect("task reaches the agent on C over QUIC");
    assert_eq!(task["input"], "21", "{task}");
    w.send(
        "fedmesh/v1/agent/worker/result",
        json!({"task_id": task["task_id"], "output": "42"}),
    )
    .await
    .expect("result");
    let r = req
        .expect_within("result", Duration::from_secs(15))
        .await
        .expect("result returns to A over QUIC");
    assert_eq!(r["output"], "42", "{r}");
    assert_eq!(r["request_id"], "q1");
}
