//! The graph: a petgraph `StableGraph` whose nodes are ops (each producing one
//! value) and whose edges carry operands (producer -> consumer, with the
//! operand position). Node indices stay valid when passes remove nodes.

use super::infer::infer;
use super::op::Op;
use super::types::{DType, Init, Shape, TensorType};
use super::IrError;
use petgraph::stable_graph::{NodeIndex, StableGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use serde::{Deserialize, Serialize};

/// A value is the output of the node that produces it.
pub type ValueId = NodeIndex<u32>;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub ty: TensorType,
    /// Module path the op was created in, e.g. `trunk.blocks.3.attn` (for
    /// reading the IR and for per-module counts).
    pub scope: String,
}

/// An edge: the producer's value used as operand `index` of the consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operand {
    pub index: u32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Graph {
    pub(crate) g: StableGraph<Node, Operand, petgraph::Directed, u32>,
    /// Named graph outputs, in declaration order.
    pub(crate) outputs: Vec<(String, ValueId)>,
    /// New values of buffers after a step (queue updates), by buffer name.
    pub(crate) state_updates: Vec<(String, ValueId)>,
    /// Parameters and buffers by name, so that `state` (called once per
    /// declared parameter) is O(1) and compiling is linear in the model's
    /// size. Built on first use; `push` and `remove_node` keep it, and
    /// `node_mut` (which may rename) drops it to be built again.
    #[serde(skip)]
    states: std::sync::OnceLock<std::collections::HashMap<String, ValueId>>,
}

