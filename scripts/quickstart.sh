#!/usr/bin/env bash
# The README's main command: builds tessera and compiles the seed's first
# config (VISSL's supervised ViT-B/16 example), printing what it builds.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --release --bins --quiet
exec ./target/release/tessera compile config=pretrain/vision_transformer/supervised/1gpu_vit_example "$@"
