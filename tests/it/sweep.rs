//! The sweeper: an event no message carries any more (its message destroyed behind Herald's back
//! after the broker confirmed it) is sent again and delivered, counted in `pipeline.sweep.events`
//! and shown by the admin API; an event merely waiting behind a slow backlog is never swept.

use crate::common::{PATIENCE, StatsdListener, TestApp, spawn_app_with, spawn_node, wait_until};
use herald::config::Settings;
use serde_json::{Value, json};
use std::time::Duration;

/// Sweeps quickly: events stale after 2.5 s, partitions idle after 300 ms, a look every 200 ms.
fn quick_sweep(s: &mut Settings) {
    s.pipeline.sweep_after_ms = 2_500;
    s.pipeline.sweep_interval_ms = 200;
    s.pipeline.sweep_idle_ms = 300;
}

/// Empties `queue` behind Herald's back, as an operator's `rabbitmqctl purge_queue` would.
async fn purge(app: &TestApp, queue: &str) -> u32 {
    crate::common::purge_queue(&app.settings.queue, queue)
        .await
        .expect("queue purged")
}

/// Sum of the `pipeline.sweep.events` counts received until they reach `at_least`.
async fn swept_count(statsd: &StatsdListener, at_least: i64) -> i64 {
    let mut total = 0;
    while total < at_least {
        let line = statsd.expect_line("pipeline.sweep.events:").await;
        total += line
            .trim_start_matches("pipeline.sweep.events:")
            .split('|')
            .next()
            .and_then(|n| n.parse::<i64>().ok())
            .unwrap_or(0);
    }
    total
}

#[tokio::test]
async fn events_of_a_purged_partition_queue_are_swept_and_delivered() {
    // No worker yet: the messages are confirmed into the partition queues and wait there.
    let api = spawn_app_with(|s| {
        s.pubsub.mode = herald::config::PubSubMode::Cluster;
        s.node.roles = "api,socket".parse().unwrap();
        s.node.name = "api".into();
        quick_sweep(s);
    })
    .await;
    let mut client = api.connect_joined("1").await;
    let mut ids = Vec::new();
    for n in 1..=12 {
        let user = (n % 3).to_string();
        ids.push(
            api.enqueue(json!({"user_id": user, "data": {"n": n}}))
                .await,
        );
    }
    wait_until("every message confirmed", PATIENCE, || async {
        let (messages, _) = api.store.outbox_depth().await.ok()?;
        (messages == 0).then_some(())
    })
    .await;
    // Destroyed behind Herald's back, after the confirm: nothing carries the events any more.
    let names =
        herald::queue::Topology::new(&api.settings.queue.prefix, api.settings.queue.partitions);
    let mut purged = 0;
    for p in 0..names.partitions {
        purged += purge(&api, &names.partition_queue(p)).await;
    }
    assert!(purged > 0, "the messages were in their partition queues");

    let statsd = StatsdListener::bind().await;
    let worker = spawn_node(&api, "worker,socket", "worker", |s| {
        s.metrics.statsd_addr = statsd.addr.to_string();
    })
    .await;
    // The joined client gets its swept events, in order.
    for (seq, n) in [(1, 1), (2, 4), (3, 7), (4, 10)] {
        let push = client.recv_push().await;
        assert_eq!(
            (push[4]["seq"].clone(), push[4]["data"]["n"].clone()),
            (json!(seq), json!(n))
        );
    }
    api.wait_all_delivered().await;
    assert_eq!(
        swept_count(&statsd, 12).await,
        12,
        "pipeline.sweep.events counts them"
    );
    drop(worker);
    let admin = api.admin_key().await;
    for id in &ids {
        let (status, event) = api
            .get_json(&format!("/api/v1/admin/events/{id}"), &admin)
            .await;
        assert_eq!(status, 200);
        assert_eq!(event["status"], "delivered", "{event}");
        assert_eq!(event["sweeps"], 1, "the admin API shows the sweep: {event}");
        assert!(event["swept_at"].is_string(), "{event}");
    }
}

