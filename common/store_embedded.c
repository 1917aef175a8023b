/* The embedded store (common/store.h): a sorted array of keys in process memory, leases
 * expired by a ticker thread on the monotonic clock, a bounded history of events for
 * watches, and every change logged to a file before it is acknowledged.
 *
 * Every change is planned, applied in memory with an undo log, made durable (one record
 * appended to PATH.log and fsync'd; now and then a snapshot of the whole state replaces PATH:
 * common/store_file.c) and only then published to watches; when the record cannot be
 * written the undo log puts the memory back, so a failed call changes nothing. The files
 * hold keys, leases and the revision, not history: after a reopen the history starts at the
 * reopened revision (older watches re-list) and every lease has its full TTL again, as etcd
 * after an outage. */
#include "common/store_impl.h"

#include "common/log.h"
#include "common/status.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define HISTORY_MAX 10000 /* events kept for watches; older ones are compacted away */
#define TICK_MS 100       /* lease expiry resolution */

struct lease {
    int64_t id;
    int64_t ttl;         /* seconds */
    int64_t deadline_ms; /* monotonic */
};

/* One entry of the undo log of the change in progress. */
struct undo {
    char *key;
    bool existed;            /* old is the key's previous state */
    struct kvs_store_kv old; /* owned */
};

struct embedded {
    struct kvs_store base;
    pthread_mutex_t mu;
    char *path;           /* NULL = not persisted */
    kvs_store_file *file; /* PATH and PATH.log; NULL = not persisted */
    int64_t revision;     /* the store's revision; 1 when empty, as etcd */
    int64_t compact_rev;  /* history covers revisions > compact_rev */
    int64_t next_lease;
    struct kvs_store_kv *kvs; /* n_kvs, sorted by key */
    size_t n_kvs, cap_kvs;
    struct lease *leases; /* n_leases, unordered */
    size_t n_leases, cap_leases;
    struct kvs_store_event *hist; /* n_hist, revision order */
    size_t n_hist, cap_hist;
    struct undo *undo; /* the change in progress */
    size_t n_undo, cap_undo;
    struct kvs_store_event *pending; /* events of the change in progress */
    size_t n_pending, cap_pending;
    kvs_store_watch *watches; /* live watches (w->next_in_store) */
    pthread_t ticker;
    pthread_cond_t tick_cv;
    bool stopping;
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void *grow(void *p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) {
        return p;
    }
    size_t c = *cap ? *cap * 2 : 16;
    while (c < need) {
        c *= 2;
    }
    void *q = realloc(p, c * elem);
    if (q != NULL) {
        *cap = c;
    }
    return q;
}

/* ---- the key array ---- */

/* Index of key, or of where it would go (*found false). */
static size_t find(const struct embedded *e, const char *key, bool *found)
{
    size_t lo = 0, hi = e->n_kvs;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(e->kvs[mid].key, key);
        if (c == 0) {
            *found = true;
            return mid;
        }
        if (c < 0) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    *found = false;
    return lo;
}

static bool has_prefix(const char *key, const char *prefix)
{
    return strncmp(key, prefix, strlen(prefix)) == 0;
}

static struct lease *find_lease(struct embedded *e, int64_t id)
{
    for (size_t i = 0; i < e->n_leases; i++) {
        if (e->leases[i].id == id) {
            return &e->leases[i];
        }
    }
    return NULL;
}

/* ---- changes: undo log, pending events ---- */

static int record_undo(struct embedded *e, const char *key, const struct kvs_store_kv *old)
{
    struct undo *u = grow(e->undo, &e->cap_undo, e->n_undo + 1, sizeof *u);
    if (u == NULL) {
        return KVS_NO_MEMORY;
    }
    e->undo = u;
    struct undo *slot = &e->undo[e->n_undo];
    memset(slot, 0, sizeof *slot);
    slot->key = strdup(key);
    if (slot->key == NULL) {
        return KVS_NO_MEMORY;
    }
    if (old != NULL) {
        if (kvs_store_kv_copy(&slot->old, old) < 0) {
            free(slot->key);
            return KVS_NO_MEMORY;
        }
        slot->existed = true;
    }
    e->n_undo++;
    return KVS_OK;
}

static int add_pending(struct embedded *e, enum kvs_store_event_type type,
                       const struct kvs_store_kv *kv)
{
    struct kvs_store_event *p = grow(e->pending, &e->cap_pending, e->n_pending + 1, sizeof *p);
    if (p == NULL) {
        return KVS_NO_MEMORY;
    }
    e->pending = p;
    struct kvs_store_event *ev = &e->pending[e->n_pending];
    ev->type = type;
    KVS_TRY(kvs_store_kv_copy(&ev->kv, kv));
    e->n_pending++;
    return KVS_OK;
}

