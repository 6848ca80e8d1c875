//! The node's audit log: append-only, hash-chained, with checkpoints signed by the node key.
//!
//! Entries live in the sled tree `audit`, keyed by their sequence number (u64 big-endian, so sled
//! iterates in order; the first entry is 1). Each value is a canonical, hand-laid-out record
//!
//! ```text
//! version(1) ‖ seq u64 ‖ at_ms u64 ‖ kind ‖ subject ‖ detail ‖ prev[32] ‖ hash[32]
//! ```
//!
//! (integers big-endian, strings as u32 length ‖ UTF-8, `detail` as JSON with sorted keys) where
//! `hash = blake3("fedmesh/v1 audit entry\0" ‖ everything before it)` and `prev` is the previous
//! entry's hash (all zero for entry 1). Checkpoints live in `audit_checkpoints`, keyed the same
//! way: `version ‖ seq ‖ head[32] ‖ at_ms ‖ sig[64]`, where `sig` is the node's ed25519 signature
//! of `"fedmesh/v1 audit checkpoint\0" ‖ seq ‖ head ‖ at_ms`.
//!
//! [`AuditLog::verify`] detects, and names, an entry that was changed (its fields no longer match
//! its hash, or it was rewritten with a recomputed hash and its successor's `prev` no longer
//! matches), removed (a gap in the sequence), or moved to another key (stored seq ≠ key); a forged
//! or misplaced checkpoint; a tail truncated below a signed checkpoint; and a chain rewritten
//! wholesale up to a checkpoint (the entry hash differs from the signed head).
//!
//! What it does **not** detect: removal or rewriting of entries *after* the last checkpoint
//! (including appending forged ones there), since nothing signed pins them yet; the same after
//! deleting the checkpoints themselves, since the Db alone cannot tell "never checkpointed" from
//! "checkpoint deleted" (publish checkpoints elsewhere for that); and anything done by an attacker
//! who holds the node key, who can re-sign a rewritten log.
//!
//! The CLI ([`run_verify`], [`run_tail`]) opens the Db directly when the node is stopped. sled
//! 0.34 takes an exclusive `flock` on `<db>/db` with a non-blocking try-lock, so while the node
//! runs a second open fails at once with `Error::Io(kind Other, "could not acquire lock on ...")`.
//! Then the CLI asks the running node instead, over its localhost HTTP server (`GET /audit`,
//! `GET /audit/verify`, served from the [`AuditView`] of the node's open log; see `http.rs`).

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use fedmesh_protocol::keys::hex;
use fedmesh_protocol::{NodeId, NodeKey};

use crate::http::clip;

const ENTRIES: &str = "audit";
const CHECKPOINTS: &str = "audit_checkpoints";
const ENTRY_DOMAIN: &[u8] = b"fedmesh/v1 audit entry\0";
const CHECKPOINT_DOMAIN: &[u8] = b"fedmesh/v1 audit checkpoint\0";
const VERSION: u8 = 1;
/// At most this many problems are listed; the rest are counted in [`VerifyReport::omitted`].
pub const MAX_PROBLEMS: usize = 100;
const GENESIS: [u8; 32] = [0; 32];
/// The most entries one read returns: one `GET /audit` page, one step of `tail`.
pub const MAX_PAGE: usize = 1000;

/// Why an audit operation failed (as opposed to a problem found by [`AuditLog::verify`]).
#[derive(Debug)]
pub enum AuditError {
    /// sled failed.
    Db(sled::Error),
    /// A record could not be decoded where the operation needs it.
    Corrupt { seq: u64, reason: String },
    /// Another writer appended entry `seq` first: two `AuditLog`s on one Db.
    Conflict { seq: u64 },
    /// The node id is not a valid ed25519 public key.
    BadNodeId,
}

impl fmt::Display for AuditError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Db(e) => write!(f, "audit log storage error: {e}"),
            Self::Corrupt { seq, reason } => write!(
                f,
                "audit entry {seq} is corrupt ({reason}); run `fedmesh audit verify`"
            ),
            Self::Conflict { seq } => {
                write!(
                    f,
                    "audit entry {seq} already exists: two writers on one audit log"
                )
            }
            Self::BadNodeId => f.write_str("node id is not a valid ed25519 public key"),
        }
    }
}

impl std::error::Error for AuditError {}

impl From<sled::Error> for AuditError {
    fn from(e: sled::Error) -> Self {
        Self::Db(e)
    }
}

/// One audit entry.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub seq: u64,
    pub at_ms: u64,
    pub kind: String,
    pub subject: String,
    pub detail: serde_json::Value,
    pub prev: [u8; 32],
    pub hash: [u8; 32],
}

impl AuditEntry {
    /// The entry as one line of JSON (hashes in hex), as `fedmesh audit tail` prints it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "seq": self.seq, "at_ms": self.at_ms, "kind": self.kind, "subject": self.subject,
            "detail": self.detail, "prev": hex(&self.prev), "hash": hex(&self.hash),
        })
    }
}

/// One thing [`AuditLog::verify`] found wrong. `Display` names the entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditProblem {
    /// The entry's fields do not match its stored hash (or it cannot be decoded), or it was
    /// rewritten with a recomputed hash so that the next entry's `prev` no longer matches it.
    Changed { seq: u64 },
    /// `count` entries starting at `missing` are gone (`after_seq` is 0 for the start of the log).
    Removed {
        after_seq: u64,
        missing: u64,
        count: u64,
    },
    /// The key of entry `seq` holds the record of entry `holds`.
    Reordered { seq: u64, holds: u64 },
    /// The checkpoint stored under `seq` is forged, undecodable or misplaced.
    BadCheckpoint { seq: u64, reason: String },
    /// Entry `seq` is self-consistent but differs from the node's valid signed checkpoint at `seq`:
    /// it, or the chain before it, was rewritten.
    ChainBroken { seq: u64 },
    /// The log ends at `last_seq`, but a valid signed checkpoint covers `checkpoint_seq`.
    Truncated { last_seq: u64, checkpoint_seq: u64 },
    /// A record whose key is not an 8-byte sequence number (hex) was put in the audit tree.
    ForeignKey { key: String },
}

