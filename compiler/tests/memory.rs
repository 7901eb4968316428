//! The memory planner's invariants on every reference model and on random
//! graphs: live buffers never overlap in the arena (checked pairwise and by
//! running each plan on paper against its arena), the arena is at least the
//! largest sum of live bytes, and the peak is the sum of its parts.

use proptest::prelude::*;
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::ir::{BinaryOp, DType, Graph, Op, ReduceOp, Shape, UnaryOp, ValueId};
use tessera_compiler::memory::{plan_memory, MemoryPlan};
use tessera_compiler::pipeline::{lower_training, training_graph, PassChoice};
use tessera_compiler::plan::{Plan, Source};

fn holds(plan: &Plan, m: &MemoryPlan, what: &str) {
    m.check().unwrap_or_else(|e| panic!("{what}: {e}"));
    m.simulate(plan).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(m.arena_bytes >= m.lower_bound_bytes, "{what}");
    let p = &m.parts;
    let sum = p.parameters
        + p.gradients
        + p.optimizer_state
        + p.buffers
        + p.inputs
        + p.activations_kept
        + p.transient
        + p.workspace;
    assert_eq!(sum, m.peak_bytes, "{what}: the parts add up to the peak");
}

#[test]
fn every_reference_model_plans_without_overlap_near_the_bound() {
    let prog = Program::load(&[]).unwrap();
    let mut names: Vec<String> =
        config::embedded_config_names().into_iter().filter(|n| n.starts_with("quickstart/")).collect();
    names.push("pretrain/vision_transformer/supervised/1gpu_vit_example".into());
    names.push("pretrain/vision_transformer/supervised/16gpu_convit_b".into());
    for name in names {
        let cfg = config::load(&name, &[]).unwrap();
        for passes in [tessera_compiler::passes::DEFAULT.to_vec(), vec![]] {
            let choice = PassChoice::passes(passes.clone());
            let (step, _, _) = training_graph(&prog, cfg.tree(), choice).unwrap();
            for batch in [1, 3] {
                let plan = lower_training(&step, batch).unwrap();
                let m = plan.memory.clone().unwrap();
                let what = format!("{name} batch {batch} passes {passes:?}");
                holds(&plan, &m, &what);
                plan.validate().unwrap_or_else(|e| panic!("{what}: {e}"));
                // Greedy by size stays close to the bound on these graphs.
                assert!(
                    m.arena_bytes * 4 <= m.lower_bound_bytes * 5,
                    "{what}: arena {} vs bound {}",
                    m.arena_bytes,
                    m.lower_bound_bytes
                );
            }
        }
    }
}

/// Slices of contiguous rows at aligned bytes are views of their operand's
/// storage, and a concat of such views lying one after another in it is
/// that storage too; out of order, or at an unaligned byte, they copy.
#[test]
fn slices_of_rows_and_their_concat_in_order_are_views() {
    let mut g = Graph::new();
    let x = g.add_input("x", Shape::consts(&[4, 64]), DType::F32).unwrap();
    let e = g.add_op(Op::Unary(UnaryOp::Exp), &[x], "").unwrap();
    let rows = |g: &mut Graph, v: ValueId, start: u64, end: u64| {
        let (start, end) = (tessera_compiler::ir::Dim::Const(start), tessera_compiler::ir::Dim::Const(end));
        g.add_op(Op::Slice { axis: 0, start, end }, &[v], "").unwrap()
    };
    let (top, bottom) = (rows(&mut g, e, 0, 2), rows(&mut g, e, 2, 4));
    let in_order = g.add_op(Op::Concat { axis: 0 }, &[top, bottom], "").unwrap();
    let swapped = g.add_op(Op::Concat { axis: 0 }, &[bottom, top], "").unwrap();
    // Row 1 of e as 16 x 16 f32 starts 64 bytes in (not a multiple of 256).
    let f = g.add_op(Op::Reshape { shape: Shape::consts(&[16, 16]) }, &[e], "").unwrap();
    let unaligned = rows(&mut g, f, 1, 3);
    for (name, v) in [("in_order", in_order), ("swapped", swapped), ("unaligned", unaligned)] {
        let y = g.add_op(Op::Scale { factor: 2.0 }, &[v], "").unwrap();
        g.set_output(name, y);
    }
    let plan = tessera_compiler::plan::lower(&g, 1, false).unwrap();
    let m = plan_memory(&plan);
    holds(&plan, &m, "slices and concats");
    let views: Vec<(&str, bool)> = plan
        .kernels
        .iter()
        .enumerate()
        .filter(|(_, k)| matches!(k.op, Op::Slice { .. } | Op::Concat { .. }))
        .map(|(j, k)| (k.op.name(), tessera_compiler::memory::is_view(&plan, &m.placements, j)))
        .collect();
    assert_eq!(
        views,
        [("slice", true), ("slice", true), ("concat", true), ("concat", false), ("slice", false)],
        "slices of rows 0..2 and 2..4 view e, their concat in order is e; swapped or unaligned, they copy"
    );
    let e_at = &m.placements[plan.kernels.iter().find(|k| k.op.name() == "exp").unwrap().output];
    let concat = plan.kernels.iter().find(|k| k.op.name() == "concat").unwrap();
    assert_eq!(&m.placements[concat.output], e_at);
}

