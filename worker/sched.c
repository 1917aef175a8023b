#include "sched.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/status.h"
#include "worker/session_impl.h"

enum job_kind { JOB_APPEND, JOB_QUERY, JOB_FLASH };

struct job {
    enum job_kind kind;
    kvs_session *s;
    double deadline;                 /* seconds (same clock as now); <= 0: none */
    int32_t *ids;                    /* (n_ids) tokens to prefill: record or question */
    int64_t n_ids;
    int64_t done;                    /* of n_ids prefilled */
    /* append */
    uint64_t client_id, client_seq;
    struct kvs_append_result ack;
    bool begun;                      /* kvs_sess_append_begin ran (logged, recorded) */
    kvs_sched_append_fn append_done;
    /* query / flash */
    kvs_seq *seq;                    /* the fork */
    int32_t reserved_blocks;         /* taken from the registry at acceptance */
    kvs_sampler *smp;
    kvs_stop *stop;
    kvs_detok *dt;
    bool decoding;                   /* prefill done: one decode row per step */
    bool waiting_cells;              /* an append waiting for real cells (overcommit) */
    bool waiting_forks;              /* an append that slides waiting for its session's forks */
    bool deferred;                   /* a query behind its session's sliding append: cells
                                      * reserved in the accounting, not forked yet */
    bool head;                       /* this step: an append that may begin (cells there) */
    int32_t next_tok;                /* the token the next decode row feeds */
    int32_t max_tokens;
    int32_t *out;                    /* (max_tokens + 1) generated ids */
    int32_t n_out;
    char *text;                      /* generated text */
    size_t text_len, text_cap, emitted;
    uint64_t version;                /* session version the query sees */
    int64_t ctx;                     /* cells it sees */
    double t_accept, t_first;        /* kvs_now() at acceptance and at the first token */
    kvs_token_fn on_token;
    kvs_sched_query_fn query_done;
    char flash_name[KVS_FLASH_NAME_MAX + 1];
    void *user;
    uint64_t id;                     /* arrival number (kvs_sched_cancel's snapshot) */
    bool cancelled;                  /* callbacks detached; freed at the next safe point */
    /* this step */
    int32_t rows;                    /* rows planned for this step */
    int32_t logit_row;               /* index into the step's logits, or -1 */
};

struct kvs_sched {
    kvs_sessions *S;                 /* borrowed */
    kvs_engine *e;                   /* S's engine */
    struct kvs_sched_opts o;
    struct job **jobs;               /* (cap) in arrival order */
    int32_t n, cap;
    int32_t rr[KVS_N_CLASSES];       /* round-robin start per class */
    float *logits;                   /* (max_batch_tokens, n_vocab) host */
    int32_t n_logit_rows;            /* rows wanting logits planned so far in this step */
    struct kvs_sched_stats st;
    double now;                      /* of the current step */
    uint64_t next_id;                /* of the next job pushed */
    bool in_step;                    /* kvs_sched_step is running (callbacks may re-enter) */
    /* step cost model: exponentially weighted sums of steps, their rows and seconds */
    double cw, cx, cy;
    int32_t n_observed;              /* steps observed */
    bool pressure_now;               /* an append is waiting for real cells in this step */
    int32_t flash_turn;              /* max_jobs_per_step: steps with flash work since its turn */
};

/* A flash evaluation's prefill is flash work (after appends, with its minimum share); once
 * it decodes, its one row per step rides with the other decode rows: an answer that has
 * started is finished quickly, which is what keeps flash answers fresh. */
static enum kvs_job_class job_class(const struct job *j)
{
    switch (j->kind) {
    case JOB_APPEND: return KVS_CLASS_APPEND;
    case JOB_FLASH: return j->decoding ? KVS_CLASS_DECODE : KVS_CLASS_FLASH;
    default: return j->decoding ? KVS_CLASS_DECODE : KVS_CLASS_QUESTION;
    }
}

static double step_clock(const kvs_sched *sc)
{
    return sc->o.clock != NULL ? sc->o.clock(sc->o.clock_user) : kvs_now();
}

/* One step's rows and seconds into the cost model (sched.h says how). */
static void cost_observe(kvs_sched *sc, int32_t rows, double seconds)
{
    double x = rows, y = seconds > 0 ? seconds : 0;
    double d = KVS_SCHED_COST_DECAY;
    if (sc->st.calibrated && y > 1.2 * sc->st.est_row_s * x) {
        d = 0; /* slower than the model by > 20%: start over from this step */
    }
    sc->cw = sc->cw * d + 1;
    sc->cx = sc->cx * d + x;
    sc->cy = sc->cy * d + y;
    sc->n_observed++;
    if (sc->n_observed >= KVS_SCHED_CALIBRATION_STEPS) {
        sc->st.est_row_s = sc->cy / sc->cx;
        sc->st.calibrated = true;
    }
}

/* Rows that fit in `seconds` by the fitted cost, within the caps. */
static int32_t rows_in(const kvs_sched *sc, double seconds)
{
    int32_t cap = sc->o.max_batch_tokens;
    int32_t floor_rows = cap < KVS_SCHED_MIN_ROWS ? cap : KVS_SCHED_MIN_ROWS;
    if (!sc->st.calibrated) {
        return cap < KVS_SCHED_COLD_ROWS ? cap : KVS_SCHED_COLD_ROWS;
    }
    double row_s = sc->st.est_row_s;
    double rows = row_s > 0 ? seconds / row_s : cap;
    if (!(rows < cap)) { /* also NaN */
        return cap;
    }
    return rows > floor_rows ? (int32_t)rows : floor_rows;
}

/* Rows the next step may plan: the target's share of the fitted cost, within the caps. */
static int32_t step_budget(const kvs_sched *sc)
{
    if (sc->o.target_step_ms < 0) {
        return sc->o.max_batch_tokens;
    }
    return rows_in(sc, sc->st.target_step_s);
}

