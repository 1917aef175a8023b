/* Durable sessions: restore by replaying the log, from a snapshot plus the log tail, past a
 * corrupt snapshot, after a torn log tail, refusal of another model's files, and SIGKILL at
 * random points of the append path under fsync "always": every acknowledged append is
 * back, in order, plus at most the unacknowledged in-flight one, and its retry (same client
 * id and sequence number) is not applied twice. Tiny 2-layer model with the SmolLM2
 * tokenizer (tests/tools/make_tiny_gguf.py). */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/status.h"
#include "testutil.h"
#include "worker/session.h"

static char model_a[512], model_b[512];

static void make_model(char *path, size_t cap, int seed)
{
    const char *tmp = getenv("TMPDIR") != NULL ? getenv("TMPDIR") : "/tmp";
    snprintf(path, cap, "%s/kvs-test-durable-%d-%d.gguf", tmp, (int)getpid(), seed);
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "python3 %s/tests/tools/make_tiny_gguf.py -o %s --type q8_0 --layers 2 --n-embd 64 "
             "--n-head 4 --n-head-kv 2 --n-ff 128 --ctx 2048 --seed %d --vocab %s",
             kvs_test_source_dir(), path, seed, kvs_test_default_model());
    if (system(cmd) != 0) {
        fprintf(stderr, "test_session_durable: cannot make %s\n", path);
        abort();
    }
}

static char dir[512];

static void fresh_dir(void)
{
    const char *tmp = getenv("TMPDIR") != NULL ? getenv("TMPDIR") : "/tmp";
    snprintf(dir, sizeof dir, "%s/kvs-durable-XXXXXX", tmp);
    ck_assert_ptr_nonnull(mkdtemp(dir));
}

static void rm_dir(void)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    ck_assert_int_eq(system(cmd), 0);
}

struct node {
    kvs_engine *e;
    kvs_sessions *S;
};

static int node_open_at(struct node *n, const char *model, const char *data_dir)
{
    struct kvs_engine_opts o = {.model_path = model, .n_threads = 1, .n_cells = 2048,
                                .max_batch_rows = 64};
    char err[256];
    if (kvs_engine_open(&o, &n->e, err, sizeof err) < 0) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    struct kvs_sessions_opts so = {.data_dir = data_dir, .fsync = KVS_FSYNC_ALWAYS};
    return kvs_sessions_new(n->e, &so, &n->S);
}

static int node_open(struct node *n, const char *model)
{
    return node_open_at(n, model, dir);
}

static void node_close(struct node *n)
{
    kvs_sessions_destroy(&n->S);
    kvs_engine_destroy(&n->e);
}

static const char *RECS[] = {"AAPL 189.23 +0.42", "MSFT 411.10 -1.05", "GOOG 141.77 +0.12",
                             "NVDA 875.02 +5.40", "AAPL 189.31 +0.08", "ERROR timeout id=7f3c",
                             "AMZN 178.20 -0.30", "AAPL 188.95 -0.15"};
#define N_RECS 8

static void answer(kvs_session *s, const char *q, struct kvs_answer *a)
{
    char err[256];
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 8};
    ck_assert_msg(kvs_session_query(s, q, strlen(q), &qo, NULL, NULL, a, err, sizeof err) == 0,
                  "%s", err);
}

static void same_state(kvs_session *a, kvs_session *b)
{
    struct kvs_session_info x, y;
    kvs_session_info(a, &x);
    kvs_session_info(b, &y);
    ck_assert_uint_eq(x.version, y.version);
    ck_assert_uint_eq(x.appends, y.appends);
    ck_assert_int_eq(x.cells_used, y.cells_used);
    ck_assert_int_eq(x.prefix_tokens, y.prefix_tokens);
    ck_assert_int_eq(x.flash_queries, y.flash_queries);
    int64_t na, nb;
    const int32_t *ta = kvs_session_tokens(a, &na), *tb = kvs_session_tokens(b, &nb);
    ck_assert_int_eq(na, nb);
    ck_assert_int_eq(memcmp(ta, tb, (size_t)na * sizeof *ta), 0);
    struct kvs_answer p, q;
    answer(a, "Which moved most?", &p);
    answer(b, "Which moved most?", &q);
    ck_assert_int_eq(p.n_tokens, q.n_tokens);
    ck_assert_int_eq(memcmp(p.tokens, q.tokens, (size_t)p.n_tokens * sizeof *p.tokens), 0);
    kvs_answer_free(&p);
    kvs_answer_free(&q);
}

