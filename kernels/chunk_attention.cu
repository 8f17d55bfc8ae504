// Chunk attention over the current chunk's KV cache. The host splits a block so that its rows
// stay inside one chunk: row r sits at position pos0 + r of the chunk. CPU reference:
// megalodon-core/src/engine/cpu.rs (`rope`, `attend`). Spec: docs/design.md §5, §10.

// Interleaved RoPE of queries (in place) and keys (into the cache) at within-chunk positions,
// and the values appended to the cache.
extern "C" __global__ void rope_cache_f32(float* q, const float* k, const float* v,
                                          float* k_cache, float* v_cache, const float* freqs,
                                          int t, int z, int vd, int dz, int pos0) {
    const int half = z / 2, hd2 = dz / 2;
    const int pairs = t * half;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < pairs + t * vd;
         i += gridDim.x * blockDim.x) {
        if (i < pairs) {
            const int r = i / half, pi = i % half;
            const int pos = pos0 + r;
            const float ang = (float)pos * freqs[pi % hd2];
            double sd, cd;
            sincos((double)ang, &sd, &cd);
            const float s = (float)sd, c = (float)cd;
            const long long a = (long long)r * z + 2 * pi;
            const float qa = q[a], qb = q[a + 1];
            q[a] = qa * c - qb * s;
            q[a + 1] = qb * c + qa * s;
            const float ka = k[a], kb = k[a + 1];
            const long long ca = (long long)pos * z + 2 * pi;
            k_cache[ca] = ka * c - kb * s;
            k_cache[ca + 1] = kb * c + ka * s;
        } else {
            const int j = i - pairs, r = j / vd, c = j % vd;
            v_cache[(long long)(pos0 + r) * vd + c] = v[(long long)r * vd + c];
        }
    }
}

// Causal softmax attention: grid (t rows, h heads); row r attends to cache rows 0..=pos0 + r.
// Dynamic shared memory: (pos0 + t) floats of scores.
extern "C" __global__ void chunk_attention_f32(const float* q, const float* k_cache,
                                               const float* v_cache, float* out, int t, int z,
                                               int vd, int h, int pos0) {
    extern __shared__ float scores[];
    __shared__ float red[32];
    const int r = blockIdx.x, hd = blockIdx.y;
    if (r >= t || hd >= h) return;
    const int dz = z / h, dv = vd / h, len = pos0 + r + 1;
    const float* qr = q + (long long)r * z + hd * dz;
    float mx = __int_as_float(0xff800000);
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const float* kj = k_cache + (long long)j * z + hd * dz;
        float s = 0.0f;
        for (int d = 0; d < dz; ++d) s = fmaf(qr[d], kj[d], s);
        scores[j] = s;
        mx = fmaxf(mx, s);
    }
    mx = block_max(mx, red);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const float e = expf(scores[j] - mx);
        scores[j] = e;
        sum += e;
    }
    sum = block_sum(sum, red);
    const float inv = 1.0f / sum;
    float* o = out + (long long)r * vd + hd * dv;
    for (int c = threadIdx.x; c < dv; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < len; ++j) acc = fmaf(scores[j] * inv, v_cache[(long long)j * vd + hd * dv + c], acc);
        o[c] = acc;
    }
}