/* Put key in memory at revision rev (recording undo and the event). */
static int apply_put(struct embedded *e, const char *key, const void *value, size_t len,
                     int64_t lease, int64_t rev)
{
    bool found;
    size_t i = find(e, key, &found);
    KVS_TRY(record_undo(e, key, found ? &e->kvs[i] : NULL));
    char *v = malloc(len + 1);
    if (v == NULL) {
        return KVS_NO_MEMORY;
    }
    if (len > 0) {
        memcpy(v, value, len);
    }
    v[len] = '\0';
    if (found) {
        struct kvs_store_kv *kv = &e->kvs[i];
        free(kv->value);
        kv->value = v;
        kv->value_len = len;
        kv->mod_revision = rev;
        kv->version++;
        kv->lease = lease;
    } else {
        struct kvs_store_kv *kvs = grow(e->kvs, &e->cap_kvs, e->n_kvs + 1, sizeof *kvs);
        if (kvs != NULL) {
            e->kvs = kvs;
        }
        char *k = strdup(key);
        if (kvs == NULL || k == NULL) {
            free(v);
            free(k);
            return KVS_NO_MEMORY;
        }
        memmove(&e->kvs[i + 1], &e->kvs[i], (e->n_kvs - i) * sizeof *kvs);
        e->kvs[i] = (struct kvs_store_kv){.key = k,
                                          .value = v,
                                          .value_len = len,
                                          .create_revision = rev,
                                          .mod_revision = rev,
                                          .version = 1,
                                          .lease = lease};
        e->n_kvs++;
    }
    return add_pending(e, KVS_STORE_PUT, &e->kvs[i]);
}

/* Remove the key at index i at revision rev. */
static int apply_delete_at(struct embedded *e, size_t i, int64_t rev)
{
    KVS_TRY(record_undo(e, e->kvs[i].key, &e->kvs[i]));
    struct kvs_store_kv gone = {.key = e->kvs[i].key, .value = "", .mod_revision = rev};
    KVS_TRY(add_pending(e, KVS_STORE_DELETE, &gone));
    kvs_store_kv_free(&e->kvs[i]);
    memmove(&e->kvs[i], &e->kvs[i + 1], (e->n_kvs - i - 1) * sizeof *e->kvs);
    e->n_kvs--;
    return KVS_OK;
}

static int apply_delete(struct embedded *e, const char *key, bool prefix, int64_t rev,
                        int64_t *n_deleted)
{
    bool found;
    size_t i = find(e, key, &found);
    if (!prefix) {
        if (found) {
            KVS_TRY(apply_delete_at(e, i, rev));
            (*n_deleted)++;
        }
        return KVS_OK;
    }
    while (i < e->n_kvs && has_prefix(e->kvs[i].key, key)) {
        KVS_TRY(apply_delete_at(e, i, rev));
        (*n_deleted)++;
    }
    return KVS_OK;
}

/* Undo the change in progress (reverse order) and drop its events. */
static void rollback(struct embedded *e)
{
    for (size_t j = e->n_undo; j-- > 0;) {
        struct undo *u = &e->undo[j];
        bool found;
        size_t i = find(e, u->key, &found);
        if (found) {
            kvs_store_kv_free(&e->kvs[i]);
            if (u->existed) {
                e->kvs[i] = u->old; /* move back */
                memset(&u->old, 0, sizeof u->old);
            } else {
                memmove(&e->kvs[i], &e->kvs[i + 1], (e->n_kvs - i - 1) * sizeof *e->kvs);
                e->n_kvs--;
            }
        } else if (u->existed) {
            /* Deleted by the change: re-insert (capacity was there before). */
            struct kvs_store_kv *kvs = grow(e->kvs, &e->cap_kvs, e->n_kvs + 1, sizeof *kvs);
            if (kvs == NULL) {
                KVS_ERROR("store: out of memory while undoing a change to '%s'", u->key);
                continue;
            }
            e->kvs = kvs;
            memmove(&e->kvs[i + 1], &e->kvs[i], (e->n_kvs - i) * sizeof *kvs);
            e->kvs[i] = u->old;
            memset(&u->old, 0, sizeof u->old);
            e->n_kvs++;
        }
    }
    for (size_t j = 0; j < e->n_undo; j++) {
        free(e->undo[j].key);
        kvs_store_kv_free(&e->undo[j].old);
    }
    e->n_undo = 0;
    for (size_t j = 0; j < e->n_pending; j++) {
        kvs_store_event_free(&e->pending[j]);
    }
    e->n_pending = 0;
}

/* ---- the file (common/store_file.c): the snapshot's and the log records' JSON ---- */

static json_t *kv_json(const struct kvs_store_kv *kv)
{
    char *b64 = kvs_store_b64_encode(kv->value, kv->value_len);
    json_t *j = b64 ? json_pack("{sssssIsIsIsI}", "key", kv->key, "value", b64, "create_revision",
                                (json_int_t)kv->create_revision, "mod_revision",
                                (json_int_t)kv->mod_revision, "version", (json_int_t)kv->version,
                                "lease", (json_int_t)kv->lease)
                    : NULL;
    free(b64);
    return j;
}

