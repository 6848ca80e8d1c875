//! The federation messages. Every one travels inside a signed [`Envelope`](crate::Envelope).

use serde::{Deserialize, Serialize};

use crate::error::Rejection;
use crate::keys::{AgentId, AgentName, NodeId};
use crate::limits::*;
use crate::vcv::{Embedding, ResourceLimits, Vcv, check_count, check_labels, check_len};

/// A task's federation-wide id: 16 bytes, derived from the submitting node and the requester's
/// request id so that a repeated submit names the same task (see [`TaskId::derive`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId(pub [u8; 16]);

impl TaskId {
    /// `blake3_derive_key("fedmesh task id v1", origin ‖ requester ‖ 0x00 ‖ request_id)[..16]`.
    pub fn derive(origin: &NodeId, requester: &str, request_id: &str) -> Self {
        let mut h = blake3::Hasher::new_derive_key("fedmesh task id v1");
        h.update(origin.as_bytes());
        h.update(requester.as_bytes());
        h.update(&[0]);
        h.update(request_id.as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        Self(out)
    }

    /// Parses 32 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        let s = s.as_bytes();
        if s.len() != 32 || !s.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, c) in s.chunks(2).enumerate() {
            out[i] = u8::from_str_radix(std::str::from_utf8(c).ok()?, 16).ok()?;
        }
        Some(Self(out))
    }
}

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::keys::hex(&self.0))
    }
}

impl std::fmt::Debug for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TaskId({})", &crate::keys::hex(&self.0)[..8])
    }
}

/// What a requester asks for: routed by [`requirement`](TaskSpec::requirement) similarity, gated
/// by skills, policies and resource limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The task's id.
    pub id: TaskId,
    /// The node where it was submitted; results return there.
    pub origin: NodeId,
    /// Plain-language description.
    pub description: String,
    /// Requirement embedding `c_t`.
    pub requirement: Embedding,
    /// Optional spec embedding `e_t`.
    pub spec: Option<Embedding>,
    /// Required skills (sorted, unique, lowercase).
    pub skills: Vec<String>,
    /// Required policy labels `p_t` (sorted, unique); an agent must carry all of them.
    pub policies: Vec<String>,
    /// Resource limits `r_t`.
    pub limits: ResourceLimits,
    /// The task's input, opaque to the federation.
    pub input: Vec<u8>,
    /// When it was accepted at the origin, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// Absolute deadline, ms since the Unix epoch.
    pub deadline_ms: u64,
    /// How many distinct agents should run it (1 = normal).
    pub redundancy: u8,
}

impl TaskSpec {
    /// Checks limits and well-formedness.
    pub fn validate(&self) -> Result<(), Rejection> {
        check_len("description", self.description.len(), MAX_DESCRIPTION_BYTES)?;
        self.requirement.validate("requirement")?;
        if let Some(spec) = &self.spec {
            spec.validate("spec")?;
        }
        check_labels("skills", &self.skills, MAX_SKILLS, true)?;
        check_labels("policies", &self.policies, MAX_POLICIES, false)?;
        check_len("input", self.input.len(), MAX_PAYLOAD_BYTES)?;
        if self.redundancy == 0 || self.redundancy > MAX_REDUNDANCY {
            return Err(Rejection::Malformed(
                "redundancy must be 1..=MAX_REDUNDANCY",
            ));
        }
        if self.deadline_ms <= self.created_at_ms {
            return Err(Rejection::Malformed(
                "deadline_ms must be after created_at_ms",
            ));
        }
        Ok(())
    }
}

/// Why a hosting node declined an offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeclineReason {
    /// The agent is running as many tasks as its capacity allows.
    AtCapacity,
    /// The agent is not (or no longer) hosted here.
    UnknownAgent,
    /// The agent's version changed and no longer matches the offer.
    StaleVersion,
    /// The deadline cannot be met.
    DeadlineTooClose,
    /// The node is shedding load.
    Overloaded,
}

/// How a task attempt ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The agent's output.
    Ok(Vec<u8>),
    /// The agent reported failure, with its reason.
    Failed(String),
}

/// One agent's current load, carried by heartbeats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentLoad {
    /// The agent on the sending node.
    pub agent: AgentName,
    /// Tasks it is running now.
    pub inflight: u16,
}

/// One entry of an anti-entropy digest: which version of which agent the sender holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestEntry {
    /// The agent.
    pub agent: AgentId,
    /// The version held.
    pub version: u64,
}

