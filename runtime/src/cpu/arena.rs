//! The CPU backend in arena mode: the plan's kernels run on the CPU kernels
//! (`run_kernel`, `multi_tensor`, the same `Ctx`), but every value lives
//! where the memory plan puts it, in one host buffer laid out as the CUDA
//! executor lays out its device allocation (`memory_layout::Layout`). The
//! plan's in-place results, aliases, shared arena storage and state updates
//! written over their state are therefore executed, not ignored, and a plan
//! whose memory plan is wrong gives wrong numbers here, on any machine,
//! where the pooled `CpuExecutor` would not.
//!
//! A kernel reads its operands from their placements into host tensors,
//! runs, and writes its result (each part, for a multi-tensor kernel) at its
//! placement, so a result written over an operand is always read first.
//! Values are stored as their plan dtype's bytes: f32 in 4, bf16 and f16 in
//! 2 (rounded to nearest even on store; the kernels compute in f32), i64 in
//! 8. As on the device: scalar fills live in a constant table after the
//! regions, non-scalar fills are written before their first reader each
//! step, reshapes and other pass-through ops copy unless source and
//! destination coincide, and state updates not already in place are copied
//! over their state, in plan order, at the end of the step. The workspace
//! is not allocated (the CPU kernels keep their own scratch).
//!
//! Invariants: no placement lies outside its region or the buffer (checked
//! in `new`; a violation is an error); parameters and buffers start from
//! the pooled executor's draws (`init`); inputs are checked before anything
//! is written. A kernel error during a step leaves the executor unusable
//! (`poisoned`), since state may already be half updated in place.