/* The whole state (a snapshot). NULL when out of memory. */
static json_t *state_to_json(const struct embedded *e)
{
    json_t *kvs = json_array(), *leases = json_array();
    json_t *root =
        json_pack("{sssIsIsoso}", "format", "kvstream-store-1", "revision", (json_int_t)e->revision,
                  "next_lease", (json_int_t)e->next_lease, "leases", leases, "kvs", kvs);
    for (size_t i = 0; root != NULL && i < e->n_leases; i++) {
        if (json_array_append_new(leases, json_pack("{sIsI}", "id", (json_int_t)e->leases[i].id,
                                                    "ttl", (json_int_t)e->leases[i].ttl)) < 0) {
            json_decref(root);
            root = NULL;
        }
    }
    for (size_t i = 0; root != NULL && i < e->n_kvs; i++) {
        if (json_array_append_new(kvs, kv_json(&e->kvs[i])) < 0) {
            json_decref(root);
            root = NULL;
        }
    }
    return root;
}

/* A key as written by kv_json, validated (the file comes from outside). */
static int kv_from_json(const json_t *it, int64_t max_rev, struct kvs_store_kv *kv)
{
    memset(kv, 0, sizeof *kv);
    const char *key, *b64;
    json_int_t cr, mr, ver, lease;
    if (json_unpack((json_t *)it, "{sssssIsIsIsI}", "key", &key, "value", &b64, "create_revision",
                    &cr, "mod_revision", &mr, "version", &ver, "lease", &lease) != 0 ||
        key[0] == '\0' || strlen(key) > KVS_STORE_MAX_KEY || cr < 1 || mr < cr || mr > max_rev ||
        ver < 1 || lease < 0) {
        return KVS_BAD_FORMAT;
    }
    *kv = (struct kvs_store_kv){
        .create_revision = cr, .mod_revision = mr, .version = ver, .lease = lease};
    int rc = kvs_store_b64_decode(b64, strlen(b64), &kv->value, &kv->value_len);
    kv->key = strdup(key);
    if (rc < 0 || kv->key == NULL) {
        kvs_store_kv_free(kv);
        return rc < 0 ? rc : KVS_NO_MEMORY;
    }
    return KVS_OK;
}

/* Insert or replace a loaded key (moved in). */
static int put_loaded(struct embedded *e, struct kvs_store_kv *kv)
{
    bool found;
    size_t i = find(e, kv->key, &found);
    if (found) {
        kvs_store_kv_free(&e->kvs[i]);
        e->kvs[i] = *kv;
        return KVS_OK;
    }
    struct kvs_store_kv *arr = grow(e->kvs, &e->cap_kvs, e->n_kvs + 1, sizeof *arr);
    if (arr == NULL) {
        kvs_store_kv_free(kv);
        return KVS_NO_MEMORY;
    }
    e->kvs = arr;
    memmove(&e->kvs[i + 1], &e->kvs[i], (e->n_kvs - i) * sizeof *arr);
    e->kvs[i] = *kv;
    e->n_kvs++;
    return KVS_OK;
}

/* Add a lease with its full TTL from now (after a restart, as etcd after an outage). */
static int lease_loaded(struct embedded *e, const json_t *it)
{
    json_int_t id, ttl;
    if (json_unpack((json_t *)it, "{sIsI}", "id", &id, "ttl", &ttl) != 0 || id < 1 || ttl < 1 ||
        ttl > KVS_STORE_MAX_TTL || find_lease(e, id) != NULL) {
        return KVS_BAD_FORMAT;
    }
    struct lease *l = grow(e->leases, &e->cap_leases, e->n_leases + 1, sizeof *l);
    if (l == NULL) {
        return KVS_NO_MEMORY;
    }
    e->leases = l;
    e->leases[e->n_leases++] = (struct lease){id, ttl, now_ms() + ttl * 1000};
    return KVS_OK;
}

static int load_snapshot(struct embedded *e, const json_t *root, char *err, size_t errlen)
{
    json_error_t jerr;
    json_int_t revision = 0, next_lease = 0;
    json_t *kvs = NULL, *leases = NULL;
    const char *format = NULL;
    if (json_unpack_ex((json_t *)root, &jerr, JSON_STRICT, "{sssIsIsoso}", "format", &format,
                       "revision", &revision, "next_lease", &next_lease, "leases", &leases, "kvs",
                       &kvs) != 0 ||
        strcmp(format, "kvstream-store-1") != 0 || !json_is_array(kvs) || !json_is_array(leases) ||
        revision < 1 || next_lease < 1) {
        kvs_errf(err, errlen, "store: %s is not a kvstream store file (%s)", e->path, jerr.text);
        return KVS_BAD_FORMAT;
    }
    e->revision = revision;
    e->next_lease = next_lease;
    size_t i;
    json_t *it;
    json_array_foreach(leases, i, it)
    {
        int rc = lease_loaded(e, it);
        if (rc < 0) {
            kvs_errf(err, errlen, "store: %s: bad lease %zu", e->path, i);
            return rc;
        }
    }
    json_array_foreach(kvs, i, it)
    {
        struct kvs_store_kv kv;
        int rc = kv_from_json(it, revision, &kv);
        if (rc == KVS_OK && e->n_kvs > 0 && strcmp(e->kvs[e->n_kvs - 1].key, kv.key) >= 0) {
            kvs_store_kv_free(&kv);
            rc = KVS_BAD_FORMAT; /* keys are written sorted and unique */
        }
        if (rc == KVS_OK) {
            rc = put_loaded(e, &kv);
        }
        if (rc < 0) {
            kvs_errf(err, errlen, "store: %s: bad key record %zu", e->path, i);
            return rc;
        }
    }
    return KVS_OK;
}

