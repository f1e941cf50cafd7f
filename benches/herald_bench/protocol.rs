//! What the harness and the load generator say to each other, one JSON line each way: the
//! commands, and a type per answer. Both processes are this binary, so both sides serialise the
//! same types: a renamed field is a compile error on both, never a figure read back as 0.

use serde::{Deserialize, Serialize};

/// One command from the harness.
#[derive(Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Connect `n` plain WebSockets to the echo server, one echo each, and hold them.
    ConnectEcho { port: u16, n: usize },
    /// Drop the echo sockets.
    CloseEcho,
    /// Connect user sockets `s0..s<n>` to Herald and join `user:s<i>` on each; with `base`, to
    /// the node there from now on (API requests included).
    Connect {
        n: usize,
        #[serde(default)]
        base: Option<String>,
    },
    /// Close every user socket (before their node stops) and wait until they are gone.
    Disconnect,
    /// Batch API at full speed for `secs`, from `producers` concurrent producers, to offline users.
    IngestBatch { secs: f64, producers: usize },
    /// Single-event API at full speed for `secs`, from `clients` concurrent clients.
    IngestSingle { secs: f64, clients: usize },
    /// Closed loop to the connected users: at most `window` events accepted but not yet received.
    /// Answers a `start` mark after `warmup`, an `end` mark after `secs` more, then `done` once
    /// everything sent has arrived. Users in round-robin order, or with `skew`, each event's user
    /// drawn from a Zipf distribution of that exponent over the connected users.
    E2e {
        warmup: f64,
        secs: f64,
        producers: usize,
        window: u64,
        #[serde(default)]
        skew: Option<f64>,
        /// The API bases the producers post to, producer `w` to `apis[w % len]` (several api
        /// nodes); empty: the connected node's.
        #[serde(default)]
        apis: Vec<String>,
    },
    /// Open loop at `rate` events/s to the connected users; latency of events accepted between
    /// `warmup` and `warmup + secs`.
    Latency { rate: f64, warmup: f64, secs: f64 },
    /// Open loop without a window: `producers` post batches to the connected users (round-robin)
    /// as fast as they are answered. Answers the events accepted and pushed per second over the
    /// same `secs` after `warmup`, then waits (at most `drain` s) for the backlog to arrive.
    Keepup {
        warmup: f64,
        secs: f64,
        producers: usize,
        drain: u64,
    },
    /// A hot user's burst amid the others' steady load (see [`BurstPlan`]).
    Burst(BurstPlan),
    /// Single events at a fixed `rate` (see [`PacedPlan`]).
    Paced(PacedPlan),
}

/// Single events at a fixed `rate`/s to the connected users in turn, from `producers` producers,
/// each on its own connection, one request at a time, on a schedule of its own spread evenly
/// between the others' (open loop: a slow answer delays that producer's next request, which is
/// counted late, never the schedule). What a small deployment sees every day: no batch to hide
/// in. Latency of the events sent between `warmup` and `warmup + secs`, from the producer's send
/// to the client's receive, in microseconds.
#[derive(Clone, Copy, Serialize, Deserialize)]
pub struct PacedPlan {
    pub rate: f64,
    pub producers: usize,
    pub warmup: f64,
    pub secs: f64,
}

/// A hot user: single events at `rate`/s (open loop) to every connected user but `s0`; after
/// `warmup`, `events` to `s0` at once as `requests` concurrent batch requests. Answers the others'
/// latency before and during the burst (from its first request until `s0` has every burst event,
/// at least `min_window` s) and how long `s0` took to get them all (at most `limit` s).
#[derive(Clone, Copy, Serialize, Deserialize)]
pub struct BurstPlan {
    pub events: u64,
    pub requests: usize,
    pub rate: f64,
    pub warmup: f64,
    pub min_window: f64,
    pub limit: f64,
}

/// Sockets connected (`connect`, `connect_echo`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Connected {
    pub connected: usize,
    pub failed: usize,
    pub secs: f64,
}

/// The echo sockets are dropped (`close_echo`).
#[derive(Serialize, Deserialize)]
pub struct Closed {
    pub closed: bool,
}

/// The user sockets are closed (`disconnect`).
#[derive(Serialize, Deserialize)]
pub struct Disconnected {
    pub disconnected: usize,
    pub secs: f64,
}

