/* Tokenizer built from a model's GGUF metadata, giving the same ids as llama.cpp.
 *
 * Kinds (tokenizer.ggml.model):
 *   "gpt2"  byte-level BPE. Pre-tokenizers (tokenizer.ggml.pre): "smollm", "llama-bpe"
 *           (also "llama3", "llama-v3"), "qwen2", "gpt-2", "default". Any other name is
 *           refused with KVS_UNSUPPORTED naming it: no silent fallback.
 *   "llama" SentencePiece (Llama 2, TinyLlama): score-driven bigram merging, "▁" for
 *           space, a space prefixed to each text run that starts the input or follows a
 *           special token (tokenizer.ggml.add_space_prefix, default on), <0xXX> byte
 *           fallback.
 *
 * Special tokens: control (type 3), user-defined (4) and unknown (2) tokens, plus tokens that
 * llama.cpp promotes to control by their text (<|im_end|>, <|eot_id|>, <|endoftext|>, ...).
 * With parse_special, their text in the input becomes their id (longest tokens first).
 * Without it, user-defined tokens are still matched (as llama.cpp and HF tokenizers do) but
 * control and unknown text is tokenized as ordinary text.
 *
 * Invalid UTF-8 input never fails and never crashes; it behaves as in llama.cpp:
 *   BPE: each invalid byte (stray continuation, 0xF8..0xFF, truncated sequence) becomes
 *        U+FFFD before pre-tokenization, so it encodes as the tokens of EF BF BD. Overlong
 *        forms and encoded surrogates are decoded by bit arithmetic (C0 80 -> U+0000,
 *        ED A0 80 -> U+D800) and re-encoded from that value. A 4-byte form above U+10FFFF
 *        becomes one U+FFFD (llama.cpp throws there).
 *   SPM: the raw bytes are tokenized; bytes that form no token come out as <0xXX> byte
 *        tokens, so decoding gives the input bytes back.
 *
 * Decoding: a token's piece is the raw bytes it stands for (byte-level BPE undone, "▁" ->
 * " ", <0xXX> -> the byte). Control and unknown tokens decode to nothing unless `special`
 * is asked for, then to their text; user-defined tokens always decode to their text.
 * kvs_tokenizer_decode concatenates pieces; for SPM it drops one leading space from the
 * first token after any leading BOS ids (the space encoding prefixed). It never applies
 * llama.cpp's clean-up of spaces before punctuation. Round trip: for every well-formed UTF-8
 * s, decode(encode(s, add_special either way, parse_special=false)) == s, for both kinds,
 * except that SPM decodes a U+2581 that was in s to a space.
 *
 * Thread-safety: a kvs_tokenizer is immutable after creation; any number of threads may
 * encode and decode with it at once. A kvs_detok belongs to one thread at a time.
 */
#ifndef KVS_TOKENIZER_H
#define KVS_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/gguf.h"

typedef struct kvs_tokenizer kvs_tokenizer;

/* Token types as stored in tokenizer.ggml.token_type. */
enum kvs_token_type {
    KVS_TOKEN_UNDEFINED = 0,
    KVS_TOKEN_NORMAL = 1,
    KVS_TOKEN_UNKNOWN = 2,
    KVS_TOKEN_CONTROL = 3,
    KVS_TOKEN_USER_DEFINED = 4,
    KVS_TOKEN_UNUSED = 5,
    KVS_TOKEN_BYTE = 6,
};

enum kvs_tokenizer_kind {
    KVS_TOKENIZER_BPE = 0, /* "gpt2" */
    KVS_TOKENIZER_SPM = 1, /* "llama" */
};

#define KVS_TOKEN_NONE (-1) /* an absent special token id */

/* Build a tokenizer from g's tokenizer.* metadata. Copies everything it needs: g may be
 * destroyed afterwards. Returns 0 and *out (caller frees with kvs_tokenizer_destroy), or
 * KVS_NOT_FOUND (no tokenizer.ggml.model / tokens / merges), KVS_UNSUPPORTED (unknown model
 * or pre-tokenizer name, named in err), KVS_TYPE_MISMATCH / KVS_BAD_FORMAT (a key of the
 * wrong type, arrays of different lengths, a special id out of range), KVS_NO_MEMORY; with
 * a one-line reason in err (if errlen > 0) and *out = NULL. */
int kvs_tokenizer_new_from_gguf(const kvs_gguf *g, kvs_tokenizer **out, char *err,
                                size_t errlen);

/* Free; accepts NULL and *tok == NULL; sets *tok to NULL. */
void kvs_tokenizer_destroy(kvs_tokenizer **tok);

/* Tokenize text[0..len) (any bytes; see the invalid UTF-8 rules above) into ids[0..cap).
 * add_special: prepend BOS / append EOS as the metadata says (kvs_tokenizer_add_bos/eos).
 * parse_special: turn special-token text into special ids (see above).
 * Returns 0 with *n_out ids written; KVS_TOO_LARGE with *n_out = the count needed when cap
 * is too small (ids then holds the first cap ids; ids may be NULL when cap is 0, to size a
 * buffer); KVS_NO_MEMORY. Allocates scratch
 * proportional to len per call; shares nothing mutable. */
