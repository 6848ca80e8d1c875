//! The capability registry: the newest valid VCV of every known agent.
//!
//! Sans-IO: callers pass `now_ms`. A newer version supersedes an older one; a withdrawal leaves a
//! tombstone so that a delayed, older advertisement cannot resurrect the agent; expired entries
//! and tombstones are swept by [`Registry::expire`].

use std::collections::HashMap;

use crate::envelope::ContentId;
use crate::error::Rejection;
use crate::keys::{AgentId, NodeId};
use crate::message::DigestEntry;
use crate::vcv::Embedding;
use crate::vcv::Vcv;

/// One registered agent.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// The capability vector.
    pub vcv: Vcv,
    /// The content id of the envelope that carried it.
    pub id: ContentId,
    /// The signed envelope bytes, kept for anti-entropy re-sends.
    pub envelope: Vec<u8>,
}

/// What an operation changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A new agent appeared.
    Added(AgentId),
    /// A known agent has a new version.
    Updated(AgentId),
    /// An agent was withdrawn.
    Removed(AgentId),
}

#[derive(Clone, Copy, Debug)]
struct Tombstone {
    version: u64,
    until_ms: u64,
}

/// An approximate-nearest-neighbour index the registry keeps in step with its entries, so that
/// routing scans a few candidates instead of every agent. The implementation lives outside this
/// crate (`fedmesh-index`, plugged in by the node); without one the registry scans everything.
pub trait CandidateIndex: Send + std::fmt::Debug {
    /// Adds or replaces `agent`'s capability vector.
    fn upsert(&mut self, agent: &AgentId, capability: &Embedding);
    /// Forgets `agent`.
    fn remove(&mut self, agent: &AgentId);
    /// Up to `k` agents whose capability is most similar to `query` (same embedding space
    /// only), best first, among those for which `filter` holds.
    fn search(
        &self,
        query: &Embedding,
        k: usize,
        filter: &dyn Fn(&AgentId) -> bool,
    ) -> Vec<AgentId>;
}

/// The registry. Bounded by `max_agents`; when full, new agents are refused (updates still apply).
#[derive(Debug)]
pub struct Registry {
    entries: HashMap<AgentId, Entry>,
    tombstones: HashMap<AgentId, Tombstone>,
    max_agents: usize,
    tombstone_ttl_ms: u64,
    index: Option<Box<dyn CandidateIndex>>,
}

/// The registry is full.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("registry full ({0} agents)")]
pub struct RegistryFull(pub usize);

impl Registry {
    /// An empty registry holding at most `max_agents` agents.
    pub fn new(max_agents: usize) -> Self {
        Self {
            entries: HashMap::new(),
            tombstones: HashMap::new(),
            max_agents,
            tombstone_ttl_ms: crate::limits::MAX_VCV_TTL_MS,
            index: None,
        }
    }

    /// Attaches an ANN index (filled with the current entries) used by [`Registry::candidates`].
    pub fn with_index(mut self, mut index: Box<dyn CandidateIndex>) -> Self {
        for e in self.entries.values() {
            index.upsert(&e.vcv.agent, &e.vcv.capability);
        }
        self.index = Some(index);
        self
    }

