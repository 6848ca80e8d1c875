//! The embedded MQTT broker of a fedmesh node: rumqttd 0.20 behind our own MQTT-aware
//! TCP front proxy. This is the only crate in fedmesh that knows rumqttd.
//!
//! # Why a proxy
//!
//! rumqttd has no per-topic ACL and its link does not say who published, so nothing
//! stops agent B from publishing a result "as" agent A. It also has defects a client can
//! trigger or suffer: no TCP_NODELAY (40 ms stalls); a panic that poisons a listener's
//! mutex and refuses every later client (a refused client id such as `a/b`,
//! reconnecting); server topic aliases keyed by subscription filter (v5 wildcard
//! subscribers receive messages under the wrong topic); Keep Alive 0 refused. So we
//! own the public listeners and put a small MQTT-aware proxy in front of
//! rumqttd, which listens only on loopback ports with a random per-process login:
//!
//! * every socket (client and upstream) gets TCP_NODELAY, rumqttd's side of the
//!   proxied connections included: rumqttd never sets it, so before anything connects
//!   we set it on rumqttd's *listening* socket, which Linux copies to every socket it
//!   accepts. That socket is a descriptor of this process, reached without `unsafe`
//!   through `pidfd_getfd` on our own pid. Where that is impossible (no `pidfd_getfd`,
//!   seccomp), the proxy re-arms TCP_QUICKACK on its upstream socket after every read
//!   instead. Why this and not a patched rumqttd, and how to see which is active: the
//!   `nodelay` module, [`Broker::nodelay_mechanism`] and the `internal_listeners_nodelay`
//!   gauge;
//! * the CONNECT is read within `connect_timeout` and size-capped, then checked: client
//!   id `[A-Za-z0-9_.-]{1,64}` (or assigned `anon-…` when empty), credentials
//!   ([`CredentialStore`]), anonymous policy, will topic against the ACL; refusals get a
//!   proper CONNACK code (v4 0x02/0x04/0x05, v5 0x85/0x86/0x87) and rumqttd never sees
//!   them. The CONNECT rumqttd gets carries the internal login, a client id namespaced by
//!   principal (`u:P:id` / `a:id`, so principals cannot take over each other's
//!   sessions), Keep Alive 0 → 65535, and no v5 Topic Alias Maximum (so rumqttd never
//!   uses server topic aliases);
//! * afterwards every client frame is delimited and checked (flags, size, PUBLISH topic
//!   and SUBSCRIBE filters against the ACL) and forwarded unchanged, payloads streaming
//!   through; broker frames are delimited so the proxy can insert its own acks;
//! * connections beyond `max_connections` are refused by the proxy (rumqttd's router
//!   has spare slots, so it never refuses after CONNECT);
//! * closing is done the way rumqttd copes with. rumqttd reuses router slots at once and
//!   may report a disconnection twice (its router handled a DISCONNECT or a takeover
//!   while its link also saw the socket close); the stale second report then kills
//!   whatever connection took the slot (measured: new connections died before their
//!   CONNACK, and the node link died). So after a client's DISCONNECT the proxy lets
//!   rumqttd close the upstream; otherwise it half-closes and waits for rumqttd to close;
//!   a second connection with a client id first makes the proxy close the old one and
//!   wait for that (session takeover done by the proxy); and the node link takes slot 0
//!   before anything else connects;
//! * `$` filters other than `$share/…` (which make rumqttd disconnect the client) and
//!   v5 PUBLISHes carrying a subscription identifier are answered by the proxy.
//!
//! Both public listeners accept MQTT 3.1.1 and 5 (routed by the CONNECT's protocol
//! level). A watchdog probes the internal listeners every second and replaces a dead
//! one on the same router, keeping every session (reported in [`Health`] and the
//! `listener_restarts` metric); the node talks to rumqttd through an in-process link
//! ([`link`]) that no listener failure affects. rumqttd's router itself cannot be
//! restarted in-process: if it dies, health is [`Health::Failed`] and the process should
//! be restarted (nothing durable lives in rumqttd).
//!
//! # The ACL and what it buys
//!
//! With `P` the principal (user name after a login; client id for anonymous clients,
//! which may not use a registered agent name), see [`acl`]:
//! * publish under `fedmesh/v1/` only to `fedmesh/v1/agent/P/<op>` or
//!   `fedmesh/v1/client/P/<op>` (one level); `$`-topics only under
//!   `$a2a/v1/discovery/P/…`; any other topic freely;
//! * subscribe to anything that cannot match another principal's namespace
//!   `fedmesh/v1/{agent|client}/Q/…` (`$share/g/…` checked on the inner filter);
//! * denials: QoS 0 publish dropped; QoS 1/2 answered PUBACK/PUBREC 0x87 (v5) or the
//!   connection closed (3.1.1, which has no negative ack); SUBSCRIBE answered by the
//!   proxy with SUBACK 0x80 (v4) / 0x87 (v5) for every filter of the packet. All counted.
//!
//! So a message on `fedmesh/v1/{agent|client}/P/<op>` was published by principal `P`:
//! the proxy hands exactly those PUBLISHes to the node as [`Inbound`] with
//! `principal = P` (besides forwarding them to rumqttd; withdrawals, which may be a Will that
//! rumqttd publishes, reach the node through its link); the node itself may not publish there
//! ([`acl::node_may_publish`]). This stops an agent from advertising, withdrawing or
//! answering as another agent, and from eavesdropping on another principal's namespace.
//!
//! It does not stop: a principal lying in its *own* messages (payloads should still be
//! signed where it matters); anonymous clients (when enabled) from claiming any unused
//! name, which is why anonymity should stay on loopback; abuse outside `fedmesh/v1/`
//! (an ordinary broker's trust model); a local process that can read this process's
//! memory. It relies on the node never forwarding a principal's data onto another
//! principal's topic: MQTT 5 response topics are chosen by the requester, so check
//! them before replying.
//!
//! Memory: see [`BrokerLimits`] for what the memory budget derives.

