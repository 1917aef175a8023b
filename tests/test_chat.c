/* Chat templates: byte-exact against goldens rendered from the real Jinja templates
 * (tests/data/chat/<name>.json, written by tests/tools/gen_chat_goldens.py), plus detection,
 * default system messages, buffer sizing and errors. */
#include "common/status.h"
#include "tests/testutil.h"
#include "worker/chat.h"
#include "worker/gguf.h"

#include <check.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- a minimal JSON reader for the goldens (strings, arrays, objects, bools, null) ----- */

enum jt { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ };

struct jv {
    enum jt t;
    bool b;
    char *s;          /* J_STR: malloc'd, NUL-terminated (may hold NULs: see slen) */
    size_t slen;      /* J_STR: bytes */
    size_t n;         /* J_ARR, J_OBJ: items */
    char **keys;      /* J_OBJ: (n) */
    struct jv *items; /* (n) */
};

struct jp {
    const char *p, *end;
};

static void ws(struct jp *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\n' || *j->p == '\t' || *j->p == '\r')) {
        j->p++;
    }
}

static void put_utf8(char *o, size_t *n, uint32_t c)
{
    if (c < 0x80) {
        o[(*n)++] = (char)c;
    } else if (c < 0x800) {
        o[(*n)++] = (char)(0xc0 | (c >> 6));
        o[(*n)++] = (char)(0x80 | (c & 0x3f));
    } else if (c < 0x10000) {
        o[(*n)++] = (char)(0xe0 | (c >> 12));
        o[(*n)++] = (char)(0x80 | ((c >> 6) & 0x3f));
        o[(*n)++] = (char)(0x80 | (c & 0x3f));
    } else {
        o[(*n)++] = (char)(0xf0 | (c >> 18));
        o[(*n)++] = (char)(0x80 | ((c >> 12) & 0x3f));
        o[(*n)++] = (char)(0x80 | ((c >> 6) & 0x3f));
        o[(*n)++] = (char)(0x80 | (c & 0x3f));
    }
}

static uint32_t hex4(struct jp *j)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        char c = *j->p++;
        v = v * 16 + (uint32_t)(c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10);
    }
    return v;
}

static char *jstr(struct jp *j, size_t *len)
{
    ck_assert(*j->p == '"');
    j->p++;
    char *o = malloc((size_t)(j->end - j->p) + 1);
    size_t n = 0;
    while (*j->p != '"') {
        char c = *j->p++;
        if (c != '\\') {
            o[n++] = c;
            continue;
        }
        c = *j->p++;
        switch (c) {
        case 'n':
            o[n++] = '\n';
            break;
        case 't':
            o[n++] = '\t';
            break;
        case 'r':
            o[n++] = '\r';
            break;
        case 'b':
            o[n++] = '\b';
            break;
        case 'f':
            o[n++] = '\f';
            break;
        case 'u': {
            uint32_t cp = hex4(j);
            if (cp >= 0xd800 && cp < 0xdc00) { /* surrogate pair */
                j->p += 2;
                cp = 0x10000 + ((cp - 0xd800) << 10) + (hex4(j) - 0xdc00);
            }
            put_utf8(o, &n, cp);
            break;
        }
        default:
            o[n++] = c;
            break; /* \" \\ \/ */
        }
    }
    j->p++;
    o[n] = '\0';
    *len = n;
    return o;
}

