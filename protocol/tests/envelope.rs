//! Envelope and VCV tests: golden bytes, one test per rejection reason, property tests.

use fedmesh_protocol::envelope::{ENVELOPE_VERSION, MIN_ENVELOPE_BYTES};
use fedmesh_protocol::limits::*;
use fedmesh_protocol::sample;
use fedmesh_protocol::{
    Embedding, ExampleVector, Message, Rejection, Vcv, keys::hex, open, open_batch, seal,
};
use proptest::prelude::*;

const NOW: u64 = 1_790_000_000_000;

fn sealed(vcv: &Vcv) -> Vec<u8> {
    seal(&sample::key(1), NOW, &Message::Advertise(vcv.clone())).expect("seal")
}

fn base() -> Vcv {
    sample::vcv(&sample::key(1), "ocr", 1, NOW)
}

/// Re-signs a VCV that was mutated after `normalise`, so that only the mutation is wrong.
fn reject(mutate: impl FnOnce(&mut Vcv)) -> Rejection {
    let mut v = base();
    mutate(&mut v);
    match seal(&sample::key(1), NOW, &Message::Advertise(v)) {
        Err(r) => r,
        Ok(bytes) => open(&bytes, NOW).expect_err("mutation must be rejected"),
    }
}

#[test]
fn golden_vcv_encoding() {
    let mut v = base();
    v.capability =
        Embedding::quantise("s", &[0.5, -0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0]).expect("q");
    v.examples.truncate(1);
    v.example_vectors =
        vec![ExampleVector::quantise(&[0.0, 0.5, 0.5, 0.0, 0.5, 0.0, -0.5, 0.0]).expect("q")];
    let bytes = postcard_bytes(&Message::Advertise(v));
    assert_eq!(hex(&bytes), GOLDEN_VCV, "VCV encoding changed");
}

#[test]
fn golden_envelope_bytes() {
    let msg = Message::Withdraw {
        agent: base().agent,
        version: 7,
    };
    let bytes = seal(&sample::key(1), NOW, &msg).expect("seal");
    assert_eq!(hex(&bytes), GOLDEN_WITHDRAW, "envelope encoding changed");
    let env = open(&bytes, NOW).expect("open");
    assert_eq!(env.message, msg);
    assert_eq!(env.signer, sample::key(1).node_id());
    assert_eq!(env.id.to_string(), GOLDEN_WITHDRAW_ID);
}

// Pinned by the tests above; change them only with a new ENVELOPE_VERSION.
// Advertise(Vcv): variant 0, agent (node key, name "ocr"), version 1, times, description, examples,
// capability (space "s", f32 scale, 8 x i8), skills, bloom, resources, policies, spec None,
// example_vectors (count 1; f32 scale, 8 x i8; version 2).
const GOLDEN_VCV: &str = concat!(
    "008a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c036f63720180d8",
    "c1a28c3480b59da48c34356f63723a20657874726163747320746578742066726f6d207363616e6e",
    "656420696e766f6963657320616e6420726563656970747301117265616420746869732072656365",
    "69707401730402813b087f817f81000000000308696e766f69636573036f63720370646600000000",
    "0000004012000000000800000000000020020000004000000200000078f403048080408040000002",
    "04676470720c6e6f2d726574656e74696f6e00010402813b08007f7f007f008100",
);
const GOLDEN_WITHDRAW: &str = concat!(
    "028a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c006c50c4a001000001",
    "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c036f6372078f",
    "365caaa5a12c72759c84a9716daa2e2cd6699cda6bc9e833cd824a406fbeb3e4",
    "3e61d01bcb0204b00a40c63d909211af342eb61caa3e283bfecec9ccfee405",
);
const GOLDEN_WITHDRAW_ID: &str = "24fe9f2f32a8d56faf8077d7efe9989d2ac05c0e9b1fc8a2f4bf868bc4d830e3";

fn postcard_bytes(m: &Message) -> Vec<u8> {
    // The body of an envelope is everything between the 41-byte header and the 64-byte signature.
    let env = seal(&sample::key(1), NOW, m).expect("seal");
    env[41..env.len() - 64].to_vec()
}

#[test]
fn valid_advertise_opens() {
    let v = base();
    let env = open(&sealed(&v), NOW).expect("valid");
    assert_eq!(env.message, Message::Advertise(v));
}

#[test]
fn rejects_bad_signature() {
    let mut bytes = sealed(&base());
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    assert_eq!(open(&bytes, NOW), Err(Rejection::BadSignature));
}

