//! The op set of the graph IR and of plans. Each op has its attributes here
//! (and their text form); its shape rule is in the compiler's `ir/infer.rs`,
//! its FLOP count in `ir/flops.rs`, its kernels in each runtime backend.

use crate::types::{DType, Dim, Init, Shape};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum UnaryOp {
    /// Exact, erf-based GELU (nn.GELU(), reference 1.5).
    Gelu,
    Relu,
    Tanh,
    Sigmoid,
    Exp,
    Log,
    Neg,
    Sqrt,
    Recip,
    Square,
    /// 1 where x > 0, else 0 (ReLU's derivative).
    Heaviside,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
}

/// One IR operation. Operand order is part of each op's definition.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub enum Op {
    // ---- leaves ----
    /// A graph input (a batch of images, targets, ...). Type fixed at creation.
    Input {
        name: String,
    },
    /// A trainable (or frozen, `trainable == false`) parameter, by its state-dict name.
    Param {
        name: String,
        init: Init,
        trainable: bool,
    },
    /// A non-trainable buffer (queues, relative indices, BN running stats).
    Buffer {
        name: String,
        init: Init,
    },
    /// A constant tensor filled with `value`; its type is given at creation.
    Fill {
        value: f64,
    },

    // ---- first-class compound ops (fusion and backends need them whole) ----
    /// `(x [..., I], w [O, I], b? [O]) -> [..., O]`: x w^T + b.
    Linear,
    /// `(a [..., M, K], b [..., K, N]) -> [..., M, N]`, batch dims broadcast;
    /// `transpose_a` / `transpose_b` read a as [..., K, M] / b as [..., N, K]
    /// (a transposed view, no copy: the backward of every product needs one).
    /// With a third operand c (the result's shape and type), `a @ b + c`,
    /// summed before any rounding: the GEMM reads c as its C
    /// (`residual-into-linear`: two input gradients of one value).
    Matmul {
        transpose_a: bool,
        transpose_b: bool,
    },
    /// `(x [N, C, H, W], w [O, C, kh, kw], b? [O]) -> [N, O, H', W']`.
    Conv2d {
        stride: [u64; 2],
        padding: [u64; 2],
    },
    /// Scaled dot-product attention: `(q [.., H, Nq, d], k [.., H, Nk, d], v [.., H, Nk, dv])
    /// -> [.., H, Nq, dv]`, softmax((q k^T) * scale) with dropout on the probabilities.
    /// `key` names the op's random stream (dropout masks), so the backward
    /// pass and every backend draw the same mask.
    Attention {
        scale: f64,
        dropout: f64,
        key: u32,
    },
    /// `(qkv [B, N, 3*H*d]) -> [B, N, H*d]`: `Attention` of self-attention
    /// read in place from the packed product a qkv linear writes (its last
    /// axis is (3, H, d), timm's `reshape(B, N, 3, H, d)`), the result
    /// written per token as (H, d), the layout the projection reads. The
    /// numbers of reshape, permute [2,0,3,1,4], three slices, `Attention`
    /// and the inverse permute, without their copies (pass `packed-attention`);
    /// dropout's mask index is the unpacked op's.
    AttentionPacked {
        heads: u64,
        scale: f64,
        dropout: f64,
        key: u32,
    },
    /// `(x [..., D], w [D], b [D]) -> [..., D]`, normalised over the last axis.
    LayerNorm {
        eps: f64,
    },
    /// `(x [N, C] | [N, C, H, W], w [C], b [C], running_mean [C], running_var [C]) -> x's shape`.
    BatchNorm {
        eps: f64,
        momentum: f64,
    },
    /// `(logits [N, K], target [N] i64 | [N, K] float) -> []`, mean over N.
    /// Soft targets: -mean_n sum_k t log_softmax(x); hard targets with smoothing s:
    /// t = s/K + (1-s) onehot (reference 4.4).
    CrossEntropy {
        label_smoothing: f64,
    },

    // ---- elementwise ----
    Unary(UnaryOp),
    /// Numpy-style broadcasting over trailing dims.
    Binary(BinaryOp),
    /// `x * factor`.
    Scale {
        factor: f64,
    },
    /// `x + value`.
    AddScalar {
        value: f64,
    },
    /// `x ^ exponent`.
    PowScalar {
        exponent: f64,
    },
    Softmax {
        axis: usize,
    },
    LogSoftmax {
        axis: usize,
    },
    /// x / max(||x||_2, eps) along `axis` (F.normalize).
    L2Normalize {
        axis: usize,
        eps: f64,
    },
    /// Inverted dropout with drop probability `p` (train mode only).
    Dropout {
        p: f64,
        key: u32,
    },
    /// Stochastic depth: per-sample (axis 0) Bernoulli(1-p) mask, scaled by 1/(1-p) (reference 1.5).
    DropPath {
        p: f64,
        key: u32,
    },
    Cast {
        dtype: DType,
    },

    // ---- reductions ----
    Reduce {
        op: ReduceOp,
        axes: Vec<usize>,
        keepdim: bool,
    },
    /// `Reduce` of a float tensor of any float dtype with an f32 result,
    /// accumulated in f32 or wider: what mixed precision makes of a sum of
    /// a bf16 tensor (a bias gradient read straight from the bf16 gradient
    /// of a matrix product, not from an f32 copy of it).
    ReduceF32 {
        op: ReduceOp,
        axes: Vec<usize>,
        keepdim: bool,
    },

    // ---- layout ----
    Reshape {
        shape: Shape,
    },
    Permute {
        perm: Vec<usize>,
    },
    /// All operands concatenated along `axis`.
    Concat {
        axis: usize,
    },
    /// Elements `start..end` of `axis`.
    Slice {
        axis: usize,
        start: Dim,
        end: Dim,
    },
    /// Broadcast to `shape` (numpy rules: size-1 dims and new leading dims).
    Expand {
        shape: Shape,
    },

    // ---- autodiff, state, collectives ----
    /// Identity forward, zero gradient.
    StopGradient,
    /// Concatenate every rank's tensor along axis 0 (`world` ranks). With gradient:
    /// backward all-reduces and keeps this rank's slice (VISSL's GatherLayer, reference 4.3).
    AllGather {
        world: u64,
    },
    /// `x [N, N*world] -> [N, N*world]`: x with this rank's diagonal, (i, r*N + i),
    /// set to 0: a row's similarity to itself left out of a contrastive
    /// denominator (VISSL's SimCLR negative mask, reference 4.3).
    ZeroDiagonal {
        world: u64,
    },
    /// Element-wise reduction over `world` ranks; no gradient flows through it.
    AllReduce {
        op: ReduceOp,
        world: u64,
    },
    /// `(queue [E, K], ptr [] i64, keys [N, E]) -> [E, K]`: keys of all ranks written
    /// into columns ptr..ptr+N*world (MoCo's enqueue, reference 4.1).
    QueuePush {
        world: u64,
    },
    /// `(ptr [] i64, keys [N, E], queue [E, K]) -> [] i64`: (ptr + N*world) mod K.
    QueueAdvance {
        world: u64,
    },

    // ---- gradient ops (made by autodiff; each is the backward of one forward op) ----
    /// `(x, dy) -> dx`: dy * GELU'(x), exact erf GELU.
    GeluGrad,
    /// `(q, k, v, dy) -> [3, .., H, N, d]`: the backward of `Attention` for
    /// self-attention (q, k and v of one shape), `dq`, `dk` and `dv` stacked
    /// on a new leading axis. The probabilities are recomputed per head
    /// (nothing N x N is kept from the forward pass); `key` redraws its mask.
    /// Stacked, they are the gradient of a packed qkv tensor as it is.
    AttentionGrad {
        scale: f64,
        dropout: f64,
        key: u32,
    },
    /// `(qkv [B, N, 3*H*d], dy [B, N, H*d]) -> [B, N, 3*H*d]`: the backward
    /// of `AttentionPacked`, dq, dk and dv written in qkv's own layout (the
    /// gradient of the qkv product as its weight-gradient product reads it).
    /// With `row_sum`, its result 1 (`ResultPart`) is the sum over the rows
    /// of that result as stored (the qkv product's bias gradient), added up
    /// as the rows are written.
    AttentionPackedGrad {
        heads: u64,
        scale: f64,
        dropout: f64,
        key: u32,
        #[serde(default)]
        row_sum: bool,
    },
    /// `(x [..., D]) -> [..., D]`: (x - mean) / sqrt(var + eps) over the last axis.
    Normalize {
        eps: f64,
    },
    /// `(g [..., D], x [..., D]) -> dx`: backward of `Normalize` for the upstream
    /// gradient g; `(dy, x, w [D]) -> dx`: the same for g = dy * w (LayerNorm's
    /// input gradient in one pass; dy may be of another float dtype than x,
    /// e.g. bf16 from a product, and dx has x's dtype); `(dy, x, w, r) -> dx + r`
    /// adds r (the residual stream's gradient, x's type) as dx is written.
    NormalizeGrad {
        eps: f64,
    },
    /// `(dy [..., D], x [..., D]) -> [D]`: the sum over every row of
    /// dy * normalize(x), LayerNorm's weight gradient in one pass over dy
    /// and x (each row's statistics recomputed as `Normalize` computes
    /// them; no normalised copy of x, no product stored). dy may be of
    /// another float dtype than x (bf16 from a product); the result is x's.
    LayerNormWeightGrad {
        eps: f64,
    },
    /// `(dy [..., D], x [..., D], w [D]) -> dx`, `(dy, x, w, r) -> dx + r`:
    /// LayerNorm's whole backward in one pass over the rows. The result is
    /// `NormalizeGrad`'s; its other results are read out by
    /// `ResultPart`s (the kernel writes each where it lives): 1, the
    /// weight gradient (`LayerNormWeightGrad`'s); 2, the bias gradient (the
    /// sum of dy over the rows, accumulated in f32 or wider); 3, dx rounded
    /// to a lower precision (the copy the products before the norm read);
    /// 4, the sum over the rows of that rounded copy, or of dx without one
    /// (the bias gradient of the linear whose output joined the residual
    /// stream there); 5, with `normalized`, the forward's layer_norm(x, w,
    /// b) in that type (the operand of the norm's linear's weight-gradient
    /// product, recomputed here from the statistics this kernel computes
    /// anyway). With `normalized` the norm's bias b is the last operand:
    /// `(dy, x, w[, r], b)`. Each row's statistics are computed once for
    /// all of them.
    LayerNormGrad {
        eps: f64,
        /// The type of the copy (3) and of the values the sum (4) adds up
        /// (none: no copy, the sum is of dx).
        copy: Option<crate::types::DType>,
        /// The type of result 5, the normalised input (none: not made).
        #[serde(default)]
        normalized: Option<crate::types::DType>,
    },
    /// `(kernel's result [..., D]) -> result index`: a further result of a
    /// kernel with several, of `dtype`: [D] for 1, 2 and 4, the kernel's
    /// result's shape for 3 and 5. Which a kernel has is its op's: a
    /// `LayerNormGrad` 1 to 4 (5 with `normalized`), a `MatmulGeluGrad` or
    /// `AttentionPackedGrad` with `row_sum` 1 (its result's sum over the
    /// rows, the bias gradient of the product before it), a `MatmulGeluGrad`
    /// with `gelu` 5 (GELU(z)). Result 5 is always a forward activation the
    /// kernel recomputes for a weight-gradient product. Lowered to
    /// no kernel: the kernel writes it where it lives.
    ResultPart {
        index: u32,
        dtype: crate::types::DType,
    },
    /// `(x [N, C, ...]) -> x's shape`: batch standardisation over all axes but 1.
    BatchStandardize {
        eps: f64,
    },
    /// `(g, x) -> dx`: backward of `BatchStandardize`.
    BatchStandardizeGrad {
        eps: f64,
    },
    /// `(running [C], x [N, C, ...]) -> [C]`: (1-m) running + m * batch mean
    /// (`unbiased_var`: the unbiased batch variance instead), as PyTorch's BatchNorm.
    RunningStat {
        momentum: f64,
        unbiased_var: bool,
    },
    /// `(logits [N, K], target, dloss []) -> [N, K]`: (softmax - t) / N * dloss.
    CrossEntropyGrad {
        label_smoothing: f64,
    },
    /// `(dy [N, O, H', W'], w [O, C, kh, kw]) -> [N, C, H, W]`.
    Conv2dGradInput {
        stride: [u64; 2],
        padding: [u64; 2],
        input_hw: [u64; 2],
    },
    /// `(dy [N, O, H', W'], x [N, C, H, W]) -> [O, C, kh, kw]`.
    Conv2dGradWeight {
        stride: [u64; 2],
        padding: [u64; 2],
        kernel: [u64; 2],
    },
    /// Zero padding of `axis`: `before` zeros, the input, `after` zeros (slice's backward).
    Pad {
        axis: usize,
        before: Dim,
        after: Dim,
    },
    /// `(dy [W*N, ...]) -> [N, ...]`: sum over ranks, then this rank's rows
    /// (all_gather's backward, VISSL's GatherLayer).
    AllGatherGrad {
        world: u64,
    },
    /// `x / count`: a mean's backward, where the count may depend on the batch.
    DivCount {
        count: Dim,
    },
    /// `(x_1, ..., x_n) -> []`: the sum of the squares of every element of
    /// every operand (the squared global L2 norm of gradient clipping, one
    /// kernel over all gradients).
    SumOfSquares,

    // ---- fused ops (made by compiler passes) ----
    /// `(z [..., I], w [O, I], b? [O]) -> [..., O]`: `linear(gelu(z), w, b)`,
    /// GELU applied to the input as it is read, so `gelu(z)` is never stored.
    GeluLinear,
    /// `(a, b) -> a @ gelu(b)` (either read transposed), GELU applied to the
    /// right operand as it is read (the weight gradient of a `GeluLinear`).
    /// `b [..., K]` is read as the matrix [product of its leading dims, K].
    MatmulGeluRhs {
        transpose_a: bool,
        transpose_b: bool,
    },
    /// `(x [..., I], w [O, I], b [O], r [..., O]) -> [..., O]`: `r + linear(x,
    /// w, b)`, or `r + linear(gelu(x), w, b)` with `gelu`: a product whose
    /// result joins the residual stream as it is written (the projection and
    /// the MLP's second linear of a pre-norm block), so the product's own
    /// result is never stored and read back. x and w share a dtype; b, r and
    /// the result share another (mixed precision: bf16 operands, the f32
    /// stream, the sum taken before any rounding to bf16).
    LinearResidual {
        gelu: bool,
    },
    /// `(x [..., D], g [D], b [D], w [O, D], bias? [O]) -> [..., O]`:
    /// `linear(layer_norm(x, g, b), w, bias)`, x normalised (f32 statistics)
    /// as it is read, so the normalised activation is never stored. x, g and
    /// b share a dtype; w, bias and the result share another (mixed precision).
    LayerNormLinear {
        eps: f64,
    },
    /// `(a, x [..., D], g, b) -> a @ layer_norm(x, g, b)` (either read
    /// transposed), x read as the matrix [product of its leading dims, D]:
    /// the weight gradient of a `LayerNormLinear`.
    MatmulLayerNormRhs {
        eps: f64,
        transpose_a: bool,
        transpose_b: bool,
    },
    /// `(a, b, z) -> (a @ b) * GELU'(z)`: a matrix product with the GELU
    /// gradient as its epilogue (the gradient of an MLP's hidden layer).
    /// With `row_sum`, its result 1 (`ResultPart`) is the sum over the rows
    /// of that result as stored (the hidden layer's bias gradient), made by
    /// the same epilogue; with `gelu`, its result 5 is GELU(z) in that type
    /// (the operand of the next linear's weight-gradient product), written
    /// by the epilogue that reads z anyway.
    MatmulGeluGrad {
        transpose_a: bool,
        transpose_b: bool,
        #[serde(default)]
        row_sum: bool,
        #[serde(default)]
        gelu: Option<crate::types::DType>,
    },
    /// Elementwise ops run as one kernel, one pass over memory: `body` is a
    /// register program over the operands (see `fused.rs`).
    Fused {
        body: Vec<crate::instr::Instr>,
    },
    /// Multi-tensor apply: one kernel runs `body` (a register program, as
    /// `Fused`'s) once per tensor set, set j being operands
    /// `j * arity .. (j + 1) * arity`, and writes its registers `results`.
    /// The value is the results packed result-major (result r of set j at
    /// `r * total + offset_j`, `total` the sets' summed element counts); it is
    /// never stored whole: `Part`s read it out. The optimizer over every
    /// parameter is one such kernel (apex/PyTorch's fused AdamW).
    MultiTensor {
        body: Vec<crate::instr::Instr>,
        arity: u32,
        results: Vec<u32>,
    },
    /// `(packed [n]) -> shape`: elements `offset .. offset + numel(shape)` of
    /// a `MultiTensor` value, one set's result. Lowered to no kernel: the
    /// multi-tensor kernel writes it where it lives.
    Part {
        offset: u64,
        shape: Shape,
    },
}

