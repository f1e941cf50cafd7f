//! One WebSocket connection: the Phoenix protocol loop.
//!
//! The connection task owns the socket and everything about it: its joined channels, its bounded
//! queues (pubsub broadcasts in, channel tasks' frames in), its idle timer. It reads client frames,
//! answers control frames itself, routes client pushes to channels, and hands pushed events to
//! their user channel ([`UserChannel`]), which puts them through its order guard. A bad frame
//! closes only this connection; nothing a client sends can panic the node.

use super::SocketState;
use super::channel::{ByTopic, CatchUpBudget, ChannelKind, JoinedChannel, ToConnection, Unfilled};
use super::mailbox::{Mailbox, SocketIdSubscription};
use super::protocol::{self, Frame, Reply, Request, TOO_MANY_REQUESTS, UNKNOWN_EVENT, Vsn, null};
use super::stats::StatsChannel;
use super::user_channel::{CatchUp, ChannelIo, UserChannel, record_acks};
use super::wire::{Wire, close_code};
use crate::event::{DISCONNECT_EVENT, SOCKET_ID_PREFIX, Topic, USER_TOPIC_PREFIX, UserId};
use crate::metrics::{STATS_CHANNEL, USER_CHANNEL};
use crate::pubsub::{Message as PubSubMessage, Subscriber};
use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use serde_json::value::RawValue;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;

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

/// One connection's state, owned by its task.
///
/// The task's future is what every idle socket holds, so it is kept small (measured with
/// `scripts/sockmem`; see BENCHMARKS.md, *Memory per socket*): this struct is built before the
/// task runs and moved into it once, and the rare, large steps (a join with its PostgreSQL read,
/// a leave, a channel event, a gap fill or catch-up) run as boxed futures that exist only while
/// they run. Inline, each `async fn` argument and nested future is room the task keeps for its
/// whole life: 4.7 KB per socket, where the echo server's whole socket is 6.8 KB.
pub(super) struct Connection {
    wire: Wire,
    endpoint: Endpoint,
    state: SocketState,
    channels: ByTopic<JoinedChannel>,
    /// What this connection's channels subscribe with: its inbox and its overflow switch.
    subscriber: Subscriber,
    /// The inbox's receiving end: broadcasts to this connection's topics.
    broadcasts: mpsc::Receiver<Arc<PubSubMessage>>,
    /// The user's socket-id subscription, undone as the connection ends.
    socket_id: Option<SocketIdSubscription>,
    /// The way back from this connection's channel tasks (stats channels), opened by the first
    /// one: a user socket has none, and the queue's first block alone (1.3 KB) was a fifth of
    /// what a user socket cost beyond the echo server.
    channel_requests: Option<ChannelRequests>,
    /// What this connection may still read for catch-ups (see [`CatchUpBudget`]): the
    /// connection's, not a channel's, so rejoining does not refill it.
    catch_up_budget: CatchUpBudget,
}

/// The queue from a connection's channel tasks to the connection.
struct ChannelRequests {
    sender: mpsc::Sender<ToConnection>,
    receiver: mpsc::Receiver<ToConnection>,
}

/// What a connection holds until it has ended (its close frame sent): its place in the node's
/// drain and its slot under `socket.max_connections`.
pub(super) type Held = (TaskTrackerToken, OwnedSemaphorePermit);

impl Connection {
    /// The connection on `ws`, with the mailbox opened (and subscribed) before its upgrade.
    pub(super) fn new(
        ws: WebSocket,
        vsn: Vsn,
        endpoint: Endpoint,
        state: SocketState,
        mailbox: Mailbox,
    ) -> Self {
        let Mailbox {
            queue,
            broadcasts,
            overflowed,
            socket_id,
        } = mailbox;
        let catch_up_budget =
            CatchUpBudget::new(state.settings.max_catch_up_per_minute, Instant::now());
        Self {
            wire: Wire::new(ws, vsn, state.settings.write_timeout()),
            endpoint,
            state,
            channels: ByTopic::default(),
            subscriber: Subscriber { queue, overflowed },
            broadcasts,
            socket_id,
            channel_requests: None,
            catch_up_budget,
        }
    }

    /// Runs the connection until it closes; `held` is released once it has.
    // Not an `async fn`: one moves its arguments into locals and keeps both (680 more bytes per
    // socket); an async block uses what it captured in place.
    #[allow(clippy::manual_async_fn)]
    pub(super) fn serve(mut self, held: Held) -> impl Future<Output = ()> + Send {
        async move {
            let end = self.run().await;
            self.leave_all();
            self.socket_id = None;
            if let ConnectionEnd::Close(code, why) = end {
                tracing::debug!(code, reason = why, "closing connection");
                self.wire.close(code, why).await;
            }
            drop(held);
        }
    }

