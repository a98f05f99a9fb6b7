//! The end-to-end demo behind `scripts/demo.sh`. Given a PostgreSQL with
//! `wal_level=logical`, it applies the schema, hosts librdkafka's mock Kafka
//! cluster in-process (a Kafka-protocol broker on a local TCP port) unless
//! `--kafka-brokers` names a real one, starts the relay binary, runs the stock
//! consumer and the kitchen, prints every event as it moves (written ->
//! published at topic/partition/offset -> applied or deduplicated), and ends
//! with a reconciliation. Exits non-zero when anything does not add up.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use opentelemetry_sdk::trace::SdkTracerProvider;
use outbox_consumer_example::consume::{self, ConsumerConfig, Observed, Outcome};
use outbox_consumer_example::kitchen;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "outbox.event.ingredient";
const INBOX: &str = "stock-projection";

#[derive(Parser)]
struct Args {
    /// PostgreSQL with wal_level=logical.
    #[arg(long, env = "OUTBOX_DATABASE_URL")]
    database_url: String,
    /// The outbox-relay binary.
    #[arg(long)]
    relay_bin: String,
    /// How long the kitchen writes, in seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Kitchen changes per second.
    #[arg(long, default_value_t = 10)]
    rate: u32,
    /// Use this broker instead of the embedded mock cluster.
    #[arg(long)]
    kafka_brokers: Option<String>,
}

/// Kills the relay if the demo ends early (error or Ctrl-C).
struct RelayProcess(Child);

impl RelayProcess {
    fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        Ok(self.0.wait()?)
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let token = CancellationToken::new();
    tokio::spawn({
        let token = token.clone();
        async move {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("demo: interrupted, cleaning up");
            token.cancel();
        }
    });
    // The demo watches the token itself, so an interrupt still stops the
    // relay and the consumer in order (while the embedded broker is alive).
    let result = demo(&args, &token).await;
    if token.is_cancelled() {
        eprintln!("demo: stopped");
        std::process::exit(130);
    }
    result
}

