/* libkvstream against a real kvs-worker process (fork/exec of the built binary on an ephemeral
 * loopback port, the default model): every call, timeouts against a SIGSTOPped worker,
 * reconnects across a worker restart, a retried append applied once, flash watch with resume,
 * MOVED followed, bad replies refused, and bad arguments refused before anything is sent.
 *
 * The MOVED and bad-reply test answers from a small ROUTER of its own: no kvstream server
 * sends MOVED yet (the coordinator will), and kvs-worker sends no bad replies; everything
 * else talks to kvs-worker. */
#include "client/include/kvstream.h"
#include "tests/testutil.h"

#include <arpa/inet.h>
#include <check.h>
#include <errno.h>
#include <msgpack.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#ifndef KVS_WORKER_BIN
#define KVS_WORKER_BIN "kvs-worker"
#endif

struct worker {
    pid_t pid;
    FILE *out;               /* its standard output (the ready line) */
    char endpoint[256];
    char dir[512];           /* --data-dir */
    const char *curve_secret; /* --curve-secret FILE (NULL = plain) */
};

static char g_model[600];
static char g_worker_bin[1024];
static char g_tmp[256];      /* this run's scratch dir */
static struct worker g_shared; /* one worker for the tests that do not stop it */

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Start kvs-worker on listen with its data in dir; 0 once it printed its endpoint. */
static int worker_start(struct worker *w, const char *listen, const char *dir)
{
    int p[2];
    if (pipe(p) != 0) {
        return -1;
    }
    snprintf(w->dir, sizeof w->dir, "%s", dir);
    mkdir(dir, 0700);
    char log[600];
    snprintf(log, sizeof log, "%s.log", dir);
    bool main_thread = syscall(SYS_gettid) == getpid(); /* asked before fork: after, it is */
    pid_t pid = fork();
    if (pid < 0) {
        return -1;
    }
    if (pid == 0) {
        if (main_thread) {
            /* not from a helper thread: the signal comes when the forking thread exits */
            prctl(PR_SET_PDEATHSIG, SIGKILL);
        }
        dup2(p[1], STDOUT_FILENO);
        close(p[0]);
        close(p[1]);
        FILE *e = freopen(log, "a", stderr);
        (void)e;
        /* plain: curve is NULL and ends the argument list there */
        const char *curve = w->curve_secret != NULL ? "--curve-secret" : NULL;
        execl(g_worker_bin, g_worker_bin, "--model", g_model, "--listen", listen, "--threads",
              "1", "--cells", "4096", "--data-dir", dir, "--fsync", "no", curve,
              w->curve_secret, (char *)NULL);
        _exit(127);
    }
    close(p[1]);
    w->pid = pid;
    w->out = fdopen(p[0], "r");
    char line[512];
    if (w->out == NULL || fgets(line, sizeof line, w->out) == NULL) {
        return -1;
    }
    const char *tag = "listening on ";
    char *at = strstr(line, tag);
    if (at == NULL) {
        return -1;
    }
    at += strlen(tag);
    at[strcspn(at, "\r\n")] = '\0';
    snprintf(w->endpoint, sizeof w->endpoint, "%s", at);
    return 0;
}

