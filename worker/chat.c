/* Chat template families rendered by hand. See chat.h for each family's exact text and
 * tests/data/chat/<family>.json for goldens rendered from the real Jinja templates. */
#include "worker/chat.h"

#include "common/log.h"
#include "common/status.h"

#include <assert.h>
#include <string.h>

/* ---- detection ------------------------------------------------------------------------- */

static const char *const family_names[] = {
    [KVS_CHAT_NONE] = "none",
    [KVS_CHAT_CHATML] = "chatml",
    [KVS_CHAT_LLAMA3] = "llama3",
    [KVS_CHAT_LLAMA2] = "llama2",
};

const char *kvs_chat_family_name(kvs_chat_family f)
{
    if ((unsigned)f < sizeof family_names / sizeof family_names[0]) {
        return family_names[f];
    }
    return "unknown";
}

static const char *find(const char *hay, size_t n, const char *needle)
{
    if (hay == NULL) {
        return NULL;
    }
    return memmem(hay, n, needle, strlen(needle));
}

kvs_chat_family kvs_chat_detect(const char *tmpl, size_t len)
{
    if (find(tmpl, len, "<|im_start|>") != NULL) {
        return KVS_CHAT_CHATML;
    }
    if (find(tmpl, len, "<|start_header_id|>") != NULL) {
        return KVS_CHAT_LLAMA3;
    }
    if (find(tmpl, len, "[INST]") != NULL) {
        return KVS_CHAT_LLAMA2;
    }
    return KVS_CHAT_NONE;
}

/* Unescape the body of a Jinja string literal (Python escapes \n \t \r \\ \' \") into
 * out[0, cap). Returns the length, or -1 for anything that is not a plain literal body
 * (quotes, expression syntax, other escapes) or does not fit. */
static long unescape_literal(const char *s, size_t n, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '\'' || c == '"' || c == '{' || c == '}') {
            return -1;
        }
        if (c == '\\') {
            if (++i == n) {
                return -1;
            }
            switch (s[i]) {
            case 'n':
                c = '\n';
                break;
            case 't':
                c = '\t';
                break;
            case 'r':
                c = '\r';
                break;
            case '\\':
            case '\'':
            case '"':
                c = s[i];
                break;
            default:
                return -1;
            }
        }
        if (o == cap) {
            return -1;
        }
        out[o++] = c;
    }
    return (long)o;
}

/* ChatML default system message: the first literal "<|im_start|>system\n<text><|im_end|>"
 * in the template whose <text> is a plain string (SmolLM2, Qwen2: see chat.h). */
static void find_default_system(struct kvs_chat_template *t, const char *tmpl, size_t len)
{
    static const char open[] = "<|im_start|>system";
    static const char close[] = "<|im_end|>";
    const char *end = tmpl + len;
    const char *p = tmpl;
    while ((p = find(p, (size_t)(end - p), open)) != NULL) {
        p += sizeof open - 1;
        const char *body;
        if (p < end && *p == '\n') { /* the GGUF holds the newline itself */
            body = p + 1;
        } else if (end - p >= 2 && p[0] == '\\' && p[1] == 'n') { /* or the Jinja escape */
            body = p + 2;
        } else {
            continue;
        }
        const char *stop = find(body, (size_t)(end - body), close);
        if (stop == NULL) {
            return;
        }
        long n = unescape_literal(body, (size_t)(stop - body), t->default_system,
                                  sizeof t->default_system);
        if (n > 0) {
            t->default_system_len = (size_t)n;
            return;
        }
        if (stop - body > 0 && memchr(body, '\'', (size_t)(stop - body)) == NULL &&
            memchr(body, '"', (size_t)(stop - body)) == NULL) {
            KVS_WARN("chat: template's default system message (%ld bytes) not used: too long "
                     "or not a plain literal",
                     (long)(stop - body));
        }
    }
}

void kvs_chat_template_init(struct kvs_chat_template *t, const char *tmpl, size_t len)
{
    assert(t != NULL);
    memset(t, 0, sizeof *t);
    if (tmpl == NULL) {
        return;
    }
    t->family = kvs_chat_detect(tmpl, len);
    if (t->family == KVS_CHAT_CHATML) {
        find_default_system(t, tmpl, len);
    } else if (t->family == KVS_CHAT_LLAMA3) {
        t->llama3_dated = find(tmpl, len, "Cutting Knowledge Date") != NULL;
    }
}

/* ---- rendering --------------------------------------------------------------------------- */

/* Appends to out[0, cap), counting what does not fit. */
struct writer {
    char *out;  /* borrowed */
    size_t cap; /* bytes of out */
    size_t len; /* bytes produced so far (may exceed cap) */
};

static void put(struct writer *w, const char *s, size_t n)
{
    if (n > 0 && w->len < w->cap) {
        size_t room = w->cap - w->len;
        memcpy(w->out + w->len, s, n < room ? n : room);
    }
    w->len += n;
}

static void puts_(struct writer *w, const char *s)
{
    put(w, s, strlen(s));
}

