//! Graphviz form of the IR, for people. Nodes are grouped into one cluster
//! per top-level module (`trunk`, `heads.N`, `loss`) so a multi-head SSL
//! model reads as its parts; operand positions label edges into ops that
//! take more than one operand, where the order matters.

use super::graph::{Graph, ValueId};
use super::op::Op;
use super::text::print_order;
use std::fmt::Write;

/// The cluster of a scope: `heads.N` for heads, else the first path segment.
fn cluster_of(scope: &str) -> Option<&str> {
    if scope.is_empty() {
        return None;
    }
    let segments = if scope.starts_with("heads.") { 2 } else { 1 };
    let end = scope.match_indices('.').nth(segments - 1).map_or(scope.len(), |(i, _)| i);
    Some(&scope[..end])
}

/// The body of a double-quoted dot string.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn node_line(g: &Graph, v: ValueId) -> String {
    let node = g.node(v);
    let (head, attrs) = match &node.op {
        Op::Param { name, trainable, .. } => {
            (format!("@{name}"), if *trainable { ", shape=box" } else { ", shape=box, style=filled" })
        }
        Op::Buffer { name, .. } => (format!("@{name}"), ", shape=box, style=dashed"),
        Op::Input { name } => (format!("input {name:?}"), ", shape=invhouse"),
        Op::Fill { value } => (format!("fill {value}"), ""),
        op => (op.name().to_string(), ""),
    };
    // `\n` inside a dot string is a line break in the label.
    format!("n{} [label=\"{}\\n{}\"{attrs}];", v.index(), escape(&head), escape(&node.ty.to_string()))
}

