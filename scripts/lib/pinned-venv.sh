# Sourced by the setup scripts of the Python oracles the tests use
# (setup-pillow.sh, setup-tensorboard.sh): a private venv holding exactly
# the pinned packages, installed once.
#
#     pinned_venv NAME CHECK PACKAGE==VERSION...
#
# makes ${TESSERA_CACHE:-$HOME/.cache/tessera}/NAME with the packages
# (pip --no-deps: the list is the whole set, so nothing unpinned comes in),
# runs the Python statement CHECK in it, and sets PY to its interpreter. A
# stamp holding the package list, written last, marks it done: a second call
# only reads the stamp and runs CHECK. Several test binaries may call it at
# once: one installs, the others wait on a lock. Progress goes to stderr.
# Needs python3 (>= 3.10; TESSERA_PYTHON overrides it) with the venv module,
# and PyPI on the first call.

pinned_venv() {
    local name="$1" check="$2"
    shift 2
    local key="$* layout=1"
    local cache="${TESSERA_CACHE:-${HOME:?HOME is not set}/.cache/tessera}"
    local venv="$cache/$name"
    local stamp="$venv/tessera-stamp"
    PY="$venv/bin/python"
    _venv_log() { echo "setup $name: $*" >&2; }
    _venv_die() {
        echo "setup $name: ERROR: $*" >&2
        exit 1
    }
    mkdir -p "$cache"
    if command -v flock >/dev/null; then
        exec 9>"$cache/$name.lock"
        flock 9
    fi
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && [ -x "$PY" ] && "$PY" -c "$check" 2>/dev/null; then
        return
    fi
    local host_py="${TESSERA_PYTHON:-python3}"
    command -v "$host_py" >/dev/null || _venv_die "no '$host_py' on PATH (set TESSERA_PYTHON)"
    # No stamp means not finished (or another set): start from scratch. The
    # stamp is written last, so an interrupted install is redone next time.
    rm -rf "$venv"
    _venv_log "creating $venv with $host_py"
    "$host_py" -m venv "$venv" >&2 || _venv_die "$host_py -m venv failed (install python3-venv?)"
    _venv_log "pip install $*"
    "$PY" -m pip install --disable-pip-version-check --quiet --no-deps "$@" >&2 ||
        _venv_die "pip install $* failed (is PyPI reachable?)"
    "$PY" -c "$check" || _venv_die "the check '$check' fails in $venv"
    echo "$key" >"$stamp"
    _venv_log "done: $PY"
}
