/* The CUDA backend: the kvs_backend_ops table, memory on one stream, the bad-index flag,
 * grow-only scratch, lifecycle, and the two ceilings the benchmarks compare against. */
#include "kernels/cuda/cuda_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

/* ---- scratch ------------------------------------------------------------------------------ */

int kvs_cuda_buf_reserve(struct kvs_cuda_buf *buf, size_t bytes)
{
    if (bytes <= buf->bytes) {
        return 0;
    }
    size_t n = std::max(bytes, buf->bytes * 2);
    void *p = NULL;
    /* cudaFree waits for work still reading the old buffer */
    CU_TRY(cudaFree(buf->p));
    buf->p = NULL;
    buf->bytes = 0;
    if (cudaMalloc(&p, n) != cudaSuccess) {
        (void)cudaGetLastError();
        KVS_ERROR("cuda: cannot allocate %zu bytes of scratch", n);
        return KVS_NO_MEMORY;
    }
    buf->p = p;
    buf->bytes = n;
    return 0;
}

void kvs_cuda_buf_free(struct kvs_cuda_buf *buf)
{
    cudaFree(buf->p);
    buf->p = NULL;
    buf->bytes = 0;
}

int kvs_cuda_mirror_set(struct kvs_cuda *c, struct kvs_cuda_mirror *m, const void *host,
                        size_t bytes)
{
    if (bytes == 0) {
        return 0;
    }
    if (m->bytes == bytes && memcmp(m->host, host, bytes) == 0) {
        return 0; /* the device copy already holds these values */
    }
    if (bytes > m->host_cap) {
        void *h = realloc(m->host, bytes);
        if (h == NULL) {
            return KVS_NO_MEMORY;
        }
        m->host = h;
        m->host_cap = bytes;
    }
    m->bytes = 0;
    KVS_TRY(kvs_cuda_buf_reserve(&m->dev, bytes));
    /* from pageable memory: the call returns once the source has been staged */
    CU_TRY(cudaMemcpyAsync(m->dev.p, host, bytes, cudaMemcpyHostToDevice, c->stream));
    memcpy(m->host, host, bytes);
    m->bytes = bytes;
    return 0;
}

void kvs_cuda_mirror_free(struct kvs_cuda_mirror *m)
{
    kvs_cuda_buf_free(&m->dev);
    free(m->host);
    memset(m, 0, sizeof *m);
}

/* ---- memory ------------------------------------------------------------------------------- */

static void *cuda_alloc(kvs_backend *b, size_t bytes)
{
    kvs_cuda_xb_drop(kvs_cuda_ctx(b)); /* the address may be a freed activation's */
    void *p = NULL;
    if (cudaMalloc(&p, bytes == 0 ? 64 : bytes) != cudaSuccess) { /* 256-byte aligned */
        (void)cudaGetLastError();
        KVS_ERROR("cuda: cannot allocate %zu bytes", bytes);
        return NULL;
    }
    return p;
}

static void cuda_free(kvs_backend *b, void *ptr)
{
    if (ptr != NULL) {
        kvs_cuda_xb_drop(kvs_cuda_ctx(b));
        if (kvs_cuda_flush(kvs_cuda_ctx(b)) < 0) { /* a held op may read ptr */
            KVS_WARN("cuda: a held-back op failed before a free");
        }
        cudaError_t e = cudaFree(ptr);
        if (e != cudaSuccess) {
            KVS_ERROR("cuda: cudaFree: %s", cudaGetErrorString(e));
        }
    }
}

static int cuda_upload(kvs_backend *b, void *dst, const void *host_src, size_t bytes)
{
    kvs_cuda_xb_drop(kvs_cuda_ctx(b));
    KVS_TRY(kvs_cuda_flush(kvs_cuda_ctx(b)));
    if (bytes == 0) {
        return 0;
    }
    /* pageable source: returns once staged, so the caller may reuse host_src at once */
    CU_TRY(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, kvs_cuda_ctx(b)->stream));
    return 0;
}

