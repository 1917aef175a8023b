/* The wire protocol's messages (docs/PROTOCOL.md, version 1.1): limits, the validating
 * request decoder and reply encoding helpers.
 *
 * Decoding is two passes over the payload frame:
 *   1. kvs_wire_prevalidate walks the raw msgpack bytes with a bounded parser of its own:
 *      every declared length (str, bin, array, map) is checked against the bytes left, the
 *      nesting depth and the total object count are capped, ext types are refused, map keys
 *      must be short strings and every string must be valid UTF-8. Nothing is allocated.
 *      (msgpack-c 4.0 has no allocation limits: a 5-byte array header can make it try to
 *      allocate ~96 GiB. It only ever sees bytes that passed this walk.)
 *   2. kvs_wire_decode unpacks the validated bytes with msgpack-c (its memory is then bounded
 *      by the object cap) and builds a kvs_wire_request field by field: known keys of the
 *      wrong type are refused naming the field, unknown keys are ignored, required fields
 *      are checked per op. Messages are data: nothing is instantiated from them.
 *
 * Thread-safety: all functions are reentrant; a request or buffer is used by one thread.
 */
#ifndef KVS_WIRE_H
#define KVS_WIRE_H

#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVS_WIRE_VERSION 1                 /* the protocol version this code speaks */
#define KVS_WIRE_MINOR 2                   /* its minor version (hello's `minor`) */
#define KVS_WIRE_MAX_FRAME (1u << 20)      /* payload bytes */
#define KVS_WIRE_MAX_DEPTH 8               /* nesting; the top-level map is depth 1 */
#define KVS_WIRE_MAX_OBJECTS 65536u        /* values + keys + elements in one message */
#define KVS_WIRE_MAX_STRING (256u << 10)   /* bytes of any string */
#define KVS_WIRE_MAX_KEY 64u               /* bytes of a map key */
#define KVS_WIRE_MAX_TOKENS 16384          /* ids in one append's `tokens` */
#define KVS_WIRE_MAX_STOPS 8               /* stop strings of one query */
#define KVS_WIRE_MAX_STOP_BYTES 64         /* bytes of one stop string */
#define KVS_WIRE_MAX_ANSWER_TOKENS 4096    /* max_tokens of a query or flash query */
#define KVS_WIRE_MAX_VERSIONS 16           /* entries of hello's `versions` */
#define KVS_WIRE_SESSION_MAX 128           /* bytes of a session id */
#define KVS_WIRE_NAME_MAX 64               /* bytes of a flash query name */
#define KVS_WIRE_MAX_DEADLINE_MS 3600000u  /* deadline_ms at most (one hour) */

/* X(enum suffix, wire name) */
#define KVS_WIRE_OP_TABLE(X)                                                               \
    X(HELLO, "hello")                                                                      \
    X(PING, "ping")                                                                        \
    X(STATUS, "status")                                                                    \
    X(SESSION_CREATE, "session.create")                                                    \
    X(SESSION_APPEND, "session.append")                                                    \
    X(SESSION_INFO, "session.info")                                                        \
    X(SESSION_CLOSE, "session.close")                                                      \
    X(SESSION_LIST, "session.list")                                                        \
    X(SESSION_SNAPSHOT, "session.snapshot")                                                \
    X(QUERY, "query")                                                                      \
    X(FLASH_REGISTER, "flash.register")                                                    \
    X(FLASH_UNREGISTER, "flash.unregister")                                                \
    X(FLASH_LIST, "flash.list")                                                            \
    X(FLASH_GET, "flash.get")                                                              \
    X(FLASH_WATCH, "flash.watch")                                                          \
    X(CANCEL, "cancel")                                                                    \
    X(SESSION_DUMP, "session.dump")                                                        \
    X(SESSION_ADOPT, "session.adopt")                                                      \
    X(SESSION_RELEASE, "session.release")

enum kvs_wire_op {
    KVS_OP_UNKNOWN = 0,
#define KVS_WIRE_OP_ENUM(name, str) KVS_OP_##name,
    KVS_WIRE_OP_TABLE(KVS_WIRE_OP_ENUM)
#undef KVS_WIRE_OP_ENUM
        KVS_OP_COUNT
};

/* "session.create", ...; "?" outside the enum. */
const char *kvs_wire_op_name(enum kvs_wire_op op);

/* A decoded request. Strings are NUL-terminated copies owned by the request (NULL when
 * absent); lengths in bytes. Free with kvs_wire_request_free. */
