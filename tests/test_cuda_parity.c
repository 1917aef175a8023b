/* kernels/cuda against the CPU backend (the reference), op by op on random inputs over
 * several shapes, then the whole forward on the HF-parity models and a synthetic model.
 * Skipped (exit 77) with the runtime's reason when there is no GPU or no CUDA build.
 *
 * Error measure: relative L2, ||gpu - cpu|| / ||cpu||, per op call (per row for logits).
 * Tolerances, and why:
 *   matmul, get_rows: 1e-2. The GPU keeps weights in bf16 (8-bit significand: each weight
 *     moves by up to 2^-9 relative) and, past KVS_CUDA_GEMV_MAX_ROWS rows, rounds x to bf16
 *     too; random errors over n_in terms give ~2^-9 relative, well under 1e-2.
 *   rmsnorm, swiglu, add, gather: 1e-5 (f32 on both, different summation order).
 *   rope: 1e-5 (angles in double on both).
 *   attention: 2e-2. K and V are stored in bf16 on the GPU (f32 on the CPU), Q and the
 *     softmax weights are rounded to bf16 for the tensor cores.
 *   forward logits: per position 2e-2 against HF (f32) and against the CPU backend (f32 KV);
 *     and teacher-forced top-1 agreement with the CPU >= 97% over the positions where the
 *     CPU's top-2 margin exceeds 5x that position's max |gpu - cpu| logit difference.
 * CUDA is never touched before the test body runs: the suite runs without fork (CK_NOFORK),
 * since a CUDA context does not survive fork. */
#include <check.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/status.h"
#include "kernels/backend.h"
#include "kernels/dtype.h"
#include "testutil.h"
#include "worker/forward.h"
#include "worker/kvpool.h"
#include "worker/model.h"

#ifdef KVS_HAVE_CUDA
#include "kernels/cuda/cuda.h"

/* ---- helpers --------------------------------------------------------------------------------- */

static uint64_t rng_state = 0x243f6a8885a308d3ull;

static uint64_t rnd_u64(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float rnd_unit(void) /* [-1, 1) */
{
    return (float)((double)(rnd_u64() >> 11) * 0x1.0p-53 * 2.0 - 1.0);
}

static void fill(float *x, int64_t n, float scale)
{
    for (int64_t i = 0; i < n; i++) {
        x[i] = rnd_unit() * scale;
    }
}

static kvs_backend *cpu, *gpu; /* made in main, once a GPU is known to exist */

static void *to_gpu(const void *host, size_t bytes)
{
    void *d = gpu->ops->alloc(gpu, bytes);
    ck_assert_ptr_nonnull(d);
    ck_assert_int_eq(gpu->ops->upload(gpu, d, host, bytes), 0);
    return d;
}

static void from_gpu(void *host, const void *dev, size_t bytes)
{
    ck_assert_int_eq(gpu->ops->sync(gpu), 0);
    ck_assert_int_eq(gpu->ops->download(gpu, host, dev, bytes), 0);
}

static double rel_l2(const float *got, const float *ref, int64_t n)
{
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)got[i] - (double)ref[i];
        if (!isfinite(got[i])) {
            return INFINITY;
        }
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static double worst_seen[16];
enum { W_MATMUL, W_ROWS, W_NORM, W_ROPE, W_EW, W_ATTN, W_N };
static const char *worst_name[W_N] = {"matmul", "get_rows", "rmsnorm", "rope", "swiglu/add/gather",
                                      "attention"};

static void expect_close(const float *got, const float *ref, int64_t n, double tol, int which,
                         const char *what)
{
    double e = rel_l2(got, ref, n);
    if (e > worst_seen[which] || isnan(e)) {
        worst_seen[which] = e;
    }
    ck_assert_msg(e <= tol, "%s: relative L2 error %.3g > %.3g", what, e, tol);
}

/* Random host bytes of a weight of type t, valid for that type (bounded scales). */
static void *random_weight(uint32_t t, int64_t n_out, int64_t n_in, size_t *row_bytes)
{
    uint64_t rb = 0;
    ck_assert(kvs_dtype_row_bytes(t, (uint64_t)n_in, &rb));
    uint8_t *p = malloc((size_t)rb * (size_t)n_out);
    ck_assert_ptr_nonnull(p);
    int64_t n = n_in * n_out;
    float s = 1.0f / sqrtf((float)n_in);
    switch (t) {
    case KVS_DTYPE_F32:
        fill((float *)p, n, s);
        break;
    case KVS_DTYPE_F16:
        for (int64_t i = 0; i < n; i++) {
            ((uint16_t *)p)[i] = kvs_fp32_to_fp16(rnd_unit() * s);
        }
        break;
    case KVS_DTYPE_BF16:
        for (int64_t i = 0; i < n; i++) {
            ((uint16_t *)p)[i] = kvs_fp32_to_bf16(rnd_unit() * s);
        }
        break;
    default: { /* quantized: random quants, a positive f16 scale (and an f16 min) per block */
        uint32_t bb = kvs_dtype_block_bytes(t);
        for (int64_t b = 0; b < n / 32; b++) {
            uint8_t *blk = p + b * bb;
            for (uint32_t j = 0; j < bb; j++) {
                blk[j] = (uint8_t)rnd_u64();
            }
            float d = s * (t == KVS_DTYPE_Q8_0 ? 1.0f / 64 : 1.0f / 8) * (0.5f + 0.5f * rnd_unit());
            uint16_t dh = kvs_fp32_to_fp16(d), mh = kvs_fp32_to_fp16(-8.0f * d);
            memcpy(blk, &dh, 2);
            if (t == KVS_DTYPE_Q4_1) {
                memcpy(blk + 2, &mh, 2);
            }
        }
    }
    }
    *row_bytes = (size_t)rb;
    return p;
}

static const uint32_t all_types[] = {KVS_DTYPE_F32, KVS_DTYPE_F16, KVS_DTYPE_BF16,
                                     KVS_DTYPE_Q8_0, KVS_DTYPE_Q4_0, KVS_DTYPE_Q4_1};
#define N_TYPES (sizeof all_types / sizeof all_types[0])

/* ---- ops ---------------------------------------------------------------------------------------- */

START_TEST(test_matmul)
{
    static const int32_t shapes[][3] = {/* n_out, n_in, n_rows */
                                        {64, 32, 1},    {96, 256, 3},    {256, 512, 8},
                                        {130, 1024, 9}, {512, 4096, 33}, {1000, 96, 130},
                                        {2048, 2048, 2}};
    for (size_t t = 0; t < N_TYPES; t++) {
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            int32_t n_out = shapes[s][0], n_in = shapes[s][1], n_rows = shapes[s][2];
            size_t rb = 0;
            void *hw = random_weight(all_types[t], n_out, n_in, &rb);
            struct kvs_weight wc = {.type = all_types[t], .n_in = n_in, .n_out = n_out,
                                    .row_bytes = rb};
            struct kvs_weight wg = wc;
            ck_assert_int_eq(cpu->ops->weight_load(cpu, &wc, hw), 0);
            ck_assert_int_eq(gpu->ops->weight_load(gpu, &wg, hw), 0);
            float *x = malloc((size_t)n_rows * n_in * 4), *bias = malloc((size_t)n_out * 4);
            float *yc = malloc((size_t)n_rows * n_out * 4), *yg = malloc((size_t)n_rows * n_out * 4);
            fill(x, (int64_t)n_rows * n_in, 1.0f);
            fill(bias, n_out, 0.5f);
            for (int with_bias = 0; with_bias < 2; with_bias++) {
                const float *bc = with_bias ? bias : NULL;
                ck_assert_int_eq(cpu->ops->matmul(cpu, &wc, x, n_rows, bc, yc), 0);
                float *dx = to_gpu(x, (size_t)n_rows * n_in * 4);
                float *db = with_bias ? to_gpu(bias, (size_t)n_out * 4) : NULL;
                float *dy = gpu->ops->alloc(gpu, (size_t)n_rows * n_out * 4);
                ck_assert_int_eq(gpu->ops->matmul(gpu, &wg, dx, n_rows, db, dy), 0);
                from_gpu(yg, dy, (size_t)n_rows * n_out * 4);
                char what[128];
                snprintf(what, sizeof what, "matmul %s %dx%d rows %d bias %d",
                         kvs_dtype_name(all_types[t]), n_out, n_in, n_rows, with_bias);
                expect_close(yg, yc, (int64_t)n_rows * n_out, 1e-2, W_MATMUL, what);
                gpu->ops->free(gpu, dx);
                gpu->ops->free(gpu, db);
                gpu->ops->free(gpu, dy);
            }
            /* get_rows from the same table */
            int32_t ids[5] = {0, n_out - 1, n_out / 2, 3 % n_out, n_out / 3};
            float *rc = malloc(5 * (size_t)n_in * 4), *rg = malloc(5 * (size_t)n_in * 4);
            ck_assert_int_eq(cpu->ops->get_rows(cpu, &wc, ids, 5, rc), 0);
            float *dr = gpu->ops->alloc(gpu, 5 * (size_t)n_in * 4);
            ck_assert_int_eq(gpu->ops->get_rows(gpu, &wg, ids, 5, dr), 0);
            from_gpu(rg, dr, 5 * (size_t)n_in * 4);
            expect_close(rg, rc, 5 * (int64_t)n_in, 1e-2, W_ROWS, "get_rows");
            int32_t bad = n_out;
            ck_assert_int_eq(gpu->ops->get_rows(gpu, &wg, &bad, 1, dr), KVS_OUT_OF_RANGE);
            gpu->ops->free(gpu, dr);
            free(rc);
            free(rg);
            cpu->ops->weight_free(cpu, &wc);
            gpu->ops->weight_free(gpu, &wg);
            free(hw);
            free(x);
            free(bias);
            free(yc);
            free(yg);
        }
    }
}
END_TEST

