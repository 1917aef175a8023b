/* KV storage on the device: K and V in bf16, each (n_layer, n_block, n_kv_head, block_size,
 * head_dim) as on the CPU, so one KV head's cells of a block are contiguous for attention
 * and one block of one layer is one run for copies. */
#include "kernels/cuda/cuda_impl.h"

#include <assert.h>
#include <cudaTypedefs.h>
#include <stdlib.h>

/* The TMA tensor maps of kv's K and V (kvs_kv_cache.tmap): each pool as a matrix of 16-cell
 * rows of head_dim bf16 (all layers, blocks and KV heads), boxes of 64 dims x 16 cells (one
 * KV head's half-block) written with the 128-byte swizzle the wgmma kernel reads. Only for
 * head dim 128, 16-cell blocks and row counts TMA coordinates reach; NULL otherwise (the
 * kernel then loads with cp.async). */
static void kv_tensor_maps(struct kvs_cuda *c, kvs_kv_cache *kv)
{
    const struct kvs_kv_layout *l = &kv->layout;
    const uint64_t rows = (uint64_t)l->n_layer * l->n_block * l->n_kv_head * l->block_size;
    if (c->cc < 90 || l->head_dim != 128 || l->block_size != 16 || rows >= ((uint64_t)1 << 31)) {
        return;
    }
    void *fn = NULL;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess || fn == NULL) {
        (void)cudaGetLastError();
        KVS_WARN("cuda: no cuTensorMapEncodeTiled; attention loads K/V without TMA");
        return;
    }
    PFN_cuTensorMapEncodeTiled_v12000 encode = (PFN_cuTensorMapEncodeTiled_v12000)fn;
    CUtensorMap maps[2];
    const cuuint64_t dims[2] = {(cuuint64_t)l->head_dim, (cuuint64_t)rows};
    const cuuint64_t strides[1] = {(cuuint64_t)l->head_dim * 2};
    const cuuint32_t box[2] = {64, 16}, estr[2] = {1, 1};
    for (int i = 0; i < 2; i++) {
        if (encode(&maps[i], CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, i == 0 ? kv->k : kv->v, dims,
                   strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                   CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                   CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
            KVS_WARN("cuda: cuTensorMapEncodeTiled failed; attention loads K/V without TMA");
            return;
        }
    }
    if (cudaMalloc(&kv->tmap, sizeof maps) != cudaSuccess ||
        cudaMemcpy(kv->tmap, maps, sizeof maps, cudaMemcpyHostToDevice) != cudaSuccess) {
        (void)cudaGetLastError();
        cudaFree(kv->tmap);
        kv->tmap = NULL;
    }
}

int kvs_cuda_kv_new(kvs_backend *b, const struct kvs_kv_layout *l, kvs_kv_cache **out)
{
    assert(l != NULL && out != NULL);
    *out = NULL;
    if (l->n_layer <= 0 || l->n_block <= 0 || l->block_size <= 0 || l->n_kv_head <= 0 ||
        l->head_dim <= 0) {
        return KVS_INVALID_ARGUMENT;
    }
    if (l->dtype != KVS_DTYPE_BF16) {
        return KVS_UNSUPPORTED;
    }
    size_t head = (size_t)l->block_size * (size_t)l->head_dim;
    size_t block = head * (size_t)l->n_kv_head, total = 0;
    if (__builtin_mul_overflow(block, (size_t)l->n_block, &total) ||
        __builtin_mul_overflow(total, (size_t)l->n_layer * 2, &total) || total > (SIZE_MAX >> 2)) {
        return KVS_TOO_LARGE;
    }
    kvs_kv_cache *kv = (kvs_kv_cache *)calloc(1, sizeof *kv);
    if (kv == NULL) {
        return KVS_NO_MEMORY;
    }
    kv->layout = *l;
    kv->head_stride = head;
    kv->block_stride = block;
    kv->layer_stride = block * (size_t)l->n_block;
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    if (cudaMalloc((void **)&kv->k, total) != cudaSuccess ||
        cudaMalloc((void **)&kv->v, total) != cudaSuccess) {
        (void)cudaGetLastError();
        KVS_ERROR("cuda: cannot allocate 2 x %zu bytes of KV", total);
        kvs_cuda_kv_destroy(b, &kv);
        return KVS_NO_MEMORY;
    }
    /* zeroed so that stale cells are finite */
    if (cudaMemsetAsync(kv->k, 0, total, c->stream) != cudaSuccess ||
        cudaMemsetAsync(kv->v, 0, total, c->stream) != cudaSuccess ||
        cudaStreamSynchronize(c->stream) != cudaSuccess) {
        kvs_cuda_kv_destroy(b, &kv);
        return KVS_DEVICE;
    }
    kv_tensor_maps(c, kv);
    *out = kv;
    return 0;
}

