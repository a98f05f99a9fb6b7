//! Metrics: counters, gauges and the commit-to-acknowledgement latency
//! histogram, served in the Prometheus text format on `--metrics-addr`
//! (`GET /metrics`). The benchmark reads the same endpoint.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Upper bounds of the latency buckets, in seconds: 0.25 ms to 60 s.
const LATENCY_BOUNDS: [f64; 24] = [
    0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];

/// The relay's metrics; shared by the stream, the delivery reports and the server.
#[derive(Debug, Default)]
pub struct Metrics {
    delivered: AtomicU64,
    dead_lettered: AtomicU64,
    sessions: AtomicU64,
    confirmed_lsn: AtomicU64,
    server_lsn: AtomicU64,
    /// Seconds the oldest unacknowledged record has waited past the stall
    /// threshold (0: not stalled), as f64 bits.
    stalled_seconds: AtomicU64,
    commit_to_ack: Histogram,
    commit_to_receive: Histogram,
}

/// A latency histogram with fixed buckets.
#[derive(Debug)]
struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn observe(&self, us: i64) {
        let us = us.max(0) as u64;
        let secs = us as f64 / 1e6;
        if let Some(i) = LATENCY_BOUNDS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in LATENCY_BOUNDS.iter().zip(&self.buckets) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {total}");
    }
}

impl Metrics {
    /// A new set, to share.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// One event acknowledged by Kafka, `latency_us` after its commit.
    pub fn delivered(&self, latency_us: Option<i64>) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if let Some(us) = latency_us {
            self.commit_to_ack.observe(us);
        }
    }

    /// A transaction reached the relay `latency_us` after its commit: the
    /// part of the latency spent in PostgreSQL (WAL flush, decoding, sending).
    pub fn received(&self, latency_us: i64) {
        self.commit_to_receive.observe(latency_us);
    }

    /// One event parked in the dead-letter topic.
    pub fn dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }

    /// A replication session started.
    pub fn session_started(&self) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// Replication sessions started so far.
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// The position last confirmed to PostgreSQL.
    pub fn confirmed(&self, lsn: u64) {
        self.confirmed_lsn.store(lsn, Ordering::Relaxed);
    }

    /// The server's WAL end, from the stream.
    pub fn server_position(&self, lsn: u64) {
        self.server_lsn.fetch_max(lsn, Ordering::Relaxed);
    }

    /// How long the oldest record handed to Kafka has waited, once that is
    /// longer than `--stall-warning`; 0 when deliveries move.
    pub fn stalled(&self, seconds: f64) {
        self.stalled_seconds
            .store(seconds.to_bits(), Ordering::Relaxed);
    }

    /// Events delivered so far.
    pub fn delivered_total(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(
            &mut out,
            "outbox_relay_events_delivered_total",
            "Events acknowledged by Kafka.",
            self.delivered.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "outbox_relay_events_dead_lettered_total",
            "Events sent to the dead-letter topic.",
            self.dead_lettered.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "outbox_relay_sessions_total",
            "Replication sessions started (1 + reconnections).",
            self.sessions.load(Ordering::Relaxed),
        );
        let confirmed = self.confirmed_lsn.load(Ordering::Relaxed);
        let server = self.server_lsn.load(Ordering::Relaxed);
        gauge(
            &mut out,
            "outbox_relay_confirmed_lsn",
            "WAL position last confirmed to PostgreSQL, as a number.",
            confirmed,
        );
        gauge(
            &mut out,
            "outbox_relay_server_lsn",
            "Latest server WAL position seen on the stream, as a number.",
            server,
        );
        gauge(
            &mut out,
            "outbox_relay_lag_bytes",
            "Server WAL position minus confirmed position.",
            server.saturating_sub(confirmed),
        );
        let _ = writeln!(
            out,
            "# HELP outbox_relay_delivery_stalled_seconds How long the oldest event handed to Kafka has waited \
             for its acknowledgement, once longer than --stall-warning (0: deliveries move).\n\
             # TYPE outbox_relay_delivery_stalled_seconds gauge\n\
             outbox_relay_delivery_stalled_seconds {}",
            f64::from_bits(self.stalled_seconds.load(Ordering::Relaxed))
        );
        self.commit_to_ack.render(
            &mut out,
            "outbox_relay_commit_to_ack_seconds",
            "Time from the transaction's commit in PostgreSQL to Kafka's acknowledgement of each event.",
        );
        self.commit_to_receive.render(
            &mut out,
            "outbox_relay_commit_to_receive_seconds",
            "Time from a transaction's commit to its arrival at the relay (PostgreSQL's share of the latency).",
        );
        out
    }
}

/// Serves `GET /metrics` on `addr` until cancelled.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    token: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %addr, "serving metrics at /metrics");
    loop {
        let (mut socket, _) = tokio::select! {
            biased;
            _ = token.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = socket.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if request.starts_with("GET /metrics") {
                ("200 OK", metrics.render())
            } else {
                ("404 Not Found", "try GET /metrics\n".to_owned())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let m = Metrics::default();
        m.delivered(Some(800)); // 0.8 ms
        m.delivered(Some(4_000)); // 4 ms
        m.delivered(None);
        m.received(2_000);
        m.confirmed(100);
        m.server_position(160);
        let text = m.render();
        assert!(
            text.contains("outbox_relay_events_delivered_total 3"),
            "{text}"
        );
        assert!(text.contains("outbox_relay_lag_bytes 60"), "{text}");
        assert!(
            text.contains("outbox_relay_commit_to_ack_seconds_bucket{le=\"0.001\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("outbox_relay_commit_to_ack_seconds_bucket{le=\"0.005\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("outbox_relay_commit_to_ack_seconds_count 2"),
            "{text}"
        );
    }
}
