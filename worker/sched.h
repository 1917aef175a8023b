/* The scheduler: continuous batching of every session's work into one forward pass per step.
 *
 * Work arrives as jobs (appends, queries) and flash-query evaluations that the scheduler
 * queues itself after appends. Each step fills a row budget in priority order:
 *   1. decode rows of running queries (one row each),
 *   2. question prefills,
 *   3. append chunks (at most append_chunk rows of one append per step, so a huge append
 *      holds a query back by one step at most; one append per session at a time, sessions
 *      served round-robin; appends already begun before new ones begin, since an append is
 *      acknowledged at its last chunk),
 *   4. flash-query evaluations (prefill and decode), which get a guaranteed minimum share
 *      of the budget whenever they have work, so a busy stream cannot starve them,
 *   5. short steps while answers are in flight: in a step that already has rows of a
 *      query or flash evaluation when its appends are planned (or flash work waiting for
 *      its share), append rows stop where the step's rows reach answer_step_ms (the cost
 *      model's rows for it; default a quarter of the target), but take at least
 *      KVS_SCHED_MIN_ROWS so appends always move; flash prefills then take what is left
 *      of the full budget, as before. An answer needs a prefill step and one step per
 *      further token, each behind the step in flight: with this rule those steps last
 *      about answer_step_ms, not target_step_ms, so a flash answer is fresh again sooner
 *      after an append and a query's tokens come faster. The price is append latency near
 *      saturation: flash evaluations finish instead of waiting (and covering several
 *      appends at once), so that work goes before appends (bench/results/sched-*.md),
 * then runs one forward (worker/forward.h) over all the rows, samples, emits tokens and
 * completes jobs. Within a class the starting job rotates every step (no job starves).
 *
 * The step budget (rows = tokens per step) comes from a target step time, so that a query
 * that arrives waits at most one step of bounded length before its rows run:
 *     step_rows = clamp(floor(target_step_s / row_s), KVS_SCHED_MIN_ROWS, max_batch_tokens)
 *     row_s     = sum(w_i * seconds_i) / sum(w_i * rows_i) over the observed steps i,
 with w_i = KVS_SCHED_COST_DECAY^(steps since i): the time per row, a step's fixed costs
 * spread over its rows, smoothed over the last ~10 observed steps. Only steps that filled
 * at least half their budget are observed (a light step's fixed costs spread over a few
 * rows would overstate row_s and shrink the budget just before a burst). A step costs
 * overhead + b * rows with overhead >= 0, so this row_s is never below b and a budget
 * derived from steps that met the target never makes a step pass it (it errs short, and
 * grows towards the target as full steps come in). Until
 * KVS_SCHED_CALIBRATION_STEPS steps have been observed the budget is min(max_batch_tokens,
 * KVS_SCHED_COLD_ROWS). A step more than 20% slower than row_s predicts (the machine got
 * busier) restarts the average from that step alone, so one such step passes the target,
 * not as many as the old steps take to fade. max_batch_tokens stays the hard cap (the
 * batch and the logits buffer are sized by it). The stats expose the target, row_s and the
 * budget.
 *
 * Capacity (see docs/SESSIONS.md). A query reserves |question| + max_tokens cells at
 * acceptance, in the admission accounting and as real blocks of its fork; an append begins
 * (is logged) only when the real blocks of its whole record are free, and takes them. Without
 * overcommit the accounting never promises more than the pool holds, so these always
 * succeed: an admitted session's append never fails for lack of KV.
 *
 * Sliding (policy slide). A slide replaces every data block of the session by a shifted
 * copy or evicts it; a block that a query's fork still references stays allocated besides
 * (kept ones need a fresh copy, evicted ones are not freed), and no reservation covers
 * those cells. So a sliding append begins only when no fork of its session references a
 * data block (kvs_sess_slide_shared): while it waits at the head of its session's queue,
 *   - the session's flash evaluations in flight are cancelled (their answers would be stale
 *     at once; stats.slide_flash_cancelled), and none are queued until the append begins;
 *     the append queues them when it is done, as always. A stream whose appends slide more
 *     often than an evaluation takes keeps cancelling them: flash_get then computes (or
 *     serves the stale answer),
 *   - the session's running queries finish (bounded by their max_tokens and deadlines),
 *   - the session's new queries are accepted (cells reserved in the accounting, so BUSY
 *     still comes at submission) but fork only after the slide is done: they see the kept
 *     data without the sliding append (stats.queries_deferred),
 *   - the append waits up to its deadline (KVS_TIMEOUT, nothing applied) (stats.slide_waits).
 * Then the slide needs one free block at a time and the record's blocks are the session's
 * own: the append never fails for lack of KV. Other sessions are not held up.
 *
 * With overcommit > 1,
 * session budgets are admitted against capacity x overcommit and the real cells can run
 * out. Then, in this order:
 *   1. unreferenced cached prefix blocks are reclaimed (LRU; the pool does it on demand),
 *   2. flash evaluations are cancelled, youngest first, until the blocks needed are free
 *      (a cancelled evaluation's answer stays stale until the session's next append),
 *   3. while an append is waiting for cells ("pressure") new queries and new flash
 *      evaluations are refused (KVS_BUSY); a query that does not get its blocks after
 *      steps 1-2 is refused with KVS_BUSY at any time; running queries finish and free
 *      their cells,
 *   4. the append waits (not begun, not logged) until cells are free, up to its deadline,
 *      then fails with KVS_CAPACITY; an append without a deadline fails with KVS_CAPACITY
 *      at once.
 *
 * FIFO (opts.fifo): one request at a time, in arrival order, each to its end before the
 * next starts, as the synchronous session calls run them: an append is its whole record in
 * one forward (max_batch_tokens rows at a time if it is longer), a query or flash evaluation
 * its whole prefill in one forward and then one decode row per forward until it finishes; a
 * flash evaluation is queued behind what arrived before the append that triggered it ended.
 * No priorities, no chunking, no rows of two requests in one forward. A job that cannot
 * start (an append waiting for cells or for its session's forks, a deferred query) is
 * passed over for the next one; a job that has started is always finished first. The
 * admission, capacity and sliding rules above hold as they are.
 *
 * Semantics are those of worker/session.h: an append is logged before its first chunk and
 * acknowledged (callback) when its last chunk is in; a query forks the session at the data
 * completely appended before it was accepted (a concurrent append in progress is not
 * visible; behind a sliding append: the data that slide keeps) and reserves |question| +
 * max_tokens cells at acceptance (KVS_BUSY if they are not there). Jobs whose deadline passes before they start fail with KVS_TIMEOUT; a query
 * that is already running when its deadline passes is stopped with KVS_TIMEOUT.
 *
 * Time is a parameter (now, seconds on any monotonic clock) so that tests drive it; step
 * durations are measured with opts.clock (tests pass a fake one).
 * Thread-safety: one thread (the engine's) calls everything; callbacks run inside
 * kvs_sched_step. Do not mix the synchronous session calls that change a session
 * (append, flash register) with scheduler jobs on the same session; the synchronous calls
 * do not follow the overcommit order above.
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

#define KVS_SCHED_TARGET_STEP_MS 100.0 /* default target step time */
#define KVS_SCHED_MIN_ROWS 8             /* the budget never goes below this many rows */
#define KVS_SCHED_COLD_ROWS 32           /* rows per step until the cost model is calibrated */
#define KVS_SCHED_CALIBRATION_STEPS 4    /* observed steps before the model is trusted */
#define KVS_SCHED_COST_DECAY 0.9         /* weight kept by an observation per later step */
#define KVS_SCHED_OVERCOMMIT_MAX 16.0f   /* largest overcommit ratio accepted */
#define KVS_SCHED_ANSWER_STEP_SHARE 0.25 /* rule 5's step time, a share of the target */

