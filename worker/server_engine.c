/* kvs-worker's engine thread: sessions and the scheduler behind the wire protocol; see
 * worker/server.h (the threads and their messages) and docs/PROTOCOL.md. */
#include "worker/server_impl.h"

#include "common/log.h"
#include "common/status.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- engine thread: replies and publications -------------------------------------------- */

static void eng_send(kvs_server *srv, const uint8_t *ident, size_t ident_len, const kvs_wire_buf *b,
                     bool final)
{
    uint8_t kind = MSG_REPLY, f = final ? 1 : 0;
    const void *d[4] = {&kind, ident, b->sb.data, &f};
    size_t l[4] = {1, ident_len, b->sb.size, 1};
    kvs_srv_send_frames(srv->pair_eng, d, l, 4);
}

static void req_send(struct req *r, const kvs_wire_buf *b, bool final)
{
    eng_send(r->srv, r->ident, r->ident_len, b, final);
}

/* An error reply to r (streamed requests get seq and done). */
static void req_error(struct req *r, int status, const char *msg)
{
    kvs_wire_encode_error(&r->srv->eout, r->id, status, msg, r->stream ? r->seq : -1);
    req_send(r, &r->srv->eout, true);
}

static void publish_version(kvs_server *srv, struct sstate *ss)
{
    struct kvs_session_info in;
    kvs_session_info(ss->s, &in);
    if (in.version == ss->published && ss->published != 0) {
        return;
    }
    ss->published = in.version;
    uint8_t kind = MSG_VERSION;
    const char *id = kvs_session_id(ss->s);
    const void *d[3] = {&kind, id, &in.version};
    size_t l[3] = {1, strlen(id), sizeof in.version};
    kvs_srv_send_frames(srv->pair_eng, d, l, 3);
}

/* The result keys of an answer (7 pairs): answer, tokens, version, context_tokens,
 * question_tokens, ttft_ms, total_ms. */
#define ANSWER_KEYS 7
static void pack_answer_keys(msgpack_packer *pk, const struct kvs_answer *a)
{
    pack_key(pk, "answer"), kvs_wire_pack_str(pk, a->text ? a->text : "", a->len);
    pack_key(pk, "tokens"), msgpack_pack_array(pk, (size_t)a->n_tokens);
    for (int32_t i = 0; i < a->n_tokens; i++) {
        msgpack_pack_int32(pk, a->tokens[i]);
    }
    pack_key(pk, "version"), msgpack_pack_uint64(pk, a->version);
    pack_key(pk, "context_tokens"), msgpack_pack_int64(pk, a->context_tokens);
    pack_key(pk, "question_tokens"), msgpack_pack_int32(pk, a->question_tokens);
    pack_key(pk, "ttft_ms"), msgpack_pack_double(pk, a->ttft_s * 1e3);
    pack_key(pk, "total_ms"), msgpack_pack_double(pk, a->total_s * 1e3);
}

/* kvs_flash_watch callback: every new flash answer of every session goes to the I/O
 * thread's cache (and from there to the watchers). */
static void on_flash(kvs_session *s, const char *name, const struct kvs_answer *a, void *user)
{
    kvs_server *srv = user;
    kvs_wire_buf *b = &srv->eout;
    kvs_wire_buf_clear(b);
    pack_answer_keys(&b->pk, a);
    uint8_t kind = MSG_FLASH;
    uint32_t n_keys = ANSWER_KEYS;
    const char *id = kvs_session_id(s);
    const void *d[6] = {&kind, id, name, &a->version, &n_keys, b->sb.data};
    size_t l[6] = {1, strlen(id), strlen(name), sizeof a->version, sizeof n_keys, b->sb.size};
    kvs_srv_send_frames(srv->pair_eng, d, l, 6);
}

static void publish_simple(kvs_server *srv, uint8_t kind, const char *session, const char *name)
{
    const void *d[3] = {&kind, session, name};
    size_t l[3] = {1, strlen(session), name ? strlen(name) : 0};
    kvs_srv_send_frames(srv->pair_eng, d, l, name ? 3 : 2);
}

/* ---- engine thread: session states ------------------------------------------------------ */

static struct sstate *ss_find(kvs_server *srv, const kvs_session *s)
{
    for (int32_t i = 0; i < srv->n_ss; i++) {
        if (srv->ss[i]->s == s) {
            return srv->ss[i];
        }
    }
    return NULL;
}

/* The state of s, made on first use (and the session's flash answers then published). */
static struct sstate *ss_get(kvs_server *srv, kvs_session *s)
{
    struct sstate *ss = ss_find(srv, s);
    if (ss != NULL) {
        return ss;
    }
    if (srv->n_ss == srv->cap_ss) {
        int32_t cap = srv->cap_ss ? 2 * srv->cap_ss : 16;
        struct sstate **v = realloc(srv->ss, (size_t)cap * sizeof *v);
        if (v == NULL) {
            return NULL;
        }
        srv->ss = v;
        srv->cap_ss = cap;
    }
    ss = calloc(1, sizeof *ss);
    if (ss == NULL) {
        return NULL;
    }
    ss->s = s;
    srv->ss[srv->n_ss++] = ss;
    kvs_flash_watch(s, on_flash, srv);
    publish_version(srv, ss);
    return ss;
}

static void ss_remove(kvs_server *srv, struct sstate *ss)
{
    for (int32_t i = 0; i < srv->n_ss; i++) {
        if (srv->ss[i] == ss) {
            srv->ss[i] = srv->ss[--srv->n_ss];
            break;
        }
    }
    free(ss);
}

/* True when nothing of the scheduler writes into the session's context. */
static bool ss_settled(const kvs_server *srv, const struct sstate *ss)
{
    return ss->appends == 0 && (!ss->unsettled || !kvs_sched_busy(srv->sc));
}

/* ---- engine thread: requests ------------------------------------------------------------ */

/* session.close and session.release wait for an idle scheduler (queued flash evaluations
 * reference the session) and hold every request received after them meanwhile. */
static bool is_barrier(enum kvs_wire_op op)
{
    return op == KVS_OP_SESSION_CLOSE || op == KVS_OP_SESSION_RELEASE;
}

/* Sessions released to another worker (session.release), remembered so that requests for
 * them are answered MOVED rather than NOT_FOUND: the last RELEASED_MAX of them. */
static bool released_has(const kvs_server *srv, const char *id)
{
    for (int32_t i = 0; i < srv->n_released; i++) {
        if (strcmp(srv->released[i], id) == 0) {
            return true;
        }
    }
    return false;
}

static void released_remove(kvs_server *srv, const char *id)
{
    for (int32_t i = 0; i < srv->n_released; i++) {
        if (strcmp(srv->released[i], id) == 0) {
            srv->released[i][0] = '\0'; /* an empty id matches no session */
        }
    }
}

