// Row norms, one thread block per row. CPU reference: megalodon-core/src/engine/cpu.rs
// (`rms_rows`, the FFN LayerNorm in `forward_block`). Spec: docs/design.md §5, §6.

// x[r, :] *= w / sqrt(mean(x[r, :]^2) + eps) (w only when has_w), rows of `width`
extern "C" __global__ void rms_rows_f32(float* x, const float* w, int has_w, int rows, int width,
                                        float eps) {
    __shared__ float red[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    float* row = x + (long long)r * width;
    float s = 0.0f;
    for (int j = threadIdx.x; j < width; j += blockDim.x) s += row[j] * row[j];
    s = block_sum(s, red);
    const float inv = 1.0f / sqrtf(s / width + eps);
    for (int j = threadIdx.x; j < width; j += blockDim.x)
        row[j] = has_w ? row[j] * inv * w[j] : row[j] * inv;
}

// out[r, :] = (y[r, :] - mean) / sqrt(var + eps) * w + b
extern "C" __global__ void layernorm_f32(const float* y, float* out, const float* w,
                                         const float* b, int rows, int m, float eps) {
    __shared__ float red[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* row = y + (long long)r * m;
    float* o = out + (long long)r * m;
    float s = 0.0f;
    for (int j = threadIdx.x; j < m; j += blockDim.x) s += row[j];
    const float mean = block_sum(s, red) / m;
    float v = 0.0f;
    for (int j = threadIdx.x; j < m; j += blockDim.x) {
        const float d = row[j] - mean;
        v += d * d;
    }
    const float rstd = 1.0f / sqrtf(block_sum(v, red) / m + eps);
    for (int j = threadIdx.x; j < m; j += blockDim.x) o[j] = (row[j] - mean) * rstd * w[j] + b[j];
}
