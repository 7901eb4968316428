//! `PIL.Image.resize`: separable convolution resampling with Pillow's exact
//! integer arithmetic (`libImaging/Resample.c`), and its nearest-neighbour path
//! (`ImagingScaleAffine` in `Geometry.c`).
//!
//! Pillow widens the filter by the scale factor when downsampling (that is the
//! antialiasing torchvision relies on), normalises each output pixel's weights
//! to sum to 1, converts them to fixed point with 22 fractional bits, rounds
//! the integer sum and clips to 0..255. Doing the same here gives results
//! identical to Pillow, bit for bit.

use crate::image::Image;

/// Resampling filters by PIL's numbering, which torchvision's integer
/// `interpolation` argument (as VISSL's configs write it) also uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    Nearest,
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Filter {
    /// From PIL's integer codes: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming.
    pub fn from_pil_code(code: i64) -> Option<Filter> {
        Some(match code {
            0 => Filter::Nearest,
            1 => Filter::Lanczos,
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            4 => Filter::Box,
            5 => Filter::Hamming,
            _ => return None,
        })
    }

    /// Half-width of the kernel at scale 1.
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming | Filter::Nearest => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear | Filter::Nearest => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // Pillow writes the window constants as C floats.
                    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
                }
            }
            Filter::Bicubic => {
                // Keys cubic with a = -0.5.
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Fixed-point precision of the weights (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per-output-pixel source window and fixed-point weights along one axis.
pub(crate) struct Coeffs {
    ksize: usize,
    /// (first source index, number of taps) per output pixel.
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

impl Coeffs {
    /// `precompute_coeffs` + `normalize_coeffs_8bpc`: the source span
    /// `[in0, in1)` (C floats in Pillow) mapped onto `out_size` pixels.
    pub(crate) fn new(in_size: usize, in0: f32, in1: f32, out_size: usize, filter: Filter) -> Coeffs {
        let scale = (in1 - in0) as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv = 1.0 / filterscale;
        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut k = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = in0 as f64 + (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero; both are clamped right after.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin).min(ksize);
            let mut ww = 0.0;
            for (x, kx) in k.iter_mut().enumerate().take(n) {
                let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * inv);
                *kx = w;
                ww += w;
            }
            let row = &mut weights[xx * ksize..(xx + 1) * ksize];
            for x in 0..n {
                let w = if ww != 0.0 { k[x] / ww } else { k[x] };
                let f = w * (1u32 << PRECISION_BITS) as f64;
                row[x] = if w < 0.0 { (-0.5 + f) as i32 } else { (0.5 + f) as i32 };
            }
            bounds.push((xmin, n));
        }
        Coeffs { ksize, bounds, weights }
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let (start, n) = self.bounds[i];
        (start, &self.weights[i * self.ksize..i * self.ksize + n])
    }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// A rectangle of an image that is resized as if it had been cropped first
/// (torchvision's `resized_crop` = `img.crop(box).resize(size)`), without
/// copying it.
#[derive(Clone, Copy)]
struct View<'a> {
    img: &'a Image,
    left: usize,
    top: usize,
    width: usize,
    height: usize,
}

impl View<'_> {
    fn row(&self, y: usize) -> &[u8] {
        let w = self.img.width();
        let start = ((self.top + y) * w + self.left) * 3;
        &self.img.as_rgb()[start..start + self.width * 3]
    }
}

/// Horizontal pass: output row `i` is source row `row(first + i)` resampled to
/// `out_w` pixels.
fn horizontal<'r>(row: impl Fn(usize) -> &'r [u8], rows: std::ops::Range<usize>, out_w: usize, c: &Coeffs) -> Vec<u8> {
    let mut out = vec![0u8; rows.len() * out_w * 3];
    // Each source row is copied into a zero-padded buffer so that every output
    // pixel can run all `ksize` taps (the weights past a window's end are
    // zero, as in Pillow's coefficient buffer); a fixed tap count lets the
    // compiler unroll the loop for the common kernel sizes.
    let mut padded = Vec::new();
    for (oy, y) in rows.enumerate() {
        let line = row(y);
        padded.clear();
        padded.extend_from_slice(line);
        padded.resize(line.len() + c.ksize * 3, 0);
        let dst = &mut out[oy * out_w * 3..(oy + 1) * out_w * 3];
        match c.ksize {
            3 => h_row::<3>(&padded, dst, c),
            5 => h_row::<5>(&padded, dst, c),
            7 => h_row::<7>(&padded, dst, c),
            9 => h_row::<9>(&padded, dst, c),
            11 => h_row::<11>(&padded, dst, c),
            _ => h_row_any(&padded, dst, c),
        }
    }
    out
}

