//! Every metric Herald emits, declared once and sent to two outputs: StatsD (DogStatsD tags, pushed)
//! and a Prometheus registry (scraped at `/metrics`, see [`crate::app`]).
//!
//! Call sites never spell a metric name: each telemetry event is one method on [`Metrics`]
//! (`events.rs`, vector's internal events), which records into instruments declared once, a line
//! each, in `declare.rs`. An instrument (`instrument.rs`) feeds both outputs in one call, so they
//! cannot drift apart. Names and units follow each output's conventions: StatsD keeps the dotted
//! names and milliseconds operators' dashboards read (`statsd.rs`); Prometheus gets the same names
//! with dots as underscores in its base units, `_seconds` for durations and `_total` for counters
//! (`prometheus.rs`). The console reads the instruments in place (`snapshot.rs`).
//!
//! Tags are always of low cardinality: never a user id or an event id (a partition number is bounded
//! by `queue.partitions`). Every metric carries `node` and `roles`, as cadence default tags on the
//! StatsD side and registry-wide labels on the Prometheus side, so no call site can forget or repeat
//! them. Prometheus instruments are atomics or a mutex behind a label-set lookup.

mod declare;
mod events;
mod instrument;
mod prometheus;
mod snapshot;
mod statsd;

pub use declare::{DECLARED, Kind, Spec};
pub use events::PartitionMove;
pub use snapshot::{Buckets, Snapshot};

use crate::config::MetricsSettings;
use cadence::{NopMetricSink, StatsdClient};
use declare::Instruments;
use prometheus_client::registry::Registry;
use std::borrow::Cow;
use std::sync::Arc;

/// The socket tag of user sockets.
pub const USER_SOCKET: &str = "UserSocket";
/// The channel tag of user channels.
pub const USER_CHANNEL: &str = "UserChannel";
/// The socket tag of the stats socket.
pub const STATS_SOCKET: &str = "StatsSocket";
/// The channel tag of stats channels.
pub const STATS_CHANNEL: &str = "StatsChannel";

/// The `status` tag of an accepted connect or join.
const SUCCESS: &str = "success";

/// The content type of [`Metrics::render`]: OpenMetrics text, which Prometheus scrapes natively.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why metrics could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up StatsD to {addr}")]
pub struct Error {
    addr: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// A cheap handle to both outputs.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    statsd: Arc<StatsdClient>,
    registry: Registry,
    at: Instruments,
    node: String,
    roles: String,
}

impl Metrics {
    /// Builds the outputs for node `node` running `roles` (`api+worker+socket`); an empty
    /// `statsd_addr` gives a StatsD client that sends nothing (Prometheus is always kept).
    ///
    /// # Errors
    /// The UDP socket cannot be bound or the address does not resolve.
    pub fn new(settings: &MetricsSettings, node: &str, roles: &str) -> Result<Self, Error> {
        let statsd = statsd::client(settings, node, roles)?;
        Ok(Self::build(statsd, &settings.prefix, node, roles))
    }

    /// Metrics that go nowhere (for tools that need none): nothing is sent, nothing scraped.
    pub fn disabled() -> Self {
        Self::build(StatsdClient::from_sink("", NopMetricSink), "", "", "")
    }

    fn build(statsd: StatsdClient, prefix: &str, node: &str, roles: &str) -> Self {
        let identity = [
            (Cow::Borrowed("node"), Cow::Owned(node.to_owned())),
            (Cow::Borrowed("roles"), Cow::Owned(roles.to_owned())),
        ];
        // StatsD's prefix is prepended as is (`herald.`); Prometheus joins prefix and name with `_`.
        let prefix = prefix.trim_end_matches('.').replace('.', "_");
        let mut registry = if prefix.is_empty() {
            Registry::with_labels(identity.into_iter())
        } else {
            Registry::with_prefix_and_labels(prefix, identity.into_iter())
        };
        let statsd = Arc::new(statsd);
        let at = Instruments::register(&mut registry, &statsd);
        Self {
            inner: Arc::new(Inner {
                statsd,
                registry,
                at,
                node: node.to_owned(),
                roles: roles.to_owned(),
            }),
        }
    }

    fn at(&self) -> &Instruments {
        &self.inner.at
    }

    /// The node's name, as every metric is tagged.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The node's roles, as every metric is tagged (`api+worker+socket`).
    pub fn roles(&self) -> &str {
        &self.inner.roles
    }

    /// Sends what StatsD has buffered.
    pub fn flush(&self) {
        let _ = self.inner.statsd.flush();
    }

    /// Every metric's current value in the OpenMetrics text format (see [`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail; a label that could not be encoded would be our bug.
        if let Err(error) =
            prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)
        {
            tracing::error!(error = %error, "cannot encode the metrics");
        }
        text
    }

    /// A reading of this node's metrics for the operator console (see [`Snapshot`]).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::read(self.at())
    }
}
