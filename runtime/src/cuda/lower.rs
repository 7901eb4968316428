//! From a plan to the launch list of one step: every kernel of the plan
//! becomes launches of compiled kernels, GEMMs and copies with every
//! address, shape and scalar fixed (the memory plan fixed the addresses), so
//! a step is a walk over this list and nothing else. The op families live
//! in `ops/`, one module (and one template) each; `lower_kernel` is the one
//! place that maps an op to its family.

use super::arena::Layout;
use super::device::{Arg, CollectiveOp, CollectiveStep, DevPtr, Elem, GemmPtrs, Launch};
use super::gemm::GemmDesc;
use super::ops;
use super::source::KernelSource;
use std::collections::HashMap;
use tessera_plan::memory::MemoryPlan;
use tessera_plan::scratch::{scratch, Scratch};
use tessera_plan::{DType, Op, Plan};

/// One entry of the launch list; `kernel` is the plan kernel it belongs to.
#[derive(Clone, Debug)]
pub enum Step {
    Launch {
        kernel: usize,
        source: usize,
        shape: Launch,
        args: Vec<Arg>,
    },
    Gemm {
        kernel: usize,
        desc: GemmDesc,
        ptrs: GemmPtrs,
    },
    Copy {
        kernel: usize,
        dst: DevPtr,
        src: DevPtr,
        bytes: u64,
    },
    Zero {
        kernel: usize,
        dst: DevPtr,
        bytes: u64,
    },
    /// A collective across the ranks of a data-parallel run, started on the
    /// communication stream (`slot` numbers it in the list; see `overlap`).
    Collective {
        kernel: usize,
        step: CollectiveStep,
        slot: usize,
    },
    /// The compute stream waits for collective `slot` here.
    WaitCollective {
        kernel: usize,
        slot: usize,
    },
}

impl Step {
    /// The plan kernel the step belongs to.
    pub fn kernel(&self) -> usize {
        match *self {
            Step::Launch { kernel, .. }
            | Step::Gemm { kernel, .. }
            | Step::Copy { kernel, .. }
            | Step::Zero { kernel, .. }
            | Step::Collective { kernel, .. }
            | Step::WaitCollective { kernel, .. } => kernel,
        }
    }
}

/// A value as a kernel sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Val {
    pub ptr: DevPtr,
    pub shape: Vec<u64>,
    pub dtype: DType,
}

impl Val {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
    pub fn bytes(&self) -> u64 {
        self.numel() * self.dtype.size_bytes()
    }
}

/// The C type of a stored element.
pub fn c_type(d: DType) -> Result<&'static str, String> {
    match d {
        DType::F32 => Ok("float"),
        DType::BF16 => Ok("bf16"),
        DType::I64 => Ok("i64"),
        DType::F16 => Err("f16 values are not supported by the CUDA backend (no plan makes them)".into()),
    }
}

pub struct Lowering<'a> {
    pub plan: &'a Plan,
    pub memory: &'a MemoryPlan,
    addr: &'a [Option<DevPtr>],
    workspace: DevPtr,
    /// Where the run's `tsr_rng` (seed, step) lives.
    pub rng: DevPtr,
    pub steps: Vec<Step>,
    pub sources: Vec<KernelSource>,
    /// The plan's world size (`Plan::world`).
    pub world: u64,
    by_name: HashMap<String, usize>,
    /// Kernels whose values already hold what a fill needs this step
    /// (non-scalar fills are materialised before their first reader).
    filled: Vec<bool>,
    /// Per kernel, its parts (offset, value): found once for the plan.
    parts: Vec<Vec<(u64, usize)>>,
}

