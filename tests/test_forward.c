/* Batch invariance of the forward pass (DESIGN.md, Exactness): the same token at the same
 * position with the same context gives bitwise-identical logits computed alone, token by
 * token, in random chunks, across forks (with copy-on-write), mixed into batches with other
 * seqs, and with 1 or 2 threads. Run on the HF-parity llama model (F32 weights, f32 KV),
 * on the real default model (Q4_1 weights, f16 KV) and on the qwen2 model (biases). */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/status.h"
#include "rig.h"
#include "testutil.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(uint32_t n)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state % n);
}

static const char *model_path(int which)
{
    static char p[1024];
    switch (which) {
    case 0: snprintf(p, sizeof p, "%s/tests/data/parity/llama.gguf", kvs_test_source_dir()); break;
    case 1: snprintf(p, sizeof p, "%s/tests/data/parity/qwen2.gguf", kvs_test_source_dir()); break;
    default: snprintf(p, sizeof p, "%s", kvs_test_default_model()); break;
    }
    return p;
}

static uint32_t kv_type(int which)
{
    return which == 2 ? KVS_DTYPE_F16 : KVS_DTYPE_F32;
}

#define N_TOK 40

static void make_tokens(int32_t *t, int32_t n, int32_t n_vocab, uint64_t seed)
{
    rng_state = seed * 0x2545F4914F6CDD1Dull + 1;
    for (int32_t i = 0; i < n; i++) {
        t[i] = (int32_t)rnd((uint32_t)n_vocab);
    }
}

static void assert_same(const float *a, const float *b, int32_t n_pos, int32_t n_vocab,
                        const char *what)
{
    for (int32_t i = 0; i < n_pos; i++) {
        ck_assert_msg(memcmp(a + (size_t)i * n_vocab, b + (size_t)i * n_vocab,
                             (size_t)n_vocab * sizeof(float)) == 0,
                      "%s: logits differ at position %d", what, i);
    }
}

/* Reference: all tokens in one call. */
static float *solo(struct rig *r, const int32_t *t, int32_t n)
{
    float *out = malloc((size_t)n * r->n_vocab * sizeof *out);
    kvs_seq *s = kvs_pool_seq_new(r->pool);
    ck_assert_int_eq(rig_feed(r, s, t, n, n, out), 0);
    kvs_pool_seq_release(r->pool, &s);
    return out;
}

START_TEST(test_chunking)
{
    int which = _i;
    struct rig r;
    ck_assert_int_eq(rig_open(&r, model_path(which), 2, kv_type(which), 64, 64), 0);
    int32_t t[N_TOK];
    make_tokens(t, N_TOK, r.n_vocab, 1);
    float *ref = solo(&r, t, N_TOK);
    float *out = malloc((size_t)N_TOK * r.n_vocab * sizeof *out);
    /* token by token */
    kvs_seq *s = kvs_pool_seq_new(r.pool);
    ck_assert_int_eq(rig_feed(&r, s, t, N_TOK, 1, out), 0);
    assert_same(ref, out, N_TOK, r.n_vocab, "token by token");
    kvs_pool_seq_release(r.pool, &s);
    /* random chunk sizes */
    for (int rep = 0; rep < 3; rep++) {
        s = kvs_pool_seq_new(r.pool);
        int32_t i = 0;
        while (i < N_TOK) {
            int32_t c = 1 + (int32_t)rnd(17);
            if (c > N_TOK - i) {
                c = N_TOK - i;
            }
            ck_assert_int_eq(rig_feed(&r, s, t + i, c, c, out + (size_t)i * r.n_vocab), 0);
            i += c;
        }
        assert_same(ref, out, N_TOK, r.n_vocab, "random chunks");
        kvs_pool_seq_release(r.pool, &s);
    }
    ck_assert_int_eq(kvs_pool_n_free(r.pool), kvs_pool_n_blocks(r.pool));
    free(ref);
    free(out);
    rig_close(&r);
}
END_TEST

