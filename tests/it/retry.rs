//! Failed deliveries: retried through RabbitMQ delay queues on the schedule, then failed and
//! dead-lettered; replayed by the operator; and never holding up anyone else's events, nor the
//! order a user sees. Faults come from the test fault injector (`faults.fail_events`).

use crate::common::{PATIENCE, StatsdListener, spawn_app_with, wait_until};
use serde_json::json;

/// The attempts of an event as (outcome, error, ms since the previous attempt ended).
async fn attempts(app: &crate::common::TestApp, id: &str) -> Vec<(String, Option<String>, i64)> {
    let rows: Vec<(String, Option<String>, Option<i64>)> = sqlx::query_as(
        "SELECT outcome, error,
                (extract(epoch FROM started_at - lag(finished_at) OVER (ORDER BY attempt)) * 1000)::int8
         FROM delivery_attempts WHERE event_id = $1 ORDER BY attempt",
    )
    .bind(uuid::Uuid::parse_str(id).unwrap())
    .fetch_all(app.store.pool())
    .await
    .unwrap();
    rows.into_iter()
        .map(|(o, e, gap)| (o, e, gap.unwrap_or(0)))
        .collect()
}

#[tokio::test]
async fn a_failing_event_is_retried_on_schedule_then_failed_and_dead_lettered() {
    let statsd = StatsdListener::bind().await;
    let app = spawn_app_with(|s| {
        s.faults.fail_events = vec!["poison".into()];
        s.retry.schedule_ms = vec![150, 300];
        s.retry.max_attempts = 4;
        s.retry.jitter = 0.1;
        s.metrics.statsd_addr = statsd.addr.to_string();
    })
    .await;
    let id = app
        .enqueue(json!({"user_id": "1", "event": "poison", "data": {"n": 1}}))
        .await;
    let (count, last_error) = app.wait_status(&id, "failed").await;
    assert_eq!(count, 4, "max_attempts attempts in all");
    assert_eq!(last_error.as_deref(), Some("injected fault for poison"));

    let log = attempts(&app, &id).await;
    println!("attempts of a poison event (outcome, ms waited before it): {log:?}");
    assert_eq!(log.len(), 4, "every attempt is recorded");
    assert!(log.iter().all(|(o, e, _)| o == "failed" && e.is_some()));
    // The delays are the schedule's, the last repeating, within the jitter (a TTL never fires early).
    for ((_, _, waited), scheduled) in log.iter().skip(1).zip([150, 300, 300]) {
        assert!(
            *waited >= scheduled * 9 / 10,
            "waited {waited} ms for a {scheduled} ms retry: {log:?}"
        );
    }
    wait_until("the message in the dead-letter queue", PATIENCE, || async {
        (app.dead_letters().await == 1).then_some(())
    })
    .await;
    let next: Option<String> =
        sqlx::query_scalar("SELECT next_attempt_at::text FROM events WHERE id = $1")
            .bind(uuid::Uuid::parse_str(&id).unwrap())
            .fetch_one(app.store.pool())
            .await
            .unwrap();
    assert_eq!(next, None, "no attempt is due after the last");
    // Tagged with the node like every metric (these two used to carry no tags at all).
    let retry = statsd.expect_line("pipeline.retry.scheduled:1|c|#").await;
    assert!(
        retry.contains("attempt:1") && retry.contains("node:") && retry.contains("roles:"),
        "{retry}"
    );
    let dead = statsd.expect_line("pipeline.dead_lettered:1|c").await;
    assert!(
        dead.contains("|#node:") && dead.contains("roles:"),
        "{dead}"
    );
}

#[tokio::test]
async fn a_retry_that_succeeds_reaches_the_client() {
    let app = spawn_app_with(|s| s.faults.fail_events = vec!["flaky:2".into()]).await;
    let mut client = app.connect_joined("2").await;
    let id = app
        .enqueue(json!({"user_id": "2", "event": "flaky", "data": {"n": 1}}))
        .await;
    let push = client.recv_push().await;
    assert_eq!(push[3], "flaky");
    assert_eq!(push[4]["id"], id.as_str());
    let (count, last_error) = app.wait_status(&id, "delivered").await;
    assert_eq!((count, last_error), (3, None));
    let outcomes: Vec<String> = attempts(&app, &id).await.into_iter().map(|a| a.0).collect();
    assert_eq!(outcomes, ["failed", "failed", "pushed"]);
    assert_eq!(app.dead_letters().await, 0);
}

