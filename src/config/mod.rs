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
//! Tests build `Settings` in code and never set environment variables: the environment is shared by
//! every test of a process.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

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
}

/// The HTTP listener.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Address to listen on; port 0 lets the OS choose (tests).
    pub addr: SocketAddr,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// API requests in progress at once on this node; one more is answered 503 with `Retry-After`
    /// at once. With `max_body_bytes` it bounds the memory that request bodies can take.
    pub max_concurrent_requests: usize,
    /// A connection must send a request's whole head within this long of opening or of its
    /// previous response, or it is closed: slow headers, and the idle timeout of keep-alive.
    pub header_read_timeout_ms: u64,
    /// A request body that sends nothing for this long fails its request (408).
    pub body_read_timeout_ms: u64,
    /// An API request (body read, validation, group commit) taking longer than this is answered
    /// 408. A request cut while its events were being committed may still be committed: producers
    /// retry with an idempotency key.
    pub request_timeout_ms: u64,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 4000)),
            max_body_bytes: 4 * 1024 * 1024,
            max_concurrent_requests: 256,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
        }
    }
}

/// PostgreSQL.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// Connection URL; the database is created by `herald migrate` when missing.
    pub database_url: Secret,
    /// Size of the pool of background work: outbox relay, retention, partition leases, replay.
    pub max_connections: u32,
    /// Size of the writers' pool: the group commit streams, the confirm recorder and the outcome
    /// writer, each one statement at a time, so `pipeline.commit_streams` + 2 is one each and none
    /// waits for another's connection.
    pub write_connections: u32,
    /// Size of the pool of client reads: socket catch-up, gap fills and acks, API-key lookups,
    /// admin queries and /readyz. When clients exhaust it, they wait; ingest does not.
    pub read_connections: u32,
    /// How long to wait for a pooled connection (and for the first connect).
    pub acquire_timeout_ms: u64,
    /// Delivered events older than this are pruned (catch-up cannot reach further back); 0 keeps
    /// them forever. Failed and undelivered events are never pruned.
    pub retention_days: u64,
    /// At most this many delivered events are kept per user (the newest); 0 for no limit.
    pub retention_per_user: i64,
    /// How often the api role prunes.
    pub retention_interval_secs: u64,
    /// How long an idempotency key keeps answering retries after its event was pruned (counted from
    /// the key's first use): a retry then gets 200 with `"status": "pruned"`, never a new event.
    /// A key whose event is still stored is kept with it, whatever its age.
    pub idempotency_ttl_secs: u64,
    /// When PostgreSQL's autovacuum is off (or `track_counts`), how often an api node vacuums and
    /// analyzes Herald's tables itself (one node of the deployment at a time); 0: never, for a
    /// deployment whose operator runs it. With autovacuum on, Herald leaves it to PostgreSQL.
    pub upkeep_interval_secs: u64,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            database_url: Secret::new("postgres://postgres@127.0.0.1:5432/herald"),
            max_connections: 8,
            write_connections: 3,
            read_connections: 8,
            acquire_timeout_ms: 5_000,
            retention_days: 30,
            retention_per_user: 10_000,
            retention_interval_secs: 300,
            idempotency_ttl_secs: 24 * 3600,
            upkeep_interval_secs: 60,
        }
    }
}

