/* The coordinator's store calls that its request loop must not wait on (docs/CLUSTER.md,
 * "The store down for everyone").
 *
 * A store that hangs (etcd paused, a partition that drops packets) makes every call wait for
 * its timeout; a loop that waited would stop answering heartbeats and every worker would stop
 * serving. So the calls made for heartbeats and health checks (lease renewals, the lookup of
 * a silent worker's key) run on one thread of their own: the loop queues a job (at most one
 * per worker and kind, the caller's bookkeeping), goes on answering from memory, and picks up
 * the results on a later round. The queue also tells whether the store answers now
 * (kvs_storeq_healthy), so that the writes the loop still makes itself (registration,
 * session create/close, cordon, moves' records) are refused at once with UNAVAILABLE while it
 * does not, instead of each waiting for a timeout.
 *
 * Thread-safety: kvs_storeq_* are called by the coordinator's loop thread; the queue's own
 * thread only runs the jobs. */
#ifndef KVS_STOREQ_H
#define KVS_STOREQ_H

#include "common/store.h"
#include "coordinator/cmsg.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct kvs_storeq kvs_storeq;

enum kvs_storeq_kind {
    KVS_STOREQ_KEEPALIVE, /* renew lease once (kvs_store_lease_keepalive) */
    KVS_STOREQ_GET,       /* read key (kvs_store_get; NOT_FOUND when absent) */
};

struct kvs_storeq_job {
    enum kvs_storeq_kind kind;
    char worker[KVS_CMSG_WORKER_MAX + 1]; /* whose job ("" = the queue's own probe) */
    int64_t lease;                        /* KEEPALIVE: the lease renewed */
    char key[512];                        /* GET: the key read */
    int64_t token;                        /* the leadership it was queued under */
    /* results, set by the queue's thread */
    int status;         /* what the store call returned */
    int64_t started_ms; /* monotonic: when the call began */
    char err[256];      /* the store's reason when status < 0 */
};

/* A queue of at most cap jobs (queued, running and done together) on store (borrowed: it
 * must outlive the queue). NULL when out of memory or no thread can be started. */
kvs_storeq *kvs_storeq_new(kvs_store *store, size_t cap);
/* Stop the thread (after the call it is in, bounded by the store's timeout) and free the
 * queue with every job in it. Accepts NULL; nulls *q. */
void kvs_storeq_destroy(kvs_storeq **q);

/* Queue a copy of job. 0, or BUSY when the queue is full (try again later). */
int kvs_storeq_push(kvs_storeq *q, const struct kvs_storeq_job *job);
/* Move the oldest finished job into *out: true, or false when none has finished. */
bool kvs_storeq_pop_done(kvs_storeq *q, struct kvs_storeq_job *out);
/* Jobs queued or running (not yet popped as done). */
size_t kvs_storeq_pending(kvs_storeq *q);

/* Whether the store answers as far as anyone can tell now: false while the queue's current
 * call has run for more than stall_ms, or when the last call that finished (the queue's, or
 * one the loop made and reported with kvs_storeq_note) failed with UNAVAILABLE. */
bool kvs_storeq_healthy(kvs_storeq *q, int64_t now, int64_t stall_ms);
/* Report the status of a store call the loop made itself (0 or UNAVAILABLE count; other
 * errors say nothing about the store's health). */
void kvs_storeq_note(kvs_storeq *q, int status);

#endif
