//! Shared by the `scale` and `compare` examples: the synthetic 256-d agent generator and small
//! measurement helpers (one copy, so that both measure the same data).

// Each example uses a different subset.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use fedmesh_protocol::Embedding;

pub const DIM: usize = 256;
pub const SPACE: &str = "bench-256/v1";

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
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
pub struct Gen {
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
    pub fn new(seed: u64, topics: usize, centres: usize, noise: f32) -> Self {
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

    pub fn next(&mut self) -> Embedding {
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

pub fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

pub fn list(s: &str) -> Vec<usize> {
    s.split(',').map(|x| x.trim().parse().unwrap()).collect()
}

/// `--dist clustered|random|both` → the data sets to run.
pub fn dists(s: &str) -> Vec<&'static str> {
    match s {
        "both" => vec!["clustered", "random"],
        "random" => vec!["random"],
        _ => vec!["clustered"],
    }
}

/// `--name value` parsed, or `default` when absent.
pub fn num<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    arg(args, name).map_or(default, |s| {
        s.parse()
            .unwrap_or_else(|_| panic!("{name}: cannot parse {s:?}"))
    })
}
