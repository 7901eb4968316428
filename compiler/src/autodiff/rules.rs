//! Gradient rules: for each op, the gradients of its operands given the
//! gradient `dy` of its output, written as IR ops. A rule returns `None` for
//! an operand that takes no gradient (targets, indices, stop_gradient).

use crate::ir::{BinaryOp, Dim, Graph, IrError, Op, ReduceOp, Shape, UnaryOp, ValueId};

type R<T> = Result<T, IrError>;

/// Builds gradient ops in one scope (the forward op's scope, so a reader of
/// the IR sees which module a backward op belongs to).
pub(super) struct Builder<'g> {
    pub g: &'g mut Graph,
    pub scope: String,
}

impl Builder<'_> {
    pub fn op(&mut self, op: Op, xs: &[ValueId]) -> R<ValueId> {
        self.g.add_op(op, xs, &self.scope)
    }
    fn shape(&self, v: ValueId) -> Shape {
        self.g.ty(v).shape.clone()
    }
    fn un(&mut self, u: UnaryOp, x: ValueId) -> R<ValueId> {
        self.op(Op::Unary(u), &[x])
    }
    pub fn bin(&mut self, b: BinaryOp, x: ValueId, y: ValueId) -> R<ValueId> {
        self.op(Op::Binary(b), &[x, y])
    }
    pub fn scale(&mut self, x: ValueId, factor: f64) -> R<ValueId> {
        self.op(Op::Scale { factor }, &[x])
    }
    fn sum(&mut self, x: ValueId, axes: Vec<usize>, keepdim: bool) -> R<ValueId> {
        self.op(Op::Reduce { op: ReduceOp::Sum, axes, keepdim }, &[x])
    }
    fn reshape(&mut self, x: ValueId, shape: Shape) -> R<ValueId> {
        if self.shape(x) == shape {
            return Ok(x);
        }
        self.op(Op::Reshape { shape }, &[x])
    }
    /// Sums a broadcast gradient back to `target` (numpy broadcasting in reverse).
    pub fn sum_to(&mut self, grad: ValueId, target: &Shape) -> R<ValueId> {
        let gs = self.shape(grad);
        if &gs == target {
            return Ok(grad);
        }
        let lead = gs.rank() - target.rank();
        let mut axes: Vec<usize> = (0..lead).collect();
        for (i, d) in target.0.iter().enumerate() {
            if *d == Dim::Const(1) && gs.0[lead + i] != Dim::Const(1) {
                axes.push(lead + i);
            }
        }
        let summed = if axes.is_empty() { grad } else { self.sum(grad, axes, true)? };
        self.reshape(summed, target.clone())
    }

    /// Broadcasts `dy` (the result of reducing `axes` of a tensor of `shape`)
    /// back to `shape`.
    fn unreduce(&mut self, dy: ValueId, shape: &Shape, axes: &[usize]) -> R<ValueId> {
        let kept = Shape(
            shape.0.iter().enumerate().map(|(i, d)| if axes.contains(&i) { Dim::Const(1) } else { *d }).collect(),
        );
        let r = self.reshape(dy, kept)?;
        self.op(Op::Expand { shape: shape.clone() }, &[r])
    }

    /// Flattens all but the last axis: [..., n] -> [M, n].
    fn rows(&mut self, x: ValueId) -> R<ValueId> {
        let s = self.shape(x);
        let last = *s.0.last().ok_or_else(|| IrError::Invalid("linear on a scalar".into()))?;
        let mut m = Dim::Const(1);
        for d in &s.0[..s.rank() - 1] {
            m = m.mul(*d).ok_or_else(|| IrError::Invalid(format!("cannot flatten {s}")))?;
        }
        self.reshape(x, Shape(vec![m, last]))
    }
}

