//! The outbox event: what a service hands to the write helper, and the checks
//! it must pass before it reaches the database.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use uuid::Uuid;

use crate::{Error, Result, topic};

/// Header names the relay sets itself; an event may not override them.
pub const RESERVED_HEADERS: [&str; 5] = [
    "id",
    "event_type",
    "aggregate_type",
    "aggregate_id",
    "traceparent",
];

/// Header names starting with this (in any ASCII case) are the relay's too: it
/// adds `outbox.error` and `outbox.original_topic` to dead letters.
pub const RESERVED_HEADER_PREFIX: &str = "outbox.";

/// Whether an event may not carry a header of this name: one of
/// [`RESERVED_HEADERS`] or starting with [`RESERVED_HEADER_PREFIX`],
/// compared without regard to ASCII case (a consumer that looks headers up
/// case-insensitively must not find a spoofed `ID` before the real `id`).
/// The relay applies the same rule to rows written with plain SQL, and the
/// table's CHECK constraint `outbox_headers_not_reserved` does too.
pub fn is_reserved_header(name: &str) -> bool {
    RESERVED_HEADERS
        .iter()
        .any(|r| r.eq_ignore_ascii_case(name))
        || name
            .get(..RESERVED_HEADER_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(RESERVED_HEADER_PREFIX))
}

/// Why a header name cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderNameProblem {
    /// The name is empty.
    Empty,
    /// The name has spaces, control or non-ASCII characters, which let a
    /// look-alike (`ıd`, `id `) pass for another name.
    NotVisibleAscii,
    /// The relay sets this header itself (see [`is_reserved_header`]).
    Reserved,
}

/// What is wrong with a header name, if anything: the one rule the write
/// helper and the relay (for rows written with plain SQL) apply, and the
/// table's CHECK constraint `outbox_headers_not_reserved` mirrors.
pub fn header_name_problem(name: &str) -> Option<HeaderNameProblem> {
    if name.is_empty() {
        Some(HeaderNameProblem::Empty)
    } else if !name.bytes().all(|b| b.is_ascii_graphic()) {
        Some(HeaderNameProblem::NotVisibleAscii)
    } else if is_reserved_header(name) {
        Some(HeaderNameProblem::Reserved)
    } else {
        None
    }
}

/// The identity of one event: a UUIDv7, so ids sort by creation time. It is
/// sent as the Kafka header `id`, and consumers deduplicate on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct EventId(Uuid);

