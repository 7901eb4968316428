//! What a step costs on paper: per kernel, the bytes it moves and the
//! matrix FLOPs it does, summed per kernel class, and a roofline estimate
//! of its time on a named GPU. A planning aid, not a measurement.
//!
//! The model:
//! - bytes moved: every distinct operand read once and the result written
//!   once, at its plan dtype's size (a slice reads only what it keeps); a
//!   multi-tensor kernel writes its parts (its packed value is never
//!   stored), a kernel with further results writes them too. A GPU kernel
//!   made of a library GEMM and a pass over its result (matmul_gelu_grad's
//!   GELU gradient, conv2d's bias) moves that result twice more. A result
//!   that shares its operand's storage without a change (a reshape or
//!   stop_gradient view, a slice of contiguous rows, a concat of rows
//!   already in place: `memory::is_view`) moves nothing; scalars folded into kernels (region `Inline`) move
//!   nothing.
//!   Scratch pieces (`scratch`) are written once and read once, except
//!   cuBLASLt's workspace, whose use is the library's.
//! - FLOPs: matrix products, convolutions and attention only, forward and
//!   backward forms alike, a multiply-add 2 FLOPs (fvcore's convention, the
//!   one `tessera_compiler::ir::flops` uses); elementwise arithmetic is not
//!   counted (it is never what bounds those kernels).
//! - time: per kernel the larger of its FLOPs over the peak for its dtype
//!   (bf16 on tensor cores; f32 without TF32, as the CUDA backend's GEMMs)
//!   and its bytes over the memory bandwidth, summed over kernels: no
//!   overlap between kernels, no launch latency, no cache reuse. The bytes
//!   of the passes a kernel runs beside a library GEMM (scratch, a second
//!   pass over the result) are launches of their own: their time is added,
//!   not hidden under the product's.

use crate::memory::Region;
use crate::op::Op;
use crate::plan::{Plan, Source};
use crate::scratch::scratch;
use crate::types::DType;
use serde::Serialize;
use std::collections::BTreeMap;

/// What a kernel is, for the report's breakdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelClass {
    MatrixProduct,
    Attention,
    Cast,
    Elementwise,
    Normalization,
    Reduction,
    SoftmaxAndLoss,
    Layout,
    Optimizer,
    Collective,
    State,
}

impl KernelClass {
    pub fn of(op: &Op) -> KernelClass {
        use KernelClass::*;
        match op {
            Op::Linear
            | Op::Matmul { .. }
            | Op::Conv2d { .. }
            | Op::Conv2dGradInput { .. }
            | Op::Conv2dGradWeight { .. }
            | Op::GeluLinear
            | Op::MatmulGeluRhs { .. }
            | Op::LayerNormLinear { .. }
            | Op::LinearResidual { .. }
            | Op::MatmulLayerNormRhs { .. }
            | Op::MatmulGeluGrad { .. } => MatrixProduct,
            Op::Attention { .. }
            | Op::AttentionGrad { .. }
            | Op::AttentionPacked { .. }
            | Op::AttentionPackedGrad { .. } => Attention,
            Op::Cast { .. } => Cast,
            // Exhaustive rather than `is_elementwise`, so a new op must be classed here.
            Op::Unary(_)
            | Op::Binary(_)
            | Op::Scale { .. }
            | Op::AddScalar { .. }
            | Op::PowScalar { .. }
            | Op::GeluGrad
            | Op::Dropout { .. }
            | Op::DropPath { .. }
            | Op::DivCount { .. }
            | Op::Fused { .. } => Elementwise,
            Op::LayerNorm { .. }
            | Op::Normalize { .. }
            | Op::NormalizeGrad { .. }
            | Op::LayerNormWeightGrad { .. }
            | Op::LayerNormGrad { .. }
            | Op::BatchNorm { .. }
            | Op::BatchStandardize { .. }
            | Op::BatchStandardizeGrad { .. }
            | Op::RunningStat { .. } => Normalization,
            Op::Reduce { .. } | Op::ReduceF32 { .. } | Op::SumOfSquares => Reduction,
            Op::Softmax { .. }
            | Op::LogSoftmax { .. }
            | Op::L2Normalize { .. }
            | Op::CrossEntropy { .. }
            | Op::CrossEntropyGrad { .. }
            | Op::ZeroDiagonal { .. } => SoftmaxAndLoss,
            Op::MultiTensor { .. } => Optimizer,
            Op::AllGather { .. } | Op::AllReduce { .. } | Op::AllGatherGrad { .. } => Collective,
            Op::QueuePush { .. } | Op::QueueAdvance { .. } => State,
            Op::Reshape { .. }
            | Op::StopGradient
            | Op::Permute { .. }
            | Op::Concat { .. }
            | Op::Slice { .. }
            | Op::Expand { .. }
            | Op::Pad { .. }
            | Op::Input { .. }
            | Op::Param { .. }
            | Op::Buffer { .. }
            | Op::Fill { .. }
            | Op::Part { .. }
            | Op::ResultPart { .. } => Layout,
        }
    }

