//! The command line: flags and their environment variables, validated into
//! each layer's settings before any connection is made.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::postgres::config::{PgConfig, Secret};
use crate::{Error, Result};
use secrets::read_secret_file;

mod run;
pub mod secrets;

pub use run::{RunArgs, Undeliverable};

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
    /// Delete old outbox and inbox rows in small batches (run it from cron).
    Prune(PruneArgs),
    /// Republish rows still in the outbox table (never touches the slot).
    Replay(Box<ReplayArgs>),
    /// How a slot and its relay are doing; exit code 0 healthy, 1 degraded,
    /// 2 broken, 3 the status could not be read.
    Status(StatusArgs),
    /// Proof of delivery: compare the outbox rows of a time window with
    /// Kafka; report missing, duplicated and reordered events; exit 1 when
    /// any is missing or out of order.
    Verify(Box<VerifyArgs>),
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
    /// The database.
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Create only the relay's bookkeeping table (outbox_relay_slot) for an outbox the relay does not
    /// own: Debezium's outbox table (--table-layout debezium) or the
    /// tableless outbox. Idempotent; touches nothing else.
    #[arg(long, env = "OUTBOX_MIGRATE_BOOKKEEPING_ONLY")]
    pub bookkeeping_only: bool,

    /// With --bookkeeping-only: the schema to create it in (the relay's
    /// --schema). The full migrations use the connection's search_path.
    #[arg(long, env = "OUTBOX_SCHEMA", default_value = "public")]
    pub schema: String,
}

/// Flags of `outbox-relay prune`.
#[derive(Args)]
pub struct PruneArgs {
    /// The database.
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Schema of the outbox, inbox and outbox_relay_slot tables.
    #[arg(long, env = "OUTBOX_SCHEMA", default_value = "public")]
    pub schema: String,

    /// Delete outbox rows created longer ago than this (e.g. 7d, 12h).
    /// Delivery does not need them (the relay reads the WAL); a replay
    /// (republishing from the table) does.
    #[arg(long, env = "OUTBOX_PRUNE_OLDER_THAN", value_parser = parse_duration)]
    pub older_than: Option<Duration>,

    /// Delete inbox rows received longer ago than this (e.g. 30d). Keep
    /// them longer than any redelivery can come late: a pruned id is
    /// applied again if its event arrives again.
    #[arg(long, env = "OUTBOX_PRUNE_INBOX_OLDER_THAN", value_parser = parse_duration)]
    pub inbox_older_than: Option<Duration>,

    /// Rows deleted per transaction.
    #[arg(long, env = "OUTBOX_PRUNE_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: u32,
}

impl PruneArgs {
    /// Validates the flags into what to prune.
    pub fn prune_config(&self) -> Result<crate::prune::PruneConfig> {
        if self.older_than.is_none() && self.inbox_older_than.is_none() {
            return Err(Error::Config(
                "nothing to prune: give --older-than (the outbox) and/or --inbox-older-than".into(),
            ));
        }
        if !(1..=100_000).contains(&self.batch_size) {
            return Err(Error::Config(
                "--batch-size must be between 1 and 100000".into(),
            ));
        }
        run::validate_name("schema", "--schema (OUTBOX_SCHEMA)", &self.schema)?;
        Ok(crate::prune::PruneConfig {
            pg: self.database.pg_config()?,
            schema: self.schema.clone(),
            outbox_older_than: self.older_than,
            inbox_older_than: self.inbox_older_than,
            batch_size: self.batch_size,
        })
    }
}

/// The Kafka flags of `replay` and `verify`: brokers and librdkafka
/// settings (the relay's security settings).
#[derive(Args)]
pub struct KafkaClientArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "OUTBOX_KAFKA_BROKERS")]
    pub kafka_brokers: String,

    /// A librdkafka setting as key=value, verbatim; repeatable.
    #[arg(long = "kafka-option")]
    pub kafka_options: Vec<String>,

    /// A file of librdkafka settings, one key=value per line.
    #[arg(long, env = "OUTBOX_KAFKA_OPTIONS_FILE")]
    pub kafka_options_file: Option<PathBuf>,
}

