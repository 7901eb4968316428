//! `Fused { body }`: a register program of elementwise ops (see the
//! compiler's `ir/fused.rs`) run block by block. A block of `BLOCK` output
//! elements is evaluated instruction by instruction into scratch registers
//! that stay in L1; only operands are read from memory and only the result
//! is written, which is the point of fusing. Each instruction uses the same
//! slice function as its unfused kernel, so fused and unfused plans agree.

use super::broadcast::{broadcast_shape, broadcast_strides, coalesce};
use super::elementwise::{binary_into, gelu_grad_into, pow_into, round_bf16, unary_into};
use super::kernel::{f32_of, Ctx, PAR_CHUNK, PAR_MIN};
use super::pool;
use super::random::DropMask;
use super::simd::vectorized;
use crate::error::{invalid, KernelError};
use crate::tensor::{show_shape, Tensor};
use rayon::prelude::*;
use tessera_plan::{DType, Instr};

/// Elements per block: 16 registers of 512 f32 are 32 KiB.
const BLOCK: usize = 512;

/// How an operand is read at output positions.
enum Src<'a> {
    /// Same shape as the output: a slice, no copy.
    Contiguous(&'a [f32]),
    /// One element.
    Splat(f32),
    /// Broadcast: merged dims of the output and this operand's strides.
    Strided { data: &'a [f32], dims: Vec<usize>, strides: Vec<usize> },
}

impl Src<'_> {
    /// Writes the operand's values at output positions `start..start + out.len()`.
    #[inline(always)]
    fn load(&self, start: usize, out: &mut [f32]) {
        match self {
            Src::Contiguous(d) => out.copy_from_slice(&d[start..start + out.len()]),
            Src::Splat(v) => out.fill(*v),
            Src::Strided { data, dims, strides } => {
                for (e, o) in out.iter_mut().enumerate() {
                    let (mut flat, mut off) = (start + e, 0);
                    for d in (0..dims.len()).rev() {
                        off += (flat % dims[d]) * strides[d];
                        flat /= dims[d];
                    }
                    *o = data[off];
                }
            }
        }
    }
}

/// The shape the operands broadcast to, and how each is read at its positions.
fn sources<'a>(x: &[&'a Tensor]) -> Result<(Vec<usize>, Vec<Src<'a>>), KernelError> {
    let mut shape: Vec<usize> = Vec::new();
    for t in x {
        shape = broadcast_shape(&shape, &t.shape).ok_or_else(|| {
            invalid(format!("operand {} does not broadcast with {}", show_shape(&t.shape), show_shape(&shape)))
        })?;
    }
    let mut srcs = Vec::with_capacity(x.len());
    for (k, t) in x.iter().enumerate() {
        let d = f32_of(t, &format!("operand {k}"))?;
        srcs.push(if t.shape == shape {
            Src::Contiguous(d)
        } else if d.len() == 1 {
            Src::Splat(d[0])
        } else {
            let (dims, st) = coalesce(&shape, &[&broadcast_strides(&t.shape, &shape)]);
            Src::Strided { data: d, dims, strides: st.into_iter().next().expect("one operand") }
        });
    }
    Ok((shape, srcs))
}