pub mod acl;
mod codec;
mod credentials;
mod direct;
mod error;
mod flow;
mod gate;
mod internal;
pub mod link;
mod metrics;
mod nodelay;
mod proxy;
mod sessions;
mod settings;
mod tls;
mod wait;
mod watchdog;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::info;

pub use acl::Role;
pub use credentials::CredentialStore;
pub use error::BrokerError;
pub use gate::Held;
pub use link::{Inbound, Outbound, Qos};
pub use metrics::MetricsSnapshot;
pub use nodelay::Mechanism as NodelayMechanism;
pub use settings::{BrokerLimits, BrokerSettings, TlsSettings};
pub use tls::{RELOAD_CHECK as TLS_RELOAD_CHECK, Reload, certificate_cn, pem_certificates};

use crate::codec::Version;
use crate::internal::{Endpoints, InternalAuth, InternalConfig, ProbeIds, RouterHandle};
use crate::metrics::Metrics;
use crate::proxy::{Defences, ProxyShared};
use crate::watchdog::{Internal, Listeners};

/// Health of the broker, for the node's health endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Serving.
    Healthy,
    /// A rumqttd listener failed its probe; the watchdog is replacing it. Existing
    /// connections and the node link are unaffected.
    Degraded {
        /// What failed.
        reason: String,
    },
    /// rumqttd's router is gone; the node link is dead. Restart the process.
    Failed {
        /// What failed.
        reason: String,
    },
    /// [`Broker::shutdown`] was called.
    Stopped,
}

/// Shared health state.
#[derive(Debug)]
pub(crate) struct HealthCell(Mutex<Health>);

