#!/usr/bin/env bash
# Installs libtorch (CPU use only) for the `torch-oracle` parity tests and
# prints the shell lines that point the `tch` crate at it:
#
#     eval "$(./scripts/setup-libtorch.sh)"
#     cargo test --release --features torch-oracle --test torch_oracle
#
# (In a `set -e` script, assign first: `env="$(...)"; eval "$env"`, since a
# failure inside `eval "$(...)"` does not stop the script; see scripts/test.sh.)
#
# PyPI is the only source of libtorch we can reach, and its torch wheel is the
# CUDA build. libtorch_cpu.so from that wheel needs only two CUDA libraries
# (libcudart, libcupti); we install those two wheels with --no-deps instead of
# the several GB of CUDA packages torch declares, and lay out a LIBTORCH
# directory the way torch-sys 0.26 (build.rs) expects it:
#
#     $ROOT/site/               pip --target: torch, nvidia-cuda-runtime/-cupti
#     $ROOT/libtorch/include -> ../site/torch/include
#     $ROOT/libtorch/lib/       libtorch_cpu.so, libc10.so, libshm.so, libgomp*
#                               (symlinks) and an empty stub libtorch.so (the
#                               real one NEEDs libtorch_cuda.so, which we delete)
#     $ROOT/libtorch/build-version
#     $ROOT/stamp               written last; its presence means "done"
#
# ROOT is ${TESSERA_CACHE:-$HOME/.cache/tessera}/libtorch-<version>. The
# download is about 530 MB once; about 550 MB stay on disk. A second run only
# reads the stamp. Progress goes to stderr; stdout carries only the exports.
# Needs: python3 with pip (TESSERA_PYTHON overrides the interpreter), network
# access to PyPI, gcc, binutils (readelf, nm), Linux on x86_64 or aarch64.
set -euo pipefail

TORCH_VERSION=2.13.0      # the wheel we install
TCH_TORCH_VERSION=2.13.0  # what tch 0.26 / torch-sys 0.26 expect (build.rs)
CUDART_VERSION=13.0.96    # provides libcudart.so.13 (NEEDed by libtorch_cpu.so)
CUPTI_VERSION=13.0.85     # provides libcupti.so.13 (NEEDed by libtorch_cpu.so)
LAYOUT=1                  # bump when the layout below changes
KEY="torch=$TORCH_VERSION cudart=$CUDART_VERSION cupti=$CUPTI_VERSION layout=$LAYOUT"

CACHE="${TESSERA_CACHE:-${HOME:?HOME is not set}/.cache/tessera}"
ROOT="$CACHE/libtorch-$TORCH_VERSION"
STAMP="$ROOT/stamp"

log() { echo "setup-libtorch: $*" >&2; }
die() {
    echo "setup-libtorch: ERROR: $*" >&2
    exit 1
}

# The stamp holds: key, C++ ABI of the wheel, CUDA lib dirs relative to ROOT.
stamp_ok() {
    [ -f "$STAMP" ] || return 1
    local key abi nvlibs
    { IFS= read -r key && IFS= read -r abi && IFS= read -r nvlibs; } <"$STAMP" || return 1
    [ "$key" = "key=$KEY" ] || return 1
    ABI="${abi#abi=}"
    NVLIBS="${nvlibs#nvlibs=}"
    # Cheap sanity check that nobody removed the install under the stamp.
    [ -e "$ROOT/libtorch/lib/libtorch_cpu.so" ] && [ -e "$ROOT/libtorch/lib/libc10.so" ] &&
        [ -e "$ROOT/libtorch/include/torch/csrc/api/include/torch/torch.h" ]
}

