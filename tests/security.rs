//! What database objects cannot do to the relay: functions planted in a
//! schema on the default search_path are never called by the relay's SQL
//! (its sessions resolve names in pg_catalog only), and its own table is
//! found by the schema it is given, never by the search path.

use std::time::Duration;

use crate::support::fixture::{Fixture, assert_exactly_once};
use crate::support::{Postgres, RelayBuilder, Tansu, unique};

#[tokio::test]
async fn functions_planted_on_the_search_path_are_never_called() {
    let f = Fixture::new().await;
    // Better matches than pg_catalog's variadic format/jsonb_build_object
    // for the argument types the relay's backfill passes: under the default
    // search_path ("$user", public) PostgreSQL would pick these. Each one
    // records that it ran, then answers as the real one would.
    sqlx::raw_sql(
        "CREATE TABLE public.hijacked (fn text);
         CREATE FUNCTION public.format(text, name, name) RETURNS text LANGUAGE sql AS
           $$ INSERT INTO public.hijacked VALUES ('format');
              SELECT pg_catalog.quote_ident($2) || '.' || pg_catalog.quote_ident($3) $$;
         CREATE FUNCTION public.jsonb_build_object(text, integer) RETURNS jsonb LANGUAGE sql AS
           $$ INSERT INTO public.hijacked VALUES ('jsonb_build_object');
              SELECT pg_catalog.jsonb_build_object($1, $2) $$;
         CREATE FUNCTION public.jsonb_build_object(text, bigint) RETURNS jsonb LANGUAGE sql AS
           $$ INSERT INTO public.hijacked VALUES ('jsonb_build_object');
              SELECT pg_catalog.jsonb_build_object($1, $2) $$;",
    )
    .execute(&f.pool)
    .await
    .unwrap();
    // The planted format really is what an unqualified call picks here.
    let picked: String = sqlx::query_scalar("SELECT format('%I.%I', 'a'::name, 'b'::name)")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    assert_eq!(picked, "a.b");
    let planted: i64 = sqlx::query_scalar("SELECT count(*) FROM public.hijacked")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    assert_eq!(
        planted, 1,
        "the planted function is the one PostgreSQL picks"
    );
    sqlx::query("DELETE FROM public.hijacked")
        .execute(&f.pool)
        .await
        .unwrap();

    // Rows before the first start go through the backfill (which uses
    // format and jsonb_build_object), rows after through the stream.
    let mut written = f.write_tx(&[("a".into(), 1), ("b".into(), 1)]).await;
    let mut relay = f.relay().start().await;
    written.extend(f.write_tx(&[("a".into(), 2)]).await);
    let records = f.read(written.len()).await;
    assert_exactly_once(&written, &records);
    assert!(relay.stop().await.success(), "{}", relay.logs());

    let calls: Vec<String> = sqlx::query_scalar("SELECT fn FROM public.hijacked")
        .fetch_all(&f.pool)
        .await
        .unwrap();
    assert!(calls.is_empty(), "planted functions ran: {calls:?}");
}

