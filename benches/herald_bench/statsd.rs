//! A StatsD sink standing in for the metrics pipeline, so the node pays for its metrics as in
//! production, and a window onto where the node's time goes: it aggregates the node's own timings
//! (`store.commit.time`, `pipeline.worker.process_time`, ...) per phase, for the report.

use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Default, Clone, Copy)]
struct Agg {
    count: u64,
    sum: f64,
    max: f64,
}

/// The sink's aggregates since the last [`Sink::take`].
#[derive(Clone, Default)]
pub struct Sink {
    stats: Arc<Mutex<BTreeMap<String, Agg>>>,
}

impl Sink {
    /// Binds a UDP socket on 127.0.0.1 and drains it on a thread; returns the sink and its address.
    pub fn start() -> anyhow::Result<(Self, String)> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let addr = socket.local_addr()?.to_string();
        let sink = Self::default();
        let stats = Arc::clone(&sink.stats);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]);
                if let Ok(mut stats) = stats.lock() {
                    for line in text.lines() {
                        record(&mut stats, line);
                    }
                }
            }
        });
        Ok((sink, addr))
    }

    /// Timings and histograms (ms) and counters since the last call, then starts afresh.
    pub fn take(&self) -> Value {
        let stats = match self.stats.lock() {
            Ok(mut stats) => std::mem::take(&mut *stats),
            Err(_) => return Value::Null,
        };
        let mut out = Map::new();
        for (name, agg) in stats {
            let value = if name.ends_with("|c") {
                json!({"sum": agg.sum})
            } else {
                json!({"count": agg.count, "mean": agg.sum / agg.count.max(1) as f64, "max": agg.max})
            };
            out.insert(name, value);
        }
        Value::Object(out)
    }
}

/// `name:value|type|#tags` -> aggregated under `name|type` (tags dropped: they are few).
fn record(stats: &mut BTreeMap<String, Agg>, line: &str) {
    let mut parts = line.split('|');
    let (Some(head), Some(kind)) = (parts.next(), parts.next()) else {
        return;
    };
    let Some((name, value)) = head.rsplit_once(':') else {
        return;
    };
    if kind == "g" {
        return;
    }
    let Ok(value) = value.parse::<f64>() else {
        return;
    };
    let agg = stats.entry(format!("{name}|{kind}")).or_default();
    agg.count += 1;
    agg.sum += value;
    agg.max = agg.max.max(value);
}
