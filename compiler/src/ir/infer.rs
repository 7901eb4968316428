//! Shape and dtype rules: one per non-leaf op, as documented on `Op`.
//!
//! Messages reach model authors through the elaborator, so they name operands
//! by role (`input`, `weight`, `q`, ...) and show shapes as `[B,197,768]`. The
//! op name and scope are added by the caller (`IrError::Shape`).

use super::op::{Op, ReduceOp};
use super::types::{DType, Dim, Shape, TensorType};

type Rule = Result<TensorType, String>;

pub(crate) fn infer(op: &Op, x: &[&TensorType]) -> Rule {
    match op {
        Op::Input { .. } | Op::Param { .. } | Op::Buffer { .. } | Op::Fill { .. } => {
            Err(format!("{} is a leaf and has no shape rule", op.name()))
        }
        Op::Linear => linear(x),
        Op::Matmul { transpose_a, transpose_b } => match x {
            // The sum has the addend's type: the product's, or f32 over a
            // low-precision product (the add it stands for promoted).
            [a, b, c] => {
                let out = matmul(&[a, b], *transpose_a, *transpose_b)?;
                let wider = c.dtype == DType::F32 && out.dtype.is_float();
                if c.shape != out.shape || (c.dtype != out.dtype && !wider) {
                    return Err(format!("the addend {c} must have the product's type {out} (or its shape in f32)"));
                }
                Ok((*c).clone())
            }
            _ => matmul(x, *transpose_a, *transpose_b),
        },
        Op::Conv2d { stride, padding } => conv2d(x, *stride, *padding),
        Op::Attention { dropout, .. } => {
            probability("dropout", *dropout)?;
            attention(x)
        }
        Op::AttentionPacked { heads, dropout, .. } => {
            probability("dropout", *dropout)?;
            let [qkv] = exactly(x, ["qkv"])?;
            attention_packed(qkv, *heads)
        }
        Op::LayerNorm { .. } => layer_norm(x),
        Op::BatchNorm { .. } => batch_norm(x),
        Op::CrossEntropy { label_smoothing } => cross_entropy(x, *label_smoothing),
        Op::Unary(_) | Op::Scale { .. } | Op::AddScalar { .. } | Op::PowScalar { .. } => float_unary(x),
        Op::Binary(_) => binary(x),
        Op::Softmax { axis } | Op::LogSoftmax { axis } | Op::L2Normalize { axis, .. } => {
            let t = float_unary(x)?;
            check_axis(*axis, &t.shape)?;
            Ok(t)
        }
        Op::Dropout { p, .. } => {
            probability("p", *p)?;
            float_unary(x)
        }
        Op::DropPath { p, .. } => {
            probability("p", *p)?;
            let t = float_unary(x)?;
            if t.shape.rank() == 0 {
                return Err("input must have a sample axis (rank >= 1), got a scalar []".into());
            }
            Ok(t)
        }
        Op::Cast { dtype } => {
            let [t] = exactly(x, ["input"])?;
            Ok(TensorType::new(t.shape.clone(), *dtype))
        }
        Op::Reduce { op, axes, keepdim } => reduce(x, *op, axes, *keepdim),
        Op::ReduceF32 { op, axes, keepdim } => {
            let [t] = exactly(x, ["input"])?;
            float("input", t)?;
            reduce(x, *op, axes, *keepdim).map(|r| TensorType::new(r.shape, DType::F32))
        }
        Op::Reshape { shape } => reshape(x, shape),
        Op::Permute { perm } => permute(x, perm),
        Op::Concat { axis } => concat(x, *axis),
        Op::Slice { axis, start, end } => slice(x, *axis, *start, *end),
        Op::Expand { shape } => expand(x, shape),
        Op::StopGradient => {
            let [t] = exactly(x, ["input"])?;
            Ok(t.clone())
        }
        Op::AllGather { world } => all_gather(x, *world),
        Op::ZeroDiagonal { world } => zero_diagonal(x, *world),
        Op::AllReduce { op, world } => {
            check_world(*world)?;
            let [t] = exactly(x, ["input"])?;
            if *op == ReduceOp::Mean {
                float("input", t)?;
            }
            Ok(t.clone())
        }
        Op::QueuePush { world } => queue_push(x, *world),
        Op::QueueAdvance { world } => queue_advance(x, *world),
        Op::Fused { body } => super::fused::infer_fused(body, x),
        Op::MultiTensor { body, arity, results } => super::fused::infer_multi(body, *arity, results, x),
        Op::Part { offset, shape } => {
            let [t] = exactly(x, ["packed"])?;
            let (Some(n), Some(len)) = (
                t.shape.0.first().and_then(|d| d.as_const()).filter(|_| t.shape.rank() == 1),
                shape.0.iter().map(|d| d.as_const()).product::<Option<u64>>(),
            ) else {
                return Err(format!("reads {} of a constant 1-d packed value {t}", shape));
            };
            if offset + len > n {
                return Err(format!("elements {offset}..{} are outside the packed value {t}", offset + len));
            }
            Ok(TensorType::new(shape.clone(), t.dtype))
        }
        Op::SumOfSquares => {
            let first = x.first().ok_or("expects at least 1 operand, got 0")?;
            let named: Vec<(String, &TensorType)> =
                x.iter().enumerate().map(|(i, t)| (format!("operand {i}"), *t)).collect();
            let named: Vec<(&str, &TensorType)> = named.iter().map(|(n, t)| (n.as_str(), *t)).collect();
            floats_alike(&named)?;
            Ok(TensorType::new(Shape::scalar(), first.dtype))
        }
        Op::GeluLinear => linear(x),
        Op::LayerNormLinear { .. } => {
            if x.len() < 4 {
                return Err(format!("expects 4 or 5 operands (x, ln weight, ln bias, weight, bias?), got {}", x.len()));
            }
            let normed = layer_norm(&x[..3])?;
            // The normalised input in the product's dtype.
            let as_w = TensorType::new(normed.shape, x[3].dtype);
            let mut rest: Vec<&TensorType> = vec![&as_w];
            rest.extend_from_slice(&x[3..]);
            linear(&rest)
        }
        Op::LinearResidual { .. } => {
            let [xi, w, b, r] = exactly(x, ["x", "weight", "bias", "residual"])?;
            // The product in the stream's dtype: its bias is the stream's too.
            let as_r = |t: &TensorType| TensorType::new(t.shape.clone(), r.dtype);
            floats_alike(&[("x", xi), ("weight", w)])?;
            floats_alike(&[("bias", b), ("residual", r)])?;
            let out = linear(&[&as_r(xi), &as_r(w), b])?;
            if r.shape != out.shape {
                return Err(format!("the residual {} must have the product's shape {}", r.shape, out.shape));
            }
            Ok(out)
        }
        Op::MatmulLayerNormRhs { transpose_a, transpose_b, .. } => {
            let [a, xi, g, b] = exactly(x, ["a", "x", "ln weight", "ln bias"])?;
            let normed = layer_norm(&[xi, g, b])?;
            let rows = rows_of(&TensorType::new(normed.shape, a.dtype))?;
            matmul(&[a, &rows], *transpose_a, *transpose_b)
        }
        Op::MatmulGeluRhs { transpose_a, transpose_b } => {
            let [a, b] = exactly(x, ["a", "b"])?;
            matmul(&[a, &rows_of(b)?], *transpose_a, *transpose_b)
        }
        Op::MatmulGeluGrad { transpose_a, transpose_b, .. } => {
            let [a, b, z] = exactly(x, ["a", "b", "z"])?;
            let out = matmul(&[a, b], *transpose_a, *transpose_b)?;
            if z.shape != out.shape || z.dtype != out.dtype {
                return Err(format!("z must be {out} like the product, got {z}"));
            }
            Ok(out)
        }
        Op::GeluGrad
        | Op::AttentionGrad { .. }
        | Op::AttentionPackedGrad { .. }
        | Op::Normalize { .. }
        | Op::NormalizeGrad { .. }
        | Op::LayerNormWeightGrad { .. }
        | Op::LayerNormGrad { .. }
        | Op::ResultPart { .. }
        | Op::BatchStandardize { .. }
        | Op::BatchStandardizeGrad { .. }
        | Op::RunningStat { .. }
        | Op::CrossEntropyGrad { .. }
        | Op::Conv2dGradInput { .. }
        | Op::Conv2dGradWeight { .. }
        | Op::Pad { .. }
        | Op::AllGatherGrad { .. }
        | Op::DivCount { .. } => super::infer_grad::infer_grad(op, x),
    }
}

