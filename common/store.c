/* common/store.h: argument checks, URL dispatch and the watch queue shared by the embedded
 * and etcd implementations. */
#include "common/store_impl.h"

#include "common/status.h"

#include <errno.h>
#include <sodium.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- kv / range ---- */

void kvs_store_kv_free(struct kvs_store_kv *kv)
{
    if (kv == NULL) {
        return;
    }
    free(kv->key);
    free(kv->value);
    memset(kv, 0, sizeof *kv);
}

void kvs_store_range_free(struct kvs_store_range *r)
{
    if (r == NULL) {
        return;
    }
    for (size_t i = 0; i < r->n; i++) {
        kvs_store_kv_free(&r->kvs[i]);
    }
    free(r->kvs);
    memset(r, 0, sizeof *r);
}

void kvs_store_event_free(struct kvs_store_event *ev)
{
    if (ev != NULL) {
        kvs_store_kv_free(&ev->kv);
    }
}

int kvs_store_kv_copy(struct kvs_store_kv *dst, const struct kvs_store_kv *src)
{
    *dst = *src;
    dst->key = strdup(src->key ? src->key : "");
    dst->value = malloc(src->value_len + 1);
    if (dst->key == NULL || dst->value == NULL) {
        free(dst->key);
        free(dst->value);
        memset(dst, 0, sizeof *dst);
        return KVS_NO_MEMORY;
    }
    if (src->value_len > 0) {
        memcpy(dst->value, src->value, src->value_len);
    }
    dst->value[src->value_len] = '\0';
    return KVS_OK;
}

char *kvs_store_prefix_end(const char *prefix, size_t *len)
{
    size_t n = strlen(prefix);
    while (n > 0 && (unsigned char)prefix[n - 1] == 0xff) {
        n--;
    }
    if (n == 0) {
        /* etcd's "\0" range end means "every key >= key". */
        char *all = calloc(1, 2);
        if (all != NULL) {
            *len = 1;
        }
        return all;
    }
    char *end = malloc(n + 1);
    if (end == NULL) {
        return NULL;
    }
    memcpy(end, prefix, n);
    end[n - 1] = (char)((unsigned char)end[n - 1] + 1);
    end[n] = '\0';
    *len = n;
    return end;
}

/* ---- base64 ---- */

char *kvs_store_b64_encode(const void *bin, size_t len)
{
    size_t n = sodium_base64_ENCODED_LEN(len, sodium_base64_VARIANT_ORIGINAL);
    char *out = malloc(n);
    if (out != NULL) {
        sodium_bin2base64(out, n, bin, len, sodium_base64_VARIANT_ORIGINAL);
    }
    return out;
}

int kvs_store_b64_decode(const char *b64, size_t b64_len, char **bin, size_t *len)
{
    *bin = NULL;
    *len = 0;
    char *out = malloc(b64_len / 4 * 3 + 3);
    if (out == NULL) {
        return KVS_NO_MEMORY;
    }
    const char *end = NULL;
    size_t n = 0;
    if (sodium_base642bin((unsigned char *)out, b64_len / 4 * 3 + 2, b64, b64_len, NULL, &n, &end,
                          sodium_base64_VARIANT_ORIGINAL) != 0 ||
        end != b64 + b64_len) {
        free(out);
        return KVS_BAD_FORMAT;
    }
    out[n] = '\0';
    *bin = out;
    *len = n;
    return KVS_OK;
}

/* ---- open / destroy ---- */

kvs_store *kvs_store_open(const char *url, int timeout_ms, char *err, size_t errlen)
{
    if (url == NULL) {
        kvs_errf(err, errlen, "store: no URL");
        return NULL;
    }
    if (strncmp(url, "file:", 5) == 0) {
        if (url[5] == '\0') {
            kvs_errf(err, errlen, "store: 'file:' needs a path");
            return NULL;
        }
        return kvs_store_embedded_open(url + 5, err, errlen);
    }
    if (strcmp(url, "mem:") == 0) {
        return kvs_store_embedded_open(NULL, err, errlen);
    }
    if (strncmp(url, "http://", 7) == 0 || strncmp(url, "https://", 8) == 0) {
        if (timeout_ms < 0 || timeout_ms > 600000) {
            kvs_errf(err, errlen, "store: timeout %d ms out of range 0..600000", timeout_ms);
            return NULL;
        }
        return kvs_store_etcd_open(url, timeout_ms ? timeout_ms : 2000, err, errlen);
    }
    kvs_errf(err, errlen, "store: '%s' is not file:PATH, mem: or http://HOST:PORT", url);
    return NULL;
}

