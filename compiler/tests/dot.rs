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
