#include "engine.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/log.h"
#include "common/status.h"
#include "kernels/dtype.h"
#ifdef KVS_HAVE_CUDA
#include "kernels/cuda/cuda.h"
#endif

double kvs_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int kvs_engine_open(const struct kvs_engine_opts *o, kvs_engine **out, char *err, size_t errlen)
{
    *out = NULL;
    const char *dev = o->device != NULL ? o->device : "cpu";
    int cuda_dev = -1; /* "cuda" = device 0, "cuda:N" = device N */
    if (strcmp(dev, "cuda") == 0) {
        cuda_dev = 0;
    } else if (strncmp(dev, "cuda:", 5) == 0) {
        char *end = NULL;
        long n = strtol(dev + 5, &end, 10);
        if (end == dev + 5 || *end != '\0' || n < 0 || n > 1024) {
            snprintf(err, errlen, "bad device '%s' (expected cpu, cuda or cuda:N)", dev);
            return KVS_INVALID_ARGUMENT;
        }
        cuda_dev = (int)n;
    } else if (strcmp(dev, "cpu") != 0) {
        snprintf(err, errlen, "unknown device '%s' (expected cpu, cuda or cuda:N)", dev);
        return KVS_NO_DEVICE;
    }
#ifndef KVS_HAVE_CUDA
    if (cuda_dev >= 0) {
        snprintf(err, errlen, "device '%s': this build has no CUDA backend (built without nvcc)",
                 dev);
        return KVS_NO_DEVICE;
    }
#endif
    kvs_engine *e = calloc(1, sizeof *e);
    if (e == NULL) {
        return KVS_NO_MEMORY;
    }
    int rc;
#ifdef KVS_HAVE_CUDA
    if (cuda_dev >= 0) {
        e->backend = kvs_backend_cuda_new(cuda_dev, err, errlen); /* err says why not */
        if (e->backend == NULL) {
            rc = KVS_NO_DEVICE;
            goto fail;
        }
    } else
#endif
        e->backend = kvs_backend_cpu_new(o->n_threads);
    if (e->backend == NULL) {
        snprintf(err, errlen, "cannot start the CPU backend");
        rc = KVS_NO_MEMORY;
        goto fail;
    }
    rc = kvs_model_load(o->model_path, e->backend, o->progress, o->progress_user, &e->model, err,
                        errlen);
    if (rc < 0) {
        goto fail;
    }
    rc = kvs_tokenizer_new_from_gguf(e->model->gguf, &e->tok, err, errlen);
    if (rc < 0) {
        goto fail;
    }
    const struct kvs_hparams *hp = &e->model->hp;
    int64_t cells = o->n_cells > 0 ? o->n_cells : (int64_t)hp->n_ctx_train;
    e->n_ctx = cells < (int64_t)hp->n_ctx_train ? cells : (int64_t)hp->n_ctx_train;
    int32_t bs = KVS_POOL_DEFAULT_BLOCK_SIZE;
    int64_t n_block = (cells + bs - 1) / bs;
    if (n_block > INT32_MAX / bs) {
        snprintf(err, errlen, "KV capacity of %lld cells is too large", (long long)cells);
        rc = KVS_OUT_OF_RANGE;
        goto fail;
    }
    struct kvs_kv_layout layout = {
        .n_layer = (int32_t)hp->n_layer,
        .n_block = (int32_t)n_block,
        .block_size = bs,
        .n_kv_head = (int32_t)hp->n_head_kv,
        .head_dim = (int32_t)hp->head_dim,
        .dtype = cuda_dev >= 0 ? KVS_DTYPE_BF16 : o->kv_f32 ? KVS_DTYPE_F32 : KVS_DTYPE_F16,
    };
    rc = kvs_pool_new(e->backend, &layout, &e->pool);
    if (rc < 0) {
        snprintf(err, errlen, "cannot allocate KV for %lld cells (%.1f MiB)", (long long)cells,
                 (double)cells *
                     (double)kvs_pool_cell_bytes(layout.n_layer, layout.n_kv_head,
                                                 layout.head_dim, layout.dtype) /
                     (1 << 20));
        goto fail;
    }
    e->max_batch_rows = o->max_batch_rows > 0 ? o->max_batch_rows : 512;
    rc = kvs_forward_new(e->model, e->pool, e->max_batch_rows, &e->fw);
    if (rc < 0) {
        snprintf(err, errlen, "cannot allocate forward scratch for %d rows", e->max_batch_rows);
        goto fail;
    }
    rc = kvs_batch_init(&e->batch, e->max_batch_rows);
    if (rc < 0) {
        goto fail;
    }
    e->logits = malloc((size_t)hp->n_vocab * sizeof(float));
    if (e->logits == NULL) {
        rc = KVS_NO_MEMORY;
        goto fail;
    }
    *out = e;
    return KVS_OK;
fail:
    if (err != NULL && errlen > 0 && err[0] == '\0') {
        snprintf(err, errlen, "%s", kvs_status_message(rc));
    }
    kvs_engine_destroy(&e);
    return rc;
}

