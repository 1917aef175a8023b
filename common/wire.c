/* Wire messages: bounded pre-validation, field-by-field decoding, reply encoding.
 * See common/wire.h and docs/PROTOCOL.md. */
#include "common/wire.h"

#include "common/status.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistr.h>

static const char *const op_names[] = {
    "?",
#define KVS_WIRE_OP_STR(name, str) str,
    KVS_WIRE_OP_TABLE(KVS_WIRE_OP_STR)
#undef KVS_WIRE_OP_STR
};

const char *kvs_wire_op_name(enum kvs_wire_op op)
{
    if ((int)op <= 0 || op >= KVS_OP_COUNT) {
        return "?";
    }
    return op_names[op];
}

static int fail(int status, char *err, size_t errlen, const char *fmt, ...)
{
    if (err != NULL && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return status;
}

/* ---- pass 1: the bounded walk ---------------------------------------------------------- */

struct walk {
    const uint8_t *p;   /* the frame */
    size_t n;           /* its bytes */
    size_t off;         /* next byte to read */
    uint32_t objects;   /* values seen so far */
    char *err;
    size_t errlen;
};

static uint64_t be(const uint8_t *p, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++) {
        v = (v << 8) | p[i];
    }
    return v;
}

/* Read a big-endian length of `bytes` bytes at the cursor into *len. */
static int take_len(struct walk *w, int bytes, uint64_t *len)
{
    if (w->n - w->off < (size_t)bytes) {
        return fail(KVS_BAD_FORMAT, w->err, w->errlen, "truncated at byte %zu", w->off);
    }
    *len = be(w->p + w->off, bytes);
    w->off += (size_t)bytes;
    return 0;
}

static int skip(struct walk *w, uint64_t bytes)
{
    if (bytes > w->n - w->off) {
        return fail(KVS_BAD_FORMAT, w->err, w->errlen,
                    "declared %llu bytes at byte %zu, %zu left", (unsigned long long)bytes,
                    w->off, w->n - w->off);
    }
    w->off += (size_t)bytes;
    return 0;
}

static int walk_str(struct walk *w, uint64_t len, bool is_key)
{
    if (len > w->n - w->off) {
        return fail(KVS_BAD_FORMAT, w->err, w->errlen,
                    "string of %llu bytes at byte %zu, %zu left", (unsigned long long)len,
                    w->off, w->n - w->off);
    }
    if (is_key && len > KVS_WIRE_MAX_KEY) {
        return fail(KVS_BAD_FORMAT, w->err, w->errlen, "map key of %llu bytes (max %u)",
                    (unsigned long long)len, KVS_WIRE_MAX_KEY);
    }
    if (len > KVS_WIRE_MAX_STRING) {
        return fail(KVS_TOO_LARGE, w->err, w->errlen, "string of %llu bytes (max %u)",
                    (unsigned long long)len, KVS_WIRE_MAX_STRING);
    }
    if (u8_check(w->p + w->off, (size_t)len) != NULL) {
        return fail(KVS_INVALID_UTF8, w->err, w->errlen, "string at byte %zu is not UTF-8",
                    w->off);
    }
    w->off += (size_t)len;
    return 0;
}

static int walk_value(struct walk *w, int depth, bool is_key);

static int walk_container(struct walk *w, uint64_t count, bool map, int depth)
{
    if (depth + 1 > KVS_WIRE_MAX_DEPTH) {
        return fail(KVS_BAD_FORMAT, w->err, w->errlen, "nesting deeper than %d",
                    KVS_WIRE_MAX_DEPTH);
    }
    /* Every element takes at least one byte: a count larger than the bytes left is a lie. */
    uint64_t elems = map ? count * 2 : count;
    if (count > w->n || elems > w->n - w->off) {
        return fail(KVS_BAD_FORMAT, w->err, w->errlen,
                    "%s of %llu entries at byte %zu, %zu bytes left", map ? "map" : "array",
                    (unsigned long long)count, w->off, w->n - w->off);
    }
    if (elems > KVS_WIRE_MAX_OBJECTS - w->objects) {
        return fail(KVS_TOO_LARGE, w->err, w->errlen, "more than %u objects",
                    KVS_WIRE_MAX_OBJECTS);
    }
    for (uint64_t i = 0; i < count; i++) {
        if (map) {
            KVS_TRY(walk_value(w, depth + 1, true));
        }
        KVS_TRY(walk_value(w, depth + 1, false));
    }
    return 0;
}

