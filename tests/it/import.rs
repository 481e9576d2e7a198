//! `pgvalve import`: realistic pgbouncer.ini files written here (wildcard database, per-user
//! pool sizes and caps, TLS, auth_query) turned into pgvalve configurations by the real
//! binary; each result passes `pgvalve check`, every line of the ini is accounted for, and
//! one result serves clients in front of a real PostgreSQL. Malformed files are refused
//! naming the line.

use std::path::{Path, PathBuf};
use std::process::Command;

use pgvalve::config::{self, Config, ServerTlsMode};
use pgvalve::testkit::{HostAuth, PgOptions, TestPostgres};
use pgvalve::ProxyHandle;

use crate::support::{code, connect};

const BIN: &str = env!("CARGO_BIN_EXE_pgvalve");

/// A SCRAM verifier for a password, as PostgreSQL and `pgvalve passwd` write it.
fn verifier(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

struct Imported {
    toml: String,
    stderr: String,
    path: PathBuf,
}

/// Writes the files into `dir`, runs `pgvalve import`, writes its output to pgvalve.toml
/// and runs `pgvalve check` on it.
fn import(dir: &Path, ini: &str, userlist: Option<&str>) -> Imported {
    std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("import").arg(dir.join("pgbouncer.ini"));
    if let Some(u) = userlist {
        std::fs::write(dir.join("userlist.txt"), u).unwrap();
        cmd.arg("--userlist").arg(dir.join("userlist.txt"));
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let toml = String::from_utf8(out.stdout).unwrap();
    assert!(!stderr.contains("does not pass"), "{stderr}");
    let path = dir.join("pgvalve.toml");
    std::fs::write(&path, &toml).unwrap();
    let check = Command::new(BIN).args(["check", "-c"]).arg(&path).output().unwrap();
    assert!(
        check.status.success(),
        "pgvalve check: {}\n{toml}",
        String::from_utf8_lossy(&check.stderr)
    );
    Imported { toml, stderr, path }
}

/// Every setting line of the ini is named in the output (mapped with its line, or noted).
fn every_line_accounted_for(ini: &str, out: &Imported) {
    for (i, line) in ini.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with(';') || l.starts_with('#') || l.starts_with('[') {
            continue;
        }
        let tag = format!("pgbouncer.ini:{})", i + 1);
        let note = format!("pgbouncer.ini:{}:", i + 1);
        assert!(
            out.toml.contains(&tag) || out.toml.contains(&note),
            "line {} ({l}) is not in the output:\n{}",
            i + 1,
            out.toml
        );
    }
}

const PRODUCTION: &str = r#";; PgBouncer in front of the main cluster
[databases]
app = host=10.0.0.5 port=5432 dbname=app_production pool_size=40
reports = host=10.0.0.6 dbname=reports pool_mode=session max_db_connections=10
"legacy-db" = host=/var/run/postgresql dbname=legacy connect_query='SET search_path = legacy'
* = host=10.0.0.5 port=5432

[users]
celery = pool_mode=transaction pool_size=10 max_user_connections=15
app = pool_size=30

[pgbouncer]
listen_addr = *
listen_port = 6432
auth_type = scram-sha-256
auth_file = userlist.txt
pool_mode = transaction
max_client_conn = 2000
default_pool_size = 25
reserve_pool_size = 5
reserve_pool_timeout = 3
server_idle_timeout = 300
server_lifetime = 1800
query_wait_timeout = 60
idle_transaction_timeout = 30
server_reset_query = DISCARD ALL
max_prepared_statements = 100
logfile = /var/log/pgbouncer/pgbouncer.log
pidfile = /var/run/pgbouncer/pgbouncer.pid
admin_users = admin
stats_users = stats, monitoring
ignore_startup_parameters = extra_float_digits
tcp_keepalive = 1
"#;

#[test]
fn import_maps_wildcard_databases_per_user_pools_and_caps_and_keeps_verifiers() {
    let dir = tempfile::tempdir().unwrap();
    let celery = verifier("celery-secret");
    let users = format!("\"app\" \"app-secret\"\n\"celery\" \"{celery}\"\n\"admin\" \"md5ab5e1f4e0c0d4e7a1e4b4d4f1c0a9b8c\"\n\"stats\" \"stats-pw\"\n");
    // auth_file is read when --userlist is not given.
    std::fs::write(dir.path().join("userlist.txt"), &users).unwrap();
    let out = import(dir.path(), PRODUCTION, None);
    every_line_accounted_for(PRODUCTION, &out);
    let c = config::load(&out.path).unwrap();
    assert_eq!(c.listen.to_string(), "0.0.0.0:6432");
    assert_eq!((c.proxy.max_client_connections, c.pool.pool_size), (2000, 25));
    assert_eq!(c.pool.pool_mode, config::PoolMode::Transaction);
    assert_eq!(c.pool.server_idle_timeout.as_secs(), 300);
    assert_eq!(c.pool.server_lifetime.as_secs(), 1800);
    assert_eq!(c.pool.query_wait_timeout.as_secs(), 60);
    assert_eq!(c.pool.idle_transaction_timeout.as_secs(), 30);
    assert_eq!(c.pool.max_prepared_statements, 100);
    // Databases: the wildcard routes any name; connection strings, pool sizes and modes.
    let app = c.route("app", "stats").unwrap();
    assert_eq!(
        (app.host.as_str(), app.server_dbname.as_str(), app.pool_size),
        ("10.0.0.5", "app_production", 40)
    );
    // A user's pool_size goes before the database's, in PgBouncer as in pgvalve.
    assert_eq!(c.route("app", "app").unwrap().pool_size, 30);
    let other = c.route("anything", "celery").unwrap();
    assert_eq!(
        (other.host.as_str(), other.server_dbname.as_str(), other.pool_size),
        ("10.0.0.5", "anything", 10)
    );
    assert_eq!(c.route("reports", "app").unwrap().pool_mode, config::PoolMode::Session);
    assert_eq!(c.route("legacy-db", "app").unwrap().host, "/var/run/postgresql");
    // Users: the password as it was, the SCRAM verifier as a verifier.
    assert_eq!(c.users["celery"].client_verifier, Some(celery.parse().unwrap()));
    assert!(out.toml.contains(&celery));
    assert!(c.users["app"].server_password.is_some());
    assert!(!c.users.contains_key("admin"));
    assert_eq!(c.admin.stats_users, ["stats"]);
    // Caps: per user and per database, as identity rules.
    let f = config::parse_toml("imported", &out.toml).unwrap();
    let rules: Vec<_> = f
        .identity
        .iter()
        .map(|r| (r.name.clone(), r.max_server_connections))
        .collect();
    assert_eq!(
        rules,
        [
            ("user:celery".to_string(), Some(15)),
            ("db:reports".to_string(), Some(10))
        ]
    );
    // What is not mapped is said, with the reason, in the output and on stderr.
    for s in [
        "reserve_pool_size = 5",
        "connect_query",
        "logfile",
        "tcp_keepalive",
        "user admin (an md5 hash)",
        "monitoring",
    ] {
        assert!(out.stderr.contains(s), "{s} on stderr:\n{}", out.stderr);
        assert!(out.toml.contains(s), "{s} in the output");
    }
}

/// A self-signed certificate for localhost and its key, written into `dir`.
fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (crt, pem) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&pem, key.serialize_pem()).unwrap();
    (crt, pem)
}

