/* The scheduler: continuous batching of every session's work into one forward pass per step.
 *
 * Work arrives as jobs (appends, queries) and flash-query evaluations that the scheduler
 * queues itself after appends. Each step fills a row budget in priority order:
 *   1. decode rows of running queries (one row each),
 *   2. question prefills,
 *   3. append chunks (at most append_chunk rows of one append per step, so a huge append
 *      holds a query back by one step at most; one append per session at a time, sessions
 *      served round-robin),
 *   4. flash-query evaluations (prefill and decode), which get a guaranteed minimum share
 *      of the budget whenever they have work, so a busy stream cannot starve them,
 * then runs one forward (worker/forward.h) over all the rows, samples, emits tokens and
 * completes jobs. Within a class the starting job rotates every step (no job starves).
 *
 * Semantics are those of worker/session.h: an append is logged before its first chunk and
 * acknowledged (callback) when its last chunk is in; a query forks the session at the data
 * completely appended before it was accepted (a concurrent append in progress is not
 * visible) and reserves |question| + max_tokens cells at acceptance (KVS_BUSY if they are
 * not there). Jobs whose deadline passes before they start fail with KVS_TIMEOUT; a query
 * that is already running when its deadline passes is stopped with KVS_TIMEOUT.
 *
 * Time is a parameter (now, seconds on any monotonic clock) so that tests drive it.
 * Thread-safety: one thread (the engine's) calls everything; callbacks run inside
 * kvs_sched_step. Do not mix the synchronous session calls that change a session
 * (append, flash register) with scheduler jobs on the same session.
 */
#ifndef KVS_SCHED_H
#define KVS_SCHED_H

#include <stdbool.h>
#include <stdint.h>

#include "worker/session.h"

enum kvs_job_class {
    KVS_CLASS_DECODE = 0,
    KVS_CLASS_QUESTION = 1,
    KVS_CLASS_APPEND = 2,
    KVS_CLASS_FLASH = 3,
    KVS_N_CLASSES = 4,
};

struct kvs_sched_opts {
    int32_t max_batch_tokens; /* rows per step (0 = the engine's max_batch_rows) */
    int32_t append_chunk;     /* rows of one append per step (0 = 64) */
    float flash_min_share;    /* budget share kept for flash work when it has any (0 = 0.1) */
    int32_t max_jobs_per_step;/* 0 = no limit; 1 = one request at a time (the no-batching
                               * baseline of the benchmarks) */
};

struct kvs_sched_stats {
    uint64_t steps;                       /* steps that ran a forward */
    uint64_t rows[KVS_N_CLASSES];         /* rows computed, per class */
    int32_t last_rows[KVS_N_CLASSES];     /* rows of the last step, per class */
    int32_t last_n_seqs;                  /* distinct seqs in the last step's batch */
    int32_t max_n_seqs;                   /* most distinct seqs in one step */
    int32_t queued[KVS_N_CLASSES];        /* jobs waiting or running, per class */
    uint64_t completed;                   /* jobs finished successfully */
    uint64_t expired;                     /* jobs failed with KVS_TIMEOUT */
    uint64_t refused;                     /* submissions refused (BUSY, bad input) */
    uint64_t cancelled;                   /* jobs cancelled by kvs_sched_cancel */
    uint64_t flash_evals;                 /* flash answers computed */
    uint64_t flash_wasted;                /* ... whose session had moved on when they completed */
    double last_step_s;                   /* wall seconds of the last step */
    float last_occupancy;                 /* rows of the last step / max_batch_tokens */
    /* KV, refreshed every step */
    int64_t cells_total;                  /* the pool */
    int64_t cells_used;                   /* in blocks some seq references (shared counted once) */
    int64_t cells_reserved;               /* promised to sessions and running queries */
    int64_t cells_free;                   /* neither used nor promised (admission's headroom) */
    uint64_t prefix_hit_cells;            /* cells shared from the prefix index instead of computed */
    int64_t prefix_cached_cells;          /* unreferenced prefix blocks kept for later hits */
};

typedef struct kvs_sched kvs_sched;

/* Called once per append: status 0 with *r (r->duplicate for a retry), or an error. */
typedef void (*kvs_sched_append_fn)(int status, const struct kvs_append_result *r,
                                    const char *err, void *user);
/* Called once per query: status 0 with *a (the callee owns it: kvs_answer_free), or an
 * error with a == NULL. */
typedef void (*kvs_sched_query_fn)(int status, struct kvs_answer *a, const char *err,
                                   void *user);

/* A scheduler over the sessions of S (borrowed). 0, KVS_INVALID_ARGUMENT, KVS_NO_MEMORY. */
int kvs_sched_new(kvs_sessions *S, const struct kvs_sched_opts *o, kvs_sched **out);
/* Fails every pending job with KVS_CANCELLED (callbacks run), then frees. Accepts NULL. */
void kvs_sched_destroy(kvs_sched **sc);

/* Queue an append of a text record to s. Returns 0 (done will be called from a step) or an
 * error (KVS_INVALID_ARGUMENT, tokenizer errors; done is then never called). */
int kvs_sched_append(kvs_sched *sc, kvs_session *s, const char *text, size_t len,
                     uint64_t client_id, uint64_t client_seq, double deadline,
                     kvs_sched_append_fn done, void *user);

/* Accept a query: frame the question, reserve its cells, fork the session. Returns 0 (done
 * is called later; on_token streams text, may be NULL) or KVS_BUSY / KVS_INVALID_ARGUMENT /
 * KVS_CONTEXT_FULL with err set (done never called). Stateless queries are not scheduled. */
int kvs_sched_query(kvs_sched *sc, kvs_session *s, const char *question, size_t len,
                    const struct kvs_query_opts *o, double deadline, kvs_token_fn on_token,
                    kvs_sched_query_fn done, void *user, char *err, size_t errlen);

/* Cancel every queued or running append and query submitted with this user pointer (the
 * client went away, or gave up): each one's callback runs before this returns, with
 * KVS_CANCELLED, and is never called again; on_token is not called again either. A query's
 * fork and reserved cells are released. An append that has already begun (its record is in
 * the log and the session's token record) cannot be withdrawn: it is finished without an
 * acknowledgement, and its callback says so in err; a retry with the same client sequence
 * number gets the original acknowledgement. Jobs submitted from inside the callbacks are
 * not touched. Returns how many jobs were cancelled (0 when none, and for user == NULL:
 * flash evaluations, which have no user, are not cancelled this way). May be called from a
 * callback during kvs_sched_step; the jobs are then freed at the end of the step. */
int kvs_sched_cancel(kvs_sched *sc, void *user);

/* One step at time now. Returns the rows computed (0 when there was nothing to do) or a
 * negative status from the forward pass. */
int kvs_sched_step(kvs_sched *sc, double now);

/* True while any job is queued or running. */
bool kvs_sched_busy(const kvs_sched *sc);

const struct kvs_sched_stats *kvs_sched_stats(const kvs_sched *sc);

#endif