impl fmt::Display for AuditProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Changed { seq } => write!(f, "entry {seq} was changed (hash mismatch)"),
            Self::Removed {
                after_seq,
                missing,
                count,
            } => {
                if *count == 1 {
                    write!(f, "entry {missing} was removed")?;
                } else {
                    write!(
                        f,
                        "entries {missing}..={} were removed",
                        missing + count - 1
                    )?;
                }
                match after_seq {
                    0 => f.write_str(" (gap at the start of the log)"),
                    a => write!(f, " (gap after entry {a})"),
                }
            }
            Self::Reordered { seq, holds } => {
                write!(
                    f,
                    "entry {seq} was reordered (its slot holds entry {holds})"
                )
            }
            Self::BadCheckpoint { seq, reason } => {
                write!(f, "checkpoint at entry {seq} is bad: {reason}")
            }
            Self::ChainBroken { seq } => write!(
                f,
                "entry {seq} does not match the node's signed checkpoint: it or an earlier entry was rewritten"
            ),
            Self::Truncated {
                last_seq,
                checkpoint_seq,
            } => write!(
                f,
                "the log was truncated: it ends at entry {last_seq} but a signed checkpoint covers entry {checkpoint_seq}"
            ),
            Self::ForeignKey { key } => {
                write!(f, "a record with non-sequence key {key} was inserted")
            }
        }
    }
}

/// The result of [`AuditLog::verify`]. `problems` empty means the log verified.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub entries: u64,
    pub checkpoints: u64,
    /// The first [`MAX_PROBLEMS`] problems, in log order.
    pub problems: Vec<AuditProblem>,
    /// Problems found beyond [`MAX_PROBLEMS`].
    pub omitted: u64,
    /// The highest entry pinned by a valid checkpoint that matched; later entries are only chained.
    pub pinned_through: u64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The report as `GET /audit/verify` sends it; `report` is the text `audit verify` prints.
    pub fn to_json(&self) -> serde_json::Value {
        let problems: Vec<String> = self.problems.iter().map(ToString::to_string).collect();
        serde_json::json!({
            "ok": self.ok(), "entries": self.entries, "checkpoints": self.checkpoints,
            "pinned_through": self.pinned_through, "problems": problems, "omitted": self.omitted,
            "report": self.to_string().trim_end(),
        })
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (e, c, p) = (self.entries, self.checkpoints, self.pinned_through);
        if self.ok() {
            write!(f, "audit log OK: {e} entries, {c} checkpoints; ")?;
            return match p {
                0 => f.write_str("no entry pinned by a signed checkpoint yet"),
                p => write!(f, "entries 1..={p} pinned by a signed checkpoint"),
            };
        }
        let n = self.problems.len() as u64 + self.omitted;
        writeln!(
            f,
            "audit log FAILED: {n} problem(s) in {e} entries, {c} checkpoints"
        )?;
        writeln!(f, "first: {}", self.problems[0])?;
        for problem in &self.problems {
            writeln!(f, "  - {problem}")?;
        }
        if self.omitted > 0 {
            writeln!(f, "  ... and {} more", self.omitted)?;
        }
        Ok(())
    }
}

/// A read-only view of the log an [`AuditLog`] appends to, for the node's HTTP endpoints: it
/// reads the same Db while the node runs (a second process cannot open it).
#[derive(Debug)]
pub struct AuditView {
    db: sled::Db,
    node: NodeId,
    /// The last entry appended by the log's writer.
    last: AtomicU64,
}

impl AuditView {
    /// [`AuditLog::after`] on the live log.
    pub fn after(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, AuditError> {
        AuditLog::after(&self.db, after, limit)
    }

    /// [`AuditLog::tail`] on the live log.
    pub fn tail(&self, n: usize) -> Result<Vec<AuditEntry>, AuditError> {
        AuditLog::tail(&self.db, n)
    }

    /// [`AuditLog::verify`] with the node's own key, of the entries appended before the call:
    /// entries and checkpoints the node adds meanwhile are left out, so that a checkpoint of a
    /// newer entry is not taken for a truncated log.
    pub fn verify(&self) -> Result<VerifyReport, AuditError> {
        let through = self.last.load(Ordering::Acquire);
        AuditLog::verify_through(&self.db, &self.node, through)
    }
}

/// The append handle of the audit log. One per Db (appends refuse to overwrite).
pub struct AuditLog {
    entries: sled::Tree,
    checkpoints: sled::Tree,
    key: SigningKey,
    seq: u64,
    head: [u8; 32],
    checkpointed: u64,
    view: Arc<AuditView>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("seq", &self.seq)
            .field("head", &hex(&self.head))
            .field("checkpointed", &self.checkpointed)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the log's trees in `db` and recovers seq and head hash from the last entry.
    pub fn open(db: &sled::Db, key: NodeKey) -> Result<Self, AuditError> {
        let entries = db.open_tree(ENTRIES)?;
        let checkpoints = db.open_tree(CHECKPOINTS)?;
        let (seq, head) = match entries.last()? {
            None => (0, GENESIS),
            Some((k, v)) => {
                let seq = key_seq(&k).ok_or(AuditError::Corrupt {
                    seq: 0,
                    reason: "bad key".into(),
                })?;
                let rec = decode_entry(&v).map_err(|reason| AuditError::Corrupt { seq, reason })?;
                if !rec.hash_ok || rec.seq != seq {
                    let reason = "last entry fails its hash or seq check".into();
                    return Err(AuditError::Corrupt { seq, reason });
                }
                (seq, rec.hash)
            }
        };
        let checkpointed = checkpoints
            .last()?
            .and_then(|(k, _)| key_seq(&k))
            .unwrap_or(0);
        let view = Arc::new(AuditView {
            db: db.clone(),
            node: key.node_id(),
            last: AtomicU64::new(seq),
        });
        let key = SigningKey::from_bytes(&key.secret_bytes());
        Ok(Self {
            entries,
            checkpoints,
            key,
            seq,
            head,
            checkpointed,
            view,
        })
    }

    /// Appends an entry and returns its seq. Does not flush: the caller flushes the Db.
    pub fn append(
        &mut self,
        kind: &str,
        subject: &str,
        detail: serde_json::Value,
        now_ms: u64,
    ) -> Result<u64, AuditError> {
        let seq = self.seq + 1;
        let detail = canonical(detail).to_string();
        let (value, hash) = encode_entry(seq, now_ms, kind, subject, &detail, &self.head);
        // Append-only: never overwrite an existing key.
        self.entries
            .compare_and_swap(seq.to_be_bytes(), None as Option<&[u8]>, Some(value))?
            .map_err(|_| AuditError::Conflict { seq })?;
        self.seq = seq;
        self.head = hash;
        self.view.last.store(seq, Ordering::Release);
        Ok(seq)
    }

