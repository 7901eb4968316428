//! Reductions on the GPU: `reduce` (sum, mean, max over any axes) and
//! `sum_of_squares` (the squared global norm of gradient clipping), with the
//! CPU backend's numerics (`cpu/reduce.rs`): float sums accumulate in f64,
//! max propagates NaN, i64 sums wrap.
//!
//! `reduce` merges kept and reduced dims where contiguous, then folds with
//! `kernels/reduce.cu`: a block per output when the innermost input dim is
//! reduced (rows; a mean over tokens, a loss mean to a scalar), a thread per
//! output when it is kept (columns; a bias gradient summing [tokens,
//! features] over tokens). When outputs are too few to fill the device, each
//! output's reduced range is cut into slices whose results go to the plan's
//! `partials` scratch and a second launch folds them in order. No atomics:
//! every result is summed in a fixed order, so runs are bitwise
//! deterministic. `sum_of_squares` is two passes the same way
//! (`kernels/reduce_squares.cu`, then the fold of its partials).

use super::super::device::{Arg, DevPtr, Launch};
use super::super::lower::{c_type, Lowering, Val};
use super::super::source::{param, KernelSource};
use super::elementwise::grid_for;
use super::layout::contiguous;
use tessera_plan::scratch::{scratch, REDUCE_BLOCKS};
use tessera_plan::{DType, Op, ReduceOp};

const TEMPLATE: &str = include_str!("../kernels/reduce.cu");
const SQUARES: &str = include_str!("../kernels/reduce_squares.cu");

/// Threads of a block (a power of two, at most TSR_MAX_THREADS).
const THREADS: u32 = 256;
/// Blocks of a grid-stride launch at most.
const MAX_BLOCKS: u64 = 4096;
/// Smallest slice of a row reduction worth a block of its own.
const BLOCK_SLICE: u64 = 2048;
/// Smallest slice of a column reduction worth a thread of its own.
const THREAD_SLICE: u64 = 64;
/// Tensors per launch of the sum of squares' first pass (their pointers
/// travel by value in the kernel's parameters).
const SQUARES_PER_LAUNCH: usize = 32;

/// The accumulator of a fold: its C type, start value and step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acc {
    /// f64 sum of float elements (sum, mean, sums of squares, losses).
    SumF64,
    /// f32 max propagating NaN.
    MaxF32,
    /// Wrapping i64 sum.
    SumI64,
    MaxI64,
}

impl Acc {
    fn c_type(self) -> &'static str {
        match self {
            Acc::SumF64 => "double",
            Acc::MaxF32 => "float",
            Acc::SumI64 | Acc::MaxI64 => "i64",
        }
    }

    fn init(self) -> &'static str {
        match self {
            Acc::SumF64 => "0.0",
            Acc::MaxF32 => "-TSR_INF",
            Acc::SumI64 => "0",
            Acc::MaxI64 => "(-9223372036854775807LL - 1)",
        }
    }

    fn fold(self) -> &'static str {
        match self {
            Acc::SumF64 => "a + v",
            // NaN wins, from either side (torch.amax), as the CPU's fold.
            Acc::MaxF32 => "(a != a) ? a : ((v != v || v > a) ? v : a)",
            Acc::SumI64 => "(i64)((u64)a + (u64)v)",
            Acc::MaxI64 => "v > a ? v : a",
        }
    }

    /// Reading element `at` of `x` (of dtype `d`) as an accumulator value.
    fn load(self, d: DType, at: &str) -> String {
        match (self, d) {
            (Acc::SumF64, DType::F32 | DType::BF16) => format!("(double)tsr_load(x, {at})"),
            (Acc::MaxF32, DType::F32 | DType::BF16) => format!("tsr_load(x, {at})"),
            _ => format!("x[{at}]"),
        }
    }
}

/// Dims as sizes and strides (elements), outermost first; never empty.
#[derive(Clone, Debug, PartialEq)]
pub struct Axes {
    pub size: Vec<u64>,
    pub stride: Vec<i64>,
}

impl Axes {
    fn numel(&self) -> u64 {
        self.size.iter().product()
    }

