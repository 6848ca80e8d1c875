//! The MQTT-aware TCP front proxy: public listeners, CONNECT checks, ACL, streaming relay.
//!
//! Per connection: set TCP_NODELAY; read the CONNECT (bounded size, `connect_timeout`);
//! decide (client id, credentials, will topic); open a loopback connection (TCP_NODELAY)
//! to rumqttd's internal listener for that protocol version; send a rewritten CONNECT
//! (internal login, namespaced client id, Keep Alive 0 → 65535, no v5 Topic Alias
//! Maximum); wait for rumqttd's CONNACK (never dropping the upstream before it, see
//! below) and pass it on (v5: our Topic Alias Maximum, Assigned Client Identifier,
//! Maximum Packet Size). Then relay frames both ways. Client frames are checked (flags,
//! size, PUBLISH topic and SUBSCRIBE filters against the ACL) and forwarded unchanged;
//! payloads stream through in chunks and are never buffered whole. Broker frames are
//! delimited (so the proxy can insert its own acks between them) and, for v5 PUBLISH,
//! checked for server topic aliases.
//!
//! A PUBLISH on a principal topic (`fedmesh/v1/{agent|client}/P/op`, the node's API) is
//! also handed to the node directly, as an [`Inbound`], and forwarded to rumqttd as usual
//! (which acknowledges it and serves any other subscriber), unless nobody but the node could
//! receive it: then the proxy acknowledges it itself ([`crate::direct::Direct::keeps`]). The node's in-process
//! link subscribes only to `fedmesh/v1/agent/+/withdraw` (withdrawals, explicit or a Last
//! Will that rumqttd publishes, see [`acl::WITHDRAW_OP`]): the hand-off saves the proxy →
//! rumqttd → router → link hops on every request and result (see ARCHITECTURE.md,
//! `broker/`). The node's answers are matched against the subscriptions rumqttd granted
//! (directly, see [`crate::direct`], or by rumqttd), so a PUBLISH that follows a SUBSCRIBE on
//! the same connection is handed over only once rumqttd has acknowledged that SUBSCRIBE
//! ([`SubAcks`]): a reply is never published before the subscription it is meant for. The
//! broker-side task writes the node's direct messages between rumqttd's frames, and the
//! client-side task keeps the client's PUBACKs for them from rumqttd.
//!
//! rumqttd's listener-killing panic needs a connection refused *after* its CONNECT was
//! accepted for processing: a client id the router rejects (`+ $ # /`), a full router,
//! or a socket that closes before rumqttd writes the CONNACK. The proxy rules out all
//! three: client ids are `[A-Za-z0-9_.-]` behind a `u:`/`a:` prefix, the proxy admits
//! fewer connections than the router has slots, and it holds the upstream socket open
//! until the CONNACK arrives.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use crate::acl;
use crate::codec::{self, CodecError, Connect, FixedHeader, Version, prop};
use crate::credentials::CredentialStore;
use crate::direct::{self, Direct};
use crate::flow::{self, Flow, Subscriber};
use crate::gate::{self, Gate};
use crate::internal::{Endpoints, InternalAuth};
use crate::link::Inbound;
use crate::metrics::Metrics;
use crate::nodelay;
use crate::sessions::Sessions;
use crate::settings::BrokerLimits;

/// Read buffer growth step per connection and direction.
const READ_CHUNK: usize = 8 * 1024;
/// Write buffer per connection and direction.
const WRITE_BUF: usize = 8 * 1024;
/// Largest CONNECT accepted (its will payload included).
pub(crate) const CONNECT_CAP: usize = 64 * 1024;
/// Largest PUBLISH variable header (topic + properties) inspected.
const INSPECT_CAP: usize = 64 * 1024;
/// Largest SUBSCRIBE accepted.
const SUBSCRIBE_CAP: usize = 64 * 1024;
/// Topic aliases a v5 client may use towards the broker (advertised in CONNACK).
pub(crate) const CLIENT_TOPIC_ALIAS_MAX: u16 = 16;
/// Bytes of topics a client's aliases may stand for in total.
const ALIAS_BYTES_MAX: usize = 16 * 1024;
/// Frames the client-side task may queue for the client (its own acks).
const INJECT_DEPTH: usize = 16;
/// A client that does not take a frame within this time is disconnected.
const WRITE_STALL: Duration = Duration::from_secs(30);
/// Connections at the limit that are told so (with a CONNACK) concurrently; beyond
/// this they are just closed.
pub(crate) const POLITE_REFUSALS: usize = 64;
/// How long the proxy waits for rumqttd to close an upstream connection it half-closed.
const LINGER: Duration = Duration::from_secs(2);
/// How long the proxy waits for rumqttd to close a connection after a DISCONNECT.
const DISCONNECT_GRACE: Duration = Duration::from_secs(5);
/// Keep Alive sent to rumqttd for clients that asked for 0 (rumqttd refuses 0).
const KEEP_ALIVE_FOR_ZERO: u16 = u16::MAX;
/// Longest a node-bound PUBLISH waits for rumqttd to acknowledge the connection's earlier
/// SUBSCRIBEs; then it is handed over anyway (and counted in `suback_wait_timeouts`).
const SUBACK_WAIT: Duration = Duration::from_secs(5);

/// Switches for the defences that tests turn off to show the defect they prevent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Defences {
    /// Remove a v5 client's Topic Alias Maximum before it reaches rumqttd.
    pub(crate) strip_topic_alias_max: bool,
    /// Close a v5 connection rather than relay a broker PUBLISH that uses a topic alias.
    pub(crate) refuse_server_aliases: bool,
    /// Set TCP_NODELAY on rumqttd's listening sockets (else the QUICKACK fallback).
    pub(crate) listener_nodelay: bool,
    /// Use the TCP_QUICKACK fallback where the listener lacks TCP_NODELAY.
    pub(crate) upstream_quickack: bool,
    /// Hold QoS ≥ 1 publishers while a QoS ≥ 1 subscriber is far behind (see `flow`).
    pub(crate) qos1_flow_control: bool,
    /// Hand a node-bound PUBLISH to the node only after rumqttd acknowledged the
    /// connection's earlier SUBSCRIBEs (else the node's reply can overtake them).
    pub(crate) node_publish_after_suback: bool,
    /// Write the node's messages to a principal's connections directly (see `direct`).
    pub(crate) direct_delivery: bool,
    /// Write clients' messages to their subscribers' connections directly (see `direct`).
    pub(crate) direct_relay: bool,
}

impl Default for Defences {
    fn default() -> Self {
        Self {
            strip_topic_alias_max: true,
            refuse_server_aliases: true,
            listener_nodelay: true,
            upstream_quickack: true,
            qos1_flow_control: true,
            node_publish_after_suback: true,
            direct_delivery: true,
            direct_relay: true,
        }
    }
}

/// Everything connection tasks share.
#[derive(Debug)]
pub(crate) struct ProxyShared {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) limits: BrokerLimits,
    pub(crate) anonymous: bool,
    pub(crate) credentials: Option<Arc<CredentialStore>>,
    pub(crate) connect_timeout: Duration,
    pub(crate) endpoints: watch::Receiver<Endpoints>,
    pub(crate) auth: InternalAuth,
    pub(crate) admission: Arc<Semaphore>,
    pub(crate) refusals: Arc<Semaphore>,
    pub(crate) defences: Defences,
    pub(crate) sessions: Sessions,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// QoS 1 flow control between publishers and slow subscribers.
    pub(crate) flow: Flow,
    /// The node's bounded inbound queue: node-bound PUBLISHes go here directly.
    pub(crate) to_node: mpsc::Sender<Inbound>,
    /// Messages of the node held until it has flushed what they say (see `gate`).
    pub(crate) gate: Arc<Gate>,
    /// The node's messages written to principals' connections directly.
    pub(crate) direct: Arc<Direct>,
}

