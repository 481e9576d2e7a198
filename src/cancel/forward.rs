//! Forwarding a CancelRequest to the instance of the cluster that issued its key.
//!
//! Part of cancel routing (beside the flow, from the listener): the key alone names the
//! issuer (a made-up pid's tag, or the seat a real backend pid sits on, from the
//! coordinator's last round), so a key that is not this instance's goes to at most the
//! instances so named, once, with pgvalve's own request code: the receiver looks it up
//! locally and never forwards it again (docs/cluster.md, "Cancel requests").

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::SYNTHETIC_PIDS;
use crate::cluster::Cluster;
use crate::protocol::startup::FORWARDED_CANCEL_CODE;

/// Time a forward may take (connect, send, the peer's own forwarding to PostgreSQL).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Forwards the CancelRequest (`pid`, `secret`) to the instance that issued the key; false
/// when no instance is known for it (an unknown key is dropped, as PostgreSQL does).
pub(super) async fn to_issuer(cluster: &Cluster, pid: i32, secret: &[u8]) -> bool {
    let tag = (pid as u32 >= SYNTHETIC_PIDS).then_some(((pid as u32) >> 16) as u16);
    if tag == Some(cluster.tag()) {
        return false;
    }
    let peers = cluster.cancel_route(tag, pid);
    for addr in &peers {
        if let Err(e) = send(*addr, pid, secret).await {
            tracing::warn!(peer = %addr, error = %e, "forwarding a cancel request to another instance of the cluster failed");
        }
    }
    !peers.is_empty()
}

/// Sends one forwarded CancelRequest and waits until the peer has handled it (closed).
async fn send(addr: SocketAddr, pid: i32, secret: &[u8]) -> io::Result<()> {
    let work = async {
        let mut s = TcpStream::connect(addr).await?;
        let mut w = BytesMut::with_capacity(12 + secret.len());
        w.put_i32(12 + secret.len() as i32);
        w.put_i32(FORWARDED_CANCEL_CODE);
        w.put_i32(pid);
        w.put_slice(secret);
        s.write_all(&w).await?;
        let mut sink = [0u8; 64];
        while s.read(&mut sink).await? > 0 {}
        Ok(())
    };
    tokio::time::timeout(FORWARD_TIMEOUT, work)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "forwarded cancel request timed out"))?
}
