//! Hidden benchmarks (`fedmesh bench ...`, not shown in `--help`): measurements that need the
//! node's private parts (its libp2p behaviour) and so cannot live in an external crate.
//!
//! `fedmesh bench gossip` (issue #4.6): advertisement propagation over an in-process mesh of
//! real node swarms ([`p2p::memory_swarm_observed`]: the node's own behaviour — gossipsub with
//! its config and peer scoring, Kademlia, identify, ping, request-response — over
//! `/memory/N` + noise + yamux), each driven by the node's own swarm task ([`p2p::start`]) and
//! validating every gossip message as the node does ([`p2p::check_gossip`]: open the envelope,
//! check its ed25519 signature and that its signer is the libp2p author) before reporting
//! Accept. One node publishes a sealed `Advertise` every `interval_ms`; for each one we record
//! when every other node's shell received it, and count every copy any behaviour received
//! (duplicates included) through the gossipsub message-id hook.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use fedmesh_config::Config;
use fedmesh_protocol::{Message, sample};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::p2p::{self, Command, Event, GossipObserver, REGISTRY_TOPIC};

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Advertisement propagation over an in-process mesh of real node swarms.
    Gossip(GossipArgs),
}

/// `fedmesh bench gossip` arguments.
#[derive(Args, Debug)]
pub struct GossipArgs {
    /// Nodes in the mesh (at most 255).
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// Advertisements published.
    #[arg(long, default_value_t = 50)]
    ads: usize,
    /// Time between two advertisements, in ms.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Random earlier nodes each node dials, besides the bootstrap node 0.
    #[arg(long, default_value_t = 3)]
    degree: usize,
    /// Wait after every node is connected, for gossipsub meshes to form, in seconds.
    #[arg(long, default_value_t = 5)]
    settle_s: u64,
    /// Seed of the topology.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// `p2p.max_connections` of every node (default: the config's). Kademlia connects every
    /// node to nearly every other in a mesh this small; a low cap keeps the mesh sparse, so
    /// advertisements travel several hops instead of one flood-published hop.
    #[arg(long)]
    max_connections: Option<u32>,
}

/// Runs a benchmark.
pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Gossip(a) => gossip(a).await,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

type Id = [u8; 32];

fn pct<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

