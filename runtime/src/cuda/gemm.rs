//! Matrix products in cuBLASLt's terms, and the host routine that computes
//! exactly what such a descriptor asks for.
//!
//! cuBLASLt is column-major: D (m x n) = alpha op(A) op(B) + beta C, op(A)
//! m x k and op(B) k x n, each matrix at `ptr + batch * stride` with its
//! leading dimension; element (i, j) of a stored matrix is at `i + j * ld`.
//! A row-major product C[M, N] = X[M, K] Y[K, N] is the column-major C^T =
//! Y^T X^T, so the plan's products map with m = N, n = M, A = Y, B = X
//! (`GemmDesc::row_major`). The BIAS epilogue adds `bias[i]` to row i of D
//! (a row-major output's column: a linear layer's output feature).
//!
//! Invariant: `host_gemm` reads the very fields the cuBLASLt calls read
//! (`driver::prepare_gemm`): transposes, leading dimensions, batch strides,
//! element types, epilogue, so a descriptor that is wrong fails on the host.

use super::device::{DResult, DeviceError, GemmPtrs};
use half::bf16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElemType {
    F32,
    BF16,
}

impl ElemType {
    pub fn size(self) -> u64 {
        match self {
            ElemType::F32 => 4,
            ElemType::BF16 => 2,
        }
    }
}

/// The most alignment cuBLASLt asks of an operand (its default).
pub const MAX_ALIGN: u32 = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Epilogue {
    None,
    /// D += bias broadcast along columns (bias has m elements, of D's type).
    Bias,
}

/// One matrix operand: its stored layout (rows x cols of the *stored*
/// matrix, column-major), leading dimension and batch stride, in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    pub ty: ElemType,
    pub rows: u64,
    pub cols: u64,
    pub ld: u64,
    pub batch_stride: u64,
}

/// Everything a cuBLASLt matmul is prepared from. Computation is f32
/// (CUBLAS_COMPUTE_32F; TF32 off unless `tf32`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmDesc {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub a: Layout,
    pub b: Layout,
    /// C and D share this layout (beta = 0 ignores C's contents).
    pub d: Layout,
    pub batch: u64,
    pub alpha: f32,
    pub beta: f32,
    pub epilogue: Epilogue,
    pub tf32: bool,
    /// cuBLASLt's workspace (`tessera_plan::scratch::gemm_workspace`).
    pub workspace: u64,
    /// The bytes every matrix of A, B, C and D (each batch's) is aligned
    /// to, at most 256: cuBLASLt's heuristic may pick an algorithm that
    /// assumes 256 unless told (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*), and
    /// an operand at an offset (a product's outer loop, a view of rows)
    /// can be less aligned. `aligned_to` sets it from the pointers.
    pub align: [u32; 4],
}

impl GemmDesc {
    /// The row-major product `out[b] = x[b] @ y[b]` (x [M, K], y [K, N];
    /// cuBLASLt's A is then y and its B is x: `GemmPtrs { a: y, b: x, .. }`;
    /// `tx` / `ty` read x as [K, M] / y as [N, K], stored transposed),
    /// `batch` matrices `x_stride` / `y_stride` / `out_stride` elements apart.
    #[allow(clippy::too_many_arguments)]
    pub fn row_major(
        m: u64,
        n: u64,
        k: u64,
        x: (ElemType, bool, u64),
        y: (ElemType, bool, u64),
        out: (ElemType, u64),
        batch: u64,
    ) -> GemmDesc {
        let (x_ty, tx, x_stride) = x;
        let (y_ty, ty, y_stride) = y;
        // Column-major: D^T (N x M) = op(A) (N x K) op(B) (K x M), A = y, B = x.
        // y row-major [K, N] is column-major N x K with ld N: op(A) = A as
        // stored; y stored [N, K] (ty) is column-major K x N, ld K: transposed.
        let a = if ty {
            Layout { ty: y_ty, rows: k, cols: n, ld: k, batch_stride: y_stride }
        } else {
            Layout { ty: y_ty, rows: n, cols: k, ld: n, batch_stride: y_stride }
        };
        // x row-major [M, K] is column-major K x M, ld K: op(B) as stored;
        // x stored [K, M] (tx) is column-major M x K, ld M: transposed.
        let b = if tx {
            Layout { ty: x_ty, rows: m, cols: k, ld: m, batch_stride: x_stride }
        } else {
            Layout { ty: x_ty, rows: k, cols: m, ld: k, batch_stride: x_stride }
        };
        let (out_ty, out_stride) = out;
        GemmDesc {
            trans_a: ty,
            trans_b: tx,
            m: n,
            n: m,
            k,
            a,
            b,
            d: Layout { ty: out_ty, rows: n, cols: m, ld: n, batch_stride: out_stride },
            batch,
            alpha: 1.0,
            beta: 0.0,
            epilogue: Epilogue::None,
            tf32: false,
            workspace: 0,
            align: [MAX_ALIGN; 4],
        }
    }

