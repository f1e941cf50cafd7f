//! The soak (scripts/soak; issue 23): Herald under a steady, skewed load for a long time, with
//! retention pruning all along, sampled every `--sample-secs`, so what only time shows (memory that
//! creeps, a table that keeps growing, latency that drifts, a backlog that builds) shows.
//!
//! The bench's pieces, reused: its nodes (the release `herald`, a fresh database and queue prefix,
//! configured through `HERALD_*` only), its StatsD sink (the nodes' own counters per window), `/proc`
//! for RSS and CPU, and a load generator in a process of its own (`soak/load.rs`), which holds the
//! joined sockets and measures enqueue -> push at the client. What is new is the time axis: each
//! window's figures, a table and a chart of them, and the targets judged from the samples
//! (reported PASS or FAIL, never asserted: a soak on a shared two-core box informs, it does not
//! gate).
//!
//! Whatever ends a run (the end, an error, a panic, ctrl-c, SIGTERM), the nodes are stopped, the
//! database dropped and the queues deleted; the samples taken so far are still reported.

pub(crate) mod load;

pub use load::{Args as LoadgenArgs, run as loadgen};

use crate::chart::{Chart, Line, Panel};
use crate::node::{self, Names, Node};
use crate::protocol::Connected;
use crate::report::Attempt;
use crate::{Deployment, out_dir, statsd, sys, thousands};
use anyhow::{Context, bail};
use futures_util::FutureExt;
use hdrhistogram::Histogram;
use load::{Command, Disconnected, Drained, Measured, Started, Stopped, Window, WindowCounts};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The reference: the first and last ten minutes, and memory and database size at minute
/// ten. Runs shorter than twice this use a third of the run instead (see [`reference_secs`]).
const REFERENCE_SECS: f64 = 600.0;
/// Pushed / accepted in every window at least this.
const MIN_PUSH_RATIO: f64 = 0.99;
/// The last span's p99 at most this times the first span's.
const MAX_P99_GROWTH: f64 = 1.5;
/// RSS and database size stay within this fraction of their value at the reference.
const MAX_DRIFT: f64 = 0.10;
/// The sustained-rate measurement (`--fraction`): the bench's closed loop, 16 producers, at most
/// 4,000 events accepted but not yet pushed, measured over 10 s after 5 s of warm-up.
const MEASURE_PRODUCERS: usize = 16;
const MEASURE_WINDOW: u64 = 4_000;
const MEASURE_WARMUP: f64 = 5.0;
const MEASURE_SECS: f64 = 10.0;
/// The per-user retention cap when `--retention-per-user` is not given: small enough that the
/// joined users' history is pruned all along at any rate worth soaking at (see BENCHMARKS.md).
const RETENTION_PER_USER: i64 = 100;
/// The node's PostgreSQL pools (background, writes, reads): modest, since the server's 100
/// connections are shared with other sessions' test suites; enough for the relay, leases,
/// retention and upkeep to run beside each other.
const POOLS: (u32, u32, u32) = (6, 3, 4);

/// `herald-bench soak`: see BENCHMARKS.md, *Soak*.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Minutes of load (30-120 for a real soak; 3 for a smoke check).
    #[arg(long, default_value_t = 60.0)]
    minutes: f64,
    /// Events per second, absolute. Without it, `--fraction` of the rate measured first.
    #[arg(long, conflicts_with = "fraction")]
    rate: Option<f64>,
    /// The load as a fraction of the deployment's sustained rate, measured first (about 15 s).
    #[arg(long, default_value_t = 0.5)]
    fraction: f64,
    /// Sockets connected and joined, one per user `s0..s<sockets>`.
    #[arg(long, default_value_t = 2_000)]
    sockets: usize,
    /// Users the events are drawn over (at least `--sockets`; the ones past it are offline).
    #[arg(long)]
    users: Option<usize>,
    /// Exponent of the Zipf distribution of users (rank k is user `s<k>`): the hot users.
    #[arg(long, default_value_t = 1.1)]
    skew: f64,
    /// Seconds per sample window.
    #[arg(long, default_value_t = 30.0)]
    sample_secs: f64,
    /// Herald nodes, each running every role (more than one: cluster pubsub, sockets and
    /// requests spread over them).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// The nodes' `store.retention_per_user`.
    #[arg(long, default_value_t = RETENTION_PER_USER)]
    retention_per_user: i64,
    /// Delivered events each user already has when the load starts (their seqs 1..N, written
    /// straight into the database, users interleaved as a day's intake would be): with
    /// `--retention-per-user` N, the soak runs on a table of users x N retained events, pruned at
    /// the intake rate (10 M rows: `--users 2000 --prefill-per-user 5000`).
    #[arg(long, default_value_t = 0)]
    prefill_per_user: i64,
    /// The nodes' `store.retention_interval_secs`.
    #[arg(long, default_value_t = 10)]
    retention_interval_secs: u64,
    /// Most events per batch request.
    #[arg(long, default_value_t = crate::loadgen::BATCH)]
    batch: usize,
    /// After the load stops, how long everything accepted has to be pushed and the outbox and
    /// queues to be empty (the no-backlog target).
    #[arg(long, default_value_t = 30.0)]
    drain_secs: f64,
    /// Where the SVG chart goes (default target/bench/soak.svg).
    #[arg(long)]
    chart: Option<PathBuf>,
    /// `cargo bench` appends this; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn say(what: impl AsRef<str>) {
    eprintln!("[soak] {}", what.as_ref());
}

/// One window's figures. `None` is a figure that could not be read (its error is kept).
struct Sample {
    /// Seconds since the load started: the window's start and end.
    from: f64,
    to: f64,
    /// The load generator's window: accepted, pushed, errors, rejoins (latency apart).
    load: WindowCounts,
    /// Enqueue -> push at the clients, of the pushes received in the window.
    latency: Histogram<u64>,
    /// Each node's RSS, bytes.
    rss: Vec<Option<u64>>,
    /// Cores each process group of the box used over the window.
    cores: BTreeMap<&'static str, f64>,
    db: Result<Db, String>,
    queues: Result<Queues, String>,
    /// The nodes' StatsD counters and timings over the window.
    node_metrics: statsd::Snapshot,
}

