//! The host device: the CUDA executor's device layer on the CPU. Memory is
//! host memory (a `DevPtr` is a host address); kernels are the same rendered
//! sources, compiled by the system C++ compiler into shared libraries, and a
//! launch runs every block of the grid with one thread (blocks in parallel
//! on the rayon pool, so a kernel whose blocks depend on each other's order
//! fails here as it would on a GPU); GEMMs run `gemm::host_gemm` on the
//! descriptor cuBLASLt would get.

use super::device::{
    Arg, Binary, CollectiveOp, CollectiveStep, DResult, DevPtr, DeviceApi, DeviceError, Elem, Function, GemmHandle,
    GemmPtrs, HostBuf, Launch, Target,
};
use super::gemm::{host_gemm, GemmDesc};
use rayon::prelude::*;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

type BlockEntry = unsafe extern "C" fn(*const u32, *const u32, *const *mut c_void);
type GridEntry = unsafe extern "C" fn(*const u32, *const *mut c_void, u32);

/// A loaded kernel: one block at a time (one thread), or a whole grid with
/// real threads per block (the race check).
#[derive(Clone, Copy)]
enum Entry {
    Block(BlockEntry),
    Grid(GridEntry),
}

#[derive(Default)]
struct State {
    allocations: HashMap<u64, Layout>,
    functions: Vec<(String, Entry)>,
    gemms: Vec<GemmDesc>,
    libraries: Vec<libloading::Library>,
}

#[derive(Default)]
pub struct HostDevice {
    state: Mutex<State>,
    /// The race check: this many real threads per block (at most the
    /// launch's), blocks one after another.
    threads: Option<u32>,
}

const ALIGN: usize = 256;

impl HostDevice {
    pub fn new() -> HostDevice {
        HostDevice::default()
    }

