/* One forward pass for a batch of rows drawn from any number of seqs.
 *
 * A row is (seq, token, position, wants-logits). Appends, prompt prefills, question
 * prefills and decode steps are all just rows: there is no separate prefill or decode
 * path. Before the call, the caller reserves KV for every row (kvs_pool_seq_reserve) so
 * that position p of its seq has a cell; the pass writes K/V there; after it, the caller
 * commits the seq lengths. Rows of the same seq may appear in any order in a batch: all
 * K/V of a layer is stored before that layer's attention runs.
 *
 * All scratch is allocated by kvs_forward_new; kvs_forward_run allocates nothing unless a
 * batch's block tables outgrow what it has seen before (grow-only).
 *
 * Thread-safety: one thread drives a kvs_forward (and its backend).
 */
#ifndef KVS_FORWARD_H
#define KVS_FORWARD_H

#include <stdbool.h>
#include <stdint.h>

#include "worker/kvpool.h"
#include "worker/model.h"

typedef struct kvs_batch {
    int32_t n_rows;         /* rows in use */
    int32_t cap;            /* rows allocated */
    int32_t *token;         /* (cap) token ids */
    int32_t *pos;           /* (cap) position of the token in its seq */
    kvs_seq **seq;          /* (cap) the seq each row belongs to (borrowed) */
    uint8_t *want_logits;   /* (cap) 1 = return this row's logits */
} kvs_batch;

/* Allocate a batch of cap rows. 0 or KVS_NO_MEMORY. Free with kvs_batch_free. */
int kvs_batch_init(kvs_batch *b, int32_t cap);
void kvs_batch_free(kvs_batch *b);
static inline void kvs_batch_clear(kvs_batch *b)
{
    b->n_rows = 0;
}
/* Append a row; KVS_TOO_LARGE when the batch is full. */
int kvs_batch_add(kvs_batch *b, kvs_seq *seq, int32_t token, int32_t pos, bool want_logits);

typedef struct kvs_forward kvs_forward;

struct kvs_forward_stats {
    uint64_t calls;          /* kvs_forward_run calls that computed something */
    uint64_t rows;           /* rows computed */
    uint64_t logit_rows;     /* rows whose logits were returned */
    int32_t last_n_seqs;     /* distinct seqs in the last call */
    int32_t max_n_seqs;      /* most distinct seqs seen in one call */
};

/* Scratch for batches of up to max_rows rows on the model's backend. 0, KVS_NO_MEMORY or
 * KVS_INVALID_ARGUMENT. Free with kvs_forward_destroy (before the model and pool). */
int kvs_forward_new(const kvs_model *m, kvs_pool *pool, int32_t max_rows, kvs_forward **out);
void kvs_forward_destroy(kvs_forward **fw);

int32_t kvs_forward_max_rows(const kvs_forward *fw);

/* Run the batch. logits (host memory) receives, for each row with want_logits set, in row
 * order, n_vocab f32 values; it must hold (rows wanting logits) * n_vocab floats; may be
 * NULL when no row wants logits. Returns 0, KVS_INVALID_ARGUMENT (more rows than max_rows,
 * a token outside the vocabulary, a position outside its seq's reserved cells) with nothing
 * computed, or a backend error. */
int kvs_forward_run(kvs_forward *fw, const kvs_batch *batch, float *logits);

const struct kvs_forward_stats *kvs_forward_stats(const kvs_forward *fw);

#endif
