//! Authentication and the topic ACL (issue #3.1): an agent cannot speak or listen as
//! another agent.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use fedmesh_broker::{BrokerError, Outbound, Qos, Role};
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason, SubscribeReasonCode as Src5};
use rumqttc::{Packet, QoS, SubscribeReasonCode};
use tokio::time::timeout;

mod v5 {
    use super::*;
    use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
    use std::net::SocketAddr;
    use tokio::sync::mpsc;

    pub struct V5Client {
        pub client: AsyncClient,
        pub events: mpsc::Receiver<Result<Event, ConnectionError>>,
    }

    pub fn options(addr: SocketAddr, id: &str, login: Option<(&str, &str)>) -> MqttOptions {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(5));
        if let Some((u, p)) = login {
            o.set_credentials(u, p);
        }
        o
    }

    pub fn client(o: MqttOptions) -> V5Client {
        let (client, mut el) = AsyncClient::new(o, 64);
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                let ev = el.poll().await;
                let stop = ev.is_err();
                if tx.send(ev).await.is_err() || stop {
                    return;
                }
            }
        });
        V5Client { client, events: rx }
    }

    impl V5Client {
        pub async fn connected(&mut self) -> Result<(), ConnectionError> {
            loop {
                match timeout(WAIT, self.events.recv())
                    .await
                    .expect("event in time")
                {
                    Some(Ok(Event::Incoming(P5::ConnAck(_)))) => return Ok(()),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e),
                    None => panic!("event loop ended"),
                }
            }
        }

        pub async fn next_incoming<T>(&mut self, mut f: impl FnMut(&P5) -> Option<T>) -> T {
            loop {
                match timeout(WAIT, self.events.recv())
                    .await
                    .expect("packet in time")
                {
                    Some(Ok(Event::Incoming(p))) => {
                        if let Some(t) = f(&p) {
                            return t;
                        }
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => panic!("connection error: {e:?}"),
                    None => panic!("event loop ended"),
                }
            }
        }
    }
}

fn secured() -> (
    tempfile::TempDir,
    fedmesh_broker::BrokerSettings,
    Vec<String>,
) {
    let (dir, path, pws) = credentials(&["A", "B"]);
    let mut s = settings();
    s.anonymous = false;
    s.credentials_path = Some(path);
    (dir, s, pws)
}

