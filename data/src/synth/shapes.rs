//! The ten image families of the synthetic ImageFolder and their renderer.
//! Each image: a random background (colour plus a faint gradient), one
//! instance of its family at a random position, scale and angle in a
//! contrasting random colour, 2x2 supersampled edges, then Gaussian noise.

use std::f64::consts::{PI, TAU};

use crate::image::Image;
use crate::rng::SampleRng;

/// Class names in sorted order, so that a family's ImageFolder label is its
/// position here.
pub const FAMILIES: [&str; 10] =
    ["checkerboard", "circle", "cross", "dots", "gradient", "ring", "square", "stripes_h", "stripes_v", "triangle"];

/// The drawn parameters of one image (lengths in pixels).
struct Scene {
    family: usize,
    size: f64,
    center: [f64; 2],
    radius: f64,
    angle: f64,
    /// Stripe period, checker cell, ring inner radius, cross half-width.
    detail: f64,
    dots: Vec<([f64; 2], f64)>,
    fg: [f64; 3],
    bg: [f64; 3],
    /// Background gradient: direction and amplitude per channel.
    bg_dir: [f64; 2],
    bg_amp: [f64; 3],
    noise_std: f64,
}

fn luma(c: [f64; 3]) -> f64 {
    0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
}

fn colour(rng: &mut SampleRng) -> [f64; 3] {
    [rng.uniform_range(0.0, 255.0), rng.uniform_range(0.0, 255.0), rng.uniform_range(0.0, 255.0)]
}

impl Scene {
    fn draw(family: usize, size: usize, max_noise: f64, rng: &mut SampleRng) -> Scene {
        let s = size as f64;
        let bg = colour(rng);
        // A foreground that stands out: at least 60 levels of luma apart.
        let mut fg = colour(rng);
        for _ in 0..16 {
            if (luma(fg) - luma(bg)).abs() >= 60.0 {
                break;
            }
            fg = colour(rng);
        }
        if (luma(fg) - luma(bg)).abs() < 60.0 {
            fg = bg.map(|v| 255.0 - v);
        }
        let center = [s * rng.uniform_range(0.3, 0.7), s * rng.uniform_range(0.3, 0.7)];
        let radius = s * rng.uniform_range(0.18, 0.34);
        let jitter = rng.uniform_range(-0.25, 0.25); // ~±15 degrees
        let (angle, detail) = match FAMILIES[family] {
            "checkerboard" => (jitter, s / 32.0 * rng.uniform_range(3.0, 5.5)),
            "stripes_h" => (jitter, s / 32.0 * rng.uniform_range(3.0, 6.0)),
            "stripes_v" => (PI / 2.0 + jitter, s / 32.0 * rng.uniform_range(3.0, 6.0)),
            "ring" => (0.0, radius * rng.uniform_range(0.45, 0.7)),
            "cross" => (jitter, radius * rng.uniform_range(0.18, 0.32)),
            "triangle" => (rng.uniform_range(0.0, TAU), 0.0),
            "gradient" => (rng.uniform_range(0.0, TAU), 0.0),
            _ => (jitter, 0.0),
        };
        let dots = if FAMILIES[family] == "dots" {
            let n = 3 + rng.below(5);
            (0..n)
                .map(|_| {
                    let p = [s * rng.uniform_range(0.1, 0.9), s * rng.uniform_range(0.1, 0.9)];
                    (p, s * rng.uniform_range(0.04, 0.08))
                })
                .collect()
        } else {
            Vec::new()
        };
        let t = rng.uniform_range(0.0, TAU);
        let bg_amp = [rng.uniform_range(0.0, 25.0), rng.uniform_range(0.0, 25.0), rng.uniform_range(0.0, 25.0)];
        Scene {
            family,
            size: s,
            center,
            radius,
            angle,
            detail,
            dots,
            fg,
            bg,
            bg_dir: [t.cos(), t.sin()],
            bg_amp,
            noise_std: rng.uniform_range(0.2, 1.0) * max_noise,
        }
    }

    /// Whether point (x, y) lies on the shape.
    fn inside(&self, x: f64, y: f64) -> bool {
        let (dx, dy) = (x - self.center[0], y - self.center[1]);
        let (c, s) = (self.angle.cos(), self.angle.sin());
        // Coordinates in the shape's frame (rotated by -angle).
        let (u, v) = (c * dx + s * dy, -s * dx + c * dy);
        let r = self.radius;
        let in_patch = u.abs() <= r * 1.25 && v.abs() <= r * 1.25;
        match FAMILIES[self.family] {
            "circle" => dx * dx + dy * dy <= r * r,
            "ring" => {
                let d2 = dx * dx + dy * dy;
                d2 <= r * r && d2 >= self.detail * self.detail
            }
            "square" => u.abs() <= r * 0.85 && v.abs() <= r * 0.85,
            "cross" => (u.abs() <= r && v.abs() <= self.detail) || (v.abs() <= r && u.abs() <= self.detail),
            "triangle" => {
                // Equilateral, circumradius r: inside all three edge half-planes.
                (0..3).all(|k| {
                    let a = self.angle + TAU * k as f64 / 3.0 + PI / 3.0;
                    dx * a.cos() + dy * a.sin() <= r * 0.5
                })
            }
            // Stripes across the patch: bands of width detail/2 along u.
            "stripes_h" | "stripes_v" => in_patch && (v / self.detail).rem_euclid(1.0) < 0.5,
            "checkerboard" => {
                in_patch && (((u / self.detail).floor() + (v / self.detail).floor()) as i64).rem_euclid(2) == 0
            }
            "dots" => self.dots.iter().any(|(p, rad)| (x - p[0]).powi(2) + (y - p[1]).powi(2) <= rad * rad),
            _ => false,
        }
    }

    fn background(&self, x: f64, y: f64) -> [f64; 3] {
        let t = ((x - self.size / 2.0) * self.bg_dir[0] + (y - self.size / 2.0) * self.bg_dir[1]) / self.size;
        [0, 1, 2].map(|c| self.bg[c] + self.bg_amp[c] * t)
    }

    fn pixel(&self, x: usize, y: usize) -> [f64; 3] {
        let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
        if FAMILIES[self.family] == "gradient" {
            // Background colour to foreground colour along the drawn direction.
            let (c, s) = (self.angle.cos(), self.angle.sin());
            let t = (((px - self.center[0]) * c + (py - self.center[1]) * s) / self.size + 0.5).clamp(0.0, 1.0);
            return [0, 1, 2].map(|k| self.bg[k] * (1.0 - t) + self.fg[k] * t);
        }
        let mut hits = 0;
        for (ox, oy) in [(-0.25, -0.25), (0.25, -0.25), (-0.25, 0.25), (0.25, 0.25)] {
            hits += usize::from(self.inside(px + ox, py + oy));
        }
        let cover = hits as f64 / 4.0;
        let bg = self.background(px, py);
        [0, 1, 2].map(|k| bg[k] * (1.0 - cover) + self.fg[k] * cover)
    }
}

/// Renders one `size` x `size` image of `family` from `rng`.
pub fn render(family: usize, size: usize, max_noise: f64, rng: &mut SampleRng) -> Image {
    let scene = Scene::draw(family, size, max_noise, rng);
    let mut data = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        for x in 0..size {
            for v in scene.pixel(x, y) {
                let noisy = v + scene.noise_std * rng.normal();
                data.push(noisy.round().clamp(0.0, 255.0) as u8);
            }
        }
    }
    Image::from_rgb(size, size, data).expect("size*size*3 bytes")
}
