//! The report: `report.json` (every number), `report.md` (tables with the
//! targets) and three SVG plots (latency CDF, throughput, slot lag).

use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;

use crate::plot::{Series, line_chart};
use crate::probe::{ThreadSplit, quantile_ms};
use crate::scenario::{Ceiling, Drain, Large, Shards, Steady, WalsenderTime};

/// Everything measured in one run.
pub struct Results {
    pub events: u64,
    pub payload_bytes: usize,
    /// Limit (a) of each run: the walsender's ceiling.
    pub walsender_runs: Vec<Ceiling>,
    /// Limit (b) of each run: events/s and the bare producer's CPU seconds
    /// per 1000 records.
    pub broker_runs: Vec<(f64, f64)>,
    /// Each drain run; plots use the last.
    pub drains: Vec<Drain>,
    /// Extra relay flags given with --relay-arg.
    pub relay_args: Vec<String>,
    pub steady: Vec<Steady>,
    /// (current, peak) RSS of the relay after the steady runs, MiB.
    pub steady_rss_mib: (f64, f64),
    pub large: Option<Large>,
    /// The scale-out drains, by shard count.
    pub shards: Vec<Shards>,
    /// CHECKPOINTs refused while quieting the database.
    pub checkpoint_failures: u64,
}

fn per_1000(cpu: f64, events: f64) -> f64 {
    if events > 0.0 {
        cpu / events * 1000.0
    } else {
        0.0
    }
}

/// The median (the mean of the middle two for an even count); 0 when empty.
fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Medians over the runs of the limits and the drain.
struct Summary {
    walsender_limit: f64,
    ceiling_walsender_cpu_per_1000: f64,
    ceiling_reader_cpu_per_1000: f64,
    broker_limit: f64,
    producer_cpu_per_1000: f64,
    drain_events_per_s: f64,
    drain_relay_cpu_per_1000: f64,
    drain_walsender_cpu_per_1000: f64,
}

impl Summary {
    fn of(r: &Results) -> Self {
        Self {
            walsender_limit: median(r.walsender_runs.iter().map(|c| c.events_per_s)),
            ceiling_walsender_cpu_per_1000: median(
                r.walsender_runs
                    .iter()
                    .map(|c| per_1000(c.walsender_cpu_s, c.events)),
            ),
            ceiling_reader_cpu_per_1000: median(
                r.walsender_runs
                    .iter()
                    .map(|c| per_1000(c.reader_cpu_s, c.events)),
            ),
            broker_limit: median(r.broker_runs.iter().map(|b| b.0)),
            producer_cpu_per_1000: median(r.broker_runs.iter().map(|b| b.1)),
            drain_events_per_s: median(r.drains.iter().map(|d| d.events_per_s)),
            drain_relay_cpu_per_1000: median(
                r.drains
                    .iter()
                    .map(|d| per_1000(d.cost.relay_cpu_s, d.cost.events)),
            ),
            drain_walsender_cpu_per_1000: median(
                r.drains
                    .iter()
                    .map(|d| per_1000(d.cost.walsender_cpu_s, d.cost.events)),
            ),
        }
    }
}

/// Per event, for counts (wake-ups); 0 without events.
fn per_event(count: u64, events: f64) -> f64 {
    if events > 0.0 {
        count as f64 / events
    } else {
        0.0
    }
}

/// Of the machine's busy CPU during a steady run, the share the measured
/// processes account for: the relay, its walsender, the broker (when
/// known), the writers and PostgreSQL's other processes.
fn accounted_share(s: &Steady) -> Option<f64> {
    let busy = s.machine.busy_cores * s.machine.seconds;
    let accounted = s.cost.relay_cpu_s
        + s.cost.walsender_cpu_s
        + s.machine.broker_cpu_s.unwrap_or(0.0)
        + s.machine.writers_cpu_s
        + s.machine.postgres.backends_s
        + s.machine.postgres.others_s;
    (busy > 0.0).then(|| accounted / busy)
}

/// Seconds a steady run's relay threads spent runnable but waiting for a
/// core (the scheduler's run-queue delay), summed over its threads.
fn relay_wait_s(s: &Steady) -> f64 {
    s.machine.relay_threads.own_waiting_s + s.machine.relay_threads.librdkafka_waiting_s
}

