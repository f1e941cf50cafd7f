//! The plans of the hot path's statements on a table of a million events (issue 23: plans that
//! cannot regress silently).
//!
//! Every statement of the group commit, the outcome writer, the confirm recorder and settle, the
//! relay, catch-up and gap fill, the inbox, the sweeper and retention is taken as the store sends
//! it (its `herald::store::*_SQL` text, `PREPARE`d with the types the store binds) and `EXPLAIN`ed
//! with realistic arguments (a hot user, a cold user, a batch of ids) in both of PostgreSQL's plan
//! modes: a custom plan, and the generic plan a prepared statement may switch to after five runs
//! (sqlx keeps its statements prepared per connection). Each time in three states of the
//! statistics: never analyzed, analyzed while empty (what `herald migrate` leaves until the upkeep
//! or autovacuum analyzes: a new deployment with autovacuum off plans with it for a while), and
//! freshly analyzed. And once as a node on a fresh deployment runs it: on a connection made as the
//! store makes them, six times on the empty tables before the fixture is loaded, then once more on
//! the million events (a prepared statement may keep the plan it settled on while the tables were
//! empty: the soak's first-minute stall). A plan fails when it reads the whole of a large table.
//!
//! One fixture (1.5 million rows, filled by `generate_series` in about 15 s) serves every
//! statement. The test is in the normal suite, so CI runs it: `cargo test --test it plans`.

use herald::store;
use sqlx::{PgConnection, Row};
use std::fmt::Write as _;
use uuid::Uuid;

/// The fixture's large tables: no statement of the hot path may read one whole (the
/// `Statement::scans` of one that must say so).
const LARGE: &[&str] = &[
    "events",
    "delivery_attempts",
    "idempotency_keys",
    "outbox",
    "user_seqs",
    "read_watermarks",
    "retention_watermarks",
];

/// The shape of real load, one month of it: 1,000,000 events, half of them of five hot users
/// (100,000 each) and half of 100,000 users with five each, interleaved in time; mostly delivered,
/// one in 200 failed, some of the last day's still being retried (`published`) and the last 100
/// waiting for a publish confirm (`accepted`); a day's worth is past the default retention of 30
/// days. One event in ten carries an idempotency key, and some keys outlive their pruned events
/// (2,000 pruned at the last retention pass, old enough to expire; 20,000 younger than a day, of
/// events pruned by count); attempts for the failed, retrying and a sixteenth of
/// the delivered events; the messages of the last four days still in flight (confirmed outbox
/// rows, a broker backlog), a few unplaced ones, and the unconfirmed ones of the accepted events;
/// every user's counter, some read marks and retention watermarks, and the 16 partitions' leases.
const FIXTURE: &str = r"
INSERT INTO producers (name, key_hash) VALUES ('load', '\x00');
INSERT INTO events (id, producer_id, user_id, seq, event, data, idempotency_key, status, attempts,
                    push_count, last_error, enqueued_at, published_at, delivered_at, failed_at,
                    next_attempt_at)
SELECT (lpad(to_hex((extract(epoch FROM at) * 1000)::int8), 12, '0') || '7000'
        || lpad(to_hex(i), 16, '0'))::uuid,
       1, u, s, 'push', jsonb_build_object('n', i), CASE WHEN i % 10 = 0 THEN 'k' || i END,
       st, CASE st WHEN 'accepted' THEN 0 WHEN 'failed' THEN 4 ELSE 1 END,
       CASE WHEN st = 'delivered' THEN 1 END,
       CASE WHEN st IN ('failed', 'published') THEN 'timeout' END,
       at,
       CASE WHEN st <> 'accepted' THEN at + interval '20 ms' END,
       CASE WHEN st = 'delivered' THEN at + interval '30 ms' END,
       CASE WHEN st = 'failed' THEN at + interval '1 s' END,
       CASE WHEN st = 'published' THEN at + interval '1 min' END
FROM (SELECT i,
             CASE WHEN i % 2 = 0 THEN 'hot' || (i / 2 - 1) % 5
                  ELSE 'u' || (i - 1) / 2 % 100000 END AS u,
             CASE WHEN i % 2 = 0 THEN (i / 2 - 1) / 5 + 1
                  ELSE (i - 1) / 2 / 100000 + 1 END AS s,
             now() - interval '31 days' + i * interval '2678400 us' AS at,
             CASE WHEN i > 999900 THEN 'accepted'
                  WHEN i % 200 = 0 THEN 'failed'
                  WHEN i > 960000 AND i % 10 = 1 THEN 'published'
                  ELSE 'delivered' END AS st
      FROM generate_series(1, 1000000) AS i) AS g;
INSERT INTO user_seqs (user_id, last_seq)
SELECT 'hot' || h, 100000 FROM generate_series(0, 4) AS h
UNION ALL SELECT 'u' || c, 5 FROM generate_series(0, 99999) AS c;
INSERT INTO read_watermarks (user_id, read_through, read_at)
SELECT 'hot' || h, 99000, now() FROM generate_series(0, 4) AS h
UNION ALL SELECT 'u' || c, 3, now() FROM generate_series(0, 99999, 10) AS c;
INSERT INTO retention_watermarks (user_id, pruned_through)
SELECT 'u' || c, 1 FROM generate_series(0, 99999, 7) AS c;
INSERT INTO idempotency_keys (producer_id, key, event_id, created_at)
SELECT 1, idempotency_key, id, enqueued_at FROM events WHERE idempotency_key IS NOT NULL;
INSERT INTO idempotency_keys (producer_id, key, event_id, created_at, seq, pruned_at)
SELECT 1, 'gone' || i, gen_random_uuid(), now() - interval '31 days' + i * interval '1 s', i,
       now() - interval '5 min'
FROM generate_series(1, 2000) AS i;
INSERT INTO idempotency_keys (producer_id, key, event_id, created_at, seq, pruned_at)
SELECT 1, 'young' || i, gen_random_uuid(), now() - interval '23 hours' + i * interval '4 s', i,
       now() - interval '1 min'
FROM generate_series(1, 20000) AS i;
INSERT INTO delivery_attempts (event_id, attempt, started_at, finished_at, outcome, sockets, error)
SELECT e.id, a, e.published_at, e.published_at + interval '10 ms',
       CASE WHEN e.status = 'delivered' AND a = 2 THEN 'pushed' ELSE 'failed' END,
       CASE WHEN e.status = 'delivered' AND a = 2 THEN 1 END,
       CASE WHEN NOT (e.status = 'delivered' AND a = 2) THEN 'timeout' END
