//! Progress: which WAL position may be confirmed to PostgreSQL. Records and
//! position markers enter one FIFO in stream order; a task awaits each
//! record's delivery report in that order and advances the confirmable
//! position only when it reaches a marker, so a position is confirmed only
//! after everything before it is acknowledged by Kafka.

use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::Result;
use crate::lsn::Lsn;
use crate::publish::InFlight;

/// One entry of the FIFO.
pub enum Pending {
    /// A record handed to the producer.
    Record(InFlight),
    /// The end of a transaction (its Commit `end_lsn`), or an idle position
    /// from a keepalive: confirmable once everything before it is delivered.
    Position(Lsn),
}

/// Delivery counters, for logs and the benchmark.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Records acknowledged by Kafka.
    pub delivered: u64,
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
    /// Starts tracking from `start` with room for `window` unacknowledged entries.
    pub fn start(start: Lsn, window: usize) -> Self {
        let (tx, rx) = mpsc::channel(window);
        let (confirmed_tx, confirmed) = watch::channel(start);
        let task = tokio::spawn(
            await_deliveries(rx, confirmed_tx).instrument(tracing::info_span!("deliveries")),
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
) -> Result<Totals> {
    let mut totals = Totals::default();
    while let Some(entry) = rx.recv().await {
        match entry {
            Pending::Record(in_flight) => {
                let event_id = in_flight.event_id.clone();
                let acked = in_flight.acked().await?;
                totals.delivered += 1;
                tracing::trace!(event_id = %event_id, partition = acked.partition, offset = acked.offset, "delivered");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn positions_advance_in_order_and_never_back() {
        let tracker = Tracker::start(Lsn(10), 8);
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
