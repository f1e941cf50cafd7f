//! A Jepsen-style history checker: a whole deployment (two api, two worker and two socket nodes,
//! the real `herald` binary, each behind proxies of its own) under producers that retry with
//! idempotency keys, clients that join, leave, move and rejoin as apps do, and a nemesis that
//! kills, stops and cuts nodes off on a seeded schedule; every answer and every pushed frame is
//! recorded, and at the end the history is checked against PostgreSQL and RabbitMQ (`check`).
//!
//! `scripts/checker [--seed N] [--duration SECS] [--bin PATH]` runs it; the parameters reach it as
//! `HERALD_CHECKER_SEED`, `HERALD_CHECKER_SECS` and `HERALD_CHECKER_BIN`, read here only. Every
//! random choice comes from the seed, so a seed gives the same schedule, users, joins and moves
//! again; what the processes do meanwhile still varies with timing, so a failure found by a seed is
//! reproduced by running it again (usually a few times), not replayed step by step.
//!
//! Ignored in a plain `cargo test`: it loads both cores for a few minutes.

mod check;
mod client;
mod cluster;
mod history;
mod nemesis;
mod producer;
mod rng;
mod tally;

use crate::chaos::Cleanup;
use crate::common::{create_admin_key, poll_until, test_settings};
use client::{Client, Recorder, Style};
use cluster::{Cluster, Role};
use herald::config::{PubSubMode, Settings};
use herald::queue::Topology;
use herald::store::Store;
use history::{End, History, OutboxRow, Snapshot, StoredEvent};
use producer::ProducerStats;
use rng::Rng;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Users in all, `u0`..`u29`.
pub const USERS: u64 = 30;
/// `u0`..`u3` are hot: half of all events and half of all clients are theirs.
pub const HOT_USERS: u64 = 4;
/// Producer tasks, and the events/s they stream in all.
const PRODUCERS: usize = 5;
const RATE: f64 = 150.0;
/// Client tasks; even ones join with `{}`, odd ones with their last seq.
const CLIENTS: usize = 30;
/// How long the pipeline has to settle once healed before that is itself a violation, unless it is
/// still making progress (see [`QUIET_PROGRESS`]).
const QUIET_DEADLINE: Duration = Duration::from_secs(120);
/// Past [`QUIET_DEADLINE`], the wait goes on while the work left (unsettled events, outbox rows,
/// ready messages) went down within this long: a long run's operator replays can leave thousands of
/// poison events retrying, which is slow, not stuck. A pipeline that stops shrinking fails.
const QUIET_PROGRESS: Duration = Duration::from_secs(60);
/// However it progresses, the quiet period ends here.
const QUIET_CAP: Duration = Duration::from_secs(900);
/// How long joined clients have to receive their users' last events after that.
const TAIL_DEADLINE: Duration = Duration::from_secs(15);

/// A user, skewed: half the draws go to the few hot users.
pub fn pick_user(rng: &mut Rng) -> String {
    if rng.chance(0.5) {
        format!("u{}", rng.below(HOT_USERS))
    } else {
        format!("u{}", rng.below(USERS))
    }
}

/// The run's parameters, from the environment `scripts/checker` sets.
struct Config {
    seed: u64,
    secs: u64,
    bin: String,
}

impl Config {
    fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let seed = var("HERALD_CHECKER_SEED").map_or_else(random_seed, |s| {
            s.parse().expect("HERALD_CHECKER_SEED is a number")
        });
        let secs = var("HERALD_CHECKER_SECS").map_or(120, |s| {
            s.parse()
                .expect("HERALD_CHECKER_SECS is a number of seconds")
        });
        let bin = var("HERALD_CHECKER_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_herald").into());
        Self { seed, secs, bin }
    }
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    Rng::stream(nanos, "seed", u64::from(std::process::id())).next_u64() % 1_000_000_000
}

