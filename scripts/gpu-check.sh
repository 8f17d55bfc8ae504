#!/usr/bin/env bash
# The one command to run on a GPU machine (no Rust toolchain needed), from the repository root,
# with the folder scripts/cuda-build.sh assembled (gpu-bundle/) carried along:
#
#     bash scripts/gpu-check.sh            # writes $OUT (or gpu-check-out/): gpu-check.log, results.md
#
# 1. logs the GPU, driver, CUDA library and NVRTC versions;
# 2. puts that machine's CUDA 13 libraries (the nvidia/cu13 wheels of its Python, e.g. PyTorch's)
#    on LD_LIBRARY_PATH and recreates the absolute paths the binaries had baked in at build time;
# 3. runs the CUDA tests: golden parity (full and streamed) and a training step of Tiny, gradients
#    of the LM against the CPU, and 8 training steps of each head (text, vision, audio) whose
#    losses and weights must match the CPU's (tolerances in tests/cuda_heads.rs);
# 4. runs the GPU benchmark: fwd+bwd of Small and Mega200M at 4K/32K/128K tokens and the
#    full-attention Transformer where it fits (examples/bench_scaling.rs --device cuda);
# 5. a short `text train --device cuda` on the bundled corpus;
# 6. the streaming engine's CUDA backend: NVRTC compiles kernels/*.cu, the engine tests (CUDA
#    against the dfdx model and the golden logits, the same bodies as the CPU's), and
#    `bench_stream --device cuda` over STREAM_TOKENS tokens (default 50000; the 1M-token figure
#    needs STREAM_TOKENS=1000000, a larger BUDGET and a device call of its own), then 20000
#    tokens with bf16 products (`--bf16`).
# Every step has its own time limit, and a step that could pass the whole script's budget
# (BUDGET, 470 s) is reported NOT RUN instead of started: the script stays under 8 minutes.
# The streaming-engine steps (6) run right after the core tests.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUNDLE="${BUNDLE:-$ROOT/gpu-bundle}"
OUTDIR="${OUT:-$ROOT/gpu-check-out}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu-check.log"
RES="$OUTDIR/results.md"
: >"$LOG"
START=$(date +%s)

log() { echo "$*" | tee -a "$LOG"; }
# run NAME SECONDS CMD...: runs with a time limit, logs everything, records pass/fail
declare -a SUMMARY=()
BUDGET="${BUDGET:-470}" # seconds for the whole script: a step that might overrun it is not started
run() {
    local name="$1" limit="$2"
    shift 2
    if [ $(($(date +%s) - START + limit)) -gt "$BUDGET" ]; then
        log "== $name: NOT RUN (its ${limit}s limit would pass the ${BUDGET}s budget)"
        SUMMARY+=("| $name | NOT RUN (time budget) | 0 s |")
        return 0
    fi
    log ""
    log "== $name (limit ${limit}s): $*"
    local t0=$(date +%s)
    local tmp
    tmp="$(mktemp)"
    timeout --signal=KILL "$limit" "$@" >"$tmp" 2>&1
    local rc=$?
    cat "$tmp" >>"$LOG"
    local dt=$(($(date +%s) - t0))
    local what="ok"
    # the CUDA tests skip themselves (and pass) when the driver finds no device
    grep -qE 'skipping: |SKIPPED: ' "$tmp" && what="SKIPPED (no usable GPU: see the log)"
    [ $rc -eq 0 ] || what="FAILED (exit $rc$([ $rc -eq 137 ] && echo ', time limit'))"
    rm -f "$tmp"
    log "== $name: $what in ${dt}s"
    SUMMARY+=("| $name | $what | ${dt} s |")
    return 0
}

[ -d "$BUNDLE/bin" ] || { log "error: $BUNDLE/bin missing: run scripts/cuda-build.sh on the build machine and carry gpu-bundle"; exit 1; }

