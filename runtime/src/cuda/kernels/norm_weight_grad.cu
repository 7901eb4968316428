// LayerNorm's weight gradient, dw = sum over rows of dy * xhat, for the
// columns [col0, col0 + cols) of rows of d values, in two launches and no
// atomics (the sum's order is fixed by the launch, so runs are bitwise
// reproducible on one device).
{% if partials %}// 1. Block s (of gridDim.x) takes rows s, s + gridDim.x, ...: each row's
// statistics as norm_rows.cu computes them (f64, two passes), then every
// thread adds dy * xhat of its own columns (c = threadIdx.x, + blockDim.x,
// ...), rounded to f32 as a separate multiply would, into the block's f64
// accumulators in shared memory (one thread per column: no races); the
// block writes them to partials[s * cols + c].
// Launch: S blocks of 256 threads, S the partial rows of the scratch.
TSR_GLOBAL void {{ name }}({{ signature }}) {
    __shared__ double red[TSR_MAX_THREADS];
    __shared__ double acc[{{ cols_alloc }}];
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) { acc[c] = 0.0; }
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const i64 base = row * d;
        double mean, inv;
        tsr_row_stats(x, base, d, (double)eps, red, &mean, &inv);
        const float m = (float)mean, rstd = (float)inv;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            const float xhat = (tsr_load(x, base + col0 + c) - m) * rstd;
            acc[c] += (double)(tsr_load(dy, base + col0 + c) * xhat);
        }
    }
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) { partials[blockIdx.x * cols + c] = acc[c]; }
}
{% else %}// 2. out[col0 + c] = the sum over the blocks' partials of column c, in
// block order. Launch: ceil(cols / 256) blocks of 256 threads (grid-stride).
TSR_GLOBAL void {{ name }}({{ signature }}) {
    for (i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += (i64)gridDim.x * blockDim.x) {
        double s = 0.0;
        for (i64 b = 0; b < slices; ++b) { s += partials[b * cols + c]; }
        tsr_store(out, col0 + c, (float)s);
    }
}
{% endif %}