/* Signal the worker and return its exit status (-1 if it did not exit normally). */
static int worker_stop(struct worker *w, int sig)
{
    if (w->pid <= 0) {
        return -1;
    }
    kill(w->pid, sig);
    int status = 0;
    while (waitpid(w->pid, &status, 0) < 0 && errno == EINTR) {
    }
    w->pid = 0;
    if (w->out != NULL) {
        fclose(w->out);
        w->out = NULL;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static kvs_client *connect_to(const char *ep, int32_t timeout_ms, int32_t retries)
{
    struct kvs_client_opts o = {.timeout_ms = timeout_ms, .retries = retries,
                                .connect_timeout_ms = 10000};
    kvs_client *c = NULL;
    char err[256] = "";
    int rc = kvs_client_connect(ep, &o, &c, err, sizeof err);
    ck_assert_msg(rc == 0, "connect %s: %s (%s)", ep, err, kvs_status_name(rc));
    return c;
}

#define OK(c, call)                                                                        \
    do {                                                                                   \
        int rc_ = (call);                                                                  \
        ck_assert_msg(rc_ == 0, "%s: %s (%s)", #call, kvs_client_error(c),                \
                      kvs_status_name(rc_));                                               \
    } while (0)

#define FAILS(c, want, call)                                                               \
    do {                                                                                   \
        int rc_ = (call);                                                                  \
        ck_assert_msg(rc_ == (want), "%s: got %s (%s), want %s", #call,                    \
                      kvs_status_name(rc_), kvs_client_error(c), kvs_status_name(want));   \
        ck_assert_msg(kvs_client_error(c)[0] != '\0', "%s: no message", #call);            \
    } while (0)

static int count_of(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = strstr(hay, needle); p != NULL; p = strstr(p + 1, needle)) {
        n++;
    }
    return n;
}

/* A loopback port nobody listens on (bound for a moment, then released). */
static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    ck_assert(fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
              getsockname(fd, (struct sockaddr *)&a, &len) == 0);
    close(fd);
    return ntohs(a.sin_port);
}

/* ---- connect, ping, status ------------------------------------------------------------------ */

START_TEST(test_connect_ping_status)
{
    char err[256] = "";
    kvs_client *c = NULL;
    ck_assert_int_eq(kvs_client_connect("nonsense", NULL, &c, err, sizeof err),
                     KVS_INVALID_ARGUMENT);
    ck_assert_ptr_null(c);
    ck_assert(strstr(err, "nonsense") != NULL);
    /* nobody on a free port: TIMEOUT after connect_timeout_ms */
    char nobody[64];
    snprintf(nobody, sizeof nobody, "tcp://127.0.0.1:%d", free_port());
    struct kvs_client_opts o = {.connect_timeout_ms = 300};
    double t0 = now_ms();
    ck_assert_int_eq(kvs_client_connect(nobody, &o, &c, err, sizeof err), KVS_TIMEOUT);
    double dt = now_ms() - t0;
    ck_assert_msg(dt >= 250 && dt < 3000, "connect timeout took %.0f ms", dt);
    ck_assert(strstr(err, nobody) != NULL);
    /* NULL endpoint: $KVSTREAM_ENDPOINT */
    setenv("KVSTREAM_ENDPOINT", g_shared.endpoint, 1);
    ck_assert_int_eq(kvs_client_connect(NULL, NULL, &c, err, sizeof err), 0);
    unsetenv("KVSTREAM_ENDPOINT");
    ck_assert_str_eq(kvs_client_endpoint(c), g_shared.endpoint);
    ck_assert(kvs_client_id(c) != 0);
    double rtt = -1;
    OK(c, kvs_client_ping(c, &rtt));
    ck_assert(rtt > 0 && rtt < 5000);
    struct kvs_client_status st;
    OK(c, kvs_client_status(c, &st));
    ck_assert_int_eq((int)strlen(st.model_sha256), 64);
    ck_assert_int_eq(st.cells_total, 4096);
    ck_assert(st.n_vocab > 1000 && st.queue_max > 0);
    kvs_client_destroy(&c);
    ck_assert_ptr_null(c);
    kvs_client_destroy(&c); /* a second destroy is a no-op */
    kvs_client_destroy(NULL);
    /* two clients get different ids */
    kvs_client *a = connect_to(g_shared.endpoint, 5000, 0);
    kvs_client *b = connect_to(g_shared.endpoint, 5000, 0);
    ck_assert(kvs_client_id(a) != kvs_client_id(b));
    kvs_client_destroy(&a);
    kvs_client_destroy(&b);
}
END_TEST

/* ---- sessions ------------------------------------------------------------------------------- */

START_TEST(test_session_calls)
{
    kvs_client *c = connect_to(g_shared.endpoint, 30000, 0);
    struct kvs_client_session_opts so = {.cells = 1024, .prefix = "Ticks:"};
    struct kvs_client_session_info in;
    OK(c, kvs_client_session_create(c, "sc1", &so, &in));
    ck_assert_int_eq(in.version, 0);
    ck_assert_int_eq(in.cells_budget, 1024);
    ck_assert(in.cells_used > 0); /* the prefix */
    FAILS(c, KVS_ALREADY_EXISTS, kvs_client_session_create(c, "sc1", NULL, NULL));
    ck_assert(strstr(kvs_client_error(c), "ALREADY_EXISTS") != NULL);

    struct kvs_client_append_result ar;
    OK(c, kvs_client_append(c, "sc1", "AAPL 189.2", 10, &ar));
    ck_assert_int_eq(ar.version, 1);
    ck_assert(ar.n_tokens > 0 && !ar.duplicate);
    const int32_t ids[3] = {100, 200, 300};
    OK(c, kvs_client_append_tokens(c, "sc1", ids, 3, &ar));
    ck_assert_int_eq(ar.version, 2);
    ck_assert_int_eq(ar.n_tokens, 3);

    OK(c, kvs_client_session_info(c, "sc1", &in));
    ck_assert_int_eq(in.version, 2);
    ck_assert_int_eq(in.appends, 2);
    ck_assert(in.prefix_tokens > 0);
    ck_assert_int_eq(in.cells_used, in.prefix_tokens + in.data_tokens);
    ck_assert_int_eq(in.cells_budget, 1024);
    ck_assert_int_eq(in.flash_queries, 0);
    ck_assert_str_eq(in.format, "raw");
    ck_assert_str_eq(in.policy, "reject");

    char **names = NULL;
    int32_t n = 0;
    OK(c, kvs_client_session_list(c, &names, &n));
    bool found = false;
    for (int32_t i = 0; i < n; i++) {
        found = found || strcmp(names[i], "sc1") == 0;
    }
    ck_assert(found);
    kvs_client_names_free(&names, n);
    ck_assert_ptr_null(names);

    OK(c, kvs_client_session_snapshot(c, "sc1", false));
    struct kvs_client_dump d;
    OK(c, kvs_client_session_dump(c, "sc1", &d));
    ck_assert_int_eq(d.version, 2);
    ck_assert_int_eq(d.prefix_tokens, in.prefix_tokens);
    ck_assert_int_eq(d.n_tokens, in.prefix_tokens + in.data_tokens);
    ck_assert_int_eq(d.tokens[d.n_tokens - 1], 300);
    ck_assert_msg(count_of(d.text, "AAPL 189.2") == 1, "dump text: %s", d.text);
    kvs_client_dump_free(&d);

    /* chat format and slide policy reach the worker */
    struct kvs_client_session_opts so2 = {.chat = true, .slide = true, .cells = 512};
    OK(c, kvs_client_session_create(c, "sc2", &so2, NULL));
    OK(c, kvs_client_session_info(c, "sc2", &in));
    ck_assert_str_eq(in.format, "chat");
    ck_assert_str_eq(in.policy, "slide");

    OK(c, kvs_client_session_close(c, "sc1"));
    OK(c, kvs_client_session_close(c, "sc2"));
    FAILS(c, KVS_NOT_FOUND, kvs_client_session_info(c, "sc1", &in));
    FAILS(c, KVS_NOT_FOUND, kvs_client_session_close(c, "sc1"));
    FAILS(c, KVS_NOT_FOUND, kvs_client_append(c, "sc1", "x", 1, NULL));
    kvs_client_destroy(&c);
}
END_TEST

/* ---- queries -------------------------------------------------------------------------------- */

struct pieces {
    char text[4096];
    size_t len;
    int32_t tokens[256];
    int n_tokens;
    int stop_after;          /* return false after this many pieces; 0 = never */
    int calls;
};

static bool on_piece(int32_t token, const char *text, size_t len, void *user)
{
    struct pieces *p = user;
    if (p->len + len < sizeof p->text) {
        memcpy(p->text + p->len, text, len);
        p->len += len;
    }
    if (token >= 0 && p->n_tokens < 256) {
        p->tokens[p->n_tokens++] = token;
    }
    p->calls++;
    return p->stop_after == 0 || p->calls < p->stop_after;
}

struct cancel_ctx {
    kvs_client *c;
    int after_ms;
};

static void *cancel_query_later(void *arg)
{
    struct cancel_ctx *x = arg;
    sleep_ms(x->after_ms);
    kvs_client_cancel(x->c);
    return NULL;
}

START_TEST(test_query)
{
    kvs_client *c = connect_to(g_shared.endpoint, 60000, 0);
    OK(c, kvs_client_session_create(c, "q1", &(struct kvs_client_session_opts){.cells = 1024},
                                    NULL));
    for (int i = 0; i < 5; i++) {
        char rec[64];
        int n = snprintf(rec, sizeof rec, "tick %d: MSFT %d.5", i, 400 + i);
        OK(c, kvs_client_append(c, "q1", rec, (size_t)n, NULL));
    }
    struct kvs_client_query_opts qo = {.max_tokens = 12};
    struct kvs_client_answer a = {0}, s = {0}, st = {0};
    OK(c, kvs_client_query(c, "q1", "Last MSFT price:", &qo, NULL, NULL, &a));
    ck_assert_int_eq(a.version, 5);
    ck_assert(a.n_tokens > 0 && a.n_tokens <= 12);
    ck_assert(a.context_tokens > 0 && a.question_tokens > 0);
    ck_assert(a.ttft_ms > 0 && a.total_ms >= a.ttft_ms);
    ck_assert_uint_eq(strlen(a.text), a.len);

    /* stateless (the baseline) gives the same greedy answer */
    qo.stateless = true;
    OK(c, kvs_client_query(c, "q1", "Last MSFT price:", &qo, NULL, NULL, &s));
    ck_assert_str_eq(s.text, a.text);
    ck_assert_int_eq(s.n_tokens, a.n_tokens);
    ck_assert_mem_eq(s.tokens, a.tokens, (size_t)a.n_tokens * sizeof *a.tokens);
    qo.stateless = false;

    /* streamed: the pieces add up to the answer */
    struct pieces p = {0};
    OK(c, kvs_client_query(c, "q1", "Last MSFT price:", &qo, on_piece, &p, &st));
    ck_assert_str_eq(st.text, a.text);
    ck_assert_uint_eq(p.len, a.len);
    ck_assert_mem_eq(p.text, a.text, a.len);
    ck_assert_int_eq(p.n_tokens, a.n_tokens);
    ck_assert_mem_eq(p.tokens, a.tokens, (size_t)a.n_tokens * sizeof *a.tokens);

    /* cancelled from the callback: CANCELLED, the answer untouched, the client still good */
    struct pieces p2 = {.stop_after = 2};
    struct kvs_client_answer never = {0};
    qo.max_tokens = 64;
    FAILS(c, KVS_CANCELLED, kvs_client_query(c, "q1", "Describe the ticks:", &qo, on_piece, &p2,
                                             &never));
    ck_assert_ptr_null(never.text);
    ck_assert_int_eq(p2.calls, 2);
    struct kvs_client_answer again = {0};
    qo.max_tokens = 12;
    OK(c, kvs_client_query(c, "q1", "Last MSFT price:", &qo, NULL, NULL, &again));
    ck_assert_str_eq(again.text, a.text); /* not a stale piece of the cancelled stream */
    kvs_client_answer_free(&again);
    OK(c, kvs_client_ping(c, NULL));

    /* a blocking query cancelled from another thread: CANCELLED at once, client still good */
    struct cancel_ctx cx = {.c = c, .after_ms = 300};
    pthread_t th;
    pthread_create(&th, NULL, cancel_query_later, &cx);
    struct kvs_client_query_opts lo = {.max_tokens = 400}; /* within the query reserve */
    double t0 = now_ms();
    int lrc = kvs_client_query(c, "q1", "List every number from 1 to 2000, one per line:", &lo,
                               NULL, NULL, &never);
    double dt = now_ms() - t0;
    pthread_join(th, NULL);
    if (lrc == 0) { /* finished (end of text) before the cancel: nothing more to check */
        ck_assert_msg(dt < 300, "a query that ran %.0f ms was not cancelled", dt);
        kvs_client_answer_free(&never);
    } else {
        ck_assert_msg(lrc == KVS_CANCELLED, "cancel: %s", kvs_client_error(c));
        ck_assert_msg(dt < 3000, "cancel took %.0f ms", dt - 300);
    }
    OK(c, kvs_client_query(c, "q1", "Last MSFT price:", &qo, NULL, NULL, &again));
    ck_assert_str_eq(again.text, a.text);
    kvs_client_answer_free(&again);

    /* sampling with a seed reproduces */
    struct kvs_client_query_opts so = {.max_tokens = 8, .temperature = 0.9f, .top_k = 40,
                                       .top_p = 0.95f, .seed = 7};
    struct kvs_client_answer r1 = {0}, r2 = {0};
    OK(c, kvs_client_query(c, "q1", "Say something:", &so, NULL, NULL, &r1));
    OK(c, kvs_client_query(c, "q1", "Say something:", &so, NULL, NULL, &r2));
    ck_assert_str_eq(r1.text, r2.text);

    /* a stop string ends the answer before it */
    const char *stops[] = {"4"};
    struct kvs_client_query_opts sto = {.max_tokens = 12, .stops = stops, .n_stops = 1};
    struct kvs_client_answer cut = {0};
    OK(c, kvs_client_query(c, "q1", "Last MSFT price:", &sto, NULL, NULL, &cut));
    ck_assert(strchr(cut.text, '4') == NULL);

    FAILS(c, KVS_NOT_FOUND, kvs_client_query(c, "nope", "x", NULL, NULL, NULL, &never));
    OK(c, kvs_client_session_info(c, "q1", &(struct kvs_client_session_info){0}));
    kvs_client_answer_free(&a);
    kvs_client_answer_free(&s);
    kvs_client_answer_free(&st);
    kvs_client_answer_free(&again);
    kvs_client_answer_free(&r1);
    kvs_client_answer_free(&r2);
    kvs_client_answer_free(&cut);
    kvs_client_answer_free(&cut); /* freeing twice is harmless */
    OK(c, kvs_client_session_close(c, "q1"));
    kvs_client_destroy(&c);
}
END_TEST

/* ---- flash queries -------------------------------------------------------------------------- */

START_TEST(test_flash)
{
    kvs_client *c = connect_to(g_shared.endpoint, 60000, 0);
    OK(c, kvs_client_session_create(c, "f1", &(struct kvs_client_session_opts){.cells = 1024},
                                    NULL));
    OK(c, kvs_client_append(c, "f1", "BTC 65000", 9, NULL));
    struct kvs_client_flash_opts fo = {.query = {.max_tokens = 6}};
    OK(c, kvs_client_flash_register(c, "f1", "last", "Last BTC price:", &fo));
    FAILS(c, KVS_ALREADY_EXISTS, kvs_client_flash_register(c, "f1", "last", "x", &fo));
    char **names = NULL;
    int32_t n = 0;
    OK(c, kvs_client_flash_list(c, "f1", &names, &n));
    ck_assert_int_eq(n, 1);
    ck_assert_str_eq(names[0], "last");
    kvs_client_names_free(&names, n);

    struct kvs_client_answer g = {0}, q = {0}, g2 = {0};
    OK(c, kvs_client_flash_get(c, "f1", "last", false, &g));
    ck_assert(g.fresh);
    ck_assert_int_eq(g.version, 1);
    ck_assert_str_eq(g.name, "last");
    struct kvs_client_query_opts six = {.max_tokens = 6};
    OK(c, kvs_client_query(c, "f1", "Last BTC price:", &six, NULL, NULL, &q));
    ck_assert_int_eq(g.n_tokens, q.n_tokens);
    ck_assert_mem_eq(g.tokens, q.tokens, (size_t)q.n_tokens * sizeof *q.tokens);

    OK(c, kvs_client_append(c, "f1", "BTC 65100", 9, NULL));
    OK(c, kvs_client_flash_get(c, "f1", "last", false, &g2));
    ck_assert(g2.fresh);
    ck_assert_int_eq(g2.version, 2);
    struct kvs_client_session_info in;
    OK(c, kvs_client_session_info(c, "f1", &in));
    ck_assert_int_eq(in.flash_queries, 1);

    struct kvs_client_answer none = {0};
    FAILS(c, KVS_NOT_FOUND, kvs_client_flash_get(c, "f1", "nope", false, &none));
    OK(c, kvs_client_flash_unregister(c, "f1", "last"));
    FAILS(c, KVS_NOT_FOUND, kvs_client_flash_unregister(c, "f1", "last"));
    FAILS(c, KVS_NOT_FOUND, kvs_client_flash_get(c, "f1", "last", true, &none));
    OK(c, kvs_client_flash_list(c, "f1", &names, &n));
    ck_assert_int_eq(n, 0);
    kvs_client_names_free(&names, n);
    kvs_client_answer_free(&g);
    kvs_client_answer_free(&g2);
    kvs_client_answer_free(&q);
    OK(c, kvs_client_session_close(c, "f1"));
    kvs_client_destroy(&c);
}
END_TEST

/* ---- flash watch ----------------------------------------------------------------------------- */

struct watch_ctx {
    const char *endpoint;
    const char *session;
    atomic_int answers;
    atomic_int go;           /* the watcher saw its first answer: the helper acts */
    uint64_t versions[16];
    uint64_t stop_at;        /* return false at an answer of this version */
    kvs_client *watcher;     /* for kvs_client_cancel from the helper */
    struct worker *restart;  /* the helper restarts this worker first (resume test) */
    int helper_rc;
};

static bool on_watch(const struct kvs_client_answer *a, void *user)
{
    struct watch_ctx *w = user;
    int i = atomic_fetch_add(&w->answers, 1);
    if (i < 16) {
        w->versions[i] = a->version;
    }
    atomic_store(&w->go, 1);
    return w->stop_at == 0 || a->version < w->stop_at;
}

/* The helper thread: once the watcher saw an answer, (restart the worker,) append a record
 * with a client of its own, so that a new answer is pushed. */
static void *append_when_watched(void *arg)
{
    struct watch_ctx *w = arg;
    for (int i = 0; i < 600 && !atomic_load(&w->go); i++) {
        sleep_ms(50);
    }
    if (w->restart != NULL) {
        char ep[256], dir[512];
        snprintf(ep, sizeof ep, "%s", w->restart->endpoint);
        snprintf(dir, sizeof dir, "%s", w->restart->dir);
        if (worker_stop(w->restart, SIGTERM) != 0 || worker_start(w->restart, ep, dir) != 0) {
            w->helper_rc = -1;
            return NULL;
        }
    }
    struct kvs_client_opts o = {.timeout_ms = 30000};
    kvs_client *c = NULL;
    w->helper_rc = kvs_client_connect(w->endpoint, &o, &c, NULL, 0);
    if (w->helper_rc == 0) {
        w->helper_rc = kvs_client_append(c, w->session, "ETH 3100", 8, NULL);
    }
    kvs_client_destroy(&c);
    return NULL;
}

static void *cancel_later(void *arg)
{
    struct watch_ctx *w = arg;
    sleep_ms(400);
    kvs_client_cancel(w->watcher);
    return NULL;
}

static void watch_setup(kvs_client *c, const char *session)
{
    OK(c, kvs_client_session_create(c, session, &(struct kvs_client_session_opts){.cells = 1024},
                                    NULL));
    OK(c, kvs_client_append(c, session, "ETH 3000", 8, NULL));
    struct kvs_client_flash_opts fo = {.query = {.max_tokens = 4}};
    OK(c, kvs_client_flash_register(c, session, "last", "Last ETH price:", &fo));
}

START_TEST(test_watch)
{
    kvs_client *c = connect_to(g_shared.endpoint, 30000, 0);
    watch_setup(c, "w1");
    /* replay from version 0 (the answer at version 1), then the one the helper causes */
    struct watch_ctx w = {.endpoint = g_shared.endpoint, .session = "w1", .stop_at = 2};
    pthread_t th;
    pthread_create(&th, NULL, append_when_watched, &w);
    OK(c, kvs_client_flash_watch(c, "w1", NULL, 0, on_watch, &w));
    pthread_join(th, NULL);
    ck_assert_int_eq(w.helper_rc, 0);
    ck_assert_int_ge(atomic_load(&w.answers), 2);
    ck_assert_int_eq(w.versions[0], 1);
    ck_assert_int_eq(w.versions[atomic_load(&w.answers) - 1], 2);

    /* only new answers, a name filter that matches nothing, stopped by another thread */
    struct watch_ctx w2 = {.watcher = c};
    pthread_create(&th, NULL, cancel_later, &w2);
    double t0 = now_ms();
    OK(c, kvs_client_flash_watch(c, "w1", "nope", KVS_CLIENT_WATCH_NEW, on_watch, &w2));
    pthread_join(th, NULL);
    ck_assert_int_eq(atomic_load(&w2.answers), 0);
    ck_assert(now_ms() - t0 < 5000);
    OK(c, kvs_client_ping(c, NULL)); /* the client is still good */

    FAILS(c, KVS_NOT_FOUND, kvs_client_flash_watch(c, "nope", NULL, 0, on_watch, &w2));
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_flash_watch(c, "w1", NULL, -2, on_watch, &w2));
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_flash_watch(c, "w1", NULL, 0, NULL, NULL));
    OK(c, kvs_client_session_close(c, "w1"));
    kvs_client_destroy(&c);
}
END_TEST

