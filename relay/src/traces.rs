//! Traces: the relay's own OpenTelemetry span for each transaction it
//! publishes, continuing the W3C trace context its writers attached, and the
//! exporter those spans go to (`--traces-exporter`).
//!
//! The relay forwards each event's `traceparent` and `tracestate` headers
//! unchanged, so a consumer continues the writer's trace whether or not the
//! relay exports anything. With an exporter configured, each transaction
//! holding at least one traced event gets a span: a child of the first
//! traced event's context, linked to every other distinct context in the
//! transaction (one transaction may carry events of several requests).
//! Transactions without trace context get no span: there is no trace to
//! continue, and a root span per transaction would be noise.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, TraceContextExt, TraceState, Tracer, TracerProvider,
};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, SpanData, SpanExporter};

use crate::{Error, Result};

/// Where the relay's spans go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TracesExporter {
    /// No spans (trace headers are still forwarded).
    #[default]
    None,
    /// One JSON object per span and line, on stdout or `--traces-file`.
    Console,
    /// OTLP over HTTP (protobuf) to `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (default `http://localhost:4318`).
    Otlp,
}

/// How to export spans.
#[derive(Clone, Debug, Default)]
pub struct TracesConfig {
    /// The exporter.
    pub exporter: TracesExporter,
    /// For the console exporter: append to this file instead of stdout.
    pub file: Option<PathBuf>,
    /// For the OTLP exporter: the traces URL; `None` reads the standard
    /// `OTEL_EXPORTER_OTLP_*` environment variables.
    pub otlp_endpoint: Option<String>,
}

/// The relay's tracer: cheap to clone; disabled unless an exporter is set.
#[derive(Clone, Debug, Default)]
pub struct Traces {
    inner: Option<(SdkTracerProvider, SdkTracer)>,
}

impl Traces {
    /// No spans.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Starts the exporter `cfg` names. Spans are batched on a thread of
    /// their own (`OTEL_BSP_*` tune it); [`shutdown`](Self::shutdown)
    /// exports what is left.
    pub fn start(cfg: &TracesConfig) -> Result<Self> {
        let builder = SdkTracerProvider::builder().with_resource(resource());
        let provider = match cfg.exporter {
            TracesExporter::None => return Ok(Self::disabled()),
            TracesExporter::Console => {
                let out: Box<dyn Write + Send> = match &cfg.file {
                    Some(path) => Box::new(open_append(path)?),
                    None => Box::new(std::io::stdout()),
                };
                builder.with_batch_exporter(JsonLines {
                    out: Mutex::new(out),
                })
            }
            TracesExporter::Otlp => {
                use opentelemetry_otlp::WithExportConfig;
                let endpoint = otlp_endpoint(cfg.otlp_endpoint.as_deref(), |var| {
                    std::env::var(var).ok().filter(|v| !v.is_empty())
                })?;
                // Only the origin and path: a URL may carry credentials.
                tracing::info!(
                    endpoint = %format!("{}{}", endpoint.origin().ascii_serialization(), endpoint.path()),
                    "exporting spans over OTLP/HTTP"
                );
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(endpoint.to_string())
                    .build()
                    .map_err(|err| {
                        Error::Config(format!("cannot set up the OTLP trace exporter: {err}"))
                    })?;
                builder.with_batch_exporter(exporter)
            }
        }
        .build();
        let tracer = provider.tracer("outbox-relay");
        Ok(Self {
            inner: Some((provider, tracer)),
        })
    }

    /// A new transaction's trace, or `None` when disabled.
    pub fn transaction(&self) -> Option<TransactionTrace> {
        self.inner.as_ref().map(|_| TransactionTrace {
            start: SystemTime::now(),
            contexts: Vec::new(),
            last_raw: None,
            events: 0,
        })
    }

