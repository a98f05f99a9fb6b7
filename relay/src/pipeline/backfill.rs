//! The backfill: rows already in the outbox when the relay created its slot
//! are read from the table and published, in insertion order (`seq`), before
//! the stream starts at the slot's consistent point.
//!
//! The first attempt reads under the snapshot the slot exported, so it ends
//! exactly where the stream begins, and records what that snapshot saw: the
//! transactions in progress (`txid_current_snapshot()`) and, per table, the
//! highest `seq`. A retried attempt (the first one failed or was stopped)
//! cannot import the snapshot any more: it reads under a fresh one but
//! publishes only rows up to that `seq` that those transactions did not
//! insert. Every such row was committed before the slot's consistent point
//! (a transaction that started later got a higher `seq`); rows committed
//! after it are left to the stream, which sends them in commit order. The
//! retry continues after the last row Kafka acknowledged together with every
//! row before it, recorded per table in `outbox_relay_slot.backfill_progress`.

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::pipeline::config::RelayConfig;
use crate::pipeline::event::{Layout, OutboxEvent};
use crate::pipeline::progress::{Progress, StallWatch, Ticket};
use crate::pipeline::publish::Publisher;
use crate::pipeline::route;
use crate::postgres::connection::{Connection, Row, quote_ident, quote_literal};
use crate::postgres::lsn::Lsn;
use crate::{Error, Result};

const FETCH_SIZE: usize = 1000;

/// How far earlier attempts got: per table (`schema.table`), the highest
/// `seq` acknowledged together with every row before it.
pub type Done = HashMap<String, i64>;

/// Publishes every row of every table in the publication (after what `done`
/// says was acknowledged already), as of the slot's exported snapshot or,
/// on a retry, of what that snapshot saw. Waits until Kafka acknowledged
/// all of them and records progress as it goes. Returns how many rows it
/// published.
pub async fn run(
    sql: &mut Connection,
    mut book: Connection,
    cfg: &RelayConfig,
    snapshot: Snapshot<'_>,
    done: Done,
    publisher: &mut Publisher,
    token: &CancellationToken,
) -> Result<u64> {
    let metrics = publisher.ledger().metrics();
    metrics.set_state(crate::metrics::RelayState::Backfilling);
    sql.query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    if let Snapshot::Exported(name) = snapshot {
        sql.query(&format!("SET TRANSACTION SNAPSHOT {}", quote_literal(name)))
            .await?;
    }
    // Progress is recorded on `book`, a connection of its own (opened by
    // the caller before the slot was created): this one is in a read-only
    // transaction, and with an exported snapshot no other command may run
    // on the replication connection before the snapshot is imported.
    let column = |name: &str| {
        format!(
            "EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid = \
             pg_catalog.format('%I.%I', schemaname, tablename)::pg_catalog.regclass \
             AND a.attname = '{name}' AND NOT a.attisdropped)::text AS has_{name}"
        )
    };
    let rows = sql
        .query(&format!(
            "SELECT schemaname, tablename, {}, {}, (SELECT a.atttypid::text FROM pg_catalog.pg_attribute a \
             WHERE a.attrelid = pg_catalog.format('%I.%I', schemaname, tablename)::pg_catalog.regclass \
             AND a.attname = 'payload' AND NOT a.attisdropped) AS payload_type, \
             (SELECT a.atttypid::text FROM pg_catalog.pg_attribute a \
             WHERE a.attrelid = pg_catalog.format('%I.%I', schemaname, tablename)::pg_catalog.regclass \
             AND a.attname = 'aggregateid' AND NOT a.attisdropped) AS key_type \
             FROM pg_catalog.pg_publication_tables WHERE pubname = {} ORDER BY schemaname, tablename",
            column("seq"),
            column("created_at"),
            quote_literal(&cfg.publication)
        ))
        .await?;
    let tables: Vec<Table> = rows
        .iter()
        .map(|t| Table {
            schema: t.get("schemaname").unwrap_or_default().to_owned(),
            name: t.get("tablename").unwrap_or_default().to_owned(),
            has_seq: t.get("has_seq") == Some("true"),
            has_created_at: t.get("has_created_at") == Some("true"),
            payload_type: t.get("payload_type").and_then(|o| o.parse().ok()),
            key_type: t.get("key_type").and_then(|o| o.parse().ok()),
        })
        .collect();
    let first_seen = match snapshot {
        Snapshot::Exported(_) => {
            let seen = FirstSeen::read(sql, &tables).await?;
            // Recorded before anything is published, so a retry always has it.
            book.query(&format!(
                "UPDATE {} SET backfill_snapshot = {}, backfill_max_seq = {}::jsonb \
                 WHERE slot_name = {}",
                cfg.slot_table(),
                quote_literal(&seen.snapshot),
                quote_literal(&serde_json::to_string(&seen.max_seq).unwrap_or_default()),
                quote_literal(&cfg.slot)
            ))
            .await?;
            for (table, seq) in &seen.max_seq {
                metrics.backfill_target_seq(table, *seq);
            }
            None
        }
        Snapshot::Retry(Some(seen)) => {
            for (table, seq) in &seen.max_seq {
                metrics.backfill_target_seq(table, *seq);
            }
            Some(seen)
        }
        Snapshot::Retry(None) => {
            tracing::warn!(
                slot = %cfg.slot,
                "what the first backfill attempt saw was not recorded (a relay before this version \
                 started it, or the attempt stopped in the moment between creating the slot and \
                 recording its snapshot): rows committed since the slot was created are published by \
                 the backfill and again by the stream, and an aggregate written meanwhile with rows \
                 that were not kept (keep_rows(false), tableless messages) may see a newer kept row \
                 before them"
            );
            None
        }
    };
    let stall = StallWatch::new(cfg.stall_warning, metrics.clone());
    let mut run = Backfill {
        metrics,
        sql,
        book,
        cfg,
        publisher,
        token,
        done,
        first_seen,
        stall,
        published: 0,
    };
    for table in &tables {
        run.table(table).await?;
    }
    run.sql.query("COMMIT").await?;
    run.book.terminate().await;
    Ok(run.published)
}

