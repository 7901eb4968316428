// The prelude of every kernel module: types, bf16 conversion, Philox, and
// (on the host) the launch shim. Kernels are written generically over
// blockDim (loops stride by blockDim.x; no warp size assumed), so that the
// host device can run each block with one thread.
#include <cuda_bf16.h>

typedef long long i64;
typedef unsigned long long u64;
typedef unsigned int u32;
typedef __nv_bfloat16 bf16;

#ifdef __CUDACC__
#define TSR_GLOBAL extern "C" __global__
#define TSR_INF __int_as_float(0x7f800000)
#else
#include <cmath>
#include <cstdint>
struct tsr_dim3 { unsigned x, y, z; };
static thread_local tsr_dim3 threadIdx, blockIdx, blockDim, gridDim;
#define TSR_GLOBAL static inline
#define TSR_INF __builtin_huge_valf()
#ifdef TSR_HOST_THREADS
// The race check: a block's threads are real threads, __syncthreads a
// barrier, shared memory one static copy (blocks run one after another).
#include <barrier>
static std::barrier<>* tsr_barrier;
#define __syncthreads() tsr_barrier->arrive_and_wait()
#undef __shared__
#define __shared__ static
#else
// One thread per block: a barrier has nothing to wait for.
#define __syncthreads() ((void)0)
#endif
#endif


// Loads and stores of a tensor element as f32 (bf16 converts; the store
// rounds to nearest even, as every bf16 result is rounded).
__device__ __forceinline__ float tsr_load(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float tsr_load(const bf16* p, i64 i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void tsr_store(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void tsr_store(bf16* p, i64 i, float v) { p[i] = __float2bfloat16(v); }
// A float rounded to bf16 and back (a Cast to bf16 inside a register program).
__device__ __forceinline__ float tsr_round_bf16(float v) { return __bfloat162float(__float2bfloat16(v)); }

// Philox4x32-10 (Salmon et al. 2011), word for word the generator of
// philox/src/lib.rs: element i of the stream (seed, step, op) is word i % 4
// of counter block i / 4, counter [block lo, block hi ^ op, step lo, step hi].
__device__ __forceinline__ void tsr_philox(u32 c[4], u32 k0, u32 k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        u64 p0 = (u64)0xD2511F53u * c[0];
        u64 p1 = (u64)0xCD9E8D57u * c[2];
        u32 hi0 = (u32)(p0 >> 32), lo0 = (u32)p0, hi1 = (u32)(p1 >> 32), lo1 = (u32)p1;
        u32 n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    }
}

// The 32-bit draw of element `index` of stream (seed, step, op).
__device__ __forceinline__ u32 tsr_draw(u64 seed, u64 step, u32 op, u64 index) {
    u64 block = index / 4;
    u32 c[4] = {(u32)block, (u32)(block >> 32) ^ op, (u32)step, (u32)(step >> 32)};
    tsr_philox(c, (u32)seed, (u32)(seed >> 32));
    return c[index % 4];
}

// The inverted-dropout factor of element `index`: `scale` when its uniform
// draw (24 bits) is below `keep`, else 0 (runtime/src/philox.rs, keep_at).
__device__ __forceinline__ float tsr_drop_factor(u64 seed, u64 step, u32 op, u64 index, float keep, float scale) {
    u32 w = tsr_draw(seed, step, op, index);
    return ((float)(w >> 8) * (1.0f / 16777216.0f)) < keep ? scale : 0.0f;
}

// Exact (erf) GELU and its derivative, as nn.GELU() (reference 1.5).
__device__ __forceinline__ float tsr_gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float tsr_gelu_grad(float x, float dy) {
    float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
    float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
    return dy * (cdf + x * pdf);
}

// The run's random-stream position: seed and step, and this process's place
// in a data-parallel run (rank, world, batch per process), read from device
// memory so that a launch list is fixed for the plan's lifetime.
struct tsr_rng { u64 seed; u64 step; u64 rank; u64 world; u64 block; };

// The random streams' rank term (runtime/src/cpu/random.rs, RowMap): mask
// index `index` of a tensor of `rows` rows of `row_len` indices, as one
// process with the global batch draws it. Rows come in blocks of the
// per-process batch; local row i of block c is global row
// c * block * world + i * world + rank (the sampler's interleaving).
__device__ __forceinline__ u64 tsr_global_index(const tsr_rng* rng, u64 index, u64 rows, u64 row_len) {
    const u64 world = rng->world, block = rng->block;
    if (world <= 1 || block == 0 || rows % block != 0) { return index; }
    const u64 row = index / row_len, within = index % row_len;
    const u64 c = row / block, i = row % block;
    return (c * block * world + i * world + rng->rank) * row_len + within;
}

// The sum of `v` over the block's threads, in a fixed tree order (blockDim.x
// a power of two, at most TSR_MAX_THREADS); every thread gets the sum.
#define TSR_MAX_THREADS 256
__device__ __forceinline__ double tsr_block_sum(double v, double* red) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) { red[threadIdx.x] += red[threadIdx.x + s]; }
        __syncthreads();
    }
    const double r = red[0];
    __syncthreads();
    return r;
}

// The biased mean and 1 / sqrt(var + eps) of the d values of x from `base`,
// accumulated in f64 in two passes (the CPU backend's row statistics); the
// block's threads split the row and every thread gets both.
template <typename T>
__device__ __forceinline__ void tsr_row_stats(const T* x, i64 base, i64 d, double eps, double* red, double* mean,
                                              double* inv) {
    double s = 0.0;
    for (i64 j = threadIdx.x; j < d; j += blockDim.x) { s += (double)tsr_load(x, base + j); }
    const double m = tsr_block_sum(s, red) / (double)d;
    double v = 0.0;
    for (i64 j = threadIdx.x; j < d; j += blockDim.x) {
        const double dv = (double)tsr_load(x, base + j) - m;
        v += dv * dv;
    }
    *mean = m;
    *inv = 1.0 / sqrt(tsr_block_sum(v, red) / (double)d + eps);
}
