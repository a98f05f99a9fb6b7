//! `outbox-relay verify`: proof of delivery. Compares the rows still in the
//! outbox table for a time window with the Kafka topics they map to and
//! reports every event missing in Kafka (by id), every event Kafka holds
//! more than once, and every per-aggregate order inversion (an event whose
//! first copy sits after a later-written event of the same aggregate).
//!
//! Memory stays bounded on any window: the Kafka side is streamed, record
//! by record, into a temporary table (batches of [`BATCH`] rows), and the
//! comparison runs in PostgreSQL as three queries (which spill to disk
//! under `work_mem` like any other); only counts and the first
//! [`SHOWN`] findings of each kind come back.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};

use crate::kafka::config::KafkaConfig;
use crate::pipeline::topic::TopicTemplate;
use crate::postgres::config::PgConfig;
use crate::postgres::connection::{Connection, Mode, quote_ident, quote_literal};
use crate::{Error, Result};

/// Kafka records inserted per statement.
const BATCH: usize = 1000;
/// Findings of each kind printed in full.
pub const SHOWN: usize = 20;
/// Kafka is read from this long before `--since` (record timestamps are
/// the relay's send time, which follows the commit, but the two clocks
/// are different machines').
const CLOCK_SLACK_MS: i64 = 5 * 60 * 1000;
/// Once every partition reached its high watermark, reading stops after
/// this long without a record.
const SETTLE: Duration = Duration::from_secs(2);

/// What to verify.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// The database.
    pub pg: PgConfig,
    /// Schema of the outbox table.
    pub schema: String,
    /// Rows created at or after this time (PostgreSQL `timestamptz` text).
    pub since: String,
    /// Rows created before this time; `None`: one minute before now, so
    /// rows the relay is still sending are not counted missing.
    pub until: Option<String>,
    /// Kafka (the consumer gets the same security settings).
    pub kafka: KafkaConfig,
    /// Topic template, as the relay's.
    pub topic_template: TopicTemplate,
    /// Time allowed for each Kafka request.
    pub timeout: Duration,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The event id.
    pub id: String,
    /// What to say about it.
    pub detail: String,
}

/// What verify found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Rows in the window.
    pub events: u64,
    /// Kafka records read.
    pub records: u64,
    /// Records without a readable `id` header.
    pub without_id: u64,
    /// How many events are missing in Kafka, and the first of them.
    pub missing: (u64, Vec<Finding>),
    /// How many events Kafka holds more than once.
    pub duplicated: (u64, Vec<Finding>),
    /// How many events come after a later-written one of their aggregate.
    pub inversions: (u64, Vec<Finding>),
}

impl Report {
    /// Whether delivery is proven: nothing missing, nothing out of order.
    /// Duplicates are allowed (delivery is at least once; inboxes drop them).
    pub fn ok(&self) -> bool {
        self.missing.0 == 0 && self.inversions.0 == 0
    }

    /// The report as text.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "events in the outbox window: {}\nkafka records read: {} ({} without an event id)\n",
            self.events, self.records, self.without_id
        );
        for (title, (count, shown)) in [
            ("missing in kafka", &self.missing),
            (
                "duplicated in kafka (allowed: at-least-once)",
                &self.duplicated,
            ),
            ("out of order within their aggregate", &self.inversions),
        ] {
            out.push_str(&format!("{title}: {count}\n"));
            for f in shown {
                out.push_str(&format!("  {} {}\n", f.id, f.detail));
            }
            if *count > shown.len() as u64 {
                out.push_str(&format!("  ... and {} more\n", *count - shown.len() as u64));
            }
        }
        out.push_str(if self.ok() {
            "result: every event is in kafka, in order\n"
        } else {
            "result: FAILED\n"
        });
        out
    }
}