#[tokio::test]
async fn a_retry_destroyed_in_its_delay_queue_is_swept_and_delivered() {
    let app = spawn_app_with(|s| {
        quick_sweep(s);
        s.faults.fail_events = vec!["flaky:1".into()];
        s.retry.schedule_ms = vec![3_000];
    })
    .await;
    let id = app
        .enqueue(json!({"user_id": "5", "event": "flaky", "data": {}}))
        .await;
    app.wait_status(&id, "published").await;
    let names =
        herald::queue::Topology::new(&app.settings.queue.prefix, app.settings.queue.partitions);
    assert_eq!(
        purge(&app, &names.delay_queue(3_000)).await,
        1,
        "the retry waited there"
    );
    let (attempts, _) = app.wait_status(&id, "delivered").await;
    assert_eq!(attempts, 2, "the failed attempt, then the swept one");
    let sweeps: i32 = sqlx::query_scalar("SELECT sweeps FROM events WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&id).unwrap())
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(sweeps, 1);
}

#[tokio::test]
async fn events_waiting_behind_a_slow_backlog_are_never_swept() {
    let statsd = StatsdListener::bind().await;
    // One partition taking one event at a time, 200 ms each: 40 events are an 8 s backlog, far
    // past the 2.5 s after which an event nothing carries is swept.
    let app = spawn_app_with(|s| {
        quick_sweep(s);
        s.queue.partitions = 1;
        s.queue.prefetch = 1;
        s.queue.message_max_events = 1;
        s.pipeline.max_run_events = 1;
        s.faults.fail_events = vec!["slowpoke:slow".into()];
        s.metrics.statsd_addr = statsd.addr.to_string();
    })
    .await;
    let events: Vec<Value> = (1..=40)
        .map(|n| json!({"user_id": (n % 4).to_string(), "event": "slowpoke", "data": {"n": n}}))
        .collect();
    let (status, _) = app
        .post_json(
            "/api/v1/events/batch",
            &app.api_key,
            json!({"events": events}),
        )
        .await;
    assert_eq!(status, 202);
    // The sweeper looks while the backlog drains, and finds the partition busy (the backlog lasts
    // 8 s: a sweeper that never calls it busy within PATIENCE does not see backlogs at all).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let line = statsd.expect_line("pipeline.sweep.partitions:").await;
        if line.contains("state:busy") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sweeper never found the partition with a backlog busy (last: {line})"
        );
    }
    // Checked at every look, not only at the end: a swept event is sent again behind the backlog,
    // which then may not drain within the wait at all.
    let attempts = wait_until("the backlog delivered", Duration::from_secs(60), || async {
        let (left, swept, attempts): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status <> 'delivered'), coalesce(sum(sweeps), 0)::int8,
                    coalesce(sum(attempts), 0)::int8
               FROM events",
        )
        .fetch_one(app.store.pool())
        .await
        .ok()?;
        assert_eq!(swept, 0, "nothing waiting behind the backlog was swept");
        (left == 0).then_some(attempts)
    })
    .await;
    assert_eq!(attempts, 40, "each event delivered once");
}

/// Stale events of a busy partition never hide those of an idle one: the sweeper reads each idle
/// partition's messages in flight apart. (It used to page through every stale event oldest first,
/// at most 10 pages a sweep, so 50 stale events of a busy partition, older than an idle
/// partition's, kept the latter from ever being swept.)
#[tokio::test]
async fn a_busy_partitions_stale_events_never_hide_an_idle_partitions() {
    let partitions = 2;
    let api = spawn_app_with(|s| {
        s.pubsub.mode = herald::config::PubSubMode::Cluster;
        s.node.roles = "api,socket".parse().unwrap();
        s.node.name = "api".into();
        quick_sweep(s);
        s.queue.partitions = partitions;
        s.pipeline.relay_batch = 5;
        s.faults.fail_events = vec!["slowpoke:slow".into()];
    })
    .await;
    let in_partition = |p: u16| {
        (0..)
            .map(move |i| format!("p{p}-{i}"))
            .filter(move |u| herald::event::partition_of(u, partitions) == p)
    };
    let busy_users: Vec<String> = in_partition(0).take(5).collect();
    let idle_user = in_partition(1).next().unwrap();
    // 60 events of the busy partition, then one of the idle partition, all lost after their
    // confirm (no worker runs yet: they wait in their queues, then the queues are purged).
    let events: Vec<Value> = (0..60)
        .map(|n| json!({"user_id": busy_users[n % 5], "data": {"n": n}}))
        .collect();
    assert_eq!(api.post_batch(Value::Array(events)).await.status(), 202);
    let idle_event = api.enqueue(json!({"user_id": idle_user})).await;
    wait_until("every message confirmed", PATIENCE, || async {
        let (messages, _) = api.store.outbox_depth().await.ok()?;
        (messages == 0).then_some(())
    })
    .await;
    let names = herald::queue::Topology::new(&api.settings.queue.prefix, partitions);
    for p in 0..partitions {
        purge(&api, &names.partition_queue(p)).await;
    }
    // The busy partition never idles: a slow event (200 ms each) every 100 ms.
    let feeder = api.post_in_turn(
        "/api/v1/events",
        (0..1_000)
            .map(|n| json!({"user_id": busy_users[0], "event": "slowpoke", "data": {"n": n}}))
            .collect(),
        Duration::from_millis(100),
    );
    let _worker = spawn_node(&api, "worker,socket", "worker", |_| {}).await;
    wait_until("the idle partition's event swept", PATIENCE, || async {
        (api.status_of(&idle_event).await? == "delivered").then_some(())
    })
    .await;
    feeder.abort();
}

