//! A private PostgreSQL cluster: `initdb` once per test run into a template,
//! copied per test; started with `pg_ctl` on a free port with
//! `wal_level=logical`; stopped and removed on drop. As root, every server
//! command runs as the `postgres` user, since PostgreSQL refuses root.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sqlx::{Connection, PgConnection};

pub const SUPERUSER: &str = "postgres";
pub const PASSWORD: &str = "outbox-test-Secr3t";

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub fn bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Path::new(&dir).join(name);
    }
    for dir in [
        "/usr/lib/postgresql/15/bin",
        "/usr/lib/postgresql/16/bin",
        "/usr/lib/postgresql/17/bin",
    ] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(name)
}

/// Runs a PostgreSQL server program, as the `postgres` user when we are root.
fn pg_command(program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin(program));
        c
    } else {
        Command::new(bin(program))
    }
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_dir(path: &Path) {
    std::fs::create_dir_all(path).expect("create dir");
    if is_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.args(["-R", "postgres:postgres"]).arg(path);
                c
            },
            "chown",
        );
    }
}

/// The initdb'd template, made once per test process.
fn template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("outbox-pg-template-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        make_dir(&root);
        let pwfile = root.join("pwfile");
        std::fs::write(&pwfile, PASSWORD).expect("write pwfile");
        let data = root.join("data");
        let mut cmd = pg_command("initdb");
        cmd.arg("-D")
            .arg(&data)
            .args([
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["postgres:postgres"]).arg(&pwfile);
                    c
                },
                "chown pwfile",
            );
        }
        run(cmd, "initdb");
        data
    })
}

/// Server settings of a test cluster.
#[derive(Clone, Debug)]
pub struct Settings {
    pub wal_level: &'static str,
    pub extra: Vec<(String, String)>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            wal_level: "logical",
            extra: Vec::new(),
        }
    }
}

/// A running private cluster.
pub struct Postgres {
    root: PathBuf,
    data: PathBuf,
    pub port: u16,
    settings: Settings,
}

impl Postgres {
    /// A cluster with `wal_level=logical`.
    pub fn start() -> Self {
        Self::start_with(Settings::default())
    }

    /// A cluster with the given settings.
    pub fn start_with(settings: Settings) -> Self {
        let template = template();
        let root = std::env::temp_dir().join(crate::unique("outbox-pg"));
        make_dir(&root);
        let data = root.join("data");
        run(
            {
                let mut c = Command::new("cp");
                c.arg("-a").arg(template).arg(&data);
                c
            },
            "copy the template cluster",
        );
        let pg = Self {
            root,
            data,
            port: crate::free_port(),
            settings,
        };
        pg.pg_ctl_start();
        pg
    }

    fn options(&self) -> String {
        let mut o = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c wal_level={} \
             -c max_wal_senders=10 -c max_replication_slots=10 -c fsync=off -c wal_sender_timeout=20s",
            self.port,
            self.root.display(),
            self.settings.wal_level
        );
        for (k, v) in &self.settings.extra {
            o.push_str(&format!(" -c {k}={v}"));
        }
        o
    }

    fn pg_ctl_start(&self) {
        let mut cmd = pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-o")
            .arg(self.options())
            .arg("-l")
            .arg(self.root.join("postgres.log"))
            .args(["-w", "-t", "60", "start"]);
        run(cmd, "pg_ctl start");
    }

    /// `pg_ctl restart -m <mode>`.
    pub fn restart(&self, mode: &str) {
        let mut cmd = pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "-t", "60", "stop"]);
        run(cmd, "pg_ctl stop");
        self.pg_ctl_start();
    }

    /// Replaces `pg_hba.conf` with `lines` and reloads the server. The file
    /// is written by the server's owner (`runuser` when we are root).
    pub fn set_hba(&self, lines: &str) {
        let path = self.data.join("pg_hba.conf");
        let mut tee = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "tee"]);
            c
        } else {
            Command::new("tee")
        };
        let mut child = tee
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run tee");
        std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), lines.as_bytes())
            .expect("write pg_hba.conf");
        drop(child.stdin.take());
        assert!(child.wait().expect("tee").success(), "writing pg_hba.conf");
        let mut cmd = pg_command("pg_ctl");
        cmd.arg("-D").arg(&self.data).arg("reload");
        run(cmd, "pg_ctl reload");
    }

    /// URL of a database, with password, over TCP.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{PASSWORD}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// URL of a database over the cluster's Unix socket (local connections
    /// are trusted, so no password), in libpq's `host=<directory>` form.
    pub fn socket_url(&self, db: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@/{db}?host={}&port={}",
            self.root.display(),
            self.port
        )
    }

    /// Creates an empty database.
    pub async fn create_database(&self, name: &str) -> String {
        let mut conn = PgConnection::connect(&self.url("postgres"))
            .await
            .expect("connect");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .expect("create database");
        self.url(name)
    }

    /// Creates a database and applies the outbox migrations to it.
    pub async fn create_migrated_database(&self, name: &str) -> String {
        let url = self.create_database(name).await;
        let pool = sqlx::PgPool::connect(&url).await.expect("connect");
        outbox::MIGRATOR.run(&pool).await.expect("migrations");
        pool.close().await;
        url
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut cmd = pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = cmd.output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A slot's `confirmed_flush_lsn` as text, or `None` when the slot is missing.
pub async fn confirmed_flush(url: &str, slot: &str) -> Option<String> {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query_scalar::<_, Option<String>>(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(&mut conn)
    .await
    .expect("query slot")
    .flatten()
}

/// Whether `a` is a later WAL position than `b` (both `X/Y` text).
pub async fn lsn_after(url: &str, a: &str, b: &str) -> bool {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query_scalar::<_, bool>("SELECT $1::pg_lsn > $2::pg_lsn")
        .bind(a)
        .bind(b)
        .fetch_one(&mut conn)
        .await
        .expect("compare lsn")
}

/// Waits until the relay on `slot` has recorded the newest outbox row as its
/// last delivered event (it writes `outbox_relay_slot` every
/// `--status-interval`, which is WAL of its own): take a WAL mark after this,
/// so that no write of the relay's lands between the mark and the rows a
/// test writes next.
pub async fn wait_recorded(pool: &sqlx::PgPool, slot: &str) {
    crate::wait_for(
        "the relay to record its last delivered event",
        std::time::Duration::from_secs(30),
        || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT coalesce((SELECT last_event_id FROM outbox_relay_slot WHERE slot_name = $1) \
                 = (SELECT id::text FROM outbox ORDER BY seq DESC LIMIT 1), false)",
            )
            .bind(slot)
            .fetch_one(pool)
            .await
            .ok()
            .filter(|done| *done)
        },
    )
    .await;
}
