//! The elaborator: runs block bodies with config values bound, unrolling loops
//! and conditionals, and emits IR nodes, parameters and buffers.

use super::program::{BlockRef, Program};
use super::value::{from_json, join_key, json_get, Val, MAX_VALUE_NESTING, V};
use crate::ir::{BinaryOp, DType, Dim, Graph, Op, Shape, TensorType, UnaryOp, ValueId};
use crate::syntax::ast::*;
use crate::syntax::{Diagnostic, FileId, Span};
use std::collections::HashMap;
use std::rc::Rc;

pub type R<T> = Result<T, Diagnostic>;

/// Blocks may call blocks this deep (guards against recursive blocks).
const MAX_CALL_DEPTH: usize = 64;
/// Loop iterations and block calls allowed in one elaboration.
const FUEL: u64 = 2_000_000;
/// Expression evaluations and statements open at once, across block calls:
/// every recursion of the elaborator passes through `eval` or `exec`, so
/// this bounds its stack (the parser bounds each expression to
/// `MAX_EXPR_DEPTH` and each body to `MAX_STMT_DEPTH`; this bounds their
/// sum over nested calls and constants).
pub const MAX_NESTING: u32 = 1024;

pub struct Env {
    pub vars: HashMap<String, Val>,
    pub file: FileId,
    /// Module path of this block instance, e.g. `trunk.blocks.3.attn`.
    pub scope: String,
}

enum Flow {
    Normal,
    Return(Val),
}

pub struct Elab<'a> {
    pub prog: &'a Program,
    pub cfg: &'a serde_json::Value,
    pub graph: Graph,
    /// Parameters and buffers declared so far, to catch two block calls that
    /// would silently share one name.
    declared: HashMap<String, Span>,
    /// When set, re-declaring a parameter reuses it (a trunk run once per crop
    /// resolution shares its weights).
    pub share_state: bool,
    /// When set, `param` declares a buffer instead (a momentum encoder's
    /// weights: updated by EMA, never by gradients).
    pub params_as_buffers: bool,
    /// With `params_as_buffers`: each such buffer is read as its momentum
    /// update `m * buffer + (1 - m) * online` (the online parameter is the
    /// buffer's name without this prefix; `m` is this scalar input), which is
    /// also its new value (MoCo's key encoder, reference 4.1).
    pub ema: Option<(ValueId, String)>,
    /// When set, blocks run as PyTorch modules in eval mode: dropout,
    /// drop-path and attention dropout are identities and BatchNorm is an
    /// error (VISSL's frozen trunk in linear evaluation, reference 7.2; DeiT's
    /// distillation teacher, run forward-only inside a training step).
    pub eval_mode: bool,
    /// Call stack, for the notes of an error: (block, call site, scope).
    stack: Vec<(String, Option<Span>, String)>,
    fuel: u64,
    /// `eval` and `exec` frames open now (see `MAX_NESTING`).
    nesting: u32,
    /// The next random-stream key (one per dropout, drop-path and attention op).
    next_key: u32,
}

impl<'a> Elab<'a> {
    pub fn new(prog: &'a Program, cfg: &'a serde_json::Value) -> Self {
        Elab {
            prog,
            cfg,
            graph: Graph::new(),
            declared: HashMap::new(),
            share_state: false,
            params_as_buffers: false,
            ema: None,
            eval_mode: false,
            stack: Vec::new(),
            fuel: FUEL,
            nesting: 0,
            next_key: 0,
        }
    }

