//! The CUDA executor: a plan's memory plan allocated once, its launch list
//! (`lower`) compiled and linked once, and a step that is: upload the
//! inputs, upload (seed, step), walk the list, read back what is asked.
//!
//! Invariants: no allocation inside a step; parameters and buffers start
//! from the same draws as the CPU backend's (`cpu::init`, uploaded); bf16
//! values are stored in 2 bytes and converted at the host boundary; inputs
//! are checked (names, shapes, dtypes) before anything is issued, so a bad
//! call changes nothing. A device error during a step leaves the executor
//! unusable (`poisoned`): its state may be half updated.

use super::arena::{addresses, inline_constants, Layout};
use super::device::{Arg, DevPtr, Function, GemmHandle, HostBuf};
use super::lower::{Lowering, Step};
use super::CudaBackend;
use crate::cpu::init::init_tensor;
use crate::error::RuntimeError;
use crate::memory_layout::check_placements;
use crate::tensor::{describe_type, Data, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tessera_plan::{DType, Plan, Source};

/// A step of the linked launch list.
enum Linked {
    Launch { kernel: usize, f: Function, shape: super::device::Launch, args: Vec<Arg> },
    Gemm { kernel: usize, h: GemmHandle, ptrs: super::device::GemmPtrs },
    Copy { kernel: usize, dst: DevPtr, src: DevPtr, bytes: u64 },
    Zero { kernel: usize, dst: DevPtr, bytes: u64 },
    Collective { kernel: usize, step: super::device::CollectiveStep, slot: usize },
    WaitCollective { kernel: usize, slot: usize },
}

pub struct CudaExecutor {
    backend: Arc<CudaBackend>,
    plan: Plan,
    seed: u64,
    step: u64,
    /// The one allocation of the memory plan (its size is the planned peak).
    base: DevPtr,
    /// Scalar constants and the run's (seed, step).
    table: DevPtr,
    rng: DevPtr,
    addr: Vec<Option<DevPtr>>,
    steps: Vec<Linked>,
    state_index: HashMap<String, usize>,
    inputs: Vec<(String, usize)>,
    /// The inputs region (every batch tensor and per-step scalar) and the
    /// two page-locked staging buffers it is uploaded from in one copy per
    /// step, alternating, with (seed, step) after it.
    inputs_base: DevPtr,
    inputs_bytes: u64,
    staging: Vec<HostBuf>,
    /// The arena and workspace (offset, bytes in the allocation), filled with
    /// NaN bytes before every step under TESSERA_POOL_POISON=1 (the test
    /// script sets it), so a kernel that leaves an element unwritten fails
    /// the numeric tests instead of passing on stale data.
    poison: Option<(DevPtr, u64)>,
    /// Where the next step's inputs land while this step computes (a device
    /// copy of the inputs region, made on the first prefetch), and which
    /// step and inputs (a fingerprint) are there.
    prefetch_buf: Option<DevPtr>,
    prefetched: Option<(u64, u64)>,
    poisoned: Option<String>,
    /// The collective of a data-parallel run (`None`: one process).
    comm: Option<Arc<dyn crate::dist::Collective>>,
}

/// Bytes of the kernels' `tsr_rng` (kernels/prelude.cuh): seed, step,
/// rank, world, batch per process.
const RNG_BYTES: u64 = 40;

fn dev(e: super::device::DeviceError) -> RuntimeError {
    RuntimeError::Device(e.0)
}

/// Host bytes of a tensor stored as `dtype` (floats rounded to bf16 where
/// the plan says bf16); the tensor's type was checked against the plan.
fn to_bytes(t: &Tensor, dtype: DType) -> Result<Vec<u8>, RuntimeError> {
    crate::memory_layout::to_bytes(t, dtype).map_err(RuntimeError::InvalidPlan)
}

fn from_bytes(b: &[u8], shape: Vec<usize>, dtype: DType) -> Result<Tensor, RuntimeError> {
    crate::memory_layout::from_bytes(b, shape, dtype).map_err(RuntimeError::Device)
}

fn usize_shape(s: &[u64]) -> Vec<usize> {
    s.iter().map(|&d| d as usize).collect()
}

impl CudaExecutor {
    pub fn new(backend: Arc<CudaBackend>, plan: Plan, seed: u64) -> Result<Self, RuntimeError> {
        plan.validate().map_err(RuntimeError::InvalidPlan)?;
        let memory = plan.memory.clone().ok_or_else(|| {
            RuntimeError::InvalidPlan("the plan has no memory plan (the CUDA backend executes it)".into())
        })?;
        check_placements(&plan, &memory).map_err(|e| RuntimeError::InvalidPlan(format!("memory plan: {e}")))?;
        memory.simulate(&plan).map_err(|e| RuntimeError::InvalidPlan(format!("memory plan: {e}")))?;
        let device = backend.device();
        let layout = Layout::of(&memory);
        let base = device.alloc(layout.total).map_err(dev)?;
        // The table: (seed, step) first, then one 8-byte slot per scalar constant.
        let constants = inline_constants(&plan, &memory);
        let table = device.alloc(RNG_BYTES + 8 * constants.len() as u64).map_err(|e| {
            unsafe { device.free(base) };
            dev(e)
        })?;
        let mut ex = CudaExecutor {
            backend: backend.clone(),
            plan,
            seed,
            step: 0,
            base,
            table,
            rng: table,
            addr: Vec::new(),
            steps: Vec::new(),
            state_index: HashMap::new(),
            inputs: Vec::new(),
            inputs_base: base.add(layout.inputs),
            inputs_bytes: memory.parts.inputs,
            staging: Vec::new(),
            poison: (std::env::var("TESSERA_POOL_POISON").as_deref() == Ok("1"))
                .then(|| (base.add(layout.arena), layout.total - layout.arena)),
            prefetch_buf: None,
            prefetched: None,
            poisoned: None,
            comm: None,
        };
        for _ in 0..2 {
            let b = device.alloc_host(memory.parts.inputs as usize + RNG_BYTES as usize).map_err(dev)?;
            ex.staging.push(b);
        }
        let slots: Vec<(usize, DevPtr)> =
            constants.iter().enumerate().map(|(i, &v)| (v, table.add(RNG_BYTES + 8 * i as u64))).collect();
        let mut blob = vec![0u8; 8 * constants.len()];
        for (i, &v) in constants.iter().enumerate() {
            let value = &ex.plan.values[v];
            let Source::Fill { value: c } = value.source else { unreachable!("inline constants are fills") };
            let t = Tensor::full(vec![1], value.dtype, c);
            let b = to_bytes(&t, value.dtype)?;
            blob[8 * i..8 * i + b.len()].copy_from_slice(&b);
        }
        device.upload(table.add(RNG_BYTES), &blob).map_err(dev)?;
        ex.addr = addresses(&ex.plan, &memory, base, &slots);
        // Parameters and buffers: the CPU backend's initial draws.
        for (i, v) in ex.plan.values.iter().enumerate() {
            match &v.source {
                Source::Param { name, init, .. } | Source::Buffer { name, init } => {
                    if ex.state_index.insert(name.clone(), i).is_some() {
                        return Err(RuntimeError::InvalidPlan(format!("state `{name}` is declared twice")));
                    }
                    let t = init_tensor(name, init, &usize_shape(&v.shape), v.dtype, seed).map_err(|message| {
                        RuntimeError::Init { name: name.clone(), init: init.to_string(), message }
                    })?;
                    let at = ex.addr[i]
                        .ok_or_else(|| RuntimeError::InvalidPlan(format!("state `{name}` has no storage")))?;
                    device.upload(at, &to_bytes(&t, v.dtype)?).map_err(dev)?;
                }
                Source::Input { name } => {
                    if ex.inputs.iter().any(|(n, _)| n == name) {
                        return Err(RuntimeError::InvalidPlan(format!("input `{name}` is declared twice")));
                    }
                    ex.inputs.push((name.clone(), i));
                }
                _ => {}
            }
        }
        let mut l = Lowering::new(&ex.plan, &memory, &ex.addr, base, ex.rng);
        l.lower_all().map_err(RuntimeError::InvalidPlan)?;
        let (steps, sources) = (l.steps, l.sources);
        let functions = backend.functions(&sources).map_err(RuntimeError::Device)?;
        for s in steps {
            ex.steps.push(match s {
                Step::Launch { kernel, source, shape, args } => {
                    Linked::Launch { kernel, f: functions[source], shape, args }
                }
                Step::Gemm { kernel, desc, ptrs } => {
                    Linked::Gemm { kernel, h: device.prepare_gemm(&desc).map_err(dev)?, ptrs }
                }
                Step::Copy { kernel, dst, src, bytes } => Linked::Copy { kernel, dst, src, bytes },
                Step::Zero { kernel, dst, bytes } => Linked::Zero { kernel, dst, bytes },
                Step::Collective { kernel, step, slot } => Linked::Collective { kernel, step, slot },
                Step::WaitCollective { kernel, slot } => Linked::WaitCollective { kernel, slot },
            });
        }
        Ok(ex)
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// Makes this executor one rank of a data-parallel run: its
    /// collectives run across `comm`'s ranks (NCCL on a GPU).
    pub fn set_collective(&mut self, comm: Arc<dyn crate::dist::Collective>) -> Result<(), RuntimeError> {
        let world = self.plan.world();
        if world > 1 && world != comm.world() as u64 {
            return Err(RuntimeError::InvalidPlan(format!(
                "the plan was compiled for {world} ranks, but this run has {}",
                comm.world()
            )));
        }
        self.comm = Some(comm);
        Ok(())
    }

    pub fn set_step(&mut self, s: u64) {
        self.step = s;
        self.prefetched = None;
    }

    /// Launches, GEMMs and copies of one step.
    pub fn launches(&self) -> usize {
        self.steps.len()
    }

    pub fn same_device(&self, other: &CudaExecutor) -> bool {
        Arc::ptr_eq(&self.backend, &other.backend)
    }

    pub fn state_names(&self) -> Vec<String> {
        let mut named: Vec<(&usize, &String)> = self.state_index.iter().map(|(n, i)| (i, n)).collect();
        named.sort();
        named.into_iter().map(|(_, n)| n.clone()).collect()
    }

    fn read_value(&self, v: usize) -> Result<Tensor, RuntimeError> {
        let value = &self.plan.values[v];
        let at = self.addr[v].ok_or_else(|| RuntimeError::InvalidPlan(format!("value {v} has no storage")))?;
        let mut bytes = vec![0u8; (value.numel() * value.dtype.size_bytes()) as usize];
        self.backend.device().download(at, &mut bytes).map_err(dev)?;
        from_bytes(&bytes, usize_shape(&value.shape), value.dtype)
    }

    pub fn read_state(&self, name: &str) -> Result<Option<Tensor>, RuntimeError> {
        match self.state_index.get(name) {
            Some(&i) => self.read_value(i).map(Some),
            None => Ok(None),
        }
    }

    /// Rank `root`'s values of the float states `names` on every rank of
    /// `comm`, device to device (NCCL's broadcast on a GPU). Unknown names
    /// and integer states are left alone.
    pub fn broadcast_states(
        &mut self,
        names: &[String],
        root: usize,
        comm: &dyn crate::dist::Collective,
    ) -> Result<(), RuntimeError> {
        use super::device::{CollectiveOp, CollectiveStep, Elem};
        if comm.world() < 2 {
            return Ok(());
        }
        let device = self.backend.device();
        for name in names {
            let Some(&i) = self.state_index.get(name) else { continue };
            let v = &self.plan.values[i];
            let elem = match v.dtype {
                DType::F32 => Elem::F32,
                DType::BF16 => Elem::BF16,
                _ => continue,
            };
            let at = self.addr[i].expect("states have storage");
            let step =
                CollectiveStep { op: CollectiveOp::Broadcast { root }, elem, src: at, dst: at, count: v.numel() };
            device
                .collective(comm, &step)
                .map_err(|e| RuntimeError::Device(format!("broadcasting `{name}`: {}", e.0)))?;
        }
        device.synchronize().map_err(dev)
    }

    pub fn write_state(&mut self, name: &str, t: Tensor) -> Result<(), RuntimeError> {
        let &i = self.state_index.get(name).ok_or_else(|| RuntimeError::UnknownState { name: name.to_string() })?;
        let v = &self.plan.values[i];
        let shape = usize_shape(&v.shape);
        if !t.has_type(&shape, v.dtype) {
            return Err(RuntimeError::TypeMismatch {
                what: format!("state `{name}`"),
                expected: describe_type(&shape, v.dtype),
                got: t.describe(),
            });
        }
        let at = self.addr[i].expect("states have storage");
        self.backend.device().upload(at, &to_bytes(&t, v.dtype)?).map_err(dev)
    }

    /// Copies every state `to` has from this executor, device to device.
    pub fn copy_state_to(&self, to: &mut CudaExecutor) -> Result<(), RuntimeError> {
        for (name, &j) in &to.state_index {
            let Some(&i) = self.state_index.get(name) else { continue };
            let (a, b) = (&self.plan.values[i], &to.plan.values[j]);
            if a.shape != b.shape || a.dtype != b.dtype {
                return Err(RuntimeError::TypeMismatch {
                    what: format!("state `{name}` handed between plans"),
                    expected: describe_type(&usize_shape(&b.shape), b.dtype),
                    got: describe_type(&usize_shape(&a.shape), a.dtype),
                });
            }
            let bytes = a.numel() * a.dtype.size_bytes();
            let (src, dst) = (self.addr[i].expect("states have storage"), to.addr[j].expect("states have storage"));
            self.backend.device().copy(dst, src, bytes).map_err(dev)?;
        }
        Ok(())
    }

    /// One step: checks and uploads the inputs, runs the launch list,
    /// applies the state updates the memory plan did not place in place,
    /// and reads back the outputs `wanted` selects.
    pub fn run(
        &mut self,
        inputs: &[(&str, Tensor)],
        wanted: Option<&dyn Fn(&str) -> bool>,
    ) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        let given: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (*n, t)).collect();
        self.run_next(&given, None, wanted)
    }

    /// `run`, and while the step computes, the inputs of the next run
    /// (`next`, which the next call must be given again) are written to
    /// page-locked memory and copied to the device on the copy stream, so
    /// that the next step starts with a device-to-device copy instead of
    /// the host's work and the bus. Inputs that do not fit the plan are not
    /// prefetched (the next run reports them).
    pub fn run_next(
        &mut self,
        inputs: &[(&str, &Tensor)],
        next: Option<&[(&str, &Tensor)]>,
        wanted: Option<&dyn Fn(&str) -> bool>,
    ) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        if let Some(p) = &self.poisoned {
            return Err(RuntimeError::Device(format!("this executor failed earlier and cannot run: {p}")));
        }
        let world = self.plan.world();
        if world > 1 && self.comm.is_none() {
            return Err(RuntimeError::Device(format!(
                "the plan is one rank of {world}: it needs the run's collective, and this executor has none (start the run with DISTRIBUTED.NUM_PROC_PER_NODE or a launcher)"
            )));
        }
        let given = self.checked(inputs)?;
        let mut result = self.issue(&given);
        if result.is_ok() {
            if let Some(next) = next {
                result = self.prefetch(next);
            }
        }
        if result.is_ok() {
            result = self.backend.device().synchronize().map_err(dev);
        }
        if let Err(e) = &result {
            self.poisoned = Some(e.to_string());
        }
        result?;
        let mut out = BTreeMap::new();
        for (name, v) in &self.plan.outputs {
            if wanted.is_none_or(|w| w(name)) {
                out.insert(name.clone(), self.read_value(*v)?);
            }
        }
        self.step += 1;
        Ok(out)
    }

    /// The inputs by name, each the plan's type, none missing or unknown.
    fn checked<'t>(&self, inputs: &[(&'t str, &'t Tensor)]) -> Result<HashMap<&'t str, &'t Tensor>, RuntimeError> {
        let listing = || {
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
        };
        let mut given: HashMap<&str, &Tensor> = HashMap::new();
        for (name, t) in inputs {
            if given.insert(name, t).is_some() {
                return Err(RuntimeError::DuplicateInput { name: name.to_string() });
            }
            if !self.inputs.iter().any(|(n, _)| n == name) {
                return Err(RuntimeError::UnknownInput { name: name.to_string(), expected: listing() });
            }
        }
        for (name, v) in &self.inputs {
            let value = &self.plan.values[*v];
            let shape = usize_shape(&value.shape);
            let t = given
                .get(name.as_str())
                .ok_or_else(|| RuntimeError::MissingInput { name: name.clone(), expected: listing() })?;
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

    /// A cheap fingerprint of a set of inputs (names, shapes, a sample of
    /// their values): a prefetch is used only by the run given those inputs.
    fn fingerprint(&self, given: &HashMap<&str, &Tensor>) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut eat = |b: &[u8]| {
            for &x in b {
                h = (h ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for (name, _) in &self.inputs {
            let t = given[name.as_str()];
            eat(name.as_bytes());
            eat(&(t.numel() as u64).to_ne_bytes());
            let step = (t.numel() / 64).max(1);
            match &t.data {
                Data::F32(v) => v.iter().step_by(step).for_each(|x| eat(&x.to_bits().to_ne_bytes())),
                Data::I64(v) => v.iter().step_by(step).for_each(|x| eat(&x.to_ne_bytes())),
            }
        }
        h
    }

    /// Writes the next step's inputs to the other staging buffer and
    /// starts their copy to the prefetch buffer on the copy stream.
    fn prefetch(&mut self, next: &[(&str, &Tensor)]) -> Result<(), RuntimeError> {
        self.prefetched = None;
        let Ok(given) = self.checked(next) else { return Ok(()) };
        let n = self.inputs_bytes as usize;
        let device = self.backend.device();
        let dst = match self.prefetch_buf {
            Some(p) => p,
            None => {
                let p = device.alloc(n as u64).map_err(dev)?;
                self.prefetch_buf = Some(p);
                p
            }
        };
        let slot = ((self.step + 1) % 2) as usize;
        let mut staging = std::mem::take(&mut self.staging);
        let encoded = self.encode_inputs(&given, &mut staging[slot]);
        let copied = encoded.and_then(|_| device.prefetch(dst, &staging[slot], 0, n).map_err(dev));
        self.staging = staging;
        copied?;
        self.prefetched = Some((self.step + 1, self.fingerprint(&given)));
        Ok(())
    }

    /// Every input at its planned offset in the inputs region's image.
    fn encode_inputs(&self, given: &HashMap<&str, &Tensor>, buf: &mut HostBuf) -> Result<(), RuntimeError> {
        let bytes = buf.as_mut_slice();
        for (name, v) in &self.inputs {
            let value = &self.plan.values[*v];
            let at = (self.addr[*v].expect("inputs have storage").0 - self.inputs_base.0) as usize;
            let len = (value.numel() * value.dtype.size_bytes()) as usize;
            // Straight from the host tensor into page-locked memory: one copy.
            crate::memory_layout::encode(given[name.as_str()], value.dtype, &mut bytes[at..at + len])
                .map_err(RuntimeError::InvalidPlan)?;
        }
        Ok(())
    }

    fn issue(&mut self, given: &HashMap<&str, &Tensor>) -> Result<(), RuntimeError> {
        // The inputs: from the prefetch buffer when the previous run brought
        // exactly these over (one device-to-device copy), else into the
        // staging buffer at their planned offsets and one copy over the
        // bus; then (seed, step) after them. No wait. (The staging buffer
        // goes back into place on every path: a failed step leaves the
        // executor able to report it.)
        let n = self.inputs_bytes as usize;
        let prefetched = self.prefetched.take() == Some((self.step, self.fingerprint(given)));
        let mut staging = std::mem::take(&mut self.staging);
        let slot = (self.step % 2) as usize;
        let encoded = if prefetched { Ok(()) } else { self.encode_inputs(given, &mut staging[slot]) };
        if let Err(e) = encoded {
            self.staging = staging;
            return Err(e);
        }
        let buf = &mut staging[slot];
        // The kernels' `tsr_rng`: seed, step, and this process's place for
        // the random streams' rank term (rank, world, batch per process).
        let (rank, world) = self.comm.as_ref().map_or((0, 1), |c| (c.rank() as u64, c.world() as u64));
        let rng: Vec<u8> =
            [self.seed, self.step, rank, world, self.plan.batch].iter().flat_map(|x| x.to_ne_bytes()).collect();
        buf.as_mut_slice()[n..n + RNG_BYTES as usize].copy_from_slice(&rng);
        let device = self.backend.device();
        let poisoned = match self.poison {
            Some((at, bytes)) => device.fill(at, 0xff, bytes),
            None => Ok(()),
        };
        let inputs = match (prefetched, self.prefetch_buf) {
            (true, Some(src)) => poisoned.and_then(|_| device.consume_prefetch(self.inputs_base, src, n as u64)),
            _ => poisoned.and_then(|_| device.upload_async(self.inputs_base, buf, 0, n)),
        };
        let uploaded = inputs.and_then(|_| device.upload_async(self.rng, buf, n, RNG_BYTES as usize));
        self.staging = staging;
        uploaded.map_err(dev)?;
        let fail = |kernel: usize, e: super::device::DeviceError| {
            let k = &self.plan.kernels[kernel];
            RuntimeError::Device(format!("kernel {kernel} ({}) in `{}`: {}", k.op.name(), k.scope, e.0))
        };
        for s in &self.steps {
            match s {
                Linked::Launch { kernel, f, shape, args } => {
                    device.launch(*f, *shape, args).map_err(|e| fail(*kernel, e))?
                }
                Linked::Gemm { kernel, h, ptrs } => device.gemm(*h, ptrs).map_err(|e| fail(*kernel, e))?,
                Linked::Copy { kernel, dst, src, bytes } => {
                    device.copy(*dst, *src, *bytes).map_err(|e| fail(*kernel, e))?
                }
                Linked::Zero { kernel, dst, bytes } => device.zero(*dst, *bytes).map_err(|e| fail(*kernel, e))?,
                Linked::WaitCollective { kernel, slot } => {
                    device.wait_collective(*slot).map_err(|e| fail(*kernel, e))?
                }
                Linked::Collective { kernel, step, slot } => {
                    let comm = self.comm.as_deref().ok_or_else(|| {
                        fail(*kernel, super::device::DeviceError(
                            "a collective over several ranks needs the run's collective, and this executor has none (start the run with DISTRIBUTED.NUM_PROC_PER_NODE or a launcher)".into(),
                        ))
                    })?;
                    device.collective_async(comm, step, *slot).map_err(|e| fail(*kernel, e))?
                }
            }
        }
        // State updates the memory plan could not place over their state.
        for (name, v) in &self.plan.state_updates {
            let s = self.state_index[name];
            let (src, dst) = (self.addr[*v].expect("updates have storage"), self.addr[s].expect("states have storage"));
            let value = &self.plan.values[s];
            if src != dst {
                device.copy(dst, src, value.numel() * value.dtype.size_bytes()).map_err(dev)?;
            }
        }
        Ok(())
    }
}

impl Drop for CudaExecutor {
    fn drop(&mut self) {
        let device = self.backend.device();
        let _ = device.synchronize();
        // SAFETY: allocated in `new` by this device; nothing uses them after.
        unsafe {
            device.free(self.base);
            device.free(self.table);
            if let Some(p) = self.prefetch_buf {
                device.free(p);
            }
            for b in &mut self.staging {
                device.free_host(b);
            }
        }
    }
}
