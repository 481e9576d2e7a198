//! Who may see the status page and `/status.json`: loopback always; any other address only
//! with `[http] auth_user`/`auth_password` (basic auth) or `auth_token` (bearer) configured
//! and given. Without either configured, other addresses get 403.
//!
//! Part of the HTTP endpoint. `/metrics`, `/healthz` and `/readyz` are not guarded (probes
//! and Prometheus scrape them; they show no more than the metrics do).

use std::net::SocketAddr;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;

use crate::config::HttpAuth;

/// Equal without telling how much of it matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the `Authorization` header matches what `auth` allows.
fn authorized(auth: &HttpAuth, headers: &HeaderMap) -> bool {
    let Some(given) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    if let (Some(t), Some(bearer)) = (&auth.token, given.strip_prefix("Bearer ")) {
        return same(bearer.trim().as_bytes(), t.0.as_bytes());
    }
    if let (Some((user, password)), Some(basic)) = (&auth.basic, given.strip_prefix("Basic ")) {
        let want = format!("{user}:{}", password.0);
        return base64::engine::general_purpose::STANDARD
            .decode(basic.trim())
            .is_ok_and(|got| same(&got, want.as_bytes()));
    }
    false
}

/// None for loopback and for authorized requests; else the response that refuses.
pub(super) fn refusal(auth: &HttpAuth, peer: SocketAddr, headers: &HeaderMap) -> Option<Response> {
    let ip = peer.ip().to_canonical();
    if ip.is_loopback() {
        return None;
    }
    if auth.is_none() {
        return Some((
            StatusCode::FORBIDDEN,
            "The status page is served to loopback only; set [http] auth_user/auth_password or auth_token to allow other hosts.\n",
        )
            .into_response());
    }
    if authorized(auth, headers) {
        return None;
    }
    let challenge = if auth.basic.is_some() {
        "Basic realm=\"pgvalve\""
    } else {
        "Bearer"
    };
    Some(
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, challenge)],
            "pgvalve: credentials needed\n",
        )
            .into_response(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn with(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn loopback_always_others_with_credentials_only() {
        let none = HttpAuth::default();
        let local: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:1".parse().unwrap();
        let far: SocketAddr = "10.0.0.9:1".parse().unwrap();
        assert!(refusal(&none, local, &HeaderMap::new()).is_none());
        assert!(refusal(&none, mapped, &HeaderMap::new()).is_none());
        let r = refusal(&none, far, &with("Bearer x")).unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let auth = HttpAuth {
            basic: Some(("ops".into(), Secret("pw".into()))),
            token: Some(Secret("0123456789abcdef".into())),
        };
        assert!(refusal(&auth, far, &with("Bearer 0123456789abcdef")).is_none());
        assert!(refusal(&auth, far, &with("Basic b3BzOnB3")).is_none(), "ops:pw");
        assert_eq!(
            refusal(&auth, far, &with("Basic b3BzOnB4")).unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            refusal(&auth, far, &with("Bearer 0123456789abcdeX")).unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            refusal(&auth, far, &HeaderMap::new()).unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }
}
