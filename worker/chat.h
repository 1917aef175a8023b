/* Chat templates: turn role/content messages into the exact text a model's own Jinja chat
 * template (GGUF key tokenizer.chat_template) would render, for the few template families
 * kvstream's models use. No Jinja engine: the family is recognised from marker strings in
 * the template text and rendered by hand; tests/data/chat/<family>.json holds goldens rendered
 * from the real templates with jinja2 (tests/tools/gen_chat_goldens.py).
 *
 * Families (kvs_chat_detect, first match wins):
 *   CHATML  "<|im_start|>" (SmolLM2, Qwen2)
 *           <|im_start|>{role}\n{content}<|im_end|>\n ... [<|im_start|>assistant\n]
 *           Content is not trimmed. Default system message: when the template itself
 *           writes a literal "<|im_start|>system\n...<|im_end|>" (SmolLM2: "You are a helpful
 *           AI assistant named SmolLM, trained by Hugging Face"; the Qwen2 vocab's template:
 *           "You are a helpful assistant"; Qwen2.5: "You are Qwen, created by Alibaba
 *           Cloud. You are a helpful assistant."), that text is taken from the template and
 *           inserted as the first message whenever msgs[0] is not a system message (and
 *           there is at least one message). A ChatML template without such a literal has no
 *           default.
 *   LLAMA3  "<|start_header_id|>" (Llama 3.x)
 *           <|start_header_id|>{role}<|end_header_id|>\n\n{trim(content)}<|eot_id|> ...
 *           [<|start_header_id|>assistant<|end_header_id|>\n\n]
 *           Templates that write "Cutting Knowledge Date" (3.1, 3.2, 3.3) always open with a
 *           system block "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
 *           + trim(msgs[0] if it is a system message, else ""). The date is the templates'
 *           own fallback; 3.2's template would use today's date (strftime_now) where the
 *           renderer provides it: kvstream keeps the fixed date so the same conversation
 *           always gives the same tokens (prefix sharing, exact replay).
 *   LLAMA2  "[INST]" (Llama 2 chat)
 *           [<s>][INST] {strip(<<SYS>>\n{system}\n<</SYS>>\n\n{user})} [/INST] {strip(answer)} </s>
 *           Roles must alternate user/assistant after an optional leading system message
 *           (the template raises otherwise); add_generation_prompt changes nothing. Mistral's
 *           [INST] templates (no <<SYS>>) are also put here: they agree for one user turn
 *           but not on multi-turn spacing.
 *   NONE    anything else, or no template: raw text mode. The format functions return
 *           KVS_UNSUPPORTED so the caller can fall back to raw text and say so.
 *   trim/strip remove Python str.isspace() characters (ASCII and the Unicode spaces) at
 *   both ends, like Jinja's trim filter and str.strip().
 *
 * BOS: templates that start with bos_token (Llama 3) or put it before every user turn
 * (Llama 2) rely on the tokenizer adding BOS for the first one. The formatted text never
 * contains that first BOS: the caller tokenizes the text of a new context with BOS added
 * iff the GGUF's tokenizer.ggml.add_bos_token says so (SmolLM2: false, its template has no
 * BOS) and with special-token parsing on, so "<|im_start|>", "<|eot_id|>", a later "<s>"
 * or "</s>" become their control tokens. Text appended to an existing context is tokenized
 * without BOS. Because special tokens are parsed, content containing special-token text
 * (a user writing "<|im_end|>") would be parsed as control tokens too: callers that must
 * not allow that tokenize the content separately from the template text.
 *
 * Output: text is written to out[0, cap) and NUL-terminated; *len_out is its length
 * without the NUL. When it does not fit (needs len + 1 > cap), the functions return
 * KVS_TOO_LARGE with *len_out = the length needed (without the NUL) and out holds an
 * unspecified prefix. Content is bytes: it is not UTF-8 validated here.
 *
 * Thread-safety: all functions are pure; any thread.
 */
#ifndef KVS_CHAT_H
#define KVS_CHAT_H

#include <stdbool.h>
#include <stddef.h>

typedef enum kvs_chat_family {
    KVS_CHAT_NONE = 0,
    KVS_CHAT_CHATML = 1,
    KVS_CHAT_LLAMA3 = 2,
    KVS_CHAT_LLAMA2 = 3,
} kvs_chat_family;

enum kvs_chat_role {
    KVS_CHAT_SYSTEM = 0,
    KVS_CHAT_USER = 1,
    KVS_CHAT_ASSISTANT = 2,
};

struct kvs_chat_msg {
    enum kvs_chat_role role;
    const char *content; /* borrowed; len bytes, need not be NUL-terminated */
    size_t len;          /* bytes */
};

#define KVS_CHAT_DEFAULT_SYSTEM_MAX 512 /* bytes of a template's default system message */

/* What kvstream needs to know of one model's template; a plain value. */
struct kvs_chat_template {
    kvs_chat_family family;
    bool llama3_dated;                                /* LLAMA3: "Cutting Knowledge Date" block */
    size_t default_system_len;                        /* bytes; 0 = no default system message */
    char default_system[KVS_CHAT_DEFAULT_SYSTEM_MAX]; /* CHATML default system message */
};

/* The family of a template's text (tmpl may be NULL when len is 0; not NUL-terminated). */
kvs_chat_family kvs_chat_detect(const char *tmpl, size_t len);

/* "none", "chatml", "llama3", "llama2"; "unknown" for other values. */
const char *kvs_chat_family_name(kvs_chat_family f);

/* Describe a template: family, Llama 3 variant and default system message (see above).
 * tmpl may be NULL (family NONE). A default system message longer than
 * KVS_CHAT_DEFAULT_SYSTEM_MAX, or one that is not a plain string literal, is not used
 * (logged at warn). Never fails. */
void kvs_chat_template_init(struct kvs_chat_template *t, const char *tmpl, size_t len);

/* Render a whole conversation as the template would with add_generation_prompt.
 * Returns 0, KVS_UNSUPPORTED (family NONE), KVS_INVALID_ARGUMENT (n == 0, which some
 * templates refuse and none renders usefully; a role outside the enum; LLAMA2: roles not
 * alternating user/assistant after an optional first system message), or KVS_TOO_LARGE
 * (see Output). */
int kvs_chat_format(const struct kvs_chat_template *t, const struct kvs_chat_msg *msgs, size_t n,
                    bool add_generation_prompt, char *out, size_t cap, size_t *len_out);

/* The text that appending one user turn plus the generation prompt adds to a conversation
 * that already holds at least one complete turn (the suffix by which the template's
 * rendering of msgs + [user text] with add_generation_prompt exceeds that of msgs without
 * it): how a question is prefilled onto a session's chat context. No default system
 * message and no BOS-less first turn: use kvs_chat_format for the start of a context.
 * Returns as kvs_chat_format. */
int kvs_chat_format_question(const struct kvs_chat_template *t, const char *text, size_t len,
                             char *out, size_t cap, size_t *len_out);

/* The text one user turn without a generation prompt adds to a conversation (same rules
 * as kvs_chat_format_question): how a data record is appended to a chat-formatted session.
 * LLAMA2 note: consecutive records are consecutive user turns, which the Llama 2 template
 * itself would refuse; the text is still the user-turn text. Returns as kvs_chat_format. */
int kvs_chat_format_record(const struct kvs_chat_template *t, const char *text, size_t len,
                           char *out, size_t cap, size_t *len_out);

#endif
