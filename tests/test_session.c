/* Sessions: the equivalence every later feature rests on (a stateful query gives exactly
 * the stateless answer, and queries leave the session's KV untouched), flash-query
 * semantics, context policies, capacity and bad input. Runs on a tiny 2-layer model with the
 * SmolLM2 tokenizer, written by tests/tools/make_tiny_gguf.py. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/status.h"
#include "kernels/dtype.h"
#include "testutil.h"
#include "worker/session.h"

static char tiny_path[512];

/* The tiny model, made once per run (deterministic: fixed seed). */
static const char *tiny_model(void)
{
    if (tiny_path[0] != '\0' && access(tiny_path, R_OK) == 0) {
        return tiny_path;
    }
    const char *tmp = getenv("TMPDIR") != NULL ? getenv("TMPDIR") : "/tmp";
    snprintf(tiny_path, sizeof tiny_path, "%s/kvs-test-session-%d.gguf", tmp, (int)getpid());
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "python3 %s/tests/tools/make_tiny_gguf.py -o %s.tmp --type q8_0 --layers 2 "
             "--n-embd 64 --n-head 4 --n-head-kv 2 --n-ff 128 --ctx 2048 --seed 3 --vocab %s "
             "&& mv %s.tmp %s",
             kvs_test_source_dir(), tiny_path, kvs_test_default_model(), tiny_path, tiny_path);
    if (system(cmd) != 0) {
        fprintf(stderr, "test_session: cannot make the tiny model: %s\n", cmd);
        abort();
    }
    return tiny_path;
}

static kvs_engine *open_engine(int64_t cells)
{
    struct kvs_engine_opts o = {.model_path = tiny_model(), .n_threads = 2, .n_cells = cells,
                                .max_batch_rows = 64};
    kvs_engine *e = NULL;
    char err[256];
    ck_assert_msg(kvs_engine_open(&o, &e, err, sizeof err) == 0, "%s", err);
    return e;
}

static uint64_t rs = 1;
static uint32_t rnd(uint32_t n)
{
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return (uint32_t)(rs % n);
}

static const char *WORDS[] = {"AAPL", "189.23", "+0.42", "vol=1200", "MSFT", "buy", "sell",
                              "the", "price", "rose", "fell", "ERROR", "timeout", "ok",
                              "latency_ms=12", "order", "book", "é", "東京", "🙂", "\t", "42"};

static void random_text(char *buf, size_t cap)
{
    size_t n = 0;
    int words = 1 + (int)rnd(12);
    for (int i = 0; i < words; i++) {
        const char *w = WORDS[rnd(sizeof WORDS / sizeof WORDS[0])];
        n += (size_t)snprintf(buf + n, cap - n, "%s%s", i ? " " : "", w);
    }
}

static void assert_same_answer(const struct kvs_answer *a, const struct kvs_answer *b,
                               const char *what)
{
    ck_assert_msg(a->n_tokens == b->n_tokens, "%s: %d vs %d tokens", what, a->n_tokens,
                  b->n_tokens);
    ck_assert_msg(memcmp(a->tokens, b->tokens, (size_t)a->n_tokens * sizeof *a->tokens) == 0,
                  "%s: answers differ", what);
    ck_assert_uint_eq(a->len, b->len);
    ck_assert_int_eq(memcmp(a->text, b->text, a->len), 0);
}

/* The KV cells of two seqs are bitwise equal over their first n cells. */
static void assert_same_kv(kvs_engine *e, const kvs_seq *a, const kvs_seq *b)
{
    ck_assert_int_eq(a->n_cells, b->n_cells);
    const struct kvs_kv_layout *l = kvs_pool_layout(e->pool);
    size_t bytes = kvs_kv_block_bytes(l);
    size_t cell = (size_t)l->n_kv_head * (size_t)l->head_dim * (l->dtype == KVS_DTYPE_F32 ? 4 : 2);
    uint8_t *x = malloc(bytes), *y = malloc(bytes);
    int32_t bs = l->block_size;
    for (int32_t i = 0; i * bs < a->n_cells; i++) {
        ck_assert_int_eq(e->backend->ops->kv_read_block(e->backend, kvs_pool_kv(e->pool),
                                                        a->table[i], x), 0);
        ck_assert_int_eq(e->backend->ops->kv_read_block(e->backend, kvs_pool_kv(e->pool),
                                                        b->table[i], y), 0);
        int32_t used = a->n_cells - i * bs < bs ? a->n_cells - i * bs : bs;
        for (int32_t part = 0; part < 2 * l->n_layer; part++) { /* K and V of every layer */
            size_t off = (size_t)part * (size_t)bs * cell;
            ck_assert_msg(memcmp(x + off, y + off, (size_t)used * cell) == 0,
                          "KV differs in block %d (part %d)", i, part);
        }
    }
    free(x);
    free(y);
}