#[test]
fn import_maps_tls_on_both_legs() {
    let dir = tempfile::tempdir().unwrap();
    let (crt, pem) = certificate(dir.path());
    std::fs::copy(&crt, dir.path().join("root.crt")).unwrap();
    let ini = format!(
        "[databases]\napp = host=db.internal port=5432\n\n[pgbouncer]\nlisten_addr = 127.0.0.1, 10.1.2.3\nclient_tls_sslmode = require\nclient_tls_cert_file = {}\nclient_tls_key_file = {}\nclient_tls_protocols = secure\nserver_tls_sslmode = verify-full\nserver_tls_ca_file = {}\nserver_tls_protocols = tlsv1.3\n",
        crt.display(),
        pem.display(),
        dir.path().join("root.crt").display()
    );
    let out = import(dir.path(), &ini, Some("\"app\" \"pw\"\n"));
    every_line_accounted_for(&ini, &out);
    let c = config::load(&out.path).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:6432");
    assert_eq!(c.tls_settings.client_tls_mode, Some(config::ClientTlsMode::Require));
    assert_eq!(c.tls_settings.client_tls_cert_file.as_deref(), Some(crt.as_path()));
    assert_eq!(c.tls_settings.server_tls_mode, Some(ServerTlsMode::VerifyFull));
    assert!(
        out.stderr.contains("10.1.2.3") && out.stderr.contains("client_tls_protocols"),
        "{}",
        out.stderr
    );

    // A certificate without client_tls_sslmode: PgBouncer's default is no TLS, and so it stays.
    let ini = format!(
        "[databases]\napp = host=db\n[pgbouncer]\nclient_tls_cert_file = {}\nclient_tls_key_file = {}\n",
        crt.display(),
        pem.display()
    );
    let c = config::load(&import(dir.path(), &ini, Some("\"app\" \"pw\"\n")).path).unwrap();
    assert_eq!(c.tls_settings.client_tls_mode, Some(config::ClientTlsMode::Disable));
}

