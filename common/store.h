/* The cluster state store: one interface, two implementations (DESIGN.md, Cluster state).
 *
 *   embedded  in-process map made durable in PATH and PATH.log (every change appended to the
 *             log and fsync'd before it is acknowledged; a snapshot replaces PATH atomically
 *             when the log outgrows it; both reloaded on open); what a single machine uses,
 *             no etcd needed.
 *   etcd      etcd v3 through its JSON gateway over libcurl (common/store_etcd.c).
 *
 * The model is etcd's: keys are strings, values are bytes; every change bumps the store's
 * revision; each key carries the revision it was created at (create_revision), last changed
 * at (mod_revision) and how often it changed (version). A lease has a TTL in seconds; keys
 * put with a lease are deleted when it expires (no keep-alive within the TTL). A txn is
 * "if every compare holds, do the success ops, else the failure ops", atomically. A watch
 * reports the changes under a prefix from a revision on, in revision order.
 *
 * Both implementations share etcd 3.4's semantics where they are observable: revisions start
 * at 1, a lease's TTL is granted as asked (etcd rounds it up to its minimum, about 2 s),
 * a lease is restored with its full TTL when the store comes back (etcd after an outage; the
 * embedded store after a reopen), and a watch from a compacted revision cannot continue.
 * That last case is handled here, not by callers: the watch re-lists the prefix and goes on
 * from there, reporting KVS_STORE_RESET followed by a PUT for every key that exists.
 *
 * Errors (negative status, common/status.h) with a one-line reason in err:
 *   UNAVAILABLE       the store cannot be reached, timed out, or is full (etcd NOSPACE, HTTP
 *                     429); nothing is known about whether a write happened unless it says so
 *   NOT_FOUND         a lease that does not exist or has expired
 *   INVALID_ARGUMENT  empty key, key over KVS_STORE_MAX_KEY, TTL out of range
 *   TOO_LARGE         value over KVS_STORE_MAX_VALUE, or a reply over the response cap
 *   BAD_FORMAT        a reply that is not what etcd sends (validated, never asserted)
 *   OUT_OF_RANGE      a read at a compacted revision
 *   IO, NO_MEMORY     the embedded store's file, allocation
 *
 * Thread-safety: a kvs_store may be used by several threads at once (calls are serialized
 * inside). A kvs_store_watch is used by one thread; destroy it before its store (a store
 * destroyed first stops its watches: they then answer UNAVAILABLE, and must still be
 * destroyed).
 */
#ifndef KVS_STORE_H
#define KVS_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVS_STORE_MAX_KEY 1024           /* bytes of a key */
#define KVS_STORE_MAX_VALUE (256u << 10) /* bytes of a value */
#define KVS_STORE_MAX_TTL 3600           /* seconds of a lease */

typedef struct kvs_store kvs_store;
typedef struct kvs_store_watch kvs_store_watch;

/* One key as read. key and value are owned by the range or event that holds them. */
struct kvs_store_kv {
    char *key;               /* NUL-terminated */
    char *value;             /* value_len bytes, followed by a NUL that is not counted */
    size_t value_len;        /* bytes */
    int64_t create_revision; /* revision of the put that created the key */
    int64_t mod_revision;    /* revision of the last put (or of the delete, in an event) */
    int64_t version;         /* puts since creation (1 after the first) */
    int64_t lease;           /* lease id, 0 = none */
};

/* The result of a range read. Free with kvs_store_range_free. */
struct kvs_store_range {
    struct kvs_store_kv *kvs; /* n, sorted by key */
    size_t n;
    int64_t revision; /* the store's revision the read saw */
};

void kvs_store_range_free(struct kvs_store_range *r); /* accepts a zeroed range; zeroes it */

/* ---- opening ---- */

/* Open a store by URL:
 *   "file:PATH"  embedded, persisted to PATH (created if absent, reloaded if present)
 *   "mem:"       embedded, not persisted (tests)
 *   "http://HOST:PORT[,http://...]"  etcd's gateway (the first endpoint that answers)
 * timeout_ms bounds every etcd call (0 = 2000 ms); unused by the embedded store.
 * Returns NULL with a reason in err when the URL is bad or the file is unreadable; an etcd
 * store opens without contacting etcd (the first call finds out). Caller destroys. */
kvs_store *kvs_store_open(const char *url, int timeout_ms, char *err, size_t errlen);
/* Close; accepts NULL and nulls *s. Leases are not revoked (they expire on their own). */
void kvs_store_destroy(kvs_store **s);
/* "embedded" or "etcd". */
const char *kvs_store_kind(const kvs_store *s);

/* ---- keys ---- */

/* Put key = value[0..len); lease 0 = none, else the key goes when the lease does.
 * *revision (optional) = the revision of this put. NOT_FOUND for an unknown lease. */
int kvs_store_put(kvs_store *s, const char *key, const void *value, size_t len, int64_t lease,
                  int64_t *revision, char *err, size_t errlen);

/* Read one key (prefix = false) or every key starting with key (prefix = true) into *out,
 * which the caller frees with kvs_store_range_free (also on error: it is zeroed first).
 * A missing key is not an error: out->n == 0. */
int kvs_store_range(kvs_store *s, const char *key, bool prefix, struct kvs_store_range *out,
                    char *err, size_t errlen);