/* Property: for random sequences of appends, queries and flash evaluations, every greedy
 * stateful answer equals the stateless one, and flash answers equal fresh queries. */
START_TEST(test_equivalence_property)
{
    kvs_engine *e = open_engine(2048);
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, &(struct kvs_sessions_opts){0}, &S), 0);
    char err[256], text[512];
    for (int seed = 1; seed <= 12; seed++) {
        rs = (uint64_t)seed * 7919;
        char id[32];
        snprintf(id, sizeof id, "s%d", seed);
        struct kvs_session_opts so = {.budget_cells = 900, .format = KVS_FORMAT_RAW};
        random_text(text, sizeof text);
        so.prefix = seed % 2 ? text : NULL;
        so.prefix_len = seed % 2 ? strlen(text) : 0;
        kvs_session *s;
        ck_assert_msg(kvs_session_create(S, id, &so, &s, err, sizeof err) == 0, "%s", err);
        struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 6};
        struct kvs_answer fa;
        ck_assert_int_eq(kvs_flash_register(s, "f", " Last price:", 12, &qo, NULL, err,
                                            sizeof err), 0);
        for (int step = 0; step < 14; step++) {
            int op = (int)rnd(4);
            if (op <= 1) {
                random_text(text, sizeof text);
                struct kvs_append_result r;
                ck_assert_msg(kvs_session_append(s, text, strlen(text), 0, 0, &r, err,
                                                 sizeof err) == 0, "%s", err);
            } else if (op == 2) {
                random_text(text, sizeof text);
                struct kvs_answer a, b;
                qo.stateless = false;
                ck_assert_msg(kvs_session_query(s, text, strlen(text), &qo, NULL, NULL, &a, err,
                                                sizeof err) == 0, "%s", err);
                qo.stateless = true;
                ck_assert_msg(kvs_session_query(s, text, strlen(text), &qo, NULL, NULL, &b, err,
                                                sizeof err) == 0, "%s", err);
                qo.stateless = false;
                assert_same_answer(&a, &b, "stateful vs stateless");
                kvs_answer_free(&a);
                kvs_answer_free(&b);
            } else {
                struct kvs_answer b;
                ck_assert_int_eq(kvs_flash_get(s, "f", KVS_FLASH_FRESH, &fa, err, sizeof err), 0);
                ck_assert(fa.fresh);
                qo.stateless = true;
                ck_assert_int_eq(kvs_session_query(s, " Last price:", 12, &qo, NULL, NULL, &b,
                                                   err, sizeof err), 0);
                qo.stateless = false;
                assert_same_answer(&fa, &b, "flash vs stateless");
                kvs_answer_free(&fa);
                kvs_answer_free(&b);
            }
        }
        ck_assert_int_eq(kvs_session_close(S, id), 0);
    }
    /* every block came back */
    ck_assert_int_eq(kvs_pool_n_free(e->pool), kvs_pool_n_blocks(e->pool));
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

/* Queries leave the session as it was: its next append's logits are those of a session
 * that only ever received the appends (checked through a greedy answer after more data). */
