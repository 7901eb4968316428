//! The memory plan as one buffer, for every backend that executes it (the
//! CUDA executor on a device, the CPU arena executor on the host): the
//! regions (parameters, gradients, optimizer state, buffers, inputs), the
//! arena and the workspace, in that order, so that the buffer is the
//! planned peak exactly. A value lives at its region's start plus its
//! planned offset; scalar fills (folded into their readers) live in a small
//! constant table of the executor's. Also here: the checks a backend runs
//! before it trusts the placements, and values as bytes of their dtype.
//!
//! Invariant: after `check_placements`, every value a kernel reads or writes
//! lies inside its region, and its region inside the buffer.

use crate::tensor::{Data, Tensor};
use half::{bf16, f16};
use tessera_plan::memory::{align, MemoryPlan, Region, ALIGN};
use tessera_plan::{DType, Op, Plan, Source};

/// Where the regions start inside the one buffer, in bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub params: u64,
    pub grads: u64,
    pub optimizer_state: u64,
    pub buffers: u64,
    pub inputs: u64,
    pub arena: u64,
    pub workspace: u64,
    /// The buffer's size: the memory plan's peak.
    pub total: u64,
}

impl Layout {
    pub fn of(m: &MemoryPlan) -> Layout {
        let p = &m.parts;
        let mut at = 0;
        let mut next = |bytes: u64| {
            let here = at;
            at += align(bytes);
            here
        };
        let params = next(p.parameters);
        let grads = next(p.gradients);
        let optimizer_state = next(p.optimizer_state);
        let buffers = next(p.buffers);
        let inputs = next(p.inputs);
        let arena = next(m.arena_bytes);
        let workspace = next(p.workspace);
        Layout { params, grads, optimizer_state, buffers, inputs, arena, workspace, total: at }
    }

    /// Where region `r` starts (`None`: inline, stored in no region).
    pub fn region(&self, r: Region) -> Option<u64> {
        match r {
            Region::Params => Some(self.params),
            Region::Grads => Some(self.grads),
            Region::OptimizerState => Some(self.optimizer_state),
            Region::Buffers => Some(self.buffers),
            Region::Inputs => Some(self.inputs),
            Region::Arena => Some(self.arena),
            Region::Inline => None,
        }
    }
}

/// The planned size of region `r` in bytes (`None` for inline).
pub fn region_bytes(m: &MemoryPlan, r: Region) -> Option<u64> {
    let p = &m.parts;
    match r {
        Region::Params => Some(p.parameters),
        Region::Grads => Some(p.gradients),
        Region::OptimizerState => Some(p.optimizer_state),
        Region::Buffers => Some(p.buffers),
        Region::Inputs => Some(p.inputs),
        Region::Arena => Some(m.arena_bytes),
        Region::Inline => None,
    }
}

/// Every value's offset from the buffer's start (`None`: stored in no
/// region: a scalar fill, a multi-tensor kernel's packed result, or a
/// value of no elements).
pub fn offsets(m: &MemoryPlan) -> Vec<Option<u64>> {
    let layout = Layout::of(m);
    m.placements.iter().map(|p| layout.region(p.region).map(|r| r + p.offset)).collect()
}

/// The scalar fills the memory plan places nowhere (folded into readers):
/// the executor keeps them in its constant table.
pub fn inline_constants(plan: &Plan, m: &MemoryPlan) -> Vec<usize> {
    plan.values
        .iter()
        .enumerate()
        .filter(|(v, value)| matches!(value.source, Source::Fill { .. }) && m.placements[*v].region == Region::Inline)
        .map(|(v, _)| v)
        .collect()
}

