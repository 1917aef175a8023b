/* kvs-coordinator's core (coordinator/coord.h). kvs_coord_run is the table of contents:
 * poll, answer each request, tick (leadership, worker health). */
#include "coordinator/coord_impl.h"

#include "common/log.h"
#include "common/sdnotify.h"
#include "common/status.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#define IDENT_MAX 256      /* bytes of a ROUTER peer identity */
#define TICK_MS 200        /* health checks */
#define DOWN_CHECK_MS 1000 /* how often an unhealthy worker's key is looked up */
#define POLL_MOVES 64      /* moves' sockets polled per round (moves.c keeps fewer in flight) */
#define STOREQ_CAP 1024    /* store jobs queued at most (storeq.h); more wait for a later round */
#define STORE_STALL_MS 500 /* a store call running this long: the store is not answering */
#define PROBE_MS 500       /* how often a store that stopped answering is tried again */

/* ---- replies ---- */

static void pack_key(msgpack_packer *pk, const char *k)
{
    kvs_wire_pack_cstr(pk, k);
}

static void send_reply(kvs_coord *c, const void *ident, size_t ident_len, const void *data,
                       size_t len)
{
    if (zmq_send(c->router, ident, ident_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
        zmq_send(c->router, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
        zmq_send(c->router, data, len, ZMQ_DONTWAIT) < 0) {
        KVS_WARN("coordinator: reply not sent: %s", zmq_strerror(errno));
    }
}

void kvs_coord_send(kvs_coord *c, const void *ident, size_t ident_len, const void *data, size_t len)
{
    send_reply(c, ident, ident_len, data, len);
}

static void send_out(kvs_coord *c, const void *ident, size_t ident_len)
{
    send_reply(c, ident, ident_len, c->out.sb.data, c->out.sb.size);
}

static void send_error(kvs_coord *c, const void *ident, size_t ident_len, uint64_t id, int status,
                       const char *msg)
{
    kvs_wire_encode_error(&c->out, id, status, msg && msg[0] ? msg : NULL, -1);
    send_out(c, ident, ident_len);
}

/* ---- the store, as the loop uses it (coord_impl.h) ---- */

int kvs_coord_store_ready(kvs_coord *c, char *err, size_t errlen)
{
    if (kvs_storeq_healthy(c->storeq, now_ms(), STORE_STALL_MS)) {
        return KVS_OK;
    }
    kvs_errf(err, errlen,
             "the cluster store (%s) is not answering; nothing was changed: retry when it is "
             "back (sessions are served meanwhile)",
             kvs_store_kind(c->store));
    return KVS_UNAVAILABLE;
}

int kvs_coord_put(kvs_coord *c, const char *key, const char *json, int64_t lease, char *err,
                  size_t errlen)
{
    KVS_TRY(kvs_coord_store_ready(c, err, errlen));
    int rc = kvs_leader_put(c->leader, key, json, strlen(json), lease, err, errlen);
    kvs_storeq_note(c->storeq, rc);
    return rc;
}

int kvs_coord_txn(kvs_coord *c, const struct kvs_store_cmp *cmp, size_t n_cmp,
                  const struct kvs_store_op *ok, size_t n_ok, bool *succeeded, char *err,
                  size_t errlen)
{
    KVS_TRY(kvs_coord_store_ready(c, err, errlen));
    int rc = kvs_leader_txn(c->leader, cmp, n_cmp, ok, n_ok, succeeded, NULL, err, errlen);
    kvs_storeq_note(c->storeq, rc);
    return rc;
}

int kvs_coord_delete(kvs_coord *c, const char *key, char *err, size_t errlen)
{
    KVS_TRY(kvs_coord_store_ready(c, err, errlen));
    int rc = kvs_leader_delete(c->leader, key, false, err, errlen);
    kvs_storeq_note(c->storeq, rc);
    return rc;
}

/* NOT_LEADER, with the leader's endpoint when known (clients go there). */
static void send_not_leader(kvs_coord *c, const void *ident, size_t ident_len, uint64_t id)
{
    char leader[KVS_CMSG_ENDPOINT_MAX + 1];
    kvs_leader_current(c->leader, leader, sizeof leader);
    if (leader[0] == '\0' && kvs_storeq_healthy(c->storeq, now_ms(), STORE_STALL_MS)) {
        /* Not learned by the election yet (just started): ask the store. */
        char key[192];
        struct kvs_store_kv kv;
        snprintf(key, sizeof key, "%sleader", c->key_root);
        if (kvs_store_get(c->store, key, &kv, NULL, 0) == KVS_OK && kv.value_len < sizeof leader) {
            memcpy(leader, kv.value, kv.value_len + 1);
        }
        kvs_store_kv_free(&kv);
    }
    char msg[800];
    snprintf(msg, sizeof msg, "this coordinator (%s) is standing by; the leader is %s", c->endpoint,
             leader[0] ? leader : "not known yet");
    kvs_wire_buf_clear(&c->out);
    msgpack_packer *pk = &c->out.pk;
    msgpack_pack_map(pk, 2);
    pack_key(pk, "id");
    msgpack_pack_uint64(pk, id);
    pack_key(pk, "error");
    msgpack_pack_map(pk, leader[0] ? 4 : 3);
    pack_key(pk, "code");
    pack_key(pk, kvs_status_name(KVS_NOT_LEADER));
    pack_key(pk, "status");
    msgpack_pack_int(pk, KVS_NOT_LEADER);
    pack_key(pk, "message");
    pack_key(pk, msg);
    if (leader[0]) {
        pack_key(pk, "leader");
        pack_key(pk, leader);
    }
    send_out(c, ident, ident_len);
}

/* Start a reply map of n_more keys after "id". */
static msgpack_packer *begin(kvs_coord *c, uint64_t id, size_t n_more)
{
    kvs_wire_buf_clear(&c->out);
    msgpack_packer *pk = &c->out.pk;
    msgpack_pack_map(pk, n_more + 1);
    pack_key(pk, "id");
    msgpack_pack_uint64(pk, id);
    return pk;
}

/* ---- operations ---- */

static int op_register(kvs_coord *c, const struct kvs_cmsg *m, char *err, size_t errlen)
{
    struct worker *w = kvs_coord_worker_find(c, m->worker);
    if (w == NULL) {
        if (c->n_workers >= MAX_WORKERS) {
            kvs_errf(err, errlen, "too many workers (%d)", MAX_WORKERS);
            return KVS_TOO_LARGE;
        }
        struct worker *ws = grow(c->workers, &c->cap_workers, c->n_workers + 1, sizeof *ws);
        if (ws == NULL) {
            return KVS_NO_MEMORY;
        }
        c->workers = ws;
        w = &c->workers[c->n_workers];
        memset(w, 0, sizeof *w);
        snprintf(w->id, sizeof w->id, "%s", m->worker);
        w->admin_state = KVS_WORKER_READY;
        c->n_workers++;
        /* Sessions placed on it by an earlier leader count against it again. */
        for (size_t i = 0; i < c->n_sessions; i++) {
            if (strcmp(c->sessions[i].worker, w->id) == 0) {
                w->cells_placed += kvs_coord_cells_reserved(w, c->sessions[i].cells);
                w->n_sessions++;
            }
        }
    } else if (strcmp(w->model, m->model) != 0 && w->n_sessions > 0) {
        kvs_errf(err, errlen,
                 "worker '%s' has %lld sessions of model %.16s...; it cannot "
                 "come back with another model",
                 w->id, (long long)w->n_sessions, w->model);
        return KVS_MODEL_MISMATCH;
    }
    snprintf(w->endpoint, sizeof w->endpoint, "%s", m->endpoint);
    snprintf(w->device, sizeof w->device, "%s", m->device[0] ? m->device : "cpu");
    snprintf(w->model, sizeof w->model, "%s", m->model);
    w->cells_total = (int64_t)m->cells_total;
    if ((int64_t)m->block_size != w->block_size) {
        /* What its sessions reserve there follows its block size (kvs_coord_cells_reserved);
         * moves' holds on it (moves.c) are left as they were taken. */
        for (size_t i = 0; i < c->n_sessions; i++) {
            if (strcmp(c->sessions[i].worker, w->id) == 0) {
                w->cells_placed -= kvs_coord_cells_reserved(w, c->sessions[i].cells);
            }
        }
        w->block_size = (int64_t)m->block_size;
        for (size_t i = 0; i < c->n_sessions; i++) {
            if (strcmp(c->sessions[i].worker, w->id) == 0) {
                w->cells_placed += kvs_coord_cells_reserved(w, c->sessions[i].cells);
            }
        }
    }
    if (m->has_prefix_hashes) {
        free(w->prefix_hashes);
        w->prefix_hashes =
            m->n_prefix_hashes ? malloc(m->n_prefix_hashes * sizeof *w->prefix_hashes) : NULL;
        w->n_prefix_hashes = w->prefix_hashes ? m->n_prefix_hashes : 0;
        if (w->prefix_hashes != NULL) {
            memcpy(w->prefix_hashes, m->prefix_hashes,
                   m->n_prefix_hashes * sizeof *w->prefix_hashes);
        }
    }
    /* A fresh lease for a new (or returning) worker; the record bound to it. */
    KVS_TRY(kvs_coord_store_ready(c, err, errlen));
    int64_t renewed = now_ms();
    int rc = KVS_NOT_FOUND;
    if (w->lease != 0 && !w->down && !w->lease_expired) {
        rc = kvs_store_lease_keepalive(c->store, w->lease, NULL, err, errlen);
        kvs_storeq_note(c->storeq, rc);
        if (rc == KVS_UNAVAILABLE) {
            return rc; /* not a grant after it: that would wait for the store again */
        }
    }
    if (rc < 0) {
        int64_t lease;
        renewed = now_ms();
        rc = kvs_store_lease_grant(c->store, c->o.worker_ttl_s, &lease, NULL, err, errlen);
        kvs_storeq_note(c->storeq, rc);
        KVS_TRY(rc);
        w->lease = lease;
        w->lease_expired = false;
    }
    w->lease_renewed_ms = renewed;
    char key[512];
    kvs_coord_worker_key(c, w->id, key, sizeof key);
    char *json = kvs_coord_worker_json(w);
    if (json == NULL) {
        return KVS_NO_MEMORY;
    }
    rc = kvs_coord_put(c, key, json, w->lease, err, errlen);
    free(json);
    KVS_TRY(rc);
    w->last_hb_ms = now_ms();
    w->down = false;
    /* Sessions left on it because they could not be restored elsewhere: it restored them
     * from its own directory at start, so they are served again. */
    for (size_t i = 0; i < c->n_sessions; i++) {
        struct session_rec *s = &c->sessions[i];
        if (strcmp(s->worker, w->id) == 0 && !s->moving && s->from[0] == '\0' &&
            (s->error[0] != '\0' || s->retry_ms != 0)) {
            s->error[0] = '\0';
            s->retry_ms = 0;
            char serr[256];
            if (kvs_coord_session_record(c, s, serr, sizeof serr) < 0) {
                KVS_WARN("coordinator: cannot record session '%s': %s", s->id, serr);
            }
        }
    }
    KVS_INFO("coordinator: worker '%s' registered at %s (%lld cells, model %.16s...)", w->id,
             w->endpoint, (long long)w->cells_total, w->model);
    return KVS_OK;
}

static int op_heartbeat(kvs_coord *c, const struct kvs_cmsg *m, char *err, size_t errlen)
{
    struct worker *w = kvs_coord_worker_find(c, m->worker);
    if (w == NULL || w->endpoint[0] == '\0') {
        kvs_errf(err, errlen, "worker '%s' is not registered with this leader: register",
                 m->worker);
        return KVS_NOT_FOUND;
    }
    if (w->down) {
        kvs_errf(err, errlen,
                 "worker '%s' was declared down (its lease expired): register "
                 "again",
                 w->id);
        return KVS_NOT_FOUND;
    }
    int64_t now = now_ms();
    w->last_hb_ms = now;
    w->cells_used = m->cells_used;
    w->cells_reserved = m->cells_reserved;
    w->cells_free = m->cells_free;
    w->queue = m->queue;
    w->sessions_reported = m->sessions;
    w->load = m->load;
    if (m->has_prefix_hashes) {
        uint64_t *h = m->n_prefix_hashes ? malloc(m->n_prefix_hashes * sizeof *h) : NULL;
        if (m->n_prefix_hashes == 0 || h != NULL) {
            if (h != NULL) {
                memcpy(h, m->prefix_hashes, m->n_prefix_hashes * sizeof *h);
            }
            free(w->prefix_hashes);
            w->prefix_hashes = h;
            w->n_prefix_hashes = m->n_prefix_hashes;
        }
    }
    if (w->lease_expired) {
        /* Not down: it heartbeats (the rule needs both). Registering gives it a new lease. */
        kvs_errf(err, errlen, "worker '%s': its lease expired: register again", w->id);
        return KVS_NOT_FOUND;
    }
    /* Renew its lease on (about) every heartbeat, so that the lease_age_ms of the reply stays
     * within a heartbeat and the worker keeps nearly all of its stop-serving margin; on the
     * store's thread (storeq.h), so that a store that hangs never holds up this reply. A
     * store that is away is not the worker's fault: it keeps serving (the lease gets its full
     * TTL back afterwards). */
    if (!w->renewing && now - w->lease_renewed_ms >= c->o.heartbeat_ms / 2) {
        struct kvs_storeq_job j = {
            .kind = KVS_STOREQ_KEEPALIVE, .lease = w->lease, .token = c->token};
        snprintf(j.worker, sizeof j.worker, "%s", w->id);
        w->renewing = kvs_storeq_push(c->storeq, &j) == KVS_OK;
    }
    return KVS_OK;
}

static int op_session_create(kvs_coord *c, const struct kvs_cmsg *m, struct kvs_placement *p,
                             char *err, size_t errlen)
{
    bool found;
    size_t at = kvs_coord_session_find(c, m->session, &found);
    if (found) {
        kvs_errf(err, errlen, "session '%s' already exists (on worker '%s')", m->session,
                 c->sessions[at].worker);
        return KVS_ALREADY_EXISTS;
    }
    if (c->n_sessions >= MAX_SESSIONS) {
        kvs_errf(err, errlen, "the directory holds %d sessions already", MAX_SESSIONS);
        return KVS_TOO_LARGE;
    }
    KVS_TRY(kvs_coord_place(c, m->model, (int64_t)m->cells, m->prefix_hash, p, err, errlen));
    struct session_rec r = {.cells = (int64_t)m->cells, .prefix_hash = m->prefix_hash};
    snprintf(r.id, sizeof r.id, "%s", m->session);
    snprintf(r.worker, sizeof r.worker, "%s", c->workers[p->index].id);
    snprintf(r.model, sizeof r.model, "%s", m->model);
    /* Record it before answering: fenced, and only if no one recorded it meanwhile. */
    char key[512];
    kvs_coord_session_key(c, r.id, key, sizeof key);
    char *json = kvs_coord_session_json(&r);
    if (json == NULL) {
        return KVS_NO_MEMORY;
    }
    struct kvs_store_cmp absent = {
        .key = key, .target = KVS_STORE_CREATE, .result = KVS_STORE_EQUAL, .number = 0};
    struct kvs_store_op put = {
        .type = KVS_STORE_OP_PUT, .key = key, .value = json, .value_len = strlen(json)};
    bool ok = false;
    int rc = kvs_coord_txn(c, &absent, 1, &put, 1, &ok, err, errlen);
    free(json);
    if (rc == KVS_UNAVAILABLE) {
        char why[400]; /* the store's reason, cut to fit */
        snprintf(why, sizeof why, "%.360s", err);
        kvs_errf(err, errlen, "cannot record the placement: %s", why);
    }
    KVS_TRY(rc);
    if (!ok) {
        kvs_errf(err, errlen, "session '%s' already exists", m->session);
        return KVS_ALREADY_EXISTS;
    }
    KVS_TRY(kvs_coord_session_add(c, &r));
    KVS_INFO("coordinator: session '%s' (%lld cells) placed on '%s'%s", r.id, (long long)r.cells,
             r.worker, p->prefix_hit ? " (prefix hit)" : "");
    return KVS_OK;
}

/* Locate: the owner, or why it cannot serve. */
static int op_locate(kvs_coord *c, const struct kvs_cmsg *m, const struct session_rec **out,
                     const struct worker **owner, char *err, size_t errlen)
{
    bool found;
    size_t i = kvs_coord_session_find(c, m->session, &found);
    if (!found) {
        kvs_errf(err, errlen, "session '%s' not found", m->session);
        return KVS_NOT_FOUND;
    }
    const struct session_rec *s = &c->sessions[i];
    *out = s;
    *owner = kvs_coord_worker_find(c, s->worker);
    /* A drain's move before its release answers the old worker, which still serves it. */
    if (s->from[0] != '\0') {
        kvs_errf(err, errlen,
                 "session '%s' is being restored on worker '%s' (from '%s''s data dir)%s%s: "
                 "retry shortly",
                 m->session, s->worker, s->from, s->error[0] ? "; " : "", s->error);
        return KVS_UNAVAILABLE;
    }
    if (*owner == NULL || (*owner)->down) {
        if (s->error[0] != '\0') {
            bool stuck = s->retry_ms == INT64_MAX; /* not tried again on its own */
            kvs_errf(err, errlen,
                     "session '%s': its worker '%s' is down (lease expired and no heartbeat) "
                     "and %s; the session is kept%s%s%s",
                     m->session, s->worker, s->error, stuck ? ": restart worker '" : "",
                     stuck ? s->worker : "",
                     stuck ? "' (its files are in its data dir) to serve it again" : "");
        } else if (!c->o.shared_data_dir) {
            kvs_errf(err, errlen,
                     "session '%s': its worker '%s' is down (lease expired and no heartbeat); "
                     "the session is kept; it is not restored elsewhere (the coordinator runs "
                     "without --shared-data-dir): restart worker '%s' to bring it back",
                     m->session, s->worker, s->worker);
        } else {
            kvs_errf(err, errlen,
                     "session '%s': its worker '%s' is down (lease expired and no heartbeat); "
                     "the session is kept and waits to be restored on another worker",
                     m->session, s->worker);
        }
        return KVS_UNAVAILABLE;
    }
    return KVS_OK;
}

static int op_close(kvs_coord *c, const struct kvs_cmsg *m, char *err, size_t errlen)
{
    bool found;
    size_t i = kvs_coord_session_find(c, m->session, &found);
    if (!found) {
        kvs_errf(err, errlen, "session '%s' not found", m->session);
        return KVS_NOT_FOUND;
    }
    if (c->sessions[i].moving) {
        kvs_errf(err, errlen, "session '%s' is being moved to worker '%s': retry when it is done",
                 m->session, c->sessions[i].worker);
        return KVS_UNAVAILABLE;
    }
    char key[512];
    kvs_coord_session_key(c, m->session, key, sizeof key);
    KVS_TRY(kvs_coord_delete(c, key, err, errlen));
    kvs_coord_session_remove(c, i);
    return KVS_OK;
}

static int op_cordon(kvs_coord *c, const struct kvs_cmsg *m, bool cordon, char *err, size_t errlen)
{
    struct worker *w = kvs_coord_worker_find(c, m->worker);
    if (w == NULL) {
        kvs_errf(err, errlen, "worker '%s' not found", m->worker);
        return KVS_NOT_FOUND;
    }
    enum kvs_worker_state before = w->admin_state;
    w->admin_state = cordon ? KVS_WORKER_CORDONED : KVS_WORKER_READY;
    char key[512];
    kvs_coord_worker_key(c, w->id, key, sizeof key);
    char *json = kvs_coord_worker_json(w);
    int rc = json ? kvs_coord_put(c, key, json, w->lease, err, errlen) : KVS_NO_MEMORY;
    free(json);
    if (rc < 0) {
        w->admin_state = before; /* nothing changed */
    }
    return rc;
}

static void pack_worker(kvs_coord *c, msgpack_packer *pk, const struct worker *w, int64_t now)
{
    msgpack_pack_map(pk, 15);
    pack_key(pk, "worker");
    pack_key(pk, w->id);
    pack_key(pk, "endpoint");
    pack_key(pk, w->endpoint);
    pack_key(pk, "device");
    pack_key(pk, w->device);
    pack_key(pk, "model");
    pack_key(pk, w->model);
    pack_key(pk, "state");
    pack_key(pk, w->down ? "down" : kvs_worker_state_name(kvs_coord_worker_state(c, w, now)));
    pack_key(pk, "cells_total");
    msgpack_pack_int64(pk, w->cells_total);
    pack_key(pk, "block_size");
    msgpack_pack_int64(pk, w->block_size);
    pack_key(pk, "cells_placed");
    msgpack_pack_int64(pk, w->cells_placed);
    pack_key(pk, "cells_used");
    msgpack_pack_uint64(pk, w->cells_used);
    pack_key(pk, "cells_free");
    msgpack_pack_int64(pk, w->cells_total - w->cells_placed);
    pack_key(pk, "sessions");
    msgpack_pack_int64(pk, w->n_sessions);
    pack_key(pk, "queue");
    msgpack_pack_uint64(pk, w->queue);
    pack_key(pk, "load");
    msgpack_pack_double(pk, w->load);
    pack_key(pk, "heartbeat_age_ms");
    msgpack_pack_int64(pk, w->last_hb_ms ? now - w->last_hb_ms : -1);
    pack_key(pk, "prefixes");
    msgpack_pack_uint32(pk, w->n_prefix_hashes);
}

/* Answer one decoded request. */
static void handle(kvs_coord *c, const void *ident, size_t ident_len, struct kvs_cmsg *m)
{
    char err[512] = "";
    /* Through a store outage the leader keeps answering from memory (no one can take over
     * meanwhile); its writes are fenced in any case. */
    bool leading = c->token != 0 && kvs_leader_held_token(c->leader) == c->token;
    msgpack_packer *pk;
    switch (m->op) {
    case KVS_COP_HELLO:
        pk = begin(c, m->id, 4);
        pack_key(pk, "version");
        msgpack_pack_uint32(pk, KVS_WIRE_VERSION);
        pack_key(pk, "server");
        pack_key(pk, "kvs-coordinator");
        pack_key(pk, "leader");
        leading ? msgpack_pack_true(pk) : msgpack_pack_false(pk);
        pack_key(pk, "endpoint");
        pack_key(pk, c->endpoint);
        send_out(c, ident, ident_len);
        return;
    case KVS_COP_PING:
        pk = begin(c, m->id, 1);
        pack_key(pk, "pong");
        msgpack_pack_true(pk);
        send_out(c, ident, ident_len);
        return;
    case KVS_COP_STATUS: {
        char leader[KVS_CMSG_ENDPOINT_MAX + 1];
        kvs_leader_current(c->leader, leader, sizeof leader);
        pk = begin(c, m->id, 7);
        pack_key(pk, "leader");
        leading ? msgpack_pack_true(pk) : msgpack_pack_false(pk);
        pack_key(pk, "leader_endpoint");
        pack_key(pk, leader);
        pack_key(pk, "token");
        msgpack_pack_int64(pk, leading ? c->token : 0);
        pack_key(pk, "cluster");
        pack_key(pk, c->cluster);
        pack_key(pk, "store");
        pack_key(pk, kvs_store_kind(c->store));
        pack_key(pk, "workers");
        msgpack_pack_uint64(pk, leading ? c->n_workers : 0);
        pack_key(pk, "sessions");
        msgpack_pack_uint64(pk, leading ? c->n_sessions : 0);
        send_out(c, ident, ident_len);
        return;
    }
    default:
        break;
    }
    if (!leading) {
        send_not_leader(c, ident, ident_len, m->id);
        return;
    }
    int rc = KVS_OK;
    int64_t now = now_ms();
    switch (m->op) {
    case KVS_COP_WORKER_REGISTER:
        rc = op_register(c, m, err, sizeof err);
        if (rc == KVS_OK) {
            pk = begin(c, m->id, 4);
            pack_key(pk, "worker");
            pack_key(pk, m->worker);
            pack_key(pk, "heartbeat_ms");
            msgpack_pack_int(pk, c->o.heartbeat_ms);
            pack_key(pk, "unhealthy_ms");
            msgpack_pack_int(pk, c->o.unhealthy_ms);
            pack_key(pk, "lease_ttl_s");
            msgpack_pack_int(pk, c->o.worker_ttl_s);
        }
        break;
    case KVS_COP_WORKER_HEARTBEAT:
        rc = op_heartbeat(c, m, err, sizeof err);
        if (rc == KVS_OK) {
            const struct worker *w = kvs_coord_worker_find(c, m->worker);
            pk = begin(c, m->id, 2);
            pack_key(pk, "ok");
            msgpack_pack_true(pk);
            /* How long ago its lease was last renewed: the worker's half of the failure
             * rule (stop serving when neither the lease nor the leader is there). */
            pack_key(pk, "lease_age_ms");
            msgpack_pack_int64(pk, now - w->lease_renewed_ms);
        }
        break;
    case KVS_COP_SESSION_CREATE: {
        struct kvs_placement p;
        rc = op_session_create(c, m, &p, err, sizeof err);
        if (rc == KVS_OK) {
            const struct worker *w = &c->workers[p.index];
            pk = begin(c, m->id, 5);
            pack_key(pk, "session");
            pack_key(pk, m->session);
            pack_key(pk, "worker");
            pack_key(pk, w->id);
            pack_key(pk, "endpoint");
            pack_key(pk, w->endpoint);
            pack_key(pk, "cells");
            msgpack_pack_uint64(pk, m->cells);
            pack_key(pk, "prefix_hit");
            p.prefix_hit ? msgpack_pack_true(pk) : msgpack_pack_false(pk);
        }
        break;
    }
    case KVS_COP_SESSION_LOCATE: {
        const struct session_rec *r = NULL;
        const struct worker *w = NULL;
        rc = op_locate(c, m, &r, &w, err, sizeof err);
        if (rc == KVS_OK) {
            pk = begin(c, m->id, 5);
            pack_key(pk, "session");
            pack_key(pk, r->id);
            pack_key(pk, "worker");
            pack_key(pk, w->id);
            pack_key(pk, "endpoint");
            pack_key(pk, w->endpoint);
            pack_key(pk, "cells");
            msgpack_pack_int64(pk, r->cells);
            pack_key(pk, "worker_state");
            pack_key(pk, kvs_worker_state_name(kvs_coord_worker_state(c, w, now)));
        }
        break;
    }
    case KVS_COP_SESSION_CLOSE:
        rc = op_close(c, m, err, sizeof err);
        if (rc == KVS_OK) {
            pk = begin(c, m->id, 1);
            pack_key(pk, "closed");
            msgpack_pack_true(pk);
        }
        break;
    case KVS_COP_WORKERS:
        pk = begin(c, m->id, 1);
        pack_key(pk, "workers");
        msgpack_pack_array(pk, (uint32_t)c->n_workers);
        for (size_t i = 0; i < c->n_workers; i++) {
            pack_worker(c, pk, &c->workers[i], now);
        }
        break;
    case KVS_COP_SESSIONS: {
        uint32_t n = c->n_sessions > 65536 ? 65536 : (uint32_t)c->n_sessions;
        pk = begin(c, m->id, 2);
        pack_key(pk, "sessions");
        msgpack_pack_array(pk, n);
        for (uint32_t i = 0; i < n; i++) {
            const struct session_rec *s = &c->sessions[i];
            const struct worker *w = kvs_coord_worker_find(c, s->worker);
            const char *state = s->moving || s->from[0] ? "moving"
                                : w == NULL || w->down  ? "unavailable"
                                                        : "ok";
            msgpack_pack_map(pk, s->error[0] ? 5 : 4);
            pack_key(pk, "session");
            pack_key(pk, s->id);
            pack_key(pk, "worker");
            pack_key(pk, s->worker);
            pack_key(pk, "cells");
            msgpack_pack_int64(pk, s->cells);
            pack_key(pk, "state");
            pack_key(pk, state);
            if (s->error[0]) {
                pack_key(pk, "error");
                pack_key(pk, s->error);
            }
        }
        pack_key(pk, "truncated");
        n < c->n_sessions ? msgpack_pack_true(pk) : msgpack_pack_false(pk);
        break;
    }
    case KVS_COP_CORDON:
    case KVS_COP_UNCORDON:
        rc = op_cordon(c, m, m->op == KVS_COP_CORDON, err, sizeof err);
        if (rc == KVS_OK) {
            pk = begin(c, m->id, 2);
            pack_key(pk, "worker");
            pack_key(pk, m->worker);
            pack_key(pk, "state");
            pack_key(pk, m->op == KVS_COP_CORDON ? "cordoned" : "ready");
        }
        break;
    case KVS_COP_DRAIN:
        /* Answered when its moves are done (coordinator/moves.c). */
        rc = kvs_coord_drain_start(c, m->worker, ident, ident_len, m->id, err, sizeof err);
        if (rc == KVS_OK) {
            return;
        }
        break;
    default:
        rc = KVS_UNSUPPORTED;
        kvs_errf(err, sizeof err, "op not handled");
        break;
    }
    if (rc == KVS_NOT_LEADER) {
        send_not_leader(c, ident, ident_len, m->id);
    } else if (rc < 0) {
        send_error(c, ident, ident_len, m->id, rc, err);
    } else {
        send_out(c, ident, ident_len);
    }
}

/* ---- the loop ---- */

/* Whether w's heartbeats to this leader stopped (unhealthy_ms without one). A worker not
 * heard yet counts from when this leadership began: a new leader gives every worker the
 * time to heartbeat to it before its key is looked at (after a store outage the workers'
 * leases may have expired while they kept heartbeating). */
static bool silent_for(const kvs_coord *c, const struct worker *w, int64_t now)
{
    int64_t heard = w->last_hb_ms != 0 ? w->last_hb_ms : c->led_since_ms;
    return now - heard > c->o.unhealthy_ms;
}

/* Leadership changes and worker health. */
static void tick(kvs_coord *c)
{
    int64_t now = now_ms();
    /* A store that stopped answering is tried again now and then (leader or not), so that
     * the loop's own calls are let through again once it is back, even when no worker
     * heartbeats. */
    if (!kvs_storeq_healthy(c->storeq, now, STORE_STALL_MS) && kvs_storeq_pending(c->storeq) == 0 &&
        now - c->last_probe_ms >= PROBE_MS) {
        struct kvs_storeq_job j = {.kind = KVS_STOREQ_GET};
        snprintf(j.key, sizeof j.key, "%sleader", c->key_root);
        if (kvs_storeq_push(c->storeq, &j) == KVS_OK) {
            c->last_probe_ms = now;
        }
    }
    int64_t token = kvs_leader_held_token(c->leader);
    if (token != c->token) {
        if (token != 0) {
            char err[256];
            if (kvs_coord_state_load(c, err, sizeof err) < 0) {
                KVS_WARN("coordinator: leader, but cannot load the cluster state: %s; "
                         "retrying",
                         err);
                return; /* c->token stays: tried again next tick */
            }
            KVS_INFO("coordinator: %s leads cluster '%s' (token %lld)", c->endpoint, c->cluster,
                     (long long)token);
            c->led_since_ms = now;
        } else {
            KVS_WARN("coordinator: %s stands by", c->endpoint);
            kvs_coord_moves_clear(c, KVS_NOT_LEADER,
                                  "this coordinator lost the leadership during the drain");
            kvs_coord_state_clear(c);
        }
        c->token = token;
    }
    if (c->token == 0) {
        return;
    }
    /* The failure rule: down = heartbeats stopped AND lease expired (its key is gone). */
    for (size_t i = 0; i < c->n_workers; i++) {
        struct worker *w = &c->workers[i];
        if (!silent_for(c, w, now) || w->down || now - w->down_checked_ms < DOWN_CHECK_MS) {
            continue;
        }
        if (w->checking) {
            continue;
        }
        /* Is its key gone? Asked on the store's thread; the answer comes to on_store_done. */
        struct kvs_storeq_job j = {.kind = KVS_STOREQ_GET, .token = c->token};
        snprintf(j.worker, sizeof j.worker, "%s", w->id);
        kvs_coord_worker_key(c, w->id, j.key, sizeof j.key);
        if (kvs_storeq_push(c->storeq, &j) == KVS_OK) {
            w->checking = true;
            w->down_checked_ms = now;
        }
    }
    kvs_coord_moves_tick(c, now);
}

/* Results of the store's thread: lease renewals and down checks (storeq.h). */
static void on_store_done(kvs_coord *c)
{
    struct kvs_storeq_job j;
    while (kvs_storeq_pop_done(c->storeq, &j)) {
        struct worker *w = j.worker[0] ? kvs_coord_worker_find(c, j.worker) : NULL;
        if (w == NULL || j.token != c->token || c->token == 0) {
            continue; /* the probe, or a worker this leadership no longer knows */
        }
        int64_t now = now_ms();
        if (j.kind == KVS_STOREQ_KEEPALIVE) {
            w->renewing = false;
            if (j.lease != w->lease) {
                continue; /* it registered again meanwhile, with a new lease */
            }
            if (j.status == KVS_OK) {
                /* dated when the call began: the store renewed it no earlier */
                if (j.started_ms > w->lease_renewed_ms) {
                    w->lease_renewed_ms = j.started_ms;
                }
            } else if (j.status == KVS_NOT_FOUND) {
                w->lease_expired = true;
            } else {
                KVS_WARN("coordinator: cannot renew worker '%s''s lease: %s", w->id, j.err);
            }
            continue;
        }
        w->checking = false;
        if (j.status == KVS_NOT_FOUND && silent_for(c, w, now) && !w->down) {
            w->down = true;
            KVS_WARN("coordinator: worker '%s' is down (no heartbeat for %lld ms and its lease "
                     "expired); its %lld sessions %s",
                     w->id, (long long)(w->last_hb_ms ? now - w->last_hb_ms : -1),
                     (long long)w->n_sessions,
                     c->o.shared_data_dir ? "are restored on other workers"
                                          : "wait for it (no --shared-data-dir)");
        }
        /* UNAVAILABLE: the store is away; nobody is declared down meanwhile. */
    }
}

static int recv_parts(void *sock, zmq_msg_t *parts, int n_max)
{
    int n = 0;
    for (;;) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, sock, n == 0 ? ZMQ_DONTWAIT : 0) < 0) {
            zmq_msg_close(&m);
            return n == 0 ? 0 : -1;
        }
        int more = zmq_msg_more(&m);
        if (n < n_max) {
            parts[n] = m;
        } else {
            zmq_msg_close(&m);
        }
        n++;
        if (!more) {
            return n;
        }
    }
}

