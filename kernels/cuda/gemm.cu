/* matmul: y (n_rows, n_out) = x (n_rows, n_in) W^T (+ bias), W bf16 (n_out, n_in) on the device.
 *
 * Few rows (decode): a GEMV kernel bound by reading W once, one warp per output, 16-byte
 * loads of W, x read in f32, fp32 accumulation. GEMV matmuls are held back (fuse.cu): those
 * reading one x launch together, and gate/up launch fused with the swiglu that follows; they
 * start early (programmatic dependent launch) and prefetch their first weights. More rows: x
 * is rounded to bf16 into scratch (or taken from the bf16 copy rmsnorm wrote beside its
 * output, kvs_cuda_xb_of) and cuBLAS does the GEMM (bf16 operands, fp32 compute, f32
 * output); the bias is added after. In cuBLAS's column-major terms: Y^T (n_out, n_rows) = W
 * (as (n_in, n_out))^T X^T.
 *
 * The optional ops matmul_add and ffn (kernels/backend.h) on the GEMM path (fusion part
 * "gemm", on by default): the output and down projections accumulate into the residual
 * stream inside the GEMM (beta = 1, f32 C), and the feed-forward block stays in bf16 between
 * its GEMMs (gate and up written as bf16, swiglu bf16 -> bf16 straight into the down GEMM's
 * operand): per layer of a 2048-row chunk of the 8B shape ~0.8 GB less f32 traffic and five
 * element-wise kernels fewer. Few rows: the ops the forward would issue, fused as above. */
#include "kernels/cuda/cuda_impl.h"

#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GEMV_WARPS 8 /* outputs per block */

/* Matmuls of one GEMV launch: all read the same x; job j owns blocks [first[j], first[j+1]). */
struct gemv_jobs {
    const __nv_bfloat16 *W[KVS_CUDA_MAX_PEND_MM];
    const float *bias[KVS_CUDA_MAX_PEND_MM];
    float *y[KVS_CUDA_MAX_PEND_MM];
    int64_t n_out[KVS_CUDA_MAX_PEND_MM];
    int64_t first[KVS_CUDA_MAX_PEND_MM + 1];
    float *res; /* n == 1: a residual stream that the outputs are added to (res += y), or NULL */
    int n;
};

/* acc[r] += row . x_r over the lane's 16-byte chunks (ch = lane, lane + 32, ...). */
template <int R>
static __device__ __forceinline__ void gemv_dot(const uint4 *__restrict__ wr,
                                                const float *__restrict__ x, int64_t n_in,
                                                int lane, float (&acc)[R])
{
    const int64_t nc = n_in / 8; /* 16-byte chunks of 8 weights */
#pragma unroll 4
    for (int64_t ch = lane; ch < nc; ch += 32) {
        uint4 wv = __ldg(wr + ch);
        const __nv_bfloat162 *w2 = (const __nv_bfloat162 *)&wv;
        float2 f0 = __bfloat1622float2(w2[0]), f1 = __bfloat1622float2(w2[1]);
        float2 f2 = __bfloat1622float2(w2[2]), f3 = __bfloat1622float2(w2[3]);
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float4 *xr = (const float4 *)(x + r * n_in) + ch * 2;
            float4 a = __ldg(xr), b = __ldg(xr + 1);
            acc[r] += f0.x * a.x + f0.y * a.y + f1.x * a.z + f1.y * a.w + f2.x * b.x +
                      f2.y * b.y + f3.x * b.z + f3.y * b.w;
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        for (int off = 16; off > 0; off >>= 1) {
            acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
        }
    }
}

/* Before kvs_pdl_wait: pull the first bytes of a warp's weight rows into L2 while the kernel
 * before finishes (the weights do not depend on it). 2 KiB per row: the resident warps of
 * one wave then prefetch ~17 MB, well inside L2. */
static __device__ __forceinline__ void prefetch_row(const __nv_bfloat16 *row, int64_t n_in,
                                                    int lane)
{
    const int64_t bytes = n_in * 2 < 2048 ? n_in * 2 : 2048;
    if (lane * 128 < bytes) {
        asm volatile("prefetch.global.L2 [%0];" ::"l"((const char *)row + lane * 128));
    }
}

