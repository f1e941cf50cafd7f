//! The bench report: what a run measured, as types, written as `target/bench/latest.json` (the
//! keys BENCHMARKS.md and the scripts read) and rendered as the Markdown table. The harness fills
//! it phase by phase and the table reads it field by field, so a renamed figure is a compile
//! error, never a row of zeros.

use crate::baseline::{BrokerE2e, BrokerLatency, ConsumeCpu};
use crate::protocol::{
    BurstReply, Connected, E2eDone, Ingested, KeepupReply, LatencyReply, PacedReply, Quantiles,
};
use crate::statsd::{self, Snapshot};
use crate::{BATCH_PRODUCERS, E2E_WINDOW, ZIPF_S, loadgen};
use serde::Serialize;
use std::collections::BTreeMap;

/// The most messages per event a phase may publish: batching keeps it far below 1, so anything
/// near it means events went out more than once (relay republishes, replays).
const MAX_MESSAGES_PER_EVENT: f64 = 1.02;

/// The most cross-node fan-out messages per event a cluster phase (closed loop, at saturation) may
/// publish. A worker node sends at most two fan-out messages per confirm round trip and packs the
/// rest, so at saturation a message should carry ten events or more: the fan-out then adds at most
/// a tenth of a broker message per event, the order of what the partition messages cost at a
/// quarter of the sustained rate. One message per user run (what it was) is about 1.
const MAX_FANOUT_MESSAGES_PER_EVENT: f64 = 0.1;

/// Everything one run measured, with the plan it ran.
#[derive(Serialize)]
pub struct Report {
    pub started_unix: u64,
    pub git: String,
    pub machine: String,
    /// `quick` or `full`.
    pub mode: &'static str,
    pub sockets: usize,
    pub concurrency: usize,
    pub batch: usize,
    pub batch_producers: usize,
    /// The raw consumers' prefetch, in messages.
    pub prefetch: u16,
    /// The node's `queue.prefetch`, in events.
    pub herald_prefetch: u16,
    pub commit_streams: usize,
    pub max_inflight_confirms: usize,
    pub e2e_window: u64,
    pub rounds: usize,
    /// Memory per idle socket: the bare echo server's (`raw`) and Herald's.
    pub rss: Rss,
    pub cpu: Cpu,
    pub e2e: Paired<BrokerE2e, HeraldE2e>,
    /// Users Zipf-distributed (`other`) vs uniform (`base`), in the same rounds.
    pub skew: Skew,
    /// At 25%, 50% and 75% of the sustained rate.
    pub latency: Vec<LatencyPoint>,
    /// Single events at fixed rates, one request each: 200/s from one producer, 2,000/s from 16.
    pub paced: Vec<PacedPoint>,
    pub burst: Checkpointed<BurstReply>,
    pub keepup: Keepup,
    pub ingest_batch: Paired<Ingested, HeraldIngest>,
    pub ingest_single: Paired<Ingested, HeraldIngest>,
    pub workers: Attempt<Workers>,
    pub order: Attempt<Order>,
    /// Messages published per event, per phase, in run order.
    pub wire: Vec<WirePhase>,
    pub run_secs: f64,
}

/// A figure with a rate, so that rounds can be ranked and compared.
pub trait Rated {
    /// Events per second.
    fn rate(&self) -> f64;
}

impl Rated for BrokerE2e {
    fn rate(&self) -> f64 {
        self.rate
    }
}

impl Rated for Ingested {
    fn rate(&self) -> f64 {
        self.rate
    }
}

impl Rated for HeraldE2e {
    fn rate(&self) -> f64 {
        self.rate
    }
}

impl Rated for HeraldIngest {
    fn rate(&self) -> f64 {
        self.load.rate
    }
}

/// The rate of a round that may be missing (no rounds): 0.
fn rate_of<T: Rated>(round: Option<&T>) -> f64 {
    round.map_or(0.0, Rated::rate)
}

/// Memory per idle socket.
#[derive(Serialize)]
pub struct Rss {
    /// The bare tokio-tungstenite echo server with the same buffers.
    pub raw: SocketsRss,
    /// Herald, its sockets joined.
    pub herald: SocketsRss,
}

/// A process's resident memory before and after `connect` opened its sockets.
#[derive(Serialize)]
pub struct SocketsRss {
    pub before_bytes: u64,
    pub after_bytes: u64,
    pub sockets: usize,
    pub connect: Connected,
    pub per_socket_bytes: f64,
}