    /// Dims `dims` of a tensor with `shape` and `strides`, size-1 dims
    /// dropped and neighbours merged where one steps over the other.
    fn merged(shape: &[u64], strides: &[i64], dims: impl Iterator<Item = usize>) -> Axes {
        let mut a = Axes { size: Vec::new(), stride: Vec::new() };
        for d in dims {
            if shape[d] == 1 {
                continue;
            }
            match (a.size.last_mut(), a.stride.last_mut()) {
                (Some(n), Some(s)) if *s == strides[d] * shape[d] as i64 => {
                    *n *= shape[d];
                    *s = strides[d];
                }
                _ => {
                    a.size.push(shape[d]);
                    a.stride.push(strides[d]);
                }
            }
        }
        if a.size.is_empty() {
            a = Axes { size: vec![1], stride: vec![0] };
        }
        a
    }

    /// The kernel's `tsr_axes_<rank>` struct, padded with outer size-1 dims.
    fn bytes(&self, rank: usize) -> Vec<u8> {
        let pad = rank - self.size.len();
        let sizes = std::iter::repeat_n(1i64, pad).chain(self.size.iter().map(|&n| n as i64));
        let strides = std::iter::repeat_n(0i64, pad).chain(self.stride.iter().copied());
        sizes.chain(strides).flat_map(|v| v.to_ne_bytes()).collect()
    }
}

/// A power of two of threads for folding `len` elements per block.
pub fn threads_for(len: u64) -> u32 {
    (len.clamp(32, THREADS as u64) as u32).next_power_of_two()
}

/// One launch of `kernels/reduce.cu`: `n_out` outputs of `n_red` elements
/// each, every output cut into `slices` slices of `chunk` elements; the
/// item (o, s) is written by `store` (C text over o, s, slices and a).
struct Pass<'a> {
    acc: Acc,
    x: DevPtr,
    x_type: &'a str,
    load: String,
    out: DevPtr,
    out_type: &'a str,
    store: &'a str,
    kept: Axes,
    reduced: Axes,
    slices: u64,
    chunk: u64,
    per_block: bool,
    scale: f64,
}

impl Pass<'_> {
    fn launch(self, l: &mut Lowering, k: usize) -> Result<(), String> {
        let (n_out, n_red) = (self.kept.numel(), self.reduced.numel());
        let rank = self.kept.size.len().max(self.reduced.size.len());
        let axes = format!("tsr_axes_{rank}");
        let params = vec![
            param(&format!("{}*", self.out_type), "out"),
            param(&format!("const {}*", self.x_type), "x"),
            param("i64", "n_out"),
            param("i64", "n_red"),
            param("i64", "slices"),
            param("i64", "chunk"),
            param(&axes, "kept"),
            param(&axes, "reduced"),
            param("double", "scale"),
        ];
        let args = vec![
            Arg::Ptr(self.out),
            Arg::Ptr(self.x),
            Arg::I64(n_out as i64),
            Arg::I64(n_red as i64),
            Arg::I64(self.slices as i64),
            Arg::I64(self.chunk as i64),
            Arg::Bytes(self.kept.bytes(rank)),
            Arg::Bytes(self.reduced.bytes(rank)),
            Arg::F64(self.scale),
        ];
        let mut c = tera::Context::new();
        c.insert("rank", &rank);
        c.insert("per_block", &self.per_block);
        c.insert("acc", self.acc.c_type());
        c.insert("init", self.acc.init());
        c.insert("fold", self.acc.fold());
        c.insert("load", &self.load);
        c.insert("store", self.store);
        let src = KernelSource::render("reduce", TEMPLATE, c, params)?;
        let items = n_out * self.slices;
        let shape = if self.per_block {
            Launch::linear(items.clamp(1, MAX_BLOCKS) as u32, threads_for(self.chunk))
        } else {
            grid_for(items)
        };
        l.launch(k, src, shape, args);
        Ok(())
    }
}

/// The element read by the reduce kernel at output `o`, reduced index `r`.
const AT: &str = "base + tsr_axes_offset(r, reduced)";

/// Folds `slices` partial results per output (`partials[o * slices + s]`,
/// accumulators of `acc`) in order into `n_out` outputs at `out`, each
/// written by `store` (C text over o, a and `scale`).
#[allow(clippy::too_many_arguments)]
pub fn fold_partials(
    l: &mut Lowering,
    k: usize,
    acc: Acc,
    partials: DevPtr,
    n_out: u64,
    slices: u64,
    out: &Val,
    store: &str,
    scale: f64,
) -> Result<(), String> {
    let acc_type = acc.c_type();
    Pass {
        acc,
        x: partials,
        x_type: acc_type,
        load: format!("x[{AT}]"),
        out: out.ptr,
        out_type: c_type(out.dtype)?,
        store,
        kept: Axes { size: vec![n_out], stride: vec![slices as i64] },
        reduced: Axes { size: vec![slices], stride: vec![1] },
        slices: 1,
        chunk: slices,
        per_block: true,
        scale,
    }
    .launch(l, k)
}

