//! No config key is accepted and then ignored: every key of
//! `configs/defaults.yaml` is either read by tessera (its name appears in the
//! code or the model files) or has a status in `config::support::KEYS`
//! (refused, or of no effect with a reason); a refused key set to another
//! value than its default is an error naming the key and where it was set;
//! `docs/config-keys.md` is the table of those statuses.

use serde_json::Value;
use std::path::{Path, PathBuf};
use tessera_compiler::config::{self, support};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every declared leaf key (a map's keys are walked; an empty map, a list,
/// a scalar or an open map is a leaf).
fn leaves() -> Vec<Vec<String>> {
    fn walk(node: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match node {
            Value::Object(m) if !m.is_empty() && path.join(".") != "MODEL.AMP_PARAMS.AMP_ARGS" => {
                for (k, v) in m {
                    path.push(k.clone());
                    walk(v, path, out);
                    path.pop();
                }
            }
            _ => out.push(path.clone()),
        }
    }
    let mut out = Vec::new();
    walk(config::defaults(), &mut Vec::new(), &mut out);
    out
}

/// The text of the code that reads configs: the crates' sources (not their
/// tests, nor the status table itself) and the model files.
fn readers() -> String {
    fn walk(dir: &Path, out: &mut String) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                if !matches!(name.as_str(), "tests" | "target" | "snapshots") {
                    walk(&p, out);
                }
            } else if (name.ends_with(".rs") && name != "support.rs") || name.ends_with(".tsr") {
                out.push_str(&std::fs::read_to_string(&p).unwrap());
                out.push('\n');
            }
        }
    }
    let mut s = String::new();
    for d in ["compiler/src", "engine/src", "data/src", "runtime/src", "plan/src", "src", "models"] {
        walk(&root().join(d), &mut s);
    }
    s
}

/// Whether the code names `key`: its dotted path, its JSON-pointer path, or
/// its last segment as a string or a field (`"IMAGE_SIZE"`, `cfg.X.IMAGE_SIZE`).
fn is_read(code: &str, key: &[String]) -> bool {
    let last = key.last().unwrap();
    code.contains(&key.join("."))
        || code.contains(&format!("/{}", key.join("/")))
        || code.contains(&format!("\"{last}\""))
        || code.contains(&format!(".{last}\""))
        || code.contains(&format!("/{last}\""))
        || code.contains(&format!(".{last}"))
}

#[test]
fn every_key_has_a_status() {
    let code = readers();
    let keys = leaves();
    assert!(keys.len() > 250, "{} keys", keys.len());
    let mut unread = Vec::new();
    for key in &keys {
        let segments: Vec<&str> = key.iter().map(String::as_str).collect();
        if support::status(&segments).is_none() && !is_read(&code, key) {
            unread.push(key.join("."));
        }
    }
    assert!(
        unread.is_empty(),
        "these keys of defaults.yaml are not read anywhere and have no status in config/support.rs \
         (honour them, or refuse them there): {unread:?}"
    );
    // No status is left over from a key that no longer exists.
    for (pattern, _) in support::KEYS {
        let matched = keys.iter().any(|k| {
            let segments: Vec<&str> = k.iter().map(String::as_str).collect();
            support::status(&segments).is_some_and(|(p, _)| p == *pattern)
        });
        assert!(matched, "`{pattern}` in config/support.rs matches no key of defaults.yaml");
    }
}

#[test]
fn the_docs_table_is_current() {
    let path = root().join("docs/config-keys.md");
    let table = support::table();
    if std::env::var_os("TESSERA_BLESS").is_some() {
        std::fs::write(&path, &table).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(on_disk == table, "docs/config-keys.md is out of date: rerun with TESSERA_BLESS=1");
}

#[test]
fn a_refused_key_set_away_from_its_default_is_an_error_naming_it() {
    let load =
        |ovs: &[&str]| config::load("quickstart/vit_tiny", &ovs.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let e = load(&["HOOKS.CHECK_NAN=false"]).unwrap_err().to_string();
    assert!(e.contains("`HOOKS.CHECK_NAN`") && e.contains("in override `HOOKS.CHECK_NAN=false`"), "{e}");
    assert!(e.contains("non-finite loss") && e.contains("default true"), "{e}");
    // Its default, or a key of no effect, is fine.
    load(&["HOOKS.CHECK_NAN=true", "MULTI_PROCESSING_METHOD=spawn", "SLURM.MEM_GB=10"]).unwrap();
    // Every one found at once; a wildcard pattern names the key itself.
    let e = load(&["OPTIMIZER.use_larc=true", "DATA.TEST.BASE_DATASET=other", "SLURM.USE_SLURM=true"])
        .unwrap_err()
        .to_string();
    for key in ["OPTIMIZER.use_larc", "DATA.TEST.BASE_DATASET", "SLURM.USE_SLURM"] {
        assert!(e.contains(&format!("`{key}`")), "{key}: {e}");
    }
    assert!(e.starts_with("3 config errors"), "{e}");
}

#[test]
fn a_refused_key_in_a_file_is_named_with_its_line() {
    let dir = std::env::temp_dir().join(format!("tessera-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.yaml");
    std::fs::write(&file, "config:\n  OPTIMIZER:\n    name: sgd\n    use_zero: true\n").unwrap();
    let e = config::load(file.to_str().unwrap(), &[]).unwrap_err().to_string();
    assert!(e.contains("`OPTIMIZER.use_zero`") && e.contains("c.yaml:4"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hydra_keys_that_would_change_the_run_are_refused() {
    let dir = std::env::temp_dir().join(format!("tessera-hydra-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("defaults:\n  - base\n", Some("`defaults:` list is not supported")),
        ("defaults:\n  - _self_\n", None),
        ("hydra:\n  run:\n    dir: out\n", Some("`hydra:` settings are not supported")),
        ("engine_name: extract_features\n", Some("`engine_name: string \"extract_features\"` is not supported")),
        ("engine_name: train\n", None),
    ];
    for (i, (top, want)) in cases.iter().enumerate() {
        let file = dir.join(format!("c{i}.yaml"));
        std::fs::write(&file, format!("{top}config:\n  SEED_VALUE: 3\n")).unwrap();
        let got = config::load(file.to_str().unwrap(), &[]);
        match want {
            Some(w) => {
                let e = got.unwrap_err().to_string();
                assert!(e.contains(w) && e.contains(&format!("c{i}.yaml")), "{top}: {e}");
            }
            None => assert_eq!(got.unwrap().get("SEED_VALUE").unwrap(), 3, "{top}"),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
