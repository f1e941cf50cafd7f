//! Several group-commit streams (`pipeline.commit_streams`): a user's seqs stay gap-free and in
//! each producer's order, idempotency keys answer once, and one stream failing leaves the others
//! committing, with nothing lost.

use crate::common::{StatsdListener, TestApp, counter_sum, spawn_app_with};
use herald::event::partition_of;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};

const STREAMS: usize = 4;

async fn spawn_streams(statsd: &StatsdListener) -> TestApp {
    let statsd = statsd.addr.to_string();
    spawn_app_with(|s| {
        s.metrics.statsd_addr = statsd;
        s.queue.partitions = 8;
        s.pipeline.commit_streams = STREAMS;
        s.store.write_connections = STREAMS as u32 + 2;
    })
    .await
}

/// The commit stream `user` belongs to.
fn stream_of(app: &TestApp, user: &str) -> usize {
    usize::from(partition_of(user, app.settings.queue.partitions))
        % app.settings.pipeline.commit_streams
}

/// Every stored event per user, as (seq, id), in seq order.
async fn stored(app: &TestApp) -> BTreeMap<String, Vec<(i64, String)>> {
    let rows: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT user_id, seq, id::text FROM events ORDER BY user_id, seq")
            .fetch_all(app.store.pool())
            .await
            .unwrap();
    let mut per_user: BTreeMap<String, Vec<(i64, String)>> = BTreeMap::new();
    for (user, seq, id) in rows {
        per_user.entry(user).or_default().push((seq, id));
    }
    per_user
}

/// Each user's seqs are exactly 1..=n.
fn assert_gap_free(per_user: &BTreeMap<String, Vec<(i64, String)>>) {
    for (user, events) in per_user {
        let seqs: Vec<i64> = events.iter().map(|(seq, _)| *seq).collect();
        let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
        assert_eq!(seqs, expected, "user {user}: seqs with a hole or a repeat");
    }
}