/* Two outputs per warp, one row: both weight rows stream together (twice the loads in flight
 * per lane) and each x chunk is loaded once for both. Sums in gemv_dot's order. */
static __device__ __forceinline__ void gemv_dot2(const uint4 *__restrict__ w0,
                                                 const uint4 *__restrict__ w1,
                                                 const float *__restrict__ x, int64_t n_in,
                                                 int lane, float &a0, float &a1)
{
    const int64_t nc = n_in / 8;
#pragma unroll 4
    for (int64_t ch = lane; ch < nc; ch += 32) {
        uint4 v0 = __ldg(w0 + ch), v1 = __ldg(w1 + ch);
        const float4 *xr = (const float4 *)x + ch * 2;
        float4 a = __ldg(xr), b = __ldg(xr + 1);
        const __nv_bfloat162 *p = (const __nv_bfloat162 *)&v0;
        float2 f0 = __bfloat1622float2(p[0]), f1 = __bfloat1622float2(p[1]);
        float2 f2 = __bfloat1622float2(p[2]), f3 = __bfloat1622float2(p[3]);
        a0 += f0.x * a.x + f0.y * a.y + f1.x * a.z + f1.y * a.w + f2.x * b.x + f2.y * b.y +
              f3.x * b.z + f3.y * b.w;
        p = (const __nv_bfloat162 *)&v1;
        f0 = __bfloat1622float2(p[0]);
        f1 = __bfloat1622float2(p[1]);
        f2 = __bfloat1622float2(p[2]);
        f3 = __bfloat1622float2(p[3]);
        a1 += f0.x * a.x + f0.y * a.y + f1.x * a.z + f1.y * a.w + f2.x * b.x + f2.y * b.y +
              f3.x * b.z + f3.y * b.w;
    }
    for (int off = 16; off > 0; off >>= 1) {
        a0 += __shfl_xor_sync(0xffffffffu, a0, off);
        a1 += __shfl_xor_sync(0xffffffffu, a1, off);
    }
}

/* Variant (KVS_CUDA_GEMV=rpw2): one row, two consecutive outputs of one of J's matmuls per
 * warp (2 * GEMV_WARPS outputs per block). */
static __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv2_kernel(gemv_jobs J, const float *__restrict__ x, int64_t n_in)
{
    kvs_pdl_trigger();
    const int lane = threadIdx.x & 31;
    const int64_t blk = blockIdx.x;
    const int j = J.n > 1 && blk >= J.first[1] ? (J.n > 2 && blk >= J.first[2] ? 2 : 1) : 0;
    const __nv_bfloat16 *W = j == 0 ? J.W[0] : j == 1 ? J.W[1] : J.W[2];
    const float *bias = j == 0 ? J.bias[0] : j == 1 ? J.bias[1] : J.bias[2];
    float *y = j == 0 ? J.y[0] : j == 1 ? J.y[1] : J.y[2];
    const int64_t n_out = j == 0 ? J.n_out[0] : j == 1 ? J.n_out[1] : J.n_out[2];
    const int64_t first = j == 0 ? J.first[0] : j == 1 ? J.first[1] : J.first[2];
    const int64_t o = ((blk - first) * GEMV_WARPS + (threadIdx.x >> 5)) * 2;
    if (o >= n_out) {
        return;
    }
    const int64_t o1 = o + 1 < n_out ? o + 1 : o; /* an odd last output is computed twice */
    prefetch_row(W + o * n_in, n_in, lane);
    prefetch_row(W + o1 * n_in, n_in, lane);
    kvs_pdl_wait();
    float a0 = 0.0f, a1 = 0.0f;
    gemv_dot2((const uint4 *)(W + o * n_in), (const uint4 *)(W + o1 * n_in), x, n_in, lane, a0,
              a1);
    if (lane == 0) {
        const float y0 = a0 + (bias != NULL ? bias[o] : 0.0f);
        const float y1 = a1 + (bias != NULL ? bias[o1] : 0.0f);
        y[o] = y0;
        y[o1] = y1;
        if (J.res != NULL) {
            J.res[o] += y0;
            if (o1 != o) {
                J.res[o1] += y1;
            }
        }
    }
}

