/* Moving sessions between workers (coordinator/coord.h, docs/CLUSTER.md "Re-placement and
 * drain", docs/PROTOCOL.md §9): the restore of a down worker's sessions on other workers, and
 * admin.drain.
 *
 * A move is a small state machine driven by the coordinator's loop; each step is one request
 * to a worker over a DEALER of its own, sent without blocking, answered whenever the worker
 * answers, sent again on a fresh connection after move_timeout_ms (MOVE_ATTEMPTS sends in
 * all). Nothing here waits: the loop polls the moves' sockets next to its ROUTER.
 *
 *   restore (its worker is down, shared_data_dir):
 *     place (same model, room for the budget) -> record {worker: new, from: down} (fenced)
 *     -> session.adopt {session, from: down} to the new worker -> record {worker: new}.
 *     ALREADY_EXISTS -> session.info: open there (an earlier send was applied) = done.
 *     A failure puts the session back on its down worker with the error, which locate
 *     reports: permanent (NOT_FOUND, IO, BAD_FORMAT, UNSUPPORTED, ...: the data dir is not
 *     reachable or the log is damaged) until that worker registers again; passing
 *     (CAPACITY, BUSY, UNAVAILABLE, ...) tried again after RETRY_MS, maybe elsewhere. No
 *     answer at all leaves the order outstanding on the new worker (it may have moved the
 *     files) and sends it again later.
 *   drain (admin.drain, one session at a time per drained worker):
 *     place (the draining worker is not READY) and hold the budget there -> session.release
 *     to the old worker (it stops serving the session, flushes its log, keeps its files) ->
 *     record {worker: new, from: old} -> session.adopt {session, from: old} to the new one ->
 *     record {worker: new}. If the adopt fails, session.adopt {session} to the old worker
 *     puts it back (its files were moved back by the failed adopt).
 *
 * The recorded `from` is the intent: a leader that takes over with a restore order
 * outstanding sends it again to the recorded worker.
 */
#include "coordinator/coord_impl.h"

#include "common/log.h"
#include "common/status.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#define MOVES_MAX 16           /* moves in flight at once (restores and drains together) */
#define MOVE_ATTEMPTS 3        /* sends of one request before it is given up */
#define RETRY_MS 5000          /* a restore that failed for a passing reason: again after this */
#define REPLY_MAX (64u << 10)  /* bytes of a worker's reply that are read */
#define DRAIN_REPLY_MOVES 2048 /* moves listed in an admin.drain reply (the frame is 1 MiB) */
#define WID (KVS_CMSG_WORKER_MAX + 1)

enum move_kind { MOVE_RESTORE, MOVE_DRAIN };

enum move_step {
    STEP_RELEASE,    /* drain: session.release to the old worker */
    STEP_ADOPT,      /* session.adopt {session, from} to the new worker */
    STEP_CHECK,      /* session.info to the new worker: its adopt answered ALREADY_EXISTS */
    STEP_ADOPT_BACK, /* drain: the new worker failed; session.adopt {session} to the old one */
};

static const char *const step_ops[] = {"session.release", "session.adopt", "session.info",
                                       "session.adopt"};

struct kvs_move {
    enum move_kind kind;
    enum move_step step;
    char session[129];
    char from[WID];     /* the worker whose directory holds the session */
    char to[WID];       /* where it goes */
    char alt_from[WID]; /* restore: a second directory to try on NOT_FOUND, "" = none */
    int64_t reserved;   /* drain: cells held on `to` until the placement is recorded */
    void *sock;         /* DEALER to the worker of this step */
    char endpoint[KVS_CMSG_ENDPOINT_MAX + 1];
    uint64_t rid;     /* the id of the request in flight */
    int attempt;      /* sends of this step so far */
    int64_t sent_ms;  /* monotonic */
    int first_status; /* drain: why the adopt on `to` failed (reported after the way back) */
    char first_error[SESSION_ERROR_MAX + 1];
};

struct drain_result {
    char session[129];
    char to[WID]; /* "" when no worker could take it */
    int status;   /* 0 = moved */
    char error[SESSION_ERROR_MAX + 1];
};

struct kvs_drain {
    char worker[WID];
    uint8_t ident[256]; /* the admin's connection, answered when the drain is done */
    size_t ident_len;
    uint64_t id; /* its request */
    struct drain_result *results;
    size_t n_results, cap_results;
    bool busy; /* a move of it is in flight */
};

/* What a worker answered: the fields the moves read. */
struct wreply {
    uint64_t id;
    int status; /* 0, or the error's status */
    char message[SESSION_ERROR_MAX + 1];
    uint64_t version, appends;
};

/* ---- small helpers ---- */

