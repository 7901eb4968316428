#!/usr/bin/env bash
# The step's traffic on paper for the three models issue 14 tracks: bytes
# moved per training step, kernels, the planned peak and the roofline
# estimate on an H200 (`tessera plan --memory --device h200`; an estimate
# from datasheet peaks, not a measurement), as one table, each model with
# the earlier pass pipeline ("before") and the current one.
#
#     ./scripts/bytes-moved.sh [h100|h200]
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${1:-h200}"
cargo build --release --quiet --bin tessera
T=./target/release/tessera
DEIT=config=pretrain/vision_transformer/supervised/16gpu_deit_b_example
VT=MODEL.TRUNK.VISION_TRANSFORMERS
AMP=(MODEL.AMP_PARAMS.USE_AMP=true "$VT.DROP_PATH_RATE=0")
# The pipeline without this round's pass (patch-linear), measured by the
# same report: the "before" rows. (The plans at the start of earlier rounds,
# c4040d1 and d87ab7b, are in the issue notes: check out such a commit and
# run this script to measure them.)
BEFORE=gated-attention-pattern,attention-pattern,cross-entropy-pattern,slice-first,dce,cse,fold,dce,packed-attention
BEFORE=$BEFORE,fuse-into-matmul,residual-into-linear,norm-grad-epilogue,amp-bf16,dce,layer-norm-grad,bias-grad-epilogue
BEFORE=$BEFORE,share-recompute,fuse-elementwise,fuse-optimizer
# beside GEMMs: of the bytes moved, those of passes beside library GEMMs
# (prologue operands through scratch, epilogue re-passes), which GEMMs with
# fused prologues and epilogues would not move.
# kernels: the plan's, views (reshapes, slices of contiguous rows) among
# them; launched: those that move bytes or compute (each a kernel launch or
# more on the GPU; a view moves nothing).
printf '%-38s %8s %9s %12s %13s %10s %12s %9s\n' model kernels launched "moved GiB" "beside GEMMs" "peak GiB" "${DEVICE} ms" "img/s"
row() {
    local name="$1"
    shift
    one "$name, before" "$@" --passes "$BEFORE"
    one "$name" "$@"
}
one() {
    local name="$1"
    shift
    "$T" plan "$@" --memory --format json --device "$DEVICE" | python3 -c '
import json, sys
d = json.load(sys.stdin)
r = d["roofline"]
moved, peak = d["bytes_moved"]["total"] / 2**30, d["peak_bytes"] / 2**30
beside = d["bytes_moved"]["beside_library_gemms"] / 2**30
launched = sum(1 for k in d["bytes_moved"]["kernels"] if k["bytes"] > 0 or k["flops"] > 0)
print("%-38s %8d %9d %12.1f %13.1f %10.2f %12.1f %9.0f" % (sys.argv[1], d["kernels"], launched, moved, beside, peak, r["step_ms"], r["img_per_sec"]))
' "$name"
}
row "ViT-B/16 batch 256 bf16" "$DEIT" "$VT.QKV_BIAS=true" "${AMP[@]}" --batch 256
row "ViT-L/16 batch 128 bf16" "$DEIT" "$VT.QKV_BIAS=true" "${AMP[@]}" "$VT.HIDDEN_DIM=1024" "$VT.NUM_LAYERS=24" \
    "$VT.NUM_HEADS=16" "$VT.MLP_DIM=4096" "MODEL.HEAD.PARAMS=[[mlp, {dims: [1024, 1000]}]]" --batch 128
row "ConViT-S batch 128 bf16" config=pretrain/vision_transformer/supervised/1gpu_convit_s_example "${AMP[@]}" --batch 128
