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

/// A compose service with YAML merge keys (`<<: *anchor`) resolved (yaml-rust2 keeps them
/// as a plain `<<` key).
fn merged(service: &Yaml) -> yaml_rust2::yaml::Hash {
    let mut out = service["<<"].as_hash().cloned().unwrap_or_default();
    for (k, v) in service.as_hash().unwrap() {
        if k.as_str() != Some("<<") {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// The three-replica example (profile "cluster"): every replica a valid quick start in
/// cluster mode with the same cluster name and budget, on its own host ports, and the
/// cluster load test spreads its clients over all three.
#[test]
fn compose_cluster_example_runs_three_replicas_with_one_budget() {
    let doc = &YamlLoader::load_from_str(&repo_file("docker-compose.yml")).expect("valid YAML")[0];
    let services = &doc["services"];
    let main = repo_file("src/main.rs");
    let mut host_ports = Vec::new();
    let mut clusters = Vec::new();
    for name in ["pgvalve-a", "pgvalve-b", "pgvalve-c"] {
        let s = Yaml::Hash(merged(&services[name]));
        assert_eq!(strings(&s["profiles"]), ["cluster"], "{name}");
        let env: BTreeMap<String, String> = s["environment"]
            .as_hash()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str().unwrap().to_string(), v.as_str().unwrap().to_string()))
            .collect();
        for k in env.keys() {
            // The cluster variables come with issue 23's cluster work.
            let cluster = ["PGVALVE_CLUSTER_NAME", "PGVALVE_CLUSTER_MAX_SERVER_CONNECTIONS"].contains(&k.as_str());
            assert!(
                main.contains(&format!("env = \"{k}\"")) || cluster,
                "{k} is not read by pgvalve"
            );
        }
        clusters.push((
            env["PGVALVE_CLUSTER_NAME"].clone(),
            env["PGVALVE_CLUSTER_MAX_SERVER_CONNECTIONS"].clone(),
        ));
        let ov = Overrides {
            listen: env.get("PGVALVE_LISTEN").cloned(),
            upstream: env.get("PGVALVE_UPSTREAM").cloned(),
            pool_mode: Some(PoolMode::Transaction),
            pool_size: env.get("PGVALVE_POOL_SIZE").map(|n| n.parse().unwrap()),
            http_listen: env.get("PGVALVE_HTTP_LISTEN").cloned(),
            ..Default::default()
        };
        config::load_with(None, &ov).unwrap_or_else(|e| panic!("{name}: {e}"));
        host_ports.extend(
            strings(&s["ports"])
                .into_iter()
                .map(|p| p.split(':').next().unwrap().to_string()),
        );
    }
    assert!(
        clusters.windows(2).all(|w| w[0] == w[1]),
        "one cluster, one budget: {clusters:?}"
    );
    let distinct: std::collections::BTreeSet<_> = host_ports.iter().collect();
    assert_eq!(distinct.len(), 6, "each replica on its own host ports: {host_ports:?}");

    let mut argv = vec!["pgvalve".to_string()];
    argv.extend(strings(&services["loadtest-cluster"]["command"]).into_iter().skip(1));
    let lt = Loadtest::try_parse_from(&argv).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(lt.args.target.len(), 3);
    let plan = lt.args.plan().unwrap();
    let targets: std::collections::BTreeSet<_> = plan.groups.iter().filter_map(|g| g.target.clone()).collect();
    assert_eq!(targets.len(), 3, "{targets:?}");
    assert!(["pgvalve-a", "pgvalve-b", "pgvalve-c"]
        .iter()
        .all(|h| targets.iter().any(|t| t.contains(&format!("@{h}:6432/")))));
    assert_eq!(plan.groups.iter().map(|g| g.clients).sum::<usize>(), 600);
}
