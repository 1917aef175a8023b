/* Row-wise and element-wise ops: RMSNorm, RoPE, SwiGLU, residual add, row gather. All f32.
 * Host arrays (positions, gather indices) go through the context's mirrors, so a forward
 * uploads its positions once, not once per layer (or through the graph stage, fuse.cu). An
 * add is held back and fused with the rmsnorm of its x that follows (fuse.cu). */
#include "kernels/cuda/cuda_impl.h"

#include <assert.h>
#include <math.h>
#include <string.h>

#include <vector>

/* ---- rmsnorm ------------------------------------------------------------------------------- */

#define NORM_THREADS 256

#define NORM_CACHE 32 /* elements per thread held in registers: rows up to 8192 wide */

/* One block per row: (ADD: x += y, written back, then) the sum of squares in fp32 (each
 * thread's elements in order, then a tree), then out = x * scale * w. Rows up to
 * NORM_CACHE * NORM_THREADS wide are read once into registers, every load issued before any
 * store: out, x and y may alias, so a loop that stores as it goes waits for each load in turn
 * (16 dependent L2 round trips, ~6 us per 4096-wide row). Wider rows take the plain loops;
 * the sums are the same either way. Each thread rewrites only the elements it read, so out
 * may equal x. */
template <bool ADD, bool BF16>
static __global__ void __launch_bounds__(NORM_THREADS)
    norm_kernel(float *x, const float *y, const float *__restrict__ w, int32_t dim, float eps,
                float *out, __nv_bfloat16 *outb)
{
    kvs_pdl_wait();
    kvs_pdl_trigger(); /* after the wait: see kvs_pdl_trigger */
    __shared__ float warp_sums[NORM_THREADS / 32];
    float *xr = x + (int64_t)blockIdx.x * dim;
    const float *yr = ADD ? y + (int64_t)blockIdx.x * dim : NULL;
    float *o = out + (int64_t)blockIdx.x * dim;
    __nv_bfloat16 *ob = BF16 ? outb + (int64_t)blockIdx.x * dim : NULL;
    const bool cached = dim <= NORM_CACHE * NORM_THREADS;
    float v[NORM_CACHE], wv[NORM_CACHE];
    float s = 0.0f;
    if (cached) {
#pragma unroll
        for (int k = 0; k < NORM_CACHE; k++) {
            const int32_t i = threadIdx.x + k * NORM_THREADS;
            v[k] = 0.0f;
            wv[k] = 0.0f;
            if (i < dim) {
                v[k] = ADD ? xr[i] + yr[i] : xr[i];
                wv[k] = w[i];
            }
        }
#pragma unroll
        for (int k = 0; k < NORM_CACHE; k++) {
            const int32_t i = threadIdx.x + k * NORM_THREADS;
            if (i < dim) {
                if (ADD) {
                    xr[i] = v[k];
                }
                s += v[k] * v[k];
            }
        }
    } else {
        for (int32_t i = threadIdx.x; i < dim; i += NORM_THREADS) {
            float a = xr[i];
            if (ADD) {
                a += yr[i];
                xr[i] = a;
            }
            s += a * a;
        }
    }
    for (int off = 16; off > 0; off >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, off);
    }
    if ((threadIdx.x & 31) == 0) {
        warp_sums[threadIdx.x >> 5] = s;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        s = threadIdx.x < NORM_THREADS / 32 ? warp_sums[threadIdx.x] : 0.0f;
        for (int off = 16; off > 0; off >>= 1) {
            s += __shfl_xor_sync(0xffffffffu, s, off);
        }
        if (threadIdx.x == 0) {
            warp_sums[0] = s;
        }
    }
    __syncthreads();
    const float scale = rsqrtf(warp_sums[0] / (float)dim + eps);
    if (cached) {
#pragma unroll
        for (int k = 0; k < NORM_CACHE; k++) {
            const int32_t i = threadIdx.x + k * NORM_THREADS;
            if (i < dim) {
                const float r = (v[k] * scale) * wv[k];
                o[i] = r;
                if (BF16) {
                    ob[i] = __float2bfloat16_rn(r);
                }
            }
        }
    } else {
        for (int32_t i = threadIdx.x; i < dim; i += NORM_THREADS) {
            const float r = (xr[i] * scale) * w[i];
            o[i] = r;
            if (BF16) {
                ob[i] = __float2bfloat16_rn(r);
            }
        }
    }
}

