// Elementwise steps of one block of `t` rows (row-major (t, width) matrices). CPU reference:
// megalodon-core/src/engine/cpu.rs (`forward_block`). Spec: docs/design.md §2, §5, §6.

// x[r, :] = table[toks[r], :] * scale
extern "C" __global__ void embed_f32(float* x, const float* table, const int* toks, int t, int m,
                                     float scale) {
    const long long n = (long long)t * m;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(i / m), j = (int)(i % m);
        x[i] = table[(long long)toks[r] * m + j] * scale;
    }
}

// y[r, o] = act(y[r, o] + b[o]) (b only when has_bias; act 1 = SiLU, 0 = identity)
extern "C" __global__ void bias_act_f32(float* y, const float* b, int has_bias, int act, int t,
                                        int out) {
    const long long n = (long long)t * out;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = y[i];
        if (has_bias) v += b[i % out];
        y[i] = act ? silu(v) : v;
    }
}

// a[i] *= b[i]
extern "C" __global__ void mul_f32(float* a, const float* b, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        a[i] *= b[i];
}

// x[r, j] += alpha[j] * o[r, j] (alpha only when has_alpha; else x += o)
extern "C" __global__ void residual_f32(float* x, const float* o, const float* alpha,
                                        int has_alpha, int t, int m) {
    const long long n = (long long)t * m;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = o[i];
        x[i] += has_alpha ? alpha[i % m] * v : v;
    }
}

// Queries and keys from the per-head normalised Z: q = zn * qs + qo, k = zn * ks + ko
extern "C" __global__ void qk_affine_f32(const float* zn, float* q, float* k, const float* qs,
                                         const float* qo, const float* ks, const float* ko,
                                         int t, int z) {
    const int n = t * z;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const int j = i % z;
        const float v = zn[i];
        q[i] = v * qs[j] + qo[j];
        k[i] = v * ks[j] + ko[j];
    }
}

// out[i] = bf16(x[i]), round to nearest even (NaN stays NaN): the activations a bf16 engine's
// matrix products read (cuBLAS GemmEx, bf16 x bf16 with f32 accumulation). bf16 is the top half
// of an f32, so the bits are written as unsigned shorts and no header is needed.
extern "C" __global__ void to_bf16(const float* x, unsigned short* out, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        unsigned int b = __float_as_uint(x[i]);
        if ((b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu) != 0u) {
            out[i] = (unsigned short)((b >> 16) | 0x0040u);
        } else {
            b += 0x7fffu + ((b >> 16) & 1u);
            out[i] = (unsigned short)(b >> 16);
        }
    }
}
