//! The example consumer against real PostgreSQL and Tansu: redelivery,
//! consumer groups, poison records and crashes between the database commit
//! and the offset commit never apply an effect twice.

use std::process::Command;
use std::time::Duration;

use outbox_consumer_example::kitchen;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;

use crate::support::relay::{Relay, consumer_binary};
use crate::support::{Postgres, RelayBuilder, Tansu, unique, wait_for};

const TOPIC: &str = "outbox.event.ingredient";

/// A kitchen database with the consumer example's tables, a broker, and the
/// relay and consumer processes to run against them.
pub(crate) struct Stand {
    _pg: Postgres,
    tansu: Tansu,
    /// Where clients bootstrap: the broker, or a proxy in front of it.
    pub(crate) brokers: String,
    /// `key=value` client settings given to both the relay and the consumer.
    kafka_options: Vec<String>,
    pub(crate) url: String,
    pub(crate) pool: PgPool,
    slot: String,
}

impl Stand {
    pub(crate) async fn new() -> Self {
        let tansu = Tansu::start();
        let brokers = tansu.brokers();
        Self::with_broker(tansu, brokers, Vec::new()).await
    }

    /// A stand whose clients reach `tansu` at `brokers` with `kafka_options`.
    pub(crate) async fn with_broker(
        tansu: Tansu,
        brokers: String,
        kafka_options: Vec<String>,
    ) -> Self {
        crate::support::init_logging();
        let pg = Postgres::start();
        let url = pg.create_database(&unique("stand")).await;
        let pool = PgPool::connect(&url).await.unwrap();
        outbox_consumer_example::setup(&pool).await.unwrap();
        Self {
            _pg: pg,
            tansu,
            brokers,
            kafka_options,
            url,
            pool,
            slot: unique("slot"),
        }
    }

    pub(crate) fn relay_builder(&self) -> RelayBuilder {
        RelayBuilder::new(&self.url, &self.brokers, &self.slot).args(
            self.kafka_options
                .iter()
                .flat_map(|o| ["--kafka-option".to_owned(), o.clone()]),
        )
    }

    pub(crate) fn relay(&self) -> Relay {
        self.relay_builder().spawn()
    }

    pub(crate) fn consumer(&self, group: &str, crash_after: Option<u64>) -> Relay {
        let mut cmd = Command::new(consumer_binary());
        cmd.arg("consume")
            .args(
                self.kafka_options
                    .iter()
                    .flat_map(|o| ["--kafka-option", o.as_str()]),
            )
            .env("OUTBOX_DATABASE_URL", &self.url)
            .env("OUTBOX_KAFKA_BROKERS", &self.brokers)
            .env("OUTBOX_CONSUMER_GROUP", group)
            .env("OUTBOX_LOG", "info");
        if let Some(n) = crash_after {
            cmd.env("OUTBOX_CONSUMER_CRASH_AFTER_COMMITS", n.to_string());
        }
        Relay::spawn(cmd)
    }

    /// Seeds the stand and makes `steps` more changes; returns how many events.
    pub(crate) async fn cook(&self, steps: usize) -> usize {
        let mut n = kitchen::seed(&self.pool).await.unwrap().len();
        let mut rng = rand::rng();
        for _ in 0..steps {
            kitchen::step(&self.pool, &mut rng).await.unwrap();
            n += 1;
        }
        n
    }

    async fn scalar(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.unwrap()
    }

    pub(crate) async fn wait_applied(&self, n: usize) {
        wait_for(
            &format!("{n} events in the inbox"),
            Duration::from_secs(120),
            || async {
                (self.scalar("SELECT count(*) FROM inbox").await as usize >= n).then_some(())
            },
        )
        .await;
    }

    /// stock_view equals ingredients (stock and price), the proof that no
    /// delta was applied twice or missed.
    pub(crate) async fn assert_projection_matches(&self) {
        let mismatches = self
            .scalar(
                "SELECT count(*) FROM ingredients i FULL JOIN stock_view v ON v.name = i.name \
                 WHERE i.stock IS DISTINCT FROM v.stock OR i.unit_price_cents IS DISTINCT FROM v.unit_price_cents",
            )
            .await;
        assert_eq!(mismatches, 0, "stock_view differs from ingredients");
    }