START_TEST(test_rowwise)
{
    static const int32_t shapes[][2] = {{1, 64}, {7, 4096}, {33, 896}, {300, 2048}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int32_t n = shapes[s][0], dim = shapes[s][1];
        int64_t ne = (int64_t)n * dim;
        size_t bytes = (size_t)ne * 4;
        float *x = malloc(bytes), *y = malloc(bytes), *w = malloc((size_t)dim * 4);
        float *rc = malloc(bytes), *rg = malloc(bytes);
        fill(x, ne, 3.0f);
        fill(y, ne, 3.0f);
        fill(w, dim, 1.5f);
        float *dx = to_gpu(x, bytes), *dy = to_gpu(y, bytes), *dw = to_gpu(w, (size_t)dim * 4);
        float *dout = gpu->ops->alloc(gpu, bytes);
        /* rmsnorm, out of place and in place */
        ck_assert_int_eq(cpu->ops->rmsnorm(cpu, x, w, n, dim, 1e-5f, rc), 0);
        ck_assert_int_eq(gpu->ops->rmsnorm(gpu, dx, dw, n, dim, 1e-5f, dout), 0);
        from_gpu(rg, dout, bytes);
        expect_close(rg, rc, ne, 1e-5, W_NORM, "rmsnorm");
        float *dx2 = to_gpu(x, bytes);
        ck_assert_int_eq(gpu->ops->rmsnorm(gpu, dx2, dw, n, dim, 1e-5f, dx2), 0);
        from_gpu(rg, dx2, bytes);
        expect_close(rg, rc, ne, 1e-5, W_NORM, "rmsnorm in place");
        /* swiglu */
        ck_assert_int_eq(cpu->ops->swiglu(cpu, x, y, ne, rc), 0);
        ck_assert_int_eq(gpu->ops->swiglu(gpu, dx, dy, ne, dout), 0);
        from_gpu(rg, dout, bytes);
        expect_close(rg, rc, ne, 1e-5, W_EW, "swiglu");
        /* add */
        memcpy(rc, x, bytes);
        ck_assert_int_eq(cpu->ops->add(cpu, rc, y, ne), 0);
        ck_assert_int_eq(gpu->ops->upload(gpu, dout, x, bytes), 0);
        ck_assert_int_eq(gpu->ops->add(gpu, dout, dy, ne), 0);
        from_gpu(rg, dout, bytes);
        expect_close(rg, rc, ne, 1e-6, W_EW, "add");
        /* gather: rows in a shuffled order with repeats */
        int32_t *idx = malloc((size_t)n * 4);
        for (int32_t i = 0; i < n; i++) {
            idx[i] = (int32_t)(rnd_u64() % (uint64_t)n);
        }
        ck_assert_int_eq(cpu->ops->gather(cpu, x, idx, n, dim, rc), 0);
        ck_assert_int_eq(gpu->ops->gather(gpu, dx, idx, n, dim, dout), 0);
        from_gpu(rg, dout, bytes);
        expect_close(rg, rc, ne, 0.0, W_EW, "gather");
        free(idx);
        gpu->ops->free(gpu, dx);
        gpu->ops->free(gpu, dx2);
        gpu->ops->free(gpu, dy);
        gpu->ops->free(gpu, dw);
        gpu->ops->free(gpu, dout);
        free(x);
        free(y);
        free(w);
        free(rc);
        free(rg);
    }
}
END_TEST

/* rope_store (rope q, rope k, store k and v in one kernel, the angles from a table made once
 * a forward) against rope, rope and kv_store on the same backend: the same bits in q, k and
 * in the stored cells. Three calls on the same buffers: new positions, then fewer rows, so a
 * table kept for other positions would show. */