static void released_add(kvs_server *srv, const char *id)
{
    if (srv->released == NULL) {
        srv->released = calloc(RELEASED_MAX, sizeof *srv->released);
        if (srv->released == NULL) {
            return; /* later requests get NOT_FOUND instead of MOVED: still correct */
        }
    }
    snprintf(srv->released[srv->released_next], sizeof srv->released[0], "%s", id);
    srv->released_next = (srv->released_next + 1) % RELEASED_MAX;
    if (srv->n_released < RELEASED_MAX) {
        srv->n_released++;
    }
}

static struct req *req_new(kvs_server *srv, const uint8_t *ident, size_t ident_len,
                           const struct kvs_wire_request *rq, double t_recv)
{
    struct req *r = calloc(1, sizeof *r);
    if (r == NULL) {
        return NULL;
    }
    r->srv = srv;
    memcpy(r->ident, ident, ident_len);
    r->ident_len = ident_len;
    r->id = rq->id;
    r->op = rq->op;
    r->stream = rq->stream && rq->op == KVS_OP_QUERY;
    r->t_recv = t_recv;
    r->deadline = rq->deadline_ms > 0 ? t_recv + rq->deadline_ms / 1e3 : 0;
    if (rq->session != NULL) {
        snprintf(r->session, sizeof r->session, "%s", rq->session);
    }
    r->next = srv->live.next;
    r->prev = &srv->live;
    srv->live.next->prev = r;
    srv->live.next = r;
    return r;
}

static void req_free(struct req *r)
{
    r->prev->next = r->next;
    r->next->prev = r->prev;
    if (r->deferred) {
        r->srv->n_deferred--;
        if (is_barrier(r->op)) {
            r->srv->closes_waiting--;
        }
    }
    free(r->payload);
    free(r);
}

static void begin_reply(kvs_server *srv, uint64_t id, size_t n_more)
{
    kvs_wire_buf_clear(&srv->eout);
    msgpack_pack_map(&srv->eout.pk, 1 + n_more);
    pack_key(&srv->eout.pk, "id"), msgpack_pack_uint64(&srv->eout.pk, id);
}

/* The status a scheduler callback reports: the server's own reason when it cancelled. */
static int cb_status(struct req *r, int status, const char **err)
{
    if (status == KVS_CANCELLED && r->fail_status != 0) {
        *err = r->fail_msg;
        return r->fail_status;
    }
    return status;
}

static void on_append(int status, const struct kvs_append_result *ar, const char *err, void *user)
{
    struct req *r = user;
    kvs_server *srv = r->srv;
    struct sstate *ss = r->ss;
    ss->appends--;
    if (status == 0) {
        publish_version(srv, ss); /* before the ack: a client that has it finds the cache there */
        begin_reply(srv, r->id, 5);
        msgpack_packer *pk = &srv->eout.pk;
        pack_key(pk, "version"), msgpack_pack_uint64(pk, ar->version);
        pack_key(pk, "cells"), msgpack_pack_int64(pk, ar->cells);
        pack_key(pk, "n_tokens"), msgpack_pack_int32(pk, ar->n_tokens);
        pack_key(pk, "evicted"), msgpack_pack_int32(pk, ar->evicted);
        pack_key(pk, "duplicate"), pack_bool(pk, ar->duplicate);
        req_send(r, &srv->eout, true);
    } else {
        if (status == KVS_CANCELLED) {
            ss->unsettled = true; /* it may have been logged, and then it still runs */
        }
        status = cb_status(r, status, &err);
        req_error(r, status, err != NULL ? err : kvs_status_message(status));
    }
    req_free(r);
}

static bool on_query_token(int32_t token, const char *text, size_t len, void *user)
{
    struct req *r = user;
    if (!r->stream) {
        return true;
    }
    kvs_wire_buf *b = &r->srv->eout;
    kvs_wire_buf_clear(b);
    msgpack_pack_map(&b->pk, token >= 0 ? 4 : 3);
    pack_key(&b->pk, "id"), msgpack_pack_uint64(&b->pk, r->id);
    pack_key(&b->pk, "seq"), msgpack_pack_int64(&b->pk, r->seq++);
    if (token >= 0) {
        pack_key(&b->pk, "token"), msgpack_pack_int32(&b->pk, token);
    }
    pack_key(&b->pk, "text"), kvs_wire_pack_str(&b->pk, text, len);
    req_send(r, b, false);
    return true;
}

/* Reply with an answer: {id, [seq, done,] result keys, [fresh]}. */
static void send_answer(kvs_server *srv, const uint8_t *ident, size_t ident_len, uint64_t id,
                        int64_t seq, const struct kvs_answer *a, bool with_fresh)
{
    kvs_wire_buf *b = &srv->eout;
    kvs_wire_buf_clear(b);
    msgpack_packer *pk = &b->pk;
    msgpack_pack_map(pk, 1 + ANSWER_KEYS + (seq >= 0 ? 2 : 0) + (with_fresh ? 1 : 0));
    pack_key(pk, "id"), msgpack_pack_uint64(pk, id);
    if (seq >= 0) {
        pack_key(pk, "seq"), msgpack_pack_int64(pk, seq);
        pack_key(pk, "done"), msgpack_pack_true(pk);
    }
    pack_answer_keys(pk, a);
    if (with_fresh) {
        pack_key(pk, "fresh"), pack_bool(pk, a->fresh);
    }
    eng_send(srv, ident, ident_len, b, true);
}

static void on_query_done(int status, struct kvs_answer *a, const char *err, void *user)
{
    struct req *r = user;
    kvs_server *srv = r->srv;
    if (status == 0) {
        send_answer(srv, r->ident, r->ident_len, r->id, r->stream ? r->seq : -1, a, false);
    } else {
        status = cb_status(r, status, &err);
        req_error(r, status, err != NULL ? err : kvs_status_message(status));
    }
    if (a != NULL) {
        kvs_answer_free(a);
        free(a);
    }
    req_free(r);
}

/* Cancel r (scheduled or deferred) with status: its requester gets the error. */
static void req_cancel(struct req *r, int status, const char *why)
{
    if (r->scheduled) {
        r->fail_status = status;
        snprintf(r->fail_msg, sizeof r->fail_msg, "%s", why);
        if (kvs_sched_cancel(r->srv->sc, r) > 0) {
            return; /* the callback answered and freed r */
        }
        KVS_ERROR("server: request %llu was not in the scheduler", (unsigned long long)r->id);
    }
    req_error(r, status, why);
    req_free(r);
}

