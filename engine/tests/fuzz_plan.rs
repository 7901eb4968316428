//! Property test: reading a compiled run (`tessera train --plan FILE`) or a
//! single plan (`tessera plan show FILE`) never panics, whatever the file
//! holds (issue 15). Inputs are random bytes and edits of the files
//! `tessera compile --emit plan` writes for the quickstart ViT: byte edits,
//! and JSON edits that replace a field by an edge value (a dimension of
//! 2^60, an index past the end, a negative number, another type) or remove
//! it. A file is refused with an error naming it, or read; a run read is
//! then shown as `tessera plan show` shows it.
//! `TESSERA_FUZZ_CASES=N` runs N cases per property (default 300).

#[path = "../../tests/fuzz/mutate.rs"]
mod mutate;

use mutate::{apply, apply_json, cases, edits, json_edits, JSON_TOKENS};
use proptest::prelude::*;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::plan::{Plan, Target};
use tessera_engine::compiled::CompiledRun;

/// The compiled run of a one-block quickstart ViT (batch 2, eval batch 2),
/// as JSON.
fn compiled() -> &'static Value {
    static RUN: OnceLock<Value> = OnceLock::new();
    RUN.get_or_init(|| {
        let prog = Program::load(&[]).unwrap();
        let ov: Vec<String> = [
            "MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=1",
            "MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM=16",
            "MODEL.TRUNK.VISION_TRANSFORMERS.MLP_DIM=16",
            "MODEL.TRUNK.VISION_TRANSFORMERS.NUM_HEADS=2",
            "MODEL.HEAD.PARAMS=[[mlp, {dims: [16, 4]}]]",
            "METERS.accuracy_list_meter.topk_values=[1, 4]",
        ]
        .map(String::from)
        .to_vec();
        let cfg = config::load("quickstart/vit_tiny", &ov).unwrap_or_else(|e| panic!("{e}")).tree().clone();
        let run = CompiledRun::compile(&prog, "quickstart/vit_tiny", &cfg, Target::Cpu, &[2], &[2]).unwrap();
        serde_json::to_value(&run).unwrap()
    })
}

fn scratch_file(bytes: &[u8]) -> PathBuf {
    static CASE: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "tessera-fuzz-plan-{}-{}.plan",
        std::process::id(),
        CASE.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// What `tessera train --plan` and `tessera plan show` do with a run file.
fn check_run(bytes: &[u8]) {
    let path = scratch_file(bytes);
    match CompiledRun::read(&path) {
        Ok(run) => {
            for s in &run.steps {
                let plan = run.step(s.batch, s.stage).unwrap();
                let _ = (plan.summary(), plan.kernel_listing(), plan.world(), plan.rank_local_states());
            }
            for e in &run.eval {
                let _ = run.eval(e.batch).unwrap().summary();
            }
        }
        Err(e) => assert!(e.contains(&path.display().to_string()), "{e}"),
    }
    std::fs::remove_file(&path).unwrap();
}

/// What `tessera plan show` does with a single plan.
fn check_plan(bytes: &[u8]) {
    if let Ok(plan) = serde_json::from_slice::<Plan>(bytes) {
        if plan.validate().is_ok() {
            let _ = (plan.summary(), plan.kernel_listing(), plan.world(), plan.rank_local_states());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(300), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_run_file_with_edited_fields_is_read_or_refused(e in json_edits(3)) {
        let mut v = compiled().clone();
        apply_json(&mut v, &e);
        check_run(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn a_run_file_with_edited_bytes_is_read_or_refused(e in edits(JSON_TOKENS.len(), 4)) {
        check_run(&apply(&serde_json::to_vec(compiled()).unwrap(), &e, JSON_TOKENS));
    }

    #[test]
    fn a_plan_with_edited_fields_is_read_or_refused(e in json_edits(3)) {
        let mut v = compiled()["steps"][0]["plan"].clone();
        apply_json(&mut v, &e);
        check_plan(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn random_bytes_are_refused(b in prop::collection::vec(any::<u8>(), 0..300)) {
        check_run(&b);
        check_plan(&b);
    }
}
