// Fused attention by query rows, FlashAttention-style: no Nq x Nk matrix is
// stored. One block per query row `row` (grid-stride over heads * nq rows,
// row = head * nq + i); the keys go by in tiles of blockDim.x, one key per
// thread: its score s = (q_i . k_j) * scale, the tile's max (a shared-memory
// tree), the running max m and exp-sum l (f64, fixed order) rescaled by
// exp(m_old - m_new) (online softmax).
{% if stats %}// The backward's statistics: reads q [rows, D], k and v [heads, nk, D|DV],
// dy [rows, DV]; writes lse[row] = m + ln l and delta[row] = FlashAttention-2's
// D = sum_j P~_ij (dy_i . v_j), P~ the dropped-out probabilities.
{% else %}// The forward: reads q [rows, D], k [heads, nk, D], v [heads, nk, DV]; writes
// out [rows, DV] = sum_j P~_ij v_j, accumulated in shared memory (threads
// split the DV columns, each summing the tile's keys in order).
{% endif %}// Dropout factor of (i, j): element (row * nk + j) of the probabilities'
// stream (the CPU's mask). Launch: min(rows, 8192) blocks of blockDim.x
// threads, a power of two <= TSR_MAX_THREADS (the host device: one).
{% if packed %}// Packed (AttentionPacked): q, k and v are one qkv [B, n, 3, H, D] and the
// result [B, n, H, D]; rows are still numbered head * n + i, head = b H + h.
{% endif %}
// The max of `v` over the block's threads (a tree in `red`, as tsr_block_sum).
__device__ __forceinline__ float tsr_attn_block_max(float v, double* red) {
    red[threadIdx.x] = (double)v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s && red[threadIdx.x + s] > red[threadIdx.x]) { red[threadIdx.x] = red[threadIdx.x + s]; }
        __syncthreads();
    }
    const float r = (float)red[0];
    __syncthreads();
    return r;
}

// a[0..n) . b[at..at + n), in f32, in order.
template <typename T>
__device__ __forceinline__ float tsr_attn_dot(const float* a, const T* b, i64 at, i64 n) {
    float s = 0.0f;
    for (i64 c = 0; c < n; ++c) { s += a[c] * tsr_load(b, at + c); }
    return s;
}

// Where row r (= head * n + i) of operand w starts: 0 q, 1 k, 2 v, 3 the
// result (and dy).
__device__ __forceinline__ i64 {{ name }}_at(i64 r, int w, i64 n) {
{% if packed %}    const i64 H = {{ heads }}, D = {{ d }};
    const i64 head = r / n, b = head / H, h = head - b * H, tok = b * n + (r - head * n);
    return w < 3 ? (tok * 3 * H + w * H + h) * D : (tok * H + h) * D;
{% else %}    return r * (w >= 2 ? {{ dv }} : {{ d }});
{% endif %}}

TSR_GLOBAL void {{ name }}({{ signature }}) {
    const i64 D = {{ d }}, DV = {{ dv }};
    __shared__ double red[TSR_MAX_THREADS];
    __shared__ float qrow[{{ d_alloc }}];
{% if stats %}    __shared__ float dyrow[{{ dv_alloc }}];
{% else %}    __shared__ float acc[{{ dv_alloc }}];
    __shared__ float p[TSR_MAX_THREADS];
{% endif %}{% if dropout %}    const u64 seed = rng->seed, step = rng->step;
{% endif %}    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const i64 kv = (row / nq) * nk;  // the head's first key row
        const i64 q_at = {{ name }}_at(row, 0, nq);
        for (i64 c = threadIdx.x; c < D; c += blockDim.x) { qrow[c] = tsr_load(q, q_at + c); }
{% if stats %}        const i64 dy_at = {{ name }}_at(row, 3, nq);
        for (i64 c = threadIdx.x; c < DV; c += blockDim.x) { dyrow[c] = tsr_load(dy, dy_at + c); }
        double dsum = 0.0;
{% else %}        for (i64 c = threadIdx.x; c < DV; c += blockDim.x) { acc[c] = 0.0f; }
{% endif %}        __syncthreads();
        float m = -TSR_INF;
        double l = 0.0;
        for (i64 j0 = 0; j0 < nk; j0 += blockDim.x) {
            const i64 j = j0 + threadIdx.x;
            const float s = j < nk ? tsr_attn_dot(qrow, k, {{ name }}_at(kv + j, 1, nk), D) * scale : -TSR_INF;
            const float mnew = fmaxf(m, tsr_attn_block_max(s, red));
            // (m == mnew also covers a row of -inf so far: no rescaling.)
            const float corr = m == mnew ? 1.0f : expf(m - mnew);
            const float e = s == -TSR_INF ? 0.0f : expf(s - mnew);
{% if dropout %}            const float f = j < nk ? tsr_drop_factor(seed, step, key, tsr_global_index(rng, (u64)(row * nk + j), (u64)drop_rows, (u64)drop_row_len), keep, drop_scale) : 0.0f;
{% else %}            const float f = 1.0f;
{% endif %}            l = l * (double)corr + tsr_block_sum((double)e, red);
{% if stats %}            const float dp = j < nk ? tsr_attn_dot(dyrow, v, {{ name }}_at(kv + j, 2, nk), DV) : 0.0f;
            dsum = dsum * (double)corr + tsr_block_sum((double)(e * f * dp), red);
{% else %}            p[threadIdx.x] = e * f;
            __syncthreads();
            const i64 tile = nk - j0 < (i64)blockDim.x ? nk - j0 : (i64)blockDim.x;
            for (i64 c = threadIdx.x; c < DV; c += blockDim.x) {
                float a = acc[c] * corr;
                for (i64 t = 0; t < tile; ++t) { a += p[t] * tsr_load(v, {{ name }}_at(kv + j0 + t, 2, nk) + c); }
                acc[c] = a;
            }
            __syncthreads();
{% endif %}            m = mnew;
        }
{% if stats %}        if (threadIdx.x == 0) {
            lse[row] = m + (float)log(l);
            delta[row] = (float)(dsum / l);
        }
{% else %}        const float inv = (float)(1.0 / l);
        const i64 out_at = {{ name }}_at(row, 3, nq);
        for (i64 c = threadIdx.x; c < DV; c += blockDim.x) { tsr_store(out, out_at + c, acc[c] * inv); }
{% endif %}        __syncthreads();  // the next row overwrites the shared rows
    }
}
