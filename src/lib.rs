//! Transactional outbox for PostgreSQL: write events in the same transaction as
//! your business rows, and let `outbox-relay` publish them to Kafka.
//!
//! This crate is what services embed. It depends on sqlx (and, behind the
//! `tokio-postgres` feature, on tokio-postgres) and nothing else heavy: no Kafka
//! client and no replication code.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox::Event;
//!
//! let mut tx = pool.begin().await?;
//! sqlx::query("UPDATE orders SET state = 'placed' WHERE id = 42")
//!     .execute(&mut *tx)
//!     .await?;
//! let event = Event::new("order", "42", "OrderPlaced", &serde_json::json!({"total": 12.5}))?
//!     .with_header("tenant", "acme")?;
//! let id = outbox::write(&mut tx, &event).await?;
//! tx.commit().await?; // the order and the event commit together, or neither does
//! println!("wrote event {id}");
//! # Ok(()) }
//! ```
//!
//! On the consuming side, [`Inbox`] turns at-least-once delivery into
//! exactly-once effects: record the event id in the transaction that applies
//! the event, and skip the event when it was already recorded.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool, id_header: &str) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox::{EventId, Inbox};
//!
//! let inbox = Inbox::new("billing")?;
//! let event_id = EventId::parse(id_header)?; // the record's `id` header
//! let mut tx = pool.begin().await?;
//! if inbox.record(&mut tx, event_id).await? {
//!     sqlx::query("UPDATE accounts SET balance = balance - 10 WHERE id = 7")
//!         .execute(&mut *tx)
//!         .await?;
//! } // else: a redelivery, already applied
//! tx.commit().await?; // effect and inbox row together, or neither
//! // only now store the Kafka offset
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod envelope;
mod error;
mod event;
mod inbox;
pub mod message;
pub mod topic;
mod write;

#[cfg(feature = "tokio-postgres")]
pub mod tokio_postgres;

pub use envelope::{Envelope, EnvelopeError};
pub use error::{Error, Result};
#[cfg(feature = "opentelemetry")]
pub use event::remote_span_context;
pub use event::{
    Event, EventId, HeaderNameProblem, RESERVED_HEADER_PREFIX, RESERVED_HEADERS,
    header_name_problem, is_reserved_header, normalize_tracestate, traceparent_problem,
};
pub use inbox::Inbox;
pub use message::{emit, emit_all};
pub use write::{DEFAULT_MAX_PAYLOAD_BYTES, Outbox, write, write_all};

/// The README's code examples, compiled as doc tests so they stay true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The SQL migrations that create the outbox table, its publication, the
/// relay's bookkeeping table and the consumers' inbox table, embedded so `MIGRATOR.run(&pool)` applies them.
/// The same files work with `sqlx migrate run --source migrations`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
