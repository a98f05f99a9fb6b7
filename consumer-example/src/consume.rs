//! The stock consumer: reads the kitchen's events from Kafka in a consumer
//! group and applies each one in a database transaction that also records it
//! in the inbox. A record's offset is stored for commit only after that
//! transaction committed, so a crash at any point means redelivery, and the
//! inbox turns redelivery into a no-op. Unusable records go to `dead_letter`.
//!
//! A failed attempt is classified in one place ([`classify`]): connection,
//! serialization and deadlock errors are retried; data errors (the record's
//! values overflow a column, break a constraint) park the record, since a
//! retry would fail the same way forever and wedge the partition; anything
//! else (a missing table, a permission) stops the consumer with the error,
//! its offset not stored, because it would fail every record alike.

use std::time::Duration;

use anyhow::Context;
use opentelemetry::KeyValue;
use outbox::{EventId, Inbox};
use rdkafka::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use sqlx::PgPool;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::projection::{self, KitchenEvent};

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Consumer group.
    pub group: String,
    /// Topics to subscribe to; an entry starting with `^` is a regex.
    pub topics: Vec<String>,
    /// Inbox consumer name.
    pub inbox: String,
    /// Extra librdkafka settings, applied after the defaults.
    pub options: Vec<(String, String)>,
    /// Fault injection for tests: abort the process right after this many
    /// database commits, before their offsets are stored.
    pub crash_after_commits: Option<u64>,
}

/// What happened to one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// New event: effects applied.
    Applied { stock: i32, low_stock: bool },
    /// Already applied before (a redelivery).
    Deduplicated,
    /// Unusable: parked in `dead_letter` with this reason.
    DeadLettered(String),
}

impl Outcome {
    /// A one-word name, for the processing span.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Applied { .. } => "applied",
            Outcome::Deduplicated => "deduplicated",
            Outcome::DeadLettered(_) => "dead-lettered",
        }
    }
}

/// One record and its outcome, for whoever watches (the demo prints them).
#[derive(Debug, Clone)]
pub struct Observed {
    /// The trace the processing span belongs to (the writer's, when the
    /// record carried a `traceparent`; a new one otherwise).
    pub trace_id: Option<String>,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub key: Option<String>,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub outcome: Outcome,
}

/// Consumes until `token` is cancelled, then commits the stored offsets.
pub async fn run(
    cfg: &ConsumerConfig,
    pool: &PgPool,
    token: &CancellationToken,
    observer: Option<UnboundedSender<Observed>>,
) -> anyhow::Result<()> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group)
        .set("auto.offset.reset", "earliest")
        // Offsets are committed in the background, but only those stored
        // explicitly, after the database transaction committed.
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false");
    for (k, v) in &cfg.options {
        client.set(k, v);
    }
    // librdkafka's message repeats the refused value, which may be a
    // secret: the relay's rule keeps every option value out of it.
    let consumer: StreamConsumer = client.create().map_err(|err| {
        anyhow::anyhow!(
            "creating the kafka consumer: {}",
            outbox_relay::kafka::config::describe_config_error(&err, &cfg.options)
        )
    })?;
    let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).context("subscribing")?;
    let inbox = Inbox::new(cfg.inbox.clone())?;
    let mut commits = 0u64;
    tracing::info!(group = %cfg.group, topics = ?cfg.topics, "consuming");

    loop {
        let msg = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            msg = consumer.recv() => msg,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(err) => {
                tracing::warn!(error = %err, "kafka consumer error");
                continue;
            }
        };
        // The processing span continues the writer's trace (its
        // `traceparent` header); it covers every attempt, until the
        // transaction that applied or parked the record committed.
        let span = processing_span(&msg);
        // A database outage is not the record's fault: retry the same record
        // until it goes through (or we are stopped), never skip it.
        let mut wait = Duration::from_millis(100);
        let mut refused: Option<String> = None;
        let outcome = loop {
            let attempt = match &refused {
                None => handle(pool, &inbox, &msg).await,
                Some(reason) => park(pool, &inbox, &msg, reason).await,
            };
            let err = match attempt {
                Ok(outcome) => break Some(outcome),
                Err(err) => err,
            };
            match classify(&err) {
                Failure::Retry => {
                    tracing::warn!(error = %err, retry_in = ?wait, "applying a record failed; retrying");
                    tokio::select! {
                        biased;
                        _ = token.cancelled() => break None,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Failure::Data(reason) if refused.is_none() => refused = Some(reason),
                // The dead_letter insert itself refused: not the record's
                // fault to fix by retrying.
                Failure::Data(_) | Failure::Stop => {
                    return Err(err.context(format!(
                        "applying the record at {}/{}/{} (its offset is not committed: \
                         it is read again at the next start)",
                        msg.topic(),
                        msg.partition(),
                        msg.offset()
                    )));
                }
            }
        };
        let Some(outcome) = outcome else { break };
        commits += 1;
        if cfg.crash_after_commits == Some(commits) {
            eprintln!(
                "fault injection: aborting after {commits} database commits, before storing the offset"
            );
            std::process::abort();
        }
        consumer
            .store_offset_from_message(&msg)
            .context("storing the offset")?;
        let trace_id = {
            use opentelemetry::trace::TraceContextExt;
            let span = span.span();
            span.set_attribute(KeyValue::new("outbox.outcome", outcome.name()));
            span.end();
            let sc = span.span_context();
            sc.is_valid().then(|| sc.trace_id().to_string())
        };
        let mut observed = observe(&msg, outcome);
        observed.trace_id = trace_id;
        if let Some(tx) = &observer {
            let _ = tx.send(observed);
        } else {
            print_line(&observed);
        }
    }
    // Stored offsets not yet auto-committed would otherwise be redelivered
    // (harmlessly, thanks to the inbox).
    if let Err(err) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::warn!(error = %err, "committing offsets at exit failed");
    }
    Ok(())
}

