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
    let mut relay = f.relay().spawn();
    relay.wait_log("streaming", Duration::from_secs(60)).await;
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
/// cutoff, oldest first, in batches of `--batch-size`, skipping a row a
/// writer holds instead of waiting for it; it refuses to touch the outbox
/// while a slot's first backfill (which reads the table) is unfinished.
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
    sqlx::query("DELETE FROM outbox_relay_slot")
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
