//! The traces' section (`[traces]`): where spans are exported (OTLP over HTTP), and how many.

use super::Error;
use super::validate::invalid;
use serde::{Deserialize, Serialize};

/// OpenTelemetry traces: off until an OTLP endpoint is set.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracesSettings {
    /// The OTLP/HTTP collector's base URL (`http://127.0.0.1:4318`): spans go to
    /// `<endpoint>/v1/traces`. Empty: no spans are made or exported.
    pub otlp_endpoint: String,
    /// OTLP/HTTP's encoding: `http/json` or `http/protobuf` (collectors take both).
    pub protocol: String,
    /// The share of new traces recorded (0 to 1). A producer's `traceparent` that says sampled is
    /// always followed, one that says not sampled never.
    pub sample_ratio: f64,
    /// The service name spans carry (`service.name`); each node also names itself (`herald.node`).
    pub service_name: String,
    /// How often finished spans are sent.
    pub export_interval_ms: u64,
    /// Finished spans waiting to be sent at most; more are dropped (and counted by the exporter).
    pub max_queued_spans: usize,
    /// Bound on one export request.
    pub export_timeout_ms: u64,
}

impl Default for TracesSettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            protocol: "http/json".into(),
            sample_ratio: 0.1,
            service_name: "herald".into(),
            export_interval_ms: 5_000,
            max_queued_spans: 4_096,
            export_timeout_ms: 10_000,
        }
    }
}

durations! {
    TracesSettings {
        export_interval_ms => export_interval,
        export_timeout_ms => export_timeout,
    }
}

impl TracesSettings {
    /// Spans are made and exported.
    pub fn enabled(&self) -> bool {
        !self.otlp_endpoint.is_empty()
    }

    pub(super) fn validate(&self) -> Result<(), Error> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return invalid("traces.sample_ratio", "must be between 0 and 1");
        }
        if self.export_interval_ms == 0 || self.max_queued_spans == 0 || self.export_timeout_ms == 0
        {
            return invalid(
                "traces",
                "export_interval_ms, max_queued_spans and export_timeout_ms must be at least 1",
            );
        }
        if !["http/json", "http/protobuf"].contains(&self.protocol.as_str()) {
            return invalid("traces.protocol", "must be http/json or http/protobuf");
        }
        if self.enabled()
            && !(self.otlp_endpoint.starts_with("http://")
                || self.otlp_endpoint.starts_with("https://"))
        {
            return invalid(
                "traces.otlp_endpoint",
                "must be an http:// or https:// URL (an OTLP/HTTP collector, port 4318 by default)",
            );
        }
        Ok(())
    }
}
