//! `Tensor`: the f32 CHW output of the pipeline, and the transforms that run
//! after `ToTensor` (Normalize, RandomErasing).

use crate::image::Image;

/// A dense f32 tensor in CHW layout (channels, height, width).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// `[channels, height, width]`.
    pub shape: [usize; 3],
    /// Row-major data, `shape.iter().product()` values.
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn channels(&self) -> usize {
        self.shape[0]
    }

    pub fn height(&self) -> usize {
        self.shape[1]
    }

    pub fn width(&self) -> usize {
        self.shape[2]
    }

    /// `torchvision.transforms.functional.to_tensor`: HWC u8 to CHW f32 in
    /// [0, 1], `value / 255` in float32.
    pub fn from_image(img: &Image) -> Tensor {
        let (w, h) = (img.width(), img.height());
        let plane = w * h;
        let mut data = vec![0f32; 3 * plane];
        let (r, rest) = data.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, p) in img.as_rgb().chunks_exact(3).enumerate() {
            r[i] = p[0] as f32 / 255.0;
            g[i] = p[1] as f32 / 255.0;
            b[i] = p[2] as f32 / 255.0;
        }
        Tensor { shape: [3, h, w], data }
    }

    /// `ToTensor` then `Normalize(mean, std)` in one pass; the same f32
    /// operations in the same order, so the result is identical.
    pub fn from_image_normalized(img: &Image, mean: &[f32], std: &[f32]) -> Tensor {
        let (w, h) = (img.width(), img.height());
        let plane = w * h;
        let mut data = vec![0f32; 3 * plane];
        let (r, rest) = data.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        let at = |v: &[f32], c: usize, default: f32| v.get(c % v.len().max(1)).copied().unwrap_or(default);
        let m = [at(mean, 0, 0.0), at(mean, 1, 0.0), at(mean, 2, 0.0)];
        let s = [at(std, 0, 1.0), at(std, 1, 1.0), at(std, 2, 1.0)];
        for (i, p) in img.as_rgb().chunks_exact(3).enumerate() {
            r[i] = (p[0] as f32 / 255.0 - m[0]) / s[0];
            g[i] = (p[1] as f32 / 255.0 - m[1]) / s[1];
            b[i] = (p[2] as f32 / 255.0 - m[2]) / s[2];
        }
        Tensor { shape: [3, h, w], data }
    }

    /// `Normalize(mean, std)`: `(x - mean[c]) / std[c]` per channel, in f32
    /// as torch does. `mean` and `std` hold one value per channel (or one for
    /// all); empty lists mean 0 and 1.
    pub fn normalize(&mut self, mean: &[f32], std: &[f32]) {
        let plane = self.shape[1] * self.shape[2];
        if plane == 0 {
            return;
        }
        let at = |v: &[f32], c: usize, default: f32| v.get(c % v.len().max(1)).copied().unwrap_or(default);
        for (c, values) in self.data.chunks_exact_mut(plane).enumerate() {
            let (m, s) = (at(mean, c, 0.0), at(std, c, 1.0));
            for v in values {
                *v = (*v - m) / s;
            }
        }
    }

    /// `F.erase`: sets rows `top..top+h`, columns `left..left+w` of every
    /// channel to `value(c, y, x)`.
    pub fn erase(&mut self, top: usize, left: usize, h: usize, w: usize, mut value: impl FnMut(usize) -> f32) {
        let [ch, height, width] = self.shape;
        for c in 0..ch {
            for y in top..(top + h).min(height) {
                for x in left..(left + w).min(width) {
                    self.data[(c * height + y) * width + x] = value(c);
                }
            }
        }
    }
}
