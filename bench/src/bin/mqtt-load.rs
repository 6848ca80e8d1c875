//! `mqtt-load`: an MQTT 3.1.1 pub/sub load generator measuring throughput, publish →
//! deliver latency, loss and duplicates.
//!
//! Threads: subscribers and as-fast-as-possible publishers share one single-threaded
//! tokio event loop, so the generator uses at most one core and one wake-up serves every
//! socket that is ready (a thread per socket cost ~2.6 context switches per QoS 1 message
//! here, as much CPU as the broker itself). Fixed-rate publishers run on their own OS
//! threads with blocking sockets and `thread::sleep`, which is far more precise than
//! tokio's 1 ms timer. Every socket has TCP_NODELAY; frames are encoded by
//! `fedmesh_bench::mqtt` straight into one buffer per `write`. The generator reports its
//! own CPU time: compare it with the broker's.
//!
//! * Publishers all publish on `--topic`; every subscriber subscribes to it (1 → N
//!   fan-out with `--subscribers N`), at `--qos`.
//! * Each payload starts with a stamp (publisher, sequence number, send time in ns
//!   since an `Instant` shared by the whole process), so subscribers compute latency and
//!   count loss, duplicates and reordering.
//! * `--rate 0` (default) sends as fast as the socket takes it (QoS 1: within a window
//!   of `--inflight` unacknowledged messages per publisher). `--rate R` sends R msg/s in
//!   total on a fixed schedule: a publisher sleeps until the next message is due and
//!   then sends everything due (catch-up after a stall); the stamp is the *scheduled*
//!   time, so latency includes sender lateness (no coordinated omission). How late the
//!   sender itself was is reported as `send_lag`.
//! * `--messages N` (per publisher) or `--duration D` bounds the run; subscribers stop
//!   when they have everything that was sent, or `--drain` after the last message
//!   arrived once publishers are done (or at most `--drain-max` after they are done).
//! * `--sub-delay-us N` makes every subscriber slow: it consumes at most one message per
//!   N µs (it sleeps after each read until the messages read are "processed"), so the
//!   broker has to queue or drop for it.
//! * `--rss-pid PID` samples the resident set size (`VmRSS` in `/proc/PID/status`) of
//!   another process, the broker, every `--rss-every` while the run lasts, and reports
//!   the maximum, the last sample and the series.
//! * `--tls-ca FILE` connects every client over TLS (rustls, *ring*, TLS 1.2/1.3),
//!   trusting the PEM certificates in FILE and checking the broker's certificate against
//!   `--tls-server-name` (default `localhost`); the report says `"tls": true`. The run is
//!   generic over the stream types, chosen once at setup (no dynamic dispatch, so the plain
//!   TCP path is exactly what it is without TLS): event-loop clients use `tokio-rustls`;
//!   a fixed-rate publisher's blocking `rustls::ClientConnection` is shared, behind a
//!   mutex held to encrypt and send or to decrypt but never while waiting for input, with
//!   its PUBACK reader thread, which waits on its own handle of the socket with the same
//!   read timeout as in plain TCP.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use fedmesh_bench::hist::Histogram;
use fedmesh_bench::mqtt::{self, ConnectOptions, Packet};
use fedmesh_bench::stamp::{self, Stamp};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// Messages per publisher when neither `--messages` nor `--duration` is given.
const DEFAULT_MESSAGES: u64 = 200_000;
/// Bytes a publisher writes per `write` call at most (as fast as possible).
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// Initial read buffer per subscriber; it grows only to hold one larger frame.
const READ_BUF: usize = 256 * 1024;
/// Largest frame a subscriber accepts.
const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Read timeout, so that blocked readers notice the end of a run.
const POLL: Duration = Duration::from_millis(20);
/// Time allowed for CONNECT/CONNACK and SUBSCRIBE/SUBACK.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a QoS 1 publisher waits for its last acknowledgements.
const ACK_DRAIN: Duration = Duration::from_secs(10);
/// Fixed rate: how long before a due time a publisher stops sleeping and spins.
const SPIN_WINDOW: Duration = Duration::from_micros(200);
/// Fixed rate: spin only when messages are at least this far apart (so spinning costs
/// at most SPIN_WINDOW / SPIN_MIN_INTERVAL = 40 % of a core).
const SPIN_MIN_INTERVAL: Duration = Duration::from_micros(500);
/// Sequence numbers at or above this are treated as foreign: bounds each duplicate
/// bitmap at 128 MiB (a publisher sending 2^30 messages, 18 min at 1 M msg/s).
const MAX_SEQ: u64 = 1 << 30;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "mqtt-load",
    version,
    about = "MQTT 3.1.1 pub/sub load generator: throughput, latency, loss"
)]
struct Args {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// QoS of publishes and subscriptions (0 or 1).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Payload size in bytes (at least 32: the stamp).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Publishing connections.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    publishers: u32,
    /// Subscribing connections (each receives every message: fan-out).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    subscribers: u32,
    /// Messages per publisher [default: 200000 unless --duration is given].
    #[arg(long, conflicts_with = "duration")]
    messages: Option<u64>,
    /// Publish for this long instead (e.g. 10s, 500ms).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Total publish rate in msg/s, split evenly over publishers; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Topic (publish) and filter (subscribe).
    #[arg(long, default_value = "bench/t")]
    topic: String,
    /// User name for every connection.
    #[arg(long)]
    username: Option<String>,
    /// Password for every connection.
    #[arg(long)]
    password: Option<String>,
    /// QoS 1: unacknowledged publishes allowed per publisher.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=65535))]
    inflight: u16,
    /// Keep Alive sent in CONNECT, seconds (the generator sends no PINGREQ: keep runs shorter).
    #[arg(long, default_value_t = 600)]
    keep_alive: u16,
    /// After the publishers finish, subscribers give up this long after their last message.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    drain: Duration,
    /// Client id prefix [default: mqttload.<pid>]; ids are <prefix>.p<i> / <prefix>.s<i>.
    #[arg(long)]
    client_prefix: Option<String>,
    /// Print one JSON object on stdout instead of the text report.
    #[arg(long)]
    json: bool,
    /// Print the sequence numbers each subscriber missed (as ranges) on stderr.
    #[arg(long)]
    gaps: bool,
    /// Slow subscribers: each consumes at most one message per this many µs (0 = as
    /// fast as it can).
    #[arg(long, default_value_t = 0)]
    sub_delay_us: u64,
    /// Subscribers stop at most this long after the publishers finish, even while
    /// messages still arrive (a slow subscriber behind a broker that queues everything).
    #[arg(long, value_parser = parse_duration)]
    drain_max: Option<Duration>,
    /// Sample the RSS of this process (e.g. the broker's pid) during the run.
    #[arg(long)]
    rss_pid: Option<u32>,
    /// Print on stderr (at most 1,000 lines) every message whose latency from the actual
    /// write exceeds this many µs, with its send time (since the start, and in CLOCK_MONOTONIC seconds for `perf sched record -k CLOCK_MONOTONIC`): to see whether outliers are periodic.
    #[arg(long)]
    slow_us: Option<u64>,
    /// Interval of the RSS samples.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    rss_every: Duration,
    /// Connect over TLS, trusting the CA (or self-signed) certificates in this PEM file.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// With --tls-ca: the name the broker's certificate must carry.
    #[arg(long, value_name = "NAME", default_value = "localhost")]
    tls_server_name: String,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (e.g. 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => v / 1e3,
        "us" => v / 1e6,
        "s" => v,
        "m" | "min" => v * 60.0,
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (ms, s, m)")),
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("duration must be positive: {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Nanoseconds since the shared start.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// State shared by all threads of a run.
#[derive(Debug, Default)]
struct Shared {
    /// Messages written by all publishers so far.
    sent: AtomicU64,
    /// Publishers that have finished sending (successfully or not).
    publishers_done: AtomicU64,
    /// Set when a subscriber may stop even if messages are missing (fatal error elsewhere).
    abort: AtomicBool,
}

/// A connected client (CONNACK received) with its unparsed input.
struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
    filled: usize,
}

/// A TCP connection to the broker with TCP_NODELAY, reads timing out after
/// [`HANDSHAKE_TIMEOUT`].
fn tcp_connect(args: &Args) -> Result<TcpStream> {
    let addr = (args.host.as_str(), args.port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {}:{}", args.host, args.port))?
        .next()
        .with_context(|| format!("no address for {}", args.host))?;
    let stream = TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    Ok(stream)
}

impl<S> Conn<S> {
    /// The same connection over another type of stream.
    fn map<T>(self, f: impl FnOnce(S) -> Result<T>) -> Result<Conn<T>> {
        Ok(Conn {
            stream: f(self.stream)?,
            buf: self.buf,
            filled: self.filled,
        })
    }
}

impl<S: Read + Write> Conn<S> {
    /// Sends CONNECT on `stream` and waits for the CONNACK.
    fn handshake(stream: S, args: &Args, client_id: &str) -> Result<Self> {
        let mut conn = Self {
            stream,
            buf: vec![0; READ_BUF],
            filled: 0,
        };
        let mut out = Vec::with_capacity(128);
        mqtt::connect(
            &mut out,
            &ConnectOptions {
                client_id,
                keep_alive: args.keep_alive,
                clean_session: true,
                username: args.username.as_deref(),
                password: args.password.as_deref(),
            },
        );
        conn.stream.write_all(&out).context("sending CONNECT")?;
        match conn.next_control()? {
            (mqtt::kind::CONNACK, 0) => Ok(conn),
            (mqtt::kind::CONNACK, code) => bail!("{client_id}: CONNACK refused, code {code}"),
            (k, _) => bail!("{client_id}: expected CONNACK, got packet type {k}"),
        }
    }

    fn subscribe(&mut self, filter: &str, qos: u8) -> Result<()> {
        let mut out = Vec::with_capacity(64);
        mqtt::subscribe(&mut out, 1, filter, qos);
        self.stream.write_all(&out)?;
        match self.next_control()? {
            (mqtt::kind::SUBACK, code) if code == qos => Ok(()),
            (mqtt::kind::SUBACK, code) => bail!("SUBSCRIBE {filter} answered with {code:#04x}"),
            (k, _) => bail!("expected SUBACK, got packet type {k}"),
        }
    }

    /// Reads the next frame during the handshake: its type and first return code.
    fn next_control(&mut self) -> Result<(u8, u8)> {
        loop {
            // A TLS alert record (content type 21, version 3.x), not MQTT.
            ensure!(
                !self.buf[..self.filled].starts_with(&[0x15, 0x03]),
                "the broker answered with a TLS alert: this port expects TLS (--tls-ca)"
            );
            if let Some((p, n)) = mqtt::parse(&self.buf[..self.filled])? {
                let r = match p {
                    Packet::ConnAck { code } => (mqtt::kind::CONNACK, code),
                    Packet::SubAck { codes, .. } => {
                        (mqtt::kind::SUBACK, codes.first().copied().unwrap_or(0x80))
                    }
                    Packet::Publish { .. } => (mqtt::kind::PUBLISH, 0),
                    Packet::PubAck { .. } => (mqtt::kind::PUBACK, 0),
                    Packet::Other(k) => (k, 0),
                };
                self.buf.copy_within(n..self.filled, 0);
                self.filled -= n;
                return Ok(r);
            }
            let n = self
                .stream
                .read(&mut self.buf[self.filled..])
                .context("waiting for the broker's answer")?;
            if n == 0 {
                bail!("connection closed by the broker during the handshake");
            }
            self.filled += n;
        }
    }
}

fn read_or_poll<R: Read>(stream: &mut R, buf: &mut [u8]) -> io::Result<Option<usize>> {
    match stream.read(buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
        Err(e) if e.kind() == ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------- transports

/// How clients reach the broker: plain TCP ([`Plain`]) or TLS ([`Tls`]), chosen once;
/// the run is generic over the two stream types.
trait Transport {
    /// Streams of subscribers and as-fast-as-possible publishers (the event loop).
    type Async: AsyncLink;
    /// Streams of fixed-rate publishers (blocking, each on its own thread).
    type Blocking: BlockingLink;
    /// A client on the event loop of `rt`, connected (and subscribed to `--topic`, with
    /// `subscribe`).
    fn open_async(
        &self,
        rt: &Runtime,
        args: &Args,
        id: &str,
        subscribe: bool,
    ) -> Result<Conn<Self::Async>>;
    /// A fixed-rate publisher, connected.
    fn open_blocking(&self, args: &Args, id: &str) -> Result<Conn<Self::Blocking>>;
}

/// A stream on the event loop, split between a publisher and its PUBACK reader task.
trait AsyncLink: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Rd: AsyncRead + Unpin + Send + 'static;
    type Wr: AsyncWrite + Unpin + Send + 'static;
    fn halves(self) -> (Self::Rd, Self::Wr);
    /// The negotiated TLS cipher suite (plain TCP: none).
    fn cipher_suite(&self) -> Option<String> {
        None
    }
}

impl AsyncLink for tokio::net::TcpStream {
    type Rd = tokio::net::tcp::OwnedReadHalf;
    type Wr = tokio::net::tcp::OwnedWriteHalf;
    fn halves(self) -> (Self::Rd, Self::Wr) {
        self.into_split()
    }
}

impl AsyncLink for tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    type Rd = tokio::io::ReadHalf<Self>;
    type Wr = tokio::io::WriteHalf<Self>;
    fn halves(self) -> (Self::Rd, Self::Wr) {
        tokio::io::split(self)
    }
    fn cipher_suite(&self) -> Option<String> {
        let suite = self.get_ref().1.negotiated_cipher_suite()?;
        Some(format!("{:?}", suite.suite()))
    }
}

/// A fixed-rate publisher's blocking stream; at QoS 1 a thread of its own reads the
/// PUBACKs.
trait BlockingLink: Write + Send + 'static {
    type Acks: Read + Send + 'static;
    /// The reading side for the PUBACK thread; its reads time out after [`POLL`].
    fn acks(&self) -> io::Result<Self::Acks>;
    /// Ends the stream in writing (after the DISCONNECT).
    fn close_write(&mut self);
}

impl BlockingLink for TcpStream {
    type Acks = TcpStream;
    fn acks(&self) -> io::Result<TcpStream> {
        let stream = self.try_clone()?;
        stream.set_read_timeout(Some(POLL))?;
        Ok(stream)
    }
    fn close_write(&mut self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

/// Plain TCP.
#[derive(Debug)]
struct Plain;

impl Transport for Plain {
    type Async = tokio::net::TcpStream;
    type Blocking = TcpStream;

    fn open_async(
        &self,
        rt: &Runtime,
        args: &Args,
        id: &str,
        subscribe: bool,
    ) -> Result<Conn<Self::Async>> {
        let mut c = Conn::handshake(tcp_connect(args)?, args, id)?;
        if subscribe {
            c.subscribe(&args.topic, args.qos)?;
        }
        c.stream.set_read_timeout(None)?;
        c.stream.set_nonblocking(true)?;
        let _rt = rt.enter();
        c.map(|s| Ok(tokio::net::TcpStream::from_std(s)?))
    }

    fn open_blocking(&self, args: &Args, id: &str) -> Result<Conn<TcpStream>> {
        Conn::handshake(tcp_connect(args)?, args, id)
    }
}

/// TLS (`--tls-ca`): rustls with the *ring* provider, as the node's listener.
#[derive(Debug)]
struct Tls {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl Tls {
    /// Trusts the certificates in the PEM file `ca`; every failure names the file.
    fn new(ca: &Path, server_name: &str) -> Result<Self> {
        let what = || format!("--tls-ca {}", ca.display());
        let certs = CertificateDer::pem_file_iter(ca)
            .with_context(what)?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{}: not a PEM certificate file", what()))?;
        ensure!(!certs.is_empty(), "{}: no CERTIFICATE block found", what());
        let mut roots = RootCertStore::empty();
        for c in certs {
            roots.add(c).with_context(what)?;
        }
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .context("TLS protocol versions")?
                .with_root_certificates(roots)
                .with_no_client_auth();
        let server_name = ServerName::try_from(server_name.to_owned())
            .with_context(|| format!("--tls-server-name {server_name:?}"))?;
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
    }

    /// The TLS handshake over `sock`, blocking (subject to its read timeout).
    fn handshake_blocking(
        &self,
        mut sock: TcpStream,
    ) -> Result<StreamOwned<ClientConnection, TcpStream>> {
        let mut tls = ClientConnection::new(self.config.clone(), self.server_name.clone())?;
        while tls.is_handshaking() {
            tls.complete_io(&mut sock)?;
        }
        Ok(StreamOwned::new(tls, sock))
    }
}

impl Transport for Tls {
    type Async = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;
    type Blocking = TlsWriter;

    fn open_async(
        &self,
        rt: &Runtime,
        args: &Args,
        id: &str,
        subscribe: bool,
    ) -> Result<Conn<Self::Async>> {
        let sock = tcp_connect(args)?;
        sock.set_read_timeout(None)?;
        sock.set_nonblocking(true)?;
        let connector = TlsConnector::from(self.config.clone());
        let stream = rt
            .block_on(async {
                let sock = tokio::net::TcpStream::from_std(sock)?;
                tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    connector.connect(self.server_name.clone(), sock),
                )
                .await
                .unwrap_or_else(|_| Err(ErrorKind::TimedOut.into()))
            })
            .with_context(|| format!("TLS handshake with {}:{}", args.host, args.port))?;
        let mut c = Conn::handshake(BlockOn { rt, stream }, args, id)?;
        if subscribe {
            c.subscribe(&args.topic, args.qos)?;
        }
        c.map(|b| Ok(b.stream))
    }

    fn open_blocking(&self, args: &Args, id: &str) -> Result<Conn<TlsWriter>> {
        let tls = self
            .handshake_blocking(tcp_connect(args)?)
            .with_context(|| format!("TLS handshake with {}:{}", args.host, args.port))?;
        Conn::handshake(tls, args, id)?.map(|s| Ok(TlsWriter::new(s)))
    }
}

/// std `Read`/`Write` on an async stream by blocking on the (not yet running) runtime:
/// the MQTT handshake of an event-loop client over TLS.
struct BlockOn<'a, S> {
    rt: &'a Runtime,
    stream: S,
}

impl<S: AsyncRead + Unpin> Read for BlockOn<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let s = &mut self.stream;
        // The timer must be made inside the runtime (in the future, not before block_on).
        self.rt
            .block_on(async { tokio::time::timeout(HANDSHAKE_TIMEOUT, s.read(buf)).await })
            .unwrap_or_else(|_| Err(ErrorKind::TimedOut.into()))
    }
}

impl<S: AsyncWrite + Unpin> Write for BlockOn<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.rt.block_on(self.stream.write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.rt.block_on(self.stream.flush())
    }
}

