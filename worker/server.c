/* kvs-worker's server: I/O thread (ROUTER) + engine thread (sessions), see worker/server.h
 * and docs/PROTOCOL.md. */
#include "worker/server.h"

#include "common/log.h"
#include "common/status.h"
#include "common/wire.h"
#include "worker/session.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#define PAIR_ENDPOINT_FMT "inproc://kvs-engine-%p"
#define IDENT_MAX 256            /* bytes of a ROUTER peer identity (libzmq: 255) */
#define RECV_BATCH 64            /* ROUTER messages handled per poll round */
#define SERVER_VERSION "0.1.0"

struct kvs_server {
    kvs_engine *e;                  /* owned; driven by the engine thread while running */
    kvs_sessions *S;                /* owned; engine thread */
    void *zctx;                     /* ZeroMQ context (owned) */
    void *router;                   /* I/O thread: the clients' socket */
    void *pair_io;                  /* I/O thread's end of the inproc pair */
    void *pair_eng;                 /* engine thread's end */
    char endpoint[256];             /* bound endpoint (ZMQ_LAST_ENDPOINT) */
    char model_sha256[65];          /* of the model file */
    int32_t queue_max;              /* requests forwarded and not finished, at most */
    int32_t in_flight;              /* I/O thread: forwarded, final reply not yet seen */
    volatile sig_atomic_t stop_requested; /* set by kvs_server_stop */
    atomic_int stopping;            /* engine thread: answer CANCELLED from now on */
    kvs_wire_buf out;               /* I/O thread's reply buffer */
    kvs_wire_buf eout;              /* engine thread's reply buffer */
};

/* ---- helpers ------------------------------------------------------------------------------ */

bool kvs_server_endpoint_is_local(const char *ep)
{
    if (strncmp(ep, "ipc://", 6) == 0 || strncmp(ep, "inproc://", 9) == 0) {
        return true;
    }
    if (strncmp(ep, "tcp://", 6) != 0) {
        return false;
    }
    const char *host = ep + 6;
    const char *colon = strrchr(host, ':');
    if (colon == NULL) {
        return false;
    }
    size_t n = (size_t)(colon - host);
    if (strchr(host, ';') != NULL) { /* "src;dst" forms: refuse, keep the rule simple */
        return false;
    }
    return (n >= 4 && strncmp(host, "127.", 4) == 0) ||
           (n == 9 && strncmp(host, "localhost", 9) == 0) ||
           (n == 5 && strncmp(host, "[::1]", 5) == 0) || (n == 2 && strncmp(host, "lo", 2) == 0);
}

static void setopt_int(void *s, int opt, int v)
{
    if (zmq_setsockopt(s, opt, &v, sizeof v) != 0) {
        KVS_WARN("server: zmq_setsockopt(%d) failed: %s", opt, zmq_strerror(errno));
    }
}

static void pack_key(msgpack_packer *pk, const char *k)
{
    kvs_wire_pack_cstr(pk, k);
}

static void pack_bool(msgpack_packer *pk, bool v)
{
    if (v) {
        msgpack_pack_true(pk);
    } else {
        msgpack_pack_false(pk);
    }
}

/* ---- engine thread -------------------------------------------------------------------------- */

/* Send [identity][payload][final] to the I/O thread. */
static void eng_send(kvs_server *srv, const zmq_msg_t *ident, const kvs_wire_buf *b,
                     bool final)
{
    uint8_t f = final ? 1 : 0;
    if (zmq_send(srv->pair_eng, zmq_msg_data((zmq_msg_t *)ident), zmq_msg_size((zmq_msg_t *)ident),
                 ZMQ_SNDMORE) < 0 ||
        zmq_send(srv->pair_eng, b->sb.data, b->sb.size, ZMQ_SNDMORE) < 0 ||
        zmq_send(srv->pair_eng, &f, 1, 0) < 0) {
        KVS_ERROR("server: engine -> io send failed: %s", zmq_strerror(errno));
    }
}