impl HealthCell {
    fn new() -> Self {
        Self(Mutex::new(Health::Healthy))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Health> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn get(&self) -> Health {
        self.lock().clone()
    }

    pub(crate) fn degrade(&self, reason: String) {
        let mut h = self.lock();
        if matches!(*h, Health::Healthy | Health::Degraded { .. }) {
            *h = Health::Degraded { reason };
        }
    }

    pub(crate) fn recover(&self) {
        let mut h = self.lock();
        if matches!(*h, Health::Degraded { .. }) {
            *h = Health::Healthy;
        }
    }

    pub(crate) fn fail(&self, reason: &str) {
        let mut h = self.lock();
        if *h != Health::Stopped {
            *h = Health::Failed {
                reason: reason.to_owned(),
            };
        }
    }

    fn stop(&self) {
        *self.lock() = Health::Stopped;
    }
}

/// The running broker.
pub struct Broker {
    metrics: Arc<Metrics>,
    health: Arc<HealthCell>,
    limits: BrokerLimits,
    outbound: mpsc::Sender<Outbound>,
    local_v4: SocketAddr,
    local_v5: Option<SocketAddr>,
    local_tls: Option<SocketAddr>,
    tls: Option<Arc<tls::CertReloader>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    internal: Arc<Internal>,
    gate: Arc<gate::Gate>,
    direct: Arc<direct::Direct>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("local_v4", &self.local_v4)
            .field("local_v5", &self.local_v5)
            .field("local_tls", &self.local_tls)
            .field("limits", &self.limits)
            .field("health", &self.health.get())
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Starts rumqttd, the proxy listeners, the node link and the watchdog.
    ///
    /// Must be called inside a tokio runtime. Returns the broker and the bounded queue of
    /// messages principals published on their `fedmesh/v1/{agent|client}/P/op` topics.
    pub fn start(
        settings: BrokerSettings,
    ) -> Result<(Broker, mpsc::Receiver<Inbound>), BrokerError> {
        Self::start_with(settings, Defences::default())
    }

    pub(crate) fn start_with(
        settings: BrokerSettings,
        defences: Defences,
    ) -> Result<(Broker, mpsc::Receiver<Inbound>), BrokerError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BrokerError::NoRuntime)?;
        let limits = BrokerLimits::from_settings(&settings)?;
        if limits.max_connections < settings.max_connections {
            tracing::warn!(
                requested = settings.max_connections,
                admitted = limits.max_connections,
                budget = settings.memory_budget_bytes,
                "max_connections capped by the memory budget"
            );
        }
        let credentials = settings
            .credentials_path
            .as_deref()
            .map(CredentialStore::open)
            .transpose()?
            .map(Arc::new);

        let bind = |addr: SocketAddr| {
            proxy::bind(addr).map_err(|source| BrokerError::Bind { addr, source })
        };
        let listener_v4 = bind(settings.listen_v4)?;
        let listener_v5 = settings.listen_v5.map(bind).transpose()?;
        let tls = match &settings.tls {
            Some(t) => {
                let reloader = tls::CertReloader::new(&t.cert, &t.key)?;
                let acceptor = reloader.acceptor(t.client_ca.as_deref())?;
                let listener = bind(t.listen)?;
                let local = listener.local_addr().map_err(|source| BrokerError::Bind {
                    addr: t.listen,
                    source,
                })?;
                Some((listener, acceptor, local, reloader))
            }
            None => None,
        };
        let local_tls = tls.as_ref().map(|(_, _, a, _)| *a);
        let tls_reloader = tls.as_ref().map(|(_, _, _, r)| r.clone());
        let local_v4 = listener_v4
            .local_addr()
            .map_err(|source| BrokerError::Bind {
                addr: settings.listen_v4,
                source,
            })?;
        let local_v5 = match (&listener_v5, settings.listen_v5) {
            (Some(l), Some(addr)) => Some(
                l.local_addr()
                    .map_err(|source| BrokerError::Bind { addr, source })?,
            ),
            _ => None,
        };

        let cfg = InternalConfig {
            auth: InternalAuth::random(),
            max_payload_size: limits.max_frame_bytes + 1024,
            connection_timeout_ms: u16::try_from(settings.connect_timeout.as_millis())
                .unwrap_or(u16::MAX),
            listener_nodelay: defences.listener_nodelay,
        };
        let router = Arc::new(RouterHandle::spawn(limits.router_config()));
        // The node link first: rumqttd reuses connection ids (slab slots) and may deliver
        // a stale disconnect for a slot's previous holder; slot 0 never had one.
        let (link_tx, link_rx) = link::open(&router)?;
        let probe_ids = ProbeIds::default();
        let v4 = internal::spawn_listener(&router, Version::V4, &cfg, &probe_ids)?;
        let v5 = internal::spawn_listener(&router, Version::V5, &cfg, &probe_ids)?;
        let (endpoints_tx, endpoints_rx) = watch::channel(Endpoints {
            v4: v4.endpoint(),
            v5: v5.endpoint(),
        });

