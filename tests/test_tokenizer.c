/* Tokenizer tests: byte-identical ids to llama.cpp on the golden corpus for the four
 * tokenizers (SmolLM2, Llama 3, Qwen2, Llama 2 SentencePiece) and for the "gpt-2" and
 * "default" pre-tokenizers over SmolLM2's vocabulary, round trips, invalid UTF-8,
 * streaming decoding, BOS/EOS, special-token parsing, and errors.
 *
 * Goldens: tests/data/tokenizer/golden-<name>.jsonl, made by tests/tools/gen_tokenizer_goldens.py
 * with llama-cpp-python. */
#include "common/status.h"
#include "gguf_build.h"
#include "testutil.h"
#include "worker/gguf.h"
#include "worker/tokenizer.h"
#include "worker/unicode.h"

#include <check.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct fixture {
    const char *name; /* golden name */
    kvs_gguf *g;
    kvs_tokenizer *tok;
    struct gb mem; /* in-memory GGUF behind g for the pre-tokenizer variants */
};

/* Append src's tokenizer.* keys to body (tokenizer.ggml.pre replaced by pre); returns the
 * number of keys written. Mirrors gguf_with_pre() in gen_tokenizer_goldens.py. */
static uint64_t copy_tokenizer_keys(const kvs_gguf *src, const char *pre, struct gb *body)
{
    uint64_t n = 0;
    for (uint64_t i = 0; i < kvs_gguf_n_kv(src); i++) {
        const char *key = kvs_gguf_key(src, i);
        if (strncmp(key, "tokenizer.", 10) != 0) {
            continue;
        }
        enum kvs_gguf_type t = kvs_gguf_kv_type(src, i);
        if (t == KVS_GGUF_STRING) {
            kvs_gguf_str v;
            ck_assert_int_eq(kvs_gguf_get_str(src, key, &v), 0);
            gb_str(body, key);
            gb_u32(body, KVS_GGUF_STRING);
            if (strcmp(key, "tokenizer.ggml.pre") == 0) {
                gb_str(body, pre);
            } else {
                gb_strn(body, v.ptr, v.len);
            }
        } else if (t == KVS_GGUF_UINT32) {
            uint32_t v;
            ck_assert_int_eq(kvs_gguf_get_u32(src, key, &v), 0);
            gb_kv_u32(body, key, v);
        } else if (t == KVS_GGUF_BOOL) {
            bool v;
            ck_assert_int_eq(kvs_gguf_get_bool(src, key, &v), 0);
            gb_str(body, key);
            gb_u32(body, KVS_GGUF_BOOL);
            gb_u8(body, v);
        } else if (t == KVS_GGUF_ARRAY) {
            kvs_gguf_arr a;
            ck_assert_int_eq(kvs_gguf_get_arr(src, key, &a), 0);
            ck_assert(a.type == KVS_GGUF_STRING || a.type == KVS_GGUF_INT32 ||
                      a.type == KVS_GGUF_FLOAT32);
            gb_kv_arr(body, key, a.type, a.n);
            for (uint64_t k = 0; k < a.n; k++) {
                if (a.type == KVS_GGUF_STRING) {
                    kvs_gguf_str v = kvs_gguf_arr_str(&a, k);
                    gb_strn(body, v.ptr, v.len);
                } else if (a.type == KVS_GGUF_INT32) {
                    gb_u32(body, (uint32_t)kvs_gguf_arr_i64(&a, k));
                } else {
                    gb_f32(body, (float)kvs_gguf_arr_f64(&a, k));
                }
            }
        } else {
            ck_abort_msg("unexpected type of %s", key);
        }
        n++;
    }
    return n;
}

/* "gpt2" and "default" are the default model's vocabulary under another pre name. */
static const char *variant_pre(const char *name)
{
    return strcmp(name, "gpt2") == 0 ? "gpt-2" : strcmp(name, "default") == 0 ? "default" : NULL;
}

