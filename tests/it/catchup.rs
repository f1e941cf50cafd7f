//! Catch-up on join: a client that passes `last_seq` gets everything after it from PostgreSQL, in
//! order, then live events, with no gap and no duplicate across the switch.

use crate::common::{spawn_app, spawn_app_with};
use serde_json::{Value, json};

async fn seqs_until(client: &mut crate::common::WsClient, last: i64) -> Vec<i64> {
    let mut seqs = Vec::new();
    while seqs.last().copied().unwrap_or(0) < last {
        let push = client.recv_push().await;
        seqs.push(push[4]["seq"].as_i64().unwrap());
    }
    seqs
}

#[tokio::test]
async fn a_join_with_last_seq_gets_the_backlog_in_pages_then_live_events() {
    // A small page makes the catch-up go through several pages.
    let app = spawn_app_with(|s| s.socket.max_gap_fill = 7).await;
    let events: Vec<Value> = (1..=30)
        .map(|n| json!({"user_id": "40", "data": {"n": n}}))
        .collect();
    assert_eq!(app.post_batch(Value::Array(events)).await.status(), 202);
    let mut client = app.connect("40").await;
    let reply = client.join("user:40", json!({"last_seq": 10})).await;
    assert_eq!(reply[4]["status"], "ok");
    assert_eq!(
        reply[4]["response"],
        json!({"last_seq": 30, "missed": false})
    );
    app.post_event(json!({"user_id": "40", "data": {"n": 31}}))
        .await;
    let seqs = seqs_until(&mut client, 31).await;
    assert_eq!(
        seqs,
        (11..=31).collect::<Vec<i64>>(),
        "history then live, no gap, no repeat"
    );
    // Nothing pushed twice: a repeat of 11..=31 would come before 32.
    app.post_sentinel("40").await;
    client.expect_sentinel().await;
}

#[tokio::test]
async fn a_join_without_last_seq_reports_the_latest_seq_and_sends_no_history() {
    let app = spawn_app().await;
    app.post_event(json!({"user_id": "41"})).await;
    app.post_event(json!({"user_id": "41"})).await;
    // Both delivered (to nobody) before the client comes, so neither is a live push to it.
    app.wait_all_delivered().await;
    let mut client = app.connect("41").await;
    let reply = client.join("user:41", json!({})).await;
    assert_eq!(
        reply[4]["response"],
        json!({"last_seq": 2, "missed": false})
    );
    // A catch-up would come before the first live event.
    app.post_sentinel("41").await;
    client.expect_sentinel().await;
}

#[tokio::test]
async fn joining_in_the_middle_of_a_stream_misses_nothing_and_repeats_nothing() {
    let app = spawn_app().await;
    let total = 300;
    let producer = app.stream_events("42", total);
    // Join while the stream runs, asking for everything from the start.
    crate::common::wait_until(
        "part of the stream stored",
        crate::common::PATIENCE,
        || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
                .fetch_one(app.store.pool())
                .await
                .ok()?;
            (n >= 50).then_some(())
        },
    )
    .await;
    let mut client = app.connect("42").await;
    client.join("user:42", json!({"last_seq": 0})).await;
    producer.await.unwrap();
    let seqs = seqs_until(&mut client, total).await;
    assert_eq!(seqs, (1..=total).collect::<Vec<i64>>());
    app.post_sentinel("42").await;
    client.expect_sentinel().await;
}