START_TEST(test_rope_store)
{
    const int32_t nh = 8, nkv = 2, hd = 64, bs = 16;
    const struct kvs_kv_layout lay = {.n_layer = 2, .n_block = 8, .block_size = bs,
                                      .n_kv_head = nkv, .head_dim = hd, .dtype = KVS_DTYPE_BF16};
    kvs_kv_cache *kv1 = NULL, *kv2 = NULL;
    ck_assert_int_eq(gpu->ops->kv_new(gpu, &lay, &kv1), 0);
    ck_assert_int_eq(gpu->ops->kv_new(gpu, &lay, &kv2), 0);
    const size_t kvb = kvs_kv_block_bytes(&lay);
    unsigned char *b1 = malloc(kvb), *b2 = malloc(kvb);
    static const int32_t rows[] = {40, 40, 7};
    for (int call = 0; call < 3; call++) {
        const int32_t n = rows[call];
        const size_t qb = (size_t)n * nh * hd * 4, kb = (size_t)n * nkv * hd * 4;
        float *q = malloc(qb), *k = malloc(kb), *v = malloc(kb);
        float *q1 = malloc(qb), *q2 = malloc(qb), *k1 = malloc(kb), *k2 = malloc(kb);
        int32_t *pos = malloc((size_t)n * 4), *slot = malloc((size_t)n * 4);
        fill(q, (int64_t)n * nh * hd, 2.0f);
        fill(k, (int64_t)n * nkv * hd, 2.0f);
        fill(v, (int64_t)n * nkv * hd, 2.0f);
        for (int32_t i = 0; i < n; i++) {
            pos[i] = 1000 * call + 3 * i;
            slot[i] = i;
        }
        struct kvs_rope r = {.n_dims = hd, .style = KVS_ROPE_NEOX, .freq_base = 500000.0f,
                             .freq_scale = 1.0f};
        int32_t *dslot = to_gpu(slot, (size_t)n * 4);
        const struct kvs_attn_batch ab = {.n_rows = n, .row_slot = dslot};
        float *dq1 = to_gpu(q, qb), *dk1 = to_gpu(k, kb), *dq2 = to_gpu(q, qb);
        float *dk2 = to_gpu(k, kb), *dv = to_gpu(v, kb);
        ck_assert_int_eq(gpu->ops->rope_store(gpu, kv1, 1, dq1, nh, dk1, dv, nkv, hd, pos, &r, &ab),
                         0);
        ck_assert_int_eq(gpu->ops->rope(gpu, dq2, n, nh, hd, pos, &r), 0);
        ck_assert_int_eq(gpu->ops->rope(gpu, dk2, n, nkv, hd, pos, &r), 0);
        ck_assert_int_eq(gpu->ops->kv_store(gpu, kv2, 1, dk2, dv, &ab), 0);
        from_gpu(q1, dq1, qb);
        from_gpu(q2, dq2, qb);
        from_gpu(k1, dk1, kb);
        from_gpu(k2, dk2, kb);
        ck_assert_msg(memcmp(q1, q2, qb) == 0, "rope_store q differs (call %d)", call);
        ck_assert_msg(memcmp(k1, k2, kb) == 0, "rope_store k differs (call %d)", call);
        for (int32_t blk = 0; blk < (n + bs - 1) / bs; blk++) {
            ck_assert_int_eq(gpu->ops->kv_read_block(gpu, kv1, blk, b1), 0);
            ck_assert_int_eq(gpu->ops->kv_read_block(gpu, kv2, blk, b2), 0);
            ck_assert_msg(memcmp(b1, b2, kvb) == 0, "rope_store cells differ (call %d)", call);
        }
        gpu->ops->free(gpu, dslot);
        gpu->ops->free(gpu, dq1);
        gpu->ops->free(gpu, dk1);
        gpu->ops->free(gpu, dq2);
        gpu->ops->free(gpu, dk2);
        gpu->ops->free(gpu, dv);
        free(q);
        free(k);
        free(v);
        free(q1);
        free(q2);
        free(k1);
        free(k2);
        free(pos);
        free(slot);
    }
    free(b1);
    free(b2);
    gpu->ops->kv_destroy(gpu, &kv1);
    gpu->ops->kv_destroy(gpu, &kv2);
}
END_TEST

/* Delta of a residual update: out[i] = after[i] - before[i]. */
static void delta(const float *after, const float *before, int64_t n, float *out)
{
    for (int64_t i = 0; i < n; i++) {
        out[i] = after[i] - before[i];
    }
}

/* A bf16 weight (n_out, n_in) loaded into both backends. */
static void weight_pair(int64_t n_out, int64_t n_in, struct kvs_weight *wc, struct kvs_weight *wg)
{
    size_t rb = 0;
    void *hw = random_weight(KVS_DTYPE_BF16, n_out, n_in, &rb);
    *wc = (struct kvs_weight){.type = KVS_DTYPE_BF16, .n_in = n_in, .n_out = n_out,
                              .row_bytes = rb};
    *wg = *wc;
    ck_assert_int_eq(cpu->ops->weight_load(cpu, wc, hw), 0);
    ck_assert_int_eq(gpu->ops->weight_load(gpu, wg, hw), 0);
    free(hw);
}

/* The optional fused ops against the CPU's plain op sequence, on the GEMV path (3 rows) and
 * the GEMM path (40 rows: gate / up kept in bf16, the products accumulated into the residual
 * inside the GEMM): matmul_add (y += x Wo^T) and ffn (x += swiglu(h Wg^T, h Wu^T) Wd^T),
 * compared on the update they add. Then the bf16 copy that rmsnorm leaves for the GEMMs: a
 * matmul of the norm's output matches the CPU, and after the output is rewritten (by upload,
 * by add) a matmul reads the new values, never the stale copy. */