    pub fn name(self) -> &'static str {
        use KernelClass::*;
        match self {
            MatrixProduct => "matrix products",
            Attention => "attention",
            Cast => "casts",
            Elementwise => "elementwise",
            Normalization => "normalization",
            Reduction => "reductions",
            SoftmaxAndLoss => "softmax and losses",
            Layout => "layout copies",
            Optimizer => "optimizer",
            Collective => "collectives",
            State => "queue state",
        }
    }
}

/// One kernel's cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct KernelCost {
    /// Bytes read and written, by dtype name (`f32`, `bf16`, ...);
    /// scratch under `scratch`.
    pub bytes: BTreeMap<String, u64>,
    pub flops: u64,
    /// The dtype its FLOPs run in (bf16 when a product reads bf16).
    pub flops_bf16: bool,
    /// Of `bytes`, those moved by passes beside a library GEMM, which do
    /// not overlap its arithmetic: a prologue's operand written to scratch
    /// and read back, an epilogue's second pass over the result.
    pub serial_bytes: u64,
}

impl KernelCost {
    pub fn total_bytes(&self) -> u64 {
        self.bytes.values().sum()
    }
}

/// Peak rates of a GPU, from NVIDIA's datasheets (SXM parts, dense).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Device {
    pub name: &'static str,
    /// FLOP/s: bf16 on tensor cores, f32 on CUDA cores (no TF32).
    pub bf16_flops: f64,
    pub f32_flops: f64,
    /// Bytes per second of device memory.
    pub bandwidth: f64,
}

/// H100 SXM5 80 GB: 989.4 TFLOP/s bf16 dense, 66.9 TFLOP/s f32, 3.35 TB/s HBM3.
pub const H100: Device = Device { name: "h100", bf16_flops: 989.4e12, f32_flops: 66.9e12, bandwidth: 3.35e12 };
/// H200 SXM 141 GB: the H100's compute, 4.8 TB/s HBM3e.
pub const H200: Device = Device { name: "h200", bf16_flops: 989.4e12, f32_flops: 66.9e12, bandwidth: 4.8e12 };

impl Device {
    pub fn named(name: &str) -> Option<Device> {
        match name.to_ascii_lowercase().as_str() {
            "h100" => Some(H100),
            "h200" => Some(H200),
            _ => None,
        }
    }

    /// Seconds the roofline gives a kernel: the larger of its FLOPs over
    /// the peak and its other bytes over the bandwidth, then its serial
    /// passes' bytes over the bandwidth.
    pub fn seconds(&self, k: &KernelCost) -> f64 {
        let peak = if k.flops_bf16 { self.bf16_flops } else { self.f32_flops };
        let overlapped = k.total_bytes().saturating_sub(k.serial_bytes);
        (k.flops as f64 / peak).max(overlapped as f64 / self.bandwidth) + k.serial_bytes as f64 / self.bandwidth
    }
}