impl EventId {
    /// A new time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// Parses the text form, as carried in the Kafka header `id`.
    pub fn parse(text: &str) -> Result<Self> {
        Uuid::parse_str(text.trim())
            .map(Self)
            .map_err(|_| Error::InvalidEventId {
                value: text.chars().take(64).collect(),
            })
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for EventId {
    fn from(id: Uuid) -> Self {
        Self(id)
    }
}

impl From<EventId> for Uuid {
    fn from(id: EventId) -> Self {
        id.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One outbox event. Kafka sees `aggregate_id` as the record key (so one
/// aggregate's events stay in order), the payload as the value, and the id,
/// types, trace context and extra headers as record headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub(crate) id: EventId,
    pub(crate) aggregate_type: String,
    pub(crate) aggregate_id: String,
    pub(crate) event_type: String,
    pub(crate) payload: String,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) topic: Option<String>,
    pub(crate) trace_context: Option<String>,
}

impl Event {
    /// A new event with a fresh UUIDv7 id. The payload is serialized to JSON
    /// now; names are checked here too, the payload size when it is written.
    pub fn new<P: Serialize + ?Sized>(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: &P,
    ) -> Result<Self> {
        let event = Self {
            id: EventId::new(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload: serde_json::to_string(payload).map_err(Error::Payload)?,
            headers: BTreeMap::new(),
            topic: None,
            trace_context: None,
        };
        check_text("aggregate_type", &event.aggregate_type)?;
        check_text("aggregate_id", &event.aggregate_id)?;
        check_text("event_type", &event.event_type)?;
        // serde_json escapes NUL as \u0000, which jsonb refuses to store.
        if event.payload.contains("\\u0000") {
            return Err(Error::NulCharacter { field: "payload" });
        }
        // The event belongs to the operation that creates it: with the
        // feature on, it carries that operation's trace to the consumer.
        #[cfg(feature = "opentelemetry")]
        let event = event.with_otel_context(&opentelemetry::Context::current());
        Ok(event)
    }

    /// Uses a caller-chosen id instead of a fresh one (for example to make a
    /// retried command produce the same event id).
    pub fn with_id(mut self, id: impl Into<EventId>) -> Self {
        self.id = id.into();
        self
    }

    /// Adds a Kafka header. Names must pass [`header_name_problem`]; values
    /// may not contain NUL.
    pub fn with_header(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self> {
        let name = name.into();
        let value = value.into();
        // The one header with a format: consumers and the relay parse it.
        if name.eq_ignore_ascii_case(TRACESTATE) {
            let value = check_tracestate(&value).map_err(|reason| Error::InvalidTraceState {
                value: value.chars().take(64).collect(),
                reason,
            })?;
            self.headers
                .retain(|k, _| !k.eq_ignore_ascii_case(TRACESTATE));
            self.headers.insert(TRACESTATE.to_owned(), value);
            return Ok(self);
        }
        if let Some(problem) = header_name_problem(&name) {
            let reason = match problem {
                HeaderNameProblem::Empty => "header names must not be empty",
                HeaderNameProblem::NotVisibleAscii => {
                    "header names must be visible ASCII (no spaces, control or non-ASCII \
                     characters), so that no consumer can mistake one for another"
                }
                HeaderNameProblem::Reserved => {
                    "this header is set by the relay; choose another name"
                }
            };
            return Err(Error::InvalidHeader { name, reason });
        }
        // Names are visible ASCII by now; only the value can hold a NUL.
        if value.contains('\0') {
            return Err(Error::InvalidHeader {
                name,
                reason: "header names and values must not contain NUL characters",
            });
        }
        self.headers.insert(name, value);
        Ok(self)
    }

    /// Sends this event to `topic` instead of the relay's topic template.
    /// The relay publishes it only if its `--allowed-topics` lists the
    /// topic (by default only the template's topics are allowed).
    pub fn with_topic(mut self, topic: impl Into<String>) -> Result<Self> {
        let topic = topic.into();
        if let Err(reason) = topic::validate(&topic) {
            return Err(Error::InvalidTopic { topic, reason });
        }
        self.topic = Some(topic);
        Ok(self)
    }

    /// Attaches a W3C `traceparent`, forwarded as the Kafka header of that
    /// name. It replaces any trace context the event had, and removes its
    /// `tracestate` (which belonged to that context): call
    /// [`with_trace_state`](Self::with_trace_state) after this one.
    pub fn with_trace_context(mut self, traceparent: impl Into<String>) -> Result<Self> {
        let value = traceparent.into();
        if let Err(reason) = check_traceparent(&value) {
            return Err(Error::InvalidTraceContext { value, reason });
        }
        self.trace_context = Some(value);
        self.headers.remove(TRACESTATE);
        Ok(self)
    }

    /// Removes the trace context (`traceparent` and `tracestate`), for
    /// example one [`Event::new`] took from the current span under the
    /// `opentelemetry` feature when this event should not be traced.
    pub fn without_trace_context(mut self) -> Self {
        self.trace_context = None;
        self.headers.remove(TRACESTATE);
        self
    }

    /// Attaches a W3C `tracestate` (the vendors' data that travels with the
    /// traceparent), forwarded as the Kafka header `tracestate`.
    pub fn with_trace_state(self, tracestate: impl Into<String>) -> Result<Self> {
        self.with_header(TRACESTATE, tracestate)
    }

    /// Takes the trace context of the span active in `cx`: its `traceparent`,
    /// and its `tracestate` when there is one (an empty one removes a
    /// `tracestate` header set before). Without a valid span in `cx` the
    /// event is unchanged. [`Event::new`] calls this with
    /// `opentelemetry::Context::current()`, so an event created inside a
    /// span (an OpenTelemetry one, or a `tracing` span under
    /// `tracing-opentelemetry`) is traced without further code.
    #[cfg(feature = "opentelemetry")]
    pub fn with_otel_context(mut self, cx: &opentelemetry::Context) -> Self {
        use opentelemetry::trace::TraceContextExt;
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return self;
        }
        self.trace_context = Some(format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        ));
        match check_tracestate(&sc.trace_state().header()) {
            Ok(state) => self.headers.insert(TRACESTATE.to_owned(), state),
            Err(_) => self.headers.remove(TRACESTATE),
        };
        self
    }

    /// The event's id.
    pub fn id(&self) -> EventId {
        self.id
    }

    /// The aggregate type (for example `order`); picks the default topic.
    pub fn aggregate_type(&self) -> &str {
        &self.aggregate_type
    }

    /// The aggregate id: the Kafka record key.
    pub fn aggregate_id(&self) -> &str {
        &self.aggregate_id
    }

    /// The event type (for example `OrderPlaced`).
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The payload as JSON text.
    pub fn payload(&self) -> &str {
        &self.payload
    }

    /// The extra headers.
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }

    /// The topic override, if any.
    pub fn topic(&self) -> Option<&str> {
        self.topic.as_deref()
    }

    /// The trace context, if any.
    pub fn trace_context(&self) -> Option<&str> {
        self.trace_context.as_deref()
    }

    /// The extra headers as the JSON object stored in the `headers` column.
    pub(crate) fn headers_json(&self) -> String {
        serde_json::to_string(&self.headers).expect("a map of strings always serializes")
    }

    /// Checks the size limit; every other rule was checked on construction.
    pub(crate) fn check_size(&self, max_payload_bytes: usize) -> Result<()> {
        if self.payload.len() > max_payload_bytes {
            return Err(Error::PayloadTooLarge {
                size: self.payload.len(),
                max: max_payload_bytes,
            });
        }
        Ok(())
    }
}

fn check_text(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::EmptyField { field });
    }
    if value.contains('\0') {
        return Err(Error::NulCharacter { field });
    }
    Ok(())
}

