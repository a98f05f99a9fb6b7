//! What the relay records about its slot for operators: the last event
//! Kafka acknowledged (id, topic, time), written into the bookkeeping table
//! `outbox_relay_slot` every `--status-interval` on a connection of its own,
//! for `outbox-relay status`. Best effort: a failed write is logged and
//! tried again later; it never stops the relay.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::Result;
use crate::pipeline::config::RelayConfig;
use crate::pipeline::progress::{LastDelivered, Ledger};
use crate::postgres::connection::{Connection, Mode, quote_literal};

/// Writes the last delivered event into `outbox_relay_slot` whenever it
/// changed, every `interval`, until `token` is cancelled; then once more.
pub async fn run(cfg: RelayConfig, ledger: Arc<Ledger>, token: CancellationToken) {
    let interval = cfg.status_interval.max(Duration::from_secs(1));
    let mut conn: Option<Connection> = None;
    let mut recorded = 0u64;
    loop {
        let stopping = tokio::select! {
            biased;
            _ = token.cancelled() => true,
            _ = tokio::time::sleep(interval) => false,
        };
        if let Some(last) = ledger.last_delivered()
            && last.count != recorded
        {
            match write(&cfg, &mut conn, &last).await {
                Ok(()) => recorded = last.count,
                Err(err) => {
                    conn = None;
                    tracing::warn!(error = %err, "cannot record the last delivered event for `outbox-relay status`; retrying");
                }
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

async fn write(
    cfg: &RelayConfig,
    conn: &mut Option<Connection>,
    last: &LastDelivered,
) -> Result<()> {
    if conn.is_none() {
        *conn = Some(Connection::connect(&cfg.pg, Mode::Sql).await?);
    }
    let conn = conn.as_mut().expect("connected above");
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
