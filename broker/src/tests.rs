//! Tests that need the crate's internals: the defects the defences prevent, shown with
//! the defences off, and the watchdog recovering a listener rumqttd itself broke.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5::Packet as P5;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::codec::Version;
use crate::proxy::Defences;
use crate::{Broker, BrokerSettings, Health};

const WAIT: Duration = Duration::from_secs(5);

fn settings() -> BrokerSettings {
    BrokerSettings {
        listen_v4: "127.0.0.1:0".parse().unwrap(),
        listen_v5: Some("127.0.0.1:0".parse().unwrap()),
        tls: None,
        anonymous: true,
        credentials_path: None,
        max_connections: 32,
        max_payload_bytes: 64 * 1024,
        memory_budget_bytes: 16 * 1024 * 1024,
        connect_timeout: Duration::from_secs(2),
        queue_depth: 64,
        direct_delivery: true,
    }
}

fn client(o: MqttOptions) -> (AsyncClient, mpsc::Receiver<Option<P5>>) {
    let (client, mut el) = AsyncClient::new(o, 64);
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(p)) => {
                    if tx.send(Some(p)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = tx.send(None).await;
                    return;
                }
            }
        }
    });
    (client, rx)
}

/// A v5 client `id` connected to `addr` (Keep Alive 5 s), once its CONNACK is in.
async fn connected(addr: SocketAddr, id: &str) -> (AsyncClient, mpsc::Receiver<Option<P5>>) {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    let (c, mut rx) = client(o);
    next(&mut rx, |p| matches!(p, P5::ConnAck(_)).then_some(())).await;
    (c, rx)
}

async fn next<T>(
    rx: &mut mpsc::Receiver<Option<P5>>,
    mut f: impl FnMut(P5) -> Option<T>,
) -> Option<T> {
    loop {
        match timeout(WAIT, rx.recv()).await.ok()?? {
            Some(p) => {
                if let Some(t) = f(p) {
                    return Some(t);
                }
            }
            None => return None,
        }
    }
}

/// (topic received, topic published) pairs of the alias scenario; stops early if the
/// subscriber's connection closes.
async fn alias_scenario(addr: SocketAddr) -> Vec<(String, String)> {
    let mut o = MqttOptions::new("alias-sub", addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    o.set_topic_alias_max(Some(10));
    let (sub, mut rx) = client(o);
    next(&mut rx, |p| matches!(p, P5::ConnAck(_)).then_some(()))
        .await
        .unwrap();
    sub.subscribe("t/+", Q5::AtLeastOnce).await.unwrap();
    next(&mut rx, |p| matches!(p, P5::SubAck(_)).then_some(()))
        .await
        .unwrap();
    let mut o = MqttOptions::new("alias-pub", addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    let (publ, mut prx) = client(o);
    next(&mut prx, |p| matches!(p, P5::ConnAck(_)).then_some(()))
        .await
        .unwrap();
    for t in ["t/a", "t/b", "t/a", "t/b"] {
        publ.publish(t, Q5::AtLeastOnce, false, t.as_bytes().to_vec())
            .await
            .unwrap();
        next(&mut prx, |p| matches!(p, P5::PubAck(_)).then_some(()))
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 4 {
        let Some(p) = next(&mut rx, |p| match p {
            P5::Publish(p) => Some(p),
            _ => None,
        })
        .await
        else {
            break;
        };
        got.push((
            String::from_utf8_lossy(&p.topic).into_owned(),
            String::from_utf8_lossy(&p.payload).into_owned(),
        ));
    }
    got
}

/// Without the defence, rumqttd's filter-keyed server aliases deliver a `t/b` message
/// under `t/a`: this is what `tests/inbound.rs` guards against.
#[tokio::test]
async fn alias_regression_test_fails_without_the_defence() {
    let off = Defences {
        strip_topic_alias_max: false,
        refuse_server_aliases: false,
        direct_relay: false,
        ..Defences::default()
    };
    let (broker, _inbound) = Broker::start_with(settings(), off).unwrap();
    let got = alias_scenario(broker.local_addr_v5().unwrap()).await;
    assert_eq!(got.len(), 4);
    assert!(
        got.iter().any(|(topic, published)| topic != published),
        "expected rumqttd's alias defect to mislabel a message: {got:?}"
    );
    broker.shutdown().await;

    // The second line of defence alone: the proxy closes the connection rather than
    // relay an aliased publish, so nothing is ever mislabelled.
    let second = Defences {
        strip_topic_alias_max: false,
        refuse_server_aliases: true,
        direct_relay: false,
        ..Defences::default()
    };
    let (broker, _inbound) = Broker::start_with(settings(), second).unwrap();
    let got = alias_scenario(broker.local_addr_v5().unwrap()).await;
    assert!(
        got.len() < 4,
        "the aliased publish must not be relayed: {got:?}"
    );
    assert!(
        got.iter().all(|(topic, published)| topic == published),
        "{got:?}"
    );
    broker.shutdown().await;
}

/// Break a rumqttd listener for real (the NOTES reproduction, sent straight to the
/// internal listener: client id `a/b` twice poisons its mutex), then watch the watchdog
/// notice, replace it and report it.
#[tokio::test]
async fn watchdog_replaces_a_poisoned_listener() {
    let (broker, _inbound) = Broker::start(settings()).unwrap();
    let internal = broker.internal.clone();
    let old = internal.endpoints.borrow().get(Version::V4).addr;
    let auth = internal.cfg.auth.clone();
    let connect = auth.connect(Version::V4, "a/b").encode();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(old).await.unwrap();
        s.write_all(&connect).await.unwrap();
        let mut buf = [0u8; 16];
        // rumqttd closes without a CONNACK.
        let n = timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0);
    }
    // The listener is now dead for everyone.
    let probe = crate::internal::probe(old, Version::V4, &auth, "check", Duration::from_secs(1));
    assert!(probe.is_err(), "rumqttd's listener should be poisoned");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while broker.metrics().listener_restarts == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = broker.metrics();
    assert!(m.listener_restarts >= 1, "{m:?}");
    assert!(m.watchdog_failures >= 2, "{m:?}");
    let new = internal.endpoints.borrow().get(Version::V4).addr;
    assert_ne!(new, old);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while broker.health() != Health::Healthy && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(broker.health(), Health::Healthy);
    // The replacement listener got TCP_NODELAY too.
    assert_eq!(broker.metrics().internal_listeners_nodelay, 2);

    // Clients are served again through the proxy.
    let addr = broker.local_addr_v4();
    let mut o = rumqttc::MqttOptions::new("after-recovery", addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    let (c, mut el) = rumqttc::AsyncClient::new(o, 16);
    c.subscribe("r/x", rumqttc::QoS::AtLeastOnce).await.unwrap();
    c.publish("r/x", rumqttc::QoS::AtLeastOnce, false, "ok")
        .await
        .unwrap();
    let got = timeout(WAIT, async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = el.poll().await.unwrap()
            {
                return p;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&got.payload[..], b"ok");
    #[cfg(target_os = "linux")]
    {
        let sides = crate::nodelay::accepted_nodelay(new);
        assert!(!sides.is_empty() && sides.iter().all(|&n| n), "{sides:?}");
    }
    broker.shutdown().await;
}

/// A v4 client with TCP_NODELAY (rumqttc's default is Nagle on, which alone stalls a
/// round trip by 40 ms), once its SUBACK for `filter` arrived.
async fn nodelay_client(
    addr: SocketAddr,
    id: &str,
    filter: &str,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    let (c, mut el) = rumqttc::AsyncClient::new(o, 16);
    el.network_options.set_tcp_nodelay(true);
    c.subscribe(filter, rumqttc::QoS::AtMostOnce).await.unwrap();
    timeout(WAIT, async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) = el.poll().await.unwrap() {
                return;
            }
        }
    })
    .await
    .unwrap();
    (c, el)
}