/// Kernel `k`'s `partials` scratch (address, bytes), if its contract has one.
fn partials(l: &Lowering, k: usize) -> Result<Option<(DevPtr, u64)>, String> {
    match scratch(l.plan, k).piece("partials") {
        Some(_) => l.scratch(k, "partials").map(Some),
        None => Ok(None),
    }
}

/// How a reduction's finished accumulator `a` is written to out[o].
fn final_store(acc: Acc, op: ReduceOp) -> &'static str {
    match (acc, op) {
        (Acc::SumF64, ReduceOp::Mean) => "tsr_store(out, o, (float)(a * scale))",
        (Acc::SumF64, _) => "tsr_store(out, o, (float)a)",
        (Acc::MaxF32, _) => "tsr_store(out, o, a)",
        _ => "out[o] = a",
    }
}

/// `Reduce { op, axes, keepdim }`.
fn reduce(l: &mut Lowering, k: usize, op: ReduceOp, axes: &[usize], keepdim: bool) -> Result<(), String> {
    let x = l.input(k, 0)?;
    let out = l.output(k)?;
    let rank = x.shape.len();
    for (i, &a) in axes.iter().enumerate() {
        if a >= rank || axes[..i].contains(&a) {
            return Err(format!("axes {axes:?} are not distinct axes of input {:?}", x.shape));
        }
    }
    let expected: Vec<u64> = (0..rank)
        .filter_map(|d| match axes.contains(&d) {
            false => Some(x.shape[d]),
            true if keepdim => Some(1),
            true => None,
        })
        .collect();
    // reduce_f32 (`Op::ReduceF32`): any float in, f32 out; the kernel
    // accumulates in f64 (f32 for max) whatever it reads.
    let wide = matches!(l.plan.kernels[k].op, Op::ReduceF32 { .. });
    let dtype_fits = if wide { x.dtype.is_float() && out.dtype == DType::F32 } else { out.dtype == x.dtype };
    if out.shape != expected || !dtype_fits {
        return Err(format!(
            "result {:?} {} does not fit input {:?} {} reduced over {axes:?}",
            out.shape, out.dtype, x.shape, x.dtype
        ));
    }
    let acc = match (x.dtype, op) {
        (DType::F32 | DType::BF16, ReduceOp::Sum | ReduceOp::Mean) => Acc::SumF64,
        (DType::F32 | DType::BF16, ReduceOp::Max) => Acc::MaxF32,
        (DType::I64, ReduceOp::Sum) => Acc::SumI64,
        (DType::I64, ReduceOp::Max) => Acc::MaxI64,
        (DType::I64, ReduceOp::Mean) => return Err("mean of an i64 tensor (cast it to a float first)".into()),
        (d, _) => return Err(format!("{d} inputs are not supported by the CUDA backend")),
    };
    let store = final_store(acc, op);
    let count: u64 = axes.iter().map(|&a| x.shape[a]).product();
    let scale = 1.0 / count as f64;
    let strides = contiguous(&x.shape);
    let kept = Axes::merged(&x.shape, &strides, (0..rank).filter(|d| !axes.contains(d)));
    let reduced = Axes::merged(&x.shape, &strides, (0..rank).filter(|d| axes.contains(d)));
    let (n_out, n_red) = (kept.numel(), reduced.numel());
    if out.numel() == 0 {
        return Ok(());
    }
    // Rows (the innermost input dim reduced, read contiguously by a
    // block's threads) or columns (kept, read contiguously by neighbouring
    // threads).
    let per_block = reduced.stride.last() == Some(&1);
    let wanted = if per_block {
        REDUCE_BLOCKS.div_ceil(n_out).min(n_red.div_ceil(BLOCK_SLICE))
    } else {
        (THREADS as u64 * REDUCE_BLOCKS).div_ceil(n_out).min(n_red.div_ceil(THREAD_SLICE))
    };
    let space = partials(l, k)?;
    let slices = wanted.min(space.map_or(0, |(_, bytes)| bytes / (8 * n_out)));
    let one_pass = Pass {
        acc,
        x: x.ptr,
        x_type: c_type(x.dtype)?,
        load: acc.load(x.dtype, AT),
        out: out.ptr,
        out_type: c_type(out.dtype)?,
        store,
        kept,
        reduced,
        slices: 1,
        chunk: n_red,
        per_block,
        scale,
    };
    match space {
        Some((at, _)) if slices > 1 => {
            let chunk = n_red.div_ceil(slices);
            let slices = n_red.div_ceil(chunk);
            let partial = "out[o * slices + s] = a";
            Pass { out: at, out_type: acc.c_type(), store: partial, slices, chunk, ..one_pass }.launch(l, k)?;
            fold_partials(l, k, acc, at, n_out, slices, &out, store, scale)
        }
        _ => one_pass.launch(l, k),
    }
}

