//! End-to-end checks of `tessera compile`: parameter counts and FLOPs against
//! independently computed figures, the error text of every bad-input case,
//! and insta snapshots of the IR of each tiny reference model and of the
//! summary of every shipped config.

use std::process::Command;
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::summary::{summarize, Summary};

fn program() -> Program {
    Program::load(&[]).expect("embedded models parse")
}

fn compile(name: &str, overrides: &[&str]) -> Result<Summary, String> {
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let cfg = config::load(name, &ov).map_err(|e| e.to_string())?;
    let c = tessera_compiler::compile(&program(), cfg.tree()).map_err(|e| e.to_string())?;
    Ok(summarize(cfg.name(), &c))
}

fn err(name: &str, overrides: &[&str]) -> String {
    match compile(name, overrides) {
        Ok(_) => panic!("{name} {overrides:?} should not compile"),
        Err(e) => e,
    }
}

const DEIT: &str = "pretrain/vision_transformer/supervised/16gpu_deit_b_example";
const VIT_L: &[&str] = &[
    "MODEL.TRUNK.VISION_TRANSFORMERS.QKV_BIAS=true",
    "MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=24",
    "MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM=1024",
    "MODEL.TRUNK.VISION_TRANSFORMERS.NUM_HEADS=16",
    "MODEL.TRUNK.VISION_TRANSFORMERS.MLP_DIM=4096",
    "MODEL.HEAD.PARAMS=[[mlp, {dims: [1024, 1000]}]]",
];

#[test]
fn vit_b16_in_timm_layout_has_timms_parameter_count() {
    // timm vit_base_patch16_224: qkv bias, one Linear head 768 -> 1000.
    let s = compile(DEIT, &["MODEL.TRUNK.VISION_TRANSFORMERS.QKV_BIAS=true"]).unwrap();
    assert_eq!(s.params_total, 86_567_656);
    assert_eq!(s.params_by_module["trunk"], 86_567_656 - 769_000);
    assert_eq!(s.params_by_module["heads.0"], 769_000);
}

#[test]
fn vit_l16_in_timm_layout_has_timms_parameter_count() {
    assert_eq!(compile(DEIT, VIT_L).unwrap().params_total, 304_326_632);
}

#[test]
fn vit_example_as_shipped() {
    let s = compile("pretrain/vision_transformer/supervised/1gpu_vit_example", &[]).unwrap();
    assert_eq!(s.params_total, 91_206_376);
    assert_eq!(s.params_trainable, 91_206_376);
    assert_eq!(s.trunk_output_dim, 768);
}

#[test]
fn convit_b_plus_parameter_count() {
    let s = compile("pretrain/vision_transformer/supervised/16gpu_convit_b", &[]).unwrap();
    assert_eq!(s.params_by_module["trunk"], 152_114_176);
    assert_eq!(s.params_total, 153_139_176);
}

#[test]
fn vit_b16_forward_flops() {
    let s = compile(DEIT, &[]).unwrap();
    // 35.1 GFLOPs per image at 224 (a multiply-add counts 2), within 1 %.
    assert!((s.forward_gflops_per_image - 35.1).abs() / 35.1 < 0.01, "{}", s.forward_gflops_per_image);
}

#[test]
fn every_config_compiles_and_its_summary_is_stable() {
    let names = config::embedded_config_names();
    assert!(names.len() >= 13 + 6, "{names:?}");
    for name in &names {
        // A file of `<dir>/models/` is a model fragment, merged over each
        // complete config of <dir> (`+config/<dir>/models=<file>`, as VISSL's
        // benchmark configs are composed).
        if let Some((dir, fragment)) = name.split_once("/models/") {
            let bases: Vec<&String> =
                names.iter().filter(|b| b.rsplit_once('/').map(|(d, _)| d) == Some(dir)).collect();
            assert!(!bases.is_empty(), "fragment {name} has no config in {dir} to merge into");
            for base in bases {
                let group = format!("+config/{dir}/models={fragment}");
                let s = compile(base, &[&group]).unwrap_or_else(|e| panic!("{base} {group}:\n{e}"));
                let file = format!("{base}__models__{fragment}").replace('/', "__");
                insta::assert_snapshot!(format!("summary__{file}"), s.to_text());
            }
            continue;
        }
        let s = compile(name, &[]).unwrap_or_else(|e| panic!("{name}:\n{e}"));
        let file = name.replace('/', "__");
        insta::assert_snapshot!(format!("summary__{file}"), s.to_text());
    }
}

#[test]
fn tiny_models_ir_snapshots() {
    let cases: &[(&str, &[&str])] = &[
        ("quickstart/vit_tiny", &[]),
        ("quickstart/deit_tiny", &[]),
        ("quickstart/convit_tiny", &[]),
        ("quickstart/vit_example_head", &[]),
        ("quickstart/moco_vit_tiny", &[]),
        ("quickstart/simclr_vit_tiny", &[]),
        ("quickstart/swav_vit_tiny", &[]),
    ];
    let prog = program();
    for (name, ov) in cases {
        let ov: Vec<String> = ov.iter().map(|s| s.to_string()).collect();
        let cfg = config::load(name, &ov).unwrap();
        let c = tessera_compiler::compile(&prog, cfg.tree()).unwrap();
        c.graph.verify().unwrap();
        insta::assert_snapshot!(format!("ir__{}", name.replace('/', "__")), c.graph.to_text());
    }
}

#[test]
fn eval_mlp_head_ir() {
    let cfg = config::load(
        "quickstart/vit_tiny",
        &["MODEL.HEAD.PARAMS=[[eval_mlp, {in_channels: 64, dims: [64, 10]}]]".into()],
    )
    .unwrap();
    let c = tessera_compiler::compile(&program(), cfg.tree()).unwrap();
    insta::assert_snapshot!("ir__eval_mlp_head", c.graph.to_text());
    let names: Vec<&str> = c.graph.params().into_iter().map(|(_, n, _)| n).filter(|n| n.starts_with("heads")).collect();
    assert_eq!(
        names,
        ["heads.0.channel_bn.weight", "heads.0.channel_bn.bias", "heads.0.clf.clf.0.weight", "heads.0.clf.clf.0.bias"]
    );
}

