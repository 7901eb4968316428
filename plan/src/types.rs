//! Value types of the graph IR: dimensions (with a symbolic batch), shapes,
//! dtypes and parameter initialisers.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One dimension of a tensor. The batch is symbolic until a plan fixes it;
/// `Batch(k)` means `k * B`, which covers crops and views stacked along the
/// batch axis (SwAV's `nc * B`) and reshapes that fold the batch with tokens.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, PartialOrd, Ord)]
pub enum Dim {
    Const(u64),
    Batch(u64),
}

impl Dim {
    pub const B: Dim = Dim::Batch(1);

    /// The value with the batch fixed to `batch`.
    pub fn eval(self, batch: u64) -> u64 {
        match self {
            Dim::Const(n) => n,
            Dim::Batch(k) => k * batch,
        }
    }

    pub fn as_const(self) -> Option<u64> {
        match self {
            Dim::Const(n) => Some(n),
            Dim::Batch(_) => None,
        }
    }

    /// `self * n`. Returns `None` when both sides are batch-dependent
    /// (that would be `B^2`, which no model here needs).
    #[allow(clippy::should_implement_trait)] // partial (Option), unlike the operator traits
    pub fn mul(self, other: Dim) -> Option<Dim> {
        match (self, other) {
            (Dim::Const(a), Dim::Const(b)) => a.checked_mul(b).map(Dim::Const),
            (Dim::Batch(k), Dim::Const(n)) | (Dim::Const(n), Dim::Batch(k)) => k.checked_mul(n).map(Dim::Batch),
            (Dim::Batch(_), Dim::Batch(_)) => None,
        }
    }

    /// Exact division; `None` when it does not divide.
    #[allow(clippy::should_implement_trait)] // partial (Option), unlike the operator traits
    pub fn div(self, other: Dim) -> Option<Dim> {
        match (self, other) {
            (_, Dim::Const(0)) => None,
            (Dim::Const(a), Dim::Const(b)) if a % b == 0 => Some(Dim::Const(a / b)),
            (Dim::Batch(k), Dim::Const(n)) if k % n == 0 => Some(Dim::Batch(k / n)),
            (Dim::Batch(k), Dim::Batch(j)) if j != 0 && k % j == 0 => Some(Dim::Const(k / j)),
            _ => None,
        }
    }

    #[allow(clippy::should_implement_trait)] // partial (Option), unlike the operator traits
    pub fn add(self, other: Dim) -> Option<Dim> {
        match (self, other) {
            (Dim::Const(a), Dim::Const(b)) => a.checked_add(b).map(Dim::Const),
            (Dim::Batch(a), Dim::Batch(b)) => a.checked_add(b).map(Dim::Batch),
            (Dim::Batch(k), Dim::Const(0)) | (Dim::Const(0), Dim::Batch(k)) => Some(Dim::Batch(k)),
            _ => None,
        }
    }

    #[allow(clippy::should_implement_trait)] // partial (Option), unlike the operator traits
    pub fn sub(self, other: Dim) -> Option<Dim> {
        match (self, other) {
            (Dim::Const(a), Dim::Const(b)) => a.checked_sub(b).map(Dim::Const),
            (Dim::Batch(a), Dim::Batch(b)) if a == b => Some(Dim::Const(0)),
            (Dim::Batch(a), Dim::Batch(b)) => a.checked_sub(b).map(Dim::Batch),
            (Dim::Batch(k), Dim::Const(0)) => Some(Dim::Batch(k)),
            _ => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Const(n) => write!(f, "{n}"),
            Dim::Batch(1) => write!(f, "B"),
            Dim::Batch(k) => write!(f, "{k}B"),
        }
    }
}

