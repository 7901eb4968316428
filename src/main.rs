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

mod infer;

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
        /// What to print.
        #[arg(long, value_enum, default_value_t = Emit::Summary)]
        emit: Emit,
        /// Output format of the summary.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Write to this file instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Extra directory of `.tsr` model files (overrides embedded ones by path).
        #[arg(long)]
        models: Vec<PathBuf>,
        /// Batch size per replica of an emitted plan (default: DATA.TRAIN.BATCHSIZE_PER_REPLICA).
        #[arg(long)]
        batch: Option<u64>,
    },
    /// Run the eval-mode forward of a config's model on a batch from a file, with
    /// given weights; with `--target`, also the loss and every parameter's
    /// gradient. Checks a port against PyTorch.
    Infer {
        #[arg(required = true, value_name = "config=NAME [OVERRIDES]")]
        args: Vec<String>,
        /// Weights (safetensors) in tessera's (VISSL's) or timm's names.
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
    },
    /// Compiled plans.
    Plan {
        #[command(subcommand)]
        command: PlanCommand,
    },
    /// Experiment configs.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the resolved config (defaults + file + overrides) as YAML.
    Show {
        #[arg(required = true, value_name = "config=NAME [OVERRIDES]")]
        args: Vec<String>,
    },
    /// List the configs embedded in this binary.
    List,
}

#[derive(Subcommand)]
enum PlanCommand {
    /// Summarise a plan written by `tessera compile --emit plan`.
    Show { file: PathBuf },
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Emit {
    Summary,
    Ir,
    Dot,
    /// The training-step plan (JSON), for `tessera plan show` and the runtime.
    Plan,
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

fn write_out(path: &Option<PathBuf>, text: &str) -> Result<()> {
    match path {
        Some(p) => {
            // Write then rename, so a failed run never leaves half a file.
            let tmp = p.with_extension("tmp-tessera");
            std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, p).with_context(|| format!("cannot write {}", p.display()))?;
        }
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            if !text.ends_with('\n') {
                out.write_all(b"\n")?;
            }
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Compile { args, emit, format, output, models, batch } => {
            let (name, overrides) = split_args(&args)?;
            let cfg = config::load(&name, &overrides).map_err(|e| anyhow::anyhow!("{e}"))?;
            let prog = Program::load(&models).map_err(|e| anyhow::anyhow!("{e}"))?;
            let compiled = tessera_compiler::compile(&prog, cfg.tree()).map_err(|e| anyhow::anyhow!("{e}"))?;
            let text = match (emit, format) {
                (Emit::Summary, Format::Text) => summarize(cfg.name(), &compiled).to_text(),
                (Emit::Summary, Format::Json) => serde_json::to_string_pretty(&summarize(cfg.name(), &compiled))?,
                (Emit::Ir, Format::Text) => compiled.graph.to_text(),
                (Emit::Ir, Format::Json) => serde_json::to_string_pretty(&compiled.graph)?,
                (Emit::Dot, _) => compiled.graph.to_dot(),
                (Emit::Plan, _) => {
                    let batch = match batch {
                        Some(b) => b,
                        None => cfg.get("DATA.TRAIN.BATCHSIZE_PER_REPLICA").and_then(|v| v.as_u64()).unwrap_or(1),
                    };
                    let (plan, _) = tessera_compiler::pipeline::training_plan(&prog, cfg.tree(), batch)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    serde_json::to_string(&plan)?
                }
            };
            write_out(&output, &text)
        }
        Command::Config { command: ConfigCommand::Show { args } } => {
            let (name, overrides) = split_args(&args)?;
            let cfg = config::load(&name, &overrides).map_err(|e| anyhow::anyhow!("{e}"))?;
            write_out(&None, &cfg.to_yaml())
        }
        Command::Infer { args, weights, weights_format, input, target, output } => {
            let (name, mut overrides) = split_args(&args)?;
            let format = weights_format.map(|f| match f {
                WeightsFormatArg::Tessera => WeightsFormat::Tessera,
                WeightsFormatArg::Timm => WeightsFormat::Timm,
            });
            infer::run(&name, &mut overrides, &weights, format, &input, target.as_deref(), &output)
        }
        Command::Plan { command: PlanCommand::Show { file } } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let plan: tessera_compiler::plan::Plan =
                serde_json::from_str(&text).with_context(|| format!("{} is not a tessera plan", file.display()))?;
            plan.validate().map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            write_out(&None, &plan.summary())
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
                eprintln!("{msg}");
            } else {
                eprintln!("error: {msg}");
            }
            ExitCode::FAILURE
        }
    }
}
