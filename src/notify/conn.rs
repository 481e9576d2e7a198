//! The listening connection's wire: its frames, its queries, the channel of a notification.
//!
//! Part of `notify`; the connection is a plain [`ServerConn`] outside every pool.

use bytes::Bytes;

use crate::protocol::frame::Frame;
use crate::protocol::messages::parse_server_error;
use crate::protocol::tags::{backend, read_cstr};
use crate::server::{ServerConn, ServerError};

/// The next message from `server`; pending forever when there is no connection.
///
/// # Cancel safety
/// Cancel safe (see [`ServerConn::read_frame`]).
pub(super) async fn next_frame(server: Option<&mut ServerConn>) -> Result<Frame, ServerError> {
    match server {
        Some(c) => c.read_frame().await,
        None => std::future::pending().await,
    }
}

/// Runs `sql`, handing the notifications that come meanwhile to `notified`; PostgreSQL's
/// error message, if any, once the connection is at ReadyForQuery again.
///
/// # Errors
/// The connection failed.
pub(super) async fn run_query(
    c: &mut ServerConn,
    sql: &str,
    mut notified: impl FnMut(Bytes),
) -> Result<Option<String>, ServerError> {
    c.send_query(sql).await?;
    let mut error = None;
    loop {
        let f = c.read_frame().await?;
        match f.tag {
            backend::NOTIFICATION_RESPONSE => notified(f.bytes.freeze()),
            backend::ERROR_RESPONSE => {
                error = Some(parse_server_error(&f).map_or_else(|| "malformed error".to_string(), |e| e.message));
            }
            backend::READY_FOR_QUERY => return Ok(error),
            _ => {}
        }
    }
}

/// The channel a NotificationResponse (`msg`, whole with its header) names.
pub(super) fn channel_of(msg: &[u8]) -> Option<String> {
    read_cstr(msg.get(9..)?).map(|(c, _)| c.into_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_channel_follows_the_pid() {
        let mut m = vec![b'A', 0, 0, 0, 14];
        m.extend_from_slice(&7i32.to_be_bytes());
        m.extend_from_slice(b"ch\0p\0");
        assert_eq!(super::channel_of(&m).as_deref(), Some("ch"));
        assert_eq!(super::channel_of(&m[..6]), None);
    }
}