/// The name of the tracer the consumer's spans come from (through the
/// global tracer provider: spans are dropped unless one is installed).
pub const TRACER: &str = "outbox-consumer-example";

/// A consumer span for `msg`, a child of the writer's span when the record
/// carries a valid `traceparent` (see [`outbox::Envelope::otel_context`]).
fn processing_span(msg: &BorrowedMessage<'_>) -> opentelemetry::Context {
    use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer};
    let parent = msg
        .headers()
        .and_then(|h| {
            outbox::Envelope::from_headers(h.iter().map(|h| (h.key, h.value)))
                .ok()
                .map(|e| e.otel_context())
        })
        .unwrap_or_default();
    let tracer = opentelemetry::global::tracer(TRACER);
    let span = tracer
        .span_builder(format!("process {}", msg.topic()))
        .with_kind(SpanKind::Consumer)
        .with_attributes([
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", msg.topic().to_owned()),
            KeyValue::new(
                "messaging.destination.partition.id",
                msg.partition().to_string(),
            ),
            KeyValue::new("messaging.kafka.offset", msg.offset()),
            KeyValue::new(
                "messaging.message.id",
                header_text(msg, "id").unwrap_or_default(),
            ),
        ])
        .start_with_context(&tracer, &parent);
    parent.with_span(span)
}

fn header<'a>(msg: &'a BorrowedMessage<'_>, name: &str) -> Option<&'a [u8]> {
    msg.headers()?.iter().find(|h| h.key == name)?.value
}

fn header_text(msg: &BorrowedMessage<'_>, name: &str) -> Option<String> {
    header(msg, name).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// What a failed attempt at a record means.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// Passing: the connection, a serialization failure, a deadlock.
    Retry,
    /// The record's data cannot be applied, now or later: park it with
    /// this reason.
    Data(String),
    /// Neither: it would fail every record (a missing table, a permission,
    /// a bug). Stop and say so.
    Stop,
}

/// The one place that decides retry, dead-letter or stop.
fn classify(err: &anyhow::Error) -> Failure {
    match err.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(db)) => {
            classify_sqlstate(db.code().as_deref().unwrap_or(""), db.message())
        }
        Some(
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed,
        ) => Failure::Retry,
        _ => Failure::Stop,
    }
}

fn classify_sqlstate(code: &str, message: &str) -> Failure {
    match code {
        // serialization_failure, deadlock_detected, lock_not_available,
        // too_many_connections, admin/crash shutdown, cannot_connect_now,
        // and class 08 (connection exceptions).
        "40001" | "40P01" | "55P03" | "53300" | "57P01" | "57P02" | "57P03" => Failure::Retry,
        c if c.starts_with("08") => Failure::Retry,
        // Class 22 (data exception: numeric overflow, value too long, bad
        // encoding) and 23 (integrity constraint violation): the record's
        // values.
        c if c.starts_with("22") || c.starts_with("23") => Failure::Data(format!(
            "the database refused its values: {message} (SQLSTATE {code})"
        )),
        _ => Failure::Stop,
    }
}

/// Parks a record in `dead_letter` with `reason`, in a transaction of its own.
async fn park(
    pool: &PgPool,
    inbox: &Inbox,
    msg: &BorrowedMessage<'_>,
    reason: &str,
) -> anyhow::Result<Outcome> {
    let mut tx = pool.begin().await?;
    let outcome = dead_letter(&mut tx, inbox, msg, reason.to_owned()).await?;
    tx.commit().await?;
    Ok(outcome)
}