int kvs_sched_new(kvs_sessions *S, const struct kvs_sched_opts *o, kvs_sched **out)
{
    *out = NULL;
    kvs_sched *sc = calloc(1, sizeof *sc);
    if (sc == NULL) {
        return KVS_NO_MEMORY;
    }
    sc->S = S;
    sc->e = S->e;
    if (o != NULL) {
        sc->o = *o;
    }
    int32_t max_rows = kvs_forward_max_rows(sc->e->fw);
    if (sc->o.max_batch_tokens <= 0 || sc->o.max_batch_tokens > max_rows) {
        sc->o.max_batch_tokens = max_rows;
    }
    if (sc->o.append_chunk <= 0) {
        sc->o.append_chunk = 64;
    }
    if (sc->o.flash_min_share <= 0.0f || sc->o.flash_min_share > 1.0f) {
        sc->o.flash_min_share = 0.1f;
    }
    if (sc->o.target_step_ms == 0.0) {
        sc->o.target_step_ms = KVS_SCHED_TARGET_STEP_MS;
    }
    if (sc->o.answer_step_ms == 0.0) {
        sc->o.answer_step_ms = sc->o.target_step_ms * KVS_SCHED_ANSWER_STEP_SHARE;
    }
    if (sc->o.overcommit == 0.0f) {
        sc->o.overcommit = 1.0f;
    }
    if (!(sc->o.overcommit >= 1.0f && sc->o.overcommit <= KVS_SCHED_OVERCOMMIT_MAX)) {
        KVS_ERROR("overcommit %g must be in [1, %g]", (double)sc->o.overcommit,
                  (double)KVS_SCHED_OVERCOMMIT_MAX);
        free(sc);
        return KVS_INVALID_ARGUMENT;
    }
    S->overcommit = sc->o.overcommit;
    sc->st.target_step_s = sc->o.target_step_ms > 0 ? sc->o.target_step_ms / 1e3 : 0;
    sc->st.answer_step_s = sc->o.target_step_ms > 0 && sc->o.answer_step_ms > 0 &&
                                   sc->o.answer_step_ms < sc->o.target_step_ms
                               ? sc->o.answer_step_ms / 1e3
                               : 0;
    sc->st.step_rows = step_budget(sc);
    sc->logits = malloc((size_t)sc->o.max_batch_tokens * sc->e->model->hp.n_vocab * sizeof(float));
    if (sc->logits == NULL) {
        free(sc);
        return KVS_NO_MEMORY;
    }
    *out = sc;
    return KVS_OK;
}

static void job_free(kvs_sched *sc, struct job *j)
{
    kvs_pool_seq_release(sc->e->pool, &j->seq);
    sc->S->reserved_blocks -= j->reserved_blocks;
    kvs_sampler_destroy(&j->smp);
    kvs_stop_destroy(&j->stop);
    kvs_detok_destroy(&j->dt);
    free(j->ids);
    free(j->out);
    free(j->text);
    free(j);
}

/* Fail j with status (its callback runs) and free it. */
static void job_fail(kvs_sched *sc, struct job *j, int status, const char *why)
{
    if (j->kind == JOB_APPEND && j->append_done != NULL) {
        j->append_done(status, NULL, why, j->user);
    } else if (j->kind == JOB_QUERY && j->query_done != NULL) {
        j->query_done(status, NULL, why, j->user);
    }
    if (status == KVS_TIMEOUT) {
        sc->st.expired++;
    }
    job_free(sc, j);
}

static int push_job(kvs_sched *sc, struct job *j)
{
    if (sc->n == sc->cap) {
        int32_t cap = sc->cap ? sc->cap * 2 : 64;
        struct job **v = realloc(sc->jobs, (size_t)cap * sizeof *v);
        if (v == NULL) {
            return KVS_NO_MEMORY;
        }
        sc->jobs = v;
        sc->cap = cap;
    }
    j->id = sc->next_id++;
    sc->jobs[sc->n++] = j;
    return KVS_OK;
}

void kvs_sched_destroy(kvs_sched **scp)
{
    if (scp == NULL || *scp == NULL) {
        return;
    }
    kvs_sched *sc = *scp;
    for (int32_t i = 0; i < sc->n; i++) {
        job_fail(sc, sc->jobs[i], KVS_CANCELLED, "the scheduler was shut down");
    }
    free(sc->jobs);
    free(sc->logits);
    free(sc);
    *scp = NULL;
}

static void refresh_stats(kvs_sched *sc);

/* Free the jobs kvs_sched_cancel detached (their callbacks have run). */
static void sweep_cancelled(kvs_sched *sc)
{
    for (int32_t i = 0; i < sc->n;) {
        struct job *j = sc->jobs[i];
        if (j->cancelled) {
            memmove(sc->jobs + i, sc->jobs + i + 1, (size_t)(sc->n - i - 1) * sizeof *sc->jobs);
            sc->n--;
            job_free(sc, j);
            continue;
        }
        i++;
    }
}

int kvs_sched_cancel(kvs_sched *sc, void *user)
{
    if (user == NULL) {
        return 0;
    }
    /* Only the jobs there now: a callback may submit (or cancel) jobs, so the scan restarts
     * after each one and skips jobs that arrived since. */
    uint64_t before = sc->next_id;
    int cancelled = 0;
    for (int32_t i = 0; i < sc->n;) {
        struct job *j = sc->jobs[i];
        if (j->user != user || j->cancelled || j->id >= before) {
            i++;
            continue;
        }
        kvs_sched_append_fn append_done = j->append_done;
        kvs_sched_query_fn query_done = j->query_done;
        j->append_done = NULL;
        j->query_done = NULL;
        j->on_token = NULL;
        j->user = NULL;
        /* an append already begun is in the log and the session's record: it is finished
         * (unacknowledged) so that the session stays what its log says; anything else is
         * dropped, at once outside a step, at the step's end inside one */
        j->cancelled = !(j->kind == JOB_APPEND && j->begun);
        cancelled++;
        sc->st.cancelled++;
        if (append_done != NULL) {
            append_done(KVS_CANCELLED, NULL,
                        j->cancelled ? "cancelled" : "cancelled (already logged: it is applied)",
                        user);
        } else if (query_done != NULL) {
            query_done(KVS_CANCELLED, NULL, "cancelled", user);
        }
        i = 0;
    }
    if (!sc->in_step) {
        sweep_cancelled(sc);
        refresh_stats(sc);
    }
    return cancelled;
}

