//! The replication slot: start-up checks (wal_level, publication, slot
//! health), creating the slot with an exported snapshot and a backfill of the
//! rows already in the outbox, and the bookkeeping that makes that backfill
//! crash-safe (table `outbox_relay_slot`).
//!
//! The relay never drops a slot. Until the backfill is recorded as complete
//! nothing is streamed, so the slot's confirmed position stays at its
//! consistent point and keeps every transaction committed since; a failed or
//! stopped backfill is retried (see `backfill`) and the stream then starts
//! from that point.

use tokio_util::sync::CancellationToken;

use crate::pipeline::backfill;
use crate::pipeline::config::RelayConfig;
use crate::pipeline::publish::Publisher;
use crate::postgres::connection::{Connection, Mode, quote_ident, quote_literal};
use crate::postgres::lsn::Lsn;
use crate::{Error, Result};

/// Checks that the server can do logical decoding.
pub async fn check_wal_level(conn: &mut Connection) -> Result<()> {
    let rows = conn.query("SHOW wal_level").await?;
    let level = rows
        .first()
        .and_then(|r| r.get("wal_level"))
        .unwrap_or_default()
        .to_owned();
    if level != "logical" {
        return Err(Error::WalLevel { actual: level });
    }
    Ok(())
}

/// Checks that the publication exists in the connected database.
pub async fn check_publication(
    conn: &mut Connection,
    publication: &str,
    database: &str,
) -> Result<()> {
    let rows = conn
        .query(&format!(
            "SELECT 1 AS found FROM pg_publication WHERE pubname = {}",
            quote_literal(publication)
        ))
        .await?;
    if rows.is_empty() {
        return Err(Error::PublicationMissing {
            name: publication.to_owned(),
            database: database.to_owned(),
        });
    }
    Ok(())
}

/// Makes the slot ready to stream and returns the position to start from:
/// the existing slot's confirmed position, or a new slot's consistent point
/// after the backfill.
pub async fn prepare(
    conn: &mut Connection,
    cfg: &RelayConfig,
    publisher: &mut Publisher,
    token: &CancellationToken,
) -> Result<Option<Lsn>> {
    let slot = &cfg.slot;
    let bookkeeping = bookkeeping(conn, slot, &cfg.slot_table()).await?;
    let failover_capable = server_version(conn).await? >= FAILOVER_SINCE;
    let existing = conn
        .query(&format!(
            "SELECT plugin, slot_type, database, confirmed_flush_lsn::text AS confirmed_flush_lsn, \
             wal_status{} FROM pg_replication_slots WHERE slot_name = {}",
            if failover_capable {
                ", failover::text AS failover"
            } else {
                ""
            },
            quote_literal(slot)
        ))
        .await?;

    if let Some(row) = existing.first() {
        let unusable = |reason: String| Error::SlotUnusable {
            slot: slot.clone(),
            reason,
        };
        if row.get("slot_type") != Some("logical") || row.get("plugin") != Some("pgoutput") {
            return Err(unusable(format!(
                "it is a {} slot with plugin {}, but the relay needs a logical slot with pgoutput; \
                 choose another --slot",
                row.get("slot_type").unwrap_or("?"),
                row.get("plugin").unwrap_or("none")
            )));
        }
        if row.get("database") != Some(cfg.pg.dbname.as_str()) {
            return Err(unusable(format!(
                "it belongs to database `{}`, not `{}`; choose another --slot",
                row.get("database").unwrap_or("?"),
                cfg.pg.dbname
            )));
        }
        if row.get("wal_status") == Some("lost") {
            return Err(unusable(
                "PostgreSQL invalidated it because it fell behind by more than max_slot_wal_keep_size, so \
                 WAL it needed is gone and events may have been missed. Drop it (SELECT \
                 pg_drop_replication_slot('<slot>')), delete its row from outbox_relay_slot, and restart: the \
                 relay then creates a new slot and publishes every row still in the outbox table"
                    .replace("<slot>", slot),
            ));
        }
        let lsn = row
            .get("confirmed_flush_lsn")
            .and_then(|s| s.parse::<Lsn>().ok());
        let failover = row.get("failover").map(|f| f == "true");
        if failover_capable && failover != Some(cfg.slot_failover) {
            // The slot is not in use here (this instance holds the slot lock
            // and streams only after this), which ALTER_REPLICATION_SLOT needs.
            conn.query(&format!(
                "ALTER_REPLICATION_SLOT {} (FAILOVER {})",
                quote_ident(slot),
                cfg.slot_failover
            ))
            .await?;
            tracing::info!(slot = %slot, failover = cfg.slot_failover, "changed the slot's synchronization to standbys (--slot-failover)");
            if cfg.slot_failover {
                check_standby_slots(conn).await?;
            }
        }
        if let Some(Bookkeeping {
            backfilled: false,
            done,
            first_seen,
        }) = bookkeeping
        {
            // A previous start created the slot but its backfill did not
            // complete. The slot has kept every change since its consistent
            // point (nothing was confirmed), so only the rows that were
            // already in the table are missing: read them again, under a
            // fresh snapshot, after what was acknowledged.
            tracing::warn!(
                slot = %slot,
                consistent_point = %lsn.unwrap_or_default(),
                "the slot's backfill did not complete; continuing it under a fresh snapshot \
                 (events already in Kafka may be sent again)"
            );
            let sql = Connection::connect(&cfg.pg, Mode::Sql).await?;
            let book = Connection::connect(&cfg.pg, Mode::Sql).await?;
            let snapshot = backfill::Snapshot::Retry(first_seen);
            backfill_and_mark(sql, book, cfg, snapshot, done, publisher, token).await?;
        } else {
            tracing::info!(slot = %slot, confirmed_flush_lsn = %lsn.unwrap_or_default(), "resuming from existing slot");
        }
        return Ok(lsn);
    } else if let Some(Bookkeeping {
        backfilled: true, ..
    }) = bookkeeping
    {
        return Err(Error::SlotUnusable {
            slot: slot.clone(),
            reason: format!(
                "the relay created it before, but it no longer exists (dropped, or lost in a failover), so \
                 events committed since it disappeared may not have been relayed. To start over, run \
                 `DELETE FROM outbox_relay_slot WHERE slot_name = '{slot}'` and restart: the relay creates \
                 the slot again and publishes every row still in the outbox table"
            ),
        });
    }

    create_with_backfill(conn, cfg, failover_capable, publisher, token)
        .await
        .map(Some)
}

