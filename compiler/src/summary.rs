//! The compile summary: parameter counts per module, forward FLOPs per image,
//! IR size, inputs and outputs. `tessera compile --emit summary` prints it.

use crate::compose::Compiled;
use crate::ir::{flops, Graph, Op};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Debug, Clone, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub shape: String,
    pub dtype: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupInfo {
    pub name: String,
    pub weight_decay: f64,
    pub tensors: usize,
    pub elements: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub config: String,
    pub trunk: String,
    pub heads: Vec<String>,
    pub loss: String,
    pub params_total: u64,
    pub params_trainable: u64,
    /// Parameter elements by module: `trunk`, `heads.N`, `loss`.
    pub params_by_module: BTreeMap<String, u64>,
    /// Buffer elements (running stats, queues, momentum encoder) by module.
    pub buffers_by_module: BTreeMap<String, u64>,
    /// Trunk + heads forward, matrix products only, a multiply-add counted as 2.
    pub forward_gflops_per_image: f64,
    pub ir_nodes: usize,
    pub trunk_output_dim: u64,
    /// Linear evaluation: the trunk's features by name, one per head.
    pub features: Vec<String>,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    /// Optimizer parameter groups (VISSL's weight-decay rules).
    pub param_groups: Vec<GroupInfo>,
}

/// `trunk`, `heads.N` or `loss`: the top-level module of a state-dict name.
fn module_of(name: &str) -> String {
    let mut parts = name.split('.');
    match (parts.next(), parts.next()) {
        (Some("heads"), Some(i)) => format!("heads.{i}"),
        (Some(top), _) => top.to_string(),
        _ => String::new(),
    }
}

pub fn summarize(config_name: &str, c: &Compiled) -> Summary {
    let g: &Graph = &c.graph;
    let mut params_by_module = BTreeMap::new();
    let mut buffers_by_module = BTreeMap::new();
    let (mut total, mut trainable) = (0, 0);
    for v in g.node_ids() {
        let n = g.node(v);
        let numel = n.ty.shape.const_numel().unwrap_or(0);
        match &n.op {
            Op::Param { name, trainable: t, .. } => {
                total += numel;
                if *t {
                    trainable += numel;
                }
                *params_by_module.entry(module_of(name)).or_insert(0) += numel;
            }
            Op::Buffer { name, .. } => *buffers_by_module.entry(module_of(name)).or_insert(0) += numel,
            _ => {}
        }
    }
    params_by_module.entry("loss".to_string()).or_insert(0);
    for i in 0..c.composition.heads.len() {
        params_by_module.entry(format!("heads.{i}")).or_insert(0);
    }
    let model_flops: u64 = g
        .node_ids()
        .into_iter()
        .filter(|&v| {
            let s = &g.node(v).scope;
            s == "trunk" || s.starts_with("trunk.") || s.starts_with("heads.")
        })
        .map(|v| flops::node_flops(g, v, 1))
        .sum();
    let info = |name: &str, v| TensorInfo {
        name: name.to_string(),
        shape: g.ty(v).shape.to_string(),
        dtype: g.ty(v).dtype.to_string(),
    };
    Summary {
        config: config_name.to_string(),
        trunk: c.composition.trunk.clone(),
        heads: c
            .composition
            .heads
            .iter()
            .map(|ch| ch.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(" -> "))
            .collect(),
        loss: c.composition.loss.clone(),
        params_total: total,
        params_trainable: trainable,
        params_by_module,
        buffers_by_module,
        forward_gflops_per_image: model_flops as f64 / c.composition.images_per_sample.max(1) as f64 / 1e9,
        ir_nodes: g.node_count(),
        trunk_output_dim: c.composition.trunk_output.last().and_then(|d| d.as_const()).unwrap_or(0),
        features: c.composition.features.clone(),
        inputs: g.inputs().into_iter().map(|(v, n)| info(n, v)).collect(),
        outputs: g.outputs().iter().map(|(n, v)| info(n, *v)).collect(),
        param_groups: c
            .param_groups
            .iter()
            .map(|pg| GroupInfo {
                name: pg.name.clone(),
                weight_decay: pg.weight_decay,
                tensors: pg.params.len(),
                elements: pg
                    .params
                    .iter()
                    .filter_map(|n| g.state(n))
                    .map(|v| g.ty(v).shape.const_numel().unwrap_or(0))
                    .sum(),
            })
            .collect(),
    }
}

/// Thousands separators: 86,567,656.
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Summary {
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "config     {}", self.config);
        let _ = writeln!(
            s,
            "trunk      {}  ({} params)",
            self.trunk,
            group(self.params_by_module.get("trunk").copied().unwrap_or(0))
        );
        for (i, h) in self.heads.iter().enumerate() {
            let n = self.params_by_module.get(&format!("heads.{i}")).copied().unwrap_or(0);
            let _ = writeln!(s, "heads.{i}    {h}  ({} params)", group(n));
        }
        let _ = writeln!(s, "loss       {}", self.loss);
        let _ =
            writeln!(s, "params     {} total, {} trainable", group(self.params_total), group(self.params_trainable));
        let buffers: u64 = self.buffers_by_module.values().sum();
        if buffers > 0 {
            let parts: Vec<String> = self.buffers_by_module.iter().map(|(k, v)| format!("{k} {}", group(*v))).collect();
            let _ = writeln!(s, "buffers    {} ({})", group(buffers), parts.join(", "));
        }
        let g = self.forward_gflops_per_image;
        let flops = if g >= 0.1 { format!("{g:.2} GFLOPs") } else { format!("{:.3} MFLOPs", g * 1e3) };
        let _ = writeln!(s, "forward    {flops} per image (matrix products, multiply-add = 2)");
        if self.features.is_empty() {
            let _ = writeln!(s, "features   {} (trunk output dim)", self.trunk_output_dim);
        } else {
            let names = self.features.join(", ");
            let _ = writeln!(s, "features   {names} (frozen trunk in eval mode, feature i to head i)");
        }
        let _ = writeln!(s, "IR         {} nodes", group(self.ir_nodes as u64));
        let ins: Vec<String> = self.inputs.iter().map(|t| format!("{} {} {}", t.name, t.shape, t.dtype)).collect();
        let _ = writeln!(s, "inputs     {}", ins.join(", "));
        let outs: Vec<String> = self.outputs.iter().map(|t| format!("{} {} {}", t.name, t.shape, t.dtype)).collect();
        let _ = writeln!(s, "outputs    {}", outs.join(", "));
        for pg in &self.param_groups {
            let _ = writeln!(
                s,
                "group      {:<24} wd {:<8} {} tensors, {} params",
                pg.name,
                pg.weight_decay,
                pg.tensors,
                group(pg.elements)
            );
        }
        s
    }
}
