//! The user channel (`user:<id>`): what its join answers (`last_seq`, `missed`) and the catch-up
//! that follows, the order guard every pushed event goes through, gap fills from PostgreSQL, and the
//! client's acks. [`UserChannel`] owns the channel's state (its subscription and order guard); the
//! connection owns the socket and the protocol loop, and lends a step what it needs of them
//! ([`ChannelIo`]). This is the part that knows what a user's stream of events must look like.

use super::SocketState;
use super::channel::{Admit, CatchUpBudget, GapFill, OrderGuard, Unfilled};
use super::connection::ConnectionEnd;
use super::protocol::{Frame, Reply};
use super::wire::Wire;
use crate::event::{EventId, RESYNC_EVENT, Topic, UserId, now_unix_ms};
use crate::pubsub::{Push, Subscriber, SubscriptionId};
use crate::store::{ReadMark, SeqBounds, SeqOrder};
use serde_json::json;
use serde_json::value::RawValue;
use std::time::Duration;
use tokio::time::{Instant, timeout};

/// How long one page of a gap fill or catch-up may take to read: the connection waits for it, and
/// a stalled read must end (the channel is closed with `phx_error` and the client rejoins) well
/// before the client's 30 s heartbeat would give the whole connection up.
pub(super) const GAP_PAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads what a user channel join needs to say and do: the user's current last seq, and whether
/// retention removed any event after the requested `last_seq` (the user's retention watermark,
/// raised by the statement that prunes, is past it). `None` (logged) when PostgreSQL cannot be
/// read in time: the join is refused and the client retries.
///
/// Called only once the channel's subscription can receive (see [`UserChannel::open`]): every event
/// committed after this read is broadcast after it, so it reaches the channel, and every event at
/// or below the answer is history the channel drops (or, with `last_seq`, catches up from
/// PostgreSQL). Read before the subscription, an event committed in between fell through.
async fn catch_up_plan(state: &SocketState, user: &UserId, params: &RawValue) -> Option<CatchUp> {
    let requested = serde_json::from_str::<UserJoinParams>(params.get())
        .ok()
        .and_then(|p| p.last_seq)
        .filter(|seq| *seq >= 0);
    let read = timeout(GAP_PAGE_TIMEOUT, state.join_reads.seq_bounds(user.as_str())).await;
    let SeqBounds {
        pruned_through,
        last_seq: last,
    } = match read {
        Ok(Some(bounds)) => bounds,
        // Logged by the reader.
        Ok(None) => return None,
        Err(_) => {
            tracing::warn!("join refused: reading the user's seqs timed out");
            return None;
        }
    };
    let last_seq = last.unwrap_or(0);
    Some(CatchUp {
        // A client cannot have seen more than was committed; one that says so (its store was
        // reset) catches up from the user's last seq rather than dropping what comes next.
        from: requested.map(|r| r.min(last_seq)),
        last_seq,
        // Retention removed events the client has not seen.
        missed: matches!((requested, pruned_through), (Some(r), Some(p)) if p > r),
    })
}

/// `ack {"ids": [...]}`: the client showed these events. Answers `{"acked": n}` (newly recorded).
pub(super) async fn record_acks(state: &SocketState, user: &UserId, frame: &Frame) -> Reply {
    let ids = match serde_json::from_str::<AckParams>(frame.payload.get()) {
        Ok(params) if params.ids.len() <= MAX_ACK_IDS => params.ids,
        _ => {
            return Reply::error("ack takes {\"ids\": [event ids]}, at most 1000");
        }
    };
    match state
        .store
        .record_acks(user.as_str(), ReadMark::Ids(&ids))
        .await
    {
        Ok(acked) => {
            state.metrics.client_acked(acked);
            Reply::ok_with(json!({ "acked": acked }).to_string())
        }
        Err(error) => {
            tracing::warn!(error = ?error, "cannot record client acks");
            Reply::error("acks could not be recorded; retry")
        }
    }
}

/// Most ids in one ack.
const MAX_ACK_IDS: usize = 1_000;

/// Payload of an ack.
#[derive(serde::Deserialize)]
struct AckParams {
    ids: Vec<EventId>,
}