/// SUBSCRIBEs of one connection forwarded to rumqttd and not yet acknowledged: the
/// client-side task counts them up, the broker-side task down (on each SUBACK it relays).
#[derive(Debug, Default)]
pub(crate) struct SubAcks {
    pending: AtomicUsize,
    acked: Notify,
}

impl SubAcks {
    fn sent(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
    }

    fn acked(&self) {
        // Saturating: a SUBACK we did not count (there is none today) must not wrap.
        let _ = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.acked.notify_waiters();
    }

    /// Waits until every SUBSCRIBE forwarded so far is acknowledged, at most `limit`.
    /// Returns whether it had to give up.
    async fn settled(&self, limit: Duration) -> bool {
        crate::wait::until(&self.acked, limit, || {
            self.pending.load(Ordering::Acquire) == 0
        })
        .await
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed in the middle of a packet")]
    Eof,
    #[error("{0}")]
    Codec(#[from] CodecError),
    #[error("frame of {0} bytes exceeds the limit")]
    FrameTooLarge(usize),
    #[error("PUBLISH payload of {0} bytes exceeds max_payload_bytes")]
    PayloadTooLarge(usize),
    #[error("PUBLISH header larger than {INSPECT_CAP} bytes")]
    HeaderTooLarge,
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("topic alias {0} out of range")]
    AliasInvalid(u16),
    #[error("topic aliases exceed {ALIAS_BYTES_MAX} bytes of topics")]
    AliasQuota,
    #[error("MQTT 3.1.1 client may not publish on {0:?}; closing")]
    Denied(String),
    #[error("broker used a server topic alias; closing rather than mislabel messages")]
    ServerAlias,
    #[error("client did not read for {WRITE_STALL:?}")]
    Stalled,
}

impl ConnError {
    /// The v5 DISCONNECT reason to send the client before closing, if any.
    fn disconnect_reason(&self) -> Option<u8> {
        Some(match self {
            ConnError::Codec(_) => 0x81,
            ConnError::Protocol(_) => 0x82,
            ConnError::FrameTooLarge(_)
            | ConnError::PayloadTooLarge(_)
            | ConnError::HeaderTooLarge => 0x95,
            ConnError::AliasInvalid(_) => 0x94,
            ConnError::AliasQuota => 0x97,
            ConnError::Io(_)
            | ConnError::Eof
            | ConnError::Denied(_)
            | ConnError::ServerAlias
            | ConnError::Stalled => {
                return None;
            }
        })
    }

    /// Whether the peer misbehaved (as opposed to a network error).
    fn is_protocol_error(&self) -> bool {
        !matches!(self, ConnError::Io(_) | ConnError::Eof | ConnError::Stalled)
    }
}

/// Buffered reader that delimits MQTT frames without buffering payloads whole.
struct FrameReader<R> {
    rd: R,
    buf: BytesMut,
    /// Called after every successful read (the TCP_QUICKACK fallback).
    after_read: Option<fn(&R)>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(rd: R) -> Self {
        Self {
            rd,
            buf: BytesMut::with_capacity(READ_CHUNK),
            after_read: None,
        }
    }

    /// The next frame's fixed header, if fully buffered.
    fn header(&self) -> Result<Option<FixedHeader>, CodecError> {
        codec::parse_fixed_header(&self.buf)
    }

    /// Reads more bytes (cancel-safe); `false` at end of stream.
    async fn fill(&mut self) -> io::Result<bool> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
            self.buf.reserve(READ_CHUNK);
        }
        let n = self.rd.read_buf(&mut self.buf).await?;
        if let Some(f) = self.after_read {
            f(&self.rd);
        }
        Ok(n > 0)
    }

    /// Buffers at least `n` bytes. Callers bound `n`.
    async fn ensure(&mut self, n: usize) -> Result<(), ConnError> {
        if self.buf.capacity() < n {
            self.buf.reserve(n - self.buf.len());
        }
        while self.buf.len() < n {
            if !self.fill().await? {
                return Err(ConnError::Eof);
            }
        }
        Ok(())
    }

    /// Copies the next `n` bytes to `w`, streaming.
    async fn forward<W: AsyncWrite + Unpin>(
        &mut self,
        mut n: usize,
        w: &mut W,
    ) -> Result<(), ConnError> {
        while n > 0 {
            if self.buf.is_empty() && !self.fill().await? {
                return Err(ConnError::Eof);
            }
            let take = n.min(self.buf.len());
            w.write_all(&self.buf[..take]).await?;
            self.buf.advance(take);
            n -= take;
        }
        Ok(())
    }

    /// Discards the next `n` bytes, streaming.
    /// The whole body of the frame `h` starts, read into the buffer (at most `cap` bytes:
    /// larger frames are refused).
    async fn body(&mut self, h: &FixedHeader, cap: usize) -> Result<&[u8], ConnError> {
        if h.remaining > cap {
            return Err(ConnError::FrameTooLarge(h.remaining));
        }
        self.ensure(h.frame_len()).await?;
        Ok(&self.buf[h.header_len..h.frame_len()])
    }

    async fn skip(&mut self, mut n: usize) -> Result<(), ConnError> {
        while n > 0 {
            if self.buf.is_empty() && !self.fill().await? {
                return Err(ConnError::Eof);
            }
            let take = n.min(self.buf.len());
            self.buf.advance(take);
            n -= take;
        }
        Ok(())
    }
}

/// Accepts one connection and sets TCP_NODELAY on it (rumqttd never does: delayed ACKs
/// then stall small messages for up to 40 ms).
pub(crate) async fn accept(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    let (stream, peer) = listener.accept().await?;
    stream.set_nodelay(true)?;
    Ok((stream, peer))
}

/// Binds a public listener.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    // Accepted sockets inherit it on Linux; `accept` sets it again everywhere.
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

fn transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::InvalidInput
    )
}

/// Accepts until shutdown. With `tls`, every connection is a TLS connection (the handshake
/// runs in the connection's task, within `connect_timeout`, after admission).
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<ProxyShared>,
    tls: Option<TlsAcceptor>,
) {
    let mut shutdown = shared.shutdown.clone();
    let m = shared.metrics.clone();
    loop {
        let accepted = tokio::select! {
            r = accept(&listener) => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                Metrics::inc(&m.connections_accepted);
                match shared.admission.clone().try_acquire_owned() {
                    Ok(permit) => {
                        tokio::spawn(serve(stream, peer, shared.clone(), permit, tls.clone()));
                    }
                    Err(_) => {
                        Metrics::inc(&m.connects_refused_limit);
                        debug!(%peer, "connection limit reached");
                        if let Ok(permit) = shared.refusals.clone().try_acquire_owned() {
                            tokio::spawn(refuse_busy(
                                stream,
                                peer,
                                shared.clone(),
                                permit,
                                tls.clone(),
                            ));
                        }
                    }
                }
            }
            Err(e) if transient_accept_error(&e) => debug!(error = %e, "accept"),
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

struct ActiveGuard(Arc<Metrics>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        Metrics::dec(&self.0.connections_active);
    }
}

struct EndpointGuard(Arc<AtomicUsize>);

impl EndpointGuard {
    fn new(active: &Arc<AtomicUsize>) -> Self {
        active.fetch_add(1, Ordering::Relaxed);
        Self(active.clone())
    }
}

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Completes the TLS handshake within `connect_timeout`; a failure is logged, counted and
/// closes the connection.
async fn tls_handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    sh: &ProxyShared,
) -> Option<TlsStream<TcpStream>> {
    match timeout(sh.connect_timeout, acceptor.accept(stream)).await {
        Ok(Ok(s)) => {
            Metrics::inc(&sh.metrics.tls_handshakes);
            Some(s)
        }
        Ok(Err(e)) => {
            Metrics::inc(&sh.metrics.tls_handshake_failures);
            info!(%peer, error = %e, "TLS handshake failed; closing");
            None
        }
        Err(_) => {
            Metrics::inc(&sh.metrics.tls_handshake_failures);
            info!(%peer, "TLS handshake not done within connect_timeout; closing");
            None
        }
    }
}

