//! `outbox-bench`: measures the relay against this machine's limits and
//! writes `report.json`, `report.md` and SVG plots to the output folder.
//! `scripts/bench.sh` starts a private PostgreSQL and Tansu and runs it.

mod plot;
mod probe;
mod readme;
mod report;
mod scenario;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use scenario::Env;

/// Benchmarks outbox-relay: limits, drain, steady load, cost, large transaction.
#[derive(Parser)]
#[command(name = "outbox-bench")]
struct Args {
    /// PostgreSQL (wal_level=logical) for the benchmark; its outbox is filled.
    #[arg(long, env = "OUTBOX_DATABASE_URL")]
    database_url: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "OUTBOX_KAFKA_BROKERS")]
    kafka_brokers: String,
    /// The outbox-relay binary (build it with --release).
    #[arg(long)]
    relay_bin: PathBuf,
    /// Backlog size for the limits and the drain.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Approximate payload size in bytes.
    #[arg(long, default_value_t = 300)]
    payload_bytes: usize,
    /// Steady-load rates, events per second.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    rates: Vec<u64>,
    /// Rows per transaction in the steady runs.
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    rows_per_tx: Vec<u64>,
    /// Seconds per steady run.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Runs of the limits and the drain; the report gives the median of each
    /// measure (single runs move by 20 % or more on a small machine).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Rows of the large transaction (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    large_rows: u64,
    /// Shard counts for the scale-out drain (one database, slot and relay
    /// per shard, --events in all); 0 skips it.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    shards: Vec<usize>,
    /// Port for the relay's metrics endpoint.
    #[arg(long, default_value_t = 19187)]
    metrics_port: u16,
    /// Extra flag for the relay (repeatable), e.g. --relay-arg=--kafka-option=linger.ms=1.
    #[arg(long = "relay-arg", allow_hyphen_values = true)]
    relay_args: Vec<String>,
    /// The Kafka broker's process id, to report its CPU next to the relay's
    /// (scripts/bench.sh passes Tansu's).
    #[arg(long, env = "OUTBOX_BENCH_BROKER_PID")]
    broker_pid: Option<u32>,
    /// Output folder.
    #[arg(long, default_value = "bench-results/latest")]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(40)
        .connect(&args.database_url)
        .await
        .context("connecting to PostgreSQL")?;
    outbox::MIGRATOR
        .run(&pool)
        .await
        .context("applying migrations")?;
    let env = Env {
        pool,
        database_url: args.database_url.clone(),
        brokers: args.kafka_brokers.clone(),
        relay_bin: args.relay_bin.clone(),
        payload_bytes: args.payload_bytes,
        metrics_port: args.metrics_port,
        relay_args: args.relay_args.clone(),
        broker_pid: args.broker_pid,
        checkpoint_failures: Default::default(),
    };

    // Limits first: the relay's slot must not exist while their backlogs are
    // written, or the drain would publish those rows too.
    let (mut walsender, mut broker, mut drains) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=args.runs {
        eprintln!(
            "bench: limit (a), the walsender's ceiling, {} events, run {run}/{}",
            args.events, args.runs
        );
        let w = scenario::walsender_ceiling(&env, args.events).await?;
        eprintln!(
            "bench:   {:.0} events/s, walsender {:.4} CPU s per 1000",
            w.events_per_s,
            w.walsender_cpu_s / w.events * 1000.0
        );
        walsender.push(w);
    }
    for run in 1..=args.runs {
        eprintln!("bench: limit (b), broker alone, run {run}/{}", args.runs);
        let b = scenario::broker_limit(&env, args.events).await?;
        eprintln!("bench:   {:.0} events/s", b.0);
        broker.push(b);
    }
    let mut relay = None;
    for run in 1..=args.runs {
        eprintln!(
            "bench: drain of {} events, run {run}/{}",
            args.events, args.runs
        );
        let (d, r) = scenario::drain(&env, args.events, relay.take()).await?;
        eprintln!(
            "bench:   {:.0} events/s, relay {:.4} / walsender {:.4} CPU s per 1000",
            d.events_per_s,
            d.cost.relay_cpu_s / d.cost.events * 1000.0,
            d.cost.walsender_cpu_s / d.cost.events * 1000.0
        );
        drains.push(d);
        relay = Some(r);
    }
    let relay = relay.expect("at least one run");
    let mut steady = Vec::new();
    for &rate in &args.rates {
        for &rows in &args.rows_per_tx {
            eprintln!(
                "bench: steady {rate} events/s, {rows} per transaction, {} s",
                args.seconds
            );
            scenario::quiesce(&env, scenario::Outbox::Empty).await?;
            let s = scenario::steady(&env, &relay, rate, rows, args.seconds).await?;
            eprintln!(
                "bench:   p99 {:.1} ms, writers {:.0}/s (reached the rate: {}), relay caught up: {}",
                probe::quantile_ms(&s.latency, 0.99).unwrap_or(f64::NAN),
                s.achieved_rate,
                s.writers_reached,
                s.kept_up
            );
            steady.push(s);
        }
    }
    let steady_rss = probe::memory_mib(relay.pid());
    relay.stop().await?;
    let large = if args.large_rows > 0 {
        eprintln!("bench: one transaction of {} rows", args.large_rows);
        Some(scenario::large(&env, args.large_rows).await?)
    } else {
        None
    };
    let mut sharded = Vec::new();
    for &k in args.shards.iter().filter(|&&k| k > 0) {
        eprintln!("bench: drain of {} events over {k} shard(s)", args.events);
        let s = scenario::shards(&env, args.events, k).await?;
        eprintln!("bench:   {:.0} events/s", s.events_per_s);
        sharded.push(s);
    }
    let results = report::Results {
        events: args.events,
        payload_bytes: args.payload_bytes,
        walsender_runs: walsender,
        broker_runs: broker,
        drains,
        relay_args: args.relay_args.clone(),
        steady,
        steady_rss_mib: steady_rss,
        large,
        shards: sharded,
        checkpoint_failures: env
            .checkpoint_failures
            .load(std::sync::atomic::Ordering::Relaxed),
    };
    report::write(&args.out, &results)?;
    eprintln!("bench: report in {}", args.out.join("report.md").display());
    Ok(())
}