/// Sixteen producers race for one hot user on their own connections, through single requests and
/// batches that span every stream, each producer retrying some requests with the same idempotency
/// keys. Every answer matches the store, a retry gets the original, each producer's events of the
/// hot user have increasing seqs in the order it sent them, and every user's seqs are gap-free.
/// The hot user's socket gets every event in seq order, and nothing had to put them back in order
/// on the way: the streams hand each partition's messages to the publisher in commit order.
#[tokio::test]
async fn one_user_racing_on_many_connections_keeps_order_and_keys_across_streams() {
    let statsd = StatsdListener::bind().await;
    let app = spawn_streams(&statsd).await;
    let mut client = app.connect_joined("hot").await;
    let users: Vec<String> = (0..32).map(|u| format!("u{u}")).collect();
    let spanned: std::collections::HashSet<usize> =
        users.iter().map(|u| stream_of(&app, u)).collect();
    assert_eq!(spanned.len(), STREAMS, "the batches must span every stream");
    let producers = (0..16).map(|p| {
        let app_url = app.url("");
        let key = app.api_key.clone();
        let users = users.clone();
        tokio::spawn(async move {
            // A client (so a connection pool) per producer.
            let http = reqwest::Client::new();
            let post = |path: &'static str, body: Value| {
                let request = http
                    .post(format!("{app_url}{path}"))
                    .bearer_auth(&key)
                    .json(&body);
                async move {
                    let response = request.send().await.expect("request sent");
                    let status = response.status().as_u16();
                    (status, response.json::<Value>().await.unwrap())
                }
            };
            // (idempotency key, id, seq) of every event this producer sent the hot user, in order.
            let mut hot: Vec<(String, String, i64)> = Vec::new();
            let mut answered: Vec<(String, String, i64)> = Vec::new();
            for r in 0..12 {
                let key_of = |n: usize| format!("p{p}-r{r}-{n}");
                let (status, body) = if r % 3 == 2 {
                    // A batch: the hot user twice, then an event for each of the 32 users.
                    let mut events = vec![
                        json!({"user_id": "hot", "data": {"p": p, "r": r}, "idempotency_key": key_of(0)}),
                        json!({"user_id": "hot", "data": {"p": p, "r": r}, "idempotency_key": key_of(1)}),
                    ];
                    for (n, user) in users.iter().enumerate() {
                        events.push(json!({"user_id": user, "data": {"p": p}, "idempotency_key": key_of(n + 2)}));
                    }
                    post("/api/v1/events/batch", json!({ "events": events })).await
                } else {
                    let event = json!({"user_id": "hot", "data": {"p": p, "r": r}, "idempotency_key": key_of(0)});
                    let (status, body) = post("/api/v1/events", event).await;
                    (status, json!({ "events": [body] }))
                };
                assert!(status == 202 || status == 200, "p{p} r{r}: {status} {body}");
                let events = body["events"].as_array().unwrap().clone();
                for (n, e) in events.iter().enumerate() {
                    let entry = (
                        key_of(n),
                        e["id"].as_str().unwrap().to_owned(),
                        e["seq"].as_i64().unwrap(),
                    );
                    if n < 2 {
                        hot.push(entry.clone());
                    }
                    answered.push(entry);
                }
                // Every other request is sent again with the same keys: the original answers.
                if r % 2 == 1 {
                    let again = if r % 3 == 2 {
                        let mut events = vec![
                            json!({"user_id": "hot", "data": {}, "idempotency_key": key_of(0)}),
                            json!({"user_id": "hot", "data": {}, "idempotency_key": key_of(1)}),
                        ];
                        for (n, user) in users.iter().enumerate() {
                            events.push(json!({"user_id": user, "data": {}, "idempotency_key": key_of(n + 2)}));
                        }
                        post("/api/v1/events/batch", json!({ "events": events })).await.1["events"].clone()
                    } else {
                        let event = json!({"user_id": "hot", "data": {}, "idempotency_key": key_of(0)});
                        json!([post("/api/v1/events", event).await.1])
                    };
                    for (first, repeat) in events.iter().zip(again.as_array().unwrap()) {
                        assert_eq!(repeat["duplicate"], true, "p{p} r{r}: {repeat}");
                        assert_eq!(repeat["id"], first["id"], "p{p} r{r}");
                        assert_eq!(repeat["seq"], first["seq"], "p{p} r{r}");
                    }
                }
            }
            (hot, answered)
        })
    });
    let mut answered: HashMap<String, i64> = HashMap::new();
    for producer in futures_util::future::join_all(producers).await {
        let (hot, all) = producer.expect("producer finished");
        // One producer's hot-user events, sent one after another: their seqs increase.
        let seqs: Vec<i64> = hot.iter().map(|(_, _, seq)| *seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "a producer's events of one user out of its order: {seqs:?}"
        );
        for (_, id, seq) in all {
            answered.insert(id, seq);
        }
    }
    let per_user = stored(&app).await;
    assert_gap_free(&per_user);
    // 16 producers x (8 single + 4 batches x 2) hot events; 4 batches x 1 per other user.
    assert_eq!(per_user["hot"].len(), 16 * 16);
    for user in &users {
        assert_eq!(per_user[user].len(), 16 * 4, "user {user}");
    }
    let stored_ids: HashMap<&str, i64> = per_user
        .values()
        .flatten()
        .map(|(seq, id)| (id.as_str(), *seq))
        .collect();
    assert_eq!(
        stored_ids.len(),
        answered.len(),
        "every answer is one stored event"
    );
    for (id, seq) in &answered {
        assert_eq!(stored_ids.get(id.as_str()), Some(seq), "event {id}");
    }
    app.wait_all_delivered().await;
    for seq in 1..=16 * 16 {
        assert_eq!(
            client.recv_push().await[4]["seq"],
            seq,
            "the hot user's pushes"
        );
    }
    let lines = statsd.lines_through("socket.connections", 2).await;
    let reordered: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("pipeline.lane.reorder:"))
        .collect();
    assert!(
        reordered.is_empty(),
        "a lane had to sort, wait or pass: {reordered:?}"
    );
    assert_eq!(
        counter_sum(&lines, "socket.push.gap_filled"),
        0,
        "gap fills"
    );
}

