/* Private layout of kvs_tokenizer, shared by tokenizer.c (loading, partitioning, decoding),
 * tokenizer_bpe.c and tokenizer_spm.c. Not part of the public API. */
#ifndef KVS_TOKENIZER_IMPL_H
#define KVS_TOKENIZER_IMPL_H

#include "worker/tokenizer.h"

/* Token attributes, llama.cpp's bit values (types become attributes, then promotions). */
enum tok_attr {
    TOK_ATTR_UNKNOWN = 1 << 0,
    TOK_ATTR_UNUSED = 1 << 1,
    TOK_ATTR_NORMAL = 1 << 2,
    TOK_ATTR_CONTROL = 1 << 3,
    TOK_ATTR_USER_DEFINED = 1 << 4,
    TOK_ATTR_BYTE = 1 << 5,
};

enum tok_pre {
    TOK_PRE_NONE = 0, /* SPM */
    TOK_PRE_GPT2,     /* "gpt-2": the GPT-2 regex */
    TOK_PRE_DEFAULT,  /* "default": punctuation runs, GPT-2 regex, digit runs, digit triples */
    TOK_PRE_SMOLLM,   /* "smollm": each digit alone, then the GPT-2 regex */
    TOK_PRE_LLAMA3,   /* "llama-bpe": Llama 3 regex, digits in groups of up to 3 */
    TOK_PRE_QWEN2,    /* "qwen2": Llama 3 regex with single digits */
};

struct tok_entry {
    uint32_t text_off;  /* into text arena */
    uint32_t text_len;  /* bytes */
    uint32_t piece_off; /* into piece arena: the bytes the token decodes to with special */
    uint32_t piece_len; /* bytes */
    float score;        /* SPM merge score */
    uint8_t type;       /* enum kvs_token_type as in the file */
    uint8_t attr;       /* enum tok_attr bits */
    bool eog;           /* end of generation */
};

/* Open-addressing hash set of indices; slot value 0 = empty, else index + 1. */
struct tok_hash {
    uint32_t *slots; /* n_slots entries */
    uint64_t mask;   /* n_slots - 1 (power of two) */
};

struct kvs_tokenizer {
    enum kvs_tokenizer_kind kind;
    enum tok_pre pre;
    char pre_name[64];

    uint32_t n_vocab;
    struct tok_entry *tokens; /* n_vocab */
    char *text;               /* token texts, concatenated */
    char *pieces;             /* decoded pieces, concatenated */
    size_t max_piece;         /* bytes */
    struct tok_hash by_text;  /* token text -> id (the last id wins for duplicate texts) */

    /* BPE merges: "left right" strings; rank = index. */
    uint32_t n_merges;
    uint32_t *merge_off;    /* n_merges: offset into merge_text */
    uint32_t *merge_len;    /* n_merges: bytes of the whole "left right" string */
    char *merge_text;       /* concatenated merge strings */
    struct tok_hash merges; /* "left right" -> rank (the first rank wins) */
    bool ignore_merges;     /* a pre-token that is a whole token is taken as is (Llama 3) */

    int32_t *special;   /* ids matched in the input before tokenizing, longest text first */
    uint32_t n_special; /* entries */

    int32_t bos, eos, eot, eom, unk, pad; /* KVS_TOKEN_NONE if absent */
    bool add_bos, add_eos;
    bool add_space_prefix; /* SPM: prefix a space to text runs at the start / after specials */
    int32_t byte_token[256]; /* SPM: id of <0xXX> (or the 1-byte text), KVS_TOKEN_NONE */

    char *chat_template; /* NUL-terminated copy, or NULL */
};

/* FNV-1a over bytes, continuing from h. */
static inline uint64_t tok_fnv(uint64_t h, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)s[i];
        h *= 0x100000001b3ull;
    }
    return h;
}
#define TOK_FNV_INIT 0xcbf29ce484222325ull

/* Id of the token whose text is s[0..n), or KVS_TOKEN_NONE. */
int32_t tok_lookup(const kvs_tokenizer *tok, const char *s, size_t n);

/* Growable int32 output: ids beyond cap are counted, not stored. */
struct tok_out {
    int32_t *ids; /* caller's buffer */
    size_t cap;   /* its capacity */
    size_t n;     /* ids produced so far */
};
static inline void tok_out_push(struct tok_out *o, int32_t id)
{
    if (o->n < o->cap) {
        o->ids[o->n] = id;
    }
    o->n++;
}

/* Per-call scratch, grown on demand, freed at the end of kvs_tokenizer_encode. */
struct tok_scratch {
    uint32_t *cpts;
    size_t cap_cpts; /* bytes */
    uint16_t *flags;
    size_t cap_flags; /* bytes */
    char *word;
    size_t cap_word;
    void *sym;
    size_t cap_sym; /* bytes */
    void *heap;
    size_t cap_heap; /* bytes */
};

/* Grow *p to hold at least need bytes; 0 or KVS_NO_MEMORY. */
int tok_grow(void **p, size_t *cap, size_t need);

/* Tokenize one run of text with no special tokens in it. */
int tok_bpe_encode(const kvs_tokenizer *tok, struct tok_scratch *s, const char *text, size_t len,
                   struct tok_out *out);
int tok_spm_encode(const kvs_tokenizer *tok, struct tok_scratch *s, const char *text, size_t len,
                   struct tok_out *out);

#endif