/// The header that carries the W3C `tracestate` next to `traceparent`.
const TRACESTATE: &str = "tracestate";

/// What is wrong with a W3C `traceparent` value, if anything: the rule the
/// write helper applies, and the relay and [`Envelope::otel_context`]
/// (`crate::Envelope`) read by: `version-traceid-parentid-flags`, lowercase
/// hex, version not `ff`, ids not all zero, exactly four fields.
pub fn traceparent_problem(value: &str) -> Option<&'static str> {
    check_traceparent(value).err()
}

/// A `tracestate` value in the normalized form the OpenTelemetry parsers
/// read (members trimmed, joined by `,`), or why it is not W3C.
pub fn normalize_tracestate(value: &str) -> Result<String, &'static str> {
    check_tracestate(value)
}

/// A W3C `traceparent` (by [`traceparent_problem`]'s rule) as a remote
/// OpenTelemetry span context, with `tracestate` when that is valid W3C
/// (at most 512 characters; W3C lets a longer one be dropped). `None` when
/// the traceparent is not valid. What [`Envelope::otel_context`]
/// (`crate::Envelope`) and the relay's spans continue from.
#[cfg(feature = "opentelemetry")]
pub fn remote_span_context(
    traceparent: &str,
    tracestate: Option<&str>,
) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    check_traceparent(traceparent).ok()?;
    // Checked: `vv-<32 hex>-<16 hex>-<2 hex>`, ids not all zero.
    let (trace, span, flags) = (
        &traceparent[3..35],
        &traceparent[36..52],
        &traceparent[53..55],
    );
    let state = tracestate
        .and_then(|ts| check_tracestate(ts).ok())
        .and_then(|ts| ts.parse::<TraceState>().ok())
        .unwrap_or_default();
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()? & 1),
        true,
        state,
    );
    sc.is_valid().then_some(sc)
}

/// A W3C `tracestate` (Trace Context level 1, section 3.3), normalized:
/// 1 to 32 comma-separated `key=value` members, whitespace around them
/// dropped, at most 512 characters. Keys are lowercase
/// `[a-z0-9][a-z0-9_*/-]*` (or `tenant@system`), at most 256 characters and
/// not repeated; values are printable ASCII without `,` and `=`, not ending
/// in a space, at most 256 characters. The normalized form is what the
/// OpenTelemetry parsers read.
pub(crate) fn check_tracestate(value: &str) -> Result<String, &'static str> {
    let members: Vec<&str> = value
        .split(',')
        .map(|m| m.trim_matches([' ', '\t']))
        .filter(|m| !m.is_empty())
        .collect();
    if members.is_empty() || members.len() > 32 {
        return Err("a tracestate has 1 to 32 `key=value` members");
    }
    let key_char = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-*/".contains(&b);
    let mut keys = Vec::with_capacity(members.len());
    for m in &members {
        let Some((key, val)) = m.split_once('=') else {
            return Err("each tracestate member is `key=value`");
        };
        let (tenant, system) = match key.split_once('@') {
            Some((t, s)) => (t, Some(s)),
            None => (key, None),
        };
        let key_ok = !tenant.is_empty()
            && key.len() <= 256
            && (tenant.as_bytes()[0].is_ascii_lowercase()
                || (system.is_some() && tenant.as_bytes()[0].is_ascii_digit()))
            && tenant.bytes().all(key_char)
            && system.is_none_or(|s| {
                !s.is_empty()
                    && s.len() <= 14
                    && s.as_bytes()[0].is_ascii_lowercase()
                    && s.bytes().all(key_char)
            });
        if !key_ok {
            return Err(
                "a tracestate key is lowercase letters, digits and `_-*/`, starting with a letter (or `tenant@system`)",
            );
        }
        let val_ok = !val.is_empty()
            && val.len() <= 256
            && !val.ends_with(' ')
            && val
                .bytes()
                .all(|b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=');
        if !val_ok {
            return Err(
                "a tracestate value is 1 to 256 printable ASCII characters without `,` or `=`",
            );
        }
        if keys.contains(&key) {
            return Err("a tracestate key appears twice");
        }
        keys.push(key);
    }
    let normalized = members.join(",");
    if normalized.len() > 512 {
        return Err("a tracestate has at most 512 characters");
    }
    Ok(normalized)
}

