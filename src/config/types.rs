//! The configuration file's sections, as serde reads them: every struct denies unknown
//! fields, durations are strings such as "5s", sizes are bytes or strings such as "64MiB".
//!
//! Part of config: [`super::load`] parses these, [`super::Config::validate`] checks them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

// The typed values settings are written in: secrets, sizes, address ranges.
#[path = "types_values.rs"]
mod values;
pub use values::{ByteSize, Cidrs, Secret};

/// Pool mode: how long a client keeps a server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    /// The client keeps its server connection until it disconnects.
    #[default]
    Session,
    /// The client holds a server connection only for one transaction.
    Transaction,
}

impl fmt::Display for PoolMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        })
    }
}

/// Transaction mode: what happens to a statement that changes session state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatePolicy {
    /// The session keeps its server connection until it disconnects (then it is reset).
    #[default]
    Pin,
    /// The statement fails with 0A000 and a hint (use SET LOCAL, or a session-mode pool).
    Reject,
}

/// How clients authenticate to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum AuthType {
    /// SCRAM-SHA-256 against the user's verifier.
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// No password (local setups only).
    #[serde(rename = "trust")]
    Trust,
    /// MD5 against the user's md5 verifier, SCRAM-SHA-256 for a user with only a SCRAM
    /// verifier (PostgreSQL's and PgBouncer's `md5`); the same as an hba_file `md5` line for
    /// every client.
    #[serde(rename = "md5")]
    Md5,
    /// A TLS client certificate signed by `[tls] client_tls_ca_file` whose CN is the user
    /// (PgBouncer's `cert`); the same as an hba_file `hostssl ... cert` line for every client.
    #[serde(rename = "cert")]
    Cert,
}

/// `[proxy]`: the listener and the client side.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySettings {
    /// Address clients connect to. Needs a restart to change.
    pub listen: String,
    /// Client connections admitted at once; the next one gets FATAL 53300 at once.
    pub max_client_connections: u32,
    /// Time a client has to finish startup and authentication.
    #[serde(with = "humantime_serde")]
    pub client_login_timeout: Duration,
    /// How clients authenticate: "scram-sha-256", "md5", "cert" or "trust".
    pub auth_type: AuthType,
    /// Largest message accepted from a client (the server's replies are streamed).
    pub max_message_size: ByteSize,
    /// Largest startup packet accepted (PostgreSQL's own limit is 10000).
    pub max_startup_packet_size: usize,
    /// On SIGTERM/SIGINT: how long clients in a transaction may take to finish it.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Runtime worker threads (0 = one per CPU core). Needs a restart to change.
    pub worker_threads: usize,
    /// Cores: single-threaded event loops that client sessions run on, each session with its
    /// server connections on one, and each pool split into one part per core (see
    /// `pool::shards`). None: as many as `worker_threads` when that is 2 or more (0 counts
    /// the cores); 0: off (sessions on the shared runtime). Needs a restart to change.
    pub session_threads: Option<usize>,
    /// A user in `[users]` (with a server password) that looks up users not listed in
    /// `[users]` with `auth_query` (none: only listed users may log in).
    pub auth_user: Option<String>,
    /// Returns (name, SCRAM verifier or NULL) for the user `$1`.
    pub auth_query: String,
    /// The `[databases]` entry auth_query runs in (default: the one the client asked for).
    pub auth_dbname: Option<String>,
    /// How long a looked-up verifier, or "no such user", is used before asking again.
    #[serde(with = "humantime_serde")]
    pub auth_cache_ttl: Duration,
    /// Failed logins of a looked-up user per client address within a minute before further
    /// attempts are refused without a lookup (and 4x that per address across users); 0 = no limit.
    pub auth_failure_limit: u32,
    /// Load balancers allowed to send a PROXY protocol header (v1 or v2) before the client's
    /// bytes: connections from these ranges must start with one and are known by the address
    /// it carries; a header from anywhere else is refused (the connection closed). Empty: off.
    pub proxy_protocol_trusted: Cidrs,
    /// A file in pg_hba.conf's format deciding how each client authenticates (by connection
    /// type, database, user and address); replaces auth_type when set. Read again on reload.
    pub hba_file: Option<std::path::PathBuf>,
    /// A file in pg_ident.conf's format: the maps `cert` lines name with `map=`.
    pub ident_file: Option<std::path::PathBuf>,
    /// The Unix socket a successor (`pgvalve run --takeover`) connects to, to take over the
    /// listening sockets and the idle clients (see `takeover`). None: `pgvalve-<port>.takeover`
    /// in `$XDG_RUNTIME_DIR`, else in /tmp (`<port>`: the listen port); "" turns it off.
    pub takeover_socket: Option<std::path::PathBuf>,
}