FROM events e, generate_series(1, 4) AS a
WHERE e.status = 'failed'
   OR (e.status = 'published' AND a = 1)
   OR (e.status = 'delivered' AND a <= 2 AND e.id::text LIKE '%3');
INSERT INTO outbox (id, event_ids, partition, created_at, confirmed_at)
SELECT gen_random_uuid(), ARRAY[e.id], (hashtext(e.user_id) & 15)::int2, e.enqueued_at,
       e.enqueued_at + interval '5 ms'
FROM events e WHERE e.enqueued_at > now() - interval '4 days' AND e.status <> 'accepted';
INSERT INTO outbox (id, event_ids, partition, created_at, confirmed_at)
SELECT gen_random_uuid(), ARRAY[e.id], NULL, e.enqueued_at, e.enqueued_at + interval '5 ms'
FROM events e WHERE e.user_id IN ('u10', 'u11', 'u12', 'u13') AND e.seq = 4;
INSERT INTO outbox (id, event_ids, partition, created_at)
SELECT gen_random_uuid(), array_agg(id ORDER BY seq), 0, min(enqueued_at)
FROM events WHERE status = 'accepted' GROUP BY user_id;
INSERT INTO partition_leases (partition, owner, lease_until, epoch)
SELECT p, 'plans', now() + interval '1 hour', 1 FROM generate_series(0, 15) AS p;
INSERT INTO worker_nodes (name, partitions) VALUES ('plans', 16);
";

/// What the planner knows of Herald's tables.
#[derive(Clone, Copy, Debug)]
enum Statistics {
    /// Nothing: never analyzed nor vacuumed (`reltuples` -1, no `pg_statistic` rows).
    NeverAnalyzed,
    /// What `Store::migrate`'s `ANALYZE` of the empty tables left (`reltuples` 0, no
    /// `pg_statistic` rows), however many rows came since.
    AnalyzedEmpty,
    /// A fresh `ANALYZE`.
    Analyzed,
}

/// A statement of `herald::store`: its name, and its text.
macro_rules! named {
    ($name:ident) => {
        (stringify!($name), store::$name)
    };
}

/// One statement of the hot path and the arguments it is planned with.
struct Statement {
    /// Its name in `herald::store`, and its text.
    sql: (&'static str, &'static str),
    /// Its parameters' types, as the store binds them.
    types: &'static str,
    /// Named argument lists, as SQL literals.
    cases: Vec<(&'static str, String)>,
    /// Large tables it reads whole by design.
    scans: &'static [&'static str],
    /// What the store runs before it in its transaction, if anything.
    planning: Option<&'static str>,
}

