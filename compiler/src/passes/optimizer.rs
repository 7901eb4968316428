//! Rule `multi-tensor-optimizer`: every parameter's optimizer update as one
//! kernel. Why: after elementwise fusion AdamW is still three kernels per
//! parameter (m, v, then p: m and v are state updates, so they stay values),
//! several hundred launches over tensors of a few KiB each on a ViT; one
//! multi-tensor kernel (apex's and PyTorch's fused AdamW) walks the flat
//! parameter, gradient and state regions once.
//!
//! An update set is a trainable parameter's update and the `optim.*` state
//! updates it reads, all elementwise (fused or not) of the parameter's type
//! and read by nothing else. Sets with the same register program (AdamW's for
//! every parameter, whatever its group: lr and weight decay are operands)
//! become one `multi_tensor` op whose `part`s are the new states. Sets whose
//! tensors (not scalars) another set also reads stay as they are, so every
//! part may overwrite its state in place.

use super::fuse::{fusible, instr_of};
use super::{rebuild, Step};
use crate::ir::fused::Instr;
use crate::ir::{Graph, IrError, Op, Shape, ValueId};
use std::collections::{HashMap, HashSet};

/// One parameter's update: members in topological order, the state updates
/// among them (the parameter's first), and the program over its externals.
struct UpdateSet {
    members: Vec<ValueId>,
    updated: Vec<ValueId>,
    body: Vec<Instr>,
    results: Vec<u32>,
    externals: Vec<ValueId>,
}

fn member_ok(g: &Graph, v: ValueId, ty: &crate::ir::TensorType) -> bool {
    let op = &g.node(v).op;
    let random = matches!(op, Op::Dropout { .. } | Op::DropPath { .. })
        || matches!(op, Op::Fused { body } if body.iter().any(Instr::random));
    (matches!(op, Op::Fused { .. }) || fusible(op)) && !random && g.ty(v) == ty
}

/// The update set of parameter `p` whose new value is `u`, if it qualifies.
fn update_set(
    g: &Graph,
    pos: &HashMap<ValueId, usize>,
    p: ValueId,
    u: ValueId,
    state_of: &HashMap<ValueId, &str>,
    named: &HashSet<ValueId>,
) -> Option<UpdateSet> {
    let ty = g.ty(p).clone();
    if !member_ok(g, u, &ty) || named.contains(&u) || !g.users(u).is_empty() {
        return None;
    }
    let mut set: HashSet<ValueId> = HashSet::from([u]);
    let mut stack = vec![u];
    while let Some(n) = stack.pop() {
        for o in g.operands(n) {
            let optim_state = state_of.get(&o).is_some_and(|s| s.starts_with("optim."));
            if set.contains(&o) || !optim_state || named.contains(&o) || !member_ok(g, o, &ty) {
                continue;
            }
            if g.users(o).iter().all(|r| set.contains(r)) {
                set.insert(o);
                stack.push(o);
            }
        }
    }
    let mut members: Vec<ValueId> = set.iter().copied().collect();
    members.sort_by_key(|v| pos[v]);
    // Every member's readers are members (the loop checked the others').
    if members.iter().any(|&m| g.users(m).iter().any(|r| !set.contains(r))) {
        return None;
    }
    let mut externals: Vec<ValueId> = Vec::new();
    for &m in &members {
        for o in g.operands(m) {
            if !set.contains(&o) && !externals.contains(&o) {
                externals.push(o);
            }
        }
    }
    let mut body: Vec<Instr> = (0..externals.len() as u32).map(Instr::Operand).collect();
    let mut reg: HashMap<ValueId, u32> = externals.iter().enumerate().map(|(i, &v)| (v, i as u32)).collect();
    for &m in &members {
        let a: Vec<u32> = g.operands(m).iter().map(|o| reg[o]).collect();
        match &g.node(m).op {
            // Inline the fused program: its operands are registers `a`.
            Op::Fused { body: inner } => {
                let base = body.len() as u32;
                let at = |r: u32| -> u32 {
                    match inner[r as usize] {
                        Instr::Operand(k) => a[k as usize],
                        _ => base + r,
                    }
                };
                for instr in inner {
                    body.push(match *instr {
                        // Keeps register numbering: an operand becomes a copy, dropped below.
                        Instr::Operand(k) => Instr::Scale(1.0, a[k as usize]),
                        _ => instr.renumbered(at),
                    });
                }
            }
            op => body.push(instr_of(op, &a)?),
        }
        reg.insert(m, body.len() as u32 - 1);
    }
    let mut updated: Vec<ValueId> = vec![u];
    updated.extend(members.iter().copied().filter(|&m| m != u && state_of.contains_key(&m)));
    let (body, new_of) = without_copies(body);
    let results = updated.iter().map(|v| new_of[reg[v] as usize]).collect();
    Some(UpdateSet { members, updated, body, results, externals })
}

