//! Memory per idle socket, alone (`scripts/sockmem`; BENCHMARKS.md, *Memory per socket*):
//! the full run's first phase without the rest, so a change to what a connection keeps can be
//! measured in a minute instead of seven.
//!
//! The same method as the full run, in the same order: the bare tokio-tungstenite echo server (its
//! own process, Herald's buffer settings) gets N connections with one echo each, and its RSS growth
//! / N is the baseline; then a fresh node gets N user sockets, each joined to `user:<id>`, and its
//! RSS growth / N is Herald's. Both figures come from `/proc/<pid>/status` (`VmRSS`) and the ratio
//! is the result. `--rounds` repeats the pair (a fresh node each time) and reports the median ratio;
//! `--node-env` passes a variable to the node (an allocator knob, the cluster mode) to measure its
//! effect with the same method.

use crate::node::{Names, Node};
use crate::protocol::{Command, Connected, Disconnected};
use crate::report::SocketsRss;
use crate::{Loadgen, echo_rss, out_dir, say, statsd, sys};
use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::json;
use std::path::Path;
use std::time::Duration;

/// Arguments of `sockmem`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Sockets connected to each server (the full run's count; at most ~19,000 per process here).
    #[arg(long, default_value_t = 10_000)]
    sockets: usize,
    /// Echo/Herald pairs, each Herald on a fresh node; the ratio reported is their median.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// `KEY=VALUE` for the node's environment (repeatable), e.g. `MALLOC_ARENA_MAX=2` or
    /// `HERALD_PUBSUB__MODE=cluster`.
    #[arg(long = "node-env", value_parser = parse_env)]
    node_env: Vec<(String, String)>,
    /// `cargo bench` appends this; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn parse_env(pair: &str) -> Result<(String, String), String> {
    let (key, value) = pair
        .split_once('=')
        .ok_or_else(|| format!("`{pair}` is not KEY=VALUE"))?;
    Ok((key.to_owned(), value.to_owned()))
}

/// One echo/Herald pair.
#[derive(Serialize)]
struct Round {
    /// The echo server's sockets.
    raw: SocketsRss,
    /// Herald's, joined.
    herald: SocketsRss,
    /// The node's RSS once the sockets closed: what stays is the allocator's.
    herald_after_close_bytes: u64,
    /// Herald's bytes per socket over the echo server's.
    ratio: f64,
}

/// Runs the measurement: prints a line per round and the median, writes
/// `target/bench/sockmem-latest.json`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    sys::ensure_nofile_for(args.sockets)?;
    std::fs::create_dir_all(out_dir())?;
    let names = Names::new();
    let bin = Path::new(env!("CARGO_BIN_EXE_herald"));
    let (_sink, statsd) = statsd::Sink::start()?;
    // Leaked once per run: the node's settings are `&'static str` keys.
    let mut settings: Vec<(&'static str, String)> = vec![("HERALD_STATSD_ADDR", statsd)];
    for (key, value) in &args.node_env {
        settings.push((Box::leak(key.clone().into_boxed_str()), value.clone()));
    }
    let result = async {
        let api_key = Node::setup(bin, &names)?;
        let mut rounds = Vec::new();
        for round in 1..=args.rounds.max(1) {
            let log = out_dir().join("sockmem.log");
            let node = Node::spawn(bin, &names, &api_key, &settings, log).await?;
            let measured = measure(&node, args.sockets).await;
            node.stop().await;
            let measured = measured?;
            say(format!(
                "round {round}: echo {:.2} KB/socket, herald {:.2} KB/socket joined, {:.2}x",
                measured.raw.per_socket_bytes / 1024.0,
                measured.herald.per_socket_bytes / 1024.0,
                measured.ratio,
            ));
            rounds.push(measured);
        }
        anyhow::Ok(rounds)
    }
    .await;
    say("cleaning up");
    crate::node::clean_up(&names).await;
    let rounds = result?;
    let mut ratios: Vec<f64> = rounds.iter().map(|r| r.ratio).collect();
    ratios.sort_by(f64::total_cmp);
    let median = ratios.get(ratios.len() / 2).copied().unwrap_or(0.0);
    let typical = rounds
        .iter()
        .min_by(|a, b| {
            (a.ratio - median)
                .abs()
                .total_cmp(&(b.ratio - median).abs())
        })
        .context("no round")?;
    println!(
        "RSS per idle socket, {} sockets: echo {:.1} KB, herald {:.1} KB joined: {:.2}x (median of {})",
        args.sockets,
        typical.raw.per_socket_bytes / 1024.0,
        typical.herald.per_socket_bytes / 1024.0,
        median,
        rounds.len(),
    );
    let report = json!({
        "git": crate::git_revision(),
        "sockets": args.sockets,
        "node_env": args.node_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "rounds": rounds,
        "ratio_median": median,
    });
    std::fs::write(
        out_dir().join("sockmem-latest.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(())
}

/// One pair: the echo baseline, then `n` sockets joined on `node`, each read as the full run does.
async fn measure(node: &Node, n: usize) -> anyhow::Result<Round> {
    let mut load = Loadgen::start(&node.base, &node.api_key)?;
    let raw = echo_rss(&mut load, n).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = node.rss_bytes();
    let connected: Connected = load.call(&Command::Connect { n, base: None }).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = node.rss_bytes();
    if connected.connected == 0 {
        bail!("no socket joined ({} failed)", connected.failed);
    }
    let herald = SocketsRss::new(before, after, connected);
    let _: Disconnected = load.call(&Command::Disconnect).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ratio = if raw.per_socket_bytes > 0.0 {
        herald.per_socket_bytes / raw.per_socket_bytes
    } else {
        0.0
    };
    Ok(Round {
        raw,
        herald,
        herald_after_close_bytes: node.rss_bytes(),
        ratio,
    })
}
