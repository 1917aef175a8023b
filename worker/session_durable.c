/* Durability of sessions: what goes into each session's append log and snapshot, and how a
 * registry is restored from them (worker/sesslog.h and worker/snapshot.h hold the formats).
 *
 * Log records (payloads little-endian):
 *   CREATE   u32 1 | u32 format | u32 policy | i64 budget | i32 query_reserve | u32 n_prefix
 *            | i32 prefix[n_prefix]                          (first record of every log)
 *   APPEND   worker/sesslog.h (client id and sequence, version after, token ids)
 *   EVICT    worker/sesslog.h (version after, first cell, cells), written before the APPEND
 *            that needed the room
 *   FLASH_REGISTER   u8 name_len | name | i32 every_tokens | i32 min_interval_ms | f32 temp
 *            | i32 top_k | f32 top_p | f32 min_p | f32 repeat_penalty | i32 repeat_last_n
 *            | u64 seed | i32 max_tokens | u32 n | i32 question[n]
 *   FLASH_UNREGISTER u8 name_len | name
 *   SNAPSHOT u64 version: a snapshot at this version exists; APPEND/EVICT records before it
 *            are covered by it
 * Snapshot metadata: u32 1 | u32 format | u32 policy | i64 budget | i32 query_reserve |
 *   i64 n_prefix | u64 version | u64 appends | i64 appended_total | i64 evicted | i64 n_tokens
 *   | i32 tokens[n_tokens] | u32 n_clients | n_clients x (u64 id, u64 seq, u64 version,
 *   i64 cells, i32 n_tokens, i32 evicted); blocks: the seq's blocks in position order, in the
 *   backend's canonical block layout.
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/status.h"
#include "worker/session_impl.h"
#include "worker/snapshot.h"

/* ---- little-endian writer / reader ---------------------------------------------------- */

struct wbuf {
    uint8_t *p;
    size_t n, cap;
    bool oom;
};

static void put(struct wbuf *w, const void *x, size_t n)
{
    if (w->oom || n == 0) {
        return;
    }
    if (w->n + n > w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 256;
        while (cap < w->n + n) {
            cap *= 2;
        }
        uint8_t *p = realloc(w->p, cap);
        if (p == NULL) {
            w->oom = true;
            return;
        }
        w->p = p;
        w->cap = cap;
    }
    memcpy(w->p + w->n, x, n); /* x86-64 and aarch64 are little-endian */
    w->n += n;
}
#define PUT(w, T, v)                                                                       \
    do {                                                                                   \
        T put_v_ = (T)(v);                                                                 \
        put((w), &put_v_, sizeof put_v_);                                                  \
    } while (0)

struct rbuf {
    const uint8_t *p;
    size_t n, off;
    bool bad;
};

static void get(struct rbuf *r, void *x, size_t n)
{
    if (r->bad || n > r->n - r->off) {
        r->bad = true;
        memset(x, 0, n);
        return;
    }
    memcpy(x, r->p + r->off, n);
    r->off += n;
}
#define GET(r, T, dst)                                                                     \
    do {                                                                                   \
        T get_v_;                                                                          \
        get((r), &get_v_, sizeof get_v_);                                                  \
        (dst) = get_v_;                                                                    \
    } while (0)

/* ---- writing ---------------------------------------------------------------------------- */

static bool logging(const kvs_session *s)
{
    return s->log != NULL && !s->S->restoring;
}

static int log_write(kvs_session *s, uint32_t type, struct wbuf *w, char *err, size_t errlen)
{
    if (w->oom) {
        free(w->p);
        return KVS_NO_MEMORY;
    }
    int rc = kvs_sesslog_append(s->log, type, w->p, w->n);
    free(w->p);
    if (rc < 0 && err != NULL && errlen > 0) {
        snprintf(err, errlen, "session %s: cannot write the log: %s", s->id,
                 kvs_sesslog_last_error(s->log));
    }
    return rc;
}

