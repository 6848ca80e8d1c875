//! The running node: the IO shell around the sans-IO core.
//!
//! One task owns all state (registry, task engine, store, audit log) and runs an event loop:
//! it drains a batch of inbound MQTT messages (bounded), feeds them to the core, persists every
//! resulting write with one flush (group commit), and only then publishes the effects. Timers
//! arrive as ticks. Nothing in here blocks on a peer: publishes go into the broker's bounded
//! queue and a full queue is counted as a drop.

mod federation;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use fedmesh_broker::{Broker, BrokerSettings, Held, Inbound, Outbound, Qos, Role};
use fedmesh_config::{Config, Embedder as EmbedderName};
use fedmesh_embed::Embedder;
use fedmesh_protocol::gossip::{self, Federation, FederationError};
use fedmesh_protocol::registry::Registry;
use fedmesh_protocol::router::RouterParams;
use fedmesh_protocol::task::{Output, Requester, TaskEvent, TaskParams, Tasks};
use fedmesh_protocol::{
    AgentId, AgentLoad, AgentName, Embedding, Message, NodeId, NodeKey, Rejection, TaskId,
    TaskSpec, Vcv,
};
use tokio::sync::mpsc;

use crate::api::{self, AgentOp, ApiError, ClientOp};
use crate::audit::AuditLog;
use crate::http::{self, Shared};
use crate::metrics::{Kind, Metrics};
use crate::p2p;
use crate::store::{Store, Write};

/// Most inbound messages handled in one batch (one flush).
const MAX_BATCH: usize = 512;
/// How often timers (deadlines, retries, expiry) are checked.
const TICK: Duration = Duration::from_millis(50);
/// `/status` and the gauges are rebuilt at most every this many ticks (250 ms).
const STATUS_TICKS: u32 = 5;
/// Remote agents listed in `/status` (the lowest ids; every local agent is listed, and
/// `agents_total` counts them all): a registry of a million agents must not make every
/// refresh serialise a million objects.
const STATUS_REMOTE_AGENTS: usize = 256;
/// Audit checkpoint interval.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(60);
/// Final, delivered tasks are kept this long before they are pruned.
const KEEP_FINISHED_MS: u64 = 3_600_000;
/// Bound on the follow-up rounds of one batch (effects that cause more outputs).
const MAX_ROUNDS: usize = 4;

/// A registry entry ordered by agent id (for the bounded `/status` listing).
struct Listed<'a>(&'a fedmesh_protocol::registry::Entry);

impl PartialEq for Listed<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.vcv.agent == other.0.vcv.agent
    }
}

impl Eq for Listed<'_> {}

impl PartialOrd for Listed<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Listed<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.vcv.agent.cmp(&other.0.vcv.agent)
    }
}