static int walk_value(struct walk *w, int depth, bool is_key)
{
    if (w->off >= w->n) {
        return fail(KVS_BAD_FORMAT, w->err, w->errlen, "truncated at byte %zu", w->off);
    }
    if (++w->objects > KVS_WIRE_MAX_OBJECTS) {
        return fail(KVS_TOO_LARGE, w->err, w->errlen, "more than %u objects",
                    KVS_WIRE_MAX_OBJECTS);
    }
    size_t at = w->off;
    uint8_t b = w->p[w->off++];
    uint64_t len = 0;
    bool is_str = (b >= 0xa0 && b <= 0xbf) || (b >= 0xd9 && b <= 0xdb);
    if (is_key && !is_str) {
        return fail(KVS_BAD_FORMAT, w->err, w->errlen, "map key at byte %zu is not a string",
                    at);
    }
    if (b <= 0x7f || b >= 0xe0) { /* fixint */
        return 0;
    }
    if (b <= 0x8f) {
        return walk_container(w, b & 0x0f, true, depth);
    }
    if (b <= 0x9f) {
        return walk_container(w, b & 0x0f, false, depth);
    }
    if (b <= 0xbf) {
        return walk_str(w, b & 0x1f, is_key);
    }
    switch (b) {
    case 0xc0: case 0xc2: case 0xc3: /* nil, false, true */
        return 0;
    case 0xc4: case 0xc5: case 0xc6: /* bin 8/16/32 */
        KVS_TRY(take_len(w, 1 << (b - 0xc4), &len));
        if (len > KVS_WIRE_MAX_STRING) {
            return fail(KVS_TOO_LARGE, w->err, w->errlen, "bin of %llu bytes (max %u)",
                        (unsigned long long)len, KVS_WIRE_MAX_STRING);
        }
        return skip(w, len);
    case 0xca:
        return skip(w, 4);
    case 0xcb:
        return skip(w, 8);
    case 0xcc: case 0xcd: case 0xce: case 0xcf: /* uint 8..64 */
        return skip(w, 1u << (b - 0xcc));
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: /* int 8..64 */
        return skip(w, 1u << (b - 0xd0));
    case 0xd9: case 0xda: case 0xdb: /* str 8/16/32 */
        KVS_TRY(take_len(w, 1 << (b - 0xd9), &len));
        return walk_str(w, len, is_key);
    case 0xdc: case 0xdd: /* array 16/32 */
        KVS_TRY(take_len(w, 2 << (b - 0xdc), &len));
        return walk_container(w, len, false, depth);
    case 0xde: case 0xdf: /* map 16/32 */
        KVS_TRY(take_len(w, 2 << (b - 0xde), &len));
        return walk_container(w, len, true, depth);
    default: /* 0xc1 (never used), ext 0xc7-0xc9, fixext 0xd4-0xd8 */
        return fail(KVS_BAD_FORMAT, w->err, w->errlen, "type byte 0x%02x at byte %zu refused",
                    b, at);
    }
}

int kvs_wire_prevalidate(const uint8_t *buf, size_t n, char *err, size_t errlen)
{
    if (n > KVS_WIRE_MAX_FRAME) {
        return fail(KVS_TOO_LARGE, err, errlen, "frame of %zu bytes (max %u)", n,
                    KVS_WIRE_MAX_FRAME);
    }
    if (n == 0 || buf == NULL) {
        return fail(KVS_BAD_FORMAT, err, errlen, "empty payload");
    }
    uint8_t b = buf[0];
    if (!((b >= 0x80 && b <= 0x8f) || b == 0xde || b == 0xdf)) {
        return fail(KVS_BAD_FORMAT, err, errlen, "payload is not a msgpack map");
    }
    struct walk w = {buf, n, 0, 0, err, errlen};
    KVS_TRY(walk_value(&w, 0, false));
    if (w.off != n) {
        return fail(KVS_BAD_FORMAT, err, errlen, "%zu trailing bytes after the map", n - w.off);
    }
    return 0;
}