START_TEST(test_queries_do_not_change_the_session)
{
    kvs_engine *e = open_engine(2048);
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, &(struct kvs_sessions_opts){0}, &S), 0);
    char err[256];
    kvs_session *a, *b;
    struct kvs_session_opts so = {.budget_cells = 600};
    ck_assert_int_eq(kvs_session_create(S, "a", &so, &a, err, sizeof err), 0);
    ck_assert_int_eq(kvs_session_create(S, "b", &so, &b, err, sizeof err), 0);
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 9};
    const char *recs[] = {"AAPL 189.23", "MSFT 411.10 -1.05", "AAPL 189.31 +0.08", "GOOG 141.8"};
    for (int i = 0; i < 4; i++) {
        struct kvs_append_result r;
        struct kvs_answer q;
        ck_assert_int_eq(kvs_session_append(a, recs[i], strlen(recs[i]), 0, 0, &r, err,
                                            sizeof err), 0);
        ck_assert_int_eq(kvs_session_append(b, recs[i], strlen(recs[i]), 0, 0, &r, err,
                                            sizeof err), 0);
        /* a is asked questions in between; b never */
        ck_assert_int_eq(kvs_session_query(a, "What moved?", 11, &qo, NULL, NULL, &q, err,
                                           sizeof err), 0);
        kvs_answer_free(&q);
    }
    assert_same_kv(e, kvs_session_seq(a), kvs_session_seq(b));
    int64_t na, nb;
    const int32_t *ta = kvs_session_tokens(a, &na), *tb = kvs_session_tokens(b, &nb);
    ck_assert_int_eq(na, nb);
    ck_assert_int_eq(memcmp(ta, tb, (size_t)na * sizeof *ta), 0);
    struct kvs_session_info ia, ib;
    kvs_session_info(a, &ia);
    kvs_session_info(b, &ib);
    ck_assert_int_eq(ia.cells_used, ib.cells_used);
    ck_assert_uint_eq(ia.version, ib.version);
    struct kvs_answer x, y;
    ck_assert_int_eq(kvs_session_query(a, "Summary:", 8, &qo, NULL, NULL, &x, err, sizeof err), 0);
    ck_assert_int_eq(kvs_session_query(b, "Summary:", 8, &qo, NULL, NULL, &y, err, sizeof err), 0);
    assert_same_answer(&x, &y, "after queries");
    kvs_answer_free(&x);
    kvs_answer_free(&y);
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

static int watched;
static void on_flash(kvs_session *s, const char *name, const struct kvs_answer *a, void *user)
{
    (void)s;
    (void)user;
    ck_assert_str_eq(name, "f");
    ck_assert(a->fresh);
    watched++;
}

START_TEST(test_flash_semantics)
{
    kvs_engine *e = open_engine(2048);
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, &(struct kvs_sessions_opts){0}, &S), 0);
    char err[256];
    kvs_session *s;
    ck_assert_int_eq(kvs_session_create(S, "s", &(struct kvs_session_opts){0}, &s, err,
                                        sizeof err), 0);
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 4};
    kvs_flash_watch(s, on_flash, NULL);
    watched = 0;
    /* every 8 new tokens */
    struct kvs_flash_trigger t = {.every_tokens = 8};
    ck_assert_int_eq(kvs_flash_register(s, "f", "Price?", 6, &qo, &t, err, sizeof err), 0);
    ck_assert_int_eq(watched, 1); /* evaluated at registration */
    ck_assert_int_eq(kvs_flash_register(s, "f", "Again?", 6, &qo, &t, err, sizeof err),
                     KVS_ALREADY_EXISTS);
    struct kvs_append_result r;
    ck_assert_int_eq(kvs_session_append(s, "ok", 2, 0, 0, &r, err, sizeof err), 0); /* 2 tokens */
    ck_assert_int_eq(watched, 1);
    struct kvs_answer a;
    ck_assert_int_eq(kvs_flash_get(s, "f", KVS_FLASH_ALLOW_STALE, &a, err, sizeof err), 0);
    ck_assert(!a.fresh);
    ck_assert_uint_eq(a.version, r.version - 1);
    kvs_answer_free(&a);
    const char *big = "AAPL 189.23 +0.42 vol=1200 MSFT 411.10";
    ck_assert_int_eq(kvs_session_append(s, big, strlen(big), 0, 0, &r, err, sizeof err), 0);
    ck_assert_int_eq(watched, 2); /* >= 8 new tokens: re-evaluated in idle time */
    ck_assert_int_eq(kvs_flash_get(s, "f", KVS_FLASH_FRESH, &a, err, sizeof err), 0);
    ck_assert(a.fresh);
    ck_assert_uint_eq(a.version, r.version);
    kvs_answer_free(&a);
    struct kvs_flash_stats st;
    kvs_flash_stats(s, &st);
    ck_assert_uint_eq(st.hits, 1);
    ck_assert_uint_eq(st.misses, 1);
    ck_assert_uint_eq(st.evaluations, 2);
    ck_assert_int_eq(kvs_flash_get(s, "nope", KVS_FLASH_FRESH, &a, err, sizeof err),
                     KVS_NOT_FOUND);
    ck_assert_int_eq(kvs_flash_unregister(s, "f"), 0);
    ck_assert_int_eq(kvs_flash_unregister(s, "f"), KVS_NOT_FOUND);
    ck_assert_int_eq(kvs_flash_register(s, "bad name", "q", 1, &qo, NULL, err, sizeof err),
                     KVS_INVALID_ARGUMENT);
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

