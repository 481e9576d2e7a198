//! Configuration: load → parse → validate, and the quick-start mode without a file.
//!
//! Beside the flow: the listener, client sessions and pools read one validated [`Config`]
//! (shared as `Arc<Config>`). Errors name the file, the line (for what serde reads) and the
//! field (for what validation refuses). Secrets never appear in `Debug` output.

mod admission;
mod budget;
mod cluster;
pub mod hba;
mod server_settings;
mod tls;
pub mod types;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::error::{sqlstate, Side, Sided};

pub use admission::{
    cidr_contains, parse_cidr, validate_limits, AdmissionSettings, Headroom, IdentityRule, LimitOverrides, LockAction,
    Rule, MAX_CLUSTER_GRANTS,
};
pub use budget::{PgLimits, ServerBudget, ServerCap};
pub use cluster::{ClusterSettings, MAX_CLUSTER_BUDGET};
pub use server_settings::ServerSettings;
pub(crate) use tls::{end_point_hash, ServerTls, Tls};
pub use types::{
    AdminSettings, AuthType, ByteSize, Cidrs, ClientTlsMode, DatabaseConfig, FileConfig, HttpAuth, LockSettings,
    PoolMode, PoolSettings, ProxySettings, Secret, ServerTlsMode, SessionStatePolicy, TlsSettings, UserConfig,
};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax or a field of the wrong name or type.
    #[error("{path}:{line}:{column}: {}", .source.message())]
    Parse {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong (boxed: it is large, and every `Result` of loading carries it).
        #[source]
        source: Box<toml::de::Error>,
    },
    /// `--upstream` is not a postgres:// URL.
    #[error("{path}: upstream: not a postgres:// URL: {source}")]
    Upstream {
        /// Where the URL came from ("command line").
        path: String,
        /// What the URL parser said.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A value that parses but cannot work.
    #[error("{path}: {field}: {reason}")]
    Invalid {
        /// The file (or "command line").
        path: String,
        /// Dotted field path, e.g. `databases.app.port`.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

impl ConfigError {
    fn upstream(path: &str, source: tokio_postgres::Error) -> Self {
        ConfigError::Upstream {
            path: path.to_string(),
            source,
        }
    }
}

/// The operator's to fix; a console `RELOAD` it refuses is told as config_file_error.
impl Sided for ConfigError {
    fn side(&self) -> Side {
        Side::Config
    }

    fn sqlstate(&self) -> &str {
        match self {
            ConfigError::Read { .. }
            | ConfigError::Parse { .. }
            | ConfigError::Upstream { .. }
            | ConfigError::Invalid { .. } => sqlstate::CONFIG_FILE_ERROR,
        }
    }
}

/// A pg_authid-style SCRAM-SHA-256 verifier.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    /// PBKDF2 iterations.
    pub iterations: usize,
    /// Salt.
    pub salt: Vec<u8>,
    /// `SHA256(ClientKey)`.
    pub stored_key: Vec<u8>,
    /// `HMAC(SaltedPassword, "Server Key")`.
    pub server_key: Vec<u8>,
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(<redacted>)")
    }
}

impl FromStr for ScramVerifier {
    type Err = String;

    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 parts).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || "expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey> (see `pgvalve passwd`)".to_string();
        let rest = s.strip_prefix("SCRAM-SHA-256$").ok_or_else(bad)?;
        let (params, keys) = rest.split_once('$').ok_or_else(bad)?;
        let (iter, salt) = params.split_once(':').ok_or_else(bad)?;
        let (stored, server) = keys.split_once(':').ok_or_else(bad)?;
        let b64 = |p: &str| STANDARD.decode(p).map_err(|_| bad());
        let v = ScramVerifier {
            iterations: iter.parse().map_err(|_| bad())?,
            salt: b64(salt)?,
            stored_key: b64(stored)?,
            server_key: b64(server)?,
        };
        if v.iterations == 0 || v.stored_key.len() != 32 || v.server_key.len() != 32 {
            return Err(bad());
        }
        Ok(v)
    }
}

impl ScramVerifier {
    /// Derives a verifier from a password (4096 iterations, random salt), as PostgreSQL does.
    pub(crate) fn from_password(password: &str) -> Self {
        let s = postgres_protocol::password::scram_sha_256(password.as_bytes());
        s.parse()
            .expect("invariant: postgres-protocol produces a valid verifier")
    }
}

