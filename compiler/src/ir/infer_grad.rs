//! Shape rules of the gradient ops that autodiff emits (see `op.rs`).

use super::infer::{
    attention, attention_packed, check_axis, check_world, conv2d, cross_entropy, exactly, float, float_unary,
    floats_alike,
};
use super::op::Op;
use super::types::{Dim, Shape, TensorType};

type Rule = Result<TensorType, String>;

pub(super) fn infer_grad(op: &Op, x: &[&TensorType]) -> Rule {
    match op {
        Op::GeluGrad => same_pair(x, ["x", "dy"]),
        Op::AttentionGrad { dropout, .. } => {
            let [q, k, v, dy] = exactly(x, ["q", "k", "v", "dy"])?;
            if !(0.0..1.0).contains(dropout) {
                return Err(format!("dropout must be in [0, 1), got {dropout}"));
            }
            let out = attention(&[q, k, v])?;
            if k.shape != q.shape || v.shape != q.shape {
                return Err(format!(
                    "q, k and v must have one shape to stack their gradients (q {}, k {}, v {})",
                    q.shape, k.shape, v.shape
                ));
            }
            if dy.shape != out.shape || dy.dtype != out.dtype {
                return Err(format!("dy must be {} like the attention output, got {}", out, dy));
            }
            let mut dims = vec![Dim::Const(3)];
            dims.extend_from_slice(q.shape.dims());
            Ok(TensorType::new(Shape(dims), q.dtype))
        }
        Op::AttentionPackedGrad { heads, dropout, .. } => {
            let [qkv, dy] = exactly(x, ["qkv", "dy"])?;
            if !(0.0..1.0).contains(dropout) {
                return Err(format!("dropout must be in [0, 1), got {dropout}"));
            }
            let out = attention_packed(qkv, *heads)?;
            if dy.shape != out.shape || dy.dtype != out.dtype {
                return Err(format!("dy must be {} like the attention output, got {}", out, dy));
            }
            Ok(qkv.clone())
        }
        Op::Normalize { .. } => {
            let t = float_unary(x)?;
            if t.shape.rank() == 0 {
                return Err("input must have a feature axis, got a scalar []".into());
            }
            Ok(t)
        }
        // Result `index` of a kernel with several (its operand: the kernel's result).
        Op::ResultPart { index, dtype } => {
            let [dx] = exactly(x, ["result"])?;
            if !dtype.is_float() {
                return Err(format!("a kernel's further result is a float, not {dtype}"));
            }
            match index {
                1 | 2 | 4 => match dx.shape.0.last() {
                    Some(d) => Ok(TensorType::new(Shape(vec![d.clone()]), *dtype)),
                    None => Err("dx must have a feature axis, got a scalar []".into()),
                },
                3 | 5 => Ok(TensorType::new(dx.shape.clone(), *dtype)),
                _ => Err(format!("a kernel's further results are 1 to 5, not {index}")),
            }
        }
        // With its normalised input (result 5), the norm's bias b last.
        Op::LayerNormGrad { eps, copy, normalized: Some(_) } if x.len() == 4 || x.len() == 5 => {
            let (b, rest) = x.split_last().expect("4 or 5 operands");
            let (w, t) = (rest[2], rest[1]);
            if *b != w {
                return Err(format!("the norm's bias b {b} must be its weight's type {w} (x {t})"));
            }
            infer_grad(&Op::LayerNormGrad { eps: *eps, copy: *copy, normalized: None }, rest)
        }
        // LayerNorm's input gradient in one pass: g = dy * w read as it is.
        Op::NormalizeGrad { .. } | Op::LayerNormGrad { normalized: None, .. } if x.len() == 3 || x.len() == 4 => {
            let (dy, t, w) = (x[0], x[1], x[2]);
            for (role, v) in [("dy", dy), ("x", t), ("w", w)] {
                super::infer::float(role, v)?;
            }
            if let Some(r) = x.get(3) {
                if *r != t {
                    return Err(format!("the residual gradient r {r} must be x's type {t}"));
                }
            }
            if dy.shape != t.shape {
                return Err(format!("dy {} and x {} must have the same shape", dy.shape, t.shape));
            }
            let d = t.shape.dims().last().copied();
            if w.shape.dims().len() != 1 || w.shape.dims().first().copied() != d {
                return Err(format!("w {} must be [D] for x {}", w.shape, t.shape));
            }
            Ok(t.clone())
        }
        Op::NormalizeGrad { .. } | Op::BatchStandardizeGrad { .. } => same_pair(x, ["g", "x"]),
        Op::LayerNormGrad { normalized: None, .. } => {
            Err(format!("expects (dy, x, w) or (dy, x, w, r), got {} operands", x.len()))
        }
        Op::LayerNormGrad { .. } => Err(format!("expects (dy, x, w, b) or (dy, x, w, r, b), got {} operands", x.len())),
        Op::LayerNormWeightGrad { .. } => {
            let [dy, t] = exactly(x, ["dy", "x"])?;
            super::infer::float("dy", dy)?;
            super::infer::float("x", t)?;
            if dy.shape != t.shape {
                return Err(format!("dy {} and x {} must have the same shape", dy.shape, t.shape));
            }
            let Some(&d) = t.shape.dims().last() else {
                return Err("x must have a feature axis, got a scalar []".into());
            };
            Ok(TensorType::new(Shape(vec![d]), t.dtype))
        }
        Op::BatchStandardize { .. } => {
            let t = float_unary(x)?;
            if t.shape.rank() < 2 {
                return Err(format!("input must be [N, C, ...], got {}", t.shape));
            }
            Ok(t)
        }
        Op::RunningStat { .. } => {
            let [r, t] = exactly(x, ["running", "x"])?;
            floats_alike(&[("running", r), ("x", t)])?;
            if t.shape.rank() < 2 || r.shape.dims() != [t.shape.0[1]] {
                return Err(format!("running stat must be [C] for x [N, C, ...], got {} and {}", r.shape, t.shape));
            }
            Ok(r.clone())
        }
        Op::CrossEntropyGrad { label_smoothing } => {
            let [logits, target, g] = exactly(x, ["logits", "target", "dloss"])?;
            cross_entropy(&[logits, target], *label_smoothing)?;
            float("dloss", g)?;
            if g.shape.rank() != 0 {
                return Err(format!("dloss must be a scalar [], got {}", g.shape));
            }
            Ok(logits.clone())
        }
        Op::Conv2dGradInput { stride, padding, input_hw } => {
            let [dy, w] = exactly(x, ["dy", "weight"])?;
            let [n, ..] = *dy.shape.dims() else { return Err(format!("dy must be [N, O, H', W'], got {}", dy.shape)) };
            let [_, c, ..] = *w.shape.dims() else {
                return Err(format!("weight must be [O, C, kh, kw], got {}", w.shape));
            };
            let input = TensorType::new(Shape(vec![n, c, Dim::Const(input_hw[0]), Dim::Const(input_hw[1])]), dy.dtype);
            check_conv_pair(&input, w, dy, *stride, *padding)?;
            Ok(input)
        }
        Op::Conv2dGradWeight { stride, padding, kernel } => {
            let [dy, input] = exactly(x, ["dy", "x"])?;
            let ([_, o, ..], [_, c, ..]) = (dy.shape.dims(), input.shape.dims()) else {
                return Err(format!("dy and x must be 4-d, got {} and {}", dy.shape, input.shape));
            };
            let w = TensorType::new(Shape(vec![*o, *c, Dim::Const(kernel[0]), Dim::Const(kernel[1])]), dy.dtype);
            check_conv_pair(input, &w, dy, *stride, *padding)?;
            Ok(w)
        }
        Op::Pad { axis, before, after } => {
            let t = float_unary(x)?;
            check_axis(*axis, &t.shape)?;
            let mut dims = t.shape.0.clone();
            let grown = dims[*axis].add(*before).and_then(|d| d.add(*after));
            dims[*axis] = grown.ok_or_else(|| format!("cannot pad {} by {before} + {after}", dims[*axis]))?;
            Ok(TensorType::new(Shape(dims), t.dtype))
        }
        Op::AllGatherGrad { world } => {
            check_world(*world)?;
            let t = float_unary(x)?;
            let Some(&first) = t.shape.0.first() else { return Err("dy must have a batch axis".into()) };
            let mut dims = t.shape.0.clone();
            dims[0] = first
                .div(Dim::Const(*world))
                .ok_or_else(|| format!("dim 0 ({first}) is not divisible by world {world}"))?;
            Ok(TensorType::new(Shape(dims), t.dtype))
        }
        Op::DivCount { count } => {
            if *count == Dim::Const(0) {
                return Err("count must not be 0".into());
            }
            float_unary(x)
        }
        other => Err(format!("{} is not a gradient op", other.name())),
    }
}

