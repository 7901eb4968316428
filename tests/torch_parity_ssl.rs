//! The self-supervised losses of `models/losses/` against libtorch, forward
//! and backward: `moco_loss`, `simclr_info_nce_loss`, `swav_loss` (with its
//! Sinkhorn-Knopp codes and its embedding queue) and
//! `cross_entropy_multiple_output_single_target`.
//!
//! tessera's side elaborates only the loss block (no model): its tensor
//! arguments are trainable parameters of a graph (so that autodiff gives
//! `grad.<name>`) or graph inputs, the CPU pass pipeline runs, and the CPU
//! executor runs the plan, whose buffers (queues) are set with `set_state`.
//! libtorch's side is written from VISSL's formulas
//! (/work/shared/reference/vissl-semantics.md 4.1-4.4), not from the .tsr
//! files: explicit positive and negative masks for SimCLR, VISSL's
//! `distributed_sinkhornknopp` step by step for SwAV, `F.cross_entropy` for
//! the supervised loss. It runs in float64 on tessera's float32 values.
//!
//! Tolerance: every element within `RTOL * (|torch| + max |torch|)` (a loss
//! value: relative 2e-5). `--nocapture` prints each comparison's largest
//! difference.
//!
//! Run: `eval "$(./scripts/setup-libtorch.sh)" && cargo test --release --features torch-oracle --test torch_parity_ssl -- --nocapture`
#![cfg(feature = "torch-oracle")]

#[path = "oracle/models.rs"]
mod models;
mod oracle;

use models::{labels, normal_values, soft_targets};
use oracle::{check_close_f64, tensor_from_f64, to_vec_f64};
use std::collections::BTreeMap;
use tch::{Device, Kind, Reduction, Tensor as TT};
use tessera_compiler::autodiff::backward;
use tessera_compiler::config;
use tessera_compiler::elaborate::{Elab, Program, Val, V};
use tessera_compiler::ir::{DType, Init, Shape, TensorType};
use tessera_compiler::passes;
use tessera_compiler::syntax::ast::BlockKind;
use tessera_runtime::cpu::CpuExecutor;
use tessera_runtime::Tensor;

const RTOL: f64 = 1e-5;

// ---------------------------------------------------------------------------
// tessera: one loss block, elaborated on its own.

/// The arguments of one block call, built on the elaborator's graph.
struct Call<'a, 'p> {
    el: &'a mut Elab<'p>,
    /// Parameter values to load into the executor.
    state: Vec<(String, Tensor)>,
    pos: Vec<Val>,
    named: Vec<(String, Val)>,
}

impl Call<'_, '_> {
    /// A trainable parameter `name` of `shape` holding `values` (it gets a
    /// gradient `grad.<name>` when the output depends on it).
    fn param(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Val {
        let ty = TensorType::f32(Shape::consts(&shape.iter().map(|&d| d as u64).collect::<Vec<_>>()));
        let id = self.el.graph.add_param(name, ty, Init::Zeros, true, "").unwrap_or_else(|e| panic!("{name}: {e}"));
        self.state.push((name.to_string(), Tensor::f32(shape.to_vec(), values.to_vec())));
        Val::new(V::Tensor(id))
    }

    /// A float32 graph input `name` of `shape` (given to each run).
    fn input(&mut self, name: &str, shape: &[usize]) -> Val {
        let s = Shape::consts(&shape.iter().map(|&d| d as u64).collect::<Vec<_>>());
        let id = self.el.graph.add_input(name, s, DType::F32).unwrap_or_else(|e| panic!("{name}: {e}"));
        Val::new(V::Tensor(id))
    }

    fn arg(&mut self, name: &str, v: Val) {
        self.named.push((name.to_string(), v));
    }
}

fn float(x: f64) -> Val {
    Val::new(V::Float(x))
}

fn boolean(b: bool) -> Val {
    Val::new(V::Bool(b))
}

fn ints(xs: &[usize]) -> Val {
    Val::list(xs.iter().map(|&x| Val::int(x as i64)).collect())
}

/// A compiled block: its executor and the names of the parameters that got a gradient.
struct Lowered {
    ex: CpuExecutor,
    grads: Vec<String>,
}

impl Lowered {
    fn run(&mut self, inputs: &[(&str, Tensor)]) -> BTreeMap<String, Tensor> {
        self.ex.run(inputs).unwrap_or_else(|e| panic!("run: {e}"))
    }

    fn set(&mut self, name: &str, t: Tensor) {
        self.ex.set_state(name, t).unwrap_or_else(|e| panic!("set_state {name}: {e}"));
    }

