//! Hostile input and resource bounds: one bad request harms nobody else, memory and connections stay
//! bounded, weak secrets are refused.

use crate::common::{Node, PATIENCE, herald_command, spawn_app, spawn_app_with};
use herald::config::Secret;
use herald::event::{EventName, UserId};
use herald::metrics::Metrics;
use herald::pipeline::batch::Flush;
use herald::pipeline::enqueue::{Committer, EnqueueError, Submission};
use herald::queue::Publisher;
use herald::store::NewEvent;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

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
    NewEvent::new(
        1,
        UserId::parse(user).unwrap(),
        EventName::default_push(),
        RawValue::from_string(data.to_owned()).unwrap(),
        key.map(str::to_owned),
    )
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
    let requests: Vec<Submission> = (0..20)
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
            Submission::from(request)
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

/// Writes `head`, then `bytes` one at a time (cycling), `every` apart, until the server closes the
/// connection; returns how long that took and what the server answered before closing.
async fn trickle(
    addr: std::net::SocketAddr,
    head: &str,
    bytes: &[u8],
    every: Duration,
) -> (Duration, String) {
    let started = Instant::now();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    keep_trickling(tcp, bytes, every, started).await
}

async fn keep_trickling(
    mut tcp: TcpStream,
    bytes: &[u8],
    every: Duration,
    started: Instant,
) -> (Duration, String) {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let mut next = bytes.iter().cycle();
    loop {
        tokio::select! {
            read = tcp.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            },
            () = sleep(every) => {
                if let Some(byte) = next.next()
                    && tcp.write_all(&[*byte]).await.is_err()
                {
                    break;
                }
            }
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the server never cut the connection"
        );
    }
    (
        started.elapsed(),
        String::from_utf8_lossy(&answer).into_owned(),
    )
}

/// Headers sent a byte at a time are cut by hyper's header-read timeout, and so is a connection
/// that sends nothing, or nothing more after a response (keep-alive idle).
#[tokio::test]
async fn slow_headers_and_idle_connections_are_cut() {
    let app = spawn_app_with(|s| s.http.header_read_timeout_ms = 500).await;
    let every = Duration::from_millis(100);
    let (took, answer) = trickle(app.addr, "GET /healthz HTTP/1.1\r\nX-Slow: ", b"a", every).await;
    assert!(!answer.contains("200 OK"), "{answer}");
    println!("slow headers (1 byte / 100 ms) cut after {took:?} (header_read_timeout_ms 500)");
    let (took, answer) = trickle(app.addr, "", b"", every).await;
    assert!(!answer.contains("200 OK"), "{answer}");
    println!("a silent connection cut after {took:?}");
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", app.addr);
    let (took, answer) = trickle(app.addr, &request, b"", every).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    println!("a kept-alive connection cut {took:?} after its request");
}

/// A body that stalls between reads fails its request with 408, and one that trickles just fast
/// enough is cut by the request timeout, also 408.
#[tokio::test]
async fn trickled_bodies_are_cut() {
    let app = spawn_app_with(|s| {
        s.http.body_read_timeout_ms = 300;
        s.http.request_timeout_ms = 1_500;
        s.pipeline.enqueue_timeout_ms = 1_000;
    })
    .await;
    let head = format!(
        "POST /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 1000\r\n\r\n",
        app.api_key
    );
    for (every, what) in [
        (Duration::from_millis(600), "stalled"),
        (Duration::from_millis(100), "trickled"),
    ] {
        let (took, answer) = trickle(app.addr, &head, b" ", every).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{what}: {answer}");
        assert!(answer.contains("request_timeout"), "{what}: {answer}");
        println!("a body {what} at 1 byte / {every:?}: 408, connection closed after {took:?}");
    }
}

