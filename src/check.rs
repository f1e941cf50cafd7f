//! `herald check`: loads the settings as `serve` would and checks, one line each, every dependency
//! the node's roles need, saying what to do about each failure. Exits non-zero on any. Before a
//! start (a systemd `ExecStartPre`, a deploy script) it checks that the listen addresses are free;
//! with `--running` (a container healthcheck) that the node on them answers `/readyz`.

use herald::app::Listener;
use herald::config::Settings;
use herald::errors::one_line;
use herald::pipeline::upkeep::Keeper;
use herald::queue::{self, selfcheck};
use herald::store::{Checkpoints, Layout, MigrationState, Store};
use sqlx::Connection;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Tallies the checks and prints each as it is made.
#[derive(Default)]
struct Report {
    failed: usize,
    total: usize,
}

impl Report {
    fn ok(&mut self, name: &str, text: impl AsRef<str>) {
        self.total += 1;
        println!("ok    {name:<12} {}", text.as_ref());
    }

    fn warn(&mut self, name: &str, text: impl AsRef<str>) {
        self.total += 1;
        println!("warn  {name:<12} {}", text.as_ref());
    }

    fn fail(&mut self, name: &str, text: impl AsRef<str>) {
        self.total += 1;
        self.failed += 1;
        println!("FAIL  {name:<12} {}", text.as_ref());
    }

    fn skip(&mut self, name: &str, why: &str) {
        println!("skip  {name:<12} {why}");
    }
}

/// A settings file or variable that does not load: the one check there is, failed.
pub fn settings_failed(error: &anyhow::Error) -> anyhow::Result<()> {
    let mut report = Report::default();
    report.fail("settings", one_line(error.as_ref()));
    finish(&report)
}

/// Runs every check for the node `settings` describe; `running`: the node is up (healthcheck).
pub async fn run(settings: &Settings, running: bool) -> anyhow::Result<()> {
    let mut report = Report::default();
    let roles = settings.node.roles;
    report.ok(
        "settings",
        format!(
            "roles {}; pubsub {}; {} partitions; queue prefix {}",
            roles.names(),
            if settings.cluster() {
                "cluster"
            } else {
                "local"
            },
            settings.queue.partitions,
            settings.queue.prefix
        ),
    );
    check_secret(settings, &mut report);
    match running {
        false => check_listeners_free(settings, &mut report).await,
        true => check_serving(settings, &mut report).await,
    }
    match connect_store(settings, &mut report).await {
        Some(store) => {
            check_migrations(&store, &mut report).await;
            check_upkeep(settings, &store, &mut report).await;
            check_wal(&store, &mut report).await;
            if roles.api || roles.worker {
                check_partitions(settings, &store, &mut report).await;
            }
            if settings.cluster() && (roles.worker || roles.socket) {
                check_buckets(settings, &store, &mut report).await;
            }
            store.close().await;
        }
        None => {
            report.skip("migrations", "PostgreSQL cannot be reached");
        }
    }
    if roles.api || roles.worker || (roles.socket && settings.cluster()) {
        check_broker(settings, running, &mut report).await;
    }
    check_statsd(settings, &mut report).await;
    finish(&report)
}

fn finish(report: &Report) -> anyhow::Result<()> {
    match report.failed {
        0 => {
            println!("herald check: {} checks, all passed", report.total);
            Ok(())
        }
        n => {
            println!("herald check: {n} of {} checks failed", report.total);
            std::process::exit(1)
        }
    }
}

fn check_secret(settings: &Settings, report: &mut Report) {
    match (settings.signing_secret(), &settings.socket.secret) {
        (Ok(_), Some(secret)) => report.ok(
            "secret",
            format!("HERALD_SECRET is set ({} bytes)", secret.expose().len()),
        ),
        (Ok(_), None) => report.warn(
            "secret",
            "a development node: HERALD_SECRET is not set and socket tokens are signed with the \
             public development secret; never in production (`herald secret` prints one)",
        ),
        (Err(error), _) => report.fail("secret", error.to_string()),
    }
}

/// The addresses `serve` would bind, with the listener of each.
fn listeners(settings: &Settings) -> Vec<(Listener, SocketAddr)> {
    let mut all = vec![(Listener::Http, settings.http.addr)];
    if let Some(addr) = settings.prometheus_addr() {
        all.push((Listener::Prometheus, addr));
    }
    all
}

async fn check_listeners_free(settings: &Settings, report: &mut Report) {
    for (listener, addr) in listeners(settings) {
        if addr.port() == 0 {
            report.ok(
                "listen",
                format!("{addr} ({}): port 0, the OS picks one", listener.serves()),
            );
            continue;
        }
        // The same bind `serve` makes, so its error is the one `serve` would give.
        match listener.bind(addr).await {
            Ok(_) => report.ok(
                "listen",
                format!("{addr} is free for {}", listener.serves()),
            ),
            Err(error) => report.fail("listen", error.to_string()),
        }
    }
}

