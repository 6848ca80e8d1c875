//! The ANN index beside the HNSW crates, on the `scale` example's synthetic data (issue #5.2:
//! "measure the candidates from well-kept crates before you choose").
//!
//! ```sh
//! cargo run --release -p fedmesh-index --features compare --example compare -- --n 100000 --engines ivf,hnsw_rs
//! ```
//!
//! Engines (`--engines`, comma list; run one external engine per process so that the RSS delta
//! is not flattered by memory the previous engine freed):
//! * `ivf`: [`fedmesh_index::AnnIndex`] (`i8`, inserts one at a time on one thread, `--nprobe`).
//! * `hnsw_rs`: `hnsw_rs::Hnsw<f32, DistDot>` on the dequantised unit vectors, `parallel_insert`
//!   on rayon's pool (all cores), `--m` / `--efc`; queries at each `--ef`.
//! * `instant`: `instant_distance` (immutable build on rayon's pool; its `M` is fixed at 32 and
//!   its `ef_search` at build time: `--instant-ef`).
//! * `usearch`: `usearch::Index` with `i8` storage fed the same `i8` vectors, cosine metric,
//!   `--threads` adding threads, `--m` / `--efc`; queries at each `--ef`.
//!
//! Every engine is scored against the same exact top-10 (`AnnIndex::search_exact`, the quantised
//! cosine) on `--exact` queries; p50 / p99 over `--queries` single-threaded top-10 queries. After
//! the build, `--live` extra agents are inserted one at a time on one thread (the registry's
//! steady state), and, where the engine can, removed again.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{DIM, Gen, SPACE, arg, dists, list, num, pct, rss_bytes, us};
use fedmesh_index::{AnnIndex, IndexParams, Key};
use fedmesh_protocol::Embedding;
use hnsw_rs::prelude::{DistDot, Hnsw};

/// 1 − cosine of two unit vectors, eight accumulators so that it vectorises.
fn dot_dist(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    1.0 - acc.iter().sum::<f32>()
}

#[derive(Clone)]
struct P(Vec<f32>);

impl instant_distance::Point for P {
    fn distance(&self, other: &Self) -> f32 {
        dot_dist(&self.0, &other.0)
    }
}

struct Row<'a> {
    engine: &'a str,
    threads: usize,
    param: String,
    build: Duration,
    n: usize,
    live_ins: Option<f64>,
    live_del: Option<f64>,
    times: Vec<Duration>,
    recall: f64,
    rss_b: f64,
    own_b: Option<f64>,
}

fn print_row(d: &str, r: &mut Row<'_>) {
    r.times.sort();
    let opt = |x: Option<f64>| x.map_or("—".to_string(), |v| format!("{v:.0}"));
    println!(
        "{d} | {} | {} | {} threads | {:.0} | {} | {} | {} | {:.0} | {:.0} | {:.3} | {:.0} | {}",
        r.n,
        r.engine,
        r.threads,
        r.n as f64 / r.build.as_secs_f64(),
        opt(r.live_ins),
        opt(r.live_del),
        r.param,
        us(pct(&r.times, 0.5)),
        us(pct(&r.times, 0.99)),
        r.recall,
        r.rss_b,
        opt(r.own_b),
    );
}

