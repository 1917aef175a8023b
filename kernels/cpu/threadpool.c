/* Persistent worker threads: a generation counter announces a job, a pending counter
 * reports completion. Workers spin on the generation for KVS_SPIN_NS before sleeping on it
 * with a futex; the dispatcher wakes sleepers only when some are asleep. */
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

#define KVS_SPIN_NS 300000 /* how long an idle worker spins before sleeping (0.3 ms) */

struct range_job {
    kvs_threadpool_range_fn fn;
    void *arg;
    int64_t n;     /* items */
    int64_t grain; /* piece boundaries are multiples of this */
};

struct kvs_threadpool {
    int32_t n_threads;               /* participants, the caller included */
    pthread_t *threads;              /* (n_threads - 1) workers */
    _Atomic uint32_t gen;            /* job generation; futex word */
    _Atomic int32_t pending;         /* workers of the current job not yet done */
    _Atomic int32_t n_sleeping;      /* workers in (or entering) futex_wait */
    _Atomic bool stop;               /* set before the last generation bump */
    kvs_threadpool_fn fn;            /* current job; written before gen is bumped */
    void *arg;
    int32_t nth;                     /* participants of the current job */
    struct range_job range;          /* scratch for kvs_threadpool_for, no allocation */
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
    atomic_fetch_add(&tp->n_sleeping, 1); /* seq_cst: pairs with the dispatcher's bump */
    uint32_t g;
    while ((g = atomic_load(&tp->gen)) == seen) {
        futex_wait(&tp->gen, seen);
    }
    atomic_fetch_sub(&tp->n_sleeping, 1);
    return g;
}

static void *worker_main(void *p)
{
    struct worker_arg wa = *(struct worker_arg *)p;
    free(p);
    kvs_threadpool *tp = wa.tp;
    uint32_t seen = 0;
    for (;;) {
        seen = wait_generation(tp, seen);
        if (atomic_load_explicit(&tp->stop, memory_order_acquire)) {
            break;
        }
        if (wa.ith < tp->nth) {
            tp->fn(tp->arg, wa.ith, tp->nth);
        }
        atomic_fetch_sub_explicit(&tp->pending, 1, memory_order_release);
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
    atomic_fetch_add(&tp->gen, 1);
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

void kvs_threadpool_run(kvs_threadpool *tp, int32_t max_threads, kvs_threadpool_fn fn,
                        void *arg)
{
    int32_t nth = tp->n_threads;
    if (max_threads > 0 && max_threads < nth) {
        nth = max_threads;
    }
    if (nth <= 1) {
        fn(arg, 0, 1);
        return;
    }
    tp->fn = fn;
    tp->arg = arg;
    tp->nth = nth;
    /* Every worker acknowledges every generation (idle ones too) so that the next job
     * never races with a worker still reading this one's fields. */
    atomic_store_explicit(&tp->pending, tp->n_threads - 1, memory_order_relaxed);
    atomic_fetch_add(&tp->gen, 1); /* seq_cst: publishes the job */
    if (atomic_load(&tp->n_sleeping) > 0) {
        futex_wake_all(&tp->gen);
    }
    fn(arg, 0, nth);
    for (uint32_t i = 0; atomic_load_explicit(&tp->pending, memory_order_acquire) != 0; i++) {
        cpu_relax();
        if ((i & 0xffff) == 0xffff) {
            sched_yield(); /* an oversubscribed machine: let the worker run */
        }
    }
}

static void range_trampoline(void *arg, int32_t ith, int32_t nth)
{
    const struct range_job *j = arg;
    int64_t n_grains = (j->n + j->grain - 1) / j->grain;
    int64_t g0 = n_grains * ith / nth;
    int64_t g1 = n_grains * (ith + 1) / nth;
    int64_t begin = g0 * j->grain;
    int64_t end = g1 * j->grain < j->n ? g1 * j->grain : j->n;
    if (begin < end) {
        j->fn(j->arg, begin, end, ith);
    }
}

void kvs_threadpool_for(kvs_threadpool *tp, int64_t n, int64_t grain, kvs_threadpool_range_fn fn,
                        void *arg)
{
    if (n <= 0) {
        return;
    }
    if (grain < 1) {
        grain = 1;
    }
    int64_t n_grains = (n + grain - 1) / grain;
    int64_t nth = n_grains / 2;
    if (nth > tp->n_threads) {
        nth = tp->n_threads;
    }
    if (nth <= 1) {
        fn(arg, 0, n, 0);
        return;
    }
    tp->range = (struct range_job){.fn = fn, .arg = arg, .n = n, .grain = grain};
    kvs_threadpool_run(tp, (int32_t)nth, range_trampoline, &tp->range);
}
