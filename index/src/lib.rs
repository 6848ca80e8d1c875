//! # fedmesh-index
//!
//! An approximate nearest-neighbour index over quantised capability embeddings
//! ([`fedmesh_protocol::Embedding`]: one `i8` per dimension), for routing a task to the best of
//! up to a million agents without scoring every one.
//!
//! **Design: IVF-flat over `i8`.** A spherical k-means coarse quantiser splits the agents into
//! `nlist ≈ √N` inverted lists; each list stores its agents' full `i8` vectors contiguously. A
//! search scores the query against every centroid, scans the `nprobe` nearest lists with an
//! integer dot product and keeps the top `k` by the **exact** cosine of the quantised vectors —
//! the same value, bit for bit, as [`fedmesh_protocol::router::cosine`], so no separate
//! re-ranking pass is needed: every candidate is ranked by its exact score. Only *which* agents
//! are looked at is approximate.
//!
//! * Incremental: [`AnnIndex::upsert`] and [`AnnIndex::remove`] are O(nlist · dim) and O(dim);
//!   a delete is a swap-remove inside one list. Below [`IndexParams::min_train`] agents the index
//!   is one list (exact search); it retrains itself (k-means plus a full reassignment) each time
//!   it has grown [`IndexParams::growth`]-fold since the last training, so training is amortised
//!   O(1) per insert. [`AnnIndex::retrain`] lets a caller schedule it instead.
//! * Filters run during the scan, only for agents that would enter the current top `k`; when
//!   the probed lists yield fewer than `k` agents passing the filter, further lists are scanned in
//!   centroid order, so a selective filter never starves the result.
//! * Keys are dense `u32` handles; [`AgentKeys`] maps [`AgentId`]s to them and back (kept
//!   outside the index so the index stays 272 bytes per 256-d agent plus list slack).
//! * Pure data structure: no IO, no clock, no threads, no RNG (k-means seeding uses a
//!   deterministic generator seeded from [`IndexParams::seed`]).

#![deny(missing_docs)]

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};

use fedmesh_protocol::{AgentId, Embedding};

/// An agent's handle in the index. `u32::MAX` is reserved.
pub type Key = u32;

const NONE: u32 = u32::MAX;

/// Why an index operation was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// The vector belongs to another embedding space; vectors of different spaces are never
    /// compared.
    #[error("embedding space {got:?} is not the index's space {expected:?}")]
    WrongSpace {
        /// The index's space.
        expected: String,
        /// The vector's space.
        got: String,
    },
    /// The vector's dimension differs from the index's.
    #[error("embedding has {got} dimensions, the index {expected}")]
    WrongDim {
        /// The index's dimension.
        expected: usize,
        /// The vector's dimension.
        got: usize,
    },
    /// `u32::MAX` is not a valid key.
    #[error("key {0} is reserved")]
    ReservedKey(Key),
    /// The parameters are inconsistent.
    #[error("invalid index parameters: {0}")]
    BadParams(&'static str),
}

/// Index parameters. The defaults are what `BENCHMARKS.md` measured.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexParams {
    /// Lists scanned per search (more: better recall, slower search).
    pub nprobe: usize,
    /// Below this many agents the index is a single list (exact search).
    pub min_train: usize,
    /// Retrain when the index has grown this many times since the last training (≥ 2).
    pub growth: usize,
    /// Number of lists at training; 0 = `list_factor · √(len · growth)`, i.e. `list_factor · √N`
    /// at the next retraining.
    pub lists: usize,
    /// See [`IndexParams::lists`].
    pub list_factor: f64,
    /// k-means iterations per training.
    pub kmeans_iters: usize,
    /// k-means sample size, per list.
    pub sample_per_list: usize,
    /// Seed of the k-means initialisation.
    pub seed: u64,
    /// Retrain automatically inside [`AnnIndex::upsert`] (else call [`AnnIndex::retrain`] when
    /// [`AnnIndex::needs_retrain`] says so).
    pub auto_retrain: bool,
}

