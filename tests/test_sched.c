/* The scheduler: batching is real (forward calls carry rows of many sessions) and exact
 * (every greedy answer equals the same session run alone through the synchronous path),
 * priorities (decode and question rows before append chunks), the append chunk bound,
 * fairness between sessions, the flash-query minimum share, the FIFO mode (one request at a
 * time, the benchmarks' baseline), deadlines and admission,
 * cancellation, the step-time target, short steps while answers are in flight, and the
 * overcommit order when the real cells run out.
 * Time is driven by the test (a fake clock). Tiny 2-layer model, SmolLM2 tokenizer. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/status.h"
#include "testutil.h"
#include "worker/sched.h"

static char model[512];

static void make_model(void)
{
    const char *tmp = getenv("TMPDIR") != NULL ? getenv("TMPDIR") : "/tmp";
    snprintf(model, sizeof model, "%s/kvs-test-sched-%d.gguf", tmp, (int)getpid());
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "python3 %s/tests/tools/make_tiny_gguf.py -o %s --type q8_0 --layers 2 --n-embd 64 "
             "--n-head 4 --n-head-kv 2 --n-ff 128 --ctx 2048 --seed 5 --vocab %s",
             kvs_test_source_dir(), model, kvs_test_default_model());
    if (system(cmd) != 0) {
        fprintf(stderr, "test_sched: cannot make the model\n");
        abort();
    }
}

static kvs_engine *engine(int64_t cells, int32_t rows)
{
    struct kvs_engine_opts o = {.model_path = model, .n_threads = 2, .n_cells = cells,
                                .max_batch_rows = rows};
    kvs_engine *e;
    char err[256];
    if (kvs_engine_open(&o, &e, err, sizeof err) < 0) {
        fprintf(stderr, "%s\n", err);
        return NULL;
    }
    return e;
}

struct result {
    int status;
    bool done;
    struct kvs_answer *a;
    struct kvs_append_result r;
    int step_done;
    int calls;                       /* callbacks received */
};

static int cur_step;

static void on_append(int status, const struct kvs_append_result *r, const char *err, void *user)
{
    (void)err;
    struct result *x = user;
    x->status = status;
    x->done = true;
    x->step_done = cur_step;
    x->calls++;
    if (r != NULL) {
        x->r = *r;
    }
}

static void on_query(int status, struct kvs_answer *a, const char *err, void *user)
{
    (void)err;
    struct result *x = user;
    x->status = status;
    x->done = true;
    x->a = a;
    x->step_done = cur_step;
    x->calls++;
}

static void run(kvs_sched *sc, int max_steps)
{
    for (int i = 0; i < max_steps && kvs_sched_busy(sc); i++) {
        cur_step++;
        ck_assert_int_ge(kvs_sched_step(sc, (double)cur_step), 0);
    }
    ck_assert(!kvs_sched_busy(sc));
}

static const char *REC[] = {"AAPL 189.23 +0.42", "MSFT 411.10 -1.05 vol=800", "ERROR timeout",
                            "NVDA 875.02 +5.40", "GOOG 141.77"};

/* N sessions through the scheduler (or its FIFO mode) vs each alone through the
 * synchronous path. */
static void exactness_opts(int n_sessions, bool fifo)
{
    kvs_engine *e = engine(32768, 256), *ref = engine(4096, 64);
    ck_assert_ptr_nonnull(e);
    ck_assert_ptr_nonnull(ref);
    kvs_sessions *S, *R;
    ck_assert_int_eq(kvs_sessions_new(e, NULL, &S), 0);
    ck_assert_int_eq(kvs_sessions_new(ref, NULL, &R), 0);
    kvs_sched *sc;
    ck_assert_int_eq(kvs_sched_new(S, &(struct kvs_sched_opts){.append_chunk = 16, .fifo = fifo},
                                   &sc), 0);
    char err[256];
    kvs_session *ss[32];
    struct result ap[32][5], qr[32];
    memset(ap, 0, sizeof ap);
    memset(qr, 0, sizeof qr);
    for (int i = 0; i < n_sessions; i++) {
        char id[16], prefix[64];
        snprintf(id, sizeof id, "s%d", i);
        snprintf(prefix, sizeof prefix, "Desk %d feed:", i);
        struct kvs_session_opts o = {.budget_cells = 256, .prefix = prefix, .prefix_len = strlen(prefix)};
        ck_assert_int_eq(kvs_session_create(S, id, &o, &ss[i], err, sizeof err), 0);
        for (int k = 0; k < 1 + i % 5; k++) {
            const char *t = REC[(i + k) % 5];
            ck_assert_int_eq(kvs_sched_append(sc, ss[i], t, strlen(t), 0, 0, 0, on_append, &ap[i][k]), 0);
        }
    }
    run(sc, 1000);
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 6};
    for (int i = 0; i < n_sessions; i++) {
        ck_assert_int_eq(kvs_sched_query(sc, ss[i], "Latest?", 7, &qo, 0, NULL, on_query, &qr[i],
                                         err, sizeof err), 0);
    }
    run(sc, 1000);
    const struct kvs_sched_stats *st = kvs_sched_stats(sc);
    if (fifo) {
        ck_assert_int_eq(st->max_n_seqs, 1);
    } else if (n_sessions > 1) {
        ck_assert_int_ge(st->max_n_seqs, n_sessions < 8 ? n_sessions : 8);
    }
    printf("sched %d sessions: %llu steps, at most %d sequences in one forward\n", n_sessions,
           (unsigned long long)st->steps, st->max_n_seqs);
    /* each session alone, synchronously */
    for (int i = 0; i < n_sessions; i++) {
        char prefix[64];
        snprintf(prefix, sizeof prefix, "Desk %d feed:", i);
        kvs_session *r;
        struct kvs_session_opts o = {.budget_cells = 256, .prefix = prefix, .prefix_len = strlen(prefix)};
        ck_assert_int_eq(kvs_session_create(R, "alone", &o, &r, err, sizeof err), 0);
        for (int k = 0; k < 1 + i % 5; k++) {
            const char *t = REC[(i + k) % 5];
            struct kvs_append_result res;
            ck_assert_int_eq(kvs_session_append(r, t, strlen(t), 0, 0, &res, err, sizeof err), 0);
            ck_assert(ap[i][k].done);
            ck_assert_int_eq(ap[i][k].status, 0);
            ck_assert_uint_eq(ap[i][k].r.version, res.version);
        }
        struct kvs_answer a;
        ck_assert_int_eq(kvs_session_query(r, "Latest?", 7, &qo, NULL, NULL, &a, err, sizeof err), 0);
        ck_assert(qr[i].done);
        ck_assert_int_eq(qr[i].status, 0);
        ck_assert_int_eq(qr[i].a->n_tokens, a.n_tokens);
        ck_assert_int_eq(memcmp(qr[i].a->tokens, a.tokens, (size_t)a.n_tokens * sizeof *a.tokens), 0);
        kvs_answer_free(&a);
        kvs_answer_free(qr[i].a);
        free(qr[i].a);
        ck_assert_int_eq(kvs_session_close(R, "alone"), 0);
    }
    kvs_sched_destroy(&sc);
    kvs_sessions_destroy(&S);
    kvs_sessions_destroy(&R);
    kvs_engine_destroy(&e);
    kvs_engine_destroy(&ref);
}

static void exactness(int n_sessions)
{
    exactness_opts(n_sessions, false);
}

START_TEST(test_exact_1)
{
    exactness(1);
}
END_TEST

START_TEST(test_exact_4)
{
    exactness(4);
}
END_TEST

START_TEST(test_exact_32)
{
    exactness(32);
}
END_TEST

