//! The outbox relay: reads outbox inserts from a PostgreSQL `pgoutput`
//! logical replication slot and publishes them to Kafka, confirming WAL
//! positions only after Kafka acknowledged everything before them.
//!
//! See docs/architecture.md for the path of an event and the confirmation rule.

pub mod backfill;
pub mod config;
pub mod connection;
pub mod decode;
pub mod delivery;
pub mod error;
pub mod lock;
pub mod lsn;
pub mod metrics;
pub mod migrate;
pub mod progress;
pub mod publish;
pub mod relay;
pub mod route;
pub mod row;
pub mod slot;
pub mod stream;
pub mod tls;

pub use error::{Error, Result};
pub use relay::{run, run_with_metrics};