#[test]
fn import_maps_md5_hba_and_cert_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let md5 = postgres_protocol::password::md5(b"legacy-pw", "legacy");
    let users = format!("\"legacy\" \"{md5}\"\n\"app\" \"{}\"\n", verifier("app-pw"));
    // md5: the hashes stay md5 verifiers, SCRAM verifiers stay verifiers.
    let ini = "[databases]\napp = host=db\n[pgbouncer]\nauth_type = md5\n";
    let out = import(dir.path(), ini, Some(&users));
    every_line_accounted_for(ini, &out);
    let c = config::load(&out.path).unwrap();
    assert_eq!(c.proxy.auth_type, config::AuthType::Md5);
    assert_eq!(
        c.users["legacy"].md5_verifier.as_ref().map(|s| s.0.as_str()),
        Some(md5.as_str())
    );
    assert!(c.users["app"].client_verifier.is_some());
    assert!(
        out.stderr.contains("md5 hash only: legacy") && out.stderr.contains("server_password"),
        "{}",
        out.stderr
    );
    // hba: auth_hba_file (relative to the ini) and auth_ident_file become hba_file and ident_file.
    std::fs::write(
        dir.path().join("hba.conf"),
        "host all legacy 10.0.0.0/8 md5\nhost all all 0.0.0.0/0 scram-sha-256\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("ident.conf"), "laptops alice-laptop app\n").unwrap();
    let ini = "[databases]\napp = host=db\n[pgbouncer]\nauth_type = hba\nauth_hba_file = hba.conf\nauth_ident_file = ident.conf\n";
    let out = import(dir.path(), ini, Some(&users));
    every_line_accounted_for(ini, &out);
    let c = config::load(&out.path).unwrap();
    assert!(c.hba.is_some(), "{}", out.toml);
    assert!(
        out.toml
            .contains(&format!("hba_file = \"{}\"", dir.path().join("hba.conf").display())),
        "{}",
        out.toml
    );
    assert!(c.users["legacy"].md5_verifier.is_some());
    // An hba file pgvalve cannot honour: md5 for everyone, and the line that stopped it named.
    std::fs::write(
        dir.path().join("hba.conf"),
        "host all all 0.0.0.0/0 md5\nhost all all 10.0.0.0/8 ldap\n",
    )
    .unwrap();
    let out = import(dir.path(), ini, Some(&users));
    every_line_accounted_for(ini, &out);
    assert!(
        out.stderr.contains("hba.conf:2: method \"ldap\"") && out.stderr.contains("md5 is used for every client"),
        "{}",
        out.stderr
    );
    assert!(!out.toml.contains("hba_file ="), "{}", out.toml);
    // cert: with the CA that signs client certificates.
    let (crt, pem) = certificate(dir.path());
    let ini = format!(
        "[databases]\napp = host=db\n[pgbouncer]\nauth_type = cert\nclient_tls_sslmode = verify-full\nclient_tls_cert_file = {0}\nclient_tls_key_file = {1}\nclient_tls_ca_file = {0}\n",
        crt.display(),
        pem.display()
    );
    let out = import(dir.path(), &ini, Some(&users));
    every_line_accounted_for(&ini, &out);
    let c = config::load(&out.path).unwrap();
    assert_eq!(c.proxy.auth_type, config::AuthType::Cert);
    assert_eq!(c.tls_settings.client_tls_ca_file.as_deref(), Some(crt.as_path()));
}