    /// Signs (seq, head hash, now) with the node key and stores it. A no-op when the log is empty
    /// or the head is already checkpointed. Does not flush.
    pub fn checkpoint(&mut self, now_ms: u64) -> Result<(), AuditError> {
        if self.seq == 0 || self.seq == self.checkpointed {
            return Ok(());
        }
        let sig = self
            .key
            .sign(&checkpoint_message(self.seq, &self.head, now_ms));
        let mut value = Vec::with_capacity(1 + 8 + 32 + 8 + 64);
        value.push(VERSION);
        value.extend_from_slice(&self.seq.to_be_bytes());
        value.extend_from_slice(&self.head);
        value.extend_from_slice(&now_ms.to_be_bytes());
        value.extend_from_slice(&sig.to_bytes());
        self.checkpoints.insert(self.seq.to_be_bytes(), value)?;
        self.checkpointed = self.seq;
        Ok(())
    }

    /// The read-only view of this log (the HTTP server's `/audit` endpoints read through it).
    pub fn view(&self) -> Arc<AuditView> {
        self.view.clone()
    }

    /// Number of entries (the seq of the last one).
    pub fn len(&self) -> u64 {
        self.seq
    }

    #[allow(dead_code)]
    pub fn is_empty(&self) -> bool {
        self.seq == 0
    }

    /// Checks the whole log against `node`'s public key, streaming both trees in seq order.
    /// Read-only (does not even create the trees). See the module docs for what it cannot detect.
    pub fn verify(db: &sled::Db, node: &NodeId) -> Result<VerifyReport, AuditError> {
        Self::verify_through(db, node, u64::MAX)
    }

    /// [`AuditLog::verify`] of the entries and checkpoints up to seq `through`; later ones (a
    /// running node's appends during the check) are skipped.
    fn verify_through(
        db: &sled::Db,
        node: &NodeId,
        through: u64,
    ) -> Result<VerifyReport, AuditError> {
        let vk = VerifyingKey::from_bytes(node.as_bytes()).map_err(|_| AuditError::BadNodeId)?;
        let later = |k: &[u8]| key_seq(k).is_some_and(|seq| seq > through);
        let entries = existing_tree(db, ENTRIES)?.map(|t| t.iter());
        let checkpoints = existing_tree(db, CHECKPOINTS)?.map(|t| t.iter());
        let mut v = Verifier {
            vk,
            report: VerifyReport::default(),
        };
        let mut cps = checkpoints
            .into_iter()
            .flatten()
            .filter(|item| !matches!(item, Ok((k, _)) if later(k)))
            .peekable();
        let mut expected = 1u64; // the seq the next entry should have
        let mut last: Option<Link> = None; // the previous entry, if in place and intact
        for item in entries.into_iter().flatten() {
            let (k, value) = item?;
            if later(&k) {
                continue;
            }
            let Some(seq) = key_seq(&k).filter(|&seq| seq > 0) else {
                v.push(AuditProblem::ForeignKey { key: hex(&k) });
                continue;
            };
            v.report.entries += 1;
            // Checkpoints of removed entries: only their signatures can still be checked.
            while let Some((ck, cv)) = next_below(&mut cps, seq)? {
                v.checkpoint(&ck, &cv, &mut None);
            }
            if seq > expected {
                let count = seq - expected;
                v.push(AuditProblem::Removed {
                    after_seq: expected - 1,
                    missing: expected,
                    count,
                });
                last = None;
            }
            expected = seq.saturating_add(1);
            let mut current = match decode_entry(&value) {
                Ok(rec) if rec.hash_ok && rec.seq == seq => Some(Link {
                    seq,
                    hash: rec.hash,
                    pinned: false,
                    prev: rec.prev,
                }),
                Ok(rec) if rec.hash_ok => {
                    v.push(AuditProblem::Reordered {
                        seq,
                        holds: rec.seq,
                    });
                    None
                }
                _ => {
                    v.push(AuditProblem::Changed { seq });
                    None
                }
            };
            if let Some(cur) = &current {
                let want = match &last {
                    _ if seq == 1 => Some((GENESIS, false)),
                    Some(l) if l.seq + 1 == seq => Some((l.hash, l.pinned)),
                    _ => None,
                };
                if let Some((want, pinned)) = want
                    && cur.prev != want
                {
                    // The predecessor was rewritten with a recomputed hash, or this entry was
                    // (prev included). Blame the predecessor unless a valid checkpoint pins it.
                    let blamed = if seq == 1 || pinned { seq } else { seq - 1 };
                    v.push(AuditProblem::Changed { seq: blamed });
                }
            }
            while let Some((ck, cv)) = next_below(&mut cps, seq.saturating_add(1))? {
                v.checkpoint(&ck, &cv, &mut current);
            }
            last = current;
        }
        // Valid checkpoints beyond the last entry: the tail was cut off below them.
        let mut highest = None;
        for item in cps {
            let (ck, cv) = item?;
            if v.checkpoint(&ck, &cv, &mut None) {
                highest = key_seq(&ck);
            }
        }
        if let Some(checkpoint_seq) = highest {
            v.push(AuditProblem::Truncated {
                last_seq: expected - 1,
                checkpoint_seq,
            });
        }
        Ok(v.report)
    }

    /// The last `n` entries, oldest first. Read-only.
    pub fn tail(db: &sled::Db, n: usize) -> Result<Vec<AuditEntry>, AuditError> {
        let Some(tree) = existing_tree(db, ENTRIES)? else {
            return Ok(Vec::new());
        };
        let mut out: Vec<AuditEntry> = tree
            .iter()
            .rev()
            .take(n)
            .map(|item| to_entry(item?))
            .collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// At most `limit` entries with seq > `after`, oldest first (for `tail --follow`, or an HTTP
    /// endpoint of the running node). Read-only.
    pub fn after(db: &sled::Db, after: u64, limit: usize) -> Result<Vec<AuditEntry>, AuditError> {
        let Some(tree) = existing_tree(db, ENTRIES)? else {
            return Ok(Vec::new());
        };
        let start = after.saturating_add(1).to_be_bytes();
        tree.range(start..)
            .take(limit)
            .map(|item| to_entry(item?))
            .collect()
    }
}

/// An entry that is in place and intact, as the next one's chain check needs it.
#[derive(Debug, Clone, Copy)]
struct Link {
    seq: u64,
    hash: [u8; 32],
    prev: [u8; 32],
    /// A valid checkpoint signed exactly this hash.
    pinned: bool,
}

struct Verifier {
    vk: VerifyingKey,
    report: VerifyReport,
}

impl Verifier {
    fn push(&mut self, problem: AuditProblem) {
        if self.report.problems.last() == Some(&problem) {
            return; // one rewrite can trip two checks naming the same entry
        }
        if self.report.problems.len() < MAX_PROBLEMS {
            self.report.problems.push(problem);
        } else {
            self.report.omitted += 1;
        }
    }