    fn state(&self, name: &str) -> &Tensor {
        self.ex.state(name).unwrap_or_else(|| panic!("no state `{name}`; states: {:?}", self.ex.state_names()))
    }
}

/// Elaborates the loss `loss` (or, with `block`, that block of the loss's
/// file) under scope `loss`, called with the arguments `args` builds. Its
/// result is the output `out`; with `differentiate`, also `grad.<param>`.
/// Then the CPU pass pipeline, lowering in training mode and an executor
/// with the parameters' values.
fn compile(loss: &str, block: Option<&str>, differentiate: bool, args: impl FnOnce(&mut Call)) -> Lowered {
    let prog = Program::load(&[]).unwrap_or_else(|d| panic!("model files: {d}"));
    let cfg = config::defaults();
    let loss_ref = prog.registered(BlockKind::Loss, loss).unwrap_or_else(|| panic!("no loss `{loss}`"));
    let r = match block {
        Some(b) => prog.lookup(loss_ref.file, b).unwrap_or_else(|| panic!("no block `{b}` in the file of `{loss}`")),
        None => loss_ref,
    };
    let mut el = Elab::new(&prog, cfg);
    let mut call = Call { el: &mut el, state: Vec::new(), pos: Vec::new(), named: Vec::new() };
    args(&mut call);
    let Call { state, pos, named, .. } = call;
    let span = prog.block(r).span;
    let pos = pos.into_iter().map(|v| (v, span)).collect();
    let named = named.into_iter().map(|(n, v)| (n, v, span)).collect();
    let what = block.unwrap_or(loss);
    let v = el.call_block(r, pos, named, "loss".to_string(), None).unwrap_or_else(|d| panic!("{what}: {d}"));
    let V::Tensor(out) = v.v else { panic!("{what} returned a {}, not a tensor", v.type_name()) };
    let mut g = el.graph;
    g.set_output("out", out);
    let mut grads = Vec::new();
    if differentiate {
        for (name, d) in backward(&mut g, out).unwrap_or_else(|e| panic!("{what}: backward: {e}")) {
            g.set_output(&format!("grad.{name}"), d);
            grads.push(name);
        }
    }
    passes::run(&mut g, &passes::default_for_cpu(), true, |_, _| {}).unwrap_or_else(|e| panic!("{what}: passes: {e}"));
    let plan = tessera_compiler::plan::lower(&g, 1, true).unwrap_or_else(|e| panic!("{what}: lower: {e}"));
    let mut ex = CpuExecutor::new(plan, 0).unwrap_or_else(|e| panic!("{what}: executor: {e}"));
    for (name, t) in state {
        ex.set_state(&name, t).unwrap_or_else(|e| panic!("{what}: set_state {name}: {e}"));
    }
    Lowered { ex, grads }
}

// ---------------------------------------------------------------------------
// Comparisons.

/// The comparisons of one test: each is printed; failures are collected and
/// reported together by `finish`.
struct Report {
    name: &'static str,
    failures: Vec<String>,
}

impl Report {
    fn new(name: &'static str) -> Report {
        Report { name, failures: Vec::new() }
    }

    /// tessera's tensor against libtorch's (any float kind): shapes equal and
    /// every element within `RTOL * (|e| + max |e|)`.
    fn compare(&mut self, what: &str, actual: &Tensor, expected: &TT) {
        let want: Vec<i64> = actual.shape.iter().map(|&d| d as i64).collect();
        if expected.size() != want {
            self.failures.push(format!("{what}: shape: tessera {:?}, libtorch {:?}", actual.shape, expected.size()));
            return;
        }
        let a: Vec<f64> = actual.as_f32().expect("an f32 result").iter().map(|&x| x as f64).collect();
        self.compare_values(what, &a, &to_vec_f64(expected), RTOL);
    }

    /// As `compare`, on values, with relative tolerance `rtol`.
    fn compare_values(&mut self, what: &str, actual: &[f64], expected: &[f64], rtol: f64) {
        let scale = expected.iter().fold(0.0f64, |m, e| m.max(e.abs()));
        // NaN propagates into the printed difference.
        let diff = actual.iter().zip(expected).fold(0.0f64, |m, (a, e)| {
            let d = (a - e).abs();
            if d.is_nan() || d > m {
                d
            } else {
                m
            }
        });
        println!(
            "{:<10} {what:<58} max |diff| {diff:.2e}, / max |torch| {:.2e}",
            self.name,
            if scale > 0.0 { diff / scale } else { diff }
        );
        if let Err(msg) = check_close_f64(actual, expected, rtol, rtol * scale, &format!("{}: {what}", self.name)) {
            self.failures.push(msg);
        }
    }

    /// A named check that is not a comparison with libtorch.
    fn check(&mut self, ok: bool, msg: String) {
        println!("{:<10} {} {msg}", self.name, if ok { "ok  " } else { "FAIL" });
        if !ok {
            self.failures.push(format!("{}: {msg}", self.name));
        }
    }

    /// The gradient of `param` is libtorch's `leaf.grad()`.
    fn compare_grad(&mut self, what: &str, lw: &Lowered, out: &BTreeMap<String, Tensor>, param: &str, leaf: &TT) {
        let grad = leaf.grad();
        assert!(grad.defined(), "{}: {what}: libtorch gives no gradient for `{param}`", self.name);
        match out.get(&format!("grad.{param}")) {
            Some(g) => self.compare(&format!("{what}: d loss / d {param}"), g, &grad),
            None => self.failures.push(format!(
                "{}: {what}: tessera gives no gradient for `{param}` (it gives {:?})",
                self.name, lw.grads
            )),
        }
    }