static void open_tok(struct fixture *f, const char *name)
{
    char err[256];
    memset(f, 0, sizeof *f);
    const char *pre = variant_pre(name);
    const char *path = strcmp(name, "smollm") == 0 || pre != NULL ? kvs_test_default_model()
                                                                   : kvs_test_vocab(name);
    f->name = name;
    int rc = kvs_gguf_open(path, &f->g, err, sizeof err);
    ck_assert_msg(rc == 0, "open %s: %s", path, err);
    if (pre != NULL) {
        struct gb body = {0};
        uint64_t n_kv = copy_tokenizer_keys(f->g, pre, &body);
        gb_header(&f->mem, 3, 0, n_kv);
        gb_raw(&f->mem, body.p, body.n);
        gb_free(&body);
        kvs_gguf_destroy(&f->g);
        rc = kvs_gguf_open_memory(f->mem.p, f->mem.n, &f->g, err, sizeof err);
        ck_assert_msg(rc == 0, "open variant %s: %s", name, err);
    }
    rc = kvs_tokenizer_new_from_gguf(f->g, &f->tok, err, sizeof err);
    ck_assert_msg(rc == 0, "tokenizer %s: %s", path, err);
}

static void close_tok(struct fixture *f)
{
    kvs_tokenizer_destroy(&f->tok);
    ck_assert_ptr_null(f->tok);
    kvs_gguf_destroy(&f->g);
    gb_free(&f->mem);
}

/* Encode into a malloc'd array (*n ids); aborts the test on error. */
static int32_t *encode(const kvs_tokenizer *tok, const char *s, size_t len, bool add, bool sp,
                       size_t *n)
{
    size_t cap = len + 8;
    int32_t *ids = malloc(cap * sizeof *ids);
    int rc = kvs_tokenizer_encode(tok, s, len, add, sp, ids, cap, n);
    if (rc == KVS_TOO_LARGE) { /* SPM can give more ids than bytes? never, but be safe */
        cap = *n;
        ids = realloc(ids, cap * sizeof *ids);
        rc = kvs_tokenizer_encode(tok, s, len, add, sp, ids, cap, n);
    }
    ck_assert_int_eq(rc, 0);
    return ids;
}

static char *decode(const kvs_tokenizer *tok, const int32_t *ids, size_t n, bool special,
                    size_t *len)
{
    size_t need;
    int rc = kvs_tokenizer_decode(tok, ids, n, special, NULL, 0, &need);
    ck_assert(rc == 0 || rc == KVS_TOO_LARGE);
    char *buf = malloc(need + 1);
    rc = kvs_tokenizer_decode(tok, ids, n, special, buf, need, len);
    ck_assert_int_eq(rc, 0);
    ck_assert_uint_eq(*len, need);
    buf[*len] = '\0';
    return buf;
}

static void print_ids(FILE *f, const char *label, const int32_t *ids, size_t n)
{
    fprintf(f, "  %s (%zu):", label, n);
    for (size_t i = 0; i < n; i++) {
        fprintf(f, " %d", ids[i]);
    }
    fprintf(f, "\n");
}

static size_t unhex(const char *hx, char *out)
{
    size_t n = 0;
    for (; hx[0] && hx[1]; hx += 2) {
        unsigned v;
        sscanf(hx, "%2x", &v);
        out[n++] = (char)v;
    }
    return n;
}

