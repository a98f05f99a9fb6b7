//! Running the relay for years: bounded tables (events deleted in the
//! writing transaction, and `outbox-relay prune`).

use std::time::Duration;

use crate::support::fixture::{Fixture, assert_exactly_once};
use crate::support::relay::binary;
use crate::support::{Postgres, unique};

/// Issue 11, item 5a: with `Outbox::keep_rows(false)` the rows are deleted
/// in the writing transaction: the table stays empty and every event still
/// arrives, in order, exactly once (the relay reads the insert from the WAL).
#[tokio::test]
async fn events_written_without_keeping_rows_arrive_and_the_table_stays_empty() {
    let f = Fixture::new().await;
    let mut relay = f.relay().start().await;
    let writer = outbox::Outbox::new().keep_rows(false);
    let mut written = Vec::new();
    for tx in 0..20u64 {
        // Several rows per aggregate per transaction.
        let items: Vec<(String, u64)> = (0..5)
            .map(|i| (format!("k{}", i % 2), tx * 5 + i + 1))
            .collect();
        written.extend(f.write_tx_with(writer, &items).await);
    }
    // The single-event path deletes its row too.
    let one = outbox::Event::new(
        &f.aggregate_type,
        "k0",
        "Happened",
        &serde_json::json!({"seq": 100}),
    )
    .unwrap();
    let mut tx = f.pool.begin().await.unwrap();
    writer.write(&mut tx, &one).await.unwrap();
    tx.commit().await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "rows are left in the table");
    let records = f.read(written.len() + 1).await;
    assert!(relay.stop().await.success(), "{}", relay.logs());
    let (single, records): (Vec<_>, Vec<_>) = records
        .into_iter()
        .partition(|r| r.id() == one.id().to_string());
    assert_eq!(single.len(), 1);
    assert_exactly_once(&written, &records);
}

async fn prune(url: &str, args: &[&str]) -> (std::process::ExitStatus, String) {
    let out = tokio::process::Command::new(binary())
        .arg("prune")
        .args(args)
        .env("OUTBOX_DATABASE_URL", url)
        .env("OUTBOX_LOG", "info,outbox_relay=debug")
        .output()
        .await
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Issue 11, item 5b: `prune` deletes outbox and inbox rows older than the
/// cutoff in batches of `--batch-size`, skipping a row a writer holds
/// instead of waiting for it; it refuses to touch the outbox before any
/// relay finished a first start, and while a slot's first backfill (which
/// reads the table) is unfinished.
#[tokio::test]
async fn prune_deletes_old_rows_in_batches_and_waits_for_no_one() {
    let pg = Postgres::start();
    let url = pg.create_migrated_database(&unique("db")).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at) \
         SELECT 'order', 'o' || g, 'Placed', '{}', now() - interval '10 days' - g * interval '1 second' \
         FROM generate_series(1, 2500) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT 'order', 'n' || g, 'Placed', '{}' FROM generate_series(1, 10) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO inbox (consumer, event_id, received_at) \
         SELECT 'billing', gen_random_uuid(), now() - interval '40 days' FROM generate_series(1, 30) \
         UNION ALL SELECT 'billing', gen_random_uuid(), now() FROM generate_series(1, 5)",
    )
    .execute(&pool)
    .await
    .unwrap();

    // No relay has finished a first start: the rows may be unpublished.
    let (status, log) = prune(&url, &["--older-than", "7d"]).await;
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("no relay has finished its first start"),
        "{log}"
    );
    sqlx::query("INSERT INTO outbox_relay_slot (slot_name, publication_name, backfilled_at) VALUES ('done_slot', 'outbox_pub', now())")
        .execute(&pool)
        .await
        .unwrap();
    // A slot whose first backfill has not finished: the outbox is left alone.
    sqlx::query("INSERT INTO outbox_relay_slot (slot_name, publication_name) VALUES ('pending_slot', 'outbox_pub')")
        .execute(&pool)
        .await
        .unwrap();
    let (status, log) = prune(&url, &["--older-than", "7d"]).await;
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("pending_slot have not finished their first backfill"),
        "{log}"
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM outbox").await, 2510);
    sqlx::query("DELETE FROM outbox_relay_slot WHERE slot_name = 'pending_slot'")
        .execute(&pool)
        .await
        .unwrap();

    // A writer holds one old row: the prune skips it rather than wait.
    let mut holder = pool.begin().await.unwrap();
    let held: uuid::Uuid = sqlx::query_scalar(
        "SELECT id FROM outbox WHERE created_at < now() - interval '7 days' \
         ORDER BY created_at LIMIT 1 FOR UPDATE",
    )
    .fetch_one(&mut *holder)
    .await
    .unwrap();
    let (status, log) = tokio::time::timeout(
        Duration::from_secs(60),
        prune(
            &url,
            &[
                "--older-than",
                "7d",
                "--inbox-older-than",
                "30d",
                "--batch-size",
                "1000",
            ],
        ),
    )
    .await
    .expect("the prune does not wait for the writer");
    assert!(status.success(), "{log}");
    assert_eq!(log.matches("batch deleted").count(), 3 + 1, "{log}");
    assert!(
        log.contains("deleted=2499") && log.contains("batches=3"),
        "{log}"
    );
    assert!(log.contains("deleted=30"), "{log}");
    holder.rollback().await.unwrap();
    assert_eq!(count(&pool, "SELECT count(*) FROM outbox").await, 11);
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE id = $1")
        .bind(held)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(kept, 1, "the held row is left for the next run");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM outbox WHERE created_at > now() - interval '1 day'"
        )
        .await,
        10
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM inbox").await, 5);

    // The next run takes the row that was held; nothing else is old.
    let (status, log) = prune(&url, &["--older-than", "7d"]).await;
    assert!(status.success(), "{log}");
    assert_eq!(count(&pool, "SELECT count(*) FROM outbox").await, 10);

    let (status, log) = prune(&url, &[]).await;
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("nothing to prune"), "{log}");
}

