//! Wrong setups and refused events: each ends in a clear error that names the
//! problem, a non-zero exit, and a slot left where it was.

use std::time::Duration;

use sqlx::PgPool;

use crate::support::fixture::{Fixture, assert_exactly_once};
use crate::support::postgres::{Settings, confirmed_flush};
use crate::support::relay::binary;
use crate::support::{Postgres, RelayBuilder, Tansu, free_port, unique};

/// Creates the slot by hand, as an earlier relay would have, and moves the
/// WAL past it with some events, so "left as it was" is observable.
async fn existing_slot(f: &Fixture) -> String {
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&f.slot)
        .execute(&f.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO outbox_relay_slot (slot_name, publication_name, backfilled_at) VALUES ($1, 'outbox_pub', now())")
        .bind(&f.slot)
        .execute(&f.pool)
        .await
        .unwrap();
    f.write_tx(&[("a".into(), 1), ("b".into(), 2)]).await;
    confirmed_flush(&f.url, &f.slot).await.expect("slot exists")
}

async fn expect_failure(relay: RelayBuilder, needles: &[&str]) -> String {
    let mut relay = relay.spawn();
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert_eq!(
        status.code(),
        Some(1),
        "the relay should have failed (exit 1):\n{logs}"
    );
    for needle in needles {
        assert!(logs.contains(needle), "expected {needle:?} in:\n{logs}");
    }
    logs
}

#[tokio::test]
async fn a_missing_publication_is_named() {
    let f = Fixture::new().await;
    let before = existing_slot(&f).await;
    sqlx::query("DROP PUBLICATION outbox_pub")
        .execute(&f.pool)
        .await
        .unwrap();
    expect_failure(
        f.relay(),
        &[
            "publication `outbox_pub` does not exist",
            "outbox-relay migrate",
        ],
    )
    .await;
    assert_eq!(confirmed_flush(&f.url, &f.slot).await, Some(before));
}

#[tokio::test]
async fn wal_level_below_logical_is_explained() {
    let pg = Postgres::start_with(Settings {
        wal_level: "replica",
        ..Settings::default()
    });
    let tansu = Tansu::start();
    let url = pg.create_migrated_database(&unique("db")).await;
    let slot = unique("slot");
    expect_failure(
        RelayBuilder::new(&url, &tansu.brokers(), &slot),
        &["wal_level is `replica`", "wal_level = logical"],
    )
    .await;
    assert_eq!(
        confirmed_flush(&url, &slot).await,
        None,
        "no slot may be created"
    );
}

#[tokio::test]
async fn a_wrong_password_is_reported_without_echoing_it() {
    let f = Fixture::new().await;
    let before = existing_slot(&f).await;
    let wrong = f
        .url
        .replace(crate::support::postgres::PASSWORD, "not-the-Passw0rd");
    let mut relay = f.relay();
    relay.database_url = wrong;
    let logs = expect_failure(
        relay,
        &[
            "password authentication failed",
            "check the user and password",
        ],
    )
    .await;
    assert!(
        !logs.contains("not-the-Passw0rd"),
        "the password leaked:\n{logs}"
    );
    assert_eq!(confirmed_flush(&f.url, &f.slot).await, Some(before));
}

#[tokio::test]
async fn an_unreachable_broker_is_reported() {
    let f = Fixture::new().await;
    let before = existing_slot(&f).await;
    let mut relay = f.relay();
    relay.brokers = format!("127.0.0.1:{}", free_port());
    expect_failure(
        relay,
        &["cannot reach the kafka brokers", "--kafka-brokers"],
    )
    .await;
    assert_eq!(confirmed_flush(&f.url, &f.slot).await, Some(before));
}

