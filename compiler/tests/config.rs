//! Integration tests of the experiment-config system (tessera_compiler::config).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{json, Value};
use tessera_compiler::config::{self, ConfigError};

const VIT_CONFIGS: [&str; 13] = [
    "pretrain/vision_transformer/supervised/1gpu_vit_example",
    "pretrain/vision_transformer/supervised/16gpu_deit_b_example",
    "pretrain/vision_transformer/supervised/16gpu_convit_b",
    "pretrain/vision_transformer/supervised/1gpu_convit_b_example",
    "pretrain/vision_transformer/supervised/1gpu_convit_s_example",
    "pretrain/vision_transformer/moco/vit_b16",
    "pretrain/vision_transformer/moco/convit_b",
    "pretrain/vision_transformer/simclr/vit_b16",
    "pretrain/vision_transformer/simclr/vit_l16",
    "pretrain/vision_transformer/simclr/convit_b",
    "pretrain/vision_transformer/swav/deit_b_2nodes",
    "pretrain/vision_transformer/swav/convit_b_2nodes",
    "pretrain/vision_transformer/swav/convit_s_2nodes",
];

const QUICKSTART: [&str; 7] = [
    "quickstart/vit_tiny",
    "quickstart/deit_tiny",
    "quickstart/convit_tiny",
    "quickstart/moco_vit_tiny",
    "quickstart/simclr_vit_tiny",
    "quickstart/swav_vit_tiny",
    "quickstart/vit_example_head",
];

