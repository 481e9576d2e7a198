use super::*;

const MINIMAL: &str = r#"
[databases.app]
port = 5433

[users.app]
password = "secret"
"#;

#[test]
fn minimal_config_validates_with_defaults() {
    let c = Config::validate(parse_toml("t", MINIMAL).unwrap(), "t").unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:6432");
    let r = c.route("app", "app").unwrap();
    assert_eq!((r.port, r.pool_size, r.server_dbname.as_str()), (5433, 20, "app"));
    assert!(c.route("other", "app").is_none());
    assert!(c.users["app"].client_verifier.is_some());
}

#[test]
fn unknown_field_names_file_line_and_field() {
    let text = "[pool]\npool_size = 5\nbogus = 1\n";
    let e = parse_toml("pgvalve.toml", text).unwrap_err().to_string();
    assert!(e.starts_with("pgvalve.toml:3:"), "{e}");
    assert!(e.contains("bogus"), "{e}");
    let e = parse_toml("f", "[databases.x]\nhots = \"a\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `hots`"), "{e}");
}

#[test]
fn durations_and_sizes_parse() {
    let text = format!("{MINIMAL}\n[proxy]\nmax_message_size = \"1MiB\"\nshutdown_timeout = \"1500ms\"\n");
    let c = Config::validate(parse_toml("t", &text).unwrap(), "t").unwrap();
    assert_eq!(c.proxy.max_message_size.0, 1 << 20);
    assert_eq!(c.proxy.shutdown_timeout.as_millis(), 1500);
    let bad = format!("{MINIMAL}\n[pool]\nquery_wait_timeout = \"soon\"\n");
    assert!(parse_toml("t", &bad).is_err());
}

#[test]
fn validation_errors_name_the_field() {
    let text = "[databases.app]\n[users.app]\n";
    let e = Config::validate(parse_toml("f", text).unwrap(), "f")
        .unwrap_err()
        .to_string();
    assert!(e.contains("users.app") && e.contains("neither password"), "{e}");
    let text = format!("{MINIMAL}\n[users.bob]\nscram_verifier = \"nope\"\n");
    let e = Config::validate(parse_toml("f", &text).unwrap(), "f")
        .unwrap_err()
        .to_string();
    assert!(e.contains("users.bob.scram_verifier"), "{e}");
    let text = format!("{MINIMAL}\n[proxy]\nlisten = \"here\"\n");
    let e = Config::validate(parse_toml("f", &text).unwrap(), "f")
        .unwrap_err()
        .to_string();
    assert!(e.contains("proxy.listen"), "{e}");
}

#[test]
fn verifier_roundtrip_and_redaction() {
    let v = ScramVerifier::from_password("pw");
    assert_eq!(v.iterations, 4096);
    assert!(!format!("{v:?}").contains(&STANDARD.encode(&v.stored_key)));
    let s = postgres_protocol::password::scram_sha_256(b"pw");
    assert!(s.parse::<ScramVerifier>().is_ok());
}

#[test]
fn quick_start_routes_any_database_to_upstream() {
    let ov = Overrides {
        upstream: Some("postgres://alice:s3cret@db.internal:5999".into()),
        pool_size: Some(7),
        ..Default::default()
    };
    let c = load_with(None, &ov).unwrap();
    let r = c.route("anything", "alice").unwrap();
    assert_eq!(
        (r.host.as_str(), r.port, r.server_dbname.as_str(), r.pool_size),
        ("db.internal", 5999, "anything", 7)
    );
    assert_eq!(c.users["alice"].server_password, Some(Secret("s3cret".into())));
    assert!(!format!("{c:?}").contains("s3cret"));
    assert_eq!(
        c.admin.admin_users,
        vec!["alice".to_string()],
        "the upstream user is the console admin"
    );
}

fn parse_and_validate(text: &str) -> Result<Config, ConfigError> {
    Config::validate(parse_toml("t", text)?, "t")
}

#[test]
fn console_users_must_exist_and_http_listen_must_parse() {
    let e = parse_and_validate(&format!("{MINIMAL}\n[admin]\nadmin_users = [\"ghost\"]\n")).unwrap_err();
    assert!(
        e.to_string().contains("admin.admin_users") && e.to_string().contains("ghost"),
        "{e}"
    );
    let e = parse_and_validate(&format!("{MINIMAL}\n[http]\nlisten = \"nowhere\"\n")).unwrap_err();
    assert!(e.to_string().contains("http.listen"), "{e}");
    let e = parse_and_validate(&format!("{MINIMAL}\n[admission]\nweight = 0\n")).unwrap_err();
    assert!(e.to_string().contains("admission.weight"), "{e}");
}