START_TEST(test_bad_input_and_capacity)
{
    kvs_engine *e = open_engine(1024);
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, &(struct kvs_sessions_opts){0}, &S), 0);
    char err[256];
    kvs_session *s, *t;
    struct kvs_session_opts so = {.budget_cells = 64};
    ck_assert_int_eq(kvs_session_create(S, "s", &so, &s, err, sizeof err), 0);
    ck_assert_int_eq(kvs_session_create(S, "s", &so, &t, err, sizeof err), KVS_ALREADY_EXISTS);
    ck_assert_int_eq(kvs_session_create(S, "../etc", &so, &t, err, sizeof err),
                     KVS_INVALID_ARGUMENT);
    ck_assert_int_eq(kvs_session_create(S, "", &so, &t, err, sizeof err), KVS_INVALID_ARGUMENT);
    /* a budget larger than what is free */
    struct kvs_session_opts huge = {.budget_cells = 1000};
    ck_assert_int_eq(kvs_session_create(S, "h", &huge, &t, err, sizeof err), KVS_CAPACITY);
    ck_assert_ptr_null(kvs_session_find(S, "h"));
    struct kvs_append_result r;
    ck_assert_int_eq(kvs_session_append(s, "", 0, 0, 0, &r, err, sizeof err),
                     KVS_INVALID_ARGUMENT);
    /* fill the 64-cell budget, then REJECT */
    int64_t before = 0;
    int rc = 0;
    for (int i = 0; i < 100 && rc == 0; i++) {
        struct kvs_session_info in;
        kvs_session_info(s, &in);
        before = in.cells_used;
        rc = kvs_session_append(s, "AAPL 189.23 +0.42", 17, 0, 0, &r, err, sizeof err);
    }
    ck_assert_int_eq(rc, KVS_CONTEXT_FULL);
    struct kvs_session_info in;
    kvs_session_info(s, &in);
    ck_assert_int_eq(in.cells_used, before); /* nothing appended */
    /* an append larger than the budget on its own */
    int32_t many[100];
    for (int i = 0; i < 100; i++) {
        many[i] = 100 + i;
    }
    ck_assert_int_eq(kvs_session_append_tokens(s, many, 100, 0, 0, &r, err, sizeof err),
                     KVS_TOO_LARGE);
    int32_t bad = 1 << 30;
    ck_assert_int_eq(kvs_session_append_tokens(s, &bad, 1, 0, 0, &r, err, sizeof err),
                     KVS_INVALID_ARGUMENT);
    /* queries: empty, bad options */
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 4};
    struct kvs_answer a;
    ck_assert_int_eq(kvs_session_query(s, "", 0, &qo, NULL, NULL, &a, err, sizeof err),
                     KVS_INVALID_ARGUMENT);
    qo.sampling.temperature = -1;
    ck_assert_int_eq(kvs_session_query(s, "q", 1, &qo, NULL, NULL, &a, err, sizeof err),
                     KVS_INVALID_ARGUMENT);
    ck_assert_int_eq(kvs_session_close(S, "nope"), KVS_NOT_FOUND);
    ck_assert_int_eq(kvs_session_close(S, "s"), 0);
    ck_assert_int_eq(kvs_pool_n_free(e->pool), kvs_pool_n_blocks(e->pool));
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

START_TEST(test_idempotent_appends)
{
    kvs_engine *e = open_engine(1024);
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, &(struct kvs_sessions_opts){0}, &S), 0);
    char err[256];
    kvs_session *s;
    ck_assert_int_eq(kvs_session_create(S, "s", &(struct kvs_session_opts){.budget_cells = 256},
                                        &s, err, sizeof err), 0);
    struct kvs_append_result r1, r2, r3;
    ck_assert_int_eq(kvs_session_append(s, "a b", 3, 77, 5, &r1, err, sizeof err), 0);
    ck_assert_int_eq(kvs_session_append(s, "a b", 3, 77, 5, &r2, err, sizeof err), 0);
    ck_assert(r2.duplicate);
    ck_assert_uint_eq(r2.version, r1.version);
    ck_assert_int_eq(r2.cells, r1.cells);
    ck_assert_int_eq(kvs_session_append(s, "c", 1, 77, 7, &r3, err, sizeof err),
                     KVS_OUT_OF_ORDER);
    ck_assert_int_eq(kvs_session_append(s, "c", 1, 77, 6, &r3, err, sizeof err), 0);
    ck_assert(!r3.duplicate);
    struct kvs_session_info in;
    kvs_session_info(s, &in);
    ck_assert_uint_eq(in.appends, 2);
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

