//! Scaled dot-product attention on the GPU, fused: nothing Nq x Nk is ever
//! stored (FlashAttention-2's scheme, by rows).
//!
//! - attention: one block per query row (`kernels/attention_rows.cu`):
//!   online softmax over tiles of keys, the output row accumulated in
//!   shared memory, dropout on the probabilities with the CPU's mask.
//! - attention_grad: three launches. The statistics kernel (the same
//!   template) recomputes each query row's log-sum-exp into the `lse`
//!   scratch and D = sum_j P~_ij (dy_i . v_j) into `delta`; then
//!   `kernels/attention_grad.cu` writes dq by query rows and dk, dv by key
//!   rows, every row by exactly one block (no atomics), P recomputed from
//!   `lse`.
//!
//! q, k, v (and dy) are f32 or bf16 (one dtype, the plan's rule); every
//! kernel computes in f32 (exp-sums and D in f64) and stores the result in
//! its dtype. Every sum runs in a fixed order, so runs are bitwise
//! reproducible on one device.

use super::super::device::{Arg, DevPtr, Launch};
use super::super::lower::{c_type, Lowering, Val};
use super::super::source::{param, KernelSource, Param};
use tessera_plan::{DType, Op};

const ROWS: &str = include_str!("../kernels/attention_rows.cu");
const GRAD: &str = include_str!("../kernels/attention_grad.cu");
/// Threads per block: a power of two, at most TSR_MAX_THREADS.
const THREADS: u32 = 128;
/// Grid bound (the kernels stride over rows beyond it).
const MAX_BLOCKS: u64 = 8192;
/// The largest head dimension: the kernels keep a few rows of it in shared
/// memory (static, under the 48 KiB every GPU gives).
const MAX_HEAD_DIM: u64 = 1024;

fn rows_launch(rows: u64) -> Launch {
    Launch::linear(rows.clamp(1, MAX_BLOCKS) as u32, THREADS)
}

fn float_type(v: &Val, role: &str) -> Result<&'static str, String> {
    match v.dtype {
        DType::F32 | DType::BF16 => c_type(v.dtype),
        other => Err(format!("{role} must be f32 or bf16, got {other}")),
    }
}

fn check_head_dim(d: u64, role: &str) -> Result<(), String> {
    if d > MAX_HEAD_DIM {
        return Err(format!(
            "{role} head dim {d} exceeds {MAX_HEAD_DIM}, the attention kernels' bound (rows kept in shared memory)"
        ));
    }
    Ok(())
}

/// Dropout as the kernels take it, `None` when off (eval, or p = 0):
/// the stream key, keep = 1 - p and the kept values' scale 1 / (1 - p),
/// both computed in f64 and rounded to f32 as the CPU's mask does.
struct Drop {
    key: u32,
    keep: f32,
    scale: f32,
    /// The probabilities' rows (axis 0 of q) and mask indices per row, for
    /// the random streams' rank term.
    rows: u64,
    row_len: u64,
}

fn dropout(l: &Lowering, p: f64, key: u32) -> Result<Option<Drop>, String> {
    if !(0.0..1.0).contains(&p) {
        return Err(format!("dropout probability {p} must be in [0, 1)"));
    }
    if !l.plan.training || p == 0.0 {
        return Ok(None);
    }
    Ok(Some(Drop { key, keep: (1.0 - p) as f32, scale: (1.0 / (1.0 - p)) as f32, rows: 1, row_len: 1 }))
}

/// `d` with the mask's rows: q's axis 0 (the batch) and the probabilities
/// [.., H, Nq, `nk`] of each.
fn masked_rows(d: Drop, q: &[u64], nk: u64) -> Drop {
    let r = q.len();
    let rows = if r > 2 { q[0] } else { 1 };
    let per_row = q[..r - 1].iter().product::<u64>() / rows.max(1) * nk;
    Drop { rows, row_len: per_row.max(1), ..d }
}

