//! The backfill: when the relay creates its slot, rows already in the outbox
//! (written before the relay's first start) are read under the slot's
//! exported snapshot and published, so the stream that follows continues
//! exactly where the snapshot ends: nothing missed, nothing twice.

use tokio_util::sync::CancellationToken;

use crate::config::RelayConfig;
use crate::connection::{Connection, quote_ident, quote_literal};
use crate::lsn::Lsn;
use crate::progress::{Progress, Refused};
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
    // Backfilled rows have no position of their own: the slot starts after
    // the snapshot. Failures stop the backfill under either policy.
    let progress = Progress::start(publisher.ledger(), Lsn::ZERO, cfg.max_in_flight, false);
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
                while !progress.has_room() {
                    check_refusals(&progress)?;
                    progress.changed().await;
                }
                check_refusals(&progress)?;
                publisher.send(&event, progress.ticket(None)?).await?;
                published += 1;
            }
        }
        sql.query("CLOSE outbox_backfill").await?;
    }
    sql.query("COMMIT").await?;
    while !progress.all_settled() {
        check_refusals(&progress)?;
        progress.changed().await;
    }
    check_refusals(&progress)?;
    Ok(published)
}

/// The first record Kafka refused, as the error that stops the backfill.
fn check_refusals(progress: &Progress) -> Result<()> {
    match progress.take_refused() {
        None => Ok(()),
        Some(Refused::Fatal(err)) => Err(err),
        Some(Refused::DeadLetter { letter, .. }) => Err(Error::Protocol(format!(
            "event {} was refused during the backfill: {}",
            letter.event_id, letter.reason
        ))),
    }
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