/// CPU time of this process so far (user + system), from `/proc/self/stat` (Linux; 0 elsewhere).
fn cpu_time() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            // Fields 14 and 15 (utime, stime); `rest` starts at field 3.
            Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10) // USER_HZ = 100 on Linux
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn gossip(a: GossipArgs) -> anyhow::Result<()> {
    let n = a.nodes.clamp(2, 255);
    let mut cfg = Config::default();
    if let Some(m) = a.max_connections {
        cfg.p2p.max_connections = m;
    }
    let metrics = Arc::new(Metrics::new(
        &mut prometheus_client::registry::Registry::default(),
    ));
    // Every copy of every gossip message seen by any behaviour (publish included), by content.
    let copies: Arc<Mutex<HashMap<Id, u64>>> = Arc::default();
    let observe: GossipObserver = {
        let copies = copies.clone();
        Arc::new(move |m: &libp2p::gossipsub::Message| {
            let id = *blake3::hash(&m.data).as_bytes();
            *copies
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(id)
                .or_default() += 1;
        })
    };
    // splitmix64: a reproducible topology for a seed.
    let mut state = a.seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let base = 1_000_000_000u64 + u64::from(rand::random::<u32>());
    let keys: Vec<_> = (0..n).map(|i| sample::key(i as u8 + 1)).collect();
    let addr = |i: usize| format!("/memory/{}", base + i as u64);
    // Bounded like every queue: sized for every arrival of the run (nodes × ads, plus slack);
    // connection events add a few per node; a full queue drops the sample (never blocks).
    let cap = (n * (a.ads + 2) * 4).max(1024);
    let (arrive_tx, mut arrive_rx) = mpsc::channel::<(Id, usize, Instant)>(cap);
    let (conn_tx, mut conn_rx) = mpsc::channel::<(usize, bool)>(cap);
    let mut handles = Vec::with_capacity(n);
    let mut dials = 0;
    for (i, key) in keys.iter().enumerate() {
        let mut boot = Vec::new();
        if i > 0 {
            let mut earlier: Vec<usize> = (1..i).collect();
            for x in (1..earlier.len()).rev() {
                earlier.swap(x, (next() % (x as u64 + 1)) as usize);
            }
            for j in std::iter::once(0).chain(earlier.into_iter().take(a.degree)) {
                boot.push(format!("{}/p2p/{}", addr(j), keys[j].node_id()));
            }
        }
        dials += boot.len();
        let swarm = p2p::memory_swarm_observed(key, &cfg, Some(observe.clone()))?;
        let (h, mut rx) = p2p::start(swarm, &[addr(i)], &boot, metrics.clone())?;
        let (h2, arrive, conn) = (h.clone(), arrive_tx.clone(), conn_tx.clone());
        // The node shell's part: validate each message as the node does, then report.
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Gossip {
                        msg_id,
                        from,
                        source,
                        data,
                        ..
                    } => {
                        let acceptance = match p2p::check_gossip(&data, source.as_ref(), now_ms()) {
                            Ok(_) => {
                                let _ = arrive.try_send((
                                    *blake3::hash(&data).as_bytes(),
                                    i,
                                    Instant::now(),
                                ));
                                libp2p::gossipsub::MessageAcceptance::Accept
                            }
                            Err(r) => p2p::acceptance(&r),
                        };
                        h2.send(Command::Report {
                            msg_id,
                            from,
                            acceptance,
                        });
                    }
                    Event::Connected(_) => {
                        let _ = conn.try_send((i, true));
                    }
                    Event::Disconnected(_) => {
                        let _ = conn.try_send((i, false));
                    }
                    Event::Request { id, .. } => {
                        h2.send(Command::Respond { id, frames: vec![] });
                    }
                    Event::Response { .. } | Event::RegistrySubscribed(_) => {}
                }
            }
        });
        handles.push(h);
    }
    drop(arrive_tx);
    drop(conn_tx);

    // Mesh formation: every node connected, then time for gossipsub heartbeats.
    let t_start = Instant::now();
    let mut peers = vec![0i64; n];
    while peers.contains(&0) {
        let Ok(Some((i, up))) = tokio::time::timeout(Duration::from_secs(30), conn_rx.recv()).await
        else {
            anyhow::bail!(
                "{} of {n} nodes still unconnected after 30 s",
                peers.iter().filter(|p| **p == 0).count()
            );
        };
        peers[i] += if up { 1 } else { -1 };
    }
    let connected_after = t_start.elapsed();
    let settle_until = tokio::time::Instant::now() + Duration::from_secs(a.settle_s);
    while let Ok(Some((i, up))) = tokio::time::timeout_at(settle_until, conn_rx.recv()).await {
        peers[i] += if up { 1 } else { -1 };
    }

    // One publisher: the last node (it dialled `degree + 1` peers; none dialled it).
    let publisher = n - 1;
    let pkey = &keys[publisher];
    let mut sent: Vec<(Id, Instant)> = Vec::with_capacity(a.ads + 1);
    let mut arrivals: HashMap<Id, Vec<Instant>> = HashMap::new();
    let publish = |version: u64| -> anyhow::Result<(Id, Instant)> {
        let now = now_ms();
        let vcv = sample::vcv(pkey, "bench-agent", version, now);
        let data = fedmesh_protocol::seal(pkey, now, &Message::Advertise(vcv))
            .map_err(|e| anyhow::anyhow!("seal: {e:?}"))?;
        let id = *blake3::hash(&data).as_bytes();
        let t0 = Instant::now();
        handles[publisher].send(Command::Publish {
            topic: REGISTRY_TOPIC,
            data,
        });
        Ok((id, t0))
    };
    // Warm-up advertisement (not counted): wait until it reached everyone.
    let (warm, _) = publish(1)?;
    let warm_deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut warm_got = 0;
    while warm_got < n - 1 {
        match tokio::time::timeout_at(warm_deadline, arrive_rx.recv()).await {
            Ok(Some((id, _, _))) if id == warm => warm_got += 1,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let (cpu0, wall0) = (cpu_time(), Instant::now());
    let mut tick = tokio::time::interval(Duration::from_millis(a.interval_ms));
    for k in 0..a.ads {
        tick.tick().await;
        sent.push(publish(k as u64 + 2)?);
        while let Ok((id, _, t)) = arrive_rx.try_recv() {
            arrivals.entry(id).or_default().push(t);
        }
    }
    // Wait for the last advertisement (or 5 s), then account the CPU of the measured phase.
    let last = sent.last().map(|s| s.0);
    let drain_until = tokio::time::Instant::now() + Duration::from_secs(5);
    while arrivals.get(&last.unwrap_or_default()).map_or(0, Vec::len) < n - 1 {
        match tokio::time::timeout_at(drain_until, arrive_rx.recv()).await {
            Ok(Some((id, _, t))) => arrivals.entry(id).or_default().push(t),
            _ => break,
        }
    }
    let (cpu, wall) = (cpu_time() - cpu0, wall0.elapsed());
    let drain_until = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Some((id, _, t))) = tokio::time::timeout_at(drain_until, arrive_rx.recv()).await {
        arrivals.entry(id).or_default().push(t);
    }
    for (i, up) in std::iter::from_fn(|| conn_rx.try_recv().ok()) {
        peers[i] += if up { 1 } else { -1 };
    }

    // Per advertisement: time until all n−1 others had it, median node's time, copies received.
    let copies = copies
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let mut all = Vec::new();
    let mut half = Vec::new();
    let mut rmr = Vec::new();
    let mut incomplete = 0;
    let mut total_recv = 0u64;
    for (id, t0) in &sent {
        let mut ts: Vec<Duration> = arrivals
            .get(id)
            .map(|v| v.iter().map(|t| t.duration_since(*t0)).collect())
            .unwrap_or_default();
        ts.sort();
        if ts.len() >= n - 1 {
            all.push(ts[n - 2]);
        } else {
            incomplete += 1;
        }
        if let Some(t) = ts.get((n - 1) / 2) {
            half.push(*t);
        }
        // The publisher's own message-id call is the publish; every other call is a received copy.
        let m = copies.get(id).copied().unwrap_or(0).saturating_sub(1);
        total_recv += m;
        rmr.push(m as f64 / (n - 1) as f64 - 1.0);
    }
    all.sort();
    half.sort();
    rmr.sort_by(f64::total_cmp);
    let mut degree: Vec<i64> = peers.clone();
    degree.sort_unstable();
    println!(
        "fedmesh bench gossip: {n} nodes over /memory (noise + yamux, the node's Behaviour), max_connections {}, {} bootstrap dials (node 0 + {} random earlier nodes each), all connected after {:.2} s, settle {} s",
        cfg.p2p.max_connections,
        dials,
        a.degree,
        connected_after.as_secs_f64(),
        a.settle_s
    );
    println!(
        "connected peers per node at the end: min {}, median {}, max {}, mean {:.1}",
        degree[0],
        pct(&degree, 0.5),
        degree[n - 1],
        degree.iter().sum::<i64>() as f64 / n as f64
    );
    println!(
        "warm-up ad reached {warm_got} of {} nodes; measured: {} ads from node {publisher}, one every {} ms",
        n - 1,
        a.ads,
        a.interval_ms
    );
    println!(
        "reached all {} other nodes: {} of {} ads; time to all: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        n - 1,
        all.len(),
        a.ads,
        ms(pct(&all, 0.5)),
        ms(pct(&all, 0.99)),
        ms(all.last().copied().unwrap_or_default())
    );
    println!(
        "time to half the nodes: p50 {:.2} ms, p99 {:.2} ms; incomplete ads: {incomplete}",
        ms(pct(&half, 0.5)),
        ms(pct(&half, 0.99))
    );
    println!(
        "CPU of the measured phase: {:.2} s in {:.2} s wall ({:.0} % of one core), {:.1} ms per ad",
        cpu.as_secs_f64(),
        wall.as_secs_f64(),
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64(),
        ms(cpu) / a.ads.max(1) as f64
    );
    println!(
        "copies received (every copy a behaviour got, duplicates included): {total_recv} for {} ads = {:.1} per ad; RMR = m/(n-1) - 1: p50 {:.2}, mean {:.2}, min {:.2}, max {:.2}",
        a.ads,
        total_recv as f64 / a.ads.max(1) as f64,
        pct(&rmr, 0.5),
        rmr.iter().sum::<f64>() / rmr.len().max(1) as f64,
        rmr.first().copied().unwrap_or_default(),
        rmr.last().copied().unwrap_or_default()
    );
    Ok(())
}
