//! The stable text form of the IR: one line per node, what insta snapshots and
//! what people read in reviews.
//!
//! ```text
//! input %0 "data" : [B,3,32,32] f32
//! param @trunk.patch_embed.proj.weight : [64,3,8,8] f32 = kaiming_uniform(a=2.2361)
//! %1 = conv2d(%0, @trunk.patch_embed.proj.weight) {stride=[8,8], padding=[0,0]} : [B,64,4,4] f32  # trunk.patch_embed
//! output "logits" = %1
//! state @loss.queue <- %75
//! ```
//!
//! Inputs and op results are numbered densely from `%0` in print order;
//! parameters and buffers are declared by name and referenced as `@name`.

use super::graph::{Graph, ValueId};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt::Write;
use tessera_plan::op::attributes;
use tessera_plan::Op;

/// Nodes in print order: creation (index) order, except that a node never
/// comes before its operands. The two differ only after a pass removed nodes
/// and petgraph reused their indices. Nodes on a cycle come last, by index.
pub(crate) fn print_order(g: &Graph) -> Vec<ValueId> {
    let pg = g.petgraph();
    let mut pending: HashMap<ValueId, usize> =
        pg.node_indices().map(|v| (v, pg.neighbors_directed(v, petgraph::Direction::Incoming).count())).collect();
    let mut ready: BinaryHeap<Reverse<ValueId>> =
        pending.iter().filter(|&(_, &n)| n == 0).map(|(&v, _)| Reverse(v)).collect();
    let mut order = Vec::with_capacity(pending.len());
    while let Some(Reverse(v)) = ready.pop() {
        order.push(v);
        pending.remove(&v);
        // One decrement per edge: a node may use the same value twice.
        for user in pg.neighbors_directed(v, petgraph::Direction::Outgoing) {
            let n = pending.get_mut(&user).expect("user not yet printed");
            *n -= 1;
            if *n == 0 {
                ready.push(Reverse(user));
            }
        }
    }
    let mut cyclic: Vec<ValueId> = pending.into_keys().collect();
    cyclic.sort();
    order.extend(cyclic);
    order
}

/// `%N` numbers of inputs, fills and op results, in print order.
fn numbering(g: &Graph, order: &[ValueId]) -> HashMap<ValueId, usize> {
    order.iter().filter(|&&v| !is_state(&g.node(v).op)).enumerate().map(|(i, &v)| (v, i)).collect()
}

fn is_state(op: &Op) -> bool {
    matches!(op, Op::Param { .. } | Op::Buffer { .. })
}

fn name_in(g: &Graph, numbers: &HashMap<ValueId, usize>, v: ValueId) -> String {
    if !g.petgraph().contains_node(v) {
        return format!("<removed node {}>", v.index());
    }
    match &g.node(v).op {
        Op::Param { name, .. } | Op::Buffer { name, .. } => format!("@{name}"),
        _ => format!("%{}", numbers[&v]),
    }
}

impl Graph {
    /// The stable text form; see the module docs.
    pub fn to_text(&self) -> String {
        let order = print_order(self);
        let numbers = numbering(self, &order);
        let mut out = String::new();
        for &v in &order {
            let node = self.node(v);
            let ty = &node.ty;
            // Writing to a String cannot fail.
            let _ = match &node.op {
                Op::Input { name } => write!(out, "input %{} {name:?} : {ty}", numbers[&v]),
                Op::Param { name, init, trainable } => {
                    let frozen = if *trainable { "" } else { " frozen" };
                    write!(out, "param @{name} : {ty} = {init}{frozen}")
                }
                Op::Buffer { name, init } => write!(out, "buffer @{name} : {ty} = {init}"),
                Op::Fill { value } => write!(out, "%{} = fill {value} : {ty}", numbers[&v]),
                op => {
                    let args: Vec<String> = self.operands(v).into_iter().map(|a| name_in(self, &numbers, a)).collect();
                    let _ = write!(out, "%{} = {}({})", numbers[&v], op.name(), args.join(", "));
                    let attrs: Vec<String> = attributes(op).into_iter().map(|(k, v)| format!("{k}={v}")).collect();
                    if !attrs.is_empty() {
                        let _ = write!(out, " {{{}}}", attrs.join(", "));
                    }
                    write!(out, " : {ty}")
                }
            };
            if !node.scope.is_empty() && !is_state(&node.op) {
                let _ = write!(out, "  # {}", node.scope);
            }
            out.push('\n');
        }
        for (name, v) in self.outputs() {
            let _ = writeln!(out, "output {name:?} = {}", name_in(self, &numbers, *v));
        }
        for (buffer, v) in self.state_updates() {
            let _ = writeln!(out, "state @{buffer} <- {}", name_in(self, &numbers, *v));
        }
        out
    }

