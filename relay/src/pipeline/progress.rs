//! Progress: which WAL position may be confirmed to PostgreSQL.
//!
//! Every record handed to the producer carries a [`Ticket`] (a sequence
//! number). The producer's delivery callback settles tickets in the
//! [`Ledger`], a ring the size of the in-flight window, which keeps the
//! watermark below which every record is settled: acknowledged by Kafka, or
//! replaced by an acknowledged dead letter. The stream records each
//! transaction's end position against the ticket that follows it
//! ([`Progress`]) and confirms a position only once the watermark has passed
//! it, so a position is confirmed only after everything before it is
//! acknowledged, whatever order partitions acknowledge in.
//!
//! Why a ring and not a future per record: a oneshot channel, its boxed
//! sender and a queue entry per record cost the relay more CPU than decoding
//! the row did (measured with the benchmark); settling a ticket costs one
//! uncontended lock and a store.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::pipeline::dead_letter::DeadLetter;
use crate::postgres::lsn::Lsn;
use crate::postgres::time::pg_now_us;
use crate::{Error, Result};

// Tickets travel through librdkafka as a pointer-sized opaque value.
const _: () = assert!(
    usize::BITS >= 64,
    "outbox-relay needs a 64-bit target (delivery tickets are 63-bit sequence numbers)"
);

/// A record's place in the delivery order, passed to the producer as the
/// delivery opaque and handed back in the delivery report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

impl Ticket {
    fn record(seq: u64) -> Self {
        Self(seq << 1)
    }

    /// The same place, taken by a dead letter sent instead of the record.
    pub fn for_dead_letter(self) -> Self {
        Self(self.0 | 1)
    }

    /// Whether this ticket belongs to a dead letter.
    pub fn is_dead_letter(self) -> bool {
        self.0 & 1 == 1
    }

    fn seq(self) -> u64 {
        self.0 >> 1
    }

    /// As librdkafka's per-message opaque.
    pub fn into_opaque(self) -> usize {
        self.0 as usize
    }

    /// Back from a delivery report.
    pub fn from_opaque(opaque: usize) -> Self {
        Self(opaque as u64)
    }
}

/// A record Kafka refused, waiting for the stream to act on it.
#[derive(Debug)]
pub enum Refused {
    /// Kafka refused a record in its delivery report. What that means
    /// depends on whether the record was sent on its own (see `stream`):
    /// brokers refuse whole batches.
    Record {
        /// The refused record's place.
        ticket: Ticket,
        /// Why (an [`Error::Delivery`]).
        error: Error,
        /// What a dead letter for it would hold.
        letter: DeadLetter,
    },
    /// Stop: a dead letter was refused too.
    Fatal(Error),
}

/// Delivery counters, for logs and the benchmark.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Records acknowledged by Kafka.
    pub delivered: u64,
    /// Events sent to the dead-letter topic instead.
    pub dead_lettered: u64,
}

/// Settled and unsettled tickets, shared by the stream and the producer's
/// delivery callback (which runs on librdkafka's polling thread).
#[derive(Debug)]
pub struct Ledger {
    state: Mutex<State>,
    changed: Notify,
    /// Whether `state.refused` is non-empty, readable without the lock.
    any_refused: AtomicBool,
    /// Records (and dead letters) handed to the producer, and delivery
    /// reports served for them, over the process's life: the difference is
    /// what the producer still holds. (librdkafka's own `outq_len` also
    /// counts queued callbacks and debug events, so it is not this.)
    handed: AtomicU64,
    reported: AtomicU64,
    metrics: Arc<Metrics>,
    /// The last event Kafka acknowledged, for the relay's bookkeeping
    /// (`outbox-relay status`); its own lock, away from the ring's.
    last: Mutex<Option<LastDelivered>>,
}

/// The last event Kafka acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastDelivered {
    /// Its id.
    pub event_id: String,
    /// Its topic.
    pub topic: String,
    /// When the acknowledgement came.
    pub at: std::time::SystemTime,
    /// Its transaction's commit time (µs since 2000-01-01); none for
    /// events from the backfill.
    pub committed_at_us: Option<i64>,
    /// Acknowledged events so far, over the process's life: tells a new
    /// one from the one recorded last.
    pub count: u64,
    /// Its ticket's place in stream order.
    pub seq: u64,
}