    /// Ends `trace` now: records its span, named `name`, if it had a
    /// traced event.
    ///
    /// As OpenTelemetry's messaging conventions model a send that does not
    /// inject its own context (the records carry the writers'): kind
    /// client, a link to every creation context, and a child of the
    /// creation context when there is only one. A transaction of several
    /// requests gets a root span linked to each of them.
    pub fn finish(&self, name: &'static str, trace: TransactionTrace, attributes: Vec<KeyValue>) {
        let Some((_, tracer)) = self.inner.as_ref() else {
            return;
        };
        let Some(first) = trace.contexts.first() else {
            return;
        };
        let mut all = attributes;
        all.push(KeyValue::new("messaging.system", "kafka"));
        all.push(KeyValue::new("messaging.operation.type", "send"));
        all.push(KeyValue::new("messaging.operation.name", "send"));
        if trace.events > 1 {
            all.push(KeyValue::new(
                "messaging.batch.message_count",
                Value::I64(trace.events as i64),
            ));
        }
        let cx = if trace.contexts.len() == 1 {
            opentelemetry::Context::new().with_remote_span_context(first.clone())
        } else {
            opentelemetry::Context::new()
        };
        // Links carry ids only: a row's tracestate is not copied 128 times.
        let links = trace
            .contexts
            .iter()
            .map(|sc| {
                Link::with_context(SpanContext::new(
                    sc.trace_id(),
                    sc.span_id(),
                    sc.trace_flags(),
                    true,
                    TraceState::default(),
                ))
            })
            .collect();
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .with_start_time(trace.start)
            .with_links(links)
            .with_attributes(all)
            .start_with_context(tracer, &cx);
        opentelemetry::trace::Span::end(&mut { span });
    }

    /// Exports the spans still buffered, waiting at most `timeout`. Called
    /// after the runtime stopped: it blocks.
    pub fn shutdown(&self, timeout: Duration) {
        if let Some((provider, _)) = &self.inner
            && let Err(err) = provider.shutdown_with_timeout(timeout)
        {
            tracing::warn!(error = %err, "could not export every span before exit");
        }
    }
}

/// The trace contexts seen in one transaction.
#[derive(Debug)]
pub struct TransactionTrace {
    start: SystemTime,
    /// Distinct creation contexts, in the order first seen.
    contexts: Vec<SpanContext>,
    /// The last `traceparent` read, so a transaction's repeats of one
    /// context are not parsed again.
    last_raw: Option<String>,
    events: u64,
}

/// At most this many creation contexts per span (the SDK's default limit
/// on links).
const MAX_LINKS: usize = 128;

impl TransactionTrace {
    /// Counts one event and takes its trace context, if it has a valid one.
    /// An invalid `traceparent` is still forwarded as written, but does
    /// not parent or link a span.
    pub fn observe(&mut self, traceparent: Option<&str>, tracestate: Option<&str>) {
        self.events += 1;
        let Some(raw) = traceparent else { return };
        if self.last_raw.as_deref() == Some(raw) || self.contexts.len() >= MAX_LINKS {
            return;
        }
        self.last_raw = Some(raw.to_owned());
        let Some(sc) = outbox::remote_span_context(raw, tracestate) else {
            return;
        };
        if !self
            .contexts
            .iter()
            .any(|c| c.trace_id() == sc.trace_id() && c.span_id() == sc.span_id())
        {
            self.contexts.push(sc);
        }
    }
}

/// The OTLP/HTTP traces URL, resolved as the OpenTelemetry specification
/// says: the given one, else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as is,
/// else `OTEL_EXPORTER_OTLP_ENDPOINT` with `/v1/traces` appended, else
/// `http://localhost:4318/v1/traces`. Resolved here rather than by the
/// exporter, which falls back to the default on a value it cannot parse:
/// a typo would send spans nowhere without a word.
fn otlp_endpoint(given: Option<&str>, env: impl Fn(&str) -> Option<String>) -> Result<url::Url> {
    const TRACES: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
    const BASE: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
    let (source, text) = if let Some(url) = given {
        ("the traces endpoint", url.to_owned())
    } else if let Some(url) = env(TRACES) {
        (TRACES, url)
    } else if let Some(base) = env(BASE) {
        (BASE, format!("{}/v1/traces", base.trim_end_matches('/')))
    } else {
        ("the default", "http://localhost:4318/v1/traces".to_owned())
    };
    let url = url::Url::parse(&text).ok().filter(|u| {
        matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty())
    });
    let url = url.ok_or_else(|| {
        Error::Config(format!(
            "{source} for --traces-exporter otlp is not an http:// or https:// URL; \
             set it like http://collector:4318 (OTEL_EXPORTER_OTLP_ENDPOINT) or \
             http://collector:4318/v1/traces (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)"
        ))
    })?;
    // Failed exports are logged with their URL: credentials there would be.
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::Config(format!(
            "{source} for --traces-exporter otlp has credentials in it; \
             pass them in OTEL_EXPORTER_OTLP_HEADERS (for example `authorization=Bearer ...`) instead"
        )));
    }
    // Only OTLP/HTTP protobuf is built in; a collector expecting gRPC or
    // JSON would refuse every export.
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(protocol) = env(var)
            && protocol.trim() != "http/protobuf"
        {
            return Err(Error::Config(format!(
                "{var} asks for `{}`, but the relay exports spans over OTLP/HTTP protobuf only; \
                 set it to http/protobuf (or unset it) and point the endpoint at the collector's \
                 HTTP port (4318)",
                protocol.escape_debug()
            )));
        }
    }
    Ok(url)
}

