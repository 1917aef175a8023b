/* The coordinator's request decoder (coordinator/cmsg.h). */
#include "coordinator/cmsg.h"

#include "common/status.h"
#include "common/wire.h"

#include <msgpack.h>
#include <stdlib.h>
#include <string.h>

static const char *const op_names[] = {"?",
#define KVS_CMSG_OP_NAME(name, str) str,
                                       KVS_CMSG_OP_TABLE(KVS_CMSG_OP_NAME)
#undef KVS_CMSG_OP_NAME
};

const char *kvs_cmsg_op_name(enum kvs_cmsg_op op)
{
    return (unsigned)op < KVS_COP_COUNT ? op_names[op] : "?";
}

bool kvs_cmsg_valid_id(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (n == 0 || n > max || s[0] == '.') {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-')) {
            return false;
        }
    }
    return true;
}

/* X(enum suffix, key) */
#define FIELD_TABLE(X)                                                                             \
    X(ID, "id")                                                                                    \
    X(OP, "op")                                                                                    \
    X(SESSION, "session")                                                                          \
    X(WORKER, "worker")                                                                            \
    X(ENDPOINT, "endpoint")                                                                        \
    X(DEVICE, "device")                                                                            \
    X(MODEL, "model")                                                                              \
    X(CELLS, "cells")                                                                              \
    X(CELLS_TOTAL, "cells_total")                                                                  \
    X(BLOCK_SIZE, "block_size")                                                                    \
    X(CELLS_USED, "cells_used")                                                                    \
    X(CELLS_RESERVED, "cells_reserved")                                                            \
    X(CELLS_FREE, "cells_free")                                                                    \
    X(QUEUE, "queue")                                                                              \
    X(SESSIONS, "sessions")                                                                        \
    X(LOAD, "load")                                                                                \
    X(PREFIX_HASH, "prefix_hash")                                                                  \
    X(PREFIX_HASHES, "prefix_hashes")

enum field {
#define FIELD_ENUM(name, key) F_##name,
    FIELD_TABLE(FIELD_ENUM)
#undef FIELD_ENUM
        F_COUNT
};

static const char *const field_names[] = {
#define FIELD_NAME(name, key) key,
    FIELD_TABLE(FIELD_NAME)
#undef FIELD_NAME
};

static int bad(char *err, size_t errlen, const char *key, const char *what)
{
    kvs_errf(err, errlen, "field '%s': %s", key, what);
    return KVS_INVALID_ARGUMENT;
}

static int get_uint(const char *key, const msgpack_object *o, uint64_t max, uint64_t *out,
                    char *err, size_t errlen)
{
    if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER) {
        return bad(err, errlen, key, "expected an unsigned integer");
    }
    if (o->via.u64 > max) {
        return bad(err, errlen, key, "out of range");
    }
    *out = o->via.u64;
    return KVS_OK;
}

/* Copy a string of at most cap - 1 bytes with no NUL inside. */
static int get_str(const char *key, const msgpack_object *o, char *out, size_t cap, char *err,
                   size_t errlen)
{
    if (o->type != MSGPACK_OBJECT_STR) {
        return bad(err, errlen, key, "expected a string");
    }
    if (o->via.str.size >= cap) {
        return bad(err, errlen, key, "too long");
    }
    if (memchr(o->via.str.ptr, '\0', o->via.str.size) != NULL) {
        return bad(err, errlen, key, "contains a NUL byte");
    }
    memcpy(out, o->via.str.ptr, o->via.str.size);
    out[o->via.str.size] = '\0';
    return KVS_OK;
}

static bool valid_endpoint(const char *s)
{
    if (strncmp(s, "tcp://", 6) != 0 && strncmp(s, "ipc://", 6) != 0) {
        return false;
    }
    for (const char *p = s; *p != '\0'; p++) {
        if ((unsigned char)*p <= ' ' || *p == 0x7f) {
            return false;
        }
    }
    return strlen(s) > 6;
}

static bool valid_model(const char *s)
{
    if (strlen(s) != 64) {
        return false;
    }
    for (const char *p = s; *p != '\0'; p++) {
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f'))) {
            return false;
        }
    }
    return true;
}

static enum kvs_cmsg_op op_parse(const msgpack_object *o)
{
    for (int i = 1; i < KVS_COP_COUNT; i++) {
        size_t n = strlen(op_names[i]);
        if (o->via.str.size == n && memcmp(o->via.str.ptr, op_names[i], n) == 0) {
            return (enum kvs_cmsg_op)i;
        }
    }
    return KVS_COP_UNKNOWN;
}

