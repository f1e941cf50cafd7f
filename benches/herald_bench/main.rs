//! The benchmark harness: Herald against the raw ceilings of PostgreSQL, RabbitMQ and WebSocket,
//! measured in the same run on the same box (scripts/bench; see BENCHMARKS.md).
//!
//! Our machines are shared and noisy, so no absolute figure means much on its own: every Herald
//! figure is printed beside the raw ceiling of the component under it, measured minutes apart, and
//! the ratio is the result. Three processes take part: this harness (it orchestrates, reads `/proc`,
//! and runs the raw baselines while the node idles), the release `herald` binary it starts on a
//! fresh database and queue prefix, and the load generator (this binary again, `loadgen`), which
//! holds the N sockets and drives the API. A fourth, the bare echo server (`echo`), lives only for
//! the memory baseline.
//!
//! A harness-less `[[bench]]`: its dependencies are dev-dependencies, so none of them reaches the
//! `herald` binary, and `cargo bench` builds that binary in release mode for us to start.

mod baseline;
mod chart;
mod echo;
mod loadgen;
mod node;
mod protocol;
mod prunecost;
mod report;
mod rowcost;
mod scale;
mod soak;
mod sockmem;
mod statsd;
mod sys;
mod zipf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::FutureExt;
use node::{Names, Node};
use protocol::{
    BurstPlan, BurstReply, Closed, Command, Connected, Disconnected, E2eDone, E2eEnd, E2eStart,
    Ingested, KeepupReply, LatencyReply, PacedPlan, PacedReply,
};
use report::{
    Attempt, Checkpointed, Cpu, HeraldCpu, HeraldE2e, HeraldIngest, Keepup, LatencyPoint, Move,
    Order, PacedPoint, Paired, Phases, Reorder, Report, Rss, Skew, SocketsRss, Versus, Workers,
    thousands,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// Concurrent producers of the batch API, and connections of the UNNEST baseline: the same client
/// concurrency on both sides. Sixteen, so the end-to-end loop can fill its window: four
/// 100-event requests hold at most 400 events in flight, and the loop then measured one group
/// commit's latency (12-14k events/s) rather than what the node does with the window the raw
/// broker loop gets (1,000 publishes in flight): 26k events/s with 16 (quick_load, same box).
const BATCH_PRODUCERS: usize = 16;
/// The raw consumers' prefetch: messages a broker consumer may hold unacked. Herald's
/// `queue.prefetch` counts events per partition since the pipeline batches events into messages, so
/// the raw baselines, which publish one event per message, keep a per-message value of their own:
/// 200, what Herald's prefetch was while it carried one event per message.
const RAW_PREFETCH: u16 = 200;
/// Exponent of the skewed phase's Zipf distribution of users: with s = 1.1 over 10,000 users the
/// most frequent one gets about 15% of the events (21% over 200), the top 1% about half.
const ZIPF_S: f64 = 1.1;
/// Events of the burst to one user, as concurrent batch requests of [`loadgen::BATCH`] (50). The
/// quick run sends them all too: the phase's length is its warm-up and window, not the burst.
const BURST_EVENTS: u64 = 5_000;
/// Single events per second to the other users while one user takes the burst: a modest steady load
/// whose latency shows whether the hot user holds anyone else up.
const BURST_BACKGROUND_RATE: f64 = 500.0;
/// The burst phase measures the others' latency from the burst's first request until the hot user
/// has it all, and over at least this long (s), so that a fast drain still leaves a few hundred
/// samples.
const BURST_MIN_WINDOW: f64 = 1.0;
/// The fixed-rate phases of single events: (events/s, producers). 200/s from one producer is what
/// a small deployment sees every day; 2,000/s from 16 is a busy one's steady trickle.
const PACED: [(f64, usize); 2] = [(200.0, 1), (2_000.0, 16)];
/// Closed-loop window of the end-to-end figure: events accepted but not yet pushed. Under
/// `queue.publish_buffer`, so the loop measures delivery, not the outbox relay.
const E2E_WINDOW: u64 = 4000;

#[derive(Parser, Debug)]
#[command(
    name = "herald-bench",
    about = "Herald vs the raw ceilings under it, in one run"
)]
struct Cli {
    /// A smoke run in under a minute: few sockets, short phases. Asserts nothing about speed.
    #[arg(long)]
    quick: bool,
    /// Sockets connected (and joined) through the socket, end-to-end and latency figures.
    #[arg(long)]
    sockets: Option<usize>,
    /// The raw consumers' prefetch, in messages (basic.qos of the broker baselines).
    #[arg(long, default_value_t = RAW_PREFETCH)]
    prefetch: u16,
    /// The node's `queue.prefetch` (events in work per partition); Herald's default when not given.
    /// Apart from `--prefetch`: one counts messages, the other events.
    #[arg(long)]
    herald_prefetch: Option<u16>,
    /// The node's `pipeline.commit_streams` (group commits in flight at once); Herald's default
    /// when not given.
    #[arg(long)]
    commit_streams: Option<usize>,
    /// Concurrent clients of the single-event API, and connections of its one-row baseline.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// `cargo bench` appends this; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    #[command(subcommand)]
    role: Option<Role>,
}

