#include "session.h"

#include <errno.h>
#include <stdio.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/status.h"
#include "kernels/dtype.h"
#include "worker/chat.h"

#include <math.h>

#include "worker/session_impl.h"

/* ---- helpers ---------------------------------------------------------------------------- */

#define ERR(code, ...)                                                                     \
    do {                                                                                   \
        if (err != NULL && errlen > 0) {                                                   \
            snprintf(err, errlen, __VA_ARGS__);                                            \
        }                                                                                  \
        return (code);                                                                     \
    } while (0)

static bool valid_name(const char *s, size_t max)
{
    size_t n = s != NULL ? strlen(s) : 0;
    if (n == 0 || n > max || s[0] == '.') {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-')) {
            return false;
        }
    }
    return true;
}

int32_t kvs_sess_blocks_for(const kvs_sessions *S, int64_t cells)
{
    int32_t bs = kvs_pool_block_size(S->e->pool);
    /* + 1: a fork's copy-on-write of a shared partial tail */
    return (int32_t)((cells + bs - 1) / bs) + 1;
}

/* Blocks not promised to anyone: the pool (times the overcommit ratio) minus session and
 * query reservations minus the shared prefix blocks in use (counted once, whoever uses them). */
int32_t kvs_sess_blocks_free(const kvs_sessions *S)
{
    int32_t n = kvs_pool_n_blocks(S->e->pool);
    if (S->overcommit > 1.0f) {
        n = (int32_t)((double)n * S->overcommit);
    }
    return n - S->reserved_blocks - kvs_pool_n_indexed_in_use(S->e->pool);
}

int64_t kvs_sessions_cells_free(const kvs_sessions *S)
{
    int64_t blocks = kvs_sess_blocks_free(S);
    return blocks > 0 ? blocks * kvs_pool_block_size(S->e->pool) : 0;
}

/* Growable int32 buffer. */
struct ids {
    int32_t *v;
    size_t n, cap;
};

static int ids_push(struct ids *b, const int32_t *x, size_t n)
{
    if (n == 0) {
        return KVS_OK;
    }
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->n + n) {
            cap *= 2;
        }
        int32_t *v = realloc(b->v, cap * sizeof *v);
        if (v == NULL) {
            return KVS_NO_MEMORY;
        }
        b->v = v;
        b->cap = cap;
    }
    memcpy(b->v + b->n, x, n * sizeof *x);
    b->n += n;
    return KVS_OK;
}

/* Tokenize text into b (no BOS/EOS unless bos); special: parse special-token text. */
static int tok_append(const kvs_engine *e, struct ids *b, const char *text, size_t len,
                      bool bos, bool special)
{
    if (len == 0 && !bos) {
        return KVS_OK;
    }
    size_t need = 0;
    int rc = kvs_tokenizer_encode(e->tok, text, len, false, special, NULL, 0, &need);
    if (rc < 0 && rc != KVS_TOO_LARGE) {
        return rc;
    }
    int32_t *tmp = malloc((need + 2) * sizeof *tmp);
    if (tmp == NULL) {
        return KVS_NO_MEMORY;
    }
    size_t n = 0;
    if (bos && kvs_tokenizer_add_bos(e->tok) && kvs_tokenizer_bos(e->tok) != KVS_TOKEN_NONE) {
        tmp[n++] = kvs_tokenizer_bos(e->tok);
    }
    size_t got = 0;
    rc = kvs_tokenizer_encode(e->tok, text, len, false, special, tmp + n, need + 1, &got);
    if (rc == 0) {
        rc = ids_push(b, tmp, n + got);
    }
    free(tmp);
    return rc;
}

/* Marker splitting a rendered template into the text before and after the content. */
#define CONTENT_MARK "\x01kvs-content\x01"

/* Tokenize a template rendering around content: template text with special-token parsing,
 * the content without it. kind: 0 = record, 1 = question, 2 = system prefix. */
static int tok_templated(const kvs_sessions *S, struct ids *b, int kind, const char *text,
                         size_t len, bool bos)
{
    const kvs_engine *e = S->e;
    char buf[1024];
    size_t n = 0;
    int rc;
    const char *mark = CONTENT_MARK;
    if (kind == 0) {
        rc = kvs_chat_format_record(&S->chat, mark, strlen(mark), buf, sizeof buf, &n);
    } else if (kind == 1) {
        rc = kvs_chat_format_question(&S->chat, mark, strlen(mark), buf, sizeof buf, &n);
    } else {
        struct kvs_chat_msg m = {KVS_CHAT_SYSTEM, mark, strlen(mark)};
        rc = kvs_chat_format(&S->chat, &m, 1, false, buf, sizeof buf, &n);
    }
    if (rc < 0) {
        return rc;
    }
    const char *at = strstr(buf, mark);
    if (at == NULL) {
        return KVS_INTERNAL;
    }
    size_t pre = (size_t)(at - buf), post = pre + strlen(mark);
    KVS_TRY(tok_append(e, b, buf, pre, bos, true));
    KVS_TRY(tok_append(e, b, text, len, false, false));
    return tok_append(e, b, buf + post, n - post, false, true);
}

static int frame_record(const kvs_session *s, struct ids *b, const char *text, size_t len)
{
    if (s->format == KVS_FORMAT_CHAT) {
        return tok_templated(s->S, b, 0, text, len, false);
    }
    KVS_TRY(tok_append(s->S->e, b, text, len, false, false));
    if (len == 0 || text[len - 1] != '\n') {
        KVS_TRY(tok_append(s->S->e, b, "\n", 1, false, false));
    }
    return KVS_OK;
}

