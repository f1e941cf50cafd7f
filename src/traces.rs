//! One event's trace across every node it crosses (W3C Trace Context, OpenTelemetry, OTLP).
//!
//! An event carries a `traceparent` from the producer's request to the socket: the API takes the
//! producer's header (or starts a trace), the event row and its broker message keep it, the
//! worker's run and each socket node's push continue it. The spans, all children of the request's
//! span in the producer's trace:
//!
//! - `herald.enqueue` (api): the request, a child of the producer's `traceparent`;
//! - `herald.group_commit` (api): the transaction, a child of its first traced request and linked
//!   to every traced request in it, with `herald.publish` under it for each message it handed to the
//!   publisher;
//! - `herald.deliver` (worker): the lane run, a child of its first traced event's request and
//!   linked to the others, with the user, partition, seqs and event ids;
//! - `herald.push` (each socket node the run reached): a child of the run, with the sockets reached.
//!
//! Off (no `traces.otlp_endpoint`) nothing is made: the only cost is the `traceparent` a producer
//! sends, kept on its events so operators still see its trace id. On, only sampled traces make spans
//! (`traces.sample_ratio`; a producer's sampled flag is followed). Spans are exported by a
//! background thread over OTLP/HTTP (JSON, or protobuf with `traces.protocol`), in batches, from a
//! bounded queue.
//!
//! The tracer is process-wide, as OpenTelemetry's is: a node installs it at start.

use crate::config::TracesSettings;
use bytes::Bytes;
use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};
use std::sync::OnceLock;

pub use opentelemetry::trace::Span;

/// A span being recorded (only sampled traces make one).
pub type ActiveSpan = opentelemetry_sdk::trace::Span;

struct Installed {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

static TRACER: OnceLock<Installed> = OnceLock::new();

/// Why traces could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TracesError {
    /// The OTLP exporter could not be built.
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
}

/// Installs the process's tracer for `settings` (once; a second node in the same process shares
/// the first's). Returns whether spans are made.
///
/// # Errors
/// The exporter cannot be built.
pub fn install(settings: &TracesSettings, node: &str) -> Result<bool, TracesError> {
    if !settings.enabled() {
        return Ok(TRACER.get().is_some());
    }
    if TRACER.get().is_some() {
        return Ok(true);
    }
    let client = ExportClient {
        client: reqwest::Client::builder()
            .timeout(settings.export_timeout())
            .no_proxy()
            .build()
            .map_err(|e| TracesError::Exporter(e.to_string()))?,
        runtime: tokio::runtime::Handle::try_current()
            .map_err(|_| TracesError::Exporter("no tokio runtime".into()))?,
    };
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let endpoint = format!("{}/v1/traces", settings.otlp_endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(if settings.protocol == "http/protobuf" {
            opentelemetry_otlp::Protocol::HttpBinary
        } else {
            opentelemetry_otlp::Protocol::HttpJson
        })
        .with_endpoint(endpoint)
        .with_timeout(settings.export_timeout())
        .build()
        .map_err(|e| TracesError::Exporter(e.to_string()))?;
    let batches = BatchConfigBuilder::default()
        .with_max_queue_size(settings.max_queued_spans)
        .with_scheduled_delay(settings.export_interval())
        .build();
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batches)
        .build();
    let resource = Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attribute(KeyValue::new("herald.node", node.to_owned()))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sample_ratio,
        ))))
        .with_resource(resource)
        .build();
    let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "herald");
    let _ = TRACER.set(Installed { provider, tracer });
    Ok(true)
}

/// Sends the spans still queued (at shutdown).
pub fn flush() {
    if let Some(installed) = TRACER.get()
        && let Err(error) = installed.provider.force_flush()
    {
        tracing::warn!(error = %error, "cannot export the last spans");
    }
}

/// A W3C `traceparent` (`00-<trace id>-<parent id>-<flags>`), checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace.
    pub trace_id: TraceId,
    /// The span it continues.
    pub span_id: SpanId,
    /// Whether the trace is recorded.
    pub sampled: bool,
}

