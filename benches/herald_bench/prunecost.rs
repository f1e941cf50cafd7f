//! What pruning by the per-user cap costs inside PostgreSQL, per pruned event (`scripts/bench
//! prunecost`; issue 23, BENCHMARKS.md, *Pruning costs*): Herald's statement
//! (`PRUNE_EVENTS_PAST_COUNT_SQL`, in retention's batches of 10,000) under `EXPLAIN (ANALYZE,
//! BUFFERS, WAL)`, split into what finds the rows, the delete, and the bookkeeping (retention
//! watermarks, idempotency keys), then its commit; beside it the bare delete of the same rows of
//! `raw_events` (a copy of `events` with its indexes) by `ctid`, and last the `VACUUM` each table
//! needs for the rows it deleted, with the WAL it writes.
//!
//! The events are written in arrival order with each one's user drawn at random, as a day's intake
//! interleaves users, so the rows a user's cap deletes lie on pages of their own (the soak's
//! finding). A checkpoint comes before the first batch, as one does every few minutes in
//! production: the first change to a page after it writes the whole page to the WAL.

use crate::rowcost::{
    Cost, PerEvent, Spread, explained, in_scratch_database, prefill, print_ratio, print_table,
    timed_commit,
};
use crate::say;
use herald::store::PRUNE_EVENTS_PAST_COUNT_SQL;
use serde::Serialize;
use sqlx::postgres::PgArguments;
use sqlx::{Arguments, PgConnection};
use std::time::Instant;

