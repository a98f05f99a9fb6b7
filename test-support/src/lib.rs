//! Test infrastructure shared by the integration tests and the benchmark
//! (dev-only, never published): a private PostgreSQL cluster and a Tansu
//! broker per test, the relay binary as a child process, its metrics
//! endpoint, a Kafka reader, and a per-test fixture that writes events and
//! checks what arrived. Every helper waits on a condition with a deadline
//! instead of sleeping blindly.

pub mod fixture;
pub mod kafka;
pub mod metrics;
pub mod postgres;
pub mod proxy;
pub mod relay;
pub mod tansu;
pub mod tls;

use std::future::Future;
use std::net::TcpListener;
use std::time::{Duration, Instant};

pub use kafka::{Record, consume};
pub use postgres::Postgres;
pub use relay::RelayBuilder;
pub use tansu::Tansu;

/// A free TCP port on 127.0.0.1, never the same one twice in this test
/// process: the port is released before the server that gets it binds it,
/// and tests run in parallel, so a port handed out earlier may still be on
/// its way to its server.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind an ephemeral port")
            .local_addr()
            .expect("local addr")
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// A name unique within this test run, for databases, slots and topics.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Installs a tracing subscriber once, so relay-library logs show in failures.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