/// Runs `outbox-relay status --json` for `slot`; its exit code and report.
async fn status(url: &str, slot: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let out = tokio::process::Command::new(binary())
        .args(["status", "--json", "--slot", slot])
        .args(extra)
        .env("OUTBOX_DATABASE_URL", url)
        .output()
        .await
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

/// The table form of `status` (printed, for the record).
async fn status_text(url: &str, slot: &str) -> String {
    let out = tokio::process::Command::new(binary())
        .args(["status", "--slot", slot])
        .env("OUTBOX_DATABASE_URL", url)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "outbox-relay status (exit {:?}):\n{text}",
        out.status.code()
    );
    text
}

fn notes(report: &serde_json::Value) -> String {
    report["notes"].to_string()
}

/// Issue 11, item 1: `status` reports a missing slot as broken (2), a
/// streaming relay as healthy (0) with the last event it delivered (id and
/// topic, recorded by the relay), a stopped relay with events waiting as
/// broken with the lag in bytes, and a backfilling, lagging slot as
/// degraded (1); it warns when the slot's WAL is unlimited.
#[tokio::test]
async fn status_tells_healthy_from_degraded_and_broken() {
    let f = Fixture::new().await;
    let (code, report) = status(&f.url, &f.slot, &[]).await;
    assert_eq!(code, 2, "{report}");
    assert_eq!(report["slot_exists"], false, "{report}");
    assert!(notes(&report).contains("does not exist"), "{report}");

    let mut relay = f.relay().start().await;
    let mut written = Vec::new();
    for n in 1..=3u64 {
        written.extend(
            f.write_tx(&[("a".into(), n * 2 - 1), ("b".into(), n * 2)])
                .await,
        );
    }
    f.read(written.len()).await;
    let last = written.last().unwrap().id.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let report = loop {
        let (code, report) = status(&f.url, &f.slot, &[]).await;
        if code == 0 && report["last_event_id"] == last.as_str() {
            break report;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status did not show the last delivered event {last} (exit {code}): {report}\n{}",
            relay.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(report["health"], "healthy", "{report}");
    assert_eq!(report["active"], true, "{report}");
    assert_eq!(report["backfill"], "complete", "{report}");
    assert_eq!(report["last_event_topic"], f.topic().as_str(), "{report}");
    assert_eq!(report["outbox_rows"], 6, "{report}");
    assert!(report["active_pid"].as_i64().is_some(), "{report}");
    assert!(report["retained_wal_bytes"].as_i64().is_some(), "{report}");
    assert!(
        notes(&report).contains("max_slot_wal_keep_size is unlimited"),
        "{report}"
    );
    let text = status_text(&f.url, &f.slot).await;
    let line = |name: &str| -> Vec<String> {
        text.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    assert_eq!(line("health"), ["health", "healthy"], "{text}");
    assert_eq!(
        line("last_event_id"),
        ["last_event_id", last.as_str()],
        "{text}"
    );
    assert!(relay.stop().await.success(), "{}", relay.logs());

    // Stopped, with events waiting: broken, and how far behind.
    f.write_tx(&[("a".into(), 7)]).await;
    let (code, report) = status(&f.url, &f.slot, &[]).await;
    assert_eq!(code, 2, "{report}");
    assert_eq!(report["active"], false, "{report}");
    assert!(report["lag_bytes"].as_i64().unwrap() > 0, "{report}");
    assert!(
        report["last_event_age_seconds"].as_f64().unwrap() >= 0.0,
        "{report}"
    );
    assert_eq!(report["lock_held"], false, "{report}");
    assert!(
        notes(&report).contains("no relay works the slot"),
        "{report}"
    );
    let text = status_text(&f.url, &f.slot).await;
    assert!(text.lines().next().unwrap().ends_with(" broken"), "{text}");

    // An instance holding the slot lock without streaming (starting,
    // backfilling, reconnecting), with the lag over the limit: degraded.
    let lock_key = format!("hashtextextended('outbox-relay slot {}', 0)", f.slot);
    let mut holder = f.pool.acquire().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT pg_advisory_lock({lock_key})"
    )))
    .execute(&mut *holder)
    .await
    .unwrap();
    let (code, report) = status(&f.url, &f.slot, &["--max-lag-bytes", "1"]).await;
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["health"], "degraded", "{report}");
    assert_eq!(report["lock_held"], true, "{report}");
    assert!(
        notes(&report).contains("holds the slot lock but is not streaming"),
        "{report}"
    );
    assert!(
        notes(&report).contains("bytes of WAL are not confirmed"),
        "{report}"
    );
    // A first backfill that never finished: degraded while an instance
    // holds the lock, broken once nobody does.
    sqlx::query("UPDATE outbox_relay_slot SET backfilled_at = NULL")
        .execute(&f.pool)
        .await
        .unwrap();
    let (code, report) = status(&f.url, &f.slot, &[]).await;
    assert_eq!(code, 1, "{report}");
    assert!(
        notes(&report).contains("first backfill has not completed"),
        "{report}"
    );
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT pg_advisory_unlock({lock_key})"
    )))
    .execute(&mut *holder)
    .await
    .unwrap();
    let (code, report) = status(&f.url, &f.slot, &[]).await;
    assert_eq!(code, 2, "{report}");
}