bool kvs_sched_busy(const kvs_sched *sc)
{
    return sc->n > 0;
}

const struct kvs_sched_stats *kvs_sched_stats(const kvs_sched *sc)
{
    return &sc->st;
}

int kvs_sched_append(kvs_sched *sc, kvs_session *s, const char *text, size_t len,
                     uint64_t client_id, uint64_t client_seq, double deadline,
                     kvs_sched_append_fn done, void *user)
{
    if (text == NULL || len == 0) {
        sc->st.refused++;
        return KVS_INVALID_ARGUMENT;
    }
    struct job *j = calloc(1, sizeof *j);
    if (j == NULL) {
        return KVS_NO_MEMORY;
    }
    j->kind = JOB_APPEND;
    j->s = s;
    j->deadline = deadline;
    j->client_id = client_id;
    j->client_seq = client_seq;
    j->append_done = done;
    j->user = user;
    j->logit_row = -1;
    /* tokenized now, off the step path; the plan (policy, log) runs when it starts */
    int rc = kvs_sess_frame(s, false, text, len, &j->ids, &j->n_ids);
    if (rc == 0 && j->n_ids == 0) {
        rc = KVS_INVALID_ARGUMENT;
    }
    if (rc == 0) {
        rc = push_job(sc, j);
    }
    if (rc < 0) {
        sc->st.refused++;
        free(j->ids);
        free(j);
    }
    return rc;
}

/* Overcommit, stage 2: cancel flash evaluations, youngest first, until `need` blocks are
 * free (the pool counts its reclaimable cached blocks: stage 1). Evaluations with rows in
 * the batch being built are kept (their blocks are in use). Returns true when there is room. */
static bool make_room(kvs_sched *sc, int32_t need)
{
    kvs_pool *pool = sc->e->pool;
    while (kvs_pool_n_free(pool) < need) {
        struct job *victim = NULL;
        for (int32_t i = 0; i < sc->n; i++) {
            struct job *j = sc->jobs[i];
            if (j->kind == JOB_FLASH && !j->cancelled && j->rows == 0 && j->seq != NULL &&
                (victim == NULL || j->id > victim->id)) {
                victim = j;
            }
        }
        if (victim == NULL) {
            return false;
        }
        KVS_DEBUG("flash %s/%s cancelled: %d KV blocks needed, %d free", victim->s->id,
                  victim->flash_name, need, kvs_pool_n_free(pool));
        kvs_pool_seq_release(pool, &victim->seq);
        sc->S->reserved_blocks -= victim->reserved_blocks;
        victim->reserved_blocks = 0;
        victim->cancelled = true; /* freed at the next safe point */
        sc->st.flash_cancelled++;
    }
    return true;
}

/* Fork j's session at its visible data and take the real blocks of j's question and answer
 * (without overcommit the accounting guarantees them; with it, flash evaluations may be
 * cancelled to make room for a query). On error j holds no fork. */
static int take_fork(kvs_sched *sc, struct job *j, char *err, size_t errlen)
{
    kvs_pool *pool = sc->e->pool;
    kvs_session *s = j->s;
    j->ctx = s->visible;
    j->version = s->version;
    j->seq = kvs_pool_seq_fork_n(pool, s->seq, (int32_t)j->ctx);
    if (j->seq == NULL) {
        snprintf(err, errlen, "cannot start the query");
        return KVS_NO_MEMORY;
    }
    int32_t n_cells = (int32_t)(j->n_ids + j->max_tokens);
    if (kvs_pool_seq_reserve(pool, j->seq, n_cells) == KVS_CAPACITY &&
        (j->kind != JOB_QUERY ||
         !make_room(sc, kvs_pool_seq_blocks_needed(pool, j->seq, n_cells)) ||
         kvs_pool_seq_reserve(pool, j->seq, n_cells) < 0)) {
        kvs_pool_seq_release(pool, &j->seq);
        snprintf(err, errlen, "no free KV cells for a query of %lld + %d tokens now",
                 (long long)j->n_ids, j->max_tokens);
        return KVS_BUSY;
    }
    return KVS_OK;
}

/* Accept a query or flash evaluation on s: reserve its cells in the accounting, set up
 * sampling, and fork at the visible data (take_fork) unless `defer` (a query behind its
 * session's sliding append forks when the slide is done). On error the caller frees j
 * (job_free), which releases whatever was set up. */