impl SocketsRss {
    /// The growth from `before_bytes` to `after_bytes`, per socket `connect` opened.
    pub fn new(before_bytes: u64, after_bytes: u64, connect: Connected) -> Self {
        let sockets = connect.connected;
        Self {
            before_bytes,
            after_bytes,
            sockets,
            connect,
            per_socket_bytes: after_bytes.saturating_sub(before_bytes) as f64
                / sockets.max(1) as f64,
        }
    }
}

/// CPU time per delivered event.
#[derive(Serialize)]
pub struct Cpu {
    /// lapin's consume + ack.
    pub raw: ConsumeCpu,
    /// The whole node, ingest to push, over the uniform end-to-end rounds.
    pub herald: HeraldCpu,
}

/// The node's CPU over the events it delivered.
#[derive(Serialize)]
pub struct HeraldCpu {
    pub events: f64,
    pub cpu_secs: f64,
    pub cpu_us_per_event: f64,
}

/// One end-to-end round of Herald: the closed loop's figures, the nodes' CPU, every process
/// group's cores and the nodes' own metrics over the measured window.
#[derive(Clone, Serialize)]
pub struct HeraldE2e {
    pub events: u64,
    pub secs: f64,
    pub rate: f64,
    pub cpu_secs: f64,
    pub cores_used: BTreeMap<&'static str, f64>,
    pub node_metrics: Snapshot,
    pub queue_ready_mean: f64,
    pub top_user_share: Option<f64>,
    pub top_user_expected: Option<f64>,
    pub wire: statsd::Wire,
    pub after: E2eDone,
    /// PostgreSQL checkpoints forced during the round (the single node's rounds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forced_checkpoints: Option<i64>,
    /// The partitions each node consumed as the round began (the two-worker rounds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Vec<Option<Vec<u16>>>>,
    /// Gap fills and the lanes' reordering (the rounds across api nodes).
    #[serde(flatten)]
    pub reorder: Option<Reorder>,
}

/// How often the sockets filled a gap, and how the lanes put events back in order.
#[derive(Clone, Serialize)]
pub struct Reorder {
    pub gap_filled: f64,
    pub gap_filled_per_event: f64,
    pub reorder_sorted: f64,
    pub reorder_restored: f64,
    pub reorder_passed: f64,
}

impl Reorder {
    /// The gap fills per event attempted and the lanes' reordering in a round's metrics.
    pub fn of(node_metrics: &Snapshot) -> Self {
        let metrics = std::slice::from_ref(node_metrics);
        let attempted = statsd::counter(metrics, "pipeline.worker.delivered");
        let filled = statsd::counter(metrics, "socket.push.gap_filled");
        let reorder = |outcome: &str| {
            statsd::counter(metrics, &format!("pipeline.lane.reorder#outcome:{outcome}"))
        };
        Self {
            gap_filled: filled,
            gap_filled_per_event: filled / attempted.max(1.0),
            reorder_sorted: reorder("sorted"),
            reorder_restored: reorder("restored"),
            reorder_passed: reorder("passed"),
        }
    }
}

/// Rounds of a raw baseline and of Herald: `raw` and `herald` are the rounds with the median rate,
/// `ratio` the median of the rounds' herald/raw ratios.
#[derive(Serialize)]
pub struct Paired<R, H> {
    pub raw: Option<R>,
    pub herald: Option<H>,
    pub ratio: f64,
    pub rounds: PairedRounds<R, H>,
}

/// Every round of a [`Paired`] figure, in run order.
#[derive(Serialize)]
pub struct PairedRounds<R, H> {
    pub raw: Vec<R>,
    pub herald: Vec<H>,
}

impl<R: Rated + Clone, H: Rated + Clone> Paired<R, H> {
    /// Pairs the rounds of a baseline and of Herald, measured round by round.
    pub fn new(raw: Vec<R>, herald: Vec<H>) -> Self {
        let (median_raw, median_herald, ratio) = compare(&raw, &herald);
        Self {
            raw: median_raw,
            herald: median_herald,
            ratio,
            rounds: PairedRounds { raw, herald },
        }
    }
}

/// Two Herald variants measured in the same rounds: `base` and `other` are the rounds with the
/// median rate, `ratio` the median of the rounds' other/base ratios.
#[derive(Clone, Serialize)]
pub struct Versus<H> {
    pub base: Option<H>,
    pub other: Option<H>,
    pub ratio: f64,
    pub rounds: VersusRounds<H>,
}

/// Every round of a [`Versus`] figure, in run order.
#[derive(Clone, Serialize)]
pub struct VersusRounds<H> {
    pub base: Vec<H>,
    pub other: Vec<H>,
}

impl<H: Rated + Clone> Versus<H> {
    /// Compares the rounds of `other` with those of `base`, round by round.
    pub fn new(base: Vec<H>, other: Vec<H>) -> Self {
        let (median_base, median_other, ratio) = compare(&base, &other);
        Self {
            base: median_base,
            other: median_other,
            ratio,
            rounds: VersusRounds { base, other },
        }
    }
}