static void encode_create(const kvs_session *s, struct wbuf *w)
{
    PUT(w, uint32_t, 1);
    PUT(w, uint32_t, s->format);
    PUT(w, uint32_t, s->policy);
    PUT(w, int64_t, s->budget);
    PUT(w, int32_t, s->query_reserve);
    PUT(w, uint32_t, s->n_prefix);
    put(w, s->tokens, (size_t)s->n_prefix * sizeof(int32_t));
}

int kvs_sess_log_create(kvs_session *s, char *err, size_t errlen)
{
    kvs_sessions *S = s->S;
    if (S->data_dir == NULL || S->restoring) {
        return KVS_OK;
    }
    /* a fresh session id must not inherit files of an earlier one */
    kvs_snapshot_remove(S->data_dir, s->id);
    int rc = kvs_sesslog_create(S->data_dir, s->id, &S->ident, S->fsync, &s->log, err, errlen);
    if (rc < 0) {
        return rc;
    }
    struct wbuf w = {0};
    encode_create(s, &w);
    rc = log_write(s, KVS_LOG_CREATE, &w, err, errlen);
    if (rc < 0) {
        kvs_sesslog_close(&s->log);
        kvs_sesslog_remove(S->data_dir, s->id);
    }
    return rc;
}

int kvs_sess_log_append(kvs_session *s, const int32_t *ids, int64_t n, uint64_t client_id,
                        uint64_t client_seq, char *err, size_t errlen)
{
    if (!logging(s)) {
        return KVS_OK;
    }
    struct kvs_log_append a = {.client_id = client_id, .client_seq = client_seq,
                               .version_after = s->version + 1, .n_tokens = (uint32_t)n,
                               .tokens = ids};
    int rc = kvs_sesslog_append_tokens(s->log, &a);
    if (rc < 0 && err != NULL && errlen > 0) {
        snprintf(err, errlen, "session %s: the append was not applied: cannot write the log: %s",
                 s->id, kvs_sesslog_last_error(s->log));
    }
    return rc;
}

int kvs_sess_log_evict(kvs_session *s, int64_t first_cell, int64_t n_cells, char *err,
                       size_t errlen)
{
    if (!logging(s)) {
        return KVS_OK;
    }
    struct kvs_log_evict ev = {.version_after = s->version + 1, .first_cell = (uint32_t)first_cell,
                               .n_cells = (uint32_t)n_cells};
    unsigned char buf[KVS_LOG_EVICT_BYTES];
    kvs_log_evict_encode(&ev, buf);
    int rc = kvs_sesslog_append(s->log, KVS_LOG_EVICT, buf, sizeof buf);
    if (rc < 0 && err != NULL && errlen > 0) {
        snprintf(err, errlen, "session %s: cannot write the log: %s", s->id,
                 kvs_sesslog_last_error(s->log));
    }
    return rc;
}

static void encode_flash(const struct flash *f, struct wbuf *w, bool registered)
{
    uint8_t nl = (uint8_t)strlen(f->name);
    put(w, &nl, 1);
    put(w, f->name, nl);
    if (!registered) {
        return;
    }
    PUT(w, int32_t, f->trigger.every_tokens);
    PUT(w, int32_t, f->trigger.min_interval_ms);
    PUT(w, float, f->opts.sampling.temperature);
    PUT(w, int32_t, f->opts.sampling.top_k);
    PUT(w, float, f->opts.sampling.top_p);
    PUT(w, float, f->opts.sampling.min_p);
    PUT(w, float, f->opts.sampling.repeat_penalty);
    PUT(w, int32_t, f->opts.sampling.repeat_last_n);
    PUT(w, uint64_t, f->opts.sampling.seed);
    PUT(w, int32_t, f->opts.max_tokens);
    PUT(w, uint32_t, f->n_question);
    put(w, f->question, (size_t)f->n_question * sizeof(int32_t));
}

int kvs_sess_log_flash(kvs_session *s, const struct flash *f, bool registered)
{
    if (!logging(s)) {
        return KVS_OK;
    }
    struct wbuf w = {0};
    encode_flash(f, &w, registered);
    return log_write(s, registered ? KVS_LOG_FLASH_REGISTER : KVS_LOG_FLASH_UNREGISTER, &w, NULL,
                     0);
}

