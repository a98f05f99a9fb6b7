//! Metrics: counters, gauges and the commit-to-acknowledgement latency
//! histogram, kept in a Prometheus client registry and rendered in the
//! OpenMetrics text format. `http` serves them on `--metrics-addr`; the
//! benchmark reads the same endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds of the latency buckets, in seconds: 0.25 ms to 60 s.
const LATENCY_BOUNDS: [f64; 24] = [
    0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];

/// What the relay is doing, for `/readyz` and `outbox_relay_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RelayState {
    /// Taking the slot lock: a standby while another instance holds it.
    WaitingForLock = 0,
    /// Lock held: checking the slot, creating it, backfilling.
    Starting = 1,
    /// Streaming from the slot.
    Streaming = 2,
    /// Between sessions, after a retryable failure.
    Reconnecting = 3,
    /// Shutting down.
    Stopping = 4,
    /// Publishing the rows already in the table before streaming (first
    /// start, or its continuation).
    Backfilling = 5,
}

impl RelayState {
    const ALL: [RelayState; 6] = [
        RelayState::WaitingForLock,
        RelayState::Starting,
        RelayState::Backfilling,
        RelayState::Streaming,
        RelayState::Reconnecting,
        RelayState::Stopping,
    ];

    /// Its label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RelayState::WaitingForLock => "waiting_for_lock",
            RelayState::Starting => "starting",
            RelayState::Streaming => "streaming",
            RelayState::Reconnecting => "reconnecting",
            RelayState::Stopping => "stopping",
            RelayState::Backfilling => "backfilling",
        }
    }
}

