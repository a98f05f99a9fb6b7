//! Command-line and environment configuration, and its validation into the
//! typed settings the relay runs with. Everything here is checked before any
//! connection is made; secrets are redacted from every `Debug` and `Display`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{Error, Result};

/// Relays outbox events from a PostgreSQL logical replication slot to Kafka.
#[derive(Parser)]
#[command(name = "outbox-relay", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,

    /// Log format.
    #[arg(long, env = "OUTBOX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Stream outbox inserts from the WAL to Kafka until stopped (SIGTERM/SIGINT).
    Run(Box<RunArgs>),
    /// Apply the SQL migrations (outbox table, publication, relay bookkeeping).
    Migrate(MigrateArgs),
}

/// Log output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of `outbox-relay migrate`.
#[derive(Args)]
pub struct MigrateArgs {
    /// PostgreSQL URL, e.g. postgres://relay:secret@db:5432/app?sslmode=verify-full.
    #[arg(long, env = "OUTBOX_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

/// Flags of `outbox-relay run`.
#[derive(Args)]
pub struct RunArgs {
    /// PostgreSQL URL, e.g. postgres://relay:secret@db:5432/app?sslmode=verify-full.
    /// Query parameters: sslmode (disable, prefer, require, verify-ca, verify-full),
    /// sslrootcert, application_name, connect_timeout, host (a socket directory).
    #[arg(long, env = "OUTBOX_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Kafka bootstrap servers, comma-separated host:port list.
    #[arg(long, env = "OUTBOX_KAFKA_BROKERS")]
    pub kafka_brokers: String,

    /// Logical replication slot to read from; created (with a backfill of the
    /// rows already in the outbox) when missing. Lowercase letters, digits and `_`.
    #[arg(long, env = "OUTBOX_SLOT", default_value = "outbox_relay")]
    pub slot: String,

    /// Publication that selects the outbox table(s).
    #[arg(long, env = "OUTBOX_PUBLICATION", default_value = "outbox_pub")]
    pub publication: String,

    /// Topic for events without a per-row topic. Placeholders: {aggregate_type}, {event_type}.
    #[arg(
        long,
        env = "OUTBOX_TOPIC_TEMPLATE",
        default_value = "outbox.event.{aggregate_type}"
    )]
    pub topic_template: String,

    /// A librdkafka producer setting as key=value (repeatable; comma-separated in the
    /// environment variable), e.g. --kafka-option security.protocol=SASL_SSL.
    #[arg(
        long = "kafka-option",
        env = "OUTBOX_KAFKA_OPTIONS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub kafka_options: Vec<String>,

    /// Create missing topics through the Kafka admin API instead of stopping.
    #[arg(long, env = "OUTBOX_CREATE_TOPICS")]
    pub create_topics: bool,

    /// Partitions of topics created with --create-topics (default: the
    /// broker's num.partitions).
    #[arg(long, env = "OUTBOX_TOPIC_PARTITIONS")]
    pub topic_partitions: Option<i32>,

    /// Replication factor of topics created with --create-topics (default:
    /// the broker's default.replication.factor).
    #[arg(long, env = "OUTBOX_TOPIC_REPLICATION_FACTOR")]
    pub topic_replication_factor: Option<i32>,

    /// Most events published but not yet acknowledged by Kafka; when reached the
    /// relay stops reading WAL until acknowledgements free room. Bounds memory and
    /// the number of duplicates after a crash.
    #[arg(long, env = "OUTBOX_MAX_IN_FLIGHT", default_value_t = 10_000)]
    pub max_in_flight: usize,

    /// Interval of standby status updates to PostgreSQL (e.g. 10s, 500ms).
    #[arg(long, env = "OUTBOX_STATUS_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub status_interval: Duration,

    /// Time allowed for connecting to PostgreSQL and for the first broker contact.
    #[arg(long, env = "OUTBOX_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Longest wait between reconnection attempts after a retryable failure.
    #[arg(long, env = "OUTBOX_MAX_BACKOFF", default_value = "30s", value_parser = parse_duration)]
    pub max_backoff: Duration,

    /// What to do with an event Kafka refuses for good (too large, invalid topic,
    /// not authorized) or a row that is not a valid event: `stop` names it and
    /// stops without confirming past it; `dead-letter` publishes it to
    /// --dead-letter-topic with the error in the `outbox.error` header and goes on.
    #[arg(long, env = "OUTBOX_ON_UNDELIVERABLE", value_enum, default_value_t = Undeliverable::Stop)]
    pub on_undeliverable: Undeliverable,

    /// Topic for undeliverable events under `--on-undeliverable dead-letter`.
    #[arg(
        long,
        env = "OUTBOX_DEAD_LETTER_TOPIC",
        default_value = "outbox.dead-letter"
    )]
    pub dead_letter_topic: String,

    /// Serve Prometheus metrics (delivered events, lag, commit-to-ack latency) at
    /// http://ADDR/metrics, e.g. 0.0.0.0:9187. Off when not given.
    #[arg(long, env = "OUTBOX_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Kafka never gives up on an event by itself: when the oldest event
    /// handed to it has waited this long for an acknowledgement, the relay
    /// logs a warning (repeated at this interval) and reports it in the
    /// `outbox_relay_delivery_stalled_seconds` metric, and keeps waiting.
    #[arg(long, env = "OUTBOX_STALL_WARNING", default_value = "30s", value_parser = parse_duration)]
    pub stall_warning: Duration,

    /// Time allowed on SIGTERM/SIGINT for Kafka to acknowledge what was sent.
    #[arg(long, env = "OUTBOX_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
}