void kvs_store_destroy(kvs_store **s)
{
    if (s == NULL || *s == NULL) {
        return;
    }
    (*s)->ops->destroy(*s);
    *s = NULL;
}

const char *kvs_store_kind(const kvs_store *s)
{
    return s->ops->kind;
}

/* ---- argument checks ---- */

static int check_key(const char *key, char *err, size_t errlen)
{
    if (key == NULL || key[0] == '\0') {
        kvs_errf(err, errlen, "store: empty key");
        return KVS_INVALID_ARGUMENT;
    }
    size_t n = strnlen(key, KVS_STORE_MAX_KEY + 1);
    if (n > KVS_STORE_MAX_KEY) {
        kvs_errf(err, errlen, "store: key of more than %d bytes", KVS_STORE_MAX_KEY);
        return KVS_INVALID_ARGUMENT;
    }
    return KVS_OK;
}

static int check_value(const void *value, size_t len, char *err, size_t errlen)
{
    if (len > KVS_STORE_MAX_VALUE) {
        kvs_errf(err, errlen, "store: value of %zu bytes (at most %u)", len, KVS_STORE_MAX_VALUE);
        return KVS_TOO_LARGE;
    }
    if (len > 0 && value == NULL) {
        kvs_errf(err, errlen, "store: NULL value of %zu bytes", len);
        return KVS_INVALID_ARGUMENT;
    }
    return KVS_OK;
}

static int check_lease(int64_t id, char *err, size_t errlen)
{
    if (id <= 0) {
        kvs_errf(err, errlen, "store: lease id %lld (must be > 0)", (long long)id);
        return KVS_INVALID_ARGUMENT;
    }
    return KVS_OK;
}

/* ---- keys ---- */

int kvs_store_put(kvs_store *s, const char *key, const void *value, size_t len, int64_t lease,
                  int64_t *revision, char *err, size_t errlen)
{
    int64_t rev_ignored;
    KVS_TRY(check_key(key, err, errlen));
    KVS_TRY(check_value(value, len, err, errlen));
    if (lease < 0) {
        return check_lease(lease, err, errlen);
    }
    return s->ops->put(s, key, value, len, lease, revision ? revision : &rev_ignored, err, errlen);
}

int kvs_store_range(kvs_store *s, const char *key, bool prefix, struct kvs_store_range *out,
                    char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    if (!(prefix && key != NULL && key[0] == '\0')) {
        KVS_TRY(check_key(key, err, errlen));
    }
    int rc = s->ops->range(s, key, prefix, out, err, errlen);
    if (rc < 0) {
        kvs_store_range_free(out);
    }
    return rc;
}

int kvs_store_get(kvs_store *s, const char *key, struct kvs_store_kv *kv, char *err, size_t errlen)
{
    memset(kv, 0, sizeof *kv);
    struct kvs_store_range r;
    KVS_TRY(kvs_store_range(s, key, false, &r, err, errlen));
    if (r.n == 0) {
        kvs_store_range_free(&r);
        kvs_errf(err, errlen, "store: no key '%s'", key);
        return KVS_NOT_FOUND;
    }
    *kv = r.kvs[0]; /* move the first; a single-key range has at most one */
    for (size_t i = 1; i < r.n; i++) {
        kvs_store_kv_free(&r.kvs[i]);
    }
    free(r.kvs);
    return KVS_OK;
}

int kvs_store_delete(kvs_store *s, const char *key, bool prefix, int64_t *n_deleted, char *err,
                     size_t errlen)
{
    int64_t n_ignored;
    KVS_TRY(check_key(key, err, errlen));
    return s->ops->del(s, key, prefix, n_deleted ? n_deleted : &n_ignored, err, errlen);
}

