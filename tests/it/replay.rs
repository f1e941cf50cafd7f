//! Operator replay: each user's events go out in seq order whatever their ids, and a matching
//! event whose row another transaction holds is waited for, never passed over, by the same job.

use crate::common::{
    PATIENCE, StatsdListener, TestApp, counter_sum, new_event, spawn_app_with, wait_until,
};
use herald::event::{EventId, EventName};
use serde_json::{Value, json};

/// A node on which every event named `flaky` fails its first 4 attempts: failed for good, then
/// delivered by a replay.
async fn flaky_app() -> TestApp {
    spawn_app_with(|s| s.faults.fail_events = vec!["flaky:4".into()]).await
}

/// Starts a replay job with `body` and waits until it is no longer running; returns the job.
async fn replay_to_the_end(app: &TestApp, admin: &str, body: Value) -> Value {
    let (status, job) = app.post_json("/api/v1/admin/replays", admin, body).await;
    assert_eq!(status, 202, "{job}");
    job_ended(app, admin, &job).await
}

/// Waits until `job` is no longer running; returns it.
async fn job_ended(app: &TestApp, admin: &str, job: &Value) -> Value {
    let path = format!("/api/v1/admin/replays/{}", job["id"].as_str().unwrap());
    wait_until("the replay job ended", PATIENCE, || async {
        let (_, job) = app.get_json(&path, admin).await;
        (job["status"] != "running").then_some(job)
    })
    .await
}

/// Event ids are minted when a request is validated, seqs when it is committed, and the group
/// commit puts a single event ahead of batches queued before it: one user's ids need not follow
/// its seqs. A replay must still publish the user's events in seq order: a joined channel that
/// got a higher seq first would have to fill the lower ones in from PostgreSQL (and before the
/// order guard started at the join's last seq, it dropped them as repeats).
#[tokio::test]
async fn replayed_events_of_a_user_arrive_in_seq_order_when_their_ids_are_not() {
    let statsd = StatsdListener::bind().await;
    let app = spawn_app_with(|s| {
        s.faults.fail_events = vec!["flaky:4".into()];
        s.metrics.statsd_addr = statsd.addr.to_string();
    })
    .await;
    let admin = app.admin_key().await;
    // Joined before the events exist: they are all after its start.
    let mut client = app.connect_joined("ro").await;
    let mut events = Vec::new();
    for n in 1..=6 {
        let mut event = new_event(&app, "ro", &format!(r#"{{"n":{n}}}"#)).await;
        event.event = EventName::parse("flaky").unwrap();
        events.push(event);
    }
    // The lowest seq gets the highest id.
    let mut ids: Vec<EventId> = events.iter().map(|e| e.id).collect();
    ids.sort();
    for (event, id) in events.iter_mut().zip(ids.into_iter().rev()) {
        event.id = id;
    }
    assert_eq!(app.commit_events(&events).await.messages.len(), 1);
    // The relay publishes them; each fails its attempts and ends failed.
    for event in &events {
        app.wait_status(&event.id.to_string(), "failed").await;
    }

    let done = replay_to_the_end(&app, &admin, json!({"user_id": "ro"})).await;
    assert_eq!(
        (&done["status"], &done["replayed"]),
        (&json!("done"), &json!(6))
    );
    app.post_sentinel("ro").await;
    let mut seqs = Vec::new();
    loop {
        let push = client.recv_push().await;
        seqs.push(push[4]["seq"].as_i64().unwrap());
        if push[4]["data"] == json!({"sentinel": true}) {
            break;
        }
    }
    assert_eq!(
        seqs,
        [1, 2, 3, 4, 5, 6, 7],
        "pushed in seq order, none dropped"
    );
    // In seq order as replayed: nothing had to be filled in. Two gauges (one a second) make sure
    // the flush after the last push has been read.
    let lines = statsd.lines_through("socket.connections", 2).await;
    assert_eq!(
        counter_sum(&lines, "socket.push.gap_filled"),
        0,
        "replayed out of order"
    );
}

/// A row another transaction holds while the replay claims (the outcome writer updating it, an
/// operator's session) is waited for and replayed by the same job: a job never reports `done`
/// with a matching event passed over.
#[tokio::test]
async fn a_row_locked_during_a_replay_claim_is_still_replayed_by_the_same_job() {
    let app = flaky_app().await;
    let admin = app.admin_key().await;
    let mut ids = Vec::new();
    for user in ["la", "lb", "lc"] {
        ids.push(
            app.enqueue(json!({"user_id": user, "event": "flaky"}))
                .await,
        );
    }
    for id in &ids {
        app.wait_status(id, "failed").await;
    }
    let held = uuid::Uuid::parse_str(&ids[1]).unwrap();
    let mut holder = app.store.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM events WHERE id = $1 FOR UPDATE")
        .bind(held)
        .execute(&mut *holder)
        .await
        .unwrap();

    let (status, job) = app
        .post_json("/api/v1/admin/replays", &admin, json!({"event": "flaky"}))
        .await;
    assert_eq!(status, 202, "{job}");
    // The job reaches the held row: it waits for the lock, or (passing it over) ends.
    let path = format!("/api/v1/admin/replays/{}", job["id"].as_str().unwrap());
    wait_until(
        "the job waiting on the held row, or ended",
        PATIENCE,
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(app.store.pool())
            .await
            .ok()?;
            let (_, now) = app.get_json(&path, &admin).await;
            (waiting > 0 || now["status"] != "running").then_some(())
        },
    )
    .await;
    holder.rollback().await.unwrap();

    let done = job_ended(&app, &admin, &job).await;
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["replayed"], 3, "the held event too: {done}");
    for id in &ids {
        app.wait_status(id, "delivered").await;
    }
    let replays: i32 = sqlx::query_scalar("SELECT replays FROM events WHERE id = $1")
        .bind(held)
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(replays, 1);
}
