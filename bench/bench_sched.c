/* Multi-session benchmark (CPU): continuous batching against one request at a time.
 *
 * 16 sessions receive appends (one market tick line each, ~16 tokens) at an offered
 * aggregate rate, arriving as a Poisson process on random sessions; questions arrive at
 * random (Poisson, --qps, default 1/s, 8-token answers) and every session has a registered
 * flash query ("Last price:", 4-token answers) that is refreshed after each append. Flash
 * answers are read at random (Poisson, 50/s: a read costs nothing, many make the hit rate
 * precise); a read is a hit when the cached answer is fresh (computed at the session's
 * current version).
 *
 * A probe runs one rate for a few seconds. Latencies count from the scheduled arrival (a
 * request that arrives during a step waits for it, as it would in the server):
 *   TTFT    arrival of a question -> its first answer token,
 *   append  arrival of a record -> its acknowledgement,
 *   refresh an append's acknowledgement -> the flash answer at its version (a watcher on
 *           each session); "superseded" counts appends whose session's next append came
 *           first, "stale" is the share of session-time without a fresh answer (what a
 *           read at a random time misses, so it should match 1 - hit rate).
 * A rate is sustainable when every question is answered with TTFT p99 <= the bound, and
 * every append is acknowledged with latency p99 <= 2 s (the queue does not grow) by the end
 * of the probe plus a 2 s drain. A probe lasts --seconds, longer at low rates (30 appends
 * expected, at most 3x). The search starts at 2/s, halves until a probe passes or doubles
 * until one fails, then bisects (geometrically) until the bracket is within 12%; a failed
 * probe is repeated once (it fails only if the repeat fails too), for every executor.
 * Arrivals come from random streams reset for every probe: all executors see the same
 * arrivals at the same rate. Executors, same engine, same forward, same job code
 * (worker/sched.c):
 *   (a) batched:  the scheduler: continuous batching across sessions, priorities (answers,
 *                 then questions, then append chunks, then flash work with its share), the
 *                 step-time target --target-ms (by default a quarter of the TTFT bound: a
 *                 question waits for the step in flight and runs in the next) and rule 5
 *                 (short steps while answers are in flight, --answer-ms; -1 = off),
 *   (b) fifo:     the synchronous executor, one request at a time (sched opts.fifo): one
 *                 queue in arrival order, each request to its end before the next starts
 *                 (an append's whole record in one forward; a question's prefill, then one
 *                 decode row per forward to the end of its answer; a flash refresh is a
 *                 request queued after the append that triggered it). No priorities, no
 *                 chunking, no rows of two requests in one forward. The gate is (a) vs (b),
 *   (c) 1/step:   the scheduler with max_jobs_per_step = 1: its priorities and chunking,
 *                 one request per forward (flash work keeps its share as one step in ten).
 *                 (a) vs (c) is what cross-session batching buys; (c) vs (b) what the
 *                 scheduling does.
 * A refresh in every executor is queued only if none of that session is pending: under load
 * one refresh can cover several appends (its answer is then stale when it lands, and the
 * next one is queued), so the executors do not do the same flash work at the same rate:
 * the stale column says how fresh each kept its answers.
 * The stated TTFT bound is 250 ms p99: an interactive answer, the product's promise. At 1000
 * ms (sessions 2-3) it never bound any executor: every one reached the append queue's limit
 * first, so the comparison measured raw throughput, where batching cannot pay on a CPU whose
 * forward costs ~4.4 ms + ~4 ms a row (bench/results/sched-2026-11-30.md); --ttft-ms 1000
 * reruns that. Under the bound, FIFO's questions wait behind queued appends and refreshes.
 * Defaults: TTFT p99 bound 250 ms, 1 question/s, 5 s probes, 2 rounds, 1 engine thread (on
 * the shared 2-core dev machine a second thread mostly waits at the pool's barriers for a
 * partner that another process preempted: same speed, far more variance).
 * The searches alternate (a, b, c, a, b, c for --rounds 2) so that a change in the machine's
 * load falls on all. Then the batched executor runs at half its sustainable rate (the lowest
 * round's) for 4 x --seconds for the flash hit rate and the refresh latency. Each probe
 * prints the 1-minute load average next to its figures.
 *
 *   bench_sched [-m MODEL] [-t THREADS] [--seconds S] [--ttft-ms B] [--target-ms T]
 *               [--answer-ms A] [--rounds N] [--qps Q] [--probe RATE [--only a|b|c]]
 *               [-o results.md]
 * --probe RATE runs one probe per executor (or the one --only names) at RATE appends/s and
 * stops (no search).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/status.h"
#include "worker/sched.h"

#define N_SESS 16
#define MAX_EVENTS 65536
#define FLASH_READ_RATE 50.0
#define APPEND_P99_MAX_S 2.0
#define DRAIN_S 2.0
#define MIN_APPENDS 30.0

/* xorshift64 streams, one per kind of event, reset for every probe: two probes at one rate
 * (the two executors) see the same arrivals on the same sessions */
