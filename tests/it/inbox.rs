//! The user inbox: a client with its user's socket token pages through the user's events newest
//! first, sees what is unread, and marks events read (the same state a channel `ack` sets).

use crate::common::{TEST_SECRET, TestApp, new_event, spawn_app, spawn_app_with};
use herald::event::{EventId, UserId};
use herald::store::{READ_MARK_SQL, ReadMark, UNREAD_CAP, UNREAD_SQL};
use herald::token::{TokenSigner, now_unix_secs};
use serde_json::{Value, json};

/// GET `path` with `token` as bearer; the status and the JSON body.
async fn inbox_get(app: &TestApp, path: &str, token: &str) -> (u16, Value) {
    app.get_json(path, token).await
}

/// Posts `n` events for `user` in one batch, with `data: {"n": i}`.
async fn post_events(app: &TestApp, user: &str, n: i64) {
    let events: Vec<Value> = (1..=n)
        .map(|i| json!({"user_id": user, "event": "note", "data": {"n": i}}))
        .collect();
    assert_eq!(app.post_batch(Value::Array(events)).await.status(), 202);
}

fn seqs(page: &Value) -> Vec<i64> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect()
}

/// Each event of an inbox page as (seq, read).
fn read_flags(page: &Value) -> Vec<(i64, bool)> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["seq"].as_i64().unwrap(), e["read"].as_bool().unwrap()))
        .collect()
}

fn assert_json_error(status: u16, body: &Value, expected: u16, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

#[tokio::test]
async fn the_inbox_pages_newest_first_with_a_cursor_and_serves_what_catch_up_pushes() {
    let app = spawn_app().await;
    post_events(&app, "i1", 25).await;
    let token = app.token("i1");

    let (status, first) = inbox_get(&app, "/api/v1/inbox?limit=10", &token).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(seqs(&first), (16..=25).rev().collect::<Vec<_>>());
    assert_eq!(first["next"], 16);
    assert_eq!(first["unread"], 25);
    assert_eq!(first["last_seq"], 25);
    let (_, second) = inbox_get(&app, "/api/v1/inbox?limit=10&before=16", &token).await;
    assert_eq!(seqs(&second), (6..=15).rev().collect::<Vec<_>>());
    let (_, last) = inbox_get(&app, "/api/v1/inbox?limit=10&before=6", &token).await;
    assert_eq!(seqs(&last), vec![5, 4, 3, 2, 1]);
    assert!(
        last["next"].is_null(),
        "the last page has no cursor: {last}"
    );
    // The default page holds them all.
    let (_, all) = inbox_get(&app, "/api/v1/inbox", &token).await;
    assert_eq!(seqs(&all), (1..=25).rev().collect::<Vec<_>>());

    // The same events, the same content, as a socket's catch-up pushes them (in seq order).
    let mut client = app.connect("i1").await;
    client.join("user:i1", json!({"last_seq": 0})).await;
    let mut pushed = Vec::new();
    for _ in 0..25 {
        let push = client.recv_push().await;
        pushed.push(json!({
            "event": push[3], "id": push[4]["id"], "seq": push[4]["seq"],
            "at": push[4]["at"], "data": push[4]["data"],
        }));
    }
    let mut shown: Vec<Value> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| json!({"event": e["event"], "id": e["id"], "seq": e["seq"], "at": e["at"], "data": e["data"]}))
        .collect();
    shown.reverse();
    assert_eq!(shown, pushed);
    assert!(all["events"][0]["read"] == false, "{}", all["events"][0]);
}