/// PostgreSQL's side of a sample.
struct Db {
    database_bytes: i64,
    /// Per table of the run's database: total bytes (with indexes and TOAST), live and dead tuples.
    tables: BTreeMap<String, (i64, i64, i64)>,
    outbox_rows: i64,
    /// Checkpoints requested server-wide so far (every CREATE or DROP DATABASE of other sessions
    /// forces one): a latency tail beside one is the box's.
    checkpoints_req: i64,
}

/// RabbitMQ's side: ready messages in the partition queues, the delay queues (retries waiting)
/// and the dead-letter queue.
struct Queues {
    partitions: u64,
    delays: u64,
    dead: u64,
}

impl Db {
    fn table_bytes(&self, table: &str) -> Option<i64> {
        self.tables.get(table).map(|t| t.0)
    }

    fn dead_tuples(&self) -> i64 {
        self.tables.values().map(|t| t.2).sum()
    }
}

impl Sample {
    fn minutes(&self) -> f64 {
        self.to / 60.0
    }

    fn per_sec(&self, count: f64) -> f64 {
        count / self.load.secs.max(1e-3)
    }

    fn accepted_per_sec(&self) -> f64 {
        self.per_sec(self.load.accepted as f64)
    }

    fn pushed_per_sec(&self) -> f64 {
        self.per_sec(self.load.pushed as f64)
    }

    /// Pushed over accepted (to joined users), when anything was accepted.
    fn push_ratio(&self) -> Option<f64> {
        let accepted = self.load.accepted_joined as f64;
        (accepted > 0.0).then(|| self.load.pushed as f64 / accepted)
    }

    fn quantile(&self, q: f64) -> Option<u64> {
        (!self.latency.is_empty()).then(|| self.latency.value_at_quantile(q))
    }

    fn rss_total(&self) -> Option<u64> {
        self.rss.iter().copied().sum()
    }

    fn counter(&self, name: &str) -> f64 {
        // + 0.0: an empty sum is -0.0, which the JSON would show as such.
        statsd::counter(std::slice::from_ref(&self.node_metrics), name) + 0.0
    }

    /// Events retention pruned per second over the window (the nodes' `store.events.pruned`):
    /// once every user is at its cap, about the accepted rate.
    fn pruned_per_sec(&self) -> f64 {
        self.per_sec(self.counter("store.events.pruned"))
    }

    /// The window's rounds of a pass Herald times (`store.retention.time`, `pipeline.sweep.time`):
    /// how many, mean and max ms, over every node.
    fn timing(&self, name: &str) -> Option<(u64, f64, f64)> {
        statsd::timing(&self.node_metrics, name)
    }

    /// The longest retention round and sweep of the window, ms.
    fn prune_sweep_max(&self) -> String {
        let max = |name| shown(self.timing(name).map(|(_, _, max)| format!("{max:.0}")));
        format!(
            "{} / {}",
            max("store.retention.time"),
            max("pipeline.sweep.time")
        )
    }

    fn report(&self) -> SampleReport<'_> {
        SampleReport {
            from_secs: self.from,
            to_secs: self.to,
            minutes: self.minutes(),
            accepted_per_sec: self.accepted_per_sec(),
            pushed_per_sec: self.pushed_per_sec(),
            push_ratio: self.push_ratio(),
            latency_ms: LatencyMs {
                count: self.latency.len(),
                p50: self.quantile(0.5),
                p99: self.quantile(0.99),
                max: self.quantile(1.0),
            },
            load: &self.load,
            rss_bytes: &self.rss,
            cores: &self.cores,
            postgres: match &self.db {
                Ok(db) => Attempt::Done(PostgresFigures {
                    database_bytes: db.database_bytes,
                    tables: db
                        .tables
                        .iter()
                        .map(|(name, &(bytes, live_tuples, dead_tuples))| {
                            let table = TableFigures {
                                bytes,
                                live_tuples,
                                dead_tuples,
                            };
                            (name.as_str(), table)
                        })
                        .collect(),
                    dead_tuples: db.dead_tuples(),
                    outbox_rows: db.outbox_rows,
                    checkpoints_req: db.checkpoints_req,
                }),
                Err(error) => Attempt::Failed {
                    error: error.clone(),
                },
            },
            rabbitmq: match &self.queues {
                Ok(q) => Attempt::Done(RabbitFigures {
                    partitions_ready: q.partitions,
                    delay_ready: q.delays,
                    dead_letter_ready: q.dead,
                }),
                Err(error) => Attempt::Failed {
                    error: error.clone(),
                },
            },
            pruned: self.counter("store.events.pruned"),
            prune_ms: self.timing("store.retention.time").map(PassTiming::from),
            sweep_ms: self.timing("pipeline.sweep.time").map(PassTiming::from),
            sweep_partitions: SweepPartitions {
                idle: self.counter("pipeline.sweep.partitions#state:idle"),
                busy: self.counter("pipeline.sweep.partitions#state:busy"),
            },
            swept_events: self.counter("pipeline.sweep.events"),
            relay_republished: self.counter("pipeline.relay.republished"),
            node_metrics: &self.node_metrics,
        }
    }
}

/// A sample as the JSON carries it.
#[derive(Serialize)]
struct SampleReport<'a> {
    from_secs: f64,
    to_secs: f64,
    minutes: f64,
    accepted_per_sec: f64,
    pushed_per_sec: f64,
    push_ratio: Option<f64>,
    latency_ms: LatencyMs,
    load: &'a WindowCounts,
    rss_bytes: &'a [Option<u64>],
    cores: &'a BTreeMap<&'static str, f64>,
    postgres: Attempt<PostgresFigures<'a>>,
    rabbitmq: Attempt<RabbitFigures>,
    pruned: f64,
    /// The window's retention rounds (null when none ran).
    prune_ms: Option<PassTiming>,
    /// The window's sweeps (null when none ran).
    sweep_ms: Option<PassTiming>,
    sweep_partitions: SweepPartitions,
    swept_events: f64,
    relay_republished: f64,
    node_metrics: &'a statsd::Snapshot,
}

/// Enqueue -> push at the clients over a window, ms; `None` when nothing was pushed.
#[derive(Serialize)]
struct LatencyMs {
    count: u64,
    p50: Option<u64>,
    p99: Option<u64>,
    max: Option<u64>,
}

