//! The decoders of `fedmesh-protocol` driven with untrusted bytes, each with the properties that must
//! hold for *any* input (beyond "does not panic").
//!
//! This one file is shared: the cargo-fuzz targets in `fuzz/fuzz_targets/` call these functions,
//! and `protocol/tests/fuzz_corpus.rs` includes this file with `#[path]` to replay every corpus
//! entry through the same checks in the normal `cargo test` run. It depends only on
//! `fedmesh-protocol` and `postcard`, which both crates have.

use std::str::FromStr;

use fedmesh_protocol::envelope::{ENVELOPE_VERSION, MIN_ENVELOPE_BYTES};
use fedmesh_protocol::{
    AgentId, CHANNEL_VERSION, Message, NodeId, NodeKey, Rejection, TaskId, content_id, open,
    open_batch, open_channel, sample, seal,
};

/// The fixed clock of every envelope target: the seed envelopes are valid at this instant.
pub const NOW_MS: u64 = 1_790_000_000_000;

/// Largest number of envelopes one `open_batch` input is split into.
pub const MAX_BATCH: usize = 64;

/// The check of one fuzz target: panics when a property does not hold for `data`.
pub type Check = fn(data: &[u8]);

/// Every fuzz target: its name (= `fuzz/fuzz_targets/<name>.rs` = `fuzz/corpus/<name>/`) and its
/// check.
pub const TARGETS: &[(&str, Check)] = &[
    ("open", check_open),
    ("open_batch", check_open_batch),
    ("message", check_message),
    ("node_id", check_node_id),
    ("agent_id", check_agent_id),
    ("secret_hex", check_secret_hex),
    ("task_id", check_task_id),
];

/// Header length of an envelope (version, signer, sent_at_ms).
const HEADER_LEN: usize = 1 + 32 + 8;
/// Signature length.
const SIG_LEN: usize = 64;

/// `fedmesh_protocol::open` at [`NOW_MS`], then [`check_open_channel`] on the same bytes.
///
/// On success the envelope must describe exactly the input bytes: signer and time from the header,
/// a body that is the canonical encoding of the message, the content id of the signed bytes, and a
/// message that passes static validation. Every rejection must render and classify.
pub fn check_open(data: &[u8]) {
    match open(data, NOW_MS) {
        Ok(env) => {
            assert!(data.len() >= MIN_ENVELOPE_BYTES);
            assert_eq!(data[0], ENVELOPE_VERSION);
            assert_eq!(&data[1..33], env.signer.as_bytes());
            let mut sent = [0u8; 8];
            sent.copy_from_slice(&data[33..HEADER_LEN]);
            assert_eq!(u64::from_le_bytes(sent), env.sent_at_ms);
            let body = &data[HEADER_LEN..data.len() - SIG_LEN];
            let canonical = postcard::to_allocvec(&env.message).expect("re-encode");
            assert_eq!(canonical, body, "accepted body is not canonical");
            assert_eq!(content_id(data), Some(env.id));
            assert_eq!(env.message.validate_static(&env.signer), Ok(()));
            let _ = format!("{env:?} {} {}", env.id, env.message.kind());
        }
        Err(r) => exercise_rejection(&r),
    }
    check_open_channel(data);
}

/// `fedmesh_protocol::open_channel` at [`NOW_MS`], from the peer the header names (the only one
/// it can succeed for) and from another.
///
/// On success: a channel envelope of that peer, with a canonical body of a task message that
/// passes static validation. From any other peer it must fail.
fn check_open_channel(data: &[u8]) {
    let Some(named) = data.get(1..33).map(|b| {
        let mut k = [0u8; 32];
        k.copy_from_slice(b);
        NodeId(k)
    }) else {
        assert!(open_channel(data, &NodeId([0; 32]), NOW_MS).is_err());
        return;
    };
    match open_channel(data, &named, NOW_MS) {
        Ok(env) => {
            assert_eq!(data[0], CHANNEL_VERSION);
            assert_eq!(env.signer, named);
            assert!(env.message.travels_unsigned());
            let canonical = postcard::to_allocvec(&env.message).expect("re-encode");
            assert_eq!(
                canonical,
                &data[HEADER_LEN..],
                "accepted body is not canonical"
            );
            assert_eq!(env.message.validate_static(&env.signer), Ok(()));
            let mut other = named.0;
            other[0] ^= 1;
            assert!(open_channel(data, &NodeId(other), NOW_MS).is_err());
            // A channel envelope never opens as a signed one.
            assert!(open(data, NOW_MS).is_err());
        }
        Err(r) => exercise_rejection(&r),
    }
}

/// `fedmesh_protocol::open_batch` at [`NOW_MS`] over the input split by [`split_batch`].
///
/// Differential: the result for every item must equal what [`open`] says about it alone.
pub fn check_open_batch(data: &[u8]) {
    let items = split_batch(data);
    let results = open_batch(&items, NOW_MS);
    assert_eq!(results.len(), items.len());
    for (item, batched) in items.iter().zip(&results) {
        let single = open(item, NOW_MS);
        assert_eq!(
            batched,
            &single,
            "open_batch and open disagree on an item of {} bytes",
            item.len()
        );
    }
}

/// Splits a fuzz input into at most [`MAX_BATCH`] envelopes: each is a little-endian `u16`
/// length followed by that many bytes (the last one takes what is left when the input is short).
pub fn split_batch(mut data: &[u8]) -> Vec<&[u8]> {
    let mut items = Vec::new();
    while data.len() >= 2 && items.len() < MAX_BATCH {
        let len = usize::from(u16::from_le_bytes([data[0], data[1]]));
        let rest = &data[2..];
        let (item, tail) = rest.split_at(len.min(rest.len()));
        items.push(item);
        data = tail;
    }
    items
}

