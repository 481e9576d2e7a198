//! Shared prepared statements in transaction mode against schema changes: every scenario
//! runs through pgvalve (all clients on one server connection, where the old statement is)
//! and directly against PostgreSQL, and what the clients see must be the same. Also: shared
//! statements no client uses any more are closed on the server.

use std::time::Duration;

use pgvalve::config::{AuthType, PoolMode};
use pgvalve::testkit::{HostAuth, PgOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::*;

/// Transaction mode on one server connection (every client meets the statements the others
/// left there); `trust`: clients log in without a password (raw sockets).
async fn one_connection(trust: bool) -> Setup {
    let opts = PgOptions {
        host_auth: HostAuth::Trust,
        ..PgOptions::default()
    };
    Setup::with(opts, |f| {
        f.pool.pool_mode = PoolMode::Transaction;
        f.pool.pool_size = 1;
        f.pool.query_wait_timeout = Duration::from_secs(30);
        if trust {
            f.proxy.auth_type = AuthType::Trust;
        }
    })
    .await
}

/// "ok" with the value, or the SQLSTATE.
fn outcome<T: std::fmt::Debug>(r: Result<T, tokio_postgres::Error>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(e) => format!("error {}", code(&e).unwrap_or_else(|| e.to_string())),
    }
}

fn column_types(s: &tokio_postgres::Statement) -> Vec<Type> {
    s.columns().iter().map(|c| c.type_().clone()).collect()
}