/// PostgreSQL's side of a sample as the JSON carries it.
#[derive(Serialize)]
struct PostgresFigures<'a> {
    database_bytes: i64,
    tables: BTreeMap<&'a str, TableFigures>,
    dead_tuples: i64,
    outbox_rows: i64,
    checkpoints_req: i64,
}

/// One table's size and tuples.
#[derive(Serialize)]
struct TableFigures {
    bytes: i64,
    live_tuples: i64,
    dead_tuples: i64,
}

/// RabbitMQ's side of a sample as the JSON carries it.
#[derive(Serialize)]
struct RabbitFigures {
    partitions_ready: u64,
    delay_ready: u64,
    dead_letter_ready: u64,
}

/// The partitions the window's sweeps found idle (swept) and busy (left alone).
#[derive(Serialize)]
struct SweepPartitions {
    idle: f64,
    busy: f64,
}

/// A pass's rounds in a window: how many, and their mean and longest, ms.
#[derive(Serialize)]
struct PassTiming {
    rounds: u64,
    mean: f64,
    max: f64,
}

impl From<(u64, f64, f64)> for PassTiming {
    fn from((rounds, mean, max): (u64, f64, f64)) -> Self {
        Self { rounds, mean, max }
    }
}

/// What the end of the load found: the no-backlog target's evidence.
#[derive(Serialize)]
struct End {
    /// Events to joined users accepted but not yet pushed when the producers stopped.
    backlog_at_stop: u64,
    /// Whether everything was pushed, delivered and settled within `--drain-secs`, and when.
    drained: bool,
    drain_secs: f64,
    undelivered: Option<i64>,
    outbox_rows: Option<i64>,
    ready: Option<u64>,
    stopped: Stopped,
}

/// Everything a run produced, kept outside the run itself so that an interrupted or failed run
/// still reports the samples it took.
struct Record {
    meta: Meta,
    samples: Vec<Sample>,
    end: Option<End>,
    /// The load's planned length, s.
    planned_secs: f64,
}

/// The run's plan and what it learnt before the load: a run that ends early has only the
/// figures it got to.
#[derive(Serialize)]
struct Meta {
    started_unix: u64,
    git: String,
    machine: String,
    minutes: f64,
    sockets: usize,
    users: usize,
    skew: f64,
    sample_secs: f64,
    nodes: usize,
    batch: usize,
    /// Every node's `HERALD_*` settings but the StatsD address.
    node_settings: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    postgres_autovacuum: Option<String>,
    /// The history written before the load (`--prefill-per-user`).
    #[serde(skip_serializing_if = "Option::is_none")]
    prefill: Option<Prefill>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connect: Option<Connected>,
    /// The sustained rate, when the soak measured it (no `--rate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    sustained: Option<Measured>,
    /// The soak's rate, events/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_user_share: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    coldest_user_fills_cap_minutes: Option<f64>,
    /// `complete`, or why it ended early.
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    run_secs: Option<f64>,
}

/// The delivered events each user had before the load, and how long writing them took.
#[derive(Serialize)]
struct Prefill {
    per_user: i64,
    secs: f64,
}

/// Runs the soak: starts the deployment, runs [`soak`] under a guard that cleans up whatever
/// ends it, then reports.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let users = args.users.unwrap_or(args.sockets);
    check(&args, users)?;
    sys::ensure_nofile_for(args.sockets)?;
    std::fs::create_dir_all(out_dir())?;
    let names = Names::new();
    let bin = Path::new(env!("CARGO_BIN_EXE_herald"));
    let (sink, statsd_addr) = statsd::Sink::start()?;
    let mut settings = vec![
        ("HERALD_STATSD_ADDR", statsd_addr),
        (
            "HERALD_STORE__RETENTION_PER_USER",
            args.retention_per_user.to_string(),
        ),
        (
            "HERALD_STORE__RETENTION_INTERVAL_SECS",
            args.retention_interval_secs.to_string(),
        ),
        (
            "HERALD_SOCKET__MAX_CONNECTIONS",
            (args.sockets.div_ceil(args.nodes) + 100)
                .max(10_000)
                .to_string(),
        ),
    ];
    settings.extend(pools(POOLS));
    if args.nodes > 1 {
        settings.push(("HERALD_PUBSUB__MODE", "cluster".to_owned()));
    }
    say(format!(
        "{} min, {} node(s), {} sockets, {users} users (Zipf s = {}), a sample every {} s; database {}, queue prefix {}",
        args.minutes,
        args.nodes,
        args.sockets,
        args.skew,
        args.sample_secs,
        names.database,
        names.prefix
    ));
    let mut deployment = Deployment {
        bin,
        names: names.clone(),
        api_key: String::new(),
        settings: settings.clone(),
        nodes: Vec::new(),
    };
    let mut record = Record {
        planned_secs: args.minutes * 60.0,
        meta: Meta {
            started_unix: crate::unix_now(),
            git: crate::git_revision(),
            machine: sys::machine(),
            minutes: args.minutes,
            sockets: args.sockets,
            users,
            skew: args.skew,
            sample_secs: args.sample_secs,
            nodes: args.nodes,
            batch: args.batch,
            node_settings: settings
                .iter()
                .filter(|(k, _)| *k != "HERALD_STATSD_ADDR")
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            postgres_autovacuum: None,
            prefill: None,
            connect: None,
            sustained: None,
            rate: None,
            top_user_share: None,
            coldest_user_fills_cap_minutes: None,
            status: None,
            run_secs: None,
        },
        samples: Vec::new(),
        end: None,
    };
    let guarded = std::panic::AssertUnwindSafe(async {
        deployment.api_key = Node::setup(bin, &names)?;
        for i in 1..=args.nodes {
            let name = if args.nodes == 1 {
                "soak-herald".to_owned()
            } else {
                format!("soak-herald-{i}")
            };
            deployment.start(&name, &[]).await?;
        }
        soak(&args, users, &deployment, &sink, &mut record).await
    })
    .catch_unwind();
    let result = tokio::select! {
        result = guarded => result.unwrap_or_else(|_| Err(anyhow::anyhow!("the soak panicked"))),
        () = stop_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    say("stopping the nodes and cleaning up");
    deployment.stop_all().await;
    node::clean_up(&names).await;
    record.meta.status = Some(match &result {
        Ok(()) => "complete".to_owned(),
        Err(error) => format!("ended early: {error:#}"),
    });
    record.meta.run_secs = Some(started.elapsed().as_secs_f64());
    if !record.samples.is_empty() {
        report(&args, &record)?;
    }
    result
}

