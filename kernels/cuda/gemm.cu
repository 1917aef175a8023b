/* matmul: y (n_rows, n_out) = x (n_rows, n_in) W^T (+ bias), W bf16 (n_out, n_in) on the device.
 *
 * Few rows (decode): a GEMV kernel bound by reading W once, one warp per output, 16-byte
 * loads of W, x read in f32, fp32 accumulation. More rows: x is rounded to bf16 into scratch
 * and cuBLAS does the GEMM (bf16 operands, fp32 compute, f32 output); the bias is added
 * after. In cuBLAS's column-major terms: Y^T (n_out, n_rows) = W (as (n_in, n_out))^T X^T. */
#include "kernels/cuda/cuda_impl.h"

#include <assert.h>
#include <stdint.h>

#define GEMV_WARPS 8 /* outputs per block */

template <int R>
static __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_kernel(const __nv_bfloat16 *__restrict__ W, const float *__restrict__ x, int64_t n_in,
                int64_t n_out, const float *__restrict__ bias, float *__restrict__ y)
{
    const int lane = threadIdx.x & 31;
    const int64_t o = (int64_t)blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (o >= n_out) {
        return;
    }
    const uint4 *wr = (const uint4 *)(W + o * n_in);
    const int64_t nc = n_in / 8; /* 16-byte chunks of 8 weights */
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        acc[r] = 0.0f;
    }
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
        float s = acc[r];
        for (int off = 16; off > 0; off >>= 1) {
            s += __shfl_xor_sync(0xffffffffu, s, off);
        }
        if (lane == 0) {
            y[r * n_out + o] = s + (bias != NULL ? bias[o] : 0.0f);
        }
    }
}

static int gemv(cudaStream_t s, const __nv_bfloat16 *W, const float *x, int32_t n_rows,
                int64_t n_in, int64_t n_out, const float *bias, float *y)
{
    dim3 grid((unsigned)((n_out + GEMV_WARPS - 1) / GEMV_WARPS)), block(GEMV_WARPS * 32);
    switch (n_rows) {
#define CASE(R)                                                                            \
    case R:                                                                                \
        gemv_kernel<R><<<grid, block, 0, s>>>(W, x, n_in, n_out, bias, y);                 \
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

static __global__ void to_bf16_kernel(const float *__restrict__ x, int64_t n,
                                      __nv_bfloat16 *__restrict__ out)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        out[i] = __float2bfloat16_rn(x[i]);
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

int kvs_cuda_matmul(kvs_backend *b, const struct kvs_weight *w, const float *x, int32_t n_rows,
                    const float *bias, float *y)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    assert(w != NULL && w->data != NULL && x != NULL && y != NULL && n_rows >= 0);
    if (n_rows == 0) {
        return 0;
    }
    const __nv_bfloat16 *W = (const __nv_bfloat16 *)w->data;
    if (n_rows <= KVS_CUDA_GEMV_MAX_ROWS && w->n_in % 8 == 0 && (uintptr_t)x % 16 == 0) {
        return gemv(c->stream, W, x, n_rows, w->n_in, w->n_out, bias, y);
    }
    if (w->n_in > INT32_MAX || w->n_out > INT32_MAX) {
        return KVS_TOO_LARGE;
    }
    int64_t nx = (int64_t)n_rows * w->n_in;
    KVS_TRY(kvs_cuda_buf_reserve(&c->xb, (size_t)nx * sizeof(__nv_bfloat16)));
    __nv_bfloat16 *xb = (__nv_bfloat16 *)c->xb.p;
    to_bf16_kernel<<<kvs_cuda_blocks(nx, 256), 256, 0, c->stream>>>(x, nx, xb);
    CU_LAUNCHED();
    const float one = 1.0f, zero = 0.0f;
    int m = (int)w->n_out, n = n_rows, k = (int)w->n_in;
    CUBLAS_TRY(cublasGemmEx(c->cublas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, W, CUDA_R_16BF, k,
                            xb, CUDA_R_16BF, k, &zero, y, CUDA_R_32F, m, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
    if (bias != NULL) {
        int64_t ny = (int64_t)n_rows * w->n_out;
        add_bias_kernel<<<kvs_cuda_blocks(ny, 256), 256, 0, c->stream>>>(y, bias, w->n_out, ny);
        CU_LAUNCHED();
    }
    return 0;
}
