/* KV storage and paged attention (GQA) for the CPU backend.
 *
 * Storage: K and V each (n_layer, n_block, n_kv_head, block_size, head_dim) in F32 or F16,
 * so one KV head's cells of a block are contiguous for the attention walk, and one block of
 * one layer is one contiguous run (n_kv_head * block_size * head_dim elements) for copies.
 *
 * Attention of (row r, head h), online softmax in a fixed order that depends only on the
 * row's own context: for each block of cells 0..row_ctx[r]-1 in position order:
 *   s_j = dot(q, k_j) * scale           (the level's dot, cells j of the block in order)
 *   m'  = max(m, max_j s_j);  c = expf(m - m')  (skipped on the first block, and when
 *                                       m' = m, where c would be exactly 1)
 *   l   = l * c;  acc = acc * c
 *   p_j = exp(s_j - m')                 (the level's exp: libm, or the vector exp)
 *   for j in order: l = l + p_j;  then for j in order: acc = acc + p_j * v_j
 * With an f16 cache q and the p_j that scale V are rounded to f16, where llama.cpp's CPU
 * attention rounds them (l sums the unrounded p_j).
 * out = acc * (1 / l).
 *
 * Long rows: the context is cut into segments of KVS_CPU_ATTN_SEGMENT cells (rounded up to
 * whole blocks), a length that depends on nothing but the layout. Each segment runs the walk
 * above from its own first block (fresh m, l, acc), and the segments' states are folded in
 * segment order: m = max(m, m_s), a = exp(m_old - m), b = exp(m_s - m), l = l a + l_s b,
 * acc = acc * a, then acc = acc + b * acc_s (the level's scale and axpy). A row of one
 * segment is exactly the walk above. Segments of one row may run on different threads
 * (the states are then kept and folded afterwards, in the same order), so a single long
 * decode row keeps every thread busy. */
#include "kernels/cpu/cpu_impl.h"

#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define KVS_CPU_ATTN_SEGMENT 1024 /* cells per segment of a long row, before rounding */

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

/* Work units. Rows of one sequence that are consecutive in the batch (same row_table) form
 * tiles of up to TILE_ROWS rows that walk their shared blocks together: each K/V block is
 * read once for the tile's rows and the group's heads (the multi kernels), while every
 * (row, head) performs exactly the operations it would perform alone; a row whose context
 * ends earlier stops at its own last cell. */
#define TILE_ROWS 8
#define PAIRS_MAX 64 /* (row, head) pairs of a tile: group * tile rows */
#define SPLIT_MAX_FLOATS ((int64_t)16 << 20) /* segment records kept in split mode (64 MiB) */

struct attn_job {
    const struct kvs_cpu_kernels *k;
    struct kvs_cpu_thread_scratch *ts; /* (n_threads) */
    const kvs_kv_cache *kv;
    int32_t layer, n_head, group;      /* group = n_head / n_kv_head */
    float scale;
    const float *q;                    /* (n_rows, n_head, head_dim) */
    const struct kvs_attn_batch *ab;
    float *out;                        /* (n_rows, n_head, head_dim) */
    int32_t seg;                       /* cells per segment, a multiple of block_size */
    const int32_t *tile_r0;            /* (n_tiles + 1) first row of each tile */
    const int32_t *task;               /* (n_task, 2) tile, segment (-1: all, folded) */
    const int32_t *rec;                /* (n_rows) first partial record of a row, split mode */
    const int32_t *merge_rows;         /* rows of more than one segment, split mode */
    float *part;                       /* records (acc[hd], m, l) per (row, head, segment) */
};

static int32_t n_segments(const struct attn_job *j, int32_t n_ctx)
{
    return (n_ctx + j->seg - 1) / j->seg;
}

/* Fold the state (acc_s, m_s, l_s) of the next segment into (acc, m, l), in this order. */
static void merge_state(const struct kvs_cpu_kernels *k, float *acc, float *m, float *l,
                        const float *acc_s, float m_s, float l_s, int32_t hd)
{
    float mn = m_s > *m ? m_s : *m;
    float ca = expf(*m - mn), cb = expf(m_s - mn);
    float la = *l * ca, lb = l_s * cb;
    *l = la + lb;
    *m = mn;
    k->scale(acc, ca, hd);
    k->axpy_f32(acc, cb, acc_s, hd);
}