pub fn fused(x: &[&Tensor], body: &[Instr], ctx: &Ctx) -> Result<Tensor, KernelError> {
    let (shape, srcs) = sources(x)?;
    let numel: usize = shape.iter().product();
    let mut masks: Vec<Option<DropMask>> = Vec::with_capacity(body.len());
    // Rows (axis 0) for the masks' data-parallel rank term.
    let rows = shape.first().copied().unwrap_or(1);
    for (i, instr) in body.iter().enumerate() {
        let reads_ok = instr.args().iter().all(|&a| (a as usize) < i);
        let operand_ok = !matches!(instr, Instr::Operand(k) if *k as usize >= x.len());
        if !reads_ok || !operand_ok {
            return Err(invalid(format!(
                "instruction {i} ({instr:?}) reads a register or operand that does not exist"
            )));
        }
        masks.push(match instr {
            Instr::Dropout { p, key, .. } => ctx.drop_mask(*p, *key, rows, numel / rows.max(1))?,
            Instr::DropPath { p, key, .. } => ctx.drop_mask(*p, *key, rows, 1)?,
            _ => None,
        });
    }
    if body.is_empty() {
        return Err(invalid("a fused op needs at least one instruction"));
    }
    let mut out = pool::buffer(numel);
    // Elements per sample (index along axis 0), for drop path.
    let per_sample = shape.iter().skip(1).product::<usize>().max(1);
    if body.iter().any(|i| matches!(i, Instr::DropPath { .. })) && shape.is_empty() {
        return Err(invalid("drop_path needs a sample axis, got a scalar []"));
    }
    let program = Program { body, srcs: &srcs, masks: &masks, per_sample };
    let task = |first: usize, chunk: &mut [f32], scratch: &mut Vec<f32>| {
        scratch.resize(body.len() * BLOCK, 0.0);
        vectorized(
            #[inline(always)]
            || {
                for (b, block) in chunk.chunks_mut(BLOCK).enumerate() {
                    program.block(first + b * BLOCK, block, scratch);
                }
            },
        )
    };
    if numel >= PAR_MIN {
        out.par_chunks_mut(PAR_CHUNK)
            .enumerate()
            .for_each_init(Vec::new, |scratch, (c, chunk)| task(c * PAR_CHUNK, chunk, scratch));
    } else {
        task(0, &mut out, &mut Vec::new());
    }
    Ok(Tensor::f32(shape, out))
}

/// `MultiTensor { body, arity, results }`: the program once per tensor set
/// (operands `j * arity ..`), registers `results` written as tensors of the
/// set's shape; returns them per set, per result. Sets run in parallel, each
/// block by block as `fused`'s.
pub fn multi_tensor(
    x: &[&Tensor],
    body: &[Instr],
    arity: usize,
    results: &[u32],
) -> Result<Vec<Vec<Tensor>>, KernelError> {
    if arity == 0 || !x.len().is_multiple_of(arity) {
        return Err(invalid(format!("{} operands do not make whole sets of {arity}", x.len())));
    }
    if body.is_empty() || body.iter().any(Instr::random) {
        return Err(invalid("a multi-tensor program needs instructions and has no random ones"));
    }
    if let Some(r) = results.iter().find(|&&r| r as usize >= body.len()) {
        return Err(invalid(format!("result register {r} does not exist")));
    }
    x.par_chunks(arity)
        .map(|set| {
            let (shape, srcs) = sources(set)?;
            let numel: usize = shape.iter().product();
            if let Some((i, _)) = body.iter().enumerate().find(|(i, instr)| {
                instr.args().iter().any(|&a| a as usize >= *i)
                    || matches!(instr, Instr::Operand(k) if *k as usize >= set.len())
            }) {
                return Err(invalid(format!("instruction {i} reads a register or operand that does not exist")));
            }
            let masks: Vec<Option<DropMask>> = body.iter().map(|_| None).collect();
            let program = Program { body, srcs: &srcs, masks: &masks, per_sample: 1 };
            let mut outs: Vec<Vec<f32>> = results.iter().map(|_| pool::buffer(numel)).collect();
            let mut scratch = vec![0.0f32; body.len() * BLOCK];
            vectorized(
                #[inline(always)]
                || {
                    let mut start = 0;
                    while start < numel {
                        let len = BLOCK.min(numel - start);
                        program.eval(start, len, &mut scratch, None);
                        for (o, &r) in outs.iter_mut().zip(results) {
                            o[start..start + len].copy_from_slice(program.register(r, start, len, &scratch));
                        }
                        start += len;
                    }
                },
            );
            Ok(outs.into_iter().map(|o| Tensor::f32(shape.clone(), o)).collect())
        })
        .collect()
}

struct Program<'a> {
    body: &'a [Instr],
    srcs: &'a [Src<'a>],
    masks: &'a [Option<DropMask>],
    per_sample: usize,
}

