//! The two MQTT clients behind the CLI, speaking the JSON of `docs/agent-api.md` over MQTT 3.1.1:
//!
//! * [`agent_exec`] (`fedmesh agent exec --describe "..." -- CMD ARGS`) turns any command into an
//!   agent: each task's input goes to the command's stdin, its stdout becomes the result.
//! * [`task_submit`] (`fedmesh task submit "..."`) submits one task and waits for its result.
//!
//! Both bound everything they hold: packet sizes, concurrent commands, captured output, waits.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use fedmesh_protocol::Outcome;
use fedmesh_protocol::keys::{hex, is_valid_name};
use fedmesh_protocol::limits::{MAX_NOTE_BYTES, MAX_PAYLOAD_BYTES};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, LastWill, MqttOptions, Packet, QoS,
    SubscribeReasonCode,
};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::api;

/// MQTT keep alive of both clients.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Largest MQTT packet sent or received (a 48 KiB binary input is ~64 KiB as base64).
const MAX_PACKET_BYTES: usize = 512 * 1024;
/// How much of a failed command's stderr is reported.
const STDERR_TAIL_BYTES: usize = 1024;
/// Lifetime of `agent exec`'s advertisement; it re-advertises every third of it.
const ADVERTISE_TTL_S: u64 = 3600;
/// How long `task submit` waits past the task's deadline for the final result.
const RESULT_GRACE: Duration = Duration::from_secs(5);
/// How long a shutting-down agent keeps the connection to flush its withdraw.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);
/// Reconnect back-off bounds.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where and as whom to connect.
#[derive(Clone)]
pub struct ConnectOpts {
    /// Broker host.
    pub host: String,
    /// Broker port (the MQTT 3.1.1 listener).
    pub port: u16,
    /// Username (the principal), if the node requires credentials.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// MQTT client id (the principal of anonymous clients).
    pub client_id: String,
    /// Connect over TLS, trusting the CA certificate(s) in this PEM file.
    pub tls_ca: Option<std::path::PathBuf>,
    /// With `tls_ca`: a client certificate and its key (PEM files).
    pub tls_client: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl fmt::Debug for ConnectOpts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectOpts")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("client_id", &self.client_id)
            .field("tls_ca", &self.tls_ca)
            .field("tls_client", &self.tls_client)
            .finish()
    }
}

impl ConnectOpts {
    /// The principal the node knows this client by: the username, else the client id.
    pub fn principal(&self) -> &str {
        self.username.as_deref().unwrap_or(&self.client_id)
    }

