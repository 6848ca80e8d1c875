//! Topic access control for MQTT clients, enforced by the front proxy.
//!
//! Let `P` be the principal of a connection (its user name when it logged in, otherwise
//! its client id; see the crate docs).
//!
//! **Publish** (also checked for the CONNECT's will topic, which the broker publishes on
//! the client's behalf):
//! * `fedmesh/v1/agent/P/<op>` and `fedmesh/v1/client/P/<op>`, where `<op>` is exactly one
//!   non-empty level, are allowed; every other topic under `fedmesh/v1/` is denied;
//! * `$a2a/v1/discovery/P/<more levels>` is allowed; every other topic starting with `$`
//!   is denied;
//! * every other topic is allowed (the node is also an ordinary broker).
//!
//! **Subscribe**: a filter is denied when it could match a topic in another principal's
//! namespace, `fedmesh/v1/{agent|client}/Q` and everything below it, for any `Q != P`:
//! `#`, `+/…`, `fedmesh/#`, `fedmesh/+/…`, `fedmesh/v1/#`, `fedmesh/v1/+/…`,
//! `fedmesh/v1/agent/#`, `fedmesh/v1/agent/+…`, `fedmesh/v1/agent/Q/…` and the same for
//! `client`. `fedmesh/v1/agent/P/#`, `fedmesh/v1/public/#` and filters outside
//! `fedmesh/` are allowed. For a shared subscription `$share/<group>/<filter>` the inner
//! filter is checked. Syntactically invalid filters are denied.
//!
//! Consequence, and the reason for all this: a message on `fedmesh/v1/{agent|client}/P/op`
//! was published by principal `P` (the node itself never publishes there, see
//! [`node_may_publish`]). That is how the node learns who published.

/// Prefix of the node's protected namespace.
pub const NAMESPACE: &str = "fedmesh/v1/";

/// Prefix of A2A discovery topics; principals publish under `$a2a/v1/discovery/P/`.
pub const DISCOVERY_PREFIX: &str = "$a2a/v1/discovery/";

/// The two principal roles, the third level of a namespace topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `fedmesh/v1/agent/{name}/{op}`: an agent speaking.
    Agent,
    /// `fedmesh/v1/client/{name}/{op}`: a task-submitting client speaking.
    Client,
}

impl Role {
    /// The topic level for this role.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Client => "client",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "agent" => Some(Role::Agent),
            "client" => Some(Role::Client),
            _ => None,
        }
    }
}

/// Whether `s` is a valid principal / client id: `[A-Za-z0-9_.-]{1,64}`.
///
/// rumqttd refuses client ids containing `+ $ # /`, and principals appear as a topic
/// level, so the alphabet is deliberately small.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A topic of the form `fedmesh/v1/{agent|client}/{name}/{op}` with a valid name and a
/// non-empty single-level op, split into its parts.
pub fn parse_principal_topic(topic: &str) -> Option<(Role, &str, &str)> {
    let rest = topic.strip_prefix(NAMESPACE)?;
    let mut it = rest.split('/');
    let role = Role::parse(it.next()?)?;
    let name = it.next()?;
    let op = it.next()?;
    if it.next().is_some() || !valid_name(name) || op.is_empty() || op.contains(['+', '#']) {
        return None;
    }
    Some((role, name, op))
}

/// The principal whose namespace `topic` is in (`fedmesh/v1/{agent|client}/P/…`, at least
/// one level below `P`): the only principal that may subscribe to it.
pub(crate) fn namespace_owner(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix(NAMESPACE)?;
    let mut it = rest.splitn(3, '/');
    Role::parse(it.next()?)?;
    let name = it.next()?;
    let below = it.next()?;
    (valid_name(name) && !below.is_empty()).then_some(name)
}

/// Whether principal `p` may publish on `topic` (see the module docs).
pub fn may_publish(p: &str, topic: &str) -> bool {
    if topic.is_empty() || topic.contains(['+', '#', '\0']) {
        return false;
    }
    if topic.starts_with('$') {
        return topic
            .strip_prefix(DISCOVERY_PREFIX)
            .and_then(|rest| rest.strip_prefix(p))
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(|rest| !rest.is_empty());
    }
    if topic.starts_with(NAMESPACE) {
        return matches!(parse_principal_topic(topic), Some((_, name, _)) if name == p);
    }
    true
}