static int accept(kvs_sched *sc, struct job *j, const struct kvs_query_opts *o, bool defer,
                  char *err, size_t errlen)
{
    kvs_engine *e = sc->e;
    kvs_session *s = j->s;
    j->max_tokens = o->max_tokens > 0 ? o->max_tokens : 64;
    j->ctx = s->visible; /* a deferred query sees no more than this: the slide evicts */
    j->logit_row = -1;
    if (j->ctx + j->n_ids + j->max_tokens > e->n_ctx) {
        snprintf(err, errlen, "context %lld + question %lld + answer %d exceed the model's %lld",
                 (long long)j->ctx, (long long)j->n_ids, j->max_tokens, (long long)e->n_ctx);
        return KVS_CONTEXT_FULL;
    }
    int32_t blocks = kvs_sess_blocks_for(sc->S, j->n_ids + j->max_tokens);
    if (blocks > kvs_sess_blocks_free(sc->S)) {
        snprintf(err, errlen, "no KV reserve for a query of %lld + %d tokens now",
                 (long long)j->n_ids, j->max_tokens);
        return KVS_BUSY;
    }
    if (sc->st.pressure) {
        snprintf(err, errlen, "KV cells exhausted (overcommit): appends are waiting for cells");
        return KVS_BUSY;
    }
    int rc = kvs_sampler_new(&o->sampling, (int32_t)e->model->hp.n_vocab, &j->smp);
    j->stop = kvs_stop_new(o->stops, o->n_stops);
    j->dt = kvs_detok_new(e->tok, false);
    j->out = malloc(((size_t)j->max_tokens + 1) * sizeof *j->out);
    if (rc < 0 || j->stop == NULL || j->dt == NULL || j->out == NULL) {
        snprintf(err, errlen, "cannot start the query");
        return rc < 0 ? rc : KVS_NO_MEMORY;
    }
    if (!defer) {
        KVS_TRY(take_fork(sc, j, err, errlen));
    }
    for (int64_t i = 0; i < j->n_ids; i++) {
        kvs_sampler_accept(j->smp, j->ids[i]);
    }
    sc->S->reserved_blocks += blocks;
    j->reserved_blocks = blocks;
    j->deferred = defer;
    j->t_accept = kvs_now();
    return KVS_OK;
}

/* Is the next append of s (the first one queued) a slide that has not begun? Then new forks
 * of s would hold blocks that slide drops: new queries wait behind it and no flash
 * evaluation is queued (its answer would be stale at once). */
static bool slide_ahead(const kvs_sched *sc, const kvs_session *s)
{
    for (int32_t i = 0; i < sc->n; i++) {
        const struct job *j = sc->jobs[i];
        if (j->kind == JOB_APPEND && j->s == s && !j->cancelled) {
            return !j->begun && s->policy == KVS_POLICY_SLIDE &&
                   s->seq->n_cells + j->n_ids > s->budget;
        }
    }
    return false;
}

int kvs_sched_query(kvs_sched *sc, kvs_session *s, const char *question, size_t len,
                    const struct kvs_query_opts *o, double deadline, kvs_token_fn on_token,
                    kvs_sched_query_fn done, void *user, char *err, size_t errlen)
{
    if (question == NULL || len == 0 || o->stateless) {
        snprintf(err, errlen, "%s", o->stateless ? "stateless queries are not scheduled"
                                                 : "the question is empty");
        sc->st.refused++;
        return KVS_INVALID_ARGUMENT;
    }
    int rc = kvs_sess_check_query_opts(o, err, errlen);
    if (rc < 0) {
        sc->st.refused++;
        return rc;
    }
    struct job *j = calloc(1, sizeof *j);
    if (j == NULL) {
        return KVS_NO_MEMORY;
    }
    j->kind = JOB_QUERY;
    j->s = s;
    j->deadline = deadline;
    j->on_token = on_token;
    j->query_done = done;
    j->user = user;
    rc = kvs_sess_frame(s, true, question, len, &j->ids, &j->n_ids);
    if (rc == 0 && j->n_ids == 0) {
        rc = KVS_INVALID_ARGUMENT;
    }
    if (rc == 0) {
        rc = accept(sc, j, o, slide_ahead(sc, s), err, errlen);
        if (!sc->in_step) {
            sweep_cancelled(sc); /* flash evaluations cancelled to make room */
        }
    }
    if (rc == 0) {
        rc = push_job(sc, j);
    }
    if (rc == 0 && j->deferred) {
        sc->st.queries_deferred++;
    }
    if (rc < 0) {
        sc->st.refused++;
        sc->st.refused_busy += rc == KVS_BUSY;
        job_free(sc, j);
    }
    return rc;
}

/* Queue the flash evaluations of s that are due (one pending job per flash query). */
static void queue_flash(kvs_sched *sc, kvs_session *s)
{
    if (sc->st.pressure || sc->pressure_now) {
        return; /* overcommit, stage 3: no new work while appends wait for cells */
    }
    if (slide_ahead(sc, s)) {
        return; /* queued again when that append is done */
    }
    for (int32_t i = 0; i < s->n_flash; i++) {
        struct flash *f = &s->flash[i];
        if (f->has_answer && f->answer.version == s->version) {
            continue;
        }
        int64_t fresh_tokens = s->appended_total - f->data_tokens_at_eval;
        if (f->has_answer && f->trigger.every_tokens > 0 && fresh_tokens < f->trigger.every_tokens) {
            continue;
        }
        if (f->has_answer && f->trigger.min_interval_ms > 0 &&
            (sc->now - f->last_eval_s) * 1000.0 < f->trigger.min_interval_ms) {
            continue;
        }
        bool pending = false;
        for (int32_t k = 0; k < sc->n && !pending; k++) {
            struct job *o = sc->jobs[k];
            pending = o->kind == JOB_FLASH && o->s == s && !o->cancelled &&
                      strcmp(o->flash_name, f->name) == 0;
        }
        if (pending) {
            continue;
        }
        struct job *j = calloc(1, sizeof *j);
        if (j == NULL) {
            return;
        }
        j->kind = JOB_FLASH;
        j->s = s;
        snprintf(j->flash_name, sizeof j->flash_name, "%s", f->name);
        j->ids = malloc((size_t)f->n_question * sizeof *j->ids);
        char err[160];
        if (j->ids == NULL) {
            free(j);
            return;
        }
        memcpy(j->ids, f->question, (size_t)f->n_question * sizeof *j->ids);
        j->n_ids = f->n_question;
        if (accept(sc, j, &f->opts, false, err, sizeof err) < 0 || push_job(sc, j) < 0) {
            KVS_DEBUG("flash %s/%s deferred: %s", s->id, f->name, err);
            job_free(sc, j);
            return;
        }
    }
}