/// Which snapshot the backfill reads under.
#[derive(Debug, Clone)]
pub enum Snapshot<'a> {
    /// The first attempt: the snapshot the slot exported, by name.
    Exported(&'a str),
    /// A retry: a fresh snapshot, filtered to what the first attempt saw
    /// (when that was recorded).
    Retry(Option<FirstSeen>),
}

/// What the first attempt's snapshot (the slot's) saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstSeen {
    /// Its `txid_current_snapshot()`: `xmin:xmax:in-progress,...`.
    pub snapshot: String,
    /// Per table with `seq`, the highest `seq` it saw (0: none).
    pub max_seq: Done,
}

impl FirstSeen {
    async fn read(sql: &mut Connection, tables: &[Table]) -> Result<Self> {
        let rows = sql
            .query("SELECT pg_catalog.txid_current_snapshot()::text AS snapshot")
            .await?;
        let snapshot = rows
            .first()
            .and_then(|r| r.get("snapshot"))
            .ok_or_else(|| Error::Protocol("txid_current_snapshot() returned nothing".into()))?
            .to_owned();
        let mut max_seq = Done::new();
        for t in tables.iter().filter(|t| t.has_seq) {
            let rows = sql
                .query(&format!(
                    "SELECT coalesce(pg_catalog.max(seq), 0)::text AS seq FROM {}",
                    t.quoted()
                ))
                .await?;
            let seq = rows
                .first()
                .and_then(|r| r.get("seq"))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            max_seq.insert(t.key(), seq);
        }
        Ok(Self { snapshot, max_seq })
    }