enum { RNG_APPEND, RNG_QUESTION, RNG_READ, N_RNG };
static uint64_t rs[N_RNG];

static void rng_reset(void)
{
    for (int i = 0; i < N_RNG; i++) {
        rs[i] = 88172645463325252ull + 0x9e3779b97f4a7c15ull * (uint64_t)i;
    }
}

static double urand(int stream)
{
    uint64_t *x = &rs[stream];
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return (double)(*x >> 11) / 9007199254740992.0;
}

static double expo(int stream, double rate)
{
    return -log(1.0 - urand(stream)) / rate;
}

/* One request in flight: its scheduled arrival and, once done, its latency. */
struct ev {
    double t_arrival;
    double latency;    /* seconds; < 0 while pending or after an error */
    int32_t tokens;    /* appended tokens (appends) */
    int sess;          /* session index (appends) */
};

/* Flash freshness per session, while a probe runs: the last acknowledged append's version
 * and time, and whether its fresh flash answer is still missing (reads miss meanwhile). */
struct fresh_track {
    uint64_t version;  /* of the last acknowledged append */
    double t_ack;      /* kvs_now() at that acknowledgement */
    uint64_t step_ack; /* scheduler steps at that acknowledgement */
    bool stale;        /* no answer at >= version yet */
    double stale_s;    /* seconds stale during the probe */
    int n_acks;        /* acknowledgements during the probe */
};
static struct fresh_track track[N_SESS];
static bool tracking;           /* a probe is running (not the drain) */
static const uint64_t *steps_now; /* the scheduler's step counter */
static double refresh_lat[MAX_EVENTS]; /* append acknowledged -> fresh flash answer, seconds */
static double refresh_steps;     /* steps summed over those refreshes */
static int n_refresh, n_superseded; /* refreshes done; appends whose session moved on first */

static struct ev appends[MAX_EVENTS], queries[MAX_EVENTS];
static double question_rate = 1.0; /* per second */
static double answer_ms;           /* the scheduler's answer_step_ms (0: its default) */
static int n_appends, n_queries;

static void on_append(int status, const struct kvs_append_result *r, const char *err, void *user)
{
    struct ev *x = user;
    if (status != 0) {
        if (status != KVS_CANCELLED) { /* CANCELLED: still queued when the probe ended */
            fprintf(stderr, "bench_sched: append failed: %s\n", err != NULL ? err : "?");
        }
        return;
    }
    double now = kvs_now();
    x->latency = now - x->t_arrival;
    x->tokens = r->n_tokens;
    struct fresh_track *t = &track[x->sess];
    if (!tracking || r->duplicate) {
        return;
    }
    if (t->stale) { /* the previous append's refresh had not come: it never will */
        n_superseded++;
        t->stale_s += now - t->t_ack;
    }
    t->n_acks++;
    t->version = r->version;
    t->t_ack = now;
    t->step_ack = *steps_now;
    t->stale = true;
}