impl<'a> Lowering<'a> {
    pub fn new(plan: &'a Plan, memory: &'a MemoryPlan, addr: &'a [Option<DevPtr>], base: DevPtr, rng: DevPtr) -> Self {
        let layout = Layout::of(memory);
        Lowering {
            plan,
            memory,
            addr,
            workspace: base.add(layout.workspace),
            rng,
            steps: Vec::new(),
            sources: Vec::new(),
            world: plan.world(),
            by_name: HashMap::new(),
            filled: vec![false; plan.values.len()],
            parts: {
                let mut parts = vec![Vec::new(); plan.kernels.len()];
                for (v, value) in plan.values.iter().enumerate() {
                    if let tessera_plan::Source::Part { kernel, offset } = value.source {
                        if let Some(p) = parts.get_mut(kernel) {
                            p.push((offset, v));
                        }
                    }
                }
                parts
            },
        }
    }

    /// The values kernel `k` writes besides its result, as (offset, value):
    /// a multi-tensor kernel's parts, another kernel's further results.
    pub fn parts(&self, k: usize) -> &[(u64, usize)] {
        &self.parts[k]
    }

    /// The value `v` (shape, dtype, address).
    pub fn value(&self, v: usize) -> Result<Val, String> {
        let value = &self.plan.values[v];
        let ptr = self.addr[v].ok_or_else(|| format!("value {v} has no storage in the memory plan"))?;
        Ok(Val { ptr, shape: value.shape.clone(), dtype: value.dtype })
    }

    /// Operand `i` of kernel `k`.
    pub fn input(&self, k: usize, i: usize) -> Result<Val, String> {
        let kernel = &self.plan.kernels[k];
        let v = *kernel.inputs.get(i).ok_or_else(|| format!("operand {i} is missing"))?;
        self.value(v)
    }

    pub fn inputs(&self, k: usize) -> Result<Vec<Val>, String> {
        (0..self.plan.kernels[k].inputs.len()).map(|i| self.input(k, i)).collect()
    }

    /// The result of kernel `k`.
    pub fn output(&self, k: usize) -> Result<Val, String> {
        self.value(self.plan.kernels[k].output)
    }

    /// Kernel `k`'s scratch piece `name`: its address and size.
    pub fn scratch(&self, k: usize, name: &str) -> Result<(DevPtr, u64), String> {
        let s: Scratch = scratch(self.plan, k);
        let (off, bytes) = s.piece(name).ok_or_else(|| format!("the plan's scratch of this kernel has no `{name}`"))?;
        if s.total() > self.memory.parts.workspace {
            return Err(format!(
                "needs {} bytes of scratch, the memory plan's workspace is {}",
                s.total(),
                self.memory.parts.workspace
            ));
        }
        Ok((self.workspace.add(off), bytes))
    }

    /// A kernel source to launch; equal sources are compiled once.
    pub fn source(&mut self, src: KernelSource) -> usize {
        if let Some(&i) = self.by_name.get(&src.name) {
            return i;
        }
        self.sources.push(src);
        let i = self.sources.len() - 1;
        self.by_name.insert(self.sources[i].name.clone(), i);
        i
    }

    pub fn launch(&mut self, kernel: usize, src: KernelSource, shape: Launch, args: Vec<Arg>) {
        let source = self.source(src);
        self.steps.push(Step::Launch { kernel, source, shape, args });
    }

    pub fn gemm(&mut self, kernel: usize, desc: GemmDesc, ptrs: GemmPtrs) {
        self.steps.push(Step::Gemm { kernel, desc: desc.aligned_to(&ptrs), ptrs });
    }

    /// Copies `bytes` unless source and destination are the same storage.
    pub fn copy(&mut self, kernel: usize, dst: DevPtr, src: DevPtr, bytes: u64) {
        if dst != src && bytes > 0 {
            self.steps.push(Step::Copy { kernel, dst, src, bytes });
        }
    }

    pub fn zero(&mut self, kernel: usize, dst: DevPtr, bytes: u64) {
        if bytes > 0 {
            self.steps.push(Step::Zero { kernel, dst, bytes });
        }
    }