/// Every node's settings: cluster fan-out, poison events failing after a fast schedule, short
/// leases (`test_settings` has 3 s, and a relay grace of 2 s), a sweeper and retention that act
/// within the run, and gap fills in small pages.
fn settings() -> Settings {
    let mut s = test_settings();
    s.pubsub.mode = PubSubMode::Cluster;
    s.faults.fail_events = vec!["poison".into()];
    s.retry.schedule_ms = vec![100, 300];
    s.retry.max_attempts = 3;
    s.queue.partitions = 6;
    // Few fan-out buckets: users share them across both socket nodes, so each node receives other
    // users' broadcasts to drop, and buckets are bound and unbound as clients move.
    s.pubsub.buckets = 4;
    s.queue.partition_check_ms = 300;
    s.pipeline.sweep_after_ms = 10_000;
    s.pipeline.sweep_interval_ms = 1_000;
    s.pipeline.sweep_idle_ms = 1_000;
    // Small pages and a small cap on one live gap: catch-ups and gap fills go in many pages, and
    // a wide gap (a purged queue's events, back only after the sweeper) closes its channel with
    // `phx_error` for the client to rejoin, paths the defaults (1,000 a page, 10,000 a gap) leave
    // to far larger deployments than this run's.
    s.socket.max_gap_fill = 20;
    s.socket.max_gap_fill_total = 60;
    s.store.retention_per_user = 300;
    s.store.retention_interval_secs = 2;
    s.store.acquire_timeout_ms = 2_000;
    s.metrics.prometheus_addr = String::new();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "heavy (minutes, both cores): scripts/checker runs it"]