/// A random graph of vectors: elementwise ops, slices (views of their
/// operand or copies), concats, reshapes and sums over earlier values; some
/// values are outputs.
fn random_graph(ops: &[(u8, usize, usize, u8)], outputs: &[usize]) -> Graph {
    let mut g = Graph::new();
    let mut vals: Vec<ValueId> = Vec::new();
    for (i, len) in [64u64, 300, 1000].into_iter().enumerate() {
        vals.push(g.add_input(&format!("x{i}"), Shape::consts(&[len]), DType::F32).unwrap());
    }
    for &(kind, a, b, extra) in ops {
        let (a, b) = (vals[a % vals.len()], vals[b % vals.len()]);
        let len_a = g.ty(a).shape.const_numel().unwrap();
        let flat = |g: &mut Graph, v: ValueId| {
            let n = g.ty(v).shape.const_numel().unwrap();
            if g.ty(v).shape.rank() == 1 {
                v
            } else {
                g.add_op(Op::Reshape { shape: Shape::consts(&[n]) }, &[v], "").unwrap()
            }
        };
        let v = match kind % 6 {
            0 => g.add_op(Op::Unary(UnaryOp::Exp), &[a], "").unwrap(),
            1 if g.ty(a).shape == g.ty(b).shape => g.add_op(Op::Binary(BinaryOp::Add), &[a, b], "").unwrap(),
            1 => g.add_op(Op::Scale { factor: 0.5 }, &[a], "").unwrap(),
            2 if len_a > 2 => {
                // Starting at 0, at a multiple of 64 f32s (256 bytes: a view
                // inside its operand's storage) or just past one (a copy).
                let start = match extra % 3 {
                    0 => 0,
                    1 => 64 * (extra as u64 / 3 % 4),
                    _ => 64 * (extra as u64 / 3 % 4) + 1,
                }
                .min(len_a - 2);
                let end = start + 1 + (extra as u64) % (len_a - start - 1);
                let fa = flat(&mut g, a);
                g.add_op(
                    Op::Slice {
                        axis: 0,
                        start: tessera_compiler::ir::Dim::Const(start),
                        end: tessera_compiler::ir::Dim::Const(end),
                    },
                    &[fa],
                    "",
                )
                .unwrap()
            }
            3 => {
                let (fa, fb) = (flat(&mut g, a), flat(&mut g, b));
                g.add_op(Op::Concat { axis: 0 }, &[fa, fb], "").unwrap()
            }
            4 => g.add_op(Op::Reshape { shape: Shape::consts(&[1, len_a]) }, &[a], "").unwrap(),
            _ => {
                let r = g.ty(a).shape.rank();
                let s = g
                    .add_op(Op::Reduce { op: ReduceOp::Sum, axes: (0..r).collect(), keepdim: false }, &[a], "")
                    .unwrap();
                g.add_op(Op::Binary(BinaryOp::Mul), &[a, s], "").unwrap()
            }
        };
        vals.push(v);
    }
    for (i, &o) in outputs.iter().enumerate() {
        g.set_output(&format!("y{i}"), vals[o % vals.len()]);
    }
    let last = *vals.last().unwrap();
    g.set_output("last", last);
    g.prune(|_| true, false);
    g
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    #[test]
    fn random_graphs_plan_without_overlap(
        ops in prop::collection::vec((any::<u8>(), any::<usize>(), any::<usize>(), any::<u8>()), 1..60),
        outputs in prop::collection::vec(any::<usize>(), 0..4),
    ) {
        let g = random_graph(&ops, &outputs);
        g.verify().unwrap();
        for passes in [tessera_compiler::passes::DEFAULT.to_vec(), vec![]] {
            let mut g = g.clone();
            tessera_compiler::passes::run(&mut g, &passes, true, |_, _| {}).unwrap();
            let plan = tessera_compiler::plan::lower(&g, 1, false).unwrap();
            let m = plan_memory(&plan);
            holds(&plan, &m, "random graph");
        }
    }
}