/// Checks that the placements describe storage a backend can use: one per
/// value; each placed value fits in its placement, and its placement, at an
/// aligned offset, in its region; only scalar fills, packed multi-tensor
/// results and empty values are inline; the regions add up to the planned
/// peak. (Run it before `MemoryPlan::simulate`, which indexes the arena by
/// the placements.)
pub fn check_placements(plan: &Plan, m: &MemoryPlan) -> Result<(), String> {
    if m.placements.len() != plan.values.len() {
        return Err(format!(
            "the memory plan places {} values, the plan has {}",
            m.placements.len(),
            plan.values.len()
        ));
    }
    let layout = Layout::of(m);
    if layout.total != m.peak_bytes {
        return Err(format!(
            "the memory plan's regions add up to {} bytes, its peak says {}",
            layout.total, m.peak_bytes
        ));
    }
    if !m.arena_bytes.is_multiple_of(ALIGN) {
        return Err(format!("the arena's {} bytes are not a multiple of {ALIGN}", m.arena_bytes));
    }
    for (v, (value, p)) in plan.values.iter().zip(&m.placements).enumerate() {
        let bytes = value.numel() * value.dtype.size_bytes();
        let Some(size) = region_bytes(m, p.region) else {
            let packed = matches!(value.source, Source::Kernel(k)
                if plan.kernels.get(k).is_some_and(|k| matches!(k.op, Op::MultiTensor { .. })));
            let scalar_fill = matches!(value.source, Source::Fill { .. }) && value.numel() <= 1;
            if packed || scalar_fill || bytes == 0 {
                continue;
            }
            return Err(format!(
                "value {v} ({bytes} bytes) is inline, but only scalar fills and packed results may be"
            ));
        };
        if !p.offset.is_multiple_of(ALIGN) {
            return Err(format!("value {v} at offset {} in {:?} is not aligned to {ALIGN} bytes", p.offset, p.region));
        }
        if p.bytes < bytes {
            return Err(format!("value {v} needs {bytes} bytes, its placement has {}", p.bytes));
        }
        if p.offset.checked_add(p.bytes).is_none_or(|end| end > size) {
            return Err(format!(
                "value {v} at {}+{} lies outside its region {:?} of {size} bytes",
                p.offset, p.bytes, p.region
            ));
        }
    }
    Ok(())
}

/// `t` as the bytes of `dtype` in `out` (native byte order; floats rounded
/// to nearest even for bf16 and f16). `out` must be exactly the size.
pub fn encode(t: &Tensor, dtype: DType, out: &mut [u8]) -> Result<(), String> {
    let size = dtype.size_bytes() as usize;
    if out.len() != t.numel() * size {
        return Err(format!("{} does not fill {} bytes of {dtype}", t.describe(), out.len()));
    }
    match (&t.data, dtype) {
        (Data::F32(v), DType::F32) => {
            out.chunks_exact_mut(4).zip(v).for_each(|(o, x)| o.copy_from_slice(&x.to_ne_bytes()))
        }
        (Data::F32(v), DType::BF16) => {
            out.chunks_exact_mut(2).zip(v).for_each(|(o, x)| o.copy_from_slice(&bf16::from_f32(*x).to_ne_bytes()))
        }
        (Data::F32(v), DType::F16) => {
            out.chunks_exact_mut(2).zip(v).for_each(|(o, x)| o.copy_from_slice(&f16::from_f32(*x).to_ne_bytes()))
        }
        (Data::I64(v), DType::I64) => {
            out.chunks_exact_mut(8).zip(v).for_each(|(o, x)| o.copy_from_slice(&x.to_ne_bytes()))
        }
        _ => return Err(format!("{} cannot be stored as {dtype}", t.describe())),
    }
    Ok(())
}

/// `t` as a fresh buffer of `dtype`'s bytes (see `encode`).
pub fn to_bytes(t: &Tensor, dtype: DType) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; t.numel() * dtype.size_bytes() as usize];
    encode(t, dtype, &mut out)?;
    Ok(out)
}

/// The f32 or i64 values of `dtype`'s bytes into `out` (`out.len()` elements).
pub fn decode_f32(b: &[u8], dtype: DType, out: &mut [f32]) -> Result<(), String> {
    let size = dtype.size_bytes() as usize;
    if b.len() != out.len() * size {
        return Err(format!("{} bytes are not {} elements of {dtype}", b.len(), out.len()));
    }
    let two = |c: &[u8]| [c[0], c[1]];
    match dtype {
        DType::F32 => out.iter_mut().zip(b.chunks_exact(4)).for_each(|(o, c)| {
            *o = f32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
        }),
        DType::BF16 => {
            out.iter_mut().zip(b.chunks_exact(2)).for_each(|(o, c)| *o = bf16::from_ne_bytes(two(c)).to_f32())
        }
        DType::F16 => out.iter_mut().zip(b.chunks_exact(2)).for_each(|(o, c)| *o = f16::from_ne_bytes(two(c)).to_f32()),
        DType::I64 => return Err("i64 bytes are not floats".into()),
    }
    Ok(())
}

/// A host tensor of `shape` from `dtype`'s bytes (floats as f32).
pub fn from_bytes(b: &[u8], shape: Vec<usize>, dtype: DType) -> Result<Tensor, String> {
    let n: usize = shape.iter().product();
    let data = match dtype {
        DType::I64 => {
            if b.len() != n * 8 {
                return Err(format!("{} bytes are not {n} elements of i64", b.len()));
            }
            Data::I64(b.chunks_exact(8).map(|c| i64::from_ne_bytes(c.try_into().expect("chunks of 8"))).collect())
        }
        _ => {
            let mut out = vec![0.0f32; n];
            decode_f32(b, dtype, &mut out)?;
            Data::F32(out)
        }
    };
    Ok(Tensor { shape, data })
}