static void jparse(struct jp *j, struct jv *v)
{
    memset(v, 0, sizeof *v);
    ws(j);
    if (*j->p == '"') {
        v->t = J_STR;
        v->s = jstr(j, &v->slen);
    } else if (*j->p == '[' || *j->p == '{') {
        bool obj = *j->p == '{';
        v->t = obj ? J_OBJ : J_ARR;
        j->p++;
        size_t cap = 0;
        for (;;) {
            ws(j);
            if (*j->p == ']' || *j->p == '}') {
                j->p++;
                break;
            }
            if (*j->p == ',') {
                j->p++;
                ws(j);
            }
            if (v->n == cap) {
                cap = cap ? 2 * cap : 8;
                v->items = realloc(v->items, cap * sizeof *v->items);
                v->keys = realloc(v->keys, cap * sizeof *v->keys);
            }
            v->keys[v->n] = NULL;
            if (obj) {
                size_t kl;
                v->keys[v->n] = jstr(j, &kl);
                ws(j);
                ck_assert(*j->p == ':');
                j->p++;
            }
            jparse(j, &v->items[v->n]);
            v->n++;
        }
    } else if (strncmp(j->p, "true", 4) == 0 || strncmp(j->p, "false", 5) == 0) {
        v->t = J_BOOL;
        v->b = *j->p == 't';
        j->p += v->b ? 4 : 5;
    } else if (strncmp(j->p, "null", 4) == 0) {
        j->p += 4;
    } else {
        v->t = J_NUM;
        while (j->p < j->end && strchr("+-.0123456789eE", *j->p) != NULL) {
            j->p++;
        }
    }
}