/// `status` still reports the slot when the outbox cannot be counted: while
/// a migration holds the table's lock (or when counting would take longer
/// than 3 s) the row count is left out, with the planner's estimate and a
/// note saying why, instead of the whole probe failing (exit 3).
#[tokio::test]
async fn status_reports_the_slot_while_a_migration_locks_the_outbox() {
    let f = Fixture::new().await;
    let mut relay = f.relay().start().await;
    let written = f
        .write_tx(&[("a".into(), 1), ("b".into(), 2), ("a".into(), 3)])
        .await;
    f.read(written.len()).await;
    sqlx::query("ANALYZE outbox")
        .execute(&f.pool)
        .await
        .unwrap();
    let (code, report) = status(&f.url, &f.slot, &[]).await;
    assert!(code < 3, "{report}");
    assert_eq!(report["outbox_rows"], 3, "{report}");
    assert!(report.get("outbox_rows_estimate").is_none(), "{report}");

    let mut ddl = f.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *ddl)
        .await
        .unwrap();
    let (code, report) = status(&f.url, &f.slot, &[]).await;
    assert!(code < 3, "the probe failed: {report}");
    assert_eq!(report["slot_exists"], true, "{report}");
    assert_eq!(report["active"], true, "{report}");
    assert!(report["outbox_rows"].is_null(), "{report}");
    assert!(report["outbox_oldest"].is_null(), "{report}");
    assert_eq!(report["outbox_rows_estimate"], 3, "{report}");
    let said = notes(&report);
    assert!(
        said.contains("the outbox was not counted") && said.contains("holds a lock on it"),
        "{report}"
    );
    ddl.rollback().await.unwrap();

    let (_, report) = status(&f.url, &f.slot, &[]).await;
    assert_eq!(report["outbox_rows"], 3, "{report}");
    assert!(relay.stop().await.success(), "{}", relay.logs());
}

/// Starts `first` and waits until it streams, then `second` and waits
/// until it says it is a standby.
async fn streaming_and_standby(
    first: crate::support::RelayBuilder,
    second: crate::support::RelayBuilder,
) -> (crate::support::relay::Relay, crate::support::relay::Relay) {
    let first = first.start().await;
    let second = second.spawn();
    second
        .wait_log(
            "another relay instance works this slot; waiting",
            Duration::from_secs(60),
        )
        .await;
    (first, second)
}

