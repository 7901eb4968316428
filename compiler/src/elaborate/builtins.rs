//! Built-in functions of the DSL: IR ops (`linear`, `attention`, ...), init
//! specs (`trunc_normal(0.02)`, ...) and compile-time helpers (`len`, `shape`).

use super::elab::{parse_dtype, Elab, Env, R};
use super::value::{Val, V};
use crate::ir::{BinaryOp, DType, Dim, Init, Op, ReduceOp, Shape, TensorType, UnaryOp, ValueId};
use crate::syntax::Span;

pub const NAMES: &[&str] = &[
    "input",
    "fill",
    "linear",
    "matmul",
    "conv2d",
    "attention",
    "layer_norm",
    "batch_norm",
    "cross_entropy",
    "gelu",
    "relu",
    "tanh",
    "sigmoid",
    "exp",
    "log",
    "sqrt",
    "recip",
    "square",
    "heaviside",
    "softmax",
    "log_softmax",
    "l2_normalize",
    "dropout",
    "drop_path",
    "cast",
    "sum",
    "mean",
    "max",
    "min",
    "reshape",
    "permute",
    "transpose",
    "flatten",
    "concat",
    "slice",
    "expand",
    "stop_gradient",
    "all_gather",
    "zero_diagonal",
    "all_reduce",
    "queue_push",
    "queue_advance",
    "maximum",
    "minimum",
    "len",
    "str",
    "shape",
    "dim",
    "rank",
    "int",
    "float",
    "abs",
    "as_list",
    "trunc_normal",
    "normal",
    "constant",
    "kaiming_uniform",
    "uniform",
    "convit_local",
    "relative_positions_2d",
    "bicubic_resize",
];

/// Names usable without a call: init specs without arguments and dtypes.
pub fn constant(n: &str) -> Option<Val> {
    let v = match n {
        "zeros" => V::Init(Init::Zeros),
        "ones" => V::Init(Init::Ones),
        "identity" => V::Init(Init::Identity),
        "lecun_normal" => V::Init(Init::LecunNormal),
        "normal_columns_normalized" => V::Init(Init::NormalColumnsNormalized),
        "f32" | "bf16" | "f16" | "i64" => V::DType(parse_dtype(n)?),
        _ => return None,
    };
    Some(Val::new(v))
}

/// Arguments of a builtin call: positional or by name.
struct Args {
    pos: Vec<Option<(Val, Span)>>,
    named: Vec<Option<(String, Val, Span)>>,
    span: Span,
    func: String,
}

