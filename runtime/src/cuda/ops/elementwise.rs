//! Elementwise ops on the GPU: every single elementwise op is a
//! one-instruction register program, so one template
//! (`kernels/elementwise.cu`) covers them and `fused` bodies; `multi_tensor`
//! runs a program over tensor sets (`kernels/multi_tensor.cu`); fills of
//! the arena. Scalars (scale factors, dropout keep and scale, random-stream
//! keys) are kernel arguments, so kernels differ only in their program's
//! structure and dtypes.
//!
//! Numerics follow the CPU backend instruction by instruction
//! (`cpu/fused.rs`, `cpu/elementwise.rs`): f32 registers, scalars rounded
//! to f32, pow by the same special cases, max/min propagating NaN from the
//! left operand, dropout masks from the same Philox words.

use super::super::device::{Arg, DevPtr, Launch};
use super::super::lower::{c_type, Lowering, Val};
use super::super::source::{param, KernelSource, Param};
use tessera_plan::{BinaryOp, DType, Instr, Op, UnaryOp};

const TEMPLATE: &str = include_str!("../kernels/elementwise.cu");
const MULTI_TEMPLATE: &str = include_str!("../kernels/multi_tensor.cu");

/// Threads per block of elementwise kernels, and the most blocks a launch uses.
pub const THREADS: u32 = 256;
const MAX_BLOCKS: u64 = 4096;

pub fn grid_for(n: u64) -> Launch {
    Launch::linear(n.div_ceil(THREADS as u64).clamp(1, MAX_BLOCKS) as u32, THREADS)
}

/// One instruction of a program as rendered: the plan's, or `x / d`
/// (`div_count`, which the CPU computes as a division).
pub enum Ins {
    Plan(Instr),
    DivBy(f64, u32),
}

/// How an operand is read at output element i.
#[derive(Clone, Debug, PartialEq)]
enum Mode {
    Full,
    Scalar,
    Strided(Vec<i64>),
}

/// Numpy broadcasting: the strides (in elements) that read `shape` at the
/// positions of `out` (0 along broadcast dims).
pub fn broadcast_strides(shape: &[u64], out: &[u64]) -> Result<Vec<i64>, String> {
    if shape.len() > out.len() {
        return Err(format!("{shape:?} does not broadcast to {out:?}"));
    }
    let lead = out.len() - shape.len();
    let mut strides = vec![0i64; out.len()];
    let mut s = 1i64;
    for d in (0..shape.len()).rev() {
        let (n, o) = (shape[d], out[lead + d]);
        if n == o {
            strides[lead + d] = if n == 1 { 0 } else { s };
        } else if n != 1 {
            return Err(format!("{shape:?} does not broadcast to {out:?}"));
        }
        s *= n as i64;
    }
    Ok(strides)
}

fn mode(v: &Val, out: &[u64]) -> Result<Mode, String> {
    if v.shape == out {
        Ok(Mode::Full)
    } else if v.numel() == 1 {
        Ok(Mode::Scalar)
    } else {
        broadcast_strides(&v.shape, out).map(Mode::Strided)
    }
}

fn dims_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

/// A register program ready to render: instructions, operand dtypes and
/// modes, the scalars and keys it reads.
struct Program {
    lines: Vec<String>,
    scalars: Vec<f32>,
    keys: Vec<u32>,
    random: bool,
    drop_path: bool,
}

impl Program {
    fn scalar(&mut self, v: f32) -> String {
        self.scalars.push(v);
        format!("sc.v[{}]", self.scalars.len() - 1)
    }
}

fn unary(u: UnaryOp, a: &str) -> String {
    match u {
        UnaryOp::Gelu => format!("tsr_gelu({a})"),
        UnaryOp::Relu => format!("({a} > 0.0f ? {a} : 0.0f)"),
        UnaryOp::Tanh => format!("tanhf({a})"),
        UnaryOp::Sigmoid => format!("tsr_sigmoid({a})"),
        UnaryOp::Exp => format!("expf({a})"),
        UnaryOp::Log => format!("logf({a})"),
        UnaryOp::Neg => format!("(-{a})"),
        UnaryOp::Sqrt => format!("sqrtf({a})"),
        UnaryOp::Recip => format!("(1.0f / {a})"),
        UnaryOp::Square => format!("({a} * {a})"),
        UnaryOp::Heaviside => format!("({a} > 0.0f ? 1.0f : 0.0f)"),
    }
}