/// The median-rate round of `a` and of `b`, and the median of the rounds' b/a rate ratios.
fn compare<A: Rated + Clone, B: Rated + Clone>(a: &[A], b: &[B]) -> (Option<A>, Option<B>, f64) {
    let ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(a, b)| b.rate() / a.rate().max(f64::MIN_POSITIVE))
        .collect();
    (median_by_rate(a), median_by_rate(b), median(ratios))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn median_by_rate<T: Rated + Clone>(rounds: &[T]) -> Option<T> {
    let mut sorted: Vec<&T> = rounds.iter().collect();
    sorted.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    sorted.get(sorted.len() / 2).map(|round| (*round).clone())
}

/// Users Zipf-distributed vs uniform.
#[derive(Serialize)]
pub struct Skew {
    #[serde(flatten)]
    pub versus: Versus<HeraldE2e>,
    /// The Zipf exponent.
    pub s: f64,
}

/// Node A with local pubsub (`base`) vs node A alone in cluster mode (`other`), in the same rounds.
#[derive(Serialize)]
pub struct Workers {
    #[serde(flatten)]
    pub versus: Versus<HeraldE2e>,
    /// The same local node A (`base`) vs nodes A + B in cluster mode (`other`).
    pub two: Versus<HeraldE2e>,
    /// The sockets joining node A in cluster mode.
    pub connect: Connected,
    /// The fan-out exchange's bindings; `None` when `rabbitmqctl` cannot be run.
    pub fanout_bindings: Option<usize>,
    /// Node B joining and leaving, and how long the partitions took to settle.
    pub moves: Vec<Move>,
}

/// A change of the worker nodes.
#[derive(Serialize)]
pub struct Move {
    pub change: &'static str,
    pub secs: f64,
}

/// Two api nodes with the lanes' default reorder window (`other`) vs none (`base`).
#[derive(Serialize)]
pub struct Order {
    #[serde(flatten)]
    pub versus: Versus<HeraldE2e>,
    pub window_ms: u64,
}

/// A phase that may fail without failing the run: its figures, or why it has none.
#[derive(Serialize)]
#[serde(untagged)]
pub enum Attempt<T> {
    Done(T),
    Failed { error: String },
}

impl<T> Attempt<T> {
    fn done(&self) -> Option<&T> {
        match self {
            Self::Done(figures) => Some(figures),
            Self::Failed { .. } => None,
        }
    }

    fn error(&self) -> Option<&str> {
        match self {
            Self::Done(_) => None,
            Self::Failed { error } => Some(error),
        }
    }
}

/// The latency at a fraction of the sustained rate, Herald's and the raw broker's.
#[derive(Serialize)]
pub struct LatencyPoint {
    pub fraction: f64,
    pub rate: f64,
    pub herald: Checkpointed<LatencyReply>,
    pub raw: BrokerLatency,
}

/// Single events at a fixed rate, Herald's send -> push and the raw broker's publish -> consume
/// at the same rate.
#[derive(Serialize)]
pub struct PacedPoint {
    pub herald: Checkpointed<PacedReply>,
    pub raw: BrokerLatency,
}

/// The fixed-rate phases' targets (issue 21): about one WAL flush and one broker round trip.
const PACED_P50_MS: f64 = 3.0;
const PACED_P99_MS: f64 = 6.0;

/// A load generator's answer with the node's metrics and the PostgreSQL checkpoints forced
/// meanwhile (every CREATE or DROP DATABASE of other sessions forces one; commits stall behind
/// it).
#[derive(Serialize)]
pub struct Checkpointed<R> {
    #[serde(flatten)]
    pub load: R,
    pub forced_checkpoints: i64,
    pub node_metrics: Snapshot,
}

/// Pushed vs accepted without a window, and how long PostgreSQL took to see it all delivered.
#[derive(Serialize)]
pub struct Keepup {
    #[serde(flatten)]
    pub load: KeepupReply,
    pub node_metrics: Snapshot,
    pub drained_db_secs: f64,
}

/// A round of Herald's ingest, with the node's metrics and, where the round waits for its backlog
/// to be delivered, that wait and the metrics over it.
#[derive(Clone, Serialize)]
pub struct HeraldIngest {
    #[serde(flatten)]
    pub load: Ingested,
    pub node_metrics: Snapshot,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_metrics: Option<Snapshot>,
}

