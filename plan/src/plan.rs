//! Plans: the only thing the runtime reads from the compiler. A plan is a
//! static, serde-serialisable program for one batch size: values with fixed
//! shapes, kernels in execution order, and the tables of parameters,
//! gradients, optimizer state and buffers.
//!
//! Invariants: every shape is concrete (no symbolic batch); kernels appear in
//! an order where each input is produced before it is read; a value is
//! written by at most one kernel; `state_updates` name values whose type is
//! the state's type. Kernel ops are the IR's `Op` with every `Dim` fixed.

use crate::op::Op;
use crate::types::{DType, Dim, Init, Shape};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Bumped whenever the plan format changes incompatibly (3: the memory
/// plan's workspace follows `scratch`, the backends' contract; 4:
/// `reduce_f32`, normalize_grad's (dy, x, w[, r]) forms, synchronised batch
/// norm's scratch, gradient all-reduces in place; 5: `attention_packed`,
/// `attention_packed_grad`, `layer_norm_weight_grad`; 6: kernels with
/// further results, `layer_norm_grad`, `result_part`, `matmul_gelu_grad`'s
/// row sum; 7: result 5, the recomputed activation, of `layer_norm_grad`
/// (with the norm's bias as its last operand) and `matmul_gelu_grad`).
pub const PLAN_VERSION: u32 = 7;

/// The backend a plan's pass pipeline was chosen for. Every backend runs
/// every plan; the target only says which trade-offs the compiler made
/// (the CPU pipeline leaves out prologue fusion and mixed precision, which
/// buy memory with arithmetic the CPU does not need).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Target {
    Cpu,
    Cuda,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Cpu => "cpu",
            Target::Cuda => "cuda",
        }
    }

    /// `cpu`, or `cuda` / `gpu`.
    pub fn parse(s: &str) -> Result<Target, String> {
        match s {
            "cpu" => Ok(Target::Cpu),
            "cuda" | "gpu" => Ok(Target::Cuda),
            _ => Err(format!("unknown target `{s}`: use cpu or cuda")),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Source {
    /// Fed by the caller each run (images, targets, lr, ...).
    Input { name: String },
    /// A parameter; `trainable == false` for frozen ones.
    Param { name: String, init: Init, trainable: bool },
    /// Non-trainable state: buffers and optimizer state.
    Buffer { name: String, init: Init },
    /// A constant.
    Fill { value: f64 },
    /// Produced by the kernel of this index.
    Kernel(usize),
    /// Elements `offset ..` of the packed result of multi-tensor kernel
    /// `kernel`, which writes them here itself (no kernel of its own).
    Part { kernel: usize, offset: u64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Value {
    pub shape: Vec<u64>,
    pub dtype: DType,
    pub source: Source,
}

impl Value {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Kernel {
    pub op: Op,
    pub inputs: Vec<usize>,
    pub output: usize,
    /// Module path, for profiles and errors.
    pub scope: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub version: u32,
    pub batch: u64,
    /// Dropout and drop-path active, BatchNorm on batch statistics.
    pub training: bool,
    pub values: Vec<Value>,
    pub kernels: Vec<Kernel>,
    /// Named results: `loss`, `output`, `grad.<param>` ...
    pub outputs: Vec<(String, usize)>,
    /// After a run, the state (parameter or buffer) `name` takes this value.
    pub state_updates: Vec<(String, usize)>,
    /// Where each kind of state lives, by name (value indices).
    pub tables: Tables,
    /// Regions, arena offsets and the peak (training plans; see `memory`).
    /// A backend with its own allocator (the CPU one) may ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<crate::memory::MemoryPlan>,
    /// Training batch norms take their statistics over groups of this many
    /// consecutive ranks of a data-parallel run (VISSL's SyncBatchNorm,
    /// `MODEL.SYNC_BN_CONFIG`); 0: over each process's own batch.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sync_batch_norm: u64,
    /// A data-parallel step's gradient all-reduces (the kernels of scope
    /// `GRADIENT_ALL_REDUCE_SCOPE`, in the order the backward produces
    /// them) go out in buckets of about this many bytes (DDP's
    /// `DATA.DDP_BUCKET_CAP_MB`); 0: one per gradient.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gradient_bucket_bytes: u64,
}

/// The largest value a plan may hold (2^48 bytes, 256 TiB: beyond any
/// device), so that no size computed from a plan read from disk overflows.
pub const MAX_VALUE_BYTES: u64 = 1 << 48;

/// The scope of the all-reduce (mean) the compiler puts on each gradient
/// of a data-parallel step.
pub const GRADIENT_ALL_REDUCE_SCOPE: &str = "optim.all_reduce";

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The parameter, gradient, optimizer-state and buffer tables: what a
/// checkpoint saves, what a data-parallel all-reduce sums, what an optimizer
/// kernel walks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tables {
    pub params: Vec<(String, usize)>,
    /// The gradient of each trainable parameter (after clipping), by parameter name.
    pub grads: Vec<(String, usize)>,
    /// Optimizer state (`optim.*` buffers: Adam moments, momentum buffers).
    pub optimizer_state: Vec<(String, usize)>,
    /// Every other buffer (running statistics, queues, momentum-encoder weights).
    pub buffers: Vec<(String, usize)>,
}

/// Replaces symbolic batch dims by `k * batch`.
fn fix_dim(d: Dim, batch: u64) -> Dim {
    Dim::Const(d.eval(batch))
}

fn fix_shape(s: &Shape, batch: u64) -> Shape {
    Shape(s.0.iter().map(|&d| fix_dim(d, batch)).collect())
}

/// The op with every batch-dependent attribute fixed.
pub fn fix_op(op: &Op, batch: u64) -> Op {
    match op {
        Op::Reshape { shape } => Op::Reshape { shape: fix_shape(shape, batch) },
        Op::Expand { shape } => Op::Expand { shape: fix_shape(shape, batch) },
        Op::Slice { axis, start, end } => {
            Op::Slice { axis: *axis, start: fix_dim(*start, batch), end: fix_dim(*end, batch) }
        }
        Op::Pad { axis, before, after } => {
            Op::Pad { axis: *axis, before: fix_dim(*before, batch), after: fix_dim(*after, batch) }
        }
        Op::DivCount { count } => Op::DivCount { count: fix_dim(*count, batch) },
        other => other.clone(),
    }
}

impl Plan {
    /// Index of the value that holds state `name` (a parameter or buffer).
    pub fn state(&self, name: &str) -> Option<usize> {
        self.values.iter().position(|v| match &v.source {
            Source::Param { name: n, .. } | Source::Buffer { name: n, .. } => n == name,
            _ => false,
        })
    }

    /// Every state's value index by name (`state` for many names at once:
    /// one pass over the values, not one per name).
    pub fn state_index(&self) -> HashMap<&str, usize> {
        let mut index = HashMap::new();
        for (i, v) in self.values.iter().enumerate() {
            if let Source::Param { name, .. } | Source::Buffer { name, .. } = &v.source {
                index.entry(name.as_str()).or_insert(i);
            }
        }
        index
    }

    pub fn input(&self, name: &str) -> Option<usize> {
        self.values.iter().position(|v| matches!(&v.source, Source::Input { name: n } if n == name))
    }

    pub fn output(&self, name: &str) -> Option<usize> {
        self.outputs.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// Trainable parameters, as (name, value index), in plan order.
    pub fn params(&self) -> Vec<(&str, usize)> {
        self.values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match &v.source {
                Source::Param { name, .. } => Some((name.as_str(), i)),
                _ => None,
            })
            .collect()
    }

    /// Checks the invariants of the module docs; the runtime calls it on load.
    pub fn validate(&self) -> Result<(), String> {
        if self.version != PLAN_VERSION {
            return Err(format!("plan version {} is not supported (this build reads {PLAN_VERSION})", self.version));
        }
        // Sizes first: every later product, sum and offset of them then
        // fits in a u64 (a damaged file may claim a dimension of 2^60).
        for (i, v) in self.values.iter().enumerate() {
            let bytes = v.shape.iter().try_fold(v.dtype.size_bytes(), |a, &d| a.checked_mul(d));
            if bytes.is_none_or(|b| b > MAX_VALUE_BYTES) {
                return Err(format!("value {i} of shape {:?} is larger than {MAX_VALUE_BYTES} bytes", v.shape));
            }
        }
        if let Some(m) = &self.memory {
            if m.placements.len() != self.values.len() {
                return Err(format!(
                    "the memory plan places {} values, the plan has {}",
                    m.placements.len(),
                    self.values.len()
                ));
            }
            m.check().map_err(|e| format!("memory plan: {e}"))?;
            for (i, b) in m.blocks.iter().enumerate() {
                if b.first > b.last || b.last > self.kernels.len() || b.value >= self.values.len() {
                    return Err(format!(
                        "memory plan: block {i} (value {}, kernels {}..{}) names a value or kernels the plan does not have",
                        b.value, b.first, b.last
                    ));
                }
            }
        }
        let mut written = vec![false; self.values.len()];
        let mut parts_of: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, v) in self.values.iter().enumerate() {
            match v.source {
                Source::Kernel(j) => {
                    if self.kernels.get(j).map(|k| k.output) != Some(i) {
                        return Err(format!("value {i} says kernel {j} makes it, but that kernel does not"));
                    }
                }
                Source::Part { kernel, offset } => {
                    let packed = self.kernels.get(kernel).map(|k| (&k.op, k.output));
                    // No two parts of a kernel are one result.
                    let unique = |offset: u64| {
                        parts_of.get(&kernel).is_none_or(|ps| {
                            ps.iter().all(
                                |&p| !matches!(self.values[p].source, Source::Part { offset: o, .. } if o == offset),
                            )
                        })
                    };
                    let fits = match packed {
                        Some((Op::MultiTensor { .. }, out)) => self.values.get(out).is_some_and(|p| {
                            offset.checked_add(v.numel()).is_some_and(|end| end <= p.numel()) && v.dtype == p.dtype
                        }),
                        // Result `offset` of a layer-norm backward: [D] or dx's shape.
                        Some((Op::LayerNormGrad { copy, normalized, .. }, out)) => {
                            self.values.get(out).is_some_and(|dx| {
                                let shape = match offset {
                                    1 | 2 | 4 => dx.shape.last().map(|&d| vec![d]),
                                    3 | 5 => Some(dx.shape.clone()),
                                    _ => None,
                                };
                                // The copy (3) and the normalised input (5) have the kernel's types.
                                let typed = match offset {
                                    3 => *copy == Some(v.dtype),
                                    5 => *normalized == Some(v.dtype),
                                    _ => true,
                                };
                                unique(offset) && typed && v.dtype.is_float() && shape.as_ref() == Some(&v.shape)
                            })
                        }
                        // Its result's row sum ([D]) and GELU(z) (the result's shape).
                        Some((
                            op @ (Op::MatmulGeluGrad { .. } | Op::AttentionPackedGrad { row_sum: true, .. }),
                            out,
                        )) => self.values.get(out).is_some_and(|y| {
                            let (row_sum, gelu) = match op {
                                Op::MatmulGeluGrad { row_sum, gelu, .. } => (*row_sum, *gelu),
                                _ => (true, None),
                            };
                            let fits = match offset {
                                1 => row_sum && y.shape.last().map(|&d| vec![d]) == Some(v.shape.clone()),
                                5 => gelu == Some(v.dtype) && y.shape == v.shape,
                                _ => false,
                            };
                            unique(offset) && fits && v.dtype.is_float()
                        }),
                        _ => {
                            return Err(format!(
                                "value {i} is a part of kernel {kernel}, which has no results besides its own"
                            ))
                        }
                    };
                    if !fits {
                        return Err(format!(
                            "value {i} is not inside the packed result of kernel {kernel}, or not one of its results"
                        ));
                    }
                    parts_of.entry(kernel).or_default().push(i);
                }
                _ => written[i] = true,
            }
        }
        for (k, kernel) in self.kernels.iter().enumerate() {
            // A layer-norm backward's operands: (dy, x, w[, r]), then the
            // norm's bias [D] when it makes the normalised input (both
            // backends take the last operand for it).
            if let Op::LayerNormGrad { normalized, .. } = kernel.op {
                let extra = usize::from(normalized.is_some());
                let n = kernel.inputs.len();
                let d = kernel.inputs.get(1).and_then(|&x| self.values.get(x)?.shape.last().copied());
                let bias = kernel.inputs.last().and_then(|&b| self.values.get(b));
                let bias_fits = extra == 0 || bias.zip(d).is_some_and(|(b, d)| b.shape == [d]);
                if !(3 + extra..=4 + extra).contains(&n) || !bias_fits {
                    return Err(format!(
                        "kernel {k} (layer_norm_grad) takes (dy, x, w[, r]){}, not {n} operands",
                        if extra == 1 { " and the norm's bias [D]" } else { "" }
                    ));
                }
            }
            for &i in &kernel.inputs {
                if !written.get(i).copied().unwrap_or(false) {
                    return Err(format!("kernel {k} ({}) reads value {i} before it is written", kernel.op.name()));
                }
                let packed = matches!(self.values[i].source, Source::Kernel(j)
                    if self.kernels.get(j).is_some_and(|k| matches!(k.op, Op::MultiTensor { .. })));
                if packed {
                    return Err(format!(
                        "kernel {k} reads the packed result of a multi-tensor kernel (read its parts)"
                    ));
                }
            }
            for &part in parts_of.get(&k).into_iter().flatten() {
                written[part] = true;
            }
            match self.values.get(kernel.output).map(|v| &v.source) {
                Some(Source::Kernel(j)) if *j == k => written[kernel.output] = true,
                _ => {
                    return Err(format!(
                        "kernel {k} ({}) writes value {} it does not own",
                        kernel.op.name(),
                        kernel.output
                    ))
                }
            }
        }
        for (name, v) in self.outputs.iter().chain(&self.state_updates) {
            if *v >= self.values.len() {
                return Err(format!("`{name}` names value {v}, which does not exist"));
            }
        }
        let t = &self.tables;
        let states = self.state_index();
        let state = |name: &str| states.get(name).copied();
        for (name, v) in t.params.iter().chain(&t.optimizer_state).chain(&t.buffers) {
            if state(name) != Some(*v) {
                return Err(format!("the state table names `{name}` at value {v}, which does not hold it"));
            }
        }
        for (name, v) in &t.grads {
            if state(name).map(|p| &self.values[p].shape) != self.values.get(*v).map(|g| &g.shape) {
                return Err(format!("the gradient table entry of `{name}` does not have its parameter's shape"));
            }
        }
        for (name, v) in &self.state_updates {
            let s = state(name).ok_or_else(|| format!("state update of unknown state `{name}`"))?;
            if self.values[s].shape != self.values[*v].shape || self.values[s].dtype != self.values[*v].dtype {
                return Err(format!("state update of `{name}` has the wrong type"));
            }
        }
        Ok(())
    }
}

impl Plan {
    /// The ranks of the data-parallel run this plan is one rank of (its
    /// collectives' `world`); 1 for one process.
    pub fn world(&self) -> u64 {
        self.kernels
            .iter()
            .map(|k| match k.op {
                Op::AllGather { world }
                | Op::AllReduce { world, .. }
                | Op::AllGatherGrad { world }
                | Op::QueuePush { world }
                | Op::ZeroDiagonal { world } => world,
                _ => 1,
            })
            .max()
            .unwrap_or(1)
    }

    /// The states each rank of a data-parallel plan holds for itself: the
    /// queues a push over one rank fills while the plan spans several
    /// (SwAV's local_emb_queue: this rank's samples only).
    pub fn rank_local_states(&self) -> Vec<String> {
        if self.world() == 1 {
            return Vec::new();
        }
        self.state_updates
            .iter()
            .filter(|(_, v)| {
                matches!(self.values[*v].source, Source::Kernel(k) if self.kernels[k].op == Op::QueuePush { world: 1 })
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// A person-readable summary: what `tessera plan show` prints.
    /// One line per kernel, in execution order: `k7 = gelu(k6) : [4,65,384] f32  # scope`.
    /// Operands are kernel results (`kN`), parameters and buffers (`@name`),
    /// inputs (`"name"`) and fills (`fill(v)`); a multi-tensor kernel's part
    /// is `kN[offset..]`, another kernel's further result `kN.i` (listed
    /// after its result's type). Snapshot tests diff this.
    pub fn kernel_listing(&self) -> String {
        use std::fmt::Write;
        let multi = |k: usize| matches!(self.kernels[k].op, Op::MultiTensor { .. });
        let name = |v: usize| match &self.values[v].source {
            Source::Kernel(k) => format!("k{k}"),
            Source::Part { kernel, offset } if multi(*kernel) => format!("k{kernel}[{offset}..]"),
            Source::Part { kernel, offset } => format!("k{kernel}.{offset}"),
            Source::Param { name, .. } | Source::Buffer { name, .. } => format!("@{name}"),
            Source::Input { name } => format!("{name:?}"),
            Source::Fill { value } => format!("fill({value})"),
        };
        let mut results: Vec<Vec<usize>> = vec![Vec::new(); self.kernels.len()];
        for (v, value) in self.values.iter().enumerate() {
            if let Source::Part { kernel, .. } = value.source {
                if !multi(kernel) {
                    results[kernel].push(v);
                }
            }
        }
        let mut s = String::new();
        for (i, k) in self.kernels.iter().enumerate() {
            let args: Vec<String> = k.inputs.iter().map(|&v| name(v)).collect();
            let out = &self.values[k.output];
            let dims: Vec<String> = out.shape.iter().map(|d| d.to_string()).collect();
            let _ = write!(
                s,
                "k{i} = {}({}){} : [{}] {}",
                k.op.name(),
                args.join(", "),
                crate::op::attribute_text(&k.op),
                dims.join(","),
                out.dtype
            );
            for &v in &results[i] {
                let value = &self.values[v];
                let dims: Vec<String> = value.shape.iter().map(|d| d.to_string()).collect();
                let _ = write!(s, ", {} [{}] {}", name(v), dims.join(","), value.dtype);
            }
            if !k.scope.is_empty() {
                let _ = write!(s, "  # {}", k.scope);
            }
            s.push('\n');
        }
        for (n, v) in &self.outputs {
            let _ = writeln!(s, "output {n:?} = {}", name(*v));
        }
        for (n, v) in &self.state_updates {
            let _ = writeln!(s, "state @{n} <- {}", name(*v));
        }
        s
    }

    pub fn summary(&self) -> String {
        use std::collections::BTreeMap;
        use std::fmt::Write;
        let mut by_op: BTreeMap<&str, usize> = BTreeMap::new();
        for k in &self.kernels {
            *by_op.entry(k.op.name()).or_insert(0) += 1;
        }
        let (mut params, mut trainable, mut state, mut temps) = (0u64, 0u64, 0u64, 0u64);
        let mut inputs = Vec::new();
        for v in &self.values {
            // Saturating: a plan of many huge values still prints.
            let bytes = v.numel().saturating_mul(v.dtype.size_bytes());
            match &v.source {
                Source::Param { trainable: t, .. } => {
                    params = params.saturating_add(v.numel());
                    if *t {
                        trainable = trainable.saturating_add(v.numel());
                    }
                }
                Source::Buffer { .. } => state = state.saturating_add(bytes),
                Source::Input { name } => inputs.push(format!("{name} {:?} {}", v.shape, v.dtype)),
                // A packed multi-tensor result is stored as its parts.
                Source::Kernel(k) if self.kernels.get(*k).is_some_and(|k| matches!(k.op, Op::MultiTensor { .. })) => {}
                Source::Kernel(_) | Source::Part { .. } => temps = temps.saturating_add(bytes),
                Source::Fill { .. } => {}
            }
        }
        let mut s = String::new();
        let _ = writeln!(
            s,
            "plan v{}  batch {}  {}",
            self.version,
            self.batch,
            if self.training { "training" } else { "eval" }
        );
        let _ = writeln!(s, "kernels    {}", self.kernels.len());
        let mut ops: Vec<(&str, usize)> = by_op.into_iter().collect();
        ops.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        for (op, n) in ops {
            let _ = writeln!(s, "  {n:>6}  {op}");
        }
        let _ = writeln!(
            s,
            "params     {params} elements ({trainable} trainable) in {} tensors, {} gradients",
            self.tables.params.len(),
            self.tables.grads.len()
        );
        let _ = writeln!(
            s,
            "tables     {} optimizer-state tensors, {} buffers",
            self.tables.optimizer_state.len(),
            self.tables.buffers.len()
        );
        let _ = writeln!(s, "state      {:.1} MiB of buffers and optimizer state", state as f64 / 1048576.0);
        let _ = writeln!(
            s,
            "temporary  {:.1} MiB if nothing were reused (memory planning comes later)",
            temps as f64 / 1048576.0
        );
        let _ = writeln!(s, "inputs     {}", inputs.join(", "));
        let outs: Vec<&str> =
            self.outputs.iter().map(|(n, _)| n.as_str()).filter(|n| !n.starts_with("grad.")).collect();
        let grads = self.outputs.len() - outs.len();
        let _ = writeln!(
            s,
            "outputs    {}{}",
            outs.join(", "),
            if grads > 0 { format!(" and {grads} gradients") } else { String::new() }
        );
        let _ = writeln!(s, "updates    {} states", self.state_updates.len());
        s
    }
}