impl Default for IndexParams {
    fn default() -> Self {
        Self {
            nprobe: 8,
            min_train: 4096,
            growth: 4,
            lists: 0,
            list_factor: 1.0,
            kmeans_iters: 5,
            sample_per_list: 16,
            seed: 0x5eed_f00d,
            auto_retrain: true,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Loc {
    list: u32,
    pos: u32,
}

const NO_LOC: Loc = Loc {
    list: NONE,
    pos: NONE,
};

#[derive(Clone, Debug, Default)]
struct List {
    keys: Vec<Key>,
    /// `√(Σ q²)` of each vector, as `f32` (what the router divides by).
    norms: Vec<f32>,
    /// Row-major `len × dim` components.
    codes: Vec<i8>,
}

impl List {
    fn bytes(&self) -> usize {
        self.keys.capacity() * 4 + self.norms.capacity() * 4 + self.codes.capacity()
    }
}

/// One search hit, ordered best first: higher score, then lower key.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Hit {
    score: f32,
    key: Key,
}

impl Eq for Hit {}

impl Ord for Hit {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.key.cmp(&self.key))
    }
}

impl PartialOrd for Hit {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Bounded top-k: a min-heap of the best `k` hits.
struct TopK {
    k: usize,
    heap: BinaryHeap<Reverse<Hit>>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    /// Would `hit` enter the top k?
    fn admits(&self, hit: &Hit) -> bool {
        self.k > 0
            && (self.heap.len() < self.k || self.heap.peek().is_some_and(|Reverse(w)| hit > w))
    }

    fn push(&mut self, hit: Hit) {
        self.heap.push(Reverse(hit));
        if self.heap.len() > self.k {
            self.heap.pop();
        }
    }

    fn full(&self) -> bool {
        self.heap.len() >= self.k
    }

    fn into_sorted(self) -> Vec<(Key, f32)> {
        let mut hits: Vec<Hit> = self.heap.into_iter().map(|Reverse(h)| h).collect();
        hits.sort_by(|a, b| b.cmp(a));
        hits.into_iter().map(|h| (h.key, h.score)).collect()
    }
}

/// Integer dot product of two equal-length `i8` slices whose components lie in `-127..=127`
/// (what [`Embedding::quantise`] produces; the index clamps `-128` to `-127` on the way in).
///
/// Written so that the compiler vectorises it even for the baseline x86-64 target (SSE2, no
/// `unsafe`): two products per 16-bit lane (`2 · 127² < 2¹⁵`), widened to 32 bits once per 64
/// components. About 2× the naive `i32` loop.
#[inline]
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    const W: usize = 64;
    const H: usize = W / 2;
    let mut total = 0i32;
    let mut ca = a.chunks_exact(W);
    let mut cb = b.chunks_exact(W);
    for (x, y) in (&mut ca).zip(&mut cb) {
        let mut acc = [0i16; H];
        let (x0, x1) = x.split_at(H);
        let (y0, y1) = y.split_at(H);
        for ((((s, &p0), &q0), &p1), &q1) in acc.iter_mut().zip(x0).zip(y0).zip(x1).zip(y1) {
            *s = (i16::from(p0) * i16::from(q0)).wrapping_add(i16::from(p1) * i16::from(q1));
        }
        total += acc.iter().map(|&v| i32::from(v)).sum::<i32>();
    }
    let tail: i32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&p, &q)| i32::from(p) * i32::from(q))
        .sum();
    total + tail
}

/// `q` with `-128` replaced by `-127`, borrowed when there is none (the common case).
fn clamped(q: &[i8]) -> std::borrow::Cow<'_, [i8]> {
    if q.contains(&i8::MIN) {
        std::borrow::Cow::Owned(q.iter().map(|&x| x.max(-127)).collect())
    } else {
        std::borrow::Cow::Borrowed(q)
    }
}

fn norm_i8(a: &[i8]) -> f32 {
    (dot_i8(a, a) as f32).sqrt()
}

/// The router's cosine (`ip / (√na · √nb)`, 0 for a zero vector), from precomputed roots.
#[inline]
fn cosine_from(ip: i32, qn: f32, n: f32) -> f32 {
    if qn == 0.0 || n == 0.0 {
        0.0
    } else {
        ip as f32 / (qn * n)
    }
}