void kvs_sess_log_close(kvs_session *s, bool remove_files)
{
    kvs_sesslog_close(&s->log);
    if (remove_files && s->S->data_dir != NULL) {
        kvs_sesslog_remove(s->S->data_dir, s->id);
        kvs_snapshot_remove(s->S->data_dir, s->id);
    }
}

/* ---- snapshots -------------------------------------------------------------------------- */

static int snap_read_block(uint32_t i, void *buf, void *user)
{
    kvs_session *s = user;
    kvs_engine *e = s->S->e;
    return e->backend->ops->kv_read_block(e->backend, kvs_pool_kv(e->pool), s->seq->table[i], buf);
}

int kvs_session_snapshot(kvs_session *s, bool compact, char *err, size_t errlen)
{
    kvs_sessions *S = s->S;
    kvs_engine *e = S->e;
    if (S->data_dir == NULL || s->log == NULL) {
        snprintf(err, errlen, "session %s has no data directory", s->id);
        return KVS_UNSUPPORTED;
    }
    if (e->backend->ops->kv_read_block == NULL) {
        snprintf(err, errlen, "the %s backend cannot read KV blocks", e->backend->ops->name);
        return KVS_UNSUPPORTED;
    }
    struct wbuf m = {0};
    PUT(&m, uint32_t, 1);
    PUT(&m, uint32_t, s->format);
    PUT(&m, uint32_t, s->policy);
    PUT(&m, int64_t, s->budget);
    PUT(&m, int32_t, s->query_reserve);
    PUT(&m, int64_t, s->n_prefix);
    PUT(&m, uint64_t, s->version);
    PUT(&m, uint64_t, s->appends);
    PUT(&m, int64_t, s->appended_total);
    PUT(&m, int64_t, s->evicted);
    PUT(&m, int64_t, s->n_tokens);
    put(&m, s->tokens, (size_t)s->n_tokens * sizeof(int32_t));
    uint32_t n_clients = 0;
    for (int32_t i = 0; i < KVS_CLIENTS_MAX; i++) {
        n_clients += s->clients[i].client_id != 0;
    }
    PUT(&m, uint32_t, n_clients);
    for (int32_t i = 0; i < KVS_CLIENTS_MAX; i++) {
        const struct client_ack *c = &s->clients[i];
        if (c->client_id != 0) {
            PUT(&m, uint64_t, c->client_id);
            PUT(&m, uint64_t, c->client_seq);
            PUT(&m, uint64_t, c->ack.version);
            PUT(&m, int64_t, c->ack.cells);
            PUT(&m, int32_t, c->ack.n_tokens);
            PUT(&m, int32_t, c->ack.evicted);
        }
    }
    if (m.oom) {
        free(m.p);
        return KVS_NO_MEMORY;
    }
    int32_t bs = kvs_pool_block_size(e->pool);
    uint32_t n_blocks = (uint32_t)((s->seq->n_cells + bs - 1) / bs);
    int rc = kvs_snapshot_write(S->data_dir, s->id, &S->ident, m.p, m.n, n_blocks,
                                kvs_kv_block_bytes(kvs_pool_layout(e->pool)), snap_read_block, s,
                                err, errlen);
    free(m.p);
    if (rc < 0) {
        return rc;
    }
    uint64_t v = s->version;
    rc = kvs_sesslog_append(s->log, KVS_LOG_SNAPSHOT, &v, sizeof v);
    if (rc < 0) {
        snprintf(err, errlen, "cannot log the snapshot: %s", kvs_sesslog_last_error(s->log));
        return rc;
    }
    if (!compact) {
        return KVS_OK;
    }
    /* the new log: CREATE, SNAPSHOT, then the flash queries registered now */
    struct wbuf c = {0};
    encode_create(s, &c);
    struct wbuf *fw = calloc((size_t)s->n_flash + 1, sizeof *fw);
    struct kvs_log_record *recs = calloc((size_t)s->n_flash + 2, sizeof *recs);
    rc = KVS_NO_MEMORY;
    if (fw != NULL && recs != NULL && !c.oom) {
        recs[0] = (struct kvs_log_record){KVS_LOG_CREATE, c.p, c.n};
        recs[1] = (struct kvs_log_record){KVS_LOG_SNAPSHOT, &v, sizeof v};
        bool oom = false;
        for (int32_t i = 0; i < s->n_flash; i++) {
            encode_flash(&s->flash[i], &fw[i], true);
            oom = oom || fw[i].oom;
            recs[2 + i] = (struct kvs_log_record){KVS_LOG_FLASH_REGISTER, fw[i].p, fw[i].n};
        }
        rc = oom ? KVS_NO_MEMORY
                 : kvs_sesslog_rewrite(s->log, recs, (size_t)s->n_flash + 2,
                                       kvs_sesslog_end(s->log));
        if (rc < 0) {
            snprintf(err, errlen, "snapshot written, log not compacted: %s",
                     kvs_sesslog_last_error(s->log));
        }
    }
    for (int32_t i = 0; fw != NULL && i < s->n_flash; i++) {
        free(fw[i].p);
    }
    free(fw);
    free(recs);
    free(c.p);
    return rc;
}