static int query_opts(const struct kvs_wire_request *rq, struct kvs_query_opts *qo, char *err,
                      size_t errlen)
{
    memset(qo, 0, sizeof *qo);
    qo->sampling = kvs_sampling_default();
    qo->sampling.temperature = (float)rq->temperature;
    qo->sampling.top_k = (int32_t)rq->top_k;
    qo->sampling.top_p = (float)rq->top_p;
    qo->sampling.min_p = (float)rq->min_p;
    qo->sampling.repeat_penalty = (float)rq->repeat_penalty;
    qo->sampling.seed = rq->seed;
    qo->max_tokens = rq->max_tokens > 0 ? rq->max_tokens : 64;
    qo->stops = rq->stops;
    qo->n_stops = rq->n_stops;
    qo->stateless = rq->stateless;
    return kvs_sampling_validate(&qo->sampling, err, errlen) < 0 ? KVS_INVALID_ARGUMENT : 0;
}

static void pack_info(msgpack_packer *pk, const kvs_session *s)
{
    struct kvs_session_info in;
    kvs_session_info(s, &in);
    pack_key(pk, "session"), kvs_wire_pack_cstr(pk, kvs_session_id(s));
    pack_key(pk, "version"), msgpack_pack_uint64(pk, in.version);
    pack_key(pk, "appends"), msgpack_pack_uint64(pk, in.appends);
    pack_key(pk, "prefix_tokens"), msgpack_pack_int64(pk, in.prefix_tokens);
    pack_key(pk, "data_tokens"), msgpack_pack_int64(pk, in.data_tokens);
    pack_key(pk, "cells_used"), msgpack_pack_int64(pk, in.cells_used);
    pack_key(pk, "cells_budget"), msgpack_pack_int64(pk, in.cells_budget);
    pack_key(pk, "evicted_tokens"), msgpack_pack_int64(pk, in.evicted_tokens);
    pack_key(pk, "flash_queries"), msgpack_pack_int32(pk, in.flash_queries);
    pack_key(pk, "format"), kvs_wire_pack_cstr(pk, kvs_session_format_name(in.format));
    pack_key(pk, "policy"), kvs_wire_pack_cstr(pk, kvs_context_policy_name(in.policy));
}
#define INFO_KEYS 11

static void pack_classes(msgpack_packer *pk, const char *key, const uint64_t *v64,
                         const int32_t *v32)
{
    static const char *const names[KVS_N_CLASSES] = {"decode", "question", "append", "flash"};
    pack_key(pk, key), msgpack_pack_map(pk, KVS_N_CLASSES);
    for (int c = 0; c < KVS_N_CLASSES; c++) {
        pack_key(pk, names[c]);
        if (v64 != NULL) {
            msgpack_pack_uint64(pk, v64[c]);
        } else {
            msgpack_pack_int32(pk, v32[c]);
        }
    }
}

static void eng_status(kvs_server *srv, struct req *r)
{
    msgpack_packer *pk = &srv->eout.pk;
    const struct kvs_hparams *hp = &srv->e->model->hp;
    const struct kvs_sched_stats *st = kvs_sched_stats(srv->sc);
    uint64_t hits = 0, misses = 0;
    for (int32_t i = 0; i < kvs_sessions_count(srv->S); i++) {
        struct kvs_flash_stats fs;
        kvs_flash_stats(kvs_sessions_at(srv->S, i), &fs);
        hits += fs.hits;
        misses += fs.misses;
    }
    uint64_t io_hits = atomic_load(&srv->io_flash_hits);
    begin_reply(srv, r->id, 11);
    pack_key(pk, "model"), msgpack_pack_map(pk, 5);
    pack_key(pk, "sha256"), kvs_wire_pack_cstr(pk, srv->model_sha256);
    pack_key(pk, "path"), kvs_wire_pack_cstr(pk, srv->e->model->path);
    pack_key(pk, "n_ctx"), msgpack_pack_int64(pk, srv->e->n_ctx);
    pack_key(pk, "n_vocab"), msgpack_pack_uint32(pk, hp->n_vocab);
    pack_key(pk, "n_layer"), msgpack_pack_uint32(pk, hp->n_layer);
    pack_key(pk, "capacity"), msgpack_pack_map(pk, 3);
    pack_key(pk, "cells_total"), msgpack_pack_int64(pk, kvs_pool_capacity_cells(srv->e->pool));
    pack_key(pk, "cells_free"), msgpack_pack_int64(pk, kvs_sessions_cells_free(srv->S));
    pack_key(pk, "block_size"), msgpack_pack_int32(pk, kvs_pool_block_size(srv->e->pool));
    pack_key(pk, "sessions"), msgpack_pack_int32(pk, kvs_sessions_count(srv->S));
    pack_key(pk, "protocol"), msgpack_pack_int(pk, KVS_WIRE_VERSION);
    pack_key(pk, "protocol_minor"), msgpack_pack_int(pk, KVS_WIRE_MINOR);
    pack_key(pk, "queue"), msgpack_pack_map(pk, 3);
    pack_key(pk, "max"), msgpack_pack_int32(pk, srv->queue_max);
    pack_key(pk, "in_flight"), msgpack_pack_int32(pk, atomic_load(&srv->io_in_flight));
    pack_key(pk, "deferred"), msgpack_pack_int32(pk, srv->n_deferred);
    pack_key(pk, "watchers"), msgpack_pack_int32(pk, atomic_load(&srv->io_watchers));
    pack_key(pk, "watchers_dropped");
    msgpack_pack_uint64(pk, atomic_load(&srv->io_watchers_dropped));
    pack_key(pk, "scheduler"), msgpack_pack_map(pk, 20);
    pack_key(pk, "steps"), msgpack_pack_uint64(pk, st->steps);
    pack_classes(pk, "rows", st->rows, NULL);
    pack_classes(pk, "last_rows", NULL, st->last_rows);
    pack_classes(pk, "queued", NULL, st->queued);
    pack_key(pk, "occupancy"), msgpack_pack_double(pk, st->last_occupancy);
    pack_key(pk, "step_ms"), msgpack_pack_double(pk, st->last_step_s * 1e3);
    pack_key(pk, "max_step_ms"), msgpack_pack_double(pk, st->max_step_s * 1e3);
    pack_key(pk, "target_step_ms"), msgpack_pack_double(pk, st->target_step_s * 1e3);
    pack_key(pk, "step_rows"), msgpack_pack_int32(pk, st->step_rows);
    pack_key(pk, "max_batch_tokens"), msgpack_pack_int32(pk, srv->sched_opts.max_batch_tokens);
    pack_key(pk, "last_n_seqs"), msgpack_pack_int32(pk, st->last_n_seqs);
    pack_key(pk, "max_n_seqs"), msgpack_pack_int32(pk, st->max_n_seqs);
    pack_key(pk, "completed"), msgpack_pack_uint64(pk, st->completed);
    pack_key(pk, "expired"), msgpack_pack_uint64(pk, st->expired);
    pack_key(pk, "refused"), msgpack_pack_uint64(pk, st->refused);
    pack_key(pk, "refused_busy"), msgpack_pack_uint64(pk, st->refused_busy);
    pack_key(pk, "admission_refused"), msgpack_pack_uint64(pk, st->admission_refused);
    pack_key(pk, "cancelled"), msgpack_pack_uint64(pk, st->cancelled);
    pack_key(pk, "append_waits"), msgpack_pack_uint64(pk, st->append_waits);
    pack_key(pk, "append_capacity"), msgpack_pack_uint64(pk, st->append_capacity);
    pack_key(pk, "cells"), msgpack_pack_map(pk, 8);
    pack_key(pk, "total"), msgpack_pack_int64(pk, kvs_pool_capacity_cells(srv->e->pool));
    pack_key(pk, "used"), msgpack_pack_int64(pk, st->cells_used);
    pack_key(pk, "reserved"), msgpack_pack_int64(pk, st->cells_reserved);
    pack_key(pk, "free"), msgpack_pack_int64(pk, kvs_sessions_cells_free(srv->S));
    pack_key(pk, "prefix_hit"), msgpack_pack_uint64(pk, st->prefix_hit_cells);
    pack_key(pk, "prefix_cached"), msgpack_pack_int64(pk, st->prefix_cached_cells);
    pack_key(pk, "prefix_saved_ms"), msgpack_pack_double(pk, st->prefix_saved_s * 1e3);
    pack_key(pk, "reclaimed"), msgpack_pack_uint64(pk, st->reclaimed_cells);
    pack_key(pk, "flash"), msgpack_pack_map(pk, 6);
    pack_key(pk, "evaluations"), msgpack_pack_uint64(pk, st->flash_evals);
    pack_key(pk, "wasted"), msgpack_pack_uint64(pk, st->flash_wasted);
    pack_key(pk, "hits"), msgpack_pack_uint64(pk, hits + io_hits);
    pack_key(pk, "misses"), msgpack_pack_uint64(pk, misses);
    pack_key(pk, "io_hits"), msgpack_pack_uint64(pk, io_hits);
    pack_key(pk, "cancelled"), msgpack_pack_uint64(pk, st->flash_cancelled);
    req_send(r, &srv->eout, true);
}

