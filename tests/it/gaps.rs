//! Gaps in a connected client's stream are closed or reported, never skipped: a gap fill pages
//! until the gap is closed, and a gap it cannot close (PostgreSQL unreachable) closes the channel
//! with `phx_error`, so the client rejoins with its `last_seq` instead of seeing a hole.

use crate::common::{PATIENCE, TcpProxy, amqp_url, spawn_node, spawn_unready};
use serde_json::{Value, json};

/// Reads pushes until `last`, returning each one's (seq, data.n).
async fn pushes_until(client: &mut crate::common::WsClient, last: i64) -> Vec<(i64, i64)> {
    let mut got = Vec::new();
    while got.last().map_or(0, |(seq, _)| *seq) < last {
        let push = client.recv_push().await;
        let seq = push[4]["seq"].as_i64().expect("a seq");
        got.push((seq, push[4]["data"]["n"].as_i64().unwrap_or(-1)));
    }
    got
}

#[tokio::test]
async fn a_broker_outage_backlog_wider_than_a_gap_fill_page_reaches_a_joined_client_whole() {
    // The issue's case: 40 events accepted while RabbitMQ is unreachable wait in the outbox; the
    // first event published once it is back reaches the channel first and reveals a gap of 40,
    // filled in pages of `socket.max_gap_fill` = 5. A long relay grace keeps the relay's copies out
    // of the way, so the backlog can only reach the client through the gap fill.
    let (proxy, via_proxy) = TcpProxy::in_front_of(&amqp_url()).await;
    let app = spawn_unready(move |s| {
        s.queue.amqp_url = via_proxy;
        s.socket.max_gap_fill = 5;
        s.pipeline.relay_grace_ms = 600_000;
        s.pipeline.sweep_after_ms = 1_200_000; // beyond the grace, as validation asks
    })
    .await;
    app.wait_ready().await;
    let mut client = app.connect_joined("g1").await;
    app.post_event(json!({"user_id": "g1", "data": {"n": 0}}))
        .await;
    assert_eq!(client.recv_push().await[4]["seq"], 1);

    proxy.cut();
    // The publisher knows the broker is gone: what is accepted now goes to the outbox alone.
    app.wait_link("publisher", "unavailable").await;
    for n in 1..=40 {
        let r = app
            .post_event(json!({"user_id": "g1", "data": {"n": n}}))
            .await;
        assert_eq!(r.status(), 202, "accepted while the broker is unreachable");
    }
    proxy.restore();
    app.wait_ready().await;
    app.wait_link("publisher", "ok").await;
    app.post_event(json!({"user_id": "g1", "data": {"n": 41}}))
        .await;

    let got = pushes_until(&mut client, 42).await;
    let expected: Vec<(i64, i64)> = (2..=42).map(|seq| (seq, seq - 1)).collect();
    assert_eq!(got, expected, "every event, in order, once");
    // Nothing was pushed twice meanwhile: the next push is the next event.
    app.post_event(json!({"user_id": "g1", "data": {"n": 42}}))
        .await;
    assert_eq!(client.recv_push().await[4]["seq"], 43);
}

#[tokio::test]
async fn a_gap_that_cannot_be_read_closes_the_channel_with_an_error_and_a_rejoin_fills_it() {
    // A socket node whose PostgreSQL goes through a proxy; the api and worker node reaches it
    // directly, so events keep flowing while the socket node cannot read.
    let api = spawn_unready(|s| {
        s.pubsub.mode = herald::config::PubSubMode::Cluster;
        s.node.roles = "api,worker".parse().unwrap();
        s.node.name = "api-worker".into();
        s.pipeline.relay_grace_ms = 600_000;
        s.pipeline.sweep_after_ms = 1_200_000; // beyond the grace, as validation asks
    })
    .await;
    api.wait_ready().await;
    let (pg, via_pg) = TcpProxy::in_front_of(api.settings.store.database_url.expose()).await;
    let socket = spawn_node(&api, "socket", "socket-via-proxy", |s| {
        s.store.database_url = via_pg;
        s.store.acquire_timeout_ms = 1_000;
    })
    .await;
    let mut client = socket.connect("g2").await;
    let reply = client.join("user:g2", json!({})).await;
    assert_eq!(reply[4]["status"], "ok");
    let join_ref = reply[0].clone();
    api.post_event(json!({"user_id": "g2", "data": {"n": 1}}))
        .await;
    assert_eq!(client.recv_push().await[4]["seq"], 1);

    // Seq 2 is committed but never published (as if its publish had failed); seq 3 then reaches
    // the channel while its node cannot read PostgreSQL.
    assert_eq!(api.commit_unpublished("g2", r#"{"n":2}"#).await, 2);
    pg.cut();
    api.post_event(json!({"user_id": "g2", "data": {"n": 3}}))
        .await;
    let frame = client.recv().await;
    assert_eq!(
        frame,
        json!([join_ref, join_ref, "user:g2", "phx_error",
               {"reason": "gap_unfilled", "cause": "store_unavailable", "last_seq": 1}]),
        "the channel errors instead of pushing seq 3 past the hole"
    );

    // What the official client does by itself: rejoin with its last seq (refused while the node
    // cannot read PostgreSQL yet; the client retries).
    pg.restore();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let reply = loop {
        let reply = client.join("user:g2", json!({"last_seq": 1})).await;
        if reply[4]["status"] == "ok" || tokio::time::Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(
        reply[4],
        json!({"status": "ok", "response": {"last_seq": 3, "missed": false}})
    );
    assert_eq!(pushes_until(&mut client, 3).await, vec![(2, 2), (3, 3)]);
    api.post_event(json!({"user_id": "g2", "data": {"n": 4}}))
        .await;
    let live: Value = client.recv_push().await;
    assert_eq!(live[4]["seq"], 4, "live again, nothing repeated");
}