/// A small deterministic generator (SplitMix64) for k-means seeding.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Quantises a unit `f32` vector to `i8` the way [`Embedding::quantise`] does (scale dropped:
/// cosine does not need it).
fn quantise_into(v: &[f32], out: &mut [i8]) {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    if max == 0.0 || !max.is_finite() {
        out.iter_mut().for_each(|o| *o = 0);
        return;
    }
    let inv = 127.0 / max;
    for (o, x) in out.iter_mut().zip(v) {
        *o = (x * inv).round().clamp(-127.0, 127.0) as i8;
    }
}

/// Groups scored per assignment when the coarse quantiser is grouped.
const ASSIGN_GROUPS: usize = 4;

/// The coarse quantiser: `nlist` quantised unit centroids, themselves grouped (`√nlist` groups,
/// by k-means over the centroids) so that assigning a vector scores the group centres and the
/// members of the [`ASSIGN_GROUPS`] best groups (~`5·√nlist` dot products instead of `nlist`).
/// Searches score every centroid.
#[derive(Clone, Debug, Default)]
struct Centroids {
    dim: usize,
    codes: Vec<i8>,
    norms: Vec<f32>,
    groups: Option<Box<Centroids>>,
    members: Vec<Vec<u32>>,
}

impl Centroids {
    fn len(&self) -> usize {
        self.norms.len()
    }

    fn row(&self, i: usize) -> &[i8] {
        &self.codes[i * self.dim..(i + 1) * self.dim]
    }

    fn score(&self, i: usize, q: &[i8]) -> f32 {
        let n = self.norms[i];
        if n == 0.0 {
            f32::NEG_INFINITY
        } else {
            dot_i8(self.row(i), q) as f32 / n
        }
    }

    /// The centroid nearest (by cosine) to `q` among `candidates`.
    fn best_of(&self, q: &[i8], candidates: impl Iterator<Item = usize>) -> usize {
        let mut best = 0;
        let mut best_score = f32::NEG_INFINITY;
        for i in candidates {
            let s = self.score(i, q);
            if s > best_score || (s == best_score && i < best) {
                best_score = s;
                best = i;
            }
        }
        best
    }

    /// The centroid nearest to `q` (through the groups when there are some); 0 when there are
    /// none.
    fn nearest(&self, q: &[i8]) -> usize {
        let Some(groups) = &self.groups else {
            return self.best_of(q, 0..self.len());
        };
        let mut gs = groups.scores(q);
        let g = ASSIGN_GROUPS.min(gs.len());
        if g < gs.len() {
            gs.select_nth_unstable_by(g - 1, |a, b| b.0.total_cmp(&a.0));
        }
        self.best_of(
            q,
            gs[..g]
                .iter()
                .flat_map(|&(_, gi)| self.members[gi as usize].iter().map(|&c| c as usize)),
        )
    }

    /// Every centroid's score for `q` (cosine up to the constant query norm).
    fn scores(&self, q: &[i8]) -> Vec<(f32, u32)> {
        (0..self.len())
            .map(|i| (self.score(i, q), i as u32))
            .collect()
    }

    fn from_f32(dim: usize, cents: &[f32]) -> Self {
        let n = cents.len() / dim.max(1);
        let mut codes = vec![0i8; n * dim];
        for (c, out) in cents.chunks_exact(dim).zip(codes.chunks_exact_mut(dim)) {
            quantise_into(c, out);
        }
        let norms = codes.chunks_exact(dim).map(norm_i8).collect();
        Self {
            dim,
            codes,
            norms,
            groups: None,
            members: Vec::new(),
        }
    }

    /// Groups the centroids (when there are enough to be worth it).
    fn with_groups(mut self, iters: usize, seed: u64) -> Self {
        let n = self.len();
        if n < 64 {
            return self;
        }
        let g = (n as f64).sqrt().round() as usize;
        let cents = kmeans_rows(self.dim, &self.codes, &self.norms, g, iters, seed);
        let groups = Centroids::from_f32(self.dim, &cents);
        let mut members = vec![Vec::new(); groups.len()];
        for i in 0..n {
            let gi = groups.best_of(self.row(i), 0..groups.len());
            members[gi].push(i as u32);
        }
        self.groups = Some(Box::new(groups));
        self.members = members;
        self
    }
}

