//! PostgreSQL connection settings, parsed from a `postgres://` URL the way
//! libpq reads one, with libpq's environment variables (`PGHOST`, `PGPORT`,
//! `PGDATABASE`, `PGUSER`, `PGPASSWORD`, `PGSSLMODE`, `PGSSLROOTCERT`,
//! `PGREQUIREAUTH`, `PGCHANNELBINDING`, `PGAPPNAME`, `PGCONNECT_TIMEOUT`) filling what the URL leaves out, as
//! libpq and sqlx (`outbox-relay migrate`) do. Passwords are redacted from
//! every `Debug` and `Display`.

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
    /// Wraps a password.
    pub fn new(value: String) -> Self {
        Self(value)
    }

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
    /// libpq's `require_auth`, when given.
    pub require_auth: Option<RequireAuth>,
    /// libpq's `channel_binding`.
    pub channel_binding: ChannelBinding,
    /// Reported in pg_stat_activity.
    pub application_name: String,
    /// Connection timeout.
    pub connect_timeout: Duration,
    /// TCP_USER_TIMEOUT of the relay's sockets: how long sent data may go
    /// unacknowledged before the kernel gives the connection up (a vanished
    /// host). `None`: the system's default (many minutes).
    pub tcp_user_timeout: Option<Duration>,
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

impl SslMode {
    /// libpq's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str, source: &str) -> Result<Self> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::Config(format!(
                    "sslmode `{}` in {source} is not one of disable, prefer, require, verify-ca, \
                     verify-full",
                    other.escape_debug()
                )));
            }
        })
    }
}

/// libpq's `channel_binding`: whether SCRAM binds the authentication to
/// the TLS connection (SCRAM-SHA-256-PLUS, `tls-server-end-point`), so that
/// a machine in the middle holding its own certificate cannot relay it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelBinding {
    /// Never bind.
    Disable,
    /// Bind when the connection is TLS and the server offers it (default).
    Prefer,
    /// Bind or refuse to connect: the server must authenticate with
    /// SCRAM-SHA-256-PLUS over TLS.
    Require,
}

impl ChannelBinding {
    fn parse(value: &str, source: &str) -> Result<Self> {
        Ok(match value {
            "disable" => ChannelBinding::Disable,
            "prefer" => ChannelBinding::Prefer,
            "require" => ChannelBinding::Require,
            other => {
                return Err(Error::Config(format!(
                    "channel_binding `{}` in {source} is not one of disable, prefer, require",
                    other.escape_debug()
                )));
            }
        })
    }
}

/// An authentication method, as libpq's `require_auth` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// The server asks for nothing (trust, peer).
    None,
    /// Cleartext password.
    Password,
    /// MD5 password hash.
    Md5,
    /// SCRAM-SHA-256.
    ScramSha256,
}

impl AuthMethod {
    /// libpq's name.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::None => "none",
            AuthMethod::Password => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::ScramSha256 => "scram-sha-256",
        }
    }
}

/// libpq's `require_auth`: the methods the server may use (`a,b`), or the
/// ones it may not (`!a,!b`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequireAuth {
    methods: Vec<AuthMethod>,
    negated: bool,
}

impl RequireAuth {
    fn parse(value: &str) -> Result<Self> {
        let items: Vec<&str> = value.split(',').map(str::trim).collect();
        let negated = items.first().is_some_and(|i| i.starts_with('!'));
        let mut methods = Vec::new();
        for item in items {
            let name = match item.strip_prefix('!') {
                Some(rest) if negated => rest,
                None if !negated => item,
                _ => {
                    return Err(Error::Config(
                        "require_auth in the database URL mixes methods with negated (!) methods; \
                         use one form"
                            .into(),
                    ));
                }
            };
            methods.push(match name {
                "none" => AuthMethod::None,
                "password" => AuthMethod::Password,
                "md5" => AuthMethod::Md5,
                "scram-sha-256" => AuthMethod::ScramSha256,
                other => {
                    return Err(Error::Config(format!(
                        "require_auth method `{}` in the database URL is not one of password, md5, \
                         scram-sha-256, none (this relay does not support gss or sspi)",
                        other.escape_debug()
                    )));
                }
            });
        }
        Ok(Self { methods, negated })
    }

