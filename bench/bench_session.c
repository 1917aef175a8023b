/* Session latency on the CPU: stateful vs stateless time-to-first-token and query time at
 * growing contexts, and the cost of a fixed 64-token append at each size, each next to an
 * estimate made of two terms measured in the same run:
 *   compute: FLOPs / the rate of one fixed large GEMM (512 x 576 x 1536, f32, through the
 *            engine's own matmul);
 *   memory:  bytes of weights and KV read / STREAM-triad bandwidth.
 *
 *   bench_session [-m MODEL] [-t THREADS] [--sizes 256,1024,...] [-o results.md]
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/status.h"
#include "kernels/dtype.h"
#include "worker/session.h"

#define QUESTION " Question: which symbol had the largest move, and in which direction was it?" /* 16 tokens */

static double median(double *v, int n)
{
    for (int i = 1; i < n; i++) {
        for (int j = i; j > 0 && v[j] < v[j - 1]; j--) {
            double t = v[j];
            v[j] = v[j - 1];
            v[j - 1] = t;
        }
    }
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* ---- STREAM triad ---- */
struct triad {
    double *a, *b, *c;
    size_t lo, hi;
};

static void *triad_run(void *p)
{
    struct triad *t = p;
    for (size_t i = t->lo; i < t->hi; i++) {
        t->a[i] = t->b[i] + 3.0 * t->c[i];
    }
    return NULL;
}

static double stream_triad_gbs(int threads)
{
    size_t n = (size_t)32 << 20; /* 3 arrays of 256 MiB */
    double *a = malloc(n * 8), *b = malloc(n * 8), *c = malloc(n * 8);
    for (size_t i = 0; i < n; i++) {
        a[i] = 0;
        b[i] = (double)i;
        c[i] = 1.0;
    }
    double best = 1e30;
    for (int rep = 0; rep < 5; rep++) {
        pthread_t th[64];
        struct triad t[64];
        double t0 = kvs_now();
        for (int i = 0; i < threads; i++) {
            t[i] = (struct triad){a, b, c, n * (size_t)i / (size_t)threads,
                                  n * (size_t)(i + 1) / (size_t)threads};
            pthread_create(&th[i], NULL, triad_run, &t[i]);
        }
        for (int i = 0; i < threads; i++) {
            pthread_join(th[i], NULL);
        }
        double dt = kvs_now() - t0;
        best = dt < best ? dt : best;
    }
    free(a);
    free(b);
    free(c);
    return 3.0 * (double)n * 8 / best / 1e9;
}

/* ---- GEMM rate through the engine's own matmul ---- */
static double gemm_gflops(kvs_backend *b)
{
    const int M = 512, K = 576, N = 1536;
    float *w = malloc((size_t)N * K * 4), *x = malloc((size_t)M * K * 4),
          *y = malloc((size_t)M * N * 4);
    for (size_t i = 0; i < (size_t)N * K; i++) {
        w[i] = (float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
    }
    for (size_t i = 0; i < (size_t)M * K; i++) {
        x[i] = (float)((i * 40503u) % 1000) / 1000.0f - 0.5f;
    }
    struct kvs_weight wt = {.type = KVS_DTYPE_F32, .n_in = K, .n_out = N,
                            .row_bytes = (size_t)K * 4};
    b->ops->weight_load(b, &wt, w);
    b->ops->matmul(b, &wt, x, M, NULL, y); /* warm-up */
    double t[5];
    for (int i = 0; i < 5; i++) {
        double t0 = kvs_now();
        b->ops->matmul(b, &wt, x, M, NULL, y);
        b->ops->sync(b);
        t[i] = kvs_now() - t0;
    }
    b->ops->weight_free(b, &wt);
    free(w);
    free(x);
    free(y);
    return 2.0 * M * K * N / median(t, 5) / 1e9;
}

/* ---- the estimate ---- */
struct model_cost {
    double flops_per_token; /* 2 x MACs of every matmul except the LM head */
    double lm_head_flops;   /* 2 x vocab x embd, once per call that wants logits */
    double weight_bytes;    /* every tensor, read once per forward call */
    double cell_bytes;      /* KV bytes of one cell */
    double attn_flops_per_pair; /* 4 x head_dim x heads x layers per (row, cell) */
};

static struct model_cost model_cost(const kvs_engine *e)
{
    const struct kvs_hparams *h = &e->model->hp;
    double E = h->n_embd, Hd = (double)h->n_head * h->head_dim,
           KVd = (double)h->n_head_kv * h->head_dim, F = h->n_ff;
    double per_layer = E * Hd + 2 * E * KVd + Hd * E + 3 * E * F;
    struct model_cost c;
    c.flops_per_token = 2.0 * per_layer * h->n_layer;
    c.lm_head_flops = 2.0 * E * h->n_vocab;
    c.weight_bytes = 0;
    for (uint64_t i = 0; i < kvs_gguf_n_tensors(e->model->gguf); i++) {
        c.weight_bytes += (double)kvs_gguf_tensor_at(e->model->gguf, i)->nbytes;
    }
    const struct kvs_kv_layout *l = kvs_pool_layout(e->pool);
    c.cell_bytes = (double)kvs_pool_cell_bytes(l->n_layer, l->n_kv_head, l->head_dim, l->dtype);
    c.attn_flops_per_pair = 4.0 * h->head_dim * h->n_head * h->n_layer;
    return c;
}

/* Seconds to prefill q rows after ctx cached cells (logits for the last row only). */
static void estimate(const struct model_cost *c, double ctx, double q, double gflops, double gbs,
                     double *t_compute, double *t_memory)
{
    double flops = c->flops_per_token * q + c->lm_head_flops +
                   c->attn_flops_per_pair * q * (ctx + (q + 1) / 2);
    double bytes = c->weight_bytes + c->cell_bytes * (ctx + q);
    *t_compute = flops / (gflops * 1e9);
    *t_memory = bytes / (gbs * 1e9);
}

static int grow_to(kvs_session *s, int64_t target, int *tick)
{
    static const char *sym[] = {"AAPL", "MSFT", "GOOG", "NVDA", "AMZN"};
    char line[128], err[256];
    struct kvs_session_info in;
    kvs_session_info(s, &in);
    while (in.cells_used < target - 24) {
        int i = (*tick)++;
        snprintf(line, sizeof line, "%s %.2f %+.2f vol=%d", sym[i % 5], 100.0 + (i * 37 % 900) / 10.0,
                 ((i * 13 % 200) - 100) / 100.0, 100 + i * 7 % 5000);
        struct kvs_append_result r;
        int rc = kvs_session_append(s, line, strlen(line), 0, 0, &r, err, sizeof err);
        if (rc < 0) {
            fprintf(stderr, "bench_session: append: %s\n", err);
            return rc;
        }
        kvs_session_info(s, &in);
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *model = NULL, *out_path = NULL;
    int threads = 2;
    int64_t sizes[16] = {256, 1024, 2048, 4096, 7680};
    int n_sizes = 5;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-m") == 0 && i + 1 < argc) {
            model = argv[++i];
        } else if (strcmp(argv[i], "-t") == 0 && i + 1 < argc) {
            threads = atoi(argv[++i]);
        } else if (strcmp(argv[i], "-o") == 0 && i + 1 < argc) {
            out_path = argv[++i];
        } else if (strcmp(argv[i], "--sizes") == 0 && i + 1 < argc) {
            n_sizes = 0;
            for (char *p = strtok(argv[++i], ","); p != NULL && n_sizes < 16; p = strtok(NULL, ",")) {
                sizes[n_sizes++] = atoll(p);
            }
        } else {
            fprintf(stderr, "usage: bench_session [-m MODEL] [-t THREADS] [--sizes a,b,..] [-o FILE]\n");
            return 2;
        }
    }
    char def[1024];
    if (model == NULL) {
        snprintf(def, sizeof def, "%s/.cache/kvstream/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                 getenv("HOME") ? getenv("HOME") : "/root");
        model = def;
    }
    char err[512];
    kvs_engine *e;
    struct kvs_engine_opts eo = {.model_path = model, .n_threads = threads, .n_cells = 2 * 8192 + 512};
    if (kvs_engine_open(&eo, &e, err, sizeof err) < 0) {
        fprintf(stderr, "bench_session: %s\n", err);
        return 1;
    }
    double gbs = stream_triad_gbs(threads);
    double gflops = gemm_gflops(e->backend);
    struct model_cost mc = model_cost(e);
    printf("ceilings (measured now): GEMM 512x576x1536 f32 %.1f GFLOP/s, STREAM triad %.1f GB/s "
           "(%d threads)\n", gflops, gbs, threads);
    printf("model: %.0f MFLOP/token, %.1f MB of weights, %.1f KB of KV per cell\n",
           mc.flops_per_token / 1e6, mc.weight_bytes / 1e6, mc.cell_bytes / 1e3);

    kvs_sessions *S;
    kvs_sessions_new(e, &(struct kvs_sessions_opts){0}, &S);
    kvs_session *s;
    struct kvs_session_opts so = {.budget_cells = 8192 - 128, .query_reserve = 128};
    if (kvs_session_create(S, "bench", &so, &s, err, sizeof err) < 0) {
        fprintf(stderr, "bench_session: %s\n", err);
        return 1;
    }
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 1};
    int32_t app[64];
    for (int i = 0; i < 64; i++) {
        app[i] = 200 + i;
    }
    char table[8192];
    size_t tl = 0;
    tl += (size_t)snprintf(table + tl, sizeof table - tl,
        "| context | q tokens | stateful TTFT ms | estimate ms (compute + memory) | ratio | "
        "stateless TTFT ms | stateless/stateful | query total ms (16 tok) | append 64 ms | "
        "append estimate ms | ratio |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    int tick = 0;
    bool ok = true;
    double last_speedup = 0;
    for (int k = 0; k < n_sizes; k++) {
        if (grow_to(s, sizes[k], &tick) < 0) {
            return 1;
        }
        struct kvs_session_info in;
        kvs_session_info(s, &in);
        double ctx = (double)in.cells_used;
        /* stateful TTFT: median of 5 */
        double tt[5], q_tokens = 0;
        for (int r = 0; r < 5; r++) {
            struct kvs_answer a;
            if (kvs_session_query(s, QUESTION, strlen(QUESTION), &qo, NULL, NULL, &a, err, sizeof err) < 0) {
                fprintf(stderr, "bench_session: query: %s\n", err);
                return 1;
            }
            tt[r] = a.ttft_s;
            q_tokens = a.question_tokens;
            kvs_answer_free(&a);
        }
        double ttft = median(tt, 5);
        /* whole query with a 16-token answer */
        struct kvs_query_opts q16 = qo;
        q16.max_tokens = 16;
        struct kvs_answer a16;
        kvs_session_query(s, QUESTION, strlen(QUESTION), &q16, NULL, NULL, &a16, err, sizeof err);
        double total = a16.total_s;
        kvs_answer_free(&a16);
        /* stateless TTFT: once */
        struct kvs_query_opts sl = qo;
        sl.stateless = true;
        struct kvs_answer b;
        if (kvs_session_query(s, QUESTION, strlen(QUESTION), &sl, NULL, NULL, &b, err, sizeof err) < 0) {
            fprintf(stderr, "bench_session: stateless: %s\n", err);
            return 1;
        }
        double st = b.ttft_s;
        kvs_answer_free(&b);
        double tc, tm, ac, am;
        estimate(&mc, ctx, q_tokens, gflops, gbs, &tc, &tm);
        /* a fixed 64-token append at this size (no logits), median of 3 (each grows ctx by 64) */
        double at[3];
        for (int r = 0; r < 3; r++) {
            struct kvs_append_result ar;
            double t0 = kvs_now();
            if (kvs_session_append_tokens(s, app, 64, 0, 0, &ar, err, sizeof err) < 0) {
                fprintf(stderr, "bench_session: append: %s\n", err);
                return 1;
            }
            at[r] = kvs_now() - t0;
        }
        double ap = median(at, 3);
        estimate(&mc, ctx + 64, 64, gflops, gbs, &ac, &am);
        ac -= mc.lm_head_flops / (gflops * 1e9);
        double est = tc + tm, aest = ac + am;
        tl += (size_t)snprintf(table + tl, sizeof table - tl,
            "| %.0f | %.0f | %.1f | %.1f (%.1f + %.1f) | %.2f | %.0f | %.0fx | %.1f | %.1f | %.1f | %.2f |\n",
            ctx, q_tokens, ttft * 1e3, est * 1e3, tc * 1e3, tm * 1e3, ttft / est, st * 1e3,
            st / ttft, total * 1e3, ap * 1e3, aest * 1e3, ap / aest);
        ok = ok && ttft / est <= 1.5 && ap / aest <= 1.5;
        last_speedup = st / ttft;
        printf("%s", strrchr(table, '|') ? "" : "");
        fprintf(stderr, "context %.0f done\n", ctx);
    }
    time_t now = time(NULL);
    char date[32];
    strftime(date, sizeof date, "%Y-%m-%d", gmtime(&now));
    char head[2048];
    snprintf(head, sizeof head,
             "# Session latency (CPU), %s\n\nmodel %s, %d threads, KV f16; GEMM %.1f GFLOP/s, "
             "STREAM triad %.1f GB/s measured in this run. Estimate = FLOPs / GEMM rate + "
             "(weights + KV bytes) / triad bandwidth.\n\n",
             date, model, threads, gflops, gbs);
    printf("\n%s%s\ngates: stateful TTFT and append within 1.5x of their estimates: %s; "
           "stateless/stateful at the largest context: %.0fx (gate >= 100x)\n",
           head, table, ok ? "met" : "NOT met", last_speedup);
    if (out_path != NULL) {
        FILE *f = fopen(out_path, "w");
        if (f != NULL) {
            fprintf(f, "%s%s\nGates: within 1.5x of estimate: %s; stateless/stateful at the "
                       "largest context %.0fx (gate >= 100x).\n",
                    head, table, ok ? "met" : "NOT met", last_speedup);
            fclose(f);
        }
    }
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
    return 0;
}
