//! Scratch: what a kernel needs besides its operands and its result, as
//! named pieces. The compiler's memory planner sizes the workspace region
//! as the largest kernel's scratch (kernels run one after another, so they
//! share it); a backend that executes the memory plan carves each kernel's
//! pieces out of that region by these offsets. This is the contract that
//! makes the planned peak the real one: a backend may not allocate beside it.
//!
//! Pieces per op (the GPU backend's kernels; the CPU backend, which keeps its
//! own pool, needs no more than this):
//! - every matrix product: `gemm` (cuBLASLt's workspace; 32 MiB for large
//!   products (2^30 multiply-adds) as NVIDIA recommends on Hopper, 4 MiB
//!   from 2^20, none below);
//! - prologue forms: the transformed operand, written once, then read by the
//!   GEMM: `gelu` (gelu_linear, matmul_gelu_rhs), `normalized`
//!   (layer_norm_linear, matmul_layer_norm_rhs), in the GEMM's input dtype;
//! - convolutions as GEMMs: `cols` (im2col / its gradient, f32 for the
//!   input gradient) and `dy` (conv2d_grad_weight's output gradient laid out
//!   [O, N*H'*W']);
//! - attention_grad: `lse` and `delta` (one f32 per query row: the forward's
//!   log-sum-exp recomputed, and rowsum(dO * O), FlashAttention-2's D);
//!   attention_packed_grad with its row sum also `partials` (an f64 per
//!   column of qkv and chunk of samples, `attention_sum_chunks`);
//! - reductions to few values, so that results are summed in a fixed order
//!   by a second pass (no atomics): `partials`, 8 bytes (an f64 sum, an f32
//!   max or an i64) per item of the first pass. sum / mean / max: when the
//!   outputs are too few to fill the device, each output's reduced range is
//!   cut into slices, one item each: up to REDUCE_BLOCKS items in all when
//!   the innermost input dim is reduced (a block per item, slices of at
//!   least 2048 elements), up to 256 * REDUCE_BLOCKS when it is kept (a
//!   thread per item, slices of at least 64 elements, e.g. a bias gradient);
//!   none when one slice per output suffices. sum_of_squares:
//!   REDUCE_BLOCKS blocks; matmul_gelu_grad with its row sum: one per
//!   column and block of rows; layer_norm_grad: three per column and block of
//!   rows (its weight, bias and copy sums; blocks as layer_norm_weight_grad's);
//!   cross_entropy: one per block of rows,
//!   min(N, REDUCE_BLOCKS);
//! - batch statistics (batch_norm, batch_standardize and its gradient,
//!   running_stat): none (one block per channel computes the channel's
//!   statistics and uses them in the same launch); with synchronised batch
//!   norm the group's sums, collected between passes: `group_sums` and
//!   `group_squares` (an f64 per channel and group), `group_grad_sums` (two).

use crate::memory::align;
use crate::op::Op;
use crate::plan::Plan;
use crate::types::DType;

/// Blocks of the first pass of a reduction to few values.
pub const REDUCE_BLOCKS: u64 = 1024;

/// `layer_norm_weight_grad` on the GPU: at most this many blocks of rows
/// (each one f64 partial sum per column), and columns per launch (the
/// partials of one launch sit in a block's shared memory; wider rows take
/// several launches).
pub const NORM_WEIGHT_GRAD_BLOCKS: u64 = 512;
pub const NORM_WEIGHT_GRAD_COLS: u64 = 4096;

/// The blocks of rows `layer_norm_weight_grad` cuts `rows` into: at least
/// 64 rows each (fewer partials to write and add up), at most
/// NORM_WEIGHT_GRAD_BLOCKS.
pub fn norm_weight_grad_blocks(rows: u64) -> u64 {
    rows.div_ceil(64).clamp(1, NORM_WEIGHT_GRAD_BLOCKS)
}

/// attention_packed_grad with its row sum: at most about this many blocks
/// per launch, rather than a block per row up to 8192.
pub const ATTENTION_SUM_BLOCKS: u64 = 2048;

/// The chunks of samples attention_packed_grad's launches cut `samples`
/// into when it sums its rows: a block per chunk and head (each takes the
/// head's rows of the chunk's samples, so it stores that head's columns
/// only), and one f64 partial per qkv column and chunk. At most
/// ATTENTION_SUM_BLOCKS / heads (at least 1) chunks.
pub fn attention_sum_chunks(samples: u64, heads: u64) -> u64 {
    samples.clamp(1, (ATTENTION_SUM_BLOCKS / heads.max(1)).max(1))
}