/// Drops the `scale 1` copies inlining leaves, renumbering registers;
/// also returns each old register's new number.
fn without_copies(body: Vec<Instr>) -> (Vec<Instr>, Vec<u32>) {
    let mut out: Vec<Instr> = Vec::with_capacity(body.len());
    let mut new_of: Vec<u32> = Vec::with_capacity(body.len());
    for instr in body {
        let next = match instr {
            Instr::Scale(1.0, x) => {
                new_of.push(new_of[x as usize]);
                continue;
            }
            _ => instr.renumbered(|x| new_of[x as usize]),
        };
        new_of.push(out.len() as u32);
        out.push(next);
    }
    (out, new_of)
}

pub(super) fn run(g: &mut Graph) -> Result<String, IrError> {
    let state_of: HashMap<ValueId, &str> = g.state_updates().iter().map(|(n, v)| (*v, n.as_str())).collect();
    let named: HashSet<ValueId> = g.outputs().iter().map(|(_, v)| *v).collect();
    let order = g.topo_order()?;
    let pos: HashMap<ValueId, usize> = order.iter().enumerate().map(|(i, &v)| (v, i)).collect();
    let mut sets: Vec<UpdateSet> = Vec::new();
    for (name, u) in g.state_updates() {
        let Some(p) = g.state(name) else { continue };
        if matches!(g.node(p).op, Op::Param { trainable: true, .. }) {
            sets.extend(update_set(g, &pos, p, *u, &state_of, &named));
        }
    }
    // Tensors read by two sets: those sets stay unfused (in-place safety).
    let mut readers: HashMap<ValueId, usize> = HashMap::new();
    for s in &sets {
        for &e in s.externals.iter().filter(|&&e| g.ty(e).shape.rank() > 0) {
            *readers.entry(e).or_insert(0) += 1;
        }
    }
    sets.retain(|s| s.externals.iter().all(|e| readers.get(e).is_none_or(|&n| n == 1)));
    // Groups of sets with one program, in parameter order.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for i in 0..sets.len() {
        let same = |j: usize| {
            sets[j].body == sets[i].body
                && sets[j].results == sets[i].results
                && sets[j].externals.len() == sets[i].externals.len()
        };
        match groups.iter_mut().find(|grp| same(grp[0])) {
            Some(grp) => grp.push(i),
            None => groups.push(vec![i]),
        }
    }
    let mut emit_at: HashMap<ValueId, usize> = HashMap::new();
    let mut member: HashSet<ValueId> = HashSet::new();
    for (gi, grp) in groups.iter().enumerate() {
        let last = grp.iter().flat_map(|&i| sets[i].members.iter()).max_by_key(|v| pos[v]).expect("non-empty");
        emit_at.insert(*last, gi);
        member.extend(grp.iter().flat_map(|&i| sets[i].members.iter().copied()));
    }
    let kernels_before: usize = groups.iter().flatten().map(|&i| sets[i].members.len()).sum();
    *g = rebuild(g, |old, v, new, map| {
        let Some(&gi) = emit_at.get(&v) else {
            return Ok(if member.contains(&v) { Step::Skip } else { Step::Copy });
        };
        let grp = &groups[gi];
        let first = &sets[grp[0]];
        let mut operands = Vec::new();
        for &i in grp {
            for e in &sets[i].externals {
                operands.push(*map.get(e).ok_or_else(|| IrError::Invalid("an optimizer operand was skipped".into()))?);
            }
        }
        let scope = "optim".to_string();
        let op = Op::MultiTensor {
            body: first.body.clone(),
            arity: first.externals.len() as u32,
            results: first.results.clone(),
        };
        let packed = new.add_op(op, &operands, &scope)?;
        let total: u64 = grp.iter().map(|&i| old.ty(sets[i].updated[0]).shape.numel(1)).sum();
        let mut pairs = Vec::new();
        for (r, _) in first.results.iter().enumerate() {
            let mut offset = r as u64 * total;
            for &i in grp {
                for (k, &upd) in sets[i].updated.iter().enumerate() {
                    if k != r {
                        continue;
                    }
                    let shape: Shape = old.ty(upd).shape.clone();
                    let n = shape.numel(1);
                    let part = new.add_op(Op::Part { offset, shape }, &[packed], &old.node(upd).scope)?;
                    pairs.push((upd, part));
                    offset += n;
                }
            }
        }
        Ok(Step::Map(pairs))
    })?;
    let sets_fused: usize = groups.iter().map(|grp| grp.len()).sum();
    Ok(format!("{sets_fused} parameter updates ({kernels_before} kernels) into {} multi-tensor kernels", groups.len()))
}