#[test]
fn an_arena_with_overlapping_live_buffers_is_caught() {
    let prog = Program::load(&[]).unwrap();
    let cfg = config::load("quickstart/vit_tiny", &[]).unwrap();
    let (step, _, _) = training_graph(&prog, cfg.tree(), PassChoice::default()).unwrap();
    let plan = lower_training(&step, 2).unwrap();
    let mut m = plan.memory.clone().unwrap();
    // Everything at offset 0: the checks must notice.
    for b in &mut m.blocks {
        b.offset = 0;
    }
    for p in &mut m.placements {
        if p.region == tessera_compiler::memory::Region::Arena {
            p.offset = 0;
        }
    }
    assert!(m.check().unwrap_err().contains("overlap"));
    let e = m.simulate(&plan).unwrap_err();
    // Caught at the first kernel whose result lands over part of an
    // operand, or whose operand was overwritten before it.
    assert!((e.contains("reads value") && e.contains("holds value")) || e.contains("over part of value"), "{e}");
}

#[test]
fn recomputing_blocks_keeps_fewer_activations_and_costs_flops() {
    let prog = Program::load(&[]).unwrap();
    let peak = |overrides: &[&str]| {
        let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        let cfg = config::load("pretrain/vision_transformer/supervised/16gpu_deit_b_example", &ov).unwrap();
        let (step, _, reports) = training_graph(&prog, cfg.tree(), PassChoice::for_config(cfg.tree())).unwrap();
        let plan = lower_training(&step, 8).unwrap();
        let m = plan.memory.clone().unwrap();
        holds(&plan, &m, &format!("{overrides:?}"));
        (m.parts.activations_kept, tessera_compiler::ir::flops::total_flops(&step, 8), reports)
    };
    let (kept, flops, reports) = peak(&[]);
    assert!(reports.iter().all(|r| r.pass != "recompute"));
    let (kept_block, flops_block, reports) = peak(&["MODEL.TRUNK.VISION_TRANSFORMERS.CHECKPOINT_BLOCK=true"]);
    let (kept_mlp, flops_mlp, _) = peak(&["MODEL.TRUNK.VISION_TRANSFORMERS.CHECKPOINT_MLP=true"]);
    let recompute = reports.iter().find(|r| r.pass == "recompute").expect("a recompute report");
    assert!(recompute.detail.starts_with("12 regions recomputed"), "{}", recompute.detail);
    // Whole blocks keep least; MLPs only in between; each costs forward FLOPs.
    assert!(kept_block * 3 < kept && kept_block < kept_mlp && kept_mlp < kept, "{kept} {kept_mlp} {kept_block}");
    assert!(flops < flops_mlp && flops_mlp < flops_block, "{flops} {flops_mlp} {flops_block}");
    // At most one more forward pass (about a third of the step).
    assert!(flops_block < flops * 3 / 2, "{flops} {flops_block}");
}