int kvs_store_compact(kvs_store *s, int64_t revision, char *err, size_t errlen)
{
    if (revision <= 0) {
        kvs_errf(err, errlen, "store: compact revision %lld (must be > 0)", (long long)revision);
        return KVS_INVALID_ARGUMENT;
    }
    return s->ops->compact(s, revision, err, errlen);
}

static int check_ops(const struct kvs_store_op *ops, size_t n, char *err, size_t errlen)
{
    for (size_t i = 0; i < n; i++) {
        KVS_TRY(check_key(ops[i].key, err, errlen));
        if (ops[i].type == KVS_STORE_OP_PUT) {
            KVS_TRY(check_value(ops[i].value, ops[i].value_len, err, errlen));
            if (ops[i].lease < 0) {
                return check_lease(ops[i].lease, err, errlen);
            }
        } else if (ops[i].type != KVS_STORE_OP_DELETE) {
            kvs_errf(err, errlen, "store: txn op %zu has type %d", i, (int)ops[i].type);
            return KVS_INVALID_ARGUMENT;
        }
    }
    return KVS_OK;
}

#define KVS_STORE_MAX_TXN_OPS 128 /* etcd's default --max-txn-ops */

int kvs_store_txn(kvs_store *s, const struct kvs_store_cmp *cmp, size_t n_cmp,
                  const struct kvs_store_op *ok, size_t n_ok, const struct kvs_store_op *fail,
                  size_t n_fail, bool *succeeded, int64_t *revision, char *err, size_t errlen)
{
    int64_t rev_ignored;
    *succeeded = false;
    if (n_cmp > KVS_STORE_MAX_TXN_OPS || n_ok > KVS_STORE_MAX_TXN_OPS ||
        n_fail > KVS_STORE_MAX_TXN_OPS) {
        kvs_errf(err, errlen, "store: txn with more than %d compares or ops",
                 KVS_STORE_MAX_TXN_OPS);
        return KVS_TOO_LARGE;
    }
    for (size_t i = 0; i < n_cmp; i++) {
        KVS_TRY(check_key(cmp[i].key, err, errlen));
        if (cmp[i].target == KVS_STORE_VALUE) {
            KVS_TRY(check_value(cmp[i].value, cmp[i].value_len, err, errlen));
        }
        if ((unsigned)cmp[i].target > KVS_STORE_VALUE ||
            (unsigned)cmp[i].result > KVS_STORE_GREATER) {
            kvs_errf(err, errlen, "store: txn compare %zu has target %d result %d", i,
                     (int)cmp[i].target, (int)cmp[i].result);
            return KVS_INVALID_ARGUMENT;
        }
    }
    KVS_TRY(check_ops(ok, n_ok, err, errlen));
    KVS_TRY(check_ops(fail, n_fail, err, errlen));
    return s->ops->txn(s, cmp, n_cmp, ok, n_ok, fail, n_fail, succeeded,
                       revision ? revision : &rev_ignored, err, errlen);
}

/* ---- leases ---- */

int kvs_store_lease_grant(kvs_store *s, int64_t ttl_s, int64_t *id, int64_t *granted_ttl, char *err,
                          size_t errlen)
{
    int64_t ttl_ignored;
    *id = 0;
    if (ttl_s < 1 || ttl_s > KVS_STORE_MAX_TTL) {
        kvs_errf(err, errlen, "store: lease TTL %lld s out of range 1..%d", (long long)ttl_s,
                 KVS_STORE_MAX_TTL);
        return KVS_INVALID_ARGUMENT;
    }
    return s->ops->lease_grant(s, ttl_s, id, granted_ttl ? granted_ttl : &ttl_ignored, err, errlen);
}

int kvs_store_lease_keepalive(kvs_store *s, int64_t id, int64_t *ttl, char *err, size_t errlen)
{
    int64_t ttl_ignored;
    KVS_TRY(check_lease(id, err, errlen));
    return s->ops->lease_keepalive(s, id, ttl ? ttl : &ttl_ignored, err, errlen);
}

int kvs_store_lease_revoke(kvs_store *s, int64_t id, char *err, size_t errlen)
{
    KVS_TRY(check_lease(id, err, errlen));
    return s->ops->lease_revoke(s, id, err, errlen);
}

