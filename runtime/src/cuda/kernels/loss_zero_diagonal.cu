// zero_diagonal: out = x [n, cols = n * world] with this rank's diagonal,
// element (i, rank * n + i), set to 0 (a row's similarity to itself, left out
// of a contrastive denominator). Reads x, writes out, one thread per element
// (grid-stride; out may be x's storage).
// Launch: min(ceil(n * cols / 256), 4096) blocks of 256 threads.
TSR_GLOBAL void {{ name }}({{ signature }}) {
    const i64 total = n * cols;
    const i64 rank = (i64)rng->rank;  // this process's rank (0 alone)
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        if (i % cols == rank * n + i / cols) {
            tsr_store(out, i, 0.0f);
        } else {
            out[i] = x[i];
        }
    }
}