/* The helper of the renewal test: waits 1.6 s (several renewals of a 400 ms watch), then
 * appends. */
static void *append_later(void *arg)
{
    struct watch_ctx *w = arg;
    sleep_ms(1600);
    struct kvs_client_opts o = {.timeout_ms = 30000};
    kvs_client *c = NULL;
    w->helper_rc = kvs_client_connect(w->endpoint, &o, &c, NULL, 0);
    if (w->helper_rc == 0) {
        w->helper_rc = kvs_client_append(c, w->session, "ETH 3100", 8, NULL);
    }
    kvs_client_destroy(&c);
    return NULL;
}

START_TEST(test_quiet_watch_is_renewed)
{
    kvs_client *c = connect_to(g_shared.endpoint, 30000, 0);
    watch_setup(c, "wq");
    /* silent for 400 ms at a time: renewed (cancel + subscribe from the last version) about
     * four times before the append; its answer comes once, the replayed one never twice */
    kvs_client_set_timeout(c, 400);
    struct watch_ctx w = {.endpoint = g_shared.endpoint, .session = "wq", .stop_at = 2};
    pthread_t th;
    pthread_create(&th, NULL, append_later, &w);
    OK(c, kvs_client_flash_watch(c, "wq", NULL, 0, on_watch, &w));
    pthread_join(th, NULL);
    ck_assert_int_eq(w.helper_rc, 0);
    ck_assert_int_eq(atomic_load(&w.answers), 2);
    ck_assert_int_eq(w.versions[0], 1);
    ck_assert_int_eq(w.versions[1], 2);
    kvs_client_set_timeout(c, 30000);
    struct kvs_client_status st;
    OK(c, kvs_client_status(c, &st)); /* the client still works */
    OK(c, kvs_client_session_close(c, "wq"));
    kvs_client_destroy(&c);
}
END_TEST