#[derive(Debug)]
struct State {
    /// Tickets below this belong to an earlier session: their reports are
    /// ignored (that session's positions were never confirmed past them).
    base: u64,
    /// The next sequence number to hand out.
    next: u64,
    /// Every ticket below this is settled.
    settled_below: u64,
    /// One slot per ticket in `settled_below..next`, at `seq % len`.
    ring: Vec<Slot>,
    /// Wake the stream when `settled_below` reaches this.
    wake_at: u64,
    /// Bytes of the unsettled records (key, value and headers, as handed
    /// to the producer), and the most the window holds before it is full.
    bytes: u64,
    max_bytes: u64,
    /// Wake the stream when `bytes` falls to this.
    wake_bytes: Option<u64>,
    refused: VecDeque<Refused>,
    totals: Totals,
}

impl State {
    /// The slot of ticket `seq` when it is in this session's window and not
    /// settled yet.
    fn unsettled(&mut self, seq: u64) -> Option<&mut Slot> {
        if seq < self.base.max(self.settled_below) || seq >= self.next {
            return None;
        }
        let len = self.ring.len() as u64;
        let slot = &mut self.ring[(seq % len) as usize];
        (!slot.settled).then_some(slot)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    settled: bool,
    /// What its record (and a dead letter sent in its place) weighs.
    bytes: u64,
    /// When its transaction was committed and reached the relay, for the
    /// latency metrics; none for backfilled rows.
    arrival: Option<Arrival>,
}

/// When a streamed transaction was committed and when it reached the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// The commit time from its Begin message: microseconds since
    /// 2000-01-01 (PostgreSQL's epoch) on the server's clock, so commit to
    /// acknowledgement is measured against the relay's wall clock (see
    /// `postgres::time`).
    pub commit_ts: i64,
    /// When its Begin message was read, on the relay's monotonic clock: the
    /// arrival-to-acknowledgement time stays right when the wall clock is
    /// stepped (NTP, a VM resumed) while the event waits for Kafka.
    pub received: Instant,
}

impl Ledger {
    /// An empty ledger; [`Progress::start`] opens a session on it.
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                base: 0,
                next: 0,
                settled_below: 0,
                ring: Vec::new(),
                wake_at: u64::MAX,
                bytes: 0,
                max_bytes: u64::MAX,
                wake_bytes: None,
                refused: VecDeque::new(),
                totals: Totals::default(),
            }),
            changed: Notify::new(),
            any_refused: AtomicBool::new(false),
            handed: AtomicU64::new(0),
            reported: AtomicU64::new(0),
            metrics,
            last: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the counters in a state
        // worse than a crash would; keep going rather than poison the relay.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A record or dead letter was handed to the producer.
    pub fn handed(&self) {
        self.handed.fetch_add(1, Ordering::AcqRel);
    }

    /// The record (or dead letter) about to be handed to the producer with
    /// `ticket` weighs `bytes`: counted against the window until its ticket
    /// is settled. Ignored for a ticket not in the window (settled, or of an
    /// earlier session).
    pub fn charge(&self, ticket: Ticket, bytes: u64) {
        let mut s = self.lock();
        let Some(slot) = s.unsettled(ticket.seq()) else {
            return;
        };
        slot.bytes += bytes;
        s.bytes += bytes;
    }

    /// A delivery report was served (acknowledgement or failure, of any
    /// session).
    pub fn reported(&self) {
        self.reported.fetch_add(1, Ordering::AcqRel);
    }

    /// Records handed to the producer whose delivery report was not served.
    pub fn unreported(&self) -> u64 {
        let reported = self.reported.load(Ordering::Acquire);
        self.handed.load(Ordering::Acquire).saturating_sub(reported)
    }

    /// Kafka acknowledged the event `event_id` in `topic` (not a dead
    /// letter), holding `ticket`: remembered as the last one delivered when
    /// it is the newest so far in stream order (acknowledgements come per
    /// partition, so an older event's may come last). The strings' buffers
    /// are reused, so this allocates nothing once warm.
    pub fn note_delivered(
        &self,
        ticket: Ticket,
        event_id: &[u8],
        topic: &str,
        committed_at_us: Option<i64>,
    ) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let at = std::time::SystemTime::now();
        let id = String::from_utf8_lossy(event_id);
        match last.as_mut() {
            // An older event's acknowledgement: counted, not recorded.
            Some(l) if l.seq > ticket.seq() => l.count += 1,
            Some(l) => {
                l.seq = ticket.seq();
                l.event_id.clear();
                l.event_id.push_str(&id);
                l.topic.clear();
                l.topic.push_str(topic);
                l.at = at;
                l.committed_at_us = committed_at_us;
                l.count += 1;
            }
            None => {
                *last = Some(LastDelivered {
                    event_id: id.into_owned(),
                    topic: topic.to_owned(),
                    at,
                    committed_at_us,
                    count: 1,
                    seq: ticket.seq(),
                })
            }
        }
    }

    /// The last event Kafka acknowledged, if any.
    pub fn last_delivered(&self) -> Option<LastDelivered> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Kafka acknowledged the record (or dead letter) holding `ticket`.
    /// Returns its transaction's commit time (µs since 2000-01-01) when it
    /// settled a ticket of this session that has one.
    pub fn acknowledged(&self, ticket: Ticket) -> Option<i64> {
        let mut s = self.lock();
        let slot = s.unsettled(ticket.seq())?;
        slot.settled = true;
        let arrival = slot.arrival;
        let weight = std::mem::take(&mut slot.bytes);
        s.bytes = s.bytes.saturating_sub(weight);
        if ticket.is_dead_letter() {
            s.totals.dead_lettered += 1;
            self.metrics.dead_lettered();
        } else {
            s.totals.delivered += 1;
            let now = pg_now_us();
            // Saturating: the commit time is the server's clock, not ours.
            self.metrics.delivered(arrival.map(|a| {
                (
                    now.saturating_sub(a.commit_ts),
                    i64::try_from(a.received.elapsed().as_micros()).unwrap_or(i64::MAX),
                )
            }));
        }
        let len = s.ring.len() as u64;
        while s.settled_below < s.next {
            let i = (s.settled_below % len) as usize;
            if !s.ring[i].settled {
                break;
            }
            s.ring[i].settled = false;
            s.settled_below += 1;
        }
        if s.settled_below >= s.wake_at || s.wake_bytes.is_some_and(|w| s.bytes <= w) {
            s.wake_at = u64::MAX;
            s.wake_bytes = None;
            drop(s);
            self.changed.notify_one();
        }
        arrival.map(|a| a.commit_ts)
    }

    /// Kafka refused the record holding `ticket` for good.
    pub fn refused(&self, ticket: Ticket, refusal: Refused) {
        let mut s = self.lock();
        let seq = ticket.seq();
        if seq < s.base || seq >= s.next {
            // From an earlier session: it starts again from the slot's
            // confirmed position, which is before this record.
            tracing::debug!(seq, "ignoring a delivery failure from an earlier session");
            return;
        }
        s.refused.push_back(refusal);
        self.any_refused.store(true, Ordering::Release);
        drop(s);
        self.changed.notify_one();
    }
}

