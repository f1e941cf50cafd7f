//! Joined channels: what a connection keeps per topic, and the user channel's order guard, the last
//! line of per-user order.
//!
//! The guard remembers the last seq pushed, and starts at the seq the join answered (or the
//! client's `last_seq`): it never has no baseline, so the first live push is checked like every
//! other. A seq at or below it is a duplicate (a redelivery, a relay republish of an event already
//! pushed, or history from before the join) and is dropped. A seq that skips ahead means an
//! earlier event is late (its publish failed and the relay will send it, or a retry): the channel
//! fills the gap from PostgreSQL before pushing, so a client sees its events gap-free and in order.
//!
//! A gap is closed or reported, never skipped: [`GapFill`] pages through it and says when it cannot
//! be closed ([`Unfilled`]: PostgreSQL unreachable, events pruned, or a gap wider than
//! `socket.max_gap_fill_total`). The connection then closes the channel with `phx_error` instead of
//! pushing past the hole; the official client rejoins on its own, with its `last_seq`, and the
//! join's catch-up fills the hole or reports `missed`.

use super::stats::StatsChannel;
use super::user_channel::UserChannel;
use crate::event::Topic;
use serde_json::value::RawValue;

/// What to do with an incoming event of seq `n`.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Push it.
    Push,
    /// Already pushed: drop it.
    Duplicate,
    /// Events after `after` and before `n` are missing: fetch and push them first.
    Gap {
        /// The last seq pushed.
        after: i64,
    },
}

/// The per-channel memory of the last seq pushed (or the seq the channel started after), and of
/// the last one pushed ahead of the worker, straight from this node's group commit.
#[derive(Debug)]
pub struct OrderGuard {
    last_seq: i64,
    from_commit_through: i64,
}

impl OrderGuard {
    /// A guard for a channel that starts after `seq`: the join's answered `last_seq`, or the
    /// client's own `last_seq` it catches up from. Its next push must be `seq + 1`.
    pub fn after(seq: i64) -> Self {
        Self {
            last_seq: seq,
            from_commit_through: 0,
        }
    }

    /// Records that `seq` was pushed straight from this node's commit: the worker's copy of it,
    /// when it comes, is the expected second path, not a duplicate worth counting.
    pub fn pushed_from_commit(&mut self, seq: i64) {
        self.pushed(seq);
        self.from_commit_through = self.from_commit_through.max(seq);
    }

    /// True when `seq` (a duplicate) was most likely pushed from this node's commit.
    pub fn was_pushed_from_commit(&self, seq: i64) -> bool {
        seq <= self.from_commit_through
    }

    /// Decides what to do with seq `seq`; does not record it (call [`Self::pushed`] after writing).
    pub fn admit(&self, seq: i64) -> Admit {
        let last = self.last_seq;
        if seq <= last {
            Admit::Duplicate
        } else if seq == last + 1 {
            Admit::Push
        } else {
            Admit::Gap { after: last }
        }
    }

    /// The last seq pushed, or the one the channel started after.
    pub fn last(&self) -> i64 {
        self.last_seq
    }

    /// Records that `seq` was pushed.
    pub fn pushed(&mut self, seq: i64) {
        self.last_seq = self.last_seq.max(seq);
    }
}

/// Why a user channel could not close a gap in its user's sequence. The channel is then closed with
/// `phx_error` (never pushed past the hole), and the client's rejoin catches up from its `last_seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unfilled {
    /// PostgreSQL could not be read (unreachable, or the read timed out): the rejoin retries it.
    StoreUnavailable,
    /// Events of the gap are no longer stored (retention pruned them): the rejoin says `missed`.
    Pruned,
    /// The gap is wider than `socket.max_gap_fill_total`: one push must not make a connection read
    /// that much while its other channels and heartbeats wait; the rejoin's catch-up does it.
    TooLarge,
    /// The connection used up its catch-up budget (`socket.max_catch_up_per_minute`): the client
    /// rejoins later, with the last seq it got, and goes on from there.
    Throttled,
}

impl Unfilled {
    /// The metric tag and `phx_error` cause.
    pub fn label(self) -> &'static str {
        match self {
            Self::StoreUnavailable => "store_unavailable",
            Self::Pruned => "pruned",
            Self::TooLarge => "too_large",
            Self::Throttled => "throttled",
        }
    }
}

