//! Outbox rows: mapping a published table's columns (by name, from its
//! Relation message or a query's row description) to the event the relay
//! publishes, and checking each row on the way.

use std::sync::Arc;

use bytes::Bytes;

use crate::pgoutput::decode::{Cell, Relation};
use crate::pipeline::dead_letter::DeadLetter;
use crate::pipeline::debezium::{Debezium, PayloadKind};
use crate::postgres::connection::Row;
use crate::{Error, Result};

/// One event read from the outbox, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// The event id (a UUID in text form).
    pub id: String,
    /// Aggregate type: picks the default topic.
    pub aggregate_type: String,
    /// Aggregate id: the record key.
    pub aggregate_id: String,
    /// Event type.
    pub event_type: String,
    /// The payload: jsonb in PostgreSQL's text form, sent as the record value.
    pub payload: Bytes,
    /// Extra headers from the `headers` column.
    pub headers: Vec<(String, String)>,
    /// Per-row topic override.
    pub topic: Option<String>,
    /// W3C traceparent.
    pub trace_context: Option<String>,
    /// The record key when it is not the aggregate id's bytes (the
    /// Debezium layout under its JSON converter).
    pub key: Option<Bytes>,
    /// Records as Debezium's outbox router shapes them: headers are `id`
    /// and the placed columns only.
    pub debezium: bool,
}

impl OutboxEvent {
    /// The `tracestate` header, if the event has one.
    pub fn tracestate(&self) -> Option<&str> {
        self.header("tracestate")
    }

    /// The W3C `traceparent`: the column's, or under the Debezium layout
    /// the header made from `tracingspancontext`.
    pub fn traceparent(&self) -> Option<&str> {
        match &self.trace_context {
            Some(tp) => Some(tp),
            None if self.debezium => self.header("traceparent"),
            None => None,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The record key.
    pub fn key(&self) -> &[u8] {
        self.key.as_deref().unwrap_or(self.aggregate_id.as_bytes())
    }

    /// The Kafka record headers, in order: `id`, `event_type`,
    /// `aggregate_type`, `aggregate_id`, `traceparent` (when set), then the
    /// row's own headers. Published records and dead letters both use it.
    /// Under the Debezium layout: `id`, then the placed columns and trace
    /// headers.
    pub fn record_headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        let relay_headers = if self.debezium { 1 } else { 4 };
        [
            ("id", self.id.as_bytes()),
            ("event_type", self.event_type.as_bytes()),
            ("aggregate_type", self.aggregate_type.as_bytes()),
            ("aggregate_id", self.aggregate_id.as_bytes()),
        ]
        .into_iter()
        .take(relay_headers)
        .chain(
            self.trace_context
                .as_deref()
                .map(|tp| ("traceparent", tp.as_bytes())),
        )
        .chain(self.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())))
    }

    /// [`record_headers`](Self::record_headers) as Kafka record headers,
    /// with room for `extra` more.
    pub fn kafka_headers(&self, extra: usize) -> rdkafka::message::OwnedHeaders {
        self.record_headers().fold(
            rdkafka::message::OwnedHeaders::new_with_capacity(5 + self.headers.len() + extra),
            |h, (key, value)| {
                h.insert(rdkafka::message::Header {
                    key,
                    value: Some(value),
                })
            },
        )
    }

    /// The dead letter for this event, which the relay could not send, and why.
    pub fn dead_letter(&self, original_topic: Option<String>, err: &Error) -> DeadLetter {
        let headers = self
            .record_headers()
            .map(|(k, v)| (k.to_owned(), v.to_vec()))
            .collect();
        DeadLetter {
            event_id: self.id.clone(),
            key: Some(self.key().to_vec()),
            value: (!err.is_too_large()).then(|| self.payload.to_vec()),
            headers,
            original_topic,
            reason: err.to_string(),
        }
    }
}

const REQUIRED: [&str; 5] = [
    "id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "payload",
];

/// The columns of the virtual rows made of outbox messages, in order.
pub const MESSAGE_COLUMNS: [&str; 8] = [
    "id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "payload",
    "headers",
    "topic",
    "trace_context",
];

