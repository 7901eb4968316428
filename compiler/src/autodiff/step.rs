//! The training step: backward, global-norm gradient clipping and the
//! optimizer update as graph ops. Learning rate, weight decay and Adam's bias
//! corrections are runtime scalars (graph inputs) so schedules need no
//! recompilation:
//! - `optim.lr.<group>`, `optim.weight_decay.<group>` per parameter group,
//! - `optim.bias_correction1`, `optim.bias_correction2` (AdamW: 1 - beta^t).
//!
//! Every op added after backward is scoped under `optim` (`optim.clip`,
//! `optim.<param>`): the precision pass keeps those in f32 (PyTorch clips
//! and steps on the f32 .grad, outside autocast).

use super::backward;
use super::rules::Builder;
use crate::ir::{BinaryOp, DType, Graph, Init, IrError, Op, ReduceOp, Shape, TensorType, UnaryOp, ValueId};
use crate::param_groups::ParamGroup;
use serde_json::Value as J;

#[derive(Clone, Debug, PartialEq)]
pub enum Optimizer {
    /// torch.optim.AdamW (reference 6.1): decoupled decay times the current lr.
    AdamW { beta1: f64, beta2: f64, eps: f64 },
    /// torch.optim.SGD with momentum (dampening 0) and optional Nesterov; the
    /// weight decay is added to the gradient.
    Sgd { momentum: f64, nesterov: bool },
}

#[derive(Clone, Debug, PartialEq)]
pub struct StepOptions {
    pub optimizer: Optimizer,
    /// `MODEL.GRAD_CLIP`: max L2 norm of all gradients together.
    pub clip_max_norm: Option<f64>,
    /// `MODEL.TEMP_FROZEN_PARAMS_ITER_MAP`: parameters whose first update is
    /// at iteration N (their AdamW step count starts there).
    pub late_start: Vec<(String, u64)>,
    /// SwAV's `normalize_last_layer`: L2-normalise each prototype row after
    /// every step (NormalizePrototypesHook, reference 4.2).
    pub normalize_prototypes: bool,
    /// Processes of a data-parallel run (`DISTRIBUTED.NUM_NODES` x
    /// `NUM_PROC_PER_NODE`); above 1 the gradients are averaged across them.
    pub world: u64,
}

impl StepOptions {
    /// From the experiment config (`OPTIMIZER.*`, `MODEL.GRAD_CLIP.*`).
    pub fn from_config(cfg: &J) -> Result<StepOptions, String> {
        let get = |k: &str| crate::elaborate::json_get(cfg, k);
        let f = |k: &str, d: f64| get(k).and_then(|v| v.as_f64()).unwrap_or(d);
        let name = get("OPTIMIZER.name").and_then(|v| v.as_str()).unwrap_or("adamw");
        let optimizer = match name {
            "adamw" => {
                let betas: Vec<f64> = get("OPTIMIZER.betas")
                    .and_then(|v| v.as_array())
                    .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                    .unwrap_or_default();
                let (beta1, beta2) = match betas.as_slice() {
                    [a, b] => (*a, *b),
                    [] => (0.9, 0.999),
                    _ => return Err(format!("`OPTIMIZER.betas` must be two numbers, got {betas:?}")),
                };
                // ClassyVision's AdamW eps; VISSL sets none (reference 6.1).
                Optimizer::AdamW { beta1, beta2, eps: 1e-8 }
            }
            "sgd" => Optimizer::Sgd {
                momentum: f("OPTIMIZER.momentum", 0.0),
                nesterov: get("OPTIMIZER.nesterov").and_then(|v| v.as_bool()).unwrap_or(false),
            },
            other => return Err(format!("`OPTIMIZER.name` is `{other}`; tessera supports adamw and sgd")),
        };
        let clip = get("MODEL.GRAD_CLIP.USE_GRAD_CLIP").and_then(|v| v.as_bool()).unwrap_or(false);
        let clip_max_norm = if clip {
            let norm_type = f("MODEL.GRAD_CLIP.NORM_TYPE", 2.0);
            if norm_type != 2.0 {
                return Err(format!("`MODEL.GRAD_CLIP.NORM_TYPE` is {norm_type}; only the L2 norm (2) is supported"));
            }
            let max_norm = f("MODEL.GRAD_CLIP.MAX_NORM", 1.0);
            // A norm is never negative: 0 or less would zero (or flip) every gradient.
            if !(max_norm > 0.0 && max_norm.is_finite()) {
                return Err(format!(
                    "`MODEL.GRAD_CLIP.MAX_NORM` is {max_norm}: the largest gradient norm must be a positive number (1.0 is usual), or set MODEL.GRAD_CLIP.USE_GRAD_CLIP: False"
                ));
            }
            Some(max_norm)
        } else {
            None
        };
        let late_start = temp_frozen(cfg)?;
        let normalize_prototypes = get("LOSS.name").and_then(|v| v.as_str()) == Some("swav_loss")
            && get("LOSS.swav_loss.normalize_last_layer").and_then(|v| v.as_bool()).unwrap_or(true);
        let count = |k: &str| get(k).and_then(|v| v.as_u64()).unwrap_or(1);
        let world = count("DISTRIBUTED.NUM_NODES") * count("DISTRIBUTED.NUM_PROC_PER_NODE");
        if world == 0 {
            return Err("`DISTRIBUTED.NUM_NODES` and `DISTRIBUTED.NUM_PROC_PER_NODE` must be at least 1".into());
        }
        if world > 1 && get("DISTRIBUTED.MANUAL_GRADIENT_REDUCTION").and_then(|v| v.as_bool()) == Some(true) {
            return Err("`DISTRIBUTED.MANUAL_GRADIENT_REDUCTION` is true: tessera always reduces gradients inside the training step, each as the backward pass produces it (set it to false)".into());
        }
        Ok(StepOptions { optimizer, clip_max_norm, late_start, normalize_prototypes, world })
    }
}