START_TEST(test_fork)
{
    int which = _i;
    struct rig r;
    ck_assert_int_eq(rig_open(&r, model_path(which), 2, kv_type(which), 64, 64), 0);
    int32_t t[N_TOK], other[N_TOK];
    make_tokens(t, N_TOK, r.n_vocab, 2);
    make_tokens(other, N_TOK, r.n_vocab, 3);
    float *ref = solo(&r, t, N_TOK);
    float *out = malloc((size_t)N_TOK * r.n_vocab * sizeof *out);
    /* a prefix that ends inside a block (21 = 16 + 5), so the fork shares a partial tail */
    const int32_t P = 21;
    kvs_seq *a = kvs_pool_seq_new(r.pool);
    ck_assert_int_eq(rig_feed(&r, a, t, P, P, NULL), 0);
    kvs_seq *b = kvs_pool_seq_fork(r.pool, a);
    ck_assert_ptr_nonnull(b);
    ck_assert_int_eq(kvs_pool_refcount(r.pool, a->table[1]), 2);
    /* the parent diverges first: it must copy the shared tail, leaving b's cells intact */
    ck_assert_int_eq(rig_feed(&r, a, other, 10, 3, NULL), 0);
    ck_assert_int_ne(a->table[1], b->table[1]);
    ck_assert_int_eq(kvs_pool_refcount(r.pool, b->table[1]), 1);
    ck_assert_int_eq(a->table[0], b->table[0]); /* the full block stays shared */
    ck_assert_int_eq(rig_feed(&r, b, t + P, N_TOK - P, 4, out + (size_t)P * r.n_vocab), 0);
    assert_same(ref + (size_t)P * r.n_vocab, out + (size_t)P * r.n_vocab, N_TOK - P, r.n_vocab,
                "fork after parent diverged");
    /* a fork of a fork, fed in one chunk */
    kvs_seq *c = kvs_pool_seq_fork(r.pool, b);
    kvs_pool_seq_release(r.pool, &b);
    kvs_pool_seq_release(r.pool, &c);
    kvs_seq *d = kvs_pool_seq_fork(r.pool, a);
    kvs_pool_seq_release(r.pool, &a);
    kvs_pool_seq_release(r.pool, &d);
    ck_assert_int_eq(kvs_pool_n_free(r.pool), kvs_pool_n_blocks(r.pool));
    free(ref);
    free(out);
    rig_close(&r);
}
END_TEST

#define N_SEQ 8

START_TEST(test_mixed_batches)
{
    int which = _i;
    struct rig r;
    ck_assert_int_eq(rig_open(&r, model_path(which), 2, kv_type(which), 128, 128), 0);
    int32_t t[N_SEQ][N_TOK];
    float *ref[N_SEQ], *out[N_SEQ];
    for (int k = 0; k < N_SEQ; k++) {
        make_tokens(t[k], N_TOK, r.n_vocab, 10 + (uint64_t)k);
        ref[k] = solo(&r, t[k], N_TOK);
        out[k] = malloc((size_t)N_TOK * r.n_vocab * sizeof(float));
    }
    kvs_seq *s[N_SEQ];
    int32_t done[N_SEQ] = {0};
    for (int k = 0; k < N_SEQ; k++) {
        s[k] = kvs_pool_seq_new(r.pool);
    }
    float *logits = malloc((size_t)128 * r.n_vocab * sizeof *logits);
    int32_t owner[128], opos[128];
    int remaining = N_SEQ;
    rng_state = 77;
    while (remaining > 0) {
        /* each step: every unfinished seq contributes a random chunk; rows interleaved */
        kvs_batch_clear(&r.batch);
        int32_t take[N_SEQ];
        for (int k = 0; k < N_SEQ; k++) {
            int32_t c = (int32_t)rnd(9);
            if (c > N_TOK - done[k]) {
                c = N_TOK - done[k];
            }
            take[k] = c;
            ck_assert_int_eq(kvs_pool_seq_reserve(r.pool, s[k], c), 0);
        }
        int32_t n_log = 0;
        for (int32_t j = 0; j < 9; j++) {
            for (int k = 0; k < N_SEQ; k++) {
                if (j < take[k]) {
                    int32_t p = done[k] + j;
                    kvs_batch_add(&r.batch, s[k], t[k][p], p, true);
                    owner[n_log] = k;
                    opos[n_log++] = p;
                }
            }
        }
        ck_assert_int_eq(kvs_forward_run(r.fw, &r.batch, logits), 0);
        for (int32_t i = 0; i < n_log; i++) {
            memcpy(out[owner[i]] + (size_t)opos[i] * r.n_vocab, logits + (size_t)i * r.n_vocab,
                   (size_t)r.n_vocab * sizeof(float));
        }
        for (int k = 0; k < N_SEQ; k++) {
            kvs_pool_seq_commit(r.pool, s[k], take[k]);
            if (take[k] > 0 && done[k] + take[k] == N_TOK) {
                remaining--;
            }
            done[k] += take[k];
        }
    }
    ck_assert_int_ge(kvs_forward_stats(r.fw)->max_n_seqs, 4);
    for (int k = 0; k < N_SEQ; k++) {
        assert_same(ref[k], out[k], N_TOK, r.n_vocab, "mixed batch");
        kvs_pool_seq_release(r.pool, &s[k]);
        free(ref[k]);
        free(out[k]);
    }
    free(logits);
    rig_close(&r);
}
END_TEST

