//! `PIL.Image.transform(size, AFFINE, data, resample, fillcolor=...)` and
//! `Image.rotate`, as timm's RandAugment calls them (`libImaging/Geometry.c`).
//!
//! The affine matrix maps each output pixel centre `(x + 0.5, y + 0.5)` to a
//! source position; pixels whose source falls outside the image keep the fill
//! colour. Bilinear and bicubic sample as Pillow's transform filters do (which
//! differ from its resize filters: no antialiasing, bicubic with a = -1,
//! truncation to u8 rather than rounding).

use crate::image::Image;
use crate::resample::Filter;

/// Samples one channel's value at (xin, yin), or `None` outside the image.
type Sampler = fn(&Image, f64, f64, usize) -> Option<u8>;

#[inline]
fn floor_i(v: f64) -> i64 {
    // FLOOR() in Geometry.c
    if v < 0.0 {
        v.floor() as i64
    } else {
        v as i64
    }
}

#[inline]
fn px(img: &Image, x: i64, y: i64, c: usize) -> f64 {
    // XCLIP/YCLIP: coordinates clamped to the edge.
    let x = x.clamp(0, img.width() as i64 - 1) as usize;
    let y = y.clamp(0, img.height() as i64 - 1) as usize;
    img.as_rgb()[(y * img.width() + x) * 3 + c] as f64
}

fn in_bounds(img: &Image, xin: f64, yin: f64) -> bool {
    !(xin < 0.0 || xin >= img.width() as f64 || yin < 0.0 || yin >= img.height() as f64)
}

/// `bilinear_filter32RGB`.
fn bilinear(img: &Image, xin: f64, yin: f64, c: usize) -> Option<u8> {
    if !in_bounds(img, xin, yin) {
        return None;
    }
    let (xin, yin) = (xin - 0.5, yin - 0.5);
    let (x, y) = (floor_i(xin), floor_i(yin));
    let (dx, dy) = (xin - x as f64, yin - y as f64);
    let lerp = |a: f64, b: f64, d: f64| a + (b - a) * d;
    let v1 = lerp(px(img, x, y, c), px(img, x + 1, y, c), dx);
    let v2 = if y + 1 >= 0 && y + 1 < img.height() as i64 {
        lerp(px(img, x, y + 1, c), px(img, x + 1, y + 1, c), dx)
    } else {
        v1
    };
    Some(lerp(v1, v2, dy) as u8)
}

/// The cubic of Pillow's transform (`BICUBIC` macro in Geometry.c).
#[inline]
fn cubic(v1: f64, v2: f64, v3: f64, v4: f64, d: f64) -> f64 {
    let p1 = v2;
    let p2 = -v1 + v3;
    let p3 = 2.0 * (v1 - v2) + v3 - v4;
    let p4 = -v1 + v2 - v3 + v4;
    p1 + d * (p2 + d * (p3 + d * p4))
}

/// `bicubic_filter32RGB`.
fn bicubic(img: &Image, xin: f64, yin: f64, c: usize) -> Option<u8> {
    if !in_bounds(img, xin, yin) {
        return None;
    }
    let (xin, yin) = (xin - 0.5, yin - 0.5);
    let (x, y) = (floor_i(xin), floor_i(yin));
    let (dx, dy) = (xin - x as f64, yin - y as f64);
    let (x, y) = (x - 1, y - 1);
    let row =
        |yy: i64| cubic(px(img, x, yy, c), px(img, x + 1, yy, c), px(img, x + 2, yy, c), px(img, x + 3, yy, c), dx);
    let h = img.height() as i64;
    let v1 = row(y);
    let v2 = if y + 1 >= 0 && y + 1 < h { row(y + 1) } else { v1 };
    let v3 = if y + 2 >= 0 && y + 2 < h { row(y + 2) } else { v2 };
    let v4 = if y + 3 >= 0 && y + 3 < h { row(y + 3) } else { v3 };
    let v = cubic(v1, v2, v3, v4, dy);
    Some(if v <= 0.0 {
        0
    } else if v >= 255.0 {
        255
    } else {
        v as u8
    })
}

/// `image.transform((width, height), Image.AFFINE, a, resample, fillcolor=fill)`.
/// Only nearest, bilinear and bicubic are valid here, as in Pillow; other
/// filters fall back to bilinear (callers validate their configs).
pub fn affine(img: &Image, width: usize, height: usize, a: [f64; 6], filter: Filter, fill: [u8; 3]) -> Image {
    let mut out = Image::filled(width, height, fill);
    if img.width() == 0 || img.height() == 0 {
        return out;
    }
    let sampler: Sampler = match filter {
        Filter::Nearest => return affine_nearest(img, out, a),
        Filter::Bicubic => bicubic,
        _ => bilinear,
    };
    let data = out.data_mut();
    for y in 0..height {
        let yc = y as f64 + 0.5;
        for x in 0..width {
            let xc = x as f64 + 0.5;
            let xin = a[0] * xc + a[1] * yc + a[2];
            let yin = a[3] * xc + a[4] * yc + a[5];
            for c in 0..3 {
                if let Some(v) = sampler(img, xin, yin, c) {
                    data[(y * width + x) * 3 + c] = v;
                }
            }
        }
    }
    out
}

