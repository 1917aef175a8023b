/* Internals shared by coordinator/coord.c (the socket, the operations, the loop) and
 * coordinator/registry.c (the workers and sessions in memory and their records in the
 * store). Not for other modules: they use coordinator/coord.h. */
#ifndef KVS_COORD_IMPL_H
#define KVS_COORD_IMPL_H

#include "common/curve.h"
#include "common/store.h"
#include "common/wire.h"
#include "coordinator/cmsg.h"
#include "coordinator/coord.h"
#include "coordinator/leader.h"
#include "coordinator/placement.h"
#include "coordinator/storeq.h"

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
    int64_t block_size;   /* cells per block of its pool (register); 0 = not sent */
    int64_t cells_placed; /* what the sessions placed on it reserve there, cells
                           * (kvs_coord_cells_reserved of each budget) */
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
    bool renewing;      /* a renewal of lease is queued on c->storeq */
    bool checking;      /* a lookup of its key (is it down?) is queued on c->storeq */
    bool lease_expired; /* a renewal found lease gone: its next heartbeat answers NOT_FOUND */
};

#define SESSION_ERROR_MAX 240 /* bytes of a session's error (why it cannot be served) */

struct session_rec {
    char id[129];
    char worker[KVS_CMSG_WORKER_MAX + 1]; /* its owner, or where it is being restored */
    char model[65];
    int64_t cells;                      /* budget */
    uint64_t prefix_hash;               /* 0 = none */
    char from[KVS_CMSG_WORKER_MAX + 1]; /* a restore order is outstanding: its files are in
                                         * this worker's directory or moved to worker's
                                         * already; "" = none (recorded) */
    char error[SESSION_ERROR_MAX + 1];  /* why it cannot be served (a restore that failed);
                                         * "" = none (recorded) */
    bool moving;                        /* a move holds it (moves.c): not placed again, not
                                         * closed; in memory only */
    int64_t retry_ms;                   /* monotonic: not re-placed before this (INT64_MAX =
                                         * not until its worker registers again) */
};

struct kvs_move;  /* moves.c: one session being restored or moved (a request to a worker) */
struct kvs_drain; /* moves.c: an admin.drain in progress */

