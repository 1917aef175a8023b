/* kernels/cpu: every op of the CPU backend against plain scalar references (double
 * accumulation) on random inputs over many shapes, and the batch-invariance contract of
 * kernels/backend.h checked bit for bit (memcmp): a row alone vs. inside batches, 1 vs. 2
 * threads, attention over a context delivered at once vs. built token by token, and after a
 * block copy.
 *
 * Every test runs at each kernel level this CPU has (KVS_CPU_ISA=scalar, avx2, avx512):
 * the level is chosen when a backend is created, so each test sets the variable first.
 *
 * Tolerances (|got - ref| <= tol):
 *   float weights (F32/F16/BF16): 2 * n_in * 2^-24 * sum_k |w_k x_k|, the textbook bound of
 *     an f32 dot product of length n_in; the weights themselves are exact in the reference.
 *   quantized weights (Q8_0/Q4_0/Q4_1): the activation row is rounded to 8-bit blocks with
 *     scale d_b = max|x_b| / 127, so each x_k moves by at most d_b / 2, and the block's d
 *     and sum are then rounded to f16 (llama.cpp's Q8_1 numerics): the error bound is
 *     sum_b (d_b / 2 + 2^-11 max|x_b|) * sum_{k in b} |w_k| + |offset_b| * 2^-11 * 32 max|x_b|
 *     (times 1.001) plus the f32 bound above.
 *   rmsnorm, swiglu: 1e-6 relative; rope: 2e-6 * (|x0| + |x1|) (cos/sin in double, rotation in
 *     f32); attention: 2e-6 + 256 * 2^-24 * sqrt(ctx) (f32 dots and sums over the context; the
 *     reference reads the same stored f32/f16 K/V); with an f16 cache q is rounded to f16 (the
 *     reference does the same) and so is each softmax weight before it scales V (as llama.cpp
 *     does), which moves the output by at most 2^-11 * max|v|: that is added.
 */
#include "common/status.h"
#include "kernels/backend.h"
#include "kernels/cpu/threadpool.h" /* internal: tested directly for coverage */
#include "kernels/dtype.h"

#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- helpers --------------------------------------------------------------------------------- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

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

static float rnd_normal(void)
{
    return (rnd_unit() + rnd_unit() + rnd_unit()) * 1.0f;
}

static void fill_normal(float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        x[i] = rnd_normal();
    }
}

/* The ISA levels to test: scalar, then every level the CPU has. */
static const char *const isa_names[] = {"scalar", "avx2", "avx512"};
static int n_isa_levels(void)
{
    int n = 1;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
        n = 2;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")) {
            n = 3;
        }
    }
#endif
    return n;
}

static kvs_backend *new_backend(const char *isa, int32_t n_threads)
{
    setenv("KVS_CPU_ISA", isa, 1);
    kvs_backend *b = kvs_backend_cpu_new(n_threads);
    ck_assert_ptr_nonnull(b);
    ck_assert_str_eq(kvs_backend_cpu_isa(b), isa);
    return b;
}

/* Random host bytes of an (n_out, n_in) weight of type: random scales and quants covering
 * the full code range (Q8_0 includes -128). Caller frees. */
static void *random_weight(uint32_t type, int64_t n_out, int64_t n_in, size_t *row_bytes)
{
    uint64_t rb = 0;
    ck_assert(kvs_dtype_row_bytes(type, (uint64_t)n_in, &rb));
    uint8_t *p = malloc(rb * (size_t)n_out);
    ck_assert_ptr_nonnull(p);
    for (int64_t o = 0; o < n_out; o++) {
        uint8_t *row = p + (size_t)o * rb;
        switch (type) {
        case KVS_DTYPE_F32:
            for (int64_t k = 0; k < n_in; k++) {
                float v = rnd_normal() * 0.1f;
                memcpy(row + 4 * k, &v, 4);
            }
            break;
        case KVS_DTYPE_F16:
        case KVS_DTYPE_BF16:
            for (int64_t k = 0; k < n_in; k++) {
                float v = rnd_normal() * 0.1f;
                uint16_t h = type == KVS_DTYPE_F16 ? kvs_fp32_to_fp16(v) : kvs_fp32_to_bf16(v);
                memcpy(row + 2 * k, &h, 2);
            }
            break;
        default: {
            uint32_t bb = kvs_dtype_block_bytes(type);
            for (int64_t b = 0; b < n_in / 32; b++) {
                uint8_t *blk = row + b * bb;
                for (uint32_t i = 0; i < bb; i++) {
                    blk[i] = (uint8_t)rnd_u64();
                }
                uint16_t d = kvs_fp32_to_fp16(0.001f + 0.01f * (rnd_unit() + 1.0f));
                memcpy(blk, &d, 2);
                if (type == KVS_DTYPE_Q4_1) {
                    uint16_t m = kvs_fp32_to_fp16(-0.08f * (rnd_unit() + 1.0f));
                    memcpy(blk + 2, &m, 2);
                }
            }
        }
        }
    }
    *row_bytes = rb;
    return p;
}

static struct kvs_weight load_weight(kvs_backend *b, uint32_t type, const void *host,
                                     int64_t n_out, int64_t n_in, size_t row_bytes)
{
    struct kvs_weight w = {.type = type, .n_in = n_in, .n_out = n_out, .row_bytes = row_bytes};
    ck_assert_int_eq(b->ops->weight_load(b, &w, host), 0);
    return w;
}

static const uint32_t all_types[] = {KVS_DTYPE_F32,  KVS_DTYPE_F16,  KVS_DTYPE_BF16,
                                     KVS_DTYPE_Q8_0, KVS_DTYPE_Q4_0, KVS_DTYPE_Q4_1};
#define N_TYPES (sizeof all_types / sizeof all_types[0])

static bool is_quantized(uint32_t t)
{
    return t == KVS_DTYPE_Q8_0 || t == KVS_DTYPE_Q4_0 || t == KVS_DTYPE_Q4_1;
}

/* ---- thread pool ------------------------------------------------------------------------------ */

START_TEST(test_threads_many_small_calls)
{
    /* many tiny ops through the pool: add on 70000 elements (split over threads) repeated */
    kvs_backend *b = new_backend(isa_names[n_isa_levels() - 1], 2);
    ck_assert_int_eq(b->n_threads, 2);
    int64_t n = 200000;
    float *x = b->ops->alloc(b, (size_t)n * 4), *y = b->ops->alloc(b, (size_t)n * 4);
    for (int64_t i = 0; i < n; i++) {
        x[i] = 0.0f;
        y[i] = 1.0f;
    }
    for (int it = 0; it < 2000; it++) {
        ck_assert_int_eq(b->ops->add(b, x, y, n), 0);
    }
    for (int64_t i = 0; i < n; i++) {
        ck_assert(x[i] == 2000.0f);
    }
    b->ops->free(b, x);
    b->ops->free(b, y);
    kvs_backend_destroy(&b);
    ck_assert_ptr_null(b);
    kvs_backend_destroy(&b); /* NULL is fine */
}
END_TEST

