/* bench_cuda: the CUDA backend on synthetic:llama3-8b against its two ceilings.
 *
 * Measures (medians; every forward ends with a sync, decode steps download their logits):
 *   decode b1 at 1K and 32K context     one row per step, logits downloaded
 *   append 2048 tokens at 2048..4095    one forward of 2048 rows on a fork of a 2048-cell seq
 *   TTFT, 32-token question on 32K      fork the 32K seq, prefill 32 rows, last row's logits
 * and first the ceilings, measured here: cuBLAS bf16 8192^3 GEMM (median of 10) and a
 * 2 GiB device-to-device copy (bytes read + written over time).
 *
 * Bounds, written before measuring (METHOD.md): decode reads every weight once (bf16) plus
 * the context's K and V once: bytes / copy bandwidth. Append is FLOPs: 2 * matmul params *
 * rows + attention 4 * n_head * head_dim * sum(ctx) per layer, over the GEMM rate. TTFT is
 * the larger of its bytes bound and its FLOPs bound.
 *
 * Usage: bench_cuda [--model synthetic:llama3-8b] [--quick]   (exit 77 without a GPU) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_profiler_api.h>

#include "common/status.h"
#include "kernels/cuda/cuda.h"
#include "kernels/dtype.h"
#include "worker/forward.h"
#include "worker/kvpool.h"
#include "worker/model.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return v[n / 2];
}

struct bench {
    kvs_backend *b;
    kvs_model *m;
    kvs_pool *pool;
    kvs_forward *fw;
    kvs_batch batch;
    float *logits; /* host (1, n_vocab) */
    uint64_t rng;
};

