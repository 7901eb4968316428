//! The CPU backend: the reference executor for compiled plans, with one
//! kernel per IR op (f32 compute, rayon threads, matrix products on `gemm`).
//!
//! Module map: `executor` runs a plan (state, inputs, buffer lifetimes);
//! `arena` runs it too, with every value at its place in the plan's memory
//! plan (one host buffer, as the CUDA backend lays out its allocation);
//! `dispatch` (below) maps each `Op` to its kernel; one module per family of
//! kernels (`matmul`, `conv`, `attention`, `elementwise`, `reduce`, `norm`,
//! `softmax`, `loss`, `layout`, `random`, `collective`, `state`); `init`
//! draws initial parameters; `special` holds erf and the normal quantile.
//!
//! Invariants: kernels are pure functions of their operands and the run
//! context (mode, seed, step), never of execution order; every random draw
//! comes from Philox keyed by (seed, step, op key, element); the executor
//! checks each kernel's result against the plan's type, so a kernel bug
//! surfaces as an error naming the kernel, not as a wrong shape downstream.

mod arena;
mod attention;
mod broadcast;
mod buckets;
mod collective;
mod conv;
mod elementwise;
mod epilogue;
mod executor;
pub mod fast_math;
mod fused;
pub mod init;
mod kernel;
mod layout;
mod loss;
mod matmul;
mod norm;
pub mod pool;
mod random;
mod reduce;
pub mod simd;
mod softmax;
pub mod special;
mod state;

use crate::error::{self, KernelError};
use crate::tensor::Tensor;
pub use arena::ArenaExecutor;
pub use executor::CpuExecutor;
pub use fused::multi_tensor;
pub use kernel::Ctx;

use tessera_plan::{Dim, Op};

/// A fixed dim of a plan's op (the plan has no symbolic batch left).
fn fixed(d: Dim) -> Result<usize, KernelError> {
    d.as_const()
        .map(|v| v as usize)
        .ok_or_else(|| error::invalid(format!("dim {d} is not fixed (plans have no symbolic batch)")))
}

fn fixed_shape(s: &tessera_plan::Shape) -> Result<Vec<usize>, KernelError> {
    s.dims().iter().map(|&d| fixed(d)).collect()
}

/// `ctx` with the bf16 facts of kernel `k` of `plan` (which operands and
/// whether the result have the plan type bf16).
pub fn typed<'a>(ctx: &Ctx<'a>, plan: &tessera_plan::Plan, k: usize) -> Ctx<'a> {
    let kernel = &plan.kernels[k];
    let bf16 = |v: usize| plan.values[v].dtype == tessera_plan::DType::BF16;
    let bits =
        kernel.inputs.iter().take(32).enumerate().fold(0u32, |m, (i, &v)| if bf16(v) { m | (1 << i) } else { m });
    Ctx { bf16_operands: bits, bf16_result: bf16(kernel.output), ..*ctx }
}