fn binary(b: BinaryOp, x: &str, y: &str) -> String {
    match b {
        BinaryOp::Add => format!("({x} + {y})"),
        BinaryOp::Sub => format!("({x} - {y})"),
        BinaryOp::Mul => format!("({x} * {y})"),
        BinaryOp::Div => format!("({x} / {y})"),
        BinaryOp::Max => format!("tsr_max_nan({x}, {y})"),
        BinaryOp::Min => format!("tsr_min_nan({x}, {y})"),
    }
}

/// `x ^ e` as the CPU computes it (`cpu::elementwise::pow_into`).
fn pow(p: &mut Program, e: f64, a: &str) -> String {
    match e {
        1.0 => a.to_string(),
        2.0 => format!("({a} * {a})"),
        0.5 => format!("sqrtf({a})"),
        -1.0 => format!("(1.0f / {a})"),
        e if e == e.trunc() && e.abs() < 64.0 => format!("tsr_powi({a}, {})", e as i32),
        e => {
            let s = p.scalar(e as f32);
            format!("powf({a}, {s})")
        }
    }
}

/// Renders `body`'s registers; operand j is read as `x{j}` at `index(j)`.
fn render_body(
    body: &[Ins],
    operands: usize,
    index: &dyn Fn(usize) -> String,
    training: bool,
) -> Result<Program, String> {
    let mut p = Program { lines: Vec::new(), scalars: Vec::new(), keys: Vec::new(), random: false, drop_path: false };
    if body.is_empty() {
        return Err("a fused op needs at least one instruction".into());
    }
    for (i, ins) in body.iter().enumerate() {
        let reg = |r: u32| -> Result<String, String> {
            if r as usize >= i {
                return Err(format!("instruction {i} reads register {r}, which is not defined before it"));
            }
            Ok(format!("r{r}"))
        };
        let expr = match ins {
            Ins::DivBy(d, a) => {
                let a = reg(*a)?;
                let s = p.scalar(*d as f32);
                format!("({a} / {s})")
            }
            Ins::Plan(instr) => match *instr {
                Instr::Operand(j) => {
                    if j as usize >= operands {
                        return Err(format!("instruction {i} reads operand {j}, but the op has {operands}"));
                    }
                    format!("tsr_load(x{j}, {})", index(j as usize))
                }
                Instr::Unary(u, a) => unary(u, &reg(a)?),
                Instr::Binary(b, x, y) => binary(b, &reg(x)?, &reg(y)?),
                Instr::Scale(f, a) => {
                    let a = reg(a)?;
                    let s = p.scalar(f as f32);
                    format!("({a} * {s})")
                }
                Instr::AddScalar(c, a) => {
                    let a = reg(a)?;
                    let s = p.scalar(c as f32);
                    format!("({a} + {s})")
                }
                Instr::PowScalar(e, a) => {
                    let a = reg(a)?;
                    pow(&mut p, e, &a)
                }
                Instr::GeluGrad(x, g) => format!("tsr_gelu_grad({}, {})", reg(x)?, reg(g)?),
                Instr::Cast(d, a) => match d {
                    DType::BF16 => format!("tsr_round_bf16({})", reg(a)?),
                    DType::F32 => reg(a)?,
                    other => return Err(format!("a cast to {other} inside a fused program is not supported")),
                },
                Instr::Dropout { p: prob, key, x } | Instr::DropPath { p: prob, key, x } => {
                    let x = reg(x)?;
                    if !(0.0..1.0).contains(&prob) {
                        return Err(format!("drop probability {prob} must be in [0, 1)"));
                    }
                    if !training || prob == 0.0 {
                        x
                    } else {
                        p.random = true;
                        let keep = p.scalar((1.0 - prob) as f32);
                        let scale = p.scalar((1.0 / (1.0 - prob)) as f32);
                        p.keys.push(key);
                        let k = format!("keys.v[{}]", p.keys.len() - 1);
                        // The rank term: rows are axis 0 of the result, of
                        // per_sample elements (dropout) or one sample each.
                        let index = if matches!(instr, Instr::DropPath { .. }) {
                            p.drop_path = true;
                            "tsr_global_index(rng, (u64)(i / per_sample), (u64)drop_rows, 1)"
                        } else {
                            "tsr_global_index(rng, (u64)i, (u64)drop_rows, (u64)(n / (drop_rows > 0 ? drop_rows : 1)))"
                        };
                        format!("({x} * tsr_drop_factor(seed, step, {k}, {index}, {keep}, {scale}))")
                    }
                }
            },
        };
        p.lines.push(format!("        const float r{i} = {expr};"));
    }
    Ok(p)
}

