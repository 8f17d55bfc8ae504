#!/usr/bin/env python3
"""Mutation check of the numerics: plants one deliberate one-line bug at a time in a scratch copy
of the repository, runs the test suite, and reports whether the suite caught it ("killed") or not
("SURVIVED"). Every mutation here must be killed.

    scripts/mutants.py          # all mutations (each rebuilds the core: a few minutes each on 2 cores)
    scripts/mutants.py 3 5      # only mutations 3 and 5

Scratch copy: $MUTANTS_DIR (default /tmp/megalodon-mutants); build cache: $MUTANTS_TARGET.
"""
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.environ.get("MUTANTS_DIR", "/tmp/megalodon-mutants")
TARGET = os.environ.get("MUTANTS_TARGET", "/tmp/megalodon-mutants-target")

# The numerics suite: every core test, and the root tests of the backbone, encoder and training
# loop (the modality crates' own tests add nothing on the core's numerics).
SUITE = [
    ["cargo", "test", "-p", "megalodon-core", "--tests"],
    ["cargo", "test", "-p", "megalodon", "--test", "heads", "--test", "training",
     "--test", "gradients"],
]

# (id, file, exact original text, replacement, what it breaks[, extra (old, new) edit])
MUTANTS = [
    (1, "megalodon-core/src/nn/chunked_attention.rs",
     "        Masking::Full(_) => BlockMask {\n            causal_offset: None,\n            valid_keys,",
     "        Masking::Full(_) => BlockMask {\n            causal_offset: None,\n            valid_keys: None,",
     "bidirectional attention ignores the padded-chunk key mask"),
    (2, "megalodon-core/src/nn/nffn.rs",
     "        let o = match &self.alpha {",
     "        let o = match &None::<Tensor<Rank1<M>, E, D>> {",
     "rescale_nffn alpha ignored"),
    (3, "megalodon-core/src/nn/model.rs",
     "                h.extend(&tokens[bi * t..(bi + 1) * t]);",
     "                h.extend(&tokens[0..t]);",
     "re-windowing uses row 0's history for every row"),
    (4, "megalodon-core/src/fit.rs",
     "        state.tokens_seen = state.tokens_seen.saturating_add(M::batch_len(&batch));",
     "        state.tokens_seen = M::batch_len(&batch);",
     "fit overwrites tokens_seen instead of adding"),
    (5, "megalodon-core/src/nn/timestep_norm.rs",
     "        let rstd = (var_t + c::<E>(self.eps))",
     "        let rstd = (var_t + c::<E>(self.eps * 10.0))",
     "10x epsilon in TimestepNorm"),
    (6, "megalodon-core/src/nn/attention.rs",
     "rms_normalize(zr.reshape_like(&(b, t, Const::<H>, dz)), self.eps)",
     "rms_normalize(zr.reshape_like(&(b, t, Const::<H>, dz)), self.eps * 10.0)",
     "10x epsilon in the Z RMS norm"),
    (7, "megalodon-core/src/nn/chunked_attention.rs",
     "    let positions: Vec<usize> = (cl..cl + t).map(|p| p % chunk).collect();",
     "    let positions: Vec<usize> = (cl..cl + t).collect();",
     "RoPE positions do not restart in every chunk"),
    (8, "megalodon-core/src/nn/nffn.rs",
     "        x + o\n",
     "        y_in + o\n",
     "second residual from Y instead of the layer input (no two-hop)",
     ("        let yn = self.norm.forward(y);",
      "        let y_in = y.retaped::<T>();\n        let yn = self.norm.forward(y);")),
    (9, "megalodon-core/src/nn/encoder.rs",
     "        self.final_norm.try_forward(x, pad.as_deref())",
     "        self.final_norm.try_forward(x, None)",
     "the encoder's final norm counts padded steps"),
]


def main():
    want = {int(a) for a in sys.argv[1:]}
    if os.path.exists(WORK):
        shutil.rmtree(WORK)
    os.makedirs(WORK)
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = os.path.join(ROOT, f)
        if os.path.isfile(src):
            dst = os.path.join(WORK, f)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst)
    # no debug info: the mutated core is relinked into every test binary for each mutation
    env = dict(os.environ, CARGO_TARGET_DIR=TARGET, CARGO_PROFILE_TEST_DEBUG="0",
               CARGO_PROFILE_DEV_DEBUG="0")
    results = []
    for m in MUTANTS:
        mid, path, old, new, what = m[:5]
        if want and mid not in want:
            continue
        # the scratch copy's own text (the checkout may change while the script runs)
        orig = open(os.path.join(WORK, path)).read()
        if orig.count(old) != 1:
            results.append(f"STALE     {mid}  {what}: the original text occurs {orig.count(old)} times")
            continue
        text = orig.replace(old, new)
        if len(m) > 5:
            text = text.replace(m[5][0], m[5][1], 1)
        open(os.path.join(WORK, path), "w").write(text)
        print(f"== mutation {mid}: {what}", flush=True)
        t0 = time.time()
        log = os.path.join(WORK, f"mutant-{mid}.log")
        with open(log, "w") as out:
            rc = 0
            for cmd in SUITE:
                rc = subprocess.run(cmd, cwd=WORK, env=env, stdout=out,
                                    stderr=subprocess.STDOUT).returncode
                if rc != 0:
                    break
        body = open(log).read()
        what = f"{what} [{(time.time() - t0) / 60:.1f} min]"
        if rc == 0:
            results.append(f"SURVIVED  {mid}  {what}")
        elif "error[" in body or "could not compile" in body:
            results.append(f"NO-BUILD  {mid}  {what} (see {log})")
        else:
            failed = sorted({l.split()[1] for l in body.splitlines()
                             if l.startswith("test ") and l.endswith("FAILED")})
            results.append(f"killed    {mid}  {what}: {len(failed)} failing test(s), e.g. "
                           + ", ".join(failed[:3]))
        open(os.path.join(WORK, path), "w").write(orig)
    print("\n".join(results), flush=True)
    sys.exit(1 if any(r.startswith(("SURVIVED", "NO-BUILD", "STALE")) for r in results) else 0)


if __name__ == "__main__":
    main()