/* Every golden line's ids must equal ours; pieces must concatenate to the golden detok. */
static void check_goldens(const char *name)
{
    struct fixture f;
    open_tok(&f, name);
    char path[1024];
    snprintf(path, sizeof path, "%s/tests/data/tokenizer/golden-%s.jsonl", kvs_test_source_dir(),
             name);
    FILE *fp = fopen(path, "r");
    ck_assert_msg(fp != NULL, "cannot open %s", path);
    char *line = NULL;
    size_t lcap = 0;
    ssize_t ll;
    size_t n_lines = 0, n_ok = 0, n_detok_ok = 0;
    bool printed = false;
    while ((ll = getline(&line, &lcap, fp)) > 0) {
        json_error_t jerr;
        json_t *j = json_loadb(line, (size_t)ll, JSON_ALLOW_NUL, &jerr);
        ck_assert_msg(j != NULL, "%s: bad JSON: %s", path, jerr.text);
        if (json_is_true(json_object_get(j, "header"))) {
            ck_assert_uint_eq(kvs_tokenizer_n_vocab(f.tok),
                              json_integer_value(json_object_get(j, "n_vocab")));
            ck_assert_int_eq(kvs_tokenizer_bos(f.tok), json_integer_value(json_object_get(j, "bos")));
            ck_assert_int_eq(kvs_tokenizer_eos(f.tok), json_integer_value(json_object_get(j, "eos")));
            ck_assert_int_eq(kvs_tokenizer_add_bos(f.tok),
                             json_is_true(json_object_get(j, "add_bos")));
            json_decref(j);
            continue;
        }
        n_lines++;
        char *bytes;
        size_t blen;
        json_t *jt = json_object_get(j, "text");
        if (jt != NULL) {
            blen = json_string_length(jt);
            bytes = malloc(blen + 1);
            memcpy(bytes, json_string_value(jt), blen);
        } else {
            const char *hx = json_string_value(json_object_get(j, "hex"));
            bytes = malloc(strlen(hx) / 2 + 1);
            blen = unhex(hx, bytes);
        }
        bool sp = json_is_true(json_object_get(j, "special"));
        json_t *jids = json_object_get(j, "ids");
        size_t ng = json_array_size(jids);
        int32_t *gold = malloc((ng + 1) * sizeof *gold);
        for (size_t i = 0; i < ng; i++) {
            gold[i] = (int32_t)json_integer_value(json_array_get(jids, i));
        }
        size_t n;
        int32_t *ids = encode(f.tok, bytes, blen, false, sp, &n);
        bool same = n == ng && memcmp(ids, gold, n * sizeof *ids) == 0;
        n_ok += same;
        if (!same && !printed) {
            printed = true;
            fprintf(stderr, "%s: first mismatch (special=%d) on %s\n", name, sp, line);
            print_ids(stderr, "llama.cpp", gold, ng);
            print_ids(stderr, "kvstream ", ids, n);
        }
        /* pieces */
        json_t *jd = json_object_get(j, "detok");
        char *want;
        size_t wlen;
        if (jd != NULL) {
            wlen = json_string_length(jd);
            want = malloc(wlen + 1);
            memcpy(want, json_string_value(jd), wlen);
        } else {
            const char *hx = json_string_value(json_object_get(j, "detok_hex"));
            want = malloc(strlen(hx) / 2 + 1);
            wlen = unhex(hx, want);
        }
        size_t have = 0;
        char *cat = malloc(wlen + 64 * ng + 1);
        for (size_t i = 0; i < ng; i++) {
            size_t pn;
            const char *p = kvs_tokenizer_piece(f.tok, gold[i], false, &pn);
            ck_assert_ptr_nonnull(p);
            memcpy(cat + have, p, pn);
            have += pn;
        }
        bool dsame = have == wlen && memcmp(cat, want, wlen) == 0;
        n_detok_ok += dsame;
        if (!dsame) {
            fprintf(stderr, "%s: piece mismatch on %s", name, line);
        }
        free(cat);
        free(want);
        free(ids);
        free(gold);
        free(bytes);
        json_decref(j);
    }
    free(line);
    fclose(fp);
    fprintf(stderr, "golden %-10s ids %zu/%zu, pieces %zu/%zu\n", name, n_ok, n_lines, n_detok_ok,
            n_lines);
    ck_assert_uint_gt(n_lines, 300);
    ck_assert_uint_eq(n_ok, n_lines);
    ck_assert_uint_eq(n_detok_ok, n_lines);
    close_tok(&f);
}

START_TEST(golden_smollm)
{
    check_goldens("smollm");
}
END_TEST

START_TEST(golden_llama_bpe)
{
    check_goldens("llama-bpe");
}
END_TEST

START_TEST(golden_qwen2)
{
    check_goldens("qwen2");
}
END_TEST

START_TEST(golden_llama_spm)
{
    check_goldens("llama-spm");
}
END_TEST

START_TEST(golden_gpt2)
{
    check_goldens("gpt2");
}
END_TEST

START_TEST(golden_default)
{
    check_goldens("default");
}
END_TEST

static const char *const names[] = {"smollm", "llama-bpe", "qwen2", "llama-spm", "gpt2",
                                    "default"};

/* Corpus strings (all well-formed UTF-8), malloc'd with lengths. */
struct corpus {
    char **s;
    size_t *len;
    size_t n;
};