/// Events accepted at full speed over `secs`: the API's (`ingest_batch`, `ingest_single`) and
/// the raw PostgreSQL baselines' alike.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ingested {
    pub events: u64,
    pub secs: f64,
    pub rate: f64,
    pub errors: u64,
}

impl Ingested {
    /// `events` accepted (and `errors` failed) since `started`.
    pub fn over(started: std::time::Instant, events: u64, errors: u64) -> Self {
        let secs = started.elapsed().as_secs_f64();
        Self {
            events,
            secs,
            rate: events as f64 / secs,
            errors,
        }
    }
}

/// Where the closed loop (`e2e`) is: its answers are marks, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mark {
    /// The warm-up is over: the measured window starts.
    Start,
    /// The measured window is over.
    End,
    /// Everything sent has arrived (or the wait gave up).
    Done,
}

/// The closed loop's warm-up is over.
#[derive(Serialize, Deserialize)]
pub struct E2eStart {
    pub mark: Mark,
}

/// The closed loop's measured window: events pushed over it and, with a skew, the most frequent
/// user's share of the events drawn (the sampler's own check).
#[derive(Serialize, Deserialize)]
pub struct E2eEnd {
    pub mark: Mark,
    pub events: u64,
    pub secs: f64,
    pub rate: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_user_share: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_user_expected: Option<f64>,
}

/// The closed loop after its window: whether everything sent arrived.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct E2eDone {
    pub mark: Mark,
    pub sent: u64,
    pub received: u64,
    pub drained: bool,
    pub errors: u64,
    pub closed: u64,
}

/// Enqueue -> push latency of the open loop's events (`latency`), ms.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LatencyReply {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
    pub sent: u64,
    pub drained: bool,
    pub late_ticks: u64,
    pub errors: u64,
    pub closed: u64,
}

/// The fixed-rate single events' figures (`paced`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PacedReply {
    pub rate: f64,
    pub producers: usize,
    pub sent: u64,
    pub accepted: u64,
    pub errors: u64,
    /// Requests sent after their slot because the producer's previous answer came late.
    pub late: u64,
    /// Send -> push at the client: the whole durable path as a producer and a client see it.
    pub push: Option<FineQuantiles>,
    /// Send -> 2xx answer: the API and the commit (the rest of `push` is the broker and the
    /// worker).
    pub answer: Option<FineQuantiles>,
    pub drained: bool,
    pub closed: u64,
}

/// Quantiles of a set of waits measured in microseconds, shown in ms with their fraction.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct FineQuantiles {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl FineQuantiles {
    /// The quantiles of a histogram of microseconds, in ms.
    pub fn of_micros(h: &hdrhistogram::Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// p50 / p99 / max (ms), mean and count of a set of waits.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Quantiles {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: f64,
}

/// Events accepted and pushed per second without a window (`keepup`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeepupReply {
    pub secs: f64,
    pub accepted: u64,
    pub pushed: u64,
    pub accepted_rate: f64,
    pub pushed_rate: f64,
    pub ratio: f64,
    pub backlog_at_end: u64,
    pub drained: bool,
    pub drain_secs: f64,
    pub errors: u64,
    pub closed: u64,
}

/// A hot user's burst and the other users' waits meanwhile (`burst`). A `None` set of waits is one
/// whose histogram could not be made.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BurstReply {
    pub events: u64,
    pub requests: usize,
    pub rate: f64,
    pub others: u64,
    pub burst_accepted: u64,
    pub burst_errors: usize,
    pub answered_secs: f64,
    pub hot_received: u64,
    /// Until the hot user's client had every burst event; `None` past the limit.
    pub drain_secs: Option<f64>,
    pub drained: bool,
    pub hot_max_ms: u64,
    pub window_secs: f64,
    pub during: Option<Quantiles>,
    pub before: Option<Quantiles>,
    pub during_hot_partition: Option<Quantiles>,
    pub during_other_partitions: Option<Quantiles>,
    /// The longest wait of the events enqueued in each 100 ms of the window.
    pub during_timeline_max_ms: Vec<u64>,
    /// The others' requests: how long their answer (the commit) took, sent in the window.
    pub during_api: Option<Quantiles>,
    pub before_api: Option<Quantiles>,
    pub background: Background,
    pub closed: u64,
}

/// The other users' open loop during a burst.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Background {
    pub accepted: u64,
    pub errors: u64,
    pub late_ticks: u64,
}
