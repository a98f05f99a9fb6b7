//! The replication stream: START_REPLICATION on the slot, decoding each
//! message, publishing outbox inserts as they arrive, recording positions
//! against delivery tickets, and sending standby status updates (the confirmed LSN)
//! back to PostgreSQL. One call is one session; the caller reconnects.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use opentelemetry::KeyValue;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::pgoutput::decode::{self, LogicalMessage, ReplicationMessage};
use crate::pipeline::config::RelayConfig;
use crate::pipeline::dead_letter::DeadLetter;
use crate::pipeline::event::{Layout, OutboxEvent};
use crate::pipeline::message::Messages;
use crate::pipeline::progress::{Arrival, Progress, StallWatch};
use crate::pipeline::publish::Publisher;
use crate::pipeline::route;
use crate::postgres::connection::{Backend, Connection, quote_ident, quote_literal};
use crate::postgres::lsn::Lsn;
use crate::postgres::time::pg_now_us;
use crate::traces::TransactionTrace;
use crate::{Error, Result};

/// Streams from the slot until `token` is cancelled (returns `Ok`) or a
/// failure (returns it; retryable ones are resumed by the caller).
pub async fn run(
    mut conn: Connection,
    start: Option<Lsn>,
    cfg: &RelayConfig,
    publisher: &mut Publisher,
    token: &CancellationToken,
    fence: &CancellationToken,
    metrics: &Arc<Metrics>,
) -> Result<()> {
    if fence.is_cancelled() {
        // Lost during the backfill or the slot checks: do not start.
        return Err(lock_lost(cfg));
    }
    let start_lsn = start.unwrap_or(Lsn::ZERO);
    // proto_version 1 without `streaming`: pgoutput sends each transaction
    // once it committed, so every Insert we see is committed data. With
    // `messages` (PostgreSQL 14+), transactional logical decoding messages
    // come inside their transaction, in WAL order with its rows; they are
    // not filtered by the publication, so their prefix picks ours.
    conn.send_query(&format!(
        "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1', publication_names {}{})",
        quote_ident(&cfg.slot),
        start_lsn,
        quote_literal(&quote_ident(&cfg.publication)),
        if cfg.message_prefix.is_some() {
            ", messages 'true'"
        } else {
            ""
        }
    ))
    .await?;
    loop {
        match conn.recv().await? {
            Backend::CopyBoth => break,
            Backend::Error(source) => {
                return Err(Error::Server {
                    context: format!("starting replication from slot `{}`", cfg.slot),
                    source: Box::new(source),
                });
            }
            _ => {}
        }
    }
    tracing::info!(slot = %cfg.slot, start_lsn = %start_lsn, message_prefix = ?cfg.message_prefix, "streaming");

    let progress = Progress::start(
        publisher.ledger(),
        start_lsn,
        cfg.max_in_flight,
        cfg.max_in_flight_bytes,
    );
    metrics.session_started();
    metrics.set_state(crate::metrics::RelayState::Streaming);
    let mut session = Session {
        conn,
        cfg,
        layouts: HashMap::new(),
        messages: cfg.message_prefix.as_deref().map(Messages::new),
        other_prefixes: std::collections::HashSet::new(),
        in_transaction: false,
        arrival: None,
        trace: None,
        progress,
        metrics: metrics.clone(),
        last_position: start_lsn,
        last_sent: None,
        last_sent_at: Instant::now(),
        isolated: None,
        stall: StallWatch::new(cfg.stall_warning, metrics.clone()),
        fence: fence.clone(),
    };
    let ended = session.pump(publisher, token).await;
    session.finish(publisher, ended).await
}

/// The slot lock was lost (see `lock::SlotLock::fence`).
fn lock_lost(cfg: &RelayConfig) -> Error {
    Error::Io {
        context: format!("working slot `{}`", cfg.slot),
        source: std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "the slot lock was lost; ending this session and taking the lock again",
        ),
    }
}