impl ProxySettings {
    /// The takeover control socket of a proxy listening on `port` (None: turned off).
    pub fn takeover_path(&self, port: u16) -> Option<std::path::PathBuf> {
        match &self.takeover_socket {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p.clone()),
            None => {
                let dir = std::env::var_os("XDG_RUNTIME_DIR")
                    .filter(|d| !d.is_empty())
                    .map_or_else(|| std::path::PathBuf::from("/tmp"), std::path::PathBuf::from);
                Some(dir.join(format!("pgvalve-{port}.takeover")))
            }
        }
    }
}

/// PgBouncer's default auth_query: the verifier, NULL once `rolvaliduntil` has passed.
pub(crate) const DEFAULT_AUTH_QUERY: &str = "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END FROM pg_authid WHERE rolname = $1 AND rolcanlogin";

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:6432".into(),
            max_client_connections: 1000,
            client_login_timeout: Duration::from_secs(15),
            auth_type: AuthType::ScramSha256,
            max_message_size: ByteSize(256 << 20),
            max_startup_packet_size: 10_000,
            shutdown_timeout: Duration::from_secs(30),
            worker_threads: 0,
            session_threads: None,
            auth_user: None,
            auth_query: DEFAULT_AUTH_QUERY.to_string(),
            auth_dbname: None,
            auth_cache_ttl: Duration::from_secs(60),
            auth_failure_limit: 5,
            proxy_protocol_trusted: Cidrs::default(),
            hba_file: None,
            ident_file: None,
            takeover_socket: None,
        }
    }
}

/// `[pool]`: server connections.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSettings {
    /// Default pool mode ("session"; "transaction" arrives with transaction pooling).
    pub pool_mode: PoolMode,
    /// Default server connections per (database, user) pool.
    pub pool_size: u32,
    /// Server connections across all pools: a number (0 = no global cap), `"auto"` (what
    /// PostgreSQL's max_connections allows pgvalve, read at start and at each reload) or a
    /// percentage of that (`"80%"`). In force: [`super::Config::max_server_connections`].
    pub max_server_connections: super::ServerCap,
    /// How long a client waits for a server connection before FATAL 53300.
    #[serde(with = "humantime_serde")]
    pub query_wait_timeout: Duration,
    /// Time allowed to connect and log in to PostgreSQL.
    #[serde(with = "humantime_serde")]
    pub server_connect_timeout: Duration,
    /// Run on a server connection before another client gets it ("" = none).
    pub server_reset_query: String,
    /// Check that a server connection is alive before reuse when it was idle longer than this;
    /// "0s" = check every time. Within the delay a connection is checked too when its event
    /// loop saw the socket readable (PostgreSQL closed it: restart, pg_terminate_backend) or
    /// when another connection of the pool was found dead since its last use. The check is one
    /// non-blocking read.
    #[serde(with = "humantime_serde")]
    pub server_check_delay: Duration,
    /// While PostgreSQL cannot be reached, connection attempts of a pool are spaced out,
    /// 100 ms doubling up to this; clients asking meanwhile fail at once (08006) instead of
    /// each trying (no reconnect storm).
    #[serde(with = "humantime_serde")]
    pub server_login_retry: Duration,
    /// Close server connections idle this long ("0s" = never).
    #[serde(with = "humantime_serde")]
    pub server_idle_timeout: Duration,
    /// Close server connections this old once they are idle ("0s" = never).
    #[serde(with = "humantime_serde")]
    pub server_lifetime: Duration,
    /// Cancel a query running longer than this ("0s" = off).
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
    /// End the session of a client that holds a transaction open without sending anything
    /// for this long ("0s" = off).
    #[serde(with = "humantime_serde")]
    pub idle_transaction_timeout: Duration,
    /// End the session of a client whose transaction is open longer than this ("0s" = off).
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
    /// Transaction mode: "pin" or "reject" statements that change session state.
    pub session_state: SessionStatePolicy,
    /// Transaction mode: protocol-level prepared statements kept per server connection
    /// (least recently used closed first). 0 = a named statement pins the session instead.
    pub max_prepared_statements: usize,
    /// Transaction mode: parameters whose `SET` is tracked per client and re-applied on every
    /// server connection it gets instead of pinning, besides `search_path` (always tracked).
    /// Names as in `SET` (`statement_timeout`, `app.tenant`), checked when loaded.
    pub track_parameters: Vec<String>,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            pool_mode: PoolMode::Session,
            pool_size: 20,
            max_server_connections: super::ServerCap::Connections(100),
            query_wait_timeout: Duration::from_secs(120),
            server_connect_timeout: Duration::from_secs(5),
            server_reset_query: "DISCARD ALL".into(),
            server_check_delay: Duration::from_secs(1),
            server_login_retry: Duration::from_secs(1),
            server_idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
            max_prepared_statements: 200,
            track_parameters: Vec::new(),
            session_state: SessionStatePolicy::Pin,
            query_timeout: Duration::ZERO,
            idle_transaction_timeout: Duration::ZERO,
            transaction_timeout: Duration::ZERO,
        }
    }
}

