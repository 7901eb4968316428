//! ColorJitter and VISSL's ImgPilColorDistortion (torchvision PIL path).

use crate::functional;
use crate::image::Image;
use crate::rng::SampleRng;

/// `torchvision.transforms.ColorJitter`: factor ranges (`None` = not applied),
/// applied in a random order (`torch.randperm(4)`).
#[derive(Clone, Debug, Default)]
pub struct ColorJitter {
    /// Factor range `[max(0, 1 - b), 1 + b]` for a number b.
    pub brightness: Option<[f64; 2]>,
    pub contrast: Option<[f64; 2]>,
    pub saturation: Option<[f64; 2]>,
    /// Shift range `[-h, h]` (h <= 0.5) for a number h.
    pub hue: Option<[f64; 2]>,
}

impl ColorJitter {
    /// torchvision's `_check_input` for a single number: `[c - v, c + v]`,
    /// clipped at 0 for factors; `None` when it is the identity.
    pub fn factor_range(value: f64) -> Option<[f64; 2]> {
        let r = [(1.0 - value).max(0.0), 1.0 + value];
        (r != [1.0, 1.0]).then_some(r)
    }

    pub fn hue_range(value: f64) -> Option<[f64; 2]> {
        (value != 0.0).then_some([-value, value])
    }

    /// `ColorJitter(b, c, s, h)` with numbers, as VISSL's configs write it.
    pub fn new(brightness: f64, contrast: f64, saturation: f64, hue: f64) -> ColorJitter {
        ColorJitter {
            brightness: Self::factor_range(brightness),
            contrast: Self::factor_range(contrast),
            saturation: Self::factor_range(saturation),
            hue: Self::hue_range(hue),
        }
    }

    pub fn apply(&self, img: &Image, rng: &mut SampleRng) -> Image {
        let mut order = [0usize, 1, 2, 3];
        rng.shuffle(&mut order);
        let mut draw = |r: Option<[f64; 2]>| r.map(|[lo, hi]| rng.uniform_range(lo, hi));
        let factors = [draw(self.brightness), draw(self.contrast), draw(self.saturation), draw(self.hue)];
        let mut out = img.clone();
        for i in order {
            let Some(f) = factors[i] else { continue };
            out = match i {
                0 => functional::adjust_brightness(&out, f),
                1 => functional::adjust_contrast(&out, f),
                2 => functional::adjust_saturation(&out, f),
                _ => functional::adjust_hue(&out, f),
            };
        }
        out
    }
}

/// VISSL's `ImgPilColorDistortion(strength)` (SimCLR): with probability 0.8
/// `ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)`, then `RandomGrayscale(p=0.2)`.
/// VISSL's `from_config` reads only `strength`; the other constructor
/// arguments keep their defaults.
#[derive(Clone, Debug)]
pub struct ImgPilColorDistortion {
    pub strength: f64,
    jitter: ColorJitter,
}

impl ImgPilColorDistortion {
    pub const COLOR_JITTER_PROBABILITY: f64 = 0.8;
    pub const GRAYSCALE_PROBABILITY: f64 = 0.2;

    pub fn new(strength: f64) -> ImgPilColorDistortion {
        let s = strength;
        ImgPilColorDistortion { strength, jitter: ColorJitter::new(0.8 * s, 0.8 * s, 0.8 * s, (0.2 * s).min(0.5)) }
    }

    pub fn apply(&self, img: &Image, rng: &mut SampleRng) -> Image {
        // RandomApply: skipped when p < torch.rand(1).
        let mut out =
            if Self::COLOR_JITTER_PROBABILITY < rng.uniform() { img.clone() } else { self.jitter.apply(img, rng) };
        if rng.uniform() < Self::GRAYSCALE_PROBABILITY {
            out = out.to_grayscale();
        }
        out
    }
}
