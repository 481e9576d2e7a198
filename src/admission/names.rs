//! The maps admission keeps by name (identities, gates), and the look-up it uses on the hot
//! path.
//!
//! Part of admission, under its lock. A name is an `Arc<str>` shared by the map and by
//! whoever asks (a member's identity, a pool part's gate), but `Arc<str>`'s own equality
//! compares the bytes even when both are the same allocation: every hit would `memcmp` its
//! ~30 bytes. [`Same`] looks a name up comparing the pointers first.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// A map by name, with the proxy's fast hasher.
pub(crate) type NameMap<V> = hashbrown::HashMap<Arc<str>, V, foldhash::fast::RandomState>;

/// Looks `Arc<str>` keys up by pointer first, then by content (hashes as the name does).
pub(crate) struct Same<'a>(pub(crate) &'a Arc<str>);

impl Hash for Same<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // As `Arc<str>`'s (and `str`'s) own hash, so an equal name finds the same bucket.
        (**self.0).hash(h);
    }
}

impl hashbrown::Equivalent<Arc<str>> for Same<'_> {
    fn equivalent(&self, key: &Arc<str>) -> bool {
        Arc::ptr_eq(self.0, key) || **self.0 == **key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_same_allocation_and_an_equal_name() {
        let mut m: NameMap<u32> = NameMap::default();
        let a: Arc<str> = Arc::from("pool#0");
        m.insert(a.clone(), 1);
        assert_eq!(m.get(&Same(&a)), Some(&1), "the very key");
        let b: Arc<str> = Arc::from("pool#0");
        assert_eq!(m.get(&Same(&b)), Some(&1), "an equal name in another allocation");
        assert_eq!(m.get("pool#0"), Some(&1), "by str");
        assert_eq!(m.get(&Same(&Arc::from("pool#1"))), None);
    }
}