static int frame_question(const kvs_session *s, struct ids *b, const char *text, size_t len)
{
    if (s->format == KVS_FORMAT_CHAT) {
        return tok_templated(s->S, b, 1, text, len, false);
    }
    return tok_append(s->S->e, b, text, len, false, false);
}

int kvs_sess_frame(const kvs_session *s, bool question, const char *text, size_t len,
                   int32_t **ids, int64_t *n)
{
    struct ids b = {0};
    int rc = question ? frame_question(s, &b, text, len) : frame_record(s, &b, text, len);
    if (rc < 0) {
        free(b.v);
        return rc;
    }
    *ids = b.v;
    *n = (int64_t)b.n;
    return KVS_OK;
}

static int record_tokens(kvs_session *s, const int32_t *ids, int64_t n)
{
    if (n == 0) {
        return KVS_OK;
    }
    if (s->n_tokens + n > s->cap_tokens) {
        int64_t cap = s->cap_tokens ? s->cap_tokens : 256;
        while (cap < s->n_tokens + n) {
            cap *= 2;
        }
        int32_t *t = realloc(s->tokens, (size_t)cap * sizeof *t);
        if (t == NULL) {
            return KVS_NO_MEMORY;
        }
        s->tokens = t;
        s->cap_tokens = cap;
    }
    memcpy(s->tokens + s->n_tokens, ids, (size_t)n * sizeof *ids);
    s->n_tokens += n;
    return KVS_OK;
}

/* ---- registry --------------------------------------------------------------------------- */

int kvs_sessions_new(kvs_engine *e, const struct kvs_sessions_opts *o, kvs_sessions **out)
{
    *out = NULL;
    kvs_sessions *S = calloc(1, sizeof *S);
    if (S == NULL) {
        return KVS_NO_MEMORY;
    }
    S->e = e;
    S->overcommit = 1.0f;
    if (o != NULL && o->data_dir != NULL) {
        S->data_dir = strdup(o->data_dir);
        S->fsync = o->fsync;
        const struct kvs_kv_layout *l = kvs_pool_layout(e->pool);
        S->ident.kv_dtype = l->dtype;
        S->ident.block_size = (uint32_t)l->block_size;
        if (S->data_dir == NULL || kvs_model_sha256(e->model, S->ident.model_sha256) < 0 ||
            (mkdir(S->data_dir, 0700) < 0 && errno != EEXIST)) {
            free(S->data_dir);
            free(S);
            return KVS_IO;
        }
    }
    const char *tmpl = kvs_tokenizer_chat_template(e->tok);
    kvs_chat_template_init(&S->chat, tmpl, tmpl != NULL ? strlen(tmpl) : 0);
    *out = S;
    return KVS_OK;
}

void kvs_sess_free(kvs_session *s)
{
    if (s == NULL) {
        return;
    }
    kvs_sess_log_close(s, false);
    kvs_pool_seq_release(s->S->e->pool, &s->seq);
    for (int32_t i = 0; i < s->n_flash; i++) {
        free(s->flash[i].question);
        kvs_answer_free(&s->flash[i].answer);
    }
    free(s->flash);
    free(s->tokens);
    free(s->clients);
    free(s);
}

void kvs_sessions_destroy(kvs_sessions **Sp)
{
    if (Sp == NULL || *Sp == NULL) {
        return;
    }
    kvs_sessions *S = *Sp;
    for (int32_t i = 0; i < S->n; i++) {
        kvs_sess_free(S->all[i]);
    }
    free(S->all);
    free(S->data_dir);
    free(S);
    *Sp = NULL;
}

int32_t kvs_sessions_count(const kvs_sessions *S)
{
    return S->n;
}

kvs_session *kvs_sessions_at(const kvs_sessions *S, int32_t i)
{
    return i >= 0 && i < S->n ? S->all[i] : NULL;
}

kvs_session *kvs_session_find(const kvs_sessions *S, const char *id)
{
    for (int32_t i = 0; i < S->n; i++) {
        if (strcmp(S->all[i]->id, id) == 0) {
            return S->all[i];
        }
    }
    return NULL;
}

const char *kvs_session_id(const kvs_session *s)
{
    return s->id;
}

const kvs_seq *kvs_session_seq(const kvs_session *s)
{
    return s->seq;
}

const int32_t *kvs_session_tokens(const kvs_session *s, int64_t *n)
{
    *n = s->n_tokens;
    return s->tokens;
}

const char *kvs_context_policy_name(enum kvs_context_policy p)
{
    return p == KVS_POLICY_SLIDE ? "slide" : "reject";
}

const char *kvs_session_format_name(enum kvs_session_format f)
{
    return f == KVS_FORMAT_CHAT ? "chat" : "raw";
}

void kvs_session_info(const kvs_session *s, struct kvs_session_info *info)
{
    *info = (struct kvs_session_info){
        .version = s->version,
        .appends = s->appends,
        .prefix_tokens = s->n_prefix,
        .data_tokens = s->n_tokens - s->n_prefix,
        .cells_used = s->seq->n_cells,
        .cells_budget = s->budget,
        .evicted_tokens = s->evicted,
        .flash_queries = s->n_flash,
        .format = s->format,
        .policy = s->policy,
    };
}

/* Prefill ids after the seq's cells. On failure the seq's committed cells are unchanged. */
static int prefill(kvs_session *s, const int32_t *ids, int64_t n)
{
    kvs_engine *e = s->S->e;
    int rc = kvs_engine_prefill(e, s->seq, ids, (int32_t)n, NULL, NULL);
    if (rc < 0) {
        kvs_pool_seq_trim(e->pool, s->seq);
    }
    return rc;
}