    /// Checks one checkpoint record, and against `entry` if that is the entry it covers
    /// (un-linking the entry if it does not match). Returns whether the checkpoint is valid.
    fn checkpoint(&mut self, k: &[u8], v: &[u8], entry: &mut Option<Link>) -> bool {
        self.report.checkpoints += 1;
        let Some(seq) = key_seq(k) else {
            let reason = format!("malformed key {}", hex(k));
            self.push(AuditProblem::BadCheckpoint { seq: 0, reason });
            return false;
        };
        let bad = |reason: String| AuditProblem::BadCheckpoint { seq, reason };
        let cp = match decode_checkpoint(v) {
            Ok(cp) => cp,
            Err(reason) => {
                self.push(bad(reason));
                return false;
            }
        };
        if cp.seq != seq {
            self.push(bad(format!(
                "stored under entry {seq} but signs entry {}",
                cp.seq
            )));
            return false;
        }
        let msg = checkpoint_message(cp.seq, &cp.head, cp.at_ms);
        if self
            .vk
            .verify_strict(&msg, &Signature::from_bytes(&cp.sig))
            .is_err()
        {
            self.push(bad("signature does not verify with the node key".into()));
            return false;
        }
        if let Some(link) = entry.as_mut().filter(|l| l.seq == seq) {
            if link.hash == cp.head {
                link.pinned = true;
                self.report.pinned_through = seq;
            } else {
                self.push(AuditProblem::ChainBroken { seq });
                *entry = None;
            }
        }
        true
    }
}

/// Takes the next checkpoint whose key is below `bound` (or malformed).
fn next_below(
    cps: &mut std::iter::Peekable<impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>>,
    bound: u64,
) -> Result<Option<(sled::IVec, sled::IVec)>, AuditError> {
    match cps.peek() {
        Some(Ok((k, _))) if key_seq(k).is_some_and(|s| s >= bound) => Ok(None),
        Some(_) => Ok(cps.next().transpose()?),
        None => Ok(None),
    }
}

fn existing_tree(db: &sled::Db, name: &str) -> Result<Option<sled::Tree>, AuditError> {
    if db
        .tree_names()
        .iter()
        .any(|n| n.as_ref() == name.as_bytes())
    {
        Ok(Some(db.open_tree(name)?))
    } else {
        Ok(None)
    }
}

fn key_seq(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.try_into().ok()?))
}

fn entry_hash(body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(ENTRY_DOMAIN);
    h.update(body);
    *h.finalize().as_bytes()
}

/// The stored record of an entry, and its hash.
fn encode_entry(
    seq: u64,
    at_ms: u64,
    kind: &str,
    subject: &str,
    detail: &str,
    prev: &[u8; 32],
) -> (Vec<u8>, [u8; 32]) {
    let mut value =
        Vec::with_capacity(1 + 16 + 12 + kind.len() + subject.len() + detail.len() + 64);
    value.push(VERSION);
    value.extend_from_slice(&seq.to_be_bytes());
    value.extend_from_slice(&at_ms.to_be_bytes());
    for s in [kind, subject, detail] {
        value.extend_from_slice(&(s.len() as u32).to_be_bytes());
        value.extend_from_slice(s.as_bytes());
    }
    value.extend_from_slice(prev);
    let hash = entry_hash(&value);
    value.extend_from_slice(&hash);
    (value, hash)
}

fn checkpoint_message(seq: u64, head: &[u8; 32], at_ms: u64) -> Vec<u8> {
    [
        CHECKPOINT_DOMAIN,
        &seq.to_be_bytes(),
        head,
        &at_ms.to_be_bytes(),
    ]
    .concat()
}