/* A new flash answer of session user (a struct fresh_track): fresh for the last append? */
static void on_flash(kvs_session *s, const char *name, const struct kvs_answer *a, void *user)
{
    (void)s;
    (void)name;
    struct fresh_track *t = user;
    if (!tracking || !t->stale || a->version < t->version) {
        return;
    }
    double l = kvs_now() - t->t_ack;
    t->stale = false;
    t->stale_s += l;
    if (n_refresh < MAX_EVENTS) {
        refresh_lat[n_refresh++] = l;
        refresh_steps += (double)(*steps_now - t->step_ack);
    }
}

static void on_query(int status, struct kvs_answer *a, const char *err, void *user)
{
    struct ev *x = user;
    if (status != 0) {
        if (status != KVS_CANCELLED) {
            fprintf(stderr, "bench_sched: query failed: %s\n", err != NULL ? err : "?");
        }
        return;
    }
    /* a->ttft_s counts from acceptance; the request had waited since its arrival */
    x->latency = kvs_now() - a->total_s + a->ttft_s - x->t_arrival;
    kvs_answer_free(a);
    free(a);
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Percentile p of v[0..n) (sorts v). */
static double pct_sorted(double *v, int n, double p)
{
    if (n == 0) {
        return NAN;
    }
    qsort(v, (size_t)n, sizeof *v, cmp);
    return v[(int)ceil((n - 1) * p)];
}

/* Percentile p of the latencies of v (pending ones count as infinite). */
static double pct(const struct ev *v, int n, double p)
{
    if (n == 0) {
        return NAN;
    }
    double *l = malloc((size_t)n * sizeof *l);
    if (l == NULL) {
        return NAN;
    }
    for (int i = 0; i < n; i++) {
        l[i] = v[i].latency >= 0 ? v[i].latency : INFINITY;
    }
    qsort(l, (size_t)n, sizeof *l, cmp);
    double r = l[(int)ceil((n - 1) * p)];
    free(l);
    return r;
}

/* The executors, all on the same engine and scheduler code (worker/sched.h). */
enum executor {
    EX_BATCHED, /* (a) the scheduler: continuous batching across sessions */
    EX_FIFO,    /* (b) one request at a time in arrival order, each to its end (opts.fifo) */
    EX_ONE,     /* (c) the scheduler with one request per step (no cross-session batching) */
    N_EX,
};
static const char *const ex_name[N_EX] = {"(a) batched", "(b) fifo", "(c) 1/step"};

struct probe {
    enum executor ex;
    double offered_aps;   /* appends per second offered */
    double offered_tps;   /* ... in tokens per second (mean tokens per append) */
    double achieved_tps;  /* tokens acknowledged per second of the probe */
    double append_p99_ms;
    double ttft_p50_ms, ttft_p99_ms;
    int n_q, pending;     /* questions asked; requests never completed */
    double hit_rate;      /* fresh flash reads / reads */
    int reads;
    double rows_per_step; /* mean rows of a step */
    double step_ms;       /* mean step wall time */
    int32_t step_rows;    /* the step budget at the end */
    double load1;         /* 1-minute load average at the end */
    /* flash freshness (see struct fresh_track) */
    double refresh_p50_ms, refresh_p90_ms, refresh_p99_ms, refresh_mean_ms;
    double refresh_steps;  /* mean steps from the acknowledgement to the fresh answer */
    double superseded;     /* appends whose session's next append came before the refresh */
    double interval_s;     /* mean time between one session's acknowledged appends */
    double stale_frac;     /* session-time without a fresh answer: the expected miss rate */
    bool sustainable;
};

static struct probe run(kvs_engine *e, enum executor ex, double rate, double seconds,
                        double bound_ms, double target_ms)
{
    struct probe p = {.ex = ex, .offered_aps = rate};
    kvs_sessions *S;
    kvs_sched *sc;
    if (kvs_sessions_new(e, NULL, &S) < 0) {
        fprintf(stderr, "bench_sched: no sessions\n");
        exit(1);
    }
    struct kvs_sched_opts so = {.target_step_ms = target_ms, .append_chunk = 32,
                                .max_jobs_per_step = ex == EX_ONE ? 1 : 0,
                                .fifo = ex == EX_FIFO, .answer_step_ms = answer_ms};
    if (kvs_sched_new(S, &so, &sc) < 0) {
        fprintf(stderr, "bench_sched: no scheduler\n");
        exit(1);
    }
    char err[256];
    kvs_session *ss[N_SESS];
    struct kvs_query_opts fq = {.sampling = kvs_sampling_default(), .max_tokens = 4};
    for (int i = 0; i < N_SESS; i++) {
        char id[16];
        snprintf(id, sizeof id, "s%d", i);
        const char *pre = "Live feed. Each line: SYMBOL PRICE CHANGE.\n";
        struct kvs_session_opts o = {.budget_cells = 1500, .prefix = pre, .prefix_len = strlen(pre),
                                     .policy = KVS_POLICY_SLIDE};
        if (kvs_session_create(S, id, &o, &ss[i], err, sizeof err) < 0 ||
            kvs_flash_register(ss[i], "last", "Last price:", 11, &fq, NULL, err, sizeof err) < 0) {
            fprintf(stderr, "bench_sched: %s\n", err);
            exit(1);
        }
        kvs_flash_watch(ss[i], on_flash, &track[i]);
    }
    n_appends = n_queries = 0;
    memset(track, 0, sizeof track);
    n_refresh = n_superseded = 0;
    refresh_steps = 0;
    steps_now = &kvs_sched_stats(sc)->steps;
    /* enough appends for a p99 at low rates: at least MIN_APPENDS expected, up to 3x */
    if (seconds * rate < MIN_APPENDS) {
        seconds = MIN_APPENDS / rate < 3 * seconds ? MIN_APPENDS / rate : 3 * seconds;
    }
    rng_reset();
    tracking = true;
    double t0 = kvs_now();
    double next_append = t0 + expo(RNG_APPEND, rate), next_q = t0 + expo(RNG_QUESTION, question_rate),
           next_read = t0 + expo(RNG_READ, FLASH_READ_RATE);
    int hits = 0, tick = 0;
    uint64_t steps0 = kvs_sched_stats(sc)->steps, rows0 = 0;
    for (int c = 0; c < KVS_N_CLASSES; c++) {
        rows0 += kvs_sched_stats(sc)->rows[c];
    }
    double step_s = 0;
    struct kvs_query_opts qo = {.sampling = kvs_sampling_default(), .max_tokens = 8};
    for (;;) {
        double now = kvs_now();
        if (now - t0 >= seconds) {
            break;
        }
        while (next_append <= now && n_appends < MAX_EVENTS) {
            int i = (int)(urand(RNG_APPEND) * N_SESS);
            char line[64];
            snprintf(line, sizeof line, "SYM%d %.2f %+.2f", i, 100 + (tick % 97) * 0.37,
                     ((tick % 21) - 10) * 0.05);
            tick++;
            struct ev *x = &appends[n_appends];
            *x = (struct ev){.t_arrival = next_append, .latency = -1, .sess = i};
            if (kvs_sched_append(sc, ss[i], line, strlen(line), 0, 0, 0, on_append, x) == 0) {
                n_appends++;
            }
            next_append += expo(RNG_APPEND, rate);
        }
        while (next_q <= now && n_queries < MAX_EVENTS) {
            int i = (int)(urand(RNG_QUESTION) * N_SESS);
            struct ev *x = &queries[n_queries++];
            *x = (struct ev){.t_arrival = next_q, .latency = -1};
            if (kvs_sched_query(sc, ss[i], "Which way did it move?", 22, &qo, 0, NULL, on_query,
                                x, err, sizeof err) < 0) {
                fprintf(stderr, "bench_sched: query refused: %s\n", err); /* stays pending */
            }
            next_q += expo(RNG_QUESTION, question_rate);
        }
        while (next_read <= now) {
            int i = (int)(urand(RNG_READ) * N_SESS);
            struct kvs_answer a;
            if (kvs_flash_get(ss[i], "last", KVS_FLASH_ALLOW_STALE, &a, err, sizeof err) == 0) {
                p.reads++;
                hits += a.fresh;
                kvs_answer_free(&a);
            }
            next_read += expo(RNG_READ, FLASH_READ_RATE);
        }
        if (kvs_sched_busy(sc)) {
            double ts = kvs_now();
            kvs_sched_step(sc, ts);
            step_s += kvs_now() - ts;
        } else {
            struct timespec ts = {0, 200000};
            nanosleep(&ts, NULL);
        }
    }
    double elapsed = kvs_now() - t0;
    tracking = false;
    double stale_s = 0;
    int n_acks = 0;
    for (int i = 0; i < N_SESS; i++) {
        stale_s += track[i].stale_s + (track[i].stale ? t0 + elapsed - track[i].t_ack : 0);
        n_acks += track[i].n_acks;
    }
    p.stale_frac = stale_s / (N_SESS * elapsed);
    /* session-time per acknowledgement (gaps inside the probe alone would favour short ones) */
    p.interval_s = n_acks ? N_SESS * elapsed / n_acks : NAN;
    p.superseded = n_acks ? (double)n_superseded / n_acks : NAN;
    p.refresh_mean_ms = 0;
    for (int i = 0; i < n_refresh; i++) {
        p.refresh_mean_ms += refresh_lat[i];
    }
    p.refresh_mean_ms = n_refresh ? 1e3 * p.refresh_mean_ms / n_refresh : NAN;
    p.refresh_steps = n_refresh ? refresh_steps / n_refresh : NAN;
    p.refresh_p50_ms = 1e3 * pct_sorted(refresh_lat, n_refresh, 0.5);
    p.refresh_p90_ms = 1e3 * pct_sorted(refresh_lat, n_refresh, 0.9);
    p.refresh_p99_ms = 1e3 * pct_sorted(refresh_lat, n_refresh, 0.99);
    const struct kvs_sched_stats *st = kvs_sched_stats(sc);
    uint64_t steps = st->steps - steps0, rows = 0;
    for (int c = 0; c < KVS_N_CLASSES; c++) {
        rows += st->rows[c];
    }
    rows -= rows0;
    p.rows_per_step = steps ? (double)rows / (double)steps : 0;
    p.step_ms = steps ? step_s / (double)steps * 1e3 : 0;
    p.step_rows = st->step_rows;
    /* what arrived during the probe may finish during the drain */
    double td = kvs_now();
    while (kvs_sched_busy(sc) && kvs_now() - td < DRAIN_S) {
        kvs_sched_step(sc, kvs_now());
    }
    int64_t tokens = 0;
    int acked = 0;
    for (int i = 0; i < n_appends; i++) {
        tokens += appends[i].tokens;
        acked += appends[i].latency >= 0;
        p.pending += appends[i].latency < 0;
    }
    for (int i = 0; i < n_queries; i++) {
        p.pending += queries[i].latency < 0;
    }
    double mean_tokens = acked ? (double)tokens / acked : 12;
    p.offered_tps = rate * mean_tokens;
    p.achieved_tps = (double)tokens / elapsed;
    p.append_p99_ms = pct(appends, n_appends, 0.99) * 1e3;
    p.ttft_p50_ms = pct(queries, n_queries, 0.5) * 1e3;
    p.ttft_p99_ms = pct(queries, n_queries, 0.99) * 1e3;
    p.n_q = n_queries;
    p.hit_rate = p.reads ? (double)hits / p.reads : NAN;
    double load[1] = {NAN};
    getloadavg(load, 1);
    p.load1 = load[0];
    p.sustainable = p.pending == 0 && n_queries > 0 && p.ttft_p99_ms <= bound_ms &&
                    p.append_p99_ms <= APPEND_P99_MAX_S * 1e3;
    kvs_sched_destroy(&sc);
    kvs_sessions_destroy(&S);
    return p;
}

static char table[1 << 16];
static size_t tl;

static void row(const struct probe *p, const char *what)
{
    tl += (size_t)snprintf(table + tl, sizeof table - tl,
                           "| %s | %s | %.1f | %.0f | %.0f | %.0f | %.0f | %.0f | %d | %.1f%% | "
                           "%.0f / %.0f | %.1f | %.1f%% | %.1f | %.0f | %d | %.2f | %s |\n",
                           what, ex_name[p->ex], p->offered_aps, p->offered_tps, p->achieved_tps,
                           p->append_p99_ms, p->ttft_p50_ms, p->ttft_p99_ms, p->pending,
                           100 * p->hit_rate, p->refresh_p50_ms, p->refresh_p90_ms,
                           p->refresh_steps, 100 * p->stale_frac, p->rows_per_step, p->step_ms,
                           p->step_rows, p->load1, p->sustainable ? "yes" : "no");
    fprintf(stderr, "%s %-11s %6.1f appends/s (%5.0f tok/s): achieved %5.0f tok/s, append p99 %5.0f ms, "
                    "TTFT p50/p99 %4.0f/%5.0f ms, pending %d, hits %5.1f%%, refresh p50/p90 %4.0f/%4.0f ms "
                    "(%.1f steps), stale %4.1f%%, %4.1f rows/step, %3.0f ms/step, load %.2f: %s\n",
            what, ex_name[p->ex], p->offered_aps, p->offered_tps, p->achieved_tps,
            p->append_p99_ms, p->ttft_p50_ms, p->ttft_p99_ms, p->pending, 100 * p->hit_rate,
            p->refresh_p50_ms, p->refresh_p90_ms, p->refresh_steps, 100 * p->stale_frac,
            p->rows_per_step, p->step_ms, p->load1,
            p->sustainable ? "sustainable" : "not sustainable");
}

/* Probe rate; a failed probe is repeated once and the rate counts as sustainable if the
 * repeat passes (a burst of load from other processes on a shared machine fails a probe
 * now and then; every executor gets the same second chance). */
static bool sustainable(kvs_engine *e, enum executor ex, double rate, double seconds,
                        double bound, double target, const char *what, double *tps)
{
    for (int attempt = 0; attempt < 2; attempt++) {
        struct probe p = run(e, ex, rate, seconds, bound, target);
        row(&p, attempt == 0 ? what : "  repeat");
        if (p.sustainable) {
            *tps = p.offered_tps;
            return true;
        }
    }
    return false;
}

/* The highest sustainable offered rate (appends/s) of one executor; *tps gets it in tokens/s. */
static double search(kvs_engine *e, enum executor ex, double seconds, double bound,
                     double target, int round, double *tps)
{
    char what[32];
    snprintf(what, sizeof what, "round %d", round);
    double lo = 0, hi = 0, lo_tps = 0, r = 2, t;
    /* a bracket: halve from 2/s until a probe passes, or double until one fails */
    while (lo == 0 && r >= 0.25) {
        if (sustainable(e, ex, r, seconds, bound, target, what, &t)) {
            lo = r;
            lo_tps = t;
        } else {
            hi = r;
            r /= 2;
        }
    }
    r = 2 * lo;
    while (hi == 0 && r > 0 && r <= 512) {
        if (sustainable(e, ex, r, seconds, bound, target, what, &t)) {
            lo = r;
            lo_tps = t;
            r *= 2;
        } else {
            hi = r;
        }
    }
    while (hi > 0 && lo > 0 && hi / lo > 1.12) {
        double mid = sqrt(lo * hi);
        if (sustainable(e, ex, mid, seconds, bound, target, what, &t)) {
            lo = mid;
            lo_tps = t;
        } else {
            hi = mid;
        }
    }
    *tps = lo_tps;
    return lo;
}

int main(int argc, char **argv)
{
    const char *model = NULL, *out = NULL;
    int threads = 1, rounds = 2, only = -1;
    double seconds = 5, bound = 250, target = 0, probe_rate = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc) {
            model = argv[++i];
        } else if (!strcmp(argv[i], "-t") && i + 1 < argc) {
            threads = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--seconds") && i + 1 < argc) {
            seconds = atof(argv[++i]);
        } else if (!strcmp(argv[i], "--ttft-ms") && i + 1 < argc) {
            bound = atof(argv[++i]);
        } else if (!strcmp(argv[i], "--target-ms") && i + 1 < argc) {
            target = atof(argv[++i]);
        } else if (!strcmp(argv[i], "--rounds") && i + 1 < argc) {
            rounds = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--qps") && i + 1 < argc) {
            question_rate = atof(argv[++i]);
        } else if (!strcmp(argv[i], "--answer-ms") && i + 1 < argc) {
            answer_ms = atof(argv[++i]);
        } else if (!strcmp(argv[i], "--only") && i + 1 < argc) {
            only = argv[++i][0] - 'a'; /* a, b or c: --probe runs that executor only */
        } else if (!strcmp(argv[i], "--probe") && i + 1 < argc) {
            probe_rate = atof(argv[++i]);
        } else if (!strcmp(argv[i], "-o") && i + 1 < argc) {
            out = argv[++i];
        } else {
            fprintf(stderr, "usage: bench_sched [-m MODEL] [-t N] [--seconds S] [--ttft-ms B] "
                            "[--target-ms T] [--answer-ms A] [--rounds N] [--qps Q] [--probe RATE "
                            "[--only a|b|c]] [-o FILE]\n");
            return 2;
        }
    }
    if (target == 0) {
        target = bound / 4; /* a question waits for one step and runs in the next: 2x margin */
    }
    if (threads < 1 || seconds <= 0 || bound <= 0 || rounds < 1 || rounds > 8 ||
        !(question_rate > 0) || only >= N_EX) {
        fprintf(stderr, "bench_sched: bad option value\n");
        return 2;
    }
    char def[1024];
    if (model == NULL) {
        snprintf(def, sizeof def, "%s/.cache/kvstream/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                 getenv("HOME") ? getenv("HOME") : "/root");
        model = def;
    }
    kvs_engine *e;
    char err[512];
    struct kvs_engine_opts eo = {.model_path = model, .n_threads = threads, .n_cells = 32768,
                                 .max_batch_rows = 256};
    if (kvs_engine_open(&eo, &e, err, sizeof err) < 0) {
        fprintf(stderr, "bench_sched: %s\n", err);
        return 1;
    }
    tl = (size_t)snprintf(table, sizeof table,
                          "| probe | executor | offered appends/s | offered tok/s | achieved tok/s | append p99 ms | TTFT p50 ms | TTFT p99 ms | pending | flash hits | refresh p50 / p90 ms | refresh steps | stale time | rows/step | ms/step | step budget | load 1m | sustainable |\n"
                          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    /* warm up (page in the model, settle the thread pool); not reported */
    run(e, EX_BATCHED, 2, 1.0, bound, target);
    if (probe_rate > 0) {
        for (int x = 0; x < N_EX; x++) {
            if (only >= 0 && x != only) {
                continue;
            }
            struct probe p = run(e, (enum executor)x, probe_rate, seconds, bound, target);
            row(&p, "probe");
        }
        kvs_engine_destroy(&e);
        return 0;
    }
    double best[8][N_EX], best_tps[8][N_EX];
    for (int k = 0; k < rounds; k++) {
        for (int x = 0; x < N_EX; x++) {
            best[k][x] = search(e, (enum executor)x, seconds, bound, target, k + 1,
                                &best_tps[k][x]);
        }
    }
    /* flash hit rate at half the batched executor's sustainable rate (the lowest round's) */
    double a_rate = best[0][EX_BATCHED];
    for (int k = 1; k < rounds; k++) {
        a_rate = best[k][EX_BATCHED] < a_rate ? best[k][EX_BATCHED] : a_rate;
    }
    struct probe h = run(e, EX_BATCHED, a_rate / 2 > 0.5 ? a_rate / 2 : 0.5, 4 * seconds, bound,
                         target);
    row(&h, "half load");
    double worst_ab = INFINITY, worst_ac = INFINITY;
    char summary[4096];
    size_t sl = 0;
    for (int k = 0; k < rounds; k++) {
        double ab = best_tps[k][EX_FIFO] > 0 ? best_tps[k][EX_BATCHED] / best_tps[k][EX_FIFO]
                                             : INFINITY;
        double ac = best_tps[k][EX_ONE] > 0 ? best_tps[k][EX_BATCHED] / best_tps[k][EX_ONE]
                                            : INFINITY;
        worst_ab = ab < worst_ab ? ab : worst_ab;
        worst_ac = ac < worst_ac ? ac : worst_ac;
        sl += (size_t)snprintf(summary + sl, sizeof summary - sl,
                               "round %d: highest sustainable append rate (a) batched %.0f tok/s "
                               "(%.1f appends/s), (b) fifo %.0f tok/s (%.1f appends/s), (c) 1/step "
                               "%.0f tok/s (%.1f appends/s): (a)/(b) %.2fx, (a)/(c) %.2fx\n",
                               k + 1, best_tps[k][EX_BATCHED], best[k][EX_BATCHED],
                               best_tps[k][EX_FIFO], best[k][EX_FIFO], best_tps[k][EX_ONE],
                               best[k][EX_ONE], ab, ac);
    }
    sl += (size_t)snprintf(summary + sl, sizeof summary - sl,
                           "gate (a)/(b) >= 1.5x in every round: %.2fx at worst: %s ((a)/(c) "
                           "%.2fx at worst)\n"
                           "flash hit rate at half (a)'s rate (%.1f appends/s, %.0f tok/s, %d "
                           "reads): %.1f%%: gate >= 90%%: %s\n"
                           "refresh latency there (append acknowledged -> fresh answer): p50 %.0f "
                           "ms, p90 %.0f ms, p99 %.0f ms, mean %.0f ms (%.1f steps of %.0f ms); "
                           "one session's appends %.2f s apart on average; superseded %.1f%%; "
                           "stale session-time %.1f%%\n",
                           worst_ab, worst_ab >= 1.5 ? "met" : "NOT met", worst_ac, h.offered_aps,
                           h.offered_tps, h.reads, 100 * h.hit_rate,
                           h.hit_rate >= 0.9 ? "met" : "NOT met", h.refresh_p50_ms,
                           h.refresh_p90_ms, h.refresh_p99_ms, h.refresh_mean_ms, h.refresh_steps,
                           h.step_ms, h.interval_s, 100 * h.superseded, 100 * h.stale_frac);
    time_t now = time(NULL);
    char date[32];
    strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", gmtime(&now));
    char setup[512];
    snprintf(setup, sizeof setup,
             "16 sessions; appends of one tick line (~16 tokens) on random sessions (Poisson); "
             "questions at %.1f/s (8-token answers); a flash query per session (4-token answers) "
             "refreshed after every append, read at 50/s; TTFT and append latency from the "
             "scheduled arrival. %d threads, %.0f s per probe (longer at low rates), TTFT p99 "
             "bound %.0f ms, append p99 bound %.0f ms, step target %.0f ms",
             question_rate, threads, seconds, bound, APPEND_P99_MAX_S * 1e3, target);
    printf("# Multi-session scheduling (CPU), %s\n\n%s.\n\n%s\n%s", date, setup, table, summary);
    if (out != NULL) {
        FILE *f = fopen(out, "w");
        if (f == NULL) {
            fprintf(stderr, "bench_sched: cannot write %s\n", out);
        } else {
            fprintf(f, "# Multi-session scheduling (CPU), %s\n\nmodel %s. %s.\n\n%s\n%s", date,
                    model, setup, table, summary);
            fclose(f);
        }
    }
    kvs_engine_destroy(&e);
    return worst_ab >= 1.5 && h.hit_rate >= 0.9 ? 0 : 1;
}