/// `version-traceid-parentid-flags`, lowercase hex, ids not all zero.
pub(crate) fn check_traceparent(value: &str) -> Result<(), &'static str> {
    let parts: Vec<&str> = value.split('-').collect();
    if parts.len() != 4 {
        return Err("it must have four `-`-separated fields");
    }
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(parts[0], 2) || parts[0] == "ff" {
        return Err("the version must be two lowercase hex digits other than `ff`");
    }
    if !hex(parts[1], 32) || parts[1].bytes().all(|b| b == b'0') {
        return Err("the trace id must be 32 lowercase hex digits, not all zero");
    }
    if !hex(parts[2], 16) || parts[2].bytes().all(|b| b == b'0') {
        return Err("the parent id must be 16 lowercase hex digits, not all zero");
    }
    if !hex(parts[3], 2) {
        return Err("the flags must be two lowercase hex digits");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> Event {
        Event::new("order", "42", "OrderPlaced", &json!({"total": 1})).unwrap()
    }

    #[test]
    fn a_tracestate_is_checked_and_sent_as_a_header() {
        let e = event().with_trace_state("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7");
        assert_eq!(
            e.unwrap().headers().get("tracestate").map(String::as_str),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
        // Whitespace around members is dropped, as W3C allows it.
        let spaced = event().with_trace_state(" a=1 ,\tb=2").unwrap();
        assert_eq!(spaced.headers()["tracestate"], "a=1,b=2");
        // Through with_header too, in any case of the name.
        let e = event().with_header("TraceState", "a=1").unwrap();
        assert_eq!(e.headers()["tracestate"], "a=1");
        assert!(event().with_header("tracestate", "Bad=1").is_err());
        // with_trace_context drops the tracestate of the context it replaces.
        let e = event()
            .with_trace_state("a=1")
            .unwrap()
            .with_trace_context("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .unwrap();
        assert!(e.headers().get("tracestate").is_none());
        let e = e.with_trace_state("b=2").unwrap().without_trace_context();
        assert_eq!(
            (e.trace_context(), e.headers().get("tracestate")),
            (None, None)
        );
        let long = (0..33)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        for bad in [
            "",
            "novalue",
            "=v",
            "k=",
            "k=v\n",
            "K=v",
            "k=v=w",
            "k=v,k=w",
            "1k=v",
            "k=a b,=",
            long.as_str(),
        ] {
            let err = event().with_trace_state(bad).unwrap_err();
            assert!(
                err.to_string().contains("invalid tracestate"),
                "{bad:?}: {err}"
            );
        }
    }

    #[cfg(feature = "opentelemetry")]
    #[test]
    fn an_event_created_in_a_span_carries_its_trace_context() {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
        };
        use std::str::FromStr;
        // Outside any span: no trace context, no tracestate.
        let plain = event();
        assert_eq!(plain.trace_context(), None);
        assert!(plain.headers().is_empty());

        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_str("congo=t61rcWkgMzE").unwrap(),
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(sc);
        let traced = {
            let _attached = cx.clone().attach();
            event()
        };
        assert_eq!(
            traced.trace_context(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(
            traced.headers().get("tracestate").map(String::as_str),
            Some("congo=t61rcWkgMzE")
        );
        // The format is the one the relay and consumers parse.
        assert!(check_traceparent(traced.trace_context().unwrap()).is_ok());

        // A context without tracestate clears one taken before; an invalid
        // span context changes nothing.
        let unsampled = SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            TraceFlags::default(),
            true,
            TraceState::default(),
        );
        let moved = traced
            .with_otel_context(&opentelemetry::Context::new().with_remote_span_context(unsampled));
        assert_eq!(
            moved.trace_context(),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
        );
        assert!(moved.headers().get("tracestate").is_none());
        let same = moved
            .clone()
            .with_otel_context(&opentelemetry::Context::new());
        assert_eq!(same, moved);
    }

    #[test]
    fn builds_an_event_with_all_parts() {
        let e = event()
            .with_header("tenant", "acme")
            .unwrap()
            .with_topic("orders.v1")
            .unwrap()
            .with_trace_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .unwrap();
        assert_eq!(e.aggregate_type(), "order");
        assert_eq!(e.aggregate_id(), "42");
        assert_eq!(e.event_type(), "OrderPlaced");
        assert_eq!(e.payload(), r#"{"total":1}"#);
        assert_eq!(e.headers_json(), r#"{"tenant":"acme"}"#);
        assert_eq!(e.topic(), Some("orders.v1"));
        assert_eq!(e.id().as_uuid().get_version_num(), 7);
    }

    #[test]
    fn refuses_empty_names() {
        for (t, i, ty, field) in [
            ("", "1", "T", "aggregate_type"),
            ("a", "", "T", "aggregate_id"),
            ("a", "1", "", "event_type"),
        ] {
            let err = Event::new(t, i, ty, &json!({})).unwrap_err();
            assert!(
                matches!(err, Error::EmptyField { field: f } if f == field),
                "{err}"
            );
            assert!(err.to_string().contains(field));
        }
    }

    #[test]
    fn refuses_nul_characters() {
        let err = Event::new("a\0", "1", "T", &json!({})).unwrap_err();
        assert!(matches!(
            err,
            Error::NulCharacter {
                field: "aggregate_type"
            }
        ));
        let err = Event::new("a", "1", "T", &json!({"x": "a\u{0}b"})).unwrap_err();
        assert!(matches!(err, Error::NulCharacter { field: "payload" }));
    }

    #[test]
    fn refuses_bad_headers() {
        let err = event().with_header("", "x").unwrap_err();
        assert!(err.to_string().contains("must not be empty"), "{err}");
        for reserved in [
            "id",
            "ID",
            "Event_Type",
            "traceparent",
            "outbox.error",
            "OUTBOX.x",
        ] {
            let err = event().with_header(reserved, "x").unwrap_err();
            assert!(
                err.to_string().contains("set by the relay"),
                "{reserved}: {err}"
            );
        }
        for fine in ["tenant", "outboxy", "outbox", "ids", "x-id"] {
            assert!(event().with_header(fine, "x").is_ok(), "{fine}");
        }
        for odd in ["\u{131}d", "id ", " id", "a\tb", "caf\u{e9}"] {
            let err = event().with_header(odd, "x").unwrap_err();
            assert!(err.to_string().contains("visible ASCII"), "{odd:?}: {err}");
        }
        let err = event().with_header("k", "a\0b").unwrap_err();
        assert!(err.to_string().contains("NUL"), "{err}");
    }

    #[test]
    fn refuses_bad_topic_and_trace_context() {
        let err = event().with_topic("no spaces").unwrap_err();
        assert!(matches!(err, Error::InvalidTopic { .. }));
        assert!(err.to_string().contains("no spaces"));
        for bad in [
            "",
            "00-abc-def-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            let err = event().with_trace_context(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidTraceContext { .. }), "{bad}");
        }
    }

    #[test]
    fn parses_event_ids() {
        let id = EventId::new();
        assert_eq!(EventId::parse(&id.to_string()).unwrap(), id);
        let err = EventId::parse("not-a-uuid").unwrap_err();
        assert!(
            err.to_string().contains("`not-a-uuid` is not an event id"),
            "{err}"
        );
    }

    #[test]
    fn checks_payload_size() {
        let e = Event::new("a", "1", "T", &"x".repeat(100)).unwrap();
        assert!(e.check_size(102).is_ok());
        let err = e.check_size(50).unwrap_err();
        assert!(matches!(err, Error::PayloadTooLarge { size: 102, max: 50 }));
        assert!(err.to_string().contains("102 bytes"));
    }

    #[test]
    fn refuses_unserializable_payload() {
        let mut map = std::collections::HashMap::new();
        map.insert(vec![1u8], 1);
        let err = Event::new("a", "1", "T", &map).unwrap_err();
        assert!(matches!(err, Error::Payload(_)));
    }
}