#[derive(Subcommand, Debug)]
enum Role {
    /// (internal) The load generator, driven over stdin/stdout.
    Loadgen {
        #[arg(long)]
        base: String,
        #[arg(long)]
        key: String,
    },
    /// (internal) The bare tokio-tungstenite echo server of the memory baseline.
    Echo,
    /// The soak: a steady load for a long time, sampled (scripts/soak; BENCHMARKS.md, *Soak*).
    Soak(soak::Args),
    /// (internal) The soak's load generator, driven over stdin/stdout.
    SoakLoadgen(soak::LoadgenArgs),
    /// Memory per idle socket alone, against the echo server (scripts/sockmem).
    Sockmem(sockmem::Args),
    /// What a group commit costs inside PostgreSQL, per event (BENCHMARKS.md, *Per-row costs*).
    Rowcost(rowcost::Args),
    /// What pruning by the per-user cap costs inside PostgreSQL, per pruned event (BENCHMARKS.md,
    /// *Pruning costs*).
    Prunecost(prunecost::Args),
    /// 100,000 sockets over several socket nodes, beside one node's 10,000 (scripts/scale).
    Scale(scale::Args),
}

/// Phase lengths, in seconds.
struct Plan {
    sockets: usize,
    concurrency: usize,
    ingest: f64,
    e2e_warmup: f64,
    e2e: f64,
    latency_warmup: f64,
    latency: f64,
    /// The measured window of each fixed-rate phase.
    paced: f64,
    prefill: u64,
    /// Warm-up of the burst phase: the others' load alone, also its "before" latency.
    burst_warmup: f64,
    /// Baseline/Herald pairs of the throughput figures.
    rounds: usize,
    /// The raw consumers' prefetch, in messages.
    prefetch: u16,
    /// The node's `queue.prefetch` when the caller set it (else the node runs Herald's default).
    herald_prefetch: Option<u16>,
    /// The node's `pipeline.commit_streams` when the caller set it.
    commit_streams: Option<usize>,
    /// Publishes awaiting a confirm, Herald's and the raw publishers'.
    max_inflight: usize,
    quick: bool,
}

impl Plan {
    /// How long a phase waits for the node to deliver its backlog before going on, s.
    fn drain_limit_secs(&self) -> u64 {
        if self.quick { 20 } else { 120 }
    }

