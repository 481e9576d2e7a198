//! `pgvalve top` in a real terminal: the binary runs on a pseudo-terminal (portable-pty), its
//! output is read back into a screen by a terminal emulator (vt100), and keys are typed into
//! it. Here in front of a cluster instance whose identity has a cluster-wide cap, so the
//! screen shows that cap and this instance's part of it, as the status page does.

use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pgvalve::config::IdentityRule;
use portable_pty::{native_pty_system, CommandBuilder, PtySize};

use crate::cluster::{all_joined, start_pg, Instance};
use crate::support::connect;

const ROWS: u16 = 30;
const COLS: u16 = 140;

/// A program running on a pseudo-terminal, and the screen it has drawn so far.
struct Tty {
    child: Box<dyn portable_pty::Child + Send + Sync>,
    keys: Box<dyn Write + Send>,
    output: mpsc::Receiver<Vec<u8>>,
    screen: vt100::Parser,
}

impl Tty {
    fn spawn(args: &[&str]) -> Tty {
        let pair = native_pty_system()
            .openpty(PtySize {
                rows: ROWS,
                cols: COLS,
                pixel_width: 0,
                pixel_height: 0,
            })
            .expect("a pseudo-terminal");
        let mut cmd = CommandBuilder::new(env!("CARGO_BIN_EXE_pgvalve"));
        cmd.args(args);
        cmd.env("TERM", "xterm-256color");
        let child = pair.slave.spawn_command(cmd).expect("pgvalve top starts");
        drop(pair.slave);
        let mut reader = pair.master.try_clone_reader().expect("reader");
        let (tx, output) = mpsc::channel();
        // The terminal's output, read on a thread of its own (the reads block).
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Tty {
            child,
            keys: pair.master.take_writer().expect("writer"),
            output,
            screen: vt100::Parser::new(ROWS, COLS, 0),
        }
    }

    /// Takes in what the program wrote so far; the screen's text.
    fn read(&mut self) -> String {
        while let Ok(bytes) = self.output.try_recv() {
            self.screen.process(&bytes);
        }
        self.screen.screen().contents()
    }

    /// Waits until the screen shows `what` (panics with the screen after `within`).
    async fn shows(&mut self, what: impl Fn(&str) -> bool, within: Duration) -> String {
        let end = Instant::now() + within;
        loop {
            let text = self.read();
            if what(&text) {
                return text;
            }
            assert!(Instant::now() < end, "the screen never showed it:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn key(&mut self, k: &str) {
        self.keys.write_all(k.as_bytes()).expect("typed");
        self.keys.flush().expect("flushed");
    }
}

impl Drop for Tty {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_in_a_real_terminal_shows_identities_their_cluster_cap_sorts_and_quits() {
    let pg = start_pg().await;
    let rule = |f: &mut pgvalve::config::FileConfig| {
        f.http.listen = Some("127.0.0.1:0".into());
        f.identity.push(IdentityRule {
            name: "web".into(),
            application_name: Some("web-*".into()),
            cluster_max_server_connections: Some(5),
            ..IdentityRule::default()
        });
    };
    let one = Instance::start_with(&pg, "top", rule);
    all_joined(&[&one]).await;
    // A client of "web" and one of another identity, logged in and idle.
    let web = connect(&format!("{}?application_name=web-1", one.url(&pg)))
        .await
        .expect("web");
    let other = connect(&format!("{}?application_name=batch", one.url(&pg)))
        .await
        .expect("batch");
    web.simple_query("SELECT 1").await.expect("web runs");
    other.simple_query("SELECT 1").await.expect("batch runs");
    let http = format!("http://{}", one.http_addr().expect("http listener"));
    let mut tty = Tty::spawn(&["top", "--http", &http, "--interval", "0.3"]);
    let screen = tty
        .shows(
            |s| s.contains("identities") && s.contains("web") && s.contains(" of 5"),
            Duration::from_secs(15),
        )
        .await;
    assert!(
        tty.screen.screen().alternate_screen(),
        "top draws on the alternate screen"
    );
    let line = |s: &str, id: &str| {
        s.lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id} on\n{s}"))
            .to_string()
    };
    let web_line = line(&screen, "web");
    let cells: Vec<&str> = web_line
        .trim_matches(|c: char| c == '│' || c.is_whitespace())
        .split_whitespace()
        .collect();
    assert_eq!(cells.first(), Some(&"web"), "{web_line}");
    assert_eq!(cells.get(1), Some(&"1"), "one client: {web_line}");
    let part: u32 = cells.get(3).and_then(|g| g.parse().ok()).unwrap_or(99);
    assert!(
        cells.get(4..6) == Some(&["of", "5"][..]) && (1..=5).contains(&part),
        "this instance's part of the cap of 5: {web_line}"
    );
    assert!(!line(&screen, "batch").contains(" of "), "batch has no cluster cap");
    assert!(screen.contains("sort: servers"), "{screen}");
    // `2` sorts by clients; `q` quits and gives the terminal back.
    tty.key("2");
    tty.shows(|s| s.contains("sort: clients"), Duration::from_secs(5)).await;
    tty.key("q");
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = tty.child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < end, "top did not quit on q");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "top exits 0 on q: {status:?}");
    tty.read();
    assert!(
        !tty.screen.screen().alternate_screen(),
        "the terminal is given back (the alternate screen left)"
    );
}