#[test]
fn state_dict_names_follow_vissl() {
    let cfg = config::load("quickstart/swav_vit_tiny", &[]).unwrap();
    let c = tessera_compiler::compile(&program(), cfg.tree()).unwrap();
    let params: Vec<&str> = c.graph.params().into_iter().map(|(_, n, _)| n).collect();
    for want in [
        "trunk.patch_embed.proj.weight",
        "trunk.cls_token",
        "trunk.pos_embed",
        "trunk.blocks.1.attn.qkv.weight",
        "trunk.blocks.1.mlp.fc2.bias",
        "trunk.norm.weight",
        "heads.0.projection_head.0.weight",
        "heads.0.projection_head.1.weight",
        "heads.0.projection_head.3.weight",
        "heads.0.prototypes0.weight",
    ] {
        assert!(params.contains(&want), "{want} missing from {params:?}");
    }
}

// ---- bad input: each error names what is wrong and where ----

#[test]
fn head_input_not_matching_trunk_output() {
    let e = err(
        "pretrain/vision_transformer/supervised/1gpu_vit_example",
        &["MODEL.HEAD.PARAMS=[[vision_transformer_head, {in_plane: 1024, hidden_dim: 3072, num_classes: 1000}]]"],
    );
    assert!(e.contains("must be `in_plane` = 1024 (config `MODEL.HEAD.PARAMS.0.1.in_plane`); it is 768"), "{e}");
    assert!(e.contains("heads.0"), "{e}");
}

#[test]
fn mlp_head_dims0_not_matching_trunk_output() {
    let e = err(DEIT, &["MODEL.HEAD.PARAMS=[[mlp, {dims: [1024, 1000]}]]"]);
    assert!(e.contains("`dims[0]` = 1024 (config `MODEL.HEAD.PARAMS.0.1.dims.0`); it is 768"), "{e}");
}

#[test]
fn consecutive_head_dims_must_chain() {
    let e = err(DEIT, &["MODEL.HEAD.PARAMS=[[[mlp, {dims: [768, 512]}], [mlp, {dims: [256, 10]}]]]"]);
    assert!(e.contains("MODEL.HEAD.PARAMS.0.1.1.dims.0"), "{e}");
    assert!(e.contains("it is 512"), "{e}");
}

#[test]
fn loss_embedding_dim_must_match_head_output() {
    let e = err("pretrain/vision_transformer/moco/vit_b16", &["LOSS.moco_loss.embedding_dim=256"]);
    assert!(e.contains("`embedding_dim` = 256 (config `LOSS.moco_loss.embedding_dim`); it is 128"), "{e}");
}

#[test]
fn hidden_dim_must_divide_by_heads() {
    let e = err(DEIT, &["MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM=770"]);
    assert!(e.contains("HIDDEN_DIM must be divisible by NUM_HEADS"), "{e}");
    assert!(e.contains("hidden_dim = 770 (config `MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM`)"), "{e}");
    assert!(e.contains("num_heads = 12 (config `MODEL.TRUNK.VISION_TRANSFORMERS.NUM_HEADS`)"), "{e}");
}

#[test]
fn image_size_must_divide_by_patch_size() {
    let e = err(DEIT, &["MODEL.TRUNK.VISION_TRANSFORMERS.PATCH_SIZE=15"]);
    assert!(e.contains("IMAGE_SIZE must be divisible by PATCH_SIZE"), "{e}");
    assert!(e.contains("patch_size = 15 (config `MODEL.TRUNK.VISION_TRANSFORMERS.PATCH_SIZE`)"), "{e}");
}

#[test]
fn gpsa_layers_not_above_layers() {
    let e = err("pretrain/vision_transformer/supervised/16gpu_convit_b", &["MODEL.TRUNK.CONVIT.N_GPSA_LAYERS=13"]);
    assert!(e.contains("N_GPSA_LAYERS must not exceed NUM_LAYERS"), "{e}");
    assert!(e.contains("n_gpsa_layers = 13 (config `MODEL.TRUNK.CONVIT.N_GPSA_LAYERS`)"), "{e}");
}

#[test]
fn swav_crops_against_multicrop() {
    let e = err("pretrain/vision_transformer/swav/deit_b_2nodes", &["LOSS.swav_loss.crops_for_assign=[0, 2]"]);
    assert!(e.contains("`LOSS.swav_loss.crops_for_assign` names crop 2"), "{e}");
}

#[test]
fn cutmixup_needs_even_batches() {
    let e = err(DEIT, &["DATA.TRAIN.BATCHSIZE_PER_REPLICA=33"]);
    assert!(e.contains("`DATA.TRAIN.BATCHSIZE_PER_REPLICA` is 33"), "{e}");
    assert!(e.contains("even batch"), "{e}");
}

#[test]
fn unknown_head_names_the_known_ones() {
    let e = err(DEIT, &["MODEL.HEAD.PARAMS=[[mpl, {dims: [768, 10]}]]"]);
    assert!(e.contains("did you mean `mlp`?"), "{e}");
}

#[test]
fn unknown_head_argument() {
    let e = err(DEIT, &["MODEL.HEAD.PARAMS=[[mlp, {dimz: [768, 10]}]]"]);
    assert!(e.contains("head `mlp` has no argument `dimz`; did you mean `dims`?"), "{e}");
}

// ---- the CLI ----

fn tessera(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).output().expect("run tessera");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// A batch size that is not a positive integer is refused naming the key
/// (compile and plan planned batch 1 for -5).
#[test]
fn cli_a_batch_size_below_1_is_refused() {
    for cmd in [&["compile", "--emit", "kernels"][..], &["plan", "--memory"]] {
        for b in ["-5", "0"] {
            let ov = format!("DATA.TRAIN.BATCHSIZE_PER_REPLICA={b}");
            let mut a = vec![cmd[0], "config=quickstart/vit_tiny", ov.as_str()];
            a.extend_from_slice(&cmd[1..]);
            let (ok, _, err) = tessera(&a);
            assert!(!ok && err.contains(&format!("`DATA.TRAIN.BATCHSIZE_PER_REPLICA` is {b}")), "{a:?}: {err}");
        }
    }
}

