//! The signed envelope: one canonical binary encoding, a domain-separated ed25519 signature and a
//! blake3 content id.
//!
//! Wire layout (all integers little-endian):
//!
//! ```text
//! offset  size  field
//! 0       1     format version (= 2)
//! 1       32    signer: ed25519 public key (NodeId)
//! 33      8     sent_at_ms: u64
//! 41      n     body: postcard encoding of `Message`, canonical (re-encoding gives the same bytes)
//! 41+n    64    ed25519 signature over  DOMAIN ‖ bytes[0 .. 41+n]
//! ```
//!
//! `DOMAIN` separates these signatures from any other use of the node key (libp2p signs with the
//! same key under its own prefixes). The content id is `blake3::derive_key(CONTENT_ID_CONTEXT,
//! bytes[0 .. 41+n])`: it names the signed content, independent of the signature bytes.

use ed25519_dalek::{Signature, Signer};

use crate::error::Rejection;
use crate::keys::{NodeId, NodeKey, hex};
use crate::limits::{MAX_CLOCK_SKEW_MS, MAX_ENVELOPE_BYTES, MAX_VCV_BYTES};
use crate::message::Message;

/// The only envelope format version this code speaks.
///
/// * 1: the first format.
/// * 2: `Vcv` gained `example_vectors` (a trailing field, so version-1 bodies do not decode);
///   `MAX_EXAMPLES` went from 16 to 32 and `MAX_VCV_BYTES` from 10 to 20 KiB.
pub const ENVELOPE_VERSION: u8 = 2;
/// The domain-separation prefix of every envelope signature.
pub const SIGNATURE_DOMAIN: &[u8] = b"fedmesh/v1 signed envelope\0";
/// The blake3 key-derivation context of content ids.
pub const CONTENT_ID_CONTEXT: &str = "fedmesh/v1 envelope content id";

/// The version byte of a *channel* envelope: the same layout without the signature, for the
/// task messages ([`Message::travels_unsigned`]) that go only from their sender to one peer over
/// a connection that authenticates the sender (libp2p noise or TLS under the node key, so the
/// connection's `PeerId` is the sender's `NodeId`). The receiver checks the claimed signer
/// against that peer ([`open_channel`]); [`open`] refuses these bytes, so they cannot travel by
/// gossip or be stored as a signed record.
pub const CHANNEL_VERSION: u8 = 0x80 | ENVELOPE_VERSION;

const HEADER_LEN: usize = 1 + 32 + 8;
const SIG_LEN: usize = 64;
/// The smallest possible envelope.
pub const MIN_ENVELOPE_BYTES: usize = HEADER_LEN + 1 + SIG_LEN;

/// The blake3 content id of an envelope's signed bytes.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ContentId(pub [u8; 32]);

impl std::fmt::Display for ContentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl std::fmt::Debug for ContentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ContentId({})", &hex(&self.0)[..12])
    }
}

/// A decoded, verified and validated envelope.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    /// The node that signed it (authenticated by the signature).
    pub signer: NodeId,
    /// When the signer sent it, ms since the Unix epoch.
    pub sent_at_ms: u64,
    /// The message.
    pub message: Message,
    /// The content id of the signed bytes.
    pub id: ContentId,
}

/// Encodes and signs `message`. Fails with [`Rejection::Oversize`] when the result would exceed
/// the limits, so a node never sends what its peers must refuse.
pub fn seal(key: &NodeKey, sent_at_ms: u64, message: &Message) -> Result<Vec<u8>, Rejection> {
    let mut bytes = Vec::with_capacity(512);
    bytes.push(ENVELOPE_VERSION);
    bytes.extend_from_slice(key.node_id().as_bytes());
    bytes.extend_from_slice(&sent_at_ms.to_le_bytes());
    let bytes = postcard::to_extend(message, bytes).map_err(|_| Rejection::Malformed("encode"))?;
    check_size(message, bytes.len() - HEADER_LEN, bytes.len() + SIG_LEN)?;
    let sig = key.signing_key().sign(&signed_message(&bytes));
    let mut bytes = bytes;
    bytes.extend_from_slice(&sig.to_bytes());
    Ok(bytes)
}