impl TraceParent {
    /// Reads a `traceparent` header value; `None` for anything the W3C format does not allow
    /// (a new trace starts instead, as the spec says).
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let mut parts = value.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        // Version 00 has exactly four fields; a later version may add some (and is read as 00).
        if !hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        if !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
            return None;
        }
        let trace_id = TraceId::from_hex(trace).ok()?;
        let span_id = SpanId::from_hex(span).ok()?;
        if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    fn of(context: &SpanContext) -> Self {
        Self {
            trace_id: context.trace_id(),
            span_id: context.span_id(),
            sampled: context.is_sampled(),
        }
    }

    /// The trace id as operators paste it into a tracing backend (32 hex digits).
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    fn span_context(&self) -> SpanContext {
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanContext::new(
            self.trace_id,
            self.span_id,
            flags,
            true,
            TraceState::default(),
        )
    }

    fn context(&self) -> Context {
        Context::new().with_remote_span_context(self.span_context())
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

/// `Option<TraceParent>` as a string in messages: written as the header is, read leniently (a
/// string that does not parse is none, never an undecodable message).
pub mod lenient {
    use super::TraceParent;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the `traceparent` string.
    pub fn serialize<S: Serializer>(tp: &Option<TraceParent>, s: S) -> Result<S::Ok, S::Error> {
        match tp {
            Some(tp) => s.collect_str(tp),
            None => s.serialize_none(),
        }
    }

    /// Reads a `traceparent` string; one that does not parse is none.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TraceParent>, D::Error> {
        let text: Option<std::borrow::Cow<'de, str>> = Option::deserialize(d)?;
        Ok(text.as_deref().and_then(TraceParent::parse))
    }
}

/// A request's trace: its span (when recorded) and the `traceparent` its events carry.
pub struct RequestTrace {
    /// The request's span, ended when this is dropped.
    pub span: Option<ActiveSpan>,
    /// What the request's events carry: the request span's context when traces are on, else the
    /// producer's own `traceparent` (so its trace id is still shown), else none.
    pub traceparent: Option<TraceParent>,
}

/// The trace of an API request given the producer's `traceparent` header, if any; `attributes`
/// are made only for a span that is started.
pub fn request(
    name: &'static str,
    header: Option<&str>,
    attributes: impl FnOnce() -> Vec<KeyValue>,
) -> RequestTrace {
    let given = header.and_then(TraceParent::parse);
    let Some(installed) = TRACER.get() else {
        return RequestTrace {
            span: None,
            traceparent: given,
        };
    };
    let attributes = attributes();
    let parent = given.map_or_else(Context::new, |tp| tp.context());
    let span = installed
        .tracer
        .span_builder(name)
        .with_kind(SpanKind::Server)
        .with_attributes(attributes)
        .start_with_context(&installed.tracer, &parent);
    let traceparent = Some(TraceParent::of(span.span_context()));
    RequestTrace {
        span: span.is_recording().then_some(span),
        traceparent,
    }
}

/// A span continuing the sampled traces among `parents`: a child of the first, linked to the
/// others (a group commit, a lane run). `None` when none is sampled or traces are off; then
/// `attributes` is never called, so the hot path pays nothing for them.
pub fn continue_traces<'a>(
    name: &'static str,
    kind: SpanKind,
    parents: impl IntoIterator<Item = &'a TraceParent>,
    attributes: impl FnOnce() -> Vec<KeyValue>,
) -> Option<ActiveSpan> {
    let installed = TRACER.get()?;
    let mut sampled = parents.into_iter().filter(|tp| tp.sampled);
    let first = sampled.next()?;
    let attributes = attributes();
    let links: Vec<Link> = std::iter::once(first)
        .chain(sampled)
        .map(|tp| Link::with_context(tp.span_context()))
        .collect();
    let span = installed
        .tracer
        .span_builder(name)
        .with_kind(kind)
        .with_attributes(attributes)
        .with_links(links)
        .start_with_context(&installed.tracer, &first.context());
    Some(span)
}

/// The `traceparent` a span's children continue.
pub fn traceparent_of(span: &ActiveSpan) -> TraceParent {
    TraceParent::of(span.span_context())
}

/// The OTLP exporter's HTTP client: reqwest on the node's runtime (the exporter runs on a thread
/// of its own, outside any runtime, so each request is spawned onto the node's).
#[derive(Debug)]
struct ExportClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ExportClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let (parts, body) = request.into_parts();
        let call = async move {
            let response = client
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await?;
            let status = response.status();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, body))
        };
        let (status, body) = self.runtime.spawn(call).await??;
        let mut answer = http::Response::new(body);
        *answer.status_mut() = status;
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_reads_back_as_written_and_malformed_ones_are_refused() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = TraceParent::parse(text).unwrap();
        assert!(tp.sampled);
        assert_eq!(tp.to_string(), text);
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let unsampled =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        assert!(!unsampled.unwrap().sampled);
        // A later version may carry more fields.
        assert!(
            TraceParent::parse(&format!(
                "01-{}-{}-01-extra",
                "a".repeat(32),
                "b".repeat(16)
            ))
            .is_some()
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn without_a_tracer_a_request_keeps_the_producers_traceparent_and_makes_no_span() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace = request("t", Some(text), Vec::new);
        assert!(trace.span.is_none());
        assert_eq!(trace.traceparent.unwrap().to_string(), text);
        assert!(request("t", None, Vec::new).traceparent.is_none());
        assert!(
            continue_traces(
                "t",
                SpanKind::Internal,
                [&trace.traceparent.unwrap()],
                Vec::new
            )
            .is_none()
        );
    }
}
