//! Rejoining: a client that logged in on a takeover's predecessor becomes a member here
//! without a new login (see `takeover`).
//!
//! Part of admission. The client is connected already and was admitted once: it is named
//! by the identity rules as at login and counted among its identity's clients, but neither
//! its identity's client cap nor its login rate applies, and it counts as no login for surge
//! detection (a takeover moving hundreds of clients at once is not a surge).

use tokio::time::Instant;

use super::identity::ClientFacts;
use super::{Admission, Member};

impl Admission {
    /// The member for a client moved from another process (see the module doc).
    pub(crate) fn rejoin(&self, facts: &ClientFacts<'_>) -> Member {
        let mut st = self.state();
        let st = &mut *st;
        let id = st.identify(facts, Instant::now(), &self.inner.cores);
        self.lease_identity(&id);
        let ident = st.ids.get_mut(&id).expect("invariant: identify made the entry");
        ident.clients += 1;
        Member {
            admission: self.clone(),
            identity: id,
            local: None,
            notice_after: ident.limits.queue_notice_after,
        }
    }
}