#[test]
fn rejects_signature_by_another_key() {
    // Signed by key 2 but claims key 1 as signer: the agent's host check passes, the signature fails.
    let v = base();
    let mut bytes = Vec::new();
    let good = seal(
        &sample::key(1),
        NOW,
        &Message::Withdraw {
            agent: v.agent,
            version: 2,
        },
    )
    .expect("seal");
    let other = seal(
        &sample::key(2),
        NOW,
        &Message::Heartbeat {
            seq: 1,
            load: vec![],
        },
    )
    .expect("seal");
    bytes.extend_from_slice(&good[..good.len() - 64]);
    bytes.extend_from_slice(&other[other.len() - 64..]);
    assert_eq!(open(&bytes, NOW), Err(Rejection::BadSignature));
}

#[test]
fn rejects_oversize() {
    let big = vec![0u8; MAX_ENVELOPE_BYTES + 1];
    assert!(matches!(open(&big, NOW), Err(Rejection::Oversize { .. })));
    // A VCV over MAX_VCV_BYTES is refused when sealing, and when opening.
    let r = reject(|v| {
        v.examples = vec!["x".repeat(MAX_EXAMPLE_BYTES); MAX_EXAMPLES];
        v.description = "y".repeat(MAX_DESCRIPTION_BYTES);
        let x = ExampleVector::quantise(&sample::unit_vector(3, 256)).expect("q");
        v.example_vectors = vec![x; MAX_EXAMPLE_VECTORS];
    });
    assert!(
        matches!(
            r,
            Rejection::Oversize {
                max: MAX_VCV_BYTES,
                ..
            }
        ),
        "{r:?}"
    );
}

#[test]
fn rejects_nan_vector() {
    assert_eq!(
        reject(|v| v.capability.scale = f32::NAN),
        Rejection::NotFinite {
            field: "capability"
        }
    );
}

#[test]
fn rejects_non_normalised_vector() {
    let r = reject(|v| v.capability.scale *= 2.0);
    assert!(
        matches!(
            r,
            Rejection::NotNormalised {
                field: "capability",
                ..
            }
        ),
        "{r:?}"
    );
}

#[test]
fn rejects_dimension_mismatch() {
    let r = reject(|v| v.spec = Some(sample::embedding(5, 128)));
    assert_eq!(
        r,
        Rejection::DimensionMismatch {
            field: "spec",
            expected: 256,
            got: 128
        }
    );
    let r = reject(|v| v.capability = sample::embedding(5, MAX_DIM + 1));
    assert!(matches!(r, Rejection::DimensionOutOfRange { .. }), "{r:?}");
}

#[test]
fn rejects_too_many_skills() {
    let r = reject(|v| {
        v.skills = (0..=MAX_SKILLS).map(|i| format!("s{i:03}")).collect();
        v.normalise();
    });
    assert_eq!(
        r,
        Rejection::TooMany {
            field: "skills",
            count: MAX_SKILLS + 1,
            max: MAX_SKILLS
        }
    );
}

#[test]
fn rejects_expired() {
    let v = base();
    let r = open(&sealed(&v), v.expires_at_ms).expect_err("expired");
    assert!(matches!(r, Rejection::Expired { .. }), "{r:?}");
}

#[test]
fn rejects_issued_too_far_in_future() {
    let r = reject(|v| {
        v.issued_at_ms = NOW + MAX_CLOCK_SKEW_MS + 1;
        v.expires_at_ms = v.issued_at_ms + 1000;
    });
    assert!(matches!(r, Rejection::IssuedInFuture { .. }), "{r:?}");
    // Inside the skew allowance it is fine.
    let mut v = base();
    v.issued_at_ms = NOW + MAX_CLOCK_SKEW_MS;
    open(&sealed(&v), NOW).expect("within skew");
}

#[test]
fn rejects_ttl_too_long_and_bloom_mismatch_and_host_mismatch() {
    assert!(matches!(
        reject(|v| v.expires_at_ms = v.issued_at_ms + MAX_VCV_TTL_MS + 1),
        Rejection::TtlTooLong { .. }
    ));
    assert_eq!(
        reject(|v| v.skill_bloom = Default::default()),
        Rejection::BloomMismatch
    );
    assert_eq!(
        reject(|v| v.agent.node = sample::key(9).node_id()),
        Rejection::HostMismatch
    );
}

#[test]
fn rejects_unsorted_or_uppercase_labels() {
    assert_eq!(
        reject(|v| v.skills.reverse()),
        Rejection::BadLabel { field: "skills" }
    );
    assert_eq!(
        reject(|v| v.policies.push("a b".into())),
        Rejection::BadLabel { field: "policies" }
    );
}

