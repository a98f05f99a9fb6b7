//! The backfill: when the relay creates its slot, rows already in the outbox
//! (written before the relay's first start) are read under the slot's
//! exported snapshot and published, so the stream that follows continues
//! exactly where the snapshot ends: nothing missed, nothing twice.

use std::collections::VecDeque;

use tokio_util::sync::CancellationToken;

use crate::config::RelayConfig;
use crate::connection::{Connection, quote_ident, quote_literal};
use crate::publish::Publisher;
use crate::row::Layout;
use crate::{Error, Result};

const FETCH_SIZE: usize = 1000;

/// Publishes every row of every table in the publication, as of `snapshot`,
/// and waits until Kafka acknowledged all of them. Returns how many.
pub async fn run(
    sql: &mut Connection,
    cfg: &RelayConfig,
    snapshot: &str,
    publisher: &mut Publisher,
    token: &CancellationToken,
) -> Result<u64> {
    sql.query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    sql.query(&format!(
        "SET TRANSACTION SNAPSHOT {}",
        quote_literal(snapshot)
    ))
    .await?;
    let tables = sql
        .query(&format!(
            "SELECT schemaname, tablename, EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = \
             format('%I.%I', schemaname, tablename)::regclass AND a.attname = 'created_at' AND NOT a.attisdropped)::text \
             AS has_created_at FROM pg_publication_tables WHERE pubname = {}",
            quote_literal(&cfg.publication)
        ))
        .await?;
    let mut published = 0u64;
    let mut in_flight = VecDeque::new();
    for t in &tables {
        let schema = t.get("schemaname").unwrap_or_default();
        let name = t.get("tablename").unwrap_or_default();
        let table = format!("{}.{}", quote_ident(schema), quote_ident(name));
        // Commit order is not known for rows already in the table; creation
        // time (and the time-ordered UUIDv7 id) is the best stand-in.
        let order = if t.get("has_created_at") == Some("true") {
            "ORDER BY created_at, id"
        } else {
            "ORDER BY id"
        };
        sql.query(&format!(
            "DECLARE outbox_backfill NO SCROLL CURSOR FOR SELECT * FROM {table} {order}"
        ))
        .await?;
        loop {
            if token.is_cancelled() {
                return Err(Error::Io {
                    context: "backfill".into(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::Interrupted,
                        "stopped before it completed",
                    ),
                });
            }
            let (columns, rows) = fetch(sql).await?;
            if rows.is_empty() {
                break;
            }
            let layout = Layout::for_columns(&format!("{schema}.{name}"), &columns)?;
            for row in &rows {
                let event = layout.event_from_row(row, &columns)?;
                in_flight.push_back(publisher.send(&event).await?);
                published += 1;
                if in_flight.len() >= cfg.max_in_flight {
                    let oldest: crate::publish::InFlight =
                        in_flight.pop_front().expect("not empty");
                    oldest.acked().await?;
                }
            }
        }
        sql.query("CLOSE outbox_backfill").await?;
    }
    sql.query("COMMIT").await?;
    while let Some(f) = in_flight.pop_front() {
        f.acked().await?;
    }
    Ok(published)
}

async fn fetch(sql: &mut Connection) -> Result<(Vec<String>, Vec<crate::connection::Row>)> {
    let rows = sql
        .query(&format!("FETCH {FETCH_SIZE} FROM outbox_backfill"))
        .await?;
    let columns = rows
        .first()
        .map(|r| r.columns().to_vec())
        .unwrap_or_default();
    Ok((columns, rows))
}