/// The relay's metrics; shared by the stream, the delivery reports and the
/// endpoint. Each field is a handle on the series registered in `registry`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    delivered: Counter,
    dead_lettered: Counter,
    sessions: Counter,
    confirmed_lsn: Gauge,
    server_lsn: Gauge,
    lag_bytes: Gauge,
    stalled_seconds: Gauge<f64, AtomicU64>,
    in_flight_events: Gauge,
    in_flight_bytes: Gauge,
    commit_to_ack: Histogram,
    commit_to_receive: Histogram,
    receive_to_ack: Histogram,
    state: AtomicU8,
    states: Family<Vec<(String, String)>, Gauge>,
    last_delivery: Gauge<f64, AtomicU64>,
    retained_wal: Gauge,
    backfill_rows: Counter,
    backfill_seq: Family<Vec<(String, String)>, Gauge>,
    backfill_target_seq: Family<Vec<(String, String)>, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let latency = || Histogram::new(LATENCY_BOUNDS);
        let mut m = Self {
            registry: Registry::default(),
            delivered: Counter::default(),
            dead_lettered: Counter::default(),
            sessions: Counter::default(),
            confirmed_lsn: Gauge::default(),
            server_lsn: Gauge::default(),
            lag_bytes: Gauge::default(),
            stalled_seconds: Gauge::default(),
            in_flight_events: Gauge::default(),
            in_flight_bytes: Gauge::default(),
            commit_to_ack: latency(),
            commit_to_receive: latency(),
            receive_to_ack: latency(),
            state: AtomicU8::new(RelayState::Starting as u8),
            states: Family::default(),
            last_delivery: Gauge::default(),
            retained_wal: Gauge::default(),
            backfill_rows: Counter::default(),
            backfill_seq: Family::default(),
            backfill_target_seq: Family::default(),
        };
        let r = &mut m.registry;
        // Counters get their `_total` suffix from the encoder.
        r.register(
            "outbox_relay_events_delivered",
            "Events acknowledged by Kafka",
            m.delivered.clone(),
        );
        r.register(
            "outbox_relay_events_dead_lettered",
            "Events sent to the dead-letter topic",
            m.dead_lettered.clone(),
        );
        r.register(
            "outbox_relay_sessions",
            "Replication sessions started (1 + reconnections)",
            m.sessions.clone(),
        );
        r.register(
            "outbox_relay_confirmed_lsn",
            "WAL position last confirmed to PostgreSQL, as a number",
            m.confirmed_lsn.clone(),
        );
        r.register(
            "outbox_relay_server_lsn",
            "Latest server WAL position seen on the stream, as a number",
            m.server_lsn.clone(),
        );
        r.register(
            "outbox_relay_lag_bytes",
            "Server WAL position minus confirmed position",
            m.lag_bytes.clone(),
        );
        r.register(
            "outbox_relay_delivery_stalled_seconds",
            "How long the oldest event handed to Kafka has waited for its acknowledgement, \
             once longer than --stall-warning (0: deliveries move)",
            m.stalled_seconds.clone(),
        );
        r.register(
            "outbox_relay_in_flight_events",
            "Events handed to Kafka and not yet acknowledged, against --max-in-flight \
             (sampled every 100 ms while streaming, every second while a backfill waits)",
            m.in_flight_events.clone(),
        );
        r.register(
            "outbox_relay_in_flight_bytes",
            "Bytes (keys, values, headers) of the events in flight, against --max-in-flight-bytes",
            m.in_flight_bytes.clone(),
        );
        r.register(
            "outbox_relay_commit_to_ack_seconds",
            "Time from the transaction's commit in PostgreSQL to Kafka's acknowledgement of each event",
            m.commit_to_ack.clone(),
        );
        r.register(
            "outbox_relay_state",
            "What the relay is doing: 1 for the current state (waiting_for_lock is a standby \
             while another instance works the slot)",
            m.states.clone(),
        );
        r.register(
            "outbox_relay_last_delivery_timestamp_seconds",
            "When Kafka last acknowledged an event (Unix time; 0: none yet by this process)",
            m.last_delivery.clone(),
        );
        r.register(
            "outbox_relay_slot_retained_wal_bytes",
            "WAL the server keeps for the slot (current position minus the slot's restart_lsn), \
             read every --status-interval",
            m.retained_wal.clone(),
        );
        r.register(
            "outbox_relay_backfill_rows",
            "Rows the backfill handed to Kafka (rows already in the outbox when the slot was created)",
            m.backfill_rows.clone(),
        );
        r.register(
            "outbox_relay_backfill_seq",
            "Per table, the `seq` up to which Kafka acknowledged every backfilled row",
            m.backfill_seq.clone(),
        );
        r.register(
            "outbox_relay_backfill_target_seq",
            "Per table, the highest `seq` the backfill has to publish (what the slot's snapshot saw); \
             progress is outbox_relay_backfill_seq / this",
            m.backfill_target_seq.clone(),
        );
        m.set_state(RelayState::Starting);
        let r = &mut m.registry;
        r.register(
            "outbox_relay_commit_to_receive_seconds",
            "Time from a transaction's commit to its arrival at the relay (PostgreSQL's share of the latency)",
            m.commit_to_receive.clone(),
        );
        r.register(
            "outbox_relay_receive_to_ack_seconds",
            "Time from a transaction's arrival at the relay to Kafka's acknowledgement of each of its events \
             (the relay's and Kafka's share of the latency)",
            m.receive_to_ack.clone(),
        );
        m
    }
}

impl Metrics {
    /// A new set, to share.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// One event acknowledged by Kafka, `since_commit_us` after its
    /// commit and `since_receive_us` after its transaction reached the relay
    /// (none for backfilled rows).
    pub fn delivered(&self, latency_us: Option<(i64, i64)>) {
        self.delivered.inc();
        if let Some((since_commit_us, since_receive_us)) = latency_us {
            self.commit_to_ack.observe(seconds(since_commit_us));
            self.receive_to_ack.observe(seconds(since_receive_us));
        }
    }

    /// A transaction reached the relay `latency_us` after its commit: the
    /// part of the latency spent in PostgreSQL (WAL flush, decoding, sending).
    pub fn received(&self, latency_us: i64) {
        self.commit_to_receive.observe(seconds(latency_us));
    }

    /// One event parked in the dead-letter topic.
    pub fn dead_lettered(&self) {
        self.dead_lettered.inc();
    }

    /// A replication session started.
    pub fn session_started(&self) {
        self.sessions.inc();
    }

    /// Replication sessions started so far.
    pub fn sessions(&self) -> u64 {
        self.sessions.get()
    }

    /// The position last confirmed to PostgreSQL.
    pub fn confirmed(&self, lsn: u64) {
        self.confirmed_lsn.set(as_gauge(lsn));
        self.update_lag();
    }