struct cover_job {
    int32_t *hits; /* (n) */
    int64_t grain;
    int bad;       /* a piece that did not start at a multiple of grain */
};

static void cover_range(void *arg, int64_t i0, int64_t i1, int32_t ith)
{
    struct cover_job *j = arg;
    if (i0 % j->grain != 0 || ith < 0 || ith > 1) {
        __atomic_store_n(&j->bad, 1, __ATOMIC_RELAXED);
    }
    for (int64_t i = i0; i < i1; i++) {
        __atomic_fetch_add(&j->hits[i], 1, __ATOMIC_RELAXED);
    }
}

START_TEST(test_threadpool_coverage)
{
    /* every index exactly once, whatever n, grain and chunking; pieces start on grains */
    kvs_threadpool *tp = kvs_threadpool_new(2);
    ck_assert_ptr_nonnull(tp);
    ck_assert_int_eq(kvs_threadpool_size(tp), 2);
    int32_t *hits = calloc(5000, sizeof(int32_t));
    for (int it = 0; it < 1000; it++) {
        int64_t n = (int64_t)(rnd_u64() % 5000);
        int64_t grain = (int64_t)(1 + rnd_u64() % 40);
        int32_t chunks = (int32_t)(rnd_u64() % 20);
        memset(hits, 0, 5000 * sizeof(int32_t));
        struct cover_job j = {.hits = hits, .grain = grain};
        kvs_threadpool_for_chunks(tp, n, grain, chunks, cover_range, &j);
        ck_assert_int_eq(j.bad, 0);
        for (int64_t i = 0; i < n; i++) {
            ck_assert_int_eq(hits[i], 1);
        }
        for (int64_t i = n; i < 5000; i++) {
            ck_assert_int_eq(hits[i], 0);
        }
        if (it % 250 == 0) {
            usleep(2000); /* let the worker fall asleep on the futex now and then */
        }
    }
    uint64_t jobs = 0, worker_chunks = 0;
    kvs_threadpool_stats(tp, &jobs, &worker_chunks);
    ck_assert_uint_gt(jobs, 0);
    free(hits);
    kvs_threadpool_destroy(&tp);
    ck_assert_ptr_null(tp);
}
END_TEST

/* ---- matmul: accuracy -------------------------------------------------------------------------- */

/* Check y (n_rows, n_out) against the double reference of dequantized W. */
static void check_matmul(uint32_t type, const void *host_w, size_t rb, int64_t n_out, int64_t n_in,
                         const float *x, int32_t n_rows, const float *bias, const float *y)
{
    float *wrow = malloc((size_t)n_in * sizeof(float));
    for (int64_t o = 0; o < n_out; o++) {
        kvs_dequantize(type, (const uint8_t *)host_w + (size_t)o * rb, wrow, (uint64_t)n_in);
        for (int32_t r = 0; r < n_rows; r++) {
            const float *xr = x + (int64_t)r * n_in;
            double ref = 0.0, mag = 0.0, qerr = 0.0;
            for (int64_t k = 0; k < n_in; k++) {
                ref += (double)wrow[k] * xr[k];
                mag += fabs((double)wrow[k] * xr[k]);
            }
            if (is_quantized(type)) {
                for (int64_t b = 0; b < n_in / 32; b++) {
                    double amax = 0.0, wsum = 0.0;
                    for (int k = 0; k < 32; k++) {
                        amax = fmax(amax, fabs(xr[b * 32 + k]));
                        wsum += fabs(wrow[b * 32 + k]);
                    }
                    /* x_k moves by <= d/2 (q = round(x * 127/amax)), plus the block's
                     * scale d and sum s are rounded to f16 (as llama.cpp's Q8_1 blocks):
                     * |d - d16| * |q| <= 2^-11 * amax; |s - s16| <= 2^-11 * 32 * amax,
                     * times the block's offset (Q4_1: |m|, Q4_0: 8 |d|) */
                    double off = 0.0;
                    const uint8_t *blk = (const uint8_t *)host_w + (size_t)o * rb +
                                         (size_t)b * kvs_dtype_block_bytes(type);
                    uint16_t h16;
                    if (type == KVS_DTYPE_Q4_1) {
                        memcpy(&h16, blk + 2, 2);
                        off = fabs(kvs_fp16_to_fp32(h16));
                    } else if (type == KVS_DTYPE_Q4_0) {
                        memcpy(&h16, blk, 2);
                        off = 8.0 * fabs(kvs_fp16_to_fp32(h16));
                    }
                    qerr += amax * (1.0 / 254.0 + 0x1.0p-11) * wsum + off * 32.0 * amax * 0x1.0p-11;
                }
            }
            if (bias != NULL) {
                ref += bias[o];
                mag += fabs(bias[o]);
            }
            double tol = 1.001 * qerr + 2.0 * (double)(n_in + 1) * 0x1.0p-24 * mag + 1e-30;
            double got = y[(int64_t)r * n_out + o];
            if (!(fabs(got - ref) <= tol)) {
                ck_abort_msg("%s n_in %lld n_out %lld row %d out %lld: got %.9g ref %.9g tol %.3g",
                             kvs_dtype_name(type), (long long)n_in, (long long)n_out, r,
                             (long long)o, got, ref, tol);
            }
        }
    }
    free(wrow);
}

START_TEST(test_matmul_accuracy)
{
    static const int64_t n_ins[] = {32, 64, 96, 576, 1000, 1536, 4096};
    static const int64_t n_outs[] = {1, 5, 16, 37};
    static const int32_t rows[] = {1, 2, 3, 4, 5, 9, 17};
    kvs_backend *b = new_backend(isa_names[_i], 2);
    for (size_t t = 0; t < N_TYPES; t++) {
        uint32_t type = all_types[t];
        for (size_t a = 0; a < sizeof n_ins / sizeof n_ins[0]; a++) {
            int64_t n_in = n_ins[a];
            if (n_in % 32 != 0 && type != KVS_DTYPE_F32 && type != KVS_DTYPE_F16 &&
                type != KVS_DTYPE_BF16) {
                continue;
            }
            int64_t n_out = n_outs[(a + t) % 4];
            int32_t n_rows = rows[(a * 3 + t) % 7];
            size_t rb;
            void *hw = random_weight(type, n_out, n_in, &rb);
            struct kvs_weight w = load_weight(b, type, hw, n_out, n_in, rb);
            float *x = malloc((size_t)(n_rows * n_in) * sizeof(float));
            float *y = malloc((size_t)(n_rows * n_out) * sizeof(float));
            float *bias = malloc((size_t)n_out * sizeof(float));
            fill_normal(x, n_rows * n_in);
            fill_normal(bias, n_out);
            if (n_in >= 64) { /* an all-zero block and an outlier */
                memset(x, 0, 32 * sizeof(float));
                x[n_in - 1] = 40.0f;
            }
            ck_assert_int_eq(b->ops->matmul(b, &w, x, n_rows, NULL, y), 0);
            check_matmul(type, hw, rb, n_out, n_in, x, n_rows, NULL, y);
            ck_assert_int_eq(b->ops->matmul(b, &w, x, n_rows, bias, y), 0);
            check_matmul(type, hw, rb, n_out, n_in, x, n_rows, bias, y);
            b->ops->weight_free(b, &w);
            free(hw);
            free(x);
            free(y);
            free(bias);
        }
    }
    kvs_backend_destroy(&b);
}
END_TEST

