//! One WebSocket connection: the Phoenix protocol loop.
//!
//! The connection task owns the socket and everything about it: its joined channels, its bounded
//! queues (pubsub broadcasts in, channel tasks' frames in), its idle timer. It reads client frames,
//! answers control frames itself, routes client pushes to channels, and writes pushed events through
//! each user channel's order guard. A bad frame closes only this connection; nothing a client sends
//! can panic the node.

use super::SocketState;
use super::channel::{CatchUpBudget, ChannelKind, JoinedChannel, OrderGuard, ToConnection};
use super::protocol::{self, Frame, Reply, Request, TOO_MANY_REQUESTS, UNKNOWN_EVENT, Vsn, null};
use super::stats::StatsChannel;
use super::user_channel::{CatchUp, catch_up_plan, record_acks};
use crate::event::{DISCONNECT_EVENT, SOCKET_ID_PREFIX, USER_TOPIC_PREFIX, UserId};
use crate::metrics::{STATS_CHANNEL, USER_CHANNEL};
use crate::pubsub::{Message as PubSubMessage, Subscriber};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::SinkExt;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

/// Close codes Herald uses (RFC 6455 and the IANA registry).
mod close_code {
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

/// Which socket a connection came in on.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// `/socket`: an authenticated user, who may join `user:<own id>`.
    User(UserId),
    /// `/stats_socket`: no token; any topic is a stats channel.
    Stats,
}

/// Why the loop ended.
pub(super) enum ConnectionEnd {
    /// The client closed, or the transport failed: nothing more to send.
    Gone,
    /// Herald closes with this code and reason.
    Close(u16, &'static str),
}

pub(super) struct Connection {
    ws: WebSocket,
    pub(super) vsn: Vsn,
    pub(super) endpoint: Endpoint,
    pub(super) state: SocketState,
    pub(super) channels: HashMap<String, JoinedChannel>,
    subscriber: Subscriber,
    /// The way back from this connection's channel tasks (stats channels), opened by the first
    /// one: a user socket has none, and the queue's first block alone (1.3 KB) was a fifth of
    /// what a user socket cost beyond the echo server.
    channel_requests: Option<ChannelRequests>,
    write_timeout: Duration,
    /// What this connection may still read for catch-ups (see [`CatchUpBudget`]).
    pub(super) catch_up_budget: CatchUpBudget,
}

/// The queue from a connection's channel tasks to the connection.
struct ChannelRequests {
    sender: mpsc::Sender<ToConnection>,
    receiver: mpsc::Receiver<ToConnection>,
}

/// A connection's inbox for broadcasts, made before the upgrade completes: the connection is
/// subscribed to its user's socket id by then, so a server-side disconnect sent as soon as the
/// client sees its socket open cannot miss it. Dropped unused (the upgrade failed), it unsubscribes.
pub struct Mailbox {
    queue: mpsc::Sender<Arc<PubSubMessage>>,
    broadcasts: mpsc::Receiver<Arc<PubSubMessage>>,
    overflowed: CancellationToken,
    socket_id: Option<SocketIdSubscription>,
}

/// The subscription to a user's socket id (`users_socket:<id>`), undone when dropped.
struct SocketIdSubscription {
    pubsub: crate::pubsub::PubSub,
    topic: String,
    id: crate::pubsub::SubscriptionId,
}

impl Drop for SocketIdSubscription {
    fn drop(&mut self) {
        self.pubsub.unsubscribe(&self.topic, self.id);
    }
}

impl Mailbox {
    /// The inbox of a connection on `endpoint`; a user's is subscribed to its socket id, where a
    /// "disconnect" broadcast closes every connection of the user.
    pub async fn open(state: &SocketState, endpoint: &Endpoint) -> Self {
        let (queue, broadcasts) = mpsc::channel(state.settings.outbound_buffer);
        let overflowed = CancellationToken::new();
        let socket_id = match endpoint {
            Endpoint::User(user) => {
                let subscriber = Subscriber {
                    queue: queue.clone(),
                    overflowed: overflowed.clone(),
                };
                let topic = user.socket_id();
                match state.pubsub.subscribe(&topic, subscriber).await {
                    Ok(id) => Some(SocketIdSubscription {
                        pubsub: state.pubsub.clone(),
                        topic,
                        id,
                    }),
                    Err(error) => {
                        // The connection still works; only a server-side disconnect would miss it.
                        tracing::warn!(error = %error, "cannot subscribe to the socket id");
                        None
                    }
                }
            }
            Endpoint::Stats => None,
        };
        Self {
            queue,
            broadcasts,
            overflowed,
            socket_id,
        }
    }
}

/// Runs a connection until it closes.
pub async fn serve(
    ws: WebSocket,
    vsn: Vsn,
    endpoint: Endpoint,
    state: SocketState,
    mailbox: Mailbox,
) {
    let Mailbox {
        queue,
        mut broadcasts,
        overflowed,
        socket_id,
    } = mailbox;
    let write_timeout = state.settings.write_timeout();
    let mut connection = Connection {
        ws,
        vsn,
        endpoint,
        state: state.clone(),
        channels: HashMap::new(),
        subscriber: Subscriber {
            queue,
            overflowed: overflowed.clone(),
        },
        channel_requests: None,
        write_timeout,
        catch_up_budget: CatchUpBudget::new(state.settings.max_catch_up_per_minute, Instant::now()),
    };
    let end = connection.run(&mut broadcasts, &overflowed).await;
    connection.leave_all();
    drop(socket_id);
    if let ConnectionEnd::Close(code, why) = end {
        tracing::debug!(code, reason = why, "closing connection");
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: why.into(),
        }));
        let _ = timeout(write_timeout, connection.ws.send(frame)).await;
    }
}