static void eng_error(kvs_server *srv, const zmq_msg_t *ident, uint64_t id, int status,
                      const char *msg, int64_t seq)
{
    kvs_wire_encode_error(&srv->eout, id, status, msg, seq);
    eng_send(srv, ident, &srv->eout, true);
}

struct stream_ctx {
    kvs_server *srv;
    const zmq_msg_t *ident;
    uint64_t id;
    int64_t seq;       /* next seq */
    bool stream;       /* send pieces */
};

static bool on_token(int32_t token, const char *text, size_t len, void *user)
{
    struct stream_ctx *c = user;
    if (!c->stream) {
        return true;
    }
    kvs_wire_buf *b = &c->srv->eout;
    kvs_wire_buf_clear(b);
    msgpack_pack_map(&b->pk, 4);
    pack_key(&b->pk, "id"), msgpack_pack_uint64(&b->pk, c->id);
    pack_key(&b->pk, "seq"), msgpack_pack_int64(&b->pk, c->seq++);
    pack_key(&b->pk, "token"), msgpack_pack_int32(&b->pk, token);
    pack_key(&b->pk, "text"), kvs_wire_pack_str(&b->pk, text, len);
    eng_send(c->srv, c->ident, b, false);
    return true;
}

/* Reply with an answer: {id, [seq, done,] answer, tokens, version, context_tokens,
 * question_tokens, ttft_ms, total_ms, [fresh]}. */
static void send_answer(kvs_server *srv, const zmq_msg_t *ident, uint64_t id, int64_t seq,
                        const struct kvs_answer *a, bool with_fresh)
{
    kvs_wire_buf *b = &srv->eout;
    kvs_wire_buf_clear(b);
    msgpack_packer *pk = &b->pk;
    msgpack_pack_map(pk, 8 + (seq >= 0 ? 2 : 0) + (with_fresh ? 1 : 0));
    pack_key(pk, "id"), msgpack_pack_uint64(pk, id);
    if (seq >= 0) {
        pack_key(pk, "seq"), msgpack_pack_int64(pk, seq);
        pack_key(pk, "done"), msgpack_pack_true(pk);
    }
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
    if (with_fresh) {
        pack_key(pk, "fresh"), pack_bool(pk, a->fresh);
    }
    eng_send(srv, ident, b, true);
}