impl Program<'_> {
    /// Register r at elements `start..start + len` after `eval` (an operand
    /// register of a same-shape operand is read from the operand).
    #[inline(always)]
    fn register<'s>(&'s self, r: u32, start: usize, len: usize, scratch: &'s [f32]) -> &'s [f32] {
        match (&self.body[r as usize], self.srcs) {
            (Instr::Operand(k), srcs) => match &srcs[*k as usize] {
                Src::Contiguous(d) => &d[start..start + len],
                _ => &scratch[r as usize * BLOCK..][..len],
            },
            _ => &scratch[r as usize * BLOCK..][..len],
        }
    }

    /// Evaluates output elements `start..start + out.len()` into `out`.
    #[inline(always)]
    fn block(&self, start: usize, out: &mut [f32], scratch: &mut [f32]) {
        let len = out.len();
        self.eval(start, len, scratch, Some(out));
    }

    /// Evaluates every register at elements `start..start + len` into
    /// `scratch` (register r at `r * BLOCK`), the last one into `out` if given.
    #[inline(always)]
    fn eval(&self, start: usize, len: usize, scratch: &mut [f32], mut out: Option<&mut [f32]>) {
        let last = self.body.len() - 1;
        for (j, instr) in self.body.iter().enumerate() {
            let (done, rest) = scratch.split_at_mut(j * BLOCK);
            // Register r: a same-shape operand is read in place, others from scratch.
            let reg = |r: u32| -> &[f32] {
                match self.body[r as usize] {
                    Instr::Operand(k) => match &self.srcs[k as usize] {
                        Src::Contiguous(d) => &d[start..start + len],
                        _ => &done[r as usize * BLOCK..][..len],
                    },
                    _ => &done[r as usize * BLOCK..][..len],
                }
            };
            let into_out = j == last && out.is_some();
            let dst: &mut [f32] = match out.as_deref_mut() {
                Some(o) if j == last => o,
                _ => &mut rest[..len],
            };
            match *instr {
                Instr::Operand(k) => {
                    if into_out || !matches!(self.srcs[k as usize], Src::Contiguous(_)) {
                        self.srcs[k as usize].load(start, dst);
                    }
                }
                Instr::Unary(u, a) => unary_into(u, reg(a), dst),
                Instr::Binary(b, x, y) => binary_into(b, reg(x), reg(y), dst),
                Instr::Scale(f, a) => {
                    let f = f as f32;
                    dst.iter_mut().zip(reg(a)).for_each(|(o, &v)| *o = v * f);
                }
                Instr::AddScalar(c, a) => {
                    let c = c as f32;
                    dst.iter_mut().zip(reg(a)).for_each(|(o, &v)| *o = v + c);
                }
                Instr::PowScalar(e, a) => pow_into(e, reg(a), dst),
                // bf16 registers hold f32 numbers bf16 can hold (as the
                // unfused cast); f32 and f16 are copies.
                Instr::Cast(DType::BF16, a) => dst.iter_mut().zip(reg(a)).for_each(|(o, &v)| *o = round_bf16(v)),
                Instr::Cast(_, a) => dst.copy_from_slice(reg(a)),
                Instr::GeluGrad(x, g) => gelu_grad_into(reg(x), reg(g), dst),
                Instr::Dropout { x, .. } => {
                    dst.copy_from_slice(reg(x));
                    if let Some(m) = &self.masks[j] {
                        m.apply(dst, start as u64);
                    }
                }
                Instr::DropPath { x, .. } => {
                    dst.copy_from_slice(reg(x));
                    if let Some(m) = &self.masks[j] {
                        // One factor per sample; a block may span several samples.
                        let mut e = 0;
                        while e < len {
                            let sample = (start + e) / self.per_sample;
                            let end = ((sample + 1) * self.per_sample - start).min(len);
                            let f = m.factor(sample as u64);
                            dst[e..end].iter_mut().for_each(|v| *v *= f);
                            e = end;
                        }
                    }
                }
            }
        }
    }
}
