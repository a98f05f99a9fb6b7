//! A test's world: its own PostgreSQL cluster (migrated database), its own
//! broker, and unique slot and aggregate-type (so topic) names; plus a writer
//! that records what it committed, in commit order.

use std::time::Duration;

use outbox::Event;
use serde_json::json;
use sqlx::PgPool;

use crate::{Postgres, Record, RelayBuilder, Tansu, consume, unique};

/// One event as written.
#[derive(Debug, Clone)]
pub struct Written {
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub seq: u64,
    pub payload: serde_json::Value,
    pub traceparent: Option<String>,
}

pub struct Fixture {
    pub pg: Postgres,
    pub tansu: Tansu,
    pub url: String,
    pub pool: PgPool,
    pub slot: String,
    /// Aggregate type used by `write`; its topic is `outbox.event.<this>`.
    pub aggregate_type: String,
}

impl Fixture {
    pub async fn new() -> Self {
        crate::init_logging();
        let pg = Postgres::start();
        let tansu = Tansu::start();
        let url = pg.create_migrated_database(&unique("db")).await;
        let pool = PgPool::connect(&url).await.expect("connect");
        Self {
            pg,
            tansu,
            url,
            pool,
            slot: unique("slot"),
            aggregate_type: unique("agg"),
        }
    }

    /// Drops the CHECK constraints that refuse reserved header names and
    /// illegal topic overrides at INSERT (migration 20261123000002), as on
    /// an outbox whose rows predate them: for tests of the relay's own
    /// refusal of such rows.
    pub async fn drop_row_checks(&self) {
        drop_row_checks(&self.pool).await;
    }

    /// Creates the least-privilege role docs/operations.md documents
    /// (`LOGIN REPLICATION`, `SELECT` on the outbox, read/write on the
    /// relay's bookkeeping table; no superuser) and returns this database's
    /// URL for it.
    pub async fn create_relay_role(&self) -> String {
        for sql in [
            "CREATE ROLE relay LOGIN REPLICATION PASSWORD 'relay-Pw-1'",
            "GRANT SELECT ON outbox TO relay",
            "GRANT SELECT, INSERT, UPDATE ON outbox_relay_slot TO relay",
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&self.pool)
                .await
                .expect("create the relay's role");
        }
        self.url.replace(
            &format!(
                "{}:{}@",
                crate::postgres::SUPERUSER,
                crate::postgres::PASSWORD
            ),
            "relay:relay-Pw-1@",
        )
    }

    pub fn topic(&self) -> String {
        format!("outbox.event.{}", self.aggregate_type)
    }

    pub fn relay(&self) -> RelayBuilder {
        RelayBuilder::new(&self.url, &self.tansu.brokers(), &self.slot)
    }

    /// Writes one transaction of events for the given aggregates and sequence
    /// numbers, and returns them.
    pub async fn write_tx(&self, items: &[(String, u64)]) -> Vec<Written> {
        self.write_tx_with(outbox::Outbox::new(), items).await
    }

    /// [`write_tx`](Self::write_tx) with the write helper's settings.
    pub async fn write_tx_with(
        &self,
        writer: outbox::Outbox,
        items: &[(String, u64)],
    ) -> Vec<Written> {
        let mut events = Vec::new();
        let mut written = Vec::new();
        for (aggregate_id, seq) in items {
            let payload = json!({"aggregate": aggregate_id, "seq": seq, "pad": "x".repeat(64)});
            let mut e = Event::new(&self.aggregate_type, aggregate_id, "Happened", &payload)
                .unwrap()
                .with_header("seq", seq.to_string())
                .unwrap();
            let traceparent =
                (seq % 3 == 0).then(|| format!("00-{:032x}-{:016x}-01", seq + 1, seq + 1));
            if let Some(tp) = &traceparent {
                e = e.with_trace_context(tp).unwrap();
            }
            written.push(Written {
                id: e.id().to_string(),
                aggregate_type: self.aggregate_type.clone(),
                aggregate_id: aggregate_id.clone(),
                seq: *seq,
                payload,
                traceparent,
            });
            events.push(e);
        }
        let mut tx = self.pool.begin().await.unwrap();
        writer.write_all(&mut tx, &events).await.unwrap();
        tx.commit().await.unwrap();
        written
    }

    /// Writes `n` events in transactions of 1 to `max_tx` events over
    /// `aggregates` aggregates; `seq` continues from `*next_seq`.
    pub async fn write_many(
        &self,
        n: usize,
        max_tx: usize,
        aggregates: usize,
        next_seq: &mut u64,
    ) -> Vec<Written> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(*next_seq + n as u64);
        let mut out = Vec::new();
        while out.len() < n {
            let size = rng.random_range(1..=max_tx).min(n - out.len());
            let items: Vec<(String, u64)> = (0..size)
                .map(|_| {
                    let agg = format!("a{}", rng.random_range(0..aggregates));
                    *next_seq += 1;
                    (agg, *next_seq)
                })
                .collect();
            out.extend(self.write_tx(&items).await);
        }
        out
    }

    /// Everything in the topic, once the relay has stopped: read to the high
    /// watermarks, so late duplicates are counted too.
    pub async fn read_to_end(&self) -> Vec<Record> {
        crate::kafka::consume_to_end(&self.tansu.brokers(), &[&self.topic()]).await
    }

    /// Reads the topic until `expected` records (plus a settle time for duplicates).
    /// Everything in the topic once the event `id` is in it (counting
    /// records is not enough when duplicates may arrive).
    pub async fn read_through(&self, id: &str) -> Vec<Record> {
        crate::wait_for(
            &format!("event {id} to arrive"),
            Duration::from_secs(120),
            || async {
                let records = self.read_to_end().await;
                records.iter().any(|r| r.id() == id).then_some(records)
            },
        )
        .await
    }

    pub async fn read(&self, expected: usize) -> Vec<Record> {
        consume(
            &self.tansu.brokers(),
            &[&self.topic()],
            expected,
            Duration::from_secs(120),
        )
        .await
    }
}

