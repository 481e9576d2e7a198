//! Client authentication by `hba_file`: which method a client must use, and the two methods
//! besides SCRAM and trust that only hba_file lines ask for: MD5 and TLS client certificates.
//!
//! Part of the client session's authentication ([`super::auth`]), which asks [`method`] first
//! when an hba_file is configured. MD5 is checked against the user's md5 verifier (the
//! password itself is not needed); a certificate has been verified against
//! `client_tls_ca_file` by the TLS handshake, and here its CN must name the user (or map to
//! it through `ident_file`).

use super::conn::ClientStream;
use super::conn::{ClientConn, MAX_AUTH_MESSAGE};
use super::SessionError;
use crate::config::hba::{Hba, HbaMethod};
use crate::config::Secret;
use crate::protocol::messages;

/// The method of the first hba_file line that matches the client.
///
/// # Errors
/// [`SessionError::Hba`] (28000, PostgreSQL's message) when no line matches or the line
/// says `reject`.
pub(crate) fn method(hba: &Hba, client: &ClientConn, user: &str, database: &str) -> Result<HbaMethod, SessionError> {
    let tls = client.stream.is_tls();
    let addr = client.peer.ip();
    let what = || {
        format!(
            "host \"{addr}\", user \"{user}\", database \"{database}\", {}",
            if tls { "SSL encryption" } else { "no encryption" }
        )
    };
    match hba.find(tls, addr, database, user) {
        None => Err(SessionError::Hba(format!("no pg_hba.conf entry for {}", what()))),
        Some(l) if l.method == HbaMethod::Reject => Err(SessionError::Hba(format!(
            "pg_hba.conf rejects connection for {}",
            what()
        ))),
        Some(l) => {
            tracing::debug!(line = l.line, method = ?l.method, "hba_file line matched");
            Ok(l.method.clone())
        }
    }
}

/// The MD5 exchange: AuthenticationMD5Password with a random salt, then the client's
/// `md5(md5(password + user) + salt)` checked against `verifier` (`md5` + hex).
///
/// # Errors
/// [`SessionError::AuthFailed`] for a wrong answer, and client I/O or protocol errors.
pub(crate) async fn md5(client: &mut ClientConn, user: &str, verifier: &Secret) -> Result<(), SessionError> {
    let salt: [u8; 4] = fastrand::u32(..).to_be_bytes();
    messages::auth_md5(salt, &mut client.wbuf);
    client.flush().await?;
    let frame = client.read_frame(MAX_AUTH_MESSAGE).await?;
    let answer = messages::password_message(frame)
        .ok_or_else(|| SessionError::Protocol("expected a password message".into()))?;
    let expected = md5_answer(&verifier.0, salt);
    // Compared in constant time: every byte is looked at whatever differs.
    let (a, b) = (answer.as_bytes(), expected.as_bytes());
    let differ = a.len() != b.len() || a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) != 0;
    if differ {
        return Err(SessionError::AuthFailed(user.to_string()));
    }
    Ok(())
}

/// What a client that knows the password answers to `salt`, from the verifier alone.
fn md5_answer(verifier: &str, salt: [u8; 4]) -> String {
    let hex = verifier.strip_prefix("md5").unwrap_or(verifier);
    let mut input = hex.as_bytes().to_vec();
    input.extend_from_slice(&salt);
    format!("md5{:x}", md5::compute(&input))
}

/// A `cert` line: the client's certificate (verified by the handshake) must name `user` in
/// its CN, or map to it by `map`.
///
/// # Errors
/// [`SessionError::Hba`] (28000) without a certificate, or when it names someone else.
pub(crate) fn cert(client: &ClientConn, hba: Option<&Hba>, map: Option<&str>, user: &str) -> Result<(), SessionError> {
    let ClientStream::Tls(tls) = &client.stream else {
        return Err(SessionError::Hba(
            "connection requires a valid client certificate".into(),
        ));
    };
    let cn = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| x509_certificate::X509Certificate::from_der(c.as_ref()).ok())
        .and_then(|c| c.subject_common_name())
        .ok_or_else(|| SessionError::Hba("connection requires a valid client certificate".into()))?;
    let ok = match map {
        Some(m) => hba.is_some_and(|h| h.mapped(m, &cn, user)),
        None => cn == user,
    };
    if !ok {
        tracing::info!(cn, user, "client certificate does not name the user");
        return Err(SessionError::Hba(format!(
            "certificate authentication failed for user \"{user}\""
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_answer_is_libpqs() {
        // What libpq sends: md5(md5(password + user) + salt), from postgres-protocol.
        let salt = [1, 2, 3, 4];
        let want = postgres_protocol::authentication::md5_hash(b"app", b"app-secret", salt);
        let verifier = postgres_protocol::password::md5(b"app-secret", "app");
        assert_eq!(md5_answer(&verifier, salt), want);
    }
}
