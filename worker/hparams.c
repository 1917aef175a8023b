/* Model hyperparameters from GGUF metadata; every value range-checked before use. */
#include "worker/hparams.h"

#include "common/status.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static const char *const arch_names[] = {[KVS_ARCH_LLAMA] = "llama", [KVS_ARCH_QWEN2] = "qwen2"};
static const char *const rope_style_names[] = {
    [KVS_HP_ROPE_NORM] = "norm", [KVS_HP_ROPE_NEOX] = "neox"};
static const char *const rope_scaling_names[] = {[KVS_ROPE_SCALING_NONE] = "none",
                                                 [KVS_ROPE_SCALING_LINEAR] = "linear",
                                                 [KVS_ROPE_SCALING_LLAMA3] = "llama3"};

const char *kvs_arch_name(enum kvs_arch arch)
{
    return (unsigned)arch < 2 ? arch_names[arch] : "unknown";
}

const char *kvs_hp_rope_style_name(enum kvs_hp_rope_style style)
{
    return (unsigned)style < 2 ? rope_style_names[style] : "unknown";
}

const char *kvs_rope_scaling_name(enum kvs_rope_scaling scaling)
{
    return (unsigned)scaling < 3 ? rope_scaling_names[scaling] : "unknown";
}

/* A bounded, printable copy of a metadata string. */
static void copy_str(char *dst, size_t n, kvs_gguf_str s)
{
    size_t k = 0;
    for (uint64_t i = 0; i < s.len && k + 1 < n; i++) {
        unsigned char c = (unsigned char)s.ptr[i];
        dst[k++] = (c >= 0x20 && c != 0x7f) ? (char)c : '?';
    }
    dst[k] = '\0';
}

/* Context for reading "<arch>.<suffix>" keys with one error path. */
struct hp_reader {
    const kvs_gguf *g;
    const char *arch;
    char *err;
    size_t errlen;
};

static const char *arch_key(const struct hp_reader *r, const char *suffix, char *buf, size_t n)
{
    snprintf(buf, n, "%s.%s", r->arch, suffix);
    return buf;
}

/* Read <arch>.<suffix> as u32 in [lo, hi]; when absent use *def (or fail if def is NULL). */
static int get_u32(const struct hp_reader *r, const char *suffix, const uint32_t *def, uint32_t lo,
                   uint32_t hi, uint32_t *out)
{
    char key[128];
    arch_key(r, suffix, key, sizeof key);
    uint32_t v;
    int rc = kvs_gguf_get_u32(r->g, key, &v);
    if (rc == KVS_NOT_FOUND) {
        if (def == NULL) {
            kvs_errf(r->err, r->errlen, "missing key '%s'", key);
            return KVS_BAD_FORMAT;
        }
        *out = *def;
        return KVS_OK;
    }
    if (rc < 0) {
        kvs_errf(r->err, r->errlen, "key '%s' is not an unsigned 32-bit integer", key);
        return KVS_BAD_FORMAT;
    }
    if (v < lo || v > hi) {
        kvs_errf(r->err, r->errlen, "%s %u out of range (%u..%u)", key, v, lo, hi);
        return KVS_BAD_FORMAT;
    }
    *out = v;
    return KVS_OK;
}

/* Read <arch>.<suffix> as a finite float in (lo, hi]; absent -> *def or error. */
static int get_f32(const struct hp_reader *r, const char *suffix, const float *def, float lo,
                   float hi, float *out)
{
    char key[128];
    arch_key(r, suffix, key, sizeof key);
    float v;
    int rc = kvs_gguf_get_f32(r->g, key, &v);
    if (rc == KVS_NOT_FOUND) {
        if (def == NULL) {
            kvs_errf(r->err, r->errlen, "missing key '%s'", key);
            return KVS_BAD_FORMAT;
        }
        *out = *def;
        return KVS_OK;
    }
    if (rc < 0) {
        kvs_errf(r->err, r->errlen, "key '%s' is not a number", key);
        return KVS_BAD_FORMAT;
    }
    if (!isfinite(v) || !(v > lo) || !(v <= hi)) {
        kvs_errf(r->err, r->errlen, "%s %g out of range (%g, %g]", key, (double)v, (double)lo,
               (double)hi);
        return KVS_BAD_FORMAT;
    }
    *out = v;
    return KVS_OK;
}

