//! What one group commit costs inside PostgreSQL, per event (`scripts/bench rowcost`; issue 21,
//! BENCHMARKS.md, *Per-row costs*): the statement `store::insert_events` runs
//! (`COMMIT_EVENTS_SQL`, binds of the same shape) under `EXPLAIN (ANALYZE, BUFFERS, WAL)`, in
//! batches on a table that already holds `--prefill` events, then the commit (its WAL flush).
//! Reported per event: execution time, WAL records and bytes, full-page images and buffers
//! dirtied; beside them the same insert into `raw_events` (a copy of `events` with its indexes),
//! which is what the bench's UNNEST baseline runs.
//!
//! The statements run on their own connection, one batch at a time: what a commit costs, not how
//! commits contend (the bench's ingest figures say that).

use crate::node::{Names, Node};
use crate::{baseline, out_dir, say};
use herald::store::{COMMIT_EVENTS_SQL, MessageLimits, outbox_columns, plan_messages};
use serde::Serialize;
use sqlx::postgres::PgArguments;
use sqlx::{Arguments, PgConnection, Row};
use std::path::Path;
use std::time::Instant;
use uuid::Uuid;

/// Arguments of `rowcost`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Events per commit (the batch API's request is 100; a group commit under load holds more).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Commits measured.
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// Events in the table before the first measured commit (delivered, as a day's history).
    #[arg(long, default_value_t = 1_000_000)]
    prefill: u64,
    /// Users the events are spread over (round-robin).
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Partitions the outbox rows are planned over (Herald's default).
    #[arg(long, default_value_t = herald::config::QueueSettings::default().partitions)]
    partitions: u16,
    /// SQL run on the migrated database before the prefill (repeatable): a storage setting to
    /// measure, e.g. `ALTER TABLE user_seqs SET (fillfactor = 50)`.
    #[arg(long = "setup-sql")]
    setup_sql: Vec<String>,
    /// `cargo bench` appends this; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One statement's `EXPLAIN (ANALYZE, BUFFERS, WAL)` figures, summed over the rounds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Cost {
    /// Execution time plus planning time, ms.
    pub ms: f64,
    pub wal_records: f64,
    pub wal_bytes: f64,
    pub wal_fpi: f64,
    pub dirtied: f64,
    pub hit: f64,
    pub read: f64,
}

impl Cost {
    /// The figures of one `EXPLAIN (..., FORMAT JSON)` answer.
    pub fn of(explain: &serde_json::Value) -> Self {
        let top = &explain[0];
        let n = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
        Self {
            ms: n(&top["Execution Time"]) + n(&top["Planning Time"]),
            ..Self::of_node(&top["Plan"])
        }
    }

    /// The figures of one node of a plan, its children included (`ms` its actual total time).
    pub fn of_node(plan: &serde_json::Value) -> Self {
        let n = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
        Self {
            ms: n(&plan["Actual Total Time"]) * n(&plan["Actual Loops"]).max(1.0),
            wal_records: n(&plan["WAL Records"]),
            wal_bytes: n(&plan["WAL Bytes"]),
            wal_fpi: n(&plan["WAL FPI"]),
            dirtied: n(&plan["Shared Dirtied Blocks"]),
            hit: n(&plan["Shared Hit Blocks"]),
            read: n(&plan["Shared Read Blocks"]),
        }
    }

    /// What is left of `self` without `part` (a node's own work without a child's).
    pub fn subtract(&mut self, part: Self) {
        self.add_times(part, -1.0);
    }

    pub fn add(&mut self, other: Self) {
        self.add_times(other, 1.0);
    }

    /// `self` and `other` together (a statement and its commit).
    pub fn plus(mut self, other: Self) -> Self {
        self.add(other);
        self
    }

    fn add_times(&mut self, other: Self, k: f64) {
        self.ms += k * other.ms;
        self.wal_records += k * other.wal_records;
        self.wal_bytes += k * other.wal_bytes;
        self.wal_fpi += k * other.wal_fpi;
        self.dirtied += k * other.dirtied;
        self.hit += k * other.hit;
        self.read += k * other.read;
    }

    /// Per event, `events` being how many the sums cover.
    pub fn per(self, events: f64) -> PerEvent {
        PerEvent {
            us: self.ms * 1000.0 / events,
            wal_records: self.wal_records / events,
            wal_bytes: self.wal_bytes / events,
            wal_fpi: self.wal_fpi / events,
            dirtied: self.dirtied / events,
            buffers: (self.hit + self.read) / events,
        }
    }
}