    /// `param` gets no gradient (none at all, or an all-zero one).
    fn no_grad(&mut self, what: &str, out: &BTreeMap<String, Tensor>, param: &str) {
        let max = out
            .get(&format!("grad.{param}"))
            .map_or(0.0f32, |g| g.as_f32().expect("an f32 gradient").iter().fold(0.0f32, |m, x| m.max(x.abs())));
        self.check(max == 0.0, format!("{what}: `{param}` gets no gradient (max |grad| {max:e})"));
    }

    #[track_caller]
    fn finish(self) {
        assert!(self.failures.is_empty(), "{} mismatches:\n{}", self.failures.len(), self.failures.join("\n"));
    }
}

/// The scalar output `out`.
fn scalar(out: &BTreeMap<String, Tensor>) -> f64 {
    match out["out"].as_f32() {
        Some([v]) => *v as f64,
        _ => panic!("`out` is not a float scalar: {}", out["out"].describe()),
    }
}

fn i64s(s: &[usize]) -> Vec<i64> {
    s.iter().map(|&d| d as i64).collect()
}

/// An f64 libtorch tensor of tessera's f32 `values`.
fn t64(values: &[f32], shape: &[usize]) -> TT {
    tensor_from_f64(&values.iter().map(|&x| x as f64).collect::<Vec<_>>(), &i64s(shape))
}

/// As `t64`, a leaf that records its gradient.
fn leaf(values: &[f32], shape: &[usize]) -> TT {
    t64(values, shape).set_requires_grad(true)
}

/// Rows of `x` divided by their L2 norm (F.normalize, dim 1).
fn l2n(x: &TT) -> TT {
    x / x.norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-12)
}

fn sum_dim(x: &TT, dim: i64, keepdim: bool) -> TT {
    x.sum_dim_intlist([dim].as_slice(), keepdim, Kind::Double)
}

/// Standard-normal values `[rows, cols]` whose columns (`by_column`) or rows
/// have unit L2 norm, in f32.
fn unit_vectors(seed: u64, rows: usize, cols: usize, by_column: bool) -> Vec<f32> {
    let t = t64(&normal_values(seed, rows * cols), &[rows, cols]);
    let t = if by_column { l2n(&t.tr()).tr() } else { l2n(&t) };
    to_vec_f64(&t).iter().map(|&x| x as f32).collect()
}

/// Cosine scores `[rows, k]` of random unit embeddings against random unit
/// prototypes, in [-1, 1] like a swav_head's.
fn cosine_scores(seed: u64, rows: usize, k: usize) -> Vec<f32> {
    let e = 16;
    let z = t64(&unit_vectors(seed, rows, e, false), &[rows, e]);
    let p = t64(&unit_vectors(seed + 1, k, e, false), &[k, e]);
    to_vec_f64(&z.mm(&p.tr())).iter().map(|&x| x as f32).collect()
}

fn f32_tensor(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::f32(shape.to_vec(), values.to_vec())
}

fn i64_scalar(t: &Tensor) -> i64 {
    match t.as_i64() {
        Some([v]) => *v,
        _ => panic!("not an i64 scalar: {}", t.describe()),
    }
}

// ---------------------------------------------------------------------------
// MoCo (reference 4.1).

/// VISSL's `moco_loss` on f64 leaves: q normalised, keys normalised and
/// detached, [l_pos, l_neg] / T, cross-entropy against index 0.
fn moco_reference(q: &TT, keys: &TT, queue: &TT, temperature: f64) -> TT {
    let q = l2n(q);
    let k = l2n(keys).detach();
    let l_pos = sum_dim(&(&q * &k), 1, true);
    let l_neg = q.mm(&queue.detach());
    let logits = TT::cat(&[l_pos, l_neg], 1) / temperature;
    let target = TT::zeros([q.size()[0]], (Kind::Int64, Device::Cpu));
    logits.cross_entropy_loss::<TT>(&target, None, Reduction::Mean, -100, 0.0)
}

