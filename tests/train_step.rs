//! The training-step graph of every tiny reference model: autodiff,
//! clipping and the optimizer update verify and lower to a valid plan.

use tessera_compiler::autodiff::{training_step, StepOptions};
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::ir::Op;
use tessera_compiler::plan::Plan;

fn step(name: &str, overrides: &[&str]) -> tessera_compiler::ir::Graph {
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let cfg = config::load(name, &ov).unwrap();
    let prog = Program::load(&[]).unwrap();
    let c = tessera_compiler::compile(&prog, cfg.tree()).unwrap();
    let opts = StepOptions::from_config(cfg.tree()).unwrap();
    training_step(c.graph, &c.param_groups, &opts).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn every_quickstart_model_has_a_training_step_that_lowers() {
    for name in config::embedded_config_names().into_iter().filter(|n| n.starts_with("quickstart/")) {
        let g = step(&name, &[]);
        g.verify().unwrap();
        let trainable = g.params().into_iter().filter(|p| p.2).count();
        let grads = g.outputs().iter().filter(|(n, _)| n.starts_with("grad.")).count();
        assert_eq!(grads, trainable, "{name}: every trainable parameter gets a gradient");
        let updates = g.state_updates().iter().filter(|(n, _)| g.params().iter().any(|p| p.1 == n)).count();
        assert_eq!(updates, trainable, "{name}: every trainable parameter is updated");
        let plan = tessera_compiler::plan::lower(&g, 4, true).unwrap();
        plan.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        let json = serde_json::to_string(&plan).unwrap();
        let back: Plan = serde_json::from_str(&json).unwrap();
        assert_eq!(back, plan);
    }
}

#[test]
fn frozen_parameters_cost_no_backward_work() {
    let all = step("quickstart/vit_tiny", &[]);
    let frozen = step(
        "quickstart/vit_tiny",
        &["MODEL.NON_TRAINABLE_PARAMS=[trunk.patch_embed.proj.weight, trunk.patch_embed.proj.bias]"],
    );
    let grad_conv = |g: &tessera_compiler::ir::Graph| {
        g.node_ids().into_iter().filter(|&v| matches!(g.node(v).op, Op::Conv2dGradWeight { .. })).count()
    };
    assert_eq!(grad_conv(&all), 1);
    assert_eq!(grad_conv(&frozen), 0);
    assert!(!frozen.outputs().iter().any(|(n, _)| n == "grad.trunk.patch_embed.proj.weight"));
}

#[test]
fn clipping_follows_the_config() {
    let clipped = step("quickstart/vit_tiny", &["MODEL.GRAD_CLIP.USE_GRAD_CLIP=true"]);
    assert!(clipped.node_ids().into_iter().any(|v| clipped.node(v).scope == "optim.clip"));
    let plain = step("quickstart/vit_tiny", &["MODEL.GRAD_CLIP.USE_GRAD_CLIP=false"]);
    assert!(!plain.node_ids().into_iter().any(|v| plain.node(v).scope == "optim.clip"));
}
