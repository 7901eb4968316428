//! Graphviz form of the IR, for people. Nodes are grouped into one cluster
//! per top-level module (`trunk`, `heads.N`, `loss`) so a multi-head SSL
//! model reads as its parts; operand positions label edges into ops that
//! take more than one operand, where the order matters.
//!
//! `to_dot_collapsed` draws a run of repeated modules (`trunk.blocks.0` ..
//! `trunk.blocks.11`) once, as a cluster labelled with its count: a ViT-B
//! drawn whole is a picture some thirty thousand pixels tall. Modules
//! repeat when they would draw alike: the same ops on the same types in the
//! same order, the same parameter names below the module, the same wiring
//! inside, and each reading the one before it in the same places. Attributes
//! the picture does not show (a drop-path rate, a random key) may differ.
//! Edges into and out of a run are kept, drawn to and from its first
//! module; the edges from one module into the next are drawn once, dashed.

use super::graph::{Graph, Node, ValueId};
use super::op::Op;
use super::text::print_order;
use std::collections::{BTreeMap, HashMap, HashSet};
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

/// A node's label head (its op, or the name of a state or input) and the
/// attributes of its shape.
fn label(node: &Node) -> (String, &'static str) {
    match &node.op {
        Op::Param { name, trainable, .. } => {
            (format!("@{name}"), if *trainable { ", shape=box" } else { ", shape=box, style=filled" })
        }
        Op::Buffer { name, .. } => (format!("@{name}"), ", shape=box, style=dashed"),
        Op::Input { name } => (format!("input {name:?}"), ", shape=invhouse"),
        Op::Fill { value } => (format!("fill {value}"), ""),
        op => (op.name().to_string(), ""),
    }
}

fn node_line(g: &Graph, v: ValueId) -> String {
    let node = g.node(v);
    let (head, attrs) = label(node);
    // `\n` inside a dot string is a line break in the label.
    format!("n{} [label=\"{}\\n{}\"{attrs}];", v.index(), escape(&head), escape(&node.ty.to_string()))
}

/// Modules `family.first`, `family.first+1`, ... that draw alike, each
/// reading the one before; `members[k][j]` plays the part in module k that
/// `members[0][j]` plays in the first, which is the one drawn.
struct Run {
    family: String,
    first: u64,
    members: Vec<Vec<ValueId>>,
}

impl Run {
    fn name(&self) -> String {
        format!("{}.{}", self.family, self.first)
    }

    fn label(&self) -> String {
        let n = self.members.len() as u64;
        format!("{}.{} … {}.{} (×{n})", self.family, self.first, self.family, self.first + n - 1)
    }
}

/// Every numbered module a scope lies in, outermost first:
/// `trunk.blocks.3.attn` lies in (`trunk.blocks`, 3).
fn numbered_modules(scope: &str) -> Vec<(&str, u64)> {
    let mut found = Vec::new();
    let mut at = 0;
    for segment in scope.split('.') {
        // `07` is not module 7 of its family: its name would not round-trip.
        let numbered = at > 0 && segment.parse::<u64>().is_ok_and(|n| n.to_string() == segment);
        if numbered {
            found.push((&scope[..at - 1], segment.parse().unwrap_or(0)));
        }
        at += segment.len() + 1;
    }
    found
}

/// How one operand of a module's node is wired: to a node of the same
/// module (by its place in the module), or from outside (by its type).
#[derive(PartialEq)]
enum Wire {
    Inside(usize),
    Outside(String),
}

/// What a module draws, with the module's own name taken out of the names
/// of its parameters and buffers.
fn drawn_alike(g: &Graph, module: &str, members: &[ValueId]) -> Vec<(String, String, Vec<Wire>)> {
    let local: HashMap<ValueId, usize> = members.iter().enumerate().map(|(j, &v)| (v, j)).collect();
    let own = format!("@{module}.");
    members
        .iter()
        .map(|&v| {
            let node = g.node(v);
            let (head, attrs) = label(node);
            let head = match head.strip_prefix(&own) {
                Some(rest) if matches!(node.op, Op::Param { .. } | Op::Buffer { .. }) => format!("@.{rest}{attrs}"),
                _ => format!("{head}{attrs}"),
            };
            let wires = g
                .operands(v)
                .into_iter()
                .map(|a| match local.get(&a) {
                    Some(&j) => Wire::Inside(j),
                    None => Wire::Outside(g.ty(a).to_string()),
                })
                .collect();
            (head, node.ty.to_string(), wires)
        })
        .collect()
}

