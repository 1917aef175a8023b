/* libkvstream operations (docs/PROTOCOL.md section 5): each builds its request, makes the
 * call (client.c) and reads the reply's fields into the caller's struct. */
#include "client/lib/client_impl.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Checks of arguments made before anything is sent. */
#define NEED(c, cond, ...)                                                                 \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            return client_fail((c), KVS_INVALID_ARGUMENT, __VA_ARGS__);                    \
        }                                                                                  \
    } while (0)

bool client_ident_ok(const char *s, size_t max, bool session)
{
    size_t n = s != NULL ? strlen(s) : 0;
    if (n == 0 || n > max || (session && s[0] == '.')) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '.' || ch == '_' || ch == '-')) {
            return false;
        }
    }
    return true;
}

#define NEED_SESSION(c, s)                                                                 \
    NEED(c, client_ident_ok((s), KVS_WIRE_SESSION_MAX, true),                                     \
         "session id must be 1..128 bytes of [A-Za-z0-9._-], not starting with '.'")
#define NEED_NAME(c, s)                                                                    \
    NEED(c, client_ident_ok((s), KVS_WIRE_NAME_MAX, false),                                       \
         "flash query name must be 1..64 bytes of [A-Za-z0-9._-]")

static double ms_since(const struct timespec *t0)
{
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) * 1e3 + (double)(t1.tv_nsec - t0->tv_nsec) / 1e6;
}

/* ---- worker ------------------------------------------------------------------------------- */

int kvs_client_ping(kvs_client *c, double *rtt_ms)
{
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    client_req_begin(c, "ping");
    const msgpack_object *m;
    KVS_TRY(client_call(c, NULL, CALL_RETRY, &m));
    bool pong = false;
    KVS_TRY(rep_bool(c, m, "pong", &pong));
    if (rtt_ms != NULL) {
        *rtt_ms = ms_since(&t0);
    }
    return 0;
}

int kvs_client_status(kvs_client *c, struct kvs_client_status *st)
{
    NEED(c, st != NULL, "status: no output struct");
    if (c->coord) {
        client_call_begin(c);
        return client_cluster_status(c, st);
    }
    client_req_begin(c, "status");
    const msgpack_object *m;
    KVS_TRY(client_call(c, NULL, CALL_RETRY, &m));
    struct kvs_client_status s = {0};
    const msgpack_object *model = kvs_wire_map_get(m, "model");
    const msgpack_object *cap = kvs_wire_map_get(m, "capacity");
    const msgpack_object *q = kvs_wire_map_get(m, "queue");
    KVS_TRY(rep_strbuf(c, model, "sha256", s.model_sha256, sizeof s.model_sha256));
    KVS_TRY(rep_i64(c, model, "n_ctx", &s.n_ctx));
    KVS_TRY(rep_i64(c, model, "n_vocab", &s.n_vocab));
    KVS_TRY(rep_i64(c, cap, "cells_total", &s.cells_total));
    KVS_TRY(rep_i64(c, cap, "cells_free", &s.cells_free));
    KVS_TRY(rep_i64(c, m, "sessions", &s.sessions));
    KVS_TRY(rep_i64(c, q, "max", &s.queue_max));
    *st = s;
    return 0;
}

/* ---- sessions ------------------------------------------------------------------------------ */

