//! `outbox-relay run`: its flags and their environment variables, validated
//! into the pipeline's settings (and through them the PostgreSQL and Kafka
//! settings) before any connection is made.

use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::cli::{DatabaseArgs, kafka_option_strings, parse_duration};
use crate::kafka::config::{KafkaConfig, parse_kafka_option};
use crate::pipeline::config::{RelayConfig, validate_slot_name};
use crate::pipeline::debezium::{Converter, Debezium};
use crate::pipeline::event::TableLayout;
use crate::pipeline::topic::{AllowedTopics, TopicTemplate};
use crate::traces::{Traces, TracesConfig, TracesExporter};
use crate::{Error, Result};

/// Flags of `outbox-relay run`.
#[derive(Args)]
pub struct RunArgs {
    /// The database.
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Kafka bootstrap servers, comma-separated host:port list.
    #[arg(long, env = "OUTBOX_KAFKA_BROKERS")]
    pub kafka_brokers: String,

    /// Logical replication slot to read from; created (with a backfill of the
    /// rows already in the outbox) when missing. Lowercase letters, digits and `_`.
    #[arg(long, env = "OUTBOX_SLOT", default_value = "outbox_relay")]
    pub slot: String,

    /// On PostgreSQL 17 and later, mark the slot for synchronization to
    /// physical standbys (`FAILOVER`), so that it survives a promotion:
    /// set when the slot is created, and changed on an existing slot at the
    /// next start. The standbys need `sync_replication_slots = on` and the
    /// primary `synchronized_standby_slots` (see docs/operations.md).
    /// Ignored before 17.
    #[arg(long, env = "OUTBOX_SLOT_FAILOVER", default_value_t = true, action = clap::ArgAction::Set)]
    pub slot_failover: bool,

    /// Publication that selects the outbox table(s).
    #[arg(long, env = "OUTBOX_PUBLICATION", default_value = "outbox_pub")]
    pub publication: String,

    /// Schema of the relay's bookkeeping table outbox_relay_slot: the schema
    /// the migrations created it in. The relay's sessions resolve names in
    /// pg_catalog only, so its own table is always named with its schema.
    #[arg(long, env = "OUTBOX_SCHEMA", default_value = "public")]
    pub schema: String,

