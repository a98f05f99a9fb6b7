//! The tableless outbox: an event written into the WAL as a transactional
//! logical decoding message (`pg_logical_emit_message(true, prefix, content)`)
//! instead of a row, and the format of that content, which the relay reads
//! back with [`Content::decode`].
//!
//! Nothing is stored in a table: no bloat, no pruning. What is given up is
//! everything that reads the table: the relay's first-start backfill, a
//! replay after a lost slot, and `outbox-relay verify`. An event emitted
//! before the relay's slot existed never reaches Kafka, so emit only once
//! the relay finished its first start (`backfill complete` in its log).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{Event, EventId, Outbox, Result};

/// The prefix the write helper emits with; start the relay with
/// `--message-prefix outbox` (messages are off there by default).
pub const DEFAULT_MESSAGE_PREFIX: &str = "outbox";

/// The version of the content format written by this library. The relay
/// refuses a higher one (the writer is newer than the relay).
pub const CONTENT_VERSION: u32 = 1;

// Transactional: the message is decoded in its transaction, in WAL order
// with the transaction's rows, and only if the transaction commits.
pub(crate) const EMIT_ONE: &str =
    "SELECT pg_catalog.pg_logical_emit_message(true, $1::text, $2::bytea)::text";
// A function scan returns the array's elements in order, so the messages
// go into the WAL in slice order.
pub(crate) const EMIT_MANY: &str = "SELECT pg_catalog.pg_logical_emit_message(true, $1::text, m)::text \
     FROM pg_catalog.unnest($2::bytea[]) AS m";

/// The content of one outbox message: the event as JSON, with the payload
/// embedded as is (not as a string).
#[derive(Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Content<'a> {
    /// Format version ([`CONTENT_VERSION`]).
    pub v: u32,
    /// The event id.
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    /// Aggregate type.
    #[serde(borrow)]
    pub aggregate_type: Cow<'a, str>,
    /// Aggregate id (the record key).
    #[serde(borrow)]
    pub aggregate_id: Cow<'a, str>,
    /// Event type.
    #[serde(borrow)]
    pub event_type: Cow<'a, str>,
    /// The payload, JSON text as the writer serialized it.
    #[serde(borrow)]
    pub payload: &'a RawValue,
    /// Extra headers: a JSON object of strings, as text.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<&'a RawValue>,
    /// Topic override.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<Cow<'a, str>>,
    /// W3C traceparent.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub trace_context: Option<Cow<'a, str>>,
}

/// Why a message's content could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContentError {
    /// Not JSON of the expected shape.
    #[error("its content is not an outbox event ({0})")]
    Malformed(String),
    /// Written by a newer version of the library.
    #[error(
        "its content has format version {found}, newer than the {supported} this relay reads; \
         upgrade the relay before the writers"
    )]
    Version {
        /// The version found.
        found: u32,
        /// The highest version understood.
        supported: u32,
    },
}

impl<'a> Content<'a> {
    /// Reads a message's content.
    pub fn decode(bytes: &'a [u8]) -> std::result::Result<Self, ContentError> {
        // The version first, on its own: a newer writer may have changed
        // the shape, and "upgrade the relay" is the useful error then.
        #[derive(Deserialize)]
        struct Version {
            v: Option<u32>,
        }
        let version: Version =
            serde_json::from_slice(bytes).map_err(|e| ContentError::Malformed(e.to_string()))?;
        match version.v {
            Some(v) if v > CONTENT_VERSION => Err(ContentError::Version {
                found: v,
                supported: CONTENT_VERSION,
            }),
            Some(_) => {
                serde_json::from_slice(bytes).map_err(|e| ContentError::Malformed(e.to_string()))
            }
            None => Err(ContentError::Malformed("no `v` field".into())),
        }
    }

    /// The content of `event`, as it goes into the WAL.
    pub fn encode(event: &Event) -> Vec<u8> {
        let payload: &RawValue = serde_json::from_str(&event.payload)
            .expect("an event's payload is JSON serialized by serde_json");
        let headers_json = (!event.headers.is_empty()).then(|| event.headers_json());
        let headers: Option<&RawValue> = headers_json
            .as_deref()
            .map(|h| serde_json::from_str(h).expect("a map of strings is JSON"));
        let content = Content {
            v: CONTENT_VERSION,
            id: Cow::Owned(event.id.to_string()),
            aggregate_type: Cow::Borrowed(&event.aggregate_type),
            aggregate_id: Cow::Borrowed(&event.aggregate_id),
            event_type: Cow::Borrowed(&event.event_type),
            payload,
            headers,
            topic: event.topic.as_deref().map(Cow::Borrowed),
            trace_context: event.trace_context.as_deref().map(Cow::Borrowed),
        };
        serde_json::to_vec(&content).expect("the content serializes")
    }
}

