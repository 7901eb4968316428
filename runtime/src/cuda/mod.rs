//! The CUDA backend: runs every plan the compiler makes on one GPU, or, with
//! the host device, on the CPU through the very same executor (CI's check of
//! everything but the hardware).
//!
//! Module map, along a plan's way to the device:
//! - `libs`: finds and loads libcuda, NVRTC, cuBLASLt and the CUDA headers,
//!   naming what is missing.
//! - `arena`: the memory plan as one allocation (regions, arena, workspace).
//! - `lower` + `ops/`: each plan kernel becomes launches of kernels rendered
//!   from `kernels/*.cu` (tera templates; `source`), cuBLASLt GEMMs
//!   (`gemm`) and copies, with every address fixed.
//! - `source` / `nvrtc`: render, name by hash, compile (NVRTC or g++), cache.
//! - `device`: the device layer (`DeviceApi`), with `driver` (a GPU through
//!   cudarc) and `host` (kernels one thread per block, GEMMs by
//!   `gemm::host_gemm` on cuBLASLt's descriptors).
//! - `executor`: allocate, initialise, link the launch list once; a step is
//!   upload, walk, read back.
//!
//! Invariants: no floating-point atomics (every reduction sums in a fixed
//! order, so a plan, seed and data give bitwise-identical runs); random
//! masks are Philox keyed by (seed, step, op key, element), the CPU
//! backend's stream; a kernel's parameters are declared once and its
//! signature, its host entry and the executor's packing follow from them.

pub mod arena;
pub mod check;
pub mod device;
pub mod driver;
pub mod executor;
pub mod gemm;
pub mod host;
pub mod libs;
pub mod lower;
pub mod nvrtc;
pub mod ops;
pub mod overlap;
pub mod source;

pub use executor::CudaExecutor;

use crate::error::RuntimeError;
use device::{DeviceApi, Function};
use rayon::prelude::*;
use source::KernelSource;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// An opened CUDA device (a GPU, or the host device), with the kernels
/// loaded on it so far, by name.
pub struct CudaBackend {
    device: Arc<dyn DeviceApi>,
    loaded: Mutex<HashMap<String, Function>>,
}

impl CudaBackend {
    /// GPU `ordinal`; an error names what is missing (driver, library, device).
    pub fn gpu(ordinal: usize) -> Result<CudaBackend, RuntimeError> {
        let d = driver::GpuDevice::open(ordinal)
            .map_err(|e| RuntimeError::Device(format!("{e}. To train on the CPU instead, set MACHINE.DEVICE=cpu")))?;
        Ok(CudaBackend { device: Arc::new(d), loaded: Mutex::new(HashMap::new()) })
    }

    /// The host device (needs a C++ compiler and the CUDA headers).
    pub fn host() -> Result<CudaBackend, RuntimeError> {
        libs::include_dir().map_err(RuntimeError::Device)?;
        Ok(CudaBackend { device: Arc::new(host::HostDevice::new()), loaded: Mutex::new(HashMap::new()) })
    }

    /// The host device's race check: each block run by up to `threads` real
    /// threads with a barrier for `__syncthreads` and shared memory shared.
    pub fn host_threads(threads: u32) -> Result<CudaBackend, RuntimeError> {
        libs::include_dir().map_err(RuntimeError::Device)?;
        let d = host::HostDevice::with_threads(threads);
        Ok(CudaBackend { device: Arc::new(d), loaded: Mutex::new(HashMap::new()) })
    }

    pub fn device(&self) -> &dyn DeviceApi {
        self.device.as_ref()
    }

    pub fn describe(&self) -> String {
        self.device.describe()
    }

    pub fn memory(&self) -> Option<(u64, u64)> {
        self.device.memory()
    }

    /// The loaded function of every source, compiling (in parallel, or from
    /// the disk cache) and loading those not loaded yet.
    pub fn functions(&self, sources: &[KernelSource]) -> Result<Vec<Function>, String> {
        let target = self.device.target();
        let missing: Vec<&KernelSource> = {
            let loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
            let mut seen = std::collections::HashSet::new();
            sources.iter().filter(|s| !loaded.contains_key(&s.name) && seen.insert(s.name.clone())).collect()
        };
        let binaries: Vec<Result<device::Binary, String>> =
            missing.par_iter().map(|s| source::compile(s, &target)).collect();
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        for b in binaries {
            let b = b?;
            let fs = self.device.load(&b).map_err(|e| e.0)?;
            for (name, f) in b.kernels.iter().zip(fs) {
                loaded.insert(name.clone(), f);
            }
        }
        Ok(sources.iter().map(|s| loaded[&s.name]).collect())
    }
}

/// Why CUDA cannot be used on this machine (`None`: a GPU is there).
pub fn unavailable() -> Option<String> {
    match driver::GpuDevice::open(0) {
        Ok(_) => None,
        Err(e) => Some(e),
    }
}
