//! Every config under `configs/pretrain/vision_transformer/` trains through
//! `tessera train` for two steps on a generated image folder, with tiny
//! overrides a user would write on the command line (a 2-layer, 32-wide
//! trunk on 32x32 crops, narrow hidden head layers, batch 8), and logs finite
//! losses. The configs' own data pipelines (multi-crop, cutmixup with
//! ssl_method, the moco and simclr collators), losses (MoCo's 65536-key
//! queue, SwAV's 3000 prototypes), AMP and clipping settings are kept.

use serde_json::Value;
use std::path::{Path, PathBuf};
use tessera_compiler::config;

mod cli;
use cli::{records, run, synth_folder, text};

/// Config names (`pretrain/vision_transformer/moco/vit_b16`) under `dir`.
fn configs_under(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            configs_under(root, &p, out);
        } else if p.extension().is_some_and(|e| e == "yaml") {
            let rel = p.strip_prefix(root).unwrap().with_extension("");
            out.push(rel.to_string_lossy().into_owned());
        }
    }
}

/// The command-line overrides that shrink config `name` to a tiny model on `data`.
fn tiny_overrides(name: &str, data: &Path, ckpt: &Path) -> Vec<String> {
    let cfg = config::load(name, &[]).unwrap_or_else(|e| panic!("{name}: {e}")).tree().clone();
    let vt = "MODEL.TRUNK.VISION_TRANSFORMERS";
    let mut ov: Vec<String> = vec![
        format!("{vt}.IMAGE_SIZE=32"),
        format!("{vt}.PATCH_SIZE=8"),
        format!("{vt}.NUM_LAYERS=2"),
        format!("{vt}.NUM_HEADS=2"),
        format!("{vt}.HIDDEN_DIM=32"),
        format!("{vt}.MLP_DIM=64"),
        "MODEL.TRUNK.CONVIT.N_GPSA_LAYERS=1".into(),
        "DATA.TRAIN.DATA_SOURCES=[disk_folder]".into(),
        format!("DATA.TRAIN.DATA_PATHS=[{}]", data.join("train").display()),
        "DATA.TRAIN.BATCHSIZE_PER_REPLICA=8".into(),
        "DATA.TEST.DATA_SOURCES=[disk_folder]".into(),
        format!("DATA.TEST.DATA_PATHS=[{}]", data.join("val").display()),
        "DATA.TEST.BATCHSIZE_PER_REPLICA=8".into(),
        "DATA.NUM_DATALOADER_WORKERS=1".into(),
        format!("CHECKPOINT.DIR={}", ckpt.display()),
        "LOG_FREQUENCY=1".into(),
        // The seed's configs say gpu; this test trains on the CPU.
        "MACHINE.DEVICE=cpu".into(),
        // One process (the configs ask for up to 2 nodes of 8).
        "DISTRIBUTED.NUM_NODES=1".into(),
        "DISTRIBUTED.NUM_PROC_PER_NODE=1".into(),
    ];
    // Crops of 32 pixels wherever the pipeline sizes them.
    for split in ["TRAIN", "TEST"] {
        let key = format!("DATA.{split}.TRANSFORMS");
        let Some(Value::Array(ts)) = cfg.pointer(&format!("/DATA/{split}/TRANSFORMS")) else { continue };
        for (i, t) in ts.iter().enumerate() {
            match t["name"].as_str().unwrap_or("") {
                "RandomResizedCrop" | "CenterCrop" => ov.push(format!("{key}.{i}.size=32")),
                "Resize" => ov.push(format!("{key}.{i}.size=36")),
                "ImgPilToMultiCrop" => {
                    let n = t["size_crops"].as_array().map_or(0, |a| a.len());
                    ov.push(format!("{key}.{i}.size_crops=[{}]", vec!["32"; n].join(", ")));
                }
                _ => {}
            }
        }
    }
    // Heads: the trunk's width in, hidden layers 64 wide; outputs (classes,
    // embeddings, prototypes) as configured.
    let Some(Value::Array(heads)) = cfg.pointer("/MODEL/HEAD/PARAMS") else { panic!("{name}: no heads") };
    for (i, h) in heads.iter().enumerate() {
        let kw = &h[1];
        let key = format!("MODEL.HEAD.PARAMS.{i}.1");
        if let Some(Value::Array(dims)) = kw.get("dims") {
            let mut d: Vec<String> = dims.iter().map(|v| v.to_string()).collect();
            d[0] = "32".into();
            let last = d.len() - 1;
            for x in &mut d[1..last] {
                *x = "64".into();
            }
            ov.push(format!("{key}.dims=[{}]", d.join(", ")));
        }
        if kw.get("in_plane").is_some() {
            ov.push(format!("{key}.in_plane=32"));
        }
        if kw.get("hidden_dim").is_some() {
            ov.push(format!("{key}.hidden_dim=64"));
        }
    }
    ov
}

