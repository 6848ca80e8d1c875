//! `kill -9` mid-flight: nothing accepted is lost, nothing is answered with two different results.

use std::collections::HashMap;
use std::time::Duration;

use fedmesh_tests::TestNode;
use fedmesh_tests::mqtt::{Client, advertised_agent, connect};
use serde_json::json;

const TASKS: usize = 30;

async fn agent(node: &TestNode) -> Client {
    advertised_agent(node.mqtt_v4, "worker", "Doubles numbers", 8)
        .await
        .expect("agent advertised")
        .0
}

async fn answer(a: &mut Client, max: usize, within: Duration) -> usize {
    let mut n = 0;
    while n < max {
        let Ok(task) = a.expect_within("task", within).await else {
            break;
        };
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
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_flight_loses_nothing() {
    let mut node = TestNode::start().expect("node");
    let mut worker = agent(&node).await;
    let mut req = connect(node.mqtt_v4, "req", &["fedmesh/v1/client/req/inbox"])
        .await
        .expect("requester");
    let mut accepted = HashMap::new();
    for i in 0..TASKS {
        req.send("fedmesh/v1/client/req/submit", json!({"request_id": format!("r{i}"), "description": "double", "input": i.to_string(), "deadline_ms": 120000}))
            .await
            .expect("submit");
    }
    while accepted.len() < TASKS {
        let v = req.expect("accepted").await.expect("accepted");
        accepted.insert(
            v["request_id"].as_str().unwrap_or_default().to_string(),
            v["task_id"].clone(),
        );
    }
    // Answer a few, then kill the node with tasks assigned, running and waiting.
    answer(&mut worker, 5, Duration::from_secs(5)).await;
    let mut results: HashMap<String, Vec<String>> = HashMap::new();
    while let Ok(Ok(v)) =
        tokio::time::timeout(Duration::from_millis(300), req.expect("result")).await
    {
        results
            .entry(v["request_id"].as_str().unwrap_or_default().into())
            .or_default()
            .push(v["output"].as_str().unwrap_or_default().into());
    }
    node.kill9();
    drop(worker);
    drop(req);
    node.restart().expect("restart");

    let mut req = connect(node.mqtt_v4, "req", &["fedmesh/v1/client/req/inbox"])
        .await
        .expect("requester again");
    let mut worker = agent(&node).await;
    let served =
        tokio::spawn(async move { answer(&mut worker, TASKS * 2, Duration::from_secs(5)).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while results.len() < TASKS && tokio::time::Instant::now() < deadline {
        // Ask for the status of what is missing: results published before the kill may have
        // gone to the old connection.
        if let Ok(Ok(v)) = tokio::time::timeout(Duration::from_secs(2), req.expect("result")).await
        {
            results
                .entry(v["request_id"].as_str().unwrap_or_default().into())
                .or_default()
                .push(v["output"].as_str().unwrap_or_default().into());
            continue;
        }
        for i in 0..TASKS {
            let rid = format!("r{i}");
            if !results.contains_key(&rid) {
                req.send("fedmesh/v1/client/req/status", json!({"request_id": rid}))
                    .await
                    .expect("status");
            }
        }
        while let Ok(Ok(v)) =
            tokio::time::timeout(Duration::from_millis(500), req.expect("status")).await
        {
            if v["state"] == "completed" {
                results
                    .entry(v["request_id"].as_str().unwrap_or_default().into())
                    .or_default()
                    .push(v["output"].as_str().unwrap_or_default().into());
            }
        }
    }
    served.abort();
    for i in 0..TASKS {
        let rid = format!("r{i}");
        let got = results
            .get(&rid)
            .unwrap_or_else(|| panic!("{rid} lost after kill -9; log:\n{}", node.log()));
        let want = (2 * i).to_string();
        assert!(
            got.iter().all(|o| o == &want),
            "{rid} answered with different results: {got:?}"
        );
    }
    // /status is refreshed every 500 ms.
    let mut status = node.status().expect("status");
    for _ in 0..40 {
        if status["tasks"]["completed"] == TASKS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = node.status().expect("status");
    }
    assert_eq!(status["tasks"]["completed"], TASKS, "{status}");
}

/// SIGTERM (`docker stop`, systemd, `kill`) stops the node cleanly: it logs "shutting down",
/// flushes and exits 0 well within Docker's 10 s grace period, and a task accepted before it
/// is still there after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_is_harmless_and_sigterm_shuts_down_cleanly_keeping_accepted_tasks() {
    let mut node = TestNode::start().expect("node");
    let worker = agent(&node).await;
    let mut req = connect(node.mqtt_v4, "req", &["fedmesh/v1/client/req/inbox"])
        .await
        .expect("requester");
    req.send(
        "fedmesh/v1/client/req/submit",
        json!({"request_id": "t1", "description": "double", "input": "21", "deadline_ms": 120000}),
    )
    .await
    .expect("submit");
    let accepted = req.expect("accepted").await.expect("accepted");
    // SIGHUP reloads TLS certificates; without a TLS listener it is logged and ignored,
    // never fatal (its default action would kill the node).
    node.signal("HUP");
    let start = std::time::Instant::now();
    while !node.log().contains("SIGHUP: no TLS listener") {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", node.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Clients gone first: they would reconnect to the restarted node under the same ids.
    drop(req);
    drop(worker);
    let status = node
        .terminate(Duration::from_secs(8))
        .expect("exited within 8 s of SIGTERM");
    assert!(status.success(), "exit status {status:?}\n{}", node.log());
    let log = node.log();
    assert!(log.contains("shutting down"), "{log}");
    // Written to a file: no colour codes. The clients' clean DISCONNECTs and the watchdog's
    // probes are not rumqttd `error` lines.
    assert!(!log.contains('\u{1b}'), "{log:?}");
    assert!(!log.contains("router-drop"), "{log}");

    node.restart().expect("restart");
    let mut worker = agent(&node).await;
    let task = worker
        .expect_within("task", Duration::from_secs(20))
        .await
        .expect("the accepted task is delivered after the restart");
    assert_eq!(task["task_id"], accepted["task_id"]);
}
