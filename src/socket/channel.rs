//! A joined user channel, and its order guard: the last line of per-user order.
//!
//! The channel remembers the last seq it pushed. A seq at or below it is a duplicate (a redelivery,
//! or a relay republish of an event already pushed) and is dropped. A seq that skips ahead means an
//! earlier event is late (its publish failed and the relay will send it, or a retry): the channel
//! fills the gap from PostgreSQL before pushing, so a client sees its events gap-free and in order.

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

/// One joined channel on a connection.
#[derive(Debug)]
pub struct JoinedChannel {
    /// The join's ref, echoed on every frame of this channel.
    pub join_ref: Box<RawValue>,
    /// The pubsub subscription feeding it.
    pub subscription: SubscriptionId,
    /// The last seq pushed; `None` until the first push sets the baseline.
    pub last_seq: Option<i64>,
}

impl JoinedChannel {
    /// Decides what to do with seq `seq`; does not record it (call [`Self::pushed`] after writing).
    pub fn admit(&self, seq: i64) -> Admit {
        match self.last_seq {
            None => Admit::Push,
            Some(last) if seq <= last => Admit::Duplicate,
            Some(last) if seq == last + 1 => Admit::Push,
            Some(last) => Admit::Gap { after: last },
        }
    }

    /// Records that `seq` was pushed.
    pub fn pushed(&mut self, seq: i64) {
        self.last_seq = Some(self.last_seq.map_or(seq, |last| last.max(seq)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::protocol::null;

    fn channel(last: Option<i64>) -> JoinedChannel {
        let pubsub = crate::pubsub::PubSub::new();
        let (queue, _rx) = tokio::sync::mpsc::channel(1);
        let subscription = pubsub.subscribe(
            "t",
            crate::pubsub::Subscriber {
                queue,
                overflowed: Default::default(),
            },
        );
        JoinedChannel {
            join_ref: null(),
            subscription,
            last_seq: last,
        }
    }

    #[test]
    fn first_push_sets_the_baseline() {
        let mut c = channel(None);
        assert_eq!(c.admit(7), Admit::Push);
        c.pushed(7);
        assert_eq!(c.last_seq, Some(7));
    }

    #[test]
    fn duplicates_drop_and_gaps_are_reported() {
        let c = channel(Some(5));
        assert_eq!(c.admit(5), Admit::Duplicate);
        assert_eq!(c.admit(3), Admit::Duplicate);
        assert_eq!(c.admit(6), Admit::Push);
        assert_eq!(c.admit(9), Admit::Gap { after: 5 });
    }
}