/// A running node answers `GET /readyz` with 200 on its HTTP address.
async fn check_serving(settings: &Settings, report: &mut Report) {
    let addr = reachable(settings.http.addr);
    match get_status(addr, "/readyz").await {
        Ok((200, _)) => report.ok("serving", format!("http://{addr}/readyz answers 200: ready")),
        Ok((status, body)) => report.fail(
            "serving",
            format!("http://{addr}/readyz answers {status}: {}", body.trim()),
        ),
        Err(error) => report.fail(
            "serving",
            format!(
                "no answer from http://{addr}/readyz ({error}); is the node running, on {} (HERALD_HTTP_ADDR)?",
                settings.http.addr
            ),
        ),
    }
}

/// Where to reach a node listening on `addr` from this host: the loopback for an unspecified IP.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// A bare HTTP/1.1 GET: the status and the body's first kilobytes.
async fn get_status(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.take(16 * 1024).read_to_end(&mut answer).await?;
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("not an HTTP answer"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| std::io::Error::other("timed out after 5 s"))?
}

/// `host:port/database` of a PostgreSQL URL, without its credentials.
fn database_label(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.split('?').next().unwrap_or(rest);
    rest.rsplit_once('@').map_or(rest, |(_, r)| r).to_owned()
}

async fn connect_store(settings: &Settings, report: &mut Report) -> Option<Store> {
    let label = database_label(settings.store.database_url.expose());
    // One plain connection first: a pool that cannot connect says only that it timed out.
    let url = settings.store.database_url.expose();
    let limit = settings.store.acquire_timeout();
    let tried = match tokio::time::timeout(limit, sqlx::PgConnection::connect(url)).await {
        Ok(Ok(connection)) => {
            let _ = connection.close().await;
            Store::connect_sized(&settings.store, 1)
                .await
                .map_err(|e| one_line(&e))
        }
        Ok(Err(error)) => Err(one_line(&error)),
        Err(_) => Err(format!("no answer within {} ms", limit.as_millis())),
    };
    let store = match tried {
        Ok(store) => store,
        Err(error) => {
            let missing = error.contains("does not exist");
            let what = match missing {
                true => "run `herald migrate`, which creates it",
                false => "start PostgreSQL, or set HERALD_DATABASE_URL to where it runs",
            };
            report.fail("postgresql", format!("{label}: {error}; {what}"));
            return None;
        }
    };
    let version: Result<String, _> = sqlx::query_scalar("SHOW server_version")
        .fetch_one(store.pool())
        .await;
    match version {
        Ok(version) => report.ok(
            "postgresql",
            format!("{label} answers (PostgreSQL {version})"),
        ),
        Err(error) => {
            report.fail("postgresql", format!("{label}: {error}"));
            return None;
        }
    }
    Some(store)
}

async fn check_migrations(store: &Store, report: &mut Report) {
    match store.migration_state().await {
        Ok(state) if state.is_current() => report.ok(
            "migrations",
            format!(
                "{} of {} applied, as this binary expects",
                state.known, state.known
            ),
        ),
        Ok(state) => report.fail("migrations", migration_problem(&state)),
        Err(error) => report.fail("migrations", one_line(&error)),
    }
}

fn migration_problem(state: &MigrationState) -> String {
    if !state.unknown.is_empty() {
        return format!(
            "the database has {} migration(s) this binary does not know ({:?}): a newer herald \
             migrated it; run that version or newer",
            state.unknown.len(),
            state.unknown
        );
    }
    if !state.altered.is_empty() {
        return format!(
            "migration(s) {:?} were applied with other contents or failed half-way: the database \
             was migrated by another build; repair it before serving",
            state.altered
        );
    }
    format!(
        "{} of {} migrations not applied (from version {}): run `herald migrate`",
        state.missing.len(),
        state.known,
        state.missing[0]
    )
}

/// Who looks after the tables: PostgreSQL's autovacuum, or (a warning) Herald's own upkeep.
async fn check_upkeep(settings: &Settings, store: &Store, report: &mut Report) {
    match store.upkeep_mode().await {
        Ok(mode) => match Keeper::of(mode, settings.store.upkeep_interval_secs).warning() {
            None => report.ok("upkeep", "PostgreSQL's autovacuum is on"),
            Some(warning) => report.warn("upkeep", warning),
        },
        Err(error) => report.fail("upkeep", one_line(&error)),
    }
}

/// Whether checkpoints come on time or are forced: a warning, since only the operator knows whether
/// something else requests them (a `CREATE DATABASE`, a base backup).
async fn check_wal(store: &Store, report: &mut Report) {
    let checkpoints = match store.checkpoints().await {
        Ok(checkpoints) => checkpoints,
        Err(error) => return report.warn("wal", one_line(&error)),
    };
    let Checkpoints {
        timed,
        requested,
        since,
        max_wal_size,
        wal_compression,
    } = &checkpoints;
    let since = since
        .as_deref()
        .map_or_else(String::new, |since| format!(" since {since} UTC"));
    let counts = format!(
        "{requested} of {} checkpoints{since} requested",
        timed + requested
    );
    if checkpoints.mostly_requested() {
        report.warn(
            "wal",
            format!(
                "{counts}, not timed: at max_wal_size {max_wal_size} the WAL's volume (or \
                 commands such as CREATE DATABASE) forces them, and each forced checkpoint makes \
                 retention's next deletes write whole pages to the WAL; raise max_wal_size \
                 (wal_compression is {wal_compression}; README, \"PostgreSQL settings\")"
            ),
        );
    } else {
        report.ok(
            "wal",
            format!("{counts}; max_wal_size {max_wal_size}, wal_compression {wal_compression}"),
        );
    }
}

