//! End to end on one node with rumqttc clients: advertise, submit (v3.1.1 and v5), deliver,
//! result, idempotent resubmit, status, and bad payloads.

use std::time::Duration;

use fedmesh_tests::TestNode;
use fedmesh_tests::mqtt::{advert, advertised_agent, connect};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5::{Packet as Packet5, PublishProperties};
use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};
use serde_json::json;

async fn echo_agent(node: &TestNode, name: &str, description: &str) -> fedmesh_tests::mqtt::Client {
    let (agent, ack) = advertised_agent(node.mqtt_v4, name, description, 4)
        .await
        .expect("agent advertised");
    assert_eq!(ack["version"].as_u64().map(|v| v > 0), Some(true), "{ack}");
    assert_eq!(ack["vcv_id"].as_str().map(str::len), Some(64), "{ack}");
    agent
}

/// Answers the next task with `f(input)`.
async fn serve_one(
    agent: &mut fedmesh_tests::mqtt::Client,
    name: &str,
    f: impl Fn(&str) -> String,
) -> serde_json::Value {
    let task = agent.expect("task").await.expect("task delivered");
    let input = task["input"].as_str().unwrap_or_default().to_string();
    agent
        .send(
            &format!("fedmesh/v1/agent/{name}/result"),
            json!({"task_id": task["task_id"], "output": f(&input)}),
        )
        .await
        .expect("result");
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_routes_to_the_best_local_agent_and_returns_the_result() {
    let node = TestNode::start().expect("node starts");
    let mut upper = echo_agent(&node, "upper", "Converts text to upper case letters").await;
    let _german = echo_agent(&node, "german", "Translates English text into German").await;

    let mut req = connect(node.mqtt_v4, "alice", &["fedmesh/v1/client/alice/inbox"])
        .await
        .expect("requester");
    req.send(
        "fedmesh/v1/client/alice/submit",
        json!({"request_id": "r1", "description": "make this text upper case", "input": "hello", "deadline_ms": 10000}),
    )
    .await
    .expect("submit");
    let accepted = req.expect("accepted").await.expect("accepted");
    assert_eq!(accepted["request_id"], "r1");
    let task = serve_one(&mut upper, "upper", str::to_uppercase).await;
    assert_eq!(task["task_id"], accepted["task_id"]);
    let result = req.expect("result").await.expect("result");
    assert_eq!(result["state"], "completed", "{result}");
    assert_eq!(result["output"], "HELLO");
    assert!(
        result["agent"]
            .as_str()
            .is_some_and(|a| a.starts_with("upper@")),
        "{result}"
    );

    // Same request id: same task, the stored result, and the agent is not asked again.
    req.send(
        "fedmesh/v1/client/alice/submit",
        json!({"request_id": "r1", "description": "make this text upper case", "input": "hello"}),
    )
    .await
    .expect("resubmit");
    let again = req.expect("result").await.expect("result again");
    assert_eq!(again["task_id"], accepted["task_id"]);
    assert_eq!(again["output"], "HELLO");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), upper.expect("task"))
            .await
            .is_err(),
        "task ran twice"
    );

    // Status query.
    req.send(
        "fedmesh/v1/client/alice/status",
        json!({"request_id": "r1"}),
    )
    .await
    .expect("status");
    let status = req.expect("status").await.expect("status reply");
    assert_eq!(status["state"], "completed", "{status}");

    let s = node.status().expect("/status");
    assert_eq!(s["agents"].as_array().map(Vec::len), Some(2), "{s}");
    assert_eq!(s["tasks"]["completed"], 1, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_response_topic_and_correlation_data() {
    let node = TestNode::start().expect("node starts");
    let mut agent = echo_agent(&node, "echo", "Echoes its input back").await;

    let mut opts = Options5::new("bob", "127.0.0.1", node.mqtt_v5);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut ev) = Client5::new(opts, 64);
    client
        .subscribe("fedmesh/v1/client/bob/inbox/replies", QoS5::AtLeastOnce)
        .await
        .expect("subscribe");
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event5::Incoming(Packet5::SubAck(_))) => {
                    let _ = tx.send(None).await;
                }
                Ok(Event5::Incoming(Packet5::Publish(p))) => {
                    let corr = p
                        .properties
                        .as_ref()
                        .and_then(|pr| pr.correlation_data.clone());
                    let v: serde_json::Value =
                        serde_json::from_slice(&p.payload).unwrap_or_default();
                    let _ = tx
                        .send(Some((
                            String::from_utf8_lossy(&p.topic).to_string(),
                            v,
                            corr,
                        )))
                        .await;
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("suback"),
        Some(None)
    );
    let props = PublishProperties {
        response_topic: Some("fedmesh/v1/client/bob/inbox/replies".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"corr-42")),
        ..Default::default()
    };
    client
        .publish_with_properties(
            "fedmesh/v1/client/bob/submit",
            QoS5::AtLeastOnce,
            false,
            serde_json::to_vec(
                &json!({"request_id": "v5", "description": "echo this", "input": "ping"}),
            )
            .expect("json"),
            props,
        )
        .await
        .expect("publish");
    serve_one(&mut agent, "echo", str::to_string).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (topic, v, corr) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("reply")
            .flatten()
            .expect("message");
        assert_eq!(topic, "fedmesh/v1/client/bob/inbox/replies");
        assert_eq!(
            corr.as_deref(),
            Some(&b"corr-42"[..]),
            "correlation data echoed on {v}"
        );
        if v["type"] == "result" {
            assert_eq!(v["output"], "ping");
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_agent_is_retried_on_another() {
    let node = TestNode::start().expect("node starts");
    let mut a = echo_agent(&node, "flaky", "Echoes its input back").await;
    let mut b = echo_agent(&node, "steady", "Echoes its input back").await;
    let mut req = connect(node.mqtt_v4, "carol", &["fedmesh/v1/client/carol/inbox"])
        .await
        .expect("requester");
    req.send(
        "fedmesh/v1/client/carol/submit",
        json!({"request_id": "x", "description": "echo", "input": "hi"}),
    )
    .await
    .expect("submit");
    // Whoever gets it first fails it; the other must get it next.
    let a_first = tokio::select! {
        t = a.expect("task") => { let t = t.expect("task"); a.send("fedmesh/v1/agent/flaky/result", json!({"task_id": t["task_id"], "error": "out of memory"})).await.expect("fail"); true }
        t = b.expect("task") => { let t = t.expect("task"); b.send("fedmesh/v1/agent/steady/result", json!({"task_id": t["task_id"], "error": "out of memory"})).await.expect("fail"); false }
    };
    let retried = if a_first {
        serve_one(&mut b, "steady", |s| format!("{s}!")).await
    } else {
        serve_one(&mut a, "flaky", |s| format!("{s}!")).await
    };
    assert_eq!(retried["attempt"], 2, "{retried}");
    let result = req.expect("result").await.expect("result");
    assert_eq!(result["output"], "hi!");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_get_errors_naming_the_field_and_the_node_keeps_serving() {
    let node = TestNode::start().expect("node starts");
    let mut req = connect(
        node.mqtt_v4,
        "mallory",
        &["fedmesh/v1/client/mallory/inbox"],
    )
    .await
    .expect("requester");
    let cases: &[(&[u8], &str)] = &[
        (b"not json", "payload"),
        (b"[1,2,3]", "payload"),
        (br#"{"description": 42}"#, "description"),
        (br#"{"description": "x", "deadline_ms": 0}"#, "deadline_ms"),
        (
            br#"{"description": "x", "skills": ["has space"]}"#,
            "skills[0]",
        ),
        (br#"{"description": "x", "reply_to": "a/#"}"#, "reply_to"),
        (
            br#"{"description": "x", "embedding": {"space": "s", "values": [0,0,0,0,0,0,0,0]}}"#,
            "embedding.values",
        ),
        (
            br#"{"description": "x", "unknown_field": 1}"#,
            "unknown_field",
        ),
        (
            br#"{"description": "x", "reply_to": "fedmesh/v1/client/alice/inbox"}"#,
            "reply_to",
        ),
    ];
    for (payload, field) in cases {
        req.send_raw("fedmesh/v1/client/mallory/submit", payload)
            .await
            .expect("send");
        let err = req.expect("error").await.expect("error reply");
        assert!(
            err["field"].as_str().is_some_and(|f| f.contains(field)),
            "payload {:?}: expected field {field:?}, got {err}",
            String::from_utf8_lossy(payload)
        );
        assert!(
            err["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{err}"
        );
    }
    // Oversize input.
    let big = json!({"description": "x", "input": "a".repeat(100 * 1024)});
    req.send("fedmesh/v1/client/mallory/submit", big)
        .await
        .expect("send");
    let err = req.expect("error").await.expect("oversize error");
    assert!(
        err["field"].as_str().is_some_and(|f| f.contains("input")),
        "{err}"
    );

    // Still serving.
    let mut agent = echo_agent(&node, "echo", "Echoes its input back").await;
    req.send(
        "fedmesh/v1/client/mallory/submit",
        json!({"description": "echo", "input": "ok"}),
    )
    .await
    .expect("send");
    serve_one(&mut agent, "echo", str::to_string).await;
    assert_eq!(req.expect("result").await.expect("result")["output"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_vanishes_is_withdrawn_by_its_last_will() {
    let node = TestNode::start().expect("node");
    let listed = |s: &serde_json::Value| {
        s["agents"].as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["id"].as_str().is_some_and(|i| i.starts_with("willy@")))
        })
    };
    // The agent lifecycle of docs/agent-api.md: a Last Will of `{}` on its withdraw topic.
    let mut o = rumqttc::MqttOptions::new("willy", "127.0.0.1", node.mqtt_v4);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_last_will(rumqttc::LastWill::new(
        "fedmesh/v1/agent/willy/withdraw",
        "{}",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let (client, mut el) = rumqttc::AsyncClient::new(o, 16);
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let conn = tokio::spawn(async move {
        loop {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = el.poll().await {
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                let _ = tx.send(v).await;
            }
        }
    });
    client
        .subscribe("fedmesh/v1/agent/willy/inbox", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    client
        .publish(
            "fedmesh/v1/agent/willy/advertise",
            rumqttc::QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&advert("Doubles numbers", 1)).expect("json"),
        )
        .await
        .expect("advertise");
    loop {
        let v = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an answer to the advertisement")
            .expect("connection open");
        if v["type"] == "advertised" {
            break;
        }
        assert_ne!(v["type"], "error", "{v}");
    }
    node.wait_status("the agent is listed", Duration::from_secs(10), listed);
    // The connection vanishes without a DISCONNECT: rumqttd publishes the Will.
    conn.abort();
    let _ = conn.await;
    drop(client);
    node.wait_status(
        "the Will withdraws the agent",
        Duration::from_secs(10),
        |s| !listed(s),
    );
}