/* A big append cannot hold a query back: the question's rows go first, appends are chunked. */
START_TEST(test_priority_and_chunking)
{
    kvs_engine *e = engine(8192, 64);
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, NULL, &S), 0);
    kvs_sched *sc;
    ck_assert_int_eq(kvs_sched_new(S, &(struct kvs_sched_opts){.max_batch_tokens = 48,
                                                                .append_chunk = 16}, &sc), 0);
    char err[256], big[4096] = "";
    kvs_session *a, *b;
    ck_assert_int_eq(kvs_session_create(S, "a", &(struct kvs_session_opts){.budget_cells = 2048}, &a, err, sizeof err), 0);
    ck_assert_int_eq(kvs_session_create(S, "b", &(struct kvs_session_opts){.budget_cells = 512}, &b, err, sizeof err), 0);
    for (int i = 0; i < 60; i++) {
        strcat(big, "AAPL 189.23 +0.42 ");
    }
    struct result ra = {0}, rq = {0};
    ck_assert_int_eq(kvs_sched_append(sc, a, big, strlen(big), 0, 0, 0, on_append, &ra), 0);
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 4};
    ck_assert_int_eq(kvs_sched_query(sc, b, "What is the price of AAPL now?", 30, &qo, 0, NULL,
                                     on_query, &rq, err, sizeof err), 0);
    cur_step = 0;
    int first_token_step = -1;
    while (kvs_sched_busy(sc)) {
        cur_step++;
        ck_assert_int_ge(kvs_sched_step(sc, cur_step), 0);
        const struct kvs_sched_stats *st = kvs_sched_stats(sc);
        ck_assert_int_le(st->last_rows[KVS_CLASS_APPEND], 16); /* the chunk bound */
        if (cur_step == 1) {
            ck_assert_int_gt(st->last_rows[KVS_CLASS_QUESTION], 0); /* questions first */
        }
        if (first_token_step < 0 && (rq.done || st->last_rows[KVS_CLASS_DECODE] > 0)) {
            first_token_step = cur_step;
        }
        ck_assert_int_lt(cur_step, 500);
    }
    ck_assert_int_le(first_token_step, 2);
    ck_assert(ra.done && ra.status == 0);
    ck_assert(rq.done && rq.status == 0);
    ck_assert_int_lt(rq.step_done, ra.step_done); /* the query did not wait for the append */
    kvs_answer_free(rq.a);
    free(rq.a);
    kvs_sched_destroy(&sc);
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

/* A flood of appends to one session does not starve another session's append. */
START_TEST(test_fairness)
{
    kvs_engine *e = engine(8192, 64);
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, NULL, &S), 0);
    kvs_sched *sc;
    ck_assert_int_eq(kvs_sched_new(S, &(struct kvs_sched_opts){.max_batch_tokens = 16,
                                                                .append_chunk = 16}, &sc), 0);
    char err[256];
    kvs_session *a, *b;
    ck_assert_int_eq(kvs_session_create(S, "a", &(struct kvs_session_opts){.budget_cells = 1900}, &a, err, sizeof err), 0);
    ck_assert_int_eq(kvs_session_create(S, "b", &(struct kvs_session_opts){.budget_cells = 512}, &b, err, sizeof err), 0);
    static struct result flood[40];
    memset(flood, 0, sizeof flood);
    for (int i = 0; i < 40; i++) {
        ck_assert_int_eq(kvs_sched_append(sc, a, REC[1], strlen(REC[1]), 0, 0, 0, on_append, &flood[i]), 0);
    }
    struct result rb = {0};
    ck_assert_int_eq(kvs_sched_append(sc, b, REC[0], strlen(REC[0]), 0, 0, 0, on_append, &rb), 0);
    cur_step = 0;
    run(sc, 1000);
    ck_assert(rb.done && rb.status == 0);
    ck_assert_int_le(rb.step_done, 3); /* served within a couple of steps, not after the flood */
    ck_assert_int_gt(flood[39].step_done, 10);
    kvs_sched_destroy(&sc);
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

static int flash_done_step;
static void on_flash(kvs_session *s, const char *name, const struct kvs_answer *a, void *user)
{
    (void)s;
    (void)name;
    (void)a;
    (void)user;
    flash_done_step = cur_step;
}

/* Flash work gets at least its share of every step while appends saturate the budget. */
START_TEST(test_flash_share)
{
    kvs_engine *e = engine(8192, 64);
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, NULL, &S), 0);
    kvs_sched *sc;
    ck_assert_int_eq(kvs_sched_new(S, &(struct kvs_sched_opts){.max_batch_tokens = 40,
                                                                .append_chunk = 40,
                                                                .flash_min_share = 0.25f}, &sc), 0);
    char err[256];
    kvs_session *f, *bulk[4];
    ck_assert_int_eq(kvs_session_create(S, "f", &(struct kvs_session_opts){.budget_cells = 1024}, &f, err, sizeof err), 0);
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 3};
    ck_assert_int_eq(kvs_flash_register(f, "q", "A long question about the state of the feed now?", 48, &qo, NULL, err, sizeof err), 0);
    static struct result rs[64];
    memset(rs, 0, sizeof rs);
    for (int i = 0; i < 4; i++) {
        char id[16];
        snprintf(id, sizeof id, "b%d", i);
        ck_assert_int_eq(kvs_session_create(S, id, &(struct kvs_session_opts){.budget_cells = 1500}, &bulk[i], err, sizeof err), 0);
        for (int k = 0; k < 10; k++) {
            char big[512] = "";
            for (int w = 0; w < 12; w++) {
                strcat(big, "MSFT 411.10 -1.05 ");
            }
            ck_assert_int_eq(kvs_sched_append(sc, bulk[i], big, strlen(big), 0, 0, 0, on_append, &rs[i * 10 + k]), 0);
        }
    }
    struct result rf = {0};
    ck_assert_int_eq(kvs_sched_append(sc, f, "AAPL 1", 6, 0, 0, 0, on_append, &rf), 0);
    kvs_flash_watch(f, on_flash, NULL);
    flash_done_step = -1;
    cur_step = 0;
    int first_flash_rows = -1;
    while (kvs_sched_busy(sc)) {
        cur_step++;
        ck_assert_int_ge(kvs_sched_step(sc, cur_step), 0);
        const struct kvs_sched_stats *st = kvs_sched_stats(sc);
        int32_t others = st->last_rows[KVS_CLASS_APPEND];
        if (first_flash_rows < 0 && st->last_rows[KVS_CLASS_FLASH] > 0) {
            first_flash_rows = st->last_rows[KVS_CLASS_FLASH];
            ck_assert_int_gt(others, 0); /* the appends were saturating the budget meanwhile */
        }
        ck_assert_int_lt(cur_step, 2000);
    }
    /* the question is longer than 10 tokens: its first prefill step gets the whole floor
     * (ceil(0.25 * 40) = 10 rows) although the appends alone could fill the budget */
    ck_assert_int_ge(first_flash_rows, 10);
    ck_assert_int_ge(flash_done_step, 0);
    ck_assert_int_lt(flash_done_step, rs[39].step_done); /* answered while the flood ran */
    struct kvs_answer a;
    ck_assert_int_eq(kvs_flash_get(f, "q", KVS_FLASH_ALLOW_STALE, &a, err, sizeof err), 0);
    ck_assert(a.fresh);
    kvs_answer_free(&a);
    /* one struct has the flash counters: evaluations, hits and misses */
    ck_assert_int_eq(kvs_sched_step(sc, cur_step + 1), 0); /* nothing to do; refreshes stats */
    const struct kvs_sched_stats *st = kvs_sched_stats(sc);
    ck_assert_uint_ge(st->flash_evals, 1);
    ck_assert_uint_eq(st->flash_hits, 1);
    ck_assert_uint_eq(st->flash_misses, 0);
    kvs_sched_destroy(&sc);
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

/* One request per step (the benchmarks' baseline): flash work keeps its share as one step
 * in 1/flash_min_share, so a flood of appends does not starve it there either. */