#[cfg(test)]
mod tests {
    use crate::autodiff::{training_step, Optimizer, StepOptions};
    use crate::ir::{BinaryOp, DType, Graph, Init, Op, ReduceOp, Shape, TensorType};
    use crate::memory::{plan_memory, Region};
    use crate::param_groups::ParamGroup;
    use crate::plan::Source;

    /// loss = sum(w * x) + sum(b): two parameters of different shapes, in
    /// two weight-decay groups.
    fn step(optimizer: Optimizer) -> Graph {
        let mut g = Graph::new();
        let x = g.add_input("x", Shape::consts(&[3, 4]), DType::F32).unwrap();
        let w = g.add_param("w", TensorType::f32(Shape::consts(&[3, 4])), Init::Zeros, true, "m").unwrap();
        let b = g.add_param("b", TensorType::f32(Shape::consts(&[4])), Init::Zeros, true, "m").unwrap();
        let wx = g.add_op(Op::Binary(BinaryOp::Mul), &[w, x], "m").unwrap();
        let y = g.add_op(Op::Binary(BinaryOp::Add), &[wx, b], "m").unwrap();
        let loss = g.add_op(Op::Reduce { op: ReduceOp::Sum, axes: vec![0, 1], keepdim: false }, &[y], "m").unwrap();
        g.set_output("loss", loss);
        let group = |name: &str, p: &str| ParamGroup {
            name: name.into(),
            weight_decay: 0.0,
            head_lr: false,
            params: vec![p.into()],
        };
        let groups = [group("decay", "w"), group("no_decay", "b")];
        training_step(
            g,
            &groups,
            &StepOptions {
                optimizer,
                clip_max_norm: Some(1.0),
                late_start: vec![],
                normalize_prototypes: false,
                world: 1,
            },
        )
        .unwrap()
    }

    fn fused(mut g: Graph) -> (Graph, String) {
        super::super::run(&mut g, &["dce", "cse", "fuse-elementwise"], true, |_, _| {}).unwrap();
        let report = super::run(&mut g).unwrap();
        g.verify().unwrap();
        (g, report)
    }

