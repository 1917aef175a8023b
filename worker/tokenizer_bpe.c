/* Byte-level BPE: pre-tokenization (the regexes of each `pre`, written out by hand as
 * llama.cpp does) and rank-ordered merging of each pre-token. */
#include "common/status.h"
#include "worker/tokenizer_impl.h"
#include "worker/unicode.h"

#include <stdlib.h>
#include <string.h>

#define F_LNS (KVS_UNICODE_LETTER | KVS_UNICODE_NUMBER | KVS_UNICODE_SPACE)

/* ---- segment lists: consecutive pre-token lengths in code points ---- */

struct segs {
    size_t *len; /* lengths */
    size_t n;    /* entries */
    size_t cap;  /* capacity in entries */
};

static int segs_push(struct segs *s, size_t len)
{
    if (len == 0) {
        return 0;
    }
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        size_t *p = realloc(s->len, cap * sizeof *p);
        if (p == NULL) {
            return KVS_NO_MEMORY;
        }
        s->len = p;
        s->cap = cap;
    }
    s->len[s->n++] = len;
    return 0;
}

/* View of one segment [a, b) of the code points, with out-of-segment reads as "nothing". */
struct view {
    const uint32_t *cpt;
    const uint16_t *fl;
    size_t a, b;
};
#define NO_CPT 0xFFFFFFFFu
static uint32_t vc(const struct view *v, size_t p)
{
    return p < v->b ? v->cpt[p] : NO_CPT;
}
static uint16_t vf(const struct view *v, size_t p)
{
    return p < v->b ? v->fl[p] : 0;
}

/* 's 't 're 've 'm 'll 'd at p (case-insensitive if fold): length matched, or 0. */
static size_t contraction(const struct view *v, size_t p, bool fold)
{
    if (vc(v, p) != '\'' || p + 1 >= v->b) {
        return 0;
    }
    uint32_t c1 = vc(v, p + 1);
    if (fold) {
        c1 = kvs_unicode_tolower(c1);
    }
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
        return 2;
    }
    if (p + 2 < v->b) {
        uint32_t c2 = vc(v, p + 2);
        if (fold) {
            c2 = kvs_unicode_tolower(c2);
        }
        if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
            return 3;
        }
    }
    return 0;
}

/* Trailing white space: \s+(?!\S) keeps the last blank for the next word unless the run
 * ends the segment; \s+ otherwise. Returns the new position, or pos if no white space. */
static size_t whitespace_run(const struct view *v, size_t pos)
{
    size_t n = 0;
    while (vf(v, pos + n) & KVS_UNICODE_SPACE) {
        n++;
    }
    if (n > 1 && pos + n < v->b) {
        return pos + n - 1;
    }
    return pos + n;
}

/* GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static int split_gpt2(const struct view *v, struct segs *out)
{
    size_t pos = v->a;
    while (pos < v->b) {
        size_t start = pos;
        uint32_t c = vc(v, pos);
        size_t k = contraction(v, pos, false);
        if (k > 0) {
            pos += k;
        } else {
            uint16_t f2 = c == ' ' ? vf(v, pos + 1) : vf(v, pos);
            if (f2 & KVS_UNICODE_LETTER) {
                pos += (c == ' ');
                while (vf(v, pos) & KVS_UNICODE_LETTER) {
                    pos++;
                }
            } else if (f2 & KVS_UNICODE_NUMBER) {
                pos += (c == ' ');
                while (vf(v, pos) & KVS_UNICODE_NUMBER) {
                    pos++;
                }
            } else if (!(f2 & F_LNS) && f2 != 0) {
                pos += (c == ' ');
                while (!(vf(v, pos) & F_LNS) && vf(v, pos) != 0) {
                    pos++;
                }
            } else {
                pos = whitespace_run(v, pos);
                if (pos == start) {
                    pos++;
                }
            }
        }
        KVS_TRY(segs_push(out, pos - start));
    }
    return 0;
}

/* Llama 3 (max_digits 3) and Qwen2 (max_digits 1):
 * (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*
 * |\s*[\r\n]+|\s+(?!\S)|\s+ */
