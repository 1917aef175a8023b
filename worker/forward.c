#include "forward.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/status.h"
#ifdef KVS_HAVE_CUDA
#include "kernels/cuda/cuda.h"
#endif

#define MAX_LOGIT_ROWS 64 /* rows per LM-head matmul; more are done in several passes */

struct kvs_forward {
    const kvs_model *m;     /* borrowed */
    kvs_pool *pool;         /* borrowed */
    kvs_backend *b;         /* the model's backend */
    int32_t max_rows;       /* rows per batch */
    /* activations, backend memory, row-major */
    float *x;               /* (max_rows, n_embd) residual stream */
    float *h;               /* (max_rows, n_embd) normed input of a sublayer */
    float *q;               /* (max_rows, n_head * head_dim) */
    float *k;               /* (max_rows, n_head_kv * head_dim) */
    float *v;               /* (max_rows, n_head_kv * head_dim) */
    float *att;             /* (max_rows, n_head * head_dim) attention output */
    float *o;               /* (max_rows, n_embd) sublayer output */
    float *gate;            /* (max_rows, n_ff) */
    float *up;              /* (max_rows, n_ff) */
    float *lx;              /* (MAX_LOGIT_ROWS, n_embd) rows that want logits */
    float *logits;          /* (MAX_LOGIT_ROWS, n_vocab) */
    /* attention metadata: host copies and their backend twins */
    int32_t *h_slot, *h_ctx, *h_rtab; /* (max_rows) host */
    int32_t *d_slot, *d_ctx, *d_rtab; /* (max_rows) backend */
    int32_t *h_tables, *d_tables;     /* (tables_cap) concatenated block tables */
    int32_t tables_cap;               /* entries of h_tables / d_tables */
    int32_t *logit_idx;               /* (max_rows) host: rows that want logits */
    kvs_seq **seen;                   /* (max_rows) host: distinct seqs of the batch */
    int32_t *seen_off;                /* (max_rows) host: their offset in tables */
    struct kvs_forward_stats stats;
};

int kvs_batch_init(kvs_batch *b, int32_t cap)
{
    memset(b, 0, sizeof *b);
    b->token = malloc((size_t)cap * sizeof *b->token);
    b->pos = malloc((size_t)cap * sizeof *b->pos);
    b->seq = malloc((size_t)cap * sizeof *b->seq);
    b->want_logits = malloc((size_t)cap * sizeof *b->want_logits);
    if (b->token == NULL || b->pos == NULL || b->seq == NULL || b->want_logits == NULL) {
        kvs_batch_free(b);
        return KVS_NO_MEMORY;
    }
    b->cap = cap;
    return KVS_OK;
}

void kvs_batch_free(kvs_batch *b)
{
    free(b->token);
    free(b->pos);
    free(b->seq);
    free(b->want_logits);
    memset(b, 0, sizeof *b);
}

int kvs_batch_add(kvs_batch *b, kvs_seq *seq, int32_t token, int32_t pos, bool want_logits)
{
    if (b->n_rows >= b->cap) {
        return KVS_TOO_LARGE;
    }
    int32_t i = b->n_rows++;
    b->seq[i] = seq;
    b->token[i] = token;
    b->pos[i] = pos;
    b->want_logits[i] = want_logits ? 1 : 0;
    return KVS_OK;
}

static void *balloc(kvs_backend *b, size_t n, int *ok)
{
    void *p = b->ops->alloc(b, n > 0 ? n : 1);
    if (p == NULL) {
        *ok = 0;
    }
    return p;
}

