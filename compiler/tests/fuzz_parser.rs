//! Property test: the DSL parser never panics, and every rejection is a
//! located diagnostic. Inputs are random text and random edits of the shipped
//! model files. `TESSERA_FUZZ_CASES=N` runs N cases (default 2,000); the
//! inputs tried are the two properties' case counts.

use proptest::prelude::*;
use tessera_compiler::syntax::parse_str;

const MODELS: &[&str] = &[
    include_str!("../../models/layers.tsr"),
    include_str!("../../models/trunks/vision_transformer.tsr"),
    include_str!("../../models/trunks/convit.tsr"),
    include_str!("../../models/heads/mlp.tsr"),
    include_str!("../../models/heads/swav_head.tsr"),
    include_str!("../../models/losses/swav_loss.tsr"),
];

/// Fragments that make edits land on interesting syntax.
const TOKENS: &[&str] = &[
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    "=",
    "==",
    "**",
    "//",
    "-",
    "not ",
    " and ",
    " as ",
    "as",
    "..",
    "...",
    "\"",
    "\\",
    "#",
    "\n",
    "if ",
    " then ",
    " else ",
    "for ",
    " in ",
    "return ",
    "param ",
    "buffer ",
    "1e309",
    "99999999999999999999",
    "0.5",
    "x",
    "block B(",
    "trunk t(x: [B, ...]) {",
    "@",
    "%",
    "é",
    "\t",
    "let ",
];

fn cases() -> u32 {
    std::env::var("TESSERA_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(2000)
}

fn check(text: &str) {
    if let Err(d) = parse_str("fuzz.tsr", text) {
        let shown = d.to_string();
        assert!(shown.starts_with("error: "), "{shown}");
        assert!(shown.contains("--> fuzz.tsr:"), "{shown}");
        assert!(d.line >= 1 && d.col >= 1);
    }
}

fn edit() -> impl Strategy<Value = String> {
    (0..MODELS.len(), prop::collection::vec((any::<prop::sample::Index>(), 0..TOKENS.len(), 0u8..3), 1..8)).prop_map(
        |(m, edits)| {
            let mut s: Vec<char> = MODELS[m].chars().collect();
            for (at, tok, kind) in edits {
                let i = at.index(s.len() + 1);
                let t: Vec<char> = TOKENS[tok].chars().collect();
                let (end, with) = match kind {
                    0 => (i, t),
                    1 => ((i + t.len()).min(s.len()), Vec::new()),
                    _ => ((i + 1).min(s.len()), t),
                };
                s.splice(i..end, with);
            }
            s.into_iter().collect()
        },
    )
}

fn random_text() -> impl Strategy<Value = String> {
    prop::collection::vec(prop_oneof![3 => (0..TOKENS.len()).prop_map(|i| TOKENS[i].to_string()), 1 => any::<char>().prop_map(|c| c.to_string())], 0..120)
        .prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn parser_never_panics_on_edited_models(text in edit()) {
        check(&text);
    }

    #[test]
    fn parser_never_panics_on_random_text(text in random_text()) {
        check(&text);
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    for s in ["(".repeat(100_000), "-".repeat(100_000) + "x", "x = 1 ** ".repeat(5000) + "1", "[".repeat(5000)] {
        let text = format!("let a = {s}");
        let err = parse_str("deep.tsr", &text).expect_err("must be rejected");
        assert!(err.to_string().contains("deep.tsr:1:"), "{err}");
    }
}
