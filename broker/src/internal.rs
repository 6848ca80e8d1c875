//! rumqttd, assembled from its public parts: one router, and internal loopback listeners
//! that only the proxy (and the watchdog) can log into.
//!
//! We do not use `rumqttd::Broker`: its `start()` blocks forever and owns its listeners.
//! `rumqttd::Router` and `rumqttd::Server` are public, so we spawn the router ourselves
//! and run each `Server` on a thread and runtime we control. A listener can then be
//! stopped (its accept loop is dropped; its connections drain, then its runtime is
//! dropped) and replaced by a fresh one on the *same* router, with every session,
//! subscription and retained message intact.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::{
    ConnectionSettings, LinkType, Notification, Router, RouterConfig, Server, ServerSettings,
};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use crate::codec::{self, Connect, Properties, Version};
use crate::error::BrokerError;
use crate::nodelay::{self, Mechanism, NodelayError};

/// How long a retired listener lets its proxied connections finish.
const DRAIN_GRACE: Duration = Duration::from_secs(60);
/// How long a new listener has to start serving.
const START_DEADLINE: Duration = Duration::from_secs(3);
/// Ports tried for a new listener.
const START_ATTEMPTS: usize = 5;

type LinkFactory = dyn Fn(&str) -> Result<(LinkTx, LinkRx, Notification), String> + Send + Sync;
type ServerV4Factory = dyn Fn(ServerSettings) -> Server<V4> + Send + Sync;
type ServerV5Factory = dyn Fn(ServerSettings) -> Server<V5> + Send + Sync;

/// The rumqttd router. Its sender type is private to rumqttd, so it is kept inside
/// closures that build links and servers.
pub(crate) struct RouterHandle {
    link: Box<LinkFactory>,
    server_v4: Box<ServerV4Factory>,
    server_v5: Box<ServerV5Factory>,
}

impl std::fmt::Debug for RouterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterHandle").finish_non_exhaustive()
    }
}

impl RouterHandle {
    /// Spawns rumqttd's router thread.
    ///
    /// The router thread cannot be stopped: it lives until the process exits.
    pub(crate) fn spawn(config: RouterConfig) -> Self {
        let tx = Router::new(0, config).spawn();
        let (tx4, tx5) = (tx.clone(), tx.clone());
        Self {
            link: Box::new(move |id: &str| {
                rumqttd::local::LinkBuilder::new(id, tx.clone())
                    // Without dynamic filters, publishing on a topic nobody subscribes
                    // to disconnects the link.
                    .dynamic_filters(true)
                    // No server topic aliases for the node's link.
                    .topic_alias_max(0)
                    .build()
                    .map_err(|e: LinkError| e.to_string())
            }),
            server_v4: Box::new(move |s| Server::new(s, tx4.clone(), V4)),
            server_v5: Box::new(move |s| Server::new(s, tx5.clone(), V5)),
        }
    }

    /// An in-process link (a router connection without a socket).
    pub(crate) fn link(&self, client_id: &str) -> Result<(LinkTx, LinkRx), BrokerError> {
        let (tx, rx, _ack) = (self.link)(client_id).map_err(BrokerError::Link)?;
        Ok((tx, rx))
    }
}

/// The static login of the internal listeners: a fixed user and a random secret
/// generated at start, so nothing but this process can log in.
#[derive(Clone)]
pub(crate) struct InternalAuth {
    pub(crate) user: String,
    pub(crate) secret: String,
}

impl std::fmt::Debug for InternalAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalAuth")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl InternalAuth {
    pub(crate) fn random() -> Self {
        let mut secret = [0u8; 32];
        rand::fill(&mut secret[..]);
        Self {
            user: "fedmesh-internal".into(),
            secret: data_encoding::HEXLOWER.encode(&secret),
        }
    }

    /// A CONNECT logging in with these credentials.
    pub(crate) fn connect(&self, version: Version, client_id: &str) -> Connect {
        Connect {
            version,
            clean: true,
            keep_alive: 30,
            properties: Properties::default(),
            client_id: client_id.to_owned(),
            will: None,
            username: Some(self.user.clone()),
            password: Some(Bytes::copy_from_slice(self.secret.as_bytes())),
        }
    }
}

/// What every internal listener is configured with.
#[derive(Debug, Clone)]
pub(crate) struct InternalConfig {
    pub(crate) auth: InternalAuth,
    /// rumqttd's frame limit; set a little above the proxy's so the proxy's binds first.
    pub(crate) max_payload_size: usize,
    pub(crate) connection_timeout_ms: u16,
    /// Set TCP_NODELAY on rumqttd's listening sockets (see [`nodelay`]); tests turn it
    /// off to show the delayed-ACK stalls and the fallback.
    pub(crate) listener_nodelay: bool,
}

