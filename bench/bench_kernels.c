/* Kernel benchmark of the CPU backend: GEMV/GEMM on the default model's shapes
 * (SmolLM2-135M: hidden 576, KV 192, FFN 1536, vocab 49152) for Q4_1 / Q8_0 / F16 weights,
 * 1 and 2 threads, 1 and 512 rows; a whole decode token's matmuls (30 layers of distinct
 * weights + the output projection); decode attention; thread-pool dispatch cost; and a
 * STREAM triad for the memory bandwidth these numbers should be read against.
 *
 * usage: bench_kernels [--quick]      (KVS_CPU_ISA=scalar|avx2|avx512 picks the level)
 */
#include "common/status.h"
#include "kernels/backend.h"
#include "kernels/cpu/threadpool.h"
#include "kernels/dtype.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t rng = 88172645463325252ull;
static uint32_t rnd32(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)rng;
}

/* Random weight bytes of a type, with sane scales (values don't matter for timing). */
static void *random_weight(uint32_t type, int64_t n_out, int64_t n_in, size_t *rb_out)
{
    uint64_t rb = 0;
    if (!kvs_dtype_row_bytes(type, (uint64_t)n_in, &rb)) {
        abort();
    }
    size_t total = (size_t)rb * (size_t)n_out;
    uint8_t *p = malloc(total);
    for (size_t i = 0; i < total; i++) {
        p[i] = (uint8_t)rnd32();
    }
    uint32_t be = kvs_dtype_block_elems(type), bb = kvs_dtype_block_bytes(type);
    if (type == KVS_DTYPE_F16) {
        for (size_t i = 0; i < total / 2; i++) {
            uint16_t h = kvs_fp32_to_fp16(((float)(rnd32() % 2000) - 1000.0f) * 1e-4f);
            memcpy(p + 2 * i, &h, 2);
        }
    } else if (be == 32) {
        for (size_t i = 0; i < total / bb; i++) {
            uint16_t d = kvs_fp32_to_fp16(0.01f);
            memcpy(p + i * bb, &d, 2);
            if (type == KVS_DTYPE_Q4_1) {
                memcpy(p + i * bb + 2, &d, 2);
            }
        }
    }
    *rb_out = rb;
    return p;
}

static struct kvs_weight make_weight(kvs_backend *b, uint32_t type, int64_t n_out, int64_t n_in)
{
    size_t rb;
    void *h = random_weight(type, n_out, n_in, &rb);
    struct kvs_weight w = {.type = type, .n_in = n_in, .n_out = n_out, .row_bytes = rb};
    if (b->ops->weight_load(b, &w, h) != 0) {
        fprintf(stderr, "weight_load failed\n");
        exit(1);
    }
    free(h);
    return w;
}

/* Minimum seconds per call (the machine is shared: the minimum is the kernel's speed) of fn over reps calls after warm-up (min total time ~0.2 s). */
static double time_matmul(kvs_backend *b, const struct kvs_weight *w, const float *x,
                          int32_t rows, float *y, bool quick)
{
    double samples[64];
    int n = 0;
    double budget = quick ? 0.05 : 0.25, t_start = now_s();
    b->ops->matmul(b, w, x, rows, NULL, y);
    while (n < 64 && (n < 5 || now_s() - t_start < budget)) {
        double t0 = now_s();
        b->ops->matmul(b, w, x, rows, NULL, y);
        samples[n++] = now_s() - t0;
    }
    for (int i = 1; i < n; i++) { /* insertion sort */
        double v = samples[i];
        int j = i - 1;
        while (j >= 0 && samples[j] > v) {
            samples[j + 1] = samples[j];
            j--;
        }
        samples[j + 1] = v;
    }
    return samples[0];
}

/* ---- STREAM triad --------------------------------------------------------------------------- */

struct triad_job {
    float *a;
    const float *b, *c;
    float s;
};

static void triad_range(void *arg, int64_t i0, int64_t i1, int32_t ith)
{
    struct triad_job *j = arg;
    for (int64_t i = i0; i < i1; i++) {
        j->a[i] = j->b[i] + j->s * j->c[i];
    }
}

static void bench_triad(int32_t n_threads, int64_t n, int reps, const char *label)
{
    kvs_threadpool *tp = kvs_threadpool_new(n_threads);
    float *a = aligned_alloc(64, (size_t)n * 4), *bb = aligned_alloc(64, (size_t)n * 4);
    float *c = aligned_alloc(64, (size_t)n * 4);
    for (int64_t i = 0; i < n; i++) {
        a[i] = 0.0f;
        bb[i] = 1.0f;
        c[i] = 2.0f;
    }
    struct triad_job j = {.a = a, .b = bb, .c = c, .s = 3.0f};
    kvs_threadpool_for(tp, n, 4096, triad_range, &j);
    double best = 1e9;
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        kvs_threadpool_for(tp, n, 4096, triad_range, &j);
        double t = now_s() - t0;
        best = t < best ? t : best;
    }
    printf("triad %-6s %d thread(s): %7.1f GB/s  (3 x %.0f MB, best of %d)\n", label, n_threads,
           3.0 * (double)n * 4 / best / 1e9, (double)n * 4 / 1e6, reps);
    free(a);
    free(bb);
    free(c);
    kvs_threadpool_destroy(&tp);
}