/// RabbitMQ.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSettings {
    /// AMQP URL (the vhost is its path, `%2f` for `/`), or a comma-separated list of a cluster's
    /// nodes, each a URL or `host:port` taking the first's credentials and vhost: a connection
    /// whose node fails moves to the next (see `queue::nodes`).
    pub amqp_url: Secret,
    /// Prefix of every exchange and queue name, so deployments (and tests) can share a broker.
    pub prefix: String,
    /// `quorum` (replicated, the default) or `classic`.
    pub queue_type: QueueType,
    /// Replicas of each quorum queue Herald declares (`x-quorum-initial-group-size`); 0 leaves it
    /// to the broker (its `quorum_cluster_size`). On a 3-node cluster, 3: any one node may go.
    /// Applies when a queue is first declared.
    pub quorum_initial_group_size: u16,
    /// Partition queues (`<prefix>.events.<p>`): a user's events all ride the one its id hashes
    /// to. Change it only as README says (drain, then switch); a node refuses to start on a
    /// different count while the partitions hold messages.
    pub partitions: u16,
    /// The worker's demand per partition, in events: a partition's messages are taken into work
    /// only while fewer than this many of its events are in flight on the node.
    pub prefetch: u16,
    /// Most events in one broker message (a group commit's events of one partition are split
    /// beyond it). `prefetch` caps it too: a message is taken into work whole.
    pub message_max_events: usize,
    /// Most bytes in one broker message, roughly (split beyond it; one event always fits).
    pub message_max_bytes: usize,
    /// A worker node holds a partition this long without renewing: when it dies, the partition
    /// moves to a live node after at most this long.
    pub partition_lease_ms: u64,
    /// How often a worker node renews its leases and rebalances partitions over the live nodes.
    pub partition_check_ms: u64,
    /// Messages waiting to be published; when full, the outbox relay publishes them later.
    pub publish_buffer: usize,
    /// Publishes awaiting a broker confirm at once (pipelined confirms).
    pub max_inflight_confirms: usize,
    /// A confirm not received within this is treated as a failed publish (the relay retries it).
    pub confirm_timeout_ms: u64,
    /// Timeout of one connection attempt.
    pub connect_timeout_ms: u64,
    /// Upper bound of the reconnect backoff (from 100 ms, doubling; each delay jittered by ±20%).
    pub reconnect_max_backoff_ms: u64,
}

/// The kind of queue Herald declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated over the broker's nodes (Raft).
    Quorum,
    /// One node's queue.
    Classic,
}

impl QueueType {
    /// The `x-queue-type` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quorum => "quorum",
            Self::Classic => "classic",
        }
    }
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            amqp_url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            prefix: "herald".into(),
            queue_type: QueueType::Quorum,
            quorum_initial_group_size: 0,
            partitions: 16,
            prefetch: 1_000,
            message_max_events: 500,
            message_max_bytes: 256 * 1024,
            partition_lease_ms: 5_000,
            partition_check_ms: 1_000,
            publish_buffer: 10_000,
            max_inflight_confirms: 1_000,
            confirm_timeout_ms: 5_000,
            connect_timeout_ms: 5_000,
            reconnect_max_backoff_ms: 5_000,
        }
    }
}

/// Enqueue, relay and worker pool.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineSettings {
    /// Events waiting for the group commit; when full, requests wait up to `enqueue_timeout_ms`.
    pub enqueue_buffer: usize,
    /// Bytes of events (their data, ids and keys) waiting for the group commit; when full,
    /// requests wait up to `enqueue_timeout_ms`. Must hold one whole request (`http.max_body_bytes`).
    pub enqueue_buffer_bytes: usize,
    /// Most events in one group commit.
    pub max_commit_batch: usize,
    /// Group commits in flight at once on an api node: each stream owns a fixed share of the
    /// partitions (so one user's events always commit through the same stream, in order) and
    /// runs one transaction at a time. Each takes a connection of `store.write_connections`.
    /// 1 by measurement: where a commit's WAL flush is cheap (0.3 ms on our machines), one stream
    /// already batches whatever waits, and more streams only cut the batches (and the broker
    /// messages) smaller: 2 streams ingested 12% fewer single events on two cores. Raise it where
    /// PostgreSQL's commits are slow (a remote or replicated WAL flush) and it has cores to spare.
    pub commit_streams: usize,
    /// How long a request may wait for room in the enqueue buffer before it gets 503.
    pub enqueue_timeout_ms: u64,
    /// Most events in one `POST /api/v1/events/batch`.
    pub max_batch_events: usize,
    /// Largest `data` of one event, serialised.
    pub max_data_bytes: usize,
    /// Rows still unpublished after this long are republished by the outbox relay.
    pub relay_grace_ms: u64,
    /// How often the relay looks for such rows.
    pub relay_interval_ms: u64,
    /// Most rows the relay claims at once.
    pub relay_batch: i64,
    /// Most status updates in one batched UPDATE.
    pub max_status_batch: usize,
    /// Most events of one user a worker broadcasts (and records) in one go.
    pub max_run_events: usize,
    /// How long a user's lane waits for a seq that is missing (its next event queued is further
    /// ahead): events two api nodes committed close together can reach their partition out of
    /// order, and the lane puts them back in order instead of leaving it to the socket's gap fill.
    /// Events in order never wait; 0 never waits.
    pub reorder_window_ms: u64,
    /// An event neither delivered nor failed, whose message (a confirmed outbox row) is this old
    /// and nothing due for it for this long (enqueued, replayed, swept or due to retry before then),
    /// is one no message carries any more: the sweeper sends it again. 0 turns the sweeper off.
    pub sweep_after_ms: u64,
    /// How often a worker node sweeps its partitions.
    pub sweep_interval_ms: u64,
    /// A partition is swept only after nothing was received or settled on it for this long
    /// (and its queue is empty), so nothing waiting behind a backlog is ever sent again.
    pub sweep_idle_ms: u64,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            enqueue_buffer: 20_000,
            enqueue_buffer_bytes: 64 * 1024 * 1024,
            max_commit_batch: 1_000,
            commit_streams: 1,
            enqueue_timeout_ms: 5_000,
            max_batch_events: 1_000,
            max_data_bytes: 64 * 1024,
            relay_grace_ms: 10_000,
            relay_interval_ms: 1_000,
            relay_batch: 1_000,
            max_status_batch: 1_000,
            max_run_events: 200,
            reorder_window_ms: 100,
            sweep_after_ms: 300_000,
            sweep_interval_ms: 30_000,
            sweep_idle_ms: 2_000,
        }
    }
}

