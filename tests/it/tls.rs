//! TLS on both legs with certificates generated here (rcgen): tokio-postgres and psql with
//! sslmode=require / verify-full and SCRAM-SHA-256-PLUS, PostgreSQL 17's direct TLS (ALPN),
//! plaintext refused under client_tls_mode = require, bytes pipelined after SSLRequest refused,
//! pgvalve → PostgreSQL over TLS (verify-full, a wrong CA, require against a plaintext server,
//! prefer), and certificates replaced by a reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pgvalve::config::{ClientTlsMode, Config, ServerTlsMode};
use pgvalve::testkit::{PgOptions, TestPostgres, TlsFiles};
use pgvalve::ProxyHandle;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::config::{ChannelBinding, SslMode, SslNegotiation};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::support::{code, within, Setup};

/// A CA and a server certificate it signed for localhost and 127.0.0.1.
pub(crate) struct Pki {
    pub(crate) ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

pub(crate) fn pki(name: &str) -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = leaf.signed_by(&key, &ca).unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// Writes the server certificate and key of `p` into `dir` (cert, key paths).
pub(crate) fn write_pair(dir: &Path, p: &Pki) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&cert, &p.cert_pem).unwrap();
    std::fs::write(&key, &p.key_pem).unwrap();
    (cert, key)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A tokio-postgres TLS connector trusting `ca_pem` (it checks the host name too).
pub(crate) fn connector(ca_pem: &str, alpn: bool) -> MakeRustlsConnect {
    MakeRustlsConnect::new(client_tls(ca_pem, alpn))
}

/// A rustls client configuration trusting `ca_pem`, offering ALPN `postgresql` when `alpn`.
fn client_tls(ca_pem: &str, alpn: bool) -> rustls::ClientConfig {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    if alpn {
        config.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    config
}

/// tokio-postgres through `proxy` as the application role, host `localhost`.
pub(crate) fn client_config(proxy: &ProxyHandle) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host("localhost")
        .port(proxy.local_addr().port())
        .user("app")
        .password("app-secret")
        .dbname("app")
        .connect_timeout(Duration::from_secs(5));
    c
}

async fn query_over(c: &tokio_postgres::Config, tls: MakeRustlsConnect) -> Result<i32, tokio_postgres::Error> {
    let (client, conn) = c.connect(tls).await?;
    tokio::spawn(conn);
    let row = client.query_one("SELECT 41 + 1", &[]).await?;
    Ok(row.get(0))
}

/// A proxy with TLS towards clients (`mode`), its certificate files in `dir`.
async fn tls_proxy(pg: &TestPostgres, dir: &Path, p: &Pki, mode: ClientTlsMode) -> (ProxyHandle, PathBuf) {
    let (cert, key) = write_pair(dir, p);
    let mut f = pg.file_config();
    f.tls.client_tls_mode = Some(mode);
    f.tls.client_tls_cert_file = Some(cert);
    f.tls.client_tls_key_file = Some(key);
    let text = toml_of(&f, pg);
    let path = dir.join("pgvalve.toml");
    std::fs::write(&path, text).unwrap();
    let config = pgvalve::config::load(&path).expect("valid TLS config");
    let proxy = ProxyHandle::start(config).await.expect("start proxy");
    proxy.set_reload_source(Some(path.clone()), Default::default());
    (proxy, path)
}

