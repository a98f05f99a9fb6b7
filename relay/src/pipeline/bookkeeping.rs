//! What the relay records about its slot for operators, every
//! `--status-interval` on a connection of its own: the last event Kafka
//! acknowledged (id, topic, time), written into the bookkeeping table
//! `outbox_relay_slot` for `outbox-relay status`, and the metrics that need
//! a query or a clock (WAL the slot retains, time of the last delivery).
//! Best effort: a failure is logged and tried again later; it never stops
//! the relay.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::Result;
use crate::metrics::Metrics;
use crate::pipeline::config::RelayConfig;
use crate::pipeline::progress::{LastDelivered, Ledger};
use crate::postgres::connection::{Connection, Mode, quote_literal};

/// Writes the last delivered event into `outbox_relay_slot` whenever it
/// changed, every `interval`, until `token` is cancelled; then once more.
pub async fn run(
    cfg: RelayConfig,
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
    token: CancellationToken,
) {
    let interval = cfg.status_interval.max(Duration::from_secs(1));
    let mut conn: Option<Connection> = None;
    let mut recorded = 0u64;
    // Said once per outage, not every interval: the session's own errors
    // tell the story of a database that is down.
    let mut failing = false;
    loop {
        let stopping = tokio::select! {
            biased;
            _ = token.cancelled() => true,
            _ = tokio::time::sleep(interval) => false,
        };
        let last = ledger.last_delivered();
        if let Some(last) = &last {
            metrics.last_delivery(
                last.at
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64(),
            );
        }
        let result = async {
            // The metric first: a failed write (an unmigrated table) must
            // not keep it from updating.
            if !stopping {
                metrics.retained_wal(retained_wal(&cfg, &mut conn).await?);
            }
            if let Some(last) = last.as_ref().filter(|l| l.count != recorded) {
                write(&cfg, &mut conn, last).await?;
                recorded = last.count;
            }
            Ok::<(), crate::Error>(())
        }
        .await;
        match result {
            Ok(()) => failing = false,
            Err(err) => {
                conn = None;
                if !failing {
                    tracing::warn!(error = %err, "cannot record the last delivered event or read the slot's retained WAL; retrying every --status-interval");
                }
                failing = true;
            }
        }
        if stopping {
            break;
        }
    }
    if let Some(conn) = conn {
        conn.terminate().await;
    }
}

/// WAL the server keeps for the slot: its current position minus the
/// slot's `restart_lsn` (0 while the slot does not exist yet).
async fn retained_wal(cfg: &RelayConfig, conn: &mut Option<Connection>) -> Result<i64> {
    let conn = connected(cfg, conn).await?;
    let rows = conn
        .query(&format!(
            "SELECT pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), restart_lsn)::bigint::text AS bytes \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
            quote_literal(&cfg.slot)
        ))
        .await?;
    Ok(rows
        .first()
        .and_then(|r| r.get("bytes"))
        .and_then(|b| b.parse().ok())
        .unwrap_or(0))
}

async fn connected<'a>(
    cfg: &RelayConfig,
    conn: &'a mut Option<Connection>,
) -> Result<&'a mut Connection> {
    if conn.is_none() {
        let mut c = Connection::connect(&cfg.pg, Mode::Sql).await?;
        // One stuck query must not silence the bookkeeping for good.
        c.query("SET statement_timeout = '5s'").await?;
        *conn = Some(c);
    }
    Ok(conn.as_mut().expect("connected above"))
}

async fn write(
    cfg: &RelayConfig,
    conn: &mut Option<Connection>,
    last: &LastDelivered,
) -> Result<()> {
    let conn = connected(cfg, conn).await?;
    let at = last
        .at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    // PostgreSQL's epoch is 2000-01-01.
    let committed = match last.committed_at_us {
        Some(us) => format!(
            "pg_catalog.to_timestamp({})",
            946_684_800.0 + us as f64 / 1e6
        ),
        None => "NULL".into(),
    };
    conn.query(&format!(
        "UPDATE {} SET last_event_id = {}, last_event_topic = {}, \
         last_delivered_at = pg_catalog.to_timestamp({at}), last_event_committed_at = {committed} \
         WHERE slot_name = {}",
        cfg.slot_table(),
        quote_literal(&last.event_id),
        quote_literal(&last.topic),
        quote_literal(&cfg.slot)
    ))
    .await?;
    Ok(())
}
