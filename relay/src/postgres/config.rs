//! PostgreSQL connection settings, parsed from a `postgres://` URL the way
//! libpq reads one. Passwords are redacted from every `Debug` and `Display`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::{Error, Result};

/// How to use TLS with PostgreSQL, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never.
    Disable,
    /// TLS if the server offers it, unverified.
    Prefer,
    /// TLS always, certificate not verified.
    Require,
    /// TLS always, certificate chain verified, host name not.
    VerifyCa,
    /// TLS always, certificate chain and host name verified.
    VerifyFull,
}

/// Where PostgreSQL listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgHost {
    /// A TCP host name or address.
    Tcp(String),
    /// A Unix socket directory.
    Socket(PathBuf),
}

/// A password that never prints.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Connection settings for PostgreSQL, parsed from a `postgres://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgConfig {
    /// Host or socket directory.
    pub host: PgHost,
    /// Port (also names the Unix socket file).
    pub port: u16,
    /// Role name.
    pub user: String,
    /// Password, if any.
    pub password: Option<Secret>,
    /// Database name.
    pub dbname: String,
    /// TLS mode.
    pub sslmode: SslMode,
    /// CA certificates (PEM) for verify-ca and verify-full.
    pub sslrootcert: Option<PathBuf>,
    /// Reported in pg_stat_activity.
    pub application_name: String,
    /// Connection timeout.
    pub connect_timeout: Duration,
}

impl fmt::Display for PgConfig {
    /// The URL without the password, for logs and errors.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            PgHost::Tcp(h) => write!(
                f,
                "postgres://{}@{}:{}/{}",
                self.user, h, self.port, self.dbname
            ),
            PgHost::Socket(p) => write!(
                f,
                "postgres://{}@/{}?host={}&port={}",
                self.user,
                self.dbname,
                p.display(),
                self.port
            ),
        }
    }
}

impl PgConfig {
    /// Parses a `postgres://` or `postgresql://` URL. Errors never echo the
    /// password.
    pub fn from_url(raw: &str) -> Result<Self> {
        // libpq accepts `postgres://user@/db?host=/socket/dir`; the url crate
        // refuses user info without a host, so give it a placeholder host that
        // the `host` parameter then replaces.
        let url = match url::Url::parse(raw) {
            Err(url::ParseError::EmptyHost) if raw.contains("@/") => {
                url::Url::parse(&raw.replacen("@/", "@localhost/", 1))
            }
            other => other,
        };
        let url = url.map_err(|e| {
            Error::Config(format!(
                "the database URL is malformed ({e}); expected postgres://user:password@host:5432/database"
            ))
        })?;
        if url.scheme() != "postgres" && url.scheme() != "postgresql" {
            return Err(Error::Config(format!(
                "the database URL must start with postgres:// or postgresql://, not {}://",
                url.scheme()
            )));
        }
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| Error::Config("the database URL has invalid percent-encoding".into()))
        };
        let mut user = decode(url.username())?;
        let mut password = url.password().map(decode).transpose()?.map(Secret);
        let mut host = url
            .host_str()
            .map(|h| PgHost::Tcp(h.trim_matches(['[', ']']).to_owned()));
        let mut port = url.port().unwrap_or(5432);
        let mut dbname = decode(url.path().trim_start_matches('/'))?;
        let mut sslmode = SslMode::Prefer;
        let mut sslrootcert = None;
        let mut application_name = "outbox-relay".to_owned();
        let mut connect_timeout = Duration::from_secs(10);
        for (key, value) in url.query_pairs() {
            let value = value.into_owned();
            match key.as_ref() {
                "sslmode" => {
                    sslmode = match value.as_str() {
                        "disable" => SslMode::Disable,
                        "prefer" | "allow" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        other => {
                            return Err(Error::Config(format!(
                                "sslmode `{other}` in the database URL is not one of disable, prefer, \
                                 require, verify-ca, verify-full"
                            )));
                        }
                    }
                }
                "sslrootcert" => sslrootcert = Some(PathBuf::from(value)),
                "application_name" => application_name = value,
                "connect_timeout" => {
                    let secs: u64 = value.parse().map_err(|_| {
                        Error::Config(format!(
                            "connect_timeout `{value}` in the database URL is not a number of seconds"
                        ))
                    })?;
                    connect_timeout = Duration::from_secs(secs.max(1));
                }
                "host" => {
                    host = Some(if value.starts_with('/') {
                        PgHost::Socket(PathBuf::from(value))
                    } else {
                        PgHost::Tcp(value)
                    })
                }
                "port" => {
                    port = value.parse().map_err(|_| {
                        Error::Config(format!(
                            "port `{value}` in the database URL is not a port number"
                        ))
                    })?
                }
                "user" => user = value,
                "password" => password = Some(Secret(value)),
                "dbname" => dbname = value,
                other => {
                    return Err(Error::Config(format!(
                        "unknown parameter `{other}` in the database URL; supported: sslmode, sslrootcert, \
                         application_name, connect_timeout, host, port, user, password, dbname"
                    )));
                }
            }
        }
        if user.is_empty() {
            user = std::env::var("PGUSER").unwrap_or_else(|_| "postgres".to_owned());
        }
        if password.is_none() {
            password = std::env::var("PGPASSWORD").ok().map(Secret);
        }
        if dbname.is_empty() {
            dbname = user.clone();
        }
        let host = host.unwrap_or_else(|| PgHost::Tcp("localhost".to_owned()));
        if matches!(host, PgHost::Socket(_))
            && sslmode != SslMode::Disable
            && sslmode != SslMode::Prefer
        {
            return Err(Error::Config(format!(
                "sslmode={} cannot be used with a Unix socket; use a TCP host or sslmode=disable",
                match sslmode {
                    SslMode::Require => "require",
                    SslMode::VerifyCa => "verify-ca",
                    _ => "verify-full",
                }
            )));
        }
        Ok(Self {
            host,
            port,
            user,
            password,
            dbname,
            sslmode,
            sslrootcert,
            application_name,
            connect_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let c = PgConfig::from_url(
            "postgres://relay:s%40cret@db.example:6543/app?sslmode=verify-full&sslrootcert=/ca.pem",
        )
        .unwrap();
        assert_eq!(c.host, PgHost::Tcp("db.example".into()));
        assert_eq!(c.port, 6543);
        assert_eq!(c.user, "relay");
        assert_eq!(c.password.as_ref().unwrap().expose(), "s@cret");
        assert_eq!(c.dbname, "app");
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.sslrootcert, Some(PathBuf::from("/ca.pem")));
        let shown = format!("{c} {c:?}");
        assert!(
            !shown.contains("s@cret") && !shown.contains("s%40cret"),
            "{shown}"
        );

        let c = PgConfig::from_url("postgresql://u@/db?host=/run/postgresql&port=5433").unwrap();
        assert_eq!(c.host, PgHost::Socket("/run/postgresql".into()));
        assert_eq!(c.port, 5433);
        assert_eq!(c.sslmode, SslMode::Prefer);
    }

    #[test]
    fn refuses_bad_urls_without_echoing_the_password() {
        for (url, expect) in [
            ("not a url", "malformed"),
            ("mysql://u:hunter2@h/db", "must start with postgres://"),
            ("postgres://u:hunter2@h/db?sslmode=maybe", "sslmode `maybe`"),
            (
                "postgres://u:hunter2@h/db?sslmod=require",
                "unknown parameter `sslmod`",
            ),
            ("postgres://u:hunter2@h:99999/db", "malformed"),
        ] {
            let err = PgConfig::from_url(url).unwrap_err().to_string();
            assert!(err.contains(expect), "{url}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
}