#[test]
fn a_broadcast_operand_of_the_same_byte_size_is_not_overwritten_in_place() {
    use tessera_compiler::ir::fused::Instr;
    // a: f32 [1,4] (16 bytes), dying at a fused add with a bf16 [2,4] (16 bytes)
    // result: writing row 0 would clobber `a` before row 1 reads it.
    let mut g = Graph::new();
    let x = g.add_input("x", Shape::consts(&[1, 4]), DType::F32).unwrap();
    let y = g.add_input("y", Shape::consts(&[2, 4]), DType::BF16).unwrap();
    let a = g.add_op(Op::Unary(UnaryOp::Exp), &[x], "").unwrap();
    let body =
        vec![Instr::Operand(0), Instr::Operand(1), Instr::Cast(DType::BF16, 0), Instr::Binary(BinaryOp::Add, 2, 1)];
    let out = g.add_op(Op::Fused { body }, &[a, y], "").unwrap();
    let z = g.add_op(Op::Unary(UnaryOp::Exp), &[out], "").unwrap();
    g.set_output("z", z);
    let plan = tessera_compiler::plan::lower(&g, 1, false).unwrap();
    let m = plan_memory(&plan);
    holds(&plan, &m, "broadcast in place");
    let fused = plan.kernels.iter().find(|k| k.op.name() == "fused").unwrap();
    let (pa, po) = (fused.inputs[0], fused.output);
    assert_eq!(m.placements[pa].bytes, m.placements[po].bytes, "same byte size: the case at issue");
    assert_ne!(m.placements[pa].offset, m.placements[po].offset, "the result must not take the operand's storage");
}

#[test]
fn a_state_update_is_not_written_in_place_while_a_view_of_the_old_value_is_read() {
    use tessera_compiler::ir::{Init, TensorType};
    let build = |read_view_late: bool| {
        let mut g = Graph::new();
        let w = g.add_param("w", TensorType::f32(Shape::consts(&[64])), Init::Zeros, true, "").unwrap();
        let view = g.add_op(Op::Reshape { shape: Shape::consts(&[8, 8]) }, &[w], "").unwrap();
        let early = g.add_op(Op::Unary(UnaryOp::Exp), &[view], "").unwrap();
        let new_w = g.add_op(Op::Scale { factor: 0.5 }, &[w], "").unwrap();
        g.add_state_update("w", new_w);
        let read = if read_view_late { g.add_op(Op::Unary(UnaryOp::Exp), &[view], "").unwrap() } else { early };
        g.set_output("y", read);
        let plan = tessera_compiler::plan::lower(&g, 1, true).unwrap();
        let m = plan_memory(&plan);
        m.check().unwrap();
        let (w, new_w) = (plan.state("w").unwrap(), plan.state_updates[0].1);
        m.placements[new_w] == m.placements[w]
    };
    assert!(build(false), "nothing reads the old weight after the update: in place");
    assert!(!build(true), "the view is read after the update: not in place");
}

/// The `attr="..."` values of an SVG element's opening tag.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    Some(&tag[at..at + tag[at..].find('"')?])
}

fn num(tag: &str, name: &str) -> f64 {
    attr(tag, name).unwrap_or_else(|| panic!("no {name} in {tag}")).parse().unwrap()
}

/// Every element of the SVG that opens with `<{element} class="{class}"`, with its text up to its end tag.
fn elements<'a>(svg: &'a str, element: &str, class: &str) -> Vec<&'a str> {
    let open = format!("<{element} class=\"{class}\"");
    let close = format!("</{element}>");
    svg.match_indices(&open).map(|(i, _)| &svg[i..i + svg[i..].find(&close).unwrap()]).collect()
}

/// The text of an element's `<text>` child.
fn text(element: &str) -> &str {
    let child = &element[element.find("<text").unwrap()..];
    let body = &child[child.find('>').unwrap() + 1..];
    &body[..body.find('<').unwrap()]
}

/// Whether `x` is 1, 2 or 5 times a power of ten.
fn round(x: f64) -> bool {
    let decade = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().any(|m| (x / decade - m).abs() < 1e-9)
}

