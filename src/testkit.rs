//! Throwaway PostgreSQL clusters for tests, benchmarks and `pgvalve demo`.
//!
//! Beside the flow. [`TestPostgres::start`] finds the PostgreSQL binaries
//! ([`PgOptions::bindir`], else `PGVALVE_PG_BINDIR`, else `pg_config --bindir`, else the newest
//! `/usr/lib/postgresql/*/bin`; [`pg18_bindir`] finds PostgreSQL 18's for the protocol 3.2
//! tests), runs `initdb` into a temp dir and `pg_ctl start -w` on a free
//! loopback port, then creates an application role and database. As root (initdb refuses
//! root) every PostgreSQL command runs as the `postgres` system user (or `nobody`). The
//! cluster is stopped and deleted on drop; if the thread is panicking, the tail of the
//! server log is printed first.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context};
use tokio_postgres::NoTls;

use crate::config::{parse_toml, FileConfig};

/// How PostgreSQL authenticates TCP clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostAuth {
    /// scram-sha-256 (PostgreSQL's default).
    Scram,
    /// md5, with the application role's password stored as MD5.
    Md5,
    /// trust.
    Trust,
}

/// What cluster to start.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `max_connections`.
    pub max_connections: u32,
    /// Application role (owner of `database`).
    pub user: String,
    /// Its password.
    pub password: String,
    /// Application database.
    pub database: String,
    /// TCP authentication method.
    pub host_auth: HostAuth,
    /// `ssl = on` with this certificate and key (PEM), when set.
    pub tls: Option<TlsFiles>,
    /// The server binaries to use (e.g. [`pg18_bindir`]); None: [`find_bindir`].
    pub bindir: Option<PathBuf>,
}

/// A server certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate (chain).
    pub cert_pem: String,
    /// Private key.
    pub key_pem: String,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            max_connections: 50,
            user: "app".into(),
            password: "app-secret".into(),
            database: "app".into(),
            host_auth: HostAuth::Scram,
            tls: None,
            bindir: None,
        }
    }
}

/// Superuser password of every test cluster (reachable only on loopback, for minutes).
pub(crate) const SUPERUSER_PASSWORD: &str = "pgvalve-test-superuser";

/// A running throwaway cluster.
#[derive(Debug)]
pub struct TestPostgres {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    run_as: Option<(u32, u32)>,
    port: u16,
    /// What it was started with.
    pub opts: PgOptions,
}

/// Finds a directory with `initdb`, `pg_ctl` and `postgres`.
///
/// # Errors
/// When none is found, with how to install PostgreSQL.
pub fn find_bindir() -> anyhow::Result<PathBuf> {
    let has = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Ok(d) = std::env::var("PGVALVE_PG_BINDIR") {
        let d = PathBuf::from(d);
        return if has(&d) {
            Ok(d)
        } else {
            bail!("PGVALVE_PG_BINDIR={} has no initdb/pg_ctl", d.display())
        };
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has(&d) {
            return Ok(d);
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, d)| has(d))
        .collect();
    found.sort();
    found.pop().map(|(_, d)| d).ok_or_else(|| {
        anyhow!("no PostgreSQL server binaries found (initdb, pg_ctl). Install them, e.g. `apt-get install -y postgresql`, or set PGVALVE_PG_BINDIR to their directory")
    })
}

/// PostgreSQL 18's server binaries, for the protocol 3.2 tests: `PGVALVE_PG18_BINDIR`, else
/// `target/pg18/package/native/bin` as `tests/pg18.sh` installs it. None when neither has
/// `initdb` and `pg_ctl` (the tests then say so and skip).
pub fn pg18_bindir() -> Option<PathBuf> {
    let has = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    match std::env::var_os("PGVALVE_PG18_BINDIR") {
        Some(d) => Some(PathBuf::from(d)),
        None => Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pg18/package/native/bin")),
    }
    .filter(|d| has(d))
    // Resolved (target/pg18 may link elsewhere): PostgreSQL may run as another user, who can
    // reach the real directory but not necessarily the checkout.
    .map(|d| std::fs::canonicalize(&d).unwrap_or(d))
}