static int cuda_download(kvs_backend *b, void *host_dst, const void *src, size_t bytes)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    KVS_TRY(kvs_cuda_flush(c));
    if (bytes == 0) {
        return 0;
    }
    CU_TRY(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, c->stream));
    CU_TRY(cudaStreamSynchronize(c->stream)); /* the caller reads host_dst next */
    return 0;
}

static int cuda_sync(kvs_backend *b)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    KVS_TRY(kvs_cuda_flush(c));
    int flag = 0;
    CU_TRY(cudaMemcpyAsync(&flag, c->d_flag, sizeof flag, cudaMemcpyDeviceToHost, c->stream));
    CU_TRY(cudaStreamSynchronize(c->stream));
    if (flag != 0) {
        CU_TRY(cudaMemsetAsync(c->d_flag, 0, sizeof(int), c->stream));
        CU_TRY(cudaStreamSynchronize(c->stream));
        KVS_ERROR("cuda: a kernel skipped an out-of-range cell slot or block id (code %d)", flag);
        return KVS_OUT_OF_RANGE;
    }
    return 0;
}

/* ---- lifecycle ---------------------------------------------------------------------------- */

#define CUBLAS_WS_BYTES ((size_t)32 << 20)

static void cuda_destroy(kvs_backend *b)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    if (c != NULL) {
        cudaSetDevice(c->dev);
        if (c->stream != NULL) {
            (void)kvs_cuda_flush(c);
            cudaStreamSynchronize(c->stream);
        }
        kvs_cuda_graphs_free(c);
        kvs_cuda_buf_free(&c->xb);
        kvs_cuda_buf_free(&c->rope_tab);
        free(c->rtab.pos);
        kvs_cuda_buf_free(&c->partial);
        kvs_cuda_buf_free(&c->blockbuf);
        kvs_cuda_mirror_free(&c->pos);
        kvs_cuda_mirror_free(&c->freq);
        kvs_cuda_mirror_free(&c->ids);
        kvs_cuda_mirror_free(&c->idx);
        cudaFree(c->d_flag);
        if (c->cublas != NULL) {
            cublasDestroy(c->cublas);
        }
        cudaFree(c->cublas_ws);
        if (c->stream != NULL) {
            cudaStreamDestroy(c->stream);
        }
        free(c);
    }
    free(b);
}

static const struct kvs_backend_ops cuda_ops = {
    /* .name = */ "cuda",
    /* .alloc = */ cuda_alloc,
    /* .free = */ cuda_free,
    /* .upload = */ cuda_upload,
    /* .download = */ cuda_download,
    /* .sync = */ cuda_sync,
    /* .weight_load = */ kvs_cuda_weight_load,
    /* .weight_free = */ kvs_cuda_weight_free,
    /* .kv_new = */ kvs_cuda_kv_new,
    /* .kv_destroy = */ kvs_cuda_kv_destroy,
    /* .kv_copy_block = */ kvs_cuda_kv_copy_block,
    /* .kv_read_block = */ kvs_cuda_kv_read_block,
    /* .kv_write_block = */ kvs_cuda_kv_write_block,
    /* .get_rows = */ kvs_cuda_get_rows,
    /* .matmul = */ kvs_cuda_matmul,
    /* .rmsnorm = */ kvs_cuda_rmsnorm,
    /* .rope = */ kvs_cuda_rope,
    /* .swiglu = */ kvs_cuda_swiglu,
    /* .add = */ kvs_cuda_add,
    /* .gather = */ kvs_cuda_gather,
    /* .kv_store = */ kvs_cuda_kv_store,
    /* .attention = */ kvs_cuda_attention,
    /* .destroy = */ cuda_destroy,
    /* .rope_store = */ kvs_cuda_rope_store,
    /* .matmul_add = */ kvs_cuda_matmul_add,
    /* .ffn = */ kvs_cuda_ffn,
}; /* positional (this C++ dialect lacks C's designated initializers): header order */