static struct corpus load_corpus(void)
{
    struct corpus c = {0};
    char path[1024];
    snprintf(path, sizeof path, "%s/tests/data/tokenizer/corpus.jsonl", kvs_test_source_dir());
    FILE *fp = fopen(path, "r");
    ck_assert_ptr_nonnull(fp);
    char *line = NULL;
    size_t lcap = 0;
    ssize_t ll;
    while ((ll = getline(&line, &lcap, fp)) > 0) {
        json_t *j = json_loadb(line, (size_t)ll, JSON_ALLOW_NUL | JSON_DECODE_ANY, NULL);
        ck_assert_ptr_nonnull(j);
        c.s = realloc(c.s, (c.n + 1) * sizeof *c.s);
        c.len = realloc(c.len, (c.n + 1) * sizeof *c.len);
        c.len[c.n] = json_string_length(j);
        c.s[c.n] = malloc(c.len[c.n] + 1);
        memcpy(c.s[c.n], json_string_value(j), c.len[c.n] + 1);
        c.n++;
        json_decref(j);
    }
    free(line);
    fclose(fp);
    return c;
}

static void free_corpus(struct corpus *c)
{
    for (size_t i = 0; i < c->n; i++) {
        free(c->s[i]);
    }
    free(c->s);
    free(c->len);
}

/* decode(encode(s)) == s for every corpus string, with and without BOS/EOS; streaming
 * decoding gives the same bytes in chunks that are each well-formed UTF-8. */
START_TEST(round_trip_and_stream)
{
    struct fixture f;
    open_tok(&f, names[_i]);
    struct corpus c = load_corpus();
    size_t fails = 0;
    for (size_t k = 0; k < c.n; k++) {
        ck_assert(kvs_unicode_valid_utf8(c.s[k], c.len[k]));
        for (int add = 0; add < 2; add++) {
            size_t n, dl;
            int32_t *ids = encode(f.tok, c.s[k], c.len[k], add, false, &n);
            char *d = decode(f.tok, ids, n, false, &dl);
            if (dl != c.len[k] || memcmp(d, c.s[k], dl) != 0) {
                if (fails++ == 0) {
                    fprintf(stderr, "%s round trip (add_special=%d): '%s' -> '%s'\n", f.name, add,
                            c.s[k], d);
                }
            }
            /* streaming */
            kvs_detok *dt = kvs_detok_new(f.tok, false);
            ck_assert_ptr_nonnull(dt);
            char *acc = malloc(dl + 16);
            size_t al = 0;
            for (size_t i = 0; i < n; i++) {
                const char *o;
                size_t on;
                ck_assert_int_eq(kvs_detok_push(dt, ids[i], &o, &on), 0);
                ck_assert_msg(kvs_unicode_valid_utf8(o, on), "partial UTF-8 emitted");
                ck_assert_uint_le(al + on, dl);
                memcpy(acc + al, o, on);
                al += on;
            }
            const char *o;
            size_t on;
            kvs_detok_finish(dt, &o, &on);
            ck_assert_uint_eq(on, 0); /* well-formed input leaves nothing held */
            ck_assert_uint_eq(al, dl);
            ck_assert(memcmp(acc, d, dl) == 0);
            kvs_detok_destroy(&dt);
            ck_assert_ptr_null(dt);
            free(acc);
            free(d);
            free(ids);
        }
    }
    ck_assert_msg(fails == 0, "%s: %zu round-trip failures", f.name, fails);
    free_corpus(&c);
    close_tok(&f);
}
END_TEST

/* Reference for BPE: what llama.cpp makes of bytes before tokenizing (lenient decoding,
 * re-encoded). */
static size_t bpe_normalize(const char *s, size_t n, char *out)
{
    size_t w = 0;
    for (size_t pos = 0; pos < n;) {
        uint32_t c = kvs_unicode_decode(s, n, &pos);
        w += kvs_unicode_encode(c, out + w);
    }
    return w;
}

/* Invalid UTF-8 never crashes: SPM gives the bytes back on decode; BPE gives the bytes as
 * llama.cpp reads them (invalid bytes -> U+FFFD, overlongs and surrogates by value). */
