// TimestepNorm with carried statistics: the causal group norm of `t` rows, one step per row,
// advancing the per-group (mean, var) in f64 from the count `count0` before the first row.
// One thread block per group. CPU reference: megalodon-core/src/engine/cpu.rs
// (`timestep_norm`). Spec: docs/design.md §3.
extern "C" __global__ void timestep_norm_f32(const float* x, float* out, double* mean,
                                             double* var, const float* w, const float* b,
                                             long long count0, int t, int m, int g, float eps) {
    __shared__ double red[32];
    const int gi = blockIdx.x;
    if (gi >= g) return;
    const int gs = m / g, c0 = gi * gs;
    double mu_c = mean[gi], var_c = var[gi];
    for (int r = 0; r < t; ++r) {
        const float* xr = x + (long long)r * m + c0;
        double s1 = 0.0, s2 = 0.0;
        for (int j = threadIdx.x; j < gs; j += blockDim.x) {
            const double v = xr[j];
            s1 += v;
            s2 += v * v;
        }
        s1 = block_sum(s1, red);
        s2 = block_sum(s2, red);
        const double n0 = (double)(count0 + r), n1 = n0 + 1.0;
        const double mu = s1 / gs, m2 = s2 / gs;
        const double nm = (n0 * mu_c + mu) / n1;
        const double nv = (n0 * (var_c + mu_c * mu_c) + m2) / n1 - nm * nm;
        mu_c = nm;
        var_c = nv;
        const double rstd = 1.0 / sqrt(nv + (double)eps);
        float* orow = out + (long long)r * m + c0;
        for (int j = threadIdx.x; j < gs; j += blockDim.x)
            orow[j] = (float)((xr[j] - nm) * rstd) * w[c0 + j] + b[c0 + j];
    }
    if (threadIdx.x == 0) {
        mean[gi] = mu_c;
        var[gi] = var_c;
    }
}