START_TEST(test_watch_resumes_after_restart)
{
    struct worker w = {0};
    char dir[600];
    snprintf(dir, sizeof dir, "%s/resume", g_tmp);
    ck_assert_int_eq(worker_start(&w, "tcp://127.0.0.1:0", dir), 0);
    kvs_client *c = connect_to(w.endpoint, 2000, 20);
    watch_setup(c, "wr");
    /* the helper restarts the worker after the first answer, then appends: the watch must
     * come back by itself and deliver the answer at version 2 */
    struct watch_ctx x = {.endpoint = w.endpoint, .session = "wr", .stop_at = 2, .restart = &w};
    pthread_t th;
    pthread_create(&th, NULL, append_when_watched, &x);
    int rc = kvs_client_flash_watch(c, "wr", NULL, 0, on_watch, &x);
    pthread_join(th, NULL);
    ck_assert_msg(rc == 0, "watch: %s (%s)", kvs_client_error(c), kvs_status_name(rc));
    ck_assert_int_eq(x.helper_rc, 0);
    ck_assert_int_eq(x.versions[0], 1);
    ck_assert_int_eq(x.versions[atomic_load(&x.answers) - 1], 2);
    kvs_client_destroy(&c);
    ck_assert_int_eq(worker_stop(&w, SIGTERM), 0);
}
END_TEST