/// Sequential round trips through the proxy: a publisher sends one QoS 0 message, a
/// subscriber on another connection receives it, repeat. rumqttd writes each delivery
/// to the subscriber's proxied connection while its previous one is still unacked by
/// the proxy (the subscriber never writes back), which is what Nagle delays until the
/// delayed ACK. Returns the sorted durations.
async fn round_trips(addr: SocketAddr, id: &str, n: usize) -> Vec<Duration> {
    let topic = format!("rtt/{id}");
    let (sub, mut sub_el) = nodelay_client(addr, &format!("{id}-sub"), &topic).await;
    let (publ, mut pub_el) = nodelay_client(addr, &format!("{id}-pub"), "rtt/none").await;
    tokio::spawn(async move { while pub_el.poll().await.is_ok() {} });
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        let start = tokio::time::Instant::now();
        publ.publish(&topic, rumqttc::QoS::AtMostOnce, false, i.to_string())
            .await
            .unwrap();
        timeout(WAIT, async {
            loop {
                if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(_)) =
                    sub_el.poll().await.unwrap()
                {
                    return;
                }
            }
        })
        .await
        .unwrap();
        took.push(start.elapsed());
    }
    let _ = publ.disconnect().await;
    let _ = sub.disconnect().await;
    took.sort();
    took
}

/// rumqttd's side of the proxied connections gets TCP_NODELAY (inherited from its
/// listening socket), and round trips are free of delayed-ACK stalls. With the fix and
/// its fallback off, the same sockets have Nagle on and the round trips stall: that is
/// the 40 ms defect of BENCHMARKS.md.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn rumqttd_side_of_proxied_connections_has_nodelay() {
    use crate::nodelay::{Mechanism, accepted_nodelay};

    // Client → client messages through rumqttd (as retained ones and those for persistent
    // sessions still go), not directly.
    let (broker, _inbound) = Broker::start_with(settings(), via_rumqttd()).unwrap();
    assert_eq!(broker.nodelay_mechanism(), Mechanism::ListenerNodelay);
    assert_eq!(broker.metrics().internal_listeners_nodelay, 2);
    let internal = broker.internal.addr_of(Version::V4);
    let took = round_trips(broker.local_addr_v4(), "nd-on", 40).await;
    let sides = accepted_nodelay(internal);
    assert!(!sides.is_empty() && sides.iter().all(|&n| n), "{sides:?}");
    let median = took[took.len() / 2];
    assert!(
        median < Duration::from_millis(10),
        "median {median:?}: {took:?}"
    );
    assert_eq!(broker.metrics().upstream_quickack_connections, 0);
    broker.shutdown().await;

    // The defect, for comparison: no NODELAY on rumqttd's side, no fallback.
    let off = Defences {
        listener_nodelay: false,
        upstream_quickack: false,
        ..via_rumqttd()
    };
    let (broker, _inbound) = Broker::start_with(settings(), off).unwrap();
    assert_eq!(broker.nodelay_mechanism(), Mechanism::QuickAck);
    assert_eq!(broker.metrics().internal_listeners_nodelay, 0);
    let internal = broker.internal.addr_of(Version::V4);
    let slow = round_trips(broker.local_addr_v4(), "nd-off", 40).await;
    let sides = accepted_nodelay(internal);
    assert!(!sides.is_empty() && sides.iter().all(|&n| !n), "{sides:?}");
    let worst = slow[slow.len() - 1];
    assert!(
        worst >= Duration::from_millis(30),
        "expected a delayed-ACK stall: {slow:?}"
    );
    broker.shutdown().await;
}