/// Every statement of the hot path, in three states of the statistics and both plan modes, with
/// realistic arguments: none reads a large table whole (and the check rejects a plan that does).
#[tokio::test]
async fn no_hot_statement_reads_a_large_table_whole_whatever_the_statistics() {
    let (_deployment, store) = crate::common::migrated_store().await;
    let mut conn = store.pool().acquire().await.unwrap();
    let analyzed_empty = sizes(&mut conn).await;
    assert!(
        analyzed_empty.iter().all(|size| size.kind != "r"
            || size.tuples == 0.0
            || ["_sqlx_migrations", "broker_upgrades"].contains(&size.name.as_str())),
        "herald migrate leaves its tables analyzed while empty: {analyzed_empty:?}"
    );
    // Where autovacuum is on, it must not analyze the tables while the test holds them in a state.
    run(
        &mut conn,
        "DO $$ DECLARE t regclass; BEGIN
             FOR t IN SELECT c.oid::regclass FROM pg_class c
                      JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = 'public' AND c.relkind = 'r' LOOP
                 EXECUTE format('ALTER TABLE %s SET (autovacuum_enabled = off)', t);
             END LOOP;
         END $$",
    )
    .await;
    // A node on a fresh deployment sends its first statements while the tables are empty, and a
    // statement sqlx keeps prepared may go on with the generic plan PostgreSQL made for it then
    // (only an `ANALYZE` of one of its tables, or DDL, makes it plan again): the soak's first
    // minute, the outcome writer's update reading every row of `events` for every event of its
    // batch, up to 2 s a statement. So each statement runs six times (the plan cache tries five
    // custom plans before it may settle on the generic one) on a connection Herald's way, on the
    // empty tables, with arguments shaped like the later ones; once the fixture is in, the plan
    // that connection would run must not read a large table whole either.
    let early_statements = statements(&Rows::made_up());
    let mut early = store.pool().acquire().await.unwrap();
    for (i, statement) in early_statements.iter().enumerate() {
        run(
            &mut early,
            &format!(
                "PREPARE early{i} ({}) AS {}",
                statement.types, statement.sql.1
            ),
        )
        .await;
        for _ in 0..6 {
            for (_, args) in &statement.cases {
                explain_in(&mut early, statement, &format!("EXECUTE early{i} ({args})")).await;
            }
        }
    }
    // The state is what it claims: a generic plan made now is still used after the fixture.
    run(
        &mut early,
        "SET plan_cache_mode = force_generic_plan;
         PREPARE planted (uuid) AS SELECT id FROM events WHERE id = $1",
    )
    .await;
    explain(&mut early, "EXECUTE planted (gen_random_uuid())").await;
    run(&mut early, "RESET plan_cache_mode").await;

    sqlx::raw_sql(FIXTURE).execute(&mut *conn).await.unwrap();
    let partial: Vec<String> = sqlx::query_scalar(
        "SELECT indexrelid::regclass::text FROM pg_index WHERE indpred IS NOT NULL",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let statements = statements(&Rows::read(&mut conn).await);
    // Every statement the store exports is planned here: a new one cannot be forgotten.
    let planned: Vec<&str> = statements.iter().map(|s| s.sql.0).collect();
    let unplanned: Vec<String> = exported_statements()
        .into_iter()
        .filter(|name| !planned.contains(&name.as_str()))
        .collect();
    assert!(unplanned.is_empty(), "not planned here: {unplanned:?}");

    let mut failures = Vec::new();
    for (i, statement) in statements.iter().enumerate() {
        for (case, args) in &statement.cases {
            let sql = format!("EXECUTE early{i} ({args})");
            let plan = explain_in(&mut early, statement, &sql).await;
            let when = "first run on the empty tables";
            note_whole_reads(&mut failures, statement, case, when, &plan, &partial);
        }
    }
    run(&mut early, "SET plan_cache_mode = force_generic_plan").await;
    let planted = explain(&mut early, "EXECUTE planted (gen_random_uuid())").await;
    assert!(
        !whole_reads(&planted, &["events"], &partial).is_empty(),
        "a generic plan made on the empty tables was not kept:\n{planted}"
    );
    run(&mut early, "DEALLOCATE ALL; RESET plan_cache_mode").await;
    drop(early);

    for statistics in [
        Statistics::NeverAnalyzed,
        Statistics::AnalyzedEmpty,
        Statistics::Analyzed,
    ] {
        set_statistics(&mut conn, statistics, &analyzed_empty).await;
        for statement in &statements {
            // In a transaction rolled back, so nothing of a write could stay.
            run(&mut conn, "BEGIN").await;
            if let Some(planning) = statement.planning {
                run(&mut conn, planning).await;
            }
            let types = statement.types;
            run(
                &mut conn,
                &format!("PREPARE hot ({types}) AS {}", statement.sql.1),
            )
            .await;
            for mode in ["force_custom_plan", "force_generic_plan"] {
                run(&mut conn, &format!("SET plan_cache_mode = {mode}")).await;
                for (case, args) in &statement.cases {
                    let plan = explain(&mut conn, &format!("EXECUTE hot ({args})")).await;
                    let when = format!("{statistics:?}, {mode}");
                    note_whole_reads(&mut failures, statement, case, &when, &plan, &partial);
                }
            }
            run(&mut conn, "DEALLOCATE hot; ROLLBACK").await;
        }
        // A planted regression: a statement that must read all of `events` is caught.
        let planted = explain(
            &mut conn,
            "SELECT id FROM events WHERE data::text LIKE '%\"n\": 4242%'",
        )
        .await;
        assert!(
            !whole_reads(&planted, &["events"], &partial).is_empty(),
            "{statistics:?}: the check let a scan of events pass:\n{planted}"
        );
    }
    run(&mut conn, "RESET plan_cache_mode").await;
    assert!(
        failures.is_empty(),
        "{} plans read a large table whole:\n\n{}",
        failures.len(),
        failures.join("\n")
    );

    // The statements reshaped for their plans still do their work, on the million events.
    drop(conn);
    assert_eq!(
        store.expire_idempotency_keys(86_400, 10_000).await.unwrap(),
        2_000
    );
    assert_eq!(store.prune_events(0, 99_990, 10_000).await.unwrap(), 5 * 10);
    let hot: Vec<i64> = sqlx::query_scalar(
        "SELECT pruned_through FROM retention_watermarks WHERE user_id LIKE 'hot%'",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(
        hot, [10; 5],
        "each hot user's events beyond the newest 99,990"
    );
    // What retention by age must leave: every event not delivered, and every one younger than a
    // fixed instant a day inside the 30 days (a count against now() would drift while it runs, as
    // events of the fixture cross the 30-day line).
    let kept = "SELECT count(*) FROM events
                WHERE status <> 'delivered' OR enqueued_at >= $1::timestamptz";
    let inside: String = sqlx::query_scalar("SELECT (now() - interval '29 days')::text")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let count_kept = || async {
        sqlx::query_scalar::<_, i64>(kept)
            .bind(&inside)
            .fetch_one(store.pool())
            .await
            .unwrap()
    };
    let before = count_kept().await;
    assert_eq!(store.prune_events(30, 0, 10_000).await.unwrap(), 10_000);
    assert_eq!(
        count_kept().await,
        before,
        "only events past the retention age"
    );
}

/// The rows of the fixture the statements' arguments are made of.
struct Rows {
    /// Events of the last hours, with their users: the outcome writer's batch.
    recent: Vec<(Uuid, String)>,
    /// Messages waiting for their confirm.
    unconfirmed: Vec<Uuid>,
    /// Their events.
    accepted: Vec<Uuid>,
    /// Confirmed messages of partition 3, with their event.
    in_flight: Vec<(Uuid, Uuid)>,
    /// Confirmed messages with no partition.
    unplaced: Vec<Uuid>,
    /// The hot user's last events.
    hot_ids: Vec<Uuid>,
    /// A cold user's events.
    cold_ids: Vec<Uuid>,
}

impl Rows {
    /// As many made-up ids as the fixture gives each list: the arguments of a node's first
    /// statements on a fresh deployment, shaped like the ones it sends later.
    fn made_up() -> Self {
        let ids = |n: usize| (0..n).map(|_| Uuid::now_v7()).collect::<Vec<_>>();
        Self {
            recent: (0..1000)
                .map(|i| (Uuid::now_v7(), format!("u{i}")))
                .collect(),
            unconfirmed: ids(50),
            accepted: ids(100),
            in_flight: ids(1000).into_iter().zip(ids(1000)).collect(),
            unplaced: ids(4),
            hot_ids: ids(1000),
            cold_ids: ids(5),
        }
    }

    /// Read from the fixture.
    async fn read(conn: &mut PgConnection) -> Self {
        // Events enqueued in the last hours (through the BRIN index): the outcome writer's batch.
        let recent: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT id, user_id FROM events
         WHERE enqueued_at > now() - interval '2 hours' ORDER BY enqueued_at LIMIT 1000",
        )
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        let unconfirmed: Vec<Uuid> =
            sqlx::query_scalar("SELECT id FROM outbox WHERE confirmed_at IS NULL")
                .fetch_all(&mut *conn)
                .await
                .unwrap();
        let accepted: Vec<Uuid> =
            sqlx::query_scalar("SELECT unnest(event_ids) FROM outbox WHERE confirmed_at IS NULL")
                .fetch_all(&mut *conn)
                .await
                .unwrap();
        let in_flight: Vec<(Uuid, Uuid)> = sqlx::query_as(
            "SELECT id, event_ids[1] FROM outbox
         WHERE partition = 3 AND confirmed_at IS NOT NULL ORDER BY created_at LIMIT 1000",
        )
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        let unplaced: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM outbox WHERE partition IS NULL AND confirmed_at IS NOT NULL",
        )
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        let hot_ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM events WHERE user_id = 'hot0' AND seq > 99000 ORDER BY seq",
        )
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        let cold_ids: Vec<Uuid> =
            sqlx::query_scalar("SELECT id FROM events WHERE user_id = 'u42' ORDER BY seq")
                .fetch_all(&mut *conn)
                .await
                .unwrap();
        assert_eq!(recent.len(), 1000, "the fixture's last hours");
        assert!(unconfirmed.len() > 10 && unplaced.len() == 4 && in_flight.len() == 1000);
        Self {
            recent,
            unconfirmed,
            accepted,
            in_flight,
            unplaced,
            hot_ids,
            cold_ids,
        }
    }
}

