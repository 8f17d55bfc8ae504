#!/usr/bin/env bash
# Export Debian's `dataset-fashion-mnist` (60,000 train / 10,000 test images, 10 classes) to an
# ImageFolder tree of PNGs for megalodon-vision:
#
#   data/fashion-mnist/{train,val}/<id>-<class>/NNNNN.png
#
# Usage: scripts/fashion-mnist-export.sh [OUT_DIR]   (default: data/fashion-mnist in the repo root)
#        FASHION_MNIST_SRC=DIR overrides the folder of the four IDX .gz files.
#
# Installs the Debian package when its files are missing (needs root and apt-get). Needs python3
# (standard library only, see scripts/fashion-mnist-export.py). The tree is written to OUT_DIR.tmp
# and renamed when complete, so a finished OUT_DIR is never half-written; an existing complete
# export is kept. The output is not committed: a `.gitignore` holding `*` is written inside it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="${FASHION_MNIST_SRC:-/usr/share/datasets/fashion-mnist}"  # where the Debian package puts the IDX files
OUT="${1:-$ROOT/data/fashion-mnist}"

have_src() {
  for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
           t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
    [ -f "$SRC/$f" ] || return 1
  done
}

if ! have_src; then
  if [ -n "${FASHION_MNIST_SRC:-}" ]; then
    echo "error: FASHION_MNIST_SRC=$SRC lacks the four Fashion-MNIST IDX .gz files" >&2
    exit 1
  fi
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "error: $SRC is missing and cannot be installed here (needs root and apt-get):" >&2
    echo "       apt-get install dataset-fashion-mnist" >&2
    exit 1
  fi
  echo "installing dataset-fashion-mnist ..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  have_src || { echo "error: dataset-fashion-mnist installed but $SRC is incomplete" >&2; exit 1; }
fi

command -v python3 >/dev/null || { echo "error: python3 not found" >&2; exit 1; }

# Keep the export out of git wherever it lands: a `.gitignore` holding `*` inside the export
# itself (a `data/.gitignore` written by another export script need not cover it).
ignore_self() {
  [ -f "$1/.gitignore" ] || printf '# exported by scripts/fashion-mnist-export.sh, not committed\n*\n' > "$1/.gitignore"
}

if [ -f "$OUT/.complete" ]; then
  ignore_self "$OUT"
  echo "$OUT already exported ($(cat "$OUT/.complete")); remove it to export again"
  exit 0
fi

TMP="$OUT.tmp"
rm -rf "$TMP"
mkdir -p "$TMP"
start=$(date +%s)
python3 "$ROOT/scripts/fashion-mnist-export.py" "$SRC" "$TMP"
train=$(find "$TMP/train" -name '*.png' | wc -l)
val=$(find "$TMP/val" -name '*.png' | wc -l)
if [ "$train" -ne 60000 ] || [ "$val" -ne 10000 ]; then
  echo "error: exported $train train / $val val images, expected 60000 / 10000" >&2
  exit 1
fi
echo "train=$train val=$val" > "$TMP/.complete"
ignore_self "$TMP"
rm -rf "$OUT"
mv "$TMP" "$OUT"
echo "exported $train train + $val val PNGs to $OUT in $(( $(date +%s) - start ))s ($(du -sh "$OUT" | cut -f1))"
