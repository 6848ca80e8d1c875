//! Where the cross-node round trip spends its time: two real nodes (A, C) on loopback, an echo
//! agent on C, tasks submitted at A one at a time. Run with the nodes' hop tracing on and keep
//! their logs:
//!
//! ```sh
//! cargo build --release -p fedmesh-node
//! FEDMESH_TEST_LOG=warn,fedmesh_hop=debug cargo run --release -p fedmesh-tests --example federation_hops -- 500 /tmp/hops
//! ```
//! Writes `a.log`, `c.log` (the nodes' logs, µs timestamps) and `client.log` (one line per task:
//! submit and result wall-clock times in µs) to the directory given.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fedmesh_tests::mqtt::{connect, spawn_echo_agent};
use fedmesh_tests::{TestNode, free_port};
use serde_json::json;

fn node_env(port: u16, bootstrap: Option<&str>) -> Vec<(String, String)> {
    let mut env = vec![(
        "FEDMESH_P2P__LISTEN".to_string(),
        format!("/ip4/127.0.0.1/tcp/{port}"),
    )];
    if let Some(b) = bootstrap {
        env.push(("FEDMESH_P2P__BOOTSTRAP".to_string(), b.to_string()));
    }
    env
}

fn wait_status(node: &TestNode, pred: impl Fn(&serde_json::Value) -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(s) = node.status()
            && pred(&s)
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("not within 30 s: {:?}", node.status().ok());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wall_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);
    let dir = std::path::PathBuf::from(args.next().unwrap_or_else(|| "/tmp/hops".into()));
    std::fs::create_dir_all(&dir)?;

    let (pa, pc) = (free_port(), free_port());
    let a = TestNode::start_with(node_env(pa, None))?;
    wait_status(&a, |s| s["node_id"].is_string())?;
    let id = a.status()?["node_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let boot = format!("/ip4/127.0.0.1/tcp/{pa}/p2p/{id}");
    let c = TestNode::start_with(node_env(pc, Some(&boot)))?;
    let agent = spawn_echo_agent(c.mqtt_v4, "echo", Duration::from_secs(120)).await?;
    wait_status(&a, |s| {
        s["agents"].as_array().is_some_and(|v| {
            v.iter().any(|x| {
                x["local"] == false && x["id"].as_str().is_some_and(|i| i.starts_with("echo@"))
            })
        })
    })?;

    let mut req = connect(a.mqtt_v4, "req", &["fedmesh/v1/client/req/inbox"]).await?;
    let mut lines = String::new();
    let mut lat = Vec::new();
    for i in 0..n + 100 {
        let t0 = wall_us();
        let s = Instant::now();
        req.send(
            "fedmesh/v1/client/req/submit",
            json!({"request_id": format!("h{i}"), "description": "echo", "input": "x"}),
        )
        .await?;
        let v = req.expect_within("result", Duration::from_secs(30)).await?;
        let t1 = wall_us();
        if i >= 100 {
            lat.push(s.elapsed());
            lines.push_str(&format!("{} {t0} {t1} {}\n", v["task_id"], t1 - t0));
        }
    }
    agent.abort();
    lat.sort();
    eprintln!(
        "{n} tasks one at a time: p50 {:?}, p99 {:?}",
        fedmesh_tests::mqtt::percentile(&lat, 0.5),
        fedmesh_tests::mqtt::percentile(&lat, 0.99)
    );
    std::fs::write(dir.join("client.log"), lines)?;
    std::fs::write(dir.join("a.log"), a.log())?;
    std::fs::write(dir.join("c.log"), c.log())?;
    eprintln!("logs in {}", dir.display());
    Ok(())
}