/// Gradients of the operands of node `v` (with operands `xs`) given `dy`.
pub(super) fn grads(b: &mut Builder, v: ValueId, xs: &[ValueId], dy: ValueId) -> R<Vec<Option<ValueId>>> {
    let op = b.g.node(v).op.clone();
    let shape_of = |b: &Builder, i: usize| b.g.ty(xs[i]).shape.clone();
    let no_rule = |op: &Op| {
        IrError::Invalid(format!(
            "`{}` has no gradient rule; it cannot lie between a parameter and the loss",
            op.name()
        ))
    };
    Ok(match op {
        Op::Input { .. } | Op::Param { .. } | Op::Buffer { .. } | Op::Fill { .. } => vec![],
        Op::StopGradient | Op::AllReduce { .. } | Op::QueuePush { .. } | Op::QueueAdvance { .. } => {
            vec![None; xs.len()]
        }
        // The masked entries are constants: their gradient is zero too.
        Op::ZeroDiagonal { world } => vec![Some(b.op(Op::ZeroDiagonal { world }, &[dy])?)],
        Op::Linear => {
            // y = x W^T + b: dx = dy W, dW = dy^T x (rows flattened), db = sum of dy rows.
            let dx = b.op(Op::matmul(), &[dy, xs[1]])?;
            let (dy2, x2) = (b.rows(dy)?, b.rows(xs[0])?);
            let dw = b.op(Op::Matmul { transpose_a: true, transpose_b: false }, &[dy2, x2])?;
            let mut out = vec![Some(dx), Some(dw)];
            if xs.len() == 3 {
                let r = b.shape(dy).rank();
                out.push(Some(b.sum(dy, (0..r - 1).collect(), false)?));
            }
            out
        }
        Op::Matmul { transpose_a: ta, transpose_b: tb } => {
            // C = A' B' with A' = A^T if ta, B' = B^T if tb: dA' = dC B'^T, dB' = A'^T dC,
            // and a transposed operand takes the transpose of its gradient. Transposes
            // are flags on the products, never copies.
            let da = if ta {
                b.op(Op::Matmul { transpose_a: tb, transpose_b: true }, &[xs[1], dy])?
            } else {
                b.op(Op::Matmul { transpose_a: false, transpose_b: !tb }, &[dy, xs[1]])?
            };
            let db = if tb {
                b.op(Op::Matmul { transpose_a: true, transpose_b: ta }, &[dy, xs[0]])?
            } else {
                b.op(Op::Matmul { transpose_a: !ta, transpose_b: false }, &[xs[0], dy])?
            };
            let (sa, sb) = (shape_of(b, 0), shape_of(b, 1));
            vec![Some(b.sum_to(da, &sa)?), Some(b.sum_to(db, &sb)?)]
        }
        Op::Conv2d { stride, padding } => {
            let (xsh, wsh) = (shape_of(b, 0), shape_of(b, 1));
            let hw = |s: &Shape, i: usize| s.0[i].as_const().unwrap_or(0);
            let dx =
                b.op(Op::Conv2dGradInput { stride, padding, input_hw: [hw(&xsh, 2), hw(&xsh, 3)] }, &[dy, xs[1]])?;
            let dw =
                b.op(Op::Conv2dGradWeight { stride, padding, kernel: [hw(&wsh, 2), hw(&wsh, 3)] }, &[dy, xs[0]])?;
            let mut out = vec![Some(dx), Some(dw)];
            if xs.len() == 3 {
                out.push(Some(b.sum(dy, vec![0, 2, 3], false)?));
            }
            out
        }
        Op::Attention { scale, dropout, key } => attention(b, xs, dy, scale, dropout, key)?,
        Op::LayerNorm { eps } => {
            // y = xhat * w + b (reference 1.3): dx = NormalizeGrad(dy * w, x),
            // dy * w formed as the kernel reads dy (one pass, no dy * w stored).
            let r = shape_of(b, 0).rank();
            // dw = sum over rows of dy * xhat in one pass (no xhat stored).
            let dx = b.op(Op::NormalizeGrad { eps }, &[dy, xs[0], xs[1]])?;
            let dw = b.op(Op::LayerNormWeightGrad { eps }, &[dy, xs[0]])?;
            let db = b.sum(dy, (0..r - 1).collect(), false)?;
            vec![Some(dx), Some(dw), Some(db)]
        }
        Op::BatchNorm { eps, .. } => {
            // Training mode: batch statistics over every axis but the channels (1).
            let xsh = shape_of(b, 0);
            let per_channel = Shape(
                xsh.0.iter().enumerate().map(|(i, d)| if i == 1 { *d } else { Dim::Const(1) }).collect::<Vec<_>>()[1..]
                    .to_vec(),
            );
            let w = b.reshape(xs[1], per_channel)?;
            let gw = b.bin(BinaryOp::Mul, dy, w)?;
            let dx = b.op(Op::BatchStandardizeGrad { eps }, &[gw, xs[0]])?;
            let xhat = b.op(Op::BatchStandardize { eps }, &[xs[0]])?;
            let prod = b.bin(BinaryOp::Mul, dy, xhat)?;
            let axes: Vec<usize> = (0..xsh.rank()).filter(|&i| i != 1).collect();
            let dw = b.sum(prod, axes.clone(), false)?;
            let db = b.sum(dy, axes, false)?;
            vec![Some(dx), Some(dw), Some(db), None, None]
        }
        Op::CrossEntropy { label_smoothing } => {
            vec![Some(b.op(Op::CrossEntropyGrad { label_smoothing }, &[xs[0], xs[1], dy])?), None]
        }
        Op::Unary(u) => vec![Some(unary(b, u, v, xs[0], dy)?)],
        Op::Binary(op) => {
            let (sa, sb) = (shape_of(b, 0), shape_of(b, 1));
            let (da, db) = match op {
                BinaryOp::Add => (dy, dy),
                BinaryOp::Sub => (dy, b.un(UnaryOp::Neg, dy)?),
                BinaryOp::Mul => (b.bin(BinaryOp::Mul, dy, xs[1])?, b.bin(BinaryOp::Mul, dy, xs[0])?),
                BinaryOp::Div => {
                    // d(a/b)/db = -(a/b)/b
                    let da = b.bin(BinaryOp::Div, dy, xs[1])?;
                    let t = b.bin(BinaryOp::Mul, da, v)?;
                    (da, b.un(UnaryOp::Neg, t)?)
                }
                BinaryOp::Max | BinaryOp::Min => return Err(no_rule(&Op::Binary(op))),
            };
            vec![Some(b.sum_to(da, &sa)?), Some(b.sum_to(db, &sb)?)]
        }
        Op::Scale { factor } => vec![Some(b.scale(dy, factor)?)],
        Op::AddScalar { .. } => vec![Some(dy)],
        Op::PowScalar { exponent } => {
            let p = b.op(Op::PowScalar { exponent: exponent - 1.0 }, &[xs[0]])?;
            let t = b.bin(BinaryOp::Mul, dy, p)?;
            vec![Some(b.scale(t, exponent)?)]
        }
        Op::Softmax { axis } => {
            // dx = y * (dy - sum(dy * y))
            let dyy = b.bin(BinaryOp::Mul, dy, v)?;
            let s = b.sum(dyy, vec![axis], true)?;
            let d = b.bin(BinaryOp::Sub, dy, s)?;
            vec![Some(b.bin(BinaryOp::Mul, v, d)?)]
        }
        Op::LogSoftmax { axis } => {
            // dx = dy - softmax * sum(dy)
            let s = b.sum(dy, vec![axis], true)?;
            let p = b.un(UnaryOp::Exp, v)?;
            let t = b.bin(BinaryOp::Mul, p, s)?;
            vec![Some(b.bin(BinaryOp::Sub, dy, t)?)]
        }
        Op::L2Normalize { axis, .. } => {
            // y = x / ||x||: dx = (dy - y * sum(dy * y)) / ||x|| (the eps clamp only
            // matters for near-zero vectors, whose gradient we leave unclamped).
            let dyy = b.bin(BinaryOp::Mul, dy, v)?;
            let s = b.sum(dyy, vec![axis], true)?;
            let ys = b.bin(BinaryOp::Mul, v, s)?;
            let num = b.bin(BinaryOp::Sub, dy, ys)?;
            let sq = b.un(UnaryOp::Square, xs[0])?;
            let ss = b.sum(sq, vec![axis], true)?;
            let norm = b.un(UnaryOp::Sqrt, ss)?;
            vec![Some(b.bin(BinaryOp::Div, num, norm)?)]
        }
        // The same key at the same step draws the same mask, so the op applied
        // to dy is its own gradient.
        Op::Dropout { p, key } => vec![Some(b.op(Op::Dropout { p, key }, &[dy])?)],
        Op::DropPath { p, key } => vec![Some(b.op(Op::DropPath { p, key }, &[dy])?)],
        Op::Cast { .. } => {
            let dtype = b.g.ty(xs[0]).dtype;
            vec![Some(b.op(Op::Cast { dtype }, &[dy])?)]
        }
        Op::Reduce { op: ReduceOp::Sum, axes, keepdim: _ } => {
            let s = shape_of(b, 0);
            vec![Some(b.unreduce(dy, &s, &axes)?)]
        }
        Op::Reduce { op: ReduceOp::Mean, axes, keepdim: _ } => {
            let s = shape_of(b, 0);
            let mut count = Dim::Const(1);
            for &a in &axes {
                count = count.mul(s.0[a]).ok_or_else(|| IrError::Invalid(format!("mean over {s} counts B twice")))?;
            }
            let e = b.unreduce(dy, &s, &axes)?;
            vec![Some(b.op(Op::DivCount { count }, &[e])?)]
        }
        Op::Reshape { .. } => {
            let s = shape_of(b, 0);
            vec![Some(b.reshape(dy, s)?)]
        }
        Op::Permute { perm } => {
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            vec![Some(b.op(Op::Permute { perm: inv }, &[dy])?)]
        }
        Op::Concat { axis } => {
            let mut start = Dim::Const(0);
            let mut out = Vec::new();
            for i in 0..xs.len() {
                let size = shape_of(b, i).0[axis];
                let end = start.add(size).ok_or_else(|| IrError::Invalid("concat sizes mix B and constants".into()))?;
                out.push(Some(b.op(Op::Slice { axis, start, end }, &[dy])?));
                start = end;
            }
            out
        }
        Op::Slice { axis, start, end } => {
            let full = shape_of(b, 0).0[axis];
            let after = full.sub(end).ok_or_else(|| IrError::Invalid("slice end past its dim".into()))?;
            vec![Some(b.op(Op::Pad { axis, before: start, after }, &[dy])?)]
        }
        Op::Expand { .. } => {
            let s = shape_of(b, 0);
            vec![Some(b.sum_to(dy, &s)?)]
        }
        Op::AllGather { world } => vec![Some(b.op(Op::AllGatherGrad { world }, &[dy])?)],
        ref other => return Err(no_rule(other)),
    })
}

