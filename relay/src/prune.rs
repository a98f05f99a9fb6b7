//! `outbox-relay prune`: keeps the outbox and inbox tables small by
//! deleting old rows in small batches, each its own short transaction that
//! skips rows someone else holds, so it never takes a long lock.
//!
//! Deleting outbox rows does not affect delivery: the relay reads inserts
//! from the WAL, which keeps the row as it was inserted, and the outbox
//! publication does not publish deletes. Only a first backfill reads the
//! table, so the outbox is pruned only once a slot finished one, and every
//! batch re-checks that no backfill has started since (a relay records its
//! slot before creating it, so a batch either sees that row or commits
//! before the backfill's snapshot). What pruning gives up: after a lost
//! slot, a new one republishes only what is left in the table.

use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::postgres::config::PgConfig;
use crate::postgres::connection::{Connection, Mode, quote_ident, quote_literal};
use crate::{Error, Result};

/// What to prune.
#[derive(Debug, Clone)]
pub struct PruneConfig {
    /// The database.
    pub pg: PgConfig,
    /// The schema of the outbox, inbox and relay bookkeeping tables.
    pub schema: String,
    /// Delete outbox rows created longer ago than this.
    pub outbox_older_than: Option<Duration>,
    /// Delete inbox rows received longer ago than this.
    pub inbox_older_than: Option<Duration>,
    /// Rows per delete.
    pub batch_size: u32,
}

/// Rows deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// From the outbox.
    pub outbox: u64,
    /// From the inbox.
    pub inbox: u64,
}

/// Deletes what `cfg` asks for, batch by batch.
pub async fn run(cfg: &PruneConfig) -> Result<Pruned> {
    let mut conn = Connection::connect(&cfg.pg, Mode::Sql).await?;
    conn.security().log();
    // A batch that waits on a row lock gives up quickly and is retried:
    // a prune must never queue writers behind it.
    conn.query("SET lock_timeout = '2s'").await?;
    let schema = quote_ident(&cfg.schema);
    let mut pruned = Pruned::default();
    if let Some(age) = cfg.outbox_older_than {
        // One read of the bookkeeping: slots whose first backfill finished,
        // and those whose has not.
        let (finished, pending): (Vec<_>, Vec<_>) = conn
            .query(&format!(
                "SELECT slot_name, (backfilled_at IS NOT NULL)::text AS done \
                 FROM {schema}.outbox_relay_slot"
            ))
            .await?
            .iter()
            .filter_map(|r| {
                Some((
                    r.get("slot_name")?.to_owned(),
                    r.get("done") == Some("true"),
                ))
            })
            .partition(|(_, done)| *done);
        let pending: Vec<String> = pending.into_iter().map(|(slot, _)| slot).collect();
        if finished.is_empty() {
            return Err(Error::Config(format!(
                "no relay has finished its first start on this database ({}.outbox_relay_slot has \
                 no slot with a completed backfill): the rows in the outbox may not have been \
                 published yet; start the relay first",
                cfg.schema
            )));
        }
        if !pending.is_empty() {
            return Err(Error::Config(format!(
                "slot(s) {} have not finished their first backfill, which reads the outbox table; \
                 pruning now could drop rows they have not published. Let the relay finish \
                 (`backfill complete` in its log), or remove the row from {}.outbox_relay_slot \
                 if that slot is gone",
                pending.join(", "),
                cfg.schema
            )));
        }
        // Re-checked by every batch: a backfill that starts while the prune
        // runs stops it from deleting anything more.
        let guard = format!(
            "NOT EXISTS (SELECT 1 FROM {schema}.outbox_relay_slot WHERE backfilled_at IS NULL)"
        );
        pruned.outbox = prune_table(
            &mut conn,
            &format!("{schema}.outbox"),
            "created_at",
            "id",
            Some(&guard),
            age,
            cfg.batch_size,
        )
        .await?;
    }
    if let Some(age) = cfg.inbox_older_than {
        pruned.inbox = prune_table(
            &mut conn,
            &format!("{schema}.inbox"),
            "received_at",
            "consumer, event_id",
            None,
            age,
            cfg.batch_size,
        )
        .await?;
    }
    conn.terminate().await;
    Ok(pruned)
}

/// The pruner built into `run` (`--prune-older-than`): [`run`] every
/// `every` until `token` is cancelled. A failed round is logged and the
/// next one tried (a refusal before the first backfill finished included):
/// pruning is housekeeping and never stops delivery.
pub async fn every(cfg: PruneConfig, every: Duration, token: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let round = async {
            tokio::select! {
                biased;
                _ = token.cancelled() => None,
                pruned = run(&cfg) => Some(pruned),
            }
        };
        match round.instrument(tracing::info_span!("prune")).await {
            None => return,
            Some(Ok(pruned)) => tracing::debug!(
                outbox = pruned.outbox,
                inbox = pruned.inbox,
                "prune round done"
            ),
            Some(Err(err)) => {
                tracing::warn!(error = %err, retry_in = ?every, "prune round failed; trying again later")
            }
        }
    }
}

/// Deletes rows of `table` whose `time_column` is older than `age` (as of
/// the start: the cutoff does not move while it runs), `batch` at a time.
async fn prune_table(
    conn: &mut Connection,
    table: &str,
    time_column: &str,
    key: &str,
    guard: Option<&str>,
    age: Duration,
    batch: u32,
) -> Result<u64> {
    let cutoff = conn
        .query(&format!(
            "SELECT (pg_catalog.now() - pg_catalog.make_interval(secs => {}))::text AS cutoff",
            age.as_secs_f64()
        ))
        .await?
        .first()
        .and_then(|r| r.get("cutoff").map(str::to_owned))
        .ok_or_else(|| Error::Protocol("no cutoff time".into()))?;
    // Rows another transaction holds are skipped (a later run takes them),
    // so writers never wait for the prune. No ORDER BY: without an index on
    // the time column it would sort the whole table for every batch; a
    // sequential scan finds old rows first in an append-mostly table.
    let guard = guard.map(|g| format!(" AND {g}")).unwrap_or_default();
    let sql = format!(
        "WITH doomed AS (SELECT {key} FROM {table} WHERE {time_column} < {}::timestamptz{guard} \
         LIMIT {batch} FOR UPDATE SKIP LOCKED), \
         gone AS (DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM doomed) RETURNING 1) \
         SELECT pg_catalog.count(*)::text AS n FROM gone",
        quote_literal(&cutoff)
    );
    let started = Instant::now();
    let (mut total, mut batches, mut retries) = (0u64, 0u64, 0u32);
    loop {
        let deleted = conn.query(&sql).await.and_then(|rows| {
            rows.first()
                .and_then(|r| r.get("n"))
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| Error::Protocol(format!("no row count from a delete of {table}")))
        });
        match deleted {
            Ok(0) => break,
            Ok(n) => {
                total += n;
                batches += 1;
                retries = 0;
                tracing::debug!(table = %table, deleted = n, "batch deleted");
            }
            // A lock wait over lock_timeout (55P03, e.g. behind DDL), or a
            // retryable error: back off and go on.
            Err(err) if (lock_timeout(&err) || err.is_retryable()) && retries < 5 => {
                retries += 1;
                tracing::warn!(table = %table, error = %err, "batch not deleted; retrying");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(retries))).await;
            }
            Err(err) => return Err(err),
        }
    }
    tracing::info!(
        table = %table,
        older_than = %cutoff,
        deleted = total,
        batches,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "pruned"
    );
    Ok(total)
}

fn lock_timeout(err: &Error) -> bool {
    matches!(err, Error::Server { source, .. } if source.code == "55P03")
}