/// Every local agent, and the `cap` remote agents with the lowest ids (a bounded max-heap:
/// O(registry) time, O(listed) memory).
fn listed_agents<'a>(
    entries: impl Iterator<Item = &'a fedmesh_protocol::registry::Entry>,
    me: NodeId,
    cap: usize,
) -> (
    Vec<&'a fedmesh_protocol::registry::Entry>,
    Vec<&'a fedmesh_protocol::registry::Entry>,
) {
    let mut remote = std::collections::BinaryHeap::new();
    let mut local = Vec::new();
    for e in entries {
        if e.vcv.agent.node == me {
            local.push(e);
        } else {
            remote.push(Listed(e));
            if remote.len() > cap {
                remote.pop();
            }
        }
    }
    let remote = remote.into_sorted_vec().into_iter().map(|l| l.0).collect();
    (local, remote)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Starts a node and runs it until Ctrl-C.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let data_dir = cfg.data_dir();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let key = crate::keyfile::load_or_generate(&cfg.key_path())?;
    let store = Store::open(&data_dir)?;
    let audit = AuditLog::open(store.db(), key.clone()).context("opening the audit log")?;
    let embedder: Box<dyn Embedder> = match cfg.routing.embedder {
        EmbedderName::Hash => fedmesh_embed::from_name("hash", &cfg.wordllama_dir())?,
        EmbedderName::Wordllama => fedmesh_embed::from_name("wordllama", &cfg.wordllama_dir())
            .context("routing.embedder = \"wordllama\"")?,
    };

    let settings = BrokerSettings {
        listen_v4: cfg.mqtt.listen_v4_addr().context("mqtt.listen_v4")?,
        listen_v5: cfg.mqtt.listen_v5_addr(),
        tls: cfg.mqtt.listen_tls_addr().map(|listen| {
            let (cert, key) = cfg.tls_paths();
            fedmesh_broker::TlsSettings {
                listen,
                cert,
                key,
                client_ca: cfg.tls_client_ca_path(),
            }
        }),
        anonymous: cfg.mqtt.anonymous_allowed(),
        credentials_path: Some(cfg.credentials_path()),
        max_connections: cfg.mqtt.max_connections,
        max_payload_bytes: cfg.mqtt.max_payload_bytes,
        memory_budget_bytes: cfg.mqtt.memory_budget_mb * 1024 * 1024,
        connect_timeout: Duration::from_millis(cfg.mqtt.connect_timeout_ms),
        queue_depth: cfg.limits.max_queue_depth,
        direct_delivery: cfg.mqtt.direct_delivery,
    };
    let (broker, inbound) = Broker::start(settings).context("starting the MQTT broker")?;
    let broker = Arc::new(broker);
    #[cfg(unix)]
    tokio::spawn(reload_on_sighup(broker.clone()));

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let scrape_broker = broker.clone();
    let scrape_metrics = metrics.clone();
    let shared = Arc::new(Shared {
        registry,
        status: Mutex::new(serde_json::json!({})),
        // Until `restore` is done: a readiness probe must not send clients to a node whose
        // tasks and registry are not back yet.
        unhealthy: Mutex::new(Some("starting: restoring state".into())),
        before_scrape: Box::new(move || {
            let m = scrape_broker.metrics();
            for (name, value) in m.iter() {
                scrape_metrics
                    .broker
                    .get_or_create(&Kind::of(name))
                    .set(value);
            }
            scrape_metrics.broker_healthy.set(i64::from(matches!(
                scrape_broker.health(),
                fedmesh_broker::Health::Healthy
            )));
            scrape_metrics
                .tls_cert_expiry
                .set(scrape_broker.tls_cert_not_after().unwrap_or(0));
        }),
    });
    let http_addr = match cfg.http.listen_addr() {
        Some(addr) => Some(
            http::serve(
                addr,
                shared.clone(),
                std::sync::Arc::downgrade(&audit.view()),
            )
            .await?,
        ),
        None => None,
    };

    let swarm =
        p2p::swarm(&key, &cfg, metrics.p2p_bad_framing.clone()).context("starting libp2p")?;
    let (p2p, p2p_events) = p2p::start(
        swarm,
        &cfg.p2p.listen_addrs(),
        &cfg.p2p.bootstrap,
        metrics.clone(),
    )?;
    let mut node = Node::new(
        cfg,
        key,
        store,
        audit,
        embedder,
        broker.clone(),
        metrics,
        shared,
        p2p,
    )?;
    node.restore().await?;
    eprintln!("fedmesh node {}", node.id);
    eprintln!("  data dir   {}", data_dir.display());
    eprintln!("  mqtt v3.1.1 {}", broker.local_addr_v4());
    if let Some(a) = broker.local_addr_v5() {
        eprintln!("  mqtt v5    {a}");
    }
    if let Some(a) = broker.local_addr_tls() {
        eprintln!("  mqtt tls   {a}");
    }
    if let Some(a) = http_addr {
        eprintln!("  http       http://{a}/status  /metrics  /healthz");
    }
    eprintln!("  agents: connect with any MQTT client; see docs/agent-api.md");
    // The event loop runs as a task on the runtime's workers, not in `block_on` on the main
    // thread: the swarm task, the broker's tasks and the loop then wake one another on the same
    // worker (tokio's LIFO slot) instead of through a cross-thread unpark on every hand-off.
    tokio::spawn(node.event_loop(inbound, p2p_events))
        .await
        .context("the node's event loop panicked")?
}

struct Node {
    id: NodeId,
    key: NodeKey,
    cfg: Config,
    /// The replicated registry and its gossip: the sans-IO core this shell drives (see
    /// `federation`). Its registry carries the ANN index used by routing.
    gossip: Federation,
    tasks: Tasks,
    store: Store,
    audit: AuditLog,
    embedder: Box<dyn Embedder>,
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    submitted_at: HashMap<TaskId, Instant>,
    pending: Vec<Output>,
    last_checkpoint: Instant,
    data_dir: PathBuf,
    /// Something changed since `/status` was last refreshed (refreshed at most once a tick).
    dirty: bool,
    /// The libp2p swarm task.
    p2p: p2p::Handle,
    /// Federation state (hosted tasks, outbox, pending requests).
    fed: federation::Fed,
    /// Writes were applied outside `execute` and wait for the next flush.
    unflushed: bool,
    /// While `Some`, [`Node::publish`] queues messages held at the proxy until the flush under
    /// way completes (`execute`), collecting them here for the release.
    held: RefCell<Option<Vec<Held>>>,
}