#[test]
fn moco_loss_and_queue_match_libtorch_step_by_step() {
    let (n, e, k, temperature) = (8usize, 16usize, 32usize, 0.2);
    let mut r = Report::new("moco");
    let mut lw = compile("moco_loss", None, true, |c| {
        let q = c.param("q", &[n, e], &vec![0.0; n * e]);
        let keys = c.param("keys", &[n, e], &vec![0.0; n * e]);
        c.pos.extend([q, keys]);
        c.arg("embedding_dim", Val::int(e as i64));
        c.arg("queue_size", Val::int(k as i64));
        c.arg("temperature", float(temperature));
        c.arg("batch", Val::int(n as i64));
        c.arg("world", Val::int(1));
    });
    // A queue of unit columns and a pointer 3 batches in: step 1 fills the
    // last batch of columns and wraps the pointer to 0, step 2 the first.
    let queue0 = unit_vectors(40, e, k, true);
    let mut queue = t64(&queue0, &[e, k]);
    let mut ptr = 3 * n;
    lw.set("loss.queue", f32_tensor(&queue0, &[e, k]));
    lw.set("loss.queue_ptr", Tensor::scalar_i64(ptr as i64));
    for step in 0..2u64 {
        let qv = normal_values(41 + 2 * step, n * e);
        let kv = normal_values(42 + 2 * step, n * e);
        lw.set("q", f32_tensor(&qv, &[n, e]));
        lw.set("keys", f32_tensor(&kv, &[n, e]));
        let out = lw.run(&[]);
        let (q, keys) = (leaf(&qv, &[n, e]), leaf(&kv, &[n, e]));
        let loss = moco_reference(&q, &keys, &queue, temperature);
        loss.backward();
        let what = format!("step {step}");
        r.compare_values(&format!("{what}: loss"), &[scalar(&out)], &to_vec_f64(&loss), RTOL);
        r.compare_grad(&what, &lw, &out, "q", &q);
        r.no_grad(&what, &out, "keys");

        // Enqueue: the normalised keys in columns ptr..ptr+N, ptr += N mod K.
        let cols = TT::arange_start(ptr as i64, (ptr + n) as i64, (Kind::Int64, Device::Cpu));
        queue = queue.index_copy(1, &cols, &l2n(&t64(&kv, &[n, e])).tr());
        ptr = (ptr + n) % k;
        r.compare(&format!("{what}: queue after the step"), lw.state("loss.queue"), &queue);
        let got = i64_scalar(lw.state("loss.queue_ptr"));
        r.check(got == ptr as i64, format!("{what}: queue_ptr after the step is {got}, expected {ptr}"));
    }
    r.finish();
}

// ---------------------------------------------------------------------------
// SimCLR (reference 4.3).

/// Positive and negative masks `[2n, 2n]` from each row's partner: the
/// positive is the partner's column; the negatives every column but the
/// row's own and its partner's (`include_self`: but the partner's only).
fn simclr_masks(partner: &[usize], include_self: bool) -> (TT, TT) {
    let m = partner.len();
    let (mut pos, mut neg) = (vec![0.0; m * m], vec![0.0; m * m]);
    for (row, &p) in partner.iter().enumerate() {
        pos[row * m + p] = 1.0;
        for col in 0..m {
            if col != p && (col != row || include_self) {
                neg[row * m + col] = 1.0;
            }
        }
    }
    (tensor_from_f64(&pos, &[m as i64, m as i64]), tensor_from_f64(&neg, &[m as i64, m as i64]))
}

/// VISSL's partners for the view-major batch [n images view 0; the same n view 1].
fn view_major(n: usize) -> Vec<usize> {
    (0..2 * n).map(|i| (i + n) % (2 * n)).collect()
}

/// VISSL's `simclr_info_nce_loss` with masks: S = exp(z z^T / T) without
/// max subtraction, loss = -mean log(pos / (pos + sum neg)).
fn simclr_reference(z: &TT, masks: &(TT, TT), temperature: f64) -> TT {
    let z = l2n(z);
    let sim = (z.mm(&z.tr()) / temperature).exp();
    let pos = sum_dim(&(&sim * &masks.0), 1, false);
    let neg = sum_dim(&(&sim * &masks.1), 1, false);
    -(&pos / (&pos + neg)).log().mean(Kind::Double)
}

/// tessera's `simclr_info_nce_loss` on a parameter `z` [2n, e].
fn simclr_tessera(n: usize, e: usize, temperature: f64) -> Lowered {
    compile("simclr_info_nce_loss", None, true, |c| {
        let z = c.param("z", &[2 * n, e], &vec![0.0; 2 * n * e]);
        c.pos.push(z);
        c.arg("temperature", float(temperature));
        c.arg("embedding_dim", Val::int(e as i64));
        c.arg("world", Val::int(1));
    })
}

/// tessera's loss on `z`, with the output map.
fn run_with_z(lw: &mut Lowered, z: &[f32], shape: &[usize]) -> BTreeMap<String, Tensor> {
    lw.set("z", f32_tensor(z, shape));
    lw.run(&[])
}

/// Loss and gradient at temperatures 0.2, 0.1 (the ViT configs') and 0.05.
/// The row's own similarity, exp(1/T), dominates it: a denominator that
/// subtracts it from the full row sum (tessera's first version) was off by
/// 1.5e-5 at T = 0.1 and NaN at 0.05; the loss now leaves it out
/// (`zero_diagonal`), as VISSL's negative mask does.
#[test]
fn simclr_info_nce_loss_matches_libtorch() {
    let mut r = Report::new("simclr");
    for (n, e, temperature, seed) in
        [(6usize, 16usize, 0.1, 50u64), (16, 128, 0.1, 51), (16, 128, 0.2, 52), (16, 128, 0.05, 53)]
    {
        let mut lw = simclr_tessera(n, e, temperature);
        let masks = simclr_masks(&view_major(n), false);
        let zv = normal_values(seed, 2 * n * e);
        let out = run_with_z(&mut lw, &zv, &[2 * n, e]);
        let z = leaf(&zv, &[2 * n, e]);
        let loss = simclr_reference(&z, &masks, temperature);
        loss.backward();
        let what = format!("n {n}, E {e}, T {temperature}");
        r.compare_values(&format!("{what}: loss"), &[scalar(&out)], &to_vec_f64(&loss), RTOL);
        r.compare_grad(&what, &lw, &out, "z", &z);
    }
    r.finish();
}