static void begin_reply(kvs_server *srv, uint64_t id, size_t n_more)
{
    kvs_wire_buf_clear(&srv->eout);
    msgpack_pack_map(&srv->eout.pk, 1 + n_more);
    pack_key(&srv->eout.pk, "id"), msgpack_pack_uint64(&srv->eout.pk, id);
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

/* Run one decoded request on the engine; every path sends exactly one final reply. */
static void eng_execute(kvs_server *srv, const zmq_msg_t *ident,
                        const struct kvs_wire_request *rq)
{
    char err[512] = "";
    int rc = 0;
    msgpack_packer *pk = &srv->eout.pk;
    kvs_session *s = NULL;
    if (rq->session != NULL && rq->op != KVS_OP_SESSION_CREATE) {
        s = kvs_session_find(srv->S, rq->session);
        if (s == NULL) {
            snprintf(err, sizeof err, "session '%s' not found", rq->session);
            eng_error(srv, ident, rq->id, KVS_NOT_FOUND, err, rq->stream ? 0 : -1);
            return;
        }
    }
    switch (rq->op) {
    case KVS_OP_STATUS: {
        const struct kvs_hparams *hp = &srv->e->model->hp;
        begin_reply(srv, rq->id, 5);
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
        pack_key(pk, "queue"), msgpack_pack_map(pk, 1);
        pack_key(pk, "max"), msgpack_pack_int32(pk, srv->queue_max);
        eng_send(srv, ident, &srv->eout, true);
        return;
    }
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
        struct kvs_session_info in;
        kvs_session_info(s, &in);
        begin_reply(srv, rq->id, 4);
        pack_key(pk, "session"), kvs_wire_pack_cstr(pk, rq->session);
        pack_key(pk, "version"), msgpack_pack_uint64(pk, in.version);
        pack_key(pk, "cells"), msgpack_pack_int64(pk, in.cells_used);
        pack_key(pk, "cells_budget"), msgpack_pack_int64(pk, in.cells_budget);
        eng_send(srv, ident, &srv->eout, true);
        return;
    }
    case KVS_OP_SESSION_APPEND: {
        struct kvs_append_result ar = {0};
        if (rq->has_tokens) {
            uint32_t n_vocab = srv->e->model->hp.n_vocab;
            for (int32_t i = 0; i < rq->n_tokens; i++) {
                if ((uint32_t)rq->tokens[i] >= n_vocab) {
                    snprintf(err, sizeof err, "field 'tokens': id %d at %d is not < n_vocab %u",
                             rq->tokens[i], i, n_vocab);
                    rc = KVS_INVALID_ARGUMENT;
                    break;
                }
            }
            if (rc == 0) {
                rc = kvs_session_append_tokens(s, rq->tokens, rq->n_tokens, rq->client_id,
                                               rq->client_seq, &ar, err, sizeof err);
            }
        } else {
            rc = kvs_session_append(s, rq->text, rq->text_len, rq->client_id, rq->client_seq,
                                    &ar, err, sizeof err);
        }
        if (rc < 0) {
            break;
        }
        begin_reply(srv, rq->id, 5);
        pack_key(pk, "version"), msgpack_pack_uint64(pk, ar.version);
        pack_key(pk, "cells"), msgpack_pack_int64(pk, ar.cells);
        pack_key(pk, "n_tokens"), msgpack_pack_int32(pk, ar.n_tokens);
        pack_key(pk, "evicted"), msgpack_pack_int32(pk, ar.evicted);
        pack_key(pk, "duplicate"), pack_bool(pk, ar.duplicate);
        eng_send(srv, ident, &srv->eout, true);
        return;
    }
    case KVS_OP_SESSION_INFO:
        begin_reply(srv, rq->id, INFO_KEYS);
        pack_info(pk, s);
        eng_send(srv, ident, &srv->eout, true);
        return;
    case KVS_OP_SESSION_CLOSE:
        rc = kvs_session_close(srv->S, rq->session);
        if (rc < 0) {
            break;
        }
        begin_reply(srv, rq->id, 1);
        pack_key(pk, "closed"), msgpack_pack_true(pk);
        eng_send(srv, ident, &srv->eout, true);
        return;
    case KVS_OP_SESSION_LIST: {
        int32_t n = kvs_sessions_count(srv->S);
        int32_t shown = n > 65536 ? 65536 : n;
        begin_reply(srv, rq->id, 2);
        pack_key(pk, "sessions"), msgpack_pack_array(pk, (size_t)shown);
        for (int32_t i = 0; i < shown; i++) {
            kvs_wire_pack_cstr(pk, kvs_session_id(kvs_sessions_at(srv->S, i)));
        }
        pack_key(pk, "truncated"), pack_bool(pk, shown < n);
        eng_send(srv, ident, &srv->eout, true);
        return;
    }
    case KVS_OP_SESSION_SNAPSHOT:
        rc = kvs_session_snapshot(s, rq->compact, err, sizeof err);
        if (rc < 0) {
            break;
        }
        begin_reply(srv, rq->id, 1);
        pack_key(pk, "snapshot"), msgpack_pack_true(pk);
        eng_send(srv, ident, &srv->eout, true);
        return;
    case KVS_OP_QUERY: {
        struct kvs_query_opts qo;
        rc = query_opts(rq, &qo, err, sizeof err);
        if (rc < 0) {
            break;
        }
        struct stream_ctx c = {srv, ident, rq->id, 0, rq->stream};
        struct kvs_answer a = {0};
        rc = kvs_session_query(s, rq->question, rq->question_len, &qo, on_token, &c, &a, err,
                               sizeof err);
        if (rc < 0) {
            kvs_answer_free(&a);
            eng_error(srv, ident, rq->id, rc, err, rq->stream ? c.seq : -1);
            return;
        }
        send_answer(srv, ident, rq->id, rq->stream ? c.seq : -1, &a, false);
        kvs_answer_free(&a);
        return;
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
        eng_send(srv, ident, &srv->eout, true);
        return;
    }
    case KVS_OP_FLASH_UNREGISTER:
        rc = kvs_flash_unregister(s, rq->name);
        if (rc < 0) {
            snprintf(err, sizeof err, "flash query '%s' not found", rq->name);
            break;
        }
        begin_reply(srv, rq->id, 1);
        pack_key(pk, "unregistered"), msgpack_pack_true(pk);
        eng_send(srv, ident, &srv->eout, true);
        return;
    case KVS_OP_FLASH_LIST: {
        int32_t n = kvs_flash_count(s);
        begin_reply(srv, rq->id, 1);
        pack_key(pk, "names"), msgpack_pack_array(pk, (size_t)n);
        for (int32_t i = 0; i < n; i++) {
            kvs_wire_pack_cstr(pk, kvs_flash_name(s, i));
        }
        eng_send(srv, ident, &srv->eout, true);
        return;
    }
    case KVS_OP_FLASH_GET: {
        struct kvs_answer a = {0};
        rc = kvs_flash_get(s, rq->name, rq->allow_stale ? KVS_FLASH_ALLOW_STALE : KVS_FLASH_FRESH,
                           &a, err, sizeof err);
        if (rc < 0) {
            kvs_answer_free(&a);
            break;
        }
        send_answer(srv, ident, rq->id, -1, &a, true);
        kvs_answer_free(&a);
        return;
    }
    default:
        rc = KVS_INTERNAL;
        snprintf(err, sizeof err, "op %s is not handled by the engine", kvs_wire_op_name(rq->op));
        break;
    }
    eng_error(srv, ident, rq->id, rc, err, -1);
}