        let metrics = Arc::new(Metrics::default());
        let health = Arc::new(HealthCell::new());
        let (shutdown_tx, shutdown_rx) = watch::channel(false);

        let (inbound_tx, inbound_rx) = mpsc::channel(settings.queue_depth);
        let (outbound_tx, outbound_rx) = mpsc::channel(settings.queue_depth);
        link::spawn_sender(link_tx, outbound_rx, health.clone())?;

        let auth = cfg.auth.clone();
        let internal = Arc::new(Internal {
            router,
            cfg,
            probe_ids,
            listeners: Mutex::new(Some(Listeners { v4, v5 })),
            endpoints: endpoints_tx,
        });
        Metrics::set(
            &metrics.internal_listeners_nodelay,
            internal.nodelay_count(),
        );
        let gate = Arc::new(gate::Gate::default());
        let direct = Arc::new(direct::Direct::new(
            defences.direct_delivery && settings.direct_delivery,
            defences.direct_relay && settings.direct_delivery,
            metrics.clone(),
        ));
        let shared = Arc::new(ProxyShared {
            gate: gate.clone(),
            direct: direct.clone(),
            metrics: metrics.clone(),
            limits: limits.clone(),
            anonymous: settings.anonymous,
            credentials,
            connect_timeout: settings.connect_timeout,
            endpoints: endpoints_rx,
            auth,
            admission: Arc::new(Semaphore::new(limits.max_connections)),
            refusals: Arc::new(Semaphore::new(proxy::POLITE_REFUSALS)),
            flow: flow::Flow::new(
                defences.qos1_flow_control,
                (limits.segment_bytes * limits.segment_count) as u64,
                flow::MAX_WAIT,
                metrics.clone(),
            ),
            defences,
            sessions: Default::default(),
            shutdown: shutdown_rx.clone(),
            to_node: inbound_tx.clone(),
        });

