// Row normalisation over the last axis (layer_norm, normalize, and the
// normalised operand of layer_norm_linear): one block per row (grid-stride
// over rows); biased mean and variance accumulated in f64 (two passes,
// as the CPU backend), then y = (x - mean) * rstd [* w + b] in f32.
// {% if grad %}The gradient: dx = (g - mean(g) - xhat * mean(g * xhat)) * rstd{% if affine %},
// g = dy * w formed in f32 as dy is read (LayerNorm's input gradient){% endif %}{% if residual %},
// plus r (the residual stream's gradient) as dx is written{% endif %}.{% endif %}
// Launch: min(rows, 4096) blocks of 256 threads.
TSR_GLOBAL void {{ name }}({{ signature }}) {
    __shared__ double red[TSR_MAX_THREADS];
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const i64 base = row * d;
        double mean, inv;
        tsr_row_stats(x, base, d, (double)eps, red, &mean, &inv);
        const float m = (float)mean, rstd = (float)inv;
{% if grad %}
{% if affine %}#define TSR_G(j) (tsr_load(g, base + (j)) * tsr_load(w, (j)))
{% else %}#define TSR_G(j) tsr_load(g, base + (j))
{% endif %}        double sg = 0.0, sgx = 0.0;
        for (i64 j = threadIdx.x; j < d; j += blockDim.x) {
            const double gv = (double)TSR_G(j);
            sg += gv;
            sgx += gv * ((double)tsr_load(x, base + j) - mean);
        }
        const float mg = (float)(tsr_block_sum(sg, red) / (double)d);
        const float mgx = (float)(tsr_block_sum(sgx, red) * inv / (double)d);
        for (i64 j = threadIdx.x; j < d; j += blockDim.x) {
            const float xv = tsr_load(x, base + j);
{% if residual %}            tsr_store(out, base + j, tsr_load(r, base + j) + (TSR_G(j) - mg - (xv - m) * rstd * mgx) * rstd);
{% else %}            tsr_store(out, base + j, (TSR_G(j) - mg - (xv - m) * rstd * mgx) * rstd);
{% endif %}
        }
#undef TSR_G
{% else %}
        for (i64 j = threadIdx.x; j < d; j += blockDim.x) {
            const float y = (tsr_load(x, base + j) - m) * rstd;
{% if affine %}            tsr_store(out, base + j, y * tsr_load(w, j) + tsr_load(b, j));
{% else %}            tsr_store(out, base + j, y);
{% endif %}        }
{% endif %}
    }
}