/// Paging through missing events: a live gap (every seq up to the one that revealed it must be
/// found, or the channel would push past a hole) or a join's catch-up (everything after the client's
/// `last_seq` that is still stored; what retention removed is reported at join as `missed`).
///
/// Pure bookkeeping, so its rules are unit-tested; the connection does the reads and pushes.
#[derive(Debug)]
pub struct GapFill {
    /// The last seq pushed (or the client's `last_seq`).
    last: i64,
    /// A live gap's end (exclusive): the seq that revealed it. `None` for a catch-up.
    before: Option<i64>,
    /// Events read per page (`socket.max_gap_fill`, at least 1).
    page: i64,
    /// A catch-up's last page came back full: there may be more.
    more: bool,
    /// Seqs may be missing (the client was told `missed: true`); otherwise a missing one is a hole.
    holes_told: bool,
}

impl GapFill {
    /// The fill of the gap between `after` (pushed) and `before` (just arrived), read `page` events
    /// at a time.
    ///
    /// # Errors
    /// [`Unfilled::TooLarge`] when more than `max_total` events are missing.
    pub fn gap(after: i64, before: i64, page: i64, max_total: i64) -> Result<Self, Unfilled> {
        if before.saturating_sub(after).saturating_sub(1) > max_total {
            return Err(Unfilled::TooLarge);
        }
        Ok(Self {
            last: after,
            before: Some(before),
            page: page.max(1),
            more: true,
            holes_told: false,
        })
    }

    /// A catch-up of everything stored after `after`, `page` events at a time. With `missed` (the
    /// join told the client retention removed some), missing seqs are passed over; without it, one
    /// is a hole (pruned after the join read the watermark) and stops the catch-up.
    pub fn catch_up(after: i64, page: i64, missed: bool) -> Self {
        Self {
            last: after,
            before: None,
            page: page.max(1),
            more: true,
            holes_told: missed,
        }
    }

    /// The next page to read, as `(after, before, limit)` with both bounds exclusive; `None` once
    /// the gap is closed (or the catch-up has read everything).
    pub fn next_page(&self) -> Option<(i64, i64, i64)> {
        match self.before {
            Some(before) if self.last + 1 < before => Some((self.last, before, self.page)),
            Some(_) => None,
            None if self.more => Some((self.last, i64::MAX, self.page)),
            None => None,
        }
    }

    /// Checks a row of the page before it is pushed: it must be the very next seq, unless the
    /// client was told it missed events.
    ///
    /// # Errors
    /// [`Unfilled::Pruned`]: seqs are gap-free when committed and a later one is visible only once
    /// every earlier one is, so a seq missing here was removed by retention.
    pub fn admit(&self, seq: i64) -> Result<(), Unfilled> {
        if !self.holes_told && seq != self.last + 1 {
            return Err(Unfilled::Pruned);
        }
        Ok(())
    }

    /// Records that `seq` was pushed (or passed over).
    pub fn pushed(&mut self, seq: i64) {
        self.last = self.last.max(seq);
    }

    /// True for a join's (or resync's) catch-up, false for a live gap.
    pub fn is_catch_up(&self) -> bool {
        self.before.is_none()
    }

    /// Ends a page that returned `rows` rows of the `asked` it was read with (at most a page).
    ///
    /// # Errors
    /// [`Unfilled::Pruned`]: a short page of a live gap that is not closed yet (the rest is gone).
    pub fn page_read(&mut self, rows: usize, asked: i64) -> Result<(), Unfilled> {
        let full = i64::try_from(rows).unwrap_or(i64::MAX) >= asked;
        match self.before {
            Some(before) if !full && self.last + 1 < before => Err(Unfilled::Pruned),
            Some(_) => Ok(()),
            None => {
                self.more = full;
                Ok(())
            }
        }
    }
}

/// How many events a connection may read for catch-ups: a token bucket holding at most a minute's
/// worth (`socket.max_catch_up_per_minute`), refilled continuously. One full catch-up of a user's
/// retained events fits; a client rejoining with `last_seq: 0` over and over cannot make its node
/// read the whole history each time. Pure (time is passed in), so its rules are unit-tested.
#[derive(Debug)]
pub struct CatchUpBudget {
    per_minute: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl CatchUpBudget {
    /// A full budget of `per_minute` events, as of `now`.
    pub fn new(per_minute: i64, now: tokio::time::Instant) -> Self {
        let per_minute = per_minute.max(1) as f64;
        Self {
            per_minute,
            tokens: per_minute,
            at: now,
        }
    }

    /// Takes up to `want` events of the budget as of `now`; returns how many it may read (0 when
    /// spent).
    pub fn take(&mut self, want: i64, now: tokio::time::Instant) -> i64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_minute / 60.0).min(self.per_minute);
        self.at = now;
        let granted = (self.tokens.floor() as i64).clamp(0, want.max(0));
        self.tokens -= granted as f64;
        granted
    }

    /// Gives back what a page did not use (it came back short).
    pub fn refund(&mut self, unused: i64) {
        self.tokens = (self.tokens + unused.max(0) as f64).min(self.per_minute);
    }
}