/// The masks' meaning on 3 images: the positive of a row is the row at the
/// same index in the other view, and neither self nor the positive is a
/// negative; how images are ordered within the views does not matter.
/// Temperature 0.5 keeps this about the masks: at 0.1 and below tessera's
/// rounding error grows (see `simclr_info_nce_loss_matches_libtorch`).
#[test]
fn simclr_masks_pair_same_image_other_view() {
    let (n, e, temperature) = (3usize, 8usize, 0.5);
    let mut r = Report::new("simclr-mask");
    let mut lw = simclr_tessera(n, e, temperature);
    let shape = [2 * n, e];
    // Views of the same image correlate (view 1 = view 0 + noise), as augmentations do.
    let v0 = normal_values(60, n * e);
    let noise = normal_values(61, n * e);
    let mut zv = v0.clone();
    zv.extend(v0.iter().zip(&noise).map(|(a, b)| a + 0.5 * b));
    let z = t64(&zv, &shape);
    let base = scalar(&run_with_z(&mut lw, &zv, &shape));
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs();

    let vissl = simclr_reference(&z, &simclr_masks(&view_major(n), false), temperature).double_value(&[]);
    r.compare_values("loss vs VISSL's masks", &[base], &[vissl], RTOL);
    // The comparison tells layouts and self-exclusion apart.
    let interleaved: Vec<usize> = (0..2 * n).map(|i| i ^ 1).collect();
    for (name, partner, include_self) in
        [("image-major partners", interleaved, false), ("self among the negatives", view_major(n), true)]
    {
        let other = simclr_reference(&z, &simclr_masks(&partner, include_self), temperature).double_value(&[]);
        r.check(
            rel(base, other) > 1e-2,
            format!("masks with {name} give another loss ({other:.6} vs {base:.6}, rel {:.1e})", rel(base, other)),
        );
    }

    // The same permutation of images in both views: the same loss.
    let sigma = [2usize, 0, 1];
    let permute = |z: &[f32], views: &[usize]| -> Vec<f32> {
        let mut out = z.to_vec();
        for &v in views {
            for (j, &s) in sigma.iter().enumerate() {
                let (to, from) = ((v * n + j) * e, (v * n + s) * e);
                out[to..to + e].copy_from_slice(&z[from..from + e]);
            }
        }
        out
    };
    let both = scalar(&run_with_z(&mut lw, &permute(&zv, &[0, 1]), &shape));
    r.check(rel(both, base) < 1e-5, format!("images permuted in both views: loss {both:.7} = {base:.7}"));

    // Only view 1 permuted: row i's positive is now image sigma(i)'s second
    // view, i.e. VISSL's loss on the original batch with those partners.
    let swapped = scalar(&run_with_z(&mut lw, &permute(&zv, &[1]), &shape));
    r.check(rel(swapped, base) > 1e-2, format!("view 1 alone permuted changes the loss ({swapped:.6} vs {base:.6})"));
    let mut partner = vec![0; 2 * n];
    for (i, &s) in sigma.iter().enumerate() {
        partner[i] = n + s;
        partner[n + s] = i;
    }
    let expected = simclr_reference(&z, &simclr_masks(&partner, false), temperature).double_value(&[]);
    r.compare_values("view 1 permuted vs masks pairing i with sigma(i)", &[swapped], &[expected], RTOL);
    r.finish();
}

// ---------------------------------------------------------------------------
// SwAV (reference 4.2; docs/divergences.md on Sinkhorn).

/// VISSL's `distributed_sinkhornknopp` on one rank in float64, as written:
/// Q = exp(S / eps)^T, Q /= sum Q, r = 1/K, c = 1/B; per iteration
/// Q *= r / (row sums), Q *= c / (column sums); then each column divided by
/// its sum, transposed. `scores` [B, K] -> codes [B, K].
fn sinkhorn_reference(scores: &TT, epsilon: f64, num_iters: usize) -> TT {
    let q = (scores.detach().to_kind(Kind::Double) / epsilon).exp().tr();
    let mut q = &q / q.sum(Kind::Double);
    let (k, b) = (q.size()[0], q.size()[1]);
    let opts = (Kind::Double, Device::Cpu);
    let r = TT::ones([k], opts) / k as f64;
    let c = TT::ones([b], opts) / b as f64;
    let mut curr_sum = sum_dim(&q, 1, false);
    for _ in 0..num_iters {
        let u = curr_sum;
        q = &q * (&r / u).unsqueeze(1);
        q = &q * (&c / sum_dim(&q, 0, false)).unsqueeze(0);
        curr_sum = sum_dim(&q, 1, false);
    }
    (&q / sum_dim(&q, 0, true)).tr()
}

