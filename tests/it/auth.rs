//! Authentication to clients and to servers, routing errors, protocol negotiation.

use std::time::Duration;

use pgvalve::testkit::{HostAuth, PgOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_login_and_refusals() {
    let s = Setup::new(|_| {}).await;
    let c = s.client().await;
    let user: String = c.query_one("SELECT current_user", &[]).await.unwrap().get(0);
    assert_eq!(user, "app");

    let e = connect(&s.url_as("app", "wrong", "app")).await.unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("28P01"), "{e}");
    // An unknown user gets the same answer as a wrong password.
    let e = connect(&s.url_as("nobody", "x", "app")).await.unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("28P01"), "{e}");
    let e = connect(&s.url_as("app", "app-secret", "nosuchdb")).await.unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("3D000"), "{e}");
    assert!(e.as_db_error().unwrap().message().contains("nosuchdb"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_leg_md5() {
    let s = Setup::with(
        PgOptions {
            host_auth: HostAuth::Md5,
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let c = s.client().await;
    let v: i32 = c.query_one("SELECT 41 + 1", &[]).await.unwrap().get(0);
    assert_eq!(v, 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_leg_trust_and_client_trust() {
    let s = Setup::with(
        PgOptions {
            host_auth: HostAuth::Trust,
            ..Default::default()
        },
        |f| {
            f.proxy.auth_type = pgvalve::config::AuthType::Trust;
        },
    )
    .await;
    let c = connect(&format!("postgres://app@{}/app", s.proxy.local_addr()))
        .await
        .unwrap();
    let v: i32 = c.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);
    let e = connect(&format!("postgres://stranger@{}/app", s.proxy.local_addr()))
        .await
        .unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("28000"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refusal_is_forwarded() {
    // The proxy accepts the client but PostgreSQL refuses the login (wrong server password).
    let s = Setup::new(|f| {
        let u = f.users.get_mut("app").unwrap();
        u.server_password = Some(pgvalve::config::Secret("not-the-password".into()));
    })
    .await;
    let e = connect(&s.url()).await.unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("28P01"), "{e}");
}

fn startup_packet(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&3u16.to_be_bytes());
    body.extend_from_slice(&minor.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// A client asking for a newer protocol (3.2, as libpq 18 with `max_protocol_version=latest`
/// does, or 3.99) with `_pq_` options gets what PostgreSQL 18 answers: NegotiateProtocolVersion
/// naming the full version it speaks with that client (3.2 = 196610 for both; libpq 18 reads a
/// bare 0 as a downgrade below 3.0 and gives up) and the options it does not know, then the
/// login goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiate_protocol_version_for_newer_clients() {
    let s = Setup::new(|_| {}).await;
    for (minor, options) in [
        (2u16, vec![("_pq_.grease", "1")]),
        (99, vec![("_pq_.grease", "1"), ("_pq_.unknown_option", "x")]),
    ] {
        let mut sock = tokio::net::TcpStream::connect(s.proxy.local_addr()).await.unwrap();
        let mut params = vec![("user", "app"), ("database", "app")];
        params.extend(options.iter().copied());
        sock.write_all(&startup_packet(minor, &params)).await.unwrap();
        let got = read_messages(&mut sock, 2).await;
        assert_eq!(
            got[0][0], b'v',
            "3.{minor}: expected NegotiateProtocolVersion, got {got:?}"
        );
        let body = &got[0][5..];
        assert_eq!(&body[..4], &196_610i32.to_be_bytes(), "3.{minor}: the full version 3.2");
        assert_eq!(
            &body[4..8],
            &(options.len() as i32).to_be_bytes(),
            "3.{minor}: options named"
        );
        let mut names = body[8..].split(|b| *b == 0).filter(|n| !n.is_empty());
        for (name, _) in &options {
            assert_eq!(names.next(), Some(name.as_bytes()), "3.{minor}");
        }
        assert_eq!(
            got[1][0], b'R',
            "3.{minor}: the login goes on with an authentication request"
        );
    }
}

/// Reads `n` whole messages (tag, length, body) from `sock`.
async fn read_messages(sock: &mut tokio::net::TcpStream, n: usize) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; 512];
    let mut got = Vec::new();
    let mut out = Vec::new();
    while out.len() < n {
        if got.len() >= 5 {
            let len = 1 + i32::from_be_bytes([got[1], got[2], got[3], got[4]]) as usize;
            if got.len() >= len {
                out.push(got.drain(..len).collect());
                continue;
            }
        }
        let r = within(Duration::from_secs(5), sock.read(&mut buf)).await.unwrap();
        assert!(r > 0, "closed early after {out:?}");
        got.extend_from_slice(&buf[..r]);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_leg_over_unix_socket() {
    let s = Setup::new(|_| {}).await;
    // A second proxy that reaches the same server through its socket directory.
    let mut f = s.pg.file_config();
    let db = f.databases.get_mut("app").unwrap();
    db.host = s.pg.socket_dir().display().to_string();
    let proxy = pgvalve::ProxyHandle::start(pgvalve::Config::validate(f, "test").unwrap())
        .await
        .unwrap();
    let c = connect(&format!("postgres://app:app-secret@{}/app", proxy.local_addr()))
        .await
        .unwrap();
    let row = c.query_one("SELECT inet_client_addr() IS NULL", &[]).await.unwrap();
    assert!(
        row.get::<_, bool>(0),
        "the server connection should be a Unix-socket connection"
    );
    // Cancel goes over the socket too.
    let token = c.cancel_token();
    let running = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(10)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = within(Duration::from_secs(5), running).await.unwrap().unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("57014"));
    proxy.shutdown_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reaches_only_what_the_config_routes() {
    // PostgreSQL has more than pgvalve routes: a database "secret" that the application role
    // may open directly, and a role "intruder" with a password.
    let s = Setup::new(|_| {}).await;
    let su = s.pg.superuser().await.unwrap();
    su.batch_execute("CREATE DATABASE secret").await.unwrap();
    su.batch_execute("CREATE ROLE intruder LOGIN SUPERUSER PASSWORD 'intruder-pw'")
        .await
        .unwrap();
    let direct = format!("postgres://app:app-secret@127.0.0.1:{}/secret", s.pg.port());
    assert!(connect(&direct).await.is_ok(), "directly, app may open secret");

    let refused = |url: String, want: &'static str| async move {
        let e = connect(&url).await.expect_err(&url);
        assert_eq!(code(&e).as_deref(), Some(want), "{url}: {e:?}");
    };
    // A database the config does not route, even one the role could open directly.
    refused(s.url_as("app", "app-secret", "secret"), "3D000").await;
    // A role PostgreSQL knows but the config does not: refused like a wrong password.
    refused(s.url_as("intruder", "intruder-pw", "app"), "28P01").await;
    refused(s.url_as("intruder", "intruder-pw", "secret"), "28P01").await;
    refused(s.url_as("APP", "app-secret", "app"), "28P01").await;
    // The console is for admin_users and stats_users only.
    refused(s.url_as("app", "app-secret", "pgvalve"), "42501").await;
    // Startup options cannot change who pgvalve logs in as.
    let c = connect(&format!("{}?options=-c%20session_authorization%3Dintruder", s.url())).await;
    if let Ok(c) = c {
        let user: String = c.query_one("SELECT session_user::text", &[]).await.unwrap().get(0);
        assert_eq!(user, "app");
    }
    // Replication connections are not proxied.
    let mut sock = tokio::net::TcpStream::connect(s.proxy.local_addr()).await.unwrap();
    let body = b"\x00\x03\x00\x00user\x00app\x00database\x00app\x00replication\x00database\x00\x00";
    let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(body);
    sock.write_all(&p).await.unwrap();
    let mut got = Vec::new();
    within(Duration::from_secs(5), sock.read_to_end(&mut got))
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&got).contains("0A000"), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_users_log_in_with_their_postgres_password() {
    use std::sync::atomic::Ordering;
    let s = Setup::new(|f| {
        f.proxy.auth_user = Some("pgvalve_auth".into());
        f.proxy.auth_cache_ttl = Duration::from_secs(1);
        f.users.insert(
            "pgvalve_auth".into(),
            pgvalve::config::UserConfig {
                password: Some(pgvalve::config::Secret("auth-pw".into())),
                ..Default::default()
            },
        );
    })
    .await;
    let su = s.pg.superuser().await.unwrap();
    su.batch_execute(
        "CREATE ROLE pgvalve_auth LOGIN SUPERUSER PASSWORD 'auth-pw';
         CREATE ROLE carol LOGIN PASSWORD 'carol-pw';
         CREATE ROLE dave LOGIN PASSWORD 'dave-pw' VALID UNTIL '2000-01-01';
         SET password_encryption = 'md5'; CREATE ROLE erin LOGIN PASSWORD 'erin-pw'; RESET password_encryption;",
    )
    .await
    .unwrap();
    let lookups = || s.proxy.shared().auth.lookups.load(Ordering::Relaxed);

    // carol is not in [users]: her PostgreSQL verifier admits her, and the server leg logs in
    // as carol with the key her own proof revealed.
    let c = connect(&s.url_as("carol", "carol-pw", "app")).await.unwrap();
    let who: String = c.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(who, "carol");
    let after_first = lookups();
    assert_eq!(after_first, 1);
    // Cached: a second login asks PostgreSQL nothing.
    connect(&s.url_as("carol", "carol-pw", "app")).await.unwrap();
    assert_eq!(lookups(), after_first);
    // Wrong password, an expired role, an MD5 password, an unknown role: all 28P01.
    for (user, pw) in [
        ("carol", "wrong"),
        ("dave", "dave-pw"),
        ("erin", "erin-pw"),
        ("nobody", "x"),
    ] {
        let e = connect(&s.url_as(user, pw, "app")).await.unwrap_err();
        assert_eq!(code(&e).as_deref(), Some("28P01"), "{user}: {e:?}");
    }
    // A changed password applies once the cache entry is older than auth_cache_ttl.
    su.batch_execute("ALTER ROLE carol PASSWORD 'carol-new'").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Three at once: new server connections log in with the keys of the new password.
    let mut held = Vec::new();
    for _ in 0..3 {
        let c = connect(&s.url_as("carol", "carol-new", "app")).await.unwrap();
        let who: String = c.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
        assert_eq!(who, "carol");
        held.push(c);
    }
    let n: i64 = su
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE usename = 'carol'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n >= 3, "{n} server connections as carol");
    assert!(connect(&s.url_as("carol", "carol-pw", "app")).await.is_err());

    // Guessing names from one address: after auth_failure_limit x 4 failures in a minute the
    // address is refused without lookups.
    let before = lookups();
    for i in 0..30 {
        let e = connect(&s.url_as(&format!("guess{i}"), "x", "app")).await.unwrap_err();
        assert_eq!(code(&e).as_deref(), Some("28P01"), "{e:?}");
    }
    assert!(
        lookups() - before <= 20,
        "{} lookups for 30 guesses",
        lookups() - before
    );
    // Users listed in [users] are not affected.
    s.client().await;
}