void kvs_cuda_kv_destroy(kvs_backend *b, kvs_kv_cache **kvp)
{
    if (kvp == NULL || *kvp == NULL) {
        return;
    }
    if (kvs_cuda_flush(kvs_cuda_ctx(b)) < 0) {
        KVS_WARN("cuda: a held-back op failed before the KV storage was freed");
    }
    cudaFree((*kvp)->k);
    cudaFree((*kvp)->v);
    cudaFree((*kvp)->tmap);
    free(*kvp);
    *kvp = NULL;
}

int kvs_cuda_kv_copy_block(kvs_backend *b, kvs_kv_cache *kv, int32_t src, int32_t dst)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    kvs_cuda_xb_drop(c); /* device memory is written */
    assert(kv != NULL);
    const struct kvs_kv_layout *l = &kv->layout;
    if (src < 0 || src >= l->n_block || dst < 0 || dst >= l->n_block) {
        return KVS_OUT_OF_RANGE;
    }
    KVS_TRY(kvs_cuda_flush(c));
    if (src == dst) {
        return 0;
    }
    /* one strided copy per tensor: n_layer runs of block_stride elements */
    size_t pitch = kv->layer_stride * sizeof(__nv_bfloat16);
    size_t width = kv->block_stride * sizeof(__nv_bfloat16);
    size_t so = (size_t)src * kv->block_stride, doff = (size_t)dst * kv->block_stride;
    CU_TRY(cudaMemcpy2DAsync(kv->k + doff, pitch, kv->k + so, pitch, width, (size_t)l->n_layer,
                             cudaMemcpyDeviceToDevice, c->stream));
    CU_TRY(cudaMemcpy2DAsync(kv->v + doff, pitch, kv->v + so, pitch, width, (size_t)l->n_layer,
                             cudaMemcpyDeviceToDevice, c->stream));
    return 0;
}

/* One thread per (row, kv head, dim): round to bf16 and store into the row's cell. A slot
 * outside the pool is skipped and raises the flag (reported by sync). */
static __global__ void kv_store_kernel(const float *__restrict__ k, const float *__restrict__ v,
                                       const int32_t *__restrict__ row_slot, int32_t n_rows,
                                       int32_t n_kv_head, int32_t head_dim, int32_t block_size,
                                       int64_t n_slots, size_t layer_off, size_t head_stride,
                                       size_t block_stride, __nv_bfloat16 *kc, __nv_bfloat16 *vc,
                                       int *flag)
{
    kvs_pdl_wait();
    kvs_pdl_trigger(); /* after the wait: see kvs_pdl_trigger */
    int64_t total = (int64_t)n_rows * n_kv_head * head_dim;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int32_t d = (int32_t)(i % head_dim);
        int32_t h = (int32_t)((i / head_dim) % n_kv_head);
        int32_t r = (int32_t)(i / ((int64_t)head_dim * n_kv_head));
        int32_t slot = row_slot[r];
        if (slot < 0 || slot >= n_slots) {
            *flag = 1;
            continue;
        }
        size_t off = layer_off + (size_t)(slot / block_size) * block_stride +
                     (size_t)h * head_stride + (size_t)(slot % block_size) * head_dim + d;
        kc[off] = __float2bfloat16_rn(k[i]);
        vc[off] = __float2bfloat16_rn(v[i]);
    }
}