/* ---- timeouts, retries, reconnects ----------------------------------------------------------- */

static void *resume_later(void *arg)
{
    pid_t pid = *(pid_t *)arg;
    sleep_ms(2500);
    kill(pid, SIGCONT);
    return NULL;
}

START_TEST(test_timeout_on_stopped_worker)
{
    kvs_client *c = connect_to(g_shared.endpoint, 30000, -1);
    OK(c, kvs_client_session_create(c, "to1", NULL, NULL));
    kvs_client_set_timeout(c, 300);
    kill(g_shared.pid, SIGSTOP);
    double t0 = now_ms();
    int ping_rc = kvs_client_ping(c, NULL);
    double dt_ping = now_ms() - t0;
    struct kvs_client_session_info in;
    int info_rc = kvs_client_session_info(c, "to1", &in);
    int append_rc = kvs_client_append(c, "to1", "X one", 5, NULL);
    kill(g_shared.pid, SIGCONT);
    ck_assert_int_eq(ping_rc, KVS_TIMEOUT);
    ck_assert_msg(dt_ping >= 250 && dt_ping < 3000, "ping timed out after %.0f ms", dt_ping);
    ck_assert_int_eq(info_rc, KVS_TIMEOUT);
    ck_assert_int_eq(append_rc, KVS_TIMEOUT);
    ck_assert(strstr(kvs_client_error(c), "within") != NULL);
    /* the worker is back: the next calls work, the next append is accepted whether or not
     * the timed-out one was applied, and nothing is applied twice */
    kvs_client_set_timeout(c, 30000);
    OK(c, kvs_client_ping(c, NULL));
    OK(c, kvs_client_append(c, "to1", "X two", 5, NULL));
    sleep_ms(300); /* a late copy of the timed-out append would land by now */
    struct kvs_client_dump d;
    OK(c, kvs_client_session_dump(c, "to1", &d));
    int ones = count_of(d.text, "X one"), twos = count_of(d.text, "X two");
    ck_assert_msg(ones <= 1 && twos == 1, "dump: %s", d.text);
    OK(c, kvs_client_session_info(c, "to1", &in));
    ck_assert_int_eq(in.appends, (uint64_t)(ones + twos));
    kvs_client_dump_free(&d);
    OK(c, kvs_client_session_close(c, "to1"));
    kvs_client_destroy(&c);
}
END_TEST

START_TEST(test_retried_append_applied_once)
{
    kvs_client *c = connect_to(g_shared.endpoint, 30000, 10);
    OK(c, kvs_client_session_create(c, "rt1", NULL, NULL));
    struct kvs_client_append_result r0, r1, r2;
    OK(c, kvs_client_append(c, "rt1", "R zero", 6, &r0));
    /* the worker stops for 2.5 s: the append times out (1 s) and is sent again with the same
     * number until the worker answers */
    kvs_client_set_timeout(c, 1000);
    kill(g_shared.pid, SIGSTOP);
    pthread_t th;
    pthread_create(&th, NULL, resume_later, &g_shared.pid);
    double t0 = now_ms();
    int rc = kvs_client_append(c, "rt1", "R one", 5, &r1);
    double dt = now_ms() - t0;
    pthread_join(th, NULL);
    ck_assert_msg(rc == 0, "retried append: %s (%s)", kvs_client_error(c), kvs_status_name(rc));
    ck_assert_msg(dt >= 2000, "the append returned after %.0f ms, before the worker resumed", dt);
    ck_assert_int_eq(r1.version, 2);
    sleep_ms(300); /* every copy sent has arrived by now */
    kvs_client_set_timeout(c, 30000);
    struct kvs_client_dump d;
    OK(c, kvs_client_session_dump(c, "rt1", &d));
    ck_assert_msg(count_of(d.text, "R one") == 1, "dump: %s", d.text);
    ck_assert_int_eq(d.version, 2);
    kvs_client_dump_free(&d);

    /* sending the same number again (as a restarted process would) is acknowledged as a
     * duplicate and changes nothing */
    OK(c, kvs_client_set_append_seq(c, "rt1", 1));
    OK(c, kvs_client_append(c, "rt1", "R one", 5, &r2));
    ck_assert(r2.duplicate);
    ck_assert_int_eq(r2.version, 2);
    /* a gap is refused */
    OK(c, kvs_client_set_append_seq(c, "rt1", 5));
    FAILS(c, KVS_OUT_OF_ORDER, kvs_client_append(c, "rt1", "R gap", 5, NULL));
    OK(c, kvs_client_set_append_seq(c, "rt1", 2));
    OK(c, kvs_client_append(c, "rt1", "R two", 5, &r2));
    ck_assert_int_eq(r2.version, 3);
    ck_assert(!r2.duplicate);
    struct kvs_client_session_info in;
    OK(c, kvs_client_session_info(c, "rt1", &in));
    ck_assert_int_eq(in.appends, 3);
    OK(c, kvs_client_session_close(c, "rt1"));
    kvs_client_destroy(&c);
}
END_TEST