/// `MODEL.TEMP_FROZEN_PARAMS_ITER_MAP` as (parameter, iterations) pairs, the
/// DDP `module.` prefix removed.
pub fn temp_frozen(cfg: &J) -> Result<Vec<(String, u64)>, String> {
    let key = "MODEL.TEMP_FROZEN_PARAMS_ITER_MAP";
    let Some(J::Array(entries)) = crate::elaborate::json_get(cfg, key) else { return Ok(Vec::new()) };
    entries
        .iter()
        .enumerate()
        .map(|(i, e)| match e.as_array().map(|a| a.as_slice()) {
            Some([J::String(name), n]) if n.as_u64().is_some() => {
                Ok((name.strip_prefix("module.").unwrap_or(name).to_string(), n.as_u64().expect("checked")))
            }
            _ => Err(format!("`{key}.{i}` must be [parameter name, iterations], got {e}")),
        })
        .collect()
}

/// The names of the bias-correction inputs of a parameter whose AdamW step
/// count starts at iteration `start`.
pub fn bias_correction_inputs(start: u64) -> (String, String) {
    if start == 0 {
        ("optim.bias_correction1".into(), "optim.bias_correction2".into())
    } else {
        (format!("optim.bias_correction1.from_iter_{start}"), format!("optim.bias_correction2.from_iter_{start}"))
    }
}

fn scalar_input(g: &mut Graph, name: &str) -> Result<ValueId, IrError> {
    g.add_input(name, Shape::scalar(), DType::F32)
}

