//! bf16 on the CPU backend: a value whose plan dtype is bf16 holds f32
//! numbers that bf16 can hold, rounded to nearest even as
//! `half::bf16::from_f32` rounds (the reference here). Casts, casts inside
//! fused programs, bf16-typed kernel results, an AMP training step (each
//! kernel computes in f32 and only bf16 results are rounded), and gradient
//! clipping under AMP (f32 gradients, f32 coefficient).

use std::collections::BTreeMap;
use tessera_compiler::config;
use tessera_compiler::elaborate::Program;
use tessera_compiler::ir::fused::Instr;
use tessera_compiler::ir::{BinaryOp, DType, Graph, Init, Op, Shape, TensorType};
use tessera_compiler::passes;
use tessera_compiler::pipeline::{training_graph, PassChoice};
use tessera_compiler::plan::{Plan, Source};
use tessera_runtime::cpu::{run_kernel, CpuExecutor, Ctx};
use tessera_runtime::Tensor;

const SEED: u64 = 11;

/// The reference rounding.
fn half_round(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

fn representable(v: f32) -> bool {
    v.is_nan() || half_round(v) == v
}

/// Bitwise equality, any NaN equal to any NaN.
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn consts(dims: &[usize]) -> Shape {
    Shape::consts(&dims.iter().map(|&d| d as u64).collect::<Vec<_>>())
}

/// Runs `g` on the CPU (training mode) with `inputs`; returns its outputs.
fn run_graph(g: &Graph, inputs: &[(&str, Tensor)]) -> BTreeMap<String, Tensor> {
    let plan = tessera_compiler::plan::lower(g, 1, true).unwrap();
    let mut ex = CpuExecutor::new(plan, SEED).unwrap();
    ex.run(inputs).unwrap_or_else(|e| panic!("{e}"))
}

/// Values around the rounding boundaries: between two bf16 numbers, exact
/// ties (to even, both directions), NaNs, infinities, overflow, zeros,
/// subnormals (of f32, and at bf16's own subnormal ties), and plain ones.
fn boundary_values() -> Vec<f32> {
    let ulp = 2f32.powi(-7); // bf16's spacing in [1, 2)
    let mut v = vec![
        1.0 + ulp * 0.25,                 // below the tie: down
        1.0 + ulp * 0.75,                 // above the tie: up
        1.0 + ulp * 0.5,                  // tie, 1.0 even: down
        1.0 + ulp * 1.5,                  // tie, 1 + ulp odd: up to 1 + 2 ulp
        -(1.0 + ulp * 1.5),               // the same, negative
        1.0 + ulp * 0.5 + 2f32.powi(-23), // just above the tie: up
        3.0 + 2f32.powi(-7),              // tie at a larger exponent (spacing 2^-6): down to 3
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7F80_0001), // signalling NaN with a low payload
        f32::from_bits(0x7FFF_FFFF),
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX, // rounds up to infinity
        -f32::MAX,
        f32::from_bits(0x7F7F_7FFF), // the largest that stays finite
        0.0,
        -0.0,
        f32::from_bits(1),           // the smallest subnormal: to zero
        f32::from_bits(0x0000_8000), // a subnormal tie (bf16 0x0000 even): to zero
        f32::from_bits(0x0001_8000), // a subnormal tie (odd): up
        f32::from_bits(0x0040_1234), // a large subnormal
        -f32::from_bits(0x0003_C000),
        f32::MIN_POSITIVE,
        1.9,
        -1.9,
        0.1,
        1e-3,
        65504.5,
        3.0e38,
    ];
    // Scattered bit patterns of every sign and exponent.
    let mut s: u32 = 0x1234_5678;
    for _ in 0..4096 {
        s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        v.push(f32::from_bits(s));
    }
    v
}