    fn mqtt_options(&self) -> anyhow::Result<MqttOptions> {
        for (what, name) in [
            ("principal", self.principal()),
            ("client id", self.client_id.as_str()),
        ] {
            if !is_valid_name(name) {
                bail!("{what} {name:?} is not 1-64 characters from [A-Za-z0-9_.-]");
            }
        }
        let mut o = MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
        o.set_keep_alive(KEEP_ALIVE)
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
        if let Some(user) = &self.username {
            o.set_credentials(user.clone(), self.password.clone().unwrap_or_default());
        }
        if let Some(ca) = &self.tls_ca {
            let client = self
                .tls_client
                .as_ref()
                .map(|(c, k)| (c.as_path(), k.as_path()));
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(tls_client_config(ca, client)?)),
            ));
        }
        Ok(o)
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A TLS client configuration trusting the CA certificates in the PEM file `ca` (ring, as
/// the node's own TLS listener), presenting the client certificate and key in `client`.
fn tls_client_config(
    ca: &std::path::Path,
    client: Option<(&std::path::Path, &std::path::Path)>,
) -> anyhow::Result<tokio_rustls::rustls::ClientConfig> {
    use tokio_rustls::rustls::{
        self, RootCertStore,
        pki_types::{PrivateKeyDer, pem::PemObject},
    };
    let mut roots = RootCertStore::empty();
    let certs = fedmesh_broker::pem_certificates(ca)
        .with_context(|| format!("--tls-ca {}", ca.display()))?;
    for c in certs {
        roots
            .add(c)
            .with_context(|| format!("--tls-ca {}", ca.display()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(roots);
    let Some((cert, key)) = client else {
        return Ok(builder.with_no_client_auth());
    };
    let chain = fedmesh_broker::pem_certificates(cert)
        .with_context(|| format!("--tls-cert {}", cert.display()))?;
    let key_der = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("--tls-key {}: no usable PEM private key", key.display()))?;
    builder
        .with_client_auth_cert(chain, key_der)
        .with_context(|| format!("--tls-key {}: does not fit --tls-cert", key.display()))
}

/// What to do about a connection error a user can fix, if it is one.
fn hint(e: &rumqttc::ConnectionError) -> &'static str {
    if e.to_string().contains("CertificateRequired") {
        " (the node requires a client certificate: pass --tls-cert and --tls-key)"
    } else {
        ""
    }
}

/// Options of `fedmesh agent exec`.
#[derive(Clone, Debug)]
pub struct ExecOpts {
    /// Connection.
    pub connect: ConnectOpts,
    /// The advertised description.
    pub describe: String,
    /// Advertised skill tags.
    pub skills: Vec<String>,
    /// Advertised examples.
    pub examples: Vec<String>,
    /// Commands run at once (also the advertised capacity).
    pub capacity: u16,
    /// The command and its arguments.
    pub command: Vec<String>,
    /// Longest run of one command.
    pub timeout: Duration,
}

/// Options of `fedmesh task submit`.
#[derive(Clone, Debug)]
pub struct SubmitOpts {
    /// Connection.
    pub connect: ConnectOpts,
    /// What to do.
    pub description: String,
    /// The task input.
    pub input: Option<Vec<u8>>,
    /// Required skills.
    pub skills: Vec<String>,
    /// Required policies.
    pub policies: Vec<String>,
    /// Idempotency key; random when `None`.
    pub request_id: Option<String>,
    /// Relative task deadline.
    pub deadline: Duration,
    /// Wait for the result (else return once accepted).
    pub wait: bool,
}

/// How a submitted task ended (or stood, without `wait`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskOutcome {
    /// `completed`, `failed`, `expired` (or the accepted state without `wait`).
    pub state: String,
    /// The output of a completed task.
    pub output: Option<Vec<u8>>,
    /// Why it failed.
    pub error: Option<String>,
    /// The task id (32 hex), once known.
    pub task_id: String,
}

// ---------------------------------------------------------------------------------------------
// Shared plumbing.

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Errors after which reconnecting is pointless.
fn is_fatal(e: &ConnectionError) -> bool {
    !hint(e).is_empty()
        || matches!(
            e,
            ConnectionError::ConnectionRefused(
                ConnectReturnCode::BadUserNamePassword
                    | ConnectReturnCode::NotAuthorized
                    | ConnectReturnCode::BadClientId
                    | ConnectReturnCode::RefusedProtocolVersion
            )
        )
}

/// Doubling reconnect delay.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(BACKOFF_MIN)
    }
    fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        d
    }
}

/// The longest suffix of `s` of at most `max` bytes that starts on a character boundary.
fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Completes on ctrl-c (SIGINT) or SIGTERM; never, if no handler can be installed.
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                r = tokio::signal::ctrl_c() => if r.is_err() { std::future::pending::<()>().await },
                _ = term.recv() => {}
            }
            return;
        }
    }
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

// ---------------------------------------------------------------------------------------------
// agent exec

/// The topics of one agent.
struct AgentTopics {
    advertise: String,
    withdraw: String,
    inbox: String,
    progress: String,
    result: String,
}

impl AgentTopics {
    fn new(principal: &str) -> Self {
        let t = |op: &str| format!("fedmesh/v1/agent/{principal}/{op}");
        Self {
            advertise: t("advertise"),
            withdraw: t("withdraw"),
            inbox: t("inbox"),
            progress: t("progress"),
            result: t("result"),
        }
    }
}

/// A task as delivered to the inbox.
#[derive(Debug)]
struct TaskMsg {
    id: String,
    attempt: u64,
    description: String,
    input: Vec<u8>,
    deadline_ms: Option<u64>,
}

