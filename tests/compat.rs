//! Issue 12, fitting where users already are: the tableless outbox
//! (events as logical decoding messages, `outbox::emit`) next to table rows.

use std::time::Duration;

use outbox::Event;
use serde_json::json;

use crate::support::fixture::{
    Fixture, Written, assert_all_arrived, assert_exactly_once, drop_row_checks,
};
use crate::support::kafka::consume_to_end;
use crate::support::postgres::confirmed_flush;

/// How one event of a mixed transaction is written.
#[derive(Clone, Copy, Debug)]
enum How {
    /// `outbox::write`: a row.
    Row,
    /// `outbox::emit`: a logical decoding message.
    Message,
    /// Plain SQL INSERT with a random id, as services write without the helper.
    RawRow,
    /// Plain SQL `pg_logical_emit_message(true, 'outbox', ...)`.
    RawMessage,
    /// A row inserted and deleted in the same transaction.
    DeletedRow,
}

fn event(f: &Fixture, aggregate_id: &str, seq: u64) -> (Event, Written) {
    let payload = json!({"aggregate": aggregate_id, "seq": seq, "pad": "x".repeat(64)});
    let mut e = Event::new(&f.aggregate_type, aggregate_id, "Happened", &payload)
        .unwrap()
        .with_header("seq", seq.to_string())
        .unwrap();
    let traceparent = seq
        .is_multiple_of(3)
        .then(|| format!("00-{:032x}-{:016x}-01", seq + 1, seq + 1));
    if let Some(tp) = &traceparent {
        e = e.with_trace_context(tp).unwrap();
    }
    let w = Written {
        id: e.id().to_string(),
        aggregate_type: f.aggregate_type.clone(),
        aggregate_id: aggregate_id.to_owned(),
        seq,
        payload,
        traceparent,
    };
    (e, w)
}

/// One transaction writing each item the way it says, in order; rolled
/// back instead of committed when `commit` is false.
async fn mixed_tx(f: &Fixture, items: &[(&str, u64, How)], commit: bool) -> Vec<Written> {
    let mut tx = f.pool.begin().await.unwrap();
    let mut written = Vec::new();
    for (aggregate_id, seq, how) in items {
        let (e, w) = event(f, aggregate_id, *seq);
        match how {
            How::Row => {
                outbox::write(&mut tx, &e).await.unwrap();
            }
            How::Message => {
                outbox::emit(&mut tx, &e).await.unwrap();
            }
            How::DeletedRow => {
                outbox::Outbox::new()
                    .keep_rows(false)
                    .write(&mut tx, &e)
                    .await
                    .unwrap();
            }
            How::RawRow => {
                sqlx::query(
                    "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers, trace_context) \
                     VALUES ($1::uuid, $2, $3, 'Happened', $4::jsonb, $5::jsonb, $6)",
                )
                .bind(e.id().as_uuid())
                .bind(&f.aggregate_type)
                .bind(aggregate_id)
                .bind(e.payload())
                .bind(json!({"seq": seq.to_string()}).to_string())
                .bind(e.trace_context())
                .execute(&mut *tx)
                .await
                .unwrap();
            }
            How::RawMessage => {
                // What a service without the library writes: the documented
                // content format, by hand.
                let mut content = json!({
                    "v": 1,
                    "id": e.id().to_string(),
                    "aggregate_type": f.aggregate_type,
                    "aggregate_id": aggregate_id,
                    "event_type": "Happened",
                    "payload": w.payload,
                    "headers": {"seq": seq.to_string()},
                });
                if let Some(tp) = e.trace_context() {
                    content["trace_context"] = json!(tp);
                }
                sqlx::query(
                    "SELECT pg_logical_emit_message(true, 'outbox', convert_to($1, 'UTF8'))",
                )
                .bind(content.to_string())
                .execute(&mut *tx)
                .await
                .unwrap();
            }
        }
        written.push(w);
    }
    if commit {
        tx.commit().await.unwrap();
        written
    } else {
        tx.rollback().await.unwrap();
        Vec::new()
    }
}

