//! The README's Performance table, generated from a committed
//! `report.json` so no figure there is typed by hand. The README marks the
//! table with `<!-- bench-table: <report.json path> -->` and
//! `<!-- /bench-table -->`; the test below fails when the two disagree, and
//! rewrites the table when run with `OUTBOX_BENCH_UPDATE_README=1`.

use std::fmt::Write as _;

use serde_json::Value;

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn f0(v: &Value) -> String {
    num(v).map_or_else(|| "-".into(), |x| format!("{x:.0}"))
}

fn f1(v: &Value) -> String {
    num(v).map_or_else(|| "-".into(), |x| format!("{x:.1}"))
}

fn f2(v: &Value) -> String {
    num(v).map_or_else(|| "-".into(), |x| format!("{x:.2}"))
}

/// Thousands as `139k`.
fn k(v: &Value) -> String {
    num(v).map_or_else(|| "-".into(), |x| format!("{:.0}k", x / 1000.0))
}

/// CPU seconds per 1000 events as milliseconds.
fn ms(v: &Value) -> String {
    num(v).map_or_else(|| "-".into(), |x| format!("{:.1} ms", x * 1000.0))
}

fn steady(doc: &Value, rate: u64, rows: u64) -> Option<&Value> {
    doc["steady"]
        .as_array()?
        .iter()
        .find(|s| s["rate"].as_u64() == Some(rate) && s["rows_per_tx"].as_u64() == Some(rows))
}