/* ---- restore ---------------------------------------------------------------------------- */

struct restore {
    kvs_sessions *S;
    const char *id;
    kvs_session *s;       /* built so far */
    bool from_snapshot;   /* the session came from its snapshot */
    uint64_t snap_version;/* version of that snapshot */
    bool past_snapshot;   /* APPEND/EVICT records now apply (after the matching marker) */
    char *err;
    size_t errlen;
};

static int snap_meta(const void *meta, size_t len, uint32_t n_blocks, size_t block_bytes,
                     void *user)
{
    struct restore *rs = user;
    kvs_sessions *S = rs->S;
    kvs_engine *e = S->e;
    struct rbuf r = {meta, len, 0, false};
    uint32_t ver, format, policy, n_clients;
    int64_t budget, n_prefix, appended_total, evicted, n_tokens;
    int32_t reserve;
    uint64_t version, appends;
    GET(&r, uint32_t, ver);
    GET(&r, uint32_t, format);
    GET(&r, uint32_t, policy);
    GET(&r, int64_t, budget);
    GET(&r, int32_t, reserve);
    GET(&r, int64_t, n_prefix);
    GET(&r, uint64_t, version);
    GET(&r, uint64_t, appends);
    GET(&r, int64_t, appended_total);
    GET(&r, int64_t, evicted);
    GET(&r, int64_t, n_tokens);
    int32_t bs = kvs_pool_block_size(e->pool);
    if (r.bad || ver != 1 || format > KVS_FORMAT_CHAT || policy > KVS_POLICY_SLIDE ||
        n_tokens < 0 || n_prefix < 0 || n_prefix > n_tokens || n_tokens > budget ||
        (uint64_t)n_tokens * 4 > len - r.off ||
        n_blocks != (uint32_t)((n_tokens + bs - 1) / bs) ||
        block_bytes != kvs_kv_block_bytes(kvs_pool_layout(e->pool))) {
        snprintf(rs->err, rs->errlen, "snapshot of %s: inconsistent metadata", rs->id);
        return KVS_BAD_FORMAT;
    }
    int rc = kvs_sess_new(S, rs->id, (enum kvs_session_format)format,
                          (enum kvs_context_policy)policy, budget, reserve, NULL, 0, &rs->s,
                          rs->err, rs->errlen);
    if (rc < 0) {
        return rc;
    }
    kvs_session *s = rs->s;
    s->tokens = malloc(((size_t)n_tokens + 1) * sizeof *s->tokens);
    if (s->tokens == NULL) {
        return KVS_NO_MEMORY;
    }
    get(&r, s->tokens, (size_t)n_tokens * sizeof *s->tokens);
    s->n_tokens = s->cap_tokens = n_tokens;
    s->n_prefix = n_prefix;
    s->version = version;
    s->appends = appends;
    s->appended_total = appended_total;
    s->evicted = evicted;
    GET(&r, uint32_t, n_clients);
    for (uint32_t i = 0; i < n_clients && i < KVS_CLIENTS_MAX && !r.bad; i++) {
        struct client_ack *c = &s->clients[i];
        GET(&r, uint64_t, c->client_id);
        GET(&r, uint64_t, c->client_seq);
        GET(&r, uint64_t, c->ack.version);
        GET(&r, int64_t, c->ack.cells);
        GET(&r, int32_t, c->ack.n_tokens);
        GET(&r, int32_t, c->ack.evicted);
    }
    if (r.bad) {
        snprintf(rs->err, rs->errlen, "snapshot of %s: truncated metadata", rs->id);
        return KVS_BAD_FORMAT;
    }
    rc = kvs_pool_seq_reserve(e->pool, s->seq, (int32_t)n_tokens);
    if (rc < 0) {
        snprintf(rs->err, rs->errlen, "snapshot of %s: no KV for %lld cells", rs->id,
                 (long long)n_tokens);
        return rc;
    }
    kvs_pool_seq_commit(e->pool, s->seq, (int32_t)n_tokens);
    s->visible = n_tokens;
    rs->snap_version = version;
    return KVS_OK;
}

