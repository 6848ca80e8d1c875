//! The node's own connection to the broker: an in-process rumqttd link.
//!
//! Why in-process rather than an internal rumqttc client: in rumqttd 0.20 the local link
//! carries MQTT 5 publish properties both ways (`Forward::properties` when receiving,
//! `LinkTx::send(Packet::Publish(_, Some(props)))` when sending), so request/response
//! (response topic, correlation data) works; it needs no socket, login or listener, so
//! it survives the watchdog replacing a listener; and it is one hop shorter.
//!
//! Its limits: rumqttd only lets a local link publish at QoS 0 (`Publish`'s QoS field is
//! crate-private). That loses nothing here: rumqttd delivers every message at the
//! *subscription's* QoS anyway, and the hop into the router is an in-memory queue.
//!
//! What principals publish to the node (`fedmesh/v1/{agent|client}/P/op`) is handed to the
//! node by the front proxy, which parses every PUBLISH anyway (see `proxy`). The link
//! subscribes only to withdrawals (`fedmesh/v1/agent/+/withdraw`, [`acl::LINK_FILTERS`]):
//! rumqttd itself publishes an agent's Last Will there when its connection ends without
//! DISCONNECT, so withdrawals, explicit or by Will, take this one path. The link subscribes at
//! QoS 0: rumqttd reads from its commit log as fast as the link drains, and messages that do
//! not fit the bounded inbound queue are dropped and counted (`inbound_dropped`).

use std::sync::Arc;

use bytes::Bytes;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish, PublishProperties};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error};

use crate::HealthCell;
use crate::acl::{self, Role};
use crate::error::BrokerError;
use crate::internal::RouterHandle;
use crate::metrics::Metrics;

/// A message a principal published on `fedmesh/v1/{agent|client}/{principal}/{op}`.
///
/// The ACL lets only `principal` publish there, so `principal` *is* the publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// Who published (a credential name, or an anonymous client's id).
    pub principal: String,
    /// Whether it spoke as an agent or as a client.
    pub role: Role,
    /// The last topic level.
    pub op: String,
    /// The full topic.
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
    /// MQTT 5 response topic, if the publisher set one. It is chosen by the publisher:
    /// check it (e.g. with [`acl::may_subscribe`] for `principal`) before replying on it.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data, if any.
    pub correlation_data: Option<Bytes>,
}

/// Delivery QoS requested by the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Qos {
    /// At most once.
    #[default]
    AtMostOnce,
    /// At least once. (rumqttd delivers at the subscriber's QoS whatever the publisher
    /// asks, so both values behave the same today; the field documents intent.)
    AtLeastOnce,
}

/// A message the node publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// Topic; must pass [`acl::node_may_publish`].
    pub topic: String,
    /// Payload; at most `max_payload_bytes`.
    pub payload: Bytes,
    /// Requested QoS (see [`Qos`]).
    pub qos: Qos,
    /// Retain flag.
    pub retain: bool,
    /// MQTT 5 correlation data (for replies), at most 65535 bytes.
    pub correlation_data: Option<Bytes>,
}

/// Client id of the node's link inside rumqttd (proxied client ids always contain `:`,
/// so no MQTT client can take it over).
pub(crate) const LINK_CLIENT_ID: &str = "fedmesh.node";

/// Checks an outbound message before it is queued.
pub(crate) fn check_outbound(msg: &Outbound, max_payload: usize) -> Result<(), BrokerError> {
    let invalid = |reason| BrokerError::InvalidOutbound {
        topic: msg.topic.clone(),
        reason,
    };
    acl::node_may_publish(&msg.topic).map_err(invalid)?;
    if msg.payload.len() > max_payload {
        return Err(invalid("payload larger than max_payload_bytes"));
    }
    if msg
        .correlation_data
        .as_ref()
        .is_some_and(|c| c.len() > usize::from(u16::MAX))
    {
        return Err(invalid("correlation data longer than 65535 bytes"));
    }
    Ok(())
}

/// Creates the link, subscribes it, and returns its two halves.
pub(crate) fn open(router: &RouterHandle) -> Result<(LinkTx, LinkRx), BrokerError> {
    let (mut tx, rx) = router.link(LINK_CLIENT_ID)?;
    // The router handles events in order, so these subscriptions are in place before any
    // client (whose listeners start later) can publish.
    for f in acl::LINK_FILTERS {
        tx.subscribe(f)?;
    }
    Ok((tx, rx))
}

fn to_inbound(f: rumqttd::Forward) -> Option<Inbound> {
    let topic = std::str::from_utf8(&f.publish.topic).ok()?;
    let (role, principal, op) = acl::parse_principal_topic(topic)?;
    let (response_topic, correlation_data) = match f.properties {
        Some(p) => (p.response_topic, p.correlation_data),
        None => (None, None),
    };
    Some(Inbound {
        principal: principal.to_owned(),
        role,
        op: op.to_owned(),
        topic: topic.to_owned(),
        payload: f.publish.payload,
        response_topic,
        correlation_data,
    })
}

/// Receives from the link until shutdown, feeding the bounded inbound queue.
pub(crate) async fn receive(
    mut rx: LinkRx,
    inbound: mpsc::Sender<Inbound>,
    metrics: Arc<Metrics>,
    health: Arc<HealthCell>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let next = tokio::select! {
            n = rx.next() => n,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match next {
            Ok(Some(Notification::Forward(f))) => match to_inbound(f) {
                Some(msg) => {
                    if inbound.try_send(msg).is_err() {
                        Metrics::inc(&metrics.inbound_dropped);
                    }
                }
                None => Metrics::inc(&metrics.inbound_malformed),
            },
            // The router parks a link whose queue filled up until it says it is ready.
            Ok(Some(Notification::Unschedule)) => {
                if let Err(e) = rx.wake().await {
                    error!(error = %e, "rumqttd router gone");
                    health.fail("rumqttd router stopped (node link lost)");
                    return;
                }
            }
            Ok(Some(Notification::Disconnect(d, _))) => {
                error!(reason = ?d, "rumqttd disconnected the node link");
                health.fail("rumqttd disconnected the node link");
                return;
            }
            Ok(Some(other)) => debug!(notification = ?other, "node link notification"),
            Ok(None) => {}
            Err(e) => {
                error!(error = %e, "rumqttd router gone");
                health.fail("rumqttd router stopped (node link lost)");
                return;
            }
        }
    }
}

/// Sends outbound messages into the router, on a dedicated thread: `LinkTx` blocks on
/// the router's bounded event channel.
pub(crate) fn spawn_sender(
    mut tx: LinkTx,
    mut outbound: mpsc::Receiver<Outbound>,
    health: Arc<HealthCell>,
) -> Result<(), BrokerError> {
    std::thread::Builder::new()
        .name("fedmesh-link-tx".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().build() {
                Ok(rt) => rt,
                Err(e) => {
                    error!(error = %e, "cannot build the link sender runtime");
                    health.fail("node link sender did not start");
                    return;
                }
            };
            rt.block_on(async move {
                while let Some(msg) = outbound.recv().await {
                    let publish = Publish::new(Bytes::from(msg.topic), msg.payload, msg.retain);
                    let props = msg.correlation_data.map(|c| PublishProperties {
                        correlation_data: Some(c),
                        ..Default::default()
                    });
                    if let Err(e) = tx.send(Packet::Publish(publish, props)).await {
                        error!(error = %e, "rumqttd router gone; node publishes stop");
                        health.fail("rumqttd router stopped (node link lost)");
                        return;
                    }
                }
                debug!("node link sender done");
            });
        })
        .map_err(BrokerError::Thread)?;
    Ok(())
}