/// The policy for events Kafka will not take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Undeliverable {
    /// Stop, name the event, keep the slot where it was.
    Stop,
    /// Publish it to the dead-letter topic and go on.
    DeadLetter,
}

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

/// One piece of a topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    AggregateType,
    EventType,
}

/// The topic for events without a per-row topic, e.g. `outbox.event.{aggregate_type}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    segments: Vec<Segment>,
}

impl TopicTemplate {
    /// Parses a template; unknown placeholders and unbalanced braces are errors.
    pub fn parse(template: &str) -> Result<Self> {
        let bad = |why: String| Error::Config(format!("topic template `{template}`: {why}"));
        let mut segments = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            if let Some(open) = rest.find(['{', '}']) {
                if rest.as_bytes()[open] == b'}' {
                    return Err(bad("`}` without a matching `{`".into()));
                }
                if open > 0 {
                    segments.push(Segment::Literal(rest[..open].to_owned()));
                }
                let close = rest[open..]
                    .find('}')
                    .ok_or_else(|| bad("`{` without a matching `}`".into()))?;
                let name = &rest[open + 1..open + close];
                segments.push(match name {
                    "aggregate_type" => Segment::AggregateType,
                    "event_type" => Segment::EventType,
                    other => {
                        return Err(bad(format!(
                            "unknown placeholder `{{{other}}}`; use {{aggregate_type}} or {{event_type}}"
                        )));
                    }
                });
                rest = &rest[open + close + 1..];
            } else {
                segments.push(Segment::Literal(rest.to_owned()));
                rest = "";
            }
        }
        if segments.is_empty() {
            return Err(bad("the template is empty".into()));
        }
        for s in &segments {
            if let Segment::Literal(lit) = s
                && !lit
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
            {
                return Err(bad(format!(
                    "`{lit}` has characters Kafka topic names cannot contain (allowed: letters, digits, `.`, `_`, `-`)"
                )));
            }
        }
        Ok(Self { segments })
    }

    /// The topic for one event.
    pub fn render(&self, aggregate_type: &str, event_type: &str) -> String {
        let mut out = String::new();
        for s in &self.segments {
            match s {
                Segment::Literal(l) => out.push_str(l),
                Segment::AggregateType => out.push_str(aggregate_type),
                Segment::EventType => out.push_str(event_type),
            }
        }
        out
    }
}

/// Kafka producer settings.
#[derive(Clone)]
pub struct KafkaConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// Extra librdkafka settings, applied after the relay's defaults.
    pub options: Vec<(String, String)>,
    /// Create missing topics.
    pub create_topics: bool,
    /// Partitions for created topics; `None`: the broker's default.
    pub topic_partitions: Option<i32>,
    /// Replication factor for created topics; `None`: the broker's default.
    pub topic_replication_factor: Option<i32>,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Options may hold SASL passwords or key material: print names only.
        let names: Vec<&str> = self.options.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("options", &names)
            .field("create_topics", &self.create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("topic_replication_factor", &self.topic_replication_factor)
            .finish()
    }
}