#[tokio::test]
async fn a_missing_dead_letter_topic_is_named_at_start() {
    let f = Fixture::new().await;
    let before = existing_slot(&f).await;
    let dlt = format!("{}.dlt", f.topic());
    let relay = f
        .relay()
        .without_create_topics()
        .arg("--on-undeliverable=dead-letter")
        .arg(format!("--dead-letter-topic={dlt}"));
    expect_failure(
        relay,
        &[
            &format!("kafka topic `{dlt}` does not exist (needed by --dead-letter-topic"),
            "--create-topics",
        ],
    )
    .await;
    assert_eq!(confirmed_flush(&f.url, &f.slot).await, Some(before));
}

#[tokio::test]
async fn a_missing_topic_stops_the_relay_without_skipping_the_event() {
    let f = Fixture::new().await;
    let relay = f.relay().without_create_topics().start().await;
    let written = f.write_tx(&[("t1".into(), 1)]).await;
    let mut relay = relay;
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(1));
    let logs = relay.logs();
    assert!(
        logs.contains(&format!("kafka topic `{}` does not exist", f.topic())),
        "{logs}"
    );
    assert!(
        logs.contains(&written[0].id),
        "the error names the event: {logs}"
    );
    assert!(logs.contains("--create-topics"), "{logs}");

    // The slot did not move past the event: with topic creation allowed, the
    // next run delivers it.
    let mut relay = f.relay().spawn();
    let records = f.read(1).await;
    assert_exactly_once(&written, &records);
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn bad_flags_are_refused_before_connecting() {
    // Nothing listens here; a config error must come first.
    let url = format!("postgres://u:hunter2pw@127.0.0.1:{}/db", free_port());
    for (args, needle) in [
        (
            vec!["--topic-template", "events.{aggregate}"],
            "unknown placeholder `{aggregate}`",
        ),
        (
            vec!["--slot", "Bad-Slot"],
            "slot name `Bad-Slot` is not valid",
        ),
        (
            vec!["--max-in-flight", "0"],
            "--max-in-flight must be at least 1",
        ),
        (
            vec!["--kafka-option", "linger.ms"],
            "has no `=`; write each option as key=value",
        ),
        // Issue 9, path 9: settings that weaken the delivery guarantees.
        (
            vec!["--kafka-option", "acks=1"],
            "--kafka-option acks=1 is refused",
        ),
        (
            vec!["--kafka-option", "message.timeout.ms=300000"],
            "a finite timeout",
        ),
        (
            vec!["--kafka-option", "enable.idempotence=false"],
            "without idempotence",
        ),
        (
            vec!["--on-undeliverable", "shrug"],
            "invalid value 'shrug' for '--on-undeliverable",
        ),
        (
            vec!["--status-interval", "soon"],
            "`soon` is not a duration",
        ),
        (
            vec![
                "--on-undeliverable",
                "dead-letter",
                "--dead-letter-topic",
                "dead letters",
            ],
            "--dead-letter-topic `dead letters` is not a legal Kafka topic",
        ),
    ] {
        let out = std::process::Command::new(binary())
            .arg("run")
            .args(&args)
            .env("OUTBOX_DATABASE_URL", &url)
            .env("OUTBOX_KAFKA_BROKERS", "127.0.0.1:1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("hunter2pw"), "{stderr}");
    }
    for bad_url in [
        "postgres://u:hunter2pw@h:port/db",
        "postgres://u:hunter2pw@h/db?sslmode=sometimes",
        "postgres://u:hunter2pw@h/db?sslmod=require",
    ] {
        let out = std::process::Command::new(binary())
            .args(["run"])
            .env("OUTBOX_DATABASE_URL", bad_url)
            .env("OUTBOX_KAFKA_BROKERS", "127.0.0.1:1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("database URL"), "{stderr}");
        assert!(!stderr.contains("hunter2pw"), "{stderr}");
    }
    let out = std::process::Command::new(binary())
        .args(["run"])
        .env("OUTBOX_DATABASE_URL", "mysql://u:hunter2pw@h/db")
        .env("OUTBOX_KAFKA_BROKERS", "127.0.0.1:1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("must start with postgres://"), "{stderr}");
    assert!(!stderr.contains("hunter2pw"), "{stderr}");
}

#[tokio::test]
async fn help_documents_every_flag_and_hides_secrets() {
    let out = std::process::Command::new(binary())
        .args(["run", "--help"])
        .env("OUTBOX_DATABASE_URL", "postgres://u:hunter2pw@h/db")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for flag in [
        "OUTBOX_DATABASE_URL",
        "OUTBOX_KAFKA_BROKERS",
        "OUTBOX_SLOT",
        "OUTBOX_PUBLICATION",
        "OUTBOX_DATABASE_URL_FILE",
        "OUTBOX_DATABASE_PASSWORD_FILE",
        "OUTBOX_KAFKA_OPTIONS_FILE",
        "OUTBOX_SCHEMA",
        "OUTBOX_TOPIC_TEMPLATE",
        "OUTBOX_ALLOWED_TOPICS",
        "OUTBOX_KAFKA_OPTIONS",
        "OUTBOX_CREATE_TOPICS",
        "OUTBOX_TOPIC_PARTITIONS",
        "OUTBOX_TOPIC_REPLICATION_FACTOR",
        "OUTBOX_MAX_IN_FLIGHT",
        "OUTBOX_STATUS_INTERVAL",
        "OUTBOX_CONNECT_TIMEOUT",
        "OUTBOX_MAX_BACKOFF",
        "OUTBOX_ON_UNDELIVERABLE",
        "OUTBOX_DEAD_LETTER_TOPIC",
        "OUTBOX_METRICS_ADDR",
        "OUTBOX_STALL_WARNING",
        "OUTBOX_SHUTDOWN_TIMEOUT",
        "OUTBOX_LOG_FORMAT",
    ] {
        // Whole names: OUTBOX_DATABASE_URL must not pass for
        // OUTBOX_DATABASE_URL_FILE.
        assert!(
            help.contains(&format!("[env: {flag}=")) || help.contains(&format!("[env: {flag}]")),
            "--help lacks {flag}:\n{help}"
        );
    }
    assert!(!help.contains("hunter2pw"), "{help}");
}

#[tokio::test]
async fn migrate_applies_the_schema_once() {
    let pg = Postgres::start();
    let url = pg.create_database(&unique("db")).await;
    for _ in 0..2 {
        let out = std::process::Command::new(binary())
            .args(["migrate"])
            .env("OUTBOX_DATABASE_URL", &url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pool = PgPool::connect(&url).await.unwrap();
    let pubs: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_publication WHERE pubname = 'outbox_pub' AND pubinsert AND NOT pubdelete AND NOT pubupdate")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(pubs, 1);
}

#[tokio::test]
async fn an_event_kafka_refuses_stops_the_relay_naming_it() {
    let f = Fixture::new().await;
    // The producer's own size limit stands in for a broker's message.max.bytes.
    let relay = f
        .relay()
        .arg("--kafka-option")
        .arg("message.max.bytes=1500")
        .start()
        .await;
    let small = f.write_tx(&[("s1".into(), 1)]).await;
    crate::support::consume(
        &f.tansu.brokers(),
        &[&f.topic()],
        1,
        Duration::from_secs(60),
    )
    .await;
    let before = confirmed_flush(&f.url, &f.slot).await.unwrap();

    let big = outbox::Event::new(&f.aggregate_type, "b1", "Happened", &"z".repeat(4000)).unwrap();
    let mut tx = f.pool.begin().await.unwrap();
    outbox::write(&mut tx, &big).await.unwrap();
    tx.commit().await.unwrap();

    let mut relay = relay;
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(
        logs.contains(&format!("kafka did not accept event {}", big.id())),
        "{logs}"
    );
    assert!(logs.contains("too large"), "{logs}");
    // Not confirmed past the refused event: the slot is where it was after
    // the small event (or earlier), never beyond the big one's commit.
    let after = confirmed_flush(&f.url, &f.slot).await.unwrap();
    assert!(
        !crate::support::postgres::lsn_after(&f.url, &after, &before).await,
        "slot moved from {before} to {after} past a refused event"
    );
    drop(small);
}
