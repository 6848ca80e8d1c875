//! `fedmesh audit tail [--follow]` and `fedmesh audit verify` against a *running* node, which
//! holds its sled database locked: the CLI asks the node's `GET /audit` and `GET /audit/verify`.

use std::process::{Output, Stdio};
use std::time::Duration;

use fedmesh_tests::mqtt::spawn_echo_agent;
use fedmesh_tests::{TestNode, http_get};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

async fn run(node: &TestNode, args: &[&str]) -> Output {
    let out = Command::from(node.cli())
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("the command ends")
        .expect("the command runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The `kind` of each JSON line.
fn kinds(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            v["kind"].as_str().expect("kind").to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follow_and_verify_work_against_a_running_node() {
    let mut node = TestNode::start().expect("node starts");
    let idle = Duration::from_secs(60);
    let agent = spawn_echo_agent(node.mqtt_v4, "echo", idle)
        .await
        .expect("agent");
    let out = run(
        &node,
        &["task", "submit", "Echoes its input back", "--input", "hi"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi");

    // The node holds the database: tail and verify go through its HTTP server.
    let out = run(&node, &["audit", "tail", "-n", "50"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let seen = kinds(&text(&out.stdout));
    for kind in ["node_start", "advertise", "task_accepted", "task_finished"] {
        assert!(seen.iter().any(|k| k == kind), "{kind} missing in {seen:?}");
    }
    let out = run(&node, &["audit", "tail", "-n", "1"]).await;
    assert_eq!(kinds(&text(&out.stdout)), ["task_finished"]);
    let out = run(&node, &["audit", "verify"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("audit log OK: "),
        "{}",
        text(&out.stdout)
    );
    let addr = format!("127.0.0.1:{}", node.http);
    let out = run(&node, &["audit", "verify", "--http", &addr]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    // --follow prints what happens next, and ends cleanly on Ctrl-C.
    let mut follow = Command::from(node.cli())
        .args(["audit", "tail", "--follow", "-n", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("follow starts");
    let mut lines = BufReader::new(follow.stdout.take().expect("stdout")).lines();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = spawn_echo_agent(node.mqtt_v4, "second", idle)
        .await
        .expect("second agent");
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("a new entry within 10 s")
        .expect("stdout")
        .expect("a line");
    let entry: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    assert_eq!(entry["kind"], "advertise", "{line}");
    assert!(
        entry["subject"]
            .as_str()
            .is_some_and(|s| s.starts_with("second@")),
        "{line}"
    );
    let pid = follow.id().expect("pid").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(5), follow.wait())
        .await
        .expect("follow ends on SIGINT")
        .expect("wait");
    assert!(status.success(), "{status}");

    // When the node goes away, --follow says so and fails.
    let follow = Command::from(node.cli())
        .args(["audit", "tail", "-f"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("follow starts");
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.abort();
    second.abort();
    node.kill9();
    let out = tokio::time::timeout(Duration::from_secs(20), follow.wait_with_output())
        .await
        .expect("follow gives up")
        .expect("wait");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("the node went away"), "{err}");
}

#[test]
fn audit_endpoint_names_the_bad_parameter() {
    let node = TestNode::start().expect("node starts");
    for (query, parameter) in [
        ("limit=5000", "limit"),
        ("after=abc", "after"),
        ("tail=0", "tail"),
        ("since=1", "since"),
    ] {
        let (code, body) = http_get(node.http, &format!("/audit?{query}")).expect("GET");
        assert_eq!(code, 400, "{query}: {body}");
        let error: serde_json::Value = serde_json::from_str(&body).expect("JSON error");
        assert_eq!(error["parameter"], parameter, "{body}");
        assert!(
            error["error"]
                .as_str()
                .is_some_and(|e| e.contains(&format!("`{parameter}`"))),
            "{body}"
        );
    }
    let (code, body) = http_get(node.http, "/audit?tail=1").expect("GET");
    assert_eq!(code, 200);
    assert!(body.contains(r#""kind":"node_start""#), "{body}");
    let (code, body) = http_get(node.http, "/audit/verify").expect("GET");
    assert_eq!(code, 200);
    assert!(body.contains(r#""ok":true"#), "{body}");
}
