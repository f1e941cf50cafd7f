//! `herald replay`: the operator's replay from the command line. The replay itself is
//! `herald::pipeline::replay`, shared with the admin API; this adds the arguments, the dry run, a
//! progress bar on a terminal (log lines every two seconds otherwise), and a publisher of its own.

use herald::config::Settings;
use herald::event::EventId;
use herald::metrics::Metrics;
use herald::pipeline::{published, replay};
use herald::queue::Publisher;
use herald::store::{EventFilter, FilterText, Store};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Which events, and how fast.
#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// Statuses to replay, comma-separated (default: failed; with --id: any but delivered).
    #[arg(long, value_delimiter = ',')]
    status: Vec<String>,
    /// Only this producer's events (its name).
    #[arg(long)]
    producer: Option<String>,
    /// Only this user's events.
    #[arg(long = "user")]
    user_id: Option<String>,
    /// Only events with this name.
    #[arg(long)]
    event: Option<String>,
    /// Enqueued at or after: RFC 3339 (2026-11-30T12:00:00Z), a date (midnight UTC), now, or
    /// relative (30m, 2h, 7d ago).
    #[arg(long)]
    since: Option<String>,
    /// Enqueued before: same forms as --since.
    #[arg(long)]
    until: Option<String>,
    /// Only these events (repeat, or comma-separate).
    #[arg(long = "id", value_delimiter = ',')]
    ids: Vec<EventId>,
    /// Also replay events already delivered (they are skipped otherwise).
    #[arg(long)]
    include_delivered: bool,
    /// Print how many events would be replayed, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Events per second at most (default: replay.default_rate).
    #[arg(long)]
    rate: Option<u32>,
}

/// Runs the replay described by `args`.
pub async fn run(settings: Settings, args: ReplayArgs) -> anyhow::Result<()> {
    let text = FilterText {
        statuses: args.status,
        producer: args.producer,
        user_id: args.user_id,
        event: args.event,
        since: args.since,
        until: args.until,
        ids: args.ids,
    };
    let filter = replay::replay_filter(EventFilter::parse(text)?, args.include_delivered)?;
    let store = Store::connect(&settings.store).await?;
    let matched = store.count_events(&filter).await?;
    if args.dry_run {
        println!(
            "{matched} events would be replayed (statuses: {})",
            filter
                .statuses
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(());
    }
    if matched == 0 {
        println!("nothing to replay");
        return Ok(());
    }
    let rate = args.rate.unwrap_or(settings.replay.default_rate).max(1);
    // The replay runs as a tool, not a node: tagged as such in StatsD.
    let metrics = Metrics::new(&settings.metrics, "herald-replay", "replay")?;

    // A publisher of our own, with the confirm recorder clearing confirmed outbox rows.
    let (publisher, handle, reports) = Publisher::new(settings.queue.clone());
    let publisher_stop = CancellationToken::new();
    let publisher_task = tokio::spawn(publisher.run(publisher_stop.clone()));
    let recorder = tokio::spawn(published::record(
        reports,
        store.clone(),
        metrics.clone(),
        settings.pipeline.max_status_batch,
    ));
    let connect_limit = settings.queue.connect_timeout() * 3;
    let connected = tokio::time::timeout(connect_limit, async {
        while !handle.is_connected() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    anyhow::ensure!(
        connected.is_ok(),
        "cannot reach RabbitMQ within {connect_limit:?}; nothing was replayed"
    );

    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.cancel();
        }
    });
    let (progress, watched) = watch::channel(replay::Progress {
        matched,
        ..replay::Progress::default()
    });
    let shown = tokio::spawn(show_progress(watched, matched));
    let pace = replay::Pace {
        rate,
        page: settings.replay.page,
        source: "cli",
        partitions: settings.queue.partitions,
        publish_window: herald::pipeline::publish_window(&settings),
    };
    let result = replay::run(&store, &handle, &metrics, &filter, &pace, &progress, &stop).await;
    progress.send_modify(|p| p.finished = true);
    let _ = shown.await;
    // Publish what is buffered and settle the confirms, then let the recorder write them.
    publisher_stop.cancel();
    let _ = publisher_task.await;
    let _ = recorder.await;
    metrics.flush();
    store.close().await;
    let done = result?;
    println!(
        "replayed {} of {matched} matched events{}{}",
        done.replayed,
        match done.deferred {
            0 => String::new(),
            n => format!("; {n} left to the outbox relay (RabbitMQ refused them)"),
        },
        if stop.is_cancelled() {
            "; stopped early (run it again to go on: replay is safe to repeat)"
        } else {
            ""
        }
    );
    Ok(())
}

/// A progress bar on a terminal; off one (CI, a pipe, a log file), a log line every two seconds.
async fn show_progress(mut watched: watch::Receiver<replay::Progress>, matched: i64) {
    let total = u64::try_from(matched).unwrap_or(0);
    if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(total);
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} replay [{bar:40}] {pos}/{len} events, {per_sec}, eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        while watched.changed().await.is_ok() {
            let now = *watched.borrow_and_update();
            bar.set_position(now.replayed + now.deferred);
            if now.finished {
                break;
            }
        }
        bar.finish();
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        let finished = tokio::select! {
            _ = tick.tick() => false,
            changed = watched.changed() => {
                if changed.is_ok() && !watched.borrow().finished {
                    continue; // progress is logged on the tick, not per page
                }
                true
            }
        };
        let now = *watched.borrow();
        tracing::info!(
            replayed = now.replayed,
            deferred = now.deferred,
            matched,
            "replay progress"
        );
        if finished {
            break;
        }
    }
}