/// A connection's joined channels (or anything else kept per topic), by topic.
///
/// A Vec searched in order rather than a HashMap: a connection joins one channel or a few (at most
/// `socket.max_channels`, 100 by default), and a HashMap's smallest table (room for three, 276
/// bytes) was most of what a joined channel cost. The Vec starts with room for one and doubles.
#[derive(Debug)]
pub struct ByTopic<V> {
    entries: Vec<(Topic, V)>,
}

impl<V> Default for ByTopic<V> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
        }
    }
}

impl<V> ByTopic<V> {
    /// The value of `topic`, if any.
    pub fn get(&self, topic: &Topic) -> Option<&V> {
        self.entries
            .iter()
            .find(|(t, _)| t == topic)
            .map(|(_, v)| v)
    }

    /// [`Self::get`], to change it.
    pub fn get_mut(&mut self, topic: &Topic) -> Option<&mut V> {
        self.entries
            .iter_mut()
            .find(|(t, _)| t == topic)
            .map(|(_, v)| v)
    }

    /// True when `topic` has a value.
    pub fn contains(&self, topic: &Topic) -> bool {
        self.get(topic).is_some()
    }

    /// How many topics have a value.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no topic has a value.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sets `topic`'s value; returns the one it replaces.
    pub fn insert(&mut self, topic: Topic, value: V) -> Option<V> {
        if let Some(current) = self.get_mut(&topic) {
            return Some(std::mem::replace(current, value));
        }
        if self.entries.len() == self.entries.capacity() {
            // Room for one first (a Vec's first push would make room for four), then doubling.
            self.entries.reserve_exact(self.entries.len().max(1));
        }
        self.entries.push((topic, value));
        None
    }

    /// Removes `topic`'s value and returns it.
    pub fn remove(&mut self, topic: &Topic) -> Option<V> {
        let at = self.entries.iter().position(|(t, _)| t == topic)?;
        Some(self.entries.swap_remove(at).1)
    }

    /// Removes every value and returns them with their topics, in no particular order.
    pub fn take_all(&mut self) -> Vec<(Topic, V)> {
        std::mem::take(&mut self.entries)
    }
}

/// One joined channel on a connection.
pub struct JoinedChannel {
    /// The join's ref, echoed on every frame of this channel.
    pub join_ref: Box<RawValue>,
    /// What kind of channel, with its state.
    pub kind: ChannelKind,
}

/// The channels Herald serves.
pub enum ChannelKind {
    /// `user:<id>` on the user socket: fed by pubsub, guarded for order.
    User(UserChannel),
    /// Any topic on the stats socket: a task of its own, answering client pushes.
    Stats(StatsChannel),
}

