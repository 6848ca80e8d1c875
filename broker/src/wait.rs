//! Waiting on a [`Notify`] for a condition, with a limit: the one pattern behind QoS 1 flow
//! control, the output-commit gate and the proxy's SUBACK ordering.

use std::time::Duration;

use tokio::sync::Notify;

/// Waits until `done()` holds, re-checking each time `notify` wakes its waiters, for at most
/// `limit`. Returns whether it gave up. A notification between the check and the wait is not
/// lost: the waiter is registered before the check.
pub(crate) async fn until(notify: &Notify, limit: Duration, done: impl Fn() -> bool) -> bool {
    tokio::time::timeout(limit, async {
        loop {
            let woken = notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if done() {
                return;
            }
            woken.await;
        }
    })
    .await
    .is_err()
}