/* ---- pass 2: decoding ------------------------------------------------------------------- */

static const char *type_name(msgpack_object_type t)
{
    switch (t) {
    case MSGPACK_OBJECT_NIL: return "nil";
    case MSGPACK_OBJECT_BOOLEAN: return "bool";
    case MSGPACK_OBJECT_POSITIVE_INTEGER: return "uint";
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: return "negative int";
    case MSGPACK_OBJECT_FLOAT32: case MSGPACK_OBJECT_FLOAT64: return "float";
    case MSGPACK_OBJECT_STR: return "str";
    case MSGPACK_OBJECT_ARRAY: return "array";
    case MSGPACK_OBJECT_MAP: return "map";
    case MSGPACK_OBJECT_BIN: return "bin";
    default: return "ext";
    }
}

#define BAD_TYPE(key, want, o)                                                             \
    fail(KVS_INVALID_ARGUMENT, err, errlen, "field '%s': expected %s, got %s", key, want,   \
         type_name((o)->type))

static int get_uint(const char *key, const msgpack_object *o, uint64_t max, uint64_t *out,
                    char *err, size_t errlen)
{
    if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER) {
        return BAD_TYPE(key, "unsigned integer", o);
    }
    if (o->via.u64 > max) {
        return fail(KVS_INVALID_ARGUMENT, err, errlen, "field '%s': %llu is over %llu", key,
                    (unsigned long long)o->via.u64, (unsigned long long)max);
    }
    *out = o->via.u64;
    return 0;
}

static int get_float(const char *key, const msgpack_object *o, double *out, char *err,
                     size_t errlen)
{
    double v;
    if (o->type == MSGPACK_OBJECT_FLOAT32 || o->type == MSGPACK_OBJECT_FLOAT64) {
        v = o->via.f64;
    } else if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
        v = (double)o->via.u64;
    } else if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        v = (double)o->via.i64;
    } else {
        return BAD_TYPE(key, "number", o);
    }
    if (!isfinite(v)) {
        return fail(KVS_INVALID_ARGUMENT, err, errlen, "field '%s': not finite", key);
    }
    *out = v;
    return 0;
}

static int get_bool(const char *key, const msgpack_object *o, bool *out, char *err,
                    size_t errlen)
{
    if (o->type != MSGPACK_OBJECT_BOOLEAN) {
        return BAD_TYPE(key, "bool", o);
    }
    *out = o->via.boolean;
    return 0;
}

/* Copy a string into the request's arena (NUL-terminated). The arena was sized for every
 * string of the frame, so this cannot run out. */
static const char *arena_copy(struct kvs_wire_request *rq, const char *s, size_t n)
{
    if (rq->arena_used_ + n + 1 > rq->arena_cap_) {
        return NULL; /* not reached: see kvs_wire_decode */
    }
    char *d = rq->arena_ + rq->arena_used_;
    memcpy(d, s, n);
    d[n] = '\0';
    rq->arena_used_ += n + 1;
    return d;
}

static int get_str(struct kvs_wire_request *rq, const char *key, const msgpack_object *o,
                   size_t max, const char **out, size_t *len, char *err, size_t errlen)
{
    if (o->type != MSGPACK_OBJECT_STR) {
        return BAD_TYPE(key, "string", o);
    }
    if (o->via.str.size > max) {
        return fail(KVS_TOO_LARGE, err, errlen, "field '%s': %u bytes (max %zu)", key,
                    o->via.str.size, max);
    }
    if (memchr(o->via.str.ptr, '\0', o->via.str.size) != NULL) {
        return fail(KVS_INVALID_ARGUMENT, err, errlen, "field '%s': contains NUL", key);
    }
    *out = arena_copy(rq, o->via.str.ptr, o->via.str.size);
    if (*out == NULL) {
        return fail(KVS_INTERNAL, err, errlen, "field '%s': arena full", key);
    }
    if (len != NULL) {
        *len = o->via.str.size;
    }
    return 0;
}

