//! A client's prepared statements carried to a takeover's successor: their client-side
//! names and definitions (query text and parameter types as the client sent them).
//!
//! Part of the client's statements. The successor takes them as fresh Parses it has not
//! sent yet: the first Bind or Describe of each prepares it on whichever server connection
//! the client gets and describes it, as for a shared statement a connection lacks (see
//! [`super`]), and from then on it is shared there like any other.

use bytes::Bytes;

use super::{ClientStatements, StmtDef};

impl ClientStatements {
    /// (client name, definition) of each statement, to carry.
    pub(crate) fn export(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.by_name
            .iter()
            .map(|(name, s)| (name.clone(), s.def.to_vec()))
            .collect()
    }

    /// Takes statements carried from another process (see the module doc).
    pub(crate) fn import(&mut self, carried: Vec<(Vec<u8>, Vec<u8>)>) {
        for (name, def) in carried {
            let stmt = StmtDef {
                id: self.registry.fresh_id(),
                def: Bytes::from(def),
                server_def: None,
            };
            if let Some(old) = self.by_name.insert(name, stmt) {
                self.release(old);
            }
        }
    }
}
