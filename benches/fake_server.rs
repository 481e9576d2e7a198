//! A fake PostgreSQL for measuring the proxy alone (issue 22): a tokio server that speaks the
//! v3 protocol well enough for pgvalve and pgbench and answers pgbench's queries from memory,
//! so a benchmark through pgvalve spends its CPU in pgbench, the proxy and this server -- and
//! this server's share is small (no per-message allocation, one write per batch of messages,
//! TCP_NODELAY).
//!
//! Run by `benches/fake_scaling.sh`, or by hand:
//!
//! ```text
//! cargo bench --bench fake_server -- --listen 127.0.0.1:15432 [--threads 1] [--scale 10]
//! ```
//!
//! What it answers: SSLRequest/GSSENCRequest 'N'; any StartupMessage AuthenticationOk (trust:
//! every user and database), the usual ParameterStatus, BackendKeyData, ReadyForQuery;
//! CancelRequest is accepted and ignored. Queries (simple protocol, several statements per
//! Query; or extended: Parse/Bind/Describe/Execute/Sync/Flush/Close):
//! `SELECT abalance FROM pgbench_accounts ...` one int4 row (0); `select count(*) from
//! pgbench_branches` the scale; pgbench's partition probe one row (not partitioned); UPDATE
//! "UPDATE 1", INSERT "INSERT 0 1" (pgbench's TPC-B script); BEGIN/COMMIT/ROLLBACK with the
//! transaction status; SET, RESET, DISCARD their tags; anything else "SELECT 0" with no rows.
//! Not part of the installed package: a bench target of the pgvalve crate (harness = false).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};

use bytes::{Buf, BufMut, BytesMut};
use pgvalve::protocol::startup::{split_initial, InitialPacket, StartupParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest message accepted from a client.
const MAX_MESSAGE: usize = 64 << 20;
/// PostgreSQL type oids used in answers.
const INT4: u32 = 23;
const INT8: u32 = 20;
const CHAR: u32 = 18;
const TEXT: u32 = 25;

struct Args {
    listen: String,
    threads: usize,
    scale: i64,
}

fn parse_args() -> Args {
    let mut a = Args {
        listen: "127.0.0.1:15432".into(),
        threads: 1,
        scale: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().unwrap_or_else(|| usage(&format!("{name} needs a value")));
        match arg.as_str() {
            "--listen" => a.listen = value("--listen"),
            "--threads" => a.threads = value("--threads").parse().unwrap_or_else(|_| usage("bad --threads")),
            "--scale" => a.scale = value("--scale").parse().unwrap_or_else(|_| usage("bad --scale")),
            // `cargo bench` appends --bench; the harness flags are not ours.
            "--bench" => {}
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    a
}

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("fake_server: {msg}");
    }
    eprintln!("usage: fake_server [--listen ADDR] [--threads N (1: one event loop)] [--scale N]");
    std::process::exit(2)
}

fn main() {
    let args = parse_args();
    let rt = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind(&args.listen).await.expect("bind the listen address");
        eprintln!(
            "fake_server: listening on {} ({} thread(s), scale {})",
            args.listen, args.threads, args.scale
        );
        let pids = AtomicI32::new(1000);
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let _ = sock.set_nodelay(true);
            let pid = pids.fetch_add(1, Ordering::Relaxed);
            let scale = args.scale;
            tokio::spawn(async move {
                let _ = connection(sock, pid, scale).await;
            });
        }
    });
}