    /// Whether the server may authenticate with `method`.
    pub fn allows(&self, method: AuthMethod) -> bool {
        self.methods.contains(&method) != self.negated
    }

    /// Whether `method` is named as allowed (not just left unforbidden).
    pub fn names(&self, method: AuthMethod) -> bool {
        !self.negated && self.methods.contains(&method)
    }
}

/// `sslrootcert=system`: the system's trust store, and libpq's rule that
/// it is only used with verify-full (with verify-ca, any certificate a
/// public CA issued, for any name, would pass).
pub const SYSTEM_ROOTS: &str = "system";

impl PgConfig {
    /// Parses a `postgres://` or `postgresql://` URL, with libpq's
    /// environment variables for what it leaves out. Errors never echo the
    /// password.
    pub fn from_url(raw: &str) -> Result<Self> {
        Self::from_url_with_env(raw, |name| std::env::var(name).ok())
    }

    /// [`from_url`](Self::from_url) with the environment given as a lookup.
    pub fn from_url_with_env(raw: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        // libpq accepts `postgres://user@/db?host=/socket/dir`; the url crate
        // refuses user info without a host, so give it a placeholder host that
        // the `host` parameter then replaces.
        let mut placeholder_host = false;
        let url = match url::Url::parse(raw) {
            Err(url::ParseError::EmptyHost) if raw.contains("@/") => {
                placeholder_host = true;
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
        let host_param = |value: String| {
            if value.starts_with('/') {
                PgHost::Socket(PathBuf::from(value))
            } else {
                PgHost::Tcp(value)
            }
        };
        let port_param = |value: &str, source: &str| {
            value.parse::<u16>().map_err(|_| {
                Error::Config(format!(
                    "port `{}` in {source} is not a port number",
                    value.escape_debug()
                ))
            })
        };
        let timeout_param = |value: &str, source: &str| {
            value
                .parse::<u64>()
                .map(|secs| Duration::from_secs(secs.max(1)))
                .map_err(|_| {
                    Error::Config(format!(
                        "connect_timeout `{}` in {source} is not a number of seconds",
                        value.escape_debug()
                    ))
                })
        };
        let mut host = url
            .host_str()
            .filter(|h| !h.is_empty() && !placeholder_host)
            .map(|h| PgHost::Tcp(h.trim_matches(['[', ']']).to_owned()));
        let mut port = url.port();
        let mut dbname = decode(url.path().trim_start_matches('/'))?;
        let mut sslmode = None;
        let mut sslrootcert = None;
        let mut require_auth = None;
        let mut channel_binding = None;
        let mut application_name = None;
        let mut connect_timeout = None;
        for (key, value) in url.query_pairs() {
            let value = value.into_owned();
            match key.as_ref() {
                "sslmode" => sslmode = Some(SslMode::parse(&value, "the database URL")?),
                "sslrootcert" => sslrootcert = Some(PathBuf::from(value)),
                "require_auth" => require_auth = Some(RequireAuth::parse(&value)?),
                "channel_binding" => {
                    channel_binding = Some(ChannelBinding::parse(&value, "the database URL")?)
                }
                "application_name" => application_name = Some(value),
                "connect_timeout" => {
                    connect_timeout = Some(timeout_param(&value, "the database URL")?)
                }
                "host" => host = Some(host_param(value)),
                "port" => port = Some(port_param(&value, "the database URL")?),
                "user" => user = value,
                "password" => password = Some(Secret(value)),
                "dbname" => dbname = value,
                other => {
                    return Err(Error::Config(format!(
                        "unknown parameter `{other}` in the database URL; supported: sslmode, sslrootcert, \
                         require_auth, channel_binding, application_name, connect_timeout, host, port, user, password, dbname"
                    )));
                }
            }
        }
        // What the URL leaves out comes from libpq's variables; an empty
        // variable counts as unset, as in libpq, except PGSSLMODE, which
        // libpq refuses when empty (below).
        if env("PGCHANNELBINDING").is_some_and(|v| v.is_empty()) && channel_binding.is_none() {
            return Err(Error::Config(
                "PGCHANNELBINDING is set but empty; unset it or give one of disable, prefer, require"
                    .into(),
            ));
        }
        if env("PGSSLMODE").is_some_and(|v| v.is_empty()) && sslmode.is_none() {
            return Err(Error::Config(
                "PGSSLMODE is set but empty; unset it or give one of disable, prefer, require, \
                 verify-ca, verify-full"
                    .into(),
            ));
        }
        let raw_env = &env;
        let env = |name: &str| env(name).filter(|v| !v.is_empty());
        if user.is_empty() {
            user = env("PGUSER").unwrap_or_else(|| "postgres".to_owned());
        }
        if password.is_none() {
            password = env("PGPASSWORD").map(Secret);
        }
        if dbname.is_empty() {
            dbname = env("PGDATABASE").unwrap_or_else(|| user.clone());
        }
        let host = match host {
            Some(h) => h,
            None => env("PGHOST")
                .map(host_param)
                .unwrap_or_else(|| PgHost::Tcp("localhost".to_owned())),
        };
        let port = match port {
            Some(p) => p,
            None => env("PGPORT")
                .map(|v| port_param(&v, "PGPORT"))
                .transpose()?
                .unwrap_or(5432),
        };
        let sslmode = match sslmode {
            Some(m) => Some(m),
            None => env("PGSSLMODE")
                .map(|v| SslMode::parse(&v, "PGSSLMODE"))
                .transpose()?,
        };
        let require_auth = match require_auth {
            Some(r) => Some(r),
            None => env("PGREQUIREAUTH")
                .map(|v| RequireAuth::parse(&v))
                .transpose()?,
        };
        let channel_binding = match channel_binding {
            Some(c) => c,
            None => env("PGCHANNELBINDING")
                .map(|v| ChannelBinding::parse(&v, "PGCHANNELBINDING"))
                .transpose()?
                .unwrap_or(ChannelBinding::Prefer),
        };
        let sslrootcert = sslrootcert.or_else(|| env("PGSSLROOTCERT").map(PathBuf::from));
        let application_name = application_name
            .or_else(|| env("PGAPPNAME"))
            .unwrap_or_else(|| "outbox-relay".to_owned());
        let connect_timeout = match connect_timeout {
            Some(t) => t,
            None => env("PGCONNECT_TIMEOUT")
                .map(|v| timeout_param(&v, "PGCONNECT_TIMEOUT"))
                .transpose()?
                .unwrap_or(Duration::from_secs(10)),
        };
        let system_roots = sslrootcert
            .as_deref()
            .is_some_and(|p| p.as_os_str() == SYSTEM_ROOTS);
        let sslmode = match sslmode {
            // libpq 16: sslrootcert=system makes verify-full the default...
            None if system_roots => SslMode::VerifyFull,
            None => SslMode::Prefer,
            // ...and refuses any weaker mode with it.
            Some(m) if system_roots && m != SslMode::VerifyFull => {
                return Err(Error::Config(format!(
                    "sslmode={} cannot be used with sslrootcert=system: the system's trust store \
                     vouches for every public certificate, so only verify-full (which checks the \
                     host name) authenticates the server; use sslmode=verify-full",
                    m.as_str()
                )));
            }
            Some(m) => m,
        };
        if matches!(host, PgHost::Socket(_))
            && sslmode != SslMode::Disable
            && sslmode != SslMode::Prefer
        {
            return Err(Error::Config(format!(
                "sslmode={} cannot be used with a Unix socket; use a TCP host or sslmode=disable",
                sslmode.as_str()
            )));
        }
        refuse_unread_variables(&raw_env, &host, sslmode)?;
        if channel_binding == ChannelBinding::Require && sslmode == SslMode::Disable {
            return Err(Error::Config(
                "channel_binding=require needs TLS, and sslmode=disable turns it off; use \
                 sslmode=verify-full"
                    .into(),
            ));
        }
        Ok(Self {
            host,
            port,
            user,
            password,
            dbname,
            sslmode,
            sslrootcert,
            require_auth,
            channel_binding,
            application_name,
            connect_timeout,
            tcp_user_timeout: None,
        })
    }
}

/// libpq variables this relay does not read, refused when they would make
/// libpq connect differently from the relay (a service file, another
/// address, a client certificate, revocation checks, a stricter TLS floor),
/// rather than ignored. Variables that change nothing for this connection
/// (a client certificate with sslmode=disable) pass.
fn refuse_unread_variables(
    env: &impl Fn(&str) -> Option<String>,
    host: &PgHost,
    sslmode: SslMode,
) -> Result<()> {
    let set = |name: &str| env(name).filter(|v| !v.is_empty());
    let tls = sslmode != SslMode::Disable && matches!(host, PgHost::Tcp(_));
    let verifying = matches!(sslmode, SslMode::VerifyCa | SslMode::VerifyFull);
    let socket = matches!(host, PgHost::Socket(_));
    let refused = |name: &str, what: &str| {
        Err(Error::Config(format!(
            "{name} is set, and the relay does not read it ({what}); put the setting in the \
             database URL if it has one, or unset {name}"
        )))
    };
    for (name, applies, what) in [
        (
            "PGSERVICE",
            true,
            "connection service files are not supported",
        ),
        (
            "PGSERVICEFILE",
            true,
            "connection service files are not supported",
        ),
        (
            "PGHOSTADDR",
            true,
            "libpq would connect to that address; give it as the URL's host",
        ),
        ("PGSSLCERT", tls, "client certificates are not supported"),
        ("PGSSLKEY", tls, "client certificates are not supported"),
        (
            "PGSSLCRL",
            verifying,
            "certificate revocation lists are not checked",
        ),
        (
            "PGSSLCRLDIR",
            verifying,
            "certificate revocation lists are not checked",
        ),
        (
            "PGREQUIREPEER",
            socket,
            "the socket peer's user is not checked",
        ),
    ] {
        if applies && set(name).is_some() {
            return refused(name, what);
        }
    }
    if set("PGGSSENCMODE").is_some_and(|v| v == "require") {
        return refused("PGGSSENCMODE", "GSSAPI encryption is not supported");
    }
    if set("PGTARGETSESSIONATTRS").is_some_and(|v| v != "any") {
        return refused(
            "PGTARGETSESSIONATTRS",
            "the relay connects to its one host whatever its role",
        );
    }
    if tls && set("PGSSLMINPROTOCOLVERSION").is_some_and(|v| v == "TLSv1.3") {
        return refused(
            "PGSSLMINPROTOCOLVERSION",
            "the relay accepts TLS 1.2 and 1.3",
        );
    }
    if tls && set("PGSSLNEGOTIATION").is_some_and(|v| v == "direct") {
        return refused(
            "PGSSLNEGOTIATION",
            "the relay negotiates TLS the PostgreSQL way",
        );
    }
    Ok(())
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

    fn with_env(url: &str, vars: &[(&str, &str)]) -> Result<PgConfig> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        PgConfig::from_url_with_env(url, move |name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn libpq_variables_fill_what_the_url_leaves_out() {
        let env = [
            ("PGHOST", "db.internal"),
            ("PGPORT", "6000"),
            ("PGDATABASE", "shop"),
            ("PGUSER", "relay"),
            ("PGPASSWORD", "from-env"),
            ("PGSSLMODE", "verify-full"),
            ("PGSSLROOTCERT", "/etc/ca.pem"),
            ("PGAPPNAME", "relay-7"),
            ("PGCONNECT_TIMEOUT", "3"),
        ];
        let c = with_env("postgres://", &env).unwrap();
        assert_eq!(c.host, PgHost::Tcp("db.internal".into()));
        assert_eq!(c.port, 6000);
        assert_eq!(c.dbname, "shop");
        assert_eq!(c.user, "relay");
        assert_eq!(c.password.as_ref().unwrap().expose(), "from-env");
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.sslrootcert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(c.application_name, "relay-7");
        assert_eq!(c.connect_timeout, Duration::from_secs(3));

        // The URL wins over every variable.
        let c = with_env(
            "postgres://u:p@h:7000/d?sslmode=disable&sslrootcert=/ca2.pem&application_name=a",
            &env,
        )
        .unwrap();
        assert_eq!(c.host, PgHost::Tcp("h".into()));
        assert_eq!(
            (c.port, c.dbname.as_str(), c.user.as_str()),
            (7000, "d", "u")
        );
        assert_eq!(c.password.as_ref().unwrap().expose(), "p");
        assert_eq!(c.sslmode, SslMode::Disable);
        assert_eq!(c.sslrootcert, Some(PathBuf::from("/ca2.pem")));
        assert_eq!(c.application_name, "a");

        // A socket directory from PGHOST; empty variables count as unset,
        // but an empty PGSSLMODE is refused (as libpq does).
        let c = with_env(
            "postgres:///d",
            &[("PGHOST", "/run/postgresql"), ("PGUSER", "")],
        )
        .unwrap();
        assert_eq!(c.host, PgHost::Socket("/run/postgresql".into()));
        assert_eq!(c.sslmode, SslMode::Prefer);
        let err = with_env("postgres://h/d", &[("PGSSLMODE", "")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("PGSSLMODE is set but empty"), "{err}");
        // `postgres://u@/db`: no host in the URL, so PGHOST gives it.
        let c = with_env("postgres://u@/db", &[("PGHOST", "db.internal")]).unwrap();
        assert_eq!(c.host, PgHost::Tcp("db.internal".into()));
        assert_eq!((c.user.as_str(), c.dbname.as_str()), ("u", "db"));
        // PGREQUIREAUTH is read; variables the relay does not read are
        // refused by name rather than ignored.
        let c = with_env("postgres://h/d", &[("PGREQUIREAUTH", "scram-sha-256")]).unwrap();
        assert!(c.require_auth.unwrap().names(AuthMethod::ScramSha256));
        for (name, value) in [
            ("PGSERVICE", "x"),
            ("PGSSLCERT", "x"),
            ("PGSSLKEY", "x"),
            ("PGHOSTADDR", "x"),
            ("PGTARGETSESSIONATTRS", "read-write"),
            ("PGGSSENCMODE", "require"),
            ("PGSSLMINPROTOCOLVERSION", "TLSv1.3"),
        ] {
            let err = with_env("postgres://h/d", &[(name, value)])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("{name} is set, and the relay does not read it")),
                "{err}"
            );
        }
        // Set globally in an image but irrelevant here: they pass.
        for (url, name, value) in [
            ("postgres://h/d?sslmode=disable", "PGSSLCERT", "/c.pem"),
            ("postgres://h/d?sslmode=require", "PGSSLCRL", "/crl.pem"),
            ("postgres://h/d", "PGPASSFILE", "/p"),
            ("postgres://h/d", "PGTARGETSESSIONATTRS", "any"),
            ("postgres://h/d", "PGGSSENCMODE", "prefer"),
        ] {
            with_env(url, &[(name, value)]).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let err = with_env("postgres://h/d", &[("PGCHANNELBINDING", "")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("PGCHANNELBINDING is set but empty"), "{err}");

        let err = with_env("postgres://h/d", &[("PGSSLMODE", "strict")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslmode `strict` in PGSSLMODE"), "{err}");
        let err = with_env("postgres://h/d", &[("PGPORT", "x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("PGPORT"), "{err}");
    }

    #[test]
    fn sslrootcert_system_means_verify_full_only() {
        let c = with_env("postgres://h/d?sslrootcert=system", &[]).unwrap();
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        for weak in ["verify-ca", "require", "prefer", "disable"] {
            let err = with_env(
                &format!("postgres://h/d?sslrootcert=system&sslmode={weak}"),
                &[],
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("only verify-full"), "{weak}: {err}");
        }
        let err = with_env(
            "postgres://h/d",
            &[("PGSSLROOTCERT", "system"), ("PGSSLMODE", "verify-ca")],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sslrootcert=system"), "{err}");
    }

    #[test]
    fn require_auth_is_parsed_as_libpq_does() {
        let c = with_env("postgres://h/d?require_auth=scram-sha-256,none", &[]).unwrap();
        let policy = c.require_auth.unwrap();
        assert!(policy.allows(AuthMethod::ScramSha256) && policy.allows(AuthMethod::None));
        assert!(!policy.allows(AuthMethod::Md5));
        let c = with_env("postgres://h/d?require_auth=!password,!md5", &[]).unwrap();
        let policy = c.require_auth.unwrap();
        assert!(!policy.allows(AuthMethod::Password) && policy.allows(AuthMethod::ScramSha256));
        assert!(!policy.names(AuthMethod::ScramSha256));
        for (bad, expect) in [
            ("md5,!password", "mixes"),
            ("gss", "does not support gss"),
            ("", "is not one of"),
        ] {
            let err = with_env(&format!("postgres://h/d?require_auth={bad}"), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{bad}: {err}");
        }
    }
}
