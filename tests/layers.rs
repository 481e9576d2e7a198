//! The module layers of README's "How it is built", checked against the code: every
//! `crate::<module>` path in a top-level module of src/ (test code aside) names a module of the
//! same layer or one below it, so dependencies run one way, the way the data flows.

use std::collections::BTreeMap;
use std::path::Path;

/// Bottom first; a module may use its own layer and those before it.
const LAYERS: &[&[&str]] = &[
    &["error", "shutdown", "lease"],
    &["protocol"],
    &["config"],
    &["tls", "observe"],
    &["admission", "server", "sessions", "dbgate", "cluster"],
    &["pool", "cancel"],
    &["reload", "locks", "notify"],
    &["client"],
    &["session_threads"],
    &["listener", "admin", "http", "takeover"],
    &["proxy"],
    // Beside the proxy: tools built on the library.
    &["testkit", "fuzzing"],
    &["demo", "loadtest", "import", "top", "check"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("src is readable").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The `crate::` module names a source text uses, test modules cut off.
fn used_modules(text: &str) -> Vec<String> {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    let mut used = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            used.extend(
                group
                    .split(',')
                    .map(|n| n.trim().split("::").next().unwrap_or("").to_string()),
            );
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            used.push(name);
        }
    }
    used
}

#[test]
fn every_module_uses_only_its_layer_and_the_layers_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).expect("under src");
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if ["lib.rs", "main.rs", "tests.rs"].contains(&name) || name.ends_with("_tests.rs") {
            continue;
        }
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or("");
        let top = top.trim_end_matches(".rs");
        let mine = layer_of(top).unwrap_or_else(|| panic!("src/{top} is in no layer: add it to LAYERS and the README"));
        let text = std::fs::read_to_string(&f).expect("readable source");
        for used in used_modules(&text) {
            if let Some(theirs) = layer_of(&used) {
                if theirs > mine {
                    wrong
                        .entry(rel.display().to_string())
                        .or_insert_with(Vec::new)
                        .push(used);
                }
            }
        }
    }
    assert!(wrong.is_empty(), "imports that run up the layers: {wrong:?}");
}

#[test]
fn the_reader_sees_paths_and_groups() {
    let used = used_modules("use crate::pool::PoolSet;\nuse crate::{config, error::PgError};\n/// [`crate::http`]");
    assert_eq!(used, ["pool", "config", "error", "http"]);
    let cut = used_modules("use crate::a;\n#[cfg(test)]\nmod tests {\n use crate::proxy;\n}");
    assert_eq!(cut, ["a"]);
}
