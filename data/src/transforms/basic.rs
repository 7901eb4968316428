//! Small random PIL transforms: flip, grayscale, blur, replication.

use crate::functional;
use crate::image::Image;
use crate::rng::SampleRng;

/// `RandomHorizontalFlip(p)`: flips when `torch.rand(1) < p`.
#[derive(Clone, Debug)]
pub struct RandomHorizontalFlip {
    pub p: f64,
}

impl RandomHorizontalFlip {
    pub fn apply(&self, mut img: Image, rng: &mut SampleRng) -> Image {
        if rng.uniform() < self.p {
            img.flip_left_right_in_place();
        }
        img
    }
}

/// `RandomGrayscale(p)`: 3-channel grayscale when `torch.rand(1) < p`.
#[derive(Clone, Debug)]
pub struct RandomGrayscale {
    pub p: f64,
}

impl RandomGrayscale {
    pub fn apply(&self, img: Image, rng: &mut SampleRng) -> Image {
        if rng.uniform() < self.p {
            img.to_grayscale()
        } else {
            img
        }
    }
}

/// VISSL's `ImgPilGaussianBlur(p, radius_min, radius_max)`: blurs when
/// `np.random.rand() <= p`, with Pillow's GaussianBlur of radius
/// `random.uniform(radius_min, radius_max)`.
#[derive(Clone, Debug)]
pub struct ImgPilGaussianBlur {
    pub p: f64,
    pub radius_min: f64,
    pub radius_max: f64,
}

impl ImgPilGaussianBlur {
    pub fn apply(&self, img: Image, rng: &mut SampleRng) -> Image {
        if rng.uniform() <= self.p {
            let radius = rng.uniform_range(self.radius_min, self.radius_max);
            functional::gaussian_blur(&img, radius)
        } else {
            img
        }
    }
}

/// VISSL's `ImgReplicatePil(num_times)`: `num_times` copies of the image, each
/// augmented independently by the transforms that follow.
#[derive(Clone, Debug)]
pub struct ImgReplicatePil {
    pub num_times: usize,
}
