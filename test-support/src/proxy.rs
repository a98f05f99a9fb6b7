//! A TCP proxy that can cut every connection through it on command, in both
//! directions at once, to simulate network failures between the relay and
//! PostgreSQL or Kafka; or freeze them: nothing is forwarded any more and
//! nothing is closed, as when a host vanishes (powered off, partitioned)
//! and its peers only learn it from their own timeouts; or take the far
//! side down: every connection is closed, new ones included, until it comes
//! back up at the same address (a broker restart, without the re-bind of
//! librdkafka's mock cluster, which aborts the process when the port is
//! taken meanwhile).

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A running proxy: listens on `port`, forwards to the target port.
pub struct Proxy {
    pub port: u16,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
    frozen: watch::Sender<bool>,
    down: watch::Sender<bool>,
    target: Arc<AtomicU16>,
}

impl Proxy {
    /// Listens on a free port (or `port`) and forwards to 127.0.0.1:`target`.
    pub async fn start(port: Option<u16>, target: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port.unwrap_or(0)))
            .await
            .expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (frozen, _) = watch::channel(false);
        let (down, _) = watch::channel(false);
        let target = Arc::new(AtomicU16::new(target));
        let accept = tokio::spawn({
            let conns = conns.clone();
            let frozen = frozen.clone();
            let down = down.clone();
            let target = target.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let mut frozen = frozen.subscribe();
                    let mut down = down.subscribe();
                    let target = target.load(Ordering::SeqCst);
                    let handle = tokio::spawn(async move {
                        if *down.borrow() {
                            // Closed at once: the client sees the broker gone.
                            return;
                        }
                        let frozen_now = *frozen.borrow();
                        if frozen_now {
                            // A vanished host does not refuse connections:
                            // they hang.
                            std::future::pending::<()>().await;
                        }
                        if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                            let froze = tokio::select! {
                                _ = copy_bidirectional(&mut inbound, &mut outbound) => false,
                                froze = frozen.wait_for(|f| *f) => froze.is_ok(),
                                // Watched here too, not only cut by `down()`:
                                // a connection accepted while it ran may not
                                // be in the list yet. Returning drops (closes)
                                // both sockets.
                                _ = down.wait_for(|d| *d) => return,
                            };
                            if froze {
                                // Both sockets stay open, unread and unwritten,
                                // until the connection is cut or the proxy dropped.
                                std::future::pending::<()>().await;
                            }
                        }
                    });
                    conns.lock().unwrap().push(handle);
                }
            }
        });
        Self {
            port,
            conns,
            accept,
            frozen,
            down,
            target,
        }
    }

    /// Sends new connections to `port` from now on (a DNS switch after a
    /// failover); open ones are left as they are.
    pub fn retarget(&self, port: u16) {
        self.target.store(port, Ordering::SeqCst);
    }

    /// Stops forwarding on every connection, open or new, without closing
    /// any: the peers see silence, not a reset.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Takes the far side down: closes every open connection, and every new
    /// one as soon as it is accepted, until [`up`](Self::up). The listener
    /// stays bound, so the address is the same when it comes back.
    pub fn down(&self) {
        self.down.send_replace(true);
        self.cut();
    }

    /// Forwards new connections again after [`down`](Self::down).
    pub fn up(&self) {
        self.down.send_replace(false);
    }

    /// How many connections through the proxy are open.
    pub fn live(&self) -> usize {
        let conns = self.conns.lock().unwrap();
        conns.iter().filter(|h| !h.is_finished()).count()
    }

    /// Drops every open connection: both peers see the connection reset.
    pub fn cut(&self) -> usize {
        let mut conns = self.conns.lock().unwrap();
        let n = conns.iter().filter(|h| !h.is_finished()).count();
        for h in conns.drain(..) {
            h.abort();
        }
        n
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