emit() {
    local ldp="$ROOT/libtorch/lib" d
    for d in $NVLIBS; do ldp="$ldp:$ROOT/$d"; done
    printf 'export LIBTORCH=%q\n' "$ROOT/libtorch"
    printf 'export LIBTORCH_CXX11_ABI=%q\n' "$ABI"
    # Settings that would make torch-sys look elsewhere or link differently.
    printf 'unset LIBTORCH_USE_PYTORCH LIBTORCH_INCLUDE LIBTORCH_LIB LIBTORCH_STATIC\n'
    if [ "$TORCH_VERSION" = "$TCH_TORCH_VERSION" ]; then
        printf 'unset LIBTORCH_BYPASS_VERSION_CHECK\n'
    else
        printf 'export LIBTORCH_BYPASS_VERSION_CHECK=1\n'
    fi
    # torch-sys bakes no rpath into test binaries: they find libtorch_cpu.so,
    # libc10.so and (through libtorch_cpu.so) the CUDA runtime libraries here.
    printf 'export LD_LIBRARY_PATH=%q${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\n' "$ldp"
}

if stamp_ok; then
    emit
    exit 0
fi

# --- First run (or an incomplete / outdated one): install. ------------------

[ "$(uname -s)" = Linux ] || die "only Linux is supported (found $(uname -s))"
case "$(uname -m)" in
x86_64 | aarch64) ;;
*) die "no torch $TORCH_VERSION wheel for $(uname -m) on PyPI" ;;
esac
PY="${TESSERA_PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 ||
    die "$PY not found: installing libtorch needs Python 3.10+ with pip (Debian: apt-get install python3 python3-pip; or set TESSERA_PYTHON)"
pip_version="$("$PY" -m pip --version 2>/dev/null)" || pip_version=""
[[ $pip_version == "pip "* ]] ||
    die "pip is missing for $PY: install it (Debian: apt-get install python3-pip, or $PY -m ensurepip) or set TESSERA_PYTHON"
for tool in gcc readelf nm; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (Debian: apt-get install gcc binutils)"
done

mkdir -p "$CACHE"
# Serialize concurrent first runs (CI jobs, several shells).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$ROOT.lock"
    if ! flock -n 9; then
        log "another setup-libtorch.sh is installing into $ROOT; waiting for it"
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
SITE="$TMP/site"

log "installing torch==$TORCH_VERSION (about 530 MB), nvidia-cuda-runtime==$CUDART_VERSION, nvidia-cuda-cupti==$CUPTI_VERSION into $ROOT (once)"
if ! "$PY" -m pip install --no-deps --no-cache-dir --no-compile --only-binary=:all: \
    --disable-pip-version-check --no-warn-script-location --retries 2 --timeout 60 \
    --target "$SITE" \
    "torch==$TORCH_VERSION" "nvidia-cuda-runtime==$CUDART_VERSION" \
    "nvidia-cuda-cupti==$CUPTI_VERSION" >"$TMP/pip.log" 2>&1; then
    tail -n 15 "$TMP/pip.log" >&2
    die "pip could not install libtorch from PyPI (see pip's output above). Is the network up and PyPI reachable, and does PyPI have these versions for $("$PY" -c 'import sys; print("Python %d.%d" % sys.version_info[:2])') on $(uname -m)? The torch-oracle tests cannot run without it."
fi
TL="$SITE/torch/lib"
[ -f "$TL/libtorch_cpu.so" ] && [ -f "$TL/libc10.so" ] && [ -d "$SITE/torch/include/torch" ] ||
    die "the torch wheel does not have the expected torch/lib and torch/include layout"
grep -q "^__version__ = '$TORCH_VERSION[+']" "$SITE/torch/version.py" ||
    die "installed torch is not $TORCH_VERSION: $(grep '^__version__' "$SITE/torch/version.py")"

# Everything CUDA that libtorch_cpu.so does not load: about 560 MB.
log "deleting the CUDA parts of the wheel that the CPU library does not need"
rm -f "$TL"/libtorch_cuda*.so "$TL"/libc10_cuda.so "$TL"/libcaffe2_nvrtc.so \
    "$TL"/libtorch_nvshmem.so "$TL"/libtorch_python.so "$TL"/libtorch.so