/// `detail` with every object's keys sorted, so equal values encode to equal bytes whatever
/// serde_json's `preserve_order` feature says.
fn canonical(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut pairs: Vec<_> = map.into_iter().collect();
            pairs.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(pairs.into_iter().map(|(k, v)| (k, canonical(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("record too short".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().unwrap_or([0; N]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn string(&mut self) -> Result<String, String> {
        let len = u32::from_be_bytes(self.array()?) as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| "string is not UTF-8".into())
    }
    fn version(&mut self) -> Result<(), String> {
        match self.array::<1>()? {
            [VERSION] => Ok(()),
            [v] => Err(format!("unknown record version {v}")),
        }
    }
    fn end(&self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err("trailing bytes".into())
        }
    }
}

struct Record {
    seq: u64,
    at_ms: u64,
    kind: String,
    subject: String,
    detail: String,
    prev: [u8; 32],
    hash: [u8; 32],
    /// The stored hash matches the stored fields.
    hash_ok: bool,
}

fn decode_entry(value: &[u8]) -> Result<Record, String> {
    let body_len = value.len().checked_sub(32).ok_or("record too short")?;
    let (body, hash) = value.split_at(body_len);
    let mut r = Reader(body);
    r.version()?;
    let (seq, at_ms) = (r.u64()?, r.u64()?);
    let (kind, subject, detail) = (r.string()?, r.string()?, r.string()?);
    let prev = r.array()?;
    r.end()?;
    let hash: [u8; 32] = hash.try_into().map_err(|_| "record too short")?;
    let hash_ok = entry_hash(body) == hash;
    Ok(Record {
        seq,
        at_ms,
        kind,
        subject,
        detail,
        prev,
        hash,
        hash_ok,
    })
}

struct Checkpoint {
    seq: u64,
    head: [u8; 32],
    at_ms: u64,
    sig: [u8; 64],
}

fn decode_checkpoint(value: &[u8]) -> Result<Checkpoint, String> {
    let mut r = Reader(value);
    r.version()?;
    let cp = Checkpoint {
        seq: r.u64()?,
        head: r.array()?,
        at_ms: r.u64()?,
        sig: r.array()?,
    };
    r.end()?;
    Ok(cp)
}

fn to_entry((k, v): (sled::IVec, sled::IVec)) -> Result<AuditEntry, AuditError> {
    let seq = key_seq(&k).unwrap_or(0);
    let corrupt = |reason: String| AuditError::Corrupt { seq, reason };
    let rec = decode_entry(&v).map_err(corrupt)?;
    let detail = serde_json::from_str(&rec.detail).map_err(|e| corrupt(format!("detail: {e}")))?;
    let Record {
        seq,
        at_ms,
        kind,
        subject,
        prev,
        hash,
        ..
    } = rec;
    Ok(AuditEntry {
        seq,
        at_ms,
        kind,
        subject,
        detail,
        prev,
        hash,
    })
}

/// The Db is held by another process (normally the running node).
#[derive(Debug)]
struct DbLocked(String);

impl fmt::Display for DbLocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the database {} is locked by another process, most likely the running fedmesh node \
             (sled lets only one process open a database)",
            self.0
        )
    }
}

impl std::error::Error for DbLocked {}

/// sled 0.34 reports a held lock as `Error::Io` of kind `Other` with this message.
fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// Opens the node's existing Db at `data_dir/db`, never creating one.
fn open_db(data_dir: &Path) -> anyhow::Result<sled::Db> {
    let path = data_dir.join("db");
    if !path.join("conf").exists() {
        anyhow::bail!(
            "no fedmesh database at {} (wrong --data-dir?)",
            path.display()
        );
    }
    sled::Config::new().path(&path).open().map_err(|e| {
        if is_lock_error(&e) {
            anyhow::Error::new(DbLocked(path.display().to_string()))
        } else {
            anyhow::Error::new(e).context(format!("opening {}", path.display()))
        }
    })
}

/// `--follow` polls this often while entries keep coming ...
const MIN_POLL: Duration = Duration::from_millis(200);
/// ... and backs off to this while none do.
const MAX_POLL: Duration = Duration::from_secs(1);
/// How long `--follow` retries a node that stopped answering before it gives up.
const GONE_GRACE: Duration = Duration::from_secs(5);
/// Timeout of one `GET /audit`.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of `GET /audit/verify` (the node reads its whole log).
const VERIFY_TIMEOUT: Duration = Duration::from_secs(600);
/// The largest HTTP answer the CLI reads.
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// Where `fedmesh audit` reads the log: the Db directly while the node is stopped, else the
/// running node over its HTTP server.
#[derive(Debug, Clone)]
pub struct Place {
    /// The node's data directory (the Db is `data_dir/db`).
    pub data_dir: PathBuf,
    /// The running node's HTTP address: `--http`, else the config's `http.listen`.
    pub http: Option<SocketAddr>,
    /// `--http` was given: ask the node, never open the Db.
    pub http_only: bool,
}

/// An open source of entries.
enum Source {
    /// The Db, held for a read and released between the polls of `--follow`.
    Db(Option<sled::Db>),
    /// The running node at this address.
    Http(SocketAddr),
}

/// Why one read failed.
enum ReadError {
    /// The Db is locked by the running node.
    Locked(anyhow::Error),
    /// The node did not answer (stopped or restarting).
    Gone(anyhow::Error),
    /// Anything else.
    Failed(anyhow::Error),
}

impl ReadError {
    fn into_inner(self) -> anyhow::Error {
        match self {
            Self::Locked(e) | Self::Gone(e) | Self::Failed(e) => e,
        }
    }
}

impl Place {
    /// The node's HTTP server when `--http` was given or the Db is locked, else the Db.
    fn open(&self) -> anyhow::Result<Source> {
        match self.http {
            Some(addr) if self.http_only => return Ok(Source::Http(addr)),
            _ => {}
        }
        match open_db(&self.data_dir) {
            Ok(db) => Ok(Source::Db(Some(db))),
            Err(e) if e.is::<DbLocked>() => match self.http {
                Some(addr) => Ok(Source::Http(addr)),
                None => Err(anyhow::anyhow!(
                    "{e}, and its HTTP server is off (http.listen is empty), so it cannot be asked \
                     instead: enable http.listen, pass --http ADDR, or stop the node"
                )),
            },
            Err(e) => Err(e),
        }
    }
}

impl Source {
    fn db(&mut self, place: &Place) -> Result<Option<&sled::Db>, ReadError> {
        let Self::Db(slot) = self else {
            return Ok(None);
        };
        Ok(Some(match slot {
            Some(db) => db,
            None => slot.insert(open_db(&place.data_dir).map_err(|e| {
                if e.is::<DbLocked>() {
                    ReadError::Locked(e)
                } else {
                    ReadError::Failed(e)
                }
            })?),
        }))
    }

    /// Lets the node open the Db between polls.
    fn release(&mut self) {
        if let Self::Db(slot) = self {
            *slot = None;
        }
    }

    /// At most `limit` entries after `after` as (seq, JSON line), oldest first.
    async fn after(
        &mut self,
        place: &Place,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, ReadError> {
        match self.db(place)? {
            Some(db) => Ok(lines(AuditLog::after(db, after, limit))?),
            None => {
                self.ask(&format!("/audit?after={after}&limit={limit}"))
                    .await
            }
        }
    }

    /// The seq of the last entry (0 for an empty log).
    async fn last_seq(&mut self, place: &Place) -> Result<u64, ReadError> {
        let last = match self.db(place)? {
            Some(db) => lines(AuditLog::tail(db, 1))?,
            None => self.ask("/audit?tail=1").await?,
        };
        Ok(last.last().map_or(0, |(seq, _)| *seq))
    }

    /// `GET path` from the node: its JSON lines.
    async fn ask(&self, path: &str) -> Result<Vec<(u64, String)>, ReadError> {
        let Self::Http(addr) = self else {
            return Err(ReadError::Failed(anyhow::anyhow!("not a node address")));
        };
        let body = ask_node(*addr, path, READ_TIMEOUT).await?;
        let text = String::from_utf8(body).map_err(|_| {
            ReadError::Failed(anyhow::anyhow!(
                "the node at {addr} sent non-UTF-8 JSON lines"
            ))
        })?;
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|line| {
                let seq = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v["seq"].as_u64());
                let seq = seq.ok_or_else(|| {
                    ReadError::Failed(anyhow::anyhow!(
                        "the node at {addr} sent a line that is not an audit entry: {}",
                        clip(line, 200)
                    ))
                })?;
                Ok((seq, line.to_string()))
            })
            .collect()
    }
}

/// Entries as (seq, JSON line), the form both sources print.
fn lines(read: Result<Vec<AuditEntry>, AuditError>) -> Result<Vec<(u64, String)>, ReadError> {
    let entries = read.map_err(|e| ReadError::Failed(e.into()))?;
    Ok(entries
        .iter()
        .map(|e| (e.seq, e.to_json().to_string()))
        .collect())
}

