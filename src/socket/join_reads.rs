//! The reads joins make before they answer: each user's last seq and retention watermark, read
//! together for the joins waiting at one moment. A socket node restarted (or a network blip) has
//! every client rejoin within seconds: thousands of joins a second, each of which read alone was a
//! query and a round trip of its own for PostgreSQL and the node; read together they share one
//! statement, and a join alone still reads at once (a group commit's batching, for reads).

use crate::metrics::Metrics;
use crate::pipeline::batch::{Batcher, Flush};
use crate::store::{SeqBounds, Store};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Joins waiting for a read at most: past it a join waits for room (the connection's own task
/// does, so this bounds memory, not joins).
const WAITING: usize = 4_096;
/// Users per statement at most.
const PER_READ: usize = 256;

/// The batched reader: what a join submits its user to.
#[derive(Clone)]
pub struct JoinReads {
    batcher: Batcher<SeqBoundsReader>,
}

impl JoinReads {
    /// A reader on `store`, its task spawned; the task ends once `close` is cancelled and the
    /// reads asked before it are answered.
    pub fn spawn(store: Store, metrics: Metrics, close: CancellationToken) -> Self {
        let reader = SeqBoundsReader { store, metrics };
        let (batcher, task) = Batcher::new(reader, WAITING, PER_READ, close);
        tokio::spawn(task);
        Self { batcher }
    }

    /// Where `user`'s sequence stands; `None` when PostgreSQL could not be read (logged) or the
    /// node is closing.
    pub async fn seq_bounds(&self, user: &str) -> Option<SeqBounds> {
        self.batcher.submit(user.to_owned()).await.unwrap_or(None)
    }
}

struct SeqBoundsReader {
    store: Store,
    metrics: Metrics,
}

impl Flush for SeqBoundsReader {
    type Item = String;
    type Output = Option<SeqBounds>;

    async fn flush(&self, users: Vec<String>) -> Vec<Option<SeqBounds>> {
        let started = Instant::now();
        let names: Vec<&str> = users.iter().map(String::as_str).collect();
        match self.store.user_seq_bounds(&names).await {
            Ok(bounds) => {
                self.metrics.join_reads(users.len(), started.elapsed());
                bounds.into_iter().map(Some).collect()
            }
            Err(error) => {
                tracing::warn!(error = ?error, joins = users.len(), "cannot read users' seqs for their joins");
                vec![None; users.len()]
            }
        }
    }
}
