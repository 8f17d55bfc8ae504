#!/usr/bin/env bash
# Mutation check of the numerics: plants one deliberate one-line bug at a time in a scratch copy
# of the repository, runs the test suite, and reports whether the suite caught it ("killed") or
# not ("SURVIVED"). Every mutation here must be killed.
#
#   scripts/mutants.sh            # all mutations (each rebuilds the core: ~2-4 min each on 2 cores)
#   scripts/mutants.sh 3 5        # only mutations 3 and 5
#
# Scratch copy: $MUTANTS_DIR (default /tmp/megalodon-mutants); build cache: $MUTANTS_TARGET.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${MUTANTS_DIR:-/tmp/megalodon-mutants}
export CARGO_TARGET_DIR=${MUTANTS_TARGET:-/tmp/megalodon-mutants-target}

# id | file | exact original text | replacement | what it breaks
MUTANTS=(
  "1|megalodon-core/src/nn/chunked_attention.rs|        Masking::Full(_) => BlockMask {
            causal_offset: None,
            valid_keys,|        Masking::Full(_) => BlockMask {
            causal_offset: None,
            valid_keys: None,|bidirectional attention ignores the padded-chunk key mask"
  "2|megalodon-core/src/nn/nffn.rs|        let o = match &self.alpha {|        let o = match &None::<Tensor<Rank1<M>, E, D>> {|rescale_nffn alpha ignored"
  "3|megalodon-core/src/nn/model.rs|                h.extend(&tokens[bi * t..(bi + 1) * t]);|                h.extend(&tokens[0..t]);|re-windowing uses row 0's history for every row"
  "4|megalodon-core/src/fit.rs|        state.tokens_seen = state.tokens_seen.saturating_add(M::batch_len(&batch));|        state.tokens_seen = M::batch_len(&batch);|fit overwrites tokens_seen"
  "5|megalodon-core/src/nn/timestep_norm.rs|        let rstd = (var_t + c::<E>(self.eps))|        let rstd = (var_t + c::<E>(self.eps * 10.0))|10x epsilon in TimestepNorm"
  "6|megalodon-core/src/nn/attention.rs|rms_normalize(zr.reshape_like(&(b, t, Const::<H>, dz)), self.eps)|rms_normalize(zr.reshape_like(&(b, t, Const::<H>, dz)), self.eps * 10.0)|10x epsilon in the Z RMS norm"
  "7|megalodon-core/src/nn/chunked_attention.rs|    let positions: Vec<usize> = (cl..cl + t).map(|p| p % chunk).collect();|    let positions: Vec<usize> = (cl..cl + t).collect();|RoPE positions do not restart per chunk"
  "8|megalodon-core/src/nn/nffn.rs|        x + o|        y_in + o|second residual from Y instead of the layer input"
  "9|megalodon-core/src/nn/encoder.rs|        self.final_norm.try_forward(x, pad.as_deref())|        self.final_norm.try_forward(x, None)|encoder's final norm counts padded steps"
)

want=("$@")
rm -rf "$WORK"
mkdir -p "$WORK"
git ls-files -z | (cd "$ROOT" && xargs -0 tar cf -) | (cd "$WORK" && tar xf -)
results=()
for m in "${MUTANTS[@]}"; do
  IFS='|' read -r id file old new what <<<"$m"
  if [ ${#want[@]} -gt 0 ] && [[ ! " ${want[*]} " =~ " $id " ]]; then continue; fi
  cp "$ROOT/$file" "$WORK/$file"
  # mutation 8 needs the FFN input under a name: bind it before the branch
  python3 - "$WORK/$file" "$old" "$new" "$id" <<'PY'
import sys
path, old, new, mid = sys.argv[1:5]
s = open(path).read()
if s.count(old) != 1:
    sys.exit(f"mutation {mid}: the original text occurs {s.count(old)} times in {path}")
s = s.replace(old, new)
if mid == "8":
    s = s.replace("        let yn = self.norm.forward(y);", "        let y_in = y.retaped::<T>();\n        let yn = self.norm.forward(y);", 1)
open(path, "w").write(s)
PY
  echo "== mutation $id: $what"
  if (cd "$WORK" && timeout 1800 cargo test -q -p megalodon-core -p megalodon --tests >"$WORK/mutant-$id.log" 2>&1); then
    results+=("SURVIVED  $id  $what")
  else
    if grep -q "^error\[" "$WORK/mutant-$id.log"; then
      results+=("NO-BUILD  $id  $what (see $WORK/mutant-$id.log)")
    else
      results+=("killed    $id  $what ($(grep -c 'FAILED\|panicked' "$WORK/mutant-$id.log") failure lines)")
    fi
  fi
  cp "$ROOT/$file" "$WORK/$file"
done
printf '%s\n' "${results[@]}"
! printf '%s\n' "${results[@]}" | grep -q "^SURVIVED\|^NO-BUILD"
