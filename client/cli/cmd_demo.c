/* kvstream demo: the streaming workload end to end, through a real single-node cluster.
 *
 * The demo starts `kvstream up` as a child process on a free loopback port (or, with
 * --endpoint, uses a cluster that is already running) and then does everything over the wire
 * with libkvstream, as an application would:
 *
 *   - a deterministic synthetic market feed of four symbols (text lines "SYMBOL PRICE
 *     CHANGE vol=VOLUME"), one tick every 1/rate seconds;
 *   - one session per symbol (aapl, msft, nvda, goog), each fed by a thread of its own with
 *     its own kvs_client, so the worker's scheduler batches appends of several sessions
 *     with the questions and the flash-query work;
 *   - two flash queries per session (the symbol's latest price, the direction of its last
 *     move), re-evaluated by the worker after every append; one more thread watches the
 *     first session's answers as the worker pushes them;
 *   - every --ask-every ticks the main thread (its own client) reads each session's flash
 *     answers with flash get (fresh = a hit: the answer was ready when asked) and asks a
 *     direct question, streamed, timing the first token.
 *
 * A live table shows one row per session and round; a summary follows: appends and their
 * latency, the flash hit rate and latency, question TTFT, the stateful vs stateless
 * (re-prefill) TTFT at the final context, and the worker's scheduler metrics. The model's
 * answers are printed next to the feed's true values at the version each answer saw.
 */
#include "client/cli/cmd.h"
#include "client/cli/demo.h"
#include "client/cli/remote.h"

#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CMD "demo"
#define N_SYMS 4
#define N_DESKS N_SYMS        /* one session per symbol */
#define UP_TIMEOUT_S 120.0    /* default --start-timeout: the worker's start, model load included */
#define CALL_TIMEOUT_MS 60000 /* per attempt of a client call */
#define STATUS_TIMEOUT_MS 5000
#define CLOSE_TIMEOUT_MS 10000 /* a close waits for the work in progress to finish */
#define MAX_SAMPLES 4096       /* latencies kept for the quantiles */
#define PREFIX "Live market feed. Each line is: SYMBOL PRICE CHANGE vol=VOLUME.\n"

enum {
    OPT_TICKS = KVS_CLI_OPT_FIRST_LOCAL,
    OPT_RATE,
    OPT_ASK_EVERY,
    OPT_SEED,
    OPT_DEVICE,
    OPT_DATA_DIR,
    OPT_START_TIMEOUT,
};

static const char *const SYMS[N_SYMS] = {"AAPL", "MSFT", "NVDA", "GOOG"};

struct tick {
    int sym;       /* index into SYMS */
    double price;  /* the symbol's price after this tick */
    double move;   /* its change */
    char line[64]; /* the record appended */
};

/* One session of the demo (a symbol's ticks) and the thread that feeds it. */
struct desk {
    char name[8];   /* the symbol in lower case */
    int sym;        /* index into SYMS */
    int32_t *ticks; /* indexes into the feed of its ticks, in order */
    int32_t n_ticks;
    struct demo *d;
    pthread_t thread;
    kvs_client *client; /* the feeder's */
    /* written by the feeder under d->mu */
    int32_t n_appended;
    double *append_ms;  /* latency of each append (n_appended of them) */
    double *acked_at;   /* when each append was acknowledged (now_s) */
    uint64_t *versions; /* the session's version after each append (a slide adds one) */
    double row_ms;      /* append latency summed since the last table row */
    int32_t row_n;
    double max_lag_s; /* how late an acknowledgement came after its tick was due */
    int failed;       /* a status, or 0 */
    char err[256];
};

/* The numbers of the summary, gathered by the main thread. */
struct totals {
    int32_t flash_gets, flash_hits;
    double flash_ms[MAX_SAMPLES]; /* latency of each flash get (the first MAX_SAMPLES) */
    int32_t questions;
    double ttft_ms[MAX_SAMPLES]; /* client-measured time to the first streamed piece */
    int32_t answers, answers_true;
    double occupancy_sum, seqs_sum;
    int32_t samples;
};

struct demo {
    const struct tick *feed;
    int32_t n_ticks;
    double rate; /* ticks per second */
    double t0;   /* when tick 0 was due (now_s) */
    const char *endpoint;
    struct desk desks[N_DESKS];
    pthread_mutex_t mu;               /* desks' stats; the client list below */
    kvs_client *clients[N_DESKS + 2]; /* cancelled when a signal comes */
    atomic_int stop;                  /* the signal that came (or -1: a feeder failed), 0 = none */
    atomic_int done;                  /* tells the signal thread to end */
    const struct kvs_demo_up *up;     /* the cluster we started, or NULL */
    atomic_int child;                 /* its pid while it should run, else 0 */
    /* the watcher of the first session's flash answers */
    kvs_client *watch_client;
    pthread_t watch_thread;
    int watch_rc;
    int32_t pushes;      /* answers pushed (under mu) */
    double push_delay_s; /* summed: push time - the append's acknowledgement */
    int32_t push_delays;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvstream demo [-m MODEL] [-t THREADS] [--device DEV] [--data-dir DIR]\n"
            "                     [--start-timeout S] [--ticks N] [--rate R] [--ask-every N]\n"
            "                     [--seed S]\n"
            "       kvstream demo --endpoint EP [--ticks N] [--rate R] [--ask-every N] [--seed S]\n"
            "\n"
            "Start a single-node cluster (kvstream up on a free loopback port), stream a\n"
            "synthetic market feed into four sessions (one per symbol), keep two flash queries\n"
            "per session fresh, ask questions while the context grows, print a live table and\n"
            "a summary, and stop the cluster. Everything goes over the wire through libkvstream.\n"
            "\n"
            "  -m, --model PATH       GGUF model (default: the cached SmolLM2-135M-Instruct)\n"
            "  -t, --threads N        the worker's CPU threads (default: all)\n"
            "      --device DEV       cpu (default), cuda or cuda:N\n"
            "      --data-dir DIR     the worker's session logs (default: a temporary directory)\n"
            "      --start-timeout S  seconds the worker may take to come up (default 120)\n"
            "  -e, --endpoint EP      use the cluster running at EP instead of starting one\n"
            "      --ticks N          ticks to stream, 1..100000 (default 160)\n"
            "      --rate R           ticks per second, 0.1..1000 (default 2)\n"
            "      --ask-every N      ask every N ticks (default 20)\n"
            "      --seed S           feed seed (default 7)\n"
            "  -h, --help             this help\n"
            "\n"
            "The sessions (aapl, msft, nvda, goog) get 3/16 of the worker's cells each and\n"
            "slide (evict their oldest ticks) when full; they are closed at the end (with\n"
            "--endpoint they must not exist yet). Exit status: 0 done, 1 a failure, 2 a bad\n"
            "command line, 3 no answer from the endpoint, 5 a session exists already;\n"
            "128 + the signal when interrupted.\n");
}

