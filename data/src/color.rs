//! Pixel-value operations of the PIL stage: `Image.blend` and the
//! `ImageEnhance` classes (torchvision's ColorJitter and timm's RandAugment
//! both call them), torchvision's PIL `adjust_hue`, and the `ImageOps`
//! lookup-table ops of RandAugment.

use crate::filter::smooth;
use crate::image::{luma, Image};

/// `Image.blend(degenerate, image, alpha)` (`ImagingBlend`, Blend.c): computed
/// in C floats and truncated; values are clipped only when extrapolating.
pub fn blend(degenerate: &Image, image: &Image, alpha: f64) -> Image {
    let alpha = alpha as f32;
    if alpha == 0.0 {
        return degenerate.clone();
    }
    if alpha == 1.0 {
        return image.clone();
    }
    let interpolate = (0.0..=1.0).contains(&alpha);
    let data = degenerate
        .as_rgb()
        .iter()
        .zip(image.as_rgb())
        .map(|(&a, &b)| {
            let v = a as f32 + alpha * (b as i32 - a as i32) as f32;
            if interpolate {
                v as u8
            } else if v <= 0.0 {
                0
            } else if v >= 255.0 {
                255
            } else {
                v as u8
            }
        })
        .collect();
    Image::from_rgb(image.width(), image.height(), data).unwrap_or_else(|| image.clone())
}

/// `ImageEnhance.Brightness(img).enhance(factor)`: blend with black.
pub fn brightness(img: &Image, factor: f64) -> Image {
    blend(&Image::filled(img.width(), img.height(), [0; 3]), img, factor)
}

/// `ImageEnhance.Contrast(img).enhance(factor)`: blend with a uniform gray
/// of the mean of the L image, `int(mean + 0.5)` (ImageStat's histogram mean).
pub fn contrast(img: &Image, factor: f64) -> Image {
    blend(&Image::filled(img.width(), img.height(), [luma_mean(img); 3]), img, factor)
}

/// The rounded mean of `img.convert("L")` as `ImageEnhance.Contrast` computes it.
pub fn luma_mean(img: &Image) -> u8 {
    let n = img.width() * img.height();
    if n == 0 {
        return 0;
    }
    let sum: u64 = img.as_rgb().chunks_exact(3).map(|p| luma(p[0], p[1], p[2]) as u64).sum();
    (sum as f64 / n as f64 + 0.5) as u8
}

/// `ImageEnhance.Color(img).enhance(factor)` (saturation): blend with the
/// grayscale image.
pub fn saturation(img: &Image, factor: f64) -> Image {
    blend(&img.to_grayscale(), img, factor)
}

/// `ImageEnhance.Sharpness(img).enhance(factor)`: blend with the SMOOTH filter.
pub fn sharpness(img: &Image, factor: f64) -> Image {
    blend(&smooth(img), img, factor)
}

/// torchvision's PIL `adjust_hue`: convert to Pillow's 8-bit HSV, add
/// `int(hue_factor * 255)` to H with uint8 wrap-around, convert back.
/// `hue_factor` is in [-0.5, 0.5] (callers check).
pub fn adjust_hue(img: &Image, hue_factor: f64) -> Image {
    // np.int32(x) truncates toward zero; astype(np.uint8) wraps.
    let shift = (hue_factor * 255.0) as i32 as u8;
    let mut data = Vec::with_capacity(img.as_rgb().len());
    for p in img.as_rgb().chunks_exact(3) {
        let [h, s, v] = rgb_to_hsv(p[0], p[1], p[2]);
        data.extend_from_slice(&hsv_to_rgb(h.wrapping_add(shift), s, v));
    }
    Image::from_rgb(img.width(), img.height(), data).unwrap_or_else(|| img.clone())
}

/// `rgb2hsv_row` in Convert.c, with its mix of C float and double arithmetic.
pub fn rgb_to_hsv(r: u8, g: u8, b: u8) -> [u8; 3] {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if maxc == minc {
        return [0, 0, maxc];
    }
    let cr = (maxc - minc) as f32;
    let s = cr / maxc as f32;
    let rc = (maxc - r) as f32 / cr;
    let gc = (maxc - g) as f32 / cr;
    let bc = (maxc - b) as f32 / cr;
    let h: f32 = if r == maxc {
        bc - gc
    } else if g == maxc {
        (2.0 + rc as f64 - bc as f64) as f32
    } else {
        (4.0 + gc as f64 - rc as f64) as f32
    };
    let h = ((h as f64 / 6.0 + 1.0) % 1.0) as f32;
    let clip8 = |v: f64| (v as i32).clamp(0, 255) as u8;
    [clip8(h as f64 * 255.0), clip8(s as f64 * 255.0), maxc]
}

