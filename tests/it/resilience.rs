//! Nothing answered 2xx is lost: not while RabbitMQ is unreachable, not across a graceful shutdown.

use crate::common::{
    PATIENCE, TcpProxy, amqp_url, spawn_app, spawn_node, spawn_unready, wait_until,
};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::Duration;

#[tokio::test]
async fn the_api_accepts_while_rabbitmq_is_unreachable_and_delivers_when_it_returns() {
    let (proxy, via_proxy) = TcpProxy::in_front_of(&amqp_url()).await;
    let app = spawn_unready(move |s| {
        s.queue.amqp_url = via_proxy;
    })
    .await;
    app.wait_ready().await;
    let mut client = app.connect_joined("11").await;
    app.post_event(json!({"user_id": "11", "data": {"n": 0}}))
        .await;
    assert_eq!(client.recv_push().await[4]["data"]["n"], 0);

    proxy.cut();
    wait_until("readyz reports RabbitMQ down", PATIENCE, || async {
        let r = app.http.get(app.url("/readyz")).send().await.ok()?;
        (r.status() == 503).then_some(())
    })
    .await;
    for n in 1..=20 {
        let r = app
            .post_event(json!({"user_id": "11", "data": {"n": n}}))
            .await;
        assert_eq!(
            r.status(),
            202,
            "the API keeps accepting while the broker is unreachable"
        );
    }
    let accepted: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE status = 'accepted'")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(accepted, 20, "held in the outbox");

    proxy.restore();
    for n in 1..=20 {
        let push = client.recv_push().await;
        assert_eq!(push[4]["data"]["n"], n, "the backlog drains in order");
    }
    app.wait_all_delivered().await;
}

#[tokio::test]
async fn graceful_shutdown_mid_stream_loses_nothing() {
    let app = spawn_app().await;
    let mut client = app.connect_joined("12").await;
    // Stream events from a concurrent producer while the node shuts down under it.
    let http = app.http.clone();
    let url = app.url("/api/v1/events");
    let key = app.api_key.clone();
    let producer = tokio::spawn(async move {
        let mut accepted = Vec::new();
        for n in 0..100_000 {
            let sent = http
                .post(&url)
                .bearer_auth(&key)
                .json(&json!({"user_id": "12", "data": {"n": n}}))
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    let body: Value = r.json().await.unwrap();
                    accepted.push(body["id"].as_str().unwrap().to_owned());
                }
                _ => break, // the node stopped taking requests
            }
        }
        accepted
    });
    // Let the stream get going, and the client see part of it.
    for _ in 0..20 {
        client.recv_push().await;
    }
    let mut app = app;
    app.stop().await;
    assert_eq!(
        client.closed().await,
        Some(1012),
        "sockets are told to reconnect elsewhere"
    );
    let accepted = tokio::time::timeout(PATIENCE, producer)
        .await
        .unwrap()
        .unwrap();
    assert!(accepted.len() >= 20, "the stream was running");

    // Every 2xx is committed...
    let ids: Vec<uuid::Uuid> = accepted.iter().map(|id| id.parse().unwrap()).collect();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE id = ANY($1)")
        .bind(&ids)
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(
        stored as usize,
        accepted.len(),
        "every accepted event is in PostgreSQL"
    );

    // ...and after a restart every one of them ends delivered (none stuck accepted or published).
    let app = app.restart().await;
    wait_until(
        "every accepted event delivered",
        Duration::from_secs(30),
        || async {
            let delivered: Vec<uuid::Uuid> = sqlx::query_scalar(
                "SELECT id FROM events WHERE id = ANY($1) AND status = 'delivered'",
            )
            .bind(&ids)
            .fetch_all(app.store.pool())
            .await
            .ok()?;
            let delivered: HashSet<_> = delivered.into_iter().collect();
            (delivered.len() == ids.len()).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_restarted_node_delivers_what_was_left_unpublished() {
    // Events accepted while the broker is unreachable and the node then stops: the next node's
    // relay publishes them.
    let (proxy, via_proxy) = TcpProxy::in_front_of(&amqp_url()).await;
    let mut app = spawn_unready(move |s| {
        s.queue.amqp_url = via_proxy;
    })
    .await;
    app.wait_ready().await;
    proxy.cut();
    wait_until("publisher disconnected", PATIENCE, || async {
        let r = app.http.get(app.url("/readyz")).send().await.ok()?;
        (r.status() == 503).then_some(())
    })
    .await;
    for n in 0..5 {
        assert_eq!(
            app.post_event(json!({"user_id": "13", "data": {"n": n}}))
                .await
                .status(),
            202
        );
    }
    app.stop().await;
    proxy.restore();
    let app = app.restart().await;
    app.wait_all_delivered().await;
}

#[tokio::test]
async fn an_api_node_stays_ready_and_accepting_while_the_broker_is_down_and_a_worker_does_not() {
    let (proxy, via_proxy) = TcpProxy::in_front_of(&amqp_url()).await;
    let api = spawn_unready(move |s| {
        s.queue.amqp_url = via_proxy;
        s.pubsub.mode = herald::config::PubSubMode::Cluster;
        s.node.roles = "api".parse().unwrap();
        s.node.name = "api-only".into();
    })
    .await;
    api.wait_ready().await;
    api.wait_link("publisher", "ok").await;
    // Same deployment, same broker address (through the proxy).
    let worker = spawn_node(&api, "worker", "worker-only", |_| {}).await;

    proxy.cut();
    let (_, body) = wait_until("the worker node unready", PATIENCE, || async {
        let (status, body) = worker.readyz().await;
        (status == 503).then_some((status, body))
    })
    .await;
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["unavailable"], json!(["rabbitmq.consumer"]), "{body}");
    assert_eq!(
        body["dependencies"]["rabbitmq.consumer"],
        json!({"state": "unavailable", "required_by": ["worker"]})
    );
    assert_eq!(body["dependencies"]["postgres"]["state"], "ok");

    // The api node has noticed the broker is gone, and stays ready: it accepts into the outbox.
    api.wait_link("publisher", "unavailable").await;
    let (status, body) = api.readyz().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["unavailable"], json!([]));
    assert_eq!(body["degraded"], json!(["rabbitmq.publisher"]));
    assert_eq!(
        body["dependencies"]["postgres"],
        json!({"state": "ok", "required_by": ["api"]})
    );
    let r = api.post_event(json!({"user_id": "r1"})).await;
    assert_eq!(r.status(), 202);

    proxy.restore();
    worker.wait_ready().await;
    api.wait_all_delivered().await;
}

