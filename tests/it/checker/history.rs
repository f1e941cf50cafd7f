//! What a checker run records, and what it reads from PostgreSQL and RabbitMQ at the end: plain
//! data, so the analysis (`check`) is a pure function of it and its unit tests can hand-make any
//! history.

use std::collections::HashMap;
use uuid::Uuid;

/// Everything the producers and clients saw.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// One per idempotency key a producer used.
    pub keys: Vec<KeyRecord>,
    /// One per channel instance (one join ref on one connection), in the order they were joined.
    pub instances: Vec<Instance>,
    /// Pushes whose join ref the connection never sent: attributable to no instance at all.
    pub stray: Vec<StrayPush>,
}

/// One event a producer sent, under its idempotency key, with every answer it got.
#[derive(Clone, Debug)]
pub struct KeyRecord {
    pub key: String,
    pub user: String,
    /// Named `poison`: fails every attempt, so it can never be delivered (nor pruned).
    pub poison: bool,
    /// Every 2xx answer for this key, in order (single and batch alike).
    pub answers: Vec<Answer>,
    /// The producer stopped retrying without a 2xx (the deployment never answered).
    pub gave_up: bool,
    /// Answers that were neither 2xx nor "retry later" (503, 429): HTTP status and body. The
    /// requests are valid, so a backend hearing one of these could not tell to retry.
    pub refused: Vec<(u16, String)>,
}

/// A 2xx answer naming the event behind a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub http: u16,
    pub id: Uuid,
    pub seq: i64,
    /// `accepted`, or a duplicate's current status (`delivered`, `pruned`, ...).
    pub status: String,
}

/// One channel instance: a join ref on one connection of one client.
#[derive(Clone, Debug)]
pub struct Instance {
    /// Which client task, which of its connections, which node it reached.
    pub client: usize,
    pub connection: u32,
    pub node: String,
    pub user: String,
    pub join_ref: String,
    /// The join's `last_seq` param; `None`: joined with `{}`.
    pub asked: Option<i64>,
    /// Milliseconds since the run started when the join was sent.
    pub joined_at_ms: u64,
    /// The join's reply, once it came.
    pub reply: Option<Reply>,
    /// Every push carrying this instance's join ref, in arrival order.
    pub pushes: Vec<Pushed>,
    /// How it ended; `None` while it is still open (or a join still unanswered).
    pub end: Option<End>,
}

/// A join's `phx_reply`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub ok: bool,
    /// The user's latest seq when the join was answered.
    pub last_seq: Option<i64>,
    /// Retention removed events after the asked `last_seq`.
    pub missed: bool,
    /// The whole response, for the report.
    pub raw: String,
    /// Milliseconds since the run started when the reply was read.
    pub at_ms: u64,
}

/// One pushed event, as the client read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pushed {
    pub topic: String,
    pub event: String,
    pub seq: Option<i64>,
    pub id: Option<Uuid>,
    pub at_ms: u64,
    /// When it came relative to the instance's life.
    pub when: PushTiming,
}

/// Whether a push came while its instance was live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushTiming {
    /// After the ok reply, before the end: the normal case.
    Live,
    /// Before the join's reply (the server answers a join before it pushes anything for it).
    BeforeReply,
    /// After the instance ended (its `phx_close`, `phx_error` or refusal was already read).
    AfterEnd,
}

/// How a channel instance ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The client left (`phx_leave`, then the server's `phx_close`).
    Left,
    /// `phx_error` with its payload: the client rejoins after about a second.
    Errored(String),
    /// `phx_close` the client did not ask for.
    Closed,
    /// The join was refused (an error reply): nothing was joined.
    Refused,
    /// No reply within the join timeout: the client gave the join up (as the official client does).
    JoinTimeout,
    /// The client closed the connection (moving to another node, or a heartbeat timeout).
    Disconnected(String),
    /// The connection ended under it: the node died, or closed it with this code.
    SocketClosed(String),
    /// Joined, with no error and no close, when the run ended.
    StillJoined,
}

/// A push whose join ref was never sent on its connection.
#[derive(Clone, Debug)]
pub struct StrayPush {
    pub client: usize,
    pub connection: u32,
    pub node: String,
    pub frame: String,
}

/// PostgreSQL and RabbitMQ as they were after the quiet period.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub events: Vec<StoredEvent>,
    /// `retention_watermarks`: per user, the highest seq retention removed.
    pub watermarks: HashMap<String, i64>,
    /// `user_seqs`: per user, the last seq handed out.
    pub user_seqs: HashMap<String, i64>,
    pub outbox: Vec<OutboxRow>,
    /// `idempotency_keys`: key -> the event id it holds.
    pub keys: HashMap<String, Uuid>,
    /// Every partition and delay queue with its ready count (`None`: it does not exist).
    pub queues: Vec<(String, Option<u32>)>,
    /// Set when the quiet period's deadline passed: what was still unsettled, described.
    pub stuck: Option<String>,
    /// When the run started, in Unix ms: the report shows the events' times as offsets from it,
    /// as it shows the pushes'.
    pub started_unix_ms: i64,
}

/// One row of `events`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    pub id: Uuid,
    pub user: String,
    pub seq: i64,
    pub event: String,
    pub status: String,
    pub attempts: i32,
    pub failed_at: bool,
    pub sweeps: i32,
    pub last_error: Option<String>,
    pub key: Option<String>,
    /// Sockets its last delivery reached (0: none; in cluster mode 1 means some socket node had
    /// subscribers), for the report.
    pub push_count: Option<i32>,
    /// When it was enqueued and (last) delivered, in Unix ms, for the report.
    pub enqueued_ms: i64,
    pub delivered_ms: Option<i64>,
}

/// One row of `outbox`.
#[derive(Clone, Debug)]
pub struct OutboxRow {
    pub id: Uuid,
    pub event_ids: Vec<Uuid>,
    pub relayed: bool,
}