#[tokio::test]
async fn a_panicking_or_hanging_attempt_is_a_failed_one() {
    let app = spawn_app_with(|s| {
        s.faults.fail_events = vec!["boom:1:panic".into(), "stuck:1:hang".into()];
        s.retry.attempt_timeout_ms = 300;
    })
    .await;
    let boom = app.enqueue(json!({"user_id": "3", "event": "boom"})).await;
    let stuck = app.enqueue(json!({"user_id": "4", "event": "stuck"})).await;
    for (id, error) in [
        (&boom, "panicked: injected panic for boom"),
        (&stuck, "timed out after 300 ms"),
    ] {
        assert_eq!(app.wait_status(id, "delivered").await.0, 2);
        let log = attempts(&app, id).await;
        assert_eq!(log[0].1.as_deref(), Some(error), "{log:?}");
        assert_eq!(log[1].0, "offline", "nobody online is not an error");
    }
}

#[tokio::test]
async fn a_retrying_event_neither_delays_others_nor_breaks_the_users_order() {
    // The poison event's first retry is far off: everything below happens while it waits.
    let app = spawn_app_with(|s| {
        s.faults.fail_events = vec!["poison".into()];
        s.retry.events.insert(
            "poison".into(),
            herald::config::EventRetrySettings {
                schedule_ms: Some(vec![600_000]),
                max_attempts: Some(2),
            },
        );
    })
    .await;
    let mut user = app.connect_joined("5").await;
    let mut other = app.connect_joined("6").await;
    app.enqueue(json!({"user_id": "5", "data": {"n": 1}})).await;
    assert_eq!(user.recv_push().await[4]["seq"], 1);

    let poison = app
        .enqueue(json!({"user_id": "5", "event": "poison", "data": {"n": 2}}))
        .await;
    let poison_uuid = uuid::Uuid::parse_str(&poison).unwrap();
    let status = wait_until("the poison event's retry scheduled", PATIENCE, || async {
        let row: (String, i32, Option<String>) = sqlx::query_as(
            "SELECT status, attempts, next_attempt_at::text FROM events WHERE id = $1",
        )
        .bind(poison_uuid)
        .fetch_one(app.store.pool())
        .await
        .ok()?;
        (row.1 == 1 && row.2.is_some()).then_some(row.0)
    })
    .await;
    assert_eq!(status, "published", "waiting for its retry");
    app.enqueue(json!({"user_id": "6", "data": {"other": true}}))
        .await;
    app.enqueue(json!({"user_id": "5", "data": {"n": 3}})).await;
    app.enqueue(json!({"user_id": "5", "data": {"n": 4}})).await;

    // Another user's event goes straight through.
    assert_eq!(other.recv_push().await[4]["data"]["other"], true);
    // The user sees 2 (filled from PostgreSQL when 3 arrived), 3, 4: in seq order, no gap.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let push = user.recv_push().await;
        seen.push((
            push[3].as_str().unwrap().to_owned(),
            push[4]["seq"].as_i64().unwrap(),
        ));
    }
    assert_eq!(
        seen,
        [
            ("poison".to_owned(), 2),
            ("push".to_owned(), 3),
            ("push".to_owned(), 4)
        ]
    );
    // ...while the poison event is still waiting for its retry, ten minutes off.
    let (status, attempts): (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM events WHERE id = $1")
            .bind(poison_uuid)
            .fetch_one(app.store.pool())
            .await
            .unwrap();
    assert_eq!((status.as_str(), attempts), ("published", 1));
    let later: Vec<String> =
        sqlx::query_scalar("SELECT status FROM events WHERE user_id = '5' AND seq > 2")
            .fetch_all(app.store.pool())
            .await
            .unwrap();
    assert!(later.iter().all(|s| s != "failed"), "{later:?}");
    app.post_sentinel("5").await;
    user.expect_sentinel().await;
}

