//! A new operator's first day (issue 22): a healthy start that logs no ERROR or WARN and says what
//! each role serves, `herald check` against a healthy deployment and against each broken one, a
//! listener that cannot bind naming its setting. (`herald demo` handing out the console is
//! tests/js/demo.test.mjs: the demo needs its page's npm packages.)
//! Every node here is the real binary as an operator runs it: its own environment, the default log
//! level.

use crate::common::{DropsDeployment, PATIENCE, amqp_url, herald_command, test_settings};
use herald::config::{Secret, Settings};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::time::timeout;

/// `herald migrate` on `settings`' database.
async fn migrate(settings: &Settings) {
    let out = timeout(PATIENCE, herald_command(settings, &["migrate"]).output())
        .await
        .expect("migrate ends")
        .expect("migrate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `herald check` with `flags`: its exit status and its lines.
async fn check(settings: &Settings, flags: &[&str]) -> (bool, Vec<String>) {
    let out = timeout(
        PATIENCE,
        herald_command(settings, &["check"]).args(flags).output(),
    )
    .await
    .expect("check ends")
    .expect("check runs");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    (out.status.success(), lines)
}

/// The line of check `name` (the first, or the first failed one when it failed).
fn line<'a>(lines: &'a [String], status: &str, name: &str) -> Option<&'a String> {
    lines
        .iter()
        .find(|l| l.starts_with(status) && l[6..].starts_with(name))
}

/// `herald check` on `settings`, which must fail: its FAIL line for check `name`.
async fn failing(settings: &Settings, name: &str) -> String {
    let (passed, lines) = check(settings, &[]).await;
    assert!(!passed, "{lines:#?}");
    line(&lines, "FAIL", name)
        .unwrap_or_else(|| panic!("no failed {name} check: {lines:#?}"))
        .clone()
}

#[tokio::test]
async fn a_fresh_node_logs_no_error_or_warning_and_one_line_per_role() {
    let settings = test_settings();
    let _deployment = DropsDeployment(settings.clone());
    migrate(&settings).await;
    // The default level: no HERALD_LOG, as an operator starts it.
    let mut child = herald_command(&settings, &["serve"])
        .env_remove("HERALD_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("herald starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    let consuming = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.contains("worker: consuming 4 of 4 partitions (0-3)");
            log.push(line);
            if done {
                return;
            }
        }
    };
    let started = timeout(PATIENCE, consuming).await;
    assert!(started.is_ok(), "no worker line: {log:#?}");
    // The sockets' broker link and the publisher settle after the first lines; then a clean stop.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let status = timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            log.push(line);
        }
        child.wait().await.unwrap()
    })
    .await
    .expect("the node stops on SIGTERM");
    assert!(status.success(), "{log:#?}");
    // The one documented warning a healthy node may give: its PostgreSQL runs without autovacuum
    // (this machine's and CI's do), which a production operator should change.
    let store = herald::store::Store::connect(&settings.store)
        .await
        .unwrap();
    let autovacuum_off = store.upkeep_mode().await.unwrap() == herald::store::Upkeep::Herald;
    let documented = |l: &&String| l.contains(" WARN ") && l.contains("autovacuum is off");
    assert_eq!(
        log.iter().filter(documented).count(),
        usize::from(autovacuum_off),
        "{log:#?}"
    );
    let loud: Vec<&String> = log
        .iter()
        .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
        .filter(|l| !documented(l))
        .collect();
    assert!(loud.is_empty(), "a healthy start said: {loud:#?}");
    for what in [
        "herald serving addr=127.0.0.1:",
        "api: events at http://127.0.0.1:",
        "socket: Phoenix Channels at ws://127.0.0.1:",
        "metrics: no StatsD, Prometheus at http://127.0.0.1:",
        "worker: consuming 4 of 4 partitions (0-3)",
    ] {
        assert_eq!(
            log.iter().filter(|l| l.contains(what)).count(),
            1,
            "{what}: {log:#?}"
        );
    }
    assert!(
        !log.iter().any(|l| l.contains("consuming partition ")),
        "one line per partition: {log:#?}"
    );
}

