/* Persistent worker threads with chunk claiming.
 *
 * Protocol: gen is odd while a job is open and even while closed. The caller writes the job
 * (closed), opens it (gen++), claims chunks itself, closes it (gen++) and waits until no
 * worker is inside (active == 0). A worker that sees an open generation enters (active++),
 * re-checks that the same generation is still open (else leaves without touching the job),
 * claims chunks until none are left and leaves (active--). A worker that wakes late finds the
 * job closed and skips it. active and gen are seq_cst so the caller's close and a worker's
 * entry are ordered: either the worker sees the close, or the caller sees the worker. */
#include "kernels/cpu/threadpool.h"

#include <assert.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define KVS_SPIN_NS 300000    /* how long an idle worker spins before sleeping (0.3 ms) */
#define KVS_WAIT_SPIN_NS 20000 /* the caller's pure spin on stragglers before yielding */

struct kvs_threadpool {
    int32_t n_threads;          /* participants, the caller included */
    pthread_t *threads;         /* (n_threads - 1) workers */
    _Atomic uint32_t gen;       /* odd: a job is open; futex word */
    _Atomic int32_t active;     /* workers inside the current job */
    _Atomic int32_t n_sleeping; /* workers in (or entering) futex_wait */
    _Atomic bool stop;          /* set before the last generation bump */
    /* the job: written only while closed with active == 0 */
    kvs_threadpool_range_fn fn;
    void *arg;
    int64_t n;             /* items */
    int64_t chunk;         /* items per chunk */
    int64_t n_chunks;      /* chunks */
    _Atomic int64_t next;  /* next chunk to claim */
    _Atomic uint64_t n_jobs, n_worker_chunks; /* statistics */
};

struct worker_arg {
    kvs_threadpool *tp;
    int32_t ith;
};

static void futex_wait(_Atomic uint32_t *addr, uint32_t val)
{
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}