    /// `m * buffer + (1 - m) * online`, the buffer's new value (MoCoHook:
    /// the online weights as they are before this step's optimizer update).
    fn momentum_update(
        &mut self,
        buf: ValueId,
        full: &str,
        m: ValueId,
        prefix: &str,
        scope: &str,
        span: Span,
    ) -> R<ValueId> {
        // A buffer shared by several calls (one per crop resolution) is updated once.
        if let Some((_, v)) = self.graph.state_updates().iter().find(|(n, _)| n == full) {
            return Ok(*v);
        }
        let online_name = full.strip_prefix(prefix).unwrap_or(full);
        let online = self.graph.state(online_name).ok_or_else(|| {
            self.err(span, format!("the momentum encoder's `{full}` has no online parameter `{online_name}`"))
        })?;
        let g = &mut self.graph;
        let mut op = |op: Op, xs: &[ValueId]| g.add_op(op, xs, scope);
        let res = (|| {
            let online = op(Op::StopGradient, &[online])?;
            let kept = op(Op::Binary(BinaryOp::Mul), &[buf, m])?;
            let neg = op(Op::Unary(UnaryOp::Neg), &[m])?;
            let rest = op(Op::AddScalar { value: 1.0 }, &[neg])?;
            let moved = op(Op::Binary(BinaryOp::Mul), &[online, rest])?;
            op(Op::Binary(BinaryOp::Add), &[kept, moved])
        })();
        let new = res.map_err(|e| self.err(span, e.to_string()))?;
        self.graph.add_state_update(full, new);
        Ok(new)
    }

    /// A fresh key for an op that draws random numbers.
    pub fn random_key(&mut self) -> u32 {
        self.next_key += 1;
        self.next_key
    }

    /// An error at `span`, with the block call stack as notes.
    pub fn err(&self, span: Span, msg: impl Into<String>) -> Diagnostic {
        let mut d = self.prog.map.diagnostic(span, msg);
        for (block, site, scope) in self.stack.iter().rev() {
            let at = match site {
                Some(s) => {
                    let f = self.prog.map.file(s.file);
                    let (l, c) = f.line_col(s.start as usize);
                    format!(", called at {}:{l}:{c}", f.name)
                }
                None => String::new(),
            };
            let scope = if scope.is_empty() { String::new() } else { format!(" as `{scope}`") };
            d = d.with_note(format!("in `{block}`{scope}{at}"));
        }
        d
    }

    fn burn(&mut self, span: Span) -> R<()> {
        if self.fuel == 0 {
            return Err(self.err(span, "elaboration takes too long (more than 2,000,000 loop iterations and calls)"));
        }
        self.fuel -= 1;
        Ok(())
    }

    /// Calls a block with evaluated arguments, under module path `scope`.
    pub fn call_block(
        &mut self,
        r: BlockRef,
        pos: Vec<(Val, Span)>,
        named: Vec<(String, Val, Span)>,
        scope: String,
        site: Option<Span>,
    ) -> R<Val> {
        let def = self.prog.block(r);
        let span = site.unwrap_or(def.span);
        self.burn(span)?;
        if self.stack.len() >= MAX_CALL_DEPTH {
            return Err(self.err(
                span,
                format!("blocks nested more than {MAX_CALL_DEPTH} deep (does `{}` call itself?)", def.name),
            ));
        }
        self.stack.push((def.name.clone(), site, scope.clone()));
        let result = self.run_block(r, pos, named, scope, span);
        self.stack.pop();
        result
    }

    fn run_block(
        &mut self,
        r: BlockRef,
        pos: Vec<(Val, Span)>,
        named: Vec<(String, Val, Span)>,
        scope: String,
        span: Span,
    ) -> R<Val> {
        let def: &BlockDef = self.prog.block(r);
        let mut env = Env { vars: HashMap::new(), file: r.file, scope };
        if pos.len() > def.params.len() {
            return Err(self.err(
                pos[def.params.len()].1,
                format!("`{}` takes {} arguments but {} were given", def.name, def.params.len(), pos.len()),
            ));
        }
        let mut given: Vec<Option<(Val, Span)>> = vec![None; def.params.len()];
        for (i, p) in pos.into_iter().enumerate() {
            given[i] = Some(p);
        }
        for (name, v, s) in named {
            let Some(i) = def.params.iter().position(|p| p.name == name) else {
                let names: Vec<&str> = def.params.iter().map(|p| p.name.as_str()).collect();
                return Err(
                    self.err(s, format!("`{}` has no parameter `{name}`{}", def.name, did_you_mean(&name, &names)))
                );
            };
            if given[i].is_some() {
                return Err(self.err(s, format!("argument `{name}` given twice")));
            }
            given[i] = Some((v, s));
        }
        // Scalars first (defaults may read earlier parameters), then tensor patterns,
        // whose dims may name any scalar parameter.
        let mut tensors = Vec::new();
        for (i, p) in def.params.iter().enumerate() {
            let (v, vspan) = match given[i].take() {
                Some(g) => g,
                None => match &p.default {
                    Some(d) => (self.eval(&mut env, d)?, d.span),
                    None => {
                        return Err(self.err(span, format!("`{}` needs argument `{}`", def.name, p.name)));
                    }
                },
            };
            let v = match &p.ty {
                TypeExpr::Scalar(t) => self.check_scalar(*t, v, &p.name, vspan, p.span)?,
                TypeExpr::Tensor(pat) => {
                    tensors.push((p.name.clone(), v.clone(), pat.clone(), vspan));
                    v
                }
            };
            env.vars.insert(p.name.clone(), v);
        }
        for (name, v, pat, vspan) in tensors {
            let V::Tensor(t) = v.v else {
                return Err(self.err(vspan, format!("argument `{name}` must be a tensor, got {}", v.type_name())));
            };
            self.match_pattern(&mut env, &pat, t, &name)?;
        }
        for stmt in &def.body {
            if let Flow::Return(v) = self.exec(&mut env, stmt)? {
                return Ok(v);
            }
        }
        Ok(Val::new(V::None))
    }

