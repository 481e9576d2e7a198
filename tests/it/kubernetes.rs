//! deploy/kubernetes/: every manifest passes an offline schema validator (kubernetes-validate
//! from PyPI, strict; the ServiceMonitor against the vendored CRD schema, see
//! tests/deploy/validate_k8s.py), and a broken copy does not; the manifests fit together
//! (selectors, ports, probes), every PGVALVE_* variable is one pgvalve reads, the sidecar's
//! environment and the ConfigMap's pgvalve.toml are valid configurations, and the probes'
//! endpoints answer 200 on a pgvalve started from that ConfigMap in front of a real PostgreSQL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use pgvalve::config::{self, Config, Overrides, PoolMode};
use pgvalve::testkit::{PgOptions, TestPostgres};
use pgvalve::ProxyHandle;
use yaml_rust2::{Yaml, YamlLoader};

use crate::admission::http_get;
use crate::compat::pip_install;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");

/// Issue 23's cluster flags, added to src/main.rs by the cluster work; until they are there,
/// the manifests may name them anyway.
const CLUSTER_VARS: [&str; 2] = ["PGVALVE_CLUSTER_NAME", "PGVALVE_CLUSTER_MAX_SERVER_CONNECTIONS"];

/// A venv with kubernetes-validate (pinned: its bundled schemas are the contract).
fn validator_python() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/deploy-venv");
    let python = dir.join("bin/python");
    let marker = dir.join(".ready-kubernetes-validate-1.37.0");
    if !marker.exists() {
        let made = Command::new("python3").args(["-m", "venv"]).arg(&dir).status();
        assert!(
            made.is_ok_and(|s| s.success()),
            "python3 -m venv failed: install python3 with the venv module"
        );
    }
    pip_install(&python, &marker, &["kubernetes-validate==1.37.0"]);
    python
}

/// Runs the validator on `dir`: (success, resources validated, stderr).
fn validate(python: &Path, dir: &Path) -> (bool, Vec<serde_json::Value>, String) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/deploy/validate_k8s.py");
    let out = Command::new(python).arg(script).arg(dir).output().unwrap();
    let found = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (
        out.status.success(),
        found,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_kubernetes_manifests_pass_a_strict_offline_schema_validator() {
    let python = validator_python();
    let (ok, found, err) = validate(&python, Path::new(DIR));
    assert!(ok, "{err}");
    let kinds: Vec<(String, String)> = found
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_string(),
                r["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (kind, name) in [
        ("Deployment", "django-web"),
        ("Deployment", "pgvalve"),
        ("Service", "pgvalve"),
        ("PodDisruptionBudget", "pgvalve"),
        ("ConfigMap", "pgvalve-config"),
        ("ServiceMonitor", "pgvalve"),
    ] {
        assert!(
            kinds.contains(&(kind.into(), name.into())),
            "{kind}/{name} in {kinds:?}"
        );
    }
    let sm = found.iter().find(|r| r["kind"] == "ServiceMonitor").unwrap();
    assert_eq!(sm["schema"], "CRD monitoring.coreos.com/v1");

    // The validator validates: a wrong type and an unknown field are refused, named.
    let bad = tempfile::tempdir().unwrap();
    std::fs::create_dir(bad.path().join("schemas")).unwrap();
    for f in std::fs::read_dir(Path::new(DIR).join("schemas")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, bad.path().join("schemas").join(f.file_name().unwrap())).unwrap();
    }
    let read = |f: &str| std::fs::read_to_string(Path::new(DIR).join(f)).unwrap();
    std::fs::write(
        bad.path().join("sm.yaml"),
        read("servicemonitor.yaml").replace("- port: metrics", "- prot: metrics"),
    )
    .unwrap();
    std::fs::write(
        bad.path().join("st.yaml"),
        read("pgvalve-standalone.yaml").replace("replicas: 3", "replicas: three"),
    )
    .unwrap();
    let (ok, _, err) = validate(&python, bad.path());
    assert!(!ok);
    assert!(
        err.contains("'prot' was unexpected") && err.contains("spec/replicas"),
        "{err}"
    );
}

fn docs(file: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&std::fs::read_to_string(Path::new(DIR).join(file)).unwrap()).unwrap()
}

fn find<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("a {kind}"))
}