int kvs_sess_new(kvs_sessions *S, const char *id, enum kvs_session_format format,
                 enum kvs_context_policy policy, int64_t budget, int32_t query_reserve,
                 const int32_t *prefix, int64_t n_prefix, kvs_session **out, char *err,
                 size_t errlen)
{
    *out = NULL;
    kvs_engine *e = S->e;
    if (!valid_name(id, KVS_SESSION_ID_MAX)) {
        ERR(KVS_INVALID_ARGUMENT, "invalid session id (1..%u bytes of [A-Za-z0-9._-], not "
                                  "starting with '.')",
            (unsigned)KVS_SESSION_ID_MAX);
    }
    if (kvs_session_find(S, id) != NULL) {
        ERR(KVS_ALREADY_EXISTS, "session '%s' already exists", id);
    }
    if (budget < 1 || budget > e->n_ctx) {
        ERR(KVS_INVALID_ARGUMENT, "budget %lld cells must be in [1, %lld]", (long long)budget,
            (long long)e->n_ctx);
    }
    if (n_prefix > budget) {
        ERR(KVS_CONTEXT_FULL, "the prefix (%lld tokens) does not fit the budget of %lld cells",
            (long long)n_prefix, (long long)budget);
    }
    /* Leading full blocks of the prefix that another session already computed are shared
     * (prefix index); the others are computed and indexed below. Shared prefix blocks are
     * counted once (kvs_sess_blocks_free), so a session reserves its budget minus them. */
    int32_t bs = kvs_pool_block_size(e->pool);
    int32_t full = (int32_t)(n_prefix / bs);
    kvs_seq *seq = kvs_pool_seq_new(e->pool);
    if (seq == NULL) {
        return KVS_NO_MEMORY;
    }
    int32_t shared = prefix != NULL && n_prefix > 0
                         ? kvs_pool_seq_share_prefix(e->pool, seq, prefix, (int32_t)n_prefix)
                         : 0;
    int32_t blocks = kvs_sess_blocks_for(S, budget) - full;
    int32_t new_shared = full - shared / bs; /* prefix blocks this session adds to the index */
    if (blocks + new_shared > kvs_sess_blocks_free(S)) {
        kvs_pool_seq_release(e->pool, &seq);
        S->admission_refused++;
        ERR(KVS_CAPACITY, "a budget of %lld cells does not fit: %lld cells free",
            (long long)budget, (long long)kvs_sessions_cells_free(S));
    }
    if (S->n == S->cap) {
        int32_t cap = S->cap ? S->cap * 2 : 16;
        kvs_session **all = realloc(S->all, (size_t)cap * sizeof *all);
        if (all == NULL) {
            return KVS_NO_MEMORY;
        }
        S->all = all;
        S->cap = cap;
    }
    kvs_session *s = calloc(1, sizeof *s);
    if (s == NULL) {
        return KVS_NO_MEMORY;
    }
    s->S = S;
    snprintf(s->id, sizeof s->id, "%s", id);
    s->budget = budget;
    s->query_reserve = query_reserve;
    s->format = format;
    s->policy = policy;
    s->seq = seq;
    s->clients = calloc(KVS_CLIENTS_MAX, sizeof *s->clients);
    if (s->clients == NULL) {
        kvs_sess_free(s);
        return KVS_NO_MEMORY;
    }
    if (n_prefix > 0) {
        int rc = shared < n_prefix ? prefill(s, prefix + shared, n_prefix - shared) : 0;
        if (rc == 0) {
            rc = record_tokens(s, prefix, n_prefix);
        }
        if (rc < 0) {
            kvs_sess_free(s);
            ERR(rc, "cannot prefill the prefix: %s", kvs_status_message(rc));
        }
        kvs_pool_seq_index(e->pool, s->seq, prefix, (int32_t)n_prefix);
        /* blocks of ours that did not make it into the index stay on our reservation */
        for (int32_t i = 0; i < full; i++) {
            blocks += !kvs_pool_is_indexed(e->pool, s->seq->table[i]);
        }
    } else {
        blocks += full;
    }
    S->reserved_blocks += blocks;
    s->reserved_blocks = blocks;
    s->n_prefix = s->n_tokens;
    s->visible = s->seq->n_cells;
    S->all[S->n++] = s;
    *out = s;
    return KVS_OK;
}

/* Remove s from the registry and free it (its files stay unless remove_files). */
static void unlink_session(kvs_sessions *S, kvs_session *s, bool remove_files)
{
    for (int32_t i = 0; i < S->n; i++) {
        if (S->all[i] == s) {
            S->all[i] = S->all[--S->n];
            break;
        }
    }
    S->reserved_blocks -= s->reserved_blocks;
    kvs_sess_log_close(s, remove_files);
    kvs_sess_free(s);
}

