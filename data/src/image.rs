//! `Image`: 8-bit RGB, row-major HWC, the one pixel format of the PIL stage.
//!
//! Everything torchvision's PIL path sees after VISSL's `.convert("RGB")` is an
//! 8-bit RGB image, so the transforms here only ever handle that mode (plus an
//! internal single-channel "L" plane where Pillow converts to grayscale).

/// An 8-bit RGB image, rows top to bottom, pixels `[r, g, b]` interleaved.
#[derive(Clone, PartialEq, Eq)]
pub struct Image {
    width: usize,
    height: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Image({}x{} RGB)", self.width, self.height)
    }
}

impl Image {
    /// Wraps RGB bytes; `None` unless `data.len() == width * height * 3`.
    pub fn from_rgb(width: usize, height: usize, data: Vec<u8>) -> Option<Image> {
        let len = width.checked_mul(height)?.checked_mul(3)?;
        (data.len() == len).then_some(Image { width, height, data })
    }

    /// An image filled with one colour.
    pub fn filled(width: usize, height: usize, rgb: [u8; 3]) -> Image {
        let mut data = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            data.extend_from_slice(&rgb);
        }
        Image { width, height, data }
    }

    /// VISSL's stand-in for an unreadable image (`vissl/data/data_helper.py::
    /// get_mean_image`, sized by `DEFAULT_GRAY_IMG_SIZE`): `size`x`size`, every
    /// channel 128.
    pub fn mean_gray(size: usize) -> Image {
        Image::filled(size, size, [MEAN_GRAY; 3])
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    /// The RGB bytes, row-major, `width * height * 3` of them.
    pub fn as_rgb(&self) -> &[u8] {
        &self.data
    }

    pub fn into_rgb(self) -> Vec<u8> {
        self.data
    }

    pub(crate) fn data_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// `PIL.Image.crop((left, top, left + width, top + height))`: pixels outside
    /// the source are black, as Pillow fills them with zeros.
    pub fn crop(&self, left: i64, top: i64, width: usize, height: usize) -> Image {
        let mut out = vec![0u8; width * height * 3];
        for y in 0..height {
            let sy = top + y as i64;
            if sy < 0 || sy >= self.height as i64 {
                continue;
            }
            // Overlap of [left, left + width) with [0, self.width).
            let x0 = left.max(0);
            let x1 = (left + width as i64).min(self.width as i64);
            if x0 >= x1 {
                continue;
            }
            let src = (sy as usize * self.width + x0 as usize) * 3;
            let dst = (y * width + (x0 - left) as usize) * 3;
            let n = (x1 - x0) as usize * 3;
            out[dst..dst + n].copy_from_slice(&self.data[src..src + n]);
        }
        Image { width, height, data: out }
    }

    /// `Image.transpose(FLIP_LEFT_RIGHT)`.
    pub fn flip_left_right(&self) -> Image {
        let mut out = self.clone();
        out.flip_left_right_in_place();
        out
    }

    /// `Image.transpose(FLIP_LEFT_RIGHT)` in place (no allocation).
    pub fn flip_left_right_in_place(&mut self) {
        let w = self.width;
        if w < 2 {
            return;
        }
        for row in self.data.chunks_exact_mut(w * 3) {
            for x in 0..w / 2 {
                let (a, b) = (x * 3, (w - 1 - x) * 3);
                for c in 0..3 {
                    row.swap(a + c, b + c);
                }
            }
        }
    }

    /// `Image.transpose(ROTATE_180)`.
    pub(crate) fn rotate_180(&self) -> Image {
        let mut out = Vec::with_capacity(self.data.len());
        for px in self.data.chunks_exact(3).rev() {
            out.extend_from_slice(px);
        }
        Image { width: self.width, height: self.height, data: out }
    }

    /// `Image.transpose(ROTATE_90)` (counter-clockwise) when `ccw`, else ROTATE_270.
    pub(crate) fn rotate_90(&self, ccw: bool) -> Image {
        let (w, h) = (self.width, self.height);
        let mut out = vec![0u8; self.data.len()];
        for y in 0..h {
            for x in 0..w {
                // Output is h wide and w tall.
                let (ox, oy) = if ccw { (y, w - 1 - x) } else { (h - 1 - y, x) };
                let s = (y * w + x) * 3;
                let d = (oy * h + ox) * 3;
                out[d..d + 3].copy_from_slice(&self.data[s..s + 3]);
            }
        }
        Image { width: h, height: w, data: out }
    }

    /// `convert("L")`: ITU-R 601-2 luma in Pillow's 16-bit fixed point
    /// (`L24` in `libImaging/Convert.c`: (19595 R + 38470 G + 7471 B + 0x8000) >> 16).
    pub fn to_luma(&self) -> Vec<u8> {
        self.data.chunks_exact(3).map(|p| luma(p[0], p[1], p[2])).collect()
    }

    /// `convert("L").convert("RGB")`: the grayscale image torchvision's
    /// `to_grayscale(img, 3)` and `ImageEnhance.Color`'s degenerate image use.
    pub fn to_grayscale(&self) -> Image {
        let mut data = Vec::with_capacity(self.data.len());
        for p in self.data.chunks_exact(3) {
            let l = luma(p[0], p[1], p[2]);
            data.extend_from_slice(&[l, l, l]);
        }
        Image { width: self.width, height: self.height, data }
    }
}

/// The value of every channel of VISSL's fallback image (`128 * np.ones(...)`).
pub const MEAN_GRAY: u8 = 128;

#[inline]
pub(crate) fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}
