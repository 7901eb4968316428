//! Geometric transforms: RandomResizedCrop, ImgPilToMultiCrop, Resize,
//! CenterCrop (torchvision semantics, PIL path).

use crate::functional::{self, Filter};
use crate::image::Image;
use crate::rng::SampleRng;

/// A crop box: rows `top..top+height`, columns `left..left+width`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

/// `torchvision.transforms.RandomResizedCrop(size, scale, ratio, interpolation)`.
#[derive(Clone, Debug)]
pub struct RandomResizedCrop {
    /// Output `[height, width]`.
    pub size: [usize; 2],
    pub scale: [f64; 2],
    pub ratio: [f64; 2],
    pub interpolation: Filter,
}

impl RandomResizedCrop {
    pub fn new(size: usize) -> RandomResizedCrop {
        RandomResizedCrop {
            size: [size, size],
            scale: [0.08, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            interpolation: Filter::Bilinear,
        }
    }

    /// `RandomResizedCrop.get_params`: up to 10 tries of an area fraction in
    /// `scale` and a log-uniform aspect ratio in `ratio`, sides rounded
    /// half-to-even (Python's `round`); then the central crop clamped to the
    /// ratio range.
    pub fn get_params(width: usize, height: usize, scale: [f64; 2], ratio: [f64; 2], rng: &mut SampleRng) -> CropBox {
        let area = (width * height) as f64;
        let (log_lo, log_hi) = (ratio[0].ln(), ratio[1].ln());
        for _ in 0..10 {
            let target_area = area * rng.uniform_range(scale[0], scale[1]);
            let aspect = rng.uniform_range(log_lo, log_hi).exp();
            let w = (target_area * aspect).sqrt().round_ties_even() as usize;
            let h = (target_area / aspect).sqrt().round_ties_even() as usize;
            if 0 < w && w <= width && 0 < h && h <= height {
                let top = rng.int_inclusive(0, (height - h) as i64) as usize;
                let left = rng.int_inclusive(0, (width - w) as i64) as usize;
                return CropBox { top, left, height: h, width: w };
            }
        }
        Self::fallback(width, height, ratio)
    }

    /// The central crop torchvision falls back to after 10 failed tries.
    pub fn fallback(width: usize, height: usize, ratio: [f64; 2]) -> CropBox {
        let in_ratio = width as f64 / height as f64;
        let (w, h) = if in_ratio < ratio[0].min(ratio[1]) {
            (width, ((width as f64 / ratio[0].min(ratio[1])).round_ties_even() as usize).min(height))
        } else if in_ratio > ratio[0].max(ratio[1]) {
            (((height as f64 * ratio[0].max(ratio[1])).round_ties_even() as usize).min(width), height)
        } else {
            (width, height)
        };
        CropBox { top: (height - h) / 2, left: (width - w) / 2, height: h, width: w }
    }

    pub fn apply(&self, img: &Image, rng: &mut SampleRng) -> Image {
        let b = Self::get_params(img.width(), img.height(), self.scale, self.ratio, rng);
        functional::resized_crop(img, b.top as i64, b.left as i64, b.height, b.width, self.size, self.interpolation)
    }
}

/// VISSL's `ImgPilToMultiCrop`: for each crop type i, `num_crops[i]`
/// independent `RandomResizedCrop(size_crops[i], scale=crop_scales[i])`
/// (default ratio, bilinear). Each crop becomes its own copy.
#[derive(Clone, Debug)]
pub struct ImgPilToMultiCrop {
    pub total_num_crops: usize,
    pub num_crops: Vec<usize>,
    pub size_crops: Vec<usize>,
    pub crop_scales: Vec<[f64; 2]>,
}

impl ImgPilToMultiCrop {
    /// One RandomResizedCrop per output copy, in output order.
    pub fn crops(&self) -> Vec<RandomResizedCrop> {
        let mut out = Vec::with_capacity(self.total_num_crops);
        for ((&n, &size), &scale) in self.num_crops.iter().zip(&self.size_crops).zip(&self.crop_scales) {
            for _ in 0..n {
                out.push(RandomResizedCrop { scale, ..RandomResizedCrop::new(size) });
            }
        }
        out
    }
}

/// `torchvision.transforms.Resize(size, interpolation)`: an int resizes the
/// shorter side, `[h, w]` resizes to exactly that.
#[derive(Clone, Debug)]
pub struct Resize {
    pub size: Vec<usize>,
    pub interpolation: Filter,
}

impl Resize {
    pub fn apply(&self, img: &Image) -> Image {
        functional::resize(img, &self.size, self.interpolation)
    }
}

/// `torchvision.transforms.CenterCrop(size)`, output `[height, width]`.
#[derive(Clone, Debug)]
pub struct CenterCrop {
    pub size: [usize; 2],
}

impl CenterCrop {
    pub fn apply(&self, img: &Image) -> Image {
        functional::center_crop(img, self.size)
    }
}