async fn demo(args: &Args, token: &CancellationToken) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(&args.database_url)
        .await
        .context("connecting to PostgreSQL")?;
    outbox_consumer_example::setup(&pool)
        .await
        .context("applying the schema")?;
    println!(
        "demo: schema applied (outbox, inbox, ingredients, stock_view, low_stock, dead_letter)"
    );
    // Spans get real ids (nothing is exported from this process): the
    // kitchen's changes run in spans, and the consumer continues them.
    opentelemetry::global::set_tracer_provider(SdkTracerProvider::builder().build());
    let spans_file = std::env::temp_dir().join(format!(
        "outbox-demo-relay-spans-{}.jsonl",
        std::process::id()
    ));

    let mock = match &args.kafka_brokers {
        Some(_) => None,
        None => Some(
            MockCluster::<DefaultProducerContext>::new(1)
                .context("starting the mock Kafka cluster")?,
        ),
    };
    let brokers = match (&args.kafka_brokers, &mock) {
        (Some(b), _) => b.clone(),
        (None, Some(m)) => m.bootstrap_servers(),
        (None, None) => unreachable!("a mock cluster is made when no broker is given"),
    };
    if let Some(m) = &mock {
        m.create_topic(TOPIC, 3, 1)
            .context("creating the demo topic")?;
    }
    println!(
        "demo: kafka at {brokers}{}",
        if mock.is_some() {
            " (embedded mock cluster)"
        } else {
            ""
        }
    );

    let mut relay = RelayProcess(
        Command::new(&args.relay_bin)
            .args([
                "run",
                "--create-topics",
                "--status-interval",
                "1s",
                "--slot",
                "outbox_demo",
                "--traces-exporter",
                "console",
                "--traces-file",
            ])
            .arg(&spans_file)
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .env("OUTBOX_DATABASE_URL", &args.database_url)
            .env("OUTBOX_KAFKA_BROKERS", &brokers)
            .env("OUTBOX_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .context("starting the relay")?,
    );
    println!("demo: relay started (pid {})", relay.0.id());

    // The stock consumer, in-process, reporting each record here.
    let (observed_tx, mut observed) = tokio::sync::mpsc::unbounded_channel::<Observed>();
    let consumer_token = token.child_token();
    let consumer = tokio::spawn({
        let cfg = ConsumerConfig {
            brokers: brokers.clone(),
            group: "stock-projection".into(),
            topics: vec![TOPIC.into()],
            inbox: INBOX.into(),
            options: Vec::new(),
            crash_after_commits: None,
        };
        let pool = pool.clone();
        let token = consumer_token.clone();
        async move { consume::run(&cfg, &pool, &token, Some(observed_tx)).await }
    });

    // An independent reader that shows what is in Kafka.
    let (published_tx, mut published) = tokio::sync::mpsc::unbounded_channel::<String>();
    let printer_token = token.child_token();
    let printer = tokio::spawn({
        let brokers = brokers.clone();
        let token = printer_token.clone();
        async move { print_published(&brokers, &token, published_tx).await }
    });

    let seeded = kitchen::seed(&pool).await?;
    for w in &seeded {
        print_written(w);
    }
    println!(
        "demo: kitchen running for {}s at {}/s",
        args.seconds, args.rate
    );
    let kitchen_run = kitchen::run(
        &pool,
        args.rate,
        Duration::from_secs(args.seconds),
        token,
        print_written,
    );
    tokio::pin!(kitchen_run);

    let mut written_ids: BTreeSet<String> = seeded.iter().map(|w| w.id.to_string()).collect();
    // Trace ids of the kitchen's changes, and those the consumer continued.
    let mut kitchen_traces = BTreeSet::new();
    let mut consumer_traces = BTreeSet::new();
    let mut published_ids = BTreeSet::new();
    let mut applied_ids = BTreeSet::new();
    let mut kitchen_done = false;
    let mut settle_deadline = None;
    loop {
        tokio::select! {
            ws = &mut kitchen_run, if !kitchen_done => {
                let ws = ws?;
                written_ids.extend(ws.iter().map(|w| w.id.to_string()));
                kitchen_traces.extend(ws.iter().filter_map(|w| w.trace_id.clone()));
                kitchen_done = true;
                settle_deadline = Some(Instant::now() + Duration::from_secs(60));
                println!("demo: kitchen stopped; waiting for the last events to arrive");
            }
            Some(id) = published.recv() => { published_ids.insert(id); }
            Some(o) = observed.recv() => {
                consume::print_line(&o);
                consumer_traces.extend(o.trace_id.clone());
                if matches!(o.outcome, Outcome::Applied { .. } | Outcome::Deduplicated)
                    && let Some(id) = o.event_id
                {
                    applied_ids.insert(id);
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = token.cancelled() => break,
        }
        if kitchen_done
            && applied_ids.len() >= written_ids.len()
            && published_ids.len() >= written_ids.len()
        {
            break;
        }
        if settle_deadline.is_some_and(|d| Instant::now() > d) {
            println!("demo: gave up waiting after 60s");
            break;
        }
    }

    let status = relay.stop()?;
    println!("demo: relay stopped ({status})");
    consumer_token.cancel();
    printer_token.cancel();
    consumer.await??;
    printer.await??;

    if token.is_cancelled() {
        let _ = std::fs::remove_file(&spans_file);
        return Ok(());
    }
    let relay_spans = std::fs::read_to_string(&spans_file).unwrap_or_default();
    let _ = std::fs::remove_file(&spans_file);
    reconcile(&pool, &written_ids, &published_ids, &applied_ids).await?;
    print_traces(&relay_spans, &kitchen_traces, &consumer_traces)
}

fn print_written(w: &kitchen::Written) {
    println!(
        "written      {} {:<20} {}{}",
        w.id,
        w.event_type,
        w.name,
        w.trace_id
            .as_deref()
            .map(|t| format!(" trace={t}"))
            .unwrap_or_default()
    );
}

/// The traces section: every kitchen change's trace reached the relay's
/// span (its exported JSON lines) and the consumer's processing span.
fn print_traces(
    relay_spans: &str,
    kitchen: &BTreeSet<String>,
    consumer: &BTreeSet<String>,
) -> anyhow::Result<()> {
    let spans: Vec<serde_json::Value> = relay_spans
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let relay: BTreeSet<String> = spans
        .iter()
        .filter_map(|s| s["trace_id"].as_str().map(str::to_owned))
        .collect();
    println!();
    println!("traces (kitchen change -> relay transaction span -> consumer processing span)");
    println!("  kitchen changes traced     {}", kitchen.len());
    println!(
        "  continued by the relay     {}",
        kitchen.intersection(&relay).count()
    );
    println!(
        "  continued by the consumer  {}",
        kitchen.intersection(consumer).count()
    );
    if let Some(span) = spans
        .iter()
        .find(|s| s["trace_id"].as_str().is_some_and(|t| kitchen.contains(t)))
    {
        println!(
            "  for example trace {}: kitchen span {} -> relay span {} (its child) -> consumer span (a child of the kitchen span)",
            span["trace_id"].as_str().unwrap_or("-"),
            span["parent_span_id"].as_str().unwrap_or("-"),
            span["span_id"].as_str().unwrap_or("-"),
        );
    }
    if !kitchen.is_subset(&relay) || !kitchen.is_subset(consumer) {
        bail!("a trace was not continued from the kitchen through the relay to the consumer");
    }
    Ok(())
}

async fn print_published(
    brokers: &str,
    token: &CancellationToken,
    out: tokio::sync::mpsc::UnboundedSender<String>,
) -> anyhow::Result<()> {
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "demo-printer")
        .set("auto.offset.reset", "earliest")
        .create()?;
    reader.subscribe(&[TOPIC])?;
    loop {
        let msg = tokio::select! {
            biased;
            _ = token.cancelled() => return Ok(()),
            m = reader.recv() => m?,
        };
        let header = |name: &str| {
            msg.headers()
                .and_then(|h| h.iter().find(|x| x.key == name))
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let id = header("id");
        println!(
            "published    {id} {:<20} at {}/{}/{}",
            header("event_type"),
            msg.topic(),
            msg.partition(),
            msg.offset()
        );
        let _ = out.send(id);
    }
}

/// An ingredient whose projection differs: name, stock and price on each side.
type Mismatch = (String, Option<i32>, Option<i32>, Option<i32>, Option<i32>);

async fn reconcile(
    pool: &sqlx::PgPool,
    written: &BTreeSet<String>,
    published: &BTreeSet<String>,
    applied: &BTreeSet<String>,
) -> anyhow::Result<()> {
    let inbox: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox WHERE consumer = $1")
        .bind(INBOX)
        .fetch_one(pool)
        .await?;
    let mismatched: Vec<Mismatch> = sqlx::query_as(
        "SELECT coalesce(i.name, v.name), i.stock, v.stock, i.unit_price_cents, v.unit_price_cents \
         FROM ingredients i FULL JOIN stock_view v ON v.name = i.name \
         WHERE i.stock IS DISTINCT FROM v.stock OR i.unit_price_cents IS DISTINCT FROM v.unit_price_cents",
    )
    .fetch_all(pool)
    .await?;
    let low: i64 = sqlx::query_scalar("SELECT count(*) FROM low_stock")
        .fetch_one(pool)
        .await?;
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letter")
        .fetch_one(pool)
        .await?;

    println!();
    println!("reconciliation");
    println!("  events written        {}", written.len());
    println!(
        "  events published      {} ({} missing)",
        published.len(),
        written.difference(published).count()
    );
    println!(
        "  events applied        {} (inbox rows: {inbox})",
        applied.len()
    );
    println!("  low-stock alerts      {low}");
    println!("  dead letters          {dead}");
    println!(
        "  stock_view = ingredients: {}",
        if mismatched.is_empty() { "yes" } else { "NO" }
    );
    for (name, stock, view_stock, price, view_price) in &mismatched {
        println!(
            "    {name}: stock {stock:?} vs {view_stock:?}, price {price:?} vs {view_price:?}"
        );
    }
    let ok = written == published
        && written == applied
        && inbox as usize == written.len()
        && mismatched.is_empty()
        && dead == 0;
    if !ok {
        bail!("reconciliation failed");
    }
    println!("demo: every event was written, published and applied exactly once");
    Ok(())
}
