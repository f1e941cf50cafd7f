//! A node's listeners and the one error of binding them: which listener, the address, why, and
//! the setting that moves it, since two nodes on one box collide on the defaults.

use std::net::SocketAddr;
use tokio::net::TcpListener;

/// A node's listeners, each moved by a setting of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// The API, WebSockets, console and health checks (`http.addr`).
    Http,
    /// Prometheus' `/metrics` (`metrics.prometheus_addr`).
    Prometheus,
}

/// A listener's address could not be bound: it says, in one line, which listener, the address it
/// tried, why, and the setting to change, since two nodes on one box collide on the defaults.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for {}: {why}; {}", .listener.serves(), .listener.remedy())]
pub struct BindError {
    /// Which listener.
    pub listener: Listener,
    /// The address tried.
    pub addr: SocketAddr,
    /// Why it failed (not a `source`: the message already says it, on one line).
    pub why: std::io::Error,
}

impl Listener {
    /// What the listener serves.
    pub fn serves(self) -> &'static str {
        match self {
            Self::Http => "the HTTP API and WebSockets",
            Self::Prometheus => "Prometheus' /metrics",
        }
    }

    /// The variable that moves it.
    pub fn variable(self) -> &'static str {
        match self {
            Self::Http => "HERALD_HTTP_ADDR",
            Self::Prometheus => "HERALD_METRICS__PROMETHEUS_ADDR",
        }
    }

    fn remedy(self) -> String {
        match self {
            Self::Http => format!("set {} (http.addr) to a free address", self.variable()),
            Self::Prometheus => format!(
                "set {} (metrics.prometheus_addr) to a free address, or to empty for no /metrics listener",
                self.variable()
            ),
        }
    }

    /// Binds `addr`, returning the listener and the address it got (port 0 resolved).
    ///
    /// # Errors
    /// The address is taken, not local, or not allowed.
    pub async fn bind(self, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), BindError> {
        let fail = |why| BindError {
            listener: self,
            addr,
            why,
        };
        let listener = TcpListener::bind(addr).await.map_err(fail)?;
        let bound = listener.local_addr().map_err(fail)?;
        Ok((listener, bound))
    }
}
