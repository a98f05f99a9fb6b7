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
    pub walsender_limit: f64,
    pub broker_limit: f64,
    /// CPU seconds per 1000 records of the bare producer in limit (b).
    pub producer_cpu_per_1000: f64,
    pub drain: Drain,
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
    let limit = r.walsender_limit.min(r.broker_limit);
    let ratio = r.drain.events_per_s / limit;
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
        "limits": {"walsender_events_per_s": r.walsender_limit, "broker_events_per_s": r.broker_limit, "bare_producer_cpu_s_per_1000": r.producer_cpu_per_1000},
        "drain": {"events_per_s": r.drain.events_per_s, "seconds": r.drain.seconds, "ratio_to_limit": ratio,
                  "relay_cpu_s_per_1000": per_1000(r.drain.cost.relay_cpu_s, r.drain.cost.events),
                  "walsender_cpu_s_per_1000": per_1000(r.drain.cost.walsender_cpu_s, r.drain.cost.events),
                  "relay_rss_mib_max": r.drain.samples.rss_mib.iter().copied().fold(0.0, f64::max)},
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
        points: r.drain.samples.delivered_per_s.clone(),
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
    let _ = writeln!(
        md,
        "# outbox-relay benchmark\n\nMachine: {}. Backlog: {} events of ~{} bytes. Relay: release build, defaults (`--max-in-flight 10000`, `linger.ms=1`, idempotent producer).\n",
        machine(),
        r.events,
        r.payload_bytes
    );
    let _ = writeln!(
        md,
        "## Limits and drain\n\n| measure | events/s |\n|---|---|"
    );
    let _ = writeln!(
        md,
        "| (a) walsender alone (pgoutput to pg_recvlogical) | {:.0} |",
        r.walsender_limit
    );
    let _ = writeln!(
        md,
        "| (b) broker alone (one idempotent rdkafka producer) | {:.0} |",
        r.broker_limit
    );
    let _ = writeln!(
        md,
        "| relay draining the backlog | {:.0} ({:.2} x min(a, b); target >= 0.9: {}) |\n",
        r.drain.events_per_s,
        ratio,
        ok(ratio >= 0.9)
    );
    let _ = writeln!(
        md,
        "## Steady load\n\nWriters: 32 connections, durable commits (`synchronous_commit = on`). Latency: commit timestamp from pgoutput to Kafka's delivery report, same clock, from the relay's histogram (interpolated within buckets). \"Of which PostgreSQL\" is commit to the transaction's arrival at the relay (WAL flush, decoding, sending): the part the relay cannot shorten.\n"
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
        "| drain | {:.4} | {:.4} |",
        per_1000(r.drain.cost.relay_cpu_s, r.drain.cost.events),
        per_1000(r.drain.cost.walsender_cpu_s, r.drain.cost.events)
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
        r.producer_cpu_per_1000
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
    let p99_1k = r
        .steady
        .iter()
        .filter(|s| s.rate == 1000)
        .filter_map(|s| quantile_ms(&s.latency, 0.99))
        .fold(0.0, f64::max);
    let kept_5k = r
        .steady
        .iter()
        .filter(|s| s.rate == 5000)
        .all(|s| s.kept_up);
    let cpu_ok = per_1000(r.drain.cost.relay_cpu_s, r.drain.cost.events)
        <= per_1000(r.drain.cost.walsender_cpu_s, r.drain.cost.events);
    let _ = writeln!(
        md,
        "- drain >= 0.9 x min(a, b): {:.2} ({})",
        ratio,
        ok(ratio >= 0.9)
    );
    let _ = writeln!(
        md,
        "- p99 commit-to-ack <= 20 ms at 1,000 events/s: {:.1} ms ({})",
        p99_1k,
        ok(p99_1k <= 20.0)
    );
    let _ = writeln!(md, "- keeping up at 5,000 events/s: {}", ok(kept_5k));
    let _ = writeln!(
        md,
        "- relay CPU per event <= walsender CPU per event (drain): {}",
        ok(cpu_ok)
    );
    let _ = writeln!(
        md,
        "\n![latency](latency_cdf.svg)\n\n![throughput](throughput.svg)\n\n![lag](lag.svg)"
    );
    std::fs::write(dir.join("report.md"), md)?;
    Ok(())
}