#[test]
fn every_pretrain_config_trains_two_steps_with_finite_losses() {
    let root = std::env::temp_dir().join(format!("tessera-pretrain-configs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let data = synth_folder(&root, 4, 8, 4);
    let configs_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut names = Vec::new();
    configs_under(&configs_root, &configs_root.join("pretrain/vision_transformer"), &mut names);
    assert_eq!(names.len(), 13, "{names:?}");
    let mut failures = Vec::new();
    for name in &names {
        let ckpt = root.join(name.replace('/', "_"));
        let mut args = vec!["train".to_string(), format!("config={name}")];
        args.extend(tiny_overrides(name, &data, &ckpt));
        args.extend(["--max-steps".into(), "2".into(), "-q".into()]);
        let out = run(&args);
        let losses: Vec<f64> = records(&ckpt).iter().filter_map(|r| r["loss"].as_f64()).collect();
        let ok = out.status.success() && losses.len() == 2 && losses.iter().all(|l| l.is_finite());
        eprintln!("{name}: losses {losses:?}");
        if !ok {
            failures.push(format!(
                "{name}: exit {:?}, losses {losses:?}\n  tessera {}\n{}",
                out.status.code(),
                args.join(" "),
                text(&out)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    std::fs::remove_dir_all(&root).unwrap();
}

/// VISSL's 4-node MoCo config as 2 nodes x 2 processes on this machine
/// (two launchers, one per node, meeting at DISTRIBUTED.RUN_ID): every rank
/// trains, rank 0 logs finite losses of the global batch.
#[test]
fn moco_vit_b16_trains_as_two_nodes_of_two_processes() {
    let root = std::env::temp_dir().join(format!("tessera-two-nodes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let data = synth_folder(&root, 4, 8, 1);
    let name = "pretrain/vision_transformer/moco/vit_b16";
    let ckpt = root.join("run");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let node = |rank: usize| {
        let mut args = vec!["train".to_string(), format!("config={name}")];
        args.extend(tiny_overrides(name, &data, &ckpt));
        args.extend([
            "DISTRIBUTED.NUM_NODES=2".into(),
            "DISTRIBUTED.NUM_PROC_PER_NODE=2".into(),
            format!("DISTRIBUTED.RUN_ID=127.0.0.1:{port}"),
            "--node-rank".into(),
            rank.to_string(),
            "--max-steps".into(),
            "2".into(),
            "-q".into(),
        ]);
        cli::command()
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (node(0), node(1));
    let (a, b) = (first.wait_with_output().unwrap(), second.wait_with_output().unwrap());
    assert!(a.status.success(), "node 0: {}", text(&a));
    assert!(b.status.success(), "node 1: {}", text(&b));
    let losses: Vec<f64> = records(&ckpt).iter().filter_map(|r| r["loss"].as_f64()).collect();
    assert!(losses.len() == 2 && losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let log = std::fs::read_to_string(ckpt.join("log.txt")).unwrap();
    assert!(log.contains("world size 4: 2 node(s) x 2 process(es) per node"), "{log}");
    assert!(log.contains("rank 3: cpu") && log.contains("(node 1, local rank 1)"), "{log}");
    for r in 1..4 {
        assert!(ckpt.join("ranks").join(r.to_string()).join("log.txt").is_file(), "rank {r}'s log");
    }
    std::fs::remove_dir_all(&root).unwrap();
}