/// The trailing parameters every attention kernel takes: shape scalars,
/// the score scale and, with dropout, the random stream.
fn push_common(
    params: &mut Vec<Param>,
    args: &mut Vec<Arg>,
    scalars: &[(&str, u64)],
    scale: f64,
    drop: &Option<Drop>,
    rng: DevPtr,
) {
    for &(name, v) in scalars {
        params.push(param("i64", name));
        args.push(Arg::I64(v as i64));
    }
    params.push(param("float", "scale"));
    args.push(Arg::F32(scale as f32));
    if let Some(d) = drop {
        params.extend([
            param("const tsr_rng*", "rng"),
            param("u32", "key"),
            param("float", "keep"),
            param("float", "drop_scale"),
            param("i64", "drop_rows"),
            param("i64", "drop_row_len"),
        ]);
        args.extend([
            Arg::Ptr(rng),
            Arg::U32(d.key),
            Arg::F32(d.keep),
            Arg::F32(d.scale),
            Arg::I64(d.rows as i64),
            Arg::I64(d.row_len as i64),
        ]);
    }
}

fn context(d: u64, dv: u64, drop: &Option<Drop>) -> tera::Context {
    let mut c = tera::Context::new();
    c.insert("d", &d);
    c.insert("dv", &dv);
    // Shared arrays of at least one element (a head dim may be 0).
    c.insert("d_alloc", &d.max(1));
    c.insert("dv_alloc", &dv.max(1));
    c.insert("dropout", &drop.is_some());
    c.insert("packed", &false);
    c
}

/// `context` for the packed layout of `heads` heads (`AttentionPacked`).
fn packed_context(d: u64, heads: u64, drop: &Option<Drop>) -> tera::Context {
    let mut c = context(d, d, drop);
    c.insert("packed", &true);
    c.insert("heads", &heads);
    c
}

/// `qkv [B, N, 3*H*d]` as (B, N, d), or an error naming its shape.
fn packed_dims(qkv: &Val, heads: u64) -> Result<(u64, u64, u64), String> {
    match qkv.shape[..] {
        [b, n, c] if heads > 0 && c % (3 * heads) == 0 => Ok((b, n, c / (3 * heads))),
        _ => Err(format!("qkv {:?} is not [batch, tokens, 3 x {heads} heads x head dim]", qkv.shape)),
    }
}

/// `qkv [B, N, 3*H*d] -> [B, N, H*d]`: `forward`'s kernel reading q, k and v
/// in place from the packed product and writing the tokens' (H, d) rows.
fn forward_packed(l: &mut Lowering, k: usize, heads: u64, scale: f64, p: f64, key: u32) -> Result<(), String> {
    let x = l.inputs(k)?;
    let [qkv] = &x[..] else { return Err(format!("attention_packed takes (qkv), got {} operands", x.len())) };
    let out = l.output(k)?;
    let (b, n, d) = packed_dims(qkv, heads)?;
    if out.shape != [b, n, heads * d] {
        return Err(format!(
            "the result is {:?}, attention of qkv {:?} gives {:?}",
            out.shape,
            qkv.shape,
            [b, n, heads * d]
        ));
    }
    check_head_dim(d, "q")?;
    let drop = dropout(l, p, key)?.map(|dr| masked_rows(dr, &[b, heads, n, d], n));
    let types = [float_type(&out, "the result")?, float_type(qkv, "qkv")?];
    if out.numel() == 0 {
        return Ok(());
    }
    let rows = b * heads * n;
    let mut params = vec![
        param(&format!("{}*", types[0]), "out"),
        param(&format!("const {}*", types[1]), "q"),
        param(&format!("const {}*", types[1]), "k"),
        param(&format!("const {}*", types[1]), "v"),
    ];
    let mut args = vec![Arg::Ptr(out.ptr), Arg::Ptr(qkv.ptr), Arg::Ptr(qkv.ptr), Arg::Ptr(qkv.ptr)];
    push_common(&mut params, &mut args, &[("rows", rows), ("nq", n), ("nk", n)], scale, &drop, l.rng);
    let mut c = packed_context(d, heads, &drop);
    c.insert("stats", &false);
    let src = KernelSource::render("attention_packed", ROWS, c, params)?;
    l.launch(k, src, rows_launch(rows), args);
    Ok(())
}

