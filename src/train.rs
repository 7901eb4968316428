//! `tessera train config=NAME [overrides]`: VISSL's supervised (and, with
//! their losses, self-supervised) training on the CPU or CUDA backend, from compiled
//! plans, with the data pipeline of the config. `tessera data synth`: the
//! quickstart's generated image folder.

use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_engine::data_source::{catalog_path, PipelineSource};
use tessera_engine::source::DataSource;
use tessera_engine::trainer::{train, Outcome, TrainSetup};

pub struct TrainArgs {
    pub name: String,
    pub overrides: Vec<String>,
    pub models: Vec<PathBuf>,
    pub max_steps: Option<u64>,
    pub quiet: bool,
    pub device: Option<tessera_runtime::Device>,
    /// A compiled run (`tessera compile --emit plan`) to run as it is.
    pub plan: Option<PathBuf>,
    /// This node's rank in a multi-node run (else DISTRIBUTED.NODE_ID).
    pub node_rank: Option<usize>,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let cfg = config::load(&a.name, &a.overrides).map_err(|e| anyhow!("{e}"))?;
    let tree = cfg.tree();
    let prog = Program::load(&a.models).map_err(|e| anyhow!("{e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while stopping ends the process at once.
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop))?;
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    // A worker started by a launcher (ours, torchrun, srun) joins its run;
    // otherwise DISTRIBUTED asking for several processes makes this the
    // launcher of this node's workers.
    let run_id = tree.pointer("/DISTRIBUTED/RUN_ID").and_then(|v| v.as_str()).unwrap_or("auto");
    let place = tessera_engine::distributed::place_from_env(run_id).map_err(|e| anyhow!("{e}"))?;
    // Under another launcher the node rank is the launcher's; one asked for
    // here as well must agree with it.
    if let Some(p) = &place {
        let asked = a.node_rank.or_else(|| {
            tree.pointer("/DISTRIBUTED/NODE_ID").and_then(|v| v.as_u64()).filter(|&n| n > 0).map(|n| n as usize)
        });
        if let Some(n) = asked.filter(|&n| n != p.node()) {
            bail!(
                "node rank {n} (--node-rank or DISTRIBUTED.NODE_ID) differs from the launcher's: rank {} is on node {}",
                p.rank,
                p.node()
            );
        }
    }
    if place.is_none() {
        if let Some(l) = crate::launch::from_config(tree, a.node_rank)? {
            return crate::launch::run(&l, stop, std::time::Duration::from_secs(5));
        }
    }
    let world = match place {
        Some(p) => {
            let rank = p.rank;
            Some(tessera_engine::distributed::World::join(p).map_err(|e| anyhow!("rank {rank}: {e}"))?)
        }
        None => None,
    };
    let (rank, size) = world.as_ref().map_or((0, 1), |w| (w.rank(), w.size()));
    let seed = tree.pointer("/SEED_VALUE").and_then(|v| v.as_u64()).unwrap_or(0);
    let catalog = catalog_path().map_err(|e| anyhow!(e))?;
    // Data errors (missing paths, empty class folders) surface here, before training.
    let shard = |split: &str| {
        PipelineSource::shard_from_config(tree, split, seed, &catalog, rank, size).map_err(|e| anyhow!("{e}"))
    };
    let train_src = shard("TRAIN")?;
    let test_model = tree.pointer("/TEST_MODEL").and_then(|v| v.as_bool()).unwrap_or(false);
    let test_src = if test_model { Some(shard("TEST")?) } else { None };
    let plans = match &a.plan {
        Some(p) => Some(tessera_engine::compiled::CompiledRun::read(p).map_err(|e| anyhow!("--plan: {e}"))?),
        None => None,
    };
    let started = std::time::Instant::now();
    let outcome = train(TrainSetup {
        cfg: tree,
        prog: &prog,
        train: Box::new(train_src),
        test: test_src.map(|s| Box::new(s) as Box<dyn DataSource>),
        max_steps: a.max_steps,
        stop,
        quiet: a.quiet,
        device: a.device,
        plans,
        world: world.as_ref(),
        origin: Some(tessera_engine::trainer::RunOrigin {
            command: std::iter::once(format!("config={}", a.name)).chain(a.overrides.iter().cloned()).collect(),
            config_yaml: cfg.to_yaml(),
        }),
    })
    .map_err(|e| if size > 1 { anyhow!("rank {rank}: {e}") } else { anyhow!("{e}") })?;
    // Rank 0 reports the outcome for the run.
    if rank != 0 {
        return Ok(());
    }
    match outcome {
        Outcome::Finished { checkpoint } => {
            // One line even when output is piped: the last phase's result
            // (metrics.json beside the checkpoint), the time, the checkpoint.
            let last = checkpoint
                .parent()
                .and_then(|d| std::fs::read_to_string(d.join("metrics.json")).ok())
                .and_then(|t| t.lines().rev().find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()))
                .map(|r| format!("{}; ", tessera_engine::logs::phase_text(&r)))
                .unwrap_or_default();
            tessera_engine::errln!(
                "tessera train: finished in {}: {last}final checkpoint {}",
                tessera_engine::logs::human_duration(started.elapsed().as_secs_f64()),
                checkpoint.display()
            );
        }
        Outcome::Evaluated { weights, summary } => {
            tessera_engine::errln!("tessera train: TEST_ONLY: {summary} ({weights})");
        }
        Outcome::AlreadyFinished { checkpoint } => {
            tessera_engine::errln!(
                "tessera train: this run already finished ({}); set CHECKPOINT.OVERWRITE_EXISTING=true or another CHECKPOINT.DIR to train again",
                checkpoint.display()
            );
        }
        Outcome::Stopped { checkpoint, iteration, reason } => {
            let how = if reason == "signal" {
                "run the same command to continue"
            } else {
                "run it again without --max-steps (or with a larger one) to continue"
            };
            tessera_engine::errln!(
                "tessera train: stopped by {reason} after iteration {iteration}; checkpoint {}; {how}",
                checkpoint.display()
            );
        }
    }
    Ok(())
}

