//! The HTTP listener's section (`[http]`): its address, and the bounds on a request: size,
//! concurrency and how long each part of it may take.

use super::Error;
use super::validate::at_least_one;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// The HTTP listener.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Address to listen on; port 0 lets the OS choose (tests).
    pub addr: SocketAddr,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// API requests in progress at once on this node; one more is answered 503 with `Retry-After`
    /// at once. With `max_body_bytes` it bounds the memory that request bodies can take.
    pub max_concurrent_requests: usize,
    /// A connection must send a request's whole head within this long of opening or of its
    /// previous response, or it is closed: slow headers, and the idle timeout of keep-alive.
    pub header_read_timeout_ms: u64,
    /// A request body that sends nothing for this long fails its request (408).
    pub body_read_timeout_ms: u64,
    /// An API request (body read, validation, group commit) taking longer than this is answered
    /// 408. A request cut while its events were being committed may still be committed: producers
    /// retry with an idempotency key.
    pub request_timeout_ms: u64,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 4000)),
            max_body_bytes: 4 * 1024 * 1024,
            max_concurrent_requests: 256,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
        }
    }
}

durations! {
    HttpSettings {
        header_read_timeout_ms => header_read_timeout,
        body_read_timeout_ms => body_read_timeout,
        request_timeout_ms => request_timeout,
    }
}

impl HttpSettings {
    pub(super) fn validate(&self) -> Result<(), Error> {
        at_least_one(&[("http.max_concurrent_requests", self.max_concurrent_requests)])
    }
}
