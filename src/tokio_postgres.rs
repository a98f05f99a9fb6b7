//! The write helpers for tokio-postgres transactions (feature `tokio-postgres`),
//! with the same checks and SQL as the sqlx ones.

use ::tokio_postgres::Transaction;

use crate::message::{Content, EMIT_MANY, EMIT_ONE};
use crate::write::{DELETE_MANY, INSERT_MANY, INSERT_ONE};
use crate::{Event, EventId, Outbox, Result};

impl Outbox {
    /// [`Outbox::write`] for a tokio-postgres transaction.
    pub async fn write_pg(&self, tx: &Transaction<'_>, event: &Event) -> Result<EventId> {
        self.check(std::slice::from_ref(event))?;
        tx.execute(
            INSERT_ONE,
            &[
                &event.id.as_uuid(),
                &event.aggregate_type,
                &event.aggregate_id,
                &event.event_type,
                &event.payload,
                &event.headers_json(),
                &event.topic,
                &event.trace_context,
            ],
        )
        .await?;
        if !self.keep_rows {
            tx.execute(DELETE_MANY, &[&vec![event.id.as_uuid()]])
                .await?;
        }
        Ok(event.id)
    }

    /// [`Outbox::write_all`] for a tokio-postgres transaction.
    pub async fn write_all_pg(
        &self,
        tx: &Transaction<'_>,
        events: &[Event],
    ) -> Result<Vec<EventId>> {
        self.check(events)?;
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let c = Self::columns(events);
        tx.execute(
            INSERT_MANY,
            &[
                &c.ids,
                &c.aggregate_types,
                &c.aggregate_ids,
                &c.event_types,
                &c.payloads,
                &c.headers,
                &c.topics,
                &c.trace_contexts,
            ],
        )
        .await?;
        if !self.keep_rows {
            tx.execute(DELETE_MANY, &[&c.ids]).await?;
        }
        Ok(events.iter().map(|e| e.id).collect())
    }
}

impl Outbox {
    /// [`Outbox::emit`] for a tokio-postgres transaction.
    pub async fn emit_pg(&self, tx: &Transaction<'_>, event: &Event) -> Result<EventId> {
        self.check(std::slice::from_ref(event))?;
        tx.execute(EMIT_ONE, &[&self.message_prefix, &Content::encode(event)])
            .await?;
        Ok(event.id)
    }

    /// [`Outbox::emit_all`] for a tokio-postgres transaction.
    pub async fn emit_all_pg(
        &self,
        tx: &Transaction<'_>,
        events: &[Event],
    ) -> Result<Vec<EventId>> {
        self.check(events)?;
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let contents: Vec<Vec<u8>> = events.iter().map(Content::encode).collect();
        tx.execute(EMIT_MANY, &[&self.message_prefix, &contents])
            .await?;
        Ok(events.iter().map(|e| e.id).collect())
    }
}

/// Emits one event as a logical decoding message in a tokio-postgres
/// transaction, with default settings (see [`crate::message`]).
pub async fn emit(tx: &Transaction<'_>, event: &Event) -> Result<EventId> {
    Outbox::default().emit_pg(tx, event).await
}

/// Emits many events as messages in one round trip in a tokio-postgres transaction.
pub async fn emit_all(tx: &Transaction<'_>, events: &[Event]) -> Result<Vec<EventId>> {
    Outbox::default().emit_all_pg(tx, events).await
}

/// Inserts one event in a tokio-postgres transaction, with default settings.
pub async fn write(tx: &Transaction<'_>, event: &Event) -> Result<EventId> {
    Outbox::default().write_pg(tx, event).await
}

/// Inserts many events in one round trip in a tokio-postgres transaction.
pub async fn write_all(tx: &Transaction<'_>, events: &[Event]) -> Result<Vec<EventId>> {
    Outbox::default().write_all_pg(tx, events).await
}
