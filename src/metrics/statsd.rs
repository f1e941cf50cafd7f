//! The StatsD side: a cadence client whose default tags are the node and its roles, so no
//! instrument can forget or repeat them, and which buffers metrics up to a datagram
//! (`metrics.packet_bytes`) or the flush interval, so a hot path costs a mutex and a format, not a
//! syscall. StatsD keeps its units (milliseconds, counts): operators' dashboards read them.

use super::Error;
use crate::config::MetricsSettings;
use cadence::{BufferedUdpMetricSink, MetricBuilder, NopMetricSink, StatsdClient};
use std::net::UdpSocket;

/// The client for node `node` running `roles`; one that sends nothing when `statsd_addr` is empty.
pub(super) fn client(
    settings: &MetricsSettings,
    node: &str,
    roles: &str,
) -> Result<StatsdClient, Error> {
    let builder = if settings.statsd_addr.is_empty() {
        StatsdClient::builder(&settings.prefix, NopMetricSink)
    } else {
        let fail = |source: Box<dyn std::error::Error + Send + Sync>| Error {
            addr: settings.statsd_addr.clone(),
            source,
        };
        let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| fail(Box::new(e)))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| fail(Box::new(e)))?;
        let sink = BufferedUdpMetricSink::with_capacity(
            settings.statsd_addr.as_str(),
            socket,
            settings.packet_bytes,
        )
        .map_err(|e| fail(Box::new(e)))?;
        StatsdClient::builder(&settings.prefix, sink)
    };
    Ok(builder
        .with_tag("node", node)
        .with_tag("roles", roles)
        .with_error_handler(|e| tracing::debug!(error = %e, "statsd send failed"))
        .build())
}

/// Sends a metric with its own tags (node and roles are the client's default tags).
pub(super) fn send<'m, T>(
    mut metric: MetricBuilder<'m, '_, T>,
    keys: &'m [&str],
    values: &'m [&str],
) where
    T: cadence::Metric + From<String>,
{
    for (key, value) in keys.iter().zip(values) {
        metric = metric.with_tag(key, value);
    }
    metric.send();
}
