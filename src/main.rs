//! The `herald` binary: parses the command line, starts tracing, loads `Settings`, and runs the
//! subcommand. `anyhow` lives here only.

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use herald::App;
use herald::config::Settings;
use herald::event::UserId;
use herald::store::Store;
use herald::token::{TokenSigner, now_unix_secs};
use tokio_util::sync::CancellationToken;

mod check;
mod replay;

/// mimalloc rather than glibc's malloc: a node allocates and frees small buffers across threads
/// all day (a push's frame on a worker thread, freed after the socket's write on another), where
/// glibc's arenas spent 10-15% of the node's CPU in `_int_malloc`, `unlink_chunk` and
/// `malloc_consolidate` (perf, BENCHMARKS.md *The allocator*).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Herald: durable real-time notification delivery (HTTP API -> PostgreSQL -> RabbitMQ -> Phoenix
/// Channels).
#[derive(Parser)]
#[command(name = "herald", version)]
struct Cli {
    /// A TOML settings file (environment variables override it).
    #[arg(long, global = true, env = "HERALD_CONFIG")]
    config: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node: HTTP API and WebSockets, outbox relay, worker pool.
    Serve {
        /// Roles to run, comma-separated (api, worker, socket); overrides HERALD_NODE__ROLES. A node
        /// without every role needs HERALD_PUBSUB__MODE=cluster.
        #[arg(long)]
        roles: Option<String>,
        /// A development node: without HERALD_SECRET, sign socket tokens with the public
        /// development key (anyone can forge them) instead of refusing to start.
        #[arg(long)]
        dev: bool,
    },
    /// Check, one line each, what this node's roles need (settings, secret, listen addresses,
    /// PostgreSQL and migrations, partition count, each RabbitMQ node and the vhost permissions,
    /// StatsD), loading the settings as `serve` would; exits non-zero if any check fails.
    Check {
        /// Roles to check for, as `serve --roles`.
        #[arg(long)]
        roles: Option<String>,
        /// As `serve --dev`: a missing HERALD_SECRET is only a warning.
        #[arg(long)]
        dev: bool,
        /// The node is running (a container healthcheck): instead of the listen addresses being
        /// free, check that the node on them answers /readyz.
        #[arg(long)]
        running: bool,
    },
    /// Create the database if it is missing and apply the migrations.
    Migrate,
    /// Manage producers and their API keys.
    Producers {
        #[command(subcommand)]
        command: ProducersCommand,
    },
    /// Print a signed socket token for a user.
    Token {
        /// The user id.
        user_id: String,
        /// Lifetime in seconds (default: socket.token_ttl_secs).
        #[arg(long)]
        ttl_secs: Option<u64>,
        /// Without HERALD_SECRET, sign with the public development key (for a `serve --dev` node).
        #[arg(long)]
        dev: bool,
    },
    /// Print a fresh random secret for HERALD_SECRET (32 random bytes, base64url).
    Secret,
    /// Print a fresh VAPID key pair for Web Push: the private key for
    /// HERALD_WEBPUSH__VAPID_PRIVATE_KEY, the public key pages subscribe with.
    VapidKey,
    /// First run: migrate, create (or re-key) the `demo` producer, print how to connect, and serve
    /// with the demo page on /demo.
    Demo,
    /// Replay events through delivery again (by default: failed ones). Safe to repeat: an event
    /// already delivered is replayed only with --include-delivered.
    Replay(replay::ReplayArgs),
    /// Delete this deployment's RabbitMQ queues and exchanges (HERALD_QUEUE__PREFIX) and drop its
    /// database. For tests and throwaway environments.
    Destroy {
        /// Required: nothing is deleted without it.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum ProducersCommand {
    /// Create a producer and print its API key (shown once; only its hash is stored).
    Add {
        /// A unique name, e.g. billing.
        name: String,
        /// Give it the admin role: its key may use the admin API (list, inspect and replay every
        /// producer's events).
        #[arg(long)]
        admin: bool,
    },
    /// Grant or revoke the admin role of an existing producer.
    SetAdmin {
        /// The producer.
        name: String,
        /// Revoke instead of grant.
        #[arg(long)]
        revoke: bool,
    },
    /// Give a producer a new API key (the old one stops working within 30 s).
    RotateKey {
        /// The producer.
        name: String,
    },
    /// List producers.
    List,
}

fn settings_help() -> String {
    let mut text = String::from("Settings (environment variables; defaults in brackets):\n");
    for (var, default) in Settings::env_help() {
        text.push_str(&format!("  {var} [{default}]\n"));
    }
    text.push_str("  HERALD_LOG [info]  log filter (tracing EnvFilter syntax)\n");
    text
}

/// `default` is the filter without HERALD_LOG.
fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Logs go to stderr, so a command's output (an API key, a token) stays clean on stdout.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        // When stderr is gone (its reader died), tracing-subscriber reports a failed write with
        // `eprintln!`, which panics: every task that logs would die with it, the signal handler
        // first. A lost log line must cost only that line.
        .log_internal_errors(false)
        .init();
}