START_TEST(invalid_utf8)
{
    struct fixture f;
    open_tok(&f, names[_i]);
    bool spm = kvs_tokenizer_kind(f.tok) == KVS_TOKENIZER_SPM;
    static const char *const cases[] = {
        "\xff", "\xfe\xfe", "\xc0", "\xc0\x80", "\xe0\x80", "\xed\xa0\x80", "\xf0\x9f",
        "\xf0\x9f\x98", "\xf4\x90\x80\x80", "\xf7\xbf\xbf\xbf", "\xf8\x88\x80\x80\x80", "\x80",
        "a\xff" "b", "Hello \xc3", "\xe2\x82(", "ok \xf0\x9f\x98\x80\xf0\x9f\x98", "\xc3\xa9\xff",
        "<|im_end|>\xff<s>"};
    uint64_t seed = 0x1234567;
    for (size_t k = 0; k < 3000; k++) {
        char buf[80];
        size_t n;
        if (k < sizeof cases / sizeof cases[0]) {
            n = strlen(cases[k]);
            memcpy(buf, cases[k], n);
        } else {
            n = (size_t)(seed >> 33) % 64;
            for (size_t i = 0; i < n; i++) {
                seed = seed * 6364136223846793005ull + 1442695040888963407ull;
                uint8_t b = (uint8_t)(seed >> 56);
                buf[i] = (char)(b & 0x40 ? b : (b & 0x7f)); /* mix of ASCII and high bytes */
            }
        }
        for (int sp = 0; sp < 2; sp++) {
            size_t nid, dl;
            int32_t *ids = encode(f.tok, buf, n, false, sp, &nid);
            char *d = decode(f.tok, ids, nid, sp, &dl);
            char want[400];
            size_t wl;
            if (spm) {
                memcpy(want, buf, n);
                wl = n;
            } else {
                wl = bpe_normalize(buf, n, want);
            }
            bool has_escape = memmem(buf, n, "\xe2\x96\x81", 3) != NULL;
            if (!(spm && has_escape) && (!sp || memchr(buf, '<', n) == NULL)) {
                ck_assert_msg(dl == wl && memcmp(d, want, wl) == 0, "%s: case %zu", f.name, k);
            }
            free(d);
            free(ids);
        }
    }
    /* specific values */
    if (!spm) {
        size_t n, dl;
        int32_t *ids = encode(f.tok, "\xff", 1, false, false, &n);
        char *d = decode(f.tok, ids, n, false, &dl);
        ck_assert_uint_eq(dl, 3);
        ck_assert(memcmp(d, "\xef\xbf\xbd", 3) == 0);
        free(d);
        free(ids);
        ids = encode(f.tok, "\xf4\x90\x80\x80", 4, false, false, &n);
        d = decode(f.tok, ids, n, false, &dl);
        ck_assert_uint_eq(dl, 3); /* one U+FFFD for the whole out-of-range form */
        free(d);
        free(ids);
    }
    close_tok(&f);
}
END_TEST

/* A stream cut inside a multi-byte character holds the bytes back; finish flushes. */
START_TEST(stream_partial)
{
    struct fixture f;
    open_tok(&f, names[_i]);
    /* emoji, CJK and an invalid tail: byte tokens make partial pieces likely */
    const char *s = "\xf0\x9f\x91\xa8\xe2\x80\x8d\xf0\x9f\x91\xa9 \xe4\xbd\xa0\xe5\xa5\xbd \xf0\x9f\x98";
    size_t n;
    int32_t *ids = encode(f.tok, s, strlen(s), false, false, &n);
    size_t dl;
    char *d = decode(f.tok, ids, n, false, &dl);
    kvs_detok *dt = kvs_detok_new(f.tok, false);
    char acc[256];
    size_t al = 0;
    for (size_t i = 0; i < n; i++) {
        const char *o;
        size_t on;
        ck_assert_int_eq(kvs_detok_push(dt, ids[i], &o, &on), 0);
        ck_assert(kvs_unicode_valid_utf8(o, on));
        memcpy(acc + al, o, on);
        al += on;
    }
    const char *o;
    size_t on;
    kvs_detok_finish(dt, &o, &on);
    memcpy(acc + al, o, on);
    al += on;
    ck_assert_uint_eq(al, dl);
    ck_assert(memcmp(acc, d, dl) == 0);
    ck_assert_int_eq(kvs_detok_push(dt, -5, &o, &on), KVS_OUT_OF_RANGE);
    kvs_detok_destroy(&dt);
    kvs_detok_destroy(&dt); /* NULL-safe */
    free(d);
    free(ids);
    close_tok(&f);
}
END_TEST