    /// How `v` is written in `to_text`: `%N`, or `@name` for parameters and buffers.
    pub fn value_name(&self, v: ValueId) -> String {
        let order = print_order(self);
        name_in(self, &numbering(self, &order), v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{BinaryOp, DType, Dim, Init, Shape, TensorType, UnaryOp};

    /// A patch embedding, a frozen position embedding, a MoCo-style queue.
    fn small() -> (Graph, Vec<ValueId>) {
        let mut g = Graph::new();
        let x = g
            .add_input("data", Shape(vec![Dim::B, Dim::Const(3), Dim::Const(32), Dim::Const(32)]), DType::F32)
            .unwrap();
        let ty = |d: &[u64]| TensorType::f32(Shape::consts(d));
        let kaiming = Init::KaimingUniform { a: 5f64.sqrt(), fan_in: None };
        let w = g
            .add_param("trunk.patch_embed.proj.weight", ty(&[64, 3, 8, 8]), kaiming, true, "trunk.patch_embed")
            .unwrap();
        let b = g.add_param("trunk.patch_embed.proj.bias", ty(&[64]), Init::Zeros, true, "trunk.patch_embed").unwrap();
        let conv = Op::Conv2d { stride: [8, 8], padding: [0, 0] };
        let p = g.add_op(conv, &[x, w, b], "trunk.patch_embed").unwrap();
        let flat = Shape(vec![Dim::B, Dim::Const(64), Dim::Const(16)]);
        let r = g.add_op(Op::Reshape { shape: flat }, &[p], "trunk.patch_embed").unwrap();
        let t = g.add_op(Op::Permute { perm: vec![0, 2, 1] }, &[r], "trunk.patch_embed").unwrap();
        let pos_init = Init::TruncNormal { std: 0.02, a: -2.0, b: 2.0 };
        let pos = g.add_param("trunk.pos_embed", ty(&[1, 16, 64]), pos_init, false, "trunk").unwrap();
        let sum = g.add_op(Op::Binary(BinaryOp::Add), &[t, pos], "trunk").unwrap();
        let act = g.add_op(Op::Unary(UnaryOp::Gelu), &[sum], "").unwrap();
        let scaled = g.add_op(Op::Scale { factor: 0.1 }, &[act], "").unwrap();
        let queue = g.add_buffer("loss.queue", ty(&[64, 16]), Init::NormalColumnsNormalized, "loss").unwrap();
        let ptr = g.add_fill(0.0, TensorType::new(Shape::scalar(), DType::I64), "loss");
        let keys = g
            .add_op(Op::Reduce { op: crate::ir::ReduceOp::Mean, axes: vec![1], keepdim: false }, &[scaled], "loss")
            .unwrap();
        let pushed = g.add_op(Op::QueuePush { world: 1 }, &[queue, ptr, keys], "loss").unwrap();
        g.set_output("tokens", scaled);
        g.add_state_update("loss.queue", pushed);
        (g, vec![x, w, p, pos, sum, queue, pushed])
    }

    #[test]
    fn small_graph_text() {
        let (g, _) = small();
        let expected = r#"input %0 "data" : [B,3,32,32] f32
param @trunk.patch_embed.proj.weight : [64,3,8,8] f32 = kaiming_uniform(a=2.2361)
param @trunk.patch_embed.proj.bias : [64] f32 = zeros
%1 = conv2d(%0, @trunk.patch_embed.proj.weight, @trunk.patch_embed.proj.bias) {stride=[8,8], padding=[0,0]} : [B,64,4,4] f32  # trunk.patch_embed
%2 = reshape(%1) {shape=[B,64,16]} : [B,64,16] f32  # trunk.patch_embed
%3 = permute(%2) {perm=[0,2,1]} : [B,16,64] f32  # trunk.patch_embed
param @trunk.pos_embed : [1,16,64] f32 = trunc_normal(std=0.02, a=-2, b=2) frozen
%4 = add(%3, @trunk.pos_embed) : [B,16,64] f32  # trunk
%5 = gelu(%4) : [B,16,64] f32
%6 = scale(%5) {factor=0.1} : [B,16,64] f32
buffer @loss.queue : [64,16] f32 = normal_columns_normalized
%7 = fill 0 : [] i64  # loss
%8 = mean(%6) {axes=[1], keepdim=false} : [B,64] f32  # loss
%9 = queue_push(@loss.queue, %7, %8) {world=1} : [64,16] f32  # loss
output "tokens" = %6
state @loss.queue <- %9
"#;
        assert_eq!(g.to_text(), expected);
    }

    #[test]
    fn value_names_match_text() {
        let (g, ids) = small();
        let names: Vec<String> = ids.iter().map(|&v| g.value_name(v)).collect();
        assert_eq!(
            names,
            ["%0", "@trunk.patch_embed.proj.weight", "%1", "@trunk.pos_embed", "%4", "@loss.queue", "%9"]
        );
    }

    #[test]
    fn reused_indices_still_print_operands_first() {
        let mut g = Graph::new();
        let x = g.add_input("x", Shape(vec![Dim::B]), DType::F32).unwrap();
        let a = g.add_op(Op::Unary(UnaryOp::Relu), &[x], "").unwrap();
        let b = g.add_op(Op::Unary(UnaryOp::Exp), &[a], "").unwrap();
        g.remove_node(a);
        // petgraph hands the freed index of `a` to the new node.
        let c = g.add_op(Op::Unary(UnaryOp::Tanh), &[b], "").unwrap();
        assert_eq!(c, a);
        assert_eq!(g.to_text(), "input %0 \"x\" : [B] f32\n%1 = exp() : [B] f32\n%2 = tanh(%1) : [B] f32\n");
        assert_eq!(g.value_name(c), "%2");
        g.set_output("gone", a);
        g.remove_node(c);
        assert!(g.to_text().ends_with("output \"gone\" = <removed node 1>\n"));
    }

    #[test]
    fn every_attribute_op_prints_its_attributes() {
        let x = || TensorType::f32(Shape(vec![Dim::B, Dim::Const(4)]));
        let mut g = Graph::new();
        let v = g.add_input("x", x().shape, DType::F32).unwrap();
        let ops = [
            Op::Softmax { axis: 1 },
            Op::L2Normalize { axis: 1, eps: 1e-12 },
            Op::Dropout { p: 0.25, key: 0 },
            Op::Cast { dtype: DType::BF16 },
            Op::Slice { axis: 0, start: Dim::Const(0), end: Dim::B },
            Op::AllReduce { op: crate::ir::ReduceOp::Sum, world: 2 },
            Op::Expand { shape: Shape(vec![Dim::Const(2), Dim::B, Dim::Const(4)]) },
        ];
        for op in ops {
            g.add_op(op, &[v], "").unwrap();
        }
        let text = g.to_text();
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(
            lines,
            [
                "%1 = softmax(%0) {axis=1} : [B,4] f32",
                "%2 = l2_normalize(%0) {axis=1, eps=0.000000000001} : [B,4] f32",
                "%3 = dropout(%0) {p=0.25, key=0} : [B,4] f32",
                "%4 = cast(%0) {dtype=bf16} : [B,4] bf16",
                "%5 = slice(%0) {axis=0, start=0, end=B} : [B,4] f32",
                "%6 = all_reduce(%0) {op=sum, world=2} : [B,4] f32",
                "%7 = expand(%0) {shape=[2,B,4]} : [2,B,4] f32",
            ]
        );
    }
}