static int split_llama3(const struct view *v, size_t max_digits, struct segs *out)
{
    size_t pos = v->a;
    while (pos < v->b) {
        size_t start = pos;
        uint32_t c = vc(v, pos);
        uint16_t f = vf(v, pos);
        size_t k = contraction(v, pos, true);
        if (k > 0) {
            KVS_TRY(segs_push(out, k));
            pos += k;
            continue;
        }
        if (!(c == '\r' || c == '\n' || (f & KVS_UNICODE_NUMBER)) &&
            ((f & KVS_UNICODE_LETTER) || (vf(v, pos + 1) & KVS_UNICODE_LETTER))) {
            pos++;
            while (vf(v, pos) & KVS_UNICODE_LETTER) {
                pos++;
            }
            KVS_TRY(segs_push(out, pos - start));
            continue;
        }
        if (f & KVS_UNICODE_NUMBER) {
            while (vf(v, pos) & KVS_UNICODE_NUMBER) {
                pos++;
                if (pos - start >= max_digits) {
                    KVS_TRY(segs_push(out, pos - start));
                    start = pos;
                }
            }
            KVS_TRY(segs_push(out, pos - start));
            continue;
        }
        uint16_t f2 = c == ' ' ? vf(v, pos + 1) : f;
        if (!(f2 & F_LNS) && f != 0) {
            pos += (c == ' ');
            while (!(vf(v, pos) & F_LNS) && vf(v, pos) != 0) {
                pos++;
            }
            while (vc(v, pos) == '\r' || vc(v, pos) == '\n') {
                pos++;
            }
            KVS_TRY(segs_push(out, pos - start));
            continue;
        }
        size_t n = 0, end_rn = 0;
        while (vf(v, pos + n) & KVS_UNICODE_SPACE) {
            uint32_t cc = vc(v, pos + n);
            n++;
            if (cc == '\r' || cc == '\n') {
                end_rn = pos + n;
            }
        }
        if (end_rn > 0) {
            pos = end_rn;
        } else {
            pos = whitespace_run(v, pos);
            if (pos == start) {
                pos++;
            }
        }
        KVS_TRY(segs_push(out, pos - start));
    }
    return 0;
}

/* Runs of code points for which `in` holds become their own segments (each code point alone
 * if `single`); the stretches between them stay segments too. This is what llama.cpp's
 * std::regex fallback does for a one-class pattern like \p{N} or [\p{P}...]+. */
static int split_class(const struct view *v, bool (*in)(uint32_t cpt, uint16_t fl), bool single,
                       struct segs *out)
{
    size_t pos = v->a, start = v->a;
    while (pos < v->b) {
        if (!in(v->cpt[pos], v->fl[pos])) {
            pos++;
            continue;
        }
        KVS_TRY(segs_push(out, pos - start));
        size_t m = pos;
        while (m < v->b && in(v->cpt[m], v->fl[m]) && (!single || m == pos)) {
            m++;
        }
        KVS_TRY(segs_push(out, m - pos));
        pos = start = m;
    }
    return segs_push(out, pos - start);
}

/* \p{N}: llama.cpp's collapsed-text regex sees ASCII as itself and any other number as N */
static bool is_number(uint32_t cpt, uint16_t fl)
{
    if (cpt < 0x80) {
        return cpt >= '0' && cpt <= '9';
    }
    return !(fl & KVS_UNICODE_SPACE) && (fl & KVS_UNICODE_NUMBER);
}

/* [\p{P}\$\+<=>\^~\|] */
static bool is_punct_default(uint32_t cpt, uint16_t fl)
{
    if (cpt < 0x80) {
        return (cpt != 0 && strchr("$+<=>^~|", (int)cpt) != NULL) || (fl & KVS_UNICODE_PUNCT);
    }
    return !(fl & KVS_UNICODE_SPACE) && (fl & KVS_UNICODE_PUNCT);
}

/* [0-9][0-9][0-9]: each run of three ASCII digits, left to right */
static int split_digit_triples(const struct view *v, struct segs *out)
{
    size_t pos = v->a, start = v->a;
    while (pos + 3 <= v->b) {
        const uint32_t *c = v->cpt + pos;
        bool d3 = c[0] >= '0' && c[0] <= '9' && c[1] >= '0' && c[1] <= '9' && c[2] >= '0' &&
                  c[2] <= '9';
        if (!d3) {
            pos++;
            continue;
        }
        KVS_TRY(segs_push(out, pos - start));
        KVS_TRY(segs_push(out, 3));
        pos = start = pos + 3;
    }
    return segs_push(out, v->b - start);
}

