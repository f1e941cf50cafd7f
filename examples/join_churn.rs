//! Measures join churn on a socket node: C connections each join and leave their own user topic in a
//! loop for S seconds; prints joins/s. Run it against a local-mode node and a cluster-mode socket
//! node to see what binding a topic on the node's fan-out queue costs (a broker round trip per first
//! join and per last leave).
//!
//! cargo run --release --example join_churn -- <ws-base> <api-base> <api-key> [connections] [seconds]

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(ws_base), Some(api), Some(key)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: join_churn <ws-base> <api-base> <api-key> [connections] [seconds]");
        std::process::exit(2);
    };
    let connections: usize = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(20);
    let seconds: u64 = args.get(5).and_then(|a| a.parse().ok()).unwrap_or(5);
    let http = reqwest::Client::new();
    let joins = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let user = format!("churn-{}-{c}", std::process::id());
        let token: Value = http
            .post(format!("{api}/api/v1/tokens"))
            .bearer_auth(key)
            .json(&json!({"user_id": user}))
            .send()
            .await
            .expect("token")
            .json()
            .await
            .expect("token body");
        let url = format!(
            "{ws_base}/socket/websocket?vsn=2.0.0&token={}",
            token["token"].as_str().unwrap()
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connects");
        let joins = Arc::clone(&joins);
        tasks.push(tokio::spawn(async move {
            let topic = format!("user:{user}");
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let jr = format!("j{n}");
                let join = json!([jr, jr, topic, "phx_join", {}]).to_string();
                ws.send(Message::Text(join.into())).await.unwrap();
                let reply = ws.next().await.unwrap().unwrap();
                assert!(
                    reply.to_text().unwrap().contains("\"ok\""),
                    "join refused: {reply}"
                );
                joins.fetch_add(1, Ordering::Relaxed);
                let leave = json!([jr, format!("l{n}"), topic, "phx_leave", {}]).to_string();
                ws.send(Message::Text(leave.into())).await.unwrap();
                ws.next().await.unwrap().unwrap(); // reply
                ws.next().await.unwrap().unwrap(); // phx_close
            }
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    let total = joins.load(Ordering::Relaxed);
    println!(
        "{total} join+leave cycles on {connections} connections in {:.1?}: {:.0} joins/s",
        started.elapsed(),
        total as f64 / started.elapsed().as_secs_f64()
    );
}
