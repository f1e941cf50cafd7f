//! The head start (`pipeline.push_from_commit`): a node running the api and socket roles pushes a
//! commit's events to its own clients at once, ahead of the worker's broadcast, and the order guard
//! keeps that from ever opening a gap or pushing a seq twice.

use crate::common::{PATIENCE, WsClient, spawn_app_with, spawn_node};
use herald::config::PubSubMode;
use serde_json::{Value, json};
use std::time::Duration;

/// The seq and `data.n` of the next push.
async fn next_push(client: &mut WsClient) -> (i64, i64) {
    let push = client.recv_push().await;
    (
        push[4]["seq"].as_i64().expect("a seq"),
        push[4]["data"]["n"].as_i64().unwrap_or(-1),
    )
}

#[tokio::test]
async fn a_client_of_the_node_that_took_the_request_is_pushed_from_the_commit_before_any_worker_runs()
 {
    // No worker runs: the only way an event reaches the client is the commit's head start.
    let app = spawn_app_with(|s| {
        s.node.roles = "api,socket".parse().unwrap();
        s.pubsub.mode = PubSubMode::Cluster;
        s.pipeline.push_from_commit = 1_000;
    })
    .await;
    let mut client = app.connect_joined("h1").await;
    let mut ids = Vec::new();
    for n in 1..=3 {
        ids.push(
            app.enqueue(json!({"user_id": "h1", "data": {"n": n}}))
                .await,
        );
    }
    for n in 1..=3 {
        assert_eq!(next_push(&mut client).await, (n, n));
    }
    for id in &ids {
        assert_eq!(app.status_of(id).await.as_deref(), Some("accepted"));
    }

    // A worker comes: it delivers the same events (and records them); the client, which has them,
    // is pushed nothing twice: the next thing it sees is the sentinel.
    let _worker = spawn_node(&app, "worker", "worker-1", |_| {}).await;
    for id in &ids {
        app.wait_status(id, "delivered").await;
    }
    app.post_sentinel("h1").await;
    client.expect_sentinel().await;
}

#[tokio::test]
async fn a_commits_event_ahead_of_one_still_on_its_way_is_left_to_the_workers_copy() {
    let app = spawn_app_with(|s| {
        s.node.roles = "api,socket".parse().unwrap();
        s.pubsub.mode = PubSubMode::Cluster;
        s.pipeline.push_from_commit = 1_000;
        // The unpublished event must reach the client through the gap fill, not the relay.
        s.pipeline.relay_grace_ms = 600_000;
        s.pipeline.sweep_after_ms = 1_200_000;
    })
    .await;
    // Published at once, not left to the relay by a publisher still connecting.
    app.wait_link("publisher", "ok").await;
    let mut client = app.connect_joined("h2").await;
    // Seq 1 is committed but its publish "failed": it waits in the outbox.
    assert_eq!(app.commit_unpublished("h2", r#"{"n": 1}"#).await, 1);
    // Seq 2's head start finds the channel still at 0: pushing it would open a hole before 1.
    app.enqueue(json!({"user_id": "h2", "data": {"n": 2}}))
        .await;
    assert_eq!(
        client.try_recv(Duration::from_millis(500)).await,
        None,
        "seq 2 must not be pushed while seq 1 is missing"
    );
    // The worker's copy of seq 2 reaches the channel, which fills seq 1 from PostgreSQL first.
    let _worker = spawn_node(&app, "worker", "worker-1", |_| {}).await;
    assert_eq!(next_push(&mut client).await, (1, 1));
    assert_eq!(next_push(&mut client).await, (2, 2));
    app.post_sentinel("h2").await;
    client.expect_sentinel().await;
}

#[tokio::test]
async fn users_racing_on_two_api_nodes_with_head_starts_reach_every_client_in_order_once() {
    // Two nodes take requests and serve sockets (each pushes its own commits ahead), a third
    // delivers. Four producers per user alternate between the api nodes, so a user's consecutive
    // seqs are committed on different nodes and each node's head start keeps meeting seqs that
    // are ahead of its clients. Every client must see 1..=N, each once, in order.
    const USERS: usize = 4;
    const PER_PRODUCER: i64 = 25;
    const PRODUCERS: i64 = 4;
    let a = spawn_app_with(|s| {
        s.node.roles = "api,socket".parse().unwrap();
        s.pubsub.mode = PubSubMode::Cluster;
        s.pipeline.push_from_commit = 1_000;
    })
    .await;
    let b = spawn_node(&a, "api,socket", "api-socket-b", |s| {
        s.pipeline.push_from_commit = 1_000;
    })
    .await;
    let _worker = spawn_node(&a, "worker", "worker-1", |_| {}).await;
    let users: Vec<String> = (0..USERS).map(|u| format!("race{u}")).collect();
    let mut clients = Vec::new();
    for user in &users {
        clients.push((user.clone(), a.connect_joined(user).await));
        clients.push((user.clone(), b.connect_joined(user).await));
    }
    let mut producers = Vec::new();
    for user in &users {
        for p in 0..PRODUCERS {
            let bodies: Vec<Value> = (0..PER_PRODUCER)
                .map(|i| json!({"user_id": user, "data": {"n": p * PER_PRODUCER + i}}))
                .collect();
            let node = if p % 2 == 0 { &a } else { &b };
            producers.push(node.post_in_turn("/api/v1/events", bodies, Duration::ZERO));
        }
    }
    for producer in producers {
        producer.await.expect("every request accepted");
    }
    let total = PRODUCERS * PER_PRODUCER;
    for (user, client) in &mut clients {
        let mut seen = Vec::new();
        for expected in 1..=total {
            let (seq, n) = tokio::time::timeout(PATIENCE, next_push(client))
                .await
                .unwrap_or_else(|_| panic!("{user}: push {expected} never came"));
            assert_eq!(
                seq, expected,
                "{user}: seqs in order, none twice, none skipped"
            );
            seen.push(n);
        }
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..total).collect::<Vec<_>>(),
            "{user}: every event once"
        );
    }
    a.wait_all_delivered().await;
    for user in &users {
        a.post_sentinel(user).await;
    }
    for (_, client) in &mut clients {
        client.expect_sentinel().await;
    }
}