int kvs_session_create(kvs_sessions *S, const char *id, const struct kvs_session_opts *o,
                       kvs_session **out, char *err, size_t errlen)
{
    *out = NULL;
    kvs_engine *e = S->e;
    if (o->format != KVS_FORMAT_RAW && o->format != KVS_FORMAT_CHAT) {
        ERR(KVS_INVALID_ARGUMENT, "unknown session format %d", (int)o->format);
    }
    if (o->policy != KVS_POLICY_REJECT && o->policy != KVS_POLICY_SLIDE) {
        ERR(KVS_INVALID_ARGUMENT, "unknown context policy %d", (int)o->policy);
    }
    if (o->format == KVS_FORMAT_CHAT && S->chat.family == KVS_CHAT_NONE) {
        ERR(KVS_UNSUPPORTED, "the model has no known chat template: use a raw session");
    }
    int32_t reserve = o->query_reserve > 0 ? o->query_reserve : KVS_QUERY_RESERVE_DEFAULT;
    if (o->query_reserve < 0 || reserve >= e->n_ctx) {
        ERR(KVS_INVALID_ARGUMENT, "query reserve %d must be in [0, %lld)", o->query_reserve,
            (long long)e->n_ctx);
    }
    int64_t budget = o->budget_cells > 0 ? o->budget_cells : e->n_ctx - reserve;
    if (o->budget_cells < 0 || budget > e->n_ctx) {
        ERR(KVS_INVALID_ARGUMENT, "budget %lld cells must be in [1, %lld]",
            (long long)o->budget_cells, (long long)e->n_ctx);
    }
    if (!valid_name(id, KVS_SESSION_ID_MAX)) {
        ERR(KVS_INVALID_ARGUMENT, "invalid session id (1..%u bytes of [A-Za-z0-9._-], not "
                                  "starting with '.')",
            (unsigned)KVS_SESSION_ID_MAX);
    }
    if (kvs_session_find(S, id) != NULL) {
        ERR(KVS_ALREADY_EXISTS, "session '%s' already exists", id);
    }
    /* the pinned prefix */
    struct ids pre = {0};
    int rc;
    if (o->format == KVS_FORMAT_CHAT) {
        const char *sys = o->prefix;
        size_t sys_len = o->prefix_len;
        if (sys == NULL || sys_len == 0) {
            sys = S->chat.default_system;
            sys_len = S->chat.default_system_len;
        }
        if (sys_len > 0) {
            rc = tok_templated(S, &pre, 2, sys, sys_len, true);
        } else {
            rc = tok_append(e, &pre, "", 0, true, false);
        }
    } else {
        rc = tok_append(e, &pre, o->prefix != NULL ? o->prefix : "", o->prefix_len, true, false);
    }
    if (rc < 0) {
        free(pre.v);
        ERR(rc, "cannot tokenize the prefix: %s", kvs_status_message(rc));
    }
    kvs_session *s;
    rc = kvs_sess_new(S, id, o->format, o->policy, budget, reserve, pre.v, (int64_t)pre.n, &s,
                      err, errlen);
    free(pre.v);
    if (rc < 0) {
        return rc;
    }
    rc = kvs_sess_log_create(s, err, errlen);
    if (rc < 0) {
        unlink_session(S, s, false);
        return rc;
    }
    *out = s;
    return KVS_OK;
}

int kvs_session_close(kvs_sessions *S, const char *id)
{
    kvs_session *s = kvs_session_find(S, id);
    if (s == NULL) {
        return KVS_NOT_FOUND;
    }
    unlink_session(S, s, true);
    return KVS_OK;
}

/* ---- queries ---------------------------------------------------------------------------- */

void kvs_answer_free(struct kvs_answer *a)
{
    if (a == NULL) {
        return;
    }
    free(a->text);
    free(a->tokens);
    memset(a, 0, sizeof *a);
}

static int answer_copy(struct kvs_answer *dst, const struct kvs_answer *src)
{
    *dst = *src;
    dst->text = malloc(src->len + 1);
    dst->tokens = malloc(((size_t)src->n_tokens + 1) * sizeof *dst->tokens);
    if (dst->text == NULL || dst->tokens == NULL) {
        free(dst->text);
        free(dst->tokens);
        memset(dst, 0, sizeof *dst);
        return KVS_NO_MEMORY;
    }
    memcpy(dst->text, src->text, src->len + 1);
    memcpy(dst->tokens, src->tokens, (size_t)src->n_tokens * sizeof *dst->tokens);
    return KVS_OK;
}

/* Run a formatted question (ids) against the session, stateful or stateless. */
static int run_query(kvs_session *s, const int32_t *q, int32_t nq, const struct kvs_query_opts *o,
                     kvs_token_fn cb, void *user, struct kvs_answer *a, char *err,
                     size_t errlen)
{
    kvs_sessions *S = s->S;
    kvs_engine *e = S->e;
    double t0 = kvs_now();
    int32_t max_tokens = o->max_tokens > 0 ? o->max_tokens : 64;
    int64_t ctx = s->seq->n_cells;
    if (ctx + nq + max_tokens > e->n_ctx) {
        ERR(KVS_CONTEXT_FULL, "context %lld + question %d + answer %d exceed the model's %lld",
            (long long)ctx, nq, max_tokens, (long long)e->n_ctx);
    }
    /* reserve |question| + max answer (stateless: the whole context again) */
    int32_t blocks = kvs_sess_blocks_for(S, (o->stateless ? ctx : 0) + nq + max_tokens);
    if (blocks > kvs_sess_blocks_free(S)) {
        ERR(KVS_BUSY, "no KV reserve for a query of %d + %d tokens now",
            nq, max_tokens);
    }
    S->reserved_blocks += blocks;
    kvs_seq *fork = NULL;
    int32_t *prompt = NULL;
    int rc;
    if (o->stateless) {
        fork = kvs_pool_seq_new(e->pool);
        prompt = malloc(((size_t)ctx + (size_t)nq) * sizeof *prompt);
        if (fork == NULL || prompt == NULL) {
            rc = KVS_NO_MEMORY;
            goto out;
        }
        if (ctx > 0) {
            memcpy(prompt, s->tokens, (size_t)ctx * sizeof *prompt);
        }
        memcpy(prompt + ctx, q, (size_t)nq * sizeof *prompt);
    } else {
        fork = kvs_pool_seq_fork(e->pool, s->seq);
        if (fork == NULL) {
            rc = KVS_NO_MEMORY;
            goto out;
        }
    }
    struct kvs_gen_opts go = {.sampling = o->sampling, .max_tokens = max_tokens,
                              .stops = o->stops, .n_stops = o->n_stops};
    struct kvs_gen_result res;
    rc = kvs_engine_generate_on(e, fork, o->stateless ? prompt : q,
                                o->stateless ? (int32_t)ctx + nq : nq, &go, cb, user, &res);
    if (rc < 0) {
        snprintf(err, errlen, "query failed: %s", kvs_status_message(rc));
        goto out;
    }
    *a = (struct kvs_answer){
        .text = res.text,
        .len = res.text_len,
        .tokens = res.tokens,
        .n_tokens = res.n_tokens,
        .version = s->version,
        .context_tokens = ctx,
        .question_tokens = nq,
        .ttft_s = (kvs_now() - t0) - res.decode_s,
        .total_s = kvs_now() - t0,
        .fresh = true,
    };
out:
    kvs_pool_seq_release(e->pool, &fork);
    free(prompt);
    S->reserved_blocks -= blocks;
    return rc;
}

