//! Faults users hit in production: crashes at random points, broker outages,
//! connections cut. After each, the set of event ids in Kafka equals the set
//! committed, and each aggregate's events are in commit order.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::RDKafkaRespErr;
use sqlx::PgPool;

use crate::support::fixture::{Fixture, Written, assert_records_match};
use crate::support::kafka::{consume_settle, create_topic};
use crate::support::metrics::{metric, scrape};
use crate::support::postgres::{confirmed_flush, lsn_after};
use crate::support::proxy::Proxy;
use crate::support::{Postgres, RelayBuilder, Tansu, unique, wait_for};

/// Writes `n` events in transactions of 1-20 over this writer's own five
/// aggregates, so commit order per aggregate is this writer's order.
async fn writer(f: &Fixture, id: usize, n: usize) -> Vec<Written> {
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut out = Vec::new();
    let mut seq = (id as u64) * 1_000_000;
    while out.len() < n {
        let size = rng.random_range(1..=20usize).min(n - out.len());
        let items: Vec<(String, u64)> = (0..size)
            .map(|_| {
                seq += 1;
                (format!("w{id}-{}", rng.random_range(0..5)), seq)
            })
            .collect();
        out.extend(f.write_tx(&items).await);
    }
    out
}

fn count_published(logs: &str) -> usize {
    logs.matches(" published ").count()
}

fn duplicates(records: &[crate::support::Record]) -> usize {
    let unique: HashSet<&str> = records.iter().map(|r| r.id()).collect();
    records.len() - unique.len()
}

