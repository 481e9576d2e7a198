//! `[tls]` loaded: the acceptor towards clients (SSLRequest and PostgreSQL 17's direct TLS),
//! with the SCRAM-SHA-256-PLUS channel-binding data of our certificate, and the connector
//! towards PostgreSQL with libpq's sslmode meanings.
//!
//! Part of config: certificates are read when the configuration is validated, so a reload
//! reads renewed certificates off to the side and publishes them only if they all load.
//! rustls runs with the ring provider, set explicitly. The streams themselves are driven in
//! the `tls` module.

use std::path::Path;
use std::sync::Arc;

use pgwire::api::auth::sasl::scram::ScramServerAuth;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{ClientTlsMode, ServerTlsMode, TlsSettings};
use crate::protocol::startup::ALPN;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS towards clients.
#[derive(Clone)]
pub struct ClientTls {
    /// What clients may or must do.
    pub mode: ClientTlsMode,
    /// The handshake, when a certificate is configured.
    pub(crate) acceptor: Option<TlsAcceptor>,
    /// SCRAM with our certificate's channel-binding data (SCRAM-SHA-256-PLUS).
    pub(crate) scram: Option<ScramServerAuth>,
}

/// TLS towards PostgreSQL.
#[derive(Clone)]
pub struct ServerTls {
    /// libpq's sslmode.
    pub mode: ServerTlsMode,
    /// The handshake (None with `disable`).
    pub connector: Option<TlsConnector>,
    /// What the connector was built from (mode and CA file bytes), so pools can tell a change.
    fingerprint: u64,
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        self.mode == other.mode && self.fingerprint == other.fingerprint
    }
}
impl Eq for ServerTls {}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// Both legs.
#[derive(Clone, Default)]
pub struct Tls {
    /// Towards clients.
    pub client: ClientTls,
    /// Towards PostgreSQL.
    pub server: ServerTls,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("client_mode", &self.client.mode)
            .field("server_mode", &self.server.mode)
            .finish()
    }
}

impl Default for ClientTls {
    fn default() -> Self {
        ClientTls {
            mode: ClientTlsMode::Disable,
            acceptor: None,
            scram: None,
        }
    }
}

impl Default for ServerTls {
    fn default() -> Self {
        ServerTls {
            mode: ServerTlsMode::Disable,
            connector: None,
            fingerprint: 0,
        }
    }
}

/// A refusal: the `[tls]` field at fault and why.
type LoadError = (&'static str, String);

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|e| (field, format!("cannot read {}: {e}", path.display())))
}

impl Tls {
    /// Reads the certificates and builds both legs.
    ///
    /// # Errors
    /// The field at fault and why (a missing or unreadable file, a bad PEM, a mode that needs
    /// a file that is not set).
    pub fn load(s: &TlsSettings) -> Result<Tls, LoadError> {
        Ok(Tls {
            client: load_client(s)?,
            server: load_server(s)?,
        })
    }
}

fn load_client(s: &TlsSettings) -> Result<ClientTls, LoadError> {
    let (cert, key) = match (&s.client_tls_cert_file, &s.client_tls_key_file) {
        (Some(c), Some(k)) => (c, k),
        (None, None) => {
            return match s.client_tls_mode.unwrap_or(ClientTlsMode::Disable) {
                ClientTlsMode::Disable => Ok(ClientTls::default()),
                m => Err((
                    "client_tls_mode",
                    format!("\"{m}\" needs client_tls_cert_file and client_tls_key_file"),
                )),
            }
        }
        (Some(_), None) => return Err(("client_tls_key_file", "is needed with client_tls_cert_file".into())),
        (None, Some(_)) => return Err(("client_tls_cert_file", "is needed with client_tls_key_file".into())),
    };
    let mode = s.client_tls_mode.unwrap_or(ClientTlsMode::Prefer);
    let cert_pem = read("client_tls_cert_file", cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| ("client_tls_cert_file", format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err((
            "client_tls_cert_file",
            format!("{}: no certificate in it", cert.display()),
        ));
    }
    let key_pem = read("client_tls_key_file", key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| ("client_tls_key_file", format!("{}: {e}", key.display())))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("client_tls_cert_file", e.to_string()))?;
    let builder = match &s.client_tls_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(client_verifier(&read("client_tls_ca_file", ca)?)?),
    };
    let mut config = builder
        .with_single_cert(chain, key_der)
        .map_err(|e| ("client_tls_key_file", format!("does not fit the certificate: {e}")))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    let mut scram = ScramServerAuth::new();
    // Channel binding needs the certificate's signature hash; without it only SCRAM-SHA-256.
    let scram = scram.configure_certificate(&cert_pem).ok().map(|()| scram);
    Ok(ClientTls {
        mode,
        acceptor: (mode != ClientTlsMode::Disable).then(|| TlsAcceptor::from(Arc::new(config))),
        scram,
    })
}