#[tokio::test]
async fn inbox_read_marks_and_channel_acks_are_one_state() {
    let app = spawn_app().await;
    post_events(&app, "i2", 5).await;
    let token = app.token("i2");
    let (_, page) = inbox_get(&app, "/api/v1/inbox", &token).await;
    let id_of = |seq: i64| {
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["seq"] == seq)
            .unwrap()["id"]
            .clone()
    };

    // A client acks seqs 1 and 2 on its channel: the inbox counts them read.
    let mut client = app.connect_joined("i2").await;
    client
        .send(json!(["1", "a1", "user:i2", "ack", {"ids": [id_of(1), id_of(2)]}]))
        .await;
    let reply = loop {
        let frame = client.recv().await;
        if frame[3] == "phx_reply" {
            break frame;
        }
    };
    assert_eq!(reply[4]["response"], json!({"acked": 2}));
    let (_, page) = inbox_get(&app, "/api/v1/inbox", &token).await;
    assert_eq!(page["unread"], 3);
    let read = read_flags(&page);
    assert_eq!(
        read,
        vec![(5, false), (4, false), (3, false), (2, true), (1, true)]
    );

    // The inbox marks up to seq 4: only 3 and 4 are new marks.
    let (status, marked) = app
        .post_json("/api/v1/inbox/read", &token, json!({"up_to_seq": 4}))
        .await;
    assert_eq!(status, 200, "{marked}");
    assert_eq!(
        marked,
        json!({"acked": 2, "unread": 1, "unread_capped": false})
    );
    let (_, page) = inbox_get(&app, "/api/v1/inbox", &token).await;
    let read = read_flags(&page);
    assert_eq!(
        read,
        vec![(5, false), (4, true), (3, true), (2, true), (1, true)]
    );
    // And a channel ack of an event the inbox marked finds it already acknowledged.
    client
        .send(json!(["1", "a2", "user:i2", "ack", {"ids": [id_of(3), id_of(5)]}]))
        .await;
    let reply = loop {
        let frame = client.recv().await;
        if frame[3] == "phx_reply" {
            break frame;
        }
    };
    assert_eq!(reply[4]["response"], json!({"acked": 1}));
    let (_, page) = inbox_get(&app, "/api/v1/inbox", &token).await;
    assert_eq!(page["unread"], 0);
}

#[tokio::test]
async fn another_users_events_are_unreachable_with_a_users_token() {
    let app = spawn_app().await;
    post_events(&app, "i3", 3).await;
    post_events(&app, "i4", 2).await;
    let token = app.token("i3");
    let (_, page) = inbox_get(&app, "/api/v1/inbox", &token).await;
    assert_eq!(seqs(&page), vec![3, 2, 1]);
    assert_eq!(page["unread"], 3);
    assert!(
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["data"]["n"].as_i64().unwrap() <= 3)
    );
    // No parameter names a user: trying is refused, not obeyed.
    let (status, body) = inbox_get(&app, "/api/v1/inbox?user_id=i4", &token).await;
    assert_json_error(status, &body, 422, "invalid_request");
    // Marking read touches only the token's user.
    let (status, marked) = app
        .post_json("/api/v1/inbox/read", &token, json!({"up_to_seq": 100}))
        .await;
    assert_eq!(
        (status, marked),
        (
            200,
            json!({"acked": 3, "unread": 0, "unread_capped": false})
        )
    );
    let (_, other) = inbox_get(&app, "/api/v1/inbox", &app.token("i4")).await;
    assert_eq!(other["unread"], 2, "{other}");
}

#[tokio::test]
async fn expired_forged_and_missing_tokens_are_refused_with_the_json_error() {
    let app = spawn_app().await;
    post_events(&app, "i5", 1).await;
    let user = UserId::parse("i5").unwrap();
    let expired = TokenSigner::new(TEST_SECRET).sign(&user, now_unix_secs() - 1);
    let forged = TokenSigner::new("another-secret-another-secret-another")
        .sign(&user, now_unix_secs() + 3600);
    for token in [
        expired.as_str(),
        forged.as_str(),
        "nonsense",
        app.api_key.as_str(),
    ] {
        let (status, body) = inbox_get(&app, "/api/v1/inbox", token).await;
        assert_json_error(status, &body, 401, "unauthorized");
        let (status, body) = app
            .post_json("/api/v1/inbox/read", token, json!({"up_to_seq": 1}))
            .await;
        assert_json_error(status, &body, 401, "unauthorized");
    }
    let r = app.http.get(app.url("/api/v1/inbox")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    // Nothing was marked by the refused requests.
    let (_, page) = inbox_get(&app, "/api/v1/inbox", &app.token("i5")).await;
    assert_eq!(page["unread"], 1);
}

#[tokio::test]
async fn bad_cursors_limits_and_bodies_are_refused_with_the_json_error() {
    let app = spawn_app().await;
    let token = app.token("i6");
    for query in [
        "limit=0",
        "limit=1001",
        "limit=ten",
        "limit=",
        "before=0",
        "before=-5",
        "before=abc",
        "before=99999999999999999999999",
        "cursor=3",
    ] {
        let (status, body) = inbox_get(&app, &format!("/api/v1/inbox?{query}"), &token).await;
        assert_json_error(status, &body, 422, "invalid_request");
    }
    for body in [
        json!({"up_to_seq": -1}),
        json!({"up_to_seq": "3"}),
        json!({"up_to_seq": 1.5}),
        json!({}),
        json!({"up_to_seq": 1, "user_id": "i7"}),
    ] {
        let (status, answer) = app.post_json("/api/v1/inbox/read", &token, body).await;
        assert_json_error(status, &answer, 422, "invalid_request");
    }
    let r = app
        .http
        .post(app.url("/api/v1/inbox/read"))
        .bearer_auth(&token)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "malformed_json");
    // An empty inbox is a page too.
    let (status, page) = inbox_get(&app, "/api/v1/inbox", &token).await;
    assert_eq!(status, 200);
    assert_eq!(
        page,
        json!({"events": [], "next": null, "unread": 0, "unread_capped": false, "last_seq": 0})
    );
}

