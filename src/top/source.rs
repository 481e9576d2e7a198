//! Where `pgvalve top` reads from: `/status.json` over plain HTTP (a GET on one connection),
//! or the admin console (`SHOW LIMITS`, `SHOW IDENTITIES`, `SHOW LOCKS`).
//!
//! Part of `top`.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One identity's line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    /// The identity.
    pub identity: String,
    /// Client connections now.
    pub clients: u64,
    /// Its cap (0: none).
    pub max_clients: u64,
    /// Server connections held now.
    pub servers: u64,
    /// Its cap (0: none).
    pub max_servers: u64,
    /// Its cap across every instance of the cluster (0: none).
    pub cluster_max: u64,
    /// Of that cap, what this instance holds now.
    pub cluster_grants: u64,
    /// Clients waiting for a server connection.
    pub waiting: u64,
    /// Growth of client connections over 10 s.
    pub growth_10s: i64,
    /// Logins in the last second.
    pub login_rate: f64,
    /// Refusals since start, all reasons.
    pub refused: u64,
    /// Dangerous locks its sessions hold now.
    pub lock_holders: u64,
    /// In a surge episode.
    pub surging: bool,
    /// p99 query time over the last minute, ms.
    pub query_p99_ms: Option<f64>,
}

/// What one read gave.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Per identity.
    pub rows: Vec<Row>,
    /// PostgreSQL reachable (unknown through the console).
    pub postgres: Option<bool>,
}

/// A running pgvalve.
#[derive(Debug, Clone)]
pub enum Source {
    /// `/status.json` at (host:port, path, bearer token).
    Http(String, String, Option<String>),
    /// The admin console's URL.
    Console(String),
}

impl Source {
    /// From `http://host:port[/prefix]`.
    ///
    /// # Errors
    /// Not an http:// URL.
    pub fn http(url: &str, token: Option<String>) -> anyhow::Result<Source> {
        let rest = url
            .strip_prefix("http://")
            .context("--http takes http://HOST:PORT (https: put a local proxy in front)")?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let path = format!("/{}", path.trim_end_matches('/'));
        let path = if path == "/" {
            "/status.json".to_string()
        } else {
            format!("{path}/status.json")
        };
        Ok(Source::Http(host.to_string(), path, token))
    }

    /// From a postgres:// URL of the console.
    pub fn console(url: &str) -> Source {
        Source::Console(url.to_string())
    }

    /// Reads the picture now (5 s at most).
    ///
    /// # Errors
    /// pgvalve could not be reached or answered something else.
    pub async fn read(&self) -> anyhow::Result<Snapshot> {
        let read = async {
            match self {
                Source::Http(host, path, token) => from_json(&get(host, path, token.as_deref()).await?),
                Source::Console(url) => from_console(url).await,
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .context("no answer within 5 s")?
    }
}

async fn get(host: &str, path: &str, token: Option<&str>) -> anyhow::Result<String> {
    let mut sock = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| format!("connecting to {host}"))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n");
    sock.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    sock.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("not an HTTP answer")?;
    let status = head.lines().next().unwrap_or("");
    anyhow::ensure!(status.contains(" 200 "), "{host}{path}: {status}");
    Ok(body.to_string())
}

/// A snapshot from `/status.json`.
///
/// # Errors
/// Not the JSON pgvalve serves.
pub fn from_json(body: &str) -> anyhow::Result<Snapshot> {
    let v: serde_json::Value = serde_json::from_str(body).context("/status.json is not JSON")?;
    let ids = v["identities"].as_array().context("no identities in /status.json")?;
    let u = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
    let rows = ids
        .iter()
        .map(|i| Row {
            identity: i["identity"].as_str().unwrap_or("").to_string(),
            clients: u(&i["clients"]),
            max_clients: u(&i["max_client_connections"]),
            servers: u(&i["server_connections"]),
            max_servers: u(&i["max_server_connections"]),
            cluster_max: u(&i["cluster_max_server_connections"]),
            cluster_grants: u(&i["cluster_grants"]),
            waiting: u(&i["waiting"]),
            growth_10s: i["client_growth_10s"].as_i64().unwrap_or(0),
            login_rate: i["login_rate"].as_f64().unwrap_or(0.0),
            refused: i["refused"].as_object().map_or(0, |r| r.values().map(u).sum()),
            lock_holders: u(&i["lock_holders"]),
            surging: i["surging"].as_bool().unwrap_or(false),
            query_p99_ms: i["query_p99_ms"].as_f64(),
        })
        .collect();
    Ok(Snapshot {
        rows,
        postgres: v["postgres"]["reachable"].as_bool(),
    })
}

type Table = Vec<HashMap<String, String>>;

async fn show(c: &tokio_postgres::Client, cmd: &str) -> anyhow::Result<Table> {
    let msgs = c.simple_query(cmd).await.with_context(|| cmd.to_string())?;
    Ok(msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, col)| (col.name().to_string(), r.get(i).unwrap_or("").to_string()))
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

async fn from_console(url: &str) -> anyhow::Result<Snapshot> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to the console")?;
    let task = tokio::spawn(conn);
    let limits = show(&c, "SHOW LIMITS").await?;
    let times = show(&c, "SHOW IDENTITIES").await?;
    let locks = show(&c, "SHOW LOCKS").await?;
    drop(c);
    let _ = task.await;
    Ok(Snapshot {
        rows: from_tables(&limits, &times, &locks),
        postgres: None,
    })
}

/// Rows from the console's SHOW LIMITS, SHOW IDENTITIES and SHOW LOCKS.
pub fn from_tables(limits: &Table, times: &Table, locks: &Table) -> Vec<Row> {
    let n = |r: &HashMap<String, String>, k: &str| r.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    limits
        .iter()
        .map(|r| {
            let id = r.get("identity").cloned().unwrap_or_default();
            let p99 = times
                .iter()
                .find(|t| t.get("identity") == Some(&id))
                .and_then(|t| t.get("query_p99_ms")?.parse().ok());
            Row {
                clients: n(r, "clients"),
                max_clients: n(r, "max_client_connections"),
                servers: n(r, "server_connections"),
                max_servers: n(r, "max_server_connections"),
                cluster_max: n(r, "cluster_max_server_connections"),
                cluster_grants: n(r, "cluster_grants"),
                waiting: n(r, "waiting"),
                growth_10s: r.get("client_growth_10s").and_then(|v| v.parse().ok()).unwrap_or(0),
                login_rate: r.get("login_rate").and_then(|v| v.parse().ok()).unwrap_or(0.0),
                refused: r
                    .iter()
                    .filter(|(k, _)| k.starts_with("refused_"))
                    .map(|(k, _)| n(r, k))
                    .sum(),
                lock_holders: locks
                    .iter()
                    .filter(|l| {
                        l.get("identity") == Some(&id)
                            && l.get("dangerous").map(String::as_str) == Some("yes")
                            && l.get("granted").map(String::as_str) == Some("yes")
                    })
                    .count() as u64,
                surging: r.get("surging").map(String::as_str) == Some("yes"),
                query_p99_ms: p99,
                identity: id,
            }
        })
        .collect()
}