    fn check_scalar(&self, t: ScalarType, v: Val, name: &str, vspan: Span, pspan: Span) -> R<Val> {
        let ok = match (t, &v.v) {
            (ScalarType::Any, _) => true,
            (ScalarType::Int, V::Int(_)) => true,
            (ScalarType::Float, V::Float(_)) => true,
            (ScalarType::Float, V::Int(i)) => {
                return Ok(Val { v: V::Float(*i as f64), origin: v.origin, nest: 0 });
            }
            (ScalarType::Bool, V::Bool(_)) => true,
            (ScalarType::Str, V::Str(_)) => true,
            (ScalarType::Init, V::Init(_)) => true,
            (ScalarType::List, V::List(_)) => true,
            _ => false,
        };
        if ok {
            return Ok(v);
        }
        let expected = match t {
            ScalarType::Int => "int",
            ScalarType::Float => "float",
            ScalarType::Bool => "bool",
            ScalarType::Str => "str",
            ScalarType::Init => "init",
            ScalarType::List => "list",
            ScalarType::Any => "any",
        };
        let span = if v.origin.is_some() { pspan } else { vspan };
        Err(self.err(span, format!("parameter `{name}` expects {expected}, got {} {}", v.type_name(), v.describe())))
    }

    /// Matches a tensor's shape against `[B, N, D] dtype`: unbound names bind,
    /// everything else must be equal.
    pub fn match_pattern(&mut self, env: &mut Env, pat: &TensorPattern, t: ValueId, what: &str) -> R<()> {
        let ty = self.graph.ty(t).clone();
        if let Some(dt) = &pat.dtype {
            let want = parse_dtype(dt).ok_or_else(|| self.err(pat.span, format!("unknown dtype `{dt}`")))?;
            if want != ty.dtype {
                return Err(self.err(pat.span, format!("`{what}` has dtype {}, expected {want}", ty.dtype)));
            }
        }
        let ell = pat.dims.iter().filter(|d| matches!(d, DimPattern::Ellipsis(_))).count();
        if ell > 1 {
            return Err(self.err(pat.span, "at most one `...` in a shape pattern"));
        }
        let fixed = pat.dims.len() - ell;
        let rank = ty.shape.rank();
        if (ell == 0 && rank != fixed) || rank < fixed {
            return Err(self.err(
                pat.span,
                format!(
                    "`{what}` has shape {} (rank {rank}), but the pattern expects rank {}{fixed}",
                    ty.shape,
                    if ell > 0 { "at least " } else { "" }
                ),
            ));
        }
        let mut axis = 0;
        for d in &pat.dims {
            match d {
                DimPattern::Ellipsis(_) => axis += rank - fixed,
                DimPattern::Expr(e) => {
                    let actual = ty.shape.0[axis];
                    if let ExprKind::Name(n) = &e.kind {
                        if !env.vars.contains_key(n) && self.prog.constant(env.file, n).is_none() && n != "cfg" {
                            env.vars.insert(n.clone(), Val::from_dim(actual));
                            axis += 1;
                            continue;
                        }
                    }
                    let want = self.eval(env, e)?;
                    let Some(wd) = want.as_dim() else {
                        return Err(self.err(e.span, format!("a dimension must be an int, got {}", want.type_name())));
                    };
                    if wd != actual {
                        let src = source_text(self, e.span);
                        return Err(self.err(
                            e.span,
                            format!(
                                "`{what}` has shape {}, but dim {axis} must be `{src}` = {}; it is {actual}",
                                ty.shape,
                                want.describe()
                            ),
                        ));
                    }
                    axis += 1;
                }
            }
        }
        Ok(())
    }