struct kvs_wire_request {
    uint64_t id;                    /* >= 1; 0 when it could not be read */
    enum kvs_wire_op op;
    const char *session;            /* session id (validated charset) */
    const char *name;               /* flash query name (validated charset) */
    const char *from;               /* session.adopt: the worker id it comes from (charset) */
    const char *text;               /* append record */
    size_t text_len;
    const char *question;           /* query / flash.register */
    size_t question_len;
    const char *prefix;             /* session.create */
    size_t prefix_len;
    const char *format;             /* "raw" | "chat" (checked) */
    const char *policy;             /* "reject" | "slide" (checked) */
    int32_t *tokens;                /* append ids (n_tokens), owned */
    int32_t n_tokens;
    bool has_tokens;
    uint64_t client_id, client_seq; /* idempotent appends; 0 = none */
    uint64_t cells;                 /* session budget; 0 = default */
    uint32_t query_reserve;         /* 0 = default */
    int32_t max_tokens;             /* 0 = not given (default 64) */
    bool stateless, stream, allow_stale, compact;
    const char *stops[KVS_WIRE_MAX_STOPS];
    int n_stops;
    double temperature, top_p, min_p, repeat_penalty; /* defaults 0, 1, 0, 1 */
    uint32_t top_k;
    uint64_t seed;
    uint32_t every_tokens, min_interval_ms; /* flash trigger */
    uint32_t deadline_ms;           /* 0 = no deadline */
    uint64_t target;                /* cancel: the request id to cancel */
    uint64_t after_version;         /* flash.watch: resume point (has_after_version) */
    bool has_after_version;
    uint32_t versions[KVS_WIRE_MAX_VERSIONS]; /* hello; default {1} */
    int n_versions;
    char *arena_;                   /* owned storage of the strings above */
    size_t arena_used_, arena_cap_;
};

/* Walk buf[0..n) as one msgpack value without allocating. 0 when it is a map that respects
 * every limit above and spans exactly n bytes; otherwise BAD_FORMAT (truncated, trailing
 * bytes, reserved byte 0xc1, ext, not a map, too deep, bad key), TOO_LARGE (frame, string,
 * object count) or INVALID_UTF8, with a one-line reason in err (may be NULL if errlen 0). */
int kvs_wire_prevalidate(const uint8_t *buf, size_t n, char *err, size_t errlen);

/* Prevalidate, unpack and decode buf[0..n) into *rq (zeroed first). 0, or the status of
 * kvs_wire_prevalidate, INVALID_ARGUMENT (missing or mistyped field, bad value: err names
 * the field), TOO_LARGE (too many tokens or stops), UNSUPPORTED (unknown op; rq->op is
 * KVS_OP_UNKNOWN) or NO_MEMORY. rq->id is set whenever an id could be read, so the caller
 * can address an error reply; on error rq still must be freed. */
int kvs_wire_decode(const uint8_t *buf, size_t n, struct kvs_wire_request *rq, char *err,
                    size_t errlen);
/* Free what rq owns and zero it; accepts an already freed or zeroed request. */
void kvs_wire_request_free(struct kvs_wire_request *rq);

/* ---- encoding replies ---- */

/* A growable reply buffer with a packer writing into it. */
typedef struct kvs_wire_buf {
    msgpack_sbuffer sb;
    msgpack_packer pk;
} kvs_wire_buf;

void kvs_wire_buf_init(kvs_wire_buf *b);
void kvs_wire_buf_clear(kvs_wire_buf *b); /* empty, keep the memory */
void kvs_wire_buf_destroy(kvs_wire_buf *b);

/* The value of key in a msgpack map (the first entry with that string key), or NULL when m
 * is NULL, not a map, or has no such key. */
const msgpack_object *kvs_wire_map_get(const msgpack_object *m, const char *key);

/* Pack a NUL-terminated string (a key or a value). */
void kvs_wire_pack_cstr(msgpack_packer *pk, const char *s);
/* Pack s[0..n) as a string; bytes that are not valid UTF-8 are replaced by '?'. */
void kvs_wire_pack_str(msgpack_packer *pk, const char *s, size_t n);

/* Write a whole error reply into b (cleared first):
 * {"id": id, ["seq": seq, "done": true,] "error": {"code", "status", "message"}};
 * seq < 0 means a single reply. message may be NULL (the table's message is used). */
void kvs_wire_encode_error(kvs_wire_buf *b, uint64_t id, int status, const char *message,
                           int64_t seq);

#endif