fn parse_task(v: &Value) -> anyhow::Result<TaskMsg> {
    let id = v
        .get("task_id")
        .and_then(Value::as_str)
        .filter(|s| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| anyhow!("task_id: missing or not 32 hex characters"))?
        .to_string();
    let input = match (v.get("input"), v.get("input_b64")) {
        (Some(Value::String(s)), _) => s.clone().into_bytes(),
        (_, Some(Value::String(b))) => STANDARD
            .decode(b)
            .map_err(|e| anyhow!("input_b64: invalid base64: {e}"))?,
        _ => Vec::new(),
    };
    Ok(TaskMsg {
        id,
        attempt: v.get("attempt").and_then(Value::as_u64).unwrap_or(1),
        description: v
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        input,
        deadline_ms: v.get("deadline_ms").and_then(Value::as_u64),
    })
}

/// `{"task_id": ..., "output"|"output_b64"|"error": ...}`.
fn result_payload(task_id: &str, outcome: &Outcome) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("task_id".into(), task_id.into());
    match outcome {
        Outcome::Ok(out) => match std::str::from_utf8(out) {
            Ok(s) => m.insert("output".into(), s.into()),
            Err(_) => m.insert("output_b64".into(), STANDARD.encode(out).into()),
        },
        Outcome::Failed(e) => m.insert("error".into(), e.as_str().into()),
    };
    Value::Object(m).to_string().into_bytes()
}

/// What every task runner shares.
struct Exec {
    client: AsyncClient,
    topics: AgentTopics,
    command: Vec<String>,
    timeout: Duration,
    capacity: u16,
    slots: Arc<Semaphore>,
    running: Mutex<HashSet<String>>,
}

impl Exec {
    async fn publish(&self, topic: &str, payload: Vec<u8>) {
        if let Err(e) = self
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
        {
            tracing::warn!(error = %e, topic, "could not queue a publish");
        }
    }

    async fn report(&self, task_id: &str, outcome: &Outcome) {
        self.publish(&self.topics.result, result_payload(task_id, outcome))
            .await;
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts `task` if a slot is free; refuses it (the node retries elsewhere) otherwise.
    fn dispatch(self: &Arc<Self>, task: TaskMsg) {
        if !self.running().insert(task.id.clone()) {
            tracing::debug!(task = %task.id, "duplicate delivery ignored");
            return;
        }
        let exec = Arc::clone(self);
        let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() else {
            tracing::warn!(task = %task.id, capacity = self.capacity, "at capacity; refusing the task");
            tokio::spawn(async move {
                let why = format!("agent at capacity ({} tasks running)", exec.capacity);
                exec.report(&task.id, &Outcome::Failed(why)).await;
                exec.running().remove(&task.id);
            });
            return;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let started = Instant::now();
            tracing::info!(task = %task.id, attempt = task.attempt, bytes = task.input.len(), "task started");
            let progress = json!({"task_id": task.id, "percent": 0, "note": "started"});
            exec.publish(&exec.topics.progress, progress.to_string().into_bytes())
                .await;
            let outcome = run_command(&exec.command, &task, exec.timeout).await;
            match &outcome {
                Outcome::Ok(out) => {
                    tracing::info!(task = %task.id, bytes = out.len(), ms = started.elapsed().as_millis() as u64, "task completed")
                }
                Outcome::Failed(e) => {
                    tracing::warn!(task = %task.id, error = %e, ms = started.elapsed().as_millis() as u64, "task failed")
                }
            }
            exec.report(&task.id, &outcome).await;
            exec.running().remove(&task.id);
        });
    }
}

/// Reads all of `r`, keeping at most `max` bytes; the flag tells whether more was discarded.
async fn read_bounded<R: AsyncRead + Unpin>(r: Option<R>, max: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut overflow = false;
    let Some(mut r) = r else {
        return (kept, overflow);
    };
    let mut buf = vec![0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = max.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                overflow |= n > room;
            }
        }
    }
    (kept, overflow)
}