/* session.dump: the recorded ids and the data decoded, in one frame at most. */
static int eng_dump(kvs_server *srv, struct req *r, kvs_session *s, char *err, size_t errlen)
{
    int64_t n = 0;
    const int32_t *ids = kvs_session_tokens(s, &n);
    struct kvs_session_info in;
    kvs_session_info(s, &in);
    size_t ids_bytes = (size_t)n * 5 + 256; /* msgpack: at most 5 bytes an id, plus the keys */
    char *text = ids_bytes < KVS_WIRE_MAX_FRAME ? malloc(KVS_WIRE_MAX_FRAME - ids_bytes) : NULL;
    size_t len = 0;
    int rc = ids_bytes >= KVS_WIRE_MAX_FRAME ? KVS_TOO_LARGE : text == NULL ? KVS_NO_MEMORY : 0;
    if (rc == 0) {
        rc = kvs_tokenizer_decode(srv->e->tok, ids + in.prefix_tokens,
                                  (size_t)(n - in.prefix_tokens), false, text,
                                  KVS_WIRE_MAX_FRAME - ids_bytes, &len);
    }
    if (rc < 0) {
        free(text);
        snprintf(err, errlen, "session '%s' (%lld tokens) cannot be dumped in one frame: %s",
                 kvs_session_id(s), (long long)n, kvs_status_message(rc));
        return rc;
    }
    msgpack_packer *pk = &srv->eout.pk;
    begin_reply(srv, r->id, 5);
    pack_key(pk, "session"), kvs_wire_pack_cstr(pk, kvs_session_id(s));
    pack_key(pk, "version"), msgpack_pack_uint64(pk, in.version);
    pack_key(pk, "prefix_tokens"), msgpack_pack_int64(pk, in.prefix_tokens);
    pack_key(pk, "tokens"), msgpack_pack_array(pk, (size_t)n);
    for (int64_t i = 0; i < n; i++) {
        msgpack_pack_int32(pk, ids[i]);
    }
    pack_key(pk, "text"), kvs_wire_pack_str(pk, text, len);
    free(text);
    req_send(r, &srv->eout, true);
    return KVS_OK;
}

/* session.adopt: restore one session from the data dir (its worker went down). */
static int eng_adopt(kvs_server *srv, struct req *r, const struct kvs_wire_request *rq, char *err,
                     size_t errlen)
{
    char from[4096];
    const char *from_dir = NULL;
    if (srv->data_dir == NULL) {
        snprintf(err, errlen, "this worker has no --data-dir: it cannot adopt sessions");
        return KVS_UNSUPPORTED;
    }
    if (rq->from != NULL) {
        if (srv->data_root == NULL) {
            snprintf(err, errlen, "field 'from': this worker has no shared data root (it runs "
                     "without --coordinator): adopt only from its own data dir");
            return KVS_UNSUPPORTED;
        }
        if ((size_t)snprintf(from, sizeof from, "%s/%s", srv->data_root, rq->from) >=
            sizeof from) {
            snprintf(err, errlen, "field 'from': path too long");
            return KVS_INVALID_ARGUMENT;
        }
        from_dir = from;
    }
    KVS_TRY(kvs_session_adopt(srv->S, from_dir, rq->session, err, errlen));
    kvs_session *s = kvs_session_find(srv->S, rq->session);
    if (s == NULL || ss_get(srv, s) == NULL) {
        snprintf(err, errlen, "session '%s' adopted but not found after", rq->session);
        return KVS_INTERNAL;
    }
    struct kvs_session_info in;
    kvs_session_info(s, &in);
    msgpack_packer *pk = &srv->eout.pk;
    begin_reply(srv, r->id, 5);
    pack_key(pk, "session"), kvs_wire_pack_cstr(pk, rq->session);
    pack_key(pk, "version"), msgpack_pack_uint64(pk, in.version);
    pack_key(pk, "appends"), msgpack_pack_uint64(pk, in.appends);
    pack_key(pk, "cells"), msgpack_pack_int64(pk, in.cells_used);
    pack_key(pk, "cells_budget"), msgpack_pack_int64(pk, in.cells_budget);
    req_send(r, &srv->eout, true);
    return KVS_OK;
}

/* Does rq need its session settled (no append of it in progress)? */
static bool needs_settled(const struct kvs_wire_request *rq)
{
    switch (rq->op) {
    case KVS_OP_SESSION_CLOSE:
    case KVS_OP_SESSION_RELEASE:
    case KVS_OP_SESSION_SNAPSHOT:
    case KVS_OP_SESSION_DUMP:
    case KVS_OP_FLASH_REGISTER:
    case KVS_OP_FLASH_GET:
        return true;
    case KVS_OP_QUERY:
        return rq->stateless;
    case KVS_OP_SESSION_APPEND:
        return rq->has_tokens;
    default:
        return false;
    }
}