enum { SITE_RMSNORM = 0x200, SITE_ADD_RMSNORM, SITE_ROPE, SITE_SWIGLU, SITE_ADD, SITE_GATHER,
       SITE_ROPE_STORE, SITE_ROPE_TABLE };

static __global__ void add_kernel(float *x, const float *y, int64_t n);

int kvs_cuda_add_flush(struct kvs_cuda *c, const float *rms_w, int32_t n_rows, int32_t dim,
                       float eps, float *out)
{
    float *x = c->pend_add_x;
    const float *y = c->pend_add_y;
    const int64_t n = c->pend_add_n;
    c->pend_add_x = NULL;
    if (x == NULL) {
        return 0;
    }
    if (rms_w != NULL) {
        const uint64_t args[] = {(uint64_t)(uintptr_t)x,   (uint64_t)(uintptr_t)y,
                                 (uint64_t)(uintptr_t)rms_w, (uint64_t)n_rows,
                                 (uint64_t)dim,             kvs_cuda_fbits(eps),
                                 (uint64_t)(uintptr_t)out};
        if (kvs_cuda_launch_ok(c, SITE_ADD_RMSNORM, args, 7)) {
            CU_TRY(kvs_cuda_launch(c, KVS_CUDA_PART_OTHER, norm_kernel<true, false>,
                                   dim3((unsigned)n_rows), dim3(NORM_THREADS), 0, x, y, rms_w,
                                   dim, eps, out, (__nv_bfloat16 *)NULL));
        }
        return 0;
    }
    const uint64_t args[] = {(uint64_t)(uintptr_t)x, (uint64_t)(uintptr_t)y, (uint64_t)n};
    if (kvs_cuda_launch_ok(c, SITE_ADD, args, 3)) {
        add_kernel<<<kvs_cuda_blocks(n, 256), 256, 0, c->stream>>>(x, y, n);
        CU_LAUNCHED();
    }
    return 0;
}

int kvs_cuda_rmsnorm(kvs_backend *b, const float *x, const float *w, int32_t n_rows,
                     int32_t dim, float eps, float *out)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    assert(x != NULL && w != NULL && out != NULL && n_rows >= 0 && dim > 0);
    if (n_rows == 0) {
        return kvs_cuda_flush(c);
    }
    kvs_cuda_xb_drop(c);
    if (c->pend_add_x == x && c->pend_add_n == (int64_t)n_rows * dim) {
        return kvs_cuda_add_flush(c, w, n_rows, dim, eps, out); /* the held add, fused */
    }
    KVS_TRY(kvs_cuda_flush(c));
    /* rows for a GEMM next (fusion part "gemm"): out in bf16 too, for the matmuls to take
     * (kvs_cuda_xb_of) instead of converting it each */
    __nv_bfloat16 *ob = NULL;
    if ((c->fuse & KVS_CUDA_PART_GEMM) != 0 && n_rows > KVS_CUDA_GEMV_MAX_ROWS) {
        const int64_t n = (int64_t)n_rows * dim;
        KVS_TRY(kvs_cuda_buf_reserve(&c->xb, (size_t)n * sizeof(__nv_bfloat16)));
        ob = (__nv_bfloat16 *)c->xb.p;
        c->xb_src = out;
        c->xb_n = n;
    }
    const uint64_t args[] = {(uint64_t)(uintptr_t)x,   (uint64_t)(uintptr_t)w,
                             (uint64_t)n_rows,         (uint64_t)dim,
                             kvs_cuda_fbits(eps),      (uint64_t)(uintptr_t)out,
                             (uint64_t)(uintptr_t)ob};
    if (!kvs_cuda_launch_ok(c, SITE_RMSNORM, args, 7)) {
        return 0;
    }
    auto kernel = ob != NULL ? norm_kernel<false, true> : norm_kernel<false, false>;
    CU_TRY(kvs_cuda_launch(c, KVS_CUDA_PART_OTHER, kernel, dim3((unsigned)n_rows),
                           dim3(NORM_THREADS), 0, (float *)x, (const float *)NULL, w, dim, eps,
                           out, ob));
    return 0;
}

/* ---- rope ---------------------------------------------------------------------------------- */

