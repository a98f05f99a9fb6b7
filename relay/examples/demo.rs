//! The end-to-end demo behind `scripts/demo.sh`: given a PostgreSQL with
//! `wal_level=logical`, it applies the migrations, hosts librdkafka's mock
//! Kafka cluster in-process (a real Kafka-protocol broker on a TCP port),
//! runs the relay binary against both, writes sample events with the
//! `outbox` helper at a steady rate, prints each event as it arrives in
//! Kafka, and reconciles what was written with what arrived.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// PostgreSQL with wal_level=logical.
    #[arg(long, env = "OUTBOX_DATABASE_URL")]
    database_url: String,
    /// The outbox-relay binary.
    #[arg(long)]
    relay_bin: String,
    /// How long to write events.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Events written per second.
    #[arg(long, default_value_t = 5)]
    rate: u64,
    /// Use this broker instead of the embedded mock cluster.
    #[arg(long)]
    kafka_brokers: Option<String>,
}

const KINDS: [(&str, &str); 3] = [
    ("IngredientRestocked", "bun"),
    ("IngredientUsed", "patty"),
    ("PriceChanged", "cheddar"),
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pool = sqlx::PgPool::connect(&args.database_url)
        .await
        .context("connecting to PostgreSQL")?;
    outbox::MIGRATOR
        .run(&pool)
        .await
        .context("applying migrations")?;
    println!("demo: migrations applied");

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
        _ => unreachable!(),
    };
    if let Some(m) = &mock {
        m.create_topic("outbox.event.ingredient", 3, 1)
            .context("creating the demo topic")?;
    }
    println!("demo: kafka at {brokers}");

    let mut relay = Command::new(&args.relay_bin)
        .args([
            "run",
            "--create-topics",
            "--status-interval",
            "1s",
            "--slot",
            "outbox_demo",
        ])
        .env("OUTBOX_DATABASE_URL", &args.database_url)
        .env("OUTBOX_KAFKA_BROKERS", &brokers)
        .env("OUTBOX_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .context("starting the relay")?;
    println!("demo: relay started (pid {})", relay.id());

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "outbox-demo-printer")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&["outbox.event.ingredient"])?;

    let total = args.seconds * args.rate;
    let writer = {
        let pool = pool.clone();
        let interval = Duration::from_millis(1000 / args.rate.max(1));
        tokio::spawn(async move {
            let mut written = BTreeSet::new();
            let mut tick = tokio::time::interval(interval);
            for n in 0..total {
                tick.tick().await;
                let (kind, item) = KINDS[(n % 3) as usize];
                let event =
                    outbox::Event::new("ingredient", item, kind, &json!({"n": n, "item": item}))?;
                let mut tx = pool.begin().await?;
                let id = outbox::write(&mut tx, &event).await?;
                tx.commit().await?;
                println!("written    {id} {kind:<20} key={item}");
                written.insert(id.to_string());
            }
            anyhow::Ok(written)
        })
    };

    let mut received = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(args.seconds + 60);
    while (received.len() as u64) < total && Instant::now() < deadline {
        let Ok(msg) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await else {
            continue;
        };
        let msg = msg?;
        let header = |name: &str| {
            msg.headers()
                .and_then(|h| h.iter().find(|x| x.key == name))
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let id = header("id");
        println!(
            "published  {id} {:<20} at {}/{}/{}",
            header("event_type"),
            msg.topic(),
            msg.partition(),
            msg.offset()
        );
        received.insert(id);
    }
    let written = writer.await??;

    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(relay.id().to_string())
        .status();
    let status = relay.wait()?;
    println!("demo: relay stopped ({status})");

    println!(
        "reconciliation: written={} published={} missing={}",
        written.len(),
        received.len(),
        written.difference(&received).count()
    );
    if written != received {
        bail!("written and published events differ");
    }
    println!("demo: every event written was published exactly as committed");
    Ok(())
}