impl Outbox {
    /// Writes one event into the WAL as a transactional logical decoding
    /// message, in the caller's transaction, instead of inserting a row:
    /// the event commits (or rolls back) with the transaction, and nothing
    /// is stored. See the [module docs](crate::message) for what is given
    /// up. Needs PostgreSQL's `wal_level = logical` and nothing else: no
    /// table, no migration.
    pub async fn emit(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        event: &Event,
    ) -> Result<EventId> {
        self.check(std::slice::from_ref(event))?;
        sqlx::query(EMIT_ONE)
            .bind(self.message_prefix)
            .bind(Content::encode(event))
            .execute(&mut **tx)
            .await?;
        Ok(event.id)
    }

    /// Writes many events as messages in one round trip, in slice order.
    /// Nothing is written if any event fails validation.
    pub async fn emit_all(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        events: &[Event],
    ) -> Result<Vec<EventId>> {
        self.check(events)?;
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let contents: Vec<Vec<u8>> = events.iter().map(Content::encode).collect();
        sqlx::query(EMIT_MANY)
            .bind(self.message_prefix)
            .bind(&contents)
            .execute(&mut **tx)
            .await?;
        Ok(events.iter().map(|e| e.id).collect())
    }
}

/// Emits one event as a logical decoding message in the caller's
/// transaction, with default settings (prefix [`DEFAULT_MESSAGE_PREFIX`]).
pub async fn emit(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    event: &Event,
) -> Result<EventId> {
    Outbox::default().emit(tx, event).await
}

/// Emits many events as messages in one round trip, with default settings.
pub async fn emit_all(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    events: &[Event],
) -> Result<Vec<EventId>> {
    Outbox::default().emit_all(tx, events).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_round_trips_with_the_payload_embedded() {
        let event = Event::new(
            "order",
            "42",
            "Placed",
            &json!({"total": 12.5, "s": "a\"b"}),
        )
        .unwrap()
        .with_header("tenant", "acme")
        .unwrap()
        .with_topic("orders.v1")
        .unwrap();
        let bytes = Content::encode(&event);
        let text = String::from_utf8(bytes.clone()).unwrap();
        // Embedded, not a string: consumers of the record get the JSON itself.
        assert!(
            text.contains(r#""payload":{"s":"a\"b","total":12.5}"#),
            "{text}"
        );
        let c = Content::decode(&bytes).unwrap();
        assert_eq!(c.v, CONTENT_VERSION);
        assert_eq!(c.id, event.id().to_string());
        assert_eq!(c.aggregate_type, "order");
        assert_eq!(c.aggregate_id, "42");
        assert_eq!(c.event_type, "Placed");
        assert_eq!(c.payload.get(), event.payload());
        assert_eq!(c.headers.unwrap().get(), r#"{"tenant":"acme"}"#);
        assert_eq!(c.topic.as_deref(), Some("orders.v1"));
        assert_eq!(c.trace_context, None);
    }

    #[test]
    fn escaped_strings_decode() {
        let c = Content::decode(
            br#"{"v":1,"id":"a\u0062c","aggregate_type":"o","aggregate_id":"4\n2","event_type":"t","payload":[1]}"#,
        )
        .unwrap();
        assert_eq!(c.id, "abc");
        assert_eq!(c.aggregate_id, "4\n2");
        assert!(c.headers.is_none());
    }

    #[test]
    fn bad_content_is_named() {
        let err = Content::decode(b"not json").unwrap_err();
        assert!(err.to_string().contains("not an outbox event"), "{err}");
        let err = Content::decode(br#"{"id":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("no `v` field"), "{err}");
        let err = Content::decode(br#"{"v":1,"id":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("aggregate_type"), "{err}");
        let err = Content::decode(br#"{"v":2,"whatever":true}"#).unwrap_err();
        assert_eq!(
            err,
            ContentError::Version {
                found: 2,
                supported: 1
            }
        );
        assert!(err.to_string().contains("upgrade the relay"), "{err}");
    }
}
