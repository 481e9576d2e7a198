//! The readers and the mapping of `pgvalve import` on small inputs; tests/it/import.rs runs
//! the binary on realistic files and serves clients with the result.

use super::ini::{conn_string, At};
use super::*;

fn at() -> At {
    At {
        file: "pgbouncer.ini".into(),
        line: 7,
    }
}

#[test]
fn connection_strings_with_quotes_and_escapes() {
    let p = conn_string("host=db1 port = 5433 password='it''s \\'x' dbname=app", &at()).unwrap();
    let want: Vec<(String, String)> = [
        ("host", "db1"),
        ("port", "5433"),
        ("password", "it's 'x"),
        ("dbname", "app"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(p, want);
    assert!(conn_string("", &at()).unwrap().is_empty());
    let e = conn_string("host=a password='open", &at()).unwrap_err().to_string();
    assert!(e.starts_with("pgbouncer.ini:7: ") && e.contains("password"), "{e}");
    let e = conn_string("host=a junk", &at()).unwrap_err().to_string();
    assert!(e.starts_with("pgbouncer.ini:7: ") && e.contains("junk"), "{e}");
}

fn run(ini: &str, users: &str) -> Result<Imported, ImportError> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pgbouncer.ini"), ini).unwrap();
    std::fs::write(dir.path().join("userlist.txt"), users).unwrap();
    import(
        &dir.path().join("pgbouncer.ini"),
        Some(&dir.path().join("userlist.txt")),
    )
}

#[test]
fn every_setting_is_mapped_or_noted_and_secrets_stay_out_of_notes() {
    let ini = "[databases]\napp = host=h user=forced password=hunter2\n[pgbouncer]\nlisten_port = 7000\nbogus_setting = 1\ntcp_keepalive = 1\n";
    let i = run(ini, "\"app\" \"pw\"\n").unwrap();
    let notes: Vec<String> = i.notes.iter().map(|n| n.to_string()).collect();
    for want in ["bogus_setting", "tcp_keepalive", "user=forced", "password=<secret>"] {
        assert!(notes.iter().any(|n| n.contains(want)), "{want} in {notes:#?}");
    }
    assert!(!notes.iter().any(|n| n.contains("hunter2")), "{notes:#?}");
    assert!(i.toml.contains("listen = \"127.0.0.1:7000\""), "{}", i.toml);
    i.check.unwrap();
}

#[test]
fn statement_mode_and_md5_users_are_told() {
    let users = "\"a\" \"pw\"\n\"b\" \"md5ab5e1f4e0c0d4e7a1e4b4d4f1c0a9b8c\"\n";
    // md5: the hash is kept as b's md5 verifier, and the note says what PostgreSQL then needs.
    let ini = "[databases]\n* = host=h\n[pgbouncer]\npool_mode = statement\nauth_type = md5\n";
    let i = run(ini, users).unwrap();
    let notes = i.notes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join("\n");
    assert!(
        notes.contains("pool_mode = statement") && notes.contains("md5 hash only: b"),
        "{notes}"
    );
    assert!(
        i.toml
            .contains("md5_verifier = \"md5ab5e1f4e0c0d4e7a1e4b4d4f1c0a9b8c\""),
        "{}",
        i.toml
    );
    assert!(i.toml.contains("auth_type = \"md5\""), "{}", i.toml);
    assert!(i.toml.contains("pool_mode = \"transaction\""));
    i.check.unwrap();
    // scram-sha-256: an md5 hash cannot serve, and is noted.
    let i = run(&ini.replace("auth_type = md5", "auth_type = scram-sha-256"), users).unwrap();
    let notes = i.notes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join("\n");
    assert!(notes.contains("user b (an md5 hash)"), "{notes}");
    assert!(!i.toml.contains("md5_verifier"), "{}", i.toml);
    i.check.unwrap();
}

#[test]
fn no_users_or_no_databases_is_an_error() {
    let e = run("[databases]\n* = host=h\n", "").unwrap_err().to_string();
    assert!(e.contains("--userlist"), "{e}");
    let e = run("[pgbouncer]\nlisten_port = 6432\n", "\"a\" \"b\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("[databases]"), "{e}");
}