/* Run rq now (r is its live record). Every path answers r once (now, or later from a
 * scheduler callback) and frees it unless it became a scheduler job. */
static void eng_execute(kvs_server *srv, struct req *r, const struct kvs_wire_request *rq)
{
    char err[512] = "";
    int rc = 0;
    msgpack_packer *pk = &srv->eout.pk;
    kvs_session *s = NULL;
    struct sstate *ss = NULL;
    if (r->deadline > 0 && kvs_now() > r->deadline) {
        req_error(r, KVS_TIMEOUT, "deadline exceeded before the request ran");
        req_free(r);
        return;
    }
    if (rq->session != NULL && rq->op != KVS_OP_SESSION_CREATE &&
        rq->op != KVS_OP_SESSION_ADOPT) {
        s = kvs_session_find(srv->S, rq->session);
        ss = s != NULL ? ss_get(srv, s) : NULL;
        if (ss == NULL) {
            /* a resent release finds it gone: NOT_FOUND, which its sender counts as done */
            bool moved = rq->op != KVS_OP_SESSION_RELEASE && released_has(srv, rq->session);
            snprintf(err, sizeof err,
                     moved ? "session '%s' was released to another worker: locate it again"
                           : "session '%s' not found",
                     rq->session);
            req_error(r, moved ? KVS_MOVED : KVS_NOT_FOUND, err);
            req_free(r);
            return;
        }
    }
    switch (rq->op) {
    case KVS_OP_STATUS:
        eng_status(srv, r);
        break;
    case KVS_OP_SESSION_CREATE: {
        struct kvs_session_opts so = {0};
        so.budget_cells = (int64_t)rq->cells;
        so.query_reserve = (int32_t)rq->query_reserve;
        so.prefix = rq->prefix;
        so.prefix_len = rq->prefix_len;
        so.format = rq->format != NULL && strcmp(rq->format, "chat") == 0 ? KVS_FORMAT_CHAT
                                                                          : KVS_FORMAT_RAW;
        so.policy = rq->policy != NULL && strcmp(rq->policy, "slide") == 0 ? KVS_POLICY_SLIDE
                                                                           : KVS_POLICY_REJECT;
        rc = kvs_session_create(srv->S, rq->session, &so, &s, err, sizeof err);
        if (rc < 0) {
            break;
        }
        ss_get(srv, s); /* watch and publish its version before the reply */
        released_remove(srv, rq->session);
        struct kvs_session_info in;
        kvs_session_info(s, &in);
        begin_reply(srv, rq->id, 4);
        pack_key(pk, "session"), kvs_wire_pack_cstr(pk, rq->session);
        pack_key(pk, "version"), msgpack_pack_uint64(pk, in.version);
        pack_key(pk, "cells"), msgpack_pack_int64(pk, in.cells_used);
        pack_key(pk, "cells_budget"), msgpack_pack_int64(pk, in.cells_budget);
        req_send(r, &srv->eout, true);
        break;
    }
    case KVS_OP_SESSION_ADOPT:
        rc = eng_adopt(srv, r, rq, err, sizeof err);
        if (rc == 0) {
            released_remove(srv, rq->session);
        }
        break;
    case KVS_OP_SESSION_RELEASE: {
        struct kvs_session_info in;
        rc = kvs_session_release(srv->S, rq->session, &in, err, sizeof err);
        if (rc < 0) {
            break;
        }
        ss_remove(srv, ss);
        /* its watches end MOVED, as later requests for it are answered (§5) */
        publish_simple(srv, MSG_CLOSED, rq->session, "released");
        released_add(srv, rq->session);
        begin_reply(srv, rq->id, 4);
        pack_key(pk, "session"), kvs_wire_pack_cstr(pk, rq->session);
        pack_key(pk, "released"), msgpack_pack_true(pk);
        pack_key(pk, "version"), msgpack_pack_uint64(pk, in.version);
        pack_key(pk, "appends"), msgpack_pack_uint64(pk, in.appends);
        req_send(r, &srv->eout, true);
        break;
    }
    case KVS_OP_SESSION_APPEND: {
        if (!rq->has_tokens) {
            r->ss = ss;
            rc = kvs_sched_append(srv->sc, s, rq->text, rq->text_len, rq->client_id, rq->client_seq,
                                  r->deadline, on_append, r);
            if (rc < 0) {
                snprintf(err, sizeof err, "cannot queue the append: %s", kvs_status_message(rc));
                break;
            }
            r->scheduled = true;
            ss->appends++;
            return;
        }
        /* raw ids: synchronously, the session being settled */
        struct kvs_append_result ar = {0};
        uint32_t n_vocab = srv->e->model->hp.n_vocab;
        for (int32_t i = 0; i < rq->n_tokens && rc == 0; i++) {
            if ((uint32_t)rq->tokens[i] >= n_vocab) {
                snprintf(err, sizeof err, "field 'tokens': id %d at %d is not < n_vocab %u",
                         rq->tokens[i], i, n_vocab);
                rc = KVS_INVALID_ARGUMENT;
            }
        }
        if (rc == 0) {
            rc = kvs_session_append_tokens(s, rq->tokens, rq->n_tokens, rq->client_id,
                                           rq->client_seq, &ar, err, sizeof err);
        }
        if (rc < 0) {
            break;
        }
        publish_version(srv, ss);
        begin_reply(srv, rq->id, 5);
        pack_key(pk, "version"), msgpack_pack_uint64(pk, ar.version);
        pack_key(pk, "cells"), msgpack_pack_int64(pk, ar.cells);
        pack_key(pk, "n_tokens"), msgpack_pack_int32(pk, ar.n_tokens);
        pack_key(pk, "evicted"), msgpack_pack_int32(pk, ar.evicted);
        pack_key(pk, "duplicate"), pack_bool(pk, ar.duplicate);
        req_send(r, &srv->eout, true);
        break;
    }
    case KVS_OP_SESSION_INFO:
        begin_reply(srv, rq->id, INFO_KEYS);
        pack_info(pk, s);
        req_send(r, &srv->eout, true);
        break;
    case KVS_OP_SESSION_CLOSE:
        rc = kvs_session_close(srv->S, rq->session);
        if (rc < 0) {
            snprintf(err, sizeof err, "session '%s' not found", rq->session);
            break;
        }
        ss_remove(srv, ss);
        publish_simple(srv, MSG_CLOSED, rq->session, NULL);
        begin_reply(srv, rq->id, 1);
        pack_key(pk, "closed"), msgpack_pack_true(pk);
        req_send(r, &srv->eout, true);
        break;
    case KVS_OP_SESSION_LIST: {
        int32_t n = kvs_sessions_count(srv->S);
        int32_t shown = n > 65536 ? 65536 : n;
        begin_reply(srv, rq->id, 2);
        pack_key(pk, "sessions"), msgpack_pack_array(pk, (size_t)shown);
        for (int32_t i = 0; i < shown; i++) {
            kvs_wire_pack_cstr(pk, kvs_session_id(kvs_sessions_at(srv->S, i)));
        }
        pack_key(pk, "truncated"), pack_bool(pk, shown < n);
        req_send(r, &srv->eout, true);
        break;
    }
    case KVS_OP_SESSION_SNAPSHOT:
        rc = kvs_session_snapshot(s, rq->compact, err, sizeof err);
        if (rc < 0) {
            break;
        }
        begin_reply(srv, rq->id, 1);
        pack_key(pk, "snapshot"), msgpack_pack_true(pk);
        req_send(r, &srv->eout, true);
        break;
    case KVS_OP_SESSION_DUMP:
        rc = eng_dump(srv, r, s, err, sizeof err);
        break;
    case KVS_OP_QUERY: {
        struct kvs_query_opts qo;
        rc = query_opts(rq, &qo, err, sizeof err);
        if (rc < 0) {
            break;
        }
        if (!rq->stateless) {
            r->ss = ss;
            rc = kvs_sched_query(srv->sc, s, rq->question, rq->question_len, &qo, r->deadline,
                                 on_query_token, on_query_done, r, err, sizeof err);
            if (rc < 0) {
                break;
            }
            r->scheduled = true;
            return;
        }
        /* the baseline: synchronously on the engine thread, the session being settled */
        struct kvs_answer a = {0};
        rc = kvs_session_query(s, rq->question, rq->question_len, &qo, on_query_token, r, &a, err,
                               sizeof err);
        if (rc < 0) {
            kvs_answer_free(&a);
            break;
        }
        send_answer(srv, r->ident, r->ident_len, rq->id, r->stream ? r->seq : -1, &a, false);
        kvs_answer_free(&a);
        break;
    }
    case KVS_OP_FLASH_REGISTER: {
        struct kvs_query_opts qo;
        rc = query_opts(rq, &qo, err, sizeof err);
        if (rc < 0) {
            break;
        }
        struct kvs_flash_trigger t = {(int32_t)rq->every_tokens, (int32_t)rq->min_interval_ms};
        rc = kvs_flash_register(s, rq->name, rq->question, rq->question_len, &qo, &t, err,
                                sizeof err);
        if (rc < 0) {
            break;
        }
        begin_reply(srv, rq->id, 1);
        pack_key(pk, "registered"), msgpack_pack_true(pk);
        req_send(r, &srv->eout, true);
        break;
    }
    case KVS_OP_FLASH_UNREGISTER:
        rc = kvs_flash_unregister(s, rq->name);
        if (rc < 0) {
            snprintf(err, sizeof err, "flash query '%s' not found", rq->name);
            break;
        }
        publish_simple(srv, MSG_UNREG, rq->session, rq->name);
        begin_reply(srv, rq->id, 1);
        pack_key(pk, "unregistered"), msgpack_pack_true(pk);
        req_send(r, &srv->eout, true);
        break;
    case KVS_OP_FLASH_LIST: {
        int32_t n = kvs_flash_count(s);
        begin_reply(srv, rq->id, 1);
        pack_key(pk, "names"), msgpack_pack_array(pk, (size_t)n);
        for (int32_t i = 0; i < n; i++) {
            kvs_wire_pack_cstr(pk, kvs_flash_name(s, i));
        }
        req_send(r, &srv->eout, true);
        break;
    }
    case KVS_OP_FLASH_GET: {
        struct kvs_answer a = {0};
        rc = kvs_flash_get(s, rq->name, rq->allow_stale ? KVS_FLASH_ALLOW_STALE : KVS_FLASH_FRESH,
                           &a, err, sizeof err);
        if (rc < 0) {
            kvs_answer_free(&a);
            break;
        }
        send_answer(srv, r->ident, r->ident_len, rq->id, -1, &a, true);
        kvs_answer_free(&a);
        break;
    }
    default:
        rc = KVS_INTERNAL;
        snprintf(err, sizeof err, "op %s is not handled by the engine", kvs_wire_op_name(rq->op));
        break;
    }
    if (rc < 0) {
        req_error(r, rc, err[0] ? err : kvs_status_message(rc));
    }
    req_free(r);
}

