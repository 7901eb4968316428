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
# script fails: the parity tests are never skipped.
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

# The default build and tests: no libtorch involved. A failure here still lets
# the parity tests below run (and report); the script fails at the end.
cargo build --locked --release --bins
status=0
cargo test --locked --release --workspace || status=$?
# The CUDA kernels' race check: the op families again on the host device
# with each block's threads as real threads (__syncthreads a barrier,
# shared memory shared), which a one-thread-per-block run cannot catch.
echo "test.sh: CUDA kernels with real threads per block (race check)" >&2
TESSERA_CUDA_TEST_DEVICE=host-threads cargo test --locked --release --workspace --test cuda -- \
    ops:: reduce:: attention:: batchnorm:: || status=$?

# Every test file of the root package that needs the oracle: those mentioning
# the `torch-oracle` feature (tests/NAME.rs or tests/NAME/main.rs).
oracle_tests=()
for f in tests/*.rs tests/*/main.rs; do
    [ -f "$f" ] && grep -q 'torch-oracle' "$f" || continue
    case "$f" in
    */main.rs) name="$(basename "$(dirname "$f")")" ;;
    *) name="$(basename "$f" .rs)" ;;
    esac
    oracle_tests+=(--test "$name")
done
if [ ${#oracle_tests[@]} -eq 0 ]; then
    echo "test.sh: no test file uses the torch-oracle feature (expected tests/torch_oracle.rs)" >&2
    exit 1
fi
eval "$libtorch_env"
echo "test.sh: libtorch parity tests (LIBTORCH=$LIBTORCH): ${oracle_tests[*]}" >&2
cargo test --locked --release --features torch-oracle "${oracle_tests[@]}" || status=$?
if [ "$status" -ne 0 ]; then
    echo "test.sh: FAILED (see above)" >&2
fi
exit "$status"
