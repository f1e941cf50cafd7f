//! The pipeline between the API and the sockets: enqueue (group commit, then publish), the confirm
//! recorder, the outbox relay, the worker pool and the delivery-outcome writer.
//!
//! Every write here goes through [`batch::Batcher`], one group-commit mechanism for all of them, and
//! every publish goes through the one [`crate::queue::PublisherHandle`] (enqueue and relay alike).

pub mod batch;
pub mod enqueue;
pub mod faults;
pub mod outcomes;
pub mod published;
pub mod relay;
pub mod replay;
pub mod retention;
pub mod retry;
pub mod worker;

use crate::event::Envelope;
use crate::queue::OutgoingMessage;
use std::future::Future;
use std::time::Duration;

/// The broker message for an event: its envelope as JSON, with the event id as message id.
pub fn outgoing(envelope: &Envelope) -> OutgoingMessage {
    OutgoingMessage {
        id: envelope.id,
        // An envelope holds only strings, numbers and valid raw JSON: serialising cannot fail.
        body: serde_json::to_vec(envelope).unwrap_or_default(),
    }
}

/// Runs `attempt` until it succeeds or `tries` attempts failed, backing off 100 ms, 200 ms, ... up to
/// 2 s between them. For writes that must not be lost to a short database outage.
async fn retry<T, E: std::fmt::Debug, F, Fut>(
    what: &str,
    tries: u32,
    mut attempt: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(100);
    let mut tried = 1;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if tried >= tries => return Err(error),
            Err(error) => {
                tracing::warn!(error = ?error, what, attempt = tried, "write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                tried += 1;
            }
        }
    }
}