/// One client connection: the startup packet(s), then messages until Terminate or EOF.
async fn connection(mut sock: TcpStream, pid: i32, scale: i64) -> std::io::Result<()> {
    let mut rbuf = BytesMut::with_capacity(8192);
    let mut wbuf = BytesMut::with_capacity(8192);
    let params = loop {
        match split_initial(&mut rbuf, 10_000) {
            Ok(Some(InitialPacket::SslRequest | InitialPacket::GssEncRequest)) => sock.write_all(b"N").await?,
            Ok(Some(InitialPacket::Cancel { .. } | InitialPacket::ForwardedCancel { .. })) | Err(_) => return Ok(()),
            Ok(Some(InitialPacket::Startup(p))) => break p,
            Ok(None) => {
                if sock.read_buf(&mut rbuf).await? == 0 {
                    return Ok(());
                }
            }
        }
    };
    login(&params, pid, &mut wbuf);
    let mut s = Session::new(scale);
    loop {
        while let Some(total) = whole_message(&rbuf) {
            let open = s.handle(rbuf[0], &rbuf[5..total], &mut wbuf);
            rbuf.advance(total);
            if !open {
                sock.write_all(&wbuf).await?;
                return Ok(());
            }
        }
        if !wbuf.is_empty() {
            sock.write_all(&wbuf).await?;
            wbuf.clear();
        }
        rbuf.reserve(8192);
        if sock.read_buf(&mut rbuf).await? == 0 {
            return Ok(());
        }
    }
}