#define CHECK(x)                                                                           \
    do {                                                                                   \
        int rc_ = (x);                                                                     \
        if (rc_ < 0) {                                                                     \
            fprintf(stderr, "bench_cuda: %s failed: %s (line %d)\n", #x,                   \
                    kvs_status_message(rc_), __LINE__);                                    \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

static int32_t token(struct bench *B)
{
    B->rng = B->rng * 6364136223846793005ull + 1442695040888963407ull;
    return (int32_t)((B->rng >> 33) % B->m->hp.n_vocab);
}

/* Append n tokens to seq in chunks of the forward's max rows; logits of the last row if
 * want_last. Returns seconds (sync included); each chunk's seconds into chunk_s if not NULL. */
static double feed_chunks(struct bench *B, kvs_seq *seq, int32_t n, int want_last,
                          double *chunk_s)
{
    int32_t max_rows = kvs_forward_max_rows(B->fw);
    double t0 = now();
    for (int32_t i = 0; i < n; i += max_rows) {
        double tc = now();
        int32_t c = n - i < max_rows ? n - i : max_rows;
        CHECK(kvs_pool_seq_reserve(B->pool, seq, c));
        kvs_batch_clear(&B->batch);
        for (int32_t j = 0; j < c; j++) {
            kvs_batch_add(&B->batch, seq, token(B), seq->n_cells + j,
                          want_last && i + j == n - 1);
        }
        CHECK(kvs_forward_run(B->fw, &B->batch, B->logits));
        kvs_pool_seq_commit(B->pool, seq, c);
        if (chunk_s != NULL) {
            chunk_s[i / max_rows] = now() - tc;
        }
    }
    return now() - t0;
}

static double feed(struct bench *B, kvs_seq *seq, int32_t n, int want_last)
{
    return feed_chunks(B, seq, n, want_last, NULL);
}

/* One decode step's matmuls as the forward issues them (q, k, v, o, gate, up + swiglu, down
 * per layer, then the LM head), for one row: fused and in one graph by the backend. */
static int mm_step(struct bench *B, const float *dx, float *dy)
{
    kvs_backend *bk = B->b;
    const struct kvs_hparams *hp = &B->m->hp;
    for (int32_t li = 0; li < (int32_t)hp->n_layer; li++) {
        const struct kvs_layer *ly = &B->m->layers[li];
        float *yq = dy, *yk = dy + 8192, *yv = dy + 16384, *yo = dy + 24576;
        float *yg = dy + 32768, *yu = dy + 32768 + hp->n_ff;
        KVS_TRY(bk->ops->matmul(bk, &ly->wq, dx, 1, NULL, yq));
        KVS_TRY(bk->ops->matmul(bk, &ly->wk, dx, 1, NULL, yk));
        KVS_TRY(bk->ops->matmul(bk, &ly->wv, dx, 1, NULL, yv));
        KVS_TRY(bk->ops->matmul(bk, &ly->wo, dx, 1, NULL, yo));
        KVS_TRY(bk->ops->matmul(bk, &ly->w_gate, dx, 1, NULL, yg));
        KVS_TRY(bk->ops->matmul(bk, &ly->w_up, dx, 1, NULL, yu));
        KVS_TRY(bk->ops->swiglu(bk, yg, yu, hp->n_ff, yg));
        KVS_TRY(bk->ops->matmul(bk, &ly->w_down, dx, 1, NULL, yo));
    }
    return bk->ops->matmul(bk, &B->m->output, dx, 1, NULL, dy + 65536);
}

static double mm_step_graph_ms(struct bench *B, const float *dx, float *dy)
{
    double t[8];
    for (int rep = 0; rep < 8; rep++) {
        CHECK(B->b->ops->sync(B->b));
        double t1 = now();
        int rc = 0;
        CHECK(kvs_cuda_graph_begin(B->b, 1, 1, 1025));
        do {
            rc = mm_step(B, dx, dy);
        } while (kvs_cuda_graph_end(B->b, &rc) == 1);
        CHECK(rc);
        CHECK(B->b->ops->sync(B->b));
        t[rep] = now() - t1;
    }
    return median(t + 3, 5) * 1e3;
}

/* The other ops of a decode step, alone (one row at a 1K context): which costs what. */
struct pieces {
    float *x, *o, *h, *q, *k, *v, *att, *lx, *logits; /* device */
    int32_t *d_slot, *d_ctx, *d_rtab;                 /* device, one row */
    struct kvs_attn_batch ab;
    int which; /* bit 0 add+rmsnorm x2, 1 rope q+k, 2 kv_store, 3 attention, 4 LM-head rows */
};

static int pieces_step(struct bench *B, struct pieces *P)
{
    kvs_backend *bk = B->b;
    const struct kvs_backend_ops *op = bk->ops;
    const struct kvs_hparams *hp = &B->m->hp;
    kvs_kv_cache *kv = kvs_pool_kv(B->pool);
    int32_t E = (int32_t)hp->n_embd, H = (int32_t)hp->n_head, HKV = (int32_t)hp->n_head_kv;
    int32_t D = (int32_t)hp->head_dim, pos = 1024, zero = 0;
    for (int32_t l = 0; l < (int32_t)hp->n_layer; l++) {
        const struct kvs_layer *L = &B->m->layers[l];
        if (P->which & 1) {
            KVS_TRY(op->add(bk, P->x, P->o, E));
            KVS_TRY(op->rmsnorm(bk, P->x, L->attn_norm, 1, E, hp->norm_eps, P->h));
            KVS_TRY(op->add(bk, P->x, P->o, E));
            KVS_TRY(op->rmsnorm(bk, P->x, L->ffn_norm, 1, E, hp->norm_eps, P->h));
        }
        if (P->which & 2) {
            KVS_TRY(op->rope(bk, P->q, 1, H, D, &pos, &B->m->rope));
            KVS_TRY(op->rope(bk, P->k, 1, HKV, D, &pos, &B->m->rope));
        }
        if (P->which & 4) {
            KVS_TRY(op->kv_store(bk, kv, l, P->k, P->v, &P->ab));
        }
        if (P->which & 8) {
            KVS_TRY(op->attention(bk, kv, l, P->q, H, 0.088f, &P->ab, P->att));
        }
    }
    if (P->which & 16) {
        KVS_TRY(op->get_rows(bk, &B->m->tok_embd, &zero, 1, P->x));
        KVS_TRY(op->gather(bk, P->x, &zero, 1, E, P->lx));
        KVS_TRY(op->rmsnorm(bk, P->lx, B->m->output_norm, 1, E, hp->norm_eps, P->lx));
    }
    return 0;
}

static double pieces_ms(struct bench *B, struct pieces *P, int which)
{
    double t[8];
    P->which = which;
    for (int rep = 0; rep < 8; rep++) {
        CHECK(B->b->ops->sync(B->b));
        double t1 = now();
        int rc = 0;
        CHECK(kvs_cuda_graph_begin(B->b, 1, 1, 1025));
        do {
            rc = pieces_step(B, P);
        } while (kvs_cuda_graph_end(B->b, &rc) == 1);
        CHECK(rc);
        CHECK(B->b->ops->sync(B->b));
        t[rep] = now() - t1;
    }
    return median(t + 3, 5) * 1e3;
}

/* Time each kind of a decode step's small ops at 1K context (seq has >= 1024 cells). */
static void time_pieces(struct bench *B, kvs_seq *seq)
{
    kvs_backend *bk = B->b;
    const struct kvs_hparams *hp = &B->m->hp;
    size_t big = (size_t)hp->n_head * hp->head_dim + hp->n_embd;
    float *hx = malloc(big * sizeof(float));
    for (size_t i = 0; i < big; i++) {
        hx[i] = (float)((int)(i * 2654435761u % 2001) - 1000) * 1e-3f;
    }
    struct pieces P;
    memset(&P, 0, sizeof P);
    float **bufs[] = {&P.x, &P.o, &P.h, &P.q, &P.k, &P.v, &P.att, &P.lx};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        *bufs[i] = bk->ops->alloc(bk, big * sizeof(float));
        CHECK(bk->ops->upload(bk, *bufs[i], hx, big * sizeof(float)));
    }
    CHECK(kvs_pool_seq_reserve(B->pool, seq, 1));
    int32_t bs = kvs_pool_block_size(B->pool);
    int32_t slot = kvs_seq_slot(seq, 1024, bs), ctx = 1025, rtab = 0;
    P.d_slot = bk->ops->alloc(bk, 64);
    P.d_ctx = bk->ops->alloc(bk, 64);
    P.d_rtab = bk->ops->alloc(bk, 64);
    int32_t *d_tab = bk->ops->alloc(bk, (size_t)seq->n_blocks * sizeof(int32_t));
    CHECK(bk->ops->upload(bk, P.d_slot, &slot, 4));
    CHECK(bk->ops->upload(bk, P.d_ctx, &ctx, 4));
    CHECK(bk->ops->upload(bk, P.d_rtab, &rtab, 4));
    CHECK(bk->ops->upload(bk, d_tab, seq->table, (size_t)seq->n_blocks * sizeof(int32_t)));
    P.ab = (struct kvs_attn_batch){.n_rows = 1, .row_slot = P.d_slot, .row_ctx = P.d_ctx,
                                   .row_table = P.d_rtab, .tables = d_tab};
    double all = pieces_ms(B, &P, 31), norms = pieces_ms(B, &P, 1), rope = pieces_ms(B, &P, 2);
    double store = pieces_ms(B, &P, 4), attn = pieces_ms(B, &P, 8), head = pieces_ms(B, &P, 16);
    printf("decode-step pieces at 1K, one graph each: all small ops %.3f ms = 2x(add+rmsnorm) "
           "%.3f + rope q,k %.3f + kv_store %.3f + attention %.3f + embed/LM-head rows %.3f "
           "(x32 layers)\n",
           all, norms, rope, store, attn, head);
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        bk->ops->free(bk, *bufs[i]);
    }
    bk->ops->free(bk, P.d_slot);
    bk->ops->free(bk, P.d_ctx);
    bk->ops->free(bk, P.d_rtab);
    bk->ops->free(bk, d_tab);
    free(hx);
}

