// The GELU gradient's epilogue of matmul_gelu_grad with further results:
// the product's result y (rows of d values, written by the GEMM) becomes
// GELU'(z) * y in place, as the elementwise epilogue computes it{% if sum %}, and the
// sum over the rows of the values as stored (the hidden layer's bias
// gradient) is left as f64 partial sums per block: no atomics, so the sum's
// order is fixed by the launch and runs are bitwise reproducible{% endif %}{% if gelu %};
// GELU(z) is written to g as z is read (the operand of the weight gradient
// of the product after the GELU, which need not recompute it){% endif %}.
{% if partials %}// 1. Block s (of gridDim.x) takes rows s, s + gridDim.x, ...; each thread
// rewrites{% if sum %} and adds up{% endif %} its own columns (c = threadIdx.x, + blockDim.x, ...){% if sum %}
// {% if shared %}in shared memory{% else %}in the block's own row of partials (rows too wide for shared memory){% endif %}, left in partials[s * d + c]. Each thread
// zeroes, adds to and writes out only its own columns: no barrier needed{% endif %}.
// Launch: S blocks of 256 threads, S the partial rows of the scratch.
TSR_GLOBAL void {{ name }}({{ signature }}) {
{% if sum %}{% if shared %}    __shared__ double acc[{{ cols_alloc }}];
{% else %}    double* acc = partials + (i64)blockIdx.x * d;
{% endif %}    for (i64 c = threadIdx.x; c < d; c += blockDim.x) { acc[c] = 0.0; }
{% endif %}    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const i64 base = row * d;
        for (i64 j = threadIdx.x; j < d; j += blockDim.x) {
            const float zv = tsr_load(z, base + j);
            tsr_store(y, base + j, tsr_gelu_grad(zv, tsr_load(y, base + j)));
{% if sum %}            acc[j] += (double)tsr_load(y, base + j);
{% endif %}{% if gelu %}            tsr_store(g, base + j, tsr_gelu(zv));
{% endif %}        }
    }
{% if sum and shared %}    for (i64 c = threadIdx.x; c < d; c += blockDim.x) { partials[(i64)blockIdx.x * d + c] = acc[c]; }
{% endif %}}
{% else %}// 2. The row sum: column c's partials summed in block order. Launch:
// ceil(d / 256) blocks of 256 threads (grid-stride).
TSR_GLOBAL void {{ name }}({{ signature }}) {
    for (i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x; c < d; c += (i64)gridDim.x * blockDim.x) {
        double s = 0.0;
        for (i64 b = 0; b < slices; ++b) { s += partials[b * d + c]; }
        tsr_store(sum, c, (float)s);
    }
}
{% endif %}