/* One warp per output of one of J's matmuls. */
template <int R>
static __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_kernel(gemv_jobs J, const float *__restrict__ x, int64_t n_in)
{
    kvs_pdl_trigger();
    const int lane = threadIdx.x & 31;
    const int64_t blk = blockIdx.x;
    const int j = J.n > 1 && blk >= J.first[1] ? (J.n > 2 && blk >= J.first[2] ? 2 : 1) : 0;
    const __nv_bfloat16 *W = j == 0 ? J.W[0] : j == 1 ? J.W[1] : J.W[2];
    const float *bias = j == 0 ? J.bias[0] : j == 1 ? J.bias[1] : J.bias[2];
    float *y = j == 0 ? J.y[0] : j == 1 ? J.y[1] : J.y[2];
    const int64_t n_out = j == 0 ? J.n_out[0] : j == 1 ? J.n_out[1] : J.n_out[2];
    const int64_t first = j == 0 ? J.first[0] : j == 1 ? J.first[1] : J.first[2];
    const int64_t o = (blk - first) * GEMV_WARPS + (threadIdx.x >> 5);
    if (o >= n_out) {
        return;
    }
    prefetch_row(W + o * n_in, n_in, lane);
    kvs_pdl_wait(); /* x is the previous kernel's output */
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        acc[r] = 0.0f;
    }
    gemv_dot<R>((const uint4 *)(W + o * n_in), x, n_in, lane, acc);
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float v = acc[r] + (bias != NULL ? bias[o] : 0.0f);
            y[r * n_out + o] = v;
            if (J.res != NULL) {
                J.res[r * n_out + o] += v; /* add_kernel's x += y, the same bits */
            }
        }
    }
}

/* gate and up for output o in one warp (both rows stream together), then swiglu: out =
 * silu(g) * u as swiglu_kernel computes it; gate and up are written too unless out is them. */
template <int R>
static __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_swiglu_kernel(const __nv_bfloat16 *__restrict__ Wg, const __nv_bfloat16 *__restrict__ Wu,
                       const float *__restrict__ x, int64_t n_in, int64_t n_out, float *gate,
                       float *up, float *out)
{
    kvs_pdl_trigger();
    const int lane = threadIdx.x & 31;
    const int64_t o = (int64_t)blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (o >= n_out) {
        return;
    }
    prefetch_row(Wg + o * n_in, n_in, lane);
    prefetch_row(Wu + o * n_in, n_in, lane);
    kvs_pdl_wait();
    float g[R], u[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        g[r] = 0.0f;
        u[r] = 0.0f;
    }
    gemv_dot<R>((const uint4 *)(Wg + o * n_in), x, n_in, lane, g);
    gemv_dot<R>((const uint4 *)(Wu + o * n_in), x, n_in, lane, u);
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int64_t i = r * n_out + o;
            if (gate != out) {
                gate[i] = g[r];
            }
            if (up != out) {
                up[i] = u[r];
            }
            out[i] = g[r] / (1.0f + expf(-g[r])) * u[r];
        }
    }
}

enum { SITE_GEMV = 0x100, SITE_GEMV_SWIGLU, SITE_GEMM, SITE_GEMM_ADD, SITE_FFN };

/* Launch a GEMV kernel, with programmatic dependent launch when c->pdl (fuse.cu). */
template <typename K, typename... Args>
static cudaError_t launch_gemv(struct kvs_cuda *c, K kernel, dim3 grid, Args... args)
{
    return kvs_cuda_launch(c, KVS_CUDA_PART_GEMV, kernel, grid, dim3(GEMV_WARPS * 32), 0, args...);
}