/// The program of a single elementwise op, or a fused op's body.
fn program_of(op: &Op) -> Result<Vec<Ins>, String> {
    let o = |j| Ins::Plan(Instr::Operand(j));
    Ok(match op {
        Op::Fused { body } => body.iter().cloned().map(Ins::Plan).collect(),
        Op::Unary(u) => vec![o(0), Ins::Plan(Instr::Unary(*u, 0))],
        Op::Binary(b) => vec![o(0), o(1), Ins::Plan(Instr::Binary(*b, 0, 1))],
        Op::Scale { factor } => vec![o(0), Ins::Plan(Instr::Scale(*factor, 0))],
        Op::AddScalar { value } => vec![o(0), Ins::Plan(Instr::AddScalar(*value, 0))],
        Op::PowScalar { exponent } => vec![o(0), Ins::Plan(Instr::PowScalar(*exponent, 0))],
        Op::GeluGrad => vec![o(0), o(1), Ins::Plan(Instr::GeluGrad(0, 1))],
        Op::Dropout { p, key } => vec![o(0), Ins::Plan(Instr::Dropout { p: *p, key: *key, x: 0 })],
        Op::DropPath { p, key } => vec![o(0), Ins::Plan(Instr::DropPath { p: *p, key: *key, x: 0 })],
        Op::DivCount { count } => {
            let c = count.as_const().ok_or("the count is not fixed (plans have no symbolic batch)")?;
            vec![o(0), Ins::DivBy(c as f64, 0)]
        }
        Op::Cast { dtype } => vec![o(0), Ins::Plan(Instr::Cast(*dtype, 0))],
        other => return Err(format!("{} is not elementwise", other.name())),
    })
}

/// Lowers an elementwise op or a fused program.
pub fn lower(l: &mut Lowering, k: usize, op: &Op) -> Result<(), String> {
    let x = l.inputs(k)?;
    let out = l.output(k)?;
    if out.dtype == DType::I64 || x.iter().any(|v| v.dtype == DType::I64) {
        return integer(l, k, op, &x, &out);
    }
    if matches!(op, Op::DropPath { .. }) && out.shape.is_empty() {
        return Err("drop_path needs a sample axis, got a scalar []".into());
    }
    apply(l, k, &out, &x, &program_of(op)?)
}

