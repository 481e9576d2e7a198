//! SCRAM-SHA-256 with keys instead of a password, for users found by `auth_query`: the
//! ClientKey a client proves at login (RFC 5802: ClientProof XOR ClientSignature) is kept in
//! memory, and the server leg proves the same key to PostgreSQL, whose verifier has the same
//! salt and iterations. No password is ever stored or seen.
//!
//! Part of the server connection's login; the client session's SCRAM exchange (pgwire)
//! provides the messages [`client_key_of`] reads.

use std::io;
use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use postgres_protocol::authentication::sasl;
use ring::{digest, hmac};

/// What proves a user to PostgreSQL without its password.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    /// `HMAC(SaltedPassword, "Client Key")`.
    pub(crate) client_key: Vec<u8>,
    /// `HMAC(SaltedPassword, "Server Key")`, to check the server's signature.
    pub(crate) server_key: Vec<u8>,
    /// The verifier's salt: a server offering another one has another password.
    pub(crate) salt: Vec<u8>,
    /// The verifier's iterations.
    pub(crate) iterations: usize,
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(<redacted>)")
    }
}

/// The keys of one auth_query user, learned at the first successful client login and shared
/// with that user's pools (replaced when the password changes).
#[derive(Debug, Default)]
pub struct KeySlot(pub Mutex<Option<ScramKeys>>);

impl KeySlot {
    /// The keys learned so far.
    pub fn get(&self) -> Option<ScramKeys> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Keeps `keys` for the next server connections.
    pub fn set(&self, keys: ScramKeys) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(keys);
    }
}

impl PartialEq for KeySlot {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}
impl Eq for KeySlot {}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), msg)
        .as_ref()
        .to_vec()
}

fn xor(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.iter().zip(b).map(|(x, y)| x ^ y).collect()
}

/// The client-first-message-bare: what follows the GS2 header (`n,,`, `y,,`, `p=...,,`).
fn first_bare(client_first: &[u8]) -> Option<&[u8]> {
    let first_comma = client_first.iter().position(|&b| b == b',')?;
    let second = client_first[first_comma + 1..].iter().position(|&b| b == b',')?;
    Some(&client_first[first_comma + 1 + second + 1..])
}

/// Splits a client-final-message into the part without the proof and the decoded proof.
fn split_proof(client_final: &[u8]) -> Option<(&[u8], Vec<u8>)> {
    let at = client_final.windows(3).rposition(|w| w == b",p=")?;
    let proof = STANDARD.decode(&client_final[at + 3..]).ok()?;
    Some((&client_final[..at], proof))
}

/// The ClientKey a client proved in an exchange the proxy verified: `client_first` (with its
/// GS2 header) and `client_final` as the client sent them, `server_first` as the proxy sent it.
/// None when the messages do not fit `stored_key` (then the login did not succeed either).
pub(crate) fn client_key_of(
    client_first: &[u8],
    server_first: &str,
    client_final: &[u8],
    stored_key: &[u8],
) -> Option<Vec<u8>> {
    let bare = first_bare(client_first)?;
    let (without_proof, proof) = split_proof(client_final)?;
    let mut auth = Vec::with_capacity(bare.len() + server_first.len() + without_proof.len() + 2);
    auth.extend_from_slice(bare);
    auth.push(b',');
    auth.extend_from_slice(server_first.as_bytes());
    auth.push(b',');
    auth.extend_from_slice(without_proof);
    let signature = hmac_sha256(stored_key, &auth);
    if proof.len() != signature.len() {
        return None;
    }
    let key = xor(&proof, &signature);
    (digest::digest(&digest::SHA256, &key).as_ref() == stored_key).then_some(key)
}

/// The client side of SCRAM-SHA-256 (no channel binding) with [`ScramKeys`].
pub(crate) struct KeyScram {
    keys: ScramKeys,
    nonce: String,
    message: Vec<u8>,
    /// The server signature expected in server-final.
    expect: Option<Vec<u8>>,
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

impl KeyScram {
    /// Starts an exchange: the client-first-message is ready in [`KeyScram::message`].
    pub(crate) fn new(keys: ScramKeys) -> KeyScram {
        let mut raw = [0u8; 18];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw);
        let nonce = STANDARD.encode(raw);
        let message = format!("n,,n=,r={nonce}").into_bytes();
        KeyScram {
            keys,
            nonce,
            message,
            expect: None,
        }
    }

    /// The next message to send.
    pub(crate) fn message(&self) -> &[u8] {
        &self.message
    }