    /// A condition keeping, of a table's rows now, those the first snapshot
    /// saw: up to the highest `seq` it saw (a transaction that started after
    /// it got a higher one), and not inserted by a transaction it saw in
    /// progress (those committed after the slot's consistent point, so the
    /// stream sends them). `xmin` is compared in its 32-bit form; a row
    /// updated since has a new `xmin` and is kept.
    fn filter(&self, table: &Table) -> Option<String> {
        let max = self.max_seq.get(&table.key())?;
        let in_progress: Vec<String> = self
            .snapshot
            .rsplit(':')
            .next()
            .unwrap_or_default()
            .split(',')
            .filter_map(|x| x.trim().parse::<u64>().ok())
            .map(|x| (x & 0xffff_ffff).to_string())
            .collect();
        Some(if in_progress.is_empty() {
            format!("seq <= {max}")
        } else {
            format!(
                "seq <= {max} AND xmin::text::bigint NOT IN ({})",
                in_progress.join(", ")
            )
        })
    }
}

struct Table {
    schema: String,
    name: String,
    has_seq: bool,
    has_created_at: bool,
    /// The `payload` column's type oid (read as the Debezium layout needs).
    payload_type: Option<u32>,
    /// The `aggregateid` column's type oid (the same).
    key_type: Option<u32>,
}

impl Table {
    fn key(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

struct Backfill<'a> {
    sql: &'a mut Connection,
    book: Connection,
    cfg: &'a RelayConfig,
    publisher: &'a mut Publisher,
    token: &'a CancellationToken,
    done: Done,
    /// On a retry: what the first attempt's snapshot saw.
    first_seen: Option<FirstSeen>,
    stall: StallWatch,
    published: u64,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// Why the backfill stopped handing rows to the producer early.
pub(crate) fn interrupted() -> Error {
    Error::Io {
        context: "backfill".into(),
        source: std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "stopped before it completed; the next start continues it",
        ),
    }
}

impl Backfill<'_> {
    async fn table(&mut self, table: &Table) -> Result<()> {
        let key = table.key();
        let after = self.done.get(&key).copied();
        let quoted = format!(
            "{}.{}",
            quote_ident(&table.schema),
            quote_ident(&table.name)
        );
        let mut filters = Vec::new();
        if let Some(seen) = &self.first_seen {
            match seen.filter(table) {
                Some(filter) => filters.push(filter),
                None => tracing::warn!(
                    table = %key,
                    "the first backfill attempt did not record this table's `seq`: all its rows are \
                     published again, including those the stream also sends"
                ),
            }
        }
        let order = if table.has_seq {
            if let Some(seq) = after {
                filters.push(format!("seq > {seq}"));
            }
            "seq"
        } else {
            tracing::warn!(
                table = %key,
                "the table has no `seq` column, so the backfill cannot tell the order its rows were \
                 inserted in (nor resume); it uses created_at, id. Apply the migrations \
                 (`outbox-relay migrate`) or add `seq bigint GENERATED ALWAYS AS IDENTITY`"
            );
            if table.has_created_at {
                "created_at, id"
            } else {
                "id"
            }
        };
        let filter = if filters.is_empty() {
            String::new()
        } else {
            format!("WHERE {} ", filters.join(" AND "))
        };
        let query = format!("SELECT * FROM {quoted} {filter}ORDER BY {order}");
        if let Some(seq) = after {
            tracing::info!(table = %key, after_seq = seq, "continuing an interrupted backfill");
            self.metrics.backfill_seq(&key, seq);
        }
        self.sql
            .query(&format!(
                "DECLARE outbox_backfill NO SCROLL CURSOR FOR {query}"
            ))
            .await?;
        // Positions here are `seq` values: a position is confirmable once
        // every row up to it is acknowledged, exactly what may be recorded.
        let mut progress = Progress::start(
            self.publisher.ledger(),
            Lsn(after.unwrap_or(0).max(0) as u64),
            self.cfg.max_in_flight,
            self.cfg.max_in_flight_bytes,
        );
        let outcome = self.rows(table, &mut progress).await;
        // Whatever happened, record how far Kafka acknowledged.
        let outcome = match outcome {
            Ok(()) => self.settle(&progress).await,
            Err(err) if is_interruption(&err) => match self.settle(&progress).await {
                Ok(()) => Err(err),
                Err(unacked) => Err(unacked),
            },
            // Stopping on an error: give what was handed over a bounded
            // chance to be acknowledged, so the retry need not resend it.
            Err(err) => {
                let timeout = self.publisher.grace().left();
                let _ = tokio::time::timeout(timeout, self.settle(&progress)).await;
                Err(err)
            }
        };
        if table.has_seq {
            let reached = progress.confirmable().0 as i64;
            if after.is_none_or(|a| reached > a)
                && reached > 0
                && let Err(err) = self.record(&key, reached).await
            {
                tracing::warn!(error = %err, table = %key, "cannot record the backfill's progress");
            }
        }
        outcome?;
        self.sql.query("CLOSE outbox_backfill").await?;
        Ok(())
    }