static int finish(struct writer *w, size_t *len_out)
{
    *len_out = w->len;
    if (w->len + 1 > w->cap) {
        return KVS_TOO_LARGE;
    }
    w->out[w->len] = '\0';
    return KVS_OK;
}

/* Length of the Python str.isspace() character that starts at s (n bytes left), or 0. */
static size_t space_at(const unsigned char *s, size_t n)
{
    if (n >= 1 &&
        ((s[0] >= 0x09 && s[0] <= 0x0d) || s[0] == ' ' || (s[0] >= 0x1c && s[0] <= 0x1f))) {
        return 1;
    }
    if (n >= 2 && s[0] == 0xc2 && (s[1] == 0x85 || s[1] == 0xa0)) { /* U+0085, U+00A0 */
        return 2;
    }
    if (n >= 3) {
        unsigned a = s[0], b = s[1], c = s[2];
        if ((a == 0xe1 && b == 0x9a && c == 0x80) || /* U+1680 */
            (a == 0xe2 && b == 0x80 &&
             (c <= 0x8a || c == 0xa8 ||              /* U+2000-200A, 2028 */
              c == 0xa9 || c == 0xaf)) ||            /* U+2029, 202F */
            (a == 0xe2 && b == 0x81 && c == 0x9f) || /* U+205F */
            (a == 0xe3 && b == 0x80 && c == 0x80)) { /* U+3000 */
            return 3;
        }
    }
    return 0;
}

/* Length of the whitespace character that ends at s + n, or 0. */
static size_t space_before(const unsigned char *s, size_t n)
{
    for (size_t k = 1; k <= 3 && k <= n; k++) {
        if (space_at(s + n - k, k) == k) {
            return k;
        }
    }
    return 0;
}

/* Python str.strip() / Jinja trim: the [*pos, *pos + *n) view without outer whitespace. */
static void strip(const char **p, size_t *n)
{
    const unsigned char *s = (const unsigned char *)*p;
    size_t k;
    while (*n > 0 && (k = space_at(s, *n)) > 0) {
        s += k;
        *n -= k;
    }
    while (*n > 0 && (k = space_before(s, *n)) > 0) {
        *n -= k;
    }
    *p = (const char *)s;
}

static const char *const role_names[] = {
    [KVS_CHAT_SYSTEM] = "system",
    [KVS_CHAT_USER] = "user",
    [KVS_CHAT_ASSISTANT] = "assistant",
};

static bool role_ok(enum kvs_chat_role r)
{
    return (unsigned)r < sizeof role_names / sizeof role_names[0];
}

/* ChatML: SmolLM2 / Qwen2 templates. */
static void chatml_turn(struct writer *w, const char *role, const char *s, size_t n)
{
    puts_(w, "<|im_start|>");
    puts_(w, role);
    puts_(w, "\n");
    put(w, s, n);
    puts_(w, "<|im_end|>\n");
}

static void render_chatml(struct writer *w, const struct kvs_chat_template *t,
                          const struct kvs_chat_msg *msgs, size_t n, bool gen)
{
    if (n > 0 && msgs[0].role != KVS_CHAT_SYSTEM && t->default_system_len > 0) {
        chatml_turn(w, "system", t->default_system, t->default_system_len);
    }
    for (size_t i = 0; i < n; i++) {
        chatml_turn(w, role_names[msgs[i].role], msgs[i].content, msgs[i].len);
    }
    if (gen) {
        puts_(w, "<|im_start|>assistant\n");
    }
}

/* Llama 3: '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + content|trim + '<|eot_id|>' */
static void llama3_turn(struct writer *w, const char *role, const char *s, size_t n)
{
    strip(&s, &n);
    puts_(w, "<|start_header_id|>");
    puts_(w, role);
    puts_(w, "<|end_header_id|>\n\n");
    put(w, s, n);
    puts_(w, "<|eot_id|>");
}

