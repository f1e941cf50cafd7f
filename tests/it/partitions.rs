//! The partitioned, batched pipeline: one user's burst stalls no one else, several worker nodes
//! share the partitions and keep every user's order without help from the socket, a killed worker
//! node's partitions move to the survivors, and a joining node takes its share.

use crate::common::{
    Node, PATIENCE, StatsdListener, TestApp, WsClient, connect_to, counter_sum, partitions_at,
    spawn_app_with, spawn_node, wait_until,
};
use herald::event::partition_of;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Reads `count` pushes from `client`, asserting they are seqs 1..=count in order (no gap, no
/// duplicate), counting them in `progress`; returns when the last arrived.
fn read_in_order(
    mut client: WsClient,
    user: String,
    count: i64,
    progress: Arc<AtomicI64>,
) -> JoinHandle<Instant> {
    tokio::spawn(async move {
        for seq in 1..=count {
            let push = client.recv_push().await;
            assert_eq!(
                push[4]["seq"].as_i64(),
                Some(seq),
                "user {user}: expected seq {seq}, got {push}"
            );
            progress.store(seq, Ordering::Relaxed);
        }
        Instant::now()
    })
}

fn reader(client: WsClient, user: &str, count: i64) -> JoinHandle<Instant> {
    read_in_order(client, user.to_owned(), count, Arc::default())
}

#[tokio::test]
async fn a_hot_users_burst_stalls_no_one_else_and_arrives_whole_and_in_order() {
    // The hot user's events are slow to deliver (each run takes 200 ms more), so its 5,000 events
    // drain over seconds: the cold user's event must not wait for them.
    let app = spawn_app_with(|s| s.faults.fail_events = vec!["burst:slow".into()]).await;
    let partitions = app.settings.queue.partitions;
    let hot = "hot";
    // A cold user of the hot user's own partition: the hard case (other partitions run apart).
    let cold = (0..)
        .map(|i| format!("cold{i}"))
        .find(|u| partition_of(u, partitions) == partition_of(hot, partitions))
        .unwrap();
    let hot_client = app.connect_joined(hot).await;
    let mut cold_client = app.connect_joined(&cold).await;
    let hot_progress = Arc::new(AtomicI64::new(0));
    let hot_done = read_in_order(hot_client, hot.into(), 5_000, Arc::clone(&hot_progress));

    // 5,000 events for one user: 50 concurrent batch requests of 100.
    let burst = futures_util::future::join_all((0..50).map(|r| {
        let events: Vec<Value> = (0..100)
            .map(|i| json!({"user_id": hot, "event": "burst", "data": {"n": r * 100 + i}}))
            .collect();
        app.post_batch(json!(events))
    }))
    .await;
    assert!(burst.iter().all(|r| r.status() == 202));
    let posted = Instant::now();
    assert_eq!(
        app.post_event(json!({"user_id": cold, "data": {"cold": true}}))
            .await
            .status(),
        202
    );
    let push = cold_client.recv_push().await;
    let cold_at = Instant::now();
    let hot_by_then = hot_progress.load(Ordering::Relaxed);
    assert_eq!(push[4]["data"]["cold"], true);
    let hot_at = hot_done
        .await
        .expect("the burst arrives whole and in order");
    println!(
        "cold event pushed {:?} after its 202, when the hot client had {hot_by_then} of its 5,000; \
         the burst finished draining {:?} after it",
        cold_at - posted,
        hot_at - posted
    );
    // Behind the burst it would come after most of it (the partition's window holds 1,000 of the
    // hot user's events at a time); beside it, within the burst's first runs.
    assert!(
        hot_by_then < 1_000,
        "the cold user's event waited behind {hot_by_then} of the hot user's events"
    );
}

/// Sends `per_user` events to each of `users`, interleaved (round after round, one batch request
/// per round), back to back.
async fn interleaved(app: &TestApp, users: &[String], per_user: i64) {
    for n in 1..=per_user {
        let events: Vec<Value> = users
            .iter()
            .map(|u| json!({"user_id": u, "data": {"n": n}}))
            .collect();
        assert_eq!(app.post_batch(json!(events)).await.status(), 202);
    }
}

#[tokio::test]
async fn two_worker_nodes_share_the_partitions_and_keep_every_users_order() {
    let socket_metrics = StatsdListener::bind().await;
    let second_metrics = StatsdListener::bind().await;
    let app = spawn_app_with(|s| {
        s.pubsub.mode = herald::config::PubSubMode::Cluster;
        s.node.name = "first".into();
        s.metrics.statsd_addr = socket_metrics.addr.to_string();
    })
    .await;
    let second = spawn_node(&app, "worker", "second", |s| {
        s.metrics.statsd_addr = second_metrics.addr.to_string();
    })
    .await;
    let partitions = app.settings.queue.partitions;
    let (mine, theirs) = wait_until("both nodes consuming", PATIENCE, || async {
        let (a, b) = (app.partitions().await, second.partitions().await);
        (!a.is_empty() && !b.is_empty() && a.len() + b.len() == usize::from(partitions))
            .then_some((a, b))
    })
    .await;
    println!("partitions: first {mine:?}, second {theirs:?}");
    assert!(
        mine.iter().all(|p| !theirs.contains(p)),
        "no partition on both"
    );

    let users: Vec<String> = (0..50).map(|i| format!("u{i}")).collect();
    let mut readers = Vec::new();
    for user in &users {
        let client = app.connect_joined(user).await;
        readers.push(reader(client, user, 40));
    }
    interleaved(&app, &users, 40).await;
    for reader in readers {
        reader.await.expect("every user's 40 events, in order");
    }
    // Both nodes delivered: each has a share of the users.
    let theirs_delivered = second_metrics
        .lines_until("pipeline.worker.delivered", 1)
        .await;
    assert!(counter_sum(&theirs_delivered, "pipeline.worker.delivered") > 0);
    // No event reached a socket out of order: nothing had to be filled in from PostgreSQL. Two
    // gauges (one a second) make sure the flush after the last push has been read.
    let lines = socket_metrics.lines_through("socket.connections", 2).await;
    assert_eq!(
        counter_sum(&lines, "socket.push.gap_filled"),
        0,
        "events needed a gap fill: {:?}",
        lines
            .iter()
            .filter(|l| l.starts_with("socket.push"))
            .collect::<Vec<_>>()
    );
    assert!(counter_sum(&lines, "pipeline.worker.delivered") > 0);
}

#[tokio::test]
async fn a_killed_worker_nodes_partitions_move_and_a_joining_node_takes_its_share() {
    // The API and the sockets in this process; the worker nodes are real `herald` processes, so
    // one can be killed outright.
    let app = spawn_app_with(|s| {
        s.pubsub.mode = herald::config::PubSubMode::Cluster;
        s.node.roles = "api,socket".parse().unwrap();
        s.node.name = "front".into();
    })
    .await;
    let partitions = usize::from(app.settings.queue.partitions);
    let mut worker = app.settings.clone();
    worker.node.roles = "worker".parse().unwrap();
    worker.node.name.clear(); // each its own: <hostname>-<pid>
    let mut doomed = Node::serve(&worker, &[]).await;
    let survivor = Node::serve(&worker, &[]).await;
    let http = reqwest::Client::new();
    wait_until("both worker nodes consuming", PATIENCE, || async {
        let a = partitions_at(&http, doomed.addr).await.len();
        let b = partitions_at(&http, survivor.addr).await.len();
        (a > 0 && b > 0 && a + b == partitions).then_some(())
    })
    .await;

    let users: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    let per_user = 60;
    let mut readers = Vec::new();
    for user in &users {
        let mut client = connect_to(app.addr, user).await;
        let reply = client.join(&format!("user:{user}"), json!({})).await;
        assert_eq!(reply[4]["status"], "ok");
        readers.push(reader(client, user, per_user));
    }
    let rounds: Vec<Value> = (1..=per_user)
        .map(|n| {
            let events: Vec<Value> = users
                .iter()
                .map(|u| json!({"user_id": u, "data": {"n": n}}))
                .collect();
            json!({ "events": events })
        })
        .collect();
    let producer = app.post_in_turn("/api/v1/events/batch", rounds, Duration::from_millis(20));
    // Mid-stream: kill one worker node outright.
    tokio::time::sleep(Duration::from_millis(400)).await;
    doomed.child.start_kill().expect("SIGKILL sent");
    let killed = Instant::now();
    let _ = doomed.child.wait().await;
    let taken_over = wait_until(
        "the survivor consuming every partition",
        Duration::from_secs(10),
        || async {
            (partitions_at(&http, survivor.addr).await.len() == partitions)
                .then_some(killed.elapsed())
        },
    )
    .await;
    println!("the survivor took every partition over {taken_over:?} after the kill");
    producer.await.expect("every event accepted");
    for reader in readers {
        reader
            .await
            .expect("every user's events, in order, no gap, no duplicate");
    }
    app.wait_all_delivered().await;

    // A third node joins and takes its share; the survivor hands it over.
    let joiner = Node::serve(&worker, &[]).await;
    let shares = wait_until("the joining node's share", PATIENCE, || async {
        let joined = partitions_at(&http, joiner.addr).await.len();
        let kept = partitions_at(&http, survivor.addr).await.len();
        (joined > 0 && joined + kept == partitions).then_some((joined, kept))
    })
    .await;
    println!("after the join: joiner {}, survivor {}", shares.0, shares.1);
    // ... and delivers.
    let mut client = app.connect_joined("after-join").await;
    let mut sent = BTreeMap::new();
    for n in 1..=5 {
        let id = app
            .enqueue(json!({"user_id": "after-join", "data": {"n": n}}))
            .await;
        sent.insert(n, id);
    }
    for n in 1..=5 {
        assert_eq!(client.recv_push().await[4]["seq"], n);
    }
}

#[tokio::test]
async fn the_partition_count_changes_only_once_the_pipeline_is_empty() {
    // An api-only deployment: what it accepts waits in its partitions, consumed by nobody.
    let app = spawn_app_with(|s| {
        s.pubsub.mode = herald::config::PubSubMode::Cluster;
        s.node.roles = "api".parse().unwrap();
    })
    .await;
    app.enqueue(json!({"user_id": "1", "data": {}})).await;
    wait_until("the message confirmed", PATIENCE, || async {
        (app.store.outbox_depth().await.ok()?.0 == 0).then_some(())
    })
    .await;
    let mut doubled = app.settings.clone();
    doubled.http.addr = "127.0.0.1:0".parse().unwrap();
    doubled.queue.partitions = 2 * app.settings.queue.partitions;
    let refused = match herald::App::build(doubled.clone()).await {
        Ok(_) => panic!("a node with another partition count started over a full partition"),
        Err(error) => error.to_string(),
    };
    assert!(
        refused.contains("still hold 1 messages")
            && refused.contains("Changing the partition count"),
        "{refused}"
    );
    // Drained by a worker node of the old count, which then stops (leaving the live set).
    let mut drainer = spawn_node(&app, "worker", "drainer", |_| {}).await;
    app.wait_all_delivered().await;
    drainer.stop().await;
    let _switched = herald::App::build(doubled.clone())
        .await
        .expect("the switch goes through on an empty pipeline");
    assert_eq!(
        app.store
            .partition_layout(doubled.queue.partitions)
            .await
            .unwrap(),
        herald::store::Layout::Same
    );
}

/// A partition whose lease another node takes while this node has one of its events in work (its
/// attempt hangs): the node stops that partition in the background, so its lease loop goes on
/// renewing its other partitions (none of them ever expires meanwhile), and the event in work is
/// fenced off: not recorded, retried or dead-lettered by this node, its message back in the queue
/// for the partition's owner.
#[tokio::test]
async fn a_lost_partitions_work_is_fenced_off_and_never_stalls_the_other_leases() {
    let app = spawn_app_with(|s| {
        // The first attempt of a `stuck` event hangs for twice the lease.
        s.faults.fail_events = vec!["stuck:1:hang".into()];
        s.retry.attempt_timeout_ms = 2 * s.queue.partition_lease_ms;
    })
    .await;
    let partitions = app.settings.queue.partitions;
    let lost = partition_of("stalled", partitions);
    wait_until("every partition consumed", PATIENCE, || async {
        (app.partitions().await.len() == usize::from(partitions)).then_some(())
    })
    .await;
    let id = app
        .enqueue(json!({"user_id": "stalled", "event": "stuck"}))
        .await;
    let admin = app.admin_key().await;
    wait_until("the event in work", PATIENCE, || async {
        let (_, stats) = app.get_json("/api/v1/admin/stats", &admin).await;
        (stats["node"]["in_flight"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    let owner: String =
        sqlx::query_scalar("SELECT owner FROM partition_leases WHERE partition = $1")
            .bind(i32::from(lost))
            .fetch_one(app.store.pool())
            .await
            .unwrap();
    // Another node takes the partition over (as a node would once this one's lease expired).
    sqlx::query(
        "UPDATE partition_leases SET owner = 'thief', epoch = epoch + 1,
                lease_until = now() + interval '1 hour' WHERE partition = $1",
    )
    .bind(i32::from(lost))
    .execute(app.store.pool())
    .await
    .unwrap();
    // Until the hung attempt ends and its message is back in the queue, every other lease of this
    // node stays live: the lost partition's drain never holds up their renewal.
    let queue =
        herald::queue::Topology::new(&app.settings.queue.prefix, partitions).partition_queue(lost);
    let broker = herald::queue::connect(&app.settings.queue, "test-probe")
        .await
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let expired: Vec<i32> = sqlx::query_scalar(
            "SELECT partition FROM partition_leases
             WHERE partition <> $1 AND (owner IS DISTINCT FROM $2 OR lease_until < now())",
        )
        .bind(i32::from(lost))
        .bind(&owner)
        .fetch_all(app.store.pool())
        .await
        .unwrap();
        assert!(
            expired.is_empty(),
            "leases not kept while the lost partition drained: {expired:?}"
        );
        let ready = herald::queue::ready_messages(&broker, &queue)
            .await
            .unwrap();
        if ready == Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fenced message never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Fenced: the stale attempt left no trace on the event.
    let (status, attempts, error): (String, i32, Option<String>) =
        sqlx::query_as("SELECT status, attempts, last_error FROM events WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(app.store.pool())
            .await
            .unwrap();
    assert_eq!((status.as_str(), attempts, error), ("accepted", 0, None));
}

/// The lease's epoch fences outcomes: an attempt made under a lease that changed hands since (or
/// by a node that is not the owner) is refused by the outcome writer's statement and reported
/// back, leaving the event as it was; one made under the current lease is stored.
#[tokio::test]
async fn an_outcome_under_a_lease_that_moved_on_is_refused() {
    use herald::store::{AttemptRecord, AttemptResult, LeaseToken};
    let app = spawn_app_with(|_| {}).await;
    let partitions = app.settings.queue.partitions;
    let committed = crate::common::new_event(&app, "fenced", "{}").await;
    let id = committed.id;
    app.store
        .insert_events(&[committed], partitions, app.settings.message_limits())
        .await
        .unwrap();
    let p = partition_of("fenced", partitions);
    let (owner, epoch): (String, i64) =
        wait_until("the partition's lease taken", PATIENCE, || async {
            sqlx::query_as("SELECT owner, epoch FROM partition_leases WHERE partition = $1 AND owner IS NOT NULL")
                .bind(i32::from(p))
                .fetch_optional(app.store.pool())
                .await
                .unwrap()
        })
        .await;
    let record = |epoch| AttemptRecord {
        id,
        lease: LeaseToken {
            partition: p,
            epoch,
        },
        started_at_ms: herald::event::now_unix_ms(),
        finished_at_ms: herald::event::now_unix_ms(),
        result: AttemptResult::Failed {
            error: "stale".into(),
        },
    };
    let refused = app
        .store
        .record_attempts(&owner, &[record(epoch - 1)])
        .await
        .unwrap();
    assert_eq!(refused, vec![id], "an older epoch is refused");
    let refused = app
        .store
        .record_attempts("stranger", &[record(epoch)])
        .await
        .unwrap();
    assert_eq!(refused, vec![id], "another node is refused");
    let status: String = sqlx::query_scalar("SELECT status FROM events WHERE id = $1")
        .bind(id)
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(status, "accepted", "refused attempts leave no trace");
    let refused = app
        .store
        .record_attempts(&owner, &[record(epoch)])
        .await
        .unwrap();
    assert!(refused.is_empty(), "the current lease's attempt is stored");
}

/// A lease renewal locks its rows in partition order, as the outcome writer's fence does, so the
/// two cannot deadlock (under a slow PostgreSQL they did: renewals failed until the leases ran out).
/// With partition 7's row stored before partition 3's, and 3 held by another transaction, the
/// renewal waits at 3 without having locked 7 (locking in the order rows are stored, it held 7).
#[tokio::test]
async fn a_lease_renewal_locks_its_rows_in_partition_order() {
    let (_deployment, store) = crate::common::migrated_store().await;
    store.set_partition_layout(8).await.unwrap();
    store.renew_and_acquire("a", &[3, 7], 60_000).await.unwrap();
    // Partition 3's row moves behind 7's: an update writes its new version at the page's end.
    sqlx::query("UPDATE partition_leases SET moved_at = now() WHERE partition = 3")
        .execute(store.pool())
        .await
        .unwrap();
    let stored: Vec<i32> = sqlx::query_scalar("SELECT partition FROM partition_leases")
        .fetch_all(store.pool())
        .await
        .unwrap();
    let position = |p| stored.iter().position(|&s| s == p).unwrap();
    assert!(
        position(7) < position(3),
        "the state: 7 stored before 3, {stored:?}"
    );

    let mut holder = store.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM partition_leases WHERE partition = 3 FOR SHARE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let renewal = {
        let store = store.clone();
        tokio::spawn(async move { store.renew_and_acquire("a", &[3, 7], 60_000).await })
    };
    wait_until("the renewal waiting for partition 3", PATIENCE, || async {
        let waiting: bool = sqlx::query_scalar(
            "SELECT count(*) > 0 FROM pg_stat_activity
             WHERE wait_event_type = 'Lock' AND query LIKE '%WITH mine AS%'
               AND datname = current_database()",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        waiting.then_some(())
    })
    .await;
    let mut probe = store.pool().begin().await.unwrap();
    let seven = sqlx::query("SELECT 1 FROM partition_leases WHERE partition = 7 FOR UPDATE NOWAIT")
        .execute(&mut *probe)
        .await;
    probe.rollback().await.unwrap();
    assert!(
        seven.is_ok(),
        "the renewal locked partition 7 before 3: {seven:?}"
    );
    holder.commit().await.unwrap();
    let held = renewal.await.unwrap().unwrap();
    assert_eq!(
        held.iter().map(|lease| lease.partition).collect::<Vec<_>>(),
        [3, 7]
    );
}