/* ---- watch ---- */

kvs_store_watch *kvs_store_watch_new(kvs_store *s, const char *prefix, int64_t start_rev, char *err,
                                     size_t errlen)
{
    if (prefix == NULL || strlen(prefix) > KVS_STORE_MAX_KEY || start_rev < 0) {
        kvs_errf(err, errlen, "store: bad watch prefix or start revision %lld",
                 (long long)start_rev);
        return NULL;
    }
    kvs_store_watch *w = calloc(1, sizeof *w);
    if (w == NULL || (w->prefix = strdup(prefix)) == NULL) {
        free(w);
        kvs_errf(err, errlen, "store: out of memory");
        return NULL;
    }
    w->store = s;
    pthread_mutex_init(&w->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&w->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (s->ops->watch_start(s, w, start_rev, err, errlen) < 0) {
        w->impl_stop = NULL;
        kvs_store_watch_destroy(&w);
        return NULL;
    }
    return w;
}

void kvs_store_watch_push(kvs_store_watch *w, struct kvs_store_event *ev)
{
    struct watch_item *it = malloc(sizeof *it);
    pthread_mutex_lock(&w->mu);
    if (it == NULL || w->failed || w->n_queued >= KVS_STORE_WATCH_MAX_QUEUE) {
        w->failed = true; /* the reader is told; it re-creates the watch from a fresh list */
        pthread_mutex_unlock(&w->mu);
        free(it);
        kvs_store_event_free(ev);
        pthread_cond_broadcast(&w->cv);
        return;
    }
    it->ev = *ev;
    memset(ev, 0, sizeof *ev);
    it->next = NULL;
    if (w->tail != NULL) {
        w->tail->next = it;
    } else {
        w->head = it;
    }
    w->tail = it;
    w->n_queued++;
    pthread_mutex_unlock(&w->mu);
    pthread_cond_broadcast(&w->cv);
}

void kvs_store_watch_set_connected(kvs_store_watch *w, bool connected)
{
    pthread_mutex_lock(&w->mu);
    w->connected = connected;
    pthread_mutex_unlock(&w->mu);
}

void kvs_store_watch_fail(kvs_store_watch *w)
{
    pthread_mutex_lock(&w->mu);
    w->failed = true;
    pthread_mutex_unlock(&w->mu);
    pthread_cond_broadcast(&w->cv);
}

int kvs_store_watch_next(kvs_store_watch *w, struct kvs_store_event *ev, int timeout_ms)
{
    memset(ev, 0, sizeof *ev);
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    if (timeout_ms > 0) {
        deadline.tv_sec += timeout_ms / 1000;
        deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&w->mu);
    while (w->head == NULL && !w->failed && timeout_ms != 0) {
        if (timeout_ms < 0) {
            pthread_cond_wait(&w->cv, &w->mu);
        } else if (pthread_cond_timedwait(&w->cv, &w->mu, &deadline) == ETIMEDOUT) {
            break;
        }
    }
    int rc = 0;
    if (w->head != NULL) {
        struct watch_item *it = w->head;
        w->head = it->next;
        if (w->head == NULL) {
            w->tail = NULL;
        }
        w->n_queued--;
        *ev = it->ev;
        free(it);
        rc = 1;
    } else if (w->failed) {
        rc = KVS_UNAVAILABLE;
    }
    pthread_mutex_unlock(&w->mu);
    return rc;
}

bool kvs_store_watch_connected(kvs_store_watch *w)
{
    pthread_mutex_lock(&w->mu);
    bool c = w->connected;
    pthread_mutex_unlock(&w->mu);
    return c;
}

void kvs_store_watch_destroy(kvs_store_watch **pw)
{
    if (pw == NULL || *pw == NULL) {
        return;
    }
    kvs_store_watch *w = *pw;
    if (w->impl_stop != NULL) {
        w->impl_stop(w);
    }
    while (w->head != NULL) {
        struct watch_item *it = w->head;
        w->head = it->next;
        kvs_store_event_free(&it->ev);
        free(it);
    }
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    free(w->prefix);
    free(w);
    *pw = NULL;
}