/// Issue 11, items 2 and 3: `/healthz` answers while the process serves,
/// `/readyz` is 200 only on the instance that streams and 503 on a standby
/// waiting for the slot lock (also in `outbox_relay_state`); the streaming
/// one reports when it last delivered and the WAL its slot retains. After
/// SIGKILL of the streaming instance the standby takes over (the time is
/// printed: the test does not judge it) and nothing written meanwhile is
/// lost.
#[tokio::test]
async fn readiness_follows_the_slot_lock_and_a_standby_takes_over() {
    use crate::support::metrics::{get, metric, scrape};
    let f = Fixture::new().await;
    let (port_a, port_b) = (crate::support::free_port(), crate::support::free_port());
    let (mut first, mut second) =
        streaming_and_standby(f.relay().metrics_on(port_a), f.relay().metrics_on(port_b)).await;
    let ready = get(port_a, "/readyz").await.unwrap();
    assert_eq!((ready.status, ready.body.as_str()), (200, "streaming\n"));
    let standby = get(port_b, "/readyz").await.unwrap();
    assert_eq!(standby.status, 503, "{}", standby.body);
    assert!(
        standby.body.starts_with("waiting_for_lock: standby"),
        "{}",
        standby.body
    );
    assert_eq!(get(port_b, "/healthz").await.unwrap().status, 200);
    let text = scrape(port_b).await.unwrap();
    assert_eq!(
        metric(&text, "outbox_relay_state{state=\"waiting_for_lock\"}"),
        Some(1.0),
        "{text}"
    );

    let mut written = f.write_tx(&[("a".into(), 1), ("a".into(), 2)]).await;
    f.read(2).await;
    let text = crate::support::wait_for(
        "the last delivery and the retained WAL in /metrics",
        Duration::from_secs(30),
        || async {
            let text = scrape(port_a).await.ok()?;
            (metric(&text, "outbox_relay_last_delivery_timestamp_seconds")? > 0.0
                && metric(&text, "outbox_relay_slot_retained_wal_bytes")? > 0.0)
                .then_some(text)
        },
    )
    .await;
    assert_eq!(
        metric(&text, "outbox_relay_state{state=\"streaming\"}"),
        Some(1.0),
        "{text}"
    );

    first.kill9().await;
    let killed = std::time::Instant::now();
    written.extend(f.write_tx(&[("a".into(), 3)]).await);
    crate::support::metrics::wait_ready(
        port_b,
        "the standby to become ready",
        Duration::from_secs(120),
    )
    .await;
    eprintln!(
        "takeover after SIGKILL: standby ready {:.2} s after the kill",
        killed.elapsed().as_secs_f64()
    );
    written.extend(f.write_tx(&[("a".into(), 4)]).await);
    let records = f.read_through(&written.last().unwrap().id).await;
    assert!(second.stop().await.success(), "{}", second.logs());
    // After a SIGKILL the unconfirmed tail is replayed: duplicates allowed,
    // nothing missing, each aggregate in order.
    crate::support::fixture::assert_all_arrived(&written, &records);
}

/// Issue 11, item 5b, the pruner built into `run`: old outbox and inbox
/// rows go while the relay streams, recent ones stay, and every event
/// arrives exactly once.
#[tokio::test]
async fn the_built_in_pruner_deletes_old_rows_while_the_relay_streams() {
    let f = Fixture::new().await;
    sqlx::query(
        "INSERT INTO inbox (consumer, event_id, received_at) \
         SELECT 'billing', gen_random_uuid(), now() - interval '40 days' FROM generate_series(1, 30) \
         UNION ALL SELECT 'billing', gen_random_uuid(), now() FROM generate_series(1, 5)",
    )
    .execute(&f.pool)
    .await
    .unwrap();
    let mut relay = f
        .relay()
        .args([
            "--prune-older-than",
            "1h",
            "--prune-inbox-older-than",
            "30d",
        ])
        .args(["--prune-every", "1s"])
        .spawn();
    relay.wait_streaming().await;
    let mut next = 1;
    let written = f.write_many(40, 5, 3, &mut next).await;
    // Rows written with raw SQL and an old created_at (as an import or a
    // clock would leave them), for another aggregate type.
    let old_type = unique("old");
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at) \
         SELECT $1, 'k' || (n % 3), 'Happened', jsonb_build_object('n', n), now() - interval '2 hours' \
         FROM generate_series(1, 20) n",
    )
    .bind(&old_type)
    .execute(&f.pool)
    .await
    .unwrap();
    let records = f.read(written.len()).await;
    let old_topic = format!("outbox.event.{old_type}");
    let old = crate::support::consume(
        &f.tansu.brokers(),
        &[&old_topic],
        20,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        old.len(),
        20,
        "the old rows were delivered before they were pruned"
    );
    let count = |sql: &'static str| {
        let pool = f.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    crate::support::wait_for(
        "the pruner to delete the old rows",
        Duration::from_secs(60),
        || async {
            (count("SELECT count(*) FROM outbox WHERE created_at < now() - interval '1 hour'")
                .await
                == 0
                && count("SELECT count(*) FROM inbox").await == 5)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        count("SELECT count(*) FROM outbox").await,
        40,
        "recent outbox rows stay"
    );
    assert!(relay.logs().contains("pruned"), "{}", relay.logs());
    assert!(relay.stop().await.success(), "{}", relay.logs());
    assert_exactly_once(&written, &records);
}

