//! Which proxy-named prepared statements (`pgv_<id>`) one server connection has, least
//! recently used first, bounded by `max_prepared_statements`.
//!
//! Part of the server connection; the client session's statement tracking in transaction
//! mode reads and updates it (see `client::prepared`). A reset (DISCARD ALL) empties it.

use std::collections::VecDeque;

/// Which statements a server connection has prepared, least recently used first.
#[derive(Debug, Default, Clone)]
pub struct ServerStatements {
    lru: VecDeque<u64>,
    /// Prepared on the server but unusable (its plan changed result type): close before reuse.
    stale: Vec<u64>,
}

impl ServerStatements {
    /// Whether `id` is prepared; marks it recently used.
    pub(crate) fn touch(&mut self, id: u64) -> bool {
        match self.lru.iter().position(|&x| x == id) {
            Some(i) => {
                self.lru.remove(i);
                self.lru.push_back(id);
                true
            }
            None => false,
        }
    }

    /// Records `id` as prepared; returns the statement to close first when over `cap`.
    pub fn insert(&mut self, id: u64, cap: usize) -> Option<u64> {
        self.lru.push_back(id);
        (self.lru.len() > cap.max(1)).then(|| self.lru.pop_front()).flatten()
    }

    /// Forgets `id` (its Parse failed).
    pub fn remove(&mut self, id: u64) {
        self.lru.retain(|&x| x != id);
    }

    /// `id` still exists on the server but must be closed and prepared again.
    pub(crate) fn mark_stale(&mut self, id: u64) {
        self.remove(id);
        if !self.stale.contains(&id) {
            self.stale.push(id);
        }
    }

    /// True (once) when `id` was marked stale: the caller closes it before preparing again.
    pub(crate) fn take_stale(&mut self, id: u64) -> bool {
        match self.stale.iter().position(|&x| x == id) {
            Some(i) => {
                self.stale.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Forgets everything (the server deallocated all statements).
    pub fn clear(&mut self) {
        self.lru.clear();
        self.stale.clear();
    }

    /// Number prepared.
    pub fn len(&self) -> usize {
        self.lru.len()
    }

    /// True when none is prepared.
    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
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
        assert!(s.touch(1));
        assert_eq!(s.insert(3, 2), Some(2));
        assert!(s.touch(1) && s.touch(3) && !s.touch(2));
    }
}
