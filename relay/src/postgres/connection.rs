//! A minimal PostgreSQL wire-protocol client: TCP or Unix socket, TLS per
//! `sslmode`, cleartext/MD5/SCRAM-SHA-256 authentication, the simple query
//! protocol, and the CopyBoth sub-protocol that logical replication uses.
//!
//! Why our own: tokio-postgres has no replication mode (see
//! docs/architecture.md). Framing and authentication come from
//! `postgres-protocol`; this module adds what it lacks (CopyBothResponse `W`).

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::PgError;
use crate::postgres::config::{
    AuthMethod, ChannelBinding as ChannelBindingMode, PgConfig, PgHost, SslMode,
};
use crate::{Error, Result};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Which kind of session to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// An ordinary SQL session.
    Sql,
    /// A logical walsender session (`replication=database`): replication
    /// commands plus simple-protocol SQL.
    Replication,
}

/// A message from the server.
#[derive(Debug)]
pub enum Backend {
    /// `d`: CopyData.
    CopyData(Bytes),
    /// `c`: CopyDone.
    CopyDone,
    /// `W`: CopyBothResponse, the start of streaming replication.
    CopyBoth,
    /// `T`: RowDescription, the column names.
    RowDescription(Vec<String>),
    /// `D`: DataRow, text values.
    DataRow(Vec<Option<Bytes>>),
    /// `C`: CommandComplete.
    CommandComplete,
    /// `Z`: ReadyForQuery.
    ReadyForQuery,
    /// `E`: ErrorResponse.
    Error(PgError),
    /// Anything else that needs no action (EmptyQueryResponse, CopyOut...).
    Other(u8),
}

/// One row of a simple query result, values as text.
#[derive(Debug, Clone)]
pub struct Row {
    columns: std::sync::Arc<Vec<String>>,
    values: Vec<Option<Bytes>>,
}

impl Row {
    /// The value of a column as text; `None` for NULL or an unknown column.
    pub fn get(&self, column: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.values
            .get(i)?
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The column names.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// The value of a column as bytes.
    pub fn get_bytes(&self, column: &str) -> Option<&Bytes> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.values.get(i)?.as_ref()
    }
}

/// Longest message accepted before AuthenticationOk: whatever answers on
/// the port cannot have the relay accept a huge message before
/// authentication ends (libpq limits these to 2,000 and 30,000 bytes).
const PRE_AUTH_MAX_MESSAGE: usize = 64 * 1024;

/// Longest message accepted afterwards: PostgreSQL never sends a body over
/// 1 GiB - 2 (its allocation limit), row data included; the length field
/// counts its own 4 bytes too.
const MAX_MESSAGE: usize = (1 << 30) + 4;

/// Buffer growth per read for a long message: memory follows the bytes
/// that arrived, not the length a message announced.
const READ_GROWTH: usize = 1 << 20;

/// An open connection.
pub struct Connection {
    io: Box<dyn Io>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    endpoint: String,
    /// The longest message `read_frame` accepts right now.
    max_message: usize,
    security: Security,
    /// The server's certificate (DER) when the connection is TLS: SCRAM's
    /// channel binding hashes it.
    server_cert: Option<Vec<u8>>,
}

/// How a connection is protected, as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// A Unix socket: local, no TLS needed.
    UnixSocket,
    /// TCP without TLS: `sslmode=disable`, or `prefer` and the server
    /// declined TLS.
    Plaintext(SslMode),
    /// TLS, verified as far as this `sslmode` asks.
    Tls(SslMode),
}

impl Security {
    /// Whether the server was authenticated by its certificate (verify-ca
    /// checks the chain, verify-full also the host name).
    pub fn server_verified(self) -> bool {
        matches!(self, Security::Tls(SslMode::VerifyCa | SslMode::VerifyFull))
    }
}

impl Security {
    /// Says how a connection is protected (the relay does so each session:
    /// a reconnection may negotiate differently, as `prefer` falls back to
    /// plaintext when the server stops offering TLS), and warns when it is
    /// weak.
    pub fn log(self) {
        match self {
            Security::UnixSocket => {
                tracing::info!(tls = %self, "database connection over a Unix socket")
            }
            Security::Plaintext(_) => tracing::warn!(
                tls = %self,
                "the database connection is not encrypted: the password exchange and every event \
                 cross the network in the clear; set sslmode=verify-full (with sslrootcert) in the \
                 database URL"
            ),
            Security::Tls(_) if !self.server_verified() => tracing::warn!(
                tls = %self,
                "the database connection is encrypted but the server is not authenticated: anyone \
                 in the path can pose as it; set sslmode=verify-full (with sslrootcert)"
            ),
            Security::Tls(_) => {
                tracing::info!(tls = %self, "database connection encrypted, server authenticated")
            }
        }
    }
}

impl fmt::Display for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Security::UnixSocket => f.write_str("unix socket"),
            Security::Plaintext(mode) => write!(f, "none (sslmode={})", mode.as_str()),
            Security::Tls(mode) => write!(f, "{}", mode.as_str()),
        }
    }
}