rm -rf "$SITE/torch/bin" "$SITE/bin"
for d in "$SITE"/nvidia/*/lib; do
    [ -d "$d" ] || continue
    rm -f "$d"/libnvperf_*.so "$d"/libcheckpoint.so "$d"/libpcsamplingutil.so "$d"/*.a
done

# Where the CUDA runtime and CUPTI libraries landed (nvidia/cu13/lib today).
NVLIBS=""
for lib in libcudart.so libcupti.so; do
    f="$(find "$SITE/nvidia" -name "$lib.*" -type f -print -quit 2>/dev/null)"
    [ -n "$f" ] || die "no $lib.* in the nvidia-cuda-* wheels"
    d="$(dirname "${f#"$TMP"/}")"
    case " $NVLIBS " in *" $d "*) ;; *) NVLIBS="${NVLIBS:+$NVLIBS }$d" ;; esac
done

# Check with readelf that every library libtorch_cpu.so NEEDs is either in
# torch/lib, in the nvidia wheels, or a system library; this is what catches
# a torch bump that needs another CUDA wheel.
SYSLIBS="$( (ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true) | awk '{print $1}')"
for so in libtorch_cpu.so libc10.so libshm.so; do
    for need in $(readelf -d "$TL/$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        found=""
        for d in "$TL" $NVLIBS; do
            case "$d" in /*) ;; *) d="$TMP/$d" ;; esac
            [ -e "$d/$need" ] && found=1 && break
        done
        if [ -z "$found" ] && grep -qxF "$need" <<<"$SYSLIBS"; then found=1; fi
        [ -n "$found" ] ||
            die "$so NEEDs $need, which is in none of the installed wheels nor the system: pin the wheel that provides it"
    done
done

# torch-sys compiles its C++ wrapper with -D_GLIBCXX_USE_CXX11_ABI=$LIBTORCH_CXX11_ABI
# (default 1); it must match the ABI libc10.so was built with.
# (Not `nm | grep -q`: with pipefail, nm's SIGPIPE would read as "no match".)
if nm -D --defined-only "$TL/libc10.so" | grep 'St7__cxx11' >/dev/null; then ABI=1; else ABI=0; fi

LT="$TMP/libtorch"
mkdir -p "$LT/lib"
ln -s ../site/torch/include "$LT/include"
for so in libtorch_cpu.so libc10.so libshm.so; do
    ln -s "../../site/torch/lib/$so" "$LT/lib/$so"
done
for f in "$TL"/libgomp*; do
    [ -e "$f" ] || continue
    ln -s "../../site/torch/lib/$(basename "$f")" "$LT/lib/$(basename "$f")"
done
# torch-sys links -lgomp: resolve it to torch's OpenMP rather than needing the
# system's libgomp.so development symlink.
if [ -e "$LT/lib/libgomp.so.1" ] && [ ! -e "$LT/lib/libgomp.so" ]; then
    ln -s libgomp.so.1 "$LT/lib/libgomp.so"
fi
# torch-sys always links -ltorch; the wheel's libtorch.so only pulls in
# libtorch_cuda.so. An empty library satisfies the link (and --as-needed drops
# it from the binaries).
gcc -shared -fPIC -Wl,-soname,libtorch.so -o "$LT/lib/libtorch.so" -x c /dev/null ||
    die "gcc could not build the stub libtorch.so"
echo "$TORCH_VERSION" >"$LT/build-version"

# Load libtorch_cpu.so once, as the tests will, to fail here rather than in cargo.
LDP="$LT/lib"
for d in $NVLIBS; do LDP="$LDP:$TMP/$d"; done
LD_LIBRARY_PATH="$LDP${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$PY" -c \
    'import ctypes, sys; ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)' "$LT/lib/libtorch_cpu.so" ||
    die "libtorch_cpu.so does not load (see above)"

printf 'key=%s\nabi=%s\nnvlibs=%s\n' "$KEY" "$ABI" "$NVLIBS" >"$TMP/stamp.new"
rm -f "$TMP/pip.log"
mv "$TMP" "$ROOT"
mv "$ROOT/stamp.new" "$STAMP"
trap - EXIT
log "libtorch $TORCH_VERSION ready in $ROOT ($(du -sh "$ROOT" | cut -f1), $((SECONDS - START)) s)"
stamp_ok || die "internal error: the stamp just written does not validate"
emit