// ---- operand checks ----

/// Exactly `N` operands, returned by position.
pub(super) fn exactly<'a, const N: usize>(
    x: &[&'a TensorType],
    roles: [&str; N],
) -> Result<[&'a TensorType; N], String> {
    let noun = if N == 1 { "operand" } else { "operands" };
    <[&TensorType; N]>::try_from(x).map_err(|_| format!("expects {N} {noun} ({}), got {}", roles.join(", "), x.len()))
}

/// `(input, weight, bias?)` as taken by linear and conv2d.
fn with_optional_bias<'a>(
    x: &[&'a TensorType],
) -> Result<(&'a TensorType, &'a TensorType, Option<&'a TensorType>), String> {
    match *x {
        [i, w] => Ok((i, w, None)),
        [i, w, b] => Ok((i, w, Some(b))),
        _ => Err(format!("expects 2 or 3 operands (input, weight, bias?), got {}", x.len())),
    }
}

pub(super) fn float(role: &str, t: &TensorType) -> Result<(), String> {
    if t.dtype.is_float() {
        Ok(())
    } else {
        Err(format!("{role} must be a float tensor, got {t}"))
    }
}

/// Every operand is float and has the first operand's dtype; mixed precision
/// is explicit in the IR (a `cast`), never implied by an op.
pub(super) fn floats_alike(named: &[(&str, &TensorType)]) -> Result<(), String> {
    let (first_role, first) = named[0];
    for &(role, t) in named {
        float(role, t)?;
        if t.dtype != first.dtype {
            return Err(format!("{role} dtype {} differs from {first_role} dtype {}", t.dtype, first.dtype));
        }
    }
    Ok(())
}

pub(super) fn float_unary(x: &[&TensorType]) -> Rule {
    let [t] = exactly(x, ["input"])?;
    float("input", t)?;
    Ok(t.clone())
}

pub(super) fn check_axis(axis: usize, s: &Shape) -> Result<(), String> {
    if axis < s.rank() {
        Ok(())
    } else {
        Err(format!("axis {axis} is out of range for input {s} (rank {})", s.rank()))
    }
}

fn probability(what: &str, p: f64) -> Result<(), String> {
    if (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err(format!("{what} = {p} must be in [0, 1)"))
    }
}

pub(super) fn check_world(world: u64) -> Result<(), String> {
    if world == 0 {
        return Err("world size must be at least 1".into());
    }
    Ok(())
}

/// `[d]` with `d` as given, for biases and norm parameters.
pub(super) fn vector_of(role: &str, t: &TensorType, d: Dim, meaning: &str) -> Result<(), String> {
    if t.shape.dims() != [d] {
        return Err(format!("{role} must be [{meaning}] = [{d}], got {}", t.shape));
    }
    Ok(())
}

// ---- broadcasting ----

/// Numpy broadcasting over trailing dims; a dim equal to `Const(1)` stretches.
pub(super) fn broadcast(a: &Shape, b: &Shape) -> Result<Shape, String> {
    let n = a.rank().max(b.rank());
    let one = Dim::Const(1);
    let at = |s: &Shape, i: usize| if i + s.rank() >= n { s.0[i + s.rank() - n] } else { one };
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (da, db) = (at(a, i), at(b, i));
        out.push(match (da, db) {
            _ if da == db => da,
            _ if da == one => db,
            _ if db == one => da,
            _ => return Err(format!("dims {da} and {db} at axis -{} differ and neither is 1", n - i)),
        });
    }
    Ok(Shape(out))
}

fn binary(x: &[&TensorType]) -> Rule {
    let [a, b] = exactly(x, ["lhs", "rhs"])?;
    if a.dtype != b.dtype {
        return Err(format!("lhs dtype {} differs from rhs dtype {} (insert a cast)", a.dtype, b.dtype));
    }
    let shape = broadcast(&a.shape, &b.shape)
        .map_err(|e| format!("lhs {} and rhs {} do not broadcast: {e}", a.shape, b.shape))?;
    Ok(TensorType::new(shape, a.dtype))
}

fn expand(x: &[&TensorType], target: &Shape) -> Rule {
    let [t] = exactly(x, ["input"])?;
    let (r, n) = (t.shape.rank(), target.rank());
    let ok = r <= n && t.shape.dims().iter().zip(&target.0[n - r..]).all(|(&s, &d)| s == d || s == Dim::Const(1));
    if !ok {
        return Err(format!(
            "cannot expand input {} to {target}: each input dim must equal the target's trailing dim or be 1",
            t.shape
        ));
    }
    Ok(TensorType::new(target.clone(), t.dtype))
}

// ---- compound ops ----