/* Finish a query or flash job (generation ended normally). */
static void finish_generation(kvs_sched *sc, struct job *j)
{
    const char *tail;
    size_t n_tail;
    kvs_detok_finish(j->dt, &tail, &n_tail);
    size_t keep = j->emitted;
    bool stopped = j->text != NULL && j->emitted < j->text_len;
    if (!stopped || n_tail > 0) {
        char *t = realloc(j->text, j->text_len + n_tail + 1);
        if (t != NULL) {
            j->text = t;
            memcpy(j->text + j->text_len, tail, n_tail);
            j->text_len += n_tail;
        }
    }
    keep = j->text_len;
    if (j->text == NULL) {
        j->text = calloc(1, 1);
    }
    if (j->text != NULL) {
        j->text[keep] = '\0';
    }
    double now = kvs_now();
    struct kvs_answer a = {.text = j->text, .len = keep, .tokens = j->out,
                           .n_tokens = j->n_out, .version = j->version, .context_tokens = j->ctx,
                           .question_tokens = (int32_t)j->n_ids,
                           .ttft_s = (j->t_first > 0 ? j->t_first : now) - j->t_accept,
                           .total_s = now - j->t_accept, .fresh = true};
    j->text = NULL;
    j->out = NULL;
    if (j->kind == JOB_QUERY) {
        if (j->on_token != NULL && keep > j->emitted) {
            j->on_token(-1, a.text + j->emitted, keep - j->emitted, j->user);
        }
        struct kvs_answer *copy = malloc(sizeof *copy);
        if (copy != NULL) {
            *copy = a;
        } else {
            kvs_answer_free(&a);
        }
        if (j->query_done != NULL) {
            j->query_done(copy != NULL ? KVS_OK : KVS_NO_MEMORY, copy, NULL, j->user);
        } else if (copy != NULL) {
            kvs_answer_free(copy);
            free(copy);
        }
    } else {
        kvs_session *s = j->s;
        struct flash *f = kvs_sess_flash_find(s, j->flash_name);
        sc->st.flash_evals++;
        s->fstats.evaluations++;
        if (j->version != s->version) {
            sc->st.flash_wasted++;
        }
        if (f != NULL && (!f->has_answer || f->answer.version <= j->version)) {
            kvs_answer_free(&f->answer);
            f->answer = a;
            f->has_answer = true;
            f->data_tokens_at_eval = s->appended_total;
            f->last_eval_s = sc->now;
            if (s->watch_fn != NULL) {
                s->watch_fn(s, f->name, &f->answer, s->watch_user);
            }
        } else {
            kvs_answer_free(&a);
        }
    }
    sc->st.completed++;
}

/* Take a sampled token for a query / flash job. Returns true when the job is finished. */
static bool take_token(kvs_sched *sc, struct job *j, const float *logits)
{
    int32_t tok = kvs_sampler_sample(j->smp, logits);
    if (j->t_first <= 0) {
        j->t_first = kvs_now();
    }
    if (kvs_tokenizer_is_eog(sc->e->tok, tok)) {
        return true;
    }
    kvs_sampler_accept(j->smp, tok);
    j->out[j->n_out++] = tok;
    const char *piece;
    size_t n_piece;
    if (kvs_detok_push(j->dt, tok, &piece, &n_piece) == 0 && n_piece > 0) {
        if (j->text_len + n_piece + 1 > j->text_cap) {
            size_t cap = (j->text_cap + n_piece + 1) * 2;
            char *t = realloc(j->text, cap);
            if (t == NULL) {
                return true;
            }
            j->text = t;
            j->text_cap = cap;
        }
        memcpy(j->text + j->text_len, piece, n_piece);
        j->text_len += n_piece;
        size_t safe = 0;
        bool matched = kvs_stop_feed(j->stop, piece, n_piece, &safe);
        bool go_on = true;
        if (j->kind == JOB_QUERY && j->on_token != NULL && safe > j->emitted) {
            go_on = j->on_token(tok, j->text + j->emitted, safe - j->emitted, j->user);
        }
        j->emitted = safe;
        if (matched || !go_on) {
            j->text_len = safe;
            return true;
        }
    } else {
        size_t safe = 0;
        if (kvs_stop_feed(j->stop, "", 0, &safe)) {
            return true;
        }
    }
    if (j->n_out >= j->max_tokens) {
        return true;
    }
    j->decoding = true;
    j->next_tok = tok;
    return false;
}

static void remove_job(kvs_sched *sc, int32_t i)
{
    memmove(sc->jobs + i, sc->jobs + i + 1, (size_t)(sc->n - i - 1) * sizeof *sc->jobs);
    sc->n--;
}

/* Add up to `want` rows of job j to the batch (reserving its cells). Returns rows added. */
static int32_t plan_rows(kvs_sched *sc, struct job *j, int32_t want)
{
    kvs_engine *e = sc->e;
    kvs_batch *b = &e->batch;
    kvs_seq *seq = j->kind == JOB_APPEND ? j->s->seq : j->seq;
    int32_t rows = j->decoding ? 1 : (int32_t)(j->n_ids - j->done < want ? j->n_ids - j->done : want);
    if (rows <= 0 || b->n_rows + rows > b->cap) {
        return 0;
    }
    if (kvs_pool_seq_reserve(e->pool, seq, rows) < 0) {
        return 0;
    }
    for (int32_t r = 0; r < rows; r++) {
        int32_t tok = j->decoding ? j->next_tok : j->ids[j->done + r];
        bool last = j->kind != JOB_APPEND && (j->decoding || j->done + r == j->n_ids - 1);
        if (last) {
            j->logit_row = sc->n_logit_rows++; /* logits come back in row order */
        }
        kvs_batch_add(b, seq, tok, seq->n_cells + r, last);
    }
    j->rows = rows;
    return rows;
}

/* Remove append j from the queue and answer it: rc == 1 is a retry (its original
 * acknowledgement), anything else an error. */