START_TEST(test_fused_blocks)
{
    ck_assert_ptr_nonnull(gpu->ops->matmul_add);
    ck_assert_ptr_nonnull(gpu->ops->ffn);
    const int32_t E = 256, FF = 704;
    struct kvs_weight gc, gg, uc, ug, dc, dg, oc, og;
    weight_pair(FF, E, &gc, &gg);
    weight_pair(FF, E, &uc, &ug);
    weight_pair(E, FF, &dc, &dg);
    weight_pair(E, E, &oc, &og);
    static const int32_t rows[] = {3, 40};
    for (size_t k = 0; k < sizeof rows / sizeof rows[0]; k++) {
        const int32_t n = rows[k];
        const size_t be = (size_t)n * E * 4, bf = (size_t)n * FF * 4;
        float *h = malloc(be), *x = malloc(be), *xr = malloc(be), *xg = malloc(be);
        float *g = malloc(bf), *u = malloc(bf), *o = malloc(be), *dr = malloc(be);
        float *dgpu = malloc(be);
        fill(h, (int64_t)n * E, 1.0f);
        fill(x, (int64_t)n * E, 1.0f);
        /* ffn */
        ck_assert_int_eq(cpu->ops->matmul(cpu, &gc, h, n, NULL, g), 0);
        ck_assert_int_eq(cpu->ops->matmul(cpu, &uc, h, n, NULL, u), 0);
        ck_assert_int_eq(cpu->ops->swiglu(cpu, g, u, (int64_t)n * FF, g), 0);
        ck_assert_int_eq(cpu->ops->matmul(cpu, &dc, g, n, NULL, o), 0);
        float *dh = to_gpu(h, be), *dx = to_gpu(x, be), *dtmp = gpu->ops->alloc(gpu, be);
        float *dgate = gpu->ops->alloc(gpu, bf), *dup = gpu->ops->alloc(gpu, bf);
        ck_assert_int_eq(gpu->ops->ffn(gpu, &gg, &ug, &dg, dh, n, dgate, dup, dtmp, dx), 0);
        from_gpu(xg, dx, be);
        delta(xg, x, (int64_t)n * E, dgpu);
        char what[96];
        snprintf(what, sizeof what, "ffn %d rows", n);
        expect_close(dgpu, o, (int64_t)n * E, 1e-2, W_MATMUL, what);
        /* matmul_add */
        ck_assert_int_eq(cpu->ops->matmul(cpu, &oc, h, n, NULL, o), 0);
        ck_assert_int_eq(gpu->ops->upload(gpu, dx, x, be), 0);
        ck_assert_int_eq(gpu->ops->matmul_add(gpu, &og, dh, n, dtmp, dx), 0);
        from_gpu(xg, dx, be);
        delta(xg, x, (int64_t)n * E, dgpu);
        snprintf(what, sizeof what, "matmul_add %d rows", n);
        expect_close(dgpu, o, (int64_t)n * E, 1e-2, W_MATMUL, what);
        /* rmsnorm's bf16 copy: used while valid, never once its f32 rows are rewritten */
        float *w = malloc((size_t)E * 4);
        fill(w, E, 1.5f);
        float *dw = to_gpu(w, (size_t)E * 4), *dy = gpu->ops->alloc(gpu, be);
        ck_assert_int_eq(cpu->ops->rmsnorm(cpu, h, w, n, E, 1e-5f, xr), 0);
        ck_assert_int_eq(cpu->ops->matmul(cpu, &oc, xr, n, NULL, o), 0);
        ck_assert_int_eq(gpu->ops->rmsnorm(gpu, dh, dw, n, E, 1e-5f, dtmp), 0);
        ck_assert_int_eq(gpu->ops->matmul(gpu, &og, dtmp, n, NULL, dy), 0);
        from_gpu(xg, dy, be);
        snprintf(what, sizeof what, "rmsnorm then matmul %d rows", n);
        expect_close(xg, o, (int64_t)n * E, 1e-2, W_MATMUL, what);
        ck_assert_int_eq(gpu->ops->rmsnorm(gpu, dh, dw, n, E, 1e-5f, dtmp), 0);
        ck_assert_int_eq(gpu->ops->upload(gpu, dtmp, x, be), 0);
        ck_assert_int_eq(gpu->ops->matmul(gpu, &og, dtmp, n, NULL, dy), 0);
        ck_assert_int_eq(cpu->ops->matmul(cpu, &oc, x, n, NULL, o), 0);
        from_gpu(xg, dy, be);
        snprintf(what, sizeof what, "matmul after upload over the norm's output, %d rows", n);
        expect_close(xg, o, (int64_t)n * E, 1e-2, W_MATMUL, what);
        ck_assert_int_eq(gpu->ops->rmsnorm(gpu, dh, dw, n, E, 1e-5f, dtmp), 0);
        ck_assert_int_eq(gpu->ops->add(gpu, dtmp, dx, (int64_t)n * E), 0);
        ck_assert_int_eq(gpu->ops->matmul(gpu, &og, dtmp, n, NULL, dy), 0);
        from_gpu(dr, dx, be);
        for (int64_t i = 0; i < (int64_t)n * E; i++) {
            dr[i] += xr[i];
        }
        ck_assert_int_eq(cpu->ops->matmul(cpu, &oc, dr, n, NULL, o), 0);
        from_gpu(xg, dy, be);
        snprintf(what, sizeof what, "matmul after add into the norm's output, %d rows", n);
        expect_close(xg, o, (int64_t)n * E, 1e-2, W_MATMUL, what);
        gpu->ops->free(gpu, dw);
        gpu->ops->free(gpu, dy);
        free(w);
        gpu->ops->free(gpu, dh);
        gpu->ops->free(gpu, dx);
        gpu->ops->free(gpu, dtmp);
        gpu->ops->free(gpu, dgate);
        gpu->ops->free(gpu, dup);
        free(h);
        free(x);
        free(xr);
        free(xg);
        free(g);
        free(u);
        free(o);
        free(dr);
        free(dgpu);
    }
    struct kvs_weight *all[] = {&gc, &gg, &uc, &ug, &dc, &dg, &oc, &og};
    for (int i = 0; i < 8; i++) {
        (i % 2 == 0 ? cpu : gpu)->ops->weight_free(i % 2 == 0 ? cpu : gpu, all[i]);
    }
}
END_TEST

START_TEST(test_rope)
{
    static const int32_t shapes[][4] = {/* n_rows, n_heads, head_dim, n_dims */
                                        {1, 32, 128, 128}, {17, 8, 64, 64}, {40, 4, 16, 16},
                                        {5, 2, 96, 64}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        for (int style = 0; style < 2; style++) {
            for (int variant = 0; variant < 3; variant++) {
                int32_t n = shapes[s][0], nh = shapes[s][1], hd = shapes[s][2], nd = shapes[s][3];
                int64_t ne = (int64_t)n * nh * hd;
                float *x = malloc((size_t)ne * 4), *rg = malloc((size_t)ne * 4);
                int32_t *pos = malloc((size_t)n * 4);
                float *ff = malloc((size_t)nd / 2 * 4);
                fill(x, ne, 2.0f);
                for (int32_t i = 0; i < n; i++) {
                    pos[i] = (int32_t)(rnd_u64() % (variant == 2 ? 131072 : 4096));
                }
                for (int32_t i = 0; i < nd / 2; i++) {
                    ff[i] = 1.0f + 7.0f * (float)i / (float)(nd / 2);
                }
                struct kvs_rope r = {.n_dims = nd, .style = style, .freq_base = 500000.0f,
                                     .freq_scale = variant == 1 ? 0.25f : 1.0f,
                                     .freq_factors = variant == 2 ? ff : NULL};
                float *dx = to_gpu(x, (size_t)ne * 4);
                ck_assert_int_eq(cpu->ops->rope(cpu, x, n, nh, hd, pos, &r), 0);
                ck_assert_int_eq(gpu->ops->rope(gpu, dx, n, nh, hd, pos, &r), 0);
                from_gpu(rg, dx, (size_t)ne * 4);
                expect_close(rg, x, ne, 1e-5, W_ROPE, "rope");
                gpu->ops->free(gpu, dx);
                free(x);
                free(rg);
                free(pos);
                free(ff);
            }
        }
    }
}
END_TEST