const VIT_EXAMPLE: &str = "pretrain/vision_transformer/supervised/1gpu_vit_example";

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir() -> TempDir {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tessera-config-test-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

fn write(dir: &Path, rel: &str, text: &str) -> PathBuf {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

fn ov(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Loads with no search dirs, so only the embedded copies are used.
fn embedded(name: &str, overrides: &[&str]) -> Result<config::Config, ConfigError> {
    config::load_with(name, &ov(overrides), &[])
}

fn get<'a>(cfg: &'a config::Config, key: &str) -> &'a Value {
    cfg.get(key).unwrap_or_else(|| panic!("{key} missing"))
}

fn load_err(path: &Path, overrides: &[&str]) -> String {
    match config::load_with(path.to_str().unwrap(), &ov(overrides), &[]) {
        Ok(_) => panic!("{} should not load", path.display()),
        Err(e) => e.to_string(),
    }
}

// ------------------------------------------------------------------------------------
// The embedded configs
// ------------------------------------------------------------------------------------

#[test]
fn every_embedded_config_loads() {
    let names = config::embedded_config_names();
    for name in VIT_CONFIGS.iter().chain(&QUICKSTART) {
        assert!(names.iter().any(|n| n == name), "{name} is not embedded: {names:?}");
    }
    assert!(!names.iter().any(|n| n == "defaults"));
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    for name in &names {
        let cfg = embedded(name, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(cfg.name(), name);
        assert!(cfg.source().ends_with(&format!("{name}.yaml")), "{}", cfg.source());
        // every key of defaults is present after the merge
        assert!(cfg.get("OPTIMIZER.param_schedulers.lr.keep_single_node_warmup").is_some());
    }
}

#[test]
fn defaults_are_typed_as_written() {
    let d = config::defaults();
    let vt = &d["MODEL"]["TRUNK"]["VISION_TRANSFORMERS"];
    assert_eq!(vt["LAYER_NORM_EPS"].as_f64(), Some(1.0e-6));
    assert!(vt["LAYER_NORM_EPS"].is_f64());
    assert_eq!(vt["USE_CLASS_TOKEN"], json!(true));
    assert_eq!(vt["HIDDEN_DIM"], json!(768));
    assert!(vt["DROPOUT_RATE"].is_f64());
    assert_eq!(d["MODEL"]["TRUNK"]["CONVIT"]["LAYER_NORM_EPS"].as_f64(), Some(1.0e-5));
    assert_eq!(d["MODEL"]["HEAD"]["BATCHNORM_EPS"].as_f64(), Some(1.0e-5));
    assert_eq!(d["OPTIMIZER"]["larc_config"]["eps"].as_f64(), Some(1.0e-8));
    // tessera keeps a single node's warmup (docs/divergences.md).
    assert_eq!(d["OPTIMIZER"]["param_schedulers"]["lr"]["keep_single_node_warmup"], json!(true));
    assert_eq!(d["MACHINE"]["DEVICE"], json!("cpu"));
    assert_eq!(d["OPTIMIZER"]["betas"], json!([0.9, 0.999]));
    assert_eq!(d["MODEL"]["AMP_PARAMS"]["AMP_ARGS"], json!({"opt_level": "O1"}));
    // the schema annotation is not part of the config tree
    assert!(d.get("tessera_open_keys").is_none());
    // the file itself is loadable as a config, giving the defaults back
    assert_eq!(embedded("defaults", &[]).unwrap().tree(), d);
}

#[test]
fn vit_configs_keep_vissl_values() {
    let cfg = embedded(VIT_EXAMPLE, &[]).unwrap();
    assert_eq!(get(&cfg, "MODEL.TRUNK.NAME"), "vision_transformer");
    assert_eq!(get(&cfg, "MODEL.HEAD.PARAMS.0.0"), "vision_transformer_head");
    assert_eq!(get(&cfg, "MODEL.HEAD.PARAMS.0.1"), &json!({"in_plane": 768, "hidden_dim": 3072, "num_classes": 1000}));
    assert_eq!(get(&cfg, "DATA.TRAIN.LABEL_TYPE"), "sample_index");
    assert_eq!(get(&cfg, "DATA.TRAIN.BATCHSIZE_PER_REPLICA"), 128);
    assert_eq!(get(&cfg, "MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE"), 0.1);
    assert_eq!(get(&cfg, "MODEL.GRAD_CLIP.USE_GRAD_CLIP"), true);
    assert_eq!(get(&cfg, "MODEL.AMP_PARAMS.AMP_ARGS.opt_level"), "O1");
    assert_eq!(get(&cfg, "OPTIMIZER.param_schedulers.lr.lengths"), &json!([0.017, 0.983]));
    assert_eq!(get(&cfg, "OPTIMIZER.param_schedulers.lr.schedulers.1.name"), "cosine");
    assert_eq!(get(&cfg, "HOOKS.TENSORBOARD_SETUP.EXPERIMENT_LOG_DIR"), &Value::Null);
    assert_eq!(get(&cfg, "DATA.TRAIN.TRANSFORMS.1.size"), 224);
    // filled from defaults
    assert_eq!(get(&cfg, "MODEL.TRUNK.VISION_TRANSFORMERS.LAYER_NORM_EPS"), 1.0e-6);
    assert_eq!(get(&cfg, "OPTIMIZER.betas"), &json!([0.9, 0.999]));

    let deit = embedded("pretrain/vision_transformer/supervised/16gpu_deit_b_example", &[]).unwrap();
    assert_eq!(get(&deit, "MODEL.HEAD.PARAMS"), &json!([["mlp", {"dims": [768, 1000]}]]));
    assert_eq!(get(&deit, "DATA.TRAIN.COLLATE_FUNCTION_PARAMS.mixup_alpha"), 0.8);
    assert_eq!(get(&deit, "OPTIMIZER.non_regularized_parameters"), &json!(["pos_embedding", "class_token"]));
    assert_eq!(get(&deit, "DISTRIBUTED.RUN_ID"), "60521");

    let swav = embedded("pretrain/vision_transformer/swav/deit_b_2nodes", &[]).unwrap();
    assert_eq!(
        get(&swav, "MODEL.HEAD.PARAMS"),
        &json!([["swav_head", {"dims": [768, 2048, 128], "use_bn": true, "num_clusters": [3000]}]])
    );
    assert_eq!(get(&swav, "MODEL.TEMP_FROZEN_PARAMS_ITER_MAP"), &json!([["module.heads.0.prototypes0.weight", 313]]));
    assert_eq!(get(&swav, "MODEL.TRUNK.VISION_TRANSFORMERS.NUM_HEADS"), 16);
}

#[test]
fn deliberate_corrections() {
    let moco = embedded("pretrain/vision_transformer/moco/convit_b", &[]).unwrap();
    assert_eq!(get(&moco, "MODEL.TRUNK.NAME"), "convit");
    let swav = embedded("pretrain/vision_transformer/swav/convit_s_2nodes", &[]).unwrap();
    let nodes = get(&swav, "DISTRIBUTED.NUM_NODES").as_u64().unwrap();
    let procs = get(&swav, "DISTRIBUTED.NUM_PROC_PER_NODE").as_u64().unwrap();
    let batch = get(&swav, "DATA.TRAIN.BATCHSIZE_PER_REPLICA").as_u64().unwrap();
    assert_eq!((nodes, procs, nodes * procs * batch), (2, 4, 256));
}

#[test]
fn quickstarts_are_cpu_sized() {
    for name in QUICKSTART {
        let cfg = embedded(name, &[]).unwrap();
        assert_eq!(get(&cfg, "MACHINE.DEVICE"), "cpu", "{name}");
        assert_eq!(get(&cfg, "DISTRIBUTED.NUM_NODES"), 1, "{name}");
        assert_eq!(get(&cfg, "DISTRIBUTED.NUM_PROC_PER_NODE"), 1, "{name}");
        let on_folder = ["vit_tiny", "deit_tiny", "moco_vit_tiny", "simclr_vit_tiny", "swav_vit_tiny"];
        if on_folder.iter().any(|n| *name == format!("quickstart/{n}")) {
            // The quickstarts that learn something train on the generated image
            // folder (5000 images): at most 4000 steps, a few minutes on 2 cores.
            assert_eq!(get(&cfg, "DATA.TRAIN.DATA_SOURCES"), &json!(["disk_folder"]), "{name}");
            assert_eq!(get(&cfg, "DATA.TRAIN.DATASET_NAMES"), &json!(["quickstart_shapes"]), "{name}");
            let epochs = get(&cfg, "OPTIMIZER.num_epochs").as_u64().unwrap();
            let batch = get(&cfg, "DATA.TRAIN.BATCHSIZE_PER_REPLICA").as_u64().unwrap();
            assert!(epochs * 5000 / batch <= 4000, "{name}: {epochs} epochs of batch {batch}");
        } else {
            assert_eq!(get(&cfg, "OPTIMIZER.num_epochs"), 2, "{name}");
            assert_eq!(get(&cfg, "DATA.TRAIN.DATA_SOURCES"), &json!(["synthetic"]), "{name}");
            let limit = get(&cfg, "DATA.TRAIN.DATA_LIMIT").as_i64().unwrap();
            assert!((1..=256).contains(&limit), "{name}: DATA_LIMIT {limit}");
        }
        assert_eq!(get(&cfg, "MODEL.TRUNK.VISION_TRANSFORMERS.IMAGE_SIZE"), 32, "{name}");
    }
    let convit = embedded("quickstart/convit_tiny", &[]).unwrap();
    assert_eq!(get(&convit, "MODEL.TRUNK.NAME"), "convit");
    assert_eq!(get(&convit, "MODEL.TRUNK.CONVIT.N_GPSA_LAYERS"), 2);
    assert_eq!(get(&convit, "MODEL.TRUNK.CONVIT.LOCALITY_DIM"), 1);
    let head = embedded("quickstart/vit_example_head", &[]).unwrap();
    assert_eq!(
        get(&head, "MODEL.HEAD.PARAMS.0"),
        &json!(["vision_transformer_head", {"in_plane": 64, "hidden_dim": 32, "num_classes": 10}])
    );
    let swav = embedded("quickstart/swav_vit_tiny", &[]).unwrap();
    assert_eq!(get(&swav, "MODEL.HEAD.PARAMS.0.1.num_clusters"), &json!([100]));
}

// ------------------------------------------------------------------------------------
// Overrides
// ------------------------------------------------------------------------------------

#[test]
fn set_overrides_parse_values_as_yaml() {
    let cfg = embedded(
        VIT_EXAMPLE,
        &[
            "OPTIMIZER.num_epochs=1",
            "OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value=1e-3",
            "DATA.TRAIN.DATA_PATHS=[/data/train, /data/more]",
            "MODEL.TRUNK.VISION_TRANSFORMERS.name=null",
            "CHECKPOINT.DIR=/tmp/run #1",
            "DISTRIBUTED.RUN_ID=60215",
            "MODEL.GRAD_CLIP.MAX_NORM=3",
            "MODEL.TRUNK.VISION_TRANSFORMERS.QKV_BIAS=True",
            "HOOKS.TENSORBOARD_SETUP.EXPERIMENT_LOG_DIR=",
        ],
    )
    .unwrap();
    assert_eq!(get(&cfg, "OPTIMIZER.num_epochs"), &json!(1));
    let lr = get(&cfg, "OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value");
    assert!(lr.is_f64());
    assert_eq!(lr.as_f64(), Some(0.001));
    assert_eq!(get(&cfg, "DATA.TRAIN.DATA_PATHS"), &json!(["/data/train", "/data/more"]));
    assert_eq!(get(&cfg, "MODEL.TRUNK.VISION_TRANSFORMERS.name"), &Value::Null);
    assert_eq!(get(&cfg, "CHECKPOINT.DIR"), "/tmp/run #1");
    // a string key keeps the text typed, not the integer YAML would make of it
    assert_eq!(get(&cfg, "DISTRIBUTED.RUN_ID"), "60215");
    assert_eq!(get(&cfg, "MODEL.GRAD_CLIP.MAX_NORM"), &json!(3));
    assert_eq!(get(&cfg, "MODEL.TRUNK.VISION_TRANSFORMERS.QKV_BIAS"), true);
    assert_eq!(get(&cfg, "HOOKS.TENSORBOARD_SETUP.EXPERIMENT_LOG_DIR"), "");
}

#[test]
fn vissl_config_prefix_spelling() {
    let plain = embedded(VIT_EXAMPLE, &["OPTIMIZER.num_epochs=1", "~MODEL.HEAD.PARAMS.0"]).unwrap();
    let vissl = embedded(VIT_EXAMPLE, &["config.OPTIMIZER.num_epochs=1", "~config.MODEL.HEAD.PARAMS.0"]).unwrap();
    assert_eq!(plain.tree(), vissl.tree());
    assert_eq!(get(&vissl, "config.OPTIMIZER.num_epochs"), 1);
    assert_eq!(get(&vissl, "MODEL.HEAD.PARAMS"), &json!([]));
    let added = embedded(VIT_EXAMPLE, &["+config.DATA.TRAIN.COLLATE_FUNCTION_PARAMS.num_classes=10"]).unwrap();
    assert_eq!(get(&added, "DATA.TRAIN.COLLATE_FUNCTION_PARAMS.num_classes"), 10);
}

#[test]
fn add_upsert_delete_and_list_indices() {
    let deit = "pretrain/vision_transformer/supervised/16gpu_deit_b_example";
    let cfg = embedded(
        deit,
        &[
            "+DATA.TRAIN.COLLATE_FUNCTION_PARAMS.cutmix_minmax=[0.2, 0.8]",
            "++MODEL.AMP_PARAMS.AMP_ARGS.keep_batchnorm_fp32=True",
            "++MODEL.AMP_PARAMS.AMP_ARGS.opt_level=O2",
            "++OPTIMIZER.num_epochs=7",
            "~DATA.TRAIN.COLLATE_FUNCTION_PARAMS.mode",
            "~DATA.TRAIN.TRANSFORMS.2",
            "MODEL.HEAD.PARAMS.0.1.dims=[768, 10]",
            "DATA.TRAIN.TRANSFORMS.0.size=192",
            "+DATA.TEST.TRANSFORMS.4={name: RandomHorizontalFlip}",
            "+SLURM.ADDITIONAL_PARAMETERS.account.name=vision",
        ],
    )
    .unwrap();
    assert_eq!(get(&cfg, "DATA.TRAIN.COLLATE_FUNCTION_PARAMS.cutmix_minmax"), &json!([0.2, 0.8]));
    assert_eq!(get(&cfg, "MODEL.AMP_PARAMS.AMP_ARGS"), &json!({"opt_level": "O2", "keep_batchnorm_fp32": true}));
    assert_eq!(get(&cfg, "OPTIMIZER.num_epochs"), 7);
    assert!(cfg.get("DATA.TRAIN.COLLATE_FUNCTION_PARAMS.mode").is_none());
    // RandAugment (index 2) removed: ColorJitter moved up
    assert_eq!(get(&cfg, "DATA.TRAIN.TRANSFORMS.2.name"), "ColorJitter");
    assert_eq!(get(&cfg, "MODEL.HEAD.PARAMS"), &json!([["mlp", {"dims": [768, 10]}]]));
    assert_eq!(get(&cfg, "DATA.TRAIN.TRANSFORMS.0.size"), 192);
    assert_eq!(get(&cfg, "DATA.TEST.TRANSFORMS.4"), &json!({"name": "RandomHorizontalFlip"}));
    assert_eq!(get(&cfg, "SLURM.ADDITIONAL_PARAMETERS.account.name"), "vision");
    // ~KEY=VALUE deletes only when the value matches
    let err = embedded(deit, &["~DATA.TRAIN.COLLATE_FUNCTION_PARAMS.mode=pair"]).unwrap_err().to_string();
    assert!(err.contains("not string \"pair\""), "{err}");
    assert!(embedded(deit, &["~DATA.TRAIN.COLLATE_FUNCTION_PARAMS.mode=batch"]).is_ok());
}

#[test]
fn map_values_merge_into_sections() {
    let cfg = embedded(VIT_EXAMPLE, &["MODEL.TRUNK.VISION_TRANSFORMERS={NUM_LAYERS: 2, HIDDEN_DIM: 64}"]).unwrap();
    assert_eq!(get(&cfg, "MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS"), 2);
    assert_eq!(get(&cfg, "MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM"), 64);
    assert_eq!(get(&cfg, "MODEL.TRUNK.VISION_TRANSFORMERS.PATCH_SIZE"), 16);
    let err = embedded(VIT_EXAMPLE, &["MODEL.TRUNK.VISION_TRANSFORMERS={NUM_LAYER: 2}"]).unwrap_err().to_string();
    assert!(err.contains("MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYER"), "{err}");
    assert!(err.contains("did you mean `MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS`?"), "{err}");
}

#[test]
fn overrides_apply_in_order() {
    let cfg = embedded(VIT_EXAMPLE, &["OPTIMIZER.num_epochs=3", "OPTIMIZER.num_epochs=4"]).unwrap();
    assert_eq!(get(&cfg, "OPTIMIZER.num_epochs"), 4);
    let cfg =
        embedded(VIT_EXAMPLE, &["~MODEL.AMP_PARAMS.AMP_ARGS.opt_level", "+MODEL.AMP_PARAMS.AMP_ARGS.opt_level=O0"])
            .unwrap();
    assert_eq!(get(&cfg, "MODEL.AMP_PARAMS.AMP_ARGS.opt_level"), "O0");
}

#[test]
fn config_group_fragment_is_merged() {
    let dir = temp_dir();
    write(
        &dir,
        "benchmark/models/tiny_vit.yaml",
        "# @package _global_\nconfig:\n  MODEL:\n    TRUNK:\n      VISION_TRANSFORMERS:\n        NUM_LAYERS: 3\n",
    );
    let cfg = config::load_with(
        VIT_EXAMPLE,
        // the value override comes first but is applied after the group, as in Hydra
        &ov(&["config.MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM=96", "+config/benchmark/models=tiny_vit"]),
        std::slice::from_ref(&*dir),
    )
    .unwrap();
    assert_eq!(get(&cfg, "MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS"), 3);
    assert_eq!(get(&cfg, "MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM"), 96);
    let err = config::load_with(VIT_EXAMPLE, &ov(&["+config/benchmark/models=huge_vit"]), std::slice::from_ref(&*dir))
        .unwrap_err()
        .to_string();
    assert!(err.contains("benchmark/models/huge_vit"), "{err}");
    assert!(err.contains("<embedded>/configs/benchmark/models/huge_vit.yaml"), "{err}");
}

// ------------------------------------------------------------------------------------
// Error messages
// ------------------------------------------------------------------------------------

#[test]
fn unknown_key_in_file_names_key_file_line_and_suggestion() {
    let dir = temp_dir();
    let path = write(
        &dir,
        "typo.yaml",
        "# @package _global_\nconfig:\n  MODEL:\n    TRUNK:\n      VISION_TRANSFORMERS:\n        HIDEN_DIM: 64\n",
    );
    let err = load_err(&path, &[]);
    assert!(err.contains("unknown config key `MODEL.TRUNK.VISION_TRANSFORMERS.HIDEN_DIM`"), "{err}");
    assert!(err.contains(&format!("{}:6", path.display())), "{err}");
    assert!(err.contains("did you mean `MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM`?"), "{err}");
}

#[test]
fn unknown_keys_are_all_reported_with_suggestions() {
    let dir = temp_dir();
    let path = write(
        &dir,
        "typos.yaml",
        "config:\n  OPTIMIZER:\n    weigth_decay: 0.1\n  MODEL:\n    HIDDEN_DIM: 64\n    TRUNK:\n      VISION_TRANSFORMER:\n        NUM_LAYERS: 2\n",
    );
    let err = load_err(&path, &[]);
    assert!(err.starts_with("3 config errors"), "{err}");
    assert!(err.contains("`OPTIMIZER.weigth_decay`"), "{err}");
    assert!(err.contains(&format!("{}:3", path.display())), "{err}");
    assert!(err.contains("did you mean `OPTIMIZER.weight_decay`?"), "{err}");
    // a key at the wrong level: suggest where it lives
    assert!(err.contains("did you mean `MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM`?"), "{err}");
    // an unknown section is reported once, at its own line
    assert!(err.contains("`MODEL.TRUNK.VISION_TRANSFORMER`"), "{err}");
    assert!(err.contains(&format!("{}:7", path.display())), "{err}");
    assert!(err.contains("did you mean `MODEL.TRUNK.VISION_TRANSFORMERS`?"), "{err}");
}

#[test]
fn unknown_key_in_override() {
    let err = embedded(VIT_EXAMPLE, &["config.MODEL.TRUNK.VISION_TRANSFORMER.HIDDEN_DIM=64"]).unwrap_err().to_string();
    assert!(err.contains("unknown config key `MODEL.TRUNK.VISION_TRANSFORMER.HIDDEN_DIM`"), "{err}");
    assert!(err.contains("override `config.MODEL.TRUNK.VISION_TRANSFORMER.HIDDEN_DIM=64`"), "{err}");
    assert!(err.contains("did you mean `MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM`?"), "{err}");

    let err = embedded(VIT_EXAMPLE, &["OPTIMIZER.lr=0.1"]).unwrap_err().to_string();
    assert!(err.contains("unknown config key `OPTIMIZER.lr`"), "{err}");
    let err = embedded(VIT_EXAMPLE, &["optimizer.num_epochs=1"]).unwrap_err().to_string();
    assert!(err.contains("did you mean `OPTIMIZER.num_epochs`?"), "{err}");
    let err = embedded(VIT_EXAMPLE, &["MODEL.NUM_HEADS=4"]).unwrap_err().to_string();
    assert!(err.contains("did you mean `MODEL.TRUNK.VISION_TRANSFORMERS.NUM_HEADS`?"), "{err}");
    // `+` cannot add keys that the schema does not know either
    let err = embedded(VIT_EXAMPLE, &["+MODEL.TRUNK.VISION_TRANSFORMERS.DEPTH=4"]).unwrap_err().to_string();
    assert!(err.contains("unknown config key `MODEL.TRUNK.VISION_TRANSFORMERS.DEPTH`"), "{err}");
}

#[test]
fn plus_on_existing_key_is_an_error() {
    let err = embedded(VIT_EXAMPLE, &["+OPTIMIZER.num_epochs=3"]).unwrap_err();
    assert!(matches!(err, ConfigError::KeyExists { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("`OPTIMIZER.num_epochs` already exists"), "{text}");
    assert!(text.contains("`++OPTIMIZER.num_epochs=...`"), "{text}");
    // setting a key that is absent (though allowed) asks for `+`
    let err = embedded(VIT_EXAMPLE, &["DATA.TRAIN.COLLATE_FUNCTION_PARAMS.mixup_alpha=0.5"]).unwrap_err().to_string();
    assert!(err.contains("+DATA.TRAIN.COLLATE_FUNCTION_PARAMS.mixup_alpha="), "{err}");
}

#[test]
fn wrong_type_names_key_expected_type_and_origin() {
    let dir = temp_dir();
    let path = write(&dir, "types.yaml", "config:\n  OPTIMIZER:\n    num_epochs: ten\n");
    let err = load_err(&path, &[]);
    assert!(err.contains("`OPTIMIZER.num_epochs` expects an integer"), "{err}");
    assert!(err.contains("string \"ten\""), "{err}");
    assert!(err.contains(&format!("{}:3", path.display())), "{err}");

    let err = embedded(VIT_EXAMPLE, &["MODEL.GRAD_CLIP.USE_GRAD_CLIP=7"]).unwrap_err().to_string();
    assert!(err.contains("`MODEL.GRAD_CLIP.USE_GRAD_CLIP` expects a bool"), "{err}");
    assert!(err.contains("integer 7"), "{err}");
    assert!(err.contains("override `MODEL.GRAD_CLIP.USE_GRAD_CLIP=7`"), "{err}");

    let err = embedded(VIT_EXAMPLE, &["DATA.TRAIN.BATCHSIZE_PER_REPLICA=12.5"]).unwrap_err().to_string();
    assert!(err.contains("expects an integer") && err.contains("float 12.5"), "{err}");
    let err = embedded(VIT_EXAMPLE, &["OPTIMIZER.weight_decay=high"]).unwrap_err().to_string();
    assert!(err.contains("expects a number (integer or float)"), "{err}");
    let err = embedded(VIT_EXAMPLE, &["DATA.TRAIN.TRANSFORMS=ToTensor"]).unwrap_err().to_string();
    assert!(err.contains("expects a list"), "{err}");
    let err = embedded(VIT_EXAMPLE, &["MODEL.TRUNK=convit"]).unwrap_err().to_string();
    assert!(err.contains("`MODEL.TRUNK` expects a map"), "{err}");
    let err = embedded(VIT_EXAMPLE, &["OPTIMIZER.weight_decay=0.05,0.3"]).unwrap_err().to_string();
    assert!(err.contains("VISSL sweep"), "{err}");
    let err = embedded(VIT_EXAMPLE, &["OPTIMIZER.num_epochs=null"]).unwrap_err().to_string();
    assert!(err.contains("expects an integer, but got null"), "{err}");
}

#[test]
fn missing_config_lists_searched_paths() {
    let dir = temp_dir();
    let err =
        config::load_with("pretrain/vision_transformer/supervised/1gpu_vit_exampel", &[], std::slice::from_ref(&*dir))
            .unwrap_err();
    assert!(matches!(err, ConfigError::NotFound { .. }));
    let text = err.to_string();
    assert!(text.contains("config `pretrain/vision_transformer/supervised/1gpu_vit_exampel` not found"), "{text}");
    assert!(text.contains("  - pretrain/vision_transformer/supervised/1gpu_vit_exampel.yaml"), "{text}");
    let in_dir = dir.join("pretrain/vision_transformer/supervised/1gpu_vit_exampel.yaml");
    assert!(text.contains(&in_dir.display().to_string()), "{text}");
    assert!(text.contains("<embedded>/configs/pretrain/vision_transformer/supervised/1gpu_vit_exampel.yaml"), "{text}");
    assert!(text.contains(&format!("did you mean `{VIT_EXAMPLE}`?")), "{text}");
    // the default search dir is ./configs
    let text = config::load("no/such/config", &[]).unwrap_err().to_string();
    assert!(text.contains(&Path::new("configs").join("no/such/config.yaml").display().to_string()), "{text}");
}

#[test]
fn yaml_syntax_error_has_file_line_and_column() {
    let dir = temp_dir();
    let path = write(&dir, "broken.yaml", "config:\n  MODEL:\n    TRUNK: [1, 2\n    HEAD: 3\n");
    let err = config::load_with(path.to_str().unwrap(), &[], &[]).unwrap_err();
    match &err {
        ConfigError::Yaml { line, column, .. } => assert!(*line >= 3 && *column > 0, "{err:?}"),
        other => panic!("expected a YAML error, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.starts_with(&format!("{}:", path.display())), "{text}");
    assert!(text.contains("YAML syntax error"), "{text}");

    let path = write(&dir, "tabs.yaml", "config:\n  A: \"unterminated\n");
    let text = load_err(&path, &[]);
    assert!(text.contains(&format!("{}:2:", path.display())), "{text}");
}

#[test]
fn layout_errors() {
    let dir = temp_dir();
    let path = write(&dir, "list.yaml", "- a\n- b\n");
    assert!(load_err(&path, &[]).contains("must be a mapping"));
    let path = write(&dir, "extra.yaml", "config:\n  SEED_VALUE: 1\nSEED_VALUE: 2\n");
    assert!(load_err(&path, &[]).contains("unexpected top-level key `SEED_VALUE`"));
    let path = write(&dir, "scalar_config.yaml", "config: 3\n");
    assert!(load_err(&path, &[]).contains("`config:` must be a mapping"));
}

#[test]
fn bad_overrides_are_errors_not_panics() {
    for bad in [
        "",
        "=",
        "+",
        "~",
        "++",
        "=3",
        "OPTIMIZER.num_epochs",
        "a..b=1",
        ".a=1",
        "config=x",
        "config/x=",
        "~config/x",
        "OPTIMIZER.num_epochs=[1",
        "MODEL.HEAD.PARAMS.7.1=3",
        "~MODEL.HEAD.PARAMS.9",
        "+MODEL.HEAD.PARAMS.5=[mlp, {}]",
        "~OPTIMIZER.nope",
        "OPTIMIZER.num_epochs.x=1",
        "+OPTIMIZER.num_epochs.x=1",
        "MODEL.HEAD.PARAMS.x=1",
    ] {
        let result = embedded(VIT_EXAMPLE, &[bad]);
        assert!(result.is_err(), "`{bad}` was accepted");
        assert!(!result.unwrap_err().to_string().is_empty());
    }
}

// ------------------------------------------------------------------------------------
// Files, search dirs, YAML output
// ------------------------------------------------------------------------------------

#[test]
fn file_paths_search_dirs_and_bare_trees() {
    let dir = temp_dir();
    // a bare tree (no `config:`) is accepted
    let path = write(&dir, "bare.yaml", "OPTIMIZER:\n  num_epochs: 5\n");
    let cfg = config::load_with(path.to_str().unwrap(), &[], &[]).unwrap();
    assert_eq!(get(&cfg, "OPTIMIZER.num_epochs"), 5);
    assert_eq!(cfg.name(), path.to_str().unwrap());
    // the path without .yaml
    let stem = path.to_str().unwrap().trim_end_matches(".yaml");
    assert_eq!(get(&config::load_with(stem, &[], &[]).unwrap(), "OPTIMIZER.num_epochs"), 5);
    // an empty file is the defaults
    let path = write(&dir, "empty.yaml", "# @package _global_\n");
    assert_eq!(config::load_with(path.to_str().unwrap(), &[], &[]).unwrap().tree(), config::defaults());
    // a search dir wins over the embedded copy
    write(&dir, "quickstart/vit_tiny.yaml", "config:\n  SEED_VALUE: 42\n");
    let cfg = config::load_with("quickstart/vit_tiny", &[], std::slice::from_ref(&*dir)).unwrap();
    assert_eq!(get(&cfg, "SEED_VALUE"), 42);
    assert!(cfg.source().starts_with(dir.to_str().unwrap()), "{}", cfg.source());
}

#[test]
fn to_yaml_round_trips() {
    let dir = temp_dir();
    for name in config::embedded_config_names() {
        let cfg = embedded(&name, &[]).unwrap();
        let yaml = cfg.to_yaml();
        assert_eq!(yaml, cfg.to_yaml(), "{name}: not deterministic");
        assert!(yaml.starts_with("# @package _global_\nconfig:\n"), "{name}");
        let path = write(&dir, &format!("{}.yaml", name.replace('/', "_")), &yaml);
        let back =
            config::load_with(path.to_str().unwrap(), &[], &[]).unwrap_or_else(|e| panic!("{name}: {e}\n{yaml}"));
        assert_eq!(back.tree(), cfg.tree(), "{name}");
    }
    // awkward values survive too
    let cfg = embedded(
        VIT_EXAMPLE,
        &[
            "+DATA.TRAIN.COLLATE_FUNCTION_PARAMS.odd=['yes', '007', 'a: b', '', 'x # y', 'tab\there', '1e5']",
            "CHECKPOINT.DIR=\"True\"",
            "OPTIMIZER.weight_decay=1e-20",
        ],
    )
    .unwrap();
    let path = write(&dir, "awkward.yaml", &cfg.to_yaml());
    assert_eq!(config::load_with(path.to_str().unwrap(), &[], &[]).unwrap().tree(), cfg.tree());
    assert!(cfg.to_yaml().contains("weight_decay: 1.0e-20"));
}

#[test]
fn to_yaml_looks_like_vissl() {
    let yaml = embedded(VIT_EXAMPLE, &[]).unwrap().to_yaml();
    assert!(
        yaml.contains(
            "\n      PARAMS: [[vision_transformer_head, {in_plane: 768, hidden_dim: 3072, num_classes: 1000}]]\n"
        ),
        "{yaml}"
    );
    assert!(yaml.contains("\n        - name: ColorJitter\n          brightness: 0.4\n"), "{yaml}");
    assert!(yaml.contains("\n          mean: [0.485, 0.456, 0.406]\n"), "{yaml}");
    assert!(yaml.contains("\n        LAYER_NORM_EPS: 1.0e-6\n"), "{yaml}");
    assert!(yaml.contains("\n      EXPERIMENT_LOG_DIR: null\n"), "{yaml}");
}

#[test]
fn get_handles_paths() {
    let cfg = embedded(VIT_EXAMPLE, &[]).unwrap();
    assert_eq!(cfg.get(""), Some(cfg.tree()));
    assert!(cfg.get("MODEL.HEAD.PARAMS.1").is_none());
    assert!(cfg.get("MODEL.HEAD.PARAMS.x").is_none());
    assert!(cfg.get("SEED_VALUE.x").is_none());
    assert!(cfg.get("MODEL..TRUNK").is_none());
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// No override text makes loading panic.
        #[test]
        fn overrides_never_panic(text in "[+~]{0,2}[A-Za-z_.0-9/]{0,30}(=[ -~]{0,20})?") {
            let _ = config::load_with("quickstart/vit_tiny", &[text], &[]);
        }

        /// No file content makes loading panic.
        #[test]
        fn files_never_panic(text in "[ -~\n\t]{0,120}") {
            let dir = temp_dir();
            let path = write(&dir, "fuzz.yaml", &text);
            let _ = config::load_with(path.to_str().unwrap(), &[], &[]);
        }
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let dir = temp_dir();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let path = write(&dir, "deep.yaml", &format!("config:\n  DATA:\n    TRAIN:\n      TRANSFORMS: {deep}\n"));
    let err = load_err(&path, &[]);
    assert!(err.contains("YAML syntax error"), "{}", &err[..200.min(err.len())]);
    let override_text = format!("++SLURM.ADDITIONAL_PARAMETERS.x={deep}");
    assert!(config::load_with(VIT_EXAMPLE, &[override_text], &[]).is_err());
}

/// YAML errors say what is wrong in the file's terms, with file:line, not
/// how to configure the YAML library ("set DuplicateKeyPolicy in Options")
/// (issue 15, defect 10).
#[test]
fn yaml_errors_are_in_plain_words() {
    let dir = temp_dir();
    let text = "config:\n  MODEL:\n    TRUNK:\n      NAME: vision_transformer\n    HEAD:\n      PARAMS: []\n    TRUNK:\n      NAME: x\n";
    let path = write(&dir, "dup.yaml", text);
    let err = load_err(&path, &[]);
    assert!(err.starts_with(&format!("{}:7:5:", path.display())), "{err}");
    assert!(err.contains("duplicate key `TRUNK` at line 7 (first at line 3)"), "{err}");
    for library in ["DuplicateKeyPolicy", "Options", "duplicate mapping key"] {
        assert!(!err.contains(library), "{err}");
    }
    // In an override (a flow mapping on one line): no first line to name.
    let err = embedded(VIT_EXAMPLE, &["MODEL.HEAD.PARAMS={a: 1, a: 2}"]).unwrap_err().to_string();
    assert!(err.contains("duplicate key `a` at line 1:") && !err.contains("Options"), "{err}");
    let path = write(&dir, "two.yaml", "config:\n  VERBOSE: True\n---\nconfig:\n  VERBOSE: False\n");
    let err = load_err(&path, &[]);
    assert!(err.contains("the file holds several YAML documents") && !err.contains("from_str_multidoc"), "{err}");
    let path = write(&dir, "loop.yaml", "config:\n  A: &a [*a]\n");
    let err = load_err(&path, &[]);
    assert!(err.contains("an alias (`*name`) refers to a value that contains it"), "{err}");
    assert!(!err.contains("weak"), "{err}");
}

/// `config=<a directory>` says it is a directory and how to name one of its
/// configs, instead of "not found" (issue 15, defect 10).
#[test]
fn a_directory_named_as_config_lists_its_configs() {
    let dir = temp_dir();
    write(&dir, "runs/a.yaml", "config: {}\n");
    write(&dir, "runs/sub/b.yaml", "config: {}\n");
    write(&dir, "runs/notes.txt", "not a config\n");
    let name = dir.join("runs").display().to_string();
    let err = config::load_with(&name, &[], &[]).unwrap_err();
    assert!(matches!(err, ConfigError::IsDirectory { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&format!("config `{name}` is a directory ({name}), not a config file")), "{text}");
    assert!(text.contains(&format!("config={name}/a\n")) && text.contains(&format!("config={name}/sub/b")), "{text}");
    assert!(!text.contains("notes"), "{text}");
    // Found through a search dir, named relative to it.
    let err = config::load_with("runs", &[], &[dir.to_path_buf()]).unwrap_err().to_string();
    assert!(err.contains("name one of its 2 configs") && err.contains("  - config=runs/a"), "{err}");
    // The embedded tree's directories too.
    let err = embedded("quickstart", &[]).unwrap_err().to_string();
    assert!(err.contains("is a directory (<embedded>/configs/quickstart)"), "{err}");
    assert!(err.contains("config=quickstart/vit_tiny"), "{err}");
    // Many configs: a count, an example and how to name one.
    let err = embedded("pretrain", &[]).unwrap_err().to_string();
    assert!(err.contains("it holds 13 .yaml configs") && err.contains("`config=pretrain/NAME`"), "{err}");
    // An empty directory says so.
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let err = config::load_with(dir.join("empty").to_str().unwrap(), &[], &[]).unwrap_err().to_string();
    assert!(err.contains("it holds no .yaml config"), "{err}");
}

/// A config file of any size is read with a bound: a huge file is an error
/// naming it, not an allocation that exhausts memory.
#[test]
fn a_huge_config_file_is_refused_before_it_is_read_whole() {
    let dir = temp_dir();
    let mut text = String::from("config:\n  SEED_VALUE: 1\n");
    text.push_str(&"# padding padding padding padding padding padding padding padding\n".repeat(300_000));
    assert!(text.len() > 17 << 20);
    let path = write(&dir.0, "huge.yaml", &text);
    let e = load_err(&path, &[]);
    assert!(e.contains("huge.yaml") && e.contains("larger than 16 MiB"), "{e}");
}
