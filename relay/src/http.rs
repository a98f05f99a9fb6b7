//! The HTTP endpoint on `--metrics-addr`: `GET /metrics` in the OpenMetrics
//! text format, `GET /healthz` (the process serves: 200) and `GET /readyz`
//! (200 while streaming, 503 naming the state otherwise). Everything else
//! is a 404 that names what is served.
//!
//! The accept loop is ours (axum routes, hyper serves each connection) so
//! that whoever can reach the port cannot take the endpoint away: at most
//! [`Limits::max_connections`] connections are open at once (more are
//! closed at once), a connection that does not send its request headers in
//! time is closed, no connection lives longer than a bound, and an accept
//! error (out of file descriptors, say) is logged and retried, never the
//! end of the endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The content type of the OpenMetrics text format, which Prometheus asks for.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What one client may hold of the endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; beyond it new ones are closed unanswered.
    pub max_connections: usize,
    /// Time to send a request's headers (also the idle time allowed between
    /// requests on a kept-alive connection).
    pub header_timeout: Duration,
    /// The longest a connection stays open, kept alive or not.
    pub lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        // 256 connections stay well inside the usual 1,024 descriptors; a
        // scrape takes milliseconds and Prometheus keeps one connection.
        Self {
            max_connections: 256,
            header_timeout: Duration::from_secs(5),
            lifetime: Duration::from_secs(60),
        }
    }
}

/// Serves the endpoint on `addr` until `token` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    token: CancellationToken,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %addr, "serving metrics at /metrics");
    serve_on(listener, metrics, token, Limits::default()).await;
    Ok(())
}

/// Serves on a bound listener with `limits` until `token` is cancelled.
pub async fn serve_on(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    token: CancellationToken,
    limits: Limits,
) {
    let service = TowerToHyperService::new(router(metrics));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut conns = JoinSet::new();
    loop {
        let stream = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // EMFILE and friends pass when connections close; a
                    // short pause keeps this from spinning meanwhile.
                    tracing::warn!(error = %err, "accepting a metrics connection failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(
                max_connections = limits.max_connections,
                "metrics endpoint at its connection limit; closing a new connection"
            );
            drop(stream);
            continue;
        };
        let service = service.clone();
        conns.spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            // hyper's defaults let one connection buffer ~400 KiB of
            // headers; a scrape needs a few hundred bytes.
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(8192)
                .max_headers(32);
            let conn = http.serve_connection(TokioIo::new(stream), service);
            // A timeout (the lifetime) drops the connection: closed.
            if let Ok(Err(err)) = tokio::time::timeout(limits.lifetime, conn).await {
                tracing::debug!(error = %err, "metrics connection ended");
            }
            drop(slot);
        });
    }
    conns.shutdown().await;
}

fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "try GET /metrics, /healthz or /readyz\n",
            )
        })
        .with_state(metrics)
}

/// 200 while streaming; 503 otherwise, saying what the relay does instead
/// (a standby waiting for the slot lock is alive but not ready).
async fn ready(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    use crate::metrics::RelayState;
    let state = metrics.state();
    let why = match state {
        RelayState::Streaming => return (StatusCode::OK, "streaming\n".to_owned()),
        RelayState::WaitingForLock => {
            "standby: another instance works the slot, or the lock is being taken"
        }
        RelayState::Starting => "starting: checking or creating the slot",
        RelayState::Backfilling => {
            "publishing the rows already in the outbox before streaming (see outbox_relay_backfill_seq)"
        }
        RelayState::Reconnecting => "reconnecting after a failure (see the log)",
        RelayState::Stopping => "stopping",
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{}: {why}\n", state.as_str()),
    )
}

async fn render(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS)], metrics.render())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn start(limits: Limits) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        tokio::spawn(serve_on(listener, Metrics::new(), token.clone(), limits));
        (addr, token)
    }

    async fn scrape(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// Reads until the server closes the connection; how long it took.
    async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(limit, s.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn idle_connections_are_closed_and_do_not_block_a_scrape() {
        let limits = Limits {
            max_connections: 8,
            header_timeout: Duration::from_millis(300),
            lifetime: Duration::from_secs(60),
        };
        let (addr, token) = start(limits).await;
        // Fill every slot with connections that never send a byte.
        let mut idle = Vec::new();
        for _ in 0..8 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // One more is closed at once: over the limit.
        let mut extra = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut extra, Duration::from_secs(2)).await);
        // The idle ones are closed once the header timeout passes...
        for s in &mut idle {
            assert!(closed_within(s, Duration::from_secs(5)).await);
        }
        // ...and the endpoint answers again.
        let answer = scrape(addr).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("outbox_relay_"), "{answer}");
        token.cancel();
    }

    #[tokio::test]
    async fn a_connection_that_trickles_forever_is_cut_at_its_lifetime() {
        let limits = Limits {
            max_connections: 8,
            header_timeout: Duration::from_secs(60),
            lifetime: Duration::from_millis(500),
        };
        let (addr, token) = start(limits).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(5)).await);
        token.cancel();
    }
}