/* ---- matmul: batch invariance ------------------------------------------------------------------ */

START_TEST(test_matmul_batch_invariance)
{
    enum { N_POOL = 64 };
    static const int64_t shapes[][2] = {{576, 200}, {1536, 67}, {96, 33}};
    static const int32_t batch_sizes[] = {2, 3, 4, 5, 7, 8, 9, 13, 16, 31, 33, 64};
    kvs_backend *b1 = new_backend(isa_names[_i], 1);
    kvs_backend *b2 = new_backend(isa_names[_i], 2);
    for (size_t t = 0; t < N_TYPES; t++) {
        uint32_t type = all_types[t];
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            int64_t n_in = shapes[s][0], n_out = shapes[s][1];
            size_t rb;
            void *hw = random_weight(type, n_out, n_in, &rb);
            struct kvs_weight w1 = load_weight(b1, type, hw, n_out, n_in, rb);
            struct kvs_weight w2 = load_weight(b2, type, hw, n_out, n_in, rb);
            float *pool = malloc((size_t)(N_POOL * n_in) * sizeof(float));
            float *alone = malloc((size_t)(N_POOL * n_out) * sizeof(float));
            float *xb = malloc((size_t)(N_POOL * n_in) * sizeof(float));
            float *yb = malloc((size_t)(N_POOL * n_out) * sizeof(float));
            float *bias = malloc((size_t)n_out * sizeof(float));
            fill_normal(pool, N_POOL * n_in);
            fill_normal(bias, n_out);
            for (int32_t r = 0; r < N_POOL; r++) { /* each row alone, 2 threads */
                ck_assert_int_eq(b2->ops->matmul(b2, &w2, pool + r * n_in, 1, bias,
                                                 alone + r * n_out), 0);
            }
            for (size_t k = 0; k < sizeof batch_sizes / sizeof batch_sizes[0]; k++) {
                int32_t n = batch_sizes[k];
                int32_t start = (int32_t)(rnd_u64() % N_POOL);
                for (int32_t i = 0; i < n; i++) { /* rows start.. (cyclic) at positions 0..n-1 */
                    memcpy(xb + i * n_in, pool + ((start + i) % N_POOL) * n_in,
                           (size_t)n_in * sizeof(float));
                }
                for (int th = 1; th <= 2; th++) {
                    kvs_backend *b = th == 1 ? b1 : b2;
                    ck_assert_int_eq(b->ops->matmul(b, th == 1 ? &w1 : &w2, xb, n, bias, yb), 0);
                    for (int32_t i = 0; i < n; i++) {
                        const float *ref = alone + ((start + i) % N_POOL) * n_out;
                        if (memcmp(yb + i * n_out, ref, (size_t)n_out * sizeof(float)) != 0) {
                            ck_abort_msg("%s %lldx%lld: row %d of a batch of %d (%d threads) "
                                         "differs from the row alone",
                                         kvs_dtype_name(type), (long long)n_out,
                                         (long long)n_in, i, n, th);
                        }
                    }
                }
            }
            b1->ops->weight_free(b1, &w1);
            b2->ops->weight_free(b2, &w2);
            free(hw);
            free(pool);
            free(alone);
            free(xb);
            free(yb);
            free(bias);
        }
    }
    kvs_backend_destroy(&b1);
    kvs_backend_destroy(&b2);
}
END_TEST

START_TEST(test_weight_load_errors)
{
    kvs_backend *b = new_backend("scalar", 1);
    uint8_t buf[64] = {0};
    struct kvs_weight w = {.type = KVS_DTYPE_Q4_1, .n_in = 33, .n_out = 1};
    ck_assert_int_eq(b->ops->weight_load(b, &w, buf), KVS_INVALID_ARGUMENT);
    w = (struct kvs_weight){.type = 12, .n_in = 32, .n_out = 1};
    ck_assert_int_eq(b->ops->weight_load(b, &w, buf), KVS_INVALID_ARGUMENT);
    w = (struct kvs_weight){.type = KVS_DTYPE_Q8_0, .n_in = 32, .n_out = 1, .row_bytes = 35};
    ck_assert_int_eq(b->ops->weight_load(b, &w, buf), KVS_INVALID_ARGUMENT);
    w = (struct kvs_weight){.type = KVS_DTYPE_Q8_0, .n_in = 32, .n_out = 1};
    ck_assert_int_eq(b->ops->weight_load(b, &w, buf), 0);
    ck_assert_uint_eq(w.row_bytes, 34);
    b->ops->weight_free(b, &w);
    ck_assert_ptr_null(w.data);
    kvs_backend_destroy(&b);
}
END_TEST

/* ---- ops --------------------------------------------------------------------------------------- */

START_TEST(test_get_rows)
{
    kvs_backend *b = new_backend(isa_names[_i], 2);
    for (size_t t = 0; t < N_TYPES; t++) {
        int64_t n_in = 96, n_out = 50;
        size_t rb;
        void *hw = random_weight(all_types[t], n_out, n_in, &rb);
        struct kvs_weight w = load_weight(b, all_types[t], hw, n_out, n_in, rb);
        int32_t ids[5] = {0, 49, 7, 7, 23};
        float out[5 * 96], ref[96];
        ck_assert_int_eq(b->ops->get_rows(b, &w, ids, 5, out), 0);
        for (int i = 0; i < 5; i++) {
            kvs_dequantize(all_types[t], (const uint8_t *)hw + (size_t)ids[i] * rb, ref, 96);
            for (int k = 0; k < 96; k++) {
                ck_assert_msg(fabsf(out[i * 96 + k] - ref[k]) <= 1e-6f * fabsf(ref[k]),
                              "%s row %d col %d: %g vs %g", kvs_dtype_name(all_types[t]),
                              ids[i], k, out[i * 96 + k], ref[k]);
            }
        }
        int32_t bad = 50;
        ck_assert_int_eq(b->ops->get_rows(b, &w, &bad, 1, out), KVS_OUT_OF_RANGE);
        b->ops->weight_free(b, &w);
        free(hw);
    }
    kvs_backend_destroy(&b);
}
END_TEST

