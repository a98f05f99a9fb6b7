//! Delivery at the edges (issue 9), against real PostgreSQL and Tansu: a
//! first-start backfill that fails and is retried, a second instance on the
//! same slot, the backfill's order and policy, a topic that disappears.
//! Rows are written the way users write them: raw SQL with random ids,
//! several rows per aggregate per transaction, rows deleted in the
//! transaction that inserted them, writes racing the relay's start.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::PgPool;

use crate::support::fixture::Fixture;
use crate::support::kafka::{consume_settle, consume_to_end, create_topic};
use crate::support::{Record, unique};

/// Inserts one event per `n` for `aggregate_id`, in one transaction, with
/// plain SQL (random UUIDs, no helper); the payload carries `n`.
async fn insert(pool: &PgPool, aggregate_type: &str, aggregate_id: &str, ns: &[i64]) {
    let mut tx = pool.begin().await.unwrap();
    for n in ns {
        sqlx::query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ($1, $2, 'Happened', jsonb_build_object('n', $3::bigint))",
        )
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(n)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
}

/// Inserts an event and deletes its row in the same transaction, as
/// services that keep their outbox empty do.
async fn insert_and_delete(pool: &PgPool, aggregate_type: &str, aggregate_id: &str, n: i64) {
    let mut tx = pool.begin().await.unwrap();
    let id: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ($1, $2, 'Happened', jsonb_build_object('n', $3::bigint)) RETURNING id",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(n)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    sqlx::query("DELETE FROM outbox WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

fn n_of(r: &Record) -> i64 {
    r.value_json()["n"].as_i64().expect("payload has n")
}

/// Every `(topic, key) -> ns` expected arrived, and along each partition
/// the first copy of each event comes in the expected order (duplicates
/// are allowed, as a replayed tail).
fn assert_delivered_in_order(records: &[Record], expected: &HashMap<(String, String), Vec<i64>>) {
    let mut seen: HashMap<(String, String), Vec<i64>> = HashMap::new();
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.topic.clone(), r.partition, r.offset));
    let mut ids = HashSet::new();
    for r in sorted {
        if !ids.insert(r.id().to_owned()) {
            continue;
        }
        seen.entry((r.topic.clone(), r.key.clone().unwrap_or_default()))
            .or_default()
            .push(n_of(r));
    }
    for (k, want) in expected {
        let got = seen.get(k).cloned().unwrap_or_default();
        assert_eq!(&got, want, "events of {k:?} (in partition order)");
    }
}

/// Reads `topic` until the events `ns` of aggregate `key` arrived, and
/// checks they are all there, in that order.
async fn assert_aggregate_in_order(brokers: &str, topic: &str, key: &str, ns: &[i64]) {
    let records = consume_settle(
        brokers,
        &[topic],
        ns.len(),
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    assert_delivered_in_order(
        &records,
        &HashMap::from([((topic.to_owned(), key.to_owned()), ns.to_vec())]),
    );
}

/// Path 1: a first-start backfill that fails (a row for a topic that does
/// not exist yet) leaves the slot where it was. While the relay is down, 100
/// transactions insert an event and delete its row; then the topic is
/// created and the relay started again: it continues the backfill under a
/// fresh snapshot and streams from the slot's consistent point, so every
/// event arrives, in order. (The old relay dropped and recreated the slot:
/// none of the 100 arrived.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_first_backfill_loses_nothing_deleted_meanwhile() {
    let f = Fixture::new().await;
    let brokers = f.tansu.brokers();
    let good = unique("good");
    let late = unique("late");
    let (good_topic, late_topic) = (
        format!("outbox.event.{good}"),
        format!("outbox.event.{late}"),
    );
    create_topic(&brokers, &good_topic, 1).await;
    insert(&f.pool, &good, "g", &[1, 2, 3]).await;
    insert(&f.pool, &good, "g", &[4, 5]).await;
    insert(&f.pool, &late, "l", &[1]).await;

    let mut relay = f.relay().without_create_topics().spawn();
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(
        logs.contains(&format!("kafka topic `{late_topic}` does not exist")),
        "{logs}"
    );

    for n in 6..=105 {
        insert_and_delete(&f.pool, &good, "g", n).await;
    }
    // Rows kept in the table: the retry reads them under its fresh snapshot,
    // but they were committed after the slot's consistent point, so they are
    // the stream's to send (once, in commit order), not the backfill's.
    insert(&f.pool, &good, "g", &[106, 107]).await;
    create_topic(&brokers, &late_topic, 1).await;
    let mut relay = f.relay().without_create_topics().spawn();
    relay
        .wait_log("backfill complete", Duration::from_secs(60))
        .await;
    insert(&f.pool, &good, "g", &[108]).await;
    consume_settle(
        &brokers,
        &[&good_topic, &late_topic],
        109,
        Duration::from_secs(120),
        Duration::ZERO,
    )
    .await;
    assert!(relay.stop().await.success(), "{}", relay.logs());
    let records = consume_to_end(&brokers, &[&good_topic, &late_topic]).await;
    let expected = HashMap::from([
        ((good_topic.clone(), "g".to_owned()), (1..=108).collect()),
        ((late_topic.clone(), "l".to_owned()), vec![1]),
    ]);
    assert_delivered_in_order(&records, &expected);
    // The retry continued after the five acknowledged rows instead of
    // sending them again, and left the rows committed after the slot's
    // consistent point to the stream: every event exactly once.
    let ids: HashSet<&str> = records.iter().map(|r| r.id()).collect();
    assert_eq!(ids.len(), records.len(), "duplicates: {records:?}");
    let logs = relay.logs();
    assert!(
        logs.contains("continuing it under a fresh snapshot"),
        "{logs}"
    );
    assert!(
        logs.contains("continuing an interrupted backfill"),
        "{logs}"
    );
}