int kvs_sess_check_query_opts(const struct kvs_query_opts *o, char *err, size_t errlen)
{
    int rc = kvs_sampling_validate(&o->sampling, err, errlen);
    if (rc < 0) {
        return rc;
    }
    if (o->max_tokens < 0 || o->max_tokens > 1 << 16) {
        ERR(KVS_INVALID_ARGUMENT, "max_tokens %d must be in [0, 65536]", o->max_tokens);
    }
    if (o->n_stops > 0) {
        return kvs_stop_validate(o->stops, o->n_stops, err, errlen);
    }
    return KVS_OK;
}

int kvs_session_query(kvs_session *s, const char *question, size_t len,
                      const struct kvs_query_opts *o, kvs_token_fn cb, void *user,
                      struct kvs_answer *a, char *err, size_t errlen)
{
    memset(a, 0, sizeof *a);
    if (question == NULL || len == 0) {
        ERR(KVS_INVALID_ARGUMENT, "the question is empty");
    }
    KVS_TRY(kvs_sess_check_query_opts(o, err, errlen));
    struct ids q = {0};
    int rc = frame_question(s, &q, question, len);
    if (rc == 0 && q.n == 0) {
        rc = KVS_INVALID_ARGUMENT;
    }
    if (rc == 0) {
        rc = run_query(s, q.v, (int32_t)q.n, o, cb, user, a, err, errlen);
    } else if (err != NULL && errlen > 0 && err[0] == '\0') {
        snprintf(err, errlen, "cannot tokenize the question: %s", kvs_status_message(rc));
    }
    free(q.v);
    return rc;
}

/* ---- flash queries ---------------------------------------------------------------------- */

struct flash *kvs_sess_flash_find(kvs_session *s, const char *name)
{
    for (int32_t i = 0; i < s->n_flash; i++) {
        if (strcmp(s->flash[i].name, name) == 0) {
            return &s->flash[i];
        }
    }
    return NULL;
}

static int flash_eval(kvs_session *s, struct flash *f)
{
    struct kvs_answer a;
    char err[256] = "";
    int rc = run_query(s, f->question, f->n_question, &f->opts, NULL, NULL, &a, err, sizeof err);
    if (rc < 0) {
        KVS_WARN("session %s: flash query %s: %s", s->id, f->name, err);
        return rc;
    }
    kvs_answer_free(&f->answer);
    f->answer = a;
    f->has_answer = true;
    f->data_tokens_at_eval = s->appended_total;
    f->last_eval_s = kvs_now();
    s->fstats.evaluations++;
    if (s->watch_fn != NULL) {
        s->watch_fn(s, f->name, &f->answer, s->watch_user);
    }
    return KVS_OK;
}

/* The synchronous executor's idle step: after an append, re-evaluate what is due. */
static void flash_after_append(kvs_session *s)
{
    double now = kvs_now();
    for (int32_t i = 0; i < s->n_flash; i++) {
        struct flash *f = &s->flash[i];
        if (f->has_answer && f->answer.version == s->version) {
            continue;
        }
        int64_t fresh_tokens = s->appended_total - f->data_tokens_at_eval;
        if (f->has_answer && f->trigger.every_tokens > 0 &&
            fresh_tokens < f->trigger.every_tokens) {
            continue;
        }
        if (f->has_answer && f->trigger.min_interval_ms > 0 &&
            (now - f->last_eval_s) * 1000.0 < f->trigger.min_interval_ms) {
            continue;
        }
        flash_eval(s, f);
    }
}

