//! Memory plans where a kernel reads storage its result shares: rows of
//! a buffer read as slice views by the kernel written over it, states
//! updated in place while a view of them is read, outputs and updates
//! that are views of an updated state. The CPU pooled executor (no shared
//! storage) is the reference; the CUDA executor runs the plan's places
//! (the CPU arena executor reads every operand before writing, so only a
//! device that writes as it reads shows such aliasing).

use tessera_compiler::ir::{BinaryOp, DType, Dim, Graph, Init, Op, Shape, TensorType, UnaryOp, ValueId};
use tessera_runtime::philox::Stream;
use tessera_runtime::{Backend, Tensor};

fn rand(shape: &[usize], seed: u32) -> Tensor {
    let n: usize = shape.iter().product();
    let s = Stream::new(5, 1, seed);
    Tensor::f32(shape.to_vec(), (0..n as u64).map(|i| s.uniform_at(i) * 2.0 - 1.0).collect())
}

fn rows(g: &mut Graph, v: ValueId, start: u64, end: u64) -> ValueId {
    g.add_op(Op::Slice { axis: 0, start: Dim::Const(start), end: Dim::Const(end) }, &[v], "").unwrap()
}

fn close(want: &Tensor, got: &Tensor, what: &str) {
    let (a, b) = (want.as_f32().unwrap(), got.as_f32().unwrap());
    let bad = a.iter().zip(b).filter(|(p, q)| (**p - **q).abs() > 1e-5 * (1.0 + p.abs())).count();
    assert_eq!(bad, 0, "{what}: {bad} of {} differ from the CPU", a.len());
}

/// One step of `g` (training: state updates) on the CPU and on the device
/// under test; the outputs and every state afterwards must agree.
fn agree(what: &str, g: &Graph, x_shape: &[usize], training: bool) {
    let mut plan = tessera_compiler::plan::lower(g, 1, training).unwrap();
    let memory = tessera_compiler::memory::plan_memory(&plan);
    memory.simulate(&plan).unwrap_or_else(|e| panic!("{what}: {e}"));
    plan.memory = Some(memory);
    let inputs = [("x", rand(x_shape, 1))];
    let mut cpu = Backend::Cpu.executor(plan.clone(), 42).unwrap();
    let mut dev = crate::open_cuda().unwrap().executor(plan.clone(), 42).unwrap();
    let (want, got) = (cpu.run(&inputs, None).unwrap(), dev.run(&inputs, None).unwrap());
    for (name, t) in &want {
        close(t, &got[name], &format!("{what}: output {name}"));
    }
    for (name, _) in &plan.state_updates {
        let (a, b) = (cpu.read_state(name).unwrap().unwrap(), dev.read_state(name).unwrap().unwrap());
        close(&a, &b, &format!("{what}: state {name} after the step"));
    }
}

/// `e * e[0:1]` and `e[0:2] + e[1:3]`: the result is not written over `e`
/// while the same kernel reads other rows of it.
#[test]
fn an_elementwise_result_is_not_written_over_rows_it_still_reads() {
    let mut g = Graph::new();
    let x = g.add_input("x", Shape::consts(&[4, 64]), DType::F32).unwrap();
    let e = g.add_op(Op::Unary(UnaryOp::Exp), &[x], "").unwrap();
    let first = rows(&mut g, e, 0, 1);
    let y = g.add_op(Op::Binary(BinaryOp::Mul), &[e, first], "").unwrap();
    let z = g.add_op(Op::Unary(UnaryOp::Exp), &[y], "").unwrap();
    g.set_output("z", z);
    agree("e * e[0:1]", &g, &[4, 64], false);
    for (a, b) in [((0, 2), (1, 3)), ((1, 3), (0, 2))] {
        let mut g = Graph::new();
        let x = g.add_input("x", Shape::consts(&[3, 64]), DType::F32).unwrap();
        let e = g.add_op(Op::Unary(UnaryOp::Exp), &[x], "").unwrap();
        let (p, q) = (rows(&mut g, e, a.0, a.1), rows(&mut g, e, b.0, b.1));
        let y = g.add_op(Op::Binary(BinaryOp::Add), &[p, q], "").unwrap();
        let z = g.add_op(Op::Unary(UnaryOp::Exp), &[y], "").unwrap();
        g.set_output("z", z);
        agree(&format!("e[{}:{}] + e[{}:{}]", a.0, a.1, b.0, b.1), &g, &[3, 64], false);
    }
}

/// `w <- w * w[0:1]`: the update is not written over w while it reads w's
/// first row.
#[test]
fn a_state_update_is_not_written_over_rows_of_the_state_it_reads() {
    let mut g = Graph::new();
    let w = g.add_param("w", TensorType::f32(Shape::consts(&[4, 64])), Init::Normal { std: 1.0 }, true, "").unwrap();
    // (x is read by nothing: the update is one kernel reading only w.)
    g.add_input("x", Shape::consts(&[4, 64]), DType::F32).unwrap();
    let first = rows(&mut g, w, 0, 1);
    let new_w = g.add_op(Op::Binary(BinaryOp::Mul), &[w, first], "").unwrap();
    g.add_state_update("w", new_w);
    agree("w <- w * w[0:1]", &g, &[4, 64], true);
}

/// An output that is a view of an updated state (a reshape, a row) is the
/// state before the update; so is a state's update that is a view of
/// another state updated in the same step.
#[test]
fn views_of_an_updated_state_kept_past_the_step_hold_its_old_value() {
    for slice in [false, true] {
        let mut g = Graph::new();
        let w =
            g.add_param("w", TensorType::f32(Shape::consts(&[4, 64])), Init::Normal { std: 1.0 }, true, "").unwrap();
        let x = g.add_input("x", Shape::consts(&[4, 64]), DType::F32).unwrap();
        let view = if slice {
            rows(&mut g, w, 0, 1)
        } else {
            g.add_op(Op::Reshape { shape: Shape::consts(&[256]) }, &[w], "").unwrap()
        };
        let new_w = g.add_op(Op::Binary(BinaryOp::Add), &[w, x], "").unwrap();
        g.add_state_update("w", new_w);
        g.set_output("y", view);
        agree(if slice { "output w[0:1]" } else { "output reshape(w)" }, &g, &[4, 64], true);
    }
    let mut g = Graph::new();
    let p = g.add_param("p", TensorType::f32(Shape::consts(&[4, 64])), Init::Normal { std: 1.0 }, true, "").unwrap();
    let t = g.add_param("t", TensorType::f32(Shape::consts(&[4, 64])), Init::Zeros, false, "").unwrap();
    let x = g.add_input("x", Shape::consts(&[4, 64]), DType::F32).unwrap();
    let copy = g.add_op(Op::StopGradient, &[p], "").unwrap();
    let new_p = g.add_op(Op::Binary(BinaryOp::Add), &[p, x], "").unwrap();
    let y = g.add_op(Op::Binary(BinaryOp::Add), &[t, x], "").unwrap();
    g.set_output("y", y);
    g.add_state_update("t", copy);
    g.add_state_update("p", new_p);
    agree("t <- stop_gradient(p), p <- p + x", &g, &[4, 64], true);
}
