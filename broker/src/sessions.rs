//! One proxied connection per rumqttd client id at a time.
//!
//! rumqttd handles a second connection with the same client id by dropping the first
//! inside its router; if the first connection's socket closes at about the same time,
//! rumqttd reports that disconnection a second time, and the stale report can hit the
//! new connection, which may have reused the same router slot. Observed: the new
//! connection dies before its CONNACK (and leaves the stale will sender that panics the
//! listener on the next attempt). So the proxy does the session takeover itself: a new
//! connection for a client id tells the current one to close, waits until rumqttd has
//! closed that one's upstream socket (by which time rumqttd has queued its disconnection),
//! and only then sends its CONNECT.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedMutexGuard, watch};

#[derive(Debug)]
struct Slot {
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Bumped by every new connection for the id; holders with an older value leave.
    generation: watch::Sender<u64>,
}

/// The registry of client ids with a live (or closing) proxied connection.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

/// Held for the lifetime of a proxied connection, closing included.
#[derive(Debug)]
pub(crate) struct SessionGuard<'a> {
    sessions: &'a Sessions,
    id: String,
    slot: Arc<Slot>,
    generation: u64,
    changes: watch::Receiver<u64>,
    _lock: Option<OwnedMutexGuard<()>>,
}

impl Sessions {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes over `id`: the current connection (if any) is told to close, and this
    /// waits (at most `wait`) until it has. `None` if it did not close in time or an
    /// even newer connection for `id` arrived meanwhile.
    pub(crate) async fn take_over(&self, id: &str, wait: Duration) -> Option<SessionGuard<'_>> {
        let slot = self
            .slots()
            .entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(Slot {
                    lock: Arc::new(tokio::sync::Mutex::new(())),
                    generation: watch::Sender::new(0),
                })
            })
            .clone();
        let mut generation = 0;
        slot.generation.send_modify(|g| {
            *g += 1;
            generation = *g;
        });
        let mut guard = SessionGuard {
            sessions: self,
            id: id.to_owned(),
            changes: slot.generation.subscribe(),
            slot,
            generation,
            _lock: None,
        };
        let lock = tokio::time::timeout(wait, guard.slot.lock.clone().lock_owned())
            .await
            .ok()?;
        guard._lock = Some(lock);
        let current = *guard.changes.borrow();
        (current == generation).then_some(guard)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots().len()
    }
}

impl SessionGuard<'_> {
    /// Resolves when a newer connection for the same client id wants over.
    pub(crate) async fn superseded(&mut self) {
        let mine = self.generation;
        let _ = self.changes.wait_for(|g| *g != mine).await;
    }
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        let mut slots = self.sessions.slots();
        // Ours and the map's: nobody else holds or waits for this id.
        if Arc::strong_count(&self.slot) == 2 {
            slots.remove(&self.id);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn takeover_waits_for_the_old_holder() {
        let s = Sessions::default();
        let mut first = s.take_over("a:x", Duration::from_secs(1)).await.unwrap();
        let second = s.take_over("a:x", Duration::from_secs(1));
        tokio::pin!(second);
        // The first is told to go...
        tokio::select! {
            _ = first.superseded() => {}
            _ = &mut second => panic!("second must wait for the first"),
        }
        drop(first);
        // ...then the second gets it.
        let second = second.await.unwrap();
        assert_eq!(s.len(), 1);
        drop(second);
        assert_eq!(s.len(), 0);
        // Different ids do not interact.
        let _a = s.take_over("a:x", Duration::from_secs(1)).await.unwrap();
        let _b = s.take_over("a:y", Duration::from_secs(1)).await.unwrap();
        assert_eq!(s.len(), 2);
    }
}