async fn run() {
    let config = Config::from_env();
    let settings = settings();
    let run_for = Duration::from_secs(config.secs);
    println!(
        "checker: seed {} (reproduce with scripts/checker --seed {} --duration {}); binary {}",
        config.seed, config.seed, config.secs, config.bin
    );
    let whole = std::time::Instant::now();
    let _cleanup = Cleanup(settings.clone());
    Store::create_database_if_missing(&settings.store)
        .await
        .expect("database created");
    let store = Store::connect(&settings.store).await.expect("store");
    store.migrate().await.expect("migrations");
    let (_, key) = store.create_producer("checker").await.expect("producer");
    let admin_key = create_admin_key(&store).await;
    let head_start = tally::HeadStartTally::bind().await;
    let cluster = Cluster::start(&settings, &config.bin, &head_start.addr.to_string()).await;
    println!(
        "checker: 6 nodes ready in {:.1} s",
        whole.elapsed().as_secs_f64()
    );

    let started = std::time::Instant::now();
    let started_unix_ms = herald::event::now_unix_ms();
    let recorder = Recorder::new(started);
    let (settle, stop_clients) = (CancellationToken::new(), CancellationToken::new());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(
                Client {
                    index: i,
                    rng: Rng::stream(config.seed, "client", i as u64),
                    style: if i % 2 == 0 {
                        Style::Empty
                    } else {
                        Style::LastSeq
                    },
                    sockets: cluster.registry(Role::Socket),
                    recorder: Arc::clone(&recorder),
                    settle: settle.clone(),
                    stop: stop_clients.clone(),
                }
                .run(),
            )
        })
        .collect();
    let (stats, stop_producers) = (Arc::new(ProducerStats::default()), CancellationToken::new());
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|i| {
            tokio::spawn(producer::produce(
                Rng::stream(config.seed, "producer", i as u64),
                i,
                RATE / PRODUCERS as f64,
                cluster.registry(Role::Api),
                key.expose().to_owned(),
                Arc::clone(&stats),
                stop_producers.clone(),
            ))
        })
        .collect();
    let plan = nemesis::plan(config.seed, run_for, settings.queue.partition_lease_ms);
    let stop_nemesis = CancellationToken::new();
    let nemesis = tokio::spawn(nemesis::run(
        cluster,
        plan,
        admin_key,
        settings.queue.clone(),
        store.clone(),
        started,
        stop_nemesis.clone(),
    ));

    // The run's length is the schedule itself: producers and the nemesis work meanwhile.
    tokio::time::sleep(run_for).await;
    stop_producers.cancel();
    stop_nemesis.cancel();
    let (cluster, done) = nemesis.await.expect("the nemesis ran");
    let mut keys = Vec::new();
    for producer in producers {
        keys.extend(producer.await.expect("a producer ran"));
    }
    println!(
        "[{:>6.1}s] producers stopped, every fault healed; quiet period",
        started.elapsed().as_secs_f64()
    );
    settle.cancel();
    let stuck = quiet(&store, &settings, &cluster).await;
    let tails = tails(&store, &recorder).await;
    println!(
        "[{:>6.1}s] quiet{}; {tails}",
        started.elapsed().as_secs_f64(),
        if stuck.is_some() {
            " deadline passed"
        } else {
            ""
        }
    );
    stop_clients.cancel();
    for client in clients {
        client.await.expect("a client ran");
    }
    let snapshot = read_snapshot(&store, &settings, stuck, started_unix_ms).await;
    let (instances, stray) = recorder.take();
    let history = History {
        keys,
        instances,
        stray,
    };
    let mut violations = check::check(&history, &snapshot);
    // An operator's replay request answered 500 under a fault.
    violations.extend(done.iter().filter_map(|op| {
        Some(check::Violation {
            kind: check::Kind::Unretryable,
            instance: None,
            key: None,
            user: None,
            seq: None,
            detail: format!(
                "{} (answered before: {})",
                op.what,
                op.unretryable.as_ref()?
            ),
        })
    }));
    write_log(config.seed, &history, &snapshot, &done);
    let streamed = format!(
        "seed {}, {} s streamed, {:.0} s in all",
        config.seed,
        config.secs,
        whole.elapsed().as_secs_f64()
    );
    let summary = format!(
        "{}; {}",
        summary(&history, &snapshot, &stats, &recorder, &done),
        head_start.summary()
    );
    if violations.is_empty() {
        println!("checker: OK: {streamed}; {summary}");
    } else {
        println!("{}", report(&violations, &history, &snapshot, &done));
        println!("checker: {streamed}; {summary}");
    }
    drop(cluster);
    store.close().await;
    assert!(
        violations.is_empty(),
        "checker: {} violation(s), seed {}: reproduce with scripts/checker --seed {} --duration {}",
        violations.len(),
        config.seed,
        config.seed,
        config.secs
    );
}

/// Every partition and delay queue of the deployment, with its ready count.
async fn queue_depths(settings: &Settings) -> Result<Vec<(String, Option<u32>)>, String> {
    let names = Topology::new(&settings.queue.prefix, settings.queue.partitions);
    let queues: Vec<String> = (0..settings.queue.partitions)
        .map(|p| names.partition_queue(p))
        .chain(
            settings
                .retry
                .delays_ms()
                .into_iter()
                .map(|ms| names.delay_queue(ms)),
        )
        .collect();
    let connection = herald::queue::connect(&settings.queue, "checker-probe")
        .await
        .map_err(|e| e.to_string())?;
    let counts = herald::queue::ready_counts(&connection, &queues).await;
    let _ = connection.close(200, "probe done".into()).await;
    Ok(queues
        .into_iter()
        .zip(counts.map_err(|e| e.to_string())?)
        .collect())
}

/// Unsettled events (`accepted`, `published`) + outbox rows + ready messages in the deployment's
/// queues, with a running replay job counted as one (it may still move failed events back);
/// `None` when it cannot be read.
async fn work_left(store: &Store, settings: &Settings) -> Option<i64> {
    let (unsettled, outbox, replaying): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM events WHERE status IN ('accepted', 'published')),
                (SELECT count(*) FROM outbox),
                (SELECT count(*) FROM replay_jobs WHERE status = 'running')",
    )
    .fetch_one(store.pool())
    .await
    .ok()?;
    let depths = queue_depths(settings).await.ok()?;
    let ready: i64 = depths.iter().map(|(_, n)| i64::from(n.unwrap_or(0))).sum();
    Some(unsettled + outbox + replaying + ready)
}

