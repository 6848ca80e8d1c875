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

use fedmesh_index::{AnnIndex, IndexParams, Key};
use fedmesh_protocol::Embedding;

const DIM: usize = 256;
const SPACE: &str = "bench-256/v1";

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn gauss(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
    fn gauss_unit(&mut self, out: &mut [f32]) {
        out.iter_mut().for_each(|x| *x = self.gauss());
        let n = out.iter().map(|x| x * x).sum::<f32>().sqrt();
        out.iter_mut().for_each(|x| *x /= n);
    }
}

/// Agent / query generator: clustered (random unit centre + noise of norm `noise`) or uniform.
struct Gen {
    rng: Rng,
    centres: Vec<Vec<f32>>,
    noise: f32,
    buf: Vec<f32>,
    nbuf: Vec<f32>,
}

impl Gen {
    /// `centres` cluster centres, each a `topics`-topic direction plus a unit random offset
    /// (cosine ≈ 0.7 to its topic), so that the data has the two-level structure of real
    /// capability embeddings (areas, then specialities).
    fn new(seed: u64, topics: usize, centres: usize, noise: f32) -> Self {
        let mut rng = Rng(seed);
        let mut ts = vec![vec![0f32; DIM]; topics.max(1)];
        ts.iter_mut().for_each(|t| rng.gauss_unit(t));
        let mut off = vec![0f32; DIM];
        let centres = (0..centres)
            .map(|i| {
                rng.gauss_unit(&mut off);
                let t = &ts[i % ts.len()];
                let mut c: Vec<f32> = t.iter().zip(&off).map(|(a, b)| a + b).collect();
                let n = c.iter().map(|x| x * x).sum::<f32>().sqrt();
                c.iter_mut().for_each(|x| *x /= n);
                c
            })
            .collect();
        Self {
            rng,
            centres,
            noise,
            buf: vec![0f32; DIM],
            nbuf: vec![0f32; DIM],
        }
    }

    fn next(&mut self) -> Embedding {
        if self.centres.is_empty() {
            self.rng.gauss_unit(&mut self.buf);
        } else {
            let c = (self.rng.next() % self.centres.len() as u64) as usize;
            self.rng.gauss_unit(&mut self.nbuf);
            for ((b, c), n) in self.buf.iter_mut().zip(&self.centres[c]).zip(&self.nbuf) {
                *b = c + self.noise * n;
            }
        }
        Embedding::quantise(SPACE, &self.buf).unwrap()
    }
}

fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn list(s: &str) -> Vec<usize> {
    s.split(',').map(|x| x.trim().parse().unwrap()).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ns = list(&arg(&args, "--n").unwrap_or_else(|| "10000,100000".into()));
    let dist = arg(&args, "--dist").unwrap_or_else(|| "clustered".into());
    let queries: usize = arg(&args, "--queries").map_or(1000, |s| s.parse().unwrap());
    let exact_n: usize = arg(&args, "--exact").map_or(200, |s| s.parse().unwrap());
    let centres: usize = arg(&args, "--centres").map_or(4000, |s| s.parse().unwrap());
    let noise: f32 = arg(&args, "--noise").map_or(0.5, |s| s.parse().unwrap());
    let topics: usize = arg(&args, "--topics").map_or(64, |s| s.parse().unwrap());
    let list_factor: f64 = arg(&args, "--list-factor").map_or(1.0, |s| s.parse().unwrap());
    let nprobes = arg(&args, "--nprobe").map(|s| list(&s));
    let dists: Vec<&str> = match dist.as_str() {
        "both" => vec!["clustered", "random"],
        d => vec![if d == "random" { "random" } else { "clustered" }],
    };

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
