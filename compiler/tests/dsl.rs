//! The DSL on small programs: what it builds (parameter names, shapes, the IR
//! text) and the exact text of its errors.

use serde_json::json;
use tessera_compiler::elaborate::{Elab, Program, Val, V};
use tessera_compiler::ir::{DType, Dim, Shape};
use tessera_compiler::syntax::{ast::BlockKind, parse_str};

/// Runs trunk `t` of `files` on an input [B, 4, 8] with config `cfg`; returns
/// the IR text, or the error text.
fn run(files: &[(&str, &str)], cfg: serde_json::Value) -> Result<String, String> {
    let prog = Program::from_sources(files.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect())
        .map_err(|e| e.to_string())?;
    let mut el = Elab::new(&prog, &cfg);
    let x = el.graph.add_input("x", Shape(vec![Dim::B, Dim::Const(4), Dim::Const(8)]), DType::F32).unwrap();
    let t = prog.registered(BlockKind::Trunk, "t").expect("trunk t");
    let span = prog.block(t).span;
    let out = el
        .call_block(t, vec![(Val::new(V::Tensor(x)), span)], vec![], "trunk".into(), None)
        .map_err(|e| e.to_string())?;
    match out.v {
        V::Tensor(v) => el.graph.set_output("y", v),
        V::List(items) => {
            for (i, it) in items.iter().enumerate() {
                if let V::Tensor(v) = it.v {
                    el.graph.set_output(&format!("y{i}"), v);
                }
            }
        }
        _ => {}
    }
    el.graph.verify().map_err(|e| e.to_string())?;
    Ok(el.graph.to_text())
}

fn ok(src: &str, cfg: serde_json::Value) -> String {
    run(&[("m.tsr", src)], cfg).unwrap_or_else(|e| panic!("{e}"))
}

fn fails(src: &str, cfg: serde_json::Value) -> String {
    match run(&[("m.tsr", src)], cfg) {
        Ok(ir) => panic!("should fail, built:\n{ir}"),
        Err(e) => e,
    }
}

#[test]
fn parse_error_shows_file_line_column_caret_and_expectation() {
    let e = parse_str("models/bad.tsr", "block B(x: [N, D]) {\n    y = linear(x, +)\n}\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "error: expected an argument\n --> models/bad.tsr:2:19\n  |\n2 |     y = linear(x, +)\n  |                   ^"
    );
    let e = parse_str("m.tsr", "trunk t(x: [B, N, D] {\n}").unwrap_err();
    assert!(e.to_string().contains("m.tsr:1:22"), "{e}");
    assert!(e.to_string().contains("expected"), "{e}");
}

#[test]
fn loops_scopes_conditionals_and_config_defaults() {
    let ir = ok(
        r#"
let C = cfg.M
block Lin(x: [..., I], out: int) {
    param weight: [out, I] = trunc_normal(0.02)
    return linear(x, weight)
}
trunk t(x: [B, N, D], depth: int = C.DEPTH, wide: bool = C.WIDE) {
    for i in 0..depth {
        x = Lin(x, if wide then 2 * D else D) as blocks[i].fc
        if wide {
            x = Lin(x, D) as blocks[i].back
        }
    }
    return x
}
"#,
        json!({"M": {"DEPTH": 2, "WIDE": true}}),
    );
    for want in [
        "param @trunk.blocks.0.fc.weight : [16,8] f32 = trunc_normal(std=0.02, a=-2, b=2)",
        "param @trunk.blocks.0.back.weight : [8,16] f32",
        "param @trunk.blocks.1.back.weight : [8,16] f32",
        "= linear(%0, @trunk.blocks.0.fc.weight) : [B,4,16] f32  # trunk.blocks.0.fc",
    ] {
        assert!(ir.contains(want), "missing `{want}` in\n{ir}");
    }
    assert_eq!(ir.matches("= linear(").count(), 4);
}

#[test]
fn imports_bring_blocks_of_another_file() {
    let ir = run(
        &[
            ("lib/layers.tsr", "block Double(x: [...]) {\n return x * 2\n}\n"),
            ("t.tsr", "import \"lib/layers.tsr\"\ntrunk t(x: [B, N, D]) {\n return Double(x)\n}\n"),
        ],
        json!({}),
    )
    .unwrap();
    assert!(ir.contains("= scale(%0) {factor=2} : [B,4,8] f32"), "{ir}");
    let e = run(&[("t.tsr", "import \"nope.tsr\"\ntrunk t(x: [B, N, D]) {\n return x\n}\n")], json!({})).unwrap_err();
    assert!(e.contains("cannot find imported file `nope.tsr`"), "{e}");
}

#[test]
fn tuple_returns_unpack_and_buffers_update() {
    let ir = ok(
        r#"
block Split(x: [B, N, D]) {
    return x[:, 0], x[:, 1:]
}
trunk t(x: [B, N, D]) {
    buffer seen: [D] = zeros
    first, rest = Split(x)
    update seen = seen + 1.0
    return first, mean(rest, 1)
}
"#,
        json!({}),
    );
    assert!(ir.contains("buffer @trunk.seen : [8] f32 = zeros"), "{ir}");
    assert!(ir.contains("state @trunk.seen <- %"), "{ir}");
    assert!(ir.contains(": [B,8] f32"), "{ir}");
    assert!(ir.contains("{axis=1, start=1, end=4} : [B,3,8] f32"), "{ir}");
}

#[test]
fn shape_pattern_mismatch_names_the_config_key() {
    let e = fails(
        "trunk t(x: [B, N, D], dim: int = cfg.M.DIM) {\n    expect x: [B, N, dim]\n    return x\n}\n",
        json!({"M": {"DIM": 6}}),
    );
    assert!(e.contains("`x` has shape [B,4,8], but dim 2 must be `dim` = 6 (config `M.DIM`); it is 8"), "{e}");
    assert!(e.contains("--> models/m.tsr:2:22"), "{e}");
}

