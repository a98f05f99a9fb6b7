//! `outbox-consumer-example`: the burger stand's stock consumer (`consume`),
//! its kitchen (`kitchen`), and their schema (`setup`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outbox_consumer_example::consume::{self, ConsumerConfig};
use outbox_consumer_example::kitchen;
use outbox_relay::cli::kafka_option_strings;
use outbox_relay::cli::secrets::read_secret_file;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "outbox-consumer-example", version, about)]
struct Cli {
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "OUTBOX_DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    database_url: Option<String>,
    /// A file holding the PostgreSQL URL (one line), instead of --database-url.
    #[arg(
        long,
        env = "OUTBOX_DATABASE_URL_FILE",
        global = true,
        conflicts_with = "database_url"
    )]
    database_url_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the outbox migrations and the example's tables.
    Setup,
    /// Consume kitchen events into the stock projection until SIGTERM/SIGINT.
    Consume {
        /// Kafka bootstrap servers.
        #[arg(long, env = "OUTBOX_KAFKA_BROKERS")]
        kafka_brokers: String,
        /// Consumer group.
        #[arg(
            long,
            env = "OUTBOX_CONSUMER_GROUP",
            default_value = "stock-projection"
        )]
        group: String,
        /// Topics (comma-separated); an entry starting with `^` is a regex, e.g. ^outbox\.event\..*
        #[arg(
            long,
            env = "OUTBOX_CONSUMER_TOPICS",
            value_delimiter = ',',
            default_value = "outbox.event.ingredient"
        )]
        topics: Vec<String>,
        /// Name under which applied events are recorded in the inbox.
        #[arg(
            long,
            env = "OUTBOX_CONSUMER_INBOX",
            default_value = "stock-projection"
        )]
        inbox: String,
        /// A librdkafka consumer setting as key=value, taken verbatim (commas
        /// included); repeatable, e.g. --kafka-option security.protocol=SSL.
        /// Applied after --kafka-options.
        #[arg(long = "kafka-option")]
        kafka_options: Vec<String>,
        /// Several librdkafka consumer settings, comma-separated (a=1,b=2),
        /// split as the relay splits its --kafka-options: a comma starts a
        /// new setting only when `key=` follows it.
        #[arg(
            long = "kafka-options",
            env = "OUTBOX_KAFKA_OPTIONS",
            hide_env_values = true
        )]
        kafka_option_list: Option<String>,
        /// A file of librdkafka consumer settings, one key=value per line
        /// taken verbatim (`#` comments), for secrets such as sasl.password;
        /// applied first.
        #[arg(long, env = "OUTBOX_KAFKA_OPTIONS_FILE")]
        kafka_options_file: Option<PathBuf>,
        /// Fault injection for tests: abort after N database commits, before storing offsets.
        #[arg(long, env = "OUTBOX_CONSUMER_CRASH_AFTER_COMMITS", hide = true)]
        crash_after_commits: Option<u64>,
    },
    /// Run the kitchen: seed the ingredients, then change them at a steady rate.
    Kitchen {
        /// Changes per second.
        #[arg(long, env = "KITCHEN_RATE", default_value_t = 10)]
        rate: u32,
        /// How long, in seconds.
        #[arg(long, env = "KITCHEN_SECONDS", default_value_t = 20)]
        seconds: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OUTBOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let url = match (cli.database_url, &cli.database_url_file) {
        (Some(url), _) => url,
        (None, Some(path)) => {
            read_secret_file(path, "--database-url-file (OUTBOX_DATABASE_URL_FILE)")?
        }
        (None, None) => anyhow::bail!(
            "--database-url (OUTBOX_DATABASE_URL) or --database-url-file (OUTBOX_DATABASE_URL_FILE) is required"
        ),
    };
    let pool = sqlx::PgPool::connect(&url)
        .await
        .context("connecting to PostgreSQL")?;
    let token = CancellationToken::new();
    tokio::spawn({
        let token = token.clone();
        async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            token.cancel();
        }
    });
    match cli.command {
        Command::Setup => outbox_consumer_example::setup(&pool).await,
        Command::Consume {
            kafka_brokers,
            group,
            topics,
            inbox,
            kafka_options,
            kafka_option_list,
            kafka_options_file,
            crash_after_commits,
        } => {
            let options = kafka_option_strings(
                kafka_options_file.as_deref(),
                kafka_option_list.as_deref(),
                &kafka_options,
            )?
            .into_iter()
            .map(|o| {
                o.split_once('=')
                    .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
                    // Nothing of it is echoed: without an `=` any part
                    // of it may be a secret (e.g. the tail of a
                    // password that contained a comma).
                    .with_context(|| {
                        format!(
                            "a --kafka-option (OUTBOX_KAFKA_OPTIONS) of {} characters has no `=`; \
                                 write each option as key=value",
                            o.chars().count()
                        )
                    })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
            let cfg = ConsumerConfig {
                options,
                brokers: kafka_brokers,
                group,
                topics,
                inbox,
                crash_after_commits,
            };
            consume::run(&cfg, &pool, &token, None).await
        }
        Command::Kitchen { rate, seconds } => {
            for w in kitchen::seed(&pool).await? {
                println!("written      {} {:<20} {}", w.id, w.event_type, w.name);
            }
            kitchen::run(&pool, rate, Duration::from_secs(seconds), &token, |w| {
                println!("written      {} {:<20} {}", w.id, w.event_type, w.name);
            })
            .await
            .map(|_| ())
        }
    }
}
