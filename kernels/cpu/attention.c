/* KV storage and paged attention (GQA) for the CPU backend.
 *
 * Storage: K and V each (n_layer, n_block, n_kv_head, block_size, head_dim) in F32 or F16,
 * so one KV head's cells of a block are contiguous for the attention walk, and one block of
 * one layer is one contiguous run (n_kv_head * block_size * head_dim elements) for copies.
 *
 * Attention of (row r, head h), online softmax in a fixed order that depends only on the
 * row's own context: for each block of cells 0..row_ctx[r]-1 in position order:
 *   s_j = dot(q, k_j) * scale           (the level's dot, cells j of the block in order)
 *   m'  = max(m, max_j s_j);  c = expf(m - m')  (skipped on the first block)
 *   l   = l * c;  acc = acc * c
 *   p_j = exp(s_j - m')                 (the level's exp: libm, or the vector exp)
 *   for j in order: l = l + p_j;  then for j in order: acc = acc + p_j * v_j
 * With an f16 cache q and the p_j that scale V are rounded to f16, where llama.cpp's CPU
 * attention rounds them (l sums the unrounded p_j).
 * out = acc * (1 / l). */
#include "kernels/cpu/cpu_impl.h"

#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

struct kvs_kv_cache {
    struct kvs_kv_layout layout;
    size_t elem;         /* bytes per stored element: 4 (F32) or 2 (F16) */
    size_t head_stride;  /* bytes of one KV head's cells in one block: block_size * head_dim */
    size_t block_stride; /* bytes of one block of one layer: n_kv_head * head_stride */
    size_t layer_stride; /* bytes of one layer: n_block * block_stride */
    uint8_t *k, *v;      /* (n_layer, n_block, n_kv_head, block_size, head_dim) each */
};

int kvs_cpu_kv_new(kvs_backend *b, const struct kvs_kv_layout *l, kvs_kv_cache **out)
{
    assert(l != NULL && out != NULL);
    *out = NULL;
    if (l->n_layer <= 0 || l->n_block <= 0 || l->block_size <= 0 || l->n_kv_head <= 0 ||
        l->head_dim <= 0) {
        return KVS_INVALID_ARGUMENT;
    }
    if (l->dtype != KVS_DTYPE_F32 && l->dtype != KVS_DTYPE_F16) {
        return KVS_UNSUPPORTED;
    }
    size_t elem = l->dtype == KVS_DTYPE_F32 ? 4 : 2;
    size_t head = (size_t)l->block_size * (size_t)l->head_dim * elem;
    size_t block = head * (size_t)l->n_kv_head;
    size_t total = 0;
    if (__builtin_mul_overflow(block, (size_t)l->n_block, &total) ||
        __builtin_mul_overflow(total, (size_t)l->n_layer, &total) || total > (SIZE_MAX >> 2)) {
        return KVS_TOO_LARGE;
    }
    kvs_kv_cache *kv = calloc(1, sizeof *kv);
    if (kv == NULL) {
        return KVS_NO_MEMORY;
    }
    kv->layout = *l;
    kv->elem = elem;
    kv->head_stride = head;
    kv->block_stride = block;
    kv->layer_stride = block * (size_t)l->n_block;
    size_t rounded = (total + 63) & ~(size_t)63;
    kv->k = aligned_alloc(64, rounded);
    kv->v = aligned_alloc(64, rounded);
    if (kv->k == NULL || kv->v == NULL) {
        kvs_cpu_kv_destroy(b, &kv);
        return KVS_NO_MEMORY;
    }
    /* zeroed so that stale cells are finite, and the pages are committed now, not in a step */
    memset(kv->k, 0, rounded);
    memset(kv->v, 0, rounded);
    *out = kv;
    return 0;
}

void kvs_cpu_kv_destroy(kvs_backend *b, kvs_kv_cache **kvp)
{
    if (kvp == NULL || *kvp == NULL) {
        return;
    }
    free((*kvp)->k);
    free((*kvp)->v);
    free(*kvp);
    *kvp = NULL;
}

