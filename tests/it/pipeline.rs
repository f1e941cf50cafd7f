//! The seed's pipeline tests: events reach the right user's channel, in order, and are measured.

use crate::common::{
    PATIENCE, StatsdListener, TcpProxy, TestApp, amqp_url, new_event, spawn_app, spawn_app_with,
    spawn_unready, wait_until,
};
use herald::store::MessageLimits;
use serde_json::{Value, json};
use std::collections::HashMap;

#[tokio::test]
async fn ten_events_arrive_in_order_as_push_timed() {
    let app = spawn_app().await;
    let mut client = app.connect_joined("1").await;
    let join_ref = "1";
    // Enqueued back to back: each request starts when the previous 202 arrives, none waits for delivery.
    for n in 1..=10 {
        let r = app
            .post_event(json!({"user_id": "1", "event": "push_timed", "data": {"n": n}}))
            .await;
        assert_eq!(r.status(), 202);
    }
    let mut seqs = Vec::new();
    for n in 1..=10 {
        let push = client.recv_push().await;
        assert_eq!(
            push[0], join_ref,
            "pushed in the channel form, with the join ref"
        );
        assert_eq!(push[1], Value::Null);
        assert_eq!(push[2], "user:1");
        assert_eq!(push[3], "push_timed");
        let payload = &push[4];
        assert_eq!(
            payload["data"]["n"], n,
            "events arrive in enqueue order: {push}"
        );
        assert!(payload["id"].is_string() && payload["at"].is_i64());
        seqs.push(payload["seq"].as_i64().unwrap());
    }
    assert_eq!(
        seqs,
        (1..=10).collect::<Vec<i64>>(),
        "per-user seq is gap-free"
    );
}

#[tokio::test]
async fn a_batch_is_delivered_in_order() {
    let app = spawn_app().await;
    let mut client = app.connect_joined("5").await;
    let events: Vec<Value> = (1..=50)
        .map(|n| json!({"user_id": 5, "data": {"n": n}}))
        .collect();
    let r = app.post_batch(Value::Array(events)).await;
    assert_eq!(r.status(), 202);
    for n in 1..=50 {
        let push = client.recv_push().await;
        assert_eq!(push[3], "push", "event defaults to push");
        assert_eq!(push[4]["data"]["n"], n);
    }
}

#[tokio::test]
async fn an_event_for_user_1_never_reaches_user_2() {
    let app = spawn_app().await;
    let mut user1 = app.connect_joined("1").await;
    let mut user2 = app.connect_joined("2").await;
    for n in 1..=5 {
        app.post_event(json!({"user_id": "1", "data": {"n": n}}))
            .await;
    }
    for _ in 1..=5 {
        assert_eq!(user1.recv_push().await[2], "user:1");
    }
    // User 1's events were broadcast by now, so a copy to user 2 would come before this.
    app.post_sentinel("2").await;
    user2.expect_sentinel().await;
}

#[tokio::test]
async fn a_delivered_event_is_measured_in_statsd() {
    let statsd = StatsdListener::bind().await;
    let app = spawn_app_with(|s| s.metrics.statsd_addr = statsd.addr.to_string()).await;
    let mut client = app.connect_joined("3").await;
    app.post_event(json!({"user_id": "3", "event": "push_timed", "data": {}}))
        .await;
    client.recv_push().await;
    let line = statsd.expect_line("pipeline.push_delivered:").await;
    // name:value|h|#tags, the tags naming the node and its roles.
    let (metric, tags) = line.split_once("|#").expect("tagged");
    assert!(metric.ends_with("|h"), "a histogram in ms: {line}");
    assert!(
        tags.contains("node:") && tags.contains("roles:api+worker+socket"),
        "{line}"
    );
    let ms: u64 = metric["pipeline.push_delivered:".len()..metric.len() - 2]
        .parse()
        .expect("an integer latency");
    assert!(ms < 60_000, "a plausible latency: {line}");
}

#[tokio::test]
async fn delivered_events_are_recorded_with_their_socket_count() {
    let app = spawn_app().await;
    let mut client = app.connect_joined("8").await;
    let online = app.post_event(json!({"user_id": "8"})).await;
    let online: Value = online.json().await.unwrap();
    client.recv_push().await;
    let offline = app.post_event(json!({"user_id": "nobody"})).await;
    let offline: Value = offline.json().await.unwrap();
    for (body, sockets) in [(&online, 1), (&offline, 0)] {
        let id = uuid::Uuid::parse_str(body["id"].as_str().unwrap()).unwrap();
        let row: (String, Option<i32>) =
            crate::common::wait_until("delivered status", crate::common::PATIENCE, || async {
                let row: (String, Option<i32>) =
                    sqlx::query_as("SELECT status, push_count FROM events WHERE id = $1")
                        .bind(id)
                        .fetch_one(app.store.pool())
                        .await
                        .ok()?;
                (row.0 == "delivered").then_some(row)
            })
            .await;
        assert_eq!(
            row.1,
            Some(sockets),
            "nobody online is delivered to 0 sockets, not failed"
        );
    }
}

