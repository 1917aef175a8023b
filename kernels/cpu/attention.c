/* KV storage and paged attention (GQA) for the CPU backend.
 *
 * Storage: K and V each (n_layer, n_block, n_kv_head, block_size, head_dim) in F32 or F16,
 * so one KV head's cells of a block are contiguous for the attention walk, and one block of
 * one layer is one contiguous run (n_kv_head * block_size * head_dim elements) for copies.
 *
 * Attention of (row r, head h) over its cells c = 0 .. n-1 (n = row_ctx[r], cells in
 * position order through the block table), computed as llama.cpp's CPU backend computes its
 * non-flash attention for a prompt batch (ggml mul_mat through the llamafile f16 kernel, then
 * soft_max_ext, then mul_mat), so that quantized models track llama.cpp bit for bit:
 *   q is rounded to f16 (f16 cache)
 *   s_c = dot16(q, k_c) * scale            (16-lane chains over d, reduce_add's tree)
 *   m   = max_c s_c
 *   e_c = exp(s_c - m)                      (the level's exp: at the AVX-512 level ggml's)
 *   sum = sum over chunks of 16 cells in order of (double) reduce16(e of the chunk)
 *   p_c = e_c * (float)(1 / sum), rounded to f16 (f16 cache)
 *   out[d] = reduce16 over lanes l of the chains a_l[d] = fma(p_c, v_c[d], a_l[d]) for the
 *            cells c = l, l + 16, l + 32, ... in order
 * (llama.cpp pads its rows to 256 cells with masked ones whose weight is 0: they change no
 * sum and no chain.) Each (row, head) is computed by this one routine whatever the batch, so
 * the results are batch-invariant; llama.cpp's single-token path (ggml_vec_dot_f16) orders
 * its sums differently, so its decode steps are not reproduced bit for bit. */
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

/* Work units: rows of one sequence that are consecutive in the batch (same row_table) form
 * tiles of up to TILE_ROWS rows; a task is (tile, KV head): the tile's K and V cells are
 * gathered (and widened from f16) once for its rows and the group's heads, and each
 * (row, head) is then computed alone by the routine at the top of the file. */
#define TILE_ROWS 8

struct attn_job {
    const struct kvs_cpu_kernels *k;
    struct kvs_cpu_thread_scratch *ts; /* (n_threads) */
    const kvs_kv_cache *kv;
    int32_t layer, n_head, group;      /* group = n_head / n_kv_head */
    float scale;
    const float *q;                    /* (n_rows, n_head, head_dim) */
    const struct kvs_attn_batch *ab;
    float *out;                        /* (n_rows, n_head, head_dim) */
    const int32_t *tile_r0;            /* (n_tiles + 1) first row of each tile */
};

#define CHUNK_CELLS 128 /* cells of K or V (f32) walked by all of a tile's pairs while in L1 */

/* Gather cells [c0, c0 + nc) of a tile's KV head (table: its block table) into dst, rows
 * of head_dim f32 in position order (f16 widened: exact). */
static void gather_cells(const struct attn_job *j, const uint8_t *kv_base, size_t base,
                         const int32_t *table, int32_t c0, int32_t nc, float *dst)
{
    const kvs_kv_cache *kv = j->kv;
    const int32_t hd = kv->layout.head_dim, bs = kv->layout.block_size;
    const size_t cell_bytes = (size_t)hd * kv->elem;
    for (int32_t c = c0; c < c0 + nc;) { /* a block's run of cells at a time */
        const int32_t in_blk = bs - c % bs;
        const int32_t n = c0 + nc - c < in_blk ? c0 + nc - c : in_blk;
        const uint8_t *src = kv_base + base + (size_t)table[c / bs] * kv->block_stride +
                             (size_t)(c % bs) * cell_bytes;
        float *d = dst + (int64_t)(c - c0) * hd;
        if (kv->layout.dtype == KVS_DTYPE_F16) {
            j->k->f16_to_f32((const uint16_t *)src, d, (int64_t)n * hd);
        } else {
            memcpy(d, src, (size_t)n * hd * sizeof(float));
        }
        c += n;
    }
}

/* One (tile, KV head): the pairs (row r, head h of the group), P = R * G of them, each
 * computed by the routine at the top of the file. Scores, softmax, then p.V, where scores
 * and p.V walk the cells a chunk at a time: the chunk's K (then V) rows are gathered into
 * an L1-sized buffer (widened from f16, exactly) and used by every pair before the next.
 * Scratch: scores (P * (17 * head_dim + n16) + CHUNK_CELLS * head_dim floats, n16 = the
 * longest context rounded up to 16). */