fn state_name(op: &Op) -> Option<&str> {
    match op {
        Op::Param { name, .. } | Op::Buffer { name, .. } => Some(name),
        _ => None,
    }
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, op: Op, ty: TensorType, scope: &str) -> ValueId {
        let name = state_name(&op).map(str::to_string);
        let v = self.g.add_node(Node { op, ty, scope: scope.to_string() });
        if let (Some(name), Some(index)) = (name, self.states.get_mut()) {
            // The first node of a name is the one `state` finds.
            let first = index.entry(name).or_insert(v);
            if v < *first {
                *first = v;
            }
        }
        v
    }

    fn state_index(&self) -> &std::collections::HashMap<String, ValueId> {
        self.states.get_or_init(|| {
            let mut index = std::collections::HashMap::new();
            for v in self.g.node_indices() {
                if let Some(name) = state_name(&self.g[v].op) {
                    index.entry(name.to_string()).or_insert(v);
                }
            }
            index
        })
    }

    /// A graph input. Inputs are unique by name.
    pub fn add_input(&mut self, name: &str, shape: Shape, dtype: DType) -> Result<ValueId, IrError> {
        if self.find_leaf(|op| matches!(op, Op::Input { name: n } if n == name)).is_some() {
            return Err(IrError::Duplicate { what: "input", name: name.to_string() });
        }
        Ok(self.push(Op::Input { name: name.to_string() }, TensorType::new(shape, dtype), ""))
    }

    /// A parameter by its state-dict name. Declaring the same name again with
    /// the same type returns the existing value (weight sharing, e.g. a trunk
    /// run once per crop resolution); a different type is an error.
    pub fn add_param(
        &mut self,
        name: &str,
        ty: TensorType,
        init: Init,
        trainable: bool,
        scope: &str,
    ) -> Result<ValueId, IrError> {
        self.add_state(Op::Param { name: name.to_string(), init, trainable }, name, ty, scope)
    }

    /// A non-trainable buffer by its state-dict name (same sharing rule as params).
    pub fn add_buffer(&mut self, name: &str, ty: TensorType, init: Init, scope: &str) -> Result<ValueId, IrError> {
        self.add_state(Op::Buffer { name: name.to_string(), init }, name, ty, scope)
    }

    fn add_state(&mut self, op: Op, name: &str, ty: TensorType, scope: &str) -> Result<ValueId, IrError> {
        if let Some(v) = self.state(name) {
            let node = &self.g[v];
            if node.ty != ty || std::mem::discriminant(&node.op) != std::mem::discriminant(&op) {
                return Err(IrError::Duplicate { what: "parameter or buffer", name: name.to_string() });
            }
            return Ok(v);
        }
        Ok(self.push(op, ty, scope))
    }

    /// A constant tensor.
    pub fn add_fill(&mut self, value: f64, ty: TensorType, scope: &str) -> ValueId {
        self.push(Op::Fill { value }, ty, scope)
    }

    /// Adds a non-leaf op after checking its operands with the op's shape rule.
    pub fn add_op(&mut self, op: Op, operands: &[ValueId], scope: &str) -> Result<ValueId, IrError> {
        if op.is_leaf() {
            return Err(IrError::Invalid(format!("{} is a leaf; use its own constructor", op.name())));
        }
        for &v in operands {
            if !self.g.contains_node(v) {
                return Err(IrError::Invalid(format!("operand {} does not exist", v.index())));
            }
        }
        let tys: Vec<&TensorType> = operands.iter().map(|&v| &self.g[v].ty).collect();
        let ty =
            infer(&op, &tys).map_err(|message| IrError::Shape { op: op.name(), scope: scope.to_string(), message })?;
        let id = self.push(op, ty, scope);
        for (i, &v) in operands.iter().enumerate() {
            self.g.add_edge(v, id, Operand { index: i as u32 });
        }
        Ok(id)
    }

    pub fn set_output(&mut self, name: &str, v: ValueId) {
        self.outputs.push((name.to_string(), v));
    }

    pub fn add_state_update(&mut self, buffer: &str, v: ValueId) {
        self.state_updates.push((buffer.to_string(), v));
    }

    /// The value `buffer` (a parameter or buffer) takes after the step, if
    /// the graph updates it.
    pub fn state_update(&self, buffer: &str) -> Option<ValueId> {
        self.state_updates.iter().rev().find(|(n, _)| n == buffer).map(|(_, v)| *v)
    }

    /// Sets the value `buffer` takes after the step, replacing an earlier one.
    pub fn set_state_update(&mut self, buffer: &str, v: ValueId) {
        self.state_updates.retain(|(n, _)| n != buffer);
        self.state_updates.push((buffer.to_string(), v));
    }

    pub fn node(&self, v: ValueId) -> &Node {
        &self.g[v]
    }

    pub fn node_mut(&mut self, v: ValueId) -> &mut Node {
        self.states = std::sync::OnceLock::new();
        &mut self.g[v]
    }

    pub fn ty(&self, v: ValueId) -> &TensorType {
        &self.g[v].ty
    }

    /// Operands of `v` in operand order.
    pub fn operands(&self, v: ValueId) -> Vec<ValueId> {
        let mut edges: Vec<(u32, ValueId)> =
            self.g.edges_directed(v, Direction::Incoming).map(|e| (e.weight().index, e.source())).collect();
        edges.sort_by_key(|&(i, _)| i);
        edges.into_iter().map(|(_, s)| s).collect()
    }

    /// Nodes that use `v`, in node order, without duplicates.
    pub fn users(&self, v: ValueId) -> Vec<ValueId> {
        let mut u: Vec<ValueId> = self.g.neighbors_directed(v, Direction::Outgoing).collect();
        u.sort();
        u.dedup();
        u
    }

    pub fn outputs(&self) -> &[(String, ValueId)] {
        &self.outputs
    }

    pub fn state_updates(&self) -> &[(String, ValueId)] {
        &self.state_updates
    }

    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    /// All node ids in creation order (which is a topological order for graphs
    /// built through `add_op`).
    pub fn node_ids(&self) -> Vec<ValueId> {
        self.g.node_indices().collect()
    }

    /// The parameter or buffer with this state-dict name.
    pub fn state(&self, name: &str) -> Option<ValueId> {
        self.state_index().get(name).copied()
    }

    /// Parameters in creation order, as (id, name, trainable).
    pub fn params(&self) -> Vec<(ValueId, &str, bool)> {
        self.g
            .node_indices()
            .filter_map(|v| match &self.g[v].op {
                Op::Param { name, trainable, .. } => Some((v, name.as_str(), *trainable)),
                _ => None,
            })
            .collect()
    }

    /// Buffers in creation order, as (id, name).
    pub fn buffers(&self) -> Vec<(ValueId, &str)> {
        self.g
            .node_indices()
            .filter_map(|v| match &self.g[v].op {
                Op::Buffer { name, .. } => Some((v, name.as_str())),
                _ => None,
            })
            .collect()
    }

    /// Graph inputs in creation order, as (id, name).
    pub fn inputs(&self) -> Vec<(ValueId, &str)> {
        self.g
            .node_indices()
            .filter_map(|v| match &self.g[v].op {
                Op::Input { name } => Some((v, name.as_str())),
                _ => None,
            })
            .collect()
    }

    fn find_leaf(&self, pred: impl Fn(&Op) -> bool) -> Option<ValueId> {
        self.g.node_indices().find(|&v| pred(&self.g[v].op))
    }

    /// A copy of `node` (from another graph) reading `operands` of this one:
    /// leaves keep their op and type; other ops are checked by their shape
    /// rule again, which must give the same type (for passes that rebuild).
    pub fn add_node_like(&mut self, node: &Node, operands: &[ValueId]) -> Result<ValueId, IrError> {
        if node.op.is_leaf() {
            return Ok(self.push(node.op.clone(), node.ty.clone(), &node.scope));
        }
        let v = self.add_op(node.op.clone(), operands, &node.scope)?;
        if self.g[v].ty != node.ty {
            return Err(IrError::Invalid(format!(
                "{} in `{}` was {} but its operands now give {}",
                node.op.name(),
                node.scope,
                node.ty,
                self.g[v].ty
            )));
        }
        Ok(v)
    }

    /// A topological order: creation order when it is one (it reads like the
    /// source: forward, backward, update), else petgraph's.
    pub fn topo_order(&self) -> Result<Vec<ValueId>, IrError> {
        let order = self.node_ids();
        let mut seen = std::collections::HashSet::with_capacity(order.len());
        let creation_ok = order.iter().all(|&v| {
            let ok = self.g.neighbors_directed(v, Direction::Incoming).all(|o| seen.contains(&o));
            seen.insert(v);
            ok
        });
        if creation_ok {
            return Ok(order);
        }
        petgraph::algo::toposort(&self.g, None)
            .map_err(|c| IrError::Invalid(format!("the graph has a cycle through node {}", c.node_id().index())))
    }

    /// Removes a node and its edges (for passes).
    pub fn remove_node(&mut self, v: ValueId) -> Option<Node> {
        let node = self.g.remove_node(v)?;
        if let Some(name) = state_name(&node.op) {
            if self.states.get().is_some_and(|index| index.get(name) == Some(&v)) {
                // Another node of the same name (if any) becomes the one found.
                self.states = std::sync::OnceLock::new();
            }
        }
        Some(node)
    }

    /// Read access to the underlying petgraph (for passes and analyses).
    pub fn petgraph(&self) -> &StableGraph<Node, Operand, petgraph::Directed, u32> {
        &self.g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty(n: u64) -> TensorType {
        TensorType::f32(Shape::consts(&[n]))
    }

    /// `state` answers from the name index (one lookup per declared
    /// parameter keeps compiling linear in the model's size); the index
    /// follows additions, removals, edits and copies of the graph.
    #[test]
    fn the_state_index_follows_every_change() {
        let mut g = Graph::new();
        let n = 5000;
        let ids: Vec<ValueId> =
            (0..n).map(|i| g.add_param(&format!("p{i}"), ty(1), Init::Zeros, true, "").unwrap()).collect();
        let b = g.add_buffer("buf", ty(2), Init::Zeros, "").unwrap();
        for (i, &v) in ids.iter().enumerate() {
            assert_eq!(g.state(&format!("p{i}")), Some(v));
        }
        // Declaring a name again returns its value; another type is an error.
        assert_eq!(g.add_param("p7", ty(1), Init::Zeros, true, "").unwrap(), ids[7]);
        assert!(g.add_param("p7", ty(3), Init::Zeros, true, "").is_err());
        assert_eq!(g.state("buf"), Some(b));
        assert_eq!(g.state("nothing"), None);
        g.remove_node(ids[3]);
        assert_eq!(g.state("p3"), None);
        // A rename through node_mut is seen.
        if let Op::Param { name, .. } = &mut g.node_mut(ids[4]).op {
            *name = "renamed".into();
        }
        assert_eq!(g.state("p4"), None);
        assert_eq!(g.state("renamed"), Some(ids[4]));
        // Copies and deserialized graphs answer the same.
        let c = g.clone();
        assert_eq!(c.state("p9"), Some(ids[9]));
        let d: Graph = serde_json::from_str(&serde_json::to_string(&g).unwrap()).unwrap();
        assert_eq!(d.state("p9"), Some(ids[9]));
        assert_eq!(d.state("renamed"), Some(ids[4]));
        // A removed name declared again is found at its new node.
        let again = g.add_param("p3", ty(1), Init::Zeros, true, "").unwrap();
        assert_eq!(g.state("p3"), Some(again));
    }
}
