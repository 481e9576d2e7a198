//! pgvalve under systemd: the real binary tells a notify socket (a Unix datagram socket bound
//! here, as systemd binds one for `Type=notify`) READY=1 once it accepts clients,
//! RELOADING=1 then READY=1 around a SIGHUP reload (with STATUS= saying whether the reload
//! was applied or refused) and STOPPING=1 on SIGTERM; deploy/systemd/pgvalve.service passes
//! `systemd-analyze verify`.

use std::process::{Command, Stdio};
use std::time::Duration;

use pgvalve::testkit::{PgOptions, TestPostgres};
use tokio::net::UnixDatagram;

use crate::support::{connect, within};

const BIN: &str = env!("CARGO_BIN_EXE_pgvalve");
const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/systemd/pgvalve.service");

/// The next notification (one datagram, one or more `KEY=VALUE` lines).
async fn next(sock: &UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = within(Duration::from_secs(20), sock.recv(&mut buf)).await.unwrap();
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

fn config(listen: &str, pg_port: u16, pool_size: u32) -> String {
    format!(
        "[proxy]\nlisten = \"{listen}\"\n[pool]\npool_size = {pool_size}\n[databases.app]\nhost = \"127.0.0.1\"\nport = {pg_port}\n[users.app]\npassword = \"app-secret\"\n"
    )
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_notifies_ready_reloading_and_stopping() {
    let pg = TestPostgres::start(PgOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let file = dir.path().join("pgvalve.toml");
    std::fs::write(&file, config(&listen, pg.port(), 5)).unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["run", "-c"])
        .arg(&file)
        .env("XDG_RUNTIME_DIR", env!("CARGO_TARGET_TMPDIR"))
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();

    // READY=1 comes once clients are accepted: a client connects at once.
    let ready = next(&sock).await;
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    let url = format!("postgres://app:app-secret@{listen}/app");
    let c = connect(&url).await.expect("ready means accepting clients");
    c.simple_query("SELECT 1").await.unwrap();

    // A reload that applies: RELOADING=1 (with the monotonic time systemd wants), then READY=1.
    std::fs::write(&file, config(&listen, pg.port(), 7)).unwrap();
    signal(pid, "-HUP");
    let reloading = next(&sock).await;
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading}"
    );
    let done = next(&sock).await;
    assert!(
        done.lines().any(|l| l == "READY=1") && done.contains("reloaded"),
        "{done}"
    );

    // A broken file: refused, still READY=1, and the status says so.
    std::fs::write(&file, "[pool]\npool_size = \"many\"\n").unwrap();
    signal(pid, "-HUP");
    assert!(next(&sock).await.contains("RELOADING=1"));
    let refused = next(&sock).await;
    assert!(
        refused.lines().any(|l| l == "READY=1") && refused.contains("refused"),
        "{refused}"
    );
    c.simple_query("SELECT 1")
        .await
        .expect("the session survives both reloads");
    drop(c);

    signal(pid, "-TERM");
    let stopping = next(&sock).await;
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    let status = within(Duration::from_secs(15), child.wait()).await.unwrap();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn the_unit_is_type_notify_reloads_with_sighup_and_passes_systemd_analyze() {
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for want in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ExecStart=/usr/local/bin/pgvalve run -c /etc/pgvalve/pgvalve.toml",
        "RestartPreventExitStatus=64",
    ] {
        assert!(lines.contains(&want), "{want} in the unit");
    }
    // systemd's own check, with the binary at hand in place of the installed one.
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("pgvalve.service");
    std::fs::write(&local, unit.replace("/usr/local/bin/pgvalve", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&local)
        .output()
        .expect("systemd-analyze (Debian package systemd; .ci/run installs it)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );
}