/// Reads all of `r`, keeping its last `max` bytes.
async fn read_tail<R: AsyncRead + Unpin>(r: Option<R>, max: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let Some(mut r) = r else { return kept };
    let mut buf = vec![0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * max {
                    kept.drain(..kept.len() - max);
                }
            }
        }
    }
    if kept.len() > max {
        kept.drain(..kept.len() - max);
    }
    kept
}

/// Runs `command` once for `task`: input on stdin, bounded stdout as the output.
async fn run_command(command: &[String], task: &TaskMsg, timeout: Duration) -> Outcome {
    let Some((program, args)) = command.split_first() else {
        return Outcome::Failed("no command configured".into());
    };
    let budget = match task.deadline_ms {
        Some(deadline) => timeout.min(Duration::from_millis(deadline.saturating_sub(now_ms()))),
        None => timeout,
    };
    if budget.is_zero() {
        return Outcome::Failed("the task's deadline already passed".into());
    }
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .env("FEDMESH_TASK_ID", &task.id)
        .env("FEDMESH_TASK_ATTEMPT", task.attempt.to_string())
        .env("FEDMESH_TASK_DESCRIPTION", &task.description);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("cannot start {program:?}: {e}")),
    };
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let input = &task.input;
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A command that does not read its input closes the pipe early: not an error.
            let _ = stdin.write_all(input).await;
            let _ = stdin.shutdown().await;
        }
    };
    let run = async {
        let ((), (out, overflow), err, status) = tokio::join!(
            feed,
            read_bounded(stdout, MAX_PAYLOAD_BYTES),
            read_tail(stderr, STDERR_TAIL_BYTES),
            child.wait()
        );
        (out, overflow, err, status)
    };
    let finished = tokio::time::timeout(budget, run).await;
    let (out, overflow, err, status) = match finished {
        Ok(r) => r,
        Err(_) => {
            if let Err(e) = child.kill().await {
                tracing::warn!(task = %task.id, error = %e, "could not kill a timed-out command");
            }
            return Outcome::Failed(format!(
                "timed out after {:.1}s; the command was killed",
                budget.as_secs_f64()
            ));
        }
    };
    let status = match status {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(format!("waiting for the command: {e}")),
    };
    if !status.success() {
        let prefix = format!("command failed ({status})");
        let stderr = String::from_utf8_lossy(&err);
        let stderr = stderr.trim();
        if stderr.is_empty() {
            return Outcome::Failed(prefix);
        }
        let room = MAX_NOTE_BYTES.saturating_sub(prefix.len() + 2);
        return Outcome::Failed(format!("{prefix}: {}", tail(stderr, room)));
    }
    if overflow {
        return Outcome::Failed(format!(
            "output larger than {MAX_PAYLOAD_BYTES} bytes (the federation's limit)"
        ));
    }
    Outcome::Ok(out)
}

