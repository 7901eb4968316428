#!/usr/bin/env bash
# Data-parallel training on this machine's CPUs, tessera against PyTorch DDP
# with the Gloo backend, side by side in one run:
#
#   1. the training step of the same ViT (32x32 images, 4x4 patches, width
#      192, 6 blocks, batch 32 per process) in 2 processes: median step time,
#      images per second, and tessera's speed relative to PyTorch's;
#   2. an all-reduce of ViT-B/16's gradient (86,567,656 f32, 346 MB) across
#      2 processes: bus bandwidth, tessera's relative to Gloo's.
#
#     ./scripts/bench-ddp.sh            (PROCS=4 BATCH=16 STEPS=30 to change)
#
# PyTorch comes from PyPI into a venv under ~/.cache/tessera (made once,
# about 5 GB with the CUDA libraries PyPI's torch wheel depends on; only its
# CPU side runs). Ratios above 1 mean tessera is faster. Machines are noisy:
# compare ratios from one run, not absolute times across runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PROCS="${PROCS:-2}"
BATCH="${BATCH:-32}"
STEPS="${STEPS:-20}"
ELEMENTS="${ELEMENTS:-86567656}"
TORCH_VERSION=2.13.0
CACHE="${TESSERA_CACHE:-$HOME/.cache/tessera}"
VENV="$CACHE/ddp-bench-venv"
if [ ! -f "$VENV/.done-$TORCH_VERSION" ]; then
    echo "bench-ddp: installing torch $TORCH_VERSION from PyPI into $VENV (once)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" >&2
    touch "$VENV/.done-$TORCH_VERSION"
fi
cargo build --release -q --bin tessera
VT=MODEL.TRUNK.VISION_TRANSFORMERS
MODEL=("$VT.HIDDEN_DIM=192" "$VT.NUM_LAYERS=6" "$VT.NUM_HEADS=3" "$VT.MLP_DIM=768" "$VT.PATCH_SIZE=4"
       "MODEL.HEAD.PARAMS=[[mlp, {dims: [192, 10]}]]" "DISTRIBUTED.NUM_PROC_PER_NODE=$PROCS")
T=./target/release/tessera
echo "bench-ddp: the training step, $PROCS processes x batch $BATCH" >&2
ours=$("$T" bench config=quickstart/vit_tiny --device cpu "${MODEL[@]}" --batch "$BATCH" --steps "$STEPS" --format json 2>/dev/null | tail -1)
theirs=$("$VENV/bin/python" scripts/bench/ddp_bench.py step "$PROCS" "$BATCH" "$STEPS" 3 2>/dev/null | tail -1)
echo "bench-ddp: all-reduce of $ELEMENTS f32, $PROCS processes" >&2
ours_ar=$("$T" bench config=quickstart/vit_tiny --device cpu "DISTRIBUTED.NUM_PROC_PER_NODE=$PROCS" --all-reduce "$ELEMENTS" --steps 5 --warmup 1 --format json 2>/dev/null | tail -1)
theirs_ar=$("$VENV/bin/python" scripts/bench/ddp_bench.py allreduce "$PROCS" "$ELEMENTS" 5 2>/dev/null | tail -1)
python3 - "$ours" "$theirs" "$ours_ar" "$theirs_ar" <<'PY'
import json, sys
ours, theirs, ours_ar, theirs_ar = (json.loads(a) for a in sys.argv[1:])
print(f"step    tessera {ours['step_ms']:8.1f} ms  {ours['images_per_sec']:7.1f} img/s | "
      f"PyTorch DDP (Gloo) {theirs['step_ms']:8.1f} ms  {theirs['images_per_sec']:7.1f} img/s | "
      f"speed ratio tessera/PyTorch {theirs['step_ms'] / ours['step_ms']:.2f}")
print(f"allred  tessera {ours_ar['time_ms']:8.1f} ms  {ours_ar['busbw_gbps']:.3f} GB/s bus | "
      f"Gloo {theirs_ar['time_ms']:8.1f} ms  {theirs_ar['busbw_gbps']:.3f} GB/s bus | "
      f"bandwidth ratio tessera/Gloo {ours_ar['busbw_gbps'] / theirs_ar['busbw_gbps']:.2f}")
PY