static void noop(void *arg, int64_t i0, int64_t i1, int32_t ith)
{
}

int main(int argc, char **argv)
{
    bool quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    static const int64_t shapes[][2] = {{576, 576}, {192, 576}, {1536, 576}, {576, 1536},
                                        {49152, 576}};
    static const uint32_t types[] = {KVS_DTYPE_Q4_1, KVS_DTYPE_Q8_0, KVS_DTYPE_F16};
    kvs_backend *bk[2] = {kvs_backend_cpu_new(1), kvs_backend_cpu_new(2)};
    printf("kernel level: %s\n", kvs_backend_cpu_isa(bk[0]));

    /* memory bandwidth: DRAM-sized and L3-sized arrays */
    for (int t = 1; t <= 2; t++) {
        bench_triad(t, 32 << 20, quick ? 3 : 10, "DRAM");
        bench_triad(t, 2 << 20, quick ? 10 : 50, "8MB");
    }

    /* thread pool: cost of one dispatch */
    {
        kvs_threadpool *tp = kvs_threadpool_new(2);
        int n = 200000;
        double t0 = now_s();
        for (int i = 0; i < n; i++) {
            kvs_threadpool_for(tp, 64, 1, noop, NULL);
        }
        uint64_t jobs, wchunks;
        kvs_threadpool_stats(tp, &jobs, &wchunks);
        printf("thread pool: %.2f us per empty 2-thread dispatch of 8 chunks (hot); "
               "worker took %.1f%% of chunks\n",
               (now_s() - t0) / n * 1e6, 100.0 * (double)wchunks / (8.0 * (double)jobs));
        kvs_threadpool_destroy(&tp);
    }

    /* matmul per shape */
    printf("\n%-6s %-12s %4s %3s %10s %9s %9s\n", "type", "n_out x n_in", "rows", "thr",
           "ms", "GFLOP/s", "GB/s(W)");
    int32_t max_rows = 512;
    float *x = malloc((size_t)max_rows * 1536 * 4), *y = malloc((size_t)max_rows * 49152 * 4);
    for (int64_t i = 0; i < (int64_t)max_rows * 1536; i++) {
        x[i] = ((float)(rnd32() % 2000) - 1000.0f) * 1e-3f;
    }
    for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ti++) {
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            int64_t n_out = shapes[si][0], n_in = shapes[si][1];
            for (int rows = 1; rows <= 512; rows *= 512) {
                if (quick && rows == 512 && n_out == 49152) {
                    continue;
                }
                for (int t = 0; t < 2; t++) {
                    struct kvs_weight w = make_weight(bk[t], types[ti], n_out, n_in);
                    double s = time_matmul(bk[t], &w, x, rows, y, quick);
                    double bytes = (double)w.row_bytes * (double)n_out;
                    printf("%-6s %5lld x %-5lld %4d %3d %10.4f %9.1f %9.1f\n",
                           kvs_dtype_name(types[ti]), (long long)n_out, (long long)n_in, rows,
                           t + 1, s * 1e3, 2.0 * rows * n_in * n_out / s / 1e9,
                           bytes / s / 1e9);
                    bk[t]->ops->weight_free(bk[t], &w);
                }
            }
        }
    }

    /* a whole decode token: 30 layers x (q, k, v, o, gate, up, down) of distinct weights +
     * the 49152 x 576 output, 1 row, weights Q4_1 (the default model) and Q8_0 */
    static const int64_t layer_shapes[7][2] = {{576, 576},   {192, 576},  {192, 576}, {576, 576},
                                               {1536, 576},  {1536, 576}, {576, 1536}};
    enum { N_LAYER = 30 };
    /* ti 2 = the real default model: Q4_1 layers, Q8_0 tied embedding/output */
    for (size_t ti = 0; ti < 3; ti++) {
        uint32_t layer_type = ti == 2 ? KVS_DTYPE_Q4_1 : types[ti];
        uint32_t out_type = ti == 2 ? KVS_DTYPE_Q8_0 : types[ti];
        for (int t = 0; t < 2; t++) {
            kvs_backend *b = bk[t];
            struct kvs_weight *ws = malloc(sizeof(struct kvs_weight) * (N_LAYER * 7 + 1));
            double bytes = 0.0, macs = 0.0;
            for (int l = 0; l < N_LAYER; l++) {
                for (int i = 0; i < 7; i++) {
                    ws[l * 7 + i] = make_weight(b, layer_type, layer_shapes[i][0], layer_shapes[i][1]);
                }
            }
            ws[N_LAYER * 7] = make_weight(b, out_type, 49152, 576);
            for (int i = 0; i < N_LAYER * 7 + 1; i++) {
                bytes += (double)ws[i].row_bytes * (double)ws[i].n_out;
                macs += (double)ws[i].n_in * (double)ws[i].n_out;
            }
            int reps = quick ? 10 : 50;
            double best = 1e9, sum = 0.0;
            for (int r = 0; r < reps + 2; r++) {
                double t0 = now_s();
                for (int i = 0; i < N_LAYER * 7 + 1; i++) {
                    b->ops->matmul(b, &ws[i], x, 1, NULL, y);
                }
                double dt = now_s() - t0;
                if (r >= 2) {
                    best = dt < best ? dt : best;
                    sum += dt;
                }
            }
            printf("\ndecode token matmuls %s, %d thread(s): %.3f ms mean, %.3f ms best "
                   "(%.1f M MACs, %.1f MB of weights, %.1f GB/s, %.0f tok/s bound)\n",
                   ti == 2 ? "Q4_1+Q8_0 out (default model)" : kvs_dtype_name(types[ti]), t + 1,
                   sum / reps * 1e3, best * 1e3, macs / 1e6,
                   bytes / 1e6, bytes / (sum / reps) / 1e9, reps / sum);
            for (int i = 0; i < N_LAYER * 7 + 1; i++) {
                b->ops->weight_free(b, &ws[i]);
            }
            free(ws);
        }
    }

    /* decode attention: 1 row, 9 heads over 3 KV heads x 64, block 16, contexts 1K..8K */
    for (int dt = 0; dt < 2; dt++) {
        uint32_t kdt = dt == 0 ? KVS_DTYPE_F32 : KVS_DTYPE_F16;
        for (int t = 0; t < 2; t++) {
            kvs_backend *b = bk[t];
            struct kvs_kv_layout lay = {.n_layer = 1, .n_block = 512, .block_size = 16,
                                        .n_kv_head = 3, .head_dim = 64, .dtype = kdt};
            kvs_kv_cache *kv = NULL;
            if (b->ops->kv_new(b, &lay, &kv) != 0) {
                return 1;
            }
            int32_t *table = malloc(512 * 4);
            for (int i = 0; i < 512; i++) {
                table[i] = (i * 7) % 512;
            }
            for (int32_t ctx = 1024; ctx <= 8192; ctx *= 8) {
                int32_t slot = table[(ctx - 1) / 16] * 16 + (ctx - 1) % 16, rt = 0;
                struct kvs_attn_batch ab = {.n_rows = 1, .row_slot = &slot, .row_ctx = &ctx,
                                            .row_table = &rt, .tables = table};
                float q[9 * 64], o[9 * 64];
                for (int i = 0; i < 9 * 64; i++) {
                    q[i] = 0.01f * (float)(i % 17);
                }
                int reps = 200;
                double t0 = now_s();
                for (int r = 0; r < reps; r++) {
                    b->ops->attention(b, kv, 0, q, 9, 0.125f, &ab, o);
                }
                double s = (now_s() - t0) / reps;
                printf("attention decode %s ctx %5d, %d thread(s): %.1f us (x30 layers: %.2f ms)\n",
                       kvs_dtype_name(kdt), ctx, t + 1, s * 1e6, s * 30e3);
            }
            /* prefill attention: a 512-row chunk of one sequence after `past` cells */
            for (int32_t past = 0; past <= 1536; past += 1536) {
                enum { PR = 512 };
                int32_t *slots = malloc(PR * 4), *ctxs = malloc(PR * 4), *rts = calloc(PR, 4);
                float *pq = malloc((size_t)PR * 9 * 64 * 4), *po = malloc((size_t)PR * 9 * 64 * 4);
                for (int32_t r = 0; r < PR; r++) {
                    int32_t p = past + r;
                    slots[r] = table[p / 16] * 16 + p % 16;
                    ctxs[r] = p + 1;
                }
                for (int i = 0; i < PR * 9 * 64; i++) {
                    pq[i] = 0.01f * (float)(i % 17);
                }
                struct kvs_attn_batch ab = {.n_rows = PR, .row_slot = slots, .row_ctx = ctxs,
                                            .row_table = rts, .tables = table};
                int reps = quick ? 3 : 10;
                b->ops->attention(b, kv, 0, pq, 9, 0.125f, &ab, po);
                double t0 = now_s();
                for (int r = 0; r < reps; r++) {
                    b->ops->attention(b, kv, 0, pq, 9, 0.125f, &ab, po);
                }
                double s = (now_s() - t0) / reps;
                printf("attention prefill %s 512 rows after %4d cells, %d thread(s): %.2f ms "
                       "(x30 layers: %.1f ms)\n",
                       kvs_dtype_name(kdt), past, t + 1, s * 1e3, s * 30e3);
                free(slots);
                free(ctxs);
                free(rts);
                free(pq);
                free(po);
            }
            free(table);
            b->ops->kv_destroy(b, &kv);
        }
    }
    free(x);
    free(y);
    kvs_backend_destroy(&bk[0]);
    kvs_backend_destroy(&bk[1]);
    return 0;
}