/// `[databases.NAME]`: where a database name clients ask for is routed. The name `"*"`
/// routes any database name to the database of the same name on that server.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// PostgreSQL host, or a Unix-socket directory such as "/var/run/postgresql" (cheaper
    /// for a server on the same machine).
    #[serde(default = "default_host")]
    pub host: String,
    /// PostgreSQL port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Database name on the server (default: the name clients use).
    pub dbname: Option<String>,
    /// Overrides `[pool] pool_size` for this database.
    pub pool_size: Option<u32>,
    /// Overrides `[pool] pool_mode` for this database.
    pub pool_mode: Option<PoolMode>,
}

fn default_host() -> String {
    "127.0.0.1".into()
}

fn default_port() -> u16 {
    5432
}

/// `[users.NAME]`: a user clients log in as, and how the proxy logs in to PostgreSQL.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// Password: checked against clients (as SCRAM) and used to log in to PostgreSQL.
    pub password: Option<Secret>,
    /// pg_authid-style verifier (`SCRAM-SHA-256$4096:...`) checked against clients; see
    /// `pgvalve passwd`. Takes precedence over `password` for client authentication.
    pub scram_verifier: Option<Secret>,
    /// pg_authid-style MD5 verifier (`md5` and the hex MD5 of password and user name), for
    /// clients that an hba_file `md5` line lets in with MD5 (default: from `password`).
    pub md5_verifier: Option<Secret>,
    /// Password for logging in to PostgreSQL (default: `password`; omit for trust servers).
    pub server_password: Option<Secret>,
    /// Overrides the pool size for this user's pools.
    pub pool_size: Option<u32>,
    /// Overrides the pool mode for this user's pools.
    pub pool_mode: Option<PoolMode>,
}

/// `[admin]`: who may use the admin console (database `pgvalve`, alias `pgbouncer`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Users (from `[users]`) allowed every console command.
    pub admin_users: Vec<String>,
    /// Users (from `[users]`) allowed the read-only commands (SHOW ...).
    pub stats_users: Vec<String>,
}

/// `[locks]`: the lock monitor.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LockSettings {
    /// Run the monitor.
    pub enabled: bool,
    /// How often pg_locks is polled (lock_poll_interval).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Statement timeout of one poll.
    #[serde(with = "humantime_serde")]
    pub poll_timeout: Duration,
    /// Log a lock episode (one WARN line) once a dangerous lock has been held, or any lock has
    /// blocked others, this long (lock_warn_after).
    #[serde(with = "humantime_serde")]
    pub warn_after: Duration,
    /// Lock modes that are dangerous when held.
    pub dangerous_modes: Vec<String>,
    /// Ended lock episodes kept for SHOW LOCK_HISTORY (and deadlocks for SHOW DEADLOCKS, ended
    /// long transactions for SHOW LONG_TRANSACTIONS).
    pub history: usize,
    /// A transaction open this long is recorded (SHOW LONG_TRANSACTIONS, one WARN line,
    /// pgvalve_long_transactions_total); 0s: not watched.
    #[serde(with = "humantime_serde")]
    pub long_transaction_after: Duration,
    /// The user (from `[users]`) the monitor logs in as (default: the first user).
    pub user: Option<String>,
}

impl Default for LockSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            poll_interval: Duration::from_secs(1),
            poll_timeout: Duration::from_secs(2),
            warn_after: Duration::from_secs(10),
            dangerous_modes: vec![
                "ShareRowExclusiveLock".into(),
                "ExclusiveLock".into(),
                "AccessExclusiveLock".into(),
            ],
            history: 1000,
            long_transaction_after: Duration::from_secs(30),
            user: None,
        }
    }
}

/// PostgreSQL's table lock modes.
pub(crate) const LOCK_MODES: &[&str] = &[
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
];

/// `client_tls_mode`: whether clients may, or must, use TLS (PgBouncer's client_tls_sslmode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ClientTlsMode {
    /// SSLRequest is answered `N`; direct TLS is refused.
    Disable,
    /// TLS when the client asks for it (the same as prefer: a server cannot ask first).
    Allow,
    /// TLS when the client asks for it, plaintext otherwise.
    Prefer,
    /// Plaintext logins are refused with FATAL 28000 (cancel requests still pass).
    Require,
}

