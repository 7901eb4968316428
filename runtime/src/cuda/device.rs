//! The device layer: everything the CUDA executor asks of a device, and
//! nothing more (allocate, copy, load compiled kernels, launch, GEMM,
//! synchronise). Two implementations: `driver` (a real GPU through cudarc:
//! the driver API, NVRTC, cuBLASLt) and `host` (the same kernel sources
//! compiled by the system C++ compiler and run one thread per block; GEMMs by
//! `gemm::host_gemm`, which reads cuBLASLt's descriptors). The executor
//! cannot tell them apart, so CI checks placement, argument packing, launch
//! shapes and index arithmetic without a GPU.
//!
//! Invariants: a `DevPtr` is an address in the device's memory (on the
//! host, a host address); every call is ordered after the previous ones on
//! the compute stream, except `collective_async`, which runs beside it until
//! its `wait_collective`; `download` returns after the data has arrived.

use super::gemm::GemmDesc;
use std::fmt;

/// An address in device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DevPtr(pub u64);

impl DevPtr {
    pub const NULL: DevPtr = DevPtr(0);

    pub fn add(self, bytes: u64) -> DevPtr {
        DevPtr(self.0 + bytes)
    }
}

impl fmt::Display for DevPtr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct DeviceError(pub String);

pub type DResult<T> = Result<T, DeviceError>;

/// What kernel sources are compiled for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// NVRTC for compute capability `sm` (90 for sm_90).
    Nvrtc { sm: u32 },
    /// The system C++ compiler, for the host device.
    Host,
    /// The host device's race check: each block's threads as real threads
    /// (`__syncthreads` a barrier, shared memory shared), blocks in order.
    HostThreads,
}

/// A kernel argument as `cuLaunchKernel` takes it: the bytes of one
/// parameter of the kernel's signature, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    Ptr(DevPtr),
    I64(i64),
    U32(u32),
    F32(f32),
    F64(f64),
    /// A struct passed by value (its C layout, e.g. an array of strides).
    Bytes(Vec<u8>),
}

impl Arg {
    /// The parameter's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Arg::Ptr(p) => p.0.to_ne_bytes().to_vec(),
            Arg::I64(v) => v.to_ne_bytes().to_vec(),
            Arg::U32(v) => v.to_ne_bytes().to_vec(),
            Arg::F32(v) => v.to_ne_bytes().to_vec(),
            Arg::F64(v) => v.to_ne_bytes().to_vec(),
            Arg::Bytes(b) => b.clone(),
        }
    }
}

/// A launch shape: grid and block dimensions (x, y, z).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
}

impl Launch {
    /// `blocks` blocks of `threads` threads along x.
    pub fn linear(blocks: u32, threads: u32) -> Launch {
        Launch { grid: [blocks.max(1), 1, 1], block: [threads, 1, 1] }
    }
}

/// A loaded kernel function, by index in the device's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Function(pub usize);

/// A GEMM prepared once (descriptors, layouts, the chosen algorithm).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmHandle(pub usize);

/// The operands of one prepared GEMM: D = alpha op(A) op(B) + beta C (+ bias).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmPtrs {
    pub a: DevPtr,
    pub b: DevPtr,
    pub c: DevPtr,
    pub d: DevPtr,
    pub bias: DevPtr,
    pub workspace: DevPtr,
    pub workspace_bytes: u64,
}

/// A compiled module as the device loads it (PTX or CUBIN for a GPU, a
/// shared library for the host).
pub struct Binary {
    pub target: Target,
    pub bytes: Vec<u8>,
    /// The `extern "C"` kernel names it exports.
    pub kernels: Vec<String>,
}

/// Host memory a device copies from without staging (page-locked on a
/// GPU), owned by the executor that allocated it.
pub struct HostBuf {
    pub ptr: *mut u8,
    pub bytes: usize,
}

// SAFETY: the buffer is plain memory owned by one executor.
unsafe impl Send for HostBuf {}

impl HostBuf {
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `bytes` bytes for the buffer's lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }
}

/// A collective on device memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CollectiveOp {
    /// `dst` (count elements) = the reduction of every rank's `src`.
    AllReduce(crate::dist::Reduction),
    /// `dst` (count x world) = every rank's `src`, in rank order.
    AllGather,
    /// `dst` (count / world) = block `rank` of the sum of every rank's `src`.
    ReduceScatter,
    /// `dst` (count elements) = rank `root`'s `src` (the run's start: every
    /// rank takes rank 0's model, as DDP broadcasts it).
    Broadcast { root: usize },
}

/// The elements a collective moves: f32 or bf16 values (mixed-precision
/// plans gather bf16 activations), or the f64 sums of synchronised batch
/// norm's statistics (all-reduce only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    BF16,
    F64,
}