/// A statement's cost per event.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct PerEvent {
    pub us: f64,
    pub wal_records: f64,
    pub wal_bytes: f64,
    pub wal_fpi: f64,
    pub dirtied: f64,
    pub buffers: f64,
}

/// One batch's columns, as `insert_events` binds them.
struct Batch {
    ids: Vec<Uuid>,
    producers: Vec<i64>,
    users: Vec<String>,
    names: Vec<&'static str>,
    datas: Vec<String>,
    keys: Vec<Option<String>>,
    ats: Vec<i64>,
}

impl Batch {
    /// `n` events to the users after `next` in round-robin order.
    fn new(n: usize, next: &mut u64, users: u64, producer: i64) -> Self {
        let mut batch = Self {
            ids: Vec::with_capacity(n),
            producers: vec![producer; n],
            users: Vec::with_capacity(n),
            names: vec!["bench"; n],
            datas: Vec::with_capacity(n),
            keys: vec![None; n],
            ats: vec![herald::event::now_unix_ms(); n],
        };
        for _ in 0..n {
            batch.ids.push(Uuid::now_v7());
            batch.users.push(format!("r{}", *next % users));
            batch.datas.push(format!(
                r#"{{"i":{},"pad":"{}"}}"#,
                *next,
                crate::loadgen::PAD
            ));
            *next += 1;
        }
        batch
    }

    /// The commit's binds: the events, then the outbox rows planned for them over `partitions`.
    fn commit_arguments(
        &self,
        partitions: u16,
        limits: MessageLimits,
    ) -> anyhow::Result<PgArguments> {
        let sizes = self
            .datas
            .iter()
            .zip(&self.users)
            .map(|(data, user)| {
                let data = serde_json::value::RawValue::from_string(data.clone())?;
                Ok(herald::event::envelope_size(&data, user, "bench"))
            })
            .collect::<anyhow::Result<Vec<usize>>>()?;
        let messages = plan_messages(
            self.users
                .iter()
                .zip(sizes)
                .enumerate()
                .map(|(i, (u, size))| (i, u.as_str(), size)),
            partitions,
            limits,
        );
        let (rows, events, row_partitions) = outbox_columns(&messages, |i| self.ids[i].into());
        let mut args = PgArguments::default();
        let err = |e| anyhow::anyhow!("bind: {e}");
        args.add(&self.ids).map_err(err)?;
        args.add(&self.producers).map_err(err)?;
        args.add(&self.users).map_err(err)?;
        args.add(&self.names).map_err(err)?;
        args.add(&self.datas).map_err(err)?;
        args.add(&self.keys).map_err(err)?;
        args.add(&self.ats).map_err(err)?;
        args.add(&rows).map_err(err)?;
        args.add(&events).map_err(err)?;
        args.add(&row_partitions).map_err(err)?;
        // No traceparents: what a producer that sends none costs.
        args.add(vec![None::<String>; self.ids.len()])
            .map_err(err)?;
        Ok(args)
    }

    /// The raw insert's binds, with `seqs`.
    fn insert_arguments(&self, seqs: &[i64]) -> anyhow::Result<PgArguments> {
        let mut args = PgArguments::default();
        let err = |e| anyhow::anyhow!("bind: {e}");
        args.add(&self.ids).map_err(err)?;
        args.add(&self.producers).map_err(err)?;
        args.add(&self.users).map_err(err)?;
        args.add(seqs).map_err(err)?;
        args.add(&self.names).map_err(err)?;
        args.add(&self.datas).map_err(err)?;
        args.add(&self.keys).map_err(err)?;
        args.add(&self.ats).map_err(err)?;
        Ok(args)
    }
}

/// `EXPLAIN (ANALYZE, BUFFERS, WAL, FORMAT JSON)` of `sql` with `args`: its cost.
async fn explain(conn: &mut PgConnection, sql: &str, args: PgArguments) -> anyhow::Result<Cost> {
    Ok(Cost::of(&explained(conn, sql, args).await?))
}

/// The whole `EXPLAIN (ANALYZE, BUFFERS, WAL, FORMAT JSON)` answer of `sql` with `args`.
pub async fn explained(
    conn: &mut PgConnection,
    sql: &str,
    args: PgArguments,
) -> anyhow::Result<serde_json::Value> {
    let explain = format!("EXPLAIN (ANALYZE, BUFFERS, WAL, FORMAT JSON) {sql}");
    let row = sqlx::query_with(&explain, args).fetch_one(conn).await?;
    // `json`, whose wire form is its text: read as such (sqlx's `json` feature is not enabled).
    let plan: String = row.try_get_unchecked(0)?;
    Ok(serde_json::from_str(&plan)?)
}

