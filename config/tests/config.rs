//! Loading, error naming and environment overrides through the public API.

use std::io::Write;

use fedmesh_config::{AllowAnonymous, Config, ConfigError, Embedder};

fn err(toml: &str) -> String {
    Config::from_toml_str(toml).expect_err(toml).to_string()
}

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn env_err(vars: &[(&str, &str)]) -> String {
    Config::load_with_env(None, env(vars))
        .expect_err("env error")
        .to_string()
}

#[test]
fn every_validation_rule_names_its_key() {
    let cases = [
        ("[node]\nkey_file = \"\"", "node.key_file"),
        ("[node]\nlog = \" \"", "node.log"),
        ("[mqtt]\nlisten_v4 = \"localhost\"", "mqtt.listen_v4"),
        ("[mqtt]\nlisten_v5 = \"1.2.3.4:99999\"", "mqtt.listen_v5"),
        (
            "[mqtt]\nlisten_v4 = \"\"\nlisten_v5 = \"\"",
            "no MQTT listener",
        ),
        (
            "[mqtt]\nlisten_v5 = \"127.0.0.1:1883\"",
            "mqtt.listen_v5: same address",
        ),
        ("[mqtt]\nlisten_tls = \"0.0.0.0\"", "mqtt.listen_tls"),
        (
            "[mqtt]\nlisten_tls = \"127.0.0.1:1884\"",
            "mqtt.listen_tls: same address as mqtt.listen_v5",
        ),
        (
            "[mqtt]\nlisten_tls = \"127.0.0.1:8883\"\ntls_cert = \"\"",
            "mqtt.tls_cert",
        ),
        (
            "[mqtt]\nlisten_tls = \"127.0.0.1:8883\"\ntls_key = \" \"",
            "mqtt.tls_key",
        ),
        (
            "[mqtt]\ntls_client_ca = \"ca.pem\"",
            "mqtt.tls_client_ca: client certificates need the TLS listener",
        ),
        ("[mqtt]\ncredentials_file = \"\"", "mqtt.credentials_file"),
        ("[mqtt]\nmax_connections = 0", "mqtt.max_connections"),
        ("[mqtt]\nmax_payload_bytes = 0", "mqtt.max_payload_bytes"),
        (
            "[mqtt]\nmax_payload_bytes = 268435456",
            "mqtt.max_payload_bytes",
        ),
        (
            "[mqtt]\nmemory_budget_mb = 7",
            "mqtt.memory_budget_mb: 7 is out of range; expected at least 8",
        ),
        ("[mqtt]\nconnect_timeout_ms = 0", "mqtt.connect_timeout_ms"),
        (
            "[p2p]\nlisten = [\"/ip4/0.0.0.0/tcp/1\", \"/ip4/1.2.3.4/tcp/x\"]",
            "p2p.listen[1]",
        ),
        (
            "[p2p]\nbootstrap = [\"/ip4/1.2.3.4/tcp/4001\"]",
            "p2p.bootstrap[0]",
        ),
        (
            "[p2p]\nbootstrap = [\"/ip4/1.2.3.4/tcp/1/p2p/12D3KooWx\", \"/ip4/1.2.3.4/tcp/1/p2p/12D3KooWx/tcp/2\"]",
            "p2p.bootstrap[1]",
        ),
        ("[p2p]\nmax_connections = 0", "p2p.max_connections"),
        (
            "[p2p]\nmax_connections_per_peer = 0",
            "p2p.max_connections_per_peer",
        ),
        ("[p2p]\ngossip_heartbeat_ms = 0", "p2p.gossip_heartbeat_ms"),
        ("[p2p]\nadvertise_ttl_s = 0", "p2p.advertise_ttl_s"),
        (
            "[p2p]\nreadvertise_interval_s = 0",
            "p2p.readvertise_interval_s",
        ),
        (
            "[p2p]\nreadvertise_interval_s = 3600",
            "p2p.readvertise_interval_s: 3600 is out of range",
        ),
        ("[p2p]\nsync_interval_s = 0", "p2p.sync_interval_s"),
        ("[http]\nlisten = \"8080\"", "http.listen"),
        (
            "[limits]\nmax_agents_per_node = 0",
            "limits.max_agents_per_node",
        ),
        (
            "[limits]\nmax_inflight_tasks = 0",
            "limits.max_inflight_tasks",
        ),
        (
            "[limits]\nmax_task_input_bytes = 0",
            "limits.max_task_input_bytes",
        ),
        ("[limits]\nmax_queue_depth = 0", "limits.max_queue_depth"),
        (
            "[routing]\nthreshold = 1.5",
            "routing.threshold: 1.5 is out of range; expected a number from 0.0 to 1.0",
        ),
        ("[routing]\nthreshold = -0.1", "routing.threshold"),
        ("[routing]\nthreshold = nan", "routing.threshold"),
        ("[routing]\ntop_k = 0", "routing.top_k"),
        (
            "[routing]\noffer_timeout_ms = 0",
            "routing.offer_timeout_ms",
        ),
        (
            "[routing]\noffer_timeout_ms = 300000",
            "routing.offer_timeout_ms",
        ),
        ("[routing]\nmax_attempts = 0", "routing.max_attempts"),
        (
            "[routing]\ndefault_deadline_ms = 0",
            "routing.default_deadline_ms",
        ),
        ("[routing]\nload_weight = -1.0", "routing.load_weight"),
        ("[routing]\nload_weight = inf", "routing.load_weight"),
        (
            "[mqtt]\nallow_anonymous = \"sometimes\"",
            "mqtt.allow_anonymous",
        ),
        ("[routing]\nembedder = \"bert\"", "routing.embedder"),
    ];
    for (toml, expected) in cases {
        let e = err(toml);
        assert!(
            e.contains(expected),
            "{toml:?} gave {e:?}, wanted {expected:?}"
        );
    }
}

