//! What reaches the node, with MQTT 5 properties; topic alias regression (issue #6).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use fedmesh_broker::{Outbound, Qos, Role};
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5::{Packet as P5, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;
use tokio::time::timeout;

fn v5(addr: std::net::SocketAddr, id: &str) -> (AsyncClient, mpsc::Receiver<P5>) {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    v5_with(o)
}

fn v5_with(o: MqttOptions) -> (AsyncClient, mpsc::Receiver<P5>) {
    let (client, mut el) = AsyncClient::new(o, 64);
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(p)) => {
                    if tx.send(p).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    (client, rx)
}

async fn next<T>(rx: &mut mpsc::Receiver<P5>, mut f: impl FnMut(P5) -> Option<T>) -> T {
    loop {
        let p = timeout(WAIT, rx.recv())
            .await
            .expect("packet in time")
            .expect("connection open");
        if let Some(t) = f(p) {
            return t;
        }
    }
}

#[tokio::test]
async fn inbound_carries_principal_and_v5_properties() {
    let (broker, mut inbound) = start(settings());
    let addr = broker.local_addr_v5().unwrap();
    let (c, mut rx) = v5(addr, "C");
    next(&mut rx, |p| matches!(p, P5::ConnAck(_)).then_some(())).await;
    c.subscribe("fedmesh/v1/client/C/reply/#", Q5::AtLeastOnce)
        .await
        .unwrap();
    next(&mut rx, |p| matches!(p, P5::SubAck(_)).then_some(())).await;
    let props = PublishProperties {
        response_topic: Some("fedmesh/v1/client/C/reply/7".into()),
        correlation_data: Some(Bytes::from_static(b"corr-7")),
        ..Default::default()
    };
    c.publish_with_properties(
        "fedmesh/v1/client/C/request",
        Q5::AtLeastOnce,
        false,
        "do it",
        props,
    )
    .await
    .unwrap();
    let got = timeout(WAIT, inbound.recv()).await.unwrap().unwrap();
    assert_eq!(got.principal, "C");
    assert_eq!(got.role, Role::Client);
    assert_eq!(got.op, "request");
    assert_eq!(got.topic, "fedmesh/v1/client/C/request");
    assert_eq!(&got.payload[..], b"do it");
    assert_eq!(
        got.response_topic.as_deref(),
        Some("fedmesh/v1/client/C/reply/7")
    );
    assert_eq!(got.correlation_data.as_deref(), Some(&b"corr-7"[..]));

    // The node answers on the response topic with the correlation data.
    broker
        .publish_wait(Outbound {
            topic: got.response_topic.clone().unwrap(),
            payload: Bytes::from_static(b"done"),
            qos: Qos::AtLeastOnce,
            retain: false,
            correlation_data: got.correlation_data.clone(),
        })
        .await
        .unwrap();
    let reply = next(&mut rx, |p| match p {
        P5::Publish(p) => Some(p),
        _ => None,
    })
    .await;
    assert_eq!(&reply.topic[..], b"fedmesh/v1/client/C/reply/7");
    assert_eq!(&reply.payload[..], b"done");
    assert_eq!(
        reply.properties.and_then(|p| p.correlation_data).as_deref(),
        Some(&b"corr-7"[..])
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn full_inbound_queue_drops_and_counts() {
    let mut s = settings();
    s.queue_depth = 2;
    let (broker, mut inbound) = start(s);
    let mut c = v4_client(v4_options(broker.local_addr_v4(), "flooder", None));
    c.connected().await.unwrap();
    for i in 0..20 {
        c.client
            .publish(
                "fedmesh/v1/agent/flooder/beat",
                rumqttc::QoS::AtLeastOnce,
                false,
                vec![i],
            )
            .await
            .unwrap();
    }
    assert!(
        eventually(|| broker.metrics().inbound_dropped >= 18).await,
        "{:?}",
        broker.metrics()
    );
    assert_eq!(inbound.recv().await.unwrap().payload[..], [0]);
    assert_eq!(inbound.recv().await.unwrap().payload[..], [1]);
    broker.shutdown().await;
}

/// rumqttd keys server topic aliases by subscription filter: a v5 client that accepts
/// aliases and subscribes with a wildcard gets `t/b` messages labelled `t/a`. The
/// proxy hides the client's Topic Alias Maximum from rumqttd, so no aliases are used.
/// (`src/tests.rs` shows this test failing with the defence turned off.) A subscriber with a
/// clean session gets these messages from the proxy directly; a persistent one gets them
/// through rumqttd, where the defect is.
#[tokio::test]
async fn wildcard_subscriber_accepting_aliases_gets_the_right_topics() {
    let (broker, _inbound) = start(settings());
    let addr = broker.local_addr_v5().unwrap();
    for persistent in [false, true] {
        let topics = alias_scenario(addr, persistent).await;
        assert_eq!(
            topics,
            ["t/a", "t/b", "t/a", "t/b"],
            "persistent: {persistent}"
        );
    }
    let m = broker.metrics();
    assert!(m.relay_delivered >= 4, "{m:?}");
    assert!(m.relay_fallbacks >= 4, "{m:?}");
    broker.shutdown().await;
}

/// Subscribes with `t/+` accepting 10 aliases (with a `persistent` session or not),
/// publishes on t/a, t/b, t/a, t/b from another client, returns the topics received.
pub async fn alias_scenario(addr: std::net::SocketAddr, persistent: bool) -> Vec<String> {
    let mut o = MqttOptions::new("alias-sub", addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    o.set_topic_alias_max(Some(10));
    o.set_clean_start(!persistent);
    let (sub, mut rx) = v5_with(o);
    next(&mut rx, |p| matches!(p, P5::ConnAck(_)).then_some(())).await;
    sub.subscribe("t/+", Q5::AtLeastOnce).await.unwrap();
    next(&mut rx, |p| matches!(p, P5::SubAck(_)).then_some(())).await;
    let (publ, mut prx) = v5(addr, "alias-pub");
    next(&mut prx, |p| matches!(p, P5::ConnAck(_)).then_some(())).await;
    for t in ["t/a", "t/b", "t/a", "t/b"] {
        publ.publish(t, Q5::AtLeastOnce, false, t.as_bytes().to_vec())
            .await
            .unwrap();
        next(&mut prx, |p| matches!(p, P5::PubAck(_)).then_some(())).await;
    }
    let mut topics = Vec::new();
    while topics.len() < 4 {
        let p = next(&mut rx, |p| match p {
            P5::Publish(p) => Some(p),
            _ => None,
        })
        .await;
        // The payload says which topic it was published on.
        assert_eq!(
            p.topic, p.payload,
            "message published on {:?} arrived under another topic",
            p.payload
        );
        topics.push(String::from_utf8(p.topic.to_vec()).unwrap());
    }
    topics
}

#[tokio::test]
async fn a_last_will_on_withdraw_reaches_the_node_and_an_explicit_withdraw_arrives_once() {
    let (broker, mut inbound) = start(settings());
    let addr = broker.local_addr_v4();
    // An agent with the documented Last Will, whose connection then vanishes (no DISCONNECT).
    let mut o = v4_options(addr, "willy", None);
    o.set_last_will(rumqttc::LastWill::new(
        "fedmesh/v1/agent/willy/withdraw",
        "{}",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let (client, mut el) = rumqttc::AsyncClient::new(o, 8);
    let (up_tx, mut up_rx) = mpsc::channel(1);
    let conn = tokio::spawn(async move {
        loop {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) = el.poll().await {
                let _ = up_tx.try_send(());
            }
        }
    });
    timeout(WAIT, up_rx.recv()).await.unwrap().unwrap();
    conn.abort();
    let _ = conn.await;
    drop(client);
    let will = timeout(WAIT, inbound.recv()).await.unwrap().unwrap();
    assert_eq!(
        (will.principal.as_str(), will.role, will.op.as_str()),
        ("willy", Role::Agent, "withdraw"),
        "{will:?}"
    );

    // An explicit withdrawal takes the same single path: the node gets it once.
    let mut c = v4_client(v4_options(addr, "wanda", None));
    c.connected().await.unwrap();
    c.client
        .publish(
            "fedmesh/v1/agent/wanda/withdraw",
            rumqttc::QoS::AtLeastOnce,
            false,
            "{}",
        )
        .await
        .unwrap();
    let got = timeout(WAIT, inbound.recv()).await.unwrap().unwrap();
    assert_eq!(
        (got.principal.as_str(), got.op.as_str()),
        ("wanda", "withdraw")
    );
    assert!(
        timeout(Duration::from_millis(300), inbound.recv())
            .await
            .is_err(),
        "a withdrawal reached the node twice"
    );
    broker.shutdown().await;
}
