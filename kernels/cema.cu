// Complex EMA over `t` rows with the carried complex state h (M x N, channel-major):
// h = p u + q h, y = Re(sum_k eta_k h_k) + omega u. CPU reference:
// megalodon-core/src/engine/cpu.rs (`forward_block`, CEMA). Spec: docs/design.md §4.
//
// Decode and short blocks: `cema_f32`, one thread per channel, rows in order.
// Long prefill blocks: a chunked scan in three launches over segments of `seg` rows (the last one
// may be shorter), S = ceil(t / seg):
//   1. `cema_scan_local_f32`, thread (segment, k): the segment's end state from a zero start,
//      e_s = sum_{r in s} q^(end - r) p u_r;
//   2. `cema_scan_carry_f32`, thread k: walks the segments in order with the carried state h,
//      h_in(s) = h, h = e_s + q^len(s) h; stores h_in(s) over e_s and the final h as the new state;
//   3. `cema_scan_out_f32`, thread (segment, channel): replays its rows from h_in(s) and writes y.
// Work per step stays O(t N) per channel; the sequential part is S steps per state element.

// One step of one state: h = p x + q h (complex q, real p and x).
__device__ __forceinline__ void cema_update(float p, float qr, float qi, float x, float& hr,
                                            float& hi) {
    const float nr = p * x + qr * hr - qi * hi;
    hi = qi * hr + qr * hi;
    hr = nr;
}

extern "C" __global__ void cema_f32(const float* u, float* y, float* h_re, float* h_im,
                                    const float* p, const float* q_re, const float* q_im,
                                    const float* eta_re, const float* eta_im, const float* omega,
                                    int t, int m, int n) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= m) return;
    const int k0 = ch * n;
    for (int r = 0; r < t; ++r) {
        const float x = u[(long long)r * m + ch];
        float acc = 0.0f;
        for (int k = k0; k < k0 + n; ++k) {
            float hr = h_re[k], hi = h_im[k];
            cema_update(p[k], q_re[k], q_im[k], x, hr, hi);
            h_re[k] = hr;
            h_im[k] = hi;
            acc += eta_re[k] * hr - eta_im[k] * hi;
        }
        y[(long long)r * m + ch] = acc + omega[ch] * x;
    }
}

// Pass 1: thread (s, k) over S x (m n); e_re/e_im hold S x (m n) values.
extern "C" __global__ void cema_scan_local_f32(const float* u, float* e_re, float* e_im,
                                               const float* p, const float* q_re,
                                               const float* q_im, int t, int m, int n, int seg) {
    const long long mn = (long long)m * n;
    const long long segs = (t + seg - 1) / seg;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < segs * mn;
         i += (long long)gridDim.x * blockDim.x) {
        const long long s = i / mn, k = i % mn;
        const int ch = (int)(k / n);
        const int r0 = (int)(s * seg), r1 = min(t, r0 + seg);
        const float pk = p[k], qr = q_re[k], qi = q_im[k];
        float hr = 0.0f, hi = 0.0f;
        for (int r = r0; r < r1; ++r) cema_update(pk, qr, qi, u[(long long)r * m + ch], hr, hi);
        e_re[i] = hr;
        e_im[i] = hi;
    }
}

// Pass 2: thread k over m n; replaces e_s with the state entering segment s and advances h.
extern "C" __global__ void cema_scan_carry_f32(float* e_re, float* e_im, float* h_re, float* h_im,
                                               const float* q_re, const float* q_im, int t, int m,
                                               int n, int seg) {
    const long long mn = (long long)m * n;
    const long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (k >= mn) return;
    const int segs = (t + seg - 1) / seg;
    const float qr = q_re[k], qi = q_im[k];
    // q^seg by repeated squaring (exact powers as the sequential scan would not form them, but
    // the same value to rounding)
    float pr = 1.0f, pi = 0.0f, br = qr, bi = qi;
    for (int e = seg; e > 0; e >>= 1) {
        if (e & 1) {
            const float nr = pr * br - pi * bi;
            pi = pr * bi + pi * br;
            pr = nr;
        }
        const float nb = br * br - bi * bi;
        bi = 2.0f * br * bi;
        br = nb;
    }
    float hr = h_re[k], hi = h_im[k];
    for (int s = 0; s < segs; ++s) {
        const long long i = (long long)s * mn + k;
        const float er = e_re[i], ei = e_im[i];
        e_re[i] = hr;
        e_im[i] = hi;
        const int len = min(seg, t - s * seg);
        float ar = pr, ai = pi;
        if (len != seg) {  // the last, shorter segment: q^len directly
            ar = 1.0f;
            ai = 0.0f;
            for (int j = 0; j < len; ++j) {
                const float nr = ar * qr - ai * qi;
                ai = ar * qi + ai * qr;
                ar = nr;
            }
        }
        const float nr = er + ar * hr - ai * hi;
        const float ni = ei + ai * hr + ar * hi;
        hr = nr;
        hi = ni;
    }
    h_re[k] = hr;
    h_im[k] = hi;
}

// The largest N `cema_scan_out_f32` keeps in registers (the host checks).
#define CEMA_SCAN_MAX_N 64

// Pass 3: thread (s, ch) over S x m; replays segment s of channel ch from its entering state.
extern "C" __global__ void cema_scan_out_f32(const float* u, float* y, const float* e_re,
                                             const float* e_im, const float* p,
                                             const float* q_re, const float* q_im,
                                             const float* eta_re, const float* eta_im,
                                             const float* omega, int t, int m, int n, int seg) {
    const long long segs = (t + seg - 1) / seg;
    const long long mn = (long long)m * n;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < segs * m;
         i += (long long)gridDim.x * blockDim.x) {
        const long long s = i / m;
        const int ch = (int)(i % m);
        const int r0 = (int)(s * seg), r1 = min(t, r0 + seg);
        float hr[CEMA_SCAN_MAX_N], hi[CEMA_SCAN_MAX_N];
        const long long k0 = (long long)ch * n;
        for (int j = 0; j < n; ++j) {
            hr[j] = e_re[s * mn + k0 + j];
            hi[j] = e_im[s * mn + k0 + j];
        }
        for (int r = r0; r < r1; ++r) {
            const float x = u[(long long)r * m + ch];
            float acc = 0.0f;
            for (int j = 0; j < n; ++j) {
                const long long k = k0 + j;
                cema_update(p[k], q_re[k], q_im[k], x, hr[j], hi[j]);
                acc += eta_re[k] * hr[j] - eta_im[k] * hi[j];
            }
            y[(long long)r * m + ch] = acc + omega[ch] * x;
        }
    }
}
