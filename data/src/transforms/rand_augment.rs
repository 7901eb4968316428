//! RandAugment as VISSL ships it (`vissl/data/ssl_transforms/rand_auto_aug.py`,
//! a copy of timm 0.3.x `auto_augment.py`): `num_layers` ops drawn uniformly
//! with replacement (or by timm's weight table 0 without replacement), each
//! applied with probability 0.5 at magnitude ~ N(magnitude, magnitude_std²)
//! clipped to [0, 10]. Geometric ops fill with (128, 128, 128) and resample
//! bilinear or bicubic at random.

use crate::functional::{self, Filter};
use crate::image::Image;
use crate::rng::SampleRng;

/// timm's `_MAX_LEVEL`.
const MAX_LEVEL: f64 = 10.0;
/// timm's `_FILL` (VISSL overwrites any `img_mean` hparam with it).
pub const FILL: [u8; 3] = [128, 128, 128];

/// The ops of timm's `NAME_TO_OP` that RandAugment can draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AugmentOp {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    PosterizeIncreasing,
    Solarize,
    SolarizeIncreasing,
    SolarizeAdd,
    Color,
    ColorIncreasing,
    Contrast,
    ContrastIncreasing,
    Brightness,
    BrightnessIncreasing,
    Sharpness,
    SharpnessIncreasing,
    ShearX,
    ShearY,
    TranslateXRel,
    TranslateYRel,
}

/// `_RAND_TRANSFORMS`.
pub const RAND_TRANSFORMS: [AugmentOp; 15] = {
    use AugmentOp::*;
    [
        AutoContrast,
        Equalize,
        Invert,
        Rotate,
        Posterize,
        Solarize,
        SolarizeAdd,
        Color,
        Contrast,
        Brightness,
        Sharpness,
        ShearX,
        ShearY,
        TranslateXRel,
        TranslateYRel,
    ]
};

/// `_RAND_INCREASING_TRANSFORMS` (VISSL's `increasing_severity: True`).
pub const RAND_INCREASING_TRANSFORMS: [AugmentOp; 15] = {
    use AugmentOp::*;
    [
        AutoContrast,
        Equalize,
        Invert,
        Rotate,
        PosterizeIncreasing,
        SolarizeIncreasing,
        SolarizeAdd,
        ColorIncreasing,
        ContrastIncreasing,
        BrightnessIncreasing,
        SharpnessIncreasing,
        ShearX,
        ShearY,
        TranslateXRel,
        TranslateYRel,
    ]
};

/// `_RAND_CHOICE_WEIGHTS_0`, by position in the op list (timm looks the
/// weights up by the non-increasing names even for the increasing list).
pub const RAND_CHOICE_WEIGHTS_0: [f64; 15] =
    [0.025, 0.005, 0.0, 0.3, 0.0, 0.005, 0.005, 0.025, 0.005, 0.005, 0.025, 0.2, 0.2, 0.1, 0.1];

/// The argument an op receives (timm's `LEVEL_TO_ARG`), with its sign drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OpArg {
    None,
    Float(f64),
    Int(i64),
}

impl AugmentOp {
    /// Whether the level-to-argument rule flips the sign at random.
    pub fn negates(self) -> bool {
        use AugmentOp::*;
        matches!(
            self,
            Rotate
                | ColorIncreasing
                | ContrastIncreasing
                | BrightnessIncreasing
                | SharpnessIncreasing
                | ShearX
                | ShearY
                | TranslateXRel
                | TranslateYRel
        )
    }

    /// timm's `LEVEL_TO_ARG[name](level)` with the random sign given.
    pub fn level_to_arg(self, level: f64, negate: bool, translate_pct: f64) -> OpArg {
        use AugmentOp::*;
        let sign = |v: f64| if negate { -v } else { v };
        let l = level / MAX_LEVEL;
        match self {
            AutoContrast | Equalize | Invert => OpArg::None,
            Rotate => OpArg::Float(sign(l * 30.0)),
            Posterize => OpArg::Int((l * 4.0) as i64),
            PosterizeIncreasing => OpArg::Int(4 - (l * 4.0) as i64),
            Solarize => OpArg::Int((l * 256.0) as i64),
            SolarizeIncreasing => OpArg::Int(256 - (l * 256.0) as i64),
            SolarizeAdd => OpArg::Int((l * 110.0) as i64),
            Color | Contrast | Brightness | Sharpness => OpArg::Float(l * 1.8 + 0.1),
            ColorIncreasing | ContrastIncreasing | BrightnessIncreasing | SharpnessIncreasing => {
                OpArg::Float(1.0 + sign(l * 0.9))
            }
            ShearX | ShearY => OpArg::Float(sign(l * 0.3)),
            TranslateXRel | TranslateYRel => OpArg::Float(sign(l * translate_pct)),
        }
    }

    /// Whether the op resamples (and so draws bilinear/bicubic).
    pub fn is_geometric(self) -> bool {
        use AugmentOp::*;
        matches!(self, Rotate | ShearX | ShearY | TranslateXRel | TranslateYRel)
    }

