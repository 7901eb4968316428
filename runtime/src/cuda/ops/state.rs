//! Ops that compute new state: MoCo's queue (`kernels/queue.cu`).
//! queue_push copies the old queue into its result (unless the memory plan
//! placed the result over it) and writes the keys into the N columns from
//! the pointer on; queue_advance moves the pointer. The pointer stays on the
//! device: both kernels read it there, so a step never waits for it.
//! Batch norm's running statistics (running_stat) are in `norm`.
//!
//! With several ranks queue_push first gathers every rank's keys (one
//! collective into its scratch piece `gathered`) and writes them in the
//! global batch's sample order, as the CPU does; queue_advance moves the
//! pointer by N * world.

use super::super::device::{Arg, Launch};
use super::super::device::{CollectiveOp, CollectiveStep, Elem};
use super::super::lower::{c_type, Lowering, Step, Val};
use super::super::source::{param, KernelSource};
use super::elementwise::grid_for;
use tessera_plan::{DType, Op};

const TEMPLATE: &str = include_str!("../kernels/queue.cu");

pub fn lower(l: &mut Lowering, k: usize, op: &Op) -> Result<(), String> {
    match *op {
        Op::QueuePush { world } => push(l, k, world),
        Op::QueueAdvance { world } => advance(l, k, world),
        ref other => Err(format!("{} is not a queue op", other.name())),
    }
}

/// `queue_push (queue [E, K], ptr [] i64, keys [N, E]) -> [E, K]`.
fn push(l: &mut Lowering, k: usize, world: u64) -> Result<(), String> {
    if world == 0 {
        return Err("world size must be at least 1".into());
    }
    let x = l.inputs(k)?;
    let out = l.output(k)?;
    let [queue, ptr, keys] = &x[..] else { return Err("queue_push takes (queue, ptr, keys)".into()) };
    let (e, len, n) = queue_shapes(queue, ptr, keys)?;
    if out.shape != queue.shape || out.dtype != queue.dtype {
        return Err(format!("the result {:?} {} is not the queue's type", out.shape, out.dtype));
    }
    if n * world > len {
        return Err(format!("{n} keys x {world} ranks do not fit in a queue of length {len}"));
    }
    l.copy(k, out.ptr, queue.ptr, queue.bytes());
    if n * e == 0 {
        return Ok(());
    }
    // Every rank's keys, rank-major, in the scratch piece.
    let keys_at = if world > 1 {
        if keys.dtype != DType::F32 {
            return Err(format!("the keys of a queue over {world} ranks must be f32, got {}", keys.dtype));
        }
        let (at, bytes) = l.scratch(k, "gathered")?;
        if bytes < n * world * e * 4 {
            return Err(format!(
                "the scratch piece `gathered` has {bytes} bytes, the keys of {world} ranks need {}",
                n * world * e * 4
            ));
        }
        let step =
            CollectiveStep { op: CollectiveOp::AllGather, elem: Elem::F32, src: keys.ptr, dst: at, count: n * e };
        l.steps.push(Step::Collective { kernel: k, step, slot: 0 });
        at
    } else {
        keys.ptr
    };
    let params = vec![
        param(&format!("{}*", c_type(out.dtype)?), "out"),
        param("const i64*", "ptr"),
        param(&format!("const {}*", c_type(keys.dtype)?), "keys"),
        param("i64", "E"),
        param("i64", "K"),
        param("i64", "N"),
        param("i64", "W"),
    ];
    let args = vec![
        Arg::Ptr(out.ptr),
        Arg::Ptr(ptr.ptr),
        Arg::Ptr(keys_at),
        Arg::I64(e as i64),
        Arg::I64(len as i64),
        Arg::I64(n as i64),
        Arg::I64(world as i64),
    ];
    let mut c = tera::Context::new();
    c.insert("advance", &false);
    let src = KernelSource::render("queue_push", TEMPLATE, c, params)?;
    l.launch(k, src, grid_for(n * world * e), args);
    Ok(())
}

/// `queue_advance (ptr [] i64, keys [N, E], queue [E, K]) -> [] i64`.
fn advance(l: &mut Lowering, k: usize, world: u64) -> Result<(), String> {
    let x = l.inputs(k)?;
    let out = l.output(k)?;
    let [ptr, keys, queue] = &x[..] else { return Err("queue_advance takes (ptr, keys, queue)".into()) };
    let (_, len, n) = queue_shapes(queue, ptr, keys)?;
    if !out.shape.is_empty() || out.dtype != DType::I64 {
        return Err(format!("the result must be an i64 scalar [], got {:?} {}", out.shape, out.dtype));
    }
    if len == 0 {
        return Err("the queue has length 0".into());
    }
    let params = vec![param("i64*", "out"), param("const i64*", "ptr"), param("i64", "n"), param("i64", "K")];
    let args = vec![Arg::Ptr(out.ptr), Arg::Ptr(ptr.ptr), Arg::I64((n * world) as i64), Arg::I64(len as i64)];
    let mut c = tera::Context::new();
    c.insert("advance", &true);
    let src = KernelSource::render("queue_advance", TEMPLATE, c, params)?;
    l.launch(k, src, Launch::linear(1, 1), args);
    Ok(())
}

/// Checks queue [E, K], ptr [] i64 and keys [N, E]; returns (E, K, N).
fn queue_shapes(queue: &Val, ptr: &Val, keys: &Val) -> Result<(u64, u64, u64), String> {
    if !ptr.shape.is_empty() || ptr.dtype != DType::I64 {
        return Err(format!("ptr must be an i64 scalar [], got {:?} {}", ptr.shape, ptr.dtype));
    }
    let ([e, len], [n, ke]) = (&queue.shape[..], &keys.shape[..]) else {
        let (q, k) = (&queue.shape, &keys.shape);
        return Err(format!("queue must be [dim, length] and keys [N, dim], got {q:?} and {k:?}"));
    };
    if ke != e {
        return Err(format!("keys dim {ke} does not match queue dim {e}"));
    }
    if queue.dtype != keys.dtype {
        return Err(format!("queue {} and keys {} differ in dtype", queue.dtype, keys.dtype));
    }
    Ok((*e, *len, *n))
}