#[tokio::test]
async fn a_late_event_is_filled_in_before_a_later_one() {
    // A long relay grace keeps the relay out of the way: the gap can only be filled by the socket.
    let app = spawn_app_with(|s| {
        s.pipeline.relay_grace_ms = 600_000;
        s.pipeline.sweep_after_ms = 1_200_000; // beyond the grace, as validation asks
    })
    .await;
    let mut client = app.connect_joined("9").await;
    app.post_event(json!({"user_id": "9", "data": {"n": 1}}))
        .await;
    assert_eq!(client.recv_push().await[4]["seq"], 1);
    // Seq 2 is committed but never published (as if its publish had failed).
    app.commit_unpublished("9", r#"{"n":2}"#).await;
    app.post_event(json!({"user_id": "9", "data": {"n": 3}}))
        .await;
    let second = client.recv_push().await;
    let third = client.recv_push().await;
    assert_eq!(
        (second[4]["seq"].as_i64(), second[4]["data"]["n"].as_i64()),
        (Some(2), Some(2))
    );
    assert_eq!(
        (third[4]["seq"].as_i64(), third[4]["data"]["n"].as_i64()),
        (Some(3), Some(3))
    );
}

fn limits(app: &crate::common::TestApp) -> MessageLimits {
    app.settings.message_limits()
}

/// A broker confirm deletes its message's outbox row and never touches an event row, so it can
/// neither wait on nor deadlock with the outcome writer (an earlier design's per-event `published`
/// UPDATE did both, and under a burst ran into the statement timeout).
#[tokio::test]
async fn a_confirm_never_waits_on_event_rows() {
    let app = spawn_app_with(|s| {
        s.pipeline.relay_grace_ms = 600_000;
        s.pipeline.sweep_after_ms = 1_200_000; // beyond the grace, as validation asks
    })
    .await;
    let event = new_event(&app, "held", "{}").await;
    let id = event.id;
    let committed = app
        .store
        .insert_events(&[event], app.settings.queue.partitions, limits(&app))
        .await
        .unwrap();
    assert_eq!(committed.messages.len(), 1, "one message for one event");
    let mut holder = app.store.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM events WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *holder)
        .await
        .unwrap();
    let confirmed = tokio::time::timeout(
        crate::common::PATIENCE,
        app.store.confirm_messages(&[committed.messages[0].id]),
    )
    .await
    .expect("returns while the event row is held")
    .unwrap();
    assert_eq!(confirmed, 1, "the outbox row is gone");
    holder.rollback().await.unwrap();
}

/// The confirm recorder never waits on an outbox row another statement holds (a worker's settle
/// deleting the same message's row, here held open): it confirms the rest and passes that one.
/// Waiting, it and the settle locked their rows in different orders and deadlocked, a second of
/// stall for both each time (seen in the soak).
#[tokio::test]
async fn a_confirm_never_waits_on_an_outbox_row_being_settled() {
    let app = spawn_app_with(|s| {
        s.pipeline.relay_grace_ms = 600_000;
        s.pipeline.sweep_after_ms = 1_200_000; // beyond the grace, as validation asks
    })
    .await;
    // Two users of different partitions: one message each.
    let partitions = app.settings.queue.partitions;
    let other = (0..)
        .map(|n| format!("confirmed{n}"))
        .find(|u| {
            herald::event::partition_of(u, partitions)
                != herald::event::partition_of("settled", partitions)
        })
        .unwrap();
    let events = vec![
        new_event(&app, "settled", "{}").await,
        new_event(&app, &other, "{}").await,
    ];
    let committed = app
        .store
        .insert_events(&events, app.settings.queue.partitions, limits(&app))
        .await
        .unwrap();
    let ids: Vec<uuid::Uuid> = committed.messages.iter().map(|m| m.id).collect();
    assert_eq!(
        ids.len(),
        2,
        "one message per user (their partitions differ)"
    );
    let mut settle = app.store.pool().begin().await.unwrap();
    sqlx::query("DELETE FROM outbox WHERE id = $1")
        .bind(ids[0])
        .execute(&mut *settle)
        .await
        .unwrap();
    let confirmed = tokio::time::timeout(crate::common::PATIENCE, app.store.confirm_messages(&ids))
        .await
        .expect("returns while the settle holds its row")
        .unwrap();
    assert_eq!(confirmed, 1, "the free row confirmed, the held one passed");
    settle.commit().await.unwrap();
    let unconfirmed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE confirmed_at IS NULL")
            .fetch_one(app.store.pool())
            .await
            .unwrap();
    assert_eq!(unconfirmed, 0, "nothing left for the relay");
}