/* A KV pool on one backend with the given contents, and attention over a mixed batch. */
struct attn_case {
    int32_t n_head, n_kv, hd;
    int32_t n_seq;
    int32_t len[4];   /* cells of each seq */
    int32_t q_from[4]; /* query rows: positions q_from..len-1 of each seq */
};

static void run_attention_case(const struct attn_case *ac)
{
    const int32_t bs = 16;
    int32_t n_block = 0, nb_seq[4], tab_off[4];
    for (int s = 0; s < ac->n_seq; s++) {
        nb_seq[s] = (ac->len[s] + bs - 1) / bs;
        tab_off[s] = n_block;
        n_block += nb_seq[s];
    }
    n_block += 3; /* spare blocks */
    /* a shuffled block table for all seqs */
    int32_t *tables = malloc((size_t)n_block * 4);
    for (int32_t i = 0; i < n_block; i++) {
        tables[i] = i;
    }
    for (int32_t i = n_block - 1; i > 0; i--) {
        int32_t j = (int32_t)(rnd_u64() % (uint64_t)(i + 1)), t = tables[i];
        tables[i] = tables[j];
        tables[j] = t;
    }
    /* store: every cell of every seq, one row per cell */
    int32_t n_cells = 0, n_q = 0;
    for (int s = 0; s < ac->n_seq; s++) {
        n_cells += ac->len[s];
        n_q += ac->len[s] - ac->q_from[s];
    }
    int32_t *slot = malloc((size_t)n_cells * 4), *ctx = malloc((size_t)n_cells * 4);
    int32_t *rtab = malloc((size_t)n_cells * 4);
    int32_t *qslot = malloc((size_t)n_q * 4), *qctx = malloc((size_t)n_q * 4);
    int32_t *qtab = malloc((size_t)n_q * 4);
    int32_t r = 0, qr = 0;
    for (int s = 0; s < ac->n_seq; s++) {
        for (int32_t p = 0; p < ac->len[s]; p++, r++) {
            slot[r] = tables[tab_off[s] + p / bs] * bs + p % bs;
            ctx[r] = p + 1;
            rtab[r] = tab_off[s];
            if (p >= ac->q_from[s]) {
                qslot[qr] = slot[r];
                qctx[qr] = p + 1;
                qtab[qr++] = tab_off[s];
            }
        }
    }
    int32_t kvd = ac->n_kv * ac->hd, qd = ac->n_head * ac->hd;
    float *k = malloc((size_t)n_cells * kvd * 4), *v = malloc((size_t)n_cells * kvd * 4);
    float *q = malloc((size_t)n_q * qd * 4);
    fill(k, (int64_t)n_cells * kvd, 1.0f);
    fill(v, (int64_t)n_cells * kvd, 1.0f);
    fill(q, (int64_t)n_q * qd, 1.0f);
    float scale = 1.0f / sqrtf((float)ac->hd);
    struct kvs_kv_layout lay = {.n_layer = 2, .n_block = n_block, .block_size = bs,
                                .n_kv_head = ac->n_kv, .head_dim = ac->hd, .dtype = KVS_DTYPE_F32};
    kvs_kv_cache *kc = NULL, *kg = NULL;
    ck_assert_int_eq(cpu->ops->kv_new(cpu, &lay, &kc), 0);
    lay.dtype = KVS_DTYPE_BF16;
    ck_assert_int_eq(gpu->ops->kv_new(gpu, &lay, &kg), 0);
    /* CPU: store into layer 1; attention */
    struct kvs_attn_batch sc = {.n_rows = n_cells, .row_slot = slot, .row_ctx = ctx,
                                .row_table = rtab, .tables = tables};
    struct kvs_attn_batch qc = {.n_rows = n_q, .row_slot = qslot, .row_ctx = qctx,
                                .row_table = qtab, .tables = tables};
    float *oc = malloc((size_t)n_q * qd * 4), *og = malloc((size_t)n_q * qd * 4);
    ck_assert_int_eq(cpu->ops->kv_store(cpu, kc, 1, k, v, &sc), 0);
    ck_assert_int_eq(cpu->ops->attention(cpu, kc, 1, q, ac->n_head, scale, &qc, oc), 0);
    /* GPU: metadata and activations in device memory */
    struct kvs_attn_batch sg = {.n_rows = n_cells,
                                .row_slot = to_gpu(slot, (size_t)n_cells * 4),
                                .row_ctx = to_gpu(ctx, (size_t)n_cells * 4),
                                .row_table = to_gpu(rtab, (size_t)n_cells * 4),
                                .tables = to_gpu(tables, (size_t)n_block * 4)};
    struct kvs_attn_batch qg = {.n_rows = n_q,
                                .row_slot = to_gpu(qslot, (size_t)n_q * 4),
                                .row_ctx = to_gpu(qctx, (size_t)n_q * 4),
                                .row_table = to_gpu(qtab, (size_t)n_q * 4),
                                .tables = sg.tables};
    float *dk = to_gpu(k, (size_t)n_cells * kvd * 4), *dv = to_gpu(v, (size_t)n_cells * kvd * 4);
    float *dq = to_gpu(q, (size_t)n_q * qd * 4), *dout = gpu->ops->alloc(gpu, (size_t)n_q * qd * 4);
    ck_assert_int_eq(gpu->ops->kv_store(gpu, kg, 1, dk, dv, &sg), 0);
    ck_assert_int_eq(gpu->ops->attention(gpu, kg, 1, dq, ac->n_head, scale, &qg, dout), 0);
    from_gpu(og, dout, (size_t)n_q * qd * 4);
    char what[160];
    snprintf(what, sizeof what, "attention heads %d/%d dim %d seqs %d (len %d..., %d query rows)",
             ac->n_head, ac->n_kv, ac->hd, ac->n_seq, ac->len[0], n_q);
    expect_close(og, oc, (int64_t)n_q * qd, 2e-2, W_ATTN, what);

    /* a block copy, then the canonical block read/write round trip */
    int32_t src = tables[0], dst = tables[n_block - 1];
    ck_assert_int_eq(gpu->ops->kv_copy_block(gpu, kg, src, dst), 0);
    size_t bb = kvs_kv_block_bytes(&lay);
    uint16_t *b1 = malloc(bb), *b2 = malloc(bb);
    ck_assert_int_eq(gpu->ops->kv_read_block(gpu, kg, src, b1), 0);
    ck_assert_int_eq(gpu->ops->kv_read_block(gpu, kg, dst, b2), 0);
    ck_assert(memcmp(b1, b2, bb) == 0);
    for (size_t i = 0; i < bb / 2; i++) {
        b1[i] = kvs_fp32_to_bf16(rnd_unit());
    }
    ck_assert_int_eq(gpu->ops->kv_write_block(gpu, kg, dst, b1), 0);
    ck_assert_int_eq(gpu->ops->kv_read_block(gpu, kg, dst, b2), 0);
    ck_assert(memcmp(b1, b2, bb) == 0);
    ck_assert_int_eq(gpu->ops->kv_read_block(gpu, kg, n_block, b2), KVS_OUT_OF_RANGE);
    /* the canonical layout holds the stored K of cell 0 of seq 0, head 0, at layer 1's start */
    ck_assert_int_eq(gpu->ops->kv_read_block(gpu, kg, tables[0], b1), 0);
    size_t layer_elems = bb / 2 / 2; /* per layer: K then V */
    for (int32_t d = 0; d < ac->hd; d++) {
        float got = kvs_bf16_to_fp32(b1[layer_elems + d]);
        ck_assert_float_eq(got, kvs_bf16_to_fp32(kvs_fp32_to_bf16(k[d])));
    }
    free(b1);
    free(b2);

    gpu->ops->free(gpu, (void *)sg.row_slot);
    gpu->ops->free(gpu, (void *)sg.row_ctx);
    gpu->ops->free(gpu, (void *)sg.row_table);
    gpu->ops->free(gpu, (void *)sg.tables);
    gpu->ops->free(gpu, (void *)qg.row_slot);
    gpu->ops->free(gpu, (void *)qg.row_ctx);
    gpu->ops->free(gpu, (void *)qg.row_table);
    gpu->ops->free(gpu, dk);
    gpu->ops->free(gpu, dv);
    gpu->ops->free(gpu, dq);
    gpu->ops->free(gpu, dout);
    cpu->ops->kv_destroy(cpu, &kc);
    gpu->ops->kv_destroy(gpu, &kg);
    free(tables);
    free(slot);
    free(ctx);
    free(rtab);
    free(qslot);
    free(qctx);
    free(qtab);
    free(k);
    free(v);
    free(q);
    free(oc);
    free(og);
}