/// The two halves of a client connection, plain or TLS, where speed does not matter (the
/// relay itself is generic, see [`connection`]).
type ClientHalves = (
    Box<dyn AsyncRead + Unpin + Send>,
    Box<dyn AsyncWrite + Unpin + Send>,
);

/// A client connection: plain TCP (split into owned halves) or TLS (split by tokio).
async fn client_stream(
    stream: TcpStream,
    peer: SocketAddr,
    sh: &ProxyShared,
    tls: Option<TlsAcceptor>,
) -> Option<ClientHalves> {
    let halves: ClientHalves = match tls {
        None => {
            let (r, w) = stream.into_split();
            (Box::new(r), Box::new(w))
        }
        Some(acceptor) => {
            let s = tls_handshake(acceptor, stream, peer, sh).await?;
            let (r, w) = tokio::io::split(s);
            (Box::new(r), Box::new(w))
        }
    };
    Some(halves)
}

async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<ProxyShared>,
    _permit: OwnedSemaphorePermit,
    tls: Option<TlsAcceptor>,
) {
    Metrics::inc(&shared.metrics.connections_active);
    let _active = ActiveGuard(shared.metrics.clone());
    let mut shutdown = shared.shutdown.clone();
    let run = async {
        match tls {
            None => {
                let (rd, wr) = stream.into_split();
                connection(rd, wr, peer, &shared, None).await
            }
            Some(acceptor) => match tls_handshake(acceptor, stream, peer, &shared).await {
                Some(s) => {
                    // Verified during the handshake when client certificates are on.
                    let cert = s
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(crate::tls::principal);
                    let (rd, wr) = tokio::io::split(s);
                    connection(rd, wr, peer, &shared, cert).await
                }
                None => Ok(()),
            },
        }
    };
    tokio::select! {
        r = run => {
            if let Err(e) = r {
                if e.is_protocol_error() {
                    Metrics::inc(&shared.metrics.protocol_errors);
                    info!(%peer, error = %e, "connection closed");
                } else {
                    debug!(%peer, error = %e, "connection closed");
                }
            }
        }
        _ = shutdown.wait_for(|s| *s) => {}
    }
}

/// Tells a client over the connection limit that the server is busy.
async fn refuse_busy(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<ProxyShared>,
    _permit: OwnedSemaphorePermit,
    tls: Option<TlsAcceptor>,
) {
    let wait = shared.connect_timeout.min(Duration::from_secs(2));
    let Some((rd, mut wr)) = client_stream(stream, peer, &shared, tls).await else {
        return;
    };
    let mut reader = FrameReader::new(rd);
    if let Ok(Ok(c)) = timeout(wait, read_connect(&mut reader)).await {
        let code = match c.version {
            Version::V4 => 0x03,
            Version::V5 => 0x89,
        };
        let _ = timeout(
            wait,
            wr.write_all(&codec::ConnAck::code(code).encode(c.version)),
        )
        .await;
    }
}

/// What the first packet turned out to be, when it is not a usable CONNECT.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("{0}")]
    Conn(#[from] ConnError),
    #[error("first packet is not CONNECT")]
    NotConnect,
}

