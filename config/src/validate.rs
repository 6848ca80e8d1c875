//! Semantic validation; every error names the full dotted key.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{Config, ConfigError};

/// Largest payload MQTT can carry (maximum "remaining length").
const MQTT_MAX_PAYLOAD_BYTES: u64 = 268_435_455;
const BASE58: &str = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

pub(crate) fn validate(c: &Config) -> Result<(), ConfigError> {
    let n = &c.node;
    non_empty(
        "node.key_file",
        &n.key_file,
        "a file name such as \"node.key\"",
    )?;
    non_empty("node.log", &n.log, "a tracing filter such as \"info\"")?;

    let m = &c.mqtt;
    let v4 = socket_addr("mqtt.listen_v4", &m.listen_v4, true)?;
    let v5 = socket_addr("mqtt.listen_v5", &m.listen_v5, true)?;
    match (v4, v5) {
        (None, None) => invalid(
            "mqtt.listen_v4",
            "no MQTT listener is enabled; expected listen_v4 or listen_v5 to be an address",
        )?,
        (Some(a), Some(b)) if a == b && a.port() != 0 => invalid(
            "mqtt.listen_v5",
            format!("same address as mqtt.listen_v4 ({a}); expected a different port or \"\""),
        )?,
        _ => {}
    }
    if let Some(t) = socket_addr("mqtt.listen_tls", &m.listen_tls, true)? {
        for (key, other) in [("mqtt.listen_v4", v4), ("mqtt.listen_v5", v5)] {
            if other == Some(t) && t.port() != 0 {
                invalid(
                    "mqtt.listen_tls",
                    format!("same address as {key} ({t}); expected a different port or \"\""),
                )?;
            }
        }
        non_empty(
            "mqtt.tls_cert",
            &m.tls_cert,
            "a PEM certificate file such as \"tls/cert.pem\"",
        )?;
        non_empty(
            "mqtt.tls_key",
            &m.tls_key,
            "a PEM private key file such as \"tls/key.pem\"",
        )?;
    } else if !m.tls_client_ca.is_empty() {
        invalid(
            "mqtt.tls_client_ca",
            "client certificates need the TLS listener; expected mqtt.listen_tls to be an address, or \"\" here",
        )?;
    }
    non_empty(
        "mqtt.credentials_file",
        &m.credentials_file,
        "a file name such as \"credentials.toml\"",
    )?;
    at_least("mqtt.max_connections", m.max_connections as u64, 1)?;
    at_least("mqtt.max_payload_bytes", m.max_payload_bytes as u64, 1)?;
    if m.max_payload_bytes as u64 > MQTT_MAX_PAYLOAD_BYTES {
        out_of_range(
            "mqtt.max_payload_bytes",
            m.max_payload_bytes,
            format!("at most {MQTT_MAX_PAYLOAD_BYTES} (the MQTT limit)"),
        )?;
    }
    at_least("mqtt.memory_budget_mb", m.memory_budget_mb, 8)?;
    at_least("mqtt.connect_timeout_ms", m.connect_timeout_ms, 1)?;

    let p = &c.p2p;
    let needs_quic = |key: String, value: &str| ConfigError::Invalid {
        key,
        problem: format!(
            "{value:?} is a QUIC address but p2p.quic = false; expected p2p.quic = true or a /tcp/ address"
        ),
    };
    for (i, a) in p.listen.iter().enumerate() {
        let key = format!("p2p.listen[{i}]");
        if multiaddr(&key, a)?.contains(&"quic-v1") && !p.quic {
            return Err(needs_quic(key, a));
        }
    }
    for (i, a) in p.bootstrap.iter().enumerate() {
        let key = format!("p2p.bootstrap[{i}]");
        let protocols = multiaddr(&key, a)?;
        if protocols.last() != Some(&"p2p") {
            return Err(ConfigError::Multiaddr {
                key,
                value: a.clone(),
                reason: "a bootstrap address must end in /p2p/<peer id>".into(),
            });
        }
        if protocols.contains(&"quic-v1") && !p.quic {
            return Err(needs_quic(key, a));
        }
    }
    at_least("p2p.max_connections", p.max_connections.into(), 1)?;
    at_least(
        "p2p.max_connections_per_peer",
        p.max_connections_per_peer.into(),
        1,
    )?;
    at_least("p2p.gossip_heartbeat_ms", p.gossip_heartbeat_ms, 1)?;
    at_least("p2p.advertise_ttl_s", p.advertise_ttl_s, 1)?;
    at_least("p2p.readvertise_interval_s", p.readvertise_interval_s, 1)?;
    if p.readvertise_interval_s >= p.advertise_ttl_s {
        out_of_range(
            "p2p.readvertise_interval_s",
            p.readvertise_interval_s,
            format!(
                "less than p2p.advertise_ttl_s ({}) so adverts are refreshed before they expire",
                p.advertise_ttl_s
            ),
        )?;
    }
    at_least("p2p.sync_interval_s", p.sync_interval_s, 1)?;

    socket_addr("http.listen", &c.http.listen, true)?;

    let l = &c.limits;
    at_least(
        "limits.max_agents_per_node",
        l.max_agents_per_node as u64,
        1,
    )?;
    at_least("limits.max_inflight_tasks", l.max_inflight_tasks as u64, 1)?;
    at_least(
        "limits.max_task_input_bytes",
        l.max_task_input_bytes as u64,
        1,
    )?;
    at_least("limits.max_queue_depth", l.max_queue_depth as u64, 1)?;

    let r = &c.routing;
    if !(0.0..=1.0).contains(&r.threshold) {
        out_of_range("routing.threshold", r.threshold, "a number from 0.0 to 1.0")?;
    }
    at_least("routing.top_k", r.top_k as u64, 1)?;
    at_least("routing.offer_timeout_ms", r.offer_timeout_ms, 1)?;
    at_least("routing.attempt_timeout_ms", r.attempt_timeout_ms, 1)?;
    at_least("routing.max_attempts", r.max_attempts.into(), 1)?;
    at_least("routing.default_deadline_ms", r.default_deadline_ms, 1)?;
    if r.offer_timeout_ms >= r.default_deadline_ms {
        out_of_range(
            "routing.offer_timeout_ms",
            r.offer_timeout_ms,
            format!(
                "less than routing.default_deadline_ms ({})",
                r.default_deadline_ms
            ),
        )?;
    }
    if !(r.load_weight.is_finite() && r.load_weight >= 0.0) {
        out_of_range(
            "routing.load_weight",
            r.load_weight,
            "a finite number >= 0.0",
        )?;
    }
    Ok(())
}

