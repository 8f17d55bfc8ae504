// Complex EMA over `t` rows with the carried complex state h (M x N, channel-major):
// h = p u + q h, y = Re(sum_k eta_k h_k) + omega u. One thread per channel, rows in order (a
// prefill block is a sequential scan per channel; channels run in parallel). CPU reference:
// megalodon-core/src/engine/cpu.rs (`forward_block`, CEMA). Spec: docs/design.md §4.
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
            const float hr = h_re[k], hi = h_im[k];
            const float nr = p[k] * x + q_re[k] * hr - q_im[k] * hi;
            const float ni = q_im[k] * hr + q_re[k] * hi;
            h_re[k] = nr;
            h_im[k] = ni;
            acc += eta_re[k] * nr - eta_im[k] * ni;
        }
        y[(long long)r * m + ch] = acc + omega[ch] * x;
    }
}