    /// Lowers every kernel of the plan, in order.
    pub fn lower_all(&mut self) -> Result<(), String> {
        for k in 0..self.plan.kernels.len() {
            self.materialise_fills(k)?;
            lower_kernel(self, k).map_err(|e| {
                let kernel = &self.plan.kernels[k];
                format!("kernel {k} ({}) in `{}`: {e}", kernel.op.name(), kernel.scope)
            })?;
        }
        if self.world > 1 {
            let fp = super::overlap::Footprints::new(self.plan, self.addr, self.workspace);
            self.steps = super::overlap::schedule(std::mem::take(&mut self.steps), self.plan, self.world, &fp);
        }
        Ok(())
    }

    /// Non-scalar fills live in the arena (shared with other values over
    /// the step), so each is written before its first reader, every step.
    fn materialise_fills(&mut self, k: usize) -> Result<(), String> {
        for i in 0..self.plan.kernels[k].inputs.len() {
            let v = self.plan.kernels[k].inputs[i];
            if let tessera_plan::Source::Fill { value } = self.plan.values[v].source {
                if !self.filled[v] && self.memory.placements[v].region != tessera_plan::Region::Inline {
                    self.filled[v] = true;
                    let val = self.value(v)?;
                    ops::elementwise::fill(self, k, &val, value)?;
                }
            }
        }
        Ok(())
    }
}

/// The one place that maps an op to the family that lowers it.
fn lower_kernel(l: &mut Lowering, k: usize) -> Result<(), String> {
    let op = l.plan.kernels[k].op.clone();
    match &op {
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Buffer { .. }
        | Op::Fill { .. }
        | Op::Part { .. }
        | Op::ResultPart { .. } => Err(format!("{} is not a kernel", op.name())),
        Op::Unary(_)
        | Op::Binary(_)
        | Op::Scale { .. }
        | Op::AddScalar { .. }
        | Op::PowScalar { .. }
        | Op::GeluGrad
        | Op::Dropout { .. }
        | Op::DropPath { .. }
        | Op::DivCount { .. }
        | Op::Cast { .. }
        | Op::Fused { .. } => ops::elementwise::lower(l, k, &op),
        Op::MultiTensor { .. } => ops::elementwise::multi_tensor(l, k, &op),
        Op::Reshape { .. }
        | Op::StopGradient
        | Op::Permute { .. }
        | Op::Concat { .. }
        | Op::Slice { .. }
        | Op::Expand { .. }
        | Op::Pad { .. } => ops::layout::lower(l, k, &op),
        Op::AllGather { world } | Op::AllReduce { world, .. } | Op::AllGatherGrad { world } if *world == 1 => {
            ops::layout::identity(l, k)
        }
        Op::AllGather { .. } | Op::AllReduce { .. } | Op::AllGatherGrad { .. } => collective(l, k, &op),
        Op::Linear
        | Op::Matmul { .. }
        | Op::GeluLinear
        | Op::LinearResidual { .. }
        | Op::LayerNormLinear { .. }
        | Op::MatmulGeluRhs { .. }
        | Op::MatmulLayerNormRhs { .. }
        | Op::MatmulGeluGrad { .. }
        | Op::Conv2d { .. }
        | Op::Conv2dGradInput { .. }
        | Op::Conv2dGradWeight { .. } => ops::matmul::lower(l, k, &op),
        Op::Reduce { .. } | Op::ReduceF32 { .. } | Op::SumOfSquares => ops::reduce::lower(l, k, &op),
        Op::LayerNorm { .. }
        | Op::Normalize { .. }
        | Op::NormalizeGrad { .. }
        | Op::LayerNormGrad { .. }
        | Op::LayerNormWeightGrad { .. }
        | Op::BatchNorm { .. }
        | Op::BatchStandardize { .. }
        | Op::BatchStandardizeGrad { .. }
        | Op::RunningStat { .. } => ops::norm::lower(l, k, &op),
        Op::Softmax { .. }
        | Op::LogSoftmax { .. }
        | Op::L2Normalize { .. }
        | Op::CrossEntropy { .. }
        | Op::CrossEntropyGrad { .. }
        | Op::ZeroDiagonal { .. } => ops::softmax::lower(l, k, &op),
        Op::Attention { .. }
        | Op::AttentionGrad { .. }
        | Op::AttentionPacked { .. }
        | Op::AttentionPackedGrad { .. } => ops::attention::lower(l, k, &op),
        Op::QueuePush { .. } | Op::QueueAdvance { .. } => ops::state::lower(l, k, &op),
    }
}