/// Phoenix Channels sockets.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketSettings {
    /// Key that signs socket tokens, at least [`MIN_SECRET_BYTES`] long (`herald secret` prints
    /// one). Without it only a development node starts, on a public development key.
    pub secret: Option<Secret>,
    /// Lifetime of a socket token.
    pub token_ttl_secs: u64,
    /// Frames waiting to be written to one connection; a client that lets it fill is disconnected.
    pub outbound_buffer: usize,
    /// Channels one connection may join.
    pub max_channels: usize,
    /// A connection that sends nothing (not even a heartbeat) for this long is closed.
    pub idle_timeout_ms: u64,
    /// A write that does not complete within this closes the connection.
    pub write_timeout_ms: u64,
    /// tungstenite read buffer per connection (the default 128 KiB costs ~134 KB per idle socket).
    pub read_buffer_bytes: usize,
    /// tungstenite write buffer per connection.
    pub write_buffer_bytes: usize,
    /// Largest frame a client may send.
    pub max_frame_bytes: usize,
    /// Events read from PostgreSQL per page when a channel fills a gap in its user's sequence or
    /// catches up after a join's `last_seq` (each page is one read and one socket flush).
    pub max_gap_fill: i64,
    /// Most events one live gap may be filled with, over all its pages. A wider gap is not read: the
    /// channel is closed with `phx_error` and the client's rejoin catches up, so one push cannot
    /// hold a connection (its heartbeats, its other channels) for as long as reading a million rows.
    /// The default is ten default pages, and the default `store.retention_per_user`.
    pub max_gap_fill_total: i64,
    /// Events one connection may read from PostgreSQL for catch-ups (joins with `last_seq`, and
    /// resyncs) per minute, with up to a minute's worth at once. A catch-up that runs out closes its
    /// channel with `phx_error` (cause `throttled`) and the client's rejoin goes on from its last
    /// seq, so a client repeating `last_seq: 0` cannot make its node re-read the user's history
    /// over and over. The default is twice the default `store.retention_per_user`.
    pub max_catch_up_per_minute: i64,
    /// Client pushes queued for one channel task; beyond it a push is answered "too many requests".
    pub channel_inbox: usize,
    /// How long the stats channel's `slow_ping` holds its channel (the inline-handler pitfall).
    pub stats_slow_ping_ms: u64,
    /// `parallel_slow_ping` tasks one stats channel may run at once.
    pub stats_max_parallel: usize,
    /// User sockets open at once on this node; one more is refused with 503 before the upgrade.
    pub max_connections: usize,
    /// Origins allowed to open sockets from a browser (`Origin` header), as Phoenix's
    /// `check_origin`: `https://app.example.com`, `//app.example.com` (any scheme),
    /// `https://*.example.com` (subdomains); others get 403. Empty allows any origin (for
    /// non-browser clients); clients sending no `Origin` always pass.
    pub check_origin: Vec<String>,
    /// Serve the stats socket (`/stats_socket`, no token: for the demo and diagnostics). Off, the
    /// path is 404.
    pub stats_enabled: bool,
    /// Stats sockets open at once on this node (each may hold much; see the README).
    pub stats_max_connections: usize,
}