START_TEST(bos_eos_and_special)
{
    struct fixture f;
    open_tok(&f, names[_i]);
    const kvs_tokenizer *t = f.tok;
    size_t n0, n1;
    int32_t *a = encode(t, "hello", 5, false, false, &n0);
    int32_t *b = encode(t, "hello", 5, true, false, &n1);
    size_t extra = (size_t)kvs_tokenizer_add_bos(t) + (size_t)kvs_tokenizer_add_eos(t);
    ck_assert_uint_eq(n1, n0 + extra);
    if (kvs_tokenizer_add_bos(t)) {
        ck_assert_int_eq(b[0], kvs_tokenizer_bos(t));
    }
    free(a);
    free(b);
    ck_assert(kvs_tokenizer_is_eog(t, kvs_tokenizer_eos(t)));
    ck_assert(!kvs_tokenizer_is_eog(t, -1));

    const char *marker = kvs_tokenizer_kind(t) == KVS_TOKENIZER_SPM ? "</s>"
                         : strcmp(f.name, "llama-bpe") == 0   ? "<|eot_id|>"
                         : strcmp(f.name, "qwen2") == 0       ? "<|im_end|>"
                                                             : "<|im_end|>";
    int32_t mid = kvs_tokenizer_find(t, marker, strlen(marker));
    ck_assert_int_ge(mid, 0);
    ck_assert(kvs_tokenizer_is_eog(t, mid));
    ck_assert(kvs_tokenizer_is_special(t, mid));
    char text[64];
    snprintf(text, sizeof text, "hi%sthere", marker);
    size_t ns, np;
    int32_t *s = encode(t, text, strlen(text), false, true, &ns);
    int32_t *p = encode(t, text, strlen(text), false, false, &np);
    bool found = false;
    for (size_t i = 0; i < ns; i++) {
        found |= s[i] == mid;
    }
    ck_assert(found);
    for (size_t i = 0; i < np; i++) {
        ck_assert_int_ne(p[i], mid);
    }
    /* control tokens decode to nothing unless asked, then to their text */
    size_t pn;
    kvs_tokenizer_piece(t, mid, false, &pn);
    ck_assert_uint_eq(pn, 0);
    const char *pp = kvs_tokenizer_piece(t, mid, true, &pn);
    ck_assert_uint_eq(pn, strlen(marker));
    ck_assert(memcmp(pp, marker, pn) == 0);
    char small[2];
    size_t need;
    ck_assert_int_eq(kvs_tokenizer_token_to_piece(t, mid, true, small, sizeof small, &need),
                     KVS_TOO_LARGE);
    ck_assert_uint_eq(need, strlen(marker));
    ck_assert_int_eq(kvs_tokenizer_token_to_piece(t, (int32_t)kvs_tokenizer_n_vocab(t), true,
                                                  small, sizeof small, &need),
                     KVS_OUT_OF_RANGE);
    free(s);
    free(p);

    /* too small a buffer reports the count needed and fills what fits */
    int32_t few[2];
    size_t need_ids;
    const char *long_text = "one two three four five six seven";
    ck_assert_int_eq(kvs_tokenizer_encode(t, long_text, strlen(long_text), false, false, few, 2,
                                          &need_ids),
                     KVS_TOO_LARGE);
    size_t nl;
    int32_t *all = encode(t, long_text, strlen(long_text), false, false, &nl);
    ck_assert_uint_eq(need_ids, nl);
    ck_assert_int_eq(few[0], all[0]);
    ck_assert_int_eq(few[1], all[1]);
    free(all);

    ck_assert_str_eq(kvs_tokenizer_kind_name(t), kvs_tokenizer_kind(t) == KVS_TOKENIZER_SPM ? "spm" : "bpe");
    size_t tl;
    const char *tt = kvs_tokenizer_token_text(t, mid, &tl);
    ck_assert_int_eq(kvs_tokenizer_find(t, tt, tl), mid);
    ck_assert_int_eq(kvs_tokenizer_token_type(t, mid), KVS_TOKEN_CONTROL);
    close_tok(&f);
}
END_TEST

START_TEST(accessors_smollm)
{
    struct fixture f;
    open_tok(&f, "smollm");
    ck_assert_str_eq(kvs_tokenizer_pre(f.tok), "smollm");
    ck_assert_uint_eq(kvs_tokenizer_n_vocab(f.tok), 49152);
    ck_assert_ptr_nonnull(kvs_tokenizer_chat_template(f.tok));
    ck_assert_ptr_nonnull(strstr(kvs_tokenizer_chat_template(f.tok), "im_start"));
    close_tok(&f);
}
END_TEST

