// MoCo's queue (one rank). The pointer is read on the device, where the
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
// queue_push: out[d, (ptr + i) mod K] = keys[i, d] for i < N, d < E; the
// other columns of out already hold the old queue (copied before, or out
// is the queue itself). Reads ptr, keys [N, E]; writes N columns of out [E, K].
// Element t = d * N + i, so a block writes consecutive columns of one row.
// Launch: min(ceil(E * N / 256), 4096) blocks of 256 threads, grid-stride.
TSR_GLOBAL void {{ name }}({{ signature }}) {
    i64 p = ptr[0] % K;
    if (p < 0) { p += K; }
    const i64 total = E * N;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
        const i64 d = t / N, i = t % N;
        i64 col = p + i;
        if (col >= K) { col -= K; }
        tsr_store(out, d * K + col, tsr_load(keys, i * E + d));
    }
}
{% endif %}