/// Which outbox table layout the relay reads (`--table-layout`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TableLayout {
    /// The migrations' `outbox` table (`aggregate_type`, `event_type`, ...).
    #[default]
    Native,
    /// Debezium's outbox table (`aggregatetype`, `aggregateid`, `type`, ...),
    /// published as Debezium's outbox router does.
    Debezium(Arc<Debezium>),
}

/// Where each outbox column sits in a table's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    table: String,
    /// id, aggregate type, aggregate id, event type, payload. Under the
    /// Debezium layout the event type (`type`) is optional: `usize::MAX`
    /// when the table has none (every lookup of it then finds nothing).
    required: [usize; 5],
    headers: Option<usize>,
    topic: Option<usize>,
    trace_context: Option<usize>,
    debezium: Option<DebeziumColumns>,
}

/// The Debezium layout's settings and its extra columns.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DebeziumColumns {
    settings: Arc<Debezium>,
    payload: PayloadKind,
    /// Whether `aggregateid` is an integer column (a JSON number key).
    integer_key: bool,
    span_context: Option<usize>,
    /// Placed columns: position and header name.
    placements: Vec<(usize, String)>,
}

impl Layout {
    /// Maps the columns of a query result over `table` (schema-qualified,
    /// for messages).
    pub fn from_columns(table: &str, columns: &[String]) -> Result<Self> {
        let names: Vec<&str> = columns.iter().map(String::as_str).collect();
        Self::from_names(table.to_owned(), &names)
    }

    /// Maps the columns of a Relation message under `kind`.
    pub fn from_relation_as(rel: &Relation, kind: &TableLayout) -> Result<Self> {
        let table = format!("{}.{}", printable(&rel.namespace), printable(&rel.name));
        let names: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
        let oid = |name: &str| {
            rel.columns
                .iter()
                .find(|c| c.name == name)
                .map(|c| c.type_oid)
        };
        Self::with_kind(table, &names, kind, oid("payload"), oid("aggregateid"))
    }

    /// Maps the columns of a `SELECT * FROM outbox` result under `kind`;
    /// `payload_oid` is the type of the `payload` column.
    pub fn for_columns_as(
        table: &str,
        columns: &[String],
        kind: &TableLayout,
        payload_oid: Option<u32>,
        key_oid: Option<u32>,
    ) -> Result<Self> {
        let names: Vec<&str> = columns.iter().map(String::as_str).collect();
        Self::with_kind(table.to_owned(), &names, kind, payload_oid, key_oid)
    }

