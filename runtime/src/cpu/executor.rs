//! The CPU executor: holds a plan's state (parameters and buffers), runs its
//! kernels in order, returns its outputs and applies its state updates.
//!
//! Memory stays bounded by freeing every intermediate right after its last
//! reader has run (last uses are computed once, in `new`); values named as
//! outputs or state updates live until the end of the run. Freed storage
//! goes back to `pool` for the next kernels and steps. Ops that pass
//! their operand through (reshape, stop_gradient, eval-mode dropout, ...)
//! move a dying operand instead of copying it.
//!
//! bf16 values are held as f32 numbers that bf16 can hold: every kernel
//! result, multi-tensor part, fill, input and state whose plan dtype is bf16
//! is rounded to nearest even where it is stored (`store_as`), so the CPU
//! computes a bf16 plan as a backend storing 2 bytes does; f32 values pass
//! untouched.

use super::buckets::{Buckets, Worker};
use super::elementwise::round_to_bf16;
use super::init::init_tensor;
use super::kernel::{Ctx, Dist};
use super::layout::reshaped;
use super::pool;
use super::{passes_data_through, run_kernel};
use crate::dist::Collective;
use crate::error::KernelError;
use crate::error::RuntimeError;
use crate::tensor::{describe_type, Data, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tessera_plan::plan::{Plan, Source};
use tessera_plan::{DType, Op};

pub struct CpuExecutor {
    plan: Plan,
    seed: u64,
    step: u64,
    /// Fixed shapes of every value.
    shapes: Vec<Vec<usize>>,
    /// The current tensor of every parameter and buffer, by value index.
    states: Vec<Option<Tensor>>,
    state_index: HashMap<String, usize>,
    /// The kernel that reads a value last (`None`: no kernel reads it).
    last_use: Vec<Option<usize>>,
    /// How many outputs and state updates name a value.
    kept: Vec<usize>,
    /// Per kernel, the values that are parts of its packed result, by offset.
    parts: Vec<HashMap<u64, usize>>,
    /// The collective of a data-parallel run (`None`: one process).
    comm: Option<Arc<dyn Collective>>,
    /// The gradient all-reduces and their buckets, and the thread that
    /// sends them while the backward runs (with a collective).
    buckets: Buckets,
    worker: Option<Worker>,
}

/// `t` as a value of plan type `dtype` is stored: rounded to bf16 for bf16
/// (a no-op for anything else, so f32 plans pay one comparison per value).
fn store_as(mut t: Tensor, dtype: DType) -> Tensor {
    if dtype == DType::BF16 {
        if let Data::F32(v) = &mut t.data {
            round_to_bf16(v);
        }
    }
    t
}

/// The tensors of `inputs` in `slots`, or which one is not available.
fn operands<'s>(slots: &'s [Slot], inputs: &[usize]) -> Result<Vec<&'s Tensor>, KernelError> {
    inputs
        .iter()
        .map(|&i| slots[i].get().ok_or_else(|| KernelError::Invalid(format!("operand value {i} is not available"))))
        .collect()
}

/// A fill's tensor, as its dtype holds the value.
fn filled(shape: &[usize], dtype: DType, value: f64) -> Tensor {
    store_as(Tensor::full(shape.to_vec(), dtype, value), dtype)
}

/// A value during a run: borrowed (inputs, state), owned (kernel results and
/// fills), or not (yet, or any more) available.
enum Slot<'a> {
    Empty,
    Borrowed(&'a Tensor),
    Owned(Tensor),
}

impl Slot<'_> {
    fn get(&self) -> Option<&Tensor> {
        match self {
            Slot::Empty => None,
            Slot::Borrowed(t) => Some(t),
            Slot::Owned(t) => Some(t),
        }
    }
}

