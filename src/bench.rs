//! `tessera bench config=NAME --device gpu`: the training step of a config
//! on a device, timed: the compiled plan for the device's target run on
//! random inputs of the plan's types (each step uploads its inputs, as a
//! real step does), after warm-up steps; the median step time and the
//! images per second it implies, the planned peak memory and, on a GPU, the
//! device memory the executor took (free memory before and after it was
//! made). What scripts/gpu-check.sh sets beside PyTorch's figures.
//!
//! With DISTRIBUTED asking for several processes it launches them as
//! `tessera train` does and times the data-parallel step (gradients
//! averaged across the processes in the step); `--all-reduce N` times the
//! collective alone (scripts/bench-ddp.sh sets both beside PyTorch DDP
//! with Gloo).

use anyhow::{anyhow, bail, Result};
use serde_json::json;
use std::time::Instant;
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::pipeline::training_plan_for;
use tessera_compiler::plan::Target;
use tessera_runtime::{Backend, Device, Executor, Tensor};

pub struct BenchArgs {
    pub name: String,
    pub overrides: Vec<String>,
    pub device: Device,
    pub batch: Option<u64>,
    pub steps: u64,
    pub warmup: u64,
    pub json: bool,
    /// Time an all-reduce of this many f32 instead of the step.
    pub all_reduce: Option<usize>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let cfg = config::load(&a.name, &a.overrides).map_err(|e| anyhow!("{e}"))?;
    let run_id = cfg.tree().pointer("/DISTRIBUTED/RUN_ID").and_then(|v| v.as_str()).unwrap_or("auto");
    let place = tessera_engine::distributed::place_from_env(run_id).map_err(|e| anyhow!("{e}"))?;
    if place.is_none() {
        if let Some(l) = crate::launch::from_config(cfg.tree(), None)? {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            return crate::launch::run(&l, stop, std::time::Duration::from_secs(5));
        }
    }
    let world = match place {
        Some(p) => Some(tessera_engine::distributed::World::join(p).map_err(|e| anyhow!("{e}"))?),
        None => None,
    };
    let (rank, size) = world.as_ref().map_or((0, 1), |w| (w.rank(), w.size()));
    if let Some(n) = a.all_reduce {
        return time_all_reduce(&a, world.as_ref(), n);
    }
    let tree = match &world {
        Some(w) => tessera_engine::trainer::for_world(cfg.tree(), w.place.num_nodes(), w.place.local_world),
        None => tessera_engine::trainer::one_replica(cfg.tree()),
    };
    let batch =
        a.batch.or_else(|| tree.pointer("/DATA/TRAIN/BATCHSIZE_PER_REPLICA").and_then(|v| v.as_u64())).unwrap_or(1);
    let target = if matches!(a.device, Device::Cpu | Device::CpuArena) { Target::Cpu } else { Target::Cuda };
    let prog = Program::load(&[]).map_err(|e| anyhow!("{e}"))?;
    let compile_start = Instant::now();
    let (plan, _) = training_plan_for(&prog, &tree, batch, target).map_err(|e| anyhow!("{e}"))?;
    let compile_ms = compile_start.elapsed().as_secs_f64() * 1e3;
    let planned = plan.memory.as_ref().map(|m| m.peak_bytes).unwrap_or(0);
    let backend = Backend::open(&a.device).map_err(|e| anyhow!("{e}"))?;
    let before = backend.memory();
    let load_start = Instant::now();
    let mut ex = backend.executor(plan.clone(), 0).map_err(|e| anyhow!("{e}"))?;
    if let Some(w) = &world {
        ex.set_collective(w.comm.clone()).map_err(|e| anyhow!("{e}"))?;
    }
    let load_ms = load_start.elapsed().as_secs_f64() * 1e3;
    let after = backend.memory();
    let taken = match (before, after) {
        (Some((free_before, _)), Some((free_after, _))) => Some(free_before.saturating_sub(free_after)),
        _ => None,
    };
    let launches = match &ex {
        Executor::Cuda(c) => Some(c.launches()),
        _ => None,
    };
    let step = |ex: &mut Executor, i: u64| -> Result<f32> {
        let given = tessera_runtime::synthetic::step_inputs(&plan, i);
        let named: Vec<(&str, Tensor)> = given.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let wanted = |n: &str| n == "loss";
        let out = ex.run(&named, Some(&wanted)).map_err(|e| anyhow!("step {i}: {e}"))?;
        Ok(out.get("loss").and_then(|t| t.as_f32()).map(|v| v[0]).unwrap_or(f32::NAN))
    };
    for i in 0..a.warmup {
        step(&mut ex, i)?;
    }
    let mut times = Vec::new();
    let mut last_loss = f32::NAN;
    for i in 0..a.steps {
        let t = Instant::now();
        last_loss = step(&mut ex, a.warmup + i)?;
        times.push(t.elapsed().as_secs_f64());
    }
    let step_s = median(times);
    if rank != 0 {
        return Ok(());
    }
    let report = json!({
        "config": cfg.name(),
        "device": backend.describe(),
        "processes": size,
        "batch": batch,
        "steps": a.steps,
        "step_ms": step_s * 1e3,
        "images_per_sec": (batch * size as u64) as f64 / step_s,
        "planned_peak_bytes": planned,
        "measured_device_bytes": taken,
        "kernels": plan.kernels.len(),
        "launches_per_step": launches,
        "compile_ms": compile_ms,
        "load_ms": load_ms,
        "last_loss": last_loss,
    });
    if a.json {
        tessera_engine::outln!("{report}");
    } else {
        tessera_engine::outln!(
            "{} on {}{}: batch {batch}, median step {:.2} ms over {} steps = {:.1} img/s; planned peak {:.2} GiB{}; {} kernels{}",
            cfg.name(),
            backend.describe(),
            if size > 1 { format!(" x {size} processes") } else { String::new() },
            step_s * 1e3,
            a.steps,
            (batch * size as u64) as f64 / step_s,
            planned as f64 / (1u64 << 30) as f64,
            taken.map(|t| format!(", device memory taken {:.2} GiB", t as f64 / (1u64 << 30) as f64)).unwrap_or_default(),
            plan.kernels.len(),
            launches.map(|l| format!(" ({l} launches per step)")).unwrap_or_default(),
        );
    }
    Ok(())
}