    fn exec_block(&mut self, env: &mut Env, stmts: &[Stmt]) -> R<Flow> {
        for s in stmts {
            if let Flow::Return(v) = self.exec(env, s)? {
                return Ok(Flow::Return(v));
            }
        }
        Ok(Flow::Normal)
    }

    /// Enters one more level of `eval` or `exec`, refused past `MAX_NESTING`.
    fn enter(&mut self, span: Span) -> R<()> {
        if self.nesting >= MAX_NESTING {
            return Err(self.err(
                span,
                format!(
                    "expressions, statements and block calls nested more than {MAX_NESTING} deep; split the expression or flatten the calls"
                ),
            ));
        }
        self.nesting += 1;
        Ok(())
    }

    fn exec(&mut self, env: &mut Env, stmt: &Stmt) -> R<Flow> {
        self.enter(stmt.span)?;
        let r = self.exec_stmt(env, stmt);
        self.nesting -= 1;
        r
    }

    fn exec_stmt(&mut self, env: &mut Env, stmt: &Stmt) -> R<Flow> {
        match &stmt.kind {
            StmtKind::Param { name, ty, init } | StmtKind::Buffer { name, ty, init } => {
                let is_param = matches!(stmt.kind, StmtKind::Param { .. }) && !self.params_as_buffers;
                let shape = self.concrete_shape(env, ty)?;
                let dtype = match &ty.dtype {
                    Some(d) => parse_dtype(d).ok_or_else(|| self.err(ty.span, format!("unknown dtype `{d}`")))?,
                    None => DType::F32,
                };
                let initv = self.eval(env, init)?;
                let V::Init(init) = initv.v else {
                    return Err(self.err(
                        init.span,
                        format!(
                            "expected an init spec such as `zeros` or `trunc_normal(0.02)`, got {}",
                            initv.type_name()
                        ),
                    ));
                };
                let full = join_key(&env.scope, name);
                if let Some(prev) = self.declared.get(&full) {
                    if !self.share_state {
                        let f = self.prog.map.file(prev.file);
                        let (l, c) = f.line_col(prev.start as usize);
                        return Err(self.err(stmt.span, format!(
                            "`{full}` is declared twice (first at {}:{l}:{c}); give each block call its own scope with `as name`",
                            f.name
                        )));
                    }
                }
                self.declared.insert(full.clone(), stmt.span);
                let tt = TensorType::new(shape, dtype);
                let id = if is_param {
                    self.graph.add_param(&full, tt, init, true, &env.scope)
                } else {
                    self.graph.add_buffer(&full, tt, init, &env.scope)
                }
                .map_err(|e| self.err(stmt.span, e.to_string()))?;
                let id = match (self.ema.clone(), matches!(stmt.kind, StmtKind::Param { .. }) && self.params_as_buffers)
                {
                    (Some((m, prefix)), true) => self.momentum_update(id, &full, m, &prefix, &env.scope, stmt.span)?,
                    _ => id,
                };
                env.vars.insert(name.clone(), Val::new(V::Tensor(id)));
                Ok(Flow::Normal)
            }
            StmtKind::For { var, start, end, body } => {
                // Ranges are walked lazily: `0..10**9` burns fuel, not memory.
                let (range, list) = match end {
                    Some(end) => {
                        let a = self.eval_int(env, start)?;
                        let b = self.eval_int(env, end)?;
                        (Some(a..b.max(a)), None)
                    }
                    None => match self.eval(env, start)?.v {
                        V::List(l) => (None, Some(l)),
                        _ => return Err(self.err(start.span, "`for x in` needs a list or a range `a..b`")),
                    },
                };
                let items: Box<dyn Iterator<Item = Val>> = match (range, list) {
                    (Some(r), _) => Box::new(r.map(Val::int)),
                    (None, Some(l)) => Box::new((0..l.len()).map(move |i| l[i].clone())),
                    (None, None) => Box::new(std::iter::empty()),
                };
                for it in items {
                    self.burn(stmt.span)?;
                    env.vars.insert(var.clone(), it);
                    if let Flow::Return(v) = self.exec_block(env, body)? {
                        return Ok(Flow::Return(v));
                    }
                }
                Ok(Flow::Normal)
            }
            StmtKind::If { cond, then, otherwise } => {
                if self.eval_bool(env, cond)? {
                    self.exec_block(env, then)
                } else {
                    self.exec_block(env, otherwise)
                }
            }
            StmtKind::Return(es) => {
                let mut vals = Vec::with_capacity(es.len());
                for e in es {
                    vals.push(self.eval(env, e)?);
                }
                Ok(Flow::Return(if vals.len() == 1 { vals.pop().expect("one value") } else { Val::list(vals) }))
            }
            StmtKind::Assert { cond, message } => {
                if self.eval_bool(env, cond)? {
                    return Ok(Flow::Normal);
                }
                let text = source_text(self, cond.span);
                let msg = match message {
                    Some(m) => format!("{}  (`{text}` is false)", interpolate(m, env)),
                    None => format!("check failed: `{text}`"),
                };
                let mut d = self.err(cond.span, msg);
                for name in names_in(cond) {
                    if let Some(v) = env.vars.get(&name) {
                        d = d.with_note(format!("{name} = {}", v.describe()));
                    }
                }
                Err(d)
            }
            StmtKind::Expect { value, pattern } => {
                let v = self.eval(env, value)?;
                let V::Tensor(t) = v.v else {
                    return Err(self.err(value.span, format!("`expect` needs a tensor, got {}", v.type_name())));
                };
                let what = source_text(self, value.span);
                self.match_pattern(env, pattern, t, &what)?;
                Ok(Flow::Normal)
            }
            StmtKind::Update { name, value } => {
                let target = env.vars.get(name).cloned();
                let Some(Val { v: V::Tensor(buf), .. }) = target else {
                    return Err(self.err(stmt.span, format!("`update` needs a buffer; `{name}` is not a tensor here")));
                };
                let Op::Buffer { name: bname, .. } = &self.graph.node(buf).op else {
                    return Err(self.err(stmt.span, format!("`{name}` is not a buffer; only buffers can be updated")));
                };
                let bname = bname.clone();
                let v = self.eval_tensor(env, value)?;
                if self.graph.ty(v) != self.graph.ty(buf) {
                    return Err(self.err(
                        value.span,
                        format!(
                            "new value of `{bname}` has type {}, the buffer has {}",
                            self.graph.ty(v),
                            self.graph.ty(buf)
                        ),
                    ));
                }
                self.graph.add_state_update(&bname, v);
                Ok(Flow::Normal)
            }
            StmtKind::Assign { targets, value } => {
                let v = self.eval(env, value)?;
                if targets.len() == 1 {
                    env.vars.insert(targets[0].clone(), v);
                    return Ok(Flow::Normal);
                }
                match &v.v {
                    V::List(items) if items.len() == targets.len() => {
                        for (t, it) in targets.iter().zip(items.iter()) {
                            env.vars.insert(t.clone(), it.clone());
                        }
                        Ok(Flow::Normal)
                    }
                    _ => Err(self
                        .err(value.span, format!("cannot unpack {} into {} names", describe_len(&v), targets.len()))),
                }
            }
        }
    }

