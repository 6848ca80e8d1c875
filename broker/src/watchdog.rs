//! The watchdog: probes rumqttd's internal listeners every second and replaces one that
//! stopped serving.
//!
//! A probe is what a client does: TCP connect, CONNECT with the internal login, expect
//! a successful CONNACK, DISCONNECT. After [`FAILURES_BEFORE_RESTART`] failed probes in
//! a row, a fresh `rumqttd::Server` is started on a new loopback port *on the same
//! router* (sessions, subscriptions and retained messages are kept), new proxy
//! connections go to it, and the old listener stops accepting; its connections drain.
//! This recovers a listener whose connection map was poisoned by rumqttd's stale-will
//! panic (which the proxy should already make impossible) or whose accept loop ended.
//!
//! It cannot recover rumqttd's router: if the router thread dies, the node's link sees it
//! and health becomes `Failed` (the process should be restarted; nothing durable lives
//! in rumqttd).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tracing::{error, info, warn};

use crate::HealthCell;
use crate::codec::Version;
use crate::error::BrokerError;
use crate::internal::{
    Endpoints, InternalConfig, InternalListener, ProbeIds, RouterHandle, probe, spawn_listener,
};
use crate::metrics::Metrics;
use crate::nodelay::Mechanism;

/// Time between probe rounds.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Timeout of one probe (connect, and CONNACK).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Consecutive failed probes before the listener is replaced.
pub(crate) const FAILURES_BEFORE_RESTART: u32 = 2;

/// The two running internal listeners.
#[derive(Debug)]
pub(crate) struct Listeners {
    pub(crate) v4: InternalListener,
    pub(crate) v5: InternalListener,
}

impl Listeners {
    /// Listeners whose accepted sockets get TCP_NODELAY.
    pub(crate) fn nodelay_count(&self) -> u64 {
        [&self.v4, &self.v5]
            .iter()
            .filter(|l| l.mechanism == Mechanism::ListenerNodelay)
            .count() as u64
    }

    fn get_mut(&mut self, v: Version) -> &mut InternalListener {
        match v {
            Version::V4 => &mut self.v4,
            Version::V5 => &mut self.v5,
        }
    }
}

/// rumqttd as the watchdog manages it.
#[derive(Debug)]
pub(crate) struct Internal {
    pub(crate) router: Arc<RouterHandle>,
    pub(crate) cfg: InternalConfig,
    pub(crate) probe_ids: ProbeIds,
    /// `None` after shutdown.
    pub(crate) listeners: Mutex<Option<Listeners>>,
    pub(crate) endpoints: watch::Sender<Endpoints>,
}

impl Internal {
    /// The mechanism in use: [`Mechanism::QuickAck`] if any current listener needs it.
    pub(crate) fn mechanism(&self) -> Mechanism {
        let guard = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(l) if l.nodelay_count() < 2 => Mechanism::QuickAck,
            _ => Mechanism::ListenerNodelay,
        }
    }

    /// The current internal listener address for `version`.
    #[cfg(test)]
    pub(crate) fn addr_of(&self, version: Version) -> std::net::SocketAddr {
        e_addr(&self.endpoints, version)
    }

    /// Current listeners whose accepted sockets get TCP_NODELAY.
    pub(crate) fn nodelay_count(&self) -> u64 {
        let guard = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map_or(0, Listeners::nodelay_count)
    }

    /// Stops both listeners (their connections drain).
    pub(crate) fn retire_all(&self) {
        let old = self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(old);
    }

    /// Starts a new listener for `version` and makes it current.
    pub(crate) async fn restart(self: &Arc<Self>, version: Version) -> Result<(), BrokerError> {
        let this = self.clone();
        let new = tokio::task::spawn_blocking(move || {
            spawn_listener(&this.router, version, &this.cfg, &this.probe_ids)
        })
        .await
        .map_err(|e| BrokerError::InternalListener(e.to_string()))??;
        let endpoint = new.endpoint();
        let old = {
            let mut guard = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
            match guard.as_mut() {
                Some(l) => std::mem::replace(l.get_mut(version), new),
                // Shut down meanwhile: the new listener is dropped (stopped) here.
                None => return Err(BrokerError::Stopped),
            }
        };
        self.endpoints.send_modify(|e| match version {
            Version::V4 => e.v4 = endpoint,
            Version::V5 => e.v5 = endpoint,
        });
        info!(?version, old = %old.addr, new = %e_addr(&self.endpoints, version), "rumqttd internal listener replaced");
        drop(old);
        Ok(())
    }
}

fn e_addr(endpoints: &watch::Sender<Endpoints>, v: Version) -> std::net::SocketAddr {
    endpoints.borrow().get(v).addr
}

/// Probes until shutdown.
pub(crate) async fn run(
    internal: Arc<Internal>,
    metrics: Arc<Metrics>,
    health: Arc<HealthCell>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failures = [0u32; 2];
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let mut all_ok = true;
        for (i, version) in [(0usize, Version::V4), (1, Version::V5)] {
            let addr = e_addr(&internal.endpoints, version);
            let id = internal.probe_ids.current(version);
            let auth = internal.cfg.auth.clone();
            let result = tokio::task::spawn_blocking(move || {
                probe(addr, version, &auth, &id, PROBE_TIMEOUT)
            })
            .await;
            let Ok(result) = result else {
                continue;
            };
            let Err(e) = result else {
                failures[i] = 0;
                continue;
            };
            all_ok = false;
            if e.after_connect() {
                internal.probe_ids.burn();
            }
            Metrics::inc(&metrics.watchdog_failures);
            failures[i] += 1;
            warn!(?version, %addr, error = %e, failures = failures[i], "rumqttd internal listener probe failed");
            health.degrade(format!(
                "rumqttd {version:?} internal listener {addr} not serving: {e}"
            ));
            if failures[i] >= FAILURES_BEFORE_RESTART {
                match internal.restart(version).await {
                    Ok(()) => {
                        Metrics::inc(&metrics.listener_restarts);
                        Metrics::set(
                            &metrics.internal_listeners_nodelay,
                            internal.nodelay_count(),
                        );
                        failures[i] = 0;
                    }
                    Err(BrokerError::Stopped) => return,
                    Err(e) => {
                        error!(?version, error = %e, "cannot replace rumqttd internal listener; retrying")
                    }
                }
            }
        }
        if all_ok {
            health.recover();
        }
    }
}