int kvs_client_session_create(kvs_client *c, const char *session,
                              const struct kvs_client_session_opts *opts,
                              struct kvs_client_session_info *info)
{
    NEED_SESSION(c, session);
    struct kvs_client_session_opts o = {0};
    if (opts != NULL) {
        o = *opts;
    }
    NEED(c, o.cells >= 0 && o.query_reserve >= 0, "cells and query_reserve must be >= 0");
    if (c->coord) {
        /* The coordinator places it first (and routes it to the worker it chose). */
        client_call_begin(c);
        KVS_TRY(client_cluster_place(c, session, &o, &o.cells));
    }
    client_req_begin(c, "session.create");
    client_req_cstr(c, "session", session);
    if (o.prefix != NULL && o.prefix[0] != '\0') {
        client_req_cstr(c, "prefix", o.prefix);
    }
    if (o.cells > 0) {
        client_req_u64(c, "cells", (uint64_t)o.cells);
    }
    if (o.query_reserve > 0) {
        client_req_u64(c, "query_reserve", (uint64_t)o.query_reserve);
    }
    client_req_cstr(c, "format", o.chat ? "chat" : "raw");
    client_req_cstr(c, "policy", o.slide ? "slide" : "reject");
    const msgpack_object *m;
    int rc = c->coord ? client_call_to(c, session, NULL, 0, &m) : client_call(c, session, 0, &m);
    if (rc < 0 && c->coord && (c->from_worker || rc == KVS_UNAVAILABLE)) {
        /* Not created on the worker (it refused, or got nothing): take the placement back,
         * keep the worker's answer. After a timeout it may exist: the placement stays. */
        char why[sizeof c->err];
        snprintf(why, sizeof why, "%s", c->err);
        bool from_worker = c->from_worker;
        client_cluster_unplace(c, session);
        client_route_drop(c, session);
        snprintf(c->err, sizeof c->err, "%s", why);
        c->from_worker = from_worker;
    }
    KVS_TRY(rc);
    struct kvs_client_session_info in = {0};
    KVS_TRY(rep_u64(c, m, "version", &in.version));
    KVS_TRY(rep_i64(c, m, "cells", &in.cells_used));
    KVS_TRY(rep_i64(c, m, "cells_budget", &in.cells_budget));
    snprintf(in.format, sizeof in.format, "%s", o.chat ? "chat" : "raw");
    snprintf(in.policy, sizeof in.policy, "%s", o.slide ? "slide" : "reject");
    if (info != NULL) {
        *info = in;
    }
    return 0;
}

int kvs_client_session_info(kvs_client *c, const char *session,
                            struct kvs_client_session_info *info)
{
    NEED_SESSION(c, session);
    NEED(c, info != NULL, "session info: no output struct");
    client_req_begin(c, "session.info");
    client_req_cstr(c, "session", session);
    const msgpack_object *m;
    KVS_TRY(client_call(c, session, CALL_RETRY, &m));
    struct kvs_client_session_info in = {0};
    int64_t fq = 0;
    KVS_TRY(rep_u64(c, m, "version", &in.version));
    KVS_TRY(rep_u64(c, m, "appends", &in.appends));
    KVS_TRY(rep_i64(c, m, "prefix_tokens", &in.prefix_tokens));
    KVS_TRY(rep_i64(c, m, "data_tokens", &in.data_tokens));
    KVS_TRY(rep_i64(c, m, "cells_used", &in.cells_used));
    KVS_TRY(rep_i64(c, m, "cells_budget", &in.cells_budget));
    KVS_TRY(rep_i64(c, m, "evicted_tokens", &in.evicted_tokens));
    KVS_TRY(rep_i64(c, m, "flash_queries", &fq));
    KVS_TRY(rep_strbuf(c, m, "format", in.format, sizeof in.format));
    KVS_TRY(rep_strbuf(c, m, "policy", in.policy, sizeof in.policy));
    in.flash_queries = (int32_t)fq;
    *info = in;
    return 0;
}

int kvs_client_session_close(kvs_client *c, const char *session)
{
    NEED_SESSION(c, session);
    client_req_begin(c, "session.close");
    client_req_cstr(c, "session", session);
    const msgpack_object *m;
    int rc = client_call(c, session, 0, &m);
    bool closed = false;
    if (rc == 0) {
        rc = rep_bool(c, m, "closed", &closed);
    }
    if (!c->coord || (rc < 0 && rc != KVS_NOT_FOUND)) {
        return rc;
    }
    /* Through a coordinator: then the placement. A worker that had lost the session (NOT_FOUND
     * where the directory placed it) still leaves a record to remove. */
    char why[sizeof c->err];
    snprintf(why, sizeof why, "%s", c->err);
    int rc_coord = client_cluster_unplace(c, session);
    client_route_drop(c, session);
    if (rc == 0 && rc_coord < 0 && rc_coord != KVS_NOT_FOUND) {
        char coord_why[sizeof c->err];
        snprintf(coord_why, sizeof coord_why, "%s", c->err);
        return client_fail(c, rc_coord,
                           "closed on its worker, but the coordinator still places it (%s)",
                           coord_why);
    }
    if (rc == KVS_NOT_FOUND && rc_coord == 0) {
        return 0; /* the directory's record of a session its worker no longer had */
    }
    if (rc < 0) {
        snprintf(c->err, sizeof c->err, "%s", why);
        return rc;
    }
    c->err[0] = '\0';
    return 0;
}