int kvs_cuda_gemv_flush(struct kvs_cuda *c, float *swiglu_out)
{
    const int n = c->n_pend_mm;
    const int32_t R = c->pend_rows;
    const float *x = c->pend_x;
    const int64_t n_in = c->pend_n_in;
    c->n_pend_mm = 0;
    if (n == 0) {
        return 0;
    }
    assert(R >= 1 && R <= KVS_CUDA_GEMV_MAX_ROWS);
    if (swiglu_out != NULL) {
        const struct kvs_cuda_mm *g = &c->pend_mm[0], *u = &c->pend_mm[1];
        assert(n == 2 && g->n_out == u->n_out && g->bias == NULL && u->bias == NULL);
        const uint64_t args[] = {(uint64_t)(uintptr_t)g->W, (uint64_t)(uintptr_t)u->W,
                                 (uint64_t)(uintptr_t)x,    (uint64_t)n_in,
                                 (uint64_t)g->n_out,        (uint64_t)(uintptr_t)g->y,
                                 (uint64_t)(uintptr_t)u->y, (uint64_t)(uintptr_t)swiglu_out,
                                 (uint64_t)R};
        if (!kvs_cuda_launch_ok(c, SITE_GEMV_SWIGLU, args, 9)) {
            return 0;
        }
        const dim3 grid((unsigned)((g->n_out + GEMV_WARPS - 1) / GEMV_WARPS));
        switch (R) {
#define CASE(RR)                                                                           \
    case RR:                                                                               \
        CU_TRY(launch_gemv(c, gemv_swiglu_kernel<RR>, grid, g->W, u->W, x, n_in, g->n_out,   \
                           g->y, u->y, swiglu_out));                                          \
        break;
            CASE(1)
            CASE(2)
            CASE(3)
            CASE(4)
            CASE(5)
            CASE(6)
            CASE(7)
            CASE(8)
#undef CASE
        default:
            return KVS_INVALID_ARGUMENT;
        }
        CU_LAUNCHED();
        return 0;
    }
    /* KVS_CUDA_GEMV=rpw2: two outputs per warp for one-row GEMVs (variant under test) */
    const int rpw = R == 1 && c->env_gemv_rpw2 ? 2 : 1;
    gemv_jobs J;
    memset(&J, 0, sizeof J);
    J.n = n;
    J.res = c->pend_res; /* set by kvs_cuda_add_into_gemv for one held matmul */
    c->pend_res = NULL;
    uint64_t args[4 * KVS_CUDA_MAX_PEND_MM + 5];
    int na = 0;
    for (int j = 0; j < n; j++) {
        const struct kvs_cuda_mm *m = &c->pend_mm[j];
        J.W[j] = m->W;
        J.bias[j] = m->bias;
        J.y[j] = m->y;
        J.n_out[j] = m->n_out;
        J.first[j + 1] = J.first[j] + (m->n_out + GEMV_WARPS * rpw - 1) / (GEMV_WARPS * rpw);
        args[na++] = (uint64_t)(uintptr_t)m->W;
        args[na++] = (uint64_t)(uintptr_t)m->bias;
        args[na++] = (uint64_t)(uintptr_t)m->y;
        args[na++] = (uint64_t)m->n_out;
    }
    args[na++] = (uint64_t)(uintptr_t)x;
    args[na++] = (uint64_t)n_in;
    args[na++] = (uint64_t)R;
    args[na++] = (uint64_t)rpw;
    args[na++] = (uint64_t)(uintptr_t)J.res;
    if (!kvs_cuda_launch_ok(c, SITE_GEMV, args, na)) {
        return 0;
    }
    const dim3 grid((unsigned)J.first[n]);
    if (rpw == 2) {
        CU_TRY(launch_gemv(c, gemv2_kernel, grid, J, x, n_in));
        return 0;
    }
    switch (R) {
#define CASE(RR)                                                                           \
    case RR:                                                                               \
        CU_TRY(launch_gemv(c, gemv_kernel<RR>, grid, J, x, n_in));                          \
        break;
        CASE(1)
        CASE(2)
        CASE(3)
        CASE(4)
        CASE(5)
        CASE(6)
        CASE(7)
        CASE(8)
#undef CASE
    default:
        return KVS_INVALID_ARGUMENT;
    }
    CU_LAUNCHED();
    return 0;
}

