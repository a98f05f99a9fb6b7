//! The settings the pipeline runs with, validated by the command line layer
//! before any connection is made.

use std::time::Duration;

use crate::kafka::config::KafkaConfig;
use crate::pipeline::topic::{AllowedTopics, TopicTemplate};
use crate::postgres::config::PgConfig;
use crate::postgres::connection::quote_ident;
use crate::{Error, Result};

/// Everything `outbox-relay run` needs, validated.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// PostgreSQL connection.
    pub pg: PgConfig,
    /// Replication slot.
    pub slot: String,
    /// Whether the slot is synchronized to standbys (PostgreSQL 17+).
    pub slot_failover: bool,
    /// Publication.
    pub publication: String,
    /// The schema holding the relay's bookkeeping table `outbox_relay_slot`
    /// (where the migrations created it).
    pub schema: String,
    /// Topic template.
    pub topic_template: TopicTemplate,
    /// The topics events may go to (checked before publishing or creating).
    pub allowed_topics: AllowedTopics,
    /// Kafka.
    pub kafka: KafkaConfig,
    /// In-flight window.
    pub max_in_flight: usize,
    /// In-flight window in bytes (keys, values and headers).
    pub max_in_flight_bytes: u64,
    /// Status update interval.
    pub status_interval: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Reconnect backoff ceiling.
    pub max_backoff: Duration,
    /// Shutdown grace.
    pub shutdown_timeout: Duration,
    /// When to report a stalled delivery.
    pub stall_warning: Duration,
    /// How long PostgreSQL keeps this instance's sessions (the walsender,
    /// the slot lock) once the instance stops answering; `None` leaves the
    /// server's `wal_sender_timeout` and `idle_session_timeout` alone.
    pub session_timeout: Option<Duration>,
    /// The dead-letter topic, when undeliverable events are parked rather than fatal.
    pub dead_letter_topic: Option<String>,
    /// The layout of the published outbox tables.
    pub table_layout: crate::pipeline::event::TableLayout,
    /// The prefix of logical decoding messages that are outbox events;
    /// `None`: messages are not asked for.
    pub message_prefix: Option<String>,
    /// The relay's tracer: a span per transaction with trace context
    /// (disabled unless an exporter was started).
    pub traces: crate::traces::Traces,
    /// Where to serve metrics.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl RelayConfig {
    /// The bookkeeping table, schema-qualified and quoted: the relay's
    /// sessions search only `pg_catalog` (see `postgres::connection`).
    pub fn slot_table(&self) -> String {
        format!("{}.outbox_relay_slot", quote_ident(&self.schema))
    }
}

/// Postgres slot names: 1 to 63 of lowercase letters, digits and underscores.
pub fn validate_slot_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(Error::Config(format!(
            "slot name `{name}` is not valid; PostgreSQL allows 1 to 63 lowercase letters, digits and `_`"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names() {
        assert!(validate_slot_name("outbox_relay_1").is_ok());
        for bad in ["", "Outbox", "a-b", "a b", &"x".repeat(64)] {
            let err = validate_slot_name(bad).unwrap_err().to_string();
            assert!(err.contains("lowercase letters"), "{err}");
        }
    }
}