/* Format a session's error or a move's reason into dst[SESSION_ERROR_MAX + 1], ASCII. */
__attribute__((format(printf, 2, 3))) static void set_error(char *dst, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(dst, SESSION_ERROR_MAX + 1, fmt, ap);
    va_end(ap);
    kvs_coord_ascii(dst);
}

static struct session_rec *session_of(kvs_coord *c, const char *id, size_t *at)
{
    bool found;
    size_t i = kvs_coord_session_find(c, id, &found);
    if (at != NULL) {
        *at = i;
    }
    return found ? &c->sessions[i] : NULL;
}

static struct kvs_drain *drain_of(kvs_coord *c, const char *worker)
{
    for (size_t i = 0; i < c->n_drains; i++) {
        if (strcmp(c->drains[i]->worker, worker) == 0) {
            return c->drains[i];
        }
    }
    return NULL;
}

static void record_or_warn(kvs_coord *c, const struct session_rec *r)
{
    char err[256];
    int rc = kvs_coord_session_record(c, r, err, sizeof err);
    if (rc < 0) {
        KVS_WARN("coordinator: cannot record session '%s' on '%s': %s (%s)", r->id, r->worker, err,
                 kvs_status_name(rc));
    }
}

/* Errors that another try cannot fix: the files are not there, not readable or damaged. */
static bool permanent(int status)
{
    return status == KVS_NOT_FOUND || status == KVS_IO || status == KVS_BAD_FORMAT ||
           status == KVS_UNSUPPORTED || status == KVS_INVALID_ARGUMENT ||
           status == KVS_ALREADY_EXISTS || status == KVS_MODEL_MISMATCH;
}

/* ---- the socket of a step ---- */

static void close_sock(struct kvs_move *m)
{
    if (m->sock != NULL) {
        zmq_close(m->sock);
        m->sock = NULL;
    }
}