#[test]
fn failed_assert_lists_values_and_their_keys() {
    let e = fails(
        "trunk t(x: [B, N, D], h: int = cfg.M.HEADS) {\n    assert D % h == 0, \"dim {D} must divide by {h} heads\"\n    return x\n}\n",
        json!({"M": {"HEADS": 3}}),
    );
    assert!(e.contains("error: dim 8 must divide by 3 heads  (`D % h == 0` is false)"), "{e}");
    assert!(e.contains("= D = 8"), "{e}");
    assert!(e.contains("= h = 3 (config `M.HEADS`)"), "{e}");
}

#[test]
fn elaboration_errors_are_clear() {
    let cases: &[(&str, &str)] = &[
        (
            "trunk t(x: [B, N, D]) {\n    return lienar(x, x)\n}\n",
            "unknown block or function `lienar`; did you mean `linear`?",
        ),
        ("trunk t(x: [B, N, D]) {\n    return y\n}\n", "unknown name `y`"),
        (
            "trunk t(x: [B, N, D]) {\n    param w: [D] = zeros\n    param w: [D] = ones\n    return x\n}\n",
            "`trunk.w` is declared twice",
        ),
        (
            "block R(x: [...]) {\n    return R(x)\n}\ntrunk t(x: [B, N, D]) {\n    return R(x)\n}\n",
            "blocks nested more than 64 deep",
        ),
        (
            "trunk t(x: [B, N, D], k: int = cfg.M.K) {\n    return x\n}\n",
            "parameter `k` expects int, got str \"a\" (config `M.K`)",
        ),
        ("trunk t(x: [B, N, D]) {\n    return cfg.M.KYE\n}\n", "the config has no key `M.KYE`; did you mean `KEY`?"),
        (
            "trunk t(x: [B, N, D]) {\n    param w: [5, 3] = zeros\n    return linear(x, w)\n}\n",
            "linear in `trunk`: input last dim 8 does not match weight in_features 3",
        ),
        (
            "trunk t(x: [B, N, D]) {\n    for i in 0..100000000 {\n        x = x\n    }\n    return x\n}\n",
            "elaboration takes too long",
        ),
    ];
    for (src, want) in cases {
        let e = fails(src, json!({"M": {"K": "a", "KEY": 1}}));
        assert!(e.contains(want), "want `{want}` in:\n{e}");
        assert!(e.contains("--> models/m.tsr:"), "{e}");
    }
}

/// Long left-associative chains parse in a loop, so no bracket or prefix
/// count sees them; the tree they build is refused at the expression
/// before anything walks it recursively (issue 15, defect 7).
#[test]
fn long_chains_are_errors_at_the_expression_not_stack_overflows() {
    let plus = format!("let a = {}1\n", "1 + ".repeat(20_000));
    let index = format!("let a = x{}\n", "[0]".repeat(100_000));
    let field = format!("let a = cfg{}\n", ".A".repeat(20_000));
    // Chains inside parentheses inside chains.
    let nested = format!("let a = {}\n", "(".repeat(100) + "1" + &" + 1 + 1 + 1)".repeat(100));
    let call = format!("let a = {}\n", "f(1) * 2 + ".repeat(5_000) + "1");
    let cond = format!("let a = {}\n", "if true then 1 else ".repeat(400) + "1");
    for (what, text) in
        [("plus", plus), ("index", index), ("field", field), ("nested", nested), ("call", call), ("cond", cond)]
    {
        let text = format!("# a long expression\n{text}");
        let e = parse_str("models/long.tsr", &text).expect_err(what).to_string();
        assert!(e.contains("--> models/long.tsr:2:"), "{what}: {e}");
        assert!(e.contains("nested more than 256 deep"), "{what}: {e}");
    }
    // Below the bound a chain is an ordinary expression.
    let ok = format!("let a = {}1\n", "1 + ".repeat(200));
    assert!(parse_str("ok.tsr", &ok).is_ok());
}

#[test]
fn deep_statement_nesting_is_an_error() {
    let chain = "if true { x = 1 } else ".repeat(1_000);
    let text = format!("block b(x: any) {{\n    {chain}{{ x = 2 }}\n    return x\n}}\n");
    let e = parse_str("models/ifs.tsr", &text).expect_err("deep else-if").to_string();
    assert!(e.contains("--> models/ifs.tsr:2:"), "{e}");
    assert!(e.contains("statements nested more than 256 deep"), "{e}");
}

/// Expressions within the parser's bound can still nest without end across
/// block calls; the elaborator bounds its own recursion.
#[test]
fn deep_evaluation_across_block_calls_is_an_error() {
    let adds = " + 0".repeat(200);
    let src = format!(
        "block f(x: any, n: int) {{\n    return if n == 0 then x else f(x, n - 1){adds}\n}}\n\
         trunk t(x: [B, C, D]) {{\n    return f(x, 60)\n}}\n"
    );
    let e = fails(&src, json!({}));
    assert!(e.contains("nested more than 1024 deep"), "{e}");
    assert!(e.contains("m.tsr:2:"), "{e}");
}

/// A loop can nest a list value in itself without bound; such a value is
/// refused where it is built.
#[test]
fn deeply_nested_list_values_are_an_error() {
    let src =
        "trunk t(x: [B, C, D]) {\n    v = []\n    for i in 0..100000 {\n        v = [v]\n    }\n    return x\n}\n";
    let e = fails(src, json!({}));
    assert!(e.contains("nested more than 64 deep"), "{e}");
    assert!(e.contains("m.tsr:4:"), "{e}");
}
