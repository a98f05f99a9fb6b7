//! Integration tests: one binary against a real PostgreSQL (private cluster
//! per test) and a real Kafka-protocol broker (a Tansu process per test).

mod support;

mod bench;
mod compat;
mod consumer;
mod delivery;
mod edges;
mod failures;
mod faults;
mod kafka_security;
mod library;
mod operations;
mod reliability;
mod security;
mod tls;
mod traces;