/// [`Fixture::drop_row_checks`] on any database.
pub async fn drop_row_checks(pool: &PgPool) {
    sqlx::raw_sql(
        "ALTER TABLE outbox DROP CONSTRAINT outbox_headers_not_reserved, \
         DROP CONSTRAINT outbox_topic_legal",
    )
    .execute(pool)
    .await
    .expect("drop the outbox's row checks");
}

/// Asserts every written event arrived exactly once with the right topic,
/// key, value and headers, and that each aggregate's events are in commit order.
pub fn assert_exactly_once(written: &[Written], records: &[Record]) {
    let missing: Vec<&Written> = written
        .iter()
        .filter(|w| !records.iter().any(|r| r.id() == w.id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} events never arrived, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    assert_eq!(
        records.len(),
        written.len(),
        "duplicates or unexpected records arrived"
    );
    assert_records_match(written, records);
}

/// Checks each record against what was written, and per-aggregate order
/// (each aggregate's seq numbers increase along its partition), ignoring
/// replayed duplicates.
/// At-least-once: every written event arrived (duplicates allowed), and
/// [`assert_records_match`].
pub fn assert_all_arrived(written: &[Written], records: &[Record]) {
    for w in written {
        assert!(
            records.iter().any(|r| r.id() == w.id),
            "{} never arrived",
            w.id
        );
    }
    assert_records_match(written, records);
}

pub fn assert_records_match(written: &[Written], records: &[Record]) {
    use std::collections::HashMap;
    let by_id: HashMap<&str, &Written> = written.iter().map(|w| (w.id.as_str(), w)).collect();
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.topic.clone(), r.partition, r.offset));
    for r in sorted {
        let w = by_id
            .get(r.id())
            .unwrap_or_else(|| panic!("record {} was never written", r.id()));
        assert_eq!(r.topic, format!("outbox.event.{}", w.aggregate_type));
        assert_eq!(
            r.key.as_deref(),
            Some(w.aggregate_id.as_str()),
            "key of {}",
            w.id
        );
        assert_eq!(r.value_json(), w.payload, "value of {}", w.id);
        assert_eq!(r.header("event_type"), Some("Happened"));
        assert_eq!(r.header("aggregate_type"), Some(w.aggregate_type.as_str()));
        assert_eq!(r.header("aggregate_id"), Some(w.aggregate_id.as_str()));
        assert_eq!(r.header("seq"), Some(w.seq.to_string().as_str()));
        assert_eq!(r.header("traceparent"), w.traceparent.as_deref());
        assert_eq!(
            r.header_names.len(),
            r.headers.len(),
            "a header name repeats in {}: {:?}",
            w.id,
            r.header_names
        );
        if !seen.insert(w.id.clone()) {
            continue; // a replayed duplicate; order is judged on first copies
        }
        let last = last_seq.entry(w.aggregate_id.clone()).or_insert(0);
        assert!(
            w.seq > *last,
            "aggregate {} out of order: seq {} after {}",
            w.aggregate_id,
            w.seq,
            last
        );
        *last = w.seq;
    }
}
