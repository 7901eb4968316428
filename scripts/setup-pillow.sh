#!/usr/bin/env bash
# Installs Pillow in a private venv as the oracle of tessera-data's tests and
# prints the shell line that points the tests at its interpreter:
#
#     eval "$(./scripts/setup-pillow.sh)"      # exports TESSERA_PILLOW_PYTHON
#     cargo test -p tessera-data
#
# (`cargo test -p tessera-data` runs this script itself when
# TESSERA_PILLOW_PYTHON is unset.) The venv lives in
# ${TESSERA_CACHE:-$HOME/.cache/tessera}/pillow-venv (scripts/lib/pinned-venv.sh);
# stdout carries only the export line.
set -euo pipefail
# shellcheck source=lib/pinned-venv.sh
source "$(dirname "$0")/lib/pinned-venv.sh"

PILLOW_VERSION=13.0.0
pinned_venv pillow-venv "import PIL, sys; sys.exit(PIL.__version__ != '$PILLOW_VERSION')" "pillow==$PILLOW_VERSION"
echo "export TESSERA_PILLOW_PYTHON='$PY'"
