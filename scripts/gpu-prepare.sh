#!/usr/bin/env bash
# Prepares, on a CPU machine, everything scripts/gpu-check.sh runs on a GPU
# machine (which has no Rust toolchain and no network): into gpu-bundle/
# (ignored by git; carried to the GPU machine, 64 MiB at most):
#   bin/tessera, bin/cuda   the release CLI and the CUDA backend's test binary, stripped
#   fixtures/               libtorch parity fixtures (tests/torch_parity_models.rs)
#   kernels/                every shipped config's kernels as sm_90 CUBINs
#                           (NVRTC 13.0, the GPU machine's driver version)
# Then, on the GPU machine: ./scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
B=gpu-bundle
rm -rf "$B"
mkdir -p "$B/bin" "$B/fixtures" "$B/kernels"
cuda_env="$(./scripts/setup-cuda-tools.sh)"
eval "$cuda_env"
libtorch_env="$(./scripts/setup-libtorch.sh)"

echo "gpu-prepare: building the release CLI and the CUDA test binary" >&2
cargo build --locked --release --bin tessera
test_bin="$(cargo test --locked --release -p tessera-runtime --test cuda --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')"
[ -x "$test_bin" ] || { echo "gpu-prepare: could not find the cuda test binary" >&2; exit 1; }
strip -o "$B/bin/tessera" target/release/tessera
strip -o "$B/bin/cuda" "$test_bin"

echo "gpu-prepare: compiling every shipped config's kernels for sm_90" >&2
TESSERA_KERNEL_CACHE="$PWD/$B/kernels" TESSERA_PRECOMPILE_SM=90 \
    cargo test --locked --release -p tessera-runtime --test cuda compile:: -- --nocapture 2>&1 | grep -E "CUBINs|distinct|test result" >&2
# Host-device libraries are not needed there.
rm -f "$B"/kernels/*.so

echo "gpu-prepare: libtorch parity fixtures" >&2
(
    eval "$libtorch_env"
    TESSERA_FIXTURES_OUT="$PWD/$B/fixtures" cargo test --locked --release --features torch-oracle \
        --test torch_parity_models 2>&1 | grep -E "test result" >&2
)
du -sh "$B" "$B"/* >&2
echo "gpu-prepare: done; carry gpu-bundle and run ./scripts/gpu-check.sh on the GPU machine" >&2