/* Hold a GEMV matmul back (joining the held ones when it reads the same x), or launch it
 * now when holding is off. */
static int gemv_hold(struct kvs_cuda *c, const __nv_bfloat16 *W, const float *x, int32_t n_rows,
                     int64_t n_in, int64_t n_out, const float *bias, float *y)
{
    if (c->pend_add_x != NULL) {
        KVS_TRY(kvs_cuda_add_flush(c, NULL, 0, 0, 0.0f, NULL));
    }
    bool join = c->n_pend_mm > 0 && c->n_pend_mm < KVS_CUDA_MAX_PEND_MM && c->pend_x == x &&
                c->pend_rows == n_rows && c->pend_n_in == n_in && (const float *)y != x;
    for (int j = 0; join && j < c->n_pend_mm; j++) {
        join = c->pend_mm[j].y != y; /* a later matmul overwriting an earlier output */
    }
    if (!join) {
        KVS_TRY(kvs_cuda_flush(c));
    }
    struct kvs_cuda_mm *m = &c->pend_mm[c->n_pend_mm++];
    m->W = W;
    m->bias = bias;
    m->y = y;
    m->n_out = n_out;
    c->pend_x = x;
    c->pend_rows = n_rows;
    c->pend_n_in = n_in;
    return (c->fuse & KVS_CUDA_PART_GEMV) != 0 ? 0 : kvs_cuda_gemv_flush(c, NULL);
}

/* swiglu(gate, up, n, out) right after the two GEMV matmuls that wrote gate and up: one
 * fused launch. Returns 1 when it took the op, 0 when the caller must run it. */
int kvs_cuda_swiglu_fused(struct kvs_cuda *c, const float *gate, const float *up, int64_t n,
                          float *out)
{
    if (c->n_pend_mm != 2) {
        return 0;
    }
    const struct kvs_cuda_mm *g = &c->pend_mm[0], *u = &c->pend_mm[1];
    if (g->y != gate || u->y != up || g->n_out != u->n_out || g->bias != NULL ||
        u->bias != NULL || n != (int64_t)c->pend_rows * g->n_out ||
        (out != gate && out != up && (out < up + n && up < out + n))) {
        return 0;
    }
    if (out != gate && out != up && out < gate + n && gate < out + n) {
        return 0; /* partial overlaps: the unfused order */
    }
    KVS_TRY(kvs_cuda_gemv_flush(c, out));
    return 1;
}

/* out = bf16(x), 4 elements a thread when VEC (x 16-byte and out 8-byte aligned, n % 4 == 0) */
template <bool VEC>
static __global__ void to_bf16_kernel(const float *__restrict__ x, int64_t n,
                                      __nv_bfloat16 *__restrict__ out)
{
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (VEC) {
        for (; i < n / 4; i += step) {
            const float4 v = ((const float4 *)x)[i];
            __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y);
            __nv_bfloat162 hi = __floats2bfloat162_rn(v.z, v.w);
            uint2 packed;
            memcpy(&packed.x, &lo, 4);
            memcpy(&packed.y, &hi, 4);
            ((uint2 *)out)[i] = packed;
        }
    } else {
        for (; i < n; i += step) {
            out[i] = __float2bfloat16_rn(x[i]);
        }
    }
}

static void launch_to_bf16(struct kvs_cuda *c, const float *x, int64_t n, __nv_bfloat16 *out)
{
    if (n % 4 == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)out % 8 == 0) {
        to_bf16_kernel<true><<<kvs_cuda_blocks(n / 4, 256), 256, 0, c->stream>>>(x, n, out);
    } else {
        to_bf16_kernel<false><<<kvs_cuda_blocks(n, 256), 256, 0, c->stream>>>(x, n, out);
    }
}

/* out = silu(g) * u on bf16 operands (f32 arithmetic, rounded once), 8 elements a thread;
 * out may equal g or u. n % 8 == 0, all 16-byte aligned (the caller checks). */