/// `SumOfSquares (x_1, ..., x_n) -> []`: the first pass cuts each launch's
/// tensors (up to SQUARES_PER_LAUNCH, seen as one concatenation) into
/// blocks, shared out over the launches by size, each writing its f64 sum
/// to `partials`; the second folds the partials in order.
fn sum_of_squares(l: &mut Lowering, k: usize) -> Result<(), String> {
    let x = l.inputs(k)?;
    let out = l.output(k)?;
    if x.is_empty() {
        return Err("sum_of_squares expects at least 1 operand, got 0".into());
    }
    if !out.shape.is_empty() || !matches!(out.dtype, DType::F32 | DType::BF16) {
        return Err(format!("the result must be a float scalar [], got {:?} {}", out.shape, out.dtype));
    }
    if let Some((i, v)) = x.iter().enumerate().find(|(_, v)| !matches!(v.dtype, DType::F32 | DType::BF16)) {
        return Err(format!("operand {i} must be a float tensor, got {}", v.dtype));
    }
    // Launches: runs of at most SQUARES_PER_LAUNCH tensors of one dtype.
    let mut launches: Vec<&[Val]> = Vec::new();
    let mut start = 0;
    for i in 1..=x.len() {
        if i == x.len() || i - start == SQUARES_PER_LAUNCH || x[i].dtype != x[start].dtype {
            launches.push(&x[start..i]);
            start = i;
        }
    }
    let n = launches.len() as u64;
    let (at, bytes) = l.scratch(k, "partials")?;
    let capacity = (bytes / 8).min(REDUCE_BLOCKS);
    if n > capacity {
        return Err(format!(
            "{} operands need {n} launches, more than the {capacity} partial sums of the plan's scratch",
            x.len()
        ));
    }
    let total: u64 = x.iter().map(Val::numel).sum();
    let spare = capacity - n;
    let mut first = 0u64;
    for group in launches {
        let elements: u64 = group.iter().map(Val::numel).sum();
        // One block, and a share of the rest by size (never past capacity).
        let blocks = 1 + if total > 0 { (spare as u128 * elements as u128 / total as u128) as u64 } else { 0 };
        let mut ptrs: Vec<u8> = Vec::new();
        let mut starts: Vec<u8> = Vec::new();
        let mut at_elem = 0i64;
        for v in group {
            ptrs.extend(v.ptr.0.to_ne_bytes());
            starts.extend(at_elem.to_ne_bytes());
            at_elem += v.numel() as i64;
        }
        starts.extend(at_elem.to_ne_bytes());
        let count = group.len();
        let mut c = tera::Context::new();
        c.insert("count", &count);
        c.insert("bounds", &(count + 1));
        c.insert("t", c_type(group[0].dtype)?);
        let params = vec![
            param(&format!("tsr_tensors_{count}"), "tensors"),
            param("double*", "partials"),
            param("i64", "first"),
        ];
        let src = KernelSource::render("sum_of_squares", SQUARES, c, params)?;
        ptrs.extend(starts);
        let args = vec![Arg::Bytes(ptrs), Arg::Ptr(at), Arg::I64(first as i64)];
        l.launch(k, src, Launch::linear(blocks as u32, THREADS), args);
        first += blocks;
    }
    fold_partials(l, k, Acc::SumF64, at, 1, first, &out, "tsr_store(out, o, (float)a)", 1.0)
}

pub fn lower(l: &mut Lowering, k: usize, op: &Op) -> Result<(), String> {
    match op {
        Op::Reduce { op, axes, keepdim } | Op::ReduceF32 { op, axes, keepdim } => reduce(l, k, *op, axes, *keepdim),
        Op::SumOfSquares => sum_of_squares(l, k),
        other => Err(format!("{} is not a reduction", other.name())),
    }
}