START_TEST(test_flash_share_serial)
{
    kvs_engine *e = engine(8192, 64);
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, NULL, &S), 0);
    kvs_sched *sc;
    ck_assert_int_eq(kvs_sched_new(S, &(struct kvs_sched_opts){.max_batch_tokens = 40, .append_chunk = 40,
                                                                .max_jobs_per_step = 1,
                                                                .flash_min_share = 0.25f}, &sc), 0);
    char err[256];
    kvs_session *f, *bulk;
    ck_assert_int_eq(kvs_session_create(S, "f", &(struct kvs_session_opts){.budget_cells = 1024}, &f, err, sizeof err), 0);
    ck_assert_int_eq(kvs_session_create(S, "b", &(struct kvs_session_opts){.budget_cells = 1900}, &bulk, err, sizeof err), 0);
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 3};
    ck_assert_int_eq(kvs_flash_register(f, "q", "State of the feed?", 18, &qo, NULL, err, sizeof err), 0);
    struct result rf = {0};
    ck_assert_int_eq(kvs_sched_append(sc, f, "AAPL 1", 6, 0, 0, 0, on_append, &rf), 0);
    static struct result rs[40];
    memset(rs, 0, sizeof rs);
    for (int k = 0; k < 40; k++) {
        ck_assert_int_eq(kvs_sched_append(sc, bulk, REC[k % 5], strlen(REC[k % 5]), 0, 0, 0, on_append, &rs[k]), 0);
    }
    kvs_flash_watch(f, on_flash, NULL);
    flash_done_step = -1;
    cur_step = 0;
    run(sc, 2000);
    ck_assert(rf.done && rf.status == 0);
    ck_assert_int_ge(flash_done_step, 0);
    ck_assert_int_lt(flash_done_step, rs[39].step_done); /* answered while the flood ran */
    ck_assert_int_le(kvs_sched_stats(sc)->max_n_seqs, 1); /* one request per step */
    kvs_sched_destroy(&sc);
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

/* FIFO mode (the synchronous executor): arrival order, each request to its end, no
 * priorities, an append's whole record in one forward, the flash evaluation queued behind
 * what arrived before its append ended, one request's rows per forward. */
START_TEST(test_fifo)
{
    kvs_engine *e = engine(8192, 64);
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, NULL, &S), 0);
    kvs_sched *sc;
    ck_assert_int_eq(kvs_sched_new(S, &(struct kvs_sched_opts){.max_batch_tokens = 64,
                                                                .append_chunk = 8, .fifo = true,
                                                                .max_jobs_per_step = 3}, &sc), 0);
    char err[256];
    kvs_session *a, *b;
    ck_assert_int_eq(kvs_session_create(S, "a", &(struct kvs_session_opts){.budget_cells = 1024}, &a, err, sizeof err), 0);
    ck_assert_int_eq(kvs_session_create(S, "b", &(struct kvs_session_opts){.budget_cells = 1024}, &b, err, sizeof err), 0);
    struct kvs_query_opts fo = {.sampling = kvs_sampling_default(), .max_tokens = 3};
    ck_assert_int_eq(kvs_flash_register(a, "q", "State?", 6, &fo, NULL, err, sizeof err), 0);
    kvs_flash_watch(a, on_flash, NULL);
    const char *rec = "AAPL 189.23 +0.42 MSFT 411.10 -1.05 vol=800 NVDA 875.02 +5.40";
    struct result r1 = {0}, rq = {0}, r2 = {0};
    ck_assert_int_eq(kvs_sched_append(sc, a, rec, strlen(rec), 0, 0, 0, on_append, &r1), 0);
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 4};
    ck_assert_int_eq(kvs_sched_query(sc, b, "Which way did it move?", 22, &qo, 0, NULL, on_query,
                                     &rq, err, sizeof err), 0);
    ck_assert_int_eq(kvs_sched_append(sc, b, REC[0], strlen(REC[0]), 0, 0, 0, on_append, &r2), 0);
    flash_done_step = -1;
    cur_step = 0;
    int flash_first_step = -1;
    int32_t rows1 = -1;
    while (kvs_sched_busy(sc)) {
        cur_step++;
        ck_assert_int_gt(kvs_sched_step(sc, cur_step), 0); /* every step runs a forward */
        const struct kvs_sched_stats *st = kvs_sched_stats(sc);
        ck_assert_int_eq(st->last_n_seqs, 1); /* one request's rows per forward */
        if (cur_step == 1) {
            rows1 = st->last_rows[KVS_CLASS_APPEND];
            ck_assert_int_eq(st->last_rows[KVS_CLASS_QUESTION], 0); /* no priority for it */
        }
        if (flash_first_step < 0 && st->last_rows[KVS_CLASS_FLASH] > 0) {
            flash_first_step = cur_step;
        }
        ck_assert_int_lt(cur_step, 100);
    }
    /* the first append: its whole record (more than append_chunk) in the first forward */
    ck_assert(r1.done && r1.status == 0);
    ck_assert_int_eq(r1.step_done, 1);
    ck_assert_int_eq(rows1, r1.r.n_tokens);
    ck_assert_int_gt(rows1, 8);
    /* then the question to its last token, then the second append in one forward */
    ck_assert(rq.done && rq.status == 0);
    ck_assert_int_ge(rq.step_done, 2 + rq.a->n_tokens - 1);
    ck_assert(r2.done && r2.status == 0);
    ck_assert_int_eq(r2.step_done, rq.step_done + 1);
    /* the flash evaluation that the first append triggered ran last: behind both */
    ck_assert_int_eq(flash_first_step, r2.step_done + 1);
    ck_assert_int_gt(flash_done_step, r2.step_done);
    struct kvs_answer fa;
    ck_assert_int_eq(kvs_flash_get(a, "q", KVS_FLASH_ALLOW_STALE, &fa, err, sizeof err), 0);
    ck_assert(fa.fresh);
    kvs_answer_free(&fa);
    ck_assert_int_eq(kvs_sched_stats(sc)->max_n_seqs, 1);
    kvs_answer_free(rq.a);
    free(rq.a);
    kvs_sched_destroy(&sc);
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

START_TEST(test_exact_4_fifo)
{
    exactness_opts(4, true);
}
END_TEST

START_TEST(test_deadlines_and_admission)
{
    kvs_engine *e = engine(1024, 64);
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, NULL, &S), 0);
    kvs_sched *sc;
    ck_assert_int_eq(kvs_sched_new(S, NULL, &sc), 0);
    char err[256];
    kvs_session *s;
    ck_assert_int_eq(kvs_session_create(S, "s", &(struct kvs_session_opts){.budget_cells = 700}, &s, err, sizeof err), 0);
    struct result r1 = {0};
    ck_assert_int_eq(kvs_sched_append(sc, s, "late", 4, 0, 0, 5.0, on_append, &r1), 0);
    ck_assert_int_eq(kvs_sched_step(sc, 10.0), 0); /* past its deadline before it started */
    ck_assert(r1.done);
    ck_assert_int_eq(r1.status, KVS_TIMEOUT);
    ck_assert_uint_eq(kvs_sched_stats(sc)->expired, 1);
    /* a query whose reserve is not there: BUSY at once, never queued */
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 900};
    struct result rq = {0};
    ck_assert_int_eq(kvs_sched_query(sc, s, "q", 1, &qo, 0, NULL, on_query, &rq, err, sizeof err), KVS_BUSY);
    ck_assert(!rq.done);
    ck_assert(!kvs_sched_busy(sc));
    /* cancelled on shutdown */
    ck_assert_int_eq(kvs_sched_append(sc, s, "x", 1, 0, 0, 0, on_append, &r1), 0);
    kvs_sched_destroy(&sc);
    ck_assert_int_eq(r1.status, KVS_CANCELLED);
    ck_assert_int_eq(kvs_pool_n_free(e->pool), kvs_pool_n_blocks(e->pool) - (int32_t)((kvs_session_seq(s)->n_cells + 15) / 16));
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

/* 32 sessions with the same 1,000-token instructions: the prefix is computed once and its
 * blocks are shared (counted once by admission: 32 private copies would not even fit). */