fn resource() -> Resource {
    // OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name the service when
    // they do; otherwise the relay is `outbox-relay`, not the SDK's
    // `unknown_service`.
    let resource = Resource::builder().build();
    let named = resource
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    if named {
        resource
    } else {
        Resource::builder()
            .with_service_name("outbox-relay")
            .build()
    }
}

fn open_append(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|err| {
            Error::Config(format!(
                "cannot open --traces-file {}: {err}; give a writable path",
                path.display()
            ))
        })
}

/// The console exporter: one JSON object per span and line.
struct JsonLines {
    out: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for JsonLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsonLines")
    }
}

impl SpanExporter for JsonLines {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let mut text = String::new();
        for span in &batch {
            text.push_str(&span_json(span).to_string());
            text.push('\n');
        }
        let result = match self.out.lock() {
            Ok(mut out) => out
                .write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .map_err(|err| OTelSdkError::InternalFailure(err.to_string())),
            Err(_) => Err(OTelSdkError::InternalFailure("poisoned writer".into())),
        };
        std::future::ready(result)
    }

    fn shutdown_with_timeout(&mut self, _timeout: Duration) -> OTelSdkResult {
        match self.out.lock() {
            Ok(mut out) => out
                .flush()
                .map_err(|err| OTelSdkError::InternalFailure(err.to_string())),
            Err(_) => Ok(()),
        }
    }
}

fn unix_nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

fn span_json(span: &SpanData) -> serde_json::Value {
    let attributes: serde_json::Map<String, serde_json::Value> = span
        .attributes
        .iter()
        .map(|kv| (kv.key.to_string(), value_json(&kv.value)))
        .collect();
    let links: Vec<serde_json::Value> = span
        .links
        .iter()
        .map(|l| {
            serde_json::json!({
                "trace_id": l.span_context.trace_id().to_string(),
                "span_id": l.span_context.span_id().to_string(),
            })
        })
        .collect();
    serde_json::json!({
        "name": span.name,
        "kind": format!("{:?}", span.span_kind).to_lowercase(),
        "trace_id": span.span_context.trace_id().to_string(),
        "span_id": span.span_context.span_id().to_string(),
        "parent_span_id": (span.parent_span_id != SpanId::INVALID)
            .then(|| span.parent_span_id.to_string()),
        "trace_state": span.span_context.trace_state().header(),
        "start_unix_nano": unix_nanos(span.start_time).to_string(),
        "end_unix_nano": unix_nanos(span.end_time).to_string(),
        "attributes": attributes,
        "links": links,
    })
}