/// Turns the forward graph `g` (with an output named `loss`) into the
/// training step. Gradients are also graph outputs `grad.<param>`: the
/// gradients the optimizer applies (averaged over the ranks of a
/// data-parallel run, then clipped), for checks against other frameworks.
pub fn training_step(mut g: Graph, groups: &[ParamGroup], opts: &StepOptions) -> Result<Graph, IrError> {
    let loss = g
        .outputs()
        .iter()
        .find(|(n, _)| n == "loss")
        .map(|(_, v)| *v)
        .ok_or_else(|| IrError::Invalid("the forward graph has no `loss` output".into()))?;
    batch_norm_updates(&mut g)?;
    let mut grads = backward(&mut g, loss)?;
    if opts.world > 1 {
        average_across_ranks(&mut g, &mut grads, opts.world)?;
    }
    if let Some(max_norm) = opts.clip_max_norm {
        clip(&mut g, &mut grads, max_norm)?;
    }
    for (name, d) in &grads {
        g.set_output(&format!("grad.{name}"), *d);
    }
    // AdamW's bias corrections per step clock: a parameter frozen for its
    // first N iterations (grad None) gets its own step count (torch.optim).
    let mut clocks: Vec<(u64, (ValueId, ValueId))> = Vec::new();
    let mut bias_corrections = |g: &mut Graph, pname: &str| -> Result<Option<(ValueId, ValueId)>, IrError> {
        if !matches!(opts.optimizer, Optimizer::AdamW { .. }) {
            return Ok(None);
        }
        let start = opts.late_start.iter().find(|(n, _)| n == pname).map_or(0, |(_, s)| *s);
        if let Some((_, ids)) = clocks.iter().find(|(s, _)| *s == start) {
            return Ok(Some(*ids));
        }
        let (n1, n2) = bias_correction_inputs(start);
        let ids = (scalar_input(g, &n1)?, scalar_input(g, &n2)?);
        clocks.push((start, ids));
        Ok(Some(ids))
    };
    // By name, once: a search per parameter is quadratic in the depth.
    let mut grad_of = std::collections::HashMap::new();
    for (name, d) in &grads {
        grad_of.entry(name.as_str()).or_insert(*d);
    }
    for group in groups {
        let lr = scalar_input(&mut g, &format!("optim.lr.{}", group.name))?;
        let wd = scalar_input(&mut g, &format!("optim.weight_decay.{}", group.name))?;
        for pname in &group.params {
            // A parameter the loss does not reach has no gradient: no update,
            // as PyTorch skips parameters whose grad is None.
            let Some(&grad) = grad_of.get(pname.as_str()) else { continue };
            let p = g.state(pname).ok_or_else(|| IrError::Invalid(format!("no parameter `{pname}`")))?;
            let ty = g.ty(p).clone();
            let bc = bias_corrections(&mut g, pname)?;
            let mut b = Builder { g: &mut g, scope: format!("optim.{pname}") };
            let u = Update { name: pname, p, grad, ty, lr, wd };
            match (&opts.optimizer, bc) {
                (Optimizer::AdamW { beta1, beta2, eps }, Some((bc1, bc2))) => {
                    adamw(&mut b, &u, bc1, bc2, *beta1, *beta2, *eps)?
                }
                (Optimizer::Sgd { momentum, nesterov }, _) => sgd(&mut b, &u, *momentum, *nesterov)?,
                _ => unreachable!("bias corrections exist for AdamW"),
            }
        }
    }
    if opts.normalize_prototypes {
        for p in crate::compose::prototypes(&g) {
            let Op::Param { name, .. } = g.node(p).op.clone() else { continue };
            // After the update, or on its own while the parameter is frozen
            // (the hook runs after every step).
            let new = g.state_update(&name).unwrap_or(p);
            let normed = g.add_op(Op::L2Normalize { axis: 1, eps: 1e-12 }, &[new], &format!("optim.{name}"))?;
            g.set_state_update(&name, normed);
        }
    }
    g.verify()?;
    Ok(g)
}

/// PyTorch's BatchNorm in training mode also updates its running statistics.
fn batch_norm_updates(g: &mut Graph) -> Result<(), IrError> {
    for v in g.node_ids() {
        let Op::BatchNorm { momentum, .. } = g.node(v).op else { continue };
        let xs = g.operands(v);
        let scope = g.node(v).scope.clone();
        for (i, unbiased_var) in [(3, false), (4, true)] {
            let Op::Buffer { name, .. } = g.node(xs[i]).op.clone() else { continue };
            let new = g.add_op(Op::RunningStat { momentum, unbiased_var }, &[xs[i], xs[0]], &scope)?;
            g.add_state_update(&name, new);
        }
    }
    Ok(())
}

/// DDP's gradient average: each gradient all-reduced (mean) over the
/// `world` ranks as soon as the backward pass has produced it, so that the
/// reduction of late layers overlaps the backward of early ones; clipping
/// and the optimizer then see what one process with the global batch would
/// (each rank's loss is a mean over its own samples).
fn average_across_ranks(g: &mut Graph, grads: &mut [(String, ValueId)], world: u64) -> Result<(), IrError> {
    let mut b = Builder { g, scope: tessera_plan::GRADIENT_ALL_REDUCE_SCOPE.into() };
    for (_, d) in grads.iter_mut() {
        *d = b.op(Op::AllReduce { op: ReduceOp::Mean, world }, &[*d])?;
    }
    Ok(())
}

/// torch.nn.utils.clip_grad_norm_ over all gradients as one vector
/// (reference 6.4): g *= min(1, max_norm / (||g|| + 1e-6)).
fn clip(g: &mut Graph, grads: &mut [(String, ValueId)], max_norm: f64) -> Result<(), IrError> {
    let mut b = Builder { g, scope: "optim.clip".into() };
    if grads.is_empty() {
        return Ok(());
    }
    // One kernel over every gradient (not a square and a sum per tensor).
    let all: Vec<ValueId> = grads.iter().map(|(_, d)| *d).collect();
    let total = b.op(Op::SumOfSquares, &all)?;
    let norm = b.op(Op::Unary(UnaryOp::Sqrt), &[total])?;
    let shifted = b.op(Op::AddScalar { value: 1e-6 }, &[norm])?;
    let inv = b.op(Op::Unary(UnaryOp::Recip), &[shifted])?;
    let coef = b.scale(inv, max_norm)?;
    let one = b.g.add_fill(1.0, TensorType::f32(Shape::scalar()), "optim.clip");
    let coef = b.bin(BinaryOp::Min, coef, one)?;
    for (_, d) in grads.iter_mut() {
        *d = b.bin(BinaryOp::Mul, *d, coef)?;
    }
    Ok(())
}