/// `hsv2rgb` in Convert.c.
pub fn hsv_to_rgb(h: u8, s: u8, v: u8) -> [u8; 3] {
    if s == 0 {
        return [v, v, v];
    }
    let hh = h as f32 as f64 * 6.0 / 255.0;
    let i = hh.floor() as i32;
    let f = (hh - i as f32 as f64) as f32;
    let fs = (s as f32 as f64 / 255.0) as f32;
    let vf = v as f32 as f64;
    let clip8 = |x: f64| (x.round() as i32).clamp(0, 255) as u8;
    let p = clip8(vf * (1.0 - fs as f64));
    // `fs * f` is a float product in C; the rest is double.
    let q = clip8(vf * (1.0 - (fs * f) as f64));
    let t = clip8(vf * (1.0 - fs as f64 * (1.0 - f as f64)));
    match i % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// Applies one 256-entry table to every channel (`image.point(lut)`).
pub fn apply_lut(img: &Image, lut: &[u8; 256]) -> Image {
    let data = img.as_rgb().iter().map(|&v| lut[v as usize]).collect();
    Image::from_rgb(img.width(), img.height(), data).unwrap_or_else(|| img.clone())
}

/// Applies a table per channel (`image.point(lut_r + lut_g + lut_b)`).
fn apply_luts(img: &Image, luts: &[[u8; 256]; 3]) -> Image {
    let data = img.as_rgb().iter().enumerate().map(|(i, &v)| luts[i % 3][v as usize]).collect();
    Image::from_rgb(img.width(), img.height(), data).unwrap_or_else(|| img.clone())
}

fn histograms(img: &Image) -> [[u64; 256]; 3] {
    let mut h = [[0u64; 256]; 3];
    for p in img.as_rgb().chunks_exact(3) {
        for c in 0..3 {
            h[c][p[c] as usize] += 1;
        }
    }
    h
}

/// `ImageOps.autocontrast(img)` (cutoff 0): stretch each channel's used
/// range to 0..255, `int(ix * scale + offset)`.
pub fn autocontrast(img: &Image) -> Image {
    let hist = histograms(img);
    let mut luts = [[0u8; 256]; 3];
    for (lut, h) in luts.iter_mut().zip(&hist) {
        let lo = h.iter().position(|&n| n > 0).unwrap_or(0);
        let hi = h.iter().rposition(|&n| n > 0).unwrap_or(0);
        for (ix, slot) in lut.iter_mut().enumerate() {
            *slot = if hi <= lo {
                ix as u8
            } else {
                let scale = 255.0 / (hi - lo) as f64;
                let offset = -(lo as f64) * scale;
                ((ix as f64 * scale + offset) as i64).clamp(0, 255) as u8
            };
        }
    }
    apply_luts(img, &luts)
}

/// `ImageOps.equalize(img)`: per-channel histogram equalisation, Pillow's
/// integer recipe (`step = (n - last_bin) // 255`, table entries clipped to 255
/// as `point` does).
pub fn equalize(img: &Image) -> Image {
    let hist = histograms(img);
    let mut luts = [[0u8; 256]; 3];
    for (lut, h) in luts.iter_mut().zip(&hist) {
        let used: Vec<u64> = h.iter().copied().filter(|&n| n > 0).collect();
        let identity = || std::array::from_fn(|i| i as u8);
        if used.len() <= 1 {
            *lut = identity();
            continue;
        }
        let step = (used.iter().sum::<u64>() - used[used.len() - 1]) / 255;
        if step == 0 {
            *lut = identity();
            continue;
        }
        let mut n = step / 2;
        for i in 0..256 {
            lut[i] = (n / step).min(255) as u8;
            n += h[i];
        }
    }
    apply_luts(img, &luts)
}

/// `ImageOps.invert`.
pub fn invert(img: &Image) -> Image {
    apply_lut(img, &std::array::from_fn(|i| 255 - i as u8))
}

/// `ImageOps.solarize(img, threshold)`: invert values >= threshold.
pub fn solarize(img: &Image, threshold: i64) -> Image {
    apply_lut(img, &std::array::from_fn(|i| if (i as i64) < threshold { i as u8 } else { 255 - i as u8 }))
}

/// timm's `solarize_add`: add `add` (clipped at 255) to values below `threshold`.
pub fn solarize_add(img: &Image, add: i64, threshold: i64) -> Image {
    apply_lut(
        img,
        &std::array::from_fn(|i| if (i as i64) < threshold { (i as i64 + add).clamp(0, 255) as u8 } else { i as u8 }),
    )
}

/// `ImageOps.posterize(img, bits)`: keep the top `bits` bits (timm skips
/// bits >= 8; 0 bits gives black).
pub fn posterize(img: &Image, bits: i64) -> Image {
    if bits >= 8 {
        return img.clone();
    }
    let mask = !((1u32 << (8 - bits.clamp(0, 8))) - 1) as u8;
    apply_lut(img, &std::array::from_fn(|i| i as u8 & mask))
}