struct Bookkeeping {
    backfilled: bool,
    /// Progress of an incomplete backfill.
    done: backfill::Done,
    /// What the first attempt's snapshot saw.
    first_seen: Option<backfill::FirstSeen>,
}

async fn bookkeeping(
    conn: &mut Connection,
    slot: &str,
    table: &str,
) -> Result<Option<Bookkeeping>> {
    let rows = conn
        .query(&format!(
            "SELECT (backfilled_at IS NOT NULL)::text AS backfilled, backfill_progress::text AS progress, \
             backfill_snapshot, backfill_max_seq::text AS max_seq FROM {table} WHERE slot_name = {}",
            quote_literal(slot)
        ))
        .await
        .map_err(|e| match e {
            Error::Server { source, .. } if source.code == "42P01" || source.code == "42703" => {
                Error::Config(format!(
                    "the relay's bookkeeping table {table} is missing or out of date; apply \
                     the migrations with `outbox-relay migrate`, or pass --schema (OUTBOX_SCHEMA) \
                     naming the schema they created it in"
                ))
            }
            other => other,
        })?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let done = match row.get("progress") {
        None => backfill::Done::new(),
        Some(text) => serde_json::from_str(text).map_err(|e| {
            Error::Config(format!(
                "outbox_relay_slot.backfill_progress of slot `{slot}` is not a JSON object of \
                 table names to numbers ({e}); set it to '{{}}' to backfill from the start"
            ))
        })?,
    };
    Ok(Some(Bookkeeping {
        backfilled: row.get("backfilled") == Some("true"),
        done,
        first_seen: match (row.get("backfill_snapshot"), row.get("max_seq")) {
            (Some(snapshot), Some(max_seq)) => Some(backfill::FirstSeen {
                snapshot: snapshot.to_owned(),
                max_seq: serde_json::from_str(max_seq).map_err(|e| {
                    Error::Config(format!(
                        "outbox_relay_slot.backfill_max_seq of slot `{slot}` is not a JSON object of \
                         table names to numbers ({e})"
                    ))
                })?,
            }),
            _ => None,
        },
    }))
}

/// The first PostgreSQL version (as `server_version_num`) with failover
/// slots (`FAILOVER`, `pg_replication_slots.failover`).
const FAILOVER_SINCE: u32 = 170_000;

