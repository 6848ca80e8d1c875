//! Why a message was rejected. A rejection is a value, never a panic.

/// How a gossip layer should treat a rejected message (mirrors gossipsub's `MessageAcceptance`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acceptance {
    /// Valid: deliver and forward.
    Accept,
    /// Invalid and the sender is to blame: drop and penalise the peer.
    Reject,
    /// Not useful but not malicious (stale, duplicate, expired): drop without penalty.
    Ignore,
}

/// Every reason a message can be refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// Larger than the named limit.
    #[error("message is {len} bytes, more than the {max}-byte limit")]
    Oversize {
        /// The size seen.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not a wire format this node speaks.
    #[error("unknown envelope format version {0}")]
    UnknownVersion(u8),
    /// The bytes do not decode.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// The bytes decode but are not the canonical encoding of what they decode to.
    #[error("non-canonical encoding")]
    NonCanonical,
    /// The signature does not verify (strictly) under the signer's key.
    #[error("bad signature")]
    BadSignature,
    /// A float is NaN, infinite or not positive where it must be.
    #[error("{field}: not a finite number")]
    NotFinite {
        /// The field.
        field: &'static str,
    },
    /// An embedding is not L2-normalised.
    #[error("{field}: not L2-normalised (norm {norm})")]
    NotNormalised {
        /// The field.
        field: &'static str,
        /// The norm found.
        norm: f32,
    },
    /// An embedding's dimension is outside the allowed range.
    #[error(
        "{field}: dimension {dim} outside {}..={}",
        crate::limits::MIN_DIM,
        crate::limits::MAX_DIM
    )]
    DimensionOutOfRange {
        /// The field.
        field: &'static str,
        /// The dimension found.
        dim: usize,
    },
    /// Two embeddings of one space have different dimensions.
    #[error("{field}: dimension {got} does not match {expected} of the same embedding space")]
    DimensionMismatch {
        /// The field.
        field: &'static str,
        /// The dimension of the space.
        expected: usize,
        /// The dimension found.
        got: usize,
    },
    /// Too many items in a list.
    #[error("{field}: {count} items, more than the limit of {max}")]
    TooMany {
        /// The field.
        field: &'static str,
        /// The count found.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A string or byte field is too long.
    #[error("{field}: {len} bytes, more than the limit of {max}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// The length found.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A label is empty, has whitespace or control characters, or the list is not sorted and unique.
    #[error(
        "{field}: labels must be non-empty, without spaces, lowercase skills, sorted and unique"
    )]
    BadLabel {
        /// The field.
        field: &'static str,
    },
    /// The Bloom filter does not match the skills.
    #[error("skill_bloom does not match skills")]
    BloomMismatch,
    /// The message speaks for an agent of another node.
    #[error("agent's host node is not the signer")]
    HostMismatch,
    /// Past its expiry.
    #[error("expired at {expires_at_ms} (now {now_ms})")]
    Expired {
        /// The expiry.
        expires_at_ms: u64,
        /// The clock used.
        now_ms: u64,
    },
    /// Issued further in the future than the clock-skew allowance.
    #[error("issued at {issued_at_ms}, too far after now ({now_ms})")]
    IssuedInFuture {
        /// The issue time.
        issued_at_ms: u64,
        /// The clock used.
        now_ms: u64,
    },
    /// Lives longer than `MAX_VCV_TTL_MS`.
    #[error("lifetime {ttl_ms} ms exceeds the maximum")]
    TtlTooLong {
        /// The lifetime asked for.
        ttl_ms: u64,
    },
    /// Not newer than the version already known: a replay, a duplicate or a regression.
    #[error("version {got} is not newer than known version {known}")]
    VersionNotNewer {
        /// The version known.
        known: u64,
        /// The version received.
        got: u64,
    },
    /// The exact same envelope was seen recently.
    #[error("replayed message")]
    Replay,
}

impl Rejection {
    /// How gossip should treat a message refused for this reason.
    pub fn acceptance(&self) -> Acceptance {
        match self {
            // Honest nodes produce these through delays and duplicates of gossip.
            Rejection::Expired { .. } | Rejection::VersionNotNewer { .. } | Rejection::Replay => {
                Acceptance::Ignore
            }
            _ => Acceptance::Reject,
        }
    }

    /// A stable, low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::Oversize { .. } => "oversize",
            Rejection::UnknownVersion(_) => "unknown_version",
            Rejection::Malformed(_) => "malformed",
            Rejection::NonCanonical => "non_canonical",
            Rejection::BadSignature => "bad_signature",
            Rejection::NotFinite { .. } => "not_finite",
            Rejection::NotNormalised { .. } => "not_normalised",
            Rejection::DimensionOutOfRange { .. } => "dimension_out_of_range",
            Rejection::DimensionMismatch { .. } => "dimension_mismatch",
            Rejection::TooMany { .. } => "too_many",
            Rejection::TooLong { .. } => "too_long",
            Rejection::BadLabel { .. } => "bad_label",
            Rejection::BloomMismatch => "bloom_mismatch",
            Rejection::HostMismatch => "host_mismatch",
            Rejection::Expired { .. } => "expired",
            Rejection::IssuedInFuture { .. } => "issued_in_future",
            Rejection::TtlTooLong { .. } => "ttl_too_long",
            Rejection::VersionNotNewer { .. } => "version_not_newer",
            Rejection::Replay => "replay",
        }
    }
}
