#!/usr/bin/env bash
# Long-context evidence for the text LM: train on the King James Bible without the four Gospels,
# then score the held-out Gospels at growing context (the same scored tokens at every length).
#
# Usage: scripts/text-kjv-sweep.sh [STEPS]   (default 600 steps of 4 x 2048 tokens: ~4.9 M tokens,
# about 5 passes over the 1.01 M training tokens; 38 min on 2 cores)
# Needs data/kjv/ from scripts/kjv-export.sh (run first if missing; it needs root for apt-get
# the first time). Writes runs/kjv-data/{train,heldout}/ (copies), runs/kjv/ (the run) and
# runs/kjv/eval_context.png. Environment: CONTEXTS (default 128,512,2048,8192,32768).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STEPS="${1:-600}"
CONTEXTS="${CONTEXTS:-16,64,128,512,2048,8192,32768}"
KJV="$ROOT/data/kjv"
[ -d "$KJV" ] || scripts/kjv-export.sh "$KJV"

DATA="$ROOT/runs/kjv-data"
rm -rf "$DATA"
mkdir -p "$DATA/train" "$DATA/heldout"
for f in "$KJV"/[0-9][0-9]-*.txt; do
    n="$(basename "$f")"
    n="${n%%-*}"
    # books 40-43: Matthew, Mark, Luke, John
    if [ "$((10#$n))" -ge 40 ] && [ "$((10#$n))" -le 43 ]; then
        cp "$f" "$DATA/heldout/"
    else
        cp "$f" "$DATA/train/"
    fi
done

# long windows (2048 tokens = 16 attention chunks), so the model learns to carry context across
# chunks through CEMA and the TimestepNorm statistics
cargo run --release --example text -- train --data "$DATA/train" --out runs/kjv --force \
    --steps "$STEPS" --seq-len 2048 --batch 4 --eval-every 100 --ckpt-every 100 \
    --sample-tokens 60 --prompt "And Jesus said"
# the same 8192 scored tokens (128 spans of 64) at every context; cumulative, then re-windowed
# TimestepNorm statistics (the official long-context evaluation)
cargo run --release --example text -- eval --run runs/kjv --data "$DATA/heldout" \
    --context "$CONTEXTS" --scored 64 --segments 128 --plot runs/kjv/eval_context.png
cargo run --release --example text -- eval --run runs/kjv --data "$DATA/heldout" \
    --context "$CONTEXTS" --scored 64 --segments 128 --rewindow \
    --plot runs/kjv/eval_context_rewindow.png