/* cancel: the target request of the same peer, scheduled or deferred. */
static void eng_cancel(kvs_server *srv, struct req *c, uint64_t target)
{
    struct req *t = NULL;
    for (struct req *r = srv->live.next; r != &srv->live; r = r->next) {
        if (r != c && r->id == target && r->ident_len == c->ident_len &&
            memcmp(r->ident, c->ident, c->ident_len) == 0) {
            t = r;
            break;
        }
    }
    if (t == NULL) {
        char err[96];
        snprintf(err, sizeof err, "no request %llu of this connection in flight",
                 (unsigned long long)target);
        req_error(c, KVS_NOT_FOUND, err);
    } else {
        char why[64];
        snprintf(why, sizeof why, "cancelled by request %llu", (unsigned long long)c->id);
        req_cancel(t, KVS_CANCELLED, why);
        begin_reply(srv, c->id, 1);
        pack_key(&srv->eout.pk, "cancelled"), msgpack_pack_int(&srv->eout.pk, 1);
        req_send(c, &srv->eout, true);
    }
    req_free(c);
}

/* Keep r (whose request is payload) in the deferred queue. */
static void defer(kvs_server *srv, struct req *r, const void *payload, size_t len)
{
    r->payload = malloc(len > 0 ? len : 1);
    if (r->payload == NULL) {
        req_error(r, KVS_NO_MEMORY, "out of memory");
        req_free(r);
        return;
    }
    memcpy(r->payload, payload, len);
    r->payload_len = len;
    r->deferred = true;
    srv->n_deferred++;
    if (is_barrier(r->op)) {
        srv->closes_waiting++;
    }
    /* the live list is newest first; the deferred queue runs oldest first (see run_deferred) */
}

/* Is a deferred request of this session waiting? */
static bool session_has_deferred(const kvs_server *srv, const char *session)
{
    if (srv->n_deferred == 0) {
        return false;
    }
    for (const struct req *r = srv->live.next; r != &srv->live; r = r->next) {
        if (r->deferred && strcmp(r->session, session) == 0) {
            return true;
        }
    }
    return false;
}