    /// timm's op function applied with its argument.
    pub fn apply(self, img: &Image, arg: OpArg, filter: Filter) -> Image {
        use AugmentOp::*;
        let f = match arg {
            OpArg::Float(f) => f,
            OpArg::Int(i) => i as f64,
            OpArg::None => 0.0,
        };
        let i = match arg {
            OpArg::Int(i) => i,
            _ => f as i64,
        };
        match self {
            AutoContrast => functional::autocontrast(img),
            Equalize => functional::equalize(img),
            Invert => functional::invert(img),
            Rotate => functional::rotate(img, f, filter, FILL),
            Posterize | PosterizeIncreasing => functional::posterize(img, i),
            Solarize | SolarizeIncreasing => functional::solarize(img, i),
            SolarizeAdd => functional::solarize_add(img, i, 128),
            Color | ColorIncreasing => functional::adjust_saturation(img, f),
            Contrast | ContrastIncreasing => functional::adjust_contrast(img, f),
            Brightness | BrightnessIncreasing => functional::adjust_brightness(img, f),
            Sharpness | SharpnessIncreasing => functional::adjust_sharpness(img, f),
            ShearX => functional::affine(img, [1.0, f, 0.0, 0.0, 1.0, 0.0], filter, FILL),
            ShearY => functional::affine(img, [1.0, 0.0, 0.0, f, 1.0, 0.0], filter, FILL),
            TranslateXRel => {
                let pixels = f * img.width() as f64;
                functional::affine(img, [1.0, 0.0, pixels, 0.0, 1.0, 0.0], filter, FILL)
            }
            TranslateYRel => {
                let pixels = f * img.height() as f64;
                functional::affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, pixels], filter, FILL)
            }
        }
    }
}

/// VISSL's `RandAugment(magnitude, magnitude_std, num_layers,
/// increasing_severity, weight_choice)`.
#[derive(Clone, Debug)]
pub struct RandAugment {
    pub magnitude: f64,
    pub magnitude_std: f64,
    pub num_layers: usize,
    pub increasing_severity: bool,
    /// `Some(0)`: timm's weight table 0, ops drawn without replacement.
    pub weight_choice: Option<u32>,
    /// timm hparam `translate_pct` (0.45).
    pub translate_pct: f64,
    /// timm hparam `interpolation`; `None` draws bilinear or bicubic per op.
    pub interpolation: Option<Filter>,
}

impl Default for RandAugment {
    fn default() -> Self {
        RandAugment {
            magnitude: 10.0,
            magnitude_std: 0.0,
            num_layers: 2,
            increasing_severity: false,
            weight_choice: None,
            translate_pct: 0.45,
            interpolation: None,
        }
    }
}

impl RandAugment {
    pub fn ops(&self) -> &'static [AugmentOp; 15] {
        if self.increasing_severity {
            &RAND_INCREASING_TRANSFORMS
        } else {
            &RAND_TRANSFORMS
        }
    }

    /// The op indices for one call: uniform with replacement, or weighted
    /// without replacement (sequential draws from the renormalised weights,
    /// the distribution of `np.random.choice(..., replace=False, p=w)`).
    fn choose(&self, rng: &mut SampleRng) -> Vec<usize> {
        match self.weight_choice {
            None => (0..self.num_layers).map(|_| rng.below(15)).collect(),
            Some(_) => {
                let mut w = RAND_CHOICE_WEIGHTS_0;
                let mut picked = Vec::with_capacity(self.num_layers);
                for _ in 0..self.num_layers {
                    let total: f64 = w.iter().sum();
                    if total <= 0.0 {
                        break;
                    }
                    let mut u = rng.uniform() * total;
                    let mut chosen = w.iter().rposition(|&x| x > 0.0).unwrap_or(0);
                    for (i, &wi) in w.iter().enumerate() {
                        if wi > 0.0 && u < wi {
                            chosen = i;
                            break;
                        }
                        u -= wi;
                    }
                    picked.push(chosen);
                    w[chosen] = 0.0;
                }
                picked
            }
        }
    }

    pub fn apply(&self, img: Image, rng: &mut SampleRng) -> Image {
        let ops = self.ops();
        let mut out = img;
        for idx in self.choose(rng) {
            let op = ops[idx];
            // AugmentOp.__call__: skipped when random.random() > prob (0.5).
            if rng.uniform() > 0.5 {
                continue;
            }
            let mut magnitude = self.magnitude;
            if self.magnitude_std > 0.0 {
                magnitude = rng.gauss(magnitude, self.magnitude_std);
            }
            let magnitude = magnitude.clamp(0.0, MAX_LEVEL);
            // _randomly_negate: negative when random.random() > 0.5.
            let negate = op.negates() && rng.uniform() > 0.5;
            let arg = op.level_to_arg(magnitude, negate, self.translate_pct);
            let filter = match (op.is_geometric(), self.interpolation) {
                (false, _) => Filter::Bilinear,
                (true, Some(f)) => f,
                (true, None) => {
                    if rng.uniform() < 0.5 {
                        Filter::Bilinear
                    } else {
                        Filter::Bicubic
                    }
                }
            };
            out = op.apply(&out, arg, filter);
        }
        out
    }
}
