// Batch statistics over every axis but 1 of x viewed as [N, C, S] (S the
// product of the trailing dims): one block per channel (grid-stride over
// channels), each thread walking elements j = threadIdx.x, +blockDim.x, ...
// of its channel in (n, s) order, sums in f64 and combined by the fixed tree
// of tsr_block_sum; mean and biased variance in two passes, as the CPU's
// mean_var (with one thread per block, the CPU's very order).
// Mode {{ mode }}:
// - batch_norm: out = x * scale + shift per channel, scale = w / sqrt(var + eps),
//   shift = b - mean * scale; batch statistics when `training`, else
//   running_mean / running_var. Reads x, w, b (and the running pair); writes out.
// - batch_standardize: out = (x - mean) / sqrt(var + eps). Reads x; writes out.
// - batch_standardize_grad: out = (g - mean(g) - xhat * mean(g * xhat)) / sigma. Reads g, x; writes out.
// - running_stat: out[c] = (1 - momentum) running[c] + momentum * (the batch mean,
//   or the unbiased batch variance). Reads running, x; writes out [C].
// Launch: min(C, 4096) blocks of a power of two (32..256) threads.

// Walks the elements of channel c that one thread owns: j = threadIdx.x,
// threadIdx.x + blockDim.x, ... < N * S, with j = n * S + s, as offsets
// (n * C + c) * S + s (no division per element: n, s step with a carry).
namespace {
struct bn_walk {
    i64 n, s, dn, ds, N, C, S, c;
    __device__ bn_walk(i64 N_, i64 C_, i64 S_, i64 c_) : N(N_), C(C_), S(S_), c(c_) {
        if (S > 0) {
            n = (i64)threadIdx.x / S; s = (i64)threadIdx.x % S;
            dn = (i64)blockDim.x / S; ds = (i64)blockDim.x % S;
        } else {
            n = N; s = 0; dn = 0; ds = 0;
        }
    }
    __device__ bool more() const { return n < N; }
    __device__ i64 at() const { return (n * C + c) * S + s; }
    __device__ void next() {
        n += dn; s += ds;
        if (s >= S) { s -= S; n += 1; }
    }
};

// The sum of channel c's elements (every thread gets it).
template <typename T>
__device__ double bn_sum(const T* x, i64 N, i64 C, i64 S, i64 c, double* red) {
    double acc = 0.0;
    for (bn_walk w(N, C, S, c); w.more(); w.next()) { acc += (double)tsr_load(x, w.at()); }
    return tsr_block_sum(acc, red);
}

// The sum of (x - mean)^2 over channel c's elements (every thread gets it).
template <typename T>
__device__ double bn_sum_sq(const T* x, i64 N, i64 C, i64 S, i64 c, double mean, double* red) {
    double acc = 0.0;
    for (bn_walk w(N, C, S, c); w.more(); w.next()) {
        const double d = (double)tsr_load(x, w.at()) - mean;
        acc += d * d;
    }
    return tsr_block_sum(acc, red);
}
}  // namespace

TSR_GLOBAL void {{ name }}({{ signature }}) {
    __shared__ double red[TSR_MAX_THREADS];
    const i64 count = N * S;
    const double inv_count = 1.0 / (double)(count > 0 ? count : 1);
    for (i64 c = blockIdx.x; c < C; c += gridDim.x) {
{% if mode == "running_stat" %}
        const double mean = bn_sum(x, N, C, S, c, red) / (double)(count > 0 ? count : 1);
{% if unbiased_var %}        // With one element the unbiased variance is NaN, as PyTorch's.
        const double stat = bn_sum_sq(x, N, C, S, c, mean, red) / ((double)count - 1.0);
{% else %}        const double stat = mean;
{% endif %}        if (threadIdx.x == 0) {
            tsr_store(out, c, (float)((1.0 - momentum) * (double)tsr_load(running, c) + momentum * stat));
        }
{% elif mode == "batch_norm" %}
{% if training %}        const double mean = bn_sum(x, N, C, S, c, red) * inv_count;
        const double var = bn_sum_sq(x, N, C, S, c, mean, red) * inv_count;
{% else %}        const double mean = (double)tsr_load(running_mean, c);
        const double var = (double)tsr_load(running_var, c);
{% endif %}        const double scale = (double)tsr_load(w, c) / sqrt(var + eps);
        const double shift = (double)tsr_load(b, c) - mean * scale;
        for (bn_walk e(N, C, S, c); e.more(); e.next()) {
            const i64 i = e.at();
            tsr_store(out, i, (float)((double)tsr_load(x, i) * scale + shift));
        }
{% elif mode == "batch_standardize" %}
        const double mean = bn_sum(x, N, C, S, c, red) * inv_count;
        const double inv = 1.0 / sqrt(bn_sum_sq(x, N, C, S, c, mean, red) * inv_count + eps);
        for (bn_walk e(N, C, S, c); e.more(); e.next()) {
            const i64 i = e.at();
            tsr_store(out, i, (float)(((double)tsr_load(x, i) - mean) * inv));
        }
{% elif mode == "batch_standardize_grad" %}
        const double mean = bn_sum(x, N, C, S, c, red) * inv_count;
        const double inv = 1.0 / sqrt(bn_sum_sq(x, N, C, S, c, mean, red) * inv_count + eps);
        double sg = 0.0, sgx = 0.0;
        for (bn_walk e(N, C, S, c); e.more(); e.next()) {
            const i64 i = e.at();
            const double gv = (double)tsr_load(g, i);
            sg += gv;
            sgx += gv * ((double)tsr_load(x, i) - mean) * inv;
        }
        const double mg = tsr_block_sum(sg, red) * inv_count;
        const double mgx = tsr_block_sum(sgx, red) * inv_count;
        for (bn_walk e(N, C, S, c); e.more(); e.next()) {
            const i64 i = e.at();
            const double xhat = ((double)tsr_load(x, i) - mean) * inv;
            tsr_store(out, i, (float)(((double)tsr_load(g, i) - mg - xhat * mgx) * inv));
        }
{% endif %}
    }
}