int kvs_coord_run(kvs_coord *c)
{
    int rc = KVS_OK;
    zmq_pollitem_t items[1 + POLL_MOVES];
    /* systemd (Type=notify): ready once listening; the watchdog fed by this loop, so a loop
     * that hangs gets the process restarted */
    int64_t wd_ms = kvs_sd_watchdog_ms(), wd_last = 0;
    kvs_sd_notify("READY=1");
    while (!c->stop) {
        if (wd_ms > 0 && now_ms() - wd_last >= wd_ms / 2) {
            kvs_sd_notify("WATCHDOG=1");
            wd_last = now_ms();
        }
        items[0] = (zmq_pollitem_t){c->router, 0, ZMQ_POLLIN, 0};
        size_t n_moves = kvs_coord_moves_poll_items(c, items + 1, POLL_MOVES);
        if (zmq_poll(items, (int)(1 + n_moves), 50) < 0 && errno != EINTR) {
            KVS_ERROR("coordinator: zmq_poll: %s", zmq_strerror(errno));
            rc = KVS_INTERNAL;
            break;
        }
        /* Workers' answers to moves first: they may free what the tick looks at. */
        kvs_coord_moves_on_replies(c, items + 1, n_moves);
        on_store_done(c);
        if (now_ms() - c->last_tick_ms >= TICK_MS || kvs_leader_held_token(c->leader) != c->token) {
            tick(c);
            c->last_tick_ms = now_ms();
        }
        for (int batch = 0; batch < 64 && (items[0].revents & ZMQ_POLLIN); batch++) {
            zmq_msg_t parts[3];
            int n = recv_parts(c->router, parts, 3);
            if (n <= 0) {
                break;
            }
            int kept = n < 3 ? n : 3;
            size_t ident_len = zmq_msg_size(&parts[0]);
            if (ident_len <= IDENT_MAX) {
                if (n != 3 || zmq_msg_size(&parts[1]) != 0) {
                    send_error(c, zmq_msg_data(&parts[0]), ident_len, 0, KVS_BAD_FORMAT,
                               "expected two frames: an empty delimiter and the payload");
                } else {
                    struct kvs_cmsg m;
                    char err[512] = "";
                    int drc = kvs_cmsg_decode(zmq_msg_data(&parts[2]), zmq_msg_size(&parts[2]), &m,
                                              err, sizeof err);
                    if (drc < 0) {
                        send_error(c, zmq_msg_data(&parts[0]), ident_len, m.id, drc, err);
                    } else {
                        handle(c, zmq_msg_data(&parts[0]), ident_len, &m);
                    }
                    kvs_cmsg_free(&m);
                }
            }
            for (int i = 0; i < kept; i++) {
                zmq_msg_close(&parts[i]);
            }
        }
    }
    kvs_sd_notify("STOPPING=1");
    return rc;
}

