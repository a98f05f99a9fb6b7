//! The write helper against a real PostgreSQL: rows land with the business
//! transaction, or not at all; invalid events never reach the database.

use outbox::{Error, Event, Outbox};
use serde_json::json;
use sqlx::PgPool;

use crate::support::{Postgres, unique};

async fn database(pg: &Postgres) -> PgPool {
    let url = pg.create_migrated_database(&unique("lib")).await;
    PgPool::connect(&url).await.expect("connect")
}

async fn count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await
        .expect("count")
}

#[tokio::test]
async fn write_commits_with_the_transaction() {
    let pg = Postgres::start();
    let pool = database(&pg).await;
    let event = Event::new(
        "order",
        "42",
        "OrderPlaced",
        &json!({"total": 12.5, "items": [1, 2]}),
    )
    .unwrap()
    .with_header("tenant", "acme")
    .unwrap()
    .with_topic("orders.custom")
    .unwrap()
    .with_trace_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let id = outbox::write(&mut tx, &event).await.unwrap();
    tx.commit().await.unwrap();

    let row: (uuid::Uuid, String, String, String, serde_json::Value, serde_json::Value, Option<String>, Option<String>) =
        sqlx::query_as(
            "SELECT id, aggregate_type, aggregate_id, event_type, payload, headers, topic, trace_context FROM outbox",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(row.0, id.as_uuid());
    assert_eq!(row.0.get_version_num(), 7);
    assert_eq!(
        (row.1.as_str(), row.2.as_str(), row.3.as_str()),
        ("order", "42", "OrderPlaced")
    );
    assert_eq!(row.4, json!({"total": 12.5, "items": [1, 2]}));
    assert_eq!(row.5, json!({"tenant": "acme"}));
    assert_eq!(row.6.as_deref(), Some("orders.custom"));
    assert!(row.7.is_some());
}

#[tokio::test]
async fn rolled_back_writes_leave_no_row() {
    let pg = Postgres::start();
    let pool = database(&pg).await;
    let mut tx = pool.begin().await.unwrap();
    outbox::write(&mut tx, &Event::new("order", "1", "A", &json!({})).unwrap())
        .await
        .unwrap();
    let batch: Vec<Event> = (0..5)
        .map(|i| Event::new("order", i.to_string(), "B", &json!({"i": i})).unwrap())
        .collect();
    outbox::write_all(&mut tx, &batch).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(count(&pool).await, 0);
}

#[tokio::test]
async fn write_all_inserts_every_event_in_order() {
    let pg = Postgres::start();
    let pool = database(&pg).await;
    let batch: Vec<Event> = (0..50)
        .map(|i| {
            let e =
                Event::new("cart", format!("c{}", i % 3), "ItemAdded", &json!({"i": i})).unwrap();
            if i % 2 == 0 {
                e.with_header("even", "yes").unwrap()
            } else {
                e
            }
        })
        .collect();
    let mut tx = pool.begin().await.unwrap();
    let ids = outbox::write_all(&mut tx, &batch).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(ids.len(), 50);
    let stored: Vec<(uuid::Uuid, serde_json::Value, serde_json::Value)> =
        sqlx::query_as("SELECT id, payload, headers FROM outbox ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(stored.len(), 50);
    for (i, (id, payload, headers)) in stored.iter().enumerate() {
        // UUIDv7 ids sort in creation order.
        assert_eq!(*id, ids[i].as_uuid());
        assert_eq!(payload["i"], json!(i));
        assert_eq!(headers.get("even").is_some(), i % 2 == 0);
    }
    let mut tx = pool.begin().await.unwrap();
    assert!(outbox::write_all(&mut tx, &[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn invalid_events_never_reach_the_database() {
    let pg = Postgres::start();
    let pool = database(&pg).await;
    let big = Event::new("doc", "1", "Uploaded", &"x".repeat(2000)).unwrap();
    let small = Event::new("doc", "2", "Uploaded", &json!({})).unwrap();
    let limited = Outbox::new().max_payload_bytes(1000);

    let mut tx = pool.begin().await.unwrap();
    let err = limited.write(&mut tx, &big).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::PayloadTooLarge {
                size: 2002,
                max: 1000
            }
        ),
        "{err}"
    );
    // One bad event refuses the whole batch, before anything is sent.
    let err = limited
        .write_all(&mut tx, &[small.clone(), big.clone()])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PayloadTooLarge { .. }));
    // The transaction is still usable: nothing failed on the server.
    limited.write(&mut tx, &small).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&pool).await, 1);

    // The default limit is Kafka's default message size, 1 MiB.
    let huge = Event::new("doc", "3", "Uploaded", &"y".repeat(1024 * 1024)).unwrap();
    let mut tx = pool.begin().await.unwrap();
    let err = outbox::write(&mut tx, &huge).await.unwrap_err();
    assert!(
        err.to_string().contains("over the limit of 1048576 bytes"),
        "{err}"
    );
}