impl KafkaClientArgs {
    /// Validated into a Kafka configuration (no topic creation).
    pub fn kafka_config(&self) -> Result<crate::kafka::config::KafkaConfig> {
        use crate::kafka::config::parse_kafka_option;
        let options = kafka_option_strings(
            self.kafka_options_file.as_deref(),
            None,
            &self.kafka_options,
        )?
        .iter()
        .map(|o| parse_kafka_option(o))
        .collect::<Result<Vec<_>>>()?;
        if self.kafka_brokers.trim().is_empty() {
            return Err(Error::Config(
                "--kafka-brokers (OUTBOX_KAFKA_BROKERS) is empty".into(),
            ));
        }
        Ok(crate::kafka::config::KafkaConfig {
            brokers: self.kafka_brokers.trim().to_owned(),
            options,
            create_topics: false,
            topic_partitions: None,
            topic_replication_factor: None,
        })
    }
}

/// Flags of `outbox-relay replay`.
#[derive(Args)]
pub struct ReplayArgs {
    /// The database.
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Schema of the outbox table.
    #[arg(long, env = "OUTBOX_SCHEMA", default_value = "public")]
    pub schema: String,

    /// Republish rows created at or after this time (any PostgreSQL
    /// timestamptz, e.g. 2026-11-23T08:00:00Z).
    #[arg(long)]
    pub since: String,

    /// Only rows created before this time.
    #[arg(long)]
    pub until: Option<String>,

    /// Only rows of this aggregate type.
    #[arg(long)]
    pub aggregate_type: Option<String>,

    /// Only this event id (repeatable).
    #[arg(long = "id")]
    pub ids: Vec<String>,

    /// Kafka.
    #[command(flatten)]
    pub kafka: KafkaClientArgs,

    /// Topic template, as given to `run`.
    #[arg(
        long,
        env = "OUTBOX_TOPIC_TEMPLATE",
        default_value = "outbox.event.{aggregate_type}"
    )]
    pub topic_template: String,

    /// Allowed topics, as given to `run`.
    #[arg(long, env = "OUTBOX_ALLOWED_TOPICS")]
    pub allowed_topics: Option<String>,

    /// The dead-letter topic given to `run` (never replayed to).
    #[arg(
        long,
        env = "OUTBOX_DEAD_LETTER_TOPIC",
        default_value = "outbox.dead-letter"
    )]
    pub dead_letter_topic: String,

    /// Time allowed for the broker's first answer and for Kafka to
    /// acknowledge everything at the end.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

impl ReplayArgs {
    /// Validates the flags into what to replay.
    pub fn replay_config(&self) -> Result<crate::replay::ReplayConfig> {
        let topic_template = crate::pipeline::topic::TopicTemplate::parse(&self.topic_template)?;
        let allowed_topics = crate::pipeline::topic::AllowedTopics::parse(
            self.allowed_topics.as_deref(),
            &topic_template,
            &self.dead_letter_topic,
        )?;
        run::validate_name("schema", "--schema (OUTBOX_SCHEMA)", &self.schema)?;
        for id in &self.ids {
            uuid::Uuid::parse_str(id).map_err(|_| {
                Error::Config(format!("--id `{}` is not a UUID", id.escape_debug()))
            })?;
        }
        Ok(crate::replay::ReplayConfig {
            pg: self.database.pg_config()?,
            schema: self.schema.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
            aggregate_type: self.aggregate_type.clone(),
            ids: self.ids.clone(),
            kafka: self.kafka.kafka_config()?,
            topic_template,
            allowed_topics,
            timeout: self.timeout,
        })
    }
}

/// Flags of `outbox-relay verify`.
#[derive(Args)]
pub struct VerifyArgs {
    /// The database.
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Schema of the outbox table.
    #[arg(long, env = "OUTBOX_SCHEMA", default_value = "public")]
    pub schema: String,

    /// Check rows created at or after this time (any PostgreSQL
    /// timestamptz, e.g. 2026-11-23T08:00:00Z).
    #[arg(long)]
    pub since: String,

    /// Check rows created before this time. Default: one minute ago, so
    /// events the relay is still sending are not reported missing.
    #[arg(long)]
    pub until: Option<String>,

