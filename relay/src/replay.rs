//! `outbox-relay replay`: republishes rows still in the outbox table, for
//! recovery after a lost slot or for consumers that need a re-read. Each
//! event goes out as the relay publishes it (same topic, key, value and
//! headers) plus an `outbox.replayed` header, in the table's insertion
//! order (`seq`); consumers' inboxes drop what they already applied. It
//! never touches the replication slot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::Header;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use tokio_util::sync::CancellationToken;

use crate::kafka::config::KafkaConfig;
use crate::kafka::producer::{self, ClientErrors, producer_config};
use crate::kafka::topics::Topics;
use crate::pipeline::event::Layout;
use crate::pipeline::topic::{AllowedTopics, TopicTemplate};
use crate::postgres::config::PgConfig;
use crate::postgres::connection::{Connection, Mode, quote_ident, quote_literal};
use crate::{Error, Result};

/// Rows read per query.
const BATCH: usize = 1000;

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    /// The database.
    pub pg: PgConfig,
    /// Schema of the outbox table.
    pub schema: String,
    /// Rows created at or after this time (PostgreSQL `timestamptz` text).
    pub since: String,
    /// Rows created before this time.
    pub until: Option<String>,
    /// Only this aggregate type.
    pub aggregate_type: Option<String>,
    /// Only these event ids.
    pub ids: Vec<String>,
    /// Kafka.
    pub kafka: KafkaConfig,
    /// Topic template, as the relay's.
    pub topic_template: TopicTemplate,
    /// Allowed topics, as the relay's.
    pub allowed_topics: AllowedTopics,
    /// Time allowed for Kafka to acknowledge everything at the end.
    pub timeout: Duration,
}

/// Counts delivery reports.
#[derive(Default)]
struct Reports {
    acknowledged: AtomicU64,
    /// The first refusal: event id, topic, error.
    failed: std::sync::Mutex<Option<(String, String, KafkaError)>>,
    errors: ClientErrors,
}

impl ClientContext for Reports {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.record(&error, reason);
    }
}

impl ProducerContext for Reports {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, _: usize) {
        match result {
            Ok(_) => {
                self.acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            Err((err, message)) => {
                use rdkafka::message::{Headers, Message};
                let id = message
                    .headers()
                    .and_then(|h| h.iter().find(|x| x.key == "id"))
                    .and_then(|x| x.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
                failed.get_or_insert_with(|| (id, message.topic().to_owned(), err.clone()));
            }
        }
    }
}

/// Republishes the selected rows; returns how many.
pub async fn run(cfg: &ReplayConfig, token: &CancellationToken) -> Result<u64> {
    let client = producer_config(&cfg.kafka, 10_000);
    let (producer, _reports) = producer::create(&client, Reports::default(), &cfg.kafka.options)?;
    producer::check_brokers(
        &producer,
        &producer.context().errors,
        &cfg.kafka.brokers,
        cfg.timeout,
    )
    .await?;
    let mut topics = Topics::new(&client, &cfg.kafka, cfg.timeout)?;
    let mut conn = Connection::connect(&cfg.pg, Mode::Sql).await?;
    conn.security().log();
    let table = format!("{}.outbox", quote_ident(&cfg.schema));
    let shown_table = format!("{}.outbox", cfg.schema);
    let replayed_at = conn
        .query("SELECT pg_catalog.now()::text AS now")
        .await?
        .first()
        .and_then(|r| r.get("now").map(str::to_owned))
        .unwrap_or_default();
    let mut filters = vec![format!(
        "created_at >= {}::timestamptz",
        quote_literal(&cfg.since)
    )];
    if let Some(until) = &cfg.until {
        filters.push(format!(
            "created_at < {}::timestamptz",
            quote_literal(until)
        ));
    }
    if let Some(t) = &cfg.aggregate_type {
        filters.push(format!("aggregate_type = {}", quote_literal(t)));
    }
    if !cfg.ids.is_empty() {
        let ids: Vec<String> = cfg.ids.iter().map(|i| quote_literal(i)).collect();
        filters.push(format!("id::text = ANY(ARRAY[{}])", ids.join(", ")));
    }
    let mut after_seq: i64 = -1;
    let mut sent = 0u64;
    loop {
        let rows = conn
            .query(&format!(
                "SELECT * FROM {table} WHERE {} AND seq > {after_seq} ORDER BY seq LIMIT {BATCH}",
                filters.join(" AND ")
            ))
            .await?;
        let Some(first) = rows.first() else { break };
        let columns = first.columns().to_vec();
        let layout = Layout::from_columns(&shown_table, &columns)?;
        for row in &rows {
            after_seq = row.get("seq").and_then(|s| s.parse().ok()).ok_or_else(|| {
                Error::Protocol(format!("a row of {shown_table} has no readable `seq`"))
            })?;
            let event = layout.event_from_row(row, &columns)?;
            let topic = match &event.topic {
                Some(t) => t.clone(),
                None => cfg
                    .topic_template
                    .render(&event.aggregate_type, &event.event_type),
            };
            outbox::topic::validate(&topic)
                .map_err(|why| Error::BadEvent {
                    event_id: event.id.clone(),
                    reason: format!("its topic `{topic}` is not a legal Kafka topic ({why})"),
                })
                .and_then(|()| {
                    cfg.allowed_topics
                        .check(&topic)
                        .map_err(|reason| Error::BadEvent {
                            event_id: event.id.clone(),
                            reason,
                        })
                })?;
            topics
                .ensure(&producer, &topic, &format!("event {}", event.id))
                .await?;
            let headers = event.kafka_headers(1).insert(Header {
                key: "outbox.replayed",
                value: Some(replayed_at.as_bytes()),
            });
            let record = BaseRecord::with_opaque_to(&topic, 0usize)
                .key(event.key())
                .payload(&event.payload[..])
                .headers(headers);
            producer::send(&producer, record, &event.id, token).await?;
            sent += 1;
        }
        refused(&producer)?;
    }
    conn.terminate().await;
    producer::flush(&producer, cfg.timeout).await?;
    refused(&producer)?;
    let acknowledged = producer.context().acknowledged.load(Ordering::Relaxed);
    if acknowledged != sent {
        return Err(Error::Kafka {
            context: format!(
                "kafka acknowledged {acknowledged} of the {sent} replayed events within {:?}; \
                 run the replay again (consumers drop duplicates)",
                cfg.timeout
            ),
            source: Box::new(KafkaError::Flush(
                rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
            )),
        });
    }
    tracing::info!(events = sent, replayed_at = %replayed_at, "replayed");
    Ok(sent)
}

/// The first record Kafka refused, as an error.
fn refused(producer: &rdkafka::producer::BaseProducer<Reports>) -> Result<()> {
    match producer
        .context()
        .failed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        Some((event_id, topic, source)) => Err(Error::Delivery {
            event_id,
            topic,
            source: Box::new(source),
        }),
        None => Ok(()),
    }
}
