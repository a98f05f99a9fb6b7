//! The relay binary as a child process (so tests can SIGTERM and SIGKILL it),
//! built on first use, with its output captured to a file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Path of the `outbox-relay` binary.
pub fn binary() -> PathBuf {
    bin_path("OUTBOX_RELAY_BIN", "outbox-relay")
}

/// Path of the `outbox-bench` binary.
pub fn bench_binary() -> PathBuf {
    bin_path("OUTBOX_BENCH_BIN", "outbox-bench")
}

/// Path of the `outbox-consumer-example` binary.
pub fn consumer_binary() -> PathBuf {
    bin_path("OUTBOX_CONSUMER_BIN", "outbox-consumer-example")
}

/// A workspace binary, unless `env_override` names one. The first call per
/// test run builds every workspace binary the way `scripts/test.sh` does
/// (`--workspace --bins`), so features unify identically and a warm build
/// is a no-op instead of a relink with a different feature set.
fn bin_path(env_override: &str, bin: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env_override) {
        return PathBuf::from(p);
    }
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // The variables cargo sets for this test process (CARGO_PKG_*,
        // CARGO_MANIFEST_DIR, ...) would otherwise reach build scripts and
        // proc macros and make the nested build recompile everything.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            if key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_TARGET_DIR" {
                cmd.env_remove(&key);
            }
        }
        let status = cmd
            .args(["build", "--quiet", "--workspace", "--bins"])
            .current_dir(workspace())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the workspace binaries failed");
        std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| workspace().join("target"))
            .join("debug")
    });
    dir.join(bin)
}

/// The workspace root (this crate's parent folder).
fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-support sits in the workspace")
}

/// Flags for one relay process.
#[derive(Clone)]
pub struct RelayBuilder {
    /// The binary to run; `None`: the workspace's debug build.
    pub binary: Option<PathBuf>,
    pub database_url: String,
    pub brokers: String,
    pub slot: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl RelayBuilder {
    pub fn new(database_url: &str, brokers: &str, slot: &str) -> Self {
        Self {
            binary: None,
            database_url: database_url.to_owned(),
            brokers: brokers.to_owned(),
            slot: slot.to_owned(),
            args: vec![
                "--create-topics".into(),
                "--status-interval".into(),
                "1s".into(),
                "--connect-timeout".into(),
                "5s".into(),
                "--max-backoff".into(),
                "1s".into(),
            ],
            env: vec![("OUTBOX_LOG".into(), "info,outbox_relay=debug".into())],
        }
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args(mut self, args: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Serves the metrics endpoint on 127.0.0.1:`port`.
    pub fn metrics_on(self, port: u16) -> Self {
        self.arg("--metrics-addr").arg(format!("127.0.0.1:{port}"))
    }

    /// Runs this binary instead of the workspace's debug build (the
    /// benchmark runs a release build).
    pub fn binary(mut self, path: &Path) -> Self {
        self.binary = Some(path.to_owned());
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Replaces the default `--create-topics`.
    pub fn without_create_topics(mut self) -> Self {
        self.args.retain(|a| a != "--create-topics");
        self
    }

    pub fn spawn(&self) -> Relay {
        Relay::spawn(self.command())
    }

    /// Spawns the relay and waits until it streams (see
    /// [`Relay::wait_streaming`]).
    pub async fn start(&self) -> Relay {
        let relay = self.spawn();
        relay.wait_streaming().await;
        relay
    }

    /// Like [`spawn`](Self::spawn), with the relay's output on this
    /// process's stderr instead of a file (the benchmark shows warnings as
    /// they happen; `logs()` is then empty).
    pub fn spawn_with_output_shown(&self) -> Relay {
        let mut cmd = self.command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Relay {
            child,
            log_path: None,
            exit: None,
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(self.binary.clone().unwrap_or_else(binary));
        // The relay reads libpq's variables; a test sets them explicitly or
        // not at all, whatever the environment the tests run in.
        for var in [
            "PGHOST",
            "PGPORT",
            "PGDATABASE",
            "PGUSER",
            "PGPASSWORD",
            "PGSSLMODE",
            "PGSSLROOTCERT",
            "PGAPPNAME",
            "PGCONNECT_TIMEOUT",
            "PGREQUIREAUTH",
            "PGCHANNELBINDING",
            // Refused by the relay when set (it does not read them).
            "PGSERVICE",
            "PGSERVICEFILE",
            "PGHOSTADDR",
            "PGSSLCERT",
            "PGSSLKEY",
            "PGSSLCRL",
            "PGPASSFILE",
            "PGSSLCRLDIR",
            "PGREQUIREPEER",
            "PGGSSENCMODE",
            "PGTARGETSESSIONATTRS",
            "PGSSLMINPROTOCOLVERSION",
            "PGSSLNEGOTIATION",
        ] {
            cmd.env_remove(var);
        }
        // An empty URL: the test gives the database another way
        // (--database-url-file).
        if !self.database_url.is_empty() {
            cmd.env("OUTBOX_DATABASE_URL", &self.database_url);
        }
        cmd.arg("run")
            .args(&self.args)
            .env("OUTBOX_KAFKA_BROKERS", &self.brokers)
            .env("OUTBOX_SLOT", &self.slot)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }
}

/// A running child process (the relay, or the example consumer) whose
/// stdout and stderr go to one log file.
pub struct Relay {
    child: Child,
    /// Where the output goes; `None`: to this process's stderr.
    log_path: Option<PathBuf>,
    exit: Option<ExitStatus>,
}

impl Relay {
    /// Starts `cmd` with its output captured.
    pub fn spawn(mut cmd: Command) -> Self {
        let log_path =
            std::env::temp_dir().join(format!("{}.log", crate::unique("outbox-process")));
        let log = std::fs::File::create(&log_path).expect("process log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Relay {
            child,
            log_path: Some(log_path),
            exit: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far.
    pub fn logs(&self) -> String {
        self.log_path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Waits (up to a minute) until the relay logs that it streams from its
    /// slot: the backfill, if any, is done and WAL is being read.
    pub async fn wait_streaming(&self) {
        self.wait_log("streaming", Duration::from_secs(60)).await;
    }

    /// Waits until the output contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.logs().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "relay did not log {needle:?} within {timeout:?}; output:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `needle` occurs at least `count` times in the output (for
    /// a line that an earlier step already logged once).
    pub async fn wait_log_count(&self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.logs().matches(needle).count() < count {
            assert!(
                Instant::now() < deadline,
                "relay did not log {needle:?} {count} times within {timeout:?}; output:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exit {
                return s;
            }
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                self.exit = Some(s);
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "relay did not exit within {timeout:?}; output:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub async fn stop(&mut self) -> ExitStatus {
        self.signal("-TERM");
        self.wait_exit(Duration::from_secs(60)).await
    }

    /// SIGKILL: no chance to flush or confirm anything.
    pub async fn kill9(&mut self) {
        self.signal("-KILL");
        self.wait_exit(Duration::from_secs(10)).await;
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let Some(path) = &self.log_path else {
            return; // The output went to the terminal.
        };
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(path);
        } else {
            eprintln!("--- process output ---\n{}", self.logs());
        }
    }
}