    /// The server's WAL end, from the stream.
    pub fn server_position(&self, lsn: u64) {
        self.server_lsn
            .inner()
            .fetch_max(as_gauge(lsn), Ordering::Relaxed);
        self.update_lag();
    }

    fn update_lag(&self) {
        let lag = self
            .server_lsn
            .get()
            .saturating_sub(self.confirmed_lsn.get());
        self.lag_bytes.set(lag.max(0));
    }

    /// How long the oldest record handed to Kafka has waited, once that is
    /// longer than `--stall-warning`; 0 when deliveries move.
    pub fn stalled(&self, seconds: f64) {
        self.stalled_seconds.set(seconds);
    }

    /// Events handed to Kafka and not acknowledged, and their bytes.
    pub fn in_flight(&self, events: u64, bytes: u64) {
        self.in_flight_events.set(as_gauge(events));
        self.in_flight_bytes.set(as_gauge(bytes));
    }

    /// What the relay is doing now.
    pub fn set_state(&self, state: RelayState) {
        self.state.store(state as u8, Ordering::Relaxed);
        for s in RelayState::ALL {
            self.states
                .get_or_create(&vec![("state".to_owned(), s.as_str().to_owned())])
                .set(i64::from(s == state));
        }
    }

    /// What the relay is doing.
    pub fn state(&self) -> RelayState {
        let v = self.state.load(Ordering::Relaxed);
        RelayState::ALL
            .into_iter()
            .find(|s| *s as u8 == v)
            .unwrap_or(RelayState::Starting)
    }

    /// When Kafka last acknowledged an event, as Unix time.
    pub fn last_delivery(&self, unix_seconds: f64) {
        self.last_delivery.set(unix_seconds);
    }

    /// WAL the server keeps for the slot.
    pub fn retained_wal(&self, bytes: i64) {
        self.retained_wal.set(bytes);
    }

    /// One row handed to Kafka by the backfill.
    pub fn backfilled_row(&self) {
        self.backfill_rows.inc();
    }

    /// The backfill of `table` acknowledged through `seq`.
    pub fn backfill_seq(&self, table: &str, seq: i64) {
        self.backfill_seq
            .get_or_create(&vec![("table".to_owned(), table.to_owned())])
            .set(seq);
    }

    /// The highest `seq` the backfill of `table` has to publish.
    pub fn backfill_target_seq(&self, table: &str, seq: i64) {
        self.backfill_target_seq
            .get_or_create(&vec![("table".to_owned(), table.to_owned())])
            .set(seq);
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String does not fail");
        out
    }
}

fn seconds(us: i64) -> f64 {
    us.max(0) as f64 / 1e6
}

/// WAL positions as gauge values: PostgreSQL's positions stay far below
/// 2^63 (8 EiB of WAL).
fn as_gauge(lsn: u64) -> i64 {
    i64::try_from(lsn).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let m = Metrics::default();
        m.stalled(1.5);
        m.in_flight(7, 4096);
        m.delivered(Some((800, 300))); // 0.8 ms after commit, 0.3 ms after arrival
        m.delivered(Some((4_000, 2_500))); // 4 ms, 2.5 ms
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
        assert!(text.contains("outbox_relay_in_flight_events 7"), "{text}");
        assert!(text.contains("outbox_relay_in_flight_bytes 4096"), "{text}");
        assert!(
            text.contains("outbox_relay_delivery_stalled_seconds 1.5"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        m.set_state(RelayState::Streaming);
        let text = m.render();
        assert!(
            text.contains("outbox_relay_state{state=\"streaming\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("outbox_relay_state{state=\"waiting_for_lock\"} 0"),
            "{text}"
        );
        assert_eq!(m.state(), RelayState::Streaming);
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
        assert!(
            text.contains("outbox_relay_receive_to_ack_seconds_bucket{le=\"0.0005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("outbox_relay_receive_to_ack_seconds_bucket{le=\"0.002\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("outbox_relay_receive_to_ack_seconds_bucket{le=\"0.003\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("outbox_relay_commit_to_receive_seconds_count 1"),
            "{text}"
        );
    }
}