fn linear(x: &[&TensorType]) -> Rule {
    let (i, w, b) = with_optional_bias(x)?;
    let mut named = vec![("input", i), ("weight", w)];
    named.extend(b.map(|b| ("bias", b)));
    floats_alike(&named)?;
    let Some(in_dim) = i.shape.last() else {
        return Err("input must have rank >= 1, got a scalar []".into());
    };
    let [out_f, in_f] = *w.shape.dims() else {
        return Err(format!("weight must be [out_features, in_features], got {}", w.shape));
    };
    if in_dim != in_f {
        return Err(format!(
            "input last dim {in_dim} does not match weight in_features {in_f} (input {}, weight {})",
            i.shape, w.shape
        ));
    }
    if let Some(b) = b {
        vector_of("bias", b, out_f, "out_features")?;
    }
    let mut out = i.shape.clone();
    *out.0.last_mut().expect("rank checked above") = out_f;
    Ok(TensorType::new(out, i.dtype))
}

fn matmul(x: &[&TensorType], ta: bool, tb: bool) -> Rule {
    let [a, b] = exactly(x, ["a", "b"])?;
    floats_alike(&[("a", a), ("b", b)])?;
    for (role, t) in [("a", a), ("b", b)] {
        if t.shape.rank() < 2 {
            return Err(format!("{role} must have rank >= 2 ([..., rows, cols]), got {}", t.shape));
        }
    }
    let (ra, rb) = (a.shape.rank(), b.shape.rank());
    let (mut m, mut k) = (a.shape.0[ra - 2], a.shape.0[ra - 1]);
    if ta {
        std::mem::swap(&mut m, &mut k);
    }
    let (mut k2, mut n) = (b.shape.0[rb - 2], b.shape.0[rb - 1]);
    if tb {
        std::mem::swap(&mut k2, &mut n);
    }
    if k != k2 {
        return Err(format!("a's last dim {k} does not match b's row dim {k2} (a {}, b {})", a.shape, b.shape));
    }
    let batch = broadcast(&Shape(a.shape.0[..ra - 2].to_vec()), &Shape(b.shape.0[..rb - 2].to_vec()))
        .map_err(|e| format!("batch dims of a {} and b {} do not broadcast: {e}", a.shape, b.shape))?;
    let mut out = batch.0;
    out.extend([m, n]);
    Ok(TensorType::new(Shape(out), a.dtype))
}

pub(super) fn conv2d(x: &[&TensorType], stride: [u64; 2], padding: [u64; 2]) -> Rule {
    let (i, w, b) = with_optional_bias(x)?;
    let mut named = vec![("input", i), ("weight", w)];
    named.extend(b.map(|b| ("bias", b)));
    floats_alike(&named)?;
    let [n, c, h, wd] = *i.shape.dims() else {
        return Err(format!("input must be [N, C, H, W], got {}", i.shape));
    };
    let [o, wc, kh, kw] = *w.shape.dims() else {
        return Err(format!("weight must be [out_channels, in_channels, kh, kw], got {}", w.shape));
    };
    if c != wc {
        return Err(format!(
            "input channels {c} do not match weight in_channels {wc} (input {}, weight {})",
            i.shape, w.shape
        ));
    }
    if let Some(b) = b {
        vector_of("bias", b, o, "out_channels")?;
    }
    if stride.contains(&0) {
        return Err(format!("stride {stride:?} must be positive"));
    }
    // PyTorch's rule, floor((size + 2p - k) / s) + 1; only N may depend on the batch.
    let out_size = |axis: &str, size: Dim, k: Dim, s: u64, p: u64| -> Result<Dim, String> {
        let (Some(size), Some(k)) = (size.as_const(), k.as_const()) else {
            return Err(format!(
                "{axis} and its kernel size must be constants (input {}, weight {})",
                i.shape, w.shape
            ));
        };
        let padded = size + 2 * p;
        if padded < k {
            return Err(format!("kernel {axis} {k} exceeds padded input {axis} {padded} (input {})", i.shape));
        }
        Ok(Dim::Const((padded - k) / s + 1))
    };
    let oh = out_size("height", h, kh, stride[0], padding[0])?;
    let ow = out_size("width", wd, kw, stride[1], padding[1])?;
    Ok(TensorType::new(Shape(vec![n, o, oh, ow]), i.dtype))
}

pub(super) fn attention(x: &[&TensorType]) -> Rule {
    let [q, k, v] = exactly(x, ["q", "k", "v"])?;
    floats_alike(&[("q", q), ("k", k), ("v", v)])?;
    for (role, t) in [("q", q), ("k", k), ("v", v)] {
        if t.shape.rank() < 3 {
            return Err(format!("{role} must be [..., heads, tokens, head_dim] (rank >= 3), got {}", t.shape));
        }
    }
    let r = q.shape.rank();
    let lead = |t: &TensorType| t.shape.0[..t.shape.rank() - 2].to_vec();
    if lead(k) != lead(q) || lead(v) != lead(q) {
        return Err(format!(
            "q, k and v must share their leading dims [..., heads] (q {}, k {}, v {})",
            q.shape, k.shape, v.shape
        ));
    }
    let (d, nk, dk) = (q.shape.0[r - 1], k.shape.0[r - 2], k.shape.0[r - 1]);
    if dk != d {
        return Err(format!("k head_dim {dk} does not match q head_dim {d} (q {}, k {})", q.shape, k.shape));
    }
    if v.shape.0[r - 2] != nk {
        return Err(format!("v tokens {} do not match k tokens {nk} (k {}, v {})", v.shape.0[r - 2], k.shape, v.shape));
    }
    let mut out = q.shape.clone();
    out.0[r - 1] = v.shape.0[r - 1];
    Ok(TensorType::new(out, q.dtype))
}

/// `qkv [B, N, 3*H*d]` as `AttentionPacked` reads it: its result `[B, N, H*d]`.
pub(super) fn attention_packed(qkv: &TensorType, heads: u64) -> Rule {
    float("qkv", qkv)?;
    let dims = qkv.shape.dims();
    let packed = match dims {
        [_, _, Dim::Const(c)] => *c,
        _ => return Err(format!("qkv must be [batch, tokens, 3 * heads * head_dim], got {}", qkv.shape)),
    };
    if heads == 0 || packed % (3 * heads) != 0 {
        return Err(format!("qkv's last axis {packed} is not 3 x {heads} heads x a head dim"));
    }
    Ok(TensorType::new(Shape(vec![dims[0], dims[1], Dim::Const(packed / 3)]), qkv.dtype))
}

/// `t [..., K]` as the matrix [product of its leading dims, K].
fn rows_of(t: &TensorType) -> Rule {
    match t.shape.as_rows() {
        Some(rows) => Ok(TensorType::new(rows, t.dtype)),
        None if t.shape.rank() == 0 => Err(format!("operand must have rank >= 1, got {}", t.shape)),
        None => Err(format!("cannot flatten {} (batch squared)", t.shape)),
    }
}