/// Runs the command; an error is printed on one line (its causes joined by `: `), so a log shows
/// what failed and why together.
#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", herald::errors::one_line(error.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let help = settings_help();
    let command = Cli::command().mut_subcommand("serve", |c| c.after_help(help.clone()));
    let command = command.mut_subcommand("check", |c| c.after_help(help.clone()));
    let command = command.mut_subcommand("demo", |c| c.after_help(help));
    let cli = Cli::from_arg_matches(&command.get_matches())?;
    // `check` prints its own findings; lapin would log each refused probe as an ERROR.
    init_tracing(match cli.command {
        Command::Check { .. } => "error,lapin=off",
        _ => "info,sqlx=warn,lapin=warn",
    });
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    if let Command::Serve {
        roles: Some(roles), ..
    }
    | Command::Check {
        roles: Some(roles), ..
    } = &cli.command
    {
        env.push(("HERALD_NODE__ROLES".into(), roles.clone()));
    }
    if let Command::Serve { dev: true, .. }
    | Command::Token { dev: true, .. }
    | Command::Check { dev: true, .. } = &cli.command
    {
        env.push(("HERALD_NODE__DEV".into(), "true".into()));
    }
    if let Command::Secret = cli.command {
        // Needs no settings: it is how a first deployment gets its HERALD_SECRET.
        return secret();
    }
    if let Command::VapidKey = cli.command {
        return vapid_key();
    }
    let loaded = Settings::load(cli.config.as_deref(), env).context("cannot load settings");
    if let Command::Check { .. } = cli.command
        && let Err(error) = &loaded
    {
        return check::settings_failed(error);
    }
    let settings = loaded?;
    match cli.command {
        Command::Serve { .. } => serve(settings).await,
        Command::Check { running, .. } => check::run(&settings, running).await,
        Command::Migrate => migrate(&settings).await.map(|_| ()),
        Command::Producers { command } => producers(&settings, command).await,
        Command::Token {
            user_id, ttl_secs, ..
        } => token(&settings, &user_id, ttl_secs),
        Command::Secret => secret(),
        Command::VapidKey => vapid_key(),
        Command::Demo => demo(settings).await,
        Command::Destroy { yes } => destroy(&settings, yes).await,
        Command::Replay(args) => replay::run(settings, args).await,
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    tracing::debug!(settings = ?settings, "effective settings");
    let app = App::build(settings).await.context("cannot start herald")?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    app.run(shutdown).await.context("herald failed")
}

/// Cancels `shutdown` on SIGTERM or ctrl-c.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("signal received: shutting down");
    shutdown.cancel();
}

async fn migrate(settings: &Settings) -> anyhow::Result<Store> {
    if Store::create_database_if_missing(&settings.store)
        .await
        .context("cannot create the database")?
    {
        tracing::info!("created the database");
    }
    let store = Store::connect(&settings.store).await?;
    store.migrate().await?;
    tracing::info!("migrations applied");
    Ok(store)
}

async fn producers(settings: &Settings, command: ProducersCommand) -> anyhow::Result<()> {
    let store = Store::connect(&settings.store).await?;
    match command {
        ProducersCommand::Add { name, admin } => {
            let (producer, key) = store.create_producer(&name).await?;
            if admin {
                store.set_producer_admin(&name, true).await?;
            }
            println!(
                "producer {} created{}; its API key (shown once):",
                producer.name,
                if admin { " with the admin role" } else { "" }
            );
            println!("{}", key.expose());
        }
        ProducersCommand::RotateKey { name } => {
            let (producer, key) = store
                .rotate_producer_key(&name)
                .await?
                .with_context(|| format!("no producer named {name}"))?;
            println!("new API key of {} (shown once):", producer.name);
            println!("{}", key.expose());
        }
        ProducersCommand::SetAdmin { name, revoke } => {
            store
                .set_producer_admin(&name, !revoke)
                .await?
                .with_context(|| format!("no producer named {name}"))?;
            let what = if revoke { "no longer has" } else { "now has" };
            println!("{name} {what} the admin role");
        }
        ProducersCommand::List => {
            for (producer, admin) in store.list_producer_roles().await? {
                match admin {
                    true => println!("{} (admin)", producer.name),
                    false => println!("{}", producer.name),
                }
            }
        }
    }
    Ok(())
}

/// A fresh key for the demo's producer `name` (created on the first demo), with the admin role or
/// without: each demo start re-keys it, so a key printed once never outlives its demo.
/// The demo's Web Push: unless configured, a VAPID key made for this run (a browser subscribed in
/// an earlier run must subscribe again) and a fallback for the page's `push_timed` events.
fn demo_webpush(settings: &mut Settings) {
    let webpush = &mut settings.webpush;
    if webpush.vapid_private_key.is_none() {
        let key = herald::webpush::VapidKey::generate();
        webpush.vapid_private_key = Some(herald::config::Secret::new(key.private_base64()));
        eprintln!(
            "warning: Web Push uses a VAPID key made for this demo run; set \
             HERALD_WEBPUSH__VAPID_PRIVATE_KEY (`herald vapid-key`) to keep subscriptions across runs"
        );
    }
    if webpush.subject.is_empty() {
        webpush.subject = "mailto:demo@localhost".into();
    }
    if webpush.events.is_empty() {
        let fallback = herald::config::EventWebPushSettings {
            after_ms: 5_000,
            ..Default::default()
        };
        webpush.events.insert("push_timed".into(), fallback);
    }
}