/// Spherical k-means over `i8` rows (cosine), initialised with distinct rows; returns
/// `k × dim` unit centroids. Empty clusters are reseeded with a random row.
fn kmeans_rows(
    dim: usize,
    rows: &[i8],
    norms: &[f32],
    k: usize,
    iters: usize,
    seed: u64,
) -> Vec<f32> {
    let s = norms.len();
    let unit = |j: usize, out: &mut [f32]| {
        let n = norms[j];
        let inv = if n == 0.0 { 0.0 } else { 1.0 / n };
        for (o, &x) in out.iter_mut().zip(&rows[j * dim..(j + 1) * dim]) {
            *o = f32::from(x) * inv;
        }
    };
    let k = k.clamp(1, s.max(1));
    let mut cents = vec![0f32; k * dim];
    if s == 0 {
        return cents;
    }
    let mut rng = SplitMix(seed);
    // Initialise with distinct rows (partial Fisher–Yates).
    let mut order: Vec<usize> = (0..s).collect();
    for c in 0..k {
        let j = c + rng.below(s - c);
        order.swap(c, j);
        unit(order[c], &mut cents[c * dim..(c + 1) * dim]);
    }
    let mut assign = vec![0u32; s];
    let mut sums = vec![0f32; k * dim];
    let mut counts = vec![0u32; k];
    let mut tmp = vec![0f32; dim];
    for it in 0..iters {
        // Large k: assign through centroid groups (~5·√k dot products per row instead of k).
        let q = Centroids::from_f32(dim, &cents);
        let q = if k >= 256 {
            q.with_groups(3, seed.wrapping_add(it as u64))
        } else {
            q
        };
        for (a, row) in assign.iter_mut().zip(rows.chunks_exact(dim)) {
            *a = q.nearest(row) as u32;
        }
        sums.iter_mut().for_each(|x| *x = 0.0);
        counts.iter_mut().for_each(|x| *x = 0);
        for (j, &a) in assign.iter().enumerate() {
            unit(j, &mut tmp);
            let a = a as usize;
            counts[a] += 1;
            for (s, t) in sums[a * dim..(a + 1) * dim].iter_mut().zip(&tmp) {
                *s += t;
            }
        }
        for c in 0..k {
            let out = &mut cents[c * dim..(c + 1) * dim];
            let sum = &sums[c * dim..(c + 1) * dim];
            let n = sum.iter().map(|x| x * x).sum::<f32>().sqrt();
            if counts[c] == 0 || n == 0.0 {
                unit(rng.below(s), out);
            } else {
                for (o, x) in out.iter_mut().zip(sum) {
                    *o = x / n;
                }
            }
        }
    }
    cents
}

/// An IVF-flat ANN index over the `i8` embeddings of one embedding space.
#[derive(Clone, Debug)]
pub struct AnnIndex {
    space: String,
    dim: usize,
    params: IndexParams,
    centroids: Centroids,
    lists: Vec<List>,
    locs: Vec<Loc>,
    len: usize,
    /// Agents at the last training; 0 = never trained (one list, exact search).
    trained_len: usize,
}

impl AnnIndex {
    /// An empty index for vectors of `space` with `dim` dimensions.
    pub fn new(space: &str, dim: usize, params: IndexParams) -> Result<Self, IndexError> {
        if dim == 0 {
            return Err(IndexError::BadParams("dim must be positive"));
        }
        if params.nprobe == 0 {
            return Err(IndexError::BadParams("nprobe must be positive"));
        }
        if params.growth < 2 {
            return Err(IndexError::BadParams("growth must be at least 2"));
        }
        if !(params.list_factor.is_finite() && params.list_factor > 0.0) {
            return Err(IndexError::BadParams("list_factor must be positive"));
        }
        if params.sample_per_list == 0 {
            return Err(IndexError::BadParams("sample_per_list must be positive"));
        }
        Ok(Self {
            space: space.to_owned(),
            dim,
            params,
            centroids: Centroids {
                dim,
                ..Centroids::default()
            },
            lists: vec![List::default()],
            locs: Vec::new(),
            len: 0,
            trained_len: 0,
        })
    }

    /// The embedding space.
    pub fn space(&self) -> &str {
        &self.space
    }