/* Build sessions r (reject) and w (slide, small budget) with a flash query. */
static void populate(struct node *n)
{
    char err[256];
    kvs_session *r, *w;
    struct kvs_session_opts ro = {.budget_cells = 512, .prefix = "Ticks:", .prefix_len = 6};
    struct kvs_session_opts wo = {.budget_cells = 64, .policy = KVS_POLICY_SLIDE,
                                  .prefix = "Feed:", .prefix_len = 5};
    ck_assert_msg(kvs_session_create(n->S, "r", &ro, &r, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(kvs_session_create(n->S, "w", &wo, &w, err, sizeof err) == 0, "%s", err);
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 4};
    ck_assert_int_eq(kvs_flash_register(r, "last", "Last price?", 11, &qo, NULL, err, sizeof err), 0);
    for (int k = 0; k < 3; k++) {
        for (int i = 0; i < N_RECS; i++) {
            struct kvs_append_result res;
            ck_assert_int_eq(kvs_session_append(r, RECS[i], strlen(RECS[i]), 9, (uint64_t)(k * N_RECS + i + 1),
                                                &res, err, sizeof err), 0);
            ck_assert_int_eq(kvs_session_append(w, RECS[i], strlen(RECS[i]), 0, 0, &res, err,
                                                sizeof err), 0);
        }
    }
    struct kvs_session_info in;
    kvs_session_info(w, &in);
    ck_assert_int_gt(in.evicted_tokens, 0);
}

static void check_restored(struct node *ref, struct node *got)
{
    ck_assert_int_eq(kvs_sessions_count(got->S), 2);
    same_state(kvs_session_find(ref->S, "r"), kvs_session_find(got->S, "r"));
    same_state(kvs_session_find(ref->S, "w"), kvs_session_find(got->S, "w"));
    kvs_session *r = kvs_session_find(got->S, "r");
    ck_assert_int_eq(kvs_flash_count(r), 1);
    ck_assert_str_eq(kvs_flash_name(r, 0), "last");
    /* the client table came back: a retry of the last append is answered, not applied */
    struct kvs_append_result res;
    char err[256];
    ck_assert_int_eq(kvs_session_append(r, RECS[N_RECS - 1], strlen(RECS[N_RECS - 1]), 9,
                                        3 * N_RECS, &res, err, sizeof err), 0);
    ck_assert(res.duplicate);
}

START_TEST(test_replay_log)
{
    fresh_dir();
    struct node a, b, m;
    ck_assert_int_eq(node_open(&a, model_a), 0);
    populate(&a);
    node_close(&a); /* the worker stops; its logs stay */
    ck_assert_int_eq(node_open_at(&m, model_a, NULL), 0); /* the same history, in memory */
    populate(&m);
    ck_assert_int_eq(node_open(&b, model_a), 0);
    char err[512];
    ck_assert_msg(kvs_sessions_restore(b.S, err, sizeof err) == 2, "%s", err);
    check_restored(&m, &b);
    node_close(&m);
    node_close(&b);
    rm_dir();
}
END_TEST

START_TEST(test_snapshot_and_tail)
{
    for (int compact = 0; compact <= 1; compact++) {
        fresh_dir();
        struct node a, b, m;
        char err[512];
        ck_assert_int_eq(node_open(&a, model_a), 0);
        ck_assert_int_eq(node_open_at(&m, model_a, NULL), 0);
        for (int k = 0; k < 2; k++) {
            struct node *n = k == 0 ? &a : &m;
            populate(n);
            kvs_session *r = kvs_session_find(n->S, "r"), *w = kvs_session_find(n->S, "w");
            if (n == &a) {
                ck_assert_msg(kvs_session_snapshot(r, compact, err, sizeof err) == 0, "%s", err);
                ck_assert_msg(kvs_session_snapshot(w, compact, err, sizeof err) == 0, "%s", err);
            }
            /* a tail after the snapshot */
            struct kvs_append_result res;
            ck_assert_int_eq(kvs_session_append(r, "TSLA 170.1", 10, 9, 3 * N_RECS + 1, &res, err,
                                                sizeof err), 0);
            ck_assert_int_eq(kvs_session_append(w, "TSLA 170.1", 10, 0, 0, &res, err, sizeof err), 0);
        }
        node_close(&a);
        ck_assert_int_eq(node_open(&b, model_a), 0);
        ck_assert_int_eq(kvs_sessions_restore(b.S, err, sizeof err), 2);
        same_state(kvs_session_find(m.S, "r"), kvs_session_find(b.S, "r"));
        same_state(kvs_session_find(m.S, "w"), kvs_session_find(b.S, "w"));
        node_close(&b);
        if (!compact) {
            /* a corrupt snapshot is refused and the whole log replayed instead */
            char path[700];
            snprintf(path, sizeof path, "%s/r.snap", dir);
            int fd = open(path, O_RDWR);
            ck_assert_int_ge(fd, 0);
            unsigned char c;
            ck_assert_int_eq(pread(fd, &c, 1, 300), 1);
            c ^= 0x40;
            ck_assert_int_eq(pwrite(fd, &c, 1, 300), 1);
            close(fd);
            ck_assert_int_eq(node_open(&b, model_a), 0);
            ck_assert_msg(kvs_sessions_restore(b.S, err, sizeof err) == 2, "%s", err);
            same_state(kvs_session_find(m.S, "r"), kvs_session_find(b.S, "r"));
            node_close(&b);
        }
        node_close(&m);
        rm_dir();
    }
}
END_TEST

START_TEST(test_torn_tail_and_wrong_model)
{
    fresh_dir();
    struct node a, b;
    char err[512];
    ck_assert_int_eq(node_open(&a, model_a), 0);
    kvs_session *s;
    ck_assert_int_eq(kvs_session_create(a.S, "t", &(struct kvs_session_opts){.budget_cells = 256},
                                        &s, err, sizeof err), 0);
    struct kvs_append_result res;
    for (int i = 0; i < 4; i++) {
        ck_assert_int_eq(kvs_session_append(s, RECS[i], strlen(RECS[i]), 0, 0, &res, err, sizeof err), 0);
    }
    node_close(&a);
    /* tear the last record */
    char path[700];
    snprintf(path, sizeof path, "%s/t.log", dir);
    struct stat st;
    ck_assert_int_eq(stat(path, &st), 0);
    ck_assert_int_eq(truncate(path, st.st_size - 3), 0);
    ck_assert_int_eq(node_open(&b, model_a), 0);
    ck_assert_int_eq(kvs_sessions_restore(b.S, err, sizeof err), 1);
    struct kvs_session_info in;
    kvs_session_info(kvs_session_find(b.S, "t"), &in);
    ck_assert_uint_eq(in.appends, 3); /* the torn fourth is dropped */
    node_close(&b);
    /* another model: refused, reported, files kept */
    ck_assert_int_eq(node_open(&b, model_b), 0);
    ck_assert_int_eq(kvs_sessions_restore(b.S, err, sizeof err), 0);
    ck_assert_msg(strstr(err, "t:") != NULL, "%s", err);
    ck_assert_int_eq(kvs_sessions_count(b.S), 0);
    ck_assert_int_eq(stat(path, &st), 0);
    node_close(&b);
    rm_dir();
}
END_TEST

/* SIGKILL during appends under fsync "always". */
START_TEST(test_sigkill)
{
    for (int round = 0; round < 4; round++) {
        fresh_dir();
        int fds[2];
        ck_assert_int_eq(pipe(fds), 0);
        pid_t pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
            close(fds[0]);
            struct node n;
            if (node_open(&n, model_a) < 0) {
                _exit(3);
            }
            char err[256];
            kvs_session *s;
            if (kvs_session_create(n.S, "k", &(struct kvs_session_opts){.budget_cells = 1500},
                                   &s, err, sizeof err) < 0) {
                _exit(4);
            }
            for (uint32_t i = 1; i <= 400; i++) {
                struct kvs_append_result res;
                const char *rec = RECS[i % N_RECS];
                if (kvs_session_append(s, rec, strlen(rec), 5, i, &res, err, sizeof err) < 0) {
                    _exit(5);
                }
                if (write(fds[1], &i, sizeof i) != sizeof i) { /* acknowledged */
                    _exit(6);
                }
            }
            _exit(0);
        }
        close(fds[1]);
        /* let it acknowledge a few appends, then kill it at a random moment */
        uint32_t acked = 0, v;
        uint32_t target = 3 + (uint32_t)(round * 7);
        while (acked < target && read(fds[0], &v, sizeof v) == sizeof v) {
            acked = v;
        }
        usleep((useconds_t)(round * 1300));
        kill(pid, SIGKILL);
        while (read(fds[0], &v, sizeof v) == sizeof v) {
            acked = v;
        }
        close(fds[0]);
        int status;
        waitpid(pid, &status, 0);
        ck_assert(WIFSIGNALED(status));
        struct node b;
        char err[512];
        ck_assert_int_eq(node_open(&b, model_a), 0);
        ck_assert_msg(kvs_sessions_restore(b.S, err, sizeof err) == 1, "%s", err);
        kvs_session *s = kvs_session_find(b.S, "k");
        struct kvs_session_info in;
        kvs_session_info(s, &in);
        ck_assert_msg(in.appends == acked || in.appends == acked + 1,
                      "round %d: %llu appends restored, %u acknowledged", round,
                      (unsigned long long)in.appends, acked);
        /* the in-flight one retried: applied exactly once either way */
        uint32_t next = acked + 1;
        struct kvs_append_result res;
        ck_assert_int_eq(kvs_session_append(s, RECS[next % N_RECS], strlen(RECS[next % N_RECS]), 5,
                                            next, &res, err, sizeof err), 0);
        ck_assert(res.duplicate == (in.appends == acked + 1));
        kvs_session_info(s, &in);
        ck_assert_uint_eq(in.appends, acked + 1);
        /* and the data is exactly what an uninterrupted session holds */
        struct node c;
        ck_assert_int_eq(node_open(&c, model_a), 0);
        kvs_sessions_destroy(&c.S);
        struct kvs_sessions_opts mem = {0};
        ck_assert_int_eq(kvs_sessions_new(c.e, &mem, &c.S), 0);
        kvs_session *u;
        ck_assert_int_eq(kvs_session_create(c.S, "k", &(struct kvs_session_opts){.budget_cells = 1500},
                                            &u, err, sizeof err), 0);
        for (uint32_t i = 1; i <= acked + 1; i++) {
            ck_assert_int_eq(kvs_session_append(u, RECS[i % N_RECS], strlen(RECS[i % N_RECS]), 5, i,
                                                &res, err, sizeof err), 0);
        }
        same_state(u, s);
        node_close(&c);
        node_close(&b);
        rm_dir();
    }
}
END_TEST

