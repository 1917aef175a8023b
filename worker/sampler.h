/* Token sampling and stop strings.
 *
 * A kvs_sampler turns one row of logits into a token id. It owns all of its scratch (sized
 * by n_vocab at kvs_sampler_new), so kvs_sampler_sample and kvs_sampler_accept never
 * allocate. One sampler serves one generation stream (a query or a flash-query fork); it
 * is not thread-safe: one thread (the scheduler) uses it at a time.
 *
 * Chain (llama.cpp's common default order, minus the samplers kvstream does not expose):
 *
 *   penalties -> top_k -> top_p -> min_p -> temperature -> dist
 *
 *   penalties    repeat_penalty on every distinct token of the last repeat_last_n accepted
 *                tokens: logit > 0 ? logit / penalty : logit * penalty (once per token,
 *                however often it occurs). Off when repeat_penalty == 1 or repeat_last_n == 0.
 *   top_k        keep the k largest logits (ties: lower token id first). Off when 0.
 *   top_p        softmax over what is left; keep the smallest prefix (largest first) whose
 *                probabilities sum to >= top_p. Off when 1.
 *   min_p        keep tokens with prob >= min_p * max prob (logit >= max + log(min_p)).
 *                Off when 0.
 *   temperature  logits / temperature.
 *   dist         softmax, then draw one token with the sampler's own PRNG.
 *
 * temperature == 0 is greedy: the argmax of the (penalized) logits, lowest token id on ties;
 * top_k/top_p/min_p are then irrelevant and no random number is drawn.
 *
 * Logits: NaN is treated as -inf. A token at -inf is never drawn (unless every logit is -inf
 * or NaN, where the result is token 0, the greedy answer over an all-equal row).
 *
 * Cost per token, n_vocab 49152, one core: greedy 0.15 ms; top_k 40 + top_p 0.9 0.3 ms; top_p
 * alone 3 ms (logits bucketed, only the bucket where the mass crosses top_p is sorted);
 * plain temperature 0.8 ms.
 *
 * Reproducibility: the PRNG is xoshiro256** seeded by splitmix64(seed); candidate order is
 * a total order (logit descending, then id ascending), so the same seed, parameters,
 * history and logits give the same tokens on every run. Probabilities are accumulated in
 * double with exp() from libm; two machines agree unless their libm exp differs in the last
 * bit exactly where a draw falls on a boundary.
 */
#ifndef KVS_SAMPLER_H
#define KVS_SAMPLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Upper bound on repeat_last_n (the history ring buffer is allocated at kvs_sampler_new). */
#define KVS_SAMPLING_REPEAT_LAST_N_MAX 65536

/* Sampling parameters: a plain value, copied by kvs_sampler_new. */
struct kvs_sampling {
    float temperature;     /* >= 0; 0 = greedy */
    int32_t top_k;         /* >= 0; 0 = off */
    float top_p;           /* (0, 1]; 1 = off */
    float min_p;           /* [0, 1); 0 = off */
    float repeat_penalty;  /* > 0; 1 = off */
    int32_t repeat_last_n; /* tokens of history, [0, KVS_SAMPLING_REPEAT_LAST_N_MAX]; 0 = off */
    uint64_t seed;         /* PRNG seed (any value) */
};

/* Greedy defaults: temperature 0, top_k 0, top_p 1, min_p 0, repeat_penalty 1,
 * repeat_last_n 64, seed 0. */
struct kvs_sampling kvs_sampling_default(void);

/* Check user-supplied parameters. Returns 0, or KVS_INVALID_ARGUMENT with a one-line reason
 * naming the field, its value and the allowed range written to err (NUL-terminated,
 * truncated to errlen; err may be NULL when errlen is 0). Any thread. */
int kvs_sampling_validate(const struct kvs_sampling *p, char *err, size_t errlen);

typedef struct kvs_sampler kvs_sampler;

/* Create a sampler for rows of n_vocab logits, seeded with p->seed and an empty history.
 * Returns 0 and sets *out (caller frees with kvs_sampler_destroy), KVS_INVALID_ARGUMENT when
 * p does not validate or n_vocab < 1 (the reason is logged), or KVS_NO_MEMORY. *out is NULL
 * on error. */
int kvs_sampler_new(const struct kvs_sampling *p, int32_t n_vocab, kvs_sampler **out);

/* Free the sampler and set *s to NULL. Accepts NULL and *s == NULL. */
void kvs_sampler_destroy(kvs_sampler **s);

/* Forget the history and reseed the PRNG with the parameters' seed: the sampler then
 * behaves exactly as a fresh one. */
void kvs_sampler_reset(kvs_sampler *s);

/* Record a token in the repetition history (a ring of the last repeat_last_n tokens).
 * Call it for every generated token; whether the prompt's tokens count too is the caller's
 * choice (llama.cpp's CLI feeds them). token must be in [0, n_vocab) (asserted). */
void kvs_sampler_accept(kvs_sampler *s, int32_t token);

/* Pick the next token from logits (host memory, n_vocab floats; not modified). Does not
 * accept the token: call kvs_sampler_accept with it. Never allocates. Returns a token id in
 * [0, n_vocab). */
int32_t kvs_sampler_sample(kvs_sampler *s, const float *logits);

/* ---- stop strings ---------------------------------------------------------------------- */

#define KVS_STOP_MAX_STRINGS 16 /* stop strings per matcher */
#define KVS_STOP_MAX_LEN 256    /* bytes per stop string */

typedef struct kvs_stop kvs_stop;

/* Check user-supplied stop strings: n in [0, KVS_STOP_MAX_STRINGS], each non-NULL with
 * length in [1, KVS_STOP_MAX_LEN]. Returns 0 or KVS_INVALID_ARGUMENT with a one-line reason
 * in err (as kvs_sampling_validate). */
int kvs_stop_validate(const char *const *stops, int n, char *err, size_t errlen);

/* Create a matcher for n stop strings (copied; the caller keeps ownership of stops).
 * Returns NULL when the strings do not validate (reason logged) or on allocation failure.
 * Caller frees with kvs_stop_destroy. n == 0 gives a matcher that never matches. */
kvs_stop *kvs_stop_new(const char *const *stops, int n);

/* Free the matcher and set *s to NULL. Accepts NULL and *s == NULL. */
void kvs_stop_destroy(kvs_stop **s);

/* Start a new stream. */
void kvs_stop_reset(kvs_stop *s);

/* Feed the next len bytes of the generated text (byte pieces may split UTF-8 characters and
 * stop strings anywhere). Sets *emit_len to how many bytes of the whole stream fed since
 * kvs_stop_new / kvs_stop_reset, counted from its first byte, are final and safe to emit:
 * the bytes after it are held back because they could still begin a stop string. It never
 * decreases; the caller keeps the generated text and emits text[emitted, *emit_len).
 *
 * Returns true when a stop string completed: *emit_len is then the offset where it begins
 * (the stop string and anything after it are not emitted) and the stream is over: further
 * feeds change nothing and return true again. The stream stops at the first byte where any
 * stop string completes; if several complete there, the longest one wins. When generation
 * ends without a match (EOS, length limit), all fed bytes are safe. Never allocates. */
bool kvs_stop_feed(kvs_stop *s, const char *bytes, size_t len, size_t *emit_len);

#endif