static void render_llama3(struct writer *w, const struct kvs_chat_template *t,
                          const struct kvs_chat_msg *msgs, size_t n, bool gen)
{
    size_t first = 0;
    if (t->llama3_dated) {
        const char *sys = "";
        size_t sys_n = 0;
        if (n > 0 && msgs[0].role == KVS_CHAT_SYSTEM) {
            sys = msgs[0].content;
            sys_n = msgs[0].len;
            first = 1;
        }
        strip(&sys, &sys_n);
        puts_(w, "<|start_header_id|>system<|end_header_id|>\n\n"
                 "Cutting Knowledge Date: December 2023\n"
                 "Today Date: 26 Jul 2024\n\n");
        put(w, sys, sys_n);
        puts_(w, "<|eot_id|>");
    }
    for (size_t i = first; i < n; i++) {
        llama3_turn(w, role_names[msgs[i].role], msgs[i].content, msgs[i].len);
    }
    if (gen) {
        puts_(w, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    }
}

/* Llama 2: bos + '[INST] ' + strip(content) + ' [/INST]' per user turn (the first turn's
 * content prefixed by the <<SYS>> block), ' ' + strip(answer) + ' ' + eos per answer.
 * first_bos: whether the first user turn writes "<s>" (not at the start of a context). */
static int render_llama2(struct writer *w, const struct kvs_chat_msg *msgs, size_t n,
                         bool first_bos)
{
    const struct kvs_chat_msg *sys = NULL;
    if (n > 0 && msgs[0].role == KVS_CHAT_SYSTEM) {
        sys = &msgs[0];
        msgs++;
        n--;
    }
    for (size_t i = 0; i < n; i++) {
        enum kvs_chat_role want = i % 2 == 0 ? KVS_CHAT_USER : KVS_CHAT_ASSISTANT;
        if (msgs[i].role != want) {
            KVS_DEBUG("chat: llama2 message %zu is %s, want %s (roles must alternate)", i,
                      role_names[msgs[i].role], role_names[want]);
            return KVS_INVALID_ARGUMENT;
        }
    }
    for (size_t i = 0; i < n; i++) {
        const char *s = msgs[i].content;
        size_t len = msgs[i].len;
        if (msgs[i].role == KVS_CHAT_USER) {
            if (i > 0 || first_bos) {
                puts_(w, "<s>");
            }
            puts_(w, "[INST] ");
            if (i == 0 && sys != NULL) {
                /* strip('<<SYS>>\n' + system + '\n<</SYS>>\n\n' + content): only the user
                 * content's end can be whitespace at the ends. */
                puts_(w, "<<SYS>>\n");
                put(w, sys->content, sys->len);
                puts_(w, "\n<</SYS>>\n\n");
                size_t k;
                while (len > 0 && (k = space_before((const unsigned char *)s, len)) > 0) {
                    len -= k;
                }
                if (len == 0) {
                    /* All of it stripped: the strip reaches back into "\n\n" */
                    w->len -= 2;
                }
                put(w, s, len);
            } else {
                strip(&s, &len);
                put(w, s, len);
            }
            puts_(w, " [/INST]");
        } else {
            strip(&s, &len);
            puts_(w, " ");
            put(w, s, len);
            puts_(w, " </s>");
        }
    }
    return KVS_OK;
}

static int render(const struct kvs_chat_template *t, const struct kvs_chat_msg *msgs, size_t n,
                  bool gen, bool continuation, char *out, size_t cap, size_t *len_out)
{
    assert(t != NULL && len_out != NULL && (out != NULL || cap == 0) && (msgs != NULL || n == 0));
    *len_out = 0;
    if (n == 0) {
        return t->family == KVS_CHAT_NONE ? KVS_UNSUPPORTED : KVS_INVALID_ARGUMENT;
    }
    for (size_t i = 0; i < n; i++) {
        if (!role_ok(msgs[i].role) || (msgs[i].content == NULL && msgs[i].len > 0)) {
            return KVS_INVALID_ARGUMENT;
        }
    }
    struct writer w = {.out = out, .cap = cap, .len = 0};
    switch (t->family) {
    case KVS_CHAT_CHATML:
        if (continuation) {
            struct kvs_chat_template plain = *t;
            plain.default_system_len = 0;
            render_chatml(&w, &plain, msgs, n, gen);
        } else {
            render_chatml(&w, t, msgs, n, gen);
        }
        break;
    case KVS_CHAT_LLAMA3:
        if (continuation) {
            for (size_t i = 0; i < n; i++) {
                llama3_turn(&w, role_names[msgs[i].role], msgs[i].content, msgs[i].len);
            }
            if (gen) {
                puts_(&w, "<|start_header_id|>assistant<|end_header_id|>\n\n");
            }
        } else {
            render_llama3(&w, t, msgs, n, gen);
        }
        break;
    case KVS_CHAT_LLAMA2:
        KVS_TRY(render_llama2(&w, msgs, n, continuation));
        break;
    case KVS_CHAT_NONE:
    default:
        return KVS_UNSUPPORTED;
    }
    return finish(&w, len_out);
}

int kvs_chat_format(const struct kvs_chat_template *t, const struct kvs_chat_msg *msgs, size_t n,
                    bool add_generation_prompt, char *out, size_t cap, size_t *len_out)
{
    return render(t, msgs, n, add_generation_prompt, false, out, cap, len_out);
}

int kvs_chat_format_question(const struct kvs_chat_template *t, const char *text, size_t len,
                             char *out, size_t cap, size_t *len_out)
{
    struct kvs_chat_msg m = {.role = KVS_CHAT_USER, .content = text, .len = len};
    return render(t, &m, 1, true, true, out, cap, len_out);
}

int kvs_chat_format_record(const struct kvs_chat_template *t, const char *text, size_t len,
                           char *out, size_t cap, size_t *len_out)
{
    struct kvs_chat_msg m = {.role = KVS_CHAT_USER, .content = text, .len = len};
    return render(t, &m, 1, false, true, out, cap, len_out);
}