/* One thread per (row, head, frequency i), with the CPU backend's arithmetic (llama.cpp's
 * f32 angles): theta = pos * theta_scale^i by repeated f32 multiplication, t = freq_scale *
 * (theta / ff[i]), cosf / sinf, x0' = fma(x0, cos, -(x1 sin)), x1' = fma(x0, sin, x1 cos)
 * with the inner products rounded. (A thread per (row, i) looping over the heads made 32
 * dependent load/store round trips per thread: ~10 us for one decode row's q.) */
/* (cos, sin) of frequency i at position p (the CPU reference's arithmetic). */
static __device__ __forceinline__ float2 rope_cs(int32_t p, int32_t i, const float *__restrict__ ff,
                                                 float theta_scale, float freq_scale)
{
    float theta = (float)p;
    for (int32_t k = 0; k < i; k++) {
        theta = __fmul_rn(theta, theta_scale);
    }
    const float ang = __fmul_rn(freq_scale, __fdiv_rn(theta, ff[i]));
    return make_float2(cosf(ang), sinf(ang));
}

/* Rotate the pair (x0, x1) by the angle whose (cos, sin) is cs. */
static __device__ __forceinline__ void rope_rot(float *x0p, float *x1p, float2 cs)
{
    const float x0 = *x0p, x1 = *x1p;
    *x0p = fmaf(x0, cs.x, -__fmul_rn(x1, cs.y));
    *x1p = fmaf(x0, cs.y, __fmul_rn(x1, cs.x));
}

/* Rotate the pair (x0, x1) of frequency i at position p. */
static __device__ __forceinline__ void rope_pair(float *x0p, float *x1p, int32_t p, int32_t i,
                                                 const float *__restrict__ ff,
                                                 float theta_scale, float freq_scale)
{
    rope_rot(x0p, x1p, rope_cs(p, i, ff, theta_scale, freq_scale));
}

/* cs[r * half + i] = rope_cs(pos[r], i): the angles of a forward's rows, made once for all
 * its layers' rope_store (each thread of rope_kernel otherwise multiplies up to half - 1
 * times and takes cosf / sinf of angles in the tens of thousands: 80 us of a 2048-row layer) */
static __global__ void rope_table_kernel(int32_t n_rows, int32_t half,
                                         const int32_t *__restrict__ pos,
                                         const float *__restrict__ ff, float theta_scale,
                                         float freq_scale, float2 *cs)
{
    kvs_pdl_wait();
    kvs_pdl_trigger(); /* after the wait: see kvs_pdl_trigger */
    const int64_t total = (int64_t)n_rows * half;
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        cs[t] = rope_cs(pos[t / half], (int32_t)(t % half), ff, theta_scale, freq_scale);
    }
}

static __global__ void rope_kernel(float *x, int32_t n_rows, int32_t n_heads, int32_t head_dim,
                                   int32_t half, int32_t neox, const int32_t *__restrict__ pos,
                                   const float *__restrict__ ff, float theta_scale,
                                   float freq_scale)
{
    kvs_pdl_wait();
    kvs_pdl_trigger(); /* after the wait: see kvs_pdl_trigger */
    const int64_t total = (int64_t)n_rows * n_heads * half;
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        int32_t i = (int32_t)(t % half);
        int64_t rh = t / half; /* row * n_heads + head */
        int32_t r = (int32_t)(rh / n_heads);
        int32_t i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
        float *xh = x + rh * head_dim;
        rope_pair(xh + i0, xh + i1, pos[r], i, ff, theta_scale, freq_scale);
    }
}

/* The frequency divisors and positions of a rope call as device arrays, and theta_scale. */
static int rope_prep(struct kvs_cuda *c, const struct kvs_rope *rope, int32_t n_rows,
                     const int32_t *host_pos, const void **d_pos, const void **d_ff,
                     float *theta_scale)
{
    int32_t half = rope->n_dims / 2;
    float *ff = c->rope_ff;
    const struct kvs_rope *k = &c->rope_key;
    if (!c->rope_valid || k->n_dims != rope->n_dims ||
        (k->freq_factors == NULL) != (rope->freq_factors == NULL) ||
        (rope->freq_factors != NULL &&
         memcmp(ff, rope->freq_factors, (size_t)half * sizeof(float)) != 0)) {
        for (int32_t i = 0; i < half; i++) {
            ff[i] = rope->freq_factors != NULL ? rope->freq_factors[i] : 1.0f;
        }
        c->rope_key = *rope;
        c->rope_valid = 1;
        c->rope_ff_gen++;
    }
    *theta_scale = powf(rope->freq_base, -2.0f / (float)rope->n_dims); /* as the CPU */
    KVS_TRY(kvs_cuda_host_array(c, &c->pos, KVS_CUDA_STAGE_POS, host_pos,
                                (size_t)n_rows * sizeof(int32_t), d_pos));
    KVS_TRY(kvs_cuda_host_array(c, &c->freq, KVS_CUDA_STAGE_FREQ, ff,
                                (size_t)half * sizeof(float), d_ff));
    return 0;
}

