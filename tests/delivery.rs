//! End to end: events written with the helper reach Kafka exactly as
//! committed, in order per aggregate, across stops, crashes and late starts.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::support::fixture::{Fixture, assert_exactly_once, assert_records_match};
use crate::support::kafka::consume_settle;
use crate::support::metrics::{get, metric, scrape};
use crate::support::postgres::{confirmed_flush, lsn_after};
use crate::support::wait_for;

#[tokio::test]
async fn delivers_a_thousand_events_in_commit_order() {
    let f = Fixture::new().await;
    let mut relay = f.relay().start().await;

    let mut seq = 0;
    let written = f.write_many(1000, 19, 10, &mut seq).await;
    assert_eq!(written.len(), 1000);
    f.read(1000).await;
    assert!(relay.stop().await.success(), "{}", relay.logs());
    assert_exactly_once(&written, &f.read_to_end().await);
}

#[tokio::test]
async fn a_rolled_back_transaction_publishes_nothing() {
    let f = Fixture::new().await;
    let mut relay = f.relay().start().await;

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
    f.read(450).await;
    assert!(relay.stop().await.success(), "{}", relay.logs());
    assert_exactly_once(&written, &f.read_to_end().await);
}

#[tokio::test]
async fn a_graceful_restart_mid_stream_loses_and_duplicates_nothing() {
    let f = Fixture::new().await;
    let mut relay = f.relay().start().await;

    let mut seq = 0;
    let mut written = f.write_many(300, 10, 8, &mut seq).await;
    relay.wait_log(" published ", Duration::from_secs(60)).await;
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
    f.read(900).await;
    assert!(relay.stop().await.success(), "{}", relay.logs());
    assert_exactly_once(&written, &f.read_to_end().await);
}

#[tokio::test]
async fn a_kill_without_grace_loses_nothing_and_replays_only_the_tail() {
    let f = Fixture::new().await;
    let mut relay = f.relay().start().await;

    // Kill while the writes are still going on, so the relay dies with an
    // unconfirmed tail (the old test killed after every write committed).
    let mut seq = 0;
    let writes = f.write_many(400, 10, 8, &mut seq);
    let kill = async {
        relay.wait_log(" published ", Duration::from_secs(60)).await;
        relay.kill9().await;
    };
    let (mut written, ()) = tokio::join!(writes, kill);
    // What the first run got into Kafka (its producer is dead, so this is final).
    let first_run = consume_settle(
        &f.tansu.brokers(),
        &[&f.topic()],
        1,
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .await;
    written.extend(f.write_many(400, 10, 8, &mut seq).await);

    let mut relay = f.relay().spawn();
    let records = f.read(800).await;
    assert!(relay.stop().await.success());
    assert_records_match(&written, &records);

    let index: HashMap<&str, usize> = written
        .iter()
        .enumerate()
        .map(|(i, w)| (w.id.as_str(), i))
        .collect();
    let first_keys: HashSet<(i32, i64)> =
        first_run.iter().map(|r| (r.partition, r.offset)).collect();
    let first_ids: HashSet<&str> = first_run.iter().map(|r| r.id()).collect();
    let second: Vec<usize> = records
        .iter()
        .filter(|r| !first_keys.contains(&(r.partition, r.offset)))
        .map(|r| index[r.id()])
        .collect();
    // The second run replays from the last confirmed commit: it sends one
    // unbroken run of commit order, from that commit to the end, once.
    let start = *second
        .iter()
        .min()
        .expect("the second run delivered something");
    let mut sorted = second.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (start..written.len()).collect::<Vec<_>>(),
        "second run is not the tail"
    );
    // Everything before the replay point came from the first run: nothing lost.
    for w in &written[..start] {
        assert!(first_ids.contains(w.id.as_str()), "event {} was lost", w.id);
    }
    let duplicates = written[start..]
        .iter()
        .filter(|w| first_ids.contains(w.id.as_str()))
        .count();
    eprintln!(
        "kill -9: {} events, first run delivered {}, replay from #{start}, {duplicates} duplicates",
        written.len(),
        first_run.len()
    );
}

