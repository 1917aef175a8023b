/* The coordinator's registry (coordinator/coord_impl.h): workers and sessions in memory,
 * their records in the store, and a new leader's load of both. */
#include "coordinator/coord_impl.h"

#include "common/log.h"
#include "common/status.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>

/* ---- keys and records in the store (docs/CLUSTER.md) ---- */

void kvs_coord_worker_key(const kvs_coord *c, const char *id, char *buf, size_t len)
{
    snprintf(buf, len, "%sworkers/%s", c->key_root, id);
}

void kvs_coord_session_key(const kvs_coord *c, const char *id, char *buf, size_t len)
{
    snprintf(buf, len, "%ssessions/%s", c->key_root, id);
}

char *kvs_coord_worker_json(const struct worker *w)
{
    json_t *j =
        json_pack("{sssssssIsIss}", "endpoint", w->endpoint, "device", w->device, "model", w->model,
                  "cells_total", (json_int_t)w->cells_total, "block_size",
                  (json_int_t)w->block_size, "state", kvs_worker_state_name(w->admin_state));
    char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    return s;
}

char *kvs_coord_session_json(const struct session_rec *r)
{
    char hash[17];
    snprintf(hash, sizeof hash, "%016" PRIx64, r->prefix_hash);
    json_t *j = json_pack("{sssssIss}", "worker", r->worker, "model", r->model, "cells",
                          (json_int_t)r->cells, "prefix_hash", hash);
    /* Optional: a restore order outstanding, a restore that failed. */
    if (j != NULL && r->from[0] != '\0' && json_object_set_new(j, "from", json_string(r->from))) {
        json_decref(j);
        j = NULL;
    }
    if (j != NULL && r->error[0] != '\0') {
        if (json_object_set_new(j, "error", json_string(r->error)) < 0) { /* ASCII */
            json_decref(j);
            j = NULL;
        }
    }
    char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    return s;
}

/* Read a worker record written by kvs_coord_worker_json (validated: it comes from outside). */
static int parse_worker(const struct kvs_store_kv *kv, const char *id, struct worker *w)
{
    memset(w, 0, sizeof *w);
    json_t *j = json_loadb(kv->value, kv->value_len, JSON_REJECT_DUPLICATES, NULL);
    const char *ep, *dev, *model, *state;
    json_int_t cells, block_size = 0; /* block_size: absent in records of before minor 2 */
    int rc = KVS_BAD_FORMAT;
    if (j != NULL &&
        json_unpack(j, "{sssssssIs?Iss}", "endpoint", &ep, "device", &dev, "model", &model,
                    "cells_total", &cells, "block_size", &block_size, "state", &state) == 0 &&
        strlen(ep) <= KVS_CMSG_ENDPOINT_MAX && strlen(dev) <= KVS_CMSG_DEVICE_MAX &&
        strlen(model) == 64 && cells >= 0 && cells <= KVS_CMSG_MAX_CELLS && block_size >= 0 &&
        block_size <= KVS_CMSG_MAX_BLOCK_SIZE && kvs_worker_state_parse(state) >= 0 &&
        kvs_cmsg_valid_id(id, KVS_CMSG_WORKER_MAX)) {
        snprintf(w->id, sizeof w->id, "%s", id);
        snprintf(w->endpoint, sizeof w->endpoint, "%s", ep);
        snprintf(w->device, sizeof w->device, "%s", dev);
        snprintf(w->model, sizeof w->model, "%s", model);
        w->cells_total = cells;
        w->block_size = block_size;
        w->admin_state = (enum kvs_worker_state)kvs_worker_state_parse(state);
        if (w->admin_state == KVS_WORKER_UNHEALTHY) {
            w->admin_state = KVS_WORKER_READY; /* health is not an admin state */
        }
        w->lease = kv->lease;
        rc = KVS_OK;
    }
    json_decref(j);
    return rc;
}