/// Issue 11, item 2: the first start's backfill shows in `/readyz`
/// (`backfilling`, not ready) and in metrics users can alert on: rows handed
/// to Kafka, and per table the acknowledged `seq` against the highest one the
/// slot's snapshot saw.
#[tokio::test]
async fn the_backfill_reports_its_progress_in_metrics() {
    use crate::support::metrics::{get, metric, scrape};
    let f = Fixture::new().await;
    let mut next = 1;
    let written = f.write_many(1000, 7, 5, &mut next).await;
    let max_seq: i64 = sqlx::query_scalar("SELECT max(seq) FROM outbox")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    let port = crate::support::free_port();
    // A window of one and a slow broker round trip keep the backfill long
    // enough to be seen.
    let mut relay = f
        .relay()
        .metrics_on(port)
        .args(["--max-in-flight", "1"])
        .spawn();
    let during = crate::support::wait_for(
        "/readyz to report the backfill",
        Duration::from_secs(60),
        || async {
            let r = get(port, "/readyz").await.ok()?;
            (r.status == 503 && r.body.starts_with("backfilling")).then_some(r.body)
        },
    )
    .await;
    assert!(during.contains("outbox_relay_backfill_seq"), "{during}");
    relay.wait_log("streaming", Duration::from_secs(120)).await;
    let records = f.read(written.len()).await;
    assert_exactly_once(&written, &records);
    let text = scrape(port).await.unwrap();
    assert_eq!(
        metric(&text, "outbox_relay_backfill_rows_total"),
        Some(written.len() as f64),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "outbox_relay_backfill_target_seq{table=\"public.outbox\"}"
        ),
        Some(max_seq as f64),
        "{text}"
    );
    assert_eq!(
        metric(&text, "outbox_relay_backfill_seq{table=\"public.outbox\"}"),
        Some(max_seq as f64),
        "{text}"
    );
    assert_eq!(
        metric(&text, "outbox_relay_state{state=\"streaming\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(relay.stop().await.success(), "{}", relay.logs());
}

/// The slot lock's own connection dies mid-backfill (its backend is
/// terminated; the relay's other connections live): the backfill stops as
/// if interrupted and resumes after the lock is taken again, rather than
/// going on beside a standby that could take the lock meanwhile. Nothing is
/// lost, every aggregate in order.
#[tokio::test]
async fn losing_the_slot_lock_mid_backfill_interrupts_and_resumes_it() {
    let f = Fixture::new().await;
    let mut next = 1;
    let written = f.write_many(3000, 7, 5, &mut next).await;
    // A window of one keeps the backfill going for seconds; the lock is
    // pinged every second.
    let mut relay = f
        .relay()
        .args(["--max-in-flight", "1", "--session-timeout", "3s"])
        .spawn();
    relay
        .wait_log("created replication slot", Duration::from_secs(60))
        .await;
    let key = format!("outbox-relay slot {}", f.slot);
    let ended: i64 = crate::support::wait_for(
        "the slot lock's backend to be terminated",
        Duration::from_secs(30),
        || async {
            sqlx::query_scalar::<_, i64>(
                // Materialized: the planner must not call pg_terminate_backend
                // on rows the lock filter would drop.
                "WITH holder AS MATERIALIZED (SELECT l.pid FROM pg_locks l \
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
                 AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended($1, 0)) \
                 SELECT count(*) FROM holder WHERE pg_terminate_backend(pid)",
            )
            .bind(&key)
            .fetch_one(&f.pool)
            .await
            .ok()
            .filter(|n| *n == 1)
        },
    )
    .await;
    assert_eq!(ended, 1);
    relay
        .wait_log("the slot lock's connection failed", Duration::from_secs(30))
        .await;
    relay.wait_log("streaming", Duration::from_secs(120)).await;
    let records = f.read_through(&written.last().unwrap().id).await;
    assert!(relay.stop().await.success(), "{}", relay.logs());
    assert!(
        relay.logs().contains("stopped before it completed"),
        "the backfill went on without the lock: {}",
        relay.logs()
    );
    crate::support::fixture::assert_all_arrived(&written, &records);
}

