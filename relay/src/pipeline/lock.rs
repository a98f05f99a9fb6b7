//! The slot lock: one relay instance works a slot at a time, from the
//! backfill through streaming. It is a PostgreSQL session advisory lock keyed
//! by the slot name, held on a connection of its own for as long as the
//! instance works the slot; a second instance (a rolling deploy, a standby)
//! waits for it and says so in its log.
//!
//! Why a lock and not the slot's own `active_pid`: a slot is active only
//! while a walsender streams from it. During the first-start backfill nobody
//! streams, and a second instance would start its own backfill beside the
//! first one's.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Result;
use crate::metrics::{Metrics, RelayState};
use crate::pipeline::config::RelayConfig;
use crate::postgres::connection::{Connection, Mode, quote_literal};

/// How often a waiting instance tries the lock again.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How often a waiting instance repeats that it is waiting.
const REPEAT_WAITING_LOG: Duration = Duration::from_secs(60);

/// What one try at the lock found.
enum Attempt {
    Taken,
    EndedOwnOrphan,
    HeldBy(String),
}

/// The lock on one slot, held while its connection lives.
pub struct SlotLock {
    held: Option<Held>,
    /// The server backend that held the lock for this instance (pid and
    /// start time, which together name one backend even across server
    /// restarts): when its connection is lost without the server noticing
    /// (a network cut), that backend still holds the lock, and this instance
    /// ends it.
    backend: Option<(String, String)>,
}

