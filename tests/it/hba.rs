//! `hba_file`: each client authenticates the way the first matching pg_hba.conf line says —
//! scram-sha-256, md5, cert (a client certificate signed by `client_tls_ca_file`, its CN the
//! user or mapped to it by `ident_file`), trust, reject — with psql (libpq) as the client;
//! no matching line is 28000, and a reload reads the file again. Without an hba_file,
//! `auth_type = "md5"` and `"cert"` work as a line of that method for every client.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pgvalve::config::{AuthType, Config, FileConfig, Secret, UserConfig};
use pgvalve::testkit::{PgOptions, TestPostgres};
use pgvalve::ProxyHandle;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{code, connect, within};

const HBA: &str = "\
# pgvalve test hba
hostssl   all  app     127.0.0.1/32  cert
hostnossl all  app     127.0.0.1/32  scram-sha-256
host      all  legacy  127.0.0.1/32  md5
host      all  trusty  127.0.0.1     255.255.255.255  trust
host      all  banned  127.0.0.1/32  reject
hostssl   all  mapped  127.0.0.1/32  cert map=laptops
";

/// Writes a CA, the proxy's certificate, and client certificates with CN `app` and
/// `alice-laptop` into `dir`.
fn certificates(dir: &Path) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "hba test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    for (name, cn, sans) in [
        (
            "server",
            "localhost",
            vec!["localhost".to_string(), "127.0.0.1".to_string()],
        ),
        ("app", "app", vec![]),
        ("alice", "alice-laptop", vec![]),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        // libpq refuses a client key others may read.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

fn user(password: Option<&str>, server: Option<&str>) -> UserConfig {
    UserConfig {
        password: password.map(|p| Secret(p.into())),
        server_password: server.map(|p| Secret(p.into())),
        ..Default::default()
    }
}

fn file_config(pg: &TestPostgres, dir: &Path) -> FileConfig {
    let mut f = pg.file_config();
    f.tls.client_tls_cert_file = Some(dir.join("server.crt"));
    f.tls.client_tls_key_file = Some(dir.join("server.key"));
    f.tls.client_tls_ca_file = Some(dir.join("ca.crt"));
    f.proxy.hba_file = Some(dir.join("pg_hba.conf"));
    f.proxy.ident_file = Some(dir.join("pg_ident.conf"));
    f.users.insert("legacy".into(), user(Some("legacy-secret"), None));
    f.users.insert("trusty".into(), user(None, Some("trusty-secret")));
    f.users.insert("banned".into(), user(Some("banned-secret"), None));
    f.users.insert("mapped".into(), user(None, Some("mapped-secret")));
    f
}

/// psql with `conninfo` (and `password` in PGPASSWORD, if any): its output or its error.
async fn psql(port: u16, conninfo: &str, password: Option<&str>, dir: &Path) -> Result<String, String> {
    let bindir = pgvalve::testkit::find_bindir().expect("PostgreSQL binaries");
    let mut cmd = std::process::Command::new(bindir.join("psql"));
    cmd.args([
        &format!(
            "host=127.0.0.1 port={port} dbname=app sslrootcert={} {conninfo}",
            dir.join("ca.crt").display()
        ),
        "-tA",
        "-c",
        "SELECT current_user",
    ])
    .env_remove("PGPASSWORD")
    .env("PGCONNECT_TIMEOUT", "5")
    // No ~/.postgresql certificate or password file of whoever runs the tests.
    .env("PGSSLCERT", "/nonexistent")
    .env("PGSSLKEY", "/nonexistent")
    .env("PGPASSFILE", "/nonexistent");
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    let out = within(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || cmd.output()),
    )
    .await
    .unwrap()
    .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// The authentication request a plaintext client gets for `user`: the code of its first
/// Authentication message (5 = MD5, 10 = SASL).
async fn auth_request(proxy: &ProxyHandle, user: &str) -> i32 {
    let mut s = tokio::net::TcpStream::connect(proxy.local_addr()).await.unwrap();
    let mut body = 196_608i32.to_be_bytes().to_vec();
    for kv in ["user", user, "database", "app", ""] {
        body.extend_from_slice(kv.as_bytes());
        body.push(0);
    }
    let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    s.write_all(&msg).await.unwrap();
    let mut head = [0u8; 9];
    within(Duration::from_secs(10), s.read_exact(&mut head)).await.unwrap();
    assert_eq!(head[0], b'R', "an authentication request");
    i32::from_be_bytes(head[5..9].try_into().unwrap())
}

