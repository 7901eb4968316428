//! Communication beside computation. Every collective of the launch list
//! runs on the device's communication stream (NCCL's own stream on a GPU),
//! started when the compute stream reaches it and joined back into the
//! compute stream just before the first later step that touches its memory
//! (`Step::WaitCollective`). The gradient all-reduces of a data-parallel
//! step are in place in the flat gradient region (the memory plan has the
//! backward write each gradient there) and are merged into buckets of
//! about `Plan::gradient_bucket_bytes` (DDP's bucket_cap_mb) over adjacent
//! slots, each bucket issued as soon as its last gradient is produced; so
//! they travel while the rest of the backward computes, and join at the
//! clipping or the optimizer that reads them.
//!
//! Invariants: between a collective and its join no step reads or writes
//! its source or destination (a step's footprint: its plan kernel's
//! operands, result, parts and scratch); every collective is joined before
//! the list ends; collectives keep their order (every rank issues the same
//! list, as NCCL requires).

use super::device::{CollectiveOp, CollectiveStep, DevPtr};
use super::lower::Step;
use crate::dist::Reduction;
use tessera_plan::scratch::scratch;
use tessera_plan::{Op, Plan, Source, GRADIENT_ALL_REDUCE_SCOPE};

/// A byte range [start, end) of device memory.
type Range = (u64, u64);

fn overlaps(a: Range, b: Range) -> bool {
    a.0 < b.1 && b.0 < a.1 && a.0 < a.1 && b.0 < b.1
}

/// The memory each plan kernel's steps may touch.
pub struct Footprints {
    per_kernel: Vec<Vec<Range>>,
}

impl Footprints {
    /// From the plan, the values' addresses and the workspace's.
    pub fn new(plan: &Plan, addr: &[Option<DevPtr>], workspace: DevPtr) -> Footprints {
        let range = |v: usize| -> Option<Range> {
            let value = &plan.values[v];
            addr[v].map(|p| (p.0, p.0 + value.numel() * value.dtype.size_bytes()))
        };
        let mut per_kernel: Vec<Vec<Range>> = plan
            .kernels
            .iter()
            .enumerate()
            .map(|(k, kernel)| {
                let mut r: Vec<Range> =
                    kernel.inputs.iter().chain([&kernel.output]).filter_map(|&v| range(v)).collect();
                let s = scratch(plan, k).total();
                if s > 0 {
                    r.push((workspace.0, workspace.0 + s));
                }
                r
            })
            .collect();
        for (v, value) in plan.values.iter().enumerate() {
            if let (Source::Part { kernel, .. }, Some(r)) = (&value.source, range(v)) {
                per_kernel[*kernel].push(r);
            }
        }
        Footprints { per_kernel }
    }

    fn touches(&self, step: &Step, r: Range) -> bool {
        self.per_kernel[step.kernel()].iter().any(|&f| overlaps(f, r))
    }
}

/// The bytes a collective reads and writes.
fn ranges(c: &CollectiveStep, world: u64) -> [Range; 2] {
    let size = c.elem.size();
    [(c.src.0, c.src.0 + c.count * size), (c.dst.0, c.dst.0 + c.dst_count(world as usize) * size)]
}

/// A gradient all-reduce the memory plan put in place.
fn in_place_gradient(plan: &Plan, kernel: usize, c: &CollectiveStep) -> bool {
    let k = &plan.kernels[kernel];
    k.scope == GRADIENT_ALL_REDUCE_SCOPE
        && matches!(k.op, Op::AllReduce { .. })
        && matches!(c.op, CollectiveOp::AllReduce(Reduction::Mean))
        && c.src == c.dst
}

/// `next` continues bucket `b` in memory: it starts where `b` ends, or
/// after the padding of an aligned slot (fewer than 256 bytes, whole
/// elements; the padding is averaged with the rest and never read).
fn adjacent(b: &CollectiveStep, next: &CollectiveStep) -> bool {
    let size = b.elem.size();
    let end = b.src.0 + b.count * size;
    next.elem == b.elem && next.src.0 >= end && next.src.0 - end < 256 && (next.src.0 - end).is_multiple_of(size)
}

/// The list with gradient all-reduces bucketed, every collective numbered
/// (its slot), and each joined before the first step that touches it.
pub fn schedule(steps: Vec<Step>, plan: &Plan, world: u64, fp: &Footprints) -> Vec<Step> {
    let cap = plan.gradient_bucket_bytes;
    let mut bucketed: Vec<Step> = Vec::with_capacity(steps.len());
    // The bucket being filled: the kernel of its last gradient, its range,
    // and where that gradient's all-reduce stood (the bucket goes there:
    // nothing between touches it).
    let mut bucket: Option<(usize, CollectiveStep, usize)> = None;
    let close = |bucketed: &mut Vec<Step>, b: Option<(usize, CollectiveStep, usize)>| {
        if let Some((kernel, step, at)) = b {
            bucketed.insert(at, Step::Collective { kernel, step, slot: 0 });
        }
    };
    for s in steps {
        if let Step::Collective { kernel, step, .. } = &s {
            if in_place_gradient(plan, *kernel, step) {
                if let Some((last, b, at)) = &mut bucket {
                    let size = b.elem.size();
                    let grown = step.src.0 + step.count * size - b.src.0;
                    if cap > 0 && adjacent(b, step) && grown <= cap {
                        b.count = grown / size;
                        (*last, *at) = (*kernel, bucketed.len());
                        continue;
                    }
                }
                close(&mut bucketed, bucket.take());
                bucket = Some((*kernel, *step, bucketed.len()));
                continue;
            }
        }
        if let Some((_, step, _)) = &bucket {
            if matches!(s, Step::Collective { .. }) || ranges(step, world).iter().any(|&r| fp.touches(&s, r)) {
                close(&mut bucketed, bucket.take());
            }
        }
        bucketed.push(s);
    }
    close(&mut bucketed, bucket.take());
    // Slots and joins.
    let mut out = Vec::with_capacity(bucketed.len());
    let mut pending: Vec<(usize, usize, [Range; 2])> = Vec::new();
    let mut slots = 0;
    for s in bucketed {
        let mut i = 0;
        while i < pending.len() {
            let (kernel, slot, r) = pending[i];
            if r.iter().any(|&r| fp.touches(&s, r)) {
                out.push(Step::WaitCollective { kernel, slot });
                pending.remove(i);
            } else {
                i += 1;
            }
        }
        match s {
            Step::Collective { kernel, step, .. } => {
                pending.push((kernel, slots, ranges(&step, world)));
                out.push(Step::Collective { kernel, step, slot: slots });
                slots += 1;
            }
            other => out.push(other),
        }
    }
    for (kernel, slot, _) in pending {
        out.push(Step::WaitCollective { kernel, slot });
    }
    out
}
