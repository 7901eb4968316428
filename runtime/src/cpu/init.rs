//! Parameter and buffer initialisation from the plan's `Init` rules
//! (VISSL's rules: reference 1.2, 2.2, 3, 4.1).
//!
//! Every random value of state `name` is drawn from
//! `Stream::new(seed, u64::MAX, fnv1a32(name))` at the element's flat index,
//! so a tensor depends only on (seed, name, shape): not on plan order, batch
//! size, or which backend runs the plan. Step `u64::MAX` keeps these draws
//! apart from every training step's masks. Uniforms use all 32 bits of a draw
//! and lie strictly inside (0, 1), so logarithms and quantiles stay finite.

use super::special::{normal_cdf_precise, normal_quantile};
use crate::philox::Stream;
use crate::tensor::{stored_as_f32, Data, Tensor};
use rayon::prelude::*;
use std::f64::consts::PI;
use tessera_plan::{DType, Init};

/// The 32-bit FNV-1a hash of `name`: the random-stream key of a state.
pub fn fnv1a32(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

/// Uniform in (0, 1) from the 32-bit draw `index`.
#[inline]
fn uniform(s: &Stream, index: u64) -> f64 {
    (s.u32_at(index) as f64 + 0.5) * (1.0 / 4_294_967_296.0)
}

/// Standard normal for element `i` by Box-Muller: elements 2j and 2j+1 are
/// the cosine and sine halves of the pair made from draws 2j and 2j+1.
#[inline]
fn standard_normal(s: &Stream, i: u64) -> f64 {
    let j = i & !1;
    let r = (-2.0 * uniform(s, j).ln()).sqrt();
    let theta = 2.0 * PI * uniform(s, j + 1);
    if i & 1 == 0 {
        r * theta.cos()
    } else {
        r * theta.sin()
    }
}

/// timm's trunc_normal_ by inverse CDF: p uniform in [Phi(a/std), Phi(b/std)],
/// x = std * Phi^{-1}(p), clamped to the absolute bounds [a, b].
#[derive(Clone, Copy)]
struct TruncNormal {
    std: f64,
    a: f64,
    b: f64,
    lo: f64,
    hi: f64,
}

impl TruncNormal {
    fn new(std: f64, a: f64, b: f64) -> Result<Self, String> {
        let valid = std > 0.0 && a < b; // false for NaNs too
        if !valid {
            return Err(format!("needs std > 0 and a < b, got std {std}, a {a}, b {b}"));
        }
        Ok(TruncNormal { std, a, b, lo: normal_cdf_precise(a / std), hi: normal_cdf_precise(b / std) })
    }

    #[inline]
    fn draw(&self, s: &Stream, i: u64) -> f64 {
        let p = self.lo + (self.hi - self.lo) * uniform(s, i);
        (self.std * normal_quantile(p)).clamp(self.a, self.b)
    }
}

/// `f(i)` for every flat index, in parallel for large tensors.
fn generate(n: usize, f: impl Fn(u64) -> f64 + Sync) -> Vec<f32> {
    if n >= 1 << 14 {
        (0..n).into_par_iter().map(|i| f(i as u64) as f32).collect()
    } else {
        (0..n).map(|i| f(i as u64) as f32).collect()
    }
}

/// Product of all dims but the first (PyTorch's fan_in of a weight).
fn fan_in(shape: &[usize]) -> Result<usize, String> {
    if shape.len() < 2 {
        return Err(format!("fan_in needs a weight of rank >= 2, got rank {}", shape.len()));
    }
    Ok(shape[1..].iter().product())
}

/// The initial value of state `name` with type (`shape`, `dtype`).
pub fn init_tensor(name: &str, init: &Init, shape: &[usize], dtype: DType, seed: u64) -> Result<Tensor, String> {
    let n: usize = shape.iter().product();
    let constant = |v: f64| Tensor::full(shape.to_vec(), dtype, v);
    match init {
        Init::Zeros => return Ok(constant(0.0)),
        Init::Ones => return Ok(constant(1.0)),
        Init::Constant(v) => return Ok(constant(*v)),
        _ if !stored_as_f32(dtype) => return Err(format!("{dtype} state can only be constant-initialised")),
        _ => {}
    }
    let s = Stream::new(seed, u64::MAX, fnv1a32(name));
    let data = match *init {
        Init::Zeros | Init::Ones | Init::Constant(_) => unreachable!("handled above"),
        Init::Uniform { low, high } => generate(n, |i| low + (high - low) * uniform(&s, i)),
        Init::Normal { std } => generate(n, |i| std * standard_normal(&s, i)),
        Init::TruncNormal { std, a, b } => {
            let t = TruncNormal::new(std, a, b)?;
            generate(n, |i| t.draw(&s, i))
        }
        Init::LecunNormal => {
            let t = TruncNormal::new((1.0 / fan_in(shape)? as f64).sqrt(), -2.0, 2.0)?;
            generate(n, |i| t.draw(&s, i))
        }
        Init::KaimingUniform { a, fan_in: given } => {
            let fan = match given {
                Some(f) => f as usize,
                None => fan_in(shape)?,
            };
            if fan == 0 {
                return Err("fan_in is 0".into());
            }
            let bound = (6.0 / ((1.0 + a * a) * fan as f64)).sqrt();
            generate(n, |i| bound * (2.0 * uniform(&s, i) - 1.0))
        }
        Init::Identity => {
            let [rows, cols] = shape[..] else {
                return Err(format!("identity needs a 2-d shape, got rank {}", shape.len()));
            };
            generate(rows * cols, |i| f64::from(i as usize / cols == i as usize % cols))
        }
        Init::ConvitLocal { strength, locality_dim } => convit_local(&s, shape, strength, locality_dim as usize)?,
        Init::RelativePositions2d { grid, locality_dim } => {
            relative_positions(shape, grid as usize, locality_dim as usize)?
        }
        Init::BicubicResize { from, to, scale_factor } => {
            bicubic_resize(shape, from as usize, to as usize, scale_factor)?
        }
        Init::NormalColumnsNormalized => {
            let [_, cols] = shape[..] else {
                return Err(format!("needs a 2-d [dim, length] shape, got rank {}", shape.len()));
            };
            let mut v: Vec<f64> = (0..n as u64).map(|i| standard_normal(&s, i)).collect();
            // F.normalize(dim=0): each column over the rows, eps 1e-12.
            for c in 0..cols {
                let norm = v.iter().skip(c).step_by(cols).map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
                v.iter_mut().skip(c).step_by(cols).for_each(|x| *x /= norm);
            }
            v.into_iter().map(|x| x as f32).collect()
        }
    };
    Ok(Tensor { shape: shape.to_vec(), data: Data::F32(data) })
}

/// PyTorch's bicubic `F.interpolate` (align_corners False, scale_factor
/// given) from a `from` x `from` grid to `to` x `to` as a matrix on row-major
/// grid positions: out[(y, x)] = sum A[y, i] A[x, j] in[(i, j)], where row d of
/// the 1-d matrix A puts the cubic-convolution weights (A = -0.75) of source
/// coordinate (d + 0.5) / scale_factor - 0.5 on its four neighbours, indices
/// clamped to the grid (upsample_bicubic2d).
fn bicubic_resize(shape: &[usize], from: usize, to: usize, scale_factor: f64) -> Result<Vec<f32>, String> {
    if shape != [to * to, from * from] {
        return Err(format!("needs [{}, {}], got {shape:?}", to * to, from * from));
    }
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let mut one = vec![0f64; to * from];
    for d in 0..to {
        let src = (d as f64 + 0.5) / scale_factor - 0.5;
        let base = src.floor();
        let t = src - base;
        let weights = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
        for (k, w) in weights.iter().enumerate() {
            let i = (base as i64 - 1 + k as i64).clamp(0, from as i64 - 1) as usize;
            one[d * from + i] += w;
        }
    }
    let mut m = vec![0f32; to * to * from * from];
    for (y, x) in (0..to).flat_map(|y| (0..to).map(move |x| (y, x))) {
        for (i, j) in (0..from).flat_map(|i| (0..from).map(move |j| (i, j))) {
            m[(y * to + x) * from * from + i * from + j] = (one[y * from + i] * one[x * from + j]) as f32;
        }
    }
    Ok(m)
}

/// ConViT's local init of `pos_proj.weight` [H, 3 L_d] (reference 2.2): with
/// k = int(sqrt(H)) and centre c = (k-1)/2, head h = h1 + k h2 gets
/// [2(h2-c)] * L_d, [2(h1-c)] * L_d, [-1] * L_d. Heads past k^2 keep the
/// trunc_normal(0.02) they had before; as in ConViT's `local_init`, the whole
/// matrix is then multiplied by the strength.
fn convit_local(s: &Stream, shape: &[usize], strength: f64, ld: usize) -> Result<Vec<f32>, String> {
    let [heads, width] = shape[..] else {
        return Err(format!("needs [heads, 3 * locality_dim], got rank {}", shape.len()));
    };
    if width != 3 * ld {
        return Err(format!("needs [heads, {}] for locality_dim {ld}, got width {width}", 3 * ld));
    }
    let k = (0..=heads).take_while(|k| k * k <= heads).last().unwrap_or(0);
    // (k-1)/2 for even k; k//2 for odd k, which is the same number.
    let centre = (k as f64 - 1.0) / 2.0;
    let t = TruncNormal::new(0.02, -2.0, 2.0)?;
    let mut w: Vec<f64> = (0..(heads * width) as u64).map(|i| t.draw(s, i)).collect();
    for h1 in 0..k {
        for h2 in 0..k {
            let row = &mut w[(h1 + k * h2) * width..][..width];
            row[..ld].fill(2.0 * (h2 as f64 - centre));
            row[ld..2 * ld].fill(2.0 * (h1 as f64 - centre));
            row[2 * ld..].fill(-1.0);
        }
    }
    Ok(w.into_iter().map(|v| (v * strength) as f32).collect())
}

/// ConViT's `rel_indices` [1, N, N, 3 L_d] for an S x S grid (reference 2.2):
/// for query i and key j with x = idx mod S, y = idx div S, the channels hold
/// dx = x_j - x_i, dy = y_j - y_i and dx^2 + dy^2, each L_d times.
fn relative_positions(shape: &[usize], grid: usize, ld: usize) -> Result<Vec<f32>, String> {
    let n = grid * grid;
    if shape != [1, n, n, 3 * ld] {
        return Err(format!("needs shape [1, {n}, {n}, {}] for grid {grid}, got {shape:?}", 3 * ld));
    }
    let mut out = Vec::with_capacity(n * n * 3 * ld);
    for i in 0..n {
        for j in 0..n {
            let dx = (j % grid) as f32 - (i % grid) as f32;
            let dy = (j / grid) as f32 - (i / grid) as f32;
            out.extend(std::iter::repeat_n(dx, ld));
            out.extend(std::iter::repeat_n(dy, ld));
            out.extend(std::iter::repeat_n(dx * dx + dy * dy, ld));
        }
    }
    Ok(out)
}
