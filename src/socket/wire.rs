//! A connection's WebSocket as its steps write to it: frames encoded for the protocol version the
//! client chose, every write bounded by `socket.write_timeout_ms`. A write that fails or times out
//! ends the connection ([`ConnectionEnd::Gone`]): a client that does not read is not waited for.
//!
//! The connection and its user channels write through the one [`Wire`], so the timeout and the
//! encoding are applied in one place.

use super::connection::ConnectionEnd;
use super::protocol::{self, Reply, Vsn};
use crate::event::Topic;
use crate::pubsub::Push;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::SinkExt;
use serde_json::value::RawValue;
use std::time::Duration;
use tokio::time::timeout;

/// Close codes Herald uses (RFC 6455 and the IANA registry).
pub(super) mod close_code {
    /// Going away: idle timeout, or the user's connections were disconnected by the server.
    pub const GOING_AWAY: u16 = 1001;
    /// Unsupported data: binary frames.
    pub const UNSUPPORTED: u16 = 1003;
    /// Invalid payload data: a malformed frame.
    pub const INVALID: u16 = 1007;
    /// Policy violation: a client that does not read its events.
    pub const POLICY: u16 = 1008;
    /// Message too big.
    pub const TOO_BIG: u16 = 1009;
    /// Service restart: the node is draining; clients reconnect elsewhere.
    pub const RESTART: u16 = 1012;
}

/// The socket of one connection, and how its frames are written.
pub(super) struct Wire {
    pub(super) ws: WebSocket,
    pub(super) vsn: Vsn,
    /// `socket.write_timeout_ms`, kept as milliseconds: beside `vsn` it takes 8 bytes of every
    /// connection's task, where a `Duration` took 16 (see `Connection` on what each byte costs).
    write_timeout_ms: u32,
}

impl Wire {
    pub(super) fn new(ws: WebSocket, vsn: Vsn, write_timeout: Duration) -> Self {
        Self {
            ws,
            vsn,
            write_timeout_ms: u32::try_from(write_timeout.as_millis()).unwrap_or(u32::MAX),
        }
    }

    fn write_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.write_timeout_ms))
    }

    /// Queues `push` on a channel (`join_ref`, `topic`) without flushing: a server push carries
    /// no message ref.
    pub(super) async fn feed_push(
        &mut self,
        join_ref: &RawValue,
        topic: &Topic,
        push: &Push,
    ) -> Result<(), ConnectionEnd> {
        let text = protocol::encode(
            self.vsn,
            join_ref,
            protocol::null(),
            topic.as_str(),
            &push.event,
            &push.payload,
        );
        self.feed(text).await
    }

    /// Sends a server-initiated frame of a channel instance (`phx_close`, `phx_error`): it carries
    /// the instance's join ref as both refs, as Phoenix does.
    pub(super) async fn send_channel_event(
        &mut self,
        join_ref: &RawValue,
        topic: &str,
        event: &str,
        payload: &str,
    ) -> Result<(), ConnectionEnd> {
        let text = protocol::encode(self.vsn, join_ref, join_ref, topic, event, payload);
        self.send(text).await
    }

    /// Answers the client frame `msg_ref` on `topic` with `reply`.
    pub(super) async fn reply(
        &mut self,
        join_ref: &RawValue,
        msg_ref: &RawValue,
        topic: &str,
        reply: &Reply,
    ) -> Result<(), ConnectionEnd> {
        let text = protocol::encode_reply(self.vsn, join_ref, msg_ref, topic, reply);
        self.send(text).await
    }

    /// Writes a frame and flushes it (with whatever was queued before it).
    pub(super) async fn send(&mut self, text: String) -> Result<(), ConnectionEnd> {
        self.feed(text).await?;
        self.flush().await
    }

    /// Queues a frame without flushing (it may still be written if the write buffer fills).
    async fn feed(&mut self, text: String) -> Result<(), ConnectionEnd> {
        let fed = timeout(
            self.write_timeout(),
            self.ws.feed(Message::Text(text.into())),
        )
        .await;
        written(fed)
    }

    /// Writes whatever was queued.
    pub(super) async fn flush(&mut self) -> Result<(), ConnectionEnd> {
        written(timeout(self.write_timeout(), self.ws.flush()).await)
    }

    /// Sends a close frame with `code` and `reason`; the connection is over either way.
    pub(super) async fn close(&mut self, code: u16, reason: &'static str) {
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }));
        let _ = timeout(self.write_timeout(), self.ws.send(frame)).await;
    }
}

/// What a timed write to the socket came to.
fn written(
    result: Result<Result<(), axum::Error>, tokio::time::error::Elapsed>,
) -> Result<(), ConnectionEnd> {
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => {
            tracing::debug!(error = %error, "websocket write failed");
            Err(ConnectionEnd::Gone)
        }
        Err(_) => {
            tracing::debug!("websocket write timed out");
            Err(ConnectionEnd::Gone)
        }
    }
}
