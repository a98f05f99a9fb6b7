//! Faults and bad input: every case ends in delivery or in a clear error,
//! never a panic, a silent skip, or a confirmed position past an undelivered
//! event. docs/reliability.md lists these cases and what the user sees.

use std::time::Duration;

use sqlx::PgPool;

use crate::support::fixture::{Fixture, assert_exactly_once};
use crate::support::kafka::consume_settle;
use crate::support::postgres::{PASSWORD, confirmed_flush, lsn_after};
use crate::support::{consume, unique};

async fn raw_insert(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    payload: &str,
    topic: Option<&str>,
) -> String {
    sqlx::query_scalar::<_, uuid::Uuid>(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, topic) \
         VALUES ($1, $2, 'Happened', $3::jsonb, $4) RETURNING id",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(payload)
    .bind(topic)
    .fetch_one(pool)
    .await
    .unwrap()
    .to_string()
}

#[tokio::test]
async fn refused_events_go_to_the_dead_letter_topic_when_asked() {
    let f = Fixture::new().await;
    let dlt = unique("dlt").replace('_', "-");
    let relay = f
        .relay()
        .arg("--kafka-option")
        .arg("message.max.bytes=2000")
        .arg("--on-undeliverable")
        .arg("dead-letter")
        .arg("--dead-letter-topic")
        .arg(&dlt)
        .start()
        .await;
    // The table refuses an illegal topic override at INSERT; rows from
    // before that constraint reach the relay, which refuses them itself.
    f.drop_row_checks().await;
    let before = f.write_tx(&[("a1".into(), 1)]).await;
    let big = raw_insert(
        &f.pool,
        &f.aggregate_type,
        "big",
        &format!("\"{}\"", "x".repeat(5000)),
        None,
    )
    .await;
    let bad_topic = raw_insert(
        &f.pool,
        &f.aggregate_type,
        "bt",
        "{\"n\": 1}",
        Some("no spaces allowed"),
    )
    .await;
    let after = f.write_tx(&[("a1".into(), 2)]).await;

    // The good events around them arrive, in order.
    let records = f.read(2).await;
    let mut expected = before.clone();
    expected.extend(after.clone());
    assert_exactly_once(&expected, &records);

    let dead = consume(&f.tansu.brokers(), &[&dlt], 2, Duration::from_secs(60)).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    let by_id = |id: &str| {
        dead.iter()
            .find(|r| r.id() == id)
            .unwrap_or_else(|| panic!("{id} not dead-lettered"))
    };
    let r = by_id(&big);
    assert!(
        r.header("outbox.error").unwrap().contains("too large"),
        "{:?}",
        r.headers
    );
    assert_eq!(r.header("outbox.original_topic"), Some(f.topic().as_str()));
    assert_eq!(
        r.value, None,
        "an oversized value is not repeated in the dead letter"
    );
    assert_eq!(r.key.as_deref(), Some("big"));
    let r = by_id(&bad_topic);
    assert!(
        r.header("outbox.error")
            .unwrap()
            .contains("not a legal Kafka topic"),
        "{:?}",
        r.headers
    );
    assert_eq!(r.header("outbox.original_topic"), Some("no spaces allowed"));
    assert_eq!(r.value_json(), serde_json::json!({"n": 1}));
    assert!(relay.logs().contains("sending it to the dead-letter topic"));
    let mut relay = relay;
    assert!(relay.stop().await.success(), "{}", relay.logs());
}

