//! The agent API with real third-party clients: Debian's mosquitto_pub/mosquitto_sub, paho-mqtt
//! (examples/python), and the CLI's own `agent exec` / `task submit`. `scripts/test.sh` installs
//! the tools.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fedmesh_tests::TestNode;

struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Waits until `/status` lists an agent named `name`.
fn wait_agent(node: &TestNode, name: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if let Ok(s) = node.status()
            && s["agents"].as_array().is_some_and(|a| {
                a.iter().any(|x| {
                    x["id"]
                        .as_str()
                        .is_some_and(|id| id.starts_with(&format!("{name}@")))
                })
            })
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("agent {name} never advertised; node log:\n{}", node.log());
}

fn exec_agent(node: &TestNode, name: &str, describe: &str, cmd: &[&str]) -> Reaper {
    let child = node
        .cli()
        .args([
            "agent",
            "exec",
            "--name",
            name,
            "--describe",
            describe,
            "--port",
        ])
        .arg(node.mqtt_v4.to_string())
        .arg("--")
        .args(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("agent exec");
    wait_agent(node, name);
    Reaper(child)
}

#[test]
fn cli_agent_exec_and_task_submit() {
    let node = TestNode::start().expect("node");
    let _agent = exec_agent(
        &node,
        "shouter",
        "Converts text to upper case",
        &["tr", "a-z", "A-Z"],
    );
    let out = node
        .cli()
        .args([
            "task",
            "submit",
            "make this text upper case",
            "--input",
            "hello agents",
            "--port",
        ])
        .arg(node.mqtt_v4.to_string())
        .output()
        .expect("submit");
    assert!(
        out.status.success(),
        "stderr: {}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "HELLO AGENTS");
}

#[test]
fn mosquitto_pub_and_sub_v311_and_v5() {
    let node = TestNode::start().expect("node");
    let _agent = exec_agent(
        &node,
        "shouter",
        "Converts text to upper case",
        &["tr", "a-z", "A-Z"],
    );
    for (version, extra) in [
        ("mqttv311", vec![]),
        (
            "mqttv5",
            vec![
                "-D",
                "publish",
                "response-topic",
                "replies/v5",
                "-D",
                "publish",
                "correlation-data",
                "c1",
            ],
        ),
    ] {
        let reply = if version == "mqttv5" {
            "replies/v5"
        } else {
            "replies/v311"
        };
        let sub = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &node.mqtt_v4.to_string(),
                "-V",
                version,
                "-i",
                &format!("listener-{version}"),
                "-t",
                reply,
                // No `-C`: the reader below stops at the result (accepted, status,
                // progress, result: `-C 3` made mosquitto_sub DISCONNECT before the
                // result); `-W` bounds it if the result never comes.
                "-W",
                "20",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub (scripts/test.sh installs mosquitto-clients)");
        std::thread::sleep(Duration::from_millis(300));
        let payload = if version == "mqttv5" {
            r#"{"request_id": "m5", "description": "upper case please", "input": "from mosquitto"}"#
                .to_string()
        } else {
            format!(
                r#"{{"request_id": "m3", "description": "upper case please", "input": "from mosquitto", "reply_to": "{reply}"}}"#
            )
        };
        let status = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &node.mqtt_v4.to_string(),
                "-V",
                version,
                "-i",
                "mosq-req",
                "-q",
                "1",
                "-t",
                "fedmesh/v1/client/mosq-req/submit",
                "-m",
                &payload,
            ])
            .args(&extra)
            .status()
            .expect("mosquitto_pub");
        assert!(status.success());
        // Read replies until the result arrives (mosquitto_sub exits by itself after 20 s).
        let mut sub = Reaper(sub);
        let mut text = String::new();
        if let Some(stdout) = sub.0.stdout.take() {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                text.push_str(&line);
                text.push('\n');
                if line.contains(r#""type":"result""#) {
                    break;
                }
            }
        }
        assert!(text.contains(r#""type":"accepted""#), "{version}: {text}");
        assert!(
            text.contains(r#""output":"FROM MOSQUITTO""#),
            "{version}: {text}\nlog:\n{}",
            node.log()
        );
    }
}

#[test]
fn paho_mqtt_agent_and_requester() {
    let node = TestNode::start().expect("node");
    let py = repo().join("examples/python");
    let agent = Command::new("python3")
        .arg(py.join("echo_agent.py"))
        .args([
            "Echoes its input back in upper case",
            "--upper",
            "--name",
            "paho-echo",
            "--port",
        ])
        .arg(node.mqtt_v4.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 echo_agent.py (scripts/test.sh installs paho-mqtt)");
    let _agent = Reaper(agent);
    wait_agent(&node, "paho-echo");
    let out = Command::new("python3")
        .arg(py.join("submit.py"))
        .args([
            "echo this back",
            "--input",
            "paho says hi",
            "--name",
            "paho-req",
            "--port",
        ])
        .arg(node.mqtt_v4.to_string())
        .output()
        .expect("submit.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    assert!(stdout.contains("PAHO SAYS HI"), "{stdout}");
}