/// What a channel task asks of its connection.
#[derive(Debug)]
pub enum ToConnection {
    /// Write this (already encoded) frame.
    Frame(String),
    /// The server closes this channel instance: remove it and send `phx_close`.
    Close {
        /// The channel's topic.
        topic: Topic,
        /// The instance's join ref (a stale one is ignored).
        join_ref: Box<RawValue>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_topic_keeps_one_value_per_topic() {
        let (one, two) = (Topic::from("user:1"), Topic::from("user:2"));
        let mut channels = ByTopic::default();
        assert!(channels.is_empty());
        assert_eq!(channels.insert(one.clone(), 1), None);
        assert_eq!(channels.entries.capacity(), 1, "room for one at first");
        assert_eq!(channels.insert(two.clone(), 2), None);
        assert_eq!(channels.insert(one.clone(), 10), Some(1), "replaced");
        assert_eq!(channels.len(), 2);
        assert_eq!(channels.get(&one), Some(&10));
        *channels.get_mut(&two).unwrap() += 1;
        assert_eq!(channels.remove(&two), Some(3));
        assert_eq!(channels.remove(&two), None);
        assert!(!channels.contains(&two) && channels.contains(&one));
        assert_eq!(channels.take_all(), vec![(one, 10)]);
        assert!(channels.is_empty());
    }

    #[test]
    fn the_first_push_is_checked_against_where_the_channel_started() {
        // Joined when the user's last seq was 7: 7 is history, 9 reveals that 8 is missing.
        let mut guard = OrderGuard::after(7);
        assert_eq!(guard.admit(7), Admit::Duplicate);
        assert_eq!(guard.admit(9), Admit::Gap { after: 7 });
        assert_eq!(guard.admit(8), Admit::Push);
        guard.pushed(8);
        assert_eq!(guard.admit(9), Admit::Push);
        // A user with no events yet starts after 0.
        assert_eq!(OrderGuard::after(0).admit(1), Admit::Push);
    }

    #[test]
    fn duplicates_drop_and_gaps_are_reported() {
        let guard = OrderGuard::after(5);
        assert_eq!(guard.admit(5), Admit::Duplicate);
        assert_eq!(guard.admit(3), Admit::Duplicate);
        assert_eq!(guard.admit(6), Admit::Push);
        assert_eq!(guard.admit(9), Admit::Gap { after: 5 });
    }

    /// Drives `fill` over a store holding `stored` seqs; returns the seqs pushed and how it ended.
    fn run(mut fill: GapFill, stored: &[i64]) -> (Vec<i64>, Result<(), Unfilled>) {
        let mut pushed = Vec::new();
        while let Some((after, before, limit)) = fill.next_page() {
            let page: Vec<i64> = stored
                .iter()
                .copied()
                .filter(|s| *s > after && *s < before)
                .take(limit as usize)
                .collect();
            for &seq in &page {
                if let Err(hole) = fill.admit(seq) {
                    return (pushed, Err(hole));
                }
                pushed.push(seq);
                fill.pushed(seq);
            }
            if let Err(hole) = fill.page_read(page.len(), limit) {
                return (pushed, Err(hole));
            }
        }
        (pushed, Ok(()))
    }

    #[test]
    fn the_catch_up_budget_grants_a_minutes_worth_then_refills_with_time() {
        let start = tokio::time::Instant::now();
        let mut budget = CatchUpBudget::new(600, start);
        assert_eq!(budget.take(500, start), 500);
        assert_eq!(
            budget.take(500, start),
            100,
            "no more than the minute's worth"
        );
        assert_eq!(budget.take(500, start), 0, "spent");
        // 600 a minute is 10 a second.
        let later = start + std::time::Duration::from_secs(3);
        assert_eq!(budget.take(500, later), 30);
        budget.refund(20);
        assert_eq!(budget.take(500, later), 20);
        // It never holds more than a minute's worth, however long it rests.
        let much_later = later + std::time::Duration::from_secs(3_600);
        assert_eq!(budget.take(10_000, much_later), 600);
    }

    #[test]
    fn a_gap_wider_than_a_page_is_read_page_by_page_until_closed() {
        let stored: Vec<i64> = (1..=60).collect();
        let fill = GapFill::gap(1, 42, 5, 1_000).unwrap();
        assert_eq!(run(fill, &stored), ((2..=41).collect(), Ok(())));
    }

    #[test]
    fn a_gap_with_a_pruned_event_stops_before_the_hole() {
        let stored: Vec<i64> = (1..=20).filter(|s| *s != 8).collect();
        let fill = GapFill::gap(1, 20, 5, 1_000).unwrap();
        assert_eq!(
            run(fill, &stored),
            ((2..=7).collect(), Err(Unfilled::Pruned))
        );
        // The missing events are the gap's last ones: the short page tells.
        let stored: Vec<i64> = (1..=6).chain([20]).collect();
        let fill = GapFill::gap(1, 20, 5, 1_000).unwrap();
        assert_eq!(
            run(fill, &stored),
            ((2..=6).collect(), Err(Unfilled::Pruned))
        );
    }

    #[test]
    fn a_gap_wider_than_the_total_is_not_read_at_all() {
        // 101 events are missing between 10 and 112.
        assert_eq!(
            GapFill::gap(10, 112, 5, 100).unwrap_err(),
            Unfilled::TooLarge
        );
        assert!(GapFill::gap(10, 112, 5, 101).is_ok());
    }

    #[test]
    fn a_catch_up_reads_to_the_end_and_passes_over_pruned_events_the_client_was_told_of() {
        let stored: Vec<i64> = (1..=3).chain(7..=12).collect();
        assert_eq!(
            run(GapFill::catch_up(0, 3, true), &stored),
            (stored.clone(), Ok(()))
        );
        assert_eq!(
            run(GapFill::catch_up(12, 3, false), &stored),
            (vec![], Ok(()))
        );
        // Untold (pruned after the join read the watermark): stopped before the hole.
        assert_eq!(
            run(GapFill::catch_up(0, 3, false), &stored),
            (vec![1, 2, 3], Err(Unfilled::Pruned))
        );
        assert_eq!(
            run(
                GapFill::catch_up(1, 3, false),
                &(1..=20).collect::<Vec<_>>()
            ),
            ((2..=20).collect(), Ok(()))
        );
    }
}