static void futex_wake_all(_Atomic uint32_t *addr)
{
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Wait until gen differs from seen; returns the new generation. */
static uint32_t wait_generation(kvs_threadpool *tp, uint32_t seen)
{
    int64_t deadline = 0;
    for (uint32_t i = 0;; i++) {
        uint32_t g = atomic_load_explicit(&tp->gen, memory_order_acquire);
        if (g != seen) {
            return g;
        }
        cpu_relax();
        if ((i & 63) == 63) {
            int64_t t = now_ns();
            if (deadline == 0) {
                deadline = t + KVS_SPIN_NS;
            } else if (t > deadline) {
                break;
            }
        }
    }
    atomic_fetch_add(&tp->n_sleeping, 1); /* seq_cst: pairs with the caller's open */
    uint32_t g;
    while ((g = atomic_load(&tp->gen)) == seen) {
        futex_wait(&tp->gen, seen);
    }
    atomic_fetch_sub(&tp->n_sleeping, 1);
    return g;
}

/* Claim and run chunks of the open job until none are left; returns chunks run. */
static uint64_t run_chunks(kvs_threadpool *tp, int32_t ith)
{
    uint64_t done = 0;
    for (;;) {
        int64_t c = atomic_fetch_add_explicit(&tp->next, 1, memory_order_relaxed);
        if (c >= tp->n_chunks) {
            return done;
        }
        int64_t begin = c * tp->chunk;
        int64_t end = begin + tp->chunk < tp->n ? begin + tp->chunk : tp->n;
        tp->fn(tp->arg, begin, end, ith);
        done++;
    }
}

static void *worker_main(void *p)
{
    struct worker_arg wa = *(struct worker_arg *)p;
    free(p);
    kvs_threadpool *tp = wa.tp;
    uint32_t seen = 0;
    for (;;) {
        uint32_t g = wait_generation(tp, seen);
        seen = g;
        if (atomic_load(&tp->stop)) {
            break;
        }
        if ((g & 1) == 0) {
            continue; /* woke after the job closed */
        }
        atomic_fetch_add(&tp->active, 1);
        if (atomic_load(&tp->gen) == g) {
            uint64_t done = run_chunks(tp, wa.ith);
            if (done > 0) {
                atomic_fetch_add_explicit(&tp->n_worker_chunks, done, memory_order_relaxed);
            }
        }
        atomic_fetch_sub(&tp->active, 1); /* seq_cst: publishes the chunks' results */
    }
    return NULL;
}

kvs_threadpool *kvs_threadpool_new(int32_t n_threads)
{
    assert(n_threads >= 1);
    kvs_threadpool *tp = calloc(1, sizeof *tp);
    if (tp == NULL) {
        return NULL;
    }
    tp->threads = calloc((size_t)n_threads, sizeof *tp->threads);
    if (tp->threads == NULL) {
        free(tp);
        return NULL;
    }
    tp->n_threads = 1;
    for (int32_t i = 1; i < n_threads; i++) {
        struct worker_arg *wa = malloc(sizeof *wa);
        if (wa == NULL) {
            goto fail;
        }
        wa->tp = tp;
        wa->ith = i;
        if (pthread_create(&tp->threads[i - 1], NULL, worker_main, wa) != 0) {
            free(wa);
            goto fail;
        }
        tp->n_threads++;
    }
    return tp;
fail:
    kvs_threadpool_destroy(&tp);
    return NULL;
}

void kvs_threadpool_destroy(kvs_threadpool **tpp)
{
    if (tpp == NULL || *tpp == NULL) {
        return;
    }
    kvs_threadpool *tp = *tpp;
    atomic_store(&tp->stop, true);
    atomic_fetch_add(&tp->gen, 2); /* stays closed; any change wakes the workers */
    futex_wake_all(&tp->gen);
    for (int32_t i = 0; i < tp->n_threads - 1; i++) {
        pthread_join(tp->threads[i], NULL);
    }
    free(tp->threads);
    free(tp);
    *tpp = NULL;
}

int32_t kvs_threadpool_size(const kvs_threadpool *tp)
{
    return tp->n_threads;
}

void kvs_threadpool_stats(const kvs_threadpool *tp, uint64_t *n_jobs, uint64_t *n_worker_chunks)
{
    *n_jobs = atomic_load(&((kvs_threadpool *)tp)->n_jobs);
    *n_worker_chunks = atomic_load(&((kvs_threadpool *)tp)->n_worker_chunks);
}

void kvs_threadpool_for_chunks(kvs_threadpool *tp, int64_t n, int64_t grain,
                               int32_t chunks_per_thread, kvs_threadpool_range_fn fn, void *arg)
{
    if (n <= 0) {
        return;
    }
    if (grain < 1) {
        grain = 1;
    }
    int64_t n_grains = (n + grain - 1) / grain;
    if (tp->n_threads <= 1 || n_grains < 2) {
        fn(arg, 0, n, 0);
        return;
    }
    int64_t want = (int64_t)tp->n_threads * (chunks_per_thread > 0 ? chunks_per_thread : 1);
    int64_t grains_per_chunk = (n_grains + want - 1) / want;
    tp->fn = fn;
    tp->arg = arg;
    tp->n = n;
    tp->chunk = grains_per_chunk * grain;
    tp->n_chunks = (n + tp->chunk - 1) / tp->chunk;
    atomic_store_explicit(&tp->next, 0, memory_order_relaxed);
    atomic_fetch_add_explicit(&tp->n_jobs, 1, memory_order_relaxed);
    atomic_fetch_add(&tp->gen, 1); /* open (odd); seq_cst publishes the job */
    if (atomic_load(&tp->n_sleeping) > 0) {
        futex_wake_all(&tp->gen);
    }
    run_chunks(tp, 0);
    atomic_fetch_add(&tp->gen, 1); /* close (even) */
    int64_t t0 = 0;
    for (uint32_t i = 0; atomic_load(&tp->active) != 0; i++) {
        cpu_relax();
        if ((i & 63) == 63) { /* a straggler still finishing its chunk */
            int64_t t = now_ns();
            if (t0 == 0) {
                t0 = t;
            } else if (t - t0 > KVS_WAIT_SPIN_NS) {
                sched_yield();
            }
        }
    }
}

void kvs_threadpool_for(kvs_threadpool *tp, int64_t n, int64_t grain, kvs_threadpool_range_fn fn,
                        void *arg)
{
    kvs_threadpool_for_chunks(tp, n, grain, 4, fn, arg);
}
