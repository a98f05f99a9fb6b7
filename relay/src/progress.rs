//! Progress: which WAL position may be confirmed to PostgreSQL. Records and
//! position markers enter one FIFO in stream order; a task awaits each
//! record's delivery report in that order and advances the confirmable
//! position only when it reaches a marker, so a position is confirmed only
//! after everything before it is acknowledged by Kafka.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::publish::{DeadLetter, DeadLetters, InFlight};
use crate::{Error, Result};

/// One entry of the FIFO.
pub enum Pending {
    /// A record handed to the producer, with its transaction's commit time
    /// (microseconds since 2000-01-01; none for backfilled rows).
    Record(InFlight, Option<i64>),
    /// The end of a transaction (its Commit `end_lsn`), or an idle position
    /// from a keepalive: confirmable once everything before it is delivered.
    Position(Lsn),
}

/// Delivery counters, for logs and the benchmark.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Records acknowledged by Kafka.
    pub delivered: u64,
    /// Events sent to the dead-letter topic instead.
    pub dead_lettered: u64,
}

/// The sending side of the FIFO, and what the stream needs to read back.
pub struct Tracker {
    /// Entries in stream order. Its capacity is the in-flight window.
    pub tx: mpsc::Sender<Pending>,
    /// The latest confirmable position.
    pub confirmed: watch::Receiver<Lsn>,
    /// The task awaiting delivery reports; ends with the first failed delivery.
    pub task: tokio::task::JoinHandle<Result<Totals>>,
}

impl Tracker {
    /// Starts tracking from `start` with room for `window` unacknowledged
    /// entries. With `dead_letters`, a record Kafka refuses for good goes to
    /// the dead-letter topic and tracking goes on; without, it stops tracking.
    pub fn start(
        start: Lsn,
        window: usize,
        dead_letters: Option<DeadLetters>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(window);
        let (confirmed_tx, confirmed) = watch::channel(start);
        let task = tokio::spawn(
            await_deliveries(rx, confirmed_tx, dead_letters, metrics)
                .instrument(tracing::info_span!("deliveries")),
        );
        Tracker {
            tx,
            confirmed,
            task,
        }
    }
}

async fn await_deliveries(
    mut rx: mpsc::Receiver<Pending>,
    confirmed: watch::Sender<Lsn>,
    dead_letters: Option<DeadLetters>,
    metrics: Arc<Metrics>,
) -> Result<Totals> {
    let mut totals = Totals::default();
    while let Some(entry) = rx.recv().await {
        match entry {
            Pending::Record(in_flight, commit_ts) => {
                let event_id = in_flight.event_id.clone();
                match in_flight.outcome().await {
                    Ok(acked) => {
                        totals.delivered += 1;
                        metrics.delivered(commit_ts.map(|ts| crate::stream::pg_now_us() - ts));
                        tracing::trace!(event_id = %event_id, partition = acked.partition, offset = acked.offset, "delivered");
                    }
                    // Refused for good, and the policy is to park it: the dead
                    // letter takes the record's place in the FIFO, so nothing
                    // after it is confirmed before the dead letter is acknowledged.
                    Err((err, Some(message)))
                        if err.is_undeliverable() && dead_letters.is_some() =>
                    {
                        let letters = dead_letters.as_ref().expect("checked above");
                        let letter = DeadLetter::from_message(&message, &err);
                        letters
                            .send(&letter)
                            .await
                            .map_err(|e| dead_letter_failed(&letter, e))?
                            .acked()
                            .await
                            .map_err(|e| dead_letter_failed(&letter, e))?;
                        totals.dead_lettered += 1;
                        metrics.dead_lettered();
                    }
                    Err((err, _)) => return Err(err),
                }
            }
            Pending::Position(lsn) => {
                confirmed.send_if_modified(|current| {
                    if lsn > *current {
                        *current = lsn;
                        true
                    } else {
                        false
                    }
                });
            }
        }
    }
    Ok(totals)
}

fn dead_letter_failed(letter: &DeadLetter, err: Error) -> Error {
    Error::DeadLetterFailed {
        event_id: letter.event_id.clone(),
        reason: letter.reason.clone(),
        source: Box::new(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn positions_advance_in_order_and_never_back() {
        let tracker = Tracker::start(Lsn(10), 8, None, Metrics::new());
        tracker.tx.send(Pending::Position(Lsn(20))).await.unwrap();
        tracker.tx.send(Pending::Position(Lsn(15))).await.unwrap();
        tracker.tx.send(Pending::Position(Lsn(30))).await.unwrap();
        let Tracker {
            tx,
            confirmed,
            task,
        } = tracker;
        drop(tx);
        let totals = task.await.unwrap().unwrap();
        assert_eq!(totals.delivered, 0);
        assert_eq!(*confirmed.borrow(), Lsn(30));
    }
}
