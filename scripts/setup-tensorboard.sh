#!/usr/bin/env bash
# Installs TensorBoard's own event reader (the `tensorboard` package's
# EventAccumulator, the code its dashboards read runs with) in a private venv,
# as the independent reader of the event files tessera writes, and prints the
# shell line that points the tests at its interpreter:
#
#     eval "$(./scripts/setup-tensorboard.sh)"  # exports TESSERA_TENSORBOARD_PYTHON
#
# (The tests that read event files run this script themselves when the
# variable is unset.) Only the packages the reader imports are installed,
# about 110 MB, in ${TESSERA_CACHE:-$HOME/.cache/tessera}/tensorboard-venv
# (scripts/lib/pinned-venv.sh); stdout carries only the export line.
# To look at a run's curves, install the full server instead:
# `pip install tensorboard && tensorboard --logdir RUN_DIR/tensorboard`.
set -euo pipefail
# shellcheck source=lib/pinned-venv.sh
source "$(dirname "$0")/lib/pinned-venv.sh"

pinned_venv tensorboard-venv \
    "from tensorboard.backend.event_processing import event_accumulator" \
    tensorboard==2.21.0 protobuf==7.36.2 numpy==2.4.6 packaging==26.4 absl-py==2.5.1 six==1.17.0
echo "export TESSERA_TENSORBOARD_PYTHON='$PY'"