#[derive(Clone, Debug)]
struct Swav {
    crops: usize,
    batch: usize,
    embedding: usize,
    /// Prototypes per head.
    heads: Vec<usize>,
    assign: Vec<usize>,
    num_iters: usize,
    epsilon: f64,
    temperature: f64,
    /// The queue length (0: no queue).
    queue: usize,
}

impl Swav {
    fn new(crops: usize, heads: &[usize]) -> Swav {
        Swav {
            crops,
            batch: 8,
            embedding: 16,
            heads: heads.to_vec(),
            assign: vec![0, 1],
            num_iters: 3,
            epsilon: 0.05,
            temperature: 0.1,
            queue: 0,
        }
    }

    fn rows(&self) -> usize {
        self.crops * self.batch
    }

    fn name(&self) -> String {
        format!("{} crops, {} heads, {} iters, queue {}", self.crops, self.heads.len(), self.num_iters, self.queue)
    }
}

/// VISSL's swav_loss from the scores of each head (leaves): per head and
/// assignment crop a, codes of crop a's scores (with `queue_scores(h, i)`
/// appended as extra Sinkhorn rows, only the batch's codes kept), then the
/// mean over the other crops p of -mean_b sum_k q log softmax(scores_p / T);
/// averaged over assignment crops, then heads.
fn swav_reference(s: &Swav, scores: &[TT], queue_scores: impl Fn(usize, usize) -> Option<TT>) -> TT {
    let b = s.batch as i64;
    let mean = |terms: Vec<TT>| TT::stack(&terms, 0).mean(Kind::Double);
    let heads = scores.iter().enumerate().map(|(h, sc)| {
        let crops = s.assign.iter().enumerate().map(|(i, &a)| {
            let mine = sc.narrow(0, a as i64 * b, b).detach();
            let rows = match queue_scores(h, i) {
                Some(q) => TT::cat(&[mine, q], 0),
                None => mine,
            };
            let codes = sinkhorn_reference(&rows, s.epsilon, s.num_iters).narrow(0, 0, b);
            let others = (0..s.crops).filter(|&p| p != a).map(|p| {
                let logp = (sc.narrow(0, p as i64 * b, b) / s.temperature).log_softmax(1, Kind::Double);
                -sum_dim(&(&codes * logp), 1, false).mean(Kind::Double)
            });
            mean(others.collect())
        });
        mean(crops.collect())
    });
    mean(heads.collect())
}

/// tessera's swav_loss with parameters `z` and `scores<h>` (and, with a
/// queue, `prototypes<h>`).
fn swav_tessera(s: &Swav, z: &[f32], scores: &[Vec<f32>], prototypes: &[Vec<f32>]) -> Lowered {
    compile("swav_loss", None, true, |c| {
        let mut output = vec![c.param("z", &[s.rows(), s.embedding], z)];
        for (h, (&k, v)) in s.heads.iter().zip(scores).enumerate() {
            output.push(c.param(&format!("scores{h}"), &[s.rows(), k], v));
        }
        c.pos.push(Val::list(output));
        let protos: Vec<Val> = (s.heads.iter().zip(prototypes).enumerate())
            .map(|(h, (&k, v))| c.param(&format!("prototypes{h}"), &[k, s.embedding], v))
            .collect();
        c.arg("prototypes", Val::list(protos));
        c.arg("temperature", float(s.temperature));
        c.arg("epsilon", float(s.epsilon));
        c.arg("num_iters", Val::int(s.num_iters as i64));
        c.arg("crops_for_assign", ints(&s.assign));
        c.arg("num_crops", Val::int(s.crops as i64));
        c.arg("queue_length", Val::int(s.queue as i64));
        c.arg("batch", Val::int(s.batch as i64));
        c.arg("hard_assignment_iters", Val::int(0));
        c.arg("world", Val::int(1));
    })
}

/// Random embeddings and cosine scores per head for `s`.
fn swav_inputs(s: &Swav, seed: u64) -> (Vec<f32>, Vec<Vec<f32>>) {
    let z = unit_vectors(seed, s.rows(), s.embedding, false);
    let scores =
        s.heads.iter().enumerate().map(|(h, &k)| cosine_scores(seed + 10 * (h as u64 + 1), s.rows(), k)).collect();
    (z, scores)
}

/// Compares tessera's loss and gradients with `swav_reference`.
fn check_swav(r: &mut Report, s: &Swav, seed: u64) {
    let (z, scores) = swav_inputs(s, seed);
    let mut lw = swav_tessera(s, &z, &scores, &[]);
    let out = lw.run(&[]);
    let leaves: Vec<TT> = s.heads.iter().zip(&scores).map(|(&k, v)| leaf(v, &[s.rows(), k])).collect();
    let loss = swav_reference(s, &leaves, |_, _| None);
    loss.backward();
    let what = s.name();
    r.compare_values(&format!("{what}: loss"), &[scalar(&out)], &to_vec_f64(&loss), RTOL);
    for (h, l) in leaves.iter().enumerate() {
        r.compare_grad(&what, &lw, &out, &format!("scores{h}"), l);
    }
    r.no_grad(&what, &out, "z");
}