/// Writes all the TLS records `tls` has ready to `sock` (blocking).
fn send_tls(tls: &mut ClientConnection, sock: &mut TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        match tls.write_tls(sock) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn tls_poisoned() -> io::Error {
    io::Error::other("TLS state poisoned by a panic")
}

/// The writing side of a fixed-rate publisher's TLS connection. The rustls state is shared
/// with the PUBACK reader ([`TlsReader`]); each side has its own handle of the socket, and
/// the lock is held to encrypt and write, never while waiting for input.
#[derive(Debug)]
struct TlsWriter {
    tls: Arc<Mutex<ClientConnection>>,
    sock: TcpStream,
}

impl TlsWriter {
    fn new(s: StreamOwned<ClientConnection, TcpStream>) -> Self {
        let (tls, sock) = s.into_parts();
        Self {
            tls: Arc::new(Mutex::new(tls)),
            sock,
        }
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut tls = self.tls.lock().map_err(|_| tls_poisoned())?;
        let mut pos = 0;
        while pos < buf.len() {
            // rustls buffers a bounded amount of plaintext: write what it takes, send it.
            let n = tls.writer().write(&buf[pos..])?;
            pos += n;
            send_tls(&mut tls, &mut self.sock)?;
            if n == 0 {
                return Err(ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlockingLink for TlsWriter {
    type Acks = TlsReader;

    fn acks(&self) -> io::Result<TlsReader> {
        let sock = self.sock.try_clone()?;
        sock.set_read_timeout(Some(POLL))?;
        Ok(TlsReader {
            tls: self.tls.clone(),
            sock,
            raw: vec![0; 64 * 1024],
            start: 0,
            end: 0,
        })
    }

    fn close_write(&mut self) {
        if let Ok(mut tls) = self.tls.lock() {
            tls.send_close_notify();
            let _ = send_tls(&mut tls, &mut self.sock);
        }
        let _ = self.sock.shutdown(Shutdown::Write);
    }
}

/// The reading side of a fixed-rate publisher's TLS connection: waits on the socket
/// without the lock (a read times out after [`POLL`] with `WouldBlock`/`TimedOut`, as a
/// plain socket's), then takes it to decrypt.
#[derive(Debug)]
struct TlsReader {
    tls: Arc<Mutex<ClientConnection>>,
    sock: TcpStream,
    /// Ciphertext read, `raw[start..end]` not yet given to rustls.
    raw: Vec<u8>,
    start: usize,
    end: usize,
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut tls = self.tls.lock().map_err(|_| tls_poisoned())?;
                loop {
                    // Plaintext first; feed more ciphertext only once it is all taken, so
                    // that rustls' plaintext buffer never overflows.
                    match tls.reader().read(buf) {
                        Ok(n) => return Ok(n), // 0: close_notify
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                    if self.start == self.end {
                        break;
                    }
                    let n = tls.read_tls(&mut &self.raw[self.start..self.end])?;
                    self.start = if n == 0 { self.end } else { self.start + n };
                    tls.process_new_packets()
                        .map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
                    // Anything to answer (an alert, a key update).
                    send_tls(&mut tls, &mut self.sock)?;
                }
            }
            // Times out with WouldBlock/TimedOut after POLL: the caller polls.
            let n = self.sock.read(&mut self.raw)?;
            if n == 0 {
                return Ok(0);
            }
            (self.start, self.end) = (0, n);
        }
    }
}

// ---------------------------------------------------------------- subscribers

#[derive(Debug, Default)]
struct SubStats {
    /// Latency from the scheduled send time.
    hist: Histogram,
    /// Latency from the actual write.
    hist_written: Histogram,
    received: u64,
    unique: u64,
    duplicates: u64,
    out_of_order: u64,
    foreign: u64,
    first_ns: u64,
    last_ns: u64,
    closed_by_broker: bool,
    seen: Vec<Seen>,
}

/// Per-publisher bitmap of the sequence numbers seen.
#[derive(Debug, Default)]
struct Seen {
    bits: Vec<u64>,
    last: Option<u64>,
}

impl Seen {
    fn has(&self, seq: u64) -> bool {
        self.bits
            .get((seq / 64) as usize)
            .is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    /// Ranges `[a, b)` of sequence numbers below `sent` never received.
    fn missing(&self, sent: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut start = None;
        for seq in 0..sent {
            match (self.has(seq), start) {
                (false, None) => start = Some(seq),
                (true, Some(a)) => {
                    out.push((a, seq));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(a) = start {
            out.push((a, sent));
        }
        out
    }
}

/// `--slow-us` threshold in ns (0 = off) and lines printed so far.
static SLOW_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static SLOW_PRINTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// The clock's origin in CLOCK_MONOTONIC ns, the clock `perf sched record -k CLOCK_MONOTONIC`
/// stamps events with, so a slow message can be found in a trace (0: unknown).
static ORIGIN_MONO_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `Instant` as CLOCK_MONOTONIC ns, read from its Debug form (on Linux `Instant { tv_sec: S,
/// tv_nsec: N }`, which std does not otherwise expose); `None` in any other form.
fn monotonic_ns(i: Instant) -> Option<u64> {
    let s = format!("{i:?}");
    let field = |name: &str| -> Option<u64> {
        let rest = &s[s.find(name)? + name.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    Some(field("tv_sec: ")? * 1_000_000_000 + field("tv_nsec: ")?)
}

fn log_slow(st: &Stamp, now_ns: u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let threshold = SLOW_NS.load(Relaxed);
    let written = now_ns.saturating_sub(st.written_ns);
    if threshold == 0 || written <= threshold || SLOW_PRINTED.fetch_add(1, Relaxed) >= 1000 {
        return;
    }
    let origin = ORIGIN_MONO_NS.load(Relaxed);
    eprintln!(
        "slow seq={} written_at_ms={:.3} monotonic_s={:.6} latency_us={} from_schedule_us={}",
        st.seq,
        st.written_ns as f64 / 1e6,
        if origin == 0 {
            0.0
        } else {
            (origin + st.written_ns) as f64 / 1e9
        },
        written / 1000,
        now_ns.saturating_sub(st.sent_ns) / 1000
    );
}

impl SubStats {
    /// Handles the complete frames at the start of `data`, all received at `now_ns`;
    /// appends PUBACKs to `acks`; returns the bytes consumed.
    fn ingest(&mut self, data: &[u8], now_ns: u64, acks: &mut Vec<u8>) -> Result<usize> {
        let mut pos = 0;
        while let Some((p, n)) = mqtt::parse(&data[pos..])? {
            pos += n;
            let Packet::Publish {
                qos,
                packet_id,
                payload,
                ..
            } = p
            else {
                continue;
            };
            if qos == 1 {
                mqtt::puback(acks, packet_id);
            }
            let Some(st) = Stamp::read(payload)
                .filter(|st| (st.publisher as usize) < self.seen.len() && st.seq < MAX_SEQ)
            else {
                self.foreign += 1;
                continue;
            };
            self.received += 1;
            self.first_ns = self.first_ns.min(now_ns);
            self.last_ns = now_ns;
            self.hist.record(now_ns.saturating_sub(st.sent_ns));
            self.hist_written
                .record(now_ns.saturating_sub(st.written_ns));
            log_slow(&st, now_ns);
            let p = &mut self.seen[st.publisher as usize];
            let (w, b) = ((st.seq / 64) as usize, st.seq % 64);
            if p.bits.len() <= w {
                p.bits.resize(w + 1, 0);
            }
            let duplicate = p.bits[w] & (1 << b) != 0;
            p.bits[w] |= 1 << b;
            let reordered = p.last.is_some_and(|l| st.seq < l);
            p.last = Some(st.seq);
            if duplicate {
                self.duplicates += 1;
            } else {
                self.unique += 1;
            }
            if reordered {
                self.out_of_order += 1;
            }
        }
        Ok(pos)
    }
}

async fn subscriber<S: AsyncRead + AsyncWrite + Unpin>(
    conn: Conn<S>,
    args: Arc<Args>,
    clock: Clock,
    shared: Arc<Shared>,
) -> Result<SubStats> {
    let Conn {
        mut stream,
        mut buf,
        mut filled,
    } = conn;
    let mut s = SubStats {
        first_ns: u64::MAX,
        seen: (0..args.publishers).map(|_| Seen::default()).collect(),
        ..SubStats::default()
    };
    let mut acks = Vec::with_capacity(4096);
    let mut last_data = Instant::now();
    let mut now_ns = clock.ns();
    // --sub-delay-us: when the messages read so far will have been "processed".
    let delay = Duration::from_micros(args.sub_delay_us);
    let mut busy_until = Instant::now();
    let mut publishers_done_at: Option<Instant> = None;
    loop {
        let before = s.received + s.foreign;
        let used = s.ingest(&buf[..filled], now_ns, &mut acks)?;
        buf.copy_within(used..filled, 0);
        filled -= used;
        if !acks.is_empty() {
            stream.write_all(&acks).await.context("sending PUBACKs")?;
            acks.clear();
        }
        let consumed = (s.received + s.foreign - before) as u32;
        if !delay.is_zero() && consumed > 0 {
            busy_until = busy_until.max(Instant::now()) + delay * consumed;
            // Sleep in whole milliseconds (tokio's timer); the debt carries over.
            if busy_until > Instant::now() + Duration::from_millis(1) {
                tokio::time::sleep_until(busy_until.into()).await;
            }
        }
        if shared.abort.load(Ordering::SeqCst) {
            break;
        }
        if shared.publishers_done.load(Ordering::SeqCst) == u64::from(args.publishers) {
            let sent = shared.sent.load(Ordering::SeqCst);
            let done = *publishers_done_at.get_or_insert_with(Instant::now);
            if s.unique >= sent
                || last_data.elapsed() >= args.drain
                || args.drain_max.is_some_and(|d| done.elapsed() >= d)
            {
                break;
            }
        }
        if filled == buf.len() {
            ensure!(buf.len() < MAX_FRAME, "frame larger than {MAX_FRAME} bytes");
            let grown = (buf.len() * 2).min(MAX_FRAME);
            buf.resize(grown, 0);
        }
        match tokio::time::timeout(POLL, stream.read(&mut buf[filled..])).await {
            Err(_) => {}
            Ok(Ok(0)) => {
                s.closed_by_broker = true;
                break;
            }
            Ok(Ok(n)) => {
                now_ns = clock.ns();
                last_data = Instant::now();
                filled += n;
            }
            Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e).context("subscriber read"),
        }
    }
    let mut out = Vec::with_capacity(2);
    mqtt::disconnect(&mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
    Ok(s)
}

// ---------------------------------------------------------------- publishers

/// QoS 1 acknowledgement accounting between a publisher and its reader thread.
#[derive(Debug, Default)]
struct Window {
    inflight: AtomicU64,
    acked: AtomicU64,
    waiting: AtomicBool,
    stop: AtomicBool,
    reader_gone: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Window {
    fn wake(&self) {
        if self.waiting.load(Ordering::SeqCst)
            && let Ok(_g) = self.lock.lock()
        {
            self.cv.notify_one();
        }
    }

    /// Blocks until fewer than `max` messages are in flight (or the reader is gone, or
    /// `deadline` passes); returns the free slots.
    fn wait_below(&self, max: u64, deadline: Option<Instant>) -> u64 {
        loop {
            let inflight = self.inflight.load(Ordering::SeqCst);
            if inflight < max {
                return max - inflight;
            }
            if self.reader_gone.load(Ordering::SeqCst)
                || deadline.is_some_and(|d| Instant::now() >= d)
            {
                return 0;
            }
            let Ok(g) = self.lock.lock() else { return 0 };
            self.waiting.store(true, Ordering::SeqCst);
            if self.inflight.load(Ordering::SeqCst) >= max {
                // The timeout only guards against a lost wake-up; wake() normally ends it.
                let _ = self.cv.wait_timeout(g, Duration::from_millis(5));
            }
            self.waiting.store(false, Ordering::SeqCst);
        }
    }
}

/// Counts the PUBACKs among the complete frames at the start of `data`; returns the
/// bytes consumed and the count.
fn count_pubacks(data: &[u8]) -> Result<(usize, u64)> {
    let mut pos = 0;
    let mut acks = 0;
    while let Some((p, n)) = mqtt::parse(&data[pos..])? {
        pos += n;
        if matches!(p, Packet::PubAck { .. }) {
            acks += 1;
        }
    }
    Ok((pos, acks))
}

/// Reads PUBACKs from `stream`, whose reads time out after [`POLL`].
fn ack_reader<R: Read>(mut stream: R, window: &Window) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut filled = 0;
    let result = loop {
        if window.stop.load(Ordering::SeqCst) {
            break Ok(());
        }
        match read_or_poll(&mut stream, &mut buf[filled..]) {
            Ok(Some(0)) => break Err(anyhow::anyhow!("publisher connection closed by the broker")),
            Ok(Some(n)) => {
                filled += n;
                let (used, acks) = match count_pubacks(&buf[..filled]) {
                    Ok(r) => r,
                    Err(e) => break Err(e),
                };
                buf.copy_within(used..filled, 0);
                filled -= used;
                if filled == buf.len() {
                    break Err(anyhow::anyhow!("oversized frame sent to a publisher"));
                }
                if acks > 0 {
                    let _ = window
                        .inflight
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                            Some(v.saturating_sub(acks))
                        });
                    window.acked.fetch_add(acks, Ordering::SeqCst);
                    window.wake();
                }
            }
            Ok(None) => {}
            Err(e) => break Err(e.into()),
        }
    };
    finish_reader(window, result)
}

fn finish_reader(window: &Window, r: Result<()>) -> Result<()> {
    window.reader_gone.store(true, Ordering::SeqCst);
    window.waiting.store(true, Ordering::SeqCst);
    window.wake();
    r
}

#[derive(Debug)]
struct PubStats {
    sent: u64,
    acked: u64,
    start_ns: u64,
    end_ns: u64,
    /// Fixed rate only: write completion minus scheduled time.
    lag: Histogram,
}

/// Sleeps until `due_ns`; with `spin`, sleeps until [`SPIN_WINDOW`] before it and
/// busy-waits the rest (`thread::sleep` wakes 50–150 µs late here).
fn wait_until(clock: Clock, due_ns: u64, spin: bool) {
    let now = clock.ns();
    let window = if spin {
        SPIN_WINDOW.as_nanos() as u64
    } else {
        0
    };
    if due_ns > now + window {
        thread::sleep(Duration::from_nanos(due_ns - now - window));
    }
    while spin && clock.ns() < due_ns {
        std::hint::spin_loop();
    }
}

/// The send schedule of one publisher.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    /// `None`: as fast as possible.
    interval_ns: Option<f64>,
    start_ns: u64,
    /// Messages to send (count mode).
    limit: Option<u64>,
    /// Stop time (duration mode).
    end_ns: Option<u64>,
    /// Busy-wait the last [`SPIN_WINDOW`] before each due time.
    spin: bool,
}

impl Schedule {
    fn due(&self, seq: u64) -> u64 {
        match self.interval_ns {
            Some(i) => self.start_ns + (seq as f64 * i) as u64,
            None => 0,
        }
    }

    /// Whether message `seq` is part of the run (`now_ns` matters for as-fast-as-possible).
    fn wants(&self, seq: u64, now_ns: u64) -> bool {
        if self.limit.is_some_and(|l| seq >= l) {
            return false;
        }
        let t = if self.interval_ns.is_some() {
            self.due(seq)
        } else {
            now_ns
        };
        self.end_ns.is_none_or(|e| t < e)
    }
}

/// A fixed-rate publisher: a blocking socket on its own OS thread (QoS 1: plus a thread
/// reading PUBACKs).
fn paced_publisher<B: BlockingLink>(
    mut conn: Conn<B>,
    index: u32,
    args: &Args,
    clock: Clock,
    shared: &Shared,
    sched: Schedule,
) -> Result<(PubStats, B)> {
    let qos = args.qos;
    let frame_len = 5 + args.topic.len() + 2 + args.size;
    let batch_max = (WRITE_BATCH_BYTES / frame_len).max(1) as u64;
    let window = Arc::new(Window::default());
    let reader = if qos == 1 {
        let stream = conn.stream.acks()?;
        let w = window.clone();
        Some(
            thread::Builder::new()
                .name(format!("pub{index}-acks"))
                .spawn(move || ack_reader(stream, &w))?,
        )
    } else {
        None
    };
    let mut buf = Vec::with_capacity(WRITE_BATCH_BYTES + frame_len);
    let mut lag = Histogram::new();
    let mut seq = 0u64;
    let mut packet_id = 0u16;
    let start_ns = sched.start_ns;
    let result: Result<()> = (|| {
        loop {
            let now = clock.ns();
            if !sched.wants(seq, now) {
                return Ok(());
            }
            let mut n = batch_max;
            if sched.interval_ns.is_some() {
                let due = sched.due(seq);
                if due > now {
                    wait_until(clock, due, sched.spin);
                    continue;
                }
                let mut k = 1;
                while k < n && sched.wants(seq + k, now) && sched.due(seq + k) <= now {
                    k += 1;
                }
                n = k;
            } else if let Some(l) = sched.limit {
                n = n.min(l - seq);
            }
            if qos == 1 {
                let free = window.wait_below(u64::from(args.inflight), None);
                if free == 0 {
                    bail!("publisher {index}: acknowledgement reader stopped");
                }
                n = n.min(free);
            }
            buf.clear();
            let written_ns = clock.ns();
            for j in 0..n {
                let sent_ns = if sched.interval_ns.is_some() {
                    sched.due(seq + j)
                } else {
                    written_ns
                };
                packet_id = packet_id.checked_add(1).unwrap_or(1);
                mqtt::publish_header(&mut buf, &args.topic, qos, packet_id, args.size);
                Stamp {
                    publisher: index,
                    seq: seq + j,
                    sent_ns,
                    written_ns,
                }
                .write(&mut buf, args.size);
            }
            if qos == 1 {
                window.inflight.fetch_add(n, Ordering::SeqCst);
            }
            conn.stream.write_all(&buf).context("publishing")?;
            if sched.interval_ns.is_some() {
                let done = clock.ns();
                for j in 0..n {
                    lag.record(done.saturating_sub(sched.due(seq + j)));
                }
            }
            seq += n;
            shared.sent.fetch_add(n, Ordering::SeqCst);
        }
    })();
    let end_ns = clock.ns();
    if let Some(r) = reader {
        if result.is_ok() {
            window.wait_below(1, Some(Instant::now() + ACK_DRAIN));
        }
        window.stop.store(true, Ordering::SeqCst);
        match r.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) if result.is_ok() => return Err(e),
            _ => {}
        }
    }
    result?;
    Ok((
        PubStats {
            sent: seq,
            acked: window.acked.load(Ordering::SeqCst),
            start_ns,
            end_ns,
            lag,
        },
        conn.stream,
    ))
}

/// QoS 1 accounting between an as-fast-as-possible publisher and its PUBACK reader task.
#[derive(Debug, Default)]
struct AsyncWindow {
    inflight: AtomicU64,
    acked: AtomicU64,
    reader_gone: AtomicBool,
    /// Signalled by the reader after acknowledgements (or when it ends).
    freed: tokio::sync::Notify,
    /// Tells the reader to stop.
    stop: tokio::sync::Notify,
}

async fn ack_reader_async<R: AsyncRead + Unpin>(mut rd: R, w: Arc<AsyncWindow>) -> (R, Result<()>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut filled = 0;
    let r = loop {
        let read = tokio::select! {
            r = rd.read(&mut buf[filled..]) => r,
            _ = w.stop.notified() => break Ok(()),
        };
        match read {
            Ok(0) => break Err(anyhow::anyhow!("publisher connection closed by the broker")),
            Ok(n) => {
                filled += n;
                let (used, acks) = match count_pubacks(&buf[..filled]) {
                    Ok(r) => r,
                    Err(e) => break Err(e),
                };
                buf.copy_within(used..filled, 0);
                filled -= used;
                if filled == buf.len() {
                    break Err(anyhow::anyhow!("oversized frame sent to a publisher"));
                }
                if acks > 0 {
                    let _ = w
                        .inflight
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                            Some(v.saturating_sub(acks))
                        });
                    w.acked.fetch_add(acks, Ordering::SeqCst);
                    w.freed.notify_one();
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Err(e.into()),
        }
    };
    w.reader_gone.store(true, Ordering::SeqCst);
    w.freed.notify_one();
    (rd, r)
}

/// An as-fast-as-possible publisher: a task on the shared event loop (QoS 1: plus a
/// task reading PUBACKs).
async fn fast_publisher<A: AsyncLink>(
    conn: Conn<A>,
    index: u32,
    args: Arc<Args>,
    clock: Clock,
    shared: Arc<Shared>,
    sched: Schedule,
) -> Result<(PubStats, A::Rd, A::Wr)> {
    let qos = args.qos;
    let window = u64::from(args.inflight);
    let frame_len = 5 + args.topic.len() + 2 + args.size;
    let batch_max = (WRITE_BATCH_BYTES / frame_len).max(1) as u64;
    let (rd, mut wr) = conn.stream.halves();
    let w = Arc::new(AsyncWindow::default());
    let (reader, mut idle_rd) = if qos == 1 {
        (Some(tokio::spawn(ack_reader_async(rd, w.clone()))), None)
    } else {
        (None, Some(rd))
    };
    let now = clock.ns();
    if sched.start_ns > now {
        tokio::time::sleep(Duration::from_nanos(sched.start_ns - now)).await;
    }
    let mut buf = Vec::with_capacity(WRITE_BATCH_BYTES + frame_len);
    let mut seq = 0u64;
    let mut packet_id = 0u16;
    let start_ns = clock.ns();
    let result: Result<()> = async {
        loop {
            let now = clock.ns();
            if !sched.wants(seq, now) {
                return Ok(());
            }
            let mut n = batch_max;
            if let Some(l) = sched.limit {
                n = n.min(l - seq);
            }
            if qos == 1 {
                let free = loop {
                    let inflight = w.inflight.load(Ordering::SeqCst);
                    if inflight < window {
                        break window - inflight;
                    }
                    if w.reader_gone.load(Ordering::SeqCst) {
                        bail!("publisher {index}: acknowledgement reader stopped");
                    }
                    w.freed.notified().await;
                };
                n = n.min(free);
            }
            let now = clock.ns();
            buf.clear();
            for j in 0..n {
                packet_id = packet_id.checked_add(1).unwrap_or(1);
                mqtt::publish_header(&mut buf, &args.topic, qos, packet_id, args.size);
                Stamp {
                    publisher: index,
                    seq: seq + j,
                    sent_ns: now,
                    written_ns: now,
                }
                .write(&mut buf, args.size);
            }
            if qos == 1 {
                w.inflight.fetch_add(n, Ordering::SeqCst);
            }
            wr.write_all(&buf).await.context("publishing")?;
            seq += n;
            shared.sent.fetch_add(n, Ordering::SeqCst);
        }
    }
    .await;
    let end_ns = clock.ns();
    if let Some(reader) = reader {
        if result.is_ok() {
            let _ = tokio::time::timeout(ACK_DRAIN, async {
                while w.inflight.load(Ordering::SeqCst) > 0 && !w.reader_gone.load(Ordering::SeqCst)
                {
                    w.freed.notified().await;
                }
            })
            .await;
        }
        w.stop.notify_one();
        let (rd, r) = reader.await.context("acknowledgement reader task")?;
        if result.is_ok() {
            r?;
        }
        idle_rd = Some(rd);
    }
    result?;
    let Some(rd) = idle_rd else {
        bail!("publisher {index}: read half lost");
    };
    Ok((
        PubStats {
            sent: seq,
            acked: w.acked.load(Ordering::SeqCst),
            start_ns,
            end_ns,
            lag: Histogram::new(),
        },
        rd,
        wr,
    ))
}

// ---------------------------------------------------------------- RSS sampling

/// `VmRSS` of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Samples `VmRSS` of a process on a thread of its own until stopped.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<Vec<u64>>,
}

impl RssSampler {
    fn start(pid: u32, every: Duration) -> Result<Self> {
        ensure!(
            rss_kib(pid).is_some(),
            "no VmRSS for pid {pid} (/proc/{pid}/status)"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::Builder::new().name("rss".into()).spawn(move || {
            let mut samples = Vec::new();
            let start = Instant::now();
            let mut n = 0u32;
            loop {
                if let Some(kib) = rss_kib(pid) {
                    samples.push(kib);
                }
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                n += 1;
                let due = start + every * n;
                while Instant::now() < due && !flag.load(Ordering::SeqCst) {
                    thread::sleep((due - Instant::now()).min(Duration::from_millis(50)));
                }
            }
            samples
        })?;
        Ok(Self { stop, thread })
    }

    /// Stops (after a last sample) and returns the samples, KiB.
    fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap_or_default()
    }
}

/// RSS of the sampled process over the run.
#[derive(Debug, Serialize)]
struct RssReport {
    pid: u32,
    max_kib: u64,
    first_kib: u64,
    last_kib: u64,
    /// One sample per `--rss-every`, KiB.
    samples_kib: Vec<u64>,
}

// ---------------------------------------------------------------- report

#[derive(Debug, Serialize)]
struct Quantiles {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
    mean: f64,
    min: f64,
}

impl Quantiles {
    fn micros(h: &Histogram) -> Self {
        let us = |ns: u64| (ns as f64 / 1e3 * 10.0).round() / 10.0;
        Self {
            p50: us(h.quantile(0.50)),
            p90: us(h.quantile(0.90)),
            p99: us(h.quantile(0.99)),
            p999: us(h.quantile(0.999)),
            max: us(h.max()),
            mean: (h.mean() / 1e3 * 10.0).round() / 10.0,
            min: us(h.min()),
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    host: String,
    port: u16,
    /// `--tls-ca`: every client connected over TLS.
    tls: bool,
    /// With TLS: the cipher suite negotiated (by the first subscriber), e.g.
    /// `TLS13_AES_256_GCM_SHA384`.
    tls_cipher_suite: Option<String>,
    qos: u8,
    size: usize,
    publishers: u32,
    subscribers: u32,
    /// Target total rate, msg/s; 0 = as fast as possible.
    rate: f64,
    /// Messages published (all publishers).
    sent: u64,
    /// QoS 1: PUBACKs received by publishers.
    acked: u64,
    /// sent × subscribers.
    expected: u64,
    /// Deliveries with a valid stamp (all subscribers, duplicates included).
    received: u64,
    /// Distinct deliveries.
    unique: u64,
    lost: u64,
    loss_pct: f64,
    duplicates: u64,
    out_of_order: u64,
    /// Deliveries without a valid stamp (someone else's traffic on the topic).
    foreign: u64,
    /// Seconds from the first publish to the last delivery.
    elapsed_s: f64,
    /// Aggregate delivery rate, msg/s: received / elapsed_s.
    recv_rate: f64,
    /// Publish rate, msg/s: sent / (last publish − first publish).
    send_rate: f64,
    /// Publish → delivery latency, µs, from the scheduled send time (as fast as
    /// possible: from the write).
    latency_us: Quantiles,
    /// Fixed rate only: latency from the actual write (excludes the sender's lateness).
    latency_from_write_us: Option<Quantiles>,
    /// Fixed rate only: how late the generator wrote each message, µs.
    send_lag_us: Option<Quantiles>,
    /// Subscriber connections the broker closed.
    closed_by_broker: u32,
    /// The generator's own CPU time (user + system), seconds.
    generator_cpu_s: Option<f64>,
    /// `--sub-delay-us`.
    sub_delay_us: u64,
    /// `--rss-pid`: the sampled process's RSS.
    rss: Option<RssReport>,
}

/// CPU time of this process (all threads), from /proc/self/stat (Linux).
fn process_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc(5) (utime, stime) are the 12th and 13th after the name.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0) // USER_HZ is 100 on Linux.
}

fn print_text(r: &Report) {
    let mode = if r.rate > 0.0 {
        format!("{} msg/s fixed", r.rate)
    } else {
        "as fast as possible".into()
    };
    println!(
        "mqtt-load {}:{}{}  qos {}  {} B  {}→{}  {}",
        r.host,
        r.port,
        if r.tls {
            format!(" (TLS, {})", r.tls_cipher_suite.as_deref().unwrap_or("?"))
        } else {
            String::new()
        },
        r.qos,
        r.size,
        r.publishers,
        r.subscribers,
        mode
    );
    println!(
        "sent      {} ({:.0} msg/s){}",
        r.sent,
        r.send_rate,
        if r.qos == 1 {
            format!(", {} acked", r.acked)
        } else {
            String::new()
        }
    );
    println!(
        "received  {} of {} in {:.3} s: {:.0} msg/s  (loss {:.3} %, {} duplicates, {} out of order{})",
        r.received,
        r.expected,
        r.elapsed_s,
        r.recv_rate,
        r.loss_pct,
        r.duplicates,
        r.out_of_order,
        if r.closed_by_broker > 0 {
            format!(", {} subscribers closed by the broker", r.closed_by_broker)
        } else {
            String::new()
        }
    );
    let l = &r.latency_us;
    println!(
        "latency   µs  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {})",
        l.p50, l.p90, l.p99, l.p999, l.max, l.mean
    );
    if let Some(l) = &r.latency_from_write_us {
        println!(
            "  from write µs  p50 {}  p99 {}  p99.9 {}  max {}",
            l.p50, l.p99, l.p999, l.max
        );
    }
    if let Some(l) = &r.send_lag_us {
        println!(
            "send lag  µs  p50 {}  p99 {}  max {}  (generator lateness, included above)",
            l.p50, l.p99, l.max
        );
    }
    if let Some(c) = r.generator_cpu_s {
        println!("generator CPU {c:.2} s");
    }
    if let Some(rss) = &r.rss {
        println!(
            "RSS of pid {}  max {} KiB  first {} KiB  last {} KiB  ({} samples)",
            rss.pid,
            rss.max_kib,
            rss.first_kib,
            rss.last_kib,
            rss.samples_kib.len()
        );
    }
}

/// A publisher's connection: to the event loop (as fast as possible) or to a thread of
/// its own (fixed rate).
enum PubConn<T: Transport> {
    Fast(Conn<T::Async>),
    Paced(Conn<T::Blocking>),
}

/// A publisher's stream once it is done, kept open until the subscribers are.
enum PubEnd<T: Transport> {
    Fast(<T::Async as AsyncLink>::Rd, <T::Async as AsyncLink>::Wr),
    Paced(T::Blocking),
}

/// What a run measured.
#[derive(Debug)]
struct Outcome {
    pub_stats: Vec<PubStats>,
    sub_stats: Vec<SubStats>,
    rss: Option<RssReport>,
    /// The TLS cipher suite negotiated (with TLS).
    tls_cipher_suite: Option<String>,
}

/// Connects every client over `transport` (subscribers first, so that no message is
/// published before every subscription is in place), then runs the load on `rt`.
fn connect_and_run<T: Transport + 'static>(
    transport: &T,
    rt: &Runtime,
    args: Arc<Args>,
    prefix: &str,
    clock: Clock,
    shared: Arc<Shared>,
) -> Result<Outcome> {
    let mut subs = Vec::new();
    for i in 0..args.subscribers {
        let id = format!("{prefix}.s{i}");
        subs.push(
            transport
                .open_async(rt, &args, &id, true)
                .with_context(|| format!("subscriber {id}"))?,
        );
    }
    let mut pubs = Vec::new();
    for i in 0..args.publishers {
        let id = format!("{prefix}.p{i}");
        let c = if args.rate > 0.0 {
            transport.open_blocking(&args, &id).map(PubConn::Paced)
        } else {
            transport
                .open_async(rt, &args, &id, false)
                .map(PubConn::Fast)
        };
        pubs.push(c.with_context(|| format!("publisher {id}"))?);
    }
    let suite = subs.first().and_then(|c| c.stream.cipher_suite());
    let sampler = match args.rss_pid {
        Some(pid) => Some(RssSampler::start(pid, args.rss_every)?),
        None => None,
    };
    let (pub_stats, sub_stats) = rt.block_on(run::<T>(args.clone(), subs, pubs, clock, shared))?;
    let rss = sampler.zip(args.rss_pid).map(|(s, pid)| {
        let samples_kib = s.finish();
        RssReport {
            pid,
            max_kib: samples_kib.iter().copied().max().unwrap_or(0),
            first_kib: samples_kib.first().copied().unwrap_or(0),
            last_kib: samples_kib.last().copied().unwrap_or(0),
            samples_kib,
        }
    });
    Ok(Outcome {
        pub_stats,
        sub_stats,
        rss,
        tls_cipher_suite: suite,
    })
}

/// Runs subscribers and publishers to the end; fixed-rate publishers get blocking
/// threads, everything else shares the current (single-threaded) runtime.
async fn run<T: Transport + 'static>(
    args: Arc<Args>,
    subs: Vec<Conn<T::Async>>,
    pubs: Vec<PubConn<T>>,
    clock: Clock,
    shared: Arc<Shared>,
) -> Result<(Vec<PubStats>, Vec<SubStats>)> {
    let sub_tasks: Vec<_> = subs
        .into_iter()
        .map(|c| tokio::spawn(subscriber(c, args.clone(), clock, shared.clone())))
        .collect();
    let start_ns = clock.ns() + 2_000_000; // let the tasks and threads start
    let limit = match (args.messages, args.duration) {
        (Some(m), _) => Some(m),
        (None, None) => Some(DEFAULT_MESSAGES),
        (None, Some(_)) => None,
    };
    let per_pub_rate = args.rate / f64::from(args.publishers);
    let mut pub_tasks = Vec::new();
    for (i, c) in pubs.into_iter().enumerate() {
        let i = i as u32;
        let interval_ns = (per_pub_rate > 0.0).then(|| 1e9 / per_pub_rate);
        // Publishers' schedules are spread evenly over one interval.
        let offset = interval_ns.map_or(0.0, |iv| iv * f64::from(i) / f64::from(args.publishers));
        let sched = Schedule {
            interval_ns,
            start_ns: start_ns + offset as u64,
            limit,
            end_ns: args.duration.map(|d| start_ns + d.as_nanos() as u64),
            spin: interval_ns.is_some_and(|iv| iv >= SPIN_MIN_INTERVAL.as_nanos() as f64),
        };
        let (a, s) = (args.clone(), shared.clone());
        let finish = |s: &Shared, failed: bool| {
            if failed {
                s.abort.store(true, Ordering::SeqCst);
            }
            s.publishers_done.fetch_add(1, Ordering::SeqCst);
        };
        // Paced exactly when interval_ns is some (connect_and_run: --rate > 0).
        pub_tasks.push(match c {
            PubConn::Paced(c) => tokio::task::spawn_blocking(move || {
                wait_until(clock, sched.start_ns, sched.spin);
                let r = paced_publisher(c, i, &a, clock, &s, sched)
                    .map(|(st, b)| (st, PubEnd::<T>::Paced(b)));
                finish(&s, r.is_err());
                r
            }),
            PubConn::Fast(c) => tokio::spawn(async move {
                let r = fast_publisher(c, i, a, clock, s.clone(), sched)
                    .await
                    .map(|(st, rd, wr)| (st, PubEnd::<T>::Fast(rd, wr)));
                finish(&s, r.is_err());
                r
            }),
        });
    }
    let mut pub_stats = Vec::new();
    let mut pub_streams = Vec::new();
    let mut first_error = None;
    for t in pub_tasks {
        match t.await {
            Ok(Ok((st, stream))) => {
                pub_stats.push(st);
                pub_streams.push(stream);
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(anyhow::anyhow!("publisher task failed: {e}"));
            }
        }
    }
    let mut sub_stats = Vec::new();
    for t in sub_tasks {
        match t.await {
            Ok(Ok(st)) => sub_stats.push(st),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(anyhow::anyhow!("subscriber task failed: {e}"));
            }
        }
    }
    let mut out = Vec::with_capacity(2);
    mqtt::disconnect(&mut out);
    for end in pub_streams {
        match end {
            PubEnd::Fast(_rd, mut wr) => {
                let _ = wr.write_all(&out).await;
                let _ = wr.shutdown().await;
            }
            PubEnd::Paced(mut s) => {
                let _ = s.write_all(&out);
                s.close_write();
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok((pub_stats, sub_stats)),
    }
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mqtt-load: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let args = Args::parse();
    if let Some(us) = args.slow_us {
        SLOW_NS.store(
            us.saturating_mul(1000).max(1),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    ensure!(
        args.size >= stamp::LEN,
        "--size must be at least {} bytes (the stamp)",
        stamp::LEN
    );
    ensure!(
        args.rate.is_finite() && args.rate >= 0.0,
        "--rate must be >= 0"
    );
    ensure!(
        !args.topic.is_empty() && !args.topic.contains(['+', '#']),
        "--topic must be a topic name without wildcards"
    );
    let prefix = args
        .client_prefix
        .clone()
        .unwrap_or_else(|| format!("mqttload.{}", std::process::id()));
    let tls = match &args.tls_ca {
        Some(ca) => Some(Tls::new(ca, &args.tls_server_name)?),
        None => None,
    };
    let clock = Clock(Instant::now());
    if let Some(ns) = monotonic_ns(clock.0) {
        ORIGIN_MONO_NS.store(ns, std::sync::atomic::Ordering::Relaxed);
    }
    let shared = Arc::new(Shared::default());
    let args = Arc::new(args);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let Outcome {
        pub_stats,
        sub_stats,
        rss,
        tls_cipher_suite,
    } = match &tls {
        Some(t) => connect_and_run(t, &rt, args.clone(), &prefix, clock, shared)?,
        None => connect_and_run(&Plain, &rt, args.clone(), &prefix, clock, shared)?,
    };

    if args.gaps {
        for (si, sub) in sub_stats.iter().enumerate() {
            for (pi, p) in pub_stats.iter().enumerate() {
                let Some(seen) = sub.seen.get(pi) else {
                    continue;
                };
                let gaps = seen.missing(p.sent);
                let lost: u64 = gaps.iter().map(|(a, b)| b - a).sum();
                let shown: Vec<String> = gaps
                    .iter()
                    .take(20)
                    .map(|(a, b)| format!("{a}..{b}"))
                    .collect();
                eprintln!(
                    "subscriber {si} / publisher {pi}: {lost} missing of {} in {} ranges: {}{}",
                    p.sent,
                    gaps.len(),
                    shown.join(" "),
                    if gaps.len() > 20 { " …" } else { "" }
                );
            }
        }
    }
    let sent: u64 = pub_stats.iter().map(|p| p.sent).sum();
    let acked: u64 = pub_stats.iter().map(|p| p.acked).sum();
    let mut hist = Histogram::new();
    let mut hist_written = Histogram::new();
    let mut lag = Histogram::new();
    for p in &pub_stats {
        lag.merge(&p.lag);
    }
    let (mut received, mut unique, mut dups, mut ooo, mut foreign, mut closed) = (0, 0, 0, 0, 0, 0);
    let mut last_ns = 0;
    for s in &sub_stats {
        hist.merge(&s.hist);
        hist_written.merge(&s.hist_written);
        received += s.received;
        unique += s.unique;
        dups += s.duplicates;
        ooo += s.out_of_order;
        foreign += s.foreign;
        closed += u32::from(s.closed_by_broker);
        last_ns = last_ns.max(s.last_ns);
    }
    let first_pub = pub_stats.iter().map(|p| p.start_ns).min().unwrap_or(0);
    let last_pub = pub_stats.iter().map(|p| p.end_ns).max().unwrap_or(0);
    let expected = sent * u64::from(args.subscribers);
    let elapsed_s = last_ns.saturating_sub(first_pub) as f64 / 1e9;
    let send_s = last_pub.saturating_sub(first_pub) as f64 / 1e9;
    let lost = expected.saturating_sub(unique);
    let report = Report {
        host: args.host.clone(),
        port: args.port,
        tls: tls.is_some(),
        tls_cipher_suite,
        qos: args.qos,
        size: args.size,
        publishers: args.publishers,
        subscribers: args.subscribers,
        rate: args.rate,
        sent,
        acked,
        expected,
        received,
        unique,
        lost,
        loss_pct: if expected == 0 {
            0.0
        } else {
            lost as f64 * 100.0 / expected as f64
        },
        duplicates: dups,
        out_of_order: ooo,
        foreign,
        elapsed_s,
        recv_rate: if elapsed_s > 0.0 {
            received as f64 / elapsed_s
        } else {
            0.0
        },
        send_rate: if send_s > 0.0 {
            sent as f64 / send_s
        } else {
            0.0
        },
        latency_us: Quantiles::micros(&hist),
        latency_from_write_us: (args.rate > 0.0).then(|| Quantiles::micros(&hist_written)),
        send_lag_us: (args.rate > 0.0).then(|| Quantiles::micros(&lag)),
        closed_by_broker: closed,
        generator_cpu_s: process_cpu_s(),
        sub_delay_us: args.sub_delay_us,
        rss,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_text(&report);
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn instant_reads_as_clock_monotonic() {
        let ns = super::monotonic_ns(std::time::Instant::now()).expect("Linux Instant");
        let up = std::fs::read_to_string("/proc/uptime").expect("uptime");
        let up: f64 = up
            .split(' ')
            .next()
            .and_then(|s| s.parse().ok())
            .expect("uptime seconds");
        // CLOCK_MONOTONIC excludes suspend, uptime includes it: never ahead of uptime.
        assert!(ns as f64 / 1e9 <= up + 1.0 && ns > 0, "{ns} vs {up}");
    }

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn rss_of_self() -> Result<()> {
        let kib = rss_kib(std::process::id()).unwrap_or(0);
        assert!(kib > 0);
        let s = RssSampler::start(std::process::id(), Duration::from_millis(10))?;
        thread::sleep(Duration::from_millis(35));
        let samples = s.finish();
        assert!(samples.len() >= 3, "{samples:?}");
        Ok(())
    }

    /// A file in the temporary directory, named after the test and the process.
    fn temp_file(name: &str, body: &[u8]) -> Result<PathBuf> {
        let p = std::env::temp_dir().join(format!("mqtt-load-{}-{name}", std::process::id()));
        std::fs::write(&p, body)?;
        Ok(p)
    }

    fn tls_error(ca: &Path) -> String {
        match Tls::new(ca, "localhost") {
            Ok(_) => format!("{} accepted", ca.display()),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn tls_ca_failures_name_the_file() -> Result<()> {
        let e = tls_error(Path::new("/nonexistent/dir/missing-ca.pem"));
        assert!(
            e.contains("--tls-ca /nonexistent/dir/missing-ca.pem"),
            "{e}"
        );
        let garbage = temp_file("garbage-ca.pem", b"not pem at all")?;
        let e = tls_error(&garbage);
        std::fs::remove_file(&garbage)?;
        assert!(
            e.contains("garbage-ca.pem") && e.contains("no CERTIFICATE"),
            "{e}"
        );
        assert!(Tls::new(&garbage, "").is_err());
        Ok(())
    }

    /// A TLS server on a loopback port for one connection: it answers `hello` with `world!`,
    /// then waits for `go` to end the connection with a close_notify.
    fn tls_server(
        ck: &rcgen::CertifiedKey,
    ) -> Result<(
        u16,
        std::sync::mpsc::Sender<()>,
        thread::JoinHandle<Result<()>>,
    )> {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![ck.cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der())),
        )?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let (go, wait) = std::sync::mpsc::channel();
        let server = thread::spawn(move || -> Result<()> {
            let (sock, _) = listener.accept()?;
            let conn = rustls::ServerConnection::new(Arc::new(config))?;
            let mut s = StreamOwned::new(conn, sock);
            let mut hello = [0u8; 5];
            s.read_exact(&mut hello)?;
            ensure!(&hello == b"hello", "server got {hello:?}");
            s.write_all(b"world!")?;
            s.flush()?;
            let _ = wait.recv();
            s.conn.send_close_notify();
            s.flush()?;
            Ok(())
        });
        Ok((port, go, server))
    }

    #[test]
    fn tls_fixed_rate_stream_polls_like_a_socket() -> Result<()> {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
        let ca = temp_file("ca.pem", ck.cert.pem().as_bytes())?;
        let tls = Tls::new(&ca, "localhost");
        std::fs::remove_file(&ca)?;
        let tls = tls?;
        let (port, go, server) = tls_server(&ck)?;
        let sock = TcpStream::connect(("127.0.0.1", port))?;
        let mut w = TlsWriter::new(tls.handshake_blocking(sock)?);
        let mut r = w.acks()?;
        w.write_all(b"hello")?;
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < 6 && Instant::now() < deadline {
            if let Some(n) = read_or_poll(&mut r, &mut buf)? {
                ensure!(n > 0, "early end of stream");
                got.extend_from_slice(&buf[..n]);
            }
        }
        assert_eq!(got, b"world!");
        // Nothing to read: the read times out after POLL, as a plain socket's.
        let t = Instant::now();
        assert_eq!(read_or_poll(&mut r, &mut buf)?, None);
        assert!(t.elapsed() >= POLL / 2, "{:?}", t.elapsed());
        // The server's close_notify ends the stream.
        go.send(())?;
        let end = loop {
            if let Some(n) = read_or_poll(&mut r, &mut buf)? {
                break n;
            }
            ensure!(Instant::now() < deadline, "no end of stream");
        };
        assert_eq!(end, 0);
        w.close_write();
        server
            .join()
            .map_err(|_| anyhow::anyhow!("server panicked"))??;
        Ok(())
    }

    #[test]
    fn tls_checks_the_server_name() -> Result<()> {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
        let ca = temp_file("ca-name.pem", ck.cert.pem().as_bytes())?;
        let tls = Tls::new(&ca, "broker.example");
        std::fs::remove_file(&ca)?;
        let (port, _go, _server) = tls_server(&ck)?;
        let sock = TcpStream::connect(("127.0.0.1", port))?;
        match tls?.handshake_blocking(sock) {
            Ok(_) => bail!("a certificate for localhost accepted for broker.example"),
            Err(e) => assert!(format!("{e:#}").contains("certificate"), "{e:#}"),
        }
        Ok(())
    }

    #[test]
    fn schedule_bounds() {
        let s = Schedule {
            interval_ns: Some(1000.0),
            start_ns: 5000,
            limit: None,
            end_ns: Some(15_000),
            spin: false,
        };
        assert_eq!(s.due(0), 5000);
        assert_eq!(s.due(3), 8000);
        assert!(s.wants(9, 0));
        assert!(!s.wants(10, 0));
        let c = Schedule {
            interval_ns: None,
            start_ns: 0,
            limit: Some(3),
            end_ns: None,
            spin: false,
        };
        assert!(c.wants(2, u64::MAX));
        assert!(!c.wants(3, 0));
    }
}