    #[test]
    fn adamw_over_every_parameter_is_one_kernel_writing_its_states_in_place() {
        let (g, report) = fused(step(Optimizer::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 }));
        assert_eq!(report, "2 parameter updates (6 kernels) into 1 multi-tensor kernels");
        let multi: Vec<_> = g.node_ids().into_iter().filter(|&v| g.node(v).op.name() == "multi_tensor").collect();
        assert_eq!(multi.len(), 1);
        // Packed result-major: [w', b', m_w', m_b', v_w', v_b'], 3 * 16 elements.
        assert_eq!(g.ty(multi[0]).shape, Shape::consts(&[48]));
        let offsets: Vec<(String, u64)> = g
            .state_updates()
            .iter()
            .map(|(n, v)| match &g.node(*v).op {
                Op::Part { offset, .. } => (n.clone(), *offset),
                op => panic!("{n} is updated by {}", op.name()),
            })
            .collect();
        let at = |n: &str| offsets.iter().find(|(m, _)| m == n).unwrap().1;
        assert_eq!((at("w"), at("b")), (0, 12));
        assert_eq!((at("optim.exp_avg.w"), at("optim.exp_avg.b")), (16, 28));
        assert_eq!((at("optim.exp_avg_sq.w"), at("optim.exp_avg_sq.b")), (32, 44));

        let plan = crate::plan::lower(&g, 1, true).unwrap();
        plan.validate().unwrap();
        let memory = plan_memory(&plan);
        memory.check().unwrap();
        memory.simulate(&plan).unwrap();
        // No kernel of its own for a part, and every part overwrites its state.
        assert_eq!(plan.kernels.iter().filter(|k| k.op.name() == "part").count(), 0);
        for (name, v) in &plan.state_updates {
            assert!(matches!(plan.values[*v].source, Source::Part { .. }));
            let state = plan.state(name).unwrap();
            assert_eq!(memory.placements[*v], memory.placements[state], "{name} is not updated in place");
        }
        // A malformed plan file is an error, not a panic.
        let mut bad = plan.clone();
        let v = bad.state_updates[0].1;
        let multi = bad.kernels.iter().position(|k| k.op.name() == "multi_tensor").unwrap();
        bad.values[v].source = Source::Part { kernel: multi, offset: 1 << 40 };
        assert!(bad.validate().unwrap_err().contains("not inside the packed result"));
        let mut bad = plan.clone();
        bad.values[bad.kernels[0].output].source = Source::Kernel(9999);
        assert!(bad.validate().unwrap_err().contains("says kernel 9999 makes it"));
        // The packed value itself takes no memory.
        let packed = plan.kernels.iter().find(|k| k.op.name() == "multi_tensor").unwrap().output;
        assert_eq!(memory.placements[packed].region, Region::Inline);
        assert_eq!(memory.placements[packed].bytes, 0);
    }

    #[test]
    fn sgd_with_and_without_momentum_fuses_too() {
        for (momentum, nesterov, results) in [(0.9, true, 2), (0.0, false, 1)] {
            let (g, report) = fused(step(Optimizer::Sgd { momentum, nesterov }));
            assert!(report.starts_with("2 parameter updates"), "{report}");
            let m = g.node_ids().into_iter().find(|&v| g.node(v).op.name() == "multi_tensor").unwrap();
            let Op::MultiTensor { results: r, .. } = &g.node(m).op else { unreachable!() };
            assert_eq!(r.len(), results);
        }
    }

    #[test]
    fn a_moment_read_outside_its_update_stays_its_own_kernel() {
        let mut g = step(Optimizer::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 });
        // Someone else reads w's new first moment (a logging output).
        let m_w = g.state_updates().iter().find(|(n, _)| n == "optim.exp_avg.w").unwrap().1;
        g.set_output("debug.m_w", m_w);
        let (g, report) = fused(g);
        // w's set is its parameter and second moment (a program of its own);
        // the named moment is computed before, by its own kernel.
        assert_eq!(report, "2 parameter updates (5 kernels) into 2 multi-tensor kernels");
        let m_w = g.state_updates().iter().find(|(n, _)| n == "optim.exp_avg.w").unwrap().1;
        assert_eq!(g.node(m_w).op.name(), "fused");
        assert_eq!(g.outputs().iter().find(|(n, _)| n == "debug.m_w").unwrap().1, m_w);
        let w_new = g.state_updates().iter().find(|(n, _)| n == "w").unwrap().1;
        assert_eq!(g.node(w_new).op.name(), "part");
    }
}