fn assert_all_arrived(written: &[Written], records: &[crate::support::Record]) {
    let got: HashSet<&str> = records.iter().map(|r| r.id()).collect();
    let want: HashSet<&str> = written.iter().map(|w| w.id.as_str()).collect();
    let lost: Vec<&&str> = want.difference(&got).collect();
    assert!(
        lost.is_empty(),
        "{} events lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    assert_eq!(
        got.len(),
        want.len(),
        "records that were never written arrived"
    );
    assert_records_match(written, records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kills_during_concurrent_writes_lose_nothing() {
    const WINDOW: usize = 1000;
    let f = Fixture::new().await;
    let relay = |f: &Fixture| {
        f.relay()
            .arg("--max-in-flight")
            .arg(WINDOW.to_string())
            .spawn()
    };
    let mut current = relay(&f);
    current.wait_streaming().await;

    let writers = async {
        let (a, b, c, d) = tokio::join!(
            writer(&f, 1, 5000),
            writer(&f, 2, 5000),
            writer(&f, 3, 5000),
            writer(&f, 4, 5000)
        );
        [a, b, c, d].concat()
    };
    let killer = async {
        let mut rng = rand::rngs::StdRng::from_os_rng();
        for kill in 0..20 {
            // Kill after a random number of events published by this run (or
            // after a while when the writers are done and the stream is idle).
            let target = rng.random_range(20..600);
            let deadline =
                std::time::Instant::now() + Duration::from_secs(if kill < 15 { 30 } else { 3 });
            while count_published(&current.logs()) < target && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            current.kill9().await;
            current = relay(&f);
        }
        current
    };
    let (written, mut last) = tokio::join!(writers, killer);
    assert_eq!(written.len(), 20_000);

    let records = consume_settle(
        &f.tansu.brokers(),
        &[&f.topic()],
        20_000,
        Duration::from_secs(300),
        Duration::from_secs(3),
    )
    .await;
    assert!(last.stop().await.success(), "{}", last.logs());
    assert_all_arrived(&written, &records);
    let dups = duplicates(&records);
    eprintln!(
        "20 kills: 20000 events, {} records, {dups} duplicates (window {WINDOW})",
        records.len()
    );
    // Each crash replays at most what was sent but not yet confirmed: the
    // window, plus what was acknowledged in the last 100 ms of feedback.
    assert!(
        dups <= 20 * 2 * WINDOW,
        "{dups} duplicates exceed 20 kills x 2 windows"
    );
}

/// PostgreSQL with a migrated database, for tests that bring their own broker.
async fn database() -> (Postgres, String, PgPool) {
    database_with(Default::default()).await
}

/// A database whose walsender gives up on a silent relay after 3 s.
async fn database_with_short_wal_sender_timeout() -> (Postgres, String, PgPool) {
    database_with(crate::support::postgres::Settings {
        extra: vec![("wal_sender_timeout".into(), "3s".into())],
        ..Default::default()
    })
    .await
}

async fn database_with(settings: crate::support::postgres::Settings) -> (Postgres, String, PgPool) {
    crate::support::init_logging();
    let pg = Postgres::start_with(settings);
    let url = pg.create_migrated_database(&unique("db")).await;
    let pool = PgPool::connect(&url).await.unwrap();
    (pg, url, pool)
}

/// One event (`seq`) written and read back: the relay's connection and
/// the topic's metadata are warm before a fault is injected.
async fn warm_up(pool: &PgPool, brokers: &str, aggregate_type: &str, seq: i64) {
    insert(pool, aggregate_type, seq, seq).await;
    let topic = format!("outbox.event.{aggregate_type}");
    consume_settle(
        brokers,
        &[&topic],
        1,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
}

async fn insert(pool: &PgPool, aggregate_type: &str, from: i64, to: i64) {
    sqlx::query(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT $1, 'k' || (g % 7), 'Happened', jsonb_build_object('seq', g) FROM generate_series($2::bigint, $3::bigint) g",
    )
    .bind(aggregate_type)
    .bind(from)
    .bind(to)
    .execute(pool)
    .await
    .unwrap();
}

async fn current_lsn(pool: &PgPool) -> String {
    sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Every seq from 1 to `n` arrived, and per key they are in order.
fn assert_seqs(records: &[crate::support::Record], n: i64) {
    let seqs: HashSet<i64> = records
        .iter()
        .map(|r| r.value_json()["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs.len() as i64, n, "missing events");
    let mut last: HashMap<(String, i32), i64> = HashMap::new();
    let mut seen = HashSet::new();
    let mut sorted: Vec<_> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    for r in sorted {
        let seq = r.value_json()["seq"].as_i64().unwrap();
        if !seen.insert(seq) {
            continue;
        }
        let prev = last
            .insert((r.key.clone().unwrap(), r.partition), seq)
            .unwrap_or(0);
        assert!(seq > prev, "key {:?}: {seq} after {prev}", r.key);
    }
}

/// A Tansu broker reached only through a proxy (it advertises the proxy's
/// address), so the test can take it down and bring it back at the same
/// address (`proxy.down()`, `proxy.up()`) with its records kept. Returns
/// the bootstrap address.
async fn broker_behind_proxy() -> (Tansu, Proxy, String) {
    // The proxy's port is bound before Tansu is told to advertise it, so
    // nothing can take it meanwhile; it forwards once Tansu's port is known.
    let proxy = Proxy::start(None, 0).await;
    let tansu = Tansu::start_advertising(proxy.port);
    proxy.retarget(tansu.port);
    let brokers = format!("127.0.0.1:{}", proxy.port);
    (tansu, proxy, brokers)
}

/// Path 2 of issue 9: librdkafka never gives up on a record by itself
/// (`message.timeout.ms=0`, proved by `publish::tests`), so an outage is
/// waited out with every aggregate's events in order, the stall is reported
/// (`--stall-warning`), and nothing is confirmed past the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_is_waited_out_without_confirming_ahead() {
    let (_pg, url, pool) = database().await;
    let (_tansu, broker, brokers) = broker_behind_proxy().await;
    let agg = unique("agg");
    let topic = format!("outbox.event.{agg}");
    create_topic(&brokers, &topic, 3).await;
    let slot = unique("slot");
    let port = crate::support::free_port();
    let mut relay = RelayBuilder::new(&url, &brokers, &slot)
        .arg("--stall-warning")
        .arg("3s")
        .metrics_on(port)
        .start()
        .await;

    insert(&pool, &agg, 1, 500).await;
    consume_settle(
        &brokers,
        &[&topic],
        500,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    // Wait until the relay recorded its last event (its own WAL) and the
    // slot confirmed everything so far, then take the broker down.
    crate::support::postgres::wait_recorded(&pool, &slot).await;
    let caught_up = current_lsn(&pool).await;
    wait_confirmed(&url, &slot, &caught_up, "the slot to catch up").await;
    broker.down();
    let down_at = current_lsn(&pool).await;
    // Writes go on during 30 s of outage.
    for i in 0..6 {
        insert(&pool, &agg, 501 + i * 100, 600 + i * 100).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let confirmed = confirmed_flush(&url, &slot).await.unwrap();
    assert!(
        !lsn_after(&url, &confirmed, &down_at).await,
        "confirmed {confirmed} past {down_at} while the broker was down"
    );
    assert!(
        relay
            .logs()
            .contains("kafka has not acknowledged the oldest event handed to it"),
        "the stall was not reported:\n{}",
        relay.logs()
    );
    let stalled = scrape(port)
        .await
        .ok()
        .and_then(|text| metric(&text, "outbox_relay_delivery_stalled_seconds"));
    assert!(
        stalled.is_some_and(|s| s >= 3.0),
        "outbox_relay_delivery_stalled_seconds = {stalled:?}"
    );
    broker.up();
    let records = consume_settle(
        &brokers,
        &[&topic],
        1100,
        Duration::from_secs(120),
        Duration::from_secs(2),
    )
    .await;
    assert_seqs(&records, 1100);
    assert!(relay.stop().await.success(), "{}", relay.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_with_durable_storage_loses_nothing() {
    let (_pg, url, pool) = database().await;
    let mut tansu = Tansu::start_durable();
    let agg = unique("agg");
    let topic = format!("outbox.event.{agg}");
    let slot = unique("slot");
    let mut relay = RelayBuilder::new(&url, &tansu.brokers(), &slot)
        .start()
        .await;
    insert(&pool, &agg, 1, 300).await;
    consume_settle(
        &tansu.brokers(),
        &[&topic],
        300,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;

    // The relay's bookkeeping write for the 300th event is WAL of its own,
    // which the slot may rightly confirm: wait for it, so that the mark
    // taken next has only the outage's events after it.
    crate::support::postgres::wait_recorded(&pool, &slot).await;
    tansu.stop();
    let down_at = current_lsn(&pool).await;
    for i in 0..6 {
        insert(&pool, &agg, 301 + i * 100, 400 + i * 100).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let confirmed = confirmed_flush(&url, &slot).await.unwrap();
    assert!(
        !lsn_after(&url, &confirmed, &down_at).await,
        "confirmed past the outage"
    );
    tansu.restart();
    let records = consume_settle(
        &tansu.brokers(),
        &[&topic],
        900,
        Duration::from_secs(180),
        Duration::from_secs(2),
    )
    .await;
    assert_seqs(&records, 900);
    assert!(relay.stop().await.success(), "{}", relay.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_to_postgres_and_kafka_lose_nothing() {
    let pg = Postgres::start();
    let url = pg.create_migrated_database(&unique("db")).await;
    let pool = PgPool::connect(&url).await.unwrap();
    let pg_proxy = Proxy::start(None, pg.port).await;
    let kafka_port = crate::support::free_port();
    let tansu = Tansu::start_advertising(kafka_port);
    let kafka_proxy = Proxy::start(Some(kafka_port), tansu.port).await;
    let brokers = format!("127.0.0.1:{kafka_port}");

    let agg = unique("agg");
    let topic = format!("outbox.event.{agg}");
    let proxied_url = url.replace(&format!(":{}/", pg.port), &format!(":{}/", pg_proxy.port));
    let mut relay = RelayBuilder::new(&proxied_url, &brokers, &unique("slot"))
        .start()
        .await;

    let mut next = 1;
    for round in 0..6 {
        // Counted before the insert: the relay may publish the whole round
        // before the test reads its log again (the old order then waited for
        // a publish that never came).
        let before = count_published(&relay.logs());
        insert(&pool, &agg, next, next + 199).await;
        next += 200;
        wait_for("the relay to publish", Duration::from_secs(60), || async {
            (count_published(&relay.logs()) > before).then_some(())
        })
        .await;
        // After a cut the relay reconnects with backoff, and the publish seen
        // above may be its replay: wait until it is connected again.
        let proxy = if round % 2 == 0 {
            &pg_proxy
        } else {
            &kafka_proxy
        };
        wait_for("a connection to cut", Duration::from_secs(60), || async {
            (proxy.live() > 0).then_some(())
        })
        .await;
        let cut = proxy.cut();
        assert!(cut > 0, "round {round}: no connection to cut");
    }
    let records = consume_settle(
        &brokers,
        &[&topic],
        (next - 1) as usize,
        Duration::from_secs(180),
        Duration::from_secs(2),
    )
    .await;
    assert_seqs(&records, next - 1);
    assert!(
        relay.logs().contains("resuming from the slot"),
        "the postgres cuts were noticed"
    );
    assert!(relay.stop().await.success(), "{}", relay.logs());
}

/// Nothing reaches `topic` (a dead-letter topic that must stay empty),
/// read for two seconds after it is found.
async fn assert_no_records(brokers: &str, topic: &str) {
    let records = consume_settle(
        brokers,
        &[topic],
        0,
        Duration::from_secs(30),
        Duration::from_secs(2),
    )
    .await;
    assert!(records.is_empty(), "records reached {topic}: {records:?}");
}

/// Waits until the slot has confirmed at least `lsn`.
async fn wait_confirmed(url: &str, slot: &str, lsn: &str, what: &str) {
    wait_for(what, Duration::from_secs(30), || async {
        let c = confirmed_flush(url, slot).await?;
        (!lsn_after(url, lsn, &c).await).then_some(())
    })
    .await;
}

/// A relay on a mock cluster that delivered event seq 1 of a fresh aggregate
/// and confirmed it; then the broker refuses the next Produce request in its
/// delivery report (`INVALID_RECORD`, not at hand-over) and event seq 2 is
/// written.
struct BrokerRefusal {
    /// The WAL position just before the refused event was written.
    mark: String,
    _pg: Postgres,
    url: String,
    pool: PgPool,
    mock: MockCluster<'static, DefaultProducerContext>,
    agg: String,
    topic: String,
    /// The dead-letter topic, when the relay runs with one.
    dlt: Option<String>,
    slot: String,
    relay: crate::support::relay::Relay,
    refused_id: String,
}

impl BrokerRefusal {
    /// The broker refuses the next Produce requests with `errors` (one per
    /// request), and events seq 2 to `last` are written in one transaction.
    async fn start(dead_letter: bool, errors: &[RDKafkaRespErr], last: i64) -> Self {
        use rdkafka::types::RDKafkaApiKey;

        let (pg, url, pool) = database().await;
        let mock = MockCluster::<DefaultProducerContext>::new(1).unwrap();
        let agg = unique("agg");
        let topic = format!("outbox.event.{agg}");
        mock.create_topic(&topic, 1, 1).unwrap();
        let slot = unique("slot");
        let mut builder = RelayBuilder::new(&url, &mock.bootstrap_servers(), &slot);
        let dlt = dead_letter.then(|| format!("{topic}.dlt"));
        if let Some(dlt) = &dlt {
            mock.create_topic(dlt, 1, 1).unwrap();
            builder = builder
                .arg("--on-undeliverable=dead-letter")
                .arg(format!("--dead-letter-topic={dlt}"));
        }
        let relay = builder.start().await;

        // Warm up (connection, metadata), so the next Produce request is seq 2's.
        insert(&pool, &agg, 1, 1).await;
        consume_settle(
            &mock.bootstrap_servers(),
            &[&topic],
            1,
            Duration::from_secs(60),
            Duration::ZERO,
        )
        .await;
        let before = current_lsn(&pool).await;
        wait_confirmed(&url, &slot, &before, "the slot to catch up").await;
        mock.request_errors(RDKafkaApiKey::Produce, errors);
        crate::support::postgres::wait_recorded(&pool, &slot).await;
        let mark = current_lsn(&pool).await;
        insert(&pool, &agg, 2, last).await;
        let refused_id: String =
            sqlx::query_scalar("SELECT id::text FROM outbox WHERE (payload->>'seq')::int = 2")
                .fetch_one(&pool)
                .await
                .unwrap();
        Self {
            mark,
            _pg: pg,
            url,
            pool,
            mock,
            agg,
            topic,
            dlt,
            slot,
            relay,
            refused_id,
        }
    }
}

const INVALID_RECORD: RDKafkaRespErr = RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD;

/// A record the broker refuses in its delivery report, also when it is sent
/// on its own: under `--on-undeliverable dead-letter` it goes to the
/// dead-letter topic in its place, the stream goes on, and the slot
/// confirms past it only once the dead letter is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_refuses_is_dead_lettered_in_its_place() {
    // Held whole: the clusters live as long as the test. Two refusals: the
    // batch, then the record on its own.
    let mut r = BrokerRefusal::start(true, &[INVALID_RECORD, INVALID_RECORD], 2).await;
    let dlt = r.dlt.clone().expect("started with a dead-letter topic");
    let letters = consume_settle(
        &r.mock.bootstrap_servers(),
        &[&dlt],
        1,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    assert_eq!(letters.len(), 1, "{}", r.relay.logs());
    let letter = &letters[0];
    assert_eq!(letter.id(), r.refused_id);
    assert_eq!(letter.value_json()["seq"], 2, "the payload is kept");
    assert!(
        letter
            .header("outbox.error")
            .is_some_and(|e| e.contains(&r.refused_id)),
        "{:?}",
        letter.header("outbox.error")
    );
    assert_eq!(
        letter.header("outbox.original_topic"),
        Some(r.topic.as_str())
    );

    // The stream goes on, and the slot confirms past everything.
    insert(&r.pool, &r.agg, 3, 5).await;
    let end = current_lsn(&r.pool).await;
    let records = consume_settle(
        &r.mock.bootstrap_servers(),
        &[&r.topic],
        4,
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    let seqs: HashSet<i64> = records
        .iter()
        .map(|rec| rec.value_json()["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, HashSet::from([1, 3, 4, 5]), "{}", r.relay.logs());
    wait_confirmed(
        &r.url,
        &r.slot,
        &end,
        "the slot to confirm past the dead letter",
    )
    .await;
    assert!(r.relay.stop().await.success(), "{}", r.relay.logs());
    assert!(
        r.relay.logs().contains("dead_lettered=1"),
        "{}",
        r.relay.logs()
    );
}

/// Path 3 of issue 9: the same refusal under the default policy stops the
/// relay (exit 1) naming the event, without confirming past it, and nothing
/// written after it reaches Kafka (the old relay flushed the records behind
/// it at exit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_refuses_stops_the_relay_by_default() {
    let mut r = BrokerRefusal::start(false, &[INVALID_RECORD, INVALID_RECORD], 2).await;
    insert(&r.pool, &r.agg, 3, 5).await;
    let status = r.relay.wait_exit(Duration::from_secs(60)).await;
    let logs = r.relay.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(
        logs.contains(&format!("kafka did not accept event {}", r.refused_id)),
        "{logs}"
    );
    let confirmed = confirmed_flush(&r.url, &r.slot).await.unwrap();
    assert!(
        !lsn_after(&r.url, &confirmed, &r.mark).await,
        "confirmed {confirmed} past the refused event (written after {})",
        r.mark
    );
    let records = consume_settle(
        &r.mock.bootstrap_servers(),
        &[&r.topic],
        1,
        Duration::from_secs(30),
        Duration::from_secs(2),
    )
    .await;
    let seqs: Vec<i64> = records
        .iter()
        .map(|rec| rec.value_json()["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1], "records after the refused one reached kafka");
}

/// Paths 3 and 4 of issue 9: the broker refuses a whole batch once (here as
/// too large, as a topic's `max.message.bytes` does for a batch). librdkafka
/// fails every record of it; the old relay dead-lettered them all (valid
/// events, values dropped) and sent the later records ahead of them. Now
/// the refused records are resent one by one, each is accepted on its own,
/// nothing is dead-lettered, and every event arrives in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_once_is_resent_in_order_and_parks_nothing() {
    let too_large = RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE;
    let mut r = BrokerRefusal::start(true, &[too_large], 20).await;
    insert(&r.pool, &r.agg, 21, 40).await;
    let records = consume_settle(
        &r.mock.bootstrap_servers(),
        &[&r.topic],
        40,
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .await;
    assert_seqs(&records, 40);
    let dlt = r.dlt.clone().expect("a dead-letter topic");
    assert_no_records(&r.mock.bootstrap_servers(), &dlt).await;
    let logs = r.relay.logs();
    assert!(logs.contains("sending it on its own"), "{logs}");
    assert!(r.relay.stop().await.success(), "{logs}");
}

/// Path 7 of issue 9: a permanent error the relay has no class for
/// (`INVALID_REQUEST`) neither loops republishing the tail (the old relay
/// retried it forever) nor parks the event: the relay sends the record on
/// its own, and when that is refused too it stops naming the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unclassified_refusal_stops_the_relay_instead_of_looping() {
    let invalid = RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_REQUEST;
    let mut r = BrokerRefusal::start(true, &[invalid, invalid], 2).await;
    let status = r.relay.wait_exit(Duration::from_secs(60)).await;
    let logs = r.relay.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(
        logs.contains(&format!("kafka did not accept event {}", r.refused_id)),
        "{logs}"
    );
    let confirmed = confirmed_flush(&r.url, &r.slot).await.unwrap();
    assert!(!lsn_after(&r.url, &confirmed, &r.mark).await);
    let dlt = r.dlt.clone().expect("a dead-letter topic");
    assert_no_records(&r.mock.bootstrap_servers(), &dlt).await;
}

/// Path 8 of issue 9: a stop while Kafka is down waits at most
/// `--shutdown-timeout`, confirms nothing it did not get acknowledged, and
/// exits 1 saying so (the old relay exited 0). The events are delivered by
/// the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_unacknowledged_events_exits_non_zero() {
    let (_pg, url, pool) = database().await;
    let (_tansu, broker, brokers) = broker_behind_proxy().await;
    let agg = unique("agg");
    let topic = format!("outbox.event.{agg}");
    create_topic(&brokers, &topic, 1).await;
    let slot = unique("slot");
    let builder = RelayBuilder::new(&url, &brokers, &slot)
        .arg("--shutdown-timeout")
        .arg("3s");
    let mut relay = builder.start().await;
    // Warm up (connection, topic metadata), then take the broker down.
    warm_up(&pool, &brokers, &agg, 0).await;
    let caught_up = current_lsn(&pool).await;
    wait_confirmed(&url, &slot, &caught_up, "the slot to catch up").await;
    crate::support::postgres::wait_recorded(&pool, &slot).await;
    broker.down();
    let mark = current_lsn(&pool).await;
    insert(&pool, &agg, 1, 50).await;
    // The warm-up event already logged one " published ": wait for the next
    // transaction's, or the stop can come before it is read (and exit 0).
    relay
        .wait_log_count(" published ", 2, Duration::from_secs(30))
        .await;
    let started = std::time::Instant::now();
    let status = relay.stop().await;
    let logs = relay.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    // One --shutdown-timeout (3 s) from the stop request for every step
    // (waiting for acknowledgements, flushing, the last bookkeeping write),
    // not one per step: before, this stop took 6 s and more.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the stop took {:?} with --shutdown-timeout 3s",
        started.elapsed()
    );
    assert!(logs.contains("did not acknowledge"), "{logs}");
    let confirmed = confirmed_flush(&url, &slot).await.unwrap();
    assert!(!lsn_after(&url, &confirmed, &mark).await);
    broker.up();
    let mut relay = builder.spawn();
    let records = consume_settle(
        &brokers,
        &[&topic],
        51,
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    let records: Vec<_> = records
        .into_iter()
        .filter(|r| r.value_json()["seq"] != 0)
        .collect();
    assert_seqs(&records, 50);
    assert!(relay.stop().await.success(), "{}", relay.logs());
}

/// Paths 1, 2 and 8 of issue 9: a first-start backfill that waits on a full
/// window (the broker is down) reports the stall, SIGTERM is honoured within
/// the shutdown timeout, the slot stays, and the next start delivers every
/// row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_stalled_backfill_is_honoured_and_loses_nothing() {
    let (_pg, url, pool) = database().await;
    let (_tansu, broker, brokers) = broker_behind_proxy().await;
    let agg = unique("agg");
    let topic = format!("outbox.event.{agg}");
    create_topic(&brokers, &topic, 2).await;
    insert(&pool, &agg, 1, 30_000).await;
    let slot = unique("slot");
    let builder = RelayBuilder::new(&url, &brokers, &slot)
        .arg("--max-in-flight")
        .arg("10")
        .arg("--shutdown-timeout")
        .arg("3s")
        .arg("--stall-warning")
        .arg("1s");
    let mut relay = builder.spawn();
    // The backfill is publishing (window of 10): take the broker down.
    consume_settle(
        &brokers,
        &[&topic],
        10,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    broker.down();
    // The backfill reports the stall like the stream does.
    relay
        .wait_log(
            "kafka has not acknowledged the oldest event handed to it",
            Duration::from_secs(30),
        )
        .await;
    assert!(
        !relay.logs().contains("backfill complete"),
        "{}",
        relay.logs()
    );
    let started = std::time::Instant::now();
    let status = relay.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the stop took {:?}",
        started.elapsed()
    );
    assert_eq!(status.code(), Some(1), "{}", relay.logs());
    assert!(
        confirmed_flush(&url, &slot).await.is_some(),
        "the slot was dropped"
    );
    broker.up();
    let mut relay = RelayBuilder::new(&url, &brokers, &slot).spawn();
    relay
        .wait_log("backfill complete", Duration::from_secs(120))
        .await;
    let records = consume_settle(
        &brokers,
        &[&topic],
        30_000,
        Duration::from_secs(300),
        Duration::from_secs(1),
    )
    .await;
    eprintln!(
        "continued after: {:?}",
        relay
            .logs()
            .lines()
            .find(|l| l.contains("continuing an interrupted backfill"))
    );
    assert_seqs(&records, 30_000);
    assert!(relay.stop().await.success(), "{}", relay.logs());
}

/// Path 6 of issue 9: a topic that disappears while the relay runs (the
/// broker answers "unknown topic" for it from now on) is configuration, not
/// a bad event: under the dead-letter policy too (the old relay parked the
/// event), the relay stops naming the topic, parks nothing, and confirms
/// nothing past the event. The topic cache does not hide the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_that_disappears_stops_the_relay_and_parks_nothing() {
    let (_pg, url, pool) = database().await;
    let mock = MockCluster::<DefaultProducerContext>::new(1).unwrap();
    let agg = unique("agg");
    let topic = format!("outbox.event.{agg}");
    let dlt = format!("{topic}.dlt");
    mock.create_topic(&topic, 1, 1).unwrap();
    mock.create_topic(&dlt, 1, 1).unwrap();
    let slot = unique("slot");
    let mut relay = RelayBuilder::new(&url, &mock.bootstrap_servers(), &slot)
        .without_create_topics()
        .arg("--on-undeliverable=dead-letter")
        .arg(format!("--dead-letter-topic={dlt}"))
        // How long librdkafka waits for a topic it was told is unknown to
        // reappear before failing its records (30 s by default).
        .arg("--kafka-option=topic.metadata.propagation.max.ms=2000")
        .spawn();
    relay.wait_streaming().await;
    insert(&pool, &agg, 1, 1).await;
    consume_settle(
        &mock.bootstrap_servers(),
        &[&topic],
        1,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    // Metadata says the topic is gone, and so do Produce requests.
    let unknown = RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART;
    mock.topic_error(&topic, unknown).unwrap();
    mock.request_errors(rdkafka::types::RDKafkaApiKey::Produce, &[unknown; 50]);
    crate::support::postgres::wait_recorded(&pool, &slot).await;
    let mark = current_lsn(&pool).await;
    insert(&pool, &agg, 2, 3).await;
    let status = relay.wait_exit(Duration::from_secs(120)).await;
    let logs = relay.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(
        logs.contains(&format!("kafka topic `{topic}` does not exist")),
        "{logs}"
    );
    let confirmed = confirmed_flush(&url, &slot).await.unwrap();
    assert!(
        !lsn_after(&url, &confirmed, &mark).await,
        "confirmed {confirmed} past the events written at {mark}"
    );
    assert_no_records(&mock.bootstrap_servers(), &dlt).await;
}

/// Events large enough that their bytes, not their count, fill the window
/// (5,000 of 8 KiB, 40 MiB, with `--max-in-flight` 100,000 and the default
/// 32 MiB of `--max-in-flight-bytes`): while the broker is down, the stream
/// stops reading at about 32 MiB, in its loop, where status updates and
/// stall warnings go on.
/// Before, librdkafka's own 32 MiB queue filled first and refused the next
/// record in the middle of handling a message; the wait for room stopped the
/// loop, so the walsender timed out and no stall warning was logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_full_of_large_events_keeps_the_walsender_from_timing_out() {
    let (pg, url, pool) = database_with_short_wal_sender_timeout().await;
    let (_tansu, broker, brokers) = broker_behind_proxy().await;
    let agg = unique("agg");
    let topic = format!("outbox.event.{agg}");
    create_topic(&brokers, &topic, 3).await;
    let slot = unique("slot");
    let port = crate::support::free_port();
    let relay = RelayBuilder::new(&url, &brokers, &slot)
        .args(["--stall-warning", "2s", "--max-in-flight", "100000"])
        .metrics_on(port)
        .start()
        .await;
    // Warm up (connection, topic metadata), then take the broker down.
    warm_up(&pool, &brokers, &agg, 1).await;
    broker.down();
    // 5,000 events of 8 KiB: 40 MiB, more than the window's bytes, in
    // transactions of 500 with several rows per key.
    for batch in 0..10i64 {
        sqlx::query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT $1, 'k' || (g % 7), 'Happened', \
                    jsonb_build_object('seq', g, 'pad', repeat('x', 8192)) \
             FROM generate_series($2::bigint, $3::bigint) g",
        )
        .bind(&agg)
        .bind(2 + batch * 500)
        .bind(1 + (batch + 1) * 500)
        .execute(&pool)
        .await
        .unwrap();
    }
    // The window fills, then the outage lasts longer than wal_sender_timeout.
    relay
        .wait_log(
            "kafka has not acknowledged the oldest event",
            Duration::from_secs(60),
        )
        .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    // Reading stopped at the window's bytes: each event weighs about 8.4 KiB
    // (payload, key, headers), so about 3,900 fit in 32 MiB; the count
    // window (100,000) would have let all 5,000 through.
    let published = relay.logs().matches(" published ").count();
    assert!(
        (3_000..4_500).contains(&published),
        "{published} events handed to Kafka while it was down (the warm-up one included)"
    );
    // The metrics show the full window: every event handed over but the
    // acknowledged warm-up one, at least 32 MiB of them.
    let text = scrape(port).await.unwrap();
    assert_eq!(
        metric(&text, "outbox_relay_in_flight_events"),
        Some((published - 1) as f64),
        "{text}"
    );
    let bytes = metric(&text, "outbox_relay_in_flight_bytes").unwrap_or_default();
    assert!(
        bytes >= (32 << 20) as f64,
        "{bytes} bytes in flight:\n{text}"
    );
    broker.up();
    assert_outage_waited_out(relay, &pg, &brokers, &topic, 5001).await;
}

/// After an outage that filled the relay's window: every event arrived, in
/// order per key, the stream was never dropped (no walsender timeout, no
/// session restart), and the relay stops cleanly.
async fn assert_outage_waited_out(
    mut relay: crate::support::relay::Relay,
    pg: &Postgres,
    brokers: &str,
    topic: &str,
    n: i64,
) {
    let records = consume_settle(
        brokers,
        &[topic],
        n as usize,
        Duration::from_secs(120),
        Duration::from_secs(1),
    )
    .await;
    assert_seqs(&records, n);
    let logs = relay.logs();
    assert!(
        !logs.contains("resuming from the slot"),
        "the stream was dropped while waiting:\n{logs}"
    );
    assert!(
        !pg.log()
            .contains("terminating walsender process due to replication timeout"),
        "{}",
        pg.log()
    );
    assert!(relay.stop().await.success(), "{logs}");
}

/// Path 8 of issue 9: while the relay waits on Kafka (no answers, window
/// full), standby status updates keep flowing, so a short
/// `wal_sender_timeout` never drops a healthy relay's stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_on_kafka_keeps_the_walsender_from_timing_out() {
    let (pg, url, pool) = database_with_short_wal_sender_timeout().await;
    let mock = MockCluster::<DefaultProducerContext>::new(1).unwrap();
    let agg = unique("agg");
    let topic = format!("outbox.event.{agg}");
    mock.create_topic(&topic, 1, 1).unwrap();
    let slot = unique("slot");
    let relay = RelayBuilder::new(&url, &mock.bootstrap_servers(), &slot)
        .arg("--max-in-flight")
        .arg("20")
        .start()
        .await;
    insert(&pool, &agg, 1, 1).await;
    consume_settle(
        &mock.bootstrap_servers(),
        &[&topic],
        1,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;
    // Kafka stops answering: every response waits 12 s. (Not
    // broker_down/up: librdkafka's mock re-binds the listener's port then,
    // and aborts the whole test process when that fails.)
    mock.broker_round_trip_time(1, Duration::from_secs(12))
        .unwrap();
    // More than the window: the stream stops reading and waits.
    insert(&pool, &agg, 2, 200).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    mock.broker_round_trip_time(1, Duration::ZERO).unwrap();
    assert_outage_waited_out(relay, &pg, &mock.bootstrap_servers(), &topic, 200).await;
}