/// The inverse of [`split_batch`], for building seeds.
pub fn join_batch(items: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        let len = u16::try_from(item.len()).expect("batch item over 64 KiB");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(item);
    }
    out
}

/// The raw body decoder, `postcard::take_from_bytes::<Message>`.
///
/// A decoded message must re-encode, the re-encoding must be no longer than what was consumed
/// (canonical postcard is the shortest form) and must decode to a message that re-encodes to the
/// same bytes (a fixed point). Static validation must not panic, and a message that `seal` accepts
/// must come back out of `open` without a framing, canonicality or signature rejection.
pub fn check_message(data: &[u8]) {
    let Ok((message, rest)) = postcard::take_from_bytes::<Message>(data) else {
        return;
    };
    let consumed = &data[..data.len() - rest.len()];
    let canonical = postcard::to_allocvec(&message).expect("a decoded message re-encodes");
    assert!(canonical.len() <= consumed.len());
    if canonical.len() == consumed.len() {
        assert_eq!(canonical, consumed, "same length but different bytes");
    }
    let again: Message = postcard::from_bytes(&canonical).expect("canonical bytes decode");
    assert_eq!(postcard::to_allocvec(&again).expect("re-encode"), canonical);
    let _ = message.kind();
    let key = sample::key(1);
    let _ = message.validate_static(&key.node_id());
    if let Ok(bytes) = seal(&key, NOW_MS, &message) {
        match open(&bytes, NOW_MS) {
            Ok(env) => assert_eq!(
                postcard::to_allocvec(&env.message).expect("re-encode"),
                canonical
            ),
            Err(r) => {
                assert!(
                    !matches!(
                        r,
                        Rejection::BadSignature
                            | Rejection::NonCanonical
                            | Rejection::UnknownVersion(_)
                            | Rejection::Oversize { .. }
                            | Rejection::Malformed("body does not decode as a Message")
                            | Rejection::Malformed("trailing bytes after the body")
                            | Rejection::Malformed("envelope shorter than header and signature")
                    ),
                    "seal produced an envelope that open refuses for framing: {r:?}"
                );
                exercise_rejection(&r);
            }
        }
    }
}

/// `NodeId::from_str`: base58 is a bijection, so an accepted id prints exactly as given
/// (up to the surrounding whitespace the parser trims).
pub fn check_node_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = NodeId::from_str(text) {
        assert_eq!(id.to_string(), text.trim());
        assert_eq!(NodeId::from_str(&id.to_string()), Ok(id));
        assert!(id.to_string().starts_with("12D3KooW"));
        let _ = format!("{id:?}");
    }
}

/// `AgentId::from_str`: an accepted id prints as `name@node` and parses back to itself.
pub fn check_agent_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = AgentId::from_str(text) {
        let printed = id.to_string();
        assert_eq!(AgentId::from_str(&printed), Ok(id.clone()));
        // The node part goes through `NodeId::from_str`, which trims whitespace; the name does not.
        let (name, node) = text.rsplit_once('@').expect("accepted ids contain '@'");
        assert_eq!(printed, format!("{name}@{}", node.trim()));
        let _ = format!("{id:?}");
    }
}

/// `NodeKey::from_secret_hex`: compared with a strict reference hex decoder.
pub fn check_secret_hex(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = NodeKey::from_secret_hex(text)
        .ok()
        .map(|k| k.secret_bytes());
    check_hex_against_reference(text.trim(), parsed);
    if let Some(bytes) = parsed {
        let key = NodeKey::from_secret_bytes(bytes);
        let again = NodeKey::from_secret_hex(&key.to_secret_hex()).expect("own output parses");
        assert_eq!(again.secret_bytes(), bytes);
        assert!(!format!("{key:?}").contains(&key.to_secret_hex()));
    }
}

/// `TaskId::from_hex`: compared with a strict reference hex decoder; round-trips through `Display`.
pub fn check_task_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = TaskId::from_hex(text);
    check_hex_against_reference(text, parsed.map(|t| t.0));
    if let Some(id) = parsed {
        assert_eq!(TaskId::from_hex(&id.to_string()), Some(id));
        let _ = format!("{id:?}");
    }
}

/// Strictly decodes `text` as hex and compares with what the parser under test returned.
///
/// Known leniency (reported, not fixed here): both parsers decode pairs with `u8::from_str_radix`,
/// which also accepts a `+` sign, so the pair `"+a"` is read as `0x0a`. That form is tolerated
/// (and checked to decode that way); any other non-hex input must be refused.
fn check_hex_against_reference<const N: usize>(text: &str, parsed: Option<[u8; N]>) {
    let strict = strict_hex::<N>(text);
    match (parsed, strict) {
        (Some(p), Some(s)) => assert_eq!(p, s),
        (None, Some(_)) => panic!("valid hex refused: {text:?}"),
        (None, None) => {}
        (Some(p), None) => {
            let plus_form: String = text.replace('+', "0");
            let plus_pairs = text
                .as_bytes()
                .chunks(2)
                .all(|c| c.len() == 2 && c[1] != b'+');
            assert!(plus_pairs, "non-hex accepted: {text:?}");
            assert_eq!(Some(p), strict_hex::<N>(&plus_form), "{text:?}");
        }
    }
}

fn strict_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let b = text.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in b.chunks(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

fn exercise_rejection(r: &Rejection) {
    let _ = (r.to_string(), r.label(), r.acceptance());
}