/// A window's time from the walsender's side, for report.json.
fn walsender_time_json(w: &WalsenderTime) -> serde_json::Value {
    json!({"before_walsender_s": w.before_s, "lived_s": w.lived_s, "on_cpu_s": w.sched.on_cpu_s,
           "waiting_for_a_core_s": w.sched.waiting_s, "blocked_s": w.blocked_s()})
}

/// A table row: a window's wall time split from the walsender's side, each
/// part as a fraction of `seconds`; for a drain, also the relay's own
/// threads' time on and waiting for a core, and the machine's busy cores.
fn walsender_time_row(
    label: &str,
    seconds: f64,
    w: &WalsenderTime,
    relay: Option<(&ThreadSplit, f64)>,
) -> String {
    let f = |x: f64| format!("{:.2}", x / seconds);
    let (relay_on, relay_waiting, busy) = match relay {
        Some((t, busy)) => (f(t.own_cpu_s), f(t.own_waiting_s), format!("{busy:.2}")),
        None => ("-".into(), "-".into(), "-".into()),
    };
    format!(
        "| {label} | {seconds:.2} | {} | {} | {} | {} | {relay_on} | {relay_waiting} | {busy} |",
        f(w.before_s),
        f(w.sched.on_cpu_s),
        f(w.sched.waiting_s),
        f(w.blocked_s()),
    )
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{} cores, {cpu}", crate::probe::Busy::now().cores())
}

/// The steady runs' peak RSS as sampled every 0.5 s during them, MiB (the
/// process peak would include the drains before them).
fn steady_peak_rss(r: &Results) -> f64 {
    r.steady
        .iter()
        .flat_map(|s| s.samples.rss_mib.iter().copied())
        .fold(0.0, f64::max)
}

fn drain_peak_rss(r: &Results) -> f64 {
    r.drains
        .iter()
        .flat_map(|d| d.samples.rss_mib.iter().copied())
        .fold(0.0, f64::max)
}