/// The server's `server_version_num` (e.g. 170004).
async fn server_version(conn: &mut Connection) -> Result<u32> {
    let rows = conn.query("SHOW server_version_num").await?;
    rows.first()
        .and_then(|r| r.get("server_version_num"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::Protocol("SHOW server_version_num returned no number".into()))
}

/// A failover slot is safe only when the primary holds back logical
/// decoding until the standbys that will take over have the WAL: without
/// `synchronized_standby_slots`, the relay can publish a transaction that a
/// failover then loses (it never reached the standby). Warned, not refused:
/// a primary without standbys needs no setting.
async fn check_standby_slots(conn: &mut Connection) -> Result<()> {
    let rows = conn.query("SHOW synchronized_standby_slots").await?;
    let value = rows
        .first()
        .and_then(|r| r.get("synchronized_standby_slots"))
        .unwrap_or("");
    if value.trim().is_empty() {
        tracing::warn!(
            "the slot is synchronized to standbys (--slot-failover), but the primary's \
             synchronized_standby_slots is empty: after a failover Kafka may hold events of \
             transactions the new primary never received. List the standbys' physical \
             slots there (docs/operations.md), or ignore this if no standby will be promoted"
        );
    }
    Ok(())
}

async fn create_with_backfill(
    conn: &mut Connection,
    cfg: &RelayConfig,
    failover_capable: bool,
    publisher: &mut Publisher,
    token: &CancellationToken,
) -> Result<Lsn> {
    let slot = &cfg.slot;
    if token.is_cancelled() {
        // A stop, or the lock lost since it was checked: nothing is written.
        return Err(backfill::interrupted());
    }
    let mut sql = Connection::connect(&cfg.pg, Mode::Sql).await?;
    // The backfill's second connection (it records progress) is opened
    // before the slot exists too: from the slot's creation until the
    // backfill records what the slot's snapshot saw, a failure leaves a
    // retry without that record (see `backfill::Snapshot::Retry`), so that
    // stretch runs only queries on connections already open.
    let book = Connection::connect(&cfg.pg, Mode::Sql).await?;
    // Recorded before the slot exists, so a slot of ours always has its
    // bookkeeping row: if we stop anywhere from here until the backfill is
    // marked done, the next start continues the backfill (or creates the
    // slot, if it was not created). A new slot starts its backfill from the
    // beginning: progress recorded against an earlier slot does not apply.
    sql.query(&format!(
        "INSERT INTO {} (slot_name, publication_name) VALUES ({}, {}) \
         ON CONFLICT (slot_name) DO UPDATE SET publication_name = EXCLUDED.publication_name, \
         created_at = pg_catalog.now(), backfilled_at = NULL, backfill_progress = '{{}}', \
         backfill_snapshot = NULL, backfill_max_seq = NULL",
        cfg.slot_table(),
        quote_literal(slot),
        quote_literal(&cfg.publication)
    ))
    .await?;

    // The option list (PostgreSQL 15+) is needed for FAILOVER (17+); before
    // 17 the older EXPORT_SNAPSHOT keyword, which every version accepts.
    // The snapshot stays valid only until this connection runs its next
    // command, so anything else asked of the server comes before, and the
    // backfill right after.
    if failover_capable && cfg.slot_failover {
        check_standby_slots(conn).await?;
    } else if cfg.slot_failover {
        tracing::info!(
            slot = %slot,
            "PostgreSQL before 17 cannot synchronize slots to standbys: after a failover the slot is \
             gone and the relay stops; docs/operations.md says how to recover"
        );
    }
    let create = if failover_capable {
        format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export', FAILOVER {})",
            quote_ident(slot),
            cfg.slot_failover
        )
    } else {
        format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(slot)
        )
    };
    let rows = conn.query(&create).await?;
    let row = rows
        .first()
        .ok_or_else(|| Error::Protocol("CREATE_REPLICATION_SLOT returned no row".into()))?;
    let consistent_point: Lsn = row
        .get("consistent_point")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            Error::Protocol("CREATE_REPLICATION_SLOT returned no consistent_point".into())
        })?;
    let snapshot = row
        .get("snapshot_name")
        .ok_or_else(|| Error::Protocol("CREATE_REPLICATION_SLOT returned no snapshot_name".into()))?
        .to_owned();
    tracing::info!(slot = %slot, consistent_point = %consistent_point, "created replication slot");

    let snapshot = backfill::Snapshot::Exported(&snapshot);
    backfill_and_mark(
        sql,
        book,
        cfg,
        snapshot,
        backfill::Done::new(),
        publisher,
        token,
    )
    .await?;
    Ok(consistent_point)
}

/// Runs the backfill on `sql` and, once Kafka acknowledged every row, marks
/// it complete so the slot may stream.
async fn backfill_and_mark(
    mut sql: Connection,
    book: Connection,
    cfg: &RelayConfig,
    snapshot: backfill::Snapshot<'_>,
    done: backfill::Done,
    publisher: &mut Publisher,
    token: &CancellationToken,
) -> Result<()> {
    let published = backfill::run(&mut sql, book, cfg, snapshot, done, publisher, token).await?;
    sql.query(&format!(
        "UPDATE {} SET backfilled_at = pg_catalog.now() WHERE slot_name = {}",
        cfg.slot_table(),
        quote_literal(&cfg.slot)
    ))
    .await?;
    sql.terminate().await;
    tracing::info!(slot = %cfg.slot, events = published, "backfill complete");
    Ok(())
}