int kvs_sess_flash_add(kvs_session *s, const char *name, const int32_t *q, int32_t nq,
                       const struct kvs_query_opts *o, const struct kvs_flash_trigger *t,
                       bool evaluate, char *err, size_t errlen)
{
    if (!valid_name(name, KVS_FLASH_NAME_MAX)) {
        ERR(KVS_INVALID_ARGUMENT, "invalid flash query name (1..%d bytes of [A-Za-z0-9._-])",
            KVS_FLASH_NAME_MAX);
    }
    if (kvs_sess_flash_find(s, name) != NULL) {
        ERR(KVS_ALREADY_EXISTS, "flash query '%s' already exists", name);
    }
    if (s->n_flash >= KVS_FLASH_MAX_PER_SESSION) {
        ERR(KVS_TOO_LARGE, "at most %d flash queries per session", KVS_FLASH_MAX_PER_SESSION);
    }
    if (t != NULL && (t->every_tokens < 0 || t->min_interval_ms < 0)) {
        ERR(KVS_INVALID_ARGUMENT, "trigger values must be >= 0");
    }
    if (o->n_stops > 0) {
        ERR(KVS_INVALID_ARGUMENT, "flash queries take no stop strings");
    }
    KVS_TRY(kvs_sess_check_query_opts(o, err, errlen));
    if (nq <= 0) {
        ERR(KVS_INVALID_ARGUMENT, "the question is empty");
    }
    struct flash *fl = realloc(s->flash, (size_t)(s->n_flash + 1) * sizeof *fl);
    if (fl == NULL) {
        return KVS_NO_MEMORY;
    }
    s->flash = fl;
    struct flash *f = &s->flash[s->n_flash];
    memset(f, 0, sizeof *f);
    f->question = malloc((size_t)nq * sizeof *f->question);
    if (f->question == NULL) {
        return KVS_NO_MEMORY;
    }
    memcpy(f->question, q, (size_t)nq * sizeof *q);
    snprintf(f->name, sizeof f->name, "%s", name);
    f->n_question = nq;
    f->opts = *o;
    f->opts.stops = NULL;
    f->opts.n_stops = 0;
    f->opts.stateless = false;
    if (t != NULL) {
        f->trigger = *t;
    }
    int rc = kvs_sess_log_flash(s, f, true);
    if (rc < 0) {
        free(f->question);
        ERR(rc, "cannot log the flash query: %s", kvs_status_message(rc));
    }
    s->n_flash++;
    if (evaluate) {
        rc = flash_eval(s, f);
        if (rc < 0) {
            /* keep the registration: it is retried after the next append */
            snprintf(err, errlen, "registered, but the first evaluation failed: %s",
                     kvs_status_message(rc));
        }
    }
    return KVS_OK;
}

int kvs_flash_register(kvs_session *s, const char *name, const char *question, size_t len,
                       const struct kvs_query_opts *o, const struct kvs_flash_trigger *t,
                       char *err, size_t errlen)
{
    if (question == NULL || len == 0) {
        ERR(KVS_INVALID_ARGUMENT, "the question is empty");
    }
    struct ids q = {0};
    int rc = frame_question(s, &q, question, len);
    if (rc < 0) {
        free(q.v);
        ERR(rc, "cannot tokenize the question: %s", kvs_status_message(rc));
    }
    rc = kvs_sess_flash_add(s, name, q.v, (int32_t)q.n, o, t, true, err, errlen);
    free(q.v);
    return rc;
}

int kvs_flash_unregister(kvs_session *s, const char *name)
{
    struct flash *f = kvs_sess_flash_find(s, name);
    if (f == NULL) {
        return KVS_NOT_FOUND;
    }
    KVS_TRY(kvs_sess_log_flash(s, f, false));
    free(f->question);
    kvs_answer_free(&f->answer);
    *f = s->flash[--s->n_flash];
    return KVS_OK;
}

int32_t kvs_flash_count(const kvs_session *s)
{
    return s->n_flash;
}

const char *kvs_flash_name(const kvs_session *s, int32_t i)
{
    return i >= 0 && i < s->n_flash ? s->flash[i].name : NULL;
}

int kvs_flash_get(kvs_session *s, const char *name, enum kvs_flash_mode mode,
                  struct kvs_answer *a, char *err, size_t errlen)
{
    memset(a, 0, sizeof *a);
    struct flash *f = kvs_sess_flash_find(s, name);
    if (f == NULL) {
        ERR(KVS_NOT_FOUND, "no flash query '%s' on session '%s'", name, s->id);
    }
    bool fresh = f->has_answer && f->answer.version == s->version;
    if (fresh) {
        s->fstats.hits++;
    } else {
        s->fstats.misses++;
        if (mode == KVS_FLASH_FRESH || !f->has_answer) {
            int rc = flash_eval(s, f);
            if (rc < 0) {
                ERR(rc, "flash query '%s' failed: %s", name, kvs_status_message(rc));
            }
        }
    }
    KVS_TRY(answer_copy(a, &f->answer));
    a->fresh = f->answer.version == s->version;
    return KVS_OK;
}

void kvs_flash_watch(kvs_session *s, kvs_flash_fn fn, void *user)
{
    s->watch_fn = fn;
    s->watch_user = user;
}

void kvs_flash_stats(const kvs_session *s, struct kvs_flash_stats *st)
{
    *st = s->fstats;
}

/* ---- appends ---------------------------------------------------------------------------- */

static struct client_ack *client_slot(kvs_session *s, uint64_t client_id, bool create)
{
    struct client_ack *victim = NULL;
    for (int32_t i = 0; i < KVS_CLIENTS_MAX; i++) {
        struct client_ack *c = &s->clients[i];
        if (c->client_id == client_id) {
            return c;
        }
        if (victim == NULL || c->client_id == 0 ||
            (victim->client_id != 0 && c->last_used < victim->last_used)) {
            victim = c;
        }
    }
    if (!create) {
        return NULL;
    }
    /* a new client; the least recently used entry is forgotten when the table is full */
    memset(victim, 0, sizeof *victim);
    victim->client_id = client_id;
    return victim;
}

/* SLIDE: make room for n more cells by evicting whole data blocks after the prefix. */
static int slide(kvs_session *s, int64_t n, int32_t *evicted, char *err, size_t errlen);