/// PostgreSQL refuses every commit holding an event of one user (a trigger), so that user's
/// stream fails each commit it has it in; the other streams go on. Every 2xx event is stored and
/// delivered, a failed request stored nothing (a batch spanning streams included: all or
/// nothing), and every user's seqs stay gap-free.
#[tokio::test]
async fn a_failing_stream_leaves_the_others_committing() {
    let statsd = StatsdListener::bind().await;
    let app = spawn_streams(&statsd).await;
    let doomed = (0..)
        .map(|u| format!("doomed{u}"))
        .find(|u| stream_of(&app, u) == 0)
        .unwrap();
    let healthy: Vec<String> = (0..)
        .map(|u| format!("ok{u}"))
        .filter(|u| stream_of(&app, u) != 0)
        .take(12)
        .collect();
    let neighbour = (0..)
        .map(|u| format!("near{u}"))
        .find(|u| stream_of(&app, u) == 0)
        .unwrap();
    // Not a data error (those are split down to the request at fault): the whole commit fails.
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION refuse_doomed() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.user_id = '{doomed}' THEN
             RAISE EXCEPTION 'refused for the test' USING ERRCODE = 'P0001';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_doomed BEFORE INSERT ON events
           FOR EACH ROW EXECUTE FUNCTION refuse_doomed();"
    ))
    .execute(app.store.pool())
    .await
    .unwrap();

    let mut accepted: Vec<String> = Vec::new();
    let mut neighbour_accepted = 0;
    let mut requests = Vec::new();
    for round in 0..10 {
        for user in &healthy {
            requests.push((false, json!({"user_id": user, "data": {"round": round}})));
        }
        requests.push((false, json!({"user_id": doomed, "data": {"round": round}})));
        requests.push((
            false,
            json!({"user_id": neighbour, "data": {"round": round}}),
        ));
        // A batch across streams with the doomed user in it.
        let mut batch: Vec<Value> = healthy
            .iter()
            .take(4)
            .map(|u| json!({"user_id": u, "data": {"batch": round}}))
            .collect();
        batch.push(json!({"user_id": doomed, "data": {"batch": round}}));
        requests.push((true, json!(batch)));
    }
    let answers = futures_util::future::join_all(requests.iter().map(|(batch, body)| async {
        if *batch {
            let r = app.post_batch(body.clone()).await;
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        } else {
            let r = app.post_event(body.clone()).await;
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    }))
    .await;
    for ((batch, body), (status, answer)) in requests.iter().zip(answers) {
        let users: Vec<String> = if *batch {
            body.as_array()
                .unwrap()
                .iter()
                .map(|e| e["user_id"].as_str().unwrap().to_owned())
                .collect()
        } else {
            vec![body["user_id"].as_str().unwrap().to_owned()]
        };
        if users.iter().all(|u| stream_of(&app, u) != 0) {
            assert_eq!(
                status, 202,
                "a request of the healthy streams failed: {body} {answer}"
            );
        }
        if status == 202 {
            assert!(!users.contains(&doomed), "a doomed event accepted: {body}");
            let events = if *batch {
                answer["events"].as_array().unwrap().clone()
            } else {
                vec![answer]
            };
            accepted.extend(events.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
            if users == [neighbour.clone()] {
                neighbour_accepted += 1;
            }
        } else {
            assert!(status >= 500, "{status} {answer}");
            assert!(answer["error"]["code"].is_string(), "{answer}");
        }
    }
    let per_user = stored(&app).await;
    assert_gap_free(&per_user);
    assert!(
        !per_user.contains_key(&doomed),
        "the doomed user has no rows"
    );
    // The doomed user's neighbour in stream 0: a failed request of it stored nothing.
    let neighbour_stored = per_user.get(&neighbour).map_or(0, Vec::len);
    assert_eq!(
        neighbour_stored, neighbour_accepted,
        "{neighbour}'s stored events"
    );
    // Every healthy user's ten single events, and nothing of the batches: each failed (the doomed
    // user is in each), as a whole.
    for user in &healthy {
        assert_eq!(per_user[user].len(), 10, "user {user}");
    }
    let stored_ids: std::collections::HashSet<&str> = per_user
        .values()
        .flatten()
        .map(|(_, id)| id.as_str())
        .collect();
    for id in &accepted {
        assert!(stored_ids.contains(id.as_str()), "accepted {id} not stored");
    }
    assert_eq!(
        stored_ids.len(),
        accepted.len(),
        "only the accepted events are stored"
    );
    app.wait_all_delivered().await;
}

/// Commits racing on the same idempotency keys, each on its own connection (as api nodes and
/// streams do), straight through the store: every key is stored once, every racer is answered with
/// that one event (id and seq), only stored events are in the commits' messages (each once), and
/// each user's seqs run 1..=n with no hole, whatever order the racers' statements ran in.
#[tokio::test]
async fn commits_racing_on_the_same_keys_store_each_once_with_no_seq_hole() {
    use herald::store::{InsertOutcome, NewEvent};
    // The relay leaves the outbox rows alone while the test reads them.
    let app = spawn_app_with(|s| {
        s.pipeline.relay_grace_ms = 600_000;
        s.pipeline.sweep_after_ms = 1_200_000;
    })
    .await;
    let producer: i64 = sqlx::query_scalar("SELECT id FROM producers LIMIT 1")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    let event = |user: &str, key: Option<String>| {
        NewEvent::new(
            producer,
            herald::event::UserId::parse(user).unwrap(),
            herald::event::EventName::default_push(),
            serde_json::value::RawValue::from_string("{}".into()).unwrap(),
            key,
        )
    };
    const RACERS: usize = 8;
    const KEYS: usize = 20;
    const KEYLESS: usize = 5;
    let racers = (0..RACERS).map(|r| {
        // Each racer: the 20 keys (users alternating), rotated so racers start apart, a key
        // repeated within the batch, and events of its own without a key.
        let mut batch: Vec<NewEvent> = (0..KEYS)
            .map(|k| (k + r * 3) % KEYS)
            .map(|k| event(["race", "other"][k % 2], Some(format!("k{k}"))))
            .collect();
        batch.insert(5, event("race", Some(format!("k{}", (r * 3) % KEYS))));
        batch.extend((0..KEYLESS).map(|_| event("race", None)));
        let (store, partitions, limits) = (
            app.store.clone(),
            app.settings.queue.partitions,
            app.settings.message_limits(),
        );
        tokio::spawn(async move {
            let committed = store.insert_events(&batch, partitions, limits).await;
            (batch, committed.expect("the commit succeeds"))
        })
    });
    let mut answers: HashMap<String, Vec<(String, i64)>> = HashMap::new();
    let mut inserted: HashMap<String, usize> = HashMap::new();
    let mut in_messages: Vec<String> = Vec::new();
    for racer in racers {
        let (batch, committed) = racer.await.unwrap();
        for message in &committed.messages {
            in_messages.extend(message.events.iter().map(|&i| batch[i].id.to_string()));
        }
        for (e, outcome) in batch.iter().zip(&committed.outcomes) {
            let (id, seq) = match outcome {
                InsertOutcome::Inserted { seq } => {
                    *inserted.entry(e.id.to_string()).or_default() += 1;
                    (e.id.to_string(), *seq)
                }
                InsertOutcome::Duplicate { id, seq, .. } => (id.to_string(), *seq),
            };
            if let Some(key) = &e.idempotency_key {
                answers.entry(key.clone()).or_default().push((id, seq));
            }
        }
    }
    for (key, seen) in &answers {
        assert!(
            seen.windows(2).all(|w| w[0] == w[1]),
            "{key}: every racer answered with one event: {seen:?}"
        );
        assert_eq!(inserted.get(&seen[0].0), Some(&1), "{key}: stored once");
    }
    let stored: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT user_id, seq, id::text FROM events ORDER BY user_id, seq")
            .fetch_all(app.store.pool())
            .await
            .unwrap();
    assert_eq!(
        stored.len(),
        KEYS + RACERS * KEYLESS,
        "the keys once, every keyless event"
    );
    for user in ["race", "other"] {
        let seqs: Vec<i64> = stored.iter().filter(|s| s.0 == user).map(|s| s.1).collect();
        let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
        assert_eq!(seqs, expected, "{user}: seqs with no hole");
    }
    let mut carried = in_messages.clone();
    carried.sort();
    carried.dedup();
    assert_eq!(
        carried.len(),
        in_messages.len(),
        "each event in one message"
    );
    let mut ids: Vec<String> = stored.into_iter().map(|s| s.2).collect();
    ids.sort();
    assert_eq!(carried, ids, "the messages carry exactly the stored events");
    let mut rows: Vec<String> =
        sqlx::query_scalar("SELECT e::text FROM outbox, unnest(event_ids) AS e")
            .fetch_all(app.store.pool())
            .await
            .unwrap();
    rows.sort();
    assert_eq!(rows, ids, "the outbox rows carry exactly the stored events");
}
