/* A fixed set of persistent worker threads for the CPU backend's parallel loops.
 *
 * The pool has n_threads participants: the calling thread (index 0) and n_threads - 1
 * workers (indices 1..n_threads-1). A parallel-for cuts its range into a few chunks per
 * participant (boundaries at multiples of grain) and every participant claims chunks until
 * none are left, so a worker that the OS has descheduled (a busy machine) delays nothing:
 * the caller takes its chunks. Which participant computes a chunk never changes results
 * (each CPU kernel computes an output element in an order of its own). Workers spin briefly
 * after each job (decode issues ~300 small jobs per token) and then sleep on a futex.
 * Dispatch allocates nothing.
 *
 * Thread-safety: one thread (the backend's driver) calls kvs_threadpool_run at a time.
 */
#ifndef KVS_CPU_THREADPOOL_H
#define KVS_CPU_THREADPOOL_H

#include <stdint.h>

typedef struct kvs_threadpool kvs_threadpool;

/* Work on items [begin, end) of a parallel-for; ith is the participant's index (for
 * per-thread scratch). */
typedef void (*kvs_threadpool_range_fn)(void *arg, int64_t begin, int64_t end, int32_t ith);

/* Start n_threads - 1 workers (n_threads >= 1). Returns NULL on failure. Caller frees with
 * kvs_threadpool_destroy. */
kvs_threadpool *kvs_threadpool_new(int32_t n_threads);

/* Stop and join the workers; accepts NULL and *tp == NULL; sets *tp to NULL. */
void kvs_threadpool_destroy(kvs_threadpool **tp);

/* Participants, the caller included. */
int32_t kvs_threadpool_size(const kvs_threadpool *tp);

/* Parallel-for over [0, n): fn runs on disjoint pieces covering [0, n), each piece a run
 * of whole chunks (chunk = a multiple of grain, ~chunks_per_thread chunks per participant;
 * the last piece may end at n). A range of fewer than 2 grains runs inline on the caller
 * without waking anyone. Returns when every piece is done. */
void kvs_threadpool_for(kvs_threadpool *tp, int64_t n, int64_t grain, kvs_threadpool_range_fn fn,
                        void *arg);

/* The same with an explicit number of chunks per participant (more = better balance for
 * uneven items, e.g. causal attention rows; fewer = less claiming traffic). */
void kvs_threadpool_for_chunks(kvs_threadpool *tp, int64_t n, int64_t grain,
                               int32_t chunks_per_thread, kvs_threadpool_range_fn fn, void *arg);

/* Dispatches that ran on the workers since creation, and how many of their chunks the
 * workers (not the caller) computed: a health signal for benchmarks. */
void kvs_threadpool_stats(const kvs_threadpool *tp, uint64_t *n_jobs, uint64_t *n_worker_chunks);

#endif