int kvs_sess_append_begin(kvs_session *s, const int32_t *ids, int64_t n, uint64_t client_id,
                          uint64_t client_seq, struct kvs_append_result *r, char *err,
                          size_t errlen)
{
    memset(r, 0, sizeof *r);
    if (n <= 0) {
        ERR(KVS_INVALID_ARGUMENT, "empty append");
    }
    int32_t n_vocab = (int32_t)s->S->e->model->hp.n_vocab;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= n_vocab) {
            ERR(KVS_INVALID_ARGUMENT, "token %d at index %lld is outside the vocabulary",
                ids[i], (long long)i);
        }
    }
    if (client_id != 0) {
        struct client_ack *c = client_slot(s, client_id, false);
        if (c != NULL && client_seq == c->client_seq) {
            *r = c->ack;
            r->duplicate = true;
            return 1;
        }
        if (c != NULL && client_seq != c->client_seq + 1) {
            ERR(KVS_OUT_OF_ORDER, "client sequence %llu after %llu",
                (unsigned long long)client_seq, (unsigned long long)c->client_seq);
        }
    }
    if (n > s->budget - s->n_prefix) {
        ERR(KVS_TOO_LARGE, "an append of %lld tokens exceeds the session's data budget of %lld",
            (long long)n, (long long)(s->budget - s->n_prefix));
    }
    int32_t evicted = 0;
    if (s->seq->n_cells + n > s->budget) {
        if (s->policy == KVS_POLICY_REJECT) {
            ERR(KVS_CONTEXT_FULL, "context full: %lld cells used + %lld exceed the budget of "
                                  "%lld (policy reject)",
                (long long)s->seq->n_cells, (long long)n, (long long)s->budget);
        }
        KVS_TRY(slide(s, n, &evicted, err, errlen));
    }
    /* durable before applied: an acknowledged append is in the log (fsync policy) */
    int rc = kvs_sess_log_append(s, ids, n, client_id, client_seq, err, errlen);
    if (rc < 0) {
        return rc;
    }
    rc = record_tokens(s, ids, n);
    if (rc < 0) {
        return rc;
    }
    r->evicted = evicted;
    return KVS_OK;
}

void kvs_sess_append_end(kvs_session *s, int64_t n, uint64_t client_id, uint64_t client_seq,
                         struct kvs_append_result *r)
{
    s->version++;
    s->appends++;
    s->appended_total += n;
    s->visible = s->seq->n_cells;
    int32_t evicted = r->evicted;
    *r = (struct kvs_append_result){.version = s->version, .cells = s->seq->n_cells,
                                    .n_tokens = (int32_t)n, .evicted = evicted};
    if (client_id != 0) {
        struct client_ack *c = client_slot(s, client_id, true);
        c->client_seq = client_seq;
        c->ack = *r;
        c->last_used = s->appends;
    }
}

int kvs_sess_append_ids(kvs_session *s, const int32_t *ids, int64_t n, uint64_t client_id,
                        uint64_t client_seq, struct kvs_append_result *r, char *err,
                        size_t errlen)
{
    int rc = kvs_sess_append_begin(s, ids, n, client_id, client_seq, r, err, errlen);
    if (rc != 0) {
        return rc < 0 ? rc : KVS_OK; /* 1: a duplicate, answered */
    }
    rc = prefill(s, ids, n);
    if (rc < 0) {
        s->n_tokens -= n;
        ERR(rc, "append failed: %s", kvs_status_message(rc));
    }
    kvs_sess_append_end(s, n, client_id, client_seq, r);
    if (!s->S->restoring) {
        flash_after_append(s);
    }
    return KVS_OK;
}

int kvs_session_append_tokens(kvs_session *s, const int32_t *ids, int32_t n,
                              uint64_t client_id, uint64_t client_seq,
                              struct kvs_append_result *r, char *err, size_t errlen)
{
    return kvs_sess_append_ids(s, ids, n, client_id, client_seq, r, err, errlen);
}

int kvs_session_append(kvs_session *s, const char *text, size_t len, uint64_t client_id,
                       uint64_t client_seq, struct kvs_append_result *r, char *err,
                       size_t errlen)
{
    memset(r, 0, sizeof *r);
    if (text == NULL || len == 0) {
        ERR(KVS_INVALID_ARGUMENT, "empty append");
    }
    struct ids b = {0};
    int rc = frame_record(s, &b, text, len);
    if (rc < 0) {
        free(b.v);
        ERR(rc, "cannot tokenize the record: %s", kvs_status_message(rc));
    }
    rc = kvs_sess_append_ids(s, b.v, (int64_t)b.n, client_id, client_seq, r, err, errlen);
    free(b.v);
    return rc;
}

struct shift_ctx {
    kvs_engine *e;
    uint8_t *buf;        /* one block, canonical layout */
    int32_t delta;       /* positions to rotate the keys by (negative) */
};

/* Rotate one head's key (head_dim values of dtype) by delta positions, as the model's RoPE
 * would: theta_i = delta * freq_scale * base^(-2i/n_dims) / factor_i. */
