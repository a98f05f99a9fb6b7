//! The relay's top-level loop: start-up checks, one replication session at a
//! time, reconnection with backoff after retryable failures, and the final
//! producer flush on shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::{Metrics, RelayState};
use crate::pipeline::config::RelayConfig;
use crate::pipeline::lock::SlotLock;
use crate::pipeline::publish::Publisher;
use crate::pipeline::shutdown::Grace;
use crate::pipeline::{bookkeeping, slot, stream};
use crate::postgres::connection::{Connection, Mode};
use crate::{Error, Result};

/// Runs until `token` is cancelled (then returns `Ok` after flushing) or a
/// fatal error. Retryable failures (PostgreSQL restarts, dropped connections,
/// Kafka outages) reconnect and resume from the slot's confirmed position.
///
/// Delivery reports are served by a task spawned on the caller's runtime. The
/// binary uses a current-thread runtime so that task shares the stream's
/// thread (records are freed where they were allocated, see `kafka::reports`); on a
/// multi-thread runtime it works the same, at some CPU cost per event.
pub async fn run(cfg: RelayConfig, token: CancellationToken) -> Result<()> {
    let metrics = Metrics::new();
    if let Some(addr) = cfg.metrics_addr {
        let (metrics, token) = (metrics.clone(), token.clone());
        tokio::spawn(async move {
            if let Err(err) = crate::http::serve(addr, metrics, token).await {
                tracing::error!(error = %err, addr = %addr, "cannot serve metrics");
            }
        });
    }
    run_with_metrics(cfg, token, metrics).await
}

/// [`run`], recording into caller-owned `metrics` (for embedding the relay
/// in another process), without serving them.
pub async fn run_with_metrics(
    cfg: RelayConfig,
    token: CancellationToken,
    metrics: Arc<Metrics>,
) -> Result<()> {
    tracing::info!(
        database = %cfg.pg,
        slot = %cfg.slot,
        publication = %cfg.publication,
        brokers = %cfg.kafka.brokers,
        max_in_flight = cfg.max_in_flight,
        max_in_flight_bytes = cfg.max_in_flight_bytes,
        allowed_topics = %cfg.allowed_topics.describe(),
        dead_letter_topic = cfg.dead_letter_topic.as_deref().unwrap_or("none: stop on undeliverable events"),
        "starting outbox relay"
    );
    if cfg.allowed_topics.is_open() {
        tracing::warn!(
            allowed_topics = %cfg.allowed_topics.describe(),
            "rows can pick any topic name (only the dead-letter topic and `_`-prefixed topics are \
             refused): another service's topics included; narrow --allowed-topics or start \
             --topic-template with a literal prefix"
        );
    }
    // One --shutdown-timeout from the stop request for every step of the
    // stop (see `shutdown`).
    let grace = Grace::watch(&token, cfg.shutdown_timeout);
    let mut publisher = Publisher::new(
        &cfg.kafka,
        cfg.topic_template.clone(),
        cfg.allowed_topics.clone(),
        cfg.max_in_flight,
        cfg.connect_timeout,
        grace.clone(),
        metrics.clone(),
    )?;
    // The last delivered event, for `outbox-relay status`.
    let bookkeeping_stop = CancellationToken::new();
    let bookkeeping = tokio::spawn(bookkeeping::run(
        cfg.clone(),
        publisher.ledger(),
        metrics.clone(),
        bookkeeping_stop.clone(),
    ));
    let mut backoff = Backoff::new(cfg.max_backoff);
    let mut lock = SlotLock::new();
    // The brokers are checked once, at the first session that reaches that
    // point: an unreachable broker at start is a configuration problem, later
    // outages are waited out.
    let mut brokers_checked = false;
    let result = loop {
        // No record of an earlier session may reach Kafka after this one
        // starts resending from the slot's confirmed position: it would land
        // after records that follow it (see `Publisher::drain`).
        match publisher.drain(&token).await {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(err) => break Err(err),
        }
        // One instance works the slot at a time, the backfill included.
        match lock.ensure(&cfg, &token, &metrics).await {
            Ok(true) => metrics.set_state(RelayState::Starting),
            Ok(false) => break Ok(()),
            Err(err) if err.is_retryable() => {
                metrics.set_state(RelayState::Reconnecting);
                if !backoff
                    .wait(&err, "cannot take the slot lock; retrying", &token)
                    .await
                {
                    break Ok(());
                }
                continue;
            }
            Err(err) => break Err(err),
        }
        let span = tracing::info_span!("session", slot = %cfg.slot);
        let streamed_before = metrics.sessions();
        let fence = lock.fence();
        let outcome = session(
            &cfg,
            &mut publisher,
            &token,
            &fence,
            &mut brokers_checked,
            &metrics,
        )
        .instrument(span)
        .await;
        // A session that reached streaming was healthy: the next failure
        // starts the backoff again from its shortest wait.
        if metrics.sessions() > streamed_before {
            backoff.reset();
        }
        match outcome {
            Ok(()) => break Ok(()),
            // Interrupted by the shutdown itself (for example mid-backfill):
            // nothing was confirmed past what Kafka acknowledged.
            // A refusal is reported even when a stop is under way.
            Err(err) if err.is_retryable() && token.is_cancelled() && !err.is_refusal() => {
                tracing::info!(error = %err, "stopped");
                break Ok(());
            }
            Err(err) if err.is_retryable() && !token.is_cancelled() => {
                metrics.set_state(RelayState::Reconnecting);
                if !backoff
                    .wait(&err, "relay interrupted; resuming from the slot", &token)
                    .await
                {
                    break Ok(());
                }
            }
            Err(err) => break Err(err),
        }
    };
    metrics.set_state(RelayState::Stopping);
    // Dropping a producer purges what it still holds: flush first. After a
    // refusal the producer holds nothing behind the refused record (the
    // gapless guarantee stops it), so this sends only records before it.
    let flushed = publisher.flush(grace.left()).await;
    // Its last write, with what the flush acknowledged, before the lock
    // goes to another instance.
    bookkeeping_stop.cancel();
    let abort = bookkeeping.abort_handle();
    // After a stop that spent its budget waiting on Kafka, `status` should
    // still show what the flush acknowledged.
    if tokio::time::timeout(
        cfg.connect_timeout.min(grace.left_for_last_words()),
        bookkeeping,
    )
    .await
    .is_err()
    {
        // Not detached: no write of this instance after the lock is gone.
        abort.abort();
    }
    lock.release().await;
    let outstanding = publisher.in_flight();
    let refused = publisher.refused_at_exit();
    match (result, flushed) {
        (Err(err), _) => Err(err),
        (Ok(()), _) if refused.is_some() => Err(refused.expect("checked")),
        (Ok(()), _) if outstanding > 0 => Err(Error::Unacknowledged {
            outstanding,
            timeout: cfg.shutdown_timeout,
        }),
        (Ok(()), Err(err)) => {
            tracing::warn!(error = %err, "flushing the producer at exit failed");
            Ok(())
        }
        (Ok(()), Ok(())) => Ok(()),
    }
}