#[tokio::test]
async fn a_client_acknowledges_events_it_has_shown() {
    let app = spawn_app().await;
    let mut client = app.connect_joined("43").await;
    app.post_event(json!({"user_id": "43"})).await;
    let other: Value = app
        .post_event(json!({"user_id": "44"}))
        .await
        .json()
        .await
        .unwrap();
    let push = client.recv_push().await;
    let id = push[4]["id"].as_str().unwrap().to_owned();
    let other_id = other["id"].as_str().unwrap().to_owned();
    // Another user's event id is ignored: a client acknowledges only its own user's events.
    client
        .send(json!(["1", "a1", "user:43", "ack", {"ids": [id, other_id]}]))
        .await;
    let reply = client.recv().await;
    assert_eq!(reply[4], json!({"status": "ok", "response": {"acked": 1}}));
    let acked: Vec<(String, bool)> =
        sqlx::query_as("SELECT user_id, acked_at IS NOT NULL FROM events ORDER BY user_id")
            .fetch_all(app.store.pool())
            .await
            .unwrap();
    assert_eq!(acked, vec![("43".into(), true), ("44".into(), false)]);
    // The producer sees pushed vs shown on its event, once the worker has recorded the delivery
    // (the client can ack a push before its outcome is written).
    app.wait_all_delivered().await;
    let read = |id: String| {
        let request = app
            .http
            .get(app.url(&format!("/api/v1/events/{id}")))
            .bearer_auth(&app.api_key)
            .send();
        async move { request.await.unwrap().json::<Value>().await.unwrap() }
    };
    let shown = read(id.clone()).await;
    assert!(
        shown["delivered_at"].is_string() && shown["acked_at"].is_string(),
        "{shown}"
    );
    let unshown = read(other_id.clone()).await;
    assert!(unshown["acked_at"].is_null(), "{unshown}");
    client
        .send(json!(["1", "a2", "user:43", "ack", {"ids": "nope"}]))
        .await;
    assert_eq!(client.recv().await[4]["status"], "error");
}

#[tokio::test]
async fn retention_prunes_delivered_events_and_a_join_from_before_it_is_told() {
    let app = spawn_app().await;
    let events: Vec<Value> = (1..=10)
        .map(|n| json!({"user_id": "45", "data": {"n": n}}))
        .collect();
    app.post_batch(Value::Array(events)).await;
    app.wait_all_delivered().await;
    // Keep the newest 4 per user.
    let pruned = app.store.prune_events(0, 4, 1000).await.unwrap();
    assert_eq!(pruned, 6);
    let mut client = app.connect("45").await;
    let reply = client.join("user:45", json!({"last_seq": 2})).await;
    assert_eq!(
        reply[4]["response"],
        json!({"last_seq": 10, "missed": true})
    );
    let seqs: Vec<i64> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(client.recv_push().await[4]["seq"].as_i64().unwrap());
        }
        v
    };
    assert_eq!(seqs, vec![7, 8, 9, 10], "what retention kept, in order");
    // A client that is up to date has missed nothing.
    let mut fresh = app.connect("45").await;
    let reply = fresh.join("user:45", json!({"last_seq": 10})).await;
    assert_eq!(
        reply[4]["response"],
        json!({"last_seq": 10, "missed": false})
    );
}

#[tokio::test]
async fn a_join_is_told_it_missed_events_pruned_after_its_last_seq_behind_a_kept_failed_one() {
    // Seq 1 fails for good, and retention keeps failed events: the oldest seq stored stays 1, so
    // only what retention records of its own deletes can tell that 2..=4 are gone.
    let app = spawn_app_with(|s| s.faults.fail_events = vec!["poison".into()]).await;
    let poison = app
        .enqueue(json!({"user_id": "46", "event": "poison"}))
        .await;
    app.wait_status(&poison, "failed").await;
    for n in 2..=6 {
        app.post_event(json!({"user_id": "46", "data": {"n": n}}))
            .await;
    }
    crate::common::wait_until("five delivered", crate::common::PATIENCE, || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE status = 'delivered'")
            .fetch_one(app.store.pool())
            .await
            .ok()?;
        (n == 5).then_some(())
    })
    .await;
    // Keep the newest 2 delivered: 2, 3 and 4 go; the failed 1 stays.
    assert_eq!(app.store.prune_events(0, 2, 1000).await.unwrap(), 3);

    let mut client = app.connect("46").await;
    let reply = client.join("user:46", json!({"last_seq": 1})).await;
    assert_eq!(reply[4]["response"], json!({"last_seq": 6, "missed": true}));
    assert_eq!(seqs_until(&mut client, 6).await, vec![5, 6]);
    // A client that had seen 4 missed nothing.
    let mut fresh = app.connect("46").await;
    let reply = fresh.join("user:46", json!({"last_seq": 4})).await;
    assert_eq!(
        reply[4]["response"],
        json!({"last_seq": 6, "missed": false})
    );
}

