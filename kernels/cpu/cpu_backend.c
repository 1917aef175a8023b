/* The CPU backend: the kvs_backend_ops table, memory, weights, and the context.
 *
 * Memory is host memory (64-byte aligned malloc); upload/download are memcpy and sync is a
 * no-op (every op has finished when it returns). Weights stay compact: float types are
 * copied as they are, quantized rows are regrouped (struct kvs_cpu_rg: 8 blocks' quants,
 * then their scales; the same bytes per row) so that the kernels convert 8 scales at once. */
#include "kernels/cpu/cpu_impl.h"

#include "common/log.h"

#include <assert.h>
#include <stdlib.h>
#include <unistd.h>

int kvs_cpu_scratch_reserve(void **buf, int64_t *cap, int64_t need, size_t elem)
{
    if (need <= *cap) {
        return 0;
    }
    int64_t n = *cap * 2 > need ? *cap * 2 : need; /* geometric: steady state never grows */
    size_t bytes = ((size_t)n * elem + 63) & ~(size_t)63;
    void *p = aligned_alloc(64, bytes);
    if (p == NULL) {
        return KVS_NO_MEMORY;
    }
    free(*buf);
    *buf = p;
    *cap = n;
    return 0;
}

static void *cpu_alloc(kvs_backend *b, size_t bytes)
{
    size_t rounded = (bytes + 63) & ~(size_t)63;
    if (rounded < bytes) {
        return NULL;
    }
    return aligned_alloc(64, rounded == 0 ? 64 : rounded);
}

static void cpu_free(kvs_backend *b, void *ptr)
{
    free(ptr);
}

static int cpu_copy(kvs_backend *b, void *dst, const void *src, size_t bytes)
{
    if (bytes > 0) {
        memmove(dst, src, bytes);
    }
    return 0;
}

static int cpu_sync(kvs_backend *b)
{
    return 0;
}

static int cpu_weight_load(kvs_backend *b, struct kvs_weight *w, const void *host_data)
{
    assert(w != NULL && host_data != NULL);
    uint64_t row_bytes = 0;
    if (!kvs_dtype_is_supported(w->type) || w->n_in <= 0 || w->n_out <= 0) {
        return KVS_INVALID_ARGUMENT;
    }
    uint32_t be = kvs_dtype_block_elems(w->type), bb = kvs_dtype_block_bytes(w->type);
    if (w->n_in % be != 0) {
        return KVS_INVALID_ARGUMENT;
    }
    row_bytes = (uint64_t)(w->n_in / be) * bb;
    if (w->row_bytes != 0 && w->row_bytes != row_bytes) {
        return KVS_INVALID_ARGUMENT;
    }
    size_t total = 0;
    if (__builtin_mul_overflow((size_t)row_bytes, (size_t)w->n_out, &total)) {
        return KVS_TOO_LARGE;
    }
    /* + 64 bytes of slack: the kernels' 16-byte loads of a short group's scales and the
     * paired kernel's 32-byte load of an odd last block may run past the last row */
    void *p = cpu_alloc(b, total + 64);
    if (p == NULL) {
        return KVS_NO_MEMORY;
    }
    if (be == KVS_QK) {
        const struct kvs_cpu *c = b->ctx;
        kvs_cpu_regroup(w->type, host_data, p, w->n_out, w->n_in, (size_t)row_bytes);
        if (kvs_cpu_paired_q4(c->k->isa, w->type)) {
            kvs_cpu_pair_q4(w->type, p, w->n_out, w->n_in, (size_t)row_bytes);
        }
        memset((uint8_t *)p + total, 0, 64);
    } else {
        memcpy(p, host_data, total);
    }
    w->row_bytes = row_bytes;
    w->data = p;
    w->extra = NULL;
    return 0;
}

static void cpu_weight_free(kvs_backend *b, struct kvs_weight *w)
{
    if (w == NULL) {
        return;
    }
    free(w->data);
    free(w->extra);
    w->data = NULL;
    w->extra = NULL;
}

static void cpu_destroy(kvs_backend *b)
{
    struct kvs_cpu *c = b->ctx;
    if (c != NULL) {
        kvs_threadpool_destroy(&c->pool);
        if (c->ts != NULL) {
            for (int32_t t = 0; t < c->n_threads; t++) {
                free(c->ts[t].scores);
            }
            free(c->ts);
        }
        free(c->attn.idx);
        free(c->qx);
        free(c->rope_cs);
        free(c->rope_pos);
        free(c);
    }
    free(b);
}

static const struct kvs_backend_ops cpu_ops = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .sync = cpu_sync,
    .weight_load = cpu_weight_load,
    .weight_free = cpu_weight_free,
    .kv_new = kvs_cpu_kv_new,
    .kv_destroy = kvs_cpu_kv_destroy,
    .kv_copy_block = kvs_cpu_kv_copy_block,
    .kv_read_block = kvs_cpu_kv_read_block,
    .kv_write_block = kvs_cpu_kv_write_block,
    .get_rows = kvs_cpu_get_rows,
    .matmul = kvs_cpu_matmul,
    .rmsnorm = kvs_cpu_rmsnorm,
    .rope = kvs_cpu_rope,
    .swiglu = kvs_cpu_swiglu,
    .add = kvs_cpu_add,
    .gather = kvs_cpu_gather,
    .kv_store = kvs_cpu_kv_store,
    .attention = kvs_cpu_attention,
    .destroy = cpu_destroy,
};

static const struct kvs_cpu_kernels *kernels_for(int isa)
{
#if defined(__x86_64__)
    if (isa == KVS_CPU_ISA_AVX512) {
        return &kvs_cpu_kernels_avx512;
    }
    if (isa == KVS_CPU_ISA_AVX2) {
        return &kvs_cpu_kernels_avx2;
    }
#endif
    return &kvs_cpu_kernels_scalar;
}

kvs_backend *kvs_backend_cpu_new(int32_t n_threads)
{
    if (n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int32_t)n : 1;
    }
    kvs_backend *b = calloc(1, sizeof *b);
    struct kvs_cpu *c = calloc(1, sizeof *c);
    if (b == NULL || c == NULL) {
        free(b);
        free(c);
        return NULL;
    }
    b->ops = &cpu_ops;
    b->ctx = c;
    c->k = kernels_for(kvs_cpu_isa_detect());
    c->ts = calloc((size_t)n_threads, sizeof *c->ts);
    c->pool = kvs_threadpool_new(n_threads);
    if (c->ts == NULL || c->pool == NULL) {
        cpu_destroy(b);
        return NULL;
    }
    c->n_threads = kvs_threadpool_size(c->pool);
    b->n_threads = c->n_threads;
    KVS_DEBUG("cpu: backend with %d threads, %s kernels", (int)b->n_threads,
              kvs_cpu_isa_name(c->k->isa));
    return b;
}

const char *kvs_backend_cpu_isa(const kvs_backend *b)
{
    const struct kvs_cpu *c = b->ctx;
    return kvs_cpu_isa_name(c->k->isa);
}