/// Whether `filter` is a syntactically valid MQTT topic filter.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Whether principal `p` may subscribe to `filter` (see the module docs).
pub fn may_subscribe(p: &str, filter: &str) -> bool {
    let inner = match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, inner))
                if !group.is_empty() && !group.contains(['+', '#']) && !inner.is_empty() =>
            {
                if inner.starts_with("$share/") {
                    return false;
                }
                inner
            }
            _ => return false,
        },
        None => filter,
    };
    valid_filter(inner) && !could_match_foreign(p, inner)
}

/// Whether `filter` could match a topic in the namespace of a principal other than `p`.
fn could_match_foreign(p: &str, filter: &str) -> bool {
    for (i, level) in filter.split('/').enumerate() {
        if level == "#" {
            return true;
        }
        let may_continue = match i {
            0 => level == "fedmesh" || level == "+",
            1 => level == "v1" || level == "+",
            2 => level == "agent" || level == "client" || level == "+",
            _ => return level == "+" || level != p,
        };
        if !may_continue {
            return false;
        }
    }
    // The filter ended above the principal level: it matches no namespace topic.
    false
}

/// The op of the topic the node delivers to a principal on: `fedmesh/v1/{agent|client}/P/inbox`.
pub const INBOX_OP: &str = "inbox";

/// The op an agent withdraws with, and the one Last Will the agent API documents
/// (`fedmesh/v1/agent/P/withdraw`). rumqttd itself publishes a Will when a connection ends
/// without DISCONNECT, so the node receives this op through rumqttd (its link subscribes to
/// it), not from the proxy: one path for explicit withdrawals and Wills, with rumqttd's Will
/// semantics (delay, session takeover) intact.
pub const WITHDRAW_OP: &str = "withdraw";

/// The node link's subscriptions: what reaches the node through rumqttd rather than the proxy.
pub(crate) const LINK_FILTERS: [&str; 1] = ["fedmesh/v1/agent/+/withdraw"];

/// Whether a PUBLISH on a principal topic reaches the node through rumqttd (its link) rather
/// than being handed over by the proxy.
pub(crate) fn reaches_node_via_link(role: Role, op: &str) -> bool {
    role == Role::Agent && op == WITHDRAW_OP
}

