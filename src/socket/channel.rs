//! Joined channels: what a connection keeps per topic, and the user channel's order guard, the last
//! line of per-user order.
//!
//! The guard remembers the last seq pushed. A seq at or below it is a duplicate (a redelivery, or a
//! relay republish of an event already pushed) and is dropped. A seq that skips ahead means an
//! earlier event is late (its publish failed and the relay will send it, or a retry): the channel
//! fills the gap from PostgreSQL before pushing, so a client sees its events gap-free and in order.

use super::stats::StatsChannel;
use crate::pubsub::SubscriptionId;
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

/// The per-channel memory of the last seq pushed.
#[derive(Debug, Default)]
pub struct OrderGuard {
    last_seq: Option<i64>,
}

impl OrderGuard {
    /// Decides what to do with seq `seq`; does not record it (call [`Self::pushed`] after writing).
    pub fn admit(&self, seq: i64) -> Admit {
        match self.last_seq {
            None => Admit::Push,
            Some(last) if seq <= last => Admit::Duplicate,
            Some(last) if seq == last + 1 => Admit::Push,
            Some(last) => Admit::Gap { after: last },
        }
    }

    /// The last seq pushed, once one was.
    pub fn last(&self) -> Option<i64> {
        self.last_seq
    }

    /// Records that `seq` was pushed.
    pub fn pushed(&mut self, seq: i64) {
        self.last_seq = Some(self.last_seq.map_or(seq, |last| last.max(seq)));
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
    User {
        /// The pubsub subscription feeding it.
        subscription: SubscriptionId,
        /// Duplicate and gap detection.
        guard: OrderGuard,
    },
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
        topic: String,
        /// The instance's join ref (a stale one is ignored).
        join_ref: Box<RawValue>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_push_sets_the_baseline() {
        let mut guard = OrderGuard::default();
        assert_eq!(guard.admit(7), Admit::Push);
        guard.pushed(7);
        assert_eq!(guard.admit(8), Admit::Push);
    }

    #[test]
    fn duplicates_drop_and_gaps_are_reported() {
        let mut guard = OrderGuard::default();
        guard.pushed(5);
        assert_eq!(guard.admit(5), Admit::Duplicate);
        assert_eq!(guard.admit(3), Admit::Duplicate);
        assert_eq!(guard.admit(6), Admit::Push);
        assert_eq!(guard.admit(9), Admit::Gap { after: 5 });
    }
}
