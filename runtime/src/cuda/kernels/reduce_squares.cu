// Sum of squares, first pass (the squared global norm of gradient
// clipping). Reads the {{ count }} tensors of this launch, seen as one
// concatenation (tensor j holds elements start[j] .. start[j + 1]), cut into
// gridDim.x contiguous ranges; block b sums x^2 over range b in f64 (each
// thread in a fixed order, then a fixed tree) and writes partials[first + b].
// Launch: the launch's share of REDUCE_BLOCKS blocks, of 256 threads.
struct tsr_tensors_{{ count }} { const {{ t }}* x[{{ count }}]; i64 start[{{ bounds }}]; };

TSR_GLOBAL void {{ name }}({{ signature }}) {
    __shared__ double red[TSR_MAX_THREADS];
    const i64 total = tensors.start[{{ count }}];
    const i64 len = (total + gridDim.x - 1) / gridDim.x;
    const i64 lo = (i64)blockIdx.x * len;
    const i64 hi = lo + len < total ? lo + len : total;
    double a = 0.0;
    for (int j = 0; j < {{ count }}; ++j) {
        const i64 s = tensors.start[j], e = tensors.start[j + 1];
        const i64 from = lo > s ? lo : s, to = hi < e ? hi : e;
        for (i64 i = from + threadIdx.x; i < to; i += blockDim.x) {
            const double v = (double)tsr_load(tensors.x[j], i - s);
            a += v * v;
        }
    }
    a = tsr_block_sum(a, red);
    if (threadIdx.x == 0) { partials[first + blockIdx.x] = a; }
}