/// Every federation message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// A new or changed capability vector.
    Advertise(Vcv),
    /// The agent is gone; supersedes every version up to and including `version`.
    Withdraw {
        /// The agent.
        agent: AgentId,
        /// The version withdrawn (must be newer than the last advertised or equal to it).
        version: u64,
    },
    /// A task broadcast to the federation (used when the origin wants hosts to bid).
    Task(TaskSpec),
    /// A direct offer of a task to one agent on the receiving node.
    Offer {
        /// The task.
        task: TaskSpec,
        /// The chosen agent.
        agent: AgentId,
        /// The version of the agent's VCV the routing decision used.
        agent_version: u64,
        /// Attempt number, from 1.
        attempt: u32,
    },
    /// The hosting node took the offer.
    Accept {
        /// The task.
        task: TaskId,
        /// The agent that will run it.
        agent: AgentId,
    },
    /// The hosting node refused the offer.
    Decline {
        /// The task.
        task: TaskId,
        /// The agent offered.
        agent: AgentId,
        /// Why.
        reason: DeclineReason,
    },
    /// A progress note from the running agent.
    Progress {
        /// The task.
        task: TaskId,
        /// The agent.
        agent: AgentId,
        /// 0–100.
        percent: u8,
        /// Free text.
        note: String,
    },
    /// The result of one attempt.
    Result {
        /// The task.
        task: TaskId,
        /// The agent that ran it.
        agent: AgentId,
        /// What happened.
        outcome: Outcome,
    },
    /// Liveness and load of the sending node's agents.
    Heartbeat {
        /// Strictly increasing per node.
        seq: u64,
        /// Per-agent load.
        load: Vec<AgentLoad>,
    },
    /// Anti-entropy: the versions the sender holds (one page of them).
    SyncDigest {
        /// Entries, sorted by agent.
        entries: Vec<DigestEntry>,
    },
    /// Anti-entropy: "send me these VCVs".
    SyncRequest {
        /// The agents wanted.
        agents: Vec<AgentId>,
    },
}

impl Message {
    /// Whether this message may travel as a channel envelope, unsigned, from its sender to one
    /// peer over a connection that authenticates the sender (see
    /// [`crate::envelope::CHANNEL_VERSION`]): the task messages between an origin and a host.
    /// Registry messages and heartbeats are relayed or stored, so they are always signed.
    pub fn travels_unsigned(&self) -> bool {
        matches!(
            self,
            Message::Offer { .. }
                | Message::Accept { .. }
                | Message::Decline { .. }
                | Message::Progress { .. }
                | Message::Result { .. }
        )
    }
}

impl Message {
    /// A short name of the variant, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Advertise(_) => "advertise",
            Message::Withdraw { .. } => "withdraw",
            Message::Task(_) => "task",
            Message::Offer { .. } => "offer",
            Message::Accept { .. } => "accept",
            Message::Decline { .. } => "decline",
            Message::Progress { .. } => "progress",
            Message::Result { .. } => "result",
            Message::Heartbeat { .. } => "heartbeat",
            Message::SyncDigest { .. } => "sync_digest",
            Message::SyncRequest { .. } => "sync_request",
        }
    }

    /// Checks everything that needs neither the clock nor other state.
    pub fn validate_static(&self, signer: &NodeId) -> Result<(), Rejection> {
        match self {
            Message::Advertise(vcv) => vcv.validate_static(signer),
            Message::Withdraw { agent, .. } if &agent.node != signer => {
                Err(Rejection::HostMismatch)
            }
            Message::Withdraw { .. } => Ok(()),
            Message::Task(task) => task.validate(),
            Message::Offer { task, .. } => task.validate(),
            Message::Accept { agent, .. }
            | Message::Decline { agent, .. }
            | Message::Progress { agent, .. }
            | Message::Result { agent, .. }
                if &agent.node != signer =>
            {
                Err(Rejection::HostMismatch)
            }
            Message::Progress { note, percent, .. } => {
                check_len("note", note.len(), MAX_NOTE_BYTES)?;
                if *percent > 100 {
                    return Err(Rejection::Malformed("percent must be 0..=100"));
                }
                Ok(())
            }
            Message::Result { outcome, .. } => match outcome {
                Outcome::Ok(out) => check_len("outcome", out.len(), MAX_PAYLOAD_BYTES),
                Outcome::Failed(reason) => check_len("outcome", reason.len(), MAX_NOTE_BYTES),
            },
            Message::Accept { .. } | Message::Decline { .. } => Ok(()),
            Message::Heartbeat { load, .. } => {
                check_count("load", load.len(), MAX_HEARTBEAT_ENTRIES)
            }
            Message::SyncDigest { entries } => {
                check_count("entries", entries.len(), MAX_SYNC_ENTRIES)
            }
            Message::SyncRequest { agents } => {
                check_count("agents", agents.len(), MAX_SYNC_ENTRIES)
            }
        }
    }
}
