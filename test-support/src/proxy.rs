//! A TCP proxy that can cut every connection through it on command, in both
//! directions at once, to simulate network failures between the relay and
//! PostgreSQL or Kafka.

use std::sync::{Arc, Mutex};

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A running proxy: listens on `port`, forwards to the target port.
pub struct Proxy {
    pub port: u16,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free port (or `port`) and forwards to 127.0.0.1:`target`.
    pub async fn start(port: Option<u16>, target: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port.unwrap_or(0)))
            .await
            .expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let conns = conns.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let handle = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                            let _ = copy_bidirectional(&mut inbound, &mut outbound).await;
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
        }
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