/* Replay one change record (as change_record writes it). */
static int load_record(struct embedded *e, const json_t *rec, char *err, size_t errlen)
{
    json_int_t rev = 0, next_lease = 0;
    json_t *puts = NULL, *dels = NULL, *grant = NULL;
    json_int_t drop = 0;
    int rc = KVS_OK;
    if (json_unpack((json_t *)rec, "{sIsIs?os?os?os?I}", "rev", &rev, "next_lease", &next_lease,
                    "put", &puts, "del", &dels, "lease_grant", &grant, "lease_drop", &drop) != 0 ||
        rev < e->revision || next_lease < e->next_lease || (puts && !json_is_array(puts)) ||
        (dels && !json_is_array(dels))) {
        rc = KVS_BAD_FORMAT;
    }
    size_t i;
    json_t *it;
    json_array_foreach(puts, i, it)
    {
        struct kvs_store_kv kv;
        if (rc == KVS_OK && (rc = kv_from_json(it, rev, &kv)) == KVS_OK) {
            rc = put_loaded(e, &kv);
        }
    }
    json_array_foreach(dels, i, it)
    {
        bool found = false;
        size_t at = json_is_string(it) ? find(e, json_string_value(it), &found) : 0;
        if (rc == KVS_OK && !json_is_string(it)) {
            rc = KVS_BAD_FORMAT;
        } else if (rc == KVS_OK && found) {
            kvs_store_kv_free(&e->kvs[at]);
            memmove(&e->kvs[at], &e->kvs[at + 1], (e->n_kvs - at - 1) * sizeof *e->kvs);
            e->n_kvs--;
        }
    }
    if (rc == KVS_OK && grant != NULL) {
        rc = lease_loaded(e, grant);
    }
    if (rc == KVS_OK && drop != 0) {
        struct lease *l = find_lease(e, drop);
        if (l != NULL) {
            *l = e->leases[--e->n_leases];
        }
    }
    if (rc < 0) {
        kvs_errf(err, errlen, "store: %s.log: bad change record at revision %lld", e->path,
                 (long long)rev);
        return rc;
    }
    e->revision = rev;
    e->next_lease = next_lease;
    return KVS_OK;
}

static int on_load(void *ctx, const json_t *obj, bool snapshot, char *err, size_t errlen)
{
    struct embedded *e = ctx;
    return snapshot ? load_snapshot(e, obj, err, errlen) : load_record(e, obj, err, errlen);
}

/* A lease granted or dropped by the change in progress (0 = none). */
struct lease_change {
    int64_t grant_id, grant_ttl;
    int64_t drop_id;
};

/* The change in progress as a log record: the final state of every key it touched. */
static json_t *change_record(struct embedded *e, const struct lease_change *lc)
{
    json_t *puts = json_array(), *dels = json_array();
    json_t *rec = json_pack("{sIsIsoso}", "rev", (json_int_t)e->revision, "next_lease",
                            (json_int_t)e->next_lease, "put", puts, "del", dels);
    for (size_t j = 0; rec != NULL && j < e->n_undo; j++) {
        bool seen = false; /* a key changed twice in one txn is written once */
        for (size_t p = 0; p < j && !seen; p++) {
            seen = strcmp(e->undo[p].key, e->undo[j].key) == 0;
        }
        if (seen) {
            continue;
        }
        bool found;
        size_t i = find(e, e->undo[j].key, &found);
        json_t *item = found ? kv_json(&e->kvs[i]) : json_string(e->undo[j].key);
        if (json_array_append_new(found ? puts : dels, item) < 0) {
            json_decref(rec);
            rec = NULL;
        }
    }
    if (rec != NULL && lc != NULL && lc->grant_id != 0) {
        json_object_set_new(
            rec, "lease_grant",
            json_pack("{sIsI}", "id", (json_int_t)lc->grant_id, "ttl", (json_int_t)lc->grant_ttl));
    }
    if (rec != NULL && lc != NULL && lc->drop_id != 0) {
        json_object_set_new(rec, "lease_drop", json_integer(lc->drop_id));
    }
    return rec;
}