async fn dead_letter(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    inbox: &Inbox,
    msg: &BorrowedMessage<'_>,
    reason: String,
) -> anyhow::Result<Outcome> {
    sqlx::query(
        "INSERT INTO dead_letter (consumer, topic, partition, \"offset\", event_id, event_type, reason, payload) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
    )
    .bind(inbox.consumer())
    .bind(msg.topic())
    .bind(msg.partition())
    .bind(msg.offset())
    .bind(header_text(msg, "id").map(storable))
    .bind(header_text(msg, "event_type").map(storable))
    .bind(storable(reason.clone()))
    .bind(msg.payload().map(|p| storable(String::from_utf8_lossy(p).into_owned())))
    .execute(&mut **tx)
    .await?;
    tracing::warn!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), reason = %reason, "dead-lettered");
    Ok(Outcome::DeadLettered(reason))
}

/// PostgreSQL's `text` refuses NUL characters (SQLSTATE 22021): a record
/// carrying one would make its own dead letter fail and stop the consumer
/// at that offset for good. Written as `\0` instead.
fn storable(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\\0")
    } else {
        text
    }
}

/// Applies one record: checks it, records it in the inbox, applies it, all in
/// one transaction; or parks it in `dead_letter`.
async fn handle(
    pool: &PgPool,
    inbox: &Inbox,
    msg: &BorrowedMessage<'_>,
) -> anyhow::Result<Outcome> {
    let checked = check(msg);
    let mut tx = pool.begin().await?;
    let outcome = match checked {
        Err(reason) => dead_letter(&mut tx, inbox, msg, reason).await?,
        Ok((id, event)) => {
            if inbox.record(&mut tx, id).await? {
                let applied = projection::apply(&mut tx, &event, id.as_uuid()).await?;
                Outcome::Applied {
                    stock: applied.stock,
                    low_stock: applied.low_stock,
                }
            } else {
                Outcome::Deduplicated
            }
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

/// The record's id and event, or why it cannot be used.
fn check(msg: &BorrowedMessage<'_>) -> Result<(EventId, KitchenEvent), String> {
    let headers = msg.headers();
    let envelope = outbox::Envelope::from_headers(
        headers
            .iter()
            .flat_map(|h| h.iter())
            .map(|h| (h.key, h.value)),
    )
    .map_err(|e| e.to_string())?;
    let id = envelope.id;
    let event_type = envelope.event_type.ok_or("missing `event_type` header")?;
    let payload = msg.payload().ok_or("record has no value")?;
    let event = KitchenEvent::decode(event_type, payload)?;
    Ok((id, event))
}

fn observe(msg: &BorrowedMessage<'_>, outcome: Outcome) -> Observed {
    Observed {
        trace_id: None,
        event_id: header_text(msg, "id"),
        event_type: header_text(msg, "event_type"),
        key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        topic: msg.topic().to_owned(),
        partition: msg.partition(),
        offset: msg.offset(),
        outcome,
    }
}

/// One line per record, as the binary prints them.
pub fn print_line(o: &Observed) {
    let id = o.event_id.as_deref().unwrap_or("-");
    let kind = o.event_type.as_deref().unwrap_or("-");
    let at = format!(
        "{}/{}/{}{}",
        o.topic,
        o.partition,
        o.offset,
        o.trace_id
            .as_deref()
            .map(|t| format!(" trace={t}"))
            .unwrap_or_default()
    );
    match &o.outcome {
        Outcome::Applied { stock, low_stock } => println!(
            "applied      {id} {kind:<20} {:<13} stock={stock}{} at {at}",
            o.key.as_deref().unwrap_or("-"),
            if *low_stock { " LOW STOCK" } else { "" }
        ),
        Outcome::Deduplicated => println!("deduplicated {id} {kind:<20} at {at}"),
        Outcome::DeadLettered(reason) => println!("dead-letter  {id} {kind:<20} at {at}: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_only_what_passes_and_parks_only_data_errors() {
        for code in [
            "40001", "40P01", "55P03", "53300", "57P01", "08006", "08001",
        ] {
            assert_eq!(classify_sqlstate(code, "m"), Failure::Retry, "{code}");
        }
        for code in ["22003", "22001", "22P02", "23505", "23514", "23502"] {
            let Failure::Data(reason) = classify_sqlstate(code, "integer out of range") else {
                panic!("{code} is a data error");
            };
            assert!(reason.contains("integer out of range") && reason.contains(code));
        }
        for code in ["42P01", "42501", "53100", "XX000", ""] {
            assert_eq!(classify_sqlstate(code, "m"), Failure::Stop, "{code}");
        }
        let io = anyhow::Error::new(sqlx::Error::Io(std::io::Error::other("reset")));
        assert_eq!(classify(&io), Failure::Retry);
        assert_eq!(classify(&anyhow::anyhow!("a bug")), Failure::Stop);
    }
}