#[test]
fn rejects_unknown_version_truncation_and_trailing_bytes() {
    let bytes = sealed(&base());
    let mut v2 = bytes.clone();
    v2[0] = ENVELOPE_VERSION + 1;
    assert_eq!(
        open(&v2, NOW),
        Err(Rejection::UnknownVersion(ENVELOPE_VERSION + 1))
    );
    assert!(matches!(
        open(&bytes[..MIN_ENVELOPE_BYTES - 1], NOW),
        Err(Rejection::Malformed(_))
    ));
    assert!(matches!(open(&[], NOW), Err(Rejection::Malformed(_))));
    // An extra byte inside the signed region: body no longer decodes to exactly one Message.
    let mut extra = bytes[..bytes.len() - 64].to_vec();
    extra.push(0);
    extra.extend_from_slice(&bytes[bytes.len() - 64..]);
    assert!(matches!(open(&extra, NOW), Err(Rejection::Malformed(_))));
}

#[test]
fn rejects_non_canonical_varint() {
    // Withdraw{version: 7}: re-encode the trailing varint 0x07 as the overlong 0x87 0x00.
    let msg = Message::Withdraw {
        agent: base().agent,
        version: 7,
    };
    let bytes = seal(&sample::key(1), NOW, &msg).expect("seal");
    let body_end = bytes.len() - 64;
    assert_eq!(bytes[body_end - 1], 7);
    let mut signed = bytes[..body_end - 1].to_vec();
    signed.extend_from_slice(&[0x87, 0x00]);
    // Sign it properly so only canonicality is wrong.
    let forged = resign(&signed);
    assert_eq!(open(&forged, NOW), Err(Rejection::NonCanonical));
}

fn resign(signed: &[u8]) -> Vec<u8> {
    use ed25519_dalek::Signer;
    let sk = ed25519_dalek::SigningKey::from_bytes(&sample::key(1).secret_bytes());
    let mut m = fedmesh_protocol::envelope::SIGNATURE_DOMAIN.to_vec();
    m.extend_from_slice(signed);
    let mut out = signed.to_vec();
    out.extend_from_slice(&sk.sign(&m).to_bytes());
    out
}

#[test]
fn signature_is_domain_separated() {
    // A signature over the raw bytes (no domain prefix) must not verify.
    use ed25519_dalek::Signer;
    let bytes = sealed(&base());
    let signed = &bytes[..bytes.len() - 64];
    let sk = ed25519_dalek::SigningKey::from_bytes(&sample::key(1).secret_bytes());
    let mut forged = signed.to_vec();
    forged.extend_from_slice(&sk.sign(signed).to_bytes());
    assert_eq!(open(&forged, NOW), Err(Rejection::BadSignature));
}

#[test]
fn batch_open_isolates_a_forgery() {
    let good: Vec<Vec<u8>> = (0..8u64)
        .map(|i| sealed(&sample::vcv(&sample::key(1), "a", i + 1, NOW)))
        .collect();
    let mut items: Vec<&[u8]> = good.iter().map(Vec::as_slice).collect();
    let mut bad = good[3].clone();
    let n = bad.len();
    bad[n - 10] ^= 0x40;
    items[3] = &bad;
    let out = open_batch(&items, NOW);
    for (i, r) in out.iter().enumerate() {
        assert_eq!(r.is_ok(), i != 3, "item {i}: {r:?}");
    }
    assert!(
        open_batch(&good.iter().map(Vec::as_slice).collect::<Vec<_>>(), NOW)
            .iter()
            .all(Result::is_ok)
    );
}