#[test]
fn accepted_edge_values() {
    let c = Config::from_toml_str(
        "[mqtt]\nlisten_v4 = \"\"\nlisten_v5 = \"[::1]:0\"\nallow_anonymous = \"never\"\n\
         [p2p]\nlisten = []\n[http]\nlisten = \"\"\n\
         [routing]\nembedder = \"wordllama\"\nthreshold = 1\nload_weight = 0.0",
    )
    .expect("valid");
    assert_eq!(c.mqtt.allow_anonymous, AllowAnonymous::Never);
    assert_eq!(c.routing.embedder, Embedder::Wordllama);
    assert_eq!(c.routing.threshold, 1.0);
    assert_eq!(c.mqtt.listen_v4_addr(), None);
    assert_eq!(c.http.listen_addr(), None);
    // Two ephemeral-port listeners on the same IP are fine.
    Config::from_toml_str("[mqtt]\nlisten_v4 = \"127.0.0.1:0\"\nlisten_v5 = \"127.0.0.1:0\"")
        .expect("port 0 twice");
}

#[test]
fn wrongly_typed_p2p_listen_names_key_and_line() {
    let e =
        Config::from_toml_str("[node]\nname = \"a\"\n\n[p2p]\nlisten = 4001\n").expect_err("type");
    assert!(matches!(e, ConfigError::Type { .. }), "{e:?}");
    let e = e.to_string();
    assert!(
        e.starts_with("p2p.listen: invalid type: integer `4001`"),
        "{e}"
    );
    assert!(e.contains("expected a sequence"), "{e}");
    assert!(e.contains("(line 5, column 10)"), "{e}");
}

#[test]
fn nested_type_error_names_index() {
    let e = err("[p2p]\nlisten = [\"/ip4/127.0.0.1/tcp/0\", 7]");
    assert!(
        e.starts_with("p2p.listen[1]: invalid type: integer `7`"),
        "{e}"
    );
}

#[test]
fn bad_multiaddr_names_index() {
    let e = err("[p2p]\nlisten = [\"tcp/4001\"]");
    assert!(
        e.starts_with("p2p.listen[0]: \"tcp/4001\" is not a valid multiaddr: must start with '/'"),
        "{e}"
    );
}

#[test]
fn unknown_keys_are_named() {
    let e = err("[p2p]\nlisten_addr = []");
    assert!(
        e.starts_with("p2p.listen_addr: unknown field `listen_addr`"),
        "{e}"
    );
    assert!(e.contains("line 2"), "{e}");
    let e = err("[p2pp]\nlisten = []");
    assert!(e.starts_with("p2pp: unknown field `p2pp`"), "{e}");
    let e = err("[routing]\nembedder = \"hash\"\ntopk = 1");
    assert!(e.starts_with("routing.topk: unknown field"), "{e}");
}

#[test]
fn syntax_error_keeps_line() {
    let e = Config::from_toml_str("[mqtt]\nlisten_v4 = 127.0.0.1:1883\n").expect_err("syntax");
    assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
    assert!(e.to_string().contains("line 2"), "{e}");
}

