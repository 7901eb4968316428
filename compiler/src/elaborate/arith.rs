//! Binary operators on elaborator values: Python-like arithmetic on ints and
//! floats, dimension arithmetic on the symbolic batch, and tensor ops.

use super::elab::{tensor_binop, Elab, Env, R};
use super::value::{Val, V};
use crate::ir::{Op, UnaryOp};
use crate::syntax::ast::BinOp;
use crate::syntax::Span;
use std::rc::Rc;

pub fn binary(el: &mut Elab, env: &mut Env, op: BinOp, l: Val, r: Val, span: Span) -> R<Val> {
    let bad =
        |el: &Elab| el.err(span, format!("cannot apply `{}` to {} and {}", op.symbol(), l.type_name(), r.type_name()));
    let b = |x: bool| Ok(Val::new(V::Bool(x)));
    match (&l.v, &r.v) {
        (V::None, _) | (_, V::None) if matches!(op, BinOp::Eq | BinOp::Ne) => {
            b(matches!((&l.v, &r.v), (V::None, V::None)) == (op == BinOp::Eq))
        }
        (V::Tensor(_), _) | (_, V::Tensor(_)) => tensor(el, env, op, &l, &r, span),
        (V::Int(x), V::Int(y)) => int_op(el, op, *x, *y, span),
        (V::Int(_) | V::Float(_), V::Int(_) | V::Float(_)) => {
            let (x, y) = (l.as_f64().unwrap_or(0.0), r.as_f64().unwrap_or(0.0));
            match op {
                BinOp::Add => float(x + y),
                BinOp::Sub => float(x - y),
                BinOp::Mul => float(x * y),
                BinOp::Div => {
                    if y == 0.0 {
                        Err(el.err(span, "division by zero"))
                    } else {
                        float(x / y)
                    }
                }
                BinOp::Pow => float(x.powf(y)),
                BinOp::Eq => b(x == y),
                BinOp::Ne => b(x != y),
                BinOp::Lt => b(x < y),
                BinOp::Le => b(x <= y),
                BinOp::Gt => b(x > y),
                BinOp::Ge => b(x >= y),
                _ => Err(bad(el)),
            }
        }
        (V::Dim(_), _) | (_, V::Dim(_)) => {
            let (Some(x), Some(y)) = (l.as_dim(), r.as_dim()) else { return Err(bad(el)) };
            let res = match op {
                BinOp::Mul => x.mul(y),
                BinOp::FloorDiv | BinOp::Div => x.div(y),
                BinOp::Add => x.add(y),
                BinOp::Sub => x.sub(y),
                BinOp::Eq => return b(x == y),
                BinOp::Ne => return b(x != y),
                _ => return Err(bad(el)),
            };
            res.map(Val::from_dim).ok_or_else(|| {
                el.err(span, format!("`{x} {} {y}` is not a dimension this compiler can represent", op.symbol()))
            })
        }
        (V::Str(x), V::Str(y)) => match op {
            BinOp::Eq => b(x == y),
            BinOp::Ne => b(x != y),
            BinOp::Add => Ok(Val::new(V::Str(Rc::from(format!("{x}{y}").as_str())))),
            _ => Err(bad(el)),
        },
        (V::Bool(x), V::Bool(y)) => match op {
            BinOp::Eq => b(x == y),
            BinOp::Ne => b(x != y),
            _ => Err(bad(el)),
        },
        (V::List(x), V::List(y)) => match op {
            BinOp::Add => {
                let mut v = x.as_ref().clone();
                v.extend(y.iter().cloned());
                Ok(Val::list(v))
            }
            BinOp::Eq | BinOp::Ne => {
                let same = x.len() == y.len() && x.iter().zip(y.iter()).all(|(a, c)| a.to_string() == c.to_string());
                b(same == (op == BinOp::Eq))
            }
            _ => Err(bad(el)),
        },
        (V::None, _) | (_, V::None) => match op {
            BinOp::Eq => b(matches!((&l.v, &r.v), (V::None, V::None))),
            BinOp::Ne => b(!matches!((&l.v, &r.v), (V::None, V::None))),
            _ => Err(bad(el)),
        },
        _ => match op {
            BinOp::Eq => b(false),
            BinOp::Ne => b(true),
            _ => Err(bad(el)),
        },
    }
}

fn float(x: f64) -> R<Val> {
    Ok(Val::new(V::Float(x)))
}