/// One output row with exactly `K` taps per pixel.
fn h_row<const K: usize>(line: &[u8], dst: &mut [u8], c: &Coeffs) {
    for (xx, (px, k)) in dst.chunks_exact_mut(3).zip(c.weights.chunks_exact(K)).enumerate() {
        let start = c.bounds[xx].0 * 3;
        let src = &line[start..start + K * 3];
        let (mut s0, mut s1, mut s2) = (HALF, HALF, HALF);
        for j in 0..K {
            s0 += src[j * 3] as i32 * k[j];
            s1 += src[j * 3 + 1] as i32 * k[j];
            s2 += src[j * 3 + 2] as i32 * k[j];
        }
        px[0] = clip8(s0);
        px[1] = clip8(s1);
        px[2] = clip8(s2);
    }
}

/// One output row, any kernel size (only the window's own taps).
fn h_row_any(line: &[u8], dst: &mut [u8], c: &Coeffs) {
    for (xx, px) in dst.chunks_exact_mut(3).enumerate() {
        let (start, k) = c.taps(xx);
        let (mut s0, mut s1, mut s2) = (HALF, HALF, HALF);
        let src = &line[start * 3..(start + k.len()) * 3];
        for (p, &kw) in src.chunks_exact(3).zip(k) {
            s0 += p[0] as i32 * kw;
            s1 += p[1] as i32 * kw;
            s2 += p[2] as i32 * kw;
        }
        px[0] = clip8(s0);
        px[1] = clip8(s1);
        px[2] = clip8(s2);
    }
}