/* 1..max bytes of [A-Za-z0-9._-], not starting with '.' (the session log's file name rule). */
static int check_ident(const char *key, const char *s, size_t max, char *err, size_t errlen)
{
    size_t n = strlen(s);
    if (n == 0 || n > max || s[0] == '.') {
        return fail(KVS_INVALID_ARGUMENT, err, errlen,
                    "field '%s': must be 1..%zu bytes, not starting with '.'", key, max);
    }
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '_' || c == '-';
        if (!ok) {
            return fail(KVS_INVALID_ARGUMENT, err, errlen,
                        "field '%s': only [A-Za-z0-9._-] allowed", key);
        }
    }
    return 0;
}

static bool key_is(const msgpack_object *k, const char *s)
{
    size_t n = strlen(s);
    return k->via.str.size == n && memcmp(k->via.str.ptr, s, n) == 0;
}

/* The known keys, for duplicate detection (a bit each). */
#define KNOWN_KEYS(X)                                                                      \
    X(id) X(op) X(session) X(name) X(text) X(tokens) X(question) X(prefix) X(format)       \
    X(policy) X(client_id) X(client_seq) X(cells) X(query_reserve) X(max_tokens)           \
    X(stateless) X(stream) X(allow_stale) X(compact) X(stops) X(temperature) X(top_k)      \
    X(top_p) X(min_p) X(repeat_penalty) X(seed) X(every_tokens) X(min_interval_ms)         \
    X(versions) X(client) X(deadline_ms) X(target) X(after_version) X(from)

enum known_key {
#define KEY_ENUM(k) K_##k,
    KNOWN_KEYS(KEY_ENUM)
#undef KEY_ENUM
    K_COUNT
};

static const char *const key_names[] = {
#define KEY_STR(k) #k,
    KNOWN_KEYS(KEY_STR)
#undef KEY_STR
};

static enum kvs_wire_op op_parse(const char *s)
{
    for (int i = 1; i < KVS_OP_COUNT; i++) {
        if (strcmp(s, op_names[i]) == 0) {
            return (enum kvs_wire_op)i;
        }
    }
    return KVS_OP_UNKNOWN;
}