/* Can rq run now, or must it wait (deferred)? */
static bool must_wait(kvs_server *srv, const struct kvs_wire_request *rq)
{
    if (rq->op == KVS_OP_STATUS || rq->op == KVS_OP_CANCEL) {
        return false;
    }
    if (srv->closes_waiting > 0) {
        return true; /* a close waits for an idle scheduler: nothing new is started meanwhile */
    }
    if (rq->session == NULL || rq->op == KVS_OP_SESSION_CREATE ||
        rq->op == KVS_OP_SESSION_ADOPT) {
        return false;
    }
    if (session_has_deferred(srv, rq->session)) {
        return true; /* keep the session's order */
    }
    kvs_session *s = kvs_session_find(srv->S, rq->session);
    struct sstate *ss = s != NULL ? ss_find(srv, s) : NULL;
    if (ss == NULL || !needs_settled(rq)) {
        return false;
    }
    if (is_barrier(rq->op)) {
        return kvs_sched_busy(srv->sc); /* flash evaluations of the session may be queued */
    }
    return !ss_settled(srv, ss);
}

/* One request from the I/O thread. */
static void eng_dispatch(kvs_server *srv, zmq_msg_t *ident, zmq_msg_t *payload, double t_recv)
{
    struct kvs_wire_request rq;
    char err[256];
    const uint8_t *id = zmq_msg_data(ident);
    size_t id_len = zmq_msg_size(ident);
    int rc = kvs_wire_decode(zmq_msg_data(payload), zmq_msg_size(payload), &rq, err, sizeof err);
    struct req *r = rc == 0 ? req_new(srv, id, id_len, &rq, t_recv) : NULL;
    if (rc < 0 || r == NULL) { /* the I/O thread checked it: a bug, or out of memory */
        kvs_wire_encode_error(&srv->eout, rq.id, rc < 0 ? rc : KVS_NO_MEMORY,
                              rc < 0 ? err : "out of memory", -1);
        eng_send(srv, id, id_len, &srv->eout, true);
    } else if (kvs_srv_fence_reason(srv) != NULL) {
        req_error(r, KVS_UNAVAILABLE, kvs_srv_fence_reason(srv));
        req_free(r);
    } else if (atomic_load(&srv->stopping)) {
        req_error(r, KVS_CANCELLED, "worker shutting down");
        req_free(r);
    } else if (rq.op == KVS_OP_CANCEL) {
        eng_cancel(srv, r, rq.target);
    } else if (must_wait(srv, &rq)) {
        defer(srv, r, zmq_msg_data(payload), zmq_msg_size(payload));
    } else {
        eng_execute(srv, r, &rq);
    }
    kvs_wire_request_free(&rq);
}

/* Run the deferred requests that can run now, oldest first, keeping each session's order;
 * expire the ones past their deadline. */
static void run_deferred(kvs_server *srv)
{
    if (srv->n_deferred == 0) {
        return;
    }
    srv->pass++;
    double now = kvs_now();
    struct req *r = srv->live.prev; /* the oldest */
    while (r != &srv->live) {
        struct req *newer = r->prev;
        if (!r->deferred) {
            r = newer;
            continue;
        }
        if (r->deadline > 0 && now > r->deadline) {
            req_error(r, KVS_TIMEOUT, "deadline exceeded while waiting for the session");
            req_free(r);
            r = newer;
            continue;
        }
        struct kvs_wire_request rq;
        char err[256];
        if (kvs_wire_decode(r->payload, r->payload_len, &rq, err, sizeof err) < 0) {
            req_error(r, KVS_INTERNAL, err);
            req_free(r);
            kvs_wire_request_free(&rq);
            r = newer;
            continue;
        }
        kvs_session *s = rq.session != NULL ? kvs_session_find(srv->S, rq.session) : NULL;
        struct sstate *ss = s != NULL ? ss_get(srv, s) : NULL;
        bool wait = false;
        if (is_barrier(rq.op)) {
            wait = kvs_sched_busy(srv->sc) || (ss != NULL && ss->blocked_pass == srv->pass);
        } else if (ss != NULL) {
            wait = ss->blocked_pass == srv->pass || (needs_settled(&rq) && !ss_settled(srv, ss));
        }
        if (wait) {
            if (ss != NULL) {
                ss->blocked_pass = srv->pass;
            }
            bool is_close = is_barrier(rq.op);
            kvs_wire_request_free(&rq);
            if (is_close) {
                break; /* a waiting close holds everything behind it */
            }
            r = newer;
            continue;
        }
        /* leave the queue, then run as if it had just arrived */
        r->deferred = false;
        srv->n_deferred--;
        if (is_barrier(r->op)) {
            srv->closes_waiting--;
        }
        free(r->payload);
        r->payload = NULL;
        eng_execute(srv, r, &rq);
        kvs_wire_request_free(&rq);
        r = newer;
    }
}

/* Publish the versions that moved without an acknowledgement (a cancelled logged append,
 * completed by the scheduler), and settle sessions once the scheduler is idle. */
static void after_step(kvs_server *srv)
{
    bool idle = !kvs_sched_busy(srv->sc);
    for (int32_t i = 0; i < srv->n_ss; i++) {
        struct sstate *ss = srv->ss[i];
        if (ss->unsettled) {
            publish_version(srv, ss);
            if (idle) {
                ss->unsettled = false;
            }
        }
    }
    run_deferred(srv);
    /* the load the coordinator link reports (kvs_server_load) */
    const struct kvs_sched_stats *st = kvs_sched_stats(srv->sc);
    uint64_t rows = 0;
    for (int c = 0; c < KVS_N_CLASSES; c++) {
        rows += st->rows[c];
    }
    atomic_store(&srv->load_cells_used, st->cells_used);
    atomic_store(&srv->load_cells_reserved, st->cells_reserved);
    atomic_store(&srv->load_cells_free, kvs_sessions_cells_free(srv->S));
    atomic_store(&srv->load_sessions, kvs_sessions_count(srv->S));
    atomic_store(&srv->load_rows, rows);
}

/* The server was fenced (kvs_server_fence): every request in flight is answered
 * UNAVAILABLE (a logged append still completes in the scheduler; its requester is told). */
static void eng_fence(kvs_server *srv)
{
    const char *why = kvs_srv_fence_reason(srv);
    if (srv->eng_fenced || why == NULL) {
        return;
    }
    srv->eng_fenced = true;
    for (struct req *r = srv->live.next; r != &srv->live;) {
        req_cancel(r, KVS_UNAVAILABLE, why);
        r = srv->live.next; /* callbacks may have freed others: restart */
    }
}

/* Fenced and the scheduler idle: let go of every session (logs synced and closed, files
 * kept, KV freed), so that another worker can adopt them: their logs are locked (flock) by
 * the process that holds them open. Requests keep being answered UNAVAILABLE. */