/// The kernel sources a plan's launch list uses, lowered on paper (no
/// device: addresses as if the allocation started at a fixed base). What
/// the compile checks (NVRTC, ptxas) render without a GPU.
pub fn kernel_sources(plan: &Plan) -> Result<Vec<KernelSource>, String> {
    on_paper(plan).map(|l| l.1)
}

/// A plan's launch list lowered on paper (as `kernel_sources`), with the
/// addresses it was lowered for (per value) and the workspace's.
#[allow(clippy::type_complexity)]
pub fn launch_list(plan: &Plan) -> Result<(Vec<Step>, Vec<Option<DevPtr>>, DevPtr), String> {
    on_paper(plan).map(|l| (l.0, l.2, l.3))
}

#[allow(clippy::type_complexity)]
fn on_paper(plan: &Plan) -> Result<(Vec<Step>, Vec<KernelSource>, Vec<Option<DevPtr>>, DevPtr), String> {
    let memory = plan.memory.as_ref().ok_or("the plan has no memory plan")?;
    let base = DevPtr(1 << 40);
    let table = DevPtr(1 << 41);
    let constants = super::arena::inline_constants(plan, memory);
    let slots: Vec<(usize, DevPtr)> =
        constants.iter().enumerate().map(|(i, &v)| (v, table.add(16 + 8 * i as u64))).collect();
    let addr = super::arena::addresses(plan, memory, base, &slots);
    let mut l = Lowering::new(plan, memory, &addr, base, table);
    l.lower_all()?;
    let workspace = l.workspace;
    Ok((l.steps, l.sources, addr, workspace))
}

/// `all_reduce`, `all_gather` and `all_gather_grad` over several ranks:
/// one collective of the run's communicator (NCCL on a GPU).
fn collective(l: &mut Lowering, k: usize, op: &Op) -> Result<(), String> {
    use crate::dist::Reduction;
    let [x] = &l.inputs(k)?[..] else { return Err(format!("{} takes one operand", op.name())) };
    let out = l.output(k)?;
    let elem = match (x.dtype, out.dtype) {
        (DType::F32, DType::F32) => Elem::F32,
        (DType::BF16, DType::BF16) => Elem::BF16,
        (a, b) => return Err(format!("{} runs on f32 or bf16 values, got {a} -> {b}", op.name())),
    };
    let (kind, world) = match *op {
        Op::AllReduce { op: r, world } => (
            CollectiveOp::AllReduce(match r {
                tessera_plan::ReduceOp::Sum => Reduction::Sum,
                tessera_plan::ReduceOp::Mean => Reduction::Mean,
                tessera_plan::ReduceOp::Max => Reduction::Max,
            }),
            world,
        ),
        Op::AllGather { world } => (CollectiveOp::AllGather, world),
        Op::AllGatherGrad { world } => (CollectiveOp::ReduceScatter, world),
        _ => return Err(format!("{} is not a collective", op.name())),
    };
    let step = CollectiveStep { op: kind, elem, src: x.ptr, dst: out.ptr, count: x.numel() };
    if step.dst_count(world as usize) != out.numel() {
        return Err(format!("{} of {:?} into {:?} over {world} ranks", op.name(), x.shape, out.shape));
    }
    l.steps.push(Step::Collective { kernel: k, step, slot: 0 });
    Ok(())
}