static void finalize(float *out, const float *acc, float l, int32_t hd)
{
    float inv = 1.0f / l;
    for (int32_t d = 0; d < hd; d++) {
        out[d] = acc[d] * inv;
    }
}

/* One (tile, KV head, segment or all segments): for each segment, the online softmax at the
 * top of the file over the segment's cells for each (row, group head) whose context reaches
 * it, then the fold of the segment into the row's running state (the first segment is the
 * state). Scratch: scores (2 * R * G * block_size + 2 * block_size * head_dim),
 * acc (R * G * (3 * head_dim + 4)). */
static void attend_tile(const struct attn_job *j, int32_t tile, int32_t kvh, int32_t seg_sel,
                        float *scores, float *acc)
{
    const kvs_kv_cache *kv = j->kv;
    const struct kvs_cpu_kernels *k = j->k;
    const int32_t hd = kv->layout.head_dim, bs = kv->layout.block_size, G = j->group;
    const int32_t r0 = j->tile_r0[tile], R = j->tile_r0[tile + 1] - r0, P = R * G;
    const int32_t *ctx = j->ab->row_ctx + r0;
    const int32_t *table = j->ab->tables + j->ab->row_table[r0];
    const size_t base = (size_t)j->layer * kv->layer_stride + (size_t)kvh * kv->head_stride;
    const bool f16 = kv->layout.dtype == KVS_DTYPE_F16;
    /* pair i = (row i / G, head kvh * G + i % G) */
    float *run = acc, *run_m = run + (int64_t)P * hd, *run_l = run_m + P;
    float *cur = run_l + P, *cur_m = cur + (int64_t)P * hd, *cur_l = cur_m + P;
    float *q16 = cur_l + P;
    float *sc = scores, *p16 = scores + (int64_t)P * bs;
    float *kw = p16 + (int64_t)P * bs, *vw = kw + (int64_t)bs * hd; /* widened blocks */
    int32_t max_ctx = 0;
    for (int32_t r = 0; r < R; r++) {
        max_ctx = ctx[r] > max_ctx ? ctx[r] : max_ctx;
    }
    /* With an f16 cache, q is rounded to f16 and so are the softmax weights that scale V,
     * exactly where llama.cpp's CPU attention rounds them (its K.q and P.V products take f16
     * operands), so that quantized models track llama.cpp's numerics. */
    const float *qp[PAIRS_MAX];
    const float *pp[PAIRS_MAX];
    float *op[PAIRS_MAX], *ap[PAIRS_MAX];
    for (int32_t r = 0; r < R; r++) {
        const float *q = j->q + ((int64_t)(r0 + r) * j->n_head + (int64_t)kvh * G) * hd;
        float *qd = q16 + (int64_t)r * G * hd;
        if (f16) {
            memcpy(qd, q, (size_t)G * hd * sizeof(float));
            k->round_f16(qd, (int64_t)G * hd);
        } else {
            memcpy(qd, q, (size_t)G * hd * sizeof(float)); /* same bits, contiguous per tile */
        }
    }
    const int32_t n_seg = n_segments(j, max_ctx);
    const int32_t s_begin = seg_sel < 0 ? 0 : seg_sel, s_end = seg_sel < 0 ? n_seg : seg_sel + 1;
    for (int32_t s = s_begin; s < s_end; s++) {
        const int32_t c_start = s * j->seg;
        const int32_t c_end = max_ctx - c_start < j->seg ? max_ctx : c_start + j->seg;
        float *st = s == s_begin ? run : cur, *st_m = s == s_begin ? run_m : cur_m;
        float *st_l = s == s_begin ? run_l : cur_l;
        for (int32_t i = 0; i < P; i++) {
            st_m[i] = -INFINITY;
            st_l[i] = 0.0f;
        }
        memset(st, 0, (size_t)P * hd * sizeof(float));
        for (int32_t c0 = c_start; c0 < c_end; c0 += bs) {
            const int32_t n_blk = c_end - c0 < bs ? c_end - c0 : bs;
            size_t boff = base + (size_t)table[c0 / bs] * kv->block_stride;
            const uint8_t *kb = kv->k + boff, *vb = kv->v + boff;
            /* many pairs: widen the f16 block to f32 once (exact, so every product is the
             * one the f16 kernels form) instead of once per kernel call */
            bool f16b = f16;
            if (f16 && P > 3) {
                k->f16_to_f32((const uint16_t *)kb, kw, (int64_t)n_blk * hd);
                k->f16_to_f32((const uint16_t *)vb, vw, (int64_t)n_blk * hd);
                kb = (const uint8_t *)kw;
                vb = (const uint8_t *)vw;
                f16b = false;
            }
            /* scores of every active pair over the block's cells (a cell's score does not
             * depend on how many cells are computed; a row uses its own first nc) */
            int32_t np = 0;
            for (int32_t i = 0; i <= P; i++) {
                if (np == PAIRS_MAX || (i == P && np > 0)) {
                    if (f16b) {
                        k->scores_multi_f16(qp, np, (const uint16_t *)kb, n_blk, hd, j->scale, op);
                    } else {
                        k->scores_multi_f32(qp, np, (const float *)kb, n_blk, hd, j->scale, op);
                    }
                    np = 0;
                }
                if (i < P && ctx[i / G] > c0) {
                    qp[np] = q16 + (int64_t)i * hd;
                    op[np++] = sc + (int64_t)i * bs;
                }
            }
            /* the per-pair softmax update; the pairs' serial chains (block max, sum of the
             * weights) run side by side in lanes (col_max / col_sum), each in its own order */
            float bmax[PAIRS_MAX], lsum[PAIRS_MAX];
            int32_t act[PAIRS_MAX], ncs[PAIRS_MAX], offs[PAIRS_MAX];
            int32_t na = 0;
            for (int32_t i = 0; i < P; i++) {
                if (ctx[i / G] > c0) {
                    act[na] = i;
                    offs[na] = i * bs;
                    ncs[na++] = ctx[i / G] - c0 < bs ? ctx[i / G] - c0 : bs;
                }
            }
            k->col_max(sc, offs, ncs, na, n_blk, bmax);
            for (int32_t a = 0; a < na; a++) {
                const int32_t i = act[a], nc = ncs[a];
                float *si = sc + (int64_t)i * bs;
                float mn = bmax[a] > st_m[i] ? bmax[a] : st_m[i];
                /* a correction of exactly 1 (the maximum did not move) changes no bits */
                if (c0 > c_start && mn != st_m[i]) {
                    float corr = expf(st_m[i] - mn);
                    st_l[i] = st_l[i] * corr;
                    k->scale(st + (int64_t)i * hd, corr, hd);
                }
                st_m[i] = mn;
                k->exp_shift(si, nc, mn); /* si now holds the weights p */
                lsum[a] = st_l[i];
            }
            k->col_sum(sc, offs, ncs, na, n_blk, lsum);
            for (int32_t a = 0; a < na; a++) {
                st_l[act[a]] = lsum[a];
            }
            if (f16) {
                for (int32_t a = 0; a < na; a++) {
                    memcpy(p16 + (int64_t)act[a] * bs, sc + (int64_t)act[a] * bs,
                           (size_t)ncs[a] * sizeof(float));
                    k->round_f16(p16 + (int64_t)act[a] * bs, ncs[a]);
                }
            }
            /* p.V: pairs that take the whole block together, the others one by one */
            const float *pw = f16 ? p16 : sc;
            np = 0;
            for (int32_t i = 0; i <= P; i++) {
                if (np == PAIRS_MAX || (i == P && np > 0)) {
                    if (f16b) {
                        k->pv_multi_f16(ap, pp, np, (const uint16_t *)vb, n_blk, hd);
                    } else {
                        k->pv_multi_f32(ap, pp, np, (const float *)vb, n_blk, hd);
                    }
                    np = 0;
                }
                if (i == P || ctx[i / G] <= c0) {
                    continue;
                }
                const int32_t nc = ctx[i / G] - c0 < bs ? ctx[i / G] - c0 : bs;
                float *a = st + (int64_t)i * hd;
                const float *w = pw + (int64_t)i * bs;
                if (nc == n_blk) {
                    ap[np] = a;
                    pp[np++] = w;
                } else if (f16b) {
                    k->pv_multi_f16(&a, &w, 1, (const uint16_t *)vb, nc, hd);
                } else {
                    k->pv_multi_f32(&a, &w, 1, (const float *)vb, nc, hd);
                }
            }
        }
        if (s != s_begin) {
            for (int32_t i = 0; i < P; i++) {
                if (ctx[i / G] > c_start) {
                    merge_state(k, run + (int64_t)i * hd, &run_m[i], &run_l[i],
                                cur + (int64_t)i * hd, cur_m[i], cur_l[i], hd);
                }
            }
        }
    }
    for (int32_t i = 0; i < P; i++) {
        const int32_t r = r0 + i / G, h = kvh * G + i % G;
        const int32_t ns = n_segments(j, ctx[i / G]);
        if (seg_sel < 0 || ns == 1) {
            if (seg_sel <= 0) {
                finalize(j->out + ((int64_t)r * j->n_head + h) * hd, run + (int64_t)i * hd,
                         run_l[i], hd);
            }
        } else if (ctx[i / G] > seg_sel * j->seg) {
            float *rec = j->part + ((int64_t)j->rec[r] + (int64_t)h * ns + seg_sel) * (hd + 2);
            memcpy(rec, run + (int64_t)i * hd, (size_t)hd * sizeof(float));
            rec[hd] = run_m[i];
            rec[hd + 1] = run_l[i];
        }
    }
}