async fn read_connect<R: AsyncRead + Unpin>(
    r: &mut FrameReader<R>,
) -> Result<Connect, ConnectError> {
    let h = loop {
        match r.header().map_err(ConnError::from)? {
            Some(h) => break h,
            None => {
                if !r.fill().await.map_err(ConnError::from)? {
                    return Err(ConnError::Eof.into());
                }
            }
        }
    };
    if h.byte0 != codec::CONNECT << 4 {
        return Err(ConnectError::NotConnect);
    }
    if h.remaining > CONNECT_CAP {
        return Err(ConnError::FrameTooLarge(h.remaining).into());
    }
    r.ensure(h.frame_len()).await?;
    let c = codec::parse_connect(&r.buf[h.header_len..h.frame_len()]).map_err(ConnError::from)?;
    r.buf.advance(h.frame_len());
    Ok(c)
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    BadId(&'static str),
    BadAuth(&'static str),
    NotAuthorized(&'static str),
    BadAuthMethod,
    WillDenied,
    Unavailable,
}

impl Refusal {
    fn code(self, v: Version) -> u8 {
        match (self, v) {
            (Refusal::BadId(_), Version::V4) => 0x02,
            (Refusal::BadId(_), Version::V5) => 0x85,
            (Refusal::BadAuth(_), Version::V4) | (Refusal::BadAuthMethod, Version::V4) => 0x04,
            (Refusal::BadAuth(_), Version::V5) => 0x86,
            (Refusal::BadAuthMethod, Version::V5) => 0x8c,
            (Refusal::NotAuthorized(_) | Refusal::WillDenied, Version::V4) => 0x05,
            (Refusal::NotAuthorized(_) | Refusal::WillDenied, Version::V5) => 0x87,
            (Refusal::Unavailable, Version::V4) => 0x03,
            (Refusal::Unavailable, Version::V5) => 0x88,
        }
    }

    fn count(self, m: &Metrics) {
        Metrics::inc(match self {
            Refusal::BadId(_) => &m.connects_refused_bad_id,
            Refusal::BadAuth(_) | Refusal::NotAuthorized(_) | Refusal::BadAuthMethod => {
                &m.connects_refused_bad_auth
            }
            Refusal::WillDenied => &m.connects_refused_acl,
            Refusal::Unavailable => &m.connects_refused_unavailable,
        });
    }
}

/// An admitted client.
#[derive(Debug, Clone)]
struct Admitted {
    principal: String,
    /// The client id as the client knows it (assigned when it sent none).
    client_id: String,
    assigned: bool,
    /// The client id rumqttd sees: `u:{principal}:{client_id}` after a login,
    /// `a:{client_id}` for anonymous clients. The prefix keeps principals from taking
    /// over each other's sessions (rumqttd drops the older connection of a client id).
    internal_id: String,
}

fn random_suffix() -> String {
    let mut b = [0u8; 16];
    rand::fill(&mut b[..]);
    data_encoding::HEXLOWER.encode(&b)
}

fn admit(
    c: &Connect,
    sh: &ProxyShared,
    cert: Option<Result<String, &'static str>>,
) -> Result<Admitted, Refusal> {
    let (client_id, assigned) = if c.client_id.is_empty() {
        if c.version == Version::V4 && !c.clean {
            return Err(Refusal::BadId("empty client id needs a clean session"));
        }
        (format!("anon-{}", random_suffix()), true)
    } else if acl::valid_name(&c.client_id) {
        (c.client_id.clone(), false)
    } else {
        return Err(Refusal::BadId(
            "client id must be 1-64 of A-Z a-z 0-9 _ . -",
        ));
    };
    if c.version == Version::V5 && c.properties.get(prop::AUTH_METHOD).is_some() {
        return Err(Refusal::BadAuthMethod);
    }
    let (principal, logged_in) = match (cert, &c.username, &c.password) {
        // A client certificate: its CN is the principal (mosquitto's
        // `use_identity_as_username`); a password, if any, is not checked.
        (Some(Err(why)), _, _) => return Err(Refusal::NotAuthorized(why)),
        (Some(Ok(cn)), user, _) => {
            if !acl::valid_name(&cn) {
                return Err(Refusal::NotAuthorized(
                    "the client certificate's CN is not a principal name (1-64 of A-Z a-z 0-9 _ . -)",
                ));
            }
            if user.as_ref().is_some_and(|u| *u != cn) {
                return Err(Refusal::BadAuth(
                    "user name differs from the client certificate's CN",
                ));
            }
            (cn, true)
        }
        (None, Some(user), Some(password)) => {
            let ok = acl::valid_name(user)
                && sh
                    .credentials
                    .as_ref()
                    .is_some_and(|store| store.verify(user, password));
            if !ok {
                return Err(Refusal::BadAuth("wrong user name or password"));
            }
            (user.clone(), true)
        }
        (None, Some(_), None) | (None, None, Some(_)) => {
            return Err(Refusal::BadAuth("user name and password go together"));
        }
        (None, None, None) => {
            if !sh.anonymous {
                return Err(Refusal::NotAuthorized("anonymous access is disabled"));
            }
            if sh
                .credentials
                .as_ref()
                .is_some_and(|s| s.contains(&client_id))
            {
                return Err(Refusal::NotAuthorized(
                    "client id is a registered agent name; log in as it",
                ));
            }
            (client_id.clone(), false)
        }
    };
    if let Some(w) = &c.will
        && !acl::may_publish(&principal, &w.topic)
    {
        return Err(Refusal::WillDenied);
    }
    let internal_id = if logged_in {
        format!("u:{principal}:{client_id}")
    } else {
        format!("a:{client_id}")
    };
    Ok(Admitted {
        principal,
        client_id,
        assigned,
        internal_id,
    })
}

async fn send_connack<W: AsyncWrite + Unpin>(
    w: &mut W,
    ack: &codec::ConnAck,
    v: Version,
    m: &Metrics,
) -> io::Result<()> {
    let bytes = ack.encode(v);
    Metrics::inc(&m.frames_out);
    Metrics::add(&m.bytes_out, bytes.len() as u64);
    w.write_all(&bytes).await?;
    w.flush().await
}

async fn read_connack<R: AsyncRead + Unpin>(
    r: &mut FrameReader<R>,
    v: Version,
) -> Result<codec::ConnAck, ConnError> {
    let h = loop {
        match r.header()? {
            Some(h) => break h,
            None => {
                if !r.fill().await? {
                    return Err(ConnError::Eof);
                }
            }
        }
    };
    if h.kind() != codec::CONNACK {
        return Err(ConnError::Protocol("rumqttd did not answer with CONNACK"));
    }
    if h.remaining > CONNECT_CAP {
        return Err(ConnError::FrameTooLarge(h.remaining));
    }
    r.ensure(h.frame_len()).await?;
    let ack = codec::parse_connack(&r.buf[h.header_len..h.frame_len()], v)?;
    r.buf.advance(h.frame_len());
    Ok(ack)
}

/// One client connection. `cert` is the principal the client's verified TLS certificate
/// names (or why it names none), when the TLS listener requires client certificates.
async fn connection<R, W>(
    crd: R,
    cwr: W,
    peer: SocketAddr,
    sh: &ProxyShared,
    cert: Option<Result<String, &'static str>>,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let m = &sh.metrics;
    let mut client = FrameReader::new(crd);
    let mut cw = BufWriter::with_capacity(WRITE_BUF, cwr);

    // 1. The CONNECT.
    let connect = match timeout(sh.connect_timeout, read_connect(&mut client)).await {
        Err(_) => {
            Metrics::inc(&m.connects_refused_timeout);
            debug!(%peer, "no CONNECT in time");
            return Ok(());
        }
        Ok(Err(ConnectError::Conn(ConnError::Codec(CodecError::UnsupportedProtocol(level))))) => {
            Metrics::inc(&m.connects_refused_garbage);
            info!(%peer, level, "unsupported MQTT protocol level");
            // MQTT 3.1.1 §3.1.2.2: CONNACK 0x01, then close.
            let _ = send_connack(&mut cw, &codec::ConnAck::code(0x01), Version::V4, m).await;
            return Ok(());
        }
        Ok(Err(ConnectError::Conn(ConnError::Io(_) | ConnError::Eof))) => {
            Metrics::inc(&m.connects_refused_garbage);
            debug!(%peer, "closed before CONNECT");
            return Ok(());
        }
        Ok(Err(e)) => {
            Metrics::inc(&m.connects_refused_garbage);
            info!(%peer, error = %e, "not an MQTT CONNECT; closing");
            return Ok(());
        }
        Ok(Ok(c)) => c,
    };
    Metrics::inc(&m.frames_in);
    let version = connect.version;

    // 2. Who is it, and may it?
    let admitted = match admit(&connect, sh, cert) {
        Ok(a) => a,
        Err(refusal) => {
            refusal.count(m);
            info!(%peer, client_id = %connect.client_id, user = ?connect.username, ?refusal, "CONNECT refused");
            send_connack(
                &mut cw,
                &codec::ConnAck::code(refusal.code(version)),
                version,
                m,
            )
            .await?;
            return Ok(());
        }
    };

    // 3. The upstream connection to rumqttd, once a previous connection with the same
    // rumqttd client id is completely gone (see `sessions`).
    let Some(mut takeover) = sh
        .sessions
        .take_over(&admitted.internal_id, sh.connect_timeout + LINGER)
        .await
    else {
        Refusal::Unavailable.count(m);
        info!(%peer, client_id = %admitted.client_id, "previous connection did not close in time");
        let ack = codec::ConnAck::code(Refusal::Unavailable.code(version));
        send_connack(&mut cw, &ack, version, m).await?;
        return Ok(());
    };
    let endpoint = sh.endpoints.borrow().get(version).clone();
    let _endpoint_guard = EndpointGuard::new(&endpoint.active);
    let refuse_unavailable = |why: String| {
        Refusal::Unavailable.count(m);
        warn!(%peer, endpoint = %endpoint.addr, error = %why, "rumqttd unavailable");
        codec::ConnAck::code(Refusal::Unavailable.code(version))
    };
    let upstream = match timeout(sh.connect_timeout, TcpStream::connect(endpoint.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let ack = refuse_unavailable(e.to_string());
            send_connack(&mut cw, &ack, version, m).await?;
            return Ok(());
        }
        Err(_) => {
            let ack = refuse_unavailable("connect timed out".into());
            send_connack(&mut cw, &ack, version, m).await?;
            return Ok(());
        }
    };
    upstream.set_nodelay(true)?;
    let (urd, uwr) = upstream.into_split();
    let mut up = FrameReader::new(urd);
    if endpoint.quickack && sh.defences.upstream_quickack {
        // rumqttd's side has Nagle on: acknowledge its segments at once (see `nodelay`).
        Metrics::inc(&m.upstream_quickack_connections);
        nodelay::rearm_quickack(&up.rd);
        up.after_read = Some(nodelay::rearm_quickack);
    }
    let mut uw = BufWriter::with_capacity(WRITE_BUF, uwr);

    let mut inner = connect;
    inner.client_id = admitted.internal_id.clone();
    inner.username = Some(sh.auth.user.clone());
    inner.password = Some(bytes::Bytes::copy_from_slice(sh.auth.secret.as_bytes()));
    if inner.keep_alive == 0 {
        inner.keep_alive = KEEP_ALIVE_FOR_ZERO;
    }
    if version == Version::V5 && sh.defences.strip_topic_alias_max {
        // rumqttd keys server topic aliases by subscription filter, so with aliases on,
        // wildcard subscribers get messages under the wrong topic. Without this property
        // rumqttd never creates server aliases (router/connection.rs `topic_alias_max`).
        inner.properties.remove(prop::TOPIC_ALIAS_MAX);
    }
    uw.write_all(&inner.encode()).await?;
    uw.flush().await?;
    // Hold the upstream open until rumqttd answers: closing it before the CONNACK is
    // written is one of the ways to trigger rumqttd's stale-will panic.
    let mut ack = match timeout(sh.connect_timeout, read_connack(&mut up, version)).await {
        Ok(Ok(ack)) => ack,
        Ok(Err(e)) => {
            let ack = refuse_unavailable(e.to_string());
            send_connack(&mut cw, &ack, version, m).await?;
            return Ok(());
        }
        Err(_) => {
            let ack = refuse_unavailable("no CONNACK in time".into());
            send_connack(&mut cw, &ack, version, m).await?;
            return Ok(());
        }
    };
    if ack.code != 0 {
        Refusal::Unavailable.count(m);
        warn!(%peer, code = ack.code, "rumqttd refused a proxied CONNECT");
        send_connack(&mut cw, &codec::ConnAck::code(ack.code), version, m).await?;
        return Ok(());
    }
    if version == Version::V5 {
        ack.properties
            .set_u16(prop::TOPIC_ALIAS_MAX, CLIENT_TOPIC_ALIAS_MAX);
        ack.properties.remove(prop::ASSIGNED_CLIENT_ID);
        if admitted.assigned {
            ack.properties
                .set_str(prop::ASSIGNED_CLIENT_ID, &admitted.client_id);
        }
        let max_packet = sh.limits.max_frame_bytes + 5;
        ack.properties.set_u32(
            prop::MAX_PACKET_SIZE,
            u32::try_from(max_packet).unwrap_or(u32::MAX),
        );
    }
    send_connack(&mut cw, &ack, version, m).await?;
    debug!(%peer, principal = %admitted.principal, client_id = %admitted.client_id, ?version, "client connected");

    // 4. Relay.
    let (inject_tx, inject_rx) = mpsc::channel(INJECT_DEPTH);
    let (registration, direct_rx) =
        sh.direct
            .register(&admitted.principal, &inner, inner.keep_alive);
    let direct = registration.conn.clone();
    if let Some(w) = inner
        .will
        .as_ref()
        .filter(|w| w.retain && !w.payload.is_empty())
    {
        // rumqttd may publish it retained (see `direct`).
        sh.direct.retained(&w.topic, false);
    }
    let flow = sh.flow.connection();
    let meter = flow.meter();
    let subacks = Arc::new(SubAcks::default());
    let mut session = Session {
        subacks: subacks.clone(),
        principal: admitted.principal,
        version,
        sh,
        aliases: vec![None; usize::from(CLIENT_TOPIC_ALIAS_MAX) + 1],
        alias_bytes: 0,
        denial_logged: false,
        inject: inject_tx,
        flow,
        direct: direct.clone(),
        routes: direct::Routes::default(),
    };
    let (result, taken_over) = tokio::select! {
        r = session.client_to_broker(&mut client, &mut uw) => (r, false),
        r = broker_to_client(&mut up, &mut cw, (inject_rx, direct_rx), sh, version, &meter, (&subacks, &direct)) => (r, false),
        _ = takeover.superseded() => (Ok(()), true),
    };
    drop(session);
    drop(registration);
    if taken_over {
        info!(%peer, client_id = %admitted.client_id, "session taken over by a new connection");
        if version == Version::V5 {
            let _ = timeout(LINGER, async {
                cw.write_all(&codec::encode_disconnect_v5(0x8e)).await?;
                cw.flush().await
            })
            .await;
        }
    }
    drop(client);
    drop(cw);
    linger(&mut up, &mut uw).await;
    drop(takeover);
    result
}

/// Closes the upstream the way rumqttd copes with: half-close, then wait (at most
/// [`LINGER`]) until rumqttd has closed its side, which it does only after it queued
/// the disconnection in its router.
async fn linger<R, W>(up: &mut FrameReader<R>, uw: &mut W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let _ = timeout(LINGER, async {
        let _ = uw.shutdown().await;
        loop {
            up.buf.clear();
            match up.fill().await {
                Ok(true) => continue,
                Ok(false) | Err(_) => return,
            }
        }
    })
    .await;
}

/// Frames the client side asks the broker side to write to the client.
enum Inject {
    Frame(BytesMut),
    /// Write this (if any), flush and end the connection.
    Close(Option<BytesMut>),
}

/// What became of a client's PUBLISH on a relayed topic (see [`Session::try_direct`]).
enum Relayed {
    /// Delivered directly, or to nobody: answer it.
    Done,
    /// Forward it; the connections of the route (if any) wait for it.
    Rumqttd(Option<Arc<direct::Route>>),
}

struct Session<'a> {
    principal: String,
    version: Version,
    sh: &'a ProxyShared,
    /// Client topic aliases (v5), as forwarded to rumqttd.
    aliases: Vec<Option<String>>,
    alias_bytes: usize,
    denial_logged: bool,
    inject: mpsc::Sender<Inject>,
    /// This connection's QoS 1 flow-control state.
    flow: flow::Conn<'a>,
    /// This connection's SUBSCRIBEs not yet acknowledged by rumqttd.
    subacks: Arc<SubAcks>,
    /// This connection's subscriptions and packet ids for direct delivery.
    direct: Arc<direct::Conn>,
    /// Who this connection's topics reach, for direct delivery.
    routes: direct::Routes,
}

impl Session<'_> {
    async fn client_to_broker<R, W>(
        &mut self,
        client: &mut FrameReader<R>,
        uw: &mut W,
    ) -> Result<(), ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        match self.relay(client, uw).await {
            Ok(()) => {
                uw.flush().await?;
                Ok(())
            }
            Err(e) => {
                let reason = match self.version {
                    Version::V5 => e.disconnect_reason(),
                    Version::V4 => None,
                };
                let Some(reason) = reason else {
                    return Err(e);
                };
                // Let the broker-side task write the DISCONNECT and end the connection.
                if e.is_protocol_error() {
                    Metrics::inc(&self.sh.metrics.protocol_errors);
                }
                info!(principal = %self.principal, error = %e, reason, "closing connection");
                let frame = codec::encode_disconnect_v5(reason);
                if self.inject.send(Inject::Close(Some(frame))).await.is_ok() {
                    // The other task ends the connection once the frame is out.
                    tokio::time::sleep(WRITE_STALL).await;
                }
                // Already counted and logged.
                Ok(())
            }
        }
    }

    async fn relay<R, W>(
        &mut self,
        client: &mut FrameReader<R>,
        uw: &mut W,
    ) -> Result<(), ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let m = &self.sh.metrics;
        loop {
            let Some(h) = client.header()? else {
                uw.flush().await?;
                if !client.fill().await? {
                    return if client.buf.is_empty() {
                        Ok(())
                    } else {
                        Err(ConnError::Eof)
                    };
                }
                continue;
            };
            codec::check_client_flags(&h, self.version)?;
            if h.remaining > self.sh.limits.max_frame_bytes {
                return Err(ConnError::FrameTooLarge(h.remaining));
            }
            Metrics::inc(&m.frames_in);
            Metrics::add(&m.bytes_in, h.frame_len() as u64);
            match h.kind() {
                codec::PUBLISH => self.publish(h, client, uw).await?,
                codec::SUBSCRIBE => self.subscribe(h, client, uw).await?,
                codec::UNSUBSCRIBE => self.unsubscribe(h, client, uw).await?,
                codec::CONNECT => return Err(ConnError::Protocol("second CONNECT")),
                codec::AUTH => {
                    return Err(ConnError::Protocol("AUTH without an authentication method"));
                }
                codec::PUBACK => {
                    client.ensure(h.frame_len()).await?;
                    let pkid = codec::ack_pkid(&client.buf[h.header_len..h.frame_len()])?;
                    match self.direct.puback(pkid) {
                        direct::Ack::Forward => client.forward(h.frame_len(), uw).await?,
                        direct::Ack::Keep => client.skip(h.frame_len()).await?,
                        direct::Ack::KeepAndPing => {
                            client.skip(h.frame_len()).await?;
                            uw.write_all(&[codec::PINGREQ << 4, 0]).await?;
                        }
                    }
                }
                codec::DISCONNECT => {
                    client.forward(h.frame_len(), uw).await?;
                    uw.flush().await?;
                    // Do not close the upstream: let rumqttd close it. If rumqttd's link
                    // saw our EOF before its router handled the DISCONNECT, it would
                    // report the disconnection twice, and the second report can hit a
                    // new connection that reused the slot (connection ids are slab
                    // indices): that kills innocent connections, even the node link.
                    tokio::time::sleep(DISCONNECT_GRACE).await;
                    return Ok(());
                }
                _ => client.forward(h.frame_len(), uw).await?,
            }
        }
    }

    async fn publish<R, W>(
        &mut self,
        h: FixedHeader,
        client: &mut FrameReader<R>,
        uw: &mut W,
    ) -> Result<(), ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let inspect = h.remaining.min(INSPECT_CAP);
        client.ensure(h.header_len + inspect).await?;
        let body = &client.buf[h.header_len..h.header_len + inspect];
        let ph = match codec::parse_publish(h.flags(), body, self.version) {
            Ok(p) => p,
            Err(CodecError::Truncated) if inspect < h.remaining => {
                return Err(ConnError::HeaderTooLarge);
            }
            Err(e) => return Err(e.into()),
        };
        let payload = h.remaining - ph.header_len;
        if payload > self.sh.limits.max_payload_bytes {
            return Err(ConnError::PayloadTooLarge(payload));
        }
        let (topic, new_alias) = match ph.topic_alias {
            None => (ph.topic, None),
            Some(a) if a > CLIENT_TOPIC_ALIAS_MAX => return Err(ConnError::AliasInvalid(a)),
            Some(a) if ph.topic.is_empty() => match &self.aliases[usize::from(a)] {
                Some(t) => (t.clone(), None),
                None => return Err(ConnError::Protocol("unknown topic alias")),
            },
            Some(a) => (ph.topic, Some(a)),
        };
        if acl::may_publish(&self.principal, &topic) {
            if let Some(a) = new_alias {
                // Recorded only for forwarded packets, so this table and rumqttd's agree.
                let old = self.aliases[usize::from(a)].as_ref().map_or(0, String::len);
                let bytes = self.alias_bytes - old + topic.len();
                if bytes > ALIAS_BYTES_MAX {
                    return Err(ConnError::AliasQuota);
                }
                self.alias_bytes = bytes;
                self.aliases[usize::from(a)] = Some(topic.clone());
            }
            let handed = self
                .hand_to_node(h, ph.header_len, &topic, client, uw)
                .await?;
            if handed
                && ph.qos <= 1
                && h.flags() & 0x01 == 0
                && self.sh.direct.keeps(&self.principal, &topic, &self.direct)
            {
                // The node has it and no client could receive it through rumqttd: answer
                // here instead of forwarding (see `direct`).
                return self.answer(h, ph.pkid, client, uw).await;
            }
            let route = match self
                .try_direct(
                    h,
                    (ph.qos, ph.plain, ph.header_len),
                    &topic,
                    new_alias.is_some(),
                    client,
                )
                .await?
            {
                Relayed::Done => return self.answer(h, ph.pkid, client, uw).await,
                Relayed::Rumqttd(route) => route,
            };
            // Charge the message to its subscribers before rumqttd can deliver it, or drop a
            // QoS 0 one that only reaches subscribers far behind (see `flow`).
            let behind = match self
                .flow
                .charge(&topic, flow::cost(topic.len(), payload), ph.qos)
            {
                flow::Charge::Forward(behind) => behind,
                flow::Charge::Drop => return client.skip(h.frame_len()).await,
            };
            if let Some(route) = route {
                // Direct messages after it must not overtake it (see `direct`).
                let payload_len = h.remaining - ph.header_len;
                let start = h.header_len + ph.header_len;
                client
                    .ensure(start + payload_len.min(direct::MARK_PREFIX))
                    .await?;
                let prefix = &client.buf[start..start + payload_len.min(direct::MARK_PREFIX)];
                self.sh
                    .direct
                    .route_behind(&route, &topic, payload_len, prefix);
            }
            if h.flags() & 0x01 != 0 {
                // New subscribers wait for it (see `direct`).
                self.sh.direct.retained(&topic, payload == 0);
            }
            if ph.qos > 0 {
                self.direct.forwarded_publish();
            }
            client.forward(h.frame_len(), uw).await?;
            if !behind.is_empty() {
                // Let rumqttd have what is buffered, then stop reading from this client
                // until the subscribers caught up (TCP pushes back on the publisher).
                uw.flush().await?;
                self.flow.wait(behind).await;
            }
            return Ok(());
        }
        Metrics::inc(&self.sh.metrics.acl_denied_publish);
        client.skip(h.frame_len()).await?;
        if self.version == Version::V4 && ph.qos > 0 {
            // MQTT 3.1.1 has no negative PUBACK: the server acks or closes (§3.3.5).
            warn!(principal = %self.principal, %topic, "PUBLISH denied by ACL; closing MQTT 3.1.1 connection");
            return Err(ConnError::Denied(topic));
        }
        if self.denial_logged {
            debug!(principal = %self.principal, %topic, "PUBLISH denied by ACL");
        } else {
            self.denial_logged = true;
            warn!(principal = %self.principal, %topic, "PUBLISH denied by ACL (further denials on this connection log at debug)");
        }
        let ack = match (ph.qos, ph.pkid) {
            (1, Some(pkid)) => Some(codec::encode_ack_v5(codec::PUBACK, pkid, 0x87)),
            (2, Some(pkid)) => Some(codec::encode_ack_v5(codec::PUBREC, pkid, 0x87)),
            _ => None,
        };
        if let Some(ack) = ack {
            self.inject(ack).await?;
        }
        Ok(())
    }

    /// Tries to deliver a client's PUBLISH on a relayed topic directly (see `direct`).
    /// `Rumqttd(Some(route))`: it goes through rumqttd, and the connections on `route` must
    /// wait for it there.
    async fn try_direct<R: AsyncRead + Unpin>(
        &mut self,
        h: FixedHeader,
        (qos, plain, vh_len): (u8, bool, usize),
        topic: &str,
        sets_alias: bool,
        client: &mut FrameReader<R>,
    ) -> Result<Relayed, ConnError> {
        let d = &self.sh.direct;
        if !d.relays(topic) {
            return Ok(Relayed::Rumqttd(None));
        }
        let route = self.routes.get(d, topic);
        if qos > 1
            || h.flags() & 0x01 != 0
            || sets_alias
            || (qos == 1 && self.direct.has_publishes_at_rumqttd())
        {
            // QoS 2 and retained messages are rumqttd's; rumqttd must learn every topic
            // alias (a later PUBLISH using it may go to rumqttd); a direct PUBACK would
            // overtake rumqttd's for an earlier PUBLISH.
            d.relay_fallback();
            return Ok(Relayed::Rumqttd(Some(route)));
        }
        let whole = plain && h.remaining <= INSPECT_CAP;
        let outcome = if whole {
            // `publish` has the whole frame in the buffer already.
            client.ensure(h.frame_len()).await?;
            let m = direct::Message {
                topic,
                payload: &client.buf[h.header_len + vh_len..h.frame_len()],
                qos,
                correlation: None,
            };
            d.relay(&route, Some(&m))
        } else {
            d.relay(&route, None)
        };
        Ok(match outcome {
            direct::Relay::Delivered | direct::Relay::Nobody => Relayed::Done,
            direct::Relay::Rumqttd => Relayed::Rumqttd(Some(route)),
        })
    }

    /// The proxy took a client's PUBLISH instead of forwarding it: drop its bytes,
    /// acknowledge it (QoS 1), and ping rumqttd if the client's Keep Alive needs it.
    async fn answer<R, W>(
        &mut self,
        h: FixedHeader,
        pkid: Option<u16>,
        client: &mut FrameReader<R>,
        uw: &mut W,
    ) -> Result<(), ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        client.skip(h.frame_len()).await?;
        if let Some(pkid) = pkid {
            let ack = match self.version {
                Version::V4 => codec::encode_ack_v4(codec::PUBACK, pkid),
                Version::V5 => codec::encode_ack_v5(codec::PUBACK, pkid, 0),
            };
            self.inject(ack).await?;
        }
        if self.direct.ping_due() {
            uw.write_all(&[codec::PINGREQ << 4, 0]).await?;
        }
        Ok(())
    }

    /// Hands a PUBLISH on one of this principal's API topics to the node (see the module
    /// docs), once rumqttd has acknowledged this connection's earlier SUBSCRIBEs; other topics
    /// (and `inbox`, and what reaches the node through its link) are left alone. The frame
    /// stays in `client`'s buffer, to be forwarded to rumqttd next.
    async fn hand_to_node<R, W>(
        &mut self,
        h: FixedHeader,
        variable_header_len: usize,
        topic: &str,
        client: &mut FrameReader<R>,
        uw: &mut W,
    ) -> Result<bool, ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let Some((role, _, op)) = acl::parse_principal_topic(topic) else {
            return Ok(false);
        };
        if op == acl::INBOX_OP || acl::reaches_node_via_link(role, op) {
            return Ok(false);
        }
        let op = op.to_owned();
        let m = &self.sh.metrics;
        if self.sh.defences.node_publish_after_suback
            && self.subacks.pending.load(Ordering::Acquire) > 0
        {
            // rumqttd must have the SUBSCRIBEs before it can acknowledge them.
            uw.flush().await?;
            if self.subacks.settled(SUBACK_WAIT).await {
                Metrics::inc(&m.suback_wait_timeouts);
                warn!(principal = %self.principal, %topic, "rumqttd did not acknowledge a SUBSCRIBE in time; handing the PUBLISH to the node anyway");
            }
        }
        client.ensure(h.frame_len()).await?;
        let body = &client.buf[h.header_len..h.frame_len()];
        let (response_topic, correlation_data) = match self.version {
            Version::V5 => {
                let (_, props) = codec::publish_properties(h.flags(), body)?;
                let response_topic = props
                    .get_binary(prop::RESPONSE_TOPIC)
                    .map(|t| String::from_utf8_lossy(t).into_owned());
                let correlation = props
                    .get_binary(prop::CORRELATION_DATA)
                    .map(Bytes::copy_from_slice);
                (response_topic, correlation)
            }
            Version::V4 => (None, None),
        };
        let msg = Inbound {
            principal: self.principal.clone(),
            role,
            op,
            topic: topic.to_owned(),
            payload: Bytes::copy_from_slice(body.get(variable_header_len..).unwrap_or_default()),
            response_topic,
            correlation_data,
        };
        if self.sh.to_node.try_send(msg).is_err() {
            Metrics::inc(&m.inbound_dropped);
            return Ok(false);
        }
        Ok(true)
    }

    async fn subscribe<R, W>(
        &mut self,
        h: FixedHeader,
        client: &mut FrameReader<R>,
        uw: &mut W,
    ) -> Result<(), ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let sub = codec::parse_subscribe(client.body(&h, SUBSCRIBE_CAP).await?, self.version)?;
        let denied: Vec<&String> = sub
            .filters
            .iter()
            .filter(|f| !acl::may_subscribe(&self.principal, f))
            .collect();
        // rumqttd disconnects a client that subscribes to a `$` filter other than
        // `$share/...` (router `validate_subscription`): answer it ourselves instead.
        let unsupported = sub
            .filters
            .iter()
            .any(|f| f.starts_with('$') && !f.starts_with("$share/"));
        if denied.is_empty() && !unsupported {
            self.flow.subscribed(&sub.filters, &sub.qos);
            self.direct.subscribing(&sub);
            self.subacks.sent();
            return client.forward(h.frame_len(), uw).await;
        }
        let code = if denied.is_empty() {
            debug!(principal = %self.principal, filters = ?sub.filters, "SUBSCRIBE to a `$` filter rumqttd cannot serve");
            match self.version {
                Version::V4 => 0x80,
                Version::V5 => 0x8f,
            }
        } else {
            Metrics::add(&self.sh.metrics.acl_denied_subscribe, denied.len() as u64);
            warn!(principal = %self.principal, filters = ?denied, "SUBSCRIBE denied by ACL");
            match self.version {
                Version::V4 => 0x80,
                Version::V5 => 0x87,
            }
        };
        let codes = vec![code; sub.filters.len()];
        client.skip(h.frame_len()).await?;
        self.inject(codec::encode_suback(sub.pkid, &codes, self.version))
            .await
    }

    async fn unsubscribe<R, W>(
        &mut self,
        h: FixedHeader,
        client: &mut FrameReader<R>,
        uw: &mut W,
    ) -> Result<(), ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let filters =
            codec::parse_unsubscribe(client.body(&h, SUBSCRIBE_CAP).await?, self.version)?;
        self.flow.unsubscribed(&filters);
        self.direct.unsubscribed(&filters);
        client.forward(h.frame_len(), uw).await
    }

    async fn inject(&self, frame: BytesMut) -> Result<(), ConnError> {
        self.inject
            .send(Inject::Frame(frame))
            .await
            .map_err(|_| ConnError::Eof)
    }
}