fn layer_norm(x: &[&TensorType]) -> Rule {
    let [i, w, b] = exactly(x, ["input", "weight", "bias"])?;
    floats_alike(&[("input", i), ("weight", w), ("bias", b)])?;
    let Some(d) = i.shape.last() else {
        return Err("input must have rank >= 1, got a scalar []".into());
    };
    vector_of("weight", w, d, "normalized dim")?;
    vector_of("bias", b, d, "normalized dim")?;
    Ok(i.clone())
}

fn batch_norm(x: &[&TensorType]) -> Rule {
    let roles = ["input", "weight", "bias", "running_mean", "running_var"];
    let ops = exactly(x, roles)?;
    let named: Vec<_> = roles.into_iter().zip(ops).collect();
    floats_alike(&named)?;
    let i = ops[0];
    if !matches!(i.shape.rank(), 2 | 4) {
        return Err(format!("input must be [N, C] or [N, C, H, W], got {}", i.shape));
    }
    let c = i.shape.0[1];
    for (role, t) in &named[1..] {
        vector_of(role, t, c, "channels")?;
    }
    Ok(i.clone())
}

pub(super) fn cross_entropy(x: &[&TensorType], label_smoothing: f64) -> Rule {
    let [logits, target] = exactly(x, ["logits", "target"])?;
    if !(0.0..=1.0).contains(&label_smoothing) {
        return Err(format!("label_smoothing = {label_smoothing} must be in [0, 1]"));
    }
    float("logits", logits)?;
    let [n, _] = *logits.shape.dims() else {
        return Err(format!("logits must be [N, classes], got {}", logits.shape));
    };
    match target.dtype {
        DType::I64 if target.shape.dims() == [n] => {}
        DType::I64 => return Err(format!("class-index target must be [N] = [{n}] i64, got {target}")),
        dt if dt == logits.dtype && target.shape == logits.shape => {}
        _ => {
            return Err(format!(
                "target must be class indices [{n}] i64 or probabilities shaped like logits ({logits}), got {target}"
            ))
        }
    }
    Ok(TensorType::new(Shape::scalar(), logits.dtype))
}

// ---- reductions and layout ----

fn reduce(x: &[&TensorType], op: ReduceOp, axes: &[usize], keepdim: bool) -> Rule {
    let [t] = exactly(x, ["input"])?;
    if op == ReduceOp::Mean {
        float("input", t)?;
    }
    for (i, &a) in axes.iter().enumerate() {
        check_axis(a, &t.shape)?;
        if axes[..i].contains(&a) {
            return Err(format!("axis {a} is listed twice in axes {axes:?}"));
        }
    }
    let dims = t.shape.dims().iter().enumerate().filter_map(|(i, &d)| match axes.contains(&i) {
        false => Some(d),
        true if keepdim => Some(Dim::Const(1)),
        true => None,
    });
    Ok(TensorType::new(Shape(dims.collect()), t.dtype))
}

/// A shape's element count as `factor * B^power`, so that reshapes can be
/// checked without fixing the batch. `None` on overflow.
fn symbolic_numel(s: &Shape) -> Option<(u32, u64)> {
    s.dims().iter().try_fold((0u32, 1u64), |(p, f), &d| match d {
        Dim::Const(n) => Some((p, f.checked_mul(n)?)),
        Dim::Batch(k) => Some((p + 1, f.checked_mul(k)?)),
    })
}

fn show_numel((power, factor): (u32, u64)) -> String {
    match power {
        0 => factor.to_string(),
        1 => format!("{factor}*B"),
        p => format!("{factor}*B^{p}"),
    }
}

fn reshape(x: &[&TensorType], target: &Shape) -> Rule {
    let [t] = exactly(x, ["input"])?;
    let numel = |s: &Shape| -> Result<(u32, u64), String> {
        match symbolic_numel(s) {
            Some(n) if n.0 <= 1 => Ok(n),
            Some(n) => Err(format!("{s} has {} elements; at most one batch factor is supported", show_numel(n))),
            None => Err(format!("element count of {s} overflows")),
        }
    };
    let (from, to) = (numel(&t.shape)?, numel(target)?);
    if from != to {
        return Err(format!(
            "cannot reshape {} ({} elements) to {target} ({} elements)",
            t.shape,
            show_numel(from),
            show_numel(to)
        ));
    }
    Ok(TensorType::new(target.clone(), t.dtype))
}

fn permute(x: &[&TensorType], perm: &[usize]) -> Rule {
    let [t] = exactly(x, ["input"])?;
    let r = t.shape.rank();
    let mut seen = vec![false; r];
    let is_perm = perm.len() == r && perm.iter().all(|&p| p < r && !std::mem::replace(&mut seen[p], true));
    if !is_perm {
        return Err(format!("perm {perm:?} is not a permutation of 0..{r} for input {}", t.shape));
    }
    Ok(TensorType::new(Shape(perm.iter().map(|&p| t.shape.0[p]).collect()), t.dtype))
}

fn concat(x: &[&TensorType], axis: usize) -> Rule {
    let Some(first) = x.first() else {
        return Err("expects at least 1 operand, got 0".into());
    };
    check_axis(axis, &first.shape)?;
    let mut size = Dim::Const(0);
    for (i, t) in x.iter().enumerate() {
        if t.dtype != first.dtype {
            return Err(format!("operand {i} dtype {} differs from operand 0 dtype {}", t.dtype, first.dtype));
        }
        let same_other_dims = t.shape.rank() == first.shape.rank()
            && (0..t.shape.rank()).all(|d| d == axis || t.shape.0[d] == first.shape.0[d]);
        if !same_other_dims {
            return Err(format!(
                "operand {i} {} does not match operand 0 {} outside axis {axis}",
                t.shape, first.shape
            ));
        }
        size = size.add(t.shape.0[axis]).ok_or_else(|| {
            format!(
                "sizes along axis {axis} mix batch and constant dims ({size} + {}), which has no single Dim",
                t.shape.0[axis]
            )
        })?;
    }
    let mut out = first.shape.clone();
    out.0[axis] = size;
    Ok(TensorType::new(out, first.dtype))
}

/// `a <= b` when the two are comparable: same kind, or `a` is zero.
fn dim_le(a: Dim, b: Dim) -> Option<bool> {
    match (a, b) {
        (Dim::Const(0), _) => Some(true),
        (Dim::Const(x), Dim::Const(y)) | (Dim::Batch(x), Dim::Batch(y)) => Some(x <= y),
        _ => None,
    }
}