/// Sets TCP_USER_TIMEOUT: sent data unacknowledged for this long ends the
/// connection. Why: a host (or the server's) that vanishes without closing
/// is otherwise noticed only after TCP's retransmissions give up, 15
/// minutes or more. A busy but live server's kernel still acknowledges, so
/// this never cuts a slow server off (unlike a silence timer, which a
/// walsender replaying a long transaction would trip).
fn set_tcp_user_timeout(tcp: &TcpStream, timeout: std::time::Duration) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let ms = libc::c_uint::try_from(timeout.as_millis()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: a valid socket descriptor and a c_uint option value of the
    // size passed.
    let rc = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Connection {
    /// Connects, negotiates TLS, authenticates and waits for ReadyForQuery.
    pub async fn connect(cfg: &PgConfig, mode: Mode) -> Result<Self> {
        let endpoint = cfg.to_string();
        tokio::time::timeout(
            cfg.connect_timeout,
            Self::connect_inner(cfg, mode, endpoint.clone()),
        )
        .await
        .map_err(|_| Error::Io {
            context: format!("connecting to {endpoint}"),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", cfg.connect_timeout),
            ),
        })?
    }

    async fn connect_inner(cfg: &PgConfig, mode: Mode, endpoint: String) -> Result<Self> {
        let io_err = |source| Error::Io {
            context: format!("connecting to {endpoint}"),
            source,
        };
        let (io, security, server_cert): (Box<dyn Io>, Security, Option<Vec<u8>>) = match &cfg.host
        {
            PgHost::Tcp(host) => {
                let tcp = TcpStream::connect((host.as_str(), cfg.port))
                    .await
                    .map_err(io_err)?;
                tcp.set_nodelay(true).map_err(io_err)?;
                if let Some(timeout) = cfg.tcp_user_timeout {
                    set_tcp_user_timeout(&tcp, timeout).map_err(io_err)?;
                }
                negotiate_tls(tcp, cfg, host).await?
            }
            PgHost::Socket(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", cfg.port));
                let unix = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(io_err)?;
                (Box::new(unix), Security::UnixSocket, None)
            }
        };
        let mut conn = Connection {
            io,
            read_buf: BytesMut::with_capacity(64 * 1024),
            write_buf: BytesMut::new(),
            endpoint,
            max_message: PRE_AUTH_MAX_MESSAGE,
            security,
            server_cert,
        };
        conn.startup(cfg, mode).await?;
        Ok(conn)
    }

    /// How this connection is protected.
    pub fn security(&self) -> Security {
        self.security
    }

    /// The SASL mechanism and channel binding for the server's offer, as
    /// libpq chooses them: SCRAM-SHA-256-PLUS bound to the server's
    /// certificate when the connection is TLS, the server offers it and
    /// `channel_binding` is not `disable`; otherwise SCRAM-SHA-256, saying
    /// "y" (able to bind, server did not offer) over TLS so that a machine
    /// in the middle cannot strip PLUS from the offer unnoticed, and "n"
    /// without TLS.
    fn choose_sasl(
        &self,
        cfg: &PgConfig,
        mechanisms: &[&[u8]],
    ) -> Result<(&'static str, ChannelBinding)> {
        let plus = mechanisms.contains(&sasl::SCRAM_SHA_256_PLUS.as_bytes());
        let plain = mechanisms.contains(&sasl::SCRAM_SHA_256.as_bytes());
        let require = cfg.channel_binding == ChannelBindingMode::Require;
        let refuse = |why: &str| {
            Err(Error::Auth(format!(
                "channel_binding=require in the database URL, but {why}; use scram-sha-256 in \
                 pg_hba.conf over TLS (sslmode=verify-full), or lower channel_binding"
            )))
        };
        let Some(cert) = &self.server_cert else {
            if require {
                return refuse(&format!("the connection to {} is not TLS", self.endpoint));
            }
            // libpq: PLUS binds to TLS, so an offer of it over plaintext
            // means something in the path removed the TLS the server uses.
            if plus {
                return Err(Error::Auth(format!(
                    "{} offers SCRAM-SHA-256-PLUS over a connection without TLS: something in \
                     the path may have stripped TLS; connect with sslmode=verify-full",
                    self.endpoint
                )));
            }
            if !plain {
                return Err(Error::Auth(format!(
                    "{} offers no SASL mechanism this relay can use without TLS (SCRAM-SHA-256)",
                    self.endpoint
                )));
            }
            return Ok((sasl::SCRAM_SHA_256, ChannelBinding::unsupported()));
        };
        if cfg.channel_binding == ChannelBindingMode::Disable {
            if !plain {
                return Err(Error::Auth(format!(
                    "{} offers only SCRAM-SHA-256-PLUS, and channel_binding=disable in the \
                     database URL forbids it",
                    self.endpoint
                )));
            }
            return Ok((sasl::SCRAM_SHA_256, ChannelBinding::unsupported()));
        }
        if plus {
            return match crate::postgres::tls::server_end_point(cert) {
                Some(hash) => Ok((
                    sasl::SCRAM_SHA_256_PLUS,
                    ChannelBinding::tls_server_end_point(hash),
                )),
                // As libpq: no binding data, no connection. (Falling back
                // to "n" would let whoever presented this certificate, which
                // prefer/require do not verify, relay the exchange.)
                None => Err(Error::Auth(format!(
                    "{} offers SCRAM-SHA-256-PLUS, but its certificate's signature algorithm \
                     has no tls-server-end-point hash (e.g. Ed25519), so the exchange cannot be \
                     bound to this connection; use a server certificate signed with RSA or \
                     ECDSA, or set channel_binding=disable",
                    self.endpoint
                ))),
            };
        }
        if require {
            return refuse(&format!(
                "{} does not offer SCRAM-SHA-256-PLUS",
                self.endpoint
            ));
        }
        if !plain {
            return Err(Error::Auth(format!(
                "{} offers no SASL mechanism this relay supports (SCRAM-SHA-256, SCRAM-SHA-256-PLUS)",
                self.endpoint
            )));
        }
        Ok((sasl::SCRAM_SHA_256, ChannelBinding::unrequested()))
    }

    async fn startup(&mut self, cfg: &PgConfig, mode: Mode) -> Result<()> {
        let mut params = vec![
            ("user", cfg.user.as_str()),
            ("database", cfg.dbname.as_str()),
            ("application_name", cfg.application_name.as_str()),
            ("client_encoding", "UTF8"),
            // Names in the relay's SQL resolve in the system catalog only.
            // With the server's default path ("$user", public), a role that
            // may create objects in one of those schemas could plant a better
            // matching function (e.g. `format(text, name, name)` beats
            // `pg_catalog.format(text, VARIADIC "any")`) that would then run
            // with the relay's privileges. pg_temp comes last so that it is
            // not searched first; functions are never looked up there. The
            // relay qualifies its own tables (`--schema`).
            ("search_path", "pg_catalog, pg_temp"),
            // The relay quotes literals by doubling `'` (quote_literal),
            // which is safe only when backslashes are ordinary characters;
            // a database or role default of `off` must not change that.
            ("standard_conforming_strings", "on"),
            // A row-level security policy would silently hide outbox rows
            // from the backfill (events lost) and run its functions with the
            // relay's privileges; with `off`, a query it would affect fails
            // with an error instead.
            ("row_security", "off"),
        ];
        if mode == Mode::Replication {
            params.push(("replication", "database"));
        }
        frontend::startup_message(params, &mut self.write_buf)
            .map_err(|e| self.io_error("startup", e))?;
        self.flush().await?;

        let mut scram: Option<ScramSha256> = None;
        let mut scram_continued = false;
        let mut scram_verified = false;
        // Whether the SCRAM exchange is bound to this TLS connection.
        let mut bound = false;
        let mut method_used: Option<AuthMethod> = None;
        loop {
            let (tag, mut body) = self.read_frame().await?;
            match tag {
                b'R' => {
                    if body.len() < 4 {
                        return Err(Error::Protocol("truncated authentication request".into()));
                    }
                    let kind = body.get_i32();
                    if let Some(method) = match kind {
                        3 => Some(AuthMethod::Password),
                        5 => Some(AuthMethod::Md5),
                        10 => Some(AuthMethod::ScramSha256),
                        _ => None,
                    } {
                        self.check_method(cfg, method, method_used)?;
                        method_used = Some(method);
                    }
                    // libpq: with channel_binding=require, only a SCRAM
                    // exchange bound to the TLS connection may end in
                    // AuthenticationOk; nothing else gets a password either.
                    if cfg.channel_binding == ChannelBindingMode::Require
                        && (kind == 3 || kind == 5 || (kind == 0 && !bound))
                    {
                        return Err(Error::Auth(format!(
                            "channel_binding=require in the database URL, but {} {}; use \
                             scram-sha-256 in pg_hba.conf over TLS, or lower channel_binding",
                            self.endpoint,
                            match kind {
                                3 => "asks for a cleartext password (the password is not sent)",
                                5 => "asks for an MD5 password (the password is not sent)",
                                _ if method_used.is_none() =>
                                    "let the user in without authentication",
                                _ => "authenticated without channel binding",
                            }
                        )));
                    }
                    match kind {
                        0 => {
                            if method_used.is_none()
                                && let Some(policy) = &cfg.require_auth
                                && !policy.allows(AuthMethod::None)
                            {
                                return Err(Error::Auth(format!(
                                    "{} let user `{}` in without authentication, which require_auth \
                                     in the database URL does not allow; is this the right server?",
                                    self.endpoint, cfg.user
                                )));
                            }
                            // A SCRAM exchange ends only with the server's
                            // proof (SASLFinal); an AuthenticationOk before
                            // it comes from a server that does not know the
                            // password.
                            if scram.is_some() && !scram_verified {
                                return Err(Error::Auth(format!(
                                    "{} ended SCRAM authentication without proving it knows the \
                                     password (AuthenticationOk before SASLFinal); is this the \
                                     right server?",
                                    self.endpoint
                                )));
                            }
                            self.max_message = MAX_MESSAGE;
                        }
                        3 => {
                            let password = self.password(cfg)?;
                            frontend::password_message(password.as_bytes(), &mut self.write_buf)
                                .map_err(|e| self.io_error("authentication", e))?;
                            self.flush().await?;
                        }
                        5 => {
                            if body.len() < 4 {
                                return Err(Error::Protocol("truncated MD5 salt".into()));
                            }
                            let mut salt = [0u8; 4];
                            body.copy_to_slice(&mut salt);
                            let password = self.password(cfg)?;
                            let hash = postgres_protocol::authentication::md5_hash(
                                cfg.user.as_bytes(),
                                password.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut self.write_buf)
                                .map_err(|e| self.io_error("authentication", e))?;
                            self.flush().await?;
                        }
                        10 => {
                            let mechanisms: Vec<&[u8]> =
                                body.split(|&b| b == 0).filter(|m| !m.is_empty()).collect();
                            let (mechanism, binding) = self.choose_sasl(cfg, &mechanisms)?;
                            bound = mechanism == sasl::SCRAM_SHA_256_PLUS;
                            let password = self.password(cfg)?;
                            let s = ScramSha256::new(password.as_bytes(), binding);
                            frontend::sasl_initial_response(
                                mechanism,
                                s.message(),
                                &mut self.write_buf,
                            )
                            .map_err(|e| self.io_error("authentication", e))?;
                            self.flush().await?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram
                                .as_mut()
                                .filter(|_| !scram_continued)
                                .ok_or_else(|| {
                                    Error::Protocol(
                                        "SASL continue out of order (without a SASL exchange, or twice)"
                                            .into(),
                                    )
                                })?;
                            scram_continued = true;
                            s.update(&body)
                                .map_err(|e| Error::Auth(format!("SCRAM exchange failed: {e}")))?;
                            frontend::sasl_response(s.message(), &mut self.write_buf)
                                .map_err(|e| self.io_error("authentication", e))?;
                            self.flush().await?;
                        }
                        12 => {
                            let s = scram
                                .as_mut()
                                .filter(|_| scram_continued && !scram_verified)
                                .ok_or_else(|| {
                                    Error::Protocol(
                                        "SASL final out of order (before SASL continue, or twice)"
                                            .into(),
                                    )
                                })?;
                            s.finish(&body).map_err(|e| {
                                Error::Auth(format!("the server's SCRAM signature is wrong: {e}"))
                            })?;
                            scram_verified = true;
                        }
                        other => {
                            return Err(Error::Auth(format!(
                                "the server asks for authentication method {other}, which this relay does \
                                 not support; use scram-sha-256, md5 or password in pg_hba.conf"
                            )));
                        }
                    }
                }
                b'E' => {
                    let err = parse_error(body);
                    return Err(if err.code == "28P01" || err.code == "28000" {
                        Error::Auth(format!(
                            "PostgreSQL refused user `{}` at {}: {err}; check the user and password in \
                             --database-url (OUTBOX_DATABASE_URL) and pg_hba.conf",
                            cfg.user, self.endpoint
                        ))
                    } else {
                        Error::Server {
                            context: format!("connecting to {}", self.endpoint),
                            source: Box::new(err),
                        }
                    });
                }
                b'Z' => return Ok(()),
                // ParameterStatus, BackendKeyData, NoticeResponse: nothing to do.
                _ => {}
            }
        }
    }

    /// Whether the server may authenticate this way: one method per
    /// exchange; what `require_auth` allows; and never a password (or its
    /// MD5 hash, which a listener can replay or crack) over a connection
    /// whose server is not authenticated, unless `require_auth` names the
    /// method: a server that declined TLS, or any server in the path under
    /// `sslmode=prefer/require`, could otherwise ask for it.
    fn check_method(
        &self,
        cfg: &PgConfig,
        method: AuthMethod,
        used: Option<AuthMethod>,
    ) -> Result<()> {
        if let Some(used) = used {
            return Err(Error::Protocol(format!(
                "{} asked for {} authentication after {}; one method per connection",
                self.endpoint,
                method.as_str(),
                used.as_str()
            )));
        }
        if let Some(policy) = &cfg.require_auth
            && !policy.allows(method)
        {
            return Err(Error::Auth(format!(
                "{} asks for {} authentication, which require_auth in the database URL does not \
                 allow; is this the right server?",
                self.endpoint,
                method.as_str()
            )));
        }
        let exposes_password = matches!(method, AuthMethod::Password | AuthMethod::Md5);
        let server_verified =
            self.security == Security::UnixSocket || self.security.server_verified();
        if exposes_password
            && !server_verified
            && !cfg
                .require_auth
                .as_ref()
                .is_some_and(|policy| policy.names(method))
        {
            return Err(Error::Auth(format!(
                "{} asks for {} authentication over a connection whose server is not \
                 authenticated (tls={}); the password is not sent. Use scram-sha-256 in \
                 pg_hba.conf, or sslmode=verify-full, or allow it explicitly with \
                 require_auth={} in the database URL",
                self.endpoint,
                method.as_str(),
                self.security,
                method.as_str()
            )));
        }
        Ok(())
    }

    fn password(&self, cfg: &PgConfig) -> Result<String> {
        cfg.password.as_ref().map(|p| p.expose().to_owned()).ok_or_else(|| {
            Error::Auth(format!(
                "PostgreSQL at {} asks for a password for user `{}` but none was given; put it in the \
                 database URL, PGPASSWORD or --database-password-file (.pgpass and PGPASSFILE are \
                 not read)",
                self.endpoint, cfg.user
            ))
        })
    }

    /// Runs one statement with the simple query protocol and returns its rows.
    pub async fn query(&mut self, sql: &str) -> Result<Vec<Row>> {
        self.send_query(sql).await?;
        let mut columns = std::sync::Arc::new(Vec::new());
        let mut rows = Vec::new();
        let mut error = None;
        let mut malformed = None;
        loop {
            match self.recv().await? {
                Backend::RowDescription(names) => columns = std::sync::Arc::new(names),
                Backend::DataRow(values) => {
                    // A row must match its description: `Row::get` looks
                    // values up by the column's position. Read on to
                    // ReadyForQuery so the connection stays in step.
                    if values.len() != columns.len() {
                        malformed.get_or_insert_with(|| {
                            Error::Protocol(format!(
                                "a DataRow of `{}` has {} values for {} columns",
                                first_words(sql),
                                values.len(),
                                columns.len()
                            ))
                        });
                        continue;
                    }
                    rows.push(Row {
                        columns: columns.clone(),
                        values,
                    })
                }
                Backend::Error(e) => error = Some(e),
                Backend::ReadyForQuery => break,
                _ => {}
            }
        }
        if let Some(err) = malformed {
            return Err(err);
        }
        match error {
            Some(source) => Err(Error::Server {
                context: format!("running `{}`", first_words(sql)),
                source: Box::new(source),
            }),
            None => Ok(rows),
        }
    }

    /// Sends a Query message without waiting for its answer.
    pub async fn send_query(&mut self, sql: &str) -> Result<()> {
        frontend::query(sql, &mut self.write_buf)
            .map_err(|e| self.io_error("sending a query", e))?;
        self.flush().await
    }

    /// Sends a CopyData message (used for standby status updates).
    pub async fn send_copy_data(&mut self, data: &[u8]) -> Result<()> {
        self.write_buf.extend_from_slice(b"d");
        self.write_buf
            .extend_from_slice(&((data.len() + 4) as i32).to_be_bytes());
        self.write_buf.extend_from_slice(data);
        self.flush().await
    }

    /// Sends CopyDone, ending our side of a CopyBoth stream.
    pub async fn send_copy_done(&mut self) -> Result<()> {
        frontend::copy_done(&mut self.write_buf);
        self.flush().await
    }

    /// Ends the session politely.
    pub async fn terminate(mut self) {
        frontend::terminate(&mut self.write_buf);
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }

    /// Reads the next message, skipping notices and parameter changes.
    ///
    /// Cancel-safe: a partly received message stays in the read buffer, so
    /// this can be one branch of a `select!`.
    pub async fn recv(&mut self) -> Result<Backend> {
        loop {
            let (tag, body) = self.read_frame().await?;
            let msg = match tag {
                b'd' => Backend::CopyData(body),
                b'c' => Backend::CopyDone,
                b'W' => Backend::CopyBoth,
                b'T' => Backend::RowDescription(parse_row_description(body)?),
                b'D' => Backend::DataRow(parse_data_row(body)?),
                b'C' => Backend::CommandComplete,
                b'Z' => Backend::ReadyForQuery,
                b'E' => Backend::Error(parse_error(body)),
                b'N' => {
                    let notice = parse_error(body);
                    tracing::debug!(notice = %notice, "postgres notice");
                    continue;
                }
                b'S' | b'K' => continue,
                other => Backend::Other(other),
            };
            return Ok(msg);
        }
    }

    async fn read_frame(&mut self) -> Result<(u8, Bytes)> {
        loop {
            if self.read_buf.len() >= 5 {
                let len = i32::from_be_bytes(self.read_buf[1..5].try_into().expect("4 bytes"));
                if len < 4 {
                    return Err(Error::Protocol(format!("message length {len} is invalid")));
                }
                if len as usize > self.max_message {
                    return Err(Error::Protocol(format!(
                        "the server announced a message of {len} bytes (type `{}`), more than the {} \
                         bytes allowed {}; is this a PostgreSQL server?",
                        char::from(self.read_buf[0]).escape_default(),
                        self.max_message,
                        if self.max_message == PRE_AUTH_MAX_MESSAGE {
                            "before authentication ends"
                        } else {
                            "in one message"
                        }
                    )));
                }
                let total = 1 + len as usize;
                if self.read_buf.len() >= total {
                    let mut frame = self.read_buf.split_to(total).freeze();
                    let tag = frame.get_u8();
                    frame.advance(4);
                    return Ok((tag, frame));
                }
                self.read_buf
                    .reserve((total - self.read_buf.len()).min(READ_GROWTH));
            }
            let n = self
                .io
                .read_buf(&mut self.read_buf)
                .await
                .map_err(|e| self.io_error("reading from postgres", e))?;
            if n == 0 {
                return Err(Error::Io {
                    context: format!("reading from {}", self.endpoint),
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ),
                });
            }
        }
    }

    async fn flush(&mut self) -> Result<()> {
        let buf = self.write_buf.split();
        self.io
            .write_all(&buf)
            .await
            .map_err(|e| self.io_error("writing to postgres", e))?;
        self.io
            .flush()
            .await
            .map_err(|e| self.io_error("writing to postgres", e))
    }

    fn io_error(&self, what: &str, source: std::io::Error) -> Error {
        Error::Io {
            context: format!("{what} ({})", self.endpoint),
            source,
        }
    }
}

