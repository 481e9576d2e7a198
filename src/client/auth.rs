//! Client authentication: SCRAM-SHA-256 against pg_authid-style verifiers, or trust.
//!
//! Part of the client session, between startup and admission to a pool. The SCRAM
//! exchange is pgwire's sans-IO `ScramServerAuth`; unknown users go through the same
//! exchange against a throwaway verifier, so a client cannot tell which users exist. Over
//! TLS, SCRAM-SHA-256-PLUS (channel binding to our certificate) is offered first.

use pgwire::api::auth::sasl::scram::{ScramSecret, ScramServerAuth};

use super::conn::{ClientConn, MAX_AUTH_MESSAGE};
use super::Services;
use super::SessionError;
use crate::config::hba::HbaMethod;
use crate::config::{AuthType, Config, ScramVerifier};
use crate::protocol::messages;

const SCRAM: &str = "SCRAM-SHA-256";
const SCRAM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Authenticates `user` (asking for `database`); on success nothing has been sent yet for
/// AuthenticationOk. Users not in `[users]` are looked up with auth_query when `auth_user` is
/// set; their proven ClientKey is kept for the server leg.
///
/// # Errors
/// [`SessionError::AuthFailed`] (28P01) for a wrong password or unknown user, the lookup's
/// server error, and client I/O or protocol errors.
pub(crate) async fn authenticate(
    client: &mut ClientConn,
    shared: &Services,
    user: &str,
    database: &str,
) -> Result<(), SessionError> {
    let config = shared.live_config.load_full();
    let known = config.users.get(user);
    if let Some(done) = other_method(client, &config, user, database).await? {
        return done;
    }
    let failed = || SessionError::AuthFailed(user.to_string());
    let addr = client.peer.ip();
    let lookup = known.is_none() && config.proxy.auth_user.is_some();
    let looked_up = if lookup {
        if shared.auth.limited(user, addr, config.proxy.auth_failure_limit) {
            tracing::warn!(
                user,
                "too many failed logins from this address; refused without a lookup"
            );
            return Err(failed());
        }
        shared
            .auth
            .verifier(&config, shared.pools.budgets(), database, user)
            .await?
    } else {
        None
    };
    let verifier = known
        .and_then(|u| u.client_verifier.as_ref())
        .or(looked_up.as_ref())
        .unwrap_or(&shared.decoy_verifier);
    let done = match exchange(client, &config, verifier).await {
        Ok(done) if known.is_some() || looked_up.is_some() => done,
        Ok(_) | Err(SessionError::AuthFailed(_)) => {
            if lookup {
                shared.auth.failed(user, addr);
            }
            return Err(failed());
        }
        Err(e) => return Err(e),
    };
    if let Some(v) = &looked_up {
        let key = crate::server::scram::client_key_of(&done.first, &done.server_first, &done.last, &v.stored_key);
        let key = key.ok_or_else(failed)?;
        shared.auth.slot(user).set(crate::server::scram::ScramKeys {
            client_key: key,
            server_key: v.server_key.clone(),
            salt: v.salt.clone(),
            iterations: v.iterations,
        });
    }
    messages::auth_sasl_final(done.server_final.as_bytes(), &mut client.wbuf);
    Ok(())
}

/// The methods other than SCRAM: the hba_file line for this client, or auth_type as the line
/// every client matches. `Some(result)` when that decided; None: SCRAM follows.
async fn other_method(
    client: &mut ClientConn,
    config: &Config,
    user: &str,
    database: &str,
) -> Result<Option<Result<(), SessionError>>, SessionError> {
    let known = config.users.get(user);
    let trust = || match known {
        Some(_) => Ok(()),
        None => Err(SessionError::UnknownRole(user.to_string())),
    };
    let method = match (&config.hba, config.proxy.auth_type) {
        (Some(h), _) => super::hba::method(h, client, user, database)?,
        (None, AuthType::Trust) => HbaMethod::Trust,
        (None, AuthType::Md5) => HbaMethod::Md5,
        (None, AuthType::Cert) => HbaMethod::Cert { map: None },
        (None, AuthType::ScramSha256) => return Ok(None),
    };
    match method {
        HbaMethod::Trust => Ok(Some(trust())),
        HbaMethod::Cert { map } => {
            super::hba::cert(client, config.hba.as_deref(), map.as_deref(), user)?;
            Ok(Some(trust()))
        }
        // A user with an md5 verifier answers MD5; one with only a SCRAM verifier SCRAM, as
        // in PostgreSQL; a user pgvalve does not know fails MD5 against a decoy.
        HbaMethod::Md5 => match known.map(|u| u.md5_verifier.as_ref()) {
            Some(Some(v)) => Ok(Some(super::hba::md5(client, user, v).await)),
            None if config.proxy.auth_user.is_none() => {
                super::hba::md5(client, user, &crate::config::Secret("md5".into())).await?;
                Ok(Some(Err(SessionError::AuthFailed(user.to_string()))))
            }
            _ => Ok(None),
        },
        HbaMethod::ScramSha256 | HbaMethod::Reject => Ok(None),
    }
}

/// A SCRAM exchange that proved the client knows the verifier's password.
struct Proven {
    first: bytes::Bytes,
    server_first: String,
    last: bytes::Bytes,
    server_final: String,
}

/// The SASL exchange against `verifier` (the decoy for unknown users): SCRAM-SHA-256-PLUS
/// offered first over TLS. `AuthFailed` (with no name yet) when the proof is wrong.
async fn exchange(client: &mut ClientConn, config: &Config, verifier: &ScramVerifier) -> Result<Proven, SessionError> {
    // Channel binding only over TLS, with a certificate whose hash is known.
    let plus = config.tls.client.scram.as_ref().filter(|_| client.stream.is_tls());
    let offered: &[&str] = if plus.is_some() { &[SCRAM_PLUS, SCRAM] } else { &[SCRAM] };
    messages::auth_sasl(offered, &mut client.wbuf);
    client.flush().await?;

    let frame = client.read_frame(MAX_AUTH_MESSAGE).await?;
    let (mechanism, first) = messages::sasl_initial_response(frame)
        .ok_or_else(|| SessionError::Protocol("expected SASLInitialResponse".into()))?;
    if !offered.contains(&mechanism.as_str()) {
        return Err(SessionError::UnsupportedAuth(format!(
            "client selected an invalid SASL authentication mechanism \"{mechanism}\""
        )));
    }
    // The GS2 header must agree with the mechanism: "p=" with -PLUS only.
    if (mechanism == SCRAM_PLUS) != first.starts_with(b"p=") {
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
    let failed = || SessionError::AuthFailed(String::new());
    let (server_first, waiting) = plus
        .cloned()
        .unwrap_or_default()
        .on_client_first_message_with_secret(&first, secret)
        .map_err(|_| failed())?;
    messages::auth_sasl_continue(server_first.as_bytes(), &mut client.wbuf);
    client.flush().await?;

    let frame = client.read_frame(MAX_AUTH_MESSAGE).await?;
    let last = messages::sasl_response(frame).ok_or_else(|| SessionError::Protocol("expected SASLResponse".into()))?;
    let server_final = waiting.on_client_final_message(&last).map_err(|_| failed())?;
    Ok(Proven {
        first,
        server_first,
        last,
        server_final,
    })
}

/// The SCRAM exchange on a client's first and final messages against a fixed verifier (for
/// the fuzz targets: pgwire's SCRAM parsers see only what the proxy hands them).
#[doc(hidden)]
pub(crate) fn scram_exchange(first: &[u8], fin: &[u8]) {
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