struct kvs_sched_opts {
    int32_t max_batch_tokens; /* hard cap on rows per step (0 = the engine's max_batch_rows) */
    double target_step_ms;    /* wall time a step should take (0 = KVS_SCHED_TARGET_STEP_MS;
                               * < 0 = no target: max_batch_tokens rows every step) */
    double answer_step_ms;    /* rule 5: a step with answers in flight stops taking append
                               * rows here (0 = target_step_ms x KVS_SCHED_ANSWER_STEP_SHARE;
                               * < 0, or >= target_step_ms, = off; off without a target) */
    int32_t append_chunk;     /* rows of one append per step (0 = 64) */
    float flash_min_share;    /* budget share kept for flash work when it has any (0 = 0.1) */
    int32_t max_jobs_per_step;/* 0 = no limit; 1 = one request per step (the scheduler
                               * without cross-session batching, a benchmark row); then
                               * flash work's share is one step in 1/flash_min_share that
                               * has flash work */
    bool fifo;                /* the synchronous executor (the benchmarks' baseline): see
                               * FIFO below; overrides the priorities, append_chunk, the
                               * step budget, the flash share and max_jobs_per_step */
    float overcommit;         /* admit budgets against capacity x this (0 = 1 = off; at
                               * most KVS_SCHED_OVERCOMMIT_MAX); set on the registry */
    double (*clock)(void *user); /* seconds, for step durations (NULL = kvs_now) */
    void *clock_user;
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
    uint64_t refused;                     /* submissions refused (all causes below and bad input) */
    uint64_t refused_busy;                /* ... of them queries refused with KVS_BUSY */
    uint64_t admission_refused;           /* session creations refused with KVS_CAPACITY */
    uint64_t cancelled;                   /* jobs cancelled by kvs_sched_cancel */
    /* step time and budget */
    double target_step_s;                 /* the target (0: none) */
    double answer_step_s;                 /* rule 5's shorter target (0: off) */
    double last_step_s;                   /* wall seconds of the last step (opts.clock) */
    double max_step_s;                    /* longest step so far */
    double est_row_s;                     /* smoothed seconds per row (fixed costs included) */
    bool calibrated;                      /* the budget comes from the fitted model */
    int32_t step_rows;                    /* the budget of the last step, rows */
    float last_occupancy;                 /* rows of the last step / step_rows */
    /* KV, refreshed every step */
    int64_t cells_total;                  /* the pool */
    int64_t cells_used;                   /* in blocks some seq references (shared counted once) */
    int64_t cells_reserved;               /* promised to sessions and running queries */
    int64_t cells_free;                   /* neither used nor promised (admission's headroom;
                                           * with overcommit, of capacity x overcommit) */
    uint64_t prefix_hit_cells;            /* cells shared from the prefix index instead of computed */
    double prefix_saved_s;                /* ... forward time that saved, estimated (est_row_s) */
    int64_t prefix_cached_cells;          /* unreferenced prefix blocks kept for later hits */
    uint64_t reclaimed_cells;             /* cached prefix cells taken back for space */
    /* overcommit (all 0 without it) */
    bool pressure;                        /* an append waited for real cells in the last step */
    uint64_t append_waits;                /* appends that had to wait for real cells */
    uint64_t append_capacity;             /* appends failed with KVS_CAPACITY (no real cells) */
    uint64_t flash_cancelled;             /* flash evaluations cancelled to free cells */
    /* sliding appends (policy slide; see Capacity above) */
    uint64_t slide_waits;                 /* appends that waited for their session's forks */
    uint64_t slide_flash_cancelled;       /* flash evaluations cancelled for a slide */
    uint64_t queries_deferred;            /* queries that waited behind a sliding append */
    /* flash queries */
    uint64_t flash_evals;                 /* flash answers computed */
    uint64_t flash_wasted;                /* ... whose session had moved on when they completed */
    uint64_t flash_hits;                  /* flash_get served fresh (live sessions) */
    uint64_t flash_misses;                /* flash_get computed or stale (live sessions) */
};

