//! `outbox-relay migrate`: applies the embedded SQL migrations of the
//! `outbox` crate (outbox table, publication, relay bookkeeping) with sqlx.
//!
//! sqlx speaks the protocol with its own, laxer rules: it answers a
//! cleartext password request over any connection, never binds SCRAM to
//! TLS, and trusts the system's CAs next to `sslrootcert`. So the relay's
//! own client connects first with the same settings (its TLS checks and
//! password rules decide whether migrate goes on, and it logs how the
//! connection is protected), settings sqlx cannot honour are refused
//! (`verify-ca`, which in sqlx would accept any public certificate for any
//! name, and `channel_binding=require`), and sqlx then connects with options
//! built from the same parsed settings, not from the raw URL. What remains
//! (docs/configuration.md): under `prefer`/`require` an active attacker who
//! lets the probe through can still ask sqlx's connection for a cleartext
//! password, and under `verify-full` sqlx also accepts a public CA's
//! certificate for the server's name.

use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::postgres::config::{ChannelBinding, PgConfig, PgHost, SYSTEM_ROOTS, SslMode};
use crate::postgres::connection::{Connection, Mode, quote_ident};
use crate::postgres::tls;
use crate::{Error, Result};

/// Applies every pending migration.
pub async fn run(cfg: &PgConfig) -> Result<()> {
    refuse_what_sqlx_cannot_honour(cfg)?;
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

/// The relay's bookkeeping table alone (`migrate --bookkeeping-only`),
/// applied with the relay's own client.
pub async fn bookkeeping(cfg: &PgConfig, schema: &str) -> Result<()> {
    let mut conn = Connection::connect(cfg, Mode::Sql).await?;
    conn.security().log();
    // The relay's sessions resolve names in pg_catalog only (see
    // `postgres::connection`); the table goes into `schema` (pg_catalog is
    // still searched first for types and functions).
    conn.query(&format!("SET search_path = {}", quote_ident(schema)))
        .await?;
    conn.query(BOOKKEEPING_SQL).await?;
    conn.terminate().await;
    tracing::info!(database = %cfg, "bookkeeping table outbox_relay_slot is in place");
    Ok(())
}

/// The bookkeeping table's DDL.
pub const BOOKKEEPING_SQL: &str = include_str!("../sql/bookkeeping.sql");

fn refuse_what_sqlx_cannot_honour(cfg: &PgConfig) -> Result<()> {
    let mode = tls::effective_mode(cfg.sslmode, cfg.sslrootcert.as_deref());
    if mode == SslMode::VerifyCa {
        return Err(Error::Config(format!(
            "outbox-relay migrate cannot check sslmode={} (verify-ca{}): it applies the \
             migrations through sqlx, which also trusts the system's public CAs and, under \
             verify-ca, any name; use sslmode=verify-full for migrate, or apply \
             migrations/ with your own tool",
            cfg.sslmode.as_str(),
            if cfg.sslmode == SslMode::Require {
                ", as require with a CA file means"
            } else {
                ""
            }
        )));
    }
    if cfg.channel_binding == ChannelBinding::Require {
        return Err(Error::Config(
            "outbox-relay migrate cannot honour channel_binding=require: it applies the \
             migrations through sqlx, which does not bind SCRAM to TLS; drop \
             channel_binding=require for migrate (keep sslmode=verify-full), or apply \
             migrations/ with your own tool"
                .into(),
        ));
    }
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
    // Always set: sqlx would otherwise take PGSSLROOTCERT itself, `system`
    // included, as a file name. `system` (libpq's word for the system's
    // trust store) is what sqlx trusts anyway: no extra certificate. With
    // nothing given, libpq's default file ~/.postgresql/root.crt, as the
    // relay's own client reads it.
    opts = match cfg.sslrootcert.as_deref() {
        Some(p) if p.as_os_str() == SYSTEM_ROOTS => opts.ssl_root_cert_from_pem(Vec::new()),
        Some(p) => opts.ssl_root_cert(p),
        None => match tls::default_root_file() {
            Some(p) => opts.ssl_root_cert(p),
            None => opts.ssl_root_cert_from_pem(Vec::new()),
        },
    };
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
        // What sqlx cannot check is refused: verify-ca (also as require
        // with a CA file) and channel_binding=require.
        for url in [
            "postgres://relay@db/app?sslmode=require&sslrootcert=/etc/ca.pem",
            "postgres://relay@db/app?sslmode=verify-ca&sslrootcert=/etc/ca.pem",
            "postgres://relay@db/app?sslmode=verify-full&channel_binding=require",
        ] {
            let cfg = PgConfig::from_url_with_env(url, |_| None).unwrap();
            let err = refuse_what_sqlx_cannot_honour(&cfg)
                .unwrap_err()
                .to_string();
            assert!(err.contains("outbox-relay migrate cannot"), "{url}: {err}");
        }
        let cfg = PgConfig::from_url_with_env(
            "postgres://relay@db/app?sslmode=verify-full&sslrootcert=/etc/ca.pem",
            |_| None,
        )
        .unwrap();
        refuse_what_sqlx_cannot_honour(&cfg).unwrap();
    }
}