/// Encodes `message` as a channel envelope from `sender` (see [`CHANNEL_VERSION`]): no
/// signature, for a connection that authenticates the sender. Only task messages travel so;
/// anything else fails with [`Rejection::Malformed`].
pub fn seal_channel(
    sender: &NodeId,
    sent_at_ms: u64,
    message: &Message,
) -> Result<Vec<u8>, Rejection> {
    if !message.travels_unsigned() {
        return Err(Rejection::Malformed("only task messages travel unsigned"));
    }
    let mut bytes = Vec::with_capacity(256);
    bytes.push(CHANNEL_VERSION);
    bytes.extend_from_slice(sender.as_bytes());
    bytes.extend_from_slice(&sent_at_ms.to_le_bytes());
    let bytes = postcard::to_extend(message, bytes).map_err(|_| Rejection::Malformed("encode"))?;
    check_size(message, bytes.len() - HEADER_LEN, bytes.len())?;
    Ok(bytes)
}

/// Whether `bytes` claim to be a channel envelope (see [`CHANNEL_VERSION`]).
pub fn is_channel(bytes: &[u8]) -> bool {
    bytes.first() == Some(&CHANNEL_VERSION)
}

/// Decodes and validates a channel envelope received from `peer` over a connection that
/// authenticated `peer`, at time `now_ms`. The sender it names must be `peer`
/// ([`Rejection::HostMismatch`]) and its message a task message.
pub fn open_channel(bytes: &[u8], peer: &NodeId, now_ms: u64) -> Result<Envelope, Rejection> {
    check_len(bytes)?;
    let version = bytes[0];
    if version != CHANNEL_VERSION {
        return Err(Rejection::UnknownVersion(version));
    }
    let parts = decode_content(bytes, bytes.len())?;
    if parts.signer != *peer {
        return Err(Rejection::HostMismatch);
    }
    if !parts.message.travels_unsigned() {
        return Err(Rejection::Malformed("a registry message must be signed"));
    }
    parts.finish(now_ms)
}

/// Decodes, verifies (strictly) and validates one envelope at time `now_ms`.
pub fn open(bytes: &[u8], now_ms: u64) -> Result<Envelope, Rejection> {
    let (parts, signature) = decode(bytes)?;
    let key = parts
        .signer
        .verifying_key()
        .ok_or(Rejection::BadSignature)?;
    key.verify_strict(&signed_message(parts.signed), &signature)
        .map_err(|_| Rejection::BadSignature)?;
    parts.finish(now_ms)
}

/// [`open`] for many envelopes, verifying their signatures in one batch.
///
/// When the batch fails, each envelope is verified on its own so that one forgery does not take
/// down its neighbours. Results are in input order.
pub fn open_batch(items: &[&[u8]], now_ms: u64) -> Vec<Result<Envelope, Rejection>> {
    let decoded: Vec<Result<(Parts<'_>, Signature), Rejection>> =
        items.iter().map(|b| decode(b)).collect();
    let mut messages = Vec::with_capacity(items.len());
    let mut sigs = Vec::with_capacity(items.len());
    let mut keys = Vec::with_capacity(items.len());
    let mut all_keys_ok = true;
    for (p, signature) in decoded.iter().flatten() {
        // verify_batch skips verify_strict's weak-key check: with a small-order signer key,
        // anyone could "sign" anything. Such keys are never batched (each item then gets
        // verify_strict, which refuses them).
        match p.signer.verifying_key() {
            Some(k) if !k.is_weak() => keys.push(k),
            _ => all_keys_ok = false,
        }
        messages.push(signed_message(p.signed));
        sigs.push(*signature);
    }
    let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
    let batch_ok = all_keys_ok && ed25519_dalek::verify_batch(&refs, &sigs, &keys).is_ok();
    decoded
        .into_iter()
        .map(|p| {
            let (p, signature) = p?;
            if !batch_ok {
                let key = p.signer.verifying_key().ok_or(Rejection::BadSignature)?;
                key.verify_strict(&signed_message(p.signed), &signature)
                    .map_err(|_| Rejection::BadSignature)?;
            }
            p.finish(now_ms)
        })
        .collect()
}

/// The content id of an envelope's bytes, without verifying it.
pub fn content_id(bytes: &[u8]) -> Option<ContentId> {
    let signed = bytes.get(..bytes.len().checked_sub(SIG_LEN)?)?;
    Some(ContentId(blake3::derive_key(CONTENT_ID_CONTEXT, signed)))
}

/// A decoded envelope before its signature (if any) and clock checks.
struct Parts<'a> {
    signer: NodeId,
    sent_at_ms: u64,
    message: Message,
    /// The bytes the content id (and the signature, if any) cover.
    signed: &'a [u8],
}

