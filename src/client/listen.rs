//! LISTEN/UNLISTEN of a transaction-mode client, answered by the proxy, and the delivery of
//! its notifications.
//!
//! Part of the client session in transaction mode (between transactions, beside `txn`). A
//! simple Query made only of `LISTEN`/`UNLISTEN` statements that arrives while the client is
//! outside a transaction does not take a server connection: the session subscribes through
//! the proxy's shared listening connection of its (database, user) (see [`crate::notify`])
//! and answers CommandComplete and ReadyForQuery itself. Notifications are written to the
//! client whenever it is idle between transactions: at once, or right after the
//! ReadyForQuery that ends its current transaction. Anything else with LISTEN in it (inside a
//! transaction, mixed with other statements, the extended protocol) pins the session as
//! before, and runs on its own server connection.

use super::conn::ClientConn;
use super::sql::{Lexer, Tok};
use super::{Seat, Services, SessionError};
use crate::error::PgError;
use crate::notify::Listener;
use crate::protocol::messages;
use crate::protocol::tags::{frontend, read_cstr, status};

/// How long a dropped listener's last notifications and error may take to be written.
const LAST_WORDS: std::time::Duration = std::time::Duration::from_secs(30);

/// Largest Query looked at as a possible LISTEN.
const MAX_LISTEN_QUERY: usize = 64 * 1024;

/// One statement of a LISTEN-only Query.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Listen(String),
    /// A channel, or every one (`UNLISTEN *`).
    Unlisten(Option<String>),
}

/// The statements of `sql` when it is one or more `LISTEN channel` / `UNLISTEN channel` /
/// `UNLISTEN *` and nothing else.
pub(crate) fn only_listens(sql: &str) -> Option<Vec<Op>> {
    let mut ops = Vec::new();
    let mut lexer = Lexer::new(sql);
    let mut stmt: Vec<Tok> = Vec::new();
    loop {
        let tok = lexer.next();
        if matches!(tok, None | Some(Tok::Semicolon)) {
            match stmt.as_slice() {
                [] => {}
                [Tok::Word(w), name] if w == "LISTEN" => ops.push(Op::Listen(channel(name)?)),
                [Tok::Word(w), Tok::Other(b'*')] if w == "UNLISTEN" => ops.push(Op::Unlisten(None)),
                [Tok::Word(w), name] if w == "UNLISTEN" => ops.push(Op::Unlisten(Some(channel(name)?))),
                _ => return None,
            }
            stmt.clear();
            if tok.is_none() {
                break;
            }
        } else if let Some(t) = tok {
            stmt.push(t);
        }
    }
    (!ops.is_empty()).then_some(ops)
}

/// A channel name as PostgreSQL reads it: unquoted ones folded to lower case.
fn channel(t: &Tok) -> Option<String> {
    match t {
        Tok::Word(w) => Some(w.to_ascii_lowercase()),
        Tok::Quoted(q) if !q.is_empty() => Some(q.clone()),
        _ => None,
    }
}