static bool rope_args_ok(const struct kvs_rope *rope, int32_t head_dim)
{
    return rope->n_dims > 0 && rope->n_dims % 2 == 0 && rope->n_dims <= head_dim &&
           rope->n_dims / 2 <= 512 && /* head_dim <= KVS_HPARAMS_MAX_HEAD_DIM (1024) */
           (rope->style == KVS_ROPE_NORM || rope->style == KVS_ROPE_NEOX);
}

int kvs_cuda_rope(kvs_backend *b, float *x, int32_t n_rows, int32_t n_heads, int32_t head_dim,
                  const int32_t *host_pos, const struct kvs_rope *rope)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    kvs_cuda_xb_drop(c); /* device memory is written */
    assert(x != NULL && rope != NULL && n_rows >= 0 && n_heads > 0);
    if (!rope_args_ok(rope, head_dim)) {
        return KVS_INVALID_ARGUMENT;
    }
    KVS_TRY(kvs_cuda_flush(c));
    if (n_rows == 0) {
        return 0;
    }
    int32_t half = rope->n_dims / 2;
    float theta_scale = 0.0f;
    const void *d_pos = NULL, *d_ff = NULL;
    KVS_TRY(rope_prep(c, rope, n_rows, host_pos, &d_pos, &d_ff, &theta_scale));
    const uint64_t args[] = {(uint64_t)(uintptr_t)x,      (uint64_t)n_rows,
                             (uint64_t)n_heads,           (uint64_t)head_dim,
                             (uint64_t)half,              (uint64_t)rope->style,
                             (uint64_t)(uintptr_t)d_pos, (uint64_t)(uintptr_t)d_ff,
                             kvs_cuda_fbits(theta_scale), kvs_cuda_fbits(rope->freq_scale)};
    if (!kvs_cuda_launch_ok(c, SITE_ROPE, args, 10)) {
        return 0;
    }
    int64_t n = (int64_t)n_rows * n_heads * half;
    CU_TRY(kvs_cuda_launch(c, KVS_CUDA_PART_OTHER, rope_kernel, dim3(kvs_cuda_blocks(n, 128)),
                           dim3(128), 0, x, n_rows, n_heads, head_dim, half,
                           (int32_t)(rope->style == KVS_ROPE_NEOX), (const int32_t *)d_pos,
                           (const float *)d_ff, theta_scale, rope->freq_scale));
    return 0;
}

/* rope q, rope k, store k and v in one launch. Three ranges of threads: (row, q head, i <
 * half) rotates a pair of q; (row, KV head, pair j < head_dim / 2) rotates a pair of k (j <
 * half) or copies two dims past n_dims, and stores the pair in the cache; (row, KV head,
 * dim) stores one element of v. Same arithmetic as rope_kernel and kv_store_kernel. */
struct rope_store_args {
    float *q, *k;
    const float *v;
    const int32_t *row_slot;
    const float2 *cs; /* (n_rows, half) angles (rope_table_kernel) */
    __nv_bfloat16 *kc, *vc;
    int *flag;
    int32_t n_rows, n_head, n_kv_head, head_dim, half, neox, block_size;
    int64_t n_slots;
    size_t layer_off, head_stride, block_stride;
};