/// The statements and their arguments, made of `rows`.
fn statements(rows: &Rows) -> Vec<Statement> {
    let Rows {
        recent,
        unconfirmed,
        accepted,
        in_flight,
        unplaced,
        hot_ids,
        cold_ids,
    } = rows;

    // A full group commit, 1,000 new events: 100 of each hot user, one each of 500 cold users,
    // one in ten with a key.
    let users: Vec<String> = (0..5)
        .flat_map(|h| std::iter::repeat_n(format!("hot{h}"), 100))
        .chain((0..500).map(|c| format!("u{c}")))
        .collect();
    let fresh: Vec<Uuid> = users.iter().map(|_| Uuid::now_v7()).collect();
    let keys: Vec<Option<String>> = (0..users.len())
        .map(|i| (i % 10 == 0).then(|| format!("new{i}")))
        .collect();
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    // The commit's outbox rows: one message per partition of 16, a row per event.
    let message_of: Vec<Uuid> = (0..16).map(|_| Uuid::now_v7()).collect();
    let partition_of = |u: &String| herald::event::partition_of(u, 16);
    let commit = format!(
        "{}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}",
        uuids(&fresh),
        array(users.iter().map(|_| Some("1")), "int8"),
        array(users.iter().map(Some), "text"),
        array(users.iter().map(|_| Some("push")), "text"),
        array(users.iter().map(|_| Some("{}")), "text"),
        array(keys.iter().map(Option::as_ref), "text"),
        array(users.iter().map(|_| Some(now_ms)), "int8"),
        uuids(
            &users
                .iter()
                .map(|u| message_of[usize::from(partition_of(u))])
                .collect::<Vec<_>>()
        ),
        uuids(&fresh),
        array(users.iter().map(|u| Some(partition_of(u))), "int2"),
        array(users.iter().map(|_| None::<&str>), "text"),
    );
    let outbox_rows = format!(
        "{}, {}, {}, 0",
        uuids(&fresh.iter().map(|_| fresh[0]).collect::<Vec<_>>()),
        uuids(&fresh),
        array(fresh.iter().map(|_| Some(3)), "int2"),
    );
    // A producer retrying a whole batch: every key taken, a tenth of them by pruned events.
    let taken_keys = format!(
        "{}, {}, 'pruned'",
        array((0..1000).map(|_| Some(1)), "int8"),
        array(
            (1..=900)
                .map(|i| format!("k{}", i * 10))
                .chain((1..=100).map(|i| format!("gone{i}")))
                .map(Some),
            "text"
        ),
    );

    // The outcome writer: the last hours' events, delivered, retried or failed for good.
    let kinds: Vec<&str> = (0..recent.len())
        .map(|i| match i % 10 {
            0 => "retrying",
            1 => "failed",
            _ => "delivered",
        })
        .collect();
    let attempts = |n: usize| {
        let batch = &recent[..n];
        let kinds = &kinds[..n];
        format!(
            "{}, {}, {}, {}, {}, {}, {}, {}, {}, 'plans', {}",
            uuids(&batch.iter().map(|e| e.0).collect::<Vec<_>>()),
            array(kinds.iter().map(Some), "text"),
            array(
                kinds.iter().map(|k| (*k == "delivered").then_some(1)),
                "int4"
            ),
            array(
                kinds
                    .iter()
                    .map(|k| (*k != "delivered").then_some("timeout")),
                "text"
            ),
            array(batch.iter().map(|_| Some(now_ms - 50)), "int8"),
            array(batch.iter().map(|_| Some(now_ms)), "int8"),
            array(
                kinds
                    .iter()
                    .map(|k| (*k == "retrying").then_some(now_ms + 100)),
                "int8"
            ),
            array(
                batch
                    .iter()
                    .map(|e| Some(herald::event::partition_of(&e.1, 16))),
                "int4"
            ),
            array(batch.iter().map(|_| Some(1)), "int8"),
            array(
                kinds.iter().map(|k| (*k == "retrying").then(Uuid::now_v7)),
                "uuid"
            ),
        )
    };

    let messages: Vec<Uuid> = in_flight.iter().map(|m| m.0).collect();
    let batch_of_messages: Vec<Uuid> = unconfirmed
        .iter()
        .chain(&messages)
        .take(1000)
        .copied()
        .collect();
    let batch_of_events: Vec<Uuid> = accepted
        .iter()
        .chain(recent.iter().map(|e| &e.0))
        .take(1000)
        .copied()
        .collect();
    let carried: Vec<Uuid> = in_flight.iter().map(|m| m.1).collect();
    let placed = format!(
        "{}, {}",
        uuids(unplaced),
        array(unplaced.iter().map(|_| Some(2)), "int2")
    );
    let max = i64::MAX;
    let cap = store::UNREAD_CAP;

    vec![
        // The group commit, one statement; then, for a batch whose keys were taken, its originals.
        Statement {
            sql: named!(COMMIT_EVENTS_SQL),
            types: "uuid[], int8[], text[], text[], text[], text[], int8[], uuid[], uuid[], int2[], \
                    text[]",
            cases: vec![(
                "1,000 events, one in ten keyed, 5 hot and 500 cold users",
                commit,
            )],
            scans: &[],
            planning: None,
        },
        Statement {
            sql: named!(IDEMPOTENT_ORIGINALS_SQL),
            types: "int8[], text[], text",
            cases: vec![("1,000 taken keys", taken_keys)],
            scans: &[],
            planning: None,
        },
        Statement {
            sql: named!(INSERT_OUTBOX_ROWS_SQL),
            types: "uuid[], uuid[], int2[], float8",
            cases: vec![("a message of 1,000 events", outbox_rows)],
            scans: &[],
            planning: None,
        },
        // The outcome writer.
        Statement {
            sql: named!(RECORD_ATTEMPTS_SQL),
            types: "uuid[], text[], int4[], text[], int8[], int8[], int8[], int4[], int8[], text, \
                    uuid[]",
            cases: vec![
                ("1 attempt", attempts(1)),
                ("1,000 attempts", attempts(1000)),
            ],
            scans: &[],
            planning: None,
        },
        // The confirm recorder, and a worker's settle.
        Statement {
            sql: named!(CONFIRM_MESSAGES_SQL),
            types: "uuid[]",
            cases: vec![
                ("the unconfirmed messages", uuids(unconfirmed)),
                ("1,000 messages", uuids(&batch_of_messages)),
            ],
            scans: &[],
            planning: None,
        },
        Statement {
            sql: named!(FORGET_MESSAGES_SQL),
            types: "uuid[]",
            cases: vec![
                ("1 settled message", uuids(&messages[..1])),
                ("1,000 settled messages", uuids(&messages)),
            ],
            scans: &[],
            planning: None,
        },
        // The relay.
        Statement {
            sql: named!(CLAIM_UNCONFIRMED_SQL),
            types: "float8, int8",
            cases: vec![("the default grace and batch", "10000, 1000".into())],
            scans: &[],
            planning: None,
        },
        Statement {
            sql: named!(UNCONFIRMED_EVENTS_SQL),
            types: "uuid[], text",
            cases: vec![
                (
                    "the claimed messages' events",
                    format!("{}, 'accepted'", uuids(accepted)),
                ),
                (
                    "1,000 events",
                    format!("{}, 'accepted'", uuids(&batch_of_events)),
                ),
            ],
            scans: &[],
            planning: None,
        },
        Statement {
            sql: named!(OUTBOX_DEPTH_SQL),
            types: "int8",
            cases: vec![("the cap", "100000".into())],
            scans: &[],
            planning: None,
        },
        // A join's catch-up and a channel's gap fill.
        Statement {
            sql: named!(USER_SEQ_BOUNDS_SQL),
            types: "text[]",
            cases: vec![
                ("hot user", "ARRAY['hot0']".into()),
                ("cold user", "ARRAY['u42']".into()),
                ("256 joins at once", {
                    let users: Vec<String> = (0..256).map(|i| format!("'u{i}'")).collect();
                    format!("ARRAY['hot0', {}]", users.join(", "))
                }),
            ],
            scans: &[],
            planning: None,
        },
        Statement {
            sql: named!(USER_EVENTS_ASCENDING_SQL),
            types: "text, int8, int8, int8",
            cases: vec![
                ("hot user from the start", format!("'hot0', 0, {max}, 500")),
                ("hot user, recent", format!("'hot0', 99900, {max}, 500")),
                ("hot user, a gap", "'hot0', 50000, 50010, 500".into()),
                ("cold user", format!("'u42', 0, {max}, 500")),
            ],
            scans: &[],
            planning: None,
        },
        // The inbox.
        Statement {
            sql: named!(USER_EVENTS_DESCENDING_SQL),
            types: "text, int8, int8, int8",
            cases: vec![
                ("hot user, first page", format!("'hot0', 0, {max}, 100")),
                ("hot user, a later page", "'hot0', 0, 50000, 100".into()),
                ("cold user", format!("'u42', 0, {max}, 100")),
            ],
            scans: &[],
            planning: None,
        },
        Statement {
            sql: named!(UNREAD_SQL),
            types: "text, int8",
            cases: vec![
                ("hot user", format!("'hot0', {cap}")),
                ("cold user", format!("'u42', {cap}")),
            ],
            scans: &[],
            planning: None,
        },
        Statement {
            sql: named!(READ_MARK_SQL),
            types: "text, int8, int8",
            cases: vec![
                ("hot user", format!("'hot0', 99990, {cap}")),
                ("cold user", format!("'u42', 5, {cap}")),
            ],
            scans: &[],
            planning: None,
        },
        Statement {
            sql: named!(ACK_EVENTS_SQL),
            types: "text, uuid[]",
            cases: vec![
                ("hot user", format!("'hot0', {}", uuids(hot_ids))),
                ("cold user", format!("'u42', {}", uuids(cold_ids))),
            ],
            scans: &[],
            planning: None,
        },
        // The sweeper.
        Statement {
            sql: named!(STALE_MESSAGES_SQL),
            types: "int2, float8, int8",
            cases: vec![("a partition", "3, 300000, 1000".into())],
            scans: &[],
            planning: None,
        },
        Statement {
            sql: named!(TAKE_STALE_MESSAGES_SQL),
            types: "uuid[]",
            cases: vec![("1000 stale messages", uuids(&messages))],
            scans: &[],
            planning: None,
        },
        Statement {
            sql: named!(SWEEP_STALE_EVENTS_SQL),
            types: "float8, uuid[], text",
            cases: vec![(
                "their 1000 events",
                format!("300000, {}, 'accepted'", uuids(&carried)),
            )],
            scans: &[],
            planning: None,
        },
        Statement {
            sql: named!(KEEP_IN_FLIGHT_SQL),
            types: "uuid[], uuid[], int2",
            cases: vec![(
                "their 1000 events, 100 swept",
                format!("{}, {}, 3", uuids(&carried), uuids(&carried[..100])),
            )],
            scans: &[],
            planning: None,
        },
        Statement {
            sql: named!(UNPLACED_MESSAGES_SQL),
            types: "int8",
            cases: vec![("the default batch", "1000".into())],
            scans: &[],
            planning: None,
        },
        Statement {
            sql: named!(PLACE_MESSAGES_SQL),
            types: "uuid[], int2[]",
            cases: vec![("the unplaced messages", placed)],
            scans: &[],
            planning: None,
        },
        // Retention.
        Statement {
            sql: named!(PRUNE_OLD_EVENTS_SQL),
            types: "int4, int8",
            cases: vec![("30 days, a batch", "30, 10000".into())],
            scans: &[],
            planning: Some(store::PRUNE_OLD_EVENTS_PLANNING_SQL),
        },
        Statement {
            sql: named!(PRUNE_EVENTS_PAST_COUNT_SQL),
            types: "int8, int8",
            cases: vec![("10,000 per user, a batch", "10000, 10000".into())],
            // Every user's counter and watermark are looked at: whether it has more events than
            // it keeps above what was pruned.
            scans: &["user_seqs", "retention_watermarks"],
            planning: None,
        },
        Statement {
            sql: named!(EXPIRE_IDEMPOTENCY_KEYS_SQL),
            types: "float8, int8",
            cases: vec![("a day, a batch", "86400, 10000".into())],
            scans: &[],
            planning: None,
        },
    ]
}

