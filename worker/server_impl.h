/* Internal to worker/server*.c: the server's state shared by the I/O thread (server.c) and
 * the engine thread (server_engine.c), and the messages between them. Not an interface. */
#ifndef KVS_SERVER_IMPL_H
#define KVS_SERVER_IMPL_H

#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <zmq.h>

#include "common/curve.h"
#include "common/wire.h"
#include "worker/flashcache.h"
#include "worker/sched.h"
#include "worker/server.h"
#include "worker/session.h"

#define PAIR_ENDPOINT_FMT "inproc://kvs-engine-%p"
#define IDENT_MAX 256 /* bytes of a ROUTER peer identity (libzmq: 255) */
#define RECV_BATCH 64 /* ROUTER messages handled per poll round */
#define SERVER_VERSION "0.2.0"
#define DRAIN_S 2.0 /* at shutdown, seconds the scheduler may finish work */
#define RELEASED_MAX 1024 /* released session ids remembered (answered MOVED) */

/* Engine -> I/O messages on the inproc pair; frame 0 is one of these bytes:
 *   R [ident][payload][final: 1 byte]     a reply to relay to a peer
 *   V [session][version: u64]             the session's version now
 *   F [session][name][version: u64][n_keys: u32][body]  a new flash answer
 *   U [session][name]                     a flash query was unregistered
 *   X [session]                           the session was closed
 *   E                                     the engine thread has exited
 * I/O -> engine: [ident][payload][t_recv: double] a request; [ident][PEER_GONE]: that peer
 * is gone (cancel all its work); [ident][PEER_SLOW]: a piece of its stream was dropped
 * (cancel its streams); one empty frame: stop. */
enum {
    MSG_REPLY = 'R',
    MSG_VERSION = 'V',
    MSG_FLASH = 'F',
    MSG_UNREG = 'U',
    MSG_CLOSED = 'X',
    MSG_EXIT = 'E'
};
enum { PEER_GONE = 'G', PEER_SLOW = 'S' };

struct sstate;

/* An engine request that outlives its dispatch: a scheduler job (its callback pending) or a
 * request deferred until its session is settled. */
struct req {
    struct req *prev, *next; /* srv->live */
    kvs_server *srv;
    uint8_t ident[IDENT_MAX]; /* the peer */
    size_t ident_len;
    uint64_t id;
    enum kvs_wire_op op;
    bool stream;
    int64_t seq;       /* next seq of a stream */
    double t_recv;     /* kvs_now() when the I/O thread received it */
    double deadline;   /* kvs_now() seconds; 0 = none */
    struct sstate *ss; /* its session's state (NULL: none / not yet known) */
    char session[KVS_SESSION_ID_MAX + 1];
    bool deferred;    /* in the deferred queue (payload kept) */
    bool scheduled;   /* a scheduler job: its callback answers */
    uint8_t *payload; /* (payload_len) the request, when deferred */
    size_t payload_len;
    int fail_status; /* when cancelled by the server: the status to answer */
    char fail_msg[96];
};

/* The server's view of one session (engine thread). */
struct sstate {
    kvs_session *s;        /* borrowed from the registry */
    int32_t appends;       /* scheduled appends not yet answered */
    bool unsettled;        /* a logged append was cancelled: it still runs, so the
                            * session is settled only when the scheduler is idle */
    uint64_t published;    /* version last sent to the I/O thread */
    uint32_t blocked_pass; /* run_deferred: an earlier request of it still waits */
};

struct kvs_server {
    kvs_engine *e;   /* owned; driven by the engine thread while running */
    kvs_sessions *S; /* owned; engine thread */
    kvs_sched *sc;   /* owned; engine thread */
    struct kvs_sched_opts sched_opts;
    void *zctx;                           /* ZeroMQ context (owned) */
    kvs_curve_zap *zap;                   /* CURVE client allow-list (owned; NULL = none) */
    void *router;                         /* I/O thread: the clients' socket */
    void *pair_io;                        /* I/O thread's end of the inproc pair */
    void *pair_eng;                       /* engine thread's end */
    char endpoint[256];                   /* bound endpoint (ZMQ_LAST_ENDPOINT) */
    char model_sha256[65];                /* of the model file */
    char *data_dir, *data_root;           /* copies of the options (session.adopt), or NULL */
    int32_t queue_max;                    /* requests forwarded and not finished, at most */
    volatile sig_atomic_t stop_requested; /* set by kvs_server_stop */
    atomic_int stopping;                  /* engine thread: answer CANCELLED from now on */
    /* I/O thread */
    int32_t in_flight;  /* forwarded, final reply not yet seen */
    kvs_flashcache *fc; /* published flash answers, versions, watchers */
    kvs_wire_buf out;   /* reply buffer */
    /* shared counters (written by the I/O thread, read by status on the engine thread) */
    atomic_int io_in_flight, io_watchers;
    atomic_ullong io_flash_hits, io_watchers_dropped;
    /* fencing (kvs_server_fence): fence_why is written once, before fenced is set */
    atomic_int fenced;   /* 0 serving, 1 being fenced (why being written), 2 fenced */
    char fence_why[512]; /* the reason, one line */
    atomic_llong serve_until_ms; /* kvs_server_serve_until (CLOCK_MONOTONIC ms; 0 = none) */
    bool io_fenced;      /* I/O thread: the watches have been ended */
    bool eng_fenced;     /* engine thread: the work in progress has been cancelled */
    bool fence_released; /* engine thread: the sessions have been let go */
    /* load published by the engine thread (kvs_server_load) */
    atomic_llong load_cells_used, load_cells_reserved, load_cells_free;
    atomic_int load_sessions;
    atomic_ullong load_rows;
    /* engine thread */
    kvs_wire_buf eout;      /* reply buffer */
    struct req live;        /* sentinel of the list of live requests */
    int32_t n_deferred;     /* of them, deferred */
    int32_t closes_waiting; /* deferred session.close: a barrier for everything */
    struct sstate **ss;     /* (n_ss) */
    int32_t n_ss, cap_ss;
    uint32_t pass; /* run_deferred counter */
    char (*released)[KVS_SESSION_ID_MAX + 1]; /* (RELEASED_MAX) ring of released ids, or NULL */
    int32_t n_released, released_next;
};

static inline void pack_key(msgpack_packer *pk, const char *k)
{
    kvs_wire_pack_cstr(pk, k);
}

static inline void pack_bool(msgpack_packer *pk, bool v)
{
    if (v) {
        msgpack_pack_true(pk);
    } else {
        msgpack_pack_false(pk);
    }
}

/* server.c: inproc messaging. Send frames[0..n) as one message: false (logged) on failure.
 * Receive one multipart message without waiting: keeps the first n_max parts, returns the
 * part count (0: nothing waiting, < 0: error); close_parts closes the kept ones. */
bool kvs_srv_send_frames(void *sock, const void *const *data, const size_t *len, int n);
int kvs_srv_recv_parts(void *sock, zmq_msg_t *parts, int n_max);
void kvs_srv_close_parts(zmq_msg_t *parts, int n, int n_max);

/* server_engine.c: the engine thread's body (arg: the kvs_server), and the release of what
 * it leaves when kvs_server_run never ran (live requests, session states). */
void *kvs_srv_engine_main(void *arg);

/* server.c: the fence's reason, or NULL while serving (any thread); fences the server first
 * when its serve-until deadline has passed. */
const char *kvs_srv_fence_reason(kvs_server *srv);
void kvs_srv_engine_free(kvs_server *srv);

#endif