use super::kernel::{Ctx, Dist};
use super::{init::init_tensor, multi_tensor, passes_data_through, pool, run_kernel};
use crate::dist::Collective;
use crate::error::{KernelError, RuntimeError};
use crate::memory_layout::{check_placements, decode_f32, encode, from_bytes, inline_constants, offsets, Layout};
use crate::tensor::{describe_type, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tessera_plan::memory::{MemoryPlan, Region};
use tessera_plan::{DType, Op, Plan, Source, Value};

/// Bytes per entry of the constant table (any dtype's one element fits).
const CONSTANT_SLOT: usize = 8;

fn usize_shape(s: &[u64]) -> Vec<usize> {
    s.iter().map(|&d| d as usize).collect()
}

fn value_bytes(value: &Value) -> usize {
    (value.numel() * value.dtype.size_bytes()) as usize
}

/// The host buffer and where each value starts in it.
struct Storage {
    bytes: Vec<u8>,
    /// `None`: stored nowhere (a packed multi-tensor result).
    at: Vec<Option<usize>>,
}

impl Storage {
    fn span(&self, v: usize, value: &Value) -> Result<std::ops::Range<usize>, String> {
        let at = self.at[v].ok_or_else(|| format!("value {v} has no storage in the memory plan"))?;
        let range = at..at + value_bytes(value);
        if range.end > self.bytes.len() {
            return Err(format!(
                "value {v} at {}..{} lies outside the buffer of {}",
                range.start,
                range.end,
                self.bytes.len()
            ));
        }
        Ok(range)
    }

    /// Value `v` as a host tensor (floats as f32; f32 storage from the pool).
    fn read(&self, v: usize, value: &Value) -> Result<Tensor, String> {
        let b = &self.bytes[self.span(v, value)?];
        let shape = usize_shape(&value.shape);
        if value.dtype == DType::I64 {
            return from_bytes(b, shape, DType::I64);
        }
        let mut out = pool::buffer(value.numel() as usize);
        decode_f32(b, value.dtype, &mut out)?;
        Ok(Tensor::f32(shape, out))
    }

    /// Stores `t` as value `v`, after checking it has the plan's type.
    fn write(&mut self, v: usize, value: &Value, t: &Tensor) -> Result<(), String> {
        let shape = usize_shape(&value.shape);
        if !t.has_type(&shape, value.dtype) {
            return Err(format!("produced {}, but the plan says {}", t.describe(), describe_type(&shape, value.dtype)));
        }
        let span = self.span(v, value)?;
        encode(t, value.dtype, &mut self.bytes[span])
    }

    /// Copies value `src`'s bytes to value `dst`'s storage (none when they coincide).
    fn copy(&mut self, dst: usize, src: usize, value: &Value) -> Result<(), String> {
        let (to, from) = (self.span(dst, value)?, self.span(src, value)?);
        if to != from {
            self.bytes.copy_within(from, to.start);
        }
        Ok(())
    }
}

/// Per kernel, the non-scalar fills it reads first: it writes them, every step.
fn fills_by_first_reader(plan: &Plan, memory: &MemoryPlan) -> Vec<Vec<usize>> {
    let mut fills = vec![Vec::new(); plan.kernels.len()];
    let mut seen = vec![false; plan.values.len()];
    for (k, kernel) in plan.kernels.iter().enumerate() {
        for &v in &kernel.inputs {
            let fill = matches!(plan.values[v].source, Source::Fill { .. });
            if fill && memory.placements[v].region != Region::Inline && !seen[v] {
                seen[v] = true;
                fills[k].push(v);
            }
        }
    }
    fills
}

/// Per kernel, the values that are parts of its packed result, by offset.
fn parts_by_kernel(plan: &Plan) -> Vec<HashMap<u64, usize>> {
    let mut parts = vec![HashMap::new(); plan.kernels.len()];
    for (v, value) in plan.values.iter().enumerate() {
        if let Source::Part { kernel, offset } = value.source {
            parts[kernel].insert(offset, v);
        }
    }
    parts
}

pub struct ArenaExecutor {
    plan: Plan,
    seed: u64,
    step: u64,
    storage: Storage,
    /// Per kernel, the non-scalar fills to write before it runs.
    fills: Vec<Vec<usize>>,
    /// Per kernel, the values that are parts of its packed result, by offset.
    parts: Vec<HashMap<u64, usize>>,
    state_index: HashMap<String, usize>,
    inputs: Vec<(String, usize)>,
    poisoned: Option<String>,
    /// The collective of a data-parallel run (`None`: one process).
    comm: Option<Arc<dyn Collective>>,
}

fn invalid(message: String) -> RuntimeError {
    RuntimeError::InvalidPlan(format!("memory plan: {message}"))
}

impl ArenaExecutor {
    /// Validates `plan` and its memory plan (required: this executor runs
    /// it; the paper checks `check` and `simulate` first, then every
    /// placement against its region), lays out the buffer and initialises
    /// every parameter and buffer from its `Init` rule keyed by `seed`.
    pub fn new(plan: Plan, seed: u64) -> Result<Self, RuntimeError> {
        plan.validate().map_err(RuntimeError::InvalidPlan)?;
        let memory = plan.memory.as_ref().ok_or_else(|| {
            RuntimeError::InvalidPlan("the plan has no memory plan (the arena executor executes it)".into())
        })?;
        check_placements(&plan, memory).map_err(invalid)?;
        memory.simulate(&plan).map_err(invalid)?;
        if let Some(k) = plan.kernels.iter().position(|k| k.op.is_leaf()) {
            return Err(RuntimeError::InvalidPlan(format!("kernel {k} is a leaf op ({})", plan.kernels[k].op.name())));
        }
        // The regions and the arena, then the constant table.
        let regions = Layout::of(memory).workspace as usize;
        let constants = inline_constants(&plan, memory);
        let mut at: Vec<Option<usize>> = offsets(memory).into_iter().map(|o| o.map(|o| o as usize)).collect();
        for (i, &v) in constants.iter().enumerate() {
            at[v] = Some(regions + CONSTANT_SLOT * i);
        }
        for (a, value) in at.iter_mut().zip(&plan.values) {
            if a.is_none() && value.numel() == 0 {
                *a = Some(0);
            }
        }
        let bytes = vec![0u8; regions + CONSTANT_SLOT * constants.len()];
        let (fills, parts) = (fills_by_first_reader(&plan, memory), parts_by_kernel(&plan));
        let mut ex = ArenaExecutor {
            seed,
            step: 0,
            storage: Storage { bytes, at },
            fills,
            parts,
            state_index: HashMap::new(),
            inputs: Vec::new(),
            poisoned: None,
            comm: None,
            plan,
        };
        for &v in &constants {
            ex.write_fill(v).map_err(invalid)?;
        }
        ex.initialise_state(seed)?;
        Ok(ex)
    }

    /// Writes fill `v` (every element its constant, in its dtype).
    fn write_fill(&mut self, v: usize) -> Result<(), String> {
        let value = &self.plan.values[v];
        let Source::Fill { value: c } = value.source else { return Err(format!("value {v} is not a fill")) };
        let t = Tensor::full(usize_shape(&value.shape), value.dtype, c);
        self.storage.write(v, value, &t)
    }

    fn initialise_state(&mut self, seed: u64) -> Result<(), RuntimeError> {
        for (v, value) in self.plan.values.iter().enumerate() {
            match &value.source {
                Source::Param { name, init, .. } | Source::Buffer { name, init } => {
                    if self.state_index.insert(name.clone(), v).is_some() {
                        return Err(RuntimeError::InvalidPlan(format!("state `{name}` is declared twice")));
                    }
                    let t =
                        init_tensor(name, init, &usize_shape(&value.shape), value.dtype, seed).map_err(|message| {
                            RuntimeError::Init { name: name.clone(), init: init.to_string(), message }
                        })?;
                    self.storage.write(v, value, &t).map_err(invalid)?;
                }
                Source::Input { name } => {
                    if self.inputs.iter().any(|(n, _)| n == name) {
                        return Err(RuntimeError::InvalidPlan(format!("input `{name}` is declared twice")));
                    }
                    self.inputs.push((name.clone(), v));
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Runs the plan's collectives through `comm` (see `CpuExecutor::set_collective`).
    pub fn set_collective(&mut self, comm: Arc<dyn Collective>) {
        self.comm = Some(comm);
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The training step: the `step` of every random stream of the next run.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn set_step(&mut self, s: u64) {
        self.step = s;
    }

    /// Bytes of the host buffer (the planned peak less the workspace, plus
    /// the constant table).
    pub fn buffer_bytes(&self) -> usize {
        self.storage.bytes.len()
    }

    /// Names of every parameter and buffer, in plan order.
    pub fn state_names(&self) -> Vec<String> {
        let mut named: Vec<(&usize, &String)> = self.state_index.iter().map(|(n, i)| (i, n)).collect();
        named.sort();
        named.into_iter().map(|(_, n)| n.clone()).collect()
    }

    /// A host copy of parameter or buffer `name` (`None`: no such state).
    pub fn read_state(&self, name: &str) -> Result<Option<Tensor>, RuntimeError> {
        let Some(&v) = self.state_index.get(name) else { return Ok(None) };
        self.storage.read(v, &self.plan.values[v]).map(Some).map_err(invalid)
    }

    /// Replaces parameter or buffer `name` with a host tensor of its type
    /// (floats are rounded to the state's dtype).
    pub fn write_state(&mut self, name: &str, t: Tensor) -> Result<(), RuntimeError> {
        let &v = self.state_index.get(name).ok_or_else(|| RuntimeError::UnknownState { name: name.to_string() })?;
        let value = &self.plan.values[v];
        let shape = usize_shape(&value.shape);
        if !t.has_type(&shape, value.dtype) {
            return Err(RuntimeError::TypeMismatch {
                what: format!("state `{name}`"),
                expected: describe_type(&shape, value.dtype),
                got: t.describe(),
            });
        }
        self.storage.write(v, value, &t).map_err(invalid)
    }

    fn input_listing(&self) -> String {
        let names: Vec<String> = self
            .inputs
            .iter()
            .map(|(n, v)| {
                let value = &self.plan.values[*v];
                format!("`{n}` {}", describe_type(&usize_shape(&value.shape), value.dtype))
            })
            .collect();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    }

    /// Every plan input given once, with its type, and nothing else.
    fn check_inputs<'a>(&self, inputs: &'a [(&str, Tensor)]) -> Result<HashMap<&'a str, &'a Tensor>, RuntimeError> {
        let mut given: HashMap<&str, &Tensor> = HashMap::new();
        for (name, t) in inputs {
            if given.insert(name, t).is_some() {
                return Err(RuntimeError::DuplicateInput { name: name.to_string() });
            }
            if !self.inputs.iter().any(|(n, _)| n == name) {
                return Err(RuntimeError::UnknownInput { name: name.to_string(), expected: self.input_listing() });
            }
        }
        for (name, v) in &self.inputs {
            let value = &self.plan.values[*v];
            let shape = usize_shape(&value.shape);
            let t = given
                .get(name.as_str())
                .ok_or_else(|| RuntimeError::MissingInput { name: name.clone(), expected: self.input_listing() })?;
            if !t.has_type(&shape, value.dtype) {
                return Err(RuntimeError::TypeMismatch {
                    what: format!("input `{name}`"),
                    expected: describe_type(&shape, value.dtype),
                    got: t.describe(),
                });
            }
        }
        Ok(given)
    }

    /// Runs the plan once with the named inputs (every plan input, with its
    /// type) and returns the outputs `wanted` selects (`None`: every
    /// output), read after the state updates as on the device. Bad inputs
    /// change nothing; a kernel error poisons the executor.
    pub fn run(
        &mut self,
        inputs: &[(&str, Tensor)],
        wanted: Option<&dyn Fn(&str) -> bool>,
    ) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        if let Some(p) = &self.poisoned {
            return Err(RuntimeError::Device(format!("this executor failed earlier and cannot run: {p}")));
        }
        let given = self.check_inputs(inputs)?;
        if let Err(e) = self.issue(&given) {
            self.poisoned = Some(e.to_string());
            return Err(e);
        }
        let mut out = BTreeMap::new();
        for (name, v) in &self.plan.outputs {
            if wanted.is_none_or(|w| w(name)) {
                out.insert(name.clone(), self.storage.read(*v, &self.plan.values[*v]).map_err(invalid)?);
            }
        }
        self.step += 1;
        Ok(out)
    }

    /// One step over the buffer: inputs, kernels, state updates.
    fn issue(&mut self, given: &HashMap<&str, &Tensor>) -> Result<(), RuntimeError> {
        for (name, v) in &self.inputs {
            self.storage.write(*v, &self.plan.values[*v], given[name.as_str()]).map_err(invalid)?;
        }
        let comm = self.comm.clone();
        let ctx = Ctx {
            dist: comm.as_deref().map(|comm| Dist {
                comm,
                batch: self.plan.batch,
                sync_batch_norm: self.plan.sync_batch_norm,
            }),
            ..Ctx::single(self.plan.training, self.seed, self.step)
        };
        for k in 0..self.plan.kernels.len() {
            self.execute(k, &ctx).map_err(|source| {
                let kernel = &self.plan.kernels[k];
                RuntimeError::Kernel { index: k, op: kernel.op.name(), scope: kernel.scope.clone(), source }
            })?;
        }
        // State updates the memory plan did not place over their state.
        for (name, v) in &self.plan.state_updates {
            let s = self.state_index[name];
            self.storage.copy(s, *v, &self.plan.values[s]).map_err(invalid)?;
        }
        Ok(())
    }

    /// Kernel `k`: its fills, its operands read, the CPU kernel, its result
    /// (or parts) written.
    fn execute(&mut self, k: usize, ctx: &Ctx) -> Result<(), KernelError> {
        let bad = KernelError::Invalid;
        for i in 0..self.fills[k].len() {
            self.write_fill(self.fills[k][i]).map_err(bad)?;
        }
        let (plan, storage) = (&self.plan, &mut self.storage);
        let kernel = &plan.kernels[k];
        let out = kernel.output;
        if let [i] = kernel.inputs[..] {
            let (a, b) = (&plan.values[i], &plan.values[out]);
            if passes_data_through(&kernel.op, ctx) && a.dtype == b.dtype && a.numel() == b.numel() {
                return storage.copy(out, i, b).map_err(bad);
            }
        }
        let mut x = Vec::with_capacity(kernel.inputs.len());
        for &i in &kernel.inputs {
            x.push(storage.read(i, &plan.values[i]).map_err(|e| bad(format!("operand {i}: {e}")))?);
        }
        let refs: Vec<&Tensor> = x.iter().collect();
        let result = match &kernel.op {
            Op::MultiTensor { body, arity, results } => {
                let sets = multi_tensor(&refs, body, *arity as usize, results);
                x.into_iter().for_each(pool::recycle);
                let total: usize =
                    sets.as_ref().map_or(0, |s| s.iter().map(|set| set.first().map_or(0, Tensor::numel)).sum());
                let (mut at, mut written) = (0, 0);
                for set in sets? {
                    let n = set.first().map_or(0, Tensor::numel);
                    for (r, t) in set.into_iter().enumerate() {
                        // Result-major packing: result r of this set at r * total + at.
                        let offset = (r * total + at) as u64;
                        if let Some(&v) = self.parts[k].get(&offset) {
                            storage.write(v, &plan.values[v], &t).map_err(|e| bad(format!("part at {offset}: {e}")))?;
                            written += 1;
                        }
                        pool::recycle(t);
                    }
                    at += n;
                }
                if written != self.parts[k].len() {
                    return Err(bad(format!(
                        "made {written} of the {} parts the plan names (a part's offset matches no result)",
                        self.parts[k].len()
                    )));
                }
                return Ok(());
            }
            op => run_kernel(op, &refs, &super::typed(ctx, &self.plan, k)),
        };
        // A kernel's other results (a layer-norm backward's gradients), from
        // the same operands and its result.
        let parts = match &result {
            Ok(t) if !self.parts[k].is_empty() => {
                let wanted: Vec<u64> = self.parts[k].keys().copied().collect();
                // The result as its plan dtype stores it (bf16: rounded).
                let stored = (plan.values[out].dtype == tessera_plan::DType::BF16).then(|| {
                    let mut s = t.clone();
                    if let crate::tensor::Data::F32(v) = &mut s.data {
                        super::elementwise::round_to_bf16(v);
                    }
                    s
                });
                Some(super::parts(&kernel.op, &refs, stored.as_ref().unwrap_or(t), &wanted))
            }
            _ => None,
        };
        x.into_iter().for_each(pool::recycle);
        let t = result?;
        for (index, p) in parts.transpose()?.into_iter().flatten() {
            let v = self.parts[k][&index];
            storage.write(v, &plan.values[v], &p).map_err(|e| bad(format!("result {index}: {e}")))?;
            pool::recycle(p);
        }
        storage.write(out, &plan.values[out], &t).map_err(bad)?;
        pool::recycle(t);
        Ok(())
    }
}
