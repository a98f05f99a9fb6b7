//! The outbox relay: reads outbox inserts from a PostgreSQL `pgoutput`
//! logical replication slot and publishes them to Kafka, confirming WAL
//! positions only after Kafka acknowledged everything before them.
//!
//! See docs/architecture.md for the path of an event and the confirmation rule.

#![warn(missing_docs)]

pub mod cli;
pub mod error;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod migrate;
pub mod pgoutput;
pub mod pipeline;
pub mod postgres;
pub mod prune;
pub mod replay;
pub mod status;
pub mod traces;
pub mod verify;

pub use error::{Error, Result};
pub use pipeline::{run, run_with_metrics};