/* ---- the feed ----------------------------------------------------------------------------- */

struct rng {
    uint64_t state;
};

static uint32_t rnd(struct rng *r)
{
    r->state = r->state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(r->state >> 33);
}

/* n ticks of the deterministic feed of seed (the same lines for the same seed). */
static struct tick *make_feed(long seed, int32_t n)
{
    struct tick *t = calloc((size_t)n, sizeof *t);
    if (t == NULL) {
        return NULL;
    }
    struct rng r = {.state = (uint64_t)seed * 2654435761u + 1};
    double price[N_SYMS] = {189.20, 411.10, 875.00, 141.80};
    for (int32_t k = 0; k < n; k++) {
        int s = (int)(rnd(&r) % N_SYMS);
        double move = ((double)(rnd(&r) % 201) - 100.0) / 100.0; /* -1.00 .. +1.00 */
        price[s] += move;
        int vol = 100 + (int)(rnd(&r) % 5000);
        t[k].sym = s;
        t[k].price = price[s];
        t[k].move = move;
        snprintf(t[k].line, sizeof t[k].line, "%s %.2f %+.2f vol=%d", SYMS[s], price[s], move, vol);
    }
    return t;
}

/* Which of desk k's appends brought its session to version: an index into k->ticks, or -1
 * (none yet). An answer may have seen an append whose acknowledgement the feeder has not
 * recorded yet: those count one version each. Call with d->mu held. */