static void rotate_key(const kvs_model *m, uint8_t *key, uint32_t dtype, int32_t head_dim,
                       int32_t delta)
{
    const struct kvs_rope *r = &m->rope;
    float x[1024];
    for (int32_t d = 0; d < head_dim; d++) {
        x[d] = dtype == KVS_DTYPE_F32   ? ((float *)key)[d]
               : dtype == KVS_DTYPE_F16 ? kvs_fp16_to_fp32(((uint16_t *)key)[d])
                                        : kvs_bf16_to_fp32(((uint16_t *)key)[d]);
    }
    int32_t half = r->n_dims / 2;
    for (int32_t i = 0; i < half; i++) {
        double theta = (double)delta * (double)r->freq_scale *
                       pow((double)r->freq_base, -2.0 * i / r->n_dims);
        if (r->freq_factors != NULL) {
            theta /= (double)r->freq_factors[i];
        }
        float c = (float)cos(theta), sn = (float)sin(theta);
        int32_t i0 = r->style == KVS_ROPE_NEOX ? i : 2 * i;
        int32_t i1 = r->style == KVS_ROPE_NEOX ? i + half : 2 * i + 1;
        float x0 = x[i0], x1 = x[i1];
        x[i0] = x0 * c - x1 * sn;
        x[i1] = x0 * sn + x1 * c;
    }
    for (int32_t d = 0; d < head_dim; d++) {
        if (dtype == KVS_DTYPE_F32) {
            ((float *)key)[d] = x[d];
        } else if (dtype == KVS_DTYPE_F16) {
            ((uint16_t *)key)[d] = kvs_fp32_to_fp16(x[d]);
        } else {
            ((uint16_t *)key)[d] = kvs_fp32_to_bf16(x[d]);
        }
    }
}

static int shift_block(int32_t src, int32_t dst, void *user)
{
    struct shift_ctx *c = user;
    kvs_backend *b = c->e->backend;
    kvs_kv_cache *kv = kvs_pool_kv(c->e->pool);
    const struct kvs_kv_layout *l = kvs_pool_layout(c->e->pool);
    KVS_TRY(b->ops->kv_read_block(b, kv, src, c->buf));
    size_t elem = l->dtype == KVS_DTYPE_F32 ? 4 : 2;
    size_t head = (size_t)l->head_dim * elem;
    size_t half_layer = (size_t)l->block_size * (size_t)l->n_kv_head * head; /* K or V */
    for (int32_t layer = 0; layer < l->n_layer; layer++) {
        uint8_t *k = c->buf + (size_t)layer * 2 * half_layer;
        for (int32_t i = 0; i < l->block_size * l->n_kv_head; i++) {
            rotate_key(c->e->model, k + (size_t)i * head, l->dtype, l->head_dim, c->delta);
        }
    }
    return b->ops->kv_write_block(b, kv, dst, c->buf);
}

int kvs_sess_evict(kvs_session *s, int32_t first, int32_t k, char *err, size_t errlen)
{
    kvs_engine *e = s->S->e;
    int32_t bs = kvs_pool_block_size(e->pool);
    if (e->backend->ops->kv_read_block == NULL || e->backend->ops->kv_write_block == NULL) {
        ERR(KVS_UNSUPPORTED, "the %s backend cannot shift KV blocks (policy slide)",
            e->backend->ops->name);
    }
    const struct kvs_kv_layout *l = kvs_pool_layout(e->pool);
    struct shift_ctx c = {.e = e, .buf = malloc(kvs_kv_block_bytes(l)), .delta = -k * bs};
    if (c.buf == NULL) {
        return KVS_NO_MEMORY;
    }
    int64_t before = s->seq->n_cells;
    int rc = kvs_pool_seq_slide(e->pool, s->seq, first, k, shift_block, &c);
    free(c.buf);
    if (rc < 0) {
        ERR(rc, "sliding eviction failed: %s", kvs_status_message(rc));
    }
    int64_t gone = before - s->seq->n_cells;
    int64_t at = (int64_t)first * bs;
    memmove(s->tokens + at, s->tokens + at + gone,
            (size_t)(s->n_tokens - at - gone) * sizeof *s->tokens);
    s->n_tokens -= gone;
    s->evicted += gone;
    s->version++;
    s->visible = s->seq->n_cells;
    return (int)gone;
}

int32_t kvs_sess_slide_shared(const kvs_session *s, int64_t n)
{
    kvs_pool *pool = s->S->e->pool;
    int64_t cur = s->seq->n_cells;
    if (s->policy != KVS_POLICY_SLIDE || cur + n <= s->budget) {
        return 0;
    }
    /* every data block after the prefix is either evicted or replaced by a shifted copy */
    int32_t bs = kvs_pool_block_size(pool);
    int32_t first = (int32_t)((s->n_prefix + bs - 1) / bs);
    int32_t used = (int32_t)((cur + bs - 1) / bs);
    int32_t shared = 0;
    for (int32_t i = first; i < used; i++) {
        shared += kvs_pool_refcount(pool, s->seq->table[i]) > 1;
    }
    return shared;
}

static int slide(kvs_session *s, int64_t n, int32_t *evicted, char *err, size_t errlen)
{
    kvs_engine *e = s->S->e;
    int32_t bs = kvs_pool_block_size(e->pool);
    int64_t cur = s->seq->n_cells;
    int64_t need = cur + n - s->budget;                      /* cells to free */
    int32_t first = (int32_t)((s->n_prefix + bs - 1) / bs); /* first block after the prefix */
    int32_t used = (int32_t)((cur + bs - 1) / bs);
    int32_t k = (int32_t)((need + bs - 1) / bs);
    if (first + k > used) {
        ERR(KVS_CONTEXT_FULL, "context full: %lld cells needed but only %lld can be evicted "
                              "after the pinned prefix",
            (long long)need, (long long)((int64_t)(used - first) * bs));
    }
    int64_t n_cells = (int64_t)k * bs < cur - (int64_t)first * bs ? (int64_t)k * bs
                                                                  : cur - (int64_t)first * bs;
    KVS_TRY(kvs_sess_log_evict(s, (int64_t)first * bs, n_cells, err, errlen));
    int gone = kvs_sess_evict(s, first, k, err, errlen);
    if (gone < 0) {
        return gone;
    }
    *evicted = gone;
    return KVS_OK;
}