static int read_rope_scaling(const struct hp_reader *r, struct kvs_hparams *hp)
{
    char key[128];
    kvs_gguf_str s;
    const float one = 1.0f, four = 4.0f;
    hp->rope_scaling = KVS_ROPE_SCALING_NONE;
    hp->rope_scaling_factor = 1.0f;
    hp->rope_scaling_low_freq = 1.0f;
    hp->rope_scaling_high_freq = 4.0f;
    hp->rope_scaling_orig_ctx = hp->n_ctx_train;
    int rc = kvs_gguf_get_str(r->g, arch_key(r, "rope.scaling.type", key, sizeof key), &s);
    if (rc == KVS_TYPE_MISMATCH) {
        kvs_errf(r->err, r->errlen, "key '%s' is not a string", key);
        return KVS_BAD_FORMAT;
    }
    if (rc == KVS_NOT_FOUND) {
        return KVS_OK;
    }
    char type[32];
    copy_str(type, sizeof type, s);
    if (s.len == 4 && memcmp(s.ptr, "none", 4) == 0) {
        return KVS_OK;
    }
    if (s.len == 6 && memcmp(s.ptr, "linear", 6) == 0) {
        hp->rope_scaling = KVS_ROPE_SCALING_LINEAR;
    } else if (s.len == 6 && memcmp(s.ptr, "llama3", 6) == 0) {
        hp->rope_scaling = KVS_ROPE_SCALING_LLAMA3;
    } else {
        kvs_errf(r->err, r->errlen,
               "rope scaling type '%s' is not supported (supported: none, linear, llama3)", type);
        return KVS_UNSUPPORTED;
    }
    KVS_TRY(get_f32(r, "rope.scaling.factor", &one, 0.0f, 1024.0f, &hp->rope_scaling_factor));
    if (hp->rope_scaling == KVS_ROPE_SCALING_LLAMA3) {
        uint32_t ctx = hp->n_ctx_train;
        KVS_TRY(get_f32(r, "rope.scaling.low_freq_factor", &one, 0.0f, 1024.0f,
                        &hp->rope_scaling_low_freq));
        KVS_TRY(get_f32(r, "rope.scaling.high_freq_factor", &four, 0.0f, 1024.0f,
                        &hp->rope_scaling_high_freq));
        KVS_TRY(get_u32(r, "rope.scaling.original_context_length", &ctx, 1, KVS_HPARAMS_MAX_CTX,
                        &hp->rope_scaling_orig_ctx));
        if (!(hp->rope_scaling_high_freq > hp->rope_scaling_low_freq)) {
            kvs_errf(r->err, r->errlen,
                   "rope scaling: high_freq_factor %g must exceed low_freq_factor %g",
                   (double)hp->rope_scaling_high_freq, (double)hp->rope_scaling_low_freq);
            return KVS_BAD_FORMAT;
        }
    }
    return KVS_OK;
}

static int read_vocab_size(const struct hp_reader *r, struct kvs_hparams *hp)
{
    kvs_gguf_arr tokens;
    int rc = kvs_gguf_get_arr(r->g, "tokenizer.ggml.tokens", &tokens);
    if (rc == 0) {
        if (tokens.type != KVS_GGUF_STRING) {
            kvs_errf(r->err, r->errlen, "tokenizer.ggml.tokens is an array of %s, not strings",
                   kvs_gguf_type_name(tokens.type));
            return KVS_BAD_FORMAT;
        }
        if (tokens.n == 0 || tokens.n > KVS_HPARAMS_MAX_VOCAB) {
            kvs_errf(r->err, r->errlen, "tokenizer.ggml.tokens has %llu tokens (allowed 1..%u)",
                   (unsigned long long)tokens.n, KVS_HPARAMS_MAX_VOCAB);
            return KVS_BAD_FORMAT;
        }
        hp->n_vocab = (uint32_t)tokens.n;
        return KVS_OK;
    }
    if (rc == KVS_TYPE_MISMATCH) {
        kvs_errf(r->err, r->errlen, "tokenizer.ggml.tokens is not an array");
        return KVS_BAD_FORMAT;
    }
    char key[128];
    if (kvs_gguf_find_key(r->g, arch_key(r, "vocab_size", key, sizeof key)) >= 0) {
        return get_u32(r, "vocab_size", NULL, 1, KVS_HPARAMS_MAX_VOCAB, &hp->n_vocab);
    }
    const kvs_gguf_tensor *t = kvs_gguf_find_tensor(r->g, "token_embd.weight");
    if (t == NULL) {
        kvs_errf(r->err, r->errlen,
               "cannot tell the vocabulary size: no tokenizer.ggml.tokens, %s or "
               "token_embd.weight",
               key);
        return KVS_BAD_FORMAT;
    }
    if (t->ne[1] > KVS_HPARAMS_MAX_VOCAB) {
        kvs_errf(r->err, r->errlen, "token_embd.weight has %llu rows (allowed 1..%u)",
               (unsigned long long)t->ne[1], KVS_HPARAMS_MAX_VOCAB);
        return KVS_BAD_FORMAT;
    }
    hp->n_vocab = (uint32_t)t->ne[1];
    return KVS_OK;
}