#[tokio::test]
async fn an_illegal_topic_override_stops_the_relay_by_default() {
    let f = Fixture::new().await;
    f.drop_row_checks().await; // as for rows from before the constraint
    let relay = f.relay().start().await;
    f.write_tx(&[("a".into(), 1)]).await;
    f.read(1).await;
    crate::support::postgres::wait_recorded(&f.pool, &f.slot).await;
    let mark: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    let bad = raw_insert(&f.pool, &f.aggregate_type, "x", "{}", Some("bad/topic")).await;
    let mut relay = relay;
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert_eq!(status.code(), Some(1));
    assert!(
        logs.contains(&format!("outbox event {bad} cannot be published")),
        "{logs}"
    );
    assert!(
        logs.contains("`bad/topic` is not a legal Kafka topic"),
        "{logs}"
    );
    let confirmed = confirmed_flush(&f.url, &f.slot).await.unwrap();
    assert!(
        !lsn_after(&f.url, &confirmed, &mark).await,
        "confirmed {confirmed} past the bad event (written after {mark})"
    );
}

#[tokio::test]
async fn truncate_and_added_columns_do_not_disturb_the_stream() {
    let f = Fixture::new().await;
    let mut relay = f.relay().start().await;
    let mut written = f.write_tx(&[("a".into(), 1), ("b".into(), 2)]).await;
    // The publication publishes inserts only: a TRUNCATE is not an event.
    sqlx::query("TRUNCATE outbox")
        .execute(&f.pool)
        .await
        .unwrap();
    written.extend(f.write_tx(&[("a".into(), 3)]).await);
    // A new column: the next Relation message carries it and mapping by name goes on.
    sqlx::query("ALTER TABLE outbox ADD COLUMN tenant text DEFAULT 'acme'")
        .execute(&f.pool)
        .await
        .unwrap();
    written.extend(f.write_tx(&[("a".into(), 4), ("c".into(), 5)]).await);
    let records = f.read(5).await;
    assert_exactly_once(&written, &records);
    assert!(relay.stop().await.success(), "{}", relay.logs());
}

#[tokio::test]
async fn dropping_a_required_column_stops_the_relay_clearly() {
    let f = Fixture::new().await;
    let mut relay = f.relay().start().await;
    f.write_tx(&[("a".into(), 1)]).await;
    f.read(1).await;
    sqlx::query("ALTER TABLE outbox DROP COLUMN event_type")
        .execute(&f.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, payload) VALUES ('x', '1', '{}')",
    )
    .execute(&f.pool)
    .await
    .unwrap();
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert_eq!(status.code(), Some(1));
    assert!(
        logs.contains("table public.outbox is in the publication but is not an outbox table"),
        "{logs}"
    );
    assert!(logs.contains("no `event_type` column"), "{logs}");
}

#[tokio::test]
async fn an_immediate_postgres_restart_loses_nothing() {
    crate::delivery::survive_restart("immediate").await;
}

