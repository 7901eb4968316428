//! Property test: loading an experiment config never panics and never
//! recurses without bound, whatever the file holds (issue 15). Inputs are
//! random bytes and edits of shipped configs (bit flips, truncation,
//! inserted and deleted bytes, spliced YAML syntax: anchors and aliases,
//! deep flow nesting, tags, huge numbers). Every rejection names the file.
//! `TESSERA_FUZZ_CASES=N` runs N cases per property (default 400).

#[path = "../../tests/fuzz/mutate.rs"]
mod mutate;

use mutate::{apply, cases, edits};
use proptest::prelude::*;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use tessera_compiler::config;

const CONFIGS: &[&str] = &[
    include_str!("../../configs/quickstart/vit_tiny.yaml"),
    include_str!("../../configs/quickstart/swav_vit_tiny.yaml"),
    include_str!("../../configs/quickstart/deit_tiny_distilled.yaml"),
    include_str!("../../configs/quickstart/linear_eval_vit_tiny.yaml"),
];

const TOKENS: &[&[u8]] = &[
    b"\n",
    b"  ",
    b"- ",
    b": ",
    b"config:",
    b"&a ",
    b"*a",
    b"<<: *a\n",
    b"!!binary ",
    b"!!float ",
    b"[",
    b"]",
    b"{",
    b"}",
    b"[[[[[[[[[[[[[[[[",
    b"{a: {a: {a: {a: {a: ",
    b"\"",
    b"'",
    b"|\n",
    b">-\n",
    b"~",
    b"null",
    b"1e400",
    b"-.inf",
    b".nan",
    b"18446744073709551616",
    b"0x7fffffffffffffff",
    b"MODEL:",
    b"DATA:",
    b"TRAIN:",
    b"---\n",
    b"...\n",
    b"%YAML 1.2\n",
    b"? ",
    b"#",
    b"\t",
    b"\xef\xbb\xbf",
];

fn check(bytes: &[u8]) {
    static CASE: AtomicU64 = AtomicU64::new(0);
    let path: PathBuf = std::env::temp_dir().join(format!(
        "tessera-fuzz-config-{}-{}.yaml",
        std::process::id(),
        CASE.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, bytes).unwrap();
    let name = path.display().to_string();
    // Each config found by name is loaded the same way; none is searched.
    if let Err(e) = config::load_with(&name, &[], &[]) {
        let shown = e.to_string();
        assert!(shown.contains(&name), "{shown}");
    }
    std::fs::remove_file(&path).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(400), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn an_edited_config_loads_or_is_refused_naming_the_file(c in 0..CONFIGS.len(), e in edits(TOKENS.len(), 6)) {
        check(&apply(CONFIGS[c].as_bytes(), &e, TOKENS));
    }

    #[test]
    fn random_bytes_are_refused_naming_the_file(b in prop::collection::vec(any::<u8>(), 0..300)) {
        check(&b);
    }
}

/// Nesting deep enough to overflow a recursive parser's stack, and an
/// alias bomb (each level doubling the last), are errors naming the file.
#[test]
fn deep_nesting_and_alias_bombs_are_refused() {
    let deep_flow = format!("config:\n  A: {}1{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let deep_block: String = (0..20_000).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
    let mut bomb = String::from("a0: &a0 [x, x]\n");
    for i in 1..40 {
        bomb += &format!("a{i}: &a{i} [*a{}, *a{}]\n", i - 1, i - 1);
    }
    for text in [deep_flow, deep_block, bomb] {
        check(text.as_bytes());
    }
}