async fn check_partitions(settings: &Settings, store: &Store, report: &mut Report) {
    let wanted = settings.queue.partitions;
    match store.partition_layout(wanted).await {
        Ok(Layout::Same) => report.ok(
            "partitions",
            format!("{wanted}, as the deployment runs"),
        ),
        Ok(Layout::Fresh) => report.ok(
            "partitions",
            format!("{wanted}: a new deployment, set by the first node to start"),
        ),
        Ok(Layout::Changed { running }) => report.warn(
            "partitions",
            format!(
                "queue.partitions is {wanted} but the deployment runs {running}: a node starts \
                 only once the old partitions are empty and no worker runs the old count (README, \
                 \"Changing the partition count\"); otherwise set HERALD_QUEUE__PARTITIONS={running}"
            ),
        ),
        Err(error) => report.fail("partitions", one_line(&error)),
    }
}

async fn check_buckets(settings: &Settings, store: &Store, report: &mut Report) {
    let wanted = settings.pubsub.buckets;
    match store.recorded_deployment_setting("pubsub.buckets").await {
        Ok(None) => report.ok(
            "buckets",
            format!("{wanted}: a new deployment, set by the first node to start"),
        ),
        Ok(Some(running)) if running == i64::from(wanted) => {
            report.ok("buckets", format!("{wanted}, as the deployment routes"));
        }
        Ok(Some(running)) => report.fail(
            "buckets",
            format!(
                "pubsub.buckets is {wanted} but the deployment routes broadcasts by {running}: \
                 set HERALD_PUBSUB__BUCKETS={running} (README, \"One box or many\")"
            ),
        ),
        Err(error) => report.warn("buckets", one_line(&error)),
    }
}

/// Each listed node, then (before a start) the vhost permissions: a healthcheck repeating every
/// few seconds declares no scratch queues, and a running node's /readyz reports its own links.
async fn check_broker(settings: &Settings, running: bool, report: &mut Report) {
    let queue = &settings.queue;
    let urls = match queue::nodes::parse_node_list(queue.amqp_url.expose()) {
        Ok(urls) => urls,
        Err(why) => return report.fail("rabbitmq", format!("queue.amqp_url: {why}")),
    };
    let mut reachable = None;
    for url in &urls {
        let node = queue::nodes::label(url);
        match selfcheck::connect_node(url, queue).await {
            Ok(connection) => {
                report.ok("rabbitmq", format!("{node} answers"));
                if reachable.is_none() {
                    reachable = Some(connection);
                } else {
                    let _ = connection.close(200, "check done".into()).await;
                }
            }
            Err(error) => report.fail(
                "rabbitmq",
                format!(
                    "{node}: {}; start RabbitMQ there, or fix HERALD_AMQP_URL (user, \
                     password, vhost)",
                    one_line(&error)
                ),
            ),
        }
    }
    let Some(connection) = reachable else {
        return report.skip("permissions", "no RabbitMQ node can be reached");
    };
    if running {
        let _ = connection.close(200, "check done".into()).await;
        return report.skip(
            "permissions",
            "checked before a start (herald check without --running)",
        );
    }
    match selfcheck::check_permissions(&connection, &queue.prefix).await {
        Ok(()) => report.ok(
            "permissions",
            format!(
                "configure, write and read on names under {}. on the vhost",
                queue.prefix
            ),
        ),
        Err(error) => report.fail(
            "permissions",
            format!(
                "{}; grant the user configure, write and read on '^{}\\..*' for the vhost \
                 (rabbitmqctl set_permissions -p <vhost> <user> '^{prefix}\\..*' '^{prefix}\\..*' '^{prefix}\\..*')",
                one_line(&error),
                queue.prefix,
                prefix = queue.prefix
            ),
        ),
    }
    let _ = connection.close(200, "check done".into()).await;
}

async fn check_statsd(settings: &Settings, report: &mut Report) {
    let addr = settings.metrics.statsd_addr.as_str();
    if addr.is_empty() {
        return report.skip("statsd", "metrics.statsd_addr is empty: no StatsD");
    }
    let resolved = tokio::net::lookup_host(addr)
        .await
        .map(|mut found| found.next().is_some());
    match resolved {
        Ok(true) => report.ok(
            "statsd",
            format!("{addr} resolves (UDP: nothing acknowledges a metric)"),
        ),
        Ok(_) | Err(_) => report.fail(
            "statsd",
            format!(
                "{addr} does not resolve: fix HERALD_STATSD_ADDR, or set it empty for no StatsD"
            ),
        ),
    }
}