/// A running internal listener.
#[derive(Debug)]
pub(crate) struct InternalListener {
    pub(crate) addr: SocketAddr,
    pub(crate) version: Version,
    /// Proxy connections currently using this listener.
    pub(crate) active: Arc<AtomicUsize>,
    /// How the sockets rumqttd accepts here avoid delayed-ACK stalls.
    pub(crate) mechanism: Mechanism,
    stop: Option<oneshot::Sender<()>>,
}

impl InternalListener {
    /// The endpoint the proxy connects to.
    pub(crate) fn endpoint(&self) -> Endpoint {
        Endpoint {
            addr: self.addr,
            active: self.active.clone(),
            quickack: self.mechanism == Mechanism::QuickAck,
        }
    }
}

impl Drop for InternalListener {
    /// Stops accepting; existing connections drain for up to [`DRAIN_GRACE`].
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            debug!(addr = %self.addr, version = ?self.version, "internal listener retired");
        }
    }
}

/// Where the proxy sends new connections of one protocol version.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) addr: SocketAddr,
    pub(crate) active: Arc<AtomicUsize>,
    /// rumqttd's accepted sockets lack TCP_NODELAY: re-arm TCP_QUICKACK after each read.
    pub(crate) quickack: bool,
}

/// The current endpoints, swapped by the watchdog.
#[derive(Debug, Clone)]
pub(crate) struct Endpoints {
    pub(crate) v4: Endpoint,
    pub(crate) v5: Endpoint,
}

impl Endpoints {
    pub(crate) fn get(&self, v: Version) -> &Endpoint {
        match v {
            Version::V4 => &self.v4,
            Version::V5 => &self.v5,
        }
    }
}

/// Client ids for probes. A probe refused after its CONNECT may leave a stale will
/// sender in rumqttd under its client id (the listener-killing defect), so a probe id
/// is never reused after such a failure.
#[derive(Debug, Default)]
pub(crate) struct ProbeIds(AtomicU64);

impl ProbeIds {
    pub(crate) fn current(&self, v: Version) -> String {
        format!("fedmesh.probe.{v:?}.{}", self.0.load(Ordering::Relaxed))
    }