struct restart_ctx {
    struct worker *w;
    int rc;
};

static void *restart_later(void *arg)
{
    struct restart_ctx *r = arg;
    char ep[256], dir[512];
    snprintf(ep, sizeof ep, "%s", r->w->endpoint);
    snprintf(dir, sizeof dir, "%s", r->w->dir);
    sleep_ms(1500);
    r->rc = worker_start(r->w, ep, dir);
    return NULL;
}

START_TEST(test_reconnect_after_restart)
{
    struct worker w = {0};
    char dir[600];
    snprintf(dir, sizeof dir, "%s/restart", g_tmp);
    ck_assert_int_eq(worker_start(&w, "tcp://127.0.0.1:0", dir), 0);
    kvs_client *c = connect_to(w.endpoint, 1000, 10);
    OK(c, kvs_client_session_create(c, "rs1", NULL, NULL));
    OK(c, kvs_client_append(c, "rs1", "A one", 5, NULL));

    /* restart at the same endpoint: the same client goes on (the worker restored the
     * session and the client's append numbering from its log) */
    char ep[256];
    snprintf(ep, sizeof ep, "%s", w.endpoint);
    ck_assert_int_eq(worker_stop(&w, SIGTERM), 0);
    ck_assert_int_eq(worker_start(&w, ep, dir), 0);
    struct kvs_client_session_info in;
    OK(c, kvs_client_session_info(c, "rs1", &in));
    ck_assert_int_eq(in.version, 1);
    struct kvs_client_append_result ar;
    OK(c, kvs_client_append(c, "rs1", "A two", 5, &ar));
    ck_assert_int_eq(ar.version, 2);
    ck_assert(!ar.duplicate);

    /* the worker is down when the call starts and comes back 1.5 s later: retries on fresh
     * sockets (1 s each) get through */
    ck_assert_int_eq(worker_stop(&w, SIGTERM), 0);
    struct restart_ctx r = {&w, -1};
    pthread_t th;
    pthread_create(&th, NULL, restart_later, &r);
    int rc = kvs_client_append(c, "rs1", "A three", 7, &ar);
    pthread_join(th, NULL);
    ck_assert_int_eq(r.rc, 0);
    ck_assert_msg(rc == 0, "append across a restart: %s (%s)", kvs_client_error(c),
                  kvs_status_name(rc));
    ck_assert_int_eq(ar.version, 3);
    struct kvs_client_dump d;
    OK(c, kvs_client_session_dump(c, "rs1", &d));
    ck_assert_msg(count_of(d.text, "A one") == 1 && count_of(d.text, "A two") == 1 &&
                      count_of(d.text, "A three") == 1,
                  "dump: %s", d.text);
    kvs_client_dump_free(&d);
    kvs_client_destroy(&c);
    ck_assert_int_eq(worker_stop(&w, SIGTERM), 0);
}
END_TEST

/* ---- MOVED ----------------------------------------------------------------------------------- */

/* A ROUTER that says hello and answers everything else MOVED: to the real worker for most
 * sessions, to itself for "loop", without an owner for "noowner"; sessions "bad-*" get
 * replies that are not protocol (3 frames, a 5-byte allocation bomb, a reserved byte). */
struct mover {
    void *ctx, *sock;
    char endpoint[256];
    const char *owner;
    atomic_int stop;
    atomic_int seen_mv, seen_loop, seen_other;
};

static void reply(struct mover *m, zmq_msg_t *ident, msgpack_sbuffer *sb)
{
    zmq_send(m->sock, zmq_msg_data(ident), zmq_msg_size(ident), ZMQ_SNDMORE);
    zmq_send(m->sock, "", 0, ZMQ_SNDMORE);
    zmq_send(m->sock, sb->data, sb->size, 0);
}

static void pack_s(msgpack_packer *pk, const char *s)
{
    msgpack_pack_str(pk, strlen(s));
    msgpack_pack_str_body(pk, s, strlen(s));
}

static void *mover_main(void *arg)
{
    struct mover *m = arg;
    while (!atomic_load(&m->stop)) {
        zmq_pollitem_t it = {m->sock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&it, 1, 50) <= 0) {
            continue;
        }
        zmq_msg_t ident, delim, body;
        zmq_msg_init(&ident);
        zmq_msg_init(&delim);
        zmq_msg_init(&body);
        zmq_msg_recv(&ident, m->sock, 0);
        zmq_msg_recv(&delim, m->sock, 0);
        zmq_msg_recv(&body, m->sock, 0);
        msgpack_unpacked up;
        msgpack_unpacked_init(&up);
        size_t off = 0;
        uint64_t id = 0;
        char op[32] = "", session[64] = "";
        if (msgpack_unpack_next(&up, zmq_msg_data(&body), zmq_msg_size(&body), &off) ==
            MSGPACK_UNPACK_SUCCESS && up.data.type == MSGPACK_OBJECT_MAP) {
            for (uint32_t i = 0; i < up.data.via.map.size; i++) {
                const msgpack_object_kv *kv = &up.data.via.map.ptr[i];
                const msgpack_object *v = &kv->val;
                if (kv->key.via.str.size == 2 && memcmp(kv->key.via.str.ptr, "id", 2) == 0) {
                    id = v->via.u64;
                } else if (v->type == MSGPACK_OBJECT_STR && v->via.str.size < 32 &&
                           kv->key.via.str.size == 2 && memcmp(kv->key.via.str.ptr, "op", 2) == 0) {
                    memcpy(op, v->via.str.ptr, v->via.str.size);
                    op[v->via.str.size] = '\0';
                } else if (v->type == MSGPACK_OBJECT_STR && v->via.str.size < 64 &&
                           kv->key.via.str.size == 7 &&
                           memcmp(kv->key.via.str.ptr, "session", 7) == 0) {
                    memcpy(session, v->via.str.ptr, v->via.str.size);
                    session[v->via.str.size] = '\0';
                }
            }
        }
        msgpack_unpacked_destroy(&up);
        msgpack_sbuffer sb;
        msgpack_sbuffer_init(&sb);
        msgpack_packer pk;
        msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
        if (strncmp(session, "bad-", 4) == 0) { /* replies that are not protocol */
            static const uint8_t bomb[] = {0xdd, 0xff, 0xff, 0xff, 0xff}; /* 4G-element array */
            static const uint8_t reserved[] = {0x81, 0xa2, 'i', 'd', 0xc1};
            zmq_send(m->sock, zmq_msg_data(&ident), zmq_msg_size(&ident), ZMQ_SNDMORE);
            if (strcmp(session, "bad-frames") == 0) {
                zmq_send(m->sock, "", 0, ZMQ_SNDMORE);
                zmq_send(m->sock, "x", 1, ZMQ_SNDMORE);
                zmq_send(m->sock, "y", 1, 0);
            } else if (strcmp(session, "bad-bomb") == 0) {
                zmq_send(m->sock, "", 0, ZMQ_SNDMORE);
                zmq_send(m->sock, bomb, sizeof bomb, 0);
            } else {
                zmq_send(m->sock, "", 0, ZMQ_SNDMORE);
                zmq_send(m->sock, reserved, sizeof reserved, 0);
            }
            msgpack_sbuffer_destroy(&sb);
            zmq_msg_close(&ident);
            zmq_msg_close(&delim);
            zmq_msg_close(&body);
            continue;
        }
        if (strcmp(op, "hello") == 0 || strcmp(op, "ping") == 0) {
            msgpack_pack_map(&pk, 2);
            pack_s(&pk, "id"), msgpack_pack_uint64(&pk, id);
            if (op[0] == 'h') {
                pack_s(&pk, "version"), msgpack_pack_uint64(&pk, 1);
            } else {
                pack_s(&pk, "pong"), msgpack_pack_true(&pk);
            }
        } else {
            bool loop = strcmp(session, "loop") == 0, none = strcmp(session, "noowner") == 0;
            atomic_fetch_add(loop ? &m->seen_loop : strcmp(session, "mv1") == 0 ? &m->seen_mv
                                                                                : &m->seen_other,
                             1);
            msgpack_pack_map(&pk, 2);
            pack_s(&pk, "id"), msgpack_pack_uint64(&pk, id);
            pack_s(&pk, "error"), msgpack_pack_map(&pk, none ? 3 : 4);
            pack_s(&pk, "code"), pack_s(&pk, "MOVED");
            pack_s(&pk, "status"), msgpack_pack_int(&pk, KVS_MOVED);
            pack_s(&pk, "message"), pack_s(&pk, "session lives elsewhere");
            if (!none) {
                pack_s(&pk, "owner"), pack_s(&pk, loop ? m->endpoint : m->owner);
            }
        }
        reply(m, &ident, &sb);
        msgpack_sbuffer_destroy(&sb);
        zmq_msg_close(&ident);
        zmq_msg_close(&delim);
        zmq_msg_close(&body);
    }
    return NULL;
}