    /// This descriptor for the operands at `p`: `align` from their
    /// addresses and, with several batches, their batch strides (C as D's
    /// when beta is zero: not read).
    pub fn aligned_to(mut self, p: &GemmPtrs) -> GemmDesc {
        let batched = self.batch > 1;
        let of = |ptr: u64, l: &Layout| {
            let stride = if batched { l.batch_stride * l.ty.size() } else { 0 };
            [ptr, stride]
                .iter()
                .filter(|&&x| x != 0)
                .map(|&x| 1u64 << x.trailing_zeros().min(8))
                .fold(MAX_ALIGN as u64, u64::min) as u32
        };
        let d = of(p.d.0, &self.d);
        let c = if self.beta != 0.0 { of(p.c.0, &self.d) } else { d };
        self.align = [of(p.a.0, &self.a), of(p.b.0, &self.b), c, d];
        self
    }

    /// Whether the operands at `p` are as aligned as `align` says.
    pub fn alignment_holds(&self, p: &GemmPtrs) -> Result<(), String> {
        let held = self.aligned_to(p).align;
        for (i, name) in ["A", "B", "C", "D"].iter().enumerate() {
            if held[i] < self.align[i] {
                return Err(format!(
                    "GEMM operand {name} is aligned to {} bytes, its algorithm was chosen for {}",
                    held[i], self.align[i]
                ));
            }
        }
        Ok(())
    }

    /// Checks that the layouts hold op(A), op(B) and D of the product's sizes.
    pub fn check(&self) -> Result<(), String> {
        let (ar, ac) = if self.trans_a { (self.k, self.m) } else { (self.m, self.k) };
        let (br, bc) = if self.trans_b { (self.n, self.k) } else { (self.k, self.n) };
        let fits = |l: &Layout, r: u64, c: u64, what: &str| {
            if l.rows != r || l.cols != c || l.ld < r.max(1) {
                Err(format!("{what} is stored {}x{} ld {}, the product needs {r}x{c}", l.rows, l.cols, l.ld))
            } else {
                Ok(())
            }
        };
        fits(&self.a, ar, ac, "A")?;
        fits(&self.b, br, bc, "B")?;
        fits(&self.d, self.m, self.n, "D")?;
        if self.batch == 0 {
            return Err("a GEMM needs at least one batch".into());
        }
        Ok(())
    }
}

/// Reads element `i` of a matrix of type `ty` at `base`.
///
/// # Safety
/// `base` points at device (here: host) memory holding the element.
unsafe fn load(ty: ElemType, base: u64, i: u64) -> f32 {
    match ty {
        ElemType::F32 => *(base as *const f32).add(i as usize),
        ElemType::BF16 => (*(base as *const bf16).add(i as usize)).to_f32(),
    }
}

unsafe fn store(ty: ElemType, base: u64, i: u64, v: f32) {
    match ty {
        ElemType::F32 => *(base as *mut f32).add(i as usize) = v,
        ElemType::BF16 => *(base as *mut bf16).add(i as usize) = bf16::from_f32(v),
    }
}