/// Everything `outbox-relay run` needs, validated.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// PostgreSQL connection.
    pub pg: PgConfig,
    /// Replication slot.
    pub slot: String,
    /// Publication.
    pub publication: String,
    /// Topic template.
    pub topic_template: TopicTemplate,
    /// Kafka.
    pub kafka: KafkaConfig,
    /// In-flight window.
    pub max_in_flight: usize,
    /// Status update interval.
    pub status_interval: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Reconnect backoff ceiling.
    pub max_backoff: Duration,
    /// Shutdown grace.
    pub shutdown_timeout: Duration,
    /// When to report a stalled delivery.
    pub stall_warning: Duration,
    /// The dead-letter topic, when undeliverable events are parked rather than fatal.
    pub dead_letter_topic: Option<String>,
    /// Where to serve metrics.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl RelayConfig {
    /// Validates the flags of `run`.
    pub fn from_args(args: &RunArgs) -> Result<Self> {
        let mut pg = PgConfig::from_url(&args.database_url)?;
        pg.connect_timeout = args.connect_timeout;
        validate_slot_name(&args.slot)?;
        validate_publication_name(&args.publication)?;
        let topic_template = TopicTemplate::parse(&args.topic_template)?;
        let brokers = args.kafka_brokers.trim().to_owned();
        if brokers.is_empty() {
            return Err(Error::Config(
                "--kafka-brokers (OUTBOX_KAFKA_BROKERS) is empty; give host:port of at least one broker".into(),
            ));
        }
        let options = args
            .kafka_options
            .iter()
            .filter(|o| !o.trim().is_empty())
            .map(|o| parse_kafka_option(o))
            .collect::<Result<Vec<_>>>()?;
        if args.topic_partitions.is_some_and(|p| p < 1) {
            return Err(Error::Config(
                "--topic-partitions must be at least 1".into(),
            ));
        }
        if args.topic_replication_factor.is_some_and(|r| r < 1) {
            return Err(Error::Config(
                "--topic-replication-factor must be at least 1".into(),
            ));
        }
        if args.max_in_flight == 0 {
            return Err(Error::Config("--max-in-flight must be at least 1".into()));
        }
        let dead_letter_topic = match args.on_undeliverable {
            Undeliverable::Stop => None,
            Undeliverable::DeadLetter => {
                outbox::topic::validate(&args.dead_letter_topic).map_err(|why| {
                    Error::Config(format!(
                        "--dead-letter-topic `{}` is not a legal Kafka topic: {why}",
                        args.dead_letter_topic
                    ))
                })?;
                Some(args.dead_letter_topic.clone())
            }
        };
        if args.status_interval.is_zero() {
            return Err(Error::Config(
                "--status-interval must be longer than zero".into(),
            ));
        }
        Ok(Self {
            pg,
            slot: args.slot.clone(),
            publication: args.publication.clone(),
            topic_template,
            kafka: KafkaConfig {
                brokers,
                options,
                create_topics: args.create_topics,
                topic_partitions: args.topic_partitions,
                topic_replication_factor: args.topic_replication_factor,
            },
            max_in_flight: args.max_in_flight,
            status_interval: args.status_interval,
            connect_timeout: args.connect_timeout,
            max_backoff: args.max_backoff.max(Duration::from_millis(100)),
            shutdown_timeout: args.shutdown_timeout,
            stall_warning: args.stall_warning.max(Duration::from_secs(1)),
            dead_letter_topic,
            metrics_addr: args.metrics_addr,
        })
    }
}

/// Postgres slot names: 1 to 63 of lowercase letters, digits and underscores.
pub fn validate_slot_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(Error::Config(format!(
            "slot name `{name}` is not valid; PostgreSQL allows 1 to 63 lowercase letters, digits and `_`"
        )));
    }
    Ok(())
}

fn validate_publication_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 63 || name.contains('\0') {
        return Err(Error::Config(format!(
            "publication name `{name}` is not valid; it must be 1 to 63 bytes"
        )));
    }
    Ok(())
}