impl Op {
    /// A plain matrix product, `a @ b`.
    pub fn matmul() -> Op {
        Op::Matmul { transpose_a: false, transpose_b: false }
    }

    /// Whether element i of the result is a function of element i of each
    /// operand (broadcast) alone: fusion may chain it, and its result may
    /// overwrite a dying operand of its own shape.
    pub fn is_elementwise(&self) -> bool {
        matches!(
            self,
            Op::Fused { .. }
                | Op::Unary(_)
                | Op::Binary(_)
                | Op::Scale { .. }
                | Op::AddScalar { .. }
                | Op::PowScalar { .. }
                | Op::GeluGrad
                | Op::Dropout { .. }
                | Op::DropPath { .. }
                | Op::DivCount { .. }
                | Op::Cast { .. }
        )
    }

    /// The op's name in the text form (`linear`, `layer_norm`, `add`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Buffer { .. } => "buffer",
            Op::Fill { .. } => "fill",
            Op::Linear => "linear",
            Op::Matmul { .. } => "matmul",
            Op::Conv2d { .. } => "conv2d",
            Op::Attention { .. } => "attention",
            Op::LayerNorm { .. } => "layer_norm",
            Op::BatchNorm { .. } => "batch_norm",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::Unary(u) => match u {
                UnaryOp::Gelu => "gelu",
                UnaryOp::Relu => "relu",
                UnaryOp::Tanh => "tanh",
                UnaryOp::Sigmoid => "sigmoid",
                UnaryOp::Exp => "exp",
                UnaryOp::Log => "log",
                UnaryOp::Neg => "neg",
                UnaryOp::Sqrt => "sqrt",
                UnaryOp::Recip => "recip",
                UnaryOp::Square => "square",
                UnaryOp::Heaviside => "heaviside",
            },
            Op::Binary(b) => match b {
                BinaryOp::Add => "add",
                BinaryOp::Sub => "sub",
                BinaryOp::Mul => "mul",
                BinaryOp::Div => "div",
                BinaryOp::Max => "maximum",
                BinaryOp::Min => "minimum",
            },
            Op::Scale { .. } => "scale",
            Op::AddScalar { .. } => "add_scalar",
            Op::PowScalar { .. } => "pow_scalar",
            Op::Softmax { .. } => "softmax",
            Op::LogSoftmax { .. } => "log_softmax",
            Op::L2Normalize { .. } => "l2_normalize",
            Op::Dropout { .. } => "dropout",
            Op::DropPath { .. } => "drop_path",
            Op::Cast { .. } => "cast",
            Op::Reduce { op, .. } => match op {
                ReduceOp::Sum => "sum",
                ReduceOp::Mean => "mean",
                ReduceOp::Max => "max",
            },
            Op::ReduceF32 { op, .. } => match op {
                ReduceOp::Sum => "sum_f32",
                ReduceOp::Mean => "mean_f32",
                ReduceOp::Max => "max_f32",
            },
            Op::Reshape { .. } => "reshape",
            Op::Permute { .. } => "permute",
            Op::Concat { .. } => "concat",
            Op::Slice { .. } => "slice",
            Op::Expand { .. } => "expand",
            Op::StopGradient => "stop_gradient",
            Op::AllGather { .. } => "all_gather",
            Op::AllReduce { .. } => "all_reduce",
            Op::ZeroDiagonal { .. } => "zero_diagonal",
            Op::QueuePush { .. } => "queue_push",
            Op::QueueAdvance { .. } => "queue_advance",
            Op::GeluGrad => "gelu_grad",
            Op::AttentionGrad { .. } => "attention_grad",
            Op::AttentionPacked { .. } => "attention_packed",
            Op::AttentionPackedGrad { .. } => "attention_packed_grad",
            Op::Fused { .. } => "fused",
            Op::MultiTensor { .. } => "multi_tensor",
            Op::Part { .. } => "part",
            Op::SumOfSquares => "sum_of_squares",
            Op::GeluLinear => "gelu_linear",
            Op::MatmulGeluRhs { .. } => "matmul_gelu_rhs",
            Op::MatmulGeluGrad { .. } => "matmul_gelu_grad",
            Op::LayerNormLinear { .. } => "layer_norm_linear",
            Op::LinearResidual { .. } => "linear_residual",
            Op::MatmulLayerNormRhs { .. } => "matmul_layer_norm_rhs",
            Op::Normalize { .. } => "normalize",
            Op::NormalizeGrad { .. } => "normalize_grad",
            Op::LayerNormWeightGrad { .. } => "layer_norm_weight_grad",
            Op::LayerNormGrad { .. } => "layer_norm_grad",
            Op::ResultPart { .. } => "result_part",
            Op::BatchStandardize { .. } => "batch_standardize",
            Op::BatchStandardizeGrad { .. } => "batch_standardize_grad",
            Op::RunningStat { .. } => "running_stat",
            Op::CrossEntropyGrad { .. } => "cross_entropy_grad",
            Op::Conv2dGradInput { .. } => "conv2d_grad_input",
            Op::Conv2dGradWeight { .. } => "conv2d_grad_weight",
            Op::Pad { .. } => "pad",
            Op::AllGatherGrad { .. } => "all_gather_grad",
            Op::DivCount { .. } => "div_count",
        }
    }

    /// Leaves carry their own type; every other op's type is inferred.
    pub fn is_leaf(&self) -> bool {
        matches!(self, Op::Input { .. } | Op::Param { .. } | Op::Buffer { .. } | Op::Fill { .. })
    }
}