/// Commits `n` events of `user` straight into the store (one group commit); their outbox rows wait
/// for a relay whose grace the caller made long.
async fn commit_events(app: &TestApp, user: &str, n: usize) -> Vec<EventId> {
    let mut events = Vec::with_capacity(n);
    for i in 1..=n {
        events.push(new_event(app, user, &format!(r#"{{"n":{i}}}"#)).await);
    }
    app.commit_events(&events).await;
    events.iter().map(|e| e.id).collect()
}

/// A node whose relay leaves committed events alone (the test reads and marks them only).
async fn quiet_app() -> TestApp {
    spawn_app_with(|s| {
        s.pipeline.relay_grace_ms = 600_000;
        s.pipeline.sweep_after_ms = 1_200_000; // beyond the grace, as validation asks
    })
    .await
}

async fn mark_read(app: &TestApp, token: &str, up_to_seq: i64) -> Value {
    let (status, marked) = app
        .post_json("/api/v1/inbox/read", token, json!({"up_to_seq": up_to_seq}))
        .await;
    assert_eq!(status, 200, "{marked}");
    marked
}

/// The unread count covers the user's last `UNREAD_CAP` seqs above its read mark and says when
/// there are more; the read mark covers every seq up to it at once (never a seq not handed
/// out yet), and a channel ack and the mark stay one state.
#[tokio::test]
async fn unread_counts_and_read_marks_are_right_around_the_cap_and_the_mark() {
    let cap = UNREAD_CAP;
    let app = quiet_app().await;
    let ids = commit_events(&app, "cap", (cap + 500) as usize).await;
    let seq_id = |seq: i64| ids[(seq - 1) as usize];
    let token = app.token("cap");
    let unread = |page: &Value| (page["unread"].as_i64(), page["unread_capped"].as_bool());

    let (_, page) = inbox_get(&app, "/api/v1/inbox?limit=1", &token).await;
    assert_eq!(unread(&page), (Some(cap), Some(true)), "{page}");
    assert_eq!(page["last_seq"], cap + 500);
    // Two acked on a channel (the same store call a channel's `ack` makes).
    let acked = app
        .store
        .record_acks(
            "cap",
            ReadMark::Ids(&[seq_id(cap + 500), seq_id(cap + 499)]),
        )
        .await
        .unwrap();
    assert_eq!(acked, 2);
    let (_, page) = inbox_get(&app, "/api/v1/inbox?limit=1", &token).await;
    assert_eq!(unread(&page), (Some(cap - 2), Some(true)), "{page}");

    // A mark leaving cap + 1 events above it: still capped; one more, and the count is exact.
    let marked = mark_read(&app, &token, 499).await;
    assert_eq!(
        marked,
        json!({"acked": 499, "unread": cap - 2, "unread_capped": true})
    );
    let marked = mark_read(&app, &token, 500).await;
    assert_eq!(
        marked,
        json!({"acked": 1, "unread": cap - 2, "unread_capped": false})
    );
    let marked = mark_read(&app, &token, 500).await;
    assert_eq!(marked["acked"], 0, "nothing new under the same mark");
    let marked = mark_read(&app, &token, 10).await;
    assert_eq!(marked["acked"], 0, "a mark never moves back");
    // Up to the second newest: every event between, but the one acked on its channel.
    let marked = mark_read(&app, &token, cap + 499).await;
    assert_eq!(
        marked,
        json!({"acked": cap - 2, "unread": 0, "unread_capped": false})
    );

    // Under the mark, a channel ack finds the event read already, and so does the inbox.
    let again = app
        .store
        .record_acks("cap", ReadMark::Ids(&[seq_id(10)]))
        .await
        .unwrap();
    assert_eq!(again, 0);
    let (_, page) = inbox_get(&app, "/api/v1/inbox?limit=2&before=12", &token).await;
    let read = read_flags(&page);
    assert_eq!(read, vec![(11, true), (10, true)]);
    let (_, record) = app
        .get_json(&format!("/api/v1/events/{}", seq_id(10)), &app.api_key)
        .await;
    assert!(record["acked_at"].is_string(), "{record}");

    // A mark past the last seq covers what exists, not events still to come.
    let marked = mark_read(&app, &token, cap + 10_000).await;
    assert_eq!(marked["acked"], 0);
    commit_events(&app, "cap", 1).await;
    let (_, page) = inbox_get(&app, "/api/v1/inbox?limit=1", &token).await;
    assert_eq!(unread(&page), (Some(1), Some(false)), "{page}");
    assert_eq!(page["events"][0]["read"], false);

    // One mark over more than the cap: all read at once, `acked` counting the newest cap.
    commit_events(&app, "cap2", (cap + 500) as usize).await;
    let marked = mark_read(&app, &app.token("cap2"), cap + 500).await;
    assert_eq!(
        marked,
        json!({"acked": cap, "unread": 0, "unread_capped": false})
    );
}

/// `EXPLAIN ANALYZE` of the unread count and of the read mark, on a user with thrice the cap of
/// events: each reads the user's events through a range of the (user_id, seq) index, at most the
/// cap's worth, never the whole table or all of the user's rows.
#[tokio::test]
async fn the_unread_count_and_the_read_mark_read_a_bounded_range_of_the_index() {
    let cap = UNREAD_CAP;
    let app = quiet_app().await;
    commit_events(&app, "many", (3 * cap) as usize).await;
    for user in 0..20 {
        commit_events(&app, &format!("other{user}"), 50).await;
    }
    sqlx::query("ANALYZE events")
        .execute(app.store.pool())
        .await
        .unwrap();
    let unread = executed_plan(&app, UNREAD_SQL, &[cap]).await;
    assert_bounded(&unread, cap);
    let mark = executed_plan(&app, READ_MARK_SQL, &[2 * cap, cap]).await;
    assert_bounded(&mark, cap);
}

/// The plan of `sql` as run for user `many` with `binds` after the user id (`EXPLAIN ANALYZE` in a
/// transaction rolled back, so a write leaves nothing).
async fn executed_plan(app: &TestApp, sql: &str, binds: &[i64]) -> String {
    let mut tx = app.store.pool().begin().await.unwrap();
    let explain = format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {sql}");
    let mut query = sqlx::query_scalar::<_, String>(&explain).bind("many");
    for bind in binds {
        query = query.bind(bind);
    }
    let lines = query.fetch_all(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    lines.join("\n")
}

/// Every read of `events` in `plan` goes through a range of the (user_id, seq) index and returns
/// at most `cap` + 1 rows: no sequential scan, no read of all the user's rows.
fn assert_bounded(plan: &str, cap: i64) {
    assert!(!plan.contains("Seq Scan on events"), "{plan}");
    let reads: Vec<&str> = plan
        .lines()
        .filter(|l| l.contains(" on events ") || l.contains(" on events_"))
        .collect();
    assert!(!reads.is_empty(), "no read of events: {plan}");
    assert!(
        plan.contains("events_user_id_seq_key") && plan.contains("Index Cond: ((user_id = "),
        "not a range of the (user_id, seq) index:\n{plan}"
    );
    for read in reads {
        let rows = crate::common::actual_rows(read);
        assert!(rows <= (cap + 1) as f64, "{rows} rows read: {read}\n{plan}");
    }
}
