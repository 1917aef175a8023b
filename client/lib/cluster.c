/* libkvstream through a coordinator (docs/PROTOCOL.md section 9).
 *
 * kvs_client_connect tells a coordinator from a worker by its hello (`server`). Behind a
 * coordinator the client asks it where a session lives (session.locate, once: the answer is
 * the session's route) and then talks to that worker directly; the coordinator stays off the
 * data path. A worker that answers NOT_FOUND, UNAVAILABLE (it stopped serving) or MOVED
 * without an owner, or that cannot be reached, sends the client back to the coordinator:
 * after a worker failure the coordinator restores the session on another worker, and the
 * next locate names that one. Locating is retried with back-off (a session being restored
 * is UNAVAILABLE for a moment) for up to timeout_ms. Creating and closing a session go
 * through both: the coordinator records (or removes) the placement, the worker holds the
 * session. */
#include "client/lib/client_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RELOCATE_BACKOFF_MS 100     /* first wait before locating again; doubles up to max */
#define RELOCATE_BACKOFF_MAX_MS 1000
#define MAX_RELOCATES 64            /* locates per call, whatever the time left */
#define QUERY_RESERVE_DEFAULT 512   /* the worker's default query reserve (PROTOCOL.md 5) */

/* Wait *backoff ms (doubling it) when that ends before end: 1 waited, 0 no time left,
 * CANCELLED when kvs_client_cancel came meanwhile. */
static int back_off(kvs_client *c, int64_t *backoff, int64_t end)
{
    if (client_now_ms() + *backoff >= end) {
        return 0;
    }
    if (!client_sleep(c, *backoff)) {
        atomic_store(&c->cancel, 0);
        return client_fail(c, KVS_CANCELLED, "cancelled");
    }
    *backoff = *backoff * 2 > RELOCATE_BACKOFF_MAX_MS ? RELOCATE_BACKOFF_MAX_MS : *backoff * 2;
    return 1;
}

/* A request to the coordinator (home) with an optional session field. */
static int coord_request(kvs_client *c, const char *op, const char *session, int flags,
                         const msgpack_object **m)
{
    client_req_begin(c, op);
    if (session != NULL) {
        client_req_cstr(c, "session", session);
    }
    return client_call_to(c, NULL, NULL, flags, m);
}

/* An endpoint field of a reply into buf (BAD_FORMAT when absent, empty or too long). */
static int rep_endpoint(kvs_client *c, const msgpack_object *m, const char *key, char *buf,
                        size_t size)
{
    const char *s;
    size_t n;
    if (!mp_str(kvs_wire_map_get(m, key), &s, &n) || n == 0 || n >= size) {
        return client_fail(c, KVS_BAD_FORMAT, "reply field '%s' missing or not an endpoint",
                           key);
    }
    memcpy(buf, s, n);
    buf[n] = '\0';
    return 0;
}

int client_locate(kvs_client *c, const char *session)
{
    struct client_held h;
    KVS_TRY(client_req_hold(c, &h));
    const msgpack_object *m;
    char endpoint[CLIENT_ENDPOINT_MAX];
    int rc = coord_request(c, "session.locate", session, CALL_RETRY, &m);
    if (rc == 0) {
        rc = rep_endpoint(c, m, "endpoint", endpoint, sizeof endpoint);
    }
    if (rc == 0) {
        client_route_set(c, session, endpoint);
    }
    client_req_restore(c, &h);
    return rc;
}

