//! The handles a client session uses, in one struct the composition root builds
//! (the proxy): the live configuration, the pools, admission, cancel keys, the session
//! registry, auth_query, statement ids, PAUSE state, database holds, the shutdown phase and
//! the console.
//!
//! Part of the client layer: everything here is a service below the session (or the console,
//! beside it, behind [`super::Console`]); nothing here knows the proxy.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::admission::Admission;
use crate::cancel::CancelRegistry;
use crate::config::{Config, ScramVerifier};
use crate::dbgate::DbGates;
use crate::pool::{Pauses, PoolSet};
use crate::server::auth_query::AuthQuery;
use crate::sessions::{Pins, Sessions};
use crate::shutdown::PhaseBell;

use super::{Console, StatementRegistry};

/// What every session of one proxy shares (each a handle to a service; see the module doc).
#[derive(Debug)]
pub struct Services {
    /// The configuration in force (replaced whole by a reload; see [`Services::config`]).
    pub(crate) live_config: Arc<ArcSwap<Config>>,
    /// Server connection pools.
    pub pools: PoolSet,
    /// Cancel keys.
    pub(crate) cancels: Arc<CancelRegistry>,
    /// Client admission.
    pub admission: Admission,
    /// Shutdown phase, as sessions follow it.
    pub(crate) phase_bell: Arc<PhaseBell>,
    /// Verifier used for unknown users, so they cost the same SCRAM exchange as known ones.
    pub(crate) decoy_verifier: ScramVerifier,
    /// Users looked up with auth_query: verifiers, learned keys, failed logins.
    pub auth: Arc<AuthQuery>,
    /// Sessions pinned to a server connection in transaction mode, so far.
    pub pins: Arc<Pins>,
    /// Proxy-wide ids of prepared statement definitions (transaction mode).
    pub statements: Arc<StatementRegistry>,
    /// Client sessions and the backends they use.
    pub sessions: Arc<Sessions>,
    /// Databases paused from the console.
    pub(crate) pauses: Pauses,
    /// Holds on server databases a client's DROP/ALTER/CREATE DATABASE needs to itself.
    pub(crate) gates: Arc<DbGates>,
    /// Listening connections of transaction-mode clients (LISTEN/NOTIFY).
    pub(crate) notify: Arc<crate::notify::Hub>,
    /// Serves users of the console database.
    pub console: Arc<dyn Console>,
    /// Moving idle clients to a takeover's successor (see `takeover`).
    pub(crate) handoff: Arc<super::Handoff>,
    /// Each core's read buffers for its clients' next transactions.
    pub(crate) read_buffers: super::buffers::ReadBuffers,
}

impl Services {
    /// The configuration in force now (cheap: no shared reference count is touched). Take
    /// it once per use and do not hold it across long waits: a reload may replace it.
    pub fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.live_config.load()
    }
}
