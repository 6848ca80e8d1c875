//! Federation over libp2p with real `fedmesh run` processes on loopback: registry replication,
//! a task submitted at one node served by an agent on another, and `kill -9` of either node
//! mid-task.

use std::time::{Duration, Instant};

use fedmesh_tests::mqtt::{Client, advertised_agent, connect};
use fedmesh_tests::{TestNode, free_port, has_remote_agent};
use serde_json::json;

fn p2p_env(port: u16, bootstrap: Option<&str>) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "FEDMESH_P2P__LISTEN".to_string(),
            format!("/ip4/127.0.0.1/tcp/{port}"),
        ),
        ("FEDMESH_P2P__SYNC_INTERVAL_S".to_string(), "2".to_string()),
    ];
    if let Some(b) = bootstrap {
        env.push(("FEDMESH_P2P__BOOTSTRAP".to_string(), b.to_string()));
    }
    env
}

fn addr_of(node: &TestNode, port: u16) -> String {
    node.wait_status("node id in /status", Duration::from_secs(10), |s| {
        s["node_id"].is_string()
    });
    let id = node.status().expect("status")["node_id"]
        .as_str()
        .expect("node_id")
        .to_string();
    format!("/ip4/127.0.0.1/tcp/{port}/p2p/{id}")
}

fn peers(s: &serde_json::Value) -> usize {
    s["p2p"]["peers"].as_array().map_or(0, Vec::len)
}

async fn worker(node: &TestNode) -> Client {
    advertised_agent(node.mqtt_v4, "worker", "Doubles numbers", 4)
        .await
        .expect("agent advertised")
        .0
}