/// The length of the whole message at the front of `buf` (type byte included) when it is all
/// there; a bad length is treated as "never complete" by returning a huge value.
fn whole_message(buf: &[u8]) -> Option<usize> {
    if buf.len() < 5 {
        return None;
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let total = if (4..=MAX_MESSAGE as i32).contains(&len) {
        len as usize + 1
    } else {
        usize::MAX
    };
    (buf.len() >= total).then_some(total)
}

/// AuthenticationOk, ParameterStatus for what clients and pgvalve read, BackendKeyData,
/// ReadyForQuery.
fn login(p: &StartupParams, pid: i32, w: &mut BytesMut) {
    let opts: Vec<&String> = p.params.keys().filter(|k| k.starts_with("_pq_.")).collect();
    if p.minor > 0 || !opts.is_empty() {
        // NegotiateProtocolVersion: 3.0, and every _pq_ option unsupported.
        let at = begin(w, b'v');
        w.put_i32(3 << 16);
        w.put_i32(opts.len() as i32);
        for o in opts {
            cstr(w, o.as_bytes());
        }
        end(w, at);
    }
    let at = begin(w, b'R');
    w.put_i32(0);
    end(w, at);
    let app = p.application_name().unwrap_or("");
    let user = p.user();
    for (k, v) in [
        ("server_version", "17.0"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("IntervalStyle", "postgres"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("TimeZone", "UTC"),
        ("is_superuser", "off"),
        ("in_hot_standby", "off"),
        ("session_authorization", user),
        ("application_name", app),
    ] {
        let at = begin(w, b'S');
        cstr(w, k.as_bytes());
        cstr(w, v.as_bytes());
        end(w, at);
    }
    let at = begin(w, b'K');
    w.put_i32(pid);
    w.put_i32(pid.wrapping_mul(2_654_435_761u32 as i32));
    end(w, at);
    ready(w, b'I');
}

/// What a statement is, decided once from its text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// pgbench -S: `SELECT abalance FROM pgbench_accounts WHERE aid = ...`.
    Abalance,
    /// pgbench's scale probe: `select count(*) from pgbench_branches`.
    Scale,
    /// pgbench's partition probe (mentions `partstrat`).
    Partitions,
    Update,
    Insert,
    Begin,
    Commit,
    Rollback,
    Set,
    Reset,
    Discard,
    Empty,
    /// Anything else: "SELECT 0", no rows.
    Other,
}

/// A prepared statement: its kind and the parameter types to describe.
#[derive(Clone, Debug)]
struct Statement {
    kind: Kind,
    params: Vec<u32>,
}

impl Statement {
    fn unnamed() -> Self {
        Statement {
            kind: Kind::Empty,
            params: Vec::new(),
        }
    }
}

/// A bound portal: its kind and which result columns are binary (bit per column).
#[derive(Clone, Copy, Debug)]
struct Portal {
    kind: Kind,
    binary: u8,
}

/// Per-connection protocol state.
struct Session {
    scale: i64,
    /// Transaction status for ReadyForQuery.
    status: u8,
    /// After an error in the extended protocol: skip messages until Sync.
    skipping: bool,
    unnamed: Statement,
    named: HashMap<Vec<u8>, Statement>,
    portal: Option<Portal>,
    portals: HashMap<Vec<u8>, Portal>,
}

impl Session {
    fn new(scale: i64) -> Self {
        Session {
            scale,
            status: b'I',
            skipping: false,
            unnamed: Statement::unnamed(),
            named: HashMap::new(),
            portal: None,
            portals: HashMap::new(),
        }
    }

    /// Answers one message into `w`; false when the connection must close.
    fn handle(&mut self, tag: u8, body: &[u8], w: &mut BytesMut) -> bool {
        if self.skipping && tag != b'S' && tag != b'X' {
            return true;
        }
        match tag {
            b'Q' => self.query(body, w),
            b'P' => self.parse(body, w),
            b'B' => self.bind(body, w),
            b'D' => self.describe(body, w),
            b'E' => self.execute(body, w),
            b'S' => {
                self.skipping = false;
                ready(w, self.status);
            }
            b'H' => {}
            b'C' => self.close(body, w),
            b'X' => return false,
            // Copy messages outside COPY are ignored, as PostgreSQL does.
            b'd' | b'c' | b'f' => {}
            _ => {
                error(w, "08P01", "fake_server: unsupported message type");
                return false;
            }
        }
        true
    }

    /// Simple protocol: each statement's answer, then one ReadyForQuery.
    fn query(&mut self, body: &[u8], w: &mut BytesMut) {
        let text = cstring(body).unwrap_or(b"");
        let mut any = false;
        for stmt in Statements(text) {
            if stmt.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            any = true;
            let kind = classify(stmt);
            row_description(w, kind, 0);
            self.run(kind, 0, w);
        }
        if !any {
            put_empty(w, b'I'); // EmptyQueryResponse
        }
        ready(w, self.status);
    }

    fn parse(&mut self, body: &[u8], w: &mut BytesMut) {
        let Some((name, rest)) = split_cstr(body) else {
            return self.fail(w, "08P01", "malformed Parse");
        };
        let Some((text, rest)) = split_cstr(rest) else {
            return self.fail(w, "08P01", "malformed Parse");
        };
        let given: usize = if rest.len() >= 2 {
            u16::from_be_bytes([rest[0], rest[1]]) as usize
        } else {
            0
        };
        let kind = classify(text);
        let count = given.max(max_placeholder(text));
        let fill = |params: &mut Vec<u32>| {
            params.clear();
            for i in 0..count {
                let off = 2 + 4 * i;
                let oid = rest
                    .get(off..off + 4)
                    .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                params.push(if oid != 0 {
                    oid
                } else if kind == Kind::Abalance {
                    INT4
                } else {
                    TEXT
                });
            }
        };
        if name.is_empty() {
            self.unnamed.kind = kind;
            fill(&mut self.unnamed.params);
        } else if self.named.contains_key(name) {
            return self.fail(w, "42P05", "prepared statement already exists");
        } else {
            let mut params = Vec::new();
            fill(&mut params);
            self.named.insert(name.to_vec(), Statement { kind, params });
        }
        put_empty(w, b'1');
    }

    fn statement(&self, name: &[u8]) -> Option<&Statement> {
        if name.is_empty() {
            Some(&self.unnamed)
        } else {
            self.named.get(name)
        }
    }

    fn bind(&mut self, body: &[u8], w: &mut BytesMut) {
        let Some((portal, rest)) = split_cstr(body) else {
            return self.fail(w, "08P01", "malformed Bind");
        };
        let Some((stmt, rest)) = split_cstr(rest) else {
            return self.fail(w, "08P01", "malformed Bind");
        };
        let Some(kind) = self.statement(stmt).map(|s| s.kind) else {
            return self.fail(w, "26000", "prepared statement does not exist");
        };
        let Some(binary) = result_formats(rest) else {
            return self.fail(w, "08P01", "malformed Bind");
        };
        let p = Portal { kind, binary };
        if portal.is_empty() {
            self.portal = Some(p);
        } else {
            self.portals.insert(portal.to_vec(), p);
        }
        put_empty(w, b'2');
    }

    fn find_portal(&self, name: &[u8]) -> Option<Portal> {
        if name.is_empty() {
            self.portal
        } else {
            self.portals.get(name).copied()
        }
    }

    fn describe(&mut self, body: &[u8], w: &mut BytesMut) {
        let name = body.get(1..).and_then(cstring).unwrap_or(b"");
        match body.first() {
            Some(b'S') => {
                let Some(s) = self.statement(name) else {
                    return self.fail(w, "26000", "prepared statement does not exist");
                };
                let at = begin(w, b't');
                w.put_u16(s.params.len() as u16);
                for &oid in &s.params {
                    w.put_u32(oid);
                }
                end(w, at);
                let kind = s.kind;
                if !row_description(w, kind, 0) {
                    put_empty(w, b'n');
                }
            }
            Some(b'P') => {
                let Some(p) = self.find_portal(name) else {
                    return self.fail(w, "34000", "portal does not exist");
                };
                if !row_description(w, p.kind, p.binary) {
                    put_empty(w, b'n');
                }
            }
            _ => self.fail(w, "08P01", "malformed Describe"),
        }
    }

    fn execute(&mut self, body: &[u8], w: &mut BytesMut) {
        let name = cstring(body).unwrap_or(b"");
        let Some(p) = self.find_portal(name) else {
            return self.fail(w, "34000", "portal does not exist");
        };
        self.run(p.kind, p.binary, w);
    }

    fn close(&mut self, body: &[u8], w: &mut BytesMut) {
        let name = body.get(1..).and_then(cstring).unwrap_or(b"");
        match (body.first(), name.is_empty()) {
            (Some(b'S'), true) => self.unnamed = Statement::unnamed(),
            (Some(b'S'), false) => drop(self.named.remove(name)),
            (Some(b'P'), true) => self.portal = None,
            (Some(b'P'), false) => drop(self.portals.remove(name)),
            _ => return self.fail(w, "08P01", "malformed Close"),
        }
        put_empty(w, b'3');
    }

    /// An ErrorResponse; in the extended protocol the rest up to Sync is skipped.
    fn fail(&mut self, w: &mut BytesMut, code: &str, msg: &str) {
        error(w, code, msg);
        self.skipping = true;
        if self.status == b'T' {
            self.status = b'E';
        }
    }

    /// The rows (no RowDescription) and CommandComplete of one statement.
    fn run(&mut self, kind: Kind, binary: u8, w: &mut BytesMut) {
        let tag: &[u8] = match kind {
            Kind::Abalance => {
                data_row(w, &[Value::Int4(0)], binary);
                b"SELECT 1"
            }
            Kind::Scale => {
                data_row(w, &[Value::Int8(self.scale)], binary);
                b"SELECT 1"
            }
            Kind::Partitions => {
                data_row(w, &[Value::Int4(1), Value::Null, Value::Int8(0)], binary);
                b"SELECT 1"
            }
            Kind::Update => b"UPDATE 1",
            Kind::Insert => b"INSERT 0 1",
            Kind::Begin => {
                if self.status == b'I' {
                    self.status = b'T';
                }
                b"BEGIN"
            }
            Kind::Commit | Kind::Rollback => {
                let failed = self.status == b'E';
                self.status = b'I';
                if kind == Kind::Commit && !failed {
                    b"COMMIT"
                } else {
                    b"ROLLBACK"
                }
            }
            Kind::Set => b"SET",
            Kind::Reset => b"RESET",
            Kind::Discard => b"DISCARD ALL",
            Kind::Empty => return put_empty(w, b'I'),
            Kind::Other => b"SELECT 0",
        };
        let at = begin(w, b'C');
        cstr(w, tag);
        end(w, at);
    }
}

/// Decides what a statement is, from its leading keyword and a few words pgbench uses.
fn classify(sql: &[u8]) -> Kind {
    let s = trim(sql);
    let first = s
        .split(|c| c.is_ascii_whitespace() || *c == b';' || *c == b'(')
        .next()
        .unwrap_or(b"");
    let is = |w: &str| first.eq_ignore_ascii_case(w.as_bytes());
    if s.is_empty() {
        Kind::Empty
    } else if is("select") {
        if contains(s, b"pgbench_accounts") && contains(s, b"abalance") {
            Kind::Abalance
        } else if contains(s, b"partstrat") {
            Kind::Partitions
        } else if contains(s, b"pgbench_branches") && contains(s, b"count") {
            Kind::Scale
        } else {
            Kind::Other
        }
    } else if is("update") {
        Kind::Update
    } else if is("insert") {
        Kind::Insert
    } else if is("begin") || is("start") {
        Kind::Begin
    } else if is("commit") || is("end") {
        Kind::Commit
    } else if is("rollback") || is("abort") {
        Kind::Rollback
    } else if is("set") {
        Kind::Set
    } else if is("reset") {
        Kind::Reset
    } else if is("discard") {
        Kind::Discard
    } else {
        Kind::Other
    }
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &s[start..end]
}

/// Case-insensitive substring test (queries are short).
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

/// The highest `$N` in a statement (its parameter count when Parse gives no types).
fn max_placeholder(sql: &[u8]) -> usize {
    let mut max = 0;
    let mut i = 0;
    while i < sql.len() {
        if sql[i] == b'$' {
            let digits = sql[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
            let n = std::str::from_utf8(&sql[i + 1..i + 1 + digits])
                .ok()
                .and_then(|d| d.parse().ok())
                .unwrap_or(0);
            max = max.max(n);
            i += digits;
        }
        i += 1;
    }
    max
}

/// The statements of a simple Query, split at semicolons outside quotes.
struct Statements<'a>(&'a [u8]);

impl<'a> Iterator for Statements<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.0.is_empty() {
            return None;
        }
        let mut quote = None;
        for (i, &c) in self.0.iter().enumerate() {
            match (quote, c) {
                (None, b'\'' | b'"') => quote = Some(c),
                (Some(q), _) if c == q => quote = None,
                (None, b';') => {
                    let (stmt, rest) = (&self.0[..i], &self.0[i + 1..]);
                    self.0 = rest;
                    return Some(stmt);
                }
                _ => {}
            }
        }
        Some(std::mem::take(&mut self.0))
    }
}

