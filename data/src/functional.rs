//! Deterministic image ops with torchvision's names and argument order
//! (`torchvision.transforms.functional`, PIL path). The random transforms
//! draw their parameters and call these; tests compare them with Pillow.

use crate::color;
use crate::filter;
use crate::geometry;
use crate::image::Image;
pub use crate::resample::Filter;
use crate::resample::{resize as pil_resize, resize_crop};

/// `F.resize(img, size, interpolation)` with torchvision's size rule: a single
/// int is the shorter side (`int(size * long / short)` for the other), a pair
/// is `[height, width]`.
pub fn resize(img: &Image, size: &[usize], filter: Filter) -> Image {
    let (w, h) = (img.width(), img.height());
    let (out_h, out_w) = match *size {
        [s] => {
            let (short, long) = if w <= h { (w, h) } else { (h, w) };
            let new_long = if short == 0 { 0 } else { (s as f64 * long as f64 / short as f64) as usize };
            if w <= h {
                (new_long, s)
            } else {
                (s, new_long)
            }
        }
        [hh, ww, ..] => (hh, ww),
        [] => (h, w),
    };
    pil_resize(img, out_w, out_h, filter)
}

/// `F.resized_crop(img, top, left, height, width, size, interpolation)`:
/// `img.crop(...)` then `resize([size_h, size_w])`.
pub fn resized_crop(
    img: &Image,
    top: i64,
    left: i64,
    height: usize,
    width: usize,
    size: [usize; 2],
    filter: Filter,
) -> Image {
    resize_crop(img, left, top, width, height, (size[1], size[0]), filter)
}

/// `F.center_crop(img, [h, w])`: pads with zeros when the crop is larger
/// (as torchvision ≥ 0.10 does), then crops at
/// `round((H - h) / 2), round((W - w) / 2)` with Python's half-to-even rounding.
pub fn center_crop(img: &Image, size: [usize; 2]) -> Image {
    let [ch, cw] = size;
    let (mut w, mut h) = (img.width(), img.height());
    let mut padded;
    let mut src = img;
    if cw > w || ch > h {
        let left = if cw > w { (cw - w) / 2 } else { 0 };
        let top = if ch > h { (ch - h) / 2 } else { 0 };
        let right = if cw > w { (cw - w).div_ceil(2) } else { 0 };
        let bottom = if ch > h { (ch - h).div_ceil(2) } else { 0 };
        padded = img.crop(-(left as i64), -(top as i64), w + left + right, h + top + bottom);
        w = padded.width();
        h = padded.height();
        if cw == w && ch == h {
            return std::mem::replace(&mut padded, Image::filled(0, 0, [0; 3]));
        }
        src = &padded;
    }
    let top = ((h as f64 - ch as f64) / 2.0).round_ties_even() as i64;
    let left = ((w as f64 - cw as f64) / 2.0).round_ties_even() as i64;
    src.crop(left, top, cw, ch)
}

/// `F.hflip`.
pub fn hflip(img: &Image) -> Image {
    img.flip_left_right()
}

/// `F.adjust_brightness` (PIL: `ImageEnhance.Brightness`).
pub fn adjust_brightness(img: &Image, factor: f64) -> Image {
    color::brightness(img, factor)
}

/// `F.adjust_contrast` (PIL: `ImageEnhance.Contrast`).
pub fn adjust_contrast(img: &Image, factor: f64) -> Image {
    color::contrast(img, factor)
}

/// `F.adjust_saturation` (PIL: `ImageEnhance.Color`).
pub fn adjust_saturation(img: &Image, factor: f64) -> Image {
    color::saturation(img, factor)
}

/// `F.adjust_hue`; `hue_factor` is clamped into [-0.5, 0.5].
pub fn adjust_hue(img: &Image, hue_factor: f64) -> Image {
    color::adjust_hue(img, hue_factor.clamp(-0.5, 0.5))
}

/// `F.to_grayscale(img, num_output_channels=3)`.
pub fn to_grayscale(img: &Image) -> Image {
    img.to_grayscale()
}

/// `img.filter(ImageFilter.GaussianBlur(radius))`.
pub fn gaussian_blur(img: &Image, radius: f64) -> Image {
    filter::gaussian_blur(img, radius)
}

/// `ImageEnhance.Sharpness(img).enhance(factor)`.
pub fn adjust_sharpness(img: &Image, factor: f64) -> Image {
    color::sharpness(img, factor)
}

/// `img.transform(img.size, Image.AFFINE, a, resample, fillcolor=fill)`.
pub fn affine(img: &Image, a: [f64; 6], filter: Filter, fill: [u8; 3]) -> Image {
    geometry::affine(img, img.width(), img.height(), a, filter, fill)
}

/// `img.rotate(degrees, resample, fillcolor=fill)`.
pub fn rotate(img: &Image, degrees: f64, filter: Filter, fill: [u8; 3]) -> Image {
    geometry::rotate(img, degrees, filter, fill)
}

pub use crate::color::{autocontrast, equalize, invert, posterize, solarize, solarize_add};
