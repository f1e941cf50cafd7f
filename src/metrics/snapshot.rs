//! The operator console's reading of this node, taken from the instruments themselves rather than
//! from `/metrics`' text: the console keeps its own shape (ms, as StatsD has them) whatever
//! Prometheus' names and units become.

use super::declare::Instruments;
use serde::Serialize;

/// A distribution's cumulative counts at each upper bound (`le`, the last one infinite), as
/// Prometheus keeps them.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct Buckets {
    /// `(upper bound, observations at or under it)`, ascending; the last bound is `null` (+Inf).
    pub buckets: Vec<(Option<f64>, u64)>,
    /// Observations in all.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
}

/// This node's figures for the operator console, read from the instruments `/metrics` serves:
/// counters since the node started (the console turns them into rates), gauges as last set.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct Snapshot {
    /// Events accepted by the API (`api.events.accepted`).
    pub accepted: u64,
    /// Delivery attempts that delivered (`pipeline.worker.delivered`, pushed and offline).
    pub delivered: u64,
    /// Delivery attempts that failed (`pipeline.worker.delivered{outcome=failed}`).
    pub failed: u64,
    /// Failed attempts sent to a delay queue (`pipeline.retry.scheduled`).
    pub retries: u64,
    /// Events failed for good (`pipeline.dead_lettered`).
    pub dead_lettered: u64,
    /// Socket connects accepted (`socket_connect{status=success}`).
    pub connects: u64,
    /// Channel joins accepted (`channel_join{status=success}`).
    pub joins: u64,
    /// Open WebSockets (`socket.connections`).
    pub connections: u64,
    /// Joined user channels (`socket.channels`).
    pub channels: u64,
    /// Events in work on this worker node (`pipeline.worker.in_flight`).
    pub in_flight: u64,
    /// `pipeline.push_delivered`, in ms.
    pub push_delivered: Buckets,
}

impl Snapshot {
    pub(super) fn read(at: &Instruments) -> Self {
        let success = |[status, _]: &[String; 2]| status == super::SUCCESS;
        Self {
            accepted: at.events_accepted.total(|_| true),
            delivered: at.worker_delivered.total(|[outcome]| outcome != "failed"),
            failed: at.worker_delivered.total(|[outcome]| outcome == "failed"),
            retries: at.retry_scheduled.total(|_| true),
            dead_lettered: at.dead_lettered.total(|_| true),
            connects: at.socket_connect.total(success),
            joins: at.channel_join.total(success),
            connections: at.socket_connections.get([]),
            channels: at.socket_channels.get([]),
            in_flight: at.worker_in_flight.get([]),
            push_delivered: at.push_delivered.buckets([]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Metrics, USER_CHANNEL, USER_SOCKET};
    use cadence::{NopMetricSink, StatsdClient};
    use std::time::Duration;

    #[test]
    fn the_snapshot_reads_what_was_recorded() {
        let statsd = StatsdClient::from_sink("", NopMetricSink);
        let metrics = Metrics::build(statsd, "herald.", "n1", "api+worker");
        metrics.events_accepted(3, "single");
        metrics.events_accepted(2, "batch");
        metrics.delivery_outcome("pushed", 4);
        metrics.delivery_outcome("offline", 1);
        metrics.delivery_outcome("failed", 2);
        metrics.retry_scheduled(1);
        metrics.retry_scheduled(2);
        metrics.dead_lettered();
        metrics.socket_connect(USER_SOCKET, true);
        metrics.socket_connect(USER_SOCKET, false);
        metrics.channel_join(USER_CHANNEL, true);
        metrics.channel_join(USER_CHANNEL, false);
        metrics.socket_connections(7);
        metrics.worker_in_flight(9);
        metrics.push_delivered(3);
        metrics.push_delivered(40);
        let s = metrics.snapshot();
        assert_eq!((s.accepted, s.delivered, s.failed), (5, 5, 2));
        assert_eq!((s.retries, s.dead_lettered), (2, 1));
        assert_eq!((s.connects, s.joins), (1, 1));
        assert_eq!((s.connections, s.channels, s.in_flight), (7, 0, 9));
        assert_eq!(s.push_delivered.count, 2);
        assert_eq!(s.push_delivered.sum, 43.0);
        assert_eq!(s.push_delivered.buckets.last(), Some(&(None, 2)));
        assert!(s.push_delivered.buckets.contains(&(Some(5.0), 1)));
        assert!(s.push_delivered.buckets.contains(&(Some(50.0), 2)));

        // Prometheus gets the same figures, durations in seconds.
        metrics.worker_processed(Duration::from_millis(2), "pushed");
        metrics.worker_run(3);
        let text = metrics.render();
        let has = |line: &str| assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        has(
            r#"herald_api_events_accepted_total{node="n1",roles="api+worker",endpoint="single"} 3"#,
        );
        has("# TYPE herald_pipeline_push_delivered_seconds histogram");
        has(
            r#"herald_pipeline_push_delivered_seconds_bucket{node="n1",roles="api+worker",le="0.005"} 1"#,
        );
        has(
            r#"herald_pipeline_push_delivered_seconds_bucket{node="n1",roles="api+worker",le="+Inf"} 2"#,
        );
        has(r#"herald_pipeline_push_delivered_seconds_sum{node="n1",roles="api+worker"} 0.043"#);
        has(
            r#"herald_pipeline_worker_process_time_seconds_bucket{node="n1",roles="api+worker",le="0.0025",outcome="pushed"} 1"#,
        );
        has("# TYPE herald_pipeline_worker_run_events histogram");
    }
}