impl Elem {
    pub fn size(self) -> u64 {
        match self {
            Elem::BF16 => 2,
            Elem::F32 => 4,
            Elem::F64 => 8,
        }
    }
}

/// One collective of a step: `count` elements of `src`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CollectiveStep {
    pub op: CollectiveOp,
    pub elem: Elem,
    pub src: DevPtr,
    pub dst: DevPtr,
    pub count: u64,
}

impl CollectiveStep {
    /// Elements of `dst` with `world` ranks.
    pub fn dst_count(&self, world: usize) -> u64 {
        match self.op {
            CollectiveOp::AllReduce(_) | CollectiveOp::Broadcast { .. } => self.count,
            CollectiveOp::AllGather => self.count * world as u64,
            CollectiveOp::ReduceScatter => self.count / world as u64,
        }
    }
}

pub trait DeviceApi: Send + Sync {
    /// `NVIDIA H100 80GB HBM3 (cuda:0, sm_90)`, `host emulation of the CUDA executor`.
    fn describe(&self) -> String;
    fn target(&self) -> Target;
    /// (free, total) bytes of device memory.
    fn memory(&self) -> Option<(u64, u64)>;
    fn alloc(&self, bytes: u64) -> DResult<DevPtr>;
    /// # Safety
    /// `p` came from `alloc` of this device and is not used afterwards.
    unsafe fn free(&self, p: DevPtr);
    fn upload(&self, dst: DevPtr, src: &[u8]) -> DResult<()>;
    fn download(&self, src: DevPtr, dst: &mut [u8]) -> DResult<()>;
    fn copy(&self, dst: DevPtr, src: DevPtr, bytes: u64) -> DResult<()>;
    fn zero(&self, dst: DevPtr, bytes: u64) -> DResult<()> {
        self.fill(dst, 0, bytes)
    }
    /// Sets `bytes` bytes at `dst` to `byte`.
    fn fill(&self, dst: DevPtr, byte: u8, bytes: u64) -> DResult<()>;
    /// Host memory for `upload_async` (page-locked on a GPU).
    fn alloc_host(&self, bytes: usize) -> DResult<HostBuf>;
    /// # Safety
    /// `b` came from `alloc_host` of this device and no copy from it is in flight.
    unsafe fn free_host(&self, b: &mut HostBuf);
    /// Copies `bytes` from `src` to `dst` in stream order, without waiting:
    /// `src` must not change until the stream has passed this point (the
    /// executor alternates two staging buffers and synchronises every step).
    fn upload_async(&self, dst: DevPtr, src: &HostBuf, offset: usize, bytes: usize) -> DResult<()>;
    /// The next step's inputs, while this step computes: waits until the
    /// previous prefetch into `dst` has been consumed, then copies `bytes`
    /// from `src` to `dst` on a stream of its own (a GPU's copy engine
    /// works beside the compute stream).
    fn prefetch(&self, dst: DevPtr, src: &HostBuf, offset: usize, bytes: usize) -> DResult<()>;
    /// Takes a prefetch in stream order: the compute stream waits for it,
    /// copies `bytes` from `src` (where it landed) to `dst`, and marks it
    /// consumed.
    fn consume_prefetch(&self, dst: DevPtr, src: DevPtr, bytes: u64) -> DResult<()>;
    /// Loads a module; its kernels in the order of `binary.kernels`.
    fn load(&self, binary: &Binary) -> DResult<Vec<Function>>;
    fn launch(&self, f: Function, shape: Launch, args: &[Arg]) -> DResult<()>;
    fn prepare_gemm(&self, desc: &GemmDesc) -> DResult<GemmHandle>;
    fn gemm(&self, h: GemmHandle, ptrs: &GemmPtrs) -> DResult<()>;
    /// Waits for everything issued so far.
    fn synchronize(&self) -> DResult<()>;
    /// Runs `c` in stream order across the ranks of `comm` (a GPU: NCCL,
    /// with a communicator made from `comm` on first use; the host: `comm`
    /// itself on host memory).
    fn collective(&self, comm: &dyn crate::dist::Collective, c: &CollectiveStep) -> DResult<()>;
    /// Starts `c` on the communication stream once the compute stream has
    /// reached this point, and returns without waiting; the compute stream
    /// waits for it at `wait_collective(slot)` (slots number a launch
    /// list's collectives from 0). A device with one stream runs it in
    /// order (the host device).
    fn collective_async(&self, comm: &dyn crate::dist::Collective, c: &CollectiveStep, slot: usize) -> DResult<()> {
        let _ = slot;
        self.collective(comm, c)
    }
    /// Later work on the compute stream waits for collective `slot`.
    fn wait_collective(&self, slot: usize) -> DResult<()> {
        let _ = slot;
        Ok(())
    }
}