/// Waits until every event is delivered or failed, the outbox is empty and so is every queue;
/// past [`QUIET_DEADLINE`] (and once the work left stops shrinking, or at [`QUIET_CAP`]),
/// describes what was still unsettled (a violation of its own).
async fn quiet(store: &Store, settings: &Settings, cluster: &Cluster) -> Option<String> {
    let started = tokio::time::Instant::now();
    let (mut least, mut shrank_at, mut said_at) = (i64::MAX, started, started);
    let why = loop {
        let left = work_left(store, settings).await;
        if left == Some(0) {
            return None;
        }
        let now = tokio::time::Instant::now();
        if let Some(left) = left
            && left < least
        {
            (least, shrank_at) = (left, now);
        }
        if now.duration_since(said_at) >= Duration::from_secs(30) {
            println!(
                "  quiet for {:.0} s: {} unsettled events, outbox rows and ready messages left",
                now.duration_since(started).as_secs_f64(),
                left.map_or_else(|| "unknown".to_owned(), |n| n.to_string())
            );
            said_at = now;
        }
        let waited = now.duration_since(started);
        if waited >= QUIET_CAP {
            break format!("not settled {QUIET_CAP:?} after the heal");
        }
        if waited >= QUIET_DEADLINE && now.duration_since(shrank_at) >= QUIET_PROGRESS {
            break format!(
                "not settled {:.0} s after the heal, no progress for {QUIET_PROGRESS:?}",
                waited.as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut text = format!("{why}:\n");
    /// id, user, seq, status, attempts, sweeps, last_error, next_attempt_at.
    type Unsettled = (
        uuid::Uuid,
        String,
        i64,
        String,
        i32,
        i32,
        Option<String>,
        Option<String>,
    );
    let stuck: Vec<Unsettled> = sqlx::query_as(
        "SELECT id, user_id, seq, status, attempts, sweeps, last_error,
                    next_attempt_at::text FROM events
             WHERE status IN ('accepted', 'published') ORDER BY user_id, seq",
    )
    .fetch_all(store.pool())
    .await
    .unwrap_or_default();
    let _ = writeln!(text, "  {} event(s) accepted or published", stuck.len());
    for (id, user, seq, status, attempts, sweeps, error, next) in stuck.iter().take(20) {
        let rows: Vec<(uuid::Uuid, Option<String>)> =
            sqlx::query_as("SELECT id, relayed_at::text FROM outbox WHERE $1 = ANY(event_ids)")
                .bind(id)
                .fetch_all(store.pool())
                .await
                .unwrap_or_default();
        let _ = writeln!(
            text,
            "    {id} user {user} seq {seq}: {status}, attempts {attempts}, sweeps {sweeps}, \
             last_error {error:?}, next_attempt_at {next:?}, outbox rows {rows:?}"
        );
    }
    let (outbox, replaying): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox),
                (SELECT count(*) FROM replay_jobs WHERE status = 'running')",
    )
    .fetch_one(store.pool())
    .await
    .unwrap_or((-1, -1));
    let _ = writeln!(
        text,
        "  outbox rows: {outbox}; replay jobs running: {replaying}"
    );
    match queue_depths(settings).await {
        Ok(depths) => {
            for (queue, n) in depths.iter().filter(|(_, n)| n.unwrap_or(0) > 0) {
                let _ = writeln!(text, "  {queue}: {n:?} ready");
            }
        }
        Err(e) => {
            let _ = writeln!(text, "  queues unreadable: {e}");
        }
    }
    // The broker's side: a queue with ready messages and a consumer that takes none (a standby
    // behind an active consumer nobody reads, or a full window) is told apart from one with none.
    let prefix = settings.queue.prefix.clone();
    let broker = tokio::task::spawn_blocking(move || broker_view(&prefix))
        .await
        .unwrap_or_default();
    for line in broker {
        let _ = writeln!(text, "  {line}");
    }
    // Who holds each partition, and which workers are alive: a partition with ready messages
    // that nobody consumes is told apart from one whose owner is stuck.
    let leases: Vec<(i32, Option<String>, Option<String>, i64)> = sqlx::query_as(
        "SELECT partition, owner,
                CASE WHEN isfinite(lease_until) THEN (lease_until - now())::text
                     ELSE 'never held' END,
                epoch
         FROM partition_leases ORDER BY partition",
    )
    .fetch_all(store.pool())
    .await
    .unwrap_or_default();
    let _ = writeln!(
        text,
        "  partition leases (partition, owner, time left, epoch):"
    );
    for (partition, owner, left, epoch) in &leases {
        let _ = writeln!(text, "    {partition}: {owner:?}, {left:?}, epoch {epoch}");
    }
    let workers: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT name, (now() - seen_at)::text FROM worker_nodes ORDER BY name")
            .fetch_all(store.pool())
            .await
            .unwrap_or_default();
    let _ = writeln!(text, "  worker nodes (name, last seen ago): {workers:?}");
    for slot in &cluster.slots {
        let _ = writeln!(text, "  {} logged last:", slot.name());
        for line in slot.log_tail().iter().rev().take(8).rev() {
            let _ = writeln!(text, "    {line}");
        }
    }
    Some(text)
}

/// The deployment's queues that hold messages (ready, unacked, consumers) and every consumer of
/// its queues (tag, whether single-active-consumer made it the active one), as rabbitmqctl says.
fn broker_view(prefix: &str) -> Vec<String> {
    let listed = |args: &[&str]| {
        std::process::Command::new("rabbitmqctl")
            .args(args)
            .args(["-q", "--no-table-headers"])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default()
    };
    let ours = |line: &&str| line.starts_with(prefix);
    let queues = listed(&[
        "list_queues",
        "name",
        "messages_ready",
        "messages_unacknowledged",
        "consumers",
    ]);
    let consumers = listed(&[
        "list_consumers",
        "queue_name",
        "consumer_tag",
        "active",
        "activity_status",
        "prefetch_count",
    ]);
    let mut lines = vec!["broker queues (name, ready, unacked, consumers):".to_owned()];
    lines.extend(
        queues
            .lines()
            .filter(ours)
            .filter(|line| {
                let counts: Vec<&str> = line.split('\t').skip(1).take(2).collect();
                counts.iter().any(|n| *n != "0")
            })
            .map(|line| format!("  {}", line.replace('\t', ", "))),
    );
    lines.push("broker consumers (queue, tag, active, status, prefetch):".to_owned());
    lines.extend(
        consumers
            .lines()
            .filter(ours)
            .map(|line| format!("  {}", line.replace('\t', ", "))),
    );
    lines
}

/// Gives the still-joined clients [`TAIL_DEADLINE`] to receive their users' last delivered
/// events; says how it went (the check itself judges what they got).
async fn tails(store: &Store, recorder: &Recorder) -> String {
    let last: HashMap<String, i64> = sqlx::query_as(
        "SELECT user_id, max(seq) FROM events WHERE status = 'delivered' GROUP BY user_id",
    )
    .fetch_all(store.pool())
    .await
    .unwrap_or_default()
    .into_iter()
    .collect();
    let behind = || {
        recorder
            .open_reaches()
            .into_iter()
            .filter(|(user, reached)| last.get(user).is_some_and(|l| l > reached))
            .count()
    };
    let waited = std::time::Instant::now();
    let caught_up = poll_until(TAIL_DEADLINE, Duration::from_millis(200), || async {
        (behind() == 0).then_some(())
    })
    .await;
    match caught_up {
        Some(()) => format!(
            "every joined client had its user's last event after {:.1} s",
            waited.elapsed().as_secs_f64()
        ),
        None => format!(
            "{} joined client(s) still behind after {TAIL_DEADLINE:?}",
            behind()
        ),
    }
}

/// Reads what the check needs from PostgreSQL and RabbitMQ.
async fn read_snapshot(
    store: &Store,
    settings: &Settings,
    stuck: Option<String>,
    started_unix_ms: i64,
) -> Snapshot {
    let pool = store.pool();
    let events = sqlx::query_as::<_, EventRow>(
        "SELECT id, user_id, seq, event, status, attempts, failed_at IS NOT NULL AS failed,
                sweeps, last_error, idempotency_key, push_count,
                (extract(epoch FROM enqueued_at) * 1000)::bigint AS enqueued_ms,
                (extract(epoch FROM delivered_at) * 1000)::bigint AS delivered_ms
         FROM events",
    )
    .fetch_all(pool)
    .await
    .expect("events read")
    .into_iter()
    .map(|r| StoredEvent {
        id: r.id,
        user: r.user_id,
        seq: r.seq,
        event: r.event,
        status: r.status,
        attempts: r.attempts,
        failed_at: r.failed,
        sweeps: r.sweeps,
        last_error: r.last_error,
        key: r.idempotency_key,
        push_count: r.push_count,
        enqueued_ms: r.enqueued_ms,
        delivered_ms: r.delivered_ms,
    })
    .collect();
    let pairs = |sql: &'static str| async move {
        sqlx::query_as::<_, (String, i64)>(sql)
            .fetch_all(pool)
            .await
            .expect("table read")
            .into_iter()
            .collect::<HashMap<_, _>>()
    };
    let outbox: Vec<(uuid::Uuid, Vec<uuid::Uuid>, bool)> =
        sqlx::query_as("SELECT id, event_ids, relayed_at IS NOT NULL FROM outbox")
            .fetch_all(pool)
            .await
            .expect("outbox read");
    let keys: Vec<(String, uuid::Uuid)> =
        sqlx::query_as("SELECT key, event_id FROM idempotency_keys")
            .fetch_all(pool)
            .await
            .expect("keys read");
    Snapshot {
        events,
        watermarks: pairs("SELECT user_id, pruned_through FROM retention_watermarks").await,
        user_seqs: pairs("SELECT user_id, last_seq FROM user_seqs").await,
        outbox: outbox
            .into_iter()
            .map(|(id, event_ids, relayed)| OutboxRow {
                id,
                event_ids,
                relayed,
            })
            .collect(),
        keys: keys.into_iter().collect(),
        queues: queue_depths(settings).await.expect("queues read"),
        stuck,
        started_unix_ms,
    }
}