START_TEST(test_prefix_sharing)
{
    kvs_engine *e = engine(8192, 256);
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, NULL, &S), 0);
    char err[256];
    char *prefix = malloc(20000);
    prefix[0] = '\0';
    int32_t n_tok = 0;
    for (int w = 0; n_tok < 1000; w++) {
        strcat(prefix, w % 3 ? " price" : " AAPL 189.23 +0.42");
        size_t n = 0;
        kvs_tokenizer_encode(e->tok, prefix, strlen(prefix), false, false, NULL, 0, &n);
        n_tok = (int32_t)n;
    }
    uint64_t rows0 = kvs_forward_stats(e->fw)->rows;
    int32_t free0 = kvs_pool_n_free(e->pool) - kvs_pool_n_cached(e->pool);
    int64_t n_prefix = 0;
    for (int i = 0; i < 32; i++) {
        char id[16];
        snprintf(id, sizeof id, "p%d", i);
        kvs_session *s;
        struct kvs_session_opts o = {.budget_cells = 1100, .prefix = prefix, .prefix_len = strlen(prefix)};
        ck_assert_msg(kvs_session_create(S, id, &o, &s, err, sizeof err) == 0, "%s: %s", id, err);
        struct kvs_session_info in;
        kvs_session_info(s, &in);
        n_prefix = in.prefix_tokens;
    }
    uint64_t rows = kvs_forward_stats(e->fw)->rows - rows0;
    int64_t cells = (int64_t)(free0 - (kvs_pool_n_free(e->pool) - kvs_pool_n_cached(e->pool))) * 16;
    printf("prefix sharing: 32 sessions x %lld-token prefix use %lld cells (unshared: %lld) and "
           "%llu forward rows (unshared: %lld)\n",
           (long long)n_prefix, (long long)cells, (long long)(32 * n_prefix),
           (unsigned long long)rows, (long long)(32 * n_prefix));
    int64_t full = n_prefix / 16 * 16;
    ck_assert_int_le(cells, full + 32 * 16);                    /* ~1x the prefix, not 32x */
    ck_assert_int_le((int64_t)rows, n_prefix + 31 * (n_prefix - full)); /* computed once */
    ck_assert_uint_ge(kvs_pool_stats(e->pool)->hit_blocks, (uint64_t)(31 * (full / 16)));
    /* every session answers like one that computed its prefix alone */
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 5};
    struct kvs_answer a, b;
    ck_assert_int_eq(kvs_session_query(kvs_session_find(S, "p31"), "Next?", 5, &qo, NULL, NULL, &a, err, sizeof err), 0);
    qo.stateless = true;
    ck_assert_int_eq(kvs_session_query(kvs_session_find(S, "p31"), "Next?", 5, &qo, NULL, NULL, &b, err, sizeof err), 0);
    ck_assert_int_eq(a.n_tokens, b.n_tokens);
    ck_assert_int_eq(memcmp(a.tokens, b.tokens, (size_t)a.n_tokens * sizeof *a.tokens), 0);
    kvs_answer_free(&a);
    kvs_answer_free(&b);
    /* closing every session leaves the prefix cached (LRU), reclaimable: the pool is whole */
    for (int i = 0; i < 32; i++) {
        char id[16];
        snprintf(id, sizeof id, "p%d", i);
        ck_assert_int_eq(kvs_session_close(S, id), 0);
    }
    ck_assert_int_eq(kvs_pool_n_free(e->pool), kvs_pool_n_blocks(e->pool));
    ck_assert_int_eq(kvs_pool_n_cached(e->pool), (int32_t)(full / 16));
    free(prefix);
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

/* At capacity without overcommit: sessions stream appends while more queries arrive than
 * the free cells can hold. Nothing hangs, every append is applied (none fails for lack of
 * KV), and every query either answers or is refused at once with BUSY. */
static int n_busy_ok, n_append_ok, n_append_bad, n_query_ok;
static void on_append_count(int status, const struct kvs_append_result *r, const char *err, void *user)
{
    (void)r;
    (void)err;
    (void)user;
    if (status == 0) {
        n_append_ok++;
    } else {
        n_append_bad++;
    }
}
static void on_query_count(int status, struct kvs_answer *a, const char *err, void *user)
{
    (void)err;
    (void)user;
    ck_assert_int_eq(status, 0);
    n_query_ok++;
    kvs_answer_free(a);
    free(a);
}

START_TEST(test_pressure_no_deadlock)
{
    kvs_engine *e = engine(1024, 64); /* 64 blocks of 16 cells */
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, NULL, &S), 0);
    kvs_sched *sc;
    ck_assert_int_eq(kvs_sched_new(S, &(struct kvs_sched_opts){.append_chunk = 16}, &sc), 0);
    char err[256];
    kvs_session *ss[4];
    for (int i = 0; i < 4; i++) {
        char id[16];
        snprintf(id, sizeof id, "p%d", i);
        struct kvs_session_opts o = {.budget_cells = 200, .policy = KVS_POLICY_SLIDE};
        ck_assert_msg(kvs_session_create(S, id, &o, &ss[i], err, sizeof err) == 0, "%s", err);
    }
    /* what is left: a few blocks, less than the queries below want together */
    ck_assert_int_lt(kvs_sessions_cells_free(S), 6 * 48);
    n_busy_ok = n_append_ok = n_append_bad = n_query_ok = 0;
    int submitted = 0, accepted_q = 0;
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 40};
    cur_step = 0;
    for (int round = 0; round < 30; round++) {
        for (int i = 0; i < 4; i++) {
            ck_assert_int_eq(kvs_sched_append(sc, ss[i], REC[(round + i) % 5], strlen(REC[(round + i) % 5]),
                                              0, 0, 0, on_append_count, NULL), 0);
            submitted++;
        }
        for (int q = 0; q < 2; q++) {
            int rc = kvs_sched_query(sc, ss[(round + q) % 4], "Status now?", 11, &qo, 0, NULL,
                                     on_query_count, NULL, err, sizeof err);
            ck_assert(rc == 0 || rc == KVS_BUSY);
            accepted_q += rc == 0;
            n_busy_ok += rc == KVS_BUSY;
        }
        cur_step++;
        ck_assert_int_ge(kvs_sched_step(sc, cur_step), 0);
    }
    run(sc, 5000); /* drains: bounded, or the test fails */
    ck_assert_int_eq(n_append_bad, 0);
    ck_assert_int_eq(n_append_ok, submitted);
    ck_assert_int_eq(n_query_ok, accepted_q);
    ck_assert_int_gt(n_busy_ok, 0); /* the pressure was real */
    ck_assert_int_gt(accepted_q, 0);
    printf("pressure: %d appends applied, %d queries answered, %d refused with BUSY\n",
           n_append_ok, n_query_ok, n_busy_ok);
    const struct kvs_sched_stats *st = kvs_sched_stats(sc);
    ck_assert_int_eq(st->cells_total, 1024);
    ck_assert_int_le(st->cells_used, st->cells_total);
    ck_assert_int_ge(st->cells_free, 0);
    ck_assert_int_le(st->cells_reserved + st->cells_free, st->cells_total);
    ck_assert_int_gt(st->cells_used, 0);
    kvs_sched_destroy(&sc);
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

/* The issue-5 invariant under sliding: SLIDE sessions whose budgets nearly fill the pool,
 * a flash query and stateful queries running on a session while its appends slide. A slide
 * copies the kept blocks a fork shares and cannot free the evicted blocks a fork holds;
 * nothing reserves those cells, so the scheduler must not slide under live forks. Every
 * append is applied, the cells in use never pass what is promised (reservations + shared
 * prefix blocks), and a query is only refused BUSY by the documented query reserve. */