static int snap_block(uint32_t i, const void *buf, void *user)
{
    struct restore *rs = user;
    kvs_engine *e = rs->S->e;
    return e->backend->ops->kv_write_block(e->backend, kvs_pool_kv(e->pool), rs->s->seq->table[i],
                                           buf);
}

static int decode_flash(struct restore *rs, const void *payload, size_t len, bool registered)
{
    struct rbuf r = {payload, len, 0, false};
    uint8_t nl;
    char name[KVS_FLASH_NAME_MAX + 1];
    GET(&r, uint8_t, nl);
    if (r.bad || nl == 0 || nl > KVS_FLASH_NAME_MAX) {
        return KVS_BAD_FORMAT;
    }
    get(&r, name, nl);
    name[nl] = '\0';
    if (!registered) {
        int rc = kvs_flash_unregister(rs->s, name);
        return rc == KVS_NOT_FOUND ? KVS_OK : rc;
    }
    struct kvs_flash_trigger t;
    struct kvs_query_opts o = {0};
    uint32_t nq;
    GET(&r, int32_t, t.every_tokens);
    GET(&r, int32_t, t.min_interval_ms);
    GET(&r, float, o.sampling.temperature);
    GET(&r, int32_t, o.sampling.top_k);
    GET(&r, float, o.sampling.top_p);
    GET(&r, float, o.sampling.min_p);
    GET(&r, float, o.sampling.repeat_penalty);
    GET(&r, int32_t, o.sampling.repeat_last_n);
    GET(&r, uint64_t, o.sampling.seed);
    GET(&r, int32_t, o.max_tokens);
    GET(&r, uint32_t, nq);
    if (r.bad || nq == 0 || (uint64_t)nq * 4 != len - r.off) {
        return KVS_BAD_FORMAT;
    }
    int32_t *q = malloc((size_t)nq * sizeof *q);
    if (q == NULL) {
        return KVS_NO_MEMORY;
    }
    get(&r, q, (size_t)nq * sizeof *q);
    char err[256];
    int rc = kvs_sess_flash_add(rs->s, name, q, (int32_t)nq, &o, &t, false, err, sizeof err);
    free(q);
    if (rc == KVS_ALREADY_EXISTS) {
        return KVS_OK; /* a compacted log re-registers what the snapshot's log had */
    }
    return rc;
}

