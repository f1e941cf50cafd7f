//! Assembling a node: settings checked, PostgreSQL's pools connected, the deployment-wide counts
//! checked, the listeners bound (so port 0 resolves), and the shared parts (pubsub, token signer,
//! fault injector, demo) made, before any role starts. RabbitMQ is not needed to build.

use super::{App, Error, Listener};
use crate::cluster::{self, RabbitTransport};
use crate::config::Settings;
use crate::demo::Demo;
use crate::metrics::Metrics;
use crate::pipeline::faults::Faults;
use crate::pipeline::partitions::check_layout;
use crate::pipeline::upkeep;
use crate::pubsub::{BindRequest, PubSub};
use crate::queue::BrokerNodes;
use crate::store::Store;
use crate::token::TokenSigner;
use std::sync::Arc;
use tokio::sync::mpsc;

impl App {
    /// Connects to PostgreSQL and binds the listener (so port 0 resolves). RabbitMQ is not needed to
    /// build: the API accepts while the broker is down, and the broker roles connect when it is up.
    ///
    /// # Errors
    /// Settings out of bounds (see [`Settings::validate`]), a weak or missing secret (see
    /// [`Settings::signing_secret`]), PostgreSQL unreachable, the
    /// address taken, StatsD misconfigured, demo files missing, or a partition count that cannot
    /// be switched to now.
    pub async fn build(settings: Settings) -> Result<Self, Error> {
        settings.validate()?;
        let secret = settings.signing_secret()?;
        if settings.socket.secret.is_none() {
            tracing::warn!(
                "HERALD_SECRET is not set: this development node signs socket tokens with the \
                 public development secret and anyone can forge them. Never in production."
            );
        }
        let roles = settings.node.roles;
        let node = node_name(&settings.node.name);
        let metrics = Metrics::new(&settings.metrics, &node, &roles.names().replace(',', "+"))?;
        if crate::traces::install(&settings.traces, &node)? {
            tracing::info!(endpoint = %settings.traces.otlp_endpoint, ratio = settings.traces.sample_ratio, "exporting traces over OTLP");
        }
        let pool = |name: &str| format!("herald {node} {name}");
        let store = Store::connect_as(
            &settings.store,
            settings.store.max_connections,
            &pool("background"),
        )
        .await?;
        let writes = Store::connect_as(
            &settings.store,
            settings.store.write_connections,
            &pool("writes"),
        )
        .await?;
        let reads = Store::connect_as(
            &settings.store,
            settings.store.read_connections,
            &pool("reads"),
        )
        .await?;
        if roles.api || roles.worker {
            check_layout(&settings, &store).await?;
        }
        if settings.cluster() && (roles.worker || roles.socket) {
            check_buckets(&settings, &store).await?;
        }
        let upkeep = upkeep_mode(&settings, &store).await;
        let (listener, http_addr) = Listener::Http.bind(settings.http.addr).await?;
        let scrape = match settings.prometheus_addr() {
            None => None,
            Some(addr) => Some(Listener::Prometheus.bind(addr).await?),
        };
        let signer = TokenSigner::new(secret);
        let demo = if settings.demo.enabled && roles.api {
            Some(load_demo(&settings, &store, &signer).await?)
        } else {
            None
        };
        let fanout_origin = cluster::origin_of(&node);
        let (pubsub, bind_requests, fanout_nodes) = pubsub(&settings, &fanout_origin, &metrics);
        let faults = faults(&settings)?;
        let webpush_sender = match roles.worker && settings.webpush.enabled() {
            true => Some(Arc::new(crate::webpush::sender::Sender::new(
                store.clone(),
                metrics.clone(),
                Arc::new(settings.webpush.clone()),
                Arc::new(crate::pipeline::retry::RetryPolicy::new(&settings.retry)),
            )?)),
            false => None,
        };
        Ok(Self {
            webpush_sender,
            upkeep,
            faults: Arc::new(faults),
            settings,
            node,
            roles,
            store,
            writes,
            reads,
            metrics,
            pubsub,
            bind_requests,
            fanout_nodes,
            fanout_origin,
            signer,
            listener,
            http_addr,
            scrape,
            demo,
        })
    }
}

/// A cluster-mode node routes cross-node broadcasts by the deployment's bucket count: recorded by
/// the first node, refused on any other.
async fn check_buckets(settings: &Settings, store: &Store) -> Result<(), Error> {
    let wanted = settings.pubsub.buckets;
    let running = store
        .deployment_setting("pubsub.buckets", i64::from(wanted))
        .await?;
    if running != i64::from(wanted) {
        return Err(Error::Buckets { wanted, running });
    }
    Ok(())
}

/// The demo's page and endpoints, publishing as the `demo` producer; said loudly, since it mints
/// tokens for anyone.
async fn load_demo(
    settings: &Settings,
    store: &Store,
    signer: &TokenSigner,
) -> Result<Demo, Error> {
    tracing::warn!("the demo is enabled: /demo mints tokens for any user; development only");
    let producer = store.ensure_producer("demo").await?;
    Ok(Demo::load(
        &settings.demo.assets_dir,
        signer.clone(),
        producer.id,
    )?)
}

/// The node's pubsub: local, or in cluster mode riding RabbitMQ, with the requests for the fan-out
/// queue's bindings and the broker nodes its publisher uses.
fn pubsub(
    settings: &Settings,
    fanout_origin: &str,
    metrics: &Metrics,
) -> (
    PubSub,
    Option<mpsc::Receiver<BindRequest>>,
    Option<BrokerNodes>,
) {
    if !settings.cluster() {
        return (PubSub::new(), None, None);
    }
    let transport = RabbitTransport::new(
        settings.queue.clone(),
        &settings.pubsub,
        fanout_origin,
        metrics.clone(),
    );
    let nodes = transport.broker_nodes();
    let timeout = settings.pubsub.bind_timeout();
    let (pubsub, requests) = PubSub::cluster(Arc::new(transport), timeout);
    (pubsub, Some(requests), Some(nodes))
}

/// The fault injector of `faults.fail_events`; a node with rules says so at start.
fn faults(settings: &Settings) -> Result<Faults, Error> {
    let faults = Faults::new(&settings.faults).map_err(Error::Faults)?;
    if !faults.is_empty() {
        tracing::warn!(
            rules = ?settings.faults.fail_events,
            "fault injection is ON: chosen events' deliveries will fail (tests only)"
        );
    }
    Ok(faults)
}

/// Finds who looks after the tables and, when PostgreSQL's autovacuum does not, says so once at
/// start: the operator of a production database should turn it on (Herald's own upkeep is the
/// fallback, not the plan).
async fn upkeep_mode(settings: &Settings, store: &Store) -> &'static str {
    match store.upkeep_mode().await {
        Ok(mode) => {
            let keeper = upkeep::Keeper::of(mode, settings.store.upkeep_interval_secs);
            if let Some(warning) = keeper.warning() {
                tracing::warn!("{warning}");
            }
            keeper.as_str()
        }
        Err(error) => {
            tracing::debug!(error = ?error, "cannot read the autovacuum setting");
            "unknown"
        }
    }
}

/// `node.name`, or `<hostname>-<pid>` when it is empty.
fn node_name(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_owned();
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "herald".into());
    format!("{host}-{}", std::process::id())
}
