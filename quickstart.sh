#!/usr/bin/env bash
# Set up and run the main job on the bundled defaults (offline): parity with the official
# implementation on the golden vectors, then a ~1 minute training run of Tiny on the long-range
# copy task.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust >= 1.87 (https://rustup.rs) and re-run" >&2
  exit 1
fi
cargo run --release --example parity -- megalodon-core/tests/fixtures/megalodon-golden-tiny.json
cargo run --release --example parity -- megalodon-core/tests/fixtures/model_swiglu.json
# --resume: a second run continues (or just reloads) the first instead of refusing its directory
cargo run --release --example train_copy -- --out runs/copy --resume "$@"