/// Join params of a user channel; other params are the client's business and ignored.
#[derive(serde::Deserialize)]
struct UserJoinParams {
    last_seq: Option<i64>,
}

/// What a user channel join answers and whether it catches up.
pub(super) struct CatchUp {
    /// Catch up after this seq (the client's `last_seq`, at most `last_seq`).
    pub(super) from: Option<i64>,
    /// The user's latest seq, read once the channel could receive.
    pub(super) last_seq: i64,
    /// Events after `from` were already removed by retention: the client missed them.
    pub(super) missed: bool,
}

impl CatchUp {
    pub(super) fn response(&self) -> String {
        json!({ "last_seq": self.last_seq, "missed": self.missed }).to_string()
    }

    /// The seq the channel starts after: its order guard's baseline. A join without `last_seq`
    /// pushes exactly the events after the `last_seq` it answered; one with `last_seq` pushes
    /// everything after it, history first.
    pub(super) fn start(&self) -> i64 {
        self.from.unwrap_or(self.last_seq)
    }
}

/// A joined user channel: the subscription feeding it and its order guard, the last line of the
/// user's order.
pub struct UserChannel {
    subscription: SubscriptionId,
    guard: OrderGuard,
}

/// What a user channel's step borrows of its connection: the socket, the node's state, the
/// connection's user and catch-up budget, and the channel's topic and join ref (kept by the
/// connection, which looks channels up by topic).
pub(super) struct ChannelIo<'a> {
    pub(super) wire: &'a mut Wire,
    pub(super) state: &'a SocketState,
    pub(super) user: &'a UserId,
    pub(super) budget: &'a mut CatchUpBudget,
    pub(super) topic: &'a Topic,
    pub(super) join_ref: &'a RawValue,
}

/// How a step left a user channel: `Err` is a hole in the user's stream it cannot fill now, and
/// the connection closes the channel with `phx_error` ([`UserChannel::close_over`]) rather than push past
/// it.
pub(super) type Filled = Result<(), Unfilled>;

impl UserChannel {
    /// Opens `user`'s channel on `topic`: subscribes, then reads where the channel starts.
    /// `None` (logged) when the fan-out or PostgreSQL cannot answer: the join is refused and the
    /// client retries.
    ///
    /// The order is what makes a join gap-free: once the subscription can receive (in cluster
    /// mode, once its topic is bound), every event committed later is broadcast to it; reading the
    /// user's last seq only then leaves no event between the two. Broadcasts that arrive meanwhile
    /// wait in the connection's queue and go through the order guard, which starts at that seq:
    /// what is at or below it is dropped, what follows it is pushed, and a hole is filled from
    /// PostgreSQL.
    pub(super) async fn open(
        state: &SocketState,
        user: &UserId,
        topic: &Topic,
        subscriber: Subscriber,
        params: &RawValue,
    ) -> Option<(Self, CatchUp)> {
        let subscription = match state.pubsub.subscribe(topic, subscriber).await {
            Ok(subscription) => subscription,
            Err(error) => {
                tracing::warn!(error = %error, topic = %topic, "join failed: fan-out unavailable");
                return None;
            }
        };
        // A join whose start cannot be read is refused (the official client retries with
        // backoff), not answered with a last_seq it cannot trust.
        let Some(plan) = catch_up_plan(state, user, params).await else {
            state.pubsub.unsubscribe(topic, subscription);
            return None;
        };
        let channel = Self {
            subscription,
            guard: OrderGuard::after(plan.start()),
        };
        Some((channel, plan))
    }

    /// Ends the channel's subscription; the channel is gone once its connection drops it.
    pub(super) fn stop(&self, state: &SocketState, topic: &Topic) {
        state.pubsub.unsubscribe(topic, self.subscription);
    }