/// cuBLASLt's workspace for a product of `m x n x k`.
pub fn gemm_workspace(m: u64, n: u64, k: u64) -> u64 {
    match m.saturating_mul(n).saturating_mul(k) {
        p if p >= 1 << 30 => 32 << 20,
        p if p >= 1 << 20 => 4 << 20,
        _ => 0,
    }
}

/// One kernel's scratch: named pieces, each at an aligned offset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scratch {
    pub pieces: Vec<(&'static str, u64)>,
}

impl Scratch {
    fn with(mut self, name: &'static str, bytes: u64) -> Self {
        if bytes > 0 {
            self.pieces.push((name, bytes));
        }
        self
    }

    /// Bytes of the whole scratch (pieces aligned).
    pub fn total(&self) -> u64 {
        self.pieces.iter().map(|(_, b)| align(*b)).sum()
    }

    /// Offset and size of piece `name`.
    pub fn piece(&self, name: &str) -> Option<(u64, u64)> {
        let mut at = 0;
        for (n, b) in &self.pieces {
            if *n == name {
                return Some((at, *b));
            }
            at += align(*b);
        }
        None
    }
}

/// The group sums of a synchronised batch norm's statistics (when the
/// plan has them): one f64 per channel and group slot for the sums and for
/// the squared deviations, two more for the gradient's sums of g and g * xhat.
fn group_pieces(plan: &Plan, x: &[u64], grad: bool, s: Scratch) -> Scratch {
    let group = plan.sync_batch_norm;
    if !plan.training || group <= 1 {
        return s;
    }
    let world = plan.world();
    if world <= 1 {
        return s;
    }
    let per_slot = (world / group) * x.get(1).copied().unwrap_or(1) * 8;
    let s = s.with("group_sums", per_slot).with("group_squares", per_slot);
    if grad {
        s.with("group_grad_sums", 2 * per_slot)
    } else {
        s
    }
}