/// Vertical pass over rows `row(0..)` of `width` RGB pixels; sums are
/// accumulated one source row at a time, which is cache-friendly and vectorises.
fn vertical<'r>(row: impl Fn(usize) -> &'r [u8], width: usize, out_h: usize, c: &Coeffs) -> Vec<u8> {
    let stride = width * 3;
    let mut out = vec![0u8; out_h * stride];
    let mut acc = vec![0i32; stride];
    for yy in 0..out_h {
        let (start, k) = c.taps(yy);
        acc.fill(HALF);
        for (j, &kw) in k.iter().enumerate() {
            for (a, &p) in acc.iter_mut().zip(row(start + j)) {
                *a += p as i32 * kw;
            }
        }
        for (o, &a) in out[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// `image.resize((width, height), filter)`.
pub fn resize(img: &Image, width: usize, height: usize, filter: Filter) -> Image {
    let bx = [0.0, 0.0, img.width() as f32, img.height() as f32];
    resize_box(img, width, height, filter, bx)
}

/// `image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), filter)`
/// for a crop inside the image, without materialising the crop. Crops reaching
/// outside the image are cropped (zero-filled) first.
pub fn resize_crop(
    img: &Image,
    left: i64,
    top: i64,
    crop_w: usize,
    crop_h: usize,
    (width, height): (usize, usize),
    filter: Filter,
) -> Image {
    let inside =
        left >= 0 && top >= 0 && left as usize + crop_w <= img.width() && top as usize + crop_h <= img.height();
    if !inside {
        return resize(&img.crop(left, top, crop_w, crop_h), width, height, filter);
    }
    let view = View { img, left: left as usize, top: top as usize, width: crop_w, height: crop_h };
    resample_view(view, width, height, filter, [0.0, 0.0, crop_w as f32, crop_h as f32])
}

/// `image.resize((width, height), filter, box=(x0, y0, x1, y1))`; the box is
/// clamped into the image (Pillow raises instead; callers here never pass one
/// outside). Zero-sized inputs or outputs give a black image.
pub fn resize_box(img: &Image, width: usize, height: usize, filter: Filter, bx: [f32; 4]) -> Image {
    let view = View { img, left: 0, top: 0, width: img.width(), height: img.height() };
    resample_view(view, width, height, filter, bx)
}

fn resample_view(src: View<'_>, width: usize, height: usize, filter: Filter, bx: [f32; 4]) -> Image {
    let (w, h) = (src.width, src.height);
    let bx = [bx[0].max(0.0), bx[1].max(0.0), bx[2].min(w as f32), bx[3].min(h as f32)];
    if width == 0 || height == 0 || w == 0 || h == 0 {
        return Image::filled(width, height, [0; 3]);
    }
    let copy_rows =
        |rows: std::ops::Range<usize>| -> Vec<u8> { rows.flat_map(|y| src.row(y).iter().copied()).collect() };
    // `_resize` in _imaging.c: an integer box of the output's size is a crop.
    if bx[0].fract() == 0.0 && bx[1].fract() == 0.0 && bx[2] - bx[0] == width as f32 && bx[3] - bx[1] == height as f32 {
        let (x0, y0) = (bx[0] as usize, bx[1] as usize);
        let view = View { img: src.img, left: src.left + x0, top: src.top + y0, width, height };
        let data = (0..height).flat_map(|y| view.row(y).iter().copied()).collect();
        return Image::from_rgb(width, height, data).unwrap_or_else(|| Image::filled(width, height, [0; 3]));
    }
    if filter == Filter::Nearest {
        let img = if src.left == 0 && src.top == 0 && w == src.img.width() && h == src.img.height() {
            std::borrow::Cow::Borrowed(src.img)
        } else {
            std::borrow::Cow::Owned(
                Image::from_rgb(w, h, copy_rows(0..h)).unwrap_or_else(|| Image::filled(w, h, [0; 3])),
            )
        };
        return resize_nearest(&img, width, height, bx);
    }
    let need_h = width != w || bx[0] != 0.0 || bx[2] != width as f32;
    let need_v = height != h || bx[1] != 0.0 || bx[3] != height as f32;
    if !need_h && !need_v {
        return Image::from_rgb(w, h, copy_rows(0..h)).unwrap_or_else(|| Image::filled(w, h, [0; 3]));
    }
    // Pillow 13 (ImagingResampleInner): when the height shrinks by more than
    // twice what the width does, the vertical pass runs first. The passes
    // round to u8 in between, so the order changes the result.
    let (dh, dw) = (h as i64 - height as i64, w as i64 - width as i64);
    let horizontal_first = !(dh > 0 && dh > dw * 2);
    let vert = Coeffs::new(h, bx[1], bx[3], height, filter);
    let hor = Coeffs::new(w, bx[0], bx[2], width, filter);
    let data = if horizontal_first {
        // Only the source rows the vertical pass reads are resampled.
        let first = vert.bounds[0].0;
        let last = vert.bounds[height - 1].0 + vert.bounds[height - 1].1;
        let tmp = if need_h { horizontal(|y| src.row(y), first..last, width, &hor) } else { copy_rows(first..last) };
        if need_v {
            let stride = width * 3;
            let rows = last - first;
            let mut vert = vert;
            for b in &mut vert.bounds {
                b.0 -= first;
                // Windows never run past the rows we have for boxes inside
                // the image; the clamp keeps slicing panic-free regardless.
                b.1 = b.1.min(rows.saturating_sub(b.0));
            }
            vertical(|y| &tmp[y * stride..(y + 1) * stride], width, height, &vert)
        } else {
            tmp
        }
    } else {
        let tmp = if need_v { vertical(|y| src.row(y), w, height, &vert) } else { copy_rows(0..h) };
        if need_h {
            let stride = w * 3;
            horizontal(|y| &tmp[y * stride..(y + 1) * stride], 0..height, width, &hor)
        } else {
            tmp
        }
    };
    Image::from_rgb(width, height, data).unwrap_or_else(|| Image::filled(width, height, [0; 3]))
}

/// Pillow's NEAREST resize: an affine scale sampled at pixel centres, with the
/// source position accumulated incrementally in doubles as `ImagingScaleAffine`
/// does (the accumulation's rounding decides ties, so we repeat it).
fn resize_nearest(img: &Image, width: usize, height: usize, bx: [f32; 4]) -> Image {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let a0 = (bx[2] - bx[0]) as f64 / width as f64;
    let a4 = (bx[3] - bx[1]) as f64 / height as f64;
    let (a2, a5) = (bx[0] as f64, bx[1] as f64);
    let coord = |v: f64| if v < 0.0 { -1 } else { v as i64 };
    let mut xin = vec![None; width];
    let mut xo = a2 + a0 * 0.5;
    for slot in xin.iter_mut() {
        let xi = coord(xo);
        if xi >= 0 && xi < w {
            *slot = Some(xi as usize);
        }
        xo += a0;
    }
    let src = img.as_rgb();
    let mut out = vec![0u8; width * height * 3];
    let mut yo = a5 + a4 * 0.5;
    for y in 0..height {
        let yi = coord(yo);
        if yi >= 0 && yi < h {
            let row = &src[yi as usize * img.width() * 3..(yi as usize + 1) * img.width() * 3];
            for (x, s) in xin.iter().enumerate() {
                if let Some(s) = s {
                    out[(y * width + x) * 3..(y * width + x) * 3 + 3].copy_from_slice(&row[s * 3..s * 3 + 3]);
                }
            }
        }
        yo += a4;
    }
    Image::from_rgb(width, height, out).unwrap_or_else(|| Image::filled(width, height, [0; 3]))
}