impl Default for SocketSettings {
    fn default() -> Self {
        Self {
            secret: None,
            token_ttl_secs: 24 * 3600,
            outbound_buffer: 256,
            max_channels: 100,
            idle_timeout_ms: 60_000,
            write_timeout_ms: 10_000,
            read_buffer_bytes: 4 * 1024,
            write_buffer_bytes: 4 * 1024,
            max_frame_bytes: 64 * 1024,
            max_gap_fill: 1_000,
            max_gap_fill_total: 10_000,
            max_catch_up_per_minute: 20_000,
            channel_inbox: 16,
            stats_slow_ping_ms: 3_000,
            stats_max_parallel: 10,
            max_connections: 10_000,
            check_origin: Vec::new(),
            stats_enabled: false,
            stats_max_connections: 10,
        }
    }
}

/// StatsD.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// StatsD UDP address (`host:port`); empty disables metrics.
    pub statsd_addr: String,
    /// Where Prometheus scrapes `/metrics` (`host:port`, port 0: the OS picks); empty: not served.
    /// A listener of its own, like RabbitMQ's 15692 and Centrifugo's internal port, without auth
    /// (Prometheus scrapes plainly), so it defaults to loopback: exposing the node's figures takes
    /// a decision (`0.0.0.0:9464` on a private network), never a forgotten default.
    pub prometheus_addr: String,
    /// Prefix of every metric name; empty for none.
    pub prefix: String,
    /// How often buffered metrics are sent.
    pub flush_interval_ms: u64,
    /// Largest StatsD datagram: metrics are buffered up to it (or the flush interval). The default
    /// fits a 1500-byte MTU; a local agent takes 8192 (fewer sends: on a loaded node StatsD sends
    /// at cadence's 512 bytes took 8% of the CPU).
    pub packet_bytes: usize,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            statsd_addr: "127.0.0.1:8125".into(),
            prometheus_addr: "127.0.0.1:9464".into(),
            prefix: String::new(),
            flush_interval_ms: 100,
            packet_bytes: 1432,
        }
    }
}

/// Process-wide settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSettings {
    /// Bound on the whole graceful shutdown; what is left is aborted (and redelivered later).
    pub shutdown_timeout_ms: u64,
    /// The roles this node runs, comma-separated: `api`, `worker`, `socket`.
    pub roles: Roles,
    /// This node's name in /readyz and metric tags; empty means `<hostname>-<pid>`.
    pub name: String,
    /// A development node (`herald serve --dev`): without `HERALD_SECRET` it signs socket tokens
    /// with the public development key, loudly, instead of refusing to start.
    pub dev: bool,
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            shutdown_timeout_ms: 30_000,
            roles: Roles::ALL,
            name: String::new(),
            dev: false,
        }
    }
}

/// The roles a node runs. One box can run all of them; many boxes can split them. Written as
/// their names, comma-separated (`api,worker`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Roles {
    /// HTTP API for producers, group commit, publisher, outbox relay.
    pub api: bool,
    /// Consumes the events queue and broadcasts to users' topics.
    pub worker: bool,
    /// Serves WebSockets (user and stats sockets).
    pub socket: bool,
}

impl Roles {
    /// Every role: one node does everything.
    pub const ALL: Self = Self {
        api: true,
        worker: true,
        socket: true,
    };

    /// True when the node runs every role.
    pub fn all(&self) -> bool {
        self.api && self.worker && self.socket
    }

