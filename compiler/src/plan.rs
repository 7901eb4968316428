//! Lowering: a training-step or forward graph, with the batch fixed, becomes
//! a plan (`tessera_plan::Plan`, the contract with the runtime).

pub use tessera_plan::plan::*;

use crate::ir::{Graph, Op, ValueId};
use std::collections::HashMap;

/// `order` with each gradient's all-reduce right after the kernel that
/// produces the gradient: a data-parallel step then sends the gradients of
/// the last layers while the backward of the first ones still runs (DDP's
/// overlap), in the order the backward produces them.
fn issue_gradients_early(g: &Graph, order: Vec<ValueId>) -> Vec<ValueId> {
    let early = |v: ValueId| {
        matches!(g.node(v).op, Op::AllReduce { .. }) && g.node(v).scope == tessera_plan::GRADIENT_ALL_REDUCE_SCOPE
    };
    let mut after: HashMap<ValueId, Vec<ValueId>> = HashMap::new();
    for &v in order.iter().filter(|&&v| early(v)) {
        after.entry(g.operands(v)[0]).or_default().push(v);
    }
    if after.is_empty() {
        return order;
    }
    let mut out = Vec::with_capacity(order.len());
    for v in order {
        if early(v) {
            continue;
        }
        out.push(v);
        out.extend(after.remove(&v).unwrap_or_default());
    }
    out
}

/// Lowers `g` for batch size `batch` (per replica). Kernels follow a
/// topological order of the graph (creation order where it is one).
pub fn lower(g: &Graph, batch: u64, training: bool) -> Result<Plan, String> {
    if batch == 0 {
        return Err("the batch size must be at least 1".into());
    }
    let order = issue_gradients_early(g, g.topo_order().map_err(|e| e.to_string())?);
    let mut index: HashMap<ValueId, usize> = HashMap::new();
    let mut values = Vec::with_capacity(order.len());
    let mut kernels: Vec<Kernel> = Vec::new();
    for v in order {
        let node = g.node(v);
        let shape: Vec<u64> = node.ty.shape.0.iter().map(|d| d.eval(batch)).collect();
        let source = match &node.op {
            Op::Input { name } => Source::Input { name: name.clone() },
            Op::Param { name, init, trainable } => {
                Source::Param { name: name.clone(), init: init.clone(), trainable: *trainable }
            }
            Op::Buffer { name, init } => Source::Buffer { name: name.clone(), init: init.clone() },
            Op::Fill { value } => Source::Fill { value: *value },
            Op::Part { offset, .. } => {
                let packed = index[&g.operands(v)[0]];
                match values.get(packed).map(|p: &Value| &p.source) {
                    Some(Source::Kernel(k)) if matches!(kernels[*k].op, Op::MultiTensor { .. }) => {
                        Source::Part { kernel: *k, offset: *offset }
                    }
                    _ => return Err(format!("a part ({}) reads a value no multi-tensor kernel makes", node.scope)),
                }
            }
            Op::ResultPart { index: result, .. } => {
                let dx = index[&g.operands(v)[0]];
                match values.get(dx).map(|p: &Value| &p.source) {
                    Some(Source::Kernel(k))
                        if matches!(
                            kernels[*k].op,
                            Op::LayerNormGrad { .. }
                                | Op::MatmulGeluGrad { row_sum: true, .. }
                                | Op::MatmulGeluGrad { gelu: Some(_), .. }
                                | Op::AttentionPackedGrad { row_sum: true, .. }
                        ) =>
                    {
                        Source::Part { kernel: *k, offset: *result as u64 }
                    }
                    _ => return Err(format!("a result part ({}) reads no kernel with several results", node.scope)),
                }
            }
            op => {
                let inputs = g.operands(v).iter().map(|o| index[o]).collect();
                kernels.push(Kernel { op: fix_op(op, batch), inputs, output: values.len(), scope: node.scope.clone() });
                Source::Kernel(kernels.len() - 1)
            }
        };
        index.insert(v, values.len());
        values.push(Value { shape, dtype: node.ty.dtype, source });
    }
    let outputs: Vec<(String, usize)> = g.outputs().iter().map(|(n, v)| (n.clone(), index[v])).collect();
    let state_updates = g.state_updates().iter().map(|(n, v)| (n.clone(), index[v])).collect();
    let mut tables = Tables::default();
    for (i, v) in values.iter().enumerate() {
        match &v.source {
            Source::Param { name, .. } => tables.params.push((name.clone(), i)),
            Source::Buffer { name, .. } if name.starts_with("optim.") => tables.optimizer_state.push((name.clone(), i)),
            Source::Buffer { name, .. } => tables.buffers.push((name.clone(), i)),
            _ => {}
        }
    }
    tables.grads = outputs.iter().filter_map(|(n, v)| n.strip_prefix("grad.").map(|p| (p.to_string(), *v))).collect();
    Ok(Plan {
        version: PLAN_VERSION,
        batch,
        training,
        values,
        kernels,
        outputs,
        state_updates,
        tables,
        memory: None,
        sync_batch_norm: 0,
        gradient_bucket_bytes: 0,
    })
}