/// The product `desc` describes, on host memory: f32 accumulation over
/// operands read (and bf16 converted) as cuBLASLt reads them.
///
/// # Safety
/// Every pointer of `p` addresses host memory large enough for its layout.
pub unsafe fn host_gemm(desc: &GemmDesc, p: &GemmPtrs) -> DResult<()> {
    desc.check().map_err(DeviceError)?;
    let (m, n, k) = (desc.m as usize, desc.n as usize, desc.k as usize);
    let mut a = vec![0f32; m * k];
    let mut b = vec![0f32; k * n];
    let mut d = vec![0f32; m * n];
    for batch in 0..desc.batch {
        let a_base = p.a.0 + batch * desc.a.batch_stride * desc.a.ty.size();
        let b_base = p.b.0 + batch * desc.b.batch_stride * desc.b.ty.size();
        let d_base = p.d.0 + batch * desc.d.batch_stride * desc.d.ty.size();
        let c_base = p.c.0 + batch * desc.d.batch_stride * desc.d.ty.size();
        // op(A) and op(B) gathered dense, row-major (i * k + l), in f32.
        for i in 0..m {
            for l in 0..k {
                let at = if desc.trans_a { l + i * desc.a.ld as usize } else { i + l * desc.a.ld as usize };
                a[i * k + l] = load(desc.a.ty, a_base, at as u64);
            }
        }
        for l in 0..k {
            for j in 0..n {
                let at = if desc.trans_b { j + l * desc.b.ld as usize } else { l + j * desc.b.ld as usize };
                b[l * n + j] = load(desc.b.ty, b_base, at as u64);
            }
        }
        gemm::gemm(
            m,
            n,
            k,
            d.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
        for i in 0..m {
            let bias = match desc.epilogue {
                Epilogue::Bias => load(desc.d.ty, p.bias.0, i as u64),
                Epilogue::None => 0.0,
            };
            for j in 0..n {
                let at = (i + j * desc.d.ld as usize) as u64;
                let mut v = desc.alpha * d[i * n + j];
                if desc.beta != 0.0 {
                    v += desc.beta * load(desc.d.ty, c_base, at);
                }
                store(desc.d.ty, d_base, at, v + bias);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::device::DevPtr;

    /// The pointers of row-major `x @ y`: cuBLASLt's A is y, B is x.
    fn ptrs(x: &[f32], y: &[f32], d: &mut [f32], bias: &[f32]) -> GemmPtrs {
        GemmPtrs {
            a: DevPtr(y.as_ptr() as u64),
            b: DevPtr(x.as_ptr() as u64),
            c: DevPtr(d.as_ptr() as u64),
            d: DevPtr(d.as_mut_ptr() as u64),
            bias: DevPtr(bias.as_ptr() as u64),
            workspace: DevPtr::NULL,
            workspace_bytes: 0,
        }
    }

    /// Row-major x [2,3] @ y [3,2] through the column-major descriptor, with
    /// and without transposed storage, against the product written out.
    #[test]
    fn row_major_products_map_onto_column_major_descriptors() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0f32]; // [2,3]
        let y = [1.0, -1.0, 0.5, 2.0, -2.0, 1.0f32]; // [3,2]
        let expect = [1.0 + 1.0 - 6.0, -1.0 + 4.0 + 3.0, 4.0 + 2.5 - 12.0, -4.0 + 10.0 + 6.0];
        let f = ElemType::F32;
        let mut d = [0f32; 4];
        let desc = GemmDesc::row_major(2, 2, 3, (f, false, 0), (f, false, 0), (f, 0), 1);
        unsafe { host_gemm(&desc, &ptrs(&x, &y, &mut d, &[])).unwrap() };
        assert_eq!(d, expect);
        // x stored transposed ([3,2]) and y stored transposed ([2,3]).
        let xt = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0f32];
        let yt = [1.0, 0.5, -2.0, -1.0, 2.0, 1.0f32];
        let mut d = [0f32; 4];
        let desc = GemmDesc::row_major(2, 2, 3, (f, true, 0), (f, true, 0), (f, 0), 1);
        unsafe { host_gemm(&desc, &ptrs(&xt, &yt, &mut d, &[])).unwrap() };
        assert_eq!(d, expect);
        // A bias per output column of the row-major result.
        let mut d = [0f32; 4];
        let mut desc = GemmDesc::row_major(2, 2, 3, (f, false, 0), (f, false, 0), (f, 0), 1);
        desc.epilogue = Epilogue::Bias;
        unsafe { host_gemm(&desc, &ptrs(&x, &y, &mut d, &[10.0, 20.0])).unwrap() };
        assert_eq!(d, [expect[0] + 10.0, expect[1] + 20.0, expect[2] + 10.0, expect[3] + 20.0]);
    }

    /// Alignment from the addresses and, with batches, the batch strides.
    #[test]
    fn alignment_is_the_least_of_the_addresses_and_batch_strides() {
        let (f, h) = (ElemType::F32, ElemType::BF16);
        let at = |a: u64, b: u64, c: u64, d: u64| GemmPtrs {
            a: DevPtr(a),
            b: DevPtr(b),
            c: DevPtr(c),
            d: DevPtr(d),
            bias: DevPtr::NULL,
            workspace: DevPtr::NULL,
            workspace_bytes: 0,
        };
        let one = GemmDesc::row_major(4, 4, 4, (f, false, 0), (f, false, 0), (f, 0), 1);
        assert_eq!(one.aligned_to(&at(0x1000, 0x2040, 0, 0x3010)).align, [256, 64, 16, 16]);
        // x (cuBLASLt's B) in batches 3 bf16 elements apart: 6 bytes, so
        // 2-byte aligned; D (and C, read) 16 f32 apart.
        let mut three = GemmDesc::row_major(4, 4, 4, (h, false, 3), (h, false, 0), (f, 16), 3);
        three.beta = 1.0;
        let aligned = three.aligned_to(&at(0x1000, 0x2000, 0x3000, 0x4000));
        assert_eq!(aligned.align, [256, 2, 64, 64]);
        let e = aligned.alignment_holds(&at(0x1000, 0x2000, 0x3008, 0x4000)).unwrap_err();
        assert!(e.contains("operand C is aligned to 8 bytes, its algorithm was chosen for 64"), "{e}");
    }

    #[test]
    fn a_layout_that_does_not_hold_the_operand_is_refused() {
        let f = ElemType::F32;
        let mut desc = GemmDesc::row_major(2, 2, 3, (f, false, 0), (f, false, 0), (f, 0), 1);
        desc.a.ld = 1;
        assert!(desc.check().unwrap_err().contains("A is stored"));
    }
}
