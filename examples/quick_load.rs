//! A quick end-to-end load run against a running Herald: connects sockets for U users, enqueues N
//! events through the batch API from C concurrent producers, and reports events/s accepted, events/s
//! pushed (received by the sockets) and enqueue-to-push latency measured at the client.
//!
//! cargo run --release --example quick_load -- http://127.0.0.1:4000 <api-key> [events] [users] [batch] [producers]
//!
//! A smoke measurement, not the benchmark harness: no baseline is measured beside it.

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_tungstenite::tungstenite::Message;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(base), Some(key)) = (args.get(1).cloned(), args.get(2).cloned()) else {
        eprintln!(
            "usage: quick_load <http-base-url> <api-key> [events] [users] [batch] [producers]"
        );
        std::process::exit(2);
    };
    let events: usize = arg(&args, 3, 50_000);
    let users: usize = arg(&args, 4, 100);
    let batch: usize = arg(&args, 5, 100);
    let producers: usize = arg(&args, 6, 4);
    let http = reqwest::Client::new();
    let ws_base = base.replacen("http", "ws", 1);
    let run = now_ms();

    // Connect and join every user's socket first.
    let received = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(events)));
    let mut sockets = Vec::new();
    for u in 0..users {
        let user = format!("load-{run}-{u}");
        let token: Value = http
            .post(format!("{base}/api/v1/tokens"))
            .bearer_auth(&key)
            .json(&json!({ "user_id": user }))
            .send()
            .await
            .expect("token request")
            .json()
            .await
            .expect("token body");
        let url = format!(
            "{ws_base}/socket/websocket?vsn=2.0.0&token={}",
            token["token"].as_str().unwrap()
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("socket connects");
        let join = json!(["1", "1", format!("user:{user}"), "phx_join", {}]).to_string();
        ws.send(Message::Text(join.into())).await.unwrap();
        ws.next().await.expect("join reply").unwrap();
        let (received, latencies) = (Arc::clone(&received), Arc::clone(&latencies));
        sockets.push(tokio::spawn(async move {
            while let Some(Ok(Message::Text(text))) = ws.next().await {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if let Some(at) = frame[4]["at"].as_i64() {
                    latencies.lock().unwrap().push(now_ms() - at);
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    println!(
        "{users} sockets joined; enqueueing {events} events in batches of {batch} from {producers} producers"
    );

    let started = Instant::now();
    let per_producer = events / producers;
    let mut tasks = Vec::new();
    for p in 0..producers {
        let (http, base, key) = (http.clone(), base.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < per_producer {
                let n = batch.min(per_producer - sent);
                let body: Vec<Value> = (0..n)
                    .map(|i| json!({"user_id": format!("load-{run}-{}", (p + sent + i) % users), "event": "push_timed", "data": {"i": sent + i}}))
                    .collect();
                let r = http
                    .post(format!("{base}/api/v1/events/batch"))
                    .bearer_auth(&key)
                    .json(&json!({ "events": body }))
                    .send()
                    .await
                    .expect("batch sent");
                assert!(r.status().is_success(), "batch refused: {}", r.status());
                sent += n;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let accepted_after = started.elapsed();
    let total = per_producer * producers;
    let deadline = Instant::now() + Duration::from_secs(120);
    while received.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pushed_after = started.elapsed();
    let got = received.load(Ordering::Relaxed);
    for s in &sockets {
        s.abort();
    }
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(-1)
    };
    println!(
        "accepted {total} events in {:.2?}: {:.0} events/s",
        accepted_after,
        total as f64 / accepted_after.as_secs_f64()
    );
    println!(
        "pushed   {got} events in {:.2?}: {:.0} events/s end to end",
        pushed_after,
        got as f64 / pushed_after.as_secs_f64()
    );
    println!(
        "enqueue->push latency ms (at saturation): p50 {} p99 {} max {}",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
}