async fn demo_key(store: &Store, name: &str, admin: bool) -> anyhow::Result<herald::store::ApiKey> {
    let (_, key) = match store.rotate_producer_key(name).await? {
        Some(rekeyed) => rekeyed,
        None => store.create_producer(name).await?,
    };
    store.set_producer_admin(name, admin).await?;
    Ok(key)
}

fn signer(settings: &Settings) -> anyhow::Result<TokenSigner> {
    let secret = settings.signing_secret()?;
    if settings.socket.secret.is_none() {
        eprintln!("warning: HERALD_SECRET is not set; signing with the public development secret");
    }
    Ok(TokenSigner::new(secret))
}

fn secret() -> anyhow::Result<()> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).context("the OS random source is unavailable")?;
    println!(
        "{}",
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes)
    );
    Ok(())
}

fn vapid_key() -> anyhow::Result<()> {
    let key = herald::webpush::VapidKey::generate();
    // One write, so `| head -n 1` takes the first line without a broken pipe.
    print!(
        "HERALD_WEBPUSH__VAPID_PRIVATE_KEY={}\n\
         # public key (applicationServerKey; also served at GET /api/v1/webpush/key):\n# {}\n",
        key.private_base64(),
        key.public_base64()
    );
    Ok(())
}

fn token(settings: &Settings, user_id: &str, ttl_secs: Option<u64>) -> anyhow::Result<()> {
    let user = UserId::parse(user_id).map_err(|why| anyhow::anyhow!("user id {why}"))?;
    let ttl = ttl_secs.unwrap_or(settings.socket.token_ttl_secs);
    println!("{}", signer(settings)?.sign(&user, now_unix_secs() + ttl));
    Ok(())
}

async fn destroy(settings: &Settings, yes: bool) -> anyhow::Result<()> {
    anyhow::ensure!(yes, "refusing to delete anything without --yes");
    herald::queue::delete_topology(&settings.queue).await?;
    herald::queue::delete_retry_queues(&settings.queue, &settings.retry.delays_ms()).await?;
    Store::drop_database(&settings.store).await?;
    println!(
        "deleted the queues of prefix {} and the database",
        settings.queue.prefix
    );
    Ok(())
}

async fn demo(mut settings: Settings) -> anyhow::Result<()> {
    settings.demo.enabled = true;
    // The page's stats channel tries ping, slow_ping and parallel_slow_ping.
    settings.socket.stats_enabled = true;
    demo_webpush(&mut settings);
    let store = migrate(&settings).await?;
    let key = demo_key(&store, "demo", false).await?;
    // The console's key: an admin producer of its own, so the demo producer stays a plain one.
    let admin_key = demo_key(&store, "demo-admin", true).await?;
    store.close().await;
    let app = App::build(settings.clone())
        .await
        .context("cannot start herald")?;
    let addr = app.http_addr();
    let user = UserId::parse("42").map_err(anyhow::Error::msg)?;
    let token = signer(&settings)?.sign(&user, now_unix_secs() + settings.socket.token_ttl_secs);
    println!(
        "\nHerald is running on http://{addr}  (ctrl-c stops it)\n\
         Demo page: http://{addr}/demo\n\
         Console:   http://{addr}/console  (sign in with the admin key below)\n\n\
         API key of producer \"demo\" (new each time the demo starts):\n  {key}\n\
         Admin key of producer \"demo-admin\", for the console and the admin API (development only; \
         new each time):\n  {admin_key}\n\n\
         1. Connect as user 42 (Phoenix Channels v2), e.g. with the official JS client:\n\
         \x20    new Socket(\"ws://{addr}/socket\", {{params: {{token: \"{token}\"}}}}).channel(\"user:42\").join()\n\
         \x20  or any WebSocket client:\n\
         \x20    ws://{addr}/socket/websocket?vsn=2.0.0&token={token}\n\
         \x20    send: [\"1\",\"1\",\"user:42\",\"phx_join\",{{}}]\n\n\
         2. Send user 42 an event:\n\
         \x20    curl -i -X POST http://{addr}/api/v1/events -H 'Authorization: Bearer {key}' \\\n\
         \x20      -H 'Content-Type: application/json' -d '{{\"user_id\":\"42\",\"event\":\"push_timed\",\"data\":{{\"n\":1}}}}'\n",
        key = key.expose(),
        admin_key = admin_key.expose()
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    app.run(shutdown).await.context("herald failed")
}