static int n_slide_append_ok, n_slide_append_bad, n_slide_query_ok, n_slide_evicted;
static void on_append_slide(int status, const struct kvs_append_result *r, const char *err,
                            void *user)
{
    (void)user;
    if (status == 0) {
        n_slide_append_ok++;
        n_slide_evicted += r->evicted;
    } else {
        n_slide_append_bad++;
        fprintf(stderr, "slide append failed: %s: %s\n", kvs_status_name(status),
                err != NULL ? err : "");
    }
}
static void on_query_slide(int status, struct kvs_answer *a, const char *err, void *user)
{
    (void)user;
    ck_assert_msg(status == 0, "query: %s", err != NULL ? err : "");
    n_slide_query_ok++;
    kvs_answer_free(a);
    free(a);
}

START_TEST(test_slide_under_forks)
{
    kvs_engine *e = engine(1024, 64); /* 64 blocks of 16 cells */
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, NULL, &S), 0);
    kvs_sched *sc;
    ck_assert_int_eq(kvs_sched_new(S, &(struct kvs_sched_opts){.append_chunk = 16}, &sc), 0);
    char err[256];
    /* 20 + 20 + 16 of 64 blocks promised (budget blocks + 1 each): 8 left, two forks' worth */
    static const int64_t budgets[3] = {304, 304, 240};
    kvs_session *ss[3];
    for (int i = 0; i < 3; i++) {
        char id[16];
        snprintf(id, sizeof id, "w%d", i);
        struct kvs_session_opts o = {.budget_cells = budgets[i], .policy = KVS_POLICY_SLIDE};
        ck_assert_msg(kvs_session_create(S, id, &o, &ss[i], err, sizeof err) == 0, "%s", err);
    }
    ck_assert_int_eq(kvs_sessions_cells_free(S), 8 * 16);
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 40};
    ck_assert_msg(kvs_flash_register(ss[0], "q", "What is the state?", 18, &qo, NULL, err,
                                     sizeof err) == 0, "%s", err);
    n_slide_append_ok = n_slide_append_bad = n_slide_query_ok = n_slide_evicted = 0;
    int submitted = 0, accepted_q = 0, busy = 0;
    cur_step = 0;
    for (int round = 0; round < 160; round++) {
        for (int i = 0; i < 3; i++) {
            const char *r = REC[(round + i) % 5];
            ck_assert_int_eq(kvs_sched_append(sc, ss[i], r, strlen(r), 0, 0, 0, on_append_slide,
                                              NULL), 0);
            submitted++;
        }
        if (round % 4 == 0) {
            kvs_session *s = ss[(round / 4) % 2];
            int rc = kvs_sched_query(sc, s, "Status now?", 11, &qo, 0, NULL, on_query_slide,
                                     NULL, err, sizeof err);
            /* BUSY only from the query reserve (the accounting), never from missing blocks */
            ck_assert_msg(rc == 0 || (rc == KVS_BUSY && strstr(err, "no KV reserve") != NULL),
                          "%s: %s", kvs_status_name(rc), err);
            accepted_q += rc == 0;
            busy += rc == KVS_BUSY;
        }
        for (int k = 0; k < 3; k++) {
            cur_step++;
            ck_assert_int_ge(kvs_sched_step(sc, cur_step), 0);
            const struct kvs_sched_stats *st = kvs_sched_stats(sc);
            int64_t shared = (int64_t)kvs_pool_n_indexed_in_use(e->pool) * 16;
            ck_assert_msg(st->cells_used <= st->cells_reserved + shared,
                          "step %d: %lld cells in use, %lld promised", cur_step,
                          (long long)st->cells_used, (long long)(st->cells_reserved + shared));
        }
    }
    run(sc, 20000);
    const struct kvs_sched_stats *st = kvs_sched_stats(sc);
    printf("slide: %d appends applied (%d tokens evicted), %d queries answered, %d BUSY; "
           "%llu slides waited, %llu queries deferred, %llu flash evaluations cancelled, "
           "%llu computed\n",
           n_slide_append_ok, n_slide_evicted, n_slide_query_ok, busy,
           (unsigned long long)st->slide_waits, (unsigned long long)st->queries_deferred,
           (unsigned long long)st->slide_flash_cancelled, (unsigned long long)st->flash_evals);
    ck_assert_int_eq(n_slide_append_bad, 0);
    ck_assert_int_eq(n_slide_append_ok, submitted);
    ck_assert_int_eq(n_slide_query_ok, accepted_q);
    ck_assert_int_gt(n_slide_evicted, 0); /* the sessions did slide ... */
    ck_assert_uint_gt(st->slide_waits, 0); /* ... with forks in the way, */
    ck_assert_uint_gt(st->queries_deferred, 0); /* and queries arrived meanwhile */
    ck_assert_int_gt(accepted_q, 0);
    kvs_sched_destroy(&sc);
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

/* kvs_sched_cancel: every job of one user fails with CANCELLED (callbacks run once, before
 * it returns), a query's reserved cells and fork are released at once, an append already
 * begun is finished without its acknowledgement, other users' jobs are untouched, and a
 * callback may cancel during a step. */
static kvs_sched *cancel_sc;
static struct result cancel_victim;
static int n_cancel_from_cb;
static bool on_token_cancel(int32_t tok, const char *text, size_t len, void *user)
{
    (void)tok;
    (void)text;
    (void)len;
    (void)user;
    if (n_cancel_from_cb == 0) {
        n_cancel_from_cb = 1 + kvs_sched_cancel(cancel_sc, &cancel_victim);
    }
    return true;
}

START_TEST(test_cancel)
{
    kvs_engine *e = engine(4096, 64);
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, NULL, &S), 0);
    kvs_sched *sc;
    ck_assert_int_eq(kvs_sched_new(S, &(struct kvs_sched_opts){.append_chunk = 16}, &sc), 0);
    cancel_sc = sc;
    char err[256], big[2048] = "";
    kvs_session *s, *t;
    ck_assert_int_eq(kvs_session_create(S, "s", &(struct kvs_session_opts){.budget_cells = 512}, &s, err, sizeof err), 0);
    ck_assert_int_eq(kvs_session_create(S, "t", &(struct kvs_session_opts){.budget_cells = 1024}, &t, err, sizeof err), 0);
    for (int i = 0; i < 20; i++) {
        strcat(big, "AAPL 189.23 +0.42 ");
    }
    int64_t free0 = kvs_sessions_cells_free(S);
    int32_t pool_free0 = kvs_pool_n_free(e->pool);
    /* user A: a query, a big append (begun in the first step) and one queued behind it;
     * user B: a query of its own */
    struct result ua = {0}, qb = {0};
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 30};
    ck_assert_int_eq(kvs_sched_query(sc, s, "Status now?", 11, &qo, 0, NULL, on_query, &ua, err, sizeof err), 0);
    ck_assert_int_eq(kvs_sched_query(sc, s, "Status now?", 11, &qo, 0, NULL, on_query, &qb, err, sizeof err), 0);
    ck_assert_int_eq(kvs_sched_append(sc, t, big, strlen(big), 0, 0, 0, on_append, &ua), 0);
    ck_assert_int_eq(kvs_sched_append(sc, t, "MSFT 1", 6, 0, 0, 0, on_append, &ua), 0);
    int64_t free_queued = kvs_sessions_cells_free(S);
    ck_assert_int_lt(free_queued, free0); /* the queries hold their reserve */
    cur_step = 1;
    ck_assert_int_gt(kvs_sched_step(sc, 1.0), 0);
    ck_assert_int_eq(ua.calls, 0);
    ck_assert_int_gt(kvs_session_seq(t)->n_cells, 0); /* the big append has begun */
    /* A's three jobs: their callbacks run now, with CANCELLED */
    ck_assert_int_eq(kvs_sched_cancel(sc, &ua), 3);
    ck_assert_int_eq(ua.calls, 3);
    ck_assert_int_eq(ua.status, KVS_CANCELLED);
    ck_assert_ptr_null(ua.a);
    /* the query's reserve is back: only qb's is still held */
    ck_assert_int_eq(free0 - kvs_sessions_cells_free(S), (free0 - free_queued) / 2);
    /* nothing left to cancel for A, and NULL matches nothing */
    ck_assert_int_eq(kvs_sched_cancel(sc, &ua), 0);
    ck_assert_int_eq(kvs_sched_cancel(sc, NULL), 0);
    ck_assert_uint_eq(kvs_sched_stats(sc)->cancelled, 3);
    /* a query cancelled from another query's on_token, inside a step */
    memset(&cancel_victim, 0, sizeof cancel_victim);
    n_cancel_from_cb = 0;
    struct result qc = {0};
    ck_assert_int_eq(kvs_sched_query(sc, s, "Anything?", 9, &qo, 0, NULL, on_query, &cancel_victim, err, sizeof err), 0);
    ck_assert_int_eq(kvs_sched_query(sc, s, "Status now?", 11, &qo, 0, on_token_cancel, on_query, &qc, err, sizeof err), 0);
    run(sc, 1000);
    ck_assert_int_eq(n_cancel_from_cb, 2); /* the victim was cancelled, once */
    ck_assert(cancel_victim.done);
    ck_assert_int_eq(cancel_victim.status, KVS_CANCELLED);
    ck_assert(qb.done && qb.status == 0 && qc.done && qc.status == 0);
    ck_assert_int_eq(ua.calls, 3); /* never called again */
    ck_assert_int_eq(cancel_victim.calls, 1);
    /* the begun append was applied (its log says so), the queued one was not */
    struct kvs_session_info in;
    kvs_session_info(t, &in);
    ck_assert_uint_eq(in.appends, 1);
    ck_assert_int_eq(kvs_session_seq(t)->n_cells, in.cells_used);
    /* every reserve is back; the pool holds only the sessions' cells */
    ck_assert_int_eq(kvs_sessions_cells_free(S), free0);
    ck_assert_int_eq(kvs_session_seq(s)->n_cells, 0);
    ck_assert_int_eq(pool_free0 - kvs_pool_n_free(e->pool), (int32_t)((in.cells_used + 15) / 16));
    kvs_answer_free(qb.a);
    free(qb.a);
    kvs_answer_free(qc.a);
    free(qc.a);
    kvs_sched_destroy(&sc);
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