/// Result format codes of a Bind (after the statement name): a bit per binary column.
fn result_formats(mut b: &[u8]) -> Option<u8> {
    let skip_i16s = |b: &mut &[u8]| -> Option<usize> {
        if b.len() < 2 {
            return None;
        }
        let n = u16::from_be_bytes([b[0], b[1]]) as usize;
        *b = &b[2..];
        Some(n)
    };
    let nfmt = skip_i16s(&mut b)?;
    b = b.get(2 * nfmt..)?;
    let nparams = skip_i16s(&mut b)?;
    for _ in 0..nparams {
        let len = i32::from_be_bytes(b.get(..4)?.try_into().ok()?);
        b = b.get(4 + len.max(0) as usize..)?;
    }
    let nres = skip_i16s(&mut b)?;
    let codes = b.get(..2 * nres)?;
    let code = |i: usize| u16::from_be_bytes([codes[2 * i], codes[2 * i + 1]]) == 1;
    Some(match nres {
        0 => 0,
        1 => {
            if code(0) {
                0xff
            } else {
                0
            }
        }
        n => (0..n.min(8)).fold(0, |m, i| m | (u8::from(code(i)) << i)),
    })
}

/// One column value of an answer.
#[derive(Clone, Copy)]
enum Value {
    Int4(i32),
    Int8(i64),
    Null,
}

