//! A stop's time budget: one `--shutdown-timeout`, counted from the stop
//! request and shared by every step of the stop (reading on to the open
//! transaction's commit, waiting for Kafka's acknowledgements, flushing the
//! producer, the last bookkeeping write), so the process exits about one
//! timeout after SIGTERM, not the sum of the steps' timeouts: an
//! orchestrator's grace period (Kubernetes' default 30 s, the relay's
//! default timeout) ends in SIGKILL otherwise.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// The budget of the stop `token` requests.
#[derive(Debug, Clone)]
pub struct Grace {
    /// The stop request.
    token: CancellationToken,
    timeout: Duration,
    deadline: Arc<OnceLock<Instant>>,
    /// Cancelled half the budget after the stop request: ends waits for
    /// room in librdkafka's buffer (a stop inside a transaction reads on to
    /// its commit for that long, which may need the buffer).
    hand_over: CancellationToken,
}

impl Grace {
    /// Starts watching `token`. Call from within the runtime.
    pub fn watch(token: &CancellationToken, timeout: Duration) -> Self {
        let grace = Self {
            token: token.clone(),
            timeout,
            deadline: Arc::new(OnceLock::new()),
            hand_over: CancellationToken::new(),
        };
        let (token, watched) = (token.clone(), grace.clone());
        tokio::spawn(async move {
            token.cancelled().await;
            watched.requested();
            tokio::time::sleep(timeout / 2).await;
            watched.hand_over.cancel();
        });
        grace
    }

    /// The stop was requested now (a later call keeps the first deadline).
    fn requested(&self) {
        let _ = self.deadline.set(Instant::now() + self.timeout);
    }

    /// What is left of the budget: the whole timeout before a stop was
    /// requested (a step that waits only while stopping), nothing once it is
    /// spent.
    pub fn left(&self) -> Duration {
        // The watching task may not have run yet (another thread of a
        // multi-thread runtime got here first): the request counts from now.
        if self.token.is_cancelled() {
            self.requested();
        }
        match self.deadline.get() {
            Some(deadline) => deadline.saturating_duration_since(Instant::now()),
            None => self.timeout,
        }
    }

    /// What is left of the budget, but a second at least: for the stop's
    /// last words to PostgreSQL (the final position, the last bookkeeping
    /// write), which are worth a second even after Kafka spent the budget.
    pub fn left_for_last_words(&self) -> Duration {
        self.left().max(Duration::from_secs(1))
    }

    /// The whole budget, for messages.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Cancelled half the budget after the stop request.
    pub fn hand_over(&self) -> &CancellationToken {
        &self.hand_over
    }

    /// What is left of the first half of the budget, for reading on to an
    /// open transaction's commit: half the timeout from the stop request,
    /// however late the reader notices it.
    pub fn first_half_left(&self) -> Duration {
        self.left().saturating_sub(self.timeout / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_budget_counts_from_the_stop_request_and_runs_out() {
        let token = CancellationToken::new();
        let grace = Grace::watch(&token, Duration::from_secs(30));
        assert_eq!(grace.left(), Duration::from_secs(30), "no stop yet");
        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), async {
            while grace.left() == Duration::from_secs(30) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the stop request starts the clock");
        let left = grace.left();
        assert!(left > Duration::from_secs(25), "{left:?}");
        let half = grace.first_half_left();
        assert!(
            half <= Duration::from_secs(15) && half > Duration::from_secs(10),
            "{half:?}"
        );
        assert!(
            !grace.hand_over().is_cancelled(),
            "half the budget is not spent"
        );

        let token = CancellationToken::new();
        let grace = Grace::watch(&token, Duration::from_millis(200));
        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), grace.hand_over().cancelled())
            .await
            .expect("handed over half the budget after the stop");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(grace.left(), Duration::ZERO, "spent");
        grace.requested();
        assert_eq!(
            grace.left(),
            Duration::ZERO,
            "a later request keeps the first deadline"
        );
        assert_eq!(grace.first_half_left(), Duration::ZERO);
    }

    /// On a multi-thread runtime a stop path can ask before the watching
    /// task ran: the budget counts from that moment, not from never.
    #[test]
    fn a_cancelled_token_starts_the_clock_without_its_watcher() {
        let token = CancellationToken::new();
        let grace = Grace {
            token: token.clone(),
            timeout: Duration::from_secs(30),
            deadline: Arc::new(OnceLock::new()),
            hand_over: CancellationToken::new(),
        };
        token.cancel();
        let first = grace.left();
        std::thread::sleep(Duration::from_millis(20));
        assert!(grace.left() < first, "the clock runs");
    }
}