/* Log the change in progress (no-op for a store without a file); now and then a snapshot. */
static int persist(struct embedded *e, const struct lease_change *lc, char *err, size_t errlen)
{
    if (e->file == NULL) {
        return KVS_OK;
    }
    json_t *rec = change_record(e, lc);
    if (rec == NULL) {
        kvs_errf(err, errlen, "store: out of memory writing %s", e->path);
        return KVS_NO_MEMORY;
    }
    int rc = kvs_store_file_append(e->file, rec, err, errlen);
    json_decref(rec);
    if (rc == KVS_OK && kvs_store_file_should_snapshot(e->file)) {
        char serr[256];
        json_t *state = state_to_json(e);
        if (state == NULL || kvs_store_file_snapshot(e->file, state, serr, sizeof serr) < 0) {
            /* The change is in the log; the snapshot is tried again after the next one. */
            KVS_WARN("store: snapshot of %s failed: %s", e->path, state ? serr : "no memory");
        }
        json_decref(state);
    }
    return rc;
}

/* ---- commit: persist, then publish ---- */

static void history_add(struct embedded *e, const struct kvs_store_event *ev)
{
    if (e->n_hist >= HISTORY_MAX) {
        /* Compact the older half, never splitting one revision's events. */
        size_t cut = e->n_hist / 2;
        int64_t cut_rev = e->hist[cut - 1].kv.mod_revision;
        while (cut < e->n_hist && e->hist[cut].kv.mod_revision == cut_rev) {
            cut++;
        }
        for (size_t i = 0; i < cut; i++) {
            kvs_store_event_free(&e->hist[i]);
        }
        memmove(e->hist, e->hist + cut, (e->n_hist - cut) * sizeof *e->hist);
        e->n_hist -= cut;
        e->compact_rev = cut_rev;
    }
    struct kvs_store_event *h = grow(e->hist, &e->cap_hist, e->n_hist + 1, sizeof *h);
    if (h == NULL) {
        e->compact_rev = e->revision; /* watches from before re-list */
        return;
    }
    e->hist = h;
    struct kvs_store_event *slot = &e->hist[e->n_hist];
    slot->type = ev->type;
    if (kvs_store_kv_copy(&slot->kv, &ev->kv) == KVS_OK) {
        e->n_hist++;
    } else {
        e->compact_rev = e->revision;
    }
}

static void publish(struct embedded *e, const struct kvs_store_event *ev)
{
    for (kvs_store_watch *w = e->watches; w != NULL; w = w->next_in_store) {
        if (!has_prefix(ev->kv.key, w->prefix)) {
            continue;
        }
        struct kvs_store_event copy = {.type = ev->type};
        if (kvs_store_kv_copy(&copy.kv, &ev->kv) < 0) {
            kvs_store_watch_fail(w);
            continue;
        }
        kvs_store_watch_push(w, &copy);
    }
}

/* Make the change in progress durable and visible, or undo it. new_rev is the revision the
 * change was applied at (ignored when it changed nothing). */
static int commit(struct embedded *e, int64_t new_rev, const struct lease_change *lc, char *err,
                  size_t errlen)
{
    int64_t old_rev = e->revision;
    if (e->n_pending > 0) {
        e->revision = new_rev;
    }
    if (lc != NULL || e->n_undo > 0 || e->n_pending > 0) {
        int rc = persist(e, lc, err, errlen);
        if (rc < 0) {
            e->revision = old_rev;
            rollback(e);
            return rc;
        }
    }
    for (size_t i = 0; i < e->n_pending; i++) {
        history_add(e, &e->pending[i]);
        publish(e, &e->pending[i]);
        kvs_store_event_free(&e->pending[i]);
    }
    e->n_pending = 0;
    for (size_t j = 0; j < e->n_undo; j++) {
        free(e->undo[j].key);
        kvs_store_kv_free(&e->undo[j].old);
    }
    e->n_undo = 0;
    return KVS_OK;
}

/* Delete every key of lease id, and the lease, as one revision. Locked. */
static int drop_lease(struct embedded *e, int64_t id, char *err, size_t errlen)
{
    int64_t rev = e->revision + 1, n = 0;
    int rc = KVS_OK;
    for (size_t i = 0; i < e->n_kvs && rc == KVS_OK;) {
        if (e->kvs[i].lease == id) {
            rc = apply_delete_at(e, i, rev);
            n++;
        } else {
            i++;
        }
    }
    if (rc < 0) {
        rollback(e);
        return rc;
    }
    struct lease *l = find_lease(e, id);
    struct lease saved = *l;
    *l = e->leases[--e->n_leases];
    struct lease_change lc = {.drop_id = id};
    rc = commit(e, rev, &lc, err, errlen);
    if (rc < 0) {
        e->leases[e->n_leases++] = saved; /* order does not matter */
    }
    return rc;
}

