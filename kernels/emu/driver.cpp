// The CUDA driver API, the part cudarc 0.19 calls for the streaming engine, on the CPU: device
// memory is host memory, streams and events are no-ops (everything runs at once, in order), and a
// module is every kernel of kernels/*.cu compiled into this library (kernels/emu/README.md).
//
// Compiled as one translation unit after device.hpp, the kernel sources and the generated kernel
// table (`EMU_KERNELS`, `EMU_SOURCES`); see megalodon-core/src/engine/emulator.rs.
#include <cstddef>
#include <map>
#include <mutex>
#include <new>
#include <string>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUevent;
typedef void* CUmodule;
typedef const emu::Kernel* CUfunction;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_NOT_FOUND = 500,
};

namespace {

std::mutex lock;
std::map<CUdeviceptr, size_t> allocations;
size_t in_use = 0;
constexpr size_t TOTAL = size_t(16) << 30;  // the memory the emulated device reports
int context_tag, module_tag, stream_tag, event_tag;

CUresult alloc(CUdeviceptr* p, size_t bytes) {
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    void* m = std::malloc(bytes ? bytes : 1);
    if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
    // uninitialised device memory reads as NaN (0xffffffff), so a kernel that reads what nothing
    // wrote shows up in the results
    std::memset(m, 0xff, bytes);
    std::lock_guard<std::mutex> g(lock);
    *p = reinterpret_cast<CUdeviceptr>(m);
    allocations[*p] = bytes;
    in_use += bytes;
    return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr p) {
    std::lock_guard<std::mutex> g(lock);
    auto it = allocations.find(p);
    if (it == allocations.end()) return CUDA_ERROR_INVALID_VALUE;
    in_use -= it->second;
    allocations.erase(it);
    std::free(reinterpret_cast<void*>(p));
    return CUDA_SUCCESS;
}

}  // namespace

extern "C" {

CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, static_cast<size_t>(len), "CUDA emulator (CPU)");
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int* v, int, CUdevice) {
    *v = 0;  // no memory pools (plain cuMemAlloc), nothing else asked
    return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = TOTAL;
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
    *c = &context_tag;
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext) { return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(CUcontext* c) {
    *c = &context_tag;
    return CUDA_SUCCESS;
}
CUresult cuCtxSynchronize() { return CUDA_SUCCESS; }
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::mutex> g(lock);
    *free_bytes = TOTAL - in_use;
    *total = TOTAL;
    return CUDA_SUCCESS;
}

CUresult cuStreamCreate(CUstream* s, unsigned) {
    *s = &stream_tag;
    return CUDA_SUCCESS;
}
CUresult cuStreamDestroy_v2(CUstream) { return CUDA_SUCCESS; }
CUresult cuStreamSynchronize(CUstream) { return CUDA_SUCCESS; }
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return CUDA_SUCCESS; }
CUresult cuEventCreate(CUevent* e, unsigned) {
    *e = &event_tag;
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(CUevent, CUstream) { return CUDA_SUCCESS; }
CUresult cuEventSynchronize(CUevent) { return CUDA_SUCCESS; }
CUresult cuEventQuery(CUevent) { return CUDA_SUCCESS; }
CUresult cuEventDestroy_v2(CUevent) { return CUDA_SUCCESS; }

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return alloc(p, bytes); }
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) { return alloc(p, bytes); }
CUresult cuMemFree_v2(CUdeviceptr p) { return release(p); }
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return release(p); }
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    std::memcpy(reinterpret_cast<void*>(dst), src, n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream) {
    return cuMemcpyHtoD_v2(dst, src, n);
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    std::memcpy(dst, reinterpret_cast<const void*>(src), n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream) {
    return cuMemcpyDtoH_v2(dst, src, n);
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream) {
    return cuMemcpyDtoD_v2(dst, src, n);
}
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    std::memset(reinterpret_cast<void*>(dst), v, n);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream) {
    return cuMemsetD8_v2(dst, v, n);
}

// The "PTX" of the emulator's NVRTC names the source file and the hash of the source it was given;
// a module whose source differs from the one compiled into this library is refused.
CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    const char* text = static_cast<const char*>(image);
    const char* tag = std::strstr(text, "emu-source-hash ");
    if (!tag) return CUDA_ERROR_INVALID_IMAGE;
    const unsigned long long h = std::strtoull(tag + 16, nullptr, 16);
    for (const auto& s : EMU_SOURCES) {
        if (s.hash == h) {
            *m = &module_tag;
            return CUDA_SUCCESS;
        }
    }
    std::fprintf(stderr,
                 "cuda emulator: a module's source (hash %016llx) is not the one this emulator "
                 "was built from: rebuild it\n",
                 h);
    return CUDA_ERROR_INVALID_IMAGE;
}
CUresult cuModuleUnload(CUmodule) { return CUDA_SUCCESS; }
CUresult cuModuleGetFunction(CUfunction* f, CUmodule, const char* name) {
    for (const auto& k : EMU_KERNELS) {
        if (std::strcmp(k.name, name) == 0) {
            *f = &k;
            return CUDA_SUCCESS;
        }
    }
    return CUDA_ERROR_NOT_FOUND;
}
CUresult cuFuncGetAttribute(int* v, int, CUfunction) {
    *v = 0;
    return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction, int, int) { return CUDA_SUCCESS; }

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned shared_bytes, CUstream, void** params,
                        void** extra) {
    if (!f || extra) return CUDA_ERROR_INVALID_VALUE;
    const unsigned long long threads = 1ull * bx * by * bz;
    if (threads == 0 || threads > emu::MAX_THREADS || gx == 0 || gy == 0 || gz == 0 || gy > 65535 ||
        gz > 65535 || shared_bytes > emu::DYN_SHARED) {
        std::fprintf(stderr, "cuda emulator: bad launch of %s: grid (%u,%u,%u) block (%u,%u,%u) "
                     "shared %u bytes\n", f->name, gx, gy, gz, bx, by, bz, shared_bytes);
        return CUDA_ERROR_INVALID_VALUE;
    }
    std::lock_guard<std::mutex> g(lock);
    gridDim = dim3{gx, gy, gz};
    blockDim = dim3{bx, by, bz};
    // shared memory starts out as garbage on the GPU too
    std::memset(emu::dyn_shared, 0xff, shared_bytes);
    const std::function<void()> call = [&] { f->invoke(params); };
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx = uint3{x, y, z};
                emu::run_block(call, f->synchronises);
            }
    return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult e, const char** s) {
    static const char* names[] = {"CUDA_SUCCESS", "CUDA_ERROR_INVALID_VALUE",
                                  "CUDA_ERROR_OUT_OF_MEMORY"};
    *s = (e >= 0 && e <= 2) ? names[e] : "CUDA_ERROR (emulator)";
    return CUDA_SUCCESS;
}
CUresult cuGetErrorString(CUresult e, const char** s) { return cuGetErrorName(e, s); }

}  // extern "C"
