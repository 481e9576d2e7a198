//! Framing by header: the hot path of the relay.
//!
//! Sits between the sockets and everything else: the client session and the server connection
//! hand their read buffers to [`split_frame`] (whole messages, cold path) or to a
//! [`MessageWalker`] (streaming, hot path). Neither ever allocates by a length read off the
//! wire: a length is checked against a configured maximum before anything is reserved, and a
//! message that is forwarded piecewise is never buffered whole.
//!
//! Wire format (PostgreSQL protocol, "Message Formats"): one type byte, then an `i32` length
//! that counts itself and the body but not the type byte.

use bytes::BytesMut;

use crate::error::{sqlstate, Side, Sided};

/// Bytes in a message header: type byte + length.
pub const HEADER_LEN: usize = 5;

/// A message header that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length field is below 4 (it always counts itself).
    #[error("invalid message length {0}")]
    BadLength(i32),
    /// The length field exceeds the configured maximum.
    #[error("message of type '{tag}' announces {len} bytes, above the limit of {max} bytes")]
    TooLarge {
        /// Message type byte, as a char for display.
        tag: char,
        /// Announced length, type byte included.
        len: usize,
        /// The limit in force.
        max: usize,
    },
}

/// The client's: the session frames client messages with it. A server's bad header reaches
/// the client wrapped in a server-side error (`ServerError::Frame`,
/// `SessionError::ServerProtocol`), which answers for it.
impl Sided for FrameError {
    fn side(&self) -> Side {
        Side::Client
    }

    fn sqlstate(&self) -> &str {
        match self {
            FrameError::BadLength(_) | FrameError::TooLarge { .. } => sqlstate::PROTOCOL_VIOLATION,
        }
    }
}

/// One whole message: `bytes` holds the type byte, the length and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Message type byte.
    pub tag: u8,
    /// The whole message, header included.
    pub bytes: BytesMut,
}

impl Frame {
    /// The message body (after the 5-byte header).
    pub fn body(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }
}

/// Reads a header at the start of `buf`: `(tag, total length including the type byte)`.
///
/// Returns `Ok(None)` when fewer than 5 bytes are there.
///
/// # Errors
/// [`FrameError`] for a length below 4 or a total above `max`.
#[inline]
pub(crate) fn peek_header(buf: &[u8], max: usize) -> Result<Option<(u8, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::BadLength(len));
    }
    let total = len as usize + 1;
    if total > max {
        return Err(FrameError::TooLarge {
            tag: char::from(buf[0]),
            len: total,
            max,
        });
    }
    Ok(Some((buf[0], total)))
}

/// Splits one whole message off the front of `buf`, or returns `Ok(None)` when it is not all
/// there yet (the caller reads more and calls again: cancel safe, the buffer keeps the bytes).
///
/// # Errors
/// [`FrameError`] when the header is invalid or announces more than `max` bytes.
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    match peek_header(buf, max)? {
        Some((tag, total)) if buf.len() >= total => Ok(Some(Frame {
            tag,
            bytes: buf.split_to(total),
        })),
        _ => Ok(None),
    }
}

/// What the walker saw: a message header at `start` of the scanned slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Message type byte.
    pub tag: u8,
    /// Offset of the type byte in the scanned slice.
    pub start: usize,
    /// Total length including the type byte.
    pub len: usize,
    /// Whether the whole message lies in the scanned slice (always true for inspected tags).
    pub complete: bool,
}

/// What the caller wants after seeing a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// Keep going.
    Continue,
    /// Stop before this message: it is not forwarded and stays in the buffer.
    StopBefore,
}

/// Incremental header walker for a byte stream relayed in pieces.
///
/// [`MessageWalker::scan`] walks the headers in a buffer and says how many bytes at its front
/// may be forwarded now. It holds back only (a) an incomplete header and (b) an incomplete
/// message whose tag the caller wants to inspect (small control messages such as
/// ReadyForQuery), so the caller always sees those whole. Any other message is forwarded as
/// it arrives: a 1 GB DataRow or CopyData passes through in buffer-sized pieces.
#[derive(Debug, Clone)]
pub struct MessageWalker {
    /// Body bytes of the current message not yet seen (already forwarded in an earlier scan).
    remaining: usize,
    /// Largest message accepted.
    max: usize,
}

