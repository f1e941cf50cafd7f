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
mod soak;
mod statsd;
mod sys;
mod zipf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::FutureExt;
use node::{Names, Node};
use serde_json::{Value, json};
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

    async fn send(&mut self, command: Value) -> anyhow::Result<()> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<Value> {
        let line = self
            .lines
            .next_line()
            .await?
            .context("the load generator exited")?;
        Ok(serde_json::from_str(&line)?)
    }

    async fn call(&mut self, command: Value) -> anyhow::Result<Value> {
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
    let nofile = sys::raise_nofile_limit();
    if (nofile as usize) < plan.sockets + 1000 {
        bail!(
            "{} sockets need a higher open-files limit than {nofile}",
            plan.sockets
        );
    }
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
    report["run_secs"] = json!(started.elapsed().as_secs_f64());
    let table = render(&report);
    println!("{table}");
    let when = report["started_unix"].as_u64().unwrap_or(0);
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
    smoke_check(&report)
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

/// Every figure produced a measurement (the harness works); speed is never asserted.
fn smoke_check(report: &Value) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for (figure, path) in [
        ("ingest batch, raw", "/ingest_batch/raw/rate"),
        ("ingest batch, herald", "/ingest_batch/herald/rate"),
        ("ingest single, raw", "/ingest_single/raw/rate"),
        ("ingest single, herald", "/ingest_single/herald/rate"),
        ("end-to-end, raw", "/e2e/raw/rate"),
        ("end-to-end, herald", "/e2e/herald/rate"),
        ("end-to-end skewed, herald", "/skew/other/rate"),
        ("end-to-end, node A alone (cluster)", "/workers/base/rate"),
        ("end-to-end, nodes A + B (cluster)", "/workers/other/rate"),
        ("order across api nodes, window 0", "/order/base/rate"),
        (
            "order across api nodes, default window",
            "/order/other/rate",
        ),
        ("latency 50%, raw", "/latency/1/raw/count"),
        ("latency 50%, herald", "/latency/1/herald/count"),
        ("burst, others' latency", "/burst/during/count"),
        ("burst, hot user drained", "/burst/drain_secs"),
        ("keep-up, accepted", "/keepup/accepted_rate"),
        ("keep-up, pushed", "/keepup/pushed_rate"),
        ("RSS, echo", "/rss/raw/per_socket_bytes"),
        ("RSS, herald", "/rss/herald/per_socket_bytes"),
        ("CPU, lapin", "/cpu/raw/cpu_us_per_event"),
        ("CPU, herald", "/cpu/herald/cpu_us_per_event"),
    ] {
        if !report
            .pointer(path)
            .and_then(Value::as_f64)
            .is_some_and(|v| v > 0.0)
        {
            missing.push(figure);
        }
    }
    let phases = report["wire"].as_array().map_or(&[][..], Vec::as_slice);
    if phases.is_empty() {
        missing.push("messages per event (no phase counted)");
    }
    for phase in phases {
        if !(f(phase, "/messages") > 0.0 && f(phase, "/events") > 0.0) {
            missing.push(
                phase["phase"]
                    .as_str()
                    .unwrap_or("a phase's messages per event"),
            );
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        bail!("no measurement for: {}", missing.join(", "))
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
) -> anyhow::Result<Value> {
    let node = deployment.nodes.first().context("no node")?;
    let mut report = json!({
        "started_unix": unix_now(),
        "git": git_revision(),
        "machine": sys::machine(),
        "mode": if plan.quick { "quick" } else { "full" },
        "sockets": plan.sockets,
        "concurrency": plan.concurrency,
        "batch": loadgen::BATCH,
        "batch_producers": BATCH_PRODUCERS,
        "prefetch": plan.prefetch,
        "herald_prefetch": plan
            .herald_prefetch
            .unwrap_or(herald::config::QueueSettings::default().prefetch),
        "commit_streams": plan
            .commit_streams
            .unwrap_or(herald::config::PipelineSettings::default().commit_streams),
        "max_inflight_confirms": plan.max_inflight,
        "e2e_window": E2E_WINDOW,
        "rounds": plan.rounds,
    });
    let mut wire = Wire::default();
    let pool = baseline::pool(names, plan.concurrency.max(BATCH_PRODUCERS) as u32 + 2).await?;
    let producer = baseline::create_raw_table(&pool).await?;
    let mut load = Loadgen::start(&node.base, &node.api_key)?;

    // Memory first, on a fresh node: what N idle sockets cost before any load grew the heap.
    say(format!("RSS: bare echo server, {} sockets", plan.sockets));
    report["rss"]["raw"] = echo_rss(&mut load, plan.sockets).await?;
    say(format!(
        "RSS: herald, {} sockets connected and joined",
        plan.sockets
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = node.rss_bytes();
    let connected = load
        .call(json!({"cmd": "connect", "n": plan.sockets}))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = node.rss_bytes();
    let n = connected["connected"].as_u64().unwrap_or(0);
    report["rss"]["herald"] = json!({
        "before_bytes": before, "after_bytes": after, "sockets": n,
        "connect": connected,
        "per_socket_bytes": after.saturating_sub(before) as f64 / n.max(1) as f64,
    });

    say(format!(
        "CPU: lapin consume+ack of {} messages",
        plan.prefill
    ));
    report["cpu"]["raw"] = baseline::consume_cpu(names, plan.prefill, plan.prefetch).await?;

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
        say(format!("  {:.0} events/s", f(&raw, "/rate")));
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
            herald["forced_checkpoints"] = json!(forced_checkpoints(&pool).await - checkpoints);
            say(format!(
                "  {:.0} events/s; ready in the queue: {:.0} on average; cores used: {}",
                f(&herald, "/rate"),
                f(&herald, "/queue_ready_mean"),
                herald["cores_used"]
            ));
            if skew.is_some() {
                wire.add("end-to-end, skewed", &herald["node_metrics"]);
                skew_rounds.push(herald);
            } else {
                wire.add("end-to-end, uniform", &herald["node_metrics"]);
                herald_rounds.push(herald);
            }
        }
    }
    report["e2e"] = paired(raw_rounds, herald_rounds.clone());
    report["skew"] = versus(&herald_rounds, &skew_rounds);
    report["skew"]["s"] = json!(ZIPF_S);
    let sustained = f(&report, "/e2e/herald/rate");
    let (cpu, delivered) = herald_rounds.iter().fold((0.0, 0.0), |(c, n), r| {
        (c + f(r, "/cpu_secs"), n + f(r, "/events"))
    });
    report["cpu"]["herald"] = json!({
        "events": delivered, "cpu_secs": cpu,
        "cpu_us_per_event": cpu * 1e6 / delivered.max(1.0),
    });

    let mut latencies = Vec::new();
    for fraction in [0.25, 0.5, 0.75] {
        let rate = (sustained * fraction).max(10.0);
        say(format!(
            "latency at {:.0}% of sustained: {rate:.0} events/s",
            fraction * 100.0
        ));
        sink.take();
        let checkpoints = forced_checkpoints(&pool).await;
        let mut herald = load
            .call(
                json!({"cmd": "latency", "rate": rate, "warmup": plan.latency_warmup,
                         "secs": plan.latency}),
            )
            .await?;
        herald["forced_checkpoints"] = json!(forced_checkpoints(&pool).await - checkpoints);
        herald["node_metrics"] = sink.take();
        wire.add(
            &format!("latency at {:.0}%", fraction * 100.0),
            &herald["node_metrics"],
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
            herald["p50"],
            herald["p99"],
            herald["max"],
            herald["forced_checkpoints"],
            raw["p50"].as_f64().unwrap_or(0.0),
            raw["p99"].as_f64().unwrap_or(0.0),
            raw["max"].as_f64().unwrap_or(0.0)
        ));
        latencies.push(json!({"fraction": fraction, "rate": rate, "herald": herald, "raw": raw}));
    }
    report["latency"] = Value::Array(latencies);

    let requests = BURST_EVENTS.div_ceil(loadgen::BATCH as u64);
    say(format!(
        "burst: {} events to one user ({requests} concurrent batch requests), {BURST_BACKGROUND_RATE:.0} single events/s to the {} others",
        BURST_EVENTS,
        plan.sockets.saturating_sub(1)
    ));
    sink.take();
    let checkpoints = forced_checkpoints(&pool).await;
    let mut burst = load
        .call(json!({"cmd": "burst", "events": BURST_EVENTS, "requests": requests,
                     "rate": BURST_BACKGROUND_RATE, "warmup": plan.burst_warmup,
                     "min_window": BURST_MIN_WINDOW, "limit": if plan.quick { 15.0 } else { 30.0 }}))
        .await?;
    burst["forced_checkpoints"] = json!(forced_checkpoints(&pool).await - checkpoints);
    burst["node_metrics"] = sink.take();
    wire.add("burst to one user", &burst["node_metrics"]);
    say(format!(
        "  hot user had all {} after {:.2} s (requests answered after {:.2} s); others p50/p99/max {}/{}/{} ms during, {}/{}/{} ms before",
        BURST_EVENTS,
        f(&burst, "/drain_secs"),
        f(&burst, "/answered_secs"),
        burst["during"]["p50"],
        burst["during"]["p99"],
        burst["during"]["max"],
        burst["before"]["p50"],
        burst["before"]["p99"],
        burst["before"]["max"],
    ));
    say(format!(
        "  during: users sharing the hot user's partition p99 {} ms ({} events), the rest p99 {} ms; the others' requests answered after p50/p99/max {}/{}/{} ms ({}/{}/{} before)",
        burst["during_hot_partition"]["p99"],
        burst["during_hot_partition"]["count"],
        burst["during_other_partitions"]["p99"],
        burst["during_api"]["p50"],
        burst["during_api"]["p99"],
        burst["during_api"]["max"],
        burst["before_api"]["p50"],
        burst["before_api"]["p99"],
        burst["before_api"]["max"],
    ));
    report["burst"] = burst;

    say("keep-up: producers post batches as fast as they are answered, no window");
    sink.take();
    let mut keepup = load
        .call(
            json!({"cmd": "keepup", "warmup": plan.e2e_warmup, "secs": plan.e2e,
                     "producers": BATCH_PRODUCERS, "drain": if plan.quick { 30 } else { 120 }}),
        )
        .await?;
    keepup["node_metrics"] = sink.take();
    wire.add("keep-up", &keepup["node_metrics"]);
    say(format!(
        "  accepted {:.0}/s, pushed {:.0}/s ({:.2}x); backlog {} at the end, drained in {:.1} s",
        f(&keepup, "/accepted_rate"),
        f(&keepup, "/pushed_rate"),
        f(&keepup, "/ratio"),
        keepup["backlog_at_end"],
        f(&keepup, "/drain_secs")
    ));
    keepup["drained_db_secs"] =
        json!(wait_drained(&pool, if plan.quick { 20 } else { 120 }).await?);
    report["keepup"] = keepup;

    // Ingest last: it outruns delivery, and the backlog it leaves must not touch the figures above;
    // each Herald round drains before the next pair starts.
    let (mut raw_rounds, mut herald_rounds) = (Vec::new(), Vec::new());
    for round in 1..=plan.rounds {
        say(format!(
            "ingest batch, round {round}/{}: raw UNNEST, then herald batch API",
            plan.rounds
        ));
        raw_rounds.push(
            baseline::pg_unnest(
                &pool,
                producer,
                plan.ingest,
                BATCH_PRODUCERS,
                loadgen::BATCH,
            )
            .await,
        );
        sink.take();
        let mut herald = load
            .call(json!({"cmd": "ingest_batch", "secs": plan.ingest, "producers": BATCH_PRODUCERS}))
            .await?;
        herald["node_metrics"] = sink.take();
        herald["drain_secs"] = json!(wait_drained(&pool, if plan.quick { 20 } else { 120 }).await?);
        // The backlog is published while it drains: its messages count too.
        herald["drain_metrics"] = sink.take();
        wire.add("ingest, batch API", &herald["node_metrics"]);
        wire.add("ingest, batch API", &herald["drain_metrics"]);
        say(format!(
            "  raw {:.0}/s, herald {:.0}/s",
            f(raw_rounds.last().unwrap_or(&Value::Null), "/rate"),
            f(&herald, "/rate")
        ));
        herald_rounds.push(herald);
    }
    report["ingest_batch"] = paired(raw_rounds, herald_rounds);
    let (mut raw_rounds, mut herald_rounds) = (Vec::new(), Vec::new());
    for round in 1..=plan.rounds {
        say(format!(
            "ingest single, round {round}/{}: raw one-row inserts, then herald",
            plan.rounds
        ));
        raw_rounds.push(baseline::pg_single(&pool, producer, plan.ingest, plan.concurrency).await);
        sink.take();
        let mut herald = load
            .call(json!({"cmd": "ingest_single", "secs": plan.ingest, "clients": plan.concurrency}))
            .await?;
        herald["node_metrics"] = sink.take();
        if round < plan.rounds {
            wait_drained(&pool, 60).await?;
            herald["drain_metrics"] = sink.take();
        }
        wire.add("ingest, single API", &herald["node_metrics"]);
        wire.add("ingest, single API", &herald["drain_metrics"]);
        say(format!(
            "  raw {:.0}/s, herald {:.0}/s",
            f(raw_rounds.last().unwrap_or(&Value::Null), "/rate"),
            f(&herald, "/rate")
        ));
        herald_rounds.push(herald);
    }
    report["ingest_single"] = paired(raw_rounds, herald_rounds);

    // Last, since it replaces the node: the same closed loop on one and on two worker nodes.
    report["workers"] =
        match workers(plan, names, deployment, &mut load, sink, &pool, &mut wire).await {
            Ok(workers) => workers,
            Err(error) => {
                say(format!("  two worker nodes: {error:#}"));
                json!({"error": format!("{error:#}")})
            }
        };
    report["order"] = match order(plan, names, deployment, &mut load, sink, &pool, &mut wire).await
    {
        Ok(order) => order,
        Err(error) => {
            say(format!("  order across api nodes: {error:#}"));
            json!({"error": format!("{error:#}")})
        }
    };
    report["wire"] = wire.report();
    drop(load.stdin);
    let _ = load.child.kill().await;
    pool.close().await;
    Ok(report)
}

/// End-to-end with one and with two worker nodes. The deployment becomes node A (`api,worker,socket`,
/// the sockets and the API) and, in turns, node B (`worker` only), both with `pubsub.mode = cluster`
/// (a deployment of several nodes needs it everywhere: every broadcast then rides RabbitMQ, even to
/// A's own sockets), on the run's database and queue prefix. The rounds alternate A alone and A + B
/// (B joins or leaves between them, and the partitions move); the baseline of the two-node rate is
/// the one-node rate in the same rounds, both in cluster mode; the usual single node (local pubsub)
/// was measured earlier in the run.
async fn workers(
    plan: &Plan,
    names: &Names,
    deployment: &mut Deployment<'_>,
    load: &mut Loadgen,
    sink: &statsd::Sink,
    pool: &sqlx::PgPool,
    wire: &mut Wire,
) -> anyhow::Result<Value> {
    let partitions = herald::config::QueueSettings::default().partitions;
    let cluster = ("HERALD_PUBSUB__MODE", "cluster".to_owned());
    wait_drained(pool, if plan.quick { 20 } else { 120 }).await?;
    say("two worker nodes: node A (api,worker,socket) and node B (worker), cluster pubsub");
    load.call(json!({"cmd": "disconnect"})).await?;
    deployment.stop_all().await;
    deployment
        .start(
            "herald-a",
            &[
                cluster.clone(),
                ("HERALD_NODE__ROLES", "api,worker,socket".into()),
                ("HERALD_NODE__NAME", "bench-a".into()),
            ],
        )
        .await?;
    let owned_secs = wait_partitions(&deployment.nodes, partitions).await?;
    let base = deployment.nodes[0].base.clone();
    let connected = load
        .call(json!({"cmd": "connect", "n": plan.sockets, "base": base}))
        .await?;
    let bindings = fanout_bindings(&names.prefix);
    say(format!(
        "  node A owns the {partitions} partitions after {owned_secs:.1} s; {} sockets connected to it in {:.1} s; {} fan-out bindings",
        connected["connected"],
        f(&connected, "/secs"),
        bindings.map_or_else(|| "?".to_owned(), |b| b.to_string())
    ));
    let (mut one, mut two, mut moves) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=plan.rounds {
        // Alternate which goes first; B joins or leaves once per round.
        let order = if round % 2 == 1 { [1, 2] } else { [2, 1] };
        for workers in order {
            if workers == 2 && deployment.nodes.len() == 1 {
                deployment
                    .start(
                        "herald-b",
                        &[
                            cluster.clone(),
                            ("HERALD_NODE__ROLES", "worker".into()),
                            ("HERALD_NODE__NAME", "bench-b".into()),
                        ],
                    )
                    .await?;
                let secs = wait_partitions(&deployment.nodes, partitions).await?;
                say(format!(
                    "  node B joined; partitions shared after {secs:.1} s"
                ));
                moves.push(json!({"change": "B joined", "secs": secs}));
            } else if workers == 1 && deployment.nodes.len() == 2 {
                if let Some(b) = deployment.nodes.pop() {
                    b.stop().await;
                }
                let secs = wait_partitions(&deployment.nodes, partitions).await?;
                say(format!(
                    "  node B left; node A owns every partition after {secs:.1} s"
                ));
                moves.push(json!({"change": "B left", "secs": secs}));
            }
            say(format!(
                "end-to-end, round {round}/{}: {} (cluster pubsub)",
                plan.rounds,
                if workers == 1 {
                    "node A alone"
                } else {
                    "node A + worker node B"
                }
            ));
            let nodes: Vec<&Node> = deployment.nodes.iter().collect();
            let mut owned = Vec::new();
            for node in &nodes {
                owned.push(json!(node.partitions().await));
            }
            let mut herald = herald_e2e(plan, names, &nodes, load, sink, None).await?;
            herald["partitions"] = json!(owned);
            say(format!(
                "  {:.0} events/s; cores used: {}",
                f(&herald, "/rate"),
                herald["cores_used"]
            ));
            if workers == 1 {
                wire.add(
                    "end-to-end, node A alone (cluster)",
                    &herald["node_metrics"],
                );
                one.push(herald);
            } else {
                wire.add("end-to-end, nodes A + B (cluster)", &herald["node_metrics"]);
                two.push(herald);
            }
        }
    }
    let mut report = versus(&one, &two);
    report["connect"] = connected;
    report["fanout_bindings"] = json!(bindings);
    report["moves"] = json!(moves);
    Ok(report)
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
    wire: &mut Wire,
) -> anyhow::Result<Value> {
    let partitions = herald::config::QueueSettings::default().partitions;
    let default_window = herald::config::PipelineSettings::default().reorder_window_ms;
    let mut rounds: [Vec<Value>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=plan.rounds {
        let turns = if round % 2 == 1 { [0, 1] } else { [1, 0] };
        for turn in turns {
            let window = if turn == 0 { default_window } else { 0 };
            wait_drained(pool, if plan.quick { 20 } else { 120 }).await?;
            load.call(json!({"cmd": "disconnect"})).await?;
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
            load.call(json!({"cmd": "connect", "n": plan.sockets, "base": apis[0]}))
                .await?;
            say(format!(
                "order across api nodes, round {round}/{}: A + B both taking events, lanes' reorder window {window} ms",
                plan.rounds
            ));
            let nodes: Vec<&Node> = deployment.nodes.iter().collect();
            // Skewed users: hot users' events land in consecutive batches, sent to both nodes.
            let mut herald =
                herald_e2e_via(plan, names, &nodes, load, sink, Some(ZIPF_S), &apis).await?;
            let metrics = [herald["node_metrics"].clone()];
            let attempted = statsd::counter(&metrics, "pipeline.worker.delivered");
            let filled = statsd::counter(&metrics, "socket.push.gap_filled");
            herald["gap_filled"] = json!(filled);
            herald["gap_filled_per_event"] = json!(filled / attempted.max(1.0));
            for outcome in ["sorted", "restored", "passed"] {
                herald[format!("reorder_{outcome}")] = json!(statsd::counter(
                    &metrics,
                    &format!("pipeline.lane.reorder#outcome:{outcome}")
                ));
            }
            say(format!(
                "  {:.0} events/s; gap fills per event {:.4}; lanes put {} events back in place, waited {} times in time and {} in vain",
                f(&herald, "/rate"),
                f(&herald, "/gap_filled_per_event"),
                f(&herald, "/reorder_sorted"),
                f(&herald, "/reorder_restored"),
                f(&herald, "/reorder_passed")
            ));
            wire.add("order across api nodes", &herald["node_metrics"]);
            rounds[turn].push(herald);
        }
    }
    let [with, without] = rounds;
    let mut report = versus(&without, &with);
    report["window_ms"] = json!(default_window);
    Ok(report)
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
) -> anyhow::Result<Value> {
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
) -> anyhow::Result<Value> {
    load.send(
        json!({"cmd": "e2e", "warmup": plan.e2e_warmup, "secs": plan.e2e,
                     "producers": BATCH_PRODUCERS, "window": E2E_WINDOW, "skew": skew,
                     "apis": apis}),
    )
    .await?;
    let _start = load.recv().await?;
    let pids: Vec<u32> = nodes.iter().map(|n| n.pid).collect();
    let cpu_of = || nodes.iter().map(|n| n.cpu_time()).sum::<Duration>();
    let cpu0 = cpu_of();
    let groups0 = sys::cpu_by_group(&pids, load.child.id());
    sink.take();
    let stop_sampling = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn({
        let (names, stop) = (names.clone(), stop_sampling.clone());
        async move { baseline::sample_ready(&names, stop).await }
    });
    let end = load.recv().await?;
    let cpu = cpu_of() - cpu0;
    stop_sampling.cancel();
    let ready = sampler.await.unwrap_or_default();
    let mean_ready = ready.iter().map(|&n| f64::from(n)).sum::<f64>() / ready.len().max(1) as f64;
    let groups1 = sys::cpu_by_group(&pids, load.child.id());
    let node_metrics = sink.take();
    let window = f(&end, "/secs").max(0.001);
    let cores: serde_json::Map<String, Value> = groups1
        .iter()
        .map(|(group, t)| {
            let before = groups0.get(group).copied().unwrap_or_default();
            let used = t.saturating_sub(before).as_secs_f64() / window;
            ((*group).to_owned(), json!((used * 100.0).round() / 100.0))
        })
        .collect();
    let done = load.recv().await?;
    Ok(json!({
        "events": end["events"], "secs": end["secs"], "rate": end["rate"],
        "cpu_secs": cpu.as_secs_f64(), "cores_used": cores, "node_metrics": node_metrics,
        "queue_ready_mean": mean_ready,
        "top_user_share": end["top_user_share"], "top_user_expected": end["top_user_expected"],
        "wire": statsd::wire(std::slice::from_ref(&node_metrics)),
        "after": done,
    }))
}

/// The node's StatsD snapshots of each phase, in run order, for the wire figures: messages
/// published per event and what the relay republished (see [`statsd::wire`]).
#[derive(Default)]
struct Wire {
    phases: Vec<(String, Vec<Value>)>,
}

impl Wire {
    /// Adds a snapshot (a round, a drain) to `phase`; a null snapshot (a step not taken) is skipped.
    fn add(&mut self, phase: &str, snapshot: &Value) {
        if snapshot.is_null() {
            return;
        }
        match self.phases.iter_mut().find(|(p, _)| p == phase) {
            Some((_, snapshots)) => snapshots.push(snapshot.clone()),
            None => self.phases.push((phase.to_owned(), vec![snapshot.clone()])),
        }
    }

    /// `[{phase, messages, events, messages_per_event, ...}]`, in run order.
    fn report(&self) -> Value {
        Value::Array(
            self.phases
                .iter()
                .map(|(phase, snapshots)| {
                    let mut figures = statsd::wire(snapshots);
                    figures["phase"] = json!(phase);
                    figures
                })
                .collect(),
        )
    }
}

/// The most messages per event a phase may publish: batching keeps it far below 1, so anything
/// near it means events went out more than once (relay republishes, replays).
const MAX_MESSAGES_PER_EVENT: f64 = 1.02;

/// Rounds of a baseline and of Herald as `{raw, herald, ratio, rounds}`: `raw` and `herald` are the
/// rounds with the median rate (their other fields kept), `ratio` the median of the rounds' ratios.
fn paired(raw: Vec<Value>, herald: Vec<Value>) -> Value {
    let ratios: Vec<f64> = raw
        .iter()
        .zip(&herald)
        .map(|(r, h)| f(h, "/rate") / f(r, "/rate").max(f64::MIN_POSITIVE))
        .collect();
    json!({
        "raw": median_by_rate(&raw),
        "herald": median_by_rate(&herald),
        "ratio": median(ratios),
        "rounds": {"raw": raw, "herald": herald},
    })
}

/// Two Herald variants measured in the same rounds (`base` and `other`, round by round) as
/// `{base, other, ratio, rounds}`: each the round with the median rate, `ratio` the median of the
/// rounds' other/base ratios.
fn versus(base: &[Value], other: &[Value]) -> Value {
    let ratios: Vec<f64> = base
        .iter()
        .zip(other)
        .map(|(b, o)| f(o, "/rate") / f(b, "/rate").max(f64::MIN_POSITIVE))
        .collect();
    json!({
        "base": median_by_rate(base),
        "other": median_by_rate(other),
        "ratio": median(ratios),
        "rounds": {"base": base, "other": other},
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn median_by_rate(rounds: &[Value]) -> Value {
    let mut sorted: Vec<&Value> = rounds.iter().collect();
    sorted.sort_by(|a, b| f(a, "/rate").total_cmp(&f(b, "/rate")));
    sorted
        .get(sorted.len() / 2)
        .map_or(Value::Null, |v| (*v).clone())
}

/// Starts the echo server, connects `n` sockets to it (one echo each), reads its growth.
async fn echo_rss(load: &mut Loadgen, n: usize) -> anyhow::Result<Value> {
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
    let connected = load
        .call(json!({"cmd": "connect_echo", "port": port, "n": n}))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = sys::rss_bytes(pid).unwrap_or(0);
    load.call(json!({"cmd": "close_echo"})).await?;
    let _ = echo.kill().await;
    let n = connected["connected"].as_u64().unwrap_or(0);
    Ok(json!({
        "before_bytes": before, "after_bytes": after, "sockets": n, "connect": connected,
        "per_socket_bytes": after.saturating_sub(before) as f64 / n.max(1) as f64,
    }))
}

/// Checkpoints PostgreSQL was asked for so far, server-wide. Every CREATE or DROP DATABASE forces
/// one (other sessions' test suites make a database per test), and each flushes every dirty page
/// at once: commits stall behind it. Counted per phase so a latency tail can be told from it.
async fn forced_checkpoints(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT checkpoints_req FROM pg_stat_bgwriter")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

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

/// 12345.6 -> "12,346".
fn thousands(v: f64) -> String {
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

fn f(report: &Value, path: &str) -> f64 {
    report.pointer(path).and_then(Value::as_f64).unwrap_or(0.0)
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

/// The table of issue 3, as Markdown (BENCHMARKS.md carries it as printed).
fn render(r: &Value) -> String {
    let mut rows: Vec<[String; 5]> = Vec::new();
    let ratio_of = |figure: &str| format!("{:.2}x", f(r, &format!("/{figure}/ratio")));
    let (raw, herald) = (
        f(r, "/ingest_batch/raw/rate"),
        f(r, "/ingest_batch/herald/rate"),
    );
    rows.push([
        format!("ingest, events/s, `POST /api/v1/events/batch` ({} events/request, {BATCH_PRODUCERS} producers)", loadgen::BATCH),
        format!("{} (UNNEST, {} rows/statement, {BATCH_PRODUCERS} connections)", thousands(raw), loadgen::BATCH),
        thousands(herald),
        ratio_of("ingest_batch"),
        verdict(f(r, "/ingest_batch/ratio") >= 0.5, ">= 0.5x"),
    ]);
    let c = r["concurrency"].as_u64().unwrap_or(0);
    let (raw, herald) = (
        f(r, "/ingest_single/raw/rate"),
        f(r, "/ingest_single/herald/rate"),
    );
    rows.push([
        format!("ingest, events/s, single `POST /api/v1/events`, {c} concurrent clients"),
        format!("{} (1 row/transaction, {c} connections)", thousands(raw)),
        thousands(herald),
        ratio_of("ingest_single"),
        "none".into(),
    ]);
    let n = r["sockets"].as_u64().unwrap_or(0);
    let (raw, herald) = (f(r, "/e2e/raw/rate"), f(r, "/e2e/herald/rate"));
    rows.push([
        format!("end-to-end sustained events/s, enqueue -> pushed to {} sockets (closed loop, {E2E_WINDOW} in flight)", thousands(n as f64)),
        format!("{} (quorum, persistent, {} confirms in flight, prefetch {}, ack each)", thousands(raw), r["max_inflight_confirms"], r["prefetch"]),
        thousands(herald),
        ratio_of("e2e"),
        verdict(f(r, "/e2e/ratio") >= 1.0, ">= 1.0x (aim 1.5x)"),
    ]);
    let (uniform, skewed) = (f(r, "/skew/base/rate"), f(r, "/skew/other/rate"));
    rows.push([
        format!(
            "end-to-end events/s, users Zipf-distributed (s = {ZIPF_S}; the top user drew {:.0}% of the events), vs uniform",
            f(r, "/skew/other/top_user_share") * 100.0
        ),
        format!("{} (Herald, users uniform, same rounds)", thousands(uniform)),
        thousands(skewed),
        format!("{:.2}x", f(r, "/skew/ratio")),
        verdict(f(r, "/skew/ratio") >= 0.9, ">= 0.9x"),
    ]);
    let (one, two) = (f(r, "/workers/base/rate"), f(r, "/workers/other/rate"));
    rows.push([
        format!(
            "end-to-end events/s, two worker nodes: A (api,worker,socket; the {} sockets) + B (worker), cluster pubsub",
            thousands(n as f64)
        ),
        format!(
            "{} (node A alone, cluster pubsub, same rounds; the usual single node, local pubsub: {})",
            thousands(one),
            thousands(f(r, "/e2e/herald/rate"))
        ),
        match r["workers"]["error"].as_str() {
            Some(error) => format!("failed: {error}"),
            None => thousands(two),
        },
        format!("{:.2}x", f(r, "/workers/ratio")),
        "none (2 cores: a second node adds no CPU)".into(),
    ]);
    let sockets = f(r, "/workers/connect/connected");
    rows.push([
        format!(
            "{} sockets joining, s (cluster: each join's bucket bound first; {} fan-out bindings)",
            thousands(sockets),
            r["workers"]["fanout_bindings"]
        ),
        format!(
            "{:.2} (local pubsub node)",
            f(r, "/rss/herald/connect/secs")
        ),
        format!("{:.2} (cluster-mode node A)", f(r, "/workers/connect/secs")),
        format!(
            "{:.2}x",
            f(r, "/workers/connect/secs") / f(r, "/rss/herald/connect/secs").max(1e-9)
        ),
        verdict(
            f(r, "/workers/connect/secs") <= 2.0
                && r["workers"]["fanout_bindings"].as_u64().is_some_and(|b| {
                    b <= u64::from(herald::config::PubSubSettings::default().buckets)
                }),
            "<= 2 s for 10,000; bindings <= pubsub.buckets",
        ),
    ]);
    let (without, with) = (
        f(r, "/order/base/gap_filled_per_event"),
        f(r, "/order/other/gap_filled_per_event"),
    );
    rows.push([
        format!(
            "gap fills per event, two api nodes (A + B, producers alternating, users Zipf-distributed), lanes' reorder window {} ms",
            r["order"]["window_ms"]
        ),
        format!(
            "{without:.4} (window 0, same rounds; {} events/s)",
            thousands(f(r, "/order/base/rate"))
        ),
        match r["order"]["error"].as_str() {
            Some(error) => format!("failed: {error}"),
            None => format!(
                "{with:.4} ({} events/s; {} events put back in place, {} waits)",
                thousands(f(r, "/order/other/rate")),
                thousands(f(r, "/order/other/reorder_sorted")),
                thousands(
                    f(r, "/order/other/reorder_restored") + f(r, "/order/other/reorder_passed")
                )
            ),
        },
        format!("{:.2}x rate", f(r, "/order/ratio")),
        verdict(with <= 0.002, "<= 0.002 gap fills per event"),
    ]);
    for k in 0..3 {
        let at = |who: &str, q: &str| f(r, &format!("/latency/{k}/{who}/{q}"));
        let fraction = f(r, &format!("/latency/{k}/fraction"));
        let rate = f(r, &format!("/latency/{k}/rate"));
        let p99 = at("herald", "p99");
        rows.push([
            format!(
                "enqueue -> push latency ms p50 / p99 / max at {:.0}% of sustained ({}/s), {} sockets",
                fraction * 100.0,
                thousands(rate),
                thousands(n as f64)
            ),
            format!(
                "{:.1} / {:.1} / {:.1} (publish -> consume)",
                at("raw", "p50"),
                at("raw", "p99"),
                at("raw", "max")
            ),
            format!(
                "{:.0} / {:.0} / {:.0} ({} forced PG checkpoints)",
                at("herald", "p50"),
                p99,
                at("herald", "max"),
                f(r, &format!("/latency/{k}/herald/forced_checkpoints"))
            ),
            format!("p99 {}", ratio(p99, at("raw", "p99"))),
            if k == 1 { verdict(p99 <= 25.0, "p99 <= 25 ms") } else { "none".into() },
        ]);
    }
    let burst = |q: &str| f(r, &format!("/burst/{q}"));
    rows.push([
        format!(
            "burst: other users' latency ms p50 / p99 / max while {} events go to one user ({} concurrent requests), {} single events/s to {} others",
            thousands(burst("events")),
            burst("requests"),
            thousands(burst("rate")),
            thousands(burst("others")),
        ),
        format!(
            "{:.0} / {:.0} / {:.0} (the same load just before the burst)",
            burst("before/p50"),
            burst("before/p99"),
            burst("before/max")
        ),
        format!(
            "{:.0} / {:.0} / {:.0} ({} events over {:.2} s; p99 {:.0} in the hot user's partition, {:.0} in the others; their requests answered after p99 {:.0})",
            burst("during/p50"),
            burst("during/p99"),
            burst("during/max"),
            burst("during/count"),
            burst("window_secs"),
            burst("during_hot_partition/p99"),
            burst("during_other_partitions/p99"),
            burst("during_api/p99"),
        ),
        format!("p99 {}", ratio(burst("during/p99"), burst("before/p99"))),
        verdict(
            burst("during/count") > 0.0 && burst("during/p99") <= 100.0,
            "p99 <= 100 ms",
        ),
    ]);
    let drained = r["burst"]["drain_secs"].as_f64();
    rows.push([
        format!(
            "burst: s from its first request until the hot user's client has all {}",
            thousands(burst("events"))
        ),
        format!(
            "requests all answered after {:.2} s",
            burst("answered_secs")
        ),
        drained.map_or_else(
            || format!("not within the limit ({} received)", burst("hot_received")),
            |s| format!("{s:.2}"),
        ),
        "n/a".into(),
        verdict(drained.is_some_and(|s| s <= 2.0), "<= 2 s"),
    ]);
    let keepup = |q: &str| f(r, &format!("/keepup/{q}"));
    rows.push([
        format!(
            "keep-up: events/s pushed vs accepted, {BATCH_PRODUCERS} producers posting batches of {} as fast as answered to {} sockets (no window)",
            loadgen::BATCH,
            thousands(n as f64)
        ),
        format!("{} accepted/s (the same window)", thousands(keepup("accepted_rate"))),
        format!(
            "{} pushed/s (backlog {} at the end)",
            thousands(keepup("pushed_rate")),
            thousands(keepup("backlog_at_end"))
        ),
        format!("{:.2}x", keepup("ratio")),
        verdict(keepup("ratio") >= 0.9, ">= 0.9x"),
    ]);
    let (raw, herald) = (
        f(r, "/rss/raw/per_socket_bytes") / 1024.0,
        f(r, "/rss/herald/per_socket_bytes") / 1024.0,
    );
    rows.push([
        format!(
            "RSS per idle socket, KB ({} connected; Herald's joined)",
            thousands(n as f64)
        ),
        format!("{raw:.1} (tokio-tungstenite echo, same buffers)"),
        format!("{herald:.1}"),
        ratio(herald, raw),
        verdict(herald <= 12.0, "<= 12 KB"),
    ]);
    let (raw, herald) = (
        f(r, "/cpu/raw/cpu_us_per_event"),
        f(r, "/cpu/herald/cpu_us_per_event"),
    );
    rows.push([
        "CPU time per delivered event, µs (Herald: whole process, ingest to push)".into(),
        format!("{raw:.1} (lapin consume + ack, prefetch {})", r["prefetch"]),
        format!("{herald:.1}"),
        ratio(herald, raw),
        verdict(herald <= 2.0 * raw, "<= 2x"),
    ]);
    let phases = r["wire"].as_array().map_or(&[][..], Vec::as_slice);
    let worst = phases
        .iter()
        .max_by(|a, b| f(a, "/messages_per_event").total_cmp(&f(b, "/messages_per_event")));
    if let Some(worst) = worst {
        let per_event = f(worst, "/messages_per_event");
        rows.push([
            format!(
                "messages published per event, the highest of {} phases ({})",
                phases.len(),
                worst["phase"].as_str().unwrap_or("?")
            ),
            "1.00 (the raw baselines publish one event per message)".into(),
            format!(
                "{per_event:.3} ({} relay-republished events in all phases)",
                thousands(phases.iter().map(|p| f(p, "/relay_events")).sum())
            ),
            format!("{per_event:.3}x"),
            verdict(
                phases
                    .iter()
                    .all(|p| f(p, "/messages_per_event") <= MAX_MESSAGES_PER_EVENT),
                &format!("<= {MAX_MESSAGES_PER_EVENT} in every phase"),
            ),
        ]);
    }
    let mut out = format!(
        "\nHerald benchmark ({} run, {}s, git {}) on {}\n\n",
        r["mode"].as_str().unwrap_or("?"),
        thousands(f(r, "/run_secs")),
        r["git"].as_str().unwrap_or("?"),
        r["machine"].as_str().unwrap_or("?"),
    );
    out.push_str(&format!(
        "Throughput rows: median of {} alternating baseline/Herald rounds (ratio: median of the rounds' ratios).\n\n",
        r["rounds"]
    ));
    out.push_str("| figure | raw baseline, same run | Herald | ratio | target |\n");
    out.push_str("| --- | --- | --- | --- | --- |\n");
    for row in rows {
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    out.push_str(&render_wire(phases));
    out
}

/// The wire per phase, from the node's StatsD counters over the phase (a drain included where the
/// phase leaves a backlog): what the group commits and the relay handed to the broker.
fn render_wire(phases: &[Value]) -> String {
    let mut out = String::from(
        "\nMessages published per event, per phase (node counters; relay = outbox republishes):\n\n",
    );
    out.push_str("| phase | events accepted | messages published | events published | messages per event | events published per accepted | relay-republished events | target |\n");
    out.push_str("| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for p in phases {
        let per_event = f(p, "/messages_per_event");
        out.push_str(&format!(
            "| {} | {} | {} | {} | {per_event:.3} | {:.3} | {} | {} |\n",
            p["phase"].as_str().unwrap_or("?"),
            thousands(f(p, "/accepted")),
            thousands(f(p, "/messages")),
            thousands(f(p, "/events")),
            f(p, "/events_per_accepted"),
            thousands(f(p, "/relay_events")),
            verdict(
                per_event <= MAX_MESSAGES_PER_EVENT,
                &format!("<= {MAX_MESSAGES_PER_EVENT}")
            ),
        ));
    }
    let drops: f64 = phases.iter().map(|p| f(p, "/statsd_udp_drops")).sum();
    if drops > 0.0 {
        out.push_str(&format!(
            "\n{} StatsD datagrams were dropped by the kernel: the counters above undercount.\n",
            thousands(drops)
        ));
    }
    out
}