    /// The dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The parameters.
    pub fn params(&self) -> &IndexParams {
        &self.params
    }

    /// Changes `nprobe` (the only parameter that can change without retraining).
    pub fn set_nprobe(&mut self, nprobe: usize) {
        self.params.nprobe = nprobe.max(1);
    }

    /// Number of agents.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of inverted lists (1 before the first training).
    pub fn nlist(&self) -> usize {
        self.lists.len()
    }

    /// True when `key` is indexed.
    pub fn contains(&self, key: Key) -> bool {
        self.loc(key).is_some()
    }

    /// The stored quantised vector of `key`.
    pub fn vector(&self, key: Key) -> Option<&[i8]> {
        let loc = self.loc(key)?;
        let pos = loc.pos as usize;
        Some(&self.lists[loc.list as usize].codes[pos * self.dim..(pos + 1) * self.dim])
    }

    /// Heap bytes held by the index (capacities, so `Vec` growth slack is included), plus the
    /// struct itself.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.space.capacity()
            + self.centroids.codes.capacity()
            + self.centroids.norms.capacity() * 4
            + self.lists.capacity() * std::mem::size_of::<List>()
            + self.lists.iter().map(List::bytes).sum::<usize>()
            + self.locs.capacity() * std::mem::size_of::<Loc>()
    }

    /// Releases `Vec` growth slack (e.g. after a bulk load).
    pub fn shrink_to_fit(&mut self) {
        for l in &mut self.lists {
            l.keys.shrink_to_fit();
            l.norms.shrink_to_fit();
            l.codes.shrink_to_fit();
        }
        self.locs.shrink_to_fit();
    }

    fn loc(&self, key: Key) -> Option<Loc> {
        self.locs
            .get(key as usize)
            .copied()
            .filter(|l| l.list != NONE)
    }

    fn check(&self, e: &Embedding) -> Result<(), IndexError> {
        if e.space != self.space {
            return Err(IndexError::WrongSpace {
                expected: self.space.clone(),
                got: e.space.clone(),
            });
        }
        if e.q.len() != self.dim {
            return Err(IndexError::WrongDim {
                expected: self.dim,
                got: e.q.len(),
            });
        }
        Ok(())
    }

    fn assign(&self, q: &[i8]) -> usize {
        if self.lists.len() <= 1 {
            0
        } else {
            self.centroids.nearest(q)
        }
    }

    /// Inserts or replaces the vector of `key`. Returns `true` when the key is new.
    pub fn upsert(&mut self, key: Key, embedding: &Embedding) -> Result<bool, IndexError> {
        self.check(embedding)?;
        if key == NONE {
            return Err(IndexError::ReservedKey(key));
        }
        let q = clamped(&embedding.q);
        let q = q.as_ref();
        let norm = norm_i8(q);
        let list = self.assign(q);
        let new = match self.loc(key) {
            Some(loc) if loc.list as usize == list => {
                let l = &mut self.lists[list];
                let pos = loc.pos as usize;
                l.codes[pos * self.dim..(pos + 1) * self.dim].copy_from_slice(q);
                l.norms[pos] = norm;
                return Ok(false);
            }
            Some(loc) => {
                self.remove_at(loc);
                false
            }
            None => true,
        };
        self.push(list, key, q, norm);
        if new {
            self.len += 1;
        }
        if self.params.auto_retrain && self.needs_retrain() {
            self.retrain();
        }
        Ok(new)
    }

    fn push(&mut self, list: usize, key: Key, q: &[i8], norm: f32) {
        let l = &mut self.lists[list];
        let pos = l.keys.len() as u32;
        l.keys.push(key);
        l.norms.push(norm);
        l.codes.extend_from_slice(q);
        let k = key as usize;
        if self.locs.len() <= k {
            self.locs.resize(k + 1, NO_LOC);
        }
        self.locs[k] = Loc {
            list: list as u32,
            pos,
        };
    }

    fn remove_at(&mut self, loc: Loc) {
        let dim = self.dim;
        let l = &mut self.lists[loc.list as usize];
        let pos = loc.pos as usize;
        let last = l.keys.len() - 1;
        let removed = l.keys.swap_remove(pos);
        l.norms.swap_remove(pos);
        if pos != last {
            l.codes.copy_within(last * dim..(last + 1) * dim, pos * dim);
            let moved = l.keys[pos] as usize;
            self.locs[moved].pos = pos as u32;
        }
        l.codes.truncate(last * dim);
        self.locs[removed as usize] = NO_LOC;
    }

    /// Removes `key`. Returns `true` when it was indexed.
    pub fn remove(&mut self, key: Key) -> bool {
        match self.loc(key) {
            Some(loc) => {
                self.remove_at(loc);
                self.len -= 1;
                true
            }
            None => false,
        }
    }

    /// True when the index has grown enough since the last training to retrain.
    pub fn needs_retrain(&self) -> bool {
        if self.trained_len == 0 {
            self.len >= self.params.min_train
        } else {
            self.len >= self.trained_len.saturating_mul(self.params.growth)
        }
    }

    /// Retrains the coarse quantiser on the current vectors and reassigns every agent.
    /// O(len · nlist · dim); below [`IndexParams::min_train`] agents it collapses to one list.
    pub fn retrain(&mut self) {
        let dim = self.dim;
        if self.len < self.params.min_train {
            self.rebuild(Centroids {
                dim,
                ..Centroids::default()
            });
            self.trained_len = 0;
            return;
        }
        let nlist = if self.params.lists > 0 {
            self.params.lists
        } else {
            (self.params.list_factor * ((self.len * self.params.growth) as f64).sqrt()).round()
                as usize
        }
        .clamp(1, self.len);
        let centroids = self.kmeans(nlist);
        self.rebuild(centroids);
        self.trained_len = self.len;
    }

    /// Spherical k-means on an evenly strided sample; returns the grouped coarse quantiser.
    fn kmeans(&self, nlist: usize) -> Centroids {
        let dim = self.dim;
        let want = (nlist * self.params.sample_per_list)
            .min(self.len)
            .max(nlist);
        let stride = (self.len / want).max(1);
        let mut sample: Vec<i8> = Vec::with_capacity(want * dim);
        let mut sample_norms: Vec<f32> = Vec::with_capacity(want);
        let mut i = 0usize;
        'outer: for l in &self.lists {
            for (row, &n) in l.codes.chunks_exact(dim).zip(&l.norms) {
                if i.is_multiple_of(stride) {
                    sample.extend_from_slice(row);
                    sample_norms.push(n);
                    if sample_norms.len() == want {
                        break 'outer;
                    }
                }
                i += 1;
            }
        }
        let iters = self.params.kmeans_iters;
        let cents = kmeans_rows(dim, &sample, &sample_norms, nlist, iters, self.params.seed);
        Centroids::from_f32(dim, &cents).with_groups(iters, self.params.seed ^ 0x9e37)
    }

    /// Replaces the coarse quantiser and reassigns every vector.
    fn rebuild(&mut self, centroids: Centroids) {
        let dim = self.dim;
        let nlist = centroids.len().max(1);
        let old = std::mem::take(&mut self.lists);
        self.centroids = centroids;
        let expect = self.len / nlist + 1;
        self.lists = (0..nlist)
            .map(|_| List {
                keys: Vec::with_capacity(expect),
                norms: Vec::with_capacity(expect),
                codes: Vec::with_capacity(expect * dim),
            })
            .collect();
        for l in old {
            for ((row, &n), &key) in l.codes.chunks_exact(dim).zip(&l.norms).zip(&l.keys) {
                let list = self.assign(row);
                self.push(list, key, row, n);
            }
        }
    }

    /// The `k` agents most similar to `query` (cosine of the quantised vectors, best first, ties
    /// on the lower key) among those for which `filter(key)` holds, scanning
    /// [`IndexParams::nprobe`] lists (more when fewer than `k` agents pass the filter there).
    pub fn search(
        &self,
        query: &Embedding,
        k: usize,
        filter: impl Fn(Key) -> bool,
    ) -> Result<Vec<(Key, f32)>, IndexError> {
        self.search_nprobe(query, k, self.params.nprobe, filter)
    }

    /// [`AnnIndex::search`] with an explicit `nprobe`.
    pub fn search_nprobe(
        &self,
        query: &Embedding,
        k: usize,
        nprobe: usize,
        filter: impl Fn(Key) -> bool,
    ) -> Result<Vec<(Key, f32)>, IndexError> {
        self.check(query)?;
        let q = clamped(&query.q);
        let q = q.as_ref();
        let qn = norm_i8(q);
        let mut top = TopK::new(k);
        if k == 0 {
            return Ok(Vec::new());
        }
        if self.lists.len() <= 1 {
            for l in &self.lists {
                self.scan(l, q, qn, &filter, &mut top);
            }
            return Ok(top.into_sorted());
        }
        let mut order = self.centroids.scores(q);
        let by_score = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let p = nprobe.clamp(1, order.len());
        if p < order.len() {
            order.select_nth_unstable_by(p - 1, by_score);
        }
        order[..p].sort_unstable_by(by_score);
        for &(_, i) in &order[..p] {
            self.scan(&self.lists[i as usize], q, qn, &filter, &mut top);
        }
        if !top.full() && p < order.len() {
            let rest = &mut order[p..];
            rest.sort_unstable_by(by_score);
            for &(_, i) in rest.iter() {
                self.scan(&self.lists[i as usize], q, qn, &filter, &mut top);
                if top.full() {
                    break;
                }
            }
        }
        Ok(top.into_sorted())
    }

    /// Exact search: scans every list. For measuring recall, and for callers that need the
    /// exact answer.
    pub fn search_exact(
        &self,
        query: &Embedding,
        k: usize,
        filter: impl Fn(Key) -> bool,
    ) -> Result<Vec<(Key, f32)>, IndexError> {
        self.check(query)?;
        let q = clamped(&query.q);
        let q = q.as_ref();
        let qn = norm_i8(q);
        let mut top = TopK::new(k);
        for l in &self.lists {
            self.scan(l, q, qn, &filter, &mut top);
        }
        Ok(top.into_sorted())
    }

    #[inline]
    fn scan(&self, l: &List, q: &[i8], qn: f32, filter: &impl Fn(Key) -> bool, top: &mut TopK) {
        for ((row, &n), &key) in l.codes.chunks_exact(self.dim).zip(&l.norms).zip(&l.keys) {
            let hit = Hit {
                score: cosine_from(dot_i8(row, q), qn, n),
                key,
            };
            if top.admits(&hit) && filter(key) {
                top.push(hit);
            }
        }
    }
}