/* 100 KB of mixed text tokenizes well under a second (each tokenizer). */
START_TEST(speed_100k)
{
    struct fixture f;
    open_tok(&f, names[_i]);
    struct corpus c = load_corpus();
    size_t cap = 100 * 1024, len = 0;
    char *big = malloc(cap + 32768); /* the longest corpus line is ~20 KB */
    for (size_t k = 0; len < cap; k = (k + 1) % c.n) {
        memcpy(big + len, c.s[k], c.len[k]);
        len += c.len[k];
        big[len++] = ' ';
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    size_t n;
    int32_t *ids = encode(f.tok, big, len, true, true, &n);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    fprintf(stderr, "%s: %zu bytes -> %zu ids in %.3f s\n", f.name, len, n, s);
    ck_assert_double_lt(s, 1.0);
    free(ids);
    free(big);
    free_corpus(&c);
    close_tok(&f);
}
END_TEST

struct thread_arg {
    const kvs_tokenizer *tok;
    struct corpus *c;
    int32_t **want; /* per corpus line */
    size_t *want_n;
    int bad;
};

static void *thread_main(void *p)
{
    struct thread_arg *a = p;
    for (int rep = 0; rep < 3; rep++) {
        for (size_t k = 0; k < a->c->n; k++) {
            size_t cap = a->c->len[k] + 8, n;
            int32_t *ids = malloc(cap * sizeof *ids);
            if (kvs_tokenizer_encode(a->tok, a->c->s[k], a->c->len[k], false, false, ids, cap,
                                     &n) != 0 ||
                n != a->want_n[k] || memcmp(ids, a->want[k], n * sizeof *ids) != 0) {
                a->bad++;
            }
            free(ids);
        }
    }
    return NULL;
}

/* Concurrent encoding with one tokenizer gives the same ids as serial encoding. */
START_TEST(concurrent_encode)
{
    struct fixture f;
    open_tok(&f, "smollm");
    struct corpus c = load_corpus();
    int32_t **want = calloc(c.n, sizeof *want);
    size_t *want_n = calloc(c.n, sizeof *want_n);
    for (size_t k = 0; k < c.n; k++) {
        want[k] = encode(f.tok, c.s[k], c.len[k], false, false, &want_n[k]);
    }
    pthread_t th[4];
    struct thread_arg args[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (struct thread_arg){f.tok, &c, want, want_n, 0};
        ck_assert_int_eq(pthread_create(&th[i], NULL, thread_main, &args[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        ck_assert_int_eq(args[i].bad, 0);
    }
    for (size_t k = 0; k < c.n; k++) {
        free(want[k]);
    }
    free(want);
    free(want_n);
    free_corpus(&c);
    close_tok(&f);
}
END_TEST

/* A tiny byte-level vocabulary built in memory, to test load errors. */
static void tiny_vocab(struct gb *b, const char *model, const char *pre, bool with_merges)
{
    static const char *const toks[] = {"a", "b", "ab", "<|endoftext|>"};
    gb_header(b, 3, 0, 3 + (pre != NULL) + with_merges);
    gb_kv_str(b, "tokenizer.ggml.model", model);
    if (pre != NULL) {
        gb_kv_str(b, "tokenizer.ggml.pre", pre);
    }
    gb_kv_arr(b, "tokenizer.ggml.tokens", KVS_GGUF_STRING, 4);
    for (int i = 0; i < 4; i++) {
        gb_str(b, toks[i]);
    }
    gb_kv_arr(b, "tokenizer.ggml.token_type", KVS_GGUF_INT32, 4);
    for (int i = 0; i < 4; i++) {
        gb_u32(b, i == 3 ? 3 : 1);
    }
    if (with_merges) {
        gb_kv_arr(b, "tokenizer.ggml.merges", KVS_GGUF_STRING, 1);
        gb_str(b, "a b");
    }
    gb_kv_u32(b, "tokenizer.ggml.eos_token_id", 3);
}

START_TEST(load_errors)
{
    char err[256];
    struct {
        const char *model, *pre;
        bool merges;
        int want;
        const char *in_err;
    } cases[] = {
        {"gpt2", "smollm", true, 0, NULL},
        {"gpt2", "no-such-pre", true, KVS_UNSUPPORTED, "no-such-pre"},
        {"gpt2", "deepseek-coder", true, KVS_UNSUPPORTED, "deepseek-coder"},
        {"bert", NULL, false, KVS_UNSUPPORTED, "bert"},
        {"gpt2", "qwen2", false, KVS_NOT_FOUND, "merges"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct gb b = {0};
        tiny_vocab(&b, cases[i].model, cases[i].pre, cases[i].merges);
        kvs_gguf *g = NULL;
        ck_assert_int_eq(kvs_gguf_open_memory(b.p, b.n, &g, err, sizeof err), 0);
        kvs_tokenizer *tok = (kvs_tokenizer *)&b; /* must be reset to NULL on failure */
        int rc = kvs_tokenizer_new_from_gguf(g, &tok, err, sizeof err);
        ck_assert_msg(rc == cases[i].want, "case %zu: rc %d (%s)", i, rc, err);
        if (rc == 0) {
            size_t n;
            int32_t *ids = encode(tok, "aab", 3, false, false, &n);
            ck_assert_uint_eq(n, 2); /* "a" + "ab" */
            ck_assert_int_eq(ids[0], 0);
            ck_assert_int_eq(ids[1], 2);
            free(ids);
            ck_assert(kvs_tokenizer_is_eog(tok, 3));
            kvs_tokenizer_destroy(&tok);
        } else {
            ck_assert_ptr_null(tok);
            ck_assert_msg(strstr(err, cases[i].in_err) != NULL, "error '%s' lacks '%s'", err,
                          cases[i].in_err);
        }
        kvs_gguf_destroy(&g);
        gb_free(&b);
    }
    kvs_tokenizer_destroy(NULL);
}
END_TEST

/* A BPE token that is not in byte-level form decodes to llama.cpp's marker; a vocabulary
 * whose markers would blow up quadratically is refused, not trusted. */
START_TEST(unk_byte_pieces)
{
    char err[256];
    for (int hostile = 0; hostile < 2; hostile++) {
        size_t reps = hostile ? 20000 : 1;
        char *big = malloc(3 * reps + 1);
        for (size_t i = 0; i < reps; i++) {
            memcpy(big + 3 * i, "\xe4\xb8\xad", 3); /* 中, not a GPT-2 byte character */
        }
        struct gb b = {0};
        gb_header(&b, 3, 0, 4);
        gb_kv_str(&b, "tokenizer.ggml.model", "gpt2");
        gb_kv_str(&b, "tokenizer.ggml.pre", "gpt-2");
        gb_kv_arr(&b, "tokenizer.ggml.tokens", KVS_GGUF_STRING, 2);
        gb_str(&b, "a");
        gb_strn(&b, big, 3 * reps);
        gb_kv_arr(&b, "tokenizer.ggml.merges", KVS_GGUF_STRING, 0);
        kvs_gguf *g = NULL;
        ck_assert_int_eq(kvs_gguf_open_memory(b.p, b.n, &g, err, sizeof err), 0);
        kvs_tokenizer *tok = NULL;
        int rc = kvs_tokenizer_new_from_gguf(g, &tok, err, sizeof err);
        if (hostile) {
            ck_assert_int_eq(rc, KVS_TOO_LARGE);
            ck_assert_ptr_null(tok);
        } else {
            ck_assert_int_eq(rc, 0);
            size_t n;
            const char *p = kvs_tokenizer_piece(tok, 1, false, &n);
            const char *want = "[UNK_BYTE_0xe4b8ad\xe4\xb8\xad]";
            ck_assert_uint_eq(n, strlen(want));
            ck_assert(memcmp(p, want, n) == 0);
            kvs_tokenizer_destroy(&tok);
        }
        kvs_gguf_destroy(&g);
        gb_free(&b);
        free(big);
    }
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("tokenizer");
    TCase *tc = tcase_create("golden");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, golden_smollm);
    tcase_add_test(tc, golden_llama_bpe);
    tcase_add_test(tc, golden_qwen2);
    tcase_add_test(tc, golden_llama_spm);
    tcase_add_test(tc, golden_gpt2);
    tcase_add_test(tc, golden_default);
    suite_add_tcase(s, tc);
    tc = tcase_create("behaviour");
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, round_trip_and_stream, 0, 6);
    tcase_add_loop_test(tc, invalid_utf8, 0, 6);
    tcase_add_loop_test(tc, stream_partial, 0, 6);
    tcase_add_loop_test(tc, bos_eos_and_special, 0, 6);
    tcase_add_loop_test(tc, speed_100k, 0, 4);
    tcase_add_test(tc, accessors_smollm);
    tcase_add_test(tc, concurrent_encode);
    tcase_add_test(tc, load_errors);
    tcase_add_test(tc, unk_byte_pieces);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