static int on_record(uint32_t type, const void *payload, size_t len, uint64_t offset, void *user)
{
    (void)offset;
    struct restore *rs = user;
    kvs_sessions *S = rs->S;
    int32_t bs = kvs_pool_block_size(S->e->pool);
    if (type == KVS_LOG_CREATE) {
        if (rs->s != NULL) {
            return KVS_OK; /* came from the snapshot */
        }
        struct rbuf r = {payload, len, 0, false};
        uint32_t ver, format, policy, n_prefix;
        int64_t budget;
        int32_t reserve;
        GET(&r, uint32_t, ver);
        GET(&r, uint32_t, format);
        GET(&r, uint32_t, policy);
        GET(&r, int64_t, budget);
        GET(&r, int32_t, reserve);
        GET(&r, uint32_t, n_prefix);
        if (r.bad || ver != 1 || format > KVS_FORMAT_CHAT || policy > KVS_POLICY_SLIDE ||
            (uint64_t)n_prefix * 4 != len - r.off) {
            snprintf(rs->err, rs->errlen, "log of %s: malformed CREATE record", rs->id);
            return KVS_BAD_FORMAT;
        }
        int32_t *pre = malloc(((size_t)n_prefix + 1) * sizeof *pre);
        if (pre == NULL) {
            return KVS_NO_MEMORY;
        }
        get(&r, pre, (size_t)n_prefix * sizeof *pre);
        int rc = kvs_sess_new(S, rs->id, (enum kvs_session_format)format,
                              (enum kvs_context_policy)policy, budget, reserve, pre, n_prefix,
                              &rs->s, rs->err, rs->errlen);
        free(pre);
        rs->past_snapshot = true; /* replaying from the start */
        return rc;
    }
    if (rs->s == NULL) {
        snprintf(rs->err, rs->errlen, "log of %s: records before its CREATE record", rs->id);
        return KVS_BAD_FORMAT;
    }
    switch (type) {
    case KVS_LOG_SNAPSHOT: {
        uint64_t v = 0;
        if (len != sizeof v) {
            return KVS_BAD_FORMAT;
        }
        memcpy(&v, payload, sizeof v);
        if (rs->from_snapshot && v == rs->snap_version) {
            rs->past_snapshot = true;
        }
        return KVS_OK;
    }
    case KVS_LOG_APPEND: {
        if (!rs->past_snapshot) {
            return KVS_OK; /* covered by the snapshot */
        }
        struct kvs_log_append a;
        if (kvs_log_append_decode(payload, len, &a) < 0 || a.n_tokens == 0) {
            return KVS_BAD_FORMAT;
        }
        int32_t *ids = malloc((size_t)a.n_tokens * sizeof *ids);
        if (ids == NULL) {
            return KVS_NO_MEMORY;
        }
        kvs_log_append_tokens(&a, ids);
        struct kvs_append_result res;
        int rc = kvs_sess_append_ids(rs->s, ids, a.n_tokens, a.client_id, a.client_seq, &res,
                                     rs->err, rs->errlen);
        free(ids);
        if (rc == 0 && res.version != a.version_after) {
            KVS_WARN("restore %s: version %llu after an append, the log says %llu", rs->id,
                     (unsigned long long)res.version, (unsigned long long)a.version_after);
        }
        return rc;
    }
    case KVS_LOG_EVICT: {
        if (!rs->past_snapshot) {
            return KVS_OK;
        }
        struct kvs_log_evict ev;
        if (kvs_log_evict_decode(payload, len, &ev) < 0 || ev.first_cell % (uint32_t)bs != 0) {
            return KVS_BAD_FORMAT;
        }
        int gone = kvs_sess_evict(rs->s, (int32_t)(ev.first_cell / (uint32_t)bs),
                                  (int32_t)((ev.n_cells + (uint32_t)bs - 1) / (uint32_t)bs),
                                  rs->err, rs->errlen);
        return gone < 0 ? gone : KVS_OK;
    }
    case KVS_LOG_FLASH_REGISTER:
        return decode_flash(rs, payload, len, true);
    case KVS_LOG_FLASH_UNREGISTER:
        return decode_flash(rs, payload, len, false);
    default:
        KVS_WARN("restore %s: skipping a record of unknown type %u", rs->id, type);
        return KVS_OK;
    }
}