/* A fake step clock: each forward call costs fake_overhead_s, each row fake_row_s (read
 * from the forward's counters, so a step's measured time is exactly its modelled cost). */
static double fake_t, fake_overhead_s, fake_row_s;
static uint64_t fake_calls, fake_rows;
static double fake_clock(void *user)
{
    const struct kvs_forward_stats *fs = kvs_forward_stats(((kvs_engine *)user)->fw);
    fake_t += fake_overhead_s * (double)(fs->calls - fake_calls) +
              fake_row_s * (double)(fs->rows - fake_rows);
    fake_calls = fs->calls;
    fake_rows = fs->rows;
    return fake_t;
}

/* Start the fake clock at 0 for e's forward: 2 ms a call, 0.5 ms a row. */
static void fake_clock_start(kvs_engine *e)
{
    fake_t = 0;
    fake_calls = kvs_forward_stats(e->fw)->calls;
    fake_rows = kvs_forward_stats(e->fw)->rows;
    fake_overhead_s = 0.002;
    fake_row_s = 0.0005;
}

/* Rows a 20 ms step allows at the fake cost. */
static int32_t allowed_rows(void)
{
    return (int32_t)((0.020 - fake_overhead_s) / fake_row_s + 1e-9);
}

/* The step budget follows a target step time: cold steps are short, the calibrated budget
 * never plans more rows than the target allows, it shrinks after one slow step when the
 * machine gets slower and grows back when it gets faster. */
START_TEST(test_step_time_target)
{
    kvs_engine *e = engine(16384, 256);
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, NULL, &S), 0);
    fake_clock_start(e);
    kvs_sched *sc;
    struct kvs_sched_opts so = {.max_batch_tokens = 256, .target_step_ms = 20,
                                .append_chunk = 64, .clock = fake_clock, .clock_user = e};
    ck_assert_int_eq(kvs_sched_new(S, &so, &sc), 0);
    const struct kvs_sched_stats *st = kvs_sched_stats(sc);
    ck_assert_double_eq_tol(st->target_step_s, 0.020, 1e-12);
    char err[256], big[4096] = "";
    for (int w = 0; w < 40; w++) {
        strcat(big, "NVDA 875.02 +5.40 ");
    }
    kvs_session *ss[8];
    for (int i = 0; i < 8; i++) {
        char id[16];
        snprintf(id, sizeof id, "t%d", i);
        ck_assert_int_eq(kvs_session_create(S, id, &(struct kvs_session_opts){.budget_cells = 1800}, &ss[i], err, sizeof err), 0);
        for (int k = 0; k < 4; k++) {
            ck_assert_int_eq(kvs_sched_append(sc, ss[i], big, strlen(big), 0, 0, 0, on_append_count, NULL), 0);
        }
    }
    n_append_ok = n_append_bad = 0;
    int phase_b = 60, phase_c = 120, over_target = 0;
    int32_t best_a = 0, best_c = 0;
    for (cur_step = 1; cur_step <= 180 && kvs_sched_busy(sc); cur_step++) {
        if (cur_step == phase_b) {
            fake_row_s = 0.001; /* the machine got twice as slow per row */
        } else if (cur_step == phase_c) {
            fake_row_s = 0.0005; /* and fast again */
        }
        ck_assert_int_gt(kvs_sched_step(sc, cur_step), 0);
        int32_t rows = 0;
        for (int c = 0; c < KVS_N_CLASSES; c++) {
            rows += st->last_rows[c];
        }
        ck_assert_int_le(rows, st->step_rows);
        ck_assert_double_eq_tol(st->last_step_s, fake_overhead_s + fake_row_s * rows, 1e-9);
        if (!st->calibrated) {
            ck_assert_int_le(rows, KVS_SCHED_COLD_ROWS); /* short steps while it learns */
            ck_assert_int_lt(cur_step, 8);
            continue;
        }
        if (rows > allowed_rows()) {
            /* only the first step after the slowdown may pass the target */
            ck_assert_int_eq(cur_step, phase_b);
            over_target++;
        } else {
            ck_assert_double_le(st->last_step_s, 0.020 + 1e-9);
        }
        if (cur_step < phase_b && rows > best_a) {
            best_a = rows;
        }
        if (cur_step >= phase_b + 1 && cur_step < phase_c) {
            ck_assert_int_le(st->step_rows, allowed_rows());
        }
        if (cur_step >= phase_c && rows > best_c) {
            best_c = rows;
        }
    }
    printf("step time: target 20 ms, budget %d rows at 2 ms + 0.5 ms/row (the target allows %d), "
           "estimated %.4f ms/row\n", st->step_rows, allowed_rows(), st->est_row_s * 1e3);
    ck_assert_int_eq(over_target, 1);
    ck_assert_int_ge(best_a, 32); /* it uses the target, not just the cold budget */
    ck_assert_int_ge(best_c, 32); /* and grows back */
    ck_assert(st->calibrated);
    ck_assert_double_le(st->max_step_s, 0.002 + 0.001 * 37);
    /* no target: every step may carry max_batch_tokens rows */
    kvs_sched *flat;
    so.target_step_ms = -1;
    ck_assert_int_eq(kvs_sched_new(S, &so, &flat), 0);
    ck_assert_int_eq(kvs_sched_stats(flat)->step_rows, 256);
    kvs_sched_destroy(&flat);
    kvs_sched_destroy(&sc);
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

/* One query on a session while 4 others' big appends saturate the budget (fake clock: 2 ms a
 * step + 0.5 ms a row, target 40 ms, rule 5's answer_step_ms as given). Returns the fake
 * seconds from the query's submission to its answer; *worst_s gets the longest step while it
 * was in flight, *min_append the fewest append rows in such a step. */
