// NVRTC for the CUDA emulator (kernels/emu/README.md): "compiling" a program records its name and
// the FNV-1a hash of its source; the "PTX" carries both, and the emulated driver refuses a module
// whose source is not the one compiled into it (so a stale emulator cannot run old kernels).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

typedef int nvrtcResult;
enum { NVRTC_SUCCESS = 0, NVRTC_ERROR_INVALID_INPUT = 3, NVRTC_ERROR_INVALID_PROGRAM = 4 };

namespace {
struct Program {
    std::string ptx;
};
uint64_t fnv1a(const char* s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; ++s) {
        h ^= static_cast<unsigned char>(*s);
        h *= 0x100000001b3ull;
    }
    return h;
}
}  // namespace

extern "C" {

nvrtcResult nvrtcVersion(int* major, int* minor) {
    *major = 13;
    *minor = 0;
    return NVRTC_SUCCESS;
}
nvrtcResult nvrtcCreateProgram(Program** prog, const char* src, const char* name, int,
                               const char* const*, const char* const*) {
    if (!prog || !src) return NVRTC_ERROR_INVALID_INPUT;
    char tag[64];
    std::snprintf(tag, sizeof tag, "emu-source-hash %016llx\n",
                  static_cast<unsigned long long>(fnv1a(src)));
    *prog = new Program{std::string("// cuda emulator: ") + (name ? name : "?") + "\n// " + tag};
    return NVRTC_SUCCESS;
}
nvrtcResult nvrtcCompileProgram(Program* prog, int, const char* const*) {
    return prog ? NVRTC_SUCCESS : NVRTC_ERROR_INVALID_PROGRAM;
}
nvrtcResult nvrtcGetPTXSize(Program* prog, size_t* n) {
    if (!prog) return NVRTC_ERROR_INVALID_PROGRAM;
    *n = prog->ptx.size() + 1;
    return NVRTC_SUCCESS;
}
nvrtcResult nvrtcGetPTX(Program* prog, char* out) {
    if (!prog) return NVRTC_ERROR_INVALID_PROGRAM;
    std::memcpy(out, prog->ptx.c_str(), prog->ptx.size() + 1);
    return NVRTC_SUCCESS;
}
nvrtcResult nvrtcGetProgramLogSize(Program*, size_t* n) {
    *n = 1;
    return NVRTC_SUCCESS;
}
nvrtcResult nvrtcGetProgramLog(Program*, char* log) {
    log[0] = 0;
    return NVRTC_SUCCESS;
}
nvrtcResult nvrtcDestroyProgram(Program** prog) {
    if (prog && *prog) {
        delete *prog;
        *prog = nullptr;
    }
    return NVRTC_SUCCESS;
}

}  // extern "C"