/// A validated user.
#[derive(Debug, Clone)]
pub struct User {
    /// Verifier checked against clients (None with auth_type = trust and no password).
    pub client_verifier: Option<ScramVerifier>,
    /// `md5` + hex MD5 of password and user name, for hba_file `md5` lines.
    pub md5_verifier: Option<Secret>,
    /// Password for logging in to PostgreSQL.
    pub server_password: Option<Secret>,
    /// Pool size override.
    pub pool_size: Option<u32>,
    /// Pool mode override.
    pub pool_mode: Option<PoolMode>,
}

/// Where a client's (database, user) goes, with the pool settings that apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Database name the client asked for (the pool key).
    pub database: String,
    /// User name (the pool key).
    pub user: String,
    /// Server host.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Database name on the server.
    pub server_dbname: String,
    /// Server connections in this pool.
    pub pool_size: u32,
    /// Pool mode.
    pub pool_mode: PoolMode,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[proxy]`.
    pub proxy: ProxySettings,
    /// `[pool]`.
    pub pool: PoolSettings,
    /// `[databases]`.
    pub databases: BTreeMap<String, DatabaseConfig>,
    /// `[users]`, validated.
    pub users: BTreeMap<String, User>,
    /// The listen address, parsed.
    pub listen: SocketAddr,
    /// `[admin]`, checked against `[users]`.
    pub admin: AdminSettings,
    /// `[locks]`, checked.
    pub locks: LockSettings,
    /// `[http] listen`, parsed.
    pub http_listen: Option<SocketAddr>,
    /// `[http] auth_user`/`auth_password`/`auth_token`, checked.
    pub http_auth: HttpAuth,
    /// `[admission]`, validated.
    pub admission: AdmissionSettings,
    /// `[[identity]]` rules, validated, in order.
    pub identities: Vec<Rule>,
    /// `[tls]` as written.
    pub tls_settings: TlsSettings,
    /// `[tls]` loaded: acceptor and connector with their certificates.
    pub tls: Tls,
    /// `hba_file` (with `ident_file`) read, when set.
    pub hba: Option<Arc<hba::Hba>>,
    /// `[cluster]`, validated (None: no cluster, every cap is this process's alone).
    pub cluster: Option<ClusterSettings>,
    /// `[pool] max_server_connections` in force: a number as written, or as sized from
    /// PostgreSQL (`server::sizing`); None until an `"auto"` or percentage value is sized.
    pub server_budget: Option<ServerBudget>,
}

impl Config {
    /// Every setting at its default (no databases or users), for SHOW CONFIG's `default`.
    pub(crate) fn default_settings() -> Config {
        let f = FileConfig::default();
        Config {
            listen: f.proxy.listen.parse().unwrap_or_else(|_| ([127, 0, 0, 1], 6432).into()),
            proxy: f.proxy,
            pool: f.pool,
            databases: BTreeMap::new(),
            users: BTreeMap::new(),
            admin: f.admin,
            locks: f.locks,
            http_listen: None,
            http_auth: HttpAuth::default(),
            admission: f.admission,
            identities: Vec::new(),
            tls_settings: f.tls,
            tls: Tls::default(),
            hba: None,
            cluster: None,
            server_budget: Some(ServerBudget::written(100)),
        }
    }

    /// Server connections across all pools in force (0 = no cap). An `"auto"` or percentage
    /// value not sized yet counts as 1 (the proxy sizes it before it opens any pool; the
    /// smallest cap keeps the promise meanwhile).
    pub fn max_server_connections(&self) -> u32 {
        self.server_budget.as_ref().map_or(1, |b| b.max)
    }
}

/// Command-line and environment overrides, including the quick start without a file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--upstream postgres://USER:PASSWORD@HOST:PORT`.
    pub upstream: Option<String>,
    /// `--pool-mode`.
    pub pool_mode: Option<PoolMode>,
    /// `--pool-size`.
    pub pool_size: Option<u32>,
    /// `--max-client-connections`.
    pub max_client_connections: Option<u32>,
    /// `--max-server-connections`.
    pub max_server_connections: Option<ServerCap>,
    /// `--headroom` (`[admission] headroom`).
    pub headroom: Option<Headroom>,
    /// `--worker-threads`.
    pub worker_threads: Option<usize>,
    /// `--session-threads`.
    pub session_threads: Option<usize>,
    /// `--http-listen`.
    pub http_listen: Option<String>,
    /// `--proxy-protocol-trusted CIDR,...` (`[proxy] proxy_protocol_trusted`).
    pub proxy_protocol_trusted: Option<Cidrs>,
    /// `--cluster-name` (`[cluster] name`).
    pub cluster_name: Option<String>,
    /// `--cluster-max-server-connections` (`[cluster] max_server_connections`).
    pub cluster_max_server_connections: Option<u32>,
    /// `--cluster-advertise` (`[cluster] advertise`; only with a cluster).
    pub cluster_advertise: Option<String>,
    /// `--client-tls-cert`, `--client-tls-key`, `--client-tls-mode`, `--server-tls-mode`,
    /// `--server-tls-ca`: each set one replaces the file's `[tls]` value.
    pub tls: TlsSettings,
}