fn value_json(value: &Value) -> serde_json::Value {
    match value {
        Value::Bool(b) => (*b).into(),
        Value::I64(i) => (*i).into(),
        Value::F64(f) => (*f).into(),
        other => other.to_string().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_w3c_traceparents_and_refuses_the_rest() {
        let sc = outbox::remote_span_context(TP, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(sc.trace_state().header(), "congo=t61rcWkgMzE");
        // Another version with the four fields is read as version 00.
        assert!(outbox::remote_span_context(&format!("01{}", &TP[2..]), None).is_some());
        // The tracestate is read as W3C allows it, and dropped when too long.
        let sc = outbox::remote_span_context(TP, Some("a=1 , b=2")).unwrap();
        assert_eq!(sc.trace_state().header(), "a=1,b=2");
        let long = (0..20)
            .map(|i| format!("k{i}={}", "v".repeat(30)))
            .collect::<Vec<_>>();
        let sc = outbox::remote_span_context(TP, Some(&long.join(","))).unwrap();
        assert_eq!(sc.trace_state().header(), "");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "not a traceparent",
        ] {
            assert!(outbox::remote_span_context(bad, None).is_none(), "{bad}");
        }
        // A bad tracestate does not lose the parent.
        let sc = outbox::remote_span_context(TP, Some("not a tracestate")).unwrap();
        assert_eq!(sc.trace_state().header(), "");
    }

    /// The OTLP exporter against a one-request HTTP server: the span
    /// arrives as OTLP/HTTP protobuf, a child of the writer's span.
    #[test]
    fn spans_reach_an_otlp_collector() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message;
        use std::io::{BufRead, BufReader, Read};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let server = std::thread::spawn(move || {
            // Fails instead of hanging when nothing is sent.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let stream = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(std::time::Instant::now() < deadline, "no export arrived");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("{e}"),
                }
            };
            stream.set_nonblocking(false).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = Vec::new();
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    length = v.trim().parse().unwrap();
                }
                head.push(line);
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            (&stream)
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
            (head, body)
        });
        let traces = Traces::start(&TracesConfig {
            exporter: TracesExporter::Otlp,
            file: None,
            otlp_endpoint: Some(url),
        })
        .unwrap();
        let mut t = traces.transaction().unwrap();
        t.observe(Some(TP), Some("congo=t61rcWkgMzE"));
        traces.finish(
            "outbox-relay transaction",
            t,
            vec![KeyValue::new("outbox.slot", "s1")],
        );
        traces.shutdown(Duration::from_secs(10));
        let (head, body) = server.join().unwrap();
        assert!(head[0].starts_with("POST /v1/traces "), "{head:?}");
        assert!(
            head.iter()
                .any(|h| h.eq_ignore_ascii_case("content-type: application/x-protobuf\r\n")),
            "{head:?}"
        );
        let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        let spans: Vec<_> = request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .collect();
        assert_eq!(spans.len(), 1);
        let span = spans[0];
        assert_eq!(span.name, "outbox-relay transaction");
        assert_eq!(hex(&span.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&span.parent_span_id), "00f067aa0ba902b7");
        assert_eq!(span.trace_state, "congo=t61rcWkgMzE");
        let service = request.resource_spans[0]
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.clone())
            .unwrap();
        assert!(
            format!("{service:?}").contains("outbox-relay"),
            "{service:?}"
        );
    }

    #[test]
    fn the_otlp_endpoint_is_resolved_as_the_specification_says_and_checked() {
        fn url(given: Option<&str>, pairs: &[(&str, &str)]) -> Result<String> {
            otlp_endpoint(given, |var| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == var)
                    .map(|(_, v)| v.to_string())
            })
            .map(|u| u.to_string())
        }
        assert_eq!(url(None, &[]).unwrap(), "http://localhost:4318/v1/traces");
        assert_eq!(
            url(None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318/")]).unwrap(),
            "https://c:4318/v1/traces"
        );
        assert_eq!(
            url(
                None,
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://base:4318"),
                    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:9/custom"),
                ]
            )
            .unwrap(),
            "http://c:9/custom"
        );
        assert_eq!(
            url(
                Some("http://given:1/v1/traces"),
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x")]
            )
            .unwrap(),
            "http://given:1/v1/traces"
        );
        let err = url(
            None,
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://u:secret@c:4318")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("OTEL_EXPORTER_OTLP_HEADERS") && !err.contains("secret"),
            "{err}"
        );
        let err = url(None, &[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("OTEL_EXPORTER_OTLP_PROTOCOL") && err.contains("http/protobuf"),
            "{err}"
        );
        assert!(
            url(
                None,
                &[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")]
            )
            .is_ok()
        );
        for bad in ["mycollector:4318", "grpc://c:4317", "not a url"] {
            let err = url(None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", bad)])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("OTEL_EXPORTER_OTLP_ENDPOINT") && err.contains("http://"),
                "{bad}: {err}"
            );
            assert!(!err.contains(bad), "the value is not echoed: {err}");
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn each_distinct_context_is_kept_once_in_order() {
        let mut t = TransactionTrace {
            start: SystemTime::now(),
            contexts: Vec::new(),
            last_raw: None,
            events: 0,
        };
        let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        t.observe(None, None);
        t.observe(Some("garbage"), None);
        t.observe(Some(TP), None);
        t.observe(Some(other), None);
        t.observe(Some(TP), None);
        t.observe(Some(other), Some("a=1"));
        assert_eq!(t.events, 6);
        let spans: Vec<String> = t.contexts.iter().map(|c| c.span_id().to_string()).collect();
        assert_eq!(spans, ["00f067aa0ba902b7", "b7ad6b7169203331"]);
        // A hostile row cannot grow the list past the link limit.
        for i in 1..=1000u64 {
            t.observe(Some(&format!("00-{i:032x}-{i:016x}-01")), None);
        }
        assert_eq!(t.contexts.len(), MAX_LINKS);
    }
}
