//! Hostile input and resource bounds: one bad request harms nobody else, memory and connections stay
//! bounded, weak secrets are refused.

use crate::common::{PATIENCE, spawn_app};
use herald::event::{EventName, UserId, now_unix_ms};
use herald::metrics::Metrics;
use herald::pipeline::batch::Flush;
use herald::pipeline::enqueue::{Committer, EnqueueError};
use herald::queue::Publisher;
use herald::store::NewEvent;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::time::timeout;

/// 2,000 requests from 32 clients, every tenth carrying a NUL where PostgreSQL cannot store one:
/// each bad one gets 422 naming its field, and every innocent one gets its 202.
#[tokio::test]
async fn a_nul_fails_only_its_own_request() {
    let app = Arc::new(spawn_app().await);
    let clients = 32;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let app = Arc::clone(&app);
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for n in (c..2_000).step_by(clients) {
                let (body, bad) = match n % 10 {
                    0 => match (n / 10) % 3 {
                        0 => (
                            json!({"user_id": "2", "data": {"x": "a\u{0}b"}}),
                            Some("data"),
                        ),
                        1 => (
                            json!({"user_id": "2", "data": {"k\u{0}": [1]}}),
                            Some("data"),
                        ),
                        _ => (
                            json!({"user_id": "2", "idempotency_key": format!("k{n}\u{0}")}),
                            Some("idempotency_key"),
                        ),
                    },
                    _ => (
                        json!({"user_id": (n % 7).to_string(), "data": {"n": n}}),
                        None,
                    ),
                };
                let r = app.post_event(body).await;
                let status = r.status().as_u16();
                let body: Value = r.json().await.expect("a JSON answer");
                answers.push((bad, status, body));
            }
            answers
        }));
    }
    let (mut innocent, mut refused) = (0, 0);
    for task in tasks {
        for (bad, status, body) in task.await.unwrap() {
            match bad {
                None => {
                    assert_eq!(status, 202, "an innocent request failed: {body}");
                    innocent += 1;
                }
                Some(field) => {
                    assert_eq!(status, 422, "a NUL in {field}: {body}");
                    let message = body["error"]["message"].as_str().unwrap();
                    assert!(message.starts_with(field), "names the field: {message}");
                    refused += 1;
                }
            }
        }
    }
    println!("NUL mix: {innocent} innocent requests answered 202, {refused} bad ones 422");
    assert_eq!((innocent, refused), (1_800, 200));
}

fn event(user: &str, data: &str, key: Option<&str>) -> NewEvent {
    NewEvent {
        id: uuid::Uuid::now_v7(),
        producer_id: 1,
        user_id: UserId::parse(user).unwrap(),
        event: EventName::default_push(),
        data: RawValue::from_string(data.to_owned()).unwrap(),
        idempotency_key: key.map(str::to_owned),
        enqueued_at_ms: now_unix_ms(),
    }
}

/// The second line of defence: a group commit that PostgreSQL refuses for one request's data
/// (here the API's validation is bypassed) is split until only that request fails; every other
/// request of the batch is committed, in order.
#[tokio::test]
async fn a_refused_commit_is_split_down_to_the_request_at_fault() {
    let app = spawn_app().await;
    let producer: i64 = sqlx::query_scalar("SELECT id FROM producers LIMIT 1")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    let (_publisher, handle, _reports) = Publisher::new(app.settings.queue.clone());
    let committer = Committer::new(
        app.store.clone(),
        handle,
        Metrics::disabled(),
        &app.settings,
    );
    let bad = [3, 4, 11, 19];
    let requests: Vec<Vec<NewEvent>> = (0..20)
        .map(|i| {
            let mut request = vec![event("7", &format!(r#"{{"n":{i}}}"#), None)];
            if bad.contains(&i) {
                // A NUL in a jsonb string, or in a text column: PostgreSQL refuses both.
                request.push(match i % 2 {
                    0 => event("7", r#"{"x":"\u0000"}"#, None),
                    _ => event("7", "{}", Some("a\0b")),
                });
            }
            request.iter_mut().for_each(|e| e.producer_id = producer);
            request
        })
        .collect();
    let answers = timeout(PATIENCE, committer.flush(requests))
        .await
        .expect("the split commit finishes");
    for (i, answer) in answers.iter().enumerate() {
        if bad.contains(&i) {
            assert!(
                matches!(answer, Err(EnqueueError::Refused(_))),
                "request {i}: {answer:?}"
            );
        } else {
            assert!(answer.is_ok(), "request {i}: {answer:?}");
        }
    }
    // Every innocent request is stored, in submission order, with gap-free seqs.
    let stored: Vec<(i64, Value)> =
        sqlx::query_as("SELECT seq, data FROM events WHERE user_id = '7' ORDER BY seq")
            .fetch_all(app.store.pool())
            .await
            .unwrap();
    let expected: Vec<(i64, Value)> = (0..20)
        .filter(|i| !bad.contains(i))
        .enumerate()
        .map(|(k, i)| (k as i64 + 1, json!({ "n": i })))
        .collect();
    assert_eq!(stored, expected);
}