#[tokio::test]
async fn an_upgraded_deployment_has_its_pre_partition_queues_removed_once() {
    let mut settings = test_settings();
    settings.node.roles = "worker".parse().unwrap();
    settings.pubsub.mode = herald::config::PubSubMode::Cluster;
    let _deployment = DropsDeployment(settings.clone());
    migrate(&settings).await;
    let store = herald::store::Store::connect(&settings.store)
        .await
        .unwrap();
    // A deployment that ran the pre-partition pipeline: its step is not taken, and its queues are.
    sqlx::query("DELETE FROM broker_upgrades")
        .execute(store.pool())
        .await
        .unwrap();
    let legacy = format!("{}.events", settings.queue.prefix);
    let connection = herald::queue::connect(&settings.queue, "test")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare(
            legacy.as_str().into(),
            lapin::options::QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let node = crate::common::Node::serve(&settings, &[]).await;
    crate::common::wait_until("the old queue removed", PATIENCE, || async {
        let gone = herald::queue::ready_messages(&connection, &legacy)
            .await
            .unwrap()
            .is_none();
        gone.then_some(())
    })
    .await;
    let done: bool = store
        .upgrade_done(herald::store::PRE_PARTITION_QUEUES_REMOVED)
        .await
        .unwrap();
    assert!(
        done,
        "the removal is recorded, so later starts do not probe"
    );
    drop(node);
}

#[tokio::test]
async fn herald_check_passes_on_a_healthy_deployment_and_names_each_broken_dependency() {
    let settings = test_settings();
    let _deployment = DropsDeployment(settings.clone());
    let mut fixed_port = settings.clone();
    // Port 0 is always free: a fixed port shows the listen check doing something.
    let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
    fixed_port.http.addr = free.local_addr().unwrap();
    drop(free);

    // Migrations behind: the database does not exist yet.
    let (passed, lines) = check(&fixed_port, &[]).await;
    assert!(!passed, "{lines:#?}");
    let postgres = line(&lines, "FAIL", "postgresql").expect("postgresql failed");
    assert!(postgres.contains("herald migrate"), "{postgres}");

    migrate(&settings).await;
    let (passed, lines) = check(&fixed_port, &[]).await;
    assert!(passed, "{lines:#?}");
    for name in [
        "settings",
        "secret",
        "listen",
        "postgresql",
        "migrations",
        "partitions",
        "rabbitmq",
        "permissions",
    ] {
        assert!(line(&lines, "ok", name).is_some(), "{name}: {lines:#?}");
    }
    for name in ["upkeep", "wal"] {
        assert!(
            line(&lines, "ok", name).is_some() || line(&lines, "warn", name).is_some(),
            "{name}: {lines:#?}"
        );
    }
    assert!(lines.last().unwrap().contains("all passed"), "{lines:#?}");

    // The port taken: the line names the setting.
    let taken = TcpListener::bind(fixed_port.http.addr).await.unwrap();
    let listen = failing(&fixed_port, "listen").await;
    assert!(
        listen.contains(&fixed_port.http.addr.to_string()) && listen.contains("HERALD_HTTP_ADDR"),
        "{listen}"
    );
    drop(taken);

    // PostgreSQL down (nothing listens there) and RabbitMQ down.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let mut down = settings.clone();
    down.store.database_url = Secret::new(format!("postgres://postgres@127.0.0.1:{closed}/x"));
    down.queue.amqp_url = Secret::new(format!("amqp://guest:guest@127.0.0.1:{closed}/%2f"));
    let postgres = failing(&down, "postgresql").await;
    assert!(postgres.contains("HERALD_DATABASE_URL"), "{postgres}");
    let rabbit = failing(&down, "rabbitmq").await;
    assert!(
        rabbit.contains(&format!("127.0.0.1:{closed}")) && rabbit.contains("HERALD_AMQP_URL"),
        "{rabbit}"
    );

    // A weak secret, and none at all without --dev.
    let mut weak = settings.clone();
    weak.socket.secret = Some(Secret::new("change-me"));
    let refused = failing(&weak, "settings").await;
    assert!(refused.contains("HERALD_SECRET"), "{refused}");
    let mut none = settings.clone();
    none.socket.secret = None;
    let (passed, lines) = check(&none, &[]).await;
    assert!(!passed);
    assert!(line(&lines, "FAIL", "secret").is_some(), "{lines:#?}");
    let (passed, lines) = check(&none, &["--dev"]).await;
    assert!(passed, "{lines:#?}");
    assert!(line(&lines, "warn", "secret").is_some(), "{lines:#?}");

    // A broker user without permission on the deployment's names.
    let user = format!("herald_check_{}", std::process::id());
    let rabbitmqctl = |args: Vec<String>| async move {
        let out = tokio::process::Command::new("rabbitmqctl")
            .args(&args)
            .output()
            .await
            .expect("rabbitmqctl runs");
        assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
    };
    rabbitmqctl(vec!["add_user".into(), user.clone(), "pw".into()]).await;
    rabbitmqctl(vec![
        "set_permissions".into(),
        "-p".into(),
        "/".into(),
        user.clone(),
        "^elsewhere\\..*".into(),
        ".*".into(),
        ".*".into(),
    ])
    .await;
    let mut refused = settings.clone();
    let base = amqp_url();
    refused.queue.amqp_url = Secret::new(base.replacen("guest:guest", &format!("{user}:pw"), 1));
    let (passed, lines) = check(&refused, &[]).await;
    rabbitmqctl(vec!["delete_user".into(), user.clone()]).await;
    assert!(!passed);
    let permissions = line(&lines, "FAIL", "permissions").expect("permissions failed");
    assert!(
        permissions.contains("configure") && permissions.contains("set_permissions"),
        "{permissions}"
    );
    // Migrations behind (one not applied) and ahead (one this binary does not know).
    let store = herald::store::Store::connect(&settings.store)
        .await
        .unwrap();
    let last: i64 = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations")
        .fetch_one(store.pool())
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         SELECT 99990101000001, 'from a newer herald', true, checksum, 0
         FROM _sqlx_migrations WHERE version = $1",
    )
    .bind(last)
    .execute(store.pool())
    .await
    .unwrap();
    let migrations = failing(&settings, "migrations").await;
    assert!(migrations.contains("newer herald"), "{migrations}");
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version IN (99990101000001, $1)")
        .bind(last)
        .execute(store.pool())
        .await
        .unwrap();
    let migrations = failing(&settings, "migrations").await;
    assert!(
        migrations.contains("1 of") && migrations.contains("herald migrate"),
        "{migrations}"
    );
}