fn invalid(key: &str, problem: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    })
}

fn out_of_range(
    key: &str,
    value: impl ToString,
    expected: impl Into<String>,
) -> Result<(), ConfigError> {
    Err(ConfigError::OutOfRange {
        key: key.into(),
        value: value.to_string(),
        expected: expected.into(),
    })
}

fn at_least(key: &str, value: u64, min: u64) -> Result<(), ConfigError> {
    if value < min {
        out_of_range(key, value, format!("at least {min}"))?;
    }
    Ok(())
}

fn non_empty(key: &str, value: &str, expected: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        invalid(key, format!("must not be empty; expected {expected}"))?;
    }
    Ok(())
}

/// Parses a socket address; `Ok(None)` for "" when `optional`.
fn socket_addr(key: &str, value: &str, optional: bool) -> Result<Option<SocketAddr>, ConfigError> {
    if optional && value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|e: std::net::AddrParseError| ConfigError::SocketAddr {
            key: key.into(),
            value: value.into(),
            reason: e.to_string(),
            optional,
        })
}

fn multiaddr<'a>(key: &str, value: &'a str) -> Result<Vec<&'a str>, ConfigError> {
    check_multiaddr(value).map_err(|reason| ConfigError::Multiaddr {
        key: key.into(),
        value: value.into(),
        reason,
    })
}