static __global__ void rope_store_kernel(rope_store_args a)
{
    kvs_pdl_wait();
    kvs_pdl_trigger(); /* after the wait: see kvs_pdl_trigger */
    const int32_t hd = a.head_dim, hp = hd / 2;
    const int64_t n_q = (int64_t)a.n_rows * a.n_head * a.half;
    const int64_t n_k = (int64_t)a.n_rows * a.n_kv_head * hp;
    const int64_t total = n_q + n_k + (int64_t)a.n_rows * a.n_kv_head * hd;
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        if (t < n_q) {
            const int32_t i = (int32_t)(t % a.half);
            const int64_t rh = t / a.half;
            const int32_t r = (int32_t)(rh / a.n_head);
            const int32_t i0 = a.neox ? i : 2 * i, i1 = a.neox ? i + a.half : 2 * i + 1;
            float *xh = a.q + rh * hd;
            rope_rot(xh + i0, xh + i1, a.cs[(int64_t)r * a.half + i]);
            continue;
        }
        const bool is_k = t < n_q + n_k;
        const int64_t u = is_k ? t - n_q : t - n_q - n_k;
        const int32_t per = is_k ? hp : hd; /* threads per (row, KV head) */
        const int32_t j = (int32_t)(u % per);
        const int64_t rh = u / per; /* row * n_kv_head + head */
        const int32_t r = (int32_t)(rh / a.n_kv_head), h = (int32_t)(rh % a.n_kv_head);
        int32_t i0, i1;
        if (!is_k) {
            i0 = i1 = j;
        } else if (j < a.half) {
            i0 = a.neox ? j : 2 * j;
            i1 = a.neox ? j + a.half : 2 * j + 1;
            float *xh = a.k + rh * hd;
            rope_rot(xh + i0, xh + i1, a.cs[(int64_t)r * a.half + j]);
        } else {
            i0 = 2 * a.half + 2 * (j - a.half);
            i1 = i0 + 1;
        }
        const int32_t slot = a.row_slot[r];
        if (slot < 0 || slot >= a.n_slots) {
            *a.flag = 1;
            continue;
        }
        const size_t base = a.layer_off + (size_t)(slot / a.block_size) * a.block_stride +
                            (size_t)h * a.head_stride + (size_t)(slot % a.block_size) * hd;
        if (is_k) {
            a.kc[base + i0] = __float2bfloat16_rn(a.k[rh * hd + i0]);
            a.kc[base + i1] = __float2bfloat16_rn(a.k[rh * hd + i1]);
        } else {
            a.vc[base + j] = __float2bfloat16_rn(a.v[rh * hd + j]);
        }
    }
}

/* Make c->rope_tab the angles of these rows (rope_table_kernel) unless it already holds them:
 * made in this forward pass (kvs_cuda_graph_begin / _end count passes, so every pass of a
 * forward issues the same launches) for the same positions and parameters. */
static int rope_table(struct kvs_cuda *c, int32_t n_rows, int32_t half, const int32_t *host_pos,
                      const void *d_pos, const void *d_ff, float theta_scale, float freq_scale)
{
    struct kvs_cuda_rope_tab *t = &c->rtab;
    const size_t pb = (size_t)n_rows * sizeof(int32_t);
    if (t->gen == c->fwd_gen && t->n_rows == n_rows && t->half == half && t->d_pos == d_pos &&
        t->d_ff == d_ff && t->ff_gen == c->rope_ff_gen &&
        t->theta_scale == kvs_cuda_fbits(theta_scale) &&
        t->freq_scale == kvs_cuda_fbits(freq_scale) && memcmp(t->pos, host_pos, pb) == 0) {
        return 0;
    }
    if (pb > t->pos_cap) {
        void *h = realloc(t->pos, pb);
        if (h == NULL) {
            return KVS_NO_MEMORY;
        }
        t->pos = (int32_t *)h;
        t->pos_cap = pb;
    }
    t->gen = 0; /* not valid until launched */
    KVS_TRY(kvs_cuda_buf_reserve(&c->rope_tab, (size_t)n_rows * half * sizeof(float2)));
    const uint64_t args[] = {(uint64_t)n_rows,           (uint64_t)half,
                             (uint64_t)(uintptr_t)d_pos, (uint64_t)(uintptr_t)d_ff,
                             kvs_cuda_fbits(theta_scale), kvs_cuda_fbits(freq_scale),
                             (uint64_t)(uintptr_t)c->rope_tab.p};
    if (kvs_cuda_launch_ok(c, SITE_ROPE_TABLE, args, 7)) {
        const int64_t n = (int64_t)n_rows * half;
        CU_TRY(kvs_cuda_launch(c, KVS_CUDA_PART_OTHER, rope_table_kernel,
                               dim3(kvs_cuda_blocks(n, 128)), dim3(128), 0, n_rows, half,
                               (const int32_t *)d_pos, (const float *)d_ff, theta_scale,
                               freq_scale, (float2 *)c->rope_tab.p));
    }
    /* valid for the rest of this pass (a probe counts the launch as the real pass will) */
    memcpy(t->pos, host_pos, pb);
    t->gen = c->fwd_gen;
    t->n_rows = n_rows;
    t->half = half;
    t->d_pos = d_pos;
    t->d_ff = d_ff;
    t->ff_gen = c->rope_ff_gen;
    t->theta_scale = kvs_cuda_fbits(theta_scale);
    t->freq_scale = kvs_cuda_fbits(freq_scale);
    return 0;
}