START_TEST(test_rmsnorm_swiglu_add_gather)
{
    kvs_backend *b = new_backend(isa_names[_i], 2);
    static const int32_t dims[] = {1, 7, 64, 576, 4096};
    for (size_t d = 0; d < sizeof dims / sizeof dims[0]; d++) {
        int32_t dim = dims[d], n_rows = 37;
        int64_t n = (int64_t)dim * n_rows;
        float *x = malloc((size_t)n * 4), *w = malloc((size_t)dim * 4), *out = malloc((size_t)n * 4);
        float *u = malloc((size_t)n * 4), *cp = malloc((size_t)n * 4);
        fill_normal(x, n);
        fill_normal(w, dim);
        fill_normal(u, n);
        ck_assert_int_eq(b->ops->rmsnorm(b, x, w, n_rows, dim, 1e-5f, out), 0);
        for (int32_t r = 0; r < n_rows; r++) {
            double ss = 0.0;
            for (int32_t i = 0; i < dim; i++) {
                ss += (double)x[r * dim + i] * x[r * dim + i];
            }
            double sc = 1.0 / sqrt(ss / dim + 1e-5);
            for (int32_t i = 0; i < dim; i++) {
                double ref = x[r * dim + i] * sc * w[i];
                ck_assert_msg(fabs(out[r * dim + i] - ref) <= 1e-6 * fabs(ref) + 1e-30,
                              "rmsnorm dim %d: %g vs %g", dim, out[r * dim + i], ref);
            }
        }
        memcpy(cp, x, (size_t)n * 4); /* in place gives the same bits */
        ck_assert_int_eq(b->ops->rmsnorm(b, cp, w, n_rows, dim, 1e-5f, cp), 0);
        ck_assert_mem_eq(cp, out, (size_t)n * 4);

        ck_assert_int_eq(b->ops->swiglu(b, x, u, n, out), 0);
        for (int64_t i = 0; i < n; i++) {
            double ref = x[i] / (1.0 + exp(-(double)x[i])) * u[i];
            ck_assert_msg(fabs(out[i] - ref) <= 1e-6 * fabs(ref) + 1e-30, "swiglu %g vs %g",
                          out[i], ref);
        }
        memcpy(cp, x, (size_t)n * 4);
        ck_assert_int_eq(b->ops->swiglu(b, cp, u, n, cp), 0);
        ck_assert_mem_eq(cp, out, (size_t)n * 4);

        memcpy(cp, x, (size_t)n * 4);
        ck_assert_int_eq(b->ops->add(b, cp, u, n), 0);
        for (int64_t i = 0; i < n; i++) {
            ck_assert(cp[i] == x[i] + u[i]);
        }

        int32_t idx[4] = {36, 0, 5, 5};
        ck_assert_int_eq(b->ops->gather(b, x, idx, 4, dim, out), 0);
        for (int i = 0; i < 4; i++) {
            ck_assert_mem_eq(out + i * dim, x + idx[i] * dim, (size_t)dim * 4);
        }
        free(x);
        free(w);
        free(out);
        free(u);
        free(cp);
    }
    kvs_backend_destroy(&b);
}
END_TEST

START_TEST(test_rope)
{
    kvs_backend *b = new_backend(isa_names[_i], 2);
    static const int32_t head_dims[] = {64, 128, 80};
    float factors[64];
    for (int i = 0; i < 64; i++) {
        factors[i] = 1.0f + (float)i / 8.0f;
    }
    for (int style = 0; style < 2; style++) {
        for (size_t hdi = 0; hdi < 3; hdi++) {
            int32_t hd = head_dims[hdi], n_heads = 3, n_rows = 9;
            for (int variant = 0; variant < 3; variant++) {
                struct kvs_rope rope = {.n_dims = variant == 2 ? hd / 2 : hd,
                                        .style = style,
                                        .freq_base = variant == 0 ? 10000.0f : 500000.0f,
                                        .freq_scale = variant == 1 ? 0.25f : 1.0f,
                                        .freq_factors = variant == 1 ? factors : NULL};
                int64_t n = (int64_t)n_rows * n_heads * hd;
                float *x = malloc((size_t)n * 4), *orig = malloc((size_t)n * 4);
                int32_t pos[9] = {0, 1, 2, 15, 16, 17, 1000, 8191, 32767};
                fill_normal(orig, n);
                memcpy(x, orig, (size_t)n * 4);
                ck_assert_int_eq(b->ops->rope(b, x, n_rows, n_heads, hd, pos, &rope), 0);
                int32_t half = rope.n_dims / 2;
                for (int32_t r = 0; r < n_rows; r++) {
                    for (int32_t h = 0; h < n_heads; h++) {
                        const float *o = orig + ((int64_t)r * n_heads + h) * hd;
                        const float *g = x + ((int64_t)r * n_heads + h) * hd;
                        for (int32_t i = 0; i < half; i++) {
                            double th = pos[r] * (double)rope.freq_scale *
                                        pow(rope.freq_base, -2.0 * i / rope.n_dims);
                            if (rope.freq_factors != NULL) {
                                th /= rope.freq_factors[i];
                            }
                            int i0 = style == KVS_ROPE_NEOX ? i : 2 * i;
                            int i1 = style == KVS_ROPE_NEOX ? i + half : 2 * i + 1;
                            double r0 = o[i0] * cos(th) - o[i1] * sin(th);
                            double r1 = o[i0] * sin(th) + o[i1] * cos(th);
                            /* f32 angles as llama.cpp makes them (theta_i+1 = theta_i *
                             * base^(-2/n_dims)): each step rounds, so the angle is off by up
                             * to ~(i + 2) ulps of theta, plus sinf / cosf's own error */
                            double tol = (2e-6 + fabs(th) * (i + 2) * 0x1p-23) *
                                         (fabs(o[i0]) + fabs(o[i1]));
                            ck_assert_msg(fabs(g[i0] - r0) <= tol && fabs(g[i1] - r1) <= tol,
                                          "rope style %d hd %d pos %d i %d", style, hd, pos[r], i);
                        }
                        for (int32_t i = rope.n_dims; i < hd; i++) {
                            ck_assert(g[i] == o[i]); /* unrotated tail untouched */
                        }
                    }
                }
                /* a row's rotation does not depend on its batch */
                int32_t last = n_rows - 1;
                memcpy(x, orig + (int64_t)last * n_heads * hd, (size_t)(n_heads * hd) * 4);
                float *batch = malloc((size_t)n * 4);
                memcpy(batch, orig, (size_t)n * 4);
                ck_assert_int_eq(b->ops->rope(b, batch, n_rows, n_heads, hd, pos, &rope), 0);
                ck_assert_int_eq(b->ops->rope(b, x, 1, n_heads, hd, &pos[last], &rope), 0);
                ck_assert_mem_eq(x, batch + (int64_t)last * n_heads * hd,
                                 (size_t)(n_heads * hd) * 4);
                free(batch);
                free(x);
                free(orig);
            }
        }
    }
    struct kvs_rope bad = {.n_dims = 63, .style = 0, .freq_base = 10000.0f, .freq_scale = 1.0f};
    float x[64] = {0};
    int32_t p = 0;
    ck_assert_int_eq(b->ops->rope(b, x, 1, 1, 64, &p, &bad), KVS_INVALID_ARGUMENT);
    kvs_backend_destroy(&b);
}
END_TEST