impl Node {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: Config,
        key: NodeKey,
        store: Store,
        audit: AuditLog,
        embedder: Box<dyn Embedder>,
        broker: Arc<Broker>,
        metrics: Arc<Metrics>,
        shared: Arc<Shared>,
        p2p: p2p::Handle,
    ) -> anyhow::Result<Self> {
        let id = key.node_id();
        let params = TaskParams {
            router: RouterParams {
                threshold: cfg.routing.threshold as f32,
                top_k: cfg.routing.top_k,
                load_weight: cfg.routing.load_weight as f32,
            },
            max_attempts: cfg.routing.max_attempts,
            attempt_timeout_ms: cfg.routing.attempt_timeout_ms,
            max_live_tasks: cfg.limits.max_inflight_tasks,
        };
        let gcfg = gossip::Config {
            max_agents: cfg.limits.max_agents_per_node,
            max_local_agents: cfg.limits.max_agents_per_node,
            max_peers: (cfg.p2p.max_connections as usize).max(1),
            vcv_ttl_ms: cfg.p2p.advertise_ttl_s.saturating_mul(1000),
            readvertise_interval_ms: cfg.p2p.readvertise_interval_s.saturating_mul(1000),
            anti_entropy_interval_ms: cfg.p2p.sync_interval_s.max(1).saturating_mul(1000),
            ..gossip::Config::default()
        };
        let registry =
            Registry::new(gcfg.max_agents).with_index(Box::new(crate::ann::AnnAdapter::default()));
        let gossip = Federation::new(key.clone(), gcfg, rand::random(), now_ms())
            .context("p2p registry gossip settings")?
            .with_registry(registry);
        Ok(Self {
            id,
            gossip,
            tasks: Tasks::new(id, params),
            data_dir: cfg.data_dir(),
            cfg,
            key,
            store,
            audit,
            embedder,
            broker,
            metrics,
            shared,
            submitted_at: HashMap::new(),
            pending: Vec::new(),
            last_checkpoint: Instant::now(),
            dirty: true,
            p2p,
            fed: federation::Fed::new(),
            unflushed: false,
            held: RefCell::new(None),
        })
    }

    /// Reloads this node's agents and tasks after a (re)start.
    async fn restore(&mut self) -> anyhow::Result<()> {
        let now = now_ms();
        for envelope in self.store.vcvs() {
            match fedmesh_protocol::open(&envelope, now) {
                Ok(env) => {
                    if let Message::Advertise(vcv) = env.message {
                        // Re-issued under a new version, within the agent's own lifetime.
                        let until = vcv.expires_at_ms;
                        if let Err(e) = self.gossip.advertise_until(vcv, until, now) {
                            tracing::info!(reason = %e, "dropping a stored VCV");
                        }
                    }
                }
                Err(e) => tracing::info!(reason = %e, "dropping a stored VCV"),
            }
        }
        self.pump_gossip();
        self.restore_hosted();
        let records = self.store.tasks();
        let n = records.len();
        let outputs = self.tasks.restore(records);
        tracing::info!(agents = self.gossip.local_agents().count(), tasks = n, redeliver = outputs.len(), data_dir = %self.data_dir.display(), "restored state");
        self.audit.append(
            "node_start",
            &self.id.to_string(),
            serde_json::json!({"tasks": n}),
            now,
        )?;
        self.execute(outputs).await?;
        self.refresh_status();
        self.update_health();
        Ok(())
    }

    async fn event_loop(
        mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut p2p_events: mpsc::Receiver<p2p::Event>,
    ) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status_every = 0u32;
        // ctrl-c, or SIGTERM from `docker stop`, systemd or `kill`: flush and return.
        let shutdown = crate::client::shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                msg = inbound.recv() => {
                    let Some(first) = msg else {
                        anyhow::bail!("the broker's link closed");
                    };
                    let mut outputs = Vec::new();
                    self.handle(first, &mut outputs);
                    let mut n = 1;
                    while n < MAX_BATCH {
                        let Ok(m) = inbound.try_recv() else { break };
                        self.handle(m, &mut outputs);
                        n += 1;
                    }
                    // Results (and progress) of hosted tasks leave now, while the batch that
                    // records them is flushed: the origin is the task's owner and persists what
                    // it receives before it acknowledges, and until that acknowledgement the
                    // hosted record (flushed below) resends the result. Waiting for our own
                    // flush first would add a flush to every cross-node round trip and protect
                    // nothing: a crash before that flush leaves the same hosted record without
                    // its outcome either way (the task is delivered to the agent again).
                    self.send_outbox(now_ms());
                    self.execute(outputs).await?;
                    self.dirty = true;
                }
                ev = p2p_events.recv() => {
                    let Some(first) = ev else {
                        anyhow::bail!("the libp2p task ended");
                    };
                    self.p2p_event(first).await?;
                    let mut n = 1;
                    while n < MAX_BATCH {
                        let Ok(ev) = p2p_events.try_recv() else { break };
                        self.p2p_event(ev).await?;
                        n += 1;
                    }
                    self.finish_p2p_batch().await?;
                    self.dirty = true;
                }
                _ = tick.tick() => {
                    let now = now_ms();
                    let mut outputs = self.fed_tick(now);
                    outputs.extend(self.tasks.tick(self.gossip.registry(), now));
                    let changed = !outputs.is_empty() || self.unflushed;
                    self.execute(outputs).await?;
                    status_every += 1;
                    if changed {
                        self.dirty = true;
                    }
                    // At most every STATUS_TICKS ticks: building it is O(registry).
                    if self.dirty && status_every.is_multiple_of(STATUS_TICKS) {
                        self.refresh_status();
                        self.dirty = false;
                    }
                    if status_every.is_multiple_of(20) {
                        self.housekeeping(now).await?;
                    }
                }
                _ = &mut shutdown => {
                    tracing::info!("shutting down");
                    self.store.flush().await?;
                    return Ok(());
                }
            }
        }
    }

    async fn housekeeping(&mut self, now: u64) -> anyhow::Result<()> {
        let pruned = self.tasks.prune(now.saturating_sub(KEEP_FINISHED_MS));
        if !pruned.is_empty() {
            self.store
                .apply(pruned.into_iter().map(Write::DeleteTask))?;
        }
        if self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
            self.audit.checkpoint(now)?;
            self.last_checkpoint = Instant::now();
        }
        self.update_health();
        Ok(())
    }

    /// What `/healthz` reports: the broker's health (the node is restored by now).
    fn update_health(&self) {
        let health = match self.broker.health() {
            fedmesh_broker::Health::Healthy => None,
            other => Some(format!("broker {other:?}")),
        };
        *self
            .shared
            .unhealthy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = health;
    }

    /// Persists every write of `outputs` with one flush, then performs the effects in order.
    async fn execute(&mut self, outputs: Vec<Output>) -> anyhow::Result<()> {
        let mut outputs = outputs;
        outputs.append(&mut self.pending);
        if self.unflushed {
            let t = Instant::now();
            self.store.flush().await?;
            tracing::debug!(target: "fedmesh_hop", us = t.elapsed().as_micros() as u64, "flushed (unflushed)");
            self.unflushed = false;
        }
        // Offers accepted in this batch are durable now: answer them.
        self.after_flush();
        for _ in 0..MAX_ROUNDS {
            if outputs.is_empty() {
                break;
            }
            let writes: Vec<Write> = outputs
                .iter()
                .filter_map(|o| match o {
                    Output::Persist(r) => Some(Write::Task(r.clone())),
                    _ => None,
                })
                .collect();
            if !writes.is_empty() {
                self.store.apply(writes)?;
            }
            // Offers leave before the flush. Every other effect is carried out now too, but
            // what it publishes is held at the proxy until the flush completes: no client sees
            // it before it is durable, and the publish pipeline runs while sled flushes (see
            // ARCHITECTURE.md, "what waits for a flush", and `fedmesh_broker::Held`).
            let mut next = Vec::new();
            outputs = self.offer_early(outputs, &mut next);
            // The flush starts now (sled hands it to its own threads on the first poll) and the
            // effects run while it does.
            let t = Instant::now();
            let store = self.store.clone();
            let mut flush = Box::pin(async move { store.flush().await });
            let started = futures::poll!(flush.as_mut());
            *self.held.borrow_mut() = Some(Vec::new());
            for o in outputs {
                self.effect(o, &mut next);
            }
            let held = self.held.borrow_mut().take().unwrap_or_default();
            match started {
                std::task::Poll::Ready(r) => r?,
                std::task::Poll::Pending => flush.await?,
            }
            tracing::debug!(target: "fedmesh_hop", us = t.elapsed().as_micros() as u64, "flushed");
            self.broker.release(held);
            outputs = next;
        }
        self.pending = outputs;
        Ok(())
    }

    /// Sends the offers among `outputs` (deliveries to agents on other nodes) before the
    /// batch's flush and returns the other outputs. An offer that cannot be sent adds its
    /// follow-up (a decline) to `next`, the next round.
    fn offer_early(&mut self, outputs: Vec<Output>, next: &mut Vec<Output>) -> Vec<Output> {
        let mut rest = Vec::with_capacity(outputs.len());
        for o in outputs {
            match o {
                Output::Deliver { ref agent, .. } if agent.node != self.id => self.effect(o, next),
                o => rest.push(o),
            }
        }
        rest
    }

    fn effect(&mut self, output: Output, next: &mut Vec<Output>) {
        match output {
            Output::Persist(_) => {}
            Output::Deliver {
                agent,
                agent_version,
                task,
                attempt,
            } => {
                if let Some(t) = self.submitted_at.get(&task.id)
                    && attempt == 1
                {
                    self.metrics
                        .route_latency
                        .observe(t.elapsed().as_secs_f64());
                }
                if agent.node == self.id {
                    let topic = format!("fedmesh/v1/agent/{}/inbox", agent.name);
                    self.publish(topic, api::task_message(&task, attempt), None, "task");
                } else {
                    self.offer(agent, agent_version, *task, attempt, next);
                }
            }
            Output::Notify {
                requester,
                task,
                event,
            } => {
                let finished = matches!(event, TaskEvent::Finished { .. });
                if finished {
                    if let Some(t) = self.submitted_at.remove(&task) {
                        self.metrics.task_latency.observe(t.elapsed().as_secs_f64());
                    }
                    if let TaskEvent::Finished { state, agent, .. } = &event {
                        let agent = agent.as_ref().map(ToString::to_string).unwrap_or_default();
                        self.audit_append(
                            "task_finished",
                            &task.to_string(),
                            serde_json::json!({"state": state.as_str(), "agent": agent}),
                        );
                    }
                }
                tracing::debug!(target: "fedmesh_hop", %task, finished, "notify");
                let payload = api::event_message(task, &requester.request_id, &event);
                let kind = if finished { "result" } else { "status" };
                self.publish(
                    requester.reply_topic.clone(),
                    payload,
                    requester.correlation.clone().map(Bytes::from),
                    kind,
                );
                if finished {
                    next.extend(self.tasks.mark_delivered(task));
                }
            }
        }
    }

    fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        correlation: Option<Bytes>,
        kind: &'static str,
    ) {
        let out = Outbound {
            topic,
            payload: Bytes::from(payload),
            qos: Qos::AtLeastOnce,
            retain: false,
            correlation_data: correlation,
        };
        let queued = match self.held.borrow_mut().as_mut() {
            Some(held) => self.broker.publish_held(out).map(|h| held.push(h)),
            None => self.broker.publish(out),
        };
        match queued {
            Ok(()) => {
                self.metrics
                    .messages_out
                    .get_or_create(&Kind::of(kind))
                    .inc();
            }
            Err(e) => {
                self.metrics
                    .queue_dropped
                    .get_or_create(&Kind::of("broker_outbound"))
                    .inc();
                tracing::warn!(error = %e, kind, "dropped an outbound message");
            }
        }
    }

    fn audit_append(&mut self, kind: &str, subject: &str, detail: serde_json::Value) {
        if let Err(e) = self.audit.append(kind, subject, detail, now_ms()) {
            self.metrics.error("audit_append");
            tracing::error!(error = %e, "audit append failed");
        }
    }

    fn reply_error(&self, topic: String, correlation: Option<Bytes>, err: &ApiError) {
        self.metrics.error(&format!("api_{}", err.op));
        tracing::info!(error = %err, "refused a request");
        self.publish(topic, api::error_message(err), correlation, "error");
    }

    fn handle(&mut self, msg: Inbound, outputs: &mut Vec<Output>) {
        if msg.op == fedmesh_broker::acl::INBOX_OP {
            return; // the node's own deliveries, seen by its own subscription
        }
        tracing::debug!(target: "fedmesh_hop", op = %msg.op, "mqtt in");
        self.metrics
            .messages_in
            .get_or_create(&Kind::of(msg.op.as_str()))
            .inc();
        match msg.role {
            Role::Agent => self.handle_agent(msg, outputs),
            Role::Client => self.handle_client(msg, outputs),
        }
    }

    fn handle_agent(&mut self, msg: Inbound, outputs: &mut Vec<Output>) {
        let inbox = format!("fedmesh/v1/agent/{}/inbox", msg.principal);
        let name = match AgentName::new(msg.principal.clone()) {
            Ok(n) => n,
            Err(e) => {
                let err = ApiError {
                    op: "agent",
                    field: "topic".into(),
                    reason: e.to_string(),
                    request_id: None,
                };
                return self.reply_error(inbox, None, &err);
            }
        };
        let agent = AgentId::new(self.id, name.clone());
        let op = match api::parse_agent(&msg.op, &msg.payload) {
            Ok(op) => op,
            Err(err) => return self.reply_error(inbox, None, &err),
        };
        let now = now_ms();
        match op {
            AgentOp::Advertise(req) => match self.advertise(name.clone(), req, now) {
                Ok(reply) => {
                    self.publish(inbox, reply, None, "advertised");
                    self.redeliver_hosted(&name);
                    // A (re)connecting agent gets the tasks it holds (the broker forgets
                    // undelivered messages across restarts), and may unblock waiting tasks.
                    outputs.extend(self.tasks.redeliver(&agent));
                    outputs.extend(self.tasks.tick(self.gossip.registry(), now));
                }
                Err(err) => self.reply_error(inbox, None, &err),
            },
            AgentOp::Withdraw => {
                // Sealed, stored (deleted), audited and published by `pump_gossip`.
                if self.gossip.withdraw(&name, now).is_ok() {
                    self.pump_gossip();
                }
                self.publish(inbox, api::withdrawn_message(&agent), None, "withdrawn");
            }
            AgentOp::Progress(p) => {
                if !self.hosted_progress(&name, p.task_id, p.percent, p.note.clone(), now) {
                    outputs.extend(
                        self.tasks
                            .progress(&agent, p.task_id, p.percent, p.note, now),
                    );
                }
            }
            AgentOp::Result(r) if self.hosted_result(&name, r.task_id, r.outcome.clone(), now) => {}
            AgentOp::Result(r) => {
                let out =
                    self.tasks
                        .result(&agent, r.task_id, r.outcome, self.gossip.registry(), now);
                if out.is_empty() {
                    self.metrics.error("result_ignored");
                    tracing::debug!(%agent, task = %r.task_id, "ignored a result for a task this agent does not hold");
                }
                outputs.extend(out);
            }
        }
    }

    fn advertise(
        &mut self,
        name: AgentName,
        req: api::AdvertiseReq,
        now: u64,
    ) -> Result<Vec<u8>, ApiError> {
        let err = |field: &str, reason: String| ApiError {
            op: "advertise",
            field: field.into(),
            reason,
            request_id: None,
        };
        let capability = match &req.embedding {
            Some(e) => Embedding::quantise(e.space.clone(), &e.values)
                .ok_or_else(|| err("embedding.values", "zero or non-finite vector".into()))?,
            None => {
                let v = fedmesh_embed::agent_vector(
                    self.embedder.as_ref(),
                    &req.description,
                    &req.examples,
                );
                Embedding::quantise(self.embedder.space(), &v)
                    .ok_or_else(|| err("description", "could not be embedded".into()))?
            }
        };
        let spec = req
            .spec
            .as_deref()
            .and_then(|s| Embedding::quantise(self.embedder.space(), &self.embedder.embed(s)));
        let mut vcv = Vcv {
            agent: AgentId::new(self.id, name.clone()),
            // The core stamps the version (newer than any known one), issue time and expiry.
            version: now,
            issued_at_ms: now,
            expires_at_ms: now.saturating_add(req.ttl_s.saturating_mul(1000)),
            example_vectors: api::example_vectors(
                self.embedder.as_ref(),
                &req.examples,
                &capability,
            ),
            description: req.description,
            examples: req.examples,
            capability,
            skills: req.skills,
            skill_bloom: Default::default(),
            resources: req.resources,
            policies: req.policies,
            spec,
        };
        vcv.normalise();
        let agent = vcv.agent.clone();
        let until = vcv.expires_at_ms;
        match self.gossip.advertise_until(vcv, until, now) {
            Ok(()) => {}
            Err(FederationError::Rejected(r)) => return Err(rejection(&r, "advertise")),
            Err(e) => return Err(err("agent", e.to_string())),
        }
        // Sealed → stored, Publish → gossiped.
        self.pump_gossip();
        let (version, id, expires) = match self.gossip.registry().get(&agent) {
            Some(e) => (e.vcv.version, e.id, e.vcv.expires_at_ms),
            None => return Err(err("agent", "not in the registry after advertising".into())),
        };
        self.audit_append(
            "advertise",
            &agent.to_string(),
            serde_json::json!({"version": version, "vcv_id": id.to_string()}),
        );
        Ok(api::advertised_message(&agent, version, &id, expires))
    }

    fn reply_topic(&self, msg: &Inbound, reply_to: Option<&str>) -> Result<String, ApiError> {
        let topic = msg
            .response_topic
            .clone()
            .or_else(|| reply_to.map(str::to_string))
            .unwrap_or_else(|| format!("fedmesh/v1/client/{}/inbox", msg.principal));
        if let Some(rest) = topic.strip_prefix("fedmesh/v1/") {
            let mut parts = rest.split('/');
            let (role, who) = (parts.next(), parts.next());
            if !matches!(role, Some("client" | "agent")) || who != Some(msg.principal.as_str()) {
                return Err(ApiError {
                    op: "submit",
                    field: "reply_to".into(),
                    reason: format!(
                        "{topic:?} is inside another principal's fedmesh/v1/ namespace"
                    ),
                    request_id: None,
                });
            }
        }
        if let Err(reason) = fedmesh_broker::acl::node_may_publish(&topic) {
            return Err(ApiError {
                op: "submit",
                field: "reply_to".into(),
                reason: format!("{topic:?}: {reason}; use your inbox or a topic below it"),
                request_id: None,
            });
        }
        Ok(topic)
    }

    fn handle_client(&mut self, msg: Inbound, outputs: &mut Vec<Output>) {
        let default_reply = msg
            .response_topic
            .clone()
            .unwrap_or_else(|| format!("fedmesh/v1/client/{}/inbox", msg.principal));
        let correlation = msg.correlation_data.clone();
        let op = match api::parse_client(&msg.op, &msg.payload) {
            Ok(op) => op,
            Err(err) => return self.reply_error(default_reply, correlation, &err),
        };
        let now = now_ms();
        match op {
            ClientOp::Submit(req) => {
                let reply_topic = match self.reply_topic(&msg, req.reply_to.as_deref()) {
                    Ok(t) => t,
                    Err(mut err) => {
                        err.request_id = req.request_id.clone();
                        return self.reply_error(default_reply, correlation, &err);
                    }
                };
                let request_id = req.request_id.clone().unwrap_or_else(|| {
                    format!(
                        "auto-{}",
                        fedmesh_protocol::keys::hex(&rand::random::<[u8; 8]>())
                    )
                });
                match self.build_task(&msg.principal, &request_id, req, now) {
                    Ok(spec) => {
                        let requester = Requester {
                            principal: msg.principal.clone(),
                            request_id: request_id.clone(),
                            reply_topic: reply_topic.clone(),
                            correlation: correlation.as_ref().map(|c| c.to_vec()),
                        };
                        let id = spec.id;
                        let fresh = self.tasks.get(&id).is_none();
                        match self
                            .tasks
                            .submit(spec, requester, self.gossip.registry(), now)
                        {
                            Ok(out) => {
                                if fresh {
                                    if self.submitted_at.len() < self.cfg.limits.max_inflight_tasks
                                    {
                                        self.submitted_at.insert(id, Instant::now());
                                    }
                                    self.audit_append("task_accepted", &id.to_string(), serde_json::json!({"requester": msg.principal, "request_id": request_id}));
                                }
                                outputs.extend(out);
                            }
                            Err(e) => {
                                let err = ApiError {
                                    op: "submit",
                                    field: "task".into(),
                                    reason: e.to_string(),
                                    request_id: Some(request_id),
                                };
                                self.reply_error(reply_topic, correlation, &err);
                            }
                        }
                    }
                    Err(mut err) => {
                        err.request_id = Some(request_id);
                        self.reply_error(reply_topic, correlation, &err);
                    }
                }
            }
            ClientOp::Status(q) => {
                let record = match &q {
                    api::StatusReq::Task(id) => self.tasks.get(id),
                    api::StatusReq::Request(rid) => {
                        self.tasks
                            .get(&TaskId::derive(&self.id, &msg.principal, rid))
                    }
                };
                match record.filter(|r| r.requester.principal == msg.principal) {
                    Some(r) => {
                        self.publish(default_reply, api::status_message(r), correlation, "status")
                    }
                    None => {
                        let err = ApiError {
                            op: "status",
                            field: "task_id".into(),
                            reason: "no such task for this requester".into(),
                            request_id: None,
                        };
                        self.reply_error(default_reply, correlation, &err);
                    }
                }
            }
        }
    }

    fn build_task(
        &self,
        principal: &str,
        request_id: &str,
        req: api::SubmitReq,
        now: u64,
    ) -> Result<TaskSpec, ApiError> {
        let err = |field: &str, reason: String| ApiError {
            op: "submit",
            field: field.into(),
            reason,
            request_id: None,
        };
        let requirement = match &req.embedding {
            Some(e) => Embedding::quantise(e.space.clone(), &e.values)
                .ok_or_else(|| err("embedding.values", "zero or non-finite vector".into()))?,
            None => {
                let text = if req.description.trim().is_empty() {
                    String::from_utf8_lossy(&req.input).into_owned()
                } else {
                    req.description.clone()
                };
                Embedding::quantise(self.embedder.space(), &self.embedder.embed(&text))
                    .ok_or_else(|| err("description", "could not be embedded".into()))?
            }
        };
        let spec = req
            .spec
            .as_deref()
            .and_then(|s| Embedding::quantise(self.embedder.space(), &self.embedder.embed(s)));
        let deadline = req
            .deadline_ms
            .unwrap_or(self.cfg.routing.default_deadline_ms);
        let mut skills = req.skills;
        let mut policies = req.policies;
        fedmesh_protocol::vcv::normalise_labels(&mut skills, true);
        fedmesh_protocol::vcv::normalise_labels(&mut policies, false);
        let spec = TaskSpec {
            id: TaskId::derive(&self.id, principal, request_id),
            origin: self.id,
            description: req.description,
            requirement,
            spec,
            skills,
            policies,
            limits: req.limits,
            input: req.input,
            created_at_ms: now,
            deadline_ms: now.saturating_add(deadline),
            redundancy: req.redundancy,
        };
        spec.validate().map_err(|r| rejection(&r, "submit"))?;
        Ok(spec)
    }

    fn refresh_status(&self) {
        let counts = self.tasks.counts();
        let mut by_state = serde_json::Map::new();
        for s in fedmesh_protocol::task::TaskState::ALL {
            let n = counts.get(&s).copied().unwrap_or(0);
            by_state.insert(s.as_str().into(), n.into());
            self.metrics
                .tasks
                .get_or_create(&Kind::of(s.as_str()))
                .set(n as i64);
        }
        self.metrics.agents.set(self.gossip.registry().len() as i64);
        let registry = self.gossip.registry();
        let (local, remote) = listed_agents(registry.iter(), self.id, STATUS_REMOTE_AGENTS);
        let remote_total = registry.len() - local.len();
        let mut agents: Vec<serde_json::Value> = local
            .into_iter()
            .chain(remote)
            .map(|e| {
                serde_json::json!({
                    "id": e.vcv.agent.to_string(),
                    "version": e.vcv.version,
                    "description": e.vcv.description,
                    "skills": e.vcv.skills,
                    "capacity": e.vcv.resources.capacity,
                    "load": self.tasks.load(&e.vcv.agent),
                    "expires_at_ms": e.vcv.expires_at_ms,
                    "local": e.vcv.agent.node == self.id,
                })
            })
            .collect();
        agents.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        let p2p_info = self
            .p2p
            .info
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let status = serde_json::json!({
            "node_id": self.id.to_string(),
            "name": self.cfg.node.name,
            "embedder": self.embedder.space(),
            "mqtt": {"v4": self.broker.local_addr_v4().to_string(), "v5": self.broker.local_addr_v5().map(|a| a.to_string()), "tls": self.broker.local_addr_tls().map(|a| a.to_string())},
            "agents": agents,
            "agents_total": registry.len(),
            "remote_agents_listed": remote_total.min(STATUS_REMOTE_AGENTS),
            "remote_agents_total": remote_total,
            "tasks": by_state,
            "audit_entries": self.audit.len(),
            "p2p": {
                "peer_id": self.id.to_string(),
                "listen": p2p_info.listen,
                "peers": p2p_info.peers,
            },
        });
        *self
            .shared
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = status;
    }
}

