//! How the relay reaches PostgreSQL: TLS with a self-signed CA (verify-full
//! succeeds with the CA and fails clearly without it; require encrypts
//! without verifying), and a Unix socket.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::fixture::{Fixture, assert_exactly_once};
use crate::support::postgres::Settings;
use crate::support::{Postgres, RelayBuilder, Tansu, unique};

/// A CA and a server certificate for localhost / 127.0.0.1, readable by the
/// server (key mode 0600, owned by `postgres` when we are root).
fn certificates(dir: &Path) {
    crate::support::tls::certificates(dir);
    certificates_readable_by_the_server(dir);
}

/// Hands the certificate files in `dir` to the server's user, keys 0600.
fn certificates_readable_by_the_server(dir: &Path) {
    let _ = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir)
        .status();
    for key in ["server.key", "server384.key"] {
        if dir.join(key).exists() {
            let _ = Command::new("chmod")
                .arg("0600")
                .arg(dir.join(key))
                .status();
        }
    }
    let _ = Command::new("chmod").arg("0755").arg(dir).status();
}

#[tokio::test]
async fn verify_full_needs_the_ca_and_require_does_not() {
    crate::support::init_logging();
    let dir = std::env::temp_dir().join(unique("outbox-tls"));
    certificates(&dir);
    let pg = Postgres::start_with(Settings {
        extra: vec![
            ("ssl".into(), "on".into()),
            (
                "ssl_cert_file".into(),
                dir.join("server.pem").display().to_string(),
            ),
            (
                "ssl_key_file".into(),
                dir.join("server.key").display().to_string(),
            ),
        ],
        ..Settings::default()
    });
    let tansu = Tansu::start();
    let plain = pg.create_migrated_database(&unique("db")).await;
    let base = plain
        .replace("127.0.0.1", "localhost")
        .replace("?sslmode=disable", "");
    let ca = dir.join("ca.pem");

    // verify-full with the CA: the relay streams, and says how it is
    // connected.
    let url = format!("{base}?sslmode=verify-full&sslrootcert={}", ca.display());
    let mut relay = RelayBuilder::new(&url, &tansu.brokers(), &unique("slot"))
        .start()
        .await;
    assert!(
        relay.logs().contains("tls=verify-full") && relay.logs().contains("server authenticated"),
        "{}",
        relay.logs()
    );
    assert!(relay.stop().await.success());

    // The same from libpq's variables, as `migrate` (sqlx) reads them.
    let mut relay = RelayBuilder::new(&base, &tansu.brokers(), &unique("slot"))
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", ca.to_str().unwrap())
        .start()
        .await;
    assert!(relay.logs().contains("tls=verify-full"), "{}", relay.logs());
    assert!(relay.stop().await.success());

    // verify-ca with only the system's trust store would accept any public
    // certificate for any name: refused, naming sslrootcert.
    let url = format!("{base}?sslmode=verify-ca");
    let mut relay = RelayBuilder::new(&url, &tansu.brokers(), &unique("slot"))
        .env("HOME", dir.to_str().unwrap())
        .spawn();
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(
        logs.contains("sslmode=verify-ca needs the CA that signed the server's certificate"),
        "{logs}"
    );

    // verify-full without the CA: a clear TLS error, non-zero exit.
    let url = format!("{base}?sslmode=verify-full");
    let mut relay = RelayBuilder::new(&url, &tansu.brokers(), &unique("slot"))
        .env("HOME", dir.to_str().unwrap())
        .spawn();
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(logs.contains("tls: handshake with localhost"), "{logs}");
    assert!(logs.contains("sslrootcert"), "{logs}");

    // require: encrypted, not verified. The server says the walsender's
    // connection is encrypted (pg_stat_ssl), not just that it streams.
    let url = format!("{base}?sslmode=require");
    let slot = unique("slot");
    let mut relay = RelayBuilder::new(&url, &tansu.brokers(), &slot)
        .start()
        .await;
    let pool = sqlx::PgPool::connect(&plain).await.unwrap();
    let encrypted: Option<bool> = sqlx::query_scalar(
        "SELECT l.ssl FROM pg_replication_slots s JOIN pg_stat_ssl l ON l.pid = s.active_pid \
         WHERE s.slot_name = $1",
    )
    .bind(&slot)
    .fetch_optional(&pool)
    .await
    .unwrap();
    assert_eq!(encrypted, Some(true), "{}", relay.logs());
    assert!(
        relay.logs().contains("tls=require") && relay.logs().contains("not authenticated"),
        "{}",
        relay.logs()
    );
    assert!(relay.stop().await.success());

    let _ = std::fs::remove_dir_all(&dir);
}

