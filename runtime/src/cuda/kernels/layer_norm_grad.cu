// LayerNorm's whole backward in one pass over the rows of d values: the
// input gradient dx = (g - mean(g) - xhat * mean(g * xhat)) * rstd with
// g = dy * w (norm_rows.cu's normalize_grad, the same f32 expression){% if residual %}, plus r
// (the residual stream's gradient){% endif %}{% if copy %}, also written rounded to the copy's type{% endif %};{% if normalized %}
// the forward's layer_norm(x, w, b) (norm_rows.cu's expression) for the
// weight gradient of the linear after the norm;{% endif %} and the
// weight and bias gradients, sums over rows of dy * xhat and of dy, and the
// sum over rows of the rounded copy (a linear's bias gradient), as f64
// partial sums per block (no atomics: the sums' order is fixed by the
// launch, so runs are bitwise reproducible on one device).
{% if partials %}// 1. Block s (of gridDim.x) takes rows s, s + gridDim.x, ...: each row's
// statistics (f64, two passes), then its gradient; every thread adds dy *
// xhat, dy and the copy of its own columns (c = threadIdx.x, + blockDim.x, ...) to
// the block's accumulators (one thread per column: no races), {% if shared %}in shared
// memory{% else %}in the block's own row of partials (rows too wide for shared memory){% endif %}; the block leaves them in
// partials[s * 3d + c] (weight), [s * 3d + d + c] (bias), [s * 3d + 2d + c] (copy).
// Launch: S blocks of 256 threads, S the partial rows of the scratch.
TSR_GLOBAL void {{ name }}({{ signature }}) {
    __shared__ double red[TSR_MAX_THREADS];
{% if shared %}    __shared__ double acc[3 * {{ cols_alloc }}];
{% else %}    double* acc = partials + (i64)blockIdx.x * 3 * d;
{% endif %}    // Each thread zeroes, adds to and writes out only its own columns' three
    // accumulators, so no barrier orders them.
    for (i64 c = threadIdx.x; c < d; c += blockDim.x) { acc[c] = 0.0; acc[d + c] = 0.0; acc[2 * d + c] = 0.0; }
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const i64 base = row * d;
        double mean, inv;
        tsr_row_stats(x, base, d, (double)eps, red, &mean, &inv);
        const float m = (float)mean, rstd = (float)inv;
        double sg = 0.0, sgx = 0.0;
        for (i64 j = threadIdx.x; j < d; j += blockDim.x) {
            const double gv = (double)(tsr_load(dy, base + j) * tsr_load(w, j));
            sg += gv;
            sgx += gv * ((double)tsr_load(x, base + j) - mean);
        }
        const float mg = (float)(tsr_block_sum(sg, red) / (double)d);
        const float mgx = (float)(tsr_block_sum(sgx, red) * inv / (double)d);
        for (i64 j = threadIdx.x; j < d; j += blockDim.x) {
            const float dyv = tsr_load(dy, base + j), xv = tsr_load(x, base + j);
            const float dx = (dyv * tsr_load(w, j) - mg - (xv - m) * rstd * mgx) * rstd;
{% if residual %}            const float out_v = tsr_load(r, base + j) + dx;
{% else %}            const float out_v = dx;
{% endif %}            tsr_store(out, base + j, out_v);
{% if copy %}            tsr_store(copy, base + j, out_v);
{% endif %}{% if normalized %}            tsr_store(normalized, base + j, (xv - m) * rstd * tsr_load(w, j) + tsr_load(b, j));
{% endif %}            acc[j] += (double)(dyv * ((xv - m) * rstd));
            acc[d + j] += (double)dyv;
{% if copy_sum %}            acc[2 * d + j] += (double){% if rounded %}tsr_round_bf16(out_v){% else %}out_v{% endif %};
{% endif %}
        }
    }
{% if shared %}    double* own = partials + (i64)blockIdx.x * 3 * d;
    for (i64 c = threadIdx.x; c < d; c += blockDim.x) { own[c] = acc[c]; own[d + c] = acc[d + c]; own[2 * d + c] = acc[2 * d + c]; }
{% endif %}}
{% else %}// 2. The sums: column c's partials summed in block order. Launch:
// ceil(d / 256) blocks of 256 threads (grid-stride).
TSR_GLOBAL void {{ name }}({{ signature }}) {
    for (i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x; c < d; c += (i64)gridDim.x * blockDim.x) {
        double sw = 0.0, sb = 0.0, sc = 0.0;
        for (i64 b = 0; b < slices; ++b) {
            sw += partials[b * 3 * d + c];
            sb += partials[b * 3 * d + d + c];
            sc += partials[b * 3 * d + 2 * d + c];
        }
{% if weight %}        tsr_store(dw, c, (float)sw);
{% endif %}{% if bias %}        tsr_store(db, c, (float)sb);
{% endif %}{% if copy_sum %}        tsr_store(dc, c, (float)sc);
{% endif %}    }
}
{% endif %}