#[test]
fn import_maps_auth_query_with_its_user_and_database() {
    let dir = tempfile::tempdir().unwrap();
    let ini = r#"[databases]
postgres = host=127.0.0.1 port=5432
* = host=127.0.0.1 port=5432 auth_user=pgbouncer

[pgbouncer]
listen_addr = 0.0.0.0
auth_type = scram-sha-256
auth_query = SELECT usename, passwd FROM pgbouncer.user_lookup($1)
auth_dbname = postgres
max_user_connections = 8
max_db_client_connections = 100
"#;
    let out = import(dir.path(), ini, Some("\"pgbouncer\" \"lookup-pw\"\n"));
    every_line_accounted_for(ini, &out);
    let c = config::load(&out.path).unwrap();
    assert_eq!(c.proxy.auth_user.as_deref(), Some("pgbouncer"));
    assert_eq!(
        c.proxy.auth_query,
        "SELECT usename, passwd FROM pgbouncer.user_lookup($1)"
    );
    assert_eq!(c.proxy.auth_dbname.as_deref(), Some("postgres"));
    let f = config::parse_toml("imported", &out.toml).unwrap();
    let rules: Vec<_> = f
        .identity
        .iter()
        .map(|r| (r.name.clone(), r.max_server_connections, r.max_client_connections))
        .collect();
    assert_eq!(
        rules,
        [
            ("user:{user}".to_string(), Some(8), None),
            ("db:{database}".to_string(), None, Some(100))
        ]
    );
    assert!(out.stderr.contains("never both"), "{}", out.stderr);

    // A user's own cap replaces the global one only where it sets one: the rule that names
    // the user keeps the global max_user_connections.
    let with_user = ini.replace(
        "[pgbouncer]",
        "[users]\nreporting = max_user_client_connections=50\n\n[pgbouncer]",
    );
    let out = import(
        dir.path(),
        &with_user,
        Some("\"pgbouncer\" \"lookup-pw\"\n\"reporting\" \"r\"\n"),
    );
    let f = config::parse_toml("imported", &out.toml).unwrap();
    let r = &f.identity[0];
    assert_eq!(
        (
            r.name.as_str(),
            r.user.as_deref(),
            r.max_server_connections,
            r.max_client_connections
        ),
        ("user:reporting", Some("reporting"), Some(8), Some(50))
    );

    // An auth_user without a password in userlist.txt cannot run the look-up: it is said.
    let out = import(dir.path(), ini, Some(&format!("\"pgbouncer\" \"{}\"\n", verifier("x"))));
    assert!(out.stderr.contains("auth_user = pgbouncer"), "{}", out.stderr);
    assert_eq!(config::load(&out.path).unwrap().proxy.auth_user, None);
}