/// `COMMIT`, timed at the client (its WAL flush), ms.
pub async fn timed_commit(conn: &mut PgConnection) -> anyhow::Result<f64> {
    let started = Instant::now();
    sqlx::query("COMMIT").execute(&mut *conn).await?;
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

/// The figures of a run.
#[derive(Serialize)]
struct RowCosts {
    git: String,
    setup_sql: Vec<String>,
    batch: usize,
    rounds: usize,
    prefill: u64,
    users: u64,
    /// The commit's statement, then the commit itself (`us` only: the client's wait for `COMMIT`,
    /// the WAL flush) and the total.
    herald: Vec<(String, PerEvent)>,
    /// The same insert into `raw_events`, then its commit: the bench's UNNEST baseline.
    raw: Vec<(String, PerEvent)>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let costs = in_scratch_database("rowcost-latest.json", async |pool, producer| {
        for sql in &args.setup_sql {
            say(format!("setup: {sql}"));
            sqlx::raw_sql(sql).execute(pool).await?;
        }
        say(format!(
            "prefill: {} delivered events over {} users",
            args.prefill, args.users
        ));
        prefill(pool, args.prefill, args.users, producer, ROUND_ROBIN).await?;
        let mut conn = pool.acquire().await?;
        measure(&mut conn, &args, producer).await
    })
    .await?;
    print_costs(&costs);
    Ok(())
}

/// Runs `work` on a migrated database of its own (with `raw_events` and a producer, whose id it
/// gets), drops the database whatever happens, and writes what `work` measured to `json` in the
/// bench's output directory.
pub async fn in_scratch_database<T: Serialize>(
    json: &str,
    work: impl AsyncFnOnce(&sqlx::PgPool, i64) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    std::fs::create_dir_all(out_dir())?;
    let names = Names::new();
    let bin = Path::new(env!("CARGO_BIN_EXE_herald"));
    let result = async {
        Node::setup(bin, &names)?;
        let pool = baseline::pool(&names, 2).await?;
        let producer = baseline::create_raw_table(&pool).await?;
        work(&pool, producer).await
    }
    .await;
    say("cleaning up");
    crate::node::clean_up(&names).await;
    let measured = result?;
    std::fs::write(
        out_dir().join(json),
        serde_json::to_string_pretty(&measured)?,
    )?;
    Ok(measured)
}

/// How a prefill spreads its events over users: SQL for the rows (numbered `i` from 0, `$2` of
/// them, `$3` users) and each one's user and seq.
pub struct Spread {
    pub rows: &'static str,
    pub user: &'static str,
    pub seq: &'static str,
}

/// Round-robin: event i to user i mod users.
const ROUND_ROBIN: Spread = Spread {
    rows: "generate_series(0, $2 - 1) AS i",
    user: "i % $3",
    seq: "i / $3 + 1",
};

/// `n` delivered events over `users` users, spread by `spread`, the same in `events` and
/// `raw_events`, written in the order of `i`; the counters as the commit leaves them; analyzed and
/// checkpointed: the history a statement lands on.
pub async fn prefill(
    pool: &sqlx::PgPool,
    n: u64,
    users: u64,
    producer: i64,
    spread: Spread,
) -> anyhow::Result<()> {
    let n = i64::try_from(n)?;
    let users = i64::try_from(users.max(1))?;
    let Spread { rows, user, seq } = spread;
    for table in ["events", "raw_events"] {
        sqlx::query(&format!(
            "INSERT INTO {table} (id, producer_id, user_id, seq, event, data, enqueued_at, status,
                                  attempts, push_count, published_at, delivered_at)
             SELECT gen_random_uuid(), $1, 'r' || ({user}), {seq}, 'bench',
                    jsonb_build_object('i', i, 'pad', repeat('0123456789abcdef', 4)),
                    now() - make_interval(secs => ($2 - i) / 1000.0), 'delivered', 1, 1, now(), now()
             FROM {rows}
             ORDER BY i"
        ))
        .bind(producer)
        .bind(n)
        .bind(users)
        .execute(pool)
        .await?;
    }
    sqlx::query(
        "INSERT INTO user_seqs (user_id, last_seq)
         SELECT user_id, max(seq) FROM events GROUP BY user_id",
    )
    .execute(pool)
    .await?;
    // A checkpoint last, so that both tables start equal: the first change to each page after it
    // writes the whole page to the WAL (the prefill's own WAL forced checkpoints at random points).
    for sql in ["VACUUM ANALYZE", "CHECKPOINT"] {
        sqlx::raw_sql(sql).execute(pool).await?;
    }
    Ok(())
}