/// Arguments of `prunecost`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Delivered events in the table before pruning.
    #[arg(long, default_value_t = 2_000_000)]
    prefill: u64,
    /// Users the events are drawn over (at random, in arrival order).
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Rows per statement (Herald's retention deletes in batches of 10,000).
    #[arg(long, default_value_t = 10_000)]
    batch: i64,
    /// Batches measured; the cap is set so that each user has about twice what they delete.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// SQL run on the measuring connection before the batches (repeatable): a session setting to
    /// measure, e.g. `SET wal_compression = lz4`.
    #[arg(long = "session-sql")]
    session_sql: Vec<String>,
    /// `cargo bench` appends this; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The figures of a run.
#[derive(Serialize)]
struct PruneCosts {
    git: String,
    session_sql: Vec<String>,
    prefill: u64,
    users: u64,
    batch: i64,
    per_user_cap: i64,
    pruned: i64,
    /// Herald's statement, its parts and its commit, then its table's vacuum.
    herald: Vec<(String, PerEvent)>,
    /// The bare delete of the same rows of `raw_events`, its commit, then its vacuum.
    raw: Vec<(String, PerEvent)>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let costs = in_scratch_database("prunecost-latest.json", async |pool, producer| {
        say(format!(
            "prefill: {} delivered events over {} users, users at random",
            args.prefill, args.users
        ));
        prefill(pool, args.prefill, args.users, producer, AT_RANDOM).await?;
        let mut conn = pool.acquire().await?;
        for sql in &args.session_sql {
            say(format!("session: {sql}"));
            sqlx::raw_sql(sql).execute(&mut *conn).await?;
        }
        measure(&mut conn, &args).await
    })
    .await?;
    print_costs(&costs);
    Ok(())
}

/// Each event to a user drawn by a hash of its position (the same in both tables), seqs per user in
/// arrival order: a day's intake, users interleaved.
const AT_RANDOM: Spread = Spread {
    rows: "(SELECT i, abs(hashint8(i)) % $3 AS u FROM generate_series(0, $2 - 1) AS i) AS x",
    user: "u",
    seq: "row_number() OVER (PARTITION BY u ORDER BY i)",
};

/// What the rows of a batch cost: the statement, its parts, the commit.
#[derive(Default)]
struct Parts {
    statement: Cost,
    find: Cost,
    delete: Cost,
    bookkeeping: Cost,
    cascades: Cost,
    commit: Cost,
}

/// The batches: Herald's statement explained, then the bare delete of the same rows of
/// `raw_events`; then each table's vacuum.
async fn measure(conn: &mut PgConnection, args: &Args) -> anyhow::Result<PruneCosts> {
    // About twice what the rounds delete per user stays: every user has rows to give.
    let mean_per_user = args.prefill as i64 / args.users.max(1) as i64;
    let to_prune_per_user = (args.rounds as i64 * args.batch) / args.users.max(1) as i64 + 1;
    let cap = (mean_per_user - to_prune_per_user).max(1);
    let (mut herald, mut raw) = (Parts::default(), Parts::default());
    let mut pruned = 0;
    for _ in 0..args.rounds {
        let before = watermarks(conn).await?;
        sqlx::query("BEGIN").execute(&mut *conn).await?;
        let mut bind = PgArguments::default();
        bind.add(cap).map_err(bind_error)?;
        bind.add(args.batch).map_err(bind_error)?;
        let plan = explained(conn, PRUNE_EVENTS_PAST_COUNT_SQL, bind).await?;
        herald.statement.add(Cost::of(&plan));
        let (find, delete, bookkeeping) = statement_parts(&plan[0]["Plan"]);
        herald.find.add(find);
        herald.delete.add(delete);
        herald.bookkeeping.add(bookkeeping);
        herald.cascades.ms += trigger_ms(&plan[0]);
        herald.commit.ms += timed_commit(conn).await?;
        let after = watermarks(conn).await?;
        let rows = raw_rows(conn, &before, &after).await?;
        pruned += rows.len() as i64;

        sqlx::query("BEGIN").execute(&mut *conn).await?;
        let mut bind = PgArguments::default();
        bind.add(&rows).map_err(bind_error)?;
        raw.statement.add(Cost::of(
            &explained(
                conn,
                "DELETE FROM raw_events WHERE ctid = ANY($1::text[]::tid[])",
                bind,
            )
            .await?,
        ));
        raw.commit.ms += timed_commit(conn).await?;
    }
    let events = pruned.max(1) as f64;
    let herald_vacuum = vacuum(conn, "events").await?;
    let raw_vacuum = vacuum(conn, "raw_events").await?;
    Ok(PruneCosts {
        git: crate::git_revision(),
        session_sql: args.session_sql.clone(),
        prefill: args.prefill,
        users: args.users,
        batch: args.batch,
        per_user_cap: cap,
        pruned,
        herald: vec![
            ("statement".into(), herald.statement.per(events)),
            ("- finding the rows".into(), herald.find.per(events)),
            ("- deleting them".into(), herald.delete.per(events)),
            (
                "- watermarks and keys".into(),
                herald.bookkeeping.per(events),
            ),
            (
                "- foreign keys' cascades (triggers)".into(),
                herald.cascades.per(events),
            ),
            ("commit (client's wait)".into(), herald.commit.per(events)),
            (
                "total".into(),
                herald.statement.plus(herald.commit).per(events),
            ),
            ("VACUUM events afterwards".into(), herald_vacuum.per(events)),
        ],
        raw: vec![
            ("delete by ctid".into(), raw.statement.per(events)),
            ("commit (client's wait)".into(), raw.commit.per(events)),
            ("total".into(), raw.statement.plus(raw.commit).per(events)),
            (
                "VACUUM raw_events afterwards".into(),
                raw_vacuum.per(events),
            ),
        ],
    })
}

fn bind_error(error: sqlx::error::BoxDynError) -> anyhow::Error {
    anyhow::anyhow!("bind: {error}")
}

/// The statement's plan split: the subquery that finds the rows (the `ARRAY` under the delete's
/// TID scan), the rest of the delete (the rows, their index entries stay until a vacuum), and the
/// other data-modifying CTEs (watermarks, keys).
fn statement_parts(plan: &serde_json::Value) -> (Cost, Cost, Cost) {
    let (mut find, mut delete, mut bookkeeping) =
        (Cost::default(), Cost::default(), Cost::default());
    for cte in plan["Plans"].as_array().into_iter().flatten() {
        match cte["Subplan Name"].as_str() {
            Some("CTE gone") => {
                delete = Cost::of_node(cte);
                if let Some(subquery) = find_node(cte, &|node| {
                    node["Parent Relationship"] == "InitPlan" && node["Node Type"] != "ModifyTable"
                }) {
                    find = Cost::of_node(subquery);
                    delete.subtract(find);
                }
            }
            Some(name) if name.starts_with("CTE ") => bookkeeping.add(Cost::of_node(cte)),
            _ => {}
        }
    }
    (find, delete, bookkeeping)
}

/// The time the statement's triggers took (the cascades of the foreign keys that reference
/// `events`: one query per deleted row and key), ms.
fn trigger_ms(explain: &serde_json::Value) -> f64 {
    explain["Triggers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|trigger| trigger["Time"].as_f64())
        .sum()
}

/// The first node under `plan` (depth first) that `wanted` picks.
fn find_node<'a>(
    plan: &'a serde_json::Value,
    wanted: &dyn Fn(&serde_json::Value) -> bool,
) -> Option<&'a serde_json::Value> {
    for child in plan["Plans"].as_array().into_iter().flatten() {
        if wanted(child) {
            return Some(child);
        }
        if let Some(found) = find_node(child, wanted) {
            return Some(found);
        }
    }
    None
}

