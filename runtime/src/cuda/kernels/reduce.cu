// Reductions (sum, mean, max; the last pass of sum_of_squares and
// cross_entropy): the elements of each output are folded into a {{ acc }}
// accumulator in a fixed order, so runs are bitwise deterministic (no
// atomics). Reads x: reduced element r of output o is at
// offset(o, kept) + offset(r, reduced) (kept and reduced dims merged where
// contiguous). A work item is (output o, slice s): s folds reduced elements
// [s * chunk, (s + 1) * chunk). Writes `{{ store }}` per item: the finished
// output, or, when an output is cut into several slices, partials[o * slices + s]
// for a second launch of this kernel to fold in order.
{% if per_block %}// One block per item (grid-stride over items): threads stride over the
// slice, then a fixed tree over the block. Launch: min(items, 4096) blocks of
// a power of two (at most 256) threads.
{% else %}// One thread per item (grid-stride), consecutive threads on consecutive
// outputs (coalesced when the innermost dim is kept), folding its slice in
// order. Launch: min(ceil(items / 256), 4096) blocks of 256 threads.
{% endif %}
struct tsr_axes_{{ rank }} { i64 size[{{ rank }}]; i64 stride[{{ rank }}]; };

// Offset of index i over dims `a` (row-major; the outermost takes the rest).
__device__ __forceinline__ i64 tsr_axes_offset(i64 i, const tsr_axes_{{ rank }}& a) {
    i64 off = 0;
    for (int d = {{ rank }} - 1; d > 0; --d) {
        off += (i % a.size[d]) * a.stride[d];
        i /= a.size[d];
    }
    return off + i * a.stride[0];
}

__device__ __forceinline__ {{ acc }} tsr_fold({{ acc }} a, {{ acc }} v) { return {{ fold }}; }
{% if per_block %}
// The fold of every thread's `a` in a fixed tree order (blockDim.x a power of two).
__device__ __forceinline__ {{ acc }} tsr_block_fold({{ acc }} a, {{ acc }}* red) {
    red[threadIdx.x] = a;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) { red[threadIdx.x] = tsr_fold(red[threadIdx.x], red[threadIdx.x + s]); }
        __syncthreads();
    }
    const {{ acc }} r = red[0];
    __syncthreads();
    return r;
}
{% endif %}
TSR_GLOBAL void {{ name }}({{ signature }}) {
    const i64 items = n_out * slices;
{% if per_block %}    __shared__ {{ acc }} red[TSR_MAX_THREADS];
    for (i64 w = blockIdx.x; w < items; w += gridDim.x) {
        const i64 o = w / slices, s = w % slices;
        const i64 base = tsr_axes_offset(o, kept);
        const i64 begin = s * chunk, end = begin + chunk < n_red ? begin + chunk : n_red;
        {{ acc }} a = {{ init }};
        for (i64 r = begin + threadIdx.x; r < end; r += blockDim.x) {
            a = tsr_fold(a, {{ load }});
        }
        a = tsr_block_fold(a, red);
        if (threadIdx.x == 0) { {{ store }}; }
    }
{% else %}    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < items; t += (i64)gridDim.x * blockDim.x) {
        const i64 o = t % n_out, s = t / n_out;
        const i64 base = tsr_axes_offset(o, kept);
        const i64 begin = s * chunk, end = begin + chunk < n_red ? begin + chunk : n_red;
        {{ acc }} a = {{ init }};
        for (i64 r = begin; r < end; ++r) {
            a = tsr_fold(a, {{ load }});
        }
        {{ store }};
    }
{% endif %}}