#[tokio::test]
async fn every_connection_moves_to_the_next_broker_node_when_its_node_fails() {
    // Two "nodes": two proxies in front of the shared broker; the first one is then cut for good.
    let (first, via_first) = TcpProxy::in_front_of(&amqp_url()).await;
    let (second, _) = TcpProxy::in_front_of(&amqp_url()).await;
    let (a, b) = (first.addr.to_string(), second.addr.to_string());
    let list = format!("{},{b}", via_first.expose());
    let app = spawn_unready(move |s| {
        s.queue.amqp_url = herald::config::Secret::new(list);
    })
    .await;
    app.wait_ready().await;
    let nodes = |app: &crate::common::TestApp| {
        let (http, url) = (app.http.clone(), app.url("/readyz"));
        async move {
            let r = http.get(url).send().await.ok()?;
            let ok = r.status() == 200;
            let body: Value = r.json().await.ok()?;
            ok.then(|| body["rabbitmq_nodes"].clone())
        }
    };
    let on_first = nodes(&app).await.expect("ready");
    assert_eq!(
        on_first,
        json!({"publisher": a, "consumer": a}),
        "the list's first node first"
    );
    let mut client = app.connect_joined("21").await;
    app.post_event(json!({"user_id": "21", "data": {"n": 0}}))
        .await;
    assert_eq!(client.recv_push().await[4]["data"]["n"], 0);

    first.cut();
    wait_until("every connection on the second node", PATIENCE, || async {
        let now = nodes(&app).await?;
        (now == json!({"publisher": b, "consumer": b})).then_some(())
    })
    .await;
    for n in 1..=20 {
        let r = app
            .post_event(json!({"user_id": "21", "data": {"n": n}}))
            .await;
        assert_eq!(r.status(), 202);
    }
    for n in 1..=20 {
        assert_eq!(
            client.recv_push().await[4]["data"]["n"],
            n,
            "in order, through the second node"
        );
    }
    app.wait_all_delivered().await;
}

/// A message whose channel closed under it is reported unsettled (lapin declines the ack of a
/// closed channel with `Ok(false)`, which is not an ack), the call returns at once rather than
/// waiting, and the broker has the message back for the next consumer: nothing is lost.
#[tokio::test]
async fn a_settle_on_a_closed_channel_is_reported_and_the_message_comes_back() {
    use futures_util::StreamExt;
    use herald::queue::{Settlement, Unsettled, settle};
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
    let settings = crate::common::test_settings().queue;
    let connection = herald::queue::connect(&settings, "test-settle")
        .await
        .expect("broker");
    let queue = format!("{}_settle", settings.prefix);
    let channel = herald::queue::open_channel(&connection).await.unwrap();
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"one",
            Default::default(),
        )
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "settle-test".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(PATIENCE, consumer.next())
        .await
        .expect("a delivery in time")
        .expect("the consumer runs")
        .expect("a delivery");
    channel.close(200, "test".into()).await.unwrap();

    let limit = Duration::from_secs(30);
    let started = tokio::time::Instant::now();
    let settled = settle(&delivery, Settlement::Ack, limit).await;
    assert!(
        matches!(settled, Err(Unsettled::Unusable | Unsettled::Lost(_))),
        "an ack on a closed channel is no ack: {settled:?}"
    );
    assert!(started.elapsed() < limit, "reported, not waited out");

    let probe = herald::queue::open_channel(&connection).await.unwrap();
    let back = probe
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(back.message_count(), 1, "the broker has the message back");
    probe
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .unwrap();
}