    /// The roles, comma-separated, for /readyz and logs.
    pub fn names(&self) -> String {
        [
            ("api", self.api),
            ("worker", self.worker),
            ("socket", self.socket),
        ]
        .iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(",")
    }
}

impl std::str::FromStr for Roles {
    type Err = String;

    /// Parses `api,worker,socket` (any non-empty subset).
    fn from_str(list: &str) -> Result<Self, String> {
        let mut roles = Self {
            api: false,
            worker: false,
            socket: false,
        };
        for role in list.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            match role {
                "api" => roles.api = true,
                "worker" => roles.worker = true,
                "socket" => roles.socket = true,
                other => {
                    return Err(format!(
                        "unknown role {other} (roles are api, worker, socket)"
                    ));
                }
            }
        }
        if !(roles.api || roles.worker || roles.socket) {
            return Err("name at least one role (api, worker, socket)".into());
        }
        Ok(roles)
    }
}

impl TryFrom<String> for Roles {
    type Error = String;

    fn try_from(list: String) -> Result<Self, String> {
        list.parse()
    }
}

impl From<Roles> for String {
    fn from(roles: Roles) -> Self {
        roles.names()
    }
}

/// Topic fan-out.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PubSubSettings {
    /// `local`: broadcasts reach this node's sockets only (one node does everything). `cluster`:
    /// broadcasts ride RabbitMQ to every socket node with subscribers; needed by any deployment of
    /// more than one node.
    pub mode: PubSubMode,
    /// How long a join waits for its topic's binding on this node's fan-out queue.
    pub bind_timeout_ms: u64,
    /// How long a worker waits for the broker to confirm a cross-node broadcast.
    pub publish_timeout_ms: u64,
    /// Buckets a cross-node broadcast is routed by (a stable hash of its topic): a socket node's
    /// queue is bound to the buckets its clients' topics fall in, at most this many bindings
    /// however many users it holds, and drops what it receives for topics nobody joined on it.
    /// A join whose bucket is bound already needs no broker round trip. The same on every node
    /// (the fan-out exchange records it, and a node with another count is refused at start).
    pub buckets: u16,
}

impl Default for PubSubSettings {
    fn default() -> Self {
        Self {
            mode: PubSubMode::Local,
            bind_timeout_ms: 5_000,
            publish_timeout_ms: 5_000,
            buckets: 256,
        }
    }
}

/// Where broadcasts go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PubSubMode {
    /// This node's sockets only.
    Local,
    /// Every socket node, through RabbitMQ.
    Cluster,
}

impl PubSubMode {
    /// `local` or `cluster`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Cluster => "cluster",
        }
    }
}

/// The demo page (`/demo`): a person picks a user, watches pushes arrive and sends test events.
/// Development only: it mints tokens for any user and enqueues without an API key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DemoSettings {
    /// Serve the page and its dev-only endpoints. Never in production.
    pub enabled: bool,
    /// Folder with the page and its npm install (`npm ci` there brings the phoenix client).
    pub assets_dir: String,
}

impl Default for DemoSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            assets_dir: "demo".into(),
        }
    }
}

/// Delivery retries. A failed attempt is retried through RabbitMQ delay queues (one per distinct
/// delay, whose messages expire back into the work queue), never by a sleeping task.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// Delay before each retry, in order (`HERALD_RETRY__SCHEDULE_MS=1000,5000,...`); when
    /// `max_attempts` asks for more retries than listed, the last delay repeats.
    pub schedule_ms: Vec<u64>,
    /// Attempts in all, the first included; after the last the event is failed and dead-lettered.
    pub max_attempts: u32,
    /// Each delay is drawn uniformly within this fraction either side of the scheduled one
    /// (0.1: 10 s becomes 9 to 11 s), so events failed together do not retry together.
    pub jitter: f64,
    /// Bound on one attempt; an attempt that takes longer has failed (and is retried).
    pub attempt_timeout_ms: u64,
    /// Per event name, a schedule and limit of its own (settings file only:
    /// `[retry.events.invoice_paid]` with `schedule_ms` and/or `max_attempts`).
    pub events: BTreeMap<String, EventRetrySettings>,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            schedule_ms: vec![1_000, 5_000, 30_000, 120_000, 600_000],
            max_attempts: 6,
            jitter: 0.1,
            attempt_timeout_ms: 10_000,
            events: BTreeMap::new(),
        }
    }
}