fn arb_vcv() -> impl Strategy<Value = Vcv> {
    (
        1u64..u64::MAX / 2,
        "[a-z0-9_.-]{1,20}",
        proptest::collection::vec("[a-z]{1,10}", 0..8),
        proptest::collection::vec("[a-z-]{1,12}", 0..4),
        proptest::option::of(any::<u64>()),
        any::<u64>(),
        8usize..300,
        ".{0,200}",
    )
        .prop_map(|(version, name, skills, policies, spec, seed, dim, desc)| {
            let mut v = sample::vcv(&sample::key(1), &name, version, NOW);
            v.skills = skills;
            v.policies = policies;
            v.capability = sample::embedding(seed, dim);
            v.spec = spec.map(|s| sample::embedding(s, dim));
            v.description = desc;
            v.normalise();
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip(v in arb_vcv()) {
        let bytes = sealed(&v);
        let env = open(&bytes, NOW).expect("valid VCV opens");
        prop_assert_eq!(env.message, Message::Advertise(v));
    }

    #[test]
    fn any_change_to_signed_bytes_fails(v in arb_vcv(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut bytes = sealed(&v);
        let i = pos.index(bytes.len() - 64);
        bytes[i] ^= 1 << bit;
        prop_assert!(open(&bytes, NOW).is_err());
    }

    #[test]
    fn any_change_to_signature_fails(v in arb_vcv(), pos in 0usize..64, bit in 0u8..8) {
        let mut bytes = sealed(&v);
        let n = bytes.len();
        bytes[n - 64 + pos] ^= 1 << bit;
        prop_assert_eq!(open(&bytes, NOW), Err(Rejection::BadSignature));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = open(&bytes, NOW);
    }
}

mod channel {
    //! Channel envelopes: task messages without a signature, for a connection that
    //! authenticates the sender.
    use super::*;
    use fedmesh_protocol::{
        AgentId, AgentName, CHANNEL_VERSION, TaskId, is_channel, open_channel, seal_channel,
    };

    fn accept(host: &fedmesh_protocol::NodeKey) -> Message {
        Message::Accept {
            task: TaskId([7; 16]),
            agent: AgentId::new(host.node_id(), AgentName::new("ocr").expect("name")),
        }
    }

    #[test]
    fn opens_from_the_authenticated_peer_only() {
        let host = sample::key(2);
        let bytes = seal_channel(&host.node_id(), NOW, &accept(&host)).expect("seal");
        assert!(is_channel(&bytes));
        assert_eq!(bytes[0], CHANNEL_VERSION);
        let env = open_channel(&bytes, &host.node_id(), NOW).expect("open");
        assert_eq!(env.signer, host.node_id());
        assert_eq!(env.message, accept(&host));
        // Another peer sending the same bytes claims to be the host: refused.
        assert_eq!(
            open_channel(&bytes, &sample::key(3).node_id(), NOW),
            Err(Rejection::HostMismatch)
        );
        // A signed-envelope reader refuses them: they cannot pass for signed.
        assert_eq!(
            open(&bytes, NOW),
            Err(Rejection::UnknownVersion(CHANNEL_VERSION))
        );
        // A signed envelope is not a channel envelope either.
        let signed = seal(&host, NOW, &accept(&host)).expect("seal");
        assert!(!is_channel(&signed));
        assert_eq!(
            open_channel(&signed, &host.node_id(), NOW),
            Err(Rejection::UnknownVersion(ENVELOPE_VERSION))
        );
    }

    #[test]
    fn registry_messages_are_never_unsigned() {
        let host = sample::key(1);
        let advert = Message::Advertise(base());
        assert!(!advert.travels_unsigned());
        assert!(matches!(
            seal_channel(&host.node_id(), NOW, &advert),
            Err(Rejection::Malformed(_))
        ));
        // Hand-made: the signed bytes of an advertisement, relabelled as a channel envelope.
        let mut forged = sealed(&base());
        forged.truncate(forged.len() - 64);
        forged[0] = CHANNEL_VERSION;
        assert!(matches!(
            open_channel(&forged, &host.node_id(), NOW),
            Err(Rejection::Malformed(_))
        ));
    }

    #[test]
    fn the_same_checks_as_signed_envelopes() {
        let host = sample::key(2);
        let mut bytes = seal_channel(&host.node_id(), NOW, &accept(&host)).expect("seal");
        // Issued too far in the future.
        let late = seal_channel(&host.node_id(), NOW + 3_600_000, &accept(&host)).expect("seal");
        assert!(matches!(
            open_channel(&late, &host.node_id(), NOW),
            Err(Rejection::IssuedInFuture { .. })
        ));
        // An Accept naming another node's agent (validate_static).
        let other = Message::Accept {
            task: TaskId([7; 16]),
            agent: AgentId::new(
                sample::key(3).node_id(),
                AgentName::new("ocr").expect("name"),
            ),
        };
        let b = seal_channel(&host.node_id(), NOW, &other).expect("seal");
        assert_eq!(
            open_channel(&b, &host.node_id(), NOW),
            Err(Rejection::HostMismatch)
        );
        // Trailing bytes, truncation, oversize.
        bytes.push(0);
        assert!(open_channel(&bytes, &host.node_id(), NOW).is_err());
        assert!(open_channel(&bytes[..20], &host.node_id(), NOW).is_err());
        assert!(open_channel(&[], &host.node_id(), NOW).is_err());
        let mut big = vec![CHANNEL_VERSION; MAX_ENVELOPE_BYTES + 1];
        big[0] = CHANNEL_VERSION;
        assert!(matches!(
            open_channel(&big, &host.node_id(), NOW),
            Err(Rejection::Oversize { .. })
        ));
    }
}