impl HeraldIngest {
    /// Counts the round's metrics, and its drain's, into `phase`'s wire figures.
    pub fn count_into(&self, phases: &mut Phases, phase: &str) {
        phases.add(phase, &self.node_metrics);
        if let Some(drain) = &self.drain_metrics {
            phases.add(phase, drain);
        }
    }
}

/// A phase's wire figures.
#[derive(Serialize)]
pub struct WirePhase {
    pub phase: String,
    #[serde(flatten)]
    pub figures: statsd::Wire,
}

/// The node's StatsD snapshots of each phase, in run order, for the wire figures: messages
/// published per event and what the relay republished (see [`statsd::wire`]).
#[derive(Default)]
pub struct Phases {
    phases: Vec<(String, Vec<Snapshot>)>,
}

impl Phases {
    /// Adds a snapshot (a round, a drain) to `phase`.
    pub fn add(&mut self, phase: &str, snapshot: &Snapshot) {
        match self.phases.iter_mut().find(|(p, _)| p == phase) {
            Some((_, snapshots)) => snapshots.push(snapshot.clone()),
            None => self.phases.push((phase.to_owned(), vec![snapshot.clone()])),
        }
    }

    /// Each phase's wire figures, in run order.
    pub fn report(&self) -> Vec<WirePhase> {
        self.phases
            .iter()
            .map(|(phase, snapshots)| WirePhase {
                phase: phase.clone(),
                figures: statsd::wire(snapshots),
            })
            .collect()
    }
}