async fn setup(dir: &Path) -> (TestPostgres, ProxyHandle, FileConfig) {
    certificates(dir);
    std::fs::write(dir.join("pg_hba.conf"), HBA).unwrap();
    std::fs::write(
        dir.join("pg_ident.conf"),
        "# map cert-CN user\nlaptops alice-laptop mapped\n",
    )
    .unwrap();
    let pg = TestPostgres::start(PgOptions::default())
        .await
        .expect("start PostgreSQL");
    let su = pg.superuser().await.unwrap();
    for (role, pw) in [
        ("legacy", "legacy-secret"),
        ("trusty", "trusty-secret"),
        ("banned", "banned-secret"),
        ("mapped", "mapped-secret"),
    ] {
        su.batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD '{pw}'"))
            .await
            .unwrap();
    }
    let f = file_config(&pg, dir);
    let proxy = ProxyHandle::start(Config::validate(f.clone(), "test").expect("valid config"))
        .await
        .expect("start proxy");
    (pg, proxy, f)
}

fn cert(dir: &Path, name: &str) -> String {
    format!(
        "sslmode=require sslcert={} sslkey={}",
        dir.join(format!("{name}.crt")).display(),
        dir.join(format!("{name}.key")).display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_authenticates_as_its_hba_line_says() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_pg, proxy, f) = setup(dir).await;
    let port = proxy.local_addr().port();
    let run = |user: &str, extra: String, pw: Option<&'static str>| {
        let conninfo = format!("user={user} {extra}");
        async move { psql(port, &conninfo, pw, dir).await }
    };
    let plain = || "sslmode=disable".to_string();
    // scram-sha-256 (hostnossl): the password, and only the right one.
    assert_eq!(run("app", plain(), Some("app-secret")).await.unwrap(), "app");
    let e = run("app", plain(), Some("wrong")).await.unwrap_err();
    assert!(e.contains("password authentication failed for user \"app\""), "{e}");
    assert_eq!(auth_request(&proxy, "app").await, 10, "SASL");
    // cert (hostssl): the certificate and no password; without one, or with another
    // name's, refused with 28000.
    assert_eq!(run("app", cert(dir, "app"), None).await.unwrap(), "app");
    let e = run("app", "sslmode=require".into(), Some("app-secret"))
        .await
        .unwrap_err();
    assert!(e.contains("connection requires a valid client certificate"), "{e}");
    let e = run("app", cert(dir, "alice"), None).await.unwrap_err();
    assert!(e.contains("certificate authentication failed for user \"app\""), "{e}");
    // cert with map=: CN alice-laptop logs in as mapped.
    assert_eq!(run("mapped", cert(dir, "alice"), None).await.unwrap(), "mapped");
    // md5: the challenge is MD5, answered from the md5 verifier.
    assert_eq!(auth_request(&proxy, "legacy").await, 5, "MD5");
    assert_eq!(run("legacy", plain(), Some("legacy-secret")).await.unwrap(), "legacy");
    let e = run("legacy", plain(), Some("nope")).await.unwrap_err();
    assert!(e.contains("password authentication failed for user \"legacy\""), "{e}");
    // trust (an address with a mask column): no password.
    assert_eq!(run("trusty", plain(), None).await.unwrap(), "trusty");
    // reject, and no line at all: 28000 with PostgreSQL's messages.
    let e = run("banned", plain(), Some("banned-secret")).await.unwrap_err();
    assert!(
        e.contains("pg_hba.conf rejects connection for host \"127.0.0.1\", user \"banned\""),
        "{e}"
    );
    let e = run("stranger", plain(), Some("x")).await.unwrap_err();
    assert!(
        e.contains("no pg_hba.conf entry for host \"127.0.0.1\", user \"stranger\", database \"app\", no encryption"),
        "{e}"
    );
    // The SQLSTATE of no line, as a driver sees it.
    let e = connect(&format!(
        "postgres://stranger:x@{}/app?sslmode=disable",
        proxy.local_addr()
    ))
    .await
    .unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("28000"), "{e}");
    // A reload reads the file again: trusty is now rejected, banned trusted.
    let swapped = HBA
        .replace(
            "trusty  127.0.0.1     255.255.255.255  trust",
            "trusty  127.0.0.1/32  reject",
        )
        .replace("banned  127.0.0.1/32  reject", "banned  127.0.0.1/32  trust");
    std::fs::write(dir.join("pg_hba.conf"), swapped).unwrap();
    proxy.reload(Config::validate(f, "test").expect("valid config"));
    let e = run("trusty", plain(), None).await.unwrap_err();
    assert!(e.contains("pg_hba.conf rejects connection"), "{e}");
    assert_eq!(run("banned", plain(), None).await.unwrap(), "banned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_type_md5_and_cert_apply_to_every_client_without_an_hba_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_pg, proxy, mut f) = setup(dir).await;
    let port = proxy.local_addr().port();
    let run = |user: &str, extra: String, pw: Option<&'static str>| {
        let conninfo = format!("user={user} {extra}");
        async move { psql(port, &conninfo, pw, dir).await }
    };
    let plain = || "sslmode=disable".to_string();
    (f.proxy.hba_file, f.proxy.ident_file) = (None, None);
    let no_password: Vec<_> = ["trusty", "mapped"]
        .iter()
        .map(|u| (*u, f.users.remove(*u).unwrap()))
        .collect();
    // md5 (PgBouncer's default): MD5 for users with an md5 verifier (made from the password
    // here), SCRAM for a user with only a SCRAM verifier, as in PostgreSQL.
    f.proxy.auth_type = AuthType::Md5;
    let mut scram_only = user(None, Some("app-secret"));
    scram_only.scram_verifier = Some(Secret(postgres_protocol::password::scram_sha_256(b"app-secret")));
    f.users.insert("app".into(), scram_only);
    proxy.reload(Config::validate(f.clone(), "test").expect("valid config"));
    assert_eq!(auth_request(&proxy, "legacy").await, 5, "MD5");
    assert_eq!(run("legacy", plain(), Some("legacy-secret")).await.unwrap(), "legacy");
    let e = run("legacy", plain(), Some("nope")).await.unwrap_err();
    assert!(e.contains("password authentication failed for user \"legacy\""), "{e}");
    assert_eq!(auth_request(&proxy, "app").await, 10, "SASL for a SCRAM-only user");
    assert_eq!(run("app", plain(), Some("app-secret")).await.unwrap(), "app");
    // cert: a certificate whose CN is the user, over TLS; nothing else.
    f.proxy.auth_type = AuthType::Cert;
    f.users.extend(no_password.into_iter().map(|(u, c)| (u.to_string(), c)));
    proxy.reload(Config::validate(f.clone(), "test").expect("valid config"));
    assert_eq!(run("app", cert(dir, "app"), None).await.unwrap(), "app");
    let e = run("app", plain(), Some("app-secret")).await.unwrap_err();
    assert!(e.contains("connection requires a valid client certificate"), "{e}");
    let e = run("mapped", cert(dir, "alice"), None).await.unwrap_err();
    assert!(
        e.contains("certificate authentication failed for user \"mapped\""),
        "{e}"
    );
    // cert needs the CA.
    f.tls.client_tls_ca_file = None;
    let e = Config::validate(f, "test").unwrap_err().to_string();
    assert!(e.contains("proxy.auth_type") && e.contains("client_tls_ca_file"), "{e}");
}

#[test]
fn a_bad_hba_file_is_refused_with_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let path: PathBuf = tmp.path().join("pg_hba.conf");
    std::fs::write(
        &path,
        "host all all 0.0.0.0/0 scram-sha-256\nhost all all 10.0.0.0/8 ldap\n",
    )
    .unwrap();
    let text = format!(
        "[proxy]\nhba_file = {:?}\n[databases.app]\nport = 5432\n[users.app]\npassword = \"x\"\n",
        path.display().to_string()
    );
    let e = Config::validate(pgvalve::config::parse_toml("t", &text).unwrap(), "t")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("proxy.hba_file") && e.contains("pg_hba.conf:2: method \"ldap\""),
        "{e}"
    );
    std::fs::write(&path, "hostssl all all 0.0.0.0/0 cert\n").unwrap();
    let e = Config::validate(pgvalve::config::parse_toml("t", &text).unwrap(), "t")
        .unwrap_err()
        .to_string();
    assert!(e.contains("client_tls_ca_file"), "{e}");
}
