//! Routing by example on a real node (issue #5.4): the node embeds each advertised example on
//! its own (`Vcv::example_vectors`) and the router scores an agent by its best-matching example
//! as well as by its centroid, so a task phrased like one example of a broad agent reaches that
//! agent even though the agent's centroid is far from the task.

use std::time::Duration;

use fedmesh_tests::TestNode;
use fedmesh_tests::mqtt::{Client, connect};
use serde_json::json;

async fn agent(node: &TestNode, name: &str, description: &str, examples: &[&str]) -> Client {
    let inbox = format!("fedmesh/v1/agent/{name}/inbox");
    let mut agent = connect(node.mqtt_v4, name, &[&inbox])
        .await
        .expect("agent connects");
    agent
        .send(
            &format!("fedmesh/v1/agent/{name}/advertise"),
            json!({"description": description, "examples": examples,
                   "resources": {"capacity": 4}, "ttl_s": 600}),
        )
        .await
        .expect("advertise");
    agent.expect("advertised").await.expect("advertised ack");
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_phrased_like_one_example_reaches_that_agent() {
    // With the built-in hash embedder the task's cosine to `cards`'s centroid is about 0.06 and
    // to `transfers`'s about 0.42, so centroid-only routing sends it to `transfers`; with the
    // example vectors `cards` scores about 0.52 (0.3 · 0.06 + 0.7 · its last example).
    let node = TestNode::start().expect("node starts");
    let mut cards = agent(
        &node,
        "cards",
        "Bank card services",
        &[
            "my new card has not arrived yet",
            "activate my debit card",
            "order a replacement card",
            "my card payment was declined",
            "freeze my lost card",
            "how do I top up using a transfer from abroad",
        ],
    )
    .await;
    let mut transfers = agent(
        &node,
        "transfers",
        "Money transfers abroad: international payments, transfer limits and fees",
        &[],
    )
    .await;

    let mut req = connect(node.mqtt_v4, "alice", &["fedmesh/v1/client/alice/inbox"])
        .await
        .expect("requester");
    req.send(
        "fedmesh/v1/client/alice/submit",
        json!({"request_id": "r1", "description": "can I top up my account with a transfer from abroad?",
               "input": "x", "deadline_ms": 10000}),
    )
    .await
    .expect("submit");
    let accepted = req.expect("accepted").await.expect("accepted");
    let task = cards.expect("task").await.expect("task reaches cards");
    assert_eq!(task["task_id"], accepted["task_id"], "{task}");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), transfers.expect("task"))
            .await
            .is_err(),
        "the task also reached transfers"
    );
}