START_TEST(test_threads)
{
    int which = _i;
    struct rig r1, r2;
    ck_assert_int_eq(rig_open(&r1, model_path(which), 1, kv_type(which), 64, 64), 0);
    ck_assert_int_eq(rig_open(&r2, model_path(which), 2, kv_type(which), 64, 64), 0);
    int32_t t[N_TOK];
    make_tokens(t, N_TOK, r1.n_vocab, 5);
    float *a = solo(&r1, t, N_TOK);
    float *b = solo(&r2, t, N_TOK);
    assert_same(a, b, N_TOK, r1.n_vocab, "1 vs 2 threads");
    free(a);
    free(b);
    rig_close(&r1);
    rig_close(&r2);
}
END_TEST

START_TEST(test_bad_rows)
{
    struct rig r;
    ck_assert_int_eq(rig_open(&r, model_path(0), 1, KVS_DTYPE_F32, 4, 8), 0);
    kvs_seq *s = kvs_pool_seq_new(r.pool);
    float *lg = malloc((size_t)8 * r.n_vocab * sizeof *lg);
    /* a position with no reserved cell */
    kvs_batch_clear(&r.batch);
    kvs_batch_add(&r.batch, s, 1, 0, true);
    ck_assert_int_eq(kvs_forward_run(r.fw, &r.batch, lg), KVS_INVALID_ARGUMENT);
    ck_assert_int_eq(kvs_pool_seq_reserve(r.pool, s, 1), 0);
    /* a token outside the vocabulary */
    kvs_batch_clear(&r.batch);
    kvs_batch_add(&r.batch, s, r.n_vocab, 0, true);
    ck_assert_int_eq(kvs_forward_run(r.fw, &r.batch, lg), KVS_INVALID_ARGUMENT);
    /* the pool is full: 4 blocks of 16 cells */
    ck_assert_int_eq(kvs_pool_seq_reserve(r.pool, s, 64), 0);
    ck_assert_int_eq(kvs_pool_seq_reserve(r.pool, s, 65), KVS_CAPACITY);
    kvs_pool_seq_release(r.pool, &s);
    free(lg);
    rig_close(&r);
}
END_TEST

int main(void)
{
    Suite *su = suite_create("forward");
    TCase *tc = tcase_create("invariance");
    tcase_set_timeout(tc, 600);
    /* KVS_TEST_QUICK (the sanitizer run): the two small parity models only; the 30-layer
     * default model is covered by the release run of the same tests. */
    int n_models = getenv("KVS_TEST_QUICK") != NULL ? 2 : 3;
    tcase_add_loop_test(tc, test_chunking, 0, n_models);
    tcase_add_loop_test(tc, test_fork, 0, n_models);
    tcase_add_loop_test(tc, test_mixed_batches, 0, n_models);
    tcase_add_loop_test(tc, test_threads, 0, n_models);
    tcase_add_test(tc, test_bad_rows);
    suite_add_tcase(su, tc);
    SRunner *sr = srunner_create(su);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