static void attend_tile(const struct attn_job *j, int32_t tile, int32_t kvh,
                        struct kvs_cpu_thread_scratch *ts)
{
    const kvs_kv_cache *kv = j->kv;
    const struct kvs_cpu_kernels *k = j->k;
    const int32_t hd = kv->layout.head_dim, G = j->group;
    const int32_t r0 = j->tile_r0[tile], R = j->tile_r0[tile + 1] - r0, P = R * G;
    const int32_t *ctx = j->ab->row_ctx + r0;
    const int32_t *table = j->ab->tables + j->ab->row_table[r0];
    const size_t base = (size_t)j->layer * kv->layer_stride + (size_t)kvh * kv->head_stride;
    const bool f16 = kv->layout.dtype == KVS_DTYPE_F16;
    int32_t max_ctx = 0;
    for (int32_t r = 0; r < R; r++) {
        max_ctx = ctx[r] > max_ctx ? ctx[r] : max_ctx;
    }
    const int32_t n16 = (max_ctx + 15) / 16 * 16;
    float *qr = ts->scores, *lanes = qr + (int64_t)P * hd, *sc = lanes + (int64_t)P * 16 * hd;
    float *cw = sc + (int64_t)P * n16; /* (CHUNK_CELLS, hd) the chunk's K or V rows */
    /* pair i = (row i / G, head kvh * G + i % G): its query (rounded to f16 with an f16
     * cache), then its scores a chunk of cells at a time */
    for (int32_t i = 0; i < P; i++) {
        const int64_t qo = ((int64_t)(r0 + i / G) * j->n_head + (int64_t)kvh * G + i % G) * hd;
        memcpy(qr + (int64_t)i * hd, j->q + qo, (size_t)hd * sizeof(float));
    }
    if (f16) {
        k->round_f16(qr, (int64_t)P * hd);
    }
    for (int32_t c0 = 0; c0 < max_ctx; c0 += CHUNK_CELLS) {
        const int32_t nc = max_ctx - c0 < CHUNK_CELLS ? max_ctx - c0 : CHUNK_CELLS;
        gather_cells(j, kv->k, base, table, c0, nc, cw);
        for (int32_t i = 0; i < P; i++) {
            const int32_t n = ctx[i / G];
            if (n > c0) {
                k->scores16(qr + (int64_t)i * hd, cw, n - c0 < nc ? n - c0 : nc, hd, j->scale,
                            sc + (int64_t)i * n16 + c0);
            }
        }
    }
    /* softmax per pair: the maximum (exact in any order: 8 running maxima), then the exps
     * and their sum a chunk of 16 cells at a time (cells past n are masked: exp(-inf) = 0),
     * then the weights e * (float)(1 / sum), rounded to f16 with an f16 cache */
    for (int32_t i = 0; i < P; i++) {
        float *s = sc + (int64_t)i * n16;
        const int32_t n = ctx[i / G], m16 = (n + 15) / 16 * 16;
        for (int32_t c = n; c < m16; c++) {
            s[c] = -INFINITY;
        }
        float m8[8];
        for (int t = 0; t < 8; t++) {
            m8[t] = -INFINITY;
        }
        for (int32_t c = 0; c < m16; c += 8) {
            for (int t = 0; t < 8; t++) {
                m8[t] = s[c + t] > m8[t] ? s[c + t] : m8[t];
            }
        }
        float m = m8[0];
        for (int t = 1; t < 8; t++) {
            m = m8[t] > m ? m8[t] : m;
        }
        k->exp_shift(s, m16, m);
        double sum = 0.0;
        for (int32_t c = 0; c < n; c += 16) {
            sum += (double)kvs_cpu_reduce16(s + c);
        }
        k->scale(s, (float)(1.0 / sum), n);
        if (f16) {
            k->round_f16(s, n);
        }
    }
    /* p.V: lane l of a pair takes the cells l, l + 16, ... in order (a chunk of them at a
     * time: the chunk's cells of lane l are CHUNK_CELLS / 16 rows 16 rows apart, few enough
     * for the L1's ways); then each pair's lanes' tree */
    memset(lanes, 0, (size_t)P * 16 * hd * sizeof(float));
    for (int32_t c0 = 0; c0 < max_ctx; c0 += CHUNK_CELLS) {
        const int32_t nc = max_ctx - c0 < CHUNK_CELLS ? max_ctx - c0 : CHUNK_CELLS;
        gather_cells(j, kv->v, base, table, c0, nc, cw);
        for (int32_t i = 0; i < P; i++) {
            const int32_t n = ctx[i / G] - c0 < nc ? ctx[i / G] - c0 : nc; /* cells here */
            for (int32_t l = 0; l < 16 && l < n; l++) {
                k->pv16(lanes + ((int64_t)i * 16 + l) * hd, sc + (int64_t)i * n16 + c0 + l, 16,
                        cw + (int64_t)l * hd, 16 * (int64_t)hd, (n - 1 - l) / 16 + 1, hd);
            }
        }
    }
    for (int32_t i = 0; i < P; i++) {
        const int64_t qo = ((int64_t)(r0 + i / G) * j->n_head + (int64_t)kvh * G + i % G) * hd;
        k->lanes16(lanes + (int64_t)i * 16 * hd, hd, j->out + qo);
    }
}