int kvs_client_session_list(kvs_client *c, char ***names, int32_t *n)
{
    NEED(c, names != NULL && n != NULL, "session list: no output");
    if (c->coord) {
        client_call_begin(c);
        return client_cluster_list(c, names, n);
    }
    client_req_begin(c, "session.list");
    const msgpack_object *m;
    KVS_TRY(client_call(c, NULL, CALL_RETRY, &m));
    return rep_names(c, m, "sessions", NULL, names, n);
}

int kvs_client_session_snapshot(kvs_client *c, const char *session, bool compact)
{
    NEED_SESSION(c, session);
    client_req_begin(c, "session.snapshot");
    client_req_cstr(c, "session", session);
    client_req_bool(c, "compact", compact);
    const msgpack_object *m;
    KVS_TRY(client_call(c, session, CALL_RETRY, &m));
    bool done = false;
    return rep_bool(c, m, "snapshot", &done);
}

int kvs_client_session_dump(kvs_client *c, const char *session, struct kvs_client_dump *d)
{
    NEED_SESSION(c, session);
    NEED(c, d != NULL, "session dump: no output struct");
    client_req_begin(c, "session.dump");
    client_req_cstr(c, "session", session);
    const msgpack_object *m;
    KVS_TRY(client_call(c, session, CALL_RETRY, &m));
    struct kvs_client_dump o = {0};
    const char *s;
    size_t n;
    KVS_TRY(rep_u64(c, m, "version", &o.version));
    KVS_TRY(rep_i64(c, m, "prefix_tokens", &o.prefix_tokens));
    const msgpack_object *toks = kvs_wire_map_get(m, "tokens");
    if (toks == NULL || toks->type != MSGPACK_OBJECT_ARRAY) {
        return client_fail(c, KVS_BAD_FORMAT, "reply field 'tokens' missing or not an array");
    }
    if (!mp_str(kvs_wire_map_get(m, "text"), &s, &n)) {
        return client_fail(c, KVS_BAD_FORMAT, "reply field 'text' missing or not a string");
    }
    o.tokens = malloc(((size_t)toks->via.array.size + 1) * sizeof *o.tokens);
    o.text = malloc(n + 1);
    if (o.tokens == NULL || o.text == NULL) {
        kvs_client_dump_free(&o);
        return client_fail(c, KVS_NO_MEMORY, "out of memory for a dump");
    }
    for (uint32_t i = 0; i < toks->via.array.size; i++) {
        int64_t t;
        if (!mp_i64(&toks->via.array.ptr[i], &t) || t < 0 || t > INT32_MAX) {
            kvs_client_dump_free(&o);
            return client_fail(c, KVS_BAD_FORMAT, "reply field 'tokens': element %u is not an id",
                               i);
        }
        o.tokens[i] = (int32_t)t;
    }
    o.n_tokens = toks->via.array.size;
    memcpy(o.text, s, n);
    o.text[n] = '\0';
    o.len = n;
    *d = o;
    return 0;
}

void kvs_client_dump_free(struct kvs_client_dump *d)
{
    if (d == NULL) {
        return;
    }
    free(d->tokens);
    free(d->text);
    memset(d, 0, sizeof *d);
}

/* ---- appends ------------------------------------------------------------------------------- */

/* One append with the next number for (client, session); see kvstream.h for TIMEOUT and the
 * OUT_OF_ORDER recovery after it. */
static int append(kvs_client *c, const char *session, const char *text, size_t len,
                  const int32_t *ids, int32_t n, struct kvs_client_append_result *r)
{
    struct client_seq *sq = client_seq_of(c, session);
    if (sq == NULL) {
        return client_fail(c, KVS_NO_MEMORY, "out of memory");
    }
    uint64_t seq = sq->last + 1;
    for (int pass = 0;; pass++) {
        client_req_begin(c, "session.append");
        client_req_cstr(c, "session", session);
        if (ids != NULL) {
            client_req_array(c, "tokens", (size_t)n);
            for (int32_t i = 0; i < n; i++) {
                msgpack_pack_int32(&c->req.pk, ids[i]);
            }
        } else {
            client_req_str(c, "text", text, len);
        }
        client_req_u64(c, "client_id", c->client_id);
        client_req_u64(c, "client_seq", seq);
        const msgpack_object *m;
        int rc = client_call(c, session, CALL_RETRY, &m);
        sq = client_seq_of(c, session); /* the table may have moved */
        if (sq == NULL) {
            return client_fail(c, KVS_NO_MEMORY, "out of memory");
        }
        if (rc == KVS_OUT_OF_ORDER && sq->uncertain && pass == 0 && seq == sq->last + 1) {
            /* The append that timed out before this one was never applied: its number is
             * the one the worker expects. */
            seq = sq->last;
            continue;
        }
        if (rc == KVS_TIMEOUT || rc == KVS_CANCELLED) {
            sq->last = seq; /* applied once or not at all: see kvstream.h */
            sq->uncertain = true;
            return rc;
        }
        if (rc < 0) {
            return rc;
        }
        struct kvs_client_append_result a = {0};
        int64_t nt = 0, ev = 0;
        KVS_TRY(rep_u64(c, m, "version", &a.version));
        KVS_TRY(rep_i64(c, m, "cells", &a.cells));
        KVS_TRY(rep_i64(c, m, "n_tokens", &nt));
        KVS_TRY(rep_i64(c, m, "evicted", &ev));
        KVS_TRY(rep_bool(c, m, "duplicate", &a.duplicate));
        a.n_tokens = (int32_t)nt;
        a.evicted = (int32_t)ev;
        sq->last = seq;
        sq->uncertain = false;
        if (r != NULL) {
            *r = a;
        }
        return 0;
    }
}