/// ctrl-c or SIGTERM (a CI job's timeout, `kill`): either ends the run, cleanly.
async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn check(args: &Args, users: usize) -> anyhow::Result<()> {
    // Written so that NaN fails too.
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !positive(args.minutes) {
        bail!("--minutes must be above 0");
    }
    if !(args.sample_secs.is_finite() && args.sample_secs >= 1.0) {
        bail!("--sample-secs must be at least 1");
    }
    if args.sockets == 0 || args.nodes == 0 || args.batch == 0 {
        bail!("--sockets, --nodes and --batch must be at least 1");
    }
    if users < args.sockets {
        bail!(
            "--users ({users}) must be at least --sockets ({})",
            args.sockets
        );
    }
    if args.rate.is_some_and(|r| !positive(r)) || !positive(args.fraction) {
        bail!("--rate and --fraction must be above 0");
    }
    if args.retention_per_user < 1 {
        bail!("--retention-per-user must be at least 1: the soak is about pruning all along");
    }
    Ok(())
}

/// The soak itself, on a started deployment: sockets, the rate, the load with a sample per window,
/// then the drain at the end. Samples go into `record` as they are taken.
async fn soak(
    args: &Args,
    users: usize,
    deployment: &Deployment<'_>,
    sink: &statsd::Sink,
    record: &mut Record,
) -> anyhow::Result<()> {
    let names = &deployment.names;
    let bases: Vec<String> = deployment.nodes.iter().map(|n| n.base.clone()).collect();
    let pool = crate::baseline::pool(names, 2).await?;
    let upkeep: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(&pool)
        .await?;
    record.meta.postgres_autovacuum = Some(upkeep);
    if args.prefill_per_user > 0 {
        let started = Instant::now();
        prefill(&pool, users, args.prefill_per_user).await?;
        record.meta.prefill = Some(Prefill {
            per_user: args.prefill_per_user,
            secs: started.elapsed().as_secs_f64(),
        });
    }
    let mut load = start_load(args, users, &bases, &deployment.api_key)?;

    say(format!("connecting and joining {} sockets", args.sockets));
    let connected: Connected = load.call(&Command::Connect { n: args.sockets }).await?;
    say(format!(
        "  {} joined ({} failed) in {:.1} s",
        connected.connected, connected.failed, connected.secs
    ));
    record.meta.connect = Some(connected);

    let rate = match args.rate {
        Some(rate) => rate,
        None => {
            say(format!(
                "measuring the sustained rate: closed loop, {MEASURE_PRODUCERS} producers, at most {MEASURE_WINDOW} events in flight, {MEASURE_SECS} s after {MEASURE_WARMUP} s"
            ));
            let measured: Measured = load
                .call(&Command::Measure {
                    warmup: MEASURE_WARMUP,
                    secs: MEASURE_SECS,
                    producers: MEASURE_PRODUCERS,
                    window: MEASURE_WINDOW,
                    drain: 60,
                })
                .await?;
            let sustained = measured.rate;
            if sustained <= 0.0 {
                bail!(
                    "the sustained rate measured nothing: {}",
                    serde_json::to_string(&measured)?
                );
            }
            say(format!(
                "  sustained {}/s; the soak runs at {:.0}% of it",
                thousands(sustained),
                args.fraction * 100.0
            ));
            record.meta.sustained = Some(measured);
            sustained * args.fraction
        }
    };
    record.meta.rate = Some(rate);
    let zipf = crate::zipf::Zipf::new(users, args.skew);
    let coldest_per_sec = zipf.probability(users - 1) * rate;
    let to_fill = (args.retention_per_user - args.prefill_per_user).max(0) as f64;
    let fill_minutes = to_fill / coldest_per_sec.max(1e-9) / 60.0;
    record.meta.top_user_share = Some(zipf.probability(0));
    record.meta.coldest_user_fills_cap_minutes = Some(fill_minutes);
    say(format!(
        "load: {} events/s, the hottest user {:.1}% of them; retention keeps {} delivered events per user, pruning every {} s (the coldest user reaches that after about {:.1} min)",
        thousands(rate),
        zipf.probability(0) * 100.0,
        args.retention_per_user,
        args.retention_interval_secs,
        fill_minutes
    ));

    let mut broker = Broker::new(names);
    let pids: Vec<u32> = deployment.nodes.iter().map(|n| n.pid).collect();
    let mut cpu_before = sys::cpu_by_group(&pids, load.child.id().as_slice());
    sink.take();
    let _: Started = load.call(&Command::Start { rate }).await?;
    let started = Instant::now();
    let total = args.minutes * 60.0;
    let mut from = 0.0;
    loop {
        let to = (from + args.sample_secs).min(total);
        tokio::time::sleep_until((started + Duration::from_secs_f64(to)).into()).await;
        let window: Window = load.call(&Command::Sample).await?;
        let node_metrics = sink.take();
        let latency = histogram_of(&window.latency);
        let secs = window.counts.secs.max(1e-3);
        let cpu_now = sys::cpu_by_group(&pids, load.child.id().as_slice());
        let cores = sys::cores_used(&cpu_before, &cpu_now, secs);
        cpu_before = cpu_now;
        let sample = Sample {
            from,
            to,
            load: window.counts,
            latency,
            rss: deployment
                .nodes
                .iter()
                .map(|n| sys::rss_bytes(n.pid))
                .collect(),
            cores,
            db: read_db(&pool).await.map_err(|e| format!("{e:#}")),
            queues: broker.read().await.map_err(|e| format!("{e:#}")),
            node_metrics,
        };
        say(progress(&sample));
        record.samples.push(sample);
        if to >= total {
            break;
        }
        from = to;
    }

    say("load stopped; waiting for the backlog to drain");
    let stop_at = Instant::now();
    let stopped: Stopped = load.call(&Command::Stop).await?;
    let left = (args.drain_secs - stop_at.elapsed().as_secs_f64()).max(0.0);
    let pushed: Drained = load.call(&Command::Drain { limit: left }).await?;
    let deadline = stop_at + Duration::from_secs_f64(args.drain_secs);
    let mut end = End {
        backlog_at_stop: stopped.backlog,
        drained: false,
        drain_secs: 0.0,
        undelivered: None,
        outbox_rows: None,
        ready: None,
        stopped,
    };
    loop {
        end.undelivered = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE status IN ('accepted', 'published')",
        )
        .fetch_one(&pool)
        .await
        .ok();
        end.outbox_rows = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&pool)
            .await
            .ok();
        end.ready = broker.read().await.ok().map(|q| q.partitions + q.delays);
        end.drain_secs = stop_at.elapsed().as_secs_f64();
        end.drained = pushed.drained
            && end.undelivered == Some(0)
            && end.outbox_rows == Some(0)
            && end.ready == Some(0);
        if end.drained || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    say(format!(
        "  backlog at the stop {}; {} after {:.1} s (undelivered {}, outbox rows {}, ready {})",
        end.backlog_at_stop,
        if end.drained {
            "drained"
        } else {
            "NOT drained"
        },
        end.drain_secs,
        shown(end.undelivered),
        shown(end.outbox_rows),
        shown(end.ready)
    ));
    record.end = Some(end);
    let _: anyhow::Result<Disconnected> = load.call(&Command::Disconnect).await;
    drop(load.stdin);
    let _ = load.child.kill().await;
    broker.close().await;
    pool.close().await;
    Ok(())
}

