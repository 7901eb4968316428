//! The GPU device: cudarc's raw layers (`driver::result`, `cublaslt::sys`)
//! behind the device-layer trait. One context (the device's primary
//! context), one non-blocking stream that every call is issued on, cuBLASLt
//! descriptors and the heuristic's algorithm chosen once per GEMM when a
//! plan is loaded (`prepare_gemm`), never per call.

use super::device::{
    Arg, Binary, CollectiveOp, CollectiveStep, DResult, DevPtr, DeviceApi, DeviceError, Elem, Function, GemmHandle,
    GemmPtrs, HostBuf, Launch, Target,
};
use super::gemm::{ElemType, Epilogue, GemmDesc};
use super::libs;
use cudarc::cublaslt::sys as lt;
use cudarc::driver::{result as drv, sys};
use cudarc::nccl::result as nccl_call;
use cudarc::nccl::sys as nccl;
use std::ffi::{c_void, CString};
use std::sync::Mutex;

fn err(what: &str, e: impl std::fmt::Debug) -> DeviceError {
    DeviceError(format!("{what}: {e:?}"))
}

struct Gemm {
    desc: GemmDesc,
    matmul: lt::cublasLtMatmulDesc_t,
    a: lt::cublasLtMatrixLayout_t,
    b: lt::cublasLtMatrixLayout_t,
    d: lt::cublasLtMatrixLayout_t,
    algo: lt::cublasLtMatmulAlgo_t,
}

struct State {
    functions: Vec<sys::CUfunction>,
    modules: Vec<sys::CUmodule>,
    gemms: Vec<Gemm>,
}

pub struct GpuDevice {
    ordinal: usize,
    name: String,
    sm: u32,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    /// The prefetch stream (the next step's inputs) and its two events:
    /// `ready` (the copy landed), `consumed` (the compute stream took it).
    copies: sys::CUstream,
    ready: sys::CUevent,
    consumed: sys::CUevent,
    blas: lt::cublasLtHandle_t,
    /// The communication stream NCCL runs on, and per collective slot of
    /// the launch list the events that order it with the compute stream:
    /// (reached: the compute stream got there, done: the collective ended).
    comms: sys::CUstream,
    comm_events: Mutex<Vec<(sys::CUevent, sys::CUevent)>>,
    state: Mutex<State>,
    /// The NCCL communicator of a data-parallel run (made on the first
    /// collective, from the run's own collective), and its world size.
    nccl: Mutex<Option<(nccl::ncclComm_t, usize)>>,
}

// SAFETY: every CUDA handle here is used with the context made current
// first, under the state lock or on the one stream, which CUDA allows from
// any thread.
unsafe impl Send for GpuDevice {}
unsafe impl Sync for GpuDevice {}

impl GpuDevice {
    /// Opens GPU `ordinal`: finds and loads the libraries, retains its
    /// primary context, makes a stream and a cuBLASLt handle.
    pub fn open(ordinal: usize) -> Result<GpuDevice, String> {
        libs::load_gpu_libraries()?;
        drv::init()
            .map_err(|e| format!("the CUDA driver did not initialise ({e:?}): is there an NVIDIA GPU and driver?"))?;
        let count = drv::device::get_count().map_err(|e| format!("cuDeviceGetCount: {e:?}"))?;
        if ordinal as i32 >= count {
            return Err(format!("GPU {ordinal} does not exist: this machine has {count} CUDA device(s)"));
        }
        let dev = drv::device::get(ordinal as i32).map_err(|e| format!("cuDeviceGet({ordinal}): {e:?}"))?;
        let name = drv::device::get_name(dev).unwrap_or_else(|_| "CUDA device".into());
        let attr = |a| unsafe { drv::device::get_attribute(dev, a) };
        let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map_err(|e| format!("compute capability: {e:?}"))?;
        let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
            .map_err(|e| format!("compute capability: {e:?}"))?;
        // SAFETY: `dev` is a valid device; the context is released in Drop.
        let ctx = unsafe { drv::primary_ctx::retain(dev) }.map_err(|e| format!("cuDevicePrimaryCtxRetain: {e:?}"))?;
        unsafe { drv::ctx::set_current(ctx) }.map_err(|e| format!("cuCtxSetCurrent: {e:?}"))?;
        let stream =
            drv::stream::create(drv::stream::StreamKind::NonBlocking).map_err(|e| format!("cuStreamCreate: {e:?}"))?;
        let copies =
            drv::stream::create(drv::stream::StreamKind::NonBlocking).map_err(|e| format!("cuStreamCreate: {e:?}"))?;
        let event = || {
            drv::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(|e| format!("cuEventCreate: {e:?}"))
        };
        let (ready, consumed) = (event()?, event()?);
        let comms =
            drv::stream::create(drv::stream::StreamKind::NonBlocking).map_err(|e| format!("cuStreamCreate: {e:?}"))?;
        // Nothing to wait for before the first prefetch.
        unsafe { drv::event::record(consumed, stream) }.map_err(|e| format!("cuEventRecord: {e:?}"))?;
        let blas = cudarc::cublaslt::result::create_handle().map_err(|e| format!("cublasLtCreate: {e:?}"))?;
        Ok(GpuDevice {
            ordinal,
            name,
            sm: (major * 10 + minor) as u32,
            ctx,
            stream,
            copies,
            ready,
            consumed,
            blas,
            comms,
            comm_events: Mutex::new(Vec::new()),
            state: Mutex::new(State { functions: Vec::new(), modules: Vec::new(), gemms: Vec::new() }),
            nccl: Mutex::new(None),
        })
    }