/// Runs `opts.command` as an agent until ctrl-c or SIGTERM, then withdraws.
pub async fn agent_exec(opts: ExecOpts) -> anyhow::Result<()> {
    if opts.command.is_empty() {
        bail!("no command: use `fedmesh agent exec --describe \"...\" -- CMD ARGS`");
    }
    if opts.capacity == 0 {
        bail!("capacity must be at least 1");
    }
    if opts.timeout.is_zero() {
        bail!("timeout must be > 0");
    }
    let principal = opts.connect.principal().to_string();
    let topics = AgentTopics::new(&principal);
    let advert = json!({
        "description": opts.describe,
        "examples": opts.examples,
        "skills": opts.skills,
        "resources": {"capacity": opts.capacity},
        "ttl_s": ADVERTISE_TTL_S,
    })
    .to_string()
    .into_bytes();
    // Refuse locally what the node would refuse.
    api::parse_agent("advertise", &advert)
        .map_err(|e| anyhow!("invalid agent description: {}: {}", e.field, e.reason))?;

    let mut mqtt = opts.connect.mqtt_options()?;
    mqtt.set_last_will(LastWill::new(
        topics.withdraw.clone(),
        b"{}".to_vec(),
        QoS::AtLeastOnce,
        false,
    ));
    let (client, mut eventloop) = AsyncClient::new(mqtt, 64);
    // rumqttc leaves Nagle on; small MQTT packets would wait for delayed ACKs (~40 ms).
    eventloop.network_options.set_tcp_nodelay(true);
    let exec = Arc::new(Exec {
        client: client.clone(),
        topics,
        command: opts.command.clone(),
        timeout: opts.timeout,
        capacity: opts.capacity,
        slots: Arc::new(Semaphore::new(usize::from(opts.capacity))),
        running: Mutex::new(HashSet::new()),
    });

    let mut readvertise = tokio::time::interval(Duration::from_secs(ADVERTISE_TTL_S / 3));
    readvertise.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    readvertise.tick().await; // the first tick is immediate; ConnAck advertises
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut backoff = Backoff::new();
    let mut connected = false;
    let mut advertised = false;
    tracing::info!(agent = %principal, broker = %opts.connect.addr(), command = ?opts.command, "starting agent");

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = readvertise.tick(), if connected => {
                let exec = Arc::clone(&exec);
                let advert = advert.clone();
                tokio::spawn(async move { exec.publish(&exec.topics.advertise, advert).await });
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    backoff.reset();
                    tracing::info!(broker = %opts.connect.addr(), "connected");
                    // A clean session: subscribe (again), then (re-)advertise.
                    let exec = Arc::clone(&exec);
                    let advert = advert.clone();
                    tokio::spawn(async move {
                        if let Err(e) = exec.client.subscribe(exec.topics.inbox.clone(), QoS::AtLeastOnce).await {
                            tracing::warn!(error = %e, "could not queue the subscribe");
                        }
                        exec.publish(&exec.topics.advertise, advert).await;
                    });
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                        bail!("the node refused the subscription to {} (is {principal} allowed to be an agent?)", exec.topics.inbox);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == exec.topics.inbox => {
                    on_agent_inbox(&exec, &p.payload, &mut advertised)?;
                }
                Ok(_) => {}
                Err(e) => {
                    connected = false;
                    if is_fatal(&e) {
                        bail!("connecting to {} as {principal}: {e}{}", opts.connect.addr(), hint(&e));
                    }
                    let delay = backoff.next();
                    tracing::warn!(error = %e, retry_in_s = delay.as_secs(), "connection lost");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = &mut shutdown => break,
                    }
                }
            }
        }
    }

    if !connected {
        tracing::info!("stopped (not connected; the Last Will withdraws the agent)");
        return Ok(());
    }
    tracing::info!("shutting down: handing back running tasks and withdrawing");
    let running: Vec<String> = exec.running().iter().cloned().collect();
    let flush = async {
        for id in running {
            let outcome = Outcome::Failed("agent shutting down".into());
            exec.report(&id, &outcome).await;
        }
        exec.publish(&exec.topics.withdraw, b"{}".to_vec()).await;
        if let Err(e) = client.disconnect().await {
            tracing::debug!(error = %e, "disconnect");
        }
    };
    let drive = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    if tokio::time::timeout(SHUTDOWN_FLUSH, async { tokio::join!(flush, drive) })
        .await
        .is_err()
    {
        tracing::warn!("could not flush the withdraw in time; the Last Will withdraws the agent");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Handles one message on the agent's inbox. Errors end `agent exec`.
fn on_agent_inbox(exec: &Arc<Exec>, payload: &[u8], advertised: &mut bool) -> anyhow::Result<()> {
    let v: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a non-JSON inbox message");
            return Ok(());
        }
    };
    let text = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    match v.get("type").and_then(Value::as_str) {
        Some("task") => match parse_task(&v) {
            Ok(task) => exec.dispatch(task),
            Err(e) => {
                tracing::warn!(error = %e, "malformed task");
                let id = text("task_id");
                if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    let exec = Arc::clone(exec);
                    tokio::spawn(async move {
                        exec.report(&id, &Outcome::Failed(format!("malformed task: {e}")))
                            .await;
                    });
                }
            }
        },
        Some("advertised") => {
            *advertised = true;
            tracing::info!(agent = %text("agent"), version = v["version"].as_u64().unwrap_or(0), expires_at_ms = v["expires_at_ms"].as_u64().unwrap_or(0), "advertised");
        }
        Some("withdrawn") => tracing::info!(agent = %text("agent"), "withdrawn"),
        Some("error") => {
            let (op, field, reason) = (text("op"), text("field"), text("reason"));
            if op == "advertise" && !*advertised {
                bail!("the node refused the advertisement: {field}: {reason}");
            }
            tracing::error!(%op, %field, %reason, "the node refused a request");
        }
        other => tracing::debug!(kind = ?other, "ignoring an inbox message"),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// task submit