/// A broker that stops answering mid-session (its connection open, every byte held) makes each
/// topology declaration give up after `queue.confirm_timeout_ms` with an error naming it, so a
/// worker or publisher reconnecting through it goes back to its backoff instead of waiting forever.
#[tokio::test]
async fn a_declaration_on_a_silent_broker_gives_up_in_time() {
    let (proxy, via_proxy) = TcpProxy::in_front_of(&amqp_url()).await;
    let mut settings = crate::common::test_settings().queue;
    settings.amqp_url = via_proxy;
    settings.confirm_timeout_ms = 500;
    let connection = herald::queue::connect(&settings, "test-silent")
        .await
        .expect("broker");
    let channel = herald::queue::open_channel(&connection).await.unwrap();
    proxy.stall();
    let declared = tokio::time::timeout(
        PATIENCE,
        herald::queue::declare_topology(&channel, &settings),
    )
    .await
    .expect("the declaration gives up by itself, well within the test's patience");
    let error = declared.expect_err("nothing answered");
    assert!(
        matches!(error, herald::queue::Error::NoAnswer(ref what) if what.starts_with("declare ")),
        "{error:?}"
    );
    proxy.resume();
    let _ = herald::queue::delete_topology(&settings).await;
}

#[tokio::test]
async fn postgresql_ending_a_commits_session_is_a_503_to_retry_and_the_retry_stores_it_once() {
    // A PostgreSQL restart or failover ends every session (`terminating connection due to
    // administrator command`, SQLSTATE 57P01): a request whose commit was in flight must hear
    // "unavailable, retry later", as for a cut link, not an internal error.
    interrupt_a_commit_in_flight("pg_terminate_backend").await;
}

#[tokio::test]
async fn postgresql_cancelling_a_commit_is_a_503_to_retry_and_the_retry_stores_it_once() {
    // A statement past its `statement_timeout`, or cancelled by an administrator, fails with
    // `canceling statement` (SQLSTATE 57014) on a session that stays up; a deadlock or a lock
    // timeout fails it the same way (40P01, 55P03). Nothing was stored and the retry may well
    // succeed: the answer is "retry later" (503), not an internal error (500).
    interrupt_a_commit_in_flight("pg_cancel_backend").await;
}

/// Posts an event whose commit waits on its user's counter row, held by the test, interrupts the
/// commit with `interrupt` (a PostgreSQL function of a backend's pid), and checks the answer is a
/// 503 to retry and that the retry, with the same idempotency key, stores the event once.
async fn interrupt_a_commit_in_flight(interrupt: &str) {
    let app = spawn_app().await;
    let first = app
        .post_event(json!({"user_id": "57", "data": {"n": 1}}))
        .await;
    assert_eq!(first.status(), 202);
    // Hold the user's counter row, so the next commit of the user waits on it, in flight.
    let mut holder = app.store.pool().begin().await.unwrap();
    sqlx::query("SELECT last_seq FROM user_seqs WHERE user_id = '57' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let request = app
        .http
        .post(app.url("/api/v1/events"))
        .bearer_auth(&app.api_key)
        .header("Idempotency-Key", "during-restart")
        .json(&json!({"user_id": "57", "data": {"n": 2}}));
    let posting = tokio::spawn(request.try_clone().unwrap().send());
    let waiting = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
                   AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO user_seqs%'";
    wait_until("the commit waits on the counter row", PATIENCE, || async {
        let pids: Vec<i32> = sqlx::query_scalar(waiting)
            .fetch_all(app.store.pool())
            .await
            .ok()?;
        (!pids.is_empty()).then_some(())
    })
    .await;
    let ended: Vec<bool> =
        sqlx::query_scalar(&format!("SELECT {interrupt}(pid) FROM ({waiting}) w"))
            .fetch_all(&mut *holder)
            .await
            .unwrap();
    assert_eq!(ended, [true]);
    let answer = posting.await.unwrap().unwrap();
    let status = answer.status();
    let retry_after = answer.headers().get("retry-after").is_some();
    let body: Value = answer.json().await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(retry_after, "a 503 says when to retry: {body}");
    holder.rollback().await.unwrap();

    let retried = request.send().await.unwrap();
    assert_eq!(retried.status(), 202);
    let body: Value = retried.json().await.unwrap();
    assert_eq!(body["seq"], 2, "{body}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE user_id = '57'")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(stored, 2);
}