    pub(crate) fn burn(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProbeError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("no CONNACK: {0}")]
    Io(std::io::Error),
    #[error("invalid CONNACK: {0}")]
    Codec(#[from] codec::CodecError),
    #[error("CONNACK refused with code {0:#04x}")]
    Refused(u8),
}

impl ProbeError {
    /// Whether the CONNECT may have reached rumqttd.
    pub(crate) fn after_connect(&self) -> bool {
        !matches!(self, ProbeError::Connect(_))
    }
}

/// Logs into `addr` with the internal credentials and expects a successful CONNACK
/// (blocking; run it on a blocking thread).
pub(crate) fn probe(
    addr: SocketAddr,
    version: Version,
    auth: &InternalAuth,
    client_id: &str,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(ProbeError::Connect)?;
    s.set_nodelay(true).map_err(ProbeError::Io)?;
    s.set_read_timeout(Some(timeout)).map_err(ProbeError::Io)?;
    s.set_write_timeout(Some(timeout)).map_err(ProbeError::Io)?;
    s.write_all(&auth.connect(version, client_id).encode())
        .map_err(ProbeError::Io)?;
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 256];
    let header = loop {
        if let Some(h) = codec::parse_fixed_header(&buf)?
            && buf.len() >= h.frame_len()
        {
            break h;
        }
        if buf.len() > 1024 {
            return Err(codec::CodecError::Malformed("CONNACK too large").into());
        }
        let n = s.read(&mut chunk).map_err(ProbeError::Io)?;
        if n == 0 {
            return Err(ProbeError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if header.kind() != codec::CONNACK {
        return Err(codec::CodecError::Malformed("not a CONNACK").into());
    }
    let ack = codec::parse_connack(&buf[header.header_len..header.frame_len()], version)?;
    if ack.code != 0 {
        return Err(ProbeError::Refused(ack.code));
    }
    // DISCONNECT, then wait for rumqttd to close: closing first can make rumqttd report
    // the disconnection twice, and the second report can kill whichever connection
    // reuses the slot (see the proxy's DISCONNECT handling).
    if s.write_all(&codec::encode_disconnect()).is_ok() {
        while matches!(s.read(&mut chunk), Ok(n) if n > 0) {}
    }
    Ok(())
}

fn free_loopback_port() -> std::io::Result<SocketAddr> {
    // The port is released before rumqttd binds it; if something else takes it in
    // between, the start-up probe fails and another port is tried.
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()
}

fn server_settings(addr: SocketAddr, version: Version, cfg: &InternalConfig) -> ServerSettings {
    ServerSettings {
        name: format!("fedmesh-internal-{version:?}-{}", addr.port()),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: cfg.connection_timeout_ms,
            max_payload_size: cfg.max_payload_size,
            max_inflight_count: 100,
            auth: Some(HashMap::from([(
                cfg.auth.user.clone(),
                cfg.auth.secret.clone(),
            )])),
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

fn run_listener(
    router: Arc<RouterHandle>,
    version: Version,
    settings: ServerSettings,
    stop: oneshot::Receiver<()>,
    active: Arc<AtomicUsize>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot build a runtime for an internal listener");
            return;
        }
    };
    let addr = settings.listen;
    rt.block_on(async move {
        match version {
            Version::V4 => {
                let mut server = (router.server_v4)(settings);
                tokio::select! {
                    r = server.start(LinkType::Remote) => warn!(%addr, result = ?r, "internal listener ended"),
                    _ = stop => {}
                }
            }
            Version::V5 => {
                let mut server = (router.server_v5)(settings);
                tokio::select! {
                    r = server.start(LinkType::Remote) => warn!(%addr, result = ?r, "internal listener ended"),
                    _ = stop => {}
                }
            }
        }
    });
    // The accept loop is gone; let proxied connections finish on this runtime.
    let deadline = Instant::now() + DRAIN_GRACE;
    rt.block_on(async {
        while active.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    debug!(%addr, "internal listener thread done");
    // Dropping the runtime cancels whatever is left.
}

/// Sets TCP_NODELAY on rumqttd's listening socket at `addr` once rumqttd has bound it
/// (waiting at most until `deadline`); the fallback mechanism if that is impossible.
fn listener_nodelay(addr: SocketAddr, deadline: Instant) -> Mechanism {
    loop {
        match nodelay::set_listener_nodelay(addr) {
            Ok(()) => return Mechanism::ListenerNodelay,
            Err(NodelayError::NotFound(_)) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) => {
                warn!(%addr, error = %e, "cannot set TCP_NODELAY on rumqttd's internal listener; the proxy re-arms TCP_QUICKACK instead");
                return Mechanism::QuickAck;
            }
        }
    }
}

/// Starts an internal listener on a free loopback port and waits until it serves
/// (blocking).
pub(crate) fn spawn_listener(
    router: &Arc<RouterHandle>,
    version: Version,
    cfg: &InternalConfig,
    probe_ids: &ProbeIds,
) -> Result<InternalListener, BrokerError> {
    let mut last_error = String::from("no attempt made");
    for _ in 0..START_ATTEMPTS {
        let addr =
            free_loopback_port().map_err(|e| BrokerError::InternalListener(e.to_string()))?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let active = Arc::new(AtomicUsize::new(0));
        let mut listener = InternalListener {
            addr,
            version,
            active: active.clone(),
            mechanism: Mechanism::QuickAck,
            stop: Some(stop_tx),
        };
        let settings = server_settings(addr, version, cfg);
        let router2 = router.clone();
        thread::Builder::new()
            .name(format!("fedmesh-rumqttd-{version:?}-{}", addr.port()))
            .spawn(move || run_listener(router2, version, settings, stop_rx, active))
            .map_err(BrokerError::Thread)?;
        let deadline = Instant::now() + START_DEADLINE;
        // Before anything connects: rumqttd's accepted sockets inherit TCP_NODELAY.
        listener.mechanism = if cfg.listener_nodelay {
            listener_nodelay(addr, deadline)
        } else {
            Mechanism::QuickAck
        };
        loop {
            let id = probe_ids.current(version);
            match probe(addr, version, &cfg.auth, &id, Duration::from_secs(1)) {
                Ok(()) => {
                    info!(%addr, ?version, nodelay = listener.mechanism.as_str(), "rumqttd internal listener up");
                    return Ok(listener);
                }
                Err(e) => {
                    if e.after_connect() {
                        probe_ids.burn();
                    }
                    last_error = format!("{addr}: {e}");
                    if Instant::now() >= deadline {
                        break;
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
        warn!(error = %last_error, "internal listener did not come up; trying another port");
        drop(listener);
    }
    Err(BrokerError::InternalListener(last_error))
}