int kvs_cuda_rope_store(kvs_backend *b, kvs_kv_cache *kv, int32_t layer, float *q,
                        int32_t n_head, float *k, const float *v, int32_t n_kv_head,
                        int32_t head_dim, const int32_t *host_pos, const struct kvs_rope *rope,
                        const struct kvs_attn_batch *ab)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    kvs_cuda_xb_drop(c); /* device memory is written */
    assert(kv != NULL && q != NULL && k != NULL && v != NULL && ab != NULL && rope != NULL);
    const struct kvs_kv_layout *l = &kv->layout;
    /* fusion off (KVS_CUDA_FUSE without "rope"), or a shape the store cannot take: the
     * three ops one by one */
    if ((c->fuse & KVS_CUDA_PART_ROPE) == 0 || n_kv_head != l->n_kv_head ||
        head_dim != l->head_dim || head_dim % 2 != 0) {
        KVS_TRY(kvs_cuda_rope(b, q, ab->n_rows, n_head, head_dim, host_pos, rope));
        KVS_TRY(kvs_cuda_rope(b, k, ab->n_rows, n_kv_head, head_dim, host_pos, rope));
        return kvs_cuda_kv_store(b, kv, layer, k, v, ab);
    }
    if (layer < 0 || layer >= l->n_layer) {
        return KVS_OUT_OF_RANGE;
    }
    if (n_head <= 0 || !rope_args_ok(rope, head_dim)) {
        return KVS_INVALID_ARGUMENT;
    }
    KVS_TRY(kvs_cuda_flush(c));
    if (ab->n_rows == 0) {
        return 0;
    }
    rope_store_args a;
    memset(&a, 0, sizeof a);
    const void *d_pos = NULL, *d_ff = NULL;
    float theta_scale = 0.0f;
    KVS_TRY(rope_prep(c, rope, ab->n_rows, host_pos, &d_pos, &d_ff, &theta_scale));
    a.half = rope->n_dims / 2;
    KVS_TRY(rope_table(c, ab->n_rows, a.half, host_pos, d_pos, d_ff, theta_scale,
                       rope->freq_scale));
    a.q = q;
    a.k = k;
    a.v = v;
    a.cs = (const float2 *)c->rope_tab.p;
    a.row_slot = ab->row_slot;
    a.kc = kv->k;
    a.vc = kv->v;
    a.flag = c->d_flag;
    a.n_rows = ab->n_rows;
    a.n_head = n_head;
    a.n_kv_head = n_kv_head;
    a.head_dim = head_dim;
    a.neox = rope->style == KVS_ROPE_NEOX;
    a.block_size = l->block_size;
    a.n_slots = (int64_t)l->n_block * l->block_size;
    a.layer_off = (size_t)layer * kv->layer_stride;
    a.head_stride = kv->head_stride;
    a.block_stride = kv->block_stride;
    const uint64_t args[] = {(uint64_t)(uintptr_t)q,      (uint64_t)(uintptr_t)k,
                             (uint64_t)(uintptr_t)v,      (uint64_t)a.n_rows,
                             (uint64_t)n_head,            (uint64_t)n_kv_head,
                             (uint64_t)head_dim,          (uint64_t)a.half,
                             (uint64_t)rope->style,       (uint64_t)(uintptr_t)a.cs,
                             (uint64_t)(uintptr_t)ab->row_slot,
                             (uint64_t)(uintptr_t)kv,     (uint64_t)layer};
    if (!kvs_cuda_launch_ok(c, SITE_ROPE_STORE, args, 13)) {
        return 0;
    }
    const int64_t n = (int64_t)a.n_rows * (n_head * a.half + n_kv_head * (head_dim / 2) +
                                           n_kv_head * head_dim);
    CU_TRY(kvs_cuda_launch(c, KVS_CUDA_PART_OTHER, rope_store_kernel,
                           dim3(kvs_cuda_blocks(n, 128)), dim3(128), 0, a));
    return 0;
}