static int parse_session(const struct kvs_store_kv *kv, const char *id, struct session_rec *r)
{
    memset(r, 0, sizeof *r);
    json_t *j = json_loadb(kv->value, kv->value_len, JSON_REJECT_DUPLICATES, NULL);
    const char *worker, *model, *hash, *from = "", *error = "";
    json_int_t cells;
    char *end = NULL;
    int rc = KVS_BAD_FORMAT;
    if (j != NULL &&
        json_unpack(j, "{sssssIss s?s s?s}", "worker", &worker, "model", &model, "cells", &cells,
                    "prefix_hash", &hash, "from", &from, "error", &error) == 0 &&
        kvs_cmsg_valid_id(worker, KVS_CMSG_WORKER_MAX) && strlen(model) == 64 && cells > 0 &&
        cells <= KVS_CMSG_MAX_CELLS && strlen(hash) == 16 && kvs_cmsg_valid_id(id, 128) &&
        (from[0] == '\0' || kvs_cmsg_valid_id(from, KVS_CMSG_WORKER_MAX))) {
        r->prefix_hash = strtoull(hash, &end, 16);
        if (end != NULL && *end == '\0') {
            snprintf(r->id, sizeof r->id, "%s", id);
            snprintf(r->worker, sizeof r->worker, "%s", worker);
            snprintf(r->model, sizeof r->model, "%s", model);
            snprintf(r->from, sizeof r->from, "%s", from);
            snprintf(r->error, sizeof r->error, "%s", error);
            kvs_coord_ascii(r->error);
            r->cells = cells;
            rc = KVS_OK;
        }
    }
    json_decref(j);
    return rc;
}

/* ---- the in-memory registry and directory ---- */

struct worker *kvs_coord_worker_find(kvs_coord *c, const char *id)
{
    for (size_t i = 0; i < c->n_workers; i++) {
        if (strcmp(c->workers[i].id, id) == 0) {
            return &c->workers[i];
        }
    }
    return NULL;
}

size_t kvs_coord_session_find(const kvs_coord *c, const char *id, bool *found)
{
    size_t lo = 0, hi = c->n_sessions;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int d = strcmp(c->sessions[mid].id, id);
        if (d == 0) {
            *found = true;
            return mid;
        }
        if (d < 0) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    *found = false;
    return lo;
}

void kvs_coord_state_clear(kvs_coord *c)
{
    for (size_t i = 0; i < c->n_workers; i++) {
        free(c->workers[i].prefix_hashes);
    }
    c->n_workers = 0;
    c->n_sessions = 0;
}

int kvs_coord_session_add(kvs_coord *c, const struct session_rec *r)
{
    bool found;
    size_t i = kvs_coord_session_find(c, r->id, &found);
    if (found) {
        c->sessions[i] = *r;
        return KVS_OK;
    }
    struct session_rec *s = grow(c->sessions, &c->cap_sessions, c->n_sessions + 1, sizeof *s);
    if (s == NULL) {
        return KVS_NO_MEMORY;
    }
    c->sessions = s;
    memmove(&c->sessions[i + 1], &c->sessions[i], (c->n_sessions - i) * sizeof *s);
    c->sessions[i] = *r;
    c->n_sessions++;
    struct worker *w = kvs_coord_worker_find(c, r->worker);
    if (w != NULL) {
        w->cells_placed += kvs_coord_cells_reserved(w, r->cells);
        w->n_sessions++;
    }
    return KVS_OK;
}

void kvs_coord_session_remove(kvs_coord *c, size_t i)
{
    struct worker *w = kvs_coord_worker_find(c, c->sessions[i].worker);
    if (w != NULL) {
        w->cells_placed -= kvs_coord_cells_reserved(w, c->sessions[i].cells);
        w->n_sessions--;
    }
    memmove(&c->sessions[i], &c->sessions[i + 1], (c->n_sessions - i - 1) * sizeof *c->sessions);
    c->n_sessions--;
}

/* The new leader's view: every worker and session recorded in the store. Workers count as
 * unhealthy until they heartbeat to this leader. */