/// `server_tls_mode`: TLS to PostgreSQL, with libpq's sslmode meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    /// Plaintext.
    #[default]
    Disable,
    /// TLS when the server offers it, plaintext otherwise; the certificate is not checked.
    Prefer,
    /// TLS or no connection; the certificate is not checked.
    Require,
    /// TLS with a certificate signed by `server_tls_ca_file`.
    VerifyCa,
    /// As verify-ca, and the certificate must name the host pgvalve connects to.
    VerifyFull,
}

impl fmt::Display for ServerTlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerTlsMode::Disable => "disable",
            ServerTlsMode::Prefer => "prefer",
            ServerTlsMode::Require => "require",
            ServerTlsMode::VerifyCa => "verify-ca",
            ServerTlsMode::VerifyFull => "verify-full",
        })
    }
}

impl fmt::Display for ClientTlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientTlsMode::Disable => "disable",
            ClientTlsMode::Allow => "allow",
            ClientTlsMode::Prefer => "prefer",
            ClientTlsMode::Require => "require",
        })
    }
}

/// `[tls]`: TLS towards clients and towards PostgreSQL. Certificates are read when the config
/// is loaded, so a reload picks up renewed files (and a broken one changes nothing).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// disable | allow | prefer | require; default prefer when a certificate is set, else disable.
    pub client_tls_mode: Option<ClientTlsMode>,
    /// PEM certificate chain offered to clients (leaf first).
    pub client_tls_cert_file: Option<std::path::PathBuf>,
    /// PEM private key of that certificate.
    pub client_tls_key_file: Option<std::path::PathBuf>,
    /// disable (default) | prefer | require | verify-ca | verify-full (over TCP; Unix sockets
    /// stay plain).
    pub server_tls_mode: Option<ServerTlsMode>,
    /// PEM CA certificates that sign PostgreSQL's certificate (verify-ca, verify-full).
    pub server_tls_ca_file: Option<std::path::PathBuf>,
    /// PEM CA certificates that sign clients' certificates: clients may then present one
    /// (it must be signed by these), and hba_file `cert` lines log them in by it.
    pub client_tls_ca_file: Option<std::path::PathBuf>,
}

/// `[http]`: the metrics and health endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address of /metrics, /healthz, /readyz, the status page `/` and `/status.json`, e.g.
    /// "127.0.0.1:9930" (none: off).
    pub listen: Option<String>,
    /// Basic auth for the status page and `/status.json` from other hosts than loopback
    /// (with `auth_password`).
    pub auth_user: Option<String>,
    /// The password of `auth_user`.
    pub auth_password: Option<Secret>,
    /// A bearer token (`Authorization: Bearer ...`) for the status page and `/status.json`
    /// from other hosts than loopback.
    pub auth_token: Option<Secret>,
}

/// Who may see the status page from another host than loopback (`[http] auth_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpAuth {
    /// (user, password) for basic auth.
    pub basic: Option<(String, Secret)>,
    /// Bearer token.
    pub token: Option<Secret>,
}

impl HttpAuth {
    /// Neither configured: the status page is for loopback only.
    pub fn is_none(&self) -> bool {
        self.basic.is_none() && self.token.is_none()
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `[proxy]`.
    #[serde(default)]
    pub proxy: ProxySettings,
    /// `[pool]`.
    #[serde(default)]
    pub pool: PoolSettings,
    /// `[databases.*]`.
    #[serde(default)]
    pub databases: BTreeMap<String, DatabaseConfig>,
    /// `[users.*]`.
    #[serde(default)]
    pub users: BTreeMap<String, UserConfig>,
    /// `[http]`.
    #[serde(default)]
    pub http: HttpSettings,
    /// `[tls]`.
    #[serde(default)]
    pub tls: TlsSettings,
    /// `[admin]`.
    #[serde(default)]
    pub admin: AdminSettings,
    /// `[locks]`.
    #[serde(default)]
    pub locks: LockSettings,
    /// `[admission]`: per-identity limits and surge detection.
    #[serde(default)]
    pub admission: super::AdmissionSettings,
    /// `[[identity]]`: ordered rules naming client identities.
    #[serde(default)]
    pub identity: Vec<super::IdentityRule>,
    /// `[cluster]`: one budget across every instance of the same name.
    #[serde(default)]
    pub cluster: Option<super::ClusterSettings>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        let u = UserConfig {
            password: Some(Secret("hunter2".into())),
            ..Default::default()
        };
        assert!(!format!("{u:?}").contains("hunter2"));
    }
}