/// Launches `body` over operands `x` (broadcast to `out`'s shape), writing
/// its last register to `out`: the elementwise kernel of any values, e.g.
/// a prologue into scratch or a bias added in place.
pub fn apply(l: &mut Lowering, k: usize, out: &Val, x: &[Val], body: &[Ins]) -> Result<(), String> {
    let modes: Vec<Mode> = x.iter().map(|v| mode(v, &out.shape)).collect::<Result<_, _>>()?;
    let index = |j: usize| match &modes[j] {
        Mode::Full => "i".to_string(),
        Mode::Scalar => "0".to_string(),
        Mode::Strided(_) => format!("tsr_at(i, dims, s{j})"),
    };
    let prog = render_body(body, x.len(), &index, l.plan.training)?;
    let rank = out.shape.len();
    let strided = modes.iter().any(|m| matches!(m, Mode::Strided(_)));
    let mut params: Vec<Param> = vec![param(&format!("{}*", c_type(out.dtype)?), "out"), param("i64", "n")];
    let mut args = vec![Arg::Ptr(out.ptr), Arg::I64(out.numel() as i64)];
    if strided {
        params.push(param(&format!("tsr_dims_{rank}"), "dims"));
        args.push(Arg::Bytes(dims_bytes(&out.shape.iter().map(|&d| d as i64).collect::<Vec<_>>())));
    }
    for (j, (v, m)) in x.iter().zip(&modes).enumerate() {
        params.push(param(&format!("const {}*", c_type(v.dtype)?), &format!("x{j}")));
        args.push(Arg::Ptr(v.ptr));
        if let Mode::Strided(s) = m {
            params.push(param(&format!("tsr_dims_{rank}"), &format!("s{j}")));
            args.push(Arg::Bytes(dims_bytes(s)));
        }
    }
    let last = body.len() - 1;
    let mut lines = prog.lines.clone();
    lines.push(format!("        tsr_store(out, i, r{last});"));
    push_scalar_params(&prog, &mut params, &mut args, out, l.rng);
    let src = render(rank, strided, &prog, lines.join("\n"), params)?;
    l.launch(k, src, grid_for(out.numel()), args);
    Ok(())
}

/// The parameters every program may read besides its tensors.
fn push_scalar_params(prog: &Program, params: &mut Vec<Param>, args: &mut Vec<Arg>, out: &Val, rng: DevPtr) {
    if !prog.scalars.is_empty() {
        params.push(param(&format!("tsr_scalars_{}", prog.scalars.len()), "sc"));
        args.push(Arg::Bytes(prog.scalars.iter().flat_map(|v| v.to_ne_bytes()).collect()));
    }
    if !prog.keys.is_empty() {
        params.push(param(&format!("tsr_keys_{}", prog.keys.len()), "keys"));
        args.push(Arg::Bytes(prog.keys.iter().flat_map(|v| v.to_ne_bytes()).collect()));
    }
    if prog.drop_path {
        let per_sample: u64 = out.shape.iter().skip(1).product::<u64>().max(1);
        params.push(param("i64", "per_sample"));
        args.push(Arg::I64(per_sample as i64));
    }
    if prog.random {
        params.push(param("const tsr_rng*", "rng"));
        args.push(Arg::Ptr(rng));
        params.push(param("i64", "drop_rows"));
        args.push(Arg::I64(out.shape.first().copied().unwrap_or(1) as i64));
    }
}

fn render(
    rank: usize,
    strided: bool,
    prog: &Program,
    body: String,
    params: Vec<Param>,
) -> Result<KernelSource, String> {
    let mut c = tera::Context::new();
    c.insert("rank", &if strided { rank } else { 0 });
    c.insert("scalars", &prog.scalars.len());
    c.insert("keys", &prog.keys.len());
    c.insert("random", &prog.random);
    c.insert("body", &body);
    KernelSource::render("elementwise", TEMPLATE, c, params)
}

