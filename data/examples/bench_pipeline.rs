//! Single-thread throughput of the supervised training input path:
//! decode JPEG + RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor +
//! Normalize, on 64 ImageNet-sized (500x375) JPEGs written to a temp dir.
//!
//!     cargo run --release -p tessera-data --example bench_pipeline
//!
//! Prints images/s on one core, overall and per stage.

use std::time::Instant;

use jpeg_encoder::{ColorType, Encoder};
use serde_json::json;
use tessera_data::{decode, functional, Image, Pipeline, SampleKey, SampleRng, Tensor};

const NUM_IMAGES: usize = 64;
const ROUNDS: u64 = 8;

/// A photo-like 500x375 image: a sky/ground split, soft blobs of colour,
/// textured noise and a few hard-edged shapes (flat colour would make the
/// JPEG unrealistically cheap to decode).
fn natural_image(seed: u64) -> Image {
    let (w, h) = (500usize, 375usize);
    let mut rng = SampleRng::new(SampleKey::new(seed, 0, 0), 0);
    let blobs: Vec<[f64; 6]> = (0..6)
        .map(|_| {
            let mut b = [0.0; 6];
            for v in &mut b {
                *v = rng.uniform();
            }
            b
        })
        .collect();
    let horizon = 0.3 + 0.4 * rng.uniform();
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f64 / w as f64, y as f64 / h as f64);
            let mut rgb = if fy < horizon + 0.05 * (fx * 12.0).sin() {
                [110.0 + 80.0 * fy, 150.0 + 60.0 * fy, 230.0 - 30.0 * fy]
            } else {
                [90.0 + 40.0 * fx, 120.0 - 30.0 * fy, 60.0 + 20.0 * fx]
            };
            for b in &blobs {
                let d2 = (fx - b[0]).powi(2) + (fy - b[1]).powi(2);
                let weight = (-d2 / (0.005 + 0.02 * b[2])).exp();
                rgb[0] += weight * (b[3] * 255.0 - rgb[0]);
                rgb[1] += weight * (b[4] * 255.0 - rgb[1]);
                rgb[2] += weight * (b[5] * 255.0 - rgb[2]);
            }
            if (x / 40 + y / 30) % 7 == 0 && fy > horizon {
                rgb = [rgb[0] * 0.5, rgb[1] * 0.6, rgb[2] * 0.4];
            }
            let texture = 12.0 * ((x as f64 * 0.7).sin() * (y as f64 * 0.9).cos()) + rng.uniform_range(-10.0, 10.0);
            for v in rgb {
                data.push((v + texture).clamp(0.0, 255.0) as u8);
            }
        }
    }
    Image::from_rgb(w, h, data).expect("size")
}

/// glibc's malloc can hand blocks above its (adaptive) mmap threshold back to
/// the kernel on free, so an image's ~2 MB of buffers (decoded RGB, decoder
/// planes, crop, tensor) comes back as fresh zero pages; in one allocation
/// pattern we measured ~330 page faults and 0.5 ms per image from this.
/// Raising the thresholds keeps freed memory for reuse; the bench reports
/// both, and the training engine may want the same at startup.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() -> bool {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: mallopt only changes glibc's allocation thresholds; it is
    // called from the main thread before any other thread exists.
    unsafe { mallopt(M_MMAP_THRESHOLD, 64 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, 256 << 20) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() -> bool {
    false
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("tessera-bench-pipeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut files = Vec::with_capacity(NUM_IMAGES);
    for i in 0..NUM_IMAGES {
        let img = natural_image(i as u64);
        let path = dir.join(format!("img{i:02}.jpg"));
        // Quality 90 with 4:2:0 chroma, like typical ImageNet JPEGs.
        let mut bytes = Vec::new();
        Encoder::new(&mut bytes, 90).encode(img.as_rgb(), img.width() as u16, img.height() as u16, ColorType::Rgb)?;
        std::fs::write(&path, &bytes)?;
        files.push(path);
    }
    let blobs: Vec<Vec<u8>> = files.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    let kib = blobs.iter().map(Vec::len).sum::<usize>() as f64 / 1024.0 / NUM_IMAGES as f64;
    println!("{NUM_IMAGES} JPEGs of 500x375 in {}, {kib:.0} KiB each on average", dir.display());

    let pipeline = Pipeline::from_config(&json!([
        {"name": "RandomResizedCrop", "size": 224},
        {"name": "RandomHorizontalFlip"},
        {"name": "ToTensor"},
        {"name": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    ]))?;

    // Warm up (page cache, allocator), then time ROUNDS passes over the files.
    let mut checksum = 0.0f64;
    for (i, b) in blobs.iter().enumerate() {
        let out = pipeline.apply(&decode(b, &files[i])?, SampleKey::new(0, 0, i as u64));
        checksum += out[0].data[0] as f64;
    }
    let n = NUM_IMAGES as u64 * ROUNDS;
    let mut run_total = |epoch0: u64| -> Result<f64, tessera_data::Error> {
        let start = Instant::now();
        for round in 0..ROUNDS {
            for (i, b) in blobs.iter().enumerate() {
                let img = decode(b, &files[i])?;
                let out: Vec<Tensor> = pipeline.apply(&img, SampleKey::new(0, epoch0 + round, i as u64));
                checksum += out[0].data[1000] as f64;
            }
        }
        Ok(start.elapsed().as_secs_f64())
    };
    let total_default_malloc = run_total(1)?;
    let tuned = keep_freed_memory();
    let total = run_total(1 + ROUNDS)?;

    // Per-stage breakdown on the same work.
    let t = Instant::now();
    let mut images = Vec::with_capacity(NUM_IMAGES);
    for round in 0..ROUNDS {
        for (i, b) in blobs.iter().enumerate() {
            let img = decode(b, &files[i])?;
            if round == 0 {
                images.push(img);
            }
        }
    }
    let t_decode = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut crops = Vec::with_capacity(NUM_IMAGES);
    for round in 0..ROUNDS {
        for (i, img) in images.iter().enumerate() {
            let mut rng = SampleRng::new(SampleKey::new(0, round, i as u64), 0);
            let b = tessera_data::transforms::RandomResizedCrop::get_params(
                500,
                375,
                [0.08, 1.0],
                [0.75, 4.0 / 3.0],
                &mut rng,
            );
            let crop = functional::resized_crop(
                img,
                b.top as i64,
                b.left as i64,
                b.height,
                b.width,
                [224, 224],
                functional::Filter::Bilinear,
            );
            let crop = if rng.uniform() < 0.5 { functional::hflip(&crop) } else { crop };
            if round == 0 {
                crops.push(crop);
            }
        }
    }
    let t_crop = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..ROUNDS {
        for crop in &crops {
            let mut x = Tensor::from_image(crop);
            x.normalize(&[0.485, 0.456, 0.406], &[0.229, 0.224, 0.225]);
            checksum += x.data[7] as f64;
        }
    }
    let t_tensor = t.elapsed().as_secs_f64();

    let per = |s: f64| format!("{:7.1} images/s ({:.3} ms/image)", n as f64 / s, s * 1e3 / n as f64);
    println!("decode + RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor + Normalize, 1 thread:");
    println!("  total (malloc defaults): {}", per(total_default_malloc));
    if tuned {
        println!("  total (mallopt tuned):   {}", per(total));
    }
    println!("  decode:                  {}", per(t_decode));
    println!("  resized crop + flip:     {}", per(t_crop));
    println!("  ToTensor + Normalize:    {}", per(t_tensor));
    println!("(checksum {checksum:.3})");
    if std::env::var_os("KEEP").is_none() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
