//! `outbox-relay status`: how a slot and its relay are doing, from the
//! database alone (the relay need not be reachable): the slot (active, by
//! which backend and host, confirmed position), lag in bytes and in time,
//! WAL the slot retains against `max_slot_wal_keep_size`, the backfill,
//! the outbox and inbox tables, and the last event the relay recorded as
//! delivered. A verdict, healthy / degraded / broken, is also the exit
//! code (0 / 1 / 2), for cron jobs and probes.

use serde_json::{Value, json};

use crate::postgres::config::PgConfig;
use crate::postgres::connection::{Connection, Mode, Row, quote_ident, quote_literal};
use crate::{Error, Result};

/// What to look at.
#[derive(Debug, Clone)]
pub struct StatusConfig {
    /// The database.
    pub pg: PgConfig,
    /// The slot.
    pub slot: String,
    /// Schema of the outbox, inbox and bookkeeping tables.
    pub schema: String,
    /// Lag (bytes of WAL not yet confirmed) above which the relay counts
    /// as degraded.
    pub max_lag_bytes: u64,
}

/// The verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    /// Streaming, caught up within the limits.
    Healthy,
    /// Working, but something needs a look (lag, WAL at risk, backfilling).
    Degraded,
    /// Events are not flowing, or the slot is gone or lost.
    Broken,
}

impl Health {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Broken => "broken",
        }
    }

    /// The exit code for it.
    pub fn exit_code(self) -> u8 {
        match self {
            Health::Healthy => 0,
            Health::Degraded => 1,
            Health::Broken => 2,
        }
    }
}

/// A status report: the verdict, why, and the facts (as JSON, which the
/// human form prints too).
#[derive(Debug, Clone)]
pub struct Status {
    /// The verdict.
    pub health: Health,
    /// Why it is not healthy, and warnings that do not change it.
    pub notes: Vec<String>,
    /// Every fact gathered.
    pub facts: Value,
}

impl Status {
    /// The report as one JSON object.
    pub fn to_json(&self) -> Value {
        let mut v = self.facts.clone();
        v["health"] = json!(self.health.as_str());
        v["notes"] = json!(self.notes);
        v
    }