impl Args {
    fn take(&mut self, i: usize, name: &str) -> Option<(Val, Span)> {
        if let Some(slot) = self.pos.get_mut(i) {
            if let Some(v) = slot.take() {
                return Some(v);
            }
        }
        for slot in self.named.iter_mut() {
            if slot.as_ref().is_some_and(|(n, _, _)| n == name) {
                return slot.take().map(|(_, v, s)| (v, s));
            }
        }
        None
    }
    fn req(&mut self, el: &Elab, i: usize, name: &str) -> R<(Val, Span)> {
        self.take(i, name).ok_or_else(|| el.err(self.span, format!("`{}` needs argument `{name}`", self.func)))
    }
    fn tensor(&mut self, el: &Elab, i: usize, name: &str) -> R<ValueId> {
        let (v, s) = self.req(el, i, name)?;
        as_tensor(el, &v, s, name)
    }
    fn opt_tensor(&mut self, el: &Elab, i: usize, name: &str) -> R<Option<ValueId>> {
        match self.take(i, name) {
            None => Ok(None),
            Some((Val { v: V::None, .. }, _)) => Ok(None),
            Some((v, s)) => as_tensor(el, &v, s, name).map(Some),
        }
    }
    fn f64(&mut self, el: &Elab, i: usize, name: &str, default: Option<f64>) -> R<f64> {
        match self.take(i, name) {
            Some((v, s)) => {
                v.as_f64().ok_or_else(|| el.err(s, format!("`{name}` must be a number, got {}", v.describe())))
            }
            None => default.ok_or_else(|| el.err(self.span, format!("`{}` needs argument `{name}`", self.func))),
        }
    }
    fn int(&mut self, el: &Elab, i: usize, name: &str, default: Option<i64>) -> R<i64> {
        match self.take(i, name) {
            Some((Val { v: V::Int(x), .. }, _)) => Ok(x),
            Some((v, s)) => Err(el.err(s, format!("`{name}` must be an int, got {}", v.describe()))),
            None => default.ok_or_else(|| el.err(self.span, format!("`{}` needs argument `{name}`", self.func))),
        }
    }
    fn string(&mut self, el: &Elab, i: usize, name: &str, default: Option<&str>) -> R<String> {
        match self.take(i, name) {
            Some((Val { v: V::Str(x), .. }, _)) => Ok(x.to_string()),
            Some((v, s)) => Err(el.err(s, format!("`{name}` must be a string, got {}", v.describe()))),
            None => default
                .map(str::to_string)
                .ok_or_else(|| el.err(self.span, format!("`{}` needs argument `{name}`", self.func))),
        }
    }
    fn dtype(&mut self, el: &Elab, i: usize, default: DType) -> R<DType> {
        match self.take(i, "dtype") {
            Some((Val { v: V::DType(d), .. }, _)) => Ok(d),
            Some((v, s)) => Err(el.err(s, format!("`dtype` must be f32, bf16, f16 or i64, got {}", v.describe()))),
            None => Ok(default),
        }
    }
    /// A list of dims (`[B, N, D]`); `-1` entries are returned as `None`.
    fn dims(&mut self, el: &Elab, i: usize, name: &str) -> R<Vec<Option<Dim>>> {
        let (v, s) = self.req(el, i, name)?;
        let V::List(items) = &v.v else {
            return Err(el.err(s, format!("`{name}` must be a list of dims, got {}", v.describe())));
        };
        items
            .iter()
            .map(|it| match it.v {
                V::Int(-1) => Ok(None),
                _ => {
                    it.as_dim().map(Some).ok_or_else(|| el.err(s, format!("`{name}` has a bad dim {}", it.describe())))
                }
            })
            .collect()
    }
    fn axes(&mut self, el: &Elab, i: usize, name: &str, rank: usize) -> R<Option<Vec<usize>>> {
        match self.take(i, name) {
            None | Some((Val { v: V::None, .. }, _)) => Ok(None),
            Some((Val { v: V::Int(a), .. }, s)) => Ok(Some(vec![axis(el, a, rank, s)?])),
            Some((Val { v: V::List(l), .. }, s)) => l
                .iter()
                .map(|x| match x.v {
                    V::Int(a) => axis(el, a, rank, s),
                    _ => Err(el.err(s, "axes must be ints")),
                })
                .collect::<R<Vec<_>>>()
                .map(Some),
            Some((v, s)) => Err(el.err(s, format!("`{name}` must be an int or a list of ints, got {}", v.describe()))),
        }
    }
    fn boolean(&mut self, el: &Elab, i: usize, name: &str, default: bool) -> R<bool> {
        match self.take(i, name) {
            Some((Val { v: V::Bool(b), .. }, _)) => Ok(b),
            Some((v, s)) => Err(el.err(s, format!("`{name}` must be a bool, got {}", v.describe()))),
            None => Ok(default),
        }
    }
    fn finish(self, el: &Elab) -> R<()> {
        if let Some((v, s)) = self.pos.into_iter().flatten().next() {
            return Err(el.err(s, format!("`{}` got an unexpected argument {}", self.func, v.describe())));
        }
        if let Some((n, _, s)) = self.named.into_iter().flatten().next() {
            return Err(el.err(s, format!("`{}` has no argument `{n}`", self.func)));
        }
        Ok(())
    }
}

fn as_tensor(el: &Elab, v: &Val, s: Span, name: &str) -> R<ValueId> {
    match v.v {
        V::Tensor(t) => Ok(t),
        _ => Err(el.err(s, format!("`{name}` must be a tensor, got {}", v.describe()))),
    }
}

fn axis(el: &Elab, a: i64, rank: usize, s: Span) -> R<usize> {
    let r = rank as i64;
    let j = if a < 0 { a + r } else { a };
    if j < 0 || j >= r.max(1) {
        return Err(el.err(s, format!("axis {a} is out of range for rank {rank}")));
    }
    Ok(j as usize)
}

fn rank_of(el: &Elab, t: ValueId) -> usize {
    el.graph.ty(t).shape.rank()
}

