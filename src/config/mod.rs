//! Settings: every knob Herald has, with defaults that work on localhost.
//!
//! Layers, later wins: `Settings::default()` < a TOML file (`--config`) < `HERALD_*` environment
//! variables. A handful of names are given by the issues and kept as they are (`HERALD_DATABASE_URL`,
//! `HERALD_AMQP_URL`, `HERALD_HTTP_ADDR`, `HERALD_STATSD_ADDR`, `HERALD_SECRET`); every other setting
//! is reachable as `HERALD_<SECTION>__<KEY>`, e.g. `HERALD_QUEUE__PREFETCH=200`. Unknown keys, and
//! variables that look like settings but name none, are errors that name them, so a typo never
//! silently falls back to a default; so is a bad value, named by its variable and key. Other
//! `HERALD_` variables are only warned about: they may be a user's own.
//!
//! The layering is written here rather than with figment: lists come from comma-separated values
//! typed like their defaults, five variables have fixed names, and unknown names are sorted into
//! refused and ignored, each of which would be a custom provider there.
//!
//! Each section (`[http]`, `[store]`, ...) is a struct in a file of its own, named as its table,
//! with its defaults, its `Duration` accessors for the `*_ms` settings and its own bounds; the
//! rules that relate sections are in `validate`.
//!
//! Tests build `Settings` in code and never set environment variables: the environment is shared by
//! every test of a process.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// `Duration` accessors for settings kept in milliseconds: the number keeps its unit in its name
/// (and in its environment variable), and the code that waits gets a `Duration`, converted here
/// once rather than at each call site. Each section invokes it beside its fields.
macro_rules! durations {
    ($($section:ty { $($field:ident => $name:ident),* $(,)? })*) => {$(
        impl $section {
            $(
                #[doc = concat!("`", stringify!($field), "` as a `Duration`.")]
                pub fn $name(&self) -> std::time::Duration {
                    std::time::Duration::from_millis(self.$field)
                }
            )*
        }
    )*};
}

mod demo;
mod faults;
mod http;
mod load;
mod metrics;
mod node;
mod pipeline;
mod pubsub;
mod queue;
mod replay;
mod retry;
mod socket;
mod store;
mod traces;
mod validate;
mod webpush;

pub use demo::DemoSettings;
pub use faults::FaultSettings;
pub use http::HttpSettings;
pub use metrics::MetricsSettings;
pub use node::{NodeSettings, Roles};
pub use pipeline::PipelineSettings;
pub use pubsub::{PubSubMode, PubSubSettings};
pub use queue::{QueueSettings, QueueType};
pub use replay::ReplaySettings;
pub use retry::{EventRetrySettings, RetrySettings};
pub use socket::SocketSettings;
pub use store::StoreSettings;
pub use traces::TracesSettings;
pub use webpush::{EventWebPushSettings, FallbackUnless, URGENCIES, WebPushSettings};

/// Environment variables with fixed names, and the setting each one sets.
pub const ENV_ALIASES: &[(&str, &str)] = &[
    ("HERALD_DATABASE_URL", "store.database_url"),
    ("HERALD_AMQP_URL", "queue.amqp_url"),
    ("HERALD_HTTP_ADDR", "http.addr"),
    ("HERALD_STATSD_ADDR", "metrics.statsd_addr"),
    ("HERALD_SECRET", "socket.secret"),
];

/// Shortest accepted `HERALD_SECRET`: 32 bytes, the output size of the HMAC-SHA256 that signs
/// socket tokens (a shorter key is easier to guess than the signature is to forge).
pub const MIN_SECRET_BYTES: usize = 32;

/// Prefix of every Herald environment variable.
pub const ENV_PREFIX: &str = "HERALD_";

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The settings file could not be read.
    #[error("cannot read settings file {path}")]
    ReadFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The settings file is not valid TOML.
    #[error("settings file {path} is not valid TOML")]
    ParseFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// An environment variable looks like a setting's but names none.
    #[error("{var} names no setting{suggestion} (see `herald serve --help` for the list)")]
    UnknownEnv {
        /// The variable.
        var: String,
        /// `; did you mean HERALD_…?`, or empty.
        suggestion: String,
    },
    /// A value has the wrong type, or a key is unknown or out of bounds (the message names it).
    #[error("invalid settings: {0}")]
    Invalid(String),
}

/// All of Herald's settings, one sub-struct per module.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The HTTP listener (API and WebSockets).
    pub http: HttpSettings,
    /// PostgreSQL.
    pub store: StoreSettings,
    /// RabbitMQ.
    pub queue: QueueSettings,
    /// Enqueue, outbox relay and worker pool.
    pub pipeline: PipelineSettings,
    /// Phoenix Channels sockets and their tokens.
    pub socket: SocketSettings,
    /// StatsD.
    pub metrics: MetricsSettings,
    /// Process-wide settings.
    pub node: NodeSettings,
    /// The development demo page.
    pub demo: DemoSettings,
    /// Delivery retries: backoff schedule and attempt limit, per event name where needed.
    pub retry: RetrySettings,
    /// Operator replay (CLI and admin API).
    pub replay: ReplaySettings,
    /// Test-only fault injection; off (empty) by default.
    pub faults: FaultSettings,
    /// Topic fan-out within and across nodes.
    pub pubsub: PubSubSettings,
    /// Web Push for users who are away.
    pub webpush: WebPushSettings,
    /// OpenTelemetry traces of each event across the nodes it crosses.
    pub traces: TracesSettings,
}

/// A string that never reaches logs: its `Debug` is redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself: call this only where it is used.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl Settings {
    /// True when broadcasts ride RabbitMQ between nodes.
    pub fn cluster(&self) -> bool {
        self.pubsub.mode == PubSubMode::Cluster
    }

    /// The bounds on one broker message (`queue.message_max_events`, capped by `queue.prefetch`,
    /// and `queue.message_max_bytes`).
    pub fn message_limits(&self) -> crate::store::MessageLimits {
        crate::store::MessageLimits {
            max_events: self
                .queue
                .message_max_events
                .min(usize::from(self.queue.prefetch)),
            max_bytes: self.queue.message_max_bytes,
        }
    }

    /// Where `/metrics` is served, if anywhere (validated at load).
    pub fn prometheus_addr(&self) -> Option<SocketAddr> {
        self.metrics.prometheus_addr.parse().ok()
    }

    /// How long the whole graceful shutdown may take.
    pub fn shutdown_timeout(&self) -> Duration {
        self.node.shutdown_timeout()
    }
}