    /// Pushes the user's events after `after` from PostgreSQL, page by page, before live events
    /// (which wait in the connection's queue and are dropped by the order guard if already sent).
    /// Events retention removed are passed over only when the client was told (`missed`); one
    /// pruned after the join read its watermark, or PostgreSQL unreadable, is a hole: the channel
    /// is closed with `phx_error` and the client rejoins (and hears `missed: true` then).
    pub(super) async fn catch_up(
        &mut self,
        io: &mut ChannelIo<'_>,
        after: i64,
        missed: bool,
    ) -> Result<Filled, ConnectionEnd> {
        self.guard.pushed(after);
        let page = io.state.settings.max_gap_fill;
        self.fill(io, GapFill::catch_up(after, page, missed)).await
    }

    /// Pushes one event through the order guard: a duplicate is dropped, a gap is filled first, a
    /// resync catches up. The fill and the catch-up read PostgreSQL and run boxed: inline, their
    /// futures would be room every idle connection keeps (see `Connection`). The caller flushes.
    pub(super) async fn deliver(
        &mut self,
        io: &mut ChannelIo<'_>,
        push: &Push,
    ) -> Result<Filled, ConnectionEnd> {
        if push.event == RESYNC_EVENT {
            // Broadcasts may have been lost while the node's fan-out queue was away. Nothing was
            // reported missed to this client: any hole is told by phx_error.
            let after = self.guard.last();
            return Box::pin(self.catch_up(io, after, false)).await;
        }
        let Some(seq) = push.seq else {
            return self.push(io, None, push).await.map(Ok);
        };
        match self.guard.admit(seq) {
            Admit::Duplicate => {
                if !self.guard.was_pushed_from_commit(seq) {
                    io.state.metrics.socket_duplicate_dropped();
                }
                Ok(Ok(()))
            }
            Admit::Push => self.push(io, Some(seq), push).await.map(Ok),
            Admit::Gap { after } => Box::pin(self.fill_gap(io, after, seq, push)).await,
        }
    }

    /// Pushes the events of this node's group commit that are the next seqs the client needs. One
    /// already pushed (the worker was first) or further ahead (an earlier event is still on its
    /// way, from another api node or a retry) is left alone: the worker's copy follows and goes
    /// through [`Self::deliver`], which fills gaps. So the head start never opens a gap, never
    /// reads PostgreSQL and never pushes a seq twice. The caller flushes.
    pub(super) async fn push_from_commit(
        &mut self,
        io: &mut ChannelIo<'_>,
        pushes: &[Push],
    ) -> Result<(), ConnectionEnd> {
        let (mut pushed, mut behind, mut ahead) = (0, 0, 0);
        for push in pushes {
            let Some(seq) = push.seq else { continue };
            match self.guard.admit(seq) {
                Admit::Push => {
                    self.guard.pushed_from_commit(seq);
                    self.push(io, Some(seq), push).await?;
                    pushed += 1;
                }
                Admit::Duplicate => behind += 1,
                Admit::Gap { .. } => ahead += 1,
            }
        }
        let metrics = &io.state.metrics;
        metrics.socket_push_from_commit("pushed", pushed);
        metrics.socket_push_from_commit("behind", behind);
        metrics.socket_push_from_commit("ahead", ahead);
        Ok(())
    }

    /// Fills the gap between `after` (pushed) and `seq` (just arrived) from PostgreSQL, then pushes
    /// `push`; never past a gap that cannot be filled.
    async fn fill_gap(
        &mut self,
        io: &mut ChannelIo<'_>,
        after: i64,
        seq: i64,
        push: &Push,
    ) -> Result<Filled, ConnectionEnd> {
        let settings = &io.state.settings;
        let gap = GapFill::gap(
            after,
            seq,
            settings.max_gap_fill,
            settings.max_gap_fill_total,
        );
        let filled = match gap {
            Ok(gap) => self.fill(io, gap).await?,
            Err(hole) => Err(hole),
        };
        match filled {
            Ok(()) => self.push(io, Some(seq), push).await.map(Ok),
            // Never past the hole: the client rejoins and catches up from its last seq.
            Err(hole) => Ok(Err(hole)),
        }
    }