fn labels(y: &Yaml) -> BTreeMap<String, String> {
    y.as_hash()
        .map(|h| {
            h.iter()
                .map(|(k, v)| (k.as_str().unwrap().to_string(), v.as_str().unwrap().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// `selector` matches `pod_labels` (every key equal).
fn selects(selector: &Yaml, pod_labels: &BTreeMap<String, String>) -> bool {
    let s = labels(selector);
    !s.is_empty() && s.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
}

/// A container's environment (plain values only; secret references as "<secret>").
fn env(c: &Yaml) -> BTreeMap<String, String> {
    c["env"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|e| {
            let v = e["value"].as_str().unwrap_or("<secret>").to_string();
            (e["name"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

/// The probes of a pgvalve container: liveness on /healthz, readiness on /readyz, on the
/// named port of [http] listen.
fn pgvalve_container_fits(c: &Yaml) {
    let main = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/main.rs")).unwrap();
    let vars = env(c);
    for k in vars.keys() {
        // A variable only substituted into another one (`$(POD_IP)`) is Kubernetes's.
        let substituted = vars.values().any(|v| v.contains(&format!("$({k})")));
        assert!(
            main.contains(&format!("env = \"{k}\"")) || CLUSTER_VARS.contains(&k.as_str()) || substituted,
            "{k} is not read by pgvalve"
        );
    }
    assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    let port = c["readinessProbe"]["httpGet"]["port"].as_str().unwrap();
    let ports = c["ports"].as_vec().unwrap();
    let p = ports.iter().find(|p| p["name"].as_str() == Some(port)).unwrap();
    assert_eq!(p["containerPort"].as_i64(), Some(9930));
}

#[test]
fn the_standalone_manifests_fit_together_and_the_sidecar_is_a_valid_quick_start() {
    let st = docs("pgvalve-standalone.yaml");
    let deploy = find(&st, "Deployment");
    let pod = labels(&deploy["spec"]["template"]["metadata"]["labels"]);
    assert!(selects(&deploy["spec"]["selector"]["matchLabels"], &pod));
    assert!(selects(&find(&st, "Service")["spec"]["selector"], &pod));
    assert!(selects(
        &find(&st, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        &pod
    ));
    assert!(
        deploy["spec"]["replicas"].as_i64().unwrap()
            > find(&st, "PodDisruptionBudget")["spec"]["minAvailable"]
                .as_i64()
                .unwrap()
    );
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    pgvalve_container_fits(c);
    let e = env(c);
    assert!(e.contains_key("PGVALVE_CLUSTER_NAME") && e.contains_key("PGVALVE_CLUSTER_MAX_SERVER_CONNECTIONS"));
    // The ServiceMonitor scrapes the Service's metrics port.
    let service = find(&st, "Service");
    let sm = &docs("servicemonitor.yaml")[0];
    assert!(selects(
        &sm["spec"]["selector"]["matchLabels"],
        &labels(&service["metadata"]["labels"])
    ));
    let port = sm["spec"]["endpoints"][0]["port"].as_str().unwrap();
    assert!(service["spec"]["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .any(|p| p["name"].as_str() == Some(port)));

    // The sidecar: a native sidecar whose environment is a valid quick start.
    let dj = docs("django-sidecar.yaml");
    let spec = &find(&dj, "Deployment")["spec"]["template"]["spec"];
    let side = &spec["initContainers"][0];
    assert_eq!(side["restartPolicy"].as_str(), Some("Always"));
    pgvalve_container_fits(side);
    let e = env(side);
    assert!(e.contains_key("PGVALVE_CLUSTER_NAME") && e.contains_key("PGVALVE_CLUSTER_MAX_SERVER_CONNECTIONS"));
    let secret = find(&dj, "Secret");
    let ov = Overrides {
        listen: e.get("PGVALVE_LISTEN").cloned(),
        upstream: secret["stringData"]["upstream"].as_str().map(String::from),
        pool_mode: (e.get("PGVALVE_POOL_MODE").map(String::as_str) == Some("transaction"))
            .then_some(PoolMode::Transaction),
        pool_size: e.get("PGVALVE_POOL_SIZE").map(|n| n.parse().unwrap()),
        http_listen: e.get("PGVALVE_HTTP_LISTEN").cloned(),
        ..Default::default()
    };
    let c = config::load_with(None, &ov).expect("the sidecar's environment is a valid configuration");
    assert_eq!(
        (c.listen.to_string().as_str(), c.pool.pool_mode),
        ("127.0.0.1:6432", PoolMode::Transaction)
    );
    // Django reaches the sidecar where it listens.
    let url = secret["stringData"]["database-url"].as_str().unwrap();
    assert!(url.contains("@127.0.0.1:6432/"), "{url}");
}

/// The ConfigMap's pgvalve.toml, pointed at a real PostgreSQL: the probes' endpoints answer
/// 200 (/healthz: up; /readyz: accepting clients and PostgreSQL reachable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configmap_config_serves_the_probes() {
    let st = docs("pgvalve-standalone.yaml");
    let toml = find(&st, "ConfigMap")["data"]["pgvalve.toml"]
        .as_str()
        .unwrap()
        .to_string();
    let mut f = config::parse_toml("pgvalve-config", &toml).unwrap();
    Config::validate(f.clone(), "pgvalve-config").expect("the ConfigMap holds a valid configuration");
    assert_eq!(f.proxy.listen, "0.0.0.0:6432");
    assert_eq!(f.http.listen.as_deref(), Some("0.0.0.0:9930"));

    let pg = TestPostgres::start(PgOptions {
        password: "change-me".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    f.proxy.listen = "127.0.0.1:0".into();
    f.http.listen = Some("127.0.0.1:0".into());
    let db = f.databases.get_mut("app").unwrap();
    db.host = "127.0.0.1".into();
    db.port = pg.port();
    let proxy = ProxyHandle::start(Config::validate(f, "pgvalve-config").unwrap())
        .await
        .unwrap();
    let http = proxy.http_addr().unwrap();
    assert!(http_get(http, "/healthz").await.0.contains("200"));
    let (status, body) = http_get(http, "/readyz").await;
    assert!(status.contains("200"), "{status} {body}");
    proxy.shutdown().await;
}