static double answer_under_appends(double answer_ms, double *worst_s, int32_t *min_append)
{
    kvs_engine *e = engine(16384, 256);
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, NULL, &S), 0);
    fake_clock_start(e);
    kvs_sched *sc;
    struct kvs_sched_opts so = {.max_batch_tokens = 256, .target_step_ms = 40,
                                .answer_step_ms = answer_ms, .append_chunk = 64,
                                .clock = fake_clock, .clock_user = e};
    ck_assert_int_eq(kvs_sched_new(S, &so, &sc), 0);
    const struct kvs_sched_stats *st = kvs_sched_stats(sc);
    char err[256], big[4096] = "";
    for (int w = 0; w < 20; w++) {
        strcat(big, "NVDA 875.02 +5.40 ");
    }
    kvs_session *ss[4], *q;
    for (int i = 0; i < 4; i++) {
        char id[16];
        snprintf(id, sizeof id, "t%d", i);
        ck_assert_int_eq(kvs_session_create(S, id, &(struct kvs_session_opts){.budget_cells = 1800}, &ss[i], err, sizeof err), 0);
        for (int k = 0; k < 6; k++) {
            ck_assert_int_eq(kvs_sched_append(sc, ss[i], big, strlen(big), 0, 0, 0, on_append_count, NULL), 0);
        }
    }
    ck_assert_int_eq(kvs_session_create(S, "q", &(struct kvs_session_opts){.budget_cells = 512}, &q, err, sizeof err), 0);
    n_append_ok = n_append_bad = 0;
    for (cur_step = 1; cur_step <= 8; cur_step++) { /* calibrate on appends alone */
        ck_assert_int_gt(kvs_sched_step(sc, cur_step), 0);
    }
    ck_assert(st->calibrated);
    ck_assert_double_gt(st->last_step_s, 0.030); /* full steps: no answer in flight */
    struct result rq = {0};
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 6};
    ck_assert_int_eq(kvs_sched_query(sc, q, "What is the price of NVDA now?", 30, &qo, 0, NULL,
                                     on_query, &rq, err, sizeof err), 0);
    double elapsed = 0;
    *worst_s = 0;
    *min_append = INT32_MAX;
    for (; kvs_sched_busy(sc); cur_step++) {
        bool answering = !rq.done;
        ck_assert_int_gt(kvs_sched_step(sc, cur_step), 0);
        if (answering) {
            elapsed += st->last_step_s;
            *worst_s = st->last_step_s > *worst_s ? st->last_step_s : *worst_s;
            int32_t ar = st->last_rows[KVS_CLASS_APPEND];
            *min_append = ar < *min_append ? ar : *min_append;
        }
        ck_assert_int_lt(cur_step, 500);
    }
    ck_assert(rq.done && rq.status == 0);
    ck_assert_int_eq(n_append_ok, 24);
    ck_assert_int_eq(n_append_bad, 0);
    kvs_answer_free(rq.a);
    free(rq.a);
    kvs_sched_destroy(&sc);
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
    return elapsed;
}

/* Rule 5: while an answer is in flight, steps stop taking append rows at answer_step_ms
 * (appends still get at least KVS_SCHED_MIN_ROWS a step), so the answer comes in a fraction
 * of the time it takes behind full steps. */
START_TEST(test_answer_steps)
{
    double worst_on, worst_off;
    int32_t min_on, min_off;
    double on = answer_under_appends(10, &worst_on, &min_on);
    double off = answer_under_appends(-1, &worst_off, &min_off);
    printf("answer behind saturating appends: %.1f ms with 10 ms answer steps (longest %.1f ms, "
           ">= %d append rows), %.1f ms with full steps (longest %.1f ms)\n",
           on * 1e3, worst_on * 1e3, min_on, off * 1e3, worst_off * 1e3);
    /* the cost model's rows for 10 ms at 2 ms + 0.5 ms/row, its time per row a little above
     * 0.5 ms: 19 rows, 11.5 ms */
    ck_assert_double_le(worst_on, 0.002 + 0.0005 * 19 + 1e-9);
    ck_assert_int_ge(min_on, KVS_SCHED_MIN_ROWS); /* appends keep moving */
    ck_assert_double_gt(worst_off, 0.030);
    ck_assert_double_lt(on, off / 2);
}
END_TEST

/* Text of a record whose framed tokens need exactly `blocks` new blocks in seq. */
static void record_needing(kvs_engine *e, const kvs_seq *seq, int32_t blocks, char *out, size_t cap)
{
    out[0] = '\0';
    for (;;) {
        strcat(out, " tick");
        ck_assert_uint_lt(strlen(out) + 8, cap);
        char framed[8192];
        snprintf(framed, sizeof framed, "%s\n", out);
        size_t n = 0;
        kvs_tokenizer_encode(e->tok, framed, strlen(framed), false, false, NULL, 0, &n);
        int32_t need = kvs_pool_seq_blocks_needed(e->pool, seq, (int32_t)n);
        if (need == blocks) {
            return;
        }
        ck_assert_int_lt(need, blocks);
    }
}

/* Flash evaluations queued or running: FLASH (prefill) or DECODE (no user query runs). */
static int flash_jobs(const struct kvs_sched_stats *st)
{
    return st->queued[KVS_CLASS_FLASH] + st->queued[KVS_CLASS_DECODE];
}

