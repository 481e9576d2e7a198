//! Which proxy-named prepared statements (`pgv_<n>`) one server connection has: for each, the
//! shared statement it serves and its server name, least recently used first, bounded by
//! `max_prepared_statements`; copies that must not serve their statement again (stale); and
//! names nothing uses any more, to close at the start of the connection's next relay.
//!
//! Part of the server connection; the client session's statement tracking in transaction
//! mode reads and updates it (see `client::prepared`). A reset (DISCARD ALL) empties it.
//! A statement's server name is `pgv_<its id>`, except where a client's fresh Parse turned out
//! to describe exactly like a shared statement the connection lacked: that copy keeps the
//! name it was parsed under and serves the shared statement from then on.

use std::collections::VecDeque;

/// One statement prepared on the server: the shared statement `id`, named `pgv_<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Copy {
    id: u64,
    name: u64,
}

/// Which statements a server connection has prepared, least recently used first.
#[derive(Debug, Default, Clone)]
pub struct ServerStatements {
    lru: VecDeque<Copy>,
    /// Prepared on the server but not to be used for their statement again (its plan changed
    /// result type, or a fresh Parse described otherwise): closed before it is prepared again.
    stale: Vec<Copy>,
    /// Names on the server that nothing uses any more: closed at the next relay's start.
    closing: Vec<u64>,
    /// How many shared statements had died (proxy-wide count) when this connection last
    /// looked for copies to close.
    deaths_seen: u64,
}

impl ServerStatements {
    /// The server name of statement `id` when prepared here; marks it recently used.
    #[inline]
    pub(crate) fn touch(&mut self, id: u64) -> Option<u64> {
        let i = self.lru.iter().rposition(|c| c.id == id)?;
        let c = self.lru[i];
        if i + 1 != self.lru.len() {
            self.lru.remove(i);
            self.lru.push_back(c);
        }
        Some(c.name)
    }

    /// Records `id` as prepared under its own name; returns the name to close first when
    /// over `cap`.
    pub fn insert(&mut self, id: u64, cap: usize) -> Option<u64> {
        self.lru.push_back(Copy { id, name: id });
        (self.lru.len() > cap.max(1))
            .then(|| self.lru.pop_front())
            .flatten()
            .map(|c| c.name)
    }

    /// Forgets `id` (its Parse failed or was skipped: the server does not have it).
    pub fn remove(&mut self, id: u64) {
        self.lru.retain(|c| c.id != id);
    }

    /// `id` still exists on the server but must be closed and prepared again.
    pub(crate) fn mark_stale(&mut self, id: u64) {
        let (stale, kept): (Vec<Copy>, Vec<Copy>) = self.lru.drain(..).partition(|c| c.id == id);
        self.lru = kept.into();
        self.stale.extend(stale);
    }

    /// The name of a stale copy of `id` (once): the caller closes it before preparing again.
    pub(crate) fn take_stale(&mut self, id: u64) -> Option<u64> {
        let i = self.stale.iter().position(|c| c.id == id)?;
        Some(self.stale.swap_remove(i).name)
    }

    /// A fresh Parse prepared here as `k` describes like shared statement `id`: the copy
    /// serves `id` from now on, or is closed when the connection has `id` already.
    pub(crate) fn resolve(&mut self, k: u64, id: u64) {
        if k == id {
            return;
        }
        if self.lru.iter().any(|c| c.id == id) {
            self.discard(k);
        } else {
            for c in self.lru.iter_mut().filter(|c| c.id == k) {
                c.id = id;
            }
        }
        // The fresh copy replaces a stale one.
        while let Some(name) = self.take_stale(id) {
            self.closing.push(name);
        }
    }

    /// Copies of `id`, if any, are closed at the next relay's start (nothing uses them).
    pub(crate) fn discard(&mut self, id: u64) {
        self.sweep(|x| x == id);
    }

    /// Copies of statements `dead` says no client uses any more are closed at the next
    /// relay's start.
    pub(crate) fn sweep(&mut self, dead: impl Fn(u64) -> bool) {
        let closing = &mut self.closing;
        self.lru.retain(|c| {
            let d = dead(c.id);
            if d {
                closing.push(c.name);
            }
            !d
        });
        self.stale.retain(|c| {
            let d = dead(c.id);
            if d {
                closing.push(c.name);
            }
            !d
        });
    }

    /// Server name `name` is closed at the next relay's start (its Close was skipped).
    pub(crate) fn close_later(&mut self, name: u64) {
        self.closing.push(name);
    }

    /// True (once) when name `name` waits to be closed: the caller closes it now, before
    /// preparing a statement under that name.
    pub(crate) fn unclose(&mut self, name: u64) -> bool {
        match self.closing.iter().position(|&n| n == name) {
            Some(i) => {
                self.closing.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// The names to close now.
    pub(crate) fn take_closing(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.closing)
    }

    /// Whether names wait to be closed.
    #[inline]
    pub(crate) fn has_closing(&self) -> bool {
        !self.closing.is_empty()
    }

    /// The proxy-wide death count last looked at.
    #[inline]
    pub(crate) fn deaths_seen(&self) -> u64 {
        self.deaths_seen
    }

    /// Records that deaths up to `n` were looked at.
    pub(crate) fn set_deaths_seen(&mut self, n: u64) {
        self.deaths_seen = n;
    }

    /// Forgets everything (the server deallocated all statements).
    pub fn clear(&mut self) {
        self.lru.clear();
        self.stale.clear();
        self.closing.clear();
    }

    /// Number prepared on the server (in use, stale, or waiting to be closed).
    pub fn len(&self) -> usize {
        self.lru.len() + self.stale.len() + self.closing.len()
    }

    /// True when none is prepared.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_least_recently_used() {
        let mut s = ServerStatements::default();
        assert_eq!(s.insert(1, 2), None);
        assert_eq!(s.insert(2, 2), None);
        assert!(s.touch(1).is_some());
        assert_eq!(s.insert(3, 2), Some(2));
        assert!(s.touch(1).is_some() && s.touch(3).is_some() && s.touch(2).is_none());
    }

    #[test]
    fn a_fresh_copy_serves_the_shared_statement_or_is_closed() {
        let mut s = ServerStatements::default();
        s.insert(10, 5);
        s.resolve(10, 4);
        assert_eq!(s.touch(4), Some(10), "copy pgv_10 serves statement 4");
        assert_eq!(s.touch(10), None);
        s.insert(11, 5);
        s.resolve(11, 4);
        assert_eq!(s.take_closing(), vec![11], "statement 4 is here already");
        s.mark_stale(4);
        assert_eq!(s.touch(4), None);
        s.insert(12, 5);
        s.resolve(12, 4);
        assert_eq!(s.touch(4), Some(12));
        assert_eq!(s.take_closing(), vec![10], "the stale copy is closed");
        s.sweep(|id| id == 4);
        assert_eq!((s.touch(4), s.take_closing()), (None, vec![12]));
        assert!(s.is_empty());
    }
}