/// `GET path` from the node at `addr`: the body of a 200 answer.
async fn ask_node(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Vec<u8>, ReadError> {
    let (status, body) = crate::http::fetch(addr, path, timeout, MAX_ANSWER_BYTES)
        .await
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                ReadError::Failed(anyhow::anyhow!("bad answer from {addr}: {e}"))
            } else {
                ReadError::Gone(anyhow::anyhow!("no fedmesh node answers at {addr} ({e})"))
            }
        })?;
    if status == 200 {
        return Ok(body);
    }
    let text = String::from_utf8_lossy(&body);
    let reason = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| clip(text.trim(), 200).to_string());
    Err(ReadError::Failed(anyhow::anyhow!(
        "the node at {addr} answered {status} to GET {path}: {reason}"
    )))
}

/// `fedmesh audit verify`: prints the report; returns whether the log verified. With the node
/// stopped it reads the Db and checks checkpoints against `node()` (the key file's id); with the
/// node running, the node checks its own log and sends the report.
pub async fn run_verify(
    place: &Place,
    node: impl FnOnce() -> anyhow::Result<NodeId>,
) -> anyhow::Result<bool> {
    let mut source = place.open()?;
    if let Some(db) = source.db(place).map_err(ReadError::into_inner)? {
        let report = AuditLog::verify(db, &node()?)?;
        println!("{}", report.to_string().trim_end());
        return Ok(report.ok());
    }
    let Source::Http(addr) = source else {
        anyhow::bail!("no audit log to verify");
    };
    let body = ask_node(addr, "/audit/verify", VERIFY_TIMEOUT)
        .await
        .map_err(ReadError::into_inner)?;
    let answer: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| anyhow::anyhow!("the node at {addr} sent a bad verify report: {e}"))?;
    let (Some(ok), Some(report)) = (answer["ok"].as_bool(), answer["report"].as_str()) else {
        anyhow::bail!("the node at {addr} sent a verify report without `ok` and `report`");
    };
    eprintln!("(checked by the running node at {addr})");
    println!("{}", report.trim_end());
    Ok(ok)
}

/// `fedmesh audit tail`: prints the last `n` entries as JSON lines, then with `follow` new ones
/// as they come, until Ctrl-C (or SIGTERM), which ends it with success.
///
/// It reads the Db while the node is stopped, and the node's `GET /audit` while it runs (or with
/// `--http`). Following the Db, it reopens it for each poll, holding it only for the read; when
/// the node starts (the Db is locked) it follows the node over HTTP. Caveat: sled's lock is
/// try-only, so a node started during one of those short reads fails to open its Db. Following
/// the node, when it stops answering it retries for [`GONE_GRACE`], then says so and fails.
/// Polls come every [`MIN_POLL`] while entries come, backing off to [`MAX_POLL`].
pub async fn run_tail(place: &Place, n: usize, follow: bool) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut source = place.open()?;
    let head = source
        .last_seq(place)
        .await
        .map_err(ReadError::into_inner)?;
    let mut last = head.saturating_sub(n as u64);
    let mut delay = Duration::ZERO;
    let mut gone_since: Option<Instant> = None;
    let mut waiting = false;
    loop {
        let step = async {
            tokio::time::sleep(delay).await;
            source.after(place, last, MAX_PAGE).await
        };
        let read = tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            read = step => read,
        };
        match read {
            Ok(page) => {
                if gone_since.take().is_some() {
                    eprintln!("the node answers again");
                }
                waiting = false;
                if let Some((seq, _)) = page.last() {
                    last = *seq;
                }
                if !print_lines(&page)? {
                    return Ok(());
                }
                if page.len() >= MAX_PAGE {
                    delay = Duration::ZERO;
                    continue;
                }
                if !follow {
                    return Ok(());
                }
                source.release();
                delay = if page.is_empty() {
                    (delay * 2).clamp(MIN_POLL, MAX_POLL)
                } else {
                    MIN_POLL
                };
            }
            Err(ReadError::Locked(e)) => {
                source.release();
                if let Some(addr) = place.http {
                    let mut node = Source::Http(addr);
                    if node.after(place, last, 1).await.is_ok() {
                        eprintln!("the node started; following it at http://{addr}");
                        source = node;
                        delay = Duration::ZERO;
                        continue;
                    }
                }
                if !waiting {
                    eprintln!(
                        "{e}; waiting for it to be released or for the node's HTTP server \
                         (Ctrl-C to stop)"
                    );
                    waiting = true;
                }
                delay = MAX_POLL;
            }
            Err(ReadError::Gone(e)) if follow => {
                let since = *gone_since.get_or_insert_with(|| {
                    eprintln!("{e}: the node went away; retrying for {GONE_GRACE:?}");
                    Instant::now()
                });
                if since.elapsed() >= GONE_GRACE {
                    anyhow::bail!(
                        "the node went away: {e}. Followed the audit log up to entry {last}; \
                         run the command again when the node is back (with the node stopped, \
                         it reads the database directly)"
                    );
                }
                delay = (delay * 2).clamp(MIN_POLL, MAX_POLL);
            }
            Err(e) => return Err(e.into_inner()),
        }
    }
}