/// The uid/gid to run PostgreSQL as when we are root.
fn unprivileged_user() -> anyhow::Result<Option<(u32, u32)>> {
    if std::fs::metadata("/proc/self")?.uid() != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    for wanted in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() > 3 && f[0] == wanted {
                return Ok(Some((f[2].parse()?, f[3].parse()?)));
            }
        }
    }
    bail!("running as root and neither a `postgres` nor a `nobody` user exists to run PostgreSQL as")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl TestPostgres {
    /// Starts a cluster and creates the application role and database.
    ///
    /// # Errors
    /// Missing binaries (with install instructions), initdb or start failures (with the log).
    pub async fn start(opts: PgOptions) -> anyhow::Result<TestPostgres> {
        let pg = tokio::task::spawn_blocking(move || Self::start_blocking(opts)).await??;
        pg.create_app_role().await?;
        Ok(pg)
    }

    fn command(&self, program: &str) -> Command {
        command_as(&self.bindir, self.run_as, self.dir.path(), program)
    }

    fn start_blocking(opts: PgOptions) -> anyhow::Result<TestPostgres> {
        let bindir = match &opts.bindir {
            Some(d) => d.clone(),
            None => find_bindir()?,
        };
        let run_as = unprivileged_user()?;
        let dir = tempfile::Builder::new().prefix("pgvalve-pg-").tempdir()?;
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD)?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid))?;
        }
        let auth = match opts.host_auth {
            HostAuth::Scram => "scram-sha-256",
            HostAuth::Md5 => "md5",
            HostAuth::Trust => "trust",
        };
        let mut pg = TestPostgres {
            dir,
            bindir,
            run_as,
            port: 0,
            opts,
        };
        let out = pg
            .command("initdb")
            .args([
                "-D",
                "data",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--auth-local=trust",
            ])
            .arg(format!("--auth-host={auth}"))
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if let Some(t) = &pg.opts.tls {
            pg.write_tls(t)?;
        }
        for attempt in 0..5 {
            pg.port = free_port()?;
            match pg.pg_ctl_start() {
                Ok(()) => return Ok(pg),
                Err(e) if attempt < 4 && pg.log_tail(20).contains("could not bind") => {
                    tracing::debug!(error = %e, "port taken, retrying");
                }
                Err(e) => return Err(e.context(pg.log_tail(30))),
            }
        }
        unreachable!("the loop returns on its last attempt")
    }

    /// Writes the certificate and key into the data directory (the key readable by the server's
    /// user only, as PostgreSQL insists).
    fn write_tls(&self, t: &TlsFiles) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let data = self.dir.path().join("data");
        for (name, pem, mode) in [("server.crt", &t.cert_pem, 0o644), ("server.key", &t.key_pem, 0o600)] {
            let path = data.join(name);
            std::fs::write(&path, pem)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            if let Some((uid, gid)) = self.run_as {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
            }
        }
        Ok(())
    }

    fn pg_ctl_start(&self) -> anyhow::Result<()> {
        let ssl = if self.opts.tls.is_some() { " -c ssl=on" } else { "" };
        let o = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections={} -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=32MB -c log_line_prefix='%m [%p] %e '{ssl}",
            self.port,
            self.dir.path().display(),
            self.opts.max_connections
        );
        let out = self
            .command("pg_ctl")
            .args(["-D", "data", "-l", "postgres.log", "-w", "-t", "60", "-o", &o, "start"])
            .output()?;
        if !out.status.success() {
            bail!("pg_ctl start failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    async fn create_app_role(&self) -> anyhow::Result<()> {
        let su = self.superuser().await?;
        let o = &self.opts;
        if o.host_auth == HostAuth::Md5 {
            su.batch_execute("SET password_encryption = 'md5'").await?;
        }
        su.batch_execute(&format!(
            "CREATE ROLE \"{}\" LOGIN PASSWORD {}",
            o.user,
            crate::server::quote_literal(&o.password)
        ))
        .await?;
        su.batch_execute(&format!("CREATE DATABASE \"{}\" OWNER \"{}\"", o.database, o.user))
            .await?;
        Ok(())
    }

    /// The directory of the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://user:password@127.0.0.1:port/database` for the application role.
    pub fn url(&self) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            self.opts.user, self.opts.password, self.port, self.opts.database
        )
    }

    /// A connected superuser client (over TCP), its connection task spawned.
    ///
    /// # Errors
    /// Connection failure.
    pub async fn superuser(&self) -> anyhow::Result<tokio_postgres::Client> {
        let url = format!(
            "postgres://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{}/postgres",
            self.port
        );
        let (client, conn) = tokio_postgres::connect(&url, NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// A proxy config routing `opts.database` for `opts.user` to this cluster, listening on
    /// an ephemeral port; tests adjust it before [`Config::validate`].
    pub fn file_config(&self) -> FileConfig {
        let o = &self.opts;
        let text = format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[databases.{db}]\nhost = \"127.0.0.1\"\nport = {port}\n[users.{user}]\npassword = {pw}\n",
            db = toml_key(&o.database),
            port = self.port,
            user = toml_key(&o.user),
            pw = toml_str(&o.password),
        );
        parse_toml("testkit", &text).expect("invariant: the testkit writes valid TOML")
    }

    /// Restarts the server: `pg_ctl stop -m fast`, then the same start as at first (with the
    /// log file, so no pipe of ours is inherited by the new postmaster). Needs the
    /// multi-threaded runtime (it blocks in place).
    ///
    /// # Errors
    /// pg_ctl failure.
    pub async fn restart(&self) -> anyhow::Result<()> {
        let mut cmd = self.command("pg_ctl");
        cmd.args(["-D", "data", "-w", "-m", "fast", "stop"]);
        let out = tokio::task::block_in_place(|| cmd.output())?;
        if !out.status.success() {
            bail!("pg_ctl stop failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        tokio::task::block_in_place(|| self.pg_ctl_start())
    }

    /// The last `n` lines of the server log.
    pub(crate) fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let mut out = String::new();
        for l in &lines[lines.len().saturating_sub(n)..] {
            let _ = writeln!(out, "{l}");
        }
        out
    }
}

fn toml_key(s: &str) -> String {
    toml_str(s)
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn command_as(bindir: &Path, run_as: Option<(u32, u32)>, dir: &Path, program: &str) -> Command {
    let mut c = Command::new(bindir.join(program));
    c.current_dir(dir).env("LC_ALL", "C").env_remove("PGDATA");
    if let Some((uid, gid)) = run_as {
        c.uid(uid).gid(gid);
    }
    c
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- PostgreSQL log (port {}) ----\n{}", self.port, self.log_tail(40));
        }
        let _ = command_as(&self.bindir, self.run_as, self.dir.path(), "pg_ctl")
            .args(["-D", "data", "-w", "-m", "immediate", "stop"])
            .output();
    }
}
