//! The scenarios: the limits (walsender alone, broker alone), draining a
//! backlog, steady load at fixed rates, and one very large transaction. Each
//! returns plain numbers and time series for the report.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseProducer, FutureProducer, FutureRecord, Producer};
use serde_json::json;
use sqlx::PgPool;

use outbox_test_support::{self as support, metrics};

use crate::probe;

/// The commit-to-acknowledgement histogram.
const ACK: &str = "outbox_relay_commit_to_ack_seconds";

/// Settings shared by the scenarios.
pub struct Env {
    pub pool: PgPool,
    pub database_url: String,
    pub brokers: String,
    pub relay_bin: PathBuf,
    pub payload_bytes: usize,
    pub metrics_port: u16,
    /// Extra relay flags.
    pub relay_args: Vec<String>,
    /// The broker's process, when known.
    pub broker_pid: Option<u32>,
    /// CHECKPOINTs refused while quieting the database (the report says
    /// "checkpointed" only when there were none).
    pub checkpoint_failures: std::sync::atomic::AtomicU64,
}

const SLOT: &str = "bench_relay";

/// The relay as a child process (the test support's, output captured to a
/// file) with its metrics endpoint.
pub struct Relay {
    process: support::relay::Relay,
    port: u16,
}

impl Relay {
    pub fn start(env: &Env) -> anyhow::Result<Self> {
        Self::start_on(env, &env.database_url, SLOT, env.metrics_port)
    }

    /// A relay on `database_url`'s outbox with its own slot and metrics port.
    pub fn start_on(env: &Env, database_url: &str, slot: &str, port: u16) -> anyhow::Result<Self> {
        let mut builder = support::RelayBuilder::new(database_url, &env.brokers, slot);
        // The relay's own defaults, not the tests' faster timeouts.
        builder.args = ["--create-topics", "--slot", slot, "--status-interval", "1s"]
            .map(String::from)
            .to_vec();
        let process = builder
            .binary(&env.relay_bin)
            .metrics_on(port)
            .args(&env.relay_args)
            // Logging costs CPU: only what goes wrong.
            .env("OUTBOX_LOG", "warn")
            .spawn_with_output_shown();
        Ok(Self { process, port })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Waits until the metrics endpoint answers and the stream is up.
    pub async fn ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = metrics::scrape(self.port).await
                && metrics::metric(&text, "outbox_relay_sessions_total").unwrap_or(0.0) >= 1.0
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the relay did not start streaming within 60 s; its output:\n{}",
                    self.process.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(metrics::scrape(self.port).await?)
    }

    pub async fn delivered(&self) -> f64 {
        match self.metrics().await {
            Ok(t) => metrics::metric(&t, "outbox_relay_events_delivered_total").unwrap_or(0.0),
            Err(_) => 0.0,
        }
    }

