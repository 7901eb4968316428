//! The CUDA backend's tests, one binary (what scripts/gpu-check.sh carries
//! to a GPU machine): every op family against the CPU backend (`ops`,
//! `reduce`, `attention`, `batchnorm`), every reference model trained three
//! steps against the CPU (`models`), and every kernel of the shipped
//! configs compiled for sm_90 with NVRTC and ptxas (`compile`); the
//! data-parallel launch lists' buckets and joins (`overlap`).
//!
//! They run the CUDA executor on the host device (the GPU's kernel sources
//! compiled by g++, one thread per block), which needs the CUDA headers
//! (scripts/setup-cuda-tools.sh); with TESSERA_CUDA_TEST_DEVICE=gpu they
//! run on GPU 0 instead, with TESSERA_CUDA_TEST_DEVICE=host-threads on the
//! host device's race check (each block's threads as real threads).

mod aliasing;
mod attention;
mod batchnorm;
mod compile;
mod models;
mod ops;
mod overlap;
mod reduce;

use tessera_runtime::{Backend, Device, RuntimeError};

/// The device under test: the host device, or GPU 0 with
/// TESSERA_CUDA_TEST_DEVICE=gpu.
pub fn cuda_device() -> Device {
    match std::env::var("TESSERA_CUDA_TEST_DEVICE").as_deref() {
        Ok("gpu") => Device::Cuda { ordinal: 0 },
        // The race check: blocks run by real threads (scripts/test.sh runs
        // the op families this way too).
        Ok("host-threads") => Device::CudaHostThreads,
        _ => Device::CudaHost,
    }
}

/// Opens the device under test (once per call; kernels are cached on disk).
pub fn open_cuda() -> Result<Backend, RuntimeError> {
    Backend::open(&cuda_device())
}