/// A PostgreSQL server with TLS on, using `cert`/`key` from `dir`.
fn tls_server(dir: &Path, cert: &str, key: &str) -> Postgres {
    Postgres::start_with(Settings {
        extra: vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), dir.join(cert).display().to_string()),
            ("ssl_key_file".into(), dir.join(key).display().to_string()),
        ],
        ..Settings::default()
    })
}

/// Issue 10, item 2: channel_binding=require authenticates with
/// SCRAM-SHA-256-PLUS, which PostgreSQL checks against its own
/// certificate's tls-server-end-point hash: accepted for an RSA/SHA-256
/// and an ECDSA P-384/SHA-384 certificate (the hash follows the signature
/// algorithm); a server asking for a cleartext password under require is
/// refused without the password being sent.
#[tokio::test]
async fn channel_binding_binds_scram_to_the_servers_certificate() {
    use crate::support::postgres::{PASSWORD, SUPERUSER};
    crate::support::init_logging();
    let dir = std::env::temp_dir().join(unique("outbox-tls-cb"));
    crate::support::tls::certificates(&dir);
    crate::support::tls::server_certificate_p384(&dir);
    certificates_readable_by_the_server(&dir);
    let tansu = Tansu::start();
    for (cert, key) in [
        ("server.pem", "server.key"),
        ("server384.pem", "server384.key"),
    ] {
        let pg = tls_server(&dir, cert, key);
        let plain = pg.create_migrated_database(&unique("db")).await;
        let url = format!(
            "{}?sslmode=verify-full&sslrootcert={}&channel_binding=require",
            plain
                .replace("127.0.0.1", "localhost")
                .replace("?sslmode=disable", ""),
            dir.join("ca.pem").display()
        );
        let mut relay = RelayBuilder::new(&url, &tansu.brokers(), &unique("slot"))
            .start()
            .await;
        assert!(relay.stop().await.success(), "{cert}: {}", relay.logs());

        if cert == "server.pem" {
            // The server asks for a cleartext password instead: refused
            // under require, the password not sent (PostgreSQL would log
            // a failed password attempt had it been).
            pg.set_hba(&format!(
                "local all all trust\nhostssl all {SUPERUSER} all password\nhost all {SUPERUSER} all scram-sha-256\n"
            ));
            let relay_url = format!("{url}&require_auth=password");
            let mut relay =
                RelayBuilder::new(&relay_url, &tansu.brokers(), &unique("slot")).spawn();
            let status = relay.wait_exit(Duration::from_secs(60)).await;
            let logs = relay.logs();
            assert_eq!(status.code(), Some(1), "{logs}");
            assert!(
                logs.contains("channel_binding=require in the database URL, but")
                    && logs.contains("asks for a cleartext password (the password is not sent)"),
                "{logs}"
            );
            assert!(!logs.contains(PASSWORD), "{logs}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn require_against_a_server_without_tls_is_refused() {
    let pg = Postgres::start();
    let tansu = Tansu::start();
    let url = pg
        .create_migrated_database(&unique("db"))
        .await
        .replace("sslmode=disable", "sslmode=require");
    let mut relay = RelayBuilder::new(&url, &tansu.brokers(), &unique("slot")).spawn();
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(logs.contains("does not accept TLS"), "{logs}");

    // PGSSLMODE=require is honoured the same way when the URL is silent.
    let silent = url.replace("?sslmode=require", "");
    let mut relay = RelayBuilder::new(&silent, &tansu.brokers(), &unique("slot"))
        .env("PGSSLMODE", "require")
        .spawn();
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(logs.contains("does not accept TLS"), "{logs}");

    // The default, prefer, falls back to plaintext, and says so.
    let mut relay = RelayBuilder::new(&silent, &tansu.brokers(), &unique("slot"))
        .start()
        .await;
    let logs = relay.logs();
    assert!(
        logs.contains("tls=none (sslmode=prefer)") && logs.contains("not encrypted"),
        "{logs}"
    );
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn a_unix_socket_url_streams_events() {
    let f = Fixture::new().await;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    let mut relay = f.relay();
    relay.database_url = f.pg.socket_url(&db);
    let mut relay = relay.start().await;
    let written = f.write_tx(&[("u1".into(), 1), ("u2".into(), 1)]).await;
    let records = f.read(2).await;
    assert_exactly_once(&written, &records);
    // The walsender's client came through the socket: it has no address.
    let via_socket: Option<bool> = sqlx::query_scalar(
        "SELECT a.client_addr IS NULL FROM pg_replication_slots s \
         JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = $1",
    )
    .bind(&f.slot)
    .fetch_optional(&f.pool)
    .await
    .unwrap();
    assert_eq!(via_socket, Some(true), "{}", relay.logs());
    assert!(relay.stop().await.success(), "{}", relay.logs());
}
