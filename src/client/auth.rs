//! Client authentication: SCRAM-SHA-256 against pg_authid-style verifiers, or trust.
//!
//! Part of the client session, between startup and admission to a pool. The SCRAM
//! exchange is pgwire's sans-IO `ScramServerAuth`; unknown users go through the same
//! exchange against a throwaway verifier, so a client cannot tell which users exist. Over
//! TLS, SCRAM-SHA-256-PLUS (channel binding to our certificate) is offered first.

use pgwire::api::auth::sasl::scram::{ScramSecret, ScramServerAuth};

use super::conn::{ClientConn, MAX_AUTH_MESSAGE};
use super::SessionError;
use crate::config::{AuthType, Config, ScramVerifier};
use crate::protocol::messages;

const SCRAM: &str = "SCRAM-SHA-256";
const SCRAM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Authenticates `user`; on success nothing has been sent yet for AuthenticationOk.
///
/// # Errors
/// [`SessionError::AuthFailed`] (28P01) for a wrong password or unknown user, and client I/O
/// or protocol errors.
pub async fn authenticate(
    client: &mut ClientConn,
    config: &Config,
    user: &str,
    decoy: &ScramVerifier,
) -> Result<(), SessionError> {
    let known = config.users.get(user);
    if config.proxy.auth_type == AuthType::Trust {
        return match known {
            Some(_) => Ok(()),
            None => Err(SessionError::UnknownRole(user.to_string())),
        };
    }
    let verifier = known.and_then(|u| u.client_verifier.as_ref()).unwrap_or(decoy);
    // Channel binding only over TLS, with a certificate whose hash is known.
    let plus = config.tls.client.scram.as_ref().filter(|_| client.stream.is_tls());
    let offered: &[&str] = if plus.is_some() { &[SCRAM_PLUS, SCRAM] } else { &[SCRAM] };
    messages::auth_sasl(offered, &mut client.wbuf);
    client.flush().await?;

    let frame = client.read_frame(MAX_AUTH_MESSAGE).await?;
    let (mechanism, data) = messages::sasl_initial_response(frame)
        .ok_or_else(|| SessionError::Protocol("expected SASLInitialResponse".into()))?;
    if !offered.contains(&mechanism.as_str()) {
        return Err(SessionError::UnsupportedAuth(format!(
            "client selected an invalid SASL authentication mechanism \"{mechanism}\""
        )));
    }
    // The GS2 header must agree with the mechanism: "p=" with -PLUS only.
    if (mechanism == SCRAM_PLUS) != data.starts_with(b"p=") {
        return Err(SessionError::Protocol(
            "SCRAM channel-binding flag does not match the selected mechanism".into(),
        ));
    }
    let secret = ScramSecret::Verifier {
        salt: verifier.salt.clone(),
        iterations: verifier.iterations,
        stored_key: verifier.stored_key.clone(),
        server_key: verifier.server_key.clone(),
    };
    let failed = || SessionError::AuthFailed(user.to_string());
    let (server_first, waiting) = plus
        .cloned()
        .unwrap_or_default()
        .on_client_first_message_with_secret(&data, secret)
        .map_err(|_| failed())?;
    messages::auth_sasl_continue(server_first.as_bytes(), &mut client.wbuf);
    client.flush().await?;

    let frame = client.read_frame(MAX_AUTH_MESSAGE).await?;
    let data = messages::sasl_response(frame).ok_or_else(|| SessionError::Protocol("expected SASLResponse".into()))?;
    let server_final = waiting.on_client_final_message(&data).map_err(|_| failed())?;
    if known.is_none() {
        return Err(failed());
    }
    messages::auth_sasl_final(server_final.as_bytes(), &mut client.wbuf);
    Ok(())
}

/// The SCRAM exchange on a client's first and final messages against a fixed verifier (for
/// the fuzz targets: pgwire's SCRAM parsers see only what the proxy hands them).
#[doc(hidden)]
pub fn scram_exchange(first: &[u8], fin: &[u8]) {
    let secret = ScramSecret::Verifier {
        salt: vec![7; 16],
        iterations: 1,
        stored_key: vec![1; 32],
        server_key: vec![2; 32],
    };
    if let Ok((_, waiting)) = ScramServerAuth::new().on_client_first_message_with_secret(first, secret) {
        let _ = waiting.on_client_final_message(fin);
    }
}
