//! MQTT over TLS (`mqtt.listen_tls`) with a real node and Debian's mosquitto clients: a TLS
//! subscriber gets a plain publisher's message and a TLS publisher reaches a plain
//! subscriber, in MQTT 3.1.1 and 5; plain MQTT sent to the TLS port is refused, logged and
//! counted, and so is a client that never starts the handshake, while the listener keeps
//! serving; a key that does not fit the certificate stops
//! `fedmesh run` with a message naming the file; SIGHUP rotates the certificate without
//! closing open connections, and a broken new pair is refused while the old one stays.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fedmesh_tests::{TestNode, fedmesh_bin, free_port, http_get};

struct Certs {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

fn certs() -> Certs {
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write key");
    Certs {
        _dir: dir,
        cert,
        key,
    }
}

fn tls_env(port: u16, c: &Certs) -> Vec<(String, String)> {
    vec![
        (
            "FEDMESH_MQTT__LISTEN_TLS".into(),
            format!("127.0.0.1:{port}"),
        ),
        (
            "FEDMESH_MQTT__TLS_CERT".into(),
            c.cert.display().to_string(),
        ),
        ("FEDMESH_MQTT__TLS_KEY".into(), c.key.display().to_string()),
    ]
}

/// `mosquitto_sub` for one message on `topic`, over TLS when `ca` is given.
fn sub(port: u16, version: &str, topic: &str, ca: Option<&Path>) -> Child {
    let mut c = Command::new("mosquitto_sub");
    c.args(["-h", "localhost", "-p", &port.to_string(), "-V", version])
        .args(["-t", topic, "-C", "1", "-W", "20", "-q", "1"]);
    if let Some(ca) = ca {
        c.arg("--cafile").arg(ca);
    }
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (scripts/test.sh installs mosquitto-clients)")
}

/// `mosquitto_pub` of `msg` on `topic`, repeated until the subscriber has it (it may not have
/// subscribed yet), over TLS when `ca` is given.
fn pub_until_received(
    port: u16,
    version: &str,
    topic: &str,
    msg: &str,
    ca: Option<&Path>,
    mut s: Child,
) -> String {
    let start = Instant::now();
    loop {
        let mut c = Command::new("mosquitto_pub");
        c.args(["-h", "localhost", "-p", &port.to_string(), "-V", version])
            .args(["-t", topic, "-m", msg, "-q", "1"]);
        if let Some(ca) = ca {
            c.arg("--cafile").arg(ca);
        }
        let out = c.output().expect("mosquitto_pub");
        assert!(
            out.status.success(),
            "mosquitto_pub: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(status) = s.try_wait().expect("wait") {
            let mut stdout = String::new();
            let mut stderr = String::new();
            s.stdout
                .take()
                .expect("stdout")
                .read_to_string(&mut stdout)
                .expect("read");
            s.stderr
                .take()
                .expect("stderr")
                .read_to_string(&mut stderr)
                .expect("read");
            assert!(status.success(), "mosquitto_sub: {stderr}");
            return stdout.trim().to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the subscriber never got {msg:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn broker_counter(node: &TestNode, name: &str) -> f64 {
    let (_, body) = http_get(node.http, "/metrics").expect("GET /metrics");
    body.lines()
        .find(|l| l.starts_with("fedmesh_broker{") && l.contains(&format!("kind=\"{name}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Waits up to 10 s for the broker counter `name` to reach `at_least`.
fn wait_counter(node: &TestNode, name: &str, at_least: f64) {
    let start = Instant::now();
    while broker_counter(node, name) < at_least {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{name} never reached {at_least}; log:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn mosquitto_clients_over_tls_and_plain_mqtt_refused_on_the_tls_port() {
    let c = certs();
    let tls = free_port();
    let mut env = tls_env(tls, &c);
    env.push(("FEDMESH_MQTT__CONNECT_TIMEOUT_MS".into(), "1000".into()));
    let node = TestNode::start_with(env).expect("node");
    let want = format!("127.0.0.1:{tls}");
    node.wait_status(
        "/status lists the TLS listener",
        Duration::from_secs(10),
        |s| s["mqtt"]["tls"] == want.as_str(),
    );

    for version in ["mqttv311", "mqttv5"] {
        // TLS subscriber, plain publisher.
        let topic = format!("tls/{version}/in");
        let s = sub(tls, version, &topic, Some(&c.cert));
        let got = pub_until_received(node.mqtt_v4, version, &topic, "to-tls", None, s);
        assert_eq!(got, "to-tls");
        // Plain subscriber, TLS publisher.
        let topic = format!("tls/{version}/out");
        let s = sub(node.mqtt_v4, version, &topic, None);
        let got = pub_until_received(tls, version, &topic, "from-tls", Some(&c.cert), s);
        assert_eq!(got, "from-tls");
    }
    assert!(broker_counter(&node, "tls_handshakes") >= 4.0);

    // Plain MQTT to the TLS port: a CONNECT is not a ClientHello.
    let before = broker_counter(&node, "tls_handshake_failures");
    let mut raw = TcpStream::connect(("127.0.0.1", tls)).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // CONNECT, MQTT 3.1.1, client id "plain".
    raw.write_all(&[
        0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 5, b'p', b'l', b'a', b'i', b'n',
    ])
    .expect("write");
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while let Ok(n) = raw.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert_ne!(
        got.first(),
        Some(&0x20),
        "no CONNACK over plain TCP: {got:?}"
    );
    wait_counter(&node, "tls_handshake_failures", before + 1.0);
    assert!(
        node.log().contains("TLS handshake failed"),
        "logged:\n{}",
        node.log()
    );
    // A client that never starts the handshake is closed after connect_timeout.
    let before = broker_counter(&node, "tls_handshake_failures");
    let mut silent = TcpStream::connect(("127.0.0.1", tls)).expect("connect");
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let opened = Instant::now();
    assert_eq!(silent.read(&mut buf).expect("closed, not timed out"), 0);
    assert!(opened.elapsed() >= Duration::from_millis(900));
    wait_counter(&node, "tls_handshake_failures", before + 1.0);
    // The listener still serves.
    let topic = "tls/after";
    let s = sub(tls, "mqttv311", topic, Some(&c.cert));
    assert_eq!(
        pub_until_received(node.mqtt_v4, "mqttv311", topic, "still", None, s),
        "still"
    );
}

#[test]
fn a_key_that_does_not_fit_the_certificate_stops_run_naming_the_file() {
    let c = certs();
    let other = certs();
    let data = tempfile::tempdir().expect("tempdir");
    let mut env = tls_env(free_port(), &c);
    env.retain(|(k, _)| k != "FEDMESH_MQTT__TLS_KEY");
    env.push((
        "FEDMESH_MQTT__TLS_KEY".into(),
        other.key.display().to_string(),
    ));
    let out = Command::new(fedmesh_bin())
        .arg("run")
        .envs(env)
        .env("FEDMESH_DATA_DIR", data.path())
        .env(
            "FEDMESH_MQTT__LISTEN_V4",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("FEDMESH_MQTT__LISTEN_V5", "")
        .env("FEDMESH_HTTP__LISTEN", "")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TLS") && err.contains(&other.key.display().to_string()),
        "{err}"
    );
}

/// Runs `fedmesh agent exec --name shouter ... -- tr a-z A-Z` with `agent_args`, waits for
/// the agent to join, and returns what `fedmesh task submit` with `submit_args` printed.
fn shouter_round_trip(
    node: &TestNode,
    agent_args: &[&str],
    submit_args: &[&str],
) -> std::process::Output {
    let mut agent = node
        .cli()
        .args(["agent", "exec", "--name", "shouter"])
        .args(["--describe", "Converts text to upper case"])
        .args(agent_args)
        .args(["--", "tr", "a-z", "A-Z"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("agent exec");
    node.wait_status("the agent joins over TLS", Duration::from_secs(20), |s| {
        s["agents"].as_array().is_some_and(|a| {
            a.iter().any(|x| {
                x["id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("shouter@"))
            })
        })
    });
    let out = submit(node, submit_args);
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        out.status.success(),
        "stderr: {}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    out
}

fn submit(node: &TestNode, args: &[&str]) -> std::process::Output {
    node.cli()
        .args(["task", "submit", "make this text upper case"])
        .args(["--input", "hello tls", "--deadline-s", "20"])
        .args(args)
        .output()
        .expect("submit")
}

/// The CLI's clients over TLS (`--tls-ca`): an agent (`fedmesh agent exec`) and a requester
/// (`fedmesh task submit`) both on the TLS listener complete a task; a requester that does
/// not trust the node's certificate fails with an error that says so.
#[test]
fn cli_agent_and_requester_over_tls() {
    let c = certs();
    let stranger = certs();
    let tls = free_port();
    let node = TestNode::start_with(tls_env(tls, &c)).expect("node");
    let port = tls.to_string();
    let ca = c.cert.display().to_string();
    let tls_args = ["--host", "localhost", "--port", &port, "--tls-ca", &ca];
    let out = shouter_round_trip(&node, &tls_args, &tls_args);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "HELLO TLS");

    let wrong = stranger.cert.display().to_string();
    let out = submit(
        &node,
        &["--host", "localhost", "--port", &port, "--tls-ca", &wrong],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("certificate"), "{err}");
}

/// The CLI with client certificates (`--tls-cert`, `--tls-key`) on a node that requires them:
/// the agent and the requester log in as their certificates' CNs, with no password; a
/// `--username` that is not the CN is refused before connecting, and a requester without a
/// certificate cannot connect.
#[test]
fn cli_agent_and_requester_with_client_certificates() {
    let server = certs();
    let pki = client_pki(&["shouter", "req1"]);
    let (node, tls) = mtls_node(&server, &pki);
    let port = tls.to_string();
    let ca = server.cert.display().to_string();
    let base = ["--host", "localhost", "--port", &port, "--tls-ca", &ca];
    let args = |i: usize| {
        let (_, c, k) = &pki.clients[i];
        let mut a: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        a.extend([
            "--tls-cert".into(),
            c.display().to_string(),
            "--tls-key".into(),
            k.display().to_string(),
        ]);
        a
    };
    let (agent, requester) = (args(0), args(1));
    let agent: Vec<&str> = agent.iter().map(String::as_str).collect();
    let requester: Vec<&str> = requester.iter().map(String::as_str).collect();
    let out = shouter_round_trip(&node, &agent, &requester);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "HELLO TLS");

    let mut wrong_user = requester.clone();
    wrong_user.extend(["--username", "bob"]);
    let out = submit(&node, &wrong_user);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"bob\"") && err.contains("\"req1\""), "{err}");

    let out = submit(&node, &base);
    assert!(!out.status.success(), "connected without a certificate");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("requires a client certificate"), "{err}");
}

/// Certificate rotation: the files are replaced and the node gets SIGHUP. The next handshake
/// presents the new certificate, a TLS connection opened before keeps working, and a client
/// that trusts only the old certificate is now refused. Then a broken certificate file:
/// refused, logged naming the file and counted, and the listener keeps serving the
/// certificate it had.
#[test]
fn sighup_rotates_the_certificate_and_a_broken_one_is_refused() {
    let old = certs();
    let new = certs();
    let served = certs(); // the node's own files, overwritten below
    std::fs::copy(&old.cert, &served.cert).expect("copy");
    std::fs::copy(&old.key, &served.key).expect("copy");
    let tls = free_port();
    let node = TestNode::start_with(tls_env(tls, &served)).expect("node");
    node.wait_status("the TLS listener is up", Duration::from_secs(10), |s| {
        !s["mqtt"]["tls"].is_null()
    });

    // A subscriber on the old certificate, connected before the rotation.
    let handshakes = broker_counter(&node, "tls_handshakes");
    let before = sub(tls, "mqttv311", "rot/before", Some(&old.cert));
    wait_counter(&node, "tls_handshakes", handshakes + 1.0);

    std::fs::copy(&new.cert, &served.cert).expect("rotate");
    std::fs::copy(&new.key, &served.key).expect("rotate");
    node.signal("HUP");
    wait_counter(&node, "tls_reloads", 1.0);
    let reloads = broker_counter(&node, "tls_reloads");
    assert!(node.log().contains("TLS certificate reloaded"));
    let s = sub(tls, "mqttv311", "rot/new", Some(&new.cert));
    assert_eq!(
        pub_until_received(node.mqtt_v4, "mqttv311", "rot/new", "new", None, s),
        "new"
    );
    let stale = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &tls.to_string()])
        .args(["-t", "rot/x", "-m", "x", "--cafile"])
        .arg(&old.cert)
        .output()
        .expect("mosquitto_pub");
    assert!(
        !stale.status.success(),
        "a client trusting only the old certificate connected"
    );
    assert_eq!(
        pub_until_received(node.mqtt_v4, "mqttv311", "rot/before", "kept", None, before),
        "kept",
        "the connection opened before the rotation"
    );

    // A broken certificate file: refused, the listener keeps the new certificate.
    std::fs::write(&served.cert, "-----BEGIN CERTIFICATE-----\ntruncated").expect("write");
    node.signal("HUP");
    wait_counter(&node, "tls_reload_failures", 1.0);
    let log = node.log();
    assert!(
        log.contains("not reloaded") && log.contains(&served.cert.display().to_string()),
        "{log}"
    );
    let s = sub(tls, "mqttv5", "rot/after", Some(&new.cert));
    assert_eq!(
        pub_until_received(node.mqtt_v4, "mqttv5", "rot/after", "after", None, s),
        "after"
    );
    assert_eq!(broker_counter(&node, "tls_reloads"), reloads);
}

/// A CA and client certificates it issues, for mutual TLS.
struct ClientPki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    /// (certificate, key) files by CN.
    clients: Vec<(String, PathBuf, PathBuf)>,
}

fn client_pki(cns: &[&str]) -> ClientPki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fedmesh test client CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
    let ca = dir.path().join("client-ca.pem");
    std::fs::write(&ca, ca_cert.pem()).expect("write");
    let clients = cns
        .iter()
        .enumerate()
        .map(|(i, cn)| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.distinguished_name.push(DnType::CommonName, *cn);
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let cert = p.signed_by(&key, &ca_cert, &ca_key).expect("sign");
            let (c, k) = (
                dir.path().join(format!("client{i}.pem")),
                dir.path().join(format!("client{i}.key")),
            );
            std::fs::write(&c, cert.pem()).expect("write");
            std::fs::write(&k, key.serialize_pem()).expect("write");
            (cn.to_string(), c, k)
        })
        .collect();
    ClientPki {
        _dir: dir,
        ca,
        clients,
    }
}

/// A node whose TLS listener serves `server` and requires certificates from `pki`'s CA.
fn mtls_node(server: &Certs, pki: &ClientPki) -> (TestNode, u16) {
    let tls = free_port();
    let mut env = tls_env(tls, server);
    env.push((
        "FEDMESH_MQTT__TLS_CLIENT_CA".into(),
        pki.ca.display().to_string(),
    ));
    (TestNode::start_with(env).expect("node"), tls)
}

/// Mutual TLS (`mqtt.tls_client_ca`): a client certificate issued by the CA logs the client
/// in as its CN, with no password: it may use that principal's API topics, which its client
/// id alone would not allow. No certificate, a certificate from another CA, a user name that
/// differs from the CN and a CN that is no principal name are each refused, and the listener
/// keeps serving.
#[test]
fn client_certificates_name_the_principal_and_everything_else_is_refused() {
    let server = certs();
    let pki = client_pki(&["alice", "not a name!"]);
    let stranger = client_pki(&["alice"]);
    let (node, tls) = mtls_node(&server, &pki);
    node.wait_status("the TLS listener is up", Duration::from_secs(10), |s| {
        !s["mqtt"]["tls"].is_null()
    });
    let port = tls.to_string();
    let mosquitto = |tool: &str, cert: Option<(&Path, &Path)>, extra: &[&str]| {
        let mut c = Command::new(tool);
        c.args(["-h", "localhost", "-p", &port, "-q", "1", "--cafile"])
            .arg(&server.cert);
        if let Some((cert, key)) = cert {
            c.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        c.args(extra);
        c
    };
    let (_, alice_cert, alice_key) = &pki.clients[0];
    let alice = Some((alice_cert.as_path(), alice_key.as_path()));

    // Logged in as "alice" by the certificate: the client ids are not "alice", and only
    // principal alice may publish to fedmesh/v1/client/alice/…, so the node's answer on the
    // inbox proves who the proxy took the client for.
    let mut inbox = mosquitto("mosquitto_sub", alice, &[])
        .args(["-i", "alice-inbox", "-t", "fedmesh/v1/client/alice/inbox"])
        .args(["-C", "1", "-W", "20", "-v"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    let submit =
        r#"{"request_id":"r1","description":"nobody does this","input":"x","deadline_ms":2000}"#;
    let start = Instant::now();
    // Resubmitted until the inbox has an answer: it may not have subscribed yet.
    while inbox.try_wait().expect("wait").is_none() {
        let out = mosquitto("mosquitto_pub", alice, &[])
            .args(["-i", "alice-submit", "-t", "fedmesh/v1/client/alice/submit"])
            .args(["-m", submit])
            .output()
            .expect("mosquitto_pub");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no answer on alice's inbox; log:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = inbox.wait_with_output().expect("output");
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.starts_with("fedmesh/v1/client/alice/inbox ") && answer.contains("r1"),
        "{answer}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let refused = |cert: Option<(&Path, &Path)>, extra: &[&str]| {
        let out = mosquitto("mosquitto_pub", cert, extra)
            .args(["-t", "mtls/x", "-m", "m"])
            .output()
            .expect("mosquitto_pub");
        assert!(!out.status.success(), "connected with {cert:?} {extra:?}");
        String::from_utf8_lossy(&out.stderr).to_lowercase()
    };
    let failures = broker_counter(&node, "tls_handshake_failures");
    refused(None, &[]);
    let (_, c, k) = &stranger.clients[0];
    refused(Some((c, k)), &[]);
    wait_counter(&node, "tls_handshake_failures", failures + 2.0);
    let e = refused(alice, &["-u", "bob"]);
    assert!(e.contains("bad user name or password"), "{e}");
    let (_, c, k) = &pki.clients[1];
    let e = refused(Some((c, k)), &[]);
    assert!(e.contains("not authori"), "{e}");
    let log = node.log();
    assert!(
        log.contains("user name differs from the client certificate's CN")
            && log.contains("CN is not a principal name"),
        "{log}"
    );

    // Still serving.
    let out = mosquitto("mosquitto_pub", alice, &[])
        .args(["-t", "mtls/x", "-m", "m"])
        .output()
        .expect("mosquitto_pub");
    assert!(out.status.success());
}

/// `fedmesh tls init` and `fedmesh tls issue` are all the set-up mutual TLS needs: a node
/// started on the files `tls init` wrote, with `mqtt.tls_client_ca = "tls/ca.pem"`, serves
/// Debian's mosquitto clients (OpenSSL) that trust `tls/ca.pem` and present a certificate from
/// `tls issue`, and the CLI's agent and requester with theirs.
#[test]
fn tls_init_and_issue_set_up_mutual_tls() {
    let data = tempfile::tempdir().expect("tempdir");
    let fedmesh = |args: &[&str]| {
        let out = Command::new(fedmesh_bin())
            .args(args)
            .env("FEDMESH_DATA_DIR", data.path())
            .output()
            .expect("fedmesh");
        assert!(
            out.status.success(),
            "fedmesh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let ca = fedmesh(&["tls", "init", "--name", "node0.example", "--days", "30"]);
    let ca = ca.trim().to_string();
    assert_eq!(ca, data.path().join("tls/ca.pem").display().to_string());
    for name in ["shouter", "req1", "sub1"] {
        fedmesh(&["tls", "issue", name]);
    }
    let clients = data.path().join("tls/clients");

    let tls = free_port();
    let node = TestNode::start_with(vec![
        ("FEDMESH_DATA_DIR".into(), data.path().display().to_string()),
        (
            "FEDMESH_MQTT__LISTEN_TLS".into(),
            format!("127.0.0.1:{tls}"),
        ),
        ("FEDMESH_MQTT__TLS_CLIENT_CA".into(), "tls/ca.pem".into()),
    ])
    .expect("node");
    let port = tls.to_string();
    let cli_args = |name: &str| -> Vec<String> {
        ["--host", "localhost", "--port", &port, "--tls-ca", &ca]
            .iter()
            .map(|s| s.to_string())
            .chain([
                "--tls-cert".into(),
                clients.join(format!("{name}.pem")).display().to_string(),
                "--tls-key".into(),
                clients.join(format!("{name}.key")).display().to_string(),
            ])
            .collect()
    };
    let (agent, requester) = (cli_args("shouter"), cli_args("req1"));
    let agent: Vec<&str> = agent.iter().map(String::as_str).collect();
    let requester: Vec<&str> = requester.iter().map(String::as_str).collect();
    let out = shouter_round_trip(&node, &agent, &requester);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "HELLO TLS");

    // The certificate's expiry, for alerting: 30 days from now (`--days 30`).
    let (_, body) = http_get(node.http, "/metrics").expect("GET /metrics");
    let expiry: f64 = body
        .lines()
        .find(|l| l.starts_with("fedmesh_tls_cert_expiry_timestamp_seconds "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no expiry gauge in\n{body}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let days = (expiry - now) / 86_400.0;
    assert!((29.9..30.1).contains(&days), "{days} days");

    // OpenSSL clients accept the chain and the client certificate.
    let s = Command::new("mosquitto_sub")
        .args(["-h", "localhost", "-p", &port, "-t", "init/t", "-C", "1"])
        .args(["-W", "20", "--cafile", &ca, "--cert"])
        .arg(clients.join("sub1.pem"))
        .arg("--key")
        .arg(clients.join("sub1.key"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    assert_eq!(
        pub_until_received(node.mqtt_v4, "mqttv311", "init/t", "ok", None, s),
        "ok"
    );

    // A certificate about to expire is warned about when it is loaded.
    fedmesh(&["tls", "init", "--force", "--days", "5"]);
    node.signal("HUP");
    let start = Instant::now();
    while !node.log().contains("the TLS certificate expires soon") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no warning:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