static void attn_range(void *arg, int64_t i0, int64_t i1, int32_t ith)
{
    const struct attn_job *j = arg;
    const int32_t n_kv_head = j->kv->layout.n_kv_head;
    for (int64_t i = i0; i < i1; i++) {
        attend_tile(j, (int32_t)(i / n_kv_head), (int32_t)(i % n_kv_head), &j->ts[ith]);
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
    if (n_head <= 0 || n_head % l->n_kv_head != 0) {
        return KVS_INVALID_ARGUMENT;
    }
    const int32_t bs = l->block_size, hd = l->head_dim, group = n_head / l->n_kv_head;
    /* validate every block a row will read before any work starts */
    int32_t max_ctx = 0;
    for (int32_t r = 0; r < ab->n_rows; r++) {
        if (ab->row_ctx[r] <= 0 || ab->row_table[r] < 0) {
            return KVS_INVALID_ARGUMENT;
        }
        int32_t nblk = (ab->row_ctx[r] + bs - 1) / bs;
        const int32_t *t = ab->tables + ab->row_table[r];
        for (int32_t i = 0; i < nblk; i++) {
            if (t[i] < 0 || t[i] >= l->n_block) {
                return KVS_OUT_OF_RANGE;
            }
        }
        max_ctx = ab->row_ctx[r] > max_ctx ? ab->row_ctx[r] : max_ctx;
    }
    const int64_t n16 = (max_ctx + 15) / 16 * 16;
    for (int32_t t = 0; t < c->n_threads; t++) {
        struct kvs_cpu_thread_scratch *ts = &c->ts[t];
        KVS_TRY(kvs_cpu_scratch_reserve((void **)&ts->scores, &ts->cap_scores,
                                        TILE_ROWS * group * (17 * (int64_t)hd + n16) +
                                            CHUNK_CELLS * (int64_t)hd,
                                        sizeof(float)));
    }
    const int32_t n_rows = ab->n_rows;
    KVS_TRY(kvs_cpu_scratch_reserve((void **)&c->attn.idx, &c->attn.cap_idx, (int64_t)n_rows + 1,
                                    sizeof(int32_t)));
    int32_t *tile_r0 = c->attn.idx, n_tiles = 0;
    for (int32_t r = 0; r < n_rows;) {
        int32_t e = r + 1;
        while (e < n_rows && e - r < TILE_ROWS && ab->row_table[e] == ab->row_table[r]) {
            e++;
        }
        tile_r0[n_tiles++] = r;
        r = e;
    }
    tile_r0[n_tiles] = n_rows;
    struct attn_job j = {.k = c->k,
                         .ts = c->ts,
                         .kv = kv,
                         .layer = layer,
                         .n_head = n_head,
                         .group = group,
                         .scale = scale,
                         .q = q,
                         .ab = ab,
                         .out = out,
                         .tile_r0 = tile_r0};
    /* (tile, KV head) tasks in small chunks: rows of a prefill chunk have growing contexts.
     * (A task per head for a decode step, each gathering its KV head's cells itself, measured
     * 2x slower: the gather is most of a short row's work.) */
    kvs_threadpool_for_chunks(c->pool, (int64_t)n_tiles * l->n_kv_head, 1, 16, attn_range, &j);
    return 0;
}
