/* Parsing of etcd 3.4's v3 JSON gateway replies, exposed for tests/test_store.c (which runs
 * them against recorded replies in tests/data/etcd/). Other code uses common/store.h.
 *
 * What the gateway does, verified on 3.4.23: fields whose value is zero, false or empty are
 * left out (a range with no match has no "kvs", a failed txn no "succeeded", a PUT event no
 * "type", an empty value no "value", a keep-alive of a lost lease no "TTL"); every int64 is
 * a JSON string; keys and values are standard padded base64; errors are
 * {"error", "message", "code" (a gRPC code)} with an HTTP status (404 lease not found, 429
 * database full, 400 compacted or bad argument). Everything is validated: a reply of the
 * wrong shape is BAD_FORMAT, never a crash.
 */
#ifndef KVS_STORE_ETCD_H
#define KVS_STORE_ETCD_H

#include "common/store.h"

#include <jansson.h>

/* An int64 field of obj: a decimal string (the gateway's encoding) or a JSON integer; an
 * absent field is 0. BAD_FORMAT for anything else. */
int kvs_etcd_int64(const json_t *obj, const char *field, int64_t *out);

/* header.revision of a reply. BAD_FORMAT when there is no header. */
int kvs_etcd_parse_revision(const json_t *reply, int64_t *revision);

/* One mvccpb.KeyValue (key and value base64; missing numbers are 0, a missing value is
 * empty). kv is zeroed first and owned by the caller. BAD_FORMAT, NO_MEMORY. */
int kvs_etcd_parse_kv(const json_t *obj, struct kvs_store_kv *kv);

/* A /v3/kv/range reply (no "kvs" = no keys). out is zeroed first; free it also on error. */
int kvs_etcd_parse_range(const json_t *reply, struct kvs_store_range *out);

/* A /v3/kv/deleterange reply: *deleted (absent = 0) and the revision. */
int kvs_etcd_parse_delete(const json_t *reply, int64_t *deleted, int64_t *revision);

/* A /v3/kv/txn reply: *succeeded (absent = false) and the revision. */
int kvs_etcd_parse_txn(const json_t *reply, bool *succeeded, int64_t *revision);

/* A /v3/lease/grant reply: *id (> 0) and *ttl (> 0), else BAD_FORMAT. */
int kvs_etcd_parse_lease_grant(const json_t *reply, int64_t *id, int64_t *ttl);

/* A /v3/lease/keepalive reply ({"result": {...}}): *ttl, or NOT_FOUND when TTL is absent or
 * zero (the gateway's only sign that the lease is lost). */
int kvs_etcd_parse_keepalive(const json_t *reply, int64_t *ttl);

/* The status for an error reply: the gRPC code in the body first (5 NOT_FOUND, 3
 * INVALID_ARGUMENT, 11 OUT_OF_RANGE, 8 resource exhausted = NOSPACE -> UNAVAILABLE,
 * 14 unavailable, 4 deadline -> UNAVAILABLE), else from the HTTP status (429 ->
 * UNAVAILABLE). reply may be NULL (an unparsable body). err gets etcd's message. */
int kvs_etcd_parse_error(long http_status, const json_t *reply, char *err, size_t errlen);

/* One message of a /v3/watch stream ({"result": {...}} or {"error": ...}). */
struct kvs_etcd_watch_msg {
    bool created;                   /* the watch is established */
    bool canceled;                  /* the server ended the watch */
    int64_t compact_revision;       /* > 0: canceled because start_rev was compacted */
    int64_t revision;               /* header.revision (0 when absent) */
    struct kvs_store_event *events; /* n_events, owned: free with kvs_etcd_watch_msg_free */
    size_t n_events;
};
/* Parse one stream message. BAD_FORMAT (wrong shape), UNAVAILABLE (an error message in the
 * stream, reason in err), NO_MEMORY. msg is zeroed first; free it also on error. */
int kvs_etcd_parse_watch(const json_t *msg_json, struct kvs_etcd_watch_msg *msg, char *err,
                         size_t errlen);
void kvs_etcd_watch_msg_free(struct kvs_etcd_watch_msg *msg);

#endif
