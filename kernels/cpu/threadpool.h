/* A fixed set of persistent worker threads for the CPU backend's parallel loops.
 *
 * The pool has n_threads participants: the calling thread (index 0) and n_threads - 1
 * workers (indices 1..n_threads-1). A call runs fn on every participant and returns when
 * all have finished. Workers spin briefly after each job (decode issues ~300 small jobs per
 * token, so a sleeping worker would cost a futex wake per op) and then sleep on a futex.
 * Dispatch allocates nothing.
 *
 * Thread-safety: one thread (the backend's driver) calls kvs_threadpool_run at a time.
 */
#ifndef KVS_CPU_THREADPOOL_H
#define KVS_CPU_THREADPOOL_H

#include <stdint.h>

typedef struct kvs_threadpool kvs_threadpool;

/* Work of participant ith (0..nth-1); nth is the same for all participants of one call. */
typedef void (*kvs_threadpool_fn)(void *arg, int32_t ith, int32_t nth);

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

/* Run fn(arg, ith, nth) on nth = min(max_threads, size) participants (max_threads <= 0
 * means all); nth == 1 runs inline without waking anyone. Returns after all finished. */
void kvs_threadpool_run(kvs_threadpool *tp, int32_t max_threads, kvs_threadpool_fn fn,
                        void *arg);

/* Static parallel-for over [0, n): the range is cut into nth contiguous pieces whose
 * boundaries are multiples of grain (except the end); fewer participants are used when
 * there are fewer than 2 grains per participant. The partition never affects results of
 * the CPU kernels (each output element is computed by exactly one participant in an order
 * that does not depend on the partition). */
void kvs_threadpool_for(kvs_threadpool *tp, int64_t n, int64_t grain, kvs_threadpool_range_fn fn,
                        void *arg);

#endif
