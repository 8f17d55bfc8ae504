#!/usr/bin/env bash
# Builds the dfdx CUDA path on a machine WITHOUT a GPU and assembles one folder to carry to a GPU
# machine (which has the CUDA driver and libraries but no Rust toolchain): see docs/cuda.md.
#
# Idempotent; offline apart from PyPI and crates.io; no apt, no root.
#   1. CUDA 13.0 toolchain from pinned PyPI wheels, unpacked under .cache/cuda/ (git-ignored) and
#      made toolkit-shaped (targets/x86_64-linux, nvvm/bin, unversioned .so links).
#   2. A link-only libcuda.so stub (soname libcuda.so.1, one empty function per driver entry point
#      cudarc binds). It is only linked against here and never shipped: the GPU machine has the
#      real driver.
#   3. An `nvidia-smi` shim for dfdx's build script (which asks the GPU's compute capability).
#   4. `cargo build --features cuda` (without ci-check) of the CUDA test binaries and the CUDA
#      benchmark/CLI binaries, in a target folder at a FIXED path (default /tmp/megalodon-cuda), so
#      that the absolute paths dfdx bakes into the binaries (its run-time NVRTC kernels include
#      `cuda_utils.cuh` from its OUT_DIR and the CUDA `include/` folder) can be recreated on the
#      GPU machine by scripts/gpu-check.sh.
#   5. Strips the binaries and assembles gpu-bundle/ (git-ignored, carried with `carry`):
#      bin/ (tests and examples), include/ (CUDA headers), dfdx-out/ (dfdx's .cuh files),
#      fixtures/, paths.env (the baked paths), manifest.txt (sizes, NEEDED libraries).
#
# Usage: scripts/cuda-build.sh            (then carry gpu-bundle and run scripts/gpu-check.sh there)
# Environment: MEGALODON_CUDA_PREFIX (default /tmp/megalodon-cuda), CUDA_COMPUTE_CAP (default 90,
# the H200), CUDA_CACHE (default .cache/cuda), BUNDLE (default gpu-bundle).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="${CUDA_CACHE:-$ROOT/.cache/cuda}"
PREFIX="${MEGALODON_CUDA_PREFIX:-/tmp/megalodon-cuda}"
BUNDLE="${BUNDLE:-$ROOT/gpu-bundle}"
CAP="${CUDA_COMPUTE_CAP:-90}"
# Pinned so that the PTX nvcc emits (ISA 9.0) is loadable by driver 580 (CUDA 13.0).
WHEELS=(
    nvidia-cuda-nvcc==13.0.48
    nvidia-cuda-crt==13.0.48
    nvidia-nvvm==13.0.48
    nvidia-cuda-runtime==13.0.48
    nvidia-cuda-nvrtc==13.0.48
    nvidia-cublas==13.0.0.19
    nvidia-cuda-cccl==13.0.50 # nv/target, which cuda_fp16.h includes
)

say() { echo "== $*" >&2; }