static void eng_release_all(kvs_server *srv)
{
    if (!srv->eng_fenced || srv->fence_released || kvs_sched_busy(srv->sc)) {
        return;
    }
    srv->fence_released = true;
    int32_t n = kvs_sessions_count(srv->S), released = 0;
    while (kvs_sessions_count(srv->S) > 0) {
        kvs_session *s = kvs_sessions_at(srv->S, kvs_sessions_count(srv->S) - 1);
        char id[KVS_SESSION_ID_MAX + 1], err[256];
        snprintf(id, sizeof id, "%s", kvs_session_id(s));
        struct sstate *ss = ss_find(srv, s);
        struct kvs_session_info in;
        int rc = kvs_session_release(srv->S, id, &in, err, sizeof err);
        if (rc < 0) {
            /* no data dir, or the log cannot be synced: keep it (and its lock) */
            KVS_ERROR("server: fenced, session %s kept: %s", id, err);
            break;
        }
        if (ss != NULL) {
            ss_remove(srv, ss);
        }
        publish_simple(srv, MSG_CLOSED, id, NULL);
        released++;
    }
    KVS_WARN("server: fenced: %d of %d sessions released (logs closed, files kept for another "
             "worker)",
             released, n);
}

/* Cancel the live requests of a peer that is gone (all) or does not read (its streams). */
static void eng_peer_lost(kvs_server *srv, const void *ident, size_t len, bool streams_only)
{
    for (struct req *r = srv->live.next; r != &srv->live;) {
        struct req *next = r->next;
        if (r->ident_len == len && memcmp(r->ident, ident, len) == 0 &&
            (r->stream || !streams_only)) {
            KVS_DEBUG("server: request %llu: peer %s, cancelled", (unsigned long long)r->id,
                      streams_only ? "not reading" : "gone");
            req_cancel(r, KVS_CANCELLED,
                       streams_only ? "the client does not read its stream" : "the client is gone");
            next = srv->live.next; /* callbacks may have freed others: restart */
        }
        r = next;
    }
}
/* Take every message the I/O thread has queued. Returns false once the stop marker came. */
static bool eng_drain(kvs_server *srv)
{
    for (;;) {
        zmq_msg_t parts[3];
        int n = kvs_srv_recv_parts(srv->pair_eng, parts, 3);
        if (n <= 0) {
            return true;
        }
        if (n == 1 && zmq_msg_size(&parts[0]) == 0) {
            kvs_srv_close_parts(parts, n, 3);
            return false;
        }
        if (n == 1 && zmq_msg_size(&parts[0]) == 1) { /* "F": the server was fenced */
            kvs_srv_close_parts(parts, n, 3);
            eng_fence(srv);
            continue;
        }
        if (n == 2 && zmq_msg_size(&parts[1]) == 1) {
            char why = *(const char *)zmq_msg_data(&parts[1]);
            eng_peer_lost(srv, zmq_msg_data(&parts[0]), zmq_msg_size(&parts[0]), why == PEER_SLOW);
        } else if (n == 3 && zmq_msg_size(&parts[2]) == sizeof(double)) {
            double t_recv;
            memcpy(&t_recv, zmq_msg_data(&parts[2]), sizeof t_recv);
            eng_dispatch(srv, &parts[0], &parts[1], t_recv);
        } else {
            KVS_ERROR("server: engine got a message of %d parts", n);
        }
        kvs_srv_close_parts(parts, n, 3);
    }
}

void *kvs_srv_engine_main(void *arg)
{
    kvs_server *srv = arg;
    for (int32_t i = 0; i < kvs_sessions_count(srv->S); i++) {
        ss_get(srv, kvs_sessions_at(srv->S, i)); /* watch, and publish the versions */
    }
    bool running = true;
    while (running) {
        bool busy = kvs_sched_busy(srv->sc);
        zmq_pollitem_t it = {srv->pair_eng, 0, ZMQ_POLLIN, 0};
        long timeout = busy ? 0 : srv->n_deferred > 0 ? 50 : -1;
        if (zmq_poll(&it, 1, timeout) < 0 && errno != EINTR) {
            KVS_ERROR("server: engine poll: %s", zmq_strerror(errno));
            break;
        }
        running = eng_drain(srv);
        if (!running) {
            break;
        }
        if (!srv->eng_fenced && kvs_srv_fence_reason(srv) != NULL) {
            eng_fence(srv); /* the serve-until deadline passed between requests */
        }
        if (kvs_sched_busy(srv->sc)) {
            int rc = kvs_sched_step(srv->sc, kvs_now());
            if (rc < 0) {
                /* the forward pass failed: fail the requests rather than spin */
                KVS_ERROR("server: scheduler step failed: %s", kvs_status_name(rc));
                for (struct req *r = srv->live.next; r != &srv->live;) {
                    struct req *next = r->next;
                    if (r->scheduled) {
                        req_cancel(r, rc, "the forward pass failed");
                        next = srv->live.next;
                    }
                    r = next;
                }
            }
        }
        after_step(srv);
        eng_release_all(srv);
    }
    /* Shutdown: requests waiting for a session are cancelled, the scheduler gets DRAIN_S to
     * finish the work in progress (new requests are answered CANCELLED meanwhile), what is
     * left is cancelled, and the sessions are closed here, on their owner thread. */
    atomic_store(&srv->stopping, 1);
    for (struct req *r = srv->live.next; r != &srv->live;) {
        struct req *next = r->next;
        if (r->deferred) {
            req_cancel(r, KVS_CANCELLED, "worker shutting down");
        }
        r = next;
    }
    double t_end = kvs_now() + DRAIN_S;
    while (kvs_sched_busy(srv->sc) && kvs_now() < t_end) {
        eng_drain(srv);
        if (kvs_sched_step(srv->sc, kvs_now()) < 0) {
            break;
        }
        after_step(srv);
    }
    for (struct req *r = srv->live.next; r != &srv->live;) {
        req_cancel(r, KVS_CANCELLED, "worker shutting down");
        r = srv->live.next;
    }
    kvs_sched_destroy(&srv->sc);
    kvs_sessions_destroy(&srv->S);
    for (int32_t i = 0; i < srv->n_ss; i++) {
        free(srv->ss[i]);
    }
    srv->n_ss = 0;
    uint8_t kind = MSG_EXIT;
    const void *d[1] = {&kind};
    size_t l[1] = {1};
    kvs_srv_send_frames(srv->pair_eng, d, l, 1);
    return NULL;
}

void kvs_srv_engine_free(kvs_server *srv)
{
    while (srv->live.next != NULL && srv->live.next != &srv->live) {
        req_free(srv->live.next); /* never run: kvs_server_run was not called */
    }
    for (int32_t i = 0; i < srv->n_ss; i++) {
        free(srv->ss[i]);
    }
    free(srv->ss);
    srv->ss = NULL;
    free(srv->released);
    srv->released = NULL;
    srv->n_released = srv->released_next = 0;
    srv->n_ss = srv->cap_ss = 0;
}