#[tokio::test]
async fn a_failed_event_replayed_from_the_command_line_is_delivered_once() {
    // flaky:4 with 4 attempts: it fails for good, then its 5th attempt (the replay) succeeds.
    let app = spawn_app_with(|s| s.faults.fail_events = vec!["flaky:4".into()]).await;
    let mut client = app.connect_joined("7").await;
    let id = app
        .enqueue(json!({"user_id": "7", "event": "flaky", "data": {"n": 1}}))
        .await;
    app.wait_status(&id, "failed").await;
    let delivered = app.enqueue(json!({"user_id": "8"})).await;
    app.wait_status(&delivered, "delivered").await;

    let dry = herald(&app, &["replay", "--dry-run"]).await;
    assert!(dry.contains("1 events would be replayed"), "{dry}");
    let out = herald(&app, &["replay", "--event", "flaky", "--rate", "50"]).await;
    println!("herald replay: {out}");
    assert!(out.contains("replayed 1 of 1 matched events"), "{out}");
    let push = client.recv_push().await;
    assert_eq!(push[4]["id"], id.as_str());
    let (count, error) = app.wait_status(&id, "delivered").await;
    assert_eq!((count, error), (5, None));

    // Safe to repeat: nothing is failed any more, and delivered events need asking.
    let again = herald(&app, &["replay", "--event", "flaky"]).await;
    assert!(again.contains("nothing to replay"), "{again}");
    let refused = herald_status(&app, &["replay", "--status", "delivered"]).await;
    assert!(!refused.0, "delivered events need --include-delivered");
    let ids = herald(&app, &["replay", "--id", &delivered, "--dry-run"]).await;
    assert!(ids.contains("0 events would be replayed"), "{ids}");
    let explicit = herald(&app, &["replay", "--id", &delivered, "--include-delivered"]).await;
    assert!(explicit.contains("replayed 1 of 1"), "{explicit}");
    wait_until("the explicit replay delivered", PATIENCE, || async {
        let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM events WHERE id = $1")
            .bind(uuid::Uuid::parse_str(&delivered).unwrap())
            .fetch_one(app.store.pool())
            .await
            .ok()?;
        (attempts == 2).then_some(())
    })
    .await;
}

/// Runs the `herald` binary against `app`'s database and queues; returns its stdout.
async fn herald(app: &crate::common::TestApp, args: &[&str]) -> String {
    let (ok, out) = herald_status(app, args).await;
    assert!(ok, "herald {args:?} failed: {out}");
    out
}

/// Runs the `herald` binary; returns whether it succeeded and its stdout (stderr when it failed).
async fn herald_status(app: &crate::common::TestApp, args: &[&str]) -> (bool, String) {
    let output = crate::common::herald_command(&app.settings, args)
        .output()
        .await
        .expect("herald runs");
    let text = if output.status.success() {
        String::from_utf8_lossy(&output.stdout).into_owned()
    } else {
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    (output.status.success(), text)
}

#[tokio::test]
async fn a_retry_whose_confirm_times_out_is_retried_not_failed() {
    let (proxy, via_proxy) = crate::common::TcpProxy::in_front_of(&crate::common::amqp_url()).await;
    let statsd = StatsdListener::bind().await;
    let app = spawn_app_with(|s| {
        s.queue.amqp_url = via_proxy;
        // The first attempt hangs until the attempt timeout, then its retry is published.
        s.faults.fail_events = vec!["stalled:1:hang".into()];
        s.retry.attempt_timeout_ms = 3_000;
        s.queue.confirm_timeout_ms = 500;
        s.metrics.statsd_addr = statsd.addr.to_string();
    })
    .await;
    let id = app
        .enqueue(json!({"user_id": "7", "event": "stalled", "data": {}}))
        .await;
    // A worker has the message (its attempt hangs): now the broker goes silent.
    statsd.expect_line("pipeline.worker.message_events:").await;
    proxy.stall();
    // The attempt times out and the retry's confirm cannot come: the attempt is recorded as one
    // to be retried, never as the event's failure.
    wait_until("the hung attempt recorded", PATIENCE, || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM delivery_attempts WHERE event_id = $1")
                .bind(uuid::Uuid::parse_str(&id).unwrap())
                .fetch_one(app.store.pool())
                .await
                .ok()?;
        (n == 1).then_some(())
    })
    .await;
    statsd.expect_line("pipeline.retry.unconfirmed:").await;
    assert_eq!(app.status_of(&id).await.as_deref(), Some("published"));
    proxy.resume();
    app.wait_status(&id, "delivered").await;
    let failed_at: Option<String> =
        sqlx::query_scalar("SELECT failed_at::text FROM events WHERE id = $1")
            .bind(uuid::Uuid::parse_str(&id).unwrap())
            .fetch_one(app.store.pool())
            .await
            .unwrap();
    assert_eq!(failed_at, None, "never failed");
    assert_eq!(app.dead_letters().await, 0, "never dead-lettered");
}