static void append_leave(kvs_sched *sc, struct job *j, int rc, const char *err)
{
    int32_t idx = 0;
    while (sc->jobs[idx] != j) {
        idx++;
    }
    remove_job(sc, idx);
    if (rc == 1) {
        if (j->append_done != NULL) {
            j->append_done(KVS_OK, &j->ack, NULL, j->user);
        }
        sc->st.completed++;
        job_free(sc, j);
    } else {
        job_fail(sc, j, rc, err);
    }
}

/* Can the head append j get the blocks of its whole record, after `promised` blocks went
 * to appends ahead of it in this step? With overcommit the cells may be missing: flash
 * evaluations are cancelled to make room (stages 1-2 of sched.h), failing that the append
 * waits (stages 3-4). Returns the blocks it needs (>= 0) when they are there, -1 when it
 * waits, -2 when it left the queue (no deadline to wait for: KVS_CAPACITY). */
static int32_t append_cells(kvs_sched *sc, struct job *j, int32_t promised)
{
    kvs_pool *pool = sc->e->pool;
    kvs_session *s = j->s;
    /* an append that slides makes room by evicting its own session's blocks: it needs one
     * free block at a time (kvs_pool_seq_slide) */
    bool slides = s->seq->n_cells + j->n_ids > s->budget;
    int32_t need = slides ? 1 : kvs_pool_seq_blocks_needed(pool, s->seq, (int32_t)j->n_ids);
    if (promised + need <= kvs_pool_n_free(pool) || make_room(sc, promised + need)) {
        j->waiting_cells = false;
        return need;
    }
    if (!j->waiting_cells) {
        j->waiting_cells = true;
        sc->st.append_waits++;
    }
    sc->pressure_now = true;
    if (j->deadline > 0) {
        return -1;
    }
    char err[160];
    snprintf(err, sizeof err, "no free KV cells for %lld tokens (overcommit), and no deadline "
                              "to wait for",
             (long long)j->n_ids);
    sc->st.append_capacity++;
    append_leave(sc, j, KVS_CAPACITY, err);
    return -2;
}

/* May append j, at the head of its session's queue, slide now? Not while forks of its
 * session hold blocks the slide drops or copies (kvs_sess_slide_shared): the cells that
 * would take are nobody's reservation. The session's flash evaluations are cancelled (their
 * answers would be stale at once; the append queues new ones), its running queries finish
 * (bounded by max_tokens and their deadlines) and its new queries wait behind the append
 * (slide_ahead). Returns true when j may begin. */
static bool slide_clear(kvs_sched *sc, struct job *j)
{
    kvs_session *s = j->s;
    if (kvs_sess_slide_shared(s, j->n_ids) > 0) {
        for (int32_t i = 0; i < sc->n; i++) {
            struct job *f = sc->jobs[i];
            if (f->kind == JOB_FLASH && f->s == s && !f->cancelled && f->seq != NULL) {
                kvs_pool_seq_release(sc->e->pool, &f->seq);
                sc->S->reserved_blocks -= f->reserved_blocks;
                f->reserved_blocks = 0;
                f->cancelled = true; /* freed at the next safe point */
                sc->st.slide_flash_cancelled++;
            }
        }
    }
    if (kvs_sess_slide_shared(s, j->n_ids) == 0) {
        j->waiting_forks = false;
        return true;
    }
    if (!j->waiting_forks) {
        j->waiting_forks = true;
        sc->st.slide_waits++;
    }
    return false;
}

/* Begin append j (policy, log, record) and take the blocks of its whole record. Returns
 * true when begun, false when it left the queue (a retry answered, or an error). */
static bool begin_append(kvs_sched *sc, struct job *j)
{
    char err[256] = "";
    int rc = kvs_sess_append_begin(j->s, j->ids, j->n_ids, j->client_id, j->client_seq, &j->ack,
                                   err, sizeof err);
    if (rc != 0) {
        append_leave(sc, j, rc, err);
        return false;
    }
    j->begun = true;
    /* promised by append_cells; if a slide left too few, the chunks reserve as they go */
    (void)kvs_pool_seq_reserve(sc->e->pool, j->s->seq, (int32_t)j->n_ids);
    return true;
}

/* Has j started (some rows computed, or an append begun)? */
static bool job_started(const struct job *j)
{
    return j->kind == JOB_APPEND ? j->begun : j->done > 0 || j->decoding;
}

/* FIFO (sched.h): the job that has started, else the oldest that can start, alone, with
 * every row it has left up to the batch cap (one decode row once it decodes). */
static void plan_fifo(kvs_sched *sc)
{
    struct job *pick = NULL;
    for (int32_t i = 0; i < sc->n && pick == NULL; i++) {
        struct job *j = sc->jobs[i];
        if (!j->cancelled && job_started(j)) {
            pick = j;
        }
    }
    for (int32_t i = 0; i < sc->n && pick == NULL; i++) {
        struct job *j = sc->jobs[i];
        if (j->cancelled || j->deferred || (j->kind == JOB_APPEND && !j->head)) {
            continue; /* cannot start now: the next one may */
        }
        if (j->kind == JOB_APPEND && !begin_append(sc, j)) {
            i--; /* it left the queue */
            continue;
        }
        pick = j;
    }
    if (pick != NULL) {
        int cls = (int)job_class(pick);
        sc->st.last_rows[cls] += plan_rows(sc, pick, sc->o.max_batch_tokens);
    }
}

/* Step 4's running totals. */
struct plan {
    int32_t avail;        /* rows left in the step's budget */
    int32_t append_left;  /* append rows the step may still take (rule 5) */
    int32_t jobs_planned; /* jobs with rows in the step */
};

/* Plan the jobs of class cls that can run (only appends already begun when begun_only),
 * starting at the class's round-robin position, into the step's batch. */
