//! Envelope cost against the raw ed25519 cost it wraps, measured in the same run.
//!
//! `cargo bench -p fedmesh-protocol --bench envelope` (results in `BENCHMARKS.md`).
//!
//! The subject is a 256-d capability vector from `sample::vcv` in an `Advertise` envelope. The raw
//! baselines verify the exact bytes `open` verifies (the signature domain followed by the signed
//! part of the envelope) under an already-decompressed key, so `open / raw_verify_strict` is the
//! envelope's whole overhead: framing, decoding, the canonical re-encode, validation, the key
//! decompression and the content id.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use fedmesh_protocol::envelope::SIGNATURE_DOMAIN;
use fedmesh_protocol::{Message, NodeId, content_id, open, open_batch, sample, seal};

const NOW: u64 = 1_790_000_000_000;
const BATCH: usize = 64;

/// The 64 envelopes of the batch: distinct keys and agents, like a gossip burst.
fn envelopes() -> Vec<(SigningKey, Message, Vec<u8>)> {
    (0..BATCH)
        .map(|i| {
            let seed = u8::try_from(i + 1).expect("small");
            let key = sample::key(seed);
            let msg = Message::Advertise(sample::vcv(&key, &format!("agent-{i}"), 1, NOW));
            let bytes = seal(&key, NOW, &msg).expect("seal");
            (SigningKey::from_bytes(&key.secret_bytes()), msg, bytes)
        })
        .collect()
}

/// What `open` hands to ed25519: `SIGNATURE_DOMAIN ‖ signed bytes`.
fn signed_message(envelope: &[u8]) -> Vec<u8> {
    [SIGNATURE_DOMAIN, &envelope[..envelope.len() - 64]].concat()
}

fn signature(envelope: &[u8]) -> Signature {
    let mut s = [0u8; 64];
    s.copy_from_slice(&envelope[envelope.len() - 64..]);
    Signature::from_bytes(&s)
}

fn bench(c: &mut Criterion) {
    let all = envelopes();
    let (sk, msg, env) = &all[0];
    let key = sample::key(1);
    let body = postcard::to_allocvec(msg).expect("encode");
    let raw_msg = signed_message(env);
    let raw_sig = signature(env);
    let vk: VerifyingKey = sk.verifying_key();
    assert!(vk.verify_strict(&raw_msg, &raw_sig).is_ok());
    assert_eq!(sk.sign(&raw_msg), raw_sig);
    assert!(open(env, NOW).is_ok());

    let batch: Vec<&[u8]> = all.iter().map(|(_, _, b)| b.as_slice()).collect();
    let raw_msgs: Vec<Vec<u8>> = batch.iter().map(|b| signed_message(b)).collect();
    let raw_refs: Vec<&[u8]> = raw_msgs.iter().map(Vec::as_slice).collect();
    let raw_sigs: Vec<Signature> = batch.iter().map(|b| signature(b)).collect();
    let raw_keys: Vec<VerifyingKey> = all.iter().map(|(k, _, _)| k.verifying_key()).collect();
    assert!(ed25519_dalek::verify_batch(&raw_refs, &raw_sigs, &raw_keys).is_ok());
    assert!(open_batch(&batch, NOW).iter().all(Result::is_ok));

    eprintln!(
        "envelope: {} bytes (body {} bytes); ed25519 message: {} bytes",
        env.len(),
        body.len(),
        raw_msg.len()
    );

    // Interleaved A/B: on a shared, noisy machine a slow spell hits both sides of each ratio.
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--profile-time") {
        interleaved(
            "open / raw_verify_strict",
            200,
            || {
                black_box(open(black_box(env), NOW).is_ok());
            },
            || {
                black_box(vk.verify_strict(black_box(&raw_msg), &raw_sig).is_ok());
            },
        );
        interleaved(
            "open_batch(64) / raw_verify_batch(64)",
            4,
            || {
                black_box(open_batch(black_box(&batch), NOW));
            },
            || {
                black_box(
                    ed25519_dalek::verify_batch(black_box(&raw_refs), &raw_sigs, &raw_keys).is_ok(),
                );
            },
        );
    }

    let mut g = c.benchmark_group("envelope");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode", |b| {
        b.iter(|| postcard::to_allocvec(black_box(msg)).expect("encode"))
    });
    g.bench_function("decode", |b| {
        b.iter(|| postcard::from_bytes::<Message>(black_box(&body)).expect("decode"))
    });
    g.bench_function("seal", |b| {
        b.iter(|| seal(&key, NOW, black_box(msg)).expect("seal"))
    });
    g.bench_function("open", |b| {
        b.iter(|| open(black_box(env), NOW).expect("open"))
    });
    g.bench_function("raw_verify_strict", |b| {
        b.iter(|| {
            vk.verify_strict(black_box(&raw_msg), black_box(&raw_sig))
                .expect("verify")
        })
    });
    g.finish();

    // Where `open`'s time goes beyond the raw verification (each a public piece of it).
    let signer = NodeId(vk.to_bytes());
    let mut g = c.benchmark_group("open_parts");
    g.bench_function("key_decompress", |b| {
        b.iter(|| VerifyingKey::from_bytes(black_box(&vk.to_bytes())).expect("key"))
    });
    g.bench_function("reencode_compare", |b| {
        b.iter(|| postcard::to_allocvec(black_box(msg)).expect("encode") == body)
    });
    g.bench_function("validate_static", |b| {
        b.iter(|| black_box(msg).validate_static(&signer).expect("valid"))
    });
    g.bench_function("content_id", |b| {
        b.iter(|| content_id(black_box(env)).expect("id"))
    });
    g.bench_function("domain_copy", |b| b.iter(|| signed_message(black_box(env))));
    g.finish();

    let mut g = c.benchmark_group("batch64");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("open_batch", |b| {
        b.iter(|| open_batch(black_box(&batch), NOW))
    });
    g.bench_function("raw_verify_batch", |b| {
        b.iter(|| {
            ed25519_dalek::verify_batch(black_box(&raw_refs), &raw_sigs, &raw_keys).expect("batch")
        })
    });
    g.bench_function("open_each", |b| {
        b.iter(|| {
            black_box(&batch)
                .iter()
                .filter(|e| open(e, NOW).is_ok())
                .count()
        })
    });
    g.finish();
}

/// Times `reps` runs of `a` and of `b`, alternately (and in alternating order), for `ROUNDS`
/// rounds, and prints the median time of each and the median of the per-round ratios a/b.
fn interleaved(name: &str, reps: u32, mut a: impl FnMut(), mut b: impl FnMut()) {
    const ROUNDS: usize = 41;
    let time = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..reps {
            f();
        }
        start.elapsed().as_secs_f64() * 1e9 / f64::from(reps)
    };
    let (mut ta, mut tb, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let (x, y) = if round % 2 == 0 {
            let x = time(&mut a);
            (x, time(&mut b))
        } else {
            let y = time(&mut b);
            (time(&mut a), y)
        };
        ta.push(x);
        tb.push(y);
        ratios.push(x / y);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    eprintln!(
        "interleaved {name}: {:.1} µs / {:.1} µs, ratio {:.3} (median of {ROUNDS} rounds)",
        median(&mut ta) / 1e3,
        median(&mut tb) / 1e3,
        median(&mut ratios)
    );
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench
}
criterion_main!(benches);