static __global__ void swiglu_bf16_kernel(const __nv_bfloat16 *g, const __nv_bfloat16 *u,
                                          int64_t n8, __nv_bfloat16 *out)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n8;
         i += (int64_t)gridDim.x * blockDim.x) {
        const uint4 gv = ((const uint4 *)g)[i], uv = ((const uint4 *)u)[i];
        const __nv_bfloat162 *g2 = (const __nv_bfloat162 *)&gv, *u2 = (const __nv_bfloat162 *)&uv;
        uint4 ov;
        __nv_bfloat162 *o2 = (__nv_bfloat162 *)&ov;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const float2 a = __bfloat1622float2(g2[k]), b = __bfloat1622float2(u2[k]);
            o2[k] = __floats2bfloat162_rn(a.x / (1.0f + expf(-a.x)) * b.x,
                                          a.y / (1.0f + expf(-a.y)) * b.y);
        }
        ((uint4 *)out)[i] = ov;
    }
}

static __global__ void add_bias_kernel(float *__restrict__ y, const float *__restrict__ bias,
                                       int64_t n_out, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        y[i] += bias[i % n_out];
    }
}

/* Whether a matmul of n_rows rows of x takes the GEMV path (else cuBLAS). */
static bool gemv_path(const struct kvs_weight *w, const float *x, int32_t n_rows)
{
    return n_rows <= KVS_CUDA_GEMV_MAX_ROWS && w->n_in % 8 == 0 && (uintptr_t)x % 16 == 0;
}

/* The bf16 operand of a GEMM reading x (n elements): the copy c->xb holds when it is x's
 * (*convert = false), else c->xb to be converted into (*convert = true), which then stands
 * for x (fusion part "gemm"; without it every GEMM converts and nothing is kept). */
static int gemm_operand(struct kvs_cuda *c, const float *x, int64_t n, __nv_bfloat16 **xb,
                        bool *convert)
{
    const bool keep = (c->fuse & KVS_CUDA_PART_GEMM) != 0;
    if (keep && kvs_cuda_xb_of(c, x, n) != NULL) {
        *xb = (__nv_bfloat16 *)c->xb.p;
        *convert = false;
        return 0;
    }
    kvs_cuda_xb_drop(c);
    KVS_TRY(kvs_cuda_buf_reserve(&c->xb, (size_t)n * sizeof(__nv_bfloat16)));
    *xb = (__nv_bfloat16 *)c->xb.p;
    *convert = true;
    if (keep) {
        c->xb_src = x;
        c->xb_n = n;
    }
    return 0;
}

