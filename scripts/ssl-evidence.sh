#!/usr/bin/env bash
# Evidence that MoCo, SimCLR and SwAV learn: each pretrains the quickstart's
# tiny ViT (configs/quickstart/{moco,simclr,swav}_vit_tiny.yaml) on the
# generated quickstart image folder without labels, then a linear probe
# (configs/quickstart/linear_eval_vit_tiny.yaml: frozen trunk in eval mode,
# BatchNorm + Linear on the class token, SGD) trains on its features with
# the labels. The baseline is the same probe on the same trunk at random
# initialisation. Prints both validation top-1 accuracies per method and
# writes them to $OUT/results.json.
#
#     ./scripts/ssl-evidence.sh                  # about 10 minutes on 2 cores
#     EPOCHS=10 PROBE_EPOCHS=5 ./scripts/ssl-evidence.sh   # a quicker look
#
# Everything lands under $OUT (default runs/ssl-evidence); a finished step
# is not repeated (delete $OUT to start over).
set -euo pipefail
cd "$(dirname "$0")/.."

EPOCHS=${EPOCHS:-40}
PROBE_EPOCHS=${PROBE_EPOCHS:-10}
OUT=${OUT:-runs/ssl-evidence}
METHODS=${METHODS:-"moco simclr swav"}

cargo build --release --quiet
T=./target/release/tessera
if [ ! -f runs/data/quickstart/tessera-synth.json ]; then
    "$T" data synth --out runs/data/quickstart
fi
mkdir -p "$OUT"

# The last test-phase top-1 in a run's metrics.json.
top1() {
    python3 - "$1/metrics.json" <<'EOF'
import json, sys
best = None
for line in open(sys.argv[1]):
    r = json.loads(line)
    m = r.get("test_accuracy_list_meter")
    if m:
        best = m["top_1"]
print(f"{list(best.values())[0]:.2f}" if best else "nan")
EOF
}

# A linear probe on the frozen trunk; extra arguments initialise it.
probe() {
    local dir=$1
    shift
    echo "== linear probe -> $dir" >&2
    "$T" train config=quickstart/linear_eval_vit_tiny CHECKPOINT.DIR="$dir" \
        OPTIMIZER.num_epochs="$PROBE_EPOCHS" -q "$@" >&2
}

probe "$OUT/probe_random"
random=$(top1 "$OUT/probe_random")
echo "{\"random_init\": $random" > "$OUT/results.json.tmp"
printf '%-8s %14s %14s %9s\n' method "random init" pretrained epochs
for m in $METHODS; do
    echo "== pretraining $m for $EPOCHS epochs -> $OUT/$m" >&2
    "$T" train config=quickstart/${m}_vit_tiny CHECKPOINT.DIR="$OUT/$m" OPTIMIZER.num_epochs="$EPOCHS" -q >&2
    final=$(ls -d "$OUT/$m"/model_final_checkpoint_phase* | tail -1)
    probe "$OUT/probe_$m" MODEL.WEIGHTS_INIT.PARAMS_FILE="$final/model.safetensors"
    acc=$(top1 "$OUT/probe_$m")
    printf '%-8s %13s%% %13s%% %9s\n' "$m" "$random" "$acc" "$EPOCHS"
    echo ", \"$m\": $acc" >> "$OUT/results.json.tmp"
done
echo "}" >> "$OUT/results.json.tmp"
tr -d '\n' < "$OUT/results.json.tmp" > "$OUT/results.json" && rm "$OUT/results.json.tmp"