    /// A parameter or buffer shape: every dim a known positive int.
    fn concrete_shape(&mut self, env: &mut Env, pat: &TensorPattern) -> R<Shape> {
        let mut dims = Vec::new();
        for d in &pat.dims {
            match d {
                DimPattern::Ellipsis(s) => return Err(self.err(*s, "`...` is only allowed in argument patterns")),
                DimPattern::Expr(e) => {
                    let v = self.eval(env, e)?;
                    match v.v {
                        V::Int(i) if i > 0 => dims.push(Dim::Const(i as u64)),
                        _ => {
                            return Err(self.err(
                                e.span,
                                format!("a parameter or buffer dimension must be a positive int, got {}", v.describe()),
                            ))
                        }
                    }
                }
            }
        }
        Ok(Shape(dims))
    }

    pub fn eval_int(&mut self, env: &mut Env, e: &Expr) -> R<i64> {
        let v = self.eval(env, e)?;
        match v.v {
            V::Int(i) => Ok(i),
            _ => Err(self.err(e.span, format!("expected an int, got {}", v.describe()))),
        }
    }

    fn eval_bool(&mut self, env: &mut Env, e: &Expr) -> R<bool> {
        let v = self.eval(env, e)?;
        match v.v {
            V::Bool(b) => Ok(b),
            _ => Err(self.err(e.span, format!("expected a bool, got {}", v.describe()))),
        }
    }