#[tokio::test]
async fn secrets_never_reach_the_output_even_at_trace_level() {
    let f = Fixture::new().await;
    let sasl_secret = "kafka-SASL-s3cret-value";
    let mut relay = f
        .relay()
        .env("OUTBOX_LOG", "trace")
        .arg("--kafka-option")
        .arg(format!("sasl.password={sasl_secret}"))
        // librdkafka's own debug output, its configuration dump included.
        .arg("--kafka-option")
        .arg("debug=all")
        .spawn();
    relay.wait_streaming().await;
    let written = f.write_tx(&[("s".into(), 1)]).await;
    assert_exactly_once(&written, &f.read(1).await);
    let status = relay.stop().await;
    let logs = relay.logs();
    assert!(
        status.success(),
        "{}",
        logs.lines()
            .filter(|l| !l.contains("DEBUG") && !l.contains("TRACE"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(logs.len() > 1000, "trace output expected");
    assert!(!logs.contains(PASSWORD), "the database password leaked");
    assert!(!logs.contains(sasl_secret), "the SASL password leaked");

    // A failing start at trace level, with a wrong password, leaks nothing either.
    let mut bad = f.relay().env("OUTBOX_LOG", "trace");
    bad.database_url = f.url.replace(PASSWORD, "Wr0ng-but-secret");
    let mut relay = bad.spawn();
    relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert!(logs.contains("password authentication failed"), "{logs}");
    assert!(
        !logs.contains("Wr0ng-but-secret") && !logs.contains(PASSWORD),
        "{logs}"
    );

    // A failing SASL login (the broker does not speak SASL here), with
    // librdkafka's debug output on, leaks nothing either.
    let mut relay = f
        .relay()
        .env("OUTBOX_LOG", "trace")
        .arg("--kafka-option=security.protocol=SASL_PLAINTEXT")
        .arg("--kafka-option=sasl.mechanism=PLAIN")
        .arg("--kafka-option=sasl.username=relay")
        .arg(format!("--kafka-option=sasl.password={sasl_secret}"))
        .arg("--kafka-option=debug=all")
        .spawn();
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(logs.contains("cannot reach the kafka brokers"), "{logs}");
    assert!(logs.contains("sasl"), "librdkafka's debug output expected");
    assert!(!logs.contains(sasl_secret), "the SASL password leaked");
}

#[tokio::test]
async fn a_least_privilege_role_is_enough() {
    let f = Fixture::new().await;
    // What docs/operations.md asks for: REPLICATION and LOGIN, SELECT on the
    // outbox, and read/write on the relay's bookkeeping table. No superuser.
    let relay_url = f.create_relay_role().await;
    let mut seq = 0;
    let mut written = f.write_many(20, 5, 3, &mut seq).await;
    let mut builder = f.relay();
    builder.database_url = relay_url;
    let mut relay = builder.spawn();
    relay
        .wait_log("backfill complete", Duration::from_secs(60))
        .await;
    written.extend(f.write_many(20, 5, 3, &mut seq).await);
    assert_exactly_once(&written, &f.read(40).await);
    assert!(relay.stop().await.success(), "{}", relay.logs());
    assert!(
        relay.logs().contains("postgres://relay@"),
        "runs as the relay role"
    );
}

#[tokio::test]
async fn a_huge_transaction_is_streamed_with_bounded_memory() {
    let f = Fixture::new().await;
    let rows = 200_000;
    let mut relay = f.relay().arg("--max-in-flight").arg("5000").start().await;
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT $1, 'agg-' || (g % 50), 'Happened', jsonb_build_object('seq', g, 'pad', repeat('p', 200)) \
         FROM generate_series(1, $2) g",
    )
    .bind(&f.aggregate_type)
    .bind(rows)
    .execute(&f.pool)
    .await
    .unwrap();
    let records = consume_settle(
        &f.tansu.brokers(),
        &[&f.topic()],
        rows as usize,
        Duration::from_secs(600),
        Duration::from_secs(2),
    )
    .await;
    let peak_kib = peak_rss_kib(relay.pid());
    assert!(relay.stop().await.success(), "{}", relay.logs());
    // Bounded by the window, not the transaction: at most 5,000 events in
    // flight (about 1.2 MiB of payload) under librdkafka's 32 MiB queue cap,
    // against 46 MiB of payload in the transaction. Measured: 26 MiB.
    assert!(peak_kib > 0, "could not read the relay's peak RSS");
    assert!(
        peak_kib < 64 * 1024,
        "peak RSS {} MiB through a 200,000-row transaction",
        peak_kib / 1024
    );
    let ids: std::collections::HashSet<&str> = records.iter().map(|r| r.id()).collect();
    assert_eq!(
        ids.len(),
        rows as usize,
        "every row of the transaction arrived"
    );
    // Per aggregate, seq increases along the partition.
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    let mut sorted: Vec<_> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    for r in sorted {
        let seq = r.value_json()["seq"].as_i64().unwrap();
        let prev = last.insert(r.key.clone().unwrap(), seq).unwrap_or(0);
        assert!(seq > prev, "out of order within aggregate {:?}", r.key);
    }
    eprintln!(
        "200,000-row transaction: relay peak RSS {} MiB (max-in-flight 5000)",
        peak_kib / 1024
    );
}

/// The process's peak resident set size (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