/// The stream's (or the backfill's) view of one session: hands out tickets
/// within the window and turns settled tickets into confirmable positions.
#[derive(Debug)]
pub struct Progress {
    ledger: Arc<Ledger>,
    /// `(ticket count when the position was reached, position)`, oldest first.
    positions: VecDeque<(u64, Lsn)>,
    confirmable: Lsn,
}

impl Progress {
    /// Opens a session on `ledger` from `start`, with room for `window`
    /// unsettled records weighing less than `window_bytes` in all (plus the
    /// one record that crosses it). Reports for tickets of earlier sessions
    /// are ignored from now on: call it only once the producer holds none of
    /// their records (see `Publisher::drain`).
    pub fn start(ledger: Arc<Ledger>, start: Lsn, window: usize, window_bytes: u64) -> Self {
        {
            let mut s = ledger.lock();
            s.base = s.next;
            s.settled_below = s.next;
            s.ring = vec![Slot::default(); window.max(1)];
            s.wake_at = u64::MAX;
            s.bytes = 0;
            s.max_bytes = window_bytes.max(1);
            s.wake_bytes = None;
            s.refused.clear();
            ledger.any_refused.store(false, Ordering::Release);
            s.totals = Totals::default();
        }
        Self {
            ledger,
            positions: VecDeque::new(),
            confirmable: start,
        }
    }

    /// Whether the window has room for another record: fewer records than
    /// it holds, weighing less than its bytes. When it has not, the next
    /// [`changed`](Self::changed) fires once an eighth of it is free
    /// (waking per acknowledgement would cost a wake-up per record).
    ///
    /// Why bytes too, here and not in librdkafka's own buffer limit
    /// (`queue.buffering.max.kbytes`, set out of reach in `kafka::producer`):
    /// a full librdkafka buffer refuses the record in the middle of handling
    /// a message, where waiting for room would stop the stream's loop, and
    /// with it the status updates that keep `wal_sender_timeout` from
    /// ending the stream and the stall warnings, for as long as Kafka is
    /// away. A full window stops only the reading.
    pub fn has_room(&self) -> bool {
        let mut s = self.ledger.lock();
        let len = s.ring.len() as u64;
        let count_full = s.next - s.settled_below >= len;
        let bytes_full = s.bytes >= s.max_bytes;
        if !count_full && !bytes_full {
            return true;
        }
        if count_full {
            s.wake_at = s.next - len + (len / 8).max(1);
        }
        if bytes_full {
            s.wake_bytes = Some(s.max_bytes - s.max_bytes / 8);
        }
        false
    }