/// Every message of a delivered stream was confirmed: the outbox ends empty, and the relay had
/// nothing to send again.
#[tokio::test]
async fn confirmed_messages_leave_the_outbox_empty() {
    let app = spawn_app().await;
    let mut client = app.connect_joined("ob").await;
    let events: Vec<Value> = (1..=50)
        .map(|n| json!({"user_id": if n % 2 == 0 { "ob" } else { "other" }, "data": {"n": n}}))
        .collect();
    assert_eq!(app.post_batch(json!(events)).await.status(), 202);
    for seq in 1..=25 {
        assert_eq!(client.recv_push().await[4]["seq"], seq);
    }
    app.wait_all_delivered().await;
    crate::common::wait_until("an empty outbox", crate::common::PATIENCE, || async {
        let (messages, _) = app.store.outbox_depth().await.ok()?;
        (messages == 0).then_some(())
    })
    .await;
    // And once the worker settled the messages, no row is left in flight at all.
    crate::common::wait_until("no message in flight", crate::common::PATIENCE, || async {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(app.store.pool())
            .await
            .ok()?;
        (rows == 0).then_some(())
    })
    .await;
}

/// A message the commit path builds late (the publish buffer was full, so it waited for room for
/// the messages before it) must still be published by a deadline counted from before its outbox
/// row was written, so that its publish and confirm end before the relay may claim the row. Here
/// the broker is slow (the AMQP link stalled: with one confirm in flight, the publisher takes a
/// message from its buffer only when the previous one's confirm times out), the relay claims the
/// rows after their grace, and then the link comes back (cut, so what was sent into the stall is
/// lost, and reconnected). No commit-path message still in the buffer may be published then: each
/// event must reach its partition queue once, in the relay's message.
#[tokio::test]
async fn a_message_built_late_is_never_published_once_the_relay_may_claim_it() {
    let (proxy, via_proxy) = TcpProxy::in_front_of(&amqp_url()).await;
    let app = spawn_unready(move |s| {
        s.queue.amqp_url = via_proxy;
        // No worker: the partition queues keep every copy that reaches them.
        s.node.roles = "api".parse().unwrap();
        s.pubsub.mode = herald::config::PubSubMode::Cluster;
        s.queue.message_max_events = 1;
        s.queue.publish_buffer = 24;
        s.queue.max_inflight_confirms = 1;
        s.queue.confirm_timeout_ms = 500;
        // A publish window of 10 s - 0.5 s - 1 s = 8.5 s, of which a commit waits up to half for
        // room: the commit's later messages are built up to 4.25 s after their rows.
        s.pipeline.relay_grace_ms = 10_000;
    })
    .await;
    app.wait_ready().await;
    app.wait_link("publisher", "ok").await;
    proxy.stall();

    // One commit, a message per event: the first is sent into the stall, 24 fill the buffer, and
    // each later one enters as a stalled confirm times out (every 0.5 s), built after waiting for
    // the one before, until the commit's half window is up; the rest stay in the outbox.
    let total = 40;
    let events: Vec<Value> = (1..=total)
        .map(|n| json!({"user_id": "late", "data": {"n": n}}))
        .collect();
    assert_eq!(app.post_batch(Value::Array(events)).await.status(), 202);
    wait_until("the relay claimed every row", PATIENCE, || async {
        let claimed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE relayed_at IS NOT NULL")
                .fetch_one(app.store.pool())
                .await
                .ok()?;
        (claimed == total).then_some(())
    })
    .await;
    proxy.cut();
    app.wait_link("publisher", "unavailable").await;
    proxy.resume();
    proxy.restore();
    wait_until("every message confirmed", PATIENCE, || async {
        let (messages, _) = app.store.outbox_depth().await.ok()?;
        (messages == 0).then_some(())
    })
    .await;

    let copies = copies_per_event(&app).await;
    assert_eq!(copies.len() as i64, total, "every event reached its queue");
    let twice: Vec<_> = copies.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "published by the commit path after the relay claimed them: {twice:?}"
    );
}

/// How many times each event id stands in the messages of the node's partition queues (taken off
/// the queues by a consumer: single-active-consumer queues refuse `basic.get`).
async fn copies_per_event(app: &TestApp) -> HashMap<String, usize> {
    use futures_util::StreamExt;
    let mut settings = app.settings.queue.clone();
    settings.amqp_url = herald::config::Secret::new(amqp_url());
    let connection = herald::queue::connect(&settings, "test-probe")
        .await
        .expect("broker");
    let channel = herald::queue::open_channel(&connection).await.unwrap();
    let names = herald::queue::Topology::new(&settings.prefix, settings.partitions);
    let mut copies = HashMap::new();
    for partition in 0..settings.partitions {
        let queue = names.partition_queue(partition);
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .expect("the partition queue exists");
        if declared.message_count() == 0 {
            continue;
        }
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                format!("probe-{partition}").as_str().into(),
                lapin::options::BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .expect("consuming");
        for _ in 0..declared.message_count() {
            let delivery = tokio::time::timeout(PATIENCE, consumer.next())
                .await
                .expect("a message in time")
                .expect("the consumer runs")
                .expect("a delivery");
            let envelopes: Vec<Value> =
                serde_json::from_slice(&delivery.data).expect("a JSON array");
            for envelope in envelopes {
                let id = envelope["id"].as_str().expect("an id").to_owned();
                *copies.entry(id).or_insert(0) += 1;
            }
        }
    }
    let _ = connection.close(200, "probe done".into()).await;
    copies
}
