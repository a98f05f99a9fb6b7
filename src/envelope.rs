//! The consumer's side of a record: the headers the relay sets (`id`,
//! `event_type`, `aggregate_type`, `aggregate_id`, `traceparent`), read back
//! into a typed [`Envelope`] from any Kafka client's headers, so a consumer
//! on a plain rdkafka (or any other) consumer deduplicates with
//! [`Inbox::record`](crate::Inbox::record) in a few lines. No Kafka client
//! is needed here: headers come in as `(name, value)` pairs.

use crate::EventId;

/// What the relay says about a record, from its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Envelope<'a> {
    /// The event id (header `id`): what the inbox deduplicates on.
    pub id: EventId,
    /// Header `event_type` (absent on records of `--table-layout debezium`,
    /// unless placed with `--additional-placement`).
    pub event_type: Option<&'a str>,
    /// Header `aggregate_type`.
    pub aggregate_type: Option<&'a str>,
    /// Header `aggregate_id` (also the record key).
    pub aggregate_id: Option<&'a str>,
    /// Header `traceparent`: the W3C trace context the writer attached.
    pub traceparent: Option<&'a str>,
    /// Every other header, in record order: the event's own.
    pub headers: Vec<(&'a str, Option<&'a [u8]>)>,
}

/// Why a record's headers are not an outbox envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// No `id` header: not a record of the relay.
    #[error("missing `id` header: the record was not published by outbox-relay")]
    MissingId,
    /// A header the relay sets once appears twice, so which one is real
    /// cannot be told.
    #[error(
        "the record has header `{0}` more than once; the relay sets it once, so the record was forged or altered"
    )]
    Repeated(&'static str),
    /// A header the relay sets is not UTF-8 text, or has no value.
    #[error("the record's header `{0}` is missing its value or is not UTF-8 text")]
    NotText(&'static str),
    /// The `id` header is not a UUID.
    #[error("`{0}` is not an event id (a UUID), in the record's `id` header")]
    BadId(String),
}

const RELAY_HEADERS: [&str; 5] = [
    "id",
    "event_type",
    "aggregate_type",
    "aggregate_id",
    "traceparent",
];

impl<'a> Envelope<'a> {
    /// Reads the relay's headers out of a record's `(name, value)` pairs.
    /// With rdkafka:
    /// `Envelope::from_headers(msg.headers().iter().flat_map(|h| h.iter()).map(|h| (h.key, h.value)))`.
    pub fn from_headers<I>(headers: I) -> Result<Self, EnvelopeError>
    where
        I: IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    {
        let mut found: [Option<&'a str>; 5] = [None; 5];
        let mut rest = Vec::new();
        for (name, value) in headers {
            let Some(slot) = RELAY_HEADERS.iter().position(|h| *h == name) else {
                rest.push((name, value));
                continue;
            };
            let which = RELAY_HEADERS[slot];
            if found[slot].is_some() {
                return Err(EnvelopeError::Repeated(which));
            }
            let text = value
                .and_then(|v| std::str::from_utf8(v).ok())
                .ok_or(EnvelopeError::NotText(which))?;
            found[slot] = Some(text);
        }
        let id = found[0].ok_or(EnvelopeError::MissingId)?;
        let id =
            EventId::parse(id).map_err(|_| EnvelopeError::BadId(id.chars().take(64).collect()))?;
        Ok(Self {
            id,
            event_type: found[1],
            aggregate_type: found[2],
            aggregate_id: found[3],
            traceparent: found[4],
            headers: rest,
        })
    }

    /// The writer's trace context as an OpenTelemetry context, for the
    /// consumer's processing span to continue the trace: the `traceparent`
    /// header as a remote parent, with the `tracestate` header when it is
    /// valid. An empty context when the record has no valid `traceparent`,
    /// so a span started from it is a new root.
    ///
    /// ```no_run
    /// # fn demo(envelope: &outbox::Envelope<'_>) {
    /// use opentelemetry::trace::{SpanKind, Tracer};
    /// let tracer = opentelemetry::global::tracer("billing");
    /// let span = tracer
    ///     .span_builder("process order")
    ///     .with_kind(SpanKind::Consumer)
    ///     .start_with_context(&tracer, &envelope.otel_context());
    /// # }
    /// ```
    #[cfg(feature = "opentelemetry")]
    pub fn otel_context(&self) -> opentelemetry::Context {
        use opentelemetry::trace::TraceContextExt;
        self.traceparent
            .and_then(|tp| crate::remote_span_context(tp, self.header("tracestate")))
            .map_or_else(opentelemetry::Context::new, |sc| {
                opentelemetry::Context::new().with_remote_span_context(sc)
            })
    }

    /// The value of one of the event's own headers, as text.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.and_then(|v| std::str::from_utf8(v).ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "opentelemetry")]
    #[test]
    fn the_trace_context_continues_from_the_headers() {
        use opentelemetry::trace::TraceContextExt;
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let headers = [
            ("id", Some(ID.as_bytes())),
            ("traceparent", Some(tp.as_bytes())),
            ("tracestate", Some(b"congo=t61rcWkgMzE , rojo=1".as_slice())),
        ];
        let e = Envelope::from_headers(headers).unwrap();
        let cx = e.otel_context();
        let span = cx.span();
        let sc = span.span_context();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(sc.trace_state().header(), "congo=t61rcWkgMzE,rojo=1");
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "junk",
        ] {
            let headers = [
                ("id", Some(ID.as_bytes())),
                ("traceparent", Some(bad.as_bytes())),
            ];
            let e = Envelope::from_headers(headers).unwrap();
            assert!(!e.otel_context().has_active_span(), "{bad}");
        }
        let e = Envelope::from_headers([("id", Some(ID.as_bytes()))]).unwrap();
        assert!(!e.otel_context().has_active_span());
    }

    const ID: &str = "01a208c7-0cb3-7158-aba7-278fd39b5166";

    #[test]
    fn reads_the_relays_headers() {
        let headers: Vec<(&str, Option<&[u8]>)> = vec![
            ("id", Some(ID.as_bytes())),
            ("event_type", Some(b"Placed")),
            ("aggregate_type", Some(b"order")),
            ("aggregate_id", Some(b"42")),
            ("tenant", Some(b"acme")),
            ("empty", None),
        ];
        let e = Envelope::from_headers(headers).unwrap();
        assert_eq!(e.id.to_string(), ID);
        assert_eq!(e.event_type, Some("Placed"));
        assert_eq!(e.aggregate_type, Some("order"));
        assert_eq!(e.aggregate_id, Some("42"));
        assert_eq!(e.traceparent, None);
        assert_eq!(e.header("tenant"), Some("acme"));
        assert_eq!(e.header("empty"), None);
        assert_eq!(e.headers.len(), 2);
    }

    #[test]
    fn refuses_what_is_not_an_envelope() {
        let none: Vec<(&str, Option<&[u8]>)> = vec![("tenant", Some(b"x"))];
        assert_eq!(Envelope::from_headers(none), Err(EnvelopeError::MissingId));
        let twice: Vec<(&str, Option<&[u8]>)> =
            vec![("id", Some(ID.as_bytes())), ("id", Some(ID.as_bytes()))];
        assert_eq!(
            Envelope::from_headers(twice),
            Err(EnvelopeError::Repeated("id"))
        );
        let bad: Vec<(&str, Option<&[u8]>)> = vec![("id", Some(b"nope"))];
        assert_eq!(
            Envelope::from_headers(bad),
            Err(EnvelopeError::BadId("nope".into()))
        );
        let binary: Vec<(&str, Option<&[u8]>)> =
            vec![("id", Some(ID.as_bytes())), ("event_type", Some(&[0xff]))];
        assert_eq!(
            Envelope::from_headers(binary),
            Err(EnvelopeError::NotText("event_type"))
        );
    }
}