/// The scratch of kernel `k` of `plan`.
pub fn scratch(plan: &Plan, k: usize) -> Scratch {
    let kernel = &plan.kernels[k];
    let value = |i: usize| &plan.values[kernel.inputs[i]];
    let shape = |i: usize| &value(i).shape;
    let numel = |i: usize| value(i).numel();
    let size = |d: DType| d.size_bytes();
    let out = &plan.values[kernel.output];
    let rows_of = |s: &[u64]| s[..s.len().saturating_sub(1)].iter().product::<u64>();
    let last = |s: &[u64]| s.last().copied().unwrap_or(1);
    // m x n x k of a product with result `out` and inner dimension `inner`.
    let gemm = |inner: u64| gemm_workspace(rows_of(&out.shape), last(&out.shape), inner);
    let s = Scratch::default();
    match &kernel.op {
        Op::Linear => s.with("gemm", gemm(last(shape(0)))),
        Op::Matmul { transpose_a, .. } => {
            let a = shape(0);
            let inner = if *transpose_a { a[a.len() - 2] } else { last(a) };
            s.with("gemm", gemm(inner))
        }
        Op::GeluLinear => s.with("gemm", gemm(last(shape(0)))).with("gelu", numel(0) * size(value(1).dtype)),
        Op::LinearResidual { gelu: false } => s.with("gemm", gemm(last(shape(0)))),
        Op::LinearResidual { gelu: true } => {
            s.with("gemm", gemm(last(shape(0)))).with("gelu", numel(0) * size(value(1).dtype))
        }
        Op::LayerNormLinear { .. } => {
            s.with("gemm", gemm(last(shape(0)))).with("normalized", numel(0) * size(value(3).dtype))
        }
        Op::MatmulGeluRhs { .. } => {
            s.with("gemm", gemm(rows_of(shape(1)))).with("gelu", numel(1) * size(value(0).dtype))
        }
        Op::MatmulLayerNormRhs { .. } => {
            s.with("gemm", gemm(rows_of(shape(1)))).with("normalized", numel(1) * size(value(0).dtype))
        }
        Op::MatmulGeluGrad { transpose_a, row_sum, .. } => {
            let a = shape(0);
            let inner = if *transpose_a { a[a.len() - 2] } else { last(a) };
            let s = s.with("gemm", gemm(inner));
            if *row_sum {
                // One f64 partial per column and block of rows (as layer_norm_weight_grad's).
                let d = last(&out.shape);
                s.with("partials", norm_weight_grad_blocks(out.numel() / d.max(1)) * d * 8)
            } else {
                s
            }
        }
        Op::Conv2d { .. } => {
            // cols [N*H'*W', C*kh*kw] in the weight's dtype.
            let w = shape(1);
            let (n, hw) = (out.shape[0], out.shape[2] * out.shape[3]);
            let ckk: u64 = w[1..].iter().product();
            s.with("gemm", gemm_workspace(n * hw, w[0], ckk)).with("cols", n * hw * ckk * size(value(1).dtype))
        }
        Op::Conv2dGradWeight { .. } => {
            // dy [N, O, H', W'] as [O, N*H'*W'], x as cols [N*H'*W', C*kh*kw].
            let dy = shape(0);
            let (n, o, hw) = (dy[0], dy[1], dy[2] * dy[3]);
            let ckk = out.numel() / o.max(1);
            s.with("gemm", gemm_workspace(o, ckk, n * hw))
                .with("dy", numel(0) * size(value(0).dtype))
                .with("cols", n * hw * ckk * size(value(1).dtype))
        }
        Op::Conv2dGradInput { .. } => {
            // cols = dy^T w: [N*H'*W', C*kh*kw] in f32, then col2im.
            let (dy, w) = (shape(0), shape(1));
            let (n, o, hw) = (dy[0], dy[1], dy[2] * dy[3]);
            let ckk: u64 = w[1..].iter().product();
            s.with("gemm", gemm_workspace(n * hw, ckk, o)).with("cols", n * hw * ckk * 4)
        }
        Op::AttentionGrad { .. } => {
            let rows = rows_of(shape(0));
            s.with("lse", rows * 4).with("delta", rows * 4)
        }
        // A row per (token, head): numel(dy) / d = B * N * H.
        // With its row sum: one f64 partial per qkv column and chunk of samples.
        Op::AttentionPackedGrad { heads, row_sum, .. } => {
            let d = last(shape(1)) / (*heads).max(1);
            let rows = numel(1) / d.max(1);
            let s = s.with("lse", rows * 4).with("delta", rows * 4);
            if *row_sum {
                let tokens = shape(1).get(shape(1).len().wrapping_sub(2)).copied().unwrap_or(1);
                let samples = rows / (tokens * heads).max(1);
                s.with("partials", attention_sum_chunks(samples, *heads) * last(&out.shape) * 8)
            } else {
                s
            }
        }
        // Every rank's keys (f32), gathered before they are written.
        Op::QueuePush { world } if *world > 1 => s.with("gathered", numel(2) * world * 4),
        Op::Reduce { axes, .. } | Op::ReduceF32 { axes, .. } => {
            // Slices per output, as runtime::cuda::ops::reduce cuts them
            // (it uses fewer when given less).
            let x = shape(0);
            let n_out = out.numel();
            let n_red: u64 = axes.iter().map(|&a| x.get(a).copied().unwrap_or(1)).product();
            let inner_reduced = x.iter().rposition(|&d| d > 1).is_some_and(|d| axes.contains(&d));
            let slices = match n_out {
                0 => 0,
                _ if inner_reduced => REDUCE_BLOCKS.div_ceil(n_out).min(n_red.div_ceil(2048)),
                _ => (256 * REDUCE_BLOCKS).div_ceil(n_out).min(n_red.div_ceil(64)),
            };
            s.with("partials", if slices > 1 { n_out * slices * 8 } else { 0 })
        }
        Op::SumOfSquares => s.with("partials", REDUCE_BLOCKS * 8),
        Op::LayerNormWeightGrad { .. } => {
            let d = last(shape(1));
            let rows = numel(1) / d.max(1);
            s.with("partials", norm_weight_grad_blocks(rows) * d.min(NORM_WEIGHT_GRAD_COLS) * 8)
        }
        // Three f64 accumulators (weight, bias, the copy's sum) per column
        // and block of rows.
        Op::LayerNormGrad { .. } => {
            let d = last(shape(1));
            let rows = numel(1) / d.max(1);
            s.with("partials", norm_weight_grad_blocks(rows) * 3 * d * 8)
        }
        Op::CrossEntropy { .. } => {
            let rows = shape(0).first().copied().unwrap_or(1);
            s.with("partials", rows.clamp(1, REDUCE_BLOCKS) * 8)
        }
        // One block per channel computes its statistics and uses them in
        // the same launch, unless they are a group's (synchronised batch norm).
        Op::BatchNorm { .. } | Op::BatchStandardize { .. } => group_pieces(plan, shape(0), false, s),
        Op::BatchStandardizeGrad { .. } => group_pieces(plan, shape(1), true, s),
        Op::RunningStat { .. } => group_pieces(plan, shape(1), false, s),
        _ => s,
    }
}