    /// The report for people: one `name  value` line per fact.
    pub fn to_text(&self) -> String {
        let mut out = format!("{:<27}{}\n", "health", self.health.as_str());
        for note in &self.notes {
            out.push_str(&format!("  ! {note}\n"));
        }
        if let Value::Object(map) = &self.facts {
            for (k, v) in map {
                let shown = match v {
                    Value::Null => "-".to_owned(),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                out.push_str(&format!("{k:<27}{shown}\n"));
            }
        }
        out
    }
}

/// Gathers the report.
pub async fn run(cfg: &StatusConfig) -> Result<Status> {
    let mut conn = Connection::connect(&cfg.pg, Mode::Sql).await?;
    let status = gather(&mut conn, cfg).await;
    conn.terminate().await;
    status
}

fn one(rows: Vec<Row>, what: &str) -> Result<Row> {
    rows.into_iter()
        .next()
        .ok_or_else(|| Error::Protocol(format!("no row from the {what} query")))
}

fn text(row: &Row, col: &str) -> Value {
    row.get(col).map_or(Value::Null, |v| json!(v))
}

fn number(row: &Row, col: &str) -> Value {
    row.get(col)
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(Value::Null, |n| {
            if n.fract() == 0.0 && n.abs() < 9e15 {
                json!(n as i64)
            } else {
                json!((n * 1000.0).round() / 1000.0)
            }
        })
}

/// How long any one query of the report may take.
const STATEMENT_TIMEOUT: &str = "10s";

/// How long counting one table may take.
const TABLE_BUDGET: &str = "3s";

/// A table's row count and oldest row, if they could be had.
enum Counted {
    Rows(Row),
    /// No such table (the inbox may live in another database).
    Missing,
    /// Too big to scan within [`TABLE_BUDGET`], or locked by DDL: the
    /// planner's estimate of its rows (when the table was ever analyzed).
    Skipped {
        reason: String,
        estimate: Option<i64>,
    },
}

/// Counts `name`'s rows and finds its oldest `time`, within
/// [`TABLE_BUDGET`]. Why not fail the report: a probe is run for the slot's
/// health, which must not depend on how big the table has grown or on a
/// migration holding its lock (count(*) queues behind an ACCESS EXCLUSIVE
/// lock until `lock_timeout`).
async fn count_table(
    conn: &mut Connection,
    schema: &str,
    name: &str,
    time: &str,
) -> Result<Counted> {
    let table = format!("{}.{}", quote_ident(schema), quote_ident(name));
    conn.query(&format!("SET statement_timeout = '{TABLE_BUDGET}'"))
        .await?;
    let counted = conn
        .query(&format!(
            "SELECT pg_catalog.count(*)::text AS n, pg_catalog.min({time})::text AS oldest \
             FROM {table}"
        ))
        .await;
    conn.query(&format!("SET statement_timeout = '{STATEMENT_TIMEOUT}'"))
        .await?;
    let reason = match counted {
        Ok(rows) => return Ok(Counted::Rows(one(rows, name)?)),
        Err(Error::Server { source, .. }) if source.code == "42P01" => {
            return Ok(Counted::Missing);
        }
        // query_canceled: the statement timeout.
        Err(Error::Server { source, .. }) if source.code == "57014" => {
            format!("counting its rows took longer than {TABLE_BUDGET}")
        }
        // lock_not_available: lock_timeout, behind DDL.
        Err(Error::Server { source, .. }) if source.code == "55P03" => {
            "another session holds a lock on it (DDL such as ALTER TABLE, or LOCK TABLE)".to_owned()
        }
        Err(err) => return Err(err),
    };
    // The catalog row is readable whatever lock the table is under;
    // reltuples is -1 for a table never analyzed or vacuumed.
    let estimate = conn
        .query(&format!(
            "SELECT c.reltuples::bigint::text AS n FROM pg_catalog.pg_class c \
             WHERE c.oid = pg_catalog.to_regclass({})",
            quote_literal(&table)
        ))
        .await?
        .first()
        .and_then(|r| r.get("n"))
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n >= 0);
    let reason = match estimate {
        Some(n) => format!("{reason} (about {n} rows by the planner's statistics)"),
        None => reason,
    };
    Ok(Counted::Skipped { reason, estimate })
}

