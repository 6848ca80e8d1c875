//! Scale benchmark of the ANN index: synthetic 256-d agents, insert / update / query rates,
//! recall@10 against exact search in the same run, memory per agent.
//!
//! ```sh
//! cargo run --release -p fedmesh-index --example scale -- --n 10000,100000,1000000
//! ```
//!
//! Options: `--n` (comma list), `--dist clustered|random|both`, `--queries` (default 1000),
//! `--exact` (queries checked against brute force, default 200), `--nprobe` (comma list: one
//! row per value), `--list-factor` (lists = factor · √N, default 1), `--topics` (default 64), `--centres` (default 4000, each a topic plus an
//! offset), `--noise` (agent noise norm relative to its unit centre, default 0.5: cosine ≈ 0.9
//! to the centre, ≈ 0.8 between agents of one centre, ≈ 0.4 across centres of one topic).

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use common::{DIM, Gen, Rng, SPACE, arg, dists, list, num, pct, rss_bytes, us};
use fedmesh_index::{AnnIndex, IndexParams, Key};
use fedmesh_protocol::Embedding;

#[path = "common/mod.rs"]
mod common;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ns = list(&arg(&args, "--n").unwrap_or_else(|| "10000,100000".into()));
    let dist = arg(&args, "--dist").unwrap_or_else(|| "clustered".into());
    let queries: usize = num(&args, "--queries", 1000);
    let exact_n: usize = num(&args, "--exact", 200);
    let centres: usize = num(&args, "--centres", 4000);
    let noise: f32 = num(&args, "--noise", 0.5);
    let topics: usize = num(&args, "--topics", 64);
    let list_factor: f64 = num(&args, "--list-factor", 1.0);
    let nprobes = arg(&args, "--nprobe").map(|s| list(&s));
    let dists = dists(&dist);

    println!(
        "dist | N | nlist | insert/s (incl. retrain) | insert/s (excl.) | retrain s | update/s | remove/s | nprobe | query p50 µs | p99 µs | filtered p99 µs | recall@10 | exact p50 µs | speed-up | B/agent (memory_bytes) | B/agent (RSS Δ)"
    );
    for d in &dists {
        for &n in &ns {
            let seed = 42 + n as u64;
            let mut g = Gen::new(
                seed,
                topics,
                if *d == "clustered" { centres } else { 0 },
                noise,
            );
            let data: Vec<Embedding> = (0..n).map(|_| g.next()).collect();
            let qs: Vec<Embedding> = (0..queries).map(|_| g.next()).collect();
            let updates: Vec<Embedding> = (0..(n / 10).max(1)).map(|_| g.next()).collect();

            let rss0 = rss_bytes();
            let mut idx = AnnIndex::new(
                SPACE,
                DIM,
                IndexParams {
                    list_factor,
                    ..IndexParams::default()
                },
            )
            .unwrap();
            let t = Instant::now();
            let mut retrain = Duration::ZERO;
            for (i, e) in data.iter().enumerate() {
                let before = idx.nlist();
                let t1 = Instant::now();
                idx.upsert(i as Key, e).unwrap();
                if idx.nlist() != before {
                    retrain += t1.elapsed();
                }
            }
            let build = t.elapsed();
            let rss1 = rss_bytes();
            let mem = idx.memory_bytes();

            // Updates: a tenth of the agents get a new vector (a VCV change).
            let mut rng = Rng(seed ^ 0xabc);
            let t = Instant::now();
            for e in &updates {
                let k = (rng.next() % n as u64) as Key;
                idx.upsert(k, e).unwrap();
            }
            let update = t.elapsed();
            // Removes then re-inserts of 1 % of the agents.
            let m = (n / 100).max(1);
            let t = Instant::now();
            for k in 0..m {
                idx.remove((k * 97 % n) as Key);
            }
            let remove = t.elapsed();
            for k in 0..m {
                idx.upsert((k * 97 % n) as Key, &data[k * 97 % n]).unwrap();
            }

            // Exact answers (same kernel, every list).
            let ne = exact_n.min(queries);
            let mut exact_t = Vec::with_capacity(ne);
            let mut truth = Vec::with_capacity(ne);
            for q in &qs[..ne] {
                let t = Instant::now();
                let r = idx.search_exact(q, 10, |_| true).unwrap();
                exact_t.push(t.elapsed());
                truth.push(r);
            }
            exact_t.sort();
            let exact_p50 = pct(&exact_t, 0.5);

            let probes = nprobes.clone().unwrap_or_else(|| vec![idx.params().nprobe]);
            for &p in &probes {
                let mut times = Vec::with_capacity(queries);
                let mut found = 0usize;
                for (i, q) in qs.iter().enumerate() {
                    let t = Instant::now();
                    let r = idx.search_nprobe(q, 10, p, |_| true).unwrap();
                    times.push(t.elapsed());
                    if i < ne {
                        found += r
                            .iter()
                            .filter(|(k, _)| truth[i].iter().any(|(e, _)| e == k))
                            .count();
                    }
                }
                // A filter that passes half the agents (a policy / skill gate).
                let mut ftimes = Vec::with_capacity(queries);
                for q in &qs {
                    let t = Instant::now();
                    let r = idx
                        .search_nprobe(q, 10, p, |k: Key| k.is_multiple_of(2))
                        .unwrap();
                    ftimes.push(t.elapsed());
                    assert!(r.len() == 10 || r.len() == n / 2);
                }
                times.sort();
                ftimes.sort();
                let p50 = pct(&times, 0.5);
                let recall = found as f64 / (ne * 10) as f64;
                println!(
                    "{d} | {n} | {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {p} | {:.0} | {:.0} | {:.0} | {:.3} | {:.0} | {:.0}× | {:.0} | {:.0}",
                    idx.nlist(),
                    n as f64 / build.as_secs_f64(),
                    n as f64 / (build - retrain).as_secs_f64(),
                    retrain.as_secs_f64(),
                    updates.len() as f64 / update.as_secs_f64(),
                    m as f64 / remove.as_secs_f64(),
                    us(p50),
                    us(pct(&times, 0.99)),
                    us(pct(&ftimes, 0.99)),
                    recall,
                    us(exact_p50),
                    exact_p50.as_secs_f64() / p50.as_secs_f64(),
                    mem as f64 / n as f64,
                    rss1.saturating_sub(rss0) as f64 / n as f64,
                );
            }
            drop(idx);
        }
    }
}
