//! Gates on server databases: while a client's `DROP DATABASE x`, `ALTER DATABASE x RENAME
//! TO ...` (or `SET TABLESPACE`) or `CREATE DATABASE ... TEMPLATE x` runs, pgvalve keeps its
//! own connections away from x, so PostgreSQL does not refuse the statement with "database x
//! is being accessed by other users" because of pgvalve's idle ones.
//!
//! A service of the services layer. The relay raises a [`Hold`] on the database (through the
//! [`ServerGate`] of its server) just before it forwards such a statement, and drops it when
//! the statement's ReadyForQuery comes back or the session ends. Raising a hold runs the
//! closers the services with connections of their own registered ([`DbGates::on_hold`]: the
//! pools close their idle connections to x) and tells watchers ([`DbGates::subscribe`]: the
//! lock monitor drops its connection to x). While a hold is up: the closers run again every
//! 50 ms (a connection that comes back to a pool idle is closed too), new pool checkouts and
//! auth_query look-ups for x wait for it ([`DbGates::wait_open`], bounded), and the lock
//! monitor does not connect to x. PostgreSQL itself waits up to 5 s for other backends of x to
//! exit, so connections closed this way are gone by the time it decides. Busy connections are
//! left alone: PostgreSQL's error (SQLSTATE 55006) then reaches the client unchanged.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

/// How often the closers run again while a hold is up.
const SWEEP_EVERY: Duration = Duration::from_millis(50);

/// A database on a PostgreSQL server, as the pools' targets name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerDb {
    /// Host name, address or Unix-socket directory, as configured.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database name on the server.
    pub dbname: String,
}

impl ServerDb {
    /// Whether this is `dbname` on `host`:`port`.
    pub fn is(&self, host: &str, port: u16, dbname: &str) -> bool {
        self.port == port && self.dbname == dbname && self.host == host
    }
}

/// Closes a service's own idle connections to a database; returns how many it closed.
pub type Closer = Box<dyn Fn(&ServerDb) -> usize + Send + Sync>;

/// The gates of one proxy (see the module doc).
#[derive(Default)]
pub struct DbGates {
    inner: Arc<Inner>,
    /// One gate per server, made on first use and kept (there are as many as configured
    /// servers).
    servers: Mutex<Vec<Arc<ServerGate>>>,
}

impl std::fmt::Debug for DbGates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbGates")
            .field("held", &self.held())
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// Holds up, over all databases: checked first, so a gate costs one atomic load while
    /// none is up.
    up: AtomicUsize,
    state: Mutex<State>,
    closers: Mutex<Vec<Closer>>,
    /// Bumped whenever a hold is raised or dropped.
    changed: watch::Sender<u64>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            up: AtomicUsize::new(0),
            state: Mutex::default(),
            closers: Mutex::default(),
            changed: watch::Sender::new(0),
        }
    }
}

#[derive(Default)]
struct State {
    /// Databases held, with their number of holds.
    holds: Vec<(ServerDb, usize)>,
    /// The sweeping task runs.
    sweeping: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DbGates {
    /// Registers `closer`, run when a hold is raised and every 50 ms while one is up.
    pub fn on_hold(&self, closer: Closer) {
        lock(&self.inner.closers).push(closer);
    }

    /// The gate of the server at `host`:`port` (the same one for every caller).
    pub fn server(&self, host: &str, port: u16) -> Arc<ServerGate> {
        let mut servers = lock(&self.servers);
        if let Some(g) = servers.iter().find(|g| g.port == port && g.host == host) {
            return g.clone();
        }
        let g = Arc::new(ServerGate {
            inner: self.inner.clone(),
            host: host.to_string(),
            port,
        });
        servers.push(g.clone());
        g
    }

    /// Whether a hold is up on `dbname` at `host`:`port` (one atomic load while none is up).
    #[inline]
    pub fn is_held(&self, host: &str, port: u16, dbname: &str) -> bool {
        self.inner.up.load(Ordering::Acquire) > 0 && self.inner.held(host, port, dbname)
    }

    /// The databases held now.
    pub fn held(&self) -> Vec<ServerDb> {
        lock(&self.inner.state).holds.iter().map(|(db, _)| db.clone()).collect()
    }

    /// Waits until no hold is up on `dbname` at `host`:`port`, at most `max`. True when none
    /// is up (at once, nearly always), false when it waited `max` and one still is.
    pub async fn wait_open(&self, host: &str, port: u16, dbname: &str, max: Duration) -> bool {
        if !self.is_held(host, port, dbname) {
            return true;
        }
        tracing::debug!(
            host,
            port,
            dbname,
            "waiting for a statement that needs the database to itself"
        );
        let mut changes = self.inner.changed.subscribe();
        let deadline = tokio::time::Instant::now() + max;
        loop {
            if !self.is_held(host, port, dbname) {
                return true;
            }
            if !matches!(tokio::time::timeout_at(deadline, changes.changed()).await, Ok(Ok(()))) {
                return !self.is_held(host, port, dbname);
            }
        }
    }

    /// A receiver that sees every hold raised or dropped (`changed()` wakes).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }
}

impl Inner {
    fn held(&self, host: &str, port: u16, dbname: &str) -> bool {
        lock(&self.state).holds.iter().any(|(db, _)| db.is(host, port, dbname))
    }