int kvs_client_append(kvs_client *c, const char *session, const char *text, size_t len,
                      struct kvs_client_append_result *r)
{
    NEED_SESSION(c, session);
    NEED(c, text != NULL && len > 0, "append: empty text");
    NEED(c, len <= KVS_WIRE_MAX_STRING, "append: text of %zu bytes exceeds %u", len,
         KVS_WIRE_MAX_STRING);
    return append(c, session, text, len, NULL, 0, r);
}

int kvs_client_append_tokens(kvs_client *c, const char *session, const int32_t *ids,
                             int32_t n, struct kvs_client_append_result *r)
{
    NEED_SESSION(c, session);
    NEED(c, ids != NULL && n > 0, "append: no token ids");
    NEED(c, n <= KVS_WIRE_MAX_TOKENS, "append: %d token ids exceed %d", n, KVS_WIRE_MAX_TOKENS);
    for (int32_t i = 0; i < n; i++) {
        NEED(c, ids[i] >= 0, "append: token id %d at %d is negative", ids[i], i);
    }
    return append(c, session, NULL, 0, ids, n, r);
}

int kvs_client_set_append_seq(kvs_client *c, const char *session, uint64_t last_seq)
{
    NEED_SESSION(c, session);
    struct client_seq *sq = client_seq_of(c, session);
    if (sq == NULL) {
        return client_fail(c, KVS_NO_MEMORY, "out of memory");
    }
    sq->last = last_seq;
    sq->uncertain = false;
    return 0;
}

/* ---- answers ------------------------------------------------------------------------------- */

void kvs_client_answer_free(struct kvs_client_answer *a)
{
    if (a == NULL) {
        return;
    }
    free(a->text);
    free(a->tokens);
    memset(a, 0, sizeof *a);
}

/* The result keys of a query / flash answer (PROTOCOL.md section 5, query). */
int client_read_answer(kvs_client *c, const msgpack_object *m, bool with_fresh,
                       struct kvs_client_answer *out)
{
    struct kvs_client_answer a = {0};
    const char *s;
    size_t n;
    int64_t ctx = 0, qt = 0;
    if (!mp_str(kvs_wire_map_get(m, "answer"), &s, &n)) {
        return client_fail(c, KVS_BAD_FORMAT, "reply field 'answer' missing or not a string");
    }
    const msgpack_object *toks = kvs_wire_map_get(m, "tokens");
    if (toks == NULL || toks->type != MSGPACK_OBJECT_ARRAY) {
        return client_fail(c, KVS_BAD_FORMAT, "reply field 'tokens' missing or not an array");
    }
    KVS_TRY(rep_u64(c, m, "version", &a.version));
    KVS_TRY(rep_i64(c, m, "context_tokens", &ctx));
    KVS_TRY(rep_i64(c, m, "question_tokens", &qt));
    KVS_TRY(rep_f64(c, m, "ttft_ms", &a.ttft_ms));
    KVS_TRY(rep_f64(c, m, "total_ms", &a.total_ms));
    if (with_fresh) {
        KVS_TRY(rep_bool(c, m, "fresh", &a.fresh));
    }
    const char *name;
    size_t name_n;
    if (mp_str(kvs_wire_map_get(m, "name"), &name, &name_n) && name_n < sizeof a.name) {
        memcpy(a.name, name, name_n);
    }
    a.context_tokens = ctx;
    a.question_tokens = (int32_t)qt;
    a.text = malloc(n + 1);
    a.tokens = malloc(((size_t)toks->via.array.size + 1) * sizeof *a.tokens);
    if (a.text == NULL || a.tokens == NULL) {
        kvs_client_answer_free(&a);
        return client_fail(c, KVS_NO_MEMORY, "out of memory for an answer");
    }
    memcpy(a.text, s, n);
    a.text[n] = '\0';
    a.len = n;
    for (uint32_t i = 0; i < toks->via.array.size; i++) {
        int64_t t;
        if (!mp_i64(&toks->via.array.ptr[i], &t) || t < 0 || t > INT32_MAX) {
            kvs_client_answer_free(&a);
            return client_fail(c, KVS_BAD_FORMAT, "reply field 'tokens': element %u is not an id",
                               i);
        }
        a.tokens[i] = (int32_t)t;
    }
    a.n_tokens = (int32_t)toks->via.array.size;
    *out = a;
    return 0;
}

