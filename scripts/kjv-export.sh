#!/usr/bin/env bash
# Exports the King James Bible to plain text, one file per book, for long-context evaluation
# (train on most books, evaluate on held-out ones). The output is NOT committed
# (data/.gitignore lists data/kjv/).
#
# Source: Debian's `sword-text-kjv` (CrossWire/eBible.org KJV, public domain outside the UK;
# see /usr/share/doc/sword-text-kjv/copyright), read with `mod2imp` from `libsword-utils`.
# The Debian module is named engKJV2006eb (abbreviation KJV); the script asks mod2imp for `KJV`
# first and falls back to the module whose abbreviation is KJV.
#
# Produces data/kjv/NN-book_name.txt for the 66 books in canonical order (01-genesis.txt ...
# 66-revelation_of_john.txt), so sorted file order is Bible order. Each file:
#     Genesis
#     <blank line>
#     Chapter 1
#     <blank line>
#     1:1 In the beginning God created the heaven and the earth.
#     1:2 And the earth was without form, ...
#     <blank line>
#     Chapter 2 ...
# Markup is stripped (mod2imp -s), paragraph marks (¶) and trailing spaces are removed.
# Size: 66 files, 4,324,082 bytes of UTF-8 text (31,102 verses; Debian bookworm's
# sword-text-kjv 14.3-1); the largest book, Psalms, is 240 kB, the smallest (II John)
# 1.6 kB. Takes about 10 seconds once the packages are installed.
#
# Needs root for apt-get (skipped when mod2imp and the module are already installed), python3.
# Usage: scripts/kjv-export.sh [OUT_DIR]   (default: data/kjv next to scripts/)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/data/kjv}"

if ! command -v mod2imp >/dev/null ||
    ! grep -qis '^Abbreviation=KJV[[:space:]]*$' /usr/share/sword/mods.d/*.conf; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: installing sword-text-kjv libsword-utils needs root (run with sudo)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends sword-text-kjv libsword-utils
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
IMP="$TMP/kjv.imp"

module=KJV
if ! mod2imp "$module" -s >"$IMP" 2>"$TMP/err" || [ ! -s "$IMP" ]; then
    # Find the module whose Abbreviation is KJV (Debian ships it as engKJV2006eb).
    conf="$(grep -lis '^Abbreviation=KJV[[:space:]]*$' /usr/share/sword/mods.d/*.conf | head -n1 || true)"
    [ -n "$conf" ] || { echo "error: no SWORD module with abbreviation KJV found" >&2; exit 1; }
    module="$(sed -n 's/^\[\(.*\)\][[:space:]]*$/\1/p' "$conf" | head -n1)"
    mod2imp "$module" -s >"$IMP"
fi
[ -s "$IMP" ] || { echo "error: mod2imp $module produced no output" >&2; exit 1; }

mkdir -p "$OUT"
rm -f "$OUT"/[0-9][0-9]-*.txt  # only files a previous export wrote
python3 - "$IMP" "$OUT" <<'PY'
import os, re, sys
imp, out = sys.argv[1], sys.argv[2]
books = []  # [(name, [(chapter, verse, text)])]
key_re = re.compile(r"^\$\$\$(.+?) (\d+):(\d+)\s*$")
cur = None
with open(imp, encoding="utf-8") as f:
    for line in f:
        if line.startswith("$$$"):
            m = key_re.match(line)
            cur = None
            if m:
                book, ch, vs = m.group(1), int(m.group(2)), int(m.group(3))
                if ch > 0 and vs > 0:  # 0:0 / N:0 entries are headings
                    if not books or books[-1][0] != book:
                        books.append((book, []))
                    cur = [ch, vs, []]
                    books[-1][1].append(cur)
        elif cur is not None:
            cur[2].append(line)
nverses = 0
for i, (book, verses) in enumerate(books, 1):
    lines = [book, ""]
    chapter = None
    for ch, vs, body in verses:
        text = " ".join(" ".join(body).split()).replace("¶", "").strip()
        text = re.sub(r"\s+", " ", text)
        if not text:
            continue
        if ch != chapter:
            if chapter is not None:
                lines.append("")
            lines += [f"Chapter {ch}", ""]
            chapter = ch
        lines.append(f"{ch}:{vs} {text}")
        nverses += 1
    name = re.sub(r"[^a-z0-9]+", "_", book.lower()).strip("_")
    with open(os.path.join(out, f"{i:02d}-{name}.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
if len(books) != 66:
    sys.exit(f"error: expected 66 books, found {len(books)}")
print(f"{len(books)} books, {nverses} verses", file=sys.stderr)
PY
echo "wrote $OUT ($(cat "$OUT"/*.txt | wc -c) bytes in $(ls "$OUT" | wc -l) files)" >&2
