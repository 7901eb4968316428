//! Host tensors: a shape and a flat row-major buffer of f32 or i64. What
//! every backend takes and gives on the host side: batches, state read back,
//! outputs.
//!
//! The plan records bf16 and f16 dtypes (the precision policy); on the host
//! every float dtype is `Data::F32` (the CPU backend stores bf16 values as
//! f32 rounded to bf16; the CUDA backend converts on upload and read-back).

use crate::error::RuntimeError;
use tessera_plan::DType;

#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The storage type's name, `f32` or `i64`.
    pub fn kind(&self) -> &'static str {
        match self {
            Data::F32(_) => "f32",
            Data::I64(_) => "i64",
        }
    }
}

/// A row-major tensor. A scalar has shape `[]` and one element.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

/// `[2,3,4]`, the way errors show shapes.
pub fn show_shape(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(","))
}

/// Whether values of `dtype` are stored as f32 on the CPU (every float dtype).
pub fn stored_as_f32(dtype: DType) -> bool {
    dtype.is_float()
}

impl Tensor {
    /// A tensor from a shape and its data; the element count must match.
    pub fn new(shape: Vec<usize>, data: Data) -> Result<Tensor, RuntimeError> {
        let numel: usize = shape.iter().product();
        if data.len() != numel {
            return Err(RuntimeError::DataLength { shape, len: data.len(), numel });
        }
        Ok(Tensor { shape, data })
    }

    /// An f32 tensor.
    ///
    /// # Panics
    /// If `data.len()` is not the product of `shape` (use `Tensor::new` for
    /// data that comes from outside the program).
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        Tensor::new(shape, Data::F32(data)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// An i64 tensor. Panics like `Tensor::f32`.
    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Tensor {
        Tensor::new(shape, Data::I64(data)).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn scalar_f32(v: f32) -> Tensor {
        Tensor { shape: vec![], data: Data::F32(vec![v]) }
    }

    pub fn scalar_i64(v: i64) -> Tensor {
        Tensor { shape: vec![], data: Data::I64(vec![v]) }
    }

    /// Zeros of `dtype` (float dtypes are stored as f32).
    pub fn zeros(shape: Vec<usize>, dtype: DType) -> Tensor {
        Tensor::full(shape, dtype, 0.0)
    }

    /// Every element `value` (cast with `as` for i64).
    pub fn full(shape: Vec<usize>, dtype: DType, value: f64) -> Tensor {
        let n = shape.iter().product();
        let data =
            if stored_as_f32(dtype) { Data::F32(vec![value as f32; n]) } else { Data::I64(vec![value as i64; n]) };
        Tensor { shape, data }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            Data::I64(_) => None,
        }
    }

    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            Data::I64(v) => Some(v),
            Data::F32(_) => None,
        }
    }

    pub fn as_f32_mut(&mut self) -> Option<&mut [f32]> {
        match &mut self.data {
            Data::F32(v) => Some(v),
            Data::I64(_) => None,
        }
    }

    pub fn into_f32(self) -> Option<Vec<f32>> {
        match self.data {
            Data::F32(v) => Some(v),
            Data::I64(_) => None,
        }
    }

    /// Whether this tensor can hold a value of the plan type (`shape`, `dtype`).
    /// (The data length is checked too, since the fields are public.)
    pub fn has_type(&self, shape: &[usize], dtype: DType) -> bool {
        self.shape == shape
            && self.data.len() == shape.iter().product::<usize>()
            && matches!(&self.data, Data::F32(_)) == stored_as_f32(dtype)
    }

    /// `[2,3] f32`, for messages.
    pub fn describe(&self) -> String {
        format!("{} {}", show_shape(&self.shape), self.data.kind())
    }
}

/// `[2,3] bf16 (stored as f32)`, the plan type as the CPU holds it.
pub fn describe_type(shape: &[usize], dtype: DType) -> String {
    if stored_as_f32(dtype) && dtype != DType::F32 {
        format!("{} {dtype} (stored as f32)", show_shape(shape))
    } else {
        format!("{} {dtype}", show_shape(shape))
    }
}