/* Sampling and length keys shared by query and flash.register. */
static int req_query_opts(kvs_client *c, const struct kvs_client_query_opts *q)
{
    NEED(c, q->max_tokens >= 0 && q->max_tokens <= KVS_WIRE_MAX_ANSWER_TOKENS,
         "max_tokens must be 1..%d", KVS_WIRE_MAX_ANSWER_TOKENS);
    NEED(c, q->temperature >= 0 && q->top_k >= 0 && q->top_p >= 0 && q->top_p <= 1 &&
                q->min_p >= 0 && q->min_p < 1 && q->repeat_penalty >= 0,
         "sampling: temperature, top_k >= 0; top_p in [0, 1]; min_p in [0, 1); "
         "repeat_penalty >= 0");
    NEED(c, q->n_stops >= 0 && q->n_stops <= KVS_WIRE_MAX_STOPS && (q->n_stops == 0 || q->stops),
         "at most %d stop strings", KVS_WIRE_MAX_STOPS);
    for (int32_t i = 0; i < q->n_stops; i++) {
        size_t n = q->stops[i] != NULL ? strlen(q->stops[i]) : 0;
        NEED(c, n >= 1 && n <= KVS_WIRE_MAX_STOP_BYTES, "stop string %d must be 1..%d bytes", i,
             KVS_WIRE_MAX_STOP_BYTES);
    }
    client_req_u64(c, "max_tokens", q->max_tokens > 0 ? (uint64_t)q->max_tokens : 64);
    client_req_f64(c, "temperature", q->temperature);
    if (q->top_k > 0) {
        client_req_u64(c, "top_k", (uint64_t)q->top_k);
    }
    client_req_f64(c, "top_p", q->top_p > 0 ? q->top_p : 1.0);
    client_req_f64(c, "min_p", q->min_p);
    client_req_f64(c, "repeat_penalty", q->repeat_penalty > 0 ? q->repeat_penalty : 1.0);
    client_req_u64(c, "seed", q->seed);
    if (q->n_stops > 0) {
        client_req_array(c, "stops", (size_t)q->n_stops);
        for (int32_t i = 0; i < q->n_stops; i++) {
            kvs_wire_pack_cstr(&c->req.pk, q->stops[i]);
        }
    }
    return 0;
}