fn unary(b: &mut Builder, u: UnaryOp, y: ValueId, x: ValueId, dy: ValueId) -> R<ValueId> {
    Ok(match u {
        UnaryOp::Gelu => b.op(Op::GeluGrad, &[x, dy])?,
        UnaryOp::Relu => {
            let step = b.un(UnaryOp::Heaviside, x)?;
            b.bin(BinaryOp::Mul, dy, step)?
        }
        UnaryOp::Tanh => {
            // 1 - y^2
            let y2 = b.un(UnaryOp::Square, y)?;
            let n = b.un(UnaryOp::Neg, y2)?;
            let d = b.op(Op::AddScalar { value: 1.0 }, &[n])?;
            b.bin(BinaryOp::Mul, dy, d)?
        }
        UnaryOp::Sigmoid => {
            // y (1 - y)
            let n = b.un(UnaryOp::Neg, y)?;
            let one_minus = b.op(Op::AddScalar { value: 1.0 }, &[n])?;
            let d = b.bin(BinaryOp::Mul, y, one_minus)?;
            b.bin(BinaryOp::Mul, dy, d)?
        }
        UnaryOp::Exp => b.bin(BinaryOp::Mul, dy, y)?,
        UnaryOp::Log => b.bin(BinaryOp::Div, dy, x)?,
        UnaryOp::Neg => b.un(UnaryOp::Neg, dy)?,
        UnaryOp::Sqrt => {
            let q = b.bin(BinaryOp::Div, dy, y)?;
            b.scale(q, 0.5)?
        }
        UnaryOp::Recip => {
            let y2 = b.un(UnaryOp::Square, y)?;
            let t = b.bin(BinaryOp::Mul, dy, y2)?;
            b.un(UnaryOp::Neg, t)?
        }
        UnaryOp::Square => {
            let t = b.bin(BinaryOp::Mul, dy, x)?;
            b.scale(t, 2.0)?
        }
        UnaryOp::Heaviside => {
            return Err(IrError::Invalid("heaviside has no gradient rule".into()));
        }
    })
}