#[tokio::test]
async fn the_bookkeeping_table_is_found_by_schema_not_by_search_path() {
    crate::support::init_logging();
    let pg = Postgres::start();
    let tansu = Tansu::start();
    let name = unique("db");
    let url = pg.create_database(&name).await;
    // Migrations applied with `app` first on the path: every table lands
    // in schema `app`, as when a service keeps its tables out of public.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA app; ALTER DATABASE \"{name}\" SET search_path = app"
    )))
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    outbox::MIGRATOR.run(&pool).await.unwrap();

    // Without --schema: a configuration error (exit 2) naming the table and
    // the flag, and no slot created.
    let slot = unique("slot");
    let mut relay = RelayBuilder::new(&url, &tansu.brokers(), &slot).spawn();
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert_eq!(status.code(), Some(2), "{logs}");
    assert!(
        logs.contains("bookkeeping table \"public\".outbox_relay_slot is missing")
            && logs.contains("--schema"),
        "{logs}"
    );
    let slots: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1")
            .bind(&slot)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(slots, 0);

    // A decoy bookkeeping table where a search path would look first: the
    // relay never touches it (`--schema app` names the real one).
    sqlx::raw_sql(
        "CREATE TABLE public.outbox_relay_slot (LIKE app.outbox_relay_slot INCLUDING ALL)",
    )
    .execute(&pool)
    .await
    .unwrap();

    // With --schema app: the backfilled row and a streamed one of the same
    // aggregate arrive, in order.
    let aggregate = unique("agg");
    let write = |id: &'static str| {
        let pool = pool.clone();
        let aggregate = aggregate.clone();
        async move {
            let e = outbox::Event::new(&aggregate, id, "Happened", &serde_json::json!({})).unwrap();
            let mut tx = pool.begin().await.unwrap();
            outbox::write(&mut tx, &e).await.unwrap();
            tx.commit().await.unwrap();
            e.id().to_string()
        }
    };
    let first = write("x").await;
    let mut relay = RelayBuilder::new(&url, &tansu.brokers(), &slot)
        .args(["--schema", "app"])
        .start()
        .await;
    let second = write("x").await;
    let topic = format!("outbox.event.{aggregate}");
    let records =
        crate::support::consume(&tansu.brokers(), &[&topic], 2, Duration::from_secs(60)).await;
    let ids: Vec<&str> = records.iter().map(|r| r.id()).collect();
    assert_eq!(ids, [first.as_str(), second.as_str()], "{}", relay.logs());
    assert!(relay.stop().await.success(), "{}", relay.logs());
    let rows = |table: &'static str| {
        let pool = pool.clone();
        let slot = slot.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM {table} WHERE slot_name = $1"
            )))
            .bind(slot)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(rows("app.outbox_relay_slot").await, 1);
    assert_eq!(
        rows("public.outbox_relay_slot").await,
        0,
        "the decoy was used"
    );
}

/// Inserts a row with raw SQL; returns its id, or the database's error.
async fn insert_raw(
    pool: &sqlx::PgPool,
    aggregate_type: &str,
    headers: &str,
    topic: Option<&str>,
) -> Result<String, String> {
    sqlx::query_scalar::<_, uuid::Uuid>(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers, topic) \
         VALUES ($1, 'a', 'Happened', '{}', $2::jsonb, $3) RETURNING id",
    )
    .bind(aggregate_type)
    .bind(headers)
    .bind(topic)
    .fetch_one(pool)
    .await
    .map(|id| id.to_string())
    .map_err(|e| e.to_string())
}