int kvs_cpu_kv_copy_block(kvs_backend *b, kvs_kv_cache *kv, int32_t src, int32_t dst)
{
    assert(kv != NULL);
    if (src < 0 || src >= kv->layout.n_block || dst < 0 || dst >= kv->layout.n_block) {
        return KVS_OUT_OF_RANGE;
    }
    if (src == dst) {
        return 0;
    }
    for (int32_t l = 0; l < kv->layout.n_layer; l++) {
        size_t base = (size_t)l * kv->layer_stride;
        memcpy(kv->k + base + (size_t)dst * kv->block_stride,
               kv->k + base + (size_t)src * kv->block_stride, kv->block_stride);
        memcpy(kv->v + base + (size_t)dst * kv->block_stride,
               kv->v + base + (size_t)src * kv->block_stride, kv->block_stride);
    }
    return 0;
}

/* Canonical block layout (kernels/backend.h): per layer K[cell][kv_head][head_dim] then
 * V[cell][kv_head][head_dim]; inside, a block is [kv_head][cell][head_dim]. */
static int kv_block_io(kvs_kv_cache *kv, int32_t block, uint8_t *buf, bool write)
{
    if (block < 0 || block >= kv->layout.n_block) {
        return KVS_OUT_OF_RANGE;
    }
    const int32_t bs = kv->layout.block_size, nh = kv->layout.n_kv_head;
    const size_t row = (size_t)kv->layout.head_dim * kv->elem; /* one head of one cell */
    size_t off = 0;
    for (int32_t l = 0; l < kv->layout.n_layer; l++) {
        for (int kvi = 0; kvi < 2; kvi++) {
            uint8_t *base = (kvi == 0 ? kv->k : kv->v) + (size_t)l * kv->layer_stride +
                            (size_t)block * kv->block_stride;
            for (int32_t c = 0; c < bs; c++) {
                for (int32_t h = 0; h < nh; h++) {
                    uint8_t *cell = base + (size_t)h * kv->head_stride + (size_t)c * row;
                    if (write) {
                        memcpy(cell, buf + off, row);
                    } else {
                        memcpy(buf + off, cell, row);
                    }
                    off += row;
                }
            }
        }
    }
    return 0;
}

int kvs_cpu_kv_read_block(kvs_backend *b, kvs_kv_cache *kv, int32_t block, void *host_buf)
{
    (void)b;
    return kv_block_io(kv, block, host_buf, false);
}

int kvs_cpu_kv_write_block(kvs_backend *b, kvs_kv_cache *kv, int32_t block, const void *host_buf)
{
    (void)b;
    return kv_block_io(kv, block, (uint8_t *)(uintptr_t)host_buf, true);
}

/* Byte offset of (layer, cell slot, kv head) in K or V. */
static size_t cell_offset(const kvs_kv_cache *kv, int32_t layer, int32_t slot, int32_t h)
{
    int32_t bs = kv->layout.block_size;
    return (size_t)layer * kv->layer_stride + (size_t)(slot / bs) * kv->block_stride +
           (size_t)h * kv->head_stride + (size_t)(slot % bs) * (size_t)kv->layout.head_dim * kv->elem;
}

int kvs_cpu_kv_store(kvs_backend *b, kvs_kv_cache *kv, int32_t layer, const float *k,
                     const float *v, const struct kvs_attn_batch *ab)
{
    struct kvs_cpu *c = b->ctx;
    assert(kv != NULL && k != NULL && v != NULL && ab != NULL);
    const struct kvs_kv_layout *l = &kv->layout;
    if (layer < 0 || layer >= l->n_layer) {
        return KVS_OUT_OF_RANGE;
    }
    int64_t n_slots = (int64_t)l->n_block * l->block_size;
    for (int32_t r = 0; r < ab->n_rows; r++) {
        if (ab->row_slot[r] < 0 || ab->row_slot[r] >= n_slots) {
            return KVS_OUT_OF_RANGE;
        }
    }
    int32_t hd = l->head_dim;
    for (int32_t r = 0; r < ab->n_rows; r++) {
        for (int32_t h = 0; h < l->n_kv_head; h++) {
            size_t off = cell_offset(kv, layer, ab->row_slot[r], h);
            const float *ks = k + ((int64_t)r * l->n_kv_head + h) * hd;
            const float *vs = v + ((int64_t)r * l->n_kv_head + h) * hd;
            if (l->dtype == KVS_DTYPE_F32) {
                memcpy(kv->k + off, ks, (size_t)hd * sizeof(float));
                memcpy(kv->v + off, vs, (size_t)hd * sizeof(float));
            } else {
                c->k->f32_to_f16(ks, (uint16_t *)(kv->k + off), hd);
                c->k->f32_to_f16(vs, (uint16_t *)(kv->v + off), hd);
            }
        }
    }
    return 0;
}