static int32_t append_at(const struct desk *k, uint64_t version)
{
    int32_t lo = 0, hi = k->n_appended; /* the first append whose version > version */
    while (lo < hi) {
        int32_t mid = lo + (hi - lo) / 2;
        if (k->versions[mid] <= version) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    uint64_t last = k->n_appended > 0 ? k->versions[k->n_appended - 1] : 0;
    if (lo == k->n_appended && version > last) {
        int64_t i = (int64_t)lo - 1 + (int64_t)(version - last);
        return (int32_t)(i < k->n_ticks ? i : k->n_ticks - 1);
    }
    return lo - 1;
}

/* The tick that brought desk k's session to version; NULL before its first. */
static const struct tick *tick_at(const struct desk *k, uint64_t version)
{
    int32_t i = append_at(k, version);
    return i >= 0 ? &k->d->feed[k->ticks[i]] : NULL;
}

/* ---- stopping ----------------------------------------------------------------------------- */

static bool stopping(struct demo *d)
{
    return atomic_load(&d->stop) != 0;
}

/* Sleep until now_s() >= t; false when the demo is stopping. */
static bool sleep_until(struct demo *d, double t)
{
    for (;;) {
        if (stopping(d)) {
            return false;
        }
        double left = t - now_s();
        if (left <= 0) {
            return true;
        }
        usleep((useconds_t)(fmin(left, 0.1) * 1e6));
    }
}

static void stop_all(struct demo *d, int why)
{
    int none = 0;
    atomic_compare_exchange_strong(&d->stop, &none, why);
    pthread_mutex_lock(&d->mu);
    for (int i = 0; i < N_DESKS + 2; i++) {
        if (d->clients[i] != NULL) {
            kvs_client_cancel(d->clients[i]); /* its call in progress returns now */
        }
    }
    pthread_mutex_unlock(&d->mu);
}

/* SIGINT and SIGTERM are blocked in every thread and taken here. */
static void *signal_main(void *arg)
{
    struct demo *d = arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    const struct timespec tick = {.tv_sec = 0, .tv_nsec = 100 * 1000 * 1000};
    while (!atomic_load(&d->done)) {
        int sig = sigtimedwait(&set, NULL, &tick);
        if (sig > 0) {
            if (!stopping(d)) {
                fprintf(stderr, "kvstream demo: %s: stopping\n", strsignal(sig));
            }
            stop_all(d, sig);
        }
        /* the cluster we started must not die under us (WNOWAIT: stop reaps it) */
        siginfo_t info = {0};
        int pid = atomic_load(&d->child);
        if (pid > 0 && !stopping(d) &&
            waitid(P_PID, (id_t)pid, &info, WEXITED | WNOHANG | WNOWAIT) == 0 &&
            info.si_pid == pid) {
            char why[512];
            kvs_demo_up_reason(d->up, why, sizeof why);
            kvs_cli_error(CMD, "the cluster (kvstream up, pid %d) exited under us (%s %d)%s%s",
                          pid, info.si_code == CLD_EXITED ? "status" : "signal", info.si_status,
                          why[0] != '\0' ? ": " : "", why);
            stop_all(d, -2);
        }
    }
    return NULL;
}

/* Connect a client of the demo; it is cancelled when a signal comes (slot < N_DESKS + 2). */
static int connect_client(struct demo *d, int slot, kvs_client **c, char *err, size_t errlen)
{
    struct kvs_client_opts o = {.timeout_ms = CALL_TIMEOUT_MS, .name = "kvstream-demo"};
    int rc = kvs_client_connect(d->endpoint, &o, c, err, errlen);
    if (rc == 0) {
        pthread_mutex_lock(&d->mu);
        d->clients[slot] = *c;
        pthread_mutex_unlock(&d->mu);
    }
    return rc;
}

static void destroy_client(struct demo *d, kvs_client **c)
{
    pthread_mutex_lock(&d->mu);
    for (int i = 0; i < N_DESKS + 2; i++) {
        if (d->clients[i] == *c) {
            d->clients[i] = NULL;
        }
    }
    pthread_mutex_unlock(&d->mu);
    kvs_client_destroy(c);
}

/* ---- the threads -------------------------------------------------------------------------- */

/* A feeder: append its desk's ticks as they become due. */
static void *feed_main(void *arg)
{
    struct desk *k = arg;
    struct demo *d = k->d;
    for (int32_t i = 0; i < k->n_ticks; i++) {
        const struct tick *t = &d->feed[k->ticks[i]];
        double due = d->t0 + (double)k->ticks[i] / d->rate;
        if (!sleep_until(d, due)) {
            break;
        }
        double t1 = now_s();
        struct kvs_client_append_result r;
        int rc = kvs_client_append(k->client, k->name, t->line, strlen(t->line), &r);
        double t2 = now_s();
        if (rc < 0) {
            if (!stopping(d)) {
                pthread_mutex_lock(&d->mu);
                k->failed = rc;
                snprintf(k->err, sizeof k->err, "append to %s: %s", k->name,
                         kvs_client_error(k->client));
                pthread_mutex_unlock(&d->mu);
                stop_all(d, -1);
            }
            break;
        }
        pthread_mutex_lock(&d->mu);
        k->append_ms[k->n_appended] = (t2 - t1) * 1e3;
        k->acked_at[k->n_appended] = t2;
        k->versions[k->n_appended] = r.version;
        k->n_appended++;
        k->row_ms += (t2 - t1) * 1e3;
        k->row_n++;
        k->max_lag_s = fmax(k->max_lag_s, t2 - due);
        pthread_mutex_unlock(&d->mu);
    }
    return NULL;
}

static bool on_push(const struct kvs_client_answer *a, void *user)
{
    struct demo *d = user;
    const struct desk *k = &d->desks[0];
    double t = now_s();
    pthread_mutex_lock(&d->mu);
    d->pushes++;
    int32_t i = append_at(k, a->version);
    if (i >= 0 && i < k->n_appended && t >= k->acked_at[i]) {
        d->push_delay_s += t - k->acked_at[i];
        d->push_delays++;
    }
    pthread_mutex_unlock(&d->mu);
    return true;
}

/* The watcher: the first session's flash answers as the worker pushes them, until cancelled. */
static void *watch_main(void *arg)
{
    struct demo *d = arg;
    d->watch_rc = kvs_client_flash_watch(d->watch_client, d->desks[0].name, NULL,
                                         KVS_CLIENT_WATCH_NEW, on_push, d);
    return NULL;
}

/* ---- questions ---------------------------------------------------------------------------- */

struct first_piece {
    double t_sent, ttft_s; /* now_s() at the call; seconds to the first piece (-1: none yet) */
};

static bool on_piece(int32_t token, const char *text, size_t len, void *user)
{
    struct first_piece *f = user;
    if (f->ttft_s < 0) {
        f->ttft_s = now_s() - f->t_sent;
    }
    return true;
}

/* Ask question of session, streamed; the client-measured TTFT in *ttft_ms. */
static int ask(kvs_client *c, const char *session, const char *question, int32_t max_tokens,
               bool stateless, struct kvs_client_answer *a, double *ttft_ms)
{
    struct kvs_client_query_opts q = {.max_tokens = max_tokens, .stateless = stateless};
    struct first_piece f = {.t_sent = now_s(), .ttft_s = -1};
    int rc = kvs_client_query(c, session, question, &q, on_piece, &f, a);
    *ttft_ms = (f.ttft_s >= 0 ? f.ttft_s : now_s() - f.t_sent) * 1e3;
    return rc;
}

/* The first n_words words of an answer, printable ASCII only, into out. */
static void words(const char *text, int n_words, char *out, size_t size)
{
    size_t o = 0;
    const char *p = text;
    while (*p == ' ' || *p == '\n' || *p == '\t') {
        p++;
    }
    for (int w = 0; *p != '\0' && o + 1 < size; p++) {
        if (*p == ' ' || *p == '\n' || *p == '\t') {
            if (++w == n_words) {
                break;
            }
            while (p[1] == ' ' || p[1] == '\n' || p[1] == '\t') {
                p++;
            }
            out[o++] = ' ';
        } else {
            out[o++] = *p >= 0x20 && *p < 0x7f ? *p : '?';
        }
    }
    while (o > 0 && strchr(".,;", out[o - 1]) != NULL) {
        o--;
    }
    out[o] = '\0';
}

static const char *direction(double move)
{
    return move > 0 ? "up" : move < 0 ? "down" : "flat";
}

static void price_question(int sym, char *q, size_t size)
{
    snprintf(q, size, "Question: what is the latest price of %s?\nAnswer: %s", SYMS[sym],
             SYMS[sym]);
}

static void move_question(int sym, char *q, size_t size)
{
    snprintf(q, size, "Question: did %s go up or down last?\nAnswer: %s went", SYMS[sym],
             SYMS[sym]);
}

static void tick_question(int sym, char *q, size_t size)
{
    snprintf(q, size, "Question: what was the last tick of %s?\nAnswer: %s", SYMS[sym], SYMS[sym]);
}

/* Create desk k's session and register its flash queries. A status. */
static int setup_desk(kvs_client *c, struct desk *k, int64_t cells)
{
    struct kvs_client_session_opts so = {.prefix = PREFIX, .cells = cells, .slide = true};
    int rc = kvs_client_session_create(c, k->name, &so, NULL);
    char q[160];
    struct kvs_client_flash_opts fo = {.query = {.max_tokens = 7}}; /* " 189.20" */
    if (rc == 0) {
        price_question(k->sym, q, sizeof q);
        rc = kvs_client_flash_register(c, k->name, "price", q, &fo);
    }
    if (rc == 0) {
        move_question(k->sym, q, sizeof q);
        fo.query.max_tokens = 2; /* " up" */
        rc = kvs_client_flash_register(c, k->name, "move", q, &fo);
    }
    return rc;
}

/* One table row: desk k's flash answers, and a direct question. */
static int ask_row(struct demo *d, kvs_client *c, struct desk *k, int32_t tick, struct totals *t)
{
    struct kvs_client_answer fp = {0}, fm = {0}, qa = {0};
    double t1 = now_s();
    int rc = kvs_client_flash_get(c, k->name, "price", true, &fp);
    double t2 = now_s();
    if (rc == 0) {
        rc = kvs_client_flash_get(c, k->name, "move", true, &fm);
    }
    double t3 = now_s();
    char q[160];
    double ttft_ms = 0;
    tick_question(k->sym, q, sizeof q);
    if (rc == 0) {
        rc = ask(c, k->name, q, 12, false, &qa, &ttft_ms);
    }
    if (rc < 0) {
        goto out;
    }
    int hits = (int)fp.fresh + (int)fm.fresh;
    double fms[2] = {(t2 - t1) * 1e3, (t3 - t2) * 1e3};
    for (int i = 0; i < 2; i++) {
        if (t->flash_gets < MAX_SAMPLES) {
            t->flash_ms[t->flash_gets] = fms[i];
        }
        t->flash_gets++;
    }
    t->flash_hits += hits;
    if (t->questions < MAX_SAMPLES) {
        t->ttft_ms[t->questions] = ttft_ms;
    }
    t->questions++;

    pthread_mutex_lock(&d->mu);
    double append_ms = k->row_n > 0 ? k->row_ms / k->row_n : 0;
    k->row_ms = 0;
    k->row_n = 0;
    pthread_mutex_unlock(&d->mu);

    /* the model's answers, and the feed's values at the version each one saw */
    char a1[24], a2[24], a3[32], v1[24] = "-", v2[24] = "-", v3[32] = "-";
    words(fp.text, 1, a1, sizeof a1);
    words(fm.text, 1, a2, sizeof a2);
    words(qa.text, 2, a3, sizeof a3);
    pthread_mutex_lock(&d->mu);
    const struct tick *tp = tick_at(k, fp.version), *tm = tick_at(k, fm.version);
    const struct tick *tq = tick_at(k, qa.version);
    pthread_mutex_unlock(&d->mu);
    if (tp != NULL) {
        snprintf(v1, sizeof v1, "%.2f", tp->price);
    }
    if (tm != NULL) {
        snprintf(v2, sizeof v2, "%s", direction(tm->move));
    }
    if (tq != NULL) {
        snprintf(v3, sizeof v3, "%.2f %+.2f", tq->price, tq->move);
    }
    t->answers += 3;
    t->answers_true += (strcmp(a1, v1) == 0) + (strcmp(a2, v2) == 0) + (strcmp(a3, v3) == 0);
    char price[64], move[64]; /* "a1 [v1]": two 24-byte fields and 3 more */
    snprintf(price, sizeof price, "%s [%s]", a1, v1);
    snprintf(move, sizeof move, "%s [%s]", a2, v2);
    printf("%6d  %-7s %7lld %9.1f  %d/2 %9.2f %8.1f  %-17s %-12s %s [%s]\n", (int)tick, k->name,
           (long long)qa.context_tokens, append_ms, hits, (fms[0] + fms[1]) / 2, ttft_ms, price,
           move, a3, v3);
    fflush(stdout);
out:
    kvs_client_answer_free(&fp);
    kvs_client_answer_free(&fm);
    kvs_client_answer_free(&qa);
    return rc;
}

static void sample_scheduler(struct demo *d, struct totals *t)
{
    struct kvs_demo_sched s;
    char err[256];
    if (kvs_demo_sched_status(d->endpoint, STATUS_TIMEOUT_MS, &s, err, sizeof err) == 0) {
        t->occupancy_sum += s.occupancy;
        t->seqs_sum += (double)s.last_n_seqs;
        t->samples++;
    }
}

/* ---- the summary -------------------------------------------------------------------------- */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The p-quantile (0..1) of v[0..n), sorted in place. */
static double quantile(double *v, int32_t n, double p)
{
    if (n <= 0) {
        return 0;
    }
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    int32_t i = (int32_t)ceil(p * n) - 1;
    return v[i < 0 ? 0 : i >= n ? n - 1 : i];
}

static double mean(const double *v, int32_t n)
{
    double s = 0;
    for (int32_t i = 0; i < n; i++) {
        s += v[i];
    }
    return n > 0 ? s / n : 0;
}

static void print_appends(struct demo *d)
{
    int32_t n = 0;
    double max_lag = 0;
    for (int i = 0; i < N_DESKS; i++) {
        n += d->desks[i].n_appended;
        max_lag = fmax(max_lag, d->desks[i].max_lag_s);
    }
    double *all = malloc(sizeof *all * (size_t)(n > 0 ? n : 1));
    if (all == NULL) {
        return;
    }
    int32_t j = 0;
    for (int i = 0; i < N_DESKS; i++) {
        memcpy(all + j, d->desks[i].append_ms, sizeof *all * (size_t)d->desks[i].n_appended);
        j += d->desks[i].n_appended;
    }
    double m = mean(all, n), p99 = quantile(all, n, 0.99);
    printf("  appends      %d into %d sessions, latency mean %.1f ms, p99 %.1f ms; "
           "acknowledged at most %.2f s after the tick was due\n",
           (int)n, N_DESKS, m, p99, max_lag);
    free(all);
}

static void print_baseline(struct demo *d, kvs_client *c)
{
    const struct desk *k = &d->desks[0]; /* the largest context */
    for (int i = 1; i < N_DESKS; i++) {
        if (d->desks[i].n_appended > k->n_appended) {
            k = &d->desks[i];
        }
    }
    char q[160];
    tick_question(k->sym, q, sizeof q);
    struct kvs_client_answer sf = {0}, sl = {0};
    double sf_ms = 0, sl_ms = 0;
    int rc = ask(c, k->name, q, 8, false, &sf, &sf_ms);
    if (rc == 0) {
        rc = ask(c, k->name, q, 8, true, &sl, &sl_ms);
    }
    if (rc == 0) {
        bool same = sf.len == sl.len && memcmp(sf.text, sl.text, sf.len) == 0;
        printf("  baseline     %s at %lld context tokens: stateful TTFT %.1f ms, stateless "
               "(re-prefill) TTFT %.1f ms: %.0fx, %s\n",
               k->name, (long long)sf.context_tokens, sf_ms, sl_ms, sf_ms > 0 ? sl_ms / sf_ms : 0.0,
               same ? "same answer" : "ANSWERS DIFFER");
    } else if (!stopping(d)) {
        printf("  baseline     failed: %s\n", kvs_client_error(c));
    }
    kvs_client_answer_free(&sf);
    kvs_client_answer_free(&sl);
}

static void print_scheduler(struct demo *d, const struct totals *t)
{
    struct kvs_demo_sched s;
    char err[256];
    if (kvs_demo_sched_status(d->endpoint, STATUS_TIMEOUT_MS, &s, err, sizeof err) < 0) {
        printf("  scheduler    (no metrics: %s)\n", err);
        return;
    }
    uint64_t rows = s.rows[KVS_DEMO_DECODE] + s.rows[KVS_DEMO_QUESTION] + s.rows[KVS_DEMO_APPEND] +
                    s.rows[KVS_DEMO_FLASH];
    printf("  scheduler    %llu steps, %.1f rows per step; batch occupancy %.2f, %.1f sequences "
           "per step (means of %d samples), at most %lld in one step; %d worker%s\n",
           (unsigned long long)s.steps, s.steps > 0 ? (double)rows / (double)s.steps : 0.0,
           t->samples > 0 ? t->occupancy_sum / t->samples : 0.0,
           t->samples > 0 ? t->seqs_sum / t->samples : 0.0, (int)t->samples,
           (long long)s.max_n_seqs, (int)s.n_workers, s.n_workers == 1 ? "" : "s");
    printf("  rows         decode %llu, question %llu, append %llu, flash %llu\n",
           (unsigned long long)s.rows[KVS_DEMO_DECODE],
           (unsigned long long)s.rows[KVS_DEMO_QUESTION],
           (unsigned long long)s.rows[KVS_DEMO_APPEND], (unsigned long long)s.rows[KVS_DEMO_FLASH]);
    printf("  flash evals  %llu computed, %llu wasted (their session moved on before they "
           "completed)\n",
           (unsigned long long)s.flash_evaluations, (unsigned long long)s.flash_wasted);
}

static void print_summary(struct demo *d, kvs_client *c, struct totals *t, double wall_s)
{
    printf("\nsummary: %d ticks in %.1f s\n", (int)d->n_ticks, wall_s);
    print_appends(d);
    int32_t nf = t->flash_gets < MAX_SAMPLES ? t->flash_gets : MAX_SAMPLES;
    double fm = mean(t->flash_ms, nf), f99 = quantile(t->flash_ms, nf, 0.99);
    printf("  flash gets   %d, %d fresh when asked: hit rate %.0f%%, latency mean %.2f ms, "
           "p99 %.2f ms\n",
           (int)t->flash_gets, (int)t->flash_hits,
           t->flash_gets > 0 ? 100.0 * t->flash_hits / t->flash_gets : 0.0, fm, f99);
    if (d->watch_rc == 0) {
        printf("  flash watch  %s: %d answers pushed, %.0f ms after their append on average\n",
               d->desks[0].name, (int)d->pushes,
               d->push_delays > 0 ? d->push_delay_s / d->push_delays * 1e3 : 0.0);
    } else {
        printf("  flash watch  %s: ended with %s\n", d->desks[0].name,
               kvs_status_name(d->watch_rc));
    }
    int32_t nq = t->questions < MAX_SAMPLES ? t->questions : MAX_SAMPLES;
    double qm = mean(t->ttft_ms, nq), q50 = quantile(t->ttft_ms, nq, 0.5);
    double q99 = quantile(t->ttft_ms, nq, 0.99);
    printf("  questions    %d, TTFT mean %.1f ms, p50 %.1f ms, p99 %.1f ms\n", (int)t->questions,
           qm, q50, q99);
    printf("  answers      %d/%d of the model's equal to the feed's values\n", (int)t->answers_true,
           (int)t->answers);
    print_baseline(d, c);
    print_scheduler(d, t);
}

/* ---- the command -------------------------------------------------------------------------- */

struct demo_args {
    const char *model, *threads, *device, *data_dir, *endpoint;
    long ticks, ask_every, seed;
    double rate;
    double start_timeout_s;
};

/* KVS_EXIT_OK, or the exit code of a bad command line (message printed); -1 for --help. */
static int parse_args(int argc, char **argv, struct demo_args *a)
{
    static const struct option longopts[] = {
        {"model", required_argument, NULL, 'm'},
        {"threads", required_argument, NULL, 't'},
        {"endpoint", required_argument, NULL, 'e'},
        {"device", required_argument, NULL, OPT_DEVICE},
        {"data-dir", required_argument, NULL, OPT_DATA_DIR},
        {"ticks", required_argument, NULL, OPT_TICKS},
        {"rate", required_argument, NULL, OPT_RATE},
        {"ask-every", required_argument, NULL, OPT_ASK_EVERY},
        {"seed", required_argument, NULL, OPT_SEED},
        {"start-timeout", required_argument, NULL, OPT_START_TIMEOUT},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    *a = (struct demo_args){
        .ticks = 160, .ask_every = 20, .seed = 7, .rate = 2, .start_timeout_s = UP_TIMEOUT_S};
    long v;
    float f;
    int c;
    optind = 0;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":m:t:e:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'm': a->model = optarg; break;
        case 'e':
            if (optarg[0] == '\0') {
                kvs_cli_error(CMD, "--endpoint must not be empty");
                return KVS_EXIT_USAGE;
            }
            a->endpoint = optarg;
            break;
        case OPT_DATA_DIR: a->data_dir = optarg; break;
        case 't':
            if (kvs_cli_parse_long(optarg, 1, 1024, &v) < 0) {
                kvs_cli_error(CMD, "-t must be an integer in [1, 1024], got '%s'", optarg);
                return KVS_EXIT_USAGE;
            }
            a->threads = optarg;
            break;
        case OPT_DEVICE:
            if (strcmp(optarg, "cpu") != 0 && strncmp(optarg, "cuda", 4) != 0) {
                kvs_cli_error(CMD, "--device must be cpu, cuda or cuda:N, got '%s'", optarg);
                return KVS_EXIT_USAGE;
            }
            a->device = optarg;
            break;
        case OPT_TICKS:
            if (kvs_cli_parse_long(optarg, 1, 100000, &a->ticks) < 0) {
                kvs_cli_error(CMD, "--ticks must be an integer in [1, 100000], got '%s'", optarg);
                return KVS_EXIT_USAGE;
            }
            break;
        case OPT_ASK_EVERY:
            if (kvs_cli_parse_long(optarg, 1, 100000, &a->ask_every) < 0) {
                kvs_cli_error(CMD, "--ask-every must be an integer in [1, 100000], got '%s'",
                              optarg);
                return KVS_EXIT_USAGE;
            }
            break;
        case OPT_RATE:
            if (kvs_cli_parse_float(optarg, &f) < 0 || f < 0.1f || f > 1000.0f) {
                kvs_cli_error(CMD, "--rate must be ticks per second in [0.1, 1000], got '%s'",
                              optarg);
                return KVS_EXIT_USAGE;
            }
            a->rate = f;
            break;
        case OPT_START_TIMEOUT:
            if (kvs_cli_parse_float(optarg, &f) < 0 || f < 1.0f || f > 3600.0f) {
                kvs_cli_error(CMD, "--start-timeout must be seconds in [1, 3600], got '%s'",
                              optarg);
                return KVS_EXIT_USAGE;
            }
            a->start_timeout_s = f;
            break;
        case OPT_SEED:
            if (kvs_cli_parse_long(optarg, 0, 1L << 40, &a->seed) < 0) {
                kvs_cli_error(CMD, "--seed must be a non-negative integer, got '%s'", optarg);
                return KVS_EXIT_USAGE;
            }
            break;
        case 'h': usage(stdout); return -1;
        case ':':
            kvs_cli_error(CMD, "option '%s' needs a value", argv[optind - 1]);
            return KVS_EXIT_USAGE;
        default:
            kvs_cli_error(CMD, "unknown option '%s' (try --help)", argv[optind - 1]);
            return KVS_EXIT_USAGE;
        }
    }
    if (optind < argc) {
        kvs_cli_error(CMD, "unexpected argument '%s' (try --help)", argv[optind]);
        return KVS_EXIT_USAGE;
    }
    if (a->endpoint != NULL &&
        (a->model != NULL || a->threads != NULL || a->device != NULL || a->data_dir != NULL)) {
        kvs_cli_error(CMD, "-m, -t, --device and --data-dir are for the cluster the demo starts; "
                           "they cannot be combined with --endpoint");
        return KVS_EXIT_USAGE;
    }
    return KVS_EXIT_OK;
}