/// Every user's retention watermark.
async fn watermarks(conn: &mut PgConnection) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(
        sqlx::query_as("SELECT user_id, pruned_through FROM retention_watermarks")
            .fetch_all(&mut *conn)
            .await?,
    )
}

/// The `ctid`s (as text) of the rows of `raw_events` that Herald's batch deleted from `events`:
/// each user's seqs between its watermark `before` and `after`.
async fn raw_rows(
    conn: &mut PgConnection,
    before: &[(String, i64)],
    after: &[(String, i64)],
) -> anyhow::Result<Vec<String>> {
    let before: std::collections::HashMap<&str, i64> =
        before.iter().map(|(u, s)| (u.as_str(), *s)).collect();
    let (mut users, mut from, mut to) = (Vec::new(), Vec::new(), Vec::new());
    for (user, through) in after {
        let was = before.get(user.as_str()).copied().unwrap_or(0);
        if *through > was {
            users.push(user.clone());
            from.push(was);
            to.push(*through);
        }
    }
    Ok(sqlx::query_scalar(
        "SELECT r.ctid::text FROM UNNEST($1::text[], $2::int8[], $3::int8[]) AS x(u, lo, hi)
         JOIN raw_events r ON r.user_id = x.u AND r.seq > x.lo AND r.seq <= x.hi",
    )
    .bind(&users)
    .bind(&from)
    .bind(&to)
    .fetch_all(&mut *conn)
    .await?)
}

/// `VACUUM table`, timed, with the WAL it wrote (the server's counters before and after: nothing
/// else writes meanwhile but other sessions' work on a shared box, which would show here).
async fn vacuum(conn: &mut PgConnection, table: &str) -> anyhow::Result<Cost> {
    let wal = "SELECT wal_records::float8, wal_bytes::float8, wal_fpi::float8 FROM pg_stat_wal";
    let before: (f64, f64, f64) = sqlx::query_as(wal).fetch_one(&mut *conn).await?;
    let started = Instant::now();
    sqlx::raw_sql(&format!("VACUUM {table}"))
        .execute(&mut *conn)
        .await?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let after: (f64, f64, f64) = sqlx::query_as(wal).fetch_one(&mut *conn).await?;
    Ok(Cost {
        ms,
        wal_records: after.0 - before.0,
        wal_bytes: after.1 - before.1,
        wal_fpi: after.2 - before.2,
        ..Cost::default()
    })
}

fn print_costs(costs: &PruneCosts) {
    println!(
        "\nPer-event cost of pruning {} events by the per-user cap ({} kept per user), batches of {}, on {} events over {} users (git {})\n",
        costs.pruned, costs.per_user_cap, costs.batch, costs.prefill, costs.users, costs.git
    );
    for sql in &costs.session_sql {
        println!("session: {sql}");
    }
    print_table(&[("herald", &costs.herald), ("raw", &costs.raw)]);
    print_ratio(
        &costs.herald,
        &costs.raw,
        "time per pruned event",
        "; vacuums not included",
    );
}