impl Parts<'_> {
    fn finish(self, now_ms: u64) -> Result<Envelope, Rejection> {
        if self.sent_at_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(Rejection::IssuedInFuture {
                issued_at_ms: self.sent_at_ms,
                now_ms,
            });
        }
        match &self.message {
            Message::Advertise(vcv) => vcv.validate_time(now_ms)?,
            Message::Task(task) | Message::Offer { task, .. } if task.deadline_ms <= now_ms => {
                return Err(Rejection::Expired {
                    expires_at_ms: task.deadline_ms,
                    now_ms,
                });
            }
            _ => {}
        }
        Ok(Envelope {
            signer: self.signer,
            sent_at_ms: self.sent_at_ms,
            id: ContentId(blake3::derive_key(CONTENT_ID_CONTEXT, self.signed)),
            message: self.message,
        })
    }
}

fn check_len(bytes: &[u8]) -> Result<(), Rejection> {
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(Rejection::Oversize {
            len: bytes.len(),
            max: MAX_ENVELOPE_BYTES,
        });
    }
    if bytes.is_empty() {
        return Err(Rejection::Malformed("empty envelope"));
    }
    Ok(())
}

/// Everything that needs neither the signature nor the clock: framing, decoding, canonical form
/// and static validation.
fn decode(bytes: &[u8]) -> Result<(Parts<'_>, Signature), Rejection> {
    check_len(bytes)?;
    let version = bytes[0];
    if version != ENVELOPE_VERSION {
        return Err(Rejection::UnknownVersion(version));
    }
    if bytes.len() < MIN_ENVELOPE_BYTES {
        return Err(Rejection::Malformed(
            "envelope shorter than header and signature",
        ));
    }
    let (signed, sig) = bytes.split_at(bytes.len() - SIG_LEN);
    let parts = decode_content(signed, bytes.len())?;
    let mut sig_bytes = [0u8; SIG_LEN];
    sig_bytes.copy_from_slice(sig);
    Ok((parts, Signature::from_bytes(&sig_bytes)))
}

/// Decodes the header and body of `signed` (an envelope of `total_len` bytes without its
/// signature): canonical form, size and static validation.
fn decode_content(signed: &[u8], total_len: usize) -> Result<Parts<'_>, Rejection> {
    if signed.len() <= HEADER_LEN {
        return Err(Rejection::Malformed("envelope shorter than its header"));
    }
    let mut signer = [0u8; 32];
    signer.copy_from_slice(&signed[1..33]);
    let mut sent = [0u8; 8];
    sent.copy_from_slice(&signed[33..HEADER_LEN]);
    let body = &signed[HEADER_LEN..];
    let (message, rest) = postcard::take_from_bytes::<Message>(body)
        .map_err(|_| Rejection::Malformed("body does not decode as a Message"))?;
    if !rest.is_empty() {
        return Err(Rejection::Malformed("trailing bytes after the body"));
    }
    let canonical = postcard::to_allocvec(&message).map_err(|_| Rejection::NonCanonical)?;
    if canonical != body {
        return Err(Rejection::NonCanonical);
    }
    check_size(&message, body.len(), total_len)?;
    let signer = NodeId(signer);
    message.validate_static(&signer)?;
    Ok(Parts {
        signer,
        sent_at_ms: u64::from_le_bytes(sent),
        message,
        signed,
    })
}

fn check_size(message: &Message, body_len: usize, total_len: usize) -> Result<(), Rejection> {
    if total_len > MAX_ENVELOPE_BYTES {
        return Err(Rejection::Oversize {
            len: total_len,
            max: MAX_ENVELOPE_BYTES,
        });
    }
    if matches!(message, Message::Advertise(_)) && body_len > MAX_VCV_BYTES {
        return Err(Rejection::Oversize {
            len: body_len,
            max: MAX_VCV_BYTES,
        });
    }
    Ok(())
}

fn signed_message(signed: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNATURE_DOMAIN.len() + signed.len());
    m.extend_from_slice(SIGNATURE_DOMAIN);
    m.extend_from_slice(signed);
    m
}