/// A light multiaddr syntax check for the protocols fedmesh uses (`ip4`,
/// `ip6`, `dns`, `dns4`, `dns6`, `tcp`, `udp`, `quic-v1`, `p2p`, `memory`).
/// Returns the protocol names in order, or what is wrong.
pub fn check_multiaddr(s: &str) -> Result<Vec<&str>, String> {
    let Some(rest) = s.strip_prefix('/') else {
        return Err("must start with '/', e.g. \"/ip4/127.0.0.1/tcp/4001\"".into());
    };
    if rest.is_empty() {
        return Err("is empty; expected e.g. \"/ip4/127.0.0.1/tcp/4001\"".into());
    }
    let mut parts = rest.split('/');
    let mut protocols = Vec::new();
    while let Some(proto) = parts.next() {
        let takes_value = match proto {
            "ip4" | "ip6" | "dns" | "dns4" | "dns6" | "tcp" | "udp" | "p2p" | "memory" => true,
            "quic-v1" => false,
            "" => return Err("has an empty component (\"//\" or a trailing '/')".into()),
            other => {
                return Err(format!(
                    "unknown protocol {other:?}; expected one of ip4, ip6, dns, dns4, dns6, tcp, udp, quic-v1, p2p, memory"
                ));
            }
        };
        protocols.push(proto);
        if !takes_value {
            continue;
        }
        let value = parts.next().unwrap_or_default();
        let ok = match proto {
            "ip4" => value.parse::<Ipv4Addr>().is_ok(),
            "ip6" => value.parse::<Ipv6Addr>().is_ok(),
            "tcp" | "udp" => value.parse::<u16>().is_ok(),
            "memory" => value.parse::<u64>().is_ok(),
            "p2p" => !value.is_empty() && value.chars().all(|c| BASE58.contains(c)),
            _ => !value.is_empty() && !value.contains(char::is_whitespace),
        };
        if !ok {
            let expected = match proto {
                "ip4" => "an IPv4 address",
                "ip6" => "an IPv6 address",
                "tcp" | "udp" => "a port number 0-65535",
                "memory" => "an unsigned integer",
                "p2p" => "a base58 peer id such as 12D3KooW...",
                _ => "a host name",
            };
            return Err(format!(
                "/{proto} value {value:?} is invalid; expected {expected}"
            ));
        }
    }
    Ok(protocols)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiaddr_checker() {
        let ok = [
            "/ip4/127.0.0.1/tcp/0",
            "/ip6/::1/udp/4001/quic-v1",
            "/dns4/boot.example.org/tcp/4001/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo",
            "/memory/42",
        ];
        for a in ok {
            assert!(check_multiaddr(a).is_ok(), "{a}");
        }
        let bad = [
            ("tcp/4001", "start with '/'"),
            ("/", "empty"),
            ("/ip4/1.2.3/tcp/1", "IPv4"),
            ("/ip6/zz/tcp/1", "IPv6"),
            ("/ip4/1.2.3.4/tcp/70000", "port"),
            ("/ip4/1.2.3.4/udp/x", "port"),
            ("/ip4/1.2.3.4/tcp", "port"),
            ("/ip4/1.2.3.4/tcp/1/p2p/0OIl", "base58"),
            ("/ip4/1.2.3.4/tcp/1/p2p/", "base58"),
            ("/dns4//tcp/1", "host name"),
            ("/ip4/1.2.3.4/tcp/1/", "empty component"),
            ("/http/1.2.3.4", "unknown protocol"),
            ("/memory/x", "unsigned integer"),
        ];
        for (a, why) in bad {
            let err = check_multiaddr(a).expect_err(a);
            assert!(err.contains(why), "{a}: {err}");
        }
    }
}