    fn with_kind(
        table: String,
        names: &[&str],
        kind: &TableLayout,
        payload_oid: Option<u32>,
        key_oid: Option<u32>,
    ) -> Result<Self> {
        let settings = match kind {
            TableLayout::Native => return Self::from_names(table, names),
            TableLayout::Debezium(settings) => settings,
        };
        let find = |name: &str| names.iter().position(|n| *n == name);
        let missing = |name: &str, why: &str| Error::NotAnOutbox {
            table: table.clone(),
            reason: format!(
                "it has no `{name}` column ({why}); restore the column, or remove the table \
                 from the publication"
            ),
        };
        let debezium_required =
            "--table-layout debezium reads id, aggregatetype, aggregateid, payload";
        let mut required = [usize::MAX; 5];
        for (slot, name) in [
            (0, "id"),
            (1, "aggregatetype"),
            (2, "aggregateid"),
            (4, "payload"),
        ] {
            required[slot] = find(name).ok_or_else(|| missing(name, debezium_required))?;
        }
        if let Some(i) = find("type") {
            required[3] = i;
        }
        let placements = settings
            .placements
            .iter()
            .map(|p| {
                find(&p.column)
                    .map(|i| (i, p.header.clone()))
                    .ok_or_else(|| missing(&p.column, "named in --additional-placement"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            table,
            required,
            headers: None,
            topic: None,
            trace_context: None,
            debezium: Some(DebeziumColumns {
                settings: settings.clone(),
                payload: PayloadKind::from_oid(payload_oid),
                // int2, int4, int8.
                integer_key: matches!(key_oid, Some(20 | 21 | 23)),
                span_context: find("tracingspancontext"),
                placements,
            }),
        })
    }

    /// Maps the columns of a Relation message. A table without the required
    /// columns is refused (it is not an outbox, or a required column was dropped).
    pub fn from_relation(rel: &Relation) -> Result<Self> {
        let table = format!("{}.{}", printable(&rel.namespace), printable(&rel.name));
        let names: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
        Self::from_names(table, &names)
    }

    /// The layout of the virtual rows [`crate::pipeline::message`] makes of
    /// messages emitted with `prefix`.
    pub fn for_messages(prefix: &str) -> Self {
        let names = MESSAGE_COLUMNS;
        Self::from_names(
            format!("messages with prefix `{}`", printable(prefix)),
            &names,
        )
        .expect("the message columns hold every required one")
    }

    fn from_names(table: String, names: &[&str]) -> Result<Self> {
        let find = |name: &str| names.iter().position(|n| *n == name);
        let mut required = [0usize; 5];
        for (slot, name) in required.iter_mut().zip(REQUIRED) {
            *slot = find(name).ok_or_else(|| Error::NotAnOutbox {
                table: table.clone(),
                reason: format!(
                    "it has no `{name}` column (required: {}); restore the column, or remove the table \
                     from the publication",
                    REQUIRED.join(", ")
                ),
            })?;
        }
        Ok(Self {
            table,
            required,
            headers: find("headers"),
            topic: find("topic"),
            trace_context: find("trace_context"),
            debezium: None,
        })
    }

    /// The table this layout describes.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Turns the values of an Insert into an event.
    pub fn event(&self, tuple: &[Cell]) -> Result<OutboxEvent> {
        // pgoutput sends text unless `binary` is requested, and an insert has
        // no unchanged TOAST values; anything else is a protocol surprise.
        if let Some(i) = tuple
            .iter()
            .position(|c| matches!(c, Cell::Unchanged | Cell::Binary(_)))
        {
            return Err(Error::Protocol(format!(
                "column {i} of an insert into {} is not in text format",
                self.table
            )));
        }
        // Borrowed, not cloned: each clone of a cell is an atomic increment
        // and decrement, which showed up in the relay's profile.
        self.build(|i| match tuple.get(i) {
            Some(Cell::Text(b)) => Some(b),
            _ => None,
        })
    }

    /// Maps the columns of a `SELECT * FROM outbox` result (the backfill).
    pub fn for_columns(table: &str, columns: &[String]) -> Result<Self> {
        let names: Vec<&str> = columns.iter().map(String::as_str).collect();
        Self::from_names(table.to_owned(), &names)
    }

    /// Turns one row of such a result into an event.
    pub fn event_from_row(&self, row: &Row, columns: &[String]) -> Result<OutboxEvent> {
        self.build(|i| columns.get(i).and_then(|c| row.get_bytes(c)))
    }

    /// What can be salvaged of a row that is not a valid event, for the
    /// dead-letter topic: the id, the aggregate id as key, the payload as
    /// value, the other text columns as headers.
    pub fn dead_letter(&self, tuple: &[Cell], err: &Error) -> DeadLetter {
        self.salvage(
            |i| match tuple.get(i) {
                Some(Cell::Text(b)) => Some(b.clone()),
                _ => None,
            },
            err,
        )
    }

    /// [`dead_letter`](Self::dead_letter) for a row of a query result.
    pub fn dead_letter_from_row(&self, row: &Row, columns: &[String], err: &Error) -> DeadLetter {
        self.salvage(
            |i| columns.get(i).and_then(|c| row.get_bytes(c)).cloned(),
            err,
        )
    }

    fn salvage(&self, text: impl Fn(usize) -> Option<Bytes>, err: &Error) -> DeadLetter {
        let names = ["id", "aggregate_type", "aggregate_id", "event_type"];
        let headers = names
            .iter()
            .zip(self.required)
            .filter_map(|(name, i)| text(i).map(|v| ((*name).to_owned(), v.to_vec())))
            .collect();
        DeadLetter {
            // Logged: escaped. (The `id` header keeps the row's bytes.)
            event_id: text(self.required[0])
                .map(|b| printable(&String::from_utf8_lossy(&b)).into_owned())
                .unwrap_or_else(|| "unknown".to_owned()),
            key: text(self.required[2]).map(|b| b.to_vec()),
            value: text(self.required[4]).map(|b| b.to_vec()),
            headers,
            original_topic: self
                .topic
                .and_then(&text)
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
            reason: err.to_string(),
        }
    }

    fn build<'a>(&self, get: impl Fn(usize) -> Option<&'a Bytes>) -> Result<OutboxEvent> {
        let text = |i: usize| get(i).map(|b| String::from_utf8_lossy(b).into_owned());
        let id = text(self.required[0]).unwrap_or_else(|| "unknown".to_owned());
        let shown_id = printable(&id).into_owned();
        let bad = |reason: String| Error::BadEvent {
            event_id: shown_id.clone(),
            reason,
        };
        // The id is logged with every event from here on: one that could
        // forge a log line (a line break) or hide itself (bidi controls) is
        // refused here, escaped, so no later log needs to escape it. (The
        // migrations' `id` is a uuid; a user's table may use text.)
        if shown_id != id {
            return Err(bad(format!(
                "its `id` has control or invisible formatting characters (shown escaped); \
                 give {} ids of visible characters",
                self.table
            )));
        }
        let required = |pos: usize, name: &str| -> Result<String> {
            match text(self.required[pos]) {
                Some(v) if !v.is_empty() => Ok(v),
                _ => Err(bad(format!(
                    "column `{name}` of {} is null or empty; every event needs one",
                    self.table
                ))),
            }
        };
        if id == "unknown" {
            return Err(bad(format!("column `id` of {} is null", self.table)));
        }
        if let Some(d) = &self.debezium {
            let aggregate_type = required(1, "aggregatetype")?;
            let aggregate_id = required(2, "aggregateid")?;
            let raw = get(self.required[4])
                .ok_or_else(|| bad(format!("column `payload` of {} is null", self.table)))?;
            let payload = d.settings.value(raw, d.payload).map_err(bad)?;
            let mut headers: Vec<(String, String)> = d
                .placements
                .iter()
                .filter_map(|(i, name)| text(*i).map(|v| (name.clone(), v)))
                .collect();
            if let Some(context) = d.span_context.and_then(&text) {
                headers.extend(crate::pipeline::debezium::span_context(&context));
            }
            return Ok(OutboxEvent {
                key: Some(d.settings.key(&aggregate_id, d.integer_key)),
                id: id.clone(),
                aggregate_type,
                aggregate_id,
                event_type: text(self.required[3]).unwrap_or_default(),
                payload,
                headers,
                topic: None,
                trace_context: None,
                debezium: true,
            });
        }
        let aggregate_type = required(1, "aggregate_type")?;
        let aggregate_id = required(2, "aggregate_id")?;
        let event_type = required(3, "event_type")?;
        let payload = get(self.required[4])
            .ok_or_else(|| bad(format!("column `payload` of {} is null", self.table)))?;
        let headers = match self.headers.and_then(&get) {
            None => Vec::new(),
            Some(raw) => parse_headers(raw).map_err(|why| bad(why.to_owned()))?,
        };
        let topic = self.topic.and_then(&text);
        if let Some(t) = &topic
            && let Err(why) = outbox::topic::validate(t)
        {
            return Err(bad(format!(
                "its topic override `{}` is not a legal Kafka topic: {why}",
                printable(t)
            )));
        }
        Ok(OutboxEvent {
            id: id.clone(),
            aggregate_type,
            aggregate_id,
            event_type,
            payload: payload.clone(),
            headers,
            topic,
            trace_context: self.trace_context.and_then(text),
            key: None,
            debezium: false,
        })
    }
}

/// A row's string as it may appear in a log line or an error: control
/// characters (line breaks that would forge a log line, terminal escapes),
/// invisible formatting characters (bidi overrides, zero-width and filler
/// characters, variation selectors, tags: what makes one name look like
/// another) and the backslash itself (so a literal `\u{a}` cannot pose as
/// an escaped one) escaped as `\u{..}`; everything else as is.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    fn hidden(c: char) -> bool {
        c.is_control()
            || matches!(c,
                '\\' | '\u{00AD}' | '\u{034F}' | '\u{0600}'..='\u{0605}' | '\u{061C}'
                | '\u{06DD}' | '\u{070F}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
                | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
                | '\u{FFA0}' | '\u{FFF9}'..='\u{FFFB}' | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0000}'..='\u{E0FFF}')
    }
    if !s.chars().any(hidden) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if hidden(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

fn parse_headers(raw: &[u8]) -> std::result::Result<Vec<(String, String)>, &'static str> {
    let value: serde_json::Value =
        serde_json::from_slice(raw).map_err(|_| "its `headers` column is not valid JSON")?;
    let object = value
        .as_object()
        .ok_or("its `headers` column is not a JSON object of strings")?;
    object
        .iter()
        .map(|(k, v)| {
            // The write helper's rule, for rows written with plain SQL: no
            // second `id` or `event_type` next to the relay's, no posing as
            // a dead letter with `outbox.*`, no look-alike names.
            if let Some(problem) = outbox::header_name_problem(k) {
                return Err(match problem {
                    outbox::HeaderNameProblem::Empty => {
                        "its `headers` column has an empty header name"
                    }
                    outbox::HeaderNameProblem::Reserved => {
                        "its `headers` column sets a header the relay sets itself \
                         (id, event_type, aggregate_type, aggregate_id, traceparent, outbox.*)"
                    }
                    outbox::HeaderNameProblem::NotVisibleAscii => {
                        "its `headers` column has a header name that is not visible ASCII \
                         (spaces, control or non-ASCII characters)"
                    }
                    _ => "its `headers` column has a header name the write helper refuses",
                });
            }
            match v.as_str() {
                Some(s) => Ok((k.clone(), s.to_owned())),
                None => Err("its `headers` column has a value that is not a string"),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::decode::RelationColumn;

    fn relation(cols: &[&str]) -> Relation {
        Relation {
            oid: 1,
            namespace: "public".into(),
            name: "outbox".into(),
            columns: cols
                .iter()
                .map(|c| RelationColumn {
                    is_key: *c == "id",
                    name: (*c).into(),
                    type_oid: 25,
                })
                .collect(),
        }
    }

    fn t(s: &str) -> Cell {
        Cell::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    const FULL: [&str; 9] = [
        "id",
        "aggregate_type",
        "aggregate_id",
        "event_type",
        "payload",
        "headers",
        "topic",
        "trace_context",
        "created_at",
    ];

    #[test]
    fn maps_columns_by_name() {
        // Columns in an unusual order, plus an unknown one, still map.
        let rel = relation(&[
            "extra",
            "payload",
            "event_type",
            "aggregate_id",
            "aggregate_type",
            "id",
        ]);
        let layout = Layout::from_relation(&rel).unwrap();
        let ev = layout
            .event(&[
                t("x"),
                t("{\"a\": 1}"),
                t("Placed"),
                t("42"),
                t("order"),
                t("abc"),
            ])
            .unwrap();
        assert_eq!(ev.id, "abc");
        assert_eq!(ev.aggregate_type, "order");
        assert_eq!(ev.aggregate_id, "42");
        assert_eq!(&ev.payload[..], b"{\"a\": 1}");
        assert!(ev.headers.is_empty());
        assert_eq!(ev.topic, None);
    }

    #[test]
    fn reads_optional_columns() {
        let layout = Layout::from_relation(&relation(&FULL)).unwrap();
        let ev = layout
            .event(&[
                t("abc"),
                t("order"),
                t("42"),
                t("Placed"),
                t("{}"),
                t("{\"tenant\": \"acme\"}"),
                t("orders.v1"),
                t("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                t("2026-01-01"),
            ])
            .unwrap();
        assert_eq!(ev.headers, vec![("tenant".to_owned(), "acme".to_owned())]);
        assert_eq!(ev.topic.as_deref(), Some("orders.v1"));
        assert!(ev.trace_context.is_some());
    }

    #[test]
    fn record_headers_come_in_a_fixed_order() {
        let layout = Layout::from_relation(&relation(&FULL)).unwrap();
        let ev = layout
            .event(&[
                t("abc"),
                t("order"),
                t("42"),
                t("Placed"),
                t("{}"),
                t("{\"tenant\": \"acme\"}"),
                Cell::Null,
                t("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                Cell::Null,
            ])
            .unwrap();
        let names: Vec<&str> = ev.record_headers().map(|(k, _)| k).collect();
        assert_eq!(
            names,
            [
                "id",
                "event_type",
                "aggregate_type",
                "aggregate_id",
                "traceparent",
                "tenant"
            ]
        );
        assert_eq!(ev.record_headers().last().unwrap().1, b"acme");
    }

    #[test]
    fn the_debezium_layout_names_missing_columns() {
        let settings = Debezium::new(
            crate::pipeline::debezium::Converter::Json,
            false,
            "type:header:eventType,tenant:header",
        )
        .unwrap();
        let kind = TableLayout::Debezium(Arc::new(settings));
        let full = [
            "id",
            "aggregatetype",
            "aggregateid",
            "type",
            "payload",
            "tenant",
        ];
        let layout = Layout::from_relation_as(&relation(&full), &kind).unwrap();
        let ev = layout
            .event(&[
                t("e1"),
                t("Order"),
                t("7"),
                t("Created"),
                t("{}"),
                Cell::Null,
            ])
            .unwrap();
        assert_eq!(ev.key(), br#""7""#);
        // A bigint aggregateid is a JSON number under JsonConverter.
        let mut bigint = relation(&full);
        bigint.columns[2].type_oid = 20;
        let numeric = Layout::from_relation_as(&bigint, &kind).unwrap();
        let ev7 = numeric
            .event(&[
                t("e1"),
                t("Order"),
                t("7"),
                t("Created"),
                t("{}"),
                Cell::Null,
            ])
            .unwrap();
        assert_eq!(ev7.key(), b"7");
        let names: Vec<&str> = ev.record_headers().map(|(k, _)| k).collect();
        assert_eq!(names, ["id", "eventType"]);
        let err = Layout::from_relation_as(&relation(&full[..5]), &kind).unwrap_err();
        assert!(err.to_string().contains("no `tenant` column"), "{err}");
        assert!(err.to_string().contains("--additional-placement"), "{err}");
        let err = Layout::from_relation_as(
            &relation(&["id", "aggregatetype", "payload", "type", "tenant"]),
            &kind,
        )
        .unwrap_err();
        assert!(err.to_string().contains("no `aggregateid` column"), "{err}");
        // The native layout does not accept Debezium's names.
        assert!(Layout::from_relation_as(&relation(&full), &TableLayout::Native).is_err());
    }

    #[test]
    fn refuses_a_table_without_required_columns() {
        let err = Layout::from_relation(&relation(&[
            "id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
        ]))
        .unwrap_err();
        assert!(matches!(err, Error::NotAnOutbox { .. }));
        assert!(err.to_string().contains("no `payload` column"), "{err}");
    }

    #[test]
    fn refuses_bad_rows_naming_the_event() {
        let layout = Layout::from_relation(&relation(&FULL)).unwrap();
        let row = |headers: &str, topic: Cell, payload: Cell| {
            vec![
                t("ev-1"),
                t("order"),
                t("42"),
                t("Placed"),
                payload,
                t(headers),
                topic,
                Cell::Null,
                Cell::Null,
            ]
        };
        let err = layout.event(&row("[1]", Cell::Null, t("{}"))).unwrap_err();
        assert!(err.to_string().contains("event ev-1"), "{err}");
        assert!(err.to_string().contains("not a JSON object"), "{err}");
        let err = layout
            .event(&row("{\"a\": 1}", Cell::Null, t("{}")))
            .unwrap_err();
        assert!(err.to_string().contains("not a string"), "{err}");
        for spoof in [
            r#"{"id": "x"}"#,
            r#"{"ID": "x"}"#,
            r#"{"event_type": "Paid"}"#,
            r#"{"traceparent": "00-x"}"#,
            r#"{"outbox.error": "fake"}"#,
            r#"{"Outbox.original_topic": "t"}"#,
        ] {
            let err = layout.event(&row(spoof, Cell::Null, t("{}"))).unwrap_err();
            assert!(err.to_string().contains("sets itself"), "{spoof}: {err}");
        }
        let err = layout
            .event(&row(r#"{"": "x"}"#, Cell::Null, t("{}")))
            .unwrap_err();
        assert!(err.to_string().contains("empty header name"), "{err}");
        for odd in [r#"{"\u0131d": "x"}"#, r#"{"id ": "x"}"#, r#"{"a\tb": "x"}"#] {
            let err = layout.event(&row(odd, Cell::Null, t("{}"))).unwrap_err();
            assert!(
                err.to_string().contains("not visible ASCII"),
                "{odd}: {err}"
            );
        }
        let ok = layout
            .event(&row(
                r#"{"outboxy": "x", "tenant": "t"}"#,
                Cell::Null,
                t("{}"),
            ))
            .unwrap();
        assert_eq!(ok.headers.len(), 2);
        let err = layout
            .event(&row("{}", t("bad topic"), t("{}")))
            .unwrap_err();
        assert!(err.to_string().contains("`bad topic`"), "{err}");
        let err = layout
            .event(&row("{}", Cell::Null, Cell::Null))
            .unwrap_err();
        assert!(err.to_string().contains("`payload`"), "{err}");
    }

    /// Issue 10, item 11: row strings reach logs only escaped: an id with a
    /// line break (a forged log line), a terminal escape or a bidi override
    /// is refused, shown escaped; so is such a topic override.
    #[test]
    fn row_strings_reach_logs_escaped() {
        assert_eq!(printable("ord-1.v2 ünïcode"), "ord-1.v2 ünïcode");
        // A literal escape cannot pose as a real one.
        assert_eq!(printable("a\\u{a}b"), "a\\u{5c}u{a}b");
        for hidden in ['\u{e0041}', '\u{fe0f}', '\u{3164}', '\u{2066}', '\u{034f}'] {
            assert!(
                !printable(&format!("id{hidden}")).contains(hidden),
                "{hidden:?}"
            );
        }
        assert_eq!(
            printable("a\nb\x1b[31m\u{202e}c"),
            "a\\u{a}b\\u{1b}[31m\\u{202e}c"
        );
        let layout = Layout::from_relation(&relation(&FULL)).unwrap();
        let row = |id: &str, topic: Cell| {
            vec![
                t(id),
                t("order"),
                t("42"),
                t("Placed"),
                t("{}"),
                t("{}"),
                topic,
                Cell::Null,
                Cell::Null,
            ]
        };
        let forged = "ev-1\n2026-11-23T00:00:00Z  INFO outbox_relay: all good";
        let err = layout
            .event(&row(forged, Cell::Null))
            .unwrap_err()
            .to_string();
        assert!(!err.contains('\n'), "{err}");
        assert!(err.contains("ev-1\\u{a}2026"), "{err}");
        assert!(
            err.contains("control or invisible formatting characters"),
            "{err}"
        );
        let letter = layout.dead_letter(&row(forged, Cell::Null), &Error::Config("x".into()));
        assert!(!letter.event_id.contains('\n'), "{}", letter.event_id);
        let err = layout
            .event(&row("ev-2", t("topic\u{1b}[2J")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`topic\\u{1b}[2J`"), "{err}");
        assert!(!err.contains('\u{1b}'), "{err}");
    }
}