/* SLIDE: appends past the budget evict the oldest data in whole blocks after the prefix;
 * the prefix stays, the version moves, queries keep working, and greedy answers match a
 * fresh session built from the kept tokens in >= 80% of cases (the RoPE shift of cached keys
 * is exact in real arithmetic; the f16 cache rounds it). */
START_TEST(test_slide)
{
    kvs_engine *e = open_engine(2048);
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, &(struct kvs_sessions_opts){0}, &S), 0);
    char err[256], text[512];
    int same = 0, cases = 0;
    double kl_sum = 0, kl_max = 0;
    for (int seed = 1; seed <= 10; seed++) {
        rs = (uint64_t)seed * 104729;
        kvs_session *s, *f;
        struct kvs_session_opts so = {.budget_cells = 128, .policy = KVS_POLICY_SLIDE,
                                      .prefix = "Market feed:", .prefix_len = 12};
        ck_assert_msg(kvs_session_create(S, "slide", &so, &s, err, sizeof err) == 0, "%s", err);
        int64_t evicted = 0;
        uint64_t last_version = 0;
        for (int i = 0; i < 40; i++) {
            random_text(text, sizeof text);
            struct kvs_append_result r;
            ck_assert_msg(kvs_session_append(s, text, strlen(text), 0, 0, &r, err, sizeof err) == 0,
                          "%s", err);
            ck_assert_uint_gt(r.version, last_version);
            last_version = r.version;
            ck_assert_int_le(r.cells, 128);
            evicted += r.evicted;
            ck_assert_int_eq(r.evicted % 16, 0);
        }
        struct kvs_session_info in;
        kvs_session_info(s, &in);
        ck_assert_int_gt(evicted, 0);
        ck_assert_int_eq(in.evicted_tokens, evicted);
        ck_assert_int_eq(in.cells_used, in.prefix_tokens + in.data_tokens);
        /* a fresh session holding exactly the kept tokens */
        int64_t n;
        const int32_t *kept = kvs_session_tokens(s, &n);
        struct kvs_session_opts fo = {.budget_cells = 256, .prefix = so.prefix,
                                      .prefix_len = so.prefix_len};
        ck_assert_int_eq(kvs_session_create(S, "fresh", &fo, &f, err, sizeof err), 0);
        int64_t np = in.prefix_tokens, nf;
        const int32_t *fp = kvs_session_tokens(f, &nf);
        ck_assert_int_eq(nf, np);
        ck_assert_int_eq(memcmp(fp, kept, (size_t)np * sizeof *kept), 0);
        struct kvs_append_result r;
        ck_assert_int_eq(kvs_session_append_tokens(f, kept + np, (int32_t)(in.cells_used - np), 0,
                                                   0, &r, err, sizeof err), 0);
        /* next-token distributions after the question, slid vs fresh: KL(fresh || slid) */
        {
            int32_t q[16];
            size_t nq = 0;
            ck_assert_int_eq(kvs_tokenizer_encode(e->tok, "Last:", 5, false, false, q, 16, &nq), 0);
            int32_t nv = (int32_t)e->model->hp.n_vocab;
            float *la = malloc((size_t)nv * sizeof *la), *lb = malloc((size_t)nv * sizeof *lb);
            kvs_seq *fa = kvs_pool_seq_fork(e->pool, kvs_session_seq(s));
            kvs_seq *fb = kvs_pool_seq_fork(e->pool, kvs_session_seq(f));
            ck_assert_int_eq(kvs_engine_prefill(e, fa, q, (int32_t)nq, NULL, la), 0);
            ck_assert_int_eq(kvs_engine_prefill(e, fb, q, (int32_t)nq, NULL, lb), 0);
            double ma = la[0], mb = lb[0], za = 0, zb = 0, kl = 0;
            for (int32_t v = 0; v < nv; v++) {
                ma = la[v] > ma ? la[v] : ma;
                mb = lb[v] > mb ? lb[v] : mb;
            }
            for (int32_t v = 0; v < nv; v++) {
                za += exp(la[v] - ma);
                zb += exp(lb[v] - mb);
            }
            for (int32_t v = 0; v < nv; v++) {
                double pb = exp(lb[v] - mb) / zb;
                double lpa = la[v] - ma - log(za), lpb = lb[v] - mb - log(zb);
                kl += pb * (lpb - lpa);
            }
            kl_sum += kl;
            kl_max = kl > kl_max ? kl : kl_max;
            kvs_pool_seq_release(e->pool, &fa);
            kvs_pool_seq_release(e->pool, &fb);
            free(la);
            free(lb);
        }
        struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 8};
        struct kvs_answer a, b;
        ck_assert_int_eq(kvs_session_query(s, "Last:", 5, &qo, NULL, NULL, &a, err, sizeof err), 0);
        ck_assert_int_eq(kvs_session_query(f, "Last:", 5, &qo, NULL, NULL, &b, err, sizeof err), 0);
        cases++;
        same += a.n_tokens == b.n_tokens &&
                memcmp(a.tokens, b.tokens, (size_t)a.n_tokens * sizeof *a.tokens) == 0;
        kvs_answer_free(&a);
        kvs_answer_free(&b);
        ck_assert_int_eq(kvs_session_close(S, "slide"), 0);
        ck_assert_int_eq(kvs_session_close(S, "fresh"), 0);
    }
    printf("slide: greedy answers equal to a fresh session on the kept tokens in %d/%d cases; "
           "next-token KL(fresh || slid) mean %.2e, max %.2e\n",
           same, cases, kl_sum / cases, kl_max);
    ck_assert_int_ge(same * 10, cases * 8);
    ck_assert_int_eq(kvs_pool_n_free(e->pool), kvs_pool_n_blocks(e->pool));
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

