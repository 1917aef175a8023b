/* Placement policy: which worker gets a new session. A pure function over worker records and
 * a request; no I/O, no clock, no state, so it is tested on its own (tests/test_placement.c)
 * and the coordinator can call it under its lock.
 *
 * The rule, in order:
 *   1. eligible: state READY (never cordoned, draining or unhealthy), serving the requested
 *      model (SHA-256 of the model file, compared exactly), with n_cells_free >= what the
 *      budget reserves there (kvs_placement_cells_reserved);
 *   2. prefix affinity: if any eligible worker has the request's prefix hash cached, only
 *      those are considered (a cache hit saves the prefix's prefill, as SGLang's cache-aware
 *      router does);
 *   3. best fit: the fewest free cells left after the reservation (keeps big holes for big
 *      sessions);
 *   4. ties: the smaller worker id (bytewise), so the choice is deterministic.
 * When nothing is eligible the reason says why, worker by worker class:
 *   UNAVAILABLE     no worker is READY (none registered, or all cordoned/draining/unhealthy)
 *   MODEL_MISMATCH  READY workers exist but none serves the model
 *   CAPACITY        some serve the model but none has the cells (the reason gives the largest
 *                   free count)
 */
#ifndef KVS_PLACEMENT_H
#define KVS_PLACEMENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVS_SHA256_HEX 64 /* characters of a model SHA-256 in hex */

enum kvs_worker_state {
    KVS_WORKER_READY,
    KVS_WORKER_CORDONED,  /* keeps its sessions, gets no new ones (admin) */
    KVS_WORKER_DRAINING,  /* its sessions are being moved away */
    KVS_WORKER_UNHEALTHY, /* heartbeats stopped or its lease expired */
};

/* "ready", "cordoned", "draining", "unhealthy"; "?" outside the enum. */
const char *kvs_worker_state_name(enum kvs_worker_state s);
/* Parse a state name; -1 when unknown. */
int kvs_worker_state_parse(const char *name);

/* What the policy knows of a worker. Strings are borrowed for the call. */
struct kvs_worker_info {
    const char *id;           /* unique worker id: the tie-break */
    const char *model_sha256; /* hex SHA-256 of the model it serves */
    int64_t n_cells_capacity; /* cells, the whole pool */
    int64_t n_cells_free;     /* cells not used nor reserved */
    int64_t block_size;       /* cells per block of its pool: a budget costs more there
                               * (kvs_placement_cells_reserved); 0 = budgets cost themselves */
    enum kvs_worker_state state;
    const uint64_t *prefix_hashes; /* n_prefix_hashes prefix hashes it has cached */
    size_t n_prefix_hashes;
};

struct kvs_placement_request {
    const char *model_sha256; /* the model the session needs */
    int64_t n_cells;          /* the session's budget, cells (> 0) */
    uint64_t prefix_hash;     /* hash of its pinned prefix; 0 = none */
};

struct kvs_placement {
    size_t index;         /* into the workers array */
    bool prefix_hit;      /* chosen for its cached prefix */
    int64_t n_cells_left; /* its free cells after the budget */
};

/* The cells a budget of n_cells reserves on worker w: as a kvs-worker admits it
 * (worker/session.c), whole blocks plus one for a fork's copy-on-write tail, when w gave its
 * block size; n_cells otherwise. */
int64_t kvs_placement_cells_reserved(const struct kvs_worker_info *w, int64_t n_cells);

/* Choose a worker for rq among workers[0..n). 0 with *out filled, or UNAVAILABLE,
 * MODEL_MISMATCH, CAPACITY (above) or INVALID_ARGUMENT (n_cells <= 0, no model) with a
 * one-line reason in reason[0..reason_len). Thread-safe (touches nothing but its
 * arguments). */
int kvs_placement_choose(const struct kvs_worker_info *workers, size_t n,
                         const struct kvs_placement_request *rq, struct kvs_placement *out,
                         char *reason, size_t reason_len);

#endif