static void plan_class(kvs_sched *sc, int cls, bool begun_only, struct plan *pl)
{
    int32_t start = sc->n > 0 ? sc->rr[cls] % sc->n : 0;
    for (int32_t k = 0; k < sc->n && pl->avail > 0; k++) {
        if (sc->o.max_jobs_per_step > 0 && pl->jobs_planned >= sc->o.max_jobs_per_step) {
            break;
        }
        struct job *j = sc->jobs[(start + k) % sc->n];
        if (j->rows > 0 || j->cancelled || j->deferred) {
            continue;
        }
        if ((int)job_class(j) != cls) {
            continue;
        }
        if (j->kind == JOB_APPEND && (pl->append_left <= 0 || (begun_only && !j->begun))) {
            continue; /* an append begins only when it gets rows */
        }
        if (j->kind == JOB_APPEND && !j->begun) {
            if (!j->head) {
                continue; /* behind its session's current append, or waiting for cells */
            }
            if (!begin_append(sc, j)) {
                k--; /* it left the queue */
                continue;
            }
        }
        int32_t want = pl->avail;
        if (j->kind == JOB_APPEND) {
            want = want < sc->o.append_chunk ? want : sc->o.append_chunk;
            want = want < pl->append_left ? want : pl->append_left;
        }
        int32_t got = plan_rows(sc, j, want);
        pl->avail -= got;
        if (j->kind == JOB_APPEND) {
            pl->append_left -= got;
        }
        pl->jobs_planned += got > 0;
        sc->st.last_rows[cls] += got;
    }
}

static int step(kvs_sched *sc, double now)
{
    sc->now = now;
    sc->pressure_now = false;
    kvs_engine *e = sc->e;
    memset(sc->st.last_rows, 0, sizeof sc->st.last_rows);
    /* 1. expire jobs that have not started */
    for (int32_t i = 0; i < sc->n;) {
        struct job *j = sc->jobs[i];
        if (j->cancelled) {
            i++;
            continue;
        }
        bool started = job_started(j);
        if (j->deadline > 0 && now > j->deadline && (!started || j->kind == JOB_QUERY)) {
            remove_job(sc, i);
            if (j->waiting_cells) { /* overcommit, stage 4 */
                sc->st.append_capacity++;
                job_fail(sc, j, KVS_CAPACITY, "no free KV cells until the deadline (overcommit)");
            } else {
                job_fail(sc, j, KVS_TIMEOUT, "deadline exceeded");
            }
            continue;
        }
        i++;
    }
    if (sc->n == 0) {
        return 0;
    }
    double t0 = step_clock(sc);
    kvs_batch_clear(&e->batch);
    sc->n_logit_rows = 0;
    for (int32_t i = 0; i < sc->n; i++) {
        sc->jobs[i]->rows = 0;
        sc->jobs[i]->logit_row = -1;
    }
    /* 2. queries deferred behind a sliding append fork once it has begun (the slide done) */
    for (int32_t i = 0; i < sc->n;) {
        struct job *j = sc->jobs[i];
        if (j->deferred && !j->cancelled && !slide_ahead(sc, j->s)) {
            char err[160];
            j->deferred = false;
            if (take_fork(sc, j, err, sizeof err) < 0) {
                remove_job(sc, i); /* with overcommit only */
                job_fail(sc, j, KVS_BUSY, err);
                continue;
            }
        }
        i++;
    }
    /* 3. the cells of the append at the head of each session's queue (one append per
     * session at a time, in arrival order), before any row of this step holds blocks: this
     * is where a slide waits for its session's forks and the overcommit order runs;
     * appends begin when they are planned */
    int32_t promised = 0;
    for (int32_t i = 0; i < sc->n;) {
        struct job *j = sc->jobs[i];
        j->head = j->kind == JOB_APPEND && !j->begun && !j->cancelled;
        for (int32_t q = 0; q < i && j->head; q++) {
            j->head = !(sc->jobs[q]->kind == JOB_APPEND && sc->jobs[q]->s == j->s &&
                        !sc->jobs[q]->cancelled);
        }
        if (j->head && !slide_clear(sc, j)) {
            j->head = false; /* waiting for its session's queries to finish */
        }
        if (j->head) {
            int32_t need = append_cells(sc, j, promised);
            if (need == -2) {
                continue; /* it left the queue: the next job is at i now */
            }
            j->head = need >= 0;
            promised += need >= 0 ? need : 0;
        }
        i++;
    }
    int32_t budget = step_budget(sc);
    sc->st.step_rows = budget;
    bool flash_work = false;
    for (int32_t i = 0; i < sc->n && !flash_work; i++) {
        flash_work = job_class(sc->jobs[i]) == KVS_CLASS_FLASH;
    }
    int32_t flash_floor = flash_work ? (int32_t)ceilf(sc->o.flash_min_share * (float)budget) : 0;
    if (flash_floor < (flash_work ? 1 : 0)) {
        flash_floor = 1;
    }
    struct plan pl = {.avail = budget - flash_floor, .append_left = INT32_MAX};
    static const int order[KVS_N_CLASSES] = {KVS_CLASS_DECODE, KVS_CLASS_QUESTION,
                                             KVS_CLASS_APPEND, KVS_CLASS_FLASH};
    static const int flash_first[KVS_N_CLASSES] = {KVS_CLASS_FLASH, KVS_CLASS_DECODE,
                                                   KVS_CLASS_QUESTION, KVS_CLASS_APPEND};
    const int *classes = order;
    if (sc->o.max_jobs_per_step > 0) {
        /* a few requests per step: the flash share is a share of the steps instead (every
         * 1/flash_min_share-th step that has flash work serves it first) */
        pl.avail = budget;
        flash_floor = 0;
        int32_t period = (int32_t)ceilf(1.0f / sc->o.flash_min_share);
        if (flash_work && ++sc->flash_turn >= period) {
            sc->flash_turn = 0;
            classes = flash_first;
        }
    }
    /* 4. plan by class: decode, question, append, then flash (with its floor); or FIFO */
    if (sc->o.fifo) {
        plan_fifo(sc);
    }
    for (int c = 0; c < KVS_N_CLASSES && !sc->o.fifo; c++) {
        int cls = classes[c];
        if (cls == KVS_CLASS_FLASH) {
            pl.avail += flash_floor;
        }
        if (cls == KVS_CLASS_APPEND && sc->st.answer_step_s > 0 &&
            (e->batch.n_rows > 0 || flash_floor > 0)) {
            /* answers in flight: appends stop early (sched.h, rule 5) */
            int32_t left = rows_in(sc, sc->st.answer_step_s) - e->batch.n_rows;
            pl.append_left = left > KVS_SCHED_MIN_ROWS ? left : KVS_SCHED_MIN_ROWS;
        }
        /* appends that have begun get their rows before new ones begin (an append is
         * acknowledged at its last chunk: chunks spread over many appends in turn would
         * delay them all) */
        if (cls == KVS_CLASS_APPEND) {
            plan_class(sc, cls, true, &pl);
        }
        plan_class(sc, cls, false, &pl);
        sc->rr[cls]++;
    }
    /* 5. forward */
    kvs_batch *b = &e->batch;
    if (b->n_rows == 0) {
        return 0;
    }
    int rc = kvs_forward_run(e->fw, b, sc->logits);
    if (rc < 0) {
        return rc;
    }
    const struct kvs_forward_stats *fs = kvs_forward_stats(e->fw);
    sc->st.last_n_seqs = fs->last_n_seqs;
    if (fs->last_n_seqs > sc->st.max_n_seqs) {
        sc->st.max_n_seqs = fs->last_n_seqs;
    }
    /* 6. commit, sample, complete */
    int32_t n_vocab = (int32_t)e->model->hp.n_vocab;
    for (int32_t i = 0; i < sc->n;) {
        struct job *j = sc->jobs[i];
        if (j->rows == 0 || j->cancelled) { /* a cancelled job's rows go with its fork */
            i++;
            continue;
        }
        kvs_seq *seq = j->kind == JOB_APPEND ? j->s->seq : j->seq;
        kvs_pool_seq_commit(e->pool, seq, j->rows);
        if (!j->decoding) {
            j->done += j->rows;
        }
        bool finished = false;
        if (j->kind == JOB_APPEND) {
            if (j->done == j->n_ids) {
                kvs_sess_append_end(j->s, j->n_ids, j->client_id, j->client_seq, &j->ack);
                if (j->append_done != NULL) {
                    j->append_done(KVS_OK, &j->ack, NULL, j->user);
                }
                sc->st.completed++;
                finished = true;
                remove_job(sc, i);
                kvs_session *s = j->s;
                job_free(sc, j);
                queue_flash(sc, s);
                continue;
            }
        } else if (j->logit_row >= 0) {
            finished = take_token(sc, j, sc->logits + (size_t)j->logit_row * n_vocab);
            if (!finished && j->kind == JOB_QUERY && j->deadline > 0 && now > j->deadline) {
                remove_job(sc, i);
                job_fail(sc, j, KVS_TIMEOUT, "deadline exceeded while answering");
                continue;
            }
        }
        if (finished) {
            remove_job(sc, i);
            kvs_session *s = j->s;
            bool was_flash = j->kind == JOB_FLASH;
            finish_generation(sc, j);
            job_free(sc, j);
            if (was_flash) {
                queue_flash(sc, s); /* the session may have moved on meanwhile */
            }
            continue;
        }
        i++;
    }
    int32_t total = 0;
    for (int c = 0; c < KVS_N_CLASSES; c++) {
        sc->st.rows[c] += (uint64_t)sc->st.last_rows[c];
        total += sc->st.last_rows[c];
    }
    sc->st.steps++;
    sc->st.last_step_s = step_clock(sc) - t0;
    if (sc->st.last_step_s > sc->st.max_step_s) {
        sc->st.max_step_s = sc->st.last_step_s;
    }
    sc->st.last_occupancy = (float)total / (float)budget;
    if (2 * total >= budget) { /* see sched.h: light steps overstate the time per row */
        cost_observe(sc, total, sc->st.last_step_s);
    }
    return total;
}