/// Issue 11, item 3, the vanished host: the streaming instance's host stops
/// answering without closing anything (a proxy that stops forwarding). The
/// server learns it only from its own timeouts, which `--session-timeout`
/// sets (`wal_sender_timeout` on the walsender, `idle_session_timeout` on
/// the slot lock's session); the standby then takes over and nothing
/// written meanwhile is lost or reordered.
#[tokio::test]
async fn a_standby_takes_over_when_the_active_host_vanishes() {
    use crate::support::proxy::Proxy;
    let f = Fixture::new().await;
    let proxy = Proxy::start(None, f.pg.port).await;
    let proxied = f
        .url
        .replace(&format!(":{}/", f.pg.port), &format!(":{}/", proxy.port));
    let (port_a, port_b) = (crate::support::free_port(), crate::support::free_port());
    let (mut first, mut second) = streaming_and_standby(
        crate::support::RelayBuilder::new(&proxied, &f.tansu.brokers(), &f.slot)
            .args(["--session-timeout", "4s"])
            .metrics_on(port_a),
        f.relay()
            .args(["--session-timeout", "4s"])
            .metrics_on(port_b),
    )
    .await;
    let mut written = f
        .write_tx(&[("a".into(), 1), ("b".into(), 2), ("a".into(), 3)])
        .await;
    f.read(written.len()).await;

    proxy.freeze();
    let vanished = std::time::Instant::now();
    // Written while nobody streams: the standby must deliver them.
    written.extend(f.write_tx(&[("a".into(), 4), ("b".into(), 5)]).await);
    crate::support::metrics::wait_ready(
        port_b,
        "the standby to become ready after the host vanished",
        Duration::from_secs(60),
    )
    .await;
    let took = vanished.elapsed();
    eprintln!(
        "takeover after the host vanished: standby ready {:.2} s later (--session-timeout 4s)",
        took.as_secs_f64()
    );
    // Not before the server could know: the vanished instance's sessions
    // lived until their timeouts.
    assert!(
        took >= Duration::from_secs(2),
        "the standby took over {took:?} after the freeze: before any timeout could fire"
    );
    // The vanished instance gives up too: its lock's ping goes unanswered
    // for --session-timeout, which ends its streaming session, so it stops
    // claiming to stream.
    crate::support::wait_for(
        "the vanished instance to stop claiming it streams",
        Duration::from_secs(30),
        || async {
            let r = crate::support::metrics::get(port_a, "/readyz").await.ok()?;
            (r.status != 200).then_some(())
        },
    )
    .await;
    assert!(
        first.logs().contains("the slot lock was lost"),
        "{}",
        first.logs()
    );
    written.extend(f.write_tx(&[("a".into(), 6)]).await);
    let records = f.read_through(&written.last().unwrap().id).await;
    assert!(second.stop().await.success(), "{}", second.logs());
    first.kill9().await;
    crate::support::fixture::assert_all_arrived(&written, &records);
}

/// One transaction per round `n` of aggregates a, b, a (seq 3n+1..3n+3).
async fn write_rounds(
    f: &Fixture,
    rounds: std::ops::Range<u64>,
) -> Vec<crate::support::fixture::Written> {
    let mut written = Vec::new();
    for n in rounds {
        written.extend(
            f.write_tx(&[
                ("a".into(), n * 3 + 1),
                ("b".into(), n * 3 + 2),
                ("a".into(), n * 3 + 3),
            ])
            .await,
        );
    }
    written
}