impl CpuExecutor {
    /// Validates `plan` and initialises every parameter and buffer from its
    /// `Init` rule with random streams keyed by `seed` (see `init`).
    pub fn new(plan: Plan, seed: u64) -> Result<Self, RuntimeError> {
        plan.validate().map_err(RuntimeError::InvalidPlan)?;
        let shapes: Vec<Vec<usize>> =
            plan.values.iter().map(|v| v.shape.iter().map(|&d| d as usize).collect()).collect();
        let mut states = vec![None; plan.values.len()];
        let mut state_index = HashMap::new();
        let mut input_names = HashMap::new();
        for (i, v) in plan.values.iter().enumerate() {
            match &v.source {
                Source::Param { name, init, .. } | Source::Buffer { name, init } => {
                    if state_index.insert(name.clone(), i).is_some() {
                        return Err(RuntimeError::InvalidPlan(format!("state `{name}` is declared twice")));
                    }
                    let t = init_tensor(name, init, &shapes[i], v.dtype, seed).map_err(|message| {
                        RuntimeError::Init { name: name.clone(), init: init.to_string(), message }
                    })?;
                    states[i] = Some(store_as(t, v.dtype));
                }
                Source::Input { name } => {
                    if input_names.insert(name.clone(), i).is_some() {
                        return Err(RuntimeError::InvalidPlan(format!("input `{name}` is declared twice")));
                    }
                }
                Source::Fill { .. } | Source::Kernel(_) | Source::Part { .. } => {}
            }
        }
        let mut parts = vec![HashMap::new(); plan.kernels.len()];
        for (i, v) in plan.values.iter().enumerate() {
            if let Source::Part { kernel, offset } = v.source {
                parts[kernel].insert(offset, i);
            }
        }
        let mut last_use = vec![None; plan.values.len()];
        for (k, kernel) in plan.kernels.iter().enumerate() {
            if kernel.op.is_leaf() {
                return Err(RuntimeError::InvalidPlan(format!("kernel {k} is a leaf op ({})", kernel.op.name())));
            }
            for &i in &kernel.inputs {
                last_use[i] = Some(k);
            }
        }
        let mut kept = vec![0; plan.values.len()];
        for (_, v) in plan.outputs.iter().chain(&plan.state_updates) {
            kept[*v] += 1;
        }
        let buckets = Buckets::of_plan(&plan);
        Ok(CpuExecutor {
            plan,
            seed,
            step: 0,
            shapes,
            states,
            state_index,
            last_use,
            kept,
            parts,
            comm: None,
            buckets,
            worker: None,
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Runs the plan's collectives (and the random streams' rank term)
    /// through `comm`: this executor is one process of a data-parallel run.
    pub fn set_collective(&mut self, comm: Arc<dyn Collective>) {
        self.worker = (comm.world() > 1 && !self.buckets.last.is_empty()).then(|| Worker::start(comm.clone()));
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

    /// Names of every parameter and buffer, in plan order.
    pub fn state_names(&self) -> Vec<String> {
        let mut named: Vec<(&usize, &String)> = self.state_index.iter().map(|(n, i)| (i, n)).collect();
        named.sort();
        named.into_iter().map(|(_, n)| n.clone()).collect()
    }

    pub fn state(&self, name: &str) -> Option<&Tensor> {
        self.state_index.get(name).and_then(|&i| self.states[i].as_ref())
    }

    /// Takes a parameter or buffer out (to hand it to another executor of the
    /// same model without a copy); the executor cannot run until it is set again.
    pub fn take_state(&mut self, name: &str) -> Option<Tensor> {
        let &i = self.state_index.get(name)?;
        self.states[i].take()
    }

    /// Replaces a parameter or buffer (loading weights); its type must match the plan's.
    pub fn set_state(&mut self, name: &str, t: Tensor) -> Result<(), RuntimeError> {
        let &i = self.state_index.get(name).ok_or_else(|| RuntimeError::UnknownState { name: name.to_string() })?;
        let dtype = self.plan.values[i].dtype;
        if !t.has_type(&self.shapes[i], dtype) {
            return Err(RuntimeError::TypeMismatch {
                what: format!("state `{name}`"),
                expected: describe_type(&self.shapes[i], dtype),
                got: t.describe(),
            });
        }
        self.states[i] = Some(store_as(t, dtype));
        Ok(())
    }

    fn input_names(&self) -> String {
        let names: Vec<String> = self
            .plan
            .values
            .iter()
            .filter_map(|v| match &v.source {
                Source::Input { name } => Some(format!(
                    "`{name}` {}",
                    describe_type(&v.shape.iter().map(|&d| d as usize).collect::<Vec<_>>(), v.dtype)
                )),
                _ => None,
            })
            .collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }

    /// Runs every kernel in order with the named inputs (every plan input
    /// must be given, with its type), returns all plan outputs by name, then
    /// applies the plan's state updates and increments the step. On error
    /// nothing changes: no state is updated and the step stays.
    pub fn run(&mut self, inputs: &[(&str, Tensor)]) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        let plan = &self.plan;
        let mut given: HashMap<&str, &Tensor> = HashMap::new();
        for (name, t) in inputs {
            if given.insert(name, t).is_some() {
                return Err(RuntimeError::DuplicateInput { name: name.to_string() });
            }
        }
        let mut slots: Vec<Slot> = Vec::with_capacity(plan.values.len());
        let mut used = 0;
        for (i, v) in plan.values.iter().enumerate() {
            slots.push(match &v.source {
                Source::Input { name } => {
                    let t = given.get(name.as_str()).ok_or_else(|| RuntimeError::MissingInput {
                        name: name.clone(),
                        expected: self.input_names(),
                    })?;
                    if !t.has_type(&self.shapes[i], v.dtype) {
                        return Err(RuntimeError::TypeMismatch {
                            what: format!("input `{name}`"),
                            expected: describe_type(&self.shapes[i], v.dtype),
                            got: t.describe(),
                        });
                    }
                    used += 1;
                    // A bf16 input is used as bf16 holds it (a rounded copy;
                    // compiled plans take f32 inputs, so this is rare).
                    if v.dtype == DType::BF16 {
                        Slot::Owned(store_as((*t).clone(), v.dtype))
                    } else {
                        Slot::Borrowed(t)
                    }
                }
                Source::Param { .. } | Source::Buffer { .. } => {
                    Slot::Borrowed(self.states[i].as_ref().expect("every state is initialised in new"))
                }
                Source::Fill { .. } | Source::Kernel(_) | Source::Part { .. } => Slot::Empty,
            });
        }
        if used != given.len() {
            let known = |n: &str| plan.input(n).is_some();
            let unknown = given.keys().find(|n| !known(n)).expect("some given input is not a plan input");
            return Err(RuntimeError::UnknownInput { name: unknown.to_string(), expected: self.input_names() });
        }
        if let Some(w) = &self.worker {
            w.drain();
        }
        // Gradients on their way: bucket being filled, buckets sent (in
        // order, by their values), and each pending value's bucket.
        let mut filling: (Vec<Tensor>, Vec<usize>) = (Vec::new(), Vec::new());
        let mut sent: std::collections::VecDeque<(usize, Vec<usize>)> = Default::default();
        let mut pending: HashMap<usize, usize> = HashMap::new();
        let ctx = Ctx {
            dist: self.comm.as_deref().map(|comm| Dist {
                comm,
                batch: plan.batch,
                sync_batch_norm: plan.sync_batch_norm,
            }),
            ..Ctx::single(plan.training, self.seed, self.step)
        };
        for (k, kernel) in plan.kernels.iter().enumerate() {
            let fail = |source: KernelError| RuntimeError::Kernel {
                index: k,
                op: kernel.op.name(),
                scope: kernel.scope.clone(),
                source,
            };
            if let Some(w) = &self.worker {
                // Averaged gradients come back before a kernel reads them.
                while let Some(&b) = kernel.inputs.iter().find_map(|i| pending.get(i)) {
                    if sent.is_empty() {
                        // A reader placed before its bucket's last gradient
                        // (a schedule that moved it): the bucket goes out
                        // as filled so far, cut at the same kernel on
                        // every rank; the rest of it follows on its own.
                        w.send(std::mem::take(&mut filling.0)).map_err(|e| fail(KernelError::Collective(e)))?;
                        sent.push_back((b, std::mem::take(&mut filling.1)));
                    }
                    self.receive_bucket(w, &mut sent, &mut pending, &mut slots)?;
                }
                if let Some(&b) = self.buckets.of.get(&k) {
                    // A gradient joins its bucket; the bucket goes out
                    // after its last gradient.
                    let i = kernel.inputs[0];
                    let dying = self.last_use[i] == Some(k) && self.kept[i] == 0;
                    let t = match std::mem::replace(&mut slots[i], Slot::Empty) {
                        Slot::Owned(t) if dying => t,
                        other => {
                            let t = other.get().cloned();
                            slots[i] = other;
                            t.ok_or_else(|| fail(KernelError::Invalid(format!("operand value {i} is not available"))))?
                        }
                    };
                    filling.0.push(t);
                    filling.1.push(kernel.output);
                    pending.insert(kernel.output, b);
                    if self.buckets.last[b] == k && !filling.0.is_empty() {
                        w.send(std::mem::take(&mut filling.0)).map_err(|e| fail(KernelError::Collective(e)))?;
                        sent.push_back((b, std::mem::take(&mut filling.1)));
                    }
                    self.free_dead_operands(k, &mut slots);
                    continue;
                }
            }
            for &i in &kernel.inputs {
                if let (Slot::Empty, Source::Fill { value }) = (&slots[i], &plan.values[i].source) {
                    slots[i] = Slot::Owned(filled(&self.shapes[i], plan.values[i].dtype, *value));
                }
            }
            let out_index = kernel.output;
            if let Op::MultiTensor { body, arity, results } = &kernel.op {
                let x = operands(&slots, &kernel.inputs).map_err(fail)?;
                let sets = super::fused::multi_tensor(&x, body, *arity as usize, results).map_err(fail)?;
                drop(x);
                let total: usize = sets.iter().map(|set| set[0].numel()).sum();
                let mut at = 0;
                let mut placed = Vec::new();
                for set in sets {
                    let n = set[0].numel();
                    for (r, t) in set.into_iter().enumerate() {
                        // Result-major packing: result r of this set at r * total + at.
                        let offset = (r * total + at) as u64;
                        match self.parts[k].get(&offset) {
                            Some(&v) => {
                                if let Some(t) = self.part(v, t, || format!("part at {offset}")).map_err(fail)? {
                                    placed.push((v, t));
                                }
                            }
                            None => pool::recycle(t),
                        }
                    }
                    at += n;
                }
                for (v, t) in placed {
                    slots[v] = Slot::Owned(t);
                }
                self.free_dead_operands(k, &mut slots);
                continue;
            }
            let (shape, dtype) = (&self.shapes[out_index], plan.values[out_index].dtype);
            // The dtype the result already holds: a moved operand's, a cast's
            // (the cast kernel rounds); anything else is rounded below if bf16.
            let mut stored_as = match kernel.op {
                Op::Cast { dtype } => Some(dtype),
                _ => None,
            };
            let result = match self.movable_operand(k, &kernel.op, &ctx, &slots) {
                Some(i) => {
                    stored_as = Some(plan.values[i].dtype);
                    let Slot::Owned(t) = std::mem::replace(&mut slots[i], Slot::Empty) else {
                        unreachable!("movable_operand only picks owned slots")
                    };
                    match kernel.op {
                        Op::Reshape { .. } => reshaped(t, &self.shapes[out_index]).map_err(fail)?,
                        _ => t,
                    }
                }
                None => {
                    let x = operands(&slots, &kernel.inputs).map_err(fail)?;
                    run_kernel(&kernel.op, &x, &super::typed(&ctx, plan, k)).map_err(fail)?
                }
            };
            if !result.has_type(shape, dtype) {
                return Err(fail(KernelError::Invalid(format!(
                    "produced {}, but the plan says {}",
                    result.describe(),
                    describe_type(shape, dtype)
                ))));
            }
            let result = if stored_as == Some(dtype) { result } else { store_as(result, dtype) };
            // A kernel's other results (a layer-norm backward's gradients),
            // from the same operands and its result as stored.
            if !self.parts[k].is_empty() {
                let wanted: Vec<u64> = self.parts[k].keys().copied().collect();
                let x = operands(&slots, &kernel.inputs).map_err(fail)?;
                let made = super::parts(&kernel.op, &x, &result, &wanted).map_err(fail)?;
                drop(x);
                for (index, t) in made {
                    let v = self.parts[k][&index];
                    if let Some(t) = self.part(v, t, || format!("result {index}")).map_err(fail)? {
                        slots[v] = Slot::Owned(t);
                    }
                }
            }
            if self.last_use[out_index].is_some() || self.kept[out_index] > 0 {
                slots[out_index] = Slot::Owned(result);
            } else {
                pool::recycle(result);
            }
            self.free_dead_operands(k, &mut slots);
        }
        if let Some(w) = &self.worker {
            while !sent.is_empty() {
                self.receive_bucket(w, &mut sent, &mut pending, &mut slots)?;
            }
        }
        // Outputs and updates: the last reference takes an owned value, the others clone.
        let mut remaining = self.kept.clone();
        let mut take = |v: usize, slots: &mut Vec<Slot>| -> Tensor {
            remaining[v] -= 1;
            match &slots[v] {
                Slot::Owned(_) if remaining[v] == 0 => match std::mem::replace(&mut slots[v], Slot::Empty) {
                    Slot::Owned(t) => t,
                    _ => unreachable!("matched owned above"),
                },
                Slot::Owned(t) => t.clone(),
                Slot::Borrowed(t) => (*t).clone(),
                Slot::Empty => match &plan.values[v].source {
                    Source::Fill { value } => filled(&self.shapes[v], plan.values[v].dtype, *value),
                    _ => unreachable!("kept values are never freed"),
                },
            }
        };
        let mut outputs = BTreeMap::new();
        for (name, v) in &plan.outputs {
            outputs.insert(name.clone(), take(*v, &mut slots));
        }
        let mut updates = Vec::with_capacity(plan.state_updates.len());
        for (name, v) in &plan.state_updates {
            updates.push((self.state_index[name], take(*v, &mut slots)));
        }
        drop(slots);
        for (i, t) in updates {
            if let Some(old) = self.states[i].replace(t) {
                pool::recycle(old);
            }
        }
        self.step += 1;
        Ok(outputs)
    }

    /// Places the next bucket's averaged gradients (as their plan dtype
    /// stores them) in their values' slots.
    fn receive_bucket(
        &self,
        w: &Worker,
        sent: &mut std::collections::VecDeque<(usize, Vec<usize>)>,
        pending: &mut HashMap<usize, usize>,
        slots: &mut [Slot],
    ) -> Result<(), RuntimeError> {
        let Some((b, values)) = sent.pop_front() else {
            return Err(RuntimeError::InvalidPlan("a gradient all-reduce was read before it was sent".into()));
        };
        let last = self.buckets.last[b];
        let grads = w.receive().map_err(|e| RuntimeError::Kernel {
            index: last,
            op: self.plan.kernels[last].op.name(),
            scope: self.plan.kernels[last].scope.clone(),
            source: KernelError::Collective(e),
        })?;
        for (v, t) in values.into_iter().zip(grads) {
            pending.remove(&v);
            if self.last_use[v].is_some() || self.kept[v] > 0 {
                slots[v] = Slot::Owned(store_as(t, self.plan.values[v].dtype));
            } else {
                pool::recycle(t);
            }
        }
        Ok(())
    }

    /// Part `v` of a kernel, made as `t`: checked against the plan's type,
    /// then as its dtype stores it if anything reads it later (else `None`,
    /// its buffer back in the pool).
    fn part(&self, v: usize, t: Tensor, what: impl Fn() -> String) -> Result<Option<Tensor>, KernelError> {
        let dtype = self.plan.values[v].dtype;
        if !t.has_type(&self.shapes[v], dtype) {
            let want = describe_type(&self.shapes[v], dtype);
            return Err(KernelError::Invalid(format!("{} is {}, but the plan says {want}", what(), t.describe())));
        }
        if self.last_use[v].is_some() || self.kept[v] > 0 {
            Ok(Some(store_as(t, dtype)))
        } else {
            pool::recycle(t);
            Ok(None)
        }
    }

    /// Returns to the pool the owned operands of kernel `k` that no later
    /// kernel, output or state update reads.
    fn free_dead_operands(&self, k: usize, slots: &mut [Slot]) {
        for &i in &self.plan.kernels[k].inputs {
            if self.last_use[i] == Some(k) && self.kept[i] == 0 {
                if let Slot::Owned(t) = std::mem::replace(&mut slots[i], Slot::Empty) {
                    pool::recycle(t);
                }
            }
        }
    }

    /// The operand kernel `k` may move into its result: only for ops that
    /// pass data through, and only an owned value that dies here.
    fn movable_operand(&self, k: usize, op: &Op, ctx: &Ctx, slots: &[Slot]) -> Option<usize> {
        let kernel = &self.plan.kernels[k];
        let &[i] = &kernel.inputs[..] else { return None };
        let dying = self.last_use[i] == Some(k) && self.kept[i] == 0;
        (passes_data_through(op, ctx) && dying && matches!(slots[i], Slot::Owned(_))).then_some(i)
    }
}