#[tokio::test]
async fn an_idle_outbox_does_not_pin_wal() {
    let f = Fixture::new().await;
    let mut relay = f.relay().start().await;
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

#[tokio::test]
async fn a_postgres_restart_mid_stream_is_survived() {
    survive_restart("fast").await;
}

/// Restarts PostgreSQL (`pg_ctl restart -m <mode>`) while events flow, keeps
/// writing, and checks that every event arrives in order per aggregate.
pub async fn survive_restart(mode: &str) {
    let f = Fixture::new().await;
    let mut relay = f.relay().start().await;

    let mut seq = 0;
    let mut written = f.write_many(300, 10, 6, &mut seq).await;
    relay.wait_log(" published ", Duration::from_secs(60)).await;
    f.pg.restart(mode);
    // The pool's connections died with the server: reconnect. The relay
    // resumes from the slot by itself.
    f.pool.close().await;
    let pool = sqlx::PgPool::connect(&f.url).await.unwrap();
    let f = crate::support::fixture::Fixture { pool, ..f };
    written.extend(f.write_many(300, 10, 6, &mut seq).await);
    relay
        .wait_log("resuming from the slot", Duration::from_secs(60))
        .await;

    let records = f.read(600).await;
    assert_records_match(&written, &records);
    for w in &written {
        assert!(
            records.iter().any(|r| r.id() == w.id),
            "event {} was lost",
            w.id
        );
    }
    assert!(relay.stop().await.success(), "{}", relay.logs());
}

#[tokio::test]
async fn metrics_count_deliveries_and_latency() {
    let f = Fixture::new().await;
    let port = crate::support::free_port();
    let mut relay = f.relay().metrics_on(port).start().await;
    let mut seq = 0;
    let written = f.write_many(50, 5, 3, &mut seq).await;
    f.read(50).await;
    let text = wait_for(
        "50 deliveries in the metrics",
        Duration::from_secs(30),
        || async {
            let text = scrape(port).await.ok()?;
            (metric(&text, "outbox_relay_events_delivered_total")? >= 50.0).then_some(text)
        },
    )
    .await;
    assert_eq!(
        metric(&text, "outbox_relay_events_delivered_total"),
        Some(written.len() as f64)
    );
    assert_eq!(
        metric(&text, "outbox_relay_commit_to_ack_seconds_count"),
        Some(50.0),
        "{text}"
    );
    assert!(
        metric(&text, "outbox_relay_confirmed_lsn").unwrap() > 0.0,
        "{text}"
    );
    assert!(
        text.contains("outbox_relay_commit_to_ack_seconds_bucket{le=\"+Inf\"} 50"),
        "{text}"
    );
    // Each event's latency is also split at its arrival at the relay.
    assert_eq!(
        metric(&text, "outbox_relay_receive_to_ack_seconds_count"),
        Some(50.0),
        "{text}"
    );
    // The endpoint speaks OpenMetrics, which Prometheus asks for, and
    // answers 404 elsewhere.
    let metrics = get(port, "/metrics").await.unwrap();
    assert_eq!(
        metrics.content_type.as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(metrics.body.ends_with("# EOF\n"), "{}", metrics.body);
    let other = get(port, "/").await.unwrap();
    assert_eq!(other.status, 404, "{other:?}");
    assert!(other.body.contains("GET /metrics"), "{other:?}");
    assert!(relay.stop().await.success());
}

/// Eight writers committing back to back while the relay streams: every
/// event arrives once, in order per aggregate, and each one's latency is
/// also counted from its arrival at the relay.
#[tokio::test]
async fn concurrent_writers_back_to_back_arrive_once_in_order() {
    let f = Fixture::new().await;
    let port = crate::support::free_port();
    let mut relay = f.relay().metrics_on(port).start().await;
    // Eight writers, each with its own aggregates; every tenth transaction
    // holds three events of one aggregate.
    async fn writer(f: &Fixture, w: u64) -> Vec<crate::support::fixture::Written> {
        let mut written = Vec::new();
        let mut seq = 0;
        for i in 0..50 {
            let aggregate = format!("w{w}-a{}", i % 4);
            let rows = if i % 10 == 9 { 3 } else { 1 };
            let items: Vec<(String, u64)> = (0..rows)
                .map(|_| {
                    seq += 1;
                    (aggregate.clone(), seq)
                })
                .collect();
            written.extend(f.write_tx(&items).await);
        }
        written
    }
    let all = tokio::join!(
        writer(&f, 0),
        writer(&f, 1),
        writer(&f, 2),
        writer(&f, 3),
        writer(&f, 4),
        writer(&f, 5),
        writer(&f, 6),
        writer(&f, 7)
    );
    let written: Vec<_> = [all.0, all.1, all.2, all.3, all.4, all.5, all.6, all.7]
        .into_iter()
        .flatten()
        .collect();
    let records = f.read(written.len()).await;
    assert_exactly_once(&written, &records);
    assert_records_match(&written, &records);
    let total = written.len() as f64;
    let text = wait_for(
        "every delivery in the metrics",
        Duration::from_secs(30),
        || async {
            let text = scrape(port).await.ok()?;
            (metric(&text, "outbox_relay_events_delivered_total")? >= total).then_some(text)
        },
    )
    .await;
    assert_eq!(
        metric(&text, "outbox_relay_receive_to_ack_seconds_count"),
        Some(total),
        "{text}"
    );
    assert!(relay.stop().await.success(), "{}", relay.logs());
}

/// SIGTERM while a large transaction is being streamed: the relay reads on
/// to its commit (within half the shutdown timeout), waits for the
/// acknowledgements, confirms and exits 0; the next start loses nothing.
#[tokio::test]
async fn sigterm_inside_a_large_open_transaction_loses_nothing() {
    let f = Fixture::new().await;
    let mut relay = f.relay().start().await;
    let rows = 60_000i64;
    let agg = f.aggregate_type.clone();
    let pool = f.pool.clone();
    let insert = tokio::spawn(async move {
        sqlx::query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT $1, 'k' || (g % 5), 'Happened', jsonb_build_object('n', g) \
             FROM generate_series(1, $2) g",
        )
        .bind(agg)
        .bind(rows)
        .execute(&pool)
        .await
        .unwrap();
    });
    insert.await.unwrap();
    // Stop once the transaction is being published, before its commit is read.
    relay.wait_log(" published ", Duration::from_secs(60)).await;
    let status = relay.stop().await;
    let logs = relay.logs();
    assert!(status.success(), "{logs}");
    let mut relay = f.relay().spawn();
    let records = crate::support::kafka::consume_settle(
        &f.tansu.brokers(),
        &[&f.topic()],
        rows as usize,
        Duration::from_secs(300),
        Duration::from_secs(2),
    )
    .await;
    assert!(relay.stop().await.success(), "{}", relay.logs());
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut seen = HashSet::new();
    let mut sorted: Vec<_> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    for r in sorted {
        if !seen.insert(r.id().to_owned()) {
            continue;
        }
        let n = r.value_json()["n"].as_i64().unwrap();
        let prev = last.insert(r.key.clone().unwrap(), n).unwrap_or(0);
        assert!(n > prev, "key {:?}: {n} after {prev}", r.key);
    }
    assert_eq!(seen.len() as i64, rows, "events lost");
    eprintln!(
        "SIGTERM inside a {rows}-row transaction: stopped {}; {} duplicates",
        if logs.contains("reading on to its commit") {
            "mid-transaction"
        } else {
            "after its commit"
        },
        records.len() - seen.len()
    );
}