async fn session(
    cfg: &RelayConfig,
    publisher: &mut Publisher,
    token: &CancellationToken,
    fence: &CancellationToken,
    brokers_checked: &mut bool,
    metrics: &Arc<Metrics>,
) -> Result<()> {
    let mut conn = Connection::connect(&cfg.pg, Mode::Replication).await?;
    conn.security().log();
    if let Some(timeout) = cfg.session_timeout {
        // The walsender reads it at every wait (settable per session since
        // PostgreSQL 12): if this instance goes silent, the slot is freed
        // for a standby after this long.
        conn.query(&format!(
            "SET wal_sender_timeout = '{}ms'",
            timeout.as_millis()
        ))
        .await?;
    }
    // A standby (a DNS name that has not moved yet after a failover, or a
    // replica by mistake) cannot serve the slot: wait for a promotion
    // rather than fail on whatever the slot commands say there.
    let recovery = conn
        .query("SELECT pg_catalog.pg_is_in_recovery()::text AS standby")
        .await?;
    if recovery.first().and_then(|r| r.get("standby")) == Some("true") {
        return Err(Error::Io {
            context: format!("connecting to {}", cfg.pg),
            source: std::io::Error::other(
                "the server is a standby (in recovery) and cannot serve the slot; waiting for it \
                 to be promoted, or point --database-url at the primary",
            ),
        });
    }
    slot::check_wal_level(&mut conn).await?;
    slot::check_publication(&mut conn, &cfg.publication, &cfg.pg.dbname).await?;
    if !*brokers_checked {
        publisher.check_brokers().await?;
        if let Some(topic) = &cfg.dead_letter_topic {
            publisher
                .ensure_topic(topic, "--dead-letter-topic (OUTBOX_DEAD_LETTER_TOPIC)")
                .await?;
        }
        *brokers_checked = true;
    }
    // The slot checks and the backfill stop at a lost lock as at a stop
    // request (they return "interrupted", which the caller retries through
    // the lock unless a stop was asked for): another instance may be
    // starting its own backfill.
    let preparing = token.child_token();
    let watch = tokio::spawn({
        let (fence, preparing) = (fence.clone(), preparing.clone());
        async move {
            tokio::select! {
                _ = fence.cancelled() => preparing.cancel(),
                _ = preparing.cancelled() => {}
            }
        }
    });
    let start = slot::prepare(&mut conn, cfg, publisher, &preparing).await;
    preparing.cancel();
    let _ = watch.await;
    let start = start?;
    stream::run(conn, start, cfg, publisher, token, fence, metrics).await
}

/// Exponential backoff from 100 ms up to a ceiling.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Self {
            next: Duration::from_millis(100),
            max,
        }
    }

    fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }

    fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    /// Logs `err` with `what` and the wait, then waits. Returns `false` when
    /// `token` was cancelled first.
    async fn wait(&mut self, err: &Error, what: &str, token: &CancellationToken) -> bool {
        let wait = self.next();
        tracing::warn!(error = %err, retry_in = ?wait, "{what}");
        tokio::select! {
            biased;
            _ = token.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(500));
        let waits: Vec<u128> = (0..5).map(|_| b.next().as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next().as_millis(), 100, "a healthy session resets it");
    }
}