/* One desk per symbol, with its ticks. false on no memory. */
static bool plan_desks(struct demo *d)
{
    for (int i = 0; i < N_DESKS; i++) {
        struct desk *k = &d->desks[i];
        for (int j = 0; SYMS[i][j] != '\0' && j + 1 < (int)sizeof k->name; j++) {
            k->name[j] = (char)(SYMS[i][j] - 'A' + 'a');
        }
        k->sym = i;
        k->d = d;
        size_t n = (size_t)d->n_ticks;
        k->ticks = malloc(n * sizeof *k->ticks);
        k->append_ms = calloc(n, sizeof *k->append_ms);
        k->acked_at = calloc(n, sizeof *k->acked_at);
        k->versions = calloc(n, sizeof *k->versions);
        if (k->ticks == NULL || k->append_ms == NULL || k->acked_at == NULL ||
            k->versions == NULL) {
            return false;
        }
        for (int32_t t = 0; t < d->n_ticks; t++) {
            if (d->feed[t].sym == i) {
                k->ticks[k->n_ticks++] = t;
            }
        }
    }
    return true;
}

/* The exit code of a failed call on c (message printed), or of the signal that stopped us. */
static int failed(struct demo *d, kvs_client *c, const char *what, int rc)
{
    int sig = atomic_load(&d->stop);
    if (sig > 0) {
        return 128 + sig;
    }
    if (sig == -2) {
        return KVS_EXIT_FAILED; /* the cluster died: said by the signal thread */
    }
    for (int i = 0; i < N_DESKS; i++) {
        if (d->desks[i].failed != 0) {
            kvs_cli_error(CMD, "%s", d->desks[i].err);
            return kvs_cli_exit_code(d->desks[i].failed);
        }
    }
    kvs_cli_error(CMD, "%s: %s", what, c != NULL ? kvs_client_error(c) : kvs_status_name(rc));
    return kvs_cli_exit_code(rc);
}