/// Attention's backward, recomputing the probabilities (FlashAttention-style:
/// nothing of size N x N is kept from the forward pass). With dropout the same
/// key redraws the forward's mask.
fn attention(b: &mut Builder, xs: &[ValueId], d_out: ValueId, scale: f64, p: f64, key: u32) -> R<Vec<Option<ValueId>>> {
    let (q, k, v) = (xs[0], xs[1], xs[2]);
    let sq = b.shape(q);
    if b.shape(k) == sq && b.shape(v) == sq {
        // Self-attention: one kernel per head for all three gradients,
        // stacked (a split qkv's gradient is then the stack itself, see `gather`).
        let stacked = b.op(Op::AttentionGrad { scale, dropout: p, key }, &[q, k, v, d_out])?;
        let mut out = Vec::with_capacity(3);
        for i in 0..3 {
            let part = b.op(Op::Slice { axis: 0, start: Dim::Const(i), end: Dim::Const(i + 1) }, &[stacked])?;
            out.push(Some(b.reshape(part, sq.clone())?));
        }
        return Ok(out);
    }
    let nt = |ta, tb| Op::Matmul { transpose_a: ta, transpose_b: tb };
    let s = b.op(nt(false, true), &[q, k])?;
    let s = b.scale(s, scale)?;
    let r = b.g.ty(s).shape.rank();
    let probs = b.op(Op::Softmax { axis: r - 1 }, &[s])?;
    let dropped = if p > 0.0 { b.op(Op::Dropout { p, key }, &[probs])? } else { probs };
    let dv = b.op(nt(true, false), &[dropped, d_out])?;
    let d_dropped = b.op(nt(false, true), &[d_out, v])?;
    let d_probs = if p > 0.0 { b.op(Op::Dropout { p, key }, &[d_dropped])? } else { d_dropped };
    // Softmax backward: dS = P * (dP - sum(dP * P)).
    let pp = b.bin(BinaryOp::Mul, d_probs, probs)?;
    let rs = b.sum(pp, vec![r - 1], true)?;
    let diff = b.bin(BinaryOp::Sub, d_probs, rs)?;
    let ds = b.bin(BinaryOp::Mul, probs, diff)?;
    let ds = b.scale(ds, scale)?;
    let dq = b.op(Op::matmul(), &[ds, k])?;
    let dk = b.op(nt(true, false), &[ds, q])?;
    let (sq, sk, sv) = (b.g.ty(q).shape.clone(), b.g.ty(k).shape.clone(), b.g.ty(v).shape.clone());
    Ok(vec![Some(b.sum_to(dq, &sq)?), Some(b.sum_to(dk, &sk)?), Some(b.sum_to(dv, &sv)?)])
}