/// The table's Markdown, every figure read from `doc` (a report.json).
pub fn table(doc: &Value) -> String {
    let mut t = String::from("| measure | result |\n|---|---|\n");
    let drain = &doc["drain"];
    let limits = &doc["limits"];
    let fault = if drain["measurement_fault"].as_bool() == Some(true) {
        " (above 1: that reader was not the ceiling, a measurement fault; the CPU ceiling below is the bound)"
    } else {
        ""
    };
    let _ = writeln!(
        t,
        "| drain of a {}-event backlog (median of {} runs) | {} events/s = {} x a reader that discards ({}/s, meant as the walsender's ceiling; broker alone {}/s){fault} |",
        doc["events"].as_u64().unwrap_or(0),
        doc["runs"].as_u64().unwrap_or(0),
        k(&drain["events_per_s"]),
        f2(&drain["ratio_to_walsender_ceiling"]),
        k(&limits["walsender_events_per_s"]),
        k(&limits["broker_events_per_s"]),
    );
    let _ = writeln!(
        t,
        "| CPU per 1,000 events in the drain (medians) | relay {}, walsender {} (so at most {} events/s from one walsender core; the drain reached {} of that), a bare rdkafka producer {} |",
        ms(&drain["relay_cpu_s_per_1000"]),
        ms(&drain["walsender_cpu_s_per_1000"]),
        k(&drain["walsender_cpu_ceiling_events_per_s"]),
        f2(&drain["ratio_to_walsender_cpu_ceiling"]),
        ms(&limits["bare_producer_cpu_s_per_1000"]),
    );
    for rate in [1000, 5000] {
        let parts: Vec<String> = [1, 10]
            .iter()
            .filter_map(|&rows| {
                let s = steady(doc, rate, rows)?;
                let reached = if s["writers_reached_rate"].as_bool() == Some(true) {
                    String::new()
                } else {
                    let busy = &s["machine"]["busy_cores"];
                    let busy = if busy.is_number() {
                        format!(
                            " with {} of {} cores busy",
                            f2(busy),
                            s["machine"]["cores"].as_u64().unwrap_or(0)
                        )
                    } else {
                        String::new()
                    };
                    format!(", writers reached only {}/s{busy}", f0(&s["achieved_rate"]))
                };
                // Reports before the arrival-to-acknowledgement histogram
                // lack the relay's share.
                let relay_share = if s["relay_share_ms"]["p99"].is_number() {
                    format!(", of the relay's and Kafka's {} ms", f1(&s["relay_share_ms"]["p99"]))
                } else {
                    String::new()
                };
                Some(format!(
                    "{rows}-row transactions: p50 {} ms, p99 {} ms (p99 of PostgreSQL's share {} ms{relay_share}), relay {} vs walsender {} CPU per 1,000{reached}",
                    f1(&s["latency_ms"]["p50"]),
                    f1(&s["latency_ms"]["p99"]),
                    f1(&s["postgres_share_ms"]["p99"]),
                    ms(&s["relay_cpu_s_per_1000"]),
                    ms(&s["walsender_cpu_s_per_1000"]),
                ))
            })
            .collect();
        if !parts.is_empty() {
            let _ = writeln!(
                t,
                "| commit-to-ack at {rate} events/s | {} |",
                parts.join("; ")
            );
        }
    }
    let rss = &doc["relay_rss_mib"];
    let large = &doc["large_transaction"];
    let large_text = if large.is_null() {
        String::new()
    } else {
        format!(
            "; {} MiB peak through one {}-row transaction (delivered in {} s)",
            f0(&large["peak_rss_mib"]),
            large["rows"].as_u64().unwrap_or(0),
            f1(&large["seconds"])
        )
    };
    let _ = writeln!(
        t,
        "| relay memory (RSS) | at most {} MiB during steady load, {} MiB during the drains{large_text} |",
        f0(&rss["steady_max_sampled"]),
        f0(&drain["relay_rss_mib_max_sampled"]),
    );
    if let Some(shards) = doc["shards"].as_array().filter(|s| !s.is_empty()) {
        let parts: Vec<String> = shards
            .iter()
            .map(|s| {
                format!(
                    "{}: {} events/s",
                    s["shards"].as_u64().unwrap_or(0),
                    k(&s["events_per_s"])
                )
            })
            .collect();
        let _ = writeln!(
            t,
            "| drain split over shards (one database, slot and relay each) | {} |",
            parts.join(", ")
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEGIN: &str = "<!-- bench-table: ";
    const END: &str = "<!-- /bench-table -->";

    #[test]
    fn the_readme_table_is_generated_from_the_committed_report() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let readme_path = root.join("README.md");
        let readme = std::fs::read_to_string(&readme_path).unwrap();
        let start = readme.find(BEGIN).expect(
            "README.md marks its Performance table with <!-- bench-table: <report.json> -->",
        );
        let header_end = start + readme[start..].find("-->").unwrap() + 3;
        let report = readme[start + BEGIN.len()..header_end - 3].trim();
        let end = readme[header_end..]
            .find(END)
            .map(|e| header_end + e)
            .expect("<!-- /bench-table --> after the table");
        let doc: Value =
            serde_json::from_str(&std::fs::read_to_string(root.join(report)).unwrap()).unwrap();
        let want = format!("\n{}", table(&doc));
        if readme[header_end..end] != want {
            if std::env::var_os("OUTBOX_BENCH_UPDATE_README").is_some() {
                let updated = format!("{}{}{}", &readme[..header_end], want, &readme[end..]);
                std::fs::write(&readme_path, updated).unwrap();
            } else {
                panic!(
                    "README.md's Performance table is not the one {report} gives; \
                     regenerate it with OUTBOX_BENCH_UPDATE_README=1 cargo test -p outbox-bench readme\n\
                     expected:\n{want}"
                );
            }
        }
    }

    #[test]
    fn missing_figures_show_as_dashes_and_faults_are_named() {
        let doc = serde_json::json!({
            "events": 10, "runs": 1,
            "drain": {"events_per_s": 2000.0, "ratio_to_walsender_ceiling": 1.2, "measurement_fault": true},
            "limits": {},
        });
        let t = table(&doc);
        assert!(t.contains("2k events/s = 1.20 x"), "{t}");
        assert!(t.contains("measurement fault"), "{t}");
        assert!(t.contains("relay -"), "{t}");
        assert!(!t.contains("shards"), "{t}");
    }
}