static void jfree(struct jv *v)
{
    free(v->s);
    for (size_t i = 0; i < v->n; i++) {
        jfree(&v->items[i]);
        free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
}

static const struct jv *jget(const struct jv *o, const char *key)
{
    for (size_t i = 0; o->t == J_OBJ && i < o->n; i++) {
        if (strcmp(o->keys[i], key) == 0) {
            return &o->items[i];
        }
    }
    return NULL;
}

/* ---- goldens ----------------------------------------------------------------------------- */

static enum kvs_chat_role role_of(const char *s)
{
    if (strcmp(s, "system") == 0) {
        return KVS_CHAT_SYSTEM;
    }
    if (strcmp(s, "user") == 0) {
        return KVS_CHAT_USER;
    }
    ck_assert_str_eq(s, "assistant");
    return KVS_CHAT_ASSISTANT;
}

static const char *const goldens[] = {"smollm2", "qwen2", "qwen25", "llama3", "llama31", "llama2"};

static void check_output(const char *where, int rc, const char *got, size_t got_len,
                         const struct jv *expected)
{
    ck_assert_msg(rc == KVS_OK, "%s: status %s", where, kvs_status_name(rc));
    ck_assert_msg(got_len == expected->slen && memcmp(got, expected->s, got_len) == 0,
                  "%s:\n got      [%.*s]\n expected [%s]", where, (int)got_len, got, expected->s);
    ck_assert_int_eq(got[got_len], '\0');
}

START_TEST(test_goldens)
{
    const char *name = goldens[_i];
    char path[1024];
    snprintf(path, sizeof path, "%s/tests/data/chat/%s.json", kvs_test_source_dir(), name);
    size_t flen;
    char *text = kvs_test_read_file(path, &flen);
    ck_assert_msg(text != NULL, "cannot read %s", path);
    struct jp j = {text, text + flen};
    struct jv doc;
    jparse(&j, &doc);

    const struct jv *tmpl = jget(&doc, "template");
    struct kvs_chat_template t;
    kvs_chat_template_init(&t, tmpl->s, tmpl->slen);
    ck_assert_str_eq(kvs_chat_family_name(t.family), jget(&doc, "family")->s);
    ck_assert_int_eq(kvs_chat_detect(tmpl->s, tmpl->slen), t.family);
    const struct jv *dsys = jget(&doc, "default_system");
    ck_assert_uint_eq(t.default_system_len, dsys->slen);
    ck_assert(memcmp(t.default_system, dsys->s, dsys->slen) == 0);

    const struct jv *cases = jget(&doc, "cases");
    ck_assert_uint_ge(cases->n, 10);
    char out[4096];
    for (size_t c = 0; c < cases->n; c++) {
        const struct jv *cs = &cases->items[c];
        char where[128];
        snprintf(where, sizeof where, "%s/%s", name, jget(cs, "name")->s);
        const char *kind = jget(cs, "kind")->s;
        const struct jv *expected = jget(cs, "expected");
        size_t len = 0;
        int rc;
        if (strcmp(kind, "format") == 0) {
            const struct jv *ms = jget(cs, "messages");
            struct kvs_chat_msg msgs[8];
            ck_assert_uint_le(ms->n, 8);
            for (size_t m = 0; m < ms->n; m++) {
                const struct jv *content = jget(&ms->items[m], "content");
                msgs[m] = (struct kvs_chat_msg){.role = role_of(jget(&ms->items[m], "role")->s),
                                                .content = content->s,
                                                .len = content->slen};
            }
            bool gen = jget(cs, "add_generation_prompt")->b;
            rc = kvs_chat_format(&t, msgs, ms->n, gen, out, sizeof out, &len);
            if (expected == NULL) { /* the template raises */
                ck_assert_msg(rc == KVS_INVALID_ARGUMENT, "%s: status %s, want INVALID_ARGUMENT",
                              where, kvs_status_name(rc));
                continue;
            }
            check_output(where, rc, out, len, expected);

            /* Sizing: exactly len + 1 fits, len does not and reports the need. */
            char *tight = malloc(len + 1);
            size_t need = 0;
            ck_assert_int_eq(kvs_chat_format(&t, msgs, ms->n, gen, tight, len, &need),
                             KVS_TOO_LARGE);
            ck_assert_uint_eq(need, len);
            ck_assert_int_eq(kvs_chat_format(&t, msgs, ms->n, gen, NULL, 0, &need), KVS_TOO_LARGE);
            ck_assert_uint_eq(need, len);
            size_t len2 = 0;
            rc = kvs_chat_format(&t, msgs, ms->n, gen, tight, len + 1, &len2);
            check_output(where, rc, tight, len2, expected);
            free(tight);
        } else {
            const struct jv *in = jget(cs, "text");
            if (strcmp(kind, "question") == 0) {
                rc = kvs_chat_format_question(&t, in->s, in->slen, out, sizeof out, &len);
            } else {
                ck_assert_str_eq(kind, "record");
                rc = kvs_chat_format_record(&t, in->s, in->slen, out, sizeof out, &len);
            }
            check_output(where, rc, out, len, expected);
        }
    }
    jfree(&doc);
    free(text);
}
END_TEST

/* ---- detection and errors ---------------------------------------------------------------- */

START_TEST(test_detect)
{
    static const char chatml[] = "{{'<|im_start|>' + message['role']}}";
    static const char llama3[] = "{{ '<|start_header_id|>' }}";
    static const char llama2[] = "{{ '[INST] ' + content }}";
    static const char other[] = "{{ message['content'] }}";
    ck_assert_int_eq(kvs_chat_detect(chatml, strlen(chatml)), KVS_CHAT_CHATML);
    ck_assert_int_eq(kvs_chat_detect(llama3, strlen(llama3)), KVS_CHAT_LLAMA3);
    ck_assert_int_eq(kvs_chat_detect(llama2, strlen(llama2)), KVS_CHAT_LLAMA2);
    ck_assert_int_eq(kvs_chat_detect(other, strlen(other)), KVS_CHAT_NONE);
    ck_assert_int_eq(kvs_chat_detect(NULL, 0), KVS_CHAT_NONE);
    /* The length bounds the search: a marker past len is not seen. */
    ck_assert_int_eq(kvs_chat_detect(chatml, 5), KVS_CHAT_NONE);

    ck_assert_str_eq(kvs_chat_family_name(KVS_CHAT_NONE), "none");
    ck_assert_str_eq(kvs_chat_family_name(KVS_CHAT_CHATML), "chatml");
    ck_assert_str_eq(kvs_chat_family_name(KVS_CHAT_LLAMA3), "llama3");
    ck_assert_str_eq(kvs_chat_family_name(KVS_CHAT_LLAMA2), "llama2");
    ck_assert_str_eq(kvs_chat_family_name((kvs_chat_family)42), "unknown");

    struct kvs_chat_template t;
    kvs_chat_template_init(&t, llama3, strlen(llama3));
    ck_assert(!t.llama3_dated);
    kvs_chat_template_init(&t, NULL, 0);
    ck_assert_int_eq(t.family, KVS_CHAT_NONE);
}
END_TEST

START_TEST(test_default_system)
{
    struct kvs_chat_template t;
    /* A template as tokenizer_config.json writes it: the Jinja escape "\n", not a newline. */
    static const char escaped[] =
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are \\'kind\\'.<|im_end|>\\n' }}{% endif %}";
    kvs_chat_template_init(&t, escaped, strlen(escaped));
    ck_assert_int_eq(t.family, KVS_CHAT_CHATML);
    ck_assert_uint_eq(t.default_system_len, strlen("You are 'kind'."));
    ck_assert(memcmp(t.default_system, "You are 'kind'.", t.default_system_len) == 0);

    /* Only an expression, no literal: no default. */
    static const char expr[] =
        "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>' }}";
    kvs_chat_template_init(&t, expr, strlen(expr));
    ck_assert_int_eq(t.family, KVS_CHAT_CHATML);
    ck_assert_uint_eq(t.default_system_len, 0);

    /* Too long for the struct: not used (and not truncated). */
    size_t big = KVS_CHAT_DEFAULT_SYSTEM_MAX + 10;
    char *tm = malloc(big + 64);
    int n = sprintf(tm, "{{ '<|im_start|>system\n");
    memset(tm + n, 'x', big);
    strcpy(tm + n + big, "<|im_end|>' }}");
    kvs_chat_template_init(&t, tm, strlen(tm));
    ck_assert_uint_eq(t.default_system_len, 0);
    free(tm);

    /* Without a default, a conversation without a system message starts with the user. */
    kvs_chat_template_init(&t, expr, strlen(expr));
    struct kvs_chat_msg m = {KVS_CHAT_USER, "hi", 2};
    char out[128];
    size_t len;
    ck_assert_int_eq(kvs_chat_format(&t, &m, 1, true, out, sizeof out, &len), KVS_OK);
    ck_assert_str_eq(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}
END_TEST

START_TEST(test_errors)
{
    struct kvs_chat_template none, chatml;
    static const char other[] = "{{ message['content'] }}";
    kvs_chat_template_init(&none, other, strlen(other));
    static const char cm[] = "<|im_start|>";
    kvs_chat_template_init(&chatml, cm, strlen(cm));
    struct kvs_chat_msg m = {KVS_CHAT_USER, "hi", 2};
    char out[64];
    size_t len = 99;

    /* Raw text mode: the caller falls back and says so. */
    ck_assert_int_eq(kvs_chat_format(&none, &m, 1, true, out, sizeof out, &len), KVS_UNSUPPORTED);
    ck_assert_int_eq(kvs_chat_format_question(&none, "q", 1, out, sizeof out, &len),
                     KVS_UNSUPPORTED);
    ck_assert_int_eq(kvs_chat_format_record(&none, "r", 1, out, sizeof out, &len), KVS_UNSUPPORTED);

    ck_assert_int_eq(kvs_chat_format(&chatml, NULL, 0, true, out, sizeof out, &len),
                     KVS_INVALID_ARGUMENT);
    struct kvs_chat_msg bad = {(enum kvs_chat_role)7, "x", 1};
    ck_assert_int_eq(kvs_chat_format(&chatml, &bad, 1, true, out, sizeof out, &len),
                     KVS_INVALID_ARGUMENT);

    /* Content is length-delimited: embedded bytes past len are ignored. */
    struct kvs_chat_msg part = {KVS_CHAT_USER, "hello world", 5};
    ck_assert_int_eq(kvs_chat_format(&chatml, &part, 1, false, out, sizeof out, &len), KVS_OK);
    ck_assert_str_eq(out, "<|im_start|>user\nhello<|im_end|>\n");
    ck_assert_uint_eq(len, strlen(out));
}
END_TEST

START_TEST(test_llama2_alternation)
{
    static const char tm[] = "[INST]";
    struct kvs_chat_template t;
    kvs_chat_template_init(&t, tm, strlen(tm));
    char out[256];
    size_t len;
    struct kvs_chat_msg starts_with_answer[] = {{KVS_CHAT_ASSISTANT, "a", 1}};
    ck_assert_int_eq(kvs_chat_format(&t, starts_with_answer, 1, true, out, sizeof out, &len),
                     KVS_INVALID_ARGUMENT);
    struct kvs_chat_msg late_system[] = {{KVS_CHAT_USER, "q", 1}, {KVS_CHAT_SYSTEM, "s", 1}};
    ck_assert_int_eq(kvs_chat_format(&t, late_system, 2, true, out, sizeof out, &len),
                     KVS_INVALID_ARGUMENT);
    /* A user message that is all whitespace after the <<SYS>> block: strip() eats the
     * block's trailing blank line too (as Python's str.strip on the joined text). */
    struct kvs_chat_msg blank[] = {{KVS_CHAT_SYSTEM, "s", 1}, {KVS_CHAT_USER, " \n ", 3}};
    ck_assert_int_eq(kvs_chat_format(&t, blank, 2, true, out, sizeof out, &len), KVS_OK);
    ck_assert_str_eq(out, "[INST] <<SYS>>\ns\n<</SYS>> [/INST]");
}
END_TEST

/* The real files: the template read with the GGUF reader is the one the goldens were
 * rendered from, and what the worker will see. */
static void template_of(const char *path, struct kvs_chat_template *t, char **text, size_t *len)
{
    kvs_gguf *g = NULL;
    char err[256];
    ck_assert_msg(kvs_gguf_open(path, &g, err, sizeof err) == KVS_OK, "%s: %s", path, err);
    kvs_gguf_str s = {0};
    *text = NULL;
    *len = 0;
    if (kvs_gguf_get_str(g, "tokenizer.chat_template", &s) == KVS_OK) {
        *text = malloc(s.len + 1);
        memcpy(*text, s.ptr, s.len);
        (*text)[s.len] = '\0';
        *len = s.len;
    }
    kvs_chat_template_init(t, *text, *len);
    kvs_gguf_destroy(&g);
}

START_TEST(test_model_files)
{
    struct kvs_chat_template t;
    char *text;
    size_t len;
    template_of(kvs_test_default_model(), &t, &text, &len);
    ck_assert_int_eq(t.family, KVS_CHAT_CHATML);
    const char *smol = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
    ck_assert_uint_eq(t.default_system_len, strlen(smol));
    ck_assert(memcmp(t.default_system, smol, strlen(smol)) == 0);

    char path[1024];
    snprintf(path, sizeof path, "%s/tests/data/chat/smollm2.json", kvs_test_source_dir());
    size_t glen;
    char *golden = kvs_test_read_file(path, &glen);
    ck_assert_ptr_nonnull(golden);
    struct jp j = {golden, golden + glen};
    struct jv doc;
    jparse(&j, &doc);
    const struct jv *gt = jget(&doc, "template");
    ck_assert_msg(gt->slen == len && memcmp(gt->s, text, len) == 0,
                  "the model's template differs from the one the goldens were rendered from");
    jfree(&doc);
    free(golden);
    free(text);

    template_of(kvs_test_vocab("qwen2"), &t, &text, &len);
    ck_assert_int_eq(t.family, KVS_CHAT_CHATML);
    ck_assert_uint_eq(t.default_system_len, strlen("You are a helpful assistant"));
    free(text);

    /* llama.cpp's Llama 3 vocab file carries no template: raw text mode. */
    template_of(kvs_test_vocab("llama-bpe"), &t, &text, &len);
    ck_assert_ptr_null(text);
    ck_assert_int_eq(t.family, KVS_CHAT_NONE);
}
END_TEST

static Suite *chat_suite(void)
{
    Suite *s = suite_create("chat");
    TCase *tc = tcase_create("chat");
    tcase_add_loop_test(tc, test_goldens, 0, (int)(sizeof goldens / sizeof goldens[0]));
    tcase_add_test(tc, test_detect);
    tcase_add_test(tc, test_default_system);
    tcase_add_test(tc, test_errors);
    tcase_add_test(tc, test_llama2_alternation);
    tcase_add_test(tc, test_model_files);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(chat_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
