#![allow(clippy::unwrap_used)]

use super::*;
use fedmesh_protocol::router::cosine;
use fedmesh_protocol::sample::{self, SAMPLE_SPACE};
use fedmesh_protocol::{AgentName, NodeKey};
use proptest::prelude::*;

const DIM: usize = 64;

fn emb(seed: u64) -> Embedding {
    sample::embedding(seed, DIM)
}

/// Clustered embeddings: `centres` random centres plus noise.
fn clustered(n: usize, centres: u64, seed: u64) -> Vec<Embedding> {
    let cs: Vec<Vec<f32>> = (0..centres)
        .map(|c| sample::unit_vector(c * 7919 + 1, DIM))
        .collect();
    (0..n as u64)
        .map(|i| {
            let c = &cs[(i % centres) as usize];
            let noise = sample::unit_vector(seed.wrapping_mul(1_000_003) + i, DIM);
            let v: Vec<f32> = c.iter().zip(&noise).map(|(a, b)| a + 0.7 * b).collect();
            Embedding::quantise(SAMPLE_SPACE, &v).unwrap()
        })
        .collect()
}

fn brute(
    items: &HashMap<Key, Embedding>,
    q: &Embedding,
    k: usize,
    f: impl Fn(Key) -> bool,
) -> Vec<(Key, f32)> {
    let mut all: Vec<(Key, f32)> = items
        .iter()
        .filter(|(k, _)| f(**k))
        .map(|(k, e)| (*k, cosine(q, e).unwrap()))
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

fn small_params() -> IndexParams {
    IndexParams {
        min_train: 256,
        nprobe: 8,
        ..IndexParams::default()
    }
}

#[test]
fn untrained_search_is_exact_and_matches_router_cosine() {
    let mut idx = AnnIndex::new(SAMPLE_SPACE, DIM, IndexParams::default()).unwrap();
    let mut items = HashMap::new();
    for i in 0..500u32 {
        let e = emb(u64::from(i));
        assert!(idx.upsert(i, &e).unwrap());
        items.insert(i, e);
    }
    assert_eq!(idx.nlist(), 1);
    for s in 0..20 {
        let q = emb(10_000 + s);
        let got = idx.search(&q, 10, |_| true).unwrap();
        assert_eq!(got, brute(&items, &q, 10, |_| true));
    }
}

#[test]
fn trained_index_has_high_recall_and_exact_scores() {
    let data = clustered(6000, 40, 1);
    let mut idx = AnnIndex::new(SAMPLE_SPACE, DIM, small_params()).unwrap();
    let mut items = HashMap::new();
    for (i, e) in data.iter().enumerate() {
        idx.upsert(i as Key, e).unwrap();
        items.insert(i as Key, e.clone());
    }
    assert!(idx.nlist() > 1, "the index trained itself");
    assert_eq!(idx.len(), 6000);
    let queries = clustered(100, 40, 2);
    let mut found = 0;
    for q in &queries {
        let exact = brute(&items, q, 10, |_| true);
        let got = idx.search(q, 10, |_| true).unwrap();
        for (k, s) in &got {
            assert_eq!(*s, cosine(q, &items[k]).unwrap(), "scores are exact");
        }
        found += got.iter().filter(|h| exact.contains(h)).count();
        // Probing every list is exact.
        let all = idx.search_nprobe(q, 10, idx.nlist(), |_| true).unwrap();
        assert_eq!(all, exact);
        assert_eq!(idx.search_exact(q, 10, |_| true).unwrap(), exact);
    }
    let recall = found as f64 / 1000.0;
    assert!(recall >= 0.9, "recall@10 {recall}");
}

#[test]
fn remove_and_move_keep_the_index_consistent() {
    let data = clustered(2000, 20, 3);
    let mut idx = AnnIndex::new(SAMPLE_SPACE, DIM, small_params()).unwrap();
    for (i, e) in data.iter().enumerate() {
        idx.upsert(i as Key, e).unwrap();
    }
    // Remove every third, move every fifth to another vector.
    let mut items = HashMap::new();
    for (i, e) in data.iter().enumerate() {
        let k = i as Key;
        if i.is_multiple_of(3) {
            assert!(idx.remove(k));
            assert!(!idx.remove(k), "second remove is a no-op");
            assert!(!idx.contains(k));
        } else if i.is_multiple_of(5) {
            let e2 = emb(50_000 + i as u64);
            assert!(!idx.upsert(k, &e2).unwrap(), "update, not insert");
            assert_eq!(idx.vector(k).unwrap(), e2.q.as_slice());
            items.insert(k, e2);
        } else {
            items.insert(k, e.clone());
        }
    }
    assert_eq!(idx.len(), items.len());
    for (k, e) in &items {
        assert_eq!(idx.vector(*k).unwrap(), e.q.as_slice());
    }
    for s in 0..30 {
        let q = emb(90_000 + s);
        let got = idx.search_nprobe(&q, 10, idx.nlist(), |_| true).unwrap();
        assert_eq!(got, brute(&items, &q, 10, |_| true));
        assert!(got.iter().all(|(k, _)| !k.is_multiple_of(3)));
    }
}

#[test]
fn selective_filter_still_fills_k() {
    let data = clustered(5000, 30, 4);
    let mut idx = AnnIndex::new(SAMPLE_SPACE, DIM, small_params()).unwrap();
    let mut items = HashMap::new();
    for (i, e) in data.iter().enumerate() {
        idx.upsert(i as Key, e).unwrap();
        items.insert(i as Key, e.clone());
    }
    // Only 1 agent in 400 passes: the probed lists alone would hold fewer than k.
    let pass = |k: Key| k % 400 == 7;
    let q = &clustered(1, 30, 5)[0];
    let got = idx.search(q, 10, pass).unwrap();
    assert_eq!(got.len(), 10);
    assert!(got.iter().all(|(k, _)| pass(*k)));
    let none = idx.search(q, 10, |_| false).unwrap();
    assert!(none.is_empty());
    assert!(idx.search(q, 0, |_| true).unwrap().is_empty());
}

#[test]
fn other_spaces_and_dimensions_are_refused() {
    let mut idx = AnnIndex::new(SAMPLE_SPACE, DIM, IndexParams::default()).unwrap();
    let mut e = emb(1);
    e.space = "other/v1".into();
    assert!(matches!(
        idx.upsert(1, &e),
        Err(IndexError::WrongSpace { .. })
    ));
    assert!(matches!(
        idx.search(&e, 3, |_| true),
        Err(IndexError::WrongSpace { .. })
    ));
    let wrong_dim = sample::embedding(1, DIM + 1);
    assert_eq!(
        idx.upsert(1, &wrong_dim),
        Err(IndexError::WrongDim {
            expected: DIM,
            got: DIM + 1
        })
    );
    assert_eq!(
        idx.upsert(u32::MAX, &emb(1)),
        Err(IndexError::ReservedKey(u32::MAX))
    );
    assert!(idx.is_empty());
    assert!(AnnIndex::new(SAMPLE_SPACE, 0, IndexParams::default()).is_err());
}

#[test]
fn memory_is_about_the_vector_plus_a_dozen_bytes() {
    let data = clustered(20_000, 50, 6);
    let mut idx = AnnIndex::new(SAMPLE_SPACE, DIM, IndexParams::default()).unwrap();
    for (i, e) in data.iter().enumerate() {
        idx.upsert(i as Key, e).unwrap();
    }
    idx.shrink_to_fit();
    let per = idx.memory_bytes() as f64 / 20_000.0;
    // 64 B vector + 4 key + 4 norm + 8 location, plus centroids and list headers.
    assert!(per > 80.0 && per < 100.0, "{per} B/agent");
}

#[test]
fn agent_keys_reuse_freed_keys() {
    let node = NodeKey::from_secret_bytes([1; 32]).node_id();
    let a = AgentId::new(node, AgentName::new("a").unwrap());
    let b = AgentId::new(node, AgentName::new("b").unwrap());
    let c = AgentId::new(node, AgentName::new("c").unwrap());
    let mut m = AgentKeys::new();
    let ka = m.key_or_insert(&a);
    let kb = m.key_or_insert(&b);
    assert_ne!(ka, kb);
    assert_eq!(m.key_or_insert(&a), ka);
    assert_eq!(m.remove(&a), Some(ka));
    assert_eq!(m.agent(ka), None);
    assert_eq!(m.key_or_insert(&c), ka, "freed key reused");
    assert_eq!(m.agent(ka), Some(&c));
    assert_eq!(m.key(&b), Some(kb));
    assert_eq!(m.len(), 2);
}

#[derive(Clone, Debug)]
enum Op {
    Upsert(Key, u64),
    Remove(Key),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u32..300, any::<u64>()).prop_map(|(k, s)| Op::Upsert(k, s)),
        1 => (0u32..300).prop_map(Op::Remove),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any sequence of upserts and removes (crossing training thresholds) leaves an index whose
    /// full-probe search equals brute force over a model map.
    #[test]
    fn matches_a_model(ops in proptest::collection::vec(op(), 1..600), q in any::<u64>()) {
        let params = IndexParams { min_train: 64, growth: 2, nprobe: 2, ..IndexParams::default() };
        let mut idx = AnnIndex::new(SAMPLE_SPACE, DIM, params).unwrap();
        let mut model: HashMap<Key, Embedding> = HashMap::new();
        for o in ops {
            match o {
                Op::Upsert(k, s) => {
                    let e = emb(s);
                    prop_assert_eq!(idx.upsert(k, &e).unwrap(), !model.contains_key(&k));
                    model.insert(k, e);
                }
                Op::Remove(k) => {
                    prop_assert_eq!(idx.remove(k), model.remove(&k).is_some());
                }
            }
            prop_assert_eq!(idx.len(), model.len());
        }
        let q = emb(q);
        let want = brute(&model, &q, 10, |k: Key| k.is_multiple_of(2));
        prop_assert_eq!(idx.search_exact(&q, 10, |k: Key| k.is_multiple_of(2)).unwrap(), want.clone());
        prop_assert_eq!(idx.search_nprobe(&q, 10, idx.nlist(), |k: Key| k.is_multiple_of(2)).unwrap(), want);
        // The default probe count returns k results whenever k pass the filter.
        let some = idx.search(&q, 10, |_| true).unwrap();
        prop_assert_eq!(some.len(), model.len().min(10));
    }
}

proptest! {
    /// The vectorised kernel equals the naive sum for every length and every value in
    /// `-127..=127`.
    #[test]
    fn dot_i8_matches_naive(pairs in proptest::collection::vec((-127i8..=127, -127i8..=127), 0..700)) {
        let (a, b): (Vec<i8>, Vec<i8>) = pairs.into_iter().unzip();
        let naive: i32 = a.iter().zip(&b).map(|(&x, &y)| i32::from(x) * i32::from(y)).sum();
        prop_assert_eq!(dot_i8(&a, &b), naive);
    }
}

#[test]
fn minus_128_is_clamped_not_overflowed() {
    let mut idx = AnnIndex::new(SAMPLE_SPACE, DIM, IndexParams::default()).unwrap();
    let e = Embedding {
        space: SAMPLE_SPACE.into(),
        scale: 1.0 / 1024.0,
        q: vec![-128; DIM],
    };
    idx.upsert(3, &e).unwrap();
    assert_eq!(idx.vector(3).unwrap(), vec![-127i8; DIM].as_slice());
    let hits = idx.search(&e, 1, |_| true).unwrap();
    assert_eq!(hits.len(), 1);
    assert!((hits[0].1 - 1.0).abs() < 1e-6, "{hits:?}");
}