async fn write_client<W: AsyncWrite + Unpin>(
    cw: &mut W,
    bytes: &[u8],
    m: &Metrics,
) -> Result<(), ConnError> {
    Metrics::inc(&m.frames_out);
    Metrics::add(&m.bytes_out, bytes.len() as u64);
    timeout(WRITE_STALL, cw.write_all(bytes))
        .await
        .map_err(|_| ConnError::Stalled)??;
    Ok(())
}

async fn broker_to_client<R, W>(
    up: &mut FrameReader<R>,
    cw: &mut W,
    (mut inject, mut direct_rx): (mpsc::Receiver<Inject>, mpsc::Receiver<BytesMut>),
    sh: &ProxyShared,
    version: Version,
    meter: &Subscriber,
    (subacks, direct): (&SubAcks, &direct::Conn),
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let m = &sh.metrics;
    let low = sh.flow.low();
    loop {
        // The proxy's own frames and the node's direct messages go out between broker
        // frames, never inside one.
        while let Ok(f) = direct_rx.try_recv() {
            write_client(cw, &f, m).await?;
        }
        while let Ok(i) = inject.try_recv() {
            match i {
                Inject::Frame(f) => write_client(cw, &f, m).await?,
                Inject::Close(f) => {
                    if let Some(f) = f {
                        write_client(cw, &f, m).await?;
                    }
                    let _ = timeout(WRITE_STALL, cw.flush()).await;
                    return Ok(());
                }
            }
        }
        let Some(h) = up.header()? else {
            timeout(WRITE_STALL, cw.flush())
                .await
                .map_err(|_| ConnError::Stalled)??;
            tokio::select! {
                i = inject.recv() => match i {
                    Some(Inject::Frame(f)) => write_client(cw, &f, m).await?,
                    Some(Inject::Close(f)) => {
                        if let Some(f) = f {
                            write_client(cw, &f, m).await?;
                        }
                        let _ = timeout(WRITE_STALL, cw.flush()).await;
                        return Ok(());
                    }
                    None => return Ok(()),
                },
                Some(f) = direct_rx.recv() => write_client(cw, &f, m).await?,
                () = tokio::time::sleep(direct::BEHIND_RESYNC), if direct.is_behind() && up.buf.is_empty() => {
                    // rumqttd sent nothing for a while: what this connection waits for may
                    // have been dropped there (see `direct`).
                    direct.resync(m);
                }
                more = up.fill() => {
                    if !more? {
                        let _ = timeout(WRITE_STALL, cw.flush()).await;
                        return Ok(());
                    }
                }
            }
            continue;
        };
        codec::check_server_flags(&h)?;
        match h.kind() {
            codec::PINGRESP if direct.pingresp() => {
                // The answer to a PINGREQ of the proxy's own (see `direct`).
                up.skip(h.frame_len()).await?;
                continue;
            }
            codec::PUBACK | codec::PUBREC => direct.publish_acked(),
            codec::SUBACK => {
                up.ensure(h.frame_len()).await?;
                let (pkid, codes) =
                    codec::parse_suback(&up.buf[h.header_len..h.frame_len()], version)?;
                direct.suback(pkid, &codes);
            }
            codec::PUBLISH if h.flags() & 0x06 != 0 => {
                // The packet id follows the topic.
                up.ensure(h.header_len + 2).await?;
                let at = h.header_len;
                let topic_len = usize::from(u16::from_be_bytes([up.buf[at], up.buf[at + 1]]));
                if 4 + topic_len <= h.remaining {
                    up.ensure(h.header_len + 4 + topic_len).await?;
                    let at = at + 2 + topic_len;
                    direct.rumqttd_publish(
                        (h.flags() >> 1) & 0x03,
                        u16::from_be_bytes([up.buf[at], up.buf[at + 1]]),
                        m,
                    );
                }
            }
            _ => {}
        }
        if version == Version::V5 && h.kind() == codec::PUBLISH && sh.defences.refuse_server_aliases
        {
            let inspect = h.remaining.min(INSPECT_CAP);
            up.ensure(h.header_len + inspect).await?;
            let (topic, props) = codec::publish_properties(
                h.flags(),
                &up.buf[h.header_len..h.header_len + inspect],
            )?;
            if props.get(prop::TOPIC_ALIAS).is_some() {
                tracing::error!(%topic, "rumqttd sent a server topic alias; closing the connection");
                return Err(ConnError::ServerAlias);
            }
        }
        // Topic and variable-header lengths of a PUBLISH, where they are needed.
        let layout = if h.kind() == codec::PUBLISH && (direct.is_behind() || meter.active()) {
            let inspect = h.remaining.min(INSPECT_CAP);
            up.ensure(h.header_len + inspect).await?;
            Some(codec::publish_layout(
                h.flags(),
                &up.buf[h.header_len..h.header_len + inspect],
                version,
            )?)
        } else {
            None
        };
        if let Some((topic_len, header_len)) = layout.filter(|_| direct.is_behind()) {
            // Maybe a message that went through rumqttd: direct messages may follow once all
            // of them are through (see `direct`).
            let payload_len = h.remaining.saturating_sub(header_len);
            let want = header_len + payload_len.min(direct::MARK_PREFIX);
            up.ensure(h.header_len + want).await?;
            let body = &up.buf[h.header_len..h.header_len + want];
            let topic = body.get(2..2 + topic_len).unwrap_or_default();
            direct.relayed(
                sh.direct.mark(
                    topic,
                    payload_len,
                    body.get(header_len..).unwrap_or_default(),
                ),
                h.flags() & 0x01 != 0,
            );
        }
        if h.kind() == codec::PUBLISH && !sh.gate.is_empty() {
            // A message of the node's may wait here for the flush that makes it true.
            up.ensure(h.frame_len()).await?;
            let body = &up.buf[h.header_len..h.frame_len()];
            let (topic_len, header_len) = codec::publish_layout(h.flags(), body, version)?;
            let topic = body.get(2..2 + topic_len).unwrap_or_default();
            let key = sh
                .gate
                .key(topic, body.get(header_len..).unwrap_or_default());
            if sh.gate.is_held(key) {
                Metrics::inc(&m.held_waits);
                timeout(WRITE_STALL, cw.flush())
                    .await
                    .map_err(|_| ConnError::Stalled)??;
                if sh.gate.wait(key, gate::HOLD_LIMIT).await {
                    Metrics::inc(&m.held_timeouts);
                    warn!(limit = ?gate::HOLD_LIMIT, "the node did not release a held message in time; delivering it");
                }
            }
        }
        if let Some((topic_len, header_len)) = layout.filter(|_| meter.active()) {
            meter.delivered(
                flow::cost(topic_len, h.remaining.saturating_sub(header_len)),
                low,
                sh.flow.now_ms(),
            );
        }
        Metrics::inc(&m.frames_out);
        Metrics::add(&m.bytes_out, h.frame_len() as u64);
        let suback = h.kind() == codec::SUBACK;
        timeout(WRITE_STALL, up.forward(h.frame_len(), cw))
            .await
            .map_err(|_| ConnError::Stalled)??;
        if suback {
            subacks.acked();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_have_nodelay() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let (server_side, _) = accept(&listener).await.unwrap();
        assert!(
            server_side.nodelay().unwrap(),
            "accepted socket must have TCP_NODELAY"
        );
        drop(client.await.unwrap());
    }
}
