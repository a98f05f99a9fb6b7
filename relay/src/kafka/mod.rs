//! The Kafka client side: producer settings, the producer and the serving of
//! its delivery reports, and topic checks and creation. Knows nothing about
//! PostgreSQL or outboxes.

pub mod config;
pub mod producer;
pub mod reports;
pub mod topics;
