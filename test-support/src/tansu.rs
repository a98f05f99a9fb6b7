//! A Tansu broker process (a Kafka-protocol broker written in Rust) on a free
//! port, with in-memory or SQLite storage; killed on drop. Installed by
//! `scripts/install-tansu.sh`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return PathBuf::from(p);
    }
    let cached = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".cache/outbox-relay/tansu-0.6.0/bin/tansu");
    if cached.exists() {
        return cached;
    }
    PathBuf::from("tansu")
}

/// A running broker.
pub struct Tansu {
    child: Option<Child>,
    /// Set when `OUTBOX_TEST_BROKER=mock`: librdkafka's in-process mock
    /// cluster instead of Tansu, for a quick local run without the Tansu
    /// install. CI always uses Tansu.
    mock: Option<rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
    pub port: u16,
    dir: PathBuf,
    storage: String,
    advertised_port: u16,
    authentication: bool,
}

impl Tansu {
    /// A broker with in-memory storage.
    pub fn start() -> Self {
        Self::launch("memory://tansu/", None)
    }

    /// A broker that keeps its data in a SQLite file, surviving restarts.
    pub fn start_durable() -> Self {
        Self::launch("sqlite://tansu.db", None)
    }

    /// A broker on its own port that tells clients to connect to
    /// `advertised_port` instead (where a test proxy forwards to it).
    pub fn start_advertising(advertised_port: u16) -> Self {
        Self::launch("memory://tansu/", Some(advertised_port))
    }

    /// A broker that requires SASL authentication (`--authentication`),
    /// knowing `users` (name, password) with SCRAM-SHA-256 credentials.
    /// Tansu keeps users in its storage, so they are created through a
    /// first, open broker on a SQLite file, which is then restarted with
    /// authentication on. Advertises `advertised_port` when given (a TLS
    /// terminator in front of it: SASL_SSL).
    pub fn start_authenticated(users: &[(&str, &str)], advertised_port: Option<u16>) -> Self {
        let mut t = Self::launch("sqlite://tansu.db", advertised_port);
        for (name, password) in users {
            let out = Command::new(binary())
                .args(["user", "create", "--mechanism", "scram256", "--broker"])
                .arg(format!("tcp://127.0.0.1:{}", t.port))
                .args([name, password])
                .output()
                .expect("run tansu user create");
            assert!(
                out.status.success(),
                "tansu user create {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        t.authentication = true;
        t.restart();
        t
    }

    fn launch(storage: &str, advertised_port: Option<u16>) -> Self {
        let storage = storage.to_owned();
        if std::env::var("OUTBOX_TEST_BROKER").as_deref() == Ok("mock") && advertised_port.is_none()
        {
            let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
            let port = mock
                .bootstrap_servers()
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("mock cluster port");
            return Self {
                child: None,
                mock: Some(mock),
                port,
                dir: std::env::temp_dir(),
                storage,
                advertised_port: port,
                authentication: false,
            };
        }
        let dir = std::env::temp_dir().join(crate::unique("outbox-tansu"));
        std::fs::create_dir_all(&dir).expect("tansu dir");
        let port = crate::free_port();
        let advertised_port = advertised_port.unwrap_or(port);
        let mut t = Self {
            child: None,
            mock: None,
            port,
            dir,
            storage,
            advertised_port,
            authentication: false,
        };
        t.child = Some(t.spawn());
        t.wait_ready();
        t
    }

    fn spawn(&self) -> Child {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .expect("tansu log");
        Command::new(binary())
            .current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", &self.storage])
            .args(self.authentication.then_some("--authentication"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start the tansu broker ({}): {e}; run scripts/install-tansu.sh",
                    binary().display()
                )
            })
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {} within 30s; log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The broker's process id (none for the mock cluster or a stopped broker).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Bootstrap servers for clients.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker (SIGKILL).
    pub fn stop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) {
        assert!(self.mock.is_none(), "the mock cluster cannot be restarted");
        self.stop();
        self.child = Some(self.spawn());
        self.wait_ready();
    }

    /// The broker's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tansu.log")).unwrap_or_default()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
        if self.mock.is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
