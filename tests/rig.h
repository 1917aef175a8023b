/* A small engine rig for tests: a model on the CPU backend, a KV pool and a forward pass,
 * without the tokenizer (the parity models carry none). Header-only; include once per test. */
#ifndef KVS_TEST_RIG_H
#define KVS_TEST_RIG_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/dtype.h"
#include "worker/forward.h"
#include "worker/kvpool.h"
#include "worker/model.h"

struct rig {
    kvs_backend *b;
    kvs_model *m;
    kvs_pool *pool;
    kvs_forward *fw;
    kvs_batch batch;
    int32_t n_vocab;
};

/* 0 on success; prints the reason and returns -1 otherwise. */
static inline int rig_open(struct rig *r, const char *path, int n_threads, uint32_t kv_dtype,
                           int32_t n_block, int32_t max_rows)
{
    memset(r, 0, sizeof *r);
    char err[512] = "";
    r->b = kvs_backend_cpu_new(n_threads);
    if (r->b == NULL) {
        fprintf(stderr, "rig: no CPU backend\n");
        return -1;
    }
    if (kvs_model_load(path, r->b, NULL, NULL, &r->m, err, sizeof err) < 0) {
        fprintf(stderr, "rig: %s: %s\n", path, err);
        return -1;
    }
    const struct kvs_hparams *hp = &r->m->hp;
    struct kvs_kv_layout lay = {.n_layer = (int32_t)hp->n_layer, .n_block = n_block,
                                .block_size = KVS_POOL_DEFAULT_BLOCK_SIZE,
                                .n_kv_head = (int32_t)hp->n_head_kv,
                                .head_dim = (int32_t)hp->head_dim, .dtype = kv_dtype};
    if (kvs_pool_new(r->b, &lay, &r->pool) < 0 ||
        kvs_forward_new(r->m, r->pool, max_rows, &r->fw) < 0 ||
        kvs_batch_init(&r->batch, max_rows) < 0) {
        fprintf(stderr, "rig: cannot allocate pool/forward\n");
        return -1;
    }
    r->n_vocab = (int32_t)hp->n_vocab;
    return 0;
}

static inline void rig_close(struct rig *r)
{
    kvs_batch_free(&r->batch);
    kvs_forward_destroy(&r->fw);
    kvs_pool_destroy(&r->pool);
    kvs_model_destroy(&r->m);
    kvs_backend_destroy(&r->b);
}

/* Append tokens to seq in chunks of `chunk` rows, each chunk one forward call; logits of
 * every position go to out ((n, n_vocab)) when out is non-NULL. 0 or a negative status. */
static inline int rig_feed(struct rig *r, kvs_seq *seq, const int32_t *toks, int32_t n,
                           int32_t chunk, float *out)
{
    for (int32_t i = 0; i < n; i += chunk) {
        int32_t c = n - i < chunk ? n - i : chunk;
        int rc = kvs_pool_seq_reserve(r->pool, seq, c);
        if (rc < 0) {
            return rc;
        }
        kvs_batch_clear(&r->batch);
        for (int32_t j = 0; j < c; j++) {
            kvs_batch_add(&r->batch, seq, toks[i + j], seq->n_cells + j, out != NULL);
        }
        rc = kvs_forward_run(r->fw, &r->batch, out != NULL ? out + (size_t)i * r->n_vocab : NULL);
        if (rc < 0) {
            return rc;
        }
        kvs_pool_seq_commit(r->pool, seq, c);
    }
    return 0;
}

#endif
