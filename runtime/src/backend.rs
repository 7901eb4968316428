//! The backend seam: what the engine and the CLI need of an executor, for
//! every backend. A `Backend` is an opened device (the CPU, the CPU with the
//! memory plan executed in a host arena, a CUDA GPU, or the CUDA executor
//! emulated on the host); it builds one `Executor` per plan. Executors of
//! one model hand their state to each other (`move_state_to`), so plans for
//! several batch sizes, stages and the eval forward all train one model.
//!
//! Invariants: host tensors (`crate::tensor`) are the only thing that crosses
//! the seam; an executor's `run` either completes (outputs returned, state
//! updated, step advanced) or changes nothing the caller can observe, except
//! that a kernel or device failure in the middle of a step leaves an arena or
//! CUDA executor unusable (its state may be half updated in place); state
//! moves between executors of one GPU without a round trip through the host.

use crate::cpu::{ArenaExecutor, CpuExecutor};
use crate::cuda::{self, CudaBackend, CudaExecutor};
use crate::dist::Collective;
use crate::error::RuntimeError;
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use tessera_plan::Plan;

/// Where plans run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    /// The reference backend (f32 on the host, rayon threads).
    Cpu,
    /// The CPU kernels with every value at its place in the plan's memory
    /// plan (one host buffer, values in their dtype's bytes): the memory
    /// plan executed without a GPU, for CI.
    CpuArena,
    /// CUDA GPU `ordinal` (cuBLASLt, NVRTC kernels).
    Cuda { ordinal: usize },
    /// The CUDA executor with its device layer on the host: the same kernel
    /// sources compiled by the system C++ compiler and run one thread per
    /// block, GEMMs by a host routine that reads cuBLASLt's descriptors.
    /// What CI runs in place of a GPU.
    CudaHost,
    /// The host device's race check: each block's threads (up to 16) as
    /// real threads, `__syncthreads` a barrier, shared memory shared.
    CudaHostThreads,
}

impl Device {
    /// `cpu`, `cpu-arena`, `gpu` / `cuda` (GPU 0), `cuda:N`, `cuda-host`,
    /// `cuda-host-threads`.
    pub fn parse(s: &str) -> Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cpu-arena" => Ok(Device::CpuArena),
            "gpu" | "cuda" => Ok(Device::Cuda { ordinal: 0 }),
            "cuda-host" => Ok(Device::CudaHost),
            "cuda-host-threads" => Ok(Device::CudaHostThreads),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(Device::Cuda { ordinal }),
                _ => Err(format!(
                    "unknown device `{s}`: use cpu, cpu-arena, gpu (GPU 0), cuda:N, cuda-host or cuda-host-threads"
                )),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::CpuArena => write!(f, "cpu-arena"),
            Device::Cuda { ordinal } => write!(f, "cuda:{ordinal}"),
            Device::CudaHost => write!(f, "cuda-host"),
            Device::CudaHostThreads => write!(f, "cuda-host-threads"),
        }
    }
}

/// An opened device, shared by every executor made on it.
#[derive(Clone)]
pub enum Backend {
    Cpu,
    CpuArena,
    Cuda(Arc<CudaBackend>),
}

impl Backend {
    /// Opens `device`. A CUDA device whose libraries or GPU cannot be found
    /// is an error naming what is missing.
    pub fn open(device: &Device) -> Result<Backend, RuntimeError> {
        match device {
            Device::Cpu => Ok(Backend::Cpu),
            Device::CpuArena => Ok(Backend::CpuArena),
            Device::Cuda { ordinal } => Ok(Backend::Cuda(Arc::new(CudaBackend::gpu(*ordinal)?))),
            Device::CudaHost => Ok(Backend::Cuda(Arc::new(CudaBackend::host()?))),
            Device::CudaHostThreads => Ok(Backend::Cuda(Arc::new(CudaBackend::host_threads(16)?))),
        }
    }

    /// For logs: `cpu`, `NVIDIA H100 80GB HBM3 (cuda:0, sm_90)`, ...
    pub fn describe(&self) -> String {
        match self {
            Backend::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
            Backend::CpuArena => {
                format!("cpu-arena ({} threads, the memory plan executed)", rayon::current_num_threads())
            }
            Backend::Cuda(c) => c.describe(),
        }
    }

    /// Device memory (free, total) in bytes, where the backend knows it.
    pub fn memory(&self) -> Option<(u64, u64)> {
        match self {
            Backend::Cpu | Backend::CpuArena => None,
            Backend::Cuda(c) => c.memory(),
        }
    }

    /// An executor for `plan`, its parameters and buffers initialised from
    /// their init rules with random streams keyed by `seed`.
    pub fn executor(&self, plan: Plan, seed: u64) -> Result<Executor, RuntimeError> {
        match self {
            Backend::Cpu => Ok(Executor::Cpu(CpuExecutor::new(plan, seed)?)),
            Backend::CpuArena => Ok(Executor::CpuArena(ArenaExecutor::new(plan, seed)?)),
            Backend::Cuda(c) => Ok(Executor::Cuda(Box::new(CudaExecutor::new(c.clone(), plan, seed)?))),
        }
    }
}

/// A plan ready to run on a backend, holding the model's state.
pub enum Executor {
    Cpu(CpuExecutor),
    CpuArena(ArenaExecutor),
    Cuda(Box<CudaExecutor>),
}