#[tokio::test]
async fn rows_cannot_spoof_the_relays_headers_or_pick_an_illegal_topic() {
    let f = Fixture::new().await;
    let agg = &f.aggregate_type;
    // The table refuses them at INSERT, naming the constraint.
    for spoof in [
        r#"{"id": "00000000-0000-0000-0000-000000000000"}"#,
        r#"{"ID": "x"}"#,
        r#"{"event_type": "Refunded"}"#,
        r#"{"aggregate_id": "someone-else"}"#,
        r#"{"traceparent": "00-x"}"#,
        r#"{"outbox.error": "fake dead letter"}"#,
        r#"{"Outbox.Original_Topic": "x"}"#,
        r#"{"": "empty name"}"#,
        r#"{"\u0131d": "dotless i"}"#,
        r#"{"id ": "trailing space"}"#,
    ] {
        let err = insert_raw(&f.pool, agg, spoof, None).await.unwrap_err();
        assert!(
            err.contains("outbox_headers_not_reserved"),
            "{spoof}: {err}"
        );
    }
    for topic in ["bad/topic", "no spaces", ".", "..", &"t".repeat(250)] {
        let err = insert_raw(&f.pool, agg, "{}", Some(topic))
            .await
            .unwrap_err();
        assert!(err.contains("outbox_topic_legal"), "{topic}: {err}");
    }
    // Headers that are not an object still meet their own constraint first.
    let err = insert_raw(&f.pool, agg, r#"["x"]"#, None)
        .await
        .unwrap_err();
    assert!(err.contains("outbox_headers_object_of_strings"), "{err}");
    insert_raw(
        &f.pool,
        agg,
        r#"{"tenant": "acme", "outboxy": "ok"}"#,
        Some("a.b_c-1"),
    )
    .await
    .expect("ordinary headers and a legal topic are accepted");
    // (Its topic is outside the default allow-list: not this test's subject.)
    sqlx::query("DELETE FROM outbox WHERE topic = 'a.b_c-1'")
        .execute(&f.pool)
        .await
        .unwrap();

    // Rows from before the constraints reach the relay, which refuses them
    // too: dead-lettered here (stop is the default), without the spoofed
    // headers, and the rows around them arrive with one `id` header each.
    f.drop_row_checks().await;
    let dlt = unique("dlt").replace('_', "-");
    let mut relay = f
        .relay()
        .args([
            "--on-undeliverable",
            "dead-letter",
            "--dead-letter-topic",
            &dlt,
        ])
        .spawn();
    relay.wait_streaming().await;
    let mut written = f.write_tx(&[("a".into(), 1)]).await;
    let spoofed = insert_raw(
        &f.pool,
        agg,
        r#"{"id": "00000000-0000-0000-0000-000000000000", "outbox.error": "x"}"#,
        None,
    )
    .await
    .unwrap();
    written.extend(f.write_tx(&[("a".into(), 2)]).await);
    let records = f.read(written.len()).await;
    assert_exactly_once(&written, &records);

    let dead =
        crate::support::consume(&f.tansu.brokers(), &[&dlt], 1, Duration::from_secs(60)).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].id(), spoofed);
    assert_eq!(
        dead[0].header_names.iter().filter(|n| *n == "id").count(),
        1
    );
    assert!(
        dead[0]
            .header("outbox.error")
            .unwrap()
            .contains("sets a header the relay sets itself"),
        "{:?}",
        dead[0].headers
    );
    assert!(relay.stop().await.success(), "{}", relay.logs());
}