#[test]
fn a_cast_to_bf16_rounds_to_nearest_even_as_half_does() {
    let values = boundary_values();
    let n = values.len();
    let mut g = Graph::new();
    let x = g.add_input("x", consts(&[n]), DType::F32).unwrap();
    let b = g.add_op(Op::Cast { dtype: DType::BF16 }, &[x], "t").unwrap();
    let back = g.add_op(Op::Cast { dtype: DType::F32 }, &[b], "t").unwrap();
    let i = g.add_input("i", consts(&[4]), DType::I64).unwrap();
    let ib = g.add_op(Op::Cast { dtype: DType::BF16 }, &[i], "t").unwrap();
    g.set_output("bf16", b);
    g.set_output("f32", back);
    g.set_output("from_i64", ib);
    let out = run_graph(
        &g,
        &[("x", Tensor::f32(vec![n], values.clone())), ("i", Tensor::i64(vec![4], vec![257, 259, -257, 1 << 30]))],
    );
    for (name, t) in [("bf16", &out["bf16"]), ("f32", &out["f32"])] {
        for (v, got) in values.iter().zip(t.as_f32().unwrap()) {
            let want = half_round(*v);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{name}: {v:e} ({:#010x}) -> {got:e}, half gives {want:e}",
                v.to_bits()
            );
        }
    }
    // The ties above land where round-to-nearest-even says.
    let got = out["bf16"].as_f32().unwrap();
    let ulp = 2f32.powi(-7);
    assert_eq!(&got[..7], &[1.0, 1.0 + ulp, 1.0, 1.0 + 2.0 * ulp, -(1.0 + 2.0 * ulp), 1.0 + ulp, 3.0]);
    assert!(got[7..11].iter().all(|v| v.is_nan()), "NaN stays NaN: {:?}", &got[7..11]);
    assert_eq!(got[13], f32::INFINITY, "f32::MAX overflows to infinity");
    // 257 and -257 are ties (to 256, even), 259 rounds up to 260.
    assert_eq!(out["from_i64"].as_f32().unwrap(), &[256.0, 260.0, -256.0, (1u64 << 30) as f32]);
}

#[test]
fn a_bf16_cast_inside_a_fused_program_rounds_its_register() {
    // y = 3x - f32(bf16(3x)): the rounding error of the register, 0 if the
    // cast copied; the unfused ops must give the same bits.
    let n = 2000;
    let x: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.618).sin() * 10.0).collect();
    let body = vec![
        Instr::Operand(0),
        Instr::Scale(3.0, 0),
        Instr::Cast(DType::BF16, 1),
        Instr::Cast(DType::F32, 2),
        Instr::Binary(BinaryOp::Sub, 1, 3),
    ];
    let mut fused = Graph::new();
    let xi = fused.add_input("x", consts(&[n]), DType::F32).unwrap();
    let y = fused.add_op(Op::Fused { body }, &[xi], "t").unwrap();
    fused.set_output("y", y);
    let mut unfused = Graph::new();
    let xi = unfused.add_input("x", consts(&[n]), DType::F32).unwrap();
    let s = unfused.add_op(Op::Scale { factor: 3.0 }, &[xi], "t").unwrap();
    let b = unfused.add_op(Op::Cast { dtype: DType::BF16 }, &[s], "t").unwrap();
    let f = unfused.add_op(Op::Cast { dtype: DType::F32 }, &[b], "t").unwrap();
    let y = unfused.add_op(Op::Binary(BinaryOp::Sub), &[s, f], "t").unwrap();
    unfused.set_output("y", y);
    let input = [("x", Tensor::f32(vec![n], x.clone()))];
    let (yf, yu) = (run_graph(&fused, &input), run_graph(&unfused, &input));
    let (yf, yu) = (yf["y"].as_f32().unwrap(), yu["y"].as_f32().unwrap());
    for i in 0..n {
        let v = x[i] * 3.0;
        let want = v - half_round(v);
        assert!(same(yf[i], want), "fused: x = {}: {} vs {want}", x[i], yf[i]);
        assert!(same(yu[i], want), "unfused: x = {}: {} vs {want}", x[i], yu[i]);
    }
    assert!(yf.iter().filter(|v| **v != 0.0).count() > n / 2, "most registers must have been rounded");
}

