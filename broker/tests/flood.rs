//! Bounded memory under a QoS 0 flood towards a subscriber that never reads, while QoS 1
//! traffic keeps flowing (issue #6). Its own test binary, so the RSS it measures is its own.
//! A second, slow subscriber makes rumqttd drop segments under it, which it reports as a
//! `warn` "Read cursor start jumped …" (what the node counts in
//! `fedmesh_broker_dropped_total{reason="slow_subscriber"}`): the test checks it does.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rumqttc::{Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// rumqttd's read-cursor-jump warnings seen (any thread).
static JUMPS: AtomicU64 = AtomicU64::new(0);

struct JumpCounter;

impl<S: tracing::Subscriber> Layer<S> for JumpCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let m = event.metadata();
        if m.target().starts_with("rumqttd")
            && *m.level() == tracing::Level::WARN
            && m.fields().field("start_cursor").is_some()
        {
            JUMPS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn publish_frame(topic: &str, payload: usize) -> Vec<u8> {
    let remaining = 2 + topic.len() + payload;
    let mut f = vec![0x30];
    let mut len = remaining;
    loop {
        let mut b = (len & 0x7f) as u8;
        len >>= 7;
        if len > 0 {
            b |= 0x80;
        }
        f.push(b);
        if len == 0 {
            break;
        }
    }
    f.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    f.extend_from_slice(topic.as_bytes());
    f.resize(f.len() + payload, b'x');
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_flood_is_bounded_and_qos1_keeps_flowing() {
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(JumpCounter))
        .unwrap();
    let mut s = settings();
    s.memory_budget_bytes = 16 * 1024 * 1024;
    s.max_payload_bytes = 4096;
    let (broker, _inbound) = start(s);
    let addr = broker.local_addr_v4();

    // A subscriber that subscribes and then never reads.
    let (code, mut stuck) = raw_connack(addr, &raw_connect(4, "stuck", 60, None)).await;
    assert_eq!(code, Some(0));
    let sub = [
        0x82, 10, 0, 1, 0, 7, b'f', b'l', b'o', b'o', b'd', b'/', b'#', 0,
    ];
    let mut sub = sub.to_vec();
    sub[1] = (sub.len() - 2) as u8;
    stuck.write_all(&sub).await.unwrap();
    // And one that reads 4 KiB every 10 ms (400 KB/s, far below the flood's rate).
    let (code, mut slow) = raw_connack(addr, &raw_connect(4, "slow", 60, None)).await;
    assert_eq!(code, Some(0));
    slow.write_all(&sub).await.unwrap();
    let slow_reader = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        let mut total = 0u64;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && let Ok(Ok(n)) = timeout(Duration::from_secs(2), slow.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            total += n as u64;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        total
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (code, mut flooder) = raw_connack(addr, &raw_connect(4, "flooder", 60, None)).await;
    assert_eq!(code, Some(0));
    let rss_before = rss_bytes();

    // ~200 MB of QoS 0 publishes, 1 KiB each, written in 64 KiB batches.
    let frame = publish_frame("flood/x", 1024);
    let batch: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * 64)
        .collect();
    let flood = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(4);
        let mut sent = 0u64;
        while Instant::now() < deadline && sent < 200_000 {
            match timeout(Duration::from_secs(1), flooder.write_all(&batch)).await {
                Ok(Ok(())) => sent += 64,
                _ => break,
            }
        }
        (sent, flooder)
    });

    // QoS 1 keeps flowing meanwhile.
    let mut q_sub = v4_client(v4_options(addr, "q1-sub", None));
    q_sub.connected().await.unwrap();
    q_sub
        .client
        .subscribe("q1/x", QoS::AtLeastOnce)
        .await
        .unwrap();
    q_sub
        .next_incoming(|p| matches!(p, Packet::SubAck(_)).then_some(()))
        .await;
    let mut q_pub = v4_client(v4_options(addr, "q1-pub", None));
    q_pub.connected().await.unwrap();
    let started = Instant::now();
    for i in 0..200u32 {
        q_pub
            .client
            .publish("q1/x", QoS::AtLeastOnce, false, i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    for i in 0..200u32 {
        let p = q_sub
            .next_incoming(|p| match p {
                Packet::Publish(p) => Some(p.clone()),
                _ => None,
            })
            .await;
        assert_eq!(
            &p.payload[..],
            &i.to_be_bytes(),
            "QoS 1 messages arrive in order"
        );
    }
    let qos1_time = started.elapsed();

    let (sent, _flooder) = flood.await.unwrap();
    let rss_after = rss_bytes();
    let grown = rss_after.saturating_sub(rss_before);
    eprintln!(
        "flooded {sent} x 1 KiB; QoS1 200 msgs in {qos1_time:?}; RSS {} -> {} MiB (+{} MiB)",
        rss_before >> 20,
        rss_after >> 20,
        grown >> 20
    );
    assert!(
        sent >= 10_000,
        "the flood should have made progress ({sent})"
    );
    assert!(qos1_time < Duration::from_secs(10), "{qos1_time:?}");
    // 16 MiB budget; allow generous slack for allocator behaviour and tokio tasks.
    assert!(
        grown < 64 << 20,
        "RSS grew by {} MiB under the flood",
        grown >> 20
    );
    let slow_read = slow_reader.await.unwrap();
    let jumps = JUMPS.load(Ordering::Relaxed);
    eprintln!("slow subscriber read {slow_read} B; rumqttd cursor jumps {jumps}");
    assert!(slow_read > 0, "the slow subscriber received");
    assert!(
        jumps > 0,
        "rumqttd reported dropping segments under the slow subscriber"
    );
    assert_serves(addr).await;
    drop(stuck);
    broker.shutdown().await;
}
