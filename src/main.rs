//! The `tessera` command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::summary::summarize;
use tessera_runtime::weights::WeightsFormat;

mod bench;
mod cost_report;
mod export;
mod infer;
mod launch;
mod memory_report;
mod train;

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Compile and train vision transformers from VISSL-style experiment configs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compile an experiment's model (trunk, heads, loss) and print what it builds.
    Compile {
        /// `config=NAME` (configs/NAME.yaml, an embedded config, or a file) then overrides:
        /// `A.B=v`, `config.A.B=v`, `+A.B=v`, `++A.B=v`, `~A.B`.
        #[arg(required = true, value_name = "config=NAME [OVERRIDES]")]
        args: Vec<String>,
        /// What to print: `summary`, `ir` (the model's forward graph), `dot`
        /// (that graph for Graphviz, repeated blocks drawn once), `plan` (the
        /// training-step plan, JSON), `kernels` (its kernel list), or
        /// `ir-after=PASS` (the training-step graph after that pass).
        #[arg(long, default_value = "summary", value_parser = parse_emit)]
        emit: Emit,
        /// With `--emit dot`: draw every module, not a run of repeated blocks
        /// (`trunk.blocks.0` .. `trunk.blocks.11`) once with its count.
        #[arg(long)]
        expand: bool,
        /// The compiler passes to run on the training step, comma-separated, in
        /// order (`none` for none); default: the full pipeline. See `--print-passes`.
        #[arg(long, value_delimiter = ',')]
        passes: Option<Vec<String>>,
        /// Print the passes run on the training step (name, what each did, why).
        #[arg(long)]
        print_passes: bool,
        /// Output format of the summary.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Write to this file instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Extra directory of `.tsr` model files (overrides embedded ones by path).
        #[arg(long)]
        models: Vec<PathBuf>,
        /// Batch sizes per replica of the emitted training steps, comma-separated
        /// (default: DATA.TRAIN.BATCHSIZE_PER_REPLICA).
        #[arg(long, value_delimiter = ',')]
        batch: Option<Vec<u64>>,
        /// Batch sizes of the emitted eval forwards (`--emit plan`), comma-separated
        /// (default: DATA.TEST.BATCHSIZE_PER_REPLICA when TEST_MODEL, else none).
        #[arg(long, value_delimiter = ',')]
        eval_batch: Option<Vec<u64>>,
        /// The backend the emitted plans are compiled for: cpu or cuda.
        #[arg(long, default_value = "cpu")]
        target: String,
    },
    /// Run the eval-mode forward of a config's model on a batch from a file, with
    /// given weights; with `--target`, also the loss and every parameter's
    /// gradient. Checks a port against PyTorch.
    Infer {
        /// `config=NAME` (configs/NAME.yaml, an embedded config, or a file) then overrides:
        /// `A.B=v`, `config.A.B=v`, `+A.B=v`, `++A.B=v`, `~A.B`.
        #[arg(required = true, value_name = "config=NAME [OVERRIDES]")]
        args: Vec<String>,
        /// Weights (safetensors) in tessera's (VISSL's) or timm's names, a
        /// checkpoint directory, or a run's CHECKPOINT.DIR (its newest checkpoint).
        #[arg(long)]
        weights: PathBuf,
        /// Names used by the weights file; detected when not given.
        #[arg(long, value_enum)]
        weights_format: Option<WeightsFormatArg>,
        /// safetensors file with the tensor `input` [B, 3, H, W] f32.
        #[arg(long)]
        input: PathBuf,
        /// safetensors file with the tensor `target` (int64 class indices [B]).
        #[arg(long)]
        target: Option<PathBuf>,
        /// Where to write `logits` (`logits.0`, ... for several outputs), `loss`, `grad.<name>`.
        #[arg(long)]
        output: PathBuf,
        /// Where to run: cpu (default), gpu (GPU 0), cuda:N, cuda-host (the
        /// CUDA executor emulated on the CPU) or cpu-arena (the CPU executing
        /// the memory plan).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Write a trained model's weights in timm's names (loads into timm's
    /// model with `load_state_dict(strict=True)`) or tessera's: from a
    /// checkpoint directory, a run's CHECKPOINT.DIR (its newest intact
    /// checkpoint) or a weights file in tessera's names.
    Export {
        /// A checkpoint directory, a run's CHECKPOINT.DIR, or a .safetensors file.
        source: PathBuf,
        /// The names to write: timm (`cls_token`, `blocks.N.…`, `head.…`) or tessera (VISSL's `trunk.…`, `heads.N.…`).
        #[arg(long, value_enum)]
        format: WeightsFormatArg,
        /// The safetensors file to write.
        #[arg(short, long, value_name = "FILE.safetensors")]
        output: PathBuf,
    },
    /// Plan a config's training step and report its memory, bytes moved and
    /// FLOPs (`tessera plan config=NAME --memory [--device h100]`), or summarise a plan file
    /// (`tessera plan show FILE`).
    #[command(args_conflicts_with_subcommands = true)]
    Plan {
        #[command(subcommand)]
        command: Option<PlanCommand>,
        /// `config=NAME` (configs/NAME.yaml, an embedded config, or a file) then overrides:
        /// `A.B=v`, `config.A.B=v`, `+A.B=v`, `++A.B=v`, `~A.B`.
        #[arg(value_name = "config=NAME [OVERRIDES]")]
        args: Vec<String>,
        /// Report the planned peak memory and its parts.
        #[arg(long)]
        memory: bool,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Draw the arena's buffer timeline (kernels across, offsets up) to this SVG file.
        #[arg(long, value_name = "FILE.svg")]
        memory_plot: Option<PathBuf>,
        /// Find the largest DATA.TRAIN.BATCHSIZE_PER_REPLICA whose peak fits `--device-memory`.
        #[arg(long)]
        max_batch: bool,
        /// Device memory for `--max-batch`: bytes, or with a unit (80GiB, 80GB, 512MiB).
        #[arg(long)]
        device_memory: Option<String>,
        /// Batch size per replica (default: DATA.TRAIN.BATCHSIZE_PER_REPLICA).
        #[arg(long)]
        batch: Option<u64>,
        /// Passes to run (comma-separated, `none` for none; default: all).
        #[arg(long, value_delimiter = ',')]
        passes: Option<Vec<String>>,
        /// Recompute (activation checkpointing) as little as needed for the
        /// peak to fit this many bytes (80GiB, 12GB, ...); reports the extra FLOPs.
        #[arg(long)]
        memory_budget: Option<String>,
        /// Extra directory of `.tsr` model files.
        #[arg(long)]
        models: Vec<PathBuf>,
        /// With --memory: the roofline estimate of the step's time on this
        /// GPU (h100 or h200: datasheet peaks), beside PyTorch's measured
        /// figures for the same model where there are some.
        #[arg(long, value_name = "h100|h200")]
        device: Option<String>,
    },
    /// Train a config's model as VISSL's trainer does, on the CPU or a GPU
    /// (MACHINE.DEVICE: cpu | gpu): data pipeline, schedules, meters, logs
    /// and checkpoints in CHECKPOINT.DIR.
    /// A run stopped by Ctrl-C, SIGTERM or a crash continues from its last
    /// checkpoint when run again (CHECKPOINT.AUTO_RESUME).
    Train {
        /// `config=NAME` (configs/NAME.yaml, an embedded config, or a file) then overrides:
        /// `A.B=v`, `config.A.B=v`, `+A.B=v`, `++A.B=v`, `~A.B`.
        #[arg(required = true, value_name = "config=NAME [OVERRIDES]")]
        args: Vec<String>,
        /// Stop (with a checkpoint) after this many training steps in total.
        #[arg(long)]
        max_steps: Option<u64>,
        /// No progress bar and no JSON records on standard output (the files
        /// in CHECKPOINT.DIR are still written).
        #[arg(long, short)]
        quiet: bool,
        /// Extra directory of `.tsr` model files.
        #[arg(long)]
        models: Vec<PathBuf>,
        /// Where to train, overriding MACHINE.DEVICE: cpu, gpu (GPU 0),
        /// cuda:N, cuda-host (the CUDA executor emulated on the CPU) or
        /// cpu-arena (the CPU executing the memory plan).
        #[arg(long)]
        device: Option<String>,
        /// Run the plans of this compiled run (`tessera compile --emit plan`)
        /// instead of compiling: refused if made from another config, plan
        /// version or target.
        #[arg(long, value_name = "FILE_OR_DIR")]
        plan: Option<PathBuf>,
        /// This machine's node rank in a multi-node run (DISTRIBUTED.NUM_NODES
        /// > 1 with RUN_ID host:port); overrides DISTRIBUTED.NODE_ID.
        #[arg(long)]
        node_rank: Option<usize>,
    },
    /// Time a config's training step on a device with random inputs: the
    /// median step time, images per second, the planned peak memory and
    /// (on a GPU) the device memory the executor took.
    Bench {
        /// `config=NAME` (configs/NAME.yaml, an embedded config, or a file) then overrides:
        /// `A.B=v`, `config.A.B=v`, `+A.B=v`, `++A.B=v`, `~A.B`.
        #[arg(required = true, value_name = "config=NAME [OVERRIDES]")]
        args: Vec<String>,
        /// cpu, gpu (GPU 0), cuda:N, cuda-host or cpu-arena.
        #[arg(long, default_value = "gpu")]
        device: String,
        /// Batch size per replica (default: DATA.TRAIN.BATCHSIZE_PER_REPLICA).
        #[arg(long)]
        batch: Option<u64>,
        /// Timed steps.
        #[arg(long, default_value_t = 20)]
        steps: u64,
        /// Untimed steps first (kernel compilation, caches).
        #[arg(long, default_value_t = 3)]
        warmup: u64,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Time an all-reduce (sum) of this many f32 across the processes
        /// of DISTRIBUTED instead of the step: its bus bandwidth.
        #[arg(long, value_name = "ELEMENTS")]
        all_reduce: Option<usize>,
    },
    /// Datasets.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Experiment configs.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print the shell completion script for tessera's commands and options:
    /// `tessera completions bash > ~/.local/share/bash-completion/completions/tessera`,
    /// `tessera completions zsh > ~/.zfunc/_tessera`, `tessera completions fish > ~/.config/fish/completions/tessera.fish`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the resolved config (defaults + file + overrides) as YAML.
    Show {
        /// `config=NAME` (configs/NAME.yaml, an embedded config, or a file) then overrides:
        /// `A.B=v`, `config.A.B=v`, `+A.B=v`, `++A.B=v`, `~A.B`.
        #[arg(required = true, value_name = "config=NAME [OVERRIDES]")]
        args: Vec<String>,
    },
    /// List the configs embedded in this binary.
    List,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write a small generated image folder (`train/`, `val/`; one folder per
    /// class of shapes and textures, PNG) for the quickstart. Does nothing
    /// when a complete one is already there.
    Synth {
        /// The folder to write (`train/`, `val/`, a marker file); a new or
        /// empty one, or one this command made.
        #[arg(long)]
        out: PathBuf,
        /// Side of the square images, 16 to 256 pixels.
        #[arg(long, default_value_t = 32)]
        image_size: usize,
        /// Classes, 2 to 10 (shape and texture families, in a fixed order).
        #[arg(long, default_value_t = 10)]
        classes: usize,
        /// Training images per class, at least 1.
        #[arg(long, default_value_t = 500)]
        train_per_class: usize,
        /// Validation images per class, at least 1.
        #[arg(long, default_value_t = 100)]
        val_per_class: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Replace a folder this command made with other parameters.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum PlanCommand {
    /// Summarise a plan written by `tessera compile --emit plan`.
    Show { file: PathBuf },
}

#[derive(Clone, PartialEq)]
enum Emit {
    Summary,
    Ir,
    Dot,
    /// The training-step plan (JSON), for `tessera plan show` and the runtime.
    Plan,
    /// The training step's kernels, one per line.
    Kernels,
    /// The training-step graph after the named pass.
    IrAfter(String),
}

fn parse_emit(s: &str) -> Result<Emit, String> {
    Ok(match s {
        "summary" => Emit::Summary,
        "ir" => Emit::Ir,
        "dot" => Emit::Dot,
        "plan" => Emit::Plan,
        "kernels" => Emit::Kernels,
        _ => match s.strip_prefix("ir-after=") {
            Some(pass) => {
                tessera_compiler::passes::find(pass)?;
                Emit::IrAfter(pass.to_string())
            }
            None => {
                return Err(format!("`{s}` is not one of: summary, ir, dot, plan, kernels, ir-after=PASS"));
            }
        },
    })
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum WeightsFormatArg {
    Tessera,
    Timm,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Format {
    Text,
    Json,
}

/// The passes of `--passes` (by default the config's pipeline, with the
/// precision pass when it uses AMP; none for `none`), checked.
fn chosen_passes(passes: Option<Vec<String>>, amp: bool) -> Result<Vec<String>> {
    let names: Vec<String> = match passes {
        Some(p) if p.len() == 1 && p[0] == "none" => vec![],
        Some(p) => p,
        None => tessera_compiler::passes::default_for(amp).iter().map(|s| s.to_string()).collect(),
    };
    for p in &names {
        tessera_compiler::passes::find(p).map_err(|e| anyhow::anyhow!("--passes: {e}"))?;
    }
    Ok(names)
}

/// `80GiB`, `80GB`, `512MiB`, `1e9`, `123456`: a byte count.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.trim().parse().map_err(|_| format!("`{s}` is not a size (e.g. 80GiB, 40GB, 512MiB)"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => return Err(format!("unknown unit `{other}` in `{s}` (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")),
    };
    if !(v > 0.0 && v.is_finite()) {
        return Err(format!("`{s}` must be a positive size"));
    }
    Ok((v * scale) as u64)
}

/// Splits `config=NAME` from the overrides.
fn split_args(args: &[String]) -> Result<(String, Vec<String>)> {
    let mut name = None;
    let mut overrides = Vec::new();
    for a in args {
        // VISSL's launcher-level keys select the node and engine; they are not
        // part of the config tree.
        if a.starts_with("node_id=") || a.starts_with("engine_name=") {
            continue;
        }
        match a.strip_prefix("config=") {
            Some(n) if name.is_none() => name = Some(n.to_string()),
            _ => overrides.push(a.clone()),
        }
    }
    match name {
        Some(n) => Ok((n, overrides)),
        None => bail!("no config given: pass `config=NAME`, e.g. `config=pretrain/vision_transformer/supervised/1gpu_vit_example`"),
    }
}

/// An output path may name a new file or replace a regular one; a device
/// node, FIFO, directory or symlink there is refused (writing a temporary
/// and renaming it over would replace it: as root, `-o /dev/full` replaced
/// the machine's /dev/full).
pub fn check_output_target(p: &std::path::Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => bail!("cannot write {}: {e}", p.display()),
        Ok(m) if m.file_type().is_file() => Ok(()),
        Ok(m) => {
            let what = match m.file_type() {
                t if t.is_symlink() => "a symbolic link",
                t if t.is_dir() => "a directory",
                _ => "not a regular file (a device, FIFO or socket)",
            };
            bail!(
                "{} is {what}; an output must be a new or regular file (write to standard output by leaving -o out)",
                p.display()
            )
        }
    }
}

/// A batch size from the config: a positive integer, or an error naming the
/// key (a negative or zero batch is not silently planned as 1).
fn config_batch(cfg: &config::Config, key: &str) -> Result<u64> {
    match cfg.get(key) {
        None => Ok(1),
        Some(v) => match v.as_u64() {
            Some(b) if b > 0 => Ok(b),
            _ => bail!("config key `{key}` is {v}: a batch size is a positive integer"),
        },
    }
}

fn write_out(path: &Option<PathBuf>, text: &str) -> Result<()> {
    match path {
        Some(p) => {
            check_output_target(p)?;
            // Write then rename, so a failed run never leaves half a file.
            let tmp = p.with_extension("tmp-tessera");
            std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, p).with_context(|| format!("cannot write {}", p.display()))?;
            // Standard output stays the command's; the note goes to stderr.
            tessera_engine::errln!("tessera: wrote {} ({} bytes)", p.display(), text.len());
        }
        None => {
            let mut out = std::io::stdout().lock();
            let written = out.write_all(text.as_bytes()).and_then(|_| match text.ends_with('\n') {
                true => Ok(()),
                false => out.write_all(b"\n"),
            });
            match written.and_then(|_| out.flush()) {
                // A reader that stopped early (`| head`) has what it wanted.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                r => r.context("cannot write to standard output")?,
            }
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Compile {
            args,
            emit,
            expand,
            passes,
            print_passes,
            format,
            output,
            models,
            batch,
            eval_batch,
            target,
        } => {
            if expand && emit != Emit::Dot {
                bail!("--expand draws every module of `--emit dot`; add --emit dot");
            }
            let (name, overrides) = split_args(&args)?;
            let cfg = config::load(&name, &overrides).map_err(|e| anyhow::anyhow!("{e}"))?;
            let prog = Program::load(&models).map_err(|e| anyhow::anyhow!("{e}"))?;
            let compiled = tessera_compiler::compile(&prog, cfg.tree()).map_err(|e| anyhow::anyhow!("{e}"))?;
            let default_batch = config_batch(&cfg, "DATA.TRAIN.BATCHSIZE_PER_REPLICA")?;
            let batches = batch.unwrap_or_else(|| vec![default_batch]);
            if batches.is_empty() || batches.contains(&0) {
                bail!("--batch: batch sizes must be at least 1");
            }
            let batch = batches[0];
            let target =
                tessera_compiler::plan::Target::parse(&target).map_err(|e| anyhow::anyhow!("--target: {e}"))?;
            let passes_given = passes.is_some();
            let pass_names = chosen_passes(passes, tessera_compiler::pipeline::uses_amp(cfg.tree()))?;
            let step =
                || -> Result<(tessera_compiler::plan::Plan, Vec<tessera_compiler::passes::Report>, Option<String>)> {
                    let mut ir_after = None;
                    let wanted = match &emit {
                        Emit::IrAfter(p) => {
                            if !pass_names.contains(p) {
                                bail!(
                                    "--emit ir-after={p}: `{p}` is not among the passes run ({})",
                                    pass_names.join(", ")
                                );
                            }
                            Some(p.clone())
                        }
                        _ => None,
                    };
                    let choice = tessera_compiler::pipeline::PassChoice {
                        passes: pass_names.iter().map(|s| s.as_str()).collect(),
                        regions: None,
                        after: Box::new(|name: &str, g: &tessera_compiler::ir::Graph| {
                            if wanted.as_deref() == Some(name) {
                                ir_after = Some(g.to_text());
                            }
                        }),
                    };
                    let (plan, _, reports) =
                        tessera_compiler::pipeline::training_plan_with(&prog, cfg.tree(), batch, choice)
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                    Ok((plan, reports, ir_after))
                };
            if print_passes {
                let (plan, reports, _) = step()?;
                let text = match format {
                    Format::Json => serde_json::to_string_pretty(&serde_json::json!({
                        "passes": reports,
                        "kernels": plan.kernels.len(),
                    }))?,
                    Format::Text => {
                        let mut s = String::new();
                        for r in &reports {
                            let why = match r.pass {
                                "recompute" => "activation checkpointing (CHECKPOINT_BLOCK / CHECKPOINT_MLP / ACTIVATION_CHECKPOINTING, or --memory-budget)",
                                p => tessera_compiler::passes::find(p).map(|p| p.why).unwrap_or_default(),
                            };
                            s += &format!(
                                "{:<18} {:>6} -> {:<6} nodes  {}\n{:<18} why: {why}\n",
                                r.pass, r.nodes_before, r.nodes_after, r.detail, ""
                            );
                        }
                        s += &format!("{} kernels in the training step (batch {batch})", plan.kernels.len());
                        s
                    }
                };
                return write_out(&output, &text);
            }
            let text = match (emit.clone(), format) {
                (Emit::Summary, Format::Text) => summarize(cfg.name(), &compiled).to_text(),
                (Emit::Summary, Format::Json) => serde_json::to_string_pretty(&summarize(cfg.name(), &compiled))?,
                (Emit::Ir, Format::Text) => compiled.graph.to_text(),
                (Emit::Ir, Format::Json) => serde_json::to_string_pretty(&compiled.graph)?,
                (Emit::Dot, _) if expand => compiled.graph.to_dot(),
                (Emit::Dot, _) => compiled.graph.to_dot_collapsed(),
                (Emit::Plan, _) => {
                    if passes_given {
                        bail!("--emit plan writes the target's own pipeline; --passes does not apply (use --emit kernels to look at other pipelines)");
                    }
                    let test_model = cfg.get("TEST_MODEL").and_then(|v| v.as_bool()).unwrap_or(false);
                    let eval = match eval_batch {
                        Some(e) => e,
                        None if test_model => vec![config_batch(&cfg, "DATA.TEST.BATCHSIZE_PER_REPLICA")?],
                        None => vec![],
                    };
                    let run = tessera_engine::compiled::CompiledRun::compile(
                        &prog,
                        cfg.name(),
                        cfg.tree(),
                        target,
                        &batches,
                        &eval,
                    )
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                    serde_json::to_string(&run)?
                }
                (Emit::Kernels, _) => step()?.0.kernel_listing(),
                (Emit::IrAfter(_), _) => step()?.2.expect("the pass ran, so its IR was captured"),
            };
            write_out(&output, &text)
        }
        Command::Config { command: ConfigCommand::Show { args } } => {
            let (name, overrides) = split_args(&args)?;
            let cfg = config::load(&name, &overrides).map_err(|e| anyhow::anyhow!("{e}"))?;
            write_out(&None, &cfg.to_yaml())
        }
        Command::Export { source, format, output } => {
            let format = match format {
                WeightsFormatArg::Tessera => WeightsFormat::Tessera,
                WeightsFormatArg::Timm => WeightsFormat::Timm,
            };
            export::run(&source, format, &output)
        }
        Command::Infer { args, weights, weights_format, input, target, output, device } => {
            let device = tessera_runtime::Device::parse(&device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
            let (name, mut overrides) = split_args(&args)?;
            let format = weights_format.map(|f| match f {
                WeightsFormatArg::Tessera => WeightsFormat::Tessera,
                WeightsFormatArg::Timm => WeightsFormat::Timm,
            });
            infer::run(&name, &mut overrides, &weights, format, &input, target.as_deref(), &output, &device)
        }
        Command::Plan {
            command: None,
            args,
            memory,
            format,
            memory_plot,
            max_batch,
            device_memory,
            batch,
            passes,
            memory_budget,
            models,
            device: gpu,
        } => {
            let gpu = match gpu.as_deref() {
                None => None,
                Some(n) => Some(
                    tessera_plan::cost::Device::named(n)
                        .ok_or_else(|| anyhow::anyhow!("--device {n}: the roofline knows h100 and h200"))?,
                ),
            };
            if gpu.is_some() && !memory {
                bail!("--device gives the roofline estimate of `--memory`'s report: add --memory");
            }
            if args.is_empty() {
                bail!("give `config=NAME [OVERRIDES]` to plan a training step, or `tessera plan show FILE`");
            }
            if !memory && memory_plot.is_none() && !max_batch && memory_budget.is_none() {
                bail!(
                    "nothing to report: add --memory, --memory-budget SIZE, --memory-plot FILE.svg or --max-batch --device-memory SIZE"
                );
            }
            let (name, overrides) = split_args(&args)?;
            let cfg = config::load(&name, &overrides).map_err(|e| anyhow::anyhow!("{e}"))?;
            let prog = Program::load(&models).map_err(|e| anyhow::anyhow!("{e}"))?;
            let batch = match batch {
                Some(b) => b,
                None => config_batch(&cfg, "DATA.TRAIN.BATCHSIZE_PER_REPLICA")?,
            };
            let pass_names = chosen_passes(passes, tessera_compiler::pipeline::uses_amp(cfg.tree()))?;
            let names: Vec<&str> = pass_names.iter().map(|s| s.as_str()).collect();
            let graph_with = |regions: Option<Vec<Vec<String>>>| -> Result<tessera_compiler::ir::Graph> {
                let choice = tessera_compiler::pipeline::PassChoice {
                    passes: names.clone(),
                    regions,
                    after: Box::new(|_: &str, _: &tessera_compiler::ir::Graph| {}),
                };
                let (graph, _, _) = tessera_compiler::pipeline::training_graph(&prog, cfg.tree(), choice)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok(graph)
            };
            let budget = match &memory_budget {
                Some(s) => Some(parse_bytes(s).map_err(|e| anyhow::anyhow!("--memory-budget: {e}"))?),
                None => None,
            };
            let (step, budget_note) = match budget {
                Some(b) => memory_report::fit_budget(&graph_with, batch, b)?,
                None => (graph_with(None)?, None),
            };
            let device = match &device_memory {
                Some(s) => Some(parse_bytes(s).map_err(|e| anyhow::anyhow!("--device-memory: {e}"))?),
                None if max_batch => bail!("--max-batch needs --device-memory SIZE (e.g. 80GiB)"),
                None => None,
            };
            let mut report = memory_report::report(
                &step,
                (cfg.name(), cfg.tree()),
                batch,
                max_batch.then_some(device).flatten(),
                gpu.as_ref(),
            )?;
            if let Some((text, json)) = budget_note {
                report.text += &text;
                report.json["memory_budget"] = json;
            }
            if let Some(path) = &memory_plot {
                write_out(&Some(path.clone()), &report.svg)?;
            }
            if memory || max_batch || memory_budget.is_some() {
                let text = match format {
                    Format::Json => serde_json::to_string_pretty(&report.json)?,
                    Format::Text => report.text.clone(),
                };
                write_out(&None, &text)?;
            }
            Ok(())
        }
        Command::Plan { command: Some(PlanCommand::Show { file }), .. } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let is_run = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .is_some_and(|v| v.get("format").and_then(|f| f.as_str()) == Some(tessera_engine::compiled::FORMAT));
            if is_run {
                let run = tessera_engine::compiled::CompiledRun::read(&file).map_err(|e| anyhow::anyhow!("{e}"))?;
                let mut out = format!(
                    "compiled run of {} for the {} target: {} training step(s), {} eval forward(s)\n",
                    run.config,
                    run.target,
                    run.steps.len(),
                    run.eval.len()
                );
                for s in &run.steps {
                    out += &format!(
                        "\n# training step, batch {}, stage {} (from iteration {})\n",
                        s.batch, s.stage, s.first_iteration
                    );
                    out += &s.plan.summary();
                }
                for e in &run.eval {
                    out += &format!("\n# eval forward, batch {}\n", e.batch);
                    out += &e.plan.summary();
                }
                return write_out(&None, &out);
            }
            let plan: tessera_compiler::plan::Plan =
                serde_json::from_str(&text).with_context(|| format!("{} is not a tessera plan", file.display()))?;
            plan.validate().map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            write_out(&None, &plan.summary())
        }
        Command::Train { args, max_steps, quiet, models, device, plan, node_rank } => {
            let (name, overrides) = split_args(&args)?;
            let device = device
                .map(|d| tessera_runtime::Device::parse(&d).map_err(|e| anyhow::anyhow!("--device: {e}")))
                .transpose()?;
            train::run(train::TrainArgs { name, overrides, models, max_steps, quiet, device, plan, node_rank })
        }
        Command::Bench { args, device, batch, steps, warmup, format, all_reduce } => {
            let (name, overrides) = split_args(&args)?;
            let device = tessera_runtime::Device::parse(&device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
            let json = format == Format::Json;
            bench::run(bench::BenchArgs { name, overrides, device, batch, steps, warmup, json, all_reduce })
        }
        Command::Data {
            command: DataCommand::Synth { out, image_size, classes, train_per_class, val_per_class, seed, force },
        } => train::synth(train::SynthArgs { out, image_size, classes, train_per_class, val_per_class, seed, force }),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "tessera", &mut script);
            write_out(&None, &String::from_utf8_lossy(&script))
        }
        Command::Config { command: ConfigCommand::List } => {
            write_out(&None, &config::embedded_config_names().join("\n"))
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}");
            if msg.starts_with("error") {
                tessera_engine::errln!("{msg}");
            } else {
                tessera_engine::errln!("error: {msg}");
            }
            ExitCode::FAILURE
        }
    }
}