    /// Takes the next ticket for a record of a streamed transaction that
    /// arrived as `arrival` (none for backfilled rows). Call only after
    /// [`has_room`](Self::has_room) said yes.
    pub fn ticket(&self, arrival: Option<Arrival>) -> Result<Ticket> {
        let mut s = self.ledger.lock();
        let len = s.ring.len() as u64;
        if s.next - s.settled_below >= len {
            return Err(Error::Protocol(
                "a record was read with the in-flight window full".into(),
            ));
        }
        let seq = s.next;
        s.ring[(seq % len) as usize] = Slot {
            settled: false,
            bytes: 0,
            arrival,
        };
        s.next += 1;
        Ok(Ticket::record(seq))
    }

    /// `lsn` becomes confirmable once every record ticketed so far is settled.
    pub fn position(&mut self, lsn: Lsn) {
        let after = self.ledger.lock().next;
        match self.positions.back_mut() {
            // No record in between: the newer position replaces the older.
            Some((seq, last)) if *seq == after => *last = (*last).max(lsn),
            _ => self.positions.push_back((after, lsn)),
        }
    }

    /// The newest position whose records are all settled.
    pub fn confirmable(&mut self) -> Lsn {
        let settled = self.ledger.lock().settled_below;
        while let Some(&(seq, lsn)) = self.positions.front() {
            if seq > settled {
                break;
            }
            self.confirmable = self.confirmable.max(lsn);
            self.positions.pop_front();
        }
        self.confirmable
    }

    /// Whether every ticketed record is settled. When not, the next
    /// [`changed`](Self::changed) fires once they are.
    pub fn all_settled(&self) -> bool {
        let mut s = self.ledger.lock();
        if s.settled_below == s.next {
            return true;
        }
        s.wake_at = s.next;
        false
    }

    /// The oldest refusal not yet acted on.
    pub fn take_refused(&self) -> Option<Refused> {
        let mut s = self.ledger.lock();
        let refused = s.refused.pop_front();
        if s.refused.is_empty() {
            self.ledger.any_refused.store(false, Ordering::Release);
        }
        refused
    }

    /// Whether a refusal waits, without taking a lock (checked per message).
    pub fn any_refused(&self) -> bool {
        self.ledger.any_refused.load(Ordering::Acquire)
    }

    /// Resolves after a refusal arrived or a wake-up point set by
    /// [`has_room`](Self::has_room) or [`all_settled`](Self::all_settled) was
    /// reached (or spuriously: check again).
    pub async fn changed(&self) {
        self.ledger.changed.notified().await;
    }

    /// What this session delivered.
    pub fn totals(&self) -> Totals {
        self.ledger.lock().totals
    }

    /// Records handed out and not settled yet, and the watermark below
    /// which every ticket is settled (it moves whenever Kafka acknowledges
    /// the oldest outstanding record): for reporting a stalled delivery.
    pub fn outstanding(&self) -> (u64, u64) {
        let s = self.ledger.lock();
        (s.next - s.settled_below, s.settled_below)
    }
}

/// Watches for a delivery that does not move: Kafka never gives up on a
/// record by itself (no message timeout), so a long outage shows here, as a
/// warning repeated every `threshold` and the
/// `outbox_relay_delivery_stalled_seconds` metric.
#[derive(Debug)]
pub struct StallWatch {
    threshold: Duration,
    metrics: Arc<Metrics>,
    /// The settled watermark last seen, and since when it has not moved.
    watermark: u64,
    since: Option<Instant>,
    warned_at: Option<Instant>,
}

