#!/usr/bin/env bash
# The CUDA backend on a GPU, in one run that reports every failure at once
# (no stop at the first) and writes runs/gpu-check/gpu-check.json; every
# step has a time limit (under 12 minutes in all at worst; about 5 expected on an
# H100, most of it the CPU's reference quickstart):
#
#   ops+models  every op family against the CPU (f32 within 1e-5; bf16 as
#               accurate as the CPU's bf16 plan), and three training steps
#               of every reference model (ViT, DeiT, distilled DeiT, ConViT,
#               MoCo, SimCLR, SwAV with queue, linear evaluation), AMP on
#               and off, against the CPU
#   parity      the libtorch parity fixtures through `tessera infer`
#   quickstart  the quickstart trained on the GPU reaching the CPU's accuracy
#   resume      a run killed mid-epoch and resumed, losses bitwise equal to
#               an uninterrupted run on the same device
#   nccl        the data-parallel collective step through NCCL at world size
#               1 (ViT-B/16's gradient all-reduced on the device on NCCL's
#               own stream, joined by events, checked; then a broadcast)
#   vit_b16     ViT-B/16, batch 256, bf16: img/s and device memory beside
#               the planned peak (within 5 %), beside PyTorch eager (timm,
#               bf16 autocast, fused AdamW, clipping) measured in the same run
#
# Prepare on a CPU machine first: ./scripts/gpu-prepare.sh (builds
# gpu-bundle/, which travels with the tree: the GPU machine has no Rust).
#   ./scripts/gpu-check.sh [--device gpu|cuda-host] [--quick] [--out DIR]
# `--device cuda-host --quick` runs the same checks on a CPU machine through
# the host emulation (a dry run of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=gpu
QUICK=0
OUT=runs/gpu-check
while [ $# -gt 0 ]; do
    case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "usage: $0 [--device gpu|cuda-host] [--quick] [--out DIR]" >&2; exit 2 ;;
    esac
done
B="$PWD/gpu-bundle"
T="$B/bin/tessera"
CUDA_TESTS="$B/bin/cuda"
for f in "$T" "$CUDA_TESTS"; do
    [ -x "$f" ] || { echo "gpu-check: $f is missing: run ./scripts/gpu-prepare.sh on a CPU machine and carry gpu-bundle" >&2; exit 2; }
done
rm -rf "$OUT"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
# A writable copy of the precompiled kernels (the bundle may be read-only).
mkdir -p "$OUT/kernels"
cp -r "$B/kernels/." "$OUT/kernels/" 2>/dev/null || true
export TESSERA_KERNEL_CACHE="$OUT/kernels"
# Libraries the GPU machine keeps outside the default search path (PyTorch's wheels).
for d in /usr/local/lib/python3*/dist-packages/nvidia/*/lib /usr/lib/python3*/site-packages/nvidia/*/lib; do
    [ -d "$d" ] && TESSERA_CUDA_LIB_DIRS="${TESSERA_CUDA_LIB_DIRS:+$TESSERA_CUDA_LIB_DIRS:}$d"
done
export TESSERA_CUDA_LIB_DIRS="${TESSERA_CUDA_LIB_DIRS:-}"
export TESSERA_POOL_POISON=1
if [ "$DEVICE" = gpu ]; then export TESSERA_CUDA_TEST_DEVICE=gpu; fi
START=$SECONDS

# record NAME STATUS SECONDS DETAIL_JSON
record() {
    python3 - "$RESULTS" "$1" "$2" "$3" "$4" <<'PY'
import json, sys
path, name, status, secs, detail = sys.argv[1:]
try:
    detail = json.loads(detail)
except Exception:
    detail = {"text": detail}
open(path, "a").write(json.dumps({"check": name, "status": status, "seconds": int(secs), "detail": detail}) + "\n")
PY
    echo "gpu-check: $1: $2 ($3 s)" >&2
}

json_str() { python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()[-3000:]))'; }

# --- device -------------------------------------------------------------
if [ "$DEVICE" = gpu ]; then
    GPU="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
else
    GPU="host emulation ($DEVICE)"
fi
record device ok 0 "$(printf '%s' "$GPU" | json_str)"

# --- ops and models against the CPU --------------------------------------
t=$SECONDS
timeout 180 "$CUDA_TESTS" --skip compile:: --test-threads 1 >"$OUT/ops_models.log" 2>&1
rc=$?
summary="$(grep -E '^test result|FAILED|panicked' "$OUT/ops_models.log" | head -40 | json_str)"
record ops_and_models "$([ $rc = 0 ] && echo ok || echo FAILED)" $((SECONDS - t)) "$summary"

# --- libtorch parity fixtures through tessera infer ----------------------
t=$SECONDS
timeout 60 python3 scripts/gpu/parity.py "$T" "$B/fixtures" "$DEVICE" "$OUT/parity.json" >"$OUT/parity.log" 2>&1
rc=$?
record parity "$([ $rc = 0 ] && echo ok || echo FAILED)" $((SECONDS - t)) "$(json_str <"$OUT/parity.log")"

# --- the quickstart on the device and on the CPU --------------------------
t=$SECONDS
EPOCHS=$([ $QUICK = 1 ] && echo 3 || echo 40)
# --quick (a dry run through the host emulation): a tenth of the data.
LIMIT=()
[ $QUICK = 1 ] && LIMIT=(DATA.TRAIN.DATA_LIMIT=640 DATA.TEST.DATA_LIMIT=200)
"$T" data synth --out "$OUT/data" >/dev/null 2>&1
qs() { # DEVICE DIR
    timeout 90 "$T" train config=quickstart/vit_tiny "DATA.TRAIN.DATA_PATHS=[$OUT/data/train]" \
        "DATA.TEST.DATA_PATHS=[$OUT/data/val]" "OPTIMIZER.num_epochs=$EPOCHS" "CHECKPOINT.DIR=$2" \
        "${LIMIT[@]}" --device "$1" -q >"$2.log" 2>&1
}
top1() { python3 -c 'import json,sys
recs = [json.loads(l) for l in open(sys.argv[1]) if "test_accuracy_list_meter" in l]
print(recs[-1]["test_accuracy_list_meter"]["top_1"]["0"] if recs else "nan")' "$1/metrics.json" 2>/dev/null || echo nan; }
qs "$DEVICE" "$OUT/qs-device"; rc_dev=$?
qs cpu "$OUT/qs-cpu"; rc_cpu=$?
acc_dev="$(top1 "$OUT/qs-device")"; acc_cpu="$(top1 "$OUT/qs-cpu")"
ok="$(python3 -c "import math,sys; d,c=float('$acc_dev'),float('$acc_cpu'); print('ok' if $rc_dev==0 and $rc_cpu==0 and not math.isnan(d) and d >= c - 2.0 else 'FAILED')")"
record quickstart "$ok" $((SECONDS - t)) "{\"epochs\": $EPOCHS, \"top1_device\": \"$acc_dev\", \"top1_cpu\": \"$acc_cpu\"}"

# --- a run killed mid-epoch and resumed, against an uninterrupted one ----
t=$SECONDS
SLOW=(MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=6 MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE=0.1
    OPTIMIZER.num_epochs=1 LOG_FREQUENCY=1 TEST_MODEL=false CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=3
    "DATA.TRAIN.DATA_PATHS=[$OUT/data/train]" "DATA.TEST.DATA_PATHS=[$OUT/data/val]" "${LIMIT[@]}")
run_slow() { timeout 60 "$T" train config=quickstart/vit_tiny "${SLOW[@]}" "CHECKPOINT.DIR=$1" --device "$DEVICE" -q; }
run_slow "$OUT/rs-full" >"$OUT/rs-full.log" 2>&1
run_slow "$OUT/rs-killed" >"$OUT/rs-killed.log" 2>&1 &
pid=$!
KILL_AT=$([ $QUICK = 1 ] && echo 4 || echo 20)
for _ in $(seq 1 600); do
    n=$( (wc -l <"$OUT/rs-killed/stdout.json") 2>/dev/null || echo 0)
    [ "$n" -ge "$KILL_AT" ] && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
done
kill -9 $pid 2>/dev/null
wait $pid 2>/dev/null
killed_at=$( (wc -l <"$OUT/rs-killed/stdout.json") 2>/dev/null || echo 0)
run_slow "$OUT/rs-killed" >>"$OUT/rs-killed.log" 2>&1
cmp="$(python3 - "$OUT/rs-full/stdout.json" "$OUT/rs-killed/stdout.json" "$OUT/rs-killed/log.txt" "$killed_at" <<'PY'
import json, sys
def losses(p):
    out = {}
    for l in open(p):
        r = json.loads(l)
        if "iteration" in r and "loss" in r:
            out[r["iteration"]] = repr(r["loss"])
    return out
a, b = losses(sys.argv[1]), losses(sys.argv[2])
diff = [i for i in a if a[i] != b.get(i)]
resumed = "resuming from" in open(sys.argv[3]).read()
print(json.dumps({"steps": len(a), "killed_after": int(sys.argv[4]), "resumed": resumed, "differ": len(diff), "first": diff[:3]}))
PY
)"
ok="$(python3 -c "import json,sys; d=json.loads(sys.argv[1]); print('ok' if d['resumed'] and int(sys.argv[2]) <= d['killed_after'] < d['steps'] and d['differ'] == 0 else 'FAILED')" "$cmp" "$KILL_AT" 2>/dev/null || echo FAILED)"
record resume "$ok" $((SECONDS - t)) "$cmp"

# --- NCCL: world size 1 ---------------------------------------------------
# The executor's collective step on device memory (ViT-B/16's gradient size):
# the NCCL communicator made from the run's collective, the all-reduce
# issued on the communication stream and joined back by events, the result
# checked; then a broadcast from rank 0, checked.
t=$SECONDS
if [ $QUICK = 1 ]; then AR=1000000; else AR=86567656; fi
timeout 30 "$T" bench config=quickstart/vit_tiny --device "$DEVICE" --all-reduce $AR --steps 5 --warmup 1 \
    --format json >"$OUT/nccl.json" 2>"$OUT/nccl.log"
rc_n=$?
nccl="$(tail -1 "$OUT/nccl.json" 2>/dev/null)"
if [ $rc_n = 0 ] && python3 -c "import json,sys; sys.exit(0 if json.loads(sys.argv[1]).get('verified') else 1)" "$nccl" 2>/dev/null; then
    record nccl ok $((SECONDS - t)) "$nccl"
else
    record nccl FAILED $((SECONDS - t)) "$(python3 -c "import json,sys; print(json.dumps({'exit': int(sys.argv[1]), 'log': open(sys.argv[2]).read()[-2000:]}))" $rc_n "$OUT/nccl.log")"
fi

# --- ViT-B/16: speed and memory beside PyTorch eager ---------------------
t=$SECONDS
if [ $QUICK = 1 ]; then
    BENCH=(config=quickstart/vit_tiny MODEL.AMP_PARAMS.USE_AMP=true --batch 64 --steps 3 --warmup 1)
else
    BENCH=(config=pretrain/vision_transformer/supervised/16gpu_deit_b_example
        MODEL.TRUNK.VISION_TRANSFORMERS.QKV_BIAS=true MODEL.TRUNK.VISION_TRANSFORMERS.DROP_PATH_RATE=0
        MODEL.AMP_PARAMS.USE_AMP=true --batch 256 --steps 10 --warmup 3)
fi
timeout 120 "$T" bench "${BENCH[@]}" --device "$DEVICE" --format json >"$OUT/bench.json" 2>"$OUT/bench.log"
rc_b=$?
torch_json='null'
if [ $QUICK = 0 ] && [ "$DEVICE" = gpu ]; then
    timeout 90 python3 scripts/gpu/torch_bench.py vit_base_patch16_224 256 20 >"$OUT/torch.json" 2>"$OUT/torch.log" &&
        torch_json="$(tail -1 "$OUT/torch.json")"
fi
bench="$(python3 - "$OUT/bench.json" "$torch_json" $rc_b <<'PY'
import json, sys
try:
    t = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except Exception as e:
    print(json.dumps({"ok": False, "error": f"tessera bench failed (exit {sys.argv[3]})"})); sys.exit()
p = json.loads(sys.argv[2])
d = {"tessera": t, "pytorch": p}
measured, planned = t.get("measured_device_bytes"), t.get("planned_peak_bytes")
d["memory_ratio"] = measured / planned if measured and planned else None
d["speed_ratio"] = t["images_per_sec"] / p["images_per_sec"] if p else None
d["ok"] = (d["memory_ratio"] is None or abs(d["memory_ratio"] - 1) <= 0.05) and (d["speed_ratio"] is None or d["speed_ratio"] >= 1.0)
print(json.dumps(d))
PY
)"
ok="$(python3 -c "import json,sys; print('ok' if json.loads(sys.argv[1]).get('ok') else 'FAILED')" "$bench")"
record vit_b16 "$ok" $((SECONDS - t)) "$bench"

# --- summary -------------------------------------------------------------
python3 - "$RESULTS" "$OUT/gpu-check.json" "$GPU" $((SECONDS - START)) <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
summary = {"device": sys.argv[3], "seconds": int(sys.argv[4]), "checks": rows,
           "passed": all(r["status"] == "ok" for r in rows)}
json.dump(summary, open(sys.argv[2], "w"), indent=1)
print(f"\ngpu-check on {sys.argv[3]} ({sys.argv[4]} s)")
for r in rows:
    d = r["detail"]
    note = ""
    if r["check"] == "quickstart":
        note = f"top-1 device {d.get('top1_device')} vs cpu {d.get('top1_cpu')} ({d.get('epochs')} epochs)"
    elif r["check"] == "nccl" and isinstance(d, dict) and "algbw_gbps" in d:
        note = f"all-reduce of {d['bytes']/1e6:.0f} MB in {d['time_ms']:.2f} ms, result checked {d['verified']}"
    elif r["check"] == "resume":
        note = f"killed after {d.get('killed_after')} of {d.get('steps')} steps, resumed {d.get('resumed')}, {d.get('differ')} losses differ"
    elif r["check"] == "vit_b16" and isinstance(d, dict) and "tessera" in d:
        t, p = d["tessera"], d.get("pytorch")
        note = f"{t['images_per_sec']:.0f} img/s" + (f" vs PyTorch {p['images_per_sec']:.0f} (x{d['speed_ratio']:.2f})" if p else "")
        if d.get("memory_ratio"):
            note += f"; device memory {t['measured_device_bytes']/2**30:.2f} GiB / planned {t['planned_peak_bytes']/2**30:.2f} GiB"
    print(f"  {r['check']:<15} {r['status']:<7} {r['seconds']:>4} s  {note}")
print(f"summary: {sys.argv[2]}")
sys.exit(0 if summary["passed"] else 1)
PY
