#!/usr/bin/env bash
# CPU training speed and memory of `Small` against the core as it landed (commit 69f5604), side by
# side in one run on this machine (issue 9's yardstick): builds that commit's bench_scaling in a
# git worktree beside this checkout (own target folder, built once), then runs both, alternating,
# at the same lengths. Extra arguments go to the current bench_scaling only (e.g. --recompute).
#
#     bash scripts/bench-vs-landed.sh                   # lengths 1024,4096,16384
#     LENGTHS=4096 bash scripts/bench-vs-landed.sh --recompute
#     ROUNDS=3 bash scripts/bench-vs-landed.sh          # medians over 3 alternating rounds
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
ROUNDS="${ROUNDS:-1}"
for round in $(seq "$ROUNDS"); do
    for len in ${LENGTHS//,/ }; do
        for which in landed current; do
            if [ "$which" = landed ]; then
                row="$("$OLD" --lengths "$len" --max-transformer-len 0 | grep -E "^\| $len ")"
            else
                row="$("$NEW" --lengths "$len" --max-transformer-len 0 "$@" | grep -E "^\| $len ")"
            fi
            echo "$which $row"
            echo "round $round: $which $row" >&2
        done
    done
done | awk -v base="$BASE" -v rounds="$ROUNDS" '
    # median of the space-separated numbers in s
    function median(s,    a, n, i, j, t) {
        n = split(s, a, " ")
        for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    { split($0, f, "|"); who = $1; len = f[2] + 0; t = f[4] + 0
      tps[who, len] = tps[who, len] " " t; mb[who, len] = mb[who, len] " " (f[5] + 0)
      if (who == "landed") last = t; else ratio[len] = ratio[len] " " t / last
      if (!(len in seen)) { seen[len] = 1; order[++nl] = len } }
    END {
      print "| length | " base " tokens/s | current tokens/s | speed-up | " base " peak MB | current peak MB |"
      print "|---:|---:|---:|---:|---:|---:|"
      for (i = 1; i <= nl; i++) { len = order[i]
        printf "| %d | %d | %d | %.2fx | %d | %d |\n", len, median(tps["landed", len]), median(tps["current", len]),
               median(ratio[len]), median(mb["landed", len]), median(mb["current", len]) }
      if (rounds > 1) print "\n(medians over " rounds " rounds; speed-up = median of the per-round ratios)"
    }'