static double decode_ms(struct bench *B, kvs_seq *seq, int steps)
{
    double t[64];
    feed(B, seq, 1, 1); /* warm-up */
    for (int i = 0; i < steps; i++) {
        t[i] = feed(B, seq, 1, 1);
    }
    return median(t, steps) * 1e3;
}

/* The Hopper attention variants timed next to the default (wgmma, 128-cell tiles, mbarrier
 * stages): wgmma with 64-cell KV tiles with and without the mbarrier pipeline, 128-cell tiles
 * with a block barrier a tile, and the mma.sync kernel. */
#define N_WG_VARIANTS 4
static const char *const wg_variants[N_WG_VARIANTS][2] = {
    /* KVS_CUDA_WGMMA, KVS_CUDA_WG_MB */
    {"64", "0"}, {"64", "1"}, {"128", "0"}, {"0", "0"}};

/* Set variant w's switches (w < 0: unset them). */
static void wg_variant(int w)
{
    static const char *const names[2] = {"KVS_CUDA_WGMMA", "KVS_CUDA_WG_MB"};
    for (int i = 0; i < 2; i++) {
        if (w < 0) {
            unsetenv(names[i]);
        } else {
            setenv(names[i], wg_variants[w][i], 1);
        }
    }
}

/* TTFT of an n_q-token question on forks of seq: median of n runs after a warm-up. */
static double ttft_fork_ms(struct bench *B, kvs_seq *seq, int32_t n_q, int n)
{
    double tt[16];
    for (int i = 0; i < n + 1; i++) {
        kvs_seq *f = kvs_pool_seq_fork(B->pool, seq);
        double t = feed(B, f, n_q, 1);
        if (i > 0) {
            tt[i - 1] = t;
        }
        kvs_pool_seq_release(B->pool, &f);
    }
    return median(tt, n) * 1e3;
}

