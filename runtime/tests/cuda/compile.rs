//! Every kernel the CUDA backend renders for the shipped configs compiles
//! with NVRTC for sm_90 (the H100/H200) and assembles with `ptxas -v`
//! without register spills: the training step and the eval forward of
//! every embedded config, with and without mixed precision. Runs without a
//! GPU (NVRTC and ptxas from scripts/setup-cuda-tools.sh).

use rayon::prelude::*;
use std::collections::BTreeMap;
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::pipeline::{inference_plan_for, training_plan_for};
use tessera_compiler::plan::Target;
use tessera_runtime::cuda::check::{assemble, ptxas};
use tessera_runtime::cuda::lower::kernel_sources;
use tessera_runtime::cuda::source::KernelSource;

/// The configs whose plans we render: every embedded experiment config.
fn configs() -> Vec<String> {
    config::embedded_config_names()
        .into_iter()
        .filter(|n| !n.ends_with("defaults") && !n.contains("/models/"))
        .collect()
}

#[test]
fn every_kernel_of_every_shipped_config_compiles_for_sm90_without_spills() {
    let prog = Program::load(&[]).unwrap();
    let mut kernels: BTreeMap<String, (KernelSource, String)> = BTreeMap::new();
    let mut failures = Vec::new();
    // One replica for every config; and the data-parallel steps (2 ranks:
    // collectives, the random streams' rank term, SwAV's batch norm
    // synchronised across ranks).
    let mut cases: Vec<(String, Vec<String>)> = configs().into_iter().map(|n| (n, vec![])).collect();
    for name in ["vit_tiny", "moco_vit_tiny", "simclr_vit_tiny", "swav_vit_tiny"] {
        let sync = "MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=True".to_string();
        cases.push((format!("quickstart/{name}"), vec![sync]));
    }
    for (name, extra) in cases {
        let procs = if extra.is_empty() { 1 } else { 2 };
        for amp in [false, true] {
            let mut overrides = vec![
                format!("MODEL.AMP_PARAMS.USE_AMP={amp}"),
                "DISTRIBUTED.NUM_NODES=1".into(),
                format!("DISTRIBUTED.NUM_PROC_PER_NODE={procs}"),
            ];
            overrides.extend(extra.iter().cloned());
            let name = if extra.is_empty() { name.clone() } else { format!("{name} x{procs}") };
            let cfg_name = name.split(' ').next().unwrap_or(&name);
            let cfg = match config::load(cfg_name, &overrides) {
                Ok(c) => c,
                Err(e) => {
                    failures.push(format!("{name}: {e}"));
                    continue;
                }
            };
            // Distillation needs its teacher's config only to compile, which is embedded too.
            let plans = [
                training_plan_for(&prog, cfg.tree(), 2, Target::Cuda).map(|p| p.0),
                inference_plan_for(&prog, cfg.tree(), 2, false, Target::Cuda).map(|p| p.0),
            ];
            for (what, plan) in ["training step", "eval forward"].iter().zip(plans) {
                let plan = match plan {
                    Ok(p) => p,
                    Err(e) => {
                        failures.push(format!("{name} (amp {amp}) {what}: {e}"));
                        continue;
                    }
                };
                match kernel_sources(&plan) {
                    Ok(sources) => {
                        for s in sources {
                            kernels.entry(s.name.clone()).or_insert((s, format!("{name} (amp {amp}) {what}")));
                        }
                    }
                    Err(e) => failures.push(format!("{name} (amp {amp}) {what}: {e}")),
                }
            }
        }
    }
    assert!(failures.is_empty(), "plans the CUDA backend cannot lower:\n{}", failures.join("\n"));
    let ptxas = ptxas().unwrap_or_else(|e| panic!("{e}"));
    let results: Vec<_> = kernels
        .values()
        .collect::<Vec<_>>()
        .par_iter()
        .map(|(k, from)| (k.name.clone(), from.clone(), assemble(k, 90, &ptxas)))
        .collect();
    let mut bad = Vec::new();
    let mut most = (0, String::new());
    for (name, from, r) in &results {
        match r {
            Ok(a) if a.spill_stores > 0 || a.spill_loads > 0 => bad.push(format!(
                "{name} (from {from}) spills: {} bytes stored, {} loaded, {} registers",
                a.spill_stores, a.spill_loads, a.registers
            )),
            Ok(a) => {
                if a.registers > most.0 {
                    most = (a.registers, name.clone());
                }
            }
            Err(e) => bad.push(format!("{name} (from {from}): {e}")),
        }
    }
    eprintln!("{} distinct kernels compiled for sm_90; most registers: {} ({})", results.len(), most.0, most.1);
    // scripts/gpu-prepare.sh: also leave each kernel's sm_90 CUBIN in the
    // kernel cache (TESSERA_KERNEL_CACHE), so a GPU run loads instead of
    // compiling (the cache key holds NVRTC's version, 13.0 on both sides).
    if std::env::var("TESSERA_PRECOMPILE_SM").as_deref() == Ok("90") {
        let target = tessera_runtime::cuda::device::Target::Nvrtc { sm: 90 };
        let failed: Vec<String> = kernels
            .values()
            .collect::<Vec<_>>()
            .par_iter()
            .filter_map(|(k, _)| tessera_runtime::cuda::source::compile(k, &target).err())
            .collect();
        assert!(failed.is_empty(), "CUBINs that did not compile:\n{}", failed.join("\n"));
        eprintln!("{} CUBINs for sm_90 in {}", kernels.len(), tessera_runtime::cuda::source::cache_dir().display());
    }
    assert!(bad.is_empty(), "{} of {} kernels failed:\n{}", bad.len(), results.len(), bad.join("\n"));
}