/// Matrix FLOPs of kernel `k` (see the module's convention).
fn flops(plan: &Plan, k: usize) -> u64 {
    let kernel = &plan.kernels[k];
    let shape = |i: usize| -> &[u64] { &plan.values[kernel.inputs[i]].shape };
    let out = &plan.values[kernel.output].shape;
    let numel = |s: &[u64]| s.iter().product::<u64>();
    let inner = |a: &[u64], transpose: bool| {
        let r = a.len();
        if transpose {
            a[r.saturating_sub(2)]
        } else {
            a[r - 1]
        }
    };
    match &kernel.op {
        Op::Linear | Op::GeluLinear => 2 * numel(out) * shape(1).get(1).copied().unwrap_or(0),
        Op::LayerNormLinear { .. } => 2 * numel(out) * shape(3).get(1).copied().unwrap_or(0),
        Op::LinearResidual { .. } => 2 * numel(out) * shape(1).get(1).copied().unwrap_or(0),
        Op::Matmul { transpose_a, .. }
        | Op::MatmulGeluRhs { transpose_a, .. }
        | Op::MatmulGeluGrad { transpose_a, .. }
        | Op::MatmulLayerNormRhs { transpose_a, .. } => 2 * numel(out) * inner(shape(0), *transpose_a),
        Op::Conv2d { .. } => 2 * numel(out) * numel(&shape(1)[1..]),
        // dy [N, O, H', W'] against w [O, C, kh, kw]: every output position
        // of dy meets every weight of its channel.
        Op::Conv2dGradInput { .. } => 2 * numel(shape(0)) * numel(&shape(1)[1..]),
        Op::Conv2dGradWeight { .. } => 2 * numel(shape(0)) * numel(&out[1..]),
        Op::Attention { .. } => {
            let (q, kk, r) = (shape(0), shape(1), shape(0).len());
            let heads: u64 = q[..r - 2].iter().product();
            2 * heads * q[r - 2] * kk[r - 2] * (q[r - 1] + out[r - 1])
        }
        // Scores again, then dv, dP, dq and dk: five products of the scores' size.
        Op::AttentionGrad { .. } => {
            let (q, kk, r) = (shape(0), shape(1), shape(0).len());
            let heads: u64 = q[..r - 2].iter().product();
            5 * 2 * heads * q[r - 2] * kk[r - 2] * q[r - 1]
        }
        // qkv [B, N, 3*H*d]: per (batch, head) N x N scores of width d, as above.
        Op::AttentionPacked { .. } => {
            let qkv = shape(0);
            2 * 2 * qkv[0] * qkv[1] * qkv[1] * (qkv[2] / 3)
        }
        Op::AttentionPackedGrad { .. } => {
            let qkv = shape(0);
            5 * 2 * qkv[0] * qkv[1] * qkv[1] * (qkv[2] / 3)
        }
        _ => 0,
    }
}

/// The cost of kernel `k` (the plan must carry its memory plan for views
/// and inline constants to be told apart; without one every operand moves).
pub fn kernel_cost(plan: &Plan, k: usize) -> KernelCost {
    let parts: Vec<usize> = (0..plan.values.len())
        .filter(|&v| matches!(plan.values[v].source, Source::Part { kernel, .. } if kernel == k))
        .collect();
    cost_with_parts(plan, k, &parts)
}

/// The values each kernel writes besides its result (its parts), found in
/// one pass over the values.
fn parts_by_kernel(plan: &Plan) -> Vec<Vec<usize>> {
    let mut parts = vec![Vec::new(); plan.kernels.len()];
    for (v, value) in plan.values.iter().enumerate() {
        if let Source::Part { kernel, .. } = value.source {
            if let Some(p) = parts.get_mut(kernel) {
                p.push(v);
            }
        }
    }
    parts
}