#[tokio::test]
async fn wrong_password_and_anonymous_are_refused() {
    let (_dir, s, pws) = secured();
    let (broker, _inbound) = start(s);
    let (v4, v5addr) = (broker.local_addr_v4(), broker.local_addr_v5().unwrap());

    let mut c = v4_client(v4_options(v4, "A", Some(("A", "not-the-password"))));
    let e = c.connected().await.unwrap_err();
    assert!(
        matches!(
            e,
            rumqttc::ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::BadUserNamePassword
            )
        ),
        "{e:?}"
    );
    let mut c = v4_client(v4_options(v4, "A", Some(("B", &pws[0]))));
    assert!(c.connected().await.is_err(), "A's password is not B's");
    let mut c = v4_client(v4_options(v4, "A", None));
    let e = c.connected().await.unwrap_err();
    assert!(
        matches!(
            e,
            rumqttc::ConnectionError::ConnectionRefused(rumqttc::ConnectReturnCode::NotAuthorized)
        ),
        "{e:?}"
    );

    let mut c = v5::client(v5::options(v5addr, "A", Some(("A", "wrong"))));
    let e = c.connected().await.unwrap_err();
    assert!(
        matches!(
            e,
            rumqttc::v5::ConnectionError::ConnectionRefused(
                rumqttc::v5::mqttbytes::v5::ConnectReturnCode::BadUserNamePassword
            )
        ),
        "{e:?}"
    );
    let mut c = v5::client(v5::options(v5addr, "anon", None));
    let e = c.connected().await.unwrap_err();
    assert!(
        matches!(
            e,
            rumqttc::v5::ConnectionError::ConnectionRefused(
                rumqttc::v5::mqttbytes::v5::ConnectReturnCode::NotAuthorized
            )
        ),
        "{e:?}"
    );

    assert_eq!(broker.metrics().connects_refused_bad_auth, 5);
    // The right password works, with any valid client id.
    assert_serves_as(v4, "A-worker-1", Some(("A", &pws[0]))).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn anonymous_clients_cannot_use_registered_names() {
    let (_dir, path, pws) = credentials(&["A"]);
    let mut s = settings();
    s.credentials_path = Some(path.clone());
    let (broker, _inbound) = start(s);
    let addr = broker.local_addr_v4();
    let (code, _s) = raw_connack(addr, &raw_connect(4, "A", 30, None)).await;
    assert_eq!(code, Some(0x05));
    assert_serves_as(addr, "someone", None).await;
    assert_serves_as(addr, "A", Some(("A", &pws[0]))).await;

    // New credentials are picked up without a restart.
    let pw_c = fedmesh_broker::CredentialStore::add(&path, "C", false).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_serves_as(addr, "c1", Some(("C", &pw_c))).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn agent_cannot_publish_as_another() {
    let (_dir, s, pws) = secured();
    let (broker, mut inbound) = start(s);
    let v5addr = broker.local_addr_v5().unwrap();

    // B over MQTT 5: QoS 1 to A's topic is answered "not authorized", QoS 0 dropped.
    let mut b = v5::client(v5::options(v5addr, "B", Some(("B", &pws[1]))));
    b.connected().await.unwrap();
    b.client
        .publish(
            "fedmesh/v1/agent/A/result",
            Q5::AtMostOnce,
            false,
            "forged0",
        )
        .await
        .unwrap();
    b.client
        .publish(
            "fedmesh/v1/agent/A/result",
            Q5::AtLeastOnce,
            false,
            "forged1",
        )
        .await
        .unwrap();
    let reason = b
        .next_incoming(|p| match p {
            P5::PubAck(a) => Some(a.reason),
            _ => None,
        })
        .await;
    assert_eq!(reason, PubAckReason::NotAuthorized);
    // Deeper or reserved topics under the namespace are denied too.
    b.client
        .publish(
            "fedmesh/v1/agent/B/result/x",
            Q5::AtLeastOnce,
            false,
            "deep",
        )
        .await
        .unwrap();
    let reason = b
        .next_incoming(|p| match p {
            P5::PubAck(a) => Some(a.reason),
            _ => None,
        })
        .await;
    assert_eq!(reason, PubAckReason::NotAuthorized);
    // Its own topic works; it is the first thing the node sees.
    b.client
        .publish("fedmesh/v1/agent/B/result", Q5::AtLeastOnce, false, "mine")
        .await
        .unwrap();
    let got = timeout(WAIT, inbound.recv()).await.unwrap().unwrap();
    assert_eq!(
        (got.principal.as_str(), got.role, got.op.as_str()),
        ("B", Role::Agent, "result")
    );
    assert_eq!(&got.payload[..], b"mine");

    // B over MQTT 3.1.1: QoS 0 dropped; QoS 1 closes the connection.
    let mut b4 = v4_client(v4_options(
        broker.local_addr_v4(),
        "B-v4",
        Some(("B", &pws[1])),
    ));
    b4.connected().await.unwrap();
    b4.client
        .publish(
            "fedmesh/v1/client/A/submit",
            QoS::AtMostOnce,
            false,
            "forged2",
        )
        .await
        .unwrap();
    b4.client
        .publish(
            "fedmesh/v1/client/A/submit",
            QoS::AtLeastOnce,
            false,
            "forged3",
        )
        .await
        .unwrap();
    b4.disconnected().await;

    // A can; the node sees A and nothing forged.
    let mut a = v4_client(v4_options(
        broker.local_addr_v4(),
        "A",
        Some(("A", &pws[0])),
    ));
    a.connected().await.unwrap();
    a.client
        .publish("fedmesh/v1/agent/A/result", QoS::AtLeastOnce, false, "real")
        .await
        .unwrap();
    let got = timeout(WAIT, inbound.recv()).await.unwrap().unwrap();
    assert_eq!(got.principal, "A");
    assert_eq!(&got.payload[..], b"real");
    assert!(
        timeout(Duration::from_millis(300), inbound.recv())
            .await
            .is_err(),
        "nothing forged reached the node"
    );
    assert!(broker.metrics().acl_denied_publish >= 5);
    broker.shutdown().await;
}

#[tokio::test]
async fn agent_cannot_listen_as_another() {
    let (_dir, s, pws) = secured();
    let (broker, _inbound) = start(s);
    let addr = broker.local_addr_v4();

    let mut b = v4_client(v4_options(addr, "B", Some(("B", &pws[1]))));
    b.connected().await.unwrap();
    for f in [
        "fedmesh/v1/agent/A/tasks",
        "#",
        "fedmesh/v1/agent/+/tasks",
        "$share/g/fedmesh/v1/agent/A/#",
    ] {
        b.client.subscribe(f, QoS::AtLeastOnce).await.unwrap();
        let codes = b
            .next_incoming(|p| match p {
                Packet::SubAck(s) => Some(s.return_codes.clone()),
                _ => None,
            })
            .await;
        assert_eq!(codes, vec![SubscribeReasonCode::Failure], "{f}");
    }
    // `$` filters other than `$share/...` make rumqttd disconnect the client; the proxy
    // answers them itself and the connection stays up.
    b.client.subscribe("$SYS/#", QoS::AtMostOnce).await.unwrap();
    let codes = b
        .next_incoming(|p| match p {
            Packet::SubAck(s) => Some(s.return_codes.clone()),
            _ => None,
        })
        .await;
    assert_eq!(codes, vec![SubscribeReasonCode::Failure]);
    // Mixed packet: all refused, none forwarded.
    b.client
        .subscribe_many([
            rumqttc::SubscribeFilter::new("fedmesh/v1/agent/B/#".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("fedmesh/v1/agent/A/#".into(), QoS::AtLeastOnce),
        ])
        .await
        .unwrap();
    let codes = b
        .next_incoming(|p| match p {
            Packet::SubAck(s) => Some(s.return_codes.clone()),
            _ => None,
        })
        .await;
    assert_eq!(codes, vec![SubscribeReasonCode::Failure; 2]);
    // Still connected: its own namespace works.
    b.client
        .subscribe("fedmesh/v1/agent/B/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let codes = b
        .next_incoming(|p| match p {
            Packet::SubAck(s) => Some(s.return_codes.clone()),
            _ => None,
        })
        .await;
    assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);

    // B over v5 gets "not authorized".
    let mut b5 = v5::client(v5::options(
        broker.local_addr_v5().unwrap(),
        "B5",
        Some(("B", &pws[1])),
    ));
    b5.connected().await.unwrap();
    b5.client
        .subscribe("fedmesh/v1/agent/A/tasks", Q5::AtLeastOnce)
        .await
        .unwrap();
    let codes = b5
        .next_incoming(|p| match p {
            P5::SubAck(s) => Some(s.return_codes.clone()),
            _ => None,
        })
        .await;
    assert_eq!(codes, vec![Src5::NotAuthorized]);

    // A can, and receives what the node sends it.
    let mut a = v4_client(v4_options(addr, "A", Some(("A", &pws[0]))));
    a.connected().await.unwrap();
    a.client
        .subscribe("fedmesh/v1/agent/A/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let codes = a
        .next_incoming(|p| match p {
            Packet::SubAck(s) => Some(s.return_codes.clone()),
            _ => None,
        })
        .await;
    assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    broker
        .publish(Outbound {
            topic: "fedmesh/v1/agent/A/inbox/tasks".into(),
            payload: Bytes::from_static(b"task-1"),
            qos: Qos::AtLeastOnce,
            retain: false,
            correlation_data: None,
        })
        .unwrap();
    let p = a
        .next_incoming(|p| match p {
            Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await;
    assert_eq!(p.topic, "fedmesh/v1/agent/A/inbox/tasks");
    assert_eq!(&p.payload[..], b"task-1");
    assert_eq!(broker.metrics().acl_denied_subscribe, 4 + 1 + 1);
    broker.shutdown().await;
}

#[tokio::test]
async fn will_topic_in_another_namespace_is_refused() {
    let (_dir, s, pws) = secured();
    let (broker, _inbound) = start(s);
    let mut o = v4_options(broker.local_addr_v4(), "B", Some(("B", &pws[1])));
    o.set_last_will(rumqttc::LastWill::new(
        "fedmesh/v1/agent/A/withdraw",
        "bye",
        QoS::AtLeastOnce,
        false,
    ));
    let mut b = v4_client(o);
    let e = b.connected().await.unwrap_err();
    assert!(
        matches!(
            e,
            rumqttc::ConnectionError::ConnectionRefused(rumqttc::ConnectReturnCode::NotAuthorized)
        ),
        "{e:?}"
    );
    assert_eq!(broker.metrics().connects_refused_acl, 1);
    broker.shutdown().await;
}

#[tokio::test]
async fn node_cannot_publish_on_principal_topics() {
    let (broker, _inbound) = start(settings());
    let msg = |topic: &str| Outbound {
        topic: topic.into(),
        payload: Bytes::new(),
        qos: Qos::AtMostOnce,
        retain: false,
        correlation_data: None,
    };
    for t in [
        "fedmesh/v1/agent/A/result",
        "fedmesh/v1/client/c/x",
        "a/+",
        "",
    ] {
        assert!(
            matches!(
                broker.publish(msg(t)),
                Err(BrokerError::InvalidOutbound { .. })
            ),
            "{t}"
        );
    }
    assert!(broker.publish(msg("fedmesh/v1/public/status")).is_ok());
    broker.shutdown().await;
}