/// Calls builtin `name`; `None` when no builtin has that name.
pub fn call(
    el: &mut Elab,
    env: &mut Env,
    name: &str,
    pos: Vec<(Val, Span)>,
    named: Vec<(String, Val, Span)>,
    span: Span,
) -> Option<R<Val>> {
    if !NAMES.contains(&name) {
        return None;
    }
    let mut a = Args {
        pos: pos.into_iter().map(Some).collect(),
        named: named.into_iter().map(Some).collect(),
        span,
        func: name.to_string(),
    };
    let out = dispatch(el, env, name, &mut a, span);
    Some(out.and_then(|v| {
        a.finish(el)?;
        Ok(v)
    }))
}

fn dispatch(el: &mut Elab, env: &mut Env, name: &str, a: &mut Args, span: Span) -> R<Val> {
    let init = |i: Init| Ok(Val::new(V::Init(i)));
    match name {
        // ---- init specs ----
        "trunc_normal" => {
            let std = a.f64(el, 0, "std", None)?;
            let lo = a.f64(el, 1, "a", Some(-2.0))?;
            let hi = a.f64(el, 2, "b", Some(2.0))?;
            init(Init::TruncNormal { std, a: lo, b: hi })
        }
        "normal" => init(Init::Normal { std: a.f64(el, 0, "std", None)? }),
        "constant" => init(Init::Constant(a.f64(el, 0, "value", None)?)),
        "kaiming_uniform" => init(Init::KaimingUniform { a: a.f64(el, 0, "a", Some(5f64.sqrt()))?, fan_in: None }),
        "uniform" => init(Init::Uniform { low: a.f64(el, 0, "low", None)?, high: a.f64(el, 1, "high", None)? }),
        "convit_local" => init(Init::ConvitLocal {
            strength: a.f64(el, 0, "strength", None)?,
            locality_dim: positive(el, a.int(el, 1, "locality_dim", None)?, span)?,
        }),
        "bicubic_resize" => {
            let from = positive(el, a.int(el, 0, "from", None)?, span)?;
            let to = positive(el, a.int(el, 1, "to", None)?, span)?;
            // VISSL passes scale_factor = sqrt(N_in / N_cfg); F.interpolate's
            // output side is floor(from * scale_factor), which must be `to`.
            let scale_factor = ((to * to) as f64 / (from * from) as f64).sqrt();
            let side = (from as f64 * scale_factor).floor() as u64;
            if side != to {
                return Err(el.err(
                    span,
                    format!("bicubic_resize: scale factor {scale_factor} takes a {from}x{from} grid to {side}x{side}, not {to}x{to}"),
                ));
            }
            init(Init::BicubicResize { from, to, scale_factor })
        }
        "relative_positions_2d" => init(Init::RelativePositions2d {
            grid: positive(el, a.int(el, 0, "grid", None)?, span)?,
            locality_dim: positive(el, a.int(el, 1, "locality_dim", None)?, span)?,
        }),

        // ---- compile-time helpers ----
        "len" => {
            let (v, s) = a.req(el, 0, "x")?;
            match &v.v {
                V::List(l) => Ok(Val::int(l.len() as i64)),
                V::Str(x) => Ok(Val::int(x.chars().count() as i64)),
                _ => Err(el.err(s, format!("`len` needs a list, got {}", v.describe()))),
            }
        }
        "shape" => {
            let t = a.tensor(el, 0, "x")?;
            Ok(Val::list(el.graph.ty(t).shape.0.iter().map(|d| Val::from_dim(*d)).collect()))
        }
        "dim" => {
            let t = a.tensor(el, 0, "x")?;
            let r = rank_of(el, t);
            let ax = a.int(el, 1, "axis", None)?;
            let i = axis(el, ax, r, span)?;
            Ok(Val::from_dim(el.graph.ty(t).shape.0[i]))
        }
        "rank" => {
            let t = a.tensor(el, 0, "x")?;
            Ok(Val::int(rank_of(el, t) as i64))
        }
        "int" => {
            let (v, s) = a.req(el, 0, "x")?;
            match v.v {
                V::Int(i) => Ok(Val::int(i)),
                V::Float(f) if f.is_finite() && f.abs() < 9.0e18 => Ok(Val::int(f.trunc() as i64)),
                V::Bool(b) => Ok(Val::int(b as i64)),
                _ => Err(el.err(s, format!("`int` needs a number, got {}", v.describe()))),
            }
        }
        "float" => {
            let (v, s) = a.req(el, 0, "x")?;
            v.as_f64()
                .map(|f| Val::new(V::Float(f)))
                .ok_or_else(|| el.err(s, format!("`float` needs a number, got {}", v.describe())))
        }
        "abs" => {
            let (v, s) = a.req(el, 0, "x")?;
            match v.v {
                V::Int(i) => Ok(Val::int(i.saturating_abs())),
                V::Float(f) => Ok(Val::new(V::Float(f.abs()))),
                _ => Err(el.err(s, format!("`abs` needs a number, got {}", v.describe()))),
            }
        }
        "str" => {
            let (v, _) = a.req(el, 0, "x")?;
            Ok(Val::new(V::Str(std::rc::Rc::from(
                match &v.v {
                    V::Str(s) => s.to_string(),
                    _ => v.to_string(),
                }
                .as_str(),
            ))))
        }
        "as_list" => {
            let (v, _) = a.req(el, 0, "x")?;
            Ok(match v.v {
                V::List(_) => v,
                _ => Val::list(vec![v]),
            })
        }
        "min" | "max" if !is_tensor_call(a) => {
            let vals: Vec<(Val, Span)> = a.pos.iter_mut().filter_map(|p| p.take()).collect();
            let mut best: Option<(f64, Val)> = None;
            for (v, s) in vals {
                let x = v.as_f64().ok_or_else(|| el.err(s, format!("`{name}` needs numbers, got {}", v.describe())))?;
                let better = best.as_ref().is_none_or(|(y, _)| if name == "min" { x < *y } else { x > *y });
                if better {
                    best = Some((x, v));
                }
            }
            let best = best.map(|(_, v)| v);
            best.ok_or_else(|| el.err(span, format!("`{name}` needs at least one value")))
        }
        "sqrt" if !is_tensor_call(a) => {
            let x = a.f64(el, 0, "x", None)?;
            if x < 0.0 {
                return Err(el.err(span, "sqrt of a negative number"));
            }
            Ok(Val::new(V::Float(x.sqrt())))
        }

        // ---- IR ops ----
        _ => tensor_op(el, env, name, a, span),
    }
}