/* Restore one session; 0 or an error with the reason in err. */
static int restore_one(kvs_sessions *S, const char *id, char *err, size_t errlen)
{
    struct restore rs = {.S = S, .id = id, .err = err, .errlen = errlen};
    char serr[256] = "";
    int rc = kvs_snapshot_read(S->data_dir, id, &S->ident, snap_meta, snap_block, &rs, serr,
                               sizeof serr);
    if (rc == 0) {
        rs.from_snapshot = true;
    } else {
        if (rc != KVS_NOT_FOUND) {
            KVS_WARN("restore %s: snapshot refused (%s); replaying the log", id, serr);
        }
        if (rs.s != NULL) { /* a half-read snapshot: start over from the log */
            kvs_session_close(S, id);
            rs.s = NULL;
        }
    }
    S->restoring = true;
    struct kvs_replay_stats st;
    kvs_sesslog *log = NULL;
    rc = kvs_sesslog_open_replay(S->data_dir, id, &S->ident, S->fsync, on_record, &rs, &st, &log,
                                 err, errlen);
    S->restoring = false;
    if (rc == 0 && rs.s == NULL) {
        snprintf(err, errlen, "log of %s holds no CREATE record", id);
        rc = KVS_BAD_FORMAT;
    }
    if (rc == 0 && rs.from_snapshot && !rs.past_snapshot) {
        snprintf(err, errlen, "log of %s does not reach its snapshot (version %llu)", id,
                 (unsigned long long)rs.snap_version);
        rc = KVS_BAD_FORMAT;
    }
    if (rc < 0) {
        kvs_sesslog_close(&log);
        if (rs.s != NULL) {
            /* drop what was built, keep the files for an operator */
            kvs_session *s = rs.s;
            for (int32_t i = 0; i < S->n; i++) {
                if (S->all[i] == s) {
                    S->all[i] = S->all[--S->n];
                    break;
                }
            }
            S->reserved_blocks -= s->reserved_blocks;
            kvs_sess_free(s);
        }
        return rc;
    }
    if (st.tail != KVS_REPLAY_CLEAN) {
        KVS_WARN("restore %s: dropped a %s log tail of %llu bytes (%s)", id,
                 kvs_replay_tail_name(st.tail), (unsigned long long)st.dropped_bytes, st.reason);
    }
    rs.s->log = log;
    return KVS_OK;
}

int kvs_sessions_restore(kvs_sessions *S, char *err, size_t errlen)
{
    if (err != NULL && errlen > 0) {
        err[0] = '\0';
    }
    if (S->data_dir == NULL) {
        return 0;
    }
    DIR *d = opendir(S->data_dir);
    if (d == NULL) {
        if (err != NULL && errlen > 0) {
            snprintf(err, errlen, "cannot list %s", S->data_dir);
        }
        return KVS_IO;
    }
    int restored = 0;
    size_t used = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        size_t n = strlen(de->d_name);
        if (n < 5 || strcmp(de->d_name + n - 4, ".log") != 0 || n - 4 > KVS_SESSION_ID_MAX) {
            continue;
        }
        char id[KVS_SESSION_ID_MAX + 1];
        memcpy(id, de->d_name, n - 4);
        id[n - 4] = '\0';
        if (kvs_sesslog_check_id(id) < 0 || kvs_session_find(S, id) != NULL) {
            continue;
        }
        char why[512] = "";
        int rc = restore_one(S, id, why, sizeof why);
        if (rc == 0) {
            restored++;
        } else {
            KVS_ERROR("restore %s: %s (%s)", id, why, kvs_status_name(rc));
            if (err != NULL && used + 2 < errlen) {
                used += (size_t)snprintf(err + used, errlen - used, "%s%s: %s",
                                         used ? "; " : "", id, why);
                used = used < errlen ? used : errlen - 1;
            }
        }
    }
    closedir(d);
    return restored;
}

/* Move dir_from/<id><suffix> to dir_to/<id><suffix> when it exists. 0, 1 (nothing to
 * move), or KVS_IO with err. */
static int move_file(const char *dir_from, const char *dir_to, const char *id, const char *suffix,
                     char *err, size_t errlen)
{
    char a[4096], b[4096];
    if ((size_t)snprintf(a, sizeof a, "%s/%s%s", dir_from, id, suffix) >= sizeof a ||
        (size_t)snprintf(b, sizeof b, "%s/%s%s", dir_to, id, suffix) >= sizeof b) {
        snprintf(err, errlen, "path of %s too long", id);
        return KVS_IO;
    }
    if (rename(a, b) == 0) {
        return 0;
    }
    if (errno == ENOENT && access(a, F_OK) != 0) {
        return 1;
    }
    snprintf(err, errlen, "cannot move %s to %s: %s", a, b, strerror(errno));
    return KVS_IO;
}

