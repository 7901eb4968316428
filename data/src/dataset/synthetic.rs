//! VISSL's `synthetic` data source (`vissl/data/synthetic_dataset.py`):
//! 50,000 samples (or DATA_LIMIT if larger); each is the mean-gray image of
//! side DEFAULT_GRAY_IMG_SIZE, or with RANDOM_SYNTHETIC_IMAGES a smooth
//! random image drawn from the sample index alone; labels are
//! `index % RANDOM_SYNTHETIC_LABELS` (all 0 when that is 0).

use crate::image::Image;
use crate::resample::{self, Filter};
use crate::rng::{stream, SampleKey, SampleRng};

/// `SyntheticImageDataset.DEFAULT_SIZE`.
pub const SYNTHETIC_DEFAULT_SIZE: usize = 50_000;

#[derive(Clone, Debug)]
pub(crate) struct Synthetic {
    pub len: usize,
    pub size: usize,
    pub random_images: bool,
    pub num_labels: usize,
}

impl Synthetic {
    pub fn image(&self, index: usize) -> Image {
        if self.random_images {
            generate_image(index as u64, self.size)
        } else {
            Image::mean_gray(self.size)
        }
    }

    /// `get_labels()`: `i % RANDOM_SYNTHETIC_LABELS`, or 0.
    pub fn label(&self, index: usize) -> i64 {
        if self.num_labels > 0 {
            (index % self.num_labels) as i64
        } else {
            0
        }
    }
}

/// `SyntheticImageDataset.generate_image(seed=idx, crop_size)`: uniform noise
/// of side crop/16 (`(255 * rand).astype(uint8)`), resized to crop x crop with
/// Pillow's default BICUBIC, blurred with GaussianBlur(radius ~ randint(n/2,
/// 2n)). Our draws come from `SampleRng` keyed by the index, not numpy's
/// `RandomState(idx)`, so the images differ from VISSL's but are as smooth.
/// Sides below 16 use a 1x1 noise image (VISSL's randint fails there).
pub fn generate_image(index: u64, size: usize) -> Image {
    let mut rng = SampleRng::new(SampleKey::new(0, 0, index), stream::SYNTHETIC);
    let noise = (size / 16).max(1);
    // np.random.randint(low, high) draws from [low, high).
    let (lo, hi) = (noise / 2, noise * 2);
    let radius = lo + rng.below(hi - lo);
    let pixels: Vec<u8> = (0..noise * noise * 3).map(|_| (255.0 * rng.uniform()) as u8).collect();
    let small = Image::from_rgb(noise, noise, pixels).expect("noise buffer has noise*noise*3 bytes");
    let big = resample::resize(&small, size, size, Filter::Bicubic);
    crate::filter::gaussian_blur(&big, radius as f64)
}
