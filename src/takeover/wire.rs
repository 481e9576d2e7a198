//! The takeover control socket's wire: messages over a Unix stream socket, each a header
//! (kind, number of file descriptors, body length) and a body, with its file descriptors
//! attached to its first byte (SCM_RIGHTS).
//!
//! Part of `takeover`. The descriptors travel as `OwnedFd`/`BorrowedFd` through rustix's
//! safe `sendmsg`/`recvmsg`, so no unsafe code is needed here. Received descriptors queue up
//! in arrival order and each message takes as many as its header says: the kernel delivers
//! them with the byte they were sent with, which is read before the message is complete.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// Header: kind (1), descriptors (1), body length (4, big endian).
const HEADER: usize = 6;
/// Largest body accepted (a session's state with its prepared statements).
const MAX_BODY: usize = 64 << 20;
/// Most descriptors one message carries.
pub(crate) const MAX_FDS: usize = 4;

/// Message kinds.
pub(crate) mod kind {
    /// Successor → predecessor: take over, please (body: JSON hello).
    pub(crate) const HELLO: u8 = 1;
    /// Predecessor → successor: the listening sockets (body: JSON plan).
    pub(crate) const LISTENERS: u8 = 2;
    /// Successor → predecessor: accepting on them now.
    pub(crate) const READY: u8 = 3;
    /// Predecessor → successor: server connection slots lent (body: u32).
    pub(crate) const LEND: u8 = 4;
    /// Predecessor → successor: a client (body: JSON session state; one descriptor).
    pub(crate) const SESSION: u8 = 5;
    /// Successor → predecessor: a CancelRequest whose key the successor does not know,
    /// for a client still served by the predecessor (body: pid, 4 bytes big endian, then
    /// the secret).
    pub(crate) const CANCEL: u8 = 6;
}

/// One message received.
#[derive(Debug)]
pub(crate) struct Msg {
    pub kind: u8,
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// One end of a control connection.
#[derive(Debug)]
pub(crate) struct Wire {
    stream: UnixStream,
    rbuf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("takeover control socket: {what}"))
}

impl Wire {
    pub(crate) fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            rbuf: Vec::new(),
            fds: VecDeque::new(),
        }
    }

    /// The peer's user id.
    pub(crate) fn peer_uid(&self) -> io::Result<u32> {
        Ok(self.stream.peer_cred()?.uid())
    }

    /// Sends one message with `fds` attached.
    pub(crate) async fn send(&self, kind: u8, body: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.len() > MAX_FDS || body.len() > MAX_BODY {
            return Err(bad("message too large"));
        }
        let mut buf = Vec::with_capacity(HEADER + body.len());
        buf.push(kind);
        buf.push(fds.len() as u8);
        buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
        buf.extend_from_slice(body);
        let mut off = 0;
        while off < buf.len() {
            let attach = if off == 0 { fds } else { &[] };
            let rest = &buf[off..];
            let stream = &self.stream;
            let n = loop {
                stream.writable().await?;
                match stream.try_io(Interest::WRITABLE, || send_some(stream, rest, attach)) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            };
            off += n;
        }
        Ok(())
    }

    /// The next message; None at a clean end of the connection.
    pub(crate) async fn recv(&mut self) -> io::Result<Option<Msg>> {
        loop {
            if let Some(m) = self.split()? {
                return Ok(Some(m));
            }
            let mut buf = vec![0u8; 64 << 10];
            let (stream, fds) = (&self.stream, &mut self.fds);
            let n = loop {
                stream.readable().await?;
                match stream.try_io(Interest::READABLE, || recv_some(stream, &mut buf, fds)) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            };
            if n == 0 {
                return if self.rbuf.is_empty() {
                    Ok(None)
                } else {
                    Err(bad("connection closed inside a message"))
                };
            }
            self.rbuf.extend_from_slice(&buf[..n]);
        }
    }

    /// A whole message off the front of the buffer, if there is one.
    fn split(&mut self) -> io::Result<Option<Msg>> {
        if self.rbuf.len() < HEADER {
            return Ok(None);
        }
        let (kind, nfds) = (self.rbuf[0], usize::from(self.rbuf[1]));
        let len = u32::from_be_bytes([self.rbuf[2], self.rbuf[3], self.rbuf[4], self.rbuf[5]]) as usize;
        if len > MAX_BODY || nfds > MAX_FDS {
            return Err(bad("message too large"));
        }
        if self.rbuf.len() < HEADER + len {
            return Ok(None);
        }
        if self.fds.len() < nfds {
            return Err(bad("file descriptors missing"));
        }
        let body = self.rbuf[HEADER..HEADER + len].to_vec();
        self.rbuf.drain(..HEADER + len);
        let fds = self.fds.drain(..nfds).collect();
        Ok(Some(Msg { kind, body, fds }))
    }
}

fn send_some(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if fds.is_empty() {
        return Ok(rustix::net::send(stream, bytes, SendFlags::NOSIGNAL)?);
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(bad("too many file descriptors"));
    }
    Ok(rustix::net::sendmsg(
        stream,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?)
}

fn recv_some(stream: &UnixStream, buf: &mut [u8], fds: &mut VecDeque<OwnedFd>) -> io::Result<usize> {
    // Room for more descriptors than one message carries (a read may span two messages).
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4 * MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        stream,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(bad("file descriptors truncated"));
    }
    Ok(got.bytes)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    use super::*;

    #[tokio::test]
    async fn messages_carry_their_file_descriptors_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, mut b) = (Wire::new(a), Wire::new(b));
        let mut f1 = tempfile::tempfile().unwrap();
        let f2 = tempfile::tempfile().unwrap();
        a.send(kind::LEND, &3u32.to_be_bytes(), &[]).await.unwrap();
        a.send(kind::SESSION, b"one", &[f1.as_fd()]).await.unwrap();
        let big = vec![7u8; 200_000];
        a.send(kind::LISTENERS, &big, &[f2.as_fd(), f1.as_fd()]).await.unwrap();
        drop(a);
        let m = b.recv().await.unwrap().unwrap();
        assert_eq!(
            (m.kind, m.body, m.fds.len()),
            (kind::LEND, 3u32.to_be_bytes().to_vec(), 0)
        );
        let m = b.recv().await.unwrap().unwrap();
        assert_eq!((m.kind, &m.body[..], m.fds.len()), (kind::SESSION, &b"one"[..], 1));
        // The descriptor received is the same open file.
        let mut got = std::fs::File::from(m.fds.into_iter().next().unwrap());
        got.write_all(b"moved").unwrap();
        let mut s = String::new();
        f1.rewind().unwrap();
        f1.read_to_string(&mut s).unwrap();
        assert_eq!(s, "moved");
        let m = b.recv().await.unwrap().unwrap();
        assert_eq!((m.kind, m.body.len(), m.fds.len()), (kind::LISTENERS, 200_000, 2));
        assert!(b.recv().await.unwrap().is_none(), "a clean end");
    }
}