/// `q [.., H, Nq, d], k [.., H, Nk, d], v [.., H, Nk, dv] -> [.., H, Nq, dv]`.
fn forward(l: &mut Lowering, k: usize, scale: f64, p: f64, key: u32) -> Result<(), String> {
    let x = l.inputs(k)?;
    let [q, kk, v] = &x[..] else { return Err(format!("attention takes (q, k, v), got {} operands", x.len())) };
    let out = l.output(k)?;
    let r = q.shape.len();
    let lead_ok = r >= 3
        && kk.shape.len() == r
        && v.shape.len() == r
        && kk.shape[..r - 2] == q.shape[..r - 2]
        && v.shape[..r - 2] == q.shape[..r - 2];
    if !lead_ok || kk.shape[r - 1] != q.shape[r - 1] || v.shape[r - 2] != kk.shape[r - 2] {
        return Err(format!(
            "q {:?}, k {:?}, v {:?} are not [.., H, Nq, d], [.., H, Nk, d], [.., H, Nk, dv]",
            q.shape, kk.shape, v.shape
        ));
    }
    let (nq, d, nk, dv) = (q.shape[r - 2], q.shape[r - 1], kk.shape[r - 2], v.shape[r - 1]);
    let mut expect = q.shape.clone();
    expect[r - 1] = dv;
    if out.shape != expect {
        return Err(format!("the result is {:?}, attention of these operands gives {:?}", out.shape, expect));
    }
    check_head_dim(d, "q")?;
    check_head_dim(dv, "v")?;
    let drop = dropout(l, p, key)?.map(|dr| masked_rows(dr, &q.shape, nk));
    let types = [float_type(&out, "the result")?, float_type(q, "q")?, float_type(kk, "k")?, float_type(v, "v")?];
    if out.numel() == 0 {
        return Ok(());
    }
    if nk == 0 {
        // No keys: every output row is an empty sum (the CPU's product too).
        l.zero(k, out.ptr, out.bytes());
        return Ok(());
    }
    let rows = out.numel() / dv;
    let mut params = vec![
        param(&format!("{}*", types[0]), "out"),
        param(&format!("const {}*", types[1]), "q"),
        param(&format!("const {}*", types[2]), "k"),
        param(&format!("const {}*", types[3]), "v"),
    ];
    let mut args = vec![Arg::Ptr(out.ptr), Arg::Ptr(q.ptr), Arg::Ptr(kk.ptr), Arg::Ptr(v.ptr)];
    push_common(&mut params, &mut args, &[("rows", rows), ("nq", nq), ("nk", nk)], scale, &drop, l.rng);
    let mut c = context(d, dv, &drop);
    c.insert("stats", &false);
    let src = KernelSource::render("attention", ROWS, c, params)?;
    l.launch(k, src, rows_launch(rows), args);
    Ok(())
}