/// A connection's catch-ups draw on a budget: a client rejoining with `last_seq: 0` over and over
/// gets a minute's worth of history, then its channel is closed with `phx_error` (cause
/// `throttled`, with the last seq it got) instead of making the node re-read the user's history
/// without end; the rejoin from that seq goes on once the budget has refilled.
#[tokio::test]
async fn repeated_catch_ups_on_one_connection_are_bounded_by_its_budget() {
    let app = spawn_app_with(|s| {
        s.socket.max_gap_fill = 10;
        s.socket.max_catch_up_per_minute = 50;
    })
    .await;
    let events: Vec<Value> = (1..=40)
        .map(|n| json!({"user_id": "44", "data": {"n": n}}))
        .collect();
    assert_eq!(app.post_batch(Value::Array(events)).await.status(), 202);
    app.wait_all_delivered().await;
    let mut client = app.connect("44").await;
    // The first catch-up fits the budget whole.
    client.join("user:44", json!({"last_seq": 0})).await;
    assert_eq!(
        seqs_until(&mut client, 40).await,
        (1..=40).collect::<Vec<i64>>()
    );
    // The second has 10 events of budget left: it pushes those, then stops short of the rest.
    client.join("user:44", json!({"last_seq": 0})).await;
    let mut seqs = Vec::new();
    let error = loop {
        let frame = client.recv().await;
        match frame[3].as_str() {
            Some("phx_error") => break frame,
            Some("phx_close" | "phx_reply") => continue,
            _ => seqs.push(frame[4]["seq"].as_i64().unwrap()),
        }
    };
    // About 10 (the budget refills by under one event a second meanwhile).
    let got = seqs.len() as i64;
    assert!((10..40).contains(&got), "{got} events pushed");
    assert_eq!(seqs, (1..=got).collect::<Vec<i64>>(), "in order, no hole");
    assert_eq!(
        error[4],
        json!({"reason": "gap_unfilled", "cause": "throttled", "last_seq": got})
    );
}

#[tokio::test]
async fn joins_racing_each_other_each_read_their_own_users_seqs() {
    // Joins waiting at one moment read their users' seqs in one statement: each must still hear
    // its own user's, or it would drop that user's next events (or push another's as history).
    let app = spawn_app().await;
    let users = 40;
    let events: Vec<Value> = (1..=users)
        .flat_map(|u| (0..u).map(move |n| json!({"user_id": format!("r{u}"), "data": {"n": n}})))
        .collect();
    assert_eq!(app.post_batch(Value::Array(events)).await.status(), 202);
    let bounds = app
        .store
        .user_seq_bounds(&["r3", "nobody", "r1", "r3"])
        .await
        .expect("read");
    let last: Vec<Option<i64>> = bounds.iter().map(|b| b.last_seq).collect();
    assert_eq!(last, [Some(3), None, Some(1), Some(3)]);
    assert!(bounds.iter().all(|b| b.pruned_through.is_none()));

    let joins = (1..=users).map(|u| {
        let app = &app;
        async move {
            let user = format!("r{u}");
            let mut client = app.connect(&user).await;
            let reply = client.join(&format!("user:{user}"), json!({})).await;
            (u, reply[4].clone())
        }
    });
    for (u, reply) in futures_util::future::join_all(joins).await {
        assert_eq!(reply["status"], "ok", "r{u}: {reply}");
        assert_eq!(
            reply["response"],
            json!({"last_seq": u, "missed": false}),
            "r{u}"
        );
    }
}