/// On shutdown the HTTP drain ends `node.shutdown_timeout_ms` after the signal, even with a request
/// whose body never ends (its own timeouts set far beyond).
#[tokio::test]
async fn the_drain_is_bounded_from_the_signal() {
    let mut app = spawn_app_with(|s| {
        s.http.body_read_timeout_ms = 600_000;
        s.http.request_timeout_ms = 600_000;
        s.node.shutdown_timeout_ms = 1_000;
    })
    .await;
    let started = Instant::now();
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n",
        app.api_key
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    // hyper answers 100 Continue once the handler reads the body: the request is in flight.
    let mut buf = [0u8; 256];
    let n = timeout(PATIENCE, tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 100"), "{answer}");
    let slow = tokio::spawn(keep_trickling(
        tcp,
        b" ",
        Duration::from_millis(100),
        started,
    ));
    let signalled = Instant::now();
    app.stop().await;
    println!(
        "drained {:?} after the signal with a never-ending body in flight (shutdown_timeout_ms 1000)",
        signalled.elapsed()
    );
    let (_, answer) = slow.await.unwrap();
    assert!(answer.is_empty(), "the cut request got no answer: {answer}");
}

/// Holds an exclusive lock on `events` (every group commit waits) until the returned transaction
/// is dropped.
async fn stall_commits(pool: &sqlx::PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// With commits stalled, requests beyond `http.max_concurrent_requests` are shed at once with 503
/// and `Retry-After`; the admitted ones are committed once the stall ends.
#[tokio::test]
async fn requests_beyond_the_cap_get_503_at_once() {
    let cap = 4;
    let app = Arc::new(
        spawn_app_with(|s| {
            s.http.max_concurrent_requests = cap;
            s.pipeline.enqueue_timeout_ms = 20_000;
            s.http.request_timeout_ms = 30_000;
        })
        .await,
    );
    let lock = stall_commits(app.store.pool()).await;
    let (done, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let flood = 40;
    for n in 0..flood {
        let (app, done) = (Arc::clone(&app), done.clone());
        tokio::spawn(async move {
            let r = app
                .post_event(json!({"user_id": "1", "data": {"n": n}}))
                .await;
            let retry_after = r.headers().get("retry-after").cloned();
            let _ = done.send((r.status().as_u16(), retry_after));
        });
    }
    // Every request but the admitted ones is answered while the commits are stalled.
    for _ in 0..flood - cap {
        let (status, retry_after) = timeout(PATIENCE, answers.recv()).await.unwrap().unwrap();
        assert_eq!(status, 503);
        assert_eq!(retry_after.unwrap(), "1", "a 503 says when to retry");
    }
    drop(lock);
    for _ in 0..cap {
        let (status, _) = timeout(PATIENCE, answers.recv()).await.unwrap().unwrap();
        assert_eq!(
            status, 202,
            "the admitted requests are committed after the stall"
        );
    }
}

/// A field of `/proc/<pid>/status`, in MiB.
fn proc_status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

/// The real binary, its commits stalled, flooded by 128 clients sending 1 MiB batches: requests
/// beyond the cap are shed with 503, the admitted ones wait for room and get 503 too, or have room
/// and wait for the stalled commit until the request timeout (408); the node's peak RSS stays within what the settings allow (cap x body, plus the enqueue buffer),
/// printed. Once the stall ends, requests are accepted again.
#[tokio::test]
async fn a_stalled_commit_is_answered_503_with_bounded_memory() {
    let app = spawn_app_with(|s| {
        s.http.max_concurrent_requests = 32;
        s.http.max_body_bytes = 1024 * 1024;
        s.pipeline.enqueue_buffer_bytes = 8 * 1024 * 1024;
        s.pipeline.enqueue_timeout_ms = 1_000;
        s.http.request_timeout_ms = 3_000;
    })
    .await;
    let node = Node::serve(&app.settings, &[]).await;
    let (addr, pid) = (node.addr, node.child.id().unwrap());
    let baseline = proc_status_mib(pid, "VmRSS:");
    let lock = stall_commits(app.store.pool()).await;
    // 1,000 events of ~1 KB: one 1 MiB body, shared by every request (reqwest clones Bytes).
    let events: Vec<Value> = (0..1_000)
        .map(|n| json!({"user_id": (n % 50).to_string(), "data": {"pad": "x".repeat(960)}}))
        .collect();
    let body = bytes::Bytes::from(serde_json::to_vec(&json!({ "events": events })).unwrap());
    assert!(body.len() < 1024 * 1024);
    let (clients, rounds) = (128, 2);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, key, body) = (app.http.clone(), app.api_key.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..rounds {
                let r = http
                    .post(format!("http://{addr}/api/v1/events/batch"))
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                statuses.push(r.map(|r| r.status().as_u16()).unwrap_or(0));
            }
            statuses
        }));
    }
    let flood_started = Instant::now();
    let mut counts = std::collections::BTreeMap::new();
    for task in tasks {
        for status in timeout(PATIENCE * 3, task).await.unwrap().unwrap() {
            *counts.entry(status).or_insert(0) += 1;
        }
    }
    let peak = proc_status_mib(pid, "VmHWM:");
    let flood_took = flood_started.elapsed();
    drop(lock);
    let sent = clients * rounds * body.len() / (1024 * 1024);
    println!(
        "stalled commits, {clients} clients x {rounds} requests of {} KiB ({sent} MiB in all): \
         answers {counts:?} in {flood_took:?}; RSS {baseline:.0} MiB before, peak {peak:.0} MiB \
         (cap 32 x 1 MiB bodies + 8 MiB enqueue buffer)",
        body.len() / 1024
    );
    // 0: hyper answered 503 before the 1 MiB body was sent and closed the connection, which the
    // client saw as a transport error (a shed request's body is not read).
    assert!(
        counts.keys().all(|status| [0, 503, 408].contains(status)),
        "503 (shed, or no room within the enqueue timeout) or 408 (room, then the request \
         timeout) while stalled: {counts:?}"
    );
    assert!(
        counts.get(&503).is_some_and(|&n| n > clients),
        "most are shed: {counts:?}"
    );
    // Each admitted request holds its body and its parsed events (about 3x the body) at most.
    let bound = baseline + 32.0 * 3.0 + 8.0 * 3.0 + 64.0;
    assert!(
        peak < bound,
        "peak RSS {peak:.0} MiB over the {bound:.0} MiB the settings allow"
    );
    let r = app
        .http
        .post(format!("http://{addr}/api/v1/events"))
        .bearer_auth(&app.api_key)
        .json(&json!({"user_id": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "accepting again once the stall ends");
}

/// `herald serve` refuses an empty, short or missing secret (saying which setting and how to make
/// one); `--dev` serves without one, and a secret from `herald secret` is accepted.
#[tokio::test]
async fn serve_refuses_weak_or_missing_secrets() {
    let app = spawn_app().await;
    let with_secret = |secret: Option<&str>| {
        let mut settings = app.settings.clone();
        settings.socket.secret = secret.map(Secret::new);
        settings
    };
    for (secret, args) in [
        (Some(""), &[][..]),
        (Some("x"), &[]),
        (Some("change-me"), &[]),
        (Some("31-bytes-31-bytes-31-bytes-31-b"), &[]),
        (None, &[]),
        (Some("short"), &["--dev"]),
    ] {
        let out = herald_command(&with_secret(secret), &["serve"])
            .args(args)
            .output();
        let out = timeout(PATIENCE, out).await.unwrap().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{secret:?} {args:?} was served");
        assert!(
            stderr.contains("HERALD_SECRET") && stderr.contains("herald secret"),
            "{secret:?} {args:?}: {stderr}"
        );
    }
    let generated = herald_command(&app.settings, &["secret"])
        .output()
        .await
        .unwrap();
    let generated = String::from_utf8(generated.stdout)
        .unwrap()
        .trim()
        .to_owned();
    assert!(generated.len() >= 32, "{generated}");
    for (secret, args) in [(None, &["--dev"][..]), (Some(generated.as_str()), &[])] {
        Node::serve(&with_secret(secret), args).await;
    }
}

/// A flood of 3,000 made-up API keys, 64 requests at a time, while real producers keep posting:
/// every producer request gets its 202 (its key stays cached, and its commits have connections of
/// their own), and every made-up key 401 (or 503 if the read pool stayed busy past its acquire
/// timeout). Each made-up key is sent twice: the second is answered from the cache.
#[tokio::test]
async fn a_flood_of_unknown_keys_does_not_starve_ingest() {
    let app = Arc::new(spawn_app_with(|s| s.store.read_connections = 2).await);
    let started = Instant::now();
    let mut flood = Vec::new();
    for c in 0..64 {
        let app = Arc::clone(&app);
        flood.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for n in (c..3_000).step_by(64) {
                let key = format!("made-up-{n}-{}", uuid::Uuid::now_v7().simple());
                for _ in 0..2 {
                    let r = app
                        .http
                        .post(app.url("/api/v1/events"))
                        .bearer_auth(&key)
                        .json(&json!({"user_id": "1"}))
                        .send()
                        .await
                        .unwrap();
                    statuses.push(r.status().as_u16());
                }
            }
            statuses
        }));
    }
    let mut producers = Vec::new();
    for p in 0..4 {
        let app = Arc::clone(&app);
        producers.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for n in 0..100 {
                let r = app
                    .post_event(json!({"user_id": format!("p{p}"), "data": {"n": n}}))
                    .await;
                statuses.push(r.status().as_u16());
            }
            statuses
        }));
    }
    let mut produced = std::collections::BTreeMap::new();
    for task in producers {
        for status in timeout(PATIENCE * 3, task).await.unwrap().unwrap() {
            *produced.entry(status).or_insert(0) += 1;
        }
    }
    let producers_took = started.elapsed();
    let mut flooded = std::collections::BTreeMap::new();
    for task in flood {
        for status in timeout(PATIENCE * 3, task).await.unwrap().unwrap() {
            *flooded.entry(status).or_insert(0) += 1;
        }
    }
    println!(
        "3,000 unknown keys x 2 by 64 clients: {flooded:?} in {:?}; meanwhile 4 producers x 100 \
         events: {produced:?} in {producers_took:?}",
        started.elapsed()
    );
    assert_eq!(
        produced,
        [(202, 400)].into(),
        "every producer request accepted"
    );
    assert!(
        flooded.keys().all(|status| [401, 503].contains(status)),
        "{flooded:?}"
    );
}

/// A node whose stderr reader is gone (a log shipper died; a test harness was killed) still
/// shuts down on SIGTERM: a failed log write costs that log line, not the task that wrote it.
#[tokio::test]
async fn sigterm_stops_a_node_whose_stderr_is_closed() {
    let app = spawn_app().await;
    let mut node = Node::serve(&app.settings, &[]).await;
    node.close_log().await;
    let pid = i32::try_from(node.child.id().unwrap()).unwrap();
    // SAFETY: kill(2) on our own child's pid; it has not been reaped (we wait for it below).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = timeout(PATIENCE, node.child.wait())
        .await
        .expect("the node exits on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}