impl StallWatch {
    /// Reports stalls longer than `threshold` into `metrics` and the log.
    pub fn new(threshold: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            threshold,
            metrics,
            watermark: 0,
            since: None,
            warned_at: None,
        }
    }

    /// Call periodically (about once a second or more often).
    pub fn check(&mut self, progress: &Progress) {
        let (outstanding, watermark) = progress.outstanding();
        self.metrics
            .in_flight(outstanding, progress.ledger.lock().bytes);
        if outstanding == 0 || watermark != self.watermark || self.since.is_none() {
            if self.warned_at.is_some() {
                tracing::info!("kafka acknowledges again; the stalled delivery resumed");
            }
            self.watermark = watermark;
            self.since = (outstanding > 0).then(Instant::now);
            self.warned_at = None;
            self.metrics.stalled(0.0);
            return;
        }
        let waited = self.since.map(|t| t.elapsed()).unwrap_or_default();
        if waited < self.threshold {
            return;
        }
        self.metrics.stalled(waited.as_secs_f64());
        if self.warned_at.is_none_or(|t| t.elapsed() >= self.threshold) {
            tracing::warn!(
                waited = ?waited,
                records = outstanding,
                "kafka has not acknowledged the oldest event handed to it; the relay keeps waiting \
                 (records are never given up) and confirms nothing past it; check the brokers"
            );
            self.warned_at = Some(Instant::now());
        }
    }
}

impl Ledger {
    /// The metrics delivery reports count into.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Takes every refusal not acted on, for the relay to learn which
    /// records to send on their own in the next session.
    pub fn take_all_refused(&self) -> Vec<Refused> {
        let mut s = self.lock();
        self.any_refused.store(false, Ordering::Release);
        s.refused.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ts: i64) -> Arrival {
        Arrival {
            commit_ts: ts,
            received: Instant::now(),
        }
    }

    fn progress(window: usize) -> (Arc<Ledger>, Progress) {
        let ledger = Ledger::new(Metrics::new());
        let progress = Progress::start(ledger.clone(), Lsn(10), window, u64::MAX);
        (ledger, progress)
    }

    #[test]
    fn positions_advance_in_order_and_never_back() {
        let (_, mut p) = progress(8);
        p.position(Lsn(20));
        p.position(Lsn(15));
        p.position(Lsn(30));
        assert_eq!(p.confirmable(), Lsn(30));
    }

    #[test]
    fn a_position_waits_for_every_record_before_it() {
        let (ledger, mut p) = progress(8);
        let a = p.ticket(Some(at(0))).unwrap();
        p.position(Lsn(100));
        let b = p.ticket(Some(at(0))).unwrap();
        let c = p.ticket(Some(at(0))).unwrap();
        p.position(Lsn(200));
        // Acknowledged out of order (different partitions).
        ledger.acknowledged(c);
        ledger.acknowledged(b);
        assert_eq!(p.confirmable(), Lsn(10), "record a is not acknowledged yet");
        ledger.acknowledged(a);
        assert_eq!(p.confirmable(), Lsn(200));
        assert!(p.all_settled());
        assert_eq!(p.totals().delivered, 3);
    }

    /// Issue 10, item 11: a commit time from the server far in the past
    /// (or the future) does not overflow the latency arithmetic.
    #[test]
    fn extreme_commit_times_do_not_overflow() {
        let (ledger, p) = progress(4);
        let past = p.ticket(Some(at(i64::MIN))).unwrap();
        let future = p.ticket(Some(at(i64::MAX))).unwrap();
        ledger.acknowledged(past);
        ledger.acknowledged(future);
        assert_eq!(p.totals().delivered, 2);
    }

    #[test]
    fn the_window_bounds_unsettled_records() {
        let (ledger, p) = progress(2);
        let a = p.ticket(None).unwrap();
        let _b = p.ticket(None).unwrap();
        assert!(!p.has_room());
        assert!(p.ticket(None).is_err(), "a full window hands out no ticket");
        ledger.acknowledged(a);
        assert!(p.has_room());
    }