    async fn snapshot(&self) -> Vec<(String, i32, i32)> {
        sqlx::query_as("SELECT name, stock, unit_price_cents FROM stock_view ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }
}

fn count_lines(process: &Relay, prefix: &str) -> usize {
    process
        .logs()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .count()
}

/// Points a consumer group back at the start of every partition, as
/// `kafka-consumer-groups --reset-offsets --to-earliest` would.
fn reset_group(brokers: &str, group: &str) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(TOPIC), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(TOPIC, p.id(), Offset::Offset(0))
            .unwrap();
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .expect("reset the group's offsets");
}

#[tokio::test]
async fn redelivery_from_the_earliest_offset_applies_nothing_twice() {
    let s = Stand::new().await;
    let mut relay = s.relay();
    let n = s.cook(60).await;
    let mut consumer = s.consumer("stock", None);
    s.wait_applied(n).await;
    s.assert_projection_matches().await;
    let before = s.snapshot().await;
    let alerts = s.scalar("SELECT count(*) FROM low_stock").await;
    assert!(consumer.stop().await.success(), "{}", consumer.logs());

    reset_group(&s.brokers, "stock");
    let mut again = s.consumer("stock", None);
    wait_for(
        "every record to be seen again",
        Duration::from_secs(120),
        || async { (count_lines(&again, "deduplicated") >= n).then_some(()) },
    )
    .await;
    assert_eq!(count_lines(&again, "applied"), 0, "{}", again.logs());
    assert_eq!(s.snapshot().await, before);
    assert_eq!(s.scalar("SELECT count(*) FROM inbox").await as usize, n);
    assert_eq!(s.scalar("SELECT count(*) FROM low_stock").await, alerts);
    assert!(again.stop().await.success());
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn two_consumers_in_a_group_apply_each_event_once_across_a_relay_crash() {
    let s = Stand::new().await;
    let mut relay = s.relay();
    let mut a = s.consumer("stock", None);
    let mut b = s.consumer("stock", None);
    // Cook once the relay streams, so the crash below lands mid-stream (events
    // written during its first start are published by the backfill instead).
    relay.wait_streaming().await;
    let mut n = s.cook(150).await;
    relay.wait_log(" published ", Duration::from_secs(60)).await;
    // Crash the relay mid-stream: it replays its unconfirmed tail, so the
    // consumers see duplicates.
    relay.kill9().await;
    let mut rng = rand::rng();
    for _ in 0..150 {
        kitchen::step(&s.pool, &mut rng).await.unwrap();
        n += 1;
    }
    let mut relay = s.relay();
    s.wait_applied(n).await;
    // Let any replayed duplicates drain, then check.
    relay.stop().await;
    s.assert_projection_matches().await;
    assert_eq!(s.scalar("SELECT count(*) FROM inbox").await as usize, n);
    assert_eq!(s.scalar("SELECT count(*) FROM dead_letter").await, 0);
    assert!(a.stop().await.success(), "{}", a.logs());
    assert!(b.stop().await.success(), "{}", b.logs());
    let applied = count_lines(&a, "applied") + count_lines(&b, "applied");
    assert_eq!(
        applied, n,
        "each event applied exactly once across the group"
    );
    eprintln!(
        "group of two: {n} events, a applied {}, b applied {}, {} deduplicated",
        count_lines(&a, "applied"),
        count_lines(&b, "applied"),
        count_lines(&a, "deduplicated") + count_lines(&b, "deduplicated")
    );
}

/// Headers, payload, and the dead-letter reason expected.
type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);

#[tokio::test]
async fn poison_records_are_dead_lettered_and_the_consumer_moves_on() {
    let s = Stand::new().await;
    let brokers = s.tansu.brokers();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    admin
        .create_topics(
            [&NewTopic::new(TOPIC, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let good_id = uuid::Uuid::now_v7().to_string();
    let id1 = uuid::Uuid::now_v7().to_string();
    let id2 = uuid::Uuid::now_v7().to_string();
    let [full, overflow, nul_name, nul_payload, last] =
        [(); 5].map(|_| uuid::Uuid::now_v7().to_string());
    // (headers, payload, expected dead-letter reason; empty for the good record)
    let cases: Vec<Case> = vec![
        (
            vec![("id", &id1), ("event_type", "IngredientUsed")],
            "{not json",
            "payload is not a valid IngredientUsed",
        ),
        (
            vec![("event_type", "PriceChanged")],
            r#"{"name": "cheddar", "unit_price_cents": 1}"#,
            "missing `id` header",
        ),
        (
            vec![("id", &id2), ("event_type", "BurgerFlipped")],
            "{}",
            "unknown event type `BurgerFlipped`",
        ),
        (
            vec![("id", "42"), ("event_type", "PriceChanged")],
            r#"{"name": "cheddar", "unit_price_cents": 1}"#,
            "`42` is not an event id",
        ),
        (
            vec![("id", &good_id), ("event_type", "PriceChanged")],
            r#"{"name": "cheddar", "unit_price_cents": 39}"#,
            "",
        ),
        // A valid event whose values the database refuses (stock overflows
        // its integer column): a data error that would fail every retry,
        // so it is parked, not retried forever.
        (
            vec![("id", &full), ("event_type", "IngredientRestocked")],
            r#"{"name": "pickles", "quantity": 2147483647, "min_stock": 0, "unit_price_cents": 5}"#,
            "",
        ),
        (
            vec![("id", &overflow), ("event_type", "IngredientRestocked")],
            r#"{"name": "pickles", "quantity": 1, "min_stock": 0, "unit_price_cents": 5}"#,
            "integer out of range (SQLSTATE 22003)",
        ),
        // NUL, which PostgreSQL's text refuses: in a valid event's name (the
        // projection's insert fails, a data error) and raw in a payload that
        // is not JSON (its dead letter must still be storable).
        (
            vec![("id", &nul_name), ("event_type", "PriceChanged")],
            r#"{"name": "chee\u0000se", "unit_price_cents": 7}"#,
            "(SQLSTATE 22021)",
        ),
        (
            vec![("id", &nul_payload), ("event_type", "IngredientUsed\0")],
            "not json\0at all",
            "unknown event type",
        ),
        (
            vec![("id", &last), ("event_type", "PriceChanged")],
            r#"{"name": "cheddar", "unit_price_cents": 41}"#,
            "",
        ),
    ];
    for (headers, payload, _) in &cases {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        producer
            .send(
                FutureRecord::to(TOPIC)
                    .key("cheddar")
                    .payload(*payload)
                    .headers(h),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    let mut consumer = s.consumer("stock", None);
    s.wait_applied(3).await;
    let price: i32 =
        sqlx::query_scalar("SELECT unit_price_cents FROM stock_view WHERE name = 'cheddar'")
            .fetch_one(&s.pool)
            .await
            .unwrap();
    assert_eq!(
        price, 41,
        "the good records after the poison ones were applied"
    );
    let pickles: i32 = sqlx::query_scalar("SELECT stock FROM stock_view WHERE name = 'pickles'")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(pickles, i32::MAX, "the refused restock changed nothing");
    let dead: Vec<(String, i32, i64, String)> = sqlx::query_as(
        "SELECT topic, partition, \"offset\", reason FROM dead_letter ORDER BY \"offset\"",
    )
    .fetch_all(&s.pool)
    .await
    .unwrap();
    let expected: Vec<(usize, &str)> = cases
        .iter()
        .enumerate()
        .filter(|(_, c)| !c.2.is_empty())
        .map(|(offset, c)| (offset, c.2))
        .collect();
    assert_eq!(dead.len(), expected.len(), "{dead:?}");
    for ((topic, partition, offset, reason), (want_offset, want)) in dead.iter().zip(&expected) {
        assert_eq!(
            (topic.as_str(), *partition, *offset),
            (TOPIC, 0, *want_offset as i64)
        );
        assert!(reason.contains(want), "{reason} lacks {want}");
    }
    assert_eq!(count_lines(&consumer, "dead-letter"), expected.len());
    assert!(consumer.stop().await.success(), "{}", consumer.logs());
}

#[tokio::test]
async fn a_consumer_killed_between_its_commits_applies_nothing_twice() {
    let s = Stand::new().await;
    let mut relay = s.relay();
    let n = s.cook(40).await;
    // Aborts right after its 5th database commit, before storing that offset.
    let mut crashing = s.consumer("stock", Some(5));
    let status = crashing.wait_exit(Duration::from_secs(120)).await;
    assert!(!status.success());
    assert!(
        crashing
            .logs()
            .contains("fault injection: aborting after 5"),
        "{}",
        crashing.logs()
    );
    assert!(s.scalar("SELECT count(*) FROM inbox").await >= 5);

    let mut consumer = s.consumer("stock", None);
    s.wait_applied(n).await;
    s.assert_projection_matches().await;
    assert!(
        count_lines(&consumer, "deduplicated") >= 1,
        "the record whose offset was never stored comes back and is recognised:\n{}",
        consumer.logs()
    );
    assert_eq!(s.scalar("SELECT count(*) FROM inbox").await as usize, n);
    assert!(consumer.stop().await.success());
    assert!(relay.stop().await.success());
}