int kvs_client_query(kvs_client *c, const char *session, const char *question,
                     const struct kvs_client_query_opts *opts, kvs_client_token_fn cb,
                     void *user, struct kvs_client_answer *a)
{
    NEED_SESSION(c, session);
    NEED(c, question != NULL && question[0] != '\0', "query: empty question");
    NEED(c, strlen(question) <= KVS_WIRE_MAX_STRING, "query: question over %u bytes",
         KVS_WIRE_MAX_STRING);
    NEED(c, a != NULL, "query: no output answer");
    struct kvs_client_query_opts q = {0};
    if (opts != NULL) {
        q = *opts;
    }
    client_req_begin(c, "query");
    client_req_cstr(c, "session", session);
    client_req_cstr(c, "question", question);
    KVS_TRY(req_query_opts(c, &q));
    if (q.stateless) {
        client_req_bool(c, "stateless", true);
    }
    if (cb != NULL) {
        client_req_bool(c, "stream", true);
    }
    const msgpack_object *m;
    KVS_TRY(client_call(c, session, cb != NULL ? CALL_STREAM : 0, &m));
    if (cb == NULL) {
        return client_read_answer(c, m, false, a);
    }
    for (uint64_t expect = 0;; expect++) {
        uint64_t seq = 0;
        bool done = false;
        if (!mp_u64(kvs_wire_map_get(m, "seq"), &seq) || seq != expect) {
            client_abandon(c);
            return client_fail(c, KVS_BAD_FORMAT, "streamed reply: seq %llu, expected %llu",
                               (unsigned long long)seq, (unsigned long long)expect);
        }
        mp_bool(kvs_wire_map_get(m, "done"), &done);
        if (done) {
            return client_read_answer(c, m, false, a);
        }
        uint64_t token = 0;
        const char *text = "";
        size_t n = 0;
        if (!mp_str(kvs_wire_map_get(m, "text"), &text, &n)) {
            client_abandon(c);
            return client_fail(c, KVS_BAD_FORMAT, "streamed piece without text");
        }
        const bool has_tok = mp_u64(kvs_wire_map_get(m, "token"), &token) && token <= INT32_MAX;
        int32_t tok = has_tok ? (int32_t)token : -1;
        if (!cb(tok, text, n, user) || atomic_load(&c->cancel)) {
            client_abandon(c);
            return client_fail(c, KVS_CANCELLED, "query cancelled");
        }
        int rc = client_next(c, &m);
        if (rc == KVS_CANCELLED) {
            client_abandon(c);
            return client_fail(c, KVS_CANCELLED, "query cancelled");
        }
        KVS_TRY(rc);
    }
}

/* ---- flash queries ----------------------------------------------------------------------- */

int kvs_client_flash_register(kvs_client *c, const char *session, const char *name,
                              const char *question, const struct kvs_client_flash_opts *opts)
{
    NEED_SESSION(c, session);
    NEED_NAME(c, name);
    NEED(c, question != NULL && question[0] != '\0', "flash register: empty question");
    NEED(c, strlen(question) <= KVS_WIRE_MAX_STRING, "flash register: question over %u bytes",
         KVS_WIRE_MAX_STRING);
    struct kvs_client_flash_opts o = {0};
    if (opts != NULL) {
        o = *opts;
    }
    NEED(c, o.every_tokens >= 0 && o.min_interval_ms >= 0,
         "every_tokens and min_interval_ms must be >= 0");
    client_req_begin(c, "flash.register");
    client_req_cstr(c, "session", session);
    client_req_cstr(c, "name", name);
    client_req_cstr(c, "question", question);
    KVS_TRY(req_query_opts(c, &o.query));
    client_req_u64(c, "every_tokens", (uint64_t)o.every_tokens);
    client_req_u64(c, "min_interval_ms", (uint64_t)o.min_interval_ms);
    const msgpack_object *m;
    KVS_TRY(client_call(c, session, 0, &m));
    bool ok = false;
    return rep_bool(c, m, "registered", &ok);
}

int kvs_client_flash_unregister(kvs_client *c, const char *session, const char *name)
{
    NEED_SESSION(c, session);
    NEED_NAME(c, name);
    client_req_begin(c, "flash.unregister");
    client_req_cstr(c, "session", session);
    client_req_cstr(c, "name", name);
    const msgpack_object *m;
    KVS_TRY(client_call(c, session, 0, &m));
    bool ok = false;
    return rep_bool(c, m, "unregistered", &ok);
}

int kvs_client_flash_list(kvs_client *c, const char *session, char ***names, int32_t *n)
{
    NEED_SESSION(c, session);
    NEED(c, names != NULL && n != NULL, "flash list: no output");
    client_req_begin(c, "flash.list");
    client_req_cstr(c, "session", session);
    const msgpack_object *m;
    KVS_TRY(client_call(c, session, CALL_RETRY, &m));
    return rep_names(c, m, "names", NULL, names, n);
}

int kvs_client_flash_get(kvs_client *c, const char *session, const char *name,
                         bool allow_stale, struct kvs_client_answer *a)
{
    NEED_SESSION(c, session);
    NEED_NAME(c, name);
    NEED(c, a != NULL, "flash get: no output answer");
    client_req_begin(c, "flash.get");
    client_req_cstr(c, "session", session);
    client_req_cstr(c, "name", name);
    if (allow_stale) {
        client_req_bool(c, "allow_stale", true);
    }
    const msgpack_object *m;
    KVS_TRY(client_call(c, session, CALL_RETRY, &m));
    KVS_TRY(client_read_answer(c, m, true, a));
    snprintf(a->name, sizeof a->name, "%s", name);
    return 0;
}
