/* Weights on the device: every matrix is dequantized at load, on the device, into a bf16
 * (n_out, n_in) row-major matrix (the form cuBLAS and the GEMV kernel read). Also the random
 * weights of synthetic models and the embedding gather (get_rows). */
#include "kernels/cuda/cuda_impl.h"

#include <assert.h>

/* ---- dequantization ------------------------------------------------------------------------ */

/* Block geometry of the GGUF types (kernels/dtype.h), kept here so that kvs_cuda needs
 * nothing from kvs_kernels (which links it). 0 for an unsupported type. */
static void block_shape(uint32_t type, int *elems, int *bytes)
{
    *elems = 0;
    *bytes = 0;
    switch (type) {
    case KVS_DTYPE_F32: *elems = 1; *bytes = 4; break;
    case KVS_DTYPE_F16:
    case KVS_DTYPE_BF16: *elems = 1; *bytes = 2; break;
    case KVS_DTYPE_Q8_0: *elems = 32; *bytes = 34; break;
    case KVS_DTYPE_Q4_0: *elems = 32; *bytes = 18; break;
    case KVS_DTYPE_Q4_1: *elems = 32; *bytes = 20; break;
    default: break;
    }
}

static __device__ __forceinline__ float half_bits_to_float(const uint8_t *p)
{
    uint16_t h = (uint16_t)p[0] | (uint16_t)((uint16_t)p[1] << 8);
    return __half2float(__ushort_as_half(h));
}

/* One thread per output element; src rows of row_bytes in the GGUF layout (kernels/dtype.h). */
static __global__ void dequant_kernel(uint32_t type, const uint8_t *src, size_t row_bytes,
                                      int64_t n_in, int64_t n, __nv_bfloat16 *dst)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / n_in, c = i % n_in;
        const uint8_t *row = src + (size_t)r * row_bytes;
        float v = 0.0f;
        switch (type) {
        case KVS_DTYPE_F32:
            v = ((const float *)row)[c];
            break;
        case KVS_DTYPE_F16:
            v = __half2float(((const __half *)row)[c]);
            break;
        case KVS_DTYPE_BF16:
            dst[i] = ((const __nv_bfloat16 *)row)[c];
            continue;
        case KVS_DTYPE_Q8_0: {
            const uint8_t *blk = row + (c / 32) * 34;
            v = half_bits_to_float(blk) * (float)(int8_t)blk[2 + c % 32];
            break;
        }
        case KVS_DTYPE_Q4_0:
        case KVS_DTYPE_Q4_1: {
            int bb = type == KVS_DTYPE_Q4_0 ? 18 : 20;
            const uint8_t *blk = row + (c / 32) * bb;
            int j = (int)(c % 32);
            const uint8_t *qs = blk + (type == KVS_DTYPE_Q4_0 ? 2 : 4);
            int q = j < 16 ? (qs[j] & 0x0f) : (qs[j - 16] >> 4);
            float d = half_bits_to_float(blk);
            v = type == KVS_DTYPE_Q4_0 ? d * (float)(q - 8)
                                       : d * (float)q + half_bits_to_float(blk + 2);
            break;
        }
        default:
            break;
        }
        dst[i] = __float2bfloat16_rn(v);
    }
}

int kvs_cuda_weight_load(kvs_backend *b, struct kvs_weight *w, const void *host_data)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    assert(w != NULL && host_data != NULL);
    int be = 0, bb = 0;
    block_shape(w->type, &be, &bb);
    if (be == 0 || w->n_in <= 0 || w->n_out <= 0 || w->n_in % be != 0) {
        return KVS_INVALID_ARGUMENT;
    }
    uint64_t row_bytes = (uint64_t)(w->n_in / be) * (uint64_t)bb;
    if (w->row_bytes != 0 && w->row_bytes != row_bytes) {
        return KVS_INVALID_ARGUMENT;
    }
    size_t raw = 0, out = 0;
    if (__builtin_mul_overflow((size_t)row_bytes, (size_t)w->n_out, &raw) ||
        __builtin_mul_overflow((size_t)w->n_in * 2, (size_t)w->n_out, &out)) {
        return KVS_TOO_LARGE;
    }
    void *staging = NULL, *dst = NULL;
    if (cudaMalloc(&dst, out) != cudaSuccess ||
        (w->type != KVS_DTYPE_BF16 && cudaMalloc(&staging, raw) != cudaSuccess)) {
        (void)cudaGetLastError();
        cudaFree(dst);
        return KVS_NO_MEMORY;
    }
    int rc = 0;
    if (w->type == KVS_DTYPE_BF16) { /* already the device form: one copy */
        if (cudaMemcpyAsync(dst, host_data, raw, cudaMemcpyHostToDevice, c->stream) != cudaSuccess) {
            rc = KVS_DEVICE;
        }
    } else {
        int64_t n = w->n_in * w->n_out;
        if (cudaMemcpyAsync(staging, host_data, raw, cudaMemcpyHostToDevice, c->stream) !=
            cudaSuccess) {
            rc = KVS_DEVICE;
        } else {
            dequant_kernel<<<kvs_cuda_blocks(n, 256), 256, 0, c->stream>>>(
                w->type, (const uint8_t *)staging, (size_t)row_bytes, w->n_in, n,
                (__nv_bfloat16 *)dst);
            if (cudaGetLastError() != cudaSuccess) {
                rc = KVS_DEVICE;
            }
        }
    }
    /* the host data may be unmapped after we return: wait for the copy */
    if (rc == 0 && cudaStreamSynchronize(c->stream) != cudaSuccess) {
        rc = KVS_DEVICE;
    }
    cudaFree(staging);
    if (rc < 0) {
        KVS_ERROR("cuda: weight load (%lld x %lld, type %u): %s", (long long)w->n_out,
                  (long long)w->n_in, (unsigned)w->type, cudaGetErrorString(cudaGetLastError()));
        cudaFree(dst);
        return rc;
    }
    w->row_bytes = (size_t)row_bytes;
    w->data = dst;
    w->extra = NULL;
    return 0;
}