impl MessageWalker {
    /// A walker that refuses messages longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { remaining: 0, max }
    }

    /// Bytes of a message already partly forwarded that are still to come (they start the
    /// next buffer scanned).
    pub fn pending(&self) -> usize {
        self.remaining
    }

    /// True when the stream is at a message boundary (nothing half-forwarded).
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Scans `buf` (which starts where the last scan's forwardable part ended) and returns how
    /// many bytes from its front may be forwarded. `inspect(tag)` names the tags that must be
    /// seen whole; `on` is called once per message header in order.
    ///
    /// # Errors
    /// [`FrameError`] for an invalid or oversized header; the stream cannot be resynchronised.
    #[inline]
    pub fn scan(
        &mut self,
        buf: &[u8],
        inspect: impl Fn(u8) -> bool,
        mut on: impl FnMut(&Seen, &[u8]) -> Walk,
    ) -> Result<usize, FrameError> {
        let mut pos = self.remaining.min(buf.len());
        self.remaining -= pos;
        if self.remaining > 0 {
            return Ok(pos);
        }
        while let Some((tag, total)) = peek_header(&buf[pos..], self.max)? {
            let available = buf.len() - pos;
            let complete = available >= total;
            if !complete && inspect(tag) {
                break;
            }
            let seen = Seen {
                tag,
                start: pos,
                len: total,
                complete,
            };
            let msg = &buf[pos..pos + total.min(available)];
            if on(&seen, msg) == Walk::StopBefore {
                break;
            }
            if complete {
                pos += total;
            } else {
                self.remaining = total - available;
                pos = buf.len();
                break;
            }
        }
        Ok(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn split_frame_waits_for_whole_message() {
        let m = msg(b'Q', b"select 1\0");
        for cut in 0..m.len() {
            let mut b = BytesMut::from(&m[..cut]);
            assert_eq!(split_frame(&mut b, 1024), Ok(None), "cut at {cut}");
        }
        let mut b = BytesMut::from(&m[..]);
        let f = split_frame(&mut b, 1024).unwrap().unwrap();
        assert_eq!(f.tag, b'Q');
        assert_eq!(f.body(), b"select 1\0");
        assert!(b.is_empty());
    }

    #[test]
    fn rejects_bad_and_huge_lengths() {
        let mut b = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert_eq!(split_frame(&mut b, 100), Err(FrameError::BadLength(3)));
        let mut b = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(split_frame(&mut b, 100), Err(FrameError::BadLength(-1)));
        let mut b = BytesMut::from(&[b'd', 0x40, 0, 0, 0][..]);
        assert!(matches!(split_frame(&mut b, 1 << 20), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn frame_errors_are_the_clients_protocol_violations() {
        let too_large = FrameError::TooLarge {
            tag: 'd',
            len: 1 << 30,
            max: 1 << 20,
        };
        for e in [FrameError::BadLength(3), too_large] {
            assert_eq!((e.side(), e.sqlstate()), (Side::Client, "08P01"), "{e}");
        }
    }

    #[test]
    fn walker_streams_large_and_holds_back_inspected() {
        let mut stream = msg(b'D', &vec![7u8; 1000]);
        stream.extend(msg(b'Z', b"I"));
        let mut w = MessageWalker::new(1 << 20);
        let inspect = |t: u8| t == b'Z';
        // First piece: part of the DataRow is forwardable at once.
        let mut seen = Vec::new();
        let n = w
            .scan(&stream[..300], inspect, |s, _| {
                seen.push(*s);
                Walk::Continue
            })
            .unwrap();
        assert_eq!(n, 300);
        assert!(!w.at_boundary());
        // Rest of the DataRow plus 3 bytes of the 'Z': the 'Z' is held back.
        let end_d = 1005;
        let n = w
            .scan(&stream[300..end_d + 3], inspect, |s, _| {
                seen.push(*s);
                Walk::Continue
            })
            .unwrap();
        assert_eq!(n, end_d - 300);
        assert!(w.at_boundary());
        let n = w
            .scan(&stream[end_d..], inspect, |s, m| {
                assert_eq!(m, b"Z\0\0\0\x05I");
                seen.push(*s);
                Walk::Continue
            })
            .unwrap();
        assert_eq!(n, 6);
        assert_eq!(seen.iter().map(|s| s.tag).collect::<Vec<_>>(), b"DZ");
    }

    #[test]
    fn walker_stops_before_on_request() {
        let mut stream = msg(b'Q', b"x\0");
        stream.extend(msg(b'X', b""));
        let mut w = MessageWalker::new(1024);
        let n = w
            .scan(
                &stream,
                |t| t == b'X',
                |s, _| {
                    if s.tag == b'X' {
                        Walk::StopBefore
                    } else {
                        Walk::Continue
                    }
                },
            )
            .unwrap();
        assert_eq!(n, 7);
    }

    #[test]
    fn walker_reframes_any_split() {
        let mut stream = Vec::new();
        for i in 0..20u8 {
            stream.extend(msg(b'A' + i, &vec![i; i as usize * 13]));
        }
        for cut in 0..stream.len() {
            let mut w = MessageWalker::new(1 << 16);
            let mut tags = Vec::new();
            let mut buf = stream[..cut].to_vec();
            let n = w
                .scan(
                    &buf,
                    |_| false,
                    |s, _| {
                        tags.push(s.tag);
                        Walk::Continue
                    },
                )
                .unwrap();
            buf.drain(..n);
            buf.extend_from_slice(&stream[cut..]);
            let n2 = w
                .scan(
                    &buf,
                    |_| false,
                    |s, _| {
                        tags.push(s.tag);
                        Walk::Continue
                    },
                )
                .unwrap();
            assert_eq!(n2, buf.len());
            assert_eq!(tags.len(), 20, "cut {cut}");
            assert!(w.at_boundary());
        }
    }
}
