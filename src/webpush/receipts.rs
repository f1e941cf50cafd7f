//! Receipts: which events with a fallback a socket node's clients were sent, so that no push goes
//! to a user who already has the event. Each socket push of such an event raises its user's entry
//! in memory (a map lookup; events without a fallback cost one set lookup); every
//! `webpush.receipt_flush_ms` one statement raises the users' rows in `webpush_receipts`.
//!
//! A receipt is a seq, not an event: a client that was sent seq n was sent everything before it
//! (the socket's order guard never pushes past a hole), so one row per user covers them all.
//! What can go wrong is on the side of sending: a push whose event was received less than a flush
//! before it was due, or whose receipt did not fit (more than [`MAX_USERS`] users in one flush) or
//! could not be written, is sent anyway; the user gets a notification for something they saw.

use crate::config::WebPushSettings;
use crate::metrics::Metrics;
use crate::store::Store;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Users one flush holds at most.
pub const MAX_USERS: usize = 200_000;

/// A socket node's receipts waiting for their flush.
#[derive(Debug)]
pub struct Receipts {
    /// The event names with a fallback.
    names: HashSet<String>,
    pending: Mutex<HashMap<String, i64>>,
}

impl Receipts {
    /// Receipts for the event names that fall back; `None` when none does. A socket node needs
    /// no VAPID key to record them (only worker nodes send): the names alone decide.
    pub fn new(settings: &WebPushSettings) -> Option<Arc<Self>> {
        if settings.events.is_empty() {
            return None;
        }
        Some(Arc::new(Self {
            names: settings.events.keys().cloned().collect(),
            pending: Mutex::new(HashMap::new()),
        }))
    }

    /// A socket was sent `user`'s event `event` with `seq`.
    pub fn record(&self, user: &str, event: &str, seq: i64) {
        if !self.names.contains(event) {
            return;
        }
        let mut pending = self.pending.lock().expect("receipts lock");
        let room = pending.len() < MAX_USERS;
        match pending.get_mut(user) {
            Some(last) => *last = (*last).max(seq),
            None if room => {
                pending.insert(user.to_owned(), seq);
            }
            None => {}
        }
    }

    fn take(&self) -> HashMap<String, i64> {
        std::mem::take(&mut *self.pending.lock().expect("receipts lock"))
    }

    /// Puts back receipts a flush could not write, under any newer ones.
    fn restore(&self, receipts: impl IntoIterator<Item = (String, i64)>) {
        let mut pending = self.pending.lock().expect("receipts lock");
        for (user, seq) in receipts {
            if pending.len() >= MAX_USERS && !pending.contains_key(&user) {
                continue;
            }
            let last = pending.entry(user).or_insert(seq);
            *last = (*last).max(seq);
        }
    }

    /// Writes what is pending; on failure keeps it for the next flush.
    async fn flush(&self, store: &Store, metrics: &Metrics) {
        let taken = self.take();
        if taken.is_empty() {
            return;
        }
        let (users, seqs): (Vec<String>, Vec<i64>) = taken.into_iter().unzip();
        match store.record_webpush_receipts(&users, &seqs).await {
            Ok(()) => metrics.webpush_receipts(users.len()),
            Err(error) => {
                tracing::warn!(error = ?error, users = users.len(), "cannot record push receipts; kept for the next flush");
                self.restore(users.into_iter().zip(seqs));
            }
        }
    }
}

/// Flushes `receipts` every `every` until `stop`, then once more.
pub async fn run(
    receipts: Arc<Receipts>,
    store: Store,
    metrics: Metrics,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => receipts.flush(&store, &metrics).await,
            () = stop.cancelled() => break,
        }
    }
    receipts.flush(&store, &metrics).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EventWebPushSettings;

    #[test]
    fn only_events_with_a_fallback_are_recorded_and_a_user_keeps_its_highest_seq() {
        let mut settings = WebPushSettings::default();
        assert!(Receipts::new(&settings).is_none(), "nothing falls back");
        settings
            .events
            .insert("chat".into(), EventWebPushSettings::default());
        let receipts = Receipts::new(&settings).unwrap();
        receipts.record("u1", "chat", 3);
        receipts.record("u1", "chat", 2);
        receipts.record("u1", "note", 9);
        receipts.record("u2", "note", 1);
        let taken = receipts.take();
        assert_eq!(taken, HashMap::from([("u1".to_owned(), 3)]));
        receipts.record("u1", "chat", 4);
        receipts.restore(taken);
        assert_eq!(receipts.take(), HashMap::from([("u1".to_owned(), 4)]));
    }
}