    fn close(&self, db: &ServerDb) -> usize {
        lock(&self.closers).iter().map(|c| c(db)).sum()
    }

    fn raise(self: &Arc<Self>, db: ServerDb, statement: &str) -> Hold {
        let sweep = {
            let mut st = lock(&self.state);
            match st.holds.iter_mut().find(|(d, _)| *d == db) {
                Some((_, n)) => *n += 1,
                None => st.holds.push((db.clone(), 1)),
            }
            self.up.fetch_add(1, Ordering::AcqRel);
            !std::mem::replace(&mut st.sweeping, true)
        };
        self.changed.send_modify(|v| *v += 1);
        let closed = self.close(&db);
        tracing::info!(
            statement,
            db = %db.dbname,
            server = %format_args!("{}:{}", db.host, db.port),
            closed,
            "a client statement needs the database to itself: closed pgvalve's idle connections to it; new ones wait until it is done"
        );
        if sweep {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(sweep_while_held(self.clone()));
                }
                Err(_) => lock(&self.state).sweeping = false,
            }
        }
        Hold {
            inner: self.clone(),
            db,
        }
    }

    fn release(&self, db: &ServerDb) {
        {
            let mut st = lock(&self.state);
            if let Some(i) = st.holds.iter().position(|(d, _)| d == db) {
                st.holds[i].1 -= 1;
                if st.holds[i].1 == 0 {
                    st.holds.swap_remove(i);
                }
                self.up.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.changed.send_modify(|v| *v += 1);
        tracing::debug!(db = %db.dbname, "database hold dropped");
    }
}

/// While any hold is up: runs the closers for each held database every [`SWEEP_EVERY`], so a
/// connection that was busy when the hold was raised is closed once it is idle.
async fn sweep_while_held(inner: Arc<Inner>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let held: Vec<ServerDb> = {
            let mut st = lock(&inner.state);
            if st.holds.is_empty() {
                st.sweeping = false;
                return;
            }
            st.holds.iter().map(|(db, _)| db.clone()).collect()
        };
        for db in &held {
            let closed = inner.close(db);
            if closed > 0 {
                tracing::debug!(db = %db.dbname, closed, "closed server connections that came back idle during a database hold");
            }
        }
    }
}

/// The gate of one server: where a session's statements go.
pub struct ServerGate {
    inner: Arc<Inner>,
    host: String,
    port: u16,
}

impl std::fmt::Debug for ServerGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerGate({}:{})", self.host, self.port)
    }
}

impl ServerGate {
    /// Raises a hold on `dbname` of this server for `statement` (named in the log):
    /// pgvalve's idle connections to it are closed now (and while the hold is up), new ones
    /// wait. Dropping the hold lets them go.
    pub fn hold(&self, dbname: &str, statement: &str) -> Hold {
        let db = ServerDb {
            host: self.host.clone(),
            port: self.port,
            dbname: dbname.to_string(),
        };
        self.inner.raise(db, statement)
    }
}