/// A dense `AgentId ↔ Key` map for [`AnnIndex`], reusing freed keys so keys stay below the
/// peak number of agents (the index's per-key location table is sized by the largest key).
#[derive(Clone, Debug, Default)]
pub struct AgentKeys {
    by_agent: HashMap<AgentId, Key>,
    agents: Vec<Option<AgentId>>,
    free: Vec<Key>,
}

impl AgentKeys {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// The key of `agent`, allocating one if it has none.
    pub fn key_or_insert(&mut self, agent: &AgentId) -> Key {
        if let Some(&k) = self.by_agent.get(agent) {
            return k;
        }
        let k = match self.free.pop() {
            Some(k) => {
                self.agents[k as usize] = Some(agent.clone());
                k
            }
            None => {
                self.agents.push(Some(agent.clone()));
                (self.agents.len() - 1) as Key
            }
        };
        self.by_agent.insert(agent.clone(), k);
        k
    }

    /// The key of `agent`, if any.
    pub fn key(&self, agent: &AgentId) -> Option<Key> {
        self.by_agent.get(agent).copied()
    }

    /// The agent of `key`, if any.
    pub fn agent(&self, key: Key) -> Option<&AgentId> {
        self.agents.get(key as usize).and_then(Option::as_ref)
    }

    /// Forgets `agent`, returning its (now free) key.
    pub fn remove(&mut self, agent: &AgentId) -> Option<Key> {
        let k = self.by_agent.remove(agent)?;
        if let Some(slot) = self.agents.get_mut(k as usize) {
            *slot = None;
        }
        self.free.push(k);
        Some(k)
    }

    /// Number of mapped agents.
    pub fn len(&self) -> usize {
        self.by_agent.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.by_agent.is_empty()
    }
}

#[cfg(test)]
mod tests;