/// The commits, each statement explained; a round of the raw insert after each.
async fn measure(conn: &mut PgConnection, args: &Args, producer: i64) -> anyhow::Result<RowCosts> {
    let limits: MessageLimits = herald::config::Settings::default().message_limits();
    let (mut statement, mut commit) = (Cost::default(), Cost::default());
    let (mut raw_insert, mut raw_commit) = (Cost::default(), Cost::default());
    let mut next = 0;
    for round in 0..args.rounds {
        // Herald's commit is one statement in autocommit; here it runs in a transaction of its own
        // so that its flush (the `COMMIT`) is timed apart from its execution.
        let batch = Batch::new(args.batch, &mut next, args.users, producer);
        sqlx::query("BEGIN").execute(&mut *conn).await?;
        let bind = batch.commit_arguments(args.partitions, limits)?;
        Cost::add(
            &mut statement,
            explain(conn, COMMIT_EVENTS_SQL, bind).await?,
        );
        commit.ms += timed_commit(conn).await?;

        // The raw baseline: the same rows (new ids) into `raw_events`, in a transaction of its own.
        let raw = Batch::new(args.batch, &mut next, args.users, producer);
        sqlx::query("BEGIN").execute(&mut *conn).await?;
        let raw_seqs: Vec<i64> = (0..args.batch as i64)
            .map(|k| 1_000_000_000 + (round * args.batch) as i64 + k)
            .collect();
        Cost::add(
            &mut raw_insert,
            explain(
                conn,
                baseline::UNNEST_INSERT,
                raw.insert_arguments(&raw_seqs)?,
            )
            .await?,
        );
        raw_commit.ms += timed_commit(conn).await?;
    }
    let events = (args.rounds * args.batch) as f64;
    Ok(RowCosts {
        git: crate::git_revision(),
        setup_sql: args.setup_sql.clone(),
        batch: args.batch,
        rounds: args.rounds,
        prefill: args.prefill,
        users: args.users,
        herald: vec![
            (
                "commit statement (keys, counters, events, outbox)".into(),
                statement.per(events),
            ),
            ("commit (client's wait)".into(), commit.per(events)),
            ("total".into(), statement.plus(commit).per(events)),
        ],
        raw: vec![
            ("insert raw_events".into(), raw_insert.per(events)),
            ("commit (client's wait)".into(), raw_commit.per(events)),
            ("total".into(), raw_insert.plus(raw_commit).per(events)),
        ],
    })
}

fn print_costs(costs: &RowCosts) {
    println!(
        "\nPer-event cost of a group commit of {} events, {} commits, on {} events over {} users (git {})\n",
        costs.batch, costs.rounds, costs.prefill, costs.users, costs.git
    );
    for sql in &costs.setup_sql {
        println!("setup: {sql}");
    }
    print_table(&[("herald", &costs.herald), ("raw", &costs.raw)]);
    print_ratio(&costs.herald, &costs.raw, "time per event", "");
}

/// Herald's `total` row against the baseline's, in time per event.
pub fn print_ratio(
    herald: &[(String, PerEvent)],
    raw: &[(String, PerEvent)],
    what: &str,
    note: &str,
) {
    let total = |side: &[(String, PerEvent)]| {
        side.iter()
            .find(|(name, _)| name == "total")
            .map_or(0.0, |(_, c)| c.us)
    };
    let (herald, raw) = (total(herald), total(raw));
    if raw > 0.0 {
        println!(
            "\nherald / raw, {what}: {:.2}x ({herald:.2} / {raw:.2} us{note})",
            herald / raw
        );
    }
}

/// A table of statements' costs per event, as BENCHMARKS.md shows them: each side's rows, named
/// `side: statement`.
pub fn print_table(sides: &[(&str, &[(String, PerEvent)])]) {
    println!(
        "| statement | us / event | WAL records / event | WAL bytes / event | full-page images / event | buffers dirtied / event | buffers read or hit / event |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (side, rows) in sides {
        for (name, c) in rows.iter() {
            println!(
                "| {side}: {name} | {:.2} | {:.2} | {:.0} | {:.3} | {:.3} | {:.1} |",
                c.us, c.wal_records, c.wal_bytes, c.wal_fpi, c.dirtied, c.buffers
            );
        }
    }
}