enum pass { PASS_GPT2, PASS_LLAMA3, PASS_QWEN2, PASS_DIGITS1, PASS_DIGIT_RUNS, PASS_PUNCT,
            PASS_TRIPLES };

static int run_pass(enum pass p, const uint32_t *cpt, const uint16_t *fl, const struct segs *in,
                    struct segs *out)
{
    out->n = 0;
    size_t a = 0;
    for (size_t i = 0; i < in->n; i++) {
        struct view v = {cpt, fl, a, a + in->len[i]};
        a = v.b;
        switch (p) {
        case PASS_GPT2:
            KVS_TRY(split_gpt2(&v, out));
            break;
        case PASS_LLAMA3:
            KVS_TRY(split_llama3(&v, 3, out));
            break;
        case PASS_QWEN2:
            KVS_TRY(split_llama3(&v, 1, out));
            break;
        case PASS_DIGITS1:
            KVS_TRY(split_class(&v, is_number, true, out));
            break;
        case PASS_DIGIT_RUNS:
            KVS_TRY(split_class(&v, is_number, false, out));
            break;
        case PASS_PUNCT:
            KVS_TRY(split_class(&v, is_punct_default, false, out));
            break;
        case PASS_TRIPLES:
            KVS_TRY(split_digit_triples(&v, out));
            break;
        }
    }
    return 0;
}

/* ---- merging ---- */

struct sym {
    uint32_t off;     /* byte offset in the word */
    uint32_t n;       /* bytes; 0 once merged into its left neighbour */
    int32_t prev;     /* index, -1 at the start */
    int32_t next;     /* index, -1 at the end */
};

struct bigram {
    uint32_t rank;  /* merge rank: lower merges first */
    int32_t left;   /* symbol index */
    uint32_t size;  /* bytes of left + right when queued (stale if different now) */
};

