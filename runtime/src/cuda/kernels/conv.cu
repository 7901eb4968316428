// Convolution as GEMMs (the patch embedding, and any conv2d a model file
// writes). `im2col` gathers cols[(n, oh, ow), (c, i, j)] = x[n, c, oh*sh -
// ph + i, ow*sw - pw + j] (0 in the padding); `col2im` is its adjoint as a
// gather: dx[n, c, h, w] sums, in a fixed order, the cols entries that read
// that pixel, so no two threads write one element (no atomics).
// Launch: min(ceil(n / 256), 4096) blocks of 256 threads, grid-stride.
struct tsr_conv { i64 n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow; };

TSR_GLOBAL void {{ name }}({{ signature }}) {
    const i64 ckk = g.c * g.kh * g.kw;
{% if kind == "im2col" %}
    const i64 total = g.n * g.oh * g.ow * ckk;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 col = e % ckk, row = e / ckk;
        const i64 j = col % g.kw, i = (col / g.kw) % g.kh, c = col / (g.kw * g.kh);
        const i64 ow = row % g.ow, oh = (row / g.ow) % g.oh, n = row / (g.ow * g.oh);
        const i64 y = oh * g.sh - g.ph + i, x = ow * g.sw - g.pw + j;
        float v = 0.0f;
        if (y >= 0 && y < g.h && x >= 0 && x < g.w) { v = tsr_load(in, ((n * g.c + c) * g.h + y) * g.w + x); }
        tsr_store(out, e, v);
    }
{% else %}
    const i64 total = g.n * g.c * g.h * g.w;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 x = e % g.w, y = (e / g.w) % g.h, c = (e / (g.w * g.h)) % g.c, n = e / (g.w * g.h * g.c);
        float acc = 0.0f;
        for (i64 i = 0; i < g.kh; ++i) {
            const i64 ty = y + g.ph - i;
            if (ty < 0 || ty % g.sh != 0 || ty / g.sh >= g.oh) { continue; }
            for (i64 j = 0; j < g.kw; ++j) {
                const i64 tx = x + g.pw - j;
                if (tx < 0 || tx % g.sw != 0 || tx / g.sw >= g.ow) { continue; }
                const i64 row = (n * g.oh + ty / g.sh) * g.ow + tx / g.sw;
                acc += tsr_load(in, row * ckk + (c * g.kh + i) * g.kw + j);
            }
        }
        tsr_store(out, e, acc);
    }
{% endif %}
}