static int decode_field(struct kvs_wire_request *rq, enum known_key k, const msgpack_object *v,
                        char *err, size_t errlen)
{
    const char *key = key_names[k];
    uint64_t u = 0;
    const char *s = NULL;
    switch (k) {
    case K_id:
        KVS_TRY(get_uint(key, v, UINT64_MAX, &u, err, errlen));
        if (u == 0) {
            return fail(KVS_INVALID_ARGUMENT, err, errlen, "field 'id': must be >= 1");
        }
        rq->id = u;
        return 0;
    case K_op:
        return 0; /* read first, by kvs_wire_decode */
    case K_session:
        KVS_TRY(get_str(rq, key, v, KVS_WIRE_SESSION_MAX, &rq->session, NULL, err, errlen));
        return check_ident(key, rq->session, KVS_WIRE_SESSION_MAX, err, errlen);
    case K_name:
        KVS_TRY(get_str(rq, key, v, KVS_WIRE_NAME_MAX, &rq->name, NULL, err, errlen));
        return check_ident(key, rq->name, KVS_WIRE_NAME_MAX, err, errlen);
    case K_from:
        KVS_TRY(get_str(rq, key, v, KVS_WIRE_NAME_MAX, &rq->from, NULL, err, errlen));
        return check_ident(key, rq->from, KVS_WIRE_NAME_MAX, err, errlen);
    case K_text:
        return get_str(rq, key, v, KVS_WIRE_MAX_STRING, &rq->text, &rq->text_len, err, errlen);
    case K_question:
        return get_str(rq, key, v, KVS_WIRE_MAX_STRING, &rq->question, &rq->question_len, err,
                       errlen);
    case K_prefix:
        return get_str(rq, key, v, KVS_WIRE_MAX_STRING, &rq->prefix, &rq->prefix_len, err,
                       errlen);
    case K_format:
        KVS_TRY(get_str(rq, key, v, 16, &rq->format, NULL, err, errlen));
        if (strcmp(rq->format, "raw") != 0 && strcmp(rq->format, "chat") != 0) {
            return fail(KVS_INVALID_ARGUMENT, err, errlen,
                        "field 'format': must be \"raw\" or \"chat\"");
        }
        return 0;
    case K_policy:
        KVS_TRY(get_str(rq, key, v, 16, &rq->policy, NULL, err, errlen));
        if (strcmp(rq->policy, "reject") != 0 && strcmp(rq->policy, "slide") != 0) {
            return fail(KVS_INVALID_ARGUMENT, err, errlen,
                        "field 'policy': must be \"reject\" or \"slide\"");
        }
        return 0;
    case K_client:
        return get_str(rq, key, v, 256, &s, NULL, err, errlen);
    case K_tokens: {
        if (v->type != MSGPACK_OBJECT_ARRAY) {
            return BAD_TYPE(key, "array of unsigned integers", v);
        }
        uint32_t n = v->via.array.size;
        if (n > KVS_WIRE_MAX_TOKENS) {
            return fail(KVS_TOO_LARGE, err, errlen, "field 'tokens': %u ids (max %d)", n,
                        KVS_WIRE_MAX_TOKENS);
        }
        rq->tokens = malloc((n > 0 ? n : 1) * sizeof *rq->tokens);
        if (rq->tokens == NULL) {
            return fail(KVS_NO_MEMORY, err, errlen, "out of memory");
        }
        for (uint32_t i = 0; i < n; i++) {
            const msgpack_object *e = &v->via.array.ptr[i];
            if (e->type != MSGPACK_OBJECT_POSITIVE_INTEGER || e->via.u64 > INT32_MAX) {
                return fail(KVS_INVALID_ARGUMENT, err, errlen,
                            "field 'tokens': element %u is not a token id", i);
            }
            rq->tokens[i] = (int32_t)e->via.u64;
        }
        rq->n_tokens = (int32_t)n;
        rq->has_tokens = true;
        return 0;
    }
    case K_stops: {
        if (v->type != MSGPACK_OBJECT_ARRAY) {
            return BAD_TYPE(key, "array of strings", v);
        }
        if (v->via.array.size > KVS_WIRE_MAX_STOPS) {
            return fail(KVS_TOO_LARGE, err, errlen, "field 'stops': %u strings (max %d)",
                        v->via.array.size, KVS_WIRE_MAX_STOPS);
        }
        for (uint32_t i = 0; i < v->via.array.size; i++) {
            size_t len = 0;
            KVS_TRY(get_str(rq, key, &v->via.array.ptr[i], KVS_WIRE_MAX_STOP_BYTES,
                            &rq->stops[i], &len, err, errlen));
            if (len == 0) {
                return fail(KVS_INVALID_ARGUMENT, err, errlen, "field 'stops': empty string");
            }
        }
        rq->n_stops = (int)v->via.array.size;
        return 0;
    }
    case K_versions: {
        if (v->type != MSGPACK_OBJECT_ARRAY) {
            return BAD_TYPE(key, "array of unsigned integers", v);
        }
        if (v->via.array.size == 0 || v->via.array.size > KVS_WIRE_MAX_VERSIONS) {
            return fail(KVS_INVALID_ARGUMENT, err, errlen, "field 'versions': 1..%d entries",
                        KVS_WIRE_MAX_VERSIONS);
        }
        for (uint32_t i = 0; i < v->via.array.size; i++) {
            KVS_TRY(get_uint(key, &v->via.array.ptr[i], UINT32_MAX, &u, err, errlen));
            rq->versions[i] = (uint32_t)u;
        }
        rq->n_versions = (int)v->via.array.size;
        return 0;
    }
    case K_client_id:
        return get_uint(key, v, UINT64_MAX, &rq->client_id, err, errlen);
    case K_client_seq:
        return get_uint(key, v, UINT64_MAX, &rq->client_seq, err, errlen);
    case K_cells:
        return get_uint(key, v, INT64_MAX, &rq->cells, err, errlen);
    case K_query_reserve:
        KVS_TRY(get_uint(key, v, INT32_MAX, &u, err, errlen));
        rq->query_reserve = (uint32_t)u;
        return 0;
    case K_max_tokens:
        KVS_TRY(get_uint(key, v, KVS_WIRE_MAX_ANSWER_TOKENS, &u, err, errlen));
        if (u == 0) {
            return fail(KVS_INVALID_ARGUMENT, err, errlen, "field 'max_tokens': must be 1..%d",
                        KVS_WIRE_MAX_ANSWER_TOKENS);
        }
        rq->max_tokens = (int32_t)u;
        return 0;
    case K_top_k:
        KVS_TRY(get_uint(key, v, INT32_MAX, &u, err, errlen));
        rq->top_k = (uint32_t)u;
        return 0;
    case K_seed:
        return get_uint(key, v, UINT64_MAX, &rq->seed, err, errlen);
    case K_every_tokens:
        KVS_TRY(get_uint(key, v, INT32_MAX, &u, err, errlen));
        rq->every_tokens = (uint32_t)u;
        return 0;
    case K_min_interval_ms:
        KVS_TRY(get_uint(key, v, INT32_MAX, &u, err, errlen));
        rq->min_interval_ms = (uint32_t)u;
        return 0;
    case K_deadline_ms:
        KVS_TRY(get_uint(key, v, KVS_WIRE_MAX_DEADLINE_MS, &u, err, errlen));
        rq->deadline_ms = (uint32_t)u;
        return 0;
    case K_target:
        KVS_TRY(get_uint(key, v, UINT64_MAX, &rq->target, err, errlen));
        if (rq->target == 0) {
            return fail(KVS_INVALID_ARGUMENT, err, errlen, "field 'target': must be >= 1");
        }
        return 0;
    case K_after_version:
        rq->has_after_version = true;
        return get_uint(key, v, UINT64_MAX, &rq->after_version, err, errlen);
    case K_stateless:
        return get_bool(key, v, &rq->stateless, err, errlen);
    case K_stream:
        return get_bool(key, v, &rq->stream, err, errlen);
    case K_allow_stale:
        return get_bool(key, v, &rq->allow_stale, err, errlen);
    case K_compact:
        return get_bool(key, v, &rq->compact, err, errlen);
    case K_temperature:
        return get_float(key, v, &rq->temperature, err, errlen);
    case K_top_p:
        return get_float(key, v, &rq->top_p, err, errlen);
    case K_min_p:
        return get_float(key, v, &rq->min_p, err, errlen);
    case K_repeat_penalty:
        return get_float(key, v, &rq->repeat_penalty, err, errlen);
    case K_COUNT:
        break;
    }
    return fail(KVS_INTERNAL, err, errlen, "unhandled key");
}

