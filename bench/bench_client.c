/* bench_client: flash hit latency over libkvstream while appends keep the worker busy.
 *
 *   kvstream up &                        (or any worker)
 *   bench_client [-e ENDPOINT] [-n GETS]
 *
 * A session with one flash query; another client (its own thread and kvs_client) appends
 * long records to a second session without pause, so the scheduler is always computing.
 * The main thread alternates a `flash.get` of the (fresh) cached answer and a `ping`, both
 * answered by the worker's I/O thread, and prints p50 / p99 / max of each. The gate of issue
 * 7: p99(flash.get) <= 1 ms + p99(ping) measured under the same load; exit 0 when it holds,
 * 1 when not, 2 on a usage or connection error.
 */
#include "client/include/kvstream.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

struct feeder {
    const char *endpoint;
    char session[64];
    atomic_int stop;
    atomic_int appends;       /* finished while the gets ran */
    atomic_int busy;          /* an append is in progress */
    kvs_client *_Atomic client; /* the feeder's: cancelled and destroyed by main */
    int rc;
};

static void *feed(void *arg)
{
    struct feeder *f = arg;
    struct kvs_client_opts o = {.timeout_ms = 300000};
    kvs_client *c = NULL;
    f->rc = kvs_client_connect(f->endpoint, &o, &c, NULL, 0);
    atomic_store(&f->client, c);
    char rec[2400];
    size_t len = 0;
    for (int i = 0; len + 16 < sizeof rec; i++) { /* ~350 words: a few seconds of prefill */
        len += (size_t)snprintf(rec + len, sizeof rec - len, "word%d ", i % 97);
    }
    while (f->rc == 0 && !atomic_load(&f->stop)) {
        atomic_store(&f->busy, 1);
        f->rc = kvs_client_append(c, f->session, rec, len, NULL);
        atomic_store(&f->busy, 0);
        if (f->rc == KVS_CONTEXT_FULL) { /* start over on a fresh session */
            kvs_client_session_close(c, f->session);
            f->rc = kvs_client_session_create(
                c, f->session, &(struct kvs_client_session_opts){.cells = 6000}, NULL);
        } else if (f->rc == 0) {
            atomic_fetch_add(&f->appends, 1);
        } else if (f->rc == KVS_CANCELLED && atomic_load(&f->stop)) {
            f->rc = 0; /* main stopped us */
        }
    }
    return NULL; /* main destroys the client after the join */
}

int main(int argc, char **argv)
{
    const char *endpoint = NULL;
    int n = 2000, opt;
    while ((opt = getopt(argc, argv, "e:n:h")) != -1) {
        if (opt == 'e') {
            endpoint = optarg;
        } else if (opt == 'n' && atoi(optarg) >= 100) {
            n = atoi(optarg);
        } else {
            fprintf(stderr, "usage: bench_client [-e ENDPOINT] [-n GETS >= 100]\n");
            return 2;
        }
    }
    char err[256] = "";
    kvs_client *c = NULL;
    struct kvs_client_opts o = {.timeout_ms = 120000};
    if (kvs_client_connect(endpoint, &o, &c, err, sizeof err) < 0) {
        fprintf(stderr, "bench_client: %s\n", err);
        return 2;
    }
    char flash_s[64];
    struct feeder f = {.endpoint = kvs_client_endpoint(c)};
    snprintf(flash_s, sizeof flash_s, "bench-flash-%d", (int)getpid());
    snprintf(f.session, sizeof f.session, "bench-load-%d", (int)getpid());
    struct kvs_client_flash_opts fo = {.query = {.max_tokens = 4}};
    struct kvs_client_answer a = {0};
    if (kvs_client_session_create(c, flash_s, &(struct kvs_client_session_opts){.cells = 1024},
                                  NULL) < 0 ||
        kvs_client_append(c, flash_s, "ETH 3500.5", 10, NULL) < 0 ||
        kvs_client_flash_register(c, flash_s, "last", "Last ETH price:", &fo) < 0 ||
        kvs_client_flash_get(c, flash_s, "last", false, &a) < 0 ||
        kvs_client_session_create(c, f.session, &(struct kvs_client_session_opts){.cells = 6000},
                                  NULL) < 0) {
        fprintf(stderr, "bench_client: set-up: %s\n", kvs_client_error(c));
        kvs_client_destroy(&c);
        return 2;
    }
    uint64_t version = a.version;
    kvs_client_answer_free(&a);

    pthread_t th;
    pthread_create(&th, NULL, feed, &f);
    while (!atomic_load(&f.busy) && f.rc == 0) {
        usleep(1000);
    }
    usleep(200000); /* the first long append is being computed */
    double *get_ms = calloc((size_t)n, sizeof *get_ms);
    double *ping_ms = calloc((size_t)n, sizeof *ping_ms);
    int busy_samples = 0, stale = 0, rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        busy_samples += atomic_load(&f.busy);
        double t0 = now_ms();
        rc = kvs_client_flash_get(c, flash_s, "last", false, &a);
        get_ms[i] = now_ms() - t0;
        stale += rc == 0 && (!a.fresh || a.version != version);
        kvs_client_answer_free(&a);
        if (rc == 0) {
            t0 = now_ms();
            rc = kvs_client_ping(c, NULL);
            ping_ms[i] = now_ms() - t0;
        }
    }
    atomic_store(&f.stop, 1);
    /* the append in progress is cancelled on the worker (kvs_client_cancel is the one call
     * another thread may make; the feeder's client lives until after the join) */
    kvs_client *fc = atomic_load(&f.client);
    if (fc != NULL) {
        kvs_client_cancel(fc);
    }
    if (rc < 0) {
        fprintf(stderr, "bench_client: %s\n", kvs_client_error(c));
    }
    pthread_join(th, NULL);
    kvs_client *fc_done = atomic_load(&f.client);
    kvs_client_destroy(&fc_done);
    kvs_client_session_close(c, flash_s);
    kvs_client_session_close(c, f.session);
    kvs_client_destroy(&c);
    if (rc < 0) {
        free(get_ms);
        free(ping_ms);
        return 2;
    }
    qsort(get_ms, (size_t)n, sizeof *get_ms, cmp_double);
    qsort(ping_ms, (size_t)n, sizeof *ping_ms, cmp_double);
    double p99g = get_ms[(int)(0.99 * n)], p99p = ping_ms[(int)(0.99 * n)];
    printf("flash.get (fresh hit): p50 %.3f ms  p99 %.3f ms  max %.3f ms\n", get_ms[n / 2], p99g,
           get_ms[n - 1]);
    printf("ping:                  p50 %.3f ms  p99 %.3f ms  max %.3f ms\n", ping_ms[n / 2], p99p,
           ping_ms[n - 1]);
    printf("%d gets, %d not fresh at version %llu; an append in progress at %d of them (%.0f%%); "
           "%d long appends finished meanwhile\n",
           n, stale, (unsigned long long)version, busy_samples, 100.0 * busy_samples / n,
           atomic_load(&f.appends));
    bool ok = p99g <= 1.0 + p99p && stale == 0 && busy_samples * 10 >= n * 9;
    printf("gate p99(flash.get) <= 1 ms + p99(ping) = %.3f ms, under load: %s\n", 1.0 + p99p,
           ok ? "met" : "NOT met");
    free(get_ms);
    free(ping_ms);
    return ok ? 0 : 1;
}
