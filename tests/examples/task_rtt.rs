//! Local task round trip benchmark (issue #3.9b): submit → echo agent → result, through a real
//! node with durable state, over MQTT on loopback.
//!
//! ```sh
//! cargo build --release -p fedmesh-node && cargo run --release -p fedmesh-tests --example task_rtt -- 20000 64
//! ```
//! Arguments: number of tasks (default 20000), tasks in flight (default 64). Prints tasks/s and
//! the submit→result latency p50/p99, plus a sequential (1 in flight) p50/p99.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fedmesh_tests::TestNode;
use fedmesh_tests::mqtt::{connect, percentile, spawn_echo_agent};
use serde_json::json;

async fn run(
    node: &TestNode,
    tasks: usize,
    window: usize,
    tag: &str,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let agent_task = spawn_echo_agent(node.mqtt_v4, "echo", Duration::from_secs(30)).await?;
    let mut req = connect(node.mqtt_v4, "bench", &["fedmesh/v1/client/bench/inbox"]).await?;
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let mut lat = Vec::with_capacity(tasks);
    let start = Instant::now();
    let mut next = 0;
    while lat.len() < tasks {
        while next < tasks && sent.len() < window {
            let rid = format!("{tag}-{next}");
            sent.insert(rid.clone(), Instant::now());
            req.send(
                "fedmesh/v1/client/bench/submit",
                json!({"request_id": rid, "description": "echo", "input": "x"}),
            )
            .await?;
            next += 1;
        }
        let v = req.expect("result").await?;
        if let Some(t) = v["request_id"].as_str().and_then(|r| sent.remove(r)) {
            lat.push(t.elapsed());
        }
    }
    let rate = tasks as f64 / start.elapsed().as_secs_f64();
    agent_task.abort();
    lat.sort();
    Ok((rate, lat))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let tasks = args.first().copied().unwrap_or(20_000);
    let window = args.get(1).copied().unwrap_or(64);
    let node = TestNode::start_with(vec![(
        "FEDMESH_LIMITS__MAX_QUEUE_DEPTH".into(),
        "16384".into(),
    )])?;
    let _ = run(&node, 500, window, "warm").await?;
    let (rate, lat) = run(&node, tasks, window, "load").await?;
    println!(
        "pipelined ({window} in flight): {tasks} tasks, {rate:.0} tasks/s, p50 {:?}, p99 {:?}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    let (rate1, lat1) = run(&node, 2000.min(tasks), 1, "seq").await?;
    println!(
        "sequential (1 in flight): {rate1:.0} tasks/s, p50 {:?}, p99 {:?}",
        percentile(&lat1, 0.5),
        percentile(&lat1, 0.99)
    );
    Ok(())
}