/// Nearest-neighbour affine (`ImagingTransformAffine` with filter 0): a pure
/// scale goes through `ImagingScaleAffine`, anything else through the 16.16
/// fixed-point `affine_fixed` when the corners fit, else floating point.
fn affine_nearest(img: &Image, mut out: Image, a: [f64; 6]) -> Image {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (ow, oh) = (out.width(), out.height());
    let src = img.as_rgb();
    let data = out.data_mut();
    let mut put = |x: usize, y: usize, sx: i64, sy: i64| {
        if sx >= 0 && sx < w && sy >= 0 && sy < h {
            let s = (sy as usize * w as usize + sx as usize) * 3;
            data[(y * ow + x) * 3..(y * ow + x) * 3 + 3].copy_from_slice(&src[s..s + 3]);
        }
    };
    let coord = |v: f64| if v < 0.0 { -1 } else { v as i64 };
    if a[1] == 0.0 && a[3] == 0.0 {
        let mut yo = a[5] + a[4] * 0.5;
        for y in 0..oh {
            let mut xo = a[2] + a[0] * 0.5;
            for x in 0..ow {
                put(x, y, coord(xo), coord(yo));
                xo += a[0];
            }
            yo += a[4];
        }
        return out;
    }
    let fits =
        |x: f64, y: f64| (x * a[0] + y * a[1] + a[2]).abs() < 32768.0 && (x * a[3] + y * a[4] + a[5]).abs() < 32768.0;
    let (fw, fh) = (ow as f64, oh as f64);
    if fits(0.0, 0.0) && fits(fw, fh) && fits(0.0, fh) && fits(fw, 0.0) {
        let fix = |v: f64| floor_i(v * 65536.0 + 0.5);
        let (a0, a1, a3, a4) = (fix(a[0]), fix(a[1]), fix(a[3]), fix(a[4]));
        let mut a2 = fix(a[2] + a[0] * 0.5 + a[1] * 0.5);
        let mut a5 = fix(a[5] + a[3] * 0.5 + a[4] * 0.5);
        for y in 0..oh {
            let (mut xx, mut yy) = (a2, a5);
            for x in 0..ow {
                put(x, y, xx >> 16, yy >> 16);
                xx += a0;
                yy += a3;
            }
            a2 += a1;
            a5 += a4;
        }
    } else {
        let mut xo = a[2] + a[1] * 0.5 + a[0] * 0.5;
        let mut yo = a[5] + a[4] * 0.5 + a[3] * 0.5;
        for y in 0..oh {
            let (mut xx, mut yy) = (xo, yo);
            for x in 0..ow {
                put(x, y, coord(xx), coord(yy));
                xx += a[0];
                yy += a[3];
            }
            xo += a[1];
            yo += a[4];
        }
    }
    out
}

/// Python's `round(x, 15)`: correctly rounded to 15 decimals (Rust's
/// formatting is exact, like CPython's dtoa).
fn round15(x: f64) -> f64 {
    format!("{x:.15}").parse().unwrap_or(x)
}

/// `image.rotate(degrees, resample, fillcolor=fill)` (counter-clockwise, about
/// the centre, same size), including Pillow's transpose fast paths.
pub fn rotate(img: &Image, degrees: f64, filter: Filter, fill: [u8; 3]) -> Image {
    // Python's `angle % 360.0` takes the divisor's sign, as rem_euclid does.
    let angle = degrees.rem_euclid(360.0);
    if angle == 0.0 {
        return img.clone();
    }
    if angle == 180.0 {
        return img.rotate_180();
    }
    if (angle == 90.0 || angle == 270.0) && img.width() == img.height() {
        return img.rotate_90(angle == 90.0);
    }
    let (w, h) = (img.width() as f64, img.height() as f64);
    let (cx, cy) = (w / 2.0, h / 2.0);
    let rad = -(angle * (std::f64::consts::PI / 180.0));
    let mut m = [round15(rad.cos()), round15(rad.sin()), 0.0, round15(-rad.sin()), round15(rad.cos()), 0.0];
    let (tx, ty) = (m[0] * -cx + m[1] * -cy + m[2], m[3] * -cx + m[4] * -cy + m[5]);
    m[2] = tx + cx;
    m[5] = ty + cy;
    affine(img, img.width(), img.height(), m, filter, fill)
}