    /// Topic for events without a per-row topic. Placeholders: {aggregate_type}, {event_type}.
    #[arg(
        long,
        env = "OUTBOX_TOPIC_TEMPLATE",
        default_value = "outbox.event.{aggregate_type}"
    )]
    pub topic_template: String,

    /// Topics events may be published to (and created, with
    /// --create-topics), comma-separated names or patterns where `*` matches
    /// anything, e.g. `outbox.event.*,orders.v1`. Default: only what
    /// --topic-template gives. A row whose topic is outside the list is
    /// undeliverable (see --on-undeliverable). The dead-letter topic and
    /// `__`-prefixed topics are never allowed for events.
    #[arg(long, env = "OUTBOX_ALLOWED_TOPICS")]
    pub allowed_topics: Option<String>,

    /// A librdkafka producer setting as key=value, taken verbatim (commas
    /// included); repeatable, e.g. --kafka-option security.protocol=SASL_SSL.
    /// Applied after --kafka-options. (Its environment form is
    /// OUTBOX_KAFKA_OPTIONS, a list: see --kafka-options.)
    #[arg(long = "kafka-option")]
    pub kafka_options: Vec<String>,

    /// Several librdkafka producer settings, comma-separated
    /// (a=1,b=2); a comma starts a new setting only when `key=` follows it,
    /// so a value may contain commas unless followed by `word=`.
    #[arg(
        long = "kafka-options",
        env = "OUTBOX_KAFKA_OPTIONS",
        hide_env_values = true
    )]
    pub kafka_option_list: Option<String>,

    /// A file of librdkafka producer settings, one key=value per line, the
    /// value verbatim after the first `=` (`#` comments, blank lines
    /// skipped; no escapes or continuations): for secrets such as
    /// sasl.password. Applied first, so --kafka-options and --kafka-option
    /// override it.
    #[arg(long, env = "OUTBOX_KAFKA_OPTIONS_FILE")]
    pub kafka_options_file: Option<std::path::PathBuf>,

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

    /// Most bytes (keys, values and headers) of events handed to Kafka but not
    /// yet acknowledged; like --max-in-flight, reaching it stops reading WAL.
    /// One event larger than the rest of the room still goes, so what is in
    /// flight stays under this plus the largest event.
    #[arg(long, env = "OUTBOX_MAX_IN_FLIGHT_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_in_flight_bytes: u64,

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

    /// The outbox table's layout: `native` (the migrations' `outbox`
    /// table) or `debezium` (Debezium's outbox table: id, aggregatetype,
    /// aggregateid, type, payload; published exactly as Debezium's Outbox
    /// Event Router does with its defaults: key aggregateid, header `id`,
    /// value payload, topic outbox.event.<aggregatetype>).
    #[arg(long, env = "OUTBOX_TABLE_LAYOUT", value_enum, default_value_t = TableLayoutArg::Native)]
    pub table_layout: TableLayoutArg,

    /// With --table-layout debezium: the converter Kafka Connect used for
    /// keys and values, so the bytes match what consumers read before:
    /// `json` (JsonConverter, schemas.enable=false: the key and a string
    /// payload as JSON strings) or `string` (StringConverter: as they are).
    #[arg(long, env = "OUTBOX_DEBEZIUM_CONVERTER", value_enum, default_value_t = Converter::Json)]
    pub debezium_converter: Converter,

    /// With --table-layout debezium: Debezium's `table.expand.json.payload`,
    /// a json/jsonb payload sent as the JSON document instead of a string.
    #[arg(long, env = "OUTBOX_EXPAND_JSON_PAYLOAD", default_value_t = false, action = clap::ArgAction::Set)]
    pub expand_json_payload: bool,

    /// With --table-layout debezium: Debezium's
    /// `table.fields.additional.placement`, comma-separated
    /// `column:header[:alias]` entries, each sending a column as a header
    /// (e.g. `type:header:eventType`). Only the `header` placement exists here.
    #[arg(long, env = "OUTBOX_ADDITIONAL_PLACEMENT", default_value = "")]
    pub additional_placement: String,

    /// Publish logical decoding messages with this prefix as events
    /// (written by `outbox::emit`, the tableless outbox) exactly like table
    /// rows; messages with other prefixes are skipped with a warning. Off
    /// (empty) by default: any database role may call
    /// pg_logical_emit_message, so before turning this on revoke it from
    /// PUBLIC and grant it to the writers (docs/compatibility.md).
    #[arg(long, env = "OUTBOX_MESSAGE_PREFIX", default_value = "")]
    pub message_prefix: String,

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

    /// How long PostgreSQL keeps this instance's sessions once the instance
    /// stops answering (its host vanished, a network partition, a frozen
    /// process), and how long the relay waits on a silent server: the relay
    /// sets `wal_sender_timeout` on its replication session and
    /// `idle_session_timeout` on its slot-lock session (kept busy every third
    /// of this), so a standby takes over within about this long. Default
    /// 60s (PostgreSQL's own `wal_sender_timeout`), or three status
    /// intervals if longer. At least 2s and twice --status-interval; `0`
    /// leaves the server's settings alone (a standby may then wait for TCP
    /// keepalives: hours).
    #[arg(long, env = "OUTBOX_SESSION_TIMEOUT", value_parser = parse_duration)]
    pub session_timeout: Option<Duration>,

    /// Built-in pruner: every --prune-every, delete outbox rows created longer
    /// ago than this, in batches (as `outbox-relay prune --older-than`). Off
    /// when not given.
    #[arg(long, env = "OUTBOX_RUN_PRUNE_OLDER_THAN", value_parser = parse_duration)]
    pub prune_older_than: Option<Duration>,

    /// Built-in pruner: delete inbox rows received longer ago than this (as
    /// `outbox-relay prune --inbox-older-than`). Off when not given.
    #[arg(long, env = "OUTBOX_RUN_PRUNE_INBOX_OLDER_THAN", value_parser = parse_duration)]
    pub prune_inbox_older_than: Option<Duration>,

    /// How often the built-in pruner runs.
    #[arg(long, env = "OUTBOX_PRUNE_EVERY", default_value = "1h", value_parser = parse_duration)]
    pub prune_every: Duration,

    /// Time allowed on SIGTERM/SIGINT for the whole stop, counted from the
    /// signal: Kafka acknowledging what was sent, the flush, the last writes.
    #[arg(long, env = "OUTBOX_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Where the relay's own spans go (one per published transaction that
    /// carries trace context, as a child of the writer's span): `none`,
    /// `console` (one JSON object per line) or `otlp` (OTLP/HTTP to
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT).
    /// The `traceparent`/`tracestate` headers are forwarded either way.
    /// Not OTEL_TRACES_EXPORTER: that one is often set for a whole host,
    /// with values (`zipkin`, lists) this flag does not take.
    #[arg(long, env = "OUTBOX_TRACES_EXPORTER", value_enum, default_value_t)]
    pub traces_exporter: TracesExporter,

    /// With `--traces-exporter console`: append the spans to this file
    /// instead of stdout.
    #[arg(long, env = "OUTBOX_TRACES_FILE")]
    pub traces_file: Option<std::path::PathBuf>,
}