    async fn run(&mut self) -> ConnectionEnd {
        let idle_limit = self.state.settings.idle_timeout();
        let idle = tokio::time::sleep(idle_limit);
        tokio::pin!(idle);
        let closing = self.state.closing.clone();
        let overflowed = self.subscriber.overflowed.clone();
        loop {
            let step = tokio::select! {
                () = closing.cancelled() => Err(ConnectionEnd::Close(close_code::RESTART, "server restarting")),
                () = overflowed.cancelled() => {
                    self.state.metrics.socket_overflow();
                    Err(ConnectionEnd::Close(close_code::POLICY, "too slow: outbound queue full"))
                }
                () = &mut idle => Err(ConnectionEnd::Close(close_code::GOING_AWAY, "idle timeout")),
                received = self.wire.ws.recv() => {
                    idle.as_mut().reset(Instant::now() + idle_limit);
                    match self.client_text(received) {
                        Ok(Some(text)) => self.on_frame(text.as_str()).await,
                        Ok(None) => Ok(()),
                        Err(end) => Err(end),
                    }
                }
                Some(message) = self.broadcasts.recv() => self.deliver(&message).await,
                Some(request) = next_request(&mut self.channel_requests) => self.on_channel_request(request).await,
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// What the client sent, as the text of a frame to handle (`None`: nothing to do). Not async,
    /// so the task never holds the message twice over while the frame is handled.
    fn client_text(
        &self,
        received: Option<Result<Message, axum::Error>>,
    ) -> Result<Option<Utf8Bytes>, ConnectionEnd> {
        match received {
            Some(Ok(Message::Text(text))) => Ok(Some(text)),
            Some(Ok(Message::Binary(_))) => {
                self.state.metrics.socket_malformed_frame("binary");
                Err(ConnectionEnd::Close(
                    close_code::UNSUPPORTED,
                    "binary frames are not supported",
                ))
            }
            // Pings are answered by the WebSocket layer; both only reset the idle timer.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(None),
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
        let frame = match protocol::decode(self.wire.vsn, text) {
            Ok(frame) => frame,
            Err(error) => {
                self.state.metrics.socket_malformed_frame(error.label());
                return Err(ConnectionEnd::Close(close_code::INVALID, "malformed frame"));
            }
        };
        // Heartbeats are answered inline; the rest is boxed (see [`Connection`]): rare, and large.
        match Request::of(&frame) {
            Request::Heartbeat => self.reply(&frame, &frame.join_ref, Reply::ok()).await,
            Request::Join => Box::pin(self.join(frame)).await,
            Request::Leave => Box::pin(self.leave(frame)).await,
            request @ (Request::Ack | Request::Event) => {
                Box::pin(self.handle_in(frame, request)).await
            }
        }
    }

    /// A join: start the channel (a user channel subscribes, then reads where it starts: see
    /// [`UserChannel::open`]), then answer and catch up. A second join of a joined topic replaces
    /// the first only once the new one can answer; a join that cannot is refused and the instance
    /// already joined stays as it was.
    async fn join(&mut self, frame: Frame) -> Result<(), ConnectionEnd> {
        let channel_tag = match &self.endpoint {
            Endpoint::User(_) => USER_CHANNEL,
            Endpoint::Stats => STATS_CHANNEL,
        };
        if let Err(refusal) = self.admit_join(&frame) {
            return self.refuse_join(&frame, channel_tag, refusal).await;
        }
        let replacing = self.channels.contains(&frame.topic);
        if !replacing && self.channels.len() >= self.state.settings.max_channels {
            return self
                .refuse_join(&frame, channel_tag, Refusal::TooManyChannels)
                .await;
        }
        let Some((kind, catch_up)) = self.start_channel(&frame).await else {
            return self
                .refuse_join(&frame, channel_tag, Refusal::Unavailable)
                .await;
        };
        let previous = self.channels.remove(&frame.topic);
        if let Some(previous) = &previous {
            self.stop_channel(&frame.topic, &previous.kind);
        }
        let channel = JoinedChannel {
            join_ref: frame.join_ref.clone(),
            kind,
        };
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
                    .as_str()
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

    /// Makes the channel's state: a user channel, subscribed and with its start read (and what its
    /// join answers), or a stats channel's task. `None` when the user channel cannot start now.
    async fn start_channel(&mut self, frame: &Frame) -> Option<(ChannelKind, Option<CatchUp>)> {
        match &self.endpoint {
            Endpoint::User(user) => {
                let subscriber = self.subscriber.clone();
                let (channel, plan) =
                    UserChannel::open(&self.state, user, &frame.topic, subscriber, &frame.payload)
                        .await?;
                Some((ChannelKind::User(channel), Some(plan)))
            }
            Endpoint::Stats => {
                let connection = self.channel_requests().clone();
                let channel = StatsChannel::spawn(
                    self.wire.vsn,
                    &frame.topic,
                    &frame.join_ref,
                    connection,
                    &self.state.settings,
                    self.state.metrics.clone(),
                );
                Some((ChannelKind::Stats(channel), None))
            }
        }
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

    fn stop_channel(&self, topic: &Topic, kind: &ChannelKind) {
        match kind {
            ChannelKind::User(channel) => channel.stop(&self.state, topic),
            // A stats channel stops when its handle is dropped.
            ChannelKind::Stats(_) => {}
        }
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
            ChannelKind::User(_) if request == Request::Ack => {
                let Endpoint::User(user) = &self.endpoint else {
                    return Ok(());
                };
                let reply = record_acks(&self.state, user, &frame).await;
                self.reply(&frame, &join_ref, reply).await
            }
            ChannelKind::User(_) => {
                self.reply(&frame, &join_ref, Reply::error(UNKNOWN_EVENT))
                    .await
            }
        }
    }

    async fn on_channel_request(&mut self, request: ToConnection) -> Result<(), ConnectionEnd> {
        match request {
            ToConnection::Frame(text) => self.wire.send(text).await,
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

    /// Hands a broadcast's pushes to their user channel, then flushes them together (a run of
    /// events costs one write to the socket, not one per event).
    async fn deliver(&mut self, message: &PubSubMessage) -> Result<(), ConnectionEnd> {
        if message.topic.as_str().starts_with(SOCKET_ID_PREFIX) {
            if message.pushes.iter().any(|p| p.event == DISCONNECT_EVENT) {
                return Err(ConnectionEnd::Close(
                    close_code::GOING_AWAY,
                    "disconnected by the server",
                ));
            }
            return Ok(());
        }
        // None: left while the message was queued.
        let Some((channel, mut io)) = self.user_channel(&message.topic) else {
            return self.wire.flush().await;
        };
        if message.from_commit {
            channel.push_from_commit(&mut io, &message.pushes).await?;
            return self.wire.flush().await;
        }
        let mut hole = None;
        for push in &message.pushes {
            if let Err(found) = channel.deliver(&mut io, push).await? {
                hole = Some(found); // the channel closes over it: nothing after it goes out
                break;
            }
        }
        if let Some(hole) = hole {
            self.error_channel(&message.topic, hole).await?;
        }
        self.wire.flush().await
    }

    /// Catches `topic`'s user channel up from PostgreSQL after `after` (see
    /// [`UserChannel::catch_up`]).
    async fn catch_up(
        &mut self,
        topic: &Topic,
        after: i64,
        missed: bool,
    ) -> Result<(), ConnectionEnd> {
        let Some((channel, mut io)) = self.user_channel(topic) else {
            return Ok(());
        };
        match channel.catch_up(&mut io, after, missed).await? {
            Ok(()) => Ok(()),
            Err(hole) => self.error_channel(topic, hole).await,
        }
    }

    /// `topic`'s user channel, if joined, with what its steps borrow of this connection.
    fn user_channel<'a>(
        &'a mut self,
        topic: &'a Topic,
    ) -> Option<(&'a mut UserChannel, ChannelIo<'a>)> {
        let Endpoint::User(user) = &self.endpoint else {
            return None;
        };
        let JoinedChannel {
            join_ref,
            kind: ChannelKind::User(channel),
        } = self.channels.get_mut(topic)?
        else {
            return None;
        };
        let io = ChannelIo {
            wire: &mut self.wire,
            state: &self.state,
            user,
            budget: &mut self.catch_up_budget,
            topic,
            join_ref,
        };
        Some((channel, io))
    }

    /// Removes `topic`'s user channel over a hole it cannot fill now, and closes it with
    /// `phx_error` ([`UserChannel::close_over`]).
    async fn error_channel(&mut self, topic: &Topic, hole: Unfilled) -> Result<(), ConnectionEnd> {
        let Some(JoinedChannel {
            join_ref,
            kind: ChannelKind::User(channel),
        }) = self.channels.remove(topic)
        else {
            return Ok(());
        };
        let payload = channel.close_over(&self.state, topic, hole);
        self.wire
            .send_channel_event(&join_ref, topic.as_str(), "phx_error", &payload)
            .await
    }

    async fn reply(
        &mut self,
        frame: &Frame,
        join_ref: &RawValue,
        reply: Reply,
    ) -> Result<(), ConnectionEnd> {
        self.wire
            .reply(join_ref, &frame.msg_ref, frame.topic.as_str(), &reply)
            .await
    }

    async fn close_channel(
        &mut self,
        topic: &Topic,
        join_ref: &RawValue,
    ) -> Result<(), ConnectionEnd> {
        self.wire
            .send_channel_event(join_ref, topic.as_str(), "phx_close", "{}")
            .await
    }

    fn leave_all(&mut self) {
        for (topic, channel) in self.channels.take_all() {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, F: Future>(_: impl FnOnce(A, B) -> F) -> usize {
        size_of::<F>()
    }

    #[test]
    fn an_idle_connection_task_stays_small() {
        // Every connected socket holds this future for its whole life. It was 3,536 bytes (in a
        // 4,736-byte task) while joins, gap fills and copies of arguments were inline; 1,464 before
        // the user channel had a type of its own, 1,520 since (what a push borrows of the
        // connection, `ChannelIo`, is held while it is written).
        // Grown past the bound: see `Connection` on what keeps it small, then measure with
        // `scripts/sockmem`.
        let size = future_size(Connection::serve);
        assert!(
            size <= 1_600,
            "the connection task's future grew to {size} bytes"
        );
    }
}