/// One event name's retry policy; what is left out comes from `[retry]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventRetrySettings {
    /// Delays before each retry.
    pub schedule_ms: Option<Vec<u64>>,
    /// Attempts in all.
    pub max_attempts: Option<u32>,
}

impl RetrySettings {
    /// Every distinct delay of every schedule: one delay queue each.
    pub fn delays_ms(&self) -> Vec<u64> {
        let mut delays: Vec<u64> = self
            .events
            .values()
            .filter_map(|e| e.schedule_ms.as_ref())
            .chain(std::iter::once(&self.schedule_ms))
            .flatten()
            .copied()
            .collect();
        delays.sort_unstable();
        delays.dedup();
        delays
    }
}

/// Operator replay.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplaySettings {
    /// Events per second a replay publishes unless told otherwise (`--rate`, `"rate"`).
    pub default_rate: u32,
    /// Events claimed per step (one UPDATE each).
    pub page: i64,
    /// Replay jobs one node runs at once through the admin API; more are refused (429).
    pub max_jobs: usize,
}

impl Default for ReplaySettings {
    fn default() -> Self {
        Self {
            default_rate: 1_000,
            page: 500,
            max_jobs: 2,
        }
    }
}

/// Test-only fault injection, off by default: makes chosen events' delivery attempts fail, so tests
/// (and a curious operator on a test node) can watch retries, dead letters and replay. A node with
/// rules logs a warning at start. Never set it in production.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultSettings {
    /// Rules `event[:attempts][:mode]` (`HERALD_FAULTS__FAIL_EVENTS=poison,flaky:2,slow:hang`):
    /// attempts of events with that name fail; with `attempts`, only each event's first that many
    /// attempts on this node fail. `mode` is `error` (default), `panic` (the attempt panics) or
    /// `hang` (it never finishes, so the attempt timeout fails it).
    pub fail_events: Vec<String>,
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

mod load;
mod validate;

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

/// `Duration` accessors for settings kept in milliseconds: the number keeps its unit in its name
/// (and in its environment variable), and the code that waits gets a `Duration`, converted here
/// once rather than at each call site.
macro_rules! durations {
    ($($section:ty { $($field:ident => $name:ident),* $(,)? })*) => {$(
        impl $section {
            $(
                #[doc = concat!("`", stringify!($field), "` as a `Duration`.")]
                pub fn $name(&self) -> Duration {
                    Duration::from_millis(self.$field)
                }
            )*
        }
    )*};
}

durations! {
    HttpSettings {
        header_read_timeout_ms => header_read_timeout,
        body_read_timeout_ms => body_read_timeout,
        request_timeout_ms => request_timeout,
    }
    StoreSettings {
        acquire_timeout_ms => acquire_timeout,
    }
    QueueSettings {
        connect_timeout_ms => connect_timeout,
        confirm_timeout_ms => confirm_timeout,
        reconnect_max_backoff_ms => reconnect_max_backoff,
        partition_check_ms => partition_check,
        partition_lease_ms => partition_lease,
    }
    PipelineSettings {
        relay_interval_ms => relay_interval,
        enqueue_timeout_ms => enqueue_timeout,
        sweep_interval_ms => sweep_interval,
        sweep_idle_ms => sweep_idle,
    }
    SocketSettings {
        write_timeout_ms => write_timeout,
        idle_timeout_ms => idle_timeout,
        stats_slow_ping_ms => stats_slow_ping,
    }
    MetricsSettings {
        flush_interval_ms => flush_interval,
    }
    NodeSettings {
        shutdown_timeout_ms => shutdown_timeout,
    }
    PubSubSettings {
        bind_timeout_ms => bind_timeout,
        publish_timeout_ms => publish_timeout,
    }
    RetrySettings {
        attempt_timeout_ms => attempt_timeout,
    }
}
