// MoCo's queue. The pointer is read on the device, where the
// previous step's queue_advance left it; a pointer outside [0, K), which no
// plan makes (queue_advance keeps it there), is taken modulo K so that no
// write leaves the queue.
{% if advance %}
// queue_advance: out[0] = (ptr[0] + N) mod K. Reads ptr; writes out (one i64).
// Launch: one block of one thread.
TSR_GLOBAL void {{ name }}({{ signature }}) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        const i64 r = (ptr[0] % K + n % K) % K;
        out[0] = r < 0 ? r + K : r;
    }
}
{% else %}
// queue_push: out[d, (ptr + j) mod K] = key j's element d for j < N * W,
// d < E, where keys [W * N, E] are every rank's N keys gathered in rank
// order and key j of the global batch's sample order (j = i * W + r) is
// row r * N + i (W = 1: row j); the other columns of out already hold the
// old queue (copied before, or out is the queue itself). Reads ptr, keys;
// writes N * W columns of out [E, K]. Element t = d * N * W + j, so a
// block writes consecutive columns of one row.
// Launch: min(ceil(E * N * W / 256), 4096) blocks of 256 threads, grid-stride.
TSR_GLOBAL void {{ name }}({{ signature }}) {
    i64 p = ptr[0] % K;
    if (p < 0) { p += K; }
    const i64 NW = N * W;
    const i64 total = E * NW;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
        const i64 d = t / NW, j = t % NW;
        const i64 row = (j % W) * N + j / W;
        i64 col = p + j;
        if (col >= K) { col -= K; }
        tsr_store(out, d * K + col, tsr_load(keys, row * E + d));
    }
}
{% endif %}