fn recall(truth: &[Vec<u64>], got: &[Vec<u64>]) -> f64 {
    let hit: usize = truth
        .iter()
        .zip(got)
        .map(|(t, g)| g.iter().filter(|k| t.contains(k)).count())
        .sum();
    hit as f64 / (truth.len() * 10) as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ns = list(&arg(&args, "--n").unwrap_or_else(|| "100000".into()));
    let dist = arg(&args, "--dist").unwrap_or_else(|| "clustered".into());
    let engines = arg(&args, "--engines").unwrap_or_else(|| "ivf,hnsw_rs".into());
    let engines: Vec<&str> = engines.split(',').collect();
    let queries: usize = num(&args, "--queries", 1000);
    let exact_n: usize = num(&args, "--exact", 200);
    let live: usize = num(&args, "--live", 2000);
    let nprobes = list(&arg(&args, "--nprobe").unwrap_or_else(|| "8".into()));
    let efs = list(&arg(&args, "--ef").unwrap_or_else(|| "16,32,64,128".into()));
    let m: usize = num(&args, "--m", 16);
    let efc: usize = num(&args, "--efc", 200);
    let instant_ef: usize = num(&args, "--instant-ef", 64);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: usize = num(&args, "--threads", cores);
    let dists = dists(&dist);

    println!(
        "data | N | engine | build threads | build inserts/s | live inserts/s (1 thread) | live removes/s | nprobe / ef | query p50 µs | p99 µs | recall@10 | B/agent RSS Δ | B/agent (own accounting)"
    );
    for d in &dists {
        for &n in &ns {
            // The same seed and order as `scale`: agents, then queries.
            let seed = 42 + n as u64;
            let mut g = Gen::new(seed, 64, if *d == "clustered" { 4000 } else { 0 }, 0.5);
            let data: Vec<Embedding> = (0..n).map(|_| g.next()).collect();
            let qs: Vec<Embedding> = (0..queries).map(|_| g.next()).collect();
            let extra: Vec<Embedding> = (0..live).map(|_| g.next()).collect();
            let qf: Vec<Vec<f32>> = qs.iter().map(Embedding::to_f32).collect();
            let ne = exact_n.min(queries);

            // Reference: IVF, built first and kept for the exact answers.
            let rss0 = rss_bytes();
            let mut ivf = AnnIndex::new(SPACE, DIM, IndexParams::default()).unwrap();
            let t = Instant::now();
            for (i, e) in data.iter().enumerate() {
                ivf.upsert(i as Key, e).unwrap();
            }
            let ivf_build = t.elapsed();
            let ivf_rss = rss_bytes().saturating_sub(rss0) as f64 / n as f64;
            let ivf_own = ivf.memory_bytes() as f64 / n as f64;
            let truth: Vec<Vec<u64>> = qs[..ne]
                .iter()
                .map(|q| {
                    ivf.search_exact(q, 10, |_| true)
                        .unwrap()
                        .iter()
                        .map(|&(k, _)| u64::from(k))
                        .collect()
                })
                .collect();

            if engines.contains(&"ivf") {
                let t = Instant::now();
                for (i, e) in extra.iter().enumerate() {
                    ivf.upsert((n + i) as Key, e).unwrap();
                }
                let ins = live as f64 / t.elapsed().as_secs_f64();
                let t = Instant::now();
                for i in 0..live {
                    ivf.remove((n + i) as Key);
                }
                let del = live as f64 / t.elapsed().as_secs_f64();
                for &p in &nprobes {
                    let mut times = Vec::with_capacity(queries);
                    let mut got = Vec::with_capacity(ne);
                    for (i, q) in qs.iter().enumerate() {
                        let t = Instant::now();
                        let r = ivf.search_nprobe(q, 10, p, |_| true).unwrap();
                        times.push(t.elapsed());
                        if i < ne {
                            got.push(r.iter().map(|&(k, _)| u64::from(k)).collect());
                        }
                    }
                    print_row(
                        d,
                        &mut Row {
                            engine: "fedmesh-index IVF (i8)",
                            threads: 1,
                            param: format!("nprobe {p}"),
                            build: ivf_build,
                            n,
                            live_ins: Some(ins),
                            live_del: Some(del),
                            times,
                            recall: recall(&truth, &got),
                            rss_b: ivf_rss,
                            own_b: Some(ivf_own),
                        },
                    );
                }
            }

            if engines.contains(&"hnsw_rs") {
                // The vectors are converted before the clock starts, but after rss0: hnsw_rs
                // keeps its own copy of each.
                let df: Vec<Vec<f32>> = data.iter().map(Embedding::to_f32).collect();
                let xf: Vec<Vec<f32>> = extra.iter().map(Embedding::to_f32).collect();
                let rss0 = rss_bytes();
                let h: Hnsw<'_, f32, DistDot> = Hnsw::new(m, n + live, 16, efc, DistDot);
                let items: Vec<(&Vec<f32>, usize)> = df.iter().zip(0..).collect();
                let t = Instant::now();
                h.parallel_insert(&items);
                let build = t.elapsed();
                let rss = rss_bytes().saturating_sub(rss0) as f64 / n as f64;
                let mut rows = Vec::new();
                for &ef in &efs {
                    let mut times = Vec::with_capacity(queries);
                    let mut got = Vec::with_capacity(ne);
                    for (i, q) in qf.iter().enumerate() {
                        let t = Instant::now();
                        let r = h.search(q, 10, ef);
                        times.push(t.elapsed());
                        if i < ne {
                            got.push(r.iter().map(|x| x.d_id as u64).collect());
                        }
                    }
                    rows.push((ef, times, recall(&truth, &got)));
                }
                // Live inserts after the queries: hnsw_rs cannot remove them again.
                let t = Instant::now();
                for (i, v) in xf.iter().enumerate() {
                    h.insert((v.as_slice(), n + i));
                }
                let ins = live as f64 / t.elapsed().as_secs_f64();
                for (ef, times, recall) in rows {
                    print_row(
                        d,
                        &mut Row {
                            engine: "hnsw_rs 0.3 (f32)",
                            threads,
                            param: format!("M {m}, efC {efc}, ef {ef}"),
                            build,
                            n,
                            live_ins: Some(ins),
                            live_del: None,
                            times,
                            recall,
                            rss_b: rss,
                            own_b: None,
                        },
                    );
                }
                drop(h);
            }

            if engines.contains(&"instant") {
                let rss0 = rss_bytes();
                let pts: Vec<P> = data.iter().map(|e| P(e.to_f32())).collect();
                let vals: Vec<u64> = (0..n as u64).collect();
                let t = Instant::now();
                let map = instant_distance::Builder::default()
                    .ef_construction(efc)
                    .ef_search(instant_ef)
                    .seed(seed)
                    .build(pts, vals);
                let build = t.elapsed();
                let rss = rss_bytes().saturating_sub(rss0) as f64 / n as f64;
                let mut search = instant_distance::Search::default();
                let mut times = Vec::with_capacity(queries);
                let mut got = Vec::with_capacity(ne);
                for (i, q) in qf.iter().enumerate() {
                    let q = P(q.clone());
                    let t = Instant::now();
                    let r: Vec<u64> = map
                        .search(&q, &mut search)
                        .take(10)
                        .map(|x| *x.value)
                        .collect();
                    times.push(t.elapsed());
                    if i < ne {
                        got.push(r);
                    }
                }
                print_row(
                    d,
                    &mut Row {
                        engine: "instant-distance 0.6 (f32)",
                        threads,
                        param: format!("M 32 (fixed), efC {efc}, ef {instant_ef}"),
                        build,
                        n,
                        live_ins: None,
                        live_del: None,
                        times,
                        recall: recall(&truth, &got),
                        rss_b: rss,
                        own_b: None,
                    },
                );
                drop(map);
            }

            if engines.contains(&"usearch") {
                let rss0 = rss_bytes();
                let opts = usearch::IndexOptions {
                    dimensions: DIM,
                    metric: usearch::MetricKind::Cos,
                    quantization: usearch::ScalarKind::I8,
                    connectivity: m,
                    expansion_add: efc,
                    expansion_search: efs[0],
                    multi: false,
                };
                let idx = usearch::Index::new(&opts).unwrap();
                idx.reserve_capacity_and_threads(n + live, threads).unwrap();
                let t = Instant::now();
                std::thread::scope(|s| {
                    for w in 0..threads {
                        let (idx, data) = (&idx, &data);
                        s.spawn(move || {
                            for i in (w..n).step_by(threads) {
                                idx.add(i as u64, &data[i].q).unwrap();
                            }
                        });
                    }
                });
                let build = t.elapsed();
                let rss = rss_bytes().saturating_sub(rss0) as f64 / n as f64;
                let own = idx.memory_usage() as f64 / n as f64;
                let t = Instant::now();
                for (i, e) in extra.iter().enumerate() {
                    idx.add((n + i) as u64, &e.q).unwrap();
                }
                let ins = live as f64 / t.elapsed().as_secs_f64();
                let t = Instant::now();
                for i in 0..live {
                    idx.remove((n + i) as u64).unwrap();
                }
                let del = live as f64 / t.elapsed().as_secs_f64();
                for &ef in &efs {
                    idx.change_expansion_search(ef);
                    let mut times = Vec::with_capacity(queries);
                    let mut got = Vec::with_capacity(ne);
                    for (i, q) in qs.iter().enumerate() {
                        let t = Instant::now();
                        let r = idx.search(&q.q, 10).unwrap();
                        times.push(t.elapsed());
                        if i < ne {
                            got.push(r.keys);
                        }
                    }
                    print_row(
                        d,
                        &mut Row {
                            engine: "usearch 2.26 (i8)",
                            threads,
                            param: format!("M {m}, efC {efc}, ef {ef}"),
                            build,
                            n,
                            live_ins: Some(ins),
                            live_del: Some(del),
                            times,
                            recall: recall(&truth, &got),
                            rss_b: rss,
                            own_b: Some(own),
                        },
                    );
                }
                drop(idx);
            }
        }
    }
}
