//! The benchmark harness at a tiny size, so it keeps working. No timing is
//! asserted: only that every scenario ran and the report is complete.

use std::process::Command;

use crate::support::relay::{bench_binary, binary};
use crate::support::{Postgres, Tansu, free_port, unique};

#[tokio::test]
async fn the_benchmark_runs_end_to_end_at_a_tiny_size() {
    let pg = Postgres::start();
    let tansu = Tansu::start();
    let url = pg.create_database(&unique("bench")).await;
    let out = std::env::temp_dir().join(unique("outbox-bench-out"));
    let status = Command::new(bench_binary())
        .args([
            "--events",
            "2000",
            "--seconds",
            "2",
            "--rates",
            "200",
            "--rows-per-tx",
            "1,10",
            "--large-rows",
            "3000",
            // Two runs: the second drain restarts the relay behind a new backlog.
            "--runs",
            "2",
            "--shards",
            "1,2",
        ])
        .arg("--database-url")
        .arg(&url)
        .arg("--kafka-brokers")
        .arg(tansu.brokers())
        .arg("--relay-bin")
        .arg(binary())
        .arg("--metrics-port")
        .arg(free_port().to_string())
        .args(
            tansu
                .pid()
                .map(|pid| vec!["--broker-pid".to_owned(), pid.to_string()])
                .unwrap_or_default(),
        )
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    for path in [
        "/limits/walsender_events_per_s",
        "/limits/broker_events_per_s",
        "/drain/events_per_s",
        "/drain/ratio_to_walsender_ceiling",
        "/relay_rss_mib/steady_max_sampled",
        "/large_transaction/peak_rss_mib",
    ] {
        let v = report.pointer(path).and_then(|v| v.as_f64()).unwrap_or(0.0);
        assert!(v > 0.0, "{path} missing or zero in {report:#}");
    }
    // CPU-derived figures: a tiny run may stay under the clock's 10 ms tick.
    for path in [
        "/limits/walsender_cpu_s_per_1000",
        "/drain/walsender_cpu_ceiling_events_per_s",
        "/drain/ratio_to_walsender_cpu_ceiling",
    ] {
        let v = report.pointer(path);
        assert!(
            v.is_some_and(|v| v.is_null() || v.as_f64().is_some_and(|x| x >= 0.0)),
            "{path} missing in {report:#}"
        );
    }
    let drains = report["drain"]["runs"].as_array().unwrap();
    assert_eq!(drains.len(), 2, "{report:#}");
    for d in drains {
        number(d, "/events_per_s", |x| x > 0.0);
        // The window from the walsender's side (the benchmark fails a run
        // whose walsender is older than its window: not the relay's).
        number(d, "/walsender_time/lived_s", |x| x > 0.0);
        number(d, "/walsender_time/on_cpu_s", |x| x > 0.0);
        for part in [
            "/walsender_time/before_walsender_s",
            "/walsender_time/waiting_for_a_core_s",
            "/walsender_time/blocked_s",
            "/relay_own_threads_waiting_for_a_core_s",
        ] {
            number(d, part, |x| x >= 0.0);
        }
    }
    let steady = report["steady"].as_array().unwrap();
    assert_eq!(steady.len(), 2);
    for s in steady {
        assert!(s["written"].as_u64().unwrap() > 0);
        assert!(s["writers_reached_rate"].is_boolean(), "{s:#}");
        assert!(s["partitions"].as_u64().is_some_and(|p| p >= 1), "{s:#}");
        assert!(
            s["machine"]["cores"].as_u64().is_some_and(|c| c >= 1),
            "{s:#}"
        );
        // The latency, split at the relay.
        for p99 in [
            "/latency_ms/p99",
            "/relay_share_ms/p99",
            "/postgres_share_ms/p99",
        ] {
            number(s, p99, |x| x >= 0.0);
        }
        // What the machine did. The relay's thread, the walsender and the
        // writers' backends work for every commit (the events arrive over
        // 2 s, not in one read), so none of them is zero.
        for busy in [
            "/machine/busy_cores",
            "/machine/relay_own_threads_wakeups_per_event",
            "/machine/walsender_wakeups_per_event",
            "/machine/postgres_backends_cpu_s_per_1000",
            "/machine/accounted_share_of_busy_cpu",
        ] {
            number(s, busy, |x| x > 0.0);
        }
        for part in [
            "/machine/relay_librdkafka_threads_cpu_s_per_1000",
            "/machine/relay_run_queue_wait_s_per_1000",
        ] {
            number(s, part, |x| x >= 0.0);
        }
        if tansu.pid().is_some() {
            number(s, "/machine/broker_cpu_s_per_1000", |x| x >= 0.0);
        }
    }
    let shards = report["shards"].as_array().unwrap();
    let counts: Vec<u64> = shards
        .iter()
        .map(|s| s["shards"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [1, 2], "{report:#}");
    for s in shards {
        assert!(s["events_per_s"].as_f64().unwrap() > 0.0, "{s:#}");
        assert_eq!(s["events"].as_f64(), Some(2000.0), "{s:#}");
    }
    // The README's table as this run gives it.
    let table = std::fs::read_to_string(out.join("readme-table.md")).unwrap();
    assert!(table.contains("| drain split over shards"), "{table}");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Targets"));
    for svg in ["latency_cdf.svg", "throughput.svg", "lag.svg"] {
        let text = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(text.contains("<polyline"), "{svg} has no data");
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// The number at `pointer` in `v`, which must satisfy `ok`.
fn number(v: &serde_json::Value, pointer: &str, ok: impl Fn(f64) -> bool) {
    let x = v.pointer(pointer).and_then(serde_json::Value::as_f64);
    assert!(x.is_some_and(ok), "{pointer} = {x:?} in {v:#}");
}