int kvs_hparams_from_gguf(const kvs_gguf *g, struct kvs_hparams *hp, char *err, size_t errlen)
{
    memset(hp, 0, sizeof *hp);
    kvs_gguf_str s;
    int rc = kvs_gguf_get_str(g, "general.architecture", &s);
    if (rc < 0) {
        kvs_errf(err, errlen,
               rc == KVS_NOT_FOUND ? "missing key 'general.architecture'"
                                   : "general.architecture is not a string");
        return KVS_BAD_FORMAT;
    }
    char arch[64];
    copy_str(arch, sizeof arch, s);
    if (s.len == 5 && memcmp(s.ptr, "llama", 5) == 0) {
        hp->arch = KVS_ARCH_LLAMA;
        hp->rope_style = KVS_HP_ROPE_NORM;
    } else if (s.len == 5 && memcmp(s.ptr, "qwen2", 5) == 0) {
        hp->arch = KVS_ARCH_QWEN2;
        hp->rope_style = KVS_HP_ROPE_NEOX;
    } else {
        kvs_errf(err, errlen, "unsupported architecture '%s' (supported: llama, qwen2)", arch);
        return KVS_UNSUPPORTED;
    }
    snprintf(hp->arch_name, sizeof hp->arch_name, "%s", kvs_arch_name(hp->arch));
    if (kvs_gguf_get_str(g, "general.name", &s) == 0) {
        copy_str(hp->name, sizeof hp->name, s);
    }
    uint32_t ft;
    hp->file_type =
        kvs_gguf_get_u32(g, "general.file_type", &ft) == 0 && ft <= INT32_MAX ? (int32_t)ft : -1;

    struct hp_reader r = {.g = g, .arch = hp->arch_name, .err = err, .errlen = errlen};
    KVS_TRY(get_u32(&r, "block_count", NULL, 1, KVS_HPARAMS_MAX_LAYER, &hp->n_layer));
    KVS_TRY(get_u32(&r, "embedding_length", NULL, 1, KVS_HPARAMS_MAX_EMBD, &hp->n_embd));
    KVS_TRY(get_u32(&r, "feed_forward_length", NULL, 1, KVS_HPARAMS_MAX_FF, &hp->n_ff));
    KVS_TRY(get_u32(&r, "context_length", NULL, 1, KVS_HPARAMS_MAX_CTX, &hp->n_ctx_train));
    KVS_TRY(get_u32(&r, "attention.head_count", NULL, 1, hp->n_embd, &hp->n_head));
    KVS_TRY(get_u32(&r, "attention.head_count_kv", &hp->n_head, 1, hp->n_head, &hp->n_head_kv));
    if (hp->n_head % hp->n_head_kv != 0) {
        kvs_errf(err, errlen, "%s.attention.head_count %u is not a multiple of head_count_kv %u",
               hp->arch_name, hp->n_head, hp->n_head_kv);
        return KVS_BAD_FORMAT;
    }
    char key[128];
    if (kvs_gguf_find_key(g, arch_key(&r, "attention.key_length", key, sizeof key)) >= 0) {
        KVS_TRY(
            get_u32(&r, "attention.key_length", NULL, 2, KVS_HPARAMS_MAX_HEAD_DIM, &hp->head_dim));
    } else {
        if (hp->n_embd % hp->n_head != 0) {
            kvs_errf(err, errlen, "%s.embedding_length %u is not a multiple of head_count %u",
                   hp->arch_name, hp->n_embd, hp->n_head);
            return KVS_BAD_FORMAT;
        }
        hp->head_dim = hp->n_embd / hp->n_head;
    }
    if (hp->head_dim % 2 != 0 || hp->head_dim > KVS_HPARAMS_MAX_HEAD_DIM) {
        kvs_errf(err, errlen, "head dimension %u must be even and at most %u", hp->head_dim,
               KVS_HPARAMS_MAX_HEAD_DIM);
        return KVS_BAD_FORMAT;
    }
    uint32_t vlen;
    KVS_TRY(
        get_u32(&r, "attention.value_length", &hp->head_dim, 1, KVS_HPARAMS_MAX_HEAD_DIM, &vlen));
    if (vlen != hp->head_dim) {
        kvs_errf(err, errlen, "value head dimension %u differs from key head dimension %u", vlen,
               hp->head_dim);
        return KVS_UNSUPPORTED;
    }
    KVS_TRY(get_u32(&r, "rope.dimension_count", &hp->head_dim, 2, hp->head_dim, &hp->rope_dim));
    if (hp->rope_dim % 2 != 0) {
        kvs_errf(err, errlen, "%s.rope.dimension_count %u is odd", hp->arch_name, hp->rope_dim);
        return KVS_BAD_FORMAT;
    }
    const float theta = 10000.0f;
    KVS_TRY(get_f32(&r, "rope.freq_base", &theta, 0.0f, 1e12f, &hp->rope_freq_base));
    KVS_TRY(get_f32(&r, "attention.layer_norm_rms_epsilon", NULL, 0.0f, 1.0f, &hp->norm_eps));
    KVS_TRY(read_rope_scaling(&r, hp));
    KVS_TRY(read_vocab_size(&r, hp));

    hp->tied_embeddings = kvs_gguf_find_tensor(g, "output.weight") == NULL;
    hp->has_qkv_bias = kvs_gguf_find_tensor(g, "blk.0.attn_q.bias") != NULL;
    hp->has_rope_freqs = kvs_gguf_find_tensor(g, "rope_freqs.weight") != NULL;
    return KVS_OK;
}