/* SLIDE at a full pool, synchronous path: budgets fill the pool, a flash query is evaluated
 * after every append and queries run between appends. Forks live only inside a query call
 * here, so a slide never meets one: every append is applied and the cells in use never pass
 * what is promised (the scheduler's side of this is test_sched's test_slide_under_forks). */
START_TEST(test_slide_full_pool)
{
    kvs_engine *e = open_engine(1024); /* 64 blocks of 16 cells */
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, &(struct kvs_sessions_opts){0}, &S), 0);
    char err[256], text[512];
    static const int64_t budgets[3] = {304, 304, 240}; /* 20 + 20 + 16 blocks promised */
    kvs_session *ss[3];
    for (int i = 0; i < 3; i++) {
        char id[16];
        snprintf(id, sizeof id, "w%d", i);
        struct kvs_session_opts so = {.budget_cells = budgets[i], .policy = KVS_POLICY_SLIDE};
        ck_assert_msg(kvs_session_create(S, id, &so, &ss[i], err, sizeof err) == 0, "%s", err);
    }
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 40};
    ck_assert_msg(kvs_flash_register(ss[0], "q", "What is the state?", 18, &qo, NULL, err,
                                     sizeof err) == 0, "%s", err);
    rs = 7;
    int64_t evicted = 0;
    for (int round = 0; round < 60; round++) {
        for (int i = 0; i < 3; i++) {
            random_text(text, sizeof text);
            struct kvs_append_result r;
            ck_assert_msg(kvs_session_append(ss[i], text, strlen(text), 0, 0, &r, err,
                                             sizeof err) == 0, "round %d: %s", round, err);
            evicted += r.evicted;
            int64_t used = (int64_t)(kvs_pool_n_blocks(e->pool) - kvs_pool_n_free(e->pool)) * 16;
            ck_assert_int_le(used + kvs_sessions_cells_free(S), 1024);
        }
        struct kvs_answer a;
        ck_assert_msg(kvs_session_query(ss[round % 3], "Status now?", 11, &qo, NULL, NULL, &a,
                                        err, sizeof err) == 0, "%s", err);
        kvs_answer_free(&a);
    }
    ck_assert_int_gt(evicted, 0);
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

int main(void)
{
    tiny_model(); /* made once, in the parent, before the forked tests */
    Suite *su = suite_create("session");
    TCase *tc = tcase_create("session");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_equivalence_property);
    tcase_add_test(tc, test_queries_do_not_change_the_session);
    tcase_add_test(tc, test_flash_semantics);
    tcase_add_test(tc, test_bad_input_and_capacity);
    tcase_add_test(tc, test_idempotent_appends);
    tcase_add_test(tc, test_slide);
    tcase_add_test(tc, test_slide_full_pool);
    suite_add_tcase(su, tc);
    SRunner *sr = srunner_create(su);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    if (tiny_path[0] != '\0') {
        unlink(tiny_path);
    }
    return failed == 0 ? 0 : 1;
}