    /// Pushes, from PostgreSQL and page by page, the events `fill` is missing; each page is one
    /// read (bounded by [`GAP_PAGE_TIMEOUT`]) and one flush. Returns why the fill stopped short, if
    /// it did. The connection waits meanwhile: a live gap's total is bounded by
    /// `socket.max_gap_fill_total`, a catch-up by the connection's budget.
    #[tracing::instrument(name = "gap_fill", skip_all, fields(topic = %io.topic, after = ?fill.next_page().map(|p| p.0)))]
    async fn fill(
        &mut self,
        io: &mut ChannelIo<'_>,
        mut fill: GapFill,
    ) -> Result<Filled, ConnectionEnd> {
        while let Some((after, before, page)) = fill.next_page() {
            // Catch-ups draw on the connection's budget; a live gap's total is bounded apart.
            let limit = if fill.is_catch_up() {
                io.budget.take(page, Instant::now())
            } else {
                page
            };
            if limit == 0 {
                return Ok(Err(Unfilled::Throttled));
            }
            let read = timeout(
                GAP_PAGE_TIMEOUT,
                io.state.store.user_events(
                    io.user.as_str(),
                    after,
                    before,
                    limit,
                    SeqOrder::Ascending,
                ),
            )
            .await;
            let rows = match read {
                Ok(Ok(rows)) => rows,
                Ok(Err(error)) => {
                    tracing::warn!(error = ?error, after, before, "cannot read a user's missing events");
                    return Ok(Err(Unfilled::StoreUnavailable));
                }
                Err(_) => {
                    tracing::warn!(after, before, "reading a user's missing events timed out");
                    return Ok(Err(Unfilled::StoreUnavailable));
                }
            };
            let count = rows.len();
            if fill.is_catch_up() {
                io.budget
                    .refund(limit - i64::try_from(count).unwrap_or(limit));
            }
            io.state.metrics.socket_gap_filled(count);
            for row in rows {
                let seq = row.seq;
                if let Err(hole) = fill.admit(seq) {
                    io.wire.flush().await?;
                    return Ok(Err(hole));
                }
                match row.into_envelope() {
                    Some(envelope) => self.push(io, Some(seq), &(&envelope).into()).await?,
                    // Stored but unreadable (the API never accepts such values): waiting cannot
                    // change it, so it is passed over rather than blocking the user's stream.
                    None => tracing::warn!(seq, "a stored event cannot be decoded; passed over"),
                }
                fill.pushed(seq);
            }
            io.wire.flush().await?;
            if let Err(hole) = fill.page_read(count, limit) {
                return Ok(Err(hole));
            }
        }
        Ok(Ok(()))
    }

    /// Queues a push and records its seq in the order guard; the caller flushes. A write that
    /// fails ends the connection, so recording first is safe.
    async fn push(
        &mut self,
        io: &mut ChannelIo<'_>,
        seq: Option<i64>,
        push: &Push,
    ) -> Result<(), ConnectionEnd> {
        if let Some(seq) = seq {
            self.guard.pushed(seq);
        }
        io.wire.feed_push(io.join_ref, io.topic, push).await?;
        if let (Some(seq), Some(receipts)) = (seq, &io.state.receipts) {
            receipts.record(io.user.as_str(), &push.event, seq);
        }
        if let Some(at) = push.enqueued_at_ms {
            let waited = now_unix_ms().saturating_sub(at).max(0);
            io.state.metrics.push_delivered(waited as u64);
        }
        Ok(())
    }

    /// Ends the channel (already removed from its connection) over a hole in its stream it cannot
    /// fill now; returns the payload of the `phx_error` (what Phoenix sends when a channel crashes)
    /// the connection closes it with. The official client rejoins by itself (after 1 s, then
    /// backing off), re-sending its join params, so a client that passes its `last_seq` catches up
    /// from PostgreSQL, which fills the hole or answers `missed: true`. The payload also names the
    /// cause and the last seq pushed, for clients that rejoin by hand.
    pub(super) fn close_over(self, state: &SocketState, topic: &Topic, hole: Unfilled) -> String {
        self.stop(state, topic);
        let last = self.guard.last();
        state.metrics.socket_gap_unfilled(hole.label());
        tracing::warn!(
            cause = hole.label(),
            last_seq = last,
            "a gap in a user's events cannot be filled now: channel closed with phx_error"
        );
        json!({ "reason": "gap_unfilled", "cause": hole.label(), "last_seq": last }).to_string()
    }
}
