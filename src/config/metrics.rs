//! The metrics' section (`[metrics]`): StatsD's address and datagrams, and Prometheus' listener.

use super::Error;
use super::validate::{at_least_one, invalid};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// StatsD.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// StatsD UDP address (`host:port`); empty disables metrics.
    pub statsd_addr: String,
    /// Where Prometheus scrapes `/metrics` (`host:port`, port 0: the OS picks); empty: not served.
    /// A listener of its own, like RabbitMQ's 15692 and Centrifugo's internal port, without auth
    /// (Prometheus scrapes plainly), so it defaults to loopback: exposing the node's figures takes
    /// a decision (`0.0.0.0:9464` on a private network), never a forgotten default.
    pub prometheus_addr: String,
    /// Prefix of every metric name; empty for none.
    pub prefix: String,
    /// How often buffered metrics are sent.
    pub flush_interval_ms: u64,
    /// Largest StatsD datagram: metrics are buffered up to it (or the flush interval). The default
    /// fits a 1500-byte MTU; a local agent takes 8192 (fewer sends: on a loaded node StatsD sends
    /// at cadence's 512 bytes took 8% of the CPU).
    pub packet_bytes: usize,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            statsd_addr: "127.0.0.1:8125".into(),
            prometheus_addr: "127.0.0.1:9464".into(),
            prefix: String::new(),
            flush_interval_ms: 100,
            packet_bytes: 1432,
        }
    }
}

durations! {
    MetricsSettings {
        flush_interval_ms => flush_interval,
    }
}

impl MetricsSettings {
    pub(super) fn validate(&self) -> Result<(), Error> {
        if !self.prometheus_addr.is_empty() && self.prometheus_addr.parse::<SocketAddr>().is_err() {
            return invalid(
                "metrics.prometheus_addr",
                "must be host:port with an IP address (e.g. 127.0.0.1:9464), or empty",
            );
        }
        at_least_one(&[("metrics.packet_bytes", self.packet_bytes)])
    }
}