impl Connection {
    async fn run(
        &mut self,
        broadcasts: &mut mpsc::Receiver<Arc<PubSubMessage>>,
        overflowed: &CancellationToken,
    ) -> ConnectionEnd {
        let idle_limit = self.state.settings.idle_timeout();
        let idle = tokio::time::sleep(idle_limit);
        tokio::pin!(idle);
        let closing = self.state.closing.clone();
        loop {
            let step = tokio::select! {
                () = closing.cancelled() => Err(ConnectionEnd::Close(close_code::RESTART, "server restarting")),
                () = overflowed.cancelled() => {
                    self.state.metrics.socket_overflow();
                    Err(ConnectionEnd::Close(close_code::POLICY, "too slow: outbound queue full"))
                }
                () = &mut idle => Err(ConnectionEnd::Close(close_code::GOING_AWAY, "idle timeout")),
                received = self.ws.recv() => {
                    idle.as_mut().reset(Instant::now() + idle_limit);
                    self.on_client_message(received).await
                }
                Some(message) = broadcasts.recv() => self.deliver(&message).await,
                Some(request) = next_request(&mut self.channel_requests) => self.on_channel_request(request).await,
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    async fn on_client_message(
        &mut self,
        received: Option<Result<Message, axum::Error>>,
    ) -> Result<(), ConnectionEnd> {
        match received {
            Some(Ok(Message::Text(text))) => self.on_frame(text.as_str()).await,
            Some(Ok(Message::Binary(_))) => {
                self.state.metrics.socket_malformed_frame("binary");
                Err(ConnectionEnd::Close(
                    close_code::UNSUPPORTED,
                    "binary frames are not supported",
                ))
            }
            // Pings are answered by the WebSocket layer; both only reset the idle timer.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(()),
            Some(Ok(Message::Close(_))) | None => Err(ConnectionEnd::Gone),
            Some(Err(error)) => {
                let error = error.into_inner();
                if let Some(tungstenite::Error::Capacity(_)) = error.downcast_ref() {
                    self.state.metrics.socket_malformed_frame("oversized");
                    return Err(ConnectionEnd::Close(close_code::TOO_BIG, "frame too large"));
                }
                tracing::debug!(error = %error, "websocket read failed");
                Err(ConnectionEnd::Gone)
            }
        }
    }

    async fn on_frame(&mut self, text: &str) -> Result<(), ConnectionEnd> {
        let frame = match protocol::decode(self.vsn, text) {
            Ok(frame) => frame,
            Err(error) => {
                self.state.metrics.socket_malformed_frame(error.label());
                return Err(ConnectionEnd::Close(close_code::INVALID, "malformed frame"));
            }
        };
        match Request::of(&frame) {
            Request::Heartbeat => self.reply(&frame, &frame.join_ref, Reply::ok()).await,
            Request::Join => self.join(frame).await,
            Request::Leave => self.leave(frame).await,
            request @ (Request::Ack | Request::Event) => self.handle_in(frame, request).await,
        }
    }

    /// A join: subscribe, then read where the channel starts, then answer and catch up.
    ///
    /// The order is what makes a join gap-free: once the subscription can receive (in cluster mode,
    /// once its topic is bound), every event committed later is broadcast to it; reading the
    /// user's last seq only then leaves no event between the two. Broadcasts that arrive meanwhile
    /// wait in the connection's queue and go through the channel's order guard, which starts at
    /// that seq: what is at or below it is dropped, what follows it is pushed, and a hole is filled
    /// from PostgreSQL. A second join of a joined topic replaces the first only once the new one can
    /// answer; a join that cannot is refused and the instance already joined stays as it was.
    async fn join(&mut self, frame: Frame) -> Result<(), ConnectionEnd> {
        let channel_tag = match &self.endpoint {
            Endpoint::User(_) => USER_CHANNEL,
            Endpoint::Stats => STATS_CHANNEL,
        };
        if let Err(refusal) = self.admit_join(&frame) {
            return self.refuse_join(&frame, channel_tag, refusal).await;
        }
        let replacing = self.channels.contains_key(&frame.topic);
        if !replacing && self.channels.len() >= self.state.settings.max_channels {
            return self
                .refuse_join(&frame, channel_tag, Refusal::TooManyChannels)
                .await;
        }
        let kind = match self.start_channel(&frame).await {
            Ok(kind) => kind,
            Err(error) => {
                tracing::warn!(error = %error, topic = %frame.topic, "join failed: fan-out unavailable");
                return self
                    .refuse_join(&frame, channel_tag, Refusal::Unavailable)
                    .await;
            }
        };
        // A join whose start cannot be read is refused (the official client retries with backoff),
        // not answered with a last_seq it cannot trust.
        let catch_up = match &self.endpoint {
            Endpoint::User(user) => match catch_up_plan(&self.state, user, &frame.payload).await {
                Some(plan) => Some(plan),
                None => {
                    self.stop_channel(&frame.topic, &kind);
                    return self
                        .refuse_join(&frame, channel_tag, Refusal::Unavailable)
                        .await;
                }
            },
            Endpoint::Stats => None,
        };
        let previous = self.channels.remove(&frame.topic);
        if let Some(previous) = &previous {
            self.stop_channel(&frame.topic, &previous.kind);
        }
        let mut channel = JoinedChannel {
            join_ref: frame.join_ref.clone(),
            kind,
        };
        if let (Some(plan), Some(guard)) = (&catch_up, channel.guard_mut()) {
            *guard = OrderGuard::after(plan.start());
        }
        self.channels.insert(frame.topic.clone(), channel);
        self.state.metrics.channel_join(channel_tag, true);
        let reply = catch_up
            .as_ref()
            .map_or_else(Reply::ok, |plan| Reply::ok_with(plan.response()));
        self.reply(&frame, &frame.join_ref, reply).await?;
        // The old instance is closed with its own (now stale) join ref, which the client ignores.
        if let Some(previous) = previous {
            self.close_channel(&frame.topic, &previous.join_ref).await?;
        }
        if let Some(CatchUp {
            from: Some(after),
            missed,
            ..
        }) = catch_up
        {
            self.catch_up(&frame.topic, after, missed).await?;
        }
        Ok(())
    }

    /// Answers a join with an error reply carrying the refusal's reason, and counts the refusal.
    /// A topic no channel serves is answered as Phoenix does with no route: with a null join ref,
    /// and not counted, since no channel handler was involved.
    async fn refuse_join(
        &mut self,
        frame: &Frame,
        channel_tag: &'static str,
        refusal: Refusal,
    ) -> Result<(), ConnectionEnd> {
        let join_ref: &RawValue = if refusal == Refusal::Unmatched {
            null()
        } else {
            self.state.metrics.channel_join(channel_tag, false);
            &frame.join_ref
        };
        self.reply(frame, join_ref, Reply::error(refusal.reason()))
            .await
    }

    /// Routes and authorises a join.
    fn admit_join(&self, frame: &Frame) -> Result<(), Refusal> {
        if !frame.payload.get().trim_start().starts_with('{') {
            return Err(Refusal::ParamsNotObject);
        }
        match &self.endpoint {
            Endpoint::User(user) => {
                let requested = frame
                    .topic
                    .strip_prefix(USER_TOPIC_PREFIX)
                    .ok_or(Refusal::Unmatched)?;
                if requested != user.as_str() {
                    return Err(Refusal::Unauthorized);
                }
                Ok(())
            }
            // As Real-Time Phoenix's StatsChannel: "invalid" always fails, every other topic joins.
            Endpoint::Stats if frame.topic == "invalid" => Err(Refusal::AlwaysFails),
            Endpoint::Stats => Ok(()),
        }
    }

    /// Makes the channel's state: a user channel's subscription (returned once it can receive;
    /// its guard is set by the join), or a stats channel's task.
    async fn start_channel(&mut self, frame: &Frame) -> Result<ChannelKind, crate::pubsub::Error> {
        Ok(match &self.endpoint {
            Endpoint::User(_) => ChannelKind::User {
                subscription: self
                    .state
                    .pubsub
                    .subscribe(&frame.topic, self.subscriber.clone())
                    .await?,
                guard: OrderGuard::after(0),
            },
            Endpoint::Stats => {
                let connection = self.channel_requests().clone();
                ChannelKind::Stats(StatsChannel::spawn(
                    self.vsn,
                    &frame.topic,
                    &frame.join_ref,
                    connection,
                    &self.state.settings,
                    self.state.metrics.clone(),
                ))
            }
        })
    }

    /// The sender channel tasks answer through, the queue opened on first use.
    fn channel_requests(&mut self) -> &mpsc::Sender<ToConnection> {
        let capacity = self.state.settings.outbound_buffer;
        &self
            .channel_requests
            .get_or_insert_with(|| {
                let (sender, receiver) = mpsc::channel(capacity);
                ChannelRequests { sender, receiver }
            })
            .sender
    }

    pub(super) fn stop_channel(&self, topic: &str, kind: &ChannelKind) {
        if let ChannelKind::User { subscription, .. } = kind {
            self.state.pubsub.unsubscribe(topic, *subscription);
        }
        // A stats channel stops when its handle is dropped.
    }

    async fn leave(&mut self, frame: Frame) -> Result<(), ConnectionEnd> {
        let Some(channel) = self.channels.get(&frame.topic) else {
            return self.reply(&frame, &frame.join_ref, Reply::ok()).await;
        };
        if is_stale(&frame, &channel.join_ref) {
            return Ok(());
        }
        let Some(channel) = self.channels.remove(&frame.topic) else {
            return Ok(());
        };
        self.stop_channel(&frame.topic, &channel.kind);
        self.reply(&frame, &channel.join_ref, Reply::ok()).await?;
        self.close_channel(&frame.topic, &channel.join_ref).await
    }

    /// A client event on a channel: stats channels take it in their own task; user channels take no
    /// client events yet and answer with an error reply instead of crashing (what Phoenix would do).
    async fn handle_in(&mut self, frame: Frame, request: Request) -> Result<(), ConnectionEnd> {
        let Some(channel) = self.channels.get(&frame.topic) else {
            return self
                .reply(&frame, null(), Reply::error(Refusal::Unmatched.reason()))
                .await;
        };
        if is_stale(&frame, &channel.join_ref) {
            return Ok(());
        }
        let join_ref = channel.join_ref.clone();
        match &channel.kind {
            ChannelKind::Stats(stats) => match stats.push(frame) {
                Ok(()) => Ok(()),
                Err(frame) => {
                    self.reply(&frame, &join_ref, Reply::error(TOO_MANY_REQUESTS))
                        .await
                }
            },
            ChannelKind::User { .. } if request == Request::Ack => {
                let Endpoint::User(user) = &self.endpoint else {
                    return Ok(());
                };
                let reply = record_acks(&self.state, user, &frame).await;
                self.reply(&frame, &join_ref, reply).await
            }
            ChannelKind::User { .. } => {
                self.reply(&frame, &join_ref, Reply::error(UNKNOWN_EVENT))
                    .await
            }
        }
    }

    async fn on_channel_request(&mut self, request: ToConnection) -> Result<(), ConnectionEnd> {
        match request {
            ToConnection::Frame(text) => self.send(text).await,
            ToConnection::Close { topic, join_ref } => {
                let current = self
                    .channels
                    .get(&topic)
                    .is_some_and(|c| c.join_ref.get() == join_ref.get());
                if !current {
                    return Ok(());
                }
                if let Some(channel) = self.channels.remove(&topic) {
                    self.stop_channel(&topic, &channel.kind);
                }
                self.close_channel(&topic, &join_ref).await
            }
        }
    }

    /// Pushes a broadcast's pushes through the channel's order guard, then flushes them together
    /// (a run of events costs one write to the socket, not one per event).
    async fn deliver(&mut self, message: &PubSubMessage) -> Result<(), ConnectionEnd> {
        if message.topic.starts_with(SOCKET_ID_PREFIX) {
            if message.pushes.iter().any(|p| p.event == DISCONNECT_EVENT) {
                return Err(ConnectionEnd::Close(
                    close_code::GOING_AWAY,
                    "disconnected by the server",
                ));
            }
            return Ok(());
        }
        for push in &message.pushes {
            self.deliver_push(&message.topic, push).await?;
        }
        self.flush().await
    }

    async fn reply(
        &mut self,
        frame: &Frame,
        join_ref: &RawValue,
        reply: Reply,
    ) -> Result<(), ConnectionEnd> {
        let text = protocol::encode_reply(self.vsn, join_ref, &frame.msg_ref, &frame.topic, &reply);
        self.send(text).await
    }

    async fn close_channel(
        &mut self,
        topic: &str,
        join_ref: &RawValue,
    ) -> Result<(), ConnectionEnd> {
        let text = protocol::encode(self.vsn, join_ref, join_ref, topic, "phx_close", "{}");
        self.send(text).await
    }

    /// Writes a frame and flushes it (with whatever was queued before it).
    pub(super) async fn send(&mut self, text: String) -> Result<(), ConnectionEnd> {
        self.feed(text).await?;
        self.flush().await
    }

    /// Queues a frame without flushing (it may still be written if the write buffer fills).
    pub(super) async fn feed(&mut self, text: String) -> Result<(), ConnectionEnd> {
        let fed = timeout(self.write_timeout, self.ws.feed(Message::Text(text.into()))).await;
        written(fed)
    }

    pub(super) async fn flush(&mut self) -> Result<(), ConnectionEnd> {
        written(timeout(self.write_timeout, self.ws.flush()).await)
    }

    fn leave_all(&mut self) {
        let channels: Vec<_> = self.channels.drain().collect();
        for (topic, channel) in channels {
            self.stop_channel(&topic, &channel.kind);
        }
    }
}

/// The next request from the connection's channel tasks; never, while it has none.
async fn next_request(requests: &mut Option<ChannelRequests>) -> Option<ToConnection> {
    match requests {
        Some(requests) => requests.receiver.recv().await,
        None => std::future::pending().await,
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

/// Why a join is refused; the client reads the reason in the error reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// No channel serves this topic (also the answer to a client event on a topic not joined).
    Unmatched,
    /// The join params are not a JSON object.
    ParamsNotObject,
    /// A user channel of another user.
    Unauthorized,
    /// The stats topic `invalid`, which Real-Time Phoenix's StatsChannel always refuses.
    AlwaysFails,
    /// PostgreSQL or the fan-out could not be read in time: the client retries with backoff.
    Unavailable,
    /// `socket.max_channels` channels are joined on this connection.
    TooManyChannels,
}

impl Refusal {
    /// The reason the error reply carries.
    const fn reason(self) -> &'static str {
        match self {
            Self::Unmatched => "unmatched topic",
            Self::ParamsNotObject => "join params must be an object",
            Self::Unauthorized => "unauthorized",
            Self::AlwaysFails => "always fails",
            Self::Unavailable => "unavailable, retry",
            Self::TooManyChannels => "too many channels joined",
        }
    }
}

/// A frame whose non-null join ref is not the channel's current one belongs to an earlier instance
/// of the channel: Phoenix ignores it.
fn is_stale(frame: &Frame, current: &RawValue) -> bool {
    frame.has_join_ref() && frame.join_ref.get() != current.get()
}