pub struct SynthArgs {
    pub out: PathBuf,
    pub image_size: usize,
    pub classes: usize,
    pub train_per_class: usize,
    pub val_per_class: usize,
    pub seed: u64,
    /// Replace a folder made with other parameters.
    pub force: bool,
}

pub fn synth(a: SynthArgs) -> Result<()> {
    // The flags' own names in errors (the library names its fields).
    let families = tessera_data::synth::FAMILIES.len();
    if !(2..=families).contains(&a.classes) {
        bail!("--classes {} is outside 2..={families} (the shape and texture families)", a.classes);
    }
    if !(16..=256).contains(&a.image_size) {
        bail!("--image-size {} is outside 16..=256 pixels", a.image_size);
    }
    if a.train_per_class == 0 || a.val_per_class == 0 {
        bail!("--train-per-class and --val-per-class must be at least 1");
    }
    let options = tessera_data::SynthOptions {
        seed: a.seed,
        image_size: a.image_size,
        num_classes: a.classes,
        train_per_class: a.train_per_class,
        val_per_class: a.val_per_class,
        replace: a.force,
        ..tessera_data::SynthOptions::default()
    };
    let r = tessera_data::write_image_folder(Path::new(&a.out), &options).map_err(|e| anyhow!("{e}"))?;
    let what = if r.written { "wrote" } else { "already complete:" };
    tessera_engine::errln!(
        "tessera data synth: {what} {} training and {} validation images of {} classes ({}) in {} and {}",
        r.train_images,
        r.val_images,
        r.classes.len(),
        r.classes.join(", "),
        r.train_dir.display(),
        r.val_dir.display()
    );
    Ok(())
}