/// Puts Herald's tables (every table of the test database, and their indexes) in `statistics`
/// (`empty`: their sizes as `herald migrate` left them), and checks the planner sees it so: an
/// equality on `events.user_id` is estimated from the column's statistics, or, without any, at
/// PostgreSQL's default of 1 / 200 of the rows.
async fn set_statistics(conn: &mut PgConnection, statistics: Statistics, empty: &[Size]) {
    const OURS: &str = "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'i')";
    let sizes = match statistics {
        // What a table created and never analyzed nor vacuumed has.
        Statistics::NeverAnalyzed => format!(
            "UPDATE pg_class SET reltuples = -1, relpages = 0, relallvisible = 0
             WHERE oid IN ({OURS})"
        ),
        Statistics::AnalyzedEmpty => format!(
            "UPDATE pg_class c SET reltuples = x.tuples, relpages = x.pages, relallvisible = 0
             FROM unnest({}, {}, {}) AS x(oid, tuples, pages) WHERE c.oid = x.oid::oid",
            array(empty.iter().map(|s| Some(s.oid)), "int8"),
            array(empty.iter().map(|s| Some(s.tuples)), "float4"),
            array(empty.iter().map(|s| Some(s.pages)), "int4"),
        ),
        Statistics::Analyzed => "ANALYZE".to_owned(),
    };
    run(conn, &sizes).await;
    if !matches!(statistics, Statistics::Analyzed) {
        run(
            conn,
            &format!("DELETE FROM pg_statistic WHERE starelid IN ({OURS})"),
        )
        .await;
    }
    let all = estimated_rows(&explain(conn, "SELECT * FROM events").await);
    let hot = estimated_rows(&explain(conn, "SELECT * FROM events WHERE user_id = 'hot0'").await);
    let known = match statistics {
        Statistics::Analyzed => (hot - 100_000.0).abs() < 30_000.0,
        _ => (hot - (all / 200.0).round()).abs() <= 1.0,
    };
    assert!(
        known,
        "{statistics:?}: the planner estimates {hot} of {all} events for the hot user"
    );
    if !matches!(statistics, Statistics::Analyzed) {
        assert!(
            all > 500_000.0,
            "{statistics:?}: without statistics the planner still sees the table's size: {all}"
        );
    }
    if let Statistics::NeverAnalyzed = statistics {
        // As PostgreSQL has a table it made and never analyzed nor vacuumed.
        run(
            conn,
            "CREATE TEMP TABLE never_analyzed AS SELECT * FROM events LIMIT 1000",
        )
        .await;
        let same: bool = sqlx::query_scalar(
            "SELECT (SELECT (reltuples, relpages) FROM pg_class WHERE oid = 'events'::regclass)
                  = (SELECT (reltuples, relpages) FROM pg_class
                     WHERE oid = 'never_analyzed'::regclass)",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert!(same, "events does not look like a table never analyzed");
        run(conn, "DROP TABLE never_analyzed").await;
    }
}

/// The nodes of `plan` (`EXPLAIN`'s text) that read one of `tables` whole: a sequential scan, or an
/// index scan with no index condition on an index that is not partial (one in `partial`, whose
/// predicate bounds what it holds).
fn whole_reads<'p>(plan: &'p str, tables: &[&str], partial: &[String]) -> Vec<&'p str> {
    let lines: Vec<&str> = plan.lines().collect();
    // A plan node's line, `->  Label`: where its arrow is, and its label.
    fn node(line: &str) -> Option<(usize, &str)> {
        let trimmed = line.trim_start();
        trimmed
            .strip_prefix("->")
            .map(|label| (line.len() - trimmed.len(), label.trim_start()))
    }
    let mut whole = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        let Some((indent, label)) = node(line).or((at == 0).then_some((0, line.trim_start())))
        else {
            continue;
        };
        let word_after = |marker: &str| {
            label
                .split_once(marker)
                .and_then(|(_, rest)| rest.split_whitespace().next())
        };
        let table = word_after(" on ").unwrap_or_default();
        if !tables.contains(&table) {
            continue;
        }
        let details = lines[at + 1..]
            .iter()
            .take_while(|l| node(l).is_none() && l.len() - l.trim_start().len() > indent);
        let sequential = label.starts_with("Seq Scan") || label.starts_with("Parallel Seq Scan");
        let unbounded_index = (label.starts_with("Index Scan") || label.starts_with("Index Only"))
            && !word_after(" using ").is_some_and(|index| partial.iter().any(|p| p == index))
            && !details
                .clone()
                .any(|l| l.trim_start().starts_with("Index Cond:"));
        if sequential || unbounded_index {
            whole.push(label.split("  (").next().unwrap_or(label));
        }
    }
    whole
}