static int require(const char *v, const char *key, enum kvs_wire_op op, char *err,
                   size_t errlen)
{
    if (v == NULL) {
        return fail(KVS_INVALID_ARGUMENT, err, errlen, "field '%s': required by %s", key,
                    kvs_wire_op_name(op));
    }
    return 0;
}

/* Per-op required fields. */
static int check_required(const struct kvs_wire_request *rq, char *err, size_t errlen)
{
    enum kvs_wire_op op = rq->op;
    switch (op) {
    case KVS_OP_HELLO: case KVS_OP_PING: case KVS_OP_STATUS: case KVS_OP_SESSION_LIST:
        return 0;
    case KVS_OP_SESSION_APPEND:
        KVS_TRY(require(rq->session, "session", op, err, errlen));
        if ((rq->text != NULL) == rq->has_tokens) {
            return fail(KVS_INVALID_ARGUMENT, err, errlen,
                        "field 'text' or 'tokens': exactly one is required by %s",
                        kvs_wire_op_name(op));
        }
        return 0;
    case KVS_OP_QUERY:
        KVS_TRY(require(rq->session, "session", op, err, errlen));
        return require(rq->question, "question", op, err, errlen);
    case KVS_OP_FLASH_REGISTER:
        KVS_TRY(require(rq->session, "session", op, err, errlen));
        KVS_TRY(require(rq->name, "name", op, err, errlen));
        return require(rq->question, "question", op, err, errlen);
    case KVS_OP_FLASH_UNREGISTER: case KVS_OP_FLASH_GET:
        KVS_TRY(require(rq->session, "session", op, err, errlen));
        return require(rq->name, "name", op, err, errlen);
    case KVS_OP_CANCEL:
        if (rq->target == 0) {
            return fail(KVS_INVALID_ARGUMENT, err, errlen, "field 'target': required by cancel");
        }
        return 0;
    case KVS_OP_SESSION_CREATE: case KVS_OP_SESSION_INFO: case KVS_OP_SESSION_CLOSE:
    case KVS_OP_SESSION_SNAPSHOT: case KVS_OP_FLASH_LIST: case KVS_OP_FLASH_WATCH:
    case KVS_OP_SESSION_DUMP: case KVS_OP_SESSION_ADOPT: case KVS_OP_SESSION_RELEASE:
        return require(rq->session, "session", op, err, errlen);
    default:
        return fail(KVS_INTERNAL, err, errlen, "unhandled op");
    }
}