/// A row of `events` as the snapshot reads it.
#[derive(sqlx::FromRow)]
struct EventRow {
    id: uuid::Uuid,
    user_id: String,
    seq: i64,
    event: String,
    status: String,
    attempts: i32,
    failed: bool,
    sweeps: i32,
    last_error: Option<String>,
    idempotency_key: Option<String>,
    push_count: Option<i32>,
    enqueued_ms: i64,
    delivered_ms: Option<i64>,
}

/// The failure report: the schedule, the first violation's history in full (and the first of
/// every other kind), and the count by kind.
fn report(
    violations: &[check::Violation],
    history: &History,
    snapshot: &Snapshot,
    done: &[nemesis::Done],
) -> String {
    let mut text = String::from("checker: VIOLATIONS\nnemesis schedule:\n");
    for op in done {
        let _ = writeln!(text, "  +{:>6.1}s {}", op.at_ms as f64 / 1000.0, op.what);
    }
    let _ = writeln!(text, "first violation:");
    text.push_str(&check::explain(&violations[0], history, snapshot));
    let mut shown = vec![violations[0].kind];
    for v in violations {
        if !shown.contains(&v.kind) {
            shown.push(v.kind);
            let _ = writeln!(text, "first {:?}:", v.kind);
            text.push_str(&check::explain(v, history, snapshot));
        }
    }
    let _ = writeln!(text, "violations by kind:");
    for (kind, n) in check::counts(violations) {
        let _ = writeln!(text, "  {kind:?}: {n}");
    }
    text
}