/// Two float operands of one shape; the result has that shape.
fn same_pair(x: &[&TensorType], roles: [&str; 2]) -> Rule {
    let [a, b] = exactly(x, roles)?;
    floats_alike(&[(roles[0], a), (roles[1], b)])?;
    if a.shape != b.shape {
        return Err(format!("{} {} and {} {} must have the same shape", roles[0], a.shape, roles[1], b.shape));
    }
    Ok(a.clone())
}

/// The forward conv of (input, weight) must produce dy's shape.
fn check_conv_pair(
    input: &TensorType,
    w: &TensorType,
    dy: &TensorType,
    stride: [u64; 2],
    padding: [u64; 2],
) -> Result<(), String> {
    let out = conv2d(&[input, w], stride, padding)?;
    if out.shape != dy.shape {
        return Err(format!("dy {} does not match the forward conv output {}", dy.shape, out.shape));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::types::DType;

    fn t(dims: &[Dim]) -> TensorType {
        TensorType::new(Shape(dims.to_vec()), DType::F32)
    }

    #[test]
    fn conv_grads_invert_the_forward_shapes() {
        let (b, c) = (Dim::B, Dim::Const);
        let dy = t(&[b, c(8), c(4), c(4)]);
        let w = t(&[c(8), c(3), c(2), c(2)]);
        let x = t(&[b, c(3), c(8), c(8)]);
        let gi = Op::Conv2dGradInput { stride: [2, 2], padding: [0, 0], input_hw: [8, 8] };
        assert_eq!(infer_grad(&gi, &[&dy, &w]).unwrap(), x);
        let gw = Op::Conv2dGradWeight { stride: [2, 2], padding: [0, 0], kernel: [2, 2] };
        assert_eq!(infer_grad(&gw, &[&dy, &x]).unwrap(), w);
        let bad = Op::Conv2dGradInput { stride: [1, 1], padding: [0, 0], input_hw: [8, 8] };
        assert!(infer_grad(&bad, &[&dy, &w]).unwrap_err().contains("does not match the forward conv output"));
    }

    #[test]
    fn pad_and_all_gather_grad() {
        let (b, c) = (Dim::B, Dim::Const);
        let pad = Op::Pad { axis: 1, before: c(1), after: c(0) };
        assert_eq!(infer_grad(&pad, &[&t(&[b, c(16), c(8)])]).unwrap(), t(&[b, c(17), c(8)]));
        let g = Op::AllGatherGrad { world: 4 };
        assert_eq!(infer_grad(&g, &[&t(&[Dim::Batch(8), c(8)])]).unwrap(), t(&[Dim::Batch(2), c(8)]));
        assert!(infer_grad(&g, &[&t(&[c(6), c(8)])]).unwrap_err().contains("not divisible by world 4"));
    }
}
