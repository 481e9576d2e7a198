//! The PROXY protocol on the listener: a trusted load balancer's header (v1 or v2) gives the
//! client's real address to identities, per-identity limits and SHOW CLIENTS and the lock monitor; a header from
//! any other address, or none from a trusted one, is refused with a clean close.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use pgvalve::config::IdentityRule;
use pgvalve::protocol::proxy_header::{encode_v1, encode_v2};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::support::*;

/// A connection from `local` (an address of the loopback network) to the proxy, opened with
/// `header` (if any), then a PostgreSQL session as the application role.
async fn connect_via(s: &Setup, local: &str, header: Option<Vec<u8>>) -> Result<Client, tokio_postgres::Error> {
    connect_as_via(s, &s.url(), local, header).await
}

/// [`connect_via`] with the URL's user, password and database.
async fn connect_as_via(
    s: &Setup,
    url: &str,
    local: &str,
    header: Option<Vec<u8>>,
) -> Result<Client, tokio_postgres::Error> {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let mut stream = sock.connect(s.proxy.local_addr()).await.unwrap();
    if let Some(h) = header {
        stream.write_all(&h).await.unwrap();
    }
    let config = tokio_postgres::Config::from_str(url).unwrap();
    let (client, conn) = within(Duration::from_secs(30), config.connect_raw(stream, NoTls)).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// SHOW CLIENTS as (addr, port, identity) of the application database's clients.
async fn clients(admin: &Client) -> Vec<(String, String, String)> {
    let out = admin.simple_query("SHOW CLIENTS").await.unwrap();
    out.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) if r.get("database") == Some("app") => Some((
                r.get("addr").unwrap_or("").to_string(),
                r.get("port").unwrap_or("").to_string(),
                r.get("identity").unwrap_or("").to_string(),
            )),
            _ => None,
        })
        .collect()
}

fn at(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Whether the proxy closes `stream` without sending a byte.
async fn closed_silently(mut stream: TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        within(Duration::from_secs(10), stream.read(&mut buf)).await,
        Ok(0) | Err(_)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_balancers_header_names_the_client_everywhere() {
    let s = Setup::new(|f| {
        f.proxy.proxy_protocol_trusted = "127.0.0.1/32".parse().unwrap();
        f.admin.admin_users = vec!["app".into()];
        f.locks.poll_interval = Duration::from_millis(100);
        // Room for the lock monitor's connection beside the clients.
        f.pool.pool_size = 10;
        f.identity = vec![IdentityRule {
            name: "ext-{source}".into(),
            source: Some("203.0.113.0/24".into()),
            max_client_connections: Some(1),
            ..Default::default()
        }];
    })
    .await;
    let lb = "127.0.0.1";
    let dest = s.proxy.local_addr();
    // A real v2 header, then an ordinary session behind it.
    let a = connect_via(&s, lb, Some(encode_v2(at("203.0.113.7:40001"), dest)))
        .await
        .unwrap();
    let one: i32 = a.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    // v1 works the same; another client address is another identity under the rule's cap.
    let b = connect_via(&s, lb, Some(encode_v1(at("203.0.113.8:40002"), dest)))
        .await
        .unwrap();
    // A third client from 203.0.113.7 meets that address's cap (max_client_connections = 1).
    let e = connect_via(&s, lb, Some(encode_v2(at("203.0.113.7:40003"), dest)))
        .await
        .unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("53300"), "{e}");
    // The console (itself reached through the balancer, from 198.51.100.9) shows the
    // carried addresses, not the balancer's.
    let admin_url = s.url_as("app", "app-secret", "pgvalve");
    let header = encode_v2(at("198.51.100.9:5000"), dest);
    let admin = connect_as_via(&s, &admin_url, lb, Some(header)).await.unwrap();
    let mut seen = clients(&admin).await;
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("203.0.113.7".into(), "40001".into(), "ext-203.0.113.7".into()),
            ("203.0.113.8".into(), "40002".into(), "ext-203.0.113.8".into()),
        ]
    );
    // The lock monitor attributes a lock to the carried address too.
    a.batch_execute("CREATE TABLE orders (id int)").await.unwrap();
    a.batch_execute("BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    crate::support::eventually(Duration::from_secs(10), "SHOW LOCKS names 203.0.113.7", || async {
        let out = admin.simple_query("SHOW LOCKS").await.unwrap();
        out.iter().any(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                r.get("relation") == Some("orders")
                    && r.get("client_addr").is_some_and(|a| a.starts_with("203.0.113.7:40001"))
                    && r.get("identity") == Some("ext-203.0.113.7")
            }
            _ => false,
        })
    })
    .await;
    a.batch_execute("ROLLBACK").await.unwrap();
    drop((a, b));
    // A trusted address that sends no header is closed without a reply.
    let e = connect_via(&s, lb, None).await.unwrap_err();
    assert!(e.as_db_error().is_none(), "closed, not answered: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_from_an_untrusted_address_is_refused_with_a_clean_close() {
    let s = Setup::new(|f| {
        f.proxy.proxy_protocol_trusted = "127.0.0.1/32".parse().unwrap();
        f.admin.admin_users = vec!["app".into()];
    })
    .await;
    let dest = s.proxy.local_addr();
    for header in [
        encode_v2(at("203.0.113.7:40001"), dest),
        encode_v1(at("203.0.113.7:40001"), dest),
    ] {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(at("127.0.0.2:0")).unwrap();
        let mut stream = sock.connect(dest).await.unwrap();
        stream.write_all(&header).await.unwrap();
        assert!(closed_silently(stream).await, "a spoofed header is refused");
    }
    // The same address without a header is an ordinary client, known by its own address.
    let c = connect_via(&s, "127.0.0.2", None).await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    let admin_url = s.url_as("app", "app-secret", "pgvalve");
    let admin = connect_as_via(&s, &admin_url, "127.0.0.3", None).await.unwrap();
    let seen = clients(&admin).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].0, "127.0.0.2");
}