log "== machine"
log "date: $(date -u +%FT%TZ)"
cat "$BUNDLE/manifest.txt" >>"$LOG" 2>&1
nvidia-smi >>"$LOG" 2>&1 || log "nvidia-smi failed"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv >>"$LOG" 2>&1
PY="$(command -v python3 || true)"
CU13=""
if [ -n "$PY" ]; then
    "$PY" -m pip list 2>/dev/null | grep -Ei '^(torch|nvidia-(cuda-nvrtc|cublas|cuda-runtime))' >>"$LOG"
    CU13="$("$PY" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)"
fi
if [ -z "$CU13" ] || [ ! -e "$CU13/libnvrtc.so.13" ]; then
    hit="$(timeout 60 find /usr /opt /root /home -name 'libnvrtc.so.13' 2>/dev/null | head -n1 || true)"
    [ -n "$hit" ] && CU13="$(dirname "$hit")"
fi
log "CUDA 13 libraries: ${CU13:-not found}"
export LD_LIBRARY_PATH="${CU13}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ls "$CU13" >>"$LOG" 2>&1

# Absolute paths baked in at build time (dfdx's run-time NVRTC kernels include these).
# shellcheck disable=SC1091
. "$BUNDLE/paths.env"
for pair in "$BAKED_CUDA_INCLUDE=$BUNDLE/include" "$BAKED_DFDX_OUT=$BUNDLE/dfdx-out"; do
    dst="${pair%%=*}"
    src="${pair#*=}"
    mkdir -p "$(dirname "$dst")"
    [ -e "$dst" ] || ln -sfn "$src" "$dst"
    log "baked path $dst -> $(readlink -f "$dst")"
done
export MEGALODON_FIXTURES="$BUNDLE/fixtures"

# the bundle's binaries are gzipped (scripts/cuda-build.sh); unpack them outside $OUT
B="${TMPDIR:-/tmp}/megalodon-gpu-bin"
rm -rf "$B" && mkdir -p "$B"
for z in "$BUNDLE"/bin/*.gz; do
    gunzip -c "$z" >"$B/$(basename "$z" .gz)" && chmod +x "$B/$(basename "$z" .gz)"
done
for b in "$B"/*; do
    if ldd "$b" | grep -q 'not found'; then
        log "missing libraries for $(basename "$b"):"
        ldd "$b" | grep 'not found' | tee -a "$LOG"
    fi
done
run "core CUDA test (golden parity, streaming, training)" 90 "$B/test-cuda" --nocapture --test-threads=1
run "heads on CUDA vs CPU (gradients; text, vision, audio training)" 120 "$B/test-cuda_heads" --nocapture --test-threads=1
MEGALODON_REQUIRE_NVRTC=1 run "kernels/*.cu compile with NVRTC" 30 "$B/test-kernels" --nocapture
MEGALODON_REQUIRE_CUDA=1 run "streaming engine on CUDA vs dfdx and golden" 60 "$B/test-engine" --nocapture --test-threads=1 --skip cuda_backend_runs_on_the_cpu_emulator
run "bench_stream --device cuda (${STREAM_TOKENS:-50000} tokens)" 90 "$B/bench_stream" \
    --device cuda --tokens "${STREAM_TOKENS:-50000}" --dfdx-tokens 1000
run "bench_stream --device cuda --bf16 (20000 tokens)" 45 "$B/bench_stream" \
    --device cuda --bf16 --tokens 20000 --dfdx-tokens 0
run "bench Small 4K/32K/128K" 90 "$B/bench_scaling" --device cuda --preset small \
    --lengths 4096,32768,131072 --chunk 2048 --max-transformer-len 32768
run "bench Mega200M 4K/32K/128K" 100 "$B/bench_scaling" --device cuda --preset mega200m \
    --lengths 4096,32768,131072 --chunk 2048 --max-transformer-len 0
run "text train --device cuda (60 steps)" 60 "$B/text" train --device cuda --steps 60 \
    --eval-every 30 --out "$OUTDIR/text-cuda" --force --sample-tokens 40

{
    echo "# GPU check $(date -u +%FT%TZ)"
    echo
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
    echo
    echo "| step | result | time |"
    echo "|---|---|---:|"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    echo "Benchmark tables (from the log):"
    grep -E '^\|' "$LOG" | grep -v '^| step'
    echo
    echo "total $(($(date +%s) - START)) s"
} >"$RES"
cat "$RES"