struct attn_job {
    const struct kvs_cpu_kernels *k;
    struct kvs_cpu_thread_scratch *ts; /* (n_threads) */
    const kvs_kv_cache *kv;
    int32_t layer, n_head, group;      /* group = n_head / n_kv_head */
    float scale;
    const float *q;                    /* (n_rows, n_head, head_dim) */
    const struct kvs_attn_batch *ab;
    float *out;                        /* (n_rows, n_head, head_dim) */
};

/* One (row, KV head): the online softmax described at the top of the file for each of the
 * group's query heads; the heads walk the blocks together so each K/V block is read once,
 * and each head's operations are exactly those it would do alone. Scratch: scores
 * (2 * block_size), acc (group * head_dim + 2 * group). */
static void attend_group(const struct attn_job *j, int32_t r, int32_t kvh, float *scores,
                         float *acc)
{
    const kvs_kv_cache *kv = j->kv;
    const struct kvs_cpu_kernels *k = j->k;
    const int32_t hd = kv->layout.head_dim, bs = kv->layout.block_size, G = j->group;
    const int32_t n_ctx = j->ab->row_ctx[r];
    const int32_t *table = j->ab->tables + j->ab->row_table[r];
    const size_t base = (size_t)j->layer * kv->layer_stride + (size_t)kvh * kv->head_stride;
    const bool f16 = kv->layout.dtype == KVS_DTYPE_F16;
    float *m = acc + (int64_t)G * hd, *l = m + G;
    float *p16 = scores + bs; /* a block's weights rounded to f16 (f16 caches) */

    /* With an f16 cache, q is rounded to f16 and so are the softmax weights that scale V,
     * exactly where llama.cpp's CPU attention rounds them (its K.q and P.V products take f16
     * operands), so that quantized models track llama.cpp's numerics. */
    float q16[8 * 256]; /* group * head_dim, checked by kvs_cpu_attention */
    const float *q = j->q + ((int64_t)r * j->n_head + (int64_t)kvh * G) * hd;
    if (f16) {
        for (int32_t d = 0; d < G * hd; d++) {
            q16[d] = kvs_cpu_f16_to_f32(kvs_cpu_f32_to_f16(q[d]));
        }
        q = q16;
    }
    for (int32_t g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    memset(acc, 0, (size_t)G * hd * sizeof(float));
    for (int32_t c0 = 0; c0 < n_ctx; c0 += bs) {
        int32_t nc = n_ctx - c0 < bs ? n_ctx - c0 : bs;
        size_t boff = base + (size_t)table[c0 / bs] * kv->block_stride;
        const uint8_t *kb = kv->k + boff, *vb = kv->v + boff;
        for (int32_t g = 0; g < G; g++) {
            const float *qg = q + (int64_t)g * hd;
            float *ag = acc + (int64_t)g * hd;
            if (f16) {
                k->scores_f16(qg, (const uint16_t *)kb, nc, hd, j->scale, scores);
            } else {
                k->scores_f32(qg, (const float *)kb, nc, hd, j->scale, scores);
            }
            float bmax = -INFINITY;
            for (int32_t i = 0; i < nc; i++) {
                bmax = scores[i] > bmax ? scores[i] : bmax;
            }
            float mn = bmax > m[g] ? bmax : m[g];
            if (c0 > 0) {
                float corr = expf(m[g] - mn);
                l[g] = l[g] * corr;
                k->scale(ag, corr, hd);
            }
            m[g] = mn;
            k->exp_shift(scores, nc, mn); /* scores now hold the weights p */
            for (int32_t i = 0; i < nc; i++) {
                l[g] = l[g] + scores[i];
            }
            if (f16) {
                for (int32_t i = 0; i < nc; i++) {
                    p16[i] = kvs_cpu_f16_to_f32(kvs_cpu_f32_to_f16(scores[i]));
                }
                k->pv_f16(ag, p16, (const uint16_t *)vb, nc, hd);
            } else {
                k->pv_f32(ag, scores, (const float *)vb, nc, hd);
            }
        }
    }
    for (int32_t g = 0; g < G; g++) {
        float *out = j->out + ((int64_t)r * j->n_head + (int64_t)kvh * G + g) * hd;
        float inv = 1.0f / l[g];
        for (int32_t d = 0; d < hd; d++) {
            out[d] = acc[(int64_t)g * hd + d] * inv;
        }
    }
}

static void attn_range(void *arg, int64_t i0, int64_t i1, int32_t ith)
{
    const struct attn_job *j = arg;
    const int32_t n_kv_head = j->kv->layout.n_kv_head;
    struct kvs_cpu_thread_scratch *ts = &j->ts[ith];
    for (int64_t i = i0; i < i1; i++) {
        attend_group(j, (int32_t)(i / n_kv_head), (int32_t)(i % n_kv_head), ts->scores, ts->acc);
    }
}

int kvs_cpu_attention(kvs_backend *b, kvs_kv_cache *kv, int32_t layer, const float *q,
                      int32_t n_head, float scale, const struct kvs_attn_batch *ab, float *out)
{
    struct kvs_cpu *c = b->ctx;
    assert(kv != NULL && q != NULL && ab != NULL && out != NULL);
    const struct kvs_kv_layout *l = &kv->layout;
    if (layer < 0 || layer >= l->n_layer) {
        return KVS_OUT_OF_RANGE;
    }
    if (n_head <= 0 || n_head % l->n_kv_head != 0 ||
        (int64_t)(n_head / l->n_kv_head) * l->head_dim > 8 * 256) {
        return KVS_INVALID_ARGUMENT; /* q16 scratch: group * head_dim <= 2048 */
    }
    const int32_t group = n_head / l->n_kv_head;
    /* validate every block a row will read before any work starts */
    for (int32_t r = 0; r < ab->n_rows; r++) {
        if (ab->row_ctx[r] <= 0 || ab->row_table[r] < 0) {
            return KVS_INVALID_ARGUMENT;
        }
        int32_t nblk = (ab->row_ctx[r] + l->block_size - 1) / l->block_size;
        const int32_t *t = ab->tables + ab->row_table[r];
        for (int32_t i = 0; i < nblk; i++) {
            if (t[i] < 0 || t[i] >= l->n_block) {
                return KVS_OUT_OF_RANGE;
            }
        }
    }
    for (int32_t t = 0; t < c->n_threads; t++) {
        struct kvs_cpu_thread_scratch *ts = &c->ts[t];
        KVS_TRY(kvs_cpu_scratch_reserve((void **)&ts->scores, &ts->cap_scores,
                                        2 * (int64_t)l->block_size, sizeof(float)));
        KVS_TRY(kvs_cpu_scratch_reserve((void **)&ts->acc, &ts->cap_acc,
                                        (int64_t)group * (l->head_dim + 2), sizeof(float)));
    }
    struct attn_job j = {.k = c->k,
                         .ts = c->ts,
                         .kv = kv,
                         .layer = layer,
                         .n_head = n_head,
                         .group = group,
                         .scale = scale,
                         .q = q,
                         .ab = ab,
                         .out = out};
    /* (row, KV head) pairs in small chunks: rows of a prefill chunk have growing contexts */
    kvs_threadpool_for_chunks(c->pool, (int64_t)ab->n_rows * l->n_kv_head, 1, 16, attn_range,
                              &j);
    return 0;
}
