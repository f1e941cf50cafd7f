//! One WebSocket connection: the Phoenix protocol loop for a user's socket.
//!
//! The connection task owns the socket and everything about it: its joined channels, its bounded
//! outbound queue (what pubsub feeds), its idle timer. It reads client frames, answers them, and
//! writes pushed events through each channel's order guard. A bad frame closes only this connection;
//! nothing a client sends can panic the node.

use super::SocketState;
use super::channel::{Admit, JoinedChannel};
use super::protocol::{self, Frame, Vsn, null, reason};
use crate::event::{USER_TOPIC_PREFIX, UserId, now_unix_ms};
use crate::metrics::USER_CHANNEL;
use crate::pubsub::{Message as PubSubMessage, Subscriber};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

/// Close codes Herald uses (RFC 6455 and the IANA registry).
mod close_code {
    /// Going away: idle timeout.
    pub const GOING_AWAY: u16 = 1001;
    /// Unsupported data: binary frames.
    pub const UNSUPPORTED: u16 = 1003;
    /// Invalid payload data: a malformed frame.
    pub const INVALID: u16 = 1007;
    /// Policy violation: a client that does not read its events.
    pub const POLICY: u16 = 1008;
    /// Service restart: the node is draining; clients reconnect elsewhere.
    pub const RESTART: u16 = 1012;
}

/// Why the loop ended.
enum End {
    /// The client closed, or the transport failed: nothing more to send.
    Gone,
    /// Herald closes with this code and reason.
    Close(u16, &'static str),
}

struct Connection {
    ws: WebSocket,
    vsn: Vsn,
    user: UserId,
    state: SocketState,
    channels: HashMap<String, JoinedChannel>,
    subscriber: Subscriber,
    write_timeout: Duration,
}

/// Runs a connection of `user` until it closes.
pub async fn serve(ws: WebSocket, vsn: Vsn, user: UserId, state: SocketState) {
    let (queue, mut inbox) = mpsc::channel(state.settings.outbound_buffer);
    let overflowed = CancellationToken::new();
    let write_timeout = Duration::from_millis(state.settings.write_timeout_ms);
    state.open.fetch_add(1, Ordering::Relaxed);
    let mut connection = Connection {
        ws,
        vsn,
        user,
        state: state.clone(),
        channels: HashMap::new(),
        subscriber: Subscriber {
            queue,
            overflowed: overflowed.clone(),
        },
        write_timeout,
    };
    let end = connection.run(&mut inbox, &overflowed).await;
    connection.leave_all();
    if let End::Close(code, why) = end {
        tracing::debug!(code, reason = why, "closing connection");
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: why.into(),
        }));
        let _ = timeout(write_timeout, connection.ws.send(frame)).await;
    }
    state.open.fetch_sub(1, Ordering::Relaxed);
}