    pub fn eval_tensor(&mut self, env: &mut Env, e: &Expr) -> R<ValueId> {
        let v = self.eval(env, e)?;
        match v.v {
            V::Tensor(t) => Ok(t),
            _ => Err(self.err(e.span, format!("expected a tensor, got {}", v.describe()))),
        }
    }

    pub fn eval(&mut self, env: &mut Env, e: &Expr) -> R<Val> {
        self.enter(e.span)?;
        let r = self.eval_expr(env, e);
        self.nesting -= 1;
        match r {
            Ok(v) if v.nest > MAX_VALUE_NESTING => Err(self.err(
                e.span,
                format!("this value is a list nested more than {MAX_VALUE_NESTING} deep (lists inside lists)"),
            )),
            r => r,
        }
    }

    fn eval_expr(&mut self, env: &mut Env, e: &Expr) -> R<Val> {
        match &e.kind {
            ExprKind::Int(i) => Ok(Val::int(*i)),
            ExprKind::Float(f) => Ok(Val::new(V::Float(*f))),
            ExprKind::Str(s) => Ok(Val::new(V::Str(Rc::from(s.as_str())))),
            ExprKind::Bool(b) => Ok(Val::new(V::Bool(*b))),
            ExprKind::None => Ok(Val::new(V::None)),
            ExprKind::Name(n) => self.lookup(env, n, e.span),
            ExprKind::List(items) => {
                let mut out = Vec::with_capacity(items.len());
                for it in items {
                    out.push(self.eval(env, it)?);
                }
                Ok(Val::list(out))
            }
            ExprKind::Cond(c, a, b) => {
                if self.eval_bool(env, c)? {
                    self.eval(env, a)
                } else {
                    self.eval(env, b)
                }
            }
            ExprKind::Unary(op, x) => {
                let v = self.eval(env, x)?;
                match (op, &v.v) {
                    (UnOp::Not, V::Bool(b)) => Ok(Val::new(V::Bool(!b))),
                    (UnOp::Neg, V::Int(i)) => {
                        i.checked_neg().map(Val::int).ok_or_else(|| self.err(e.span, "integer overflow"))
                    }
                    (UnOp::Neg, V::Float(f)) => Ok(Val::new(V::Float(-f))),
                    (UnOp::Neg, V::Tensor(t)) => self.op(env, Op::Unary(UnaryOp::Neg), &[*t], e.span),
                    _ => Err(self.err(
                        e.span,
                        format!("cannot apply `{}` to {}", if *op == UnOp::Neg { "-" } else { "not" }, v.type_name()),
                    )),
                }
            }
            ExprKind::Binary(op, a, b) => self.binary(env, *op, a, b, e.span),
            ExprKind::Field(base, name) => {
                let v = self.eval(env, base)?;
                match &v.v {
                    V::Cfg(path) => self.config_value(&join_key(path, name), e.span),
                    _ => {
                        Err(self
                            .err(e.span, format!("{} has no field `{name}` (only config sections do)", v.type_name())))
                    }
                }
            }
            ExprKind::Index(base, items) => {
                let v = self.eval(env, base)?;
                match &v.v {
                    V::List(list) => {
                        let [IndexItem::Expr(ix)] = items.as_slice() else {
                            return self.list_slice(env, list.clone(), items, e.span);
                        };
                        let i = self.eval_int(env, ix)?;
                        let n = list.len() as i64;
                        let j = if i < 0 { i + n } else { i };
                        if j < 0 || j >= n {
                            return Err(self.err(ix.span, format!("index {i} is out of range for a list of {n}")));
                        }
                        Ok(list[j as usize].clone())
                    }
                    V::Tensor(t) => super::index::tensor_index(self, env, *t, items, e.span),
                    _ => Err(self.err(e.span, format!("cannot index {}", v.type_name()))),
                }
            }
            ExprKind::Call { callee, args, scope } => self.call(env, callee, args, scope.as_deref(), e.span),
        }
    }