/* A full disk (EFBIG through RLIMIT_FSIZE, in a child process) fails the append with
 * KVS_IO, applies nothing and loses nothing acknowledged; once there is room again appends
 * succeed, and a restore holds exactly the acknowledged ones. */
START_TEST(test_disk_full)
{
    fresh_dir();
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        struct node n;
        char err[256];
        if (node_open(&n, model_a) < 0) {
            _exit(10);
        }
        kvs_session *s;
        if (kvs_session_create(n.S, "f", &(struct kvs_session_opts){.budget_cells = 1024}, &s,
                               err, sizeof err) < 0) {
            _exit(11);
        }
        struct kvs_append_result r;
        for (int i = 0; i < 3; i++) {
            if (kvs_session_append(s, RECS[i], strlen(RECS[i]), 0, 0, &r, err, sizeof err) < 0) {
                _exit(12);
            }
        }
        char path[700];
        snprintf(path, sizeof path, "%s/f.log", dir);
        struct stat st;
        if (stat(path, &st) < 0) {
            _exit(13);
        }
        signal(SIGXFSZ, SIG_IGN);
        struct rlimit lim = {.rlim_cur = (rlim_t)st.st_size + 8, .rlim_max = RLIM_INFINITY};
        if (setrlimit(RLIMIT_FSIZE, &lim) < 0) {
            _exit(14);
        }
        struct kvs_session_info before, after;
        kvs_session_info(s, &before);
        int rc = kvs_session_append(s, RECS[3], strlen(RECS[3]), 0, 0, &r, err, sizeof err);
        kvs_session_info(s, &after);
        if (rc != KVS_IO || strstr(err, "log") == NULL) {
            _exit(15);
        }
        if (after.appends != before.appends || after.cells_used != before.cells_used ||
            after.version != before.version) {
            _exit(16); /* something was applied */
        }
        lim.rlim_cur = RLIM_INFINITY;
        setrlimit(RLIMIT_FSIZE, &lim);
        if (kvs_session_append(s, RECS[4], strlen(RECS[4]), 0, 0, &r, err, sizeof err) < 0) {
            _exit(17);
        }
        node_close(&n);
        _exit(0);
    }
    int status;
    waitpid(pid, &status, 0);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %d",
                  WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    struct node b;
    char err[512];
    ck_assert_int_eq(node_open(&b, model_a), 0);
    ck_assert_int_eq(kvs_sessions_restore(b.S, err, sizeof err), 1);
    struct kvs_session_info in;
    kvs_session_info(kvs_session_find(b.S, "f"), &in);
    ck_assert_uint_eq(in.appends, 4); /* 3 before the full disk, 1 after; the failed one is not there */
    node_close(&b);
    rm_dir();
}
END_TEST

int main(void)
{
    make_model(model_a, sizeof model_a, 3);
    make_model(model_b, sizeof model_b, 4);
    Suite *su = suite_create("session_durable");
    TCase *tc = tcase_create("durable");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_replay_log);
    tcase_add_test(tc, test_snapshot_and_tail);
    tcase_add_test(tc, test_torn_tail_and_wrong_model);
    tcase_add_test(tc, test_sigkill);
    tcase_add_test(tc, test_disk_full);
    suite_add_tcase(su, tc);
    SRunner *sr = srunner_create(su);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    unlink(model_a);
    unlink(model_b);
    return failed == 0 ? 0 : 1;
}
