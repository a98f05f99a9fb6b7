//! The inbox: deduplication of delivered events on the consumer side. Inside
//! the transaction that applies an event's effects, [`Inbox::record`] inserts
//! `(consumer, event id)` with `ON CONFLICT DO NOTHING` and says whether the
//! event is new; the effects and the inbox row commit together or not at all.

use sqlx::{Postgres, Transaction};

use crate::{Error, EventId, Result};

const RECORD: &str = "INSERT INTO inbox (consumer, event_id) VALUES ($1, $2) ON CONFLICT (consumer, event_id) DO NOTHING";

/// One consumer's view of the inbox table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbox {
    consumer: String,
}

impl Inbox {
    /// The inbox of the consumer named `consumer` (for example the service
    /// name). Each name deduplicates independently, so two services that
    /// both handle an event each apply it once.
    pub fn new(consumer: impl Into<String>) -> Result<Self> {
        let consumer = consumer.into();
        if consumer.is_empty() {
            return Err(Error::EmptyField { field: "consumer" });
        }
        if consumer.contains('\0') {
            return Err(Error::NulCharacter { field: "consumer" });
        }
        Ok(Self { consumer })
    }

    /// The consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Records `event_id` in the caller's transaction. Returns `true` when the
    /// event is new (apply its effects in the same transaction), `false` when
    /// it was already recorded (skip it). If the transaction rolls back, the
    /// record goes with it and a redelivery is treated as new again.
    pub async fn record(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event_id: EventId,
    ) -> Result<bool> {
        let done = sqlx::query(RECORD)
            .bind(&self.consumer)
            .bind(event_id.as_uuid())
            .execute(&mut **tx)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// [`Inbox::record`] for a tokio-postgres transaction.
    #[cfg(feature = "tokio-postgres")]
    pub async fn record_pg(
        &self,
        tx: &::tokio_postgres::Transaction<'_>,
        event_id: EventId,
    ) -> Result<bool> {
        let n = tx
            .execute(RECORD, &[&self.consumer, &event_id.as_uuid()])
            .await?;
        Ok(n == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names_are_checked() {
        assert_eq!(Inbox::new("stock").unwrap().consumer(), "stock");
        assert!(matches!(
            Inbox::new(""),
            Err(Error::EmptyField { field: "consumer" })
        ));
        assert!(matches!(
            Inbox::new("a\0"),
            Err(Error::NulCharacter { field: "consumer" })
        ));
    }
}
