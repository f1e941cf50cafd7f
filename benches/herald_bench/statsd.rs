//! A StatsD sink standing in for the metrics pipeline, so the node pays for its metrics as in
//! production, and a window onto where the node's time goes: it aggregates the node's own timings
//! (`store.commit.time`, `pipeline.worker.process_time`, ...) and counters per phase, for the
//! report. Every node of a deployment sends here, so a phase's figures cover them all.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Default, Clone, Copy)]
struct Agg {
    count: u64,
    sum: f64,
    max: f64,
}

/// Tags every metric carries (the node's identity): never kept apart, or a two-node phase would
/// split every figure in two.
const IDENTITY_TAGS: [&str; 2] = ["node", "roles"];

/// The node's metrics over a phase, as [`Sink::take`] leaves them: each metric under its StatsD
/// name and type (`name|type`, and `name|type#tag:value` for each of its tags), the way the node
/// names them, beside the datagrams the kernel dropped meanwhile.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Snapshot {
    /// Datagrams the kernel dropped (the sink fell behind): non-zero means the counters undercount.
    #[serde(rename = "statsd.udp_drops")]
    pub udp_drops: u64,
    #[serde(flatten)]
    pub metrics: BTreeMap<String, Figure>,
}

/// One metric's figure over a snapshot.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(untagged)]
pub enum Figure {
    /// A counter: its sum.
    Counter { sum: f64 },
    /// A timing or histogram (ms): how many observations, their mean and maximum.
    Timing { count: u64, mean: f64, max: f64 },
}

/// The sink's aggregates since the last [`Sink::take`].
#[derive(Clone, Default)]
pub struct Sink {
    stats: Arc<Mutex<BTreeMap<String, Agg>>>,
    port: u16,
    /// The socket's kernel drop count at the last `take`.
    drops_seen: Arc<Mutex<u64>>,
}

impl Sink {
    /// Binds a UDP socket on 127.0.0.1 and drains it on a thread; returns the sink and its address.
    pub fn start() -> anyhow::Result<(Self, String)> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        crate::sys::raise_receive_buffer(&socket, 4 << 20);
        let addr = socket.local_addr()?;
        let sink = Self {
            port: addr.port(),
            ..Self::default()
        };
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
        Ok((sink, addr.to_string()))
    }

    /// Timings and histograms (ms) and counters since the last call, then starts afresh.
    pub fn take(&self) -> Snapshot {
        // The lock is poisoned only by a panic in `record`, which leaves the map whole.
        let stats = std::mem::take(&mut *self.stats.lock().unwrap_or_else(PoisonError::into_inner));
        let metrics = stats
            .into_iter()
            .map(|(name, agg)| {
                let kind = name.split('#').next().and_then(|n| n.rsplit('|').next());
                let figure = if kind == Some("c") {
                    Figure::Counter { sum: agg.sum }
                } else {
                    Figure::Timing {
                        count: agg.count,
                        mean: agg.sum / agg.count.max(1) as f64,
                        max: agg.max,
                    }
                };
                (name, figure)
            })
            .collect();
        let drops = crate::sys::udp_drops(self.port).unwrap_or(0);
        let mut seen = self
            .drops_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let udp_drops = drops.saturating_sub(*seen);
        *seen = drops;
        Snapshot { udp_drops, metrics }
    }
}

/// `name:value|type|#tags` -> aggregated under `name|type`, and under `name|type#tag:value` for
/// each tag but the node's identity (tags are few and of low cardinality).
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
    let tags = parts
        .find_map(|p| p.strip_prefix('#'))
        .unwrap_or_default()
        .split(',')
        .filter(|t| {
            t.split_once(':')
                .is_some_and(|(k, _)| !IDENTITY_TAGS.contains(&k))
        });
    let key = format!("{name}|{kind}");
    for key in std::iter::once(key.clone()).chain(tags.map(|t| format!("{key}#{t}"))) {
        let agg = stats.entry(key).or_default();
        agg.count += 1;
        agg.sum += value;
        agg.max = agg.max.max(value);
    }
}

/// A timing's observations in one [`Sink::take`] snapshot: how many, their mean and their maximum
/// (ms); `None` when there was none.
pub fn timing(snapshot: &Snapshot, name: &str) -> Option<(u64, f64, f64)> {
    match snapshot.metrics.get(&format!("{name}|ms"))? {
        Figure::Timing { count, mean, max } if *count > 0 => Some((*count, *mean, *max)),
        _ => None,
    }
}

/// Sum of the counter `name` (optionally `name#tag:value`) over [`Sink::take`] snapshots.
pub fn counter(snapshots: &[Snapshot], name: &str) -> f64 {
    let key = match name.split_once('#') {
        Some((name, tag)) => format!("{name}|c#{tag}"),
        None => format!("{name}|c"),
    };
    snapshots
        .iter()
        .filter_map(|m| match m.metrics.get(&key)? {
            Figure::Counter { sum } => Some(*sum),
            Figure::Timing { .. } => None,
        })
        // Not `sum()`: a float sum of nothing is -0.0, printed "-0".
        .fold(0.0, |total, sum| total + sum)
}

/// What a phase put on the wire, from the node's counters (see [`wire`]).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Wire {
    pub messages: f64,
    pub events: f64,
    pub accepted: f64,
    pub messages_per_event: f64,
    pub events_per_accepted: f64,
    pub commit_messages: f64,
    pub relay_messages: f64,
    pub relay_events: f64,
    pub relay_republished: f64,
    pub replay_events: f64,
    pub confirmed: f64,
    pub unconfirmed: f64,
    /// Cluster mode's fan-out: messages published, and the events they carried.
    pub fanout_messages: f64,
    pub fanout_events: f64,
    pub statsd_udp_drops: u64,
}

/// What a phase put on the wire, from the node's counters: messages handed to the broker per event
/// they carried (batching makes it far below 1; relay republishes and replays would push it up),
/// the events published per event accepted (1.0 when nothing is published twice), and what the
/// outbox relay republished. Over a phase's snapshots (its rounds, its drain); every node of the
/// deployment counts into the same snapshot.
pub fn wire(metrics: &[Snapshot]) -> Wire {
    let messages = counter(metrics, "queue.publish.messages");
    let events = counter(metrics, "queue.publish.events");
    let accepted = counter(metrics, "api.events.accepted");
    Wire {
        messages,
        events,
        accepted,
        messages_per_event: if events > 0.0 { messages / events } else { 0.0 },
        events_per_accepted: if accepted > 0.0 {
            events / accepted
        } else {
            0.0
        },
        commit_messages: counter(metrics, "queue.publish.messages#source:commit"),
        relay_messages: counter(metrics, "queue.publish.messages#source:relay"),
        relay_events: counter(metrics, "queue.publish.events#source:relay"),
        relay_republished: counter(metrics, "pipeline.relay.republished"),
        replay_events: counter(metrics, "queue.publish.events#source:replay"),
        confirmed: counter(metrics, "queue.publish.confirmed"),
        unconfirmed: counter(metrics, "queue.publish.unconfirmed"),
        fanout_messages: counter(metrics, "pubsub.fanout.messages"),
        fanout_events: counter(metrics, "pubsub.fanout.events"),
        statsd_udp_drops: metrics.iter().map(|m| m.udp_drops).sum(),
    }
}
