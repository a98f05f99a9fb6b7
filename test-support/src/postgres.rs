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

/// Writes a file in a data directory as the server's owner (`runuser` when
/// we are root), replacing it.
fn write_as_server(path: &Path, contents: &str) {
    let mut tee = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "tee"]);
        c
    } else {
        Command::new("tee")
    };
    let mut child = tee
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run tee");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), contents.as_bytes())
        .expect("write a server file");
    drop(child.stdin.take());
    assert!(
        child.wait().expect("tee").success(),
        "writing {}",
        path.display()
    );
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
        write_as_server(&self.data.join("pg_hba.conf"), lines);
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

    /// The server's major version (15, 16, ...), from `postgres --version`.
    pub fn major_version() -> u32 {
        let out = Command::new(bin("postgres"))
            .arg("--version")
            .output()
            .expect("run postgres --version");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .find_map(|w| w.split('.').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no version in `{text}`"))
    }

    /// Stops the server (`pg_ctl stop -m <mode>`: `immediate` is a crash).
    pub fn stop(&self, mode: &str) {
        let mut cmd = pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "-t", "60", "stop"]);
        run(cmd, "pg_ctl stop");
    }

    /// Promotes a standby to primary (`pg_ctl promote`, waiting for it).
    pub fn promote(&self) {
        let mut cmd = pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "60", "promote"]);
        run(cmd, "pg_ctl promote");
    }

    /// Starts a physical streaming standby of this cluster. There is no
    /// `pg_basebackup` among the npm binaries, so the standby is a copy of
    /// this cluster's data directory taken while it is cleanly stopped
    /// (every file consistent at its shutdown checkpoint). The standby
    /// streams through the physical slot `physical_slot` (created here) with
    /// `hot_standby_feedback` on; `primary_extra` is added to this
    /// cluster's settings and `standby_extra` to the standby's (for
    /// example `synchronized_standby_slots` and `sync_replication_slots`).
    /// `primary_conninfo` names database `db`, which slot synchronization
    /// needs, and port `via` (a proxy in front of this cluster) when given.
    pub async fn start_standby(
        &mut self,
        physical_slot: &str,
        db: &str,
        via: Option<u16>,
        primary_extra: &[(&str, &str)],
        standby_extra: &[(&str, &str)],
    ) -> Postgres {
        let mut conn = PgConnection::connect(&self.url("postgres"))
            .await
            .expect("connect");
        sqlx::query("SELECT pg_create_physical_replication_slot($1, true)")
            .bind(physical_slot)
            .execute(&mut conn)
            .await
            .expect("create the standby's physical slot");
        drop(conn);
        self.stop("fast");
        let root = std::env::temp_dir().join(crate::unique("outbox-pg"));
        make_dir(&root);
        let data = root.join("data");
        let mut cp = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "cp"]);
            c
        } else {
            Command::new("cp")
        };
        cp.arg("-a").arg(&self.data).arg(&data);
        run(cp, "copy the primary's data directory");
        // The primary's slots are its own: a logical slot copied here would
        // block the synchronized one, and a copied physical slot would pin WAL.
        for entry in std::fs::read_dir(data.join("pg_replslot")).expect("pg_replslot") {
            std::fs::remove_dir_all(entry.expect("entry").path()).expect("remove a copied slot");
        }
        for (k, v) in primary_extra {
            self.settings.extra.push((k.to_string(), v.to_string()));
        }
        self.pg_ctl_start();
        let conninfo = format!(
            "host=127.0.0.1 port={} user={SUPERUSER} password={PASSWORD} dbname={db} application_name=standby",
            via.unwrap_or(self.port)
        );
        // postgresql.auto.conf rather than `-c`: the conninfo has spaces.
        let mut auto =
            std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap_or_default();
        auto.push_str(&format!(
            "primary_conninfo = '{conninfo}'\nprimary_slot_name = '{physical_slot}'\nhot_standby_feedback = on\n"
        ));
        write_as_server(&data.join("postgresql.auto.conf"), &auto);
        write_as_server(&data.join("standby.signal"), "");
        let mut settings = self.settings.clone();
        settings.extra = standby_extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let standby = Postgres {
            root,
            data,
            port: crate::free_port(),
            settings,
        };
        standby.pg_ctl_start();
        standby
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