/* Read one key into *kv (caller frees with kvs_store_kv_free). NOT_FOUND when absent. */
int kvs_store_get(kvs_store *s, const char *key, struct kvs_store_kv *kv, char *err, size_t errlen);
void kvs_store_kv_free(struct kvs_store_kv *kv); /* accepts a zeroed kv; zeroes it */

/* Delete one key or a prefix. *n_deleted (optional) = keys removed; 0 is not an error. */
int kvs_store_delete(kvs_store *s, const char *key, bool prefix, int64_t *n_deleted, char *err,
                     size_t errlen);

/* Forget history before revision (watches from older revisions get KVS_STORE_RESET).
 * OUT_OF_RANGE when revision is beyond the current one or already compacted. */
int kvs_store_compact(kvs_store *s, int64_t revision, char *err, size_t errlen);

/* ---- transactions (compare-and-swap) ---- */

enum kvs_store_target {
    KVS_STORE_CREATE,  /* the key's create_revision (0 when absent) */
    KVS_STORE_MOD,     /* the key's mod_revision (0 when absent) */
    KVS_STORE_VERSION, /* the key's version (0 when absent) */
    KVS_STORE_VALUE,   /* the key's value (an absent key fails every value compare) */
};
enum kvs_store_result { KVS_STORE_EQUAL, KVS_STORE_NOT_EQUAL, KVS_STORE_LESS, KVS_STORE_GREATER };

struct kvs_store_cmp {
    const char *key;
    enum kvs_store_target target;
    enum kvs_store_result result;
    int64_t number;    /* CREATE, MOD, VERSION */
    const void *value; /* VALUE: value_len bytes, compared as bytes */
    size_t value_len;
};

enum kvs_store_op_type { KVS_STORE_OP_PUT, KVS_STORE_OP_DELETE };

struct kvs_store_op {
    enum kvs_store_op_type type;
    const char *key;
    const void *value; /* PUT */
    size_t value_len;
    int64_t lease; /* PUT; 0 = none */
    bool prefix;   /* DELETE: every key starting with key */
};

/* If every compare holds, apply ok[0..n_ok) else fail[0..n_fail), atomically, as one
 * revision (none if nothing changes). *succeeded = which branch ran; *revision (optional) =
 * the store's revision after the txn. A failed compare is not an error (returns 0). */
int kvs_store_txn(kvs_store *s, const struct kvs_store_cmp *cmp, size_t n_cmp,
                  const struct kvs_store_op *ok, size_t n_ok, const struct kvs_store_op *fail,
                  size_t n_fail, bool *succeeded, int64_t *revision, char *err, size_t errlen);

/* ---- leases ---- */

/* Grant a lease of ttl_s seconds (1..KVS_STORE_MAX_TTL); *id = its id (> 0), *granted_ttl
 * (optional) = the TTL the store granted (etcd rounds up to its minimum). */
int kvs_store_lease_grant(kvs_store *s, int64_t ttl_s, int64_t *id, int64_t *granted_ttl, char *err,
                          size_t errlen);
/* Renew a lease once; *ttl (optional) = its TTL again. NOT_FOUND when it has expired (etcd
 * says so only by leaving TTL out of the reply) or never existed. */
int kvs_store_lease_keepalive(kvs_store *s, int64_t id, int64_t *ttl, char *err, size_t errlen);
/* Revoke a lease and delete its keys. NOT_FOUND when it is already gone. */
int kvs_store_lease_revoke(kvs_store *s, int64_t id, char *err, size_t errlen);

/* ---- watch ---- */

enum kvs_store_event_type {
    KVS_STORE_PUT,
    KVS_STORE_DELETE, /* kv has key and mod_revision (the delete's) only */
    KVS_STORE_RESET,  /* the history was compacted: forget what you know under the prefix;
                         a PUT for every key that exists now follows */
};

struct kvs_store_event {
    enum kvs_store_event_type type;
    struct kvs_store_kv kv; /* owned by the event */
};

/* Watch every key starting with prefix, from revision start_rev on (0 = changes after now).
 * Returns NULL with a reason when it cannot be set up (the etcd watch runs on a thread of its
 * own that reconnects with a backoff while etcd is away). Caller destroys. */
kvs_store_watch *kvs_store_watch_new(kvs_store *s, const char *prefix, int64_t start_rev, char *err,
                                     size_t errlen);
/* Wait up to timeout_ms (0 = do not wait, < 0 = forever) for the next event and move it into
 * *ev (caller frees with kvs_store_event_free). 1 = an event, 0 = none yet, or UNAVAILABLE
 * when the watch has stopped for good, after the events it still holds: its store was
 * closed, or the reader fell a million events behind (then re-list and re-create it). While
 * etcd is away the call simply finds no event; kvs_store_watch_connected tells whether the
 * stream is up. */
int kvs_store_watch_next(kvs_store_watch *w, struct kvs_store_event *ev, int timeout_ms);
/* Whether the watch stream is established now (always true for the embedded store). */
bool kvs_store_watch_connected(kvs_store_watch *w);
void kvs_store_event_free(struct kvs_store_event *ev);
/* Stop and free; accepts NULL and nulls *w. */
void kvs_store_watch_destroy(kvs_store_watch **w);

#endif
