// {{ op }} along one axis, viewed as [outer, n, inner]: lane (o, i) holds the
// elements o * n * inner + i + j * inner, j < n. Reads x, writes out; each
// element is written once, by the thread that reads it last, after every
// read of its lane. Numerics of the CPU backend (cpu/softmax.rs): f32
// max and exponentials, f64 sums.
{% if rows %}// A block per lane (grid-stride over lanes), its threads strided along the
// lane, fixed trees over the block. Launch: min(lanes, 4096) blocks of a
// power of two (at most 256) threads.
{% else %}// A thread per lane (grid-stride over lanes; neighbouring threads read
// neighbouring elements), its elements in order. Launch:
// min(ceil(lanes / 256), 4096) blocks of 256 threads.
{% endif %}
#ifdef __CUDACC__
#define TSR_NAN __int_as_float(0x7fc00000)
#else
#define TSR_NAN __builtin_nanf("")
#endif
{% if rows %}
// The max over the block's threads (NaN-ignoring, as f32::max), fixed tree.
__device__ __forceinline__ float tsr_lane_max(float v, float* red) {
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
__device__ __forceinline__ double tsr_lane_sum(double v, double* red) { return tsr_block_sum(v, red); }
{% else %}
// A lane is one thread's: its partial results are the lane's.
__device__ __forceinline__ float tsr_lane_max(float v, float*) { return v; }
__device__ __forceinline__ double tsr_lane_sum(double v, double*) { return v; }
{% endif %}
TSR_GLOBAL void {{ name }}({{ signature }}) {
{% if rows %}    __shared__ double red[TSR_MAX_THREADS];
    __shared__ float redf[TSR_MAX_THREADS];
    const i64 first = threadIdx.x, step = blockDim.x;
    for (i64 lane = blockIdx.x; lane < lanes; lane += gridDim.x) {
{% else %}    double* red = 0;
    float* redf = 0;
    const i64 first = 0, step = 1;
    for (i64 lane = (i64)blockIdx.x * blockDim.x + threadIdx.x; lane < lanes; lane += (i64)gridDim.x * blockDim.x) {
{% endif %}        const i64 base = (lane / inner) * n * inner + lane % inner;
{% if op == "softmax" %}        float m = -TSR_INF;
        for (i64 j = first; j < n; j += step) { m = fmaxf(m, tsr_load(x, base + j * inner)); }
        m = tsr_lane_max(m, redf);
        if (m == -TSR_INF) {
            // Every entry -inf: no probability mass to spread (torch gives NaN).
            for (i64 j = first; j < n; j += step) { tsr_store(out, base + j * inner, TSR_NAN); }
            continue;
        }
        double s = 0.0;
        for (i64 j = first; j < n; j += step) { s += (double)expf(tsr_load(x, base + j * inner) - m); }
        const float inv = (float)(1.0 / tsr_lane_sum(s, red));
        for (i64 j = first; j < n; j += step) {
            tsr_store(out, base + j * inner, expf(tsr_load(x, base + j * inner) - m) * inv);
        }
{% elif op == "log_softmax" %}        float m = -TSR_INF;
        for (i64 j = first; j < n; j += step) { m = fmaxf(m, tsr_load(x, base + j * inner)); }
        m = tsr_lane_max(m, redf);
        double s = 0.0;
        for (i64 j = first; j < n; j += step) { s += exp((double)(tsr_load(x, base + j * inner) - m)); }
        const double lse = log(tsr_lane_sum(s, red));
        for (i64 j = first; j < n; j += step) {
            tsr_store(out, base + j * inner, (float)((double)(tsr_load(x, base + j * inner) - m) - lse));
        }
{% else %}        double s = 0.0;
        for (i64 j = first; j < n; j += step) {
            const double v = (double)tsr_load(x, base + j * inner);
            s += v * v;
        }
        // x / max(||x||, eps), as F.normalize.
        const float inv = (float)(1.0 / fmax(sqrt(tsr_lane_sum(s, red)), eps));
        for (i64 j = first; j < n; j += step) {
            tsr_store(out, base + j * inner, tsr_load(x, base + j * inner) * inv);
        }
{% endif %}    }
}