    /// Takes the server-first-message and prepares the client-final-message.
    ///
    /// # Errors
    /// A malformed message, a nonce that does not extend ours, or a salt or iteration count
    /// other than the verifier's (the password changed since the keys were learned).
    pub(crate) fn update(&mut self, server_first: &[u8]) -> io::Result<()> {
        let text = std::str::from_utf8(server_first).map_err(|_| bad("server-first is not UTF-8"))?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for part in text.split(',') {
            match part.split_at_checked(2) {
                Some(("r=", v)) => nonce = Some(v),
                Some(("s=", v)) => salt = STANDARD.decode(v).ok(),
                Some(("i=", v)) => iterations = v.parse::<usize>().ok(),
                _ => {}
            }
        }
        let nonce = nonce.filter(|n| n.starts_with(&self.nonce) && n.len() > self.nonce.len());
        let nonce = nonce.ok_or_else(|| bad("server nonce does not extend the client's"))?;
        if salt.as_ref() != Some(&self.keys.salt) || iterations != Some(self.keys.iterations) {
            return Err(bad(
                "the server's salt or iterations differ from the verifier's (password changed?)",
            ));
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth = format!("n=,r={},{text},{without_proof}", self.nonce);
        let stored_key = digest::digest(&digest::SHA256, &self.keys.client_key);
        let signature = hmac_sha256(stored_key.as_ref(), auth.as_bytes());
        let proof = xor(&self.keys.client_key, &signature);
        self.message = format!("{without_proof},p={}", STANDARD.encode(proof)).into_bytes();
        self.expect = Some(hmac_sha256(&self.keys.server_key, auth.as_bytes()));
        Ok(())
    }

    /// Checks the server-final-message.
    ///
    /// # Errors
    /// The server's error, or a signature that does not prove it knows the verifier.
    pub(crate) fn finish(&mut self, server_final: &[u8]) -> io::Result<()> {
        let text = std::str::from_utf8(server_final).map_err(|_| bad("server-final is not UTF-8"))?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(bad(e));
        }
        let got = text.strip_prefix("v=").and_then(|v| STANDARD.decode(v).ok());
        match (&self.expect, got) {
            (Some(want), Some(got)) if *want == got => Ok(()),
            _ => Err(bad("invalid server signature")),
        }
    }
}

/// A SCRAM exchange of the server leg.
pub(super) enum Scram {
    /// With the configured password (postgres-protocol), and the mechanism chosen.
    Password(sasl::ScramSha256, &'static str),
    /// With an auth_query user's keys.
    Keys(KeyScram),
}

impl Scram {
    pub(super) fn mechanism(&self) -> &'static str {
        match self {
            Scram::Password(_, m) => m,
            Scram::Keys(_) => sasl::SCRAM_SHA_256,
        }
    }

    pub(super) fn message(&self) -> &[u8] {
        match self {
            Scram::Password(s, _) => s.message(),
            Scram::Keys(s) => s.message(),
        }
    }

    pub(super) fn update(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Scram::Password(s, _) => s.update(data),
            Scram::Keys(s) => s.update(data),
        }
    }

    pub(super) fn finish(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Scram::Password(s, _) => s.finish(data),
            Scram::Keys(s) => s.finish(data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn salted(password: &str, salt: &[u8], iterations: usize) -> Vec<u8> {
        let mut out = [0u8; 32];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(iterations as u32).unwrap(),
            salt,
            password.as_bytes(),
            &mut out,
        );
        out.to_vec()
    }

    #[test]
    fn the_client_key_recovered_from_a_proof_logs_in_like_the_password() {
        let (salt, iterations) = (b"0123456789abcdef".to_vec(), 4096);
        let sp = salted("hunter2", &salt, iterations);
        let client_key = hmac_sha256(&sp, b"Client Key");
        let server_key = hmac_sha256(&sp, b"Server Key");
        let stored = digest::digest(&digest::SHA256, &client_key).as_ref().to_vec();
        let keys = ScramKeys {
            client_key: client_key.clone(),
            server_key: server_key.clone(),
            salt: salt.clone(),
            iterations,
        };
        // A "server" answering the key-based client: the proof must recover the same key.
        let mut c = KeyScram::new(keys);
        let first = c.message().to_vec();
        let server_first = format!("r={}srv,s={},i={iterations}", &c.nonce, STANDARD.encode(&salt));
        c.update(server_first.as_bytes()).unwrap();
        let fin = c.message().to_vec();
        assert_eq!(
            client_key_of(&first, &server_first, &fin, &stored),
            Some(client_key.clone())
        );
        // The server's signature, as PostgreSQL computes it.
        let (without, _) = split_proof(&fin).unwrap();
        let auth = [first_bare(&first).unwrap(), server_first.as_bytes(), without].join(&b","[..]);
        let v = format!("v={}", STANDARD.encode(hmac_sha256(&server_key, &auth)));
        c.finish(v.as_bytes()).unwrap();
        assert!(c.finish(b"v=AAAA").is_err());
        // A tampered proof recovers nothing.
        let mut tampered = fin.clone();
        let n = tampered.len();
        tampered[n - 3] ^= 1;
        assert_eq!(client_key_of(&first, &server_first, &tampered, &stored), None);
        // Another salt means another password.
        let mut c = KeyScram::new(ScramKeys {
            client_key,
            server_key,
            salt,
            iterations,
        });
        let other = format!("r={}x,s={},i={iterations}", &c.nonce, STANDARD.encode(b"other"));
        assert!(c.update(other.as_bytes()).is_err());
    }
}
