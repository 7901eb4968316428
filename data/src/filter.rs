//! Pillow's spatial filters used by the augmentations: `GaussianBlur` (an
//! extended box blur, `libImaging/BoxBlur.c`) and the 3x3 `SMOOTH` kernel of
//! `ImageEnhance.Sharpness` (`libImaging/Filter.c`).

use crate::image::Image;

/// `ImageFilter.GaussianBlur(radius)`: three passes of an extended box blur
/// per axis whose width matches the variance `radius²` (Gwosdek et al.,
/// "Theoretical foundations of Gaussian convolution by extended box
/// filtering", SSVM 2011), in Pillow's 8.24 fixed point. `radius` is sigma.
pub fn gaussian_blur(img: &Image, radius: f64) -> Image {
    if radius == 0.0 || img.width() == 0 || img.height() == 0 {
        return img.clone();
    }
    // Pillow receives the radius as a C float.
    let r = box_radius(radius as f32, 3);
    let (w, h) = (img.width(), img.height());
    let mut data = img.as_rgb().to_vec();
    let mut line = Vec::new();
    let mut out = Vec::new();
    if r != 0.0 {
        for y in 0..h {
            for c in 0..3 {
                line.clear();
                line.extend((0..w).map(|x| data[(y * w + x) * 3 + c]));
                for _ in 0..3 {
                    box_blur_line(&line, &mut out, r);
                    std::mem::swap(&mut line, &mut out);
                }
                for (x, &v) in line.iter().enumerate() {
                    data[(y * w + x) * 3 + c] = v;
                }
            }
        }
        // Pillow transposes and blurs rows; blurring columns is the same.
        for x in 0..w {
            for c in 0..3 {
                line.clear();
                line.extend((0..h).map(|y| data[(y * w + x) * 3 + c]));
                for _ in 0..3 {
                    box_blur_line(&line, &mut out, r);
                    std::mem::swap(&mut line, &mut out);
                }
                for (y, &v) in line.iter().enumerate() {
                    data[(y * w + x) * 3 + c] = v;
                }
            }
        }
    }
    Image::from_rgb(w, h, data).unwrap_or_else(|| img.clone())
}

/// `_gaussian_blur_radius`: the extended box radius (integer part plus
/// fractional edge weight) for `passes` passes, with Pillow's float/double mix.
fn box_radius(radius: f32, passes: i32) -> f32 {
    let sigma2 = radius * radius / passes as f32;
    let big_l = (12.0 * sigma2 as f64 + 1.0).sqrt() as f32;
    let l = ((big_l as f64 - 1.0) / 2.0).floor() as f32;
    let mut a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    a /= 6.0 * (sigma2 - (l + 1.0) * (l + 1.0));
    l + a
}

/// `ImagingLineBoxBlur8`: one pass of an extended box of radius `r` (integer
/// part `radius`, edge weight `fw`) over one line, edges extended.
fn box_blur_line(input: &[u8], output: &mut Vec<u8>, float_radius: f32) {
    let n = input.len();
    output.clear();
    output.resize(n, 0);
    if n == 0 {
        return;
    }
    let radius = float_radius as usize;
    let ww = ((1u32 << 24) as f32 / (float_radius * 2.0 + 1.0)) as u32;
    let fw = ((1u32 << 24).wrapping_sub(((radius * 2 + 1) as u32).wrapping_mul(ww))) / 2;
    let lastx = n - 1;
    let edge_a = (radius + 1).min(n);
    let edge_b = n.saturating_sub(radius + 1);
    let px = |i: usize| input[i] as u32;
    // Accumulator for pixel -1: the first pixel repeated radius+1 times, then
    // pixels 0..edgeA-1, then the last pixel for what lies past the end.
    let mut acc = px(0).wrapping_mul(radius as u32 + 1);
    for x in 0..edge_a.saturating_sub(1) {
        acc = acc.wrapping_add(px(x));
    }
    acc = acc.wrapping_add(px(lastx).wrapping_mul((radius + 1 - edge_a) as u32));
    let mut step = |acc: &mut u32, sub: usize, add: usize, left: usize, right: usize, x: usize| {
        *acc = acc.wrapping_add(px(add)).wrapping_sub(px(sub));
        let bulk = acc.wrapping_mul(ww).wrapping_add((px(left) + px(right)).wrapping_mul(fw));
        output[x] = (bulk.wrapping_add(1 << 23) >> 24) as u8;
    };
    if edge_a <= edge_b {
        for x in 0..edge_a {
            step(&mut acc, 0, x + radius, 0, x + radius + 1, x);
        }
        for x in edge_a..edge_b {
            step(&mut acc, x - radius - 1, x + radius, x - radius - 1, x + radius + 1, x);
        }
        for x in edge_b..=lastx {
            step(&mut acc, x - radius - 1, lastx, x - radius - 1, lastx, x);
        }
    } else {
        for x in 0..edge_b {
            step(&mut acc, 0, x + radius, 0, x + radius + 1, x);
        }
        for x in edge_b..edge_a {
            step(&mut acc, 0, lastx, 0, lastx, x);
        }
        for x in edge_a..=lastx {
            step(&mut acc, x - radius - 1, lastx, x - radius - 1, lastx, x);
        }
    }
}

/// `img.filter(ImageFilter.SMOOTH)`: 3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13 in
/// C floats, +0.5 and truncation; the border pixels are copied unchanged.
pub fn smooth(img: &Image) -> Image {
    let (w, h) = (img.width(), img.height());
    if w < 3 || h < 3 {
        return img.clone();
    }
    let k1 = 1.0f32 / 13.0;
    let k5 = 5.0f32 / 13.0;
    let src = img.as_rgb();
    let mut data = src.to_vec();
    let at = |x: usize, y: usize, c: usize| src[(y * w + x) * 3 + c] as f32;
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            for c in 0..3 {
                // Rows in Pillow's order: below, centre, above; each row's
                // three products summed left to right, then added to ss.
                let row = |yy: usize, mid: f32| at(x - 1, yy, c) * k1 + at(x, yy, c) * mid + at(x + 1, yy, c) * k1;
                let mut ss = 0.5f32;
                ss += row(y + 1, k1);
                ss += row(y, k5);
                ss += row(y - 1, k1);
                data[(y * w + x) * 3 + c] = ss.clamp(0.0, 255.0) as u8;
            }
        }
    }
    Image::from_rgb(w, h, data).unwrap_or_else(|| img.clone())
}