    fn current(&self) -> DResult<()> {
        unsafe { drv::ctx::set_current(self.ctx) }.map_err(|e| err("cuCtxSetCurrent", e))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn data_type(t: ElemType) -> lt::cudaDataType {
    match t {
        ElemType::F32 => lt::cudaDataType::CUDA_R_32F,
        ElemType::BF16 => lt::cudaDataType::CUDA_R_16BF,
    }
}

/// A cuBLASLt matrix layout with its batch count and stride.
fn layout(l: &super::gemm::Layout, batch: u64) -> DResult<lt::cublasLtMatrixLayout_t> {
    let h = cudarc::cublaslt::result::create_matrix_layout(data_type(l.ty), l.rows, l.cols, l.ld as i64)
        .map_err(|e| err("cublasLtMatrixLayoutCreate", e))?;
    let count = batch as i32;
    let stride = l.batch_stride as i64;
    unsafe {
        cudarc::cublaslt::result::set_matrix_layout_attribute(
            h,
            lt::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
            &count as *const i32 as *const c_void,
            4,
        )
        .map_err(|e| err("batch count", e))?;
        cudarc::cublaslt::result::set_matrix_layout_attribute(
            h,
            lt::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
            &stride as *const i64 as *const c_void,
            8,
        )
        .map_err(|e| err("batch stride", e))?;
    }
    Ok(h)
}

unsafe fn set_desc<T>(d: lt::cublasLtMatmulDesc_t, attr: lt::cublasLtMatmulDescAttributes_t, v: &T) -> DResult<()> {
    cudarc::cublaslt::result::set_matmul_desc_attribute(
        d,
        attr,
        v as *const T as *const c_void,
        std::mem::size_of::<T>(),
    )
    .map_err(|e| err("cublasLtMatmulDescSetAttribute", e))
}

impl DeviceApi for GpuDevice {
    fn describe(&self) -> String {
        format!("{} (cuda:{}, sm_{})", self.name, self.ordinal, self.sm)
    }

    fn target(&self) -> Target {
        Target::Nvrtc { sm: self.sm }
    }

    fn memory(&self) -> Option<(u64, u64)> {
        self.current().ok()?;
        drv::mem_get_info().ok().map(|(f, t)| (f as u64, t as u64))
    }

    fn alloc(&self, bytes: u64) -> DResult<DevPtr> {
        self.current()?;
        let p = unsafe { drv::malloc_sync(bytes.max(1) as usize) }
            .map_err(|e| DeviceError(format!("cannot allocate {bytes} bytes on GPU {}: {e:?}", self.ordinal)))?;
        unsafe { drv::memset_d8_sync(p, 0, bytes.max(1) as usize) }.map_err(|e| err("cuMemsetD8", e))?;
        Ok(DevPtr(p))
    }

    unsafe fn free(&self, p: DevPtr) {
        if self.current().is_ok() {
            let _ = drv::free_sync(p.0);
        }
    }

    fn upload(&self, dst: DevPtr, src: &[u8]) -> DResult<()> {
        self.current()?;
        unsafe { drv::memcpy_htod_async(dst.0, src, self.stream) }.map_err(|e| err("cuMemcpyHtoDAsync", e))?;
        // Pageable host memory: the copy has been staged when the call
        // returns, but `src` may be freed after this, so wait.
        unsafe { drv::stream::synchronize(self.stream) }.map_err(|e| err("cuStreamSynchronize", e))
    }

    fn download(&self, src: DevPtr, dst: &mut [u8]) -> DResult<()> {
        self.current()?;
        unsafe { drv::memcpy_dtoh_async(dst, src.0, self.stream) }.map_err(|e| err("cuMemcpyDtoHAsync", e))?;
        unsafe { drv::stream::synchronize(self.stream) }.map_err(|e| err("cuStreamSynchronize", e))
    }

    fn copy(&self, dst: DevPtr, src: DevPtr, bytes: u64) -> DResult<()> {
        self.current()?;
        unsafe { drv::memcpy_dtod_async(dst.0, src.0, bytes as usize, self.stream) }
            .map_err(|e| err("cuMemcpyDtoDAsync", e))
    }

    fn fill(&self, dst: DevPtr, byte: u8, bytes: u64) -> DResult<()> {
        self.current()?;
        unsafe { drv::memset_d8_async(dst.0, byte, bytes as usize, self.stream) }.map_err(|e| err("cuMemsetD8Async", e))
    }

    fn alloc_host(&self, bytes: usize) -> DResult<HostBuf> {
        self.current()?;
        let ptr = unsafe { drv::malloc_host(bytes.max(1), 0) }.map_err(|e| err("cuMemHostAlloc", e))?;
        Ok(HostBuf { ptr: ptr as *mut u8, bytes })
    }

    unsafe fn free_host(&self, b: &mut HostBuf) {
        if !b.ptr.is_null() && self.current().is_ok() {
            let _ = drv::free_host(b.ptr as *mut c_void);
            b.ptr = std::ptr::null_mut();
        }
    }

    fn upload_async(&self, dst: DevPtr, src: &HostBuf, offset: usize, bytes: usize) -> DResult<()> {
        if offset + bytes > src.bytes {
            return Err(DeviceError(format!(
                "upload of {offset}+{bytes} bytes from a {}-byte staging buffer",
                src.bytes
            )));
        }
        self.current()?;
        // Page-locked source: a true asynchronous copy, ordered on the stream.
        let src = unsafe { std::slice::from_raw_parts(src.ptr.add(offset), bytes) };
        unsafe { drv::memcpy_htod_async(dst.0, src, self.stream) }.map_err(|e| err("cuMemcpyHtoDAsync", e))
    }

    fn prefetch(&self, dst: DevPtr, src: &HostBuf, offset: usize, bytes: usize) -> DResult<()> {
        if offset + bytes > src.bytes {
            return Err(DeviceError(format!(
                "prefetch of {offset}+{bytes} bytes from a {}-byte staging buffer",
                src.bytes
            )));
        }
        self.current()?;
        let wait = sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT;
        unsafe {
            drv::stream::wait_event(self.copies, self.consumed, wait).map_err(|e| err("cuStreamWaitEvent", e))?;
            let src = std::slice::from_raw_parts(src.ptr.add(offset), bytes);
            drv::memcpy_htod_async(dst.0, src, self.copies).map_err(|e| err("cuMemcpyHtoDAsync", e))?;
            drv::event::record(self.ready, self.copies).map_err(|e| err("cuEventRecord", e))
        }
    }

    fn consume_prefetch(&self, dst: DevPtr, src: DevPtr, bytes: u64) -> DResult<()> {
        self.current()?;
        let wait = sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT;
        unsafe {
            drv::stream::wait_event(self.stream, self.ready, wait).map_err(|e| err("cuStreamWaitEvent", e))?;
            drv::memcpy_dtod_async(dst.0, src.0, bytes as usize, self.stream)
                .map_err(|e| err("cuMemcpyDtoDAsync", e))?;
            drv::event::record(self.consumed, self.stream).map_err(|e| err("cuEventRecord", e))
        }
    }

    fn load(&self, binary: &Binary) -> DResult<Vec<Function>> {
        if !matches!(binary.target, Target::Nvrtc { .. }) {
            return Err(DeviceError("a GPU loads NVRTC output only".into()));
        }
        self.current()?;
        let module = unsafe { drv::module::load_data(binary.bytes.as_ptr() as *const c_void) }
            .map_err(|e| err("cuModuleLoadData", e))?;
        let mut s = self.state();
        s.modules.push(module);
        let mut out = Vec::new();
        for name in &binary.kernels {
            let c = CString::new(name.as_str()).expect("kernel names have no NUL");
            let f = unsafe { drv::module::get_function(module, c) }
                .map_err(|e| err(&format!("cuModuleGetFunction({name})"), e))?;
            s.functions.push(f);
            out.push(Function(s.functions.len() - 1));
        }
        Ok(out)
    }

    fn launch(&self, f: Function, shape: Launch, args: &[Arg]) -> DResult<()> {
        self.current()?;
        let func = *self.state().functions.get(f.0).ok_or_else(|| DeviceError(format!("no function {}", f.0)))?;
        let mut storage: Vec<Vec<u64>> = args
            .iter()
            .map(|a| {
                let b = a.bytes();
                let mut w = vec![0u64; b.len().div_ceil(8).max(1)];
                // SAFETY: `w` holds at least `b.len()` bytes.
                unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), w.as_mut_ptr() as *mut u8, b.len()) };
                w
            })
            .collect();
        let mut params: Vec<*mut c_void> = storage.iter_mut().map(|w| w.as_mut_ptr() as *mut c_void).collect();
        let (g, b) = (shape.grid, shape.block);
        unsafe { drv::launch_kernel(func, (g[0], g[1], g[2]), (b[0], b[1], b[2]), 0, self.stream, &mut params) }
            .map_err(|e| err("cuLaunchKernel", e))
    }

    fn prepare_gemm(&self, desc: &GemmDesc) -> DResult<GemmHandle> {
        desc.check().map_err(DeviceError)?;
        self.current()?;
        let compute = if desc.tf32 {
            lt::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            lt::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let matmul = cudarc::cublaslt::result::create_matmul_desc(compute, lt::cudaDataType::CUDA_R_32F)
            .map_err(|e| err("cublasLtMatmulDescCreate", e))?;
        let op = |t: bool| if t { 1i32 } else { 0i32 }; // CUBLAS_OP_T / CUBLAS_OP_N
        unsafe {
            set_desc(matmul, lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &op(desc.trans_a))?;
            set_desc(matmul, lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &op(desc.trans_b))?;
            let epilogue = match desc.epilogue {
                Epilogue::None => lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
                Epilogue::Bias => lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            };
            set_desc(matmul, lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
            if desc.epilogue == Epilogue::Bias {
                let bias_type = data_type(desc.d.ty);
                set_desc(matmul, lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type)?;
            }
        }
        let (a, b, d) = (layout(&desc.a, desc.batch)?, layout(&desc.b, desc.batch)?, layout(&desc.d, desc.batch)?);
        let pref =
            cudarc::cublaslt::result::create_matmul_pref().map_err(|e| err("cublasLtMatmulPreferenceCreate", e))?;
        let ws = desc.workspace as usize;
        unsafe {
            cudarc::cublaslt::result::set_matmul_pref_attribute(
                pref,
                lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            )
            .map_err(|e| err("workspace preference", e))?;
            // Only algorithms that work at the operands' alignment.
            use lt::cublasLtMatmulPreferenceAttributes_t as P;
            let which = [
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ];
            for (attr, bytes) in which.into_iter().zip(desc.align) {
                cudarc::cublaslt::result::set_matmul_pref_attribute(
                    pref,
                    attr,
                    &bytes as *const u32 as *const c_void,
                    std::mem::size_of::<u32>(),
                )
                .map_err(|e| err("alignment preference", e))?;
            }
        }
        let heuristic =
            unsafe { cudarc::cublaslt::result::get_matmul_algo_heuristic(self.blas, matmul, a, b, d, d, pref) }
                .map_err(|e| DeviceError(format!("cuBLASLt has no algorithm for {desc:?}: {e:?}")))?;
        unsafe {
            let _ = cudarc::cublaslt::result::destroy_matmul_pref(pref);
        }
        let mut s = self.state();
        s.gemms.push(Gemm { desc: *desc, matmul, a, b, d, algo: heuristic.algo });
        Ok(GemmHandle(s.gemms.len() - 1))
    }

    fn gemm(&self, h: GemmHandle, p: &GemmPtrs) -> DResult<()> {
        self.current()?;
        let s = self.state();
        let g = s.gemms.get(h.0).ok_or_else(|| DeviceError(format!("no GEMM {}", h.0)))?;
        unsafe {
            if g.desc.epilogue == Epilogue::Bias {
                set_desc(g.matmul, lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias.0)?;
            }
            lt::cublasLtMatmul(
                self.blas,
                g.matmul,
                &g.desc.alpha as *const f32 as *const c_void,
                p.a.0 as *const c_void,
                g.a,
                p.b.0 as *const c_void,
                g.b,
                &g.desc.beta as *const f32 as *const c_void,
                p.c.0 as *const c_void,
                g.d,
                p.d.0 as *mut c_void,
                g.d,
                &g.algo,
                p.workspace.0 as *mut c_void,
                p.workspace_bytes as usize,
                self.stream as lt::cudaStream_t,
            )
            .result()
            .map_err(|e| err("cublasLtMatmul", e))
        }
    }

    fn synchronize(&self) -> DResult<()> {
        self.current()?;
        unsafe { drv::stream::synchronize(self.stream) }.map_err(|e| err("cuStreamSynchronize (a kernel failed)", e))
    }

    fn collective(&self, comm: &dyn crate::dist::Collective, c: &CollectiveStep) -> DResult<()> {
        self.current()?;
        self.nccl_on(comm, c, self.stream)
    }

    fn collective_async(&self, comm: &dyn crate::dist::Collective, c: &CollectiveStep, slot: usize) -> DResult<()> {
        self.current()?;
        let (reached, done) = self.comm_events(slot)?;
        let wait = sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT;
        // SAFETY: the events and streams live as long as the device.
        unsafe {
            drv::event::record(reached, self.stream).map_err(|e| err("cuEventRecord", e))?;
            drv::stream::wait_event(self.comms, reached, wait).map_err(|e| err("cuStreamWaitEvent", e))?;
        }
        self.nccl_on(comm, c, self.comms)?;
        unsafe { drv::event::record(done, self.comms) }.map_err(|e| err("cuEventRecord", e))
    }

    fn wait_collective(&self, slot: usize) -> DResult<()> {
        self.current()?;
        let (_, done) = self.comm_events(slot)?;
        let wait = sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT;
        // SAFETY: the event and stream live as long as the device.
        unsafe { drv::stream::wait_event(self.stream, done, wait) }.map_err(|e| err("cuStreamWaitEvent", e))
    }
}

impl GpuDevice {
    /// The events of collective slot `slot`, made on first use.
    fn comm_events(&self, slot: usize) -> DResult<(sys::CUevent, sys::CUevent)> {
        let mut events = self.comm_events.lock().unwrap_or_else(|p| p.into_inner());
        while events.len() <= slot {
            let event =
                || drv::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(|e| err("cuEventCreate", e));
            events.push((event()?, event()?));
        }
        Ok(events[slot])
    }

    /// Issues `c` through NCCL on `stream`.
    fn nccl_on(&self, comm: &dyn crate::dist::Collective, c: &CollectiveStep, stream: sys::CUstream) -> DResult<()> {
        use crate::dist::Reduction;
        let nccl_comm = self.nccl_comm(comm)?;
        let stream = stream as nccl::cudaStream_t;
        let (src, dst) = (c.src.0 as *const c_void, c.dst.0 as *mut c_void);
        let f32_ = match c.elem {
            Elem::F32 => nccl::ncclDataType_t::ncclFloat32,
            Elem::BF16 => nccl::ncclDataType_t::ncclBfloat16,
            Elem::F64 => nccl::ncclDataType_t::ncclFloat64,
        };
        // SAFETY: src and dst are device addresses of this context holding
        // the counts the lowering checked; NCCL orders them on the stream.
        let r = unsafe {
            match c.op {
                CollectiveOp::AllReduce(r) => {
                    let op = match r {
                        Reduction::Sum => nccl::ncclRedOp_t::ncclSum,
                        Reduction::Mean => nccl::ncclRedOp_t::ncclAvg,
                        Reduction::Max => nccl::ncclRedOp_t::ncclMax,
                    };
                    nccl_call::all_reduce(src, dst, c.count as usize, f32_, op, nccl_comm, stream)
                }
                CollectiveOp::AllGather => nccl_call::all_gather(src, dst, c.count as usize, f32_, nccl_comm, stream),
                CollectiveOp::Broadcast { root } => {
                    nccl_call::broadcast(src, dst, c.count as usize, f32_, root as i32, nccl_comm, stream)
                }
                CollectiveOp::ReduceScatter => nccl_call::reduce_scatter(
                    src,
                    dst,
                    c.count as usize / comm.world(),
                    f32_,
                    nccl::ncclRedOp_t::ncclSum,
                    nccl_comm,
                    stream,
                ),
            }
        };
        r.map(|_| ()).map_err(|e| err("NCCL collective", e))
    }
}

impl GpuDevice {
    /// The NCCL communicator of `comm`'s ranks: rank 0's unique id goes to
    /// every rank through `comm`, then every rank joins (once).
    fn nccl_comm(&self, comm: &dyn crate::dist::Collective) -> DResult<nccl::ncclComm_t> {
        let mut held = self.nccl.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((c, world)) = *held {
            if world == comm.world() {
                return Ok(c);
            }
        }
        libs::load_nccl().map_err(DeviceError)?;
        let mut id = [0u8; 128];
        if comm.rank() == 0 {
            let unique = nccl_call::get_uniqueid().map_err(|e| err("ncclGetUniqueId", e))?;
            for (b, c) in id.iter_mut().zip(unique.internal) {
                *b = c as u8;
            }
        }
        comm.broadcast_bytes(&mut id).map_err(|e| DeviceError(format!("sharing NCCL's unique id: {e}")))?;
        let mut unique = nccl::ncclUniqueId { internal: [0; 128] };
        for (c, b) in unique.internal.iter_mut().zip(id) {
            *c = b as _;
        }
        let mut c: nccl::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `c` receives the communicator; every rank calls this with
        // the same id and world size.
        unsafe { nccl_call::comm_init_rank(&mut c, comm.world() as i32, unique, comm.rank() as i32) }
            .map_err(|e| err("ncclCommInitRank", e))?;
        *held = Some((c, comm.world()));
        Ok(c)
    }
}

impl Drop for GpuDevice {
    fn drop(&mut self) {
        if self.current().is_err() {
            return;
        }
        let s = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        unsafe {
            let _ = drv::stream::synchronize(self.stream);
            for g in s.gemms.drain(..) {
                let _ = cudarc::cublaslt::result::destroy_matmul_desc(g.matmul);
                for l in [g.a, g.b, g.d] {
                    let _ = cudarc::cublaslt::result::destroy_matrix_layout(l);
                }
            }
            for m in s.modules.drain(..) {
                let _ = drv::module::unload(m);
            }
            let _ = drv::stream::synchronize(self.copies);
            let _ = drv::stream::synchronize(self.comms);
            for (a, b) in self.comm_events.get_mut().map(std::mem::take).unwrap_or_default() {
                let _ = drv::event::destroy(a);
                let _ = drv::event::destroy(b);
            }
            let _ = cudarc::cublaslt::result::destroy_handle(self.blas);
            let _ = drv::event::destroy(self.ready);
            let _ = drv::event::destroy(self.consumed);
            let _ = drv::stream::destroy(self.copies);
            let _ = drv::stream::destroy(self.comms);
            let _ = drv::stream::destroy(self.stream);
            if let Some((c, _)) = self.nccl.get_mut().ok().and_then(|n| n.take()) {
                let _ = nccl_call::comm_destroy(c);
            }
        }
    }
}