int kvs_forward_new(const kvs_model *m, kvs_pool *pool, int32_t max_rows, kvs_forward **out)
{
    *out = NULL;
    if (max_rows < 1) {
        return KVS_INVALID_ARGUMENT;
    }
    kvs_forward *fw = calloc(1, sizeof *fw);
    if (fw == NULL) {
        return KVS_NO_MEMORY;
    }
    const struct kvs_hparams *hp = &m->hp;
    kvs_backend *b = m->backend;
    fw->m = m;
    fw->pool = pool;
    fw->b = b;
    fw->max_rows = max_rows;
    size_t R = (size_t)max_rows, F = sizeof(float);
    size_t qd = (size_t)hp->n_head * hp->head_dim, kvd = (size_t)hp->n_head_kv * hp->head_dim;
    int ok = 1;
    fw->x = balloc(b, R * hp->n_embd * F, &ok);
    fw->h = balloc(b, R * hp->n_embd * F, &ok);
    fw->q = balloc(b, R * qd * F, &ok);
    fw->k = balloc(b, R * kvd * F, &ok);
    fw->v = balloc(b, R * kvd * F, &ok);
    fw->att = balloc(b, R * qd * F, &ok);
    fw->o = balloc(b, R * hp->n_embd * F, &ok);
    fw->gate = balloc(b, R * hp->n_ff * F, &ok);
    fw->up = balloc(b, R * hp->n_ff * F, &ok);
    fw->lx = balloc(b, (size_t)MAX_LOGIT_ROWS * hp->n_embd * F, &ok);
    fw->logits = balloc(b, (size_t)MAX_LOGIT_ROWS * hp->n_vocab * F, &ok);
    fw->d_slot = balloc(b, R * sizeof(int32_t), &ok);
    fw->d_ctx = balloc(b, R * sizeof(int32_t), &ok);
    fw->d_rtab = balloc(b, R * sizeof(int32_t), &ok);
    fw->h_slot = malloc(R * sizeof(int32_t));
    fw->h_ctx = malloc(R * sizeof(int32_t));
    fw->h_rtab = malloc(R * sizeof(int32_t));
    fw->logit_idx = malloc(R * sizeof(int32_t));
    fw->seen = malloc(R * sizeof(kvs_seq *));
    fw->seen_off = malloc(R * sizeof(int32_t));
    if (!ok || fw->h_slot == NULL || fw->h_ctx == NULL || fw->h_rtab == NULL ||
        fw->logit_idx == NULL || fw->seen == NULL || fw->seen_off == NULL) {
        kvs_forward_destroy(&fw);
        return KVS_NO_MEMORY;
    }
    *out = fw;
    return KVS_OK;
}

void kvs_forward_destroy(kvs_forward **fwp)
{
    if (fwp == NULL || *fwp == NULL) {
        return;
    }
    kvs_forward *fw = *fwp;
    kvs_backend *b = fw->b;
    void *dev[] = {fw->x,      fw->h,      fw->q,     fw->k,      fw->v,
                   fw->att,    fw->o,      fw->gate,  fw->up,     fw->lx,
                   fw->logits, fw->d_slot, fw->d_ctx, fw->d_rtab, fw->d_tables};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) {
        b->ops->free(b, dev[i]);
    }
    free(fw->h_slot);
    free(fw->h_ctx);
    free(fw->h_rtab);
    free(fw->h_tables);
    free(fw->logit_idx);
    free(fw->seen);
    free(fw->seen_off);
    free(fw);
    *fwp = NULL;
}

int32_t kvs_forward_max_rows(const kvs_forward *fw)
{
    return fw->max_rows;
}

const struct kvs_forward_stats *kvs_forward_stats(const kvs_forward *fw)
{
    return &fw->stats;
}

static int grow_tables(kvs_forward *fw, int32_t need)
{
    if (need <= fw->tables_cap) {
        return KVS_OK;
    }
    int32_t cap = fw->tables_cap > 0 ? fw->tables_cap : 256;
    while (cap < need) {
        cap *= 2;
    }
    int32_t *h = realloc(fw->h_tables, (size_t)cap * sizeof *h);
    if (h == NULL) {
        return KVS_NO_MEMORY;
    }
    fw->h_tables = h;
    int32_t *d = fw->b->ops->alloc(fw->b, (size_t)cap * sizeof *d);
    if (d == NULL) {
        return KVS_NO_MEMORY;
    }
    fw->b->ops->free(fw->b, fw->d_tables);
    fw->d_tables = d;
    fw->tables_cap = cap;
    return KVS_OK;
}