/// Writes `per_user` delivered events for each of the `users` users (`s0`, `s1`, ...), a day old,
/// in statements of 100 seqs of every user, so that a user's events are spread over the table as
/// a day's intake spreads them; then the users' counters. Before any event of these users exists.
async fn prefill(pool: &sqlx::PgPool, users: usize, per_user: i64) -> anyhow::Result<()> {
    const SEQS_PER_STATEMENT: i64 = 100;
    say(format!(
        "prefilling {} delivered events ({per_user} per user)",
        thousands(users as f64 * per_user as f64)
    ));
    let last_user = users as i64 - 1;
    let mut from = 1;
    while from <= per_user {
        let to = (from + SEQS_PER_STATEMENT - 1).min(per_user);
        sqlx::query(
            "INSERT INTO events (id, producer_id, user_id, seq, event, data, status, attempts,
                                 push_count, enqueued_at, published_at, delivered_at)
             SELECT gen_random_uuid(), (SELECT min(id) FROM producers), 's' || u, n, 'prefill',
                    jsonb_build_object('n', n, 'text', repeat('x', 80)), 'delivered', 1, 1,
                    now() - interval '1 day', now() - interval '1 day', now() - interval '1 day'
             FROM generate_series($1::int8, $2::int8) AS n
             CROSS JOIN generate_series(0, $3::int8) AS u",
        )
        .bind(from)
        .bind(to)
        .bind(last_user)
        .execute(pool)
        .await?;
        if to % (SEQS_PER_STATEMENT * 10) == 0 {
            say(format!("  {to} of {per_user} per user"));
        }
        from = to + 1;
    }
    sqlx::query(
        "INSERT INTO user_seqs (user_id, last_seq)
         SELECT 's' || u, $1 FROM generate_series(0, $2::int8) AS u",
    )
    .bind(per_user)
    .bind(last_user)
    .execute(pool)
    .await?;
    Ok(())
}

/// The soak's load generator process (`soak-loadgen`), on the bench's command pipe.
fn start_load(
    args: &Args,
    users: usize,
    bases: &[String],
    key: &str,
) -> anyhow::Result<crate::Loadgen> {
    spawn_loadgen(&LoadSpec {
        key,
        socket_bases: bases,
        api_bases: &[],
        first_user: 0,
        users,
        source: None,
        skew: args.skew,
        batch: args.batch,
    })
}

/// What a `soak-loadgen` process is started with (see [`load::Args`]).
pub(crate) struct LoadSpec<'a> {
    pub key: &'a str,
    pub socket_bases: &'a [String],
    /// Empty: requests go to the socket bases too.
    pub api_bases: &'a [String],
    pub first_user: usize,
    pub users: usize,
    pub source: Option<std::net::IpAddr>,
    pub skew: f64,
    pub batch: usize,
}

/// Starts a `soak-loadgen` process on the bench's command pipe.
pub(crate) fn spawn_loadgen(spec: &LoadSpec<'_>) -> anyhow::Result<crate::Loadgen> {
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command.args(["soak-loadgen", "--key", spec.key]);
    command.args(["--users", &spec.users.to_string()]);
    command.args(["--first-user", &spec.first_user.to_string()]);
    command.args(["--skew", &spec.skew.to_string()]);
    command.args(["--batch", &spec.batch.to_string()]);
    for base in spec.socket_bases {
        command.args(["--base", base]);
    }
    for base in spec.api_bases {
        command.args(["--api-base", base]);
    }
    if let Some(source) = spec.source {
        command.args(["--source", &source.to_string()]);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start the soak's load generator")?;
    let stdin = child.stdin.take().context("loadgen stdin")?;
    let stdout = child.stdout.take().context("loadgen stdout")?;
    Ok(crate::Loadgen {
        child,
        stdin,
        lines: BufReader::new(stdout).lines(),
    })
}

/// A window's latency histogram from the load generator's (value, count) pairs.
pub(crate) fn histogram_of(pairs: &[[u64; 2]]) -> Histogram<u64> {
    let mut h = Histogram::new_with_bounds(1, 3_600_000, 3)
        .expect("1 ms to an hour at 3 significant figures are valid bounds");
    for &[value, count] in pairs {
        h.saturating_record_n(value, count);
    }
    h
}

/// PostgreSQL's figures for one sample: cheap catalog reads, and a count of the outbox (a small
/// table: messages in flight only).
async fn read_db(pool: &sqlx::PgPool) -> anyhow::Result<Db> {
    let database_bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
        .fetch_one(pool)
        .await?;
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT relname::text, pg_total_relation_size(relid), n_live_tup, n_dead_tup
         FROM pg_stat_user_tables",
    )
    .fetch_all(pool)
    .await?;
    let outbox_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await?;
    let checkpoints_req: i64 = sqlx::query_scalar("SELECT checkpoints_req FROM pg_stat_bgwriter")
        .fetch_one(pool)
        .await?;
    Ok(Db {
        database_bytes,
        tables: rows
            .into_iter()
            .map(|(name, bytes, live, dead)| (name, (bytes, live, dead)))
            .collect(),
        outbox_rows,
        checkpoints_req,
    })
}