int client_session_call(kvs_client *c, const char *session, int flags,
                        const msgpack_object **reply)
{
    int32_t attempts = 1 + (flags & CALL_RETRY ? (c->retries > 0 ? c->retries : 0) : 0);
    int64_t end = client_now_ms() + c->timeout_ms; /* how long the session is sought */
    int64_t backoff = RELOCATE_BACKOFF_MS;
    char missing_at[CLIENT_ENDPOINT_MAX] = ""; /* a worker that answered NOT_FOUND */
    char missing_err[sizeof c->err] = "";
    for (int32_t n = 0;; n++) {
        struct client_route *r = client_route_find(c, session);
        if (r == NULL) {
            int rc = client_locate(c, session);
            if (rc == KVS_UNAVAILABLE && n < MAX_RELOCATES) {
                int w = back_off(c, &backoff, end); /* its worker is down, or it is moving */
                if (w > 0) {
                    continue;
                }
                return w < 0 ? w : rc;
            }
            if (rc < 0) {
                return rc;
            }
            r = client_route_find(c, session);
            if (r == NULL) {
                return client_fail(c, KVS_NO_MEMORY, "out of memory for a route");
            }
            if (missing_at[0] != '\0' && strcmp(r->endpoint, missing_at) == 0) {
                /* The worker the directory names does not hold it: its answer stands. */
                snprintf(c->err, sizeof c->err, "%s", missing_err);
                c->from_worker = true;
                return KVS_NOT_FOUND;
            }
        }
        char endpoint[CLIENT_ENDPOINT_MAX];
        snprintf(endpoint, sizeof endpoint, "%s", r->endpoint);
        c->from_worker = false;
        int rc = client_call_to(c, session, NULL, flags, reply);
        if (rc == 0) {
            return 0;
        }
        /* lost: no answer (the route is dropped), the outcome unknown: retried only when
         * the call may be; elsewhere: the worker does not serve it (any more); unreachable:
         * nothing was sent */
        bool lost = rc == KVS_TIMEOUT && !c->from_worker;
        bool elsewhere = c->from_worker && (rc == KVS_NOT_FOUND || rc == KVS_UNAVAILABLE ||
                                            rc == KVS_MOVED);
        bool unreachable = rc == KVS_UNAVAILABLE && !c->from_worker;
        if ((!lost && !elsewhere && !unreachable) || (lost && --attempts <= 0) ||
            n >= MAX_RELOCATES) {
            return rc;
        }
        if (rc == KVS_NOT_FOUND) {
            snprintf(missing_at, sizeof missing_at, "%s", endpoint);
            snprintf(missing_err, sizeof missing_err, "%s", c->err);
        }
        client_route_drop(c, session);
        if (rc == KVS_UNAVAILABLE) {
            int w = back_off(c, &backoff, end); /* a fenced or dead worker: wait for the
                                                   coordinator to restore it elsewhere */
            if (w <= 0) {
                return w < 0 ? w : rc;
            }
        }
    }
}

/* ---- placement ---------------------------------------------------------------------------- */

static bool model_ok(const char *s)
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

/* One worker of an admin.workers reply. */
struct worker_view {
    char endpoint[CLIENT_ENDPOINT_MAX];
    char model[65];
    bool ready;
};

/* admin.workers: the workers the coordinator knows (*n of them, malloc'd into *out). */
static int list_workers(kvs_client *c, struct worker_view **out, size_t *n)
{
    *out = NULL;
    *n = 0;
    const msgpack_object *m;
    KVS_TRY(coord_request(c, "admin.workers", NULL, CALL_RETRY, &m));
    const msgpack_object *a = kvs_wire_map_get(m, "workers");
    if (a == NULL || a->type != MSGPACK_OBJECT_ARRAY) {
        return client_fail(c, KVS_BAD_FORMAT, "reply field 'workers' missing or not an array");
    }
    struct worker_view *v = calloc(a->via.array.size + 1, sizeof *v);
    if (v == NULL) {
        return client_fail(c, KVS_NO_MEMORY, "out of memory for %u workers",
                           a->via.array.size);
    }
    for (uint32_t i = 0; i < a->via.array.size; i++) {
        const msgpack_object *w = &a->via.array.ptr[i];
        char state[16];
        int rc = rep_endpoint(c, w, "endpoint", v[i].endpoint, sizeof v[i].endpoint);
        if (rc == 0) {
            rc = rep_strbuf(c, w, "model", v[i].model, sizeof v[i].model);
        }
        if (rc == 0) {
            rc = rep_strbuf(c, w, "state", state, sizeof state);
        }
        if (rc < 0) {
            free(v);
            return rc;
        }
        v[i].ready = strcmp(state, "ready") == 0;
    }
    *out = v;
    *n = a->via.array.size;
    return 0;
}

/* The worker's status reply at endpoint (borrowed until the next receive). */
static int worker_status(kvs_client *c, const char *endpoint, const msgpack_object **m)
{
    client_req_begin(c, "status");
    return client_call_to(c, NULL, endpoint, CALL_RETRY, m);
}

