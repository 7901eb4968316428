// The backward of self-attention (q, k, v, dy all [heads, n, D]), after the
// statistics kernel (attention_rows.cu) wrote lse and delta per query row.
// With P_ij = exp(s_ij - lse_i) recomputed, f_ij the dropout factor
// (element (qrow * n + j) of the mask's stream) and dp_ij = dy_i . v_j:
//   dS_ij = P_ij * (f_ij * dp_ij - delta_i) * scale,
{% if dkv %}// here dk_j = sum_i dS_ij q_i and dv_j = sum_i P_ij f_ij dy_i: one block
// per key row `row` (= head * n + j, grid-stride), the queries in tiles of
// blockDim.x, one query per thread (its dS and P~ into shared memory), then
// threads split the D columns, each summing the tile's queries in order.
// Reads q, k, v, dy, lse, delta; writes out[1] (dk) and out[2] (dv) rows.
{% else %}// here dq_i = sum_j dS_ij k_j: one block per query row `row` (= head * n + i,
// grid-stride), the keys in tiles of blockDim.x, one key per thread (its dS
// into shared memory), then threads split the D columns, each summing the
// tile's keys in order. Reads q, k, v, dy, lse, delta; writes out[0] (dq) rows.
{% endif %}// out is [3, rows, D]{% if packed %}; packed (AttentionPackedGrad), q, k, v and out are
// [B, n, 3, H, D] and dy [B, n, H, D], rows numbered head * n + i, head = b H + h{% endif %}. Launch: min(rows, 8192) blocks of blockDim.x threads{% if row_sum %}
// (with the row sum: H * chunks blocks){% endif %}
// (at most TSR_MAX_THREADS; the host device: one).
{% if row_sum %}// With the row sum (packed only): block (chunk, h) = (blockIdx.x / H,
// blockIdx.x % H) takes the rows of head h of samples chunk, chunk +
// chunks, ... (chunks = gridDim.x / H), so it stores columns of head h
// only: it adds the values it stores, as stored, into f64 accumulators in
// shared memory per column of head h of its launch's results (dq: columns
// [0, HD); dk, dv: [HD, 3HD)), each thread only its own columns (no
// barrier), left in partials[chunk * 3HD + column]: a row of partials per
// chunk of samples, not per block (H times fewer).
{% endif %}
// a[0..n) . b[at..at + n), in f32, in order.
template <typename T>
__device__ __forceinline__ float tsr_attn_dot(const float* a, const T* b, i64 at, i64 n) {
    float s = 0.0f;
    for (i64 c = 0; c < n; ++c) { s += a[c] * tsr_load(b, at + c); }
    return s;
}

// Where row r (= head * n + i) of operand w starts: 0 q, 1 k, 2 v, 3 dy.
__device__ __forceinline__ i64 {{ name }}_at(i64 r, int w, i64 n) {
{% if packed %}    const i64 H = {{ heads }}, D = {{ d }};
    const i64 head = r / n, b = head / H, h = head - b * H, tok = b * n + (r - head * n);
    return w < 3 ? (tok * 3 * H + w * H + h) * D : (tok * H + h) * D;
{% else %}    return r * {{ d }};
{% endif %}}

// Where row r of dq (w 0), dk (1) or dv (2) goes in out: where q, k, v are
// when packed, else block w of `per` elements.
__device__ __forceinline__ i64 {{ name }}_out(i64 r, int w, i64 n, i64 per) {
{% if packed %}    return {{ name }}_at(r, w, n);
{% else %}    return w * per + r * {{ d }};
{% endif %}}

