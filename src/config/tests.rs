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
fn session_threads_default_to_none() {
    let parse = |extra: &str| Config::validate(parse_toml("t", &format!("{MINIMAL}\n{extra}")).unwrap(), "t").unwrap();
    assert_eq!(parse("").proxy.session_threads, None);
    assert_eq!(parse("[proxy]\nsession_threads = 3\n").proxy.session_threads, Some(3));
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

#[test]
fn proxy_protocol_trusted_parses_ranges_and_refuses_bad_ones() {
    let text = format!("{MINIMAL}\n[proxy]\nproxy_protocol_trusted = [\"10.0.0.0/8\", \"fd00::/8\", \"192.0.2.7\"]\n");
    let c = Config::validate(parse_toml("t", &text).unwrap(), "t").unwrap();
    let t = &c.proxy.proxy_protocol_trusted;
    assert!(t.contains("10.1.2.3".parse().unwrap()) && t.contains("::ffff:10.9.9.9".parse().unwrap()));
    assert!(t.contains("fd00::5".parse().unwrap()) && t.contains("192.0.2.7".parse().unwrap()));
    assert!(!t.contains("192.0.2.8".parse().unwrap()) && !t.contains("11.0.0.1".parse().unwrap()));
    assert_eq!(t.to_string(), "10.0.0.0/8,fd00::/8,192.0.2.7/32");
    let bad = format!("{MINIMAL}\n[proxy]\nproxy_protocol_trusted = [\"10.0.0.0/33\"]\n");
    let e = parse_toml("f", &bad).unwrap_err().to_string();
    assert!(e.starts_with("f:9:") && e.contains("prefix length 33"), "{e}");
    assert!(
        Config::default_settings().proxy.proxy_protocol_trusted.is_empty(),
        "off by default"
    );
    // The command line's comma-separated form overrides the file's.
    let ov = Overrides {
        proxy_protocol_trusted: Some("127.0.0.1, 10.0.0.0/8".parse().unwrap()),
        ..Default::default()
    };
    let f = apply_overrides(parse_toml("t", MINIMAL).unwrap(), &ov, "t").unwrap();
    assert_eq!(f.proxy.proxy_protocol_trusted.to_string(), "127.0.0.1/32,10.0.0.0/8");
    assert!("ten/8".parse::<Cidrs>().is_err());
}

#[test]
fn track_parameters_must_be_parameter_names() {
    let ok = parse_and_validate(&format!(
        "[pool]\ntrack_parameters = [\"statement_timeout\", \"app.tenant_id\"]\n{MINIMAL}"
    ))
    .expect("valid");
    assert_eq!(ok.pool.track_parameters, ["statement_timeout", "app.tenant_id"]);
    for bad in ["x y", "a.b.c", "", "1abc", "a;b", ".x"] {
        let e = parse_and_validate(&format!("[pool]\ntrack_parameters = [{bad:?}]\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pool.track_parameters"), "{bad}: {e}");
    }
}

#[test]
fn http_auth_takes_a_user_with_a_password_or_a_long_token() {
    let parse = |extra: &str| Config::validate(parse_toml("t", &format!("{MINIMAL}\n[http]\n{extra}")).unwrap(), "t");
    assert!(parse("").unwrap().http_auth.is_none());
    let c = parse("auth_user = \"ops\"\nauth_password = \"pw\"\n").unwrap();
    assert_eq!(c.http_auth.basic.as_ref().map(|b| b.0.as_str()), Some("ops"));
    let c = parse("auth_token = \"0123456789abcdef\"\n").unwrap();
    assert!(c.http_auth.token.is_some());
    let e = parse("auth_user = \"ops\"\n").unwrap_err().to_string();
    assert!(e.contains("http.auth_user"), "{e}");
    let e = parse("auth_token = \"short\"\n").unwrap_err().to_string();
    assert!(e.contains("http.auth_token"), "{e}");
    assert!(!format!(
        "{:?}",
        parse("auth_user = \"o\"\nauth_password = \"hunter2\"\n")
            .unwrap()
            .http_auth
    )
    .contains("hunter2"));
}

#[test]
fn cluster_settings_parse_validate_and_come_from_flags() {
    assert!(
        parse_and_validate(MINIMAL).unwrap().cluster.is_none(),
        "no [cluster]: none"
    );
    let c = parse_and_validate(&format!(
        "{MINIMAL}\n[cluster]\nname = \"shop\"\nmax_server_connections = 20\nrebalance_interval = \"50ms\"\n"
    ))
    .unwrap();
    let cl = c.cluster.unwrap();
    assert_eq!((cl.name.as_str(), cl.max_server_connections), ("shop", 20));
    assert_eq!(cl.rebalance_interval, std::time::Duration::from_millis(50));
    assert!(cl.lock_class() > 0);
    for (extra, field) in [
        ("name = \"\"\nmax_server_connections = 20", "cluster.name"),
        (
            "name = \"x\"\nmax_server_connections = 1",
            "cluster.max_server_connections",
        ),
        (
            "name = \"x\"\nmax_server_connections = 20\nuser = \"nobody\"",
            "cluster.user",
        ),
        (
            "name = \"x\"\nmax_server_connections = 20\ndatabase = \"nope\"",
            "cluster.database",
        ),
        (
            "name = \"x\"\nmax_server_connections = 20\ntakeover_delay = \"100ms\"",
            "cluster.takeover_delay",
        ),
        (
            "name = \"x\"\nmax_server_connections = 20\nadvertise = \"0.0.0.0:6432\"",
            "cluster.advertise",
        ),
        (
            "name = \"x\"\nmax_server_connections = 20\nadvertise = \"10.0.0.7\"",
            "cluster.advertise",
        ),
    ] {
        let e = parse_and_validate(&format!("{MINIMAL}\n[cluster]\n{extra}\n")).unwrap_err();
        assert!(e.to_string().contains(field), "{e}");
    }
    assert!(parse_toml("t", "[cluster]\nname = \"x\"\nmax_server_connections = 5\nsize = 3\n").is_err());
    let ov = Overrides {
        upstream: Some("postgres://alice:s3cret@db.internal:5999".into()),
        cluster_name: Some("pods".into()),
        cluster_max_server_connections: Some(40),
        ..Default::default()
    };
    let cl = load_with(None, &ov).unwrap().cluster.unwrap();
    assert_eq!((cl.name.as_str(), cl.max_server_connections), ("pods", 40));
    assert_eq!(cl.advertise, None);
    let pod = Overrides {
        cluster_advertise: Some("10.244.1.7:6432".into()),
        ..ov.clone()
    };
    let cl = load_with(None, &pod).unwrap().cluster.unwrap();
    assert_eq!(cl.advertise.as_deref(), Some("10.244.1.7:6432"));
    let half = Overrides {
        cluster_name: Some("pods".into()),
        ..ov
    };
    let half = Overrides {
        cluster_max_server_connections: None,
        ..half
    };
    assert!(load_with(None, &half).unwrap_err().to_string().contains("go together"));
}

#[test]
fn a_cluster_wide_identity_cap_needs_a_cluster_and_fits_its_budget() {
    let rule = |n: u32| {
        format!("\n[[identity]]\nname = \"web\"\napplication_name = \"web\"\ncluster_max_server_connections = {n}\n")
    };
    let cluster = "\n[cluster]\nname = \"shop\"\nmax_server_connections = 20\n";
    let c = parse_and_validate(&format!("{MINIMAL}{cluster}{}", rule(5))).unwrap();
    assert_eq!(c.identities[0].limits.cluster_max_server_connections, Some(5));
    for (text, why) in [
        (format!("{MINIMAL}{}", rule(5)), "needs a [cluster]"),
        (format!("{MINIMAL}{cluster}{}", rule(20)), "below the cluster's"),
        (format!("{MINIMAL}{cluster}{}", rule(0)), "must be 1 to 255"),
    ] {
        let e = parse_and_validate(&text).unwrap_err().to_string();
        assert!(
            e.contains("identity[0].cluster_max_server_connections") && e.contains(why),
            "{e}"
        );
    }
}

#[test]
fn max_server_connections_is_a_number_auto_or_a_percentage() {
    let parse = |v: &str| parse_toml("t", &format!("{MINIMAL}\n[pool]\nmax_server_connections = {v}\n"));
    let cap = |v: &str| parse(v).unwrap().pool.max_server_connections;
    assert_eq!(cap("90"), ServerCap::Connections(90));
    assert_eq!(cap("0"), ServerCap::Connections(0));
    assert_eq!(cap("\"auto\""), ServerCap::Auto);
    assert_eq!(cap("\"80%\""), ServerCap::Percent(80));
    assert_eq!(cap("\"100%\""), ServerCap::Percent(100));
    assert_eq!(
        FileConfig::default().pool.max_server_connections,
        ServerCap::Connections(100)
    );
    for bad in ["\"0%\"", "\"101%\"", "\"lots\"", "-1", "true", "\"80 %%\""] {
        let e = parse(bad).unwrap_err().to_string();
        assert!(
            e.starts_with("t:9:") && e.contains("max_server_connections"),
            "{bad}: {e}"
        );
    }
    // A number is in force as written; "auto" waits to be sized from PostgreSQL.
    let c = Config::validate(parse("42").unwrap(), "t").unwrap();
    assert_eq!(
        (c.max_server_connections(), c.server_budget.unwrap().source.as_str()),
        (42, "config")
    );
    let c = Config::validate(parse("\"auto\"").unwrap(), "t").unwrap();
    assert!(c.server_budget.is_none());
    // The command line takes the same forms.
    let ov = Overrides {
        max_server_connections: Some("50%".parse().unwrap()),
        ..Default::default()
    };
    let f = apply_overrides(parse_toml("t", MINIMAL).unwrap(), &ov, "t").unwrap();
    assert_eq!(f.pool.max_server_connections, ServerCap::Percent(50));
}

#[test]
fn auto_and_percentages_size_from_postgres_limits() {
    let pg = |max, su, reserved| PgLimits {
        server: "pg:5432".into(),
        max_connections: max,
        superuser_reserved_connections: su,
        reserved_connections: reserved,
    };
    assert_eq!(ServerCap::Auto.of(&pg(100, 3, 0)), 97);
    assert_eq!(ServerCap::Auto.of(&pg(100, 3, 5)), 92);
    assert_eq!(ServerCap::Percent(80).of(&pg(100, 3, 0)), 77); // 77.6 rounded down
    assert_eq!(ServerCap::Percent(50).of(&pg(20, 3, 0)), 8);
    assert_eq!(ServerCap::Percent(100).of(&pg(20, 3, 0)), 17);
    // Never 0 (which would mean no cap).
    assert_eq!(ServerCap::Percent(1).of(&pg(20, 3, 0)), 1);
    assert_eq!(ServerCap::Auto.of(&pg(3, 3, 0)), 1);
    assert_eq!(ServerCap::Connections(90).of(&pg(20, 3, 0)), 90);
    let b = ServerCap::Percent(50).sized(&pg(20, 3, 0));
    assert_eq!(b.max, 8);
    assert_eq!(
        b.source,
        "50% of max_connections 20 - superuser_reserved_connections 3 - reserved_connections 0 = 17 (pg:5432), rounded down"
    );
}