/// Item 7 of issue 10: a row cannot publish to (or, with --create-topics,
/// create) a topic outside the allow-list: by default what the template
/// gives; never the dead-letter topic or Kafka's own. Such a row is
/// undeliverable: dead-lettered or, by default, a stop that leaves the slot
/// before it.
#[tokio::test]
async fn rows_cannot_publish_outside_the_allowed_topics() {
    use crate::support::kafka::topic_names;
    use crate::support::postgres::{confirmed_flush, lsn_after};
    let f = Fixture::new().await;
    let agg = &f.aggregate_type;
    let brokers = f.tansu.brokers();
    let dlt = unique("dlt").replace('_', "-");
    let elsewhere = unique("payments.ledger");
    // The fixture's relay creates topics: the allow-list must stop that too.
    let mut relay = f
        .relay()
        .args([
            "--on-undeliverable",
            "dead-letter",
            "--dead-letter-topic",
            &dlt,
        ])
        .spawn();
    relay.wait_streaming().await;
    let mut written = f.write_tx(&[("a".into(), 1)]).await;
    let mut refused = Vec::new();
    for topic in [elsewhere.as_str(), dlt.as_str(), "__consumer_offsets"] {
        refused.push(insert_raw(&f.pool, agg, "{}", Some(topic)).await.unwrap());
    }
    written.extend(f.write_tx(&[("a".into(), 2)]).await);
    let records = f.read(written.len()).await;
    assert_exactly_once(&written, &records);
    let dead = crate::support::kafka::consume_settle(
        &brokers,
        &[&dlt],
        3,
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    let reasons: Vec<_> = dead
        .iter()
        .map(|r| {
            (
                r.id().to_owned(),
                r.header("outbox.error").unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        reasons.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
        refused,
        "{reasons:?}"
    );
    assert!(
        reasons[0]
            .1
            .contains("is not one --topic-template gives (`outbox.event.*`)"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].1.contains("is the dead-letter topic"),
        "{reasons:?}"
    );
    assert!(reasons[2].1.contains("internal topics"), "{reasons:?}");
    // The topic the row asked for travels with its dead letter.
    assert_eq!(
        dead[0].header("outbox.original_topic"),
        Some(elsewhere.as_str())
    );
    assert!(
        !topic_names(&brokers).contains(&elsewhere),
        "the refused row created its topic"
    );
    assert!(relay.stop().await.success(), "{}", relay.logs());

    // A configured list replaces the default; under the default policy a
    // row outside it stops the relay, which confirms nothing past it.
    let listed = unique("orders.v1");
    let allowed = format!("outbox.event.*,{listed}");
    let builder = f.relay().args(["--allowed-topics", &allowed]);
    let mut relay = builder.start().await;
    let to_listed = insert_raw(&f.pool, agg, "{}", Some(&listed)).await.unwrap();
    let got = crate::support::consume(&brokers, &[&listed], 1, Duration::from_secs(60)).await;
    assert_eq!(got[0].id(), to_listed);
    crate::support::postgres::wait_recorded(&f.pool, &f.slot).await;
    let mark: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    let outside = insert_raw(&f.pool, agg, "{}", Some(&elsewhere))
        .await
        .unwrap();
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(
        logs.contains(&format!(
            "outbox event {outside} cannot be published: its topic `{elsewhere}` is not in --allowed-topics (`{allowed}`)"
        )),
        "{logs}"
    );
    let confirmed = confirmed_flush(&f.url, &f.slot).await.unwrap();
    assert!(!lsn_after(&f.url, &confirmed, &mark).await, "{logs}");
    assert!(!topic_names(&brokers).contains(&elsewhere));
}

/// Writes a secret file readable by its owner only, as a secret mount is.
fn secret_file(dir: &std::path::Path, name: &str, contents: &str) -> String {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Item 10 of issue 10: the database URL, its password and Kafka settings
/// come from files (secret mounts), so no secret is on the command line or
/// in the environment; a wrong password from a file is refused by the
/// server, and a librdkafka refusal of a setting from the file names the
/// setting, not its value.
#[tokio::test]
async fn secrets_come_from_files_and_stay_out_of_argv_environment_and_errors() {
    use crate::support::postgres::SUPERUSER;
    let f = Fixture::new().await;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    let relay_url = f.create_relay_role().await;
    f.pg.set_hba(&format!(
        "local all all trust\nhost all {SUPERUSER} 127.0.0.1/32 scram-sha-256\nhost {db} relay 127.0.0.1/32 scram-sha-256\n"
    ));
    let dir = std::env::temp_dir().join(unique("outbox-secrets"));
    std::fs::create_dir_all(&dir).unwrap();
    // The URL without its password; the password alone in its own file.
    let url_file = secret_file(
        &dir,
        "url",
        &format!("{}\n", relay_url.replace(":relay-Pw-1@", "@")),
    );
    let password_file = secret_file(&dir, "password", "relay-Pw-1\n");
    let kafka_file = secret_file(
        &dir,
        "kafka.properties",
        "# as Kafka clients write them\n\nclient.id=relay-from-file\nlinger.ms=2\n",
    );
    let with_files = |password_file: &str, kafka_file: &str| {
        let mut builder = f.relay().args([
            "--database-url-file",
            &url_file,
            "--database-password-file",
            password_file,
            "--kafka-options-file",
            kafka_file,
        ]);
        builder.database_url = String::new();
        builder
    };
    let mut relay = with_files(&password_file, &kafka_file).start().await;
    for what in ["cmdline", "environ"] {
        let seen = std::fs::read(format!("/proc/{}/{what}", relay.pid())).unwrap();
        assert!(
            !String::from_utf8_lossy(&seen).contains("relay-Pw-1"),
            "the password is in the relay's {what}"
        );
    }
    let written = f.write_tx(&[("a".into(), 1), ("a".into(), 2)]).await;
    assert_exactly_once(&written, &f.read(2).await);
    assert!(relay.stop().await.success(), "{}", relay.logs());

    // A wrong password from the file: the server refuses it, by name of the
    // user, without the password in the output.
    let wrong = secret_file(&dir, "wrong", "not-the-Pw-9\n");
    let mut relay = with_files(&wrong, &kafka_file).spawn();
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert!(!status.success(), "{logs}");
    assert!(
        logs.contains("password authentication failed for user \"relay\""),
        "{logs}"
    );
    assert!(!logs.contains("not-the-Pw-9"), "{logs}");

    // A setting librdkafka refuses: named, its value (here a short one, the
    // kind the old redaction let through) withheld.
    let bad = secret_file(&dir, "bad.properties", "linger.ms=xq\n");
    let mut relay = with_files(&password_file, &bad).spawn();
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert_eq!(status.code(), Some(2), "{logs}");
    assert!(
        logs.contains("librdkafka refuses the setting `linger.ms`"),
        "{logs}"
    );
    assert!(!logs.contains("xq"), "{logs}");

    // A line without `=` is refused by its number, not echoed.
    let broken = secret_file(&dir, "broken.properties", "linger.ms=2\nsasl.password\n");
    let mut relay = with_files(&password_file, &broken).spawn();
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert_eq!(status.code(), Some(2), "{logs}");
    assert!(logs.contains("line 2 of --kafka-options-file"), "{logs}");
    assert!(!logs.contains("sasl.password"), "{logs}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `outbox-relay migrate` goes through the relay's own connection rules
/// before sqlx connects (review of issue 10): the same refusal of
/// verify-ca without a CA file, the same security line, the URL and
/// password from files.
#[tokio::test]
async fn migrate_applies_the_relays_connection_rules_and_reads_secret_files() {
    use crate::support::postgres::PASSWORD;
    let pg = Postgres::start();
    let url = pg.create_database(&unique("db")).await;
    let dir = std::env::temp_dir().join(unique("outbox-migrate"));
    std::fs::create_dir_all(&dir).unwrap();
    let migrate = |args: &[&str]| {
        std::process::Command::new(crate::support::relay::binary())
            .arg("migrate")
            .args(args)
            .env_remove("OUTBOX_DATABASE_URL")
            .env_remove("PGSSLROOTCERT")
            .env("HOME", &dir)
            .output()
            .unwrap()
    };
    // sqlx alone took this URL and trusted any public certificate.
    let verify_ca = secret_file(
        &dir,
        "url-verify-ca",
        &format!("{}?sslmode=verify-ca\n", url.split('?').next().unwrap()),
    );
    let out = migrate(&["--database-url-file", &verify_ca]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("verify-ca"), "{stderr}");
    assert!(!stderr.contains(PASSWORD), "{stderr}");

    let without_password = url.replace(&format!(":{PASSWORD}@"), "@");
    assert_ne!(without_password, url);
    let url_file = secret_file(&dir, "url", &format!("{without_password}\n"));
    let password_file = secret_file(&dir, "password", &format!("{PASSWORD}\n"));
    let out = migrate(&[
        "--database-url-file",
        &url_file,
        "--database-password-file",
        &password_file,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the database connection is not encrypted"),
        "{stderr}"
    );
    assert!(stderr.contains("migrations applied"), "{stderr}");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE tablename IN ('outbox', 'outbox_relay_slot')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_metrics_endpoint_survives_many_idle_connections() {
    use crate::support::metrics::scrape;
    let f = Fixture::new().await;
    let port = crate::support::free_port();
    let mut relay = f.relay().metrics_on(port).start().await;
    // More connections than the endpoint keeps (256), none sending a byte.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    // /metrics answers while they are open: the idle ones are closed after
    // the header timeout (5 s), the ones over the limit at once.
    let text = crate::support::wait_for(
        "a scrape with 300 idle connections open",
        Duration::from_secs(30),
        || async { scrape(port).await.ok() },
    )
    .await;
    assert!(
        text.contains("outbox_relay_events_delivered_total"),
        "{text}"
    );
    // Every idle connection was closed by the relay.
    for mut s in idle {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(
            Duration::from_secs(15),
            tokio::io::AsyncReadExt::read(&mut s, &mut buf),
        )
        .await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
    }
    // And the relay kept streaming meanwhile.
    let written = f.write_tx(&[("a".into(), 1)]).await;
    assert_exactly_once(&written, &f.read(1).await);
    assert!(relay.stop().await.success(), "{}", relay.logs());
}

#[tokio::test]
async fn the_documented_role_and_hba_line_are_enough_and_allow_no_physical_copy() {
    use crate::support::postgres::{SUPERUSER, bin};
    let f = Fixture::new().await;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    // The role docs/operations.md documents.
    let relay_url = f.create_relay_role().await;
    let superuser = format!("host all {SUPERUSER} 127.0.0.1/32 scram-sha-256\n");
    // The documented pg_hba.conf line: the database, not `replication`.
    f.pg.set_hba(&format!(
        "local all all trust\n{superuser}host {db} relay 127.0.0.1/32 scram-sha-256\n"
    ));
    // It grants no physical replication: a base backup (a copy of the whole
    // cluster) as the relay's role is refused. Waiting for that also waits
    // for the reload to take effect.
    let backup_dir = std::env::temp_dir().join(unique("outbox-basebackup"));
    let refused = crate::support::wait_for(
        "pg_basebackup refused by pg_hba.conf",
        Duration::from_secs(30),
        || async {
            let out = std::process::Command::new(bin("pg_basebackup"))
                .args(["-h", "127.0.0.1", "-U", "relay", "-X", "none", "-w"])
                .arg("-p")
                .arg(f.pg.port.to_string())
                .arg("-D")
                .arg(&backup_dir)
                .env("PGPASSWORD", "relay-Pw-1")
                .output()
                .expect("run pg_basebackup");
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            (!out.status.success() && err.contains("pg_hba.conf")).then_some(err)
        },
    )
    .await;
    assert!(refused.contains("replication connection"), "{refused}");
    let _ = std::fs::remove_dir_all(&backup_dir);

    // The relay streams through the database line.
    let mut builder = f.relay();
    builder.database_url = relay_url.clone();
    let mut relay = builder.start().await;
    let written = f.write_tx(&[("a".into(), 1), ("a".into(), 2)]).await;
    assert_exactly_once(&written, &f.read(2).await);
    assert!(relay.stop().await.success(), "{}", relay.logs());

    // The `replication` keyword alone (what the runbook used to say) does
    // not admit the relay's logical replication connection.
    f.pg.set_hba(&format!(
        "local all all trust\n{superuser}host replication relay 127.0.0.1/32 scram-sha-256\n"
    ));
    crate::support::wait_for(
        "the relay's database refused by pg_hba.conf",
        Duration::from_secs(30),
        || async {
            match sqlx::PgPool::connect(&relay_url).await {
                Err(e) if e.to_string().contains("pg_hba.conf") => Some(()),
                Err(_) | Ok(_) => None,
            }
        },
    )
    .await;
    let mut builder = f.relay();
    builder.database_url = relay_url;
    let mut relay = builder.spawn();
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert_ne!(status.code(), Some(0), "{logs}");
    assert!(logs.contains("pg_hba.conf"), "{logs}");
}