/// Whether the node itself may publish on `topic`.
///
/// The node must never publish on a principal topic `fedmesh/v1/{agent|client}/X/op`
/// (exactly one level below the name) other than [`INBOX_OP`]: those are the topics its own
/// link subscribes to and whose publisher the node infers from the topic.
pub fn node_may_publish(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        return Err("empty topic");
    }
    if topic.contains(['+', '#', '\0']) {
        return Err("wildcard or NUL in a topic name");
    }
    if topic.len() > usize::from(u16::MAX) {
        return Err("topic longer than 65535 bytes");
    }
    if let Some(rest) = topic.strip_prefix(NAMESPACE) {
        let levels: Vec<&str> = rest.split('/').collect();
        // `inbox` is the one principal topic the node writes: the node reads every other op
        // of the principal and ignores `inbox`, so nothing it publishes there can be taken
        // for a message from the principal.
        if levels.len() == 3 && Role::parse(levels[0]).is_some() && levels[2] != INBOX_OP {
            return Err("principal topics fedmesh/v1/{agent|client}/NAME/OP are reserved to NAME");
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("alice"));
        assert!(valid_name("a.b-c_9"));
        assert!(valid_name(&"x".repeat(64)));
        assert!(!valid_name(&"x".repeat(65)));
        for bad in ["", "a/b", "a+b", "a#", "$a", "a b", "a:b", "é"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn namespace_owners() {
        assert_eq!(namespace_owner("fedmesh/v1/agent/A/inbox"), Some("A"));
        assert_eq!(namespace_owner("fedmesh/v1/client/A/reply/1"), Some("A"));
        for none in [
            "fedmesh/v1/agent/A",
            "fedmesh/v1/agent/A/",
            "fedmesh/v1/public/A/x",
            "fedmesh/v1/agent/a:b/x",
            "other/v1/agent/A/x",
        ] {
            assert_eq!(namespace_owner(none), None, "{none}");
        }
        // Whoever it names is the only principal that may subscribe to it.
        assert!(may_subscribe("A", "fedmesh/v1/client/A/reply/#"));
        assert!(!may_subscribe("B", "fedmesh/v1/client/A/reply/#"));
    }

    #[test]
    fn publish_rules() {
        assert!(may_publish("A", "fedmesh/v1/agent/A/result"));
        assert!(may_publish("A", "fedmesh/v1/client/A/submit"));
        assert!(!may_publish("B", "fedmesh/v1/agent/A/result"));
        assert!(!may_publish("A", "fedmesh/v1/agent/A/result/deeper"));
        assert!(!may_publish("A", "fedmesh/v1/agent/A/"));
        assert!(!may_publish("A", "fedmesh/v1/agent/A"));
        assert!(!may_publish("A", "fedmesh/v1/public/x"));
        assert!(!may_publish("A", "fedmesh/v1/other/A/x"));
        assert!(!may_publish("A", "fedmesh/v1/"));
        assert!(may_publish("A", "fedmesh/v1"));
        assert!(may_publish("A", "sensors/room1/temp"));
        assert!(may_publish("A", "fedmesh/v2/anything"));
        assert!(may_publish("A", "$a2a/v1/discovery/A/card"));
        assert!(may_publish("A", "$a2a/v1/discovery/A/unit/agent"));
        assert!(!may_publish("A", "$a2a/v1/discovery/A/"));
        assert!(!may_publish("A", "$a2a/v1/discovery/A"));
        assert!(!may_publish("A", "$a2a/v1/discovery/AB/card"));
        assert!(!may_publish("A", "$a2a/v1/discovery/B/card"));
        assert!(!may_publish("A", "$SYS/x"));
        assert!(!may_publish("A", "a/+/b"));
        assert!(!may_publish("A", ""));
    }

    #[test]
    fn subscribe_rules() {
        let p = "A";
        for ok in [
            "fedmesh/v1/agent/A/#",
            "fedmesh/v1/agent/A/tasks",
            "fedmesh/v1/agent/A/+",
            "fedmesh/v1/client/A/+/x",
            "fedmesh/v1/public/#",
            "fedmesh/v1/public/+/x",
            "fedmesh/v1/agent",
            "fedmesh/v1/+",
            "fedmesh/+",
            "sensors/#",
            "+",
            "$a2a/v1/discovery/#",
            "$share/g/fedmesh/v1/agent/A/#",
            "$share/g/sensors/+",
        ] {
            assert!(may_subscribe(p, ok), "{ok} should be allowed");
        }
        for denied in [
            "#",
            "+/#",
            "+/v1/agent/B/x",
            "+/+/+/+",
            "fedmesh/#",
            "fedmesh/+/agent/B/x",
            "fedmesh/v1/#",
            "fedmesh/v1/+/B/x",
            "fedmesh/v1/+/+",
            "fedmesh/v1/agent/#",
            "fedmesh/v1/agent/+",
            "fedmesh/v1/agent/+/result",
            "fedmesh/v1/agent/B/tasks",
            "fedmesh/v1/agent/B",
            "fedmesh/v1/client/B/#",
            "$share/g/#",
            "$share/g/fedmesh/v1/agent/B/x",
            "$share//x",
            "$share/g",
            "a/#/b",
            "a+/b",
            "",
        ] {
            assert!(!may_subscribe(p, denied), "{denied} should be denied");
        }
    }

    #[test]
    fn principal_topics() {
        assert_eq!(
            parse_principal_topic("fedmesh/v1/agent/A/result"),
            Some((Role::Agent, "A", "result"))
        );
        assert_eq!(
            parse_principal_topic("fedmesh/v1/client/c-1/submit"),
            Some((Role::Client, "c-1", "submit"))
        );
        for bad in [
            "fedmesh/v1/agent/A",
            "fedmesh/v1/agent/A/",
            "fedmesh/v1/agent//x",
            "fedmesh/v1/agent/A/x/y",
            "fedmesh/v1/other/A/x",
            "fedmesh/v1/agent/a b/x",
        ] {
            assert_eq!(parse_principal_topic(bad), None, "{bad}");
        }
    }

    #[test]
    fn node_publish_rules() {
        assert!(node_may_publish("fedmesh/v1/agent/A/inbox/tasks").is_ok());
        assert!(node_may_publish("fedmesh/v1/agent/A/inbox").is_ok());
        assert!(node_may_publish("fedmesh/v1/client/A/inbox").is_ok());
        assert!(node_may_publish("fedmesh/v1/public/status").is_ok());
        assert!(node_may_publish("$a2a/v1/discovery/A/card").is_ok());
        assert!(node_may_publish("fedmesh/v1/agent/A/result").is_err());
        assert!(node_may_publish("fedmesh/v1/client/A/x").is_err());
        assert!(node_may_publish("fedmesh/v1/agent//").is_err());
        assert!(node_may_publish("a/+").is_err());
        assert!(node_may_publish("").is_err());
    }
}