static void attn_range(void *arg, int64_t i0, int64_t i1, int32_t ith)
{
    const struct attn_job *j = arg;
    const int32_t n_kv_head = j->kv->layout.n_kv_head;
    struct kvs_cpu_thread_scratch *ts = &j->ts[ith];
    for (int64_t i = i0; i < i1; i++) {
        const int32_t *t = j->task + 2 * (i / n_kv_head);
        attend_tile(j, t[0], (int32_t)(i % n_kv_head), t[1], ts->scores, ts->acc);
    }
}

/* Split mode: fold the segment records of (row, head) in segment order and finish the row. */
static void merge_range(void *arg, int64_t i0, int64_t i1, int32_t ith)
{
    const struct attn_job *j = arg;
    const int32_t hd = j->kv->layout.head_dim;
    float *acc = j->ts[ith].acc;
    for (int64_t i = i0; i < i1; i++) {
        const int32_t r = j->merge_rows[i / j->n_head], h = (int32_t)(i % j->n_head);
        const int32_t ns = n_segments(j, j->ab->row_ctx[r]);
        const float *rec = j->part + ((int64_t)j->rec[r] + (int64_t)h * ns) * (hd + 2);
        memcpy(acc, rec, (size_t)hd * sizeof(float));
        float m = rec[hd], l = rec[hd + 1];
        for (int32_t s = 1; s < ns; s++) {
            const float *rs = rec + (int64_t)s * (hd + 2);
            merge_state(j->k, acc, &m, &l, rs, rs[hd], rs[hd + 1], hd);
        }
        finalize(j->out + ((int64_t)r * j->n_head + h) * hd, acc, l, hd);
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
        (int64_t)(n_head / l->n_kv_head) * l->head_dim > 8 * 256 ||
        n_head / l->n_kv_head > PAIRS_MAX) {
        return KVS_INVALID_ARGUMENT; /* group * head_dim <= 2048, group <= 64 */
    }
    const int32_t group = n_head / l->n_kv_head, bs = l->block_size, hd = l->head_dim;
    const int32_t seg = (KVS_CPU_ATTN_SEGMENT + bs - 1) / bs * bs;
    const int32_t tile_rows = TILE_ROWS < PAIRS_MAX / group ? TILE_ROWS : PAIRS_MAX / group;
    /* validate every block a row will read before any work starts */
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
    }
    const int64_t pairs = (int64_t)tile_rows * group;
    for (int32_t t = 0; t < c->n_threads; t++) {
        struct kvs_cpu_thread_scratch *ts = &c->ts[t];
        KVS_TRY(kvs_cpu_scratch_reserve((void **)&ts->scores, &ts->cap_scores,
                                        2 * pairs * bs + 2 * (int64_t)bs * hd, sizeof(float)));
        KVS_TRY(kvs_cpu_scratch_reserve((void **)&ts->acc, &ts->cap_acc,
                                        pairs * (3 * (int64_t)hd + 4), sizeof(float)));
    }
    /* tiles, and the segments of the longest row of each */
    const int32_t n_rows = ab->n_rows;
    int32_t n_tiles = 0, n_seg_tasks = 0, n_long = 0;
    int64_t n_rec = 0;
    for (int32_t r = 0; r < n_rows;) {
        int32_t e = r + 1, max_ctx = ab->row_ctx[r];
        while (e < n_rows && e - r < tile_rows && ab->row_table[e] == ab->row_table[r]) {
            max_ctx = ab->row_ctx[e] > max_ctx ? ab->row_ctx[e] : max_ctx;
            e++;
        }
        n_tiles++;
        n_seg_tasks += (max_ctx + seg - 1) / seg;
        r = e;
    }
    for (int32_t r = 0; r < n_rows; r++) {
        int32_t ns = (ab->row_ctx[r] + seg - 1) / seg;
        if (ns > 1) {
            n_long++;
            n_rec += (int64_t)n_head * ns;
        }
    }
    /* Split mode (each segment a task of its own, records merged afterwards) when the tiles
     * alone cannot keep the threads busy: the arithmetic is the same fold either way. */
    const bool split = n_long > 0 && (int64_t)n_tiles * l->n_kv_head < 4 * (int64_t)c->n_threads &&
                       n_rec * (hd + 2) <= SPLIT_MAX_FLOATS;
    const int32_t n_task = split ? n_seg_tasks : n_tiles;
    KVS_TRY(kvs_cpu_scratch_reserve((void **)&c->attn.idx, &c->attn.cap_idx,
                                    (int64_t)n_tiles + 1 + 2 * (int64_t)n_task + 2 * n_rows,
                                    sizeof(int32_t)));
    if (split) {
        KVS_TRY(kvs_cpu_scratch_reserve((void **)&c->attn.part, &c->attn.cap_part,
                                        n_rec * (hd + 2), sizeof(float)));
    }
    int32_t *tile_r0 = c->attn.idx, *task = tile_r0 + n_tiles + 1, *rec = task + 2 * n_task;
    int32_t *merge_rows = rec + n_rows;
    int32_t ti = 0, tk = 0;
    for (int32_t r = 0; r < n_rows;) {
        int32_t e = r + 1, max_ctx = ab->row_ctx[r];
        while (e < n_rows && e - r < tile_rows && ab->row_table[e] == ab->row_table[r]) {
            max_ctx = ab->row_ctx[e] > max_ctx ? ab->row_ctx[e] : max_ctx;
            e++;
        }
        tile_r0[ti] = r;
        int32_t ns = split ? (max_ctx + seg - 1) / seg : 1;
        for (int32_t s = 0; s < ns; s++) {
            task[2 * tk] = ti;
            task[2 * tk + 1] = split ? s : -1;
            tk++;
        }
        ti++;
        r = e;
    }
    tile_r0[n_tiles] = n_rows;
    int64_t next = 0;
    int32_t nm = 0;
    for (int32_t r = 0; r < n_rows; r++) {
        int32_t ns = (ab->row_ctx[r] + seg - 1) / seg;
        rec[r] = ns > 1 ? (int32_t)next : -1;
        if (ns > 1) {
            next += (int64_t)n_head * ns;
            merge_rows[nm++] = r;
        }
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
                         .out = out,
                         .seg = seg,
                         .tile_r0 = tile_r0,
                         .task = task,
                         .rec = rec,
                         .merge_rows = merge_rows,
                         .part = c->attn.part};
    /* (task, KV head) pairs in small chunks: rows of a prefill chunk have growing contexts */
    kvs_threadpool_for_chunks(c->pool, (int64_t)n_task * l->n_kv_head, 1, 16, attn_range, &j);
    if (split) {
        kvs_threadpool_for(c->pool, (int64_t)n_long * n_head, 4, merge_range, &j);
    }
    return 0;
}
