//! The registry's ANN index: one `fedmesh_index::AnnIndex` per embedding space, kept in step
//! with the registry through `protocol::registry::CandidateIndex`.

use std::collections::HashMap;

use fedmesh_index::{AgentKeys, AnnIndex, IndexParams};
use fedmesh_protocol::registry::CandidateIndex;
use fedmesh_protocol::{AgentId, Embedding};

/// Most embedding spaces indexed at once; vectors of further spaces are not indexed (and so
/// not routed to) until a space empties. Bounds memory against a flood of made-up spaces.
pub const MAX_SPACES: usize = 64;

/// Indexes of every embedding space seen, sharing one agent ↔ key map.
#[derive(Debug, Default)]
pub struct AnnAdapter {
    spaces: HashMap<String, AnnIndex>,
    keys: AgentKeys,
    space_of: HashMap<AgentId, String>,
}

impl CandidateIndex for AnnAdapter {
    fn upsert(&mut self, agent: &AgentId, capability: &Embedding) {
        if let Some(old) = self.space_of.get(agent)
            && old != &capability.space
        {
            self.remove(agent);
        }
        if !self.spaces.contains_key(&capability.space) {
            if self.spaces.len() >= MAX_SPACES {
                tracing::warn!(space = %capability.space, "too many embedding spaces; agent not indexed");
                return;
            }
            match AnnIndex::new(&capability.space, capability.dim(), IndexParams::default()) {
                Ok(index) => {
                    self.spaces.insert(capability.space.clone(), index);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot index an embedding space");
                    return;
                }
            }
        }
        let key = self.keys.key_or_insert(agent);
        let Some(index) = self.spaces.get_mut(&capability.space) else {
            return;
        };
        match index.upsert(key, capability) {
            Ok(_) => {
                self.space_of
                    .insert(agent.clone(), capability.space.clone());
            }
            Err(e) => {
                // Another dimension in a known space: the VCV was validated, so this is a
                // different model under the same id; it is not routed to.
                tracing::warn!(%agent, error = %e, "agent not indexed");
                self.keys.remove(agent);
            }
        }
    }

    fn remove(&mut self, agent: &AgentId) {
        let Some(key) = self.keys.remove(agent) else {
            return;
        };
        if let Some(space) = self.space_of.remove(agent)
            && let Some(index) = self.spaces.get_mut(&space)
        {
            index.remove(key);
            if index.is_empty() {
                self.spaces.remove(&space);
            }
        }
    }

    fn search(
        &self,
        query: &Embedding,
        k: usize,
        filter: &dyn Fn(&AgentId) -> bool,
    ) -> Vec<AgentId> {
        let Some(index) = self.spaces.get(&query.space) else {
            return Vec::new();
        };
        let pass = |key| self.keys.agent(key).is_some_and(filter);
        match index.search(query, k, pass) {
            Ok(hits) => hits
                .into_iter()
                .filter_map(|(key, _)| self.keys.agent(key).cloned())
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "query not searchable");
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_protocol::registry::{Entry, Registry};
    use fedmesh_protocol::{ContentId, sample};

    const NOW: u64 = 1_790_000_000_000;

    #[test]
    fn registry_candidates_through_the_index_match_an_exact_scan() {
        let key = sample::key(1);
        let mut indexed = Registry::new(10_000).with_index(Box::new(AnnAdapter::default()));
        let mut plain = Registry::new(10_000);
        for i in 0..300u64 {
            let mut v = sample::vcv(&key, &format!("a{i}"), 1, NOW);
            v.capability = sample::embedding(i, 256);
            let e = Entry {
                vcv: v,
                id: ContentId([0; 32]),
                envelope: vec![],
            };
            indexed.insert(e.clone(), NOW).expect("insert");
            plain.insert(e, NOW).expect("insert");
        }
        let query = sample::embedding(42, 256);
        let all = |_: &Entry| true;
        let got = indexed.candidates(&query, 5, &all);
        assert_eq!(got.len(), 5);
        assert_eq!(
            got[0].vcv.agent.name.as_str(),
            "a42",
            "the nearest agent comes first"
        );
        assert_eq!(
            plain.candidates(&query, 5, &all).len(),
            300,
            "no index: exact scan of all"
        );
        // Withdrawn agents leave the index; filters apply.
        let a42 = got[0].vcv.agent.clone();
        indexed.withdraw(&a42, 1, NOW).expect("withdraw");
        assert!(
            indexed
                .candidates(&query, 5, &all)
                .iter()
                .all(|e| e.vcv.agent != a42)
        );
        let only_a7 = |e: &Entry| e.vcv.agent.name.as_str() == "a7";
        assert_eq!(indexed.candidates(&query, 5, &only_a7).len(), 1);
        // Another embedding space is never compared.
        let mut other = query.clone();
        other.space = "other/v1".into();
        assert!(indexed.candidates(&other, 5, &all).is_empty());
    }
}