/// The submit payload of `opts` under `request_id`.
fn submit_payload(opts: &SubmitOpts, request_id: &str, deadline_ms: u64) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("request_id".into(), request_id.into());
    m.insert("description".into(), opts.description.as_str().into());
    if let Some(input) = &opts.input {
        match std::str::from_utf8(input) {
            Ok(s) => m.insert("input".into(), s.into()),
            Err(_) => m.insert("input_b64".into(), STANDARD.encode(input).into()),
        };
    }
    m.insert("skills".into(), json!(opts.skills));
    m.insert("policies".into(), json!(opts.policies));
    m.insert("deadline_ms".into(), deadline_ms.into());
    Value::Object(m).to_string().into_bytes()
}

/// The outcome carried by a `result` (or final `status`) reply.
fn outcome_of(v: &Value, state: &str) -> anyhow::Result<TaskOutcome> {
    let output = match (v.get("output"), v.get("output_b64")) {
        (Some(Value::String(s)), _) => Some(s.clone().into_bytes()),
        (_, Some(Value::String(b))) => Some(
            STANDARD
                .decode(b)
                .context("the node sent invalid output_b64")?,
        ),
        _ => None,
    };
    Ok(TaskOutcome {
        state: state.to_string(),
        output,
        error: v.get("error").and_then(Value::as_str).map(str::to_string),
        task_id: v
            .get("task_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    })
}

/// Submits one task and waits for its result (`wait`), or for its acceptance.
///
/// Prints status lines to stderr as they come. After a reconnect the submit is repeated: the
/// node treats the same `request_id` as the same task and answers with its current state.
pub async fn task_submit(opts: SubmitOpts) -> anyhow::Result<TaskOutcome> {
    if opts.deadline.is_zero() {
        bail!("deadline must be > 0");
    }
    let deadline_ms = u64::try_from(opts.deadline.as_millis()).unwrap_or(u64::MAX);
    let request_id = opts
        .request_id
        .clone()
        .unwrap_or_else(|| format!("cli-{}", hex(&rand::random::<[u8; 8]>())));
    let principal = opts.connect.principal().to_string();
    let inbox = format!("fedmesh/v1/client/{principal}/inbox");
    let submit_topic = format!("fedmesh/v1/client/{principal}/submit");
    let payload = submit_payload(&opts, &request_id, deadline_ms);
    api::parse_client("submit", &payload)
        .map_err(|e| anyhow!("invalid task: {}: {}", e.field, e.reason))?;

    let (client, mut eventloop) = AsyncClient::new(opts.connect.mqtt_options()?, 16);
    eventloop.network_options.set_tcp_nodelay(true);
    let give_up = tokio::time::sleep(opts.deadline.saturating_add(RESULT_GRACE));
    tokio::pin!(give_up);
    let mut connected_once = false;
    let mut submits = 0u32;
    let mut task_id = String::new();

    loop {
        let event = tokio::select! {
            () = &mut give_up => bail!(
                "no result for request {request_id} (task {}) within {}s; ask later on fedmesh/v1/client/{principal}/status",
                if task_id.is_empty() { "unknown" } else { &task_id },
                (opts.deadline + RESULT_GRACE).as_secs()
            ),
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected_once = true;
                // Subscribe first; the submit goes out once the SubAck is in.
                client
                    .try_subscribe(inbox.clone(), QoS::AtLeastOnce)
                    .context("queueing the inbox subscription")?;
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    bail!(
                        "the node refused the subscription to {inbox} (is {principal} allowed to submit?)"
                    );
                }
                if submits > 0 {
                    eprintln!("reconnected: asking again for request {request_id}");
                }
                submits += 1;
                client
                    .try_publish(
                        submit_topic.clone(),
                        QoS::AtLeastOnce,
                        false,
                        payload.clone(),
                    )
                    .context("queueing the submit")?;
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == inbox => {
                let Ok(v) = serde_json::from_slice::<Value>(&p.payload) else {
                    continue;
                };
                let text = |k: &str| {
                    v.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                };
                let kind = text("type");
                let ours = match v.get("request_id").and_then(Value::as_str) {
                    Some(id) => id == request_id,
                    // Errors about payloads too broken to carry a request id.
                    None => kind == "error" && text("op") == "submit",
                };
                if !ours {
                    continue;
                }
                if let Some(id) = v.get("task_id").and_then(Value::as_str) {
                    task_id = id.to_string();
                }
                let state = text("state");
                let agent = text("agent");
                match kind.as_str() {
                    "accepted" => {
                        eprintln!("accepted: task {task_id} (request {request_id})");
                        if !opts.wait {
                            return Ok(TaskOutcome {
                                state,
                                output: None,
                                error: None,
                                task_id,
                            });
                        }
                    }
                    "status" => {
                        let final_state =
                            matches!(state.as_str(), "completed" | "failed" | "expired");
                        if final_state
                            && (v.get("output").is_some()
                                || v.get("output_b64").is_some()
                                || v.get("error").is_some())
                        {
                            return outcome_of(&v, &state);
                        }
                        let mut line = state.clone();
                        if !agent.is_empty() {
                            line.push_str(&format!(" on {agent}"));
                        }
                        if let Some(note) = v.get("note").and_then(Value::as_str) {
                            line.push_str(&format!(": {note}"));
                        }
                        eprintln!("{line}");
                    }
                    "progress" => {
                        let percent = v.get("percent").and_then(Value::as_u64).unwrap_or(0);
                        eprintln!("running on {agent}: {percent}% {}", text("note"));
                    }
                    "result" => return outcome_of(&v, &state),
                    "error" => bail!(
                        "the node refused the task: {}: {}",
                        text("field"),
                        text("reason")
                    ),
                    _ => {}
                }
            }
            Ok(_) => {}
            Err(e) => {
                if is_fatal(&e) || !connected_once {
                    bail!(
                        "connecting to {} as {principal}: {e}{}",
                        opts.connect.addr(),
                        hint(&e)
                    );
                }
                eprintln!("connection lost ({e}); reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(BACKOFF_MIN) => {}
                    () = &mut give_up => bail!("no result for request {request_id} (task {task_id}): the connection was lost"),
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn task(input: &[u8], deadline_ms: Option<u64>) -> TaskMsg {
        TaskMsg {
            id: "00112233445566778899aabbccddeeff".into(),
            attempt: 1,
            description: "test".into(),
            input: input.to_vec(),
            deadline_ms,
        }
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn command_output_becomes_the_result() {
        let out = run_command(
            &sh("tr a-z A-Z"),
            &task(b"hello", None),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(out, Outcome::Ok(b"HELLO".to_vec()));
        let out = run_command(
            &sh("echo \"$FEDMESH_TASK_DESCRIPTION\""),
            &task(b"", None),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(out, Outcome::Ok(b"test\n".to_vec()));
    }

    #[tokio::test]
    async fn failures_report_status_and_stderr_tail() {
        let Outcome::Failed(e) = run_command(
            &sh("head -c 5000 /dev/zero | tr '\\0' x >&2; echo END >&2; exit 3"),
            &task(b"", None),
            Duration::from_secs(10),
        )
        .await
        else {
            panic!("expected a failure")
        };
        assert!(e.starts_with("command failed (exit status: 3): "), "{e}");
        assert!(e.ends_with("xEND"), "{e}");
        assert!(e.len() <= MAX_NOTE_BYTES, "{}", e.len());

        let Outcome::Failed(e) =
            run_command(&sh("sleep 5"), &task(b"", None), Duration::from_millis(200)).await
        else {
            panic!("expected a timeout")
        };
        assert!(e.contains("timed out"), "{e}");

        let Outcome::Failed(e) = run_command(
            &["/nonexistent/cmd".to_string()],
            &task(b"", None),
            Duration::from_secs(1),
        )
        .await
        else {
            panic!("expected a spawn failure")
        };
        assert!(e.contains("cannot start"), "{e}");

        let Outcome::Failed(e) = run_command(
            &sh("head -c 60000 /dev/zero"),
            &task(b"", None),
            Duration::from_secs(10),
        )
        .await
        else {
            panic!("expected an oversize failure")
        };
        assert!(e.contains("larger than"), "{e}");

        let Outcome::Failed(e) =
            run_command(&sh("cat"), &task(b"", Some(1)), Duration::from_secs(10)).await
        else {
            panic!("expected a deadline failure")
        };
        assert!(e.contains("deadline"), "{e}");
    }

    #[tokio::test]
    async fn a_command_ignoring_stdin_still_succeeds() {
        let big = vec![b'a'; 200_000];
        let out = run_command(&sh("echo ok"), &task(&big, None), Duration::from_secs(10)).await;
        assert_eq!(out, Outcome::Ok(b"ok\n".to_vec()));
    }

    #[test]
    fn payloads_parse_with_the_node_parser() {
        let id = "00112233445566778899aabbccddeeff";
        for outcome in [
            Outcome::Ok(b"hi".to_vec()),
            Outcome::Ok(vec![0xff]),
            Outcome::Failed("boom".into()),
        ] {
            let parsed = api::parse_agent("result", &result_payload(id, &outcome));
            assert!(matches!(parsed, Ok(api::AgentOp::Result(r)) if r.outcome == outcome));
        }
        let opts = SubmitOpts {
            connect: ConnectOpts {
                host: "h".into(),
                port: 1,
                username: None,
                password: None,
                client_id: "c".into(),
                tls_ca: None,
                tls_client: None,
            },
            description: "d".into(),
            input: Some(vec![0, 1, 2]),
            skills: vec!["ocr".into()],
            policies: vec![],
            request_id: None,
            deadline: Duration::from_secs(30),
            wait: true,
        };
        let Ok(api::ClientOp::Submit(s)) =
            api::parse_client("submit", &submit_payload(&opts, "r-1", 30_000))
        else {
            panic!("submit payload refused")
        };
        assert_eq!(
            (s.input, s.request_id.as_deref(), s.deadline_ms),
            (vec![0, 1, 2], Some("r-1"), Some(30_000))
        );

        let v: Value = serde_json::from_str(r#"{"type":"task","task_id":"00112233445566778899aabbccddeeff","attempt":2,"input_b64":"AAE=","deadline_ms":5}"#).unwrap();
        let t = parse_task(&v).unwrap();
        assert_eq!(
            (t.attempt, t.input, t.deadline_ms),
            (2, vec![0, 1], Some(5))
        );
        assert!(parse_task(&json!({"type": "task", "task_id": "xyz"})).is_err());
    }

    #[test]
    fn tail_respects_char_boundaries() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("héllo", 5), "éllo");
        assert_eq!(tail("abc", 10), "abc");
    }

    #[test]
    fn tls_ca_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let e = format!(
            "{:#}",
            tls_client_config(&missing, None).expect_err("missing")
        );
        assert!(e.contains("--tls-ca") && e.contains("missing.pem"), "{e}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").expect("write");
        let e = format!(
            "{:#}",
            tls_client_config(&garbage, None).expect_err("garbage")
        );
        assert!(
            e.contains("garbage.pem") && e.contains("no CERTIFICATE"),
            "{e}"
        );
    }

    #[test]
    fn principal_is_the_username_else_the_client_id() {
        let mut c = ConnectOpts {
            host: "h".into(),
            port: 1,
            username: None,
            password: Some("secret".into()),
            client_id: "c-1".into(),
            tls_ca: None,
            tls_client: None,
        };
        assert_eq!(c.principal(), "c-1");
        assert!(!format!("{c:?}").contains("secret"));
        c.username = Some("alice".into());
        assert_eq!(c.principal(), "alice");
        assert!(c.mqtt_options().is_ok());
        c.client_id = "bad id".into();
        assert!(c.mqtt_options().is_err());
    }
}
