#!/usr/bin/env bash
# Compile time against depth (issue 15, defect 9): the quickstart ViT with
# NUM_LAYERS from 250 to 4000, through `tessera compile` (the forward
# graph), `tessera compile --emit plan` (the training step lowered and
# memory planned) and `tessera plan --memory` (that, plus a second plan in
# plain topological order, costs and the SVG). Each row doubles the depth,
# so a ratio near 2 is linear time.
#
#     ./scripts/bench-compile.sh [LAYERS...]     (default 250 500 1000 2000 4000)
#     TESSERA=/path/to/tessera ./scripts/bench-compile.sh ...   (another build)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${TESSERA:-}" ]; then
    cargo build --release --quiet --bin tessera
fi
T=${TESSERA:-./target/release/tessera}
[ $# -gt 0 ] || set -- 250 500 1000 2000 4000
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
seconds() {
    local start end
    start=$(date +%s.%N)
    "$@" >/dev/null 2>&1
    end=$(date +%s.%N)
    echo "$end - $start" | bc -l
}
printf '%7s %14s %6s %14s %6s %14s %6s\n' layers compile ratio "--emit plan" ratio "plan --memory" ratio
prev=()
for n in "$@"; do
    args=(config=quickstart/vit_tiny "MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=$n")
    times=(
        "$(seconds "$T" compile "${args[@]}" -o "$OUT/summary.txt")"
        "$(seconds "$T" compile "${args[@]}" --emit plan -o "$OUT/plan.json")"
        "$(seconds "$T" plan "${args[@]}" --memory)"
    )
    row=$(printf '%7d' "$n")
    for i in 0 1 2; do
        ratio=$([ ${#prev[@]} -gt 0 ] && printf '%.2f' "$(echo "${times[$i]} / ${prev[$i]}" | bc -l)" || echo -)
        row+=$(printf ' %13.2fs %6s' "${times[$i]}" "$ratio")
    done
    echo "$row"
    prev=("${times[@]}")
done