async fn gather(conn: &mut Connection, cfg: &StatusConfig) -> Result<Status> {
    // A probe must not hang behind a lock or a slow scan: it fails (exit 3).
    conn.query(&format!("SET statement_timeout = '{STATEMENT_TIMEOUT}'"))
        .await?;
    conn.query("SET lock_timeout = '2s'").await?;
    let schema = quote_ident(&cfg.schema);
    let slot = quote_literal(&cfg.slot);
    let lock_key = crate::pipeline::lock::key(&cfg.slot);
    let mut notes = Vec::new();
    let mut health = Health::Healthy;
    let mut worse = |h: Health, note: String, notes: &mut Vec<String>| {
        health = health.max(h);
        notes.push(note);
    };
    let server = one(
        conn.query(
            "SELECT pg_catalog.pg_current_wal_lsn()::text AS server_lsn, \
             pg_catalog.current_setting('max_slot_wal_keep_size') AS max_slot_wal_keep_size, \
             pg_catalog.current_setting('server_version') AS server_version, \
             pg_catalog.current_setting('server_version_num') AS server_version_num",
        )
        .await?,
        "server",
    )?;
    let keep = server
        .get("max_slot_wal_keep_size")
        .unwrap_or("-1")
        .to_owned();
    // `failover` exists from PostgreSQL 17.
    let failover_capable = server
        .get("server_version_num")
        .and_then(|v| v.parse::<u32>().ok())
        .is_some_and(|v| v >= 170_000);
    let failover_column = if failover_capable {
        "s.failover::text AS failover, "
    } else {
        ""
    };
    let rows = conn
        .query(&format!(
            "SELECT {failover_column}s.active::text AS active, s.active_pid::text AS active_pid, \
             a.client_addr::text AS client_addr, a.application_name, \
             s.confirmed_flush_lsn::text AS confirmed_lsn, \
             pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.confirmed_flush_lsn)::text AS lag_bytes, \
             pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.restart_lsn)::text AS retained_wal_bytes, \
             s.wal_status, s.safe_wal_size::text AS safe_wal_size, \
             EXTRACT(epoch FROM r.flush_lag)::text AS flush_lag_seconds, \
             (SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks l WHERE l.locktype = 'advisory' \
               AND l.granted AND l.objsubid = 1 \
               AND ((l.classid::bigint << 32) | l.objid::bigint) = {lock_key})::text AS lock_holders \
             FROM pg_catalog.pg_replication_slots s \
             LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = s.active_pid \
             LEFT JOIN pg_catalog.pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = {slot}"
        ))
        .await?;
    let slot_row = rows.into_iter().next();
    let book = conn
        .query(&format!(
            "SELECT backfilled_at::text AS backfilled_at, last_event_id, last_event_topic, \
             last_delivered_at::text AS last_delivered_at, \
             EXTRACT(epoch FROM pg_catalog.now() - last_delivered_at)::text AS last_delivery_age_seconds, \
             EXTRACT(epoch FROM pg_catalog.now() - last_event_committed_at)::text AS last_event_age_seconds \
             FROM {schema}.outbox_relay_slot WHERE slot_name = {slot}"
        ))
        .await
        .map_err(|err| match &err {
            // No such table or column: wrong schema, or migrations not applied.
            Error::Server { source, .. } if source.code == "42P01" || source.code == "42703" => {
                Error::Config(format!(
                    "cannot read {}.outbox_relay_slot ({err}); give the schema the migrations \
                     used with --schema, and apply them (outbox-relay migrate)",
                    cfg.schema
                ))
            }
            _ => err,
        })?
        .into_iter()
        .next();
    let outbox = count_table(conn, &cfg.schema, "outbox", "created_at").await?;
    if let Counted::Skipped { reason, .. } = &outbox {
        notes.push(format!(
            "the outbox was not counted: {reason}; the slot's figures above do not depend on it"
        ));
    }
    // The inbox is the consumers' table and may live elsewhere.
    let inbox = count_table(conn, &cfg.schema, "inbox", "received_at")
        .await
        .unwrap_or(Counted::Missing);
    if let Counted::Skipped { reason, .. } = &inbox {
        notes.push(format!("the inbox was not counted: {reason}"));
    }

    let mut facts = serde_json::Map::new();
    facts.insert("slot".into(), json!(cfg.slot));
    facts.insert("server_version".into(), text(&server, "server_version"));
    facts.insert("server_lsn".into(), text(&server, "server_lsn"));
    match &slot_row {
        None => {
            facts.insert("slot_exists".into(), json!(false));
            worse(
                Health::Broken,
                format!(
                    "slot `{}` does not exist: no relay has created it, or it was dropped (after a \
                     failover to a server without it, or by hand); a relay started on it creates it \
                     with a backfill of the rows in the table",
                    cfg.slot
                ),
                &mut notes,
            );
        }
        Some(s) => {
            facts.insert("slot_exists".into(), json!(true));
            let active = s.get("active") == Some("true");
            facts.insert("active".into(), json!(active));
            facts.insert("active_pid".into(), number(s, "active_pid"));
            facts.insert("client_addr".into(), text(s, "client_addr"));
            facts.insert("application_name".into(), text(s, "application_name"));
            facts.insert("confirmed_lsn".into(), text(s, "confirmed_lsn"));
            facts.insert("lag_bytes".into(), number(s, "lag_bytes"));
            facts.insert("retained_wal_bytes".into(), number(s, "retained_wal_bytes"));
            facts.insert("wal_status".into(), text(s, "wal_status"));
            facts.insert("safe_wal_size_bytes".into(), number(s, "safe_wal_size"));
            let failover = s.get("failover").map(|f| f == "true");
            facts.insert("failover".into(), json!(failover));
            if failover == Some(false) {
                notes.push(
                    "the slot is not synchronized to standbys (failover=false): a promoted standby \
                     will not have it; start the relay with --slot-failover true (docs/operations.md)"
                        .into(),
                );
            }
            // PostgreSQL's own measure of the walsender: time from a WAL
            // flush to the relay's confirmation of it (null when caught up
            // and idle, or when no relay streams).
            facts.insert("lag_seconds".into(), number(s, "flush_lag_seconds"));
            let lag = s
                .get("lag_bytes")
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            match s.get("wal_status") {
                Some("lost") => worse(
                    Health::Broken,
                    "the slot's WAL was removed (wal_status=lost): events in it are gone from the \
                     stream; recover with a new slot (see docs/operations.md)"
                        .into(),
                    &mut notes,
                ),
                Some("unreserved") => worse(
                    Health::Degraded,
                    "the slot has passed max_slot_wal_keep_size (wal_status=unreserved): its WAL \
                     will be removed at the next checkpoint unless the relay catches up"
                        .into(),
                    &mut notes,
                ),
                _ => {}
            }
            // An instance holding the slot lock is working it: starting,
            // backfilling or between sessions (a reconnect), not dead.
            let locked = s.get("lock_holders").is_some_and(|n| n != "0");
            facts.insert("lock_held".into(), json!(locked));
            if !active && locked {
                worse(
                    Health::Degraded,
                    "a relay holds the slot lock but is not streaming: starting, backfilling or \
                     reconnecting (see its log)"
                        .into(),
                    &mut notes,
                );
            } else if !active {
                worse(
                    Health::Broken,
                    "no relay works the slot (inactive, and no instance holds its lock): events \
                     are not delivered; start the relay, or look at its log"
                        .into(),
                    &mut notes,
                );
            }
            if lag > cfg.max_lag_bytes as f64 {
                worse(
                    Health::Degraded,
                    format!(
                        "{} bytes of WAL are not confirmed yet (more than --max-lag-bytes {})",
                        lag as u64, cfg.max_lag_bytes
                    ),
                    &mut notes,
                );
            }
        }
    }
    if keep == "-1" {
        notes.push(
            "max_slot_wal_keep_size is unlimited: a stopped relay makes the server keep WAL until \
             its disk is full; set a limit (see docs/operations.md)"
                .into(),
        );
    }
    facts.insert("max_slot_wal_keep_size".into(), json!(keep));
    match &book {
        None => {
            facts.insert("backfill".into(), json!("no bookkeeping row"));
        }
        Some(b) => {
            let done = b.get("backfilled_at").is_some();
            facts.insert(
                "backfill".into(),
                json!(if done { "complete" } else { "in progress" }),
            );
            facts.insert("backfilled_at".into(), text(b, "backfilled_at"));
            if !done {
                worse(
                    Health::Degraded,
                    "the first backfill has not completed (it publishes the rows the table held \
                     when the slot was created)"
                        .into(),
                    &mut notes,
                );
            }
            facts.insert("last_event_id".into(), text(b, "last_event_id"));
            facts.insert("last_event_topic".into(), text(b, "last_event_topic"));
            facts.insert("last_delivered_at".into(), text(b, "last_delivered_at"));
            facts.insert(
                "last_delivery_age_seconds".into(),
                number(b, "last_delivery_age_seconds"),
            );
            // The newest delivered event's commit time vs now: how far
            // behind the relay is while events wait, how long the outbox has
            // been quiet otherwise.
            facts.insert(
                "last_event_age_seconds".into(),
                number(b, "last_event_age_seconds"),
            );
        }
    }
    for (name, counted) in [("outbox", &outbox), ("inbox", &inbox)] {
        let (rows, oldest, estimate) = match counted {
            Counted::Rows(row) => (number(row, "n"), text(row, "oldest"), Value::Null),
            Counted::Missing => (Value::Null, Value::Null, Value::Null),
            Counted::Skipped { estimate, .. } => (Value::Null, Value::Null, json!(estimate)),
        };
        facts.insert(format!("{name}_rows"), rows);
        facts.insert(format!("{name}_oldest"), oldest);
        if !estimate.is_null() {
            facts.insert(format!("{name}_rows_estimate"), estimate);
        }
    }
    Ok(Status {
        health,
        notes,
        facts: Value::Object(facts),
    })
}
