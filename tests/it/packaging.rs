//! The container setup, checked statically (docker is not available in CI): the compose
//! file's services, the pgvalve service's environment as pgvalve would read it, the one-shot
//! load test's arguments as `pgvalve loadtest` would parse them, and the Dockerfile's build.

use std::collections::BTreeMap;

use clap::Parser;
use pgvalve::config::{self, Overrides, PoolMode};
use yaml_rust2::{Yaml, YamlLoader};

fn repo_file(name: &str) -> String {
    std::fs::read_to_string(format!("{}/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .unwrap_or_else(|| panic!("a list: {y:?}"))
        .iter()
        .map(|v| match v {
            Yaml::String(s) => s.clone(),
            Yaml::Integer(i) => i.to_string(),
            other => panic!("not a string: {other:?}"),
        })
        .collect()
}

#[derive(Parser)]
struct Loadtest {
    #[command(flatten)]
    args: pgvalve::loadtest::Args,
}

#[test]
fn compose_file_and_dockerfile_are_consistent() {
    let doc = &YamlLoader::load_from_str(&repo_file("docker-compose.yml")).expect("valid YAML")[0];
    let services = &doc["services"];
    for s in ["postgres", "pgvalve", "loadtest"] {
        assert!(!services[s].is_badvalue(), "service {s}");
    }
    assert_eq!(services["pgvalve"]["build"].as_str(), Some("."));
    assert_eq!(services["loadtest"]["build"].as_str(), Some("."));

    // pgvalve's environment: every variable is one pgvalve reads, and together they are a
    // valid quick-start configuration.
    let env: BTreeMap<String, String> = services["pgvalve"]["environment"]
        .as_hash()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_string(), v.as_str().unwrap().to_string()))
        .collect();
    let main = repo_file("src/main.rs");
    for k in env.keys() {
        assert!(main.contains(&format!("env = \"{k}\"")), "{k} is not read by pgvalve");
    }
    let ov = Overrides {
        listen: env.get("PGVALVE_LISTEN").cloned(),
        upstream: env.get("PGVALVE_UPSTREAM").cloned(),
        pool_mode: env.get("PGVALVE_POOL_MODE").map(|m| match m.as_str() {
            "transaction" => PoolMode::Transaction,
            "session" => PoolMode::Session,
            other => panic!("pool mode {other}"),
        }),
        pool_size: env.get("PGVALVE_POOL_SIZE").map(|n| n.parse().unwrap()),
        max_client_connections: env.get("PGVALVE_MAX_CLIENT_CONNECTIONS").map(|n| n.parse().unwrap()),
        http_listen: env.get("PGVALVE_HTTP_LISTEN").cloned(),
        ..Default::default()
    };
    let c = config::load_with(None, &ov).expect("the compose environment is a valid configuration");
    assert_eq!(c.listen.port(), 6432);
    let ports = strings(&services["pgvalve"]["ports"]);
    assert!(ports.contains(&"6432:6432".to_string()) && ports.contains(&"9930:9930".to_string()));

    // The one-shot load test: its arguments parse and make a valid plan against pgvalve.
    let mut argv = vec!["pgvalve".to_string()];
    let cmd = strings(&services["loadtest"]["command"]);
    assert_eq!(cmd[0], "loadtest");
    argv.extend(cmd[1..].iter().cloned());
    let lt = Loadtest::try_parse_from(&argv).unwrap_or_else(|e| panic!("{e}"));
    let plan = lt.args.plan().unwrap();
    assert!(plan.target.contains("@pgvalve:6432/"), "{}", plan.target);
    assert!(lt
        .args
        .observe
        .as_deref()
        .is_some_and(|o| o.contains("@postgres:5432/")));

    // The Dockerfile builds the release binary and runs it; what it copies exists.
    let docker = repo_file("Dockerfile");
    assert!(docker.contains("cargo build --release --locked --bin pgvalve"));
    assert!(docker.contains("ENTRYPOINT [\"pgvalve\"]"));
    assert!(docker.contains("EXPOSE 6432 9930"));
    for line in docker
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            let path = format!("{}/{src}", env!("CARGO_MANIFEST_DIR"));
            assert!(std::path::Path::new(&path).exists(), "Dockerfile copies missing {src}");
        }
    }
}