/// A table's column type changes under an INSERT's parameter (the table is dropped and made
/// again with `v text`): new Parses of the same text, from another client and under a new
/// name on the first, are described with a text parameter and store '007' as it is; the
/// statement prepared before keeps its int parameter, as in PostgreSQL.
async fn parameter_type_change(url: &str, ddl: &Client) -> Vec<String> {
    ddl.batch_execute("DROP TABLE IF EXISTS pt; CREATE TABLE pt (v int)")
        .await
        .unwrap();
    let sql = "insert into pt values ($1)";
    let a = connect(url).await.unwrap();
    let old = a.prepare(sql).await.unwrap();
    let mut seen = vec![format!("a: {:?}", old.params())];
    seen.push(outcome(a.execute(&old, &[&7i32]).await));
    ddl.batch_execute("DROP TABLE pt; CREATE TABLE pt (v text)")
        .await
        .unwrap();
    let b = connect(url).await.unwrap();
    let fresh = b.prepare(sql).await.unwrap();
    seen.push(format!("b: {:?}", fresh.params()));
    seen.push(outcome(b.execute(&fresh, &[&"007"]).await));
    let again = a.prepare(sql).await.unwrap();
    seen.push(format!("a, new name: {:?}", again.params()));
    seen.push(outcome(a.execute(&again, &[&"0070"]).await));
    seen.push(format!("a, old: {}", outcome(a.execute(&old, &[&7i32]).await)));
    seen.push(format!("b again: {}", outcome(b.execute(&fresh, &[&"07"]).await)));
    let rows = ddl.query("SELECT v FROM pt ORDER BY v", &[]).await.unwrap();
    let rows: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    seen.push(format!("rows {rows:?}"));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_parse_after_a_parameter_type_change_gets_the_new_type() {
    let s = one_connection(false).await;
    let ddl = connect(&s.pg.url()).await.unwrap();
    let direct = parameter_type_change(&s.pg.url(), &ddl).await;
    let proxied = parameter_type_change(&s.url(), &ddl).await;
    assert_eq!(proxied, direct, "through pgvalve as directly");
    assert_eq!(
        proxied,
        [
            "a: [Int4]",
            "ok 1",
            "b: [Text]",
            "ok 1",
            "a, new name: [Text]",
            "ok 1",
            // Prepared before: still takes an int (PostgreSQL keeps a statement's parameter
            // types), which the text column takes by assignment.
            "a, old: ok 1",
            "b again: ok 1",
            "rows [\"007\", \"0070\", \"07\", \"7\"]",
        ]
    );
}

/// A table's column changes type under `SELECT *`, then back: new clients (and new names)
/// get the current columns and no error; the statement prepared before fails with 0A000 as
/// PostgreSQL says, and works again once the column is back.
async fn result_type_change(url: &str, ddl: &Client) -> Vec<String> {
    ddl.batch_execute("DROP TABLE IF EXISTS rt; CREATE TABLE rt (v int); INSERT INTO rt VALUES (1)")
        .await
        .unwrap();
    let sql = "select * from rt";
    let a = connect(url).await.unwrap();
    let old = a.prepare(sql).await.unwrap();
    let mut seen = vec![format!("a: {:?}", column_types(&old))];
    seen.push(outcome(a.query(&old, &[]).await.map(|r| r.len())));
    ddl.batch_execute("ALTER TABLE rt ALTER COLUMN v TYPE text")
        .await
        .unwrap();
    for who in ["b", "c"] {
        let c = connect(url).await.unwrap();
        let fresh = c.prepare(sql).await.unwrap();
        seen.push(format!("{who}: {:?}", column_types(&fresh)));
        let v = c.query_one(&fresh, &[]).await.map(|r| r.get::<_, String>(0));
        seen.push(outcome(v));
        if who == "b" {
            // As often as it is tried (pgvalve does not serve it planned for other columns).
            for _ in 0..2 {
                let r = a.query(&old, &[]).await.map(|r| r.len());
                seen.push(format!("a, old: {}", outcome(r)));
            }
        }
    }
    let again = a.prepare(sql).await.unwrap();
    seen.push(format!("a, new name: {:?}", column_types(&again)));
    seen.push(outcome(a.query_one(&again, &[]).await.map(|r| r.get::<_, String>(0))));
    ddl.batch_execute("ALTER TABLE rt ALTER COLUMN v TYPE int USING v::int")
        .await
        .unwrap();
    let d = connect(url).await.unwrap();
    let back = d.prepare(sql).await.unwrap();
    seen.push(format!("d: {:?}", column_types(&back)));
    seen.push(outcome(d.query_one(&back, &[]).await.map(|r| r.get::<_, i32>(0))));
    seen.push(format!(
        "a, old: {}",
        outcome(a.query(&old, &[]).await.map(|r| r.len()))
    ));
    seen.push(format!(
        "a, new name: {}",
        outcome(a.query(&again, &[]).await.map(|r| r.len()))
    ));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_parse_after_a_result_type_change_gets_the_new_columns() {
    let s = one_connection(false).await;
    let ddl = connect(&s.pg.url()).await.unwrap();
    let direct = result_type_change(&s.pg.url(), &ddl).await;
    let proxied = result_type_change(&s.url(), &ddl).await;
    assert_eq!(proxied, direct, "through pgvalve as directly");
    assert_eq!(
        proxied,
        [
            "a: [Int4]",
            "ok 1",
            "b: [Text]",
            "ok \"1\"",
            "a, old: error 0A000",
            "a, old: error 0A000",
            "c: [Text]",
            "ok \"1\"",
            "a, new name: [Text]",
            "ok \"1\"",
            "d: [Int4]",
            "ok 1",
            "a, old: ok 1",
            "a, new name: error 0A000",
        ]
    );
}

/// The statement prepared before a result type change, used on a server connection that has
/// no copy of it yet: still 0A000 (never rows of other columns than its client was told).
async fn old_statement_on_another_connection(url: &str, ddl: &Client) -> Vec<String> {
    ddl.batch_execute("DROP TABLE IF EXISTS oc; CREATE TABLE oc (v int); INSERT INTO oc VALUES (1)")
        .await
        .unwrap();
    let a = connect(url).await.unwrap();
    let old = a.prepare("select * from oc").await.unwrap();
    let mut seen = vec![outcome(a.query(&old, &[]).await.map(|r| r.len()))];
    ddl.batch_execute("ALTER TABLE oc ALTER COLUMN v TYPE text")
        .await
        .unwrap();
    // Through pgvalve this holds the only server connection a used so far.
    let holder = connect(url).await.unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    for _ in 0..2 {
        seen.push(outcome(a.query(&old, &[]).await.map(|r| r.len())));
    }
    holder.batch_execute("COMMIT").await.unwrap();
    let fresh = a.prepare("select * from oc").await.unwrap();
    seen.push(format!("{:?}", column_types(&fresh)));
    seen.push(outcome(a.query_one(&fresh, &[]).await.map(|r| r.get::<_, String>(0))));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_statement_on_a_connection_without_its_copy_gets_0a000() {
    let opts = PgOptions {
        host_auth: HostAuth::Trust,
        ..PgOptions::default()
    };
    let s = Setup::with(opts, |f| {
        f.pool.pool_mode = PoolMode::Transaction;
        f.pool.pool_size = 2;
        f.pool.query_wait_timeout = Duration::from_secs(30);
        // Both slots for clients (the lock monitor's connection would take one).
        f.locks.enabled = false;
    })
    .await;
    let ddl = connect(&s.pg.url()).await.unwrap();
    let direct = old_statement_on_another_connection(&s.pg.url(), &ddl).await;
    let proxied = old_statement_on_another_connection(&s.url(), &ddl).await;
    assert_eq!(proxied, direct, "through pgvalve as directly");
    assert_eq!(proxied, ["ok 1", "error 0A000", "error 0A000", "[Text]", "ok \"1\""]);
    assert_eq!(
        s.proxy.shared().pools.stats()[0].open,
        2,
        "a second server connection served it"
    );
}

/// A raw client: logs in (trust) and sends whole batches, reading until ReadyForQuery.
struct Raw(TcpStream);

impl Raw {
    async fn login(addr: &str) -> Raw {
        let mut sock = TcpStream::connect(addr).await.unwrap();
        let body = b"\0\x03\0\0user\0app\0database\0app\0\0";
        let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        startup.extend_from_slice(body);
        sock.write_all(&startup).await.unwrap();
        let mut raw = Raw(sock);
        raw.until_ready().await;
        raw
    }

    /// Messages (type, body) up to and including ReadyForQuery.
    async fn until_ready(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut got = Vec::new();
        loop {
            let mut head = [0u8; 5];
            within(Duration::from_secs(10), self.0.read_exact(&mut head))
                .await
                .unwrap();
            let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            let mut body = vec![0u8; len - 4];
            self.0.read_exact(&mut body).await.unwrap();
            got.push((head[0], body));
            if head[0] == b'Z' {
                return got;
            }
        }
    }

    async fn send(&mut self, msgs: &[(u8, &[u8])]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        for (tag, body) in msgs {
            out.push(*tag);
            out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
            out.extend_from_slice(body);
        }
        self.0.write_all(&out).await.unwrap();
        self.until_ready().await
    }

    /// Parse (named), Describe, Bind, Execute, Sync in one write: the message types
    /// answered, the type of the first column described, the first value returned.
    async fn parse_describe_execute(&mut self, name: &str, sql: &str) -> (String, u32, String) {
        let parse = [name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat();
        let describe = [b"S", name.as_bytes(), b"\0"].concat();
        let bind = [b"\0", name.as_bytes(), b"\0\0\0\0\0\0\0"].concat();
        let got = self
            .send(&[
                (b'P', &parse),
                (b'D', &describe),
                (b'B', &bind),
                (b'E', b"\0\0\0\0\0"),
                (b'S', b""),
            ])
            .await;
        let tags: String = got.iter().map(|(t, _)| *t as char).collect();
        let oid = got
            .iter()
            .find(|(t, _)| *t == b'T')
            .map(|(_, b)| {
                let at = 2 + b[2..].iter().position(|&c| c == 0).unwrap() + 1 + 6;
                u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
            })
            .unwrap_or(0);
        let value = got
            .iter()
            .find(|(t, _)| *t == b'D')
            .map(|(_, b)| String::from_utf8_lossy(&b[6..]).into_owned())
            .unwrap_or_default();
        (tags, oid, value)
    }
}

/// A brand-new client's pipelined Parse/Describe/Bind/Execute of `SELECT *` after the
/// table's column changed type, while a statement of the same text prepared before is on the
/// server connection: the current columns, no error.
async fn pipelined_after_change(addr: &str, ddl: &Client) -> Vec<(String, u32, String)> {
    ddl.batch_execute("DROP TABLE IF EXISTS pp; CREATE TABLE pp (v int); INSERT INTO pp VALUES (7)")
        .await
        .unwrap();
    let mut a = Raw::login(addr).await;
    let mut seen = vec![a.parse_describe_execute("q", "select * from pp").await];
    ddl.batch_execute("ALTER TABLE pp ALTER COLUMN v TYPE text USING 'x' || v")
        .await
        .unwrap();
    let mut b = Raw::login(addr).await;
    seen.push(b.parse_describe_execute("q", "select * from pp").await);
    seen.push(a.parse_describe_execute("q2", "select * from pp").await);
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_parse_describe_execute_after_a_change_gets_the_new_columns() {
    let s = one_connection(true).await;
    let ddl = connect(&s.pg.url()).await.unwrap();
    let direct = pipelined_after_change(&format!("127.0.0.1:{}", s.pg.port()), &ddl).await;
    let proxied = pipelined_after_change(&s.proxy.local_addr().to_string(), &ddl).await;
    assert_eq!(proxied, direct, "through pgvalve as directly");
    let expected = [("1tT2DCZ", 23, "7"), ("1tT2DCZ", 25, "x7"), ("1tT2DCZ", 25, "x7")];
    let expected: Vec<(String, u32, String)> = expected
        .iter()
        .map(|(t, o, v)| (t.to_string(), *o, v.to_string()))
        .collect();
    assert_eq!(proxied, expected);
}

/// Many clients on a few server connections prepare the same texts, the tables change,
/// every client prepares again: each gets the current types and its own results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_across_server_connections_follow_a_schema_change() {
    let s = Setup::new(|f| {
        f.pool.pool_mode = PoolMode::Transaction;
        f.pool.pool_size = 3;
        f.pool.query_wait_timeout = Duration::from_secs(30);
    })
    .await;
    let ddl = connect(&s.pg.url()).await.unwrap();
    ddl.batch_execute("CREATE TABLE mc (id int, v int)").await.unwrap();
    let url = s.url();
    let clients: Vec<Client> = futures_util::future::join_all((0..12).map(|_| connect(&url)))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for (i, c) in clients.iter().enumerate() {
        let ins = c.prepare("insert into mc values ($1, $2)").await.unwrap();
        assert_eq!(ins.params(), [Type::INT4, Type::INT4]);
        c.execute(&ins, &[&(i as i32), &(i as i32)]).await.unwrap();
    }
    ddl.batch_execute("ALTER TABLE mc ALTER COLUMN v TYPE text USING 'v' || v")
        .await
        .unwrap();
    let tasks = clients.into_iter().enumerate().map(|(i, c)| async move {
        let i = i as i32;
        let ins = c.prepare("insert into mc values ($1, $2)").await.unwrap();
        assert_eq!(ins.params(), [Type::INT4, Type::TEXT], "client {i}");
        c.execute(&ins, &[&(100 + i), &format!("00{i}")]).await.unwrap();
        let sel = c.prepare("select v from mc where id = $1").await.unwrap();
        assert_eq!(column_types(&sel), [Type::TEXT], "client {i}");
        for (id, want) in [(i, format!("v{i}")), (100 + i, format!("00{i}"))] {
            let v: String = c.query_one(&sel, &[&id]).await.unwrap().get(0);
            assert_eq!(v, want, "client {i}");
        }
    });
    within(Duration::from_secs(60), futures_util::future::join_all(tasks)).await;
}

/// Copies of the statements a simple query on the only server connection sees, by text.
async fn copies(c: &Client, text: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM pg_prepared_statements WHERE statement = '{text}' AND name LIKE 'pgv\\_%'");
    let msgs = c.simple_query(&sql).await.unwrap();
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_no_client_uses_are_closed_on_the_server() {
    let s = one_connection(false).await;
    let observer = s.client().await;
    let text = "select 40 + $1::int";
    let a = s.client().await;
    let st = a.prepare(text).await.unwrap();
    assert_eq!(a.query_one(&st, &[&2i32]).await.unwrap().get::<_, i32>(0), 42);
    assert_eq!(copies(&observer, text).await, 1);
    // The client closes it (tokio-postgres sends Close when the statement is dropped).
    drop(st);
    a.simple_query("SELECT 1").await.unwrap();
    assert_eq!(
        copies(&observer, text).await,
        0,
        "closed after its only client closed it"
    );
    // Two clients share one copy (the second client's own Parse is closed once it joined).
    let (b, c) = (s.client().await, s.client().await);
    let (sb, sc) = (b.prepare(text).await.unwrap(), c.prepare(text).await.unwrap());
    assert_eq!(b.query_one(&sb, &[&1i32]).await.unwrap().get::<_, i32>(0), 41);
    assert_eq!(c.query_one(&sc, &[&3i32]).await.unwrap().get::<_, i32>(0), 43);
    assert_eq!(copies(&observer, text).await, 1);
    // One disconnects: the other still uses it.
    drop((b, sb));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(copies(&observer, text).await, 1);
    assert_eq!(c.query_one(&sc, &[&4i32]).await.unwrap().get::<_, i32>(0), 44);
    // The last one disconnects: closed.
    drop((c, sc));
    eventually(
        Duration::from_secs(10),
        "the last user's statement is closed",
        || async { copies(&observer, text).await == 0 },
    )
    .await;
    // DEALLOCATE ALL and a fresh prepare leave exactly one copy.
    let d = s.client().await;
    let sd = d.prepare(text).await.unwrap();
    d.batch_execute("DEALLOCATE ALL").await.unwrap();
    let sd2 = d.prepare(text).await.unwrap();
    assert_eq!(d.query_one(&sd2, &[&5i32]).await.unwrap().get::<_, i32>(0), 45);
    drop(sd);
    assert_eq!(copies(&observer, text).await, 1);
}
