//! No client can take a listener down (issue #6).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The NOTES reproduction (`mosquitto_pub -i 'a/b'` twice) killed rumqttd's listener:
/// every later client was refused. Through the proxy each gets CONNACK 0x02, twice, and
/// the listener keeps serving.
#[tokio::test]
async fn refused_client_ids_twice_in_a_row() {
    let (broker, _inbound) = start(settings());
    for addr in [broker.local_addr_v4(), broker.local_addr_v5().unwrap()] {
        for id in ["a/b", "a+b", "a$b", "a#b", "$SYS", "x/+/#"] {
            for level in [4u8, 5] {
                for _ in 0..2 {
                    let (code, _s) = raw_connack(addr, &raw_connect(level, id, 30, None)).await;
                    let expected = if level == 4 { 0x02 } else { 0x85 };
                    assert_eq!(code, Some(expected), "id {id:?} level {level}");
                }
            }
        }
        assert_serves(addr).await;
    }
    assert_eq!(broker.metrics().connects_refused_bad_id, 2 * 6 * 2 * 2);
    broker.shutdown().await;
}

#[tokio::test]
async fn repeated_reconnects_with_a_refused_id() {
    let (broker, _inbound) = start(settings());
    let addr = broker.local_addr_v4();
    for _ in 0..30 {
        let (code, _s) = raw_connack(addr, &raw_connect(4, "org/unit/agent", 30, None)).await;
        assert_eq!(code, Some(0x02));
    }
    // And a rumqttc client with such an id is refused with the right code.
    let mut c = v4_client(v4_options(addr, "a/b", None));
    let e = c.connected().await.unwrap_err();
    assert!(
        matches!(
            e,
            rumqttc::ConnectionError::ConnectionRefused(rumqttc::ConnectReturnCode::BadClientId)
        ),
        "{e:?}"
    );
    assert_serves(addr).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn connection_limit_refusals() {
    let mut s = settings();
    s.max_connections = 3;
    let (broker, _inbound) = start(s);
    let addr = broker.local_addr_v4();
    let mut held = Vec::new();
    for i in 0..3 {
        let (code, sock) =
            raw_connack(addr, &raw_connect(4, &format!("holder{i}"), 30, None)).await;
        assert_eq!(code, Some(0));
        held.push(sock);
    }
    // Over the limit: refused by the proxy (rumqttd never sees them), again and again,
    // with the same client id (the stale-will path if rumqttd had refused them).
    for level in [4u8, 5] {
        for _ in 0..5 {
            let (code, _s) = raw_connack(addr, &raw_connect(level, "same-id", 30, None)).await;
            assert_eq!(code, Some(if level == 4 { 0x03 } else { 0x89 }));
        }
    }
    assert_eq!(broker.metrics().connects_refused_limit, 10);
    held.pop();
    assert!(eventually(|| broker.metrics().connections_active < 3).await);
    // That very client id works now.
    assert_serves_as(addr, "same-id", None).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn silent_connection_times_out_while_others_are_served() {
    let mut s = settings();
    s.connect_timeout = Duration::from_millis(400);
    let (broker, _inbound) = start(s);
    let addr = broker.local_addr_v4();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // Others are served meanwhile.
    assert_serves(addr).await;
    assert!(
        closed_by_server(&mut silent).await,
        "silent socket must be closed"
    );
    assert_eq!(broker.metrics().connects_refused_timeout, 1);
    assert_serves(addr).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn garbage_instead_of_mqtt() {
    let (broker, _inbound) = start(settings());
    let addr = broker.local_addr_v4();
    let garbage: [&[u8]; 5] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        &[0x10, 0xff, 0xff, 0xff, 0xff, 0xff], // remaining length > 4 bytes
        &[0x10, 0xff, 0xff, 0xff, 0x7f],       // 256 MiB CONNECT
        &[0x10, 0x03, 0x00, 0x01, b'x'],       // truncated protocol name
        &[0x30, 0x05, 0, 1, b'a', b'b', b'c'], // PUBLISH before CONNECT
    ];
    for g in garbage {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(g).await.unwrap();
        assert!(closed_by_server(&mut s).await, "{g:?}");
    }
    assert_eq!(
        broker.metrics().connects_refused_garbage,
        garbage.len() as u64
    );

    // Garbage after a valid CONNECT closes that connection only.
    let (code, mut s) = raw_connack(addr, &raw_connect(4, "junk-after", 30, None)).await;
    assert_eq!(code, Some(0));
    s.write_all(&[0x00, 0x00, 0xde, 0xad]).await.unwrap();
    assert!(closed_by_server(&mut s).await);
    assert!(eventually(|| broker.metrics().protocol_errors == 1).await);

    // An MQTT 3.1 client gets "unacceptable protocol version".
    let mut v3 = raw_connect(4, "old", 30, None);
    v3.splice(2..8, [0u8, 6, b'M', b'Q', b'I', b's', b'd', b'p']);
    v3[1] += 2;
    v3[10] = 3;
    let (code, _s) = raw_connack(addr, &v3).await;
    assert_eq!(code, Some(0x01));

    assert_serves(addr).await;
    broker.shutdown().await;
}

/// rumqttd closes Keep Alive 0 connections without a CONNACK; the proxy accepts them.
#[tokio::test]
async fn keep_alive_zero_is_accepted() {
    let (broker, _inbound) = start(settings());
    for (addr, level) in [
        (broker.local_addr_v4(), 4u8),
        (broker.local_addr_v5().unwrap(), 5),
    ] {
        let (code, _s) = raw_connack(addr, &raw_connect(level, "ka0", 0, None)).await;
        assert_eq!(code, Some(0), "level {level}");
    }
    let mut o = v4_options(broker.local_addr_v4(), "ka0-rumqttc", None);
    o.set_keep_alive(Duration::ZERO);
    let mut c = v4_client(o);
    c.connected().await.unwrap();
    broker.shutdown().await;
}

/// Oversized publishes close the connection; the listener keeps serving.
#[tokio::test]
async fn oversized_publish_closes_only_that_connection() {
    let (broker, _inbound) = start(settings());
    let addr = broker.local_addr_v4();
    let (code, mut s) = raw_connack(addr, &raw_connect(4, "big", 30, None)).await;
    assert_eq!(code, Some(0));
    let payload = 64 * 1024 + 1;
    let remaining = 2 + 1 + payload;
    let mut frame = vec![0x30];
    let mut len = remaining;
    loop {
        let mut b = (len & 0x7f) as u8;
        len >>= 7;
        if len > 0 {
            b |= 0x80;
        }
        frame.push(b);
        if len == 0 {
            break;
        }
    }
    frame.extend_from_slice(&[0, 1, b't']);
    frame.resize(frame.len() + payload, 0);
    let _ = s.write_all(&frame).await;
    assert!(closed_by_server(&mut s).await);
    assert_serves(addr).await;
    broker.shutdown().await;
}

/// Reconnecting with the same client id while the old connection is still closing used
/// to race inside rumqttd (a stale disconnect for a reused router slot killed the new
/// connection before its CONNACK). The proxy serialises connections per client id.
#[tokio::test]
async fn rapid_reconnects_and_takeovers_with_one_client_id() {
    let (broker, _inbound) = start(settings());
    let addrs = [broker.local_addr_v4(), broker.local_addr_v5().unwrap()];
    for i in 0..20 {
        let level = if i % 2 == 0 { 4u8 } else { 5 };
        let (code, s) = raw_connack(addrs[i % 2], &raw_connect(level, "dup", 30, None)).await;
        assert_eq!(code, Some(0), "attempt {i}");
        drop(s);
    }
    // A live connection is taken over by a new one with the same id (MQTT semantics).
    let (code, mut old) = raw_connack(addrs[1], &raw_connect(5, "dup", 30, None)).await;
    assert_eq!(code, Some(0));
    let (code, _new) = raw_connack(addrs[1], &raw_connect(5, "dup", 30, None)).await;
    assert_eq!(code, Some(0));
    assert!(
        closed_by_server(&mut old).await,
        "the old connection is closed"
    );
    assert_serves_as(addrs[0], "dup", None).await;
    assert_eq!(broker.metrics().connects_refused_unavailable, 0);
    broker.shutdown().await;
}

#[tokio::test]
async fn empty_client_ids() {
    let (broker, _inbound) = start(settings());
    let (v4, v5) = (broker.local_addr_v4(), broker.local_addr_v5().unwrap());
    // 3.1.1: an empty id needs a clean session.
    let mut c = raw_connect(4, "", 30, None);
    c[9] = 0x00;
    let (code, _s) = raw_connack(v4, &c).await;
    assert_eq!(code, Some(0x02));
    let (code, _s) = raw_connack(v4, &raw_connect(4, "", 30, None)).await;
    assert_eq!(code, Some(0));
    // 5: the proxy assigns an id and says so in the CONNACK.
    let mut s = TcpStream::connect(v5).await.unwrap();
    s.write_all(&raw_connect(5, "", 30, None)).await.unwrap();
    let mut buf = vec![0u8; 256];
    let mut got = Vec::new();
    while got.len() < 2 || got.len() < 2 + got[1] as usize {
        use tokio::io::AsyncReadExt;
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "CONNACK expected");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got[3], 0, "success");
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("anon-"),
        "assigned client identifier in {got:?}"
    );
    broker.shutdown().await;
}

