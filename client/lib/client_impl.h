/* libkvstream internals shared by client.c (connections, calls, retries, MOVED, NOT_LEADER),
 * cluster.c (sessions located through a coordinator) and ops.c (one function per operation:
 * request fields in, reply fields out). */
#ifndef KVS_CLIENT_IMPL_H
#define KVS_CLIENT_IMPL_H

#include "client/include/kvstream.h"
#include "common/curve.h"
#include "common/wire.h"

#include <msgpack.h>
#include <stdatomic.h>
#include <zmq.h>

#define CLIENT_MAX_CONNS 8         /* sockets: the home endpoint + MOVED targets */
#define CLIENT_MAX_ROUTES 4096     /* session -> endpoint entries (oldest dropped first) */
#define CLIENT_MAX_SEQS 4096       /* per-session append numbering entries */
#define CLIENT_ENDPOINT_MAX 256    /* bytes of an endpoint, NUL included */
#define CLIENT_MAX_REPLY (16u << 20) /* ZMQ_MAXMSGSIZE of a client socket */
#define CLIENT_CONNECT_WAIT_MS 2000 /* through a coordinator: a worker that accepts no
                                       connection for this long is unreachable (re-locate) */

struct client_conn {
    char endpoint[CLIENT_ENDPOINT_MAX];
    void *sock;                    /* DEALER; NULL when the slot is free */
    uint64_t last_used;            /* call counter at the last use (eviction) */
    bool immediate;                /* ZMQ_IMMEDIATE: a worker socket behind a coordinator;
                                      sends wait for a connection, a lost one is noticed */
};

struct client_route {
    char *session;                 /* owned */
    char endpoint[CLIENT_ENDPOINT_MAX];
    uint64_t last_used;
};

struct client_seq {
    char *session;                 /* owned */
    uint64_t last;                 /* client_seq of the last append sent with an outcome */
    bool uncertain;                /* the last one timed out: applied once or not at all */
};

struct kvs_client {
    void *zctx;                    /* owned ZeroMQ context */
    struct client_conn conns[CLIENT_MAX_CONNS]; /* [0] = home */
    struct client_route *routes;   /* n_routes used of cap_routes */
    int32_t n_routes, cap_routes;
    struct client_seq *seqs;       /* n_seqs used of cap_seqs */
    int32_t n_seqs, cap_seqs;
    uint64_t client_id;
    uint64_t next_id;              /* request ids, >= 1 */
    uint64_t n_calls;              /* call counter (LRU clock) */
    int32_t timeout_ms, retries, max_redirects;
    atomic_int cancel;             /* set by kvs_client_cancel */
    char err[512];                 /* last failure's message */
    char moved_owner[CLIENT_ENDPOINT_MAX]; /* owner named by the last MOVED reply */
    kvs_wire_buf req;              /* the request being built */
    uint32_t req_keys;             /* keys packed into req */
    zmq_msg_t reply_msg;           /* payload frame of the current reply (kept: up points in) */
    bool have_reply;
    msgpack_unpacked up;           /* the current reply */
    /* the call in progress: its id and socket (for streamed replies and cancel) */
    uint64_t cur_id;
    struct client_conn *cur_conn;
    int64_t cur_deadline;          /* ms on the monotonic clock */
    bool from_worker;              /* the last error status came in an error reply */
    bool lost;                     /* the last wait ended because the connection was lost */
    uint64_t minor;                /* the worker's protocol minor version (hello) */
    bool coord;                    /* home is a kvs-coordinator (PROTOCOL.md section 9):
                                      sessions are located, workers talked to directly */
    char leader[CLIENT_ENDPOINT_MAX]; /* leader named by the last NOT_LEADER reply ("" none) */
    bool curve;                    /* every socket is a CURVE client with these Z85 keys: */
    char curve_server[KVS_CURVE_KEY_Z85 + 1]; /* the servers' public key */
    char curve_pub[KVS_CURVE_KEY_Z85 + 1];    /* ours */
    char curve_sec[KVS_CURVE_KEY_Z85 + 1];
};

/* ---- building a request (client.c) ---- */

/* Start a request map {"id": <patched at send>, "op": op}. */
void client_req_begin(kvs_client *c, const char *op);
void client_req_str(kvs_client *c, const char *key, const char *s, size_t n);
void client_req_cstr(kvs_client *c, const char *key, const char *s);
void client_req_u64(kvs_client *c, const char *key, uint64_t v);
void client_req_f64(kvs_client *c, const char *key, double v);
void client_req_bool(kvs_client *c, const char *key, bool v);
/* Start an array value under key; the caller packs n elements with c->req.pk. */
void client_req_array(kvs_client *c, const char *key, size_t n);

/* ---- calls (client.c) ---- */

enum client_call_flags {
    CALL_RETRY = 1,                /* safe to send again after a timeout */
    CALL_STREAM = 2,               /* the reply is streamed: more follow the first one */
};

/* Send the built request (routed by session, which may be NULL) and wait for its first reply:
 * 0 and *reply (borrowed until the next receive on c), or a negative status with c->err set
 * (an error reply, TIMEOUT, CANCELLED, BAD_FORMAT). Retries, back-off, MOVED and NOT_LEADER
 * as described in kvstream.h. Through a coordinator a session's request goes to its worker,
 * located first and re-located when the worker lost it (client_session_call, cluster.c). */
int client_call(kvs_client *c, const char *session, int flags, const msgpack_object **reply);

/* What every call does first (client_call does it): clear the error, tick the LRU clock,
 * forget a cancel that came between calls. */
void client_call_begin(kvs_client *c);