/// The names of the statements `src/store` exports (`pub const *_SQL: &str`), but for
/// `PRUNE_OLD_EVENTS_PLANNING_SQL`, a setting.
fn exported_statements() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store");
    let mut names = Vec::new();
    for file in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("pub const ")
                && let Some((name, _)) = rest.split_once(": &str")
                && name.ends_with("_SQL")
                && name != "PRUNE_OLD_EVENTS_PLANNING_SQL"
            {
                names.push(name.to_owned());
            }
        }
    }
    names
}

/// The planner's row estimate of the top node of `plan`.
fn estimated_rows(plan: &str) -> f64 {
    plan.split(" rows=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no row estimate: {plan}"))
}

/// The large tables `statement` must not read whole.
/// Adds to `failures` the plan of `statement` (its case `case`, planned `when`) if it reads a
/// table it must not read whole.
fn note_whole_reads(
    failures: &mut Vec<String>,
    statement: &Statement,
    case: &str,
    when: &str,
    plan: &str,
    partial: &[String],
) {
    let whole = whole_reads(plan, &forbidden(statement), partial);
    if !whole.is_empty() {
        failures.push(format!(
            "{} ({case}), {when}: reads whole {whole:?}\n{plan}\n",
            statement.sql.0
        ));
    }
}

fn forbidden(statement: &Statement) -> Vec<&'static str> {
    LARGE
        .iter()
        .copied()
        .filter(|t| !statement.scans.contains(t))
        .collect()
}

