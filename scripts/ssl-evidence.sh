#!/usr/bin/env bash
# Evidence that MoCo, SimCLR and SwAV learn: each pretrains the quickstart's
# tiny ViT (configs/quickstart/{moco,simclr,swav}_vit_tiny.yaml) on the
# generated quickstart image folder without labels, then a linear probe
# (configs/quickstart/linear_eval_vit_tiny.yaml: frozen trunk in eval mode,
# BatchNorm + Linear and Linear heads on its class tokens, SGD) trains on its
# features with the labels. The baseline is the same probe on the same trunk
# at random initialisation. Prints both validation top-1 accuracies (the
# best probe head, as VISSL's benchmarks report) per method and writes them
# to $OUT/results.json.
#
#     ./scripts/ssl-evidence.sh              # about 12 minutes on 2 cores
#     EPOCHS=10 ./scripts/ssl-evidence.sh    # a quicker look
#
# Everything lands under $OUT (default runs/ssl-evidence); a finished run is
# not repeated (delete $OUT to start over).
set -euo pipefail
cd "$(dirname "$0")/.."

EPOCHS=${EPOCHS:-40}
OUT=${OUT:-runs/ssl-evidence}
METHODS=${METHODS:-"moco simclr swav"}

cargo build --release --quiet
T=./target/release/tessera
if [ ! -f runs/data/quickstart/tessera-synth.json ]; then
    "$T" data synth --out runs/data/quickstart
fi
mkdir -p "$OUT"

# The last test phase's best top-1 over the probe's heads, with its name.
top1() {
    python3 -c '
import json, sys
last = None
for line in open(sys.argv[1]):
    m = json.loads(line).get("test_accuracy_list_meter")
    if m:
        last = m["top_1"]
name, acc = max(last.items(), key=lambda kv: kv[1]) if last else ("none", float("nan"))
print(f"{acc:.2f} ({name})")
' "$1/metrics.json"
}

# A linear probe on the frozen trunk; extra arguments initialise it.
probe() {
    local dir=$1
    shift
    echo "== linear probe -> $dir" >&2
    "$T" train config=quickstart/linear_eval_vit_tiny CHECKPOINT.DIR="$dir" -q "$@" >&2
}

probe "$OUT/probe_random"
random=$(top1 "$OUT/probe_random")
results="\"random_init\": \"$random\""
rows=()
for m in $METHODS; do
    echo "== pretraining $m for $EPOCHS epochs -> $OUT/$m" >&2
    "$T" train config=quickstart/${m}_vit_tiny CHECKPOINT.DIR="$OUT/$m" OPTIMIZER.num_epochs="$EPOCHS" -q >&2
    final=$(ls -d "$OUT/$m"/model_final_checkpoint_phase* | tail -1)
    probe "$OUT/probe_$m" MODEL.WEIGHTS_INIT.PARAMS_FILE="$final"
    acc=$(top1 "$OUT/probe_$m")
    rows+=("$(printf '%-8s %-30s %-30s %s' "$m" "$random" "$acc" "$EPOCHS")")
    results="$results, \"$m\": \"$acc\""
done
echo "{$results, \"pretrain_epochs\": $EPOCHS}" > "$OUT/results.json"
printf '%-8s %-30s %-30s %s\n' method "top-1, probe on random init" "top-1, probe after pretraining" "pretrain epochs"
printf '%s\n' "${rows[@]}"