int kvs_tokenizer_encode(const kvs_tokenizer *tok, const char *text, size_t len,
                         bool add_special, bool parse_special, int32_t *ids, size_t cap,
                         size_t *n_out);

/* The bytes token id decodes to, into buf[0..cap) (not NUL-terminated). special: render
 * control/unknown tokens as their text instead of nothing. Returns 0 with *n_out bytes;
 * KVS_TOO_LARGE with *n_out = the size needed; KVS_OUT_OF_RANGE for an id outside
 * [0, n_vocab). Never allocates. */
int kvs_tokenizer_token_to_piece(const kvs_tokenizer *tok, int32_t id, bool special, char *buf,
                                 size_t cap, size_t *n_out);

/* The piece itself, borrowed until kvs_tokenizer_destroy (NULL and *n = 0 for a bad id). */
const char *kvs_tokenizer_piece(const kvs_tokenizer *tok, int32_t id, bool special, size_t *n);

/* Longest piece of any token, in bytes (to size decode buffers). */
size_t kvs_tokenizer_max_piece(const kvs_tokenizer *tok);

/* Decode ids[0..n) into buf[0..cap) (see "Decoding" above). Returns 0 with *n_out bytes;
 * KVS_TOO_LARGE with *n_out = the size needed; KVS_OUT_OF_RANGE for a bad id. */
int kvs_tokenizer_decode(const kvs_tokenizer *tok, const int32_t *ids, size_t n, bool special,
                         char *buf, size_t cap, size_t *n_out);

/* ---- streaming decoding ---- */

typedef struct kvs_detok kvs_detok;

/* A streaming decoder over tok (which must outlive it). Emits the same bytes as
 * kvs_tokenizer_decode over all ids pushed, but only whole UTF-8 sequences: the unfinished
 * start of a multi-byte sequence is held back until the bytes that finish it arrive (bytes
 * that can never become well-formed are passed through at once). Returns NULL on OOM.
 * Caller frees with kvs_detok_destroy. */
kvs_detok *kvs_detok_new(const kvs_tokenizer *tok, bool special);
void kvs_detok_destroy(kvs_detok **d);

/* Feed one id. *out / *n_out: the bytes now complete, borrowed until the next call on d.
 * Returns 0 or KVS_OUT_OF_RANGE (bad id; d unchanged). Never allocates. */
int kvs_detok_push(kvs_detok *d, int32_t id, const char **out, size_t *n_out);

/* End of stream: hands out any held-back bytes (an unfinished sequence, as is) and resets
 * d for a new stream. */
void kvs_detok_finish(kvs_detok *d, const char **out, size_t *n_out);

/* ---- accessors ---- */

enum kvs_tokenizer_kind kvs_tokenizer_kind(const kvs_tokenizer *tok);
const char *kvs_tokenizer_kind_name(const kvs_tokenizer *tok); /* "bpe" or "spm" */
const char *kvs_tokenizer_pre(const kvs_tokenizer *tok); /* pre name; "" for SPM */
uint32_t kvs_tokenizer_n_vocab(const kvs_tokenizer *tok);
int32_t kvs_tokenizer_bos(const kvs_tokenizer *tok); /* KVS_TOKEN_NONE if absent */
int32_t kvs_tokenizer_eos(const kvs_tokenizer *tok);
int32_t kvs_tokenizer_eot(const kvs_tokenizer *tok);
bool kvs_tokenizer_add_bos(const kvs_tokenizer *tok);
bool kvs_tokenizer_add_eos(const kvs_tokenizer *tok);
/* True for end-of-generation ids: EOS, EOT, EOM and the texts llama.cpp treats as such
 * (<|im_end|>, <|eot_id|>, <|endoftext|>, <|end_of_text|>, </s> where special, ...). */
bool kvs_tokenizer_is_eog(const kvs_tokenizer *tok, int32_t id);
/* Token type of id (KVS_TOKEN_UNDEFINED for a bad id), as in the file. */
enum kvs_token_type kvs_tokenizer_token_type(const kvs_tokenizer *tok, int32_t id);
/* True if id is matched as special text (control, user-defined, unknown or promoted). */
bool kvs_tokenizer_is_special(const kvs_tokenizer *tok, int32_t id);
/* Token text as in the vocabulary (byte-level/▁ form), borrowed; NULL for a bad id. */
const char *kvs_tokenizer_token_text(const kvs_tokenizer *tok, int32_t id, size_t *len);
/* Id of the token whose vocabulary text is text[0..len), or KVS_TOKEN_NONE. */
int32_t kvs_tokenizer_find(const kvs_tokenizer *tok, const char *text, size_t len);
/* tokenizer.chat_template (NUL-terminated, borrowed) or NULL if the file has none. */
const char *kvs_tokenizer_chat_template(const kvs_tokenizer *tok);

#endif