# --- 1. toolchain ---------------------------------------------------------------------------
mkdir -p "$CACHE/wheels" "$CACHE/py"
stamp="$CACHE/py/.unpacked-$(printf '%s ' "${WHEELS[@]}" | md5sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    say "downloading ${#WHEELS[@]} CUDA 13.0 wheels (~590 MB) into $CACHE/wheels"
    python3 -m pip download --no-deps --quiet -d "$CACHE/wheels" "${WHEELS[@]}"
    rm -rf "$CACHE/py" && mkdir -p "$CACHE/py"
    for spec in "${WHEELS[@]}"; do
        name="${spec%%==*}"
        ver="${spec##*==}"
        whl="$(ls "$CACHE/wheels/${name//-/_}-${ver}-"*.whl | head -n1)"
        python3 -m zipfile -e "$whl" "$CACHE/py/"
    done
    touch "$stamp"
fi
T="$CACHE/py/nvidia/cu13"
[ -f "$T/bin/nvcc" ] || { echo "error: $T/bin/nvcc missing after unpacking the wheels" >&2; exit 1; }
# zipfile does not keep the executable bits
chmod +x "$T"/bin/* "$T"/nvvm/bin/* 2>/dev/null || true
mkdir -p "$T/targets"
ln -sfn .. "$T/targets/x86_64-linux"
[ -e "$T/nvvm/bin" ] || ln -sfn ../bin "$T/nvvm/bin"
for l in cublas cublasLt nvrtc cudart; do
    [ -e "$T/lib/lib$l.so.13" ] && ln -sfn "lib$l.so.13" "$T/lib/lib$l.so"
done

# --- 2. link-only libcuda stub --------------------------------------------------------------
cargo fetch --quiet
CUDARC_SRC="$(cargo metadata --format-version 1 2>/dev/null | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "cudarc"))' | xargs dirname)"
STUB="$CACHE/stub"
mkdir -p "$STUB"
if [ ! -f "$STUB/libcuda.so" ] || [ "$CUDARC_SRC/src/driver/sys.rs" -nt "$STUB/libcuda.so" ]; then
    say "generating the link-only libcuda stub from $CUDARC_SRC/src/driver/sys.rs"
    # every call fails with CUDA_ERROR_UNKNOWN (999); the error-message calls answer, so that a
    # binary run against the stub reports "no driver" instead of crashing
    grep -oE 'pub fn cu[A-Za-z0-9_]+' "$CUDARC_SRC/src/driver/sys.rs" | awk '{print $3}' | sort -u |
        grep -vE '^cuGetError(String|Name)$' |
        awk '{printf "int %s(void) { return 999; }\n", $1}' >"$STUB/stub.c"
    for f in cuGetErrorString cuGetErrorName; do
        printf 'int %s(int e, const char **s) { (void)e; if (s) *s = "link-only stub: no CUDA driver"; return 0; }\n' "$f" >>"$STUB/stub.c"
    done
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so" "$STUB/stub.c"
    ln -sfn libcuda.so "$STUB/libcuda.so.1"
fi
# dfdx asks the linker for -lcurand, but nothing in these binaries calls cuRAND (`--as-needed`
# drops it; a call would fail this link with an undefined symbol): an empty stand-in.
if [ ! -f "$STUB/libcurand.so" ]; then
    echo 'void megalodon_no_curand(void) {}' >"$STUB/curand.c"
    gcc -shared -fPIC -Wl,-soname,libcurand.so.10 -o "$STUB/libcurand.so" "$STUB/curand.c"
fi

# --- 3. nvidia-smi shim ---------------------------------------------------------------------
mkdir -p "$CACHE/shim"
cat >"$CACHE/shim/nvidia-smi" <<EOF
#!/bin/sh
# dfdx's build script asks the GPU's compute capability; there is no GPU here.
echo compute_cap
echo "${CAP:0:1}.${CAP:1}"
EOF
chmod +x "$CACHE/shim/nvidia-smi"

# --- 4. build at a fixed prefix ---------------------------------------------------------------
mkdir -p "$PREFIX"
ln -sfn "$T" "$PREFIX/toolkit"
export CUDA_ROOT="$PREFIX/toolkit" CUDA_PATH="$PREFIX/toolkit" CUDA_COMPUTE_CAP="$CAP"
export PATH="$CACHE/shim:$T/bin:$PATH"
export LIBRARY_PATH="$STUB:$T/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$T/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$STUB -L native=$T/lib"
export CARGO_TARGET_DIR="$PREFIX/target"

TESTS=(cuda engine kernels)
say "building the CUDA tests (${TESTS[*]}) and examples"
test_args=()
for t in "${TESTS[@]}"; do test_args+=(--test "$t"); done
cargo test --release -p megalodon-core --features cuda "${test_args[@]}" --no-run 2>&1 | grep -v "^ *Compiling "
cargo test --release -p megalodon --features cuda --test cuda_heads --no-run 2>&1 | grep -v "^ *Compiling "
cargo build --release -p megalodon --features cuda \
    --example bench_scaling --example bench_stream --example text --example vision --example audio 2>&1 | grep -v "^ *Compiling "

# --- 5. bundle ------------------------------------------------------------------------------
say "assembling $BUNDLE"
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/bin" "$BUNDLE/fixtures"
newest_test() { # newest test binary named $1-<hash>
    ls -t "$CARGO_TARGET_DIR/release/deps/$1"-* 2>/dev/null | grep -v '\.d$' | head -n1
}
for t in "${TESTS[@]}" cuda_heads; do
    bin="$(newest_test "$t")"
    [ -n "$bin" ] || { echo "error: test binary $t not found" >&2; exit 1; }
    cp "$bin" "$BUNDLE/bin/test-$t"
done
for e in bench_scaling bench_stream text vision audio; do
    cp "$CARGO_TARGET_DIR/release/examples/$e" "$BUNDLE/bin/$e"
done
strip "$BUNDLE"/bin/*
# gzip: the binaries shrink about 3x (a device call carries at most 64 MiB); gpu-check.sh unpacks
gzip -9 "$BUNDLE"/bin/*
# NVRTC needs the plain headers (cuda_fp16.h and what it includes, nv/target among them) but
# not the 17 MB CCCL tree (thrust, cub, libcu++'s cccl/ copy).
mkdir -p "$BUNDLE/include"
(cd "$T/include" && tar cf - --exclude=./cccl .) | (cd "$BUNDLE/include" && tar xf -)
DFDX_OUT="$(ls -td "$CARGO_TARGET_DIR"/release/build/dfdx-*/out 2>/dev/null | while read -r d; do
    ls "$d"/*.cuh >/dev/null 2>&1 && echo "$d"; done | head -n1)"
[ -n "$DFDX_OUT" ] || { echo "error: dfdx's OUT_DIR with .cuh files not found" >&2; exit 1; }
mkdir -p "$BUNDLE/dfdx-out"
cp "$DFDX_OUT"/*.cuh "$BUNDLE/dfdx-out/"
cp megalodon-core/tests/fixtures/*.json "$BUNDLE/fixtures/"
cat >"$BUNDLE/paths.env" <<EOF
# Absolute paths baked into the binaries at build time; scripts/gpu-check.sh recreates them.
BAKED_CUDA_INCLUDE=$PREFIX/toolkit/include
BAKED_DFDX_OUT=$DFDX_OUT
EOF
{
    echo "built $(date -u +%FT%TZ) from $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
    echo "compute capability $CAP; wheels: ${WHEELS[*]}"
    for b in "$BUNDLE"/bin/*.gz; do
        u="$(mktemp)"
        gunzip -c "$b" >"$u"
        echo "$(basename "$b" .gz) $(stat -c %s "$u") bytes ($(stat -c %s "$b") gzipped); NEEDED: $(readelf -d "$u" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
        rm -f "$u"
    done
    echo "bundle total: $(du -sb "$BUNDLE" | cut -f1) bytes"
} >"$BUNDLE/manifest.txt"
cat "$BUNDLE/manifest.txt"
size=$(du -sb "$BUNDLE" | cut -f1)
if [ "$size" -gt $((64 * 1024 * 1024)) ]; then
    echo "error: $BUNDLE is $size bytes, over the 64 MiB a device call can carry" >&2
    exit 1
fi
say "done: carry gpu-bundle and run scripts/gpu-check.sh on the GPU machine"