/// A PUBLISH (v4, or v5 with no properties) with QoS 1 and packet id `pkid`.
fn raw_publish_qos1(level: u8, topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&pkid.to_be_bytes());
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    assert!(body.len() < 128, "one-byte remaining length");
    let mut out = vec![0x32, body.len() as u8];
    out.extend_from_slice(&body);
    out
}

/// Reads from `s` until `got` holds a complete frame (one-byte remaining lengths only);
/// returns it.
async fn read_frame(s: &mut TcpStream, got: &mut Vec<u8>) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 512];
    while got.len() < 2 || got.len() < 2 + usize::from(got[1]) {
        assert!(got.len() < 2 || got[1] < 0x80, "short frames only");
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("frame in time")
            .expect("read");
        assert!(n > 0, "connection closed by the server; buffered {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    let len = 2 + usize::from(got[1]);
    got.drain(..len).collect()
}

/// What `mosquitto_pub -q 1` does: CONNECT, PUBLISH QoS 1, wait for the PUBACK, send
/// DISCONNECT and close the socket at once (no waiting for the server to close).
async fn mosquitto_pub_like(
    addr: std::net::SocketAddr,
    level: u8,
    id: &str,
    topic: &str,
    msg: &[u8],
) {
    let (code, mut s) = raw_connack(addr, &raw_connect(level, id, 60, None)).await;
    assert_eq!(code, Some(0), "{id} connects");
    s.write_all(&raw_publish_qos1(level, topic, 1, msg))
        .await
        .unwrap();
    let mut got = Vec::new();
    let ack = read_frame(&mut s, &mut got).await;
    assert_eq!(ack[0], 0x40, "PUBACK for {id}, got {ack:?}");
    let disconnect: &[u8] = if level == 5 {
        &[0xe0, 0x01, 0x00]
    } else {
        &[0xe0, 0x00]
    };
    s.write_all(disconnect).await.unwrap();
    drop(s);
}

/// The interop report: a subscriber (`mosquitto_sub`) lost its connection right after a
/// short-lived `mosquitto_pub -q 1` left, and missed the last reply. (Cause: the test's
/// `mosquitto_sub -C 3` disconnects by itself after three messages; rumqttd's log showed
/// the DISCONNECT arriving on the subscriber's own connection.) Pin down that publishers
/// which DISCONNECT and close at once, on both listeners, with fresh and reused client
/// ids, never disturb a subscriber or the node's link.
#[tokio::test]
async fn short_lived_publishers_do_not_disturb_a_subscriber() {
    let (broker, mut inbound) = start(settings());
    let (v4, v5) = (broker.local_addr_v4(), broker.local_addr_v5().unwrap());
    // The subscriber, as mosquitto_sub: raw v4, QoS 0 subscription.
    let (code, mut sub) = raw_connack(v4, &raw_connect(4, "listener", 60, None)).await;
    assert_eq!(code, Some(0));
    let filter = b"replies/v311";
    let mut subscribe = vec![0x82, (2 + 2 + filter.len() + 1) as u8, 0, 1];
    subscribe.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    subscribe.extend_from_slice(filter);
    subscribe.push(0);
    sub.write_all(&subscribe).await.unwrap();
    let mut got = Vec::new();
    let suback = read_frame(&mut sub, &mut got).await;
    assert_eq!(suback, [0x90, 3, 0, 1, 0]);

    let rounds = 40u8;
    for i in 0..rounds {
        let (addr, level) = if i % 2 == 0 { (v4, 4) } else { (v5, 5) };
        // Alternate a reused client id (as the interop test does) with fresh ones.
        let id = if i % 3 == 0 {
            "mosq-req".to_owned()
        } else {
            format!("pub-{i}")
        };
        let submit = format!("fedmesh/v1/client/{id}/submit");
        mosquitto_pub_like(addr, level, &id, &submit, &[i]).await;
        let got_inbound = tokio::time::timeout(WAIT, inbound.recv())
            .await
            .expect("node link gets the submit")
            .expect("link alive");
        assert_eq!(
            (got_inbound.principal.as_str(), &got_inbound.payload[..]),
            (id.as_str(), &[i][..])
        );
        // Another short-lived publisher sends the reply the subscriber waits for.
        mosquitto_pub_like(addr, level, &format!("replier-{i}"), "replies/v311", &[i]).await;
        let publish = read_frame(&mut sub, &mut got).await;
        assert_eq!(publish[0] & 0xf0, 0x30, "PUBLISH {i}, got {publish:?}");
        assert_eq!(
            publish.last(),
            Some(&i),
            "message {i} in order, got {publish:?}"
        );
    }
    // Still connected: a PINGREQ is answered.
    sub.write_all(&[0xc0, 0]).await.unwrap();
    assert_eq!(read_frame(&mut sub, &mut got).await, [0xd0, 0]);
    assert_serves(v4).await;
    broker.shutdown().await;
}