/// When the client's next message is a simple Query of LISTEN/UNLISTEN only, answers it
/// (subscribing through the proxy's listening connection); true when it did.
///
/// # Errors
/// The client failed.
pub(crate) async fn answer(
    shared: &Services,
    seat: &Seat,
    given_pid: i32,
    client: &mut ClientConn,
    listener: &mut Option<Box<Listener>>,
) -> Result<bool, SessionError> {
    if client.rbuf.first() != Some(&frontend::QUERY) {
        return Ok(false);
    }
    let len = loop {
        if let Some(b) = client.rbuf.get(1..5) {
            let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
            if len > MAX_LISTEN_QUERY || client.rbuf.len() > len {
                break len;
            }
        }
        client.read_more().await?;
    };
    if !(5..=MAX_LISTEN_QUERY).contains(&len) {
        return Ok(false);
    }
    // Ordinary queries stop at their first word: no lexing, no allocation per transaction.
    let word = super::sql::first_word(&client.rbuf[5..=len]);
    if !(word.eq_ignore_ascii_case(b"listen") || word.eq_ignore_ascii_case(b"unlisten")) {
        return Ok(false);
    }
    let Some(ops) = read_cstr(&client.rbuf[5..=len]).and_then(|(sql, _)| only_listens(&sql)) else {
        return Ok(false);
    };
    if listener.is_none() {
        let budget = shared
            .pools
            .budget(&seat.route.database, &seat.route.user, seat.route.pool_size);
        if budget.lasting_room().is_err() {
            // The listening connection would take the pool's last slot (pool_size = 1):
            // LISTEN pins instead, as it always did.
            return Ok(false);
        }
    }
    let _ = client.rbuf.split_to(len + 1);
    let l = listener.get_or_insert_with(|| Box::new(join(shared, seat, given_pid)));
    for op in ops {
        let done = match op {
            Op::Listen(c) => l.listen(&c).await.map(|()| "LISTEN"),
            Op::Unlisten(c) => {
                l.unlisten(c.as_deref()).await;
                Ok("UNLISTEN")
            }
        };
        match done {
            Ok(tag) => messages::command_complete(tag, &mut client.wbuf),
            Err(message) => {
                let e = PgError::error(crate::error::sqlstate::CONNECTION_FAILURE, message);
                messages::error_response(&e, &mut client.wbuf);
                break;
            }
        }
    }
    messages::ready_for_query(status::IDLE, &mut client.wbuf);
    client.flush().await?;
    Ok(true)
}

/// The session's listener on the shared connection of its pool.
fn join(shared: &Services, seat: &Seat, given_pid: i32) -> Listener {
    let pool = seat.server_pool(shared);
    let target = pool.manager().target.clone();
    let budget = shared
        .pools
        .budget(&seat.route.database, &seat.route.user, seat.route.pool_size);
    shared
        .notify
        .join(&seat.route.database, &seat.route.user, target, budget, given_pid)
}

/// Writes the notifications waiting for the client (`first`: one taken already; its own
/// carry the pid it was given, see [`crate::notify::Listener::begin`]). Ends the
/// session when its listener was dropped (it did not read, or the listening connection
/// failed).
///
/// # Errors
/// The client failed, or its listener was dropped.
pub(crate) async fn deliver(
    client: &mut ClientConn,
    listener: &mut Option<Box<Listener>>,
    first: Option<bytes::Bytes>,
) -> Result<(), SessionError> {
    let Some(l) = listener.as_mut() else {
        return Ok(());
    };
    let mut next = first;
    while let Some(m) = next.take().or_else(|| l.try_next()) {
        client.wbuf.extend_from_slice(&m);
    }
    while !client.wbuf.is_empty() && l.dropped().is_none() {
        tokio::select! {
            r = client.write_some() => r?,
            () = l.until_dropped() => {}
        }
    }
    let Some(why) = l.dropped() else {
        return Ok(());
    };
    // The client's socket is likely full: what is queued for it goes first, then the error,
    // given time for a client that reads late.
    let e = PgError::fatal(crate::error::sqlstate::CONFIGURATION_LIMIT_EXCEEDED, why.clone());
    messages::error_response(&e, &mut client.wbuf);
    let _ = tokio::time::timeout(LAST_WORDS, async {
        while !client.wbuf.is_empty() && client.write_some().await.is_ok() {}
    })
    .await;
    client.wbuf.clear();
    Err(SessionError::ClientGone(std::io::Error::other(why)))
}

#[cfg(test)]
mod tests {
    use super::{only_listens as f, Op};

    #[test]
    fn only_listen_statements_are_answered_by_the_proxy() {
        assert_eq!(f("LISTEN a"), Some(vec![Op::Listen("a".into())]));
        assert_eq!(
            f("listen \"Mixed Case\"; UNLISTEN B;unlisten *;"),
            Some(vec![
                Op::Listen("Mixed Case".into()),
                Op::Unlisten(Some("b".into())),
                Op::Unlisten(None)
            ])
        );
        for sql in [
            "",
            ";",
            "LISTEN",
            "LISTEN a b",
            "LISTEN a; SELECT 1",
            "NOTIFY a",
            "LISTEN 'a'",
        ] {
            assert_eq!(f(sql), None, "{sql}");
        }
    }
}
