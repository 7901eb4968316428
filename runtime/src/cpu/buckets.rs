//! The gradient all-reduce of a data-parallel step, overlapped with the
//! backward (DDP's buckets): the executor hands each gradient to a
//! communication thread as the backward produces it; a bucket (about
//! `Plan::gradient_bucket_bytes` of consecutive gradients, the same on
//! every rank since it follows from the plan alone) goes out as one
//! all-reduce once its last gradient is in, while the backward goes on; the
//! averaged gradients come back when a later kernel (clipping, the
//! optimizer) first reads one of them.

use crate::dist::{Collective, Reduction};
use crate::tensor::{Data, Tensor};
use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use tessera_plan::{Op, Plan, GRADIENT_ALL_REDUCE_SCOPE};

/// Which kernels are gradient all-reduces, and their buckets.
#[derive(Debug, Default)]
pub struct Buckets {
    /// Kernel index -> bucket.
    pub of: HashMap<usize, usize>,
    /// Per bucket, its last kernel (the bucket goes out after it).
    pub last: Vec<usize>,
}

impl Buckets {
    /// The plan's gradient all-reduces (world > 1) in kernel order, cut
    /// into buckets of at least `gradient_bucket_bytes` (the last smaller).
    pub fn of_plan(plan: &Plan) -> Buckets {
        let mut b = Buckets::default();
        let mut bytes = 0u64;
        let mut open = false;
        for (k, kernel) in plan.kernels.iter().enumerate() {
            let Op::AllReduce { op: tessera_plan::ReduceOp::Mean, world } = kernel.op else { continue };
            if world < 2 || kernel.scope != GRADIENT_ALL_REDUCE_SCOPE {
                continue;
            }
            if !open {
                b.last.push(k);
                open = true;
            }
            let bucket = b.last.len() - 1;
            b.of.insert(k, bucket);
            b.last[bucket] = k;
            let v = &plan.values[kernel.output];
            bytes += v.shape.iter().product::<u64>() * 4;
            if bytes >= plan.gradient_bucket_bytes {
                open = false;
                bytes = 0;
            }
        }
        b
    }
}

/// A bucket's gradients, averaged across the ranks, or the failure.
pub type Done = Result<Vec<Tensor>, String>;

/// The communication thread: all-reduces buckets in the order given.
pub struct Worker {
    jobs: Option<Sender<Vec<Tensor>>>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    /// Buckets sent and not yet received.
    outstanding: std::cell::Cell<usize>,
}

impl Worker {
    pub fn start(comm: Arc<dyn Collective>) -> Worker {
        let (jobs, todo) = channel::<Vec<Tensor>>();
        let (finished, done) = channel::<Done>();
        let thread = std::thread::Builder::new()
            .name("tessera-allreduce".into())
            .spawn(move || {
                for mut grads in todo {
                    let result = average(comm.as_ref(), &mut grads).map(|()| grads);
                    if finished.send(result).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn the all-reduce thread");
        Worker { jobs: Some(jobs), done, thread: Some(thread), outstanding: std::cell::Cell::new(0) }
    }

    /// Sends a bucket out.
    pub fn send(&self, grads: Vec<Tensor>) -> Result<(), String> {
        self.jobs
            .as_ref()
            .expect("open until dropped")
            .send(grads)
            .map_err(|_| "the all-reduce thread has stopped".to_string())?;
        self.outstanding.set(self.outstanding.get() + 1);
        Ok(())
    }

    /// The next bucket sent, averaged (buckets come back in order).
    pub fn receive(&self) -> Done {
        let got = self.done.recv().map_err(|_| "the all-reduce thread has stopped".to_string())?;
        self.outstanding.set(self.outstanding.get() - 1);
        got
    }

    /// Waits for and drops what a failed step left on its way, so the next
    /// step's buckets come back as its own.
    pub fn drain(&self) {
        while self.outstanding.get() > 0 {
            if self.receive().is_err()
                && self.outstanding.get() > 0
                && self.thread.as_ref().is_none_or(|t| t.is_finished())
            {
                self.outstanding.set(0);
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The mean over the ranks of every tensor of `grads`, as one message.
fn average(comm: &dyn Collective, grads: &mut [Tensor]) -> Result<(), String> {
    if let [one] = grads {
        let Data::F32(v) = &mut one.data else { return Err("a gradient is not f32".into()) };
        return comm.all_reduce_f32(v, Reduction::Mean).map_err(|e| e.to_string());
    }
    let total: usize = grads.iter().map(Tensor::numel).sum();
    let mut flat = super::pool::buffer(total);
    let mut at = 0;
    for g in grads.iter() {
        let Some(v) = g.as_f32() else { return Err("a gradient is not f32".into()) };
        flat[at..at + v.len()].copy_from_slice(v);
        at += v.len();
    }
    comm.all_reduce_f32(&mut flat, Reduction::Mean).map_err(|e| e.to_string())?;
    let mut at = 0;
    for g in grads.iter_mut() {
        let Data::F32(v) = &mut g.data else { unreachable!("checked above") };
        let n = v.len();
        v.copy_from_slice(&flat[at..at + n]);
        at += n;
    }
    super::pool::recycle(Tensor::f32(vec![total], flat));
    Ok(())
}