fn slice(x: &[&TensorType], axis: usize, start: Dim, end: Dim) -> Rule {
    let [t] = exactly(x, ["input"])?;
    check_axis(axis, &t.shape)?;
    let size = t.shape.0[axis];
    let in_range = dim_le(start, end) == Some(true) && dim_le(end, size) == Some(true);
    let len = end.sub(start).filter(|_| in_range).ok_or_else(|| {
        format!("slice {start}..{end} of axis {axis} (size {size}) is not within 0..{size} for input {}", t.shape)
    })?;
    let mut out = t.shape.clone();
    out.0[axis] = len;
    Ok(TensorType::new(out, t.dtype))
}

// ---- collectives and state ----

fn all_gather(x: &[&TensorType], world: u64) -> Rule {
    check_world(world)?;
    let [t] = exactly(x, ["input"])?;
    let Some(&d0) = t.shape.0.first() else {
        return Err("input must have rank >= 1 to gather along axis 0, got a scalar []".into());
    };
    let mut out = t.shape.clone();
    out.0[0] = d0.mul(Dim::Const(world)).ok_or_else(|| format!("{d0} * {world} overflows"))?;
    Ok(TensorType::new(out, t.dtype))
}

fn zero_diagonal(x: &[&TensorType], world: u64) -> Rule {
    check_world(world)?;
    let t = float_unary(x)?;
    let [n, k] = t.shape.0[..] else { return Err(format!("x must be [N, N * world], got {t}")) };
    if n.mul(Dim::Const(world)) != Some(k) {
        return Err(format!("x must be [N, N * {world}] (rows against every rank's rows), got {t}"));
    }
    Ok(t)
}

fn check_ptr(ptr: &TensorType) -> Result<(), String> {
    if ptr.dtype != DType::I64 || ptr.shape.rank() != 0 {
        return Err(format!("ptr must be an i64 scalar [] i64, got {ptr}"));
    }
    Ok(())
}

/// Checks `queue [E, K]` against `keys [N, E]`; returns K.
fn check_queue_keys(queue: &TensorType, keys: &TensorType, world: u64) -> Result<Dim, String> {
    check_world(world)?;
    floats_alike(&[("queue", queue), ("keys", keys)])?;
    let [e, k] = *queue.shape.dims() else {
        return Err(format!("queue must be [dim, length], got {}", queue.shape));
    };
    let [n, ke] = *keys.shape.dims() else {
        return Err(format!("keys must be [N, dim], got {}", keys.shape));
    };
    if ke != e {
        return Err(format!("keys dim {ke} does not match queue dim {e} (keys {}, queue {})", keys.shape, queue.shape));
    }
    // With a symbolic N this is left to the plan, which fixes the batch.
    if let (Some(n), Some(k)) = (n.as_const(), k.as_const()) {
        if n.saturating_mul(world) > k {
            return Err(format!("{n} keys x {world} ranks do not fit in a queue of length {k}"));
        }
    }
    Ok(k)
}

fn queue_push(x: &[&TensorType], world: u64) -> Rule {
    let [queue, ptr, keys] = exactly(x, ["queue", "ptr", "keys"])?;
    check_ptr(ptr)?;
    check_queue_keys(queue, keys, world)?;
    Ok(queue.clone())
}