int client_cluster_place(kvs_client *c, const char *session,
                         const struct kvs_client_session_opts *o, int64_t *cells)
{
    char model[65] = "";
    int64_t budget = o->cells;
    if (o->model != NULL) {
        if (!model_ok(o->model)) {
            return client_fail(c, KVS_INVALID_ARGUMENT,
                               "model must be a SHA-256 of 64 lowercase hex digits");
        }
        snprintf(model, sizeof model, "%s", o->model);
    }
    if (model[0] == '\0' || budget == 0) {
        /* The model its ready workers serve, and the default budget from one of them. */
        struct worker_view *w;
        size_t n, n_ready = 0, at = SIZE_MAX;
        KVS_TRY(list_workers(c, &w, &n));
        for (size_t i = 0; i < n; i++) {
            if (!w[i].ready) {
                continue;
            }
            n_ready++;
            if (model[0] == '\0') {
                snprintf(model, sizeof model, "%s", w[i].model);
            }
            if (strcmp(w[i].model, model) != 0) {
                if (o->model == NULL) {
                    free(w);
                    return client_fail(c, KVS_INVALID_ARGUMENT,
                                       "the cluster's workers serve several models: set "
                                       "the session's model (its SHA-256)");
                }
                continue;
            }
            if (at == SIZE_MAX) {
                at = i;
            }
        }
        char endpoint[CLIENT_ENDPOINT_MAX] = "";
        if (at != SIZE_MAX) {
            snprintf(endpoint, sizeof endpoint, "%s", w[at].endpoint);
        }
        free(w);
        if (n_ready == 0) {
            return client_fail(c, KVS_UNAVAILABLE,
                               "no worker is ready (the coordinator knows %zu)", n);
        }
        if (at == SIZE_MAX) {
            return client_fail(c, KVS_MODEL_MISMATCH, "no ready worker serves model %.16s...",
                               model);
        }
        if (budget == 0) {
            const msgpack_object *m;
            int64_t n_ctx = 0;
            KVS_TRY(worker_status(c, endpoint, &m));
            KVS_TRY(rep_i64(c, kvs_wire_map_get(m, "model"), "n_ctx", &n_ctx));
            budget = n_ctx - (o->query_reserve > 0 ? o->query_reserve : QUERY_RESERVE_DEFAULT);
            if (budget <= 0) {
                return client_fail(c, KVS_INVALID_ARGUMENT,
                                   "query reserve %d leaves no budget in a context of %lld",
                                   o->query_reserve, (long long)n_ctx);
            }
        }
    }
    client_req_begin(c, "session.create");
    client_req_cstr(c, "session", session);
    client_req_cstr(c, "model", model);
    client_req_u64(c, "cells", (uint64_t)budget);
    const msgpack_object *m;
    /* not sent again after a timeout: a second one would find the first's record */
    KVS_TRY(client_call_to(c, NULL, NULL, 0, &m));
    char endpoint[CLIENT_ENDPOINT_MAX];
    KVS_TRY(rep_endpoint(c, m, "endpoint", endpoint, sizeof endpoint));
    client_route_set(c, session, endpoint);
    if (client_route_find(c, session) == NULL) {
        client_cluster_unplace(c, session);
        return client_fail(c, KVS_NO_MEMORY, "out of memory for a route");
    }
    *cells = budget;
    return 0;
}

int client_cluster_unplace(kvs_client *c, const char *session)
{
    const msgpack_object *m;
    KVS_TRY(coord_request(c, "session.close", session, CALL_RETRY, &m));
    bool closed = false;
    return rep_bool(c, m, "closed", &closed);
}

/* ---- views ---------------------------------------------------------------------------------- */

int client_cluster_list(kvs_client *c, char ***names, int32_t *n)
{
    const msgpack_object *m;
    KVS_TRY(coord_request(c, "admin.sessions", NULL, CALL_RETRY, &m));
    return rep_names(c, m, "sessions", "session", names, n);
}

int client_cluster_status(kvs_client *c, struct kvs_client_status *st)
{
    struct worker_view *w;
    size_t n;
    KVS_TRY(list_workers(c, &w, &n));
    struct kvs_client_status s = {0};
    size_t n_ready = 0;
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        if (!w[i].ready) {
            continue;
        }
        const msgpack_object *m;
        struct kvs_client_status one = {0};
        const msgpack_object *model, *cap;
        rc = worker_status(c, w[i].endpoint, &m);
        if (rc < 0) {
            break;
        }
        model = kvs_wire_map_get(m, "model");
        cap = kvs_wire_map_get(m, "capacity");
        if ((rc = rep_strbuf(c, model, "sha256", one.model_sha256, sizeof one.model_sha256)) <
                0 ||
            (rc = rep_i64(c, model, "n_ctx", &one.n_ctx)) < 0 ||
            (rc = rep_i64(c, model, "n_vocab", &one.n_vocab)) < 0 ||
            (rc = rep_i64(c, cap, "cells_total", &one.cells_total)) < 0 ||
            (rc = rep_i64(c, cap, "cells_free", &one.cells_free)) < 0 ||
            (rc = rep_i64(c, m, "sessions", &one.sessions)) < 0 ||
            (rc = rep_i64(c, kvs_wire_map_get(m, "queue"), "max", &one.queue_max)) < 0) {
            break;
        }
        if (n_ready++ == 0) {
            s = one;
        } else {
            s.cells_total += one.cells_total;
            s.cells_free += one.cells_free;
            s.sessions += one.sessions;
        }
    }
    free(w);
    if (rc < 0) {
        return rc;
    }
    if (n_ready == 0) {
        return client_fail(c, KVS_UNAVAILABLE, "no worker is ready (the coordinator knows %zu)",
                           n);
    }
    *st = s;
    return 0;
}