fn int_op(el: &Elab, op: BinOp, x: i64, y: i64, span: Span) -> R<Val> {
    let ovf = || el.err(span, "integer overflow");
    let b = |v: bool| Ok(Val::new(V::Bool(v)));
    let i = |v: Option<i64>| v.map(Val::int).ok_or_else(ovf);
    match op {
        BinOp::Add => i(x.checked_add(y)),
        BinOp::Sub => i(x.checked_sub(y)),
        BinOp::Mul => i(x.checked_mul(y)),
        BinOp::Div => {
            if y == 0 {
                Err(el.err(span, "division by zero"))
            } else {
                float(x as f64 / y as f64)
            }
        }
        // Python semantics: floor division and a remainder with the divisor's sign.
        BinOp::FloorDiv | BinOp::Rem => {
            if y == 0 {
                return Err(el.err(span, "division by zero"));
            }
            let q = x.checked_div_euclid(y).ok_or_else(ovf)?;
            let (q, m) =
                if y < 0 && x.rem_euclid(y) != 0 { (q + 1, x.rem_euclid(y) + y) } else { (q, x.rem_euclid(y)) };
            Ok(Val::int(if op == BinOp::FloorDiv { q } else { m }))
        }
        BinOp::Pow => {
            if y >= 0 {
                i(u32::try_from(y).ok().and_then(|e| x.checked_pow(e)))
            } else {
                float((x as f64).powf(y as f64))
            }
        }
        BinOp::Eq => b(x == y),
        BinOp::Ne => b(x != y),
        BinOp::Lt => b(x < y),
        BinOp::Le => b(x <= y),
        BinOp::Gt => b(x > y),
        BinOp::Ge => b(x >= y),
        _ => Err(el.err(span, format!("cannot apply `{}` to ints", op.symbol()))),
    }
}

/// Tensor arithmetic: tensor (op) tensor broadcasts; a scalar operand becomes
/// a `scale` / `add_scalar` / `pow_scalar` attribute instead of a tensor.
fn tensor(el: &mut Elab, env: &mut Env, op: BinOp, l: &Val, r: &Val, span: Span) -> R<Val> {
    let msg = format!("cannot apply `{}` to {} and {}", op.symbol(), l.type_name(), r.type_name());
    let bad = |el: &Elab| el.err(span, msg.clone());
    match (&l.v, &r.v) {
        (V::Tensor(a), V::Tensor(b)) => match op {
            BinOp::MatMul => el.op(env, Op::matmul(), &[*a, *b], span),
            _ => {
                let bop = tensor_binop(op).ok_or_else(|| bad(el))?;
                el.op(env, Op::Binary(bop), &[*a, *b], span)
            }
        },
        (V::Tensor(t), _) => {
            let c = r.as_f64().ok_or_else(|| bad(el))?;
            match op {
                BinOp::Add => el.op(env, Op::AddScalar { value: c }, &[*t], span),
                BinOp::Sub => el.op(env, Op::AddScalar { value: -c }, &[*t], span),
                BinOp::Mul => el.op(env, Op::Scale { factor: c }, &[*t], span),
                BinOp::Div if c != 0.0 => el.op(env, Op::Scale { factor: 1.0 / c }, &[*t], span),
                BinOp::Pow => el.op(env, Op::PowScalar { exponent: c }, &[*t], span),
                _ => Err(bad(el)),
            }
        }
        (_, V::Tensor(t)) => {
            let c = l.as_f64().ok_or_else(|| bad(el))?;
            match op {
                BinOp::Add => el.op(env, Op::AddScalar { value: c }, &[*t], span),
                BinOp::Mul => el.op(env, Op::Scale { factor: c }, &[*t], span),
                BinOp::Sub => {
                    let n = el.op(env, Op::Unary(UnaryOp::Neg), &[*t], span)?;
                    let V::Tensor(n) = n.v else { return Err(bad(el)) };
                    el.op(env, Op::AddScalar { value: c }, &[n], span)
                }
                BinOp::Div => {
                    let n = el.op(env, Op::Unary(UnaryOp::Recip), &[*t], span)?;
                    let V::Tensor(n) = n.v else { return Err(bad(el)) };
                    el.op(env, Op::Scale { factor: c }, &[n], span)
                }
                _ => Err(bad(el)),
            }
        }
        _ => Err(bad(el)),
    }
}
