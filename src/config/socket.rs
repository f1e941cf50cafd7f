//! The sockets' section (`[socket]`): the token secret, per-connection buffers and limits, catch-up
//! and gap-fill bounds, allowed origins and the stats socket.

use super::Error;
use super::Secret;
use super::validate::{at_least_one, invalid};
use serde::{Deserialize, Serialize};

/// Phoenix Channels sockets.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketSettings {
    /// Key that signs socket tokens, at least [`super::MIN_SECRET_BYTES`] long (`herald secret`
    /// prints one). Without it only a development node starts, on a public development key.
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

durations! {
    SocketSettings {
        write_timeout_ms => write_timeout,
        idle_timeout_ms => idle_timeout,
        stats_slow_ping_ms => stats_slow_ping,
    }
}

impl SocketSettings {
    pub(super) fn validate(&self) -> Result<(), Error> {
        at_least_one(&[
            ("socket.outbound_buffer", self.outbound_buffer),
            ("socket.max_channels", self.max_channels),
            ("socket.channel_inbox", self.channel_inbox),
            ("socket.max_connections", self.max_connections),
            ("socket.stats_max_connections", self.stats_max_connections),
        ])?;
        for pattern in &self.check_origin {
            crate::socket::origin::OriginPattern::parse(pattern)
                .map_err(|why| Error::Invalid(format!("socket.check_origin: {why}")))?;
        }
        if self.max_gap_fill < 1 || self.max_gap_fill_total < self.max_gap_fill {
            return invalid(
                "socket.max_gap_fill",
                "must be at least 1, and socket.max_gap_fill_total at least as much",
            );
        }
        if self.max_catch_up_per_minute < self.max_gap_fill {
            return invalid(
                "socket.max_catch_up_per_minute",
                "must be at least socket.max_gap_fill (one page)",
            );
        }
        Ok(())
    }
}
