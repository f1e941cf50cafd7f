//! The head start: a group commit hands its events straight to this node's own joined channels of
//! their users (`pipeline.push_from_commit`, on a node that runs the socket role beside the api).
//!
//! Without it an event reaches its client after the commit, a publish and its confirm, the
//! broker's delivery to the partition's worker, the lane and the broadcast: a broker round trip
//! and a queue or two beyond the WAL flush the durability needs. With it, a client connected to
//! the node that took the request is pushed the event as its request is answered. The worker's
//! broadcast still follows for every event: it is what reaches other nodes' clients, records the
//! delivery, retries and dead-letters. So the head start adds nothing to what must happen, and
//! needs no bookkeeping of its own: a channel takes an event from a commit only when it is the
//! next seq its client needs, and leaves every other (already pushed, or with an earlier one still
//! on its way) to the worker's copy, which goes through the order guard and its gap fill as
//! always. A commit's events reach its channels in commit order, which for a user is seq order.

use super::faults::Faults;
use crate::event::{Envelope, Topic};
use crate::pubsub::{Message, PubSub, Push};
use std::collections::HashMap;
use std::sync::Arc;

/// This node's channels, which its group commits hand their events to.
#[derive(Clone)]
pub struct HeadStart {
    pubsub: PubSub,
    /// Events a test fault rule names are left to the worker: their failed attempts are what the
    /// rule is there to show.
    faults: Arc<Faults>,
    /// The largest commit handed on (`pipeline.push_from_commit`).
    max_events: usize,
}

impl HeadStart {
    /// The head start into `pubsub`'s local subscribers, for commits of at most `max_events`.
    pub fn new(pubsub: PubSub, faults: Arc<Faults>, max_events: usize) -> Self {
        Self {
            pubsub,
            faults,
            max_events,
        }
    }

    /// Hands a commit's new events (in commit order; `None` for an idempotent repeat) to this
    /// node's subscribers of their users' topics, one message per user holding its events in seq
    /// order, unless the commit is larger than `pipeline.push_from_commit`. Users nobody joined
    /// here cost a lookup each.
    pub fn hand(&self, committed: &[Option<Envelope>]) {
        if committed.len() > self.max_events || self.pubsub.topic_count() == 0 {
            return;
        }
        // Per user, in order of first appearance: its message, or None when nobody here
        // subscribes to it or one of its events is left to the worker (what follows that one
        // would be ahead of the channel anyway).
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut messages: Vec<Option<Message>> = Vec::new();
        for envelope in committed.iter().flatten() {
            let at = *index.entry(envelope.user_id.as_str()).or_insert_with(|| {
                let topic: Topic = envelope.user_id.topic();
                messages.push(
                    self.pubsub
                        .has_subscribers(topic.as_str())
                        .then(|| Message {
                            topic,
                            pushes: Vec::new(),
                            trace: None,
                            from_commit: true,
                        }),
                );
                messages.len() - 1
            });
            if self.faults.names(envelope) {
                messages[at] = None;
            }
            if let Some(message) = &mut messages[at] {
                message.pushes.push(Push::from(envelope));
            }
        }
        for message in messages.into_iter().flatten() {
            self.pubsub.deliver_from_commit(message);
        }
    }
}
