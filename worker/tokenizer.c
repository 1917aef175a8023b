/* Tokenizer: loading from GGUF metadata, special-token partitioning, decoding, streaming
 * decoding and accessors. The two algorithms live in tokenizer_bpe.c and tokenizer_spm.c. */
#include "worker/tokenizer.h"

#include "common/log.h"
#include "common/status.h"
#include "worker/tokenizer_impl.h"
#include "worker/unicode.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
static int fail(char *err, size_t errlen, int rc, const char *fmt, ...)
{
    if (errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return rc;
}

int tok_grow(void **p, size_t *cap, size_t need)
{
    if (need <= *cap) {
        return 0;
    }
    size_t n = *cap ? *cap : 256;
    while (n < need) {
        n *= 2;
    }
    void *q = realloc(*p, n);
    if (q == NULL) {
        return KVS_NO_MEMORY;
    }
    *p = q;
    *cap = n;
    return 0;
}

/* ---- hash tables ---- */

static int hash_init(struct tok_hash *h, size_t n)
{
    size_t slots = 16;
    while (slots < 2 * n) {
        slots *= 2;
    }
    h->slots = calloc(slots, sizeof *h->slots);
    h->mask = slots - 1;
    return h->slots != NULL ? 0 : KVS_NO_MEMORY;
}

static const char *tok_text(const kvs_tokenizer *tok, uint32_t id)
{
    return tok->text + tok->tokens[id].text_off;
}

int32_t tok_lookup(const kvs_tokenizer *tok, const char *s, size_t n)
{
    uint64_t h = tok_fnv(TOK_FNV_INIT, s, n);
    for (uint64_t i = h & tok->by_text.mask;; i = (i + 1) & tok->by_text.mask) {
        uint32_t v = tok->by_text.slots[i];
        if (v == 0) {
            return KVS_TOKEN_NONE;
        }
        const struct tok_entry *e = &tok->tokens[v - 1];
        if (e->text_len == n && memcmp(tok->text + e->text_off, s, n) == 0) {
            return (int32_t)(v - 1);
        }
    }
}

/* Insert id under its text; a later id with the same text replaces the earlier one, as in
 * llama.cpp's token_to_id map. */
static void text_insert(kvs_tokenizer *tok, uint32_t id)
{
    const struct tok_entry *e = &tok->tokens[id];
    uint64_t h = tok_fnv(TOK_FNV_INIT, tok_text(tok, id), e->text_len);
    for (uint64_t i = h & tok->by_text.mask;; i = (i + 1) & tok->by_text.mask) {
        uint32_t v = tok->by_text.slots[i];
        if (v == 0) {
            tok->by_text.slots[i] = id + 1;
            return;
        }
        const struct tok_entry *o = &tok->tokens[v - 1];
        if (o->text_len == e->text_len &&
            memcmp(tok->text + o->text_off, tok_text(tok, id), e->text_len) == 0) {
            tok->by_text.slots[i] = id + 1;
            return;
        }
    }
}

/* Insert merge m; the first rank of a duplicate pair is kept (llama.cpp's emplace). */
static void merge_insert(kvs_tokenizer *tok, uint32_t m)
{
    const char *t = tok->merge_text + tok->merge_off[m];
    uint32_t n = tok->merge_len[m];
    uint64_t h = tok_fnv(TOK_FNV_INIT, t, n);
    for (uint64_t i = h & tok->merges.mask;; i = (i + 1) & tok->merges.mask) {
        uint32_t v = tok->merges.slots[i];
        if (v == 0) {
            tok->merges.slots[i] = m + 1;
            return;
        }
        if (tok->merge_len[v - 1] == n && memcmp(tok->merge_text + tok->merge_off[v - 1], t, n) == 0) {
            return;
        }
    }
}

/* ---- loading ---- */

struct name_pre {
    const char *name;
    enum tok_pre pre;
};

/* Pre-tokenizer names and llama.cpp's aliases that select exactly the same behaviour. */
static const struct name_pre pre_names[] = {
    {"default", TOK_PRE_DEFAULT}, {"gpt-2", TOK_PRE_GPT2},        {"phi-2", TOK_PRE_GPT2},
    {"smollm", TOK_PRE_SMOLLM},   {"starcoder", TOK_PRE_SMOLLM},  {"refact", TOK_PRE_SMOLLM},
    {"llama-bpe", TOK_PRE_LLAMA3}, {"llama3", TOK_PRE_LLAMA3},    {"llama-v3", TOK_PRE_LLAMA3},
    {"qwen2", TOK_PRE_QWEN2},
};

static bool str_is(kvs_gguf_str s, const char *z)
{
    return s.len == strlen(z) && memcmp(s.ptr, z, s.len) == 0;
}

static bool text_is(const kvs_tokenizer *tok, uint32_t id, const char *z)
{
    size_t n = strlen(z);
    return tok->tokens[id].text_len == n && memcmp(tok_text(tok, id), z, n) == 0;
}

static bool text_in(const kvs_tokenizer *tok, uint32_t id, const char *const *list)
{
    for (; *list != NULL; list++) {
        if (text_is(tok, id, *list)) {
            return true;
        }
    }
    return false;
}

/* Texts llama.cpp treats as end of generation (and promotes to control). */
static const char *const eog_texts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>", "[e~[", NULL};
/* Candidates for EOT when the file names none (all also in eog_texts). */
static const char *const eot_texts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>",
    "<end_of_utterance>", NULL};
/* Fill-in-the-middle markers: promoted to control; pad/repo/sep also end generation. */
static const char *const fim_texts[] = {
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "\xe2\x96\x81<PRE>",
    "<|code_prefix|>", "<|prefix|>", "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>",
    "\xe2\x96\x81<SUF>", "<|code_suffix|>", "<|suffix|>", "<|fim_middle|>", "<fim-middle>",
    "<fim_middle>", "<MID>", "\xe2\x96\x81<MID>", "<|code_middle|>", "<|middle|>", NULL};
static const char *const fim_eog_texts[] = {
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", "<|fim_repo|>", "<|repo_name|>",
    "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>", NULL};

/* Read an optional special-token id key into *id (keeping the default when absent or out
 * of range, as llama.cpp does). */
static int read_id(const kvs_gguf *g, const char *key, uint32_t n_vocab, int32_t *id, char *err,
                   size_t errlen)
{
    if (*id >= 0 && (uint32_t)*id >= n_vocab) {
        *id = KVS_TOKEN_NONE;
    }
    uint32_t v;
    int rc = kvs_gguf_get_u32(g, key, &v);
    if (rc == KVS_NOT_FOUND) {
        return 0;
    }
    if (rc < 0) {
        return fail(err, errlen, rc, "%s: %s", key, kvs_status_message(rc));
    }
    if (v >= n_vocab) {
        KVS_WARN("tokenizer: %s = %u is outside the vocabulary (%u tokens); ignored", key, v,
                 n_vocab);
        return 0;
    }
    *id = (int32_t)v;
    return 0;
}

static int read_bool(const kvs_gguf *g, const char *key, bool *out, char *err, size_t errlen)
{
    int rc = kvs_gguf_get_bool(g, key, out);
    if (rc == KVS_NOT_FOUND) {
        return 0;
    }
    if (rc < 0) {
        return fail(err, errlen, rc, "%s: %s", key, kvs_status_message(rc));
    }
    return 0;
}

static int cmp_special(const void *a, const void *b, void *ctx)
{
    const kvs_tokenizer *tok = ctx;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    uint32_t lx = tok->tokens[x].text_len, ly = tok->tokens[y].text_len;
    if (lx != ly) {
        return lx > ly ? -1 : 1;
    }
    return x < y ? -1 : (x > y);
}

/* The bytes token id decodes to, appended to *buf (len/cap in bytes). */
static int build_piece(kvs_tokenizer *tok, uint32_t id, char **buf, size_t *len, size_t *cap)
{
    const struct tok_entry *e = &tok->tokens[id];
    const char *t = tok_text(tok, id);
    size_t n = e->text_len;
    size_t w = *len;
    uint8_t attr = e->attr;
    /* every branch writes at most n bytes, except the UNK_BYTE markers (grown per marker) */
    KVS_TRY(tok_grow((void **)buf, cap, w + n + 1));
    if (attr & (TOK_ATTR_UNKNOWN | TOK_ATTR_CONTROL | TOK_ATTR_USER_DEFINED)) {
        memcpy(*buf + w, t, n);
        w += n;
    } else if (attr & TOK_ATTR_NORMAL) {
        if (tok->kind == KVS_TOKENIZER_SPM) {
            for (size_t i = 0; i < n;) {
                if (n - i >= 3 && memcmp(t + i, "\xE2\x96\x81", 3) == 0) {
                    (*buf)[w++] = ' ';
                    i += 3;
                } else {
                    (*buf)[w++] = t[i++];
                }
            }
        } else {
            for (size_t pos = 0; pos < n;) {
                uint32_t c = kvs_unicode_decode(t, n, &pos);
                int b = kvs_unicode_cpt_to_byte(c);
                if (b >= 0) {
                    (*buf)[w++] = (char)b;
                    continue;
                }
                /* not a byte-level character: llama.cpp writes "[UNK_BYTE_0x<hex><text>]" */
                char u[4];
                size_t un = kvs_unicode_encode(c, u);
                if (w + 13 + 2 * un + n - *len > (1u << 24)) {
                    return KVS_TOO_LARGE; /* a hostile vocabulary: pieces grow quadratically */
                }
                KVS_TRY(tok_grow((void **)buf, cap, w + 13 + 2 * un + n + n + 1));
                w += (size_t)sprintf(*buf + w, "[UNK_BYTE_0x");
                for (size_t k = 0; k < un; k++) {
                    w += (size_t)sprintf(*buf + w, "%02x", (uint8_t)u[k]);
                }
                memcpy(*buf + w, t, n);
                w += n;
                (*buf)[w++] = ']';
            }
        }
    } else if (attr & TOK_ATTR_BYTE) {
        /* "<0xXX>": the hex digits at 3..4 */
        unsigned v = 0;
        for (size_t i = 3; i < 5 && i < n; i++) {
            char c = t[i];
            unsigned d = (c >= '0' && c <= '9')   ? (unsigned)(c - '0')
                         : (c >= 'a' && c <= 'f') ? (unsigned)(c - 'a' + 10)
                         : (c >= 'A' && c <= 'F') ? (unsigned)(c - 'A' + 10)
                                                  : 16u;
            if (d == 16) {
                break;
            }
            v = v * 16 + d;
        }
        (*buf)[w++] = (char)v;
    }
    if (w > UINT32_MAX) {
        return KVS_TOO_LARGE;
    }
    tok->tokens[id].piece_off = (uint32_t)*len;
    tok->tokens[id].piece_len = (uint32_t)(w - *len);
    if (w - *len > tok->max_piece) {
        tok->max_piece = w - *len;
    }
    *len = w;
    return 0;
}

static int load_tokens(kvs_tokenizer *tok, const kvs_gguf *g, char *err, size_t errlen)
{
    kvs_gguf_arr toks, types = {0}, scores = {0};
    int rc = kvs_gguf_get_arr(g, "tokenizer.ggml.tokens", &toks);
    if (rc < 0) {
        return fail(err, errlen, rc, "tokenizer.ggml.tokens: %s", kvs_status_message(rc));
    }
    if (toks.type != KVS_GGUF_STRING || toks.n == 0 || toks.n > INT32_MAX / 2) {
        return fail(err, errlen, KVS_BAD_FORMAT,
                    "tokenizer.ggml.tokens: need a non-empty string array, have %llu x %s",
                    (unsigned long long)toks.n, kvs_gguf_type_name(toks.type));
    }
    tok->n_vocab = (uint32_t)toks.n;
    bool have_types = kvs_gguf_get_arr(g, "tokenizer.ggml.token_type", &types) == 0;
    if (have_types && (types.n < toks.n || types.type == KVS_GGUF_STRING ||
                       types.type == KVS_GGUF_FLOAT32 || types.type == KVS_GGUF_FLOAT64)) {
        return fail(err, errlen, KVS_BAD_FORMAT,
                    "tokenizer.ggml.token_type: need %u integers, have %llu x %s", tok->n_vocab,
                    (unsigned long long)types.n, kvs_gguf_type_name(types.type));
    }
    bool have_scores = kvs_gguf_get_arr(g, "tokenizer.ggml.scores", &scores) == 0;
    if (have_scores && (scores.n < toks.n || scores.type == KVS_GGUF_STRING)) {
        return fail(err, errlen, KVS_BAD_FORMAT,
                    "tokenizer.ggml.scores: need %u numbers, have %llu x %s", tok->n_vocab,
                    (unsigned long long)scores.n, kvs_gguf_type_name(scores.type));
    }

    tok->tokens = calloc(tok->n_vocab, sizeof *tok->tokens);
    if (tok->tokens == NULL) {
        return KVS_NO_MEMORY;
    }
    size_t total = 0;
    for (uint32_t i = 0; i < tok->n_vocab; i++) {
        kvs_gguf_str s = kvs_gguf_arr_str(&toks, i);
        total += s.len > 0 ? s.len : 24;
    }
    if (total > UINT32_MAX) {
        return fail(err, errlen, KVS_TOO_LARGE, "tokenizer.ggml.tokens: %zu bytes of text", total);
    }
    tok->text = malloc(total + 1);
    if (tok->text == NULL) {
        return KVS_NO_MEMORY;
    }
    size_t at = 0;
    for (uint32_t i = 0; i < tok->n_vocab; i++) {
        kvs_gguf_str s = kvs_gguf_arr_str(&toks, i);
        struct tok_entry *e = &tok->tokens[i];
        e->text_off = (uint32_t)at;
        if (s.len == 0) {
            /* llama.cpp renames empty tokens so that they can never match */
            e->text_len = (uint32_t)snprintf(tok->text + at, 25, "[EMPTY_%u]", i);
        } else {
            memcpy(tok->text + at, s.ptr, s.len);
            e->text_len = (uint32_t)s.len;
        }
        at += e->text_len;
        e->score = have_scores ? (float)kvs_gguf_arr_f64(&scores, i) : 0.0f;
        int64_t type = have_types ? kvs_gguf_arr_i64(&types, i) : KVS_TOKEN_NORMAL;
        e->type = (type >= 0 && type <= KVS_TOKEN_BYTE) ? (uint8_t)type : KVS_TOKEN_UNDEFINED;
        switch (type) {
        case KVS_TOKEN_NORMAL:
            e->attr = TOK_ATTR_NORMAL;
            break;
        case KVS_TOKEN_UNKNOWN:
            e->attr = TOK_ATTR_UNKNOWN;
            break;
        case KVS_TOKEN_CONTROL:
            e->attr = TOK_ATTR_CONTROL;
            break;
        case KVS_TOKEN_USER_DEFINED:
            e->attr = TOK_ATTR_USER_DEFINED;
            break;
        case KVS_TOKEN_UNUSED:
            e->attr = TOK_ATTR_UNUSED;
            break;
        case KVS_TOKEN_BYTE:
            e->attr = TOK_ATTR_BYTE;
            break;
        default:
            e->attr = 0;
            break;
        }
    }
    KVS_TRY(hash_init(&tok->by_text, tok->n_vocab));
    for (uint32_t i = 0; i < tok->n_vocab; i++) {
        text_insert(tok, i);
    }
    return 0;
}

static int load_merges(kvs_tokenizer *tok, const kvs_gguf *g, char *err, size_t errlen)
{
    kvs_gguf_arr m;
    int rc = kvs_gguf_get_arr(g, "tokenizer.ggml.merges", &m);
    if (rc < 0) {
        return fail(err, errlen, rc, "tokenizer.ggml.merges: %s", kvs_status_message(rc));
    }
    if (m.type != KVS_GGUF_STRING || m.n > INT32_MAX / 2) {
        return fail(err, errlen, KVS_BAD_FORMAT, "tokenizer.ggml.merges: need a string array");
    }
    tok->n_merges = (uint32_t)m.n;
    size_t total = 0;
    for (uint64_t i = 0; i < m.n; i++) {
        total += kvs_gguf_arr_str(&m, i).len;
    }
    if (total > UINT32_MAX) {
        return fail(err, errlen, KVS_TOO_LARGE, "tokenizer.ggml.merges: %zu bytes", total);
    }
    tok->merge_off = malloc((m.n + 1) * sizeof *tok->merge_off);
    tok->merge_len = malloc((m.n + 1) * sizeof *tok->merge_len);
    tok->merge_text = malloc(total + 1);
    if (tok->merge_off == NULL || tok->merge_len == NULL || tok->merge_text == NULL) {
        return KVS_NO_MEMORY;
    }
    size_t at = 0;
    for (uint32_t i = 0; i < tok->n_merges; i++) {
        kvs_gguf_str s = kvs_gguf_arr_str(&m, i);
        memcpy(tok->merge_text + at, s.ptr, s.len);
        tok->merge_off[i] = (uint32_t)at;
        tok->merge_len[i] = (uint32_t)s.len;
        at += s.len;
    }
    KVS_TRY(hash_init(&tok->merges, tok->n_merges));
    for (uint32_t i = 0; i < tok->n_merges; i++) {
        merge_insert(tok, i);
    }
    return 0;
}

/* llama.cpp's promotions by token text, EOG set, and the special-token list. */
static int classify_specials(kvs_tokenizer *tok, bool eot_given, bool eom_given)
{
    for (uint32_t i = 0; i < tok->n_vocab; i++) {
        struct tok_entry *e = &tok->tokens[i];
        if (!eot_given && text_in(tok, i, eot_texts)) {
            if (tok->eot == KVS_TOKEN_NONE) {
                tok->eot = (int32_t)i;
            }
            e->attr |= TOK_ATTR_CONTROL;
        }
        if (!eom_given && text_is(tok, i, "<|eom_id|>")) {
            if (tok->eom == KVS_TOKEN_NONE) {
                tok->eom = (int32_t)i;
            }
            e->attr |= TOK_ATTR_CONTROL;
        }
        if (text_in(tok, i, fim_texts)) {
            e->attr |= TOK_ATTR_CONTROL;
        }
        if (text_in(tok, i, fim_eog_texts)) {
            e->attr |= TOK_ATTR_CONTROL;
            e->eog = true;
        }
        if (text_in(tok, i, eog_texts)) {
            e->attr |= TOK_ATTR_CONTROL;
            e->eog = true;
        }
        if (text_is(tok, i, "<|channel|>") || text_is(tok, i, "<|message|>") ||
            text_is(tok, i, "<|start|>") || text_is(tok, i, "<|constrain|>")) {
            e->attr = TOK_ATTR_USER_DEFINED;
        }
    }
    int32_t ends[] = {tok->eos, tok->eot, tok->eom};
    for (size_t k = 0; k < 3; k++) {
        if (ends[k] != KVS_TOKEN_NONE) {
            tok->tokens[ends[k]].eog = true;
        }
    }

    tok->special = malloc(tok->n_vocab * sizeof *tok->special);
    if (tok->special == NULL) {
        return KVS_NO_MEMORY;
    }
    for (uint32_t i = 0; i < tok->n_vocab; i++) {
        if (tok->tokens[i].attr & (TOK_ATTR_CONTROL | TOK_ATTR_USER_DEFINED | TOK_ATTR_UNKNOWN)) {
            tok->special[tok->n_special++] = (int32_t)i;
        }
    }
    qsort_r(tok->special, tok->n_special, sizeof *tok->special, cmp_special, tok);
    return 0;
}

int kvs_tokenizer_new_from_gguf(const kvs_gguf *g, kvs_tokenizer **out, char *err, size_t errlen)
{
    int rc;
    *out = NULL;
    if (errlen > 0) {
        err[0] = '\0';
    }
    kvs_tokenizer *tok = calloc(1, sizeof *tok);
    if (tok == NULL) {
        return KVS_NO_MEMORY;
    }

    kvs_gguf_str model, pre = {"", 0};
    rc = kvs_gguf_get_str(g, "tokenizer.ggml.model", &model);
    if (rc < 0) {
        rc = fail(err, errlen, rc, "tokenizer.ggml.model: %s", kvs_status_message(rc));
        goto fail;
    }
    if (str_is(model, "gpt2")) {
        tok->kind = KVS_TOKENIZER_BPE;
        tok->bos = tok->eos = 11; /* llama.cpp's defaults for "gpt2" */
        tok->unk = KVS_TOKEN_NONE;
    } else if (str_is(model, "llama")) {
        tok->kind = KVS_TOKENIZER_SPM;
        tok->bos = 1;
        tok->eos = 2;
        tok->unk = 0;
        tok->add_bos = true;
        tok->add_space_prefix = true;
    } else {
        rc = fail(err, errlen, KVS_UNSUPPORTED, "unsupported tokenizer.ggml.model '%.*s'",
                  (int)(model.len > 64 ? 64 : model.len), model.ptr);
        goto fail;
    }
    tok->eot = tok->eom = tok->pad = KVS_TOKEN_NONE;

    if (tok->kind == KVS_TOKENIZER_BPE) {
        rc = kvs_gguf_get_str(g, "tokenizer.ggml.pre", &pre);
        if (rc == KVS_NOT_FOUND) {
            pre = (kvs_gguf_str){"default", 7}; /* llama.cpp's choice, with a warning */
            KVS_WARN("tokenizer: no tokenizer.ggml.pre; using 'default'");
        } else if (rc < 0) {
            rc = fail(err, errlen, rc, "tokenizer.ggml.pre: %s", kvs_status_message(rc));
            goto fail;
        }
        for (size_t i = 0; i < sizeof pre_names / sizeof pre_names[0]; i++) {
            if (str_is(pre, pre_names[i].name)) {
                tok->pre = pre_names[i].pre;
            }
        }
        if (tok->pre == TOK_PRE_NONE) {
            rc = fail(err, errlen, KVS_UNSUPPORTED,
                      "unsupported pre-tokenizer tokenizer.ggml.pre = '%.*s' (supported: "
                      "smollm, llama-bpe, qwen2, gpt-2, default)",
                      (int)(pre.len > 64 ? 64 : pre.len), pre.ptr);
            goto fail;
        }
        snprintf(tok->pre_name, sizeof tok->pre_name, "%.*s", (int)pre.len, pre.ptr);
        if (tok->pre == TOK_PRE_LLAMA3) {
            tok->ignore_merges = true;
            tok->add_bos = true;
        }
    }

    if ((rc = load_tokens(tok, g, err, errlen)) < 0) {
        goto fail;
    }
    if (tok->kind == KVS_TOKENIZER_BPE && (rc = load_merges(tok, g, err, errlen)) < 0) {
        goto fail;
    }

    bool eot_given = kvs_gguf_find_key(g, "tokenizer.ggml.eot_token_id") >= 0;
    bool eom_given = kvs_gguf_find_key(g, "tokenizer.ggml.eom_token_id") >= 0;
    if ((rc = read_id(g, "tokenizer.ggml.bos_token_id", tok->n_vocab, &tok->bos, err, errlen)) < 0 ||
        (rc = read_id(g, "tokenizer.ggml.eos_token_id", tok->n_vocab, &tok->eos, err, errlen)) < 0 ||
        (rc = read_id(g, "tokenizer.ggml.eot_token_id", tok->n_vocab, &tok->eot, err, errlen)) < 0 ||
        (rc = read_id(g, "tokenizer.ggml.eom_token_id", tok->n_vocab, &tok->eom, err, errlen)) < 0 ||
        (rc = read_id(g, "tokenizer.ggml.unknown_token_id", tok->n_vocab, &tok->unk, err,
                      errlen)) < 0 ||
        (rc = read_id(g, "tokenizer.ggml.padding_token_id", tok->n_vocab, &tok->pad, err,
                      errlen)) < 0 ||
        (rc = read_bool(g, "tokenizer.ggml.add_bos_token", &tok->add_bos, err, errlen)) < 0 ||
        (rc = read_bool(g, "tokenizer.ggml.add_eos_token", &tok->add_eos, err, errlen)) < 0 ||
        (rc = read_bool(g, "tokenizer.ggml.add_space_prefix", &tok->add_space_prefix, err,
                        errlen)) < 0) {
        goto fail;
    }
    if (tok->kind == KVS_TOKENIZER_BPE) {
        tok->add_space_prefix = false; /* only SentencePiece prefixes a space */
    }
    if ((tok->add_bos && tok->bos == KVS_TOKEN_NONE) || (tok->add_eos && tok->eos == KVS_TOKEN_NONE)) {
        rc = fail(err, errlen, KVS_BAD_FORMAT, "tokenizer adds BOS/EOS but has no such token");
        goto fail;
    }
    if ((rc = classify_specials(tok, eot_given, eom_given)) < 0) {
        goto fail;
    }

    for (int b = 0; b < 256; b++) {
        char hex[8];
        snprintf(hex, sizeof hex, "<0x%02X>", b);
        char one = (char)b;
        tok->byte_token[b] = tok_lookup(tok, hex, 6);
        if (tok->byte_token[b] == KVS_TOKEN_NONE) {
            tok->byte_token[b] = tok_lookup(tok, &one, 1);
        }
    }

    size_t plen = 0, pcap = 0;
    for (uint32_t i = 0; i < tok->n_vocab; i++) {
        if ((rc = build_piece(tok, i, &tok->pieces, &plen, &pcap)) < 0) {
            fail(err, errlen, rc, "token %u: its decoded piece is too large", i);
            goto fail;
        }
    }

    kvs_gguf_str tmpl;
    if (kvs_gguf_get_str(g, "tokenizer.chat_template", &tmpl) == 0) {
        tok->chat_template = malloc(tmpl.len + 1);
        if (tok->chat_template == NULL) {
            rc = KVS_NO_MEMORY;
            goto fail;
        }
        memcpy(tok->chat_template, tmpl.ptr, tmpl.len);
        tok->chat_template[tmpl.len] = '\0';
    }
    *out = tok;
    return 0;

fail:
    if (rc == KVS_NO_MEMORY && errlen > 0 && err[0] == '\0') {
        fail(err, errlen, rc, "out of memory loading the tokenizer");
    }
    kvs_tokenizer_destroy(&tok);
    return rc;
}

void kvs_tokenizer_destroy(kvs_tokenizer **tokp)
{
    if (tokp == NULL || *tokp == NULL) {
        return;
    }
    kvs_tokenizer *tok = *tokp;
    free(tok->tokens);
    free(tok->text);
    free(tok->pieces);
    free(tok->by_text.slots);
    free(tok->merge_off);
    free(tok->merge_len);
    free(tok->merge_text);
    free(tok->merges.slots);
    free(tok->special);
    free(tok->chat_template);
    free(tok);
    *tokp = NULL;
}

/* ---- encoding ---- */

struct frag {
    int32_t id;  /* special token id, or KVS_TOKEN_NONE for raw text */
    size_t off;  /* raw text: byte offset into the input */
    size_t len;  /* raw text: bytes */
};

struct frags {
    struct frag *v; /* entries */
    size_t n, cap;  /* count, capacity in entries */
};

static int frags_push(struct frags *f, struct frag x)
{
    if (f->n == f->cap) {
        size_t cap = f->cap ? f->cap * 2 : 16;
        struct frag *p = realloc(f->v, cap * sizeof *p);
        if (p == NULL) {
            return KVS_NO_MEMORY;
        }
        f->v = p;
        f->cap = cap;
    }
    f->v[f->n++] = x;
    return 0;
}

/* Split the raw fragments at every occurrence of each special token's text, longest token
 * first, leftmost occurrence first. */
static int partition(const kvs_tokenizer *tok, const char *text, size_t len, bool parse_special,
                     struct frags *cur, struct frags *nxt)
{
    KVS_TRY(frags_push(cur, (struct frag){KVS_TOKEN_NONE, 0, len}));
    for (uint32_t k = 0; k < tok->n_special; k++) {
        int32_t id = tok->special[k];
        const struct tok_entry *e = &tok->tokens[id];
        if (!parse_special && (e->attr & (TOK_ATTR_CONTROL | TOK_ATTR_UNKNOWN))) {
            continue; /* user-defined tokens are matched even without parse_special */
        }
        const char *st = tok_text(tok, (uint32_t)id);
        bool found = false;
        for (size_t i = 0; i < cur->n && !found; i++) {
            const struct frag *f = &cur->v[i];
            found = f->id == KVS_TOKEN_NONE && memmem(text + f->off, f->len, st, e->text_len);
        }
        if (!found) {
            continue;
        }
        nxt->n = 0;
        for (size_t i = 0; i < cur->n; i++) {
            struct frag f = cur->v[i];
            if (f.id != KVS_TOKEN_NONE) {
                KVS_TRY(frags_push(nxt, f));
                continue;
            }
            size_t off = f.off, end = f.off + f.len;
            while (off < end) {
                const char *m = memmem(text + off, end - off, st, e->text_len);
                if (m == NULL) {
                    break;
                }
                size_t at = (size_t)(m - text);
                if (at > off) {
                    KVS_TRY(frags_push(nxt, (struct frag){KVS_TOKEN_NONE, off, at - off}));
                }
                KVS_TRY(frags_push(nxt, (struct frag){id, 0, 0}));
                off = at + e->text_len;
            }
            if (off < end) {
                KVS_TRY(frags_push(nxt, (struct frag){KVS_TOKEN_NONE, off, end - off}));
            }
        }
        struct frags t = *cur;
        *cur = *nxt;
        *nxt = t;
    }
    return 0;
}

int kvs_tokenizer_encode(const kvs_tokenizer *tok, const char *text, size_t len, bool add_special,
                         bool parse_special, int32_t *ids, size_t cap, size_t *n_out)
{
    int rc = 0;
    struct tok_out out = {ids, cap, 0};
    struct frags a = {0}, b = {0};
    struct tok_scratch s = {0};
    char *spm_text = NULL;
    size_t spm_cap = 0;
    *n_out = 0;

    if (len > 0 && (rc = partition(tok, text, len, parse_special, &a, &b)) < 0) {
        goto done;
    }
    if (add_special && tok->add_bos) {
        tok_out_push(&out, tok->bos);
    }
    bool prev_special = true; /* SPM: a space goes before the first text run */
    for (size_t i = 0; i < a.n; i++) {
        const struct frag *f = &a.v[i];
        if (f->id != KVS_TOKEN_NONE) {
            tok_out_push(&out, f->id);
            prev_special = true;
            continue;
        }
        if (tok->kind == KVS_TOKENIZER_BPE) {
            rc = tok_bpe_encode(tok, &s, text + f->off, f->len, &out);
        } else {
            const char *t = text + f->off;
            size_t n = f->len;
            if (tok->add_space_prefix && prev_special) {
                if ((rc = tok_grow((void **)&spm_text, &spm_cap, n + 1)) < 0) {
                    goto done;
                }
                spm_text[0] = ' ';
                memcpy(spm_text + 1, t, n);
                t = spm_text;
                n++;
            }
            rc = tok_spm_encode(tok, &s, t, n, &out);
        }
        if (rc < 0) {
            goto done;
        }
        prev_special = false;
    }
    if (add_special && tok->add_eos) {
        tok_out_push(&out, tok->eos);
    }
    *n_out = out.n;
    rc = out.n > cap ? KVS_TOO_LARGE : 0;
done:
    free(a.v);
    free(b.v);
    free(s.cpts);
    free(s.flags);
    free(s.word);
    free(s.sym);
    free(s.heap);
    free(spm_text);
    return rc;
}

/* ---- accessors ---- */

enum kvs_tokenizer_kind kvs_tokenizer_kind(const kvs_tokenizer *tok)
{
    return tok->kind;
}

const char *kvs_tokenizer_kind_name(const kvs_tokenizer *tok)
{
    return tok->kind == KVS_TOKENIZER_BPE ? "bpe" : "spm";
}

const char *kvs_tokenizer_pre(const kvs_tokenizer *tok)
{
    return tok->pre_name;
}

uint32_t kvs_tokenizer_n_vocab(const kvs_tokenizer *tok)
{
    return tok->n_vocab;
}

int32_t kvs_tokenizer_bos(const kvs_tokenizer *tok)
{
    return tok->bos;
}

int32_t kvs_tokenizer_eos(const kvs_tokenizer *tok)
{
    return tok->eos;
}

int32_t kvs_tokenizer_eot(const kvs_tokenizer *tok)
{
    return tok->eot;
}

bool kvs_tokenizer_add_bos(const kvs_tokenizer *tok)
{
    return tok->add_bos;
}

bool kvs_tokenizer_add_eos(const kvs_tokenizer *tok)
{
    return tok->add_eos;
}

bool kvs_tokenizer_is_eog(const kvs_tokenizer *tok, int32_t id)
{
    return id >= 0 && (uint32_t)id < tok->n_vocab && tok->tokens[id].eog;
}

enum kvs_token_type kvs_tokenizer_token_type(const kvs_tokenizer *tok, int32_t id)
{
    if (id < 0 || (uint32_t)id >= tok->n_vocab) {
        return KVS_TOKEN_UNDEFINED;
    }
    return (enum kvs_token_type)tok->tokens[id].type;
}

bool kvs_tokenizer_is_special(const kvs_tokenizer *tok, int32_t id)
{
    return id >= 0 && (uint32_t)id < tok->n_vocab &&
           (tok->tokens[id].attr & (TOK_ATTR_CONTROL | TOK_ATTR_USER_DEFINED | TOK_ATTR_UNKNOWN));
}

const char *kvs_tokenizer_token_text(const kvs_tokenizer *tok, int32_t id, size_t *len)
{
    if (id < 0 || (uint32_t)id >= tok->n_vocab) {
        *len = 0;
        return NULL;
    }
    *len = tok->tokens[id].text_len;
    return tok_text(tok, (uint32_t)id);
}

int32_t kvs_tokenizer_find(const kvs_tokenizer *tok, const char *text, size_t len)
{
    return tok_lookup(tok, text, len);
}

const char *kvs_tokenizer_chat_template(const kvs_tokenizer *tok)
{
    return tok->chat_template;
}
