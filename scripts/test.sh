#!/usr/bin/env bash
# The test command of the README: installs what the tests need, builds, and
# runs every test.
#
# Besides a Rust toolchain (cargo) it needs python3 with pip, gcc/g++ and access
# to PyPI on the first run: scripts/setup-cuda-tools.sh installs NVRTC, the
# CUDA headers and ptxas of CUDA 13.0 (the CUDA backend's kernels are
# compiled and run on the CPU in its tests); scripts/setup-libtorch.sh installs libtorch 2.13.0
# (a ~530 MB download, ~550 MB under ${TESSERA_CACHE:-~/.cache/tessera}, once;
# later runs reuse it) as the numerical oracle of the parity tests, which are
# built with `--features torch-oracle`. If libtorch cannot be installed this
# script fails: the parity tests are never skipped. The tests that compare
# with Pillow and with TensorBoard's event reader install those themselves
# (scripts/setup-pillow.sh, scripts/setup-tensorboard.sh; small venvs).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
    echo "tessera needs a Rust toolchain (cargo); install it with rustup first" >&2
    exit 1
fi
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Snapshots must match exactly in CI (insta fails on a mismatch when CI=true).
export INSTA_UPDATE="${INSTA_UPDATE:-no}"
# Reused kernel buffers are filled with NaN first, so a kernel that leaves an
# element unwritten fails the numeric tests instead of passing on stale data.
export TESSERA_POOL_POISON=1

# libtorch first, so that a missing network fails in seconds, not after the
# build. (An assignment, not `eval "$(...)"`, so that set -e sees a failure.)
libtorch_env="$(./scripts/setup-libtorch.sh)" || {
    echo "test.sh: libtorch setup failed (see above); the torch-oracle parity tests cannot run" >&2
    exit 1
}

# The CUDA tools (NVRTC, the CUDA headers, ptxas; ~360 MB from PyPI, once):
# the CUDA backend's tests compile every kernel with them and run the CUDA
# executor on the host device. No GPU is needed.
cuda_env="$(./scripts/setup-cuda-tools.sh)" || {
    echo "test.sh: the CUDA tools could not be installed (see above); the CUDA backend's tests cannot run" >&2
    exit 1
}
eval "$cuda_env"

# One build for everything: the workspace with the `torch-oracle` feature,
# so the parity tests run with the rest and no crate is built twice (a
# second feature set would rebuild every crate that depends on the ones
# tch changes). Only the tests use libtorch; the binary does not link it.
eval "$libtorch_env"
features=(--features torch-oracle)
cargo build --locked --release --workspace "${features[@]}" --bins

# Every test file of the root package that needs the oracle (those
# mentioning the feature) must exist: the parity tests are never skipped.
oracle=0
for f in tests/*.rs tests/*/main.rs; do
    [ -f "$f" ] && grep -q 'torch-oracle' "$f" && oracle=$((oracle + 1))
done
if [ "$oracle" -eq 0 ]; then
    echo "test.sh: no test file uses the torch-oracle feature (expected tests/torch_oracle.rs)" >&2
    exit 1
fi

# Each step's output is kept to sum the results at the end; a failing step
# lets the others run (and report), the script fails at the end.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
step() {
    "$@" 2>&1 | tee -a "$log" || status=$?
}
echo "test.sh: every test of the workspace, the libtorch parity tests among them (LIBTORCH=$LIBTORCH)" >&2
step cargo test --locked --release --workspace "${features[@]}" --no-fail-fast
# The CUDA kernels' race check: the op families again on the host device
# with each block's threads as real threads (__syncthreads a barrier,
# shared memory shared), which a one-thread-per-block run cannot catch.
echo "test.sh: CUDA kernels with real threads per block (race check)" >&2
step env TESSERA_CUDA_TEST_DEVICE=host-threads cargo test --locked --release --workspace "${features[@]}" \
    --test cuda -- ops:: reduce:: attention:: batchnorm::

# One line for the whole run: the tests passed and failed, over every test
# binary of every step (cargo prints a `test result:` line per binary).
summary="$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i - 1); if ($(i) ~ /^failed;?$/) f += $(i - 1) } n++ }
    END { printf "%d passed, %d failed (%d test binaries)", p, f, n }' "$log")"
if [ "$status" -ne 0 ]; then
    echo "test.sh: FAILED: $summary (see above)" >&2
else
    echo "test.sh: $summary" >&2
fi
exit "$status"