/// A held lock: its connection lives in a task that keeps the session
/// busy, so that the server's `idle_session_timeout` (set on the session
/// from `--session-timeout`) ends it only when this instance stops
/// answering: a host that vanishes without closing its connections then
/// frees the lock for a standby within that timeout instead of the hours
/// TCP keepalives take.
struct Held {
    /// Asks the task to check the connection now; it answers whether the
    /// lock is still held.
    check: mpsc::Sender<oneshot::Sender<bool>>,
    stop: CancellationToken,
    /// Cancelled when the lock is lost: the session working the slot stops.
    fence: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl SlotLock {
    /// Not held yet.
    pub fn new() -> Self {
        Self {
            held: None,
            backend: None,
        }
    }

    /// Makes sure this instance holds the lock: checks that the connection
    /// holding it is still alive (the lock dies with it, for example in a
    /// PostgreSQL restart), and otherwise takes it again, waiting while
    /// another instance has it. Returns `Ok(false)` when `token` was
    /// cancelled before the lock was taken.
    pub async fn ensure(
        &mut self,
        cfg: &RelayConfig,
        token: &CancellationToken,
        metrics: &Metrics,
    ) -> Result<bool> {
        if let Some(held) = &self.held {
            // Checked now, not at the last periodic check: a PostgreSQL
            // restart a moment ago took the lock with it.
            if held.still_held().await {
                return Ok(true);
            }
            // A connection that died took the lock with it; another instance
            // may hold it by now, so take it again through the waiting path.
            tracing::warn!(slot = %cfg.slot, "the connection holding the slot lock was lost; taking the lock again");
            self.release().await;
        }
        let mut conn = Connection::connect(&cfg.pg, Mode::Sql).await?;
        if let Some(timeout) = cfg.session_timeout {
            // Set before the lock is taken: a waiting instance polls more
            // often than this (`RETRY_EVERY`), so only a silent one is ended.
            // Bounded like every round: a connection that goes silent here
            // must not hang the relay.
            let sql = format!("SET idle_session_timeout = '{}ms'", timeout.as_millis());
            let set = conn.query(&sql);
            tokio::select! {
                biased;
                _ = token.cancelled() => return Ok(false),
                set = tokio::time::timeout(cfg.connect_timeout, set) => {
                    set.map_err(|_| crate::Error::Io {
                        context: format!("setting up the lock connection of slot `{}`", cfg.slot),
                        source: std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no answer within {:?}", cfg.connect_timeout),
                        ),
                    })??;
                }
            }
        }
        let mut last_log: Option<Instant> = None;
        loop {
            // Each round is bounded and gives way to a stop: a half-open
            // connection must not hang the relay.
            let round = tokio::time::timeout(cfg.connect_timeout, self.try_once(&mut conn, cfg));
            let outcome = tokio::select! {
                biased;
                _ = token.cancelled() => {
                    conn.terminate().await;
                    return Ok(false);
                }
                outcome = round => outcome.map_err(|_| crate::Error::Io {
                    context: format!("taking the lock of slot `{}`", cfg.slot),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {:?}", cfg.connect_timeout),
                    ),
                })??,
            };
            match outcome {
                Attempt::Taken => {
                    if last_log.is_some() {
                        tracing::info!(slot = %cfg.slot, "took over the slot lock; this instance now works the slot");
                    }
                    self.held = Some(Held::keep(conn, cfg));
                    return Ok(true);
                }
                Attempt::EndedOwnOrphan => continue,
                Attempt::HeldBy(holder) => {
                    metrics.set_state(RelayState::WaitingForLock);
                    if last_log.is_none_or(|t| t.elapsed() >= REPEAT_WAITING_LOG) {
                        tracing::info!(
                            slot = %cfg.slot,
                            holder = %holder,
                            "another relay instance works this slot; waiting (standby) until it stops"
                        );
                        last_log = Some(Instant::now());
                    }
                }
            }
            tokio::select! {
                biased;
                _ = token.cancelled() => {
                    conn.terminate().await;
                    return Ok(false);
                }
                _ = tokio::time::sleep(RETRY_EVERY) => {}
            }
        }
    }

    /// One try at the lock.
    async fn try_once(&mut self, conn: &mut Connection, cfg: &RelayConfig) -> Result<Attempt> {
        let rows = conn
            .query(&format!(
                "SELECT pg_try_advisory_lock({}) AS held, pg_backend_pid()::text AS pid, \
                 (SELECT backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()) AS started",
                key(&cfg.slot)
            ))
            .await?;
        let Some(row) = rows.first() else {
            return Ok(Attempt::HeldBy("unknown".into()));
        };
        if row.get("held") == Some("t") {
            self.backend = row
                .get("pid")
                .zip(row.get("started"))
                .map(|(p, s)| (p.to_owned(), s.to_owned()));
            return Ok(Attempt::Taken);
        }
        let (backend, holder) = holder(conn, &cfg.slot).await;
        if backend.is_some() && backend == self.backend {
            // Our own earlier backend, whose client connection is gone.
            tracing::warn!(slot = %cfg.slot, holder = %holder, "this instance's earlier connection still holds the slot lock; ending it");
            let pid = backend.map(|(pid, _)| pid).unwrap_or_default();
            let _ = conn
                .query(&format!("SELECT pg_terminate_backend({pid})"))
                .await;
            self.backend = None;
            return Ok(Attempt::EndedOwnOrphan);
        }
        Ok(Attempt::HeldBy(holder))
    }

    /// A token cancelled when the lock is lost (its connection failed or
    /// stopped answering): the session working the slot ends then, so that
    /// it does not stream beside an instance that took the lock over.
    /// Already cancelled when the lock is not held.
    pub fn fence(&self) -> CancellationToken {
        match &self.held {
            Some(held) => held.fence.clone(),
            None => {
                let gone = CancellationToken::new();
                gone.cancel();
                gone
            }
        }
    }

    /// Releases the lock (closing its connection releases it too).
    pub async fn release(&mut self) {
        if let Some(mut held) = self.held.take() {
            held.stop.cancel();
            let _ = (&mut held.task).await;
        }
    }
}