#[test]
fn swav_loss_matches_libtorch() {
    let mut r = Report::new("swav");
    for (i, (crops, heads)) in [(2, &[10][..]), (3, &[10]), (2, &[10, 7]), (3, &[10, 7])].into_iter().enumerate() {
        check_swav(&mut r, &Swav::new(crops, heads), 70 + i as u64);
    }
    // One assignment crop that is not crop 0.
    check_swav(&mut r, &Swav { assign: vec![2], ..Swav::new(3, &[10]) }, 75);
    r.finish();
}

/// tessera's Sinkhorn-Knopp block on column blocks of the given row counts,
/// fed scores / epsilon as inputs `cols<i>`; returns the codes of the first.
fn sinkhorn_tessera(blocks: &[usize], k: usize, num_iters: usize) -> Lowered {
    compile("swav_loss", Some("SinkhornKnopp"), false, |c| {
        let cols = blocks.iter().enumerate().map(|(i, &rows)| c.input(&format!("cols{i}"), &[rows, k])).collect();
        c.pos.extend([Val::list(cols), Val::int(num_iters as i64), Val::int(1)]);
    })
}

/// Runs `sinkhorn_tessera` on `scores` (blocks of `blocks` rows, [sum, k]).
fn sinkhorn_codes(scores: &[f32], blocks: &[usize], k: usize, epsilon: f64, num_iters: usize) -> Tensor {
    let mut lw = sinkhorn_tessera(blocks, k, num_iters);
    let scaled: Vec<f32> = scores.iter().map(|&x| (x as f64 / epsilon) as f32).collect();
    let mut start = 0;
    let mut feeds = Vec::new();
    for (i, &rows) in blocks.iter().enumerate() {
        feeds.push((format!("cols{i}"), f32_tensor(&scaled[start * k..(start + rows) * k], &[rows, k])));
        start += rows;
    }
    let feeds: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    lw.run(&feeds)["out"].clone()
}

#[test]
fn swav_sinkhorn_codes_match_vissl_and_have_its_marginals() {
    let mut r = Report::new("sinkhorn");
    let (b, k, epsilon) = (16usize, 10usize, 0.05);
    let scores = cosine_scores(80, b, k);
    let s = t64(&scores, &[b, k]);
    for num_iters in [0, 1, 3, 50] {
        let codes = sinkhorn_codes(&scores, &[b], k, epsilon, num_iters);
        r.compare(&format!("codes, {num_iters} iterations"), &codes, &sinkhorn_reference(&s, epsilon, num_iters));
    }
    // Converged marginals: every sample's code sums to 1, every prototype
    // gets an equal share B/K of the batch.
    let codes = sinkhorn_codes(&scores, &[b], k, epsilon, 50);
    let c = t64(codes.as_f32().expect("f32 codes"), &[b, k]);
    let ones = vec![1.0; b];
    r.compare_values("codes' row sums (50 iterations) vs 1", &to_vec_f64(&sum_dim(&c, 1, false)), &ones, RTOL);
    let share = vec![b as f64 / k as f64; k];
    r.compare_values("codes' column sums (50 iterations) vs B/K", &to_vec_f64(&sum_dim(&c, 0, false)), &share, 1e-3);
    // With queue rows: the batch's codes of the joint Sinkhorn.
    let all = cosine_scores(81, b + 24, k);
    let codes = sinkhorn_codes(&all, &[b, 24], k, epsilon, 3);
    let expected = sinkhorn_reference(&t64(&all, &[b + 24, k]), epsilon, 3).narrow(0, 0, b as i64);
    r.compare("codes of the batch with 24 queue rows, 3 iterations", &codes, &expected);
    r.finish();
}