/// The policy for events Kafka will not take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Undeliverable {
    /// Stop, name the event, keep the slot where it was.
    Stop,
    /// Publish it to the dead-letter topic and go on.
    DeadLetter,
}

impl RunArgs {
    /// Where spans go, checked.
    pub fn traces_config(&self) -> Result<TracesConfig> {
        if self.traces_file.is_some() && self.traces_exporter != TracesExporter::Console {
            return Err(Error::Config(
                "--traces-file (OUTBOX_TRACES_FILE) is only used by --traces-exporter console; \
                 set that exporter or drop the file"
                    .into(),
            ));
        }
        Ok(TracesConfig {
            exporter: self.traces_exporter,
            file: self.traces_file.clone(),
            otlp_endpoint: None,
        })
    }

    /// The built-in pruner's settings and interval, when one was asked for.
    pub fn pruner(&self) -> Result<Option<(crate::prune::PruneConfig, Duration)>> {
        if self.prune_older_than.is_none() && self.prune_inbox_older_than.is_none() {
            return Ok(None);
        }
        if self.prune_every < Duration::from_secs(1) {
            return Err(Error::Config("--prune-every must be at least 1s".into()));
        }
        let mut pg = self.database.pg_config()?;
        pg.connect_timeout = self.connect_timeout;
        Ok(Some((
            crate::prune::PruneConfig {
                pg,
                schema: self.schema.clone(),
                outbox_older_than: self.prune_older_than,
                inbox_older_than: self.prune_inbox_older_than,
                batch_size: 1000,
            },
            self.prune_every,
        )))
    }

