// cuBLAS for the CUDA emulator (kernels/emu/README.md): the two products the streaming engine
// calls, column-major as cuBLAS defines them, `C = alpha op(A) op(B) + beta C` (with beta 0, C is
// not read). f32 accumulation in order; bf16 operands (CUDA_R_16BF) are widened exactly.
#include <cstdint>
#include <cstring>

typedef int cublasStatus_t;
typedef void* cublasHandle_t;
enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_INVALID_VALUE = 7, CUBLAS_STATUS_NOT_SUPPORTED = 15 };
enum { OP_N = 0, OP_T = 1, OP_C = 2 };
enum { R_32F = 0, R_16BF = 14 };
enum { COMPUTE_32F = 68 };

namespace {
int handle_tag;

template <typename LoadA, typename LoadB>
cublasStatus_t gemm(int ta, int tb, int m, int n, int k, float alpha, LoadA a, int lda, LoadB b,
                    int ldb, float beta, float* c, int ldc) {
    if (m < 0 || n < 0 || k < 0 || ta < 0 || ta > 2 || tb < 0 || tb > 2) {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (lda < (ta == OP_N ? m : k) || ldb < (tb == OP_N ? k : n) || ldc < m || lda < 1 ||
        ldb < 1 || ldc < 1) {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    for (int j = 0; j < n; ++j) {
        for (int i = 0; i < m; ++i) {
            float acc = 0.0f;
            for (int l = 0; l < k; ++l) {
                const float x = ta == OP_N ? a(i + (long long)l * lda) : a(l + (long long)i * lda);
                const float y = tb == OP_N ? b(l + (long long)j * ldb) : b(j + (long long)l * ldb);
                acc += x * y;
            }
            float& out = c[i + (long long)j * ldc];
            out = beta == 0.0f ? alpha * acc : alpha * acc + beta * out;
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}

float bf16(uint16_t bits) {
    const uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
}  // namespace

extern "C" {

cublasStatus_t cublasCreate_v2(cublasHandle_t* h) {
    *h = &handle_tag;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy_v2(cublasHandle_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetStream_v2(cublasHandle_t, void*) { return CUBLAS_STATUS_SUCCESS; }

cublasStatus_t cublasSgemm_v2(cublasHandle_t, int ta, int tb, int m, int n, int k,
                              const float* alpha, const float* a, int lda, const float* b, int ldb,
                              const float* beta, float* c, int ldc) {
    return gemm(
        ta, tb, m, n, k, *alpha, [a](long long i) { return a[i]; }, lda,
        [b](long long i) { return b[i]; }, ldb, *beta, c, ldc);
}

cublasStatus_t cublasGemmEx(cublasHandle_t, int ta, int tb, int m, int n, int k, const void* alpha,
                            const void* a, int atype, int lda, const void* b, int btype, int ldb,
                            const void* beta, void* c, int ctype, int ldc, int compute, int) {
    if (ctype != R_32F || compute != COMPUTE_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    float* cf = static_cast<float*>(c);
    if (atype == R_16BF && btype == R_16BF) {
        const uint16_t* ab = static_cast<const uint16_t*>(a);
        const uint16_t* bb = static_cast<const uint16_t*>(b);
        return gemm(
            ta, tb, m, n, k, al, [ab](long long i) { return bf16(ab[i]); }, lda,
            [bb](long long i) { return bf16(bb[i]); }, ldb, be, cf, ldc);
    }
    if (atype == R_32F && btype == R_32F) {
        const float* af = static_cast<const float*>(a);
        const float* bf = static_cast<const float*>(b);
        return gemm(
            ta, tb, m, n, k, al, [af](long long i) { return af[i]; }, lda,
            [bf](long long i) { return bf[i]; }, ldb, be, cf, ldc);
    }
    return CUBLAS_STATUS_NOT_SUPPORTED;
}

}  // extern "C"