    async fn rows(&mut self, table: &Table, progress: &mut Progress) -> Result<()> {
        let key = table.key();
        let mut recorded = 0i64;
        loop {
            if self.token.is_cancelled() {
                return Err(interrupted());
            }
            let rows = self
                .sql
                .query(&format!("FETCH {FETCH_SIZE} FROM outbox_backfill"))
                .await?;
            let Some(first) = rows.first() else {
                return Ok(());
            };
            let columns = first.columns().to_vec();
            let layout = Layout::for_columns_as(
                &key,
                &columns,
                &self.cfg.table_layout,
                table.payload_type,
                table.key_type,
            )?;
            for row in &rows {
                self.row(&layout, row, &columns, progress).await?;
                if table.has_seq {
                    let seq: i64 =
                        row.get("seq").and_then(|s| s.parse().ok()).ok_or_else(|| {
                            Error::Protocol(format!("a row of {key} has no readable `seq`"))
                        })?;
                    progress.position(Lsn(seq.max(0) as u64));
                }
            }
            if table.has_seq {
                let reached = progress.confirmable().0 as i64;
                if reached > recorded {
                    self.record(&key, reached).await?;
                    recorded = reached;
                }
            }
        }
    }

    /// Publishes one row (or its dead letter), or sends it on its own when
    /// Kafka refused it in a batch before.
    async fn row(
        &mut self,
        layout: &Layout,
        row: &Row,
        columns: &[String],
        progress: &mut Progress,
    ) -> Result<()> {
        let event = layout.event_from_row(row, columns);
        let alone = matches!(&event, Ok(e) if self.publisher.is_suspect(&e.id));
        if alone {
            // Nothing else in flight, so the report is about this event.
            self.wait(progress, None, |p| p.all_settled()).await?;
        } else {
            self.wait(progress, None, |p| p.has_room()).await?;
        }
        let ticket = progress.ticket(None)?;
        let id = event.as_ref().map(|e: &OutboxEvent| e.id.clone()).ok();
        // Rows read from the table have no transaction: a span per traced
        // row, so a trace started before the relay's first start goes on.
        let trace = match &event {
            Ok(e) => self.cfg.traces.transaction().map(|mut t| {
                t.observe(e.traceparent(), e.tracestate());
                t
            }),
            Err(_) => None,
        };
        route::publish(
            self.publisher,
            ticket,
            self.cfg.dead_letter_topic.as_deref(),
            event,
            |err| layout.dead_letter_from_row(row, columns, err),
        )
        .await?;
        self.published += 1;
        self.metrics.backfilled_row();
        if let Some(trace) = trace {
            self.cfg.traces.finish(
                "outbox-relay backfill",
                trace,
                vec![opentelemetry::KeyValue::new(
                    "outbox.slot",
                    self.cfg.slot.clone(),
                )],
            );
        }
        if alone {
            self.wait(progress, Some(ticket), |p| p.all_settled())
                .await?;
            if let Some(id) = id {
                self.publisher.clear_suspect(&id);
                tracing::info!(event_id = %id, "the event sent on its own is settled");
            }
        }
        Ok(())
    }

