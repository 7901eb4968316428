#!/usr/bin/env bash
# The README's main command: builds tessera, generates the quickstart image
# folder (10 classes of shapes and textures, 32x32 PNGs) if it is not there,
# and trains the tiny ViT of configs/quickstart/vit_tiny.yaml on it on the
# CPU, reporting validation top-1/top-5 after every epoch. Checkpoints and
# logs go to runs/quickstart/vit_tiny; a finished run is not repeated (pass
# CHECKPOINT.OVERWRITE_EXISTING=true to train again). Extra arguments are
# config overrides, e.g. OPTIMIZER.num_epochs=10.
set -euo pipefail
cd "$(dirname "$0")/.."
# Cargo's own progress (crates compiled, the bar) is shown: a first build
# compiles about 200 crates, several minutes on a laptop; later ones take
# seconds.
if [ ! -x ./target/release/tessera ]; then
    echo "quickstart: building tessera (a first build compiles ~200 crates: several minutes; later runs take seconds)" >&2
fi
cargo build --locked --release --bins
./target/release/tessera data synth --out runs/data/quickstart
exec ./target/release/tessera train config=quickstart/vit_tiny "$@"