/// RowDescription for a statement that returns rows; false (nothing written) otherwise.
fn row_description(w: &mut BytesMut, kind: Kind, binary: u8) -> bool {
    let cols: &[(&str, u32, i16)] = match kind {
        Kind::Abalance => &[("abalance", INT4, 4)],
        Kind::Scale => &[("count", INT8, 8)],
        Kind::Partitions => &[("n", INT4, 4), ("partstrat", CHAR, 1), ("count", INT8, 8)],
        _ => return false,
    };
    let at = begin(w, b'T');
    w.put_i16(cols.len() as i16);
    for (i, (name, oid, size)) in cols.iter().enumerate() {
        cstr(w, name.as_bytes());
        w.put_u32(0); // table oid
        w.put_i16(0); // column number
        w.put_u32(*oid);
        w.put_i16(*size);
        w.put_i32(-1); // type modifier
        w.put_i16(i16::from(binary >> i & 1 == 1));
    }
    end(w, at);
    true
}

fn data_row(w: &mut BytesMut, values: &[Value], binary: u8) {
    let at = begin(w, b'D');
    w.put_i16(values.len() as i16);
    for (i, v) in values.iter().enumerate() {
        let bin = binary >> i & 1 == 1;
        match (*v, bin) {
            (Value::Null, _) => w.put_i32(-1),
            (Value::Int4(n), true) => {
                w.put_i32(4);
                w.put_i32(n);
            }
            (Value::Int8(n), true) => {
                w.put_i32(8);
                w.put_i64(n);
            }
            (Value::Int4(n), false) => text_int(w, i64::from(n)),
            (Value::Int8(n), false) => text_int(w, n),
        }
    }
    end(w, at);
}