/// `[8,8]`, written like a shape.
fn list<T: std::fmt::Display>(xs: &[T]) -> String {
    let items: Vec<String> = xs.iter().map(|x| x.to_string()).collect();
    format!("[{}]", items.join(","))
}

/// An op's attributes in their fixed print order; empty for ops without any.
/// `{k=v, ...}` of an op's attributes, or "" when it has none (as in the text form).
pub fn attribute_text(op: &Op) -> String {
    let attrs: Vec<String> = attributes(op).into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    if attrs.is_empty() {
        String::new()
    } else {
        format!(" {{{}}}", attrs.join(", "))
    }
}

pub fn attributes(op: &Op) -> Vec<(&'static str, String)> {
    let reduce_name = |r: &ReduceOp| match r {
        ReduceOp::Sum => "sum",
        ReduceOp::Mean => "mean",
        ReduceOp::Max => "max",
    };
    match op {
        Op::Conv2d { stride, padding } => vec![("stride", list(stride)), ("padding", list(padding))],
        Op::Attention { scale, dropout, key } | Op::AttentionGrad { scale, dropout, key } => {
            vec![("scale", scale.to_string()), ("dropout", dropout.to_string()), ("key", key.to_string())]
        }
        Op::AttentionPacked { heads, scale, dropout, key }
        | Op::AttentionPackedGrad { heads, scale, dropout, key, .. } => {
            let mut v = vec![
                ("heads", heads.to_string()),
                ("scale", scale.to_string()),
                ("dropout", dropout.to_string()),
                ("key", key.to_string()),
            ];
            if let Op::AttentionPackedGrad { row_sum: true, .. } = op {
                v.push(("row_sum", "true".to_string()));
            }
            v
        }
        Op::LayerNorm { eps } => vec![("eps", eps.to_string())],
        Op::BatchNorm { eps, momentum } => vec![("eps", eps.to_string()), ("momentum", momentum.to_string())],
        Op::CrossEntropy { label_smoothing } => vec![("label_smoothing", label_smoothing.to_string())],
        Op::Scale { factor } => vec![("factor", factor.to_string())],
        Op::AddScalar { value } => vec![("value", value.to_string())],
        Op::PowScalar { exponent } => vec![("exponent", exponent.to_string())],
        Op::Softmax { axis } | Op::LogSoftmax { axis } => vec![("axis", axis.to_string())],
        Op::L2Normalize { axis, eps } => vec![("axis", axis.to_string()), ("eps", eps.to_string())],
        Op::Dropout { p, key } | Op::DropPath { p, key } => vec![("p", p.to_string()), ("key", key.to_string())],
        Op::Normalize { eps }
        | Op::NormalizeGrad { eps }
        | Op::LayerNormWeightGrad { eps }
        | Op::BatchStandardize { eps }
        | Op::BatchStandardizeGrad { eps } => vec![("eps", eps.to_string())],
        Op::RunningStat { momentum, unbiased_var } => {
            vec![("momentum", momentum.to_string()), ("unbiased_var", unbiased_var.to_string())]
        }
        Op::CrossEntropyGrad { label_smoothing } => vec![("label_smoothing", label_smoothing.to_string())],
        Op::Conv2dGradInput { stride, padding, input_hw } => {
            vec![("stride", list(stride)), ("padding", list(padding)), ("input_hw", list(input_hw))]
        }
        Op::Conv2dGradWeight { stride, padding, kernel } => {
            vec![("stride", list(stride)), ("padding", list(padding)), ("kernel", list(kernel))]
        }
        Op::Pad { axis, before, after } => {
            vec![("axis", axis.to_string()), ("before", before.to_string()), ("after", after.to_string())]
        }
        Op::AllGatherGrad { world } => vec![("world", world.to_string())],
        Op::DivCount { count } => vec![("count", count.to_string())],
        Op::GeluGrad => vec![],
        Op::Fused { body } => vec![("body", format!("[{}]", crate::instr::body_text(body)))],
        Op::MultiTensor { body, arity, results } => vec![
            ("body", format!("[{}]", crate::instr::body_text(body))),
            ("arity", arity.to_string()),
            ("results", list(results)),
        ],
        Op::Part { offset, shape } => vec![("offset", offset.to_string()), ("shape", shape.to_string())],
        Op::ResultPart { index, dtype } => vec![("index", index.to_string()), ("dtype", dtype.to_string())],
        Op::LayerNormGrad { eps, copy, normalized } => {
            let mut v = vec![("eps", eps.to_string())];
            if let Some(c) = copy {
                v.push(("copy", c.to_string()));
            }
            if let Some(n) = normalized {
                v.push(("normalized", n.to_string()));
            }
            v
        }
        Op::Cast { dtype } => vec![("dtype", dtype.to_string())],
        Op::Reduce { axes, keepdim, .. } | Op::ReduceF32 { axes, keepdim, .. } => {
            vec![("axes", list(axes)), ("keepdim", keepdim.to_string())]
        }
        Op::Reshape { shape } | Op::Expand { shape } => vec![("shape", shape.to_string())],
        Op::Permute { perm } => vec![("perm", list(perm))],
        Op::Concat { axis } => vec![("axis", axis.to_string())],
        Op::Slice { axis, start, end } => {
            vec![("axis", axis.to_string()), ("start", start.to_string()), ("end", end.to_string())]
        }
        Op::AllGather { world } | Op::ZeroDiagonal { world } | Op::QueuePush { world } | Op::QueueAdvance { world } => {
            vec![("world", world.to_string())]
        }
        Op::AllReduce { op, world } => vec![("op", reduce_name(op).to_string()), ("world", world.to_string())],
        Op::Input { .. } | Op::Param { .. } | Op::Buffer { .. } | Op::Fill { .. } => vec![],
        Op::Matmul { transpose_a, transpose_b }
        | Op::MatmulGeluRhs { transpose_a, transpose_b }
        | Op::MatmulGeluGrad { transpose_a, transpose_b, .. } => {
            let mut v = vec![];
            if *transpose_a {
                v.push(("transpose_a", "true".to_string()));
            }
            if *transpose_b {
                v.push(("transpose_b", "true".to_string()));
            }
            if let Op::MatmulGeluGrad { row_sum, gelu, .. } = op {
                if *row_sum {
                    v.push(("row_sum", "true".to_string()));
                }
                if let Some(gelu) = gelu {
                    v.push(("gelu", gelu.to_string()));
                }
            }
            v
        }
        Op::LayerNormLinear { eps } => vec![("eps", eps.to_string())],
        Op::LinearResidual { gelu } => vec![("gelu", gelu.to_string())],
        Op::MatmulLayerNormRhs { eps, transpose_a, transpose_b } => {
            let mut v = vec![("eps", eps.to_string())];
            if *transpose_a {
                v.push(("transpose_a", "true".to_string()));
            }
            if *transpose_b {
                v.push(("transpose_b", "true".to_string()));
            }
            v
        }
        Op::Linear | Op::GeluLinear | Op::SumOfSquares | Op::Unary(_) | Op::Binary(_) | Op::StopGradient => vec![],
    }
}
