/* Internals shared by common/store.c and its two implementations (store_embedded.c,
 * store_etcd.c): the vtable behind kvs_store and the event queue behind kvs_store_watch.
 * Not for other modules: they use common/store.h. */
#ifndef KVS_STORE_IMPL_H
#define KVS_STORE_IMPL_H

#include "common/store.h"

#include <jansson.h>
#include <pthread.h>

/* Arguments reaching these slots have been checked by store.c (key length, value size, TTL
 * range, non-NULL outputs); outputs are zeroed before the call. */
struct kvs_store_ops {
    const char *kind;
    void (*destroy)(kvs_store *s);
    int (*put)(kvs_store *s, const char *key, const void *value, size_t len, int64_t lease,
               int64_t *revision, char *err, size_t errlen);
    int (*range)(kvs_store *s, const char *key, bool prefix, struct kvs_store_range *out, char *err,
                 size_t errlen);
    int (*del)(kvs_store *s, const char *key, bool prefix, int64_t *n_deleted, char *err,
               size_t errlen);
    int (*compact)(kvs_store *s, int64_t revision, char *err, size_t errlen);
    int (*txn)(kvs_store *s, const struct kvs_store_cmp *cmp, size_t n_cmp,
               const struct kvs_store_op *ok, size_t n_ok, const struct kvs_store_op *fail,
               size_t n_fail, bool *succeeded, int64_t *revision, char *err, size_t errlen);
    int (*lease_grant)(kvs_store *s, int64_t ttl_s, int64_t *id, int64_t *granted_ttl, char *err,
                       size_t errlen);
    int (*lease_keepalive)(kvs_store *s, int64_t id, int64_t *ttl, char *err, size_t errlen);
    int (*lease_revoke)(kvs_store *s, int64_t id, char *err, size_t errlen);
    /* Set up w (already initialized by store.c: prefix, queue) to deliver events from
     * start_rev on; w->impl_stop is called by kvs_store_watch_destroy before w is freed. */
    int (*watch_start)(kvs_store *s, kvs_store_watch *w, int64_t start_rev, char *err,
                       size_t errlen);
};

struct kvs_store {
    const struct kvs_store_ops *ops; /* first member of each implementation's struct */
};

/* A queued event. */
struct watch_item {
    struct kvs_store_event ev;
    struct watch_item *next;
};

#define KVS_STORE_WATCH_MAX_QUEUE 1000000 /* events; a watcher this far behind is failed */

struct kvs_store_watch {
    kvs_store *store;
    char *prefix;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct watch_item *head, *tail; /* FIFO of undelivered events */
    size_t n_queued;
    bool connected;                        /* the stream is up (etcd); always true when embedded */
    bool failed;                           /* stopped for good: next() answers UNAVAILABLE */
    void (*impl_stop)(kvs_store_watch *w); /* stop producing; called without mu held */
    void *impl;                            /* the implementation's per-watch state */
    kvs_store_watch *next_in_store;        /* embedded: list of live watches */
};

/* Move ev (its kv's memory) to the back of w's queue and wake the reader. Takes w->mu.
 * When the queue is full the watch is failed and ev is freed. */
void kvs_store_watch_push(kvs_store_watch *w, struct kvs_store_event *ev);
void kvs_store_watch_set_connected(kvs_store_watch *w, bool connected);
void kvs_store_watch_fail(kvs_store_watch *w);

/* Copy into a fresh kv (value NUL-terminated). NO_MEMORY. */
int kvs_store_kv_copy(struct kvs_store_kv *dst, const struct kvs_store_kv *src);
/* The end of a prefix range: the prefix with its last byte incremented (bytes 0xff are
 * dropped first); "\0" (everything) when the prefix is all 0xff or empty. Caller frees. */
char *kvs_store_prefix_end(const char *prefix, size_t *len);

/* Standard padded base64 (what etcd's gateway wants and sends), through libsodium's strict
 * codec. encode: a malloc'd NUL-terminated string or NULL. decode: 0 with a malloc'd buffer
 * of *len bytes plus a NUL, BAD_FORMAT for invalid base64, NO_MEMORY. */
char *kvs_store_b64_encode(const void *bin, size_t len);
int kvs_store_b64_decode(const char *b64, size_t b64_len, char **bin, size_t *len);

/* ---- the embedded store's file (common/store_file.c): a snapshot and a log ---- */

typedef struct kvs_store_file kvs_store_file;
/* Called at open with the snapshot (snapshot = true, at most once, first) and then with each
 * log record after it, in order; a negative return stops the open with that status. */
typedef int (*kvs_store_file_load_fn)(void *ctx, const json_t *obj, bool snapshot, char *err,
                                      size_t errlen);
/* Open PATH (snapshot) and PATH.log (created if absent), loading both through fn. 0, or
 * BAD_FORMAT (damage: err names the file and line), IO, TOO_LARGE, NO_MEMORY. */
int kvs_store_file_open(const char *path, kvs_store_file_load_fn fn, void *ctx,
                        kvs_store_file **out, char *err, size_t errlen);
/* Append rec (its "seq" is set here) and fsync. IO or NO_MEMORY leave the log as it was. */
int kvs_store_file_append(kvs_store_file *f, json_t *rec, char *err, size_t errlen);
/* Whether the log has outgrown the snapshot (then write one). */
bool kvs_store_file_should_snapshot(const kvs_store_file *f);
/* Replace the snapshot with state (its "log_seq" is set here) and empty the log. */
int kvs_store_file_snapshot(kvs_store_file *f, json_t *state, char *err, size_t errlen);
void kvs_store_file_close(kvs_store_file **f);

kvs_store *kvs_store_embedded_open(const char *path, char *err, size_t errlen);
kvs_store *kvs_store_etcd_open(const char *endpoints, int timeout_ms, char *err, size_t errlen);

#endif