static void expire_leases(struct embedded *e)
{
    int64_t now = now_ms();
    for (size_t i = 0; i < e->n_leases;) {
        if (e->leases[i].deadline_ms <= now) {
            char err[256];
            int64_t id = e->leases[i].id;
            if (drop_lease(e, id, err, sizeof err) < 0) {
                KVS_ERROR("store: lease %lld expired but could not be dropped: %s", (long long)id,
                          err);
                i++; /* retried at the next tick */
            }
            continue; /* the array changed at i */
        }
        i++;
    }
}

static void *ticker_main(void *arg)
{
    struct embedded *e = arg;
    pthread_mutex_lock(&e->mu);
    while (!e->stopping) {
        expire_leases(e);
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += TICK_MS * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&e->tick_cv, &e->mu, &ts);
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

/* ---- the ops ---- */

#define E(s) ((struct embedded *)(s))

static int e_put(kvs_store *s, const char *key, const void *value, size_t len, int64_t lease,
                 int64_t *revision, char *err, size_t errlen)
{
    struct embedded *e = E(s);
    pthread_mutex_lock(&e->mu);
    int rc;
    if (lease != 0 && find_lease(e, lease) == NULL) {
        kvs_errf(err, errlen, "store: lease %lld not found", (long long)lease);
        rc = KVS_NOT_FOUND;
    } else if ((rc = apply_put(e, key, value, len, lease, e->revision + 1)) < 0) {
        rollback(e);
        kvs_errf(err, errlen, "store: out of memory");
    } else if ((rc = commit(e, e->revision + 1, NULL, err, errlen)) == KVS_OK) {
        *revision = e->revision;
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

static int e_range(kvs_store *s, const char *key, bool prefix, struct kvs_store_range *out,
                   char *err, size_t errlen)
{
    struct embedded *e = E(s);
    pthread_mutex_lock(&e->mu);
    bool found;
    size_t i = find(e, key, &found), end = i;
    if (prefix) {
        while (end < e->n_kvs && has_prefix(e->kvs[end].key, key)) {
            end++;
        }
    } else if (found) {
        end = i + 1;
    }
    int rc = KVS_OK;
    out->revision = e->revision;
    if (end > i) {
        out->kvs = calloc(end - i, sizeof *out->kvs);
        rc = out->kvs ? KVS_OK : KVS_NO_MEMORY;
        for (size_t j = i; j < end && rc == KVS_OK; j++) {
            rc = kvs_store_kv_copy(&out->kvs[out->n], &e->kvs[j]);
            out->n += rc == KVS_OK;
        }
    }
    pthread_mutex_unlock(&e->mu);
    if (rc < 0) {
        kvs_errf(err, errlen, "store: out of memory");
    }
    return rc;
}

static int e_del(kvs_store *s, const char *key, bool prefix, int64_t *n_deleted, char *err,
                 size_t errlen)
{
    struct embedded *e = E(s);
    pthread_mutex_lock(&e->mu);
    *n_deleted = 0;
    int rc = apply_delete(e, key, prefix, e->revision + 1, n_deleted);
    if (rc < 0) {
        rollback(e);
        *n_deleted = 0;
        kvs_errf(err, errlen, "store: out of memory");
    } else {
        rc = commit(e, e->revision + 1, NULL, err, errlen);
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

static int e_compact(kvs_store *s, int64_t revision, char *err, size_t errlen)
{
    struct embedded *e = E(s);
    pthread_mutex_lock(&e->mu);
    int rc = KVS_OK;
    if (revision > e->revision) {
        kvs_errf(err, errlen, "store: compact to %lld beyond the current revision %lld",
                 (long long)revision, (long long)e->revision);
        rc = KVS_OUT_OF_RANGE;
    } else if (revision <= e->compact_rev) {
        kvs_errf(err, errlen, "store: revision %lld has been compacted", (long long)revision);
        rc = KVS_OUT_OF_RANGE;
    } else {
        size_t cut = 0;
        while (cut < e->n_hist && e->hist[cut].kv.mod_revision <= revision) {
            kvs_store_event_free(&e->hist[cut++]);
        }
        memmove(e->hist, e->hist + cut, (e->n_hist - cut) * sizeof *e->hist);
        e->n_hist -= cut;
        e->compact_rev = revision;
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

static int64_t cmp_number(const struct kvs_store_kv *kv, enum kvs_store_target t)
{
    if (kv == NULL) {
        return 0;
    }
    switch (t) {
    case KVS_STORE_CREATE:
        return kv->create_revision;
    case KVS_STORE_MOD:
        return kv->mod_revision;
    case KVS_STORE_VERSION:
        return kv->version;
    case KVS_STORE_VALUE:
        break;
    }
    return 0;
}

static bool compare_holds(struct embedded *e, const struct kvs_store_cmp *c)
{
    bool found;
    size_t i = find(e, c->key, &found);
    const struct kvs_store_kv *kv = found ? &e->kvs[i] : NULL;
    int order;
    if (c->target == KVS_STORE_VALUE) {
        if (kv == NULL) {
            return false; /* etcd: a value compare on an absent key fails */
        }
        size_t n = kv->value_len < c->value_len ? kv->value_len : c->value_len;
        order = n ? memcmp(kv->value, c->value, n) : 0;
        if (order == 0) {
            order = (kv->value_len > c->value_len) - (kv->value_len < c->value_len);
        }
    } else {
        int64_t v = cmp_number(kv, c->target);
        order = (v > c->number) - (v < c->number);
    }
    switch (c->result) {
    case KVS_STORE_EQUAL:
        return order == 0;
    case KVS_STORE_NOT_EQUAL:
        return order != 0;
    case KVS_STORE_LESS:
        return order < 0;
    case KVS_STORE_GREATER:
        return order > 0;
    }
    return false;
}

static int e_txn(kvs_store *s, const struct kvs_store_cmp *cmp, size_t n_cmp,
                 const struct kvs_store_op *ok, size_t n_ok, const struct kvs_store_op *fail,
                 size_t n_fail, bool *succeeded, int64_t *revision, char *err, size_t errlen)
{
    struct embedded *e = E(s);
    pthread_mutex_lock(&e->mu);
    bool holds = true;
    for (size_t i = 0; i < n_cmp && holds; i++) {
        holds = compare_holds(e, &cmp[i]);
    }
    const struct kvs_store_op *ops = holds ? ok : fail;
    size_t n_ops = holds ? n_ok : n_fail;
    int rc = KVS_OK;
    /* Plan: every lease must exist before anything is applied. */
    for (size_t i = 0; i < n_ops && rc == KVS_OK; i++) {
        if (ops[i].type == KVS_STORE_OP_PUT && ops[i].lease != 0 &&
            find_lease(e, ops[i].lease) == NULL) {
            kvs_errf(err, errlen, "store: lease %lld not found", (long long)ops[i].lease);
            rc = KVS_NOT_FOUND;
        }
    }
    int64_t rev = e->revision + 1, n_deleted = 0;
    for (size_t i = 0; i < n_ops && rc == KVS_OK; i++) {
        if (ops[i].type == KVS_STORE_OP_PUT) {
            rc = apply_put(e, ops[i].key, ops[i].value, ops[i].value_len, ops[i].lease, rev);
        } else {
            rc = apply_delete(e, ops[i].key, ops[i].prefix, rev, &n_deleted);
        }
        if (rc < 0) {
            kvs_errf(err, errlen, "store: out of memory");
        }
    }
    if (rc < 0) {
        rollback(e);
    } else if ((rc = commit(e, rev, NULL, err, errlen)) == KVS_OK) {
        *succeeded = holds;
        *revision = e->revision;
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

static int e_lease_grant(kvs_store *s, int64_t ttl_s, int64_t *id, int64_t *granted_ttl, char *err,
                         size_t errlen)
{
    struct embedded *e = E(s);
    pthread_mutex_lock(&e->mu);
    int rc = KVS_OK;
    struct lease *l = grow(e->leases, &e->cap_leases, e->n_leases + 1, sizeof *l);
    if (l == NULL) {
        kvs_errf(err, errlen, "store: out of memory");
        rc = KVS_NO_MEMORY;
    } else {
        e->leases = l;
        int64_t lid = e->next_lease++;
        e->leases[e->n_leases++] = (struct lease){lid, ttl_s, now_ms() + ttl_s * 1000};
        struct lease_change lc = {.grant_id = lid, .grant_ttl = ttl_s};
        rc = persist(e, &lc, err, errlen);
        if (rc < 0) {
            e->n_leases--;
            e->next_lease--;
        } else {
            *id = lid;
            *granted_ttl = ttl_s;
        }
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

static int e_lease_keepalive(kvs_store *s, int64_t id, int64_t *ttl, char *err, size_t errlen)
{
    struct embedded *e = E(s);
    pthread_mutex_lock(&e->mu);
    expire_leases(e); /* a lease past its deadline is gone even between two ticks */
    struct lease *l = find_lease(e, id);
    int rc = KVS_OK;
    if (l == NULL) {
        kvs_errf(err, errlen, "store: lease %lld not found (expired or revoked)", (long long)id);
        rc = KVS_NOT_FOUND;
    } else {
        l->deadline_ms = now_ms() + l->ttl * 1000;
        *ttl = l->ttl;
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

static int e_lease_revoke(kvs_store *s, int64_t id, char *err, size_t errlen)
{
    struct embedded *e = E(s);
    pthread_mutex_lock(&e->mu);
    int rc;
    if (find_lease(e, id) == NULL) {
        kvs_errf(err, errlen, "store: lease %lld not found", (long long)id);
        rc = KVS_NOT_FOUND;
    } else {
        rc = drop_lease(e, id, err, errlen);
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

/* ---- watch ---- */

static void e_watch_stop(kvs_store_watch *w)
{
    struct embedded *e = E(w->store);
    pthread_mutex_lock(&e->mu);
    for (kvs_store_watch **p = &e->watches; *p != NULL; p = &(*p)->next_in_store) {
        if (*p == w) {
            *p = w->next_in_store;
            break;
        }
    }
    pthread_mutex_unlock(&e->mu);
}

static int push_copy(kvs_store_watch *w, enum kvs_store_event_type type,
                     const struct kvs_store_kv *kv)
{
    struct kvs_store_event ev = {.type = type};
    KVS_TRY(kvs_store_kv_copy(&ev.kv, kv));
    kvs_store_watch_push(w, &ev);
    return KVS_OK;
}

static int e_watch_start(kvs_store *s, kvs_store_watch *w, int64_t start_rev, char *err,
                         size_t errlen)
{
    struct embedded *e = E(s);
    pthread_mutex_lock(&e->mu);
    int rc = KVS_OK;
    if (start_rev != 0 && start_rev <= e->compact_rev) {
        /* History is gone: the reader re-lists from the events below. */
        struct kvs_store_kv none = {.key = w->prefix, .value = "", .mod_revision = e->revision};
        rc = push_copy(w, KVS_STORE_RESET, &none);
        for (size_t i = 0; i < e->n_kvs && rc == KVS_OK; i++) {
            if (has_prefix(e->kvs[i].key, w->prefix)) {
                rc = push_copy(w, KVS_STORE_PUT, &e->kvs[i]);
            }
        }
    } else if (start_rev != 0) {
        for (size_t i = 0; i < e->n_hist && rc == KVS_OK; i++) {
            const struct kvs_store_event *h = &e->hist[i];
            if (h->kv.mod_revision >= start_rev && has_prefix(h->kv.key, w->prefix)) {
                rc = push_copy(w, h->type, &h->kv);
            }
        }
    }
    if (rc == KVS_OK) {
        w->connected = true;
        w->impl_stop = e_watch_stop;
        w->next_in_store = e->watches;
        e->watches = w;
    } else {
        kvs_errf(err, errlen, "store: out of memory");
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

static void e_destroy(kvs_store *s)
{
    struct embedded *e = E(s);
    pthread_mutex_lock(&e->mu);
    e->stopping = true;
    pthread_cond_broadcast(&e->tick_cv);
    pthread_mutex_unlock(&e->mu);
    pthread_join(e->ticker, NULL);
    for (kvs_store_watch *w = e->watches; w != NULL; w = w->next_in_store) {
        w->impl_stop = NULL; /* the store is gone: the watch only drains what it has */
        kvs_store_watch_fail(w);
    }
    for (size_t i = 0; i < e->n_kvs; i++) {
        kvs_store_kv_free(&e->kvs[i]);
    }
    for (size_t i = 0; i < e->n_hist; i++) {
        kvs_store_event_free(&e->hist[i]);
    }
    free(e->kvs);
    free(e->hist);
    free(e->leases);
    free(e->undo);
    free(e->pending);
    kvs_store_file_close(&e->file);
    free(e->path);
    pthread_cond_destroy(&e->tick_cv);
    pthread_mutex_destroy(&e->mu);
    free(e);
}

static const struct kvs_store_ops embedded_ops = {
    .kind = "embedded",
    .destroy = e_destroy,
    .put = e_put,
    .range = e_range,
    .del = e_del,
    .compact = e_compact,
    .txn = e_txn,
    .lease_grant = e_lease_grant,
    .lease_keepalive = e_lease_keepalive,
    .lease_revoke = e_lease_revoke,
    .watch_start = e_watch_start,
};

kvs_store *kvs_store_embedded_open(const char *path, char *err, size_t errlen)
{
    struct embedded *e = calloc(1, sizeof *e);
    if (e == NULL) {
        kvs_errf(err, errlen, "store: out of memory");
        return NULL;
    }
    e->base.ops = &embedded_ops;
    e->revision = e->compact_rev = 1;
    e->next_lease = 1;
    if (path != NULL && (e->path = strdup(path)) == NULL) {
        kvs_errf(err, errlen, "store: out of memory");
        free(e);
        return NULL;
    }
    if (path != NULL && strlen(path) > 4000) {
        kvs_errf(err, errlen, "store: path of more than 4000 bytes");
        free(e->path);
        free(e);
        return NULL;
    }
    pthread_mutex_init(&e->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&e->tick_cv, &ca);
    pthread_condattr_destroy(&ca);
    if (e->path != NULL && kvs_store_file_open(e->path, on_load, e, &e->file, err, errlen) < 0) {
        /* e_destroy joins the ticker: start one that stops at once. */
        e->stopping = true;
    }
    e->compact_rev = e->revision; /* no history before the open */
    bool failed = e->stopping;
    if (pthread_create(&e->ticker, NULL, ticker_main, e) != 0) {
        kvs_errf(err, errlen, "store: cannot start the lease ticker");
        pthread_cond_destroy(&e->tick_cv);
        pthread_mutex_destroy(&e->mu);
        free(e->path);
        free(e);
        return NULL;
    }
    if (failed) {
        e_destroy(&e->base);
        return NULL;
    }
    return &e->base;
}