fn parse_kafka_option(option: &str) -> Result<(String, String)> {
    let (key, value) = option.split_once('=').ok_or_else(|| {
        // Only the key part is echoed: the value may be a secret.
        let key = option.split('=').next().unwrap_or_default();
        Error::Config(format!(
            "--kafka-option `{key}` must be written as key=value"
        ))
    })?;
    let key = key.trim();
    if key.is_empty() {
        return Err(Error::Config(
            "--kafka-option has an empty key; write key=value".into(),
        ));
    }
    if key == "bootstrap.servers" || key == "metadata.broker.list" {
        return Err(Error::Config(format!(
            "set the brokers with --kafka-brokers, not --kafka-option {key}=..."
        )));
    }
    if let Some(why) = weakens_delivery(key, value.trim()) {
        return Err(Error::Config(format!(
            "--kafka-option {key}={} is refused: {why}",
            value.trim()
        )));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// Producer settings that would break the relay's promise (nothing lost,
/// nothing reordered), and why. The relay sets these itself.
fn weakens_delivery(key: &str, value: &str) -> Option<&'static str> {
    let value = value.to_ascii_lowercase();
    let value = value.as_str();
    match key {
        "partitioner" if value == "random" => Some(
            "a random partitioner spreads one aggregate's events over partitions, so consumers \
             see them out of order; the key (aggregate id) must pick the partition",
        ),
        "enable.idempotence" if value != "true" => Some(
            "without idempotence a retried request can duplicate or reorder records within a partition",
        ),
        "acks" | "request.required.acks" if !matches!(value, "all" | "-1") => Some(
            "only acks=all makes an acknowledged record survive the loss of the partition leader, \
             and the relay confirms WAL positions on acknowledgement",
        ),
        "message.timeout.ms" | "delivery.timeout.ms" if value != "0" => Some(
            "a finite timeout makes librdkafka fail the oldest records during a long outage and \
             send the records behind them first (an aggregate's events reordered); the relay waits \
             without a timeout and reports stalls (--stall-warning)",
        ),
        "enable.gapless.guarantee" if value != "true" => Some(
            "without it, records behind one the broker refused are still sent, ahead of the refused \
             record's place",
        ),
        "retries" | "message.send.max.retries" => Some(
            "limiting retries makes librdkafka give up on records during an outage; the relay \
             retries without limit",
        ),
        "transactional.id" => Some("the relay's producer is idempotent, not transactional"),
        _ => None,
    }
}

/// Parses `500ms`, `10s`, `2m`, `1h` (a bare number means seconds).
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration; write e.g. 500ms, 10s, 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("`{s}` has an unknown unit; use ms, s, m or h")),
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

    #[test]
    fn topic_templates() {
        let t = TopicTemplate::parse("outbox.event.{aggregate_type}").unwrap();
        assert_eq!(t.render("order", "Placed"), "outbox.event.order");
        let t = TopicTemplate::parse("{aggregate_type}-{event_type}").unwrap();
        assert_eq!(t.render("order", "Placed"), "order-Placed");
        for (bad, expect) in [
            ("outbox.{aggregate}", "unknown placeholder `{aggregate}`"),
            ("outbox.{aggregate_type", "without a matching `}`"),
            ("outbox}", "without a matching `{`"),
            (
                "out box.{aggregate_type}",
                "characters Kafka topic names cannot contain",
            ),
            ("", "empty"),
        ] {
            let err = TopicTemplate::parse(bad).unwrap_err().to_string();
            assert!(err.contains(expect), "{bad}: {err}");
        }
    }

    #[test]
    fn slot_names_and_options() {
        assert!(validate_slot_name("outbox_relay_1").is_ok());
        for bad in ["", "Outbox", "a-b", "a b", &"x".repeat(64)] {
            let err = validate_slot_name(bad).unwrap_err().to_string();
            assert!(err.contains("lowercase letters"), "{err}");
        }
        assert_eq!(
            parse_kafka_option("linger.ms=5").unwrap(),
            ("linger.ms".into(), "5".into())
        );
        let err = parse_kafka_option("sasl.password").unwrap_err().to_string();
        assert!(err.contains("key=value"));
        let err = parse_kafka_option("bootstrap.servers=x:1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--kafka-brokers"));
    }

    /// Path 9 of issue 9: options that silently weakened the guarantees.
    #[test]
    fn options_that_weaken_delivery_are_refused() {
        for (option, why) in [
            ("enable.idempotence=false", "without idempotence"),
            ("acks=1", "acks=all"),
            ("request.required.acks=0", "acks=all"),
            ("message.timeout.ms=300000", "finite timeout"),
            ("delivery.timeout.ms=1000", "finite timeout"),
            ("enable.gapless.guarantee=false", "refused"),
            ("retries=3", "retries"),
            ("transactional.id=x", "not transactional"),
            ("partitioner=random", "random partitioner"),
        ] {
            let err = parse_kafka_option(option).unwrap_err().to_string();
            assert!(err.contains(why), "{option}: {err}");
            assert!(err.contains("is refused"), "{option}: {err}");
        }
        for fine in [
            "enable.idempotence=true",
            "enable.idempotence=True",
            "partitioner=murmur2_random",
            "acks=all",
            "acks=-1",
            "message.timeout.ms=0",
            "linger.ms=5",
            "compression.type=zstd",
        ] {
            assert!(parse_kafka_option(fine).is_ok(), "{fine}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }
}
