//! Where a CancelRequest for a session of another instance goes: the listener address each
//! instance of the cluster publishes, found from the cancel key.
//!
//! Part of the cluster coordination, read by the cancel registry (one layer up) when a key is
//! not this instance's. Rebuilt by the coordinator every round from the snapshot it takes
//! anyway (docs/cluster.md, "Cancel requests"): a session-mode key carries the real backend
//! pid, which sits on a seat (its marker) whose lease names the instance; a transaction-mode
//! key carries a made-up pid whose high bits are the issuing instance's tag ([`tag_of`]).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::Range;

/// The tags a transaction-mode pid can carry in its bits 16 to 30: from 64, so every such pid
/// is at least 2^22, above Linux's largest process id.
pub const TAGS: Range<u32> = 64..32768;

/// The tag of the instance with id `id` (eight hex digits): the same in every instance.
pub fn tag_of(id: &str) -> Option<u16> {
    let x = u32::from_str_radix(id, 16).ok()?;
    u16::try_from(TAGS.start + x % (TAGS.end - TAGS.start)).ok()
}

/// The other instances' addresses, by tag and by the backend pids of their connections.
#[derive(Debug, Default, Clone)]
pub(crate) struct Routes {
    tags: HashMap<u16, Vec<SocketAddr>>,
    backends: HashMap<i32, SocketAddr>,
}

impl Routes {
    /// Routes from one snapshot: `instances` maps each other instance's coordination pid to
    /// its id and published address, `leases` seats to their lease holders, `sitters` seats to
    /// the backends sitting on them.
    pub(crate) fn build(
        instances: &BTreeMap<i32, (String, SocketAddr)>,
        leases: &BTreeMap<i32, i32>,
        sitters: &[(i32, i32)],
    ) -> Routes {
        let mut r = Routes::default();
        for (id, addr) in instances.values() {
            if let Some(t) = tag_of(id) {
                r.tags.entry(t).or_default().push(*addr);
            }
        }
        for (seat, backend) in sitters {
            let owner = leases.get(seat).and_then(|holder| instances.get(holder));
            if let Some((_, addr)) = owner {
                r.backends.insert(*backend, *addr);
            }
        }
        r
    }

    /// Instances whose tag is `tag` (one, unless two instance ids share a tag).
    pub(crate) fn by_tag(&self, tag: u16) -> Vec<SocketAddr> {
        self.tags.get(&tag).cloned().unwrap_or_default()
    }

    /// The instance whose connection runs on backend `pid`.
    pub(crate) fn by_backend(&self, pid: i32) -> Option<SocketAddr> {
        self.backends.get(&pid).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_route_by_tag_and_by_the_seat_a_backend_sits_on() {
        let a: SocketAddr = "10.0.0.1:6432".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:6432".parse().unwrap();
        let instances = BTreeMap::from([(100, ("0000002a".to_string(), a)), (200, ("ffffffff".to_string(), b))]);
        // Seats 0 and 1 leased by 100, seat 2 by 200, seat 3 by someone not listed (this one).
        let leases = BTreeMap::from([(0, 100), (1, 100), (2, 200), (3, 300)]);
        let r = Routes::build(&instances, &leases, &[(1, 4242), (2, 4343), (3, 4444), (9, 4545)]);
        assert_eq!(r.by_tag(tag_of("0000002a").unwrap()), vec![a]);
        assert_eq!(r.by_tag(tag_of("ffffffff").unwrap()), vec![b]);
        assert_eq!((r.by_backend(4242), r.by_backend(4343)), (Some(a), Some(b)));
        assert_eq!(
            (r.by_backend(4444), r.by_backend(4545)),
            (None, None),
            "own or unleased"
        );
        for id in ["00000000", "ffffffff", "12345678"] {
            let t = u32::from(tag_of(id).unwrap());
            assert!(TAGS.contains(&t) && (t << 16) >= 1 << 22 && (t << 16 | 0xffff) <= i32::MAX as u32);
        }
    }
}