async fn negotiate_tls(
    mut tcp: TcpStream,
    cfg: &PgConfig,
    host: &str,
) -> Result<(Box<dyn Io>, Security, Option<Vec<u8>>)> {
    let mode = crate::postgres::tls::effective_mode(cfg.sslmode, cfg.sslrootcert.as_deref());
    let Some(tls) = crate::postgres::tls::client_config(mode, cfg.sslrootcert.as_deref())? else {
        return Ok((Box::new(tcp), Security::Plaintext(cfg.sslmode), None));
    };
    let io_err = |source| Error::Io {
        context: format!("negotiating TLS with {host}:{}", cfg.port),
        source,
    };
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    tcp.write_all(&req).await.map_err(io_err)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(io_err)?;
    match answer[0] {
        b'S' => {}
        b'N' if cfg.sslmode == SslMode::Prefer => {
            return Ok((Box::new(tcp), Security::Plaintext(cfg.sslmode), None));
        }
        b'N' => {
            return Err(Error::Tls(format!(
                "the server at {host}:{} does not accept TLS, but the database URL demands it (sslmode); \
                 enable ssl on the server or lower sslmode",
                cfg.port
            )));
        }
        other => {
            return Err(Error::Protocol(format!(
                "unexpected answer 0x{other:02x} to the TLS request"
            )));
        }
    }
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| Error::Tls(format!("`{host}` is not a valid TLS server name: {e}")))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| {
            Error::Tls(format!(
                "handshake with {host}:{} failed: {e}; check sslmode and sslrootcert in the database URL",
                cfg.port
            ))
        })?;
    let server_cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| cert.to_vec());
    Ok((Box::new(stream), Security::Tls(mode), server_cert))
}