struct kvs_coord {
    struct kvs_coord_opts o;
    char cluster[64];
    char endpoint[KVS_CMSG_ENDPOINT_MAX + 1];
    char key_root[128]; /* /kvstream/<cluster>/ */
    kvs_store *store;
    bool own_store;
    kvs_storeq *storeq; /* the store calls the loop does not wait on (storeq.h) */
    kvs_leader *leader;
    int64_t token;        /* the leadership the in-memory state was loaded under */
    int64_t led_since_ms; /* monotonic: when that leadership began (its state loaded) */
    void *zctx, *router;
    kvs_curve_zap *zap;                        /* CURVE client allow-list (NULL = none) */
    char curve_pub[KVS_CURVE_KEY_Z85 + 1];     /* own key pair toward CURVE workers */
    char curve_sec[KVS_CURVE_KEY_Z85 + 1];
    volatile sig_atomic_t stop;
    struct worker *workers; /* n_workers, unordered */
    size_t n_workers, cap_workers;
    struct session_rec *sessions; /* n_sessions, sorted by id */
    size_t n_sessions, cap_sessions;
    kvs_wire_buf out;
    int64_t last_tick_ms;
    int64_t last_probe_ms;   /* the last probe of a store that stopped answering */
    struct kvs_move **moves; /* n_moves in flight, owned */
    size_t n_moves, cap_moves;
    struct kvs_drain **drains; /* n_drains in progress, owned */
    size_t n_drains, cap_drains;
    uint64_t next_request_id; /* ids of the coordinator's requests to workers */
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

/* The cells a session of budget cells reserves on worker w: what kvs_session_create does
 * (worker/session.c, kvs_sess_blocks_for): whole blocks, plus one for a fork's copy-on-write
 * of a shared partial tail. A worker that did not send its block size (protocol minor < 2)
 * is taken at its word: the budget. */
static inline int64_t kvs_coord_cells_reserved(const struct worker *w, int64_t cells)
{
    struct kvs_worker_info info = {.block_size = w != NULL ? w->block_size : 0};
    return kvs_placement_cells_reserved(&info, cells);
}

/* Make s printable ASCII in place (other bytes become '?'): a session's error is cut to a
 * fixed size, which may split a UTF-8 sequence. */
static inline void kvs_coord_ascii(char *s)
{
    for (; *s != '\0'; s++) {
        if ((unsigned char)*s < 0x20 || (unsigned char)*s >= 0x7f) {
            *s = '?';
        }
    }
}

/* Before a store call the loop makes itself: UNAVAILABLE with a reason when the store is not
 * answering now (kvs_storeq_healthy), so the call is not made and the loop does not wait for
 * its timeout; else 0 (coord.c). */
int kvs_coord_store_ready(kvs_coord *c, char *err, size_t errlen);
/* The loop's fenced writes (kvs_leader_put / kvs_leader_txn / kvs_leader_delete), refused at
 * once with UNAVAILABLE while the store is not answering (kvs_coord_store_ready); their
 * outcome is reported to the store's health (kvs_storeq_note). Errors as those. */
int kvs_coord_put(kvs_coord *c, const char *key, const char *json, int64_t lease, char *err,
                  size_t errlen);
int kvs_coord_txn(kvs_coord *c, const struct kvs_store_cmp *cmp, size_t n_cmp,
                  const struct kvs_store_op *ok, size_t n_ok, bool *succeeded, char *err,
                  size_t errlen);
int kvs_coord_delete(kvs_coord *c, const char *key, char *err, size_t errlen);

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
/* The placement policy (coordinator/placement.h) over the workers as this leader sees them:
 * free cells = cells_total - cells_placed. 0 with *p (p->index into c->workers), or the
 * policy's UNAVAILABLE / MODEL_MISMATCH / CAPACITY with err. NO_MEMORY. */
int kvs_coord_place(kvs_coord *c, const char *model, int64_t cells, uint64_t prefix_hash,
                    struct kvs_placement *p, char *err, size_t errlen);
/* Record r in the store as it is now (a fenced put of its JSON). Store errors, NOT_LEADER,
 * NO_MEMORY. */
int kvs_coord_session_record(kvs_coord *c, const struct session_rec *r, char *err, size_t errlen);
/* Move the budget of session i to worker `to` (in memory; the record is the caller's). */
void kvs_coord_session_reassign(kvs_coord *c, size_t i, const char *to);

/* ---- moves.c: restoring a down worker's sessions elsewhere, and drains ---- */

/* Every tick of a leader: time out and resend requests to workers, start restores of down
 * workers' sessions (with shared_data_dir), advance drains. */
void kvs_coord_moves_tick(kvs_coord *c, int64_t now);
/* Poll items of the moves' sockets into items[0..max) (one per move in flight); their count. */
size_t kvs_coord_moves_poll_items(kvs_coord *c, void *items, size_t max);
/* Read the replies the poll found on items[0..n) (as kvs_coord_moves_poll_items gave them). */
void kvs_coord_moves_on_replies(kvs_coord *c, const void *items, size_t n);
/* admin.drain: mark worker draining and start moving its sessions; the reply is sent when
 * every move is done (the request's ident and id are kept). 0 (started), or NOT_FOUND,
 * UNAVAILABLE (the worker is down, re-placement by restore is off, the store), BUSY (a
 * drain of it is running), NO_MEMORY, with err. */
int kvs_coord_drain_start(kvs_coord *c, const char *worker, const void *ident, size_t ident_len,
                          uint64_t id, char *err, size_t errlen);
/* A standby or a closing coordinator: abandon every move (sessions stay as recorded; a new
 * leader resends outstanding restore orders) and answer pending drains with reason. */
void kvs_coord_moves_clear(kvs_coord *c, int status, const char *reason);
/* Send a reply (ident, the delimiter, data) on the router: coord.c's. */
void kvs_coord_send(kvs_coord *c, const void *ident, size_t ident_len, const void *data,
                    size_t len);

#endif
