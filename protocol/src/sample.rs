//! Deterministic sample values for tests, benchmarks, fuzzing and the simulator.

use crate::keys::{AgentId, AgentName, NodeKey};
use crate::message::{TaskId, TaskSpec};
use crate::vcv::{Embedding, ResourceLimits, Resources, Vcv};

/// The embedding space of sample vectors.
pub const SAMPLE_SPACE: &str = "fedmesh-sample-256/v1";

/// A deterministic node key from a seed byte.
pub fn key(seed: u8) -> NodeKey {
    NodeKey::from_secret_bytes([seed; 32])
}

/// A deterministic pseudo-random unit vector of `dim` dimensions (splitmix64 of `seed`).
pub fn unit_vector(seed: u64, dim: usize) -> Vec<f32> {
    let mut state = seed;
    (0..dim)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// A deterministic embedding in [`SAMPLE_SPACE`].
pub fn embedding(seed: u64, dim: usize) -> Embedding {
    Embedding::quantise(SAMPLE_SPACE, &unit_vector(seed, dim)).unwrap_or_else(|| {
        // unit_vector never yields an all-zero vector for dim >= 1; keep a total function anyway.
        Embedding {
            space: SAMPLE_SPACE.into(),
            scale: 1.0 / 127.0,
            q: vec![127; 1],
        }
    })
}

/// A valid, normalised 256-d capability vector for agent `name` on `key`'s node.
pub fn vcv(key: &NodeKey, name: &str, version: u64, issued_at_ms: u64) -> Vcv {
    let mut v = Vcv {
        agent: AgentId::new(
            key.node_id(),
            AgentName::new(name).unwrap_or_else(|_| fallback_name()),
        ),
        version,
        issued_at_ms,
        expires_at_ms: issued_at_ms + 3_600_000,
        description: format!("{name}: extracts text from scanned invoices and receipts"),
        examples: vec!["read this receipt".into(), "OCR this invoice PDF".into()],
        capability: embedding(version ^ u64::from(key.secret_bytes()[0]), 256),
        skills: vec!["ocr".into(), "pdf".into(), "invoices".into()],
        skill_bloom: Default::default(),
        resources: Resources {
            latency_ms: 120,
            cost_micros: 500,
            capacity: 4,
            max_input_bytes: 1 << 20,
            context_tokens: 8192,
            tokens_per_s: 0,
            gpu_mem_mb: 0,
        },
        policies: vec!["gdpr".into(), "no-retention".into()],
        spec: None,
        example_vectors: Vec::new(),
    };
    v.normalise();
    v
}

/// A valid task originating at `key`'s node.
pub fn task(key: &NodeKey, request_id: &str, created_at_ms: u64) -> TaskSpec {
    TaskSpec {
        id: TaskId::derive(&key.node_id(), "requester", request_id),
        origin: key.node_id(),
        description: "extract the total from this receipt".into(),
        requirement: embedding(99, 256),
        spec: None,
        skills: vec!["ocr".into()],
        policies: vec!["gdpr".into()],
        limits: ResourceLimits::default(),
        input: b"receipt.png bytes".to_vec(),
        created_at_ms,
        deadline_ms: created_at_ms + 300_000,
        redundancy: 1,
    }
}

fn fallback_name() -> AgentName {
    AgentName::new("agent").unwrap_or_else(|_| unreachable!("static name is valid"))
}