    /// The entries routing should score for `query`: with an index, the `k` nearest that pass
    /// `filter`; without one, every entry that passes `filter` (an exact scan).
    pub fn candidates<'a>(
        &'a self,
        query: &Embedding,
        k: usize,
        filter: &dyn Fn(&Entry) -> bool,
    ) -> Vec<&'a Entry> {
        match &self.index {
            Some(index) => index
                .search(query, k, &|a| self.entries.get(a).is_some_and(filter))
                .iter()
                .filter_map(|a| self.entries.get(a))
                .collect(),
            None => self.entries.values().filter(|e| filter(e)).collect(),
        }
    }

    fn unindex(&mut self, agent: &AgentId) {
        if let Some(index) = self.index.as_mut() {
            index.remove(agent);
        }
    }

    /// Inserts a verified VCV. Rejects versions not newer than the known one (replays,
    /// duplicates, regressions) with [`Rejection::VersionNotNewer`].
    pub fn insert(&mut self, entry: Entry, now_ms: u64) -> Result<Change, InsertError> {
        let agent = entry.vcv.agent.clone();
        let version = entry.vcv.version;
        if let Some(t) = self.tombstones.get(&agent)
            && version <= t.version
        {
            return Err(InsertError::Rejected(Rejection::VersionNotNewer {
                known: t.version,
                got: version,
            }));
        }
        entry
            .vcv
            .validate_time(now_ms)
            .map_err(InsertError::Rejected)?;
        let len = self.entries.len();
        match self.entries.get_mut(&agent) {
            Some(old) if version <= old.vcv.version => {
                Err(InsertError::Rejected(Rejection::VersionNotNewer {
                    known: old.vcv.version,
                    got: version,
                }))
            }
            Some(old) => {
                *old = entry;
                if let Some(index) = self.index.as_mut() {
                    index.upsert(&agent, &old.vcv.capability);
                }
                Ok(Change::Updated(agent))
            }
            None if len >= self.max_agents => Err(InsertError::Full(RegistryFull(self.max_agents))),
            None => {
                self.tombstones.remove(&agent);
                if let Some(index) = self.index.as_mut() {
                    index.upsert(&agent, &entry.vcv.capability);
                }
                self.entries.insert(agent.clone(), entry);
                Ok(Change::Added(agent))
            }
        }
    }

    /// Withdraws `agent` up to `version`. Returns `None` when nothing changed.
    pub fn withdraw(
        &mut self,
        agent: &AgentId,
        version: u64,
        now_ms: u64,
    ) -> Result<Option<Change>, Rejection> {
        if let Some(e) = self.entries.get(agent)
            && version < e.vcv.version
        {
            return Err(Rejection::VersionNotNewer {
                known: e.vcv.version,
                got: version,
            });
        }
        let t = self.tombstones.entry(agent.clone()).or_insert(Tombstone {
            version,
            until_ms: 0,
        });
        t.version = t.version.max(version);
        t.until_ms = now_ms.saturating_add(self.tombstone_ttl_ms);
        self.unindex(agent);
        Ok(self
            .entries
            .remove(agent)
            .map(|_| Change::Removed(agent.clone())))
    }

    /// Removes every entry past its expiry and every stale tombstone. Returns what was removed.
    pub fn expire(&mut self, now_ms: u64) -> Vec<AgentId> {
        let gone: Vec<AgentId> = self
            .entries
            .iter()
            .filter(|(_, e)| e.vcv.expires_at_ms <= now_ms)
            .map(|(a, _)| a.clone())
            .collect();
        for a in &gone {
            self.entries.remove(a);
            self.unindex(a);
        }
        self.tombstones.retain(|_, t| t.until_ms > now_ms);
        gone
    }

    /// Removes every agent hosted by `node` (the node left). Returns what was removed.
    pub fn remove_node(&mut self, node: &NodeId) -> Vec<AgentId> {
        let gone: Vec<AgentId> = self
            .entries
            .keys()
            .filter(|a| &a.node == node)
            .cloned()
            .collect();
        for a in &gone {
            self.entries.remove(a);
            self.unindex(a);
        }
        gone
    }

    /// The entry of `agent`.
    pub fn get(&self, agent: &AgentId) -> Option<&Entry> {
        self.entries.get(agent)
    }

    /// The version known for `agent`, counting tombstones.
    pub fn known_version(&self, agent: &AgentId) -> Option<u64> {
        self.entries
            .get(agent)
            .map(|e| e.vcv.version)
            .or_else(|| self.tombstones.get(agent).map(|t| t.version))
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Number of live agents.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no agent is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A digest of everything held (sorted by agent), for anti-entropy.
    pub fn digest(&self) -> Vec<DigestEntry> {
        let mut d: Vec<DigestEntry> = self
            .entries
            .values()
            .map(|e| DigestEntry {
                agent: e.vcv.agent.clone(),
                version: e.vcv.version,
            })
            .collect();
        d.sort_by(|a, b| a.agent.cmp(&b.agent));
        d
    }

    /// Given a peer's digest, the agents for which the peer holds something newer than we do.
    pub fn wanted(&self, peer: &[DigestEntry]) -> Vec<AgentId> {
        peer.iter()
            .filter(|d| self.known_version(&d.agent).is_none_or(|v| v < d.version))
            .map(|d| d.agent.clone())
            .collect()
    }
}

/// Why an insert failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum InsertError {
    /// The VCV is stale or invalid now.
    #[error(transparent)]
    Rejected(Rejection),
    /// The registry is at capacity.
    #[error(transparent)]
    Full(RegistryFull),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample;

    const NOW: u64 = 1_790_000_000_000;

    fn entry(version: u64) -> Entry {
        Entry {
            vcv: sample::vcv(&sample::key(1), "a", version, NOW),
            id: ContentId([version as u8; 32]),
            envelope: vec![],
        }
    }

    #[test]
    fn newer_supersedes_older_and_replays_are_refused() {
        let mut r = Registry::new(10);
        assert!(matches!(r.insert(entry(2), NOW), Ok(Change::Added(_))));
        assert!(matches!(r.insert(entry(3), NOW), Ok(Change::Updated(_))));
        let err = r.insert(entry(3), NOW).expect_err("replay");
        assert_eq!(
            err,
            InsertError::Rejected(Rejection::VersionNotNewer { known: 3, got: 3 })
        );
        let err = r.insert(entry(1), NOW).expect_err("regression");
        assert_eq!(
            err,
            InsertError::Rejected(Rejection::VersionNotNewer { known: 3, got: 1 })
        );
        assert_eq!(r.known_version(&entry(1).vcv.agent), Some(3));
    }

    #[test]
    fn withdrawal_leaves_tombstone() {
        let mut r = Registry::new(10);
        let a = entry(1).vcv.agent;
        r.insert(entry(1), NOW).expect("insert");
        assert_eq!(r.withdraw(&a, 2, NOW), Ok(Some(Change::Removed(a.clone()))));
        assert!(
            r.insert(entry(2), NOW).is_err(),
            "delayed advert must not resurrect"
        );
        assert!(
            r.insert(entry(3), NOW).is_ok(),
            "a newer version may come back"
        );
    }

    #[test]
    fn expiry_and_capacity() {
        let mut r = Registry::new(1);
        r.insert(entry(1), NOW).expect("insert");
        let other = Entry {
            vcv: sample::vcv(&sample::key(2), "b", 1, NOW),
            id: ContentId([9; 32]),
            envelope: vec![],
        };
        assert!(matches!(r.insert(other, NOW), Err(InsertError::Full(_))));
        let exp = entry(1).vcv.expires_at_ms;
        assert_eq!(r.expire(exp - 1).len(), 0);
        assert_eq!(r.expire(exp).len(), 1);
        assert!(r.is_empty());
    }

    #[test]
    fn digest_and_wanted() {
        let mut a = Registry::new(10);
        let mut b = Registry::new(10);
        a.insert(entry(2), NOW).expect("insert");
        b.insert(entry(1), NOW).expect("insert");
        assert_eq!(b.wanted(&a.digest()).len(), 1);
        assert!(a.wanted(&b.digest()).is_empty());
    }
}