    fn list_slice(&mut self, env: &mut Env, list: Rc<Vec<Val>>, items: &[IndexItem], span: Span) -> R<Val> {
        let [IndexItem::Slice(lo, hi)] = items else {
            return Err(self.err(span, "a list takes one index or one slice `a:b`"));
        };
        let n = list.len() as i64;
        let clamp = |i: i64| if i < 0 { (i + n).max(0) } else { i.min(n) };
        let a = match lo {
            Some(x) => clamp(self.eval_int(env, x)?),
            None => 0,
        };
        let b = match hi {
            Some(x) => clamp(self.eval_int(env, x)?),
            None => n,
        };
        Ok(Val::list(list[a as usize..b.max(a) as usize].to_vec()))
    }

    fn lookup(&mut self, env: &mut Env, n: &str, span: Span) -> R<Val> {
        if let Some(v) = env.vars.get(n) {
            return Ok(v.clone());
        }
        if let Some(c) = self.prog.constant(env.file, n) {
            self.burn(span)?;
            if self.stack.len() >= MAX_CALL_DEPTH {
                return Err(self.err(span, format!("constant `{n}` refers to itself")));
            }
            let mut cenv = Env { vars: HashMap::new(), file: env.file, scope: String::new() };
            self.stack.push((format!("let {n}"), Some(span), String::new()));
            let v = self.eval(&mut cenv, &c.value);
            self.stack.pop();
            return v;
        }
        if n == "cfg" {
            return Ok(Val::new(V::Cfg(Rc::from(""))));
        }
        if let Some(v) = super::builtins::constant(n) {
            return Ok(v);
        }
        let mut names: Vec<&str> = env.vars.keys().map(|s| s.as_str()).collect();
        names.extend(self.prog.file(env.file).constants.iter().map(|c| c.name.as_str()));
        Err(self.err(span, format!("unknown name `{n}`{}", did_you_mean(n, &names))))
    }

    fn config_value(&self, key: &str, span: Span) -> R<Val> {
        match json_get(self.cfg, key) {
            Some(j) => Ok(from_json(j, key)),
            None => {
                let (parent, last) = key.rsplit_once('.').unwrap_or(("", key));
                let siblings: Vec<String> = match json_get(self.cfg, parent) {
                    Some(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
                    _ => Vec::new(),
                };
                let sib: Vec<&str> = siblings.iter().map(|s| s.as_str()).collect();
                Err(self.err(span, format!("the config has no key `{key}`{}", did_you_mean(last, &sib))))
            }
        }
    }

    fn call(&mut self, env: &mut Env, callee: &str, args: &[Arg], scope: Option<&[ScopeSeg]>, span: Span) -> R<Val> {
        let mut pos = Vec::new();
        let mut named: Vec<(String, Val, Span)> = Vec::new();
        for a in args {
            let v = self.eval(env, &a.value)?;
            match &a.name {
                Some(n) => named.push((n.clone(), v, a.value.span)),
                None => {
                    if !named.is_empty() {
                        return Err(self.err(a.value.span, "positional argument after a named one"));
                    }
                    pos.push((v, a.value.span));
                }
            }
        }
        let scope = match scope {
            None => env.scope.clone(),
            Some(segs) => {
                let mut s = env.scope.clone();
                for seg in segs {
                    let part = match seg {
                        ScopeSeg::Name(n) => n.clone(),
                        ScopeSeg::Index(e) => match self.eval(env, e)? {
                            Val { v: V::Int(i), .. } if i >= 0 => i.to_string(),
                            Val { v: V::Str(s), .. } if !s.is_empty() && !s.contains('.') => s.to_string(),
                            v => {
                                return Err(self.err(
                                    e.span,
                                    format!("a scope index must be a non-negative int or a name, got {}", v.describe()),
                                ))
                            }
                        },
                    };
                    s = join_key(&s, &part);
                }
                s
            }
        };
        if let Some(r) = self.prog.lookup(env.file, callee) {
            return self.call_block(r, pos, named, scope, Some(span));
        }
        let saved = std::mem::replace(&mut env.scope, scope);
        let out = super::builtins::call(self, env, callee, pos, named, span);
        env.scope = saved;
        match out {
            Some(r) => r,
            None => {
                let mut names: Vec<&str> = self.prog.visible_names(env.file).collect();
                names.extend(super::builtins::NAMES.iter().copied());
                Err(self.err(span, format!("unknown block or function `{callee}`{}", did_you_mean(callee, &names))))
            }
        }
    }

    /// Adds an op in the current scope; shape errors point at `span`.
    pub fn op(&mut self, env: &Env, op: Op, operands: &[ValueId], span: Span) -> R<Val> {
        let id = self.graph.add_op(op, operands, &env.scope).map_err(|e| self.err(span, e.to_string()))?;
        Ok(Val::new(V::Tensor(id)))
    }

    fn binary(&mut self, env: &mut Env, op: BinOp, a: &Expr, b: &Expr, span: Span) -> R<Val> {
        // `and` / `or` short-circuit, so `x and cfg.KEY` does not read KEY when x is false.
        if matches!(op, BinOp::And | BinOp::Or) {
            let l = self.eval_bool(env, a)?;
            if (op == BinOp::And && !l) || (op == BinOp::Or && l) {
                return Ok(Val::new(V::Bool(l)));
            }
            return Ok(Val::new(V::Bool(self.eval_bool(env, b)?)));
        }
        let l = self.eval(env, a)?;
        let r = self.eval(env, b)?;
        super::arith::binary(self, env, op, l, r, span)
    }
}

pub fn parse_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "i64" => DType::I64,
        _ => return None,
    })
}