/// The run in one line: what was sent, stored, joined, pushed, and the faults by kind.
fn summary(
    history: &History,
    snapshot: &Snapshot,
    stats: &ProducerStats,
    recorder: &Recorder,
    done: &[nemesis::Done],
) -> String {
    let accepted = history
        .keys
        .iter()
        .filter(|k| !k.answers.is_empty())
        .count();
    let count = |status: &str| {
        snapshot
            .events
            .iter()
            .filter(|e| e.status == status)
            .count()
    };
    let with = history
        .instances
        .iter()
        .filter(|i| i.asked.is_some())
        .count();
    let pushes: usize = history.instances.iter().map(|i| i.pushes.len()).sum();
    let mut faults: BTreeMap<String, usize> = BTreeMap::new();
    for op in done {
        *faults.entry(format!("{:?}", op.fault)).or_insert(0) += 1;
    }
    let overlapped = done.iter().filter(|op| op.overlapped).count();
    // Channels the node closed on a gap it would not fill (too wide, pruned, PostgreSQL away).
    let unfilled = history
        .instances
        .iter()
        .filter(|i| matches!(&i.end, Some(End::Errored(why)) if why.contains("gap_unfilled")))
        .count();
    let poison = snapshot
        .events
        .iter()
        .filter(|e| e.status == "failed" && e.event == "poison")
        .count();
    // Sweeps of events still stored (retention may have pruned swept ones since).
    let swept: i64 = snapshot.events.iter().map(|e| i64::from(e.sweeps)).sum();
    format!(
        "{accepted} events accepted in {} requests ({} batches); stored {} (delivered {}, failed \
         {} of which {poison} poison, {swept} sweeps), pruned {}; {} channel instances ({with} \
         joins with last_seq, {} without, {unfilled} closed on a gap), {pushes} pushes, {} acks; \
         nemesis: {faults:?}, \
         {overlapped} of them struck while another was on",
        stats.requests.load(Ordering::Relaxed),
        stats.batches.load(Ordering::Relaxed),
        snapshot.events.len(),
        count("delivered"),
        count("failed"),
        accepted.saturating_sub(snapshot.events.len()),
        history.instances.len(),
        history.instances.len() - with,
        recorder.acks.load(Ordering::Relaxed),
    )
}