int kvs_session_adopt(kvs_sessions *S, const char *from_dir, const char *id, char *err,
                      size_t errlen)
{
    err[0] = '\0';
    if (S->data_dir == NULL) {
        snprintf(err, errlen, "this worker has no data dir: nothing to adopt from");
        return KVS_UNSUPPORTED;
    }
    if (kvs_sesslog_check_id(id) < 0) {
        snprintf(err, errlen, "bad session id '%s'", id);
        return KVS_INVALID_ARGUMENT;
    }
    if (kvs_session_find(S, id) != NULL) {
        snprintf(err, errlen, "session '%s' is open on this worker already", id);
        return KVS_ALREADY_EXISTS;
    }
    char here[4096];
    snprintf(here, sizeof here, "%s/%s.log", S->data_dir, id);
    bool have_here = access(here, F_OK) == 0;
    bool moved = false;
    if (from_dir != NULL && strcmp(from_dir, S->data_dir) != 0) {
        char there[4096];
        snprintf(there, sizeof there, "%s/%s.log", from_dir, id);
        bool have_there = access(there, F_OK) == 0;
        if (have_there && have_here) {
            snprintf(err, errlen, "session '%s' has a log both in %s and in %s: an operator must "
                     "choose", id, from_dir, S->data_dir);
            return KVS_ALREADY_EXISTS;
        }
        if (have_there) {
            /* the snapshot first, then the log: whichever directory holds the log owns it */
            int rc = move_file(from_dir, S->data_dir, id, ".snap", err, errlen);
            if (rc >= 0) {
                rc = move_file(from_dir, S->data_dir, id, ".log", err, errlen);
            }
            if (rc < 0) {
                move_file(S->data_dir, from_dir, id, ".snap", err + strlen(err), 0);
                return rc;
            }
            moved = true;
        }
        /* else: moved by an earlier attempt that did not finish; restore from here */
    }
    if (!moved && !have_here) {
        snprintf(err, errlen, "session '%s' has no log in %s", id,
                 from_dir != NULL ? from_dir : S->data_dir);
        return KVS_NOT_FOUND;
    }
    int rc = restore_one(S, id, err, errlen);
    if (rc < 0 && moved) {
        /* give the files back: another worker may adopt the session */
        char ignore[8];
        move_file(S->data_dir, from_dir, id, ".log", ignore, sizeof ignore);
        move_file(S->data_dir, from_dir, id, ".snap", ignore, sizeof ignore);
    }
    if (rc == 0) {
        KVS_INFO("session %s adopted from %s", id, from_dir != NULL ? from_dir : S->data_dir);
    }
    return rc;
}

int kvs_session_release(kvs_sessions *S, const char *id, struct kvs_session_info *info, char *err,
                        size_t errlen)
{
    err[0] = '\0';
    kvs_session *s = kvs_session_find(S, id);
    if (s == NULL) {
        snprintf(err, errlen, "session '%s' is not open here", id);
        return KVS_NOT_FOUND;
    }
    if (S->data_dir == NULL || s->log == NULL) {
        snprintf(err, errlen, "this worker has no data dir: session '%s' cannot be handed over",
                 id);
        return KVS_UNSUPPORTED;
    }
    /* on disk before it is let go, whatever --fsync says: the next owner reads it */
    if (kvs_sesslog_sync(s->log) < 0) {
        snprintf(err, errlen, "the log of session '%s' could not be written to disk", id);
        return KVS_IO;
    }
    kvs_session_info(s, info);
    for (int32_t i = 0; i < S->n; i++) {
        if (S->all[i] == s) {
            S->all[i] = S->all[--S->n];
            break;
        }
    }
    S->reserved_blocks -= s->reserved_blocks;
    kvs_sess_log_close(s, false);
    kvs_sess_free(s);
    KVS_INFO("session %s released (its files stay in %s)", id, S->data_dir);
    return KVS_OK;
}