#[test]
fn swav_loss_with_queue_matches_libtorch() {
    let mut r = Report::new("swav-queue");
    for (crops, heads) in [(2, &[10][..]), (3, &[10, 7])] {
        let s = Swav { queue: 3 * 8, ..Swav::new(crops, heads) };
        let (length, e) = (s.queue, s.embedding);
        let (z, scores) = swav_inputs(&s, 90);
        let protos: Vec<Vec<f32>> =
            s.heads.iter().enumerate().map(|(h, &k)| unit_vectors(91 + h as u64, k, e, false)).collect();
        let mut lw = swav_tessera(&s, &z, &scores, &protos);
        // Each assignment crop's queue: unit embeddings as columns, the
        // pointer one batch before the end (the step's write wraps).
        let queues: Vec<Vec<f32>> = (0..s.assign.len()).map(|i| unit_vectors(95 + i as u64, e, length, true)).collect();
        let ptr = length - s.batch / 2;
        for (i, q) in queues.iter().enumerate() {
            lw.set(&format!("loss.local_emb_queue.{i}.emb"), f32_tensor(q, &[e, length]));
            lw.set(&format!("loss.local_emb_queue.{i}.ptr"), Tensor::scalar_i64(ptr as i64));
        }
        let out = lw.run(&[]);
        let leaves: Vec<TT> = s.heads.iter().zip(&scores).map(|(&k, v)| leaf(v, &[s.rows(), k])).collect();
        let queue_scores = |h: usize, i: usize| {
            let emb = t64(&queues[i], &[e, length]);
            Some(emb.tr().mm(&t64(&protos[h], &[s.heads[h], e]).tr()))
        };
        let loss = swav_reference(&s, &leaves, queue_scores);
        loss.backward();
        let what = s.name();
        r.compare_values(&format!("{what}: loss"), &[scalar(&out)], &to_vec_f64(&loss), RTOL);
        for (h, l) in leaves.iter().enumerate() {
            r.compare_grad(&what, &lw, &out, &format!("scores{h}"), l);
            r.no_grad(&what, &out, &format!("prototypes{h}"));
        }
        r.no_grad(&what, &out, "z");
        // The queue afterwards: the crop's embeddings in columns ptr.. (mod L).
        for (i, &a) in s.assign.iter().enumerate() {
            let mut expected = queues[i].clone();
            for j in 0..s.batch {
                for d in 0..e {
                    expected[d * length + (ptr + j) % length] = z[(a * s.batch + j) * e + d];
                }
            }
            let got = lw.state(&format!("loss.local_emb_queue.{i}.emb")).clone();
            r.compare(&format!("{what}: queue {i} after the step"), &got, &t64(&expected, &[e, length]));
            let p = i64_scalar(lw.state(&format!("loss.local_emb_queue.{i}.ptr")));
            let want = (ptr + s.batch) % length;
            r.check(p == want as i64, format!("{what}: queue {i} ptr after the step is {p}, expected {want}"));
        }
    }
    r.finish();
}

// ---------------------------------------------------------------------------
// Cross-entropy over several outputs (reference 4.4).

enum Target {
    /// Rows of probabilities (cutmixup).
    Soft(Vec<f32>),
    /// Class indices, with the loss's label smoothing.
    Hard(Vec<i64>, f64),
}

/// VISSL's cross_entropy_multiple_output_single_target: the sum over outputs
/// of CE(output / T, target) (after L2 normalisation with `normalize`); soft
/// targets -mean sum t log_softmax, hard ones F.cross_entropy with
/// label_smoothing and ignore_index -1.
fn ce_reference(outputs: &[TT], target: &Target, temperature: f64, normalize: bool, k: usize) -> TT {
    let losses = outputs.iter().map(|x| {
        let x = if normalize { l2n(x) } else { x.shallow_clone() } / temperature;
        match target {
            Target::Soft(t) => {
                let t = t64(t, &[t.len() / k, k]);
                -sum_dim(&(t * x.log_softmax(1, Kind::Double)), 1, false).mean(Kind::Double)
            }
            Target::Hard(y, s) => x.cross_entropy_loss::<TT>(&TT::from_slice(y), None, Reduction::Mean, -1, *s),
        }
    });
    TT::stack(&losses.collect::<Vec<_>>(), 0).sum(Kind::Double)
}

#[test]
fn cross_entropy_multiple_outputs_match_libtorch() {
    let (n, k) = (6usize, 5usize);
    let mut r = Report::new("ce");
    let cases = [
        ("soft targets, T 0.5", Target::Soft(soft_targets(100, n, k)), 0.5, false),
        ("hard targets, smoothing 0.1, T 0.5", Target::Hard(labels(101, n, k), 0.1), 0.5, false),
        ("hard targets, no smoothing, T 2", Target::Hard(labels(102, n, k), 0.0), 2.0, false),
        ("soft targets, normalize_output, T 0.2", Target::Soft(soft_targets(103, n, k)), 0.2, true),
    ];
    for (i, (name, target, temperature, normalize)) in cases.into_iter().enumerate() {
        let values: Vec<Vec<f32>> = (0..2).map(|o| normal_values(110 + 2 * i as u64 + o, n * k)).collect();
        let (soft, smoothing) = match &target {
            Target::Soft(_) => (true, 0.0),
            Target::Hard(_, s) => (false, *s),
        };
        let mut lw = compile("cross_entropy_multiple_output_single_target", None, true, |c| {
            let outs = values.iter().enumerate().map(|(o, v)| c.param(&format!("out{o}"), &[n, k], v)).collect();
            c.pos.push(Val::list(outs));
            c.arg("temperature", float(temperature));
            c.arg("normalize_output", boolean(normalize));
            c.arg("label_smoothing", float(smoothing));
            c.arg("soft_targets", boolean(soft));
        });
        let feed = match &target {
            Target::Soft(t) => f32_tensor(t, &[n, k]),
            Target::Hard(y, _) => Tensor::i64(vec![n], y.clone()),
        };
        let out = lw.run(&[("target", feed)]);
        let leaves: Vec<TT> = values.iter().map(|v| leaf(v, &[n, k])).collect();
        let loss = ce_reference(&leaves, &target, temperature, normalize, k);
        loss.backward();
        r.compare_values(&format!("{name}: loss"), &[scalar(&out)], &to_vec_f64(&loss), RTOL);
        for (o, l) in leaves.iter().enumerate() {
            r.compare_grad(name, &lw, &out, &format!("out{o}"), l);
        }
    }
    r.finish();
}
