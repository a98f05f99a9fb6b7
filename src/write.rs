//! Writing events into the outbox table with sqlx, inside the caller's
//! transaction, so the events commit (or roll back) with the business rows.

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::{Event, EventId, Result};

/// Kafka's default maximum message size (`message.max.bytes`), 1 MiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

pub(crate) const INSERT_ONE: &str = "INSERT INTO outbox \
    (id, aggregate_type, aggregate_id, event_type, payload, headers, topic, trace_context) \
    VALUES ($1, $2, $3, $4, $5::text::jsonb, $6::text::jsonb, $7, $8)";

// One round trip for a whole batch: arrays unnested into rows. The jsonb
// columns travel as text arrays, so no client-side JSON type is needed.
pub(crate) const INSERT_MANY: &str = "INSERT INTO outbox \
    (id, aggregate_type, aggregate_id, event_type, payload, headers, topic, trace_context) \
    SELECT id, aggregate_type, aggregate_id, event_type, payload::jsonb, headers::jsonb, topic, trace_context \
    FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[]) \
    AS t(id, aggregate_type, aggregate_id, event_type, payload, headers, topic, trace_context)";

// With `keep_rows(false)`: the rows just inserted, deleted in the same
// transaction. The insert is in the WAL either way; the outbox publication
// publishes inserts only, so the delete never reaches the relay.
pub(crate) const DELETE_MANY: &str = "DELETE FROM outbox WHERE id = ANY($1::uuid[])";

/// Write settings. The free functions [`write`] and [`write_all`] use the
/// defaults; build an `Outbox` to change them.
#[derive(Debug, Clone, Copy)]
pub struct Outbox {
    max_payload_bytes: usize,
    pub(crate) keep_rows: bool,
    pub(crate) message_prefix: &'static str,
}

impl Default for Outbox {
    fn default() -> Self {
        Self {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            keep_rows: true,
            message_prefix: crate::message::DEFAULT_MESSAGE_PREFIX,
        }
    }
}

/// The columns of a batch, one array per column.
#[derive(Default)]
pub(crate) struct Columns {
    pub ids: Vec<Uuid>,
    pub aggregate_types: Vec<String>,
    pub aggregate_ids: Vec<String>,
    pub event_types: Vec<String>,
    pub payloads: Vec<String>,
    pub headers: Vec<String>,
    pub topics: Vec<Option<String>>,
    pub trace_contexts: Vec<Option<String>>,
}

impl Outbox {
    /// Default settings: payloads up to [`DEFAULT_MAX_PAYLOAD_BYTES`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Largest payload accepted, in bytes of JSON text. Keep it at or below the
    /// broker's `message.max.bytes`, or the relay will be refused by Kafka.
    pub fn max_payload_bytes(mut self, max: usize) -> Self {
        self.max_payload_bytes = max;
        self
    }

    /// Whether the rows stay in the table (the default). With `false`, each
    /// write also deletes its rows in the same transaction: the table stays
    /// empty and the event still reaches Kafka, because the relay reads the
    /// insert from the WAL, and no pruning is needed. What is given up:
    /// nothing is left in the table to backfill or republish (after a lost
    /// slot, or for a replay), so write this way only once the relay
    /// finished its first start (`backfill complete` in its log): an event
    /// committed before the slot's consistent point reaches Kafka only
    /// through the backfill, which reads the table.
    pub fn keep_rows(mut self, keep: bool) -> Self {
        self.keep_rows = keep;
        self
    }

    /// The prefix [`emit`](Self::emit) writes its messages with (default
    /// [`DEFAULT_MESSAGE_PREFIX`](crate::message::DEFAULT_MESSAGE_PREFIX));
    /// the relay's `--message-prefix` must be the same.
    pub fn message_prefix(mut self, prefix: &'static str) -> Result<Self> {
        if prefix.is_empty() {
            return Err(crate::Error::EmptyField {
                field: "message_prefix",
            });
        }
        if prefix.contains('\0') {
            return Err(crate::Error::NulCharacter {
                field: "message_prefix",
            });
        }
        self.message_prefix = prefix;
        Ok(self)
    }

    /// Checks every event of a batch before anything is sent to the database.
    pub(crate) fn check(&self, events: &[Event]) -> Result<()> {
        events
            .iter()
            .try_for_each(|e| e.check_size(self.max_payload_bytes))
    }

    pub(crate) fn columns(events: &[Event]) -> Columns {
        let mut c = Columns::default();
        for e in events {
            c.ids.push(e.id.as_uuid());
            c.aggregate_types.push(e.aggregate_type.clone());
            c.aggregate_ids.push(e.aggregate_id.clone());
            c.event_types.push(e.event_type.clone());
            c.payloads.push(e.payload.clone());
            c.headers.push(e.headers_json());
            c.topics.push(e.topic.clone());
            c.trace_contexts.push(e.trace_context.clone());
        }
        c
    }

    /// Inserts one event in the caller's transaction and returns its id.
    pub async fn write(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &Event,
    ) -> Result<EventId> {
        self.check(std::slice::from_ref(event))?;
        sqlx::query(INSERT_ONE)
            .bind(event.id.as_uuid())
            .bind(&event.aggregate_type)
            .bind(&event.aggregate_id)
            .bind(&event.event_type)
            .bind(&event.payload)
            .bind(event.headers_json())
            .bind(&event.topic)
            .bind(&event.trace_context)
            .execute(&mut **tx)
            .await?;
        if !self.keep_rows {
            sqlx::query(DELETE_MANY)
                .bind([event.id.as_uuid()].as_slice())
                .execute(&mut **tx)
                .await?;
        }
        Ok(event.id)
    }

    /// Inserts many events in one round trip, in slice order, and returns their
    /// ids. Nothing is written if any event fails validation.
    pub async fn write_all(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: &[Event],
    ) -> Result<Vec<EventId>> {
        self.check(events)?;
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let c = Self::columns(events);
        sqlx::query(INSERT_MANY)
            .bind(&c.ids)
            .bind(&c.aggregate_types)
            .bind(&c.aggregate_ids)
            .bind(&c.event_types)
            .bind(&c.payloads)
            .bind(&c.headers)
            .bind(&c.topics)
            .bind(&c.trace_contexts)
            .execute(&mut **tx)
            .await?;
        if !self.keep_rows {
            sqlx::query(DELETE_MANY)
                .bind(&c.ids)
                .execute(&mut **tx)
                .await?;
        }
        Ok(events.iter().map(|e| e.id).collect())
    }
}

/// Inserts one event in the caller's transaction, with default settings.
pub async fn write(tx: &mut Transaction<'_, Postgres>, event: &Event) -> Result<EventId> {
    Outbox::default().write(tx, event).await
}

/// Inserts many events in one round trip, with default settings.
pub async fn write_all(
    tx: &mut Transaction<'_, Postgres>,
    events: &[Event],
) -> Result<Vec<EventId>> {
    Outbox::default().write_all(tx, events).await
}