#define NEW_FAIL(...)                                                                      \
    do {                                                                                   \
        snprintf(err, errlen, __VA_ARGS__);                                                \
        goto fail;                                                                         \
    } while (0)

extern "C" kvs_backend *kvs_backend_cuda_new(int dev, char *err, size_t errlen)
{
    char scratch[8];
    if (err == NULL || errlen == 0) {
        err = scratch;
        errlen = sizeof scratch;
    }
    err[0] = '\0';
    char why[256] = "";
    int n = kvs_cuda_device_count(why, sizeof why);
    if (n == 0) {
        snprintf(err, errlen, "no CUDA device: %s", why);
        return NULL;
    }
    if (dev < 0 || dev >= n) {
        snprintf(err, errlen, "CUDA device %d does not exist (%d device%s)", dev, n,
                 n == 1 ? "" : "s");
        return NULL;
    }
    kvs_backend *b = (kvs_backend *)calloc(1, sizeof *b);
    struct kvs_cuda *c = (struct kvs_cuda *)calloc(1, sizeof *c);
    if (c != NULL) {
        c->fwd_gen = 1; /* rtab.gen 0 = no table */
    }
    cudaError_t e;
    cudaDeviceProp p;
    if (b == NULL || c == NULL) {
        free(b);
        free(c);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    b->ops = &cuda_ops;
    b->ctx = c;
    b->n_threads = 1;
    c->dev = dev;
    if ((e = cudaSetDevice(dev)) != cudaSuccess ||
        (e = cudaGetDeviceProperties(&p, dev)) != cudaSuccess ||
        (e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)) != cudaSuccess ||
        (e = cudaMalloc((void **)&c->d_flag, sizeof(int))) != cudaSuccess ||
        (e = cudaMemset(c->d_flag, 0, sizeof(int))) != cudaSuccess) {
        NEW_FAIL("CUDA device %d: %s", dev, cudaGetErrorString(e));
    }
    if (p.major < 8) {
        NEW_FAIL("CUDA device %d (%s) is sm_%d%d; the backend needs bf16 tensor cores (sm_80+)",
                 dev, p.name, p.major, p.minor);
    }
    c->n_sm = p.multiProcessorCount;
    c->cc = p.major * 10 + p.minor;
    c->smem_optin = p.sharedMemPerBlockOptin;
    if (cublasCreate(&c->cublas) != CUBLAS_STATUS_SUCCESS ||
        cublasSetStream(c->cublas, c->stream) != CUBLAS_STATUS_SUCCESS) {
        NEW_FAIL("CUDA device %d: cannot create a cuBLAS handle", dev);
    }
    /* an explicit workspace: cuBLAS then allocates nothing while a forward is captured */
    if ((e = cudaMalloc(&c->cublas_ws, CUBLAS_WS_BYTES)) != cudaSuccess ||
        cublasSetWorkspace(c->cublas, c->cublas_ws, CUBLAS_WS_BYTES) != CUBLAS_STATUS_SUCCESS) {
        NEW_FAIL("CUDA device %d: cannot set a cuBLAS workspace", dev);
    }
    kvs_cuda_read_env(c);
    c->fuse = kvs_cuda_env_parts("KVS_CUDA_FUSE", KVS_CUDA_FUSE_DEFAULT);
    c->pdl = kvs_cuda_env_parts("KVS_CUDA_PDL", KVS_CUDA_PART_GEMV | KVS_CUDA_PART_OTHER);
    KVS_DEBUG("cuda: backend on device %d (%s, %d SMs)", dev, p.name, c->n_sm);
    return b;
fail:
    (void)cudaGetLastError();
    cuda_destroy(b);
    return NULL;
}

extern "C" int kvs_backend_is_cuda(const kvs_backend *b)
{
    return b != NULL && b->ops == &cuda_ops;
}

extern "C" int kvs_cuda_mem_info(kvs_backend *b, size_t *free_bytes, size_t *total_bytes)
{
    CU_TRY(cudaMemGetInfo(free_bytes, total_bytes));
    return 0;
}

/* ---- ceilings ----------------------------------------------------------------------------- */