typedef struct kvs_sched kvs_sched;

/* Called once per append: status 0 with *r (r->duplicate for a retry), or an error. */
typedef void (*kvs_sched_append_fn)(int status, const struct kvs_append_result *r,
                                    const char *err, void *user);
/* Called once per query: status 0 with *a (the callee owns it: kvs_answer_free), or an
 * error with a == NULL. */
typedef void (*kvs_sched_query_fn)(int status, struct kvs_answer *a, const char *err,
                                   void *user);

/* A scheduler over the sessions of S (borrowed; sets S's overcommit ratio). 0,
 * KVS_INVALID_ARGUMENT (overcommit outside [1, KVS_SCHED_OVERCOMMIT_MAX]), KVS_NO_MEMORY. */
int kvs_sched_new(kvs_sessions *S, const struct kvs_sched_opts *o, kvs_sched **out);
/* Fails every pending job with KVS_CANCELLED (callbacks run), then frees. Accepts NULL. */
void kvs_sched_destroy(kvs_sched **sc);

/* Queue an append of a text record to s. Returns 0 (done will be called from a step) or an
 * error (KVS_INVALID_ARGUMENT, tokenizer errors; done is then never called). From a step,
 * done gets the session's errors (worker/session.h), KVS_TIMEOUT (not begun by the
 * deadline), or KVS_CAPACITY (with overcommit: no real cells by the deadline). */
int kvs_sched_append(kvs_sched *sc, kvs_session *s, const char *text, size_t len,
                     uint64_t client_id, uint64_t client_seq, double deadline,
                     kvs_sched_append_fn done, void *user);

/* Accept a query: frame the question, reserve its cells, fork the session (behind a sliding
 * append of the session that has not begun: once that slide is done, see Capacity). Returns
 * 0 (done is called later; on_token streams text, may be NULL, and returning false from it
 * ends the answer there) or KVS_BUSY (no reserve, or appends are waiting for cells) /
 * KVS_INVALID_ARGUMENT / KVS_CONTEXT_FULL with err set (done never called). From a step,
 * done gets KVS_TIMEOUT, or KVS_BUSY for a deferred query whose fork finds no real cells
 * (with overcommit only). Stateless queries are not scheduled. */
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

/* Counters, refreshed at the end of every step (borrowed until the scheduler is destroyed). */
const struct kvs_sched_stats *kvs_sched_stats(const kvs_sched *sc);

#endif