async fn answer(a: &Client, task: &serde_json::Value) {
    let x: u64 = task["input"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    a.send(
        "fedmesh/v1/agent/worker/result",
        json!({"task_id": task["task_id"], "output": (2 * x).to_string()}),
    )
    .await
    .expect("result");
}

fn submit(id: &str, input: &str) -> serde_json::Value {
    json!({"request_id": id, "description": "double", "input": input, "deadline_ms": 120000})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_route_a_task_across_the_mesh() {
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let a = TestNode::start_with(p2p_env(pa, None)).expect("node A");
    let boot = addr_of(&a, pa);
    let b = TestNode::start_with(p2p_env(pb, Some(&boot))).expect("node B");
    let c = TestNode::start_with(p2p_env(pc, Some(&boot))).expect("node C");
    a.wait_status("A sees B and C", Duration::from_secs(20), |s| peers(s) >= 2);

    let w = worker(&c).await;
    a.wait_status("A learns C's agent", Duration::from_secs(20), |s| {
        has_remote_agent(s, "worker")
    });
    b.wait_status("B learns C's agent", Duration::from_secs(20), |s| {
        has_remote_agent(s, "worker")
    });

    let mut req = connect(a.mqtt_v4, "req", &["fedmesh/v1/client/req/inbox"])
        .await
        .expect("requester");
    req.send("fedmesh/v1/client/req/submit", submit("r1", "21"))
        .await
        .expect("submit");
    req.expect("accepted").await.expect("accepted");
    let mut w = w;
    let task = w
        .expect_within("task", Duration::from_secs(15))
        .await
        .expect("task reaches the agent on C");
    answer(&w, &task).await;
    let r = req
        .expect_within("result", Duration::from_secs(15))
        .await
        .expect("result returns to A");
    assert_eq!(r["output"], "42", "{r}");
    assert_eq!(r["request_id"], "r1");

    // A requester at B is served by the same agent (B was never connected to C by bootstrap).
    let mut req_b = connect(b.mqtt_v4, "reqb", &["fedmesh/v1/client/reqb/inbox"])
        .await
        .expect("requester at B");
    req_b
        .send("fedmesh/v1/client/reqb/submit", submit("rb", "5"))
        .await
        .expect("submit");
    let task = w
        .expect_within("task", Duration::from_secs(15))
        .await
        .expect("task from B reaches the agent on C");
    answer(&w, &task).await;
    let r = req_b
        .expect_within("result", Duration::from_secs(15))
        .await
        .expect("result returns to B");
    assert_eq!(r["output"], "10", "{r}");

    // A node that joins later learns the agent by anti-entropy (no new advertisement is sent).
    let d = TestNode::start_with(p2p_env(free_port(), Some(&boot))).expect("node D");
    d.wait_status("D learns C's agent by sync", Duration::from_secs(20), |s| {
        has_remote_agent(s, "worker")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosting_node_killed_mid_task_still_completes() {
    let (pa, pc) = (free_port(), free_port());
    let a = TestNode::start_with(p2p_env(pa, None)).expect("node A");
    let boot = addr_of(&a, pa);
    let mut c = TestNode::start_with(p2p_env(pc, Some(&boot))).expect("node C");
    a.wait_status("A sees C", Duration::from_secs(20), |s| peers(s) >= 1);
    let mut w = worker(&c).await;
    a.wait_status("A learns C's agent", Duration::from_secs(20), |s| {
        has_remote_agent(s, "worker")
    });
    let mut req = connect(a.mqtt_v4, "req", &["fedmesh/v1/client/req/inbox"])
        .await
        .expect("requester");
    req.send("fedmesh/v1/client/req/submit", submit("k1", "8"))
        .await
        .expect("submit");
    let task = w
        .expect_within("task", Duration::from_secs(15))
        .await
        .expect("task on C");
    // C dies holding the task; the agent comes back after C restarts.
    c.kill9();
    drop(w);
    c.restart().expect("restart C");
    a.wait_status("A sees C again", Duration::from_secs(30), |s| peers(s) >= 1);
    let mut w = worker(&c).await;
    let again = w
        .expect_within("task", Duration::from_secs(15))
        .await
        .expect("the restarted node hands the hosted task to the agent again");
    assert_eq!(again["task_id"], task["task_id"]);
    answer(&w, &again).await;
    let r = req
        .expect_within("result", Duration::from_secs(30))
        .await
        .expect("result returns to A");
    assert_eq!(r["output"], "16", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_node_killed_mid_task_still_completes() {
    let (pa, pc) = (free_port(), free_port());
    let mut a = TestNode::start_with(p2p_env(pa, None)).expect("node A");
    let boot = addr_of(&a, pa);
    let c = TestNode::start_with(p2p_env(pc, Some(&boot))).expect("node C");
    a.wait_status("A sees C", Duration::from_secs(20), |s| peers(s) >= 1);
    let mut w = worker(&c).await;
    a.wait_status("A learns C's agent", Duration::from_secs(20), |s| {
        has_remote_agent(s, "worker")
    });
    let mut req = connect(a.mqtt_v4, "req", &["fedmesh/v1/client/req/inbox"])
        .await
        .expect("requester");
    req.send("fedmesh/v1/client/req/submit", submit("o1", "50"))
        .await
        .expect("submit");
    req.expect("accepted").await.expect("accepted");
    let task = w
        .expect_within("task", Duration::from_secs(15))
        .await
        .expect("task on C");
    // A dies; the agent answers while A is down; C keeps the result until A acknowledges it.
    a.kill9();
    drop(req);
    answer(&w, &task).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.restart().expect("restart A");
    let mut req = connect(a.mqtt_v4, "req", &["fedmesh/v1/client/req/inbox"])
        .await
        .expect("requester");
    // The result may arrive on its own, or as the answer to a repeated (idempotent) submit.
    let start = Instant::now();
    let r = loop {
        req.send("fedmesh/v1/client/req/submit", submit("o1", "50"))
            .await
            .expect("resubmit");
        if let Ok(r) = req.expect_within("result", Duration::from_secs(3)).await {
            break r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "no result after the origin restarted"
        );
    };
    assert_eq!(r["output"], "100", "{r}");
    assert_eq!(r["request_id"], "o1");
    a.wait_status(
        "A records the task completed",
        Duration::from_secs(5),
        |s| s["tasks"]["completed"] == 1,
    );
}

/// A bootstrap peer named by a DNS name (`/dns4/localhost/...`, answered without a query, RFC
/// 6761) is resolved and joined; a bootstrap address that fails (here the right address with
/// the wrong peer id) is reported in the log at the default level, naming the address, and
/// counted in `/metrics`, and the node keeps serving and joins through the good one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_by_dns_name_and_a_failing_bootstrap_is_reported() {
    let pa = free_port();
    let a = TestNode::start_with(p2p_env(pa, None)).expect("node A");
    let id = addr_of(&a, pa)
        .rsplit('/')
        .next()
        .expect("peer id")
        .to_string();
    // Any valid peer id that is not A's.
    let wrong = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";
    assert_ne!(id, wrong);
    let good = format!("/dns4/localhost/tcp/{pa}/p2p/{id}");
    let bad = format!("/dns4/localhost/tcp/{pa}/p2p/{wrong}");
    let b =
        TestNode::start_with(p2p_env(free_port(), Some(&format!("{bad},{good}")))).expect("node B");
    b.wait_status(
        "B joins A through its DNS name",
        Duration::from_secs(20),
        |s| {
            s["p2p"]["peers"]
                .as_array()
                .is_some_and(|p| p.iter().any(|x| x.as_str() == Some(id.as_str())))
        },
    );
    let start = Instant::now();
    while !b.log().contains("dialling a bootstrap peer failed") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "B reports the failing bootstrap address:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = b.log();
    let line = log
        .lines()
        .find(|l| l.contains("dialling a bootstrap peer failed"))
        .expect("line");
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(&bad), "the line names the address: {line}");
    assert!(
        !log.lines()
            .any(|l| l.contains("dialling a bootstrap peer failed") && l.contains(&good)),
        "the good address is never reported:\n{log}"
    );
    let (code, metrics) = fedmesh_tests::http_get(b.http, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    let dial_errors = metrics
        .lines()
        .find(|l| l.contains("errors_total") && l.contains("p2p_bootstrap_dial"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(dial_errors >= 1.0, "counted in /metrics:\n{metrics}");
    // Still serving.
    assert!(b.status().is_ok());
}