void kvs_coord_stop(kvs_coord *c)
{
    c->stop = 1;
}

const char *kvs_coord_endpoint(const kvs_coord *c)
{
    return c->endpoint;
}

bool kvs_coord_is_leader(kvs_coord *c)
{
    return kvs_leader_held_token(c->leader) != 0;
}

/* ---- open / close ---- */

int kvs_coord_new(const struct kvs_coord_opts *o, kvs_coord **out, char *err, size_t errlen)
{
    *out = NULL;
    const char *cluster = o->cluster ? o->cluster : "default";
    if (o->listen == NULL || (o->store == NULL && o->store_url == NULL) ||
        !kvs_cmsg_valid_id(cluster, 63)) {
        kvs_errf(err, errlen,
                 "coordinator: needs --listen, a store and a cluster name of "
                 "1..63 bytes of [A-Za-z0-9._-]");
        return KVS_INVALID_ARGUMENT;
    }
    int rc = kvs_curve_check_listen(o->listen, o->insecure, o->curve_secret, o->curve_clients,
                                    err, errlen);
    if (rc < 0) {
        return rc;
    }
    kvs_coord *c = calloc(1, sizeof *c);
    if (c == NULL) {
        return KVS_NO_MEMORY;
    }
    c->o = *o;
    c->o.leader_ttl_s = o->leader_ttl_s > 0 ? o->leader_ttl_s : 5;
    c->o.worker_ttl_s = o->worker_ttl_s > 0 ? o->worker_ttl_s : 10;
    c->o.heartbeat_ms = o->heartbeat_ms > 0 ? o->heartbeat_ms : 1000;
    c->o.unhealthy_ms = o->unhealthy_ms > 0 ? o->unhealthy_ms : 3 * c->o.heartbeat_ms;
    c->o.move_timeout_ms = o->move_timeout_ms > 0 ? o->move_timeout_ms : 30000;
    snprintf(c->cluster, sizeof c->cluster, "%s", cluster);
    snprintf(c->key_root, sizeof c->key_root, "/kvstream/%s/", cluster);
    kvs_wire_buf_init(&c->out);
    rc = KVS_INVALID_ARGUMENT;
    if (c->o.leader_ttl_s < 2 || c->o.leader_ttl_s > 600 || c->o.worker_ttl_s < 2 ||
        c->o.worker_ttl_s > 600) {
        kvs_errf(err, errlen, "coordinator: lease TTLs must be 2..600 s");
        goto fail;
    }
    if (o->store != NULL) {
        c->store = o->store;
    } else {
        c->store = kvs_store_open(o->store_url, 2000, err, errlen);
        if (c->store == NULL) {
            /* A file that cannot be read or is damaged, else a URL that makes no sense (an
             * etcd store opens without contacting etcd). */
            rc = strncmp(o->store_url, "file:", 5) == 0 ? KVS_IO : KVS_INVALID_ARGUMENT;
            goto fail;
        }
        c->own_store = true;
    }
    c->storeq = kvs_storeq_new(c->store, STOREQ_CAP);
    if (c->storeq == NULL) {
        kvs_errf(err, errlen, "coordinator: cannot start the store's thread");
        rc = KVS_NO_MEMORY;
        goto fail;
    }
    c->zctx = zmq_ctx_new();
    c->router = c->zctx ? zmq_socket(c->zctx, ZMQ_ROUTER) : NULL;
    if (c->router == NULL) {
        kvs_errf(err, errlen, "zmq: %s", zmq_strerror(errno));
        rc = KVS_INTERNAL;
        goto fail;
    }
    kvs_router_options(c->router);
    if (o->curve_secret != NULL) { /* the allow-list answers before the first handshake */
        int crc = kvs_curve_server_setup(c->router, o->curve_secret, err, errlen);
        if (crc < 0) {
            rc = crc;
            goto fail;
        }
        if (o->curve_clients != NULL) {
            c->zap = kvs_curve_zap_start(c->zctx, o->curve_clients, err, errlen);
            if (c->zap == NULL) {
                rc = KVS_INVALID_ARGUMENT;
                goto fail;
            }
        }
    }
    if (o->worker_key != NULL) { /* our identity toward CURVE workers: our own key if any */
        bool ok = o->curve_secret != NULL
                      ? zmq_curve_public(c->curve_pub, o->curve_secret) == 0
                      : zmq_curve_keypair(c->curve_pub, c->curve_sec) == 0;
        if (ok && o->curve_secret != NULL) {
            snprintf(c->curve_sec, sizeof c->curve_sec, "%s", o->curve_secret);
        }
        if (!ok) {
            kvs_errf(err, errlen, "cannot make a CURVE key pair: %s", zmq_strerror(errno));
            rc = KVS_INVALID_ARGUMENT;
            goto fail;
        }
    }
    if (zmq_bind(c->router, o->listen) != 0) {
        kvs_errf(err, errlen, "cannot bind %s: %s", o->listen, zmq_strerror(errno));
        rc = KVS_IO;
        goto fail;
    }
    size_t len = sizeof c->endpoint;
    zmq_getsockopt(c->router, ZMQ_LAST_ENDPOINT, c->endpoint, &len);
    char leader_key[192];
    snprintf(leader_key, sizeof leader_key, "%sleader", c->key_root);
    c->leader = kvs_leader_new(c->store, leader_key, c->endpoint, c->o.leader_ttl_s, err, errlen);
    if (c->leader == NULL) {
        goto fail;
    }
    rc = kvs_leader_start(c->leader, err, errlen);
    if (rc < 0) {
        goto fail;
    }
    *out = c;
    return KVS_OK;
fail:
    kvs_coord_destroy(&c, false);
    return rc < 0 ? rc : KVS_INTERNAL;
}

void kvs_coord_destroy(kvs_coord **pc, bool crash)
{
    if (pc == NULL || *pc == NULL) {
        return;
    }
    kvs_coord *c = *pc;
    if (c->router != NULL) {
        kvs_coord_moves_clear(c, KVS_CANCELLED, "the coordinator is shutting down");
    }
    kvs_leader_destroy(&c->leader, !crash);
    kvs_storeq_destroy(&c->storeq);
    if (c->router != NULL) {
        zmq_close(c->router);
    }
    kvs_curve_zap_stop(&c->zap); /* closes its socket: before zmq_ctx_term */
    if (c->zctx != NULL) {
        zmq_ctx_term(c->zctx);
    }
    kvs_coord_state_clear(c);
    free(c->workers);
    free(c->sessions);
    if (c->own_store) {
        kvs_store_destroy(&c->store);
    }
    kvs_wire_buf_destroy(&c->out);
    free(c);
    *pc = NULL;
}