static void *engine_main(void *arg)
{
    kvs_server *srv = arg;
    for (;;) {
        zmq_msg_t ident, payload;
        zmq_msg_init(&ident);
        zmq_msg_init(&payload);
        if (zmq_msg_recv(&ident, srv->pair_eng, 0) < 0) {
            if (errno == EINTR) {
                zmq_msg_close(&ident);
                zmq_msg_close(&payload);
                continue;
            }
            KVS_ERROR("server: engine recv failed: %s", zmq_strerror(errno));
            zmq_msg_close(&ident);
            zmq_msg_close(&payload);
            break;
        }
        if (zmq_msg_size(&ident) == 0) { /* the stop marker */
            zmq_msg_close(&ident);
            zmq_msg_close(&payload);
            break;
        }
        while (zmq_msg_recv(&payload, srv->pair_eng, 0) < 0 && errno == EINTR) {
        }
        struct kvs_wire_request rq;
        char err[256];
        int rc = kvs_wire_decode(zmq_msg_data(&payload), zmq_msg_size(&payload), &rq, err,
                                 sizeof err);
        if (rc < 0) {
            eng_error(srv, &ident, rq.id, rc, err, -1); /* the I/O thread checked it: a bug */
        } else if (atomic_load(&srv->stopping)) {
            eng_error(srv, &ident, rq.id, KVS_CANCELLED, "worker shutting down",
                      rq.stream ? 0 : -1);
        } else {
            double t0 = kvs_now();
            eng_execute(srv, &ident, &rq);
            KVS_DEBUG("server: %s id=%llu %.1f ms", kvs_wire_op_name(rq.op),
                      (unsigned long long)rq.id, (kvs_now() - t0) * 1e3);
        }
        kvs_wire_request_free(&rq);
        zmq_msg_close(&ident);
        zmq_msg_close(&payload);
    }
    /* Close the sessions here, on their owner thread: logs are flushed and closed. */
    kvs_sessions_destroy(&srv->S);
    if (zmq_send(srv->pair_eng, "", 0, 0) < 0) { /* the exit marker */
        KVS_ERROR("server: engine exit send failed: %s", zmq_strerror(errno));
    }
    return NULL;
}