static int decode_map(struct kvs_wire_request *rq, const msgpack_object *m, char *err,
                      size_t errlen)
{
    const msgpack_object_kv *kv = m->via.map.ptr;
    uint32_t n = m->via.map.size;
    uint64_t seen = 0;
    /* The id first, so that every later error can be addressed to it. */
    for (uint32_t i = 0; i < n; i++) {
        if (key_is(&kv[i].key, "id")) {
            if ((seen >> K_id) & 1) {
                return fail(KVS_BAD_FORMAT, err, errlen, "duplicate key 'id'");
            }
            seen |= 1ull << K_id;
            KVS_TRY(decode_field(rq, K_id, &kv[i].val, err, errlen));
        }
    }
    if (rq->id == 0) {
        return fail(KVS_INVALID_ARGUMENT, err, errlen, "field 'id': required");
    }
    const msgpack_object *opv = NULL;
    for (uint32_t i = 0; i < n; i++) {
        if (key_is(&kv[i].key, "op")) {
            if (opv != NULL) {
                return fail(KVS_BAD_FORMAT, err, errlen, "duplicate key 'op'");
            }
            opv = &kv[i].val;
        }
    }
    if (opv == NULL) {
        return fail(KVS_INVALID_ARGUMENT, err, errlen, "field 'op': required");
    }
    if (opv->type != MSGPACK_OBJECT_STR) {
        return BAD_TYPE("op", "string", opv);
    }
    char op[32];
    if (opv->via.str.size >= sizeof op) {
        return fail(KVS_UNSUPPORTED, err, errlen, "unknown op");
    }
    memcpy(op, opv->via.str.ptr, opv->via.str.size);
    op[opv->via.str.size] = '\0';
    rq->op = op_parse(op);
    if (rq->op == KVS_OP_UNKNOWN) {
        return fail(KVS_UNSUPPORTED, err, errlen, "unknown op '%s'", op);
    }
    seen |= 1ull << K_op;
    for (uint32_t i = 0; i < n; i++) {
        for (int k = 0; k < K_COUNT; k++) {
            if (k == K_id || k == K_op || !key_is(&kv[i].key, key_names[k])) {
                continue;
            }
            if ((seen >> k) & 1) {
                return fail(KVS_BAD_FORMAT, err, errlen, "duplicate key '%s'", key_names[k]);
            }
            seen |= 1ull << k;
            KVS_TRY(decode_field(rq, (enum known_key)k, &kv[i].val, err, errlen));
            break;
        }
    }
    return check_required(rq, err, errlen);
}

int kvs_wire_decode(const uint8_t *buf, size_t n, struct kvs_wire_request *rq, char *err,
                    size_t errlen)
{
    memset(rq, 0, sizeof *rq);
    rq->top_p = 1.0;
    rq->repeat_penalty = 1.0;
    rq->versions[0] = KVS_WIRE_VERSION;
    rq->n_versions = 1;
    KVS_TRY(kvs_wire_prevalidate(buf, n, err, errlen));

    /* Every copied string is a distinct part of the frame, plus its NUL: n + (objects) bytes
     * would do; the strings a request keeps are at most 8 stops + 10 fields. */
    rq->arena_cap_ = n + 32;
    rq->arena_ = malloc(rq->arena_cap_);
    if (rq->arena_ == NULL) {
        return fail(KVS_NO_MEMORY, err, errlen, "out of memory");
    }
    msgpack_unpacked up;
    msgpack_unpacked_init(&up);
    size_t off = 0;
    int rc;
    msgpack_unpack_return ur = msgpack_unpack_next(&up, (const char *)buf, n, &off);
    if (ur != MSGPACK_UNPACK_SUCCESS || off != n || up.data.type != MSGPACK_OBJECT_MAP) {
        /* Not reached for a prevalidated frame; kept as a guard. */
        rc = fail(KVS_BAD_FORMAT, err, errlen, "msgpack unpack failed (%d)", (int)ur);
    } else {
        rc = decode_map(rq, &up.data, err, errlen);
    }
    msgpack_unpacked_destroy(&up);
    return rc;
}

