//! `outbox-relay migrate`: applies the embedded SQL migrations of the
//! `outbox` crate (outbox table, publication, relay bookkeeping) with sqlx.
//!
//! sqlx speaks the protocol with its own, laxer rules (it answers a
//! cleartext password request over any connection), so the relay's own
//! client connects first with the same settings: its TLS checks
//! (`verify-ca` without a CA file, `sslrootcert=system`) and password rules
//! (`require_auth`, no password to an unauthenticated server) decide
//! whether migrate goes on, and it logs how the connection is protected.
//! sqlx then connects with options built from the same parsed settings, not
//! from the raw URL.

use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::postgres::config::{PgConfig, PgHost, SYSTEM_ROOTS, SslMode};
use crate::postgres::connection::{Connection, Mode};
use crate::postgres::tls;
use crate::{Error, Result};

/// Applies every pending migration.
pub async fn run(cfg: &PgConfig) -> Result<()> {
    let probe = Connection::connect(cfg, Mode::Sql).await?;
    let security = probe.security();
    probe.terminate().await;
    security.log();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(cfg.connect_timeout)
        .connect_with(sqlx_options(cfg))
        .await
        .map_err(|source| Error::Database {
            context: format!("connecting to {cfg}"),
            source: Box::new(source),
        })?;
    outbox::MIGRATOR.run(&pool).await?;
    pool.close().await;
    tracing::info!(database = %cfg, "migrations applied");
    Ok(())
}

/// sqlx's options for the settings the relay parsed (URL and libpq
/// variables), with the TLS mode libpq would apply.
fn sqlx_options(cfg: &PgConfig) -> PgConnectOptions {
    let mode = tls::effective_mode(cfg.sslmode, cfg.sslrootcert.as_deref());
    let mut opts = PgConnectOptions::new_without_pgpass()
        .port(cfg.port)
        .username(&cfg.user)
        .database(&cfg.dbname)
        .application_name(&cfg.application_name)
        .ssl_mode(match mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require => PgSslMode::Require,
            SslMode::VerifyCa => PgSslMode::VerifyCa,
            SslMode::VerifyFull => PgSslMode::VerifyFull,
        });
    opts = match &cfg.host {
        PgHost::Tcp(host) => opts.host(host),
        PgHost::Socket(dir) => opts.socket(dir),
    };
    if let Some(password) = &cfg.password {
        opts = opts.password(password.expose());
    }
    // `system` is libpq's word for the system's trust store, which is what
    // sqlx uses when given no file (its native-roots TLS feature).
    if let Some(root) = cfg
        .sslrootcert
        .as_deref()
        .filter(|p| p.as_os_str() != SYSTEM_ROOTS)
    {
        opts = opts.ssl_root_cert(root);
    }
    opts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlx_gets_the_parsed_settings_not_the_raw_url() {
        let cfg = PgConfig::from_url_with_env("postgres://relay@/app?sslrootcert=system", |name| {
            (name == "PGHOST").then(|| "db.internal".to_owned())
        })
        .unwrap();
        let opts = sqlx_options(&cfg);
        assert_eq!(opts.get_host(), "db.internal");
        assert_eq!(opts.get_username(), "relay");
        assert_eq!(opts.get_database(), Some("app"));
        assert!(matches!(opts.get_ssl_mode(), PgSslMode::VerifyFull));
        let cfg = PgConfig::from_url_with_env(
            "postgres://relay@db/app?sslmode=require&sslrootcert=/etc/ca.pem",
            |_| None,
        )
        .unwrap();
        // libpq: require with a CA file verifies the chain.
        assert!(matches!(
            sqlx_options(&cfg).get_ssl_mode(),
            PgSslMode::VerifyCa
        ));
    }
}