    /// Kafka.
    #[command(flatten)]
    pub kafka: KafkaClientArgs,

    /// Topic template, as given to `run`.
    #[arg(
        long,
        env = "OUTBOX_TOPIC_TEMPLATE",
        default_value = "outbox.event.{aggregate_type}"
    )]
    pub topic_template: String,

    /// Time allowed for each Kafka request, and for a silent partition.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
}

impl VerifyArgs {
    /// Validates the flags into what to verify.
    pub fn verify_config(&self) -> Result<crate::verify::VerifyConfig> {
        run::validate_name("schema", "--schema (OUTBOX_SCHEMA)", &self.schema)?;
        Ok(crate::verify::VerifyConfig {
            pg: self.database.pg_config()?,
            schema: self.schema.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
            kafka: self.kafka.kafka_config()?,
            topic_template: crate::pipeline::topic::TopicTemplate::parse(&self.topic_template)?,
            timeout: self.timeout,
        })
    }
}

/// Flags of `outbox-relay status`.
#[derive(Args)]
pub struct StatusArgs {
    /// The database.
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// The relay's replication slot.
    #[arg(long, env = "OUTBOX_SLOT", default_value = "outbox_relay")]
    pub slot: String,

    /// Schema of the outbox, inbox and outbox_relay_slot tables.
    #[arg(long, env = "OUTBOX_SCHEMA", default_value = "public")]
    pub schema: String,

    /// Unconfirmed WAL (bytes) above which the relay counts as degraded.
    #[arg(long, env = "OUTBOX_STATUS_MAX_LAG_BYTES", default_value_t = 128 * 1024 * 1024)]
    pub max_lag_bytes: u64,

    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl StatusArgs {
    /// Validates the flags into what to look at.
    pub fn status_config(&self) -> Result<crate::status::StatusConfig> {
        crate::pipeline::config::validate_slot_name(&self.slot)?;
        run::validate_name("schema", "--schema (OUTBOX_SCHEMA)", &self.schema)?;
        Ok(crate::status::StatusConfig {
            pg: self.database.pg_config()?,
            slot: self.slot.clone(),
            schema: self.schema.clone(),
            max_lag_bytes: self.max_lag_bytes,
        })
    }
}

/// Where the database is and how to log in: the URL, or files holding the
/// URL and the password (secret mounts), so that no secret is on a command
/// line or in the environment.
#[derive(Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://relay:secret@db:5432/app?sslmode=verify-full.
    /// Query parameters: sslmode (disable, prefer, require, verify-ca, verify-full),
    /// sslrootcert, require_auth, application_name, connect_timeout, host (a socket
    /// directory). libpq's PG* variables fill what it leaves out.
    #[arg(
        long,
        env = "OUTBOX_DATABASE_URL",
        hide_env_values = true,
        required_unless_present = "database_url_file",
        conflicts_with = "database_url_file"
    )]
    pub database_url: Option<String>,

    /// A file holding the PostgreSQL URL (one line), instead of --database-url.
    #[arg(long, env = "OUTBOX_DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,

    /// A file holding the database password (one line); it replaces a
    /// password in the URL or PGPASSWORD.
    #[arg(long, env = "OUTBOX_DATABASE_PASSWORD_FILE")]
    pub database_password_file: Option<PathBuf>,
}

impl DatabaseArgs {
    /// The connection settings, files read.
    pub fn pg_config(&self) -> Result<PgConfig> {
        let url = match (&self.database_url, &self.database_url_file) {
            (Some(url), None) => url.clone(),
            (None, Some(path)) => {
                read_secret_file(path, "--database-url-file (OUTBOX_DATABASE_URL_FILE)")?
            }
            _ => {
                return Err(Error::Config(
                    "give the database with exactly one of --database-url (OUTBOX_DATABASE_URL) \
                     and --database-url-file (OUTBOX_DATABASE_URL_FILE)"
                        .into(),
                ));
            }
        };
        let mut pg = PgConfig::from_url(&url)?;
        if let Some(path) = &self.database_password_file {
            pg.password = Some(Secret::new(read_secret_file(
                path,
                "--database-password-file (OUTBOX_DATABASE_PASSWORD_FILE)",
            )?));
        }
        Ok(pg)
    }
}