#[tokio::test]
async fn herald_check_running_asks_the_node_for_readiness() {
    let app = crate::common::spawn_app().await;
    let mut running = app.settings.clone();
    running.http.addr = app.addr;
    let (passed, lines) = check(&running, &["--running"]).await;
    assert!(passed, "{lines:#?}");
    assert!(line(&lines, "ok", "serving").is_some(), "{lines:#?}");
    let mut nobody = running.clone();
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    nobody.http.addr = closed.local_addr().unwrap();
    drop(closed);
    let (passed, lines) = check(&nobody, &["--running"]).await;
    assert!(!passed);
    assert!(line(&lines, "FAIL", "serving").is_some(), "{lines:#?}");
}

#[tokio::test]
async fn a_listener_that_cannot_bind_names_its_setting_in_one_line() {
    let settings = test_settings();
    let _deployment = DropsDeployment(settings.clone());
    migrate(&settings).await;
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    for (setting, variable) in [
        ("http", "HERALD_HTTP_ADDR"),
        ("prometheus", "HERALD_METRICS__PROMETHEUS_ADDR"),
    ] {
        let mut clash = settings.clone();
        match setting {
            "http" => clash.http.addr = addr,
            _ => clash.metrics.prometheus_addr = addr.to_string(),
        }
        let out = timeout(PATIENCE, herald_command(&clash, &["serve"]).output())
            .await
            .expect("serve ends")
            .expect("serve runs");
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let error: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(error.len(), 1, "{stderr}");
        assert!(
            error[0].contains(&addr.to_string()) && error[0].contains(variable),
            "{setting}: {stderr}"
        );
    }
}

/// A column of `table`'s row in `pg_stat_user_tables` (when it was last analyzed, vacuumed...),
/// as text; `None` for never.
async fn table_stat(
    store: &herald::store::Store,
    column: &'static str,
    table: &'static str,
) -> Option<String> {
    sqlx::query_scalar(&format!(
        "SELECT {column}::text FROM pg_stat_user_tables WHERE relname = $1"
    ))
    .bind(table)
    .fetch_one(store.pool())
    .await
    .unwrap()
}