/// Every command that takes a config says how to write one.
#[test]
fn cli_every_config_command_documents_config_and_overrides() {
    for cmd in [&["train"][..], &["compile"], &["plan"], &["infer"], &["bench"], &["config", "show"]] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let (ok, out, err) = tessera(&args);
        assert!(ok, "{cmd:?}: {err}");
        assert!(
            out.contains("`config=NAME` (configs/NAME.yaml, an embedded config, or a file) then overrides"),
            "{cmd:?}: {out}"
        );
    }
}

/// `tessera data synth`: errors use the flags' names, and a folder made with
/// other parameters is replaced only with --force.
#[test]
fn cli_data_synth_names_its_flags_and_keeps_another_folder_without_force() {
    let dir = std::env::temp_dir().join(format!("tessera-synth-cli-{}", std::process::id()));
    let out = dir.to_str().unwrap();
    let small = ["--train-per-class", "2", "--val-per-class", "1"];
    let synth = |extra: &[&str]| {
        let mut a = vec!["data", "synth", "--out", out];
        a.extend_from_slice(&small);
        a.extend_from_slice(extra);
        tessera(&a)
    };
    let (ok, _, err) = synth(&["--image-size", "8"]);
    assert!(!ok && err.contains("--image-size 8 is outside 16..=256"), "{err}");
    let (ok, _, err) = synth(&["--classes", "1"]);
    assert!(!ok && err.contains("--classes 1 is outside 2..=10"), "{err}");
    assert!(synth(&["--classes", "3"]).0);
    let (ok, _, err) = synth(&["--classes", "4"]);
    assert!(!ok && err.contains("other parameters") && err.contains("--force"), "{err}");
    let (ok, _, err) = synth(&["--classes", "4", "--force"]);
    assert!(ok && err.contains("wrote 8 training"), "{err}");
    let (_, help, _) = tessera(&["data", "synth", "--help"]);
    assert!(help.contains("16 to 256 pixels") && help.contains("2 to 10"), "{help}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `tessera completions SHELL` prints a script that completes every command
/// and option (bash's parses, and completes `tessera ex` to `export`).
#[test]
fn cli_completions_cover_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let (ok, out, err) = tessera(&["completions", shell]);
        assert!(ok, "{shell}: {err}");
        for word in ["compile", "train", "plan", "infer", "export", "completions", "memory-budget", "weights"] {
            assert!(out.contains(word), "{shell}: `{word}` missing");
        }
    }
    let (_, script, _) = tessera(&["completions", "bash"]);
    let probe = format!(
        "{script}\nCOMP_WORDS=(tessera ex); COMP_CWORD=1; _tessera tessera ex tessera; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    );
    let o = Command::new("bash").args(["-c", &probe]).output().expect("bash");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "export");
    let (ok, _, err) = tessera(&["completions", "powershell-9"]);
    assert!(!ok && err.contains("invalid value"), "{err}");
}