/* Y^T (n_out, n_rows) = W X^T + beta Y^T in cuBLAS's terms; y of type yt (f32 or bf16). */
static int gemm(struct kvs_cuda *c, const __nv_bfloat16 *W, int64_t n_out, int64_t n_in,
                const __nv_bfloat16 *xb, int32_t n_rows, void *y, cudaDataType_t yt, float beta)
{
    const float one = 1.0f;
    CUBLAS_TRY(cublasGemmEx(c->cublas, CUBLAS_OP_T, CUBLAS_OP_N, (int)n_out, n_rows, (int)n_in,
                            &one, W, CUDA_R_16BF, (int)n_in, xb, CUDA_R_16BF, (int)n_in, &beta, y,
                            yt, (int)n_out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return 0;
}

static bool overlaps(const void *a, size_t an, const void *b, size_t bn)
{
    return (const char *)a < (const char *)b + bn && (const char *)b < (const char *)a + an;
}

int kvs_cuda_matmul(kvs_backend *b, const struct kvs_weight *w, const float *x, int32_t n_rows,
                    const float *bias, float *y)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    assert(w != NULL && w->data != NULL && x != NULL && y != NULL && n_rows >= 0);
    if (n_rows == 0) {
        return 0;
    }
    const __nv_bfloat16 *W = (const __nv_bfloat16 *)w->data;
    if (c->xb_src != NULL && overlaps(y, (size_t)n_rows * w->n_out * 4, c->xb_src,
                                      (size_t)c->xb_n * 4)) {
        kvs_cuda_xb_drop(c);
    }
    if (gemv_path(w, x, n_rows)) {
        return gemv_hold(c, W, x, n_rows, w->n_in, w->n_out, bias, y);
    }
    KVS_TRY(kvs_cuda_flush(c));
    if (w->n_in > INT32_MAX || w->n_out > INT32_MAX) {
        return KVS_TOO_LARGE;
    }
    int64_t nx = (int64_t)n_rows * w->n_in;
    __nv_bfloat16 *xb = NULL;
    bool convert = true;
    KVS_TRY(gemm_operand(c, x, nx, &xb, &convert));
    const uint64_t args[] = {(uint64_t)(uintptr_t)W,    (uint64_t)(uintptr_t)x,
                             (uint64_t)(uintptr_t)xb,   (uint64_t)(uintptr_t)y,
                             (uint64_t)(uintptr_t)bias, (uint64_t)n_rows,
                             (uint64_t)w->n_in,         (uint64_t)w->n_out,
                             (uint64_t)convert};
    if (!kvs_cuda_launch_ok(c, SITE_GEMM, args, 9)) {
        return 0;
    }
    if (convert) {
        launch_to_bf16(c, x, nx, xb);
        CU_LAUNCHED();
    }
    KVS_TRY(gemm(c, W, w->n_out, w->n_in, xb, n_rows, y, CUDA_R_32F, 0.0f));
    if (bias != NULL) {
        int64_t ny = (int64_t)n_rows * w->n_out;
        add_bias_kernel<<<kvs_cuda_blocks(ny, 256), 256, 0, c->stream>>>(y, bias, w->n_out, ny);
        CU_LAUNCHED();
    }
    return 0;
}

int kvs_cuda_matmul_add(kvs_backend *b, const struct kvs_weight *w, const float *x,
                        int32_t n_rows, float *tmp, float *y)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    assert(w != NULL && w->data != NULL && x != NULL && tmp != NULL && y != NULL);
    if (n_rows <= 0 || gemv_path(w, x, n_rows) || (c->fuse & KVS_CUDA_PART_GEMM) == 0) {
        KVS_TRY(kvs_cuda_matmul(b, w, x, n_rows, NULL, tmp));
        return kvs_cuda_add(b, y, tmp, (int64_t)n_rows * w->n_out);
    }
    KVS_TRY(kvs_cuda_flush(c));
    if (w->n_in > INT32_MAX || w->n_out > INT32_MAX) {
        return KVS_TOO_LARGE;
    }
    const int64_t nx = (int64_t)n_rows * w->n_in;
    __nv_bfloat16 *xb = NULL;
    bool convert = true;
    KVS_TRY(gemm_operand(c, x, nx, &xb, &convert));
    kvs_cuda_xb_drop(c); /* y is written (the residual stream, read by the next rmsnorm) */
    const __nv_bfloat16 *W = (const __nv_bfloat16 *)w->data;
    const uint64_t args[] = {(uint64_t)(uintptr_t)W,  (uint64_t)(uintptr_t)x,
                             (uint64_t)(uintptr_t)xb, (uint64_t)(uintptr_t)y,
                             (uint64_t)n_rows,        (uint64_t)w->n_in,
                             (uint64_t)w->n_out,      (uint64_t)convert};
    if (!kvs_cuda_launch_ok(c, SITE_GEMM_ADD, args, 8)) {
        return 0;
    }
    if (convert) {
        launch_to_bf16(c, x, nx, xb);
        CU_LAUNCHED();
    }
    return gemm(c, W, w->n_out, w->n_in, xb, n_rows, y, CUDA_R_32F, 1.0f);
}