pub fn write(dir: &Path, r: &Results) -> anyhow::Result<()> {
    let m = Summary::of(r);
    // The drain against the walsender's ceiling: no reader can be faster
    // than the walsender feeding it, so a ratio above 1 is a measurement
    // fault, not a result.
    let ratio = m.drain_events_per_s / m.walsender_limit;
    // The bound that holds whatever the reader does: the walsender's CPU
    // per event during the drain, at 100 % of one core.
    let cpu_ceiling = if m.drain_walsender_cpu_per_1000 > 0.0 {
        1000.0 / m.drain_walsender_cpu_per_1000
    } else {
        0.0
    };
    let cpu_ratio = if cpu_ceiling > 0.0 {
        m.drain_events_per_s / cpu_ceiling
    } else {
        0.0
    };
    let last_drain = r.drains.last().expect("at least one drain run");
    let steady_json: Vec<_> = r
        .steady
        .iter()
        .map(|s| {
            json!({
                "rate": s.rate, "rows_per_tx": s.rows_per_tx, "partitions": s.partitions, "achieved_rate": s.achieved_rate, "written": s.written,
                "writers_reached_rate": s.writers_reached,
                "latency_ms": {"p50": quantile_ms(&s.latency, 0.5), "p95": quantile_ms(&s.latency, 0.95),
                                "p99": quantile_ms(&s.latency, 0.99), "p99_9": quantile_ms(&s.latency, 0.999)},
                "postgres_share_ms": {"p50": quantile_ms(&s.postgres_latency, 0.5), "p99": quantile_ms(&s.postgres_latency, 0.99)},
                "relay_share_ms": {"p50": quantile_ms(&s.relay_latency, 0.5), "p99": quantile_ms(&s.relay_latency, 0.99)},
                "machine": {
                    "cores": s.machine.cores, "busy_cores": s.machine.busy_cores, "seconds": s.machine.seconds,
                    "broker_cpu_s_per_1000": s.machine.broker_cpu_s.map(|c| per_1000(c, s.cost.events)),
                    "writers_cpu_s_per_1000": per_1000(s.machine.writers_cpu_s, s.cost.events),
                    "postgres_backends_cpu_s_per_1000": per_1000(s.machine.postgres.backends_s, s.cost.events),
                    "postgres_other_processes_cpu_s_per_1000": per_1000(s.machine.postgres.others_s, s.cost.events),
                    "accounted_share_of_busy_cpu": accounted_share(s),
                    "relay_run_queue_wait_s_per_1000": per_1000(relay_wait_s(s), s.cost.events),
                    "relay_librdkafka_threads_cpu_s_per_1000": per_1000(s.machine.relay_threads.librdkafka_cpu_s, s.cost.events),
                    "relay_own_threads_cpu_s_per_1000": per_1000(s.machine.relay_threads.own_cpu_s, s.cost.events),
                    "relay_own_threads_wakeups_per_event": per_event(s.machine.relay_threads.own_wakeups, s.cost.events),
                    "relay_librdkafka_threads_wakeups_per_event": per_event(s.machine.relay_threads.librdkafka_wakeups, s.cost.events),
                    "walsender_wakeups_per_event": per_event(s.machine.walsender_wakeups, s.cost.events),
                },
                "max_lag_mib": s.max_lag_mib, "end_lag_mib": s.end_lag_mib, "caught_up_within_2s": s.kept_up,
                "relay_cpu_s_per_1000": per_1000(s.cost.relay_cpu_s, s.cost.events),
                "walsender_cpu_s_per_1000": per_1000(s.cost.walsender_cpu_s, s.cost.events),
                "relay_rss_mib_max_sampled": s.samples.rss_mib.iter().copied().fold(0.0, f64::max),
                "latency_histogram": s.latency.iter().map(|(b, c)| json!([if b.is_finite() { json!(b) } else { json!("+Inf") }, c])).collect::<Vec<_>>(),
            })
        })
        .collect();
    let doc = json!({
        "machine": machine(),
        "events": r.events,
        "payload_bytes": r.payload_bytes,
        "relay_args": r.relay_args,
        "runs": r.drains.len(),
        "checkpoint_failures": r.checkpoint_failures,
        "limits": {"walsender_events_per_s": m.walsender_limit,
                   "walsender_how": "the relay's replication client, counting inserts and discarding (no decoding, no Kafka), timed from connecting",
                   "walsender_cpu_s_per_1000": m.ceiling_walsender_cpu_per_1000,
                   "reader_cpu_s_per_1000": m.ceiling_reader_cpu_per_1000,
                   "broker_events_per_s": m.broker_limit, "bare_producer_cpu_s_per_1000": m.producer_cpu_per_1000,
                   "walsender_runs": r.walsender_runs.iter().map(|c| json!({"events_per_s": c.events_per_s, "seconds": c.seconds,
                       "walsender_cpu_s_per_1000": per_1000(c.walsender_cpu_s, c.events),
                       "reader_cpu_s_per_1000": per_1000(c.reader_cpu_s, c.events),
                       "walsender_time": walsender_time_json(&c.walsender)})).collect::<Vec<_>>(),
                   "broker_runs": r.broker_runs.iter().map(|b| b.0).collect::<Vec<_>>()},
        "drain": {"events_per_s": m.drain_events_per_s, "ratio_to_walsender_ceiling": ratio,
                  "measurement_fault": ratio > 1.0,
                  // null when the walsender's CPU could not be read (0)
                  "walsender_cpu_ceiling_events_per_s": (cpu_ceiling > 0.0).then_some(cpu_ceiling),
                  "ratio_to_walsender_cpu_ceiling": (cpu_ceiling > 0.0).then_some(cpu_ratio),
                  "relay_cpu_s_per_1000": m.drain_relay_cpu_per_1000,
                  "walsender_cpu_s_per_1000": m.drain_walsender_cpu_per_1000,
                  "relay_rss_mib_max_sampled": drain_peak_rss(r),
                  "runs": r.drains.iter().map(|d| json!({"events_per_s": d.events_per_s, "seconds": d.seconds,
                      "relay_cpu_s_per_1000": per_1000(d.cost.relay_cpu_s, d.cost.events),
                      "walsender_cpu_s_per_1000": per_1000(d.cost.walsender_cpu_s, d.cost.events),
                      "busy_cores": d.busy_cores,
                      "relay_own_threads_on_cpu_s": d.relay_threads.own_cpu_s,
                      "relay_own_threads_waiting_for_a_core_s": d.relay_threads.own_waiting_s,
                      "walsender_time": walsender_time_json(&d.walsender)})).collect::<Vec<_>>()},
        "steady": steady_json,
        "relay_rss_mib": {"steady_max_sampled": steady_peak_rss(r), "after_steady": r.steady_rss_mib.0,
                          "process_peak_drains_and_steady": r.steady_rss_mib.1},
        "large_transaction": r.large.as_ref().map(|l| json!({"rows": l.rows, "seconds": l.seconds, "peak_rss_mib": l.peak_rss_mib})),
        "shards": r.shards.iter().map(|s| json!({"shards": s.shards, "events": s.cost.events, "events_per_s": s.events_per_s, "seconds": s.seconds,
            "relay_cpu_s_per_1000": per_1000(s.cost.relay_cpu_s, s.cost.events),
            "walsender_cpu_s_per_1000": per_1000(s.cost.walsender_cpu_s, s.cost.events),
            "walsenders_waiting_for_a_core_s": s.walsenders_waiting_s, "busy_cores": s.busy_cores})).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(&doc)?)?;
    // What the README's Performance table becomes with this report.
    std::fs::write(dir.join("readme-table.md"), crate::readme::table(&doc))?;

    // Plots.
    let cdf: Vec<Series> = r
        .steady
        .iter()
        .map(|s| {
            let total = s.latency.last().map(|p| p.1).unwrap_or(0.0).max(1.0);
            Series {
                name: format!("{}/s x{}", s.rate, s.rows_per_tx),
                // Up to the first bucket that holds every event, so the
                // x axis is not stretched to the 60 s bucket.
                points: {
                    let mut pts: Vec<(f64, f64)> = Vec::new();
                    for (b, c) in s.latency.iter().filter(|(b, _)| b.is_finite()) {
                        pts.push((b * 1000.0, c / total));
                        if *c >= total {
                            break;
                        }
                    }
                    pts
                },
            }
        })
        .collect();
    std::fs::write(
        dir.join("latency_cdf.svg"),
        line_chart(
            "Commit-to-ack latency (CDF)",
            "latency, ms (log)",
            "fraction of events",
            &cdf,
            true,
        ),
    )?;
    let mut throughput = vec![Series {
        name: "drain".into(),
        points: last_drain.samples.delivered_per_s.clone(),
    }];
    throughput.extend(r.steady.iter().map(|s| Series {
        name: format!("{}/s x{}", s.rate, s.rows_per_tx),
        points: s.samples.delivered_per_s.clone(),
    }));
    std::fs::write(
        dir.join("throughput.svg"),
        line_chart(
            "Events delivered per second",
            "seconds",
            "events/s",
            &throughput,
            false,
        ),
    )?;
    let lag: Vec<Series> = r
        .steady
        .iter()
        .map(|s| Series {
            name: format!("{}/s x{}", s.rate, s.rows_per_tx),
            points: s.samples.lag_mib.clone(),
        })
        .collect();
    std::fs::write(
        dir.join("lag.svg"),
        line_chart(
            "Slot lag during steady load",
            "seconds",
            "MiB behind",
            &lag,
            false,
        ),
    )?;

    // Markdown.
    let mut md = String::new();
    let ok = |b: bool| if b { "met" } else { "**missed**" };
    let flags = if r.relay_args.is_empty() {
        "defaults (`--max-in-flight 10000`, `linger.ms=1`, idempotent producer)".to_owned()
    } else {
        format!("defaults plus `{}`", r.relay_args.join(" "))
    };
    let _ = writeln!(
        md,
        "# outbox-relay benchmark\n\nMachine: {}. Backlog: {} events of ~{} bytes. Relay: release build, {flags}.\n",
        machine(),
        r.events,
        r.payload_bytes
    );
    let runs_text = |v: Vec<f64>, digits: usize| {
        v.iter()
            .map(|x| format!("{x:.digits$}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let quiet = if r.checkpoint_failures == 0 {
        "Each backlog is vacuumed and checkpointed before it is read, so neither side pays for autovacuum or dirty buffers.".to_owned()
    } else {
        format!(
            "Each backlog is vacuumed before it is read; CHECKPOINT was refused {} time(s), so some runs may include dirty-buffer writes.",
            r.checkpoint_failures
        )
    };
    let _ = writeln!(
        md,
        "## Limits and drain\n\nMedian of {} runs each (the runs in brackets). {quiet}\n\n(a) is meant as the walsender's ceiling: the relay's own replication client reads the same kind of slot with the same protocol options, counts the inserts and discards everything (no decoding, no Kafka), timed like the drain, from connecting to the last insert. If the drain beats it, it was not the ceiling, and the report says so.\n\n| measure | events/s |\n|---|---|",
        r.drains.len()
    );
    let _ = writeln!(
        md,
        "| (a) a reader that discards (meant as the walsender's ceiling) | {:.0} ({}) |",
        m.walsender_limit,
        runs_text(r.walsender_runs.iter().map(|c| c.events_per_s).collect(), 0)
    );
    let _ = writeln!(
        md,
        "| (b) broker alone (one idempotent rdkafka producer) | {:.0} ({}) |",
        m.broker_limit,
        runs_text(r.broker_runs.iter().map(|b| b.0).collect(), 0)
    );
    let verdict = if ratio > 1.0 {
        "**measurement fault: above the walsender's ceiling**".to_owned()
    } else {
        format!("target >= 0.95: {}", ok(ratio >= 0.95))
    };
    let _ = writeln!(
        md,
        "| relay draining the backlog | {:.0} ({}); {:.2} x (a), {verdict} |\n",
        m.drain_events_per_s,
        runs_text(r.drains.iter().map(|d| d.events_per_s).collect(), 0),
        ratio,
    );
    if cpu_ceiling > 0.0 {
        let _ = writeln!(
            md,
            "During the drain the walsender used {:.4} CPU s per 1000 events: on one core no reader can get more than {:.0} events/s out of it, and the drain reached {:.2} of that (target >= 0.95: {}). Serving the discarding reader of (a) it used {:.4} CPU s per 1000 events (the reader's process {:.4}).\n",
            m.drain_walsender_cpu_per_1000,
            cpu_ceiling,
            cpu_ratio,
            ok(cpu_ratio >= 0.95),
            m.ceiling_walsender_cpu_per_1000,
            m.ceiling_reader_cpu_per_1000
        );
    } else {
        let _ = writeln!(
            md,
            "The walsender's CPU during the drain was not measured (0): no CPU ceiling.\n"
        );
    }
    let _ = writeln!(
        md,
        "Where each window's wall time went, from its walsender's side, as fractions of the window (they add up to 1): the relay starting before its walsender existed (its process, connections and slot lock; for (a), connecting; 10 ms resolution); the walsender on a core (this fraction is the run's share of the CPU ceiling above: events/s over 1 / CPU per event); runnable but waiting for a core (/proc/<pid>/schedstat); and blocked, the rest (waiting for its reader to take more, which includes the relay's first Kafka round trips, or for WAL from disk). The walsender's CPU counts from its birth with the connection. For the drains, the relay's own threads (not librdkafka's) over the same window: on a core, and waiting for one; while the relay waits, it does not read, and the walsender blocks once the socket's buffer is full.\n\n| window | seconds | relay starting | walsender on a core | walsender waiting for a core | walsender blocked | relay's threads on a core | relay's threads waiting for a core | cores busy (of {}) |\n|---|---|---|---|---|---|---|---|---|",
        crate::probe::Busy::now().cores()
    );
    for (i, c) in r.walsender_runs.iter().enumerate() {
        let _ = writeln!(
            md,
            "{}",
            walsender_time_row(&format!("(a) run {}", i + 1), c.seconds, &c.walsender, None)
        );
    }
    for (i, d) in r.drains.iter().enumerate() {
        let _ = writeln!(
            md,
            "{}",
            walsender_time_row(
                &format!("drain run {}", i + 1),
                d.seconds,
                &d.walsender,
                Some((&d.relay_threads, d.busy_cores))
            )
        );
    }
    let _ = writeln!(md);
    if ratio > 1.0 {
        let on_cpu_a = median(
            r.walsender_runs
                .iter()
                .map(|c| c.walsender.sched.on_cpu_s / c.seconds),
        );
        let _ = writeln!(
            md,
            "(a) is below the drain, so it is not the walsender's ceiling: serving (a) the walsender was on a core {on_cpu_a:.2} of the time (median, table above), so (a) is bound by the walsender's CPU, but it spends more CPU per event serving this idle, discarding reader than serving the relay (figures above). Why is not settled; in a one-off perf profile of the walsender serving (a), 18 % of its samples were in the kernel's socket wake-up path (`_raw_spin_unlock_irqrestore` under `sock_def_readable`), which the relay's walsender did not show, but a reader that never parks (busy polling) did no better. The CPU ceiling above is the bound that holds.\n"
        );
    }
    let _ = writeln!(
        md,
        "## Steady load\n\nWriters: 32 connections, staggered evenly over each commit period (not in bursts), durable commits (`synchronous_commit = on`); before each run the outbox is truncated{}. Latency: commit timestamp from pgoutput to Kafka's delivery report, same clock, from the relay's histograms (interpolated within buckets), split in two (each share has its own percentiles; they do not add up to the total's): \"PostgreSQL\" is commit to the transaction's arrival at the relay (WAL flush, decoding, sending: the part the relay cannot shorten), \"relay + Kafka\" is arrival to Kafka's acknowledgement of each event (the relay's decoding and hand-over, the producer, the broker's round trip). Both include waiting for a core: \"cores busy\" is the whole machine's CPU use during the run (its cores less their idle time, from /proc/stat); near all cores busy, every process queues for one, and the tail shows it. \"Writers reached\" is whether the writers committed at least 95 % of the target; \"caught up\" whether the relay had delivered everything written within 2 s of the end.\n",
        if r.checkpoint_failures == 0 {
            " and a checkpoint taken"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "| target rate | rows/tx | achieved | writers reached | p50 ms | p95 ms | p99 ms | p99.9 ms | PostgreSQL's share p50 / p99 ms | relay + Kafka share p50 / p99 ms | cores busy | max lag MiB | caught up |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for s in &r.steady {
        let q = |hist: &[(f64, f64)], x| {
            quantile_ms(hist, x)
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "-".into())
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} / {} | {} / {} | {:.2} of {} | {:.2} | {} |",
            s.rate,
            s.rows_per_tx,
            s.achieved_rate,
            if s.writers_reached { "yes" } else { "**no**" },
            q(&s.latency, 0.5),
            q(&s.latency, 0.95),
            q(&s.latency, 0.99),
            q(&s.latency, 0.999),
            q(&s.postgres_latency, 0.5),
            q(&s.postgres_latency, 0.99),
            q(&s.relay_latency, 0.5),
            q(&s.relay_latency, 0.99),
            s.machine.busy_cores,
            s.machine.cores,
            s.max_lag_mib,
            if s.kept_up { "yes" } else { "**no**" }
        );
    }
    let partitions: Vec<String> = r
        .steady
        .iter()
        .map(|s| {
            format!(
                "{}/s x{}: {}",
                s.rate,
                s.rows_per_tx,
                s.partitions.map_or("unknown".into(), |p| p.to_string())
            )
        })
        .collect();
    if !partitions.is_empty() {
        let _ = writeln!(
            md,
            "\nPartitions of each run's topic (created by the relay with the broker's default count): {}.",
            partitions.join(", ")
        );
    }
    let _ = writeln!(
        md,
        "\n## Cost\n\nWake-ups are the times a thread blocked and was woken again (voluntary context switches, /proc/<pid>/task/*/status), per event; each is a trip through the scheduler.\n\n| window | relay CPU s / 1000 events | walsender CPU s / 1000 events | wake-ups per event: relay's threads / librdkafka's / walsender |\n|---|---|---|---|"
    );
    let _ = writeln!(
        md,
        "| drain, median of {} runs | {:.4} ({}) | {:.4} ({}) | - |",
        r.drains.len(),
        m.drain_relay_cpu_per_1000,
        runs_text(
            r.drains
                .iter()
                .map(|d| per_1000(d.cost.relay_cpu_s, d.cost.events))
                .collect(),
            4
        ),
        m.drain_walsender_cpu_per_1000,
        runs_text(
            r.drains
                .iter()
                .map(|d| per_1000(d.cost.walsender_cpu_s, d.cost.events))
                .collect(),
            4
        ),
    );
    for s in &r.steady {
        let _ = writeln!(
            md,
            "| steady {}/s x{} | {:.4} (its own threads {:.4}, librdkafka's {:.4}) | {:.4} | {:.2} / {:.2} / {:.2} |",
            s.rate,
            s.rows_per_tx,
            per_1000(s.cost.relay_cpu_s, s.cost.events),
            per_1000(s.machine.relay_threads.own_cpu_s, s.cost.events),
            per_1000(s.machine.relay_threads.librdkafka_cpu_s, s.cost.events),
            per_1000(s.cost.walsender_cpu_s, s.cost.events),
            per_event(s.machine.relay_threads.own_wakeups, s.cost.events),
            per_event(s.machine.relay_threads.librdkafka_wakeups, s.cost.events),
            per_event(s.machine.walsender_wakeups, s.cost.events),
        );
    }
    let _ = writeln!(
        md,
        "\nThe rest of the machine during the steady runs, CPU s per 1000 events: the broker{}, the benchmark's writers (their client side), PostgreSQL's client backends (the writers' connections, and the probes' and the relay's few queries), PostgreSQL's other processes but the walsender (WAL writer, checkpointer, ...; these from pg_stat_activity at both ends of the run, so the postmaster and processes that start and end within it, such as autovacuum workers, are missing); how much of the machine's busy CPU (cores busy x seconds) these and the relay and its walsender account for (the rest: the kernel's own threads, other processes); and the time the relay's threads were ready to run but waited for a core (the scheduler's run-queue delay, summed over its threads), s per 1000 events: how much of the relay's share of the latency can be queueing on this machine rather than the relay's work (threads wait at once, so the sum is an upper bound, not a part of any one event's latency).\n\n| steady run | broker CPU | writers CPU | PostgreSQL backends CPU | other PostgreSQL CPU | accounted for, of the busy CPU | relay waiting for a core |\n|---|---|---|---|---|---|---|",
        if r.steady.iter().any(|s| s.machine.broker_cpu_s.is_some()) {
            ""
        } else {
            " (not measured: its process was not given)"
        }
    );
    for s in &r.steady {
        let _ = writeln!(
            md,
            "| {}/s x{} | {} | {:.4} | {:.4} | {:.4} | {} | {:.4} |",
            s.rate,
            s.rows_per_tx,
            s.machine
                .broker_cpu_s
                .map(|c| format!("{:.4}", per_1000(c, s.cost.events)))
                .unwrap_or_else(|| "-".into()),
            per_1000(s.machine.writers_cpu_s, s.cost.events),
            per_1000(s.machine.postgres.backends_s, s.cost.events),
            per_1000(s.machine.postgres.others_s, s.cost.events),
            accounted_share(s).map_or("-".into(), |a| format!("{a:.2}")),
            per_1000(relay_wait_s(s), s.cost.events)
        );
    }
    let _ = writeln!(
        md,
        "\nFor scale: the bare rdkafka producer of limit (b), with no PostgreSQL side at all, used {:.4} CPU s per 1000 records; part of the relay's cost is that client's.",
        m.producer_cpu_per_1000
    );
    let steady_peak = steady_peak_rss(r);
    let _ = writeln!(
        md,
        "\nRelay RSS, sampled every 0.5 s: at most {:.1} MiB during the steady runs (target <= 64 MiB: {}), at most {:.1} MiB during the drains; {:.1} MiB after the steady runs.",
        steady_peak,
        ok(steady_peak <= 64.0),
        drain_peak_rss(r),
        r.steady_rss_mib.0,
    );
    if let Some(l) = &r.large {
        let _ = writeln!(
            md,
            "\n## Large transaction\n\nOne transaction of {} rows: delivered {:.1} s after commit ({:.0} events/s), relay peak RSS {:.1} MiB (target <= 150 MiB: {}).",
            l.rows,
            l.seconds,
            l.rows as f64 / l.seconds,
            l.peak_rss_mib,
            ok(l.peak_rss_mib <= 150.0)
        );
    }
    if !r.shards.is_empty() {
        let _ = writeln!(
            md,
            "\n## Scale-out by shards\n\nThe drain of {} events split over N databases in this cluster, each with its own outbox, slot and relay, all started together; timed from their start to the last delivery. CPU is summed over the relays and over their walsenders (each walsender's from its birth); so is the walsenders' time runnable but waiting for a core. One run each.\n\n| shards | seconds | events/s in all | x one shard | relay CPU s / 1000 events | walsender CPU s / 1000 events | walsenders waiting for a core, s | cores busy |\n|---|---|---|---|---|---|---|---|",
            r.events
        );
        let one = r
            .shards
            .iter()
            .find(|s| s.shards == 1)
            .map(|s| s.events_per_s);
        for s in &r.shards {
            let _ = writeln!(
                md,
                "| {} | {:.2} | {:.0} | {} | {:.4} | {:.4} | {:.2} | {:.2} |",
                s.shards,
                s.seconds,
                s.events_per_s,
                one.map(|o| format!("{:.2}", s.events_per_s / o))
                    .unwrap_or_else(|| "-".into()),
                per_1000(s.cost.relay_cpu_s, s.cost.events),
                per_1000(s.cost.walsender_cpu_s, s.cost.events),
                s.walsenders_waiting_s,
                s.busy_cores
            );
        }
    }
    let _ = writeln!(md, "\n## Targets\n");
    // A target whose scenario was not run says so, rather than "met".
    let p99_1k = r
        .steady
        .iter()
        .filter(|s| s.rate == 1000)
        .filter_map(|s| quantile_ms(&s.latency, 0.99))
        .reduce(f64::max);
    let runs_5k: Vec<&Steady> = r.steady.iter().filter(|s| s.rate == 5000).collect();
    let cpu_ok = m.drain_relay_cpu_per_1000 <= m.drain_walsender_cpu_per_1000;
    let _ = writeln!(
        md,
        "- drain >= 0.95 x the walsender's ceiling: {}",
        if cpu_ceiling <= 0.0 {
            format!("{ratio:.2} ({verdict}); the walsender's CPU was too small to measure")
        } else if ratio > 1.0 {
            format!(
                "(a) is below the drain ({ratio:.2}, a measurement fault); against the walsender's CPU ceiling {cpu_ratio:.2} ({})",
                ok(cpu_ratio >= 0.95)
            )
        } else {
            format!("{ratio:.2} ({verdict}); against its CPU ceiling {cpu_ratio:.2}")
        }
    );
    let _ = match p99_1k {
        Some(p99) => writeln!(
            md,
            "- p99 commit-to-ack <= 20 ms at 1,000 events/s: {:.1} ms ({})",
            p99,
            ok(p99 <= 20.0)
        ),
        None => writeln!(
            md,
            "- p99 commit-to-ack <= 20 ms at 1,000 events/s: not run"
        ),
    };
    let _ = if runs_5k.is_empty() {
        writeln!(md, "- keeping up at 5,000 events/s: not run")
    } else if let Some(short) = runs_5k.iter().find(|s| !s.writers_reached) {
        writeln!(
            md,
            "- keeping up at 5,000 events/s: not measured, the writers reached only {:.0} events/s (x{} rows)",
            short.achieved_rate, short.rows_per_tx
        )
    } else {
        writeln!(
            md,
            "- keeping up at 5,000 events/s: {}",
            ok(runs_5k.iter().all(|s| s.kept_up))
        )
    };
    let _ = writeln!(
        md,
        "- relay CPU per event <= walsender CPU per event (drain, medians): {:.4} vs {:.4} ({})",
        m.drain_relay_cpu_per_1000,
        m.drain_walsender_cpu_per_1000,
        ok(cpu_ok)
    );
    for s in &r.steady {
        let (relay, walsender) = (
            per_1000(s.cost.relay_cpu_s, s.cost.events),
            per_1000(s.cost.walsender_cpu_s, s.cost.events),
        );
        let _ = writeln!(
            md,
            "- relay CPU per event <= walsender CPU per event (steady {}/s x{}): {relay:.4} vs {walsender:.4}, {:.2} x ({})",
            s.rate,
            s.rows_per_tx,
            if walsender > 0.0 {
                relay / walsender
            } else {
                f64::NAN
            },
            ok(relay <= walsender)
        );
    }
    for s in runs_5k.iter().filter(|s| s.rows_per_tx == 1) {
        let _ = match quantile_ms(&s.relay_latency, 0.99) {
            Some(p99) => writeln!(
                md,
                "- the relay's part (arrival to acknowledgement) p99 <= 10 ms at 5,000 single-row events/s: {p99:.1} ms ({}){}",
                ok(p99 <= 10.0),
                if s.writers_reached {
                    String::new()
                } else {
                    format!(
                        "; the writers reached only {:.0} events/s, with {:.2} of {} cores busy",
                        s.achieved_rate, s.machine.busy_cores, s.machine.cores
                    )
                }
            ),
            None => writeln!(
                md,
                "- the relay's part p99 <= 10 ms at 5,000 single-row events/s: not measured (the relay reported no arrival-to-acknowledgement histogram)"
            ),
        };
    }
    let _ = writeln!(
        md,
        "\n![latency](latency_cdf.svg)\n\n![throughput](throughput.svg)\n\n![lag](lag.svg)"
    );
    std::fs::write(dir.join("report.md"), md)?;
    Ok(())
}
