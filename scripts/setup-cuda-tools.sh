#!/usr/bin/env bash
# Installs the CUDA tools the CUDA backend's checks need on a machine
# without a GPU, and prints the shell lines that point tessera at them:
#
#     eval "$(./scripts/setup-cuda-tools.sh)"
#
# From PyPI (the only source we can reach), pinned to CUDA 13.0 to match the
# GPU machine's driver (a newer NVRTC's output does not load on it):
#   nvidia-cuda-nvrtc    libnvrtc.so.13 and its builtins: compiles kernels to
#                        PTX/CUBIN without a GPU
#   nvidia-cuda-runtime  headers (cuda_bf16.h, ...) for NVRTC and for the host
#   nvidia-cuda-crt      device, which compiles the same kernels with g++
#   nvidia-cuda-cccl
#   nvidia-cuda-nvcc     ptxas: register and spill counts for sm_90
# into ${TESSERA_CACHE:-~/.cache/tessera}/cuda-tools-13.0/site (about 360 MB,
# once; a second run only reads the stamp). Progress goes to stderr; stdout
# carries only the exports. The runtime finds this folder by itself too
# (runtime/src/cuda/libs.rs); the exports make it explicit.
set -euo pipefail

NVRTC=13.0.88
RUNTIME=13.0.96
CRT=13.0.88
CCCL=13.0.85
NVCC=13.0.88
LAYOUT=1
KEY="nvrtc=$NVRTC runtime=$RUNTIME crt=$CRT cccl=$CCCL nvcc=$NVCC layout=$LAYOUT"

CACHE="${TESSERA_CACHE:-${HOME:?HOME is not set}/.cache/tessera}"
ROOT="$CACHE/cuda-tools-13.0"
STAMP="$ROOT/stamp"
CU="$ROOT/site/nvidia/cu13"

log() { echo "setup-cuda-tools: $*" >&2; }
die() {
    echo "setup-cuda-tools: ERROR: $*" >&2
    exit 1
}

stamp_ok() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "key=$KEY" ] &&
        [ -f "$CU/lib/libnvrtc.so.13" ] && [ -f "$CU/lib/libnvrtc-builtins.so.13.0" ] &&
        [ -f "$CU/include/cuda_bf16.h" ] && [ -x "$CU/bin/ptxas" ]
}

emit() {
    printf 'export TESSERA_CUDA_INCLUDE=%q\n' "$CU/include"
    printf 'export TESSERA_CUDA_LIB_DIRS=%q\n' "$CU/lib"
    printf 'export TESSERA_PTXAS=%q\n' "$CU/bin/ptxas"
}

if stamp_ok; then
    emit
    exit 0
fi

PY="${TESSERA_PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || die "$PY not found: installing the CUDA tools needs Python 3 with pip (or set TESSERA_PYTHON)"
"$PY" -m pip --version >/dev/null 2>&1 || die "pip is missing for $PY (Debian: apt-get install python3-pip)"
[ "$(uname -m)" = x86_64 ] || die "the pinned CUDA 13.0 wheels are for x86_64 (found $(uname -m))"

mkdir -p "$CACHE"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$ROOT.lock"
    if ! flock -n 9; then
        log "another setup-cuda-tools.sh is installing into $ROOT; waiting for it"
        flock 9
    fi
    if stamp_ok; then
        emit
        exit 0
    fi
fi

START=$SECONDS
TMP="$ROOT.tmp.$$"
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT
rm -rf "$ROOT" "$ROOT".tmp.*
mkdir -p "$TMP"
log "installing NVRTC, headers and ptxas of CUDA 13.0 from PyPI into $ROOT (once, about 360 MB)"
if ! "$PY" -m pip install --no-deps --no-cache-dir --no-compile --only-binary=:all: \
    --disable-pip-version-check --no-warn-script-location --retries 2 --timeout 60 \
    --target "$TMP/site" \
    "nvidia-cuda-nvrtc==$NVRTC" "nvidia-cuda-runtime==$RUNTIME" "nvidia-cuda-crt==$CRT" \
    "nvidia-cuda-cccl==$CCCL" "nvidia-cuda-nvcc==$NVCC" >"$TMP/pip.log" 2>&1; then
    tail -n 15 "$TMP/pip.log" >&2
    die "pip could not install the CUDA 13.0 wheels from PyPI (see above); the CUDA kernel checks cannot run without them"
fi
mv "$TMP/site" "$ROOT.site.$$"
mkdir -p "$ROOT"
mv "$ROOT.site.$$" "$ROOT/site"
[ -f "$CU/include/cuda_bf16.h" ] && [ -f "$CU/lib/libnvrtc.so.13" ] && [ -x "$CU/bin/ptxas" ] ||
    die "the wheels do not have the expected nvidia/cu13/{include,lib,bin} layout"
echo "key=$KEY" >"$STAMP"
log "CUDA 13.0 tools ready in $ROOT ($(du -sh "$ROOT" | cut -f1), $((SECONDS - START)) s)"
emit
