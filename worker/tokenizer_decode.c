/* Tokenizer decoding: pieces, whole-buffer decoding, and the streaming decoder that only
 * hands out whole UTF-8 sequences. */
#include "common/status.h"
#include "worker/tokenizer.h"
#include "worker/tokenizer_impl.h"
#include "worker/unicode.h"

#include <stdlib.h>
#include <string.h>

const char *kvs_tokenizer_piece(const kvs_tokenizer *tok, int32_t id, bool special, size_t *n)
{
    if (id < 0 || (uint32_t)id >= tok->n_vocab) {
        *n = 0;
        return NULL;
    }
    const struct tok_entry *e = &tok->tokens[id];
    if (!special && (e->attr & (TOK_ATTR_CONTROL | TOK_ATTR_UNKNOWN))) {
        *n = 0;
        return tok->pieces + e->piece_off;
    }
    *n = e->piece_len;
    return tok->pieces + e->piece_off;
}

int kvs_tokenizer_token_to_piece(const kvs_tokenizer *tok, int32_t id, bool special, char *buf,
                                 size_t cap, size_t *n_out)
{
    size_t n;
    const char *p = kvs_tokenizer_piece(tok, id, special, &n);
    *n_out = 0;
    if (p == NULL) {
        return KVS_OUT_OF_RANGE;
    }
    *n_out = n;
    if (n > cap) {
        return KVS_TOO_LARGE;
    }
    memcpy(buf, p, n);
    return 0;
}

size_t kvs_tokenizer_max_piece(const kvs_tokenizer *tok)
{
    return tok->max_piece;
}

/* SPM decoding drops the space encoding put before the text: one leading space of the first
 * token after any leading BOS. *state: 0 = undecided, 1 = decided. */
static size_t strip_prefix(const kvs_tokenizer *tok, int32_t id, const char *p, size_t n,
                           int *state)
{
    if (*state != 0 || !tok->add_space_prefix) {
        return 0;
    }
    if (id == tok->bos) {
        return 0;
    }
    *state = 1;
    return (n > 0 && p[0] == ' ') ? 1 : 0;
}

int kvs_tokenizer_decode(const kvs_tokenizer *tok, const int32_t *ids, size_t n, bool special,
                         char *buf, size_t cap, size_t *n_out)
{
    size_t w = 0;
    int state = 0;
    *n_out = 0;
    for (size_t i = 0; i < n; i++) {
        size_t pn;
        const char *p = kvs_tokenizer_piece(tok, ids[i], special, &pn);
        if (p == NULL) {
            return KVS_OUT_OF_RANGE;
        }
        size_t skip = strip_prefix(tok, ids[i], p, pn, &state);
        if (pn > skip && w + pn - skip <= cap) {
            memcpy(buf + w, p + skip, pn - skip);
        }
        w += pn - skip;
    }
    *n_out = w;
    return w > cap ? KVS_TOO_LARGE : 0;
}

struct kvs_detok {
    const kvs_tokenizer *tok; /* borrowed */
    bool special;             /* render control tokens */
    int state;                /* strip_prefix state */
    size_t held;              /* bytes of an unfinished UTF-8 sequence at buf[0..held) */
    size_t out_off;           /* start of the bytes handed out last time */
    char *buf;                /* held bytes + one piece: 4 + max_piece bytes */
};

kvs_detok *kvs_detok_new(const kvs_tokenizer *tok, bool special)
{
    kvs_detok *d = calloc(1, sizeof *d);
    if (d == NULL) {
        return NULL;
    }
    d->tok = tok;
    d->special = special;
    d->buf = malloc(tok->max_piece + 8);
    if (d->buf == NULL) {
        free(d);
        return NULL;
    }
    return d;
}

void kvs_detok_destroy(kvs_detok **d)
{
    if (d == NULL || *d == NULL) {
        return;
    }
    free((*d)->buf);
    free(*d);
    *d = NULL;
}

int kvs_detok_push(kvs_detok *d, int32_t id, const char **out, size_t *n_out)
{
    size_t pn;
    const char *p = kvs_tokenizer_piece(d->tok, id, d->special, &pn);
    *out = d->buf;
    *n_out = 0;
    if (p == NULL) {
        return KVS_OUT_OF_RANGE;
    }
    /* move the held bytes (after the last hand-out) to the front */
    memmove(d->buf, d->buf + d->out_off, d->held);
    d->out_off = 0;
    size_t skip = strip_prefix(d->tok, id, p, pn, &d->state);
    memcpy(d->buf + d->held, p + skip, pn - skip);
    size_t total = d->held + pn - skip;
    size_t tail = kvs_unicode_incomplete_tail(d->buf, total);
    *n_out = total - tail;
    d->held = tail;
    d->out_off = total - tail;
    return 0;
}

void kvs_detok_finish(kvs_detok *d, const char **out, size_t *n_out)
{
    *out = d->buf + d->out_off;
    *n_out = d->held;
    d->held = 0;
    d->out_off = 0;
    d->state = 0;
}