/// Reads and validates a config file.
///
/// # Errors
/// [`ConfigError`] naming the file, and the line or field.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with(Some(path), &Overrides::default())
}

/// Reads a config file (or none) and applies overrides, then validates.
///
/// # Errors
/// [`ConfigError`] naming the file, and the line or field.
pub fn load_with(path: Option<&Path>, ov: &Overrides) -> Result<Config, ConfigError> {
    let (name, file) = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?;
            (p.display().to_string(), parse_toml(&p.display().to_string(), &text)?)
        }
        None => ("command line".to_string(), FileConfig::default()),
    };
    let file = apply_overrides(file, ov, &name)?;
    Config::validate(file, &name)
}

/// Parses TOML text into the file structure.
///
/// # Errors
/// [`ConfigError::Parse`] with line and column.
pub fn parse_toml(name: &str, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        ConfigError::Parse {
            path: name.to_string(),
            line,
            column,
            source: Box::new(e),
        }
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

/// Each `[tls]` setting given on the command line replaces the file's.
fn tls_overrides(t: TlsSettings, file: TlsSettings) -> TlsSettings {
    TlsSettings {
        client_tls_mode: t.client_tls_mode.or(file.client_tls_mode),
        client_tls_cert_file: t.client_tls_cert_file.or(file.client_tls_cert_file),
        client_tls_key_file: t.client_tls_key_file.or(file.client_tls_key_file),
        server_tls_mode: t.server_tls_mode.or(file.server_tls_mode),
        server_tls_ca_file: t.server_tls_ca_file.or(file.server_tls_ca_file),
        client_tls_ca_file: t.client_tls_ca_file.or(file.client_tls_ca_file),
    }
}

fn apply_overrides(mut f: FileConfig, ov: &Overrides, name: &str) -> Result<FileConfig, ConfigError> {
    if let Some(l) = &ov.listen {
        f.proxy.listen = l.clone();
    }
    f.pool.pool_mode = ov.pool_mode.unwrap_or(f.pool.pool_mode);
    f.pool.pool_size = ov.pool_size.unwrap_or(f.pool.pool_size);
    if let Some(n) = ov.max_client_connections {
        f.proxy.max_client_connections = n;
    }
    if let Some(n) = ov.max_server_connections {
        f.pool.max_server_connections = n;
    }
    f.admission.headroom = ov.headroom.unwrap_or(f.admission.headroom);
    if let Some(n) = ov.worker_threads {
        f.proxy.worker_threads = n;
    }
    if let Some(n) = ov.session_threads {
        f.proxy.session_threads = Some(n);
    }
    if let Some(c) = &ov.proxy_protocol_trusted {
        f.proxy.proxy_protocol_trusted = c.clone();
    }
    if let Some(l) = &ov.http_listen {
        f.http.listen = Some(l.clone());
    }
    apply_cluster(&mut f, ov, name)?;
    f.tls = tls_overrides(ov.tls.clone(), f.tls);
    if let Some(url) = &ov.upstream {
        let invalid = |reason: String| ConfigError::Invalid {
            path: name.to_string(),
            field: "upstream".into(),
            reason,
        };
        let pg = tokio_postgres::Config::from_str(url).map_err(|e| ConfigError::upstream(name, e))?;
        let user = pg
            .get_user()
            .ok_or_else(|| invalid("the URL names no user".into()))?
            .to_string();
        let host = match pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(dir)) => dir.display().to_string(),
            None => "127.0.0.1".into(),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let password = pg
            .get_password()
            .map(|p| Secret(String::from_utf8_lossy(p).into_owned()));
        if password.is_none() {
            f.proxy.auth_type = AuthType::Trust;
        }
        f.databases.insert(
            "*".into(),
            DatabaseConfig {
                host,
                port,
                dbname: None,
                pool_size: None,
                pool_mode: None,
            },
        );
        // Without a file the upstream user is the console's admin.
        if !f.admin.admin_users.contains(&user) {
            f.admin.admin_users.push(user.clone());
        }
        f.users.insert(
            user,
            UserConfig {
                password,
                ..Default::default()
            },
        );
    }
    Ok(f)
}