/// A retry's message has an outbox row of its own, apart from the retry before it: settling the
/// first retry's message must not forget the second's. (Both once had the event's id, so the first
/// retry's ack deleted the row the second had just written, and a second retry lost in its delay
/// queue then left its event `published` for good, with no row for the sweeper to find.)
#[tokio::test]
async fn a_second_retry_destroyed_in_its_delay_queue_is_swept_and_delivered() {
    let app = spawn_app_with(|s| {
        quick_sweep(s);
        s.faults.fail_events = vec!["flaky:2".into()];
        s.retry.schedule_ms = vec![100, 3_000];
    })
    .await;
    let id = app
        .enqueue(json!({"user_id": "6", "event": "flaky", "data": {}}))
        .await;
    // The second attempt (the first retry) failed too: the second retry waits 3 s.
    wait_until("the second attempt failed", PATIENCE, || async {
        let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM events WHERE id = $1")
            .bind(uuid::Uuid::parse_str(&id).unwrap())
            .fetch_one(app.store.pool())
            .await
            .ok()?;
        (attempts == 2).then_some(())
    })
    .await;
    let names =
        herald::queue::Topology::new(&app.settings.queue.prefix, app.settings.queue.partitions);
    assert_eq!(
        purge(&app, &names.delay_queue(3_000)).await,
        1,
        "the second retry waited there"
    );
    let (attempts, _) = app.wait_status(&id, "delivered").await;
    assert_eq!(attempts, 3, "two failed attempts, then the swept one");
}

/// The relay's claim and the outbox depth read only unconfirmed rows, and a sweep only a range of
/// its own partition's: with 20,000 confirmed messages in flight (a long broker backlog, the
/// sweeper's ledger) beside 40 unconfirmed ones, no statement scans the outbox, and each reads at
/// most the rows it returns (issue 24: both scanned it every second on every api node).
#[tokio::test]
async fn the_relay_depth_and_sweep_statements_read_a_bounded_range_of_the_outbox() {
    // A migrated database and no node: a node's relay would claim the rows meanwhile.
    let (_deployment, store) = crate::common::migrated_store().await;
    let pool = store.pool();
    sqlx::query(
        "INSERT INTO outbox (id, event_ids, created_at, partition, confirmed_at)
         SELECT gen_random_uuid(), ARRAY[gen_random_uuid()], now() - interval '1 hour' + i * interval '1 ms',
                (i % 4)::int2, now()
         FROM generate_series(1, 20000) AS i",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox (id, event_ids, created_at, partition)
         SELECT gen_random_uuid(), ARRAY[gen_random_uuid()], now() - interval '1 hour' + i * interval '1 ms',
                (i % 4)::int2
         FROM generate_series(1, 40) AS i",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE outbox").execute(pool).await.unwrap();

    let claim = outbox_plan(
        &store,
        herald::store::CLAIM_UNCONFIRMED_SQL,
        &[1000.0, 10.0],
    )
    .await;
    assert_reads_at_most(&claim, "outbox_unconfirmed", 10);
    let depth = outbox_plan(&store, herald::store::OUTBOX_DEPTH_SQL, &[100_000.0]).await;
    assert_reads_at_most(&depth, "outbox_unconfirmed", 40);
    let stale = outbox_plan(
        &store,
        herald::store::STALE_MESSAGES_SQL,
        &[2.0, 1000.0, 50.0],
    )
    .await;
    assert_reads_at_most(&stale, "outbox_in_flight", 50);
}

/// The executed plan of `sql` with `binds` (numbers; the partition as an int2), rolled back.
async fn outbox_plan(store: &herald::store::Store, sql: &str, binds: &[f64]) -> String {
    let mut tx = store.pool().begin().await.unwrap();
    let explain = format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {sql}");
    let mut query = sqlx::query_scalar::<_, String>(&explain);
    for (i, bind) in binds.iter().enumerate() {
        query = match (sql.contains("partition = $1"), i) {
            (true, 0) => query.bind(*bind as i16),
            _ if sql.contains(&format!("LIMIT ${}", i + 1)) => query.bind(*bind as i64),
            _ => query.bind(*bind),
        };
    }
    let lines = query.fetch_all(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    lines.join("\n")
}

/// `plan` reads the outbox only through `index`, and no read returns more than `bound` rows.
fn assert_reads_at_most(plan: &str, index: &str, bound: u32) {
    assert!(!plan.contains("Seq Scan on outbox"), "{plan}");
    assert!(
        plan.contains(&format!("using {index} on outbox")),
        "not through {index}:\n{plan}"
    );
    assert!(!plan.contains("never executed"), "{plan}");
    for read in plan.lines().filter(|l| l.contains(" on outbox")) {
        let rows = crate::common::actual_rows(read);
        assert!(rows <= f64::from(bound), "{rows} rows read: {read}\n{plan}");
    }
}
