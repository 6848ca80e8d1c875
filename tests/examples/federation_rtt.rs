//! Cross-node task round trip benchmark (issue #4.6): three real `fedmesh run` processes on
//! loopback (A the bootstrap, B and C bootstrapping from A), one echo agent on C, the requester at
//! A: submit at A → route → offer to C by request-response (C persists and flushes the hosted
//! task) → agent on C → result back to A by request-response (A persists) → requester.
//!
//! ```sh
//! cargo build --release -p fedmesh-node && cargo run --release -p fedmesh-tests --example federation_rtt -- 5000 32
//! ```
//! Arguments: number of tasks (default 5000), tasks in flight (default 32). In the same run it
//! measures two baselines: a raw tokio TCP loopback echo (64-byte messages, TCP_NODELAY) and the
//! local task round trip (requester and agent on the same node, C). Prints one table.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fedmesh_tests::mqtt::{connect, percentile, spawn_echo_agent};
use fedmesh_tests::{TestNode, free_port};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn node_env(port: u16, bootstrap: Option<&str>) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "FEDMESH_P2P__LISTEN".to_string(),
            format!("/ip4/127.0.0.1/tcp/{port}"),
        ),
        (
            "FEDMESH_LIMITS__MAX_QUEUE_DEPTH".to_string(),
            "16384".to_string(),
        ),
    ];
    if let Some(b) = bootstrap {
        env.push(("FEDMESH_P2P__BOOTSTRAP".to_string(), b.to_string()));
    }
    env
}