/* Validate the batch and build the attention metadata on the host. */
static int plan_batch(kvs_forward *fw, const kvs_batch *bt, int32_t *n_logits)
{
    const struct kvs_hparams *hp = &fw->m->hp;
    int32_t bs = kvs_pool_block_size(fw->pool);
    int32_t n_seen = 0, n_tab = 0, n_log = 0;
    for (int32_t r = 0; r < bt->n_rows; r++) {
        kvs_seq *s = bt->seq[r];
        int32_t p = bt->pos[r];
        if (s == NULL || bt->token[r] < 0 || (uint32_t)bt->token[r] >= hp->n_vocab || p < 0 ||
            (int64_t)p >= (int64_t)s->n_blocks * bs) {
            KVS_ERROR("forward: row %d is invalid (token %d, position %d, %d cells reserved)", r,
                      bt->token[r], p, s != NULL ? s->n_blocks * bs : 0);
            return KVS_INVALID_ARGUMENT;
        }
        int32_t j = n_seen - 1; /* rows usually come grouped by seq: try the last one first */
        if (j < 0 || fw->seen[j] != s) {
            for (j = 0; j < n_seen && fw->seen[j] != s; j++) {
            }
        }
        if (j == n_seen) {
            int rc = grow_tables(fw, n_tab + s->n_blocks);
            if (rc < 0) {
                return rc;
            }
            memcpy(fw->h_tables + n_tab, s->table, (size_t)s->n_blocks * sizeof(int32_t));
            fw->seen[n_seen] = s;
            fw->seen_off[n_seen++] = n_tab;
            n_tab += s->n_blocks;
        }
        fw->h_slot[r] = kvs_seq_slot(s, p, bs);
        fw->h_ctx[r] = p + 1;
        fw->h_rtab[r] = fw->seen_off[j];
        if (bt->want_logits[r]) {
            fw->logit_idx[n_log++] = r;
        }
    }
    int rc = grow_tables(fw, n_tab > 0 ? n_tab : 1);
    if (rc < 0) {
        return rc;
    }
    kvs_backend *b = fw->b;
    size_t rb = (size_t)bt->n_rows * sizeof(int32_t);
    KVS_TRY(b->ops->upload(b, fw->d_slot, fw->h_slot, rb));
    KVS_TRY(b->ops->upload(b, fw->d_ctx, fw->h_ctx, rb));
    KVS_TRY(b->ops->upload(b, fw->d_rtab, fw->h_rtab, rb));
    KVS_TRY(b->ops->upload(b, fw->d_tables, fw->h_tables, (size_t)n_tab * sizeof(int32_t)));
    fw->stats.last_n_seqs = n_seen;
    if (n_seen > fw->stats.max_n_seqs) {
        fw->stats.max_n_seqs = n_seen;
    }
    *n_logits = n_log;
    return KVS_OK;
}

/* The layers of one batch, and the LM head of its first n_head_rows logit rows (at most
 * MAX_LOGIT_ROWS) into fw->logits. Issues ops only: nothing is downloaded or synced. */
static int forward_ops(kvs_forward *fw, const kvs_batch *bt, const struct kvs_attn_batch *ab,
                       int32_t n_head_rows)
{
    const kvs_model *m = fw->m;
    const struct kvs_hparams *hp = &m->hp;
    kvs_backend *b = fw->b;
    const struct kvs_backend_ops *op = b->ops;
    kvs_kv_cache *kv = kvs_pool_kv(fw->pool);
    int32_t n = bt->n_rows;
    int32_t E = (int32_t)hp->n_embd, FF = (int32_t)hp->n_ff;
    int32_t H = (int32_t)hp->n_head, HKV = (int32_t)hp->n_head_kv, D = (int32_t)hp->head_dim;
    float scale = 1.0f / sqrtf((float)D);

    KVS_TRY(op->get_rows(b, &m->tok_embd, bt->token, n, fw->x));
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        const struct kvs_layer *L = &m->layers[l];
        /* attention block */
        KVS_TRY(op->rmsnorm(b, fw->x, L->attn_norm, n, E, hp->norm_eps, fw->h));
        KVS_TRY(op->matmul(b, &L->wq, fw->h, n, L->bq, fw->q));
        KVS_TRY(op->matmul(b, &L->wk, fw->h, n, L->bk, fw->k));
        KVS_TRY(op->matmul(b, &L->wv, fw->h, n, L->bv, fw->v));
        if (op->rope_store != NULL) {
            KVS_TRY(op->rope_store(b, kv, (int32_t)l, fw->q, H, fw->k, fw->v, HKV, D, bt->pos,
                                   &m->rope, ab));
        } else {
            KVS_TRY(op->rope(b, fw->q, n, H, D, bt->pos, &m->rope));
            KVS_TRY(op->rope(b, fw->k, n, HKV, D, bt->pos, &m->rope));
            KVS_TRY(op->kv_store(b, kv, (int32_t)l, fw->k, fw->v, ab));
        }
        KVS_TRY(op->attention(b, kv, (int32_t)l, fw->q, H, scale, ab, fw->att));
        if (op->matmul_add != NULL) {
            KVS_TRY(op->matmul_add(b, &L->wo, fw->att, n, fw->o, fw->x));
        } else {
            KVS_TRY(op->matmul(b, &L->wo, fw->att, n, NULL, fw->o));
            KVS_TRY(op->add(b, fw->x, fw->o, (int64_t)n * E));
        }
        /* feed-forward block */
        KVS_TRY(op->rmsnorm(b, fw->x, L->ffn_norm, n, E, hp->norm_eps, fw->h));
        if (op->ffn != NULL) {
            KVS_TRY(op->ffn(b, &L->w_gate, &L->w_up, &L->w_down, fw->h, n, fw->gate, fw->up,
                            fw->o, fw->x));
        } else {
            KVS_TRY(op->matmul(b, &L->w_gate, fw->h, n, NULL, fw->gate));
            KVS_TRY(op->matmul(b, &L->w_up, fw->h, n, NULL, fw->up));
            KVS_TRY(op->swiglu(b, fw->gate, fw->up, (int64_t)n * FF, fw->gate));
            KVS_TRY(op->matmul(b, &L->w_down, fw->gate, n, NULL, fw->o));
            KVS_TRY(op->add(b, fw->x, fw->o, (int64_t)n * E));
        }
    }
    if (n_head_rows > 0) {
        KVS_TRY(op->gather(b, fw->x, fw->logit_idx, n_head_rows, E, fw->lx));
        KVS_TRY(op->rmsnorm(b, fw->lx, m->output_norm, n_head_rows, E, hp->norm_eps, fw->lx));
        KVS_TRY(op->matmul(b, &m->output, fw->lx, n_head_rows, NULL, fw->logits));
    }
    return KVS_OK;
}