TSR_GLOBAL void {{ name }}({{ signature }}) {
    const i64 D = {{ d }};
    const i64 per = rows * D;  // elements of each of dq, dk, dv
    __shared__ float ds[TSR_MAX_THREADS];
{% if dkv %}    __shared__ float pt[TSR_MAX_THREADS];
    __shared__ float krow[{{ d_alloc }}], vrow[{{ d_alloc }}], dk[{{ d_alloc }}], dv[{{ d_alloc }}];
{% else %}    __shared__ float qrow[{{ d_alloc }}], dyrow[{{ d_alloc }}], dq[{{ d_alloc }}];
{% endif %}{% if dropout %}    const u64 seed = rng->seed, step = rng->step;
{% endif %}{% if row_sum %}    const i64 H = {{ heads }}, HD = H * D;
    const i64 head = blockIdx.x % H, chunk = blockIdx.x / H, chunks = gridDim.x / H;
    const i64 samples = rows / (H * n);
{% if dkv %}    const i64 sum_cols = 2 * D;  // dk then dv of head `head`
{% else %}    const i64 sum_cols = D;  // dq of head `head`
{% endif %}    // Each thread owns columns c = threadIdx.x + k blockDim.x of each
    // D-wide segment, as it stores them: no barrier around acc.
    __shared__ double acc[{{ sum_alloc }}];
    for (i64 s = 0; s < sum_cols; s += D) {
        for (i64 c = threadIdx.x; c < D; c += blockDim.x) { acc[s + c] = 0.0; }
    }
    for (i64 it = 0;; ++it) {
        const i64 sample = chunk + (it / n) * chunks;
        if (sample >= samples) { break; }
        const i64 row = (sample * H + head) * n + it % n;
{% else %}    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
{% endif %}        const i64 first = (row / n) * n;  // the head's first row
{% if dkv %}        const i64 j = row - first;
        const i64 k_at = {{ name }}_at(row, 1, n), v_at = {{ name }}_at(row, 2, n);
        for (i64 c = threadIdx.x; c < D; c += blockDim.x) {
            krow[c] = tsr_load(k, k_at + c);
            vrow[c] = tsr_load(v, v_at + c);
            dk[c] = 0.0f;
            dv[c] = 0.0f;
        }
        __syncthreads();
        for (i64 i0 = 0; i0 < n; i0 += blockDim.x) {
            const i64 qi = first + i0 + threadIdx.x;  // this thread's query row
            if (i0 + threadIdx.x < n) {
                const float pr = expf(tsr_attn_dot(krow, q, {{ name }}_at(qi, 0, n), D) * scale - lse[qi]);
{% if dropout %}                const float f = tsr_drop_factor(seed, step, key, tsr_global_index(rng, (u64)(qi * n + j), (u64)drop_rows, (u64)drop_row_len), keep, drop_scale);
{% else %}                const float f = 1.0f;
{% endif %}                const float dp = tsr_attn_dot(vrow, dy, {{ name }}_at(qi, 3, n), D);
                pt[threadIdx.x] = pr * f;
                ds[threadIdx.x] = pr * (dp * f - delta[qi]) * scale;
            }
            __syncthreads();
            const i64 tile = n - i0 < (i64)blockDim.x ? n - i0 : (i64)blockDim.x;
            for (i64 c = threadIdx.x; c < D; c += blockDim.x) {
                float a = dk[c], b = dv[c];
                for (i64 t = 0; t < tile; ++t) {
                    a += ds[t] * tsr_load(q, {{ name }}_at(first + i0 + t, 0, n) + c);
                    b += pt[t] * tsr_load(dy, {{ name }}_at(first + i0 + t, 3, n) + c);
                }
                dk[c] = a;
                dv[c] = b;
            }
            __syncthreads();
        }
        for (i64 c = threadIdx.x; c < D; c += blockDim.x) {
            tsr_store(out, {{ name }}_out(row, 1, n, per) + c, dk[c]);
            tsr_store(out, {{ name }}_out(row, 2, n, per) + c, dv[c]);
{% if row_sum %}            acc[c] += (double)tsr_load(out, {{ name }}_out(row, 1, n, per) + c);
            acc[D + c] += (double)tsr_load(out, {{ name }}_out(row, 2, n, per) + c);
{% endif %}        }
{% else %}        for (i64 c = threadIdx.x; c < D; c += blockDim.x) {
            qrow[c] = tsr_load(q, {{ name }}_at(row, 0, n) + c);
            dyrow[c] = tsr_load(dy, {{ name }}_at(row, 3, n) + c);
            dq[c] = 0.0f;
        }
        const float lse_i = lse[row], delta_i = delta[row];
        __syncthreads();
        for (i64 j0 = 0; j0 < n; j0 += blockDim.x) {
            const i64 j = j0 + threadIdx.x;
            if (j < n) {
                const float pr = expf(tsr_attn_dot(qrow, k, {{ name }}_at(first + j, 1, n), D) * scale - lse_i);
{% if dropout %}                const float f = tsr_drop_factor(seed, step, key, tsr_global_index(rng, (u64)(row * n + j), (u64)drop_rows, (u64)drop_row_len), keep, drop_scale);
{% else %}                const float f = 1.0f;
{% endif %}                const float dp = tsr_attn_dot(dyrow, v, {{ name }}_at(first + j, 2, n), D);
                ds[threadIdx.x] = pr * (dp * f - delta_i) * scale;
            }
            __syncthreads();
            const i64 tile = n - j0 < (i64)blockDim.x ? n - j0 : (i64)blockDim.x;
            for (i64 c = threadIdx.x; c < D; c += blockDim.x) {
                float a = dq[c];
                for (i64 t = 0; t < tile; ++t) { a += ds[t] * tsr_load(k, {{ name }}_at(first + j0 + t, 1, n) + c); }
                dq[c] = a;
            }
            __syncthreads();
        }
        for (i64 c = threadIdx.x; c < D; c += blockDim.x) {
            tsr_store(out, {{ name }}_out(row, 0, n, per) + c, dq[c]);
{% if row_sum %}            acc[c] += (double)tsr_load(out, {{ name }}_out(row, 0, n, per) + c);
{% endif %}        }
{% endif %}        __syncthreads();  // the next row overwrites the shared rows
    }
{% if row_sum %}    // Segment s of this head's columns: dq's (at 0), or dk's and dv's (at HD, 2HD).
    for (i64 s = 0; s < sum_cols; s += D) {
{% if dkv %}        const i64 at = chunk * 3 * HD + HD + s / D * HD + head * D;
{% else %}        const i64 at = chunk * 3 * HD + head * D;
{% endif %}        for (i64 c = threadIdx.x; c < D; c += blockDim.x) { partials[at + c] = acc[s + c]; }
    }
{% endif %}}