/* Require tensor `name` with shape [ne0, ne1] (ne1 = 1 for vectors; trailing dims 1). */
static int expect(const kvs_gguf *g, const char *name, uint64_t ne0, uint64_t ne1, char *err,
                  size_t errlen)
{
    const kvs_gguf_tensor *t = kvs_gguf_find_tensor(g, name);
    if (t == NULL) {
        kvs_errf(err, errlen, "missing tensor '%s'", name);
        return KVS_BAD_FORMAT;
    }
    if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != 1 || t->ne[3] != 1) {
        if (ne1 == 1) {
            kvs_errf(err, errlen, "tensor '%s' has shape [%llu, %llu, %llu, %llu], expected [%llu]",
                   name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                   (unsigned long long)t->ne[2], (unsigned long long)t->ne[3],
                   (unsigned long long)ne0);
        } else {
            kvs_errf(err, errlen,
                   "tensor '%s' has shape [%llu, %llu, %llu, %llu], expected [%llu, %llu]", name,
                   (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                   (unsigned long long)t->ne[2], (unsigned long long)t->ne[3],
                   (unsigned long long)ne0, (unsigned long long)ne1);
        }
        return KVS_BAD_FORMAT;
    }
    return KVS_OK;
}

int kvs_hparams_check_tensors(const kvs_gguf *g, const struct kvs_hparams *hp, char *err,
                              size_t errlen)
{
    const uint64_t q_dim = (uint64_t)hp->n_head * hp->head_dim;     /* query width */
    const uint64_t kv_dim = (uint64_t)hp->n_head_kv * hp->head_dim; /* key/value width */
    KVS_TRY(expect(g, "token_embd.weight", hp->n_embd, hp->n_vocab, err, errlen));
    KVS_TRY(expect(g, "output_norm.weight", hp->n_embd, 1, err, errlen));
    if (kvs_gguf_find_tensor(g, "output.weight") != NULL) {
        KVS_TRY(expect(g, "output.weight", hp->n_embd, hp->n_vocab, err, errlen));
    }
    if (kvs_gguf_find_tensor(g, "rope_freqs.weight") != NULL) {
        KVS_TRY(expect(g, "rope_freqs.weight", hp->rope_dim / 2, 1, err, errlen));
    }
    struct {
        const char *suffix;
        uint64_t ne0, ne1;
    } const per_layer[] = {
        {"attn_norm.weight", hp->n_embd, 1},       {"attn_q.weight", hp->n_embd, q_dim},
        {"attn_k.weight", hp->n_embd, kv_dim},     {"attn_v.weight", hp->n_embd, kv_dim},
        {"attn_output.weight", q_dim, hp->n_embd}, {"ffn_norm.weight", hp->n_embd, 1},
        {"ffn_gate.weight", hp->n_embd, hp->n_ff}, {"ffn_up.weight", hp->n_embd, hp->n_ff},
        {"ffn_down.weight", hp->n_ff, hp->n_embd},
    };
    struct {
        const char *suffix;
        uint64_t ne0;
    } const biases[] = {{"attn_q.bias", q_dim}, {"attn_k.bias", kv_dim}, {"attn_v.bias", kv_dim}};
    bool need_bias = hp->arch == KVS_ARCH_QWEN2 || hp->has_qkv_bias;
    char name[96];
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        for (size_t i = 0; i < sizeof per_layer / sizeof per_layer[0]; i++) {
            snprintf(name, sizeof name, "blk.%u.%s", l, per_layer[i].suffix);
            KVS_TRY(expect(g, name, per_layer[i].ne0, per_layer[i].ne1, err, errlen));
        }
        for (size_t i = 0; need_bias && i < sizeof biases / sizeof biases[0]; i++) {
            snprintf(name, sizeof name, "blk.%u.%s", l, biases[i].suffix);
            KVS_TRY(expect(g, name, biases[i].ne0, 1, err, errlen));
        }
    }
    return KVS_OK;
}