fn positive(el: &Elab, v: i64, span: Span) -> R<u64> {
    if v > 0 {
        Ok(v as u64)
    } else {
        Err(el.err(span, format!("expected a positive int, got {v}")))
    }
}

fn is_tensor_call(a: &Args) -> bool {
    a.pos.first().and_then(|p| p.as_ref()).is_some_and(|(v, _)| matches!(v.v, V::Tensor(_)))
        || a.named.iter().flatten().any(|(n, v, _)| n == "x" && matches!(v.v, V::Tensor(_)))
}

fn shape_arg(el: &Elab, dims: Vec<Option<Dim>>, span: Span) -> R<Shape> {
    dims.into_iter().map(|d| d.ok_or_else(|| el.err(span, "-1 is not allowed here"))).collect::<R<Vec<_>>>().map(Shape)
}

fn tensor_op(el: &mut Elab, env: &mut Env, name: &str, a: &mut Args, span: Span) -> R<Val> {
    let unary = |u| Op::Unary(u);
    let op = match name {
        "input" => {
            let n = a.string(el, 0, "name", None)?;
            let dims = a.dims(el, 1, "shape")?;
            let shape = shape_arg(el, dims, span)?;
            let dt = a.dtype(el, 2, DType::F32)?;
            let id = el.graph.add_input(&n, shape, dt).map_err(|e| el.err(span, e.to_string()))?;
            return Ok(Val::new(V::Tensor(id)));
        }
        "fill" => {
            let value = a.f64(el, 0, "value", None)?;
            let dims = a.dims(el, 1, "shape")?;
            let shape = shape_arg(el, dims, span)?;
            let dt = a.dtype(el, 2, DType::F32)?;
            let id = el.graph.add_fill(value, TensorType::new(shape, dt), &env.scope);
            return Ok(Val::new(V::Tensor(id)));
        }
        "linear" | "conv2d" => {
            let x = a.tensor(el, 0, "x")?;
            let w = a.tensor(el, 1, "weight")?;
            let b = a.opt_tensor(el, 2, "bias")?;
            let op = if name == "linear" {
                Op::Linear
            } else {
                let s = a.int(el, 3, "stride", Some(1))?;
                let p = a.int(el, 4, "padding", Some(0))?;
                if s <= 0 || p < 0 {
                    return Err(el.err(span, "conv2d needs stride > 0 and padding >= 0"));
                }
                Op::Conv2d { stride: [s as u64; 2], padding: [p as u64; 2] }
            };
            let mut ops = vec![x, w];
            ops.extend(b);
            return el.op(env, op, &ops, span);
        }
        "matmul" => {
            let x = a.tensor(el, 0, "a")?;
            let y = a.tensor(el, 1, "b")?;
            return el.op(env, Op::matmul(), &[x, y], span);
        }
        "attention" => {
            let q = a.tensor(el, 0, "q")?;
            let k = a.tensor(el, 1, "k")?;
            let v = a.tensor(el, 2, "v")?;
            let scale = a.f64(el, 3, "scale", None)?;
            // A model elaborated in eval mode (a distillation teacher) has no attention dropout.
            let rate = a.f64(el, 4, "dropout", Some(0.0))?;
            let dropout = if el.eval_mode { 0.0 } else { rate };
            let key = el.random_key();
            return el.op(env, Op::Attention { scale, dropout, key }, &[q, k, v], span);
        }
        "layer_norm" => {
            let x = a.tensor(el, 0, "x")?;
            let w = a.tensor(el, 1, "weight")?;
            let b = a.tensor(el, 2, "bias")?;
            let eps = a.f64(el, 3, "eps", None)?;
            return el.op(env, Op::LayerNorm { eps }, &[x, w, b], span);
        }
        "batch_norm" => {
            let ts = ["x", "weight", "bias", "running_mean", "running_var"]
                .iter()
                .enumerate()
                .map(|(i, n)| a.tensor(el, i, n))
                .collect::<R<Vec<_>>>()?;
            let eps = a.f64(el, 5, "eps", None)?;
            let momentum = a.f64(el, 6, "momentum", None)?;
            if el.eval_mode {
                // The step's batch_norm uses batch statistics; eval mode would need the running ones.
                return Err(el.err(span, "BatchNorm is not supported in a model run in eval mode inside a training step (a frozen trunk or head, a distillation teacher)".to_string()));
            }
            return el.op(env, Op::BatchNorm { eps, momentum }, &ts, span);
        }
        "cross_entropy" => {
            let x = a.tensor(el, 0, "logits")?;
            let t = a.tensor(el, 1, "target")?;
            let s = a.f64(el, 2, "label_smoothing", Some(0.0))?;
            return el.op(env, Op::CrossEntropy { label_smoothing: s }, &[x, t], span);
        }
        "gelu" => unary(UnaryOp::Gelu),
        "relu" => unary(UnaryOp::Relu),
        "tanh" => unary(UnaryOp::Tanh),
        "sigmoid" => unary(UnaryOp::Sigmoid),
        "exp" => unary(UnaryOp::Exp),
        "log" => unary(UnaryOp::Log),
        "sqrt" => unary(UnaryOp::Sqrt),
        "recip" => unary(UnaryOp::Recip),
        "square" => unary(UnaryOp::Square),
        // 1 where x > 0, else 0 (no gradient): one-hot targets from a maximum.
        "heaviside" => unary(UnaryOp::Heaviside),
        "stop_gradient" => Op::StopGradient,
        "softmax" | "log_softmax" | "l2_normalize" => {
            let x = a.tensor(el, 0, "x")?;
            let ax = a.int(el, 1, "axis", Some(-1))?;
            let axis = axis(el, ax, rank_of(el, x), span)?;
            let op = match name {
                "softmax" => Op::Softmax { axis },
                "log_softmax" => Op::LogSoftmax { axis },
                _ => Op::L2Normalize { axis, eps: a.f64(el, 2, "eps", Some(1e-12))? },
            };
            return el.op(env, op, &[x], span);
        }
        "dropout" | "drop_path" => {
            let x = a.tensor(el, 0, "x")?;
            let p = a.f64(el, 1, "p", None)?;
            if !(0.0..1.0).contains(&p) {
                return Err(el.err(span, format!("`{name}` probability must be in [0, 1), got {p}")));
            }
            // Dropout(0) and DropPath(0) are identities in VISSL (reference 1.5): no node;
            // in eval mode (a distillation teacher) every dropout is one.
            if p == 0.0 || el.eval_mode {
                return Ok(Val::new(V::Tensor(x)));
            }
            let key = el.random_key();
            let op = if name == "dropout" { Op::Dropout { p, key } } else { Op::DropPath { p, key } };
            return el.op(env, op, &[x], span);
        }
        "cast" => {
            let x = a.tensor(el, 0, "x")?;
            let dtype = a.dtype(el, 1, DType::F32)?;
            return el.op(env, Op::Cast { dtype }, &[x], span);
        }
        "sum" | "mean" | "max" | "min" => {
            let x = a.tensor(el, 0, "x")?;
            let r = rank_of(el, x);
            let axes = a.axes(el, 1, "axis", r)?.unwrap_or_else(|| (0..r).collect());
            let keepdim = a.boolean(el, 2, "keepdim", false)?;
            let op = match name {
                "sum" => ReduceOp::Sum,
                "mean" => ReduceOp::Mean,
                "max" => ReduceOp::Max,
                _ => {
                    // min(x) = -max(-x): keeps the IR's reduction set small.
                    let n = el.op(env, Op::Unary(UnaryOp::Neg), &[x], span)?;
                    let V::Tensor(n) = n.v else { unreachable!("op returns a tensor") };
                    let m = el.op(env, Op::Reduce { op: ReduceOp::Max, axes, keepdim }, &[n], span)?;
                    let V::Tensor(m) = m.v else { unreachable!("op returns a tensor") };
                    return el.op(env, Op::Unary(UnaryOp::Neg), &[m], span);
                }
            };
            return el.op(env, Op::Reduce { op, axes, keepdim }, &[x], span);
        }
        "maximum" | "minimum" => {
            let x = a.tensor(el, 0, "a")?;
            let y = a.tensor(el, 1, "b")?;
            let op = if name == "maximum" { BinaryOp::Max } else { BinaryOp::Min };
            return el.op(env, Op::Binary(op), &[x, y], span);
        }
        "reshape" => {
            let x = a.tensor(el, 0, "x")?;
            let dims = a.dims(el, 1, "shape")?;
            let shape = infer_reshape(el, x, dims, span)?;
            return el.op(env, Op::Reshape { shape }, &[x], span);
        }
        "flatten" => {
            let x = a.tensor(el, 0, "x")?;
            let r = rank_of(el, x);
            let s = axis(el, a.int(el, 1, "start", Some(1))?, r, span)?;
            let e = axis(el, a.int(el, 2, "end", Some(-1))?, r, span)?;
            let dims = el.graph.ty(x).shape.0.clone();
            let mut out: Vec<Dim> = dims[..s].to_vec();
            let mut merged = Dim::Const(1);
            for d in &dims[s..=e.max(s)] {
                merged = merged.mul(*d).ok_or_else(|| el.err(span, "flatten would multiply two batch dims"))?;
            }
            out.push(merged);
            out.extend_from_slice(&dims[e.max(s) + 1..]);
            return el.op(env, Op::Reshape { shape: Shape(out) }, &[x], span);
        }
        "permute" => {
            let x = a.tensor(el, 0, "x")?;
            let r = rank_of(el, x);
            let perm = a.axes(el, 1, "perm", r)?.unwrap_or_default();
            return el.op(env, Op::Permute { perm }, &[x], span);
        }
        "transpose" => {
            let x = a.tensor(el, 0, "x")?;
            let r = rank_of(el, x);
            let d0 = axis(el, a.int(el, 1, "dim0", Some(-2))?, r, span)?;
            let d1 = axis(el, a.int(el, 2, "dim1", Some(-1))?, r, span)?;
            let mut perm: Vec<usize> = (0..r).collect();
            perm.swap(d0, d1);
            return el.op(env, Op::Permute { perm }, &[x], span);
        }
        "concat" => {
            let (v, s) = a.req(el, 0, "xs")?;
            let V::List(items) = &v.v else {
                return Err(el.err(s, format!("`concat` needs a list of tensors, got {}", v.describe())));
            };
            let ts = items.iter().map(|it| as_tensor(el, it, s, "xs")).collect::<R<Vec<_>>>()?;
            let Some(&first) = ts.first() else {
                return Err(el.err(s, "`concat` needs at least one tensor"));
            };
            let ax = axis(el, a.int(el, 1, "axis", Some(0))?, rank_of(el, first), span)?;
            if ts.len() == 1 {
                return Ok(Val::new(V::Tensor(first)));
            }
            return el.op(env, Op::Concat { axis: ax }, &ts, span);
        }
        "slice" => {
            let x = a.tensor(el, 0, "x")?;
            let ax = axis(el, a.int(el, 1, "axis", None)?, rank_of(el, x), span)?;
            let (sv, ss) = a.req(el, 2, "start")?;
            let (ev, es) = a.req(el, 3, "end")?;
            let start = sv.as_dim().ok_or_else(|| el.err(ss, "`start` must be a dim"))?;
            let end = ev.as_dim().ok_or_else(|| el.err(es, "`end` must be a dim"))?;
            return el.op(env, Op::Slice { axis: ax, start, end }, &[x], span);
        }
        "expand" => {
            let x = a.tensor(el, 0, "x")?;
            let dims = a.dims(el, 1, "shape")?;
            let cur = el.graph.ty(x).shape.0.clone();
            let off = dims.len().saturating_sub(cur.len());
            let shape = dims
                .iter()
                .enumerate()
                .map(|(i, d)| match d {
                    Some(d) => Ok(*d),
                    None if i >= off => Ok(cur[i - off]),
                    None => Err(el.err(span, "-1 in `expand` must refer to an existing dim")),
                })
                .collect::<R<Vec<_>>>()?;
            return el.op(env, Op::Expand { shape: Shape(shape) }, &[x], span);
        }
        "all_gather" => {
            let x = a.tensor(el, 0, "x")?;
            let world = positive(el, a.int(el, 1, "world", None)?, span)?;
            return el.op(env, Op::AllGather { world }, &[x], span);
        }
        "zero_diagonal" => {
            let x = a.tensor(el, 0, "x")?;
            let world = positive(el, a.int(el, 1, "world", Some(1))?, span)?;
            return el.op(env, Op::ZeroDiagonal { world }, &[x], span);
        }
        "all_reduce" => {
            let x = a.tensor(el, 0, "x")?;
            let opname = a.string(el, 1, "op", Some("sum"))?;
            let world = positive(el, a.int(el, 2, "world", None)?, span)?;
            let op = match opname.as_str() {
                "sum" => ReduceOp::Sum,
                "mean" => ReduceOp::Mean,
                "max" => ReduceOp::Max,
                o => return Err(el.err(span, format!("`all_reduce` op must be sum, mean or max, got `{o}`"))),
            };
            return el.op(env, Op::AllReduce { op, world }, &[x], span);
        }
        "queue_push" | "queue_advance" => {
            let (n0, n1, n2) = if name == "queue_push" { ("queue", "ptr", "keys") } else { ("ptr", "keys", "queue") };
            let t0 = a.tensor(el, 0, n0)?;
            let t1 = a.tensor(el, 1, n1)?;
            let t2 = a.tensor(el, 2, n2)?;
            let world = positive(el, a.int(el, 3, "world", None)?, span)?;
            let op = if name == "queue_push" { Op::QueuePush { world } } else { Op::QueueAdvance { world } };
            return el.op(env, op, &[t0, t1, t2], span);
        }
        _ => return Err(el.err(span, format!("`{name}` is not a function"))),
    };
    let x = a.tensor(el, 0, "x")?;
    el.op(env, op, &[x], span)
}

/// Resolves one `-1` in a reshape target from the element count.
fn infer_reshape(el: &Elab, x: ValueId, dims: Vec<Option<Dim>>, span: Span) -> R<Shape> {
    let unknown = dims.iter().filter(|d| d.is_none()).count();
    if unknown == 0 {
        return Ok(Shape(dims.into_iter().flatten().collect()));
    }
    if unknown > 1 {
        return Err(el.err(span, "at most one -1 in a reshape"));
    }
    let mut total = Dim::Const(1);
    for d in &el.graph.ty(x).shape.0 {
        total = total.mul(*d).ok_or_else(|| el.err(span, "element count depends on B twice"))?;
    }
    let mut known = Dim::Const(1);
    for d in dims.iter().flatten() {
        known = known.mul(*d).ok_or_else(|| el.err(span, "target shape depends on B twice"))?;
    }
    let missing = total.div(known).ok_or_else(|| {
        el.err(span, format!("cannot reshape {} to {} elements times -1", el.graph.ty(x).shape, known))
    })?;
    Ok(Shape(dims.into_iter().map(|d| d.unwrap_or(missing)).collect()))
}