/// Item 2: rows and messages of the same aggregates, mixed in one
/// transaction in every way a service writes them, arrive once each and in
/// commit order; a rolled-back message never arrives; messages with other
/// prefixes (another tool's, transactional or not) are skipped; a crash
/// between transactions resends rather than loses (the same confirmation
/// rule as rows).
#[tokio::test]
async fn messages_and_rows_mixed_in_transactions_keep_commit_order() {
    use How::*;
    let f = Fixture::new().await;
    let mut relay = f.relay().args(["--message-prefix", "outbox"]).start().await;

    let mut written = Vec::new();
    let mut logs = String::new();
    let ways = [Row, Message, RawRow, RawMessage, DeletedRow];
    let mut seq = 0u64;
    for round in 0..12 {
        let mut items = Vec::new();
        // Several events per aggregate per transaction, the kinds rotating.
        for i in 0..5 {
            seq += 1;
            let agg = ["m1", "m2", "m3"][(round + i) % 3];
            items.push((agg, seq, ways[(round + i * 2) % ways.len()]));
        }
        written.extend(mixed_tx(&f, &items, true).await);
        if round == 4 {
            // Rolled back: neither its rows nor its messages exist.
            seq += 1;
            let gone = mixed_tx(&f, &[("m1", seq, Message), ("m2", seq + 1, Row)], false).await;
            assert!(gone.is_empty());
            seq += 1;
            for transactional in [true, false] {
                sqlx::query("SELECT pg_logical_emit_message($1, 'other-tool', 'not ours')")
                    .bind(transactional)
                    .execute(&f.pool)
                    .await
                    .unwrap();
            }
        }
        if round == 7 {
            // A crash: what was not confirmed is sent again, nothing lost.
            f.read_through(&written.last().unwrap().id).await;
            relay.kill9().await;
            logs.push_str(&relay.logs());
            relay = f.relay().args(["--message-prefix", "outbox"]).start().await;
        }
    }
    // The tokio-postgres helper too.
    {
        let (client, conn) = tokio_postgres::connect(&f.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut client = client;
        let tx = client.transaction().await.unwrap();
        let (a, wa) = event(&f, "m1", seq + 1);
        let (b, wb) = event(&f, "m1", seq + 2);
        outbox::tokio_postgres::emit(&tx, &a).await.unwrap();
        outbox::tokio_postgres::write(&tx, &b).await.unwrap();
        tx.commit().await.unwrap();
        written.extend([wa, wb]);
    }

    let records = f.read_through(&written.last().unwrap().id).await;
    assert!(relay.stop().await.success(), "{}", relay.logs());
    let records_after_stop = f.read_to_end().await;
    assert!(records_after_stop.len() >= records.len());
    // At least once across the crash, every record right, and per
    // aggregate in commit order.
    assert_all_arrived(&written, &records_after_stop);
    logs.push_str(&relay.logs());
    assert!(
        logs.contains("with a prefix other than --message-prefix"),
        "{logs}"
    );
    let messages = written.len();
    assert!(messages >= 60, "{messages}");
}

/// Item 2: a clean run (no crash) delivers exactly once, with the same
/// topic, key, value and headers for a message as for a row.
#[tokio::test]
async fn emitted_events_arrive_exactly_once_like_rows() {
    use How::*;
    let f = Fixture::new().await;
    let mut relay = f.relay().args(["--message-prefix", "outbox"]).start().await;
    let mut written = Vec::new();
    written.extend(
        mixed_tx(
            &f,
            &[("e1", 1, Message), ("e1", 2, Row), ("e2", 3, Message)],
            true,
        )
        .await,
    );
    written.extend(mixed_tx(&f, &[("e2", 4, Row), ("e1", 5, Message)], true).await);
    // A batch of messages in one round trip.
    let mut tx = f.pool.begin().await.unwrap();
    let batch: Vec<(Event, Written)> = (6..=9).map(|s| event(&f, "e3", s)).collect();
    let events: Vec<Event> = batch.iter().map(|(e, _)| e.clone()).collect();
    outbox::emit_all(&mut tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    written.extend(batch.into_iter().map(|(_, w)| w));
    f.read(written.len()).await;
    assert!(relay.stop().await.success(), "{}", relay.logs());
    assert_exactly_once(&written, &f.read_to_end().await);
}

/// A new database with nothing but the relay's bookkeeping table, made by
/// `outbox-relay migrate --bookkeeping-only`: its URL and a pool.
async fn bookkeeping_only_database(pg: &crate::support::Postgres) -> (String, sqlx::PgPool) {
    let url = pg.create_database(&crate::support::unique("db")).await;
    let out = std::process::Command::new(crate::support::relay::binary())
        .args(["migrate", "--bookkeeping-only"])
        .env("OUTBOX_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    (url, pool)
}

/// Item 2, the tableless setup as docs/compatibility.md gives it: a
/// database with no outbox table, only the relay's bookkeeping table
/// (`migrate --bookkeeping-only`) and an empty publication; events emitted
/// with the helper arrive. Without `--message-prefix` the relay does not
/// ask for messages at all.
#[tokio::test]
async fn the_tableless_outbox_needs_no_table() {
    use crate::support::{Postgres, RelayBuilder, Tansu, unique};
    let pg = Postgres::start();
    let tansu = Tansu::start();
    let (url, pool) = bookkeeping_only_database(&pg).await;
    sqlx::query("CREATE PUBLICATION outbox_pub")
        .execute(&pool)
        .await
        .unwrap();
    let slot = unique("slot");
    let aggregate_type = unique("agg");
    let builder = RelayBuilder::new(&url, &tansu.brokers(), &slot);
    // Off by default: the session does not ask for messages.
    let mut relay = builder.start().await;
    assert!(relay.stop().await.success(), "{}", relay.logs());
    assert!(
        relay.logs().contains("message_prefix=None"),
        "{}",
        relay.logs()
    );
    let mut relay = builder
        .clone()
        .args(["--message-prefix", "outbox"])
        .start()
        .await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let e = Event::new(&aggregate_type, "t1", "Happened", &json!({"n": n})).unwrap();
        let mut tx = pool.begin().await.unwrap();
        outbox::emit(&mut tx, &e).await.unwrap();
        tx.commit().await.unwrap();
        ids.push(e.id().to_string());
    }
    let topic = format!("outbox.event.{aggregate_type}");
    let records =
        crate::support::consume(&tansu.brokers(), &[&topic], 3, Duration::from_secs(120)).await;
    assert!(relay.stop().await.success(), "{}", relay.logs());
    assert!(
        relay.logs().contains(r#"message_prefix=Some("outbox")"#),
        "{}",
        relay.logs()
    );
    let got: Vec<&str> = records.iter().map(|r| r.id()).collect();
    assert_eq!(got, ids, "one partition per key: in commit order");
    assert!(records.iter().all(|r| r.key.as_deref() == Some("t1")));
}

/// Item 2: an outbox message that cannot be relayed is a bad event like a
/// bad row: under `stop` the relay names it and leaves the slot before it;
/// under `dead-letter` it is parked (its raw content as the value) and the
/// next event is delivered.
#[tokio::test]
async fn an_unreadable_or_non_transactional_outbox_message_is_refused_by_name() {
    let f = Fixture::new().await;
    drop_row_checks(&f.pool).await;
    let mut relay = f.relay().args(["--message-prefix", "outbox"]).start().await;
    let first = f.write_tx(&[("n1".into(), 1)]).await;
    f.read(1).await;
    assert!(relay.stop().await.success());
    let before = confirmed_flush(&f.url, &f.slot).await.unwrap();

    let nt = uuid::Uuid::now_v7().to_string();
    let content = json!({"v": 1, "id": nt, "aggregate_type": f.aggregate_type,
        "aggregate_id": "n1", "event_type": "Happened", "payload": {}});
    sqlx::query("SELECT pg_logical_emit_message(false, 'outbox', convert_to($1, 'UTF8'))")
        .bind(content.to_string())
        .execute(&f.pool)
        .await
        .unwrap();
    let mut relay = f.relay().args(["--message-prefix", "outbox"]).spawn();
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(1), "{}", relay.logs());
    let logs = relay.logs();
    assert!(logs.contains(&format!("event {nt}")), "{logs}");
    assert!(logs.contains("transactional = false"), "{logs}");
    assert_eq!(confirmed_flush(&f.url, &f.slot).await, Some(before));

    // Parked instead, with an unreadable one after it, then a good event.
    let mut tx = f.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_logical_emit_message(true, 'outbox', 'garbage')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let after = f.write_tx(&[("n1".into(), 2)]).await;
    let dlt = format!("{}.dlt", f.topic());
    let mut relay = f
        .relay()
        .args(["--message-prefix", "outbox"])
        .arg("--on-undeliverable=dead-letter")
        .arg(format!("--dead-letter-topic={dlt}"))
        .spawn();
    let records = f.read_through(&after[0].id).await;
    assert!(relay.stop().await.success(), "{}", relay.logs());
    assert_exactly_once(&[first[0].clone(), after[0].clone()], &records);
    let letters = consume_to_end(&f.tansu.brokers(), &[&dlt]).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    let logs = relay.logs();
    // Partitions differ (a letter without a key), so found by content.
    let parked = letters
        .iter()
        .find(|l| l.header("id") == Some(nt.as_str()))
        .unwrap_or_else(|| panic!("{letters:?}\n{logs}"));
    assert!(
        parked
            .header("outbox.error")
            .is_some_and(|e| e.contains("transactional = false")),
        "{parked:?}"
    );
    assert_eq!(parked.key.as_deref(), Some("n1"));
    let garbage = letters
        .iter()
        .find(|l| l.value.as_deref() == Some(&b"garbage"[..]))
        .unwrap_or_else(|| panic!("{letters:?}"));
    assert!(
        garbage
            .header("outbox.error")
            .is_some_and(|e| e.contains("not an outbox event")),
        "{garbage:?}"
    );
}

/// Item 1: Debezium's outbox table, created exactly as Debezium's
/// documentation creates it (plus the optional `timestamp` and
/// `tracingspancontext` columns and a `tenant` column placed as a header),
/// in a database that has none of the relay's migrations but its
/// bookkeeping table (`migrate --bookkeeping-only`). Rows written with
/// plain SQL the way Debezium users write them (random ids, several per
/// aggregate per transaction, the insert-then-delete pattern) come out as
/// Debezium's Outbox Event Router emits them with its defaults under
/// JsonConverter: topic `outbox.event.<aggregatetype>`, key the aggregate
/// id as a JSON string, header `id`, the jsonb payload as a JSON string, the
/// placed columns as headers, and nothing else.
#[tokio::test]
async fn a_debezium_outbox_table_is_relayed_as_debeziums_router_does() {
    use crate::support::{Postgres, RelayBuilder, Tansu, unique};
    let pg = Postgres::start();
    let tansu = Tansu::start();
    let (url, pool) = bookkeeping_only_database(&pg).await;
    // The bookkeeping table has exactly the migrations' shape.
    let migrated = pg.create_migrated_database(&unique("db")).await;
    let migrated = sqlx::PgPool::connect(&migrated).await.unwrap();
    let columns = "SELECT string_agg(column_name || ' ' || data_type || ' ' || is_nullable || ' ' || \
                   coalesce(column_default, ''), ', ' ORDER BY column_name) FROM information_schema.columns \
                   WHERE table_name = 'outbox_relay_slot'";
    let ours: String = sqlx::query_scalar(columns).fetch_one(&pool).await.unwrap();
    let theirs: String = sqlx::query_scalar(columns)
        .fetch_one(&migrated)
        .await
        .unwrap();
    assert_eq!(ours, theirs);
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename IN ('outbox', 'inbox')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 0, "--bookkeeping-only created the outbox or inbox");

    // Debezium's documented outbox table, and the publication DDL from docs/.
    sqlx::raw_sql(
        "CREATE TABLE outboxevent ( \
           id uuid NOT NULL PRIMARY KEY, \
           aggregatetype varchar(255) NOT NULL, \
           aggregateid varchar(255) NOT NULL, \
           type varchar(255) NOT NULL, \
           timestamp timestamp, \
           payload jsonb, \
           tracingspancontext varchar(256), \
           tenant text); \
         CREATE PUBLICATION dbz_outbox FOR TABLE outboxevent WITH (publish = 'insert');",
    )
    .execute(&pool)
    .await
    .unwrap();
    let aggregate_type = format!("Order{}", unique("x").replace('_', ""));
    let slot = unique("slot");
    let relay = RelayBuilder::new(&url, &tansu.brokers(), &slot).args([
        "--table-layout",
        "debezium",
        "--publication",
        "dbz_outbox",
        "--additional-placement",
        "type:header:eventType,tenant:header",
    ]);
    let spans_file = std::env::temp_dir().join(format!("{}.jsonl", unique("dbz-spans")));
    let mut relay = relay
        .args(["--traces-exporter", "console", "--traces-file"])
        .arg(spans_file.to_str().unwrap())
        .start()
        .await;

    // (id, aggregateid, type, payload text as jsonb prints it, tenant, traceparent)
    type Row = (
        String,
        String,
        String,
        String,
        Option<String>,
        Option<String>,
    );
    let mut written: Vec<Row> = Vec::new();
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    for t in 0..6u32 {
        let mut tx = pool.begin().await.unwrap();
        for i in 0..4u32 {
            let aggregate = format!("{}", (t + i) % 3 + 1);
            let n = t * 4 + i;
            let tenant = (n % 2 == 0).then(|| format!("tenant-{n}"));
            let span = (n == 5).then(|| format!("#Java properties\ntraceparent={traceparent}\n"));
            let (id, payload): (String, String) = sqlx::query_as(
                "INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, timestamp, payload, \
                 tracingspancontext, tenant) \
                 VALUES (gen_random_uuid(), $1, $2, $3, now(), \
                 jsonb_build_object('n', $4::int, 'lineItems', jsonb_build_array(jsonb_build_object('item', 'Debezium in Action'))), \
                 $5, $6) RETURNING id::text, payload::text",
            )
            .bind(&aggregate_type)
            .bind(&aggregate)
            .bind(if n % 3 == 0 { "OrderCreated" } else { "OrderLineUpdated" })
            .bind(n as i32)
            .bind(&span)
            .bind(&tenant)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
            // Debezium's recommended pattern: the row is deleted right away.
            if n % 4 == 1 {
                sqlx::query("DELETE FROM outboxevent WHERE id = $1::uuid")
                    .bind(&id)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            let event_type = if n % 3 == 0 {
                "OrderCreated"
            } else {
                "OrderLineUpdated"
            };
            written.push((
                id,
                aggregate,
                event_type.to_owned(),
                payload,
                tenant,
                span.map(|_| traceparent.to_owned()),
            ));
        }
        tx.commit().await.unwrap();
    }
    let topic = format!("outbox.event.{aggregate_type}");
    crate::support::consume(
        &tansu.brokers(),
        &[&topic],
        written.len(),
        Duration::from_secs(120),
    )
    .await;
    assert!(relay.stop().await.success(), "{}", relay.logs());
    let records = consume_to_end(&tansu.brokers(), &[&topic]).await;
    assert_eq!(records.len(), written.len(), "{records:?}");
    let mut last: std::collections::HashMap<String, usize> = Default::default();
    let mut sorted: Vec<_> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    for r in sorted {
        let id = r.header("id").expect("header id");
        let at = written
            .iter()
            .position(|w| w.0 == id)
            .unwrap_or_else(|| panic!("record {id} was never written"));
        let (_, aggregate, event_type, payload, tenant, trace) = &written[at];
        assert_eq!(r.topic, topic);
        // JsonConverter: the key and the payload as JSON strings.
        assert_eq!(r.key.as_deref(), Some(format!("\"{aggregate}\"").as_str()));
        let value: serde_json::Value = r.value_json();
        assert_eq!(value, serde_json::Value::String(payload.clone()), "{id}");
        assert_eq!(r.header("eventType"), Some(event_type.as_str()));
        assert_eq!(r.header("tenant"), tenant.as_deref());
        assert_eq!(r.header("traceparent"), trace.as_deref());
        let mut expected = vec!["id", "eventType"];
        if tenant.is_some() {
            expected.push("tenant");
        }
        if trace.is_some() {
            expected.push("traceparent");
        }
        assert_eq!(r.header_names, expected, "{id}");
        // Per aggregate, in commit order.
        let prev = last.insert(aggregate.clone(), at);
        assert!(
            prev.is_none_or(|p| p < at),
            "aggregate {aggregate} out of order"
        );
    }
    // The relay's span continues the trace of `tracingspancontext`: one,
    // for the one transaction that carried it.
    let spans = std::fs::read_to_string(&spans_file).unwrap();
    let _ = std::fs::remove_file(&spans_file);
    let spans: Vec<serde_json::Value> = spans
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(spans.len(), 1, "{spans:?}");
    assert_eq!(spans[0]["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(spans[0]["parent_span_id"], "b7ad6b7169203331");
    assert_eq!(spans[0]["attributes"]["messaging.batch.message_count"], 4);
}

/// Item 3: `outbox-relay verify` proves a relay-delivered window clean
/// (exit 0), and on a topic where events were removed, duplicated and
/// reordered on purpose names each one (exit 1): the missing id, the
/// duplicate (allowed, reported), the event that came after a later one of
/// its aggregate.
#[tokio::test]
async fn verify_finds_missing_duplicated_and_reordered_events() {
    use rdkafka::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let f = Fixture::new().await;
    let mut relay = f.relay().start().await;
    let mut seq = 0;
    let delivered = f.write_many(30, 5, 4, &mut seq).await;
    f.read(30).await;
    assert!(relay.stop().await.success(), "{}", relay.logs());

    let verify = |until: &str| {
        std::process::Command::new(crate::support::relay::binary())
            .args([
                "verify",
                "--since",
                "2000-01-01T00:00:00Z",
                "--until",
                until,
            ])
            .env("OUTBOX_DATABASE_URL", &f.url)
            .env("OUTBOX_KAFKA_BROKERS", f.tansu.brokers())
            .env("OUTBOX_LOG", "info,outbox_relay=debug")
            .output()
            .unwrap()
    };
    let until: String = sqlx::query_scalar("SELECT (now() + interval '1 minute')::text")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    let out = verify(&until);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("events in the outbox window: 30"), "{text}");
    assert!(text.contains("missing in kafka: 0"), "{text}");
    assert!(
        text.contains("out of order within their aggregate: 0"),
        "{text}"
    );
    assert!(delivered.len() == 30);

    // A second aggregate type whose topic the test fills by hand: rows
    // written with plain SQL (random ids), records produced with one
    // removed, one twice and two swapped.
    let tampered = format!("{}x", f.aggregate_type);
    let topic = format!("outbox.event.{tampered}");
    crate::support::kafka::create_topic(&f.tansu.brokers(), &topic, 1).await;
    let mut ids = Vec::new();
    for (aggregate, n) in [("A", 1), ("A", 2), ("A", 3), ("B", 4), ("B", 5), ("B", 6)] {
        let id: String = sqlx::query_scalar(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ($1, $2, 'Happened', jsonb_build_object('n', $3::int)) RETURNING id::text",
        )
        .bind(&tampered)
        .bind(aggregate)
        .bind(n)
        .fetch_one(&f.pool)
        .await
        .unwrap();
        ids.push((aggregate, id));
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", f.tansu.brokers())
        .create()
        .unwrap();
    // A1, A3, A2 (A2 after a later event), B4 twice, B6 (B5 removed).
    for i in [0, 2, 1, 3, 3, 5] {
        let (aggregate, id) = &ids[i];
        producer
            .send(
                FutureRecord::to(&topic)
                    .key(*aggregate)
                    .payload("{}")
                    .headers(OwnedHeaders::new().insert(Header {
                        key: "id",
                        value: Some(id.as_str()),
                    })),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let out = verify(&until);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("events in the outbox window: 36"), "{text}");
    assert!(text.contains("missing in kafka: 1\n"), "{text}");
    assert!(
        text.contains(&format!("  {} aggregate {tampered}/B", ids[4].1)),
        "{text}"
    );
    assert!(
        text.contains("duplicated in kafka (allowed: at-least-once): 1\n"),
        "{text}"
    );
    assert!(text.contains(&format!("  {} 2 copies", ids[3].1)), "{text}");
    assert!(
        text.contains("out of order within their aggregate: 1\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!("  {} aggregate A: written as seq", ids[1].1)),
        "{text}"
    );
    assert!(text.contains("result: FAILED"), "{text}");
}