/// The fallback: without TCP_NODELAY on rumqttd's side, re-arming TCP_QUICKACK on the
/// proxy's upstream socket keeps round trips free of delayed-ACK stalls.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn quickack_fallback_avoids_stalls() {
    let fallback = Defences {
        listener_nodelay: false,
        ..via_rumqttd()
    };
    let (broker, _inbound) = Broker::start_with(settings(), fallback).unwrap();
    let took = round_trips(broker.local_addr_v4(), "qa", 40).await;
    assert!(broker.metrics().upstream_quickack_connections >= 1);
    let p90 = took[took.len() * 9 / 10];
    assert!(p90 < Duration::from_millis(10), "p90 {p90:?}: {took:?}");
    broker.shutdown().await;
}

/// A QoS 1 publisher as fast as the broker takes it, towards a QoS 1 subscriber that
/// reads 1 KiB messages slowly (≈ 2 K msg/s). Returns the distinct messages received.
async fn slow_subscriber_scenario(broker: &Broker, n: u32) -> usize {
    use rumqttc::{AsyncClient as C4, Event as E4, MqttOptions as O4, Packet as P4, QoS as Q4};
    let v4 = broker.local_addr_v4();
    let mut o = O4::new("slow-sub", v4.ip().to_string(), v4.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (sub, mut el) = C4::new(o, 64);
    let (tx, mut got) = mpsc::channel::<Option<u32>>(4096);
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(E4::Incoming(P4::ConnAck(_))) => {
                    let _ = tx.send(None).await;
                }
                Ok(E4::Incoming(P4::Publish(p))) => {
                    let seq = u32::from_be_bytes([
                        p.payload[0],
                        p.payload[1],
                        p.payload[2],
                        p.payload[3],
                    ]);
                    if tx.send(Some(seq)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
                Ok(E4::Incoming(P4::SubAck(_))) => {
                    let _ = tx.send(None).await;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    assert_eq!(
        timeout(WAIT, got.recv()).await.unwrap(),
        Some(None),
        "CONNACK"
    );
    sub.subscribe("flow/+", Q4::AtLeastOnce).await.unwrap();
    assert_eq!(
        timeout(WAIT, got.recv()).await.unwrap(),
        Some(None),
        "SUBACK"
    );

    let v5 = broker.local_addr_v5().unwrap();
    let mut o = MqttOptions::new("fast-pub", v5.ip().to_string(), v5.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (publ, mut prx) = client(o);
    next(&mut prx, |p| matches!(p, P5::ConnAck(_)).then_some(()))
        .await
        .unwrap();
    let acks = tokio::spawn(async move {
        let mut acked = 0;
        while acked < n {
            match timeout(Duration::from_secs(30), prx.recv()).await {
                Ok(Some(Some(P5::PubAck(_)))) => acked += 1,
                Ok(Some(Some(_))) => {}
                _ => break,
            }
        }
        acked
    });
    for seq in 0..n {
        let mut payload = vec![0u8; 1024];
        payload[..4].copy_from_slice(&seq.to_be_bytes());
        publ.publish("flow/t", Q5::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    assert_eq!(acks.await.unwrap(), n, "every publish acknowledged");
    let mut seen = std::collections::HashSet::new();
    while let Ok(Some(Some(Some(seq)))) = timeout(Duration::from_secs(2), got.recv())
        .await
        .map(|m| m.map(Some))
    {
        seen.insert(seq);
        if seen.len() == n as usize {
            break;
        }
    }
    seen.len()
}

/// rumqttd acknowledges QoS 1 publishes it later drops for a subscriber that lags by
/// more than its commit log; the proxy's flow control holds the publisher instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_slow_subscriber_loses_nothing_with_flow_control() {
    let n = 3000;
    let (broker, _inbound) = Broker::start(settings()).unwrap();
    let got = slow_subscriber_scenario(&broker, n).await;
    assert_eq!(got, n as usize, "acknowledged QoS 1 messages were lost");
    assert!(
        broker.metrics().qos1_flow_waits > 0,
        "the publisher was never held"
    );
    assert_eq!(
        broker.metrics().qos1_flow_resyncs,
        0,
        "the meter drifted: a wait timed out"
    );
    broker.shutdown().await;

    let off = Defences {
        qos1_flow_control: false,
        ..Defences::default()
    };
    let (broker, _inbound) = Broker::start_with(settings(), off).unwrap();
    let got = slow_subscriber_scenario(&broker, n).await;
    assert!(
        got < n as usize,
        "expected rumqttd to drop acknowledged messages without flow control ({got}/{n})"
    );
    broker.shutdown().await;
}

/// Reads one MQTT frame (fixed header + body) from `s`; returns its first byte.
async fn read_frame(s: &mut tokio::net::TcpStream) -> u8 {
    read_whole_frame(s).await.0
}

/// A client subscribes to its reply topic and submits at once, without waiting for the
/// SUBACK, through a proxy whose upstream is a stand-in for rumqttd that withholds the
/// SUBACK. Returns whether the node got the submit while the SUBACK was withheld, and
/// whether it got it once the SUBACK was sent.
async fn submit_while_suback_withheld(defences: Defences) -> (bool, bool) {
    let (broker, mut inbound) = Broker::start_with(settings(), defences).unwrap();
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut ep = broker.internal.endpoints.borrow().clone();
    ep.v5.addr = fake.local_addr().unwrap();
    ep.v5.quickack = false;
    broker.internal.endpoints.send(ep).unwrap();
    let upstream = tokio::spawn(async move {
        let (mut s, _) = fake.accept().await.unwrap();
        assert_eq!(read_frame(&mut s).await >> 4, 1, "CONNECT");
        s.write_all(&[0x20, 3, 0, 0, 0]).await.unwrap(); // CONNACK v5, no properties
        assert_eq!(read_frame(&mut s).await >> 4, 8, "SUBSCRIBE");
        s
    });
    let addr = broker.local_addr_v5().unwrap();
    let (c, _rx) = connected(addr, "req").await;
    c.subscribe("fedmesh/v1/client/req/reply/1", Q5::AtLeastOnce)
        .await
        .unwrap();
    c.publish("fedmesh/v1/client/req/submit", Q5::AtLeastOnce, false, "x")
        .await
        .unwrap();
    let mut s = upstream.await.unwrap();
    let early = timeout(Duration::from_millis(300), inbound.recv())
        .await
        .is_ok();
    // SUBACK for packet id 1, no properties, granted QoS 1.
    s.write_all(&[0x90, 4, 0, 1, 0, 1]).await.unwrap();
    let after = early || timeout(WAIT, inbound.recv()).await.is_ok();
    drop(s);
    broker.shutdown().await;
    (early, after)
}

#[tokio::test]
async fn a_submit_waits_for_the_suback_of_the_subscription_before_it() {
    // The proxy hands node-bound PUBLISHes to the node directly while SUBSCRIBEs go to
    // rumqttd, and the node answers through rumqttd: without holding the PUBLISH until
    // rumqttd acknowledged the SUBSCRIBE, the answer could be published before the
    // subscription exists, and be lost.
    assert_eq!(
        submit_while_suback_withheld(Defences::default()).await,
        (false, true)
    );
    let off = Defences {
        node_publish_after_suback: false,
        ..Defences::default()
    };
    assert_eq!(submit_while_suback_withheld(off).await, (true, true));
}

/// A held message reaches no client before it is released, whether it travels through
/// rumqttd (held at the proxy's gate) or directly (queued until the release).
async fn held_scenario(defences: Defences) -> Broker {
    let (broker, _inbound) = Broker::start_with(settings(), defences).unwrap();
    let addr = broker.local_addr_v5().unwrap();
    let (c, mut rx) = connected(addr, "held").await;
    c.subscribe("fedmesh/v1/client/held/reply/#", Q5::AtLeastOnce)
        .await
        .unwrap();
    next(&mut rx, |p| matches!(p, P5::SubAck(_)).then_some(())).await;
    let msg = |topic: &str, payload: &'static [u8]| crate::Outbound {
        topic: topic.to_owned(),
        payload: bytes::Bytes::from_static(payload),
        qos: crate::Qos::AtLeastOnce,
        retain: false,
        correlation_data: None,
    };
    let held = broker
        .publish_held(msg("fedmesh/v1/client/held/reply/1", b"durable later"))
        .unwrap();
    let early = timeout(
        Duration::from_millis(300),
        next(&mut rx, |p| matches!(p, P5::Publish(_)).then_some(())),
    )
    .await;
    assert!(early.is_err(), "a held message reached the client");
    broker.release([held]);
    let topic = next(&mut rx, |p| match p {
        P5::Publish(p) => Some(p.topic),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(&topic[..], b"fedmesh/v1/client/held/reply/1");
    // Nothing held: messages flow as usual, and the gate is empty again.
    broker
        .publish(msg("fedmesh/v1/client/held/reply/2", b"now"))
        .unwrap();
    let topic = next(&mut rx, |p| match p {
        P5::Publish(p) => Some(p.topic),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(&topic[..], b"fedmesh/v1/client/held/reply/2");
    assert!(broker.gate.is_empty());
    broker
}

#[tokio::test]
async fn a_held_message_reaches_no_client_before_it_is_released() {
    let direct = held_scenario(Defences::default()).await;
    let m = direct.metrics();
    assert_eq!((m.direct_delivered, m.held_waits), (2, 0), "{m:?}");
    direct.shutdown().await;
    let relayed = held_scenario(Defences {
        direct_delivery: false,
        ..Defences::default()
    })
    .await;
    let m = relayed.metrics();
    assert_eq!((m.direct_delivered, m.held_waits), (0, 1), "{m:?}");
    relayed.shutdown().await;
}

/// Reads one MQTT frame from `s`: (first byte, body).
async fn read_whole_frame(s: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    let first = s.read_u8().await.unwrap();
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = s.read_u8().await.unwrap();
        len |= usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await.unwrap();
    (first, body)
}

/// The defences, with clients' messages to each other relayed by rumqttd, not directly.
fn via_rumqttd() -> Defences {
    Defences {
        direct_relay: false,
        ..Defences::default()
    }
}

fn node_msg(topic: &str, payload: String) -> crate::Outbound {
    crate::Outbound {
        topic: topic.to_owned(),
        payload: bytes::Bytes::from(payload),
        qos: crate::Qos::AtLeastOnce,
        retain: false,
        correlation_data: None,
    }
}

#[tokio::test]
async fn direct_and_relayed_qos1_messages_share_a_connection() {
    // The node's messages to a principal's own topics go to its connection directly, with
    // packet ids above rumqttd's; other messages come through rumqttd on the same
    // connection. The client acknowledges both kinds: if an acknowledgement of a direct
    // message reached rumqttd (whose in-flight window is 100 and which does not take
    // out-of-order acks), or one of rumqttd's were kept from it, rumqttd would stop.
    let (broker, _inbound) = Broker::start_with(settings(), via_rumqttd()).unwrap();
    let addr = broker.local_addr_v5().unwrap();
    let (c, mut rx) = connected(addr, "mix").await;
    for f in ["fedmesh/v1/client/mix/inbox", "t/mix"] {
        c.subscribe(f, Q5::AtLeastOnce).await.unwrap();
        next(&mut rx, |p| matches!(p, P5::SubAck(_)).then_some(()))
            .await
            .unwrap();
    }
    let (publ, _prx) = connected(addr, "other").await;
    let n = 150;
    let (mut direct, mut relayed, mut direct_ids) = (Vec::new(), Vec::new(), 0);
    for group in 0..n / 10 {
        for i in group * 10..group * 10 + 10 {
            // The sixth of each ten is retained, so it must go through rumqttd (which
            // stores it), and the four after it must not overtake it by going direct.
            let mut msg = node_msg("fedmesh/v1/client/mix/inbox", format!("n{i}"));
            msg.retain = i % 10 == 5;
            broker.publish(msg).unwrap();
            publ.publish("t/mix", Q5::AtLeastOnce, false, format!("r{i}"))
                .await
                .unwrap();
        }
        while direct.len() + relayed.len() < 2 * (group + 1) * 10 {
            let p = next(&mut rx, |p| match p {
                P5::Publish(p) => Some(p),
                _ => None,
            })
            .await
            .expect("a message went missing");
            let payload = String::from_utf8(p.payload.to_vec()).unwrap();
            if p.topic == "t/mix" {
                assert!(p.pkid <= crate::direct::RUMQTTD_MAX_PKID);
                relayed.push(payload);
            } else {
                direct_ids += usize::from(p.pkid > crate::direct::RUMQTTD_MAX_PKID);
                direct.push(payload);
            }
        }
    }
    // Each kind in order, also where the node's messages switched between the two paths.
    assert_eq!(direct, (0..n).map(|i| format!("n{i}")).collect::<Vec<_>>());
    assert_eq!(relayed, (0..n).map(|i| format!("r{i}")).collect::<Vec<_>>());
    let m = broker.metrics();
    assert_eq!(m.direct_delivered, direct_ids as u64, "{m:?}");
    assert_eq!(m.direct_delivered + m.direct_fallbacks, n as u64, "{m:?}");
    assert!(m.direct_delivered >= n as u64 / 2, "{m:?}");
    assert_eq!(m.direct_pkid_conflicts, 0);
    broker.shutdown().await;
}

#[tokio::test]
async fn a_client_that_only_acknowledges_direct_messages_stays_connected() {
    // Keep Alive 2 s: rumqttd closes a connection it heard nothing from for 3 s. This client
    // sends nothing but PUBACKs for the node's direct messages and submits to the node, which
    // the proxy both keeps from rumqttd, and no PINGREQ (it need not: it is sending packets).
    // The proxy pings rumqttd for it.
    let (broker, _inbound) = Broker::start_with(settings(), Defences::default()).unwrap();
    let mut s = tokio::net::TcpStream::connect(broker.local_addr_v4())
        .await
        .unwrap();
    // CONNECT v3.1.1, clean session, Keep Alive 2, client id "ka".
    s.write_all(&[
        0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 2, 0, 2, b'k', b'a',
    ])
    .await
    .unwrap();
    assert_eq!(read_whole_frame(&mut s).await.0, 0x20, "CONNACK");
    let filter = b"fedmesh/v1/client/ka/inbox";
    let mut sub = vec![
        0x82,
        (2 + 2 + filter.len() + 1) as u8,
        0,
        1,
        0,
        filter.len() as u8,
    ];
    sub.extend_from_slice(filter);
    sub.push(1);
    s.write_all(&sub).await.unwrap();
    assert_eq!(read_whole_frame(&mut s).await.0, 0x90, "SUBACK");
    let start = tokio::time::Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_millis(4500) {
        broker
            .publish(node_msg("fedmesh/v1/client/ka/inbox", format!("{i}")))
            .unwrap();
        let (first, body) = timeout(WAIT, read_whole_frame(&mut s)).await.unwrap();
        assert_eq!(first, 0x32, "a QoS 1 PUBLISH");
        let at = 2 + usize::from(u16::from_be_bytes([body[0], body[1]]));
        s.write_all(&[0x40, 2, body[at], body[at + 1]])
            .await
            .unwrap();
        if i % 2 == 0 {
            // A QoS 0 submit to the node, which the proxy keeps from rumqttd too.
            let topic = b"fedmesh/v1/client/ka/submit";
            let mut p = vec![0x30, (2 + topic.len() + 2) as u8, 0, topic.len() as u8];
            p.extend_from_slice(topic);
            p.extend_from_slice(b"{}");
            s.write_all(&p).await.unwrap();
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Still connected: rumqttd kept the connection past 1.5 × Keep Alive.
    broker
        .publish(node_msg("fedmesh/v1/client/ka/inbox", "last".into()))
        .unwrap();
    let (first, body) = timeout(WAIT, read_whole_frame(&mut s)).await.unwrap();
    assert_eq!(first, 0x32);
    assert!(body.ends_with(b"last"));
    assert!(broker.metrics().direct_delivered >= 10);
    assert!(broker.metrics().direct_kept >= 5);
    broker.shutdown().await;
}

#[tokio::test]
async fn the_proxy_answers_node_api_publishes_nobody_else_can_receive() {
    // A submit reaches the node from the proxy; when no connection of the principal
    // subscribes to the topic, rumqttd has nobody to give it to, so the proxy acknowledges it
    // itself. Once the principal subscribes to its own namespace, rumqttd must see it again
    // (the client gets its own message back, as MQTT 3.1.1 and rumqttd do).
    let (broker, mut inbound) = Broker::start_with(settings(), Defences::default()).unwrap();
    let addr = broker.local_addr_v5().unwrap();
    let (c, mut rx) = connected(addr, "api").await;
    let submit = "fedmesh/v1/client/api/submit";
    c.publish(submit, Q5::AtLeastOnce, false, "one")
        .await
        .unwrap();
    next(&mut rx, |p| matches!(p, P5::PubAck(_)).then_some(()))
        .await
        .expect("PUBACK");
    let got = timeout(WAIT, inbound.recv()).await.unwrap().unwrap();
    assert_eq!(&got.payload[..], b"one");
    assert_eq!(broker.metrics().direct_kept, 1);

    c.subscribe("fedmesh/v1/client/api/#", Q5::AtLeastOnce)
        .await
        .unwrap();
    next(&mut rx, |p| matches!(p, P5::SubAck(_)).then_some(()))
        .await
        .unwrap();
    c.publish(submit, Q5::AtLeastOnce, false, "two")
        .await
        .unwrap();
    let echo = next(&mut rx, |p| match p {
        P5::Publish(p) => Some(p.payload),
        _ => None,
    })
    .await
    .expect("the client's own message back from rumqttd");
    assert_eq!(&echo[..], b"two");
    let got = timeout(WAIT, inbound.recv()).await.unwrap().unwrap();
    assert_eq!(&got.payload[..], b"two");
    assert_eq!(broker.metrics().direct_kept, 1);
    broker.shutdown().await;
}

/// A raw MQTT 3.1.1 connection with client id `id`, once its CONNACK is in.
async fn raw_v4(addr: SocketAddr, id: &str, clean: bool, keep_alive: u16) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut c = vec![
        0x10,
        (10 + 2 + id.len()) as u8,
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
    ];
    c.push(if clean { 0x02 } else { 0 });
    c.extend_from_slice(&keep_alive.to_be_bytes());
    c.extend_from_slice(&(id.len() as u16).to_be_bytes());
    c.extend_from_slice(id.as_bytes());
    s.write_all(&c).await.unwrap();
    let (first, body) = read_whole_frame(&mut s).await;
    assert_eq!((first, body[1]), (0x20, 0), "CONNACK accepted");
    s
}

async fn raw_subscribe(s: &mut tokio::net::TcpStream, pkid: u16, filter: &str, qos: u8) {
    let mut f = vec![0x82, (2 + 2 + filter.len() + 1) as u8];
    f.extend_from_slice(&pkid.to_be_bytes());
    f.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    f.extend_from_slice(filter.as_bytes());
    f.push(qos);
    s.write_all(&f).await.unwrap();
    let (first, body) = read_whole_frame(s).await;
    assert_eq!(first, 0x90, "SUBACK");
    assert_eq!(body[2], qos, "granted");
}

/// A PUBLISH frame (MQTT 3.1.1; `pkid` for QoS 1).
fn raw_publish(topic: &str, pkid: Option<u16>, retain: bool, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    if let Some(id) = pkid {
        body.extend_from_slice(&id.to_be_bytes());
    }
    body.extend_from_slice(payload);
    let mut f = vec![0x30 | if pkid.is_some() { 0x02 } else { 0 } | u8::from(retain)];
    assert!(body.len() < 128);
    f.push(body.len() as u8);
    f.extend_from_slice(&body);
    f
}

/// (topic, payload) of a PUBLISH body received by a 3.1.1 client; acknowledges QoS 1.
async fn raw_receive(s: &mut tokio::net::TcpStream) -> (String, String) {
    loop {
        let (first, body) = timeout(WAIT, read_whole_frame(s))
            .await
            .expect("a PUBLISH in time");
        if first >> 4 != 3 {
            continue;
        }
        let tl = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let topic = String::from_utf8(body[2..2 + tl].to_vec()).unwrap();
        let mut at = 2 + tl;
        if first & 0x06 != 0 {
            s.write_all(&[0x40, 2, body[at], body[at + 1]])
                .await
                .unwrap();
            at += 2;
        }
        return (topic, String::from_utf8(body[at..].to_vec()).unwrap());
    }
}

#[tokio::test]
async fn client_messages_go_directly_and_stay_in_order_when_some_go_through_rumqttd() {
    // A publisher and a QoS 1 wildcard subscriber: messages go from the publisher's proxy
    // task into the subscriber's connection. The sixth of every ten is retained, so it goes
    // through rumqttd (which stores it); the direct ones after it must not overtake it.
    let (broker, _inbound) = Broker::start_with(settings(), Defences::default()).unwrap();
    let addr = broker.local_addr_v4();
    let mut sub = raw_v4(addr, "rs", true, 30).await;
    raw_subscribe(&mut sub, 1, "r/#", 1).await;
    let mut publ = raw_v4(addr, "rp", true, 30).await;
    let (mut got, mut acks) = (Vec::new(), Vec::new());
    // QoS 0 first, then QoS 1 (whose PUBACKs must keep the PUBLISHes' order too, though
    // the proxy acknowledges the direct ones and rumqttd the others).
    for qos1 in [false, true] {
        for group in 0..20u16 {
            let mut burst = Vec::new();
            for i in group * 10 + 1..=group * 10 + 10 {
                let pkid = qos1.then_some(i);
                burst.extend(raw_publish(
                    "r/x",
                    pkid,
                    i % 10 == 6,
                    format!("{i}").as_bytes(),
                ));
            }
            publ.write_all(&burst).await.unwrap();
            for _ in 0..10 {
                let (topic, payload) = raw_receive(&mut sub).await;
                assert_eq!(topic, "r/x");
                got.push(payload.parse::<u16>().unwrap());
            }
            while qos1 && acks.len() < usize::from(group * 10 + 10) {
                let (first, body) = timeout(WAIT, read_whole_frame(&mut publ)).await.unwrap();
                assert_eq!(first, 0x40, "PUBACK");
                acks.push(u16::from_be_bytes([body[0], body[1]]));
            }
        }
        let m = broker.metrics();
        assert_eq!(got, (1..=200).collect::<Vec<_>>(), "qos1: {qos1}, {m:?}");
        assert!(m.relay_delivered >= 50, "qos1: {qos1}, {m:?}");
        assert!(m.relay_fallbacks >= 20, "qos1: {qos1}, {m:?}");
        got.clear();
    }
    assert_eq!(acks, (1..=200).collect::<Vec<_>>());
    // PUBACK order across topics: `q/s` goes through rumqttd (a shared subscription), and
    // the `r/x` after each must not be acknowledged (directly) before it.
    let mut shared = raw_v4(addr, "rq", true, 30).await;
    raw_subscribe(&mut shared, 1, "$share/g/q/#", 1).await;
    let mut burst = Vec::new();
    for i in 1..=50u16 {
        let topic = if i % 2 == 1 { "q/s" } else { "r/x" };
        burst.extend(raw_publish(
            topic,
            Some(i),
            false,
            format!("{i}").as_bytes(),
        ));
    }
    publ.write_all(&burst).await.unwrap();
    acks.clear();
    while acks.len() < 50 {
        let (first, body) = timeout(WAIT, read_whole_frame(&mut publ)).await.unwrap();
        assert_eq!(first, 0x40, "PUBACK");
        acks.push(u16::from_be_bytes([body[0], body[1]]));
    }
    assert_eq!(acks, (1..=50).collect::<Vec<_>>());
    for (s, first) in [(&mut shared, 1), (&mut sub, 2)] {
        let mut got = Vec::new();
        while got.len() < 25 {
            got.push(raw_receive(s).await.1.parse::<u16>().unwrap());
        }
        assert_eq!(got, (first..=50).step_by(2).collect::<Vec<_>>());
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn a_persistent_subscriber_gets_what_was_published_while_it_was_away() {
    // rumqttd keeps an absent persistent session's subscriptions and queues: messages for
    // it must go through rumqttd even though no connection subscribes right now.
    let (broker, _inbound) = Broker::start_with(settings(), Defences::default()).unwrap();
    let addr = broker.local_addr_v4();
    let mut away = raw_v4(addr, "away", false, 30).await;
    raw_subscribe(&mut away, 1, "away/#", 1).await;
    away.write_all(&[0xe0, 0]).await.unwrap(); // DISCONNECT
    drop(away);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut publ = raw_v4(addr, "ap", true, 30).await;
    for i in 1..=5u16 {
        publ.write_all(&raw_publish(
            "away/x",
            Some(i),
            false,
            format!("{i}").as_bytes(),
        ))
        .await
        .unwrap();
        assert_eq!(read_frame(&mut publ).await, 0x40, "PUBACK");
    }
    // A topic nobody subscribes to: the proxy acknowledges it and drops it.
    publ.write_all(&raw_publish("nobody/x", Some(6), false, b"6"))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut publ).await, 0x40, "PUBACK");
    let mut back = raw_v4(addr, "away", false, 30).await;
    let mut got = Vec::new();
    for _ in 1..=5 {
        got.push(raw_receive(&mut back).await.1);
    }
    assert_eq!(got, ["1", "2", "3", "4", "5"]);
    let m = broker.metrics();
    assert_eq!(m.relay_unsubscribed, 1, "{m:?}");
    assert_eq!(m.relay_delivered, 0, "{m:?}");
    broker.shutdown().await;
}

#[tokio::test]
async fn a_publisher_whose_messages_all_go_directly_stays_connected() {
    // Keep Alive 2 s: rumqttd closes a connection it heard nothing from for 3 s. This client
    // only publishes QoS 0 messages that go directly (it need not ping while it sends), so
    // the proxy pings rumqttd for it.
    let (broker, _inbound) = Broker::start_with(settings(), Defences::default()).unwrap();
    let addr = broker.local_addr_v4();
    let mut sub = raw_v4(addr, "ka-sub", true, 30).await;
    raw_subscribe(&mut sub, 1, "ka/x", 0).await;
    let mut publ = raw_v4(addr, "ka-pub", true, 2).await;
    let start = tokio::time::Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_millis(4500) {
        publ.write_all(&raw_publish("ka/x", None, false, format!("{i}").as_bytes()))
            .await
            .unwrap();
        assert_eq!(raw_receive(&mut sub).await.1, format!("{i}"));
        i += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Still connected: a QoS 1 publish (which rumqttd acknowledges, as a PUBLISH at rumqttd
    // goes first) gets its PUBACK.
    publ.write_all(&raw_publish("ka/x", Some(1), true, b"last"))
        .await
        .unwrap();
    assert_eq!(
        timeout(WAIT, read_frame(&mut publ)).await.unwrap(),
        0x40,
        "PUBACK"
    );
    assert_eq!(raw_receive(&mut sub).await.1, "last");
    assert!(broker.metrics().relay_delivered >= 15);
    broker.shutdown().await;
}

#[tokio::test]
async fn v5_properties_and_shared_subscriptions_go_through_rumqttd() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let (broker, _inbound) = Broker::start_with(settings(), Defences::default()).unwrap();
    let addr = broker.local_addr_v5().unwrap();
    let (sub, mut rx) = connected(addr, "props-sub").await;
    sub.subscribe("p/x", Q5::AtLeastOnce).await.unwrap();
    next(&mut rx, |p| matches!(p, P5::SubAck(_)).then_some(()))
        .await
        .unwrap();
    let (publ, _prx) = connected(addr, "props-pub").await;
    let props = PublishProperties {
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("text/plain".into()),
        ..PublishProperties::default()
    };
    publ.publish_with_properties("p/x", Q5::AtLeastOnce, false, "with", props)
        .await
        .unwrap();
    publ.publish("p/x", Q5::AtLeastOnce, false, "without")
        .await
        .unwrap();
    let with = next(&mut rx, |p| match p {
        P5::Publish(p) => Some(p),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(&with.payload[..], b"with");
    let got = with.properties.unwrap_or_default();
    assert_eq!(got.user_properties, vec![("k".to_owned(), "v".to_owned())]);
    assert_eq!(got.content_type.as_deref(), Some("text/plain"));
    let without = next(&mut rx, |p| match p {
        P5::Publish(p) => Some(p),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(&without.payload[..], b"without");
    // A shared subscription: rumqttd picks the member, so everything on it goes there.
    sub.subscribe("$share/g/s/x", Q5::AtLeastOnce)
        .await
        .unwrap();
    next(&mut rx, |p| matches!(p, P5::SubAck(_)).then_some(()))
        .await
        .unwrap();
    let before = broker.metrics().relay_fallbacks;
    publ.publish("s/x", Q5::AtLeastOnce, false, "shared")
        .await
        .unwrap();
    let shared = next(&mut rx, |p| match p {
        P5::Publish(p) => Some(p),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(&shared.payload[..], b"shared");
    assert!(broker.metrics().relay_fallbacks > before);
    broker.shutdown().await;
}

#[tokio::test]
async fn direct_delivery_can_be_switched_off() {
    // `mqtt.direct_delivery = false`: everything passes through rumqttd.
    let mut s = settings();
    s.direct_delivery = false;
    let (broker, _inbound) = Broker::start_with(s, Defences::default()).unwrap();
    let addr = broker.local_addr_v4();
    let mut sub = raw_v4(addr, "off-sub", true, 30).await;
    raw_subscribe(&mut sub, 1, "off/#", 1).await;
    let mut publ = raw_v4(addr, "off-pub", true, 30).await;
    publ.write_all(&raw_publish("off/x", Some(1), false, b"x"))
        .await
        .unwrap();
    assert_eq!(raw_receive(&mut sub).await.1, "x");
    broker
        .publish(node_msg("fedmesh/v1/client/off-sub/inbox", "n".into()))
        .unwrap();
    let m = broker.metrics();
    assert_eq!(
        (m.relay_delivered, m.relay_fallbacks, m.direct_delivered),
        (0, 0, 0),
        "{m:?}"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn a_new_subscriber_gets_the_retained_message_before_direct_ones() {
    // rumqttd sends the retained messages a subscription matches after its SUBACK. A direct
    // message published in between must not overtake them: the subscriber would take an
    // old retained value for the newest. The subscriber's upstream is a stand-in for rumqttd
    // that sends the retained message 300 ms after the SUBACK.
    let (broker, _inbound) = Broker::start_with(settings(), Defences::default()).unwrap();
    let mut publ = raw_v4(broker.local_addr_v4(), "ret-pub", true, 30).await;
    publ.write_all(&raw_publish("r/t", None, true, b"old"))
        .await
        .unwrap();
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut ep = broker.internal.endpoints.borrow().clone();
    ep.v5.addr = fake.local_addr().unwrap();
    ep.v5.quickack = false;
    broker.internal.endpoints.send(ep).unwrap();
    let upstream = tokio::spawn(async move {
        let (mut s, body) = loop {
            let (mut s, _) = fake.accept().await.unwrap();
            assert_eq!(read_frame(&mut s).await >> 4, 1, "CONNECT");
            s.write_all(&[0x20, 3, 0, 0, 0]).await.unwrap(); // CONNACK v5, no properties
            let (first, body) = read_whole_frame(&mut s).await;
            // The watchdog's probes connect here too, and disconnect.
            if first >> 4 == 8 {
                break (s, body);
            }
        };
        // SUBACK: the SUBSCRIBE's packet id, no properties, QoS 0 granted.
        s.write_all(&[0x90, 4, body[0], body[1], 0, 0])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The retained message: QoS 0, RETAIN, topic r/t, no properties.
        s.write_all(&[0x31, 9, 0, 3, b'r', b'/', b't', 0, b'o', b'l', b'd'])
            .await
            .unwrap();
        s
    });
    let (sub, mut rx) = connected(broker.local_addr_v5().unwrap(), "ret-sub").await;
    sub.subscribe("r/#", Q5::AtMostOnce).await.unwrap();
    next(&mut rx, |p| matches!(p, P5::SubAck(_)).then_some(()))
        .await
        .unwrap();
    publ.write_all(&raw_publish("r/t", None, false, b"new"))
        .await
        .unwrap();
    let first = next(&mut rx, |p| match p {
        P5::Publish(p) => Some(p),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(
        (&first.payload[..], first.retain),
        (&b"old"[..], true),
        "the retained message first"
    );
    drop(upstream.await.unwrap());
    broker.shutdown().await;
}