/// `(q, k, v, dy) [.., H, N, d] -> [3, .., H, N, d]` (dq, dk, dv).
fn backward(l: &mut Lowering, k: usize, scale: f64, p: f64, key: u32) -> Result<(), String> {
    let x = l.inputs(k)?;
    let [q, kk, v, dy] = &x[..] else {
        return Err(format!("attention_grad takes (q, k, v, dy), got {} operands", x.len()));
    };
    let out = l.output(k)?;
    let r = q.shape.len();
    if r < 3 || kk.shape != q.shape || v.shape != q.shape || dy.shape != q.shape {
        return Err(format!(
            "q {:?}, k {:?}, v {:?} and dy {:?} must share one shape [.., H, N, d]",
            q.shape, kk.shape, v.shape, dy.shape
        ));
    }
    let mut expect = vec![3];
    expect.extend_from_slice(&q.shape);
    if out.shape != expect {
        return Err(format!("the result is {:?}, the stacked gradients are {:?}", out.shape, expect));
    }
    let (n, d) = (q.shape[r - 2], q.shape[r - 1]);
    check_head_dim(d, "q")?;
    let drop = dropout(l, p, key)?.map(|dr| masked_rows(dr, &q.shape, n));
    let types = [
        float_type(&out, "the result")?,
        float_type(q, "q")?,
        float_type(kk, "k")?,
        float_type(v, "v")?,
        float_type(dy, "dy")?,
    ];
    if out.numel() == 0 {
        return Ok(());
    }
    let rows = q.numel() / d;
    let ptrs = [out.ptr, q.ptr, kk.ptr, v.ptr, dy.ptr];
    backward_launches(l, k, rows, n, scale, &drop, ptrs, types, context(d, d, &drop), None)
}

/// `(qkv [B, N, 3*H*d], dy [B, N, H*d]) -> [B, N, 3*H*d]`: `backward`'s
/// three launches on the packed layout, dq, dk, dv written where q, k, v sit.
fn backward_packed(l: &mut Lowering, k: usize, heads: u64, scale: f64, p: f64, key: u32) -> Result<(), String> {
    let x = l.inputs(k)?;
    let [qkv, dy] = &x[..] else {
        return Err(format!("attention_packed_grad takes (qkv, dy), got {} operands", x.len()));
    };
    let out = l.output(k)?;
    let (b, n, d) = packed_dims(qkv, heads)?;
    if dy.shape != [b, n, heads * d] || out.shape != qkv.shape {
        return Err(format!(
            "dy {:?} and the result {:?} must be [{b}, {n}, {}] and qkv's {:?}",
            dy.shape,
            out.shape,
            heads * d,
            qkv.shape
        ));
    }
    check_head_dim(d, "q")?;
    let drop = dropout(l, p, key)?.map(|dr| masked_rows(dr, &[b, heads, n, d], n));
    let t = float_type(qkv, "qkv")?;
    let types = [float_type(&out, "the result")?, t, t, t, float_type(dy, "dy")?];
    if out.numel() == 0 {
        return Ok(());
    }
    let ptrs = [out.ptr, qkv.ptr, qkv.ptr, qkv.ptr, dy.ptr];
    let rows = b * heads * n;
    let mut c = packed_context(d, heads, &drop);
    // The qkv product's bias gradient, summed as the rows are written.
    let sum = super::matmul::row_sum_part(l, k)?;
    c.insert("row_sum", &sum.is_some());
    let summed = match &sum {
        Some(sum) => {
            let hd = heads * d;
            if sum.shape != [3 * hd] {
                return Err(format!("the row sum {:?} must be [{}]", sum.shape, 3 * hd));
            }
            let chunks = tessera_plan::scratch::attention_sum_chunks(b, heads);
            let (partials, bytes) = l.scratch(k, "partials")?;
            if bytes < chunks * 3 * hd * 8 {
                return Err(format!("the partials scratch holds {bytes} bytes, {} are needed", chunks * 3 * hd * 8));
            }
            // A block's accumulators: dk's and dv's columns of one head.
            c.insert("sum_alloc", &(2 * d).max(1));
            Some((partials, chunks))
        }
        None => None,
    };
    let blocks = summed.map(|(partials, chunks)| (partials, heads * chunks));
    backward_launches(l, k, rows, n, scale, &drop, ptrs, types, c, blocks)?;
    if let (Some(sum), Some((partials, chunks))) = (&sum, summed) {
        super::matmul::sum_partials(l, k, sum, partials, chunks)?;
    }
    Ok(())
}