#[tokio::test]
async fn constraints_guard_raw_sql_inserts() {
    let pg = Postgres::start();
    let pool = database(&pg).await;
    for (sql, constraint) in [
        (
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('', '1', 'T', '{}')",
            "outbox_aggregate_type_not_empty",
        ),
        (
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) VALUES ('a', '1', 'T', '{}', '{\"n\": 1}')",
            "outbox_headers_object_of_strings",
        ),
        (
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) VALUES ('a', '1', 'T', '{}', '[\"x\"]')",
            "outbox_headers_object_of_strings",
        ),
    ] {
        let err = sqlx::query(sql).execute(&pool).await.unwrap_err();
        assert!(err.to_string().contains(constraint), "{sql}: {err}");
    }
    // A plain SQL insert with defaults works (random UUID id, empty headers).
    sqlx::query("INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('a', '1', 'T', '{}')")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(count(&pool).await, 1);
}

#[tokio::test]
async fn tokio_postgres_helpers_write_and_roll_back() {
    let pg = Postgres::start();
    let url = pg.create_migrated_database(&unique("tp")).await;
    let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);

    let tx = client.transaction().await.unwrap();
    let id = outbox::tokio_postgres::write(
        &tx,
        &Event::new("order", "7", "Placed", &json!({"a": 1})).unwrap(),
    )
    .await
    .unwrap();
    let batch: Vec<Event> = (0..3)
        .map(|i| Event::new("order", "7", "Touched", &json!({"i": i})).unwrap())
        .collect();
    outbox::tokio_postgres::write_all(&tx, &batch)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let tx = client.transaction().await.unwrap();
    outbox::tokio_postgres::write(&tx, &Event::new("order", "8", "Lost", &json!({})).unwrap())
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let rows = client
        .query("SELECT id, event_type FROM outbox ORDER BY id", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0].get::<_, uuid::Uuid>(0), id.as_uuid());
    assert!(rows.iter().all(|r| r.get::<_, String>(1) != "Lost"));

    let tx = client.transaction().await.unwrap();
    let err = Outbox::new()
        .max_payload_bytes(4)
        .write_pg(
            &tx,
            &Event::new("order", "9", "Big", &json!({"abc": 1})).unwrap(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PayloadTooLarge { .. }));
}

#[tokio::test]
async fn the_inbox_admits_each_event_once_per_consumer() {
    let pg = Postgres::start();
    let url = pg.create_migrated_database(&unique("inbox")).await;
    let pool = PgPool::connect(&url).await.unwrap();
    let billing = outbox::Inbox::new("billing").unwrap();
    let shipping = outbox::Inbox::new("shipping").unwrap();
    let id = outbox::EventId::new();

    // A rolled-back transaction takes its inbox row with it.
    let mut tx = pool.begin().await.unwrap();
    assert!(billing.record(&mut tx, id).await.unwrap());
    tx.rollback().await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    assert!(
        billing.record(&mut tx, id).await.unwrap(),
        "new after the rollback"
    );
    assert!(
        !billing.record(&mut tx, id).await.unwrap(),
        "second record in the same tx"
    );
    assert!(
        shipping.record(&mut tx, id).await.unwrap(),
        "other consumers are independent"
    );
    tx.commit().await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    assert!(
        !billing.record(&mut tx, id).await.unwrap(),
        "a redelivery is recognised"
    );
    tx.commit().await.unwrap();

    let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let tx = client.transaction().await.unwrap();
    assert!(!billing.record_pg(&tx, id).await.unwrap());
    assert!(
        billing
            .record_pg(&tx, outbox::EventId::new())
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 3);
}