#[test]
fn the_memory_plot_draws_what_adds_up_to_its_peak() {
    let prog = Program::load(&[]).unwrap();
    let cfg = config::load("quickstart/vit_tiny", &[]).unwrap();
    let (step, _, _) =
        training_graph(&prog, cfg.tree(), PassChoice::passes(tessera_compiler::passes::DEFAULT.to_vec())).unwrap();
    let plan = lower_training(&step, 64).unwrap();
    let m = plan.memory.clone().unwrap();
    let svg = m.to_svg(&plan, "vit_tiny");
    let title = svg.lines().find(|l| l.contains("data-peak-bytes")).unwrap();
    assert_eq!(num(title, "data-peak-bytes"), m.peak_bytes as f64);
    assert!(title.contains(&format!("peak {}", tessera_compiler::memory::human_bytes(m.peak_bytes))), "{title}");

    // The regions stack from the axis up without gaps, their bytes are the
    // parts of the peak, and together they are the peak in bytes and in height.
    let regions = elements(&svg, "rect", "region");
    let names: Vec<&str> = regions.iter().map(|r| attr(r, "data-region").unwrap()).collect();
    assert_eq!(names, ["parameters", "gradients", "optimizer state", "buffers", "inputs", "arena", "workspace"]);
    let p = &m.parts;
    let bytes: Vec<u64> = regions.iter().map(|r| num(r, "data-bytes") as u64).collect();
    let arena = p.activations_kept + p.transient;
    assert_eq!(bytes, [p.parameters, p.gradients, p.optimizer_state, p.buffers, p.inputs, arena, p.workspace]);
    assert!(bytes.iter().filter(|&&b| b > 0).count() >= 6, "{bytes:?}");
    assert_eq!(bytes.iter().sum::<u64>(), m.peak_bytes);
    let axis = svg.lines().find(|l| l.starts_with("<line x1=\"90\"") && l.contains("y1=\"630\"")).unwrap();
    let mut bottom = num(axis, "y1");
    for r in &regions {
        let (y, h) = (num(r, "y"), num(r, "height"));
        assert!((y + h - bottom).abs() < 1e-3, "{r} does not sit on the region below it");
        bottom = y;
    }
    // The top of the stack is the peak on the axis's scale.
    let ticks = elements(&svg, "g", "ytick");
    let (y0, y1) = (num(ticks[0], "y1"), num(ticks[1], "y1"));
    assert_eq!(y0, num(axis, "y1"), "the 0 tick is on the axis");
    let step_label = text(ticks[1]);
    let mib: f64 = step_label.strip_suffix(" MiB").unwrap_or_else(|| panic!("{step_label}")).parse().unwrap();
    let peak_y = y0 - (m.peak_bytes as f64 / (mib * 1048576.0)) * (y0 - y1);
    assert!((peak_y - bottom).abs() < 0.01, "the stack tops out at {bottom}, the peak is at {peak_y}");

    // Tick labels are round: multiples of a 1-2-5 step, in one unit.
    assert!(ticks.len() >= 4 && text(ticks[0]) == "0", "{ticks:?}");
    for (i, t) in ticks.iter().enumerate() {
        let v: f64 = text(t).trim_end_matches(" MiB").parse().unwrap();
        assert_eq!(v, i as f64 * mib, "{t}");
    }
    assert!(round(mib), "{mib}");
    let kernel_ticks: Vec<usize> = elements(&svg, "g", "xtick").iter().map(|t| text(t).parse().unwrap()).collect();
    assert_eq!(kernel_ticks[0], 0);
    let k_step = kernel_ticks[1];
    assert!(round(k_step as f64) && kernel_ticks.len() >= 5, "{kernel_ticks:?}");
    assert!(kernel_ticks.iter().enumerate().all(|(i, &k)| k == i * k_step), "{kernel_ticks:?}");
    assert!(*kernel_ticks.last().unwrap() < plan.kernels.len());

    // Each storage's tooltip names the op that made it and its module.
    let storages = elements(&svg, "rect", "storage");
    assert_eq!(storages.len(), m.blocks.len());
    for (b, r) in m.blocks.iter().zip(&storages) {
        let tip = &r[r.find("<title>").unwrap() + 7..];
        let expected = match plan.values[b.value].source {
            Source::Kernel(k) => format!("{} in {} · ", plan.kernels[k].op.name(), plan.kernels[k].scope),
            Source::Part { kernel, .. } => {
                format!("part of {} in {} · ", plan.kernels[kernel].op.name(), plan.kernels[kernel].scope)
            }
            ref other => panic!("an arena storage made by {other:?}"),
        };
        assert!(tip.starts_with(&expected), "{tip} should start with {expected}");
        assert!(tip.contains(&format!("kernels {}–{}", b.first, b.last)), "{tip}");
    }
    assert!(storages.iter().any(|r| r.contains(" in trunk.blocks.1.")), "no storage of block 1");
}