/// `-o` writes a new file or replaces a regular one; a FIFO, a symlink or a
/// directory there is refused and left alone (a temporary renamed over it
/// would replace it).
#[test]
fn cli_output_refuses_what_is_not_a_regular_file() {
    use std::os::unix::fs::FileTypeExt;
    let dir = std::env::temp_dir().join(format!("tessera-output-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let link = dir.join("link");
    std::os::unix::fs::symlink(dir.join("elsewhere"), &link).unwrap();
    let emit = |to: &std::path::Path| {
        tessera(&["compile", "config=quickstart/vit_tiny", "--emit", "kernels", "-o", to.to_str().unwrap()])
    };
    let (ok, _, e) = emit(&fifo);
    assert!(!ok && e.contains("not a regular file"), "{e}");
    let (ok, _, e) = emit(&link);
    assert!(!ok && e.contains("a symbolic link"), "{e}");
    let (ok, _, e) = emit(&dir);
    assert!(!ok && e.contains("a directory"), "{e}");
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    // A regular file is replaced; a new one made.
    let file = dir.join("kernels.txt");
    std::fs::write(&file, "old").unwrap();
    let (ok, _, e) = emit(&file);
    assert!(ok && std::fs::read_to_string(&file).unwrap().starts_with("k0 = "), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cli_json_summary_has_the_documented_keys() {
    let (ok, out, err) = tessera(&["compile", &format!("config={DEIT}"), "--emit", "summary", "--format", "json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for k in [
        "params_total",
        "params_trainable",
        "params_by_module",
        "forward_gflops_per_image",
        "ir_nodes",
        "trunk_output_dim",
    ] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    assert_eq!(v["params_by_module"]["heads.0"], 769_000);
}

#[test]
fn cli_misspelled_key_fails_with_did_you_mean() {
    let (ok, _, err) =
        tessera(&["compile", &format!("config={DEIT}"), "config.MODEL.TRUNK.VISION_TRANSFORMERS.HIDEN_DIM=768"]);
    assert!(!ok);
    assert!(err.contains("HIDEN_DIM"), "{err}");
    assert!(err.contains("MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM"), "{err}");
}

#[test]
fn cli_bad_head_fails() {
    let (ok, _, err) = tessera(&[
        "compile",
        "config=pretrain/vision_transformer/supervised/1gpu_vit_example",
        "MODEL.HEAD.PARAMS=[[vision_transformer_head, {in_plane: 1024, num_classes: 10}]]",
    ]);
    assert!(!ok);
    assert!(err.contains("in_plane"), "{err}");
}

#[test]
fn cli_emits_ir_and_dot() {
    let (ok, ir, e) = tessera(&["compile", "config=quickstart/vit_tiny", "--emit", "ir"]);
    assert!(ok, "{e}");
    assert!(ir.contains("= linear(") && ir.contains("@trunk.blocks.0.attn.qkv.weight"), "{ir}");
    let (ok, dot, e) = tessera(&["compile", "config=quickstart/vit_tiny", "--emit", "dot"]);
    assert!(ok, "{e}");
    assert!(dot.starts_with("digraph"), "{dot}");
    // The two blocks are drawn once; --expand draws the graph as it always was.
    assert!(dot.contains(r#"label="trunk.blocks.0 … trunk.blocks.1 (×2)";"#), "{dot}");
    assert!(!dot.contains("@trunk.blocks.1."), "{dot}");
    let (ok, expanded, e) = tessera(&["compile", "config=quickstart/vit_tiny", "--emit", "dot", "--expand"]);
    assert!(ok, "{e}");
    let cfg = config::load("quickstart/vit_tiny", &[]).unwrap();
    let graph = tessera_compiler::compile(&program(), cfg.tree()).unwrap().graph;
    assert_eq!(expanded, graph.to_dot());
    assert_eq!(dot, graph.to_dot_collapsed());
    let (ok, _, e) = tessera(&["compile", "config=quickstart/vit_tiny", "--expand"]);
    assert!(!ok && e.contains("--expand draws every module of `--emit dot`"), "{e}");
}

// ---- optimizer parameter groups (VISSL's rules, reference 6.2) ----

fn groups(name: &str, overrides: &[&str]) -> Vec<tessera_compiler::param_groups::ParamGroup> {
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let cfg = config::load(name, &ov).unwrap();
    tessera_compiler::compile(&program(), cfg.tree()).unwrap().param_groups
}

fn group_of<'a>(gs: &'a [tessera_compiler::param_groups::ParamGroup], param: &str) -> &'a str {
    gs.iter().find(|g| g.params.iter().any(|p| p == param)).map(|g| g.name.as_str()).unwrap_or("none")
}

#[test]
fn vit_tokens_are_not_decayed_under_either_spelling() {
    // The DeiT config lists [pos_embedding, class_token]; ViT names them pos_embed / cls_token.
    let gs = groups(DEIT, &[]);
    assert_eq!(group_of(&gs, "trunk.pos_embed"), "remaining_unregularized");
    assert_eq!(group_of(&gs, "trunk.cls_token"), "remaining_unregularized");
    let gs = groups(DEIT, &["OPTIMIZER.non_regularized_parameters=[pos_embed, cls_token]"]);
    assert_eq!(group_of(&gs, "trunk.pos_embed"), "remaining_unregularized");
    let gs = groups(DEIT, &["OPTIMIZER.non_regularized_parameters=[]"]);
    assert_eq!(group_of(&gs, "trunk.pos_embed"), "remaining_regularized");
}

#[test]
fn vissl_weight_decay_rules() {
    let gs = groups(DEIT, &[]);
    assert_eq!(group_of(&gs, "trunk.blocks.0.attn.qkv.weight"), "trunk_regularized");
    // Biases are decayed by default (regularize_bias: True), norms never (regularize_bn: False).
    assert_eq!(group_of(&gs, "trunk.blocks.0.mlp.fc1.bias"), "trunk_regularized");
    assert_eq!(group_of(&gs, "trunk.blocks.0.norm1.weight"), "trunk_unregularized");
    assert_eq!(group_of(&gs, "trunk.patch_embed.proj.weight"), "trunk_regularized");
    assert_eq!(group_of(&gs, "heads.0.clf.0.weight"), "head_regularized");
    let wd: Vec<(String, f64)> = gs.iter().map(|g| (g.name.clone(), g.weight_decay)).collect();
    assert_eq!(wd[0], ("trunk_regularized".to_string(), 0.05));
    assert_eq!(wd[1], ("trunk_unregularized".to_string(), 0.0));
    let gs = groups(DEIT, &["OPTIMIZER.regularize_bias=false", "OPTIMIZER.regularize_bn=true"]);
    assert_eq!(group_of(&gs, "trunk.blocks.0.mlp.fc1.bias"), "trunk_unregularized");
    assert_eq!(group_of(&gs, "heads.0.clf.0.bias"), "head_unregularized");
    assert_eq!(group_of(&gs, "trunk.blocks.0.norm1.weight"), "trunk_regularized");
    assert_eq!(group_of(&gs, "trunk.blocks.0.norm1.bias"), "trunk_unregularized");
    // ConViT's gating parameter is decayed (reference 6.2).
    let gs = groups("pretrain/vision_transformer/supervised/16gpu_convit_b", &[]);
    assert_eq!(group_of(&gs, "trunk.blocks.0.attn.alpha"), "remaining_regularized");
    assert_eq!(group_of(&gs, "trunk.pos_embedding"), "remaining_unregularized");
}

#[test]
fn non_trainable_params_are_frozen_and_typos_rejected() {
    let gs = groups(DEIT, &["MODEL.NON_TRAINABLE_PARAMS=[trunk.cls_token, module.trunk.pos_embed]"]);
    assert_eq!(group_of(&gs, "trunk.cls_token"), "none");
    assert_eq!(group_of(&gs, "trunk.pos_embed"), "none");
    let s = compile(DEIT, &["MODEL.NON_TRAINABLE_PARAMS=[trunk.cls_token]"]).unwrap();
    assert_eq!(s.params_total - s.params_trainable, 768);
    let e = err(DEIT, &["MODEL.NON_TRAINABLE_PARAMS=[trunk.cls_tokn]"]);
    assert!(
        e.contains("names `trunk.cls_tokn`, which is not a parameter of this model; did you mean `trunk.cls_token`?"),
        "{e}"
    );
    // Temporarily frozen parameters are checked the same way (the engine
    // freezes them per span of iterations).
    let e = err(DEIT, &["MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[[module.trunk.pos_embd, 10]]"]);
    assert!(
        e.contains("`MODEL.TEMP_FROZEN_PARAMS_ITER_MAP` names `trunk.pos_embd`, which is not a parameter of this model; did you mean `trunk.pos_embed`?"),
        "{e}"
    );
    let e = err(DEIT, &["MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[[trunk.pos_embed]]"]);
    assert!(e.contains("`MODEL.TEMP_FROZEN_PARAMS_ITER_MAP.0` must be [parameter name, iterations]"), "{e}");
}

#[test]
fn several_heads_run_in_sequence_on_one_trunk_feature() {
    // VISSL's heads_forward: one trunk feature and several heads -> each head
    // consumes the previous head's output (reference 3.1).
    let s = compile(DEIT, &["MODEL.HEAD.PARAMS=[[mlp, {dims: [768, 512]}], [mlp, {dims: [512, 10]}]]"]).unwrap();
    assert_eq!(s.params_by_module["heads.0"], 768 * 512 + 512);
    assert_eq!(s.params_by_module["heads.1"], 512 * 10 + 10);
    assert_eq!(s.outputs[0].shape, "[B,10]");
    // A chained entry is one head whose modules are numbered heads.0.0, heads.0.1.
    let cfg = config::load(DEIT, &["MODEL.HEAD.PARAMS=[[[mlp, {dims: [768, 512]}], [mlp, {dims: [512, 10]}]]]".into()])
        .unwrap();
    let c = tessera_compiler::compile(&program(), cfg.tree()).unwrap();
    let names: Vec<&str> = c.graph.params().into_iter().map(|(_, n, _)| n).filter(|n| n.starts_with("heads")).collect();
    assert_eq!(
        names,
        ["heads.0.0.clf.0.weight", "heads.0.0.clf.0.bias", "heads.0.1.clf.0.weight", "heads.0.1.clf.0.bias"]
    );
}

#[test]
fn cli_emits_a_plan_and_shows_it() {
    let dir = std::env::temp_dir().join(format!("tessera-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plan = dir.join("step.plan");
    let (ok, _, e) = tessera(&[
        "compile",
        "config=quickstart/vit_tiny",
        "--emit",
        "plan",
        "--batch",
        "4",
        "-o",
        plan.to_str().unwrap(),
    ]);
    assert!(ok, "{e}");
    let (ok, out, e) = tessera(&["plan", "show", plan.to_str().unwrap()]);
    assert!(ok, "{e}");
    assert!(
        out.starts_with(
            "compiled run of quickstart/vit_tiny for the cpu target: 1 training step(s), 1 eval forward(s)"
        ),
        "{out}"
    );
    let v = tessera_plan::PLAN_VERSION;
    assert!(
        out.contains(&format!("plan v{v}  batch 4  training")) && out.contains(&format!("plan v{v}  batch 100  eval")),
        "{out}"
    );
    // 30 trainable tensors in the tiny ViT, each with a gradient and an update.
    assert!(out.contains("in 30 tensors, 30 gradients"), "{out}");
    // The patch embedding as a linear over the patches (`patch-linear`).
    assert!(out.contains("  permute\n") && out.contains("cross_entropy_grad"), "{out}");
    assert!(!out.contains("conv2d"), "{out}");
    std::fs::write(&plan, "{\"version\": 99}").unwrap();
    let (ok, _, e) = tessera(&["plan", "show", plan.to_str().unwrap()]);
    assert!(!ok);
    assert!(e.contains("step.plan is not a tessera plan"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cli_lists_and_chooses_passes_and_dumps_the_ir_after_one() {
    let cfg = "config=quickstart/vit_tiny";
    let (ok, out, e) = tessera(&["compile", cfg, "--print-passes"]);
    assert!(ok, "{e}");
    for pass in ["dce", "cse", "fold", "fuse-elementwise"] {
        assert!(out.lines().any(|l| l.starts_with(pass)), "{pass} missing from:\n{out}");
    }
    assert!(out.contains("why: chains of elementwise ops as one kernel"), "{out}");
    let (ok, json, e) = tessera(&["compile", cfg, "--print-passes", "--format", "json"]);
    assert!(ok, "{e}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let fused_kernels = v["kernels"].as_u64().unwrap();
    let (ok, json, e) = tessera(&["compile", cfg, "--print-passes", "--format", "json", "--passes", "none"]);
    assert!(ok, "{e}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["kernels"].as_u64().unwrap() > 2 * fused_kernels, "{json}");
    assert_eq!(v["passes"].as_array().unwrap().len(), 0);

    let (ok, ir, e) = tessera(&["compile", cfg, "--emit", "ir-after=fuse-elementwise"]);
    assert!(ok, "{e}");
    assert!(ir.contains("= fused(") && ir.contains("state @trunk.blocks.0.mlp.fc1.weight <- "), "{ir}");
    let (ok, ir, e) = tessera(&["compile", cfg, "--passes", "dce,cse", "--emit", "ir-after=dce"]);
    assert!(ok, "{e}");
    assert!(!ir.contains("= fused("));
    let (ok, listing, e) = tessera(&["compile", cfg, "--emit", "kernels", "--batch", "2"]);
    assert!(ok, "{e}");
    assert!(listing.starts_with("k0 = reshape(\"data\") {shape=[2,3,4,8,4,8]}"), "{listing}");

    let (ok, _, e) = tessera(&["compile", cfg, "--passes", "dce,fusion"]);
    assert!(!ok);
    assert!(e.contains("unknown pass `fusion`; the passes are: dce, cse, "), "{e}");
    assert!(e.contains("fuse-elementwise") && e.contains("attention-pattern"), "{e}");
    let (ok, _, e) = tessera(&["compile", cfg, "--passes", "dce", "--emit", "ir-after=cse"]);
    assert!(!ok);
    assert!(e.contains("`cse` is not among the passes run (dce)"), "{e}");
    let (ok, _, e) = tessera(&["compile", cfg, "--emit", "ir-after"]);
    assert!(!ok);
    assert!(e.contains("summary, ir, dot, plan, kernels, ir-after=PASS"), "{e}");
}

#[test]
fn cli_plans_memory_as_text_json_and_svg_and_finds_the_largest_batch() {
    let cfg = "config=quickstart/vit_tiny";
    let (ok, text, e) = tessera(&["plan", cfg, "--memory"]);
    assert!(ok, "{e}");
    insta::assert_snapshot!("memory__quickstart__vit_tiny", text);
    let (ok, json, e) = tessera(&["plan", cfg, "--memory", "--format", "json", "--batch", "8"]);
    assert!(ok, "{e}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    for key in ["peak_bytes", "kernels", "parts", "arena_bytes", "lower_bound_bytes", "topological_order_peak_bytes"] {
        assert!(v.get(key).is_some(), "{key} missing from {json}");
    }
    let parts = v["parts"].as_object().unwrap();
    let sum: u64 = parts.values().map(|p| p.as_u64().unwrap()).sum();
    assert_eq!(sum, v["peak_bytes"].as_u64().unwrap());
    assert!(v["arena_bytes"].as_u64() >= v["lower_bound_bytes"].as_u64());
    // Bytes moved: by dtype and by kernel class, each adding up to the total.
    let moved = &v["bytes_moved"];
    let total = moved["total"].as_u64().unwrap();
    let sum = |o: &serde_json::Value, f: &dyn Fn(&serde_json::Value) -> u64| -> u64 {
        o.as_object().unwrap().values().map(f).sum()
    };
    assert_eq!(sum(&moved["by_dtype"], &|b| b.as_u64().unwrap()), total, "{json}");
    assert_eq!(sum(&moved["by_class"], &|c| c["bytes"].as_u64().unwrap()), total, "{json}");
    assert!(total > v["peak_bytes"].as_u64().unwrap() && v["flops"].as_u64().unwrap() > 0, "{json}");
    // The roofline on a named GPU: batch over the estimated step time.
    let (ok, json, e) = tessera(&["plan", cfg, "--memory", "--format", "json", "--batch", "8", "--device", "h100"]);
    assert!(ok, "{e}");
    let r = &serde_json::from_str::<serde_json::Value>(&json).unwrap()["roofline"];
    let (ms, ips) = (r["step_ms"].as_f64().unwrap(), r["img_per_sec"].as_f64().unwrap());
    assert!(ms > 0.0 && (ips - 8.0 / (ms / 1e3)).abs() < 1e-6 * ips, "{json}");
    assert_eq!(r["device"], "h100");
    // Every kernel's cost, in execution order: they add up to the step's
    // bytes and roofline time, and name their op and scope.
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let kernels = v["bytes_moved"]["kernels"].as_array().unwrap();
    assert_eq!(kernels.len() as u64, v["kernels_costed"].as_u64().unwrap(), "{json}");
    let bytes: u64 = kernels.iter().map(|k| k["bytes"].as_u64().unwrap()).sum();
    assert_eq!(bytes, v["bytes_moved"]["total"].as_u64().unwrap(), "{json}");
    // The passes beside library GEMMs: part of the total, kernel by kernel.
    let beside: u64 = kernels.iter().map(|k| k["beside_library_gemm"].as_u64().unwrap()).sum();
    assert_eq!(beside, v["bytes_moved"]["beside_library_gemms"].as_u64().unwrap(), "{json}");
    assert!(beside > 0 && beside < bytes, "{json}");
    let us: f64 = kernels.iter().map(|k| k["roofline_us"].as_f64().unwrap()).sum();
    assert!((us / 1e3 - ms).abs() < 1e-6 * ms, "{us} us vs {ms} ms");
    let index: Vec<u64> = kernels.iter().map(|k| k["index"].as_u64().unwrap()).collect();
    assert!(index.windows(2).all(|w| w[0] < w[1]), "{index:?}");
    assert!(kernels.iter().any(|k| k["op"] == "layer_norm_grad" && k["scope"].as_str().unwrap().ends_with("norm1")));
    let (ok, _, e) = tessera(&["plan", cfg, "--memory", "--device", "tpu"]);
    assert!(!ok && e.contains("the roofline knows h100 and h200"), "{e}");
    let (ok, _, e) = tessera(&["plan", cfg, "--memory-plot", "x.svg", "--device", "h100"]);
    assert!(!ok && e.contains("add --memory"), "{e}");

    let (ok, json, e) = tessera(&["plan", cfg, "--max-batch", "--device-memory", "64MiB", "--format", "json"]);
    assert!(ok, "{e}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let best = v["max_batch"].as_u64().unwrap();
    assert!(best > 16 && v["max_batch_peak_bytes"].as_u64().unwrap() <= 64 << 20, "{json}");
    let over = |b: u64| {
        let (ok, json, e) = tessera(&["plan", cfg, "--memory", "--format", "json", "--batch", &b.to_string()]);
        assert!(ok, "{e}");
        serde_json::from_str::<serde_json::Value>(&json).unwrap()["peak_bytes"].as_u64().unwrap() > 64 << 20
    };
    assert!(!over(best) && over(best + 1), "{best} is the largest batch that fits");

    let dir = std::env::temp_dir().join(format!("tessera-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("timeline.svg");
    let (ok, _, e) = tessera(&["plan", cfg, "--memory-plot", svg.to_str().unwrap()]);
    assert!(ok && e.contains(&format!("tessera: wrote {}", svg.display())), "{e}");
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert!(drawn.starts_with("<svg") && drawn.contains("<rect") && drawn.contains("kept for backward"));
    // Tooltips name the op and module of each storage; the regions of the
    // peak are drawn (compiler/tests/memory.rs checks they add up).
    assert!(drawn.contains("<title>layer_norm_linear in trunk.blocks.0."), "{drawn}");
    for region in ["parameters", "gradients", "optimizer state", "arena", "workspace"] {
        assert!(drawn.contains(&format!("data-region=\"{region}\"")), "no {region} in {drawn}");
    }
    std::fs::remove_dir_all(&dir).ok();

    let (ok, _, e) = tessera(&["plan", cfg, "--max-batch"]);
    assert!(!ok && e.contains("--max-batch needs --device-memory SIZE"), "{e}");
    let (ok, _, e) = tessera(&["plan", cfg, "--max-batch", "--device-memory", "lots"]);
    assert!(!ok && e.contains("`lots` is not a size"), "{e}");
    let (ok, _, e) = tessera(&["plan", cfg]);
    assert!(!ok && e.contains("nothing to report"), "{e}");
}

#[test]
fn cli_memory_budget_recomputes_as_little_as_fits() {
    let vit_b = [
        "config=pretrain/vision_transformer/supervised/16gpu_deit_b_example",
        "MODEL.TRUNK.VISION_TRANSFORMERS.QKV_BIAS=true",
        "MODEL.AMP_PARAMS.USE_AMP=true",
    ];
    let run = |budget: &str| {
        let mut args = vec!["plan"];
        args.extend(vit_b);
        args.extend(["--batch", "64", "--format", "json", "--memory-budget", budget]);
        tessera(&args)
    };
    let (ok, json, e) = run("3GiB");
    assert!(ok, "{e}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["peak_bytes"].as_u64().unwrap() <= 3 << 30, "{json}");
    let chosen = &v["memory_budget"];
    assert!(!chosen["regions"].as_array().unwrap().is_empty() && chosen["extra_flops"].as_u64().unwrap() > 0, "{json}");
    // A roomy budget recomputes nothing.
    let (ok, json, e) = run("80GiB");
    assert!(ok, "{e}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["memory_budget"]["extra_flops"], 0, "{json}");
    let (ok, _, e) = run("100MiB");
    assert!(!ok && e.contains("even recomputing every block the peak is"), "{e}");
}

/// `tessera compile` with a model file holding a very long expression (a
/// chain of additions, of indexing, of field accesses, chains inside
/// nested parentheses) prints an error at the expression and fails; it never
/// overflows the stack (issue 15, defect 7). The expression is in a head the
/// config uses, so it is evaluated; the binary runs on its default
/// main-thread stack, as users run it.
#[test]
fn cli_long_expressions_in_a_model_file_are_errors() {
    let dir = std::env::temp_dir().join(format!("tessera-long-expr-{}", std::process::id()));
    let shapes = [
        ("plus", format!("{}1", "1 + ".repeat(20_000))),
        ("index", format!("x{}", "[0]".repeat(100_000))),
        ("field", format!("cfg{}", ".A".repeat(20_000))),
        ("parens", "(".repeat(100) + "1" + &format!("{})", " + 1".repeat(200)).repeat(100)),
    ];
    for (what, expr) in shapes {
        let models = dir.join(what);
        std::fs::create_dir_all(&models).unwrap();
        let head = format!(
            "head long_head(x: [B, D]) {{\n    a = {expr}\n    param w: [4, D] = zeros\n    return linear(x, w)\n}}\n"
        );
        std::fs::write(models.join("long.tsr"), head).unwrap();
        let (ok, _, err) = tessera(&[
            "compile",
            "config=quickstart/vit_tiny",
            "MODEL.HEAD.PARAMS=[[long_head, {}]]",
            "--models",
            models.to_str().unwrap(),
        ]);
        let shown: String = err.chars().take(400).collect();
        assert!(!ok, "{what}: {shown}");
        assert!(err.starts_with("error: expression nested more than 256 deep"), "{what}: {shown}");
        assert!(err.contains("long.tsr:2:"), "{what}: {shown}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Values that parse but mean nothing or are wrong are errors naming their
/// key when the model compiles, so that compile, plan and train refuse them
/// (issue 15, defect 11).
#[test]
fn values_that_mean_nothing_are_refused_naming_their_key() {
    let vit = "quickstart/vit_tiny";
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["OPTIMIZER.param_schedulers.lr.start_value=-0.001"],
            &["`OPTIMIZER.param_schedulers.lr.start_value`", "is -0.001", "a learning rate must be", "0 or above"],
        ),
        (
            &["OPTIMIZER.param_schedulers.lr_head.values=[0.1, -0.01, 0.001]"],
            &["`OPTIMIZER.param_schedulers.lr_head.values.1`", "is -0.01"],
        ),
        (
            &["OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value=-1"],
            &["`OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value`", "is -1"],
        ),
        (
            &["OPTIMIZER.param_schedulers.lr.start_value=0"],
            &["`OPTIMIZER.param_schedulers.lr`", "the learning rate is 0 for the whole run", "TEST_ONLY"],
        ),
        (
            &["MODEL.HEAD.PARAMS=[]"],
            &[
                "`MODEL.HEAD.PARAMS` is empty",
                "cross_entropy_multiple_output_single_target` needs class scores from a head",
                "MODEL.HEAD.PARAMS=[[mlp, {dims: [64, NUM_CLASSES]}]]",
            ],
        ),
        (
            &["MODEL.TRUNK.VISION_TRANSFORMERS.CLASSIFIER=foo"],
            &["`MODEL.TRUNK.VISION_TRANSFORMERS.CLASSIFIER` is \"foo\"", "valid values: `token`", "`gap`"],
        ),
        (
            &["MODEL.TRUNK.VISION_TRANSFORMERS.CLASSIFIER=gap"],
            &[
                "`MODEL.TRUNK.VISION_TRANSFORMERS.CLASSIFIER` is \"gap\"",
                "only the convit trunk reads",
                "USE_CLASS_TOKEN: False",
            ],
        ),
        (
            &["METERS.accuracy_list_meter.topk_values=[1, 0]"],
            &["`METERS.accuracy_list_meter.topk_values.1` is 0", "k of 1 or more"],
        ),
        (
            &["METERS.accuracy_list_meter.topk_values=[1, 11]"],
            &["`METERS.accuracy_list_meter.topk_values.1` is 11", "above the 10 classes", "from 1 to 10"],
        ),
        (
            &["MODEL.GRAD_CLIP.USE_GRAD_CLIP=True", "MODEL.GRAD_CLIP.MAX_NORM=-1"],
            &["`MODEL.GRAD_CLIP.MAX_NORM` is -1", "must be a positive number"],
        ),
        (&["MODEL.GRAD_CLIP.USE_GRAD_CLIP=True", "MODEL.GRAD_CLIP.MAX_NORM=0"], &["`MODEL.GRAD_CLIP.MAX_NORM` is 0"]),
    ];
    for (overrides, parts) in cases {
        let e = err(vit, overrides);
        for p in *parts {
            assert!(e.contains(p), "{overrides:?}: {e:?} lacks {p:?}");
        }
    }
    // The same values are fine where they mean something.
    compile(vit, &["METERS.accuracy_list_meter.topk_values=[1, 10]"]).unwrap();
    compile(vit, &["MODEL.GRAD_CLIP.USE_GRAD_CLIP=True", "MODEL.GRAD_CLIP.MAX_NORM=0.5"]).unwrap();
    compile("quickstart/convit_tiny", &["MODEL.TRUNK.VISION_TRANSFORMERS.CLASSIFIER=gap"]).unwrap();
    // lr 0 for the trunk trains the heads when they have their own lr.
    compile(
        vit,
        &[
            "OPTIMIZER.param_schedulers.lr.start_value=0",
            "OPTIMIZER.head_optimizer_params.use_different_lr=True",
            "OPTIMIZER.param_schedulers.lr_head.name=constant",
            "OPTIMIZER.param_schedulers.lr_head.value=0.01",
        ],
    )
    .unwrap();
    // The plan command refuses them too.
    let (ok, _, e) =
        tessera(&["plan", "config=quickstart/vit_tiny", "MODEL.TRUNK.VISION_TRANSFORMERS.CLASSIFIER=foo", "--memory"]);
    assert!(!ok && e.contains("`MODEL.TRUNK.VISION_TRANSFORMERS.CLASSIFIER` is \"foo\""), "{e}");
}

/// A model none of whose trainable parameters reaches the loss is a clear
/// error when it compiles, not the runtime's `unknown input
/// optim.bias_correction1` (issue 15, defect 10).
#[test]
fn no_trainable_parameter_reaching_the_loss_says_why() {
    let frozen = [
        "MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON=True",
        "MODEL.FEATURE_EVAL_SETTINGS.FREEZE_TRUNK_ONLY=True",
        "MODEL.NON_TRAINABLE_PARAMS=[heads.0.clf.0.weight, heads.0.clf.0.bias]",
    ];
    for cmd in [&["compile"][..], &["plan", "--memory"], &["compile", "--emit", "plan"]] {
        let mut a = vec![cmd[0], "config=quickstart/vit_tiny"];
        a.extend(frozen);
        a.extend(&cmd[1..]);
        let (ok, _, e) = tessera(&a);
        assert!(!ok, "{a:?}");
        for p in [
            "no trainable parameter reaches the loss",
            "all 30 parameters are frozen",
            "28 (e.g. `trunk.patch_embed.proj.weight`) by MODEL.FEATURE_EVAL_SETTINGS (a frozen trunk)",
            "2 (e.g. `heads.0.clf.0.weight`) by MODEL.NON_TRAINABLE_PARAMS",
            "TEST_ONLY",
        ] {
            assert!(e.contains(p), "{a:?}: {e:?} lacks {p:?}");
        }
        assert!(!e.contains("optim.bias_correction1"), "{e}");
    }
    // A head whose scores do not depend on any parameter.
    let models = std::env::temp_dir().join(format!("tessera-no-grad-{}", std::process::id()));
    std::fs::create_dir_all(&models).unwrap();
    std::fs::write(
        models.join("fixed.tsr"),
        "head fixed_scores(x: [B, D]) {\n    param w: [10, D] = zeros\n    return stop_gradient(linear(x, w))\n}\n",
    )
    .unwrap();
    let (ok, _, e) = tessera(&[
        "compile",
        "config=quickstart/vit_tiny",
        "MODEL.HEAD.PARAMS=[[fixed_scores, {}]]",
        "--models",
        models.to_str().unwrap(),
    ]);
    assert!(!ok, "{e}");
    assert!(e.contains("no trainable parameter reaches the loss"), "{e}");
    assert!(e.contains("loss `cross_entropy_multiple_output_single_target` does not depend on any of the"), "{e}");
    std::fs::remove_dir_all(&models).ok();
}

/// Files of a `--models` directory are shown by their real path in
/// diagnostics (the user edits that file), not as if they were embedded
/// under `models/`; imports between them still resolve (issue 15, defect 10).
#[test]
fn cli_files_from_models_are_shown_by_their_real_path() {
    let dir = std::env::temp_dir().join(format!("tessera-models-path-{}", std::process::id()));
    let heads = dir.join("heads");
    std::fs::create_dir_all(&heads).unwrap();
    std::fs::write(
        dir.join("parts.tsr"),
        "block scores(x: [B, D], n: int) {\n    param w: [n, D] = zeros\n    return linear(x, w)\n}\n",
    )
    .unwrap();
    let head = "import \"../parts.tsr\"\n\nhead my_head(x: [B, D], n: int) {\n    assert n > 1, \"n must be above 1\"\n    return scores(x, n) as clf\n}\n";
    std::fs::write(heads.join("mine.tsr"), head).unwrap();
    let run = |n: u32| {
        let heads = format!("MODEL.HEAD.PARAMS=[[my_head, {{n: {n}}}]]");
        tessera(&["compile", "config=quickstart/vit_tiny", &heads, "--models", dir.to_str().unwrap()])
    };
    let (ok, _, e) = run(1);
    assert!(!ok);
    let shown = heads.join("mine.tsr").display().to_string();
    assert!(e.contains(&format!("{shown}:4:")), "{e}");
    assert!(e.contains("n must be above 1"), "{e}");
    assert!(!e.contains("models/heads/mine.tsr"), "{e}");
    let (ok, out, e) = run(10);
    assert!(ok, "{e}");
    assert!(out.contains("my_head"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}
