//! Dead-code elimination: keep only what the chosen outputs (and, if asked,
//! the state updates) need. Inference plans are the training graph pruned to
//! the model outputs.

use super::graph::Graph;
use super::{Op, ValueId};
use std::collections::HashSet;

impl Graph {
    /// Keeps the outputs whose name satisfies `keep` (and, when `keep_state`,
    /// every state update, parameter, buffer and input: a training step's
    /// interface and state dict stay whole, e.g. BatchNorm's
    /// `num_batches_tracked`, which nothing reads), and removes every node
    /// that none of them needs. Without `keep_state`, parameters that nothing
    /// reads any more are removed too.
    pub fn prune(&mut self, keep: impl Fn(&str) -> bool, keep_state: bool) {
        self.outputs.retain(|(n, _)| keep(n));
        if !keep_state {
            self.state_updates.clear();
        }
        let mut live: HashSet<ValueId> = HashSet::new();
        let mut stack: Vec<ValueId> =
            self.outputs.iter().map(|(_, v)| *v).chain(self.state_updates.iter().map(|(_, v)| *v)).collect();
        if keep_state {
            // A state update keeps its target alive even if nothing else reads it.
            for (name, _) in &self.state_updates {
                if let Some(v) = self.state(name) {
                    stack.push(v);
                }
            }
            stack.extend(
                self.node_ids()
                    .into_iter()
                    .filter(|&v| matches!(self.node(v).op, Op::Input { .. } | Op::Param { .. } | Op::Buffer { .. })),
            );
        }
        while let Some(v) = stack.pop() {
            if live.insert(v) {
                stack.extend(self.operands(v));
            }
        }
        for v in self.node_ids() {
            if !live.contains(&v) {
                self.remove_node(v);
            }
        }
    }
}