/// Prints JSON lines; `false` when stdout was closed (e.g. piped into `head`).
fn print_lines(lines: &[(u64, String)]) -> anyhow::Result<bool> {
    let mut out = std::io::stdout().lock();
    for (_, line) in lines {
        match writeln!(out, "{line}").and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> NodeKey {
        NodeKey::from_secret_bytes([7; 32])
    }

    /// A Db at `dir/db` with entries 1..=n, checkpointed at each seq in `checkpoints`.
    fn log_with(n: u64, checkpoints: &[u64]) -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let mut log = AuditLog::open(&db, key()).unwrap();
        for i in 1..=n {
            let seq = log
                .append(
                    "task",
                    &format!("t{i}"),
                    json!({"i": i, "b": [1, 2]}),
                    1000 + i,
                )
                .unwrap();
            assert_eq!(seq, i);
            if checkpoints.contains(&i) {
                log.checkpoint(5000 + i).unwrap();
            }
        }
        (dir, db)
    }

    fn problems(db: &sled::Db) -> Vec<AuditProblem> {
        AuditLog::verify(db, &key().node_id()).unwrap().problems
    }

    fn entries(db: &sled::Db) -> sled::Tree {
        db.open_tree(ENTRIES).unwrap()
    }

    fn get(db: &sled::Db, seq: u64) -> sled::IVec {
        entries(db).get(seq.to_be_bytes()).unwrap().unwrap()
    }

    /// Replaces entry `seq` with one whose detail differs, hashed correctly from `prev`.
    fn rewrite(db: &sled::Db, seq: u64, prev: &[u8; 32]) -> [u8; 32] {
        let (value, hash) = encode_entry(
            seq,
            1000 + seq,
            "task",
            &format!("t{seq}"),
            r#"{"forged":true}"#,
            prev,
        );
        entries(db).insert(seq.to_be_bytes(), value).unwrap();
        hash
    }

    #[test]
    fn appended_log_verifies_and_tails() {
        let (_dir, db) = log_with(20, &[10, 20]);
        let report = AuditLog::verify(&db, &key().node_id()).unwrap();
        assert!(report.ok(), "{report}");
        assert_eq!(
            (report.entries, report.checkpoints, report.pinned_through),
            (20, 2, 20)
        );
        let tail = AuditLog::tail(&db, 3).unwrap();
        assert_eq!(tail.iter().map(|e| e.seq).collect::<Vec<_>>(), [18, 19, 20]);
        assert_eq!(tail[2].detail, json!({"b": [1, 2], "i": 20}));
        assert_eq!(tail[1].hash, tail[2].prev);
        assert_eq!(AuditLog::after(&db, 18, 10).unwrap().len(), 2);
        assert!(AuditLog::tail(&db, 0).unwrap().is_empty());
        // Another node's key does not verify the checkpoints.
        let other = NodeKey::from_secret_bytes([8; 32]).node_id();
        assert_eq!(AuditLog::verify(&db, &other).unwrap().problems.len(), 2);
    }

    #[test]
    fn detail_is_canonical_json() {
        let a = canonical(json!({"z": 1, "a": {"y": [ {"d": 1, "c": 2} ], "x": null}}));
        assert_eq!(
            a.to_string(),
            r#"{"a":{"x":null,"y":[{"c":2,"d":1}]},"z":1}"#
        );
    }

    #[test]
    fn changed_bytes_name_the_entry() {
        let (_dir, db) = log_with(10, &[]);
        let mut value = get(&db, 7).to_vec();
        let at = value.len() - 70; // inside the detail JSON
        value[at] ^= 1;
        entries(&db).insert(7u64.to_be_bytes(), value).unwrap();
        assert_eq!(problems(&db), [AuditProblem::Changed { seq: 7 }]);
        assert_eq!(
            problems(&db)[0].to_string(),
            "entry 7 was changed (hash mismatch)"
        );
    }

    #[test]
    fn rewrite_with_recomputed_hash_is_caught_by_the_next_prev() {
        let (_dir, db) = log_with(10, &[6]);
        rewrite(&db, 4, &decode_entry(&get(&db, 3)).unwrap().hash);
        assert_eq!(problems(&db), [AuditProblem::Changed { seq: 4 }]);
        // Entry 6 is pinned by a checkpoint, so a bad link 6 -> 7 blames 7, not 6.
        let (_dir, db) = log_with(10, &[6]);
        rewrite(&db, 7, &[9; 32]);
        assert_eq!(problems(&db), [AuditProblem::Changed { seq: 7 }]);
        // Entry 1 must link to the genesis hash.
        let (_dir, db) = log_with(3, &[]);
        rewrite(&db, 1, &[1; 32]);
        assert_eq!(problems(&db), [AuditProblem::Changed { seq: 1 }]);
    }

    #[test]
    fn removed_entries_are_named() {
        let (_dir, db) = log_with(10, &[]);
        entries(&db).remove(5u64.to_be_bytes()).unwrap();
        entries(&db).remove(6u64.to_be_bytes()).unwrap();
        entries(&db).remove(1u64.to_be_bytes()).unwrap();
        let found = problems(&db);
        assert_eq!(
            found,
            [
                AuditProblem::Removed {
                    after_seq: 0,
                    missing: 1,
                    count: 1
                },
                AuditProblem::Removed {
                    after_seq: 4,
                    missing: 5,
                    count: 2
                },
            ]
        );
        assert_eq!(
            found[1].to_string(),
            "entries 5..=6 were removed (gap after entry 4)"
        );
    }

    #[test]
    fn foreign_records_are_reported() {
        let (_dir, db) = log_with(3, &[]);
        let (value, _) = encode_entry(0, 1, "task", "t0", "{}", &GENESIS);
        entries(&db).insert(0u64.to_be_bytes(), value).unwrap();
        entries(&db).insert(b"abc", b"x".to_vec()).unwrap();
        let keys: Vec<_> = problems(&db).iter().map(ToString::to_string).collect();
        assert_eq!(
            keys,
            [
                "a record with non-sequence key 0000000000000000 was inserted",
                "a record with non-sequence key 616263 was inserted"
            ]
        );
    }

    #[test]
    fn swapped_entries_are_reordered() {
        let (_dir, db) = log_with(10, &[]);
        let (three, five) = (get(&db, 3), get(&db, 5));
        entries(&db).insert(3u64.to_be_bytes(), five).unwrap();
        entries(&db).insert(5u64.to_be_bytes(), three).unwrap();
        assert_eq!(
            problems(&db),
            [
                AuditProblem::Reordered { seq: 3, holds: 5 },
                AuditProblem::Reordered { seq: 5, holds: 3 }
            ]
        );
    }

    #[test]
    fn forged_or_moved_checkpoints_are_bad() {
        let (_dir, db) = log_with(10, &[5, 10]);
        let cps = db.open_tree(CHECKPOINTS).unwrap();
        let mut value = cps.get(10u64.to_be_bytes()).unwrap().unwrap().to_vec();
        let forger = SigningKey::from_bytes(&[9; 32]);
        let at = value.len() - 64;
        let (seq, head, at_ms) = (10, value[9..41].try_into().unwrap(), 5010);
        value[at..].copy_from_slice(
            &forger
                .sign(&checkpoint_message(seq, &head, at_ms))
                .to_bytes(),
        );
        cps.insert(10u64.to_be_bytes(), value).unwrap();
        let found = problems(&db);
        assert!(
            matches!(&found[..], [AuditProblem::BadCheckpoint { seq: 10, reason }] if reason.contains("signature")),
            "{found:?}"
        );
        // A genuine checkpoint stored under another seq is bad too.
        let five = cps.remove(5u64.to_be_bytes()).unwrap().unwrap();
        cps.insert(7u64.to_be_bytes(), five).unwrap();
        assert!(matches!(
            problems(&db)[0],
            AuditProblem::BadCheckpoint { seq: 7, .. }
        ));
    }

    #[test]
    fn truncation_below_a_checkpoint_is_detected_above_it_is_not() {
        let (_dir, db) = log_with(12, &[10]);
        for seq in 11..=12u64 {
            entries(&db).remove(seq.to_be_bytes()).unwrap();
        }
        assert!(
            problems(&db).is_empty(),
            "documented limitation: nothing pins entries after the last checkpoint"
        );
        for seq in 9..=10u64 {
            entries(&db).remove(seq.to_be_bytes()).unwrap();
        }
        assert_eq!(
            problems(&db),
            [AuditProblem::Truncated {
                last_seq: 8,
                checkpoint_seq: 10
            }]
        );
    }

    #[test]
    fn a_wholesale_rewrite_breaks_the_signed_checkpoint() {
        let (_dir, db) = log_with(10, &[10]);
        let mut prev = GENESIS;
        for seq in 1..=10 {
            prev = rewrite(&db, seq, &prev);
        }
        let found = problems(&db);
        assert_eq!(found, [AuditProblem::ChainBroken { seq: 10 }]);
        assert!(
            found[0]
                .to_string()
                .contains("entry 10 does not match the node's signed checkpoint")
        );
    }

    #[test]
    fn reopening_continues_the_chain() {
        let (dir, db) = log_with(3, &[3]);
        let head = decode_entry(&get(&db, 3)).unwrap().hash;
        db.flush().unwrap();
        drop(db);
        let db = sled::open(dir.path().join("db")).unwrap();
        let mut log = AuditLog::open(&db, key()).unwrap();
        assert_eq!(log.len(), 3);
        assert_eq!(log.checkpointed, 3);
        assert_eq!(log.append("peer", "p", json!(null), 9).unwrap(), 4);
        assert_eq!(AuditLog::tail(&db, 1).unwrap()[0].prev, head);
        log.checkpoint(10).unwrap();
        assert!(problems(&db).is_empty());
        // A second writer on the same Db cannot overwrite entry 5.
        let mut other = AuditLog::open(&db, key()).unwrap();
        log.append("a", "b", json!({}), 11).unwrap();
        assert!(matches!(
            other.append("a", "b", json!({}), 11),
            Err(AuditError::Conflict { seq: 5 })
        ));
    }

    #[test]
    fn problems_are_bounded() {
        let (_dir, db) = log_with(150, &[]);
        for seq in 1..=150u64 {
            let mut value = get(&db, seq).to_vec();
            value[20] ^= 1;
            entries(&db).insert(seq.to_be_bytes(), value).unwrap();
        }
        let report = AuditLog::verify(&db, &key().node_id()).unwrap();
        assert_eq!((report.problems.len(), report.omitted), (MAX_PROBLEMS, 50));
        assert!(
            report.to_string().contains("first: entry 1 was changed"),
            "{report}"
        );
    }

    #[tokio::test]
    async fn cli_opens_only_an_existing_unlocked_db() {
        let (dir, db) = log_with(2, &[2]);
        // sled holds an exclusive flock on <db>/db: a second open (even in-process) fails at once.
        let err = sled::open(dir.path().join("db")).unwrap_err();
        assert!(is_lock_error(&err), "{err:?}");
        let mut place = Place {
            data_dir: dir.path().to_path_buf(),
            http: None,
            http_only: false,
        };
        let node = || Ok(key().node_id());
        // Locked, and no HTTP server to ask instead.
        let err = run_verify(&place, node).await.unwrap_err().to_string();
        assert!(
            err.contains("is locked") && err.contains("http.listen is empty"),
            "{err}"
        );
        drop(db);
        assert!(run_verify(&place, node).await.unwrap());
        run_tail(&place, 5, false).await.unwrap();
        // --http never opens the Db: nothing listens here.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        place.http = Some(closed.local_addr().unwrap());
        place.http_only = true;
        drop(closed);
        let err = run_tail(&place, 5, false).await.unwrap_err().to_string();
        assert!(err.contains("no fedmesh node answers at"), "{err}");
        let missing = tempfile::tempdir().unwrap();
        let place = Place {
            data_dir: missing.path().to_path_buf(),
            http: None,
            http_only: false,
        };
        let err = run_verify(&place, node).await.unwrap_err();
        assert!(err.to_string().contains("no fedmesh database"), "{err}");
        assert!(!missing.path().join("db").exists());
    }

    #[test]
    fn live_view_reads_and_verifies_what_was_appended_before_the_call() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let mut log = AuditLog::open(&db, key()).unwrap();
        for i in 1..=5 {
            log.append("task", &format!("t{i}"), json!({}), i).unwrap();
        }
        let view = log.view();
        assert_eq!(view.tail(2).unwrap()[0].seq, 4);
        assert_eq!(view.after(1, 2).unwrap().len(), 2);
        log.checkpoint(10).unwrap();
        let report = view.verify().unwrap();
        assert_eq!(
            (report.ok(), report.entries, report.pinned_through),
            (true, 5, 5)
        );
        // A check that started at entry 3 and sees entries 4..=5 gone but their checkpoint
        // (what a check racing the node's appends could see) leaves both out: no truncation.
        for seq in 4..=5u64 {
            entries(&db).remove(seq.to_be_bytes()).unwrap();
        }
        view.last.store(3, Ordering::Release);
        let report = view.verify().unwrap();
        assert_eq!(
            (report.ok(), report.entries, report.checkpoints),
            (true, 3, 0)
        );
        assert!(matches!(
            problems(&db)[..],
            [AuditProblem::Truncated {
                last_seq: 3,
                checkpoint_seq: 5
            }]
        ));
        // The view lives as long as the log.
        let weak = Arc::downgrade(&view);
        drop((view, log));
        assert!(weak.upgrade().is_none());
    }

    #[test]
    fn verify_report_json_carries_the_printed_text() {
        let (_dir, db) = log_with(3, &[]);
        entries(&db).remove(2u64.to_be_bytes()).unwrap();
        let report = AuditLog::verify(&db, &key().node_id()).unwrap();
        let json = report.to_json();
        assert_eq!(json["ok"], false);
        assert_eq!(
            json["problems"][0],
            "entry 2 was removed (gap after entry 1)"
        );
        assert_eq!(json["report"], report.to_string().trim_end());
        let (_dir, db) = log_with(1, &[]);
        let ok = AuditLog::verify(&db, &key().node_id()).unwrap();
        assert_eq!(
            ok.to_string(),
            "audit log OK: 1 entries, 0 checkpoints; no entry pinned by a signed checkpoint yet"
        );
    }
}