/// Issue 11, item 4: a primary with a physical streaming standby, events
/// flowing, the primary crashes, the standby is promoted and the relay's
/// address switches to it (a proxy retargeted, as a DNS switch would).
/// From PostgreSQL 17 the slot is created with `FAILOVER` and synchronized
/// to the standby (`sync_replication_slots`), and the primary holds logical
/// decoding back until the standby has the WAL (`synchronized_standby_slots`):
/// the relay carries on by itself on the new primary, every event whose row
/// the new primary has arrives, each aggregate in order, and no event
/// arrives whose transaction the failover lost. Before 17 the slot is gone
/// after the promotion and the relay stops with an error that says so.
#[tokio::test]
async fn a_failover_to_a_promoted_standby_keeps_the_slot_from_postgres_17() {
    use crate::support::proxy::Proxy;
    use crate::support::{RelayBuilder, Tansu, wait_for};
    crate::support::init_logging();
    let major = Postgres::major_version();
    let synced = major >= 17;
    let mut primary = Postgres::start();
    let db = unique("db");
    let url = primary.create_migrated_database(&db).await;
    type Settings<'a> = &'a [(&'a str, &'a str)];
    let (primary_extra, standby_extra): (Settings, Settings) = if synced {
        (
            &[("synchronized_standby_slots", "standby_1")],
            &[("sync_replication_slots", "on")],
        )
    } else {
        (&[], &[])
    };
    // The standby streams through a proxy, frozen before the last
    // transactions so that the crash loses them for certain.
    let standby_link = Proxy::start(None, primary.port).await;
    let standby = primary
        .start_standby(
            "standby_1",
            &db,
            Some(standby_link.port),
            primary_extra,
            standby_extra,
        )
        .await;
    let standby_url = standby.url(&db);
    let proxy = Proxy::start(None, primary.port).await;
    let proxied = url.replace(&format!(":{}/", primary.port), &format!(":{}/", proxy.port));
    let tansu = Tansu::start();
    let mut f = Fixture {
        pool: sqlx::PgPool::connect(&url).await.unwrap(),
        pg: primary,
        tansu,
        url: url.clone(),
        slot: unique("slot"),
        aggregate_type: unique("agg"),
    };
    if synced {
        // A slot created without FAILOVER (an older relay, or the flag off)
        // is switched when a relay with the default starts on it.
        let mut plain = RelayBuilder::new(&proxied, &f.tansu.brokers(), &f.slot)
            .args(["--slot-failover", "false"])
            .start()
            .await;
        assert!(plain.stop().await.success(), "{}", plain.logs());
        let failover: bool =
            sqlx::query_scalar("SELECT failover FROM pg_replication_slots WHERE slot_name = $1")
                .bind(&f.slot)
                .fetch_one(&f.pool)
                .await
                .unwrap();
        assert!(
            !failover,
            "--slot-failover false still created a failover slot"
        );
    }
    let mut relay = RelayBuilder::new(&proxied, &f.tansu.brokers(), &f.slot)
        .start()
        .await;
    if synced {
        assert!(
            relay
                .logs()
                .contains("changed the slot's synchronization to standbys"),
            "{}",
            relay.logs()
        );
        let failover: bool =
            sqlx::query_scalar("SELECT failover FROM pg_replication_slots WHERE slot_name = $1")
                .bind(&f.slot)
                .fetch_one(&f.pool)
                .await
                .unwrap();
        assert!(failover, "the slot was not created with FAILOVER");
    }
    // `status` says whether the slot is synchronized (null before 17).
    let (_, report) = status(&url, &f.slot, &[]).await;
    let expected_failover = if synced {
        serde_json::json!(true)
    } else {
        serde_json::Value::Null
    };
    assert_eq!(report["failover"], expected_failover, "{report}");
    let mut written = write_rounds(&f, 0..3).await;
    f.read(written.len()).await;
    // The standby has replayed everything so far and, from 17, holds a
    // synchronized copy of the slot that can be used once promoted.
    let primary_lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    let standby_pool = sqlx::PgPool::connect(&standby_url).await.unwrap();
    wait_for(
        "the standby to replay the primary's WAL",
        Duration::from_secs(60),
        || async {
            sqlx::query_scalar::<_, bool>("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
                .bind(&primary_lsn)
                .fetch_one(&standby_pool)
                .await
                .ok()
                .filter(|done| *done)
        },
    )
    .await;
    if synced {
        wait_for(
            "the slot synchronized to the standby",
            Duration::from_secs(90),
            || async {
                sqlx::query_scalar::<_, bool>(
                "SELECT synced AND NOT temporary FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(&f.slot)
            .fetch_optional(&standby_pool)
            .await
            .ok()
            .flatten()
            .filter(|ready| *ready)
            },
        )
        .await;
    }
    standby_pool.close().await;
    // The standby stops receiving WAL; these transactions commit on the
    // primary only, and the crash loses them. From 17 the primary does not
    // decode them for the relay before the standby has them (never).
    standby_link.freeze();
    let lost = write_rounds(&f, 3..6).await;
    written.extend(lost.iter().cloned());
    f.pg.stop("immediate");
    // The relay's address moves before the standby is promoted: it waits.
    proxy.retarget(standby.port);
    proxy.cut();
    relay
        .wait_log(
            "the server is a standby (in recovery)",
            Duration::from_secs(60),
        )
        .await;
    standby.promote();
    f.pool = sqlx::PgPool::connect(&standby_url).await.unwrap();

    if !synced {
        let status = relay.wait_exit(Duration::from_secs(120)).await;
        assert!(!status.success(), "{}", relay.logs());
        assert!(
            relay
                .logs()
                .contains("no longer exists (dropped, or lost in a failover)"),
            "{}",
            relay.logs()
        );
        return;
    }
    for n in 6..8u64 {
        written.extend(
            f.write_tx(&[("a".into(), n * 3 + 1), ("b".into(), n * 3 + 2)])
                .await,
        );
    }
    // What the new primary has is what happened; a transaction the crash
    // lost must not have reached Kafka either.
    let kept: std::collections::HashSet<String> = sqlx::query_scalar("SELECT id::text FROM outbox")
        .fetch_all(&f.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let expected: Vec<_> = written
        .iter()
        .filter(|w| kept.contains(&w.id))
        .cloned()
        .collect();
    assert!(
        written[..9]
            .iter()
            .chain(&written[18..])
            .all(|w| kept.contains(&w.id)),
        "the new primary lacks events it had replayed before the crash or received after it"
    );
    assert!(
        lost.iter().all(|w| !kept.contains(&w.id)),
        "the transactions written while the standby was cut off survived the crash"
    );
    let records = f.read_through(&expected.last().unwrap().id).await;
    for r in &records {
        assert!(
            kept.contains(r.id()),
            "event {} reached Kafka but its transaction was lost in the failover",
            r.id()
        );
    }
    crate::support::fixture::assert_all_arrived(&expected, &records);
    assert!(relay.stop().await.success(), "{}", relay.logs());
    eprintln!(
        "failover on PostgreSQL {major}: {} of {} events kept by the new primary, all delivered; {} records",
        expected.len(),
        written.len(),
        records.len()
    );
}

/// Issue 11, item 6: `replay` republishes the rows still in the table
/// (filtered by time, aggregate type, id) with the relay's topic, key and
/// headers plus `outbox.replayed`, each aggregate in order, without touching
/// the slot; a consumer's inbox applies each event once across the original
/// and the replay.
#[tokio::test]
async fn replay_republishes_rows_and_the_inbox_applies_each_once() {
    use crate::support::postgres::confirmed_flush;
    let f = Fixture::new().await;
    let mut relay = f.relay().start().await;
    let mut written = Vec::new();
    for n in 1..=3u64 {
        written.extend(
            f.write_tx(&[("a".into(), n * 2 - 1), ("b".into(), n * 2)])
                .await,
        );
    }
    // Another aggregate type, which the filter leaves out.
    let other = unique("other");
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ($1, 'x', 'Happened', '{}')",
    )
    .bind(&other)
    .execute(&f.pool)
    .await
    .unwrap();
    f.read(written.len()).await;
    assert!(relay.stop().await.success(), "{}", relay.logs());
    let slot_before = confirmed_flush(&f.url, &f.slot).await;

    let replay = |extra: Vec<String>| {
        let url = f.url.clone();
        let brokers = f.tansu.brokers();
        let agg = f.aggregate_type.clone();
        async move {
            tokio::process::Command::new(binary())
                .args([
                    "replay",
                    "--since",
                    "2000-01-01T00:00:00Z",
                    "--aggregate-type",
                    &agg,
                ])
                .args(extra)
                .env("OUTBOX_DATABASE_URL", url)
                .env("OUTBOX_KAFKA_BROKERS", brokers)
                .output()
                .await
                .unwrap()
        }
    };
    let out = replay(Vec::new()).await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("events=6"), "{log}");
    // One id only.
    let out = replay(vec!["--id".into(), written[2].id.clone()]).await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && log.contains("events=1"), "{log}");
    assert_eq!(
        confirmed_flush(&f.url, &f.slot).await,
        slot_before,
        "the slot moved"
    );

    let records = f.read_to_end().await;
    let replayed: Vec<_> = records
        .iter()
        .filter(|r| r.header("outbox.replayed").is_some())
        .collect();
    assert_eq!(replayed.len(), 7, "{records:?}");
    assert_eq!(records.len(), 6 + 7);
    // Same record as the original, headers included, each aggregate in order.
    crate::support::fixture::assert_records_match(&written, &records);
    let other_topic = format!("outbox.event.{other}");
    let others = crate::support::kafka::consume_to_end(&f.tansu.brokers(), &[&other_topic]).await;
    assert_eq!(others.len(), 1, "the other aggregate type was replayed");

    // The inbox applies each event once, in topic order.
    let inbox = outbox::Inbox::new("replay-test").unwrap();
    let mut applied = 0;
    for r in &records {
        let mut tx = f.pool.begin().await.unwrap();
        if inbox
            .record(&mut tx, outbox::EventId::parse(r.id()).unwrap())
            .await
            .unwrap()
        {
            applied += 1;
        }
        tx.commit().await.unwrap();
    }
    assert_eq!(applied, written.len());
}