static __global__ void fill_bf16_kernel(__nv_bfloat16 *p, size_t n, uint32_t seed)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        p[i] = __float2bfloat16(((float)(h >> 8) * (1.0f / 16777216.0f)) - 0.5f);
    }
}

/* Median of reps timings (seconds) of fn, after two warm-ups. */
template <typename F> static int median_time(cudaStream_t s, int reps, F fn, double *out)
{
    std::vector<float> ms;
    cudaEvent_t e0 = NULL, e1 = NULL;
    int rc = 0;
    CU_TRY(cudaEventCreate(&e0));
    if (cudaEventCreate(&e1) != cudaSuccess) {
        cudaEventDestroy(e0);
        return KVS_DEVICE;
    }
    for (int i = 0; i < reps + 2 && rc == 0; i++) {
        float t = 0;
        if (cudaEventRecord(e0, s) != cudaSuccess || (rc = fn()) < 0 ||
            cudaEventRecord(e1, s) != cudaSuccess || cudaEventSynchronize(e1) != cudaSuccess ||
            cudaEventElapsedTime(&t, e0, e1) != cudaSuccess) {
            rc = rc < 0 ? rc : KVS_DEVICE;
        } else if (i >= 2) {
            ms.push_back(t);
        }
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    if (rc < 0) {
        return rc;
    }
    std::sort(ms.begin(), ms.end());
    *out = ms[ms.size() / 2] * 1e-3;
    return 0;
}

extern "C" int kvs_cuda_bench_gemm(kvs_backend *b, int m, int n, int k, int reps, double *seconds)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    KVS_TRY(kvs_cuda_flush(c));
    __nv_bfloat16 *A = NULL, *B = NULL, *C = NULL;
    int rc = KVS_NO_MEMORY;
    if (cudaMalloc(&A, (size_t)m * k * 2) == cudaSuccess &&
        cudaMalloc(&B, (size_t)k * n * 2) == cudaSuccess &&
        cudaMalloc(&C, (size_t)m * n * 2) == cudaSuccess) {
        /* random data: zeros run faster than real data */
        fill_bf16_kernel<<<1024, 256, 0, c->stream>>>(A, (size_t)m * k, 1u);
        fill_bf16_kernel<<<1024, 256, 0, c->stream>>>(B, (size_t)k * n, 2u);
        rc = cudaGetLastError() == cudaSuccess ? 0 : KVS_DEVICE;
        const float one = 1.0f, zero = 0.0f;
        if (rc == 0) {
            rc = median_time(
                c->stream, reps,
                [&]() -> int {
                    CUBLAS_TRY(cublasGemmEx(c->cublas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, A,
                                            CUDA_R_16BF, k, B, CUDA_R_16BF, k, &zero, C,
                                            CUDA_R_16BF, m, CUBLAS_COMPUTE_32F,
                                            CUBLAS_GEMM_DEFAULT));
                    return 0;
                },
                seconds);
        }
    }
    (void)cudaGetLastError();
    cudaFree(A);
    cudaFree(B);
    cudaFree(C);
    return rc;
}

extern "C" int kvs_cuda_bench_copy(kvs_backend *b, size_t bytes, int reps, double *seconds)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    KVS_TRY(kvs_cuda_flush(c));
    void *src = NULL, *dst = NULL;
    int rc = KVS_NO_MEMORY;
    if (cudaMalloc(&src, bytes) == cudaSuccess && cudaMalloc(&dst, bytes) == cudaSuccess) {
        fill_bf16_kernel<<<1024, 256, 0, c->stream>>>((__nv_bfloat16 *)src, bytes / 2, 3u);
        rc = cudaGetLastError() == cudaSuccess ? 0 : KVS_DEVICE;
        if (rc == 0) {
            rc = median_time(
                c->stream, reps,
                [&]() -> int {
                    CU_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c->stream));
                    return 0;
                },
                seconds);
        }
    }
    (void)cudaGetLastError();
    cudaFree(src);
    cudaFree(dst);
    return rc;
}