static int decode_field(struct kvs_cmsg *m, enum field f, const msgpack_object *v, char *err,
                        size_t errlen)
{
    const char *key = field_names[f];
    switch (f) {
    case F_ID:
        KVS_TRY(get_uint(key, v, UINT64_MAX, &m->id, err, errlen));
        if (m->id == 0) {
            return bad(err, errlen, key, "must be >= 1");
        }
        return KVS_OK;
    case F_OP:
        if (v->type != MSGPACK_OBJECT_STR) {
            return bad(err, errlen, key, "expected a string");
        }
        m->op = op_parse(v);
        return KVS_OK;
    case F_SESSION:
        KVS_TRY(get_str(key, v, m->session, sizeof m->session, err, errlen));
        return kvs_cmsg_valid_id(m->session, 128)
                   ? KVS_OK
                   : bad(err, errlen, key,
                         "1..128 bytes of [A-Za-z0-9._-], not starting "
                         "with '.'");
    case F_WORKER:
        KVS_TRY(get_str(key, v, m->worker, sizeof m->worker, err, errlen));
        return kvs_cmsg_valid_id(m->worker, KVS_CMSG_WORKER_MAX)
                   ? KVS_OK
                   : bad(err, errlen, key,
                         "1..64 bytes of [A-Za-z0-9._-], not starting "
                         "with '.'");
    case F_ENDPOINT:
        KVS_TRY(get_str(key, v, m->endpoint, sizeof m->endpoint, err, errlen));
        return valid_endpoint(m->endpoint)
                   ? KVS_OK
                   : bad(err, errlen, key, "expected tcp://HOST:PORT or ipc://PATH");
    case F_DEVICE:
        return get_str(key, v, m->device, sizeof m->device, err, errlen);
    case F_MODEL:
        KVS_TRY(get_str(key, v, m->model, sizeof m->model, err, errlen));
        return valid_model(m->model)
                   ? KVS_OK
                   : bad(err, errlen, key, "expected 64 lowercase hex digits (SHA-256)");
    case F_CELLS:
        KVS_TRY(get_uint(key, v, KVS_CMSG_MAX_CELLS, &m->cells, err, errlen));
        return m->cells > 0 ? KVS_OK : bad(err, errlen, key, "must be >= 1");
    case F_CELLS_TOTAL:
        return get_uint(key, v, KVS_CMSG_MAX_CELLS, &m->cells_total, err, errlen);
    case F_BLOCK_SIZE:
        KVS_TRY(get_uint(key, v, KVS_CMSG_MAX_BLOCK_SIZE, &m->block_size, err, errlen));
        return m->block_size > 0 ? KVS_OK : bad(err, errlen, key, "must be >= 1");
    case F_CELLS_USED:
        return get_uint(key, v, KVS_CMSG_MAX_CELLS, &m->cells_used, err, errlen);
    case F_CELLS_RESERVED:
        return get_uint(key, v, KVS_CMSG_MAX_CELLS, &m->cells_reserved, err, errlen);
    case F_CELLS_FREE:
        return get_uint(key, v, KVS_CMSG_MAX_CELLS, &m->cells_free, err, errlen);
    case F_QUEUE:
        return get_uint(key, v, UINT32_MAX, &m->queue, err, errlen);
    case F_SESSIONS:
        return get_uint(key, v, UINT32_MAX, &m->sessions, err, errlen);
    case F_LOAD:
        if (v->type == MSGPACK_OBJECT_FLOAT32 || v->type == MSGPACK_OBJECT_FLOAT64) {
            m->load = v->via.f64;
        } else if (v->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
            m->load = (double)v->via.u64;
        } else {
            return bad(err, errlen, key, "expected a number");
        }
        return m->load >= 0 && m->load < 1e12 ? KVS_OK : bad(err, errlen, key, "out of range");
    case F_PREFIX_HASH:
        return get_uint(key, v, UINT64_MAX, &m->prefix_hash, err, errlen);
    case F_PREFIX_HASHES:
        if (v->type != MSGPACK_OBJECT_ARRAY) {
            return bad(err, errlen, key, "expected an array of unsigned integers");
        }
        if (v->via.array.size > KVS_CMSG_MAX_PREFIXES) {
            kvs_errf(err, errlen, "field '%s': more than %d entries", key, KVS_CMSG_MAX_PREFIXES);
            return KVS_TOO_LARGE;
        }
        m->has_prefix_hashes = true;
        if (v->via.array.size == 0) {
            return KVS_OK;
        }
        m->prefix_hashes = malloc(v->via.array.size * sizeof *m->prefix_hashes);
        if (m->prefix_hashes == NULL) {
            return KVS_NO_MEMORY;
        }
        for (uint32_t i = 0; i < v->via.array.size; i++) {
            KVS_TRY(
                get_uint(key, &v->via.array.ptr[i], UINT64_MAX, &m->prefix_hashes[i], err, errlen));
            m->n_prefix_hashes++;
        }
        return KVS_OK;
    case F_COUNT:
        break;
    }
    return KVS_OK;
}