struct Session<'a> {
    conn: Connection,
    cfg: &'a RelayConfig,
    layouts: HashMap<u32, Layout>,
    /// Which logical decoding messages are events, when asked for.
    messages: Option<Messages>,
    /// Other prefixes seen this session (warned about once each).
    other_prefixes: std::collections::HashSet<bytes::Bytes>,
    in_transaction: bool,
    /// When the open transaction committed and reached the relay, for the
    /// latency metrics.
    arrival: Option<Arrival>,
    /// The trace contexts of the open transaction (when spans are exported).
    trace: Option<TransactionTrace>,
    /// Tickets handed out, and the positions waiting on them.
    progress: Progress,
    metrics: Arc<Metrics>,
    /// The newest position recorded.
    last_position: Lsn,
    last_sent: Option<Lsn>,
    last_sent_at: Instant,
    /// The ticket of a record sent on its own, while it waits for its report.
    isolated: Option<crate::pipeline::progress::Ticket>,
    stall: StallWatch,
    /// Cancelled when this instance lost the slot lock.
    fence: CancellationToken,
}

impl Session<'_> {
    /// Reads the stream until shutdown (returns `Ok`) or a failure.
    async fn pump(&mut self, publisher: &mut Publisher, token: &CancellationToken) -> Result<()> {
        // Confirmations go out within 100 ms of changing (bounding what a crash
        // replays); an unchanged position is repeated every status interval.
        let mut tick =
            tokio::time::interval(self.cfg.status_interval.min(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // On shutdown inside a transaction, read on to its Commit (for at most
        // half the shutdown timeout): stopping mid-transaction would leave its
        // delivered events unconfirmed, and they would be sent again.
        let mut draining = false;
        let drain_deadline = tokio::time::sleep(Duration::MAX);
        tokio::pin!(drain_deadline);
        loop {
            let room = self.progress.has_room();
            tokio::select! {
                biased;
                _ = token.cancelled(), if !draining => {
                    if !self.in_transaction {
                        return Ok(());
                    }
                    tracing::info!("stop requested inside a transaction; reading on to its commit");
                    draining = true;
                    drain_deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + publisher.grace().first_half_left());
                }
                _ = &mut drain_deadline, if draining => return Ok(()),
                // Another instance may hold the lock by now: stop streaming
                // (the slot lets one walsender in; this one gives way).
                _ = self.fence.cancelled() => return Err(lock_lost(self.cfg)),
                // Waiting for room in a full window (or a refusal). With room,
                // refusals are picked up after each message and at each tick:
                // waiting on the notification for every message cost CPU.
                _ = self.progress.changed(), if !room => self.act_on_refusals(publisher)?,
                _ = tick.tick() => {
                    self.act_on_refusals(publisher)?;
                    self.check_stall();
                    let lsn = self.progress.confirmable();
                    let due = self.last_sent != Some(lsn)
                        || self.last_sent_at.elapsed() >= self.cfg.status_interval;
                    if due {
                        self.send_status(lsn, false).await?;
                    }
                }
                // Reading WAL only with room in the window is the backpressure:
                // a full window stops the stream until acknowledgements arrive.
                msg = self.conn.recv(), if room => {
                    self.handle(msg?, publisher, token).await?;
                    if self.progress.any_refused() {
                        self.act_on_refusals(publisher)?;
                    }
                    if draining && !self.in_transaction {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Acts on refusals from delivery reports (see [`route::act_on_refusals`]).
    fn act_on_refusals(&mut self, publisher: &mut Publisher) -> Result<()> {
        route::act_on_refusals(
            &self.progress,
            publisher,
            self.cfg.dead_letter_topic.as_deref(),
            self.isolated,
        )
    }

    /// Reports a delivery that has not moved for `--stall-warning`.
    fn check_stall(&mut self) {
        self.stall.check(&self.progress);
    }

    /// Waits until every record handed out is settled, acting on refusals
    /// and keeping the server's `wal_sender_timeout` from firing with status
    /// updates. Returns `Ok(false)` when `token` is cancelled first.
    async fn wait_settled(
        &mut self,
        publisher: &mut Publisher,
        token: &CancellationToken,
    ) -> Result<bool> {
        let heartbeat = self.cfg.status_interval.min(Duration::from_secs(1));
        loop {
            self.act_on_refusals(publisher)?;
            if self.progress.all_settled() {
                return Ok(true);
            }
            tokio::select! {
                biased;
                _ = token.cancelled() => return Ok(false),
                _ = self.progress.changed() => {}
                _ = tokio::time::sleep(heartbeat) => {
                    self.check_stall();
                    let lsn = self.progress.confirmable();
                    self.send_status(lsn, false).await?;
                }
            }
        }
    }

    /// Sends an event Kafka refused as part of a batch on its own, with
    /// nothing else in flight, so its report says whether the event itself
    /// is refused. Nothing after it is read until it is settled.
    async fn send_alone(
        &mut self,
        event: crate::pipeline::event::OutboxEvent,
        publisher: &mut Publisher,
        token: &CancellationToken,
    ) -> Result<()> {
        let context = format!("sending event {} on its own", event.id);
        let interrupted = || Error::Io {
            context: context.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "stopped before kafka answered; it is sent again at the next start",
            ),
        };
        tracing::info!(event_id = %event.id, "kafka refused a batch holding this event; sending it on its own");
        if !self.wait_settled(publisher, token).await? {
            return Err(interrupted());
        }
        let ticket = self.progress.ticket(self.arrival)?;
        self.isolated = Some(ticket);
        let dead_letter_topic = self.cfg.dead_letter_topic.clone();
        let id = event.id.clone();
        let salvage_topic = Some(publisher.requested_topic(&event));
        route::publish(
            publisher,
            ticket,
            dead_letter_topic.as_deref(),
            Ok(event),
            |err| DeadLetter {
                event_id: id.clone(),
                original_topic: salvage_topic,
                reason: err.to_string(),
                ..DeadLetter::default()
            },
        )
        .await?;
        let settled = self.wait_settled(publisher, token).await;
        self.isolated = None;
        if !settled? {
            return Err(interrupted());
        }
        publisher.clear_suspect(&id);
        tracing::info!(event_id = %id, "the event sent on its own is settled");
        Ok(())
    }

    async fn handle(
        &mut self,
        msg: Backend,
        publisher: &mut Publisher,
        token: &CancellationToken,
    ) -> Result<()> {
        let data = match msg {
            Backend::CopyData(data) => data,
            Backend::Error(source) => {
                return Err(Error::Server {
                    context: format!("streaming from slot `{}`", self.cfg.slot),
                    source: Box::new(source),
                });
            }
            // A walsender that is shutting down ends the stream with
            // CommandComplete (no CopyDone) once we confirmed everything it
            // sent; either way we reconnect and resume from the slot.
            Backend::CopyDone | Backend::CommandComplete | Backend::ReadyForQuery => {
                return Err(Error::Io {
                    context: format!("streaming from slot `{}`", self.cfg.slot),
                    source: std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the server ended the replication stream (shutting down or restarting?)",
                    ),
                });
            }
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected message {other:?} during replication"
                )));
            }
        };
        let at = self.last_position;
        match decode::replication_message(data).map_err(|source| Error::Decode {
            lsn: at.to_string(),
            source: Box::new(source),
        })? {
            ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                data,
            } => {
                self.metrics.server_position(wal_end.0);
                let msg = decode::logical_message(data).map_err(|source| Error::Decode {
                    lsn: wal_start.to_string(),
                    source: Box::new(source),
                })?;
                self.handle_logical(msg, wal_start, publisher, token)
                    .await?;
            }
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                self.metrics.server_position(wal_end.0);
                // Nothing open and the server is past everything we pushed:
                // confirm its position once earlier records are settled, so an
                // idle or filtered outbox does not pin WAL.
                if !self.in_transaction && wal_end > self.last_position {
                    self.position(wal_end);
                }
                if reply_requested {
                    let lsn = self.progress.confirmable();
                    self.send_status(lsn, false).await?;
                }
            }
        }
        Ok(())
    }

    async fn handle_logical(
        &mut self,
        msg: LogicalMessage,
        wal_start: Lsn,
        publisher: &mut Publisher,
        token: &CancellationToken,
    ) -> Result<()> {
        match msg {
            LogicalMessage::Begin {
                final_lsn,
                xid,
                commit_ts,
            } => {
                self.in_transaction = true;
                self.arrival = Some(Arrival {
                    commit_ts,
                    received: Instant::now(),
                });
                self.trace = self.cfg.traces.transaction();
                // Saturating: the commit time is the server's value, not ours.
                self.metrics.received(pg_now_us().saturating_sub(commit_ts));
                tracing::trace!(xid, final_lsn = %final_lsn, "begin");
            }
            LogicalMessage::Relation(rel) => {
                // Every Relation replaces the previous layout, so added or
                // dropped columns are followed as soon as the table changes.
                let layout = Layout::from_relation_as(&rel, &self.cfg.table_layout)?;
                tracing::debug!(table = layout.table(), oid = rel.oid, "relation");
                self.layouts.insert(rel.oid, layout);
            }
            LogicalMessage::Insert { rel_oid, tuple } => {
                let layout = self.layouts.get(&rel_oid).ok_or_else(|| {
                    Error::Protocol(format!(
                        "insert into relation {rel_oid} before its Relation message"
                    ))
                })?;
                let event = layout.event(&tuple);
                // Made only for a row that is not an event (the rare case).
                let letter = event
                    .as_ref()
                    .err()
                    .map(|err| layout.dead_letter(&tuple, err));
                self.publish_one(event, letter, wal_start, publisher, token)
                    .await?;
            }
            LogicalMessage::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                let Some(messages) = self.messages.as_ref().filter(|m| m.is_ours(&prefix)) else {
                    // Said once per prefix and session: a writer whose
                    // prefix differs from --message-prefix loses every
                    // event it emits, which must not stay silent.
                    let shown = String::from_utf8_lossy(&prefix).escape_debug().to_string();
                    if self.other_prefixes.len() < 64 && self.other_prefixes.insert(prefix.clone())
                    {
                        tracing::warn!(lsn = %lsn, prefix = %shown, "skipping logical decoding messages with a prefix other than --message-prefix; if these are outbox events, their writer and the relay disagree on the prefix and they are not published");
                    } else {
                        tracing::debug!(lsn = %lsn, prefix = %shown, "skipping a message with another prefix");
                    }
                    return Ok(());
                };
                // A non-transactional message arrives outside any
                // transaction: refused, through the same bad-event path.
                let (event, letter) =
                    messages.event(transactional && self.in_transaction, &content);
                self.publish_one(event, letter, lsn, publisher, token)
                    .await?;
            }
            LogicalMessage::Commit {
                end_lsn,
                commit_lsn,
                ..
            } => {
                self.in_transaction = false;
                self.arrival = None;
                if let Some(trace) = self.trace.take() {
                    // Ends when the transaction's events are with the
                    // producer; Kafka's acknowledgements come later.
                    self.cfg.traces.finish(
                        "outbox-relay transaction",
                        trace,
                        vec![
                            KeyValue::new("outbox.slot", self.cfg.slot.clone()),
                            KeyValue::new("outbox.commit_lsn", commit_lsn.to_string()),
                        ],
                    );
                }
                if end_lsn > self.last_position {
                    self.position(end_lsn);
                }
            }
            LogicalMessage::Other { tag } => {
                tracing::debug!(tag = %tag, lsn = %wal_start, "skipping pgoutput message");
            }
        }
        Ok(())
    }

    /// Hands one event (from a row or a message) to the producer with the
    /// next ticket, or its dead letter (`letter`, made when it is not a
    /// valid event); an event Kafka refused in a batch goes on its own.
    async fn publish_one(
        &mut self,
        event: Result<OutboxEvent>,
        letter: Option<DeadLetter>,
        lsn: Lsn,
        publisher: &mut Publisher,
        token: &CancellationToken,
    ) -> Result<()> {
        if let (Some(trace), Ok(event)) = (self.trace.as_mut(), &event) {
            trace.observe(event.traceparent(), event.tracestate());
        }
        if let Ok(event) = &event
            && publisher.is_suspect(&event.id)
        {
            let event = event.clone();
            return self.send_alone(event, publisher, token).await;
        }
        let ticket = self.progress.ticket(self.arrival)?;
        let id = match &event {
            Ok(event) if tracing::enabled!(tracing::Level::DEBUG) => Some(event.id.clone()),
            _ => None,
        };
        route::publish(
            publisher,
            ticket,
            self.cfg.dead_letter_topic.as_deref(),
            event,
            |err| {
                letter.unwrap_or_else(|| DeadLetter {
                    reason: err.to_string(),
                    ..DeadLetter::default()
                })
            },
        )
        .await?;
        if let Some(id) = id {
            tracing::debug!(event_id = %id, lsn = %lsn, "published");
        }
        Ok(())
    }

    fn position(&mut self, lsn: Lsn) {
        self.last_position = lsn;
        self.progress.position(lsn);
    }

    /// Standby status update: write, flush and apply positions all report
    /// what Kafka has acknowledged; the server keeps WAL after `flush`.
    async fn send_status(&mut self, lsn: Lsn, reply: bool) -> Result<()> {
        let now_us = pg_now_us();
        let mut msg = BytesMut::with_capacity(34);
        msg.put_u8(b'r');
        msg.put_u64(lsn.0);
        msg.put_u64(lsn.0);
        msg.put_u64(lsn.0);
        msg.put_i64(now_us);
        msg.put_u8(u8::from(reply));
        self.conn.send_copy_data(&msg).await?;
        self.metrics.confirmed(lsn.0);
        if self.last_sent != Some(lsn) {
            tracing::debug!(lsn = %lsn, "confirmed");
        }
        self.last_sent = Some(lsn);
        self.last_sent_at = Instant::now();
        Ok(())
    }

    /// Waits (bounded by the shutdown timeout) until every record handed to
    /// the producer is settled, sending dead letters still due.
    async fn settle_all(&mut self, publisher: &mut Publisher) -> Result<()> {
        let timeout = publisher.grace().left();
        // Cancelled already: the wait is bounded by the timeout alone.
        let never = CancellationToken::new();
        match tokio::time::timeout(timeout, self.wait_settled(publisher, &never)).await {
            Ok(result) => result.map(|_| ()),
            Err(_) => Err(Error::Unacknowledged {
                outstanding: self.progress.outstanding().0 as usize,
                timeout: publisher.grace().timeout(),
            }),
        }
    }

    /// Ends the session: on shutdown waits for outstanding deliveries
    /// (bounded by the shutdown timeout), confirms what was acknowledged, and
    /// closes the stream.
    async fn finish(mut self, publisher: &mut Publisher, ended: Result<()>) -> Result<()> {
        let result = match ended {
            Ok(()) => self.settle_all(publisher).await,
            Err(e) => Err(e),
        };
        let lsn = self.progress.confirmable();
        // Best effort: on a broken connection this fails, and the slot keeps
        // the last confirmed position it had; replay covers the rest.
        if self.send_status(lsn, false).await.is_ok() {
            tracing::info!(lsn = %lsn, "final position confirmed");
            let _ = self.conn.send_copy_done().await;
            // The server's answer to CopyDone says it read the final
            // position; a stop that spent its budget on Kafka still confirms.
            let answer = Duration::from_secs(5).min(publisher.grace().left_for_last_words());
            let _ = tokio::time::timeout(answer, async {
                while let Ok(msg) = self.conn.recv().await {
                    if matches!(msg, Backend::ReadyForQuery | Backend::Error(_)) {
                        break;
                    }
                }
            })
            .await;
            self.conn.terminate().await;
        }
        let totals = self.progress.totals();
        tracing::info!(
            delivered = totals.delivered,
            dead_lettered = totals.dead_lettered,
            "session ended"
        );
        result
    }
}