pub fn did_you_mean(name: &str, candidates: &[&str]) -> String {
    let best = candidates
        .iter()
        .map(|c| (strsim::normalized_damerau_levenshtein(name, c), *c))
        .filter(|(s, _)| *s > 0.5)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((_, c)) => format!("; did you mean `{c}`?"),
        None => String::new(),
    }
}

fn describe_len(v: &Val) -> String {
    match &v.v {
        V::List(l) => format!("a list of {}", l.len()),
        _ => format!("a {}", v.type_name()),
    }
}

fn source_text(el: &Elab, span: Span) -> String {
    let f = el.prog.map.file(span.file);
    f.text.get(span.start as usize..span.end as usize).unwrap_or("").to_string()
}

/// `{name}` in an assert message is replaced by the variable's value.
fn interpolate(msg: &str, env: &Env) -> String {
    let mut out = String::new();
    let mut rest = msg;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => {
                let key = &after[..close];
                match env.vars.get(key) {
                    Some(v) => out.push_str(&v.to_string()),
                    None => {
                        out.push('{');
                        out.push_str(key);
                        out.push('}');
                    }
                }
                rest = &after[close + 1..];
            }
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Variable names an expression reads, in order of appearance.
fn names_in(e: &Expr) -> Vec<String> {
    fn walk(e: &Expr, out: &mut Vec<String>) {
        match &e.kind {
            ExprKind::Name(n) if !out.contains(n) => out.push(n.clone()),
            ExprKind::List(xs) => xs.iter().for_each(|x| walk(x, out)),
            ExprKind::Unary(_, x) | ExprKind::Field(x, _) => walk(x, out),
            ExprKind::Binary(_, a, b) => {
                walk(a, out);
                walk(b, out)
            }
            ExprKind::Cond(a, b, c) => {
                walk(a, out);
                walk(b, out);
                walk(c, out)
            }
            ExprKind::Index(x, _) => walk(x, out),
            ExprKind::Call { args, .. } => args.iter().for_each(|a| walk(&a.value, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(e, &mut out);
    out
}

/// Used by `arith`: binary tensor ops by their DSL operator.
pub fn tensor_binop(op: BinOp) -> Option<BinaryOp> {
    Some(match op {
        BinOp::Add => BinaryOp::Add,
        BinOp::Sub => BinaryOp::Sub,
        BinOp::Mul => BinaryOp::Mul,
        BinOp::Div => BinaryOp::Div,
        _ => return None,
    })
}