fn parse_error(mut body: Bytes) -> PgError {
    let mut err = PgError::default();
    while body.has_remaining() {
        let field = body.get_u8();
        if field == 0 {
            break;
        }
        let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
        let value = String::from_utf8_lossy(&body[..end]).into_owned();
        body.advance((end + 1).min(body.len()));
        match field {
            b'V' => err.severity = value,
            b'S' if err.severity.is_empty() => err.severity = value,
            b'C' => err.code = value,
            b'M' => err.message = value,
            b'D' => err.detail = Some(value),
            b'H' => err.hint = Some(value),
            _ => {}
        }
    }
    err
}

fn parse_row_description(mut body: Bytes) -> Result<Vec<String>> {
    let bad = || Error::Protocol("malformed RowDescription".into());
    if body.len() < 2 {
        return Err(bad());
    }
    let n = body.get_i16();
    // Sized by what the body can hold, not by the count the server claims.
    let mut names = Vec::with_capacity((n.max(0) as usize).min(body.len() / 19));
    for _ in 0..n {
        let end = body.iter().position(|&b| b == 0).ok_or_else(bad)?;
        names.push(String::from_utf8_lossy(&body[..end]).into_owned());
        body.advance(end + 1);
        if body.len() < 18 {
            return Err(bad());
        }
        body.advance(18);
    }
    Ok(names)
}

