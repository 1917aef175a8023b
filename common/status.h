/* kvstream status codes: one table shared by the engine, the C API and the wire protocol.
 *
 * A status is an int: 0 (KVS_OK) means success, a negative value is one of the codes below.
 * Codes are stable: they appear on the wire (docs/PROTOCOL.md) and must never be renumbered.
 * Add new codes at the end of their group.
 */
#ifndef KVS_STATUS_H
#define KVS_STATUS_H

/* X(name, value, message) */
#define KVS_STATUS_TABLE(X)                                                        \
    X(OK, 0, "ok")                                                                 \
    X(INVALID_ARGUMENT, -1, "invalid argument")                                    \
    X(NOT_FOUND, -2, "not found")                                                  \
    X(ALREADY_EXISTS, -3, "already exists")                                        \
    X(NO_MEMORY, -4, "out of memory")                                              \
    X(IO, -5, "i/o error")                                                         \
    X(BAD_FORMAT, -6, "malformed input")                                           \
    X(UNSUPPORTED, -7, "unsupported")                                              \
    X(TYPE_MISMATCH, -8, "value has the wrong type")                               \
    X(OUT_OF_RANGE, -9, "value out of range")                                      \
    X(CONTEXT_FULL, -10, "context full")                                           \
    X(CAPACITY, -11, "no KV capacity")                                             \
    X(BUSY, -12, "busy")                                                           \
    X(TIMEOUT, -13, "deadline exceeded")                                           \
    X(CANCELLED, -14, "cancelled")                                                 \
    X(MOVED, -15, "session moved")                                                 \
    X(OUT_OF_ORDER, -16, "out of order")                                           \
    X(INVALID_UTF8, -17, "invalid UTF-8")                                          \
    X(TOO_LARGE, -18, "too large")                                                 \
    X(NO_DEVICE, -19, "no device")                                                 \
    X(DEVICE, -20, "device error")                                                 \
    X(MODEL_MISMATCH, -21, "model mismatch")                                       \
    X(INTERNAL, -22, "internal error")                                             \
    X(UNAVAILABLE, -23, "service unavailable")                                     \
    X(NOT_LEADER, -24, "not the leader")

enum kvs_status {
#define KVS_STATUS_ENUM(name, value, msg) KVS_##name = value,
    KVS_STATUS_TABLE(KVS_STATUS_ENUM)
#undef KVS_STATUS_ENUM
};

/* Stable uppercase code name ("NOT_FOUND"); "UNKNOWN" for a value not in the table. */
const char *kvs_status_name(int status);

/* Short human message ("not found"); "unknown status" for a value not in the table. */
const char *kvs_status_message(int status);

#include <stddef.h>

/* Write a one-line reason into err[0..errlen) (printf format); does nothing when err is NULL
 * or errlen is 0. The shared way every module reports why a call failed. */
#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
void kvs_errf(char *err, size_t errlen, const char *fmt, ...);

/* Propagate a negative status: KVS_TRY(x) returns x from the caller when it is an error. */
#define KVS_TRY(expr)                                                                      \
    do {                                                                                   \
        int kvs_try_rc_ = (expr);                                                          \
        if (kvs_try_rc_ < 0) {                                                             \
            return kvs_try_rc_;                                                            \
        }                                                                                  \
    } while (0)

#endif
