//! The scale-out run (issue 18, `scripts/scale`): 100,000 joined sockets on one box, as a real
//! deployment would hold them, beside a single node's 10,000 measured minutes before in the same
//! run.
//!
//! One process here may hold at most 20,000 open files, a hard limit, so the sockets are spread
//! over several socket nodes (`socket` role only) in cluster mode, with one node taking the API and
//! the worker (`api,worker`), and held by several load generators (`soak-loadgen`), each with its
//! own users, its own loopback source address and its own share of the load. Each shape runs the
//! same phases on a fresh deployment: connect and join every socket (joins/s, RSS per socket per
//! node, the broker's bindings), a closed loop (the sustained rate), then a fixed rate (p50/p99
//! enqueue -> push, pushes / accepted, fan-out messages per event, where the cores went).

use crate::node::{self, Names, Node};
use crate::protocol::Connected;
use crate::soak::load::{Command, Drained, Measured, Started, Stopped, Window};
use crate::soak::{LoadSpec, histogram_of, pools, shown, spawn_loadgen};
use crate::{Deployment, Loadgen, out_dir, statsd, sys, thousands};
use anyhow::{Context, bail};
use futures_util::future::try_join_all;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Sockets per process at most, socket node or load generator: 20,000 open files less room for
/// the pools, the broker, logs and the accept backlog.
const SOCKETS_PER_PROCESS: usize = 17_000;
/// The node counters that say why a push was late or missing: retried broadcasts, overflowing
/// sockets, repairs at the socket, lost broker connections.
const DIAGNOSTIC_COUNTERS: [&str; 7] = [
    "pipeline.retry.scheduled",
    "pipeline.dead_lettered",
    "socket.outbound.overflow",
    "socket.push.gap_filled",
    "socket.push.gap_unfilled",
    "queue.connection.lost",
    "pubsub.fanout.messages",
];
/// Load generators at most, each from its own address `127.0.0.<10 + 64 * shape + j>`.
const MAX_PROCESSES: usize = 64;
/// The closed loop's producers and events in flight, over all load generators (the soak's).
const MEASURE_PRODUCERS: usize = 16;
const MEASURE_WINDOW: u64 = 4_000;
const MEASURE_WARMUP: f64 = 3.0;
/// The hub's pools (background, writes, reads), the soak's; socket nodes read catch-up and gap
/// fills only, so each keeps two for the background and reads, and the three writes every node
/// must have (`pipeline.commit_streams` + 2): seven nodes take 55 of PostgreSQL's 100 connections.
const HUB_POOLS: (u32, u32, u32) = (6, 3, 4);
const SOCKET_NODE_POOLS: (u32, u32, u32) = (2, 3, 2);