/// Runs the comparison.
pub async fn run(cfg: &VerifyConfig) -> Result<Report> {
    let mut conn = Connection::connect(&cfg.pg, Mode::Sql).await?;
    let table = format!("{}.outbox", quote_ident(&cfg.schema));
    let until = match &cfg.until {
        Some(u) => format!("{}::timestamptz", quote_literal(u)),
        None => "(pg_catalog.now() - interval '1 minute')".to_owned(),
    };
    // Fixed once, so every query sees the same window.
    let rows = conn
        .query(&format!(
            "SELECT (extract(epoch FROM {since}::timestamptz) * 1000)::bigint::text AS since_ms, \
             {until}::text AS until",
            since = quote_literal(&cfg.since),
        ))
        .await?;
    let since_ms: i64 = rows
        .first()
        .and_then(|r| r.get("since_ms"))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Config(format!("--since `{}` is not a time", cfg.since)))?;
    let until = rows
        .first()
        .and_then(|r| r.get("until"))
        .map(|u| format!("{}::timestamptz", quote_literal(u)))
        .ok_or_else(|| Error::Protocol("the window's end did not come back".into()))?;
    let window = format!(
        "o.created_at >= {}::timestamptz AND o.created_at < {until}",
        quote_literal(&cfg.since)
    );

    let mut report = Report {
        events: count(
            &mut conn,
            &format!("SELECT count(*)::text AS n FROM {table} o WHERE {window}"),
        )
        .await?,
        ..Report::default()
    };
    let mut topics = BTreeSet::new();
    for row in conn
        .query(&format!(
            "SELECT DISTINCT aggregate_type, event_type, topic FROM {table} o WHERE {window}"
        ))
        .await?
    {
        topics.insert(match row.get("topic") {
            Some(t) => t.to_owned(),
            None => cfg.topic_template.render(
                row.get("aggregate_type").unwrap_or_default(),
                row.get("event_type").unwrap_or_default(),
            ),
        });
    }
    tracing::info!(events = report.events, topics = ?topics, "outbox window read");

    conn.query(
        "CREATE TEMPORARY TABLE outbox_verify_seen \
         (id uuid NOT NULL, topic text NOT NULL, part int NOT NULL, off bigint NOT NULL)",
    )
    .await?;
    read_kafka(cfg, &topics, since_ms, &mut conn, &mut report).await?;
    conn.query("CREATE INDEX ON outbox_verify_seen (id); ANALYZE outbox_verify_seen")
        .await?;

    let missing_from = format!(
        "FROM {table} o WHERE {window} AND NOT EXISTS \
         (SELECT 1 FROM outbox_verify_seen s WHERE s.id = o.id)"
    );
    report.missing.0 = count(
        &mut conn,
        &format!("SELECT count(*)::text AS n {missing_from}"),
    )
    .await?;
    report.missing.1 = findings(
        &mut conn,
        &format!(
            "SELECT o.id::text AS id, 'aggregate ' || o.aggregate_type || '/' || o.aggregate_id || \
             ', created ' || o.created_at::text AS detail {missing_from} ORDER BY o.seq LIMIT {SHOWN}"
        ),
    )
    .await?;

    let duplicated = format!(
        "FROM outbox_verify_seen s JOIN {table} o ON o.id = s.id WHERE {window} \
         GROUP BY s.id HAVING count(*) > 1"
    );
    report.duplicated.0 = count(
        &mut conn,
        &format!("SELECT count(*)::text AS n FROM (SELECT 1 {duplicated}) d"),
    )
    .await?;
    report.duplicated.1 = findings(
        &mut conn,
        &format!(
            "SELECT s.id::text AS id, count(*) || ' copies' AS detail {duplicated} \
             ORDER BY s.id LIMIT {SHOWN}"
        ),
    )
    .await?;

    // First copies only (a redelivered copy after later events is the
    // at-least-once replay, not a reordering); per aggregate (topic and
    // key, through the row), in partition and offset order, each must
    // have been written after every one before it.
    let inversions = format!(
        "WITH firsts AS (SELECT DISTINCT ON (s.id) s.id, s.topic, s.part, s.off \
           FROM outbox_verify_seen s ORDER BY s.id, s.part, s.off), \
         joined AS (SELECT f.*, o.seq, o.aggregate_id FROM firsts f JOIN {table} o ON o.id = f.id \
           WHERE {window}), \
         ordered AS (SELECT j.*, max(j.seq) OVER (PARTITION BY j.topic, j.aggregate_id ORDER BY j.part, j.off \
           ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before FROM joined j) \
         SELECT id::text AS id, topic, part, off, seq, before, aggregate_id FROM ordered WHERE seq < before"
    );
    report.inversions.0 = count(
        &mut conn,
        &format!("SELECT count(*)::text AS n FROM ({inversions}) i"),
    )
    .await?;
    report.inversions.1 = findings(
        &mut conn,
        &format!(
            "SELECT id, 'aggregate ' || aggregate_id || ': written as seq ' || seq || ' but at ' || topic || \
             '/' || part || '@' || off || ', after seq ' || before AS detail FROM ({inversions}) i \
             ORDER BY topic, part, off LIMIT {SHOWN}"
        ),
    )
    .await?;
    conn.terminate().await;
    Ok(report)
}