    /// The race check: every block run by up to `threads` real threads.
    pub fn with_threads(threads: u32) -> HostDevice {
        HostDevice { state: Mutex::new(State::default()), threads: Some(threads.max(1)) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks that `[p, p + bytes)` lies inside one allocation: the bounds
    /// check a GPU would only give as a fault.
    fn check_range(&self, p: DevPtr, bytes: u64, what: &str) -> DResult<()> {
        if bytes == 0 {
            return Ok(());
        }
        let s = self.state();
        let ok = s.allocations.iter().any(|(&base, l)| p.0 >= base && p.0 + bytes <= base + l.size() as u64);
        if ok {
            Ok(())
        } else {
            Err(DeviceError(format!("{what}: {bytes} bytes at {p} are outside every allocation")))
        }
    }
}

struct SendPtrs(Vec<*mut c_void>);
// SAFETY: the argument array is only read by the kernels, and outlives the launch.
unsafe impl Sync for SendPtrs {}

impl SendPtrs {
    fn get(&self) -> *const *mut c_void {
        self.0.as_ptr()
    }
}

impl DeviceApi for HostDevice {
    fn describe(&self) -> String {
        match self.threads {
            None => "host emulation of the CUDA executor (one thread per block)".into(),
            Some(t) => format!("host emulation of the CUDA executor ({t} threads per block, blocks in order)"),
        }
    }

    fn target(&self) -> Target {
        if self.threads.is_some() {
            Target::HostThreads
        } else {
            Target::Host
        }
    }

    fn memory(&self) -> Option<(u64, u64)> {
        None
    }

    fn alloc(&self, bytes: u64) -> DResult<DevPtr> {
        let layout = Layout::from_size_align(bytes.max(1) as usize, ALIGN)
            .map_err(|e| DeviceError(format!("cannot allocate {bytes} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        if p.is_null() {
            return Err(DeviceError(format!("out of host memory allocating {bytes} bytes")));
        }
        self.state().allocations.insert(p as u64, layout);
        Ok(DevPtr(p as u64))
    }

    unsafe fn free(&self, p: DevPtr) {
        if let Some(layout) = self.state().allocations.remove(&p.0) {
            dealloc(p.0 as *mut u8, layout);
        }
    }

    fn upload(&self, dst: DevPtr, src: &[u8]) -> DResult<()> {
        self.check_range(dst, src.len() as u64, "upload")?;
        // SAFETY: checked to lie in one allocation.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.0 as *mut u8, src.len()) };
        Ok(())
    }

    fn download(&self, src: DevPtr, dst: &mut [u8]) -> DResult<()> {
        self.check_range(src, dst.len() as u64, "download")?;
        // SAFETY: checked to lie in one allocation.
        unsafe { std::ptr::copy_nonoverlapping(src.0 as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn copy(&self, dst: DevPtr, src: DevPtr, bytes: u64) -> DResult<()> {
        self.check_range(dst, bytes, "copy (destination)")?;
        self.check_range(src, bytes, "copy (source)")?;
        // SAFETY: both ranges lie in allocations; `copy` allows overlap.
        unsafe { std::ptr::copy(src.0 as *const u8, dst.0 as *mut u8, bytes as usize) };
        Ok(())
    }

    fn fill(&self, dst: DevPtr, byte: u8, bytes: u64) -> DResult<()> {
        self.check_range(dst, bytes, "fill")?;
        // SAFETY: checked to lie in one allocation.
        unsafe { std::ptr::write_bytes(dst.0 as *mut u8, byte, bytes as usize) };
        Ok(())
    }

    fn alloc_host(&self, bytes: usize) -> DResult<HostBuf> {
        let layout = Layout::from_size_align(bytes.max(1), ALIGN).map_err(|e| DeviceError(e.to_string()))?;
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(DeviceError(format!("out of host memory allocating {bytes} bytes")));
        }
        Ok(HostBuf { ptr, bytes })
    }

    unsafe fn free_host(&self, b: &mut HostBuf) {
        if !b.ptr.is_null() {
            dealloc(b.ptr, Layout::from_size_align(b.bytes.max(1), ALIGN).expect("allocated with it"));
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
        // SAFETY: the staging buffer holds `bytes` bytes.
        self.upload(dst, unsafe { std::slice::from_raw_parts(src.ptr.add(offset), bytes) })
    }

    fn prefetch(&self, dst: DevPtr, src: &HostBuf, offset: usize, bytes: usize) -> DResult<()> {
        // One stream of work on the host: the copy happens now.
        self.upload_async(dst, src, offset, bytes)
    }

    fn consume_prefetch(&self, dst: DevPtr, src: DevPtr, bytes: u64) -> DResult<()> {
        self.copy(dst, src, bytes)
    }

    fn load(&self, binary: &Binary) -> DResult<Vec<Function>> {
        if binary.target != self.target() {
            return Err(DeviceError(format!("this host device loads {:?} libraries only", self.target())));
        }
        // A file of its own per load (threads may load one module at once).
        static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("tessera-host-{}-{n}.so", std::process::id()));
        std::fs::write(&path, &binary.bytes)
            .map_err(|e| DeviceError(format!("cannot write {}: {e}", path.display())))?;
        // SAFETY: the library is a kernel module we compiled; its
        // initialisers are the C++ runtime's.
        let lib = unsafe { libloading::Library::new(&path) };
        let _ = std::fs::remove_file(&path);
        let lib = lib.map_err(|e| DeviceError(format!("cannot load kernel module: {e}")))?;
        let mut s = self.state();
        let mut out = Vec::new();
        for name in &binary.kernels {
            let lacks = |symbol: &str, e: libloading::Error| DeviceError(format!("kernel module lacks {symbol}: {e}"));
            let entry = if self.threads.is_some() {
                let symbol = format!("tsr_grid_{name}");
                // SAFETY: the symbol is a grid entry with the `GridEntry` signature (source.rs).
                Entry::Grid(unsafe { *lib.get::<GridEntry>(symbol.as_bytes()).map_err(|e| lacks(&symbol, e))? })
            } else {
                let symbol = format!("tsr_block_{name}");
                // SAFETY: the symbol is a block entry with the `BlockEntry` signature (source.rs).
                Entry::Block(unsafe { *lib.get::<BlockEntry>(symbol.as_bytes()).map_err(|e| lacks(&symbol, e))? })
            };
            s.functions.push((name.clone(), entry));
            out.push(Function(s.functions.len() - 1));
        }
        s.libraries.push(lib);
        Ok(out)
    }

    fn launch(&self, f: Function, shape: Launch, args: &[Arg]) -> DResult<()> {
        let entry = {
            let s = self.state();
            s.functions.get(f.0).map(|(_, e)| *e).ok_or_else(|| DeviceError(format!("no function {}", f.0)))?
        };
        let mut storage: Vec<Vec<u8>> = args.iter().map(Arg::bytes).collect();
        // Every parameter 8-byte aligned, as the kernel reads it in place.
        let mut aligned: Vec<Vec<u64>> = storage
            .iter_mut()
            .map(|b| {
                let mut w = vec![0u64; b.len().div_ceil(8).max(1)];
                // SAFETY: `w` holds at least `b.len()` bytes.
                unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), w.as_mut_ptr() as *mut u8, b.len()) };
                w
            })
            .collect();
        let ptrs = &SendPtrs(aligned.iter_mut().map(|w| w.as_mut_ptr() as *mut c_void).collect());
        let g = shape.grid;
        let entry = match entry {
            Entry::Grid(f) => {
                if shape.block[1] != 1 || shape.block[2] != 1 {
                    return Err(DeviceError(format!(
                        "a block of {:?} threads: kernels use blockDim.x only",
                        shape.block
                    )));
                }
                let threads = shape.block[0].min(self.threads.unwrap_or(1)).max(1);
                // SAFETY: the entry unpacks exactly the kernel's parameters from `ptrs`.
                unsafe { f(g.as_ptr(), ptrs.get(), threads) };
                return Ok(());
            }
            Entry::Block(f) => f,
        };
        let blocks = g[0] as u64 * g[1] as u64 * g[2] as u64;
        (0..blocks).into_par_iter().for_each(|i| {
            let b = [
                (i % g[0] as u64) as u32,
                ((i / g[0] as u64) % g[1] as u64) as u32,
                (i / (g[0] as u64 * g[1] as u64)) as u32,
            ];
            // SAFETY: the entry unpacks exactly the kernel's parameters from
            // `ptrs`, which outlive this loop.
            unsafe { entry(b.as_ptr(), g.as_ptr(), ptrs.get()) };
        });
        Ok(())
    }

    fn prepare_gemm(&self, desc: &GemmDesc) -> DResult<GemmHandle> {
        desc.check().map_err(DeviceError)?;
        let mut s = self.state();
        s.gemms.push(*desc);
        Ok(GemmHandle(s.gemms.len() - 1))
    }

    fn gemm(&self, h: GemmHandle, ptrs: &GemmPtrs) -> DResult<()> {
        let desc = *self.state().gemms.get(h.0).ok_or_else(|| DeviceError(format!("no GEMM {}", h.0)))?;
        let span =
            |l: &super::gemm::Layout| ((desc.batch - 1) * l.batch_stride + (l.cols - 1) * l.ld + l.rows) * l.ty.size();
        self.check_range(ptrs.a, span(&desc.a), "GEMM operand A")?;
        self.check_range(ptrs.b, span(&desc.b), "GEMM operand B")?;
        self.check_range(ptrs.d, span(&desc.d), "GEMM result D")?;
        // C has D's layout and is read when beta is not zero.
        if desc.beta != 0.0 {
            self.check_range(ptrs.c, span(&desc.d), "GEMM operand C")?;
        }
        // The GPU's algorithm was chosen for this alignment.
        desc.alignment_holds(ptrs).map_err(DeviceError)?;
        if desc.epilogue == super::gemm::Epilogue::Bias {
            self.check_range(ptrs.bias, desc.m * desc.d.ty.size(), "GEMM bias")?;
        }
        // SAFETY: every operand range was checked against the allocations.
        unsafe { host_gemm(&desc, ptrs) }
    }

    fn synchronize(&self) -> DResult<()> {
        Ok(())
    }

    fn collective(&self, comm: &dyn crate::dist::Collective, c: &CollectiveStep) -> DResult<()> {
        let w = comm.world();
        let (n, m) = (c.count as usize, c.dst_count(w) as usize);
        let size = c.elem.size();
        self.check_range(c.src, n as u64 * size, "collective (source)")?;
        self.check_range(c.dst, m as u64 * size, "collective (destination)")?;
        let failed = |e: crate::dist::DistError| DeviceError(e.to_string());
        if c.elem == Elem::F64 {
            let CollectiveOp::AllReduce(r) = c.op else {
                return Err(DeviceError(format!("{:?} of f64 values is not a collective the device has", c.op)));
            };
            // SAFETY: both ranges lie in allocations (checked) and hold f64
            // values; the host device runs one call at a time.
            let src = unsafe { std::slice::from_raw_parts(c.src.0 as *const f64, n) }.to_vec();
            let dst = unsafe { std::slice::from_raw_parts_mut(c.dst.0 as *mut f64, m) };
            dst.copy_from_slice(&src);
            return comm.all_reduce_f64(dst, r).map_err(failed);
        }
        // bf16 values travel as f32 (exact), are reduced in f32 and rounded
        // once, as NCCL's bf16 reductions accumulate in f32.
        let src: Vec<f32> = if c.elem == Elem::BF16 {
            // SAFETY: the range lies in an allocation (checked) and holds bf16 values.
            let s = unsafe { std::slice::from_raw_parts(c.src.0 as *const half::bf16, n) };
            s.iter().map(|v| v.to_f32()).collect()
        } else {
            // SAFETY: the range lies in an allocation (checked) and holds f32 values.
            unsafe { std::slice::from_raw_parts(c.src.0 as *const f32, n) }.to_vec()
        };
        let result = match c.op {
            CollectiveOp::AllReduce(r) => {
                let mut all = src;
                comm.all_reduce_f32(&mut all, r).map(|_| all)
            }
            CollectiveOp::AllGather => comm.all_gather_f32(&src),
            CollectiveOp::ReduceScatter => comm.reduce_scatter_f32(&src),
            CollectiveOp::Broadcast { root } => {
                let mut all = src;
                comm.broadcast_f32(&mut all, root).map(|_| all)
            }
        }
        .map_err(failed)?;
        if result.len() != m {
            return Err(DeviceError(format!("{:?} gave {} values, expected {m}", c.op, result.len())));
        }
        // SAFETY: the destination lies in an allocation (checked), holds
        // `m` elements of the step's type, and nothing else runs meanwhile.
        if c.elem == Elem::BF16 {
            let dst = unsafe { std::slice::from_raw_parts_mut(c.dst.0 as *mut half::bf16, m) };
            dst.iter_mut().zip(&result).for_each(|(d, &v)| *d = half::bf16::from_f32(v));
        } else {
            unsafe { std::slice::from_raw_parts_mut(c.dst.0 as *mut f32, m) }.copy_from_slice(&result);
        }
        Ok(())
    }
}

impl Drop for HostDevice {
    fn drop(&mut self) {
        let s = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        for (&p, &layout) in &s.allocations {
            // SAFETY: allocated by `alloc` with this layout, not freed yet.
            unsafe { dealloc(p as *mut u8, layout) };
        }
        s.allocations.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::gemm::ElemType;

    /// Every operand a GEMM reads is checked against the allocations, C
    /// too once beta makes the GEMM read it (a wrong C is an error, not a
    /// read of whatever host memory lies there).
    #[test]
    fn a_gemm_reading_c_outside_every_allocation_is_refused() {
        let dev = HostDevice::new();
        let f = ElemType::F32;
        let mut desc = GemmDesc::row_major(2, 2, 3, (f, false, 0), (f, false, 0), (f, 0), 1);
        let (x, y, d) = (dev.alloc(24).unwrap(), dev.alloc(24).unwrap(), dev.alloc(16).unwrap());
        let ptrs =
            |c: DevPtr| GemmPtrs { a: y, b: x, c, d, bias: DevPtr::NULL, workspace: DevPtr::NULL, workspace_bytes: 0 };
        let h = dev.prepare_gemm(&desc).unwrap();
        // beta = 0: C is not read, so it is not checked.
        dev.gemm(h, &ptrs(DevPtr::NULL)).unwrap();
        desc.beta = 1.0;
        let h = dev.prepare_gemm(&desc).unwrap();
        dev.gemm(h, &ptrs(d)).unwrap();
        let e = dev.gemm(h, &ptrs(DevPtr(d.0 + 8))).unwrap_err();
        assert!(e.0.contains("GEMM operand C: 16 bytes at"), "{}", e.0);
    }
}