/* ---- KV cache and attention --------------------------------------------------------------------- */

/* One attention configuration and a scalar model of the pool: cells of a sequence live in
 * the blocks of its table; the reference keeps each cell's K/V as stored (rounded to f16
 * when the cache is f16). */
struct attn_case {
    int32_t n_layer, n_block, block_size, n_kv_head, head_dim, n_head;
    uint32_t dtype;
};

static float stored(uint32_t dtype, float v)
{
    return dtype == KVS_DTYPE_F16 ? kvs_fp16_to_fp32(kvs_fp32_to_fp16(v)) : v;
}

/* out (n_head, hd) for a query q (n_head, hd) over n_ctx cells of K/V (n_ctx, n_kv_head, hd). */
static void attn_ref(const struct attn_case *c, const float *q, const float *K, const float *V,
                     int32_t n_ctx, float scale, double *out)
{
    int32_t hd = c->head_dim, group = c->n_head / c->n_kv_head;
    double *s = malloc((size_t)n_ctx * sizeof(double));
    for (int32_t h = 0; h < c->n_head; h++) {
        int32_t kvh = h / group;
        double mx = -INFINITY, l = 0.0;
        for (int32_t j = 0; j < n_ctx; j++) {
            double d = 0.0;
            for (int32_t i = 0; i < hd; i++) {
                d += (double)stored(c->dtype, q[h * hd + i]) *
                     stored(c->dtype, K[((int64_t)j * c->n_kv_head + kvh) * hd + i]);
            }
            s[j] = d * scale;
            mx = fmax(mx, s[j]);
        }
        for (int32_t j = 0; j < n_ctx; j++) {
            s[j] = exp(s[j] - mx);
            l += s[j];
        }
        for (int32_t i = 0; i < hd; i++) {
            double acc = 0.0;
            for (int32_t j = 0; j < n_ctx; j++) {
                acc += s[j] * stored(c->dtype, V[((int64_t)j * c->n_kv_head + kvh) * hd + i]);
            }
            out[h * hd + i] = acc / l;
        }
    }
    free(s);
}

/* A sequence of T tokens in the blocks of `table` (a permutation of free blocks). Rows of
 * the batch are tokens p0..p0+n-1 of the sequence. */
static void make_batch(int32_t bs, const int32_t *table, int32_t p0, int32_t n, int32_t *slot,
                       int32_t *ctx, int32_t *row_table)
{
    for (int32_t i = 0; i < n; i++) {
        int32_t p = p0 + i;
        slot[i] = table[p / bs] * bs + p % bs;
        ctx[i] = p + 1;
        row_table[i] = 0;
    }
}

/* n_tail: rows (the last ones) that attend; T for all. Long contexts attend only a tail,
 * since causal attention over every row costs O(T^2). */