#[test]
fn a_bf16_kernel_result_holds_bf16_numbers() {
    // linear(bf16(x), bf16(w)) is bf16: its f32 product rounded once, when stored.
    let (m, k, n) = (5, 33, 7);
    let x: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.37).cos()).collect();
    let w: Vec<f32> = (0..n * k).map(|i| ((i as f32) * 0.11).sin() * 0.5).collect();
    let mut g = Graph::new();
    let xi = g.add_input("x", consts(&[m, k]), DType::F32).unwrap();
    let wi = g.add_input("w", consts(&[n, k]), DType::F32).unwrap();
    let xb = g.add_op(Op::Cast { dtype: DType::BF16 }, &[xi], "t").unwrap();
    let wb = g.add_op(Op::Cast { dtype: DType::BF16 }, &[wi], "t").unwrap();
    let y = g.add_op(Op::Linear, &[xb, wb], "t").unwrap();
    assert_eq!(g.ty(y).dtype, DType::BF16);
    // A bf16 elementwise result too (unfused: its own kernel).
    let z = g.add_op(Op::Binary(BinaryOp::Mul), &[y, y], "t").unwrap();
    g.set_output("y", y);
    g.set_output("z", z);
    let out = run_graph(&g, &[("x", Tensor::f32(vec![m, k], x.clone())), ("w", Tensor::f32(vec![n, k], w.clone()))]);
    let (y, z) = (out["y"].as_f32().unwrap(), out["z"].as_f32().unwrap());
    assert!(y.iter().chain(z).all(|v| representable(*v)), "bf16 results must be bf16 numbers: {y:?}");
    for r in 0..m {
        for c in 0..n {
            // The product of the rounded operands, in f64: the stored value is
            // within half a bf16 ulp (2^-8 relative) of it, plus f32 summation.
            let exact: f64 = (0..k).map(|j| half_round(x[r * k + j]) as f64 * half_round(w[c * k + j]) as f64).sum();
            let got = y[r * n + c] as f64;
            assert!((got - exact).abs() <= exact.abs() * (2f64.powi(-8) + 1e-6) + 1e-6, "y[{r},{c}] {got} vs {exact}");
            assert!(same(z[r * n + c], half_round(y[r * n + c] * y[r * n + c])));
        }
    }
}

#[test]
fn bf16_inputs_states_and_fills_hold_bf16_numbers() {
    let mut g = Graph::new();
    let x = g.add_input("x", consts(&[4]), DType::BF16).unwrap();
    let ty = TensorType::new(consts(&[4]), DType::BF16);
    let p = g.add_param("p", ty.clone(), Init::Normal { std: 1.0 }, true, "t").unwrap();
    let c = g.add_fill(0.1, ty, "t");
    let y = g.add_op(Op::Binary(BinaryOp::Add), &[x, c], "t").unwrap();
    let z = g.add_op(Op::Binary(BinaryOp::Add), &[y, p], "t").unwrap();
    for (name, v) in [("x", x), ("p", p), ("c", c), ("y", y), ("z", z)] {
        g.set_output(name, v);
    }
    let plan = tessera_compiler::plan::lower(&g, 1, true).unwrap();
    let mut ex = CpuExecutor::new(plan, SEED).unwrap();
    // Drawn by the initialiser, then rounded.
    let drawn = ex.state("p").unwrap().as_f32().unwrap().to_vec();
    assert!(drawn.iter().all(|v| representable(*v)) && drawn.iter().any(|v| *v != 0.0), "{drawn:?}");
    // Set from outside: rounded too.
    ex.set_state("p", Tensor::f32(vec![4], vec![0.3, -0.7, 1e-3, 2.5])).unwrap();
    let set = ex.state("p").unwrap().as_f32().unwrap().to_vec();
    assert_eq!(set, [0.3f32, -0.7, 1e-3, 2.5].map(half_round));
    let xs = [1.9f32, 0.1, 3.0, -1.9];
    let out = ex.run(&[("x", Tensor::f32(vec![4], xs.to_vec()))]).unwrap();
    let get = |n: &str| out[n].as_f32().unwrap().to_vec();
    assert_eq!(get("x"), xs.map(half_round));
    assert_eq!(get("c"), vec![half_round(0.1); 4]);
    let y: Vec<f32> = xs.iter().map(|v| half_round(half_round(*v) + half_round(0.1))).collect();
    assert_eq!(get("y"), y);
    let z: Vec<f32> = y.iter().zip(&set).map(|(a, b)| half_round(a + b)).collect();
    assert_eq!(get("z"), z);
}

/// Deterministic inputs for a training plan (data in [-1, 1), labels 0/1,
/// AdamW's scalars of step 1).
fn inputs(plan: &Plan) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for v in &plan.values {
        let Source::Input { name } = &v.source else { continue };
        let shape: Vec<usize> = v.shape.iter().map(|&d| d as usize).collect();
        let n: usize = shape.iter().product();
        let t = match name.as_str() {
            s if s.starts_with("optim.bias_correction1") => Tensor::f32(shape, vec![0.1]),
            s if s.starts_with("optim.bias_correction2") => Tensor::f32(shape, vec![0.001]),
            s if s.starts_with("optim.lr.") => Tensor::f32(shape, vec![1e-3]),
            s if s.starts_with("optim.weight_decay.") => Tensor::f32(shape, vec![0.05]),
            _ if !v.dtype.is_float() => Tensor::i64(shape, (0..n as i64).map(|i| i % 2).collect()),
            _ => {
                let salt = name.len() as u64;
                let vals = (0..n as u64).map(|i| ((i * 2_654_435_761 + salt * 97) % 1000) as f32 / 500.0 - 1.0);
                Tensor::f32(shape, vals.collect())
            }
        };
        out.push((name.clone(), t));
    }
    out
}