void kvs_engine_destroy(kvs_engine **ep)
{
    if (ep == NULL || *ep == NULL) {
        return;
    }
    kvs_engine *e = *ep;
    free(e->logits);
    kvs_batch_free(&e->batch);
    kvs_forward_destroy(&e->fw);
    kvs_pool_destroy(&e->pool);
    kvs_tokenizer_destroy(&e->tok);
    kvs_model_destroy(&e->model);
    kvs_backend_destroy(&e->backend);
    free(e);
    *ep = NULL;
}

int kvs_engine_prefill(kvs_engine *e, kvs_seq *seq, const int32_t *tokens, int32_t n,
                       float *logits_all, float *last_logits)
{
    if (n <= 0) {
        return KVS_INVALID_ARGUMENT;
    }
    uint32_t n_vocab = e->model->hp.n_vocab;
    KVS_TRY(kvs_pool_seq_reserve(e->pool, seq, n));
    for (int32_t i = 0; i < n; i += e->max_batch_rows) {
        int32_t c = n - i < e->max_batch_rows ? n - i : e->max_batch_rows;
        kvs_batch_clear(&e->batch);
        for (int32_t j = 0; j < c; j++) {
            bool last = i + j == n - 1;
            bool want = logits_all != NULL || (last && last_logits != NULL);
            kvs_batch_add(&e->batch, seq, tokens[i + j], seq->n_cells + j, want);
        }
        float *dst = logits_all != NULL ? logits_all + (size_t)i * n_vocab : last_logits;
        int rc = kvs_forward_run(e->fw, &e->batch, dst);
        if (rc < 0) {
            kvs_pool_seq_trim(e->pool, seq);
            return rc;
        }
        kvs_pool_seq_commit(e->pool, seq, c);
    }
    if (logits_all != NULL && last_logits != NULL) {
        memcpy(last_logits, logits_all + (size_t)(n - 1) * n_vocab, n_vocab * sizeof(float));
    }
    return KVS_OK;
}

int kvs_engine_generate(kvs_engine *e, const int32_t *prompt, int32_t n_prompt,
                        const struct kvs_gen_opts *go, kvs_token_fn cb, void *user,
                        struct kvs_gen_result *res)
{
    memset(res, 0, sizeof *res);
    if (n_prompt <= 0 || go->max_tokens < 0) {
        return KVS_INVALID_ARGUMENT;
    }
    int64_t need = (int64_t)n_prompt + go->max_tokens;
    if (need > e->n_ctx || need > kvs_pool_capacity_cells(e->pool)) {
        return KVS_CONTEXT_FULL;
    }
    kvs_seq *seq = kvs_pool_seq_new(e->pool);
    if (seq == NULL) {
        return KVS_NO_MEMORY;
    }
    int rc = kvs_engine_generate_on(e, seq, prompt, n_prompt, go, cb, user, res);
    kvs_pool_seq_release(e->pool, &seq);
    return rc;
}

