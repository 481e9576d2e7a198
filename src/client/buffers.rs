//! Read buffers of transaction-mode clients between their transactions: each core keeps a
//! few for its next clients, so a transaction takes one already allocated (and recently used)
//! instead of allocating 8 KiB and freeing it again.
//!
//! Part of the client session: one [`ReadBuffers`] per proxy (in `Services`), one [`Stash`]
//! per core, which each client connection of the core holds. An idle client holds no read
//! buffer (see `ClientConn::wait_idle`): it gives its buffer back when it goes idle and takes
//! one when its next request arrives. A stash keeps at most [`KEPT`] buffers of the standard
//! size; more, or larger ones, are freed, so what the stashes hold is bounded whatever the
//! number of clients. Only the core's own event loop takes a stash's lock: it is never
//! contended, and no core waits on another.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::BytesMut;

/// A client's read buffer.
pub(crate) const SIZE: usize = 8192;

/// Buffers a core keeps (16 × 8 KiB).
const KEPT: usize = 16;

/// Each core's stash.
#[derive(Debug)]
pub(crate) struct ReadBuffers {
    cores: Box<[Arc<Stash>]>,
}

impl ReadBuffers {
    /// Stashes for `cores` cores.
    pub(crate) fn new(cores: usize) -> Self {
        Self {
            cores: (0..cores.max(1)).map(|_| Arc::default()).collect(),
        }
    }

    /// Core `core`'s stash (the last one for a larger `core`).
    pub(crate) fn of(&self, core: usize) -> Arc<Stash> {
        self.cores[core.min(self.cores.len() - 1)].clone()
    }
}

/// One core's read buffers.
#[derive(Debug, Default)]
pub(crate) struct Stash(Mutex<Vec<BytesMut>>);

impl Stash {
    fn lock(&self) -> MutexGuard<'_, Vec<BytesMut>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An empty buffer of [`SIZE`] bytes.
    pub(crate) fn take(&self) -> BytesMut {
        self.lock().pop().unwrap_or_else(|| BytesMut::with_capacity(SIZE))
    }

    /// Keeps `buf` for the core's next client when it is empty, holds a whole allocation of
    /// the standard size (no bytes of it are elsewhere) and the stash has room; frees it else.
    pub(crate) fn give(&self, mut buf: BytesMut) {
        if !buf.is_empty() || !buf.try_reclaim(SIZE) || buf.capacity() != SIZE {
            return;
        }
        let mut stash = self.lock();
        if stash.len() < KEPT {
            stash.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_whole_standard_buffers_up_to_its_bound() {
        let b = ReadBuffers::new(2);
        let (zero, one) = (b.of(0), b.of(1));
        let mut used = zero.take();
        let at = used.as_ptr();
        used.extend_from_slice(b"Q....SELECT 1");
        // Read to the end; the part split off (as the relay may) is gone by then.
        drop(used.split_to(used.len()));
        zero.give(used);
        let again = b.of(0).take();
        assert_eq!(
            (again.as_ptr(), again.capacity(), again.len()),
            (at, SIZE, 0),
            "the same allocation, whole"
        );
        // Not kept: bytes still in it, part of it elsewhere, another size.
        let mut full = BytesMut::with_capacity(SIZE);
        full.extend_from_slice(b"x");
        one.give(full);
        let mut shared = BytesMut::with_capacity(SIZE);
        shared.extend_from_slice(b"abc");
        let _elsewhere = shared.split_to(3);
        one.give(shared);
        one.give(BytesMut::with_capacity(4 * SIZE));
        one.give(BytesMut::new());
        assert!(one.lock().is_empty());
        for _ in 0..KEPT + 5 {
            one.give(BytesMut::with_capacity(SIZE));
        }
        assert_eq!(one.lock().len(), KEPT);
        assert!(zero.lock().is_empty(), "each core its own");
    }
}