static void run_attention_case(const char *isa, const struct attn_case *c, int32_t T, int32_t n_tail)
{
    kvs_backend *b = new_backend(isa, getenv("T1") ? 1 : 2);
    struct kvs_kv_layout lay = {.n_layer = c->n_layer, .n_block = c->n_block,
                                .block_size = c->block_size, .n_kv_head = c->n_kv_head,
                                .head_dim = c->head_dim, .dtype = c->dtype};
    kvs_kv_cache *kv = NULL;
    ck_assert_int_eq(b->ops->kv_new(b, &lay, &kv), 0);
    int32_t bs = c->block_size, hd = c->head_dim;
    int32_t nblk = (T + bs - 1) / bs;
    ck_assert(2 * nblk + 1 <= c->n_block);
    /* two disjoint tables: sequence A (whole batch) and sequence B (token by token), blocks
     * scattered over the pool in a random order */
    int32_t *perm = malloc((size_t)c->n_block * sizeof(int32_t));
    for (int32_t i = 0; i < c->n_block; i++) {
        perm[i] = i;
    }
    for (int32_t i = c->n_block - 1; i > 0; i--) {
        int32_t j = (int32_t)(rnd_u64() % (uint64_t)(i + 1)), t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    int32_t *tab_a = perm, *tab_b = perm + nblk;
    int32_t spare = perm[2 * nblk];
    int64_t kvn = (int64_t)T * c->n_kv_head * hd, qn = (int64_t)T * c->n_head * hd;
    float *K = malloc((size_t)kvn * 4), *V = malloc((size_t)kvn * 4), *Q = malloc((size_t)qn * 4);
    float *out_a = malloc((size_t)qn * 4), *out_b = malloc((size_t)qn * 4);
    fill_normal(K, kvn);
    fill_normal(V, kvn);
    fill_normal(Q, qn);
    double vmax = 0.0;
    for (int64_t i = 0; i < kvn; i++) {
        vmax = fmax(vmax, fabs(V[i]));
    }
    size_t nidx = (size_t)T + 16; /* part D uses up to 16 rows */
    int32_t *slot = malloc(nidx * 4), *ctx = malloc(nidx * 4), *rt = malloc(nidx * 4);
    float scale = 1.0f / sqrtf((float)hd);
    int32_t layer = c->n_layer - 1;

    /* A: the whole context in one batch (store, then attention of every row, causal) */
    make_batch(bs, tab_a, 0, T, slot, ctx, rt);
    struct kvs_attn_batch ab = {.n_rows = T, .row_slot = slot, .row_ctx = ctx, .row_table = rt,
                                .tables = tab_a};
    ck_assert_int_eq(b->ops->kv_store(b, kv, layer, K, V, &ab), 0);
    int32_t t0 = T - n_tail; /* first attending row */
    struct kvs_attn_batch ab_tail = {.n_rows = n_tail, .row_slot = slot + t0, .row_ctx = ctx + t0,
                                     .row_table = rt + t0, .tables = tab_a};
    memset(out_a, 0, (size_t)qn * 4);
    memset(out_b, 0, (size_t)qn * 4);
    ck_assert_int_eq(b->ops->attention(b, kv, layer, Q + (int64_t)t0 * c->n_head * hd, c->n_head,
                                       scale, &ab_tail, out_a + (int64_t)t0 * c->n_head * hd), 0);

    /* accuracy against the double reference, for a few rows */
    double *ref = malloc((size_t)(c->n_head * hd) * sizeof(double));
    int32_t probe[4] = {t0, t0 + (T - t0) / 2, T - 2 > t0 ? T - 2 : t0, T - 1};
    for (int pi = 0; pi < 4; pi++) {
        int32_t r = probe[pi];
        attn_ref(c, Q + (int64_t)r * c->n_head * hd, K, V, r + 1, scale, ref);
        for (int32_t i = 0; i < c->n_head * hd; i++) {
            double tol = 2e-6 + 64.0 * 0x1.0p-24 * sqrt((double)(r + 1)) * 4.0 +
                         (c->dtype == KVS_DTYPE_F16 ? 1.01 * 0x1.0p-11 * vmax : 0.0);
            ck_assert_msg(fabs(out_a[(int64_t)r * c->n_head * hd + i] - ref[i]) <= tol,
                          "attention %s hd %d ctx %d: %g vs %g", isa, hd, r + 1,
                          out_a[(int64_t)r * c->n_head * hd + i], ref[i]);
        }
    }

    /* B: the same tokens stored and attended one per call (chunks of 1, then the rest in
     * uneven chunks for long contexts) */
    int32_t p = 0;
    while (p < T) {
        int32_t n = p < 40 || p >= t0 ? 1 : (int32_t)(1 + rnd_u64() % 37);
        if (p + n > T) {
            n = T - p;
        }
        if (p < t0 && p + n > t0) {
            n = t0 - p;
        }
        make_batch(bs, tab_b, p, n, slot, ctx, rt);
        struct kvs_attn_batch bb = {.n_rows = n, .row_slot = slot, .row_ctx = ctx,
                                    .row_table = rt, .tables = tab_b};
        ck_assert_int_eq(b->ops->kv_store(b, kv, layer, K + (int64_t)p * c->n_kv_head * hd,
                                          V + (int64_t)p * c->n_kv_head * hd, &bb), 0);
        if (p >= t0) {
            ck_assert_int_eq(b->ops->attention(b, kv, layer, Q + (int64_t)p * c->n_head * hd,
                                               c->n_head, scale, &bb,
                                               out_b + (int64_t)p * c->n_head * hd), 0);
        }
        p += n;
    }
    ck_assert_msg(memcmp(out_a, out_b, (size_t)qn * 4) == 0,
                  "%s: attention differs between one batch and token by token", isa);

    /* C: copy B's last block into a spare block (copy-on-write of a tail); the last row
     * attends through the new table with the same bits */
    ck_assert_int_eq(b->ops->kv_copy_block(b, kv, tab_b[nblk - 1], spare), 0);
    tab_b[nblk - 1] = spare;
    make_batch(bs, tab_b, T - 1, 1, slot, ctx, rt);
    struct kvs_attn_batch bc = {.n_rows = 1, .row_slot = slot, .row_ctx = ctx, .row_table = rt,
                                .tables = tab_b};
    float *one = malloc((size_t)(c->n_head * hd) * 4);
    ck_assert_int_eq(b->ops->attention(b, kv, layer, Q + (int64_t)(T - 1) * c->n_head * hd,
                                       c->n_head, scale, &bc, one), 0);
    ck_assert_mem_eq(one, out_a + (int64_t)(T - 1) * c->n_head * hd, (size_t)(c->n_head * hd) * 4);

    /* D: rows of A and B mixed in one batch (two tables), 1 thread vs 2 threads */
    {
        int32_t n = n_tail < 8 ? n_tail : 8;
        int32_t *tables = malloc((size_t)(2 * nblk) * 4);
        memcpy(tables, tab_a, (size_t)nblk * 4);
        memcpy(tables + nblk, tab_b, (size_t)nblk * 4);
        float *qm = malloc((size_t)(2 * n * c->n_head * hd) * 4);
        float *om = malloc((size_t)(2 * n * c->n_head * hd) * 4);
        for (int32_t i = 0; i < 2 * n; i++) {
            int32_t pos = T - 1 - (i / 2) * (n_tail / n > 0 ? n_tail / n : 1);
            if (pos < t0) {
                pos = t0;
            }
            slot[i] = -1;
            ctx[i] = pos + 1;
            rt[i] = (i % 2) * nblk;
            memcpy(qm + (int64_t)i * c->n_head * hd, Q + (int64_t)pos * c->n_head * hd,
                   (size_t)(c->n_head * hd) * 4);
        }
        struct kvs_attn_batch bm = {.n_rows = 2 * n, .row_slot = slot, .row_ctx = ctx,
                                    .row_table = rt, .tables = tables};
        kvs_backend *b1 = new_backend(isa, 1);
        for (int th = 0; th < 2; th++) {
            kvs_backend *be = th == 0 ? b : b1;
            /* the cache belongs to b; the 1-thread backend of the same level reads it through
             * the same code (the CPU backend's caches are plain host memory) */
            ck_assert_int_eq(be->ops->attention(be, kv, layer, qm, c->n_head, scale, &bm, om), 0);
            for (int32_t i = 0; i < 2 * n; i++) {
                ck_assert_mem_eq(om + (int64_t)i * c->n_head * hd,
                                 out_a + (int64_t)(ctx[i] - 1) * c->n_head * hd,
                                 (size_t)(c->n_head * hd) * 4);
            }
        }
        kvs_backend_destroy(&b1);
        free(tables);
        free(qm);
        free(om);
    }

    free(one);
    free(ref);
    free(perm);
    free(K);
    free(V);
    free(Q);
    free(out_a);
    free(out_b);
    free(slot);
    free(ctx);
    free(rt);
    b->ops->kv_destroy(b, &kv);
    ck_assert_ptr_null(kv);
    kvs_backend_destroy(&b);
}

START_TEST(test_attention)
{
    /* head_dim 64/128, GQA ratios 1/3/4, F32/F16 cache, contexts crossing blocks */
    static const struct attn_case cases[] = {
        {2, 40, 16, 3, 64, 9, KVS_DTYPE_F32},  {1, 40, 16, 2, 128, 8, KVS_DTYPE_F16},
        {1, 40, 16, 4, 64, 4, KVS_DTYPE_F16},  {3, 40, 16, 1, 128, 3, KVS_DTYPE_F32},
        {1, 40, 8, 2, 72, 6, KVS_DTYPE_F32},
    };
    static const int32_t lengths[] = {1, 15, 16, 17, 33, 100};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        for (size_t li = 0; li < sizeof lengths / sizeof lengths[0]; li++) {
            run_attention_case(isa_names[_i], &cases[ci], lengths[li], lengths[li]);
        }
    }
}
END_TEST

START_TEST(test_attention_long_context)
{
    static const struct attn_case c16 = {1, 1100, 16, 3, 64, 9, KVS_DTYPE_F16};
    run_attention_case(isa_names[_i], &c16, 8192 + 5, 4);
}
END_TEST

/* Batch invariance of attention under tiling and segmentation: every row of a batch gets the
 * bits it gets alone on one thread, whatever rows share the call (runs of one sequence that
 * tile together, sequences interleaved, shuffled rows, a row repeated), with 1 or 2
 * threads, for contexts at and across the segment boundaries (1024 cells) and partial
 * blocks. Loop index: ISA level x cache dtype x shape. */