void kvs_wire_request_free(struct kvs_wire_request *rq)
{
    if (rq == NULL) {
        return;
    }
    free(rq->tokens);
    free(rq->arena_);
    memset(rq, 0, sizeof *rq);
}

/* ---- encoding ---------------------------------------------------------------------------- */

void kvs_wire_buf_init(kvs_wire_buf *b)
{
    msgpack_sbuffer_init(&b->sb);
    msgpack_packer_init(&b->pk, &b->sb, msgpack_sbuffer_write);
}

void kvs_wire_buf_clear(kvs_wire_buf *b)
{
    msgpack_sbuffer_clear(&b->sb);
}

void kvs_wire_buf_destroy(kvs_wire_buf *b)
{
    msgpack_sbuffer_destroy(&b->sb);
    memset(b, 0, sizeof *b);
}

const msgpack_object *kvs_wire_map_get(const msgpack_object *m, const char *key)
{
    if (m == NULL || m->type != MSGPACK_OBJECT_MAP) {
        return NULL;
    }
    size_t n = strlen(key);
    for (uint32_t i = 0; i < m->via.map.size; i++) {
        const msgpack_object *k = &m->via.map.ptr[i].key;
        if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == n &&
            memcmp(k->via.str.ptr, key, n) == 0) {
            return &m->via.map.ptr[i].val;
        }
    }
    return NULL;
}

void kvs_wire_pack_cstr(msgpack_packer *pk, const char *s)
{
    kvs_wire_pack_str(pk, s, strlen(s));
}

void kvs_wire_pack_str(msgpack_packer *pk, const char *s, size_t n)
{
    if (u8_check((const uint8_t *)s, n) == NULL) {
        msgpack_pack_str(pk, n);
        msgpack_pack_str_body(pk, s, n);
        return;
    }
    /* Replace each byte of an invalid sequence by '?' (rare: error messages, partial text). */
    msgpack_pack_str(pk, n);
    size_t i = 0;
    while (i < n) {
        const uint8_t *p = (const uint8_t *)s + i;
        int len = u8_mblen(p, n - i);
        if (len > 0) {
            msgpack_pack_str_body(pk, p, (size_t)len);
            i += (size_t)len;
        } else if (len == 0) { /* a NUL byte: valid, one byte */
            msgpack_pack_str_body(pk, p, 1);
            i++;
        } else {
            msgpack_pack_str_body(pk, "?", 1);
            i++;
        }
    }
}

void kvs_wire_encode_error(kvs_wire_buf *b, uint64_t id, int status, const char *message,
                           int64_t seq)
{
    kvs_wire_buf_clear(b);
    msgpack_packer *pk = &b->pk;
    msgpack_pack_map(pk, seq >= 0 ? 4 : 2);
    kvs_wire_pack_cstr(pk, "id");
    msgpack_pack_uint64(pk, id);
    if (seq >= 0) {
        kvs_wire_pack_cstr(pk, "seq");
        msgpack_pack_uint64(pk, (uint64_t)seq);
        kvs_wire_pack_cstr(pk, "done");
        msgpack_pack_true(pk);
    }
    kvs_wire_pack_cstr(pk, "error");
    msgpack_pack_map(pk, 3);
    kvs_wire_pack_cstr(pk, "code");
    kvs_wire_pack_cstr(pk, kvs_status_name(status));
    kvs_wire_pack_cstr(pk, "status");
    msgpack_pack_int(pk, status);
    kvs_wire_pack_cstr(pk, "message");
    if (message == NULL || message[0] == '\0') {
        message = kvs_status_message(status);
    }
    size_t n = strlen(message);
    kvs_wire_pack_str(pk, message, n > 1024 ? 1024 : n);
}