impl Executor {
    pub fn plan(&self) -> &Plan {
        match self {
            Executor::Cpu(e) => e.plan(),
            Executor::CpuArena(e) => e.plan(),
            Executor::Cuda(e) => e.plan(),
        }
    }

    pub fn seed(&self) -> u64 {
        match self {
            Executor::Cpu(e) => e.seed(),
            Executor::CpuArena(e) => e.seed(),
            Executor::Cuda(e) => e.seed(),
        }
    }

    /// The `step` of every random stream of the next run.
    pub fn step(&self) -> u64 {
        match self {
            Executor::Cpu(e) => e.step(),
            Executor::CpuArena(e) => e.step(),
            Executor::Cuda(e) => e.step(),
        }
    }

    /// Makes this executor one process of a data-parallel run: its
    /// collectives (and, on the CPU, the random streams' rank term) go
    /// through `comm`; a GPU's through NCCL, set up from `comm`.
    pub fn set_collective(&mut self, comm: Arc<dyn Collective>) -> Result<(), RuntimeError> {
        match self {
            Executor::Cpu(e) => e.set_collective(comm),
            Executor::CpuArena(e) => e.set_collective(comm),
            Executor::Cuda(e) => e.set_collective(comm)?,
        }
        Ok(())
    }

    pub fn set_step(&mut self, s: u64) {
        match self {
            Executor::Cpu(e) => e.set_step(s),
            Executor::CpuArena(e) => e.set_step(s),
            Executor::Cuda(e) => e.set_step(s),
        }
    }

    /// Names of every parameter and buffer, in plan order.
    pub fn state_names(&self) -> Vec<String> {
        match self {
            Executor::Cpu(e) => e.state_names(),
            Executor::CpuArena(e) => e.state_names(),
            Executor::Cuda(e) => e.state_names(),
        }
    }

    /// A host copy of parameter or buffer `name` (`None`: no such state, or
    /// handed to another executor).
    pub fn read_state(&self, name: &str) -> Result<Option<Tensor>, RuntimeError> {
        match self {
            Executor::Cpu(e) => Ok(e.state(name).cloned()),
            Executor::CpuArena(e) => e.read_state(name),
            Executor::Cuda(e) => e.read_state(name),
        }
    }

    /// Rank 0's values of the float states `names` on every rank of `comm`:
    /// on a GPU device to device through NCCL, on the CPU through host
    /// tensors.
    pub fn broadcast_states(&mut self, names: &[String], comm: &dyn Collective) -> Result<(), RuntimeError> {
        if let Executor::Cuda(e) = self {
            return e.broadcast_states(names, 0, comm);
        }
        for name in names {
            let Some(mut t) = self.read_state(name)? else { continue };
            if let crate::tensor::Data::F32(v) = &mut t.data {
                comm.broadcast_f32(v, 0).map_err(|e| RuntimeError::Device(format!("broadcasting `{name}`: {e}")))?;
                self.write_state(name, t)?;
            }
        }
        Ok(())
    }

    /// Replaces parameter or buffer `name` with a host tensor of its type
    /// (floats are rounded to the state's dtype).
    pub fn write_state(&mut self, name: &str, t: Tensor) -> Result<(), RuntimeError> {
        match self {
            Executor::Cpu(e) => e.set_state(name, t),
            Executor::CpuArena(e) => e.write_state(name, t),
            Executor::Cuda(e) => e.write_state(name, t),
        }
    }

    /// Hands every state both executors hold to `to` (the CPU moves its
    /// tensors; the GPU copies device to device). Executors of different
    /// backends, and arena executors, go through the host.
    pub fn move_state_to(&mut self, to: &mut Executor) -> Result<(), RuntimeError> {
        match (self, to) {
            (Executor::Cpu(from), Executor::Cpu(to)) => {
                for name in to.state_names() {
                    if let Some(t) = from.take_state(&name) {
                        to.set_state(&name, t)?;
                    }
                }
                Ok(())
            }
            (Executor::Cuda(from), Executor::Cuda(to)) if from.same_device(to) => from.copy_state_to(to),
            (from, to) => {
                for name in to.state_names() {
                    if let Some(t) = from.read_state(&name)? {
                        to.write_state(&name, t)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Runs the plan once with the named inputs and returns the outputs
    /// `wanted` selects (`None`: every output). On error nothing changes.
    pub fn run(
        &mut self,
        inputs: &[(&str, Tensor)],
        wanted: Option<&dyn Fn(&str) -> bool>,
    ) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        self.run_next(inputs, None, wanted)
    }

    /// `run`, given the inputs of the next run as well (which the next call
    /// must be given again): a GPU copies them over while this step
    /// computes. The CPU backends have nothing to overlap and ignore them.
    pub fn run_next(
        &mut self,
        inputs: &[(&str, Tensor)],
        next: Option<&[(&str, &Tensor)]>,
        wanted: Option<&dyn Fn(&str) -> bool>,
    ) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        match self {
            Executor::Cpu(e) => {
                let mut out = e.run(inputs)?;
                if let Some(w) = wanted {
                    out.retain(|k, _| w(k));
                }
                Ok(out)
            }
            Executor::CpuArena(e) => e.run(inputs, wanted),
            Executor::Cuda(e) => {
                let given: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (*n, t)).collect();
                e.run_next(&given, next, wanted)
            }
        }
    }
}

/// Whether CUDA can be used here at all (libraries and a device), with the
/// reason when not: what tests print when they skip.
pub fn cuda_unavailable() -> Option<String> {
    cuda::unavailable()
}