/* Everything between the cluster coming up and the summary. An exit code. */
static int run(struct demo *d, long ask_every, bool close_sessions)
{
    char err[512] = "";
    kvs_client *c = NULL;
    int rc = connect_client(d, N_DESKS, &c, err, sizeof err);
    if (rc < 0) {
        kvs_cli_error(CMD, "%s", err);
        return rc == KVS_INVALID_ARGUMENT ? KVS_EXIT_USAGE : kvs_cli_exit_code(rc);
    }
    struct kvs_client_status st;
    if ((rc = kvs_client_status(c, &st)) < 0) {
        int ec = failed(d, c, "status", rc);
        destroy_client(d, &c);
        return ec;
    }
    printf("kvstream demo: cluster at %s: model sha256 %.12s, %lld KV cells, %lld sessions\n",
           d->endpoint, st.model_sha256, (long long)st.cells_total, (long long)st.sessions);
    /* Budgets: 3/16 of the worker's cells each, so that a quarter stays free for the
     * questions' and flash queries' forks, stateless re-prefills and sliding (which copies
     * blocks that forks share). */
    int64_t cells = st.cells_total * 3 / 16 / 16 * 16;
    cells = cells < st.n_ctx ? cells : st.n_ctx;
    int ec = KVS_EXIT_OK;
    int created = 0;
    for (; created < N_DESKS; created++) {
        if ((rc = setup_desk(c, &d->desks[created], cells)) == KVS_ALREADY_EXISTS) {
            kvs_cli_error(CMD,
                          "session '%s' exists already at %s (left by an interrupted "
                          "demo?): 'kvstream session close %s' removes it",
                          d->desks[created].name, d->endpoint, d->desks[created].name);
            ec = KVS_EXIT_EXISTS;
            goto done;
        }
        if (rc < 0) {
            ec = failed(d, c, d->desks[created].name, rc);
            created++; /* it may exist: close it too */
            goto done;
        }
    }
    printf("kvstream demo: sessions aapl, msft, nvda, goog (%lld cells each), flash queries "
           "'price' and 'move' on each; %d ticks at %.1f/s, questions every %ld ticks\n",
           (long long)cells, (int)d->n_ticks, d->rate, ask_every);
    printf("kvstream demo: flash = fresh answers when asked (hits); answers are the model's, "
           "[the feed's values] at the version each answer saw\n\n");
    printf("%6s  %-7s %7s %9s  %3s %9s %8s  %-17s %-12s %s\n", "tick", "session", "context",
           "append_ms", "flash", "flash_ms", "ttft_ms", "price", "move", "question: last tick?");
    fflush(stdout);

    /* the feeders and the watcher, each with its own client */
    int n_started = 0, n_joined = 0;
    bool watching = false;
    for (int i = 0; i < N_DESKS && ec == KVS_EXIT_OK; i++) {
        if ((rc = connect_client(d, i, &d->desks[i].client, err, sizeof err)) < 0) {
            kvs_cli_error(CMD, "%s", err);
            ec = kvs_cli_exit_code(rc);
        }
    }
    if (ec == KVS_EXIT_OK &&
        connect_client(d, N_DESKS + 1, &d->watch_client, err, sizeof err) == 0 &&
        pthread_create(&d->watch_thread, NULL, watch_main, d) == 0) {
        watching = true;
    } else {
        d->watch_rc = KVS_INTERNAL;
    }
    struct totals *t = calloc(1, sizeof *t);
    if (t == NULL) {
        ec = KVS_EXIT_FAILED;
    }
    double t_start = now_s();
    d->t0 = t_start + 0.2; /* the first tick after the threads are up */
    for (; n_started < N_DESKS && ec == KVS_EXIT_OK; n_started++) {
        if (pthread_create(&d->desks[n_started].thread, NULL, feed_main, &d->desks[n_started]) !=
            0) {
            kvs_cli_error(CMD, "cannot start a feeder thread");
            ec = KVS_EXIT_FAILED;
            break;
        }
    }

    /* the rounds of questions, as the feed's ticks become due */
    for (long k = ask_every; ec == KVS_EXIT_OK; k += ask_every) {
        int32_t tick = (int32_t)(k < d->n_ticks ? k : d->n_ticks);
        if (!sleep_until(d, d->t0 + (double)(tick - 1) / d->rate + 0.05)) {
            ec = failed(d, c, "", 0);
            break;
        }
        if (tick == d->n_ticks) { /* the last round sees the whole feed */
            for (; n_joined < n_started; n_joined++) {
                pthread_join(d->desks[n_joined].thread, NULL);
            }
            if (stopping(d)) {
                ec = failed(d, c, "", 0);
                break;
            }
        }
        for (int i = 0; i < N_DESKS && ec == KVS_EXIT_OK; i++) {
            if ((rc = ask_row(d, c, &d->desks[i], tick, t)) < 0) {
                ec = failed(d, c, d->desks[i].name, rc);
            }
        }
        sample_scheduler(d, t);
        if (tick == d->n_ticks) {
            break;
        }
    }
    for (; n_joined < n_started; n_joined++) {
        pthread_join(d->desks[n_joined].thread, NULL);
    }
    if (ec == KVS_EXIT_OK && stopping(d)) {
        ec = failed(d, c, "", 0);
    }
    if (ec == KVS_EXIT_OK) {
        print_summary(d, c, t, now_s() - t_start);
    }
    if (watching) {
        kvs_client_cancel(d->watch_client);
        pthread_join(d->watch_thread, NULL);
    }
    free(t);
done:
    for (int i = 0; i < N_DESKS; i++) {
        destroy_client(d, &d->desks[i].client);
    }
    destroy_client(d, &d->watch_client);
    /* Close them also after a signal (so the next demo can create them again), unless the
     * cluster is gone or stops answering. */
    if (close_sessions && atomic_load(&d->stop) != -2) {
        kvs_client_set_timeout(c, CLOSE_TIMEOUT_MS);
        for (int i = 0; i < created; i++) {
            if (kvs_client_session_close(c, d->desks[i].name) == KVS_TIMEOUT) {
                break;
            }
        }
    }
    destroy_client(d, &c);
    return ec;
}