/// Runs the kernel of `op` on `x`. This is the one place that maps ops to
/// kernels; operand order follows each op's definition in the IR.
pub fn run_kernel(op: &Op, x: &[&Tensor], ctx: &Ctx) -> Result<Tensor, KernelError> {
    match op {
        Op::Input { .. } | Op::Param { .. } | Op::Buffer { .. } | Op::Fill { .. } => {
            Err(error::invalid(format!("{} is a leaf, not a kernel", op.name())))
        }
        Op::Linear => matmul::linear(x),
        Op::Matmul { transpose_a, transpose_b } => match x {
            [a, b, c] => epilogue::matmul_add(a, b, c, *transpose_a, *transpose_b),
            _ => matmul::matmul(x, *transpose_a, *transpose_b),
        },
        Op::Conv2d { stride, padding } => conv::conv2d(x, *stride, *padding),
        Op::Attention { scale, dropout, key } => attention::attention(x, *scale, *dropout, *key, ctx),
        Op::LayerNorm { eps } => norm::layer_norm(x, *eps),
        Op::BatchNorm { eps, .. } => norm::batch_norm(x, *eps, ctx),
        Op::CrossEntropy { label_smoothing } => loss::cross_entropy(x, *label_smoothing),
        Op::Unary(u) => elementwise::unary(x, *u),
        Op::Binary(b) => elementwise::binary(x, *b),
        Op::Scale { factor } => elementwise::scale(x, *factor),
        Op::AddScalar { value } => elementwise::add_scalar(x, *value),
        Op::PowScalar { exponent } => elementwise::pow_scalar(x, *exponent),
        Op::Softmax { axis } => softmax::softmax(x, *axis),
        Op::LogSoftmax { axis } => softmax::log_softmax(x, *axis),
        Op::L2Normalize { axis, eps } => softmax::l2_normalize(x, *axis, *eps),
        Op::Dropout { p, key } => random::dropout(x, *p, *key, ctx),
        Op::DropPath { p, key } => random::drop_path(x, *p, *key, ctx),
        Op::Cast { dtype } => elementwise::cast(x, *dtype),
        // bf16 values are f32 numbers here: the wide form is the same sum.
        Op::Reduce { op, axes, keepdim } | Op::ReduceF32 { op, axes, keepdim } => {
            reduce::reduce(x, *op, axes, *keepdim)
        }
        Op::Reshape { shape } => layout::reshape(x, &fixed_shape(shape)?),
        Op::Permute { perm } => layout::permute(x, perm),
        Op::Concat { axis } => layout::concat(x, *axis),
        Op::Slice { axis, start, end } => layout::slice(x, *axis, fixed(*start)?, fixed(*end)?),
        Op::Expand { shape } => layout::expand(x, &fixed_shape(shape)?),
        Op::StopGradient => kernel::operands(x, ["input"]).map(|[t]| pool::pooled_clone(t)),
        Op::AllGather { world } => collective::all_gather(x, *world, ctx),
        Op::AllReduce { op, world } => collective::all_reduce(x, *op, *world, ctx),
        Op::AllGatherGrad { world } => collective::all_gather_grad(x, *world, ctx),
        Op::QueuePush { world } => state::queue_push(x, *world, ctx),
        Op::ZeroDiagonal { world } => loss::zero_diagonal(x, *world, ctx),
        Op::QueueAdvance { world } => state::queue_advance(x, *world),
        Op::GeluGrad => elementwise::gelu_grad(x),
        Op::Fused { body } => fused::fused(x, body, ctx),
        Op::GeluLinear => epilogue::gelu_linear(x, ctx),
        Op::LinearResidual { gelu } => epilogue::linear_residual(x, *gelu, ctx),
        Op::LayerNormLinear { eps } => epilogue::layer_norm_linear(x, *eps, ctx),
        Op::MatmulLayerNormRhs { eps, transpose_a, transpose_b } => {
            epilogue::matmul_layer_norm_rhs(x, *eps, *transpose_a, *transpose_b, ctx)
        }
        Op::MatmulGeluRhs { transpose_a, transpose_b } => epilogue::matmul_gelu_rhs(x, *transpose_a, *transpose_b, ctx),
        Op::MatmulGeluGrad { transpose_a, transpose_b, .. } => {
            epilogue::matmul_gelu_grad(x, *transpose_a, *transpose_b, ctx)
        }
        Op::AttentionGrad { scale, dropout, key } => attention::attention_grad(x, *scale, *dropout, *key, ctx),
        Op::AttentionPacked { heads, scale, dropout, key } => {
            attention::attention_packed(x, *heads, *scale, *dropout, *key, ctx)
        }
        Op::AttentionPackedGrad { heads, scale, dropout, key, .. } => {
            attention::attention_packed_grad(x, *heads, *scale, *dropout, *key, ctx)
        }
        Op::Normalize { eps } => norm::normalize(x, *eps),
        Op::NormalizeGrad { eps } => norm::normalize_grad(x, *eps),
        Op::LayerNormWeightGrad { eps } => norm::layer_norm_weight_grad(x, *eps),
        Op::BatchStandardize { eps } => norm::batch_standardize(x, *eps, ctx),
        Op::BatchStandardizeGrad { eps } => norm::batch_standardize_grad(x, *eps, ctx),
        Op::RunningStat { momentum, unbiased_var } => state::running_stat(x, *momentum, *unbiased_var, ctx),
        Op::CrossEntropyGrad { label_smoothing } => loss::cross_entropy_grad(x, *label_smoothing),
        Op::Conv2dGradInput { stride, padding, input_hw } => conv::conv2d_grad_input(x, *stride, *padding, *input_hw),
        Op::Conv2dGradWeight { stride, padding, kernel } => conv::conv2d_grad_weight(x, *stride, *padding, *kernel),
        Op::Pad { axis, before, after } => layout::pad(x, *axis, fixed(*before)?, fixed(*after)?),
        Op::DivCount { count } => elementwise::div_scalar(x, fixed(*count)? as f64),
        Op::SumOfSquares => reduce::sum_of_squares(x),
        // Several results: the executor runs it (`fused::multi_tensor`) and
        // places its parts; a part is no kernel.
        // Its result; its parts are `parts`'.
        Op::LayerNormGrad { eps, normalized, .. } => norm::normalize_grad(norm::without_bias(x, *normalized), *eps),
        Op::MultiTensor { .. } | Op::Part { .. } | Op::ResultPart { .. } => {
            Err(error::invalid(format!("{} is run by the executor, not as a single-result kernel", op.name())))
        }
    }
}

/// The results `wanted` (by index) of a kernel with several, besides its
/// result `main` (what `run_kernel` made of the same operands `x`, as its
/// plan dtype stores it).
pub fn parts(op: &Op, x: &[&Tensor], main: &Tensor, wanted: &[u64]) -> Result<Vec<(u64, Tensor)>, KernelError> {
    match op {
        Op::LayerNormGrad { eps, copy, normalized } => {
            norm::layer_norm_grad_parts(x, main, *eps, *copy, *normalized, wanted)
        }
        // The result's row sum (as the result is stored), as `reduce`; GELU(z)
        // in the part's type, as `matmul_gelu_rhs` computes its operand.
        Op::MatmulGeluGrad { .. } | Op::AttentionPackedGrad { .. } => {
            let gelu = match op {
                Op::MatmulGeluGrad { gelu, .. } => *gelu,
                _ => None,
            };
            wanted
                .iter()
                .map(|&index| match (index, gelu, x) {
                    (1, _, _) => Ok((1, reduce::row_sums(main)?)),
                    (5, Some(dtype), [_, _, z]) => {
                        let g = elementwise::unary(&[z], tessera_plan::UnaryOp::Gelu)?;
                        let part = elementwise::cast(&[&g], dtype);
                        pool::recycle(g);
                        Ok((5, part?))
                    }
                    _ => Err(error::invalid(format!("{} has no result {index}", op.name()))),
                })
                .collect()
        }
        other => Err(error::invalid(format!("{} has no results besides its own", other.name()))),
    }
}

/// Whether `op`'s output is its first operand's data unchanged (possibly
/// reshaped): the executor then moves a dying operand instead of copying.
fn passes_data_through(op: &Op, ctx: &Ctx) -> bool {
    match op {
        Op::Reshape { .. } | Op::StopGradient => true,
        Op::AllGather { world } | Op::AllReduce { world, .. } | Op::AllGatherGrad { world } => *world == 1,
        Op::Dropout { p, .. } | Op::DropPath { p, .. } => !ctx.training || *p == 0.0,
        _ => false,
    }
}
