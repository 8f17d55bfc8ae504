#!/usr/bin/env bash
# Set up and run the main job on the bundled defaults (offline): train a byte-level BPE tokenizer
# and a CPU-sized Megalodon language model on the bundled Shakespeare corpus (data/shakespeare/),
# with a progress bar and validation, into runs/text/, then print a generated sample.
# A second run continues (or just reloads) runs/text instead of overwriting it; extra flags go to
# `text train` (e.g. --steps 100, --out DIR, --force).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust >= 1.87 (https://rustup.rs) and re-run" >&2
  exit 1
fi
cargo run --release --example text -- train --out runs/text --resume "$@"
