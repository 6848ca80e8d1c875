//! Test helpers: a broker on port 0, rumqttc clients, raw MQTT bytes.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fedmesh_broker::{Broker, BrokerSettings, Inbound};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;

pub const WAIT: Duration = Duration::from_secs(5);

pub fn settings() -> BrokerSettings {
    BrokerSettings {
        listen_v4: "127.0.0.1:0".parse().unwrap(),
        listen_v5: Some("127.0.0.1:0".parse().unwrap()),
        tls: None,
        anonymous: true,
        credentials_path: None,
        max_connections: 64,
        max_payload_bytes: 64 * 1024,
        memory_budget_bytes: 32 * 1024 * 1024,
        connect_timeout: Duration::from_millis(1500),
        queue_depth: 256,
        direct_delivery: true,
    }
}

pub fn start(s: BrokerSettings) -> (Broker, mpsc::Receiver<Inbound>) {
    Broker::start(s).expect("broker starts")
}

/// A credentials file in a fresh temp dir with the given agents; returns (dir, path, passwords).
pub fn credentials(names: &[&str]) -> (tempfile::TempDir, PathBuf, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("credentials.toml");
    let pws = names
        .iter()
        .map(|n| fedmesh_broker::CredentialStore::add(&path, n, false).unwrap())
        .collect();
    (dir, path, pws)
}

/// A running rumqttc v4 client whose events arrive on a channel.
pub struct V4Client {
    pub client: AsyncClient,
    pub events: mpsc::Receiver<Result<Event, rumqttc::ConnectionError>>,
}

pub fn v4_options(addr: SocketAddr, id: &str, login: Option<(&str, &str)>) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    if let Some((u, p)) = login {
        o.set_credentials(u, p);
    }
    o
}

pub fn v4_client(o: MqttOptions) -> V4Client {
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
    V4Client { client, events: rx }
}

impl V4Client {
    /// Waits for the CONNACK; returns the error if the connection failed.
    pub async fn connected(&mut self) -> Result<(), rumqttc::ConnectionError> {
        loop {
            match timeout(WAIT, self.events.recv())
                .await
                .expect("event in time")
            {
                Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e),
                None => panic!("event loop ended"),
            }
        }
    }

    /// The next incoming packet matching `f`, skipping others; panics on error or timeout.
    pub async fn next_incoming<T>(&mut self, mut f: impl FnMut(&Packet) -> Option<T>) -> T {
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

    /// Waits until the connection fails (or `WAIT` passes: then panics).
    pub async fn disconnected(&mut self) -> rumqttc::ConnectionError {
        loop {
            match timeout(WAIT, self.events.recv())
                .await
                .expect("disconnect in time")
            {
                Some(Err(e)) => return e,
                Some(Ok(_)) => continue,
                None => panic!("event loop ended"),
            }
        }
    }
}

/// A well-behaved anonymous v4 client connects, subscribes, publishes and receives.
pub async fn assert_serves(addr: SocketAddr) {
    assert_serves_as(addr, "healthy-client", None).await;
}

pub async fn assert_serves_as(addr: SocketAddr, id: &str, login: Option<(&str, &str)>) {
    let mut c = v4_client(v4_options(addr, id, login));
    c.connected().await.expect("well-behaved client connects");
    let topic = format!("probe/{id}");
    c.client.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
    c.next_incoming(|p| matches!(p, Packet::SubAck(_)).then_some(()))
        .await;
    c.client
        .publish(&topic, QoS::AtLeastOnce, false, b"ping".to_vec())
        .await
        .unwrap();
    let got = c
        .next_incoming(|p| match p {
            Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await;
    assert_eq!(got.topic, topic);
    assert_eq!(&got.payload[..], b"ping");
    c.client.disconnect().await.ok();
}

/// Encodes a v4 or v5 CONNECT by hand (rumqttc refuses to send invalid client ids).
pub fn raw_connect(
    level: u8,
    client_id: &str,
    keep_alive: u16,
    login: Option<(&str, &str)>,
) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level];
    let mut flags = 0x02u8;
    if login.is_some() {
        flags |= 0xc0;
    }
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        body.push(0);
    }
    let put = |b: &mut Vec<u8>, s: &[u8]| {
        b.extend_from_slice(&(s.len() as u16).to_be_bytes());
        b.extend_from_slice(s);
    };
    put(&mut body, client_id.as_bytes());
    if let Some((u, p)) = login {
        put(&mut body, u.as_bytes());
        put(&mut body, p.as_bytes());
    }
    let mut out = vec![0x10];
    let mut len = body.len();
    loop {
        let mut b = (len & 0x7f) as u8;
        len >>= 7;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&body);
    out
}

/// Sends a raw CONNECT and returns the CONNACK return code (`None` if the socket closed
/// without one).
pub async fn raw_connack(addr: SocketAddr, connect: &[u8]) -> (Option<u8>, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(connect).await.unwrap();
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    let code = loop {
        let n = match timeout(WAIT, s.read(&mut buf))
            .await
            .expect("answer in time")
        {
            Ok(n) => n,
            Err(_) => break None,
        };
        if n == 0 {
            break None;
        }
        got.extend_from_slice(&buf[..n]);
        if got.len() >= 4 {
            assert_eq!(got[0], 0x20, "CONNACK expected, got {got:?}");
            break Some(got[3]);
        }
    };
    (code, s)
}

/// Whether the server closes `s` within `WAIT` (reads until EOF).
pub async fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    let r = timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => continue,
            }
        }
    })
    .await;
    r.unwrap_or(false)
}

/// Polls `f` until true or `WAIT` passes.
pub async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}