/// The testkit's config as a file, with the TLS settings of `f`.
fn toml_of(f: &pgvalve::config::FileConfig, pg: &TestPostgres) -> String {
    let t = &f.tls;
    let opt = |p: &Option<PathBuf>| p.as_ref().map(|p| format!("{:?}", p.display().to_string()));
    let mut s = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[databases.app]\nhost = \"127.0.0.1\"\nport = {}\n[users.app]\npassword = \"app-secret\"\n[tls]\n",
        pg.port()
    );
    if let Some(m) = t.client_tls_mode {
        s += &format!("client_tls_mode = \"{m}\"\n");
    }
    if let (Some(c), Some(k)) = (opt(&t.client_tls_cert_file), opt(&t.client_tls_key_file)) {
        s += &format!("client_tls_cert_file = {c}\nclient_tls_key_file = {k}\n");
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_over_tls_with_channel_binding_and_plaintext_refused() {
    let pg = TestPostgres::start(PgOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = pki("first");
    let (proxy, _) = tls_proxy(&pg, dir.path(), &p, ClientTlsMode::Require).await;

    // tokio-postgres, sslmode=require, the certificate checked against the CA and the name,
    // SCRAM-SHA-256-PLUS demanded.
    let mut c = client_config(&proxy);
    c.ssl_mode(SslMode::Require).channel_binding(ChannelBinding::Require);
    assert_eq!(
        within(Duration::from_secs(10), query_over(&c, connector(&p.ca_pem, false)))
            .await
            .unwrap(),
        42
    );

    // PostgreSQL 17's direct TLS: with ALPN "postgresql" it works, without it is refused.
    c.ssl_negotiation(SslNegotiation::Direct);
    assert_eq!(
        within(Duration::from_secs(10), query_over(&c, connector(&p.ca_pem, true)))
            .await
            .unwrap(),
        42
    );
    assert!(
        within(Duration::from_secs(10), query_over(&c, connector(&p.ca_pem, false)))
            .await
            .is_err()
    );

    // Another CA's client refuses pgvalve's certificate.
    let mut c = client_config(&proxy);
    c.ssl_mode(SslMode::Require);
    assert!(within(
        Duration::from_secs(10),
        query_over(&c, connector(&pki("other").ca_pem, false))
    )
    .await
    .is_err());

    // Plaintext: FATAL 28000 naming the setting.
    let e = tokio_postgres::connect(
        &format!("postgres://app:app-secret@{}/app?sslmode=disable", proxy.local_addr()),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("plaintext refused");
    assert_eq!(code(&e).as_deref(), Some("28000"), "{e}");
    assert!(message(&e).contains("client_tls_mode = require"), "{e:?}");

    // psql (libpq): verify-full with channel binding required; sslmode=disable refused.
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, &p.ca_pem).unwrap();
    let conninfo = format!(
        "host=localhost port={} user=app dbname=app sslmode=verify-full sslrootcert={} channel_binding=require",
        proxy.local_addr().port(),
        ca.display()
    );
    let out = psql_conninfo(&conninfo, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()");
    assert_eq!(
        out.as_ref().map(|s| s.as_str()),
        Ok("f"),
        "psql over TLS to pgvalve: {out:?}"
    );
    let require = format!(
        "host=127.0.0.1 port={} user=app dbname=app sslmode=require",
        proxy.local_addr().port()
    );
    assert_eq!(
        psql_conninfo(&require, "SELECT 7").as_deref(),
        Ok("7"),
        "psql sslmode=require"
    );
    let plain = format!(
        "host=localhost port={} user=app dbname=app sslmode=disable",
        proxy.local_addr().port()
    );
    let err = psql_conninfo(&plain, "SELECT 1").expect_err("plaintext psql refused");
    assert!(err.contains("TLS is required"), "{err}");
    proxy.shutdown().await;
}

/// PostgreSQL's message of an error (or the client's own).
fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

/// Runs psql with a connection string; its output, or its error output.
fn psql_conninfo(conninfo: &str, sql: &str) -> Result<String, String> {
    let bindir = pgvalve::testkit::find_bindir().expect("PostgreSQL binaries");
    let out = std::process::Command::new(bindir.join("psql"))
        .args([conninfo, "-tA", "-c", sql])
        .env("PGPASSWORD", "app-secret")
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

#[tokio::test]
async fn bytes_pipelined_after_ssl_request_are_refused() {
    let pg = TestPostgres::start(PgOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (proxy, _) = tls_proxy(&pg, dir.path(), &pki("p"), ClientTlsMode::Prefer).await;
    let mut s = tokio::net::TcpStream::connect(proxy.local_addr()).await.unwrap();
    // SSLRequest and, in the same write, a plaintext startup packet.
    let mut bytes = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let startup = b"\x00\x03\x00\x00user\x00app\x00\x00";
    bytes.extend_from_slice(&((startup.len() + 4) as i32).to_be_bytes());
    bytes.extend_from_slice(startup);
    s.write_all(&bytes).await.unwrap();
    let mut got = Vec::new();
    within(Duration::from_secs(5), s.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got.first(), Some(&b'E'), "no 'S', an error instead: {got:?}");
    assert!(String::from_utf8_lossy(&got).contains("08P01"));
    // Prefer: a plaintext client is still served.
    let c = crate::support::connect(&format!("postgres://app:app-secret@{}/app", proxy.local_addr())).await;
    assert_eq!(c.unwrap().query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_replaces_the_certificate() {
    let pg = TestPostgres::start(PgOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (pki("old"), pki("new"));
    let (proxy, _) = tls_proxy(&pg, dir.path(), &old, ClientTlsMode::Require).await;
    let mut c = client_config(&proxy);
    c.ssl_mode(SslMode::Require);
    assert!(query_over(&c, connector(&old.ca_pem, false)).await.is_ok());
    write_pair(dir.path(), &new);
    proxy
        .reload_from_source()
        .await
        .expect("reload with the new certificate");
    assert!(query_over(&c, connector(&new.ca_pem, false)).await.is_ok());
    assert!(query_over(&c, connector(&old.ca_pem, false)).await.is_err());
    // A broken key file is refused whole; the certificate in force stays.
    std::fs::write(dir.path().join("server.key"), "not a key").unwrap();
    let e = proxy.reload_from_source().await.expect_err("broken key refused");
    assert!(e.contains("tls.client_tls_key_file"), "{e}");
    assert!(query_over(&c, connector(&new.ca_pem, false)).await.is_ok());
    proxy.shutdown().await;
}

/// A cluster with ssl = on and the certificate of `p`.
async fn tls_cluster(p: &Pki) -> TestPostgres {
    TestPostgres::start(PgOptions {
        tls: Some(TlsFiles {
            cert_pem: p.cert_pem.clone(),
            key_pem: p.key_pem.clone(),
        }),
        ..PgOptions::default()
    })
    .await
    .expect("start PostgreSQL with ssl = on")
}

fn server_tls(mode: ServerTlsMode, ca: Option<PathBuf>) -> impl FnOnce(&mut pgvalve::config::FileConfig) {
    move |f| {
        f.tls.server_tls_mode = Some(mode);
        f.tls.server_tls_ca_file = ca;
    }
}

async fn ssl_of_backend(url: &str) -> Result<bool, tokio_postgres::Error> {
    let c = crate::support::connect(url).await?;
    let row = c
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgvalve_reaches_postgres_over_tls() {
    let p = pki("server");
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, &p.ca_pem).unwrap();
    let wrong = dir.path().join("wrong-ca.crt");
    std::fs::write(&wrong, pki("wrong").ca_pem).unwrap();

    // verify-full against the right CA (the certificate names 127.0.0.1): TLS, SCRAM over it.
    let pg = tls_cluster(&p).await;
    let f = |mode, ca: &PathBuf| {
        let mut f = pg.file_config();
        server_tls(mode, Some(ca.clone()))(&mut f);
        Config::validate(f, "test").unwrap()
    };
    for mode in [
        ServerTlsMode::VerifyFull,
        ServerTlsMode::VerifyCa,
        ServerTlsMode::Require,
    ] {
        let proxy = ProxyHandle::start(f(mode, &ca)).await.unwrap();
        let url = format!("postgres://app:app-secret@{}/app", proxy.local_addr());
        assert!(ssl_of_backend(&url).await.unwrap(), "{mode:?}: the server leg is TLS");
        proxy.shutdown().await;
    }
    // The wrong CA: the client is told, naming the server and TLS.
    let proxy = ProxyHandle::start(f(ServerTlsMode::VerifyFull, &wrong)).await.unwrap();
    let url = format!("postgres://app:app-secret@{}/app", proxy.local_addr());
    let e = ssl_of_backend(&url).await.expect_err("wrong CA refused");
    assert_eq!(code(&e).as_deref(), Some("08006"), "{e}");
    assert!(message(&e).contains("TLS"), "{e:?}");
    proxy.shutdown().await;
    drop(pg);

    // A plaintext server: require fails, prefer goes on without TLS.
    let s = Setup::new(server_tls(ServerTlsMode::Require, None)).await;
    let e = ssl_of_backend(&s.url())
        .await
        .expect_err("require against a plaintext server");
    assert!(message(&e).contains("does not offer TLS"), "{e:?}");
    s.proxy.shutdown().await;
    let s = Setup::new(server_tls(ServerTlsMode::Prefer, None)).await;
    assert!(!ssl_of_backend(&s.url()).await.unwrap());
    s.proxy.shutdown().await;
}

#[test]
fn tls_settings_are_validated() {
    let bad = |text: &str| {
        let r = pgvalve::config::parse_toml("t", text).and_then(|f| Config::validate(f, "t"));
        r.expect_err(text).to_string()
    };
    let base = "[databases.app]\n[users.app]\npassword = \"x\"\n[tls]\n";
    assert!(bad(&format!("{base}client_tls_mode = \"require\"\n")).contains("tls.client_tls_mode"));
    assert!(bad(&format!("{base}client_tls_cert_file = \"/nonexistent.crt\"\n")).contains("client_tls_key_file"));
    assert!(bad(&format!(
        "{base}client_tls_cert_file = \"/nonexistent.crt\"\nclient_tls_key_file = \"/nonexistent.key\"\n"
    ))
    .contains("cannot read /nonexistent.crt"));
    assert!(bad(&format!("{base}server_tls_mode = \"verify-full\"\n")).contains("server_tls_ca_file"));
    assert!(bad(&format!("{base}server_tls_mode = \"verify-everything\"\n")).contains("verify-full"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_results_and_requests_stream_through_tls_on_both_legs() {
    let p = pki("both");
    let pg = tls_cluster(&p).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, &p.ca_pem).unwrap();
    let (cert, key) = write_pair(dir.path(), &p);
    let mut f = pg.file_config();
    f.pool.pool_mode = pgvalve::config::PoolMode::Transaction;
    f.tls.client_tls_mode = Some(ClientTlsMode::Require);
    f.tls.client_tls_cert_file = Some(cert);
    f.tls.client_tls_key_file = Some(key);
    f.tls.server_tls_mode = Some(ServerTlsMode::VerifyFull);
    f.tls.server_tls_ca_file = Some(ca);
    let proxy = ProxyHandle::start(Config::validate(f, "test").unwrap()).await.unwrap();
    let mut c = client_config(&proxy);
    c.ssl_mode(SslMode::Require);
    let (client, conn) = c.connect(connector(&p.ca_pem, false)).await.unwrap();
    tokio::spawn(conn);
    within(Duration::from_secs(60), async {
        // 30 MB back, 8 MB up, several times: the relay must flush TLS records the socket
        // did not take at once, in both directions.
        for _ in 0..3 {
            let row = client.query_one("SELECT repeat('x', 30000000)", &[]).await.unwrap();
            assert_eq!(row.get::<_, String>(0).len(), 30_000_000);
            let big = "y".repeat(8_000_000);
            let row = client.query_one("SELECT length($1::text)", &[&big]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), 8_000_000);
        }
        let row = client
            .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .await
            .unwrap();
        assert!(row.get::<_, bool>(0));
    })
    .await;
    proxy.shutdown().await;
}

/// Reads whole messages until ReadyForQuery; returns how many bytes of DataRow came.
async fn read_until_ready<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> usize {
    let mut rows = 0;
    loop {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.unwrap();
        match head[0] {
            b'D' => rows += len,
            b'E' => panic!("error: {}", String::from_utf8_lossy(&body)),
            b'Z' => return rows,
            _ => {}
        }
    }
}

fn query_message(sql: &str) -> Vec<u8> {
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    q.push(0);
    q
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_that_reads_late_still_gets_the_end_of_its_result() {
    // Transaction mode: the relay must not hand the server connection back while TLS
    // records of the result (its ReadyForQuery last) still wait in the stream.
    let pg = TestPostgres::start(PgOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = pki("late");
    let (cert, key) = write_pair(dir.path(), &p);
    let mut f = pg.file_config();
    f.proxy.auth_type = pgvalve::config::AuthType::Trust;
    f.pool.pool_mode = pgvalve::config::PoolMode::Transaction;
    f.tls.client_tls_cert_file = Some(cert);
    f.tls.client_tls_key_file = Some(key);
    let proxy = ProxyHandle::start(Config::validate(f, "test").unwrap()).await.unwrap();

    let mut tcp = tokio::net::TcpStream::connect(proxy.local_addr()).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.unwrap();
    assert_eq!(tcp.read_u8().await.unwrap(), b'S');
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(client_tls(&p.ca_pem, false)))
        .connect(name, tcp)
        .await
        .unwrap();
    let body = b"\x00\x03\x00\x00user\x00app\x00database\x00app\x00\x00";
    let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    startup.extend_from_slice(body);
    s.write_all(&startup).await.unwrap();
    read_until_ready(&mut s).await;
    for _ in 0..3 {
        s.write_all(&query_message("SELECT repeat('x', 20000000)"))
            .await
            .unwrap();
        s.flush().await.unwrap();
        // Not reading for a while: the socket fills and pgvalve holds encrypted records.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let got = within(Duration::from_secs(20), read_until_ready(&mut s)).await;
        assert!(got >= 20_000_000, "{got} bytes of rows");
    }
    s.write_all(&query_message("SELECT 1")).await.unwrap();
    s.flush().await.unwrap();
    within(Duration::from_secs(5), read_until_ready(&mut s)).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_takes_tls_from_the_environment() {
    let pg = TestPostgres::start(PgOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = pki("env");
    let (cert, key) = write_pair(dir.path(), &p);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgvalve"))
        .args(["run", "--listen", &format!("127.0.0.1:{port}")])
        .env("XDG_RUNTIME_DIR", env!("CARGO_TARGET_TMPDIR"))
        .env(
            "PGVALVE_UPSTREAM",
            format!("postgres://app:app-secret@127.0.0.1:{}", pg.port()),
        )
        .env("PGVALVE_CLIENT_TLS_CERT", &cert)
        .env("PGVALVE_CLIENT_TLS_KEY", &key)
        .env("PGVALVE_CLIENT_TLS_MODE", "require")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut c = tokio_postgres::Config::new();
    c.host("localhost")
        .port(port)
        .user("app")
        .password("app-secret")
        .dbname("app")
        .ssl_mode(SslMode::Require);
    crate::support::eventually(Duration::from_secs(10), "TLS through the binary", || async {
        query_over(&c, connector(&p.ca_pem, false)).await.is_ok()
    })
    .await;
    let plain = format!("postgres://app:app-secret@127.0.0.1:{port}/app?sslmode=disable");
    let e = tokio_postgres::connect(&plain, tokio_postgres::NoTls)
        .await
        .err()
        .expect("plaintext refused");
    assert_eq!(code(&e).as_deref(), Some("28000"), "{e:?}");
    child.kill().await.unwrap();
}

/// TLS after a PROXY header: a trusted balancer's v2 header, then SSLRequest and the
/// handshake, as TCP balancers that do not terminate TLS send them; the session is known by
/// the header's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_follows_a_proxy_protocol_header() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki("proxied");
    let (cert, key) = write_pair(dir.path(), &p);
    let s = Setup::new(|f| {
        f.tls.client_tls_mode = Some(ClientTlsMode::Require);
        f.tls.client_tls_cert_file = Some(cert);
        f.tls.client_tls_key_file = Some(key);
        f.proxy.proxy_protocol_trusted = "127.0.0.1".parse().unwrap();
        f.admin.admin_users = vec!["app".into()];
    })
    .await;
    let app = proxied_tls(&s.proxy, &p.ca_pem, "app", "192.0.2.44:51000").await;
    let one: i32 = app.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let admin = proxied_tls(&s.proxy, &p.ca_pem, "pgvalve", "192.0.2.45:51001").await;
    let out = admin.simple_query("SHOW CLIENTS").await.unwrap();
    let addrs: Vec<(String, String)> = out
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get("database") == Some("app") => {
                Some((r.get("addr").unwrap().to_string(), r.get("port").unwrap().to_string()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(addrs, vec![("192.0.2.44".to_string(), "51000".to_string())]);
}

/// A TLS session (sslmode=require) to `db` behind a v2 PROXY header naming `source`.
async fn proxied_tls(proxy: &ProxyHandle, ca_pem: &str, db: &str, source: &str) -> tokio_postgres::Client {
    use tokio_postgres::tls::MakeTlsConnect;
    let dest = proxy.local_addr();
    let mut stream = tokio::net::TcpStream::connect(dest).await.unwrap();
    let header = pgvalve::protocol::proxy_header::encode_v2(source.parse().unwrap(), dest);
    stream.write_all(&header).await.unwrap();
    let mut c = client_config(proxy);
    c.dbname(db).ssl_mode(SslMode::Require);
    let tls = MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(&mut connector(ca_pem, false), "localhost");
    let (client, conn) = within(Duration::from_secs(30), c.connect_raw(stream, tls.unwrap()))
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}