impl Graph {
    /// A Graphviz digraph of the graph; render with `dot -Tsvg`.
    pub fn to_dot(&self) -> String {
        let order = print_order(self);
        // Clusters in order of first appearance, nodes in print order.
        let mut clusters: Vec<(&str, Vec<ValueId>)> = Vec::new();
        let mut loose = Vec::new();
        for &v in &order {
            match cluster_of(&self.node(v).scope) {
                None => loose.push(v),
                Some(c) => match clusters.iter_mut().find(|(name, _)| *name == c) {
                    Some((_, members)) => members.push(v),
                    None => clusters.push((c, vec![v])),
                },
            }
        }
        let mut out = String::from("digraph tessera {\n  node [fontname=\"monospace\"];\n");
        // Writing to a String cannot fail.
        for (name, members) in &clusters {
            let name = escape(name);
            let _ = writeln!(out, "  subgraph \"cluster_{name}\" {{\n    label=\"{name}\";");
            for &v in members {
                let _ = writeln!(out, "    {}", node_line(self, v));
            }
            out.push_str("  }\n");
        }
        for &v in &loose {
            let _ = writeln!(out, "  {}", node_line(self, v));
        }
        for &v in &order {
            let operands = self.operands(v);
            for (i, a) in operands.iter().enumerate() {
                let label = if operands.len() > 1 { format!(" [label=\"{i}\"]") } else { String::new() };
                let _ = writeln!(out, "  n{} -> n{}{label};", a.index(), v.index());
            }
        }
        // Outputs and state updates as sinks, so the graph shows what it produces.
        for (i, (name, v)) in self.outputs().iter().enumerate() {
            let label = escape(&format!("output {name:?}"));
            let _ = writeln!(out, "  out{i} [label=\"{label}\", shape=house];\n  n{} -> out{i};", v.index());
        }
        for (i, (buffer, v)) in self.state_updates().iter().enumerate() {
            let label = escape(&format!("state @{buffer}"));
            let _ = writeln!(out, "  state{i} [label=\"{label}\", shape=house];\n  n{} -> state{i};", v.index());
        }
        out.push_str("}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{BinaryOp, DType, Dim, Init, Shape, TensorType, UnaryOp};

    fn graph() -> Graph {
        let mut g = Graph::new();
        let x = g.add_input("im\"g", Shape(vec![Dim::B, Dim::Const(8)]), DType::F32).unwrap();
        let ty = |d: &[u64]| TensorType::f32(Shape::consts(d));
        let w = g.add_param("trunk.fc.weight", ty(&[8, 8]), Init::LecunNormal, true, "trunk.fc").unwrap();
        let h = g.add_op(Op::Linear, &[x, w], "trunk.fc").unwrap();
        let r = g.add_op(Op::Binary(BinaryOp::Add), &[h, h], "trunk").unwrap();
        let p0 = g.add_param("heads.0.proj.weight", ty(&[4, 8]), Init::LecunNormal, true, "heads.0.proj").unwrap();
        let y0 = g.add_op(Op::Linear, &[r, p0], "heads.0.proj").unwrap();
        let p1 = g.add_param("heads.1.weight", ty(&[2, 8]), Init::Zeros, false, "heads.1").unwrap();
        let y1 = g.add_op(Op::Linear, &[r, p1], "heads.1").unwrap();
        let a = g.add_op(Op::Unary(UnaryOp::Relu), &[y1], "").unwrap();
        g.set_output("z0", y0);
        g.set_output("z1", a);
        g
    }

    /// Every quote on a line is either escaped or pairs up.
    fn quotes_balanced(line: &str) -> bool {
        let mut open = false;
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' if open => {
                    chars.next();
                }
                '"' => open = !open,
                _ => {}
            }
        }
        !open
    }

    #[test]
    fn dot_is_well_formed() {
        let g = graph();
        let dot = g.to_dot();
        let mut depth = 0i32;
        for line in dot.lines() {
            assert!(quotes_balanced(line), "unbalanced quotes: {line}");
            depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
            assert!(depth >= 0, "closing brace before opening: {line}");
        }
        assert_eq!(depth, 0);
        assert!(dot.starts_with("digraph tessera {\n") && dot.ends_with("}\n"));

        let is_node = |l: &&str| l.trim_start().starts_with('n') && l.contains(" [label=") && !l.contains("->");
        assert_eq!(dot.lines().filter(is_node).count(), g.node_count());
        // One line per operand edge (the add uses %2 twice) and per output.
        assert_eq!(g.petgraph().edge_count(), 9);
        assert_eq!(dot.lines().filter(|l| l.contains(" -> ")).count(), 9 + 2);
    }

    #[test]
    fn dot_content() {
        let dot = graph().to_dot();
        let lines: Vec<&str> = dot.lines().map(str::trim).collect();
        for expected in [
            r#"subgraph "cluster_trunk" {"#,
            r#"subgraph "cluster_heads.0" {"#,
            r#"subgraph "cluster_heads.1" {"#,
            r#"n0 [label="input \"im\\\"g\"\n[B,8] f32", shape=invhouse];"#,
            r#"n1 [label="@trunk.fc.weight\n[8,8] f32", shape=box];"#,
            r#"n6 [label="@heads.1.weight\n[2,8] f32", shape=box, style=filled];"#,
            r#"n2 [label="linear\n[B,8] f32"];"#,
            r#"n0 -> n2 [label="0"];"#,
            r#"n1 -> n2 [label="1"];"#,
            r#"n2 -> n3 [label="0"];"#,
            r#"n2 -> n3 [label="1"];"#,
            r#"n7 -> n8;"#,
            r#"out1 [label="output \"z1\"", shape=house];"#,
        ] {
            assert!(lines.contains(&expected), "missing `{expected}` in\n{dot}");
        }
        // The unscoped relu sits outside every cluster, after the last one closes.
        let relu = lines.iter().position(|l| l.starts_with("n8 ")).unwrap();
        let last_close = lines.iter().rposition(|l| *l == "}").unwrap();
        let last_cluster_close = lines[..last_close].iter().rposition(|l| *l == "}").unwrap();
        assert!(relu > last_cluster_close);
    }

    #[test]
    fn clusters() {
        assert_eq!(cluster_of("trunk.blocks.3.attn"), Some("trunk"));
        assert_eq!(cluster_of("heads.1.proj"), Some("heads.1"));
        assert_eq!(cluster_of("heads.2"), Some("heads.2"));
        assert_eq!(cluster_of("heads"), Some("heads"));
        assert_eq!(cluster_of("loss"), Some("loss"));
        assert_eq!(cluster_of(""), None);
    }
}