/// Times an all-reduce (sum) of `n` f32 across the run's processes: median
/// time, algorithm bandwidth (bytes / time) and bus bandwidth (x 2(W-1)/W,
/// the bytes each link carries in a ring: NCCL's and Gloo's convention).
/// On a CUDA device the data is in device memory and the collective is the
/// executor's (NCCL on a GPU, on its own stream as a step's gradient
/// buckets run; any world size, one process included), and the result is
/// checked, as is a broadcast from rank 0 after it.
fn time_all_reduce(a: &BenchArgs, world: Option<&tessera_engine::distributed::World>, n: usize) -> Result<()> {
    use std::sync::Arc;
    use tessera_runtime::cuda::device::{CollectiveOp, CollectiveStep, Elem};
    use tessera_runtime::dist::{Collective, Reduction, SingleProcess};
    let comm: Arc<dyn Collective> = match world {
        Some(w) => w.comm.clone(),
        None if !matches!(a.device, Device::Cpu | Device::CpuArena) => Arc::new(SingleProcess),
        None => bail!("--all-reduce on the CPU needs several processes (DISTRIBUTED.NUM_PROC_PER_NODE > 1)"),
    };
    let (rank, size) = (comm.rank(), comm.world());
    let data: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let mut times = Vec::new();
    let backend = Backend::open(&a.device).map_err(|e| anyhow!("{e}"))?;
    let (on, verified) = match &backend {
        Backend::Cuda(c) => {
            let device = c.device();
            let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_ne_bytes()).collect();
            let p = device.alloc(bytes.len() as u64).map_err(|e| anyhow!("{e}"))?;
            let step = CollectiveStep {
                op: CollectiveOp::AllReduce(Reduction::Sum),
                elem: Elem::F32,
                src: p,
                dst: p,
                count: n as u64,
            };
            let mut check = vec![0u8; bytes.len()];
            let run = (|| -> Result<bool> {
                for i in 0..a.warmup + a.steps {
                    // Each timed call sums the data as uploaded: every rank's
                    // copy of it, so the result is `size` times it.
                    device.upload(p, &bytes).map_err(|e| anyhow!("{e}"))?;
                    device.synchronize().map_err(|e| anyhow!("{e}"))?;
                    comm.barrier().map_err(|e| anyhow!("{e}"))?;
                    let t = Instant::now();
                    // On the communication stream, joined back as a step's
                    // gradient buckets are (NCCL's own stream on a GPU).
                    device.collective_async(comm.as_ref(), &step, 0).map_err(|e| anyhow!("{e}"))?;
                    device.wait_collective(0).map_err(|e| anyhow!("{e}"))?;
                    device.synchronize().map_err(|e| anyhow!("{e}"))?;
                    if i >= a.warmup {
                        times.push(t.elapsed().as_secs_f64());
                    }
                }
                device.download(p, &mut check).map_err(|e| anyhow!("{e}"))?;
                let value = |b: &[u8]| f32::from_ne_bytes(b.try_into().expect("4 bytes"));
                let summed = check.chunks(4).zip(&data).all(|(b, &v)| value(b) == v * size as f32);
                // The run's start: rank 0's values everywhere (each rank
                // uploads its own multiple of the data).
                let mine: Vec<u8> = data.iter().flat_map(|v| (v * (rank + 1) as f32).to_ne_bytes()).collect();
                device.upload(p, &mine).map_err(|e| anyhow!("{e}"))?;
                let cast = CollectiveStep { op: CollectiveOp::Broadcast { root: 0 }, ..step };
                device.collective(comm.as_ref(), &cast).map_err(|e| anyhow!("{e}"))?;
                device.synchronize().map_err(|e| anyhow!("{e}"))?;
                device.download(p, &mut check).map_err(|e| anyhow!("{e}"))?;
                let broadcast = check.chunks(4).zip(&data).all(|(b, &v)| value(b) == v);
                Ok(summed && broadcast)
            })();
            // SAFETY: allocated above; nothing uses it after.
            unsafe { device.free(p) };
            (backend.describe(), Some(run?))
        }
        _ => {
            let mut data = data.clone();
            for i in 0..a.warmup + a.steps {
                comm.barrier().map_err(|e| anyhow!("{e}"))?;
                let t = Instant::now();
                comm.all_reduce_f32(&mut data, Reduction::Sum).map_err(|e| anyhow!("{e}"))?;
                if i >= a.warmup {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            ("cpu".to_string(), None)
        }
    };
    if rank != 0 {
        return Ok(());
    }
    let s = median(times);
    let bytes = (n * 4) as f64;
    let world = size as f64;
    let algbw = bytes / s / 1e9;
    let busbw = algbw * 2.0 * (world - 1.0) / world;
    let report = json!({
        "collective": "all_reduce",
        "device": on,
        "processes": size,
        "elements": n,
        "bytes": n * 4,
        "time_ms": s * 1e3,
        "algbw_gbps": algbw,
        "busbw_gbps": busbw,
        "verified": verified,
    });
    if a.json {
        tessera_engine::outln!("{report}");
    } else {
        tessera_engine::outln!(
            "all-reduce of {n} f32 ({:.1} MB) over {size} process(es) on {on}: median {:.2} ms, algorithm bandwidth {algbw:.3} GB/s, bus bandwidth {busbw:.3} GB/s{}",
            bytes / 1e6,
            s * 1e3,
            match verified {
                Some(true) => "; result checked",
                Some(false) => "; RESULT WRONG",
                None => "",
            }
        );
    }
    if verified == Some(false) {
        bail!("the all-reduce's result is not the sum over the ranks, or the broadcast's not rank 0's values");
    }
    Ok(())
}