struct tile_shape {
    int32_t block_size, n_kv_head, head_dim, n_head;
};

START_TEST(test_attention_tiles)
{
    static const struct tile_shape shapes[] = {
        {16, 3, 64, 9}, /* SmolLM2: group 3 */
        {7, 2, 40, 8},  /* odd block (segments round up to 1029 cells), pv tail, group 4 */
        {16, 1, 20, 1}, /* head_dim not a multiple of 8: the per-cell dot fallback */
    };
    const int n_shapes = (int)(sizeof shapes / sizeof shapes[0]);
    const char *isa = isa_names[_i / (2 * n_shapes)];
    const uint32_t dtype = (_i / n_shapes) % 2 == 0 ? KVS_DTYPE_F16 : KVS_DTYPE_F32;
    const struct tile_shape *sh = &shapes[_i % n_shapes];
    const int32_t bs = sh->block_size, hd = sh->head_dim, nkv = sh->n_kv_head;
    const int32_t nh = sh->n_head, T = 3100, n_seq = 3;
    const int32_t nblk = (T + bs - 1) / bs;
    kvs_backend *b1 = new_backend(isa, 1), *b2 = new_backend(isa, 2);
    struct kvs_kv_layout lay = {.n_layer = 2, .n_block = n_seq * nblk, .block_size = bs,
                                .n_kv_head = nkv, .head_dim = hd, .dtype = dtype};
    kvs_kv_cache *kv = NULL;
    ck_assert_int_eq(b1->ops->kv_new(b1, &lay, &kv), 0);

    /* three sequences of T cells in scattered blocks; tables concatenated */
    int32_t *tables = malloc((size_t)n_seq * nblk * sizeof(int32_t));
    for (int32_t i = 0; i < n_seq * nblk; i++) {
        tables[i] = i;
    }
    for (int32_t i = n_seq * nblk - 1; i > 0; i--) {
        int32_t j = (int32_t)(rnd_u64() % (uint64_t)(i + 1)), t = tables[i];
        tables[i] = tables[j];
        tables[j] = t;
    }
    int64_t kvn = (int64_t)T * nkv * hd;
    float *K = malloc((size_t)kvn * 4), *V = malloc((size_t)kvn * 4);
    int32_t *slot = malloc((size_t)T * 4), *ctx = malloc((size_t)T * 4), *rt = malloc((size_t)T * 4);
    for (int32_t sq = 0; sq < n_seq; sq++) {
        fill_normal(K, kvn);
        fill_normal(V, kvn);
        for (int32_t p = 0; p < T; p++) {
            slot[p] = tables[sq * nblk + p / bs] * bs + p % bs;
            ctx[p] = p + 1;
            rt[p] = sq * nblk;
        }
        struct kvs_attn_batch ab = {.n_rows = T, .row_slot = slot, .row_ctx = ctx,
                                    .row_table = rt, .tables = tables};
        ck_assert_int_eq(b1->ops->kv_store(b1, kv, 1, K, V, &ab), 0);
    }

    /* the rows: (sequence, context), with the boundary contexts in every sequence */
    static const int32_t edges[] = {1, 2, 15, 16, 17, 1023, 1024, 1025, 1028, 1029, 1030,
                                    2047, 2048, 2049, 2058, 3000, 3100};
    enum { N_ROWS = 160 };
    int32_t rseq[N_ROWS], rctx[N_ROWS];
    int32_t n_rows = 0;
    for (int32_t sq = 0; sq < n_seq; sq++) {
        for (size_t e = 0; e < sizeof edges / sizeof edges[0]; e++) {
            rseq[n_rows] = sq;
            rctx[n_rows++] = edges[e];
        }
    }
    /* runs of consecutive positions (prefill chunks) around the boundaries */
    static const int32_t runs[][2] = {{1010, 30}, {2040, 14}, {3087, 13}, {1, 20}};
    for (size_t ri = 0; ri < sizeof runs / sizeof runs[0]; ri++) {
        for (int32_t i = 0; i < runs[ri][1]; i++) {
            rseq[n_rows] = (int32_t)ri % n_seq;
            rctx[n_rows++] = runs[ri][0] + i;
        }
    }
    while (n_rows < N_ROWS) {
        rseq[n_rows] = (int32_t)(rnd_u64() % (uint64_t)n_seq);
        rctx[n_rows++] = (int32_t)(1 + rnd_u64() % (uint64_t)T);
    }
    int64_t qrow = (int64_t)nh * hd;
    float *Q = malloc((size_t)(N_ROWS * qrow) * 4), *ref = malloc((size_t)(N_ROWS * qrow) * 4);
    float *qb = malloc((size_t)(N_ROWS * qrow) * 4), *ob = malloc((size_t)(N_ROWS * qrow) * 4);
    fill_normal(Q, N_ROWS * qrow);
    float scale = 1.0f / sqrtf((float)hd);

    /* each row alone, one thread */
    for (int32_t r = 0; r < n_rows; r++) {
        int32_t sl = -1, rtab = rseq[r] * nblk;
        struct kvs_attn_batch ab = {.n_rows = 1, .row_slot = &sl, .row_ctx = &rctx[r],
                                    .row_table = &rtab, .tables = tables};
        ck_assert_int_eq(b1->ops->attention(b1, kv, 1, Q + r * qrow, nh, scale, &ab,
                                            ref + r * qrow), 0);
    }

    /* batches: rows in their listed order (runs tile), cut at random sizes; then shuffled;
     * then one run with the sequences interleaved row by row and a row repeated */
    int32_t *order = malloc((size_t)N_ROWS * 4);
    for (int pass = 0; pass < 6; pass++) {
        for (int32_t i = 0; i < n_rows; i++) {
            order[i] = i;
        }
        if (pass >= 2 && pass < 4) {
            for (int32_t i = n_rows - 1; i > 0; i--) {
                int32_t j = (int32_t)(rnd_u64() % (uint64_t)(i + 1)), t = order[i];
                order[i] = order[j];
                order[j] = t;
            }
        } else if (pass >= 4) { /* a run of sequence 0, interleaved with sequence 1 rows */
            int32_t n = 0;
            for (int32_t i = 0; i < n_rows && n + 1 < n_rows; i++) {
                if (rseq[i] == 0) {
                    order[n++] = i;
                    order[n++] = i; /* the same row twice, adjacent: one tile */
                }
            }
            for (int32_t i = 0; i < n_rows && n < n_rows; i++) {
                if (rseq[i] != 0) {
                    order[n++] = i;
                }
            }
        }
        kvs_backend *b = pass % 2 == 0 ? b2 : b1;
        for (int32_t r0 = 0; r0 < n_rows;) {
            int32_t n = pass >= 4 ? n_rows - r0 : (int32_t)(1 + rnd_u64() % 48);
            if (r0 + n > n_rows) {
                n = n_rows - r0;
            }
            for (int32_t i = 0; i < n; i++) {
                int32_t r = order[r0 + i];
                slot[i] = -1;
                ctx[i] = rctx[r];
                rt[i] = rseq[r] * nblk;
                memcpy(qb + i * qrow, Q + r * qrow, (size_t)qrow * 4);
            }
            struct kvs_attn_batch ab = {.n_rows = n, .row_slot = slot, .row_ctx = ctx,
                                        .row_table = rt, .tables = tables};
            ck_assert_int_eq(b->ops->attention(b, kv, 1, qb, nh, scale, &ab, ob), 0);
            for (int32_t i = 0; i < n; i++) {
                int32_t r = order[r0 + i];
                ck_assert_msg(memcmp(ob + i * qrow, ref + r * qrow, (size_t)qrow * 4) == 0,
                              "%s %s bs %d hd %d: row (seq %d, ctx %d) at %d of a batch of %d "
                              "(pass %d) differs from the row alone",
                              isa, dtype == KVS_DTYPE_F16 ? "f16" : "f32", bs, hd, rseq[r],
                              rctx[r], i, n, pass);
            }
            r0 += n;
        }
    }

    /* accuracy of the segmented rows against the double reference (one probe per edge) */
    {
        struct attn_case c = {2, n_seq * nblk, bs, nkv, hd, nh, dtype};
        double *dref = malloc((size_t)qrow * sizeof(double));
        float *Kr = malloc((size_t)kvn * 4), *Vr = malloc((size_t)kvn * 4);
        uint16_t *blk = malloc(kvs_kv_block_bytes(&lay));
        const size_t elem = dtype == KVS_DTYPE_F16 ? 2 : 4;
        /* read sequence 2's cells back from the cache (layer 1) */
        for (int32_t p = 0; p < T; p += bs) {
            ck_assert_int_eq(b1->ops->kv_read_block(b1, kv, tables[2 * nblk + p / bs], blk), 0);
            const uint8_t *base = (const uint8_t *)blk + (size_t)2 * bs * nkv * hd * elem;
            for (int32_t c2 = 0; c2 < bs && p + c2 < T; c2++) {
                for (int32_t x = 0; x < nkv * hd; x++) {
                    size_t ko = ((size_t)c2 * nkv * hd + x) * elem;
                    size_t vo = ko + (size_t)bs * nkv * hd * elem;
                    float kf, vf;
                    if (elem == 2) {
                        uint16_t h;
                        memcpy(&h, base + ko, 2);
                        kf = kvs_fp16_to_fp32(h);
                        memcpy(&h, base + vo, 2);
                        vf = kvs_fp16_to_fp32(h);
                    } else {
                        memcpy(&kf, base + ko, 4);
                        memcpy(&vf, base + vo, 4);
                    }
                    Kr[(int64_t)(p + c2) * nkv * hd + x] = kf;
                    Vr[(int64_t)(p + c2) * nkv * hd + x] = vf;
                }
            }
        }
        double vmax = 0.0;
        for (int64_t i = 0; i < kvn; i++) {
            vmax = fmax(vmax, fabs(Vr[i]));
        }
        for (int32_t r = 0; r < n_rows; r++) {
            if (rseq[r] != 2 || rctx[r] < 1000) {
                continue;
            }
            attn_ref(&c, Q + r * qrow, Kr, Vr, rctx[r], scale, dref);
            for (int32_t i = 0; i < qrow; i++) {
                double tol = 2e-6 + 64.0 * 0x1.0p-24 * sqrt((double)rctx[r]) * 4.0 +
                             (dtype == KVS_DTYPE_F16 ? 1.01 * 0x1.0p-11 * vmax : 0.0);
                ck_assert_msg(fabs(ref[r * qrow + i] - dref[i]) <= tol,
                              "%s segmented row ctx %d: %g vs %g", isa, rctx[r],
                              ref[r * qrow + i], dref[i]);
            }
        }
        free(blk);
        free(Kr);
        free(Vr);
        free(dref);
    }

    free(order);
    free(Q);
    free(ref);
    free(qb);
    free(ob);
    free(K);
    free(V);
    free(slot);
    free(ctx);
    free(rt);
    free(tables);
    b1->ops->kv_destroy(b1, &kv);
    kvs_backend_destroy(&b1);
    kvs_backend_destroy(&b2);
}
END_TEST