/// The run's queues on RabbitMQ, read on a connection of the harness's own (opened again after a
/// failure).
struct Broker {
    settings: herald::config::QueueSettings,
    partitions: Vec<String>,
    delays: Vec<String>,
    dead: String,
    connection: Option<lapin::Connection>,
}

impl Broker {
    fn new(names: &Names) -> Self {
        let settings = names.queue_settings();
        let topology = herald::queue::Topology::new(&settings.prefix, settings.partitions);
        Self {
            partitions: (0..settings.partitions)
                .map(|p| topology.partition_queue(p))
                .collect(),
            delays: herald::config::Settings::default()
                .retry
                .delays_ms()
                .into_iter()
                .map(|ms| topology.delay_queue(ms))
                .collect(),
            dead: topology.dead_letter_queue.clone(),
            settings,
            connection: None,
        }
    }

    async fn read(&mut self) -> anyhow::Result<Queues> {
        let connection = match self.connection.take() {
            Some(open) if open.status().connected() => open,
            _ => herald::queue::connect(&self.settings, "soak").await?,
        };
        let mut queues = self.partitions.clone();
        queues.extend(self.delays.iter().cloned());
        queues.push(self.dead.clone());
        let counts = tokio::time::timeout(
            Duration::from_secs(10),
            herald::queue::ready_counts(&connection, &queues),
        )
        .await
        .context("RabbitMQ took over 10 s to answer")??;
        self.connection = Some(connection);
        let sum = |range: std::ops::Range<usize>| -> u64 {
            counts[range]
                .iter()
                .map(|c| u64::from(c.unwrap_or(0)))
                .sum()
        };
        let (p, d) = (self.partitions.len(), self.delays.len());
        Ok(Queues {
            partitions: sum(0..p),
            delays: sum(p..p + d),
            dead: sum(p + d..p + d + 1),
        })
    }

    async fn close(&mut self) {
        if let Some(connection) = self.connection.take() {
            let _ = connection.close(200, "soak done".into()).await;
        }
    }
}

/// The node settings of pools of (background, writes, reads) connections.
pub(crate) fn pools((background, writes, reads): (u32, u32, u32)) -> Vec<(&'static str, String)> {
    vec![
        ("HERALD_STORE__MAX_CONNECTIONS", background.to_string()),
        ("HERALD_STORE__WRITE_CONNECTIONS", writes.to_string()),
        ("HERALD_STORE__READ_CONNECTIONS", reads.to_string()),
    ]
}

pub(crate) fn shown<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn mib(bytes: Option<f64>) -> String {
    bytes.map_or_else(|| "-".to_owned(), |b| format!("{:.1}", b / 1048576.0))
}

/// One line per sample while the run goes, so an hour's run shows where it is.
fn progress(s: &Sample) -> String {
    let db = s.db.as_ref().ok();
    format!(
        "{:.1} min: accepted {}/s, pushed {}/s, p50/p99 {}/{} ms, RSS {} MiB, database {} MiB, outbox {} rows, ready {}, pruned {}/s",
        s.minutes(),
        thousands(s.accepted_per_sec()),
        thousands(s.pushed_per_sec()),
        shown(s.quantile(0.5)),
        shown(s.quantile(0.99)),
        mib(s.rss_total().map(|b| b as f64)),
        mib(db.map(|d| d.database_bytes as f64)),
        shown(db.map(|d| d.outbox_rows)),
        shown(s.queues.as_ref().ok().map(|q| q.partitions)),
        thousands(s.pruned_per_sec()),
    )
}

/// Seconds that stand for "the first and last ten minutes" and "minute ten": ten minutes, or a
/// third of a run shorter than twenty minutes (a smoke run still gets verdicts, marked scaled).
fn reference_secs(run_secs: f64) -> f64 {
    if run_secs >= 2.0 * REFERENCE_SECS {
        REFERENCE_SECS
    } else {
        run_secs / 3.0
    }
}

/// One target's verdict: `None` when the samples cannot tell.
#[derive(Serialize)]
struct Verdict {
    target: &'static str,
    pass: Option<bool>,
    detail: String,
}

