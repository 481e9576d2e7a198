//! PostgreSQL v3 wire protocol, as much as the proxy needs: header framing on the hot path,
//! the startup packet, the few messages the proxy says or reads itself, the texts it reads
//! on cold paths only (a deadlock's DETAIL, sqlcommenter tags), and the wire
//! vocabulary (message tags, the C-string reader) everything else reads from.

pub mod deadlock;
pub mod frame;
pub mod messages;
pub mod proxy_header;
pub mod sqlcomment;
pub mod startup;
pub mod tags;