/// Writes the whole history and snapshot to `target/checker/seed-<seed>.log`, one record a line,
/// for reading a violation beyond the report.
fn write_log(seed: u64, history: &History, snapshot: &Snapshot, done: &[nemesis::Done]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/checker");
    let mut text = String::new();
    for op in done {
        let _ = writeln!(text, "nemesis {op:?}");
    }
    for (i, instance) in history.instances.iter().enumerate() {
        let _ = writeln!(text, "instance #{i} {instance:?}");
    }
    for stray in &history.stray {
        let _ = writeln!(text, "stray {stray:?}");
    }
    for key in &history.keys {
        let _ = writeln!(text, "key {key:?}");
    }
    for event in &snapshot.events {
        let _ = writeln!(text, "stored {event:?}");
    }
    let _ = writeln!(
        text,
        "watermarks {:?}\nuser_seqs {:?}\noutbox {:?}\nqueues {:?}\nstuck {:?}",
        snapshot.watermarks, snapshot.user_seqs, snapshot.outbox, snapshot.queues, snapshot.stuck
    );
    let path = dir.join(format!("seed-{seed}.log"));
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, text)) {
        Ok(()) => println!("checker: history written to {}", path.display()),
        Err(e) => println!("checker: could not write {}: {e}", path.display()),
    }
}