fn parse_data_row(mut body: Bytes) -> Result<Vec<Option<Bytes>>> {
    let bad = || Error::Protocol("malformed DataRow".into());
    if body.len() < 2 {
        return Err(bad());
    }
    let n = body.get_i16();
    let mut values = Vec::with_capacity((n.max(0) as usize).min(body.len() / 4));
    for _ in 0..n {
        if body.len() < 4 {
            return Err(bad());
        }
        let len = body.get_i32();
        if len < 0 {
            values.push(None);
        } else {
            if body.len() < len as usize {
                return Err(bad());
            }
            values.push(Some(body.split_to(len as usize)));
        }
    }
    Ok(values)
}

/// Quotes a SQL string literal (standard_conforming_strings is on since 9.1).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Quotes a SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn first_words(sql: &str) -> String {
    let words: Vec<&str> = sql.split_whitespace().take(4).collect();
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[test]
    fn parses_error_fields() {
        let mut b = BytesMut::new();
        for (f, v) in [
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', "28P01"),
            (b'M', "password authentication failed"),
            (b'H', "try again"),
        ] {
            b.put_u8(f);
            b.extend_from_slice(v.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
        let e = parse_error(b.freeze());
        assert_eq!(e.code, "28P01");
        assert_eq!(e.severity, "FATAL");
        assert_eq!(e.hint.as_deref(), Some("try again"));
        assert_eq!(
            e.to_string(),
            "password authentication failed (SQLSTATE 28P01); hint: try again"
        );
    }

    #[test]
    fn parses_rows() {
        let mut b = BytesMut::new();
        b.put_i16(2);
        b.put_i32(2);
        b.extend_from_slice(b"ok");
        b.put_i32(-1);
        let values = parse_data_row(b.freeze()).unwrap();
        assert_eq!(values, vec![Some(Bytes::from_static(b"ok")), None]);
        assert!(parse_data_row(Bytes::from_static(&[0, 1, 0, 0, 0, 9])).is_err());
    }

    #[test]
    fn quotes() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    /// A connection to a scripted server: whatever it sends comes from
    /// `script`, after the client's first message (startup) was read.
    fn scripted(script: Vec<u8>) -> Connection {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let _ = server.read(&mut buf).await;
            let _ = server.write_all(&script).await;
            // Keep the server side open while the client reads.
            let _ = server.read(&mut buf).await;
        });
        over(client)
    }

    /// A client connection over `io`, before its startup.
    fn over(io: tokio::io::DuplexStream) -> Connection {
        Connection {
            io: Box::new(io),
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
            endpoint: "scripted".into(),
            max_message: PRE_AUTH_MAX_MESSAGE,
            security: Security::Plaintext(SslMode::Disable),
            server_cert: None,
        }
    }

    /// Settings from a URL alone: the caller's PG* variables play no part.
    fn url(url: &str) -> PgConfig {
        PgConfig::from_url_with_env(url, |_| None).unwrap()
    }

    fn cfg() -> PgConfig {
        url("postgres://relay:pw@localhost/app?sslmode=disable")
    }

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// Issue 10, item 11: a length field before authentication cannot make
    /// the relay reserve up to 2 GiB.
    #[tokio::test]
    async fn a_huge_message_before_authentication_is_refused() {
        let mut script = vec![b'R'];
        script.extend_from_slice(&0x7fff_fff0_i32.to_be_bytes());
        let mut conn = scripted(script);
        let err = conn.startup(&cfg(), Mode::Sql).await.unwrap_err();
        assert!(matches!(err, Error::Protocol(_)), "{err}");
        assert!(
            err.to_string().contains("before authentication ends"),
            "{err}"
        );
        assert!(
            conn.read_buf.capacity() < 1 << 20,
            "{}",
            conn.read_buf.capacity()
        );
    }

    /// Issue 10, item 11: a DataRow with fewer values than its description
    /// is an error, not an index out of bounds.
    #[tokio::test]
    async fn a_short_data_row_is_an_error_not_a_panic() {
        let mut script = message(b'R', &0_i32.to_be_bytes());
        script.extend(message(b'Z', b"I"));
        let mut desc = 2_i16.to_be_bytes().to_vec();
        for name in [&b"a"[..], &b"b"[..]] {
            desc.extend_from_slice(name);
            desc.extend_from_slice(&[0; 19]);
        }
        script.extend(message(b'T', &desc));
        let mut row = 1_i16.to_be_bytes().to_vec();
        row.extend_from_slice(&1_i32.to_be_bytes());
        row.push(b'x');
        script.extend(message(b'D', &row));
        script.extend(message(b'C', b"SELECT 1\0"));
        script.extend(message(b'Z', b"I"));
        let mut conn = scripted(script);
        conn.startup(&cfg(), Mode::Sql).await.unwrap();
        assert_eq!(conn.max_message, MAX_MESSAGE);
        let err = conn.query("SELECT a, b FROM t").await.unwrap_err();
        assert!(
            err.to_string().contains("has 1 values for 2 columns"),
            "{err}"
        );
        assert!(
            conn.read_buf.is_empty(),
            "read on to ReadyForQuery: the connection stays in step"
        );
    }

    fn cfg_with(params: &str) -> PgConfig {
        url(&format!(
            "postgres://relay:pw@localhost/app?sslmode=disable&{params}"
        ))
    }

    /// What the client wrote after its startup message, as a scripted
    /// server sees it: runs the startup against `script` and returns the
    /// result and whether a password message ('p') was sent.
    async fn startup_sends_password(script: Vec<u8>, cfg: &PgConfig) -> (Result<()>, bool) {
        let (result, sent) = startup_against(script, cfg, None).await;
        (result, sent.first() == Some(&b'p'))
    }

    /// Runs the startup against `script` on a connection that counts as TLS
    /// with `server_cert` when given; returns the result and every byte the
    /// client wrote after its startup message.
    async fn startup_against(
        script: Vec<u8>,
        cfg: &PgConfig,
        server_cert: Option<Vec<u8>>,
    ) -> (Result<()>, Vec<u8>) {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let reader = tokio::spawn(async move {
            let mut startup = vec![0u8; 4096];
            let _ = server.read(&mut startup).await;
            server.write_all(&script).await.unwrap();
            // End of the script, end of the server's stream: a client
            // waiting for more fails instead of hanging.
            server.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let _ = server.read_to_end(&mut rest).await;
            rest
        });
        let mut conn = over(client);
        if server_cert.is_some() {
            conn.security = Security::Tls(SslMode::VerifyFull);
            conn.server_cert = server_cert;
        }
        let result = conn.startup(cfg, Mode::Sql).await;
        drop(conn);
        (result, reader.await.unwrap())
    }

    /// Issue 10, item 2: SCRAM-SHA-256-PLUS with tls-server-end-point over
    /// TLS when offered; "y" over TLS when not offered (so a stripped offer
    /// is detected by the server), "n" without TLS; channel_binding=require
    /// refuses everything but a bound exchange, before any password is sent.
    #[tokio::test]
    async fn channel_binding_is_chosen_as_libpq_does_and_require_is_enforced() {
        let sasl = |mechanisms: &[&str]| {
            let mut body = 10_i32.to_be_bytes().to_vec();
            for m in mechanisms {
                body.extend_from_slice(m.as_bytes());
                body.push(0);
            }
            body.push(0);
            message(b'R', &body)
        };
        // An RSA/SHA-256 certificate shape is enough for the client side.
        let cert = {
            let mut alg = vec![
                0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b, 0x05, 0x00,
            ];
            alg.insert(0, alg.len() as u8);
            alg.insert(0, 0x30);
            let mut body = vec![0x30, 0x00];
            body.extend(alg);
            body.extend([0x03, 0x01, 0x00]);
            let mut cert = vec![0x30, body.len() as u8];
            cert.extend(body);
            cert
        };
        let both = sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        let initial = |sent: &[u8]| String::from_utf8_lossy(sent).into_owned();

        // TLS, PLUS offered: bound.
        let (_, sent) = startup_against(both.clone(), &cfg(), Some(cert.clone())).await;
        let sent = initial(&sent);
        assert!(sent.contains("SCRAM-SHA-256-PLUS\0"), "{sent:?}");
        assert!(sent.contains("p=tls-server-end-point,,n="), "{sent:?}");
        // TLS, PLUS not offered: "y".
        let (_, sent) = startup_against(sasl(&["SCRAM-SHA-256"]), &cfg(), Some(cert.clone())).await;
        assert!(initial(&sent).contains("y,,n="), "{:?}", initial(&sent));
        // channel_binding=disable over TLS, and no TLS: "n".
        let (_, sent) = startup_against(
            both.clone(),
            &cfg_with("channel_binding=disable"),
            Some(cert.clone()),
        )
        .await;
        assert!(
            initial(&sent).contains("SCRAM-SHA-256\0"),
            "{:?}",
            initial(&sent)
        );
        assert!(initial(&sent).contains("n,,n="), "{:?}", initial(&sent));
        let (_, sent) = startup_against(sasl(&["SCRAM-SHA-256"]), &cfg(), None).await;
        assert!(initial(&sent).contains("n,,n="), "{:?}", initial(&sent));
        // PLUS offered without TLS: TLS was stripped on the way (libpq).
        let (result, sent) = startup_against(both.clone(), &cfg(), None).await;
        let err = result.unwrap_err().to_string();
        assert!(err.contains("over a connection without TLS"), "{err}");
        assert!(sent.is_empty());
        // A certificate whose algorithm has no hash (Ed25519): refused even
        // under prefer, rather than falling back to an unbound exchange.
        let ed25519 = {
            let mut c = vec![
                0x30, 0x0b, 0x30, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70,
            ];
            c.extend([0x03, 0x00]);
            c[1] = (c.len() - 2) as u8;
            c
        };
        let (result, sent) = startup_against(both.clone(), &cfg(), Some(ed25519)).await;
        let err = result.unwrap_err().to_string();
        assert!(err.contains("cannot be bound"), "{err}");
        assert!(sent.is_empty());

        // require: refused without TLS, without PLUS, for password, MD5 and
        // trust; nothing is sent in any of these.
        let require = url(
            "postgres://relay:pw@localhost/app?sslmode=prefer&channel_binding=require&require_auth=password,md5,scram-sha-256,none",
        );
        let ok = {
            let mut s = message(b'R', &0_i32.to_be_bytes());
            s.extend(message(b'Z', b"I"));
            s
        };
        let mut md5 = 5_i32.to_be_bytes().to_vec();
        md5.extend_from_slice(b"salt");
        for (script, cert, expect) in [
            (both.clone(), None, "is not TLS"),
            (
                sasl(&["SCRAM-SHA-256"]),
                Some(cert.clone()),
                "does not offer SCRAM-SHA-256-PLUS",
            ),
            (
                message(b'R', &3_i32.to_be_bytes()),
                Some(cert.clone()),
                "cleartext password (the password is not sent)",
            ),
            (
                message(b'R', &md5),
                Some(cert.clone()),
                "MD5 password (the password is not sent)",
            ),
            (ok.clone(), Some(cert.clone()), "without authentication"),
        ] {
            let (result, sent) = startup_against(script, &require, cert).await;
            let err = result.unwrap_err().to_string();
            assert!(err.contains("channel_binding=require"), "{err}");
            assert!(err.contains(expect), "{err}");
            assert!(sent.is_empty(), "sent {:?}", initial(&sent));
        }
        let err = PgConfig::from_url_with_env(
            "postgres://h/d?sslmode=disable&channel_binding=require",
            |_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("channel_binding=require needs TLS"), "{err}");
    }

    /// Issue 10, item 2: a server that is not authenticated (no TLS here)
    /// asking for a cleartext or MD5 password gets nothing, unless
    /// require_auth names the method; require_auth refuses other methods
    /// and a server that skips authentication.
    #[tokio::test]
    async fn passwords_are_not_sent_to_an_unauthenticated_server_unless_allowed() {
        let ok_then_ready = || {
            let mut s = message(b'R', &0_i32.to_be_bytes());
            s.extend(message(b'Z', b"I"));
            s
        };
        let ask = |kind: i32| {
            let mut body = kind.to_be_bytes().to_vec();
            if kind == 5 {
                body.extend_from_slice(b"salt");
            }
            let mut s = message(b'R', &body);
            s.extend(ok_then_ready());
            s
        };
        for kind in [3, 5] {
            let (result, sent) = startup_sends_password(ask(kind), &cfg()).await;
            let err = result.unwrap_err().to_string();
            assert!(err.contains("the password is not sent"), "{err}");
            assert!(!sent, "a password went to an unauthenticated server");
        }
        let (result, sent) =
            startup_sends_password(ask(3), &cfg_with("require_auth=password")).await;
        result.unwrap();
        assert!(sent, "require_auth=password allows it explicitly");
        let (result, sent) =
            startup_sends_password(ask(5), &cfg_with("require_auth=md5,scram-sha-256")).await;
        result.unwrap();
        assert!(sent);
        // require_auth refuses a method it does not list, and trust.
        let (result, sent) =
            startup_sends_password(ask(5), &cfg_with("require_auth=scram-sha-256")).await;
        assert!(result.unwrap_err().to_string().contains("does not allow"));
        assert!(!sent);
        let (result, _) =
            startup_sends_password(ok_then_ready(), &cfg_with("require_auth=scram-sha-256")).await;
        assert!(
            result
                .unwrap_err()
                .to_string()
                .contains("without authentication")
        );
        let (result, _) =
            startup_sends_password(ok_then_ready(), &cfg_with("require_auth=!password,!md5")).await;
        result.unwrap();
        // The negated form forbids but does not name: still no password in
        // the clear.
        let (result, sent) = startup_sends_password(ask(3), &cfg_with("require_auth=!md5")).await;
        assert!(
            result
                .unwrap_err()
                .to_string()
                .contains("the password is not sent")
        );
        assert!(!sent);
    }

    #[tokio::test]
    async fn sasl_messages_out_of_order_are_refused() {
        let mut sasl = 10_i32.to_be_bytes().to_vec();
        sasl.extend_from_slice(b"SCRAM-SHA-256\0\0");
        // SASLFinal straight after the initial response, without SASLContinue.
        let mut script = message(b'R', &sasl);
        let mut fin = 12_i32.to_be_bytes().to_vec();
        fin.extend_from_slice(b"v=AAAA");
        script.extend(message(b'R', &fin));
        let mut conn = scripted(script);
        let err = conn.startup(&cfg(), Mode::Sql).await.unwrap_err();
        assert!(err.to_string().contains("SASL final out of order"), "{err}");
    }

    /// Issue 10, item 2 (in part): AuthenticationOk in the middle of a SCRAM
    /// exchange, before the server proved it knows the password, is refused.
    #[tokio::test]
    async fn authentication_ok_before_the_scram_proof_is_refused() {
        let mut sasl = 10_i32.to_be_bytes().to_vec();
        sasl.extend_from_slice(b"SCRAM-SHA-256\0\0");
        let mut script = message(b'R', &sasl);
        script.extend(message(b'R', &0_i32.to_be_bytes()));
        script.extend(message(b'Z', b"I"));
        let mut conn = scripted(script);
        let err = conn.startup(&cfg(), Mode::Sql).await.unwrap_err();
        assert!(matches!(err, Error::Auth(_)), "{err}");
        assert!(err.to_string().contains("before SASLFinal"), "{err}");
    }

    /// Issue 10, item 11: after authentication a message may be long, but
    /// the buffer grows with what arrived, not with the announced length.
    #[tokio::test]
    async fn memory_follows_the_bytes_that_arrived() {
        let mut script = message(b'R', &0_i32.to_be_bytes());
        script.extend(message(b'Z', b"I"));
        script.push(b'D');
        script.extend_from_slice(&900_000_000_i32.to_be_bytes());
        script.extend_from_slice(&[0; 10]);
        let mut conn = scripted(script);
        conn.startup(&cfg(), Mode::Sql).await.unwrap();
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(300), conn.read_frame()).await;
        assert!(pending.is_err(), "the rest of the message never comes");
        assert!(
            conn.read_buf.capacity() <= 4 * READ_GROWTH,
            "{} bytes reserved for 15 received",
            conn.read_buf.capacity()
        );
    }

    proptest::proptest! {
        /// Issue 10, item 11: no server bytes make the message parsers panic.
        #[test]
        fn parsers_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let body = Bytes::from(body);
            let _ = parse_error(body.clone());
            let _ = parse_row_description(body.clone());
            let _ = parse_data_row(body);
        }

        /// Issue 10, item 11: the framing, the startup and authentication
        /// loop and a query, against a server sending well-framed messages
        /// of any tag and body (then any bytes, then end of stream): they
        /// end with a result, never a panic or a hang, and never hold more
        /// memory than a pre-authentication message may take. 256 cases
        /// here; a longer run: PROPTEST_CASES=100000 cargo test -p
        /// pg-outbox-relay --lib never_panic.
        #[test]
        fn the_startup_and_query_loop_never_panics(
            frames in proptest::collection::vec(
                (
                    proptest::sample::select(Vec::from(&b"RZTDCEINSKpv0123AVWHGcdfs"[..])),
                    proptest::collection::vec(proptest::num::u8::ANY, 0..48),
                ),
                0..10,
            ),
            auth in proptest::collection::vec(0i32..13, 0..4),
            raw in proptest::collection::vec(proptest::num::u8::ANY, 0..48),
            // Half the cases count as TLS with a server certificate of
            // random bytes: the channel-binding choice and its DER walk.
            cert in proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..64)),
        ) {
            // Authentication requests with plausible codes first, so the
            // run reaches past the first message.
            let mut script = Vec::new();
            for code in auth {
                script.extend(message(b'R', &code.to_be_bytes()));
            }
            for (tag, body) in frames {
                script.extend(message(tag, &body));
            }
            script.extend(raw);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let capacity = runtime.block_on(async move {
                let (client, mut server) = tokio::io::duplex(1 << 20);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let _ = server.read(&mut buf).await;
                    let _ = server.write_all(&script).await;
                    // Then the end of the stream.
                });
                let mut conn = over(client);
                if cert.is_some() {
                    conn.security = Security::Tls(SslMode::Require);
                    conn.server_cert = cert;
                }
                let limit = std::time::Duration::from_secs(5);
                let started = tokio::time::timeout(limit, conn.startup(&cfg(), Mode::Sql))
                    .await
                    .expect("the startup ends with the stream");
                if started.is_ok() {
                    let _ = tokio::time::timeout(limit, conn.query("SELECT 1"))
                        .await
                        .expect("the query ends with the stream");
                }
                conn.read_buf.capacity()
            });
            proptest::prop_assert!(capacity <= 4 * READ_GROWTH + PRE_AUTH_MAX_MESSAGE, "{capacity}");
        }
    }
}
