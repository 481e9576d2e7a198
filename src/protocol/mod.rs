//! PostgreSQL v3 wire protocol, as much as the proxy needs: header framing on the hot path,
//! the startup packet, and the few messages the proxy says or reads itself.

pub mod frame;
pub mod messages;
pub mod startup;