    /// Waits until `n` events were delivered (by this process).
    pub async fn wait_delivered(&self, n: f64, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        while self.delivered().await < n {
            if start.elapsed() > timeout {
                bail!(
                    "only {} of {n} events delivered after {timeout:?}",
                    self.delivered().await
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(start.elapsed())
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        let status = self.process.stop().await;
        if !status.success() {
            bail!(
                "the relay exited with {status}; its output:\n{}",
                self.process.logs()
            );
        }
        Ok(())
    }
}

/// Inserts `n` outbox rows of about `payload_bytes` for `aggregate_type`, in
/// statements of 50,000 rows (or one statement when `one_tx`).
pub async fn backlog(env: &Env, aggregate_type: &str, n: u64, one_tx: bool) -> anyhow::Result<()> {
    backlog_into(&env.pool, env.payload_bytes, aggregate_type, n, one_tx).await
}

/// [`backlog`] into the outbox of `pool`'s database.
async fn backlog_into(
    pool: &PgPool,
    payload_bytes: usize,
    aggregate_type: &str,
    n: u64,
    one_tx: bool,
) -> anyhow::Result<()> {
    let pad = payload_bytes.saturating_sub(40).max(1) as i32;
    let chunk = if one_tx { n } else { 50_000 };
    let mut from = 1;
    while from <= n {
        let to = (from + chunk - 1).min(n);
        sqlx::query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT $1, 'agg-' || (g % 100), 'BenchEvent', jsonb_build_object('seq', g, 'pad', repeat('x', $4)) \
             FROM generate_series($2::bigint, $3::bigint) g",
        )
        .bind(aggregate_type)
        .bind(from as i64)
        .bind(to as i64)
        .bind(pad)
        .execute(pool)
        .await?;
        from = to + 1;
    }
    Ok(())
}

async fn walsender_pid(env: &Env, slot: &str) -> Option<u32> {
    sqlx::query_scalar::<_, Option<i32>>(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(&env.pool)
    .await
    .ok()
    .flatten()
    .flatten()
    .map(|p| p as u32)
}

/// Waits until no walsender holds `slot` (it goes away with its client).
async fn wait_slot_free(env: &Env, slot: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while walsender_pid(env, slot).await.is_some() {
        if Instant::now() > deadline {
            bail!("the walsender of {slot} did not exit");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The partitions of the topic the relay gives `aggregate_type` under its
/// default template; `None` when the broker does not say (or a
/// `--topic-template` in the relay's flags names another topic).
pub async fn topic_partitions(env: &Env, aggregate_type: &str) -> Option<usize> {
    if env
        .relay_args
        .iter()
        .any(|a| a.starts_with("--topic-template"))
    {
        return None;
    }
    let topic = format!("outbox.event.{aggregate_type}");
    let brokers = env.brokers.clone();
    tokio::task::spawn_blocking(move || {
        let client: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .ok()?;
        let md = client
            .client()
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .ok()?;
        md.topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len())
            .filter(|n| *n > 0)
    })
    .await
    .ok()
    .flatten()
}

async fn lag_bytes(env: &Env) -> f64 {
    sqlx::query_scalar::<_, Option<f64>>(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8 FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(SLOT)
    .fetch_optional(&env.pool)
    .await
    .ok()
    .flatten()
    .flatten()
    .unwrap_or(0.0)
}

/// The walsender's ceiling on one backlog.
#[derive(Clone, Copy)]
pub struct Ceiling {
    pub events_per_s: f64,
    pub seconds: f64,
    pub walsender_cpu_s: f64,
    pub reader_cpu_s: f64,
    pub events: f64,
    /// Where the walsender's time went, as in the drain.
    pub walsender: WalsenderTime,
}

/// (a) The walsender's ceiling: a backlog of `n` rows read from a pgoutput
/// slot with the relay's protocol options by the relay's own replication
/// client, which counts the inserts and discards everything (no decoding, no
/// Kafka). Timed as the drain is, from connecting to the last insert. Also
/// the walsender's CPU over that window.
pub async fn walsender_ceiling(env: &Env, n: u64) -> anyhow::Result<Ceiling> {
    use outbox_relay::postgres::config::PgConfig;
    use outbox_relay::postgres::connection::{Backend, Connection, Mode};
    const LIMIT_SLOT: &str = "bench_limit";
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(LIMIT_SLOT)
        .execute(&env.pool)
        .await?;
    backlog(env, "bench_limit", n, false).await?;
    quiesce(env, Outbox::Keep).await?;
    let cfg = PgConfig::from_url(&env.database_url)?;
    let reader_cpu0 = probe::cpu_seconds(std::process::id());
    let start = Instant::now();
    let mut conn = Connection::connect(&cfg, Mode::Replication).await?;
    // The relay's options: proto_version 1, its publication, no messages.
    conn.send_query(&format!(
        "START_REPLICATION SLOT {LIMIT_SLOT} LOGICAL 0/0 (proto_version '1', publication_names '\"outbox_pub\"')"
    ))
    .await?;
    let mut wal_pid = None;
    let mut inserts = 0u64;
    while inserts < n {
        match conn.recv().await? {
            // The walsender was born with this connection: its whole life
            // is this window, as in the drain.
            Backend::CopyBoth => wal_pid = walsender_pid(env, LIMIT_SLOT).await,
            // XLogData: 'w', three u64, then the pgoutput message; its
            // first byte is the message type.
            Backend::CopyData(data) if data.first() == Some(&b'w') => {
                if data.get(25) == Some(&b'I') {
                    inserts += 1;
                }
            }
            // Keepalive asking for a reply: confirm its position.
            Backend::CopyData(data) if data.first() == Some(&b'k') && data.get(17) == Some(&1) => {
                let mut reply = Vec::with_capacity(34);
                reply.push(b'r');
                for _ in 0..3 {
                    reply.extend_from_slice(&data[1..9]);
                }
                reply.extend_from_slice(&0i64.to_be_bytes());
                reply.push(0);
                conn.send_copy_data(&reply).await?;
            }
            Backend::CopyData(_) => {}
            Backend::Error(e) => bail!("reading the slot: {e}"),
            other => bail!("unexpected message while reading the slot: {other:?}"),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    // Read before the connection ends (the walsender exits with it), and
    // judged after the slot is cleaned up, so a failed run leaves nothing.
    let measured = wal_pid.map(|pid| WalsenderTime::read(pid, seconds));
    let reader_cpu_s = probe::cpu_seconds(std::process::id()) - reader_cpu0;
    conn.terminate().await;
    wait_slot_free(env, LIMIT_SLOT).await?;
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(LIMIT_SLOT)
        .execute(&env.pool)
        .await?;
    // Without this the relay's first start would backfill these rows before
    // the drain.
    sqlx::query("TRUNCATE outbox").execute(&env.pool).await?;
    let Some(measured) = measured else {
        bail!("the walsender of {LIMIT_SLOT} was not found: its CPU cannot be measured");
    };
    let walsender = measured?;
    Ok(Ceiling {
        events_per_s: n as f64 / seconds,
        seconds,
        walsender_cpu_s: walsender.sched.on_cpu_s,
        reader_cpu_s,
        events: n as f64,
        walsender,
    })
}

/// (b) How fast the broker alone accepts `n` records of the same size from
/// one idempotent rdkafka producer configured like the relay's. Also returns
/// that producer's CPU seconds per 1000 records: what any Kafka client pays.
pub async fn broker_limit(env: &Env, n: u64) -> anyhow::Result<(f64, f64)> {
    let topic = "bench.limit";
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .create()?;
    let _ = admin
        .create_topics(
            [&NewTopic::new(topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .set("queue.buffering.max.kbytes", "32768")
        .create()?;
    let payload =
        json!({"seq": 0, "pad": "x".repeat(env.payload_bytes.saturating_sub(40))}).to_string();
    // Warm up: metadata and connections.
    producer
        .send(
            FutureRecord::to(topic).key("warm").payload(&payload),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)?;
    let start = Instant::now();
    let cpu0 = probe::cpu_seconds(std::process::id());
    let mut pending = std::collections::VecDeque::new();
    for i in 0..n {
        let key = format!("agg-{}", i % 100);
        loop {
            match producer.send_result(FutureRecord::to(topic).key(&key).payload(&payload)) {
                Ok(f) => {
                    pending.push_back(f);
                    break;
                }
                Err((_, _)) => {
                    if let Some(f) = pending.pop_front() {
                        f.await?.map_err(|(e, _)| e)?;
                    } else {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }
        if pending.len() >= 10_000 {
            pending
                .pop_front()
                .expect("not empty")
                .await?
                .map_err(|(e, _)| e)?;
        }
    }
    while let Some(f) = pending.pop_front() {
        f.await?.map_err(|(e, _)| e)?;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let cpu_per_1000 = (probe::cpu_seconds(std::process::id()) - cpu0) / n as f64 * 1000.0;
    Ok((rate, cpu_per_1000))
}

/// Samples of one run: seconds since start -> value.
#[derive(Default, Clone)]
pub struct Samples {
    pub delivered_per_s: Vec<(f64, f64)>,
    pub lag_mib: Vec<(f64, f64)>,
    pub rss_mib: Vec<f64>,
}

/// Cost of a window: CPU seconds of the relay and of its walsender.
#[derive(Default, Clone, Copy)]
pub struct Cost {
    pub relay_cpu_s: f64,
    pub walsender_cpu_s: f64,
    pub events: f64,
}

/// Result of the drain.
pub struct Drain {
    pub events_per_s: f64,
    pub seconds: f64,
    pub cost: Cost,
    /// Where the walsender's time went.
    pub walsender: WalsenderTime,
    /// The relay's threads over its whole life (it started with the drain).
    pub relay_threads: probe::ThreadSplit,
    /// Cores busy on average over the drain.
    pub busy_cores: f64,
    pub samples: Samples,
}

/// The drain's wall time from the walsender's side. The relay's connection
/// starts a new walsender, so its whole life is this drain: what it spent on
/// a core, waiting for one, and blocked (the rest: waiting for the relay to
/// read, or for WAL from disk).
#[derive(Clone, Copy)]
pub struct WalsenderTime {
    /// From the relay's start to its walsender's: the relay starting up
    /// (process, Kafka metadata, slot lock, connections).
    pub before_s: f64,
    /// The walsender's life during the drain.
    pub lived_s: f64,
    pub sched: probe::Sched,
}

impl WalsenderTime {
    /// Reads walsender `pid` at the end of a window of `seconds` that its
    /// connection opened; an error when it is gone, or older than the
    /// window (it was not started by that connection, so its whole-life
    /// CPU is not the window's).
    fn read(pid: u32, seconds: f64) -> anyhow::Result<Self> {
        let sched = probe::sched(pid).context("the walsender exited before its CPU was read")?;
        let age = probe::age_seconds(pid).context("the walsender's age cannot be read")?;
        // Ages have the 10 ms resolution of the clock ticks they come from.
        if age > seconds + 0.05 {
            bail!(
                "the walsender (pid {pid}) is {age:.2} s old, older than the {seconds:.2} s window: \
                 it was not started by this window's connection, so its CPU is not the window's"
            );
        }
        let lived_s = age.min(seconds);
        Ok(Self {
            before_s: seconds - lived_s,
            lived_s,
            sched,
        })
    }

    /// Seconds neither on a core nor waiting for one.
    pub fn blocked_s(&self) -> f64 {
        (self.lived_s - self.sched.on_cpu_s - self.sched.waiting_s).max(0.0)
    }
}

/// The relay publishing a backlog of `n` rows written while it was stopped.
/// `previous` is the relay of an earlier run, stopped here.
pub async fn drain(env: &Env, n: u64, previous: Option<Relay>) -> anyhow::Result<(Drain, Relay)> {
    // Stop the relay (after creating the slot, on the first run), then write
    // the backlog behind the slot.
    let relay = match previous {
        Some(relay) => relay,
        None => {
            let relay = Relay::start(env)?;
            relay.ready().await?;
            relay
        }
    };
    relay.stop().await?;
    quiesce(env, Outbox::Empty).await?;
    backlog(env, "bench_drain", n, false).await?;
    quiesce(env, Outbox::Keep).await?;

    let busy0 = probe::Busy::now();
    let relay = Relay::start(env)?;
    let start = Instant::now();
    relay.ready().await?;
    // The walsender was born with the relay's connection and may have
    // streamed for a while before the relay reported ready: its whole life
    // counts, not the part after this point.
    let Some(wal_pid) = walsender_pid(env, SLOT).await else {
        bail!("the relay's walsender was not found: its CPU cannot be measured");
    };
    let mut samples = Samples::default();
    let mut last = (0.0, 0.0);
    loop {
        let delivered = relay.delivered().await;
        let t = start.elapsed().as_secs_f64();
        if t - last.0 >= 0.5 {
            samples
                .delivered_per_s
                .push((t, (delivered - last.1) / (t - last.0)));
            samples.rss_mib.push(probe::memory_mib(relay.pid()).0);
            last = (t, delivered);
        }
        if delivered >= n as f64 {
            break;
        }
        if t > 900.0 {
            bail!("the drain did not finish in 15 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let walsender = WalsenderTime::read(wal_pid, seconds)?;
    // The relay started with the drain: its whole life is the window.
    let relay_cpu_s = probe::cpu_seconds(relay.pid());
    let relay_threads = probe::thread_split(
        &Default::default(),
        &probe::threads_use(relay.pid()),
        relay_cpu_s,
    );
    let busy_cores = busy0.cores_since();
    let cost = Cost {
        relay_cpu_s,
        walsender_cpu_s: walsender.sched.on_cpu_s,
        events: n as f64,
    };
    Ok((
        Drain {
            events_per_s: n as f64 / seconds,
            seconds,
            cost,
            walsender,
            relay_threads,
            busy_cores,
            samples,
        },
        relay,
    ))
}

/// Quiets the database before a measurement, so work left by earlier writes
/// (autovacuum of the outbox, dirty buffers for the checkpointer) does not
/// land in it: `Empty` truncates the outbox (its rows are delivered; TRUNCATE
/// is not an event, the publication publishes inserts only), `Keep` vacuums
/// and analyzes a fresh backlog instead. Then a checkpoint.
pub async fn quiesce(env: &Env, outbox: Outbox) -> anyhow::Result<()> {
    let sql = match outbox {
        Outbox::Empty => "TRUNCATE outbox",
        Outbox::Keep => "VACUUM (ANALYZE) outbox",
    };
    sqlx::query(sql).execute(&env.pool).await?;
    checkpoint(env).await;
    Ok(())
}

/// A CHECKPOINT, counted in `checkpoint_failures` when refused.
async fn checkpoint(env: &Env) {
    if let Err(err) = sqlx::query("CHECKPOINT").execute(&env.pool).await {
        eprintln!("bench: CHECKPOINT refused ({err}); going on without it");
        env.checkpoint_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What [`quiesce`] does with the outbox.
#[derive(Clone, Copy)]
pub enum Outbox {
    /// Truncate it.
    Empty,
    /// Keep its rows (a backlog about to be read), vacuumed and analyzed.
    Keep,
}

/// Result of one steady-load run.
pub struct Steady {
    pub rate: u64,
    pub rows_per_tx: u64,
    /// Partitions of the run's topic (each gets its own produce requests).
    pub partitions: Option<usize>,
    pub achieved_rate: f64,
    pub written: u64,
    pub latency: Vec<(f64, f64)>,
    /// Commit to arrival at the relay: PostgreSQL's share of `latency`.
    pub postgres_latency: Vec<(f64, f64)>,
    /// Arrival at the relay to Kafka's acknowledgement: the relay's and
    /// Kafka's share of `latency`.
    pub relay_latency: Vec<(f64, f64)>,
    /// What the whole machine did meanwhile.
    pub machine: MachineUse,
    pub max_lag_mib: f64,
    pub end_lag_mib: f64,
    /// The writers committed at least 95 % of the target rate.
    pub writers_reached: bool,
    /// Everything written was delivered within 2 s of the end.
    pub kept_up: bool,
    pub cost: Cost,
    pub samples: Samples,
}

/// CPU use over a steady run, for telling the relay's share of the
/// latency from queueing for the machine's cores.
pub struct MachineUse {
    /// Cores busy on average (of `cores`).
    pub busy_cores: f64,
    pub cores: usize,
    /// The broker's CPU seconds, when its process is known.
    pub broker_cpu_s: Option<f64>,
    /// This process's CPU seconds: the writers (and the probes).
    pub writers_cpu_s: f64,
    /// PostgreSQL's CPU seconds apart from the relay's walsender: the
    /// client backends (the writers' connections, the probes' and the
    /// relay's bookkeeping one), and the rest (WAL writer, checkpointer,
    /// background writer, autovacuum, ...).
    pub postgres: PostgresCpu,
    /// The relay's CPU seconds, wake-ups and waits for a core (their sum
    /// is its run-queue delay) split into librdkafka's threads
    /// (`rdk:*`: its broker threads talk to Kafka) and its own (the
    /// runtime's, rust-rdkafka's admin poller, any blocking calls).
    pub relay_threads: probe::ThreadSplit,
    /// Times the walsender blocked and was woken.
    pub walsender_wakeups: u64,
    pub seconds: f64,
}

/// CPU seconds of PostgreSQL's processes other than walsenders, split into
/// client backends and the rest.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct PostgresCpu {
    pub backends_s: f64,
    pub others_s: f64,
}

/// Each PostgreSQL process but the walsenders (pg_stat_activity lists the
/// background processes too), with its CPU seconds so far and whether it
/// is a client backend.
async fn postgres_cpu(env: &Env) -> HashMap<u32, (bool, f64)> {
    let rows: Vec<(i32, Option<String>)> =
        sqlx::query_as("SELECT pid, backend_type FROM pg_stat_activity")
            .fetch_all(&env.pool)
            .await
            .unwrap_or_default();
    rows.into_iter()
        .filter(|(_, kind)| kind.as_deref() != Some("walsender"))
        .filter_map(|(pid, kind)| {
            let pid = pid as u32;
            let backend = kind.as_deref() == Some("client backend");
            // schedstat's nanoseconds: a backend's share of a short run
            // can stay under stat's 10 ms tick. One that exited since the
            // query is left out.
            Some((pid, (backend, probe::sched(pid)?.on_cpu_s)))
        })
        .collect()
}

/// What PostgreSQL's processes used between two [`postgres_cpu`] readings;
/// processes started in between count from 0, those gone are left out.
fn postgres_cpu_delta(
    before: &HashMap<u32, (bool, f64)>,
    after: &HashMap<u32, (bool, f64)>,
) -> PostgresCpu {
    let mut cpu = PostgresCpu::default();
    for (pid, (backend, now)) in after {
        let used = now - before.get(pid).map_or(0.0, |(_, c)| *c);
        if *backend {
            cpu.backends_s += used;
        } else {
            cpu.others_s += used;
        }
    }
    cpu
}

/// Writers commit `rate` events/s in transactions of `rows_per_tx` for
/// `seconds`; the relay (already running) publishes them.
pub async fn steady(
    env: &Env,
    relay: &Relay,
    rate: u64,
    rows_per_tx: u64,
    seconds: u64,
) -> anyhow::Result<Steady> {
    // Enough connections for group commit to reach 5,000 single-row commits/s.
    const WRITERS: u64 = 32;
    let before = relay.metrics().await?;
    let delivered0 = metrics::metric(&before, "outbox_relay_events_delivered_total").unwrap_or(0.0);
    let wal_pid = walsender_pid(env, SLOT).await;
    // Every baseline back to back (the one query first), so the busy CPU
    // and the processes' CPU cover the same window.
    let postgres0 = postgres_cpu(env).await;
    let busy0 = probe::Busy::now();
    let (relay_cpu0, wal_cpu0) = (
        probe::cpu_seconds(relay.pid()),
        wal_pid.map(probe::cpu_seconds).unwrap_or(0.0),
    );
    let broker_cpu0 = env.broker_pid.map(probe::cpu_seconds);
    let writers_cpu0 = probe::cpu_seconds(std::process::id());
    let relay_threads0 = probe::threads_use(relay.pid());
    let wal_wakeups0 = wal_pid.and_then(probe::sched).map_or(0, |s| s.wakeups);
    let payload = json!({"pad": "x".repeat(env.payload_bytes.saturating_sub(40))});
    let aggregate_type = format!("bench_steady_{rate}_{rows_per_tx}");
    let period = Duration::from_secs_f64((WRITERS * rows_per_tx) as f64 / rate as f64);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let pool = env.pool.clone();
        let payload = payload.clone();
        let aggregate_type = aggregate_type.clone();
        writers.push(tokio::spawn(async move {
            // Commits are durable (synchronous_commit on): with it off, the
            // walsender only sees a commit after the WAL writer flushes it,
            // up to 3 x wal_writer_delay later, which would be measured as
            // relay latency.
            let mut conn = pool.acquire().await?;
            // Staggered evenly over the period: started together, the writers
            // would commit in bursts of 32 transactions (320 events at 10 rows),
            // which measures queueing behind the burst, not steady load.
            let offset = period.mul_f64(w as f64 / WRITERS as f64);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut written = 0u64;
            let mut i = 0u64;
            while Instant::now() < deadline {
                tick.tick().await;
                let events: Vec<outbox::Event> = (0..rows_per_tx)
                    .map(|_| {
                        i += 1;
                        outbox::Event::new(
                            &aggregate_type,
                            format!("w{w}-{}", i % 16),
                            "BenchEvent",
                            &payload,
                        )
                    })
                    .collect::<Result<_, _>>()?;
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                outbox::write_all(&mut tx, &events).await?;
                tx.commit().await?;
                written += rows_per_tx;
            }
            anyhow::Ok(written)
        }));
    }
    let start = Instant::now();
    let mut samples = Samples::default();
    let mut last = (0.0, delivered0);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = start.elapsed().as_secs_f64();
        let delivered = relay.delivered().await;
        samples
            .delivered_per_s
            .push((t, (delivered - last.1) / (t - last.0)));
        samples.lag_mib.push((t, lag_bytes(env).await / 1048576.0));
        samples.rss_mib.push(probe::memory_mib(relay.pid()).0);
        last = (t, delivered);
    }
    let mut written = 0;
    for w in writers {
        written += w.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Kept up: everything written is delivered within 2 s of the end.
    let caught_up = relay
        .wait_delivered(delivered0 + written as f64, Duration::from_secs(2))
        .await
        .is_ok();
    if !caught_up {
        relay
            .wait_delivered(delivered0 + written as f64, Duration::from_secs(300))
            .await?;
    }
    // Everything below over one window, from the baselines to the relay's
    // catching up, read back to back: the accounted share of the busy CPU
    // compares them.
    let (busy_s, window) = busy0.since();
    let cost = Cost {
        relay_cpu_s: probe::cpu_seconds(relay.pid()) - relay_cpu0,
        walsender_cpu_s: wal_pid.map(probe::cpu_seconds).unwrap_or(0.0) - wal_cpu0,
        events: written as f64,
    };
    let machine = MachineUse {
        busy_cores: if window > 0.0 { busy_s / window } else { 0.0 },
        cores: busy0.cores(),
        broker_cpu_s: env
            .broker_pid
            .zip(broker_cpu0)
            .map(|(pid, before)| probe::cpu_seconds(pid) - before),
        writers_cpu_s: probe::cpu_seconds(std::process::id()) - writers_cpu0,
        postgres: postgres_cpu_delta(&postgres0, &postgres_cpu(env).await),
        relay_threads: probe::thread_split(
            &relay_threads0,
            &probe::threads_use(relay.pid()),
            cost.relay_cpu_s,
        ),
        walsender_wakeups: wal_pid
            .and_then(probe::sched)
            .map_or(0, |s| s.wakeups.saturating_sub(wal_wakeups0)),
        seconds: window,
    };
    let after = relay.metrics().await?;
    let latency = probe::histogram_delta(
        &metrics::histogram(&before, ACK),
        &metrics::histogram(&after, ACK),
    );
    let receive = "outbox_relay_commit_to_receive_seconds";
    let postgres_latency = probe::histogram_delta(
        &metrics::histogram(&before, receive),
        &metrics::histogram(&after, receive),
    );
    let arrival = "outbox_relay_receive_to_ack_seconds";
    let relay_latency = probe::histogram_delta(
        &metrics::histogram(&before, arrival),
        &metrics::histogram(&after, arrival),
    );
    let max_lag_mib = samples.lag_mib.iter().map(|p| p.1).fold(0.0, f64::max);
    let end_lag_mib = samples.lag_mib.last().map(|p| p.1).unwrap_or(0.0);
    Ok(Steady {
        rate,
        rows_per_tx,
        partitions: topic_partitions(env, &aggregate_type).await,
        achieved_rate: written as f64 / elapsed,
        written,
        latency,
        postgres_latency,
        relay_latency,
        machine,
        max_lag_mib,
        end_lag_mib,
        writers_reached: written as f64 / elapsed >= 0.95 * rate as f64,
        kept_up: caught_up,
        cost,
        samples,
    })
}

/// Result of the large transaction.
pub struct Large {
    pub rows: u64,
    pub seconds: f64,
    pub peak_rss_mib: f64,
}

/// One transaction of `rows` rows, with a freshly started relay (so its
/// peak RSS is this transaction's).
pub async fn large(env: &Env, rows: u64) -> anyhow::Result<Large> {
    let relay = Relay::start(env)?;
    relay.ready().await?;
    let before = relay.delivered().await;
    backlog(env, "bench_large", rows, true).await?;
    let start = Instant::now();
    relay
        .wait_delivered(before + rows as f64, Duration::from_secs(1800))
        .await?;
    let seconds = start.elapsed().as_secs_f64();
    let peak_rss_mib = probe::memory_mib(relay.pid()).1;
    relay.stop().await?;
    Ok(Large {
        rows,
        seconds,
        peak_rss_mib,
    })
}

/// One drain over several shards.
pub struct Shards {
    pub shards: usize,
    pub events_per_s: f64,
    pub seconds: f64,
    pub cost: Cost,
    /// Seconds the walsenders were runnable but waited for a core, summed.
    pub walsenders_waiting_s: f64,
    /// Cores busy on average.
    pub busy_cores: f64,
}

/// The drain scaled out: `shards` databases in this cluster, each with its
/// own outbox, slot and relay, `n` events in all (`n / shards` each),
/// written while the relays are stopped; timed from starting the relays to
/// the last delivery. CPU is summed over the relays and their walsenders.
pub async fn shards(env: &Env, n: u64, shards: usize) -> anyhow::Result<Shards> {
    let per = n / shards as u64;
    let (base, query) = env
        .database_url
        .split_once('?')
        .map_or((env.database_url.as_str(), ""), |(b, q)| (b, q));
    let (server, _) = base
        .rsplit_once('/')
        .context("a database URL with a path")?;
    let mut urls = Vec::new();
    for i in 0..shards {
        let db = format!("bench_shard_{shards}_{i}");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
        )))
        .execute(&env.pool)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(&env.pool)
            .await?;
        let url = if query.is_empty() {
            format!("{server}/{db}")
        } else {
            format!("{server}/{db}?{query}")
        };
        let pool = PgPool::connect(&url).await?;
        outbox::MIGRATOR.run(&pool).await?;
        pool.close().await;
        urls.push(url);
    }
    let slot = |i: usize| format!("bench_shard_{i}");
    // Free ports, not the main relay's + i: those may be taken.
    let ports: Vec<u16> = (0..shards).map(|_| support::free_port()).collect();
    let port = |i: usize| ports[i];
    // First starts create the slots; the backlogs go in behind them.
    for (i, url) in urls.iter().enumerate() {
        let relay = Relay::start_on(env, url, &slot(i), port(i))?;
        relay.ready().await?;
        relay.stop().await?;
    }
    for (i, url) in urls.iter().enumerate() {
        let pool = PgPool::connect(url).await?;
        // A topic per shard, as shards split by aggregate type would.
        backlog_into(
            &pool,
            env.payload_bytes,
            &format!("bench_shard_{i}"),
            per,
            false,
        )
        .await?;
        sqlx::query("VACUUM (ANALYZE) outbox")
            .execute(&pool)
            .await?;
        pool.close().await;
    }
    checkpoint(env).await;
    let busy0 = probe::Busy::now();
    let start = Instant::now();
    let mut relays = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        relays.push(Relay::start_on(env, url, &slot(i), port(i))?);
    }
    // Each walsender was born with its relay's connection: its whole life
    // counts (it may stream before its relay reports ready).
    let mut walsenders = Vec::new();
    for (i, relay) in relays.iter().enumerate() {
        relay.ready().await?;
        let Some(pid) = walsender_pid(env, &slot(i)).await else {
            bail!(
                "the walsender of {} was not found: its CPU cannot be measured",
                slot(i)
            );
        };
        walsenders.push(pid);
    }
    for relay in &relays {
        relay
            .wait_delivered(per as f64, Duration::from_secs(900))
            .await?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let sched = walsenders
        .iter()
        .map(|p| probe::sched(*p).context("a walsender exited during the drain"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let busy_cores = busy0.cores_since();
    let cost = Cost {
        relay_cpu_s: relays.iter().map(|r| probe::cpu_seconds(r.pid())).sum(),
        walsender_cpu_s: sched.iter().map(|s| s.on_cpu_s).sum(),
        events: (per * shards as u64) as f64,
    };
    let walsenders_waiting_s = sched.iter().map(|s| s.waiting_s).sum();
    for relay in relays {
        relay.stop().await?;
    }
    for i in 0..shards {
        // A database with a logical slot cannot be dropped.
        wait_slot_free(env, &slot(i)).await?;
        sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(slot(i))
            .execute(&env.pool)
            .await?;
        let db = format!("bench_shard_{shards}_{i}");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
        )))
        .execute(&env.pool)
        .await?;
    }
    Ok(Shards {
        shards,
        events_per_s: cost.events / seconds,
        seconds,
        cost,
        walsenders_waiting_s,
        busy_cores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_cpu_splits_backends_from_the_rest_and_counts_new_processes_from_zero() {
        let before = HashMap::from([(10, (true, 1.0)), (11, (false, 2.0)), (12, (true, 5.0))]);
        // 12 exited; 13 started during the window.
        let after = HashMap::from([(10, (true, 1.5)), (11, (false, 2.25)), (13, (true, 0.5))]);
        assert_eq!(
            postgres_cpu_delta(&before, &after),
            PostgresCpu {
                backends_s: 1.0,
                others_s: 0.25
            }
        );
    }
}