/// A tensor shape: a list of dimensions, outermost first. Rank 0 is a scalar.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, Default)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    pub fn scalar() -> Shape {
        Shape(Vec::new())
    }
    pub fn consts(dims: &[u64]) -> Shape {
        Shape(dims.iter().map(|&d| Dim::Const(d)).collect())
    }
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    pub fn dims(&self) -> &[Dim] {
        &self.0
    }
    /// Number of elements with the batch fixed to `batch`.
    pub fn numel(&self, batch: u64) -> u64 {
        self.0.iter().map(|d| d.eval(batch)).product()
    }
    /// Number of elements when no dimension depends on the batch.
    pub fn const_numel(&self) -> Option<u64> {
        self.0.iter().map(|d| d.as_const()).product()
    }
    pub fn last(&self) -> Option<Dim> {
        self.0.last().copied()
    }
    /// `[..., K]` as the matrix `[product of the leading dims, K]` (how the
    /// products read an operand as rows); `None` for a scalar or when the
    /// product is no dim (the batch squared).
    pub fn as_rows(&self) -> Option<Shape> {
        let (&k, lead) = self.0.split_last()?;
        let m = lead.iter().try_fold(Dim::Const(1), |m, &d| m.mul(d))?;
        Some(Shape(vec![m, k]))
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum DType {
    F32,
    BF16,
    F16,
    I64,
}

impl DType {
    pub fn is_float(self) -> bool {
        !matches!(self, DType::I64)
    }
    pub fn size_bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::I64 => 8,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I64 => "i64",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Shape and dtype of one value: what an edge carries.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct TensorType {
    pub shape: Shape,
    pub dtype: DType,
}

impl TensorType {
    pub fn new(shape: Shape, dtype: DType) -> Self {
        TensorType { shape, dtype }
    }
    pub fn f32(shape: Shape) -> Self {
        TensorType { shape, dtype: DType::F32 }
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.shape, self.dtype)
    }
}

/// How a parameter or buffer is initialised. The runtime draws the values;
/// the IR only records the rule (VISSL's rules: reference sections 1.2, 2.2, 3).
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub enum Init {
    Zeros,
    Ones,
    Constant(f64),
    /// N(0, std^2) truncated at the absolute bounds [a, b] (timm's trunc_normal_).
    TruncNormal {
        std: f64,
        a: f64,
        b: f64,
    },
    /// N(0, std^2).
    Normal {
        std: f64,
    },
    /// trunc-normal with std = sqrt(1 / fan_in), fan_in = the product of all dims but
    /// the first (in_features of a Linear), bounds +-2 (VISSL's vision_transformer_head pre_logits).
    LecunNormal,
    /// PyTorch's default Linear/Conv init: kaiming-uniform with negative slope `a`
    /// (sqrt(5)), i.e. U(+-1/sqrt(fan_in)) for weights; `fan_in` is the product of
    /// all dims but the first. For biases, `fan_in` is given explicitly.
    KaimingUniform {
        a: f64,
        fan_in: Option<u64>,
    },
    /// U(low, high).
    Uniform {
        low: f64,
        high: f64,
    },
    /// The identity matrix (ConViT's `v.weight` under local init).
    Identity,
    /// ConViT's local init of `pos_proj.weight` [H, 3 * locality_dim] (reference 2.2):
    /// head h = h1 + k*h2 attends to offset (h1-c, h2-c), scaled by `strength`.
    ConvitLocal {
        strength: f64,
        locality_dim: u64,
    },
    /// ConViT's relative-position buffer [1, N, N, 3 * locality_dim] for an S x S grid:
    /// dx, dy, dx^2+dy^2, each repeated `locality_dim` times (reference 2.2).
    RelativePositions2d {
        grid: u64,
        locality_dim: u64,
    },
    /// Standard normal, then each column L2-normalised (MoCo's queue, reference 4.1).
    NormalColumnsNormalized,
    /// The [to*to, from*from] matrix of PyTorch's bicubic `F.interpolate`
    /// (A = -0.75, align_corners False, borders clamped) from a `from` x `from`
    /// grid with `scale_factor` (to `to` x `to`): VISSL's runtime resizing of
    /// ViT position embeddings for crops of another size (reference 1.6).
    BicubicResize {
        from: u64,
        to: u64,
        scale_factor: f64,
    },
}

impl fmt::Display for Init {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Init::Zeros => write!(f, "zeros"),
            Init::Ones => write!(f, "ones"),
            Init::Constant(v) => write!(f, "constant({v})"),
            Init::TruncNormal { std, a, b } => write!(f, "trunc_normal(std={std}, a={a}, b={b})"),
            Init::Normal { std } => write!(f, "normal(std={std})"),
            Init::LecunNormal => write!(f, "lecun_normal"),
            Init::KaimingUniform { a, fan_in: None } => write!(f, "kaiming_uniform(a={a:.4})"),
            Init::KaimingUniform { a, fan_in: Some(n) } => {
                write!(f, "kaiming_uniform(a={a:.4}, fan_in={n})")
            }
            Init::Uniform { low, high } => write!(f, "uniform({low}, {high})"),
            Init::Identity => write!(f, "identity"),
            Init::ConvitLocal { strength, locality_dim } => {
                write!(f, "convit_local(strength={strength}, locality_dim={locality_dim})")
            }
            Init::RelativePositions2d { grid, locality_dim } => {
                write!(f, "relative_positions_2d(grid={grid}, locality_dim={locality_dim})")
            }
            Init::NormalColumnsNormalized => write!(f, "normal_columns_normalized"),
            Init::BicubicResize { from, to, scale_factor } => {
                write!(f, "bicubic_resize(from={from}, to={to}, scale_factor={scale_factor})")
            }
        }
    }
}