impl Connection {
    async fn run(
        &mut self,
        inbox: &mut mpsc::Receiver<Arc<PubSubMessage>>,
        overflowed: &CancellationToken,
    ) -> End {
        let idle_limit = Duration::from_millis(self.state.settings.idle_timeout_ms);
        let idle = tokio::time::sleep(idle_limit);
        tokio::pin!(idle);
        let closing = self.state.closing.clone();
        loop {
            let step = tokio::select! {
                () = closing.cancelled() => Err(End::Close(close_code::RESTART, "server restarting")),
                () = overflowed.cancelled() => {
                    self.state.metrics.socket_overflow();
                    Err(End::Close(close_code::POLICY, "too slow: outbound queue full"))
                }
                () = &mut idle => Err(End::Close(close_code::GOING_AWAY, "idle timeout")),
                received = self.ws.recv() => {
                    idle.as_mut().reset(Instant::now() + idle_limit);
                    self.on_client_message(received).await
                }
                Some(message) = inbox.recv() => self.deliver(&message).await,
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    async fn on_client_message(
        &mut self,
        received: Option<Result<Message, axum::Error>>,
    ) -> Result<(), End> {
        match received {
            Some(Ok(Message::Text(text))) => self.on_frame(text.as_str()).await,
            Some(Ok(Message::Binary(_))) => {
                self.state.metrics.socket_malformed_frame("binary");
                Err(End::Close(
                    close_code::UNSUPPORTED,
                    "binary frames are not supported",
                ))
            }
            // Pings are answered by the WebSocket layer; both only reset the idle timer.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(()),
            Some(Ok(Message::Close(_))) | None => Err(End::Gone),
            Some(Err(error)) => {
                tracing::debug!(error = %error, "websocket read failed");
                Err(End::Gone)
            }
        }
    }

    async fn on_frame(&mut self, text: &str) -> Result<(), End> {
        let frame = match protocol::decode(self.vsn, text) {
            Ok(frame) => frame,
            Err(error) => {
                self.state.metrics.socket_malformed_frame(error.label());
                return Err(End::Close(close_code::INVALID, "malformed frame"));
            }
        };
        match (frame.topic.as_str(), frame.event.as_str()) {
            ("phoenix", "heartbeat") => self.reply(&frame, &frame.join_ref, "ok", "{}").await,
            (_, "phx_join") => self.join(frame).await,
            (_, "phx_leave") => self.leave(frame).await,
            _ => self.handle_in(frame).await,
        }
    }

    async fn join(&mut self, frame: Frame) -> Result<(), End> {
        let Some(requested) = frame.topic.strip_prefix(USER_TOPIC_PREFIX) else {
            // No channel route: Phoenix answers with a null join ref.
            return self
                .reply(&frame, &null(), "error", &reason("unmatched topic"))
                .await;
        };
        if requested != self.user.as_str() {
            self.state.metrics.channel_join(USER_CHANNEL, false);
            return self
                .reply(&frame, &frame.join_ref, "error", &reason("unauthorized"))
                .await;
        }
        let previous = self.channels.remove(&frame.topic);
        if previous.is_none() && self.channels.len() >= self.state.settings.max_channels {
            self.state.metrics.channel_join(USER_CHANNEL, false);
            return self
                .reply(
                    &frame,
                    &frame.join_ref,
                    "error",
                    &reason("too many channels joined"),
                )
                .await;
        }
        if let Some(previous) = &previous {
            self.state
                .pubsub
                .unsubscribe(&frame.topic, previous.subscription);
        }
        let subscription = self
            .state
            .pubsub
            .subscribe(&frame.topic, self.subscriber.clone());
        self.channels.insert(
            frame.topic.clone(),
            JoinedChannel {
                join_ref: frame.join_ref.clone(),
                subscription,
                last_seq: None,
            },
        );
        self.state.metrics.channel_join(USER_CHANNEL, true);
        self.reply(&frame, &frame.join_ref, "ok", "{}").await?;
        // A second join of a joined topic replaces the first; the old instance is closed with its own
        // (now stale) join ref, which the client ignores.
        if let Some(previous) = previous {
            self.close_channel(&frame.topic, &previous.join_ref).await?;
        }
        Ok(())
    }

    async fn leave(&mut self, frame: Frame) -> Result<(), End> {
        let Some(channel) = self.channels.get(&frame.topic) else {
            return self.reply(&frame, &frame.join_ref, "ok", "{}").await;
        };
        if frame.has_join_ref() && channel.join_ref.get() != frame.join_ref.get() {
            return Ok(()); // stale: an earlier instance of this channel
        }
        let Some(channel) = self.channels.remove(&frame.topic) else {
            return Ok(());
        };
        self.state
            .pubsub
            .unsubscribe(&frame.topic, channel.subscription);
        self.reply(&frame, &channel.join_ref, "ok", "{}").await?;
        self.close_channel(&frame.topic, &channel.join_ref).await
    }

    /// A client event on a channel. User channels take none yet, so a joined channel answers with
    /// an error reply instead of crashing (what Phoenix would do).
    async fn handle_in(&mut self, frame: Frame) -> Result<(), End> {
        let Some(channel) = self.channels.get(&frame.topic) else {
            return self
                .reply(&frame, &null(), "error", &reason("unmatched topic"))
                .await;
        };
        if frame.has_join_ref() && channel.join_ref.get() != frame.join_ref.get() {
            return Ok(()); // stale
        }
        let join_ref = channel.join_ref.clone();
        self.reply(&frame, &join_ref, "error", &reason("unknown event"))
            .await
    }

    /// Pushes a broadcast through the channel's order guard.
    async fn deliver(&mut self, message: &PubSubMessage) -> Result<(), End> {
        let Some(channel) = self.channels.get(&*message.topic) else {
            return Ok(()); // left while the message was queued
        };
        let Some(seq) = message.seq else {
            let join_ref = channel.join_ref.clone();
            return self.push(&join_ref, message).await;
        };
        match channel.admit(seq) {
            Admit::Duplicate => {
                self.state.metrics.socket_duplicate_dropped();
                Ok(())
            }
            Admit::Push => self.push_seq(&message.topic, seq, message).await,
            Admit::Gap { after } => {
                self.fill_gap(&message.topic, after, seq).await?;
                self.push_seq(&message.topic, seq, message).await
            }
        }
    }

    /// Pushes the events of this user between `after` and `before` (exclusive) from PostgreSQL.
    async fn fill_gap(&mut self, topic: &str, after: i64, before: i64) -> Result<(), End> {
        let rows = self
            .state
            .store
            .events_between(
                self.user.as_str(),
                after,
                before,
                self.state.settings.max_gap_fill,
            )
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(error) => {
                // Pushing on beats holding the user's stream; the client sees the gap in seq.
                tracing::warn!(error = ?error, after, before, "cannot fill a gap in a user's events");
                return Ok(());
            }
        };
        self.state.metrics.socket_gap_filled(rows.len());
        for row in rows {
            let Some(envelope) = row.into_envelope() else {
                continue;
            };
            let message = PubSubMessage {
                topic: topic.into(),
                event: envelope.event.as_str().into(),
                seq: Some(envelope.seq),
                payload: envelope.push_payload().into(),
                enqueued_at_ms: Some(envelope.at),
            };
            self.push_seq(topic, envelope.seq, &message).await?;
        }
        Ok(())
    }

    async fn push_seq(
        &mut self,
        topic: &str,
        seq: i64,
        message: &PubSubMessage,
    ) -> Result<(), End> {
        let Some(channel) = self.channels.get(topic) else {
            return Ok(());
        };
        let join_ref = channel.join_ref.clone();
        self.push(&join_ref, message).await?;
        if let Some(channel) = self.channels.get_mut(topic) {
            channel.pushed(seq);
        }
        Ok(())
    }

    async fn push(
        &mut self,
        join_ref: &serde_json::value::RawValue,
        message: &PubSubMessage,
    ) -> Result<(), End> {
        let text = protocol::encode(
            self.vsn,
            join_ref,
            &null(),
            &message.topic,
            &message.event,
            &message.payload,
        );
        self.send(text).await?;
        if let Some(at) = message.enqueued_at_ms {
            self.state
                .metrics
                .push_delivered(now_unix_ms().saturating_sub(at).max(0) as u64);
        }
        Ok(())
    }

    async fn reply(
        &mut self,
        frame: &Frame,
        join_ref: &serde_json::value::RawValue,
        status: &str,
        response: &str,
    ) -> Result<(), End> {
        let text = protocol::encode_reply(
            self.vsn,
            join_ref,
            &frame.msg_ref,
            &frame.topic,
            status,
            response,
        );
        self.send(text).await
    }

    async fn close_channel(
        &mut self,
        topic: &str,
        join_ref: &serde_json::value::RawValue,
    ) -> Result<(), End> {
        let text = protocol::encode(self.vsn, join_ref, join_ref, topic, "phx_close", "{}");
        self.send(text).await
    }

    async fn send(&mut self, text: String) -> Result<(), End> {
        match timeout(self.write_timeout, self.ws.send(Message::Text(text.into()))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => {
                tracing::debug!(error = %error, "websocket write failed");
                Err(End::Gone)
            }
            Err(_) => {
                tracing::debug!("websocket write timed out");
                Err(End::Gone)
            }
        }
    }

    fn leave_all(&mut self) {
        for (topic, channel) in self.channels.drain() {
            self.state.pubsub.unsubscribe(&topic, channel.subscription);
        }
    }
}
