/* Internals shared by coordinator/coord.c (the socket, the operations, the loop) and
 * coordinator/registry.c (the workers and sessions in memory and their records in the
 * store). Not for other modules: they use coordinator/coord.h. */
#ifndef KVS_COORD_IMPL_H
#define KVS_COORD_IMPL_H

#include "common/store.h"
#include "common/wire.h"
#include "coordinator/cmsg.h"
#include "coordinator/coord.h"
#include "coordinator/leader.h"
#include "coordinator/placement.h"

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#define MAX_WORKERS 4096
#define MAX_SESSIONS (1 << 20)

struct worker {
    char id[KVS_CMSG_WORKER_MAX + 1];
    char endpoint[KVS_CMSG_ENDPOINT_MAX + 1];
    char device[KVS_CMSG_DEVICE_MAX + 1];
    char model[65];
    int64_t cells_total;  /* the worker's pool, cells */
    int64_t cells_placed; /* budgets of the sessions placed on it, cells */
    int64_t n_sessions;   /* sessions placed on it */
    uint64_t cells_used, cells_reserved, cells_free, queue, sessions_reported; /* heartbeat */
    double load;             /* heartbeat: tokens/s */
    uint64_t *prefix_hashes; /* n_prefix_hashes, owned */
    uint32_t n_prefix_hashes;
    enum kvs_worker_state admin_state; /* READY, CORDONED or DRAINING (set by an admin) */
    int64_t last_hb_ms;                /* monotonic; 0 = not heard by this leader */
    int64_t lease;                     /* its lease in the store, 0 = none */
    int64_t lease_renewed_ms;          /* monotonic */
    bool down;                         /* lease expired and heartbeats stopped */
    int64_t down_checked_ms;
};

struct session_rec {
    char id[129];
    char worker[KVS_CMSG_WORKER_MAX + 1];
    char model[65];
    int64_t cells;        /* budget */
    uint64_t prefix_hash; /* 0 = none */
};

struct kvs_coord {
    struct kvs_coord_opts o;
    char cluster[64];
    char endpoint[KVS_CMSG_ENDPOINT_MAX + 1];
    char key_root[128]; /* /kvstream/<cluster>/ */
    kvs_store *store;
    bool own_store;
    kvs_leader *leader;
    int64_t token; /* the leadership the in-memory state was loaded under */
    void *zctx, *router;
    volatile sig_atomic_t stop;
    struct worker *workers; /* n_workers, unordered */
    size_t n_workers, cap_workers;
    struct session_rec *sessions; /* n_sessions, sorted by id */
    size_t n_sessions, cap_sessions;
    kvs_wire_buf out;
    int64_t last_tick_ms;
};

static inline int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static inline void *grow(void *p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) {
        return p;
    }
    size_t c = *cap ? *cap * 2 : 16;
    while (c < need) {
        c *= 2;
    }
    void *q = realloc(p, c * elem);
    if (q != NULL) {
        *cap = c;
    }
    return q;
}

/* ---- registry.c: keys and records (docs/CLUSTER.md) ---- */

/* /kvstream/<cluster>/workers/<id> and .../sessions/<id> into buf. */
void kvs_coord_worker_key(const kvs_coord *c, const char *id, char *buf, size_t len);
void kvs_coord_session_key(const kvs_coord *c, const char *id, char *buf, size_t len);
/* The records' JSON (malloc'd; NULL when out of memory). */
char *kvs_coord_worker_json(const struct worker *w);
char *kvs_coord_session_json(const struct session_rec *r);

/* ---- registry.c: the workers and sessions in memory ---- */

struct worker *kvs_coord_worker_find(kvs_coord *c, const char *id); /* NULL when unknown */
/* Index of session id in c->sessions (sorted), or where it would go (*found false). */
size_t kvs_coord_session_find(const kvs_coord *c, const char *id, bool *found);
/* Add (or replace) a session and count its budget on its worker. NO_MEMORY. */
int kvs_coord_session_add(kvs_coord *c, const struct session_rec *r);
/* Remove c->sessions[i] and give its budget back to its worker. */
void kvs_coord_session_remove(kvs_coord *c, size_t i);
/* Forget every worker and session (a standby holds none). */
void kvs_coord_state_clear(kvs_coord *c);
/* A new leader's view: every worker and session recorded in the store (malformed records are
 * logged and skipped). Store errors as kvs_store_range, NO_MEMORY. */
int kvs_coord_state_load(kvs_coord *c, char *err, size_t errlen);
/* READY / CORDONED / DRAINING as an admin set it, or UNHEALTHY when it is down or has not
 * heartbeated to this leader for unhealthy_ms. */
enum kvs_worker_state kvs_coord_worker_state(const kvs_coord *c, const struct worker *w,
                                             int64_t now);

#endif