int kvs_coord_state_load(kvs_coord *c, char *err, size_t errlen)
{
    kvs_coord_state_clear(c);
    KVS_TRY(kvs_coord_store_ready(c, err, errlen));
    char prefix[192];
    struct kvs_store_range r;
    snprintf(prefix, sizeof prefix, "%sworkers/", c->key_root);
    KVS_TRY(kvs_store_range(c->store, prefix, true, &r, err, errlen));
    size_t plen = strlen(prefix);
    for (size_t i = 0; i < r.n; i++) {
        struct worker w;
        if (parse_worker(&r.kvs[i], r.kvs[i].key + plen, &w) < 0) {
            KVS_WARN("coordinator: ignoring a malformed worker record %s", r.kvs[i].key);
            continue;
        }
        struct worker *ws = grow(c->workers, &c->cap_workers, c->n_workers + 1, sizeof *ws);
        if (ws == NULL) {
            kvs_store_range_free(&r);
            return KVS_NO_MEMORY;
        }
        c->workers = ws;
        w.lease_renewed_ms = now_ms();
        c->workers[c->n_workers++] = w;
    }
    kvs_store_range_free(&r);
    snprintf(prefix, sizeof prefix, "%ssessions/", c->key_root);
    KVS_TRY(kvs_store_range(c->store, prefix, true, &r, err, errlen));
    plen = strlen(prefix);
    for (size_t i = 0; i < r.n; i++) {
        struct session_rec s;
        if (parse_session(&r.kvs[i], r.kvs[i].key + plen, &s) < 0) {
            KVS_WARN("coordinator: ignoring a malformed session record %s", r.kvs[i].key);
            continue;
        }
        if (kvs_coord_session_add(c, &s) < 0) {
            kvs_store_range_free(&r);
            return KVS_NO_MEMORY;
        }
    }
    kvs_store_range_free(&r);
    /* A worker whose key expired while no one led is not in the store: its sessions point to
     * an unknown worker. It gets a record without an endpoint, silent, so that the failure
     * rule (tick) finds its key gone and declares it down like any other. */
    for (size_t i = 0; i < c->n_sessions; i++) {
        const struct session_rec *s = &c->sessions[i];
        if (kvs_coord_worker_find(c, s->worker) != NULL) {
            continue;
        }
        struct worker *ws = grow(c->workers, &c->cap_workers, c->n_workers + 1, sizeof *ws);
        if (ws == NULL) {
            return KVS_NO_MEMORY;
        }
        c->workers = ws;
        struct worker *w = &c->workers[c->n_workers++];
        memset(w, 0, sizeof *w);
        snprintf(w->id, sizeof w->id, "%s", s->worker);
        snprintf(w->model, sizeof w->model, "%s", s->model);
        w->admin_state = KVS_WORKER_READY;
        for (size_t k = 0; k < c->n_sessions; k++) {
            if (strcmp(c->sessions[k].worker, w->id) == 0) {
                w->cells_placed += kvs_coord_cells_reserved(w, c->sessions[k].cells);
                w->n_sessions++;
            }
        }
    }
    KVS_INFO("coordinator: loaded %zu workers and %zu sessions", c->n_workers, c->n_sessions);
    return KVS_OK;
}

enum kvs_worker_state kvs_coord_worker_state(const kvs_coord *c, const struct worker *w,
                                             int64_t now)
{
    if (w->down || w->last_hb_ms == 0 || now - w->last_hb_ms > c->o.unhealthy_ms) {
        return KVS_WORKER_UNHEALTHY;
    }
    return w->admin_state;
}

int kvs_coord_place(kvs_coord *c, const char *model, int64_t cells, uint64_t prefix_hash,
                    struct kvs_placement *p, char *err, size_t errlen)
{
    struct kvs_worker_info *info = calloc(c->n_workers ? c->n_workers : 1, sizeof *info);
    if (info == NULL) {
        return KVS_NO_MEMORY;
    }
    int64_t now = now_ms();
    for (size_t i = 0; i < c->n_workers; i++) {
        const struct worker *w = &c->workers[i];
        info[i] = (struct kvs_worker_info){.id = w->id,
                                           .model_sha256 = w->model,
                                           .n_cells_capacity = w->cells_total,
                                           .n_cells_free = w->cells_total - w->cells_placed,
                                           .block_size = w->block_size,
                                           .state = kvs_coord_worker_state(c, w, now),
                                           .prefix_hashes = w->prefix_hashes,
                                           .n_prefix_hashes = w->n_prefix_hashes};
    }
    struct kvs_placement_request rq = {
        .model_sha256 = model, .n_cells = cells, .prefix_hash = prefix_hash};
    int rc = kvs_placement_choose(info, c->n_workers, &rq, p, err, errlen);
    free(info);
    return rc;
}

int kvs_coord_session_record(kvs_coord *c, const struct session_rec *r, char *err, size_t errlen)
{
    char key[512];
    kvs_coord_session_key(c, r->id, key, sizeof key);
    char *json = kvs_coord_session_json(r);
    if (json == NULL) {
        return KVS_NO_MEMORY;
    }
    int rc = kvs_coord_put(c, key, json, 0, err, errlen);
    free(json);
    return rc;
}

void kvs_coord_session_reassign(kvs_coord *c, size_t i, const char *to)
{
    struct session_rec *r = &c->sessions[i];
    struct worker *w = kvs_coord_worker_find(c, r->worker);
    if (w != NULL) {
        w->cells_placed -= kvs_coord_cells_reserved(w, r->cells);
        w->n_sessions--;
    }
    snprintf(r->worker, sizeof r->worker, "%s", to);
    w = kvs_coord_worker_find(c, to);
    if (w != NULL) {
        w->cells_placed += kvs_coord_cells_reserved(w, r->cells);
        w->n_sessions++;
    }
}
