//! What the CPU benchmarks share: the tiny ViT they train and how they
//! read options and summarise repetitions.

/// Images per step.
pub const BATCH: usize = 64;

/// `quickstart/vit_tiny` reshaped to the benchmark model: 32x32 images,
/// patch 4, width 96, depth 4, 3 heads, MLP 384, 10 classes, batch 64,
/// AdamW with weight decay 0.05.
pub fn tiny_vit_overrides() -> Vec<String> {
    [
        "MODEL.TRUNK.VISION_TRANSFORMERS.IMAGE_SIZE=32",
        "MODEL.TRUNK.VISION_TRANSFORMERS.PATCH_SIZE=4",
        "MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM=96",
        "MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=4",
        "MODEL.TRUNK.VISION_TRANSFORMERS.NUM_HEADS=3",
        "MODEL.TRUNK.VISION_TRANSFORMERS.MLP_DIM=384",
        "MODEL.HEAD.PARAMS.0.1.dims=[96,10]",
        "DATA.TRAIN.BATCHSIZE_PER_REPLICA=64",
        "OPTIMIZER.weight_decay=0.05",
    ]
    .map(String::from)
    .to_vec()
}

/// An environment option, or `default` when unset or not a number.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

/// The median of repetitions (robust to the odd slow one on a shared machine).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