/* Overcommit 2x until the real cells run out: the documented order, stage by stage. */
START_TEST(test_overcommit_order)
{
    kvs_engine *e = engine(1024, 64); /* 64 blocks of 16 cells */
    kvs_sessions *S;
    ck_assert_int_eq(kvs_sessions_new(e, NULL, &S), 0);
    kvs_sched *sc;
    ck_assert_int_eq(kvs_sched_new(S, &(struct kvs_sched_opts){.overcommit = 0.5f}, &sc), KVS_INVALID_ARGUMENT);
    ck_assert_int_eq(kvs_sched_new(S, &(struct kvs_sched_opts){.append_chunk = 64, .target_step_ms = -1,
                                                                .overcommit = 2.0f}, &sc), 0);
    char err[256];
    /* 2 cached prefix blocks: a closed session's indexed prefix */
    kvs_session *old;
    const char *pre = "Instructions: report every tick of the feed, price and change, in order. "
                      "Keep the symbols as they are; never round a price; say UNKNOWN when unsure.";
    ck_assert_int_eq(kvs_session_create(S, "old", &(struct kvs_session_opts){.budget_cells = 64, .prefix = pre, .prefix_len = strlen(pre)}, &old, err, sizeof err), 0);
    ck_assert_int_ge(kvs_session_seq(old)->n_cells, 32);
    ck_assert_int_eq(kvs_session_close(S, "old"), 0);
    ck_assert_int_eq(kvs_pool_n_cached(e->pool), 2);
    /* three budgets of 600 cells (117 blocks with their copy-on-write blocks) on 64 blocks:
     * admitted only because of the 2x overcommit; a fourth of 900 is refused */
    kvs_session *a, *b, *c, *d;
    struct kvs_session_opts so = {.budget_cells = 600};
    ck_assert_int_eq(kvs_session_create(S, "a", &so, &a, err, sizeof err), 0);
    ck_assert_int_eq(kvs_session_create(S, "b", &so, &b, err, sizeof err), 0);
    ck_assert_int_eq(kvs_session_create(S, "c", &so, &c, err, sizeof err), 0);
    ck_assert_int_gt(3 * 600, kvs_pool_capacity_cells(e->pool));
    ck_assert_int_eq(kvs_session_create(S, "d", &(struct kvs_session_opts){.budget_cells = 900}, &d, err, sizeof err), KVS_CAPACITY);
    struct kvs_query_opts fq = {.sampling = kvs_sampling_default(), .max_tokens = 60};
    ck_assert_int_eq(kvs_flash_register(a, "q", "What moved most?", 16, &fq, NULL, err, sizeof err), 0);
    ck_assert_int_eq(kvs_flash_register(b, "q", "What moved most?", 16, &fq, NULL, err, sizeof err), 0);
    /* fill: ~300 tokens into a, then b (b's flash evaluation is the younger) */
    char text[8192];
    struct result ra = {0}, rb = {0};
    record_needing(e, kvs_session_seq(a), 19, text, sizeof text);
    ck_assert_int_eq(kvs_sched_append(sc, a, text, strlen(text), 0, 0, 0, on_append, &ra), 0);
    ck_assert_int_eq(kvs_sched_append(sc, b, text, strlen(text), 0, 0, 0, on_append, &rb), 0);
    cur_step = 0;
    while (!(ra.done && rb.done)) {
        cur_step++;
        ck_assert_int_ge(kvs_sched_step(sc, cur_step), 0);
        ck_assert_int_lt(cur_step, 50);
    }
    ck_assert_int_eq(ra.status, 0);
    ck_assert_int_eq(rb.status, 0);
    const struct kvs_sched_stats *st = kvs_sched_stats(sc);
    ck_assert_int_eq(flash_jobs(st), 2); /* both evaluations queued, holding their cells */
    ck_assert_uint_eq(st->reclaimed_cells, 0);
    ck_assert_int_eq(st->prefix_cached_cells, 32);
    ck_assert_uint_eq(st->admission_refused, 1);
    int32_t truly_free = kvs_pool_n_free(e->pool) - kvs_pool_n_cached(e->pool);
    ck_assert_int_gt(truly_free, 0);
    /* stage 1: an append that needs one block more than is truly free: a cached prefix
     * block is reclaimed, no flash evaluation is touched */
    struct result r1 = {0};
    record_needing(e, kvs_session_seq(c), truly_free + 1, text, sizeof text);
    ck_assert_int_eq(kvs_sched_append(sc, c, text, strlen(text), 0, 0, 0, on_append, &r1), 0);
    cur_step++;
    ck_assert_int_gt(kvs_sched_step(sc, cur_step), 0);
    ck_assert_uint_eq(st->reclaimed_cells, 16);
    ck_assert_int_eq(st->prefix_cached_cells, 16);
    ck_assert_uint_eq(st->flash_cancelled, 0);
    ck_assert_int_eq(flash_jobs(st), 2);
    ck_assert(!st->pressure);
    /* stage 2: an append to a needing 3 blocks with only the last cached one free:
     * reclaiming cannot make room, so the younger flash evaluation (b's) is cancelled and
     * a's keeps running (the pool then takes the freed blocks before the cached one) */
    ck_assert_int_eq(kvs_pool_n_free(e->pool), 1);
    struct result r2 = {0};
    record_needing(e, kvs_session_seq(a), 3, text, sizeof text);
    ck_assert_int_eq(kvs_sched_append(sc, a, text, strlen(text), 0, 0, 0, on_append, &r2), 0);
    cur_step++;
    ck_assert_int_gt(kvs_sched_step(sc, cur_step), 0);
    ck_assert_uint_eq(st->flash_cancelled, 1);
    ck_assert_int_eq(flash_jobs(st), 1);
    struct kvs_answer fa;
    ck_assert_int_eq(kvs_flash_get(b, "q", KVS_FLASH_ALLOW_STALE, &fa, err, sizeof err), 0);
    ck_assert(!fa.fresh); /* b's evaluation was the one cancelled */
    kvs_answer_free(&fa);
    ck_assert(!st->pressure);
    /* stages 3 and 4: an append to b that needs more than everything left: a's evaluation is
     * cancelled too, then the append waits (not begun), new queries get BUSY */
    struct kvs_session_info bi0, bi1;
    kvs_session_info(b, &bi0);
    struct result r3 = {0};
    int32_t left = kvs_pool_n_free(e->pool);
    record_needing(e, kvs_session_seq(b), left + 10, text, sizeof text);
    double deadline = cur_step + 5.5;
    ck_assert_int_eq(kvs_sched_append(sc, b, text, strlen(text), 0, 0, deadline, on_append, &r3), 0);
    cur_step++;
    ck_assert_int_ge(kvs_sched_step(sc, cur_step), 0);
    ck_assert_uint_eq(st->flash_cancelled, 2);
    ck_assert_int_eq(flash_jobs(st), 0);
    ck_assert(st->pressure);
    ck_assert_uint_eq(st->append_waits, 1);
    ck_assert(!r3.done);
    struct result rq = {0};
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 4};
    ck_assert_int_eq(kvs_sched_query(sc, c, "Up?", 3, &qo, 0, NULL, on_query, &rq, err, sizeof err), KVS_BUSY);
    ck_assert_ptr_nonnull(strstr(err, "appends are waiting"));
    ck_assert_uint_eq(st->refused_busy, 1);
    /* the append waits until its deadline, then fails with CAPACITY; nothing was applied */
    while (kvs_sched_busy(sc)) {
        cur_step++;
        ck_assert_int_ge(kvs_sched_step(sc, cur_step), 0);
        if (cur_step <= deadline) {
            ck_assert(!r3.done);
        }
        ck_assert_int_lt(cur_step, 200);
    }
    ck_assert(r3.done);
    ck_assert_int_eq(r3.status, KVS_CAPACITY);
    ck_assert_int_eq(r3.step_done, (int)deadline + 1);
    ck_assert_uint_eq(st->append_capacity, 1);
    ck_assert(r1.done && r1.status == 0 && r2.done && r2.status == 0);
    kvs_session_info(b, &bi1);
    ck_assert_uint_eq(bi1.version, bi0.version);
    ck_assert_int_eq(bi1.cells_used, bi0.cells_used);
    ck_assert(!st->pressure);
    /* an append without a deadline does not wait: CAPACITY in its first step */
    struct result r4 = {0};
    ck_assert_int_eq(kvs_sched_append(sc, b, text, strlen(text), 0, 0, 0, on_append, &r4), 0);
    cur_step++;
    ck_assert_int_ge(kvs_sched_step(sc, cur_step), 0);
    ck_assert(r4.done);
    ck_assert_int_eq(r4.status, KVS_CAPACITY);
    /* cells come back (a session closes): queries and flash evaluations run again */
    ck_assert_int_eq(kvs_session_close(S, "c"), 0);
    ck_assert_int_eq(kvs_sched_query(sc, a, "Up?", 3, &qo, 0, NULL, on_query, &rq, err, sizeof err), 0);
    struct result r5 = {0};
    ck_assert_int_eq(kvs_sched_append(sc, b, "AAPL 1", 6, 0, 0, 0, on_append, &r5), 0);
    run(sc, 500);
    ck_assert(rq.done && rq.status == 0 && r5.done && r5.status == 0);
    ck_assert_int_eq(kvs_flash_get(b, "q", KVS_FLASH_ALLOW_STALE, &fa, err, sizeof err), 0);
    ck_assert(fa.fresh);
    kvs_answer_free(&fa);
    kvs_answer_free(rq.a);
    free(rq.a);
    kvs_sched_destroy(&sc);
    kvs_sessions_destroy(&S);
    kvs_engine_destroy(&e);
}
END_TEST

int main(void)
{
    make_model();
    Suite *su = suite_create("sched");
    TCase *tc = tcase_create("sched");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_exact_1);
    tcase_add_test(tc, test_exact_4);
    tcase_add_test(tc, test_exact_32);
    tcase_add_test(tc, test_priority_and_chunking);
    tcase_add_test(tc, test_fairness);
    tcase_add_test(tc, test_flash_share);
    tcase_add_test(tc, test_flash_share_serial);
    tcase_add_test(tc, test_fifo);
    tcase_add_test(tc, test_exact_4_fifo);
    tcase_add_test(tc, test_deadlines_and_admission);
    tcase_add_test(tc, test_prefix_sharing);
    tcase_add_test(tc, test_pressure_no_deadlock);
    tcase_add_test(tc, test_slide_under_forks);
    tcase_add_test(tc, test_cancel);
    tcase_add_test(tc, test_step_time_target);
    tcase_add_test(tc, test_answer_steps);
    tcase_add_test(tc, test_overcommit_order);
    suite_add_tcase(su, tc);
    SRunner *sr = srunner_create(su);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    unlink(model);
    return failed == 0 ? 0 : 1;
}