#[test]
fn env_overrides_apply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fedmesh.toml");
    let mut f = std::fs::File::create(&path).expect("create");
    writeln!(
        f,
        "[routing]\nthreshold = 0.2\ntop_k = 5\n[node]\nname = \"file\""
    )
    .expect("write");
    let peer = "/ip4/1.2.3.4/tcp/4001/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo";
    let c = Config::load_with_env(
        Some(&path),
        env(&[
            ("FEDMESH_MQTT__LISTEN_V4", "127.0.0.1:2883"),
            ("FEDMESH_ROUTING__THRESHOLD", "0.4"),
            ("FEDMESH_P2P__BOOTSTRAP", &format!("[\"{peer}\"]")),
            (
                "FEDMESH_P2P__LISTEN",
                "/ip4/0.0.0.0/tcp/4001, /ip4/0.0.0.0/udp/4001/quic-v1",
            ),
            ("FEDMESH_P2P__QUIC", "true"),
            ("FEDMESH_NODE__NAME", "42"),
            ("FEDMESH_DATA_DIR", "/srv/a"),
            ("FEDMESH_NODE__DATA_DIR", "/srv/b"),
            ("FEDMESH_MQTT__ALLOW_ANONYMOUS", "always"),
            ("FEDMESH_LOG", "ignored: no double underscore"),
            ("PATH", "/usr/bin"),
        ]),
    )
    .expect("valid");
    assert_eq!(c.mqtt.listen_v4, "127.0.0.1:2883");
    assert_eq!(c.routing.threshold, 0.4);
    assert_eq!(c.routing.top_k, 5, "file value kept");
    assert_eq!(c.p2p.bootstrap, vec![peer.to_string()]);
    assert_eq!(c.p2p.listen.len(), 2);
    assert!(c.p2p.quic);
    assert_eq!(c.node.name, "42", "string keys take the value verbatim");
    assert_eq!(
        c.node.data_dir, "/srv/b",
        "explicit form beats the shortcut"
    );
    assert_eq!(c.mqtt.allow_anonymous, AllowAnonymous::Always);

    let c = Config::load_with_env(None, env(&[("FEDMESH_DATA_DIR", "/srv/a")])).expect("valid");
    assert_eq!(c.data_dir(), std::path::PathBuf::from("/srv/a"));
    assert_eq!(c.key_path(), std::path::PathBuf::from("/srv/a/node.key"));
}

#[test]
fn env_errors_name_the_variable() {
    let e = env_err(&[("FEDMESH_ROUTING__TOP_K", "many")]);
    assert!(
        e.starts_with(
            "FEDMESH_ROUTING__TOP_K (overrides routing.top_k): invalid type: string \"many\""
        ),
        "{e}"
    );
    let e = env_err(&[("FEDMESH_ROUTING__TOP_K", "1.5")]);
    assert!(e.starts_with("FEDMESH_ROUTING__TOP_K"), "{e}");
    let e = env_err(&[("FEDMESH_P2P__BOOTSTRAP", "[1]")]);
    assert!(
        e.starts_with("FEDMESH_P2P__BOOTSTRAP (overrides p2p.bootstrap): invalid type: integer"),
        "{e}"
    );
    let e = env_err(&[("FEDMESH_ROUTING__EMBEDDER", "bert")]);
    assert!(e.starts_with("FEDMESH_ROUTING__EMBEDDER"), "{e}");
    let e = env_err(&[("FEDMESH_ROUTING__TOPK", "1")]);
    assert!(
        e.contains("environment variable FEDMESH_ROUTING__TOPK does not name a config key"),
        "{e}"
    );
    let e = env_err(&[("FEDMESH_NOPE__X", "1")]);
    assert!(e.contains("FEDMESH_NOPE__X"), "{e}");
    // A well-typed but invalid value fails validation, which names the key.
    let e = env_err(&[("FEDMESH_ROUTING__THRESHOLD", "2")]);
    assert!(e.starts_with("routing.threshold: 2 is out of range"), "{e}");
}

#[test]
fn load_reads_files_and_reports_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.toml");
    let e = Config::load_with_env(Some(&missing), env(&[])).expect_err("missing");
    assert!(
        matches!(e, ConfigError::Read { .. }) && e.to_string().contains("missing.toml"),
        "{e}"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[p2p]\nlisten = 4001\n").expect("write");
    let e = Config::load_with_env(Some(&bad), env(&[])).expect_err("type");
    assert!(e.to_string().contains("p2p.listen"), "{e}");

    let good = dir.path().join("good.toml");
    std::fs::write(&good, fedmesh_config::DEFAULT_CONFIG_TOML).expect("write");
    let c = Config::load_with_env(Some(&good), env(&[])).expect("default file loads");
    assert_eq!(c, Config::default());
}