    /// The window is full at its bytes as at its records: reading stops in
    /// the stream's loop, never inside a send (see `has_room`).
    #[tokio::test]
    async fn the_window_bounds_unsettled_bytes_and_wakes_when_they_drain() {
        let ledger = Ledger::new(Metrics::new());
        let p = Progress::start(ledger.clone(), Lsn(0), 100, 1000);
        let a = p.ticket(None).unwrap();
        ledger.charge(a, 600);
        assert!(p.has_room(), "600 of 1000 bytes");
        // The record that crosses the limit is let through: one larger
        // than the whole window must still go.
        let b = p.ticket(None).unwrap();
        ledger.charge(b, 5000);
        assert!(!p.has_room(), "5600 of 1000 bytes");
        // A dead letter in a record's place weighs on the same ticket.
        ledger.charge(b.for_dead_letter(), 100);
        let acker = std::thread::spawn(move || {
            ledger.acknowledged(a);
            ledger
        });
        let ledger = acker.join().unwrap();
        assert!(!p.has_room(), "5100 of 1000 bytes");
        let acker = std::thread::spawn(move || ledger.acknowledged(b.for_dead_letter()));
        tokio::time::timeout(std::time::Duration::from_secs(5), p.changed())
            .await
            .expect("woken once the bytes fell below seven eighths");
        acker.join().unwrap();
        assert!(p.has_room());
        // The wake-up comes once the bytes fall to seven eighths, not at
        // the first acknowledgement under the limit.
        let ledger = Ledger::new(Metrics::new());
        let p = Progress::start(ledger.clone(), Lsn(0), 100, 1000);
        let [a, b, c] = [600, 300, 200].map(|bytes| {
            let t = p.ticket(None).unwrap();
            ledger.charge(t, bytes);
            t
        });
        assert!(!p.has_room(), "1100 of 1000 bytes");
        ledger.acknowledged(c);
        assert_eq!(
            ledger.lock().wake_bytes,
            Some(875),
            "900 bytes: still armed"
        );
        // Room again (the stream finds it at its next tick), but no wake-up
        // for every acknowledgement.
        assert!(p.has_room(), "900 of 1000 bytes");
        ledger.acknowledged(b);
        assert_eq!(ledger.lock().wake_bytes, None, "600 bytes: woken");
        tokio::time::timeout(std::time::Duration::from_secs(5), p.changed())
            .await
            .expect("the wake-up was stored");
        assert!(p.has_room());
        ledger.acknowledged(a);
        assert_eq!(ledger.lock().bytes, 0);
        // Charges for settled tickets, or of an earlier session, are ignored.
        let ledger = Ledger::new(Metrics::new());
        let old = Progress::start(ledger.clone(), Lsn(0), 4, 1000);
        let stale = old.ticket(None).unwrap();
        let p = Progress::start(ledger.clone(), Lsn(0), 4, 1000);
        ledger.charge(stale, 5000);
        assert!(p.has_room());
    }

    #[tokio::test]
    async fn a_full_window_wakes_the_stream_when_room_frees_up() {
        let (ledger, p) = progress(8);
        let tickets: Vec<_> = (0..8).map(|_| p.ticket(None).unwrap()).collect();
        assert!(!p.has_room());
        let acker = std::thread::spawn(move || ledger.acknowledged(tickets[0]));
        tokio::time::timeout(std::time::Duration::from_secs(5), p.changed())
            .await
            .expect("woken once an eighth of the window is free");
        acker.join().unwrap();
        assert!(p.has_room());
    }

    #[test]
    fn a_dead_letter_settles_the_refused_records_place() {
        let ledger = Ledger::new(Metrics::new());
        let mut p = Progress::start(ledger.clone(), Lsn(0), 4, u64::MAX);
        let a = p.ticket(None).unwrap();
        p.position(Lsn(50));
        ledger.refused(
            a,
            Refused::Record {
                ticket: a,
                error: Error::Protocol("refused".into()),
                letter: DeadLetter::default(),
            },
        );
        assert_eq!(p.confirmable(), Lsn(0), "refused, not settled");
        let Some(Refused::Record { ticket, .. }) = p.take_refused() else {
            panic!("a refusal is due");
        };
        assert_eq!(ticket, a);
        assert!(!p.all_settled(), "a refused record is not settled");
        ledger.acknowledged(ticket.for_dead_letter());
        assert_eq!(p.confirmable(), Lsn(50));
        assert_eq!(
            p.totals(),
            Totals {
                delivered: 0,
                dead_lettered: 1
            }
        );
    }

    #[test]
    fn reports_from_an_earlier_session_are_ignored() {
        let ledger = Ledger::new(Metrics::new());
        let old = Progress::start(ledger.clone(), Lsn(0), 4, u64::MAX);
        let stale = old.ticket(None).unwrap();
        let mut p = Progress::start(ledger.clone(), Lsn(0), 4, u64::MAX);
        let fresh = p.ticket(None).unwrap();
        p.position(Lsn(9));
        ledger.refused(stale, Refused::Fatal(Error::Protocol("x".into())));
        ledger.acknowledged(stale);
        assert!(p.take_refused().is_none());
        assert_eq!(p.confirmable(), Lsn(0));
        ledger.acknowledged(fresh);
        assert_eq!(p.confirmable(), Lsn(9));
    }
}
