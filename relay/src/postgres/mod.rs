//! The PostgreSQL client: connection settings, the wire connection (startup,
//! authentication, TLS, simple queries and the replication stream), and the
//! types PostgreSQL gives meaning to (WAL positions). Knows nothing about
//! outboxes or Kafka.

pub mod config;
pub mod connection;
pub mod lsn;
pub mod time;
pub mod tls;