fn queue_advance(x: &[&TensorType], world: u64) -> Rule {
    let [ptr, keys, queue] = exactly(x, ["ptr", "keys", "queue"])?;
    check_ptr(ptr)?;
    check_queue_keys(queue, keys, world)?;
    Ok(ptr.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::op::{BinaryOp, UnaryOp};

    /// `"B,197,768"` -> `[B,197,768]`; `2B` is `Batch(2)`; `""` is a scalar.
    fn shape(s: &str) -> Shape {
        let dim = |d: &str| match d.strip_suffix('B') {
            Some("") => Dim::B,
            Some(k) => Dim::Batch(k.parse().unwrap()),
            None => Dim::Const(d.parse().unwrap()),
        };
        Shape(s.split(',').filter(|d| !d.is_empty()).map(dim).collect())
    }
    fn f(s: &str) -> TensorType {
        TensorType::f32(shape(s))
    }
    fn typed(s: &str, dtype: DType) -> TensorType {
        TensorType::new(shape(s), dtype)
    }
    fn ok(op: Op, x: &[TensorType]) -> String {
        let refs: Vec<&TensorType> = x.iter().collect();
        infer(&op, &refs).unwrap_or_else(|e| panic!("{} failed: {e}", op.name())).to_string()
    }
    fn err(op: Op, x: &[TensorType]) -> String {
        let refs: Vec<&TensorType> = x.iter().collect();
        match infer(&op, &refs) {
            Ok(t) => panic!("{} unexpectedly gave {t}", op.name()),
            Err(e) => e,
        }
    }

    #[test]
    fn leaves_have_no_rule() {
        assert_eq!(err(Op::Fill { value: 0.0 }, &[]), "fill is a leaf and has no shape rule");
    }

    #[test]
    fn linear() {
        assert_eq!(ok(Op::Linear, &[f("B,197,768"), f("2304,768"), f("2304")]), "[B,197,2304] f32");
        assert_eq!(ok(Op::Linear, &[f("B,768"), f("1000,768")]), "[B,1000] f32");
        assert_eq!(
            err(Op::Linear, &[f("B,1024"), f("3072,768")]),
            "input last dim 1024 does not match weight in_features 768 (input [B,1024], weight [3072,768])"
        );
        assert_eq!(
            err(Op::Linear, &[f("B,768"), f("3072,768"), f("768")]),
            "bias must be [out_features] = [3072], got [768]"
        );
        assert_eq!(err(Op::Linear, &[f("B,768")]), "expects 2 or 3 operands (input, weight, bias?), got 1");
        assert_eq!(err(Op::Linear, &[f("B,768"), f("768")]), "weight must be [out_features, in_features], got [768]");
        assert_eq!(
            err(Op::Linear, &[f("B,768"), typed("10,768", DType::BF16)]),
            "weight dtype bf16 differs from input dtype f32"
        );
        assert_eq!(
            err(Op::Linear, &[typed("B,768", DType::I64), f("10,768")]),
            "input must be a float tensor, got [B,768] i64"
        );
    }

    #[test]
    fn matmul_broadcasts_batch_dims() {
        assert_eq!(ok(Op::matmul(), &[f("B,12,197,64"), f("B,12,64,197")]), "[B,12,197,197] f32");
        assert_eq!(ok(Op::matmul(), &[f("B,1,5,3"), f("7,3,2")]), "[B,7,5,2] f32");
        assert_eq!(ok(Op::matmul(), &[f("2B,64"), f("64,65536")]), "[2B,65536] f32");
        assert_eq!(
            err(Op::matmul(), &[f("B,4,3"), f("2,5")]),
            "a's last dim 3 does not match b's row dim 2 (a [B,4,3], b [2,5])"
        );
        assert_eq!(
            err(Op::matmul(), &[f("2,4,3"), f("5,3,2")]),
            "batch dims of a [2,4,3] and b [5,3,2] do not broadcast: dims 2 and 5 at axis -1 differ and neither is 1"
        );
        assert_eq!(err(Op::matmul(), &[f("3"), f("3,2")]), "a must have rank >= 2 ([..., rows, cols]), got [3]");
    }

    #[test]
    fn a_matmul_with_an_addend_of_its_type() {
        assert_eq!(ok(Op::matmul(), &[f("B,3,8"), f("8,5"), f("B,3,5")]), "[B,3,5] f32");
        let e = err(Op::matmul(), &[f("B,3,8"), f("8,5"), f("B,3,4")]);
        assert!(e.contains("the addend [B,3,4] f32 must have the product's type [B,3,5] f32"), "{e}");
        // An f32 addend of a bf16 product: the sum is f32 (as the add promoted).
        let bf = |s: &str| TensorType { dtype: DType::BF16, ..f(s) };
        assert_eq!(ok(Op::matmul(), &[bf("B,3,8"), bf("8,5"), f("B,3,5")]), "[B,3,5] f32");
        let e = err(Op::matmul(), &[f("B,3,8"), f("8,5"), bf("B,3,5")]);
        assert!(e.contains("the addend [B,3,5] bf16 must have the product's type [B,3,5] f32"), "{e}");
    }

    #[test]
    fn conv2d() {
        let patch = Op::Conv2d { stride: [16, 16], padding: [0, 0] };
        assert_eq!(ok(patch.clone(), &[f("B,3,224,224"), f("768,3,16,16"), f("768")]), "[B,768,14,14] f32");
        // PyTorch floors: a 3x3 stride-2 stem on 224 gives 112.
        let stem = Op::Conv2d { stride: [2, 2], padding: [1, 1] };
        assert_eq!(ok(stem, &[f("2B,3,224,224"), f("24,3,3,3")]), "[2B,24,112,112] f32");
        assert_eq!(
            err(patch.clone(), &[f("B,4,224,224"), f("768,3,16,16")]),
            "input channels 4 do not match weight in_channels 3 (input [B,4,224,224], weight [768,3,16,16])"
        );
        assert_eq!(err(patch.clone(), &[f("B,3,224"), f("768,3,16,16")]), "input must be [N, C, H, W], got [B,3,224]");
        assert_eq!(
            err(patch.clone(), &[f("3,3,B,224"), f("768,3,16,16")]),
            "height and its kernel size must be constants (input [3,3,B,224], weight [768,3,16,16])"
        );
        assert_eq!(
            err(patch, &[f("B,3,8,8"), f("768,3,16,16")]),
            "kernel height 16 exceeds padded input height 8 (input [B,3,8,8])"
        );
        let zero = Op::Conv2d { stride: [0, 1], padding: [0, 0] };
        assert_eq!(err(zero, &[f("B,3,8,8"), f("4,3,1,1")]), "stride [0, 1] must be positive");
    }

    #[test]
    fn attention() {
        let op = || Op::Attention { scale: 0.125, dropout: 0.0, key: 0 };
        assert_eq!(ok(op(), &[f("B,12,197,64"), f("B,12,50,64"), f("B,12,50,32")]), "[B,12,197,32] f32");
        assert_eq!(
            err(op(), &[f("B,12,197,64"), f("B,12,197,32"), f("B,12,197,64")]),
            "k head_dim 32 does not match q head_dim 64 (q [B,12,197,64], k [B,12,197,32])"
        );
        assert_eq!(
            err(op(), &[f("B,12,197,64"), f("B,12,197,64"), f("B,12,196,64")]),
            "v tokens 196 do not match k tokens 197 (k [B,12,197,64], v [B,12,196,64])"
        );
        assert_eq!(
            err(op(), &[f("B,12,197,64"), f("B,6,197,64"), f("B,6,197,64")]),
            "q, k and v must share their leading dims [..., heads] (q [B,12,197,64], k [B,6,197,64], v [B,6,197,64])"
        );
        assert_eq!(
            err(op(), &[f("197,64"), f("197,64"), f("197,64")]),
            "q must be [..., heads, tokens, head_dim] (rank >= 3), got [197,64]"
        );
        assert_eq!(err(op(), &[f("B,1,2,3")]), "expects 3 operands (q, k, v), got 1");
        let p1 = Op::Attention { scale: 1.0, dropout: 1.0, key: 0 };
        assert_eq!(err(p1, &[f("B,1,2,3"), f("B,1,2,3"), f("B,1,2,3")]), "dropout = 1 must be in [0, 1)");
    }

    #[test]
    fn layer_norm_and_batch_norm() {
        let ln = || Op::LayerNorm { eps: 1e-6 };
        assert_eq!(ok(ln(), &[f("B,197,768"), f("768"), f("768")]), "[B,197,768] f32");
        assert_eq!(
            err(ln(), &[f("B,197,768"), f("384"), f("768")]),
            "weight must be [normalized dim] = [768], got [384]"
        );
        let bn = || Op::BatchNorm { eps: 1e-5, momentum: 0.1 };
        let stats = [f("256"), f("256"), f("256"), f("256")];
        let mut x = vec![f("2B,256")];
        x.extend(stats.clone());
        assert_eq!(ok(bn(), &x), "[2B,256] f32");
        x[0] = f("B,256,7,7");
        assert_eq!(ok(bn(), &x), "[B,256,7,7] f32");
        x[0] = f("B,197,256");
        assert_eq!(err(bn(), &x), "input must be [N, C] or [N, C, H, W], got [B,197,256]");
        x[0] = f("B,256");
        x[4] = f("128");
        assert_eq!(err(bn(), &x), "running_var must be [channels] = [256], got [128]");
        assert_eq!(err(bn(), &x[..3]), "expects 5 operands (input, weight, bias, running_mean, running_var), got 3");
    }

    #[test]
    fn cross_entropy() {
        let ce = || Op::CrossEntropy { label_smoothing: 0.1 };
        assert_eq!(ok(ce(), &[f("B,1000"), typed("B", DType::I64)]), "[] f32");
        assert_eq!(ok(ce(), &[f("2B,65536"), f("2B,65536")]), "[] f32");
        assert_eq!(
            err(ce(), &[f("B,1000"), typed("2B", DType::I64)]),
            "class-index target must be [N] = [B] i64, got [2B] i64"
        );
        assert_eq!(
            err(ce(), &[f("B,1000"), f("B")]),
            "target must be class indices [B] i64 or probabilities shaped like logits ([B,1000] f32), got [B] f32"
        );
        assert_eq!(
            err(ce(), &[f("B,197,1000"), typed("B", DType::I64)]),
            "logits must be [N, classes], got [B,197,1000]"
        );
        let bad = Op::CrossEntropy { label_smoothing: 1.5 };
        assert_eq!(err(bad, &[f("B,10"), typed("B", DType::I64)]), "label_smoothing = 1.5 must be in [0, 1]");
        assert_eq!(err(ce(), &[f("B,10")]), "expects 2 operands (logits, target), got 1");
    }

    #[test]
    fn elementwise() {
        for op in [
            Op::Unary(UnaryOp::Gelu),
            Op::Scale { factor: 0.5 },
            Op::AddScalar { value: 1.0 },
            Op::PowScalar { exponent: 2.0 },
        ] {
            assert_eq!(ok(op.clone(), &[typed("B,197,768", DType::BF16)]), "[B,197,768] bf16");
            assert_eq!(err(op, &[typed("B", DType::I64)]), "input must be a float tensor, got [B] i64");
        }
        assert_eq!(err(Op::Unary(UnaryOp::Exp), &[f("B"), f("B")]), "expects 1 operand (input), got 2");
        assert_eq!(ok(Op::Dropout { p: 0.1, key: 0 }, &[f("B,197,768")]), "[B,197,768] f32");
        assert_eq!(err(Op::Dropout { p: -0.1, key: 0 }, &[f("B")]), "p = -0.1 must be in [0, 1)");
        assert_eq!(ok(Op::DropPath { p: 0.1, key: 0 }, &[f("B,197,768")]), "[B,197,768] f32");
        assert_eq!(
            err(Op::DropPath { p: 0.1, key: 0 }, &[f("")]),
            "input must have a sample axis (rank >= 1), got a scalar []"
        );
        assert_eq!(ok(Op::Cast { dtype: DType::BF16 }, &[f("B,3")]), "[B,3] bf16");
        assert_eq!(err(Op::Cast { dtype: DType::BF16 }, &[]), "expects 1 operand (input), got 0");
        assert_eq!(ok(Op::StopGradient, &[typed("", DType::I64)]), "[] i64");
        assert_eq!(err(Op::StopGradient, &[]), "expects 1 operand (input), got 0");
    }

    #[test]
    fn axis_ops() {
        for op in [Op::Softmax { axis: 2 }, Op::LogSoftmax { axis: 2 }, Op::L2Normalize { axis: 2, eps: 1e-12 }] {
            assert_eq!(ok(op.clone(), &[f("B,12,197")]), "[B,12,197] f32");
            assert_eq!(err(op, &[f("B,12")]), "axis 2 is out of range for input [B,12] (rank 2)");
        }
    }

    #[test]
    fn binary_broadcasts() {
        let add = || Op::Binary(BinaryOp::Add);
        assert_eq!(ok(add(), &[f("B,197,768"), f("1,197,768")]), "[B,197,768] f32");
        assert_eq!(ok(add(), &[f("B,1,1"), f("197,768")]), "[B,197,768] f32");
        assert_eq!(ok(Op::Binary(BinaryOp::Mul), &[f("B,1"), f("")]), "[B,1] f32");
        assert_eq!(ok(Op::Binary(BinaryOp::Sub), &[typed("", DType::I64), typed("", DType::I64)]), "[] i64");
        assert_eq!(
            err(add(), &[f("B,197,768"), f("B,196,768")]),
            "lhs [B,197,768] and rhs [B,196,768] do not broadcast: dims 197 and 196 at axis -2 differ and neither is 1"
        );
        assert_eq!(
            err(add(), &[f("B,4"), f("2B,4")]),
            "lhs [B,4] and rhs [2B,4] do not broadcast: dims B and 2B at axis -2 differ and neither is 1"
        );
        assert_eq!(
            err(add(), &[f("B"), typed("B", DType::BF16)]),
            "lhs dtype f32 differs from rhs dtype bf16 (insert a cast)"
        );
    }

    #[test]
    fn reduce() {
        let r = |axes: Vec<usize>, keepdim| Op::Reduce { op: ReduceOp::Mean, axes, keepdim };
        assert_eq!(ok(r(vec![1], false), &[f("B,197,768")]), "[B,768] f32");
        assert_eq!(ok(r(vec![2, 0], true), &[f("B,197,768")]), "[1,197,1] f32");
        assert_eq!(ok(r(vec![0], false), &[f("B")]), "[] f32");
        assert_eq!(err(r(vec![1, 1], false), &[f("B,3")]), "axis 1 is listed twice in axes [1, 1]");
        assert_eq!(err(r(vec![3], false), &[f("B,3")]), "axis 3 is out of range for input [B,3] (rank 2)");
        // No axes reduces nothing (the elaborator's "all axes" of a scalar).
        assert_eq!(ok(r(vec![], false), &[f("")]), "[] f32");
        assert_eq!(err(r(vec![0], false), &[typed("B", DType::I64)]), "input must be a float tensor, got [B] i64");
        let sum = Op::Reduce { op: ReduceOp::Sum, axes: vec![0], keepdim: false };
        assert_eq!(ok(sum, &[typed("B", DType::I64)]), "[] i64");
    }

    #[test]
    fn reshape_compares_symbolic_element_counts() {
        let to = |s: &str| Op::Reshape { shape: shape(s) };
        assert_eq!(ok(to("B,197,12,64"), &[f("B,197,768")]), "[B,197,12,64] f32");
        assert_eq!(ok(to("197B,768"), &[f("B,197,768")]), "[197B,768] f32");
        assert_eq!(ok(to("B,2,64"), &[f("2B,64")]), "[B,2,64] f32");
        assert_eq!(ok(to("6,4"), &[f("2,3,4")]), "[6,4] f32");
        assert_eq!(
            err(to("B,197,769"), &[f("B,197,768")]),
            "cannot reshape [B,197,768] (151296*B elements) to [B,197,769] (151493*B elements)"
        );
        assert_eq!(err(to("B,64"), &[f("2B,64")]), "cannot reshape [2B,64] (128*B elements) to [B,64] (64*B elements)");
        assert_eq!(err(to("768"), &[f("B,768")]), "cannot reshape [B,768] (768*B elements) to [768] (768 elements)");
        assert_eq!(err(to("B,B"), &[f("B,B")]), "[B,B] has 1*B^2 elements; at most one batch factor is supported");
    }

    #[test]
    fn permute() {
        let p = |perm: Vec<usize>| Op::Permute { perm };
        assert_eq!(ok(p(vec![2, 0, 3, 1, 4]), &[f("B,197,3,12,64")]), "[3,B,12,197,64] f32");
        assert_eq!(
            err(p(vec![0, 0, 1]), &[f("B,2,3")]),
            "perm [0, 0, 1] is not a permutation of 0..3 for input [B,2,3]"
        );
        assert_eq!(
            err(p(vec![0, 3, 1]), &[f("B,2,3")]),
            "perm [0, 3, 1] is not a permutation of 0..3 for input [B,2,3]"
        );
        assert_eq!(err(p(vec![1, 0]), &[f("B,2,3")]), "perm [1, 0] is not a permutation of 0..3 for input [B,2,3]");
    }

    #[test]
    fn concat() {
        let c = |axis| Op::Concat { axis };
        assert_eq!(ok(c(1), &[f("B,1,768"), f("B,196,768")]), "[B,197,768] f32");
        assert_eq!(ok(c(0), &[f("B,3"), f("B,3")]), "[2B,3] f32");
        assert_eq!(ok(c(0), &[f("B,3")]), "[B,3] f32");
        assert_eq!(err(c(0), &[]), "expects at least 1 operand, got 0");
        assert_eq!(
            err(c(1), &[f("B,1,768"), f("B,196,384")]),
            "operand 1 [B,196,384] does not match operand 0 [B,1,768] outside axis 1"
        );
        assert_eq!(
            err(c(0), &[f("B,3"), f("1,3")]),
            "sizes along axis 0 mix batch and constant dims (B + 1), which has no single Dim"
        );
        assert_eq!(
            err(c(0), &[f("B,3"), typed("B,3", DType::BF16)]),
            "operand 1 dtype bf16 differs from operand 0 dtype f32"
        );
        assert_eq!(err(c(2), &[f("B,3")]), "axis 2 is out of range for input [B,3] (rank 2)");
    }

    #[test]
    fn slice() {
        let s = |axis, start, end| Op::Slice { axis, start, end };
        let c = Dim::Const;
        assert_eq!(ok(s(1, c(0), c(1)), &[f("B,197,768")]), "[B,1,768] f32");
        assert_eq!(ok(s(1, c(1), c(197)), &[f("B,197,768")]), "[B,196,768] f32");
        assert_eq!(ok(s(0, Dim::B, Dim::Batch(2)), &[f("2B,64")]), "[B,64] f32");
        assert_eq!(ok(s(0, c(0), Dim::B), &[f("2B,64")]), "[B,64] f32");
        assert_eq!(
            err(s(1, c(1), c(198)), &[f("B,197")]),
            "slice 1..198 of axis 1 (size 197) is not within 0..197 for input [B,197]"
        );
        assert_eq!(
            err(s(1, c(5), c(2)), &[f("B,197")]),
            "slice 5..2 of axis 1 (size 197) is not within 0..197 for input [B,197]"
        );
        assert_eq!(
            err(s(0, c(1), Dim::B), &[f("2B")]),
            "slice 1..B of axis 0 (size 2B) is not within 0..2B for input [2B]"
        );
        assert_eq!(err(s(0, c(0), c(4)), &[f("B")]), "slice 0..4 of axis 0 (size B) is not within 0..B for input [B]");
        assert_eq!(err(s(2, c(0), c(1)), &[f("B,3")]), "axis 2 is out of range for input [B,3] (rank 2)");
    }

    #[test]
    fn expand() {
        let e = |s: &str| Op::Expand { shape: shape(s) };
        assert_eq!(ok(e("B,1,768"), &[f("1,1,768")]), "[B,1,768] f32");
        assert_eq!(ok(e("B,12,197,197"), &[f("197,197")]), "[B,12,197,197] f32");
        assert_eq!(
            err(e("B,2,768"), &[f("1,3,768")]),
            "cannot expand input [1,3,768] to [B,2,768]: each input dim must equal the target's trailing dim or be 1"
        );
        assert_eq!(
            err(e("768"), &[f("1,768")]),
            "cannot expand input [1,768] to [768]: each input dim must equal the target's trailing dim or be 1"
        );
    }

    #[test]
    fn collectives() {
        assert_eq!(ok(Op::ZeroDiagonal { world: 1 }, &[f("2B,2B")]), "[2B,2B] f32");
        assert_eq!(ok(Op::ZeroDiagonal { world: 4 }, &[f("2B,8B")]), "[2B,8B] f32");
        assert_eq!(
            err(Op::ZeroDiagonal { world: 2 }, &[f("B,B")]),
            "x must be [N, N * 2] (rows against every rank's rows), got [B,B] f32"
        );
        assert_eq!(ok(Op::AllGather { world: 8 }, &[f("B,256")]), "[8B,256] f32");
        assert_eq!(ok(Op::AllGather { world: 2 }, &[f("3")]), "[6] f32");
        assert_eq!(
            err(Op::AllGather { world: 8 }, &[f("")]),
            "input must have rank >= 1 to gather along axis 0, got a scalar []"
        );
        assert_eq!(err(Op::AllGather { world: 0 }, &[f("B")]), "world size must be at least 1");
        let mean = |world| Op::AllReduce { op: ReduceOp::Mean, world };
        assert_eq!(ok(mean(4), &[f("1,3000")]), "[1,3000] f32");
        assert_eq!(err(mean(4), &[typed("3", DType::I64)]), "input must be a float tensor, got [3] i64");
        assert_eq!(err(mean(0), &[f("3")]), "world size must be at least 1");
    }

    #[test]
    fn queues() {
        let ptr = typed("", DType::I64);
        let push = |world| Op::QueuePush { world };
        let adv = |world| Op::QueueAdvance { world };
        assert_eq!(ok(push(2), &[f("128,65536"), ptr.clone(), f("B,128")]), "[128,65536] f32");
        assert_eq!(ok(adv(2), &[ptr.clone(), f("B,128"), f("128,65536")]), "[] i64");
        assert_eq!(
            err(push(1), &[f("128,65536"), typed("1", DType::I64), f("B,128")]),
            "ptr must be an i64 scalar [] i64, got [1] i64"
        );
        assert_eq!(err(push(1), &[f("128,65536"), f(""), f("B,128")]), "ptr must be an i64 scalar [] i64, got [] f32");
        assert_eq!(
            err(push(1), &[f("128,65536"), ptr.clone(), f("B,256")]),
            "keys dim 256 does not match queue dim 128 (keys [B,256], queue [128,65536])"
        );
        assert_eq!(
            err(adv(4), &[ptr.clone(), f("32,128"), f("128,100")]),
            "32 keys x 4 ranks do not fit in a queue of length 100"
        );
        assert_eq!(err(adv(1), &[ptr.clone(), f("B,128,1"), f("128,100")]), "keys must be [N, dim], got [B,128,1]");
        assert_eq!(err(adv(1), &[f("B,128"), f("128,100")]), "expects 3 operands (ptr, keys, queue), got 2");
        assert_eq!(err(push(1), &[f("128"), ptr, f("B,128")]), "queue must be [dim, length], got [128]");
    }
}