/// Integer elementwise ops: i64 arithmetic and casts between i64 and f32,
/// as the CPU computes them (wrapping arithmetic, floor division, `as`).
fn integer(l: &mut Lowering, k: usize, op: &Op, x: &[Val], out: &Val) -> Result<(), String> {
    let (expr, ty_in) = match op {
        Op::Cast { .. } if x[0].dtype == DType::I64 && out.dtype != DType::I64 => ("(float)x0[i]".to_string(), "i64"),
        Op::Cast { .. } if x[0].dtype != DType::I64 && out.dtype == DType::I64 => {
            // Rust's `as`: truncation toward zero, saturating, NaN to 0.
            ("tsr_f2i(tsr_load(x0, i))".to_string(), c_type(x[0].dtype)?)
        }
        Op::Cast { .. } => ("x0[i]".to_string(), "i64"),
        _ => {
            return Err(format!(
                "{} on integer tensors is not supported by the CUDA backend (no shipped config makes it)",
                op.name()
            ))
        }
    };
    let store =
        if out.dtype == DType::I64 { format!("out[i] = {expr};") } else { format!("tsr_store(out, i, {expr});") };
    let template = "__device__ __forceinline__ i64 tsr_f2i(float v) {\n    if (v != v) { return 0; }\n    if (v >= 9223372036854775807.0f) { return 9223372036854775807LL; }\n    if (v <= -9223372036854775808.0f) { return (-9223372036854775807LL - 1); }\n    return (i64)v;\n}\nTSR_GLOBAL void {{ name }}({{ signature }}) {\n    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {\n        {{ store }}\n    }\n}\n";
    let mut c = tera::Context::new();
    c.insert("store", &store);
    let params = vec![
        param(&format!("{}*", c_type(out.dtype)?), "out"),
        param("i64", "n"),
        param(&format!("const {ty_in}*"), "x0"),
    ];
    let src = KernelSource::render("cast", template, c, params)?;
    l.launch(k, src, grid_for(out.numel()), vec![Arg::Ptr(out.ptr), Arg::I64(out.numel() as i64), Arg::Ptr(x[0].ptr)]);
    Ok(())
}

/// Writes `value` into every element of `v` (a non-scalar fill in the arena).
pub fn fill(l: &mut Lowering, k: usize, v: &Val, value: f64) -> Result<(), String> {
    let (store, arg) = if v.dtype == DType::I64 {
        ("out[i] = c;", Arg::I64(value as i64))
    } else {
        ("tsr_store(out, i, c);", Arg::F32(value as f32))
    };
    let cty = if v.dtype == DType::I64 { "i64" } else { "float" };
    let template = "TSR_GLOBAL void {{ name }}({{ signature }}) {\n    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {\n        {{ store }}\n    }\n}\n";
    let mut c = tera::Context::new();
    c.insert("store", store);
    let params = vec![param(&format!("{}*", c_type(v.dtype)?), "out"), param("i64", "n"), param(cty, "c")];
    let src = KernelSource::render("fill", template, c, params)?;
    l.launch(k, src, grid_for(v.numel()), vec![Arg::Ptr(v.ptr), Arg::I64(v.numel() as i64), arg]);
    Ok(())
}

/// Tensor sets per launch of a multi-tensor kernel (their pointers travel
/// by value in the kernel's parameters, under 4 KiB).
const SETS_PER_LAUNCH: usize = 24;