static int require(bool present, const char *key, enum kvs_cmsg_op op, char *err, size_t errlen)
{
    if (!present) {
        kvs_errf(err, errlen, "field '%s' is required by %s", key, kvs_cmsg_op_name(op));
        return KVS_INVALID_ARGUMENT;
    }
    return KVS_OK;
}

static int check_required(const struct kvs_cmsg *m, const bool *seen, char *err, size_t errlen)
{
    switch (m->op) {
    case KVS_COP_WORKER_REGISTER:
        KVS_TRY(require(seen[F_WORKER], "worker", m->op, err, errlen));
        KVS_TRY(require(seen[F_ENDPOINT], "endpoint", m->op, err, errlen));
        KVS_TRY(require(seen[F_MODEL], "model", m->op, err, errlen));
        return require(seen[F_CELLS_TOTAL], "cells_total", m->op, err, errlen);
    case KVS_COP_WORKER_HEARTBEAT:
        KVS_TRY(require(seen[F_WORKER], "worker", m->op, err, errlen));
        return require(seen[F_CELLS_FREE], "cells_free", m->op, err, errlen);
    case KVS_COP_SESSION_CREATE:
        KVS_TRY(require(seen[F_SESSION], "session", m->op, err, errlen));
        KVS_TRY(require(seen[F_MODEL], "model", m->op, err, errlen));
        return require(seen[F_CELLS], "cells", m->op, err, errlen);
    case KVS_COP_SESSION_LOCATE:
    case KVS_COP_SESSION_CLOSE:
        return require(seen[F_SESSION], "session", m->op, err, errlen);
    case KVS_COP_CORDON:
    case KVS_COP_UNCORDON:
    case KVS_COP_DRAIN:
        return require(seen[F_WORKER], "worker", m->op, err, errlen);
    default:
        return KVS_OK;
    }
}

int kvs_cmsg_decode(const uint8_t *buf, size_t n, struct kvs_cmsg *m, char *err, size_t errlen)
{
    memset(m, 0, sizeof *m);
    KVS_TRY(kvs_wire_prevalidate(buf, n, err, errlen));
    msgpack_unpacked up;
    msgpack_unpacked_init(&up);
    size_t off = 0;
    int rc = KVS_OK;
    if (msgpack_unpack_next(&up, (const char *)buf, n, &off) != MSGPACK_UNPACK_SUCCESS ||
        up.data.type != MSGPACK_OBJECT_MAP) {
        kvs_errf(err, errlen, "not a msgpack map");
        rc = KVS_BAD_FORMAT;
        goto done;
    }
    bool seen[F_COUNT] = {false};
    const msgpack_object_map *map = &up.data.via.map;
    /* The id first, so that any error can be addressed. */
    for (uint32_t i = 0; i < map->size; i++) {
        const msgpack_object *k = &map->ptr[i].key;
        if (k->via.str.size == 2 && memcmp(k->via.str.ptr, "id", 2) == 0 &&
            map->ptr[i].val.type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
            m->id = map->ptr[i].val.via.u64;
            break;
        }
    }
    for (uint32_t i = 0; i < map->size && rc == KVS_OK; i++) {
        const msgpack_object *k = &map->ptr[i].key; /* prevalidated: a short string */
        for (int f = 0; f < F_COUNT; f++) {
            size_t len = strlen(field_names[f]);
            if (k->via.str.size != len || memcmp(k->via.str.ptr, field_names[f], len) != 0) {
                continue;
            }
            if (seen[f]) {
                kvs_errf(err, errlen, "field '%s' given twice", field_names[f]);
                rc = KVS_BAD_FORMAT;
            } else {
                seen[f] = true;
                rc = decode_field(m, (enum field)f, &map->ptr[i].val, err, errlen);
            }
            break;
        }
    }
    if (rc == KVS_OK && !seen[F_ID]) {
        kvs_errf(err, errlen, "field 'id' is required");
        rc = KVS_INVALID_ARGUMENT;
    } else if (rc == KVS_OK && !seen[F_OP]) {
        kvs_errf(err, errlen, "field 'op' is required");
        rc = KVS_INVALID_ARGUMENT;
    } else if (rc == KVS_OK && m->op == KVS_COP_UNKNOWN) {
        kvs_errf(err, errlen, "unknown op for the coordinator");
        rc = KVS_UNSUPPORTED;
    } else if (rc == KVS_OK) {
        rc = check_required(m, seen, err, errlen);
    }
done:
    msgpack_unpacked_destroy(&up);
    return rc;
}

void kvs_cmsg_free(struct kvs_cmsg *m)
{
    if (m != NULL) {
        free(m->prefix_hashes);
        m->prefix_hashes = NULL;
        m->n_prefix_hashes = 0;
    }
}