    /// Validates the flags of `run` into the pipeline's settings.
    pub fn relay_config(&self) -> Result<RelayConfig> {
        let args = self;
        let mut pg = args.database.pg_config()?;
        pg.connect_timeout = args.connect_timeout;
        validate_slot_name(&args.slot)?;
        validate_publication_name(&args.publication)?;
        validate_name("schema", "--schema (OUTBOX_SCHEMA)", &args.schema)?;
        let topic_template = TopicTemplate::parse(&args.topic_template)?;
        let allowed_topics = AllowedTopics::parse(
            args.allowed_topics.as_deref(),
            &topic_template,
            &args.dead_letter_topic,
        )?;
        let brokers = args.kafka_brokers.trim().to_owned();
        if brokers.is_empty() {
            return Err(Error::Config(
                "--kafka-brokers (OUTBOX_KAFKA_BROKERS) is empty; give host:port of at least one broker".into(),
            ));
        }
        let options = kafka_option_strings(
            args.kafka_options_file.as_deref(),
            args.kafka_option_list.as_deref(),
            &args.kafka_options,
        )?
        .iter()
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
        if args.max_in_flight_bytes == 0 {
            return Err(Error::Config(
                "--max-in-flight-bytes must be at least 1".into(),
            ));
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
        let table_layout = match args.table_layout {
            TableLayoutArg::Native => {
                if !args.additional_placement.is_empty() || args.expand_json_payload {
                    return Err(Error::Config(
                        "--additional-placement and --expand-json-payload apply to \
                         --table-layout debezium only"
                            .into(),
                    ));
                }
                TableLayout::Native
            }
            TableLayoutArg::Debezium => TableLayout::Debezium(std::sync::Arc::new(Debezium::new(
                args.debezium_converter,
                args.expand_json_payload,
                &args.additional_placement,
            )?)),
        };
        if args.message_prefix.contains('\0') {
            return Err(Error::Config(
                "--message-prefix must not contain a NUL character".into(),
            ));
        }
        if args.status_interval.is_zero() {
            return Err(Error::Config(
                "--status-interval must be longer than zero".into(),
            ));
        }
        let session_timeout = match args.session_timeout {
            None => Some((args.status_interval * 3).max(Duration::from_secs(60))),
            Some(t) if t.is_zero() => None,
            // The walsender ends a session that sent no status update for
            // wal_sender_timeout; updates come every --status-interval.
            Some(t) if t < args.status_interval * 2 || t < Duration::from_secs(2) => {
                return Err(Error::Config(format!(
                    "--session-timeout ({t:?}) must be at least 2s and at least twice \
                     --status-interval ({:?}), or 0 to leave the server's timeouts alone",
                    args.status_interval
                )));
            }
            Some(t) => Some(t),
        };
        // The same bound on the relay's side of each connection: a server
        // (or host) that vanishes ends the session after this long.
        pg.tcp_user_timeout = session_timeout;
        Ok(RelayConfig {
            pg,
            slot: args.slot.clone(),
            slot_failover: args.slot_failover,
            publication: args.publication.clone(),
            schema: args.schema.clone(),
            topic_template,
            allowed_topics,
            kafka: KafkaConfig {
                brokers,
                options,
                create_topics: args.create_topics,
                topic_partitions: args.topic_partitions,
                topic_replication_factor: args.topic_replication_factor,
            },
            max_in_flight: args.max_in_flight,
            max_in_flight_bytes: args.max_in_flight_bytes,
            status_interval: args.status_interval,
            connect_timeout: args.connect_timeout,
            max_backoff: args.max_backoff.max(Duration::from_millis(100)),
            shutdown_timeout: args.shutdown_timeout,
            stall_warning: args.stall_warning.max(Duration::from_secs(1)),
            session_timeout,
            dead_letter_topic,
            table_layout,
            message_prefix: (!args.message_prefix.is_empty()).then(|| args.message_prefix.clone()),
            metrics_addr: args.metrics_addr,
            traces: Traces::disabled(),
        })
    }
}

/// `--table-layout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TableLayoutArg {
    /// The migrations' `outbox` table.
    Native,
    /// Debezium's outbox table, published as Debezium's outbox router does.
    Debezium,
}

fn validate_publication_name(name: &str) -> Result<()> {
    validate_name("publication", "--publication (OUTBOX_PUBLICATION)", name)
}

/// A PostgreSQL identifier the relay quotes itself: 1 to 63 bytes, no NUL.
pub(super) fn validate_name(what: &str, flag: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 63 || name.contains('\0') {
        return Err(Error::Config(format!(
            "{what} name `{}` given with {flag} is not valid; it must be 1 to 63 bytes",
            name.escape_debug()
        )));
    }
    Ok(())
}