static bool bigram_before(const struct bigram *x, const struct bigram *y)
{
    return x->rank < y->rank || (x->rank == y->rank && x->left < y->left);
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

/* Rank of merging "l r", or -1. */
static int64_t merge_rank(const kvs_tokenizer *tok, const char *l, size_t ln, const char *r,
                          size_t rn)
{
    uint64_t h = tok_fnv(TOK_FNV_INIT, l, ln);
    h = tok_fnv(h, " ", 1);
    h = tok_fnv(h, r, rn);
    size_t total = ln + 1 + rn;
    for (uint64_t i = h & tok->merges.mask;; i = (i + 1) & tok->merges.mask) {
        uint32_t s = tok->merges.slots[i];
        if (s == 0) {
            return -1;
        }
        uint32_t m = s - 1;
        const char *t = tok->merge_text + tok->merge_off[m];
        if (tok->merge_len[m] == total && memcmp(t, l, ln) == 0 && t[ln] == ' ' &&
            memcmp(t + ln + 1, r, rn) == 0) {
            return m;
        }
    }
}

static void try_bigram(const kvs_tokenizer *tok, const char *w, struct sym *sy, int32_t l,
                       struct bigram *h, size_t *nh)
{
    if (l < 0 || sy[l].next < 0) {
        return;
    }
    int32_t r = sy[l].next;
    int64_t rank = merge_rank(tok, w + sy[l].off, sy[l].n, w + sy[r].off, sy[r].n);
    if (rank < 0) {
        return;
    }
    struct bigram b = {(uint32_t)rank, l, sy[l].n + sy[r].n};
    heap_push(h, nh, b);
}

/* Merge one byte-encoded pre-token w[0..n) and emit its tokens. */
static int bpe_word(const kvs_tokenizer *tok, struct tok_scratch *s, const char *w, size_t n,
                    struct tok_out *out)
{
    if (tok->ignore_merges) {
        int32_t id = tok_lookup(tok, w, n);
        if (id != KVS_TOKEN_NONE) {
            tok_out_push(out, id);
            return 0;
        }
    }
    /* one symbol per UTF-8 character; at most n symbols and 3n queued bigrams */
    KVS_TRY(tok_grow(&s->sym, &s->cap_sym, n * sizeof(struct sym)));
    KVS_TRY(tok_grow(&s->heap, &s->cap_heap, 3 * n * sizeof(struct bigram) + 1));
    struct sym *sy = s->sym;
    struct bigram *h = s->heap;
    size_t nsym = 0, nh = 0;
    for (size_t off = 0; off < n;) {
        size_t len = kvs_unicode_len_utf8((uint8_t)w[off]);
        if (len > n - off) {
            len = n - off;
        }
        sy[nsym] = (struct sym){(uint32_t)off, (uint32_t)len, (int32_t)nsym - 1, -1};
        off += len;
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
            continue; /* stale: one side changed since it was queued */
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
    for (int32_t i = 0; i >= 0 && nsym > 0; i = sy[i].next) {
        const char *t = w + sy[i].off;
        int32_t id = tok_lookup(tok, t, sy[i].n);
        if (id != KVS_TOKEN_NONE) {
            tok_out_push(out, id);
            continue;
        }
        /* no token for the merged text: fall back to its single bytes, dropping bytes
         * that are not tokens either (as llama.cpp does) */
        for (uint32_t j = 0; j < sy[i].n; j++) {
            int32_t bid = tok_lookup(tok, t + j, 1);
            if (bid != KVS_TOKEN_NONE) {
                tok_out_push(out, bid);
            }
        }
    }
    return 0;
}

int tok_bpe_encode(const kvs_tokenizer *tok, struct tok_scratch *s, const char *text, size_t len,
                   struct tok_out *out)
{
    int rc = 0;
    struct segs a = {0}, b = {0};

    /* code points, llama.cpp's lenient decoding (at most one per byte) */
    KVS_TRY(tok_grow((void **)&s->cpts, &s->cap_cpts, (len + 1) * sizeof(uint32_t)));
    KVS_TRY(tok_grow((void **)&s->flags, &s->cap_flags, (len + 1) * sizeof(uint16_t)));
    uint16_t *fl = s->flags;
    size_t n = 0;
    for (size_t pos = 0; pos < len;) {
        uint32_t c = kvs_unicode_decode(text, len, &pos);
        s->cpts[n] = c;
        fl[n] = kvs_unicode_flags(c);
        n++;
    }
    const uint32_t *cpt = s->cpts;

    if ((rc = segs_push(&a, n)) < 0) {
        goto done;
    }
    static const enum pass passes_gpt2[] = {PASS_GPT2};
    static const enum pass passes_default[] = {PASS_PUNCT, PASS_GPT2, PASS_DIGIT_RUNS,
                                               PASS_TRIPLES};
    static const enum pass passes_smollm[] = {PASS_DIGITS1, PASS_GPT2};
    static const enum pass passes_llama3[] = {PASS_LLAMA3};
    static const enum pass passes_qwen2[] = {PASS_QWEN2};
    const enum pass *passes = passes_gpt2;
    size_t n_passes = 1;
    switch (tok->pre) {
    case TOK_PRE_DEFAULT:
        passes = passes_default;
        n_passes = 4;
        break;
    case TOK_PRE_SMOLLM:
        passes = passes_smollm;
        n_passes = 2;
        break;
    case TOK_PRE_LLAMA3:
        passes = passes_llama3;
        break;
    case TOK_PRE_QWEN2:
        passes = passes_qwen2;
        break;
    default:
        break;
    }
    struct segs *cur = &a, *nxt = &b;
    for (size_t p = 0; p < n_passes; p++) {
        if ((rc = run_pass(passes[p], cpt, fl, cur, nxt)) < 0) {
            goto done;
        }
        struct segs *t = cur;
        cur = nxt;
        nxt = t;
    }

    /* byte-encode each pre-token (UTF-8 bytes -> GPT-2 code points -> UTF-8) and merge */
    size_t at = 0;
    for (size_t i = 0; i < cur->n; i++) {
        size_t wl = 0;
        /* each code point is <= 4 bytes, each byte maps to <= 2 bytes */
        if ((rc = tok_grow((void **)&s->word, &s->cap_word, cur->len[i] * 8 + 1)) < 0) {
            goto done;
        }
        for (size_t k = at; k < at + cur->len[i]; k++) {
            char u[4];
            size_t un = kvs_unicode_encode(cpt[k], u);
            for (size_t j = 0; j < un; j++) {
                wl += kvs_unicode_encode(kvs_unicode_byte_to_cpt((uint8_t)u[j]), s->word + wl);
            }
        }
        at += cur->len[i];
        if ((rc = bpe_word(tok, s, s->word, wl, out)) < 0) {
            goto done;
        }
    }
done:
    free(a.len);
    free(b.len);
    return rc;
}