    fn new(cli: &Cli) -> Self {
        let quick = cli.quick;
        Self {
            sockets: cli.sockets.unwrap_or(if quick { 200 } else { 10_000 }),
            concurrency: cli.concurrency,
            ingest: if quick { 2.0 } else { 5.0 },
            e2e_warmup: if quick { 1.0 } else { 3.0 },
            e2e: if quick { 3.0 } else { 8.0 },
            latency_warmup: if quick { 0.5 } else { 3.0 },
            latency: if quick { 1.5 } else { 10.0 },
            paced: if quick { 1.5 } else { 20.0 },
            prefill: if quick { 5_000 } else { 100_000 },
            burst_warmup: if quick { 1.5 } else { 3.0 },
            rounds: if quick { 1 } else { 3 },
            prefetch: cli.prefetch,
            herald_prefetch: cli.herald_prefetch,
            commit_streams: cli.commit_streams,
            max_inflight: herald::config::QueueSettings::default().max_inflight_confirms,
            quick,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.role {
        Some(Role::Loadgen { ref base, ref key }) => {
            runtime.block_on(loadgen::run(base.clone(), key.clone()))
        }
        Some(Role::Echo) => runtime.block_on(echo::run()),
        Some(Role::Soak(args)) => runtime.block_on(soak::run(args)),
        Some(Role::SoakLoadgen(args)) => runtime.block_on(soak::loadgen(args)),
        Some(Role::Sockmem(args)) => runtime.block_on(sockmem::run(args)),
        Some(Role::Rowcost(args)) => runtime.block_on(rowcost::run(args)),
        Some(Role::Prunecost(args)) => runtime.block_on(prunecost::run(args)),
        Some(Role::Scale(args)) => runtime.block_on(scale::run(args)),
        None => runtime.block_on(harness(Plan::new(&cli))),
    }
}

/// The load generator process and its command pipe.
struct Loadgen {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Loadgen {
    fn start(base: &str, key: &str) -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["loadgen", "--base", base, "--key", key])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("start the load generator")?;
        let stdin = child.stdin.take().context("loadgen stdin")?;
        let stdout = child.stdout.take().context("loadgen stdout")?;
        Ok(Self {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }

    async fn send(&mut self, command: &impl Serialize) -> anyhow::Result<()> {
        let line = serde_json::to_string(command)?;
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// The next answer, as the type the command answers with.
    async fn recv<R: DeserializeOwned>(&mut self) -> anyhow::Result<R> {
        let line = self
            .lines
            .next_line()
            .await?
            .context("the load generator exited")?;
        serde_json::from_str(&line).with_context(|| format!("the load generator answered {line}"))
    }

    async fn call<R: DeserializeOwned>(&mut self, command: &impl Serialize) -> anyhow::Result<R> {
        self.send(command).await?;
        self.recv().await
    }
}

fn out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("bench")
}

fn say(what: impl AsRef<str>) {
    eprintln!("[bench] {}", what.as_ref());
}

async fn harness(plan: Plan) -> anyhow::Result<()> {
    let started = Instant::now();
    sys::ensure_nofile_for(plan.sockets)?;
    std::fs::create_dir_all(out_dir())?;
    let names = Names::new();
    let bin = Path::new(env!("CARGO_BIN_EXE_herald"));
    say(format!(
        "{} run: {} sockets, database {}, queue prefix {}",
        if plan.quick { "quick" } else { "full" },
        plan.sockets,
        names.database,
        names.prefix
    ));
    let (sink, statsd) = statsd::Sink::start()?;
    let mut settings = vec![("HERALD_STATSD_ADDR", statsd)];
    if let Some(prefetch) = plan.herald_prefetch {
        settings.push(("HERALD_QUEUE__PREFETCH", prefetch.to_string()));
    }
    if let Some(streams) = plan.commit_streams {
        settings.push(("HERALD_PIPELINE__COMMIT_STREAMS", streams.to_string()));
        let writers =
            (streams + 2).max(herald::config::StoreSettings::default().write_connections as usize);
        settings.push(("HERALD_STORE__WRITE_CONNECTIONS", writers.to_string()));
    }
    let mut deployment = Deployment {
        bin,
        names: names.clone(),
        api_key: String::new(),
        settings,
        nodes: Vec::new(),
    };
    // An error, a panic or ctrl-c in any step must still stop every node and drop the database and
    // queues.
    let guarded = std::panic::AssertUnwindSafe(async {
        deployment.api_key = Node::setup(bin, &names)?;
        deployment.start("herald", &[]).await?;
        run(&plan, &names, &mut deployment, &sink).await
    })
    .catch_unwind();
    let result = tokio::select! {
        result = guarded => result.unwrap_or_else(|_| Err(anyhow::anyhow!("a phase panicked"))),
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    say("stopping the nodes and cleaning up");
    deployment.stop_all().await;
    node::clean_up(&names).await;
    let mut report = result?;
    report.run_secs = started.elapsed().as_secs_f64();
    let table = report.render();
    println!("{table}");
    let when = report.started_unix;
    let json_text = serde_json::to_string_pretty(&report)?;
    std::fs::write(
        out_dir().join(format!("herald-bench-{when}.json")),
        &json_text,
    )?;
    std::fs::write(out_dir().join("latest.json"), &json_text)?;
    say(format!(
        "done in {:.0} s; JSON in {}",
        started.elapsed().as_secs_f64(),
        out_dir().join("latest.json").display()
    ));
    report.smoke_check()
}

/// The nodes running now, all on the run's database and queue prefix, and how to start more.
struct Deployment<'a> {
    bin: &'a Path,
    names: Names,
    api_key: String,
    /// Every node's `HERALD_*` settings (StatsD, the prefetch if given).
    settings: Vec<(&'static str, String)>,
    nodes: Vec<Node>,
}

impl Deployment<'_> {
    /// Starts a node named `name` with `extra` settings (logging to `target/bench/<name>.log`).
    async fn start(&mut self, name: &str, extra: &[(&'static str, String)]) -> anyhow::Result<()> {
        let mut settings = self.settings.clone();
        settings.extend(extra.iter().cloned());
        let log = out_dir().join(format!("{name}.log"));
        let node = Node::spawn(self.bin, &self.names, &self.api_key, &settings, log).await?;
        self.nodes.push(node);
        Ok(())
    }

    /// Stops every node: all are told at once (SIGTERM) and drain together.
    async fn stop_all(&mut self) {
        for node in &self.nodes {
            sys::terminate(node.pid);
        }
        for node in self.nodes.drain(..) {
            node.stop().await;
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn git_revision() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

async fn run(
    plan: &Plan,
    names: &Names,
    deployment: &mut Deployment<'_>,
    sink: &statsd::Sink,
) -> anyhow::Result<Report> {
    let node = deployment.nodes.first().context("no node")?;
    let started_unix = unix_now();
    let mut phases = Phases::default();
    let pool = baseline::pool(names, plan.concurrency.max(BATCH_PRODUCERS) as u32 + 2).await?;
    let producer = baseline::create_raw_table(&pool).await?;
    let mut load = Loadgen::start(&node.base, &node.api_key)?;

    // Memory first, on a fresh node: what N idle sockets cost before any load grew the heap.
    say(format!("RSS: bare echo server, {} sockets", plan.sockets));
    let echo_rss = echo_rss(&mut load, plan.sockets).await?;
    say(format!(
        "RSS: herald, {} sockets connected and joined",
        plan.sockets
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = node.rss_bytes();
    let connected: Connected = load
        .call(&Command::Connect {
            n: plan.sockets,
            base: None,
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = Rss {
        raw: echo_rss,
        herald: SocketsRss::new(before, node.rss_bytes(), connected),
    };

    say(format!(
        "CPU: lapin consume+ack of {} messages",
        plan.prefill
    ));
    let raw_cpu = baseline::consume_cpu(names, plan.prefill, plan.prefetch).await?;

    // Rounds alternate baseline and Herald, and the ratio is the median of the rounds' ratios: on a
    // shared box the noise moves within minutes, and a pair measured back to back sees the same.
    let mut raw_rounds = Vec::new();
    let mut herald_rounds = Vec::new();
    let mut skew_rounds = Vec::new();
    for round in 1..=plan.rounds {
        say(format!(
            "end-to-end, round {round}/{}: raw broker publish+consume",
            plan.rounds
        ));
        let raw = baseline::broker_e2e(
            names,
            plan.e2e_warmup,
            plan.e2e,
            plan.prefetch,
            plan.max_inflight,
            E2E_WINDOW,
        )
        .await?;
        say(format!("  {:.0} events/s", raw.rate));
        raw_rounds.push(raw);
        // Uniform and skewed alternate which goes first, so neither always follows the baseline.
        let order = if round % 2 == 1 {
            [None, Some(ZIPF_S)]
        } else {
            [Some(ZIPF_S), None]
        };
        for skew in order {
            say(format!(
                "end-to-end, round {round}/{}: herald, enqueue -> pushed to sockets, {}",
                plan.rounds,
                match skew {
                    Some(s) => format!("users Zipf-distributed (s = {s})"),
                    None => "users uniform".into(),
                }
            ));
            let checkpoints = forced_checkpoints(&pool).await;
            let mut herald = herald_e2e(plan, names, &[node], &mut load, sink, skew).await?;
            herald.forced_checkpoints = Some(forced_checkpoints(&pool).await - checkpoints);
            // The clients have every push; the worker may still be delivering its copies (the
            // head start, `pipeline.push_from_commit`): the next round starts on an idle pipeline.
            wait_drained(&pool, PHASE_DRAIN_SECS).await?;
            say(format!(
                "  {:.0} events/s; ready in the queue: {:.0} on average; cores used: {}",
                herald.rate,
                herald.queue_ready_mean,
                cores_shown(&herald)
            ));
            if skew.is_some() {
                phases.add("end-to-end, skewed", &herald.node_metrics);
                skew_rounds.push(herald);
            } else {
                phases.add("end-to-end, uniform", &herald.node_metrics);
                herald_rounds.push(herald);
            }
        }
    }
    let (cpu, delivered) = herald_rounds.iter().fold((0.0, 0.0), |(c, n), r| {
        (c + r.cpu_secs, n + r.events as f64)
    });
    let cpu = Cpu {
        raw: raw_cpu,
        herald: HeraldCpu {
            events: delivered,
            cpu_secs: cpu,
            cpu_us_per_event: cpu * 1e6 / delivered.max(1.0),
        },
    };
    let e2e = Paired::new(raw_rounds, herald_rounds.clone());
    let skew = Skew {
        versus: Versus::new(herald_rounds, skew_rounds),
        s: ZIPF_S,
    };
    let sustained = e2e.herald.as_ref().map_or(0.0, |h| h.rate);

    let mut latency = Vec::new();
    for fraction in [0.25, 0.5, 0.75] {
        let rate = (sustained * fraction).max(10.0);
        say(format!(
            "latency at {:.0}% of sustained: {rate:.0} events/s",
            fraction * 100.0
        ));
        let herald: Checkpointed<LatencyReply> = checkpointed(
            &mut load,
            &Command::Latency {
                rate,
                warmup: plan.latency_warmup,
                secs: plan.latency,
            },
            &pool,
            sink,
        )
        .await?;
        phases.add(
            &format!("latency at {:.0}%", fraction * 100.0),
            &herald.node_metrics,
        );
        let raw = baseline::broker_latency(
            names,
            rate,
            plan.latency_warmup,
            plan.latency,
            plan.prefetch,
        )
        .await?;
        say(format!(
            "  herald p50/p99/max {}/{}/{} ms ({} forced PG checkpoints meanwhile); broker {:.1}/{:.1}/{:.1} ms",
            herald.load.p50,
            herald.load.p99,
            herald.load.max,
            herald.forced_checkpoints,
            raw.waits.p50,
            raw.waits.p99,
            raw.waits.max
        ));
        latency.push(LatencyPoint {
            fraction,
            rate,
            herald,
            raw,
        });
    }

    let mut paced = Vec::new();
    for (rate, producers) in PACED {
        say(format!(
            "single events at {rate:.0}/s, {producers} producer(s), each request alone"
        ));
        let herald: Checkpointed<PacedReply> = checkpointed(
            &mut load,
            &Command::Paced(PacedPlan {
                rate,
                producers,
                warmup: plan.latency_warmup,
                secs: plan.paced,
            }),
            &pool,
            sink,
        )
        .await?;
        phases.add(
            &format!("single events at {rate:.0}/s"),
            &herald.node_metrics,
        );
        let raw =
            baseline::broker_latency(names, rate, plan.latency_warmup, plan.paced, plan.prefetch)
                .await?;
        let (push, answer) = (
            herald.load.push.unwrap_or_default(),
            herald.load.answer.unwrap_or_default(),
        );
        say(format!(
            "  herald p50/p99/max {:.2}/{:.2}/{:.2} ms (answered after p50/p99 {:.2}/{:.2} ms; {} late, {} errors); broker {:.2}/{:.2}/{:.2} ms",
            push.p50,
            push.p99,
            push.max,
            answer.p50,
            answer.p99,
            herald.load.late,
            herald.load.errors,
            raw.waits.p50,
            raw.waits.p99,
            raw.waits.max
        ));
        paced.push(PacedPoint { herald, raw });
    }

    let requests = BURST_EVENTS.div_ceil(loadgen::BATCH as u64);
    say(format!(
        "burst: {} events to one user ({requests} concurrent batch requests), {BURST_BACKGROUND_RATE:.0} single events/s to the {} others",
        BURST_EVENTS,
        plan.sockets.saturating_sub(1)
    ));
    let burst: Checkpointed<BurstReply> = checkpointed(
        &mut load,
        &Command::Burst(BurstPlan {
            events: BURST_EVENTS,
            requests: requests as usize,
            rate: BURST_BACKGROUND_RATE,
            warmup: plan.burst_warmup,
            min_window: BURST_MIN_WINDOW,
            limit: if plan.quick { 15.0 } else { 30.0 },
        }),
        &pool,
        sink,
    )
    .await?;
    phases.add("burst to one user", &burst.node_metrics);
    let b = &burst.load;
    let waits = |q: Option<protocol::Quantiles>| {
        let q = q.unwrap_or_default();
        format!("{}/{}/{}", q.p50, q.p99, q.max)
    };
    say(format!(
        "  hot user had all {} after {:.2} s (requests answered after {:.2} s); others p50/p99/max {} ms during, {} ms before",
        BURST_EVENTS,
        b.drain_secs.unwrap_or(0.0),
        b.answered_secs,
        waits(b.during),
        waits(b.before),
    ));
    let p99 = |q: Option<protocol::Quantiles>| q.unwrap_or_default().p99;
    say(format!(
        "  during: users sharing the hot user's partition p99 {} ms ({} events), the rest p99 {} ms; the others' requests answered after p50/p99/max {} ms ({} before)",
        p99(b.during_hot_partition),
        b.during_hot_partition.unwrap_or_default().count,
        p99(b.during_other_partitions),
        waits(b.during_api),
        waits(b.before_api),
    ));

    say("keep-up: producers post batches as fast as they are answered, no window");
    sink.take();
    let reply: KeepupReply = load
        .call(&Command::Keepup {
            warmup: plan.e2e_warmup,
            secs: plan.e2e,
            producers: BATCH_PRODUCERS,
            drain: if plan.quick { 30 } else { 120 },
        })
        .await?;
    let node_metrics = sink.take();
    phases.add("keep-up", &node_metrics);
    say(format!(
        "  accepted {:.0}/s, pushed {:.0}/s ({:.2}x); backlog {} at the end, drained in {:.1} s",
        reply.accepted_rate, reply.pushed_rate, reply.ratio, reply.backlog_at_end, reply.drain_secs
    ));
    let keepup = Keepup {
        load: reply,
        node_metrics,
        drained_db_secs: wait_drained(&pool, plan.drain_limit_secs()).await?,
    };

    // Ingest last: it outruns delivery, and the backlog it leaves must not touch the figures above;
    // each Herald round drains before the next pair starts.
    let (mut raw_rounds, mut herald_rounds) = (Vec::new(), Vec::new());
    for round in 1..=plan.rounds {
        say(format!(
            "ingest batch, round {round}/{}: raw UNNEST, then herald batch API",
            plan.rounds
        ));
        let raw = baseline::pg_unnest(
            &pool,
            producer,
            plan.ingest,
            BATCH_PRODUCERS,
            loadgen::BATCH,
        )
        .await;
        sink.take();
        let reply: Ingested = load
            .call(&Command::IngestBatch {
                secs: plan.ingest,
                producers: BATCH_PRODUCERS,
            })
            .await?;
        let node_metrics = sink.take();
        let drain_secs = wait_drained(&pool, plan.drain_limit_secs()).await?;
        // The backlog is published while it drains: its messages count too.
        let drain_metrics = sink.take();
        let herald = HeraldIngest {
            load: reply,
            node_metrics,
            drain_secs: Some(drain_secs),
            drain_metrics: Some(drain_metrics),
        };
        herald.count_into(&mut phases, "ingest, batch API");
        say(format!(
            "  raw {:.0}/s, herald {:.0}/s",
            raw.rate, herald.load.rate
        ));
        raw_rounds.push(raw);
        herald_rounds.push(herald);
    }
    let ingest_batch = Paired::new(raw_rounds, herald_rounds);
    let (mut raw_rounds, mut herald_rounds) = (Vec::new(), Vec::new());
    for round in 1..=plan.rounds {
        say(format!(
            "ingest single, round {round}/{}: raw one-row inserts, then herald",
            plan.rounds
        ));
        let raw = baseline::pg_single(&pool, producer, plan.ingest, plan.concurrency).await;
        sink.take();
        let reply: Ingested = load
            .call(&Command::IngestSingle {
                secs: plan.ingest,
                clients: plan.concurrency,
            })
            .await?;
        let node_metrics = sink.take();
        let mut drain_metrics = None;
        if round < plan.rounds {
            wait_drained(&pool, 60).await?;
            drain_metrics = Some(sink.take());
        }
        let herald = HeraldIngest {
            load: reply,
            node_metrics,
            drain_secs: None,
            drain_metrics,
        };
        herald.count_into(&mut phases, "ingest, single API");
        say(format!(
            "  raw {:.0}/s, herald {:.0}/s",
            raw.rate, herald.load.rate
        ));
        raw_rounds.push(raw);
        herald_rounds.push(herald);
    }
    let ingest_single = Paired::new(raw_rounds, herald_rounds);

    // Last, since it replaces the node: the same closed loop on one and on two worker nodes.
    let workers = match workers(plan, names, deployment, &mut load, sink, &pool, &mut phases).await
    {
        Ok(workers) => Attempt::Done(workers),
        Err(error) => {
            say(format!("  two worker nodes: {error:#}"));
            Attempt::Failed {
                error: format!("{error:#}"),
            }
        }
    };
    let order = match order(plan, names, deployment, &mut load, sink, &pool, &mut phases).await {
        Ok(order) => Attempt::Done(order),
        Err(error) => {
            say(format!("  order across api nodes: {error:#}"));
            Attempt::Failed {
                error: format!("{error:#}"),
            }
        }
    };
    drop(load.stdin);
    let _ = load.child.kill().await;
    pool.close().await;
    Ok(Report {
        started_unix,
        git: git_revision(),
        machine: sys::machine(),
        mode: if plan.quick { "quick" } else { "full" },
        sockets: plan.sockets,
        concurrency: plan.concurrency,
        batch: loadgen::BATCH,
        batch_producers: BATCH_PRODUCERS,
        prefetch: plan.prefetch,
        herald_prefetch: plan
            .herald_prefetch
            .unwrap_or(herald::config::QueueSettings::default().prefetch),
        commit_streams: plan
            .commit_streams
            .unwrap_or(herald::config::PipelineSettings::default().commit_streams),
        max_inflight_confirms: plan.max_inflight,
        e2e_window: E2E_WINDOW,
        rounds: plan.rounds,
        rss,
        cpu,
        e2e,
        skew,
        latency,
        paced,
        burst,
        keepup,
        ingest_batch,
        ingest_single,
        workers,
        order,
        wire: phases.report(),
        run_secs: 0.0,
    })
}

/// End-to-end with one and with two worker nodes, and the same node without cluster pubsub. The
/// deployment becomes node A (`api,worker,socket`, the sockets and the API) and, in turns, node B
/// (`worker` only), both with `pubsub.mode = cluster` (a deployment of several nodes needs it
/// everywhere: every broadcast then rides RabbitMQ to the other nodes), on the run's database and
/// queue prefix. Each round runs node A with local pubsub, node A alone in cluster mode, and A + B
/// (B joins or leaves between them, and the partitions move), in a rotating order; both cluster
/// figures are compared with the local node A of the same rounds (the first e2e phase ran on a
/// smaller table, earlier: not a fair baseline for these).
async fn workers(
    plan: &Plan,
    names: &Names,
    deployment: &mut Deployment<'_>,
    load: &mut Loadgen,
    sink: &statsd::Sink,
    pool: &sqlx::PgPool,
    phases: &mut Phases,
) -> anyhow::Result<Workers> {
    let partitions = herald::config::QueueSettings::default().partitions;
    wait_drained(pool, plan.drain_limit_secs()).await?;
    say(
        "two worker nodes: node A (api,worker,socket) and node B (worker), cluster pubsub; node A with local pubsub beside them",
    );
    let mut connected = None;
    let mut bindings = None;
    let (mut local, mut one, mut two, mut moves) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut a_mode = None;
    for round in 1..=plan.rounds {
        // Rotate which goes first; a mode change restarts node A and reconnects the sockets.
        let order = match round % 3 {
            1 => [Variant::Local, Variant::One, Variant::Two],
            2 => [Variant::Two, Variant::One, Variant::Local],
            _ => [Variant::One, Variant::Two, Variant::Local],
        };
        for variant in order {
            let cluster = variant != Variant::Local;
            if a_mode != Some(cluster) {
                let joined = restart_node_a(plan, deployment, load, cluster, partitions).await?;
                if cluster && connected.is_none() {
                    bindings = fanout_bindings(&names.prefix);
                    say(format!(
                        "  {} sockets connected to node A in cluster mode in {:.1} s; {} fan-out bindings",
                        joined.connected,
                        joined.secs,
                        bindings.map_or_else(|| "?".to_owned(), |b| b.to_string())
                    ));
                    connected = Some(joined);
                }
                a_mode = Some(cluster);
            }
            if let Some(change) = set_node_b(deployment, variant == Variant::Two).await? {
                let secs = wait_partitions(&deployment.nodes, partitions).await?;
                say(format!("  {change}; partitions settled after {secs:.1} s"));
                moves.push(Move { change, secs });
            }
            say(format!(
                "end-to-end, round {round}/{}: {}",
                plan.rounds,
                variant.label()
            ));
            let nodes: Vec<&Node> = deployment.nodes.iter().collect();
            let mut owned = Vec::new();
            for node in &nodes {
                owned.push(node.partitions().await);
            }
            let mut herald = herald_e2e(plan, names, &nodes, load, sink, None).await?;
            wait_drained(pool, PHASE_DRAIN_SECS).await?;
            herald.partitions = Some(owned);
            say(format!(
                "  {:.0} events/s; cores used: {}",
                herald.rate,
                cores_shown(&herald)
            ));
            phases.add(variant.phase(), &herald.node_metrics);
            match variant {
                Variant::Local => local.push(herald),
                Variant::One => one.push(herald),
                Variant::Two => two.push(herald),
            }
        }
    }
    Ok(Workers {
        versus: Versus::new(local.clone(), one),
        two: Versus::new(local, two),
        connect: connected.context("node A never ran in cluster mode")?,
        fanout_bindings: bindings,
        moves,
    })
}

/// The three deployments of [`workers`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// Node A with local pubsub.
    Local,
    /// Node A alone, cluster pubsub.
    One,
    /// Nodes A + B, cluster pubsub.
    Two,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Self::Local => "node A alone (local pubsub)",
            Self::One => "node A alone (cluster pubsub)",
            Self::Two => "node A + worker node B (cluster pubsub)",
        }
    }

    fn phase(self) -> &'static str {
        match self {
            Self::Local => "end-to-end, node A alone (local)",
            Self::One => "end-to-end, node A alone (cluster)",
            Self::Two => "end-to-end, nodes A + B (cluster)",
        }
    }
}

/// Stops every node, starts node A (`api,worker,socket`) with cluster pubsub or without, waits
/// until it owns every partition, and connects the run's sockets to it.
async fn restart_node_a(
    plan: &Plan,
    deployment: &mut Deployment<'_>,
    load: &mut Loadgen,
    cluster: bool,
    partitions: u16,
) -> anyhow::Result<Connected> {
    let _: Disconnected = load.call(&Command::Disconnect).await?;
    deployment.stop_all().await;
    let mode = if cluster { "cluster" } else { "local" };
    deployment
        .start(
            "herald-a",
            &[
                ("HERALD_PUBSUB__MODE", mode.to_owned()),
                ("HERALD_NODE__ROLES", "api,worker,socket".into()),
                ("HERALD_NODE__NAME", "bench-a".into()),
            ],
        )
        .await?;
    let owned_secs = wait_partitions(&deployment.nodes, partitions).await?;
    let connected: Connected = load
        .call(&Command::Connect {
            n: plan.sockets,
            base: Some(deployment.nodes[0].base.clone()),
        })
        .await?;
    say(format!(
        "  node A ({mode} pubsub) owns the {partitions} partitions after {owned_secs:.1} s; {} sockets connected in {:.1} s",
        connected.connected, connected.secs
    ));
    Ok(connected)
}

/// Starts worker node B (cluster pubsub) or stops it, as `wanted`; says what changed, if anything.
async fn set_node_b(
    deployment: &mut Deployment<'_>,
    wanted: bool,
) -> anyhow::Result<Option<&'static str>> {
    let running = deployment.nodes.len() == 2;
    if wanted && !running {
        deployment
            .start(
                "herald-b",
                &[
                    ("HERALD_PUBSUB__MODE", "cluster".to_owned()),
                    ("HERALD_NODE__ROLES", "worker".into()),
                    ("HERALD_NODE__NAME", "bench-b".into()),
                ],
            )
            .await?;
        return Ok(Some("B joined"));
    }
    if !wanted && running {
        if let Some(b) = deployment.nodes.pop() {
            b.stop().await;
        }
        return Ok(Some("B left"));
    }
    Ok(None)
}

/// The bindings of the deployment's fan-out exchange (one socket node: that node's), as
/// `rabbitmqctl` lists them; None when it cannot be run.
fn fanout_bindings(prefix: &str) -> Option<usize> {
    let exchange = herald::queue::fanout::exchange_name(prefix);
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_bindings", "-q", "--no-table-headers", "source_name"])
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|source| *source == exchange)
            .count()
    })
}

/// Order across api nodes: nodes A (`api,worker,socket`, the sockets) and B (`api,worker`), both
/// in cluster mode, with the closed loop's producers posting to A's API and B's in turn and users
/// Zipf-distributed, so a hot user's consecutive events are committed on both nodes and published
/// on two channels. Measures
/// the share of events the sockets had to fill in from PostgreSQL (`socket.push.gap_filled` per
/// event attempted, `pipeline.worker.delivered`) with the lanes putting events back in seq order
/// (the default `pipeline.reorder_window_ms`) and, as the same-run baseline, without (0), the two
/// alternating round by round.
async fn order(
    plan: &Plan,
    names: &Names,
    deployment: &mut Deployment<'_>,
    load: &mut Loadgen,
    sink: &statsd::Sink,
    pool: &sqlx::PgPool,
    phases: &mut Phases,
) -> anyhow::Result<Order> {
    let partitions = herald::config::QueueSettings::default().partitions;
    let default_window = herald::config::PipelineSettings::default().reorder_window_ms;
    let mut rounds: [Vec<HeraldE2e>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=plan.rounds {
        let turns = if round % 2 == 1 { [0, 1] } else { [1, 0] };
        for turn in turns {
            let window = if turn == 0 { default_window } else { 0 };
            wait_drained(pool, plan.drain_limit_secs()).await?;
            let _: Disconnected = load.call(&Command::Disconnect).await?;
            deployment.stop_all().await;
            for (name, roles) in [
                ("herald-a", "api,worker,socket"),
                ("herald-b", "api,worker"),
            ] {
                let extra = [
                    ("HERALD_PUBSUB__MODE", "cluster".to_owned()),
                    ("HERALD_NODE__ROLES", roles.to_owned()),
                    ("HERALD_NODE__NAME", format!("bench-{name}")),
                    ("HERALD_PIPELINE__REORDER_WINDOW_MS", window.to_string()),
                ];
                deployment.start(name, &extra).await?;
            }
            wait_partitions(&deployment.nodes, partitions).await?;
            let apis: Vec<String> = deployment.nodes.iter().map(|n| n.base.clone()).collect();
            let _: Connected = load
                .call(&Command::Connect {
                    n: plan.sockets,
                    base: Some(apis[0].clone()),
                })
                .await?;
            say(format!(
                "order across api nodes, round {round}/{}: A + B both taking events, lanes' reorder window {window} ms",
                plan.rounds
            ));
            let nodes: Vec<&Node> = deployment.nodes.iter().collect();
            // Skewed users: hot users' events land in consecutive batches, sent to both nodes.
            let mut herald =
                herald_e2e_via(plan, names, &nodes, load, sink, Some(ZIPF_S), &apis).await?;
            wait_drained(pool, PHASE_DRAIN_SECS).await?;
            let reorder = Reorder::of(&herald.node_metrics);
            say(format!(
                "  {:.0} events/s; gap fills per event {:.4}; lanes put {} events back in place, waited {} times in time and {} in vain",
                herald.rate,
                reorder.gap_filled_per_event,
                reorder.reorder_sorted,
                reorder.reorder_restored,
                reorder.reorder_passed
            ));
            herald.reorder = Some(reorder);
            phases.add("order across api nodes", &herald.node_metrics);
            rounds[turn].push(herald);
        }
    }
    let [with, without] = rounds;
    Ok(Order {
        versus: Versus::new(without, with),
        window_ms: default_window,
    })
}

/// Waits until the worker nodes among `nodes` share the `partitions` between them: each consumes
/// some, none twice, all of them covered (from `/readyz`). Returns how long that took.
async fn wait_partitions(nodes: &[Node], partitions: u16) -> anyhow::Result<f64> {
    let started = Instant::now();
    loop {
        let mut seen = std::collections::BTreeSet::new();
        let mut shared = true;
        for node in nodes {
            let owned = node.partitions().await.unwrap_or_default();
            shared &= !owned.is_empty();
            for p in owned {
                shared &= seen.insert(p);
            }
        }
        if shared && seen.len() == usize::from(partitions) {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "the {} worker nodes did not share the {partitions} partitions within 60 s (saw {seen:?})",
                nodes.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One end-to-end round of Herald: the closed loop (users round-robin, or drawn from a Zipf
/// distribution with exponent `skew`), with the nodes' CPU, every process's cores and the nodes' own
/// timings over the measured window.
async fn herald_e2e(
    plan: &Plan,
    names: &Names,
    nodes: &[&Node],
    load: &mut Loadgen,
    sink: &statsd::Sink,
    skew: Option<f64>,
) -> anyhow::Result<HeraldE2e> {
    herald_e2e_via(plan, names, nodes, load, sink, skew, &[]).await
}

/// [`herald_e2e`] with the producers posting to `apis` in turn (empty: the connected node).
async fn herald_e2e_via(
    plan: &Plan,
    names: &Names,
    nodes: &[&Node],
    load: &mut Loadgen,
    sink: &statsd::Sink,
    skew: Option<f64>,
    apis: &[String],
) -> anyhow::Result<HeraldE2e> {
    load.send(&Command::E2e {
        warmup: plan.e2e_warmup,
        secs: plan.e2e,
        producers: BATCH_PRODUCERS,
        window: E2E_WINDOW,
        skew,
        apis: apis.to_vec(),
    })
    .await?;
    let _start: E2eStart = load.recv().await?;
    let pids: Vec<u32> = nodes.iter().map(|n| n.pid).collect();
    let cpu_of = || nodes.iter().map(|n| n.cpu_time()).sum::<Duration>();
    let cpu0 = cpu_of();
    let groups0 = sys::cpu_by_group(&pids, load.child.id().as_slice());
    sink.take();
    let stop_sampling = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn({
        let (names, stop) = (names.clone(), stop_sampling.clone());
        async move { baseline::sample_ready(&names, stop).await }
    });
    let end: E2eEnd = load.recv().await?;
    let cpu = cpu_of() - cpu0;
    stop_sampling.cancel();
    let ready = sampler.await.unwrap_or_default();
    let mean_ready = ready.iter().map(|&n| f64::from(n)).sum::<f64>() / ready.len().max(1) as f64;
    let groups1 = sys::cpu_by_group(&pids, load.child.id().as_slice());
    let node_metrics = sink.take();
    let cores_used = sys::cores_used(&groups0, &groups1, end.secs.max(0.001));
    let done: E2eDone = load.recv().await?;
    Ok(HeraldE2e {
        events: end.events,
        secs: end.secs,
        rate: end.rate,
        cpu_secs: cpu.as_secs_f64(),
        cores_used,
        wire: statsd::wire(std::slice::from_ref(&node_metrics)),
        node_metrics,
        queue_ready_mean: mean_ready,
        top_user_share: end.top_user_share,
        top_user_expected: end.top_user_expected,
        after: done,
        forced_checkpoints: None,
        partitions: None,
        reorder: None,
    })
}

/// The cores each process group used in a round, as one line of JSON.
fn cores_shown(round: &HeraldE2e) -> String {
    serde_json::to_string(&round.cores_used).unwrap_or_default()
}

/// Starts the echo server, connects `n` sockets to it (one echo each), reads its growth.
async fn echo_rss(load: &mut Loadgen, n: usize) -> anyhow::Result<SocketsRss> {
    let mut echo = tokio::process::Command::new(std::env::current_exe()?)
        .arg("echo")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start the echo server")?;
    let stdout = echo.stdout.take().context("echo stdout")?;
    let port: u16 = BufReader::new(stdout)
        .lines()
        .next_line()
        .await?
        .context("the echo server printed no port")?
        .parse()?;
    let pid = echo.id().context("echo pid")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = sys::rss_bytes(pid).unwrap_or(0);
    let connected: Connected = load.call(&Command::ConnectEcho { port, n }).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = sys::rss_bytes(pid).unwrap_or(0);
    let _: Closed = load.call(&Command::CloseEcho).await?;
    let _ = echo.kill().await;
    Ok(SocketsRss::new(before, after, connected))
}

/// Checkpoints PostgreSQL was asked for so far, server-wide. Every CREATE or DROP DATABASE forces
/// one (other sessions' test suites make a database per test), and each flushes every dirty page
/// at once: commits stall behind it. Counted per phase so a latency tail can be told from it.
/// Runs a phase's `command` on the load generator, its answer kept with the node's metrics over
/// the phase and the PostgreSQL checkpoints forced meanwhile.
async fn checkpointed<R: DeserializeOwned>(
    load: &mut Loadgen,
    command: &Command,
    pool: &sqlx::PgPool,
    sink: &statsd::Sink,
) -> anyhow::Result<Checkpointed<R>> {
    sink.take();
    let checkpoints = forced_checkpoints(pool).await;
    let answer: R = load.call(command).await?;
    let forced_checkpoints = forced_checkpoints(pool).await - checkpoints;
    // The clients have every push, but with the head start (`pipeline.push_from_commit`) the
    // worker may still be delivering its copies: the next phase starts on an idle pipeline.
    wait_drained(pool, PHASE_DRAIN_SECS).await?;
    Ok(Checkpointed {
        load: answer,
        forced_checkpoints,
        node_metrics: sink.take(),
    })
}

async fn forced_checkpoints(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT checkpoints_req FROM pg_stat_bgwriter")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// How long a phase waits for the worker to deliver what its clients already have.
const PHASE_DRAIN_SECS: u64 = 120;

/// Waits until every event is delivered (none `accepted` or `published`); returns how long it took.
async fn wait_drained(pool: &sqlx::PgPool, limit_secs: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE status IN ('accepted', 'published')",
        )
        .fetch_one(pool)
        .await?;
        if left == 0 {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > Duration::from_secs(limit_secs) {
            say(format!(
                "  {left} events still undelivered after {limit_secs} s; going on"
            ));
            return Ok(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