/// `kernel_cost`, given the kernel's parts.
fn cost_with_parts(plan: &Plan, k: usize, parts: &[usize]) -> KernelCost {
    let kernel = &plan.kernels[k];
    let placements = plan.memory.as_ref().map(|m| &m.placements);
    let inline = |v: usize| placements.is_some_and(|p| p[v].region == Region::Inline);
    let mut cost = KernelCost { flops: flops(plan, k), ..Default::default() };
    let mut serial = 0u64;
    let mut add = |dtype: DType, bytes: u64| {
        if bytes > 0 {
            *cost.bytes.entry(dtype.to_string()).or_default() += bytes;
        }
    };
    let bytes_of = |v: usize| plan.values[v].numel() * plan.values[v].dtype.size_bytes();
    // A view: its result is (a range of) its operand's storage.
    if placements.is_some_and(|p| crate::memory::is_view(plan, p, k)) {
        return cost;
    }
    // A set: a multi-tensor kernel reads every parameter.
    let mut seen = std::collections::HashSet::new();
    for &v in &kernel.inputs {
        if inline(v) || !seen.insert(v) {
            continue;
        }
        // A slice reads only the elements it keeps.
        let read = match kernel.op {
            Op::Slice { .. } => plan.values[kernel.output].numel() * plan.values[v].dtype.size_bytes(),
            _ => bytes_of(v),
        };
        add(plan.values[v].dtype, read);
    }
    // A multi-tensor kernel's packed result is never stored; a kernel with
    // further results writes its result and its parts.
    if !matches!(kernel.op, Op::MultiTensor { .. }) {
        add(plan.values[kernel.output].dtype, bytes_of(kernel.output));
        // Passes over the result besides the product's write: the GELU
        // gradient's epilogue reads the product back and writes it again
        // (cuBLASLt's GELU epilogues are the tanh approximation, not the
        // models' erf GELU); a convolution's bias is written first and read
        // back as the GEMM's C.
        let again = match kernel.op {
            Op::MatmulGeluGrad { .. } => 2,
            Op::Conv2d { .. } if kernel.inputs.len() == 3 => 2,
            _ => 0,
        };
        add(plan.values[kernel.output].dtype, again * bytes_of(kernel.output));
        serial += again * bytes_of(kernel.output);
    }
    for &v in parts {
        add(plan.values[v].dtype, bytes_of(v));
    }
    let scratch_bytes: u64 = scratch(plan, k).pieces.iter().filter(|(n, _)| *n != "gemm").map(|(_, b)| 2 * b).sum();
    if scratch_bytes > 0 {
        *cost.bytes.entry("scratch".into()).or_default() += scratch_bytes;
    }
    cost.serial_bytes = serial + scratch_bytes;
    cost.flops_bf16 = cost.flops > 0 && kernel.inputs.iter().any(|&v| plan.values[v].dtype == DType::BF16);
    cost
}

/// A class's or the step's totals.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Totals {
    pub kernels: usize,
    pub bytes: BTreeMap<String, u64>,
    pub bytes_moved: u64,
    /// Of `bytes_moved`, those moved by passes beside library GEMMs
    /// (`KernelCost::serial_bytes`): what GEMMs with fused prologues and
    /// epilogues would not move.
    pub beside_library: u64,
    pub flops: u64,
}

impl Totals {
    fn add(&mut self, c: &KernelCost) {
        self.kernels += 1;
        for (d, b) in &c.bytes {
            *self.bytes.entry(d.clone()).or_default() += b;
        }
        self.bytes_moved += c.total_bytes();
        self.beside_library += c.serial_bytes;
        self.flops += c.flops;
    }
}

/// The step's cost: every kernel's, the totals, and the totals per class.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StepCost {
    pub kernels: Vec<(KernelClass, KernelCost)>,
    /// The plan kernel each entry of `kernels` costs (parts have none).
    pub kernel_index: Vec<usize>,
    pub total: Totals,
    pub by_class: BTreeMap<KernelClass, Totals>,
}

impl StepCost {
    pub fn of(plan: &Plan) -> StepCost {
        let mut s = StepCost::default();
        let parts = parts_by_kernel(plan);
        for (k, (kernel, own)) in plan.kernels.iter().zip(&parts).enumerate() {
            let class = KernelClass::of(&kernel.op);
            // Parts are read out of their multi-tensor kernel's result: no kernel.
            if matches!(kernel.op, Op::Part { .. }) {
                continue;
            }
            let c = cost_with_parts(plan, k, own);
            s.total.add(&c);
            s.by_class.entry(class).or_default().add(&c);
            s.kernels.push((class, c));
            s.kernel_index.push(k);
        }
        s
    }

    /// The roofline's seconds per step on `d`, overall and per class.
    pub fn seconds(&self, d: &Device) -> (f64, BTreeMap<KernelClass, f64>) {
        let mut per: BTreeMap<KernelClass, f64> = BTreeMap::new();
        for (class, c) in &self.kernels {
            *per.entry(*class).or_default() += d.seconds(c);
        }
        (per.values().sum(), per)
    }
}