fn state_buffer(b: &mut Builder, name: &str, ty: &TensorType) -> Result<ValueId, IrError> {
    b.g.add_buffer(name, ty.clone(), Init::Zeros, &b.scope.clone())
}

/// One parameter's update: its value, gradient and the step's scalars.
struct Update<'a> {
    name: &'a str,
    p: ValueId,
    grad: ValueId,
    ty: TensorType,
    lr: ValueId,
    wd: ValueId,
}

/// torch.optim.AdamW.step for one parameter (reference 6.1).
fn adamw(
    b: &mut Builder,
    u: &Update,
    bc1: ValueId,
    bc2: ValueId,
    beta1: f64,
    beta2: f64,
    eps: f64,
) -> Result<(), IrError> {
    let Update { name: pname, p, grad, ref ty, lr, wd } = *u;
    let m = state_buffer(b, &format!("optim.exp_avg.{pname}"), ty)?;
    let v = state_buffer(b, &format!("optim.exp_avg_sq.{pname}"), ty)?;
    // p <- p * (1 - lr * wd)
    let lr_wd = b.bin(BinaryOp::Mul, lr, wd)?;
    let neg = b.op(Op::Unary(UnaryOp::Neg), &[lr_wd])?;
    let keep = b.op(Op::AddScalar { value: 1.0 }, &[neg])?;
    let decayed = b.bin(BinaryOp::Mul, p, keep)?;
    // m <- beta1 m + (1 - beta1) g ; v <- beta2 v + (1 - beta2) g^2
    let m1 = b.scale(m, beta1)?;
    let g1 = b.scale(grad, 1.0 - beta1)?;
    let m_new = b.bin(BinaryOp::Add, m1, g1)?;
    let v1 = b.scale(v, beta2)?;
    let g2 = b.op(Op::Unary(UnaryOp::Square), &[grad])?;
    let g2 = b.scale(g2, 1.0 - beta2)?;
    let v_new = b.bin(BinaryOp::Add, v1, g2)?;
    // p <- p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
    let sqrt_bc2 = b.op(Op::Unary(UnaryOp::Sqrt), &[bc2])?;
    let sv = b.op(Op::Unary(UnaryOp::Sqrt), &[v_new])?;
    let denom = b.bin(BinaryOp::Div, sv, sqrt_bc2)?;
    let denom = b.op(Op::AddScalar { value: eps }, &[denom])?;
    let step_size = b.bin(BinaryOp::Div, lr, bc1)?;
    let ratio = b.bin(BinaryOp::Div, m_new, denom)?;
    let delta = b.bin(BinaryOp::Mul, ratio, step_size)?;
    let p_new = b.bin(BinaryOp::Sub, decayed, delta)?;
    b.g.add_state_update(pname, p_new);
    b.g.add_state_update(&format!("optim.exp_avg.{pname}"), m_new);
    b.g.add_state_update(&format!("optim.exp_avg_sq.{pname}"), v_new);
    Ok(())
}

/// torch.optim.SGD.step for one parameter (dampening 0).
fn sgd(b: &mut Builder, u: &Update, momentum: f64, nesterov: bool) -> Result<(), IrError> {
    let Update { name: pname, p, grad, ref ty, lr, wd } = *u;
    let wp = b.bin(BinaryOp::Mul, p, wd)?;
    let mut d = b.bin(BinaryOp::Add, grad, wp)?;
    if momentum != 0.0 {
        // A zero buffer gives PyTorch's first step (buf = d) exactly.
        let buf = state_buffer(b, &format!("optim.momentum_buffer.{pname}"), ty)?;
        let mb = b.scale(buf, momentum)?;
        let buf_new = b.bin(BinaryOp::Add, mb, d)?;
        b.g.add_state_update(&format!("optim.momentum_buffer.{pname}"), buf_new);
        d = if nesterov {
            let mbn = b.scale(buf_new, momentum)?;
            b.bin(BinaryOp::Add, d, mbn)?
        } else {
            buf_new
        };
    }
    let step = b.bin(BinaryOp::Mul, d, lr)?;
    let p_new = b.bin(BinaryOp::Sub, p, step)?;
    b.g.add_state_update(pname, p_new);
    Ok(())
}