int kvs_cmd_demo(int argc, char **argv)
{
    struct demo_args a;
    int ec = parse_args(argc, argv, &a);
    if (ec != KVS_EXIT_OK) {
        return ec < 0 ? KVS_EXIT_OK : ec;
    }
    struct demo *d = calloc(1, sizeof *d);
    struct tick *feed = make_feed(a.seed, (int32_t)a.ticks);
    if (d == NULL || feed == NULL) {
        kvs_cli_error(CMD, "out of memory");
        free(d);
        free(feed);
        return KVS_EXIT_FAILED;
    }
    d->feed = feed;
    d->n_ticks = (int32_t)a.ticks;
    d->rate = a.rate;
    pthread_mutex_init(&d->mu, NULL);
    ec = plan_desks(d) ? KVS_EXIT_OK : KVS_EXIT_FAILED;

    /* Signals go to one thread of ours (the child unblocks them before it runs up). */
    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, &old);
    signal(SIGPIPE, SIG_IGN);
    pthread_t sig_thread;
    bool sig_running = pthread_create(&sig_thread, NULL, signal_main, d) == 0;

    struct kvs_demo_up up = {.pid = 0, .out_fd = -1};
    if (ec == KVS_EXIT_OK && a.endpoint == NULL) {
        char err[512];
        const char *model = a.model != NULL ? a.model : kvs_cli_default_model();
        printf("kvstream demo: starting a single-node cluster (kvstream up, model %s)\n", model);
        fflush(stdout);
        struct kvs_demo_up_opts uo = {.model = model,
                                      .threads = a.threads,
                                      .device = a.device,
                                      .data_dir = a.data_dir,
                                      .timeout_s = a.start_timeout_s,
                                      .stop = &d->stop};
        double t0 = now_s();
        if (kvs_demo_up_start(&uo, &up, err, sizeof err) < 0) {
            int sig = atomic_load(&d->stop);
            if (sig <= 0) {
                kvs_cli_error(CMD, "%s", err);
            }
            ec = sig > 0 ? 128 + sig : KVS_EXIT_FAILED;
        } else {
            printf("kvstream demo: cluster up at %s in %.1f s (kvstream up, pid %d, data dir "
                   "%s)\n",
                   up.endpoint, now_s() - t0, (int)up.pid, up.data_dir);
            d->endpoint = up.endpoint;
            d->up = &up;
            atomic_store(&d->child, (int)up.pid);
        }
    } else if (ec == KVS_EXIT_OK) {
        d->endpoint = a.endpoint;
    }
    if (ec == KVS_EXIT_OK) {
        ec = run(d, a.ask_every, a.endpoint != NULL || a.data_dir != NULL);
    }
    atomic_store(&d->child, 0);
    if (up.pid > 0) {
        printf("kvstream demo: stopping the cluster (pid %d)\n", (int)up.pid);
        fflush(stdout);
        int st = kvs_demo_up_stop(&up);
        if (st != 0 && ec == KVS_EXIT_OK) {
            kvs_cli_error(CMD,
                          "kvstream up exited with status %d (its log is gone with the "
                          "temporary directory)",
                          st);
            ec = KVS_EXIT_FAILED;
        } else if (ec == KVS_EXIT_OK) {
            printf("kvstream demo: done\n");
        }
    }
    atomic_store(&d->done, 1);
    if (sig_running) {
        pthread_join(sig_thread, NULL);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    for (int i = 0; i < N_DESKS; i++) {
        free(d->desks[i].ticks);
        free(d->desks[i].append_ms);
        free(d->desks[i].acked_at);
        free(d->desks[i].versions);
    }
    pthread_mutex_destroy(&d->mu);
    free(feed);
    free(d);
    return ec;
}
