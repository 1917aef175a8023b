/* The engine: one model, its tokenizer, a KV pool and a forward pass, on one backend.
 *
 * This is the object kvs-worker and the `kvstream` CLI both build on. kvs_engine_generate
 * is the one-shot path (prefill a prompt in a fresh seq, decode, drop the seq) used by
 * `kvstream generate` and by stateless mode; sessions fork seqs of the same pool.
 *
 * Thread-safety: one thread drives an engine.
 */
#ifndef KVS_ENGINE_H
#define KVS_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/backend.h"
#include "worker/forward.h"
#include "worker/kvpool.h"
#include "worker/model.h"
#include "worker/sampler.h"
#include "worker/tokenizer.h"

struct kvs_engine_opts {
    const char *model_path;   /* GGUF file */
    const char *device;       /* "cpu" (default) */
    int32_t n_threads;        /* CPU threads; 0 = all online CPUs */
    int64_t n_cells;          /* KV capacity in cells; 0 = the model's context length */
    uint32_t kv_dtype;        /* KVS_DTYPE_F16 (default when 0 is passed: see below) or F32 */
    bool kv_f32;              /* store KV in f32 (exact parity tests) instead of f16 */
    int32_t max_batch_rows;   /* rows per forward call; 0 = 512 */
    kvs_model_progress_fn progress; /* load progress, or NULL */
    void *progress_user;
};

typedef struct kvs_engine {
    kvs_backend *backend;     /* owned */
    kvs_model *model;         /* owned */
    kvs_tokenizer *tok;       /* owned */
    kvs_pool *pool;           /* owned */
    kvs_forward *fw;          /* owned */
    kvs_batch batch;          /* scratch batch of max_batch_rows rows */
    float *logits;            /* host (max_batch_rows, n_vocab) scratch */
    int32_t max_batch_rows;
    int64_t n_ctx;            /* cells one sequence may use: opts.n_cells or the model's context */
} kvs_engine;

/* Open an engine. 0 and *out (free with kvs_engine_destroy), or a negative status with a
 * one-line reason in err (unknown device, model load errors, KV that does not fit). */
int kvs_engine_open(const struct kvs_engine_opts *opts, kvs_engine **out, char *err,
                    size_t errlen);
void kvs_engine_destroy(kvs_engine **e);

/* Called for each generated token with its newly complete text (may be empty). Return
 * false to stop generation. */
typedef bool (*kvs_token_fn)(int32_t token, const char *text, size_t len, void *user);

struct kvs_gen_result {
    int32_t *tokens;          /* generated ids, without the stop token; caller frees */
    int32_t n_tokens;
    char *text;               /* the text streamed to cb, NUL-terminated; caller frees */
    size_t text_len;          /* bytes of text (a stop string and what follows excluded) */
    bool stopped_eog;         /* ended on an end-of-generation token */
    bool stopped_string;      /* ended on a stop string */
    double prefill_s;         /* seconds for the prompt (up to the first token's logits) */
    double decode_s;          /* seconds for the remaining tokens */
};

struct kvs_gen_opts {
    struct kvs_sampling sampling; /* how to pick tokens (kvs_sampling_default(): greedy) */
    int32_t max_tokens;           /* tokens to generate at most, >= 0 */
    const char *const *stops;     /* stop strings (borrowed), or NULL */
    int n_stops;                  /* entries of stops */
    bool ignore_eog;              /* keep going past end-of-generation tokens (benchmarks) */
};

/* Prefill prompt[0..n_prompt) into a fresh seq, then sample up to max_tokens tokens.
 * Stops on an end-of-generation token, a stop string, max_tokens, or when cb returns false.
 * Text is streamed through cb (may be NULL). Returns 0, KVS_INVALID_ARGUMENT (empty prompt,
 * max_tokens < 0, bad sampling), KVS_CONTEXT_FULL (prompt + max_tokens past the model's
 * context or the pool), or a backend error. The seq is released in every case. */
int kvs_engine_generate(kvs_engine *e, const int32_t *prompt, int32_t n_prompt,
                        const struct kvs_gen_opts *go, kvs_token_fn cb, void *user,
                        struct kvs_gen_result *res);

/* As kvs_engine_generate, but into seq, which already holds a context (a fork of a
 * session's seq, say): the prompt is prefilled after its cells and the answer decoded after
 * that. seq keeps every cell written (the caller releases or trims it). KVS_CAPACITY when
 * the pool cannot hold the new cells. */
int kvs_engine_generate_on(kvs_engine *e, kvs_seq *seq, const int32_t *prompt,
                           int32_t n_prompt, const struct kvs_gen_opts *go, kvs_token_fn cb,
                           void *user, struct kvs_gen_result *res);

/* Prefill tokens into seq (reserving, chunking by max_batch_rows, committing). When
 * logits_all is non-NULL it receives every position's logits ((n, n_vocab) host floats);
 * when last_logits is non-NULL it receives the last position's logits (n_vocab). */
int kvs_engine_prefill(kvs_engine *e, kvs_seq *seq, const int32_t *tokens, int32_t n,
                       float *logits_all, float *last_logits);

/* Monotonic seconds. */
double kvs_now(void);

#endif