int kvs_cuda_ffn(kvs_backend *b, const struct kvs_weight *w_gate, const struct kvs_weight *w_up,
                 const struct kvs_weight *w_down, const float *h, int32_t n_rows, float *gate,
                 float *up, float *tmp, float *x)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    const int64_t E = w_gate->n_in, FF = w_gate->n_out;
    assert(w_up->n_in == E && w_up->n_out == FF && w_down->n_in == FF && w_down->n_out == E);
    assert(h != NULL && gate != NULL && up != NULL && tmp != NULL && x != NULL);
    const int64_t nf = (int64_t)n_rows * FF;
    if (n_rows <= 0 || gemv_path(w_gate, h, n_rows) || (c->fuse & KVS_CUDA_PART_GEMM) == 0 ||
        nf % 8 != 0 || (uintptr_t)gate % 16 != 0 || (uintptr_t)up % 16 != 0) {
        KVS_TRY(kvs_cuda_matmul(b, w_gate, h, n_rows, NULL, gate));
        KVS_TRY(kvs_cuda_matmul(b, w_up, h, n_rows, NULL, up));
        KVS_TRY(kvs_cuda_swiglu(b, gate, up, nf, gate));
        KVS_TRY(kvs_cuda_matmul(b, w_down, gate, n_rows, NULL, tmp));
        return kvs_cuda_add(b, x, tmp, (int64_t)n_rows * E);
    }
    KVS_TRY(kvs_cuda_flush(c));
    if (E > INT32_MAX || FF > INT32_MAX) {
        return KVS_TOO_LARGE;
    }
    __nv_bfloat16 *hb = NULL;
    bool convert = true;
    KVS_TRY(gemm_operand(c, h, (int64_t)n_rows * E, &hb, &convert));
    kvs_cuda_xb_drop(c); /* x is written */
    /* gate and up as bf16 in the first half of their f32 buffers; swiglu in place in gate */
    __nv_bfloat16 *G = (__nv_bfloat16 *)gate, *U = (__nv_bfloat16 *)up;
    const __nv_bfloat16 *Wg = (const __nv_bfloat16 *)w_gate->data;
    const __nv_bfloat16 *Wu = (const __nv_bfloat16 *)w_up->data;
    const __nv_bfloat16 *Wd = (const __nv_bfloat16 *)w_down->data;
    const uint64_t args[] = {(uint64_t)(uintptr_t)Wg, (uint64_t)(uintptr_t)Wu,
                             (uint64_t)(uintptr_t)Wd, (uint64_t)(uintptr_t)h,
                             (uint64_t)(uintptr_t)hb, (uint64_t)(uintptr_t)G,
                             (uint64_t)(uintptr_t)U,  (uint64_t)(uintptr_t)x,
                             (uint64_t)n_rows,        (uint64_t)E,
                             (uint64_t)FF,            (uint64_t)convert};
    if (!kvs_cuda_launch_ok(c, SITE_FFN, args, 12)) {
        return 0;
    }
    if (convert) {
        launch_to_bf16(c, h, (int64_t)n_rows * E, hb);
        CU_LAUNCHED();
    }
    KVS_TRY(gemm(c, Wg, FF, E, hb, n_rows, G, CUDA_R_16BF, 0.0f));
    KVS_TRY(gemm(c, Wu, FF, E, hb, n_rows, U, CUDA_R_16BF, 0.0f));
    swiglu_bf16_kernel<<<kvs_cuda_blocks(nf / 8, 256), 256, 0, c->stream>>>(G, U, nf / 8, G);
    CU_LAUNCHED();
    return gemm(c, Wd, E, FF, G, n_rows, x, CUDA_R_32F, 1.0f);
}

/* x += y right after the one held GEMV matmul that writes y: the GEMV adds its outputs to x
 * as it writes them (the residual adds of a decode step, one kernel less each). 1 = done, 0 =
 * not applicable (the caller runs the add). */
int kvs_cuda_add_into_gemv(struct kvs_cuda *c, float *x, const float *y, int64_t n)
{
    if ((c->fuse & KVS_CUDA_PART_GEMV) == 0 || c->n_pend_mm != 1 || c->pend_mm[0].y != y ||
        n != (int64_t)c->pend_rows * c->pend_mm[0].n_out || x == y || x == c->pend_x) {
        return 0;
    }
    c->pend_res = x;
    KVS_TRY(kvs_cuda_gemv_flush(c, NULL));
    return 1;
}