#[test]
fn headroom_is_connections_or_a_percentage() {
    let c = parse_and_validate(MINIMAL).unwrap();
    assert_eq!(c.admission.headroom, Headroom::Percent(10), "on by default");
    for (text, want) in [
        ("0", Headroom::Connections(0)),
        ("3", Headroom::Connections(3)),
        ("\"3\"", Headroom::Connections(3)),
        ("\"25%\"", Headroom::Percent(25)),
    ] {
        let c = parse_and_validate(&format!("{MINIMAL}\n[admission]\nheadroom = {text}\n")).unwrap();
        assert_eq!(c.admission.headroom, want, "{text}");
    }
    let rule = "[[identity]]\nname = \"batch\"\napplication_name = \"batch*\"\nheadroom = 0\n";
    let c = parse_and_validate(&format!("{MINIMAL}\n{rule}")).unwrap();
    assert_eq!(c.identities[0].limits.headroom, Some(Headroom::Connections(0)));
    let e = parse_and_validate(&format!("{MINIMAL}\n[admission]\nheadroom = \"60%\"\n")).unwrap_err();
    assert!(e.to_string().contains("admission.headroom"), "{e}");
    let e = parse_and_validate(&format!("{MINIMAL}\n[admission]\nheadroom = \"lots\"\n")).unwrap_err();
    assert!(e.to_string().contains("invalid headroom"), "{e}");
    let ov = Overrides {
        upstream: Some("postgres://alice:s3cret@db.internal:5999".into()),
        headroom: Some("0".parse().unwrap()),
        ..Default::default()
    };
    assert_eq!(
        load_with(None, &ov).unwrap().admission.headroom,
        Headroom::Connections(0),
        "--headroom 0"
    );
}

#[test]
fn example_config_parses() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/pgvalve.toml");
    let c = load(Path::new(path)).unwrap();
    assert!(!c.databases.is_empty());
}

#[test]
fn identity_rules_parse_and_bad_ranges_name_the_rule() {
    let text = format!("{MINIMAL}\n[[identity]]\nname = \"app:{{application_name}}\"\napplication_name = \"web-*\"\n\n[[identity]]\nname = \"office\"\nsource = \"192.168.0.0/16\"\n");
    let c = Config::validate(parse_toml("t", &text).unwrap(), "t").unwrap();
    assert_eq!(c.identities.len(), 2);
    let bad = format!("{MINIMAL}\n[[identity]]\nname = \"x\"\nsource = \"10.0.0.0/40\"\n");
    let e = Config::validate(parse_toml("t", &bad).unwrap(), "t")
        .unwrap_err()
        .to_string();
    assert!(e.contains("identity[0].source"), "{e}");
    let unknown = format!("{MINIMAL}\n[[identity]]\nname = \"x\"\nsrc = \"10.0.0.0/8\"\n");
    assert!(parse_toml("t", &unknown).is_err());
}

#[test]
fn session_threads_apply_only_while_every_pool_is_in_session_mode() {
    let parse = |extra: &str| Config::validate(parse_toml("t", &format!("{MINIMAL}\n{extra}")).unwrap(), "t").unwrap();
    let c = parse("");
    assert!(c.all_session_mode());
    assert_eq!(c.proxy.session_threads, None);
    let c = parse("[proxy]\nsession_threads = 3\n");
    assert_eq!(c.proxy.session_threads, Some(3));
    assert!(!parse("[pool]\npool_mode = \"transaction\"\n").all_session_mode());
    let db = MINIMAL.replace("port = 5433", "port = 5433\npool_mode = \"transaction\"");
    let c = Config::validate(parse_toml("t", &db).unwrap(), "t").unwrap();
    assert!(!c.all_session_mode(), "a database in transaction mode");
    let user = MINIMAL.replace(
        "password = \"secret\"",
        "password = \"secret\"\npool_mode = \"transaction\"",
    );
    let c = Config::validate(parse_toml("t", &user).unwrap(), "t").unwrap();
    assert!(!c.all_session_mode(), "a user in transaction mode");
}

#[test]
fn config_errors_are_the_operators_config_file_errors() {
    let read = load(Path::new("/nonexistent/pgvalve.toml")).unwrap_err();
    let parse = parse_toml("t", "[pool]\nbogus = 1\n").unwrap_err();
    let invalid = parse_and_validate(&format!("{MINIMAL}\n[http]\nlisten = \"nowhere\"\n")).unwrap_err();
    let ov = Overrides {
        upstream: Some("postgres://u@h:notaport/db".into()),
        ..Default::default()
    };
    let upstream = load_with(None, &ov).unwrap_err();
    assert!(matches!(read, ConfigError::Read { .. }), "{read}");
    assert!(matches!(parse, ConfigError::Parse { .. }), "{parse}");
    assert!(matches!(invalid, ConfigError::Invalid { .. }), "{invalid}");
    assert!(matches!(upstream, ConfigError::Upstream { .. }), "{upstream}");
    for e in [read, parse, invalid, upstream] {
        assert_eq!((e.side(), e.sqlstate()), (Side::Config, "F0000"), "{e}");
    }
}

#[test]
fn typed_causes_read_as_before() {
    let e = parse_toml("f", "[databases.x]\nhots = \"a\"\n").unwrap_err();
    assert!(e.to_string().starts_with("f:2:1: unknown field `hots`"), "{e}");
    assert!(std::error::Error::source(&e).is_some());
    let ov = Overrides {
        upstream: Some("postgres://u@h:notaport/db".into()),
        ..Default::default()
    };
    let e = load_with(None, &ov).unwrap_err().to_string();
    assert!(e.starts_with("command line: upstream: not a postgres:// URL: "), "{e}");
}
