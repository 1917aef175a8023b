/* A loaded model: hyperparameters plus every weight in the backend's memory.
 *
 * kvs_model_load maps a GGUF file, validates its metadata and tensor shapes
 * (worker/hparams.h), and hands each tensor to the backend (weights stay in their file
 * type: quantized blocks are not expanded to f32). Norm vectors and biases are f32.
 * The model keeps the GGUF mapping open (the tokenizer reads its metadata).
 *
 * Thread-safety: immutable after load.
 */
#ifndef KVS_MODEL_H
#define KVS_MODEL_H

#include <stdint.h>

#include "kernels/backend.h"
#include "worker/gguf.h"
#include "worker/hparams.h"

struct kvs_layer {
    float *attn_norm;          /* (n_embd) backend memory */
    struct kvs_weight wq;      /* (n_head * head_dim, n_embd) */
    struct kvs_weight wk;      /* (n_head_kv * head_dim, n_embd) */
    struct kvs_weight wv;      /* (n_head_kv * head_dim, n_embd) */
    float *bq, *bk, *bv;       /* qwen2 biases (out dims) or NULL */
    struct kvs_weight wo;      /* (n_embd, n_head * head_dim) */
    float *ffn_norm;           /* (n_embd) */
    struct kvs_weight w_gate;  /* (n_ff, n_embd) */
    struct kvs_weight w_up;    /* (n_ff, n_embd) */
    struct kvs_weight w_down;  /* (n_embd, n_ff) */
};

typedef struct kvs_model {
    struct kvs_hparams hp;     /* validated hyperparameters */
    kvs_gguf *gguf;            /* the mapped file (owned) */
    kvs_backend *backend;      /* borrowed; must outlive the model */
    struct kvs_weight tok_embd;/* (n_vocab, n_embd) embedding table, gathered by row */
    struct kvs_weight output;  /* (n_vocab, n_embd) LM head; same data as tok_embd if tied */
    int output_is_tied;        /* 1 when output reuses tok_embd's storage */
    float *output_norm;        /* (n_embd) */
    struct kvs_layer *layers;  /* (n_layer) */
    float *rope_factors;       /* host (rope_dim / 2) llama3 frequency divisors, or NULL */
    struct kvs_rope rope;      /* rope parameters for every layer */
    char path[1024];           /* file it came from */
} kvs_model;

/* Progress callback for long loads: done and total in bytes. May be NULL. */
typedef void (*kvs_model_progress_fn)(uint64_t done, uint64_t total, void *user);

/* Load path onto backend b. Returns 0 and *out (free with kvs_model_destroy), or a negative
 * status with a one-line reason in err: KVS_IO (cannot open), KVS_BAD_FORMAT (malformed
 * file), KVS_UNSUPPORTED (architecture or tensor type), KVS_NO_MEMORY. */
int kvs_model_load(const char *path, kvs_backend *b, kvs_model_progress_fn progress,
                   void *user, kvs_model **out, char *err, size_t errlen);

/* A model of a named shape with random bf16 weights and no file, for benchmarks and tests:
 * "synthetic:llama3-8b" (32 layers, 4096 wide, 32 heads, 8 KV heads, FFN 14336, vocab 128256,
 * Llama 3 rope scaling), "synthetic:llama3-1b" (16 layers, 2048, 32/8 heads, FFN 8192, tied
 * embeddings) and "synthetic:tiny" (2 layers, 256 wide, 4/2 heads, FFN 512, vocab 1024).
 * Weight element i of a tensor is a fixed hash of (tensor seed, i), so a synthetic model is
 * the same on every backend (the CUDA backend generates it on the device). No tokenizer
 * (m->gguf is NULL). 0 and *out (free with kvs_model_destroy), or KVS_NOT_FOUND (unknown
 * name), KVS_NO_MEMORY, KVS_DEVICE, with a reason in err. */
int kvs_model_synthetic(const char *name, kvs_backend *b, kvs_model **out, char *err,
                        size_t errlen);

/* True when name names a synthetic model ("synthetic:..."). */
int kvs_model_is_synthetic(const char *name);

void kvs_model_destroy(kvs_model **m);

/* Compute the file's SHA-256 as 64 lowercase hex digits + NUL into hex. 0 or KVS_IO. */
int kvs_model_sha256(const kvs_model *m, char hex[65]);

#endif