/// `EXPLAIN` of `sql`, which executes `statement`, in a transaction with what the store runs before
/// it there.
async fn explain_in(conn: &mut PgConnection, statement: &Statement, sql: &str) -> String {
    let Some(planning) = statement.planning else {
        return explain(conn, sql).await;
    };
    run(conn, &format!("BEGIN; {planning}")).await;
    let plan = explain(conn, sql).await;
    run(conn, "ROLLBACK").await;
    plan
}

/// `EXPLAIN` of `sql`, as text.
async fn explain(conn: &mut PgConnection, sql: &str) -> String {
    let rows = sqlx::raw_sql(&format!("EXPLAIN {sql}"))
        .fetch_all(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("EXPLAIN {sql}: {e}"));
    rows.iter()
        .map(|row| row.get::<String, _>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `name=count` figures of each line of `plan` labelled `label` (`Heap Blocks:`,
/// `Buffers:`), summed per line, top line first.
fn figures(plan: &str, label: &str) -> Vec<i64> {
    plan.lines()
        .filter_map(|line| line.trim_start().strip_prefix(label))
        .map(|counts| {
            counts
                .split_whitespace()
                .filter_map(|count| count.split_once('=')?.1.parse::<i64>().ok())
                .sum()
        })
        .collect()
}

/// Runs `sql` (one or more statements, no arguments).
async fn run(conn: &mut PgConnection, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A table's or index's size as the planner's statistics have it (`pg_class`).
#[derive(Debug, sqlx::FromRow)]
struct Size {
    oid: i64,
    name: String,
    /// `r` a table, `i` an index.
    kind: String,
    tuples: f32,
    pages: i32,
}

/// The sizes of the test database's tables and indexes.
async fn sizes(conn: &mut PgConnection) -> Vec<Size> {
    sqlx::query_as(
        "SELECT c.oid::int8 AS oid, c.relname::text AS name, c.relkind::text AS kind,
                c.reltuples AS tuples, c.relpages AS pages
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'i') ORDER BY 2",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap()
}

/// `ids` as a `uuid[]` literal.
fn uuids(ids: &[Uuid]) -> String {
    array(ids.iter().map(Some), "uuid")
}

/// `items` (plain words and numbers; `None` is NULL) as an array literal of `element`s.
fn array<T: std::fmt::Display>(
    items: impl IntoIterator<Item = Option<T>>,
    element: &str,
) -> String {
    let mut text = String::from("'{");
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        match item {
            Some(item) => write!(text, "\"{item}\"").unwrap(),
            None => text.push_str("NULL"),
        }
    }
    format!("{text}}}'::{element}[]")
}

/// The plan check on plans as PostgreSQL prints them: it names a sequential scan and an index read
/// without a condition, and passes a range of an index, a partial index read whole and a scan of a
/// table it was not asked about.
#[test]
fn the_plan_check_names_whole_reads_only() {
    let partial = vec!["outbox_unconfirmed".to_owned()];
    let plan = "Update on events e  (cost=0.00..1.00 rows=0 width=0)
  ->  Hash Join  (cost=0.00..1.00 rows=1 width=10)
        Hash Cond: (e.id = x.id)
        ->  Seq Scan on events e  (cost=0.00..61642.00 rows=1000000 width=6)
        ->  Hash  (cost=0.00..1.00 rows=10 width=16)
              ->  Function Scan on unnest x  (cost=0.00..1.00 rows=10 width=16)
  CTE due
    ->  Index Scan using outbox_unconfirmed on outbox  (cost=0.29..8.30 rows=1 width=6)
  ->  Index Scan using events_user_id_seq_key on events  (cost=0.42..8.44 rows=1 width=6)
        Index Cond: ((user_id = 'hot0'::text) AND (seq > 5))
  ->  Parallel Seq Scan on user_seqs s  (cost=0.00..1.00 rows=1 width=6)
  ->  Index Only Scan Backward using events_pkey on events  (cost=0.42..9.44 rows=1 width=6)
        Filter: (user_id = 'x'::text)";
    assert_eq!(
        whole_reads(plan, &["events", "outbox"], &partial),
        [
            "Seq Scan on events e",
            "Index Only Scan Backward using events_pkey on events"
        ]
    );
    assert_eq!(
        whole_reads(plan, &["user_seqs"], &partial),
        ["Parallel Seq Scan on user_seqs s"]
    );
    let top = "Seq Scan on events  (cost=0.00..61642.00 rows=1000000 width=6)";
    assert_eq!(
        whole_reads(top, &["events"], &partial),
        ["Seq Scan on events"]
    );
}

/// Retention by age when nothing is old yet, as in a deployment's first 30 days: once the retention
/// pass has summarized the BRIN's new block ranges, the age prune reads no page of `events`
/// (before, it read every page written since the last vacuum, every round), and it still finds
/// old events written after the summary.
#[tokio::test]
async fn retention_by_age_reads_no_page_of_recent_events() {
    let (_deployment, store) = crate::common::migrated_store().await;
    let mut conn = store.pool().acquire().await.unwrap();
    // An hour of 100,000 delivered events (about 40 block ranges), never vacuumed.
    run(
        &mut conn,
        "INSERT INTO producers (name, key_hash) VALUES ('load', '\\x00');
         INSERT INTO events (id, producer_id, user_id, seq, event, data, status, attempts,
                             enqueued_at, published_at, delivered_at)
         SELECT gen_random_uuid(), 1, 'u' || i % 1000, i / 1000 + 1, 'push',
                jsonb_build_object('n', i), 'delivered', 1,
                now() - interval '1 hour' + i * interval '36 ms', now(), now()
         FROM generate_series(1, 100000) AS i",
    )
    .await;
    let pages: i64 = sqlx::query_scalar("SELECT pg_relation_size('events') / 8192")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let types = "int4, int8";
    run(
        &mut conn,
        &format!("PREPARE age ({types}) AS {}", store::PRUNE_OLD_EVENTS_SQL),
    )
    .await;
    // The heap pages the age prune reads (in a transaction rolled back: nothing is old anyway).
    async fn heap_pages(conn: &mut PgConnection) -> (i64, String) {
        run(
            conn,
            &format!("BEGIN; {}", store::PRUNE_OLD_EVENTS_PLANNING_SQL),
        )
        .await;
        let plan = explain(conn, "(ANALYZE, BUFFERS) EXECUTE age (30, 10000)").await;
        run(conn, "ROLLBACK").await;
        let read = figures(&plan, "Heap Blocks:").iter().sum();
        (read, plan)
    }
    let (unsummarized, plan) = heap_pages(&mut conn).await;
    assert!(
        unsummarized > pages * 9 / 10,
        "the state: a BRIN without summaries reads the table ({pages} pages):\n{plan}"
    );
    assert!(store.summarize_new_event_ranges().await.unwrap() > 0);
    let (summarized, plan) = heap_pages(&mut conn).await;
    assert_eq!(summarized, 0, "nothing is old, and still:\n{plan}");
    assert_eq!(store.prune_events(30, 0, 10_000).await.unwrap(), 0);

    // Old events written after the summary (a restore, a clock gone back) are still found.
    run(
        &mut conn,
        "INSERT INTO events (id, producer_id, user_id, seq, event, data, status, attempts,
                             enqueued_at)
         SELECT gen_random_uuid(), 1, 'old', i, 'push', '{}', 'delivered', 1,
                now() - interval '31 days'
         FROM generate_series(1, 10) AS i",
    )
    .await;
    assert_eq!(store.prune_events(30, 0, 10_000).await.unwrap(), 10);
    drop(conn);
}

/// Retention by count starts each user where its last batch ended: with the rows that earlier
/// batches deleted still dead (nothing vacuumed), a batch reads a fraction of the table, where the
/// statement before it (planted below) read every page those rows were on. And it never passes
/// an event still in flight: that user's events above it wait for it, while a failed event is
/// passed over and kept.
#[tokio::test]
async fn retention_by_count_reads_no_pruned_rows_and_waits_for_events_in_flight() {
    let (_deployment, store) = crate::common::migrated_store().await;
    let mut conn = store.pool().acquire().await.unwrap();
    // 200 users with 500 delivered events each; u7's 250th still in flight, u8's failed.
    run(
        &mut conn,
        "INSERT INTO producers (name, key_hash) VALUES ('load', '\\x00');
         INSERT INTO events (id, producer_id, user_id, seq, event, data, status, attempts,
                             enqueued_at, published_at, delivered_at)
         SELECT gen_random_uuid(), 1, 'u' || i % 200, i / 200 + 1, 'push',
                jsonb_build_object('n', i), 'delivered', 1, now(), now(), now()
         FROM generate_series(0, 99999) AS i;
         INSERT INTO user_seqs (user_id, last_seq) SELECT 'u' || i, 500 FROM generate_series(0, 199) AS i;
         UPDATE events SET status = 'published', delivered_at = NULL WHERE user_id = 'u7' AND seq = 250;
         UPDATE events SET status = 'failed', failed_at = now(), delivered_at = NULL
         WHERE user_id = 'u8' AND seq = 250",
    )
    .await;
    let prune_all = || async {
        let mut total = 0;
        loop {
            let n = store.prune_events(0, 100, 10_000).await.unwrap();
            total += n;
            if n < 10_000 {
                return total;
            }
        }
    };
    assert_eq!(prune_all().await, 198 * 400 + 249 + 399);
    let watermark = |user: &'static str| {
        let pool = store.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT pruned_through FROM retention_watermarks WHERE user_id = $1",
            )
            .bind(user)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(watermark("u7").await, 249, "up to the event in flight");
    assert_eq!(watermark("u8").await, 400, "past the failed event");
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE user_id = 'u8' AND seq = 250")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(failed, 1, "a failed event is kept");

    // Ten more events each, and a batch's reads with the pruned rows still dead.
    run(
        &mut conn,
        "INSERT INTO events (id, producer_id, user_id, seq, event, data, status, attempts,
                             enqueued_at, published_at, delivered_at)
         SELECT gen_random_uuid(), 1, 'u' || i % 200, 500 + i / 200 + 1, 'push', '{}',
                'delivered', 1, now(), now(), now()
         FROM generate_series(0, 1999) AS i;
         UPDATE user_seqs SET last_seq = 510",
    )
    .await;
    let pages: i64 = sqlx::query_scalar("SELECT pg_relation_size('events') / 8192")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    // The buffers a batch's selection reads (the delete then touches the rows it selected).
    async fn buffers(conn: &mut PgConnection, select: &str) -> (i64, String) {
        let plan = explain(conn, &format!("(ANALYZE, BUFFERS) {select}")).await;
        // The top node's line: the whole statement's.
        let read = figures(&plan, "Buffers:").first().copied().unwrap_or(0);
        (read, plan)
    }
    let select = store::PRUNE_EVENTS_PAST_COUNT_SQL
        .split_once("ANY(ARRAY(")
        .and_then(|(_, rest)| rest.split_once("RETURNING"))
        .map(|(select, _)| select.trim_end().trim_end_matches(')'))
        .expect("the statement deletes the rows of its selection")
        .replace("$1", "100")
        .replace("$2", "10000");
    let (read, plan) = buffers(&mut conn, &select).await;
    // The planted regression: the selection before this one, from each user's lowest seq.
    let planted = "SELECT e.ctid FROM user_seqs s
         CROSS JOIN LATERAL (
             SELECT ctid FROM events
             WHERE user_id = s.user_id AND seq <= s.last_seq - 100 AND status = 'delivered'
             LIMIT 10000) AS e
         WHERE s.last_seq > 100
         LIMIT 10000";
    let (planted_read, planted_plan) = buffers(&mut conn, planted).await;
    eprintln!(
        "a batch of 1,990 rows read {read} buffers; the planted selection {planted_read}; the table has {pages} pages"
    );
    assert!(
        read < pages,
        "a batch read {read} buffers of a {pages}-page table:\n{plan}"
    );
    assert!(
        planted_read > pages * 2,
        "the check would not see the rows read again ({planted_read} buffers of {pages}):\n{planted_plan}"
    );

    // Once u7's event is delivered, its run goes on.
    run(
        &mut conn,
        "UPDATE events SET status = 'delivered', delivered_at = now()
         WHERE user_id = 'u7' AND seq = 250",
    )
    .await;
    assert_eq!(prune_all().await, 198 * 10 + 161 + 10);
    assert_eq!(watermark("u7").await, 410);
    assert_eq!(watermark("u8").await, 410);
    drop(conn);
}
