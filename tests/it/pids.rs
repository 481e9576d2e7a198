//! The backend pid a client sees (BackendKeyData) against what PostgreSQL says: session mode
//! gives the real pid, transaction mode its own, with the client's own notifications
//! carrying it; and application_name left on idle transaction-mode connections.

use std::time::Duration;

use pgvalve::config::{AuthType, PoolMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// A raw protocol client (trust auth): what it was told at login, and its socket.
struct Raw {
    sock: TcpStream,
    pid: i32,
    secret: i32,
    pending: Vec<u8>,
}

impl Raw {
    async fn connect(s: &Setup, application_name: &str) -> Raw {
        let mut sock = TcpStream::connect(s.proxy.local_addr()).await.unwrap();
        let mut body = vec![0, 3, 0, 0];
        for (k, v) in [
            ("user", "app"),
            ("database", "app"),
            ("application_name", application_name),
        ] {
            for part in [k, v] {
                body.extend_from_slice(part.as_bytes());
                body.push(0);
            }
        }
        body.push(0);
        let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        packet.extend(body);
        sock.write_all(&packet).await.unwrap();
        let mut raw = Raw {
            sock,
            pid: 0,
            secret: 0,
            pending: Vec::new(),
        };
        for m in raw.until_ready().await {
            if m[0] == b'K' {
                raw.pid = i32::from_be_bytes(m[5..9].try_into().unwrap());
                raw.secret = i32::from_be_bytes(m[9..13].try_into().unwrap());
            }
            assert_ne!(m[0], b'E', "login failed: {m:?}");
        }
        assert_ne!(raw.pid, 0, "no BackendKeyData");
        raw
    }

    /// The next whole message.
    async fn message(&mut self) -> Vec<u8> {
        loop {
            if self.pending.len() >= 5 {
                let len = 1 + u32::from_be_bytes(self.pending[1..5].try_into().unwrap()) as usize;
                if self.pending.len() >= len {
                    return self.pending.drain(..len).collect();
                }
            }
            let mut buf = [0u8; 4096];
            let n = within(Duration::from_secs(10), self.sock.read(&mut buf)).await.unwrap();
            assert!(n > 0, "pgvalve closed the connection");
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    async fn until_ready(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let m = self.message().await;
            let done = m[0] == b'Z';
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Runs `sql` (simple protocol); every message up to ReadyForQuery.
    async fn query(&mut self, sql: &str) -> Vec<Vec<u8>> {
        let mut q = vec![b'Q'];
        q.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
        q.extend_from_slice(sql.as_bytes());
        q.push(0);
        self.sock.write_all(&q).await.unwrap();
        let got = self.until_ready().await;
        for m in &got {
            assert_ne!(m[0], b'E', "{sql}: {}", String::from_utf8_lossy(m));
        }
        got
    }

    /// The first column of the first row `sql` returns.
    async fn value(&mut self, sql: &str) -> String {
        let got = self.query(sql).await;
        let row = got.iter().find(|m| m[0] == b'D').expect("a row");
        let len = i32::from_be_bytes(row[7..11].try_into().unwrap()) as usize;
        String::from_utf8(row[11..11 + len].to_vec()).unwrap()
    }
}

/// Pids of the NotificationResponses in `messages`.
fn notification_pids(messages: &[Vec<u8>]) -> Vec<i32> {
    messages
        .iter()
        .filter(|m| m[0] == b'A')
        .map(|m| i32::from_be_bytes(m[5..9].try_into().unwrap()))
        .collect()
}

fn trust(mode: PoolMode) -> impl FnOnce(&mut pgvalve::config::FileConfig) {
    move |f| {
        f.proxy.auth_type = AuthType::Trust;
        f.pool.pool_mode = mode;
        f.pool.pool_size = 4;
    }
}

/// Session mode: the pid in BackendKeyData is the backend's own, as `pg_backend_pid()`,
/// pg_stat_activity and the client's own notifications say; cancel still works with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_clients_see_their_real_backend_pid() {
    let s = Setup::new(trust(PoolMode::Session)).await;
    let mut raw = Raw::connect(&s, "pid-check").await;
    let backend: i32 = raw.value("SELECT pg_backend_pid()").await.parse().unwrap();
    assert_eq!(raw.pid, backend, "BackendKeyData names the real backend");
    let su = s.pg.superuser().await.unwrap();
    let row = su
        .query_one(
            "SELECT application_name FROM pg_stat_activity WHERE pid = $1",
            &[&raw.pid],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pid-check");
    let got = raw.query("LISTEN c; NOTIFY c, 'mine'").await;
    assert_eq!(notification_pids(&got), vec![raw.pid]);

    // Cancel with the real pid and pgvalve's secret reaches the query.
    let mut q = vec![b'Q'];
    let sql = "SELECT pg_sleep(10)";
    q.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    q.push(0);
    raw.sock.write_all(&q).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut cancel = TcpStream::connect(s.proxy.local_addr()).await.unwrap();
    let mut req = 16i32.to_be_bytes().to_vec();
    req.extend_from_slice(&80_877_102i32.to_be_bytes());
    req.extend_from_slice(&raw.pid.to_be_bytes());
    req.extend_from_slice(&raw.secret.to_be_bytes());
    cancel.write_all(&req).await.unwrap();
    let got = raw.until_ready().await;
    let err = got.iter().find(|m| m[0] == b'E').expect("the query was cancelled");
    assert!(String::from_utf8_lossy(err).contains("57014"), "{err:?}");
}

/// Transaction mode: the pid is pgvalve's own (never a real process id); a notification
/// caused by the client's own NOTIFY carries it, one from anybody else the sender's pid. With
/// statement tracking (the default) and without (`max_prepared_statements = 0`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_notifications_name_the_pid_the_client_was_given() {
    for tracked in [200, 0] {
        let s = Setup::new(|f| {
            trust(PoolMode::Transaction)(f);
            f.pool.max_prepared_statements = tracked;
        })
        .await;
        let mut raw = Raw::connect(&s, "listener").await;
        assert!(raw.pid >= 1 << 22, "made-up pids lie above every real one: {}", raw.pid);
        let got = raw.query("LISTEN c; NOTIFY c, 'mine'").await;
        assert_eq!(notification_pids(&got), vec![raw.pid], "own notification ({tracked})");
        // Another client's NOTIFY keeps its sender's pid.
        let other = s.client().await;
        let other_backend: i32 = other.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
        other.batch_execute("NOTIFY c, 'theirs'").await.unwrap();
        let m = raw.message().await;
        assert_eq!(notification_pids(&[m]), vec![other_backend], "({tracked})");
        // Inside a transaction of the (pinned) session too.
        let got = raw.query("BEGIN; NOTIFY c, 'in a transaction'; COMMIT").await;
        assert_eq!(notification_pids(&got), vec![raw.pid], "({tracked})");
    }
}

/// Transaction mode: once a client has left, the idle server connection it used stops
/// showing its application_name in pg_stat_activity (it is reset, not closed), while the one
/// a client still connected used keeps that client's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_clients_application_name_leaves_the_idle_connections() {
    let s = Setup::new(|f| {
        f.pool.pool_mode = PoolMode::Transaction;
        f.pool.pool_size = 3;
    })
    .await;
    let su = s.pg.superuser().await.unwrap();
    let (gone, _t) = connect_killable(&format!("{}?application_name=departed-app", s.url())).await;
    let stays = connect(&format!("{}?application_name=staying-app", s.url()))
        .await
        .unwrap();
    // Each on a server connection of its own: one holds a transaction while the other runs.
    stays.batch_execute("BEGIN").await.unwrap();
    gone.simple_query("SELECT 1").await.unwrap();
    stays.batch_execute("COMMIT").await.unwrap();
    let named = |name: &'static str| {
        let su = &su;
        async move {
            su.query(
                "SELECT pid FROM pg_stat_activity WHERE datname = 'app' AND application_name = $1",
                &[&name],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i32>(0))
            .collect::<Vec<i32>>()
        }
    };
    let used = named("departed-app").await;
    assert_eq!(used.len(), 1, "the departing client's name is on its connection");
    let kept = named("staying-app").await;
    assert_eq!(kept.len(), 1);
    drop(gone);
    eventually(Duration::from_secs(10), "departed-app reset", || async {
        named("departed-app").await.is_empty()
    })
    .await;
    // Reset, not closed: the same backend is still there.
    let alive = su
        .query("SELECT 1 FROM pg_stat_activity WHERE pid = ANY($1)", &[&used])
        .await
        .unwrap();
    assert_eq!(alive.len(), 1, "the connection was reset, not closed");
    // The connected client's connection still carries its name.
    assert_eq!(named("staying-app").await, kept);
}
