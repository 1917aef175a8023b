/* SentencePiece (BPE flavour) as llama.cpp runs it: spaces become U+2581, then adjacent
 * pieces are merged greedily by the score of the token they form, best score first (ties:
 * leftmost first); pieces that form no token fall back to <0xXX> byte tokens. */
#include "common/status.h"
#include "worker/tokenizer_impl.h"
#include "worker/unicode.h"

#include <string.h>

struct sym {
    uint32_t off; /* byte offset in the escaped text */
    uint32_t n;   /* bytes; 0 once merged into its left neighbour */
    int32_t prev; /* index, -1 at the start */
    int32_t next; /* index, -1 at the end */
};

struct bigram {
    float score;   /* score of the token left + right forms: higher merges first */
    int32_t left;  /* symbol index */
    uint32_t size; /* bytes of left + right when queued (stale if different now) */
};

static bool bigram_before(const struct bigram *x, const struct bigram *y)
{
    return x->score > y->score || (x->score == y->score && x->left < y->left);
}

static void heap_push(struct bigram *h, size_t *n, struct bigram b)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!bigram_before(&b, &h[parent])) {
            break;
        }
        h[i] = h[parent];
        i = parent;
    }
    h[i] = b;
}

static struct bigram heap_pop(struct bigram *h, size_t *n)
{
    struct bigram top = h[0];
    struct bigram last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const struct bigram *best = &last;
        if (l < *n && bigram_before(&h[l], best)) {
            m = l;
            best = &h[l];
        }
        if (r < *n && bigram_before(&h[r], best)) {
            m = r;
        }
        if (m == i) {
            break;
        }
        h[i] = h[m];
        i = m;
    }
    if (*n > 0) {
        h[i] = last;
    }
    return top;
}

static void try_bigram(const kvs_tokenizer *tok, const char *w, const struct sym *sy, int32_t l,
                       struct bigram *h, size_t *nh)
{
    if (l < 0 || sy[l].next < 0) {
        return;
    }
    int32_t r = sy[l].next;
    uint32_t size = sy[l].n + sy[r].n;
    int32_t id = tok_lookup(tok, w + sy[l].off, size);
    if (id == KVS_TOKEN_NONE) {
        return;
    }
    struct bigram b = {tok->tokens[id].score, l, size};
    heap_push(h, nh, b);
}

int tok_spm_encode(const kvs_tokenizer *tok, struct tok_scratch *s, const char *text, size_t len,
                   struct tok_out *out)
{
    /* escape: ' ' -> U+2581 (3 bytes) */
    KVS_TRY(tok_grow((void **)&s->word, &s->cap_word, 3 * len + 1));
    char *w = s->word;
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(w + n, "\xE2\x96\x81", 3);
            n += 3;
        } else {
            w[n++] = text[i];
        }
    }
    if (n == 0) {
        return 0;
    }
    KVS_TRY(tok_grow(&s->sym, &s->cap_sym, n * sizeof(struct sym)));
    KVS_TRY(tok_grow(&s->heap, &s->cap_heap, 3 * n * sizeof(struct bigram)));
    struct sym *sy = s->sym;
    struct bigram *h = s->heap;
    size_t nsym = 0, nh = 0;
    /* one symbol per UTF-8 character, counted from the lead byte alone (as llama.cpp) */
    for (size_t off = 0; off < n;) {
        size_t cl = kvs_unicode_len_utf8((uint8_t)w[off]);
        if (cl > n - off) {
            cl = n - off;
        }
        sy[nsym] = (struct sym){(uint32_t)off, (uint32_t)cl, (int32_t)nsym - 1, -1};
        off += cl;
        if (off < n) {
            sy[nsym].next = (int32_t)nsym + 1;
        }
        nsym++;
    }
    for (size_t i = 0; i + 1 < nsym; i++) {
        try_bigram(tok, w, sy, (int32_t)i, h, &nh);
    }
    while (nh > 0) {
        struct bigram b = heap_pop(h, &nh);
        struct sym *L = &sy[b.left];
        if (L->n == 0 || L->next < 0) {
            continue;
        }
        struct sym *R = &sy[L->next];
        if (R->n == 0 || L->n + R->n != b.size) {
            continue; /* stale */
        }
        L->n += R->n;
        R->n = 0;
        L->next = R->next;
        if (R->next >= 0) {
            sy[R->next].prev = b.left;
        }
        try_bigram(tok, w, sy, L->prev, h, &nh);
        try_bigram(tok, w, sy, b.left, h, &nh);
    }
    for (int32_t i = 0; i >= 0; i = sy[i].next) {
        int32_t id = tok_lookup(tok, w + sy[i].off, sy[i].n);
        if (id != KVS_TOKEN_NONE) {
            tok_out_push(out, id);
            continue;
        }
        /* merged symbols are always tokens, so this is a single character without one */
        for (uint32_t j = 0; j < sy[i].n; j++) {
            int32_t bid = tok->byte_token[(uint8_t)w[sy[i].off + j]];
            if (bid == KVS_TOKEN_NONE) {
                bid = tok->unk; /* a vocabulary without byte tokens */
            }
            if (bid != KVS_TOKEN_NONE) {
                tok_out_push(out, bid);
            }
        }
    }
    return 0;
}