/* ---- element-wise ---------------------------------------------------------------------------- */

static __global__ void swiglu_kernel(const float *gate, const float *up, int64_t n, float *out)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

int kvs_cuda_swiglu(kvs_backend *b, const float *gate, const float *up, int64_t n, float *out)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    kvs_cuda_xb_drop(c); /* device memory is written */
    assert(gate != NULL && up != NULL && out != NULL && n >= 0);
    int fused = kvs_cuda_swiglu_fused(c, gate, up, n, out);
    if (fused != 0) {
        return fused < 0 ? fused : 0;
    }
    KVS_TRY(kvs_cuda_flush(c));
    if (n == 0) {
        return 0;
    }
    const uint64_t args[] = {(uint64_t)(uintptr_t)gate, (uint64_t)(uintptr_t)up, (uint64_t)n,
                             (uint64_t)(uintptr_t)out};
    if (!kvs_cuda_launch_ok(c, SITE_SWIGLU, args, 4)) {
        return 0;
    }
    swiglu_kernel<<<kvs_cuda_blocks(n, 256), 256, 0, c->stream>>>(gate, up, n, out);
    CU_LAUNCHED();
    return 0;
}

static __global__ void add_kernel(float *x, const float *y, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        x[i] += y[i];
    }
}

int kvs_cuda_add(kvs_backend *b, float *x, const float *y, int64_t n)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    kvs_cuda_xb_drop(c); /* device memory is written */
    assert(x != NULL && y != NULL && n >= 0);
    const int into = n > 0 ? kvs_cuda_add_into_gemv(c, x, y, n) : 0;
    if (into != 0) {
        return into < 0 ? into : 0;
    }
    KVS_TRY(kvs_cuda_flush(c));
    if (n == 0) {
        return 0;
    }
    /* held: an rmsnorm of x next joins it */
    c->pend_add_x = x;
    c->pend_add_y = y;
    c->pend_add_n = n;
    return (c->fuse & KVS_CUDA_PART_OTHER) != 0 ? 0 : kvs_cuda_add_flush(c, NULL, 0, 0, 0.0f, NULL);
}

/* out may not overlap x except in place (out == x with idx[i] == i), as on the CPU where the
 * forward gathers into a separate buffer. */
static __global__ void gather_kernel(const float *x, const int32_t *__restrict__ idx, int32_t n,
                                     int32_t dim, float *out)
{
    int64_t total = (int64_t)n * dim;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / dim, d = i % dim;
        out[i] = x[(int64_t)idx[r] * dim + d];
    }
}

int kvs_cuda_gather(kvs_backend *b, const float *x, const int32_t *host_idx, int32_t n,
                    int32_t dim, float *out)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    kvs_cuda_xb_drop(c); /* device memory is written */
    assert(x != NULL && out != NULL && (host_idx != NULL || n == 0) && dim >= 0);
    for (int32_t i = 0; i < n; i++) {
        if (host_idx[i] < 0) {
            return KVS_OUT_OF_RANGE;
        }
    }
    KVS_TRY(kvs_cuda_flush(c));
    if (n == 0 || dim == 0) {
        return 0;
    }
    const void *d_idx = NULL;
    KVS_TRY(kvs_cuda_host_array(c, &c->idx, KVS_CUDA_STAGE_IDX, host_idx,
                                (size_t)n * sizeof(int32_t), &d_idx));
    const uint64_t args[] = {(uint64_t)(uintptr_t)x, (uint64_t)(uintptr_t)d_idx, (uint64_t)n,
                             (uint64_t)dim, (uint64_t)(uintptr_t)out};
    if (!kvs_cuda_launch_ok(c, SITE_GATHER, args, 5)) {
        return 0;
    }
    int64_t total = (int64_t)n * dim;
    gather_kernel<<<kvs_cuda_blocks(total, 256), 256, 0, c->stream>>>(
        x, (const int32_t *)d_idx, n, dim, out);
    CU_LAUNCHED();
    return 0;
}