/// An integer as a text column (length, digits) without allocating.
fn text_int(w: &mut BytesMut, n: i64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut m = n.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (m % 10) as u8;
        m /= 10;
        if m == 0 {
            break;
        }
    }
    let neg = usize::from(n < 0);
    w.put_i32((digits.len() - i + neg) as i32);
    if neg == 1 {
        w.put_u8(b'-');
    }
    w.put_slice(&digits[i..]);
}

fn error(w: &mut BytesMut, code: &str, msg: &str) {
    let at = begin(w, b'E');
    for (field, value) in [(b'S', "ERROR"), (b'V', "ERROR"), (b'C', code), (b'M', msg)] {
        w.put_u8(field);
        cstr(w, value.as_bytes());
    }
    w.put_u8(0);
    end(w, at);
}

fn ready(w: &mut BytesMut, status: u8) {
    let at = begin(w, b'Z');
    w.put_u8(status);
    end(w, at);
}

fn put_empty(w: &mut BytesMut, tag: u8) {
    w.put_u8(tag);
    w.put_i32(4);
}

/// Starts a message: writes the tag and a length placeholder; returns where the length goes.
fn begin(w: &mut BytesMut, tag: u8) -> usize {
    w.put_u8(tag);
    let at = w.len();
    w.put_i32(0);
    at
}

/// Fills in the length of the message started at `at`.
fn end(w: &mut BytesMut, at: usize) {
    let len = (w.len() - at) as i32;
    w[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(w: &mut BytesMut, s: &[u8]) {
    w.put_slice(s);
    w.put_u8(0);
}

/// The C string at the start of `b` (without its terminator).
fn cstring(b: &[u8]) -> Option<&[u8]> {
    split_cstr(b).map(|(s, _)| s)
}

/// The C string at the start of `b` and what follows its terminator.
fn split_cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = b.iter().position(|&c| c == 0)?;
    Some((&b[..nul], &b[nul + 1..]))
}
