//! End to end: events written with the helper reach Kafka exactly as
//! committed, in order per aggregate, across stops, crashes and late starts.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::fixture::{Fixture, assert_exactly_once, assert_records_match};
use crate::support::postgres::{confirmed_flush, lsn_after};
use crate::support::wait_for;

#[tokio::test]
async fn delivers_a_thousand_events_in_commit_order() {
    let f = Fixture::new().await;
    let mut relay = f.relay().spawn();
    relay.wait_log("streaming", Duration::from_secs(60)).await;

    let mut seq = 0;
    let written = f.write_many(1000, 19, 10, &mut seq).await;
    assert_eq!(written.len(), 1000);
    let records = f.read(1000).await;
    assert_exactly_once(&written, &records);

    assert!(relay.stop().await.success(), "{}", relay.logs());
}

#[tokio::test]
async fn a_rolled_back_transaction_publishes_nothing() {
    let f = Fixture::new().await;
    let mut relay = f.relay().spawn();
    relay.wait_log("streaming", Duration::from_secs(60)).await;

    let mut tx = f.pool.begin().await.unwrap();
    let lost = outbox::Event::new(
        &f.aggregate_type,
        "r1",
        "Happened",
        &serde_json::json!({"n": 1}),
    )
    .unwrap();
    outbox::write(&mut tx, &lost).await.unwrap();
    tx.rollback().await.unwrap();
    let marker = f.write_tx(&[("r2".into(), 1)]).await;

    let records = f.read(1).await;
    assert_exactly_once(&marker, &records);
    assert!(records.iter().all(|r| r.id() != lost.id().to_string()));
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn events_before_the_first_start_and_while_stopped_all_arrive() {
    let f = Fixture::new().await;
    let mut seq = 0;
    // Before the slot exists: published by the backfill.
    let mut written = f.write_many(150, 10, 5, &mut seq).await;

    let mut relay = f.relay().spawn();
    relay
        .wait_log("backfill complete", Duration::from_secs(60))
        .await;
    written.extend(f.write_many(150, 10, 5, &mut seq).await);
    f.read(300).await;
    assert!(relay.stop().await.success(), "{}", relay.logs());

    // While the relay is down.
    written.extend(f.write_many(150, 10, 5, &mut seq).await);
    let mut relay = f.relay().spawn();
    let records = f.read(450).await;
    assert_exactly_once(&written, &records);
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn a_graceful_restart_mid_stream_loses_and_duplicates_nothing() {
    let f = Fixture::new().await;
    let mut relay = f.relay().spawn();
    relay.wait_log("streaming", Duration::from_secs(60)).await;

    let mut seq = 0;
    let mut written = f.write_many(300, 10, 8, &mut seq).await;
    relay.wait_log("published", Duration::from_secs(60)).await;
    // Stop while events are still flowing, keep writing, start again.
    let stopping = {
        let status = relay.stop();
        let writes = f.write_many(300, 10, 8, &mut seq);
        let (status, more) = tokio::join!(status, writes);
        written.extend(more);
        status
    };
    assert!(
        stopping.success(),
        "graceful stop failed:\n{}",
        relay.logs()
    );
    assert!(
        relay.logs().contains("final position confirmed"),
        "{}",
        relay.logs()
    );

    let mut relay = f.relay().spawn();
    written.extend(f.write_many(300, 10, 8, &mut seq).await);
    let records = f.read(900).await;
    assert_exactly_once(&written, &records);
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn a_kill_without_grace_loses_nothing_and_replays_only_the_tail() {
    let f = Fixture::new().await;
    let mut relay = f.relay().spawn();
    relay.wait_log("streaming", Duration::from_secs(60)).await;

    let mut seq = 0;
    let mut written = f.write_many(400, 10, 8, &mut seq).await;
    relay.wait_log("published", Duration::from_secs(60)).await;
    relay.kill9().await;
    written.extend(f.write_many(400, 10, 8, &mut seq).await);

    let mut relay = f.relay().spawn();
    let records = f.read(800).await;
    assert!(relay.stop().await.success());

    // Nothing lost, every record intact and in order per aggregate.
    assert_records_match(&written, &records);
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for r in &records {
        *copies.entry(r.id()).or_default() += 1;
    }
    for w in &written {
        assert!(
            copies.contains_key(w.id.as_str()),
            "event {} was lost",
            w.id
        );
    }
    // Replay restarts at the last confirmed commit, so the duplicates are one
    // unbroken run of commit order: everything after that commit, up to the
    // crash, and nothing from before it.
    let duplicated: Vec<usize> = written
        .iter()
        .enumerate()
        .filter(|(_, w)| copies[w.id.as_str()] > 1)
        .map(|(i, _)| i)
        .collect();
    if let (Some(first), Some(last)) = (duplicated.first(), duplicated.last()) {
        assert_eq!(
            duplicated.len(),
            last - first + 1,
            "duplicates are not one contiguous tail: {duplicated:?}"
        );
    }
    assert!(
        copies.values().all(|&c| c <= 2),
        "an event arrived more than twice"
    );
    eprintln!(
        "kill -9: {} events, {} duplicated",
        written.len(),
        duplicated.len()
    );
}

#[tokio::test]
async fn an_idle_outbox_does_not_pin_wal() {
    let f = Fixture::new().await;
    let mut relay = f.relay().spawn();
    relay.wait_log("streaming", Duration::from_secs(60)).await;
    let before = wait_for("the slot to exist", Duration::from_secs(30), || async {
        confirmed_flush(&f.url, &f.slot).await
    })
    .await;

    sqlx::query("CREATE TABLE busy (id bigserial PRIMARY KEY, note text)")
        .execute(&f.pool)
        .await
        .unwrap();
    for _ in 0..20 {
        sqlx::query("INSERT INTO busy (note) SELECT repeat('x', 200) FROM generate_series(1, 500)")
            .execute(&f.pool)
            .await
            .unwrap();
    }
    let after_writes: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    wait_for(
        "confirmed_flush_lsn to pass the busy table's writes",
        Duration::from_secs(60),
        || async {
            let now = confirmed_flush(&f.url, &f.slot).await?;
            (lsn_after(&f.url, &now, &after_writes).await || now == after_writes).then_some(())
        },
    )
    .await;
    let now = confirmed_flush(&f.url, &f.slot).await.unwrap();
    assert!(lsn_after(&f.url, &now, &before).await, "{before} -> {now}");
    assert!(relay.stop().await.success());
}