/// A hold on one database, dropped when the statement that needed it is done.
pub struct Hold {
    inner: Arc<Inner>,
    db: ServerDb,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Hold").field(&self.db).finish()
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.inner.release(&self.db);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn counting(gates: &DbGates) -> Arc<Mutex<Vec<String>>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        gates.on_hold(Box::new(move |db| {
            lock(&s).push(format!("{}:{}/{}", db.host, db.port, db.dbname));
            1
        }));
        seen
    }

    #[test]
    fn a_hold_closes_once_and_gates_only_its_database_until_dropped() {
        let gates = DbGates::default();
        let seen = counting(&gates);
        let a = gates.server("db1", 5432);
        assert!(Arc::ptr_eq(&a, &gates.server("db1", 5432)), "one gate per server");
        assert!(!gates.is_held("db1", 5432, "x"));
        let h = a.hold("x", "DROP DATABASE");
        assert_eq!(*lock(&seen), ["db1:5432/x"], "the closers ran for x");
        assert!(gates.is_held("db1", 5432, "x"));
        assert!(!gates.is_held("db1", 5432, "y"), "another database");
        assert!(!gates.is_held("db2", 5432, "x"), "another server");
        assert!(!gates.is_held("db1", 5433, "x"), "another port");
        // Two holds on one database: it stays held until both are dropped.
        let h2 = a.hold("x", "DROP DATABASE");
        drop(h);
        assert!(gates.is_held("db1", 5432, "x"));
        assert_eq!(gates.held().len(), 1);
        drop(h2);
        assert!(!gates.is_held("db1", 5432, "x"));
        assert!(gates.held().is_empty());
        assert_eq!(gates.inner.up.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn checkouts_wait_for_the_hold_and_no_longer_than_the_bound() {
        let gates = Arc::new(DbGates::default());
        let hold = gates.server("h", 1).hold("x", "DROP DATABASE");
        // Not held: at once.
        assert!(gates.wait_open("h", 1, "y", Duration::from_secs(1)).await);
        // Held past the bound: false after the bound.
        assert!(!gates.wait_open("h", 1, "x", Duration::from_secs(1)).await);
        // Released while waiting: true.
        let g = gates.clone();
        let waiter = tokio::spawn(async move { g.wait_open("h", 1, "x", Duration::from_secs(60)).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        drop(hold);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn closers_run_again_while_held_and_the_sweep_ends_with_the_hold() {
        let gates = DbGates::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        gates.on_hold(Box::new(move |_| {
            r.fetch_add(1, Ordering::Relaxed);
            0
        }));
        let hold = gates.server("h", 1).hold("x", "DROP DATABASE");
        assert_eq!(runs.load(Ordering::Relaxed), 1);
        tokio::time::sleep(SWEEP_EVERY * 3 + SWEEP_EVERY / 2).await;
        let swept = runs.load(Ordering::Relaxed);
        assert!(swept >= 3, "{swept}");
        drop(hold);
        tokio::time::sleep(SWEEP_EVERY * 2).await;
        assert!(!lock(&gates.inner.state).sweeping, "the sweep ended");
        let after = runs.load(Ordering::Relaxed);
        tokio::time::sleep(SWEEP_EVERY * 4).await;
        assert_eq!(runs.load(Ordering::Relaxed), after);
        // A new hold starts a new sweep.
        let _again = gates.server("h", 1).hold("x", "DROP DATABASE");
        tokio::time::sleep(SWEEP_EVERY * 2).await;
        assert!(runs.load(Ordering::Relaxed) > after + 1);
    }

    #[tokio::test]
    async fn watchers_see_holds_raised_and_dropped() {
        let gates = DbGates::default();
        let mut rx = gates.subscribe();
        let hold = gates.server("h", 1).hold("x", "DROP DATABASE");
        rx.changed().await.unwrap();
        assert_eq!(gates.held()[0].dbname, "x");
        drop(hold);
        rx.changed().await.unwrap();
        assert!(gates.held().is_empty());
    }
}
