//! The futures-timer patch (third_party/futures-timer/PATCHED.md): the helper thread is woken
//! only when it would not look at a new timer in time. These check that every timer still
//! fires when it should, in the cases where the patch skips a wake-up: a timer later than one
//! already pending, a timer reset to an earlier deadline, timers dropped while others wait,
//! and many more pushes than the unsignalled bound. Each test fails if a timer fires late by
//! seconds (it would wait for an unrelated, much later timer) or never.

use std::time::{Duration, Instant};

use futures_timer::Delay;

/// Generous: these run on a loaded 2-vCPU machine; a missed wake-up costs seconds.
const SLACK: Duration = Duration::from_millis(800);

async fn fires_within(d: Delay, from: Instant, due: Duration) {
    tokio::time::timeout(due + SLACK, d)
        .await
        .unwrap_or_else(|_| panic!("a {due:?} timer had not fired after {:?}", from.elapsed()));
}

#[tokio::test]
async fn a_short_timer_behind_a_long_one_fires_on_time() {
    // The helper thread sleeps until the 60 s timer; the 50 ms one must wake it.
    let _long = Delay::new(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let start = Instant::now();
    fires_within(
        Delay::new(Duration::from_millis(50)),
        start,
        Duration::from_millis(50),
    )
    .await;
}

#[tokio::test]
async fn a_later_timer_behind_an_earlier_one_fires_on_time() {
    // No wake-up for the 300 ms timer: the thread looks at 100 ms anyway.
    let start = Instant::now();
    let early = Delay::new(Duration::from_millis(100));
    let late = Delay::new(Duration::from_millis(300));
    fires_within(early, start, Duration::from_millis(100)).await;
    fires_within(late, start, Duration::from_millis(300)).await;
    assert!(start.elapsed() >= Duration::from_millis(300), "fired early");
}

#[tokio::test]
async fn a_timer_reset_to_an_earlier_deadline_fires_on_time() {
    let _long = Delay::new(Duration::from_secs(60));
    let mut d = Delay::new(Duration::from_secs(30));
    tokio::time::sleep(Duration::from_millis(20)).await;
    d.reset(Duration::from_millis(50));
    let start = Instant::now();
    fires_within(d, start, Duration::from_millis(50)).await;
}

#[tokio::test]
async fn dropped_timers_and_many_pushes_leave_the_rest_on_time() {
    let _long = Delay::new(Duration::from_secs(60));
    // Far more pushes than the unsignalled bound (1024), none of which wakes the thread on its
    // own: created later than the pending 60 s timer, then dropped.
    for _ in 0..5_000 {
        drop(Delay::new(Duration::from_secs(120)));
    }
    let start = Instant::now();
    let short: Vec<Delay> = (1..=20)
        .map(|i| Delay::new(Duration::from_millis(10 * i)))
        .collect();
    for (i, d) in short.into_iter().enumerate() {
        fires_within(d, start, Duration::from_millis(10 * (i as u64 + 1))).await;
    }
}