int kvs_engine_generate_on(kvs_engine *e, kvs_seq *seq, const int32_t *prompt,
                           int32_t n_prompt, const struct kvs_gen_opts *go, kvs_token_fn cb,
                           void *user, struct kvs_gen_result *res)
{
    memset(res, 0, sizeof *res);
    if (n_prompt <= 0 || go->max_tokens < 0) {
        return KVS_INVALID_ARGUMENT;
    }
    const struct kvs_hparams *hp = &e->model->hp;
    const struct kvs_sampling *sp = &go->sampling;
    int32_t max_tokens = go->max_tokens;
    if ((int64_t)seq->n_cells + n_prompt + max_tokens > e->n_ctx) {
        return KVS_CONTEXT_FULL;
    }
    kvs_sampler *smp = NULL;
    kvs_stop *stop = NULL;
    kvs_detok *dt = NULL;
    char *text = NULL;          /* all generated text so far */
    size_t text_len = 0, text_cap = 0, emitted = 0;
    int rc = kvs_sampler_new(sp, (int32_t)hp->n_vocab, &smp);
    if (rc < 0) {
        goto out;
    }
    stop = kvs_stop_new(go->stops, go->n_stops);
    dt = kvs_detok_new(e->tok, false);
    res->tokens = malloc(((size_t)max_tokens + 1) * sizeof *res->tokens);
    if (stop == NULL || dt == NULL || res->tokens == NULL) {
        rc = stop == NULL && go->n_stops > 0 ? KVS_INVALID_ARGUMENT : KVS_NO_MEMORY;
        goto out;
    }
    for (int32_t i = 0; i < n_prompt; i++) {
        kvs_sampler_accept(smp, prompt[i]);
    }
    double t0 = kvs_now();
    rc = kvs_engine_prefill(e, seq, prompt, n_prompt, NULL, e->logits);
    if (rc < 0) {
        goto out;
    }
    double t1 = kvs_now();
    res->prefill_s = t1 - t0;
    bool done = max_tokens == 0;
    while (!done) {
        int32_t tok = kvs_sampler_sample(smp, e->logits);
        if (!go->ignore_eog && kvs_tokenizer_is_eog(e->tok, tok)) {
            res->stopped_eog = true;
            break;
        }
        kvs_sampler_accept(smp, tok);
        res->tokens[res->n_tokens++] = tok;
        const char *piece;
        size_t n_piece;
        if (kvs_detok_push(dt, tok, &piece, &n_piece) < 0) {
            rc = KVS_INTERNAL;
            goto out;
        }
        if (text_len + n_piece + 1 > text_cap) {
            size_t cap = (text_cap + n_piece + 1) * 2;
            char *t = realloc(text, cap);
            if (t == NULL) {
                rc = KVS_NO_MEMORY;
                goto out;
            }
            text = t;
            text_cap = cap;
        }
        memcpy(text + text_len, piece, n_piece);
        text_len += n_piece;
        size_t safe = 0;
        bool matched = kvs_stop_feed(stop, piece, n_piece, &safe);
        if (cb != NULL && !cb(tok, text + emitted, safe - emitted, user)) {
            done = true;
        }
        emitted = safe;
        if (matched) {
            res->stopped_string = true;
            break;
        }
        if (res->n_tokens >= max_tokens) {
            break;
        }
        if (done) {
            break;
        }
        /* one decode step: the sampled token becomes the next row of the seq */
        rc = kvs_pool_seq_reserve(e->pool, seq, 1);
        if (rc < 0) {
            goto out;
        }
        kvs_batch_clear(&e->batch);
        kvs_batch_add(&e->batch, seq, tok, seq->n_cells, true);
        rc = kvs_forward_run(e->fw, &e->batch, e->logits);
        if (rc < 0) {
            goto out;
        }
        kvs_pool_seq_commit(e->pool, seq, 1);
    }
    res->decode_s = kvs_now() - t1;
    if (!res->stopped_string) {
        /* flush what the detokenizer and the stop matcher held back */
        const char *tail;
        size_t n_tail;
        kvs_detok_finish(dt, &tail, &n_tail);
        if (n_tail > 0) {
            char *t = realloc(text, text_len + n_tail + 1);
            if (t == NULL) {
                rc = KVS_NO_MEMORY;
                goto out;
            }
            text = t;
            memcpy(text + text_len, tail, n_tail);
            text_len += n_tail;
        }
        if (cb != NULL && text_len > emitted) {
            cb(-1, text + emitted, text_len - emitted, user);
        }
    }
    rc = KVS_OK;
out:
    if (rc < 0) {
        free(res->tokens);
        res->tokens = NULL;
        res->n_tokens = 0;
        free(text);
    } else {
        size_t keep = res->stopped_string ? emitted : text_len;
        res->text = text != NULL ? text : malloc(1);
        if (res->text == NULL) {
            free(res->tokens);
            res->tokens = NULL;
            return KVS_NO_MEMORY;
        }
        res->text[keep] = '\0';
        res->text_len = keep;
    }
    kvs_detok_destroy(&dt);
    kvs_stop_destroy(&stop);
    kvs_sampler_destroy(&smp);
    return rc;
}
