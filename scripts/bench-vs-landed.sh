#!/usr/bin/env bash
# CPU training speed and memory of `Small` against the core as it landed (commit 69f5604), side by
# side in one run on this machine (issue 9's yardstick): builds that commit's bench_scaling in a
# git worktree beside this checkout (own target folder, built once), then runs both, alternating,
# at the same lengths. Extra arguments go to the current bench_scaling only (e.g. --recompute).
#
#     bash scripts/bench-vs-landed.sh                   # lengths 1024,4096,16384
#     LENGTHS=4096 bash scripts/bench-vs-landed.sh --recompute
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BASE="${BASE:-69f5604}"
LENGTHS="${LENGTHS:-1024,4096,16384}"
WT="$ROOT/.cache/landed-$BASE"
if [ ! -d "$WT" ]; then
    git worktree add --detach "$WT" "$BASE" >/dev/null
fi
echo "== building bench_scaling at $BASE (in $WT) and here"
(cd "$WT" && CARGO_TARGET_DIR="$WT/target" cargo build --release --quiet --example bench_scaling)
cargo build --release --quiet --example bench_scaling
OLD="$WT/target/release/examples/bench_scaling"
NEW="$ROOT/target/release/examples/bench_scaling"
for len in ${LENGTHS//,/ }; do
    for which in landed current; do
        if [ "$which" = landed ]; then
            row="$("$OLD" --lengths "$len" --max-transformer-len 0 | grep -E "^\| $len ")"
        else
            row="$("$NEW" --lengths "$len" --max-transformer-len 0 "$@" | grep -E "^\| $len ")"
        fi
        echo "$which $row"
    done
done | awk -v base="$BASE" '
    BEGIN { print "| length | " base " tokens/s | current tokens/s | speed-up | " base " peak MB | current peak MB |";
            print "|---:|---:|---:|---:|---:|---:|" }
    { split($0, f, "|"); who = $1; len = f[2] + 0; tps[who, len] = f[4] + 0; mb[who, len] = f[5] + 0; lens[len] = 1 }
    who == "current" { printf "| %d | %d | %d | %.2fx | %d | %d |\n", len, tps["landed", len], tps["current", len],
                       tps["current", len] / tps["landed", len], mb["landed", len], mb["current", len] }'