/// Path 1 (a second instance): two relays on one slot. The second waits for
/// the first (it says so once, and does not touch the slot); when the first
/// is killed with SIGKILL it takes over and delivers what was written
/// meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_waits_and_takes_over() {
    let f = Fixture::new().await;
    let agg = unique("agg");
    let topic = format!("outbox.event.{agg}");
    let mut first = f.relay().start().await;
    let mut second = f.relay().spawn();
    second
        .wait_log(
            "another relay instance works this slot; waiting",
            Duration::from_secs(60),
        )
        .await;
    insert(&f.pool, &agg, "a", &[1, 2]).await;
    consume_settle(
        &f.tansu.brokers(),
        &[&topic],
        2,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    assert!(
        !second.logs().contains("streaming"),
        "the second instance streamed beside the first:\n{}",
        second.logs()
    );
    assert_eq!(
        second.logs().matches("another relay instance").count(),
        1,
        "the standby repeats itself:\n{}",
        second.logs()
    );
    first.kill9().await;
    insert(&f.pool, &agg, "a", &[3, 4]).await;
    second
        .wait_log("took over the slot lock", Duration::from_secs(30))
        .await;
    insert(&f.pool, &agg, "a", &[5]).await;
    assert_aggregate_in_order(&f.tansu.brokers(), &topic, "a", &[1, 2, 3, 4, 5]).await;
    assert!(second.stop().await.success(), "{}", second.logs());
}

/// Path 10: the first-start backfill publishes each aggregate's rows in the
/// order they were inserted, for rows written with plain SQL (random UUIDs,
/// one `created_at` per transaction), several per aggregate per
/// transaction, with writes going on while the relay starts. Then, on the
/// stream, two transactions on one aggregate that commit in the opposite
/// order they started arrive in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backfill_keeps_insertion_order_and_the_stream_commit_order() {
    let f = Fixture::new().await;
    let agg = unique("agg");
    let topic = format!("outbox.event.{agg}");
    let keys = ["a", "b", "c", "d"];
    let mut next: HashMap<&'static str, i64> = keys.iter().map(|k| (*k, 1)).collect();
    let mut expected: HashMap<(String, String), Vec<i64>> = HashMap::new();
    let mut write = async |next: &mut HashMap<&'static str, i64>, key: &'static str, count: i64| {
        let n = next[key];
        let ns: Vec<i64> = (n..n + count).collect();
        insert(&f.pool, &agg, key, &ns).await;
        next.insert(key, n + count);
        expected
            .entry((topic.clone(), key.to_owned()))
            .or_default()
            .extend(ns);
    };
    for round in 0..10 {
        for key in keys {
            write(&mut next, key, 1 + (round % 4)).await;
        }
    }
    let relay = f.relay().spawn();
    // Writes race the relay's first start (slot creation and backfill).
    for round in 0..20 {
        for key in keys {
            write(&mut next, key, 1 + (round % 3)).await;
        }
    }
    relay.wait_streaming().await;

    // Two transactions on aggregate "z": the one that started later commits first.
    let mut earlier = f.pool.begin().await.unwrap();
    let mut later = f.pool.begin().await.unwrap();
    for (tx, n) in [(&mut earlier, 2i64), (&mut later, 1i64)] {
        sqlx::query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ($1, 'z', 'Happened', jsonb_build_object('n', $2::bigint))",
        )
        .bind(&agg)
        .bind(n)
        .execute(&mut **tx)
        .await
        .unwrap();
    }
    later.commit().await.unwrap();
    earlier.commit().await.unwrap();
    expected.insert((topic.clone(), "z".to_owned()), vec![1, 2]);

    let total: usize = expected.values().map(Vec::len).sum();
    let records = consume_settle(
        &f.tansu.brokers(),
        &[&topic],
        total,
        Duration::from_secs(120),
        Duration::from_secs(2),
    )
    .await;
    let mut relay = relay;
    assert!(relay.stop().await.success(), "{}", relay.logs());
    assert_delivered_in_order(&records, &expected);
}

/// Path 5: under `--on-undeliverable dead-letter` the backfill parks a row
/// that is not a valid event (an illegal topic override) in the dead-letter
/// topic and goes on, instead of stopping every start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backfill_dead_letters_a_bad_row_when_asked() {
    let f = Fixture::new().await;
    let agg = unique("agg");
    let topic = format!("outbox.event.{agg}");
    let dlt = unique("dlt").replace('_', "-");
    f.drop_row_checks().await; // as for rows from before the constraint
    insert(&f.pool, &agg, "a", &[1]).await;
    let bad: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, topic) \
         VALUES ($1, 'a', 'Happened', '{\"n\": 99}', 'no spaces allowed') RETURNING id",
    )
    .bind(&agg)
    .fetch_one(&f.pool)
    .await
    .unwrap();
    insert(&f.pool, &agg, "a", &[2]).await;
    let mut relay = f
        .relay()
        .arg("--on-undeliverable=dead-letter")
        .arg(format!("--dead-letter-topic={dlt}"))
        .spawn();
    relay
        .wait_log("backfill complete", Duration::from_secs(60))
        .await;
    assert_aggregate_in_order(&f.tansu.brokers(), &topic, "a", &[1, 2]).await;
    let letters = consume_settle(
        &f.tansu.brokers(),
        &[&dlt],
        1,
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].id(), bad.to_string());
    assert_eq!(
        letters[0].header("outbox.original_topic"),
        Some("no spaces allowed")
    );
    assert!(relay.stop().await.success(), "{}", relay.logs());
}