/// The targets, judged from the samples.
fn verdicts(record: &Record) -> Vec<Verdict> {
    let samples = &record.samples;
    let run_secs = samples.last().map_or(0.0, |s| s.to);
    let reference = reference_secs(run_secs);
    let span = format!("{:.1} min", reference / 60.0);
    let mut out = Vec::new();

    let ratios: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| s.push_ratio().map(|r| (s.minutes(), r)))
        .collect();
    let lowest = ratios.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1));
    out.push(Verdict {
        target: "pushed / accepted >= 0.99 in every window",
        pass: lowest.map(|(_, r)| r >= MIN_PUSH_RATIO),
        detail: lowest.map_or_else(
            || "no window accepted anything".to_owned(),
            |(m, r)| {
                let below = ratios.iter().filter(|(_, r)| *r < MIN_PUSH_RATIO).count();
                format!(
                    "lowest {r:.4} (window ending at {m:.1} min); {below} of {} windows below",
                    ratios.len()
                )
            },
        ),
    });

    let merged = |pick: &dyn Fn(&Sample) -> bool| {
        let mut h = histogram_of(&[]);
        for s in samples.iter().filter(|s| pick(s)) {
            let _ = h.add(&s.latency);
        }
        (!h.is_empty()).then(|| (h.value_at_quantile(0.99), h.len()))
    };
    let middle = |s: &Sample| (s.from + s.to) / 2.0;
    let first = merged(&|s| middle(s) <= reference);
    let last = merged(&|s| middle(s) >= run_secs - reference);
    out.push(Verdict {
        target: "p99 over the last 10 min <= 1.5x the first 10 min",
        pass: first
            .zip(last)
            .map(|(f, l)| l.0 as f64 <= MAX_P99_GROWTH * f.0 as f64),
        detail: match first.zip(last) {
            Some((f, l)) => format!(
                "first {span}: p99 {} ms of {} pushes; last {span}: p99 {} ms of {} pushes; {:.2}x",
                f.0,
                thousands(f.1 as f64),
                l.0,
                thousands(l.1 as f64),
                l.0 as f64 / (f.0 as f64).max(1.0)
            ),
            None => "no pushes in one of the spans".to_owned(),
        },
    });

    let at_reference = samples.iter().position(|s| s.to >= reference - 1e-6);
    let drift = |value: &dyn Fn(&Sample) -> Option<f64>| -> Option<(f64, f64, f64)> {
        let i = at_reference?;
        let base = value(&samples[i])?;
        let later: Vec<f64> = samples[i + 1..].iter().filter_map(value).collect();
        if later.is_empty() || base <= 0.0 {
            return None;
        }
        let worst = later
            .iter()
            .map(|v| (v - base) / base)
            .fold(0.0_f64, |w, d| if d.abs() > w.abs() { d } else { w });
        Some((base, *later.last().unwrap_or(&base), worst))
    };
    let nodes = samples.first().map_or(0, |s| s.rss.len());
    let rss: Vec<Option<(f64, f64, f64)>> = (0..nodes)
        .map(|n| drift(&|s: &Sample| s.rss.get(n).copied().flatten().map(|b| b as f64)))
        .collect();
    let worst_rss = rss
        .iter()
        .enumerate()
        .filter_map(|(n, d)| d.map(|d| (n, d)))
        .max_by(|a, b| a.1.2.abs().total_cmp(&b.1.2.abs()));
    out.push(Verdict {
        target: "RSS within 10% of its minute-10 value",
        pass: (rss.iter().all(Option::is_some) && !rss.is_empty())
            .then(|| rss.iter().flatten().all(|d| d.2.abs() <= MAX_DRIFT)),
        detail: match worst_rss {
            Some((n, (base, end, worst))) => format!(
                "{}{} MiB at {span}, {} MiB at the end, {:+.1}% at most since",
                if nodes > 1 {
                    format!("node {}: ", n + 1)
                } else {
                    String::new()
                },
                mib(Some(base)),
                mib(Some(end)),
                worst * 100.0
            ),
            None => format!("no RSS sample after {span}"),
        },
    });

    let db = drift(&|s: &Sample| s.db.as_ref().ok().map(|d| d.database_bytes as f64));
    out.push(Verdict {
        target: "database size flat once pruning runs (within 10% of minute 10)",
        pass: db.map(|d| d.2.abs() <= MAX_DRIFT),
        detail: db.map_or_else(
            || format!("no database size sample after {span}"),
            |(base, end, worst)| {
                format!(
                    "{} MiB at {span}, {} MiB at the end, {:+.1}% at most since",
                    mib(Some(base)),
                    mib(Some(end)),
                    worst * 100.0
                )
            },
        ),
    });

    out.push(Verdict {
        target: "no backlog at the end",
        pass: record.end.as_ref().map(|e| e.drained),
        detail: record.end.as_ref().map_or_else(
            || "the run did not reach its end".to_owned(),
            |e| {
                format!(
                    "{} events accepted but not yet pushed when the load stopped; {} {:.1} s after it (undelivered events {}, outbox rows {}, ready messages {})",
                    thousands(e.backlog_at_stop as f64),
                    if e.drained { "all settled" } else { "NOT all settled" },
                    e.drain_secs,
                    shown(e.undelivered),
                    shown(e.outbox_rows),
                    shown(e.ready)
                )
            },
        ),
    });
    out
}

/// What the table's columns from the nodes' timings are (printed under the table).
const FROM_TIMINGS: &str = "prune / sweep ms: the longest retention round (store.retention.time) and sweep (pipeline.sweep.time) of the window, over every node, `-` when none ran (rounds and means in the JSON); `pruned/s` is store.events.pruned over the window";

/// The samples as a Markdown table, then the verdicts.
fn render(record: &Record, verdicts: &[Verdict]) -> String {
    let header = [
        "min",
        "accepted/s",
        "pushed/s",
        "pushed / accepted",
        "p50 ms",
        "p99 ms",
        "RSS MiB",
        "DB MiB",
        "events / outbox / user_seqs MiB",
        "dead tuples",
        "outbox rows",
        "ready msgs",
        "pruned/s",
        "prune / sweep ms",
        "errors",
        "rejoins",
    ];
    let mut out = format!("| {} |\n", header.join(" | "));
    out.push_str(&format!("|{}\n", " --- |".repeat(header.len())));
    for s in &record.samples {
        let db = s.db.as_ref().ok();
        let table = |t: &str| mib(db.and_then(|d| d.table_bytes(t)).map(|b| b as f64));
        let row = [
            format!("{:.1}", s.minutes()),
            thousands(s.accepted_per_sec()),
            thousands(s.pushed_per_sec()),
            s.push_ratio()
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.3}")),
            shown(s.quantile(0.5)),
            shown(s.quantile(0.99)),
            mib(s.rss_total().map(|b| b as f64)),
            mib(db.map(|d| d.database_bytes as f64)),
            format!(
                "{} / {} / {}",
                table("events"),
                table("outbox"),
                table("user_seqs")
            ),
            shown(db.map(|d| thousands(d.dead_tuples() as f64))),
            shown(db.map(|d| thousands(d.outbox_rows as f64))),
            shown(
                s.queues
                    .as_ref()
                    .ok()
                    .map(|q| thousands(q.partitions as f64)),
            ),
            thousands(s.pruned_per_sec()),
            s.prune_sweep_max(),
            thousands(s.load.request_errors as f64),
            thousands(s.load.rejoins as f64),
        ];
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    out.push_str(&format!("\n{FROM_TIMINGS}.\n"));
    let missing: Vec<String> = record
        .samples
        .iter()
        .flat_map(|s| {
            let at = s.minutes();
            [
                s.db.as_ref()
                    .err()
                    .map(|e| format!("{at:.1} min PostgreSQL: {e}")),
                s.queues
                    .as_ref()
                    .err()
                    .map(|e| format!("{at:.1} min RabbitMQ: {e}")),
            ]
        })
        .flatten()
        .collect();
    if !missing.is_empty() {
        out.push_str(&format!(
            "Figures shown as - could not be read: {}.\n",
            missing.join("; ")
        ));
    }
    out.push_str("\nTargets (judged from the samples; reported, not asserted):\n");
    let run_secs = record.samples.last().map_or(0.0, |s| s.to);
    let reference = reference_secs(run_secs);
    if reference < REFERENCE_SECS {
        out.push_str(&format!(
            "(a run under {:.0} min: \"the first and last 10 min\" read as the first and last {:.1} min, \"minute 10\" as minute {:.1}, a third of the run)\n",
            2.0 * REFERENCE_SECS / 60.0,
            reference / 60.0,
            reference / 60.0
        ));
    }
    for v in verdicts {
        let word = match v.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "n/a",
        };
        out.push_str(&format!("- {}: {word} ({})\n", v.target, v.detail));
    }
    out
}