/// `--cluster-name` and `--cluster-max-server-connections`: each replaces the file's value;
/// a cluster without a file needs both.
fn apply_cluster(f: &mut FileConfig, ov: &Overrides, name: &str) -> Result<(), ConfigError> {
    match (&mut f.cluster, &ov.cluster_name, ov.cluster_max_server_connections) {
        (_, None, None) => {
            if let Some(c) = &mut f.cluster {
                c.advertise = ov.cluster_advertise.clone().or(c.advertise.take());
            }
        }
        (Some(c), n, m) => {
            c.name = n.clone().unwrap_or_else(|| c.name.clone());
            c.max_server_connections = m.unwrap_or(c.max_server_connections);
            c.advertise = ov.cluster_advertise.clone().or(c.advertise.take());
        }
        (None, Some(n), Some(m)) => {
            let mut c = ClusterSettings::new(n, m);
            c.advertise = ov.cluster_advertise.clone();
            f.cluster = Some(c);
        }
        (None, _, _) => {
            return Err(ConfigError::Invalid {
                path: name.to_string(),
                field: "cluster".into(),
                reason: "--cluster-name and --cluster-max-server-connections go together".into(),
            })
        }
    }
    Ok(())
}

impl Config {
    /// Checks every field and cross-field rule and builds the validated config.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first field that cannot work.
    pub fn validate(mut f: FileConfig, name: &str) -> Result<Config, ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            path: name.to_string(),
            field: field.to_string(),
            reason,
        };
        // In this order: the error names the first field that cannot work.
        let listen = validate::proxy(&f, &invalid)?;
        validate::pools(&f, &invalid)?;
        let users = validate::users(
            std::mem::take(&mut f.users),
            f.proxy.auth_type,
            f.proxy.hba_file.is_some(),
            &invalid,
        )?;
        validate::auth_query(&f, &users, &invalid)?;
        let http_listen = match &f.http.listen {
            None => None,
            Some(l) => Some(
                l.parse()
                    .map_err(|_| invalid("http.listen", format!("{l:?} is not an address like 127.0.0.1:9930")))?,
            ),
        };
        let http_auth = validate::http_auth(&f, &invalid)?;
        f.admission
            .validate()
            .map_err(|(field, reason)| invalid(&format!("admission.{field}"), reason))?;
        validate::admin_users(&f, &users, &invalid)?;
        validate::locks(&f, &users, &invalid)?;
        let hba = validate::hba(&f, &invalid)?;
        validate::cluster(&f, &users, &invalid)?;
        let mut identities = Vec::new();
        for (i, r) in f.identity.into_iter().enumerate() {
            let rule = Rule::new(r).map_err(|(field, reason)| invalid(&format!("identity[{i}].{field}"), reason))?;
            validate::cluster_cap(&rule, f.cluster.as_ref())
                .map_err(|reason| invalid(&format!("identity[{i}].cluster_max_server_connections"), reason))?;
            identities.push(rule);
        }
        let tls = Tls::load(&f.tls).map_err(|(field, reason)| invalid(&format!("tls.{field}"), reason))?;
        let server_budget = match f.pool.max_server_connections {
            ServerCap::Connections(n) => Some(ServerBudget::written(n)),
            _ => None,
        };
        Ok(Config {
            proxy: f.proxy,
            pool: f.pool,
            databases: f.databases,
            users,
            listen,
            admin: f.admin,
            locks: f.locks,
            http_listen,
            http_auth,
            admission: f.admission,
            identities,
            tls_settings: f.tls,
            tls,
            hba,
            cluster: f.cluster,
            server_budget,
        })
    }

    /// Where (database, user) goes, or None when no database of that name is configured.
    pub fn route(&self, database: &str, user: &str) -> Option<Route> {
        let (db, server_dbname) = match self.databases.get(database) {
            Some(d) => (d, d.dbname.clone().unwrap_or_else(|| database.to_string())),
            None => (self.databases.get("*")?, database.to_string()),
        };
        let u = self.users.get(user);
        Some(Route {
            database: database.to_string(),
            user: user.to_string(),
            host: db.host.clone(),
            port: db.port,
            server_dbname,
            pool_size: u
                .and_then(|u| u.pool_size)
                .or(db.pool_size)
                .unwrap_or(self.pool.pool_size),
            pool_mode: u
                .and_then(|u| u.pool_mode)
                .or(db.pool_mode)
                .unwrap_or(self.pool.pool_mode),
        })
    }

    /// Wraps the config for sharing.
    pub fn shared(self) -> Arc<Config> {
        Arc::new(self)
    }
}

#[cfg(test)]
mod tests;