/* client_call without locating: to endpoint when not NULL, else session's route, else home.
 * A timeout with no answer drops session's route; behind a coordinator it then returns at
 * once (the caller re-locates) instead of trying home. */
int client_call_to(kvs_client *c, const char *session, const char *endpoint, int flags,
                   const msgpack_object **reply);

/* The next reply of the streamed call in progress (same id), before the call's deadline. */
int client_next(kvs_client *c, const msgpack_object **reply);

/* Wait up to wait_ms for a reply to id on k (replies to other ids dropped). */
int client_recv(kvs_client *c, struct client_conn *k, uint64_t id, int32_t wait_ms,
                const msgpack_object **reply);

/* Send the built request on k (no retries); its id in *id. */
int client_send(kvs_client *c, struct client_conn *k, uint64_t *id);

/* The socket of session's route, or home. */
int client_conn_for(kvs_client *c, const char *session, struct client_conn **k);

/* Close and reopen k's socket. */
int client_conn_reset(kvs_client *c, struct client_conn *k);

/* Stop the streamed call in progress: send `cancel` for it, wait briefly for its final reply,
 * and otherwise reset its socket so that nothing of it is read later. */
void client_abandon(kvs_client *c);

/* Record a failure message; returns status. */
int client_fail(kvs_client *c, int status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* ---- reading replies (client.c) ---- */

bool mp_u64(const msgpack_object *o, uint64_t *v);
bool mp_i64(const msgpack_object *o, int64_t *v);
bool mp_f64(const msgpack_object *o, double *v);
bool mp_bool(const msgpack_object *o, bool *v);
bool mp_str(const msgpack_object *o, const char **s, size_t *n);

/* Required fields: 0, or BAD_FORMAT naming the key (c->err set). */
int rep_u64(kvs_client *c, const msgpack_object *m, const char *key, uint64_t *v);
int rep_i64(kvs_client *c, const msgpack_object *m, const char *key, int64_t *v);
int rep_f64(kvs_client *c, const msgpack_object *m, const char *key, double *v);
int rep_bool(kvs_client *c, const msgpack_object *m, const char *key, bool *v);
/* A string copied into buf[0..size) (truncated), NUL-terminated. */
int rep_strbuf(kvs_client *c, const msgpack_object *m, const char *key, char *buf, size_t size);
/* An array of strings, malloc'd (kvs_client_names_free): the elements themselves, or with
 * field != NULL the string field of each element (an array of maps). */
int rep_names(kvs_client *c, const msgpack_object *m, const char *key, const char *field,
              char ***names, int32_t *n);

/* Record that session lives at endpoint (MOVED, locate). Best effort: without memory, no
 * route. */
void client_route_set(kvs_client *c, const char *session, const char *endpoint);
/* session's route (borrowed until the routes change), or NULL. */
struct client_route *client_route_find(kvs_client *c, const char *session);
void client_route_drop(kvs_client *c, const char *session);

/* A built request put aside while another one is made (a locate in the middle of a call). */
struct client_held {
    char *data;                    /* owned copy of the request bytes */
    size_t size;
    uint32_t keys;
};
/* 0, or NO_MEMORY. */
int client_req_hold(kvs_client *c, struct client_held *h);
/* Make h the built request again and free h. */
void client_req_restore(kvs_client *c, struct client_held *h);

/* Monotonic clock, ms; sleep that looks at the cancel flag (false when cancelled). */
int64_t client_now_ms(void);
bool client_sleep(kvs_client *c, int64_t ms);

/* ---- through a coordinator (cluster.c) ---- */

/* client_call for a session's request: locate it (cached route), send it to its worker, and
 * on NOT_FOUND, UNAVAILABLE, MOVED without an owner or an unreachable worker locate it again
 * with back-off (a session the coordinator re-placed is found on its new worker). */
int client_session_call(kvs_client *c, const char *session, int flags,
                        const msgpack_object **reply);

/* Ask the coordinator where session lives and route it there. 0, or its error (NOT_FOUND,
 * UNAVAILABLE: its worker is down or it is being restored). The built request is kept. */
int client_locate(kvs_client *c, const char *session);

/* session.create on the coordinator: choose the model (o->model, or the one model its ready
 * workers serve) and the budget (o->cells, or the worker's default: n_ctx minus the query
 * reserve), record the placement and route session to its worker. *cells = the budget. */
int client_cluster_place(kvs_client *c, const char *session,
                         const struct kvs_client_session_opts *o, int64_t *cells);

/* session.close on the coordinator (the placement and its budget are released). */
int client_cluster_unplace(kvs_client *c, const char *session);

/* admin.sessions: the directory's session ids. */
int client_cluster_list(kvs_client *c, char ***names, int32_t *n);

/* The status of the cluster's ready workers: the first one's model, context and queue bound,
 * the sums of cells and sessions. UNAVAILABLE when no worker is ready. */
int client_cluster_status(kvs_client *c, struct kvs_client_status *st);

/* ---- shared by the operations (ops.c) ---- */

/* s is 1..max bytes of [A-Za-z0-9._-] (a session id also not starting with '.'). */
bool client_ident_ok(const char *s, size_t max, bool session);

/* The result keys of a query / flash answer into *out (with `fresh` when with_fresh). */
int client_read_answer(kvs_client *c, const msgpack_object *m, bool with_fresh,
                       struct kvs_client_answer *out);

/* ---- append numbering (client.c) ---- */

/* The entry of session (created with last = 0), or NULL when out of memory. */
struct client_seq *client_seq_of(kvs_client *c, const char *session);

#endif