    /// Waits until `ready`, acting on refusals; fails when stopped.
    async fn wait(
        &mut self,
        progress: &Progress,
        isolated: Option<Ticket>,
        ready: impl Fn(&Progress) -> bool,
    ) -> Result<()> {
        loop {
            route::act_on_refusals(
                progress,
                self.publisher,
                self.cfg.dead_letter_topic.as_deref(),
                isolated,
            )?;
            if ready(progress) {
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = self.token.cancelled() => return Err(interrupted()),
                _ = progress.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => self.stall.check(progress),
            }
        }
    }

    /// Waits until every row handed over is settled: without a bound while
    /// running (a broker outage is waited out), within what is left of the
    /// stop's budget once stopping.
    async fn settle(&mut self, progress: &Progress) -> Result<()> {
        let (timeout, budget) = (
            self.publisher.grace().left(),
            self.publisher.grace().timeout(),
        );
        let publisher = &mut *self.publisher;
        let stall = &mut self.stall;
        let dead_letter_topic = self.cfg.dead_letter_topic.as_deref();
        let wait = async {
            loop {
                route::act_on_refusals(progress, publisher, dead_letter_topic, None)?;
                if progress.all_settled() {
                    return Ok(());
                }
                tokio::select! {
                    _ = progress.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => stall.check(progress),
                }
            }
        };
        if self.token.is_cancelled() {
            match tokio::time::timeout(timeout, wait).await {
                Ok(result) => result,
                Err(_) => Err(Error::Unacknowledged {
                    outstanding: progress.outstanding().0 as usize,
                    timeout: budget,
                }),
            }
        } else {
            let token = self.token;
            tokio::select! {
                biased;
                result = wait => result,
                _ = token.cancelled() => Err(interrupted()),
            }
        }
    }

    async fn record(&mut self, key: &str, seq: i64) -> Result<()> {
        self.book
            .query(&format!(
                "UPDATE {} SET backfill_progress = backfill_progress || \
                 pg_catalog.jsonb_build_object({}, {seq}) WHERE slot_name = {}",
                self.cfg.slot_table(),
                quote_literal(key),
                quote_literal(&self.cfg.slot)
            ))
            .await?;
        self.done.insert(key.to_owned(), seq);
        self.metrics.backfill_seq(key, seq);
        Ok(())
    }
}

fn is_interruption(err: &Error) -> bool {
    matches!(err, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::Interrupted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_keeps_what_the_first_snapshot_saw() {
        let table = Table {
            schema: "public".into(),
            name: "outbox".into(),
            has_seq: true,
            has_created_at: true,
            payload_type: None,
            key_type: None,
        };
        let seen = FirstSeen {
            // Epoch 1: the in-progress ids are compared in their 32-bit form.
            snapshot: "4294967396:4294967401:4294967397,4294967399".into(),
            max_seq: Done::from([("public.outbox".to_owned(), 42)]),
        };
        assert_eq!(
            seen.filter(&table).unwrap(),
            "seq <= 42 AND xmin::text::bigint NOT IN (101, 103)"
        );
        let none_running = FirstSeen {
            snapshot: "100:100:".into(),
            max_seq: Done::from([("public.outbox".to_owned(), 0)]),
        };
        assert_eq!(none_running.filter(&table).unwrap(), "seq <= 0");
        let other = Table {
            name: "other".into(),
            ..table
        };
        assert_eq!(seen.filter(&other), None, "a table it did not record");
    }
}