START_TEST(test_moved_is_followed)
{
    struct mover m = {.owner = g_shared.endpoint};
    m.ctx = zmq_ctx_new();
    m.sock = zmq_socket(m.ctx, ZMQ_ROUTER);
    ck_assert_int_eq(zmq_bind(m.sock, "tcp://127.0.0.1:*"), 0);
    size_t len = sizeof m.endpoint;
    zmq_getsockopt(m.sock, ZMQ_LAST_ENDPOINT, m.endpoint, &len);
    pthread_t th;
    pthread_create(&th, NULL, mover_main, &m);

    kvs_client *c = connect_to(m.endpoint, 5000, 0);
    /* created on the owner; later calls for mv1 go straight there */
    OK(c, kvs_client_session_create(c, "mv1", NULL, NULL));
    OK(c, kvs_client_append(c, "mv1", "moved 1", 7, NULL));
    struct kvs_client_session_info in;
    OK(c, kvs_client_session_info(c, "mv1", &in));
    ck_assert_int_eq(in.version, 1);
    ck_assert_int_eq(atomic_load(&m.seen_mv), 1);
    OK(c, kvs_client_ping(c, NULL)); /* no session: home */
    ck_assert_str_eq(kvs_client_endpoint(c), m.endpoint);
    /* MOVED without an owner, and a redirect loop, end with MOVED */
    FAILS(c, KVS_MOVED, kvs_client_session_info(c, "noowner", &in));
    FAILS(c, KVS_MOVED, kvs_client_session_info(c, "loop", &in));
    ck_assert_int_eq(atomic_load(&m.seen_loop), 5); /* the first try + 4 redirects */
    OK(c, kvs_client_session_close(c, "mv1"));
    ck_assert_int_eq(atomic_load(&m.seen_mv), 1);
    /* replies that are not protocol are refused, allocate nothing, and leave the client good */
    FAILS(c, KVS_BAD_FORMAT, kvs_client_session_info(c, "bad-frames", &in));
    FAILS(c, KVS_BAD_FORMAT, kvs_client_session_info(c, "bad-bomb", &in));
    FAILS(c, KVS_BAD_FORMAT, kvs_client_session_info(c, "bad-reserved", &in));
    OK(c, kvs_client_ping(c, NULL));
    kvs_client_destroy(&c);

    atomic_store(&m.stop, 1);
    pthread_join(th, NULL);
    int zero = 0;
    zmq_setsockopt(m.sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_close(m.sock);
    zmq_ctx_term(m.ctx);
}
END_TEST

/* ---- bad arguments --------------------------------------------------------------------------- */

START_TEST(test_bad_arguments)
{
    kvs_client *c = connect_to(g_shared.endpoint, 30000, 0);
    struct kvs_client_session_info in;
    struct kvs_client_answer a = {0};
    char long_name[200];
    memset(long_name, 'a', sizeof long_name - 1);
    long_name[sizeof long_name - 1] = '\0';
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_session_create(c, NULL, NULL, NULL));
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_session_create(c, "", NULL, NULL));
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_session_create(c, "bad name", NULL, NULL));
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_session_create(c, ".hidden", NULL, NULL));
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_session_create(c, long_name, NULL, NULL));
    FAILS(c, KVS_INVALID_ARGUMENT,
          kvs_client_session_create(c, "ok", &(struct kvs_client_session_opts){.cells = -1},
                                    NULL));
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_session_info(c, "x/y", &in));
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_session_info(c, "ok", NULL));
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_append(c, "ok", "", 0, NULL));
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_append(c, "ok", NULL, 3, NULL));
    const int32_t neg[2] = {5, -1};
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_append_tokens(c, "ok", neg, 2, NULL));
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_append_tokens(c, "ok", neg, 0, NULL));
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_query(c, "ok", "", NULL, NULL, NULL, &a));
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_query(c, "ok", "q?", NULL, NULL, NULL, NULL));
    FAILS(c, KVS_INVALID_ARGUMENT,
          kvs_client_query(c, "ok", "q?", &(struct kvs_client_query_opts){.max_tokens = 5000},
                           NULL, NULL, &a));
    FAILS(c, KVS_INVALID_ARGUMENT,
          kvs_client_query(c, "ok", "q?", &(struct kvs_client_query_opts){.temperature = -1},
                           NULL, NULL, &a));
    const char *stops[9] = {"a", "b", "c", "d", "e", "f", "g", "h", "i"};
    FAILS(c, KVS_INVALID_ARGUMENT,
          kvs_client_query(c, "ok", "q?",
                           &(struct kvs_client_query_opts){.stops = stops, .n_stops = 9}, NULL,
                           NULL, &a));
    const char *empty_stop[1] = {""};
    FAILS(c, KVS_INVALID_ARGUMENT,
          kvs_client_query(c, "ok", "q?",
                           &(struct kvs_client_query_opts){.stops = empty_stop, .n_stops = 1},
                           NULL, NULL, &a));
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_flash_register(c, "ok", "bad name", "q?", NULL));
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_flash_register(c, "ok", long_name, "q?", NULL));
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_flash_register(c, "ok", "n", NULL, NULL));
    FAILS(c, KVS_INVALID_ARGUMENT,
          kvs_client_flash_register(c, "ok", "n", "q?",
                                    &(struct kvs_client_flash_opts){.every_tokens = -1}));
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_flash_get(c, "ok", "", false, &a));
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_session_list(c, NULL, NULL));
    /* values only the worker can judge come back with its code and message */
    FAILS(c, KVS_NOT_FOUND, kvs_client_session_info(c, "never-created", &in));
    ck_assert(strstr(kvs_client_error(c), "never-created") != NULL);
    OK(c, kvs_client_session_create(c, "ba1", &(struct kvs_client_session_opts){.cells = 64},
                                    NULL));
    const int32_t huge[1] = {1 << 30};
    FAILS(c, KVS_INVALID_ARGUMENT, kvs_client_append_tokens(c, "ba1", huge, 1, NULL));
    FAILS(c, KVS_INVALID_ARGUMENT,
          kvs_client_session_create(c, "ba2", &(struct kvs_client_session_opts){.cells = 1 << 20},
                                    NULL));
    ck_assert(strstr(kvs_client_error(c), "budget") != NULL); /* the worker's own reason */
    /* nothing above reached a session, and the client still works */
    OK(c, kvs_client_session_info(c, "ba1", &in));
    ck_assert_int_eq(in.appends, 0);
    OK(c, kvs_client_session_close(c, "ba1"));
    ck_assert_ptr_null(a.text);
    kvs_client_destroy(&c);
}
END_TEST