/// The librdkafka settings given as `key=value` strings, in the order they
/// apply (later wins): `--kafka-options-file`, then the `--kafka-options`
/// list (split where `,key=` follows), then each `--kafka-option` verbatim.
pub fn kafka_option_strings(
    file: Option<&std::path::Path>,
    list: Option<&str>,
    each: &[String],
) -> Result<Vec<String>> {
    let mut options = match file {
        Some(path) => secrets::read_kafka_options_file(
            path,
            "--kafka-options-file (OUTBOX_KAFKA_OPTIONS_FILE)",
        )?,
        None => Vec::new(),
    };
    options.extend(
        list.into_iter()
            .flat_map(crate::kafka::config::split_kafka_options),
    );
    options.extend(each.iter().cloned());
    Ok(options)
}

/// Parses `500ms`, `10s`, `2m`, `1h`, `7d` (a bare number means seconds).
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration; write e.g. 500ms, 10s, 2m"))?;
    let secs = |per: u64| {
        n.checked_mul(per)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("`{s}` is too long a duration"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => Err(format!("`{s}` has an unknown unit; use ms, s, m, h or d")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert!(
            parse_duration("999999999999999999d")
                .unwrap_err()
                .contains("too long")
        );
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }

    /// Issue 10, item 10: a `--kafka-option` value is taken verbatim, commas
    /// and `=` included (librdkafka's `sasl.oauthbearer.extensions` is itself
    /// a comma-separated list of key=value pairs); `--kafka-options` is the
    /// list form.
    #[test]
    fn kafka_option_flags_are_verbatim_and_the_list_is_split() {
        use clap::Parser as _;
        let cli = Cli::try_parse_from([
            "outbox-relay",
            "run",
            "--database-url",
            "postgres://relay@db/app",
            "--kafka-brokers",
            "kafka:9092",
            "--kafka-options",
            "linger.ms=5,sasl.password=a,b",
            "--kafka-option",
            "sasl.oauthbearer.extensions=logicalCluster=lkc-1,identityPoolId=pool-2",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("run")
        };
        let cfg = args.relay_config().unwrap();
        assert_eq!(
            cfg.kafka.options,
            [
                ("linger.ms".to_owned(), "5".to_owned()),
                ("sasl.password".to_owned(), "a,b".to_owned()),
                (
                    "sasl.oauthbearer.extensions".to_owned(),
                    "logicalCluster=lkc-1,identityPoolId=pool-2".to_owned()
                ),
            ]
        );
    }

    /// Issue 11, item 3: `--session-timeout` must leave room for two status
    /// updates (the walsender would end a healthy session otherwise), and
    /// `0` leaves the server's timeouts alone.
    #[test]
    fn the_session_timeout_leaves_room_for_status_updates() {
        use clap::Parser as _;
        let cfg = |extra: &[&str]| {
            let mut argv = vec![
                "outbox-relay",
                "run",
                "--database-url",
                "postgres://relay@db/app",
                "--kafka-brokers",
                "kafka:9092",
            ];
            argv.extend_from_slice(extra);
            let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("run")
            };
            args.relay_config()
        };
        assert_eq!(
            cfg(&[]).unwrap().session_timeout,
            Some(Duration::from_secs(60))
        );
        // A long status interval raises the default instead of refusing.
        assert_eq!(
            cfg(&["--status-interval", "30s"]).unwrap().session_timeout,
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            cfg(&["--session-timeout", "0"]).unwrap().session_timeout,
            None
        );
        let err = cfg(&["--session-timeout", "15s", "--status-interval", "10s"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("twice --status-interval"), "{err}");
        let err = cfg(&["--session-timeout", "1500ms", "--status-interval", "100ms"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 2s"), "{err}");
        assert_eq!(
            cfg(&["--session-timeout", "3s", "--status-interval", "1s"])
                .unwrap()
                .session_timeout,
            Some(Duration::from_secs(3))
        );
    }
}