fn rejection(r: &Rejection, op: &'static str) -> ApiError {
    let field = match r {
        Rejection::NotFinite { field }
        | Rejection::NotNormalised { field, .. }
        | Rejection::DimensionOutOfRange { field, .. }
        | Rejection::DimensionMismatch { field, .. }
        | Rejection::TooMany { field, .. }
        | Rejection::TooLong { field, .. }
        | Rejection::BadLabel { field } => (*field).to_string(),
        Rejection::Oversize { .. } => "payload".into(),
        Rejection::TtlTooLong { .. } | Rejection::Expired { .. } => "ttl_s".into(),
        _ => r.label().into(),
    };
    ApiError {
        op,
        field,
        reason: r.to_string(),
        request_id: None,
    }
}

/// SIGHUP loads the TLS listener's certificate again (certbot's deploy hook, `systemctl
/// reload`, `kill -HUP`), as it does for nginx and mosquitto; the broker also notices changed
/// files by itself within `TLS_RELOAD_CHECK`. Without a TLS listener SIGHUP is logged and
/// ignored, so a node is never killed by it.
#[cfg(unix)]
async fn reload_on_sighup(broker: Arc<Broker>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; TLS certificates reload only when their files change");
            return;
        }
    };
    while hup.recv().await.is_some() {
        let b = broker.clone();
        match tokio::task::spawn_blocking(move || b.reload_tls()).await {
            Ok(None) => tracing::info!("SIGHUP: no TLS listener, nothing to reload"),
            // Logged and counted by the broker.
            Ok(Some(_)) => {}
            Err(e) => tracing::warn!(error = %e, "SIGHUP: the certificate reload did not finish"),
        }
    }
}

#[cfg(test)]
mod tests {
    use fedmesh_protocol::registry::Entry;
    use fedmesh_protocol::{ContentId, sample};

    use super::listed_agents;

    fn entry(node: u8, name: &str) -> Entry {
        Entry {
            vcv: sample::vcv(&sample::key(node), name, 1, 1_790_000_000_000),
            id: ContentId([0; 32]),
            envelope: vec![],
        }
    }

    #[test]
    fn status_lists_every_local_agent_and_the_lowest_remote_ids() {
        let me = sample::key(1).node_id();
        let mut entries: Vec<Entry> = (0..5).map(|i| entry(1, &format!("local{i}"))).collect();
        entries.extend((0..50).rev().map(|i| entry(2, &format!("remote{i:02}"))));
        let (local, remote) = listed_agents(entries.iter(), me, 3);
        assert_eq!(local.len(), 5, "every local agent");
        let names: Vec<String> = remote
            .iter()
            .map(|e| e.vcv.agent.name.to_string())
            .collect();
        assert_eq!(names, ["remote00", "remote01", "remote02"]);
    }
}