/// The samples drawn as small multiples, minutes along every x axis.
fn draw(args: &Args, record: &Record) -> String {
    let samples = &record.samples;
    let line = |label: &str, value: &dyn Fn(&Sample) -> Option<f64>| Line {
        label: label.to_owned(),
        points: samples.iter().map(|s| (s.minutes(), value(s))).collect(),
    };
    let db = |s: &Sample, f: &dyn Fn(&Db) -> f64| s.db.as_ref().ok().map(f);
    let mib_of = |b: i64| b as f64 / 1048576.0;
    let nodes = samples.first().map_or(0, |s| s.rss.len());
    let mut panels = vec![
        Panel {
            title: "events/s".into(),
            lines: vec![
                line("accepted", &|s| Some(s.accepted_per_sec())),
                line("pushed", &|s| Some(s.pushed_per_sec())),
            ],
        },
        Panel {
            title: "enqueue -> push, ms".into(),
            lines: vec![
                line("p50", &|s| s.quantile(0.5).map(|v| v as f64)),
                line("p99", &|s| s.quantile(0.99).map(|v| v as f64)),
            ],
        },
        Panel {
            title: "node RSS, MiB".into(),
            lines: (0..nodes)
                .map(|n| {
                    line(
                        &if nodes > 1 {
                            format!("node {}", n + 1)
                        } else {
                            "herald".to_owned()
                        },
                        &move |s: &Sample| {
                            s.rss
                                .get(n)
                                .copied()
                                .flatten()
                                .map(|b| b as f64 / 1048576.0)
                        },
                    )
                })
                .collect(),
        },
        Panel {
            title: "database size, MiB".into(),
            lines: vec![line("pg_database_size", &|s| {
                db(s, &|d| mib_of(d.database_bytes))
            })],
        },
    ];
    let tables = ["events", "outbox", "user_seqs"];
    panels.push(Panel {
        title: "tables with indexes, MiB".into(),
        lines: tables
            .iter()
            .map(|t| {
                line(t, &|s: &Sample| {
                    s.db.as_ref()
                        .ok()
                        .and_then(|d| d.table_bytes(t))
                        .map(mib_of)
                })
            })
            .collect(),
    });
    panels.push(Panel {
        title: "dead tuples".into(),
        lines: vec![line("Herald's tables", &|s| {
            db(s, &|d| d.dead_tuples() as f64)
        })],
    });
    panels.push(Panel {
        title: "outbox rows".into(),
        lines: vec![line("outbox", &|s| db(s, &|d| d.outbox_rows as f64))],
    });
    panels.push(Panel {
        title: "ready messages".into(),
        lines: vec![
            line("partitions", &|s| {
                s.queues.as_ref().ok().map(|q| q.partitions as f64)
            }),
            line("delay queues", &|s| {
                s.queues.as_ref().ok().map(|q| q.delays as f64)
            }),
        ],
    });
    panels.push(Panel {
        title: "events/s pruned".into(),
        lines: vec![line("store.events.pruned", &|s| Some(s.pruned_per_sec()))],
    });
    panels.push(Panel {
        title: "longest retention round and sweep, ms".into(),
        lines: vec![
            line("store.retention.time", &|s| {
                s.timing("store.retention.time").map(|t| t.2)
            }),
            line("pipeline.sweep.time", &|s| {
                s.timing("pipeline.sweep.time").map(|t| t.2)
            }),
        ],
    });
    let run_secs = samples.last().map_or(0.0, |s| s.to);
    let reference = reference_secs(run_secs);
    Chart {
        title: format!(
            "Herald soak: {} events/s, {} sockets, {} node(s), {:.0} min",
            thousands(record.meta.rate.unwrap_or(0.0)),
            args.sockets,
            args.nodes,
            run_secs / 60.0
        ),
        subtitle: format!(
            "{} at {}; a sample every {} s; retention {} events per user every {} s; {}",
            record.meta.machine,
            record.meta.git,
            args.sample_secs,
            args.retention_per_user,
            args.retention_interval_secs,
            record.meta.status.as_deref().unwrap_or("")
        ),
        x_max: run_secs / 60.0,
        marker: Some((reference / 60.0, "reference".into())),
        panels,
        notes: Vec::new(),
    }
    .svg()
}

/// The soak's JSON: the run's plan, its samples, the end and the verdicts.
#[derive(Serialize)]
struct SoakReport<'a> {
    #[serde(flatten)]
    meta: &'a Meta,
    reference_secs: f64,
    planned_secs: f64,
    samples: Vec<SampleReport<'a>>,
    end: Option<&'a End>,
    verdicts: &'a [Verdict],
}

/// Prints the table and verdicts, writes the JSON and the chart.
fn report(args: &Args, record: &Record) -> anyhow::Result<()> {
    let verdicts = verdicts(record);
    println!("{}", render(record, &verdicts));
    let json = SoakReport {
        meta: &record.meta,
        reference_secs: reference_secs(record.samples.last().map_or(0.0, |s| s.to)),
        planned_secs: record.planned_secs,
        samples: record.samples.iter().map(Sample::report).collect(),
        end: record.end.as_ref(),
        verdicts: &verdicts,
    };
    let text = serde_json::to_string_pretty(&json)?;
    let when = record.meta.started_unix;
    std::fs::write(out_dir().join(format!("soak-{when}.json")), &text)?;
    std::fs::write(out_dir().join("soak-latest.json"), &text)?;
    let chart = args
        .chart
        .clone()
        .unwrap_or_else(|| out_dir().join("soak.svg"));
    if let Some(dir) = chart.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&chart, draw(args, record))?;
    say(format!(
        "JSON in {}, chart in {}",
        out_dir().join("soak-latest.json").display(),
        chart.display()
    ));
    Ok(())
}