        let mut tasks = vec![
            runtime.spawn(link::receive(
                link_rx,
                inbound_tx.clone(),
                metrics.clone(),
                health.clone(),
                shutdown_rx.clone(),
            )),
            runtime.spawn(proxy::accept_loop(listener_v4, shared.clone(), None)),
            runtime.spawn(watchdog::run(
                internal.clone(),
                metrics.clone(),
                health.clone(),
                shutdown_rx,
            )),
        ];
        if let Some(l) = listener_v5 {
            tasks.push(runtime.spawn(proxy::accept_loop(l, shared.clone(), None)));
        }
        if let Some((l, acceptor, _, reloader)) = tls {
            tasks.push(runtime.spawn(proxy::accept_loop(l, shared, Some(acceptor))));
            tasks.push(runtime.spawn(tls::watch_files(
                reloader,
                metrics.clone(),
                shutdown_tx.subscribe(),
            )));
        }
        info!(%local_v4, ?local_v5, ?local_tls, max_connections = limits.max_connections, "MQTT broker listening");
        Ok((
            Broker {
                metrics,
                health,
                limits,
                outbound: outbound_tx,
                local_v4,
                local_v5,
                local_tls,
                tls: tls_reloader,
                shutdown: shutdown_tx,
                tasks,
                internal,
                gate,
                direct,
            },
            inbound_rx,
        ))
    }

    /// Queues a message for publishing; fails with [`BrokerError::QueueFull`] (counted
    /// in `outbound_dropped`) when the outbound queue is full.
    pub fn publish(&self, msg: Outbound) -> Result<(), BrokerError> {
        link::check_outbound(&msg, self.limits.max_payload_bytes)?;
        if self.try_direct(&msg, None) {
            return Ok(());
        }
        self.queue(msg)
    }

    /// Queues a checked message; a full queue is counted in `outbound_dropped`.
    fn queue(&self, msg: Outbound) -> Result<(), BrokerError> {
        match self.outbound.try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                Metrics::inc(&self.metrics.outbound_dropped);
                Err(BrokerError::QueueFull)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(BrokerError::Stopped),
        }
    }

    /// Queues a message that no client may see before [`Broker::release`] is called with the
    /// returned [`Held`]: the message travels through rumqttd at once and the proxy holds it
    /// at the last hop (see the `gate` module). The node publishes a batch's effects this way
    /// while the batch is being flushed, then releases them. Fails like [`Broker::publish`],
    /// and then nothing stays held.
    pub fn publish_held(&self, msg: Outbound) -> Result<Held, BrokerError> {
        link::check_outbound(&msg, self.limits.max_payload_bytes)?;
        let key = self.gate.key(msg.topic.as_bytes(), &msg.payload);
        if self.try_direct(&msg, Some(key)) {
            return Ok(key);
        }
        // Held before it is queued, so that no proxy connection can see it first.
        self.gate.hold(key);
        self.queue(msg).inspect_err(|_| self.gate.release([key]))?;
        Ok(key)
    }

    /// Writes `msg` into its subscribers' connections directly if it can (see `direct`);
    /// `held`: its key, when it must wait for [`Broker::release`]. Only topics in a principal's
    /// namespace can go direct, so no other message pays for its key.
    fn try_direct(&self, msg: &Outbound, held: Option<Held>) -> bool {
        if msg.retain {
            // New subscribers wait for it (see `direct`).
            self.direct.retained(&msg.topic, msg.payload.is_empty());
        }
        if acl::namespace_owner(&msg.topic).is_none() {
            return false;
        }
        let key = held.unwrap_or_else(|| self.gate.key(msg.topic.as_bytes(), &msg.payload));
        self.direct.offer(msg, key, held.is_some())
    }

    /// Lets the proxy deliver messages queued by [`Broker::publish_held`].
    pub fn release(&self, held: impl IntoIterator<Item = Held>) {
        let held: Vec<Held> = held.into_iter().collect();
        self.direct.release(&held);
        self.gate.release(held);
    }

    /// Queues a message for publishing, waiting for queue capacity.
    pub async fn publish_wait(&self, msg: Outbound) -> Result<(), BrokerError> {
        link::check_outbound(&msg, self.limits.max_payload_bytes)?;
        if self.try_direct(&msg, None) {
            return Ok(());
        }
        self.outbound
            .send(msg)
            .await
            .map_err(|_| BrokerError::Stopped)
    }

    /// Address of the first public listener (the `listen_v4` setting).
    pub fn local_addr_v4(&self) -> SocketAddr {
        self.local_v4
    }

    /// Address of the second public listener (the `listen_v5` setting), if enabled.
    pub fn local_addr_v5(&self) -> Option<SocketAddr> {
        self.local_v5
    }

    /// Address of the MQTT-over-TLS listener, if enabled.
    pub fn local_addr_tls(&self) -> Option<SocketAddr> {
        self.local_tls
    }

    /// When the TLS listener's certificate expires, Unix seconds (`None` without a TLS
    /// listener, or if its validity cannot be read).
    pub fn tls_cert_not_after(&self) -> Option<i64> {
        self.tls.as_ref().and_then(|r| r.not_after())
    }

    /// Loads the TLS listener's certificate and key files again now, whether or not they
    /// look changed (the node calls it on SIGHUP); logged and counted like the periodic
    /// check. `None` without a TLS listener. Reads two files: call it off the async workers.
    pub fn reload_tls(&self) -> Option<Reload> {
        self.tls
            .as_ref()
            .map(|r| r.reload_logged(true, &self.metrics))
    }

    /// The limits derived from the settings.
    pub fn limits(&self) -> &BrokerLimits {
        &self.limits
    }

    /// Current counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// How rumqttd's side of the proxy → rumqttd connections avoids delayed-ACK stalls
    /// (see the crate docs); also the `internal_listeners_nodelay` gauge.
    pub fn nodelay_mechanism(&self) -> NodelayMechanism {
        self.internal.mechanism()
    }

    /// Current health.
    pub fn health(&self) -> Health {
        self.health.get()
    }

    /// Stops listening, closes every client connection and stops the watchdog and the
    /// node link. rumqttd's router thread cannot be stopped and stays (idle) until the
    /// process exits.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        // Connection tasks watch the same signal; give them a moment to finish.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.metrics.snapshot().connections_active > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.internal.retire_all();
        self.health.stop();
        info!("MQTT broker stopped");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}
