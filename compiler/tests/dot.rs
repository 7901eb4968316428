//! `Graph::to_dot` on the reference models: the expanded form is what it
//! always drew (a snapshot), and the collapsed form draws a run of identical
//! blocks once, with its count.

use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::ir::Graph;

fn forward(name: &str, overrides: &[&str]) -> Graph {
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let cfg = config::load(name, &ov).unwrap();
    tessera_compiler::compile(&Program::load(&[]).unwrap(), cfg.tree()).unwrap().graph
}

#[test]
fn expanded_dot_is_unchanged() {
    insta::assert_snapshot!("dot__vit_tiny_expanded", forward("quickstart/vit_tiny", &[]).to_dot());
}

fn nodes(dot: &str) -> usize {
    dot.lines().filter(|l| l.trim_start().starts_with('n') && l.contains(" [label=") && !l.contains("->")).count()
}

fn run_labels(dot: &str) -> Vec<&str> {
    dot.lines().filter_map(|l| l.trim().strip_prefix("label=\"")).filter(|l| l.contains('×')).collect()
}

#[test]
fn a_vit_draws_its_blocks_once() {
    let g = forward("quickstart/vit_tiny", &["MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=12"]);
    let (expanded, collapsed) = (g.to_dot(), g.to_dot_collapsed());
    assert_eq!(run_labels(&collapsed), ["trunk.blocks.0 … trunk.blocks.11 (×12)\";"], "{collapsed}");
    // One block (31 nodes: 13 parameters, 18 ops) stands for twelve.
    assert_eq!(nodes(&expanded), g.node_count());
    assert_eq!(nodes(&collapsed), g.node_count() - 11 * 31, "{collapsed}");
    assert!(nodes(&collapsed) * 4 < nodes(&expanded));
    assert!(!collapsed.contains("@trunk.blocks.1.") && collapsed.contains("@trunk.blocks.0.norm1.weight"));
    // What goes in and comes out is kept: the embedding feeds the first
    // block, each block the next, and the last the final norm.
    let id = |label: &str| {
        let line = collapsed.lines().find(|l| l.contains(label)).unwrap_or_else(|| panic!("no {label}"));
        line.trim().split(' ').next().unwrap().to_string()
    };
    let (norm1, final_norm) = (id("trunk.blocks.0.norm1.weight"), id("@trunk.norm.weight"));
    let into = |node: &str| -> Vec<&str> {
        let head = format!(" -> {}", node);
        collapsed.lines().filter(|l| l.contains(&head)).collect()
    };
    let layer_norm_of = |param: &str| {
        let edge = collapsed.lines().find(|l| l.trim().starts_with(&format!("{param} -> "))).unwrap();
        edge.trim().split(' ').nth(2).unwrap().to_string()
    };
    let first_norm = layer_norm_of(&norm1);
    let into_first = into(&first_norm);
    assert!(into_first.iter().any(|l| l.contains("label=\"0\"") && !l.contains("next")), "{into_first:?}");
    assert!(into_first.iter().any(|l| l.contains("next") && l.contains("dashed")), "{into_first:?}");
    assert_eq!(into(&layer_norm_of(&final_norm)).len(), 3, "{collapsed}");
}

#[test]
fn blocks_that_differ_stay_apart() {
    // DeiT-B: block 0 has no drop-path (its rate is 0), the other eleven do.
    let deit = forward("pretrain/vision_transformer/supervised/16gpu_deit_b_example", &[]);
    let dot = deit.to_dot_collapsed();
    assert_eq!(run_labels(&dot), ["trunk.blocks.1 … trunk.blocks.11 (×11)\";"], "{dot}");
    assert!(dot.contains("@trunk.blocks.0.norm1.weight") && dot.contains("@trunk.blocks.1.norm1.weight"));
    assert!(!dot.contains("@trunk.blocks.2."));
    assert!(nodes(&dot) * 4 < nodes(&deit.to_dot()));
    // ConViT: the gated positional self-attention blocks and the plain one after them.
    let convit = forward("quickstart/convit_tiny", &[]);
    let dot = convit.to_dot_collapsed();
    assert_eq!(run_labels(&dot), ["trunk.blocks.0 … trunk.blocks.1 (×2)\";"], "{dot}");
    assert!(dot.contains("@trunk.blocks.2.attn.qkv.weight"), "{dot}");
}