/// Client certificates are optional, and checked against `ca_pem` when presented (hba_file
/// `cert` lines then need one).
fn client_verifier(ca_pem: &[u8]) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, LoadError> {
    let field = "client_tls_ca_file";
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        let c = c.map_err(|e| (field, e.to_string()))?;
        roots.add(c).map_err(|e| (field, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err((field, "no certificate in it".into()));
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| (field, e.to_string()))
}

fn load_server(s: &TlsSettings) -> Result<ServerTls, LoadError> {
    let mode = s.server_tls_mode.unwrap_or_default();
    let ca = match &s.server_tls_ca_file {
        Some(p) => Some(read("server_tls_ca_file", p)?),
        None if matches!(mode, ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull) => {
            return Err(("server_tls_mode", format!("\"{mode}\" needs server_tls_ca_file")))
        }
        None => None,
    };
    let fingerprint = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ca.hash(&mut h);
        h.finish()
    };
    if mode == ServerTlsMode::Disable {
        return Ok(ServerTls {
            mode,
            connector: None,
            fingerprint,
        });
    }
    let p = provider();
    let webpki = match (&ca, mode) {
        (Some(pem), ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem) {
                let c = c.map_err(|e| ("server_tls_ca_file", e.to_string()))?;
                roots.add(c).map_err(|e| ("server_tls_ca_file", e.to_string()))?;
            }
            let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), p.clone())
                .build()
                .map_err(|e| ("server_tls_ca_file", e.to_string()))?;
            Some(v)
        }
        _ => None,
    };
    let verifier = Arc::new(Verifier {
        provider: p.clone(),
        webpki,
        check_name: mode == ServerTlsMode::VerifyFull,
    });
    let config = rustls::ClientConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("server_tls_mode", e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(ServerTls {
        mode,
        connector: Some(TlsConnector::from(Arc::new(config))),
        fingerprint,
    })
}

/// The server's certificate as sslmode says: `prefer` / `require` check only the handshake
/// signature (libpq's meaning), `verify-ca` the chain up to the CA, `verify-full` the chain
/// and the host name.
#[derive(Debug)]
struct Verifier {
    provider: Arc<CryptoProvider>,
    /// The chain check (verify-ca, verify-full).
    webpki: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
            // The name is checked last, after the chain.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The `tls-server-end-point` channel-binding data of a DER certificate (RFC 5929: its hash
/// with the signature's hash algorithm, SHA-256 for SHA-1 and MD5), if the algorithm is known.
pub(crate) fn end_point_hash(cert_der: &[u8]) -> Option<Vec<u8>> {
    use x509_certificate::{CapturedX509Certificate, SignatureAlgorithm as A};
    let cert = CapturedX509Certificate::from_der(cert_der.to_vec()).ok()?;
    let alg = match cert.signature_algorithm()? {
        A::RsaSha1 | A::RsaSha256 | A::EcdsaSha256 => &ring::digest::SHA256,
        A::RsaSha384 | A::EcdsaSha384 => &ring::digest::SHA384,
        A::RsaSha512 => &ring::digest::SHA512,
        _ => return None,
    };
    Some(ring::digest::digest(alg, cert_der).as_ref().to_vec())
}