/// The training-step plan of `name` after `pass_names`, batch 2.
fn step_plan(name: &str, overrides: &[&str], pass_names: Vec<&str>) -> Plan {
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let cfg = config::load(name, &ov).unwrap();
    let prog = Program::load(&[]).unwrap();
    let (step, _, _) = training_graph(&prog, cfg.tree(), PassChoice::passes(pass_names)).unwrap();
    tessera_compiler::plan::lower(&step, 2, true).unwrap()
}

/// The AMP pipeline up to mixed precision, without elementwise and
/// optimizer fusion: every elementwise op is its own kernel.
fn amp_unfused() -> Vec<&'static str> {
    passes::default_for(true).into_iter().filter(|p| !matches!(*p, "fuse-elementwise" | "fuse-optimizer")).collect()
}

/// One step of `plan` with every value also an output (`v<index>`), but
/// the packed results of multi-tensor kernels (only their parts are stored).
fn run_exposed(mut plan: Plan) -> (Plan, BTreeMap<String, Tensor>) {
    for i in 0..plan.values.len() {
        let packed =
            matches!(plan.values[i].source, Source::Kernel(k) if matches!(plan.kernels[k].op, Op::MultiTensor { .. }));
        if !packed {
            plan.outputs.push((format!("v{i}"), i));
        }
    }
    let mut ex = CpuExecutor::new(plan.clone(), SEED).unwrap();
    let owned = inputs(ex.plan());
    let given: Vec<(&str, Tensor)> = owned.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let out = ex.run(&given).unwrap_or_else(|e| panic!("{e}"));
    (plan, out)
}

#[test]
fn an_amp_step_is_the_f32_computation_with_bf16_results_rounded() {
    let amp = ["MODEL.AMP_PARAMS.USE_AMP=true"];
    let (plan, out) = run_exposed(step_plan("quickstart/vit_tiny", &amp, amp_unfused()));
    let value = |i: usize| &out[&format!("v{i}")];
    let ctx = Ctx::single(true, SEED, 0);
    let (mut low, mut moved) = (0, 0);
    for (k, kernel) in plan.kernels.iter().enumerate() {
        // Each kernel again, on the operands the step gave it, in f32 (a
        // fused product still rounds its transformed operand to the
        // product's bf16 input, as it is defined to).
        let xs: Vec<&Tensor> = kernel.inputs.iter().map(|&i| value(i)).collect();
        let typed = tessera_runtime::cpu::typed(&ctx, &plan, k);
        let f32_result = run_kernel(&kernel.op, &xs, &typed).unwrap_or_else(|e| panic!("kernel {k}: {e}"));
        let got = value(kernel.output).as_f32();
        let (Some(got), Some(want)) = (got, f32_result.as_f32()) else { continue };
        let bf16 = plan.values[kernel.output].dtype == DType::BF16;
        for (j, (g, w)) in got.iter().zip(want).enumerate() {
            // bf16 results: that f32 value rounded; f32 results: unchanged.
            let w = if bf16 { half_round(*w) } else { *w };
            assert!(same(*g, w), "kernel {k} ({} in {}) element {j}: {g} vs {w}", kernel.op.name(), kernel.scope);
        }
        if bf16 {
            low += 1;
            moved += usize::from(want.iter().any(|w| !representable(*w)));
        }
    }
    assert!(low > 20, "only {low} bf16 kernels");
    assert!(moved > 10, "the rounding changed only {moved} kernels' results");
    // Every bf16 value, leaves included, holds bf16 numbers.
    for (i, v) in plan.values.iter().enumerate() {
        if v.dtype == DType::BF16 {
            assert!(value(i).as_f32().unwrap().iter().all(|x| representable(*x)), "value {i} {:?}", v.source);
        }
    }
    // Against the f32 plan: the loss moves by bf16 roundings, not more.
    let (_, f32_out) = run_exposed(step_plan("quickstart/vit_tiny", &amp, passes::FORWARD.to_vec()));
    let (a, b) = (out["loss"].as_f32().unwrap()[0], f32_out["loss"].as_f32().unwrap()[0]);
    assert!(a != b && (a - b).abs() <= 1e-2 * b.abs(), "AMP loss {a} vs f32 loss {b}");
}