fn say(what: impl AsRef<str>) {
    eprintln!("[scale] {}", what.as_ref());
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Joined sockets of the scale-out deployment.
    #[arg(long, default_value_t = 100_000)]
    sockets: usize,
    /// Its socket nodes (default: enough for at most 17,000 sockets each).
    #[arg(long)]
    socket_nodes: Option<usize>,
    /// Sockets of the single node (all roles, local pubsub) measured first; 0 skips it.
    #[arg(long, default_value_t = 10_000)]
    baseline_sockets: usize,
    /// Events per second of the fixed-rate phase, the same for both.
    #[arg(long, default_value_t = 4_000.0)]
    rate: f64,
    /// Seconds of the fixed-rate phase.
    #[arg(long, default_value_t = 60.0)]
    secs: f64,
    /// Seconds of the closed loop's window (after 3 s of warm-up).
    #[arg(long, default_value_t = 15.0)]
    measure_secs: f64,
    /// Sockets per process at most, socket node or load generator (a smoke run sets it low to
    /// run several of each).
    #[arg(long, default_value_t = SOCKETS_PER_PROCESS)]
    per_process: usize,
    /// Exponent of the Zipf distribution of each load generator's users.
    #[arg(long, default_value_t = 1.1)]
    skew: f64,
    /// Instead of the shapes: one node with --baseline-sockets, three times on fresh deployments,
    /// traces off, then on at 10% and at 100% sampling (exported to an OTLP receiver in this
    /// harness): what traces cost per event (issue 20).
    #[arg(long)]
    traces: bool,
    /// `cargo bench` appends this; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One deployment's shape.
#[derive(Clone, Copy, Debug, Serialize)]
struct Shape {
    sockets: usize,
    /// 0: one node with every role and local pubsub holds the sockets.
    socket_nodes: usize,
    loadgens: usize,
    /// What `--traces` compares; `NotCompared` otherwise.
    traces: Traces,
}

/// A shape's traces, when `--traces` compares them.
#[derive(Clone, Copy, Debug, Serialize)]
enum Traces {
    NotCompared,
    Off,
    Sampled(f64),
}

impl Shape {
    fn nodes_holding_sockets(&self) -> usize {
        self.socket_nodes.max(1)
    }

    fn label(&self) -> String {
        match self.traces {
            Traces::Off => return "traces off".to_owned(),
            Traces::Sampled(ratio) => return format!("traces, {:.0}% sampled", ratio * 100.0),
            Traces::NotCompared => {}
        }
        if self.socket_nodes == 0 {
            format!(
                "{} sockets, one node (all roles, local pubsub)",
                self.sockets
            )
        } else {
            format!(
                "{} sockets, {} socket nodes + an api,worker node (cluster pubsub), {} load generators",
                self.sockets, self.socket_nodes, self.loadgens
            )
        }
    }
}

/// What one shape measured.
#[derive(Debug, Serialize)]
struct Measures {
    shape: Shape,
    joined: usize,
    join_failed: usize,
    /// The slowest load generator's connect-and-join time, and every join over it.
    join_secs: f64,
    joins_per_sec: f64,
    /// RSS growth per joined socket of each node holding sockets, bytes.
    rss_per_socket: Vec<f64>,
    /// Each node's RSS once the sockets joined, bytes (the hub first in the scale-out shape).
    rss_after_join: Vec<u64>,
    fanout_bindings: Option<usize>,
    sustained: f64,
    sustained_errors: u64,
    rate: f64,
    accepted: u64,
    accepted_joined: u64,
    pushed: u64,
    request_errors: u64,
    p50_ms: Option<u64>,
    p99_ms: Option<u64>,
    max_ms: Option<u64>,
    drained: bool,
    fanout_messages: f64,
    fanout_events: f64,
    cores: BTreeMap<&'static str, f64>,
    /// The fixed-rate phase's length, s.
    phase_secs: f64,
    /// Cores each process group used while the sockets joined.
    join_cores: BTreeMap<&'static str, f64>,
    /// Events to joined users the closed loop left unpushed, 60 s after it (0 when all came).
    closed_loop_left: u64,
    /// The nodes' [`DIAGNOSTIC_COUNTERS`] over the closed loop.
    closed_loop_counters: BTreeMap<&'static str, f64>,
    rejoins: u64,
    sockets_closed: u64,
    /// Spans the OTLP receiver took during the fixed rate (`--traces`).
    spans: u64,
    /// The node processes' CPU time over the fixed rate, seconds (unrounded, unlike `cores`).
    herald_cpu_secs: f64,
}

impl Measures {
    fn push_ratio(&self) -> f64 {
        self.pushed as f64 / self.accepted_joined.max(1) as f64
    }

    fn rss_per_socket_range(&self) -> String {
        let kb = |b: f64| b / 1024.0;
        let min = self.rss_per_socket.iter().copied().fold(f64::MAX, f64::min);
        let max = self.rss_per_socket.iter().copied().fold(0.0, f64::max);
        if self.rss_per_socket.len() <= 1 {
            format!("{:.1}", kb(max))
        } else {
            format!("{:.1}-{:.1}", kb(min), kb(max))
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let per_process = args.per_process;
    if args.sockets == 0
        || per_process == 0
        || per_process > SOCKETS_PER_PROCESS
        || !(args.rate > 0.0 && args.secs > 0.0 && args.measure_secs > 0.0)
    {
        bail!(
            "--sockets, --per-process, --rate, --secs and --measure-secs must be above 0, and --per-process at most {SOCKETS_PER_PROCESS}"
        );
    }
    sys::ensure_nofile_for(per_process)?;
    std::fs::create_dir_all(out_dir())?;
    if args.baseline_sockets > per_process {
        bail!("--baseline-sockets is one node's: at most {per_process} (--per-process)");
    }
    let mut shapes = Vec::new();
    if args.baseline_sockets > 0 {
        shapes.push(Shape {
            sockets: args.baseline_sockets,
            socket_nodes: 0,
            loadgens: args.baseline_sockets.div_ceil(per_process),
            traces: Traces::NotCompared,
        });
    }
    if args.traces {
        return run_traces(&args, shapes.first().copied()).await;
    }
    if args
        .sockets
        .max(args.baseline_sockets)
        .div_ceil(per_process)
        > MAX_PROCESSES
    {
        bail!("at most {MAX_PROCESSES} load generators: raise --per-process");
    }
    let socket_nodes = args
        .socket_nodes
        .unwrap_or(args.sockets.div_ceil(per_process))
        .max(1);
    if args.sockets.div_ceil(socket_nodes) > per_process {
        bail!(
            "{socket_nodes} socket nodes cannot hold {} sockets here: at most {per_process} each",
            args.sockets
        );
    }
    shapes.push(Shape {
        sockets: args.sockets,
        socket_nodes,
        loadgens: args.sockets.div_ceil(per_process),
        traces: Traces::NotCompared,
    });
    let mut results = Vec::new();
    for (index, shape) in shapes.into_iter().enumerate() {
        say(shape.label());
        let names = Names::new();
        let measured = run_shape(&args, shape, index, &names, None).await;
        node::clean_up(&names).await;
        results.push(measured?);
    }
    print_table(&args, &results);
    let path = out_dir().join("scale-latest.json");
    let report = serde_json::json!({
        "git": crate::git_revision(),
        "machine": sys::machine(),
        "started_unix": crate::unix_now(),
        "shapes": results,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    say(format!("wrote {}", path.display()));
    // Speed is not asserted, but a run that lost sockets or pushes measured nothing worth reading.
    for m in &results {
        if m.join_failed > 0
            || m.sockets_closed > 0
            || m.closed_loop_left > 0
            || !m.drained
            || m.pushed == 0
            || m.sustained <= 0.0
        {
            bail!(
                "{}: {} joins failed, {} sockets closed, drained {}, {} pushed, sustained {:.0}/s",
                m.shape.label(),
                m.join_failed,
                m.sockets_closed,
                m.drained,
                m.pushed,
                m.sustained
            );
        }
    }
    Ok(())
}

/// One shape on a fresh database and queue prefix: start, measure, stop.
async fn run_shape(
    args: &Args,
    shape: Shape,
    index: usize,
    names: &Names,
    spans: Option<&SpanSink>,
) -> anyhow::Result<Measures> {
    let bin = Path::new(env!("CARGO_BIN_EXE_herald"));
    let (sink, statsd_addr) = statsd::Sink::start()?;
    let mut deployment = Deployment {
        bin,
        names: names.clone(),
        api_key: Node::setup(bin, names)?,
        settings: vec![("HERALD_STATSD_ADDR", statsd_addr)],
        nodes: Vec::new(),
    };
    let result = async {
        let per_node = (shape.sockets.div_ceil(shape.nodes_holding_sockets()) + 100).to_string();
        if shape.socket_nodes == 0 {
            let mut settings = pools(HUB_POOLS);
            settings.push(("HERALD_SOCKET__MAX_CONNECTIONS", per_node));
            if let (Traces::Sampled(ratio), Some(sink)) = (shape.traces, spans) {
                settings.push(("HERALD_TRACES__OTLP_ENDPOINT", sink.url.clone()));
                settings.push(("HERALD_TRACES__SAMPLE_RATIO", ratio.to_string()));
                settings.push(("HERALD_TRACES__EXPORT_INTERVAL_MS", "1000".to_owned()));
                settings.push(("HERALD_TRACES__MAX_QUEUED_SPANS", "65536".to_owned()));
            }
            deployment.start("scale-single", &settings).await?;
        } else {
            let mut hub = pools(HUB_POOLS);
            hub.push(("HERALD_PUBSUB__MODE", "cluster".to_owned()));
            hub.push(("HERALD_NODE__ROLES", "api,worker".to_owned()));
            deployment.start("scale-hub", &hub).await?;
            for k in 1..=shape.socket_nodes {
                let mut settings = pools(SOCKET_NODE_POOLS);
                settings.push(("HERALD_PUBSUB__MODE", "cluster".to_owned()));
                settings.push(("HERALD_NODE__ROLES", "socket".to_owned()));
                settings.push(("HERALD_SOCKET__MAX_CONNECTIONS", per_node.clone()));
                deployment
                    .start(&format!("scale-socket-{k}"), &settings)
                    .await?;
            }
        }
        measure(args, shape, index, &deployment, &sink, spans).await
    }
    .await;
    deployment.stop_all().await;
    result
}

/// Sends `command` to every load generator at once; their answers in order.
async fn call_all<R: DeserializeOwned>(
    loads: &mut [Loadgen],
    command: &Command,
) -> anyhow::Result<Vec<R>> {
    try_join_all(loads.iter_mut().map(|load| load.call::<R>(command))).await
}

/// Sends load generator j `command(j)`, all at once; their answers in order.
async fn call_each<R: DeserializeOwned>(
    loads: &mut [Loadgen],
    command: impl Fn(usize) -> Command,
) -> anyhow::Result<Vec<R>> {
    let commands: Vec<Command> = (0..loads.len()).map(command).collect();
    try_join_all(
        loads
            .iter_mut()
            .zip(&commands)
            .map(|(load, command)| load.call::<R>(command)),
    )
    .await
}

/// Part j of `total` split into `parts` nearly equal whole parts (the first ones one larger).
fn share(total: u64, parts: usize, j: usize) -> u64 {
    let parts = parts.max(1) as u64;
    total / parts + u64::from((j as u64) < total % parts)
}

async fn measure(
    args: &Args,
    shape: Shape,
    index: usize,
    deployment: &Deployment<'_>,
    sink: &statsd::Sink,
    spans: Option<&SpanSink>,
) -> anyhow::Result<Measures> {
    let (api, holders): (Vec<&Node>, Vec<&Node>) = if shape.socket_nodes == 0 {
        let node = deployment.nodes.first().context("no node")?;
        (vec![node], vec![node])
    } else {
        let (hub, sockets) = deployment.nodes.split_first().context("no node")?;
        (vec![hub], sockets.iter().collect())
    };
    let api_bases: Vec<String> = api.iter().map(|n| n.base.clone()).collect();
    let socket_bases: Vec<String> = holders.iter().map(|n| n.base.clone()).collect();
    // Load generator j holds users[j] users, numbered on from the previous one's.
    let users: Vec<usize> = (0..shape.loadgens)
        .map(|j| share(shape.sockets as u64, shape.loadgens, j) as usize)
        .collect();
    let mut loads = Vec::new();
    for j in 0..shape.loadgens {
        let first_user = users[..j].iter().sum();
        let users = users[j];
        loads.push(spawn_loadgen(&LoadSpec {
            key: &deployment.api_key,
            socket_bases: &socket_bases,
            api_bases: &api_bases,
            first_user,
            users,
            // A shape's own addresses: the last one's client ports may still be in TIME_WAIT.
            source: Some(std::net::IpAddr::from([
                127,
                0,
                0,
                (10 + MAX_PROCESSES * index + j) as u8,
            ])),
            skew: args.skew,
            batch: crate::loadgen::BATCH,
        })?);
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    let before: Vec<u64> = holders.iter().map(|n| n.rss_bytes()).collect();
    say(format!(
        "connecting and joining {} sockets from {} load generators",
        shape.sockets, shape.loadgens
    ));
    let pids: Vec<u32> = deployment.nodes.iter().map(|n| n.pid).collect();
    let loadgen_pids: Vec<u32> = loads.iter().filter_map(|l| l.child.id()).collect();
    let cpu_before_join = sys::cpu_by_group(&pids, &loadgen_pids);
    let started = Instant::now();
    let connected: Vec<Connected> =
        call_each(&mut loads, |j| Command::Connect { n: users[j] }).await?;
    let join_secs = started.elapsed().as_secs_f64();
    let join_cores = sys::cores_used(
        &cpu_before_join,
        &sys::cpu_by_group(&pids, &loadgen_pids),
        join_secs,
    );
    let joined: usize = connected.iter().map(|c| c.connected).sum();
    let join_failed: usize = connected.iter().map(|c| c.failed).sum();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let holders_n = holders.len();
    let rss_per_socket = holders
        .iter()
        .zip(&before)
        .enumerate()
        .map(|(k, (node, before))| {
            // User i's socket is on node i mod nodes.
            let on_node = (shape.sockets + holders_n - 1 - k) / holders_n;
            node.rss_bytes().saturating_sub(*before) as f64 / on_node.max(1) as f64
        })
        .collect();
    let rss_after_join = deployment.nodes.iter().map(|n| n.rss_bytes()).collect();
    let fanout_bindings = if shape.socket_nodes > 0 {
        crate::fanout_bindings(&deployment.names.prefix)
    } else {
        None
    };
    say(format!(
        "  {joined} joined ({join_failed} failed) in {join_secs:.1} s; fan-out bindings {}",
        fanout_bindings.map_or_else(|| "-".to_owned(), |b| b.to_string())
    ));

    say(format!(
        "closed loop: {MEASURE_PRODUCERS} producers, at most {MEASURE_WINDOW} events in flight, {} s",
        args.measure_secs
    ));
    // The same producers and window in all, shared out, so both shapes offer the same concurrency.
    let loadgens = shape.loadgens;
    let sustained: Vec<Measured> = call_each(&mut loads, |j| Command::Measure {
        warmup: MEASURE_WARMUP,
        secs: args.measure_secs,
        producers: (share(MEASURE_PRODUCERS as u64, loadgens, j) as usize).max(1),
        window: share(MEASURE_WINDOW, loadgens, j).max(1),
        drain: 60,
    })
    .await?;
    let sustained_rate: f64 = sustained.iter().map(|m| m.rate).sum();
    // What the closed loop left undelivered after its 60 s, given as long again; then the
    // node counters that say why (retries, overflowing sockets, repairs).
    let closed_loop_left: u64 = if sustained.iter().all(|m| m.drained) {
        0
    } else {
        let drained: Vec<Drained> = call_all(&mut loads, &Command::Drain { limit: 60.0 }).await?;
        drained.iter().map(|d| d.left).sum()
    };
    let closed_loop_metrics = sink.take();
    let closed_loop_counters: BTreeMap<&'static str, f64> = DIAGNOSTIC_COUNTERS
        .iter()
        .map(|&name| {
            let value = statsd::counter(std::slice::from_ref(&closed_loop_metrics), name);
            (name, value + 0.0)
        })
        .collect();
    say(format!(
        "  sustained {}/s; undelivered after the closed loop and 60 s more: {closed_loop_left}; {closed_loop_counters:?}",
        thousands(sustained_rate)
    ));

    say(format!(
        "fixed rate: {}/s for {} s",
        thousands(args.rate),
        args.secs
    ));
    let cpu_before = sys::cpu_by_group(&pids, &loadgen_pids);
    sink.take();
    // Spans the closed loop made are exported by now or soon: counted from here on, with the
    // fixed rate's, less what the first export interval still brings of the loop's (at most 1 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let Some(spans) = spans {
        spans.take();
    }
    // Each load generator's share of the rate is its share of the users.
    let _: Vec<Started> = call_each(&mut loads, |j| Command::Start {
        rate: args.rate * users[j] as f64 / shape.sockets as f64,
    })
    .await?;
    let phase = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.secs)).await;
    let windows: Vec<Window> = call_all(&mut loads, &Command::Sample).await?;
    let phase_secs = phase.elapsed().as_secs_f64();
    let cpu_after = sys::cpu_by_group(&pids, &loadgen_pids);
    let cores = sys::cores_used(&cpu_before, &cpu_after, phase_secs);
    let herald_cpu_secs = match (cpu_before.get("herald"), cpu_after.get("herald")) {
        (Some(before), Some(after)) => after.saturating_sub(*before).as_secs_f64(),
        _ => 0.0,
    };
    let _: Vec<Stopped> = call_all(&mut loads, &Command::Stop).await?;
    let drained: Vec<Drained> = call_all(&mut loads, &Command::Drain { limit: 30.0 }).await?;
    let metrics = sink.take();
    // The last export interval's spans.
    let spans = match spans {
        Some(spans) => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            spans.take()
        }
        None => 0,
    };
    let mut latency = histogram_of(&[]);
    for window in &windows {
        latency.add(histogram_of(&window.latency))?;
    }
    let quantile = |q: f64| (!latency.is_empty()).then(|| latency.value_at_quantile(q));
    let sum = |f: fn(&Window) -> u64| windows.iter().map(f).sum::<u64>();
    let measures = Measures {
        shape,
        joined,
        join_failed,
        join_secs,
        joins_per_sec: joined as f64 / join_secs.max(1e-3),
        rss_per_socket,
        rss_after_join,
        fanout_bindings,
        sustained: sustained_rate,
        sustained_errors: sustained.iter().map(|m| m.errors).sum(),
        rate: args.rate,
        accepted: sum(|w| w.counts.accepted),
        accepted_joined: sum(|w| w.counts.accepted_joined),
        pushed: sum(|w| w.counts.pushed),
        request_errors: sum(|w| w.counts.request_errors),
        p50_ms: quantile(0.5),
        p99_ms: quantile(0.99),
        max_ms: (!latency.is_empty()).then(|| latency.max()),
        drained: drained.iter().all(|d| d.drained),
        fanout_messages: statsd::counter(std::slice::from_ref(&metrics), "pubsub.fanout.messages"),
        fanout_events: statsd::counter(std::slice::from_ref(&metrics), "pubsub.fanout.events"),
        cores,
        phase_secs,
        join_cores,
        closed_loop_left,
        closed_loop_counters,
        rejoins: sum(|w| w.counts.rejoins),
        sockets_closed: sum(|w| w.counts.sockets_closed),
        spans,
        herald_cpu_secs,
    };
    say(format!(
        "  pushed/accepted {:.4}, p50 {} ms, p99 {} ms, drained {}",
        measures.push_ratio(),
        shown(measures.p50_ms),
        shown(measures.p99_ms),
        measures.drained
    ));
    let _ = call_all::<crate::soak::load::Disconnected>(&mut loads, &Command::Disconnect).await;
    for mut load in loads {
        drop(load.stdin);
        let _ = load.child.kill().await;
    }
    Ok(measures)
}

/// The table: a row per figure, a column per shape, and the last shape against the first.
fn print_table(args: &Args, results: &[Measures]) {
    let header: Vec<String> = results.iter().map(|m| m.shape.label()).collect();
    println!();
    println!(
        "Scale-out (issue 18): fixed rate {}/s for {} s; closed loop {} s",
        thousands(args.rate),
        args.secs,
        args.measure_secs
    );
    println!();
    print!("| figure |");
    for h in &header {
        print!(" {h} |");
    }
    let ratio = results.len() > 1;
    if ratio {
        print!(" ratio |");
    }
    println!();
    println!(
        "|{}",
        " --- |".repeat(header.len() + 1 + usize::from(ratio))
    );
    type Row = (
        &'static str,
        fn(&Measures) -> String,
        Option<fn(&Measures) -> f64>,
    );
    let rows: [Row; 14] = [
        (
            "sockets joined (failed)",
            |m| format!("{} ({})", thousands(m.joined as f64), m.join_failed),
            None,
        ),
        (
            "connect and join, s",
            |m| format!("{:.1}", m.join_secs),
            None,
        ),
        (
            "connect and join: cores herald / postgresql / rabbitmq / load generators",
            |m| cores(&m.join_cores),
            None,
        ),
        (
            "closed loop: events left unpushed 60 s after it",
            |m| m.closed_loop_left.to_string(),
            None,
        ),
        (
            "joins/s",
            |m| thousands(m.joins_per_sec),
            Some(|m| m.joins_per_sec),
        ),
        (
            "RSS per idle joined socket, KB (each node holding sockets)",
            Measures::rss_per_socket_range,
            None,
        ),
        ("fan-out bindings", |m| shown(m.fanout_bindings), None),
        (
            "sustained, events/s (closed loop)",
            |m| thousands(m.sustained),
            Some(|m| m.sustained),
        ),
        (
            "fixed rate: pushed / accepted",
            |m| format!("{:.4}", m.push_ratio()),
            None,
        ),
        (
            "fixed rate: p50 enqueue -> push, ms",
            |m| shown(m.p50_ms),
            Some(|m| m.p50_ms.unwrap_or(0) as f64),
        ),
        (
            "fixed rate: p99 enqueue -> push, ms",
            |m| shown(m.p99_ms),
            Some(|m| m.p99_ms.unwrap_or(0) as f64),
        ),
        (
            "fixed rate: fan-out messages/s (per event)",
            |m| {
                format!(
                    "{} ({:.3})",
                    thousands(m.fanout_messages / m.phase_secs.max(1e-3)),
                    m.fanout_messages / m.fanout_events.max(1.0)
                )
            },
            None,
        ),
        (
            "fixed rate: cores herald / postgresql / rabbitmq / load generators",
            |m| cores(&m.cores),
            None,
        ),
        (
            "rejoins, sockets closed, all drained",
            |m| format!("{}, {}, {}", m.rejoins, m.sockets_closed, m.drained),
            None,
        ),
    ];
    for (name, cell, value) in rows {
        print!("| {name} |");
        for m in results {
            print!(" {} |", cell(m));
        }
        if ratio {
            let (first, last) = (&results[0], &results[results.len() - 1]);
            match value {
                Some(v) if v(first) > 0.0 => print!(" {:.2}x |", v(last) / v(first)),
                _ => print!(" |"),
            }
        }
        println!();
    }
    println!();
}

/// `--traces`: the single node three times on fresh deployments (traces off, 10%, 100%), the same
/// phases each time; a table of what traces cost against the run with them off.
async fn run_traces(args: &Args, single: Option<Shape>) -> anyhow::Result<()> {
    let single = single.context("--traces measures the single node: --baseline-sockets above 0")?;
    let sink = SpanSink::start().await?;
    let mut results = Vec::new();
    for (index, traces) in [Traces::Off, Traces::Sampled(0.1), Traces::Sampled(1.0)]
        .into_iter()
        .enumerate()
    {
        let shape = Shape { traces, ..single };
        say(shape.label());
        let names = Names::new();
        let measured = run_shape(args, shape, index, &names, Some(&sink)).await;
        node::clean_up(&names).await;
        results.push(measured?);
    }
    print_traces_table(args, &results);
    let path = out_dir().join("traces-latest.json");
    let report = serde_json::json!({
        "git": crate::git_revision(),
        "machine": sys::machine(),
        "started_unix": crate::unix_now(),
        "runs": results,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    say(format!("wrote {}", path.display()));
    for m in &results {
        if m.pushed == 0 || m.sustained <= 0.0 || m.join_failed > 0 || !m.drained {
            bail!("{}: measured nothing worth reading", m.shape.label());
        }
        if matches!(m.shape.traces, Traces::Sampled(_)) && m.spans == 0 {
            bail!("{}: no span reached the OTLP receiver", m.shape.label());
        }
    }
    Ok(())
}

/// Herald's CPU per event accepted at the fixed rate, in microseconds.
fn cpu_us_per_event(m: &Measures) -> f64 {
    m.herald_cpu_secs * 1e6 / m.accepted.max(1) as f64
}

fn print_traces_table(args: &Args, results: &[Measures]) {
    println!();
    println!(
        "Traces (issue 20): one node, {} sockets; closed loop {} s, then {}/s for {} s; each against traces off",
        thousands(results[0].shape.sockets as f64),
        args.measure_secs,
        thousands(args.rate),
        args.secs
    );
    println!();
    print!("| figure |");
    for m in results {
        print!(" {} |", m.shape.label());
    }
    println!();
    println!("|{}", " --- |".repeat(results.len() + 1));
    type Row = (&'static str, fn(&Measures) -> f64, fn(f64) -> String);
    let rows: [Row; 5] = [
        (
            "sustained, events/s (closed loop)",
            |m| m.sustained,
            thousands,
        ),
        (
            "fixed rate: herald CPU per event, us",
            cpu_us_per_event,
            |v| format!("{v:.1}"),
        ),
        (
            "fixed rate: p50 enqueue -> push, ms",
            |m| m.p50_ms.unwrap_or(0) as f64,
            |v| format!("{v:.0}"),
        ),
        (
            "fixed rate: p99 enqueue -> push, ms",
            |m| m.p99_ms.unwrap_or(0) as f64,
            |v| format!("{v:.0}"),
        ),
        (
            "fixed rate: spans exported per event",
            |m| m.spans as f64 / m.accepted.max(1) as f64,
            |v| format!("{v:.2}"),
        ),
    ];
    let off = &results[0];
    for (name, value, shown) in rows {
        print!("| {name} |");
        for (k, m) in results.iter().enumerate() {
            let v = value(m);
            if k == 0 || value(off) <= 0.0 {
                print!(" {} |", shown(v));
            } else {
                print!(" {} ({:.2}x) |", shown(v), v / value(off));
            }
        }
        println!();
    }
    println!();
}

/// An OTLP/HTTP receiver in the harness that only counts the spans posted to it.
struct SpanSink {
    url: String,
    spans: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl SpanSink {
    async fn start() -> anyhow::Result<Self> {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        let spans = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&spans);
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let counted = Arc::clone(&counted);
                async move {
                    let value: serde_json::Value =
                        serde_json::from_slice(&body).unwrap_or_default();
                    let n: usize = value["resourceSpans"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|r| r["scopeSpans"].as_array().into_iter().flatten())
                        .map(|s| s["spans"].as_array().map_or(0, Vec::len))
                        .sum();
                    counted.fetch_add(n as u64, Ordering::Relaxed);
                    "{}"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { url, spans })
    }

    /// Spans received since the last take.
    fn take(&self) -> u64 {
        self.spans.swap(0, std::sync::atomic::Ordering::Relaxed)
    }
}

/// Cores used by herald / postgresql / rabbitmq / the load generators.
fn cores(by_group: &BTreeMap<&'static str, f64>) -> String {
    let core = |group| by_group.get(group).copied().unwrap_or(0.0);
    format!(
        "{:.2} / {:.2} / {:.2} / {:.2}",
        core("herald"),
        core("postgresql"),
        core("rabbitmq"),
        core("loadgen")
    )
}
