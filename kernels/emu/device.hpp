// CPU emulation of the CUDA device side, enough for kernels/*.cu: the thread/block indices, shared
// memory, __syncthreads and warp shuffles, and the math built-ins the kernels use. Part of the
// CUDA emulator (kernels/emu/README.md): the kernels compile as plain C++ and run on the CPU,
// one block at a time.
//
// A kernel that never synchronises runs its threads one after another on the caller's stack. A
// kernel that does (`__syncthreads`, `__shfl_xor_sync`, so also `block_sum`/`block_max`) runs each
// thread of a block as a fiber (ucontext stacks, setjmp switches): a synchronisation point
// switches back to the block's scheduler, which resumes every live thread in turn, so all of them reach the point before any
// passes it. A thread that has returned no longer takes part (as on the GPU, where a kernel must
// not synchronise after some threads of the block returned: none of ours does).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <csetjmp>
#include <functional>
#include <type_traits>
#include <utility>
#include <ucontext.h>
#include <vector>

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};

// The indices of the thread that runs now (the emulator runs one launch at a time).
static uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
// block-scope shared arrays become function statics: one block runs at a time
#define __shared__ static

// The bit reinterpretations CUDA has as built-ins.
template <typename To, typename From>
inline To emu_bits(From f) {
    static_assert(sizeof(To) == sizeof(From), "reinterpretation between different sizes");
    To t;
    std::memcpy(&t, &f, sizeof t);
    return t;
}
inline float __int_as_float(int i) { return emu_bits<float>(i); }
inline int __float_as_int(float f) { return emu_bits<int>(f); }
inline unsigned __float_as_uint(float f) { return emu_bits<unsigned>(f); }
inline float __uint_as_float(unsigned i) { return emu_bits<float>(i); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
using std::max;
using std::min;

namespace emu {

// Bytes of dynamic shared memory a launch may ask for.
constexpr size_t DYN_SHARED = 1 << 20;
alignas(64) static unsigned char dyn_shared[DYN_SHARED];

constexpr size_t MAX_THREADS = 1024;
constexpr size_t STACK_BYTES = 128 * 1024;

// A fiber is made once (makecontext) and then reused for every block; switches are
// _setjmp/_longjmp, which unlike swapcontext do not save the signal mask (no system call).
struct Fiber {
    ucontext_t ctx;
    jmp_buf jb;
    char* stack = nullptr;
    bool started = false;
    bool done = false;
    uint3 tid{};
};

static ucontext_t sched_ctx;
static jmp_buf sched_jb;
static Fiber fibers[MAX_THREADS];
static int current = -1;      // the fiber running now, -1 in direct (sequential) mode
static bool fiber_mode = false;
static const std::function<void()>* body = nullptr;
static uint64_t shfl_slot[MAX_THREADS];

[[noreturn]] inline void fatal(const char* what) {
    std::fprintf(stderr, "cuda emulator: %s\n", what);
    std::abort();
}

// Back to the scheduler; returns when the scheduler resumes this fiber.
inline void yield_fiber() {
    if (!_setjmp(fibers[current].jb)) _longjmp(sched_jb, 1);
}

inline void sync_point() {
    if (!fiber_mode) fatal("a kernel synchronised but was not marked as synchronising");
    yield_fiber();
}

inline unsigned linear_tid() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

// Every fiber's life: run the kernel for the thread it is given, report done, wait for the next.
inline void fiber_main() {
    for (;;) {
        (*body)();
        fibers[current].done = true;
        yield_fiber();
    }
}

inline uint3 tid_of(unsigned i, dim3 b) {
    return uint3{i % b.x, (i / b.x) % b.y, i / (b.x * b.y)};
}

// Runs fiber i until its next synchronisation point or its end.
inline void resume(unsigned i) {
    Fiber& f = fibers[i];
    current = static_cast<int>(i);
    threadIdx = f.tid;
    if (_setjmp(sched_jb)) return;
    if (f.started) _longjmp(f.jb, 1);
    f.started = true;
    swapcontext(&sched_ctx, &f.ctx);  // first start only; it comes back through sched_jb
    fatal("a fiber returned");
}

// Runs `kernel` (the kernel call with its arguments bound) for every thread of the current block.
inline void run_block(const std::function<void()>& kernel, bool synchronises) {
    const unsigned n = blockDim.x * blockDim.y * blockDim.z;
    if (!synchronises) {
        fiber_mode = false;
        for (unsigned i = 0; i < n; ++i) {
            threadIdx = tid_of(i, blockDim);
            kernel();
        }
        return;
    }
    fiber_mode = true;
    body = &kernel;
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = fibers[i];
        if (!f.stack) {
            f.stack = static_cast<char*>(std::malloc(STACK_BYTES));
            if (!f.stack) fatal("out of memory for a fiber stack");
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack;
            f.ctx.uc_stack.ss_size = STACK_BYTES;
            f.ctx.uc_link = nullptr;
            makecontext(&f.ctx, fiber_main, 0);
        }
        f.done = false;
        f.tid = tid_of(i, blockDim);
    }
    unsigned alive = n;
    while (alive > 0) {
        for (unsigned i = 0; i < n; ++i) {
            if (fibers[i].done) continue;
            resume(i);
            if (fibers[i].done) --alive;
        }
    }
    current = -1;
    fiber_mode = false;
}

// A kernel of the table the driver looks names up in: `invoke` unpacks cuLaunchKernel's argument
// pointers into the kernel's parameters.
struct Kernel {
    const char* name;
    void (*invoke)(void**);
    bool synchronises;
};

template <typename... A, size_t... I>
inline void call_with(void (*k)(A...), void** p, std::index_sequence<I...>) {
    k(*static_cast<std::remove_reference_t<A>*>(p[I])...);
}
template <typename... A>
inline void call(void (*k)(A...), void** p) {
    call_with(k, p, std::index_sequence_for<A...>{});
}

}  // namespace emu

#define EMU_KERNEL(name, sync) \
    emu::Kernel { #name, [](void** p) { emu::call(name, p); }, sync }

inline void __syncthreads() { emu::sync_point(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    const unsigned me = emu::linear_tid();
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    emu::shfl_slot[me] = bits;
    emu::sync_point();
    const unsigned other = (me & ~31u) | ((me & 31u) ^ static_cast<unsigned>(lane_mask));
    T r;
    std::memcpy(&r, &emu::shfl_slot[other], sizeof(T));
    emu::sync_point();
    return r;
}
