//! Tensor indexing as in PyTorch: `x[:, 0]` (an int drops the axis),
//! `x[:, 1:]` (a slice keeps it), `x[..., 0:D]`. Lowered to `slice` ops and
//! one `reshape` for the dropped axes.

use super::elab::{Elab, Env, R};
use super::value::{Val, V};
use crate::ir::{Dim, Op, Shape, ValueId};
use crate::syntax::ast::{Expr, IndexItem};
use crate::syntax::Span;

pub fn tensor_index(el: &mut Elab, env: &mut Env, t: ValueId, items: &[IndexItem], span: Span) -> R<Val> {
    let shape = el.graph.ty(t).shape.clone();
    let rank = shape.rank();
    let ell = items.iter().filter(|i| matches!(i, IndexItem::Ellipsis)).count();
    let fixed = items.len() - ell;
    if ell > 1 || fixed > rank {
        return Err(el.err(span, format!("too many indices for a tensor of shape {shape}")));
    }
    let mut cur = t;
    let mut dropped = Vec::new();
    let mut axis = 0;
    for item in items {
        match item {
            IndexItem::Ellipsis => axis += rank - fixed,
            IndexItem::Expr(e) => {
                let i = el.eval_int(env, e)?;
                let dim = shape.0[axis];
                let n = const_dim(el, dim, e)?;
                let j = if i < 0 { i + n as i64 } else { i };
                if j < 0 || j >= n as i64 {
                    return Err(el.err(e.span, format!("index {i} is out of range for dim {axis} of size {n}")));
                }
                cur = slice(el, env, cur, axis, Dim::Const(j as u64), Dim::Const(j as u64 + 1), span)?;
                dropped.push(axis);
                axis += 1;
            }
            IndexItem::Slice(lo, hi) => {
                let dim = shape.0[axis];
                let start = match lo {
                    Some(e) => bound(el, env, e, dim)?,
                    None => Dim::Const(0),
                };
                let end = match hi {
                    Some(e) => bound(el, env, e, dim)?,
                    None => dim,
                };
                if start != Dim::Const(0) || end != dim {
                    cur = slice(el, env, cur, axis, start, end, span)?;
                }
                axis += 1;
            }
        }
    }
    if !dropped.is_empty() {
        let now = el.graph.ty(cur).shape.clone();
        let keep: Vec<Dim> = now.0.iter().enumerate().filter(|(i, _)| !dropped.contains(i)).map(|(_, d)| *d).collect();
        let id = el.op(env, Op::Reshape { shape: Shape(keep) }, &[cur], span)?;
        return Ok(id);
    }
    Ok(Val::new(V::Tensor(cur)))
}

fn const_dim(el: &Elab, d: Dim, e: &Expr) -> R<u64> {
    d.as_const()
        .ok_or_else(|| el.err(e.span, "an int index into the batch dimension is not allowed (the batch is symbolic)"))
}

/// A slice bound: an int (negative counts from the end) or a batch dim.
fn bound(el: &mut Elab, env: &mut Env, e: &Expr, dim: Dim) -> R<Dim> {
    let v = el.eval(env, e)?;
    match (&v.v, dim) {
        (V::Int(i), Dim::Const(n)) => {
            let j = if *i < 0 { *i + n as i64 } else { *i };
            Ok(Dim::Const(j.clamp(0, n as i64) as u64))
        }
        (V::Int(i), Dim::Batch(_)) if *i >= 0 => Ok(Dim::Const(*i as u64)),
        (V::Dim(d), _) => Ok(*d),
        _ => Err(el.err(e.span, format!("a slice bound must be an int, got {}", v.describe()))),
    }
}

fn slice(el: &mut Elab, env: &mut Env, t: ValueId, axis: usize, start: Dim, end: Dim, span: Span) -> R<ValueId> {
    match el.op(env, Op::Slice { axis, start, end }, &[t], span)?.v {
        V::Tensor(id) => Ok(id),
        _ => Err(el.err(span, "slice did not produce a tensor")),
    }
}
