//! # fedmesh-protocol
//!
//! The wire types, keys and signing of fedmesh, and its sans-IO core.
//!
//! **Architecture invariant:** this crate performs no IO, owns no clock and no randomness, and
//! depends on no async runtime, network or storage crate. Time (`now_ms`) and RNGs are passed in.
//! That is what lets one process simulate a thousand nodes deterministically.
//!
//! * [`keys`]: node keys, [`NodeId`] (prints as the libp2p `PeerId`), [`AgentName`], [`AgentId`].
//! * [`vcv`]: the Versioned Capability Vector after Federation of Agents (arXiv 2509.20175).
//! * [`message`]: every federation message.
//! * [`envelope`]: the one canonical signed encoding; [`open`] turns bytes into a verified
//!   [`Envelope`] or a typed [`Rejection`]. Task messages between two nodes may also travel
//!   as its unsigned variant over an authenticated connection ([`seal_channel`],
//!   [`open_channel`]).
//! * [`limits`]: every limit as a named constant.
//! * [`gossip`]: the replicated capability registry of one node (eager push, re-advertisement,
//!   expiry, anti-entropy), sans-IO.
//! * [`sim`]: a deterministic discrete-event simulator over many [`gossip::Federation`]s.

#![deny(missing_docs)]

pub mod envelope;
pub mod error;
pub mod gossip;
pub mod keys;
pub mod limits;
pub mod message;
pub mod registry;
pub mod router;
#[doc(hidden)]
pub mod sample;
pub mod sim;
pub mod task;
pub mod vcv;

pub use envelope::{
    CHANNEL_VERSION, ContentId, Envelope, content_id, is_channel, open, open_batch, open_channel,
    seal, seal_channel,
};
pub use error::{Acceptance, Rejection};
pub use keys::{AgentId, AgentName, IdError, NodeId, NodeKey};
pub use message::{AgentLoad, DeclineReason, DigestEntry, Message, Outcome, TaskId, TaskSpec};
pub use vcv::{Embedding, ExampleVector, ResourceLimits, Resources, SkillBloom, Vcv};