void kvs_cuda_weight_free(kvs_backend *b, struct kvs_weight *w)
{
    if (w == NULL) {
        return;
    }
    cudaFree(w->data);
    cudaFree(w->extra);
    w->data = NULL;
    w->extra = NULL;
}

/* ---- synthetic weights ---------------------------------------------------------------------- */

/* The same function as synth_value() in worker/model.c, bit for bit: a splitmix64 hash of
 * (seed, i) -> uniform in [-1, 1) with 24 bits -> times scale -> bf16 (round to nearest even). */
static __device__ __forceinline__ uint16_t synth_value(uint64_t seed, uint64_t i, float scale)
{
    uint64_t z = (seed ^ (i * 0xD1B54A32D192ED03ull)) + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    float u = (float)(z >> 40) * (1.0f / 16777216.0f);
    float v = __fmul_rn(2.0f * u - 1.0f, scale); /* 2u - 1 is exact */
    uint32_t bits = __float_as_uint(v);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static __global__ void random_kernel(uint64_t seed, float scale, int64_t n, uint16_t *dst)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        dst[i] = synth_value(seed, (uint64_t)i, scale);
    }
}

extern "C" int kvs_cuda_weight_random(kvs_backend *b, struct kvs_weight *w, uint64_t seed,
                                      float scale)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    if (w->n_in <= 0 || w->n_out <= 0) {
        return KVS_INVALID_ARGUMENT;
    }
    int64_t n = w->n_in * w->n_out;
    void *dst = NULL;
    if (cudaMalloc(&dst, (size_t)n * 2) != cudaSuccess) {
        (void)cudaGetLastError();
        return KVS_NO_MEMORY;
    }
    random_kernel<<<kvs_cuda_blocks(n, 256), 256, 0, c->stream>>>(seed, scale, n, (uint16_t *)dst);
    if (cudaGetLastError() != cudaSuccess) {
        cudaFree(dst);
        return KVS_DEVICE;
    }
    w->type = KVS_DTYPE_BF16;
    w->row_bytes = (size_t)w->n_in * 2;
    w->data = dst;
    w->extra = NULL;
    return 0;
}

/* ---- get_rows ------------------------------------------------------------------------------- */

static __global__ void get_rows_kernel(const __nv_bfloat16 *table, const int32_t *ids,
                                       int64_t n_in, int32_t n, float *out)
{
    int64_t total = (int64_t)n * n_in;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / n_in, c = i % n_in;
        out[i] = __bfloat162float(table[(int64_t)ids[r] * n_in + c]);
    }
}

int kvs_cuda_get_rows(kvs_backend *b, const struct kvs_weight *table, const int32_t *host_ids,
                      int32_t n, float *out)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    kvs_cuda_xb_drop(c); /* device memory is written */
    assert(table != NULL && table->data != NULL && (host_ids != NULL || n == 0));
    for (int32_t i = 0; i < n; i++) {
        if (host_ids[i] < 0 || host_ids[i] >= table->n_out) {
            return KVS_OUT_OF_RANGE;
        }
    }
    KVS_TRY(kvs_cuda_flush(c));
    if (n == 0) {
        return 0;
    }
    const void *d_ids = NULL;
    KVS_TRY(kvs_cuda_host_array(c, &c->ids, KVS_CUDA_STAGE_IDS, host_ids,
                                (size_t)n * sizeof(int32_t), &d_ids));
    const uint64_t args[] = {(uint64_t)(uintptr_t)table->data, (uint64_t)(uintptr_t)d_ids,
                             (uint64_t)table->n_in, (uint64_t)n, (uint64_t)(uintptr_t)out};
    if (!kvs_cuda_launch_ok(c, 0x300, args, 5)) {
        return 0;
    }
    int64_t total = (int64_t)n * table->n_in;
    get_rows_kernel<<<kvs_cuda_blocks(total, 256), 256, 0, c->stream>>>(
        (const __nv_bfloat16 *)table->data, (const int32_t *)d_ids, table->n_in, n, out);
    CU_LAUNCHED();
    return 0;
}