#[test]
fn import_refuses_malformed_files_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        (
            "[databases]\napp = host=a\n[pgbouncer]\nlisten_port 6432\n",
            "pgbouncer.ini:4:",
            "key = value",
        ),
        (
            "[databases]\napp = host=a\n[pgbouncr]\n",
            "pgbouncer.ini:3:",
            "unknown section",
        ),
        (
            "listen_port = 6432\n[databases]\n",
            "pgbouncer.ini:1:",
            "before any section",
        ),
        (
            "[databases]\napp = host=a\n\n[pgbouncer]\ndefault_pool_size = twenty\n",
            "pgbouncer.ini:5:",
            "default_pool_size",
        ),
        (
            "[databases]\napp = host=a password='open\n",
            "pgbouncer.ini:2:",
            "not closed",
        ),
        ("[databases]\napp = host=a port=99999\n", "pgbouncer.ini:2:", "port"),
        (
            "[databases]\napp = host=a\n[pgbouncer]\npool_mode = sometimes\n",
            "pgbouncer.ini:4:",
            "pool_mode",
        ),
        (
            "[databases]\napp = host=a\n[pgbouncer]\nquery_timeout = soon\n",
            "pgbouncer.ini:4:",
            "query_timeout",
        ),
        ("[databases\napp = host=a\n", "pgbouncer.ini:1:", "closing"),
    ];
    for (ini, at, what) in cases {
        std::fs::write(dir.path().join("pgbouncer.ini"), ini).unwrap();
        std::fs::write(dir.path().join("userlist.txt"), "\"app\" \"pw\"\n").unwrap();
        let out = Command::new(BIN)
            .arg("import")
            .arg(dir.path().join("pgbouncer.ini"))
            .arg("--userlist")
            .arg(dir.path().join("userlist.txt"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(65), "{ini}: {err}");
        assert!(
            err.contains(at) && err.contains(what),
            "{ini}: wanted {at} {what}, got {err}"
        );
        assert!(out.stdout.is_empty());
    }
    // userlist.txt lines too.
    std::fs::write(dir.path().join("pgbouncer.ini"), "[databases]\napp = host=a\n").unwrap();
    for (list, at) in [
        ("\"app\" \"pw\"\napp pw\n", "userlist.txt:2:"),
        ("\"app\" \"SCRAM-SHA-256$4096:bad\"\n", "userlist.txt:1:"),
    ] {
        std::fs::write(dir.path().join("userlist.txt"), list).unwrap();
        let out = Command::new(BIN)
            .arg("import")
            .arg(dir.path().join("pgbouncer.ini"))
            .arg("--userlist")
            .arg(dir.path().join("userlist.txt"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(65), "{err}");
        assert!(err.contains(at), "{err}");
    }
}

/// The imported configuration serves: a client logs in against the imported SCRAM verifier
/// through the wildcard database, a wrong password is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_configuration_serves_clients() {
    let pg = TestPostgres::start(PgOptions {
        host_auth: HostAuth::Trust,
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ini = format!(
        "[databases]\n* = host=127.0.0.1 port={}\n\n[users]\napp = pool_size=3\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\npool_mode = transaction\nauth_type = scram-sha-256\nmax_user_connections = 2\n",
        pg.port()
    );
    let out = import(
        dir.path(),
        &ini,
        Some(&format!("\"app\" \"{}\"\n", verifier("client-pw"))),
    );
    let mut f = config::parse_toml("imported", &out.toml).unwrap();
    f.proxy.listen = "127.0.0.1:0".into();
    let proxy = ProxyHandle::start(Config::validate(f, "imported").unwrap())
        .await
        .unwrap();
    let url = |pw: &str| format!("postgres://app:{pw}@{}/app", proxy.local_addr());
    let c = connect(&url("client-pw")).await.unwrap();
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let e = connect(&url("wrong")).await.unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("28P01"), "{e}");
    drop(c);
    proxy.shutdown().await;
}
