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
//
// Synchronised batch norm (`sync`, VISSL's SyncBatchNorm over groups of
// `group` consecutive ranks): the statistics are sums over the group's
// samples, so they come in passes with a collective between them, each
// rank writing its channel sums into its group's slot (slot = rank / group)
// of a zeroed f64 array that an all-reduce (sum) then fills for every group:
// - group_sums: out[slot * C + c] = the sum of x over channel c;
// - group_squares: out[slot * C + c] = the sum of (x - mean)^2, mean from `sums`;
// - group_grad_sums: out[2 (slot * C + c) + 0 / 1] = the sums of g and of g * xhat;
// and the four modes above read mean = sums / count, var = squares / count
// (count: the group's values per channel) and, for the gradient, the means
// of g and g * xhat from `grad_sums`, instead of their own batch's.

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
{% if sync %}        // This channel in this rank's group slot; the group's statistics.
        const i64 at = (i64)(rng->rank / (u64)group) * C + c;
        const double ginv = 1.0 / (group_count > 0.0 ? group_count : 1.0);
{% if mode == "group_sums" %}        const double sum = bn_sum(x, N, C, S, c, red);
        if (threadIdx.x == 0) { out[at] = sum; }
        continue;
{% else %}        const double mean = sums[at] * ginv;
{% endif %}{% if mode == "group_squares" %}        const double sq = bn_sum_sq(x, N, C, S, c, mean, red);
        if (threadIdx.x == 0) { out[at] = sq; }
        continue;
{% elif mode != "group_sums" %}        const double var = squares[at] * ginv;
{% endif %}{% endif %}
{% if mode == "running_stat" %}
{% if sync %}{% if unbiased_var %}        // The group's unbiased variance (its count less one), as SyncBatchNorm's.
        const double stat = squares[at] / (group_count - 1.0);
{% else %}        const double stat = mean;
{% endif %}{% else %}        const double mean = bn_sum(x, N, C, S, c, red) / (double)(count > 0 ? count : 1);
{% if unbiased_var %}        // With one element the unbiased variance is NaN, as PyTorch's.
        const double stat = bn_sum_sq(x, N, C, S, c, mean, red) / ((double)count - 1.0);
{% else %}        const double stat = mean;
{% endif %}{% endif %}        if (threadIdx.x == 0) {
            tsr_store(out, c, (float)((1.0 - momentum) * (double)tsr_load(running, c) + momentum * stat));
        }
{% elif mode == "batch_norm" %}
{% if not sync %}{% if training %}        const double mean = bn_sum(x, N, C, S, c, red) * inv_count;
        const double var = bn_sum_sq(x, N, C, S, c, mean, red) * inv_count;
{% else %}        const double mean = (double)tsr_load(running_mean, c);
        const double var = (double)tsr_load(running_var, c);
{% endif %}{% endif %}        const double scale = (double)tsr_load(w, c) / sqrt(var + eps);
        const double shift = (double)tsr_load(b, c) - mean * scale;
        for (bn_walk e(N, C, S, c); e.more(); e.next()) {
            const i64 i = e.at();
            tsr_store(out, i, (float)((double)tsr_load(x, i) * scale + shift));
        }
{% elif mode == "batch_standardize" %}
{% if not sync %}        const double mean = bn_sum(x, N, C, S, c, red) * inv_count;
        const double var = bn_sum_sq(x, N, C, S, c, mean, red) * inv_count;
{% endif %}        const double inv = 1.0 / sqrt(var + eps);
        for (bn_walk e(N, C, S, c); e.more(); e.next()) {
            const i64 i = e.at();
            tsr_store(out, i, (float)(((double)tsr_load(x, i) - mean) * inv));
        }
{% elif mode == "batch_standardize_grad" or mode == "group_grad_sums" %}
{% if not sync %}        const double mean = bn_sum(x, N, C, S, c, red) * inv_count;
        const double var = bn_sum_sq(x, N, C, S, c, mean, red) * inv_count;
{% endif %}        const double inv = 1.0 / sqrt(var + eps);
{% if mode == "batch_standardize_grad" and sync %}        const double mg = grad_sums[2 * at] * ginv;
        const double mgx = grad_sums[2 * at + 1] * ginv;
{% else %}        double sg = 0.0, sgx = 0.0;
        for (bn_walk e(N, C, S, c); e.more(); e.next()) {
            const i64 i = e.at();
            const double gv = (double)tsr_load(g, i);
            sg += gv;
            sgx += gv * ((double)tsr_load(x, i) - mean) * inv;
        }
{% if mode == "group_grad_sums" %}        sg = tsr_block_sum(sg, red);
        sgx = tsr_block_sum(sgx, red);
        if (threadIdx.x == 0) { out[2 * at] = sg; out[2 * at + 1] = sgx; }
        continue;
{% else %}        const double mg = tsr_block_sum(sg, red) * inv_count;
        const double mgx = tsr_block_sum(sgx, red) * inv_count;
{% endif %}{% endif %}{% if mode == "batch_standardize_grad" %}        for (bn_walk e(N, C, S, c); e.more(); e.next()) {
            const i64 i = e.at();
            const double xhat = ((double)tsr_load(x, i) - mean) * inv;
            tsr_store(out, i, (float)(((double)tsr_load(g, i) - mg - xhat * mgx) * inv));
        }
{% endif %}{% endif %}
    }
}