int main(int argc, char **argv)
{
    const char *model = "synthetic:llama3-8b";
    int quick = 0;
    const char *profile = NULL; /* --profile chunk|decode: one forward between profiler marks */
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--model") == 0 && i + 1 < argc) {
            model = argv[++i];
        } else if (strcmp(argv[i], "--quick") == 0) {
            quick = 1;
        } else if (strcmp(argv[i], "--profile") == 0 && i + 1 < argc) {
            profile = argv[++i];
        }
    }
    char why[256] = "", err[512] = "";
    if (kvs_cuda_device_count(why, sizeof why) == 0) {
        printf("SKIP: no CUDA device (%s)\n", why);
        return 77;
    }
    struct bench B = {.rng = 42};
    B.b = kvs_backend_cuda_new(0, err, sizeof err);
    if (B.b == NULL) {
        fprintf(stderr, "bench_cuda: %s\n", err);
        return 1;
    }
    char name[256];
    kvs_cuda_device_name(0, name, sizeof name);

    /* ---- ceilings ---- */
    double t_gemm = 0, t_copy = 0;
    size_t copy_bytes = (size_t)2 << 30;
    CHECK(kvs_cuda_bench_gemm(B.b, 8192, 8192, 8192, 10, &t_gemm));
    CHECK(kvs_cuda_bench_copy(B.b, copy_bytes, 10, &t_copy));
    double gemm_rate = 2.0 * 8192.0 * 8192.0 * 8192.0 / t_gemm; /* FLOP/s */
    double bw = 2.0 * (double)copy_bytes / t_copy;               /* bytes/s, read + write */
    printf("device: %s\n", name);
    printf("ceiling: cuBLAS bf16 GEMM 8192^3: %.3f ms = %.0f TFLOP/s (median of 10)\n",
           t_gemm * 1e3, gemm_rate * 1e-12);
    printf("ceiling: device copy 2 GiB: %.3f ms = %.0f GB/s read+write (median of 10)\n",
           t_copy * 1e3, bw * 1e-9);

    /* ---- model ---- */
    double t0 = now();
    if (kvs_model_synthetic(model, B.b, &B.m, err, sizeof err) < 0) {
        fprintf(stderr, "bench_cuda: %s\n", err);
        return 1;
    }
    const struct kvs_hparams *hp = &B.m->hp;
    printf("model: %s created on the device in %.2f s\n", model, now() - t0);
    const int32_t ctx_long = quick ? 8192 : 32768, n_append = 2048, n_q = 32;
    const int32_t ctx_max = quick ? 8192 : 65536; /* TTFT contexts up to this */
    int64_t cells = (int64_t)ctx_max + 64 + 2 * 4096 + 1024 + 256 + 8192 + 64 * 64;
    struct kvs_kv_layout lay = {.n_layer = (int32_t)hp->n_layer,
                                .n_block = (int32_t)((cells + 15) / 16 + 8),
                                .block_size = KVS_POOL_DEFAULT_BLOCK_SIZE,
                                .n_kv_head = (int32_t)hp->n_head_kv,
                                .head_dim = (int32_t)hp->head_dim,
                                .dtype = KVS_DTYPE_BF16};
    CHECK(kvs_pool_new(B.b, &lay, &B.pool));
    CHECK(kvs_forward_new(B.m, B.pool, n_append, &B.fw));
    CHECK(kvs_batch_init(&B.batch, n_append));
    B.logits = malloc((size_t)64 * hp->n_vocab * sizeof(float));

    /* ---- --profile: one forward between cudaProfilerStart/Stop, for ncu --profile-from-start
     * off (bench/cuda/profile_h200.sh): "chunk" = the last 2048-row chunk of the stateless
     * 32K fill (context 30720..32767), "chunk0" its first chunk, "decode" = one decode step
     * at 1K context (graphs warm) */
    if (profile != NULL) {
        kvs_seq *ps = kvs_pool_seq_new(B.pool);
        const int is_chunk0 = strcmp(profile, "chunk0") == 0;
        const int is_chunk = is_chunk0 || strcmp(profile, "chunk") == 0;
        if (is_chunk0) {
            kvs_seq *warm = kvs_pool_seq_new(B.pool); /* cuBLAS heuristics, scratch growth */
            feed(&B, warm, n_append, 0);
            kvs_pool_seq_release(B.pool, &warm);
        }
        feed(&B, ps, is_chunk0 ? 0 : is_chunk ? ctx_long - n_append : 1023, 0);
        for (int i = 0; !is_chunk && i < 4; i++) {
            feed(&B, ps, 1, 1); /* graphs captured */
        }
        CHECK(B.b->ops->sync(B.b));
        cudaProfilerStart();
        double tp = feed(&B, ps, is_chunk ? n_append : 1, 1);
        cudaProfilerStop();
        printf("profile %s: %.3f ms\n", profile, tp * 1e3);
        kvs_pool_seq_release(B.pool, &ps);
        return 0;
    }

    /* ---- bounds ---- */
    double E = hp->n_embd, FF = hp->n_ff, QD = (double)hp->n_head * hp->head_dim;
    double KVD = (double)hp->n_head_kv * hp->head_dim, L = hp->n_layer, V = hp->n_vocab;
    double params = L * (E * QD * 2 + E * KVD * 2 + 3 * E * FF) + V * E; /* matmul weights */
    double kv_cell = L * KVD * 2 * 2;                                    /* bytes per cell */
    double attn_flops_cell = L * 4.0 * QD; /* per (row, context cell): QK and PV */
    double b_dec1k = (params * 2 + 1024 * kv_cell) / bw;
    double b_dec32k = (params * 2 + ctx_long * kv_cell) / bw;
    double sum_ctx_append = 0;
    for (int32_t p = 2048; p < 2048 + n_append; p++) {
        sum_ctx_append += p + 1;
    }
    double b_append = (2 * (params - V * E) * n_append + attn_flops_cell * sum_ctx_append) /
                      gemm_rate; /* no LM head: an append wants no logits */
    double ttft_flops = 2 * params * n_q + attn_flops_cell * (double)n_q * (ctx_long + n_q / 2);
    double b_ttft = fmax(ttft_flops / gemm_rate, (params * 2 + ctx_long * kv_cell) / bw);
    printf("bounds: weights %.2f GB bf16, KV %.0f KiB per cell\n", params * 2e-9, kv_cell / 1024);

    /* ---- matmuls alone: one decode step's weights (1 row, GEMV) and 32 rows (cuBLAS) ---- */
    double mm_ms[2] = {0, 0};
    {
        kvs_backend *bk = B.b;
        size_t nx = (size_t)32 * (size_t)(hp->n_ff > hp->n_embd ? hp->n_ff : hp->n_embd);
        float *hx = malloc(nx * sizeof(float));
        for (size_t i = 0; i < nx; i++) {
            hx[i] = (float)((int)(i * 2654435761u % 2001) - 1000) * 1e-3f;
        }
        float *dx = bk->ops->alloc(bk, nx * sizeof(float));
        float *dy = bk->ops->alloc(bk, (size_t)32 * hp->n_vocab * sizeof(float));
        CHECK(bk->ops->upload(bk, dx, hx, nx * sizeof(float)));
        const int rows[2] = {1, 32};
        for (int k = 0; k < 2; k++) {
            double tm[8];
            for (int rep = 0; rep < 6; rep++) {
                CHECK(bk->ops->sync(bk));
                double t1 = now();
                for (int32_t li = 0; li < (int32_t)hp->n_layer; li++) {
                    const struct kvs_layer *ly = &B.m->layers[li];
                    const struct kvs_weight *ws[7] = {&ly->wq, &ly->wk, &ly->wv, &ly->wo,
                                                      &ly->w_gate, &ly->w_up, &ly->w_down};
                    for (int j = 0; j < 7; j++) {
                        CHECK(bk->ops->matmul(bk, ws[j], dx, rows[k], NULL, dy));
                    }
                }
                CHECK(bk->ops->matmul(bk, &B.m->output, dx, 1, NULL, dy));
                CHECK(bk->ops->sync(bk));
                tm[rep] = now() - t1;
            }
            mm_ms[k] = median(tm + 1, 5) * 1e3;
            printf("matmuls alone, %d row(s) per layer matmul (+ LM head 1 row): %.3f ms = %.0f GB/s "
                   "of weights\n",
                   rows[k], mm_ms[k], params * 2 / (mm_ms[k] * 1e-3) * 1e-9);
        }
        /* the same weights as a decode step issues them: fused, one graph */
        double mg = mm_step_graph_ms(&B, dx, dy);
        setenv("KVS_CUDA_GEMV", "rpw2", 1);
        double mg2 = mm_step_graph_ms(&B, dx, dy);
        unsetenv("KVS_CUDA_GEMV");
        setenv("KVS_CUDA_PDL", "0", 1);
        double mg3 = mm_step_graph_ms(&B, dx, dy);
        unsetenv("KVS_CUDA_PDL");
        printf("matmuls of a decode step, fused, one graph: %.3f ms = %.0f GB/s; two outputs per "
               "warp %.3f ms; without PDL %.3f ms\n",
               mg, params * 2 / (mg * 1e-3) * 1e-9, mg2, mg3);
        bk->ops->free(bk, dx);
        bk->ops->free(bk, dy);
        free(hx);
    }

    /* ---- decode at 1K (flash attention, then the previous kernels: KVS_CUDA_ATTN=old) ---- */
    kvs_seq *s1 = kvs_pool_seq_new(B.pool);
    feed(&B, s1, 1023, 0);
    double dec1k = decode_ms(&B, s1, quick ? 5 : 20);
    uint64_t g_launch = 0, g_capt = 0;
    kvs_cuda_graph_counts(B.b, &g_launch, &g_capt);
    printf("decode 1K: %.3f ms (graphs launched %llu, captured %llu so far)\n", dec1k,
           (unsigned long long)g_launch, (unsigned long long)g_capt);
    /* the same under the switches (KVS_CUDA_GRAPHS, _FUSE, _PDL): which part gives what */
    static const char *const var[][3] = {
        /* graphs, fuse, pdl */
        {"1", "all", "1"}, {"1", "gemv", "1"}, {"1", "gemv+rope", "0"}, {"1", "gemv+rope", "gemv"},
        {"1", "add", "1"},
        {"1", "0", "1"},   {"1", "0", "0"},    {"0", "gemv+rope", "1"}, {"0", "0", "1"},
        {"0", "0", "0"},
    };
    double dec1k_nograph = 0, dec1k_nopdl = 0, dec1k_plain = 0;
    for (size_t i = 0; i < sizeof var / sizeof var[0]; i++) {
        setenv("KVS_CUDA_GRAPHS", var[i][0], 1);
        setenv("KVS_CUDA_FUSE", var[i][1], 1);
        setenv("KVS_CUDA_PDL", var[i][2], 1);
        double t = decode_ms(&B, s1, quick ? 5 : 10);
        printf("decode 1K variant: graphs %s, fuse %s, pdl %s: %.3f ms\n", var[i][0], var[i][1],
               var[i][2], t);
        if (i == 2) {
            dec1k_nopdl = t;
        } else if (i == 7) {
            dec1k_nograph = t;
        } else if (i == 9) {
            dec1k_plain = t;
        }
    }
    unsetenv("KVS_CUDA_GRAPHS");
    unsetenv("KVS_CUDA_FUSE");
    unsetenv("KVS_CUDA_PDL");
    /* the attention's split count at 1K: at least 1, 2, 4, 8 or 16 KV tiles a split */
    for (int st = 1; st <= 16; st *= 2) {
        char v[8];
        snprintf(v, sizeof v, "%d", st);
        setenv("KVS_CUDA_SPLIT_TILES", v, 1);
        printf("decode 1K with >= %d KV tiles per attention split: %.3f ms\n", st,
               decode_ms(&B, s1, quick ? 5 : 10));
    }
    unsetenv("KVS_CUDA_SPLIT_TILES");
    /* a step without logits: no LM head, no download */
    {
        double tn[16];
        for (int i = 0; i < 11; i++) {
            tn[i] = feed(&B, s1, 1, 0);
        }
        printf("decode 1K without logits (no LM head, no download): %.3f ms\n",
               median(tn + 1, 10) * 1e3);
    }
    time_pieces(&B, s1);
    setenv("KVS_CUDA_GEMV", "rpw2", 1);
    double dec1k_rpw2 = decode_ms(&B, s1, quick ? 5 : 10);
    unsetenv("KVS_CUDA_GEMV");
    printf("decode 1K with two outputs per GEMV warp: %.3f ms\n", dec1k_rpw2);
    setenv("KVS_CUDA_ATTN", "old", 1);
    double dec1k_old = decode_ms(&B, s1, quick ? 5 : 10);
    unsetenv("KVS_CUDA_ATTN");
    kvs_pool_seq_release(B.pool, &s1);

    /* ---- stateless: the whole 32K context + a 32-token question from nothing ---- */
    double stateless32k = 0, chunk_s[40];
    {
        int32_t n_st = ctx_long + n_q;
        /* as HF's figure is taken: a warm-up (cuBLAS's first calls of each shape), then the
         * median of three */
        double cold = 0, runs[3];
        for (int r = -1; r < 3; r++) {
            kvs_seq *sr = kvs_pool_seq_new(B.pool);
            const double t = feed_chunks(&B, sr, n_st, 1, chunk_s) * 1e3;
            kvs_pool_seq_release(B.pool, &sr);
            if (r < 0) {
                cold = t;
            } else {
                runs[r] = t;
            }
        }
        stateless32k = median(runs, 3);
        printf("stateless runs: cold %.1f ms, then %.1f %.1f %.1f ms\n", cold, runs[0], runs[1],
               runs[2]);
        kvs_seq *st = kvs_pool_seq_new(B.pool);
        feed_chunks(&B, st, n_st, 1, chunk_s);
        int32_t nc = (n_st + n_append - 1) / n_append;
        printf("stateless: %d tokens from nothing in %d chunks: %.1f ms (median); one more run: "
               "chunk 0 %.1f ms, chunk %d %.1f ms, chunk %d %.1f ms\n",
               n_st, nc, stateless32k, chunk_s[0] * 1e3, nc / 2, chunk_s[nc / 2] * 1e3, nc - 2,
               chunk_s[nc - 2] * 1e3);
        printf("stateless chunks (ms):");
        for (int32_t i = 0; i < nc; i++) {
            printf(" %.1f", chunk_s[i] * 1e3);
        }
        printf("\n");
        kvs_pool_seq_release(B.pool, &st);
        /* flash-attention blocks in row order (not last row tile first); K/V without TMA */
        static const char *const sw[][2] = {
            {"KVS_CUDA_FA_ORDER", "0"}, {"KVS_CUDA_WG_TMA", "0"}, {"KVS_CUDA_WG_TMA", "1"}};
        for (int v = 0; v < 3; v++) {
            setenv(sw[v][0], sw[v][1], 1);
            kvs_seq *sv = kvs_pool_seq_new(B.pool);
            double tv = feed_chunks(&B, sv, n_st, 1, chunk_s) * 1e3;
            printf("stateless with %s=%s: %.1f ms; chunks (ms):", sw[v][0], sw[v][1], tv);
            for (int32_t i = 0; i < nc; i++) {
                printf(" %.1f", chunk_s[i] * 1e3);
            }
            printf("\n");
            kvs_pool_seq_release(B.pool, &sv);
            unsetenv(sw[v][0]);
        }
        /* the same with the other attention kernels (wg_variants) */
        for (int w = 0; w < N_WG_VARIANTS; w++) {
            const char *const *wgv = wg_variants[w];
            wg_variant(w);
            kvs_seq *sv = kvs_pool_seq_new(B.pool);
            double tv = feed_chunks(&B, sv, n_st, 1, chunk_s) * 1e3;
            printf("stateless with KVS_CUDA_WGMMA=%s KVS_CUDA_WG_MB=%s: %.1f "
                   "ms; chunk 0 %.1f ms, chunk %d %.1f ms\n",
                   wgv[0], wgv[1], tv, chunk_s[0] * 1e3, nc - 2, chunk_s[nc - 2] * 1e3);
            kvs_pool_seq_release(B.pool, &sv);
            wg_variant(-1);
        }
        /* the GEMM path without its bf16 activations (fusion part "gemm" off: f32 gate / up,
         * separate residual adds, a bf16 conversion before every GEMM) */
        setenv("KVS_CUDA_FUSE", "gemv+rope", 1);
        kvs_seq *sf = kvs_pool_seq_new(B.pool);
        double tf = feed_chunks(&B, sf, n_st, 1, chunk_s) * 1e3;
        printf("stateless with KVS_CUDA_FUSE=gemv+rope: %.1f ms; chunk 0 %.1f ms, chunk %d %.1f "
               "ms\n",
               tf, chunk_s[0] * 1e3, nc - 2, chunk_s[nc - 2] * 1e3);
        kvs_pool_seq_release(B.pool, &sf);
        unsetenv("KVS_CUDA_FUSE");
    }

    /* ---- append 2048 at 2048..4095, on forks of a 2048-cell seq ---- */
    kvs_seq *base = kvs_pool_seq_new(B.pool);
    feed(&B, base, 2048, 0);
    double ta[5];
    int n_rep = quick ? 2 : 4;
    for (int i = 0; i < n_rep + 1; i++) {
        kvs_seq *f = kvs_pool_seq_fork(B.pool, base);
        double t = feed(&B, f, n_append, 0);
        if (i > 0) {
            ta[i - 1] = t; /* the first is a warm-up (cuBLAS heuristics, scratch growth) */
        }
        kvs_pool_seq_release(B.pool, &f);
    }
    double append_s = median(ta, n_rep);
    kvs_pool_seq_release(B.pool, &base);

    /* ---- 64 sessions at 8K: forks of one 8K seq, one decode row each per step ---- */
    double sess_tps = 0;
    if (!quick) {
        kvs_seq *s8 = kvs_pool_seq_new(B.pool);
        feed(&B, s8, 8192, 0);
        kvs_seq *ss[64];
        for (int i = 0; i < 64; i++) {
            ss[i] = kvs_pool_seq_fork(B.pool, s8);
        }
        int steps = 6;
        double t_s = 0;
        for (int it = 0; it < steps + 1; it++) {
            for (int i = 0; i < 64; i++) {
                CHECK(kvs_pool_seq_reserve(B.pool, ss[i], 1));
            }
            kvs_batch_clear(&B.batch);
            for (int i = 0; i < 64; i++) {
                kvs_batch_add(&B.batch, ss[i], token(&B), ss[i]->n_cells, 1);
            }
            double t1 = now();
            CHECK(kvs_forward_run(B.fw, &B.batch, B.logits));
            if (it > 0) {
                t_s += now() - t1;
            }
            for (int i = 0; i < 64; i++) {
                kvs_pool_seq_commit(B.pool, ss[i], 1);
            }
        }
        sess_tps = 64.0 * steps / t_s;
        for (int i = 0; i < 64; i++) {
            kvs_pool_seq_release(B.pool, &ss[i]);
        }
        kvs_pool_seq_release(B.pool, &s8);
        /* bound: every weight once + each row's 8K context once (forks share blocks, but
         * each row's attention reads them), over the copy rate */
        double b_sess = (params * 2 + 64.0 * 8192 * kv_cell) / bw;
        printf("sessions: 64 x 8K context, batched decode: %.0f tok/s (bound %.0f tok/s)\n",
               sess_tps, 64.0 / b_sess);
    }

    /* ---- long context: TTFT at growing contexts (1K, 8K, 32K, 64K), decode at ctx_long ---- */
    kvs_seq *lg = kvs_pool_seq_new(B.pool);
    const int32_t tt_ctx[4] = {1024, 8192, 32768, 65536};
    double ttft_at[4] = {0, 0, 0, 0}, tfill = 0, dec32k = 0, dec32k_old = 0, ttft_fa4 = 0;
    int n_tt = quick ? 3 : 5;
    for (int k = 0; k < 4 && tt_ctx[k] <= ctx_max; k++) {
        double tf = feed(&B, lg, tt_ctx[k] - lg->n_cells, 0);
        tfill += tf;
        printf("filled to %d cells: %.2f s so far (%.0f tok/s)\n", tt_ctx[k], tfill,
               tt_ctx[k] / tfill);
        ttft_at[k] = ttft_fork_ms(&B, lg, n_q, n_tt);
        printf("TTFT at %d: %.3f ms\n", tt_ctx[k], ttft_at[k]);
        if (tt_ctx[k] == ctx_long) { /* the question with 64-vector attention tiles */
            setenv("KVS_CUDA_FA_WARPS", "4", 1);
            ttft_fa4 = ttft_fork_ms(&B, lg, n_q, n_tt);
            unsetenv("KVS_CUDA_FA_WARPS");
            printf("TTFT at %d with 4-warp (64-vector) attention tiles: %.3f ms\n", tt_ctx[k],
                   ttft_fa4);
            /* the attention kernel variants on Hopper (wg_variants) */
            for (int w = 0; w < N_WG_VARIANTS; w++) {
                wg_variant(w);
                const double tv = ttft_fork_ms(&B, lg, n_q, n_tt);
                wg_variant(-1);
                printf("TTFT at %d with KVS_CUDA_WGMMA=%s KVS_CUDA_WG_MB=%s: "
                       "%.3f ms\n",
                       tt_ctx[k], wg_variants[w][0], wg_variants[w][1], tv);
            }
        }
        if (tt_ctx[k] == ctx_long) {
            kvs_seq *f = kvs_pool_seq_fork(B.pool, lg);
            dec32k = decode_ms(&B, f, quick ? 5 : 10);
            setenv("KVS_CUDA_ATTN", "old", 1);
            dec32k_old = decode_ms(&B, f, quick ? 3 : 5);
            unsetenv("KVS_CUDA_ATTN");
            kvs_pool_seq_release(B.pool, &f);
        }
    }
    double ttft = 0;
    for (int k = 0; k < 4; k++) {
        if (tt_ctx[k] == ctx_long) {
            ttft = ttft_at[k];
        }
    }
    kvs_pool_seq_release(B.pool, &lg);

    /* ---- table ---- */
    printf("\n%-34s %12s %12s %8s %10s\n", "measure", "measured", "bound", "bound/m", "gate");
    printf("%-34s %9.3f ms %9.3f ms %7.0f%% %10s\n", "decode b1, 1K context", dec1k, b_dec1k * 1e3,
           100 * b_dec1k * 1e3 / dec1k, "<= 5.0 ms");
    char lbl[64];
    snprintf(lbl, sizeof lbl, "decode b1, %dK context", ctx_long / 1024);
    printf("%-34s %9.3f ms %9.3f ms %7.0f%% %10s\n", lbl, dec32k, b_dec32k * 1e3,
           100 * b_dec32k * 1e3 / dec32k, "<= 7.0 ms");
    printf("%-34s %8.0f tok/s %6.0f tok/s %6.0f%% %10s\n", "append 2048 @ 2048..4095",
           n_append / append_s, n_append / b_append, 100 * b_append / append_s, ">= 25K");
    snprintf(lbl, sizeof lbl, "TTFT 32-token question, %dK ctx", ctx_long / 1024);
    printf("%-34s %9.3f ms %9.3f ms %7.0f%% %10s\n", lbl, ttft, b_ttft * 1e3,
           100 * b_ttft * 1e3 / ttft, "<= 10 ms");
    printf("decode with the previous attention kernels: 1K %.3f ms, %dK %.3f ms\n", dec1k_old,
           ctx_long / 1024, dec32k_old);
    kvs_cuda_graph_counts(B.b, &g_launch, &g_capt);
    printf("graphs: %llu forwards launched as graphs, %llu captured\n",
           (unsigned long long)g_launch, (unsigned long long)g_capt);
    printf("RESULT variants decode1k_nograph_ms=%.3f decode1k_nopdl_ms=%.3f "
           "decode1k_plain_ms=%.3f decode1k_oldattn_ms=%.3f ttft32k_fa4warps_ms=%.3f\n",
           dec1k_nograph, dec1k_nopdl, dec1k_plain, dec1k_old, ttft_fa4);
    printf("RESULT ttft_ms 1024=%.3f 8192=%.3f 32768=%.3f 65536=%.3f stateless32k_ms=%.1f "
           "sessions64_ctx8k_tps=%.0f\n",
           ttft_at[0], ttft_at[1], ttft_at[2], ttft_at[3], stateless32k, sess_tps);
    printf("RESULT decode1k_ms=%.3f decode%dk_ms=%.3f append_tok_s=%.0f ttft_ms=%.3f "
           "gemm_tflops=%.0f copy_gbs=%.0f\n",
           dec1k, ctx_long / 1024, dec32k, n_append / append_s, ttft, gemm_rate * 1e-12,
           bw * 1e-9);

    free(B.logits);
    kvs_batch_free(&B.batch);
    kvs_forward_destroy(&B.fw);
    kvs_pool_destroy(&B.pool);
    kvs_model_destroy(&B.m);
    kvs_backend_destroy(&B.b);
    return 0;
}