int kvs_cuda_kv_store(kvs_backend *b, kvs_kv_cache *kv, int32_t layer, const float *k,
                      const float *v, const struct kvs_attn_batch *ab)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    kvs_cuda_xb_drop(c); /* device memory is written */
    assert(kv != NULL && k != NULL && v != NULL && ab != NULL);
    const struct kvs_kv_layout *l = &kv->layout;
    if (layer < 0 || layer >= l->n_layer) {
        return KVS_OUT_OF_RANGE;
    }
    KVS_TRY(kvs_cuda_flush(c));
    if (ab->n_rows == 0) {
        return 0;
    }
    const uint64_t args[] = {(uint64_t)(uintptr_t)k,           (uint64_t)(uintptr_t)v,
                             (uint64_t)(uintptr_t)ab->row_slot, (uint64_t)ab->n_rows,
                             (uint64_t)(uintptr_t)kv,          (uint64_t)layer};
    if (!kvs_cuda_launch_ok(c, 0x400, args, 6)) {
        return 0;
    }
    int64_t total = (int64_t)ab->n_rows * l->n_kv_head * l->head_dim;
    CU_TRY(kvs_cuda_launch(c, KVS_CUDA_PART_OTHER, kv_store_kernel,
                           dim3(kvs_cuda_blocks(total, 256)), dim3(256), 0, k, v,
                           ab->row_slot, ab->n_rows, l->n_kv_head, l->head_dim, l->block_size, (int64_t)l->n_block * l->block_size,
                           (size_t)layer * kv->layer_stride, kv->head_stride, kv->block_stride,
                           kv->k, kv->v, c->d_flag));
    return 0;
}

/* ---- one block in the canonical layout (kernels/backend.h) --------------------------------- */

/* Canonical: for each layer, K[cell][kv_head][head_dim] then V[cell][kv_head][head_dim].
 * Ours: [kv_head][cell][head_dim] inside a block. pack = 1 copies ours -> canonical. */
static __global__ void kv_block_kernel(__nv_bfloat16 *k, __nv_bfloat16 *v, __nv_bfloat16 *canon,
                                       int32_t block, int32_t n_layer, int32_t block_size,
                                       int32_t n_kv_head, int32_t head_dim, size_t layer_stride,
                                       size_t block_stride, int pack)
{
    int64_t per = (int64_t)block_size * n_kv_head * head_dim; /* one tensor of one layer */
    int64_t total = 2 * per * n_layer;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t l = i / (2 * per), rem = i % (2 * per);
        int is_v = rem >= per;
        int64_t e = rem % per;
        int32_t d = (int32_t)(e % head_dim);
        int32_t h = (int32_t)((e / head_dim) % n_kv_head);
        int32_t cell = (int32_t)(e / ((int64_t)head_dim * n_kv_head));
        __nv_bfloat16 *t = is_v ? v : k;
        size_t off = (size_t)l * layer_stride + (size_t)block * block_stride +
                     ((size_t)h * block_size + cell) * head_dim + d;
        if (pack) {
            canon[i] = t[off];
        } else {
            t[off] = canon[i];
        }
    }
}

static int kv_block_io(kvs_backend *b, kvs_kv_cache *kv, int32_t block, void *host, int pack)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    kvs_cuda_xb_drop(c); /* device memory is written */
    const struct kvs_kv_layout *l = &kv->layout;
    if (block < 0 || block >= l->n_block) {
        return KVS_OUT_OF_RANGE;
    }
    KVS_TRY(kvs_cuda_flush(c));
    size_t bytes = kvs_kv_block_bytes(l);
    KVS_TRY(kvs_cuda_buf_reserve(&c->blockbuf, bytes));
    if (!pack) {
        CU_TRY(cudaMemcpyAsync(c->blockbuf.p, host, bytes, cudaMemcpyHostToDevice, c->stream));
    }
    int64_t n = (int64_t)(bytes / 2);
    kv_block_kernel<<<kvs_cuda_blocks(n, 256), 256, 0, c->stream>>>(
        kv->k, kv->v, (__nv_bfloat16 *)c->blockbuf.p, block, l->n_layer, l->block_size,
        l->n_kv_head, l->head_dim, kv->layer_stride, kv->block_stride, pack);
    CU_LAUNCHED();
    if (pack) {
        CU_TRY(cudaMemcpyAsync(host, c->blockbuf.p, bytes, cudaMemcpyDeviceToHost, c->stream));
    }
    CU_TRY(cudaStreamSynchronize(c->stream)); /* host buffer is the caller's on return */
    return 0;
}

int kvs_cuda_kv_read_block(kvs_backend *b, kvs_kv_cache *kv, int32_t block, void *host_buf)
{
    assert(kv != NULL && host_buf != NULL);
    return kv_block_io(b, kv, block, host_buf, 1);
}

int kvs_cuda_kv_write_block(kvs_backend *b, kvs_kv_cache *kv, int32_t block,
                            const void *host_buf)
{
    assert(kv != NULL && host_buf != NULL);
    return kv_block_io(b, kv, block, (void *)host_buf, 0);
}
