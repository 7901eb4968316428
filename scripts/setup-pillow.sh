#!/usr/bin/env bash
# Installs Pillow in a private venv as the oracle of tessera-data's tests and
# prints the shell line that points the tests at its interpreter:
#
#     eval "$(./scripts/setup-pillow.sh)"      # exports TESSERA_PILLOW_PYTHON
#     cargo test -p tessera-data
#
# (`cargo test -p tessera-data` runs this script itself when
# TESSERA_PILLOW_PYTHON is unset.) The venv lives in
# ${TESSERA_CACHE:-$HOME/.cache/tessera}/pillow-venv; a stamp written last
# marks it done, so a second run only reads the stamp and checks the import.
# Progress goes to stderr; stdout carries only the export line.
# Needs: python3 (>= 3.10, TESSERA_PYTHON overrides it) with the venv module,
# and network access to PyPI on the first run.
set -euo pipefail

PILLOW_VERSION=13.0.0
KEY="pillow=$PILLOW_VERSION layout=1"

CACHE="${TESSERA_CACHE:-${HOME:?HOME is not set}/.cache/tessera}"
VENV="$CACHE/pillow-venv"
STAMP="$VENV/tessera-stamp"
PY="$VENV/bin/python"

log() { echo "setup-pillow: $*" >&2; }
die() {
    echo "setup-pillow: ERROR: $*" >&2
    exit 1
}

stamp_ok() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && [ -x "$PY" ] &&
        "$PY" -c "import PIL, sys; sys.exit(PIL.__version__ != '$PILLOW_VERSION')" 2>/dev/null
}

# Several test binaries may call this at once: one installs, the others wait.
mkdir -p "$CACHE"
if command -v flock >/dev/null; then
    exec 9>"$CACHE/pillow-venv.lock"
    flock 9
fi

if ! stamp_ok; then
    HOST_PY="${TESSERA_PYTHON:-python3}"
    command -v "$HOST_PY" >/dev/null || die "no '$HOST_PY' on PATH (set TESSERA_PYTHON)"
    # No stamp means not finished (or another version): start from scratch. The
    # stamp is written last, so an interrupted run is redone on the next call.
    rm -rf "$VENV"
    log "creating $VENV with $HOST_PY"
    "$HOST_PY" -m venv "$VENV" >&2 || die "$HOST_PY -m venv failed (install python3-venv?)"
    log "pip install pillow==$PILLOW_VERSION"
    "$PY" -m pip install --disable-pip-version-check --quiet "pillow==$PILLOW_VERSION" >&2 ||
        die "pip install pillow==$PILLOW_VERSION failed (is PyPI reachable?)"
    "$PY" -c "import PIL, sys; sys.exit(PIL.__version__ != '$PILLOW_VERSION')" ||
        die "Pillow $PILLOW_VERSION does not import from $VENV"
    echo "$KEY" >"$STAMP"
    log "done: $PY"
fi

echo "export TESSERA_PILLOW_PYTHON='$PY'"
