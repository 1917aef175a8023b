/* Model hyperparameters read from GGUF metadata, validated, plus a check that the tensors the
 * forward pass needs are present with the shapes the hyperparameters imply.
 *
 * Keys read (<arch> is general.architecture):
 *   <arch>.block_count, .embedding_length, .feed_forward_length, .context_length,
 *   .attention.head_count, .attention.head_count_kv (default head_count),
 *   .attention.key_length (default embedding_length / head_count), .attention.value_length,
 *   .attention.layer_norm_rms_epsilon, .rope.freq_base (default 10000),
 *   .rope.dimension_count (default head_dim), .rope.scaling.{type,factor,
 *   original_context_length,low_freq_factor,high_freq_factor}, .vocab_size,
 *   tokenizer.ggml.tokens, general.name, general.file_type.
 *
 * Thread-safety: pure functions over an immutable kvs_gguf; any thread.
 */
#ifndef KVS_HPARAMS_H
#define KVS_HPARAMS_H

#include "worker/gguf.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum kvs_arch {
    KVS_ARCH_LLAMA = 0, /* Llama 2/3, Mistral, SmolLM, TinyLlama */
    KVS_ARCH_QWEN2 = 1, /* llama + q/k/v biases, NEOX rope */
};

enum kvs_hp_rope_style {
    KVS_HP_ROPE_NORM = 0, /* rotate pairs (2i, 2i+1) (llama) */
    KVS_HP_ROPE_NEOX = 1, /* rotate pairs (i, i + rope_dim/2) (qwen2) */
};

enum kvs_rope_scaling {
    KVS_ROPE_SCALING_NONE = 0,
    KVS_ROPE_SCALING_LINEAR = 1, /* positions divided by factor */
    KVS_ROPE_SCALING_LLAMA3 = 2, /* per-frequency smooth interpolation (Llama 3.1) */
};

#define KVS_HPARAMS_MAX_LAYER 1024
#define KVS_HPARAMS_MAX_EMBD 65536
#define KVS_HPARAMS_MAX_VOCAB (1u << 22)
#define KVS_HPARAMS_MAX_FF (1u << 20)
#define KVS_HPARAMS_MAX_HEAD_DIM 1024
#define KVS_HPARAMS_MAX_CTX (1u << 27)

struct kvs_hparams {
    enum kvs_arch arch;
    char arch_name[16];   /* "llama", "qwen2" */
    char name[128];       /* general.name (truncated, NUL-terminated; "" if absent) */
    uint32_t n_layer;     /* transformer blocks */
    uint32_t n_embd;      /* residual stream width */
    uint32_t n_head;      /* query heads */
    uint32_t n_head_kv;   /* key/value heads; n_head % n_head_kv == 0 */
    uint32_t head_dim;    /* per head, even */
    uint32_t n_ff;        /* FFN hidden width */
    uint32_t n_vocab;     /* tokens */
    uint32_t n_ctx_train; /* positions the model was trained on */
    float rope_freq_base; /* theta */
    uint32_t rope_dim;    /* leading dims of each head that are rotated, even, <= head_dim */
    enum kvs_hp_rope_style rope_style;
    enum kvs_rope_scaling rope_scaling;
    float rope_scaling_factor;      /* LINEAR / LLAMA3 factor; 1 when NONE */
    float rope_scaling_low_freq;    /* LLAMA3 (default 1) */
    float rope_scaling_high_freq;   /* LLAMA3 (default 4) */
    uint32_t rope_scaling_orig_ctx; /* LLAMA3 original_context_length (default n_ctx_train) */
    bool has_rope_freqs;            /* a rope_freqs.weight tensor [rope_dim/2] holds the factors */
    float norm_eps;                 /* RMSNorm epsilon */
    bool tied_embeddings;           /* no output.weight: logits use token_embd.weight */
    bool has_qkv_bias;              /* blk.N.attn_{q,k,v}.bias exist */
    int32_t file_type;              /* general.file_type (llama_ftype), -1 if absent */
};

/* Fill *hp from g's metadata (and tensor directory, for n_vocab fallback, tied embeddings,
 * biases and rope_freqs). Returns 0, KVS_UNSUPPORTED (an architecture other than llama/qwen2,
 * or an unsupported rope scaling type), or KVS_BAD_FORMAT (a required key missing, of the
 * wrong type, or out of range); on error writes a one-line reason into err (errlen > 0). */
int kvs_hparams_from_gguf(const kvs_gguf *g, struct kvs_hparams *hp, char *err, size_t errlen);

/* Check that every tensor the forward pass reads exists with the shape hp implies:
 * token_embd, output_norm, output (optional), per layer the attention and FFN weights and
 * norms, the qwen2 q/k/v biases, and rope_freqs when present. Returns 0 or KVS_BAD_FORMAT
 * with err naming the first missing or misshapen tensor. */
int kvs_hparams_check_tensors(const kvs_gguf *g, const struct kvs_hparams *hp, char *err,
                              size_t errlen);

/* "llama" / "qwen2"; "norm" / "neox"; "none" / "linear" / "llama3". */
const char *kvs_arch_name(enum kvs_arch arch);
const char *kvs_hp_rope_style_name(enum kvs_hp_rope_style style);
const char *kvs_rope_scaling_name(enum kvs_rope_scaling scaling);

#endif