/// Whether each module after the first reads only itself and the module
/// just before it, in the same places for every pair.
fn chained(g: &Graph, members: &[Vec<ValueId>]) -> bool {
    let place: HashMap<ValueId, (usize, usize)> =
        members.iter().enumerate().flat_map(|(k, m)| m.iter().enumerate().map(move |(j, &v)| (v, (k, j)))).collect();
    let mut pattern = None;
    for (k, module) in members.iter().enumerate() {
        let mut links = Vec::new();
        for (j, &v) in module.iter().enumerate() {
            for (position, a) in g.operands(v).iter().enumerate() {
                match place.get(a) {
                    None => {}
                    Some(&(ka, _)) if ka == k => {}
                    Some(&(ka, ja)) if ka + 1 == k => links.push((ja, j, position)),
                    // A module reading a later one, or one further back,
                    // would lose that edge when drawn once.
                    Some(_) => return false,
                }
            }
        }
        if k == 0 {
            continue;
        }
        match &pattern {
            None => pattern = Some(links),
            Some(p) if *p == links => {}
            Some(_) => return false,
        }
    }
    true
}

/// The runs of two or more repeated modules, outermost families first (a
/// run of blocks hides the runs inside its later blocks).
fn find_runs(g: &Graph, order: &[ValueId]) -> Vec<Run> {
    let mut families: Vec<&str> = Vec::new();
    let mut modules: HashMap<&str, BTreeMap<u64, Vec<ValueId>>> = HashMap::new();
    for &v in order {
        for (family, n) in numbered_modules(&g.node(v).scope) {
            let of_family = modules.entry(family).or_insert_with(|| {
                families.push(family);
                BTreeMap::new()
            });
            of_family.entry(n).or_default().push(v);
        }
    }
    families.sort_by_key(|f| f.matches('.').count());
    let mut taken: HashSet<ValueId> = HashSet::new();
    let mut runs = Vec::new();
    for family in families {
        let free: Vec<(u64, &Vec<ValueId>)> = modules[family]
            .iter()
            .filter(|(_, members)| members.iter().all(|v| !taken.contains(v)))
            .map(|(&n, members)| (n, members))
            .collect();
        let looks: Vec<_> = free.iter().map(|(n, m)| drawn_alike(g, &format!("{family}.{n}"), m)).collect();
        let mut i = 0;
        while i < free.len() {
            let mut j = i + 1;
            while j < free.len() && free[j].0 == free[j - 1].0 + 1 && looks[j] == looks[i] {
                j += 1;
            }
            let members: Vec<Vec<ValueId>> = free[i..j].iter().map(|(_, m)| (*m).clone()).collect();
            if members.len() > 1 && chained(g, &members) {
                taken.extend(members.iter().flatten().copied());
                runs.push(Run { family: family.to_string(), first: free[i].0, members });
            }
            i = j;
        }
    }
    runs
}

/// A top-level cluster: its own nodes, then its runs (index, drawn nodes).
struct Cluster<'a> {
    name: &'a str,
    nodes: Vec<ValueId>,
    runs: Vec<(usize, Vec<ValueId>)>,
}

impl Graph {
    /// A Graphviz digraph of the graph, every node drawn; render with `dot -Tsvg`.
    pub fn to_dot(&self) -> String {
        self.draw(&[])
    }

    /// The digraph with each run of repeated modules drawn once (see the
    /// module's documentation); the same as `to_dot` when nothing repeats.
    pub fn to_dot_collapsed(&self) -> String {
        self.draw(&find_runs(self, &print_order(self)))
    }

