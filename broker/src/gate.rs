//! Output commit at the edge: messages the node publishes *before* the flush that makes them
//! true, held by the proxy until the node releases them *after* that flush.
//!
//! The node persists a batch's writes and flushes sled before any effect of the batch may be
//! seen (an `accepted` reply, a result, a task in an agent's inbox). Publishing only after the
//! flush puts the flush (≈ 0.2–0.4 ms here) and the whole publish pipeline (node → link →
//! rumqttd's router → rumqttd's connection task → proxy → client, ≈ 0.2 ms) one after the
//! other on every round trip. With the gate the node publishes at once, the pipeline runs
//! while sled flushes, and the proxy, the last hop before any client, holds each such message
//! until the node releases it: what a client can observe is exactly what it could observe
//! before (nothing the node has not made durable), one stage earlier in the pipeline. This is
//! "external synchrony" (Nightingale et al., *Rethink the Sync*, OSDI 2006): output is
//! buffered until the commit it depends on, not the computation that produced it.
//!
//! rumqttd relays topic and payload unchanged, so a message is recognised by a keyed hash of
//! its topic and payload ([`Held`]). A client that publishes the same bytes on the same topic
//! while the node holds a message waits with it, for at most one flush. Bounds: the node
//! holds at most one batch's publishes at a time and releases them after every flush; a
//! message held longer than [`HOLD_LIMIT`] (a wedged disk) is delivered anyway and counted.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// Longest the proxy holds a message for the node.
pub(crate) const HOLD_LIMIT: Duration = Duration::from_secs(30);

/// A message the proxy holds until the node releases it (see [`Broker::publish_held`]).
///
/// [`Broker::publish_held`]: crate::Broker::publish_held
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Held(u64);

/// The held messages, shared by the node's publishing side and every proxy connection.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    hasher: RandomState,
    /// Key → how many identical messages are held.
    held: Mutex<HashMap<u64, u32>>,
    /// `held.len()`, read without the lock on every relayed PUBLISH.
    len: AtomicUsize,
    released: Notify,
}

impl Gate {
    /// The key of a message with this topic and payload.
    pub(crate) fn key(&self, topic: &[u8], payload: &[u8]) -> Held {
        let mut h = self.hasher.build_hasher();
        h.write_usize(topic.len());
        h.write(topic);
        h.write(payload);
        Held(h.finish())
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn hold(&self, key: Held) {
        let mut m = self.map();
        *m.entry(key.0).or_insert(0) += 1;
        self.len.store(m.len(), Ordering::Release);
    }

    pub(crate) fn release(&self, keys: impl IntoIterator<Item = Held>) {
        let mut any = false;
        {
            let mut m = self.map();
            for k in keys {
                if let Some(n) = m.get_mut(&k.0) {
                    any = true;
                    *n -= 1;
                    if *n == 0 {
                        m.remove(&k.0);
                    }
                }
            }
            self.len.store(m.len(), Ordering::Release);
        }
        if any {
            self.released.notify_waiters();
        }
    }

    /// Whether nothing is held (the proxy's fast path).
    pub(crate) fn is_empty(&self) -> bool {
        self.len.load(Ordering::Acquire) == 0
    }

    pub(crate) fn is_held(&self, key: Held) -> bool {
        self.map().contains_key(&key.0)
    }

    /// Waits until `key` is released, at most `limit`; returns whether it gave up.
    pub(crate) async fn wait(&self, key: Held, limit: Duration) -> bool {
        crate::wait::until(&self.released, limit, || !self.is_held(key)).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_topic_from_payload() {
        let g = Gate::default();
        assert_eq!(g.key(b"a/b", b"xy"), g.key(b"a/b", b"xy"));
        assert_ne!(g.key(b"a/b", b"xy"), g.key(b"a/bx", b"y"));
        assert_ne!(g.key(b"a/b", b"xy"), g.key(b"a/b", b"xz"));
    }

    #[test]
    fn identical_messages_are_counted() {
        let g = Gate::default();
        let k = g.key(b"t", b"p");
        assert!(g.is_empty());
        g.hold(k);
        g.hold(k);
        g.release([k]);
        assert!(g.is_held(k) && !g.is_empty());
        g.release([k]);
        assert!(!g.is_held(k) && g.is_empty());
        // Releasing what is not held is harmless.
        g.release([k]);
        assert!(g.is_empty());
    }

    #[tokio::test]
    async fn a_waiter_is_woken_by_the_release_and_gives_up_at_the_limit() {
        let g = std::sync::Arc::new(Gate::default());
        let k = g.key(b"t", b"p");
        g.hold(k);
        let waiter = {
            let g = g.clone();
            tokio::spawn(async move { g.wait(k, Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        g.release([k]);
        assert!(!waiter.await.unwrap(), "released, not timed out");
        g.hold(k);
        assert!(g.wait(k, Duration::from_millis(20)).await, "gave up");
    }
}