/// The statistics launch, then dq by query rows and dk, dv by key rows;
/// `ptrs` and `types` are (out, q, k, v, dy)'s, `c` the layout's context.
#[allow(clippy::too_many_arguments)]
fn backward_launches(
    l: &mut Lowering,
    k: usize,
    rows: u64,
    n: u64,
    scale: f64,
    drop: &Option<Drop>,
    ptrs: [DevPtr; 5],
    types: [&str; 5],
    c: tera::Context,
    summed: Option<(DevPtr, u64)>,
) -> Result<(), String> {
    let (lse, lse_bytes) = l.scratch(k, "lse")?;
    let (delta, delta_bytes) = l.scratch(k, "delta")?;
    if lse_bytes < rows * 4 || delta_bytes < rows * 4 {
        return Err(format!(
            "the scratch pieces lse ({lse_bytes} bytes) and delta ({delta_bytes} bytes) need {} bytes each",
            rows * 4
        ));
    }
    let operands = |params: &mut Vec<Param>| {
        params.extend([
            param(&format!("const {}*", types[1]), "q"),
            param(&format!("const {}*", types[2]), "k"),
            param(&format!("const {}*", types[3]), "v"),
            param(&format!("const {}*", types[4]), "dy"),
        ]);
    };
    let operand_args = [Arg::Ptr(ptrs[1]), Arg::Ptr(ptrs[2]), Arg::Ptr(ptrs[3]), Arg::Ptr(ptrs[4])];

    // 1. Per query row: lse and delta.
    let mut params = vec![param("float*", "lse"), param("float*", "delta")];
    operands(&mut params);
    let mut args = vec![Arg::Ptr(lse), Arg::Ptr(delta)];
    args.extend(operand_args.iter().cloned());
    push_common(&mut params, &mut args, &[("rows", rows), ("nq", n), ("nk", n)], scale, drop, l.rng);
    let mut stats = c.clone();
    stats.insert("stats", &true);
    let src = KernelSource::render("attention_stats", ROWS, stats, params)?;
    l.launch(k, src, rows_launch(rows), args);

    // 2. dq by query rows, 3. dk and dv by key rows.
    for (family, dkv) in [("attention_grad_q", false), ("attention_grad_kv", true)] {
        let mut params = vec![param(&format!("{}*", types[0]), "out")];
        operands(&mut params);
        params.extend([param("const float*", "lse"), param("const float*", "delta")]);
        let mut args = vec![Arg::Ptr(ptrs[0])];
        args.extend(operand_args.iter().cloned());
        args.extend([Arg::Ptr(lse), Arg::Ptr(delta)]);
        push_common(&mut params, &mut args, &[("rows", rows), ("n", n)], scale, drop, l.rng);
        let mut c = c.clone();
        c.insert("dkv", &dkv);
        // With the row sum: a block per head and chunk of samples (each
        // chunk leaves a row of partials).
        let launch = match summed {
            Some((partials, blocks)) => {
                params.push(param("double*", "partials"));
                args.push(Arg::Ptr(partials));
                Launch::linear(blocks as u32, THREADS)
            }
            None => {
                c.insert("row_sum", &false);
                rows_launch(rows)
            }
        };
        let src = KernelSource::render(family, GRAD, c, params)?;
        l.launch(k, src, launch, args);
    }
    Ok(())
}

pub fn lower(l: &mut Lowering, k: usize, op: &Op) -> Result<(), String> {
    match *op {
        Op::Attention { scale, dropout, key } => forward(l, k, scale, dropout, key),
        Op::AttentionGrad { scale, dropout, key } => backward(l, k, scale, dropout, key),
        Op::AttentionPacked { heads, scale, dropout, key } => forward_packed(l, k, heads, scale, dropout, key),
        Op::AttentionPackedGrad { heads, scale, dropout, key, .. } => backward_packed(l, k, heads, scale, dropout, key),
        ref other => Err(format!("{} is not an attention op", other.name())),
    }
}