    fn draw(&self, runs: &[Run]) -> String {
        let order = print_order(self);
        // Where each node of a run sits (run, module), and what stands for
        // a node of a later module: its part in the first.
        let mut place: HashMap<ValueId, (usize, usize)> = HashMap::new();
        let mut stand_in: HashMap<ValueId, ValueId> = HashMap::new();
        for (r, run) in runs.iter().enumerate() {
            for (k, module) in run.members.iter().enumerate() {
                for (j, &v) in module.iter().enumerate() {
                    place.insert(v, (r, k));
                    if k > 0 {
                        stand_in.insert(v, run.members[0][j]);
                    }
                }
            }
        }
        let shown = |v: ValueId| stand_in.get(&v).copied().unwrap_or(v);
        let run_names: Vec<String> = runs.iter().map(Run::name).collect();
        // Clusters in order of first appearance, nodes in print order.
        let mut clusters: Vec<Cluster> = Vec::new();
        let mut loose = Vec::new();
        for &v in order.iter().filter(|v| !stand_in.contains_key(v)) {
            let Some(c) = cluster_of(&self.node(v).scope) else {
                loose.push(v);
                continue;
            };
            let at = match clusters.iter().position(|cl| cl.name == c) {
                Some(at) => at,
                None => {
                    clusters.push(Cluster { name: c, nodes: Vec::new(), runs: Vec::new() });
                    clusters.len() - 1
                }
            };
            let cluster = &mut clusters[at];
            // A run of whole clusters (`heads.0` .. `heads.3`) labels the
            // cluster itself; a run inside one is a cluster of its own.
            match place.get(&v) {
                Some(&(r, _)) if run_names[r] != c => match cluster.runs.iter_mut().find(|(i, _)| *i == r) {
                    Some((_, nodes)) => nodes.push(v),
                    None => cluster.runs.push((r, vec![v])),
                },
                _ => cluster.nodes.push(v),
            }
        }
        let mut out = String::from("digraph tessera {\n  node [fontname=\"monospace\"];\n");
        // Writing to a String cannot fail.
        for cluster in &clusters {
            let whole = run_names.iter().position(|n| n == cluster.name);
            let label = whole.map_or(cluster.name.to_string(), |r| runs[r].label());
            let _ =
                writeln!(out, "  subgraph \"cluster_{}\" {{\n    label=\"{}\";", escape(cluster.name), escape(&label));
            for &v in &cluster.nodes {
                let _ = writeln!(out, "    {}", node_line(self, v));
            }
            for (r, nodes) in &cluster.runs {
                let _ = writeln!(
                    out,
                    "    subgraph \"cluster_{}\" {{\n      label=\"{}\";\n      style=\"rounded,filled\";\n      fillcolor=\"#eef3fb\";",
                    escape(&run_names[*r]),
                    escape(&runs[*r].label())
                );
                for &v in nodes {
                    let _ = writeln!(out, "      {}", node_line(self, v));
                }
                out.push_str("    }\n");
            }
            out.push_str("  }\n");
        }
        for &v in &loose {
            let _ = writeln!(out, "  {}", node_line(self, v));
        }
        // Edges of later modules are drawn once, by the first module's.
        let mut drawn: HashSet<String> = HashSet::new();
        for &v in &order {
            let operands = self.operands(v);
            for (i, &a) in operands.iter().enumerate() {
                let position = (operands.len() > 1).then(|| i.to_string());
                let label = match (place.get(&a), place.get(&v)) {
                    (Some(&(ra, ka)), Some(&(rv, kv))) if ra == rv && ka == kv && kv > 0 => continue,
                    // Into the next module: dashed, and left out of the
                    // layout's ranks so the run still reads top to bottom.
                    (Some(&(ra, ka)), Some(&(rv, kv))) if ra == rv && ka + 1 == kv => {
                        let text = position.map_or("next".to_string(), |p| format!("{p}, next"));
                        format!(" [label=\"{text}\", style=dashed, constraint=false]")
                    }
                    _ => position.map_or(String::new(), |p| format!(" [label=\"{p}\"]")),
                };
                let line = format!("  n{} -> n{}{label};\n", shown(a).index(), shown(v).index());
                if drawn.insert(line.clone()) {
                    out.push_str(&line);
                }
            }
        }
        // Outputs and state updates as sinks, so the graph shows what it produces.
        for (i, (name, v)) in self.outputs().iter().enumerate() {
            let label = escape(&format!("output {name:?}"));
            let _ = writeln!(out, "  out{i} [label=\"{label}\", shape=house];\n  n{} -> out{i};", shown(*v).index());
        }
        for (i, (buffer, v)) in self.state_updates().iter().enumerate() {
            let label = escape(&format!("state @{buffer}"));
            let _ =
                writeln!(out, "  state{i} [label=\"{label}\", shape=house];\n  n{} -> state{i};", shown(*v).index());
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

    /// `trunk.blocks.{i}`: a linear layer to `width` and a relu, reading `x` ([B, n]).
    fn block(g: &mut Graph, x: ValueId, i: usize, width: u64) -> ValueId {
        let scope = format!("trunk.blocks.{i}");
        let Dim::Const(from) = g.ty(x).shape.0[1] else { unreachable!("blocks read [B, n]") };
        let ty = TensorType::f32(Shape::consts(&[width, from]));
        let w = g.add_param(&format!("{scope}.fc.weight"), ty, Init::Zeros, true, &format!("{scope}.fc")).unwrap();
        let h = g.add_op(Op::Linear, &[x, w], &format!("{scope}.fc")).unwrap();
        g.add_op(Op::Unary(UnaryOp::Relu), &[h], &scope).unwrap()
    }

    /// Blocks of these widths one after another, then an output.
    fn stack(widths: &[u64]) -> Graph {
        let mut g = Graph::new();
        let mut x = g.add_input("x", Shape(vec![Dim::B, Dim::Const(widths[0])]), DType::F32).unwrap();
        for (i, &w) in widths.iter().enumerate() {
            x = block(&mut g, x, i, w);
        }
        g.set_output("y", x);
        g
    }

    fn nodes(dot: &str) -> usize {
        dot.lines().filter(|l| l.trim_start().starts_with('n') && l.contains(" [label=") && !l.contains("->")).count()
    }

    #[test]
    fn numbered_modules_of_a_scope() {
        assert_eq!(numbered_modules("trunk.blocks.3.attn"), vec![("trunk.blocks", 3)]);
        assert_eq!(numbered_modules("heads.1.clf.0"), vec![("heads", 1), ("heads.1.clf", 0)]);
        assert_eq!(numbered_modules("trunk.blocks.03"), vec![]);
        assert_eq!(numbered_modules("0.x"), vec![]);
        assert_eq!(numbered_modules(""), vec![]);
    }

    #[test]
    fn a_run_of_identical_blocks_is_drawn_once_with_its_count() {
        let g = stack(&[8, 8, 8, 8]);
        let dot = g.to_dot_collapsed();
        assert_eq!(nodes(&g.to_dot()), 13);
        // The input and the first block's weight, linear and relu.
        assert_eq!(nodes(&dot), 4, "{dot}");
        let lines: Vec<&str> = dot.lines().map(str::trim).collect();
        for expected in [
            r#"subgraph "cluster_trunk.blocks.0" {"#,
            r#"label="trunk.blocks.0 … trunk.blocks.3 (×4)";"#,
            r#"n0 -> n2 [label="0"];"#,
            r#"n1 -> n2 [label="1"];"#,
            r#"n2 -> n3;"#,
            // The relu of one block feeds the linear of the next.
            r#"n3 -> n2 [label="0, next", style=dashed, constraint=false];"#,
            // The output, made by the last block, is drawn from the first.
            r#"n3 -> out0;"#,
        ] {
            assert!(lines.contains(&expected), "missing `{expected}` in\n{dot}");
        }
        assert_eq!(dot.lines().filter(|l| l.contains(" -> ")).count(), 5, "{dot}");
        assert!(!dot.contains("trunk.blocks.1.fc.weight"), "{dot}");
    }

    #[test]
    fn blocks_that_differ_are_not_merged() {
        // Another width in the middle splits the run: 0-1 alike, 2 alone, 3-4 alike.
        let g = stack(&[8, 8, 4, 4, 4]);
        let dot = g.to_dot_collapsed();
        assert!(dot.contains(r#"label="trunk.blocks.0 … trunk.blocks.1 (×2)";"#), "{dot}");
        assert!(dot.contains(r#"label="trunk.blocks.3 … trunk.blocks.4 (×2)";"#), "{dot}");
        assert!(dot.contains("@trunk.blocks.2.fc.weight"), "{dot}");
        assert_eq!(nodes(&dot), 1 + 3 * 3, "{dot}");
        // Blocks of one shape with other ops, or with other parameter names
        // below them, are not the same block.
        let mut g = stack(&[8, 8]);
        let last = g.outputs()[0].1;
        let x = g.add_op(Op::Unary(UnaryOp::Exp), &[last], "trunk.blocks.2").unwrap();
        g.set_output("z", x);
        assert!(!g.to_dot_collapsed().contains("(×3)"));
        let mut g = Graph::new();
        let x = g.add_input("x", Shape(vec![Dim::B, Dim::Const(8)]), DType::F32).unwrap();
        let ty = TensorType::f32(Shape::consts(&[8, 8]));
        let mut h = x;
        for (i, name) in ["fc", "proj"].iter().enumerate() {
            let scope = format!("trunk.blocks.{i}");
            let w = g.add_param(&format!("{scope}.{name}.weight"), ty.clone(), Init::Zeros, true, &scope).unwrap();
            h = g.add_op(Op::Linear, &[h, w], &scope).unwrap();
        }
        g.set_output("y", h);
        assert_eq!(g.to_dot_collapsed(), g.to_dot());
    }

    #[test]
    fn blocks_wired_past_their_neighbour_are_not_merged() {
        // Block 2 reads block 0, not block 1: drawn once, that edge would be lost.
        let mut g = Graph::new();
        let x = g.add_input("x", Shape(vec![Dim::B, Dim::Const(8)]), DType::F32).unwrap();
        let b0 = block(&mut g, x, 0, 8);
        let b1 = block(&mut g, b0, 1, 8);
        let b2 = block(&mut g, b0, 2, 8);
        let y = g.add_op(Op::Binary(BinaryOp::Add), &[b1, b2], "").unwrap();
        g.set_output("y", y);
        assert_eq!(g.to_dot_collapsed(), g.to_dot());
        // Nothing repeats in the small graph either.
        assert_eq!(graph().to_dot_collapsed(), graph().to_dot());
    }
}
