//! Every protocol limit, as a named constant.
//!
//! A message that exceeds any of these is rejected with a typed [`Rejection`](crate::Rejection)
//! naming the limit; nothing here is configurable at run time because every node of a federation
//! must agree on them.

/// Largest encoded envelope accepted from the network, in bytes. Kept under gossipsub's default
/// `max_transmit_size` (64 KiB) so that no conforming message is dropped silently by a peer.
pub const MAX_ENVELOPE_BYTES: usize = 60 * 1024;
/// Largest encoded capability vector (the `Advertise` body), in bytes. AGNTCY caps gossip at
/// 10 KB; ours was 10 KiB until the per-example vectors ([`MAX_EXAMPLE_VECTOR_BYTES`]) were added
/// and is now 20 KiB, still a third of [`MAX_ENVELOPE_BYTES`].
pub const MAX_VCV_BYTES: usize = 20 * 1024;
/// Largest embedding dimension.
pub const MAX_DIM: usize = 1024;
/// Smallest embedding dimension.
pub const MIN_DIM: usize = 8;
/// Largest number of skill tags on one agent or task.
pub const MAX_SKILLS: usize = 64;
/// Largest number of policy labels on one agent or task.
pub const MAX_POLICIES: usize = 32;
/// Largest number of examples on one agent.
pub const MAX_EXAMPLES: usize = 32;
/// Largest number of per-example vectors on one agent (`Vcv::example_vectors`, one per example;
/// 32 is what routing needs to reach 85 % top-1 on BANKING77, see BENCHMARKS.md).
pub const MAX_EXAMPLE_VECTORS: usize = 32;
/// Largest total of quantised components over all per-example vectors of one agent (one byte
/// each): 32 vectors of 256 dimensions, or fewer of a larger dimension (8 of 1024).
pub const MAX_EXAMPLE_VECTOR_BYTES: usize = 8 * 1024;
/// Longest skill tag or policy label, in bytes.
pub const MAX_LABEL_BYTES: usize = 64;
/// Longest agent name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// Longest embedding-space id, in bytes.
pub const MAX_SPACE_BYTES: usize = 64;
/// Longest agent or task description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 2048;
/// Longest single example, in bytes.
pub const MAX_EXAMPLE_BYTES: usize = 512;
/// Longest free-text note (progress, decline or failure reason), in bytes.
pub const MAX_NOTE_BYTES: usize = 1024;
/// Largest task input or result carried inside one envelope, in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 48 * 1024;
/// Largest number of per-agent load entries in one heartbeat.
pub const MAX_HEARTBEAT_ENTRIES: usize = 1024;
/// Largest number of entries in one anti-entropy digest or request.
pub const MAX_SYNC_ENTRIES: usize = 2048;
/// Largest task redundancy (how many agents should run the same task).
pub const MAX_REDUNDANCY: u8 = 5;
/// How far in the future an `issued_at` may lie before it is rejected (clock skew allowance), in ms.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;
/// Longest lifetime of one capability vector, in ms (AGNTCY: 48 h).
pub const MAX_VCV_TTL_MS: u64 = 48 * 3600 * 1000;
/// Tolerance on the L2 norm of a dequantised embedding: `|‖v‖ − 1| ≤ NORM_TOLERANCE`.
pub const NORM_TOLERANCE: f32 = 0.02;