static void *open_sock(kvs_coord *c, const char *endpoint)
{
    void *s = zmq_socket(c->zctx, ZMQ_DEALER);
    if (s == NULL) {
        return NULL;
    }
    int linger = 0, ivl = 250, tmo = 1000, hwm = 16;
    int64_t maxmsg = REPLY_MAX + 64; /* a bigger reply is not for us: libzmq drops it */
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(s, ZMQ_HEARTBEAT_IVL, &ivl, sizeof ivl);
    zmq_setsockopt(s, ZMQ_HEARTBEAT_TIMEOUT, &tmo, sizeof tmo);
    zmq_setsockopt(s, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    char err[256];
    if (c->o.worker_key != NULL && kvs_curve_client_setup(s, c->o.worker_key, c->curve_pub,
                                                          c->curve_sec, err, sizeof err) < 0) {
        KVS_ERROR("coordinator: %s", err);
        zmq_close(s);
        return NULL;
    }
    if (zmq_connect(s, endpoint) != 0) {
        zmq_close(s);
        return NULL;
    }
    return s;
}

static void on_result(kvs_coord *c, struct kvs_move *m, int status, const char *msg,
                      const struct wreply *r);

/* Send the request of m's current step (again: a fresh connection each time). A failure to
 * send is the step's result. */
static void send_step(kvs_coord *c, struct kvs_move *m)
{
    const char *target = (m->step == STEP_RELEASE || m->step == STEP_ADOPT_BACK) ? m->from : m->to;
    const struct worker *w = kvs_coord_worker_find(c, target);
    char why[SESSION_ERROR_MAX + 1];
    if (w == NULL || w->endpoint[0] == '\0') {
        set_error(why, "worker '%s' has no known endpoint", target);
        on_result(c, m, KVS_UNAVAILABLE, why, NULL);
        return;
    }
    close_sock(m);
    snprintf(m->endpoint, sizeof m->endpoint, "%s", w->endpoint);
    m->sock = open_sock(c, m->endpoint);
    m->rid = ++c->next_request_id;
    m->attempt++;
    m->sent_ms = now_ms();
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    bool with_from = m->step == STEP_ADOPT;
    msgpack_pack_map(&pk, with_from ? 4 : 3);
    kvs_wire_pack_cstr(&pk, "id");
    msgpack_pack_uint64(&pk, m->rid);
    kvs_wire_pack_cstr(&pk, "op");
    kvs_wire_pack_cstr(&pk, step_ops[m->step]);
    kvs_wire_pack_cstr(&pk, "session");
    kvs_wire_pack_cstr(&pk, m->session);
    if (with_from) {
        kvs_wire_pack_cstr(&pk, "from");
        kvs_wire_pack_cstr(&pk, m->from);
    }
    bool sent = m->sock != NULL && zmq_send(m->sock, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) == 0 &&
                zmq_send(m->sock, sb.data, sb.size, ZMQ_DONTWAIT) == (int)sb.size;
    msgpack_sbuffer_destroy(&sb);
    if (!sent) {
        set_error(why, "cannot send %s to worker '%s' at %s: %s", step_ops[m->step], target,
                  m->endpoint, zmq_strerror(errno));
        on_result(c, m, KVS_UNAVAILABLE, why, NULL);
    }
}

/* ---- the end of a move ---- */

static void move_free(kvs_coord *c, struct kvs_move *m)
{
    close_sock(m);
    for (size_t i = 0; i < c->n_moves; i++) {
        if (c->moves[i] == m) {
            c->moves[i] = c->moves[--c->n_moves];
            break;
        }
    }
    free(m);
}

static void drain_note(kvs_coord *c, const struct kvs_move *m, int status, const char *error)
{
    struct kvs_drain *d = drain_of(c, m->from);
    if (d == NULL) {
        return;
    }
    d->busy = false;
    struct drain_result *rs = grow(d->results, &d->cap_results, d->n_results + 1, sizeof *rs);
    if (rs == NULL) {
        return; /* the move is not listed; the session is where its record says */
    }
    d->results = rs;
    struct drain_result *r = &d->results[d->n_results++];
    memset(r, 0, sizeof *r);
    snprintf(r->session, sizeof r->session, "%s", m->session);
    snprintf(r->to, sizeof r->to, "%s", m->to);
    r->status = status;
    snprintf(r->error, sizeof r->error, "%s", error ? error : "");
}

/* The session is on m->to. */
static void finish_ok(kvs_coord *c, struct kvs_move *m, const struct wreply *r)
{
    size_t i;
    struct session_rec *s = session_of(c, m->session, &i);
    if (s != NULL) {
        if (strcmp(s->worker, m->to) != 0) {
            kvs_coord_session_reassign(c, i, m->to);
        }
        s->from[0] = '\0';
        s->error[0] = '\0';
        s->moving = false;
        s->retry_ms = 0;
        record_or_warn(c, s); /* if it fails, the recorded order makes a new leader resend */
    }
    KVS_INFO("coordinator: session '%s' %s on '%s' from '%s' (version %llu, %llu appends)",
             m->session, m->kind == MOVE_RESTORE ? "restored" : "moved", m->to, m->from,
             (unsigned long long)(r ? r->version : 0), (unsigned long long)(r ? r->appends : 0));
    if (m->kind == MOVE_DRAIN) {
        drain_note(c, m, KVS_OK, NULL);
    }
    move_free(c, m);
}

/* A restore that did not succeed. */
static void restore_failed(kvs_coord *c, struct kvs_move *m, int status, const char *msg)
{
    size_t i;
    struct session_rec *s = session_of(c, m->session, &i);
    if (s == NULL) {
        move_free(c, m);
        return;
    }
    s->moving = false;
    int64_t now = now_ms();
    if (status == KVS_TIMEOUT) {
        /* No answer: the new worker may have taken the files. The order stays outstanding
         * there (recorded) and is sent again later. */
        set_error(s->error, "no answer to its restore order on worker '%s': %s", m->to, msg);
        s->retry_ms = now + RETRY_MS;
        KVS_WARN("coordinator: session '%s': %s", s->id, s->error);
        move_free(c, m);
        return;
    }
    /* Back on its down worker (whose directory holds the files), with the reason. */
    kvs_coord_session_reassign(c, i, m->from);
    s->from[0] = '\0';
    const char *hint = permanent(status) ? " (is --data-dir one directory shared by every worker?)"
                                         : "; tried again shortly";
    set_error(s->error, "its restore on worker '%s' failed: %s: %s%s", m->to,
              kvs_status_name(status), msg, hint);
    s->retry_ms = permanent(status) ? INT64_MAX : now + RETRY_MS;
    KVS_WARN("coordinator: session '%s': %s", s->id, s->error);
    record_or_warn(c, s);
    move_free(c, m);
}

/* A drain's move that did not succeed: the session is where `where` says (the old worker,
 * serving it), or nowhere (error set). */
static void drain_failed(kvs_coord *c, struct kvs_move *m, int status, const char *msg)
{
    size_t i;
    struct session_rec *s = session_of(c, m->session, &i);
    if (m->reserved > 0) { /* the placement was never recorded: give the budget back */
        struct worker *to = kvs_coord_worker_find(c, m->to);
        if (to != NULL) {
            to->cells_placed -= m->reserved;
        }
        m->reserved = 0;
    }
    char why[SESSION_ERROR_MAX + 1];
    set_error(why, "%s: %s", kvs_status_name(status), msg);
    if (s != NULL) {
        s->moving = false;
    }
    KVS_WARN("coordinator: drain of '%s': session '%s' not moved to '%s': %s", m->from, m->session,
             m->to, why);
    drain_note(c, m, status, why);
    move_free(c, m);
}

/* The result of m's step: the state machine (the top of the file). r is the reply, NULL when
 * there was none. */
static void on_result(kvs_coord *c, struct kvs_move *m, int status, const char *msg,
                      const struct wreply *r)
{
    size_t i;
    struct session_rec *s = session_of(c, m->session, &i);
    char err[SESSION_ERROR_MAX + 1];
    switch (m->step) {
    case STEP_RELEASE:
        if (status == KVS_NOT_FOUND && m->attempt > 1) {
            status = KVS_OK; /* released by an earlier send whose answer was lost */
        }
        if (status < 0) {
            drain_failed(c, m, status, msg); /* nothing changed: the old worker serves it */
            return;
        }
        if (s == NULL) {
            drain_failed(c, m, KVS_NOT_FOUND, "closed meanwhile");
            return;
        }
        {
            /* Released: record the new placement, then restore it there. */
            kvs_coord_session_reassign(c, i, m->to);
            struct worker *to = kvs_coord_worker_find(c, m->to);
            if (to != NULL) {
                to->cells_placed -= m->reserved; /* counted by the reassign now */
            }
            m->reserved = 0;
            snprintf(s->from, sizeof s->from, "%s", m->from);
            int rc = kvs_coord_session_record(c, s, err, sizeof err);
            if (rc < 0) {
                m->first_status = rc;
                set_error(m->first_error, "cannot record the move: %s", err);
                kvs_coord_session_reassign(c, i, m->from);
                s->from[0] = '\0';
                m->step = STEP_ADOPT_BACK;
                m->attempt = 0;
                send_step(c, m);
                return;
            }
        }
        m->step = STEP_ADOPT;
        m->attempt = 0;
        send_step(c, m);
        return;
    case STEP_ADOPT:
        if (status == KVS_OK) {
            finish_ok(c, m, r);
            return;
        }
        if (status == KVS_ALREADY_EXISTS) { /* open there already? */
            m->first_status = status;
            snprintf(m->first_error, sizeof m->first_error, "%s", msg);
            m->step = STEP_CHECK;
            m->attempt = 0;
            send_step(c, m);
            return;
        }
        if (status == KVS_NOT_FOUND && m->alt_from[0] != '\0') {
            /* An earlier order may have left the files in the other directory. */
            KVS_INFO("coordinator: session '%s' not in '%s''s directory; trying '%s''s", m->session,
                     m->from, m->alt_from);
            snprintf(m->from, sizeof m->from, "%s", m->alt_from);
            m->alt_from[0] = '\0';
            m->attempt = 0;
            send_step(c, m);
            return;
        }
        break;
    case STEP_CHECK:
        if (status == KVS_OK) {
            finish_ok(c, m, r);
            return;
        }
        status = m->first_status; /* not open there: the adopt's error stands */
        msg = m->first_error;
        break;
    case STEP_ADOPT_BACK:
        if (s != NULL) {
            s->from[0] = '\0';
            if (status < 0) {
                set_error(s->error,
                          "moved off worker '%s' for a drain, it could not be restored (%s) "
                          "nor put back (%s)",
                          m->from, m->first_error, msg);
                s->retry_ms = INT64_MAX;
                KVS_ERROR("coordinator: session '%s': %s", s->id, s->error);
            }
            record_or_warn(c, s);
        }
        set_error(err, "%s; put back on '%s'%s", m->first_error, m->from,
                  status < 0 ? " failed too: the session is unavailable" : "");
        drain_failed(c, m, m->first_status, err);
        return;
    }
    /* The adopt (or its check) failed. */
    if (m->kind == MOVE_RESTORE) {
        restore_failed(c, m, status, msg);
        return;
    }
    /* Drain: restore it on the old worker from its own directory. */
    m->first_status = status;
    set_error(m->first_error, "restore on '%s' failed: %s: %s", m->to, kvs_status_name(status),
              msg);
    if (s != NULL) {
        kvs_coord_session_reassign(c, i, m->from);
        s->from[0] = '\0';
    }
    m->step = STEP_ADOPT_BACK;
    m->attempt = 0;
    send_step(c, m);
}

/* ---- starting moves ---- */

static struct kvs_move *move_new(kvs_coord *c, enum move_kind kind, const char *session,
                                 const char *from, const char *to)
{
    struct kvs_move **ms = grow(c->moves, &c->cap_moves, c->n_moves + 1, sizeof *ms);
    struct kvs_move *m = ms != NULL ? calloc(1, sizeof *m) : NULL;
    if (m == NULL) {
        return NULL;
    }
    c->moves = ms;
    m->kind = kind;
    snprintf(m->session, sizeof m->session, "%s", session);
    snprintf(m->from, sizeof m->from, "%s", from);
    snprintf(m->to, sizeof m->to, "%s", to);
    c->moves[c->n_moves++] = m;
    return m;
}

/* Session i, whose worker is down: place it, record the order, send it. */
static void start_restore(kvs_coord *c, size_t i, int64_t now)
{
    struct session_rec *s = &c->sessions[i];
    struct kvs_placement p;
    char err[400];
    int rc = kvs_coord_place(c, s->model, s->cells, s->prefix_hash, &p, err, sizeof err);
    if (rc < 0) {
        set_error(s->error, "no worker can take it now (%s: %s); tried again shortly",
                  kvs_status_name(rc), err);
        s->retry_ms = now + RETRY_MS;
        return;
    }
    char down[WID], alt[WID];
    snprintf(down, sizeof down, "%s", s->worker);
    snprintf(alt, sizeof alt, "%s", s->from); /* an earlier order's source, if any */
    struct session_rec r = *s;
    snprintf(r.worker, sizeof r.worker, "%s", c->workers[p.index].id);
    snprintf(r.from, sizeof r.from, "%s", down);
    r.error[0] = '\0';
    rc = kvs_coord_session_record(c, &r, err, sizeof err);
    if (rc < 0) {
        set_error(s->error, "cannot record its restore order (%s: %s); tried again shortly",
                  kvs_status_name(rc), err);
        s->retry_ms = now + RETRY_MS;
        return;
    }
    struct kvs_move *m = move_new(c, MOVE_RESTORE, s->id, down, r.worker);
    if (m == NULL) {
        return; /* out of memory: the next tick places it again (and records that) */
    }
    snprintf(m->alt_from, sizeof m->alt_from, "%s", strcmp(alt, down) != 0 ? alt : "");
    kvs_coord_session_reassign(c, i, r.worker);
    snprintf(s->from, sizeof s->from, "%s", down);
    s->error[0] = '\0';
    s->moving = true;
    m->step = STEP_ADOPT;
    KVS_INFO("coordinator: restoring session '%s' (%lld cells) of down worker '%s' on '%s'", s->id,
             (long long)s->cells, down, r.worker);
    send_step(c, m);
}

/* Session i has a restore order outstanding on its (live) worker: send it again. */
static void resend_order(kvs_coord *c, size_t i)
{
    struct session_rec *s = &c->sessions[i];
    struct kvs_move *m = move_new(c, MOVE_RESTORE, s->id, s->from, s->worker);
    if (m == NULL) {
        return;
    }
    s->moving = true;
    m->step = STEP_ADOPT;
    KVS_INFO("coordinator: sending the restore order of session '%s' to '%s' again", s->id,
             s->worker);
    send_step(c, m);
}

/* The next move of drain d, or its reply when no session is left to try. */
static bool drain_step(kvs_coord *c, struct kvs_drain *d, int64_t now);

static bool tried(const struct kvs_drain *d, const char *session)
{
    for (size_t k = 0; k < d->n_results; k++) {
        if (strcmp(d->results[k].session, session) == 0) {
            return true;
        }
    }
    return false;
}

static void drain_reply(kvs_coord *c, struct kvs_drain *d)
{
    size_t n_ok = 0;
    for (size_t k = 0; k < d->n_results; k++) {
        n_ok += d->results[k].status == KVS_OK;
    }
    size_t n = d->n_results < DRAIN_REPLY_MOVES ? d->n_results : DRAIN_REPLY_MOVES;
    kvs_wire_buf_clear(&c->out);
    msgpack_packer *pk = &c->out.pk;
    msgpack_pack_map(pk, 7);
    kvs_wire_pack_cstr(pk, "id");
    msgpack_pack_uint64(pk, d->id);
    kvs_wire_pack_cstr(pk, "worker");
    kvs_wire_pack_cstr(pk, d->worker);
    kvs_wire_pack_cstr(pk, "state");
    kvs_wire_pack_cstr(pk, "draining");
    kvs_wire_pack_cstr(pk, "moved");
    msgpack_pack_uint64(pk, n_ok);
    kvs_wire_pack_cstr(pk, "failed");
    msgpack_pack_uint64(pk, d->n_results - n_ok);
    kvs_wire_pack_cstr(pk, "moves");
    msgpack_pack_array(pk, (uint32_t)n);
    for (size_t k = 0; k < n; k++) {
        const struct drain_result *r = &d->results[k];
        msgpack_pack_map(pk, r->status == KVS_OK ? 4 : 5);
        kvs_wire_pack_cstr(pk, "session");
        kvs_wire_pack_cstr(pk, r->session);
        kvs_wire_pack_cstr(pk, "from");
        kvs_wire_pack_cstr(pk, d->worker);
        kvs_wire_pack_cstr(pk, "to");
        kvs_wire_pack_cstr(pk, r->to);
        kvs_wire_pack_cstr(pk, "ok");
        r->status == KVS_OK ? msgpack_pack_true(pk) : msgpack_pack_false(pk);
        if (r->status != KVS_OK) {
            kvs_wire_pack_cstr(pk, "error");
            kvs_wire_pack_cstr(pk, r->error);
        }
    }
    kvs_wire_pack_cstr(pk, "truncated");
    n < d->n_results ? msgpack_pack_true(pk) : msgpack_pack_false(pk);
    kvs_coord_send(c, d->ident, d->ident_len, c->out.sb.data, c->out.sb.size);
    KVS_INFO("coordinator: drain of '%s' done: %zu moved, %zu not", d->worker, n_ok,
             d->n_results - n_ok);
}

static void drain_free(kvs_coord *c, struct kvs_drain *d)
{
    for (size_t i = 0; i < c->n_drains; i++) {
        if (c->drains[i] == d) {
            c->drains[i] = c->drains[--c->n_drains];
            break;
        }
    }
    free(d->results);
    free(d);
}

static bool drain_step(kvs_coord *c, struct kvs_drain *d, int64_t now)
{
    (void)now;
    for (size_t i = 0; i < c->n_sessions; i++) {
        struct session_rec *s = &c->sessions[i];
        if (strcmp(s->worker, d->worker) != 0 || s->moving || tried(d, s->id)) {
            continue;
        }
        struct kvs_placement p;
        char err[400];
        int rc = kvs_coord_place(c, s->model, s->cells, s->prefix_hash, &p, err, sizeof err);
        struct kvs_move *m =
            move_new(c, MOVE_DRAIN, s->id, d->worker, rc == 0 ? c->workers[p.index].id : "");
        if (m == NULL) {
            return false;
        }
        if (rc < 0) {
            char why[SESSION_ERROR_MAX + 1];
            set_error(why, "no worker can take it: %s", err);
            drain_note(c, m, rc, why);
            move_free(c, m);
            return true; /* the next one */
        }
        /* Hold the budget on the new worker until the placement is recorded. */
        m->reserved = kvs_coord_cells_reserved(&c->workers[p.index], s->cells);
        c->workers[p.index].cells_placed += m->reserved;
        s->moving = true;
        d->busy = true;
        m->step = STEP_RELEASE;
        KVS_INFO("coordinator: drain of '%s': moving session '%s' to '%s'", d->worker, s->id,
                 m->to);
        send_step(c, m);
        return false;
    }
    drain_reply(c, d);
    drain_free(c, d);
    return false;
}

/* ---- the loop's side ---- */

void kvs_coord_moves_tick(kvs_coord *c, int64_t now)
{
    /* Requests not answered in time: sent again, then given up. */
    for (size_t k = 0; k < c->n_moves;) {
        struct kvs_move *m = c->moves[k];
        if (now - m->sent_ms <= c->o.move_timeout_ms) {
            k++;
            continue;
        }
        if (m->attempt < MOVE_ATTEMPTS) {
            KVS_WARN("coordinator: no answer from '%s' at %s to %s of '%s' in %d ms: sending it "
                     "again",
                     m->step == STEP_ADOPT || m->step == STEP_CHECK ? m->to : m->from, m->endpoint,
                     step_ops[m->step], m->session, c->o.move_timeout_ms);
            send_step(c, m);
            k = 0; /* the array may have changed */
            continue;
        }
        char why[SESSION_ERROR_MAX + 1];
        set_error(why, "no answer from %s to %s in %d attempts of %d ms", m->endpoint,
                  step_ops[m->step], MOVE_ATTEMPTS, c->o.move_timeout_ms);
        on_result(c, m, KVS_TIMEOUT, why, NULL);
        k = 0;
    }
    /* Restores of down workers' sessions, and restore orders to send again. */
    if (c->o.shared_data_dir) {
        for (size_t i = 0; i < c->n_sessions && c->n_moves < MOVES_MAX; i++) {
            struct session_rec *s = &c->sessions[i];
            if (s->moving || now < s->retry_ms) {
                continue;
            }
            const struct worker *w = kvs_coord_worker_find(c, s->worker);
            if (w == NULL) {
                continue;
            }
            if (w->down) {
                start_restore(c, i, now);
            } else if (s->from[0] != '\0' &&
                       kvs_coord_worker_state(c, w, now) != KVS_WORKER_UNHEALTHY) {
                resend_order(c, i);
            }
        }
    }
    /* Drains: one move at a time each. */
    for (size_t k = 0; k < c->n_drains && c->n_moves < MOVES_MAX;) {
        struct kvs_drain *d = c->drains[k];
        size_t before = c->n_drains;
        while (!d->busy && c->n_drains == before && drain_step(c, d, now)) {
        }
        k += c->n_drains == before ? 1 : 0; /* a finished drain was removed at k */
    }
}

size_t kvs_coord_moves_poll_items(kvs_coord *c, void *items, size_t max)
{
    zmq_pollitem_t *it = items;
    size_t n = 0;
    for (size_t k = 0; k < c->n_moves && n < max; k++) {
        if (c->moves[k]->sock != NULL) {
            it[n++] = (zmq_pollitem_t){c->moves[k]->sock, 0, ZMQ_POLLIN, 0};
        }
    }
    return n;
}

static bool key_is(const msgpack_object *k, const char *name)
{
    return k->type == MSGPACK_OBJECT_STR && k->via.str.size == strlen(name) &&
           memcmp(k->via.str.ptr, name, k->via.str.size) == 0;
}

/* An error map {code, status, message}: the status (a known range) and the message. */
static void parse_error(const msgpack_object *e, struct wreply *r)
{
    r->status = KVS_INTERNAL;
    snprintf(r->message, sizeof r->message, "an error without a message");
    for (uint32_t j = 0; j < e->via.map.size; j++) {
        const msgpack_object *k = &e->via.map.ptr[j].key, *v = &e->via.map.ptr[j].val;
        if (key_is(k, "status") && v->type == MSGPACK_OBJECT_NEGATIVE_INTEGER &&
            v->via.i64 >= -100) {
            r->status = (int)v->via.i64;
        } else if (key_is(k, "message") && v->type == MSGPACK_OBJECT_STR) {
            size_t len = v->via.str.size < SESSION_ERROR_MAX ? v->via.str.size : SESSION_ERROR_MAX;
            memcpy(r->message, v->via.str.ptr, len);
            r->message[len] = '\0';
            kvs_coord_ascii(r->message);
        }
    }
}

/* Read a worker's reply (validated like any outside input). */
static int parse_reply(const uint8_t *buf, size_t n, struct wreply *r, char *err, size_t errlen)
{
    memset(r, 0, sizeof *r);
    KVS_TRY(kvs_wire_prevalidate(buf, n, err, errlen));
    msgpack_unpacked up;
    msgpack_unpacked_init(&up);
    size_t off = 0;
    int rc = KVS_BAD_FORMAT;
    if (msgpack_unpack_next(&up, (const char *)buf, n, &off) == MSGPACK_UNPACK_SUCCESS &&
        up.data.type == MSGPACK_OBJECT_MAP) {
        rc = KVS_OK;
        const msgpack_object_map *map = &up.data.via.map;
        for (uint32_t i = 0; i < map->size; i++) {
            const msgpack_object *k = &map->ptr[i].key, *v = &map->ptr[i].val;
            bool uint = v->type == MSGPACK_OBJECT_POSITIVE_INTEGER;
            if (key_is(k, "id") && uint) {
                r->id = v->via.u64;
            } else if (key_is(k, "version") && uint) {
                r->version = v->via.u64;
            } else if (key_is(k, "appends") && uint) {
                r->appends = v->via.u64;
            } else if (key_is(k, "error") && v->type == MSGPACK_OBJECT_MAP) {
                parse_error(v, r);
            }
        }
        if (r->id == 0) {
            kvs_errf(err, errlen, "a reply without an id");
            rc = KVS_BAD_FORMAT;
        }
    } else {
        kvs_errf(err, errlen, "not a msgpack map");
    }
    msgpack_unpacked_destroy(&up);
    return rc;
}

/* Read what waits on m's socket; true when m was finished (freed) meanwhile. */
static bool read_replies(kvs_coord *c, struct kvs_move *m)
{
    for (int batch = 0; batch < 16; batch++) {
        zmq_msg_t parts[2];
        int n = 0;
        bool more = true;
        while (more) {
            zmq_msg_t f;
            zmq_msg_init(&f);
            if (zmq_msg_recv(&f, m->sock, n == 0 ? ZMQ_DONTWAIT : 0) < 0) {
                zmq_msg_close(&f);
                break;
            }
            more = zmq_msg_more(&f);
            if (n < 2) {
                parts[n] = f;
            } else {
                zmq_msg_close(&f);
            }
            n++;
        }
        if (n == 0) {
            return false;
        }
        struct wreply r;
        char err[256] = "";
        int prc = KVS_BAD_FORMAT;
        if (n == 2 && zmq_msg_size(&parts[0]) == 0) {
            prc =
                parse_reply(zmq_msg_data(&parts[1]), zmq_msg_size(&parts[1]), &r, err, sizeof err);
        }
        for (int i = 0; i < (n < 2 ? n : 2); i++) {
            zmq_msg_close(&parts[i]);
        }
        if (prc < 0) {
            KVS_WARN("coordinator: a reply from %s to %s that is not protocol (%s): ignored",
                     m->endpoint, step_ops[m->step], err[0] ? err : "bad frames");
            continue; /* the timeout decides */
        }
        if (r.id != m->rid) {
            continue; /* an answer to an earlier request of this socket */
        }
        on_result(c, m, r.status, r.message, &r);
        return true;
    }
    return false;
}

void kvs_coord_moves_on_replies(kvs_coord *c, const void *items, size_t n)
{
    const zmq_pollitem_t *it = items;
    for (size_t k = 0; k < n; k++) {
        if (!(it[k].revents & ZMQ_POLLIN)) {
            continue;
        }
        /* The move may have ended (and its socket closed) while an earlier one was handled. */
        for (size_t j = 0; j < c->n_moves; j++) {
            if (c->moves[j]->sock == it[k].socket) {
                read_replies(c, c->moves[j]);
                break;
            }
        }
    }
}

int kvs_coord_drain_start(kvs_coord *c, const char *worker, const void *ident, size_t ident_len,
                          uint64_t id, char *err, size_t errlen)
{
    struct worker *w = kvs_coord_worker_find(c, worker);
    if (w == NULL) {
        kvs_errf(err, errlen, "worker '%s' not found", worker);
        return KVS_NOT_FOUND;
    }
    if (!c->o.shared_data_dir) {
        kvs_errf(err, errlen,
                 "cannot drain '%s': sessions are moved by a restore from the workers' shared "
                 "data dir, and this coordinator runs without --shared-data-dir",
                 worker);
        return KVS_UNAVAILABLE;
    }
    if (w->down) {
        kvs_errf(err, errlen,
                 "worker '%s' is down: its sessions are restored on other workers by the failure "
                 "handling",
                 worker);
        return KVS_UNAVAILABLE;
    }
    if (drain_of(c, worker) != NULL) {
        kvs_errf(err, errlen, "a drain of '%s' is in progress", worker);
        return KVS_BUSY;
    }
    if (ident_len > sizeof((struct kvs_drain *)0)->ident) {
        return KVS_INVALID_ARGUMENT;
    }
    struct kvs_drain **ds = grow(c->drains, &c->cap_drains, c->n_drains + 1, sizeof *ds);
    struct kvs_drain *d = ds != NULL ? calloc(1, sizeof *d) : NULL;
    if (d == NULL) {
        return KVS_NO_MEMORY;
    }
    c->drains = ds;
    /* Draining, recorded: no new sessions from now on, also under another leader. */
    enum kvs_worker_state before = w->admin_state;
    w->admin_state = KVS_WORKER_DRAINING;
    char key[512];
    kvs_coord_worker_key(c, w->id, key, sizeof key);
    char *json = kvs_coord_worker_json(w);
    int rc = json ? kvs_coord_put(c, key, json, w->lease, err, errlen) : KVS_NO_MEMORY;
    free(json);
    if (rc < 0) {
        w->admin_state = before;
        free(d);
        return rc;
    }
    snprintf(d->worker, sizeof d->worker, "%s", worker);
    memcpy(d->ident, ident, ident_len);
    d->ident_len = ident_len;
    d->id = id;
    c->drains[c->n_drains++] = d;
    KVS_INFO("coordinator: draining worker '%s' (%lld sessions)", worker, (long long)w->n_sessions);
    kvs_coord_moves_tick(c, now_ms()); /* the first move now */
    return KVS_OK;
}

void kvs_coord_moves_clear(kvs_coord *c, int status, const char *reason)
{
    while (c->n_moves > 0) {
        struct kvs_move *m = c->moves[c->n_moves - 1];
        struct session_rec *s = session_of(c, m->session, NULL);
        if (s != NULL) {
            s->moving = false;
        }
        if (m->reserved > 0) {
            struct worker *to = kvs_coord_worker_find(c, m->to);
            if (to != NULL) {
                to->cells_placed -= m->reserved;
            }
        }
        move_free(c, m);
    }
    while (c->n_drains > 0) {
        struct kvs_drain *d = c->drains[c->n_drains - 1];
        kvs_wire_encode_error(&c->out, d->id, status, reason, -1);
        kvs_coord_send(c, d->ident, d->ident_len, c->out.sb.data, c->out.sb.size);
        drain_free(c, d);
    }
    free(c->moves);
    free(c->drains);
    c->moves = NULL;
    c->drains = NULL;
    c->cap_moves = c->cap_drains = 0;
}
