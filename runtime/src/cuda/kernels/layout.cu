// Layout ops as one strided copy: element i of the copy's extent `dims` is
// read at offset in_base + sum(coord_d * si_d) and written at out_base +
// sum(coord_d * so_d). Permute, slice and expand read with strides and
// write in order; concat and pad write each operand into its place.
// Launch: min(ceil(n / 256), 4096) blocks of 256 threads, grid-stride.
struct tsr_dims_{{ rank }} { i64 v[{{ rank }}]; };

TSR_GLOBAL void {{ name }}({{ signature }}) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 rest = i, src = in_base, dst = out_base;
        for (int d = {{ rank }} - 1; d >= 0; --d) {
            const i64 c = rest % dims.v[d];
            rest /= dims.v[d];
            src += c * si.v[d];
            dst += c * so.v[d];
        }
        out[dst] = x[src];
    }
}
