//! Transforms on the [0, 1] f32 CHW tensor: Normalize and RandomErasing.

use crate::rng::SampleRng;
use crate::tensor::Tensor;

/// `torchvision.transforms.Normalize(mean, std)`.
#[derive(Clone, Debug)]
pub struct Normalize {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalize {
    pub fn apply(&self, t: &mut Tensor) {
        t.normalize(&self.mean, &self.std);
    }
}

/// What RandomErasing writes into the erased box.
#[derive(Clone, Debug, PartialEq)]
pub enum EraseValue {
    /// One value per channel (a single value is used for all channels).
    Constant(Vec<f32>),
    /// `value="random"`: per-pixel standard normal noise.
    Random,
}

/// torchvision's `RandomErasing(p, scale, ratio, value)`. VISSL applies it to
/// the [0, 1] tensor before Normalize, with value 0.
#[derive(Clone, Debug)]
pub struct RandomErasing {
    pub p: f64,
    pub scale: [f64; 2],
    pub ratio: [f64; 2],
    pub value: EraseValue,
}

impl Default for RandomErasing {
    fn default() -> Self {
        RandomErasing { p: 0.5, scale: [0.02, 0.33], ratio: [0.3, 3.3], value: EraseValue::Constant(vec![0.0]) }
    }
}

impl RandomErasing {
    /// `RandomErasing.get_params`: (top, left, h, w), or `None` when all 10
    /// tries fail (the image is returned unchanged).
    pub fn get_params(
        height: usize,
        width: usize,
        scale: [f64; 2],
        ratio: [f64; 2],
        rng: &mut SampleRng,
    ) -> Option<[usize; 4]> {
        let area = (height * width) as f64;
        let (log_lo, log_hi) = (ratio[0].ln(), ratio[1].ln());
        for _ in 0..10 {
            let erase_area = area * rng.uniform_range(scale[0], scale[1]);
            let aspect = rng.uniform_range(log_lo, log_hi).exp();
            let h = (erase_area * aspect).sqrt().round_ties_even() as usize;
            let w = (erase_area / aspect).sqrt().round_ties_even() as usize;
            if !(h < height && w < width) {
                continue;
            }
            let top = rng.int_inclusive(0, (height - h) as i64) as usize;
            let left = rng.int_inclusive(0, (width - w) as i64) as usize;
            return Some([top, left, h, w]);
        }
        None
    }

    pub fn apply(&self, t: &mut Tensor, rng: &mut SampleRng) {
        if rng.uniform() >= self.p {
            return;
        }
        let Some([top, left, h, w]) = Self::get_params(t.height(), t.width(), self.scale, self.ratio, rng) else {
            return;
        };
        match &self.value {
            EraseValue::Constant(v) => t.erase(top, left, h, w, |c| v.get(c % v.len().max(1)).copied().unwrap_or(0.0)),
            EraseValue::Random => t.erase(top, left, h, w, |_| rng.normal() as f32),
        }
    }
}
