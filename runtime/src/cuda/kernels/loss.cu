// Cross-entropy of logits x [rows, k] against {% if hard %}class indices
// target [rows] (i64; label smoothing s: t = s/k + (1-s) onehot){% else %}soft targets
// t [rows, k], used as given{% endif %}, with the CPU backend's numerics
// (cpu/loss.rs): f32 max, f64 sums.
{% if grad %}// The gradient: out[row, j] = (softmax(x)_j * sum(t) - t_j) * dloss / rows,
// the softmax in f32 as the CPU's softmax_row. Reads x, target and dloss[0];
// writes out (each element once, after every read of its row).
// Launch: min(rows, 4096) blocks of a power of two (at most 256) threads.
{% else %}// The loss, first pass: block b adds the losses -sum_j t_j log_softmax(x)_j of
// rows b, b + gridDim.x, ... in order (f64) and writes partials[b]; the
// mean is the ordered fold of the partials (a second launch).
// Launch: min(rows, REDUCE_BLOCKS) blocks (at least 1) of a power of two
// (at most 256) threads.
{% endif %}// One block per row (grid-stride over rows), fixed trees over the block.
// A class index outside 0..k makes its row's {% if grad %}gradient{% else %}loss{% endif %} NaN (the CPU refuses it).
#ifdef __CUDACC__
#define TSR_NAN __int_as_float(0x7fc00000)
#else
#define TSR_NAN __builtin_nanf("")
#endif

// The max over the block's threads (NaN-ignoring, as f32::max), fixed tree.
__device__ __forceinline__ float tsr_block_max(float v, float* red) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) { red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]); }
        __syncthreads();
    }
    const float r = red[0];
    __syncthreads();
    return r;
}

// Probability of class j under the target of `row`.
{% if hard %}__device__ __forceinline__ double tsr_target(const i64* target, i64 row, i64 j, i64 k, double smoothing) {
    return smoothing / (double)k + (target[row] == j ? 1.0 - smoothing : 0.0);
}
{% else %}__device__ __forceinline__ double tsr_target(const {{ t }}* target, i64 row, i64 j, i64 k, double) {
    return (double)tsr_load(target, row * k + j);
}
{% endif %}
TSR_GLOBAL void {{ name }}({{ signature }}) {
    __shared__ double red[TSR_MAX_THREADS];
    __shared__ float redf[TSR_MAX_THREADS];
{% if grad %}    const double factor = (double)tsr_load(dloss, 0) / (double)(rows > 1 ? rows : 1);
{% else %}    double total = 0.0;
{% endif %}    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const i64 base = row * k;
        float m = -TSR_INF;
        for (i64 j = threadIdx.x; j < k; j += blockDim.x) { m = fmaxf(m, tsr_load(x, base + j)); }
        m = tsr_block_max(m, redf);
{% if grad %}        double s = 0.0;
        for (i64 j = threadIdx.x; j < k; j += blockDim.x) { s += (double)expf(tsr_load(x, base + j) - m); }
        const float inv = (float)(1.0 / tsr_block_sum(s, red));
        double mass = 0.0;
        for (i64 j = threadIdx.x; j < k; j += blockDim.x) { mass += tsr_target(target, row, j, k, smoothing); }
        mass = tsr_block_sum(mass, red);
{% if hard %}        const double f = (target[row] >= 0 && target[row] < k) ? factor : (double)TSR_NAN;
{% else %}        const double f = factor;
{% endif %}        // Every logit -inf: the softmax is NaN (softmax_row).
        const bool empty = m == -TSR_INF;
        for (i64 j = threadIdx.x; j < k; j += blockDim.x) {
            const float p = empty ? TSR_NAN : expf(tsr_load(x, base + j) - m) * inv;
            tsr_store(out, base + j, (float)(((double)p * mass - tsr_target(target, row, j, k, smoothing)) * f));
        }
{% else %}        double s = 0.0;
        for (i64 j = threadIdx.x; j < k; j += blockDim.x) { s += exp((double)(tsr_load(x, base + j) - m)); }
        const double lse = log(tsr_block_sum(s, red));
{% if hard %}        double sum_lp = 0.0;
        for (i64 j = threadIdx.x; j < k; j += blockDim.x) { sum_lp += (double)(tsr_load(x, base + j) - m) - lse; }
        sum_lp = tsr_block_sum(sum_lp, red);
        const i64 y = target[row];
        double loss = (double)TSR_NAN;
        if (y >= 0 && y < k) {
            const double lp_y = (double)(tsr_load(x, base + y) - m) - lse;
            loss = -(smoothing * (sum_lp / (double)k) + (1.0 - smoothing) * lp_y);
        }
{% else %}        double st = 0.0;
        for (i64 j = threadIdx.x; j < k; j += blockDim.x) {
            st += tsr_target(target, row, j, k, smoothing) * ((double)(tsr_load(x, base + j) - m) - lse);
        }
        const double loss = -tsr_block_sum(st, red);
{% endif %}        total += loss;
{% endif %}    }
{% if not grad %}    if (threadIdx.x == 0) { partials[blockIdx.x] = total; }
{% endif %}}