fn wait_status(
    what: &str,
    node: &TestNode,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(s) = node.status()
            && pred(&s)
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("{what}: not within 30 s; status: {:?}", node.status().ok());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn p2p_addr(node: &TestNode, port: u16) -> anyhow::Result<String> {
    wait_status("node id", node, |s| s["node_id"].is_string())?;
    let id = node.status()?["node_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Ok(format!("/ip4/127.0.0.1/tcp/{port}/p2p/{id}"))
}

/// One measurement: (tasks/s, sorted latencies, failed tasks).
struct Run {
    rate: f64,
    lat: Vec<Duration>,
    failed: usize,
}

/// `tasks` submissions at `node` with at most `window` in flight.
async fn tasks(node: &TestNode, tasks: usize, window: usize, tag: &str) -> anyhow::Result<Run> {
    let id = format!("req-{tag}");
    let mut req = connect(
        node.mqtt_v4,
        &id,
        &[&format!("fedmesh/v1/client/{id}/inbox")],
    )
    .await?;
    let submit = format!("fedmesh/v1/client/{id}/submit");
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let mut lat = Vec::with_capacity(tasks);
    let mut failed = 0;
    let start = Instant::now();
    let mut next = 0;
    while lat.len() + failed < tasks {
        while next < tasks && sent.len() < window {
            let rid = format!("{tag}-{next}");
            sent.insert(rid.clone(), Instant::now());
            req.send(
                &submit,
                json!({"request_id": rid, "description": "echo", "input": "x"}),
            )
            .await?;
            next += 1;
        }
        let v = req.expect_within("result", Duration::from_secs(30)).await?;
        if let Some(t) = v["request_id"].as_str().and_then(|r| sent.remove(r)) {
            if v["output"] == "x" {
                lat.push(t.elapsed());
            } else {
                failed += 1;
                if failed <= 3 {
                    eprintln!("{tag}: task failed: {v}");
                }
            }
        }
    }
    let rate = tasks as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    Ok(Run { rate, lat, failed })
}

/// Raw TCP loopback echo of 64-byte messages (tokio, TCP_NODELAY on both ends).
async fn tcp_echo(n: usize, window: usize) -> anyhow::Result<Run> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; 64];
        loop {
            if s.read_exact(&mut buf).await.is_err() {
                return anyhow::Ok(());
            }
            s.write_all(&buf).await?;
        }
    });
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (mut rd, mut wr) = s.into_split();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Instant>(window.max(1));
    // Writer: keeps `window` messages in flight (the channel's capacity is the window).
    let writer = tokio::spawn(async move {
        let msg = [7u8; 64];
        for _ in 0..n {
            let permit = tx.reserve().await?;
            permit.send(Instant::now());
            wr.write_all(&msg).await?;
        }
        anyhow::Ok(wr)
    });
    let mut lat = Vec::with_capacity(n);
    let mut buf = [0u8; 64];
    let start = Instant::now();
    while lat.len() < n {
        let t = rx
            .recv()
            .await
            .ok_or_else(|| anyhow::anyhow!("writer gone"))?;
        rd.read_exact(&mut buf).await?;
        lat.push(t.elapsed());
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(writer.await??);
    drop(rd);
    let _ = server.await;
    lat.sort();
    Ok(Run {
        rate,
        lat,
        failed: 0,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(5000);
    let window = args.get(1).copied().unwrap_or(32);
    let seq_n = 2000.min(n);

    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let a = TestNode::start_with(node_env(pa, None))?;
    let boot = p2p_addr(&a, pa)?;
    let _b = TestNode::start_with(node_env(pb, Some(&boot)))?;
    let c = TestNode::start_with(node_env(pc, Some(&boot)))?;
    wait_status("A sees B and C", &a, |s| {
        s["p2p"]["peers"].as_array().map_or(0, Vec::len) >= 2
    })?;

    // The echo agent, on C only.
    let agent_task = spawn_echo_agent(c.mqtt_v4, "echo", Duration::from_secs(120)).await?;
    wait_status("A lists C's agent", &a, |s| {
        s["agents"].as_array().is_some_and(|v| {
            v.iter().any(|x| {
                x["local"] == false && x["id"].as_str().is_some_and(|i| i.starts_with("echo@"))
            })
        })
    })?;

    let mut rows: Vec<(String, Run)> = Vec::new();
    let tcp_p = tcp_echo(n.max(20_000), window).await?;
    let tcp_s = tcp_echo(n.max(20_000), 1).await?;
    rows.push((format!("raw TCP echo, 64 B, {window} in flight"), tcp_p));
    rows.push(("raw TCP echo, 64 B, 1 in flight".into(), tcp_s));

    tasks(&a, 300, window, "warm-x").await?;
    rows.push((
        format!("cross-node A→C, {window} in flight"),
        tasks(&a, n, window, "x-pipe").await?,
    ));
    rows.push((
        "cross-node A→C, 1 in flight".into(),
        tasks(&a, seq_n, 1, "x-seq").await?,
    ));
    tasks(&c, 300, window, "warm-l").await?;
    rows.push((
        format!("local C→C, {window} in flight"),
        tasks(&c, n, window, "l-pipe").await?,
    ));
    rows.push((
        "local C→C, 1 in flight".into(),
        tasks(&c, seq_n, 1, "l-seq").await?,
    ));
    agent_task.abort();

    let tcp_p50 = percentile(&rows[1].1.lat, 0.5).as_secs_f64();
    println!(
        "| mode | n | failed | per s | p50 | p99 | p50 / raw TCP p50 (1 in flight) |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for (name, r) in &rows {
        let p50 = percentile(&r.lat, 0.5);
        println!(
            "| {name} | {} | {} | {:.0} | {:.3} ms | {:.3} ms | {:.0}× |",
            r.lat.len() + r.failed,
            r.failed,
            r.rate,
            p50.as_secs_f64() * 1e3,
            percentile(&r.lat, 0.99).as_secs_f64() * 1e3,
            p50.as_secs_f64() / tcp_p50
        );
    }
    if let Ok((_, m)) = fedmesh_tests::http_get(a.http, "/metrics") {
        let dir = std::env::temp_dir().join("federation_rtt");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("metrics-a.txt"), m)?;
        if let Ok((_, m)) = fedmesh_tests::http_get(c.http, "/metrics") {
            std::fs::write(dir.join("metrics-c.txt"), m)?;
        }
        eprintln!("node metrics written to {}", dir.display());
    }
    Ok(())
}