/* ---- CURVE (PROTOCOL.md section 1) ---------------------------------------------------------- */

START_TEST(test_curve)
{
    char pub[41], sec[41], wrong[41], wrong_sec[41], path[600], dir[600];
    ck_assert_int_eq(zmq_curve_keypair(pub, sec), 0);
    ck_assert_int_eq(zmq_curve_keypair(wrong, wrong_sec), 0);
    snprintf(path, sizeof path, "%s/server.key", g_tmp);
    FILE *f = fopen(path, "w");
    ck_assert(f != NULL && fprintf(f, "%s\n", sec) > 0 && fclose(f) == 0);
    snprintf(dir, sizeof dir, "%s/curve", g_tmp);
    struct worker w = {.curve_secret = path};
    ck_assert_int_eq(worker_start(&w, "tcp://127.0.0.1:0", dir), 0);
    /* the right server key: every call works (home socket), with a fresh client key pair */
    struct kvs_client_opts o = {.timeout_ms = 30000, .connect_timeout_ms = 10000,
                                .curve_server_key = pub};
    kvs_client *c = NULL;
    char err[256] = "";
    ck_assert_msg(kvs_client_connect(w.endpoint, &o, &c, err, sizeof err) == 0, "%s", err);
    OK(c, kvs_client_ping(c, NULL));
    OK(c, kvs_client_session_create(c, "cv", NULL, NULL));
    OK(c, kvs_client_append(c, "cv", "AAPL 189.2", 10, NULL));
    kvs_client_destroy(&c);
    /* a wrong server key, or none: no answer */
    o.connect_timeout_ms = 500;
    o.curve_server_key = wrong;
    ck_assert_int_eq(kvs_client_connect(w.endpoint, &o, &c, err, sizeof err), KVS_TIMEOUT);
    o.curve_server_key = NULL;
    ck_assert_int_eq(kvs_client_connect(w.endpoint, &o, &c, err, sizeof err), KVS_TIMEOUT);
    /* a key that is no key */
    o.curve_server_key = "short";
    ck_assert_int_eq(kvs_client_connect(w.endpoint, &o, &c, err, sizeof err),
                     KVS_INVALID_ARGUMENT);
    ck_assert_ptr_null(c);
    ck_assert_int_eq(worker_stop(&w, SIGTERM), 0);
}
END_TEST

int main(void)
{
    snprintf(g_model, sizeof g_model, "%s", kvs_test_default_model());
    if (access(g_model, R_OK) != 0) {
        fprintf(stderr, "test_client: the default model %s is missing (scripts/setup.sh fetches "
                        "it): skipped\n",
                g_model);
        return 77;
    }
    const char *bin = getenv("KVS_WORKER");
    snprintf(g_worker_bin, sizeof g_worker_bin, "%s", bin != NULL ? bin : KVS_WORKER_BIN);
    if (access(g_worker_bin, X_OK) != 0) {
        fprintf(stderr, "test_client: no kvs-worker at %s (build the kvs-worker target)\n",
                g_worker_bin);
        return 1;
    }
    snprintf(g_tmp, sizeof g_tmp, "/tmp/kvs-test-client-XXXXXX");
    if (mkdtemp(g_tmp) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    char dir[600];
    snprintf(dir, sizeof dir, "%s/shared", g_tmp);
    if (worker_start(&g_shared, "tcp://127.0.0.1:0", dir) != 0) {
        fprintf(stderr, "test_client: kvs-worker did not start (see %s.log)\n", dir);
        return 1;
    }
    Suite *su = suite_create("client");
    TCase *tc = tcase_create("client");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_connect_ping_status);
    tcase_add_test(tc, test_session_calls);
    tcase_add_test(tc, test_query);
    tcase_add_test(tc, test_flash);
    tcase_add_test(tc, test_watch);
    tcase_add_test(tc, test_quiet_watch_is_renewed);
    tcase_add_test(tc, test_watch_resumes_after_restart);
    tcase_add_test(tc, test_timeout_on_stopped_worker);
    tcase_add_test(tc, test_retried_append_applied_once);
    tcase_add_test(tc, test_reconnect_after_restart);
    tcase_add_test(tc, test_moved_is_followed);
    tcase_add_test(tc, test_bad_arguments);
    tcase_add_test(tc, test_curve);
    suite_add_tcase(su, tc);
    SRunner *sr = srunner_create(su);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    kill(g_shared.pid, SIGCONT); /* in case a test died with it stopped */
    int wrc = worker_stop(&g_shared, SIGTERM);
    if (wrc != 0) {
        fprintf(stderr, "test_client: the shared worker exited %d after SIGTERM\n", wrc);
        failed++;
    }
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_tmp);
    if (failed == 0 && system(cmd) != 0) {
        fprintf(stderr, "test_client: could not remove %s\n", g_tmp);
    }
    return failed == 0 ? 0 : 1;
}
