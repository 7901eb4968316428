// Elementwise register programs: a `fused` op's body, and every single
// elementwise op as a one-instruction program. One pass over memory: each
// thread evaluates the program at output elements i, i + stride, ... (a
// grid-stride loop) and writes the last register; operands are read at the
// output's position (full: index i; scalar: index 0; broadcast: by strides).
// Launch: min(ceil(n / 256), 4096) blocks of 256 threads.
{% if rank > 0 %}
struct tsr_dims_{{ rank }} { i64 v[{{ rank }}]; };

// Offset of output element i in an operand read with strides s.
__device__ __forceinline__ i64 tsr_at(i64 i, const tsr_dims_{{ rank }}& dims, const tsr_dims_{{ rank }}& s) {
    i64 off = 0;
    for (int d = {{ rank }} - 1; d >= 0; --d) { off += (i % dims.v[d]) * s.v[d]; i /= dims.v[d]; }
    return off;
}
{% endif %}
{% if scalars > 0 %}struct tsr_scalars_{{ scalars }} { float v[{{ scalars }}]; };{% endif %}
{% if keys > 0 %}struct tsr_keys_{{ keys }} { u32 v[{{ keys }}]; };{% endif %}

__device__ __forceinline__ float tsr_sigmoid(float x) {
    if (x >= 0.0f) { return 1.0f / (1.0f + expf(-x)); }
    float e = expf(x);
    return e / (1.0f + e);
}
__device__ __forceinline__ float tsr_max_nan(float x, float y) { return (x != x || x > y) ? x : y; }
__device__ __forceinline__ float tsr_min_nan(float x, float y) { return (x != x || x < y) ? x : y; }
// x^b by repeated squaring, as compiler-rt's __powisf2 (Rust's powi).
__device__ __forceinline__ float tsr_powi(float a, int b) {
    int recip = b < 0;
    float r = 1.0f;
    for (;;) {
        if (b & 1) { r *= a; }
        b /= 2;
        if (b == 0) { break; }
        a *= a;
    }
    return recip ? 1.0f / r : r;
}

TSR_GLOBAL void {{ name }}({{ signature }}) {
{% if random %}    const u64 seed = rng->seed, step = rng->step;
{% endif %}    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
{{ body }}
    }
}
