//! The relay itself, joining PostgreSQL to Kafka: the slot and its backfill,
//! the stream session, the progress ledger that decides what may be
//! confirmed, the mapping of a row or message to an event, and dead-letter
//! routing. `run` supervises sessions until stopped.

pub mod backfill;
pub mod bookkeeping;
pub mod config;
pub mod dead_letter;
pub mod debezium;
pub mod deliveries;
pub mod event;
pub mod lock;
pub mod message;
pub mod progress;
pub mod publish;
pub mod route;
pub mod run;
pub mod shutdown;
pub mod slot;
pub mod stream;
pub mod topic;

pub use run::{run, run_with_metrics};
