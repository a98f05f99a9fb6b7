//! The report: `report.json` (every number), `report.md` (tables with the
//! targets) and three SVG plots (latency CDF, throughput, slot lag).

use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;

use crate::plot::{Series, line_chart};
use crate::probe::quantile_ms;
use crate::scenario::{Drain, Large, Steady};

/// Everything measured in one run.
pub struct Results {
    pub events: u64,
    pub payload_bytes: usize,
    /// Limit (a) of each run, events/s.
    pub walsender_runs: Vec<f64>,
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
    broker_limit: f64,
    producer_cpu_per_1000: f64,
    drain_events_per_s: f64,
    drain_relay_cpu_per_1000: f64,
    drain_walsender_cpu_per_1000: f64,
}

impl Summary {
    fn of(r: &Results) -> Self {
        Self {
            walsender_limit: median(r.walsender_runs.iter().copied()),
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

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu}")
}

pub fn write(dir: &Path, r: &Results) -> anyhow::Result<()> {
    let m = Summary::of(r);
    let limit = m.walsender_limit.min(m.broker_limit);
    let ratio = m.drain_events_per_s / limit;
    let last_drain = r.drains.last().expect("at least one drain run");
    let steady_json: Vec<_> = r
        .steady
        .iter()
        .map(|s| {
            json!({
                "rate": s.rate, "rows_per_tx": s.rows_per_tx, "achieved_rate": s.achieved_rate, "written": s.written,
                "latency_ms": {"p50": quantile_ms(&s.latency, 0.5), "p95": quantile_ms(&s.latency, 0.95),
                                "p99": quantile_ms(&s.latency, 0.99), "p99_9": quantile_ms(&s.latency, 0.999)},
                "postgres_share_ms": {"p50": quantile_ms(&s.postgres_latency, 0.5), "p99": quantile_ms(&s.postgres_latency, 0.99)},
                "max_lag_mib": s.max_lag_mib, "end_lag_mib": s.end_lag_mib, "kept_up": s.kept_up,
                "relay_cpu_s_per_1000": per_1000(s.cost.relay_cpu_s, s.cost.events),
                "walsender_cpu_s_per_1000": per_1000(s.cost.walsender_cpu_s, s.cost.events),
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
        "limits": {"walsender_events_per_s": m.walsender_limit, "broker_events_per_s": m.broker_limit, "bare_producer_cpu_s_per_1000": m.producer_cpu_per_1000,
                   "walsender_runs": r.walsender_runs, "broker_runs": r.broker_runs.iter().map(|b| b.0).collect::<Vec<_>>()},
        "drain": {"events_per_s": m.drain_events_per_s, "ratio_to_limit": ratio,
                  "relay_cpu_s_per_1000": m.drain_relay_cpu_per_1000,
                  "walsender_cpu_s_per_1000": m.drain_walsender_cpu_per_1000,
                  "relay_rss_mib_max": r.drains.iter().flat_map(|d| d.samples.rss_mib.iter().copied()).fold(0.0, f64::max),
                  "runs": r.drains.iter().map(|d| json!({"events_per_s": d.events_per_s, "seconds": d.seconds,
                      "relay_cpu_s_per_1000": per_1000(d.cost.relay_cpu_s, d.cost.events),
                      "walsender_cpu_s_per_1000": per_1000(d.cost.walsender_cpu_s, d.cost.events)})).collect::<Vec<_>>()},
        "steady": steady_json,
        "relay_rss_mib": {"after_steady": r.steady_rss_mib.0, "peak": r.steady_rss_mib.1},
        "large_transaction": r.large.as_ref().map(|l| json!({"rows": l.rows, "seconds": l.seconds, "peak_rss_mib": l.peak_rss_mib})),
    });
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(&doc)?)?;

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
    let _ = writeln!(
        md,
        "## Limits and drain\n\nMedian of {} runs each (the runs in brackets). Each backlog is vacuumed and checkpointed before it is read, so neither side pays for autovacuum or dirty buffers.\n\n| measure | events/s |\n|---|---|",
        r.drains.len()
    );
    let _ = writeln!(
        md,
        "| (a) walsender alone (pgoutput to pg_recvlogical) | {:.0} ({}) |",
        m.walsender_limit,
        runs_text(r.walsender_runs.clone(), 0)
    );
    let _ = writeln!(
        md,
        "| (b) broker alone (one idempotent rdkafka producer) | {:.0} ({}) |",
        m.broker_limit,
        runs_text(r.broker_runs.iter().map(|b| b.0).collect(), 0)
    );
    let _ = writeln!(
        md,
        "| relay draining the backlog | {:.0} ({}); {:.2} x min(a, b), target >= 0.9: {} |\n",
        m.drain_events_per_s,
        runs_text(r.drains.iter().map(|d| d.events_per_s).collect(), 0),
        ratio,
        ok(ratio >= 0.9)
    );
    let _ = writeln!(
        md,
        "## Steady load\n\nWriters: 32 connections, staggered evenly over each commit period (not in bursts), durable commits (`synchronous_commit = on`); before each run the outbox is truncated and a checkpoint taken, so the backlogs of earlier scenarios (autovacuum, dirty buffers) do not land in it. Latency: commit timestamp from pgoutput to Kafka's delivery report, same clock, from the relay's histogram (interpolated within buckets). \"Of which PostgreSQL\" is commit to the transaction's arrival at the relay (WAL flush, decoding, sending): the part the relay cannot shorten.\n"
    );
    let _ = writeln!(
        md,
        "| target rate | rows/tx | achieved | p50 ms | p95 ms | p99 ms | p99.9 ms | of which PostgreSQL p50 / p99 ms | max lag MiB | kept up |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for s in &r.steady {
        let q = |x| {
            quantile_ms(&s.latency, x)
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "-".into())
        };
        let pq = |x| {
            quantile_ms(&s.postgres_latency, x)
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "-".into())
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} / {} | {:.2} | {} |",
            s.rate,
            s.rows_per_tx,
            s.achieved_rate,
            q(0.5),
            q(0.95),
            q(0.99),
            q(0.999),
            pq(0.5),
            pq(0.99),
            s.max_lag_mib,
            if s.kept_up { "yes" } else { "**no**" }
        );
    }
    let _ = writeln!(
        md,
        "\n## Cost\n\n| window | relay CPU s / 1000 events | walsender CPU s / 1000 events |\n|---|---|---|"
    );
    let _ = writeln!(
        md,
        "| drain, median of {} runs | {:.4} ({}) | {:.4} ({}) |",
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
            "| steady {}/s x{} | {:.4} | {:.4} |",
            s.rate,
            s.rows_per_tx,
            per_1000(s.cost.relay_cpu_s, s.cost.events),
            per_1000(s.cost.walsender_cpu_s, s.cost.events)
        );
    }
    let _ = writeln!(
        md,
        "\nFor scale: the bare rdkafka producer of limit (b), with no PostgreSQL side at all, used {:.4} CPU s per 1000 records; part of the relay's cost is that client's.",
        m.producer_cpu_per_1000
    );
    let _ = writeln!(
        md,
        "\nRelay RSS: {:.1} MiB after the steady runs, {:.1} MiB peak over drain and steady load (target <= 64 MiB steady: {}).",
        r.steady_rss_mib.0,
        r.steady_rss_mib.1,
        ok(r.steady_rss_mib.0 <= 64.0)
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
    let _ = writeln!(md, "\n## Targets\n");
    // A target whose scenario was not run says so, rather than "met".
    let p99_1k = r
        .steady
        .iter()
        .filter(|s| s.rate == 1000)
        .filter_map(|s| quantile_ms(&s.latency, 0.99))
        .reduce(f64::max);
    let runs_5k: Vec<bool> = r
        .steady
        .iter()
        .filter(|s| s.rate == 5000)
        .map(|s| s.kept_up)
        .collect();
    let cpu_ok = m.drain_relay_cpu_per_1000 <= m.drain_walsender_cpu_per_1000;
    let _ = writeln!(
        md,
        "- drain >= 0.9 x min(a, b): {:.2} ({})",
        ratio,
        ok(ratio >= 0.9)
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
    } else {
        writeln!(
            md,
            "- keeping up at 5,000 events/s: {}",
            ok(runs_5k.iter().all(|k| *k))
        )
    };
    let _ = writeln!(
        md,
        "- relay CPU per event <= walsender CPU per event (drain, medians): {:.4} vs {:.4} ({})",
        m.drain_relay_cpu_per_1000,
        m.drain_walsender_cpu_per_1000,
        ok(cpu_ok)
    );
    let _ = writeln!(
        md,
        "\n![latency](latency_cdf.svg)\n\n![throughput](throughput.svg)\n\n![lag](lag.svg)"
    );
    std::fs::write(dir.join("report.md"), md)?;
    Ok(())
}
