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
        assert!(d["events_per_s"].as_f64().unwrap() > 0.0, "{d:#}");
        // The window from the walsender's side: born with the relay's
        // connection, so it lived no longer than the window, and it ran.
        let w = &d["walsender_time"];
        let lived = w["lived_s"].as_f64().unwrap();
        assert!(
            lived > 0.0 && lived <= d["seconds"].as_f64().unwrap(),
            "{d:#}"
        );
        assert!(w["on_cpu_s"].as_f64().is_some_and(|c| c > 0.0), "{d:#}");
        for part in ["before_walsender_s", "waiting_for_a_core_s", "blocked_s"] {
            assert!(w[part].as_f64().is_some_and(|x| x >= 0.0), "{part}: {d:#}");
        }
        assert!(
            d["relay_own_threads_waiting_for_a_core_s"]
                .as_f64()
                .is_some_and(|x| x >= 0.0),
            "{d:#}"
        );
    }
    let steady = report["steady"].as_array().unwrap();
    assert_eq!(steady.len(), 2);
    for s in steady {
        assert!(s["written"].as_u64().unwrap() > 0);
        assert!(s["latency_ms"]["p99"].as_f64().is_some(), "{s:#}");
        assert!(s["writers_reached_rate"].is_boolean(), "{s:#}");
        // The latency split at the relay, and what the machine did.
        assert!(s["relay_share_ms"]["p99"].as_f64().is_some(), "{s:#}");
        assert!(s["postgres_share_ms"]["p99"].as_f64().is_some(), "{s:#}");
        assert!(
            s["machine"]["cores"].as_u64().is_some_and(|c| c >= 1),
            "{s:#}"
        );
        assert!(
            s["machine"]["busy_cores"].as_f64().is_some_and(|b| b > 0.0),
            "{s:#}"
        );
        assert!(
            s["machine"]["relay_librdkafka_threads_cpu_s_per_1000"]
                .as_f64()
                .is_some_and(|c| c >= 0.0),
            "{s:#}"
        );
        // The relay's thread blocks and wakes at least once per commit it
        // reads (the events arrive over 2 s, not in one read).
        assert!(
            s["machine"]["relay_own_threads_wakeups_per_event"]
                .as_f64()
                .is_some_and(|w| w > 0.0),
            "{s:#}"
        );
        assert!(
            s["machine"]["walsender_wakeups_per_event"]
                .as_f64()
                .is_some_and(|w| w > 0.0),
            "{s:#}"
        );
        assert!(s["partitions"].as_u64().is_some_and(|p| p >= 1), "{s:#}");
        // The writers' backends commit every transaction: never idle.
        assert!(
            s["machine"]["postgres_backends_cpu_s_per_1000"]
                .as_f64()
                .is_some_and(|c| c > 0.0),
            "{s:#}"
        );
        assert!(
            s["machine"]["accounted_share_of_busy_cpu"]
                .as_f64()
                .is_some_and(|a| a > 0.0),
            "{s:#}"
        );
        assert!(
            s["machine"]["relay_run_queue_wait_s_per_1000"]
                .as_f64()
                .is_some_and(|w| w >= 0.0),
            "{s:#}"
        );
        if tansu.pid().is_some() {
            assert!(
                s["machine"]["broker_cpu_s_per_1000"]
                    .as_f64()
                    .is_some_and(|c| c >= 0.0),
                "{s:#}"
            );
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