/// The upkeep vacuums `events` when retention has left enough dead rows in it, not only every
/// tenth round: until a vacuum their space is not used again, and the table grows by them.
#[tokio::test]
async fn upkeep_vacuums_events_once_its_dead_rows_call_for_it() {
    let (_deployment, store) = crate::common::migrated_store().await;
    let vacuumed = || table_stat(&store, "last_vacuum", "events");
    sqlx::raw_sql(
        "INSERT INTO producers (name, key_hash) VALUES ('load', '\\x00');
         INSERT INTO events (id, producer_id, user_id, seq, event, data, status, attempts,
                             enqueued_at, delivered_at)
         SELECT gen_random_uuid(), 1, 'u' || i % 100, i / 100 + 1, 'push', '{}', 'delivered', 1,
                now(), now()
         FROM generate_series(0, 29999) AS i",
    )
    .execute(store.pool())
    .await
    .unwrap();
    assert!(store.upkeep(false).await.unwrap());
    assert_eq!(
        vacuumed().await,
        None,
        "no dead rows yet, and still vacuumed"
    );

    sqlx::query("DELETE FROM events WHERE seq <= 200")
        .execute(store.pool())
        .await
        .unwrap();
    crate::common::wait_until("the deleted rows counted dead", PATIENCE, || async {
        let dead: i64 = sqlx::query_scalar(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'events'",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        (dead >= 20_000).then_some(())
    })
    .await;
    assert!(store.upkeep(false).await.unwrap());
    assert!(vacuumed().await.is_some(), "20,000 dead rows of 30,000");
}

/// PostgreSQL without autovacuum (this machine's, CI's) must not leave Herald's tables without
/// statistics or their dead rows piling up in silence: `herald migrate` analyzes what it made, a
/// node says in /readyz who looks after the tables, and where autovacuum is off an api node
/// vacuums and analyzes them itself.
#[tokio::test]
async fn herald_keeps_its_tables_analyzed_and_vacuumed_when_autovacuum_is_off() {
    let settings = test_settings();
    let _deployment = DropsDeployment(settings.clone());
    migrate(&settings).await;
    let store = herald::store::Store::connect(&settings.store)
        .await
        .unwrap();
    let stat = |column: &'static str, table: &'static str| table_stat(&store, column, table);
    crate::common::wait_until("migrate's ANALYZE", PATIENCE, || {
        stat("last_analyze", "events")
    })
    .await;
    // Autovacuum, where it runs, is tuned to each table's churn.
    let outbox: Vec<String> =
        sqlx::query_scalar("SELECT unnest(reloptions) FROM pg_class WHERE relname = 'outbox'")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert!(
        outbox.contains(&"autovacuum_vacuum_threshold=10000".to_owned()),
        "{outbox:?}"
    );
    let events: Vec<String> =
        sqlx::query_scalar("SELECT unnest(reloptions) FROM pg_class WHERE relname = 'events'")
            .fetch_all(store.pool())
            .await
            .unwrap();
    for option in [
        "autovacuum_vacuum_scale_factor=0.05",
        "autovacuum_vacuum_cost_limit=2000",
    ] {
        assert!(events.contains(&option.to_owned()), "{events:?}");
    }
    let mode = store.upkeep_mode().await.unwrap();
    let app = crate::common::spawn_app_with(|s| {
        s.store.database_url = settings.store.database_url.clone();
        s.queue.prefix = settings.queue.prefix.clone();
        s.store.upkeep_interval_secs = 1;
    })
    .await;
    let (_, ready) = app.readyz().await;
    let keeper = herald::pipeline::upkeep::Keeper::of(mode, 1);
    assert_eq!(ready["postgres_upkeep"], keeper.as_str(), "{ready}");
    if mode == herald::store::Upkeep::Herald {
        for table in ["outbox", "user_seqs"] {
            crate::common::wait_until(&format!("Herald's VACUUM of {table}"), PATIENCE, || {
                stat("last_vacuum", table)
            })
            .await;
        }
    }
}

/// `herald check`'s `wal` line reads the server's own checkpoint counters (a requested checkpoint
/// counts), and warns only once requested checkpoints outnumber timed ones.
#[tokio::test]
async fn the_wal_check_counts_the_servers_checkpoints() {
    let (_deployment, store) = crate::common::migrated_store().await;
    let before = store.checkpoints().await.unwrap();
    assert!(!before.max_wal_size.is_empty() && !before.wal_compression.is_empty());
    sqlx::query("CHECKPOINT")
        .execute(store.pool())
        .await
        .unwrap();
    let after = crate::common::wait_until("the CHECKPOINT counted", PATIENCE, || {
        let store = store.clone();
        let before = before.requested;
        async move {
            let now = store.checkpoints().await.unwrap();
            (now.requested > before).then_some(now)
        }
    })
    .await;
    assert!(after.timed >= before.timed, "{before:?} -> {after:?}");

    let split = |timed, requested| herald::store::Checkpoints {
        timed,
        requested,
        ..after.clone()
    };
    assert!(split(2, 83).mostly_requested());
    assert!(!split(80, 20).mostly_requested());
    // Too few to tell: a fresh server's first CREATE DATABASE.
    assert!(!split(0, 3).mostly_requested());
}