async fn count(conn: &mut Connection, sql: &str) -> Result<u64> {
    let rows = conn.query(sql).await?;
    rows.first()
        .and_then(|r| r.get("n"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::Protocol(format!("no count from `{sql}`")))
}

async fn findings(conn: &mut Connection, sql: &str) -> Result<Vec<Finding>> {
    Ok(conn
        .query(sql)
        .await?
        .iter()
        .map(|r| Finding {
            id: r.get("id").unwrap_or_default().to_owned(),
            detail: r.get("detail").unwrap_or_default().to_owned(),
        })
        .collect())
}

/// Streams every record of `topics` from `since_ms` (less the clock slack)
/// up to each partition's end as it was when reading started, into the
/// temporary table.
async fn read_kafka(
    cfg: &VerifyConfig,
    topics: &BTreeSet<String>,
    since_ms: i64,
    conn: &mut Connection,
    report: &mut Report,
) -> Result<()> {
    if topics.is_empty() {
        return Ok(());
    }
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", "outbox-relay-verify")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("log_level", "3");
    // The user's settings (security.protocol, sasl.*, ssl.*); producer-only
    // keys are ignored by librdkafka with a log line.
    for (k, v) in &cfg.kafka.options {
        client.set(k, v);
    }
    let consumer: BaseConsumer = client.create().map_err(|e| {
        Error::Config(format!(
            "the kafka consumer settings are refused: {}",
            crate::kafka::config::describe_config_error(&e, &cfg.kafka.options)
        ))
    })?;
    let timeout = cfg.timeout;
    let unreachable = |e: rdkafka::error::KafkaError| {
        Error::Config(format!(
            "cannot read kafka metadata from {} ({e}); check --kafka-brokers and the security settings",
            cfg.kafka.brokers
        ))
    };
    let mut assignment = TopicPartitionList::new();
    let mut ends = Vec::new();
    let mut at_since = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(unreachable)?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            tracing::warn!(topic = %topic, "the topic does not exist: every event of it counts as missing");
        }
        for p in partitions {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, timeout)
                .map_err(unreachable)?;
            ends.push((topic.clone(), p, high, low));
            at_since
                .add_partition_offset(topic, p, Offset::Offset(since_ms - CLOCK_SLACK_MS))
                .map_err(unreachable)?;
        }
    }
    // Start at the first record written at or after the window (less the
    // slack); a broker without a time index answers with an error or the
    // end, and then the partition is read from its start.
    let starts = consumer.offsets_for_times(at_since, timeout).ok();
    tracing::debug!(starts = ?starts, "offsets for the window's start");
    let mut total = 0i64;
    // Brokers differ on whether the high watermark is the next offset or
    // the last one (and a relay may still be writing), so a partition
    // counts as read once it is within one record of its mark; reading
    // then goes on until no record came for SETTLE.
    let mut unread = std::collections::HashMap::new();
    for (topic, p, high, low) in &ends {
        let start = starts
            .as_ref()
            .and_then(|l| l.find_partition(topic, *p))
            .and_then(|e| match e.offset() {
                Offset::Offset(o) if o >= *low && o <= *high => Some(o),
                _ => None,
            })
            .unwrap_or(*low);
        assignment
            .add_partition_offset(topic, *p, Offset::Offset(start))
            .map_err(unreachable)?;
        tracing::debug!(topic = %topic, partition = p, start, low, high, "reading");
        if high - start > 1 {
            unread.insert((topic.clone(), *p), *high);
        }
        total += high - start;
    }
    if ends.is_empty() {
        return Ok(());
    }
    consumer.assign(&assignment).map_err(unreachable)?;
    let progress = std::io::stderr().is_terminal();
    let mut batch: Vec<String> = Vec::with_capacity(BATCH);
    let mut last_news = Instant::now();
    loop {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            if unread.is_empty() && last_news.elapsed() >= SETTLE {
                break;
            }
            if last_news.elapsed() > timeout {
                return Err(Error::Io {
                    context: "reading kafka for verify".into(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "no record for {timeout:?} with {} partitions not read to their end",
                            unread.len()
                        ),
                    ),
                });
            }
            continue;
        };
        last_news = Instant::now();
        let message = message.map_err(|e| Error::Io {
            context: "reading kafka for verify".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let key = (message.topic().to_owned(), message.partition());
        if unread
            .get(&key)
            .is_some_and(|end| message.offset() + 2 >= *end)
        {
            unread.remove(&key);
        }
        report.records += 1;
        let id = message
            .headers()
            .and_then(|h| h.iter().find(|x| x.key == "id"))
            .and_then(|x| x.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| uuid::Uuid::parse_str(v).ok());
        match id {
            Some(id) => batch.push(format!(
                "('{id}', {}, {}, {})",
                quote_literal(message.topic()),
                message.partition(),
                message.offset()
            )),
            None => report.without_id += 1,
        }
        if batch.len() >= BATCH {
            flush(conn, &mut batch).await?;
            if progress {
                eprint!("\rkafka: {} of about {total} records read", report.records);
                let _ = std::io::stderr().flush();
            }
        }
    }
    flush(conn, &mut batch).await?;
    if progress {
        eprintln!("\rkafka: {} records read", report.records);
    }
    Ok(())
}

async fn flush(conn: &mut Connection, batch: &mut Vec<String>) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    conn.query(&format!(
        "INSERT INTO outbox_verify_seen (id, topic, part, off) VALUES {}",
        batch.join(", ")
    ))
    .await?;
    batch.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_missing_or_reordered_events_fail() {
        let mut r = Report {
            events: 3,
            records: 4,
            duplicated: (
                1,
                vec![Finding {
                    id: "a".into(),
                    detail: "2 copies".into(),
                }],
            ),
            ..Report::default()
        };
        assert!(r.ok(), "duplicates are at-least-once");
        assert!(r.to_text().contains("result: every event is in kafka"));
        r.missing = (
            25,
            vec![
                Finding {
                    id: "b".into(),
                    detail: "x".into()
                };
                SHOWN
            ],
        );
        assert!(!r.ok());
        let text = r.to_text();
        assert!(text.contains("missing in kafka: 25"), "{text}");
        assert!(text.contains("... and 5 more"), "{text}");
        assert!(text.contains("result: FAILED"), "{text}");
        r.missing = (0, vec![]);
        r.inversions = (1, vec![]);
        assert!(!r.ok());
    }
}