impl Drop for Held {
    /// A lock dropped without [`SlotLock::release`] (an embedder's future
    /// aborted) still ends its task, and with it the session and the lock.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Held {
    /// Moves the lock's connection into a task that runs a trivial query
    /// every third of `--session-timeout` (every 10 s without one) and
    /// reports the connection lost when a query fails or goes unanswered.
    fn keep(mut conn: Connection, cfg: &RelayConfig) -> Self {
        let every = cfg
            .session_timeout
            .map_or(Duration::from_secs(10), |t| t / 3);
        // A slow answer is not a lost lock: wait as long as the server
        // would keep a silent session (TCP_USER_TIMEOUT ends a connection
        // to a vanished host sooner), and without a timeout, indefinitely.
        let answer_within = cfg.session_timeout;
        let (check, mut checks) = mpsc::channel::<oneshot::Sender<bool>>(1);
        let stop = CancellationToken::new();
        let fence = CancellationToken::new();
        let slot = cfg.slot.clone();
        let task = tokio::spawn({
            let stop = stop.clone();
            let fence = fence.clone();
            async move {
                loop {
                    let asked = tokio::select! {
                        biased;
                        _ = stop.cancelled() => break,
                        asked = checks.recv() => match asked {
                            // The `Held` is gone (dropped without `release`):
                            // end the session rather than ping it forever.
                            None => break,
                            asked => asked,
                        },
                        _ = tokio::time::sleep(every) => None,
                    };
                    // The session holds the lock until it ends (nothing
                    // unlocks it), so an answered query proves it is held.
                    let ping = conn.query("SELECT 1");
                    let answer = match answer_within {
                        Some(bound) => tokio::time::timeout(bound, ping).await.ok(),
                        None => Some(ping.await),
                    };
                    let failure = match answer {
                        Some(Ok(_)) => None,
                        Some(Err(err)) => Some(err.to_string()),
                        None => Some(format!(
                            "no answer within {:?} (--session-timeout)",
                            answer_within.unwrap_or_default()
                        )),
                    };
                    if let Some(asked) = asked {
                        let _ = asked.send(failure.is_none());
                    }
                    if let Some(error) = failure {
                        // Dropping the connection closes it: the server ends
                        // the session (and the lock) as soon as it reads the
                        // close, or at its idle_session_timeout when the
                        // network is gone.
                        tracing::warn!(slot = %slot, error = %error, "the slot lock's connection failed; the lock is given up");
                        fence.cancel();
                        return;
                    }
                }
                conn.terminate().await;
            }
            .instrument(tracing::info_span!("slot_lock", slot = %cfg.slot))
        });
        Self {
            check,
            stop,
            fence,
            task,
        }
    }

    /// Whether the lock is still held, checked on its connection now.
    async fn still_held(&self) -> bool {
        if self.fence.is_cancelled() {
            return false;
        }
        let (answer, answered) = oneshot::channel();
        if self.check.send(answer).await.is_err() {
            return false;
        }
        answered.await.unwrap_or(false)
    }
}

impl Default for SlotLock {
    fn default() -> Self {
        Self::new()
    }
}

/// The advisory lock key of a slot: a 64-bit hash of a fixed prefix and the
/// slot name, computed by the server (so every instance agrees).
pub fn key(slot: &str) -> String {
    format!(
        "hashtextextended({}, 0)",
        quote_literal(&format!("outbox-relay slot {slot}"))
    )
}

/// Who holds the lock: the backend (pid, digits only, and start time), and a
/// description for the log (pid, application name, client address; visible
/// to the relay's role for its own sessions).
async fn holder(conn: &mut Connection, slot: &str) -> (Option<(String, String)>, String) {
    let sql = format!(
        "SELECT l.pid::text AS pid, a.backend_start::text AS started, \
         coalesce(a.application_name, '') AS app, coalesce(host(a.client_addr), 'local') AS addr \
         FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
         AND ((l.classid::bigint << 32) | l.objid::bigint) = {}",
        key(slot)
    );
    match conn.query(&sql).await {
        Ok(rows) => match rows.first() {
            Some(r) => {
                let pid = r
                    .get("pid")
                    .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
                let backend = pid
                    .zip(r.get("started"))
                    .map(|(p, s)| (p.to_owned(), s.to_owned()));
                let text = format!(
                    "backend pid {} ({} from {})",
                    r.get("pid").unwrap_or("?"),
                    r.get("app").unwrap_or("?"),
                    r.get("addr").unwrap_or("?")
                );
                (backend, text)
            }
            None => (None, "unknown (it may have just been released)".to_owned()),
        },
        Err(err) => (None, format!("unknown ({err})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_computed_by_the_server_from_the_slot_name() {
        assert_eq!(
            key("outbox_relay"),
            "hashtextextended('outbox-relay slot outbox_relay', 0)"
        );
        // Quoting: slot names are validated, but the key must be safe anyway.
        assert!(key("a'b").contains("'outbox-relay slot a''b'"));
    }
}
