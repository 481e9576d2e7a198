//! Session threads: single-threaded event loops that session-mode client sessions run on.
//!
//! Beside the listener. In session mode a client keeps one server connection for its whole
//! session, so the client socket, the server socket and the session's task can all live on one
//! thread: no wakeup crosses threads, as in PgBouncer's single event loop, while there is
//! still one loop per core. The listener hands each accepted socket to the next thread in turn
//! ([`SessionThreads::spawn`]) when every pool is in session mode; otherwise sessions run on
//! the shared runtime, where a transaction-mode server connection moves from client to client
//! (and between threads) at every transaction. Everything the sessions share (admission,
//! pools, the registry) is behind the same handles either way.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::admission::ClientPermit;
use crate::client::Services;

/// The session threads of one proxy; they stop when this is dropped or [`Self::stop`]ped.
#[derive(Debug)]
pub struct SessionThreads {
    handles: Vec<Handle>,
    next: AtomicUsize,
    spawned: AtomicU64,
    stop: watch::Sender<bool>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl SessionThreads {
    /// Starts `n` threads (n ≥ 1), each running a current-thread runtime until stopped.
    ///
    /// # Errors
    /// A runtime or thread that could not be created.
    pub fn start(n: usize) -> std::io::Result<Self> {
        let (stop, _) = watch::channel(false);
        let (mut handles, mut threads) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(rt.handle().clone());
            let mut stopped = stop.subscribe();
            let thread = std::thread::Builder::new()
                .name(format!("pgvalve-session-{i}"))
                .spawn(move || {
                    rt.block_on(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    });
                })?;
            threads.push(thread);
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
            spawned: AtomicU64::new(0),
            stop,
            threads: Mutex::new(threads),
        })
    }

    /// How many threads there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Always false: there is at least one thread.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Sessions started on these threads so far.
    pub fn spawned(&self) -> u64 {
        self.spawned.load(Ordering::Relaxed)
    }

    /// Serves an accepted client on the next thread in turn (its socket moves to that
    /// thread's event loop). A socket that cannot be moved is closed.
    pub fn spawn(
        &self,
        tracker: &TaskTracker,
        shared: Arc<Services>,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        permit: Option<ClientPermit>,
    ) {
        let std = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, %peer, "cannot move a client socket to a session thread; closed");
                return;
            }
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.spawned.fetch_add(1, Ordering::Relaxed);
        tracker.spawn_on(crate::client::serve(shared, std, peer, permit, i), &self.handles[i]);
    }

    /// Serves a client moved here from a takeover's predecessor (see
    /// [`crate::client::resume`]) on the next thread in turn.
    pub(crate) fn spawn_moved(
        &self,
        tracker: &TaskTracker,
        shared: Arc<Services>,
        std: std::net::TcpStream,
        moved: crate::client::MovedState,
        permit: Option<ClientPermit>,
    ) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.spawned.fetch_add(1, Ordering::Relaxed);
        tracker.spawn_on(crate::client::resume(shared, std, moved, permit, i), &self.handles[i]);
    }

    /// Stops the threads (sessions still on them end) and waits for them to finish.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

impl Drop for SessionThreads {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// How many session threads a configuration asks for: `session_threads` when set, else as
/// many as the runtime has workers when that is two or more (none with one worker: the whole
/// proxy is one event loop then).
pub(crate) fn wanted(session_threads: Option<usize>, worker_threads: usize) -> usize {
    match (session_threads, worker_threads) {
        (Some(n), _) => n,
        (None, 1) => 0,
        (None, 0) => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            if cores >= 2 {
                cores
            } else {
                0
            }
        }
        (None, n) => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_follows_the_worker_threads_unless_set() {
        assert_eq!(wanted(Some(3), 1), 3);
        assert_eq!(wanted(Some(0), 4), 0);
        assert_eq!(wanted(None, 1), 0);
        assert_eq!(wanted(None, 4), 4);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(wanted(None, 0), if cores >= 2 { cores } else { 0 });
    }

    #[tokio::test]
    async fn threads_run_tasks_and_stop() {
        let threads = SessionThreads::start(2).expect("threads");
        assert_eq!(threads.len(), 2);
        let (tx, rx) = tokio::sync::oneshot::channel();
        threads.handles[1].spawn(async move {
            let _ = tx.send(std::thread::current().name().map(str::to_string));
        });
        assert_eq!(rx.await.expect("ran").as_deref(), Some("pgvalve-session-1"));
        threads.stop().await;
        assert!(threads.threads.lock().expect("lock").is_empty());
    }
}