/* The counters that are read from the pool and the registry. */
static void refresh_stats(kvs_sched *sc)
{
    kvs_pool *pool = sc->e->pool;
    kvs_sessions *S = sc->S;
    struct kvs_sched_stats *st = &sc->st;
    memset(st->queued, 0, sizeof st->queued);
    st->pressure = false;
    for (int32_t i = 0; i < sc->n; i++) {
        st->queued[job_class(sc->jobs[i])]++;
        st->pressure |= sc->jobs[i]->waiting_cells;
    }
    int32_t bs = kvs_pool_block_size(pool);
    const struct kvs_pool_stats *ps = kvs_pool_stats(pool);
    st->cells_total = kvs_pool_capacity_cells(pool);
    st->cells_used = (int64_t)(kvs_pool_n_blocks(pool) - kvs_pool_n_free(pool)) * bs;
    st->cells_reserved = (int64_t)S->reserved_blocks * bs;
    st->cells_free = kvs_sessions_cells_free(S);
    st->prefix_hit_cells = ps->hit_blocks * (uint64_t)bs;
    st->prefix_saved_s = (double)st->prefix_hit_cells * st->est_row_s;
    st->prefix_cached_cells = (int64_t)kvs_pool_n_cached(pool) * bs;
    st->reclaimed_cells = ps->reclaimed * (uint64_t)bs;
    st->admission_refused = S->admission_refused;
    st->flash_hits = st->flash_misses = 0;
    for (int32_t i = 0; i < S->n; i++) {
        st->flash_hits += S->all[i]->fstats.hits;
        st->flash_misses += S->all[i]->fstats.misses;
    }
}

int kvs_sched_step(kvs_sched *sc, double now)
{
    sc->in_step = true;
    int rc = step(sc, now);
    sc->in_step = false;
    sweep_cancelled(sc); /* jobs cancelled by callbacks or for room during the step */
    refresh_stats(sc);
    return rc;
}