START_TEST(test_attention)
{
    static const struct attn_case cases[] = {
        /* tensor-core path: decode rows, prefill chunks, mixed batches, GQA 1..8 */
        {4, 2, 16, 1, {40}, {0}},
        {32, 8, 128, 1, {1}, {0}},
        {32, 8, 128, 1, {1000}, {999}},          /* one decode row: split over the context */
        {32, 8, 128, 1, {5000}, {4999}},
        {32, 8, 128, 3, {300, 17, 1}, {290, 0, 0}}, /* mixed: decode + chunk + first token */
        {32, 8, 128, 2, {200, 333}, {0, 300}},   /* a 200-row prefill next to a chunk */
        {8, 8, 64, 2, {70, 129}, {60, 100}},
        {16, 2, 64, 4, {65, 64, 63, 2}, {64, 63, 62, 1}}, /* four decode rows, four seqs */
        {4, 4, 80, 1, {100}, {50}},
        /* flash path: a 32-row question (split over the context), a long causal prefill,
         * 8 decode-like rows (warps split the KV tile) */
        {32, 8, 128, 1, {3000}, {2968}},
        {32, 8, 128, 1, {600}, {0}},
        {32, 8, 128, 2, {1500, 700}, {1496, 696}},
        {16, 16, 64, 1, {900}, {880}},
        /* decode path: groups of hd/8 lanes that leave the cell loop at different steps */
        {8, 4, 64, 1, {777}, {776}},
        {4, 2, 16, 2, {33, 50}, {32, 48}},
        {8, 1, 128, 3, {1, 2000, 4100}, {0, 1999, 4099}}, /* G = 8 */
        /* fallback path: head dims over 128, group sizes that do not divide 64 */
        {6, 2, 32, 2, {50, 90}, {40, 80}},
        {2, 2, 256, 1, {77}, {70}},
        {6, 2, 32, 1, {3000}, {2999}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        run_attention_case(&cases[i]);
    }
}
END_TEST

START_TEST(test_bad_slot_is_reported)
{
    struct kvs_kv_layout lay = {.n_layer = 1, .n_block = 4, .block_size = 16, .n_kv_head = 1,
                                .head_dim = 16, .dtype = KVS_DTYPE_BF16};
    kvs_kv_cache *kg = NULL;
    ck_assert_int_eq(gpu->ops->kv_new(gpu, &lay, &kg), 0);
    int32_t bad = 64, one = 1, zero = 0;
    float x[16] = {0};
    struct kvs_attn_batch ab = {.n_rows = 1, .row_slot = to_gpu(&bad, 4),
                                .row_ctx = to_gpu(&one, 4), .row_table = to_gpu(&zero, 4),
                                .tables = to_gpu(&zero, 4)};
    float *dx = to_gpu(x, sizeof x);
    ck_assert_int_eq(gpu->ops->kv_store(gpu, kg, 0, dx, dx, &ab), 0);
    ck_assert_int_eq(gpu->ops->sync(gpu), KVS_OUT_OF_RANGE);
    ck_assert_int_eq(gpu->ops->sync(gpu), 0); /* reported once */
    lay.dtype = KVS_DTYPE_F16;
    kvs_kv_cache *k2 = NULL;
    ck_assert_int_eq(gpu->ops->kv_new(gpu, &lay, &k2), KVS_UNSUPPORTED);
    gpu->ops->free(gpu, (void *)ab.row_slot);
    gpu->ops->free(gpu, (void *)ab.row_ctx);
    gpu->ops->free(gpu, (void *)ab.row_table);
    gpu->ops->free(gpu, (void *)ab.tables);
    gpu->ops->free(gpu, dx);
    gpu->ops->kv_destroy(gpu, &kg);
}
END_TEST

/* ---- the whole forward ---------------------------------------------------------------------------- */

struct grig {
    kvs_backend *b; /* borrowed */
    kvs_model *m;
    kvs_pool *pool;
    kvs_forward *fw;
    kvs_batch batch;
    int32_t n_vocab;
};

static void grig_open(struct grig *r, kvs_backend *b, const char *model, uint32_t kv_dtype,
                      int32_t n_block, int32_t max_rows)
{
    memset(r, 0, sizeof *r);
    r->b = b;
    char err[512] = "";
    int rc = kvs_model_is_synthetic(model) ? kvs_model_synthetic(model, b, &r->m, err, sizeof err)
                                           : kvs_model_load(model, b, NULL, NULL, &r->m, err,
                                                            sizeof err);
    ck_assert_msg(rc == 0, "%s: %s", model, err);
    const struct kvs_hparams *hp = &r->m->hp;
    struct kvs_kv_layout lay = {.n_layer = (int32_t)hp->n_layer, .n_block = n_block,
                                .block_size = KVS_POOL_DEFAULT_BLOCK_SIZE,
                                .n_kv_head = (int32_t)hp->n_head_kv,
                                .head_dim = (int32_t)hp->head_dim, .dtype = kv_dtype};
    ck_assert_int_eq(kvs_pool_new(b, &lay, &r->pool), 0);
    ck_assert_int_eq(kvs_forward_new(r->m, r->pool, max_rows, &r->fw), 0);
    ck_assert_int_eq(kvs_batch_init(&r->batch, max_rows), 0);
    r->n_vocab = (int32_t)hp->n_vocab;
}

static void grig_close(struct grig *r)
{
    kvs_batch_free(&r->batch);
    kvs_forward_destroy(&r->fw);
    kvs_pool_destroy(&r->pool);
    kvs_model_destroy(&r->m);
}

/* Logits of every position of toks, fed in chunks of `chunk` rows. */
static void grig_feed(struct grig *r, const int32_t *toks, int32_t n, int32_t chunk, float *out)
{
    kvs_seq *seq = kvs_pool_seq_new(r->pool);
    for (int32_t i = 0; i < n; i += chunk) {
        int32_t c = n - i < chunk ? n - i : chunk;
        ck_assert_int_eq(kvs_pool_seq_reserve(r->pool, seq, c), 0);
        kvs_batch_clear(&r->batch);
        for (int32_t j = 0; j < c; j++) {
            kvs_batch_add(&r->batch, seq, toks[i + j], seq->n_cells + j, true);
        }
        ck_assert_int_eq(kvs_forward_run(r->fw, &r->batch, out + (size_t)i * r->n_vocab), 0);
        kvs_pool_seq_commit(r->pool, seq, c);
    }
    kvs_pool_seq_release(r->pool, &seq);
}

struct fw_stats {
    double worst_hf, worst_cpu;
    int64_t positions, confident, agree;
};

/* Compare GPU logits (n, n_vocab) with the CPU's and (if ref) HF's. */
static void compare_logits(const float *g, const float *c, const float *ref, int32_t n,
                           int32_t nv, const char *what, struct fw_stats *st)
{
    for (int32_t i = 0; i < n; i++) {
        const float *gi = g + (size_t)i * nv, *ci = c + (size_t)i * nv;
        double ec = rel_l2(gi, ci, nv);
        if (ec > st->worst_cpu || isnan(ec)) {
            st->worst_cpu = ec;
        }
        ck_assert_msg(ec <= 2e-2, "%s pos %d: GPU vs CPU relative L2 %.3g", what, i, ec);
        if (ref != NULL) {
            double eh = rel_l2(gi, ref + (size_t)i * nv, nv);
            if (eh > st->worst_hf || isnan(eh)) {
                st->worst_hf = eh;
            }
            ck_assert_msg(eh <= 2e-2, "%s pos %d: GPU vs HF relative L2 %.3g", what, i, eh);
        }
        /* teacher-forced top-1 where the CPU is confident beyond the measured error */
        int32_t a1 = 0, a2 = -1, ga = 0;
        float maxdiff = 0;
        for (int32_t v = 0; v < nv; v++) {
            float d = fabsf(gi[v] - ci[v]);
            maxdiff = d > maxdiff ? d : maxdiff;
            if (gi[v] > gi[ga]) {
                ga = v;
            }
            if (v > 0 && ci[v] > ci[a1]) {
                a2 = a1;
                a1 = v;
            } else if (v > 0 && (a2 < 0 || ci[v] > ci[a2])) {
                a2 = v;
            }
        }
        st->positions++;
        if (a2 >= 0 && ci[a1] - ci[a2] > 5.0f * maxdiff) {
            st->confident++;
            st->agree += ga == a1;
        }
    }
}

static void check_model(const char *name, const char *model, int with_hf)
{
    char path[1024], meta[1024], bin[1024];
    json_t *j = NULL;
    float *ref = NULL;
    size_t ref_len = 0;
    int32_t n_prompts = 0, lens[8], *toks[8];
    if (with_hf) {
        snprintf(path, sizeof path, "%s/tests/data/parity/%s.gguf", kvs_test_source_dir(), model);
        snprintf(meta, sizeof meta, "%s/tests/data/parity/%s.json", kvs_test_source_dir(), model);
        snprintf(bin, sizeof bin, "%s/tests/data/parity/%s.logits.bin", kvs_test_source_dir(),
                 model);
        json_error_t jerr;
        j = json_load_file(meta, 0, &jerr);
        ck_assert_msg(j != NULL, "%s: %s", meta, jerr.text);
        ref = (float *)kvs_test_read_file(bin, &ref_len);
        ck_assert_ptr_nonnull(ref);
        json_t *prompts = json_object_get(j, "prompts"), *pr;
        size_t pi;
        json_array_foreach(prompts, pi, pr)
        {
            ck_assert_int_lt(n_prompts, 8);
            lens[n_prompts] = (int32_t)json_array_size(pr);
            toks[n_prompts] = malloc((size_t)lens[n_prompts] * 4);
            for (int32_t i = 0; i < lens[n_prompts]; i++) {
                toks[n_prompts][i] = (int32_t)json_integer_value(json_array_get(pr, (size_t)i));
            }
            n_prompts++;
        }
    } else {
        snprintf(path, sizeof path, "%s", model);
        n_prompts = 2;
        lens[0] = 150;
        lens[1] = 9;
    }
    struct grig rc, rg;
    grig_open(&rc, cpu, path, KVS_DTYPE_F32, 64, 64);
    grig_open(&rg, gpu, path, KVS_DTYPE_BF16, 64, 64);
    if (!with_hf) {
        for (int p = 0; p < n_prompts; p++) {
            toks[p] = malloc((size_t)lens[p] * 4);
            for (int32_t i = 0; i < lens[p]; i++) {
                toks[p][i] = (int32_t)(rnd_u64() % (uint64_t)rc.n_vocab);
            }
        }
    }
    int32_t nv = rc.n_vocab;
    static const int32_t chunks[] = {64, 5, 1};
    struct fw_stats st = {0};
    size_t off = 0;
    for (int p = 0; p < n_prompts; p++) {
        int32_t n = lens[p];
        float *lc = malloc((size_t)n * nv * 4), *lg = malloc((size_t)n * nv * 4);
        grig_feed(&rc, toks[p], n, 64, lc);
        for (size_t ch = 0; ch < sizeof chunks / sizeof chunks[0]; ch++) {
            grig_feed(&rg, toks[p], n, chunks[ch], lg);
            char what[160];
            snprintf(what, sizeof what, "%s prompt %d chunk %d", name, p, chunks[ch]);
            compare_logits(lg, lc, ref != NULL ? ref + off : NULL, n, nv, what, &st);
        }
        off += (size_t)n * nv;
        free(lc);
        free(lg);
        free(toks[p]);
    }
    if (ref != NULL) {
        ck_assert_uint_eq(off * sizeof(float), ref_len);
    }
    double agree = st.confident > 0 ? (double)st.agree / (double)st.confident : 1.0;
    printf("forward %-8s: worst per-position relative L2 vs HF %.3g, vs CPU %.3g; top-1 "
           "agreement %.1f%% over %lld of %lld positions (CPU margin > 5x error)\n",
           name, st.worst_hf, st.worst_cpu, 100.0 * agree, (long long)st.confident,
           (long long)st.positions);
    ck_assert_msg(agree >= 0.97, "%s: top-1 agreement %.3f < 0.97", name, agree);
    grig_close(&rc);
    grig_close(&rg);
    free(ref);
    json_decref(j);
}

START_TEST(test_forward_llama)
{
    check_model("llama", "llama", 1);
}
END_TEST

START_TEST(test_forward_qwen2)
{
    check_model("qwen2", "qwen2", 1);
}
END_TEST

START_TEST(test_forward_synthetic)
{
    /* the same random weights on both backends (element i = hash(seed, i)) */
    check_model("tiny", "synthetic:tiny", 0);
}
END_TEST

/* Graphs, fusion and early launch change when kernels run, never what they compute: the
 * logits of synthetic:tiny fed one row per forward (GEMVs, fused q/k/v and gate/up + swiglu,
 * the same graph replayed from the third step on) and four rows per forward are the same bits
 * under every combination of KVS_CUDA_GRAPHS / _FUSE / _PDL, and graphs are really used. */
START_TEST(test_forward_switches_same_bits)
{
    static const char *const combos[][3] = {/* graphs, fuse, pdl */
                                            {"0", "0", "0"},
                                            {"1", "gemv", "1"},
                                            {"1", "all", "1"},
                                            {"0", "all", "0"},
                                            {"1", "0", "gemv"}};
    const int32_t n = 24;
    int32_t toks[24];
    float *ref = NULL;
    size_t bytes = 0;
    for (size_t k = 0; k < sizeof combos / sizeof combos[0]; k++) {
        setenv("KVS_CUDA_GRAPHS", combos[k][0], 1);
        setenv("KVS_CUDA_FUSE", combos[k][1], 1);
        setenv("KVS_CUDA_PDL", combos[k][2], 1);
        struct grig r;
        grig_open(&r, gpu, "synthetic:tiny", KVS_DTYPE_BF16, 64, 4);
        if (ref == NULL) {
            for (int32_t i = 0; i < n; i++) {
                toks[i] = (int32_t)(rnd_u64() % (uint64_t)r.n_vocab);
            }
        }
        bytes = 2 * (size_t)n * r.n_vocab * sizeof(float);
        float *out = malloc(bytes);
        ck_assert_ptr_nonnull(out);
        uint64_t l0 = 0, c0 = 0, l1 = 0, c1 = 0;
        kvs_cuda_graph_counts(gpu, &l0, &c0);
        grig_feed(&r, toks, n, 1, out);
        grig_feed(&r, toks, n, 4, out + (size_t)n * r.n_vocab);
        kvs_cuda_graph_counts(gpu, &l1, &c1);
        if (combos[k][0][0] == '1') {
            ck_assert_msg(c1 > c0 && l1 >= l0 + 2 * (uint64_t)n / 2,
                          "graphs %s: %llu launched, %llu captured", combos[k][1],
                          (unsigned long long)(l1 - l0), (unsigned long long)(c1 - c0));
        } else {
            ck_assert_msg(l1 == l0 && c1 == c0, "graphs off but %llu launched",
                          (unsigned long long)(l1 - l0));
        }
        if (ref == NULL) {
            ref = out;
        } else {
            ck_assert_msg(memcmp(out, ref, bytes) == 0,
                          "graphs %s fuse %s pdl %s: logits differ from all switches off",
                          combos[k][0], combos[k][1], combos[k][2]);
            free(out);
        }
        grig_close(&r);
    }
    unsetenv("KVS_CUDA_GRAPHS");
    unsetenv("KVS_CUDA_FUSE");
    unsetenv("KVS_CUDA_PDL");
    free(ref);
}
END_TEST

int main(void)
{
    char why[256] = "";
    if (kvs_cuda_device_count(why, sizeof why) == 0) {
        printf("SKIP: no CUDA device (%s); GPU tests run on the device machine\n", why);
        return 77;
    }
    char err[256] = "";
    cpu = kvs_backend_cpu_new(0);
    gpu = kvs_backend_cuda_new(0, err, sizeof err);
    if (cpu == NULL || gpu == NULL) {
        printf("FAIL: cannot create the backends: %s\n", err);
        return 1;
    }
    Suite *s = suite_create("cuda_parity");
    TCase *ops = tcase_create("ops");
    tcase_set_timeout(ops, 600);
    tcase_add_test(ops, test_matmul);
    tcase_add_test(ops, test_rowwise);
    tcase_add_test(ops, test_rope);
    tcase_add_test(ops, test_fused_blocks);
    tcase_add_test(ops, test_rope_store);
    tcase_add_test(ops, test_attention);
    tcase_add_test(ops, test_bad_slot_is_reported);
    suite_add_tcase(s, ops);
    TCase *fw = tcase_create("forward");
    tcase_set_timeout(fw, 600);
    tcase_add_test(fw, test_forward_llama);
    tcase_add_test(fw, test_forward_qwen2);
    tcase_add_test(fw, test_forward_synthetic);
    tcase_add_test(fw, test_forward_switches_same_bits);
    suite_add_tcase(s, fw);
    SRunner *sr = srunner_create(s);
    srunner_set_fork_status(sr, CK_NOFORK); /* a CUDA context does not survive fork */
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    printf("worst relative L2 per op:");
    for (int i = 0; i < W_N; i++) {
        printf(" %s %.3g;", worst_name[i], worst_seen[i]);
    }
    printf("\n");
    kvs_backend_destroy(&gpu);
    kvs_backend_destroy(&cpu);
    return failed == 0 ? 0 : 1;
}
#else
int main(void)
{
    printf("SKIP: built without CUDA (KVS_CUDA=OFF or no nvcc)\n");
    return 77;
}
#endif