int kvs_forward_run(kvs_forward *fw, const kvs_batch *bt, float *logits)
{
    if (bt->n_rows == 0) {
        return KVS_OK;
    }
    if (bt->n_rows > fw->max_rows) {
        return KVS_INVALID_ARGUMENT;
    }
    const kvs_model *m = fw->m;
    const struct kvs_hparams *hp = &m->hp;
    kvs_backend *b = fw->b;
    const struct kvs_backend_ops *op = b->ops;
    int32_t n = bt->n_rows, n_logits = 0;
    KVS_TRY(plan_batch(fw, bt, &n_logits));
    if (n_logits > 0 && logits == NULL) {
        return KVS_INVALID_ARGUMENT;
    }
    const struct kvs_attn_batch ab = {
        .n_rows = n,
        .row_slot = fw->d_slot,
        .row_ctx = fw->d_ctx,
        .row_table = fw->d_rtab,
        .tables = fw->d_tables,
    };
    int32_t E = (int32_t)hp->n_embd;

    /* the layers and the first LM-head pass: on CUDA as a graph where the shape recurs
     * (kernels/cuda/cuda.h: the ops may be issued up to three times) */
    int32_t n_head_rows = n_logits < MAX_LOGIT_ROWS ? n_logits : MAX_LOGIT_ROWS;
    int rc = KVS_OK;
#ifdef KVS_HAVE_CUDA
    const bool graph = kvs_backend_is_cuda(b);
    if (graph) {
        int32_t max_ctx = 0;
        for (int32_t r = 0; r < bt->n_rows; r++) {
            max_ctx = fw->h_ctx[r] > max_ctx ? fw->h_ctx[r] : max_ctx;
        }
        KVS_TRY(kvs_cuda_graph_begin(b, fw->stats.last_n_seqs, bt->n_rows, max_ctx));
    }
    do {
        rc = forward_ops(fw, bt, &ab, n_head_rows);
    } while (graph && kvs_cuda_graph_end(b, &rc) == 1);
#else
    rc = forward_ops(fw, bt, &ab, n_head_rows);
#endif
    KVS_TRY(rc);
    if (n_head_rows > 0) {
        KVS_TRY(op->download(b, logits, fw->logits,
                             (size_t)n_head_rows * hp->n_vocab * sizeof(float)));
    }
    /* LM head of the other rows that want logits, MAX_LOGIT_ROWS at a time */
    for (int32_t i = n_head_rows; i < n_logits; i += MAX_LOGIT_ROWS) {
        int32_t c = n_logits - i < MAX_LOGIT_ROWS ? n_logits - i : MAX_LOGIT_ROWS;
        KVS_TRY(op->gather(b, fw->x, fw->logit_idx + i, c, E, fw->lx));
        KVS_TRY(op->rmsnorm(b, fw->lx, m->output_norm, c, E, hp->norm_eps, fw->lx));
        KVS_TRY(op->matmul(b, &m->output, fw->lx, c, NULL, fw->logits));
        KVS_TRY(op->download(b, logits + (size_t)i * hp->n_vocab, fw->logits,
                             (size_t)c * hp->n_vocab * sizeof(float)));
    }
    KVS_TRY(op->sync(b));
    fw->stats.calls++;
    fw->stats.rows += (uint64_t)n;
    fw->stats.logit_rows += (uint64_t)n_logits;
    return KVS_OK;
}