START_TEST(test_kv_errors)
{
    kvs_backend *b = new_backend("scalar", 1);
    struct kvs_kv_layout lay = {.n_layer = 1, .n_block = 2, .block_size = 16, .n_kv_head = 1,
                                .head_dim = 64, .dtype = KVS_DTYPE_Q4_0};
    kvs_kv_cache *kv = NULL;
    ck_assert_int_eq(b->ops->kv_new(b, &lay, &kv), KVS_UNSUPPORTED);
    lay.dtype = KVS_DTYPE_F32;
    ck_assert_int_eq(b->ops->kv_new(b, &lay, &kv), 0);
    ck_assert_int_eq(b->ops->kv_copy_block(b, kv, 0, 2), KVS_OUT_OF_RANGE);
    int32_t slot = 32, ctx = 1, rt = 0, table = 5;
    float k[64] = {0}, v[64] = {0}, q[64] = {0}, out[64];
    struct kvs_attn_batch ab = {.n_rows = 1, .row_slot = &slot, .row_ctx = &ctx,
                                .row_table = &rt, .tables = &table};
    ck_assert_int_eq(b->ops->kv_store(b, kv, 0, k, v, &ab), KVS_OUT_OF_RANGE);
    ck_assert_int_eq(b->ops->attention(b, kv, 0, q, 1, 1.0f, &ab, out), KVS_OUT_OF_RANGE);
    ck_assert_int_eq(b->ops->attention(b, kv, 1, q, 1, 1.0f, &ab, out), KVS_OUT_OF_RANGE);
    b->ops->kv_destroy(b, &kv);
    kvs_backend_destroy(&b);
}
END_TEST

static Suite *backend_cpu_suite(void)
{
    Suite *s = suite_create("backend_cpu");
    int n = n_isa_levels();
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_threads_many_small_calls);
    tcase_add_test(tc, test_threadpool_coverage);
    tcase_add_test(tc, test_weight_load_errors);
    tcase_add_test(tc, test_kv_errors);
    tcase_add_loop_test(tc, test_matmul_accuracy, 0, n);
    tcase_add_loop_test(tc, test_matmul_batch_invariance, 0, n);
    tcase_add_loop_test(tc, test_get_rows, 0, n);
    tcase_add_loop_test(tc, test_rmsnorm_swiglu_add_gather, 0, n);
    tcase_add_loop_test(tc, test_rope, 0, n);
    tcase_add_loop_test(tc, test_attention, 0, n);
    tcase_add_loop_test(tc, test_attention_long_context, 0, n);
    tcase_add_loop_test(tc, test_attention_tiles, 0, n * 2 * 3);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(backend_cpu_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
