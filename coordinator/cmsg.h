/* The coordinator's messages (docs/PROTOCOL.md, "Coordinator"): the validating decoder of
 * requests from workers, clients and admins.
 *
 * Same two passes as common/wire.h: kvs_wire_prevalidate walks the raw bytes (limits, UTF-8,
 * depth, object count) before msgpack-c unpacks them; then the map is decoded field by field:
 * a known key of the wrong type or out of range is INVALID_ARGUMENT naming the key, a known
 * key given twice is BAD_FORMAT, unknown keys are ignored, required fields are checked per
 * op. Strings are copied into fixed buffers of the request: nothing is allocated except the
 * prefix hash array (bounded by KVS_CMSG_MAX_PREFIXES).
 *
 * Thread-safety: reentrant; a request is used by one thread.
 */
#ifndef KVS_CMSG_H
#define KVS_CMSG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVS_CMSG_WORKER_MAX 64     /* bytes of a worker id ([A-Za-z0-9._-]) */
#define KVS_CMSG_ENDPOINT_MAX 255  /* bytes of an endpoint (tcp:// or ipc://) */
#define KVS_CMSG_DEVICE_MAX 63     /* bytes of a device name */
#define KVS_CMSG_MAX_PREFIXES 1024 /* prefix hashes in one register / heartbeat */
#define KVS_CMSG_MAX_CELLS (INT64_C(1) << 40)
#define KVS_CMSG_MAX_BLOCK_SIZE 65536 /* cells per block a worker may declare */

/* X(enum suffix, wire name) */
#define KVS_CMSG_OP_TABLE(X)                                                                       \
    X(HELLO, "hello")                                                                              \
    X(PING, "ping")                                                                                \
    X(STATUS, "coord.status")                                                                      \
    X(WORKER_REGISTER, "worker.register")                                                          \
    X(WORKER_HEARTBEAT, "worker.heartbeat")                                                        \
    X(SESSION_CREATE, "session.create")                                                            \
    X(SESSION_LOCATE, "session.locate")                                                            \
    X(SESSION_CLOSE, "session.close")                                                              \
    X(WORKERS, "admin.workers")                                                                    \
    X(SESSIONS, "admin.sessions")                                                                  \
    X(CORDON, "admin.cordon")                                                                      \
    X(UNCORDON, "admin.uncordon")                                                                  \
    X(DRAIN, "admin.drain")

enum kvs_cmsg_op {
    KVS_COP_UNKNOWN = 0,
#define KVS_CMSG_OP_ENUM(name, str) KVS_COP_##name,
    KVS_CMSG_OP_TABLE(KVS_CMSG_OP_ENUM)
#undef KVS_CMSG_OP_ENUM
        KVS_COP_COUNT
};

const char *kvs_cmsg_op_name(enum kvs_cmsg_op op); /* "?" outside the enum */

struct kvs_cmsg {
    uint64_t id; /* >= 1; 0 when it could not be read */
    enum kvs_cmsg_op op;
    char session[129];                        /* session id, validated charset */
    char worker[KVS_CMSG_WORKER_MAX + 1];     /* worker id, validated charset */
    char endpoint[KVS_CMSG_ENDPOINT_MAX + 1]; /* tcp://... or ipc://... */
    char device[KVS_CMSG_DEVICE_MAX + 1];
    char model[65];       /* 64 lowercase hex digits, or "" */
    uint64_t cells;       /* session.create: budget (> 0) */
    uint64_t cells_total; /* register: the worker's pool */
    uint64_t block_size;  /* register: cells per block of its pool; 0 = not sent (minor < 2) */
    uint64_t cells_used, cells_reserved, cells_free; /* heartbeat */
    uint64_t queue;                                  /* heartbeat: requests waiting */
    uint64_t sessions;                               /* heartbeat: sessions it serves */
    double load;                                     /* heartbeat: tokens/s */
    uint64_t prefix_hash;                            /* session.create; 0 = none */
    uint64_t *prefix_hashes;                         /* register / heartbeat, owned */
    uint32_t n_prefix_hashes;
    bool has_prefix_hashes; /* the field was present (may be empty) */
};

/* Prevalidate and decode buf[0..n) into *m (zeroed first). 0, or BAD_FORMAT / TOO_LARGE /
 * INVALID_UTF8 (from prevalidation, or a duplicate key), INVALID_ARGUMENT (a field: err
 * names it), UNSUPPORTED (unknown op; m->op is KVS_COP_UNKNOWN), NO_MEMORY. m->id is set
 * whenever it could be read. Free with kvs_cmsg_free also on error. */
int kvs_cmsg_decode(const uint8_t *buf, size_t n, struct kvs_cmsg *m, char *err, size_t errlen);
void kvs_cmsg_free(struct kvs_cmsg *m);

/* Whether s is a valid session id (1..128 bytes of [A-Za-z0-9._-], not starting with '.'). */
bool kvs_cmsg_valid_id(const char *s, size_t max);

#endif