impl Report {
    /// Every figure produced a measurement (the harness works); speed is never asserted.
    ///
    /// # Errors
    /// The figures with no measurement, named.
    pub fn smoke_check(&self) -> anyhow::Result<()> {
        let latency = |f: fn(&LatencyPoint) -> u64| self.latency.get(1).map_or(0, f) as f64;
        let paced = |k: usize, f: fn(&PacedPoint) -> u64| self.paced.get(k).map_or(0, f) as f64;
        let pushed = |p: &PacedPoint| p.herald.load.push.map_or(0, |q| q.count);
        let burst = &self.burst.load;
        let workers = self.workers.done();
        let order = self.order.done().map(|o| &o.versus);
        let mut missing = Vec::new();
        for (figure, value) in [
            ("ingest batch, raw", rate_of(self.ingest_batch.raw.as_ref())),
            (
                "ingest batch, herald",
                rate_of(self.ingest_batch.herald.as_ref()),
            ),
            (
                "ingest single, raw",
                rate_of(self.ingest_single.raw.as_ref()),
            ),
            (
                "ingest single, herald",
                rate_of(self.ingest_single.herald.as_ref()),
            ),
            ("end-to-end, raw", rate_of(self.e2e.raw.as_ref())),
            ("end-to-end, herald", rate_of(self.e2e.herald.as_ref())),
            (
                "end-to-end skewed, herald",
                rate_of(self.skew.versus.other.as_ref()),
            ),
            (
                "end-to-end, node A alone (local)",
                rate_of(workers.and_then(|w| w.versus.base.as_ref())),
            ),
            (
                "end-to-end, node A alone (cluster)",
                rate_of(workers.and_then(|w| w.versus.other.as_ref())),
            ),
            (
                "end-to-end, nodes A + B (cluster)",
                rate_of(workers.and_then(|w| w.two.other.as_ref())),
            ),
            (
                "order across api nodes, window 0",
                rate_of(order.and_then(|o| o.base.as_ref())),
            ),
            (
                "order across api nodes, default window",
                rate_of(order.and_then(|o| o.other.as_ref())),
            ),
            ("latency 50%, raw", latency(|l| l.raw.waits.count)),
            ("latency 50%, herald", latency(|l| l.herald.load.count)),
            ("single events 200/s, raw", paced(0, |p| p.raw.waits.count)),
            ("single events 200/s, herald", paced(0, pushed)),
            (
                "single events 2,000/s, raw",
                paced(1, |p| p.raw.waits.count),
            ),
            ("single events 2,000/s, herald", paced(1, pushed)),
            (
                "burst, others' latency",
                burst.during.unwrap_or_default().count as f64,
            ),
            ("burst, hot user drained", burst.drain_secs.unwrap_or(0.0)),
            ("keep-up, accepted", self.keepup.load.accepted_rate),
            ("keep-up, pushed", self.keepup.load.pushed_rate),
            ("RSS, echo", self.rss.raw.per_socket_bytes),
            ("RSS, herald", self.rss.herald.per_socket_bytes),
            ("CPU, lapin", self.cpu.raw.cpu_us_per_event),
            ("CPU, herald", self.cpu.herald.cpu_us_per_event),
        ] {
            if !measured(value) {
                missing.push(figure);
            }
        }
        if self.wire.is_empty() {
            missing.push("messages per event (no phase counted)");
        }
        for phase in &self.wire {
            if !(measured(phase.figures.messages) && measured(phase.figures.events)) {
                missing.push(&phase.phase);
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("no measurement for: {}", missing.join(", "))
        }
    }

    /// The table of issue 3, as Markdown (BENCHMARKS.md carries it as printed).
    pub fn render(&self) -> String {
        let mut rows: Vec<[String; 5]> = Vec::new();
        rows.push(self.ingest_row(&self.ingest_batch, true));
        rows.push(self.ingest_row(&self.ingest_single, false));
        rows.extend(self.e2e_rows());
        rows.extend(self.cluster_rows());
        rows.extend(self.latency_rows());
        rows.extend(self.paced_rows());
        rows.extend(self.burst_rows());
        rows.push(self.keepup_row());
        rows.extend(self.resource_rows());
        rows.extend(self.wire_row());
        let mut out = format!(
            "\nHerald benchmark ({} run, {}s, git {}) on {}\n\n",
            self.mode,
            thousands(self.run_secs),
            self.git,
            self.machine,
        );
        out.push_str(&format!(
            "Throughput rows: median of {} alternating baseline/Herald rounds (ratio: median of the rounds' ratios).\n\n",
            self.rounds
        ));
        out.push_str("| figure | raw baseline, same run | Herald | ratio | target |\n");
        out.push_str("| --- | --- | --- | --- | --- |\n");
        for row in rows {
            out.push_str(&format!("| {} |\n", row.join(" | ")));
        }
        out.push_str(&self.render_wire());
        out
    }

    fn ingest_row(&self, figure: &Paired<Ingested, HeraldIngest>, batch: bool) -> [String; 5] {
        let (raw, herald) = (
            rate_of(figure.raw.as_ref()),
            rate_of(figure.herald.as_ref()),
        );
        let ratio = format!("{:.2}x", figure.ratio);
        if batch {
            let b = loadgen::BATCH;
            [
                format!(
                    "ingest, events/s, `POST /api/v1/events/batch` ({b} events/request, {BATCH_PRODUCERS} producers)"
                ),
                format!(
                    "{} (UNNEST, {b} rows/statement, {BATCH_PRODUCERS} connections)",
                    thousands(raw)
                ),
                thousands(herald),
                ratio,
                verdict(figure.ratio >= 0.5, ">= 0.5x"),
            ]
        } else {
            let c = self.concurrency;
            [
                format!("ingest, events/s, single `POST /api/v1/events`, {c} concurrent clients"),
                format!("{} (1 row/transaction, {c} connections)", thousands(raw)),
                thousands(herald),
                ratio,
                "none".into(),
            ]
        }
    }

    fn e2e_rows(&self) -> [[String; 5]; 2] {
        let n = self.sockets as f64;
        let (raw, herald) = (
            rate_of(self.e2e.raw.as_ref()),
            rate_of(self.e2e.herald.as_ref()),
        );
        let skew = &self.skew.versus;
        let (uniform, skewed) = (rate_of(skew.base.as_ref()), rate_of(skew.other.as_ref()));
        let top_share = skew
            .other
            .as_ref()
            .and_then(|o| o.top_user_share)
            .unwrap_or(0.0);
        [
            [
                format!(
                    "end-to-end sustained events/s, enqueue -> pushed to {} sockets (closed loop, {E2E_WINDOW} in flight)",
                    thousands(n)
                ),
                format!(
                    "{} (quorum, persistent, {} confirms in flight, prefetch {}, ack each)",
                    thousands(raw),
                    self.max_inflight_confirms,
                    self.prefetch
                ),
                thousands(herald),
                format!("{:.2}x", self.e2e.ratio),
                verdict(self.e2e.ratio >= 1.0, ">= 1.0x (aim 1.5x)"),
            ],
            [
                format!(
                    "end-to-end events/s, users Zipf-distributed (s = {ZIPF_S}; the top user drew {:.0}% of the events), vs uniform",
                    top_share * 100.0
                ),
                format!(
                    "{} (Herald, users uniform, same rounds)",
                    thousands(uniform)
                ),
                thousands(skewed),
                format!("{:.2}x", skew.ratio),
                verdict(skew.ratio >= 0.9, ">= 0.9x"),
            ],
        ]
    }

    fn cluster_rows(&self) -> [[String; 5]; 4] {
        let n = self.sockets as f64;
        let workers = self.workers.done();
        let (local, one, two) = (
            rate_of(workers.and_then(|w| w.versus.base.as_ref())),
            rate_of(workers.and_then(|w| w.versus.other.as_ref())),
            rate_of(workers.and_then(|w| w.two.other.as_ref())),
        );
        let (one_ratio, two_ratio) = workers.map_or((0.0, 0.0), |w| (w.versus.ratio, w.two.ratio));
        let failed = self.workers.error().map(|error| format!("failed: {error}"));
        let connect = workers.map(|w| &w.connect);
        let sockets = connect.map_or(0.0, |c| c.connected as f64);
        let cluster_secs = connect.map_or(0.0, |c| c.secs);
        let local_secs = self.rss.herald.connect.secs;
        // The floor: the bare echo server accepting as many WebSockets from the same load
        // generator (a handshake and one echo each, nothing joined).
        let echo_secs = self.rss.raw.connect.secs;
        let bindings = workers.and_then(|w| w.fanout_bindings);
        let order = self.order.done();
        let reorder = |round: Option<&HeraldE2e>| round.and_then(|h| h.reorder.clone());
        let base = order.and_then(|o| o.versus.base.as_ref());
        let other = order.and_then(|o| o.versus.other.as_ref());
        let (without, with) = (
            reorder(base).map_or(0.0, |r| r.gap_filled_per_event),
            reorder(other).map_or(0.0, |r| r.gap_filled_per_event),
        );
        let with_reorder = reorder(other);
        let sorted = with_reorder.as_ref().map_or(0.0, |r| r.reorder_sorted);
        let waits = with_reorder
            .as_ref()
            .map_or(0.0, |r| r.reorder_restored + r.reorder_passed);
        let local_node = format!(
            "{} (node A alone, local pubsub, same rounds)",
            thousands(local)
        );
        [
            [
                format!(
                    "end-to-end events/s, node A (api,worker,socket; the {} sockets) alone in cluster pubsub",
                    thousands(n)
                ),
                local_node.clone(),
                failed.clone().unwrap_or_else(|| thousands(one)),
                format!("{one_ratio:.2}x"),
                verdict(one_ratio >= 0.9, ">= 0.9x"),
            ],
            [
                "end-to-end events/s, two nodes in cluster pubsub: A + B (worker)".to_owned(),
                local_node,
                failed.unwrap_or_else(|| thousands(two)),
                format!("{two_ratio:.2}x"),
                verdict(
                    two_ratio >= 0.8,
                    ">= 0.8x (2 cores: a second node adds no CPU)",
                ),
            ],
            [
                format!(
                    "{} sockets joining, s (cluster: each join's bucket bound first; {} fan-out bindings)",
                    thousands(sockets),
                    shown(bindings)
                ),
                format!(
                    "{echo_secs:.2} (bare echo server, same load generator: its WebSocket accept alone); local pubsub node {local_secs:.2}"
                ),
                format!("{cluster_secs:.2} (cluster-mode node A)"),
                format!("{:.2}x", cluster_secs / echo_secs.max(1e-9)),
                verdict(
                    cluster_secs <= 2.0
                        && bindings.is_some_and(|b| {
                            b as u64 <= u64::from(herald::config::PubSubSettings::default().buckets)
                        }),
                    "<= 2 s for 10,000; bindings <= pubsub.buckets",
                ),
            ],
            [
                format!(
                    "gap fills per event, two api nodes (A + B, producers alternating, users Zipf-distributed), lanes' reorder window {} ms",
                    shown(order.map(|o| o.window_ms))
                ),
                format!(
                    "{without:.4} (window 0, same rounds; {} events/s)",
                    thousands(rate_of(base))
                ),
                match self.order.error() {
                    Some(error) => format!("failed: {error}"),
                    None => format!(
                        "{with:.4} ({} events/s; {} events put back in place, {} waits)",
                        thousands(rate_of(other)),
                        thousands(sorted),
                        thousands(waits)
                    ),
                },
                format!("{:.2}x rate", order.map_or(0.0, |o| o.versus.ratio)),
                verdict(with <= 0.002, "<= 0.002 gap fills per event"),
            ],
        ]
    }

    fn latency_rows(&self) -> Vec<[String; 5]> {
        let n = self.sockets as f64;
        self.latency
            .iter()
            .enumerate()
            .map(|(k, point)| {
                let (herald, raw) = (&point.herald.load, &point.raw);
                let p99 = herald.p99 as f64;
                [
                    format!(
                        "enqueue -> push latency ms p50 / p99 / max at {:.0}% of sustained ({}/s), {} sockets",
                        point.fraction * 100.0,
                        thousands(point.rate),
                        thousands(n)
                    ),
                    format!(
                        "{:.1} / {:.1} / {:.1} (publish -> consume)",
                        raw.waits.p50, raw.waits.p99, raw.waits.max
                    ),
                    format!(
                        "{:.0} / {p99:.0} / {:.0} ({} forced PG checkpoints)",
                        herald.p50 as f64, herald.max as f64, point.herald.forced_checkpoints
                    ),
                    format!("p99 {}", ratio(p99, raw.waits.p99)),
                    if k == 1 {
                        verdict(p99 <= 25.0, "p99 <= 25 ms")
                    } else {
                        "none".into()
                    },
                ]
            })
            .collect()
    }

    fn paced_rows(&self) -> Vec<[String; 5]> {
        let n = self.sockets as f64;
        self.paced
            .iter()
            .map(|point| {
                let (herald, raw) = (&point.herald.load, &point.raw.waits);
                let push = herald.push.unwrap_or_default();
                let answer = herald.answer.unwrap_or_default();
                [
                    format!(
                        "send -> push latency ms p50 / p99 / max, single events at {}/s from {} producer(s), each request alone, {} sockets",
                        thousands(herald.rate),
                        herald.producers,
                        thousands(n)
                    ),
                    format!(
                        "{:.2} / {:.2} / {:.2} (publish -> consume, same rate)",
                        raw.p50, raw.p99, raw.max
                    ),
                    format!(
                        "{:.2} / {:.2} / {:.2} (answered after p50 {:.2}, p99 {:.2}; {} late sends, {} forced PG checkpoints)",
                        push.p50,
                        push.p99,
                        push.max,
                        answer.p50,
                        answer.p99,
                        herald.late,
                        point.herald.forced_checkpoints
                    ),
                    format!(
                        "p50 {}, p99 {}",
                        ratio(push.p50, raw.p50),
                        ratio(push.p99, raw.p99)
                    ),
                    verdict(
                        push.count > 0 && push.p50 <= PACED_P50_MS && push.p99 <= PACED_P99_MS,
                        &format!("p50 <= {PACED_P50_MS:.0} ms, p99 <= {PACED_P99_MS:.0} ms"),
                    ),
                ]
            })
            .collect()
    }

    fn burst_rows(&self) -> [[String; 5]; 2] {
        let b = &self.burst.load;
        let q = |waits: Option<Quantiles>| waits.unwrap_or_default();
        let (before, during) = (q(b.before), q(b.during));
        [
            [
                format!(
                    "burst: other users' latency ms p50 / p99 / max while {} events go to one user ({} concurrent requests), {} single events/s to {} others",
                    thousands(b.events as f64),
                    b.requests,
                    thousands(b.rate),
                    thousands(b.others as f64),
                ),
                format!(
                    "{:.0} / {:.0} / {:.0} (the same load just before the burst)",
                    before.p50 as f64, before.p99 as f64, before.max as f64
                ),
                format!(
                    "{:.0} / {:.0} / {:.0} ({} events over {:.2} s; p99 {:.0} in the hot user's partition, {:.0} in the others; their requests answered after p99 {:.0})",
                    during.p50 as f64,
                    during.p99 as f64,
                    during.max as f64,
                    during.count,
                    b.window_secs,
                    q(b.during_hot_partition).p99 as f64,
                    q(b.during_other_partitions).p99 as f64,
                    q(b.during_api).p99 as f64,
                ),
                format!("p99 {}", ratio(during.p99 as f64, before.p99 as f64)),
                verdict(during.count > 0 && during.p99 <= 100, "p99 <= 100 ms"),
            ],
            [
                format!(
                    "burst: s from its first request until the hot user's client has all {}",
                    thousands(b.events as f64)
                ),
                format!("requests all answered after {:.2} s", b.answered_secs),
                b.drain_secs.map_or_else(
                    || format!("not within the limit ({} received)", b.hot_received),
                    |s| format!("{s:.2}"),
                ),
                "n/a".into(),
                verdict(b.drain_secs.is_some_and(|s| s <= 2.0), "<= 2 s"),
            ],
        ]
    }

    fn keepup_row(&self) -> [String; 5] {
        let k = &self.keepup.load;
        [
            format!(
                "keep-up: events/s pushed vs accepted, {BATCH_PRODUCERS} producers posting batches of {} as fast as answered to {} sockets (no window)",
                loadgen::BATCH,
                thousands(self.sockets as f64)
            ),
            format!(
                "{} accepted/s (the same window)",
                thousands(k.accepted_rate)
            ),
            format!(
                "{} pushed/s (backlog {} at the end)",
                thousands(k.pushed_rate),
                thousands(k.backlog_at_end as f64)
            ),
            format!("{:.2}x", k.ratio),
            verdict(k.ratio >= 0.9, ">= 0.9x"),
        ]
    }

    fn resource_rows(&self) -> [[String; 5]; 2] {
        let (raw_kb, herald_kb) = (
            self.rss.raw.per_socket_bytes / 1024.0,
            self.rss.herald.per_socket_bytes / 1024.0,
        );
        let (raw_us, herald_us) = (
            self.cpu.raw.cpu_us_per_event,
            self.cpu.herald.cpu_us_per_event,
        );
        [
            [
                format!(
                    "RSS per idle socket, KB ({} connected; Herald's joined)",
                    thousands(self.sockets as f64)
                ),
                format!("{raw_kb:.1} (tokio-tungstenite echo, same buffers)"),
                format!("{herald_kb:.1}"),
                ratio(herald_kb, raw_kb),
                verdict(herald_kb <= 12.0, "<= 12 KB"),
            ],
            [
                "CPU time per delivered event, µs (Herald: whole process, ingest to push)".into(),
                format!(
                    "{raw_us:.1} (lapin consume + ack, prefetch {})",
                    self.prefetch
                ),
                format!("{herald_us:.1}"),
                ratio(herald_us, raw_us),
                verdict(herald_us <= 2.0 * raw_us, "<= 2x"),
            ],
        ]
    }

    fn wire_row(&self) -> Option<[String; 5]> {
        let phases = &self.wire;
        let worst = phases.iter().max_by(|a, b| {
            a.figures
                .messages_per_event
                .total_cmp(&b.figures.messages_per_event)
        })?;
        let per_event = worst.figures.messages_per_event;
        Some([
            format!(
                "messages published per event, the highest of {} phases ({})",
                phases.len(),
                worst.phase
            ),
            "1.00 (the raw baselines publish one event per message)".into(),
            format!(
                "{per_event:.3} ({} relay-republished events in all phases)",
                thousands(phases.iter().map(|p| p.figures.relay_events).sum())
            ),
            format!("{per_event:.3}x"),
            verdict(
                phases
                    .iter()
                    .all(|p| p.figures.messages_per_event <= MAX_MESSAGES_PER_EVENT),
                &format!("<= {MAX_MESSAGES_PER_EVENT} in every phase"),
            ),
        ])
    }

    /// The wire per phase, from the node's StatsD counters over the phase (a drain included where
    /// the phase leaves a backlog): what the group commits and the relay handed to the broker.
    fn render_wire(&self) -> String {
        let mut out = String::from(
            "\nMessages published per event, per phase (node counters; relay = outbox republishes; fan-out = cluster mode's broadcasts to socket nodes, several user runs to a message):\n\n",
        );
        out.push_str("| phase | events accepted | messages published | events published | messages per event | events published per accepted | relay-republished events | fan-out messages per event | target |\n");
        out.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
        for p in &self.wire {
            let w = &p.figures;
            out.push_str(&format!(
                "| {} | {} | {} | {} | {:.3} | {:.3} | {} | {} | {} |\n",
                p.phase,
                thousands(w.accepted),
                thousands(w.messages),
                thousands(w.events),
                w.messages_per_event,
                w.events_per_accepted,
                thousands(w.relay_events),
                if w.fanout_events > 0.0 {
                    let per_event = w.fanout_messages / w.fanout_events;
                    format!(
                        "{per_event:.3} ({} messages; {})",
                        thousands(w.fanout_messages),
                        verdict(
                            per_event <= MAX_FANOUT_MESSAGES_PER_EVENT,
                            &format!("<= {MAX_FANOUT_MESSAGES_PER_EVENT}")
                        )
                    )
                } else {
                    "-".to_owned()
                },
                verdict(
                    w.messages_per_event <= MAX_MESSAGES_PER_EVENT,
                    &format!("<= {MAX_MESSAGES_PER_EVENT}")
                ),
            ));
        }
        let drops: u64 = self.wire.iter().map(|p| p.figures.statsd_udp_drops).sum();
        if drops > 0 {
            out.push_str(&format!(
                "\n{} StatsD datagrams were dropped by the kernel: the counters above undercount.\n",
                thousands(drops as f64)
            ));
        }
        out
    }
}

/// A figure that measured something (NaN did not).
fn measured(figure: f64) -> bool {
    figure > 0.0
}

/// A figure that may be missing, as the JSON shows it: the number, or `null`.
fn shown(figure: Option<impl std::fmt::Display>) -> String {
    figure.map_or_else(|| "null".to_owned(), |f| f.to_string())
}

/// 12345.6 -> "12,346".
pub fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ratio(herald: f64, raw: f64) -> String {
    if raw > 0.0 {
        format!("{:.2}x", herald / raw)
    } else {
        "n/a".into()
    }
}

fn verdict(met: bool, target: &str) -> String {
    format!("{target}: {}", if met { "met" } else { "MISSED" })
}