/* ---- I/O thread ------------------------------------------------------------------------------ */

/* Send [identity][""][b] to a peer without blocking; a gone or full peer loses the reply. */
static void io_reply(kvs_server *srv, const void *ident, size_t ident_len, const void *data,
                     size_t len)
{
    if (zmq_send(srv->router, ident, ident_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) {
        /* EHOSTUNREACH: the peer is gone (every later piece of its stream lands here too,
         * so only at debug level); EAGAIN: it is not reading (its HWM is full). */
        if (errno == EHOSTUNREACH) {
            KVS_DEBUG("server: reply to a gone peer dropped");
        } else {
            KVS_WARN("server: reply dropped (%s)", zmq_strerror(errno));
        }
        return;
    }
    if (zmq_send(srv->router, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
        zmq_send(srv->router, data, len, ZMQ_DONTWAIT) < 0) {
        KVS_WARN("server: reply dropped mid-message (%s)", zmq_strerror(errno));
    }
}

static void io_error(kvs_server *srv, const zmq_msg_t *ident, uint64_t id, int status,
                     const char *msg)
{
    kvs_wire_encode_error(&srv->out, id, status, msg, -1);
    io_reply(srv, zmq_msg_data((zmq_msg_t *)ident), zmq_msg_size((zmq_msg_t *)ident),
             srv->out.sb.data, srv->out.sb.size);
}

static void io_hello(kvs_server *srv, const zmq_msg_t *ident, const struct kvs_wire_request *rq)
{
    uint32_t best = 0;
    for (int i = 0; i < rq->n_versions; i++) {
        if (rq->versions[i] <= KVS_WIRE_VERSION && rq->versions[i] > best) {
            best = rq->versions[i];
        }
    }
    if (best == 0) {
        io_error(srv, ident, rq->id, KVS_UNSUPPORTED, "no common protocol version (worker: 1)");
        return;
    }
    msgpack_packer *pk = &srv->out.pk;
    kvs_wire_buf_clear(&srv->out);
    msgpack_pack_map(pk, 5);
    pack_key(pk, "id"), msgpack_pack_uint64(pk, rq->id);
    pack_key(pk, "version"), msgpack_pack_uint32(pk, best);
    pack_key(pk, "server"), kvs_wire_pack_cstr(pk, "kvs-worker");
    pack_key(pk, "server_version"), kvs_wire_pack_cstr(pk, SERVER_VERSION);
    pack_key(pk, "limits"), msgpack_pack_map(pk, 7);
    pack_key(pk, "max_frame"), msgpack_pack_uint32(pk, KVS_WIRE_MAX_FRAME);
    pack_key(pk, "max_depth"), msgpack_pack_uint32(pk, KVS_WIRE_MAX_DEPTH);
    pack_key(pk, "max_objects"), msgpack_pack_uint32(pk, KVS_WIRE_MAX_OBJECTS);
    pack_key(pk, "max_string"), msgpack_pack_uint32(pk, KVS_WIRE_MAX_STRING);
    pack_key(pk, "max_tokens_per_append"), msgpack_pack_uint32(pk, KVS_WIRE_MAX_TOKENS);
    pack_key(pk, "max_stops"), msgpack_pack_uint32(pk, KVS_WIRE_MAX_STOPS);
    pack_key(pk, "max_answer_tokens"), msgpack_pack_uint32(pk, KVS_WIRE_MAX_ANSWER_TOKENS);
    io_reply(srv, zmq_msg_data((zmq_msg_t *)ident), zmq_msg_size((zmq_msg_t *)ident),
             srv->out.sb.data, srv->out.sb.size);
}

/* One message from the ROUTER: [identity][""][payload] expected. */
static void io_handle(kvs_server *srv, zmq_msg_t *parts, int n_parts, bool stopping)
{
    zmq_msg_t *ident = &parts[0];
    if (n_parts != 3 || zmq_msg_size(&parts[1]) != 0) {
        io_error(srv, ident, 0, KVS_BAD_FORMAT, "expected the frames [\"\", payload]");
        return;
    }
    struct kvs_wire_request rq;
    char err[256];
    int rc = kvs_wire_decode(zmq_msg_data(&parts[2]), zmq_msg_size(&parts[2]), &rq, err,
                             sizeof err);
    if (rc < 0) {
        KVS_DEBUG("server: bad request id=%llu: %s", (unsigned long long)rq.id, err);
        io_error(srv, ident, rq.id, rc, err);
    } else if (rq.op == KVS_OP_PING) {
        kvs_wire_buf_clear(&srv->out);
        msgpack_pack_map(&srv->out.pk, 2);
        pack_key(&srv->out.pk, "id"), msgpack_pack_uint64(&srv->out.pk, rq.id);
        pack_key(&srv->out.pk, "pong"), msgpack_pack_true(&srv->out.pk);
        io_reply(srv, zmq_msg_data(ident), zmq_msg_size(ident), srv->out.sb.data,
                 srv->out.sb.size);
    } else if (rq.op == KVS_OP_HELLO) {
        io_hello(srv, ident, &rq);
    } else if (stopping) {
        io_error(srv, ident, rq.id, KVS_CANCELLED, "worker shutting down");
    } else if (srv->in_flight >= srv->queue_max) {
        snprintf(err, sizeof err, "engine queue full (%d requests)", srv->queue_max);
        io_error(srv, ident, rq.id, KVS_BUSY, err);
    } else if (zmq_msg_send(ident, srv->pair_io, ZMQ_SNDMORE) < 0 ||
               zmq_msg_send(&parts[2], srv->pair_io, 0) < 0) {
        KVS_ERROR("server: io -> engine send failed: %s", zmq_strerror(errno));
        io_error(srv, ident, rq.id, KVS_INTERNAL, "could not queue the request");
    } else {
        srv->in_flight++;
    }
    kvs_wire_request_free(&rq);
}

/* Receive one multipart message (non-blocking): keeps the first 3 parts, counts the rest.
 * Returns the part count, 0 when nothing is waiting, < 0 on error. */
static int recv_parts(void *sock, zmq_msg_t parts[3])
{
    int n = 0;
    for (;;) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, sock, n == 0 ? ZMQ_DONTWAIT : 0) < 0) {
            zmq_msg_close(&m);
            if (n == 0 && errno == EAGAIN) {
                return 0;
            }
            if (errno == EINTR && n > 0) {
                continue;
            }
            for (int i = 0; i < n && i < 3; i++) {
                zmq_msg_close(&parts[i]);
            }
            return n == 0 && errno == EINTR ? 0 : -1;
        }
        bool more = zmq_msg_more(&m);
        if (n < 3) {
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

static void close_parts(zmq_msg_t parts[3], int n)
{
    for (int i = 0; i < n && i < 3; i++) {
        zmq_msg_close(&parts[i]);
    }
}

/* Relay engine messages to peers. Returns true when the engine has exited. */
static bool io_relay(kvs_server *srv)
{
    for (;;) {
        zmq_msg_t parts[3];
        int n = recv_parts(srv->pair_io, parts);
        if (n <= 0) {
            return false;
        }
        if (n == 1 && zmq_msg_size(&parts[0]) == 0) {
            close_parts(parts, n);
            return true;
        }
        if (n == 3) {
            io_reply(srv, zmq_msg_data(&parts[0]), zmq_msg_size(&parts[0]),
                     zmq_msg_data(&parts[1]), zmq_msg_size(&parts[1]));
            if (*(const uint8_t *)zmq_msg_data(&parts[2]) == 1) {
                srv->in_flight--;
            }
        }
        close_parts(parts, n);
    }
}

int kvs_server_run(kvs_server *srv)
{
    pthread_t th;
    if (pthread_create(&th, NULL, engine_main, srv) != 0) {
        KVS_ERROR("server: cannot start the engine thread");
        return KVS_INTERNAL;
    }
    bool stop_sent = false, engine_done = false;
    int rc = 0;
    while (!engine_done) {
        if (srv->stop_requested && !stop_sent) {
            KVS_INFO("server: shutting down (%d requests in flight)", srv->in_flight);
            atomic_store(&srv->stopping, 1);
            if (zmq_send(srv->pair_io, "", 0, 0) < 0) {
                KVS_ERROR("server: stop send failed: %s", zmq_strerror(errno));
            }
            stop_sent = true;
        }
        zmq_pollitem_t items[2] = {{srv->router, 0, ZMQ_POLLIN, 0},
                                   {srv->pair_io, 0, ZMQ_POLLIN, 0}};
        if (zmq_poll(items, 2, 100) < 0) {
            if (errno == EINTR) {
                continue;
            }
            KVS_ERROR("server: zmq_poll: %s", zmq_strerror(errno));
            rc = KVS_INTERNAL;
            break;
        }
        if (items[1].revents & ZMQ_POLLIN) {
            engine_done = io_relay(srv);
        }
        if (items[0].revents & ZMQ_POLLIN) {
            for (int i = 0; i < RECV_BATCH; i++) {
                zmq_msg_t parts[3];
                int n = recv_parts(srv->router, parts);
                if (n <= 0) {
                    break;
                }
                if (n >= 1 && zmq_msg_size(&parts[0]) <= IDENT_MAX) {
                    io_handle(srv, parts, n, stop_sent);
                }
                close_parts(parts, n);
            }
        }
    }
    if (!engine_done) { /* the loop failed: stop the engine anyway */
        atomic_store(&srv->stopping, 1);
        zmq_send(srv->pair_io, "", 0, 0);
    }
    pthread_join(th, NULL);
    KVS_INFO("server: stopped");
    return rc;
}

void kvs_server_stop(kvs_server *srv)
{
    srv->stop_requested = 1;
}

const char *kvs_server_endpoint(const kvs_server *srv)
{
    return srv->endpoint;
}

int kvs_server_new(const struct kvs_server_opts *o, kvs_server **out, char *err, size_t errlen)
{
    *out = NULL;
    if (o->listen == NULL || o->listen[0] == '\0') {
        snprintf(err, errlen, "no listen endpoint");
        return KVS_INVALID_ARGUMENT;
    }
    if (!o->insecure && !kvs_server_endpoint_is_local(o->listen)) {
        snprintf(err, errlen,
                 "refusing to listen on %s: not a loopback address and CURVE is not "
                 "implemented yet (pass --insecure to accept the risk)",
                 o->listen);
        return KVS_INVALID_ARGUMENT;
    }
    kvs_server *srv = calloc(1, sizeof *srv);
    if (srv == NULL) {
        snprintf(err, errlen, "out of memory");
        return KVS_NO_MEMORY;
    }
    srv->queue_max = o->queue_max > 0 ? o->queue_max : KVS_SERVER_QUEUE_MAX;
    atomic_init(&srv->stopping, 0);
    kvs_wire_buf_init(&srv->out);
    kvs_wire_buf_init(&srv->eout);
    int rc = kvs_engine_open(&o->engine, &srv->e, err, errlen);
    if (rc < 0) {
        goto fail;
    }
    rc = kvs_model_sha256(srv->e->model, srv->model_sha256);
    if (rc < 0) {
        snprintf(err, errlen, "cannot hash the model file");
        goto fail;
    }
    struct kvs_sessions_opts so = {o->data_dir, o->fsync};
    rc = kvs_sessions_new(srv->e, &so, &srv->S);
    if (rc < 0) {
        snprintf(err, errlen, "cannot open the data dir %s", o->data_dir ? o->data_dir : "-");
        goto fail;
    }
    if (o->data_dir != NULL) {
        char rerr[2048] = "";
        int n = kvs_sessions_restore(srv->S, rerr, sizeof rerr);
        if (n < 0) {
            snprintf(err, errlen, "cannot list the data dir %s", o->data_dir);
            rc = n;
            goto fail;
        }
        if (rerr[0] != '\0') {
            KVS_WARN("server: sessions not restored: %s", rerr);
        }
        KVS_INFO("server: restored %d sessions from %s", n, o->data_dir);
    }

    srv->zctx = zmq_ctx_new();
    srv->router = srv->zctx ? zmq_socket(srv->zctx, ZMQ_ROUTER) : NULL;
    srv->pair_io = srv->zctx ? zmq_socket(srv->zctx, ZMQ_PAIR) : NULL;
    srv->pair_eng = srv->zctx ? zmq_socket(srv->zctx, ZMQ_PAIR) : NULL;
    if (srv->router == NULL || srv->pair_io == NULL || srv->pair_eng == NULL) {
        snprintf(err, errlen, "zmq: %s", zmq_strerror(errno));
        rc = KVS_INTERNAL;
        goto fail;
    }
    int64_t maxmsg = KVS_WIRE_MAX_FRAME + 64;
    zmq_setsockopt(srv->router, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    setopt_int(srv->router, ZMQ_ROUTER_MANDATORY, 1);
    setopt_int(srv->router, ZMQ_HEARTBEAT_IVL, 250);
    setopt_int(srv->router, ZMQ_HEARTBEAT_TIMEOUT, 1000);
    setopt_int(srv->router, ZMQ_HEARTBEAT_TTL, 1000);
    setopt_int(srv->router, ZMQ_HANDSHAKE_IVL, 2000);
    setopt_int(srv->router, ZMQ_SNDHWM, 1000);
    setopt_int(srv->router, ZMQ_RCVHWM, 1000);
    setopt_int(srv->router, ZMQ_LINGER, 500);
    if (zmq_bind(srv->router, o->listen) != 0) {
        snprintf(err, errlen, "cannot bind %s: %s", o->listen, zmq_strerror(errno));
        rc = KVS_IO;
        goto fail;
    }
    size_t len = sizeof srv->endpoint;
    zmq_getsockopt(srv->router, ZMQ_LAST_ENDPOINT, srv->endpoint, &len);
    char pair_ep[64];
    snprintf(pair_ep, sizeof pair_ep, PAIR_ENDPOINT_FMT, (void *)srv);
    setopt_int(srv->pair_io, ZMQ_SNDHWM, 0);
    setopt_int(srv->pair_io, ZMQ_RCVHWM, 0);
    setopt_int(srv->pair_eng, ZMQ_SNDHWM, 0);
    setopt_int(srv->pair_eng, ZMQ_RCVHWM, 0);
    if (zmq_bind(srv->pair_io, pair_ep) != 0 || zmq_connect(srv->pair_eng, pair_ep) != 0) {
        snprintf(err, errlen, "inproc pair: %s", zmq_strerror(errno));
        rc = KVS_INTERNAL;
        goto fail;
    }
    *out = srv;
    return 0;
fail:
    kvs_server_destroy(&srv);
    return rc < 0 ? rc : KVS_INTERNAL;
}

void kvs_server_destroy(kvs_server **psrv)
{
    if (psrv == NULL || *psrv == NULL) {
        return;
    }
    kvs_server *srv = *psrv;
    int zero = 0;
    if (srv->router) {
        zmq_close(srv->router);
    }
    if (srv->pair_io) {
        zmq_setsockopt(srv->pair_io, ZMQ_LINGER, &zero, sizeof zero);
        zmq_close(srv->pair_io);
    }
    if (srv->pair_eng) {
        zmq_setsockopt(srv->pair_eng, ZMQ_LINGER, &zero, sizeof zero);
        zmq_close(srv->pair_eng);
    }
    if (srv->zctx) {
        zmq_ctx_term(srv->zctx);
    }
    kvs_sessions_destroy(&srv->S);
    kvs_engine_destroy(&srv->e);
    kvs_wire_buf_destroy(&srv->out);
    kvs_wire_buf_destroy(&srv->eout);
    free(srv);
    *psrv = NULL;
}