#[test]
fn a_fused_amp_step_stores_bf16_numbers_in_every_bf16_value() {
    let amp = ["MODEL.AMP_PARAMS.USE_AMP=true"];
    // vit_example_head clips its gradients: the f32 clip still fuses.
    for name in ["quickstart/deit_tiny", "quickstart/vit_example_head"] {
        let (plan, out) = run_exposed(step_plan(name, &amp, passes::default_for(true)));
        let multi = plan.kernels.iter().filter(|k| matches!(k.op, Op::MultiTensor { .. })).count();
        assert_eq!(multi, 1, "{name}: one optimizer kernel");
        let mut bf16 = 0;
        for (i, v) in plan.values.iter().enumerate() {
            if v.dtype == DType::BF16 {
                bf16 += 1;
                let t = out[&format!("v{i}")].as_f32().unwrap();
                assert!(t.iter().all(|x| representable(*x)), "{name}: value {i} ({:?}) is not bf16", v.source);
            }
        }
        assert!(bf16 > 10, "{name}: {bf16} bf16 values");
        assert!(out["loss"].as_f32().unwrap()[0].is_finite(), "{name}");
    }
}

#[test]
fn amp_clipping_scales_the_f32_gradients_by_an_f32_coefficient() {
    // A small max norm, so that the coefficient is well below 1.
    let overrides = ["MODEL.AMP_PARAMS.USE_AMP=true", "MODEL.GRAD_CLIP.MAX_NORM=0.01"];
    let (plan, out) = run_exposed(step_plan("quickstart/vit_example_head", &overrides, amp_unfused()));
    let value = |i: usize| &out[&format!("v{i}")];
    let kernel_of = |v: usize| match plan.values[v].source {
        Source::Kernel(k) => Some(&plan.kernels[k]),
        _ => None,
    };
    let grads: Vec<(&String, usize)> =
        plan.outputs.iter().filter(|(n, _)| n.starts_with("grad.")).map(|(n, v)| (n, *v)).collect();
    assert!(grads.len() > 10, "{} gradients", grads.len());
    // Every clipped gradient: mul(g, coef) in f32, one coefficient for all.
    let mut coef = None;
    let mut sum_sq = 0f64;
    let mut from_bf16 = 0;
    for (name, v) in &grads {
        let k = kernel_of(*v).unwrap_or_else(|| panic!("{name} is not computed"));
        assert!(matches!(k.op, Op::Binary(BinaryOp::Mul)), "{name} is {}", k.op.name());
        let [g, c] = k.inputs[..] else { panic!("{name}: a mul of two operands") };
        assert_eq!(
            (plan.values[*v].dtype, plan.values[g].dtype, plan.values[c].dtype),
            (DType::F32, DType::F32, DType::F32),
            "{name}"
        );
        assert_eq!(*coef.get_or_insert(c), c, "{name}: one clip coefficient");
        // A gradient made in bf16 is read through its cast to f32.
        if let Some(cast) = kernel_of(g).filter(|k| matches!(k.op, Op::Cast { .. })) {
            let src = cast.inputs[0];
            assert_eq!(plan.values[src].dtype, DType::BF16, "{name}");
            assert_eq!(value(g), value(src), "{name}: the f32 cast keeps the bf16 values");
            from_bf16 += 1;
        }
        let (gv, cv, clipped) =
            (value(g).as_f32().unwrap(), value(c).as_f32().unwrap()[0], value(*v).as_f32().unwrap());
        sum_sq += gv.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
        for (x, y) in gv.iter().zip(clipped) {
            assert!(same(*y, x * cv), "{name}: {y} is not {x} * {cv} in f32");
        }
    }
    assert!(from_bf16 > 5, "only {from_bf16} gradients come from bf16 products");
    // The coefficient: clip_grad_norm_'s, from the f32 gradients, never rounded.
    let c = value(coef.unwrap()).as_f32().unwrap()[0];
    let want = (0.01 / (sum_sq.sqrt() + 1e-6)).min(1.0);
    assert!(((c as f64) - want).abs() <= 1e-5 * want, "coefficient {c} vs {want}");
    assert!(c < 0.5 && !representable(c), "the check needs a coefficient below 1 that bf16 cannot hold: {c}");
    // Nothing in the plan multiplies by the coefficient in bf16 or casts it.
    for k in &plan.kernels {
        if k.inputs.contains(&coef.unwrap()) {
            assert_eq!(plan.values[k.output].dtype, DType::F32, "{} reads the coefficient in {}", k.op.name(), k.scope);
        }
    }
}