/// `MultiTensor`: the program once per tensor set, its result registers
/// written where the memory plan put each set's parts (in place over the
/// state they update). Sets go SETS_PER_LAUNCH to a launch, one grid row
/// (blockIdx.y) per set.
pub fn multi_tensor(l: &mut Lowering, k: usize, op: &Op) -> Result<(), String> {
    let Op::MultiTensor { body, arity, results } = op else { return Err("not a multi-tensor op".into()) };
    let arity = *arity as usize;
    let x = l.inputs(k)?;
    if arity == 0 || x.is_empty() || x.len() % arity != 0 {
        return Err(format!("{} operands do not make whole sets of {arity}", x.len()));
    }
    if body.iter().any(Instr::random) {
        return Err("a multi-tensor program has no random instructions".into());
    }
    // Parts of the packed result, by offset: result r of set j at r * total + offset_j.
    let parts: std::collections::HashMap<u64, usize> = l.parts(k).iter().copied().collect();
    let sets: Vec<&[Val]> = x.chunks(arity).collect();
    let numels: Vec<u64> = sets.iter().map(|s| s.iter().map(Val::numel).max().unwrap_or(0)).collect();
    let total: u64 = numels.iter().sum();
    // Operand slot j: its dtype, the same in every set; read at i or at 0.
    let slot_types: Vec<DType> = (0..arity).map(|j| sets[0][j].dtype).collect();
    // The packed result is stored nowhere (its parts are): its dtype only.
    let packed_dtype = l.plan.values[l.plan.kernels[k].output].dtype;
    for (s, set) in sets.iter().enumerate() {
        for (j, v) in set.iter().enumerate() {
            if v.dtype != slot_types[j] {
                return Err(format!("operand {j} of set {s} is {}, of set 0 {}", v.dtype, slot_types[j]));
            }
            if v.numel() != numels[s] && v.numel() != 1 {
                return Err(format!("operand {j} of set {s} is {:?}, neither the set's size nor a scalar", v.shape));
            }
        }
    }
    let index = |j: usize| format!("((scalar >> {j}) & 1 ? 0 : i)");
    let body_ins: Vec<Ins> = body.iter().cloned().map(Ins::Plan).collect();
    let prog = render_body(&body_ins, arity, &index, false)?;
    let mut lines = prog.lines.clone();
    for (r, &reg) in results.iter().enumerate() {
        if reg as usize >= body.len() {
            return Err(format!("result register {reg} does not exist"));
        }
        lines.push(format!("        if (out{r}) {{ tsr_store(out{r}, i, r{reg}); }}"));
    }
    let out_ty = c_type(packed_dtype)?;
    let mut offset = 0u64;
    for (chunk_index, chunk) in sets.chunks(SETS_PER_LAUNCH).enumerate() {
        let first = chunk_index * SETS_PER_LAUNCH;
        let n = chunk.len();
        // struct tsr_sets { const void* x[n][arity]; void* out[n][results]; i64 numel[n]; u32 scalar[n]; }
        let mut bytes: Vec<u8> = Vec::new();
        for set in chunk.iter() {
            for v in set.iter() {
                bytes.extend(v.ptr.0.to_ne_bytes());
            }
        }
        let mut set_offset = offset;
        for (s, _) in chunk.iter().enumerate() {
            for r in 0..results.len() {
                let at = r as u64 * total + set_offset;
                let ptr = match parts.get(&at) {
                    Some(&v) => l.value(v)?.ptr.0,
                    None => 0,
                };
                bytes.extend(ptr.to_ne_bytes());
            }
            set_offset += numels[first + s];
        }
        for s in 0..n {
            bytes.extend((numels[first + s] as i64).to_ne_bytes());
        }
        for set in chunk.iter() {
            // Bit j: operand j is read at index 0 (a scalar such as lr; a
            // one-element tensor is read there either way).
            let mask: u32 = set.iter().enumerate().fold(0, |m, (j, v)| if v.numel() == 1 { m | (1 << j) } else { m });
            bytes.extend(mask.to_ne_bytes());
        }
        while bytes.len() % 8 != 0 {
            bytes.push(0);
        }
        offset = set_offset;
        let mut c = tera::Context::new();
        c.insert("sets", &n);
        c.insert("arity", &arity);
        c.insert("results", &results.len());
        c.insert("in_types", &slot_types.iter().map(|d| c_type(*d)).collect::<Result<Vec<_>, _>>()?);
        c.insert("out_type", out_ty);
        c.insert("scalars", &prog.scalars.len());
        c.insert("body", &lines.join("\n"));
        let mut params = vec![param(&format!("tsr_sets_{n}"), "sets")];
        let mut args = vec![Arg::Bytes(bytes)];
        if !prog.scalars.is_empty() {
            params.push(param(&format!("tsr_scalars_{}", prog.scalars.len()), "sc"));
            args.push(Arg::Bytes(prog.scalars.iter().flat_map(|v| v.to_ne_bytes()).collect()));
        }
        let src = KernelSource::render("multi_tensor", MULTI_TEMPLATE, c, params)?;
        let largest = chunk.iter().enumerate().map(|(s, _)| numels[first + s]).max().unwrap_or(1);
        let mut shape = grid_for(largest);
        shape.grid[1] = n as u32;
        l.launch(k, src, shape, args);
    }
    Ok(())
}
