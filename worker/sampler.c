/* Token sampling (penalties -> top_k -> top_p -> min_p -> temperature -> dist) and the
 * stop-string matcher. See sampler.h for the contract. */
#include "worker/sampler.h"

#include "common/log.h"
#include "common/status.h"

#include <assert.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- parameters ------------------------------------------------------------------------ */

struct kvs_sampling kvs_sampling_default(void)
{
    struct kvs_sampling p = {
        .temperature = 0.0f,
        .top_k = 0,
        .top_p = 1.0f,
        .min_p = 0.0f,
        .repeat_penalty = 1.0f,
        .repeat_last_n = 64,
        .seed = 0,
    };
    return p;
}

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static int
invalid(char *err, size_t errlen, const char *fmt, ...)
{
    if (err != NULL && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return KVS_INVALID_ARGUMENT;
}

int kvs_sampling_validate(const struct kvs_sampling *p, char *err, size_t errlen)
{
    assert(p != NULL);
    /* Written so that NaN fails every range test. */
    if (!(p->temperature >= 0.0f && isfinite(p->temperature))) {
        return invalid(err, errlen, "temperature %g: must be finite and >= 0 (0 = greedy)",
                       (double)p->temperature);
    }
    if (p->top_k < 0) {
        return invalid(err, errlen, "top_k %d: must be >= 0 (0 = off)", (int)p->top_k);
    }
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) {
        return invalid(err, errlen, "top_p %g: must be in (0, 1] (1 = off)", (double)p->top_p);
    }
    if (!(p->min_p >= 0.0f && p->min_p < 1.0f)) {
        return invalid(err, errlen, "min_p %g: must be in [0, 1) (0 = off)", (double)p->min_p);
    }
    if (!(p->repeat_penalty > 0.0f && isfinite(p->repeat_penalty))) {
        return invalid(err, errlen, "repeat_penalty %g: must be finite and > 0 (1 = off)",
                       (double)p->repeat_penalty);
    }
    if (p->repeat_last_n < 0 || p->repeat_last_n > KVS_SAMPLING_REPEAT_LAST_N_MAX) {
        return invalid(err, errlen, "repeat_last_n %d: must be in [0, %d] (0 = off)",
                       (int)p->repeat_last_n, KVS_SAMPLING_REPEAT_LAST_N_MAX);
    }
    if (err != NULL && errlen > 0) {
        err[0] = '\0';
    }
    return KVS_OK;
}

/* ---- PRNG: xoshiro256** seeded by splitmix64 ------------------------------------------- */

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t xoshiro_next(uint64_t st[4])
{
    uint64_t result = rotl(st[1] * 5, 7) * 9;
    uint64_t t = st[1] << 17;
    st[2] ^= st[0];
    st[3] ^= st[1];
    st[1] ^= st[2];
    st[0] ^= st[3];
    st[2] ^= t;
    st[3] = rotl(st[3], 45);
    return result;
}

/* Uniform double in [0, 1) with 53 random bits. */
static double uniform01(uint64_t st[4])
{
    return (double)(xoshiro_next(st) >> 11) * 0x1.0p-53;
}

/* ---- sampler --------------------------------------------------------------------------- */

struct cand {
    float logit; /* after penalties (and temperature, once applied) */
    int32_t id;  /* token id */
};

struct kvs_sampler {
    struct kvs_sampling p; /* validated parameters */
    int32_t n_vocab;       /* logits per row */
    uint64_t rng[4];       /* xoshiro256** state */
    struct cand *cand;     /* (n_vocab) candidate scratch */
    double *weight;        /* (n_vocab) exp(logit - max) of cand, for the draw */
    uint32_t *mark;        /* (n_vocab) == mark_gen: token is in the penalty window */
    uint32_t mark_gen;     /* generation of the current penalty marking */
    int32_t *hist;         /* (repeat_last_n) ring of accepted tokens */
    int32_t hist_n;        /* tokens in the ring, <= repeat_last_n */
    int32_t hist_pos;      /* next slot to write */
};

int kvs_sampler_new(const struct kvs_sampling *p, int32_t n_vocab, kvs_sampler **out)
{
    assert(p != NULL && out != NULL);
    *out = NULL;
    char err[160];
    if (kvs_sampling_validate(p, err, sizeof err) < 0) {
        KVS_ERROR("sampler: %s", err);
        return KVS_INVALID_ARGUMENT;
    }
    if (n_vocab < 1) {
        KVS_ERROR("sampler: n_vocab %d: must be >= 1", (int)n_vocab);
        return KVS_INVALID_ARGUMENT;
    }
    kvs_sampler *s = calloc(1, sizeof *s);
    if (s == NULL) {
        return KVS_NO_MEMORY;
    }
    s->p = *p;
    s->n_vocab = n_vocab;
    s->cand = malloc((size_t)n_vocab * sizeof *s->cand);
    s->weight = malloc((size_t)n_vocab * sizeof *s->weight);
    s->mark = calloc((size_t)n_vocab, sizeof *s->mark);
    s->hist = malloc((size_t)(p->repeat_last_n > 0 ? p->repeat_last_n : 1) * sizeof *s->hist);
    if (s->cand == NULL || s->weight == NULL || s->mark == NULL || s->hist == NULL) {
        kvs_sampler_destroy(&s);
        return KVS_NO_MEMORY;
    }
    kvs_sampler_reset(s);
    *out = s;
    return KVS_OK;
}

void kvs_sampler_destroy(kvs_sampler **s)
{
    if (s == NULL || *s == NULL) {
        return;
    }
    free((*s)->cand);
    free((*s)->weight);
    free((*s)->mark);
    free((*s)->hist);
    free(*s);
    *s = NULL;
}

void kvs_sampler_reset(kvs_sampler *s)
{
    assert(s != NULL);
    uint64_t x = s->p.seed;
    for (int i = 0; i < 4; i++) {
        s->rng[i] = splitmix64(&x);
    }
    s->hist_n = 0;
    s->hist_pos = 0;
}

void kvs_sampler_accept(kvs_sampler *s, int32_t token)
{
    assert(s != NULL && token >= 0 && token < s->n_vocab);
    int32_t cap = s->p.repeat_last_n;
    if (cap == 0) {
        return;
    }
    s->hist[s->hist_pos] = token;
    s->hist_pos = (s->hist_pos + 1) % cap;
    if (s->hist_n < cap) {
        s->hist_n++;
    }
}

/* Mark the distinct tokens of the penalty window (mark[t] == mark_gen). Returns whether any
 * penalty applies. */
static bool mark_penalized(kvs_sampler *s)
{
    if (s->p.repeat_penalty == 1.0f || s->hist_n == 0) {
        return false;
    }
    if (++s->mark_gen == 0) { /* wrapped: old marks could alias the new generation */
        memset(s->mark, 0, (size_t)s->n_vocab * sizeof *s->mark);
        s->mark_gen = 1;
    }
    for (int32_t i = 0; i < s->hist_n; i++) {
        s->mark[s->hist[i]] = s->mark_gen;
    }
    return true;
}

/* llama.cpp's repetition penalty on one logit. */
static float penalize(float logit, float penalty)
{
    return logit > 0.0f ? logit / penalty : logit * penalty;
}

/* The logit of token t after penalties, with NaN mapped to -inf. */
static float effective_logit(const kvs_sampler *s, bool pen, const float *logits, int32_t t)
{
    float l = logits[t];
    if (isnan(l)) {
        return -INFINITY;
    }
    return pen && s->mark[t] == s->mark_gen ? penalize(l, s->p.repeat_penalty) : l;
}

/* Total order: a comes before b (larger logit; on ties, lower id). */
static bool before(struct cand a, struct cand b)
{
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

/* Sift c[i] down a heap of n whose root is the element that comes last in `before` order. */
static void sift_down(struct cand *c, int32_t n, int32_t i)
{
    for (;;) {
        int32_t l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && before(c[w], c[l])) {
            w = l;
        }
        if (r < n && before(c[w], c[r])) {
            w = r;
        }
        if (w == i) {
            return;
        }
        struct cand t = c[i];
        c[i] = c[w];
        c[w] = t;
        i = w;
    }
}

/* Put the first k of c[0, n) in `before` order into c[0, k), sorted; the rest of the array
 * is permuted. O(n log k), in place, no allocation (glibc qsort may malloc). */
static void sort_prefix(struct cand *c, int32_t n, int32_t k)
{
    if (k > n) {
        k = n;
    }
    if (k <= 0) {
        return;
    }
    for (int32_t i = k / 2 - 1; i >= 0; i--) {
        sift_down(c, k, i);
    }
    for (int32_t i = k; i < n; i++) {
        if (before(c[i], c[0])) {
            struct cand t = c[0];
            c[0] = c[i];
            c[i] = t;
            sift_down(c, k, 0);
        }
    }
    /* Heap sort: moving the worst to the end leaves c[0, k) best-first. */
    for (int32_t end = k - 1; end > 0; end--) {
        struct cand t = c[0];
        c[0] = c[end];
        c[end] = t;
        sift_down(c, end, 0);
    }
}

static float max_logit(const struct cand *c, int32_t n, int32_t n_sorted)
{
    if (n_sorted > 0) {
        return c[0].logit;
    }
    float m = -INFINITY;
    for (int32_t i = 0; i < n; i++) {
        m = c[i].logit > m ? c[i].logit : m;
    }
    return m;
}

#define TOP_P_FIRST 64    /* candidates sorted before trying the bucket pass */
#define TOP_P_BUCKETS 256 /* logit buckets of the bucket pass */

/* Bucket of a logit in [mn, mx]: 0 holds the largest; weakly monotonic in the logit. */
static int bucket_of(float logit, float mx, float scale)
{
    int b = (int)((mx - logit) * scale);
    return b < TOP_P_BUCKETS ? b : TOP_P_BUCKETS - 1;
}

/* top_p over c[0, n): the shortest prefix, in `before` order, whose probability reaches
 * top_p. Returns the new n; *n_sorted: leading elements known sorted (updated).
 *
 * Peaked rows end within the first TOP_P_FIRST candidates (one partial sort). Otherwise,
 * instead of sorting the row: bucket the logits, find the bucket where the cumulative mass
 * crosses top_p, move the buckets above it to the front and sort only that bucket. The set
 * kept is the same as a full sort's (up to the rounding of a sum taken in another order). */
static int32_t apply_top_p(struct cand *c, int32_t n, int32_t *n_sorted, float top_p)
{
    float mx = max_logit(c, n, *n_sorted), mn = mx;
    double sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        sum += exp((double)(c[i].logit - mx));
        mn = c[i].logit < mn ? c[i].logit : mn;
    }
    double target = (double)top_p * sum; /* cumulative weight to reach */
    double cum = 0.0;

    int32_t k = *n_sorted == n ? n : (n < TOP_P_FIRST ? n : TOP_P_FIRST);
    if (*n_sorted < k) {
        sort_prefix(c, n, k);
        *n_sorted = k;
    }
    for (int32_t i = 0; i < k; i++) {
        cum += exp((double)(c[i].logit - mx));
        if (cum >= target) {
            return i + 1;
        }
    }
    if (k == n) {
        return n; /* rounding kept the sum just under top_p: keep everything */
    }

    /* Bucket pass. */
    double mass[TOP_P_BUCKETS] = {0};
    float scale = mx > mn ? (float)TOP_P_BUCKETS / (mx - mn) : 0.0f;
    for (int32_t i = 0; i < n; i++) {
        mass[bucket_of(c[i].logit, mx, scale)] += exp((double)(c[i].logit - mx));
    }
    cum = 0.0;
    int cut = 0;
    while (cut < TOP_P_BUCKETS && cum + mass[cut] < target) {
        cum += mass[cut++];
    }
    if (cut == TOP_P_BUCKETS) {
        return n;
    }
    int32_t above = 0; /* c[0, above): buckets before cut, all kept */
    for (int32_t i = 0; i < n; i++) {
        if (bucket_of(c[i].logit, mx, scale) < cut) {
            struct cand t = c[above];
            c[above++] = c[i];
            c[i] = t;
        }
    }
    int32_t in_cut = 0; /* c[above, above + in_cut): the cut bucket */
    for (int32_t i = above; i < n; i++) {
        if (bucket_of(c[i].logit, mx, scale) == cut) {
            struct cand t = c[above + in_cut];
            c[above + in_cut++] = c[i];
            c[i] = t;
        }
    }
    sort_prefix(c + above, in_cut, in_cut);
    *n_sorted = above == 0 ? in_cut : 0;
    for (int32_t i = 0; i < in_cut; i++) {
        cum += exp((double)(c[above + i].logit - mx));
        if (cum >= target) {
            return above + i + 1;
        }
    }
    return above + in_cut;
}

/* min_p over c[0, n): stable compaction, returns the new n. */
static int32_t apply_min_p(struct cand *c, int32_t n, int32_t n_sorted, float min_p)
{
    float threshold = max_logit(c, n, n_sorted) + logf(min_p);
    int32_t m = 0;
    for (int32_t i = 0; i < n; i++) {
        if (c[i].logit >= threshold) {
            c[m++] = c[i];
        }
    }
    return m;
}

/* Softmax over c[0, n) and one draw. */
static int32_t draw(kvs_sampler *s, const struct cand *c, int32_t n)
{
    double *w = s->weight;
    float mx = max_logit(c, n, 0);
    double sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        w[i] = exp((double)(c[i].logit - mx));
        sum += w[i];
    }
    double r = uniform01(s->rng) * sum;
    double cum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        cum += w[i];
        if (r < cum) {
            return c[i].id;
        }
    }
    return c[n - 1].id; /* r landed on the rounding slack at the top */
}

static int32_t argmax(const kvs_sampler *s, bool pen, const float *logits)
{
    int32_t best = 0;
    float best_l = effective_logit(s, pen, logits, 0);
    for (int32_t t = 1; t < s->n_vocab; t++) {
        float l = effective_logit(s, pen, logits, t);
        if (l > best_l) { /* strict: the lowest id wins ties */
            best = t;
            best_l = l;
        }
    }
    return best;
}

int32_t kvs_sampler_sample(kvs_sampler *s, const float *logits)
{
    assert(s != NULL && logits != NULL);
    bool pen = mark_penalized(s);
    if (s->p.temperature == 0.0f) {
        return argmax(s, pen, logits);
    }

    /* Candidates: every token that can still be drawn (finite or +inf logit). */
    struct cand *c = s->cand;
    int32_t n = 0;
    for (int32_t t = 0; t < s->n_vocab; t++) {
        float l = effective_logit(s, pen, logits, t);
        if (l > -INFINITY) {
            c[n].logit = l;
            c[n].id = t;
            n++;
        }
    }
    if (n == 0) {
        return 0; /* every logit -inf or NaN */
    }
    /* +inf logits: exp() cannot weigh them; the lowest such id is certain. */
    for (int32_t i = 0; i < n; i++) {
        if (c[i].logit == INFINITY) {
            return c[i].id;
        }
    }

    int32_t n_sorted = 0; /* c[0, n_sorted) are the best n_sorted, in order */
    if (s->p.top_k > 0 && s->p.top_k < n) {
        sort_prefix(c, n, s->p.top_k);
        n = s->p.top_k;
        n_sorted = n;
    }
    if (s->p.top_p < 1.0f) {
        n = apply_top_p(c, n, &n_sorted, s->p.top_p);
        n_sorted = n_sorted < n ? n_sorted : n;
    }
    if (s->p.min_p > 0.0f) {
        int32_t m = apply_min_p(c, n, n_sorted, s->p.min_p);
        n_sorted = n_sorted < m ? n_sorted : m; /* the max survives: the prefix stays sorted */
        n = m;
    }
    if (s->p.temperature != 1.0f) {
        for (int32_t i = 0; i < n; i++) {
            c[i].logit /= s->p.temperature;
        }
    }
    return draw(s, c, n);
}

/* ---- stop strings: one KMP automaton per string ---------------------------------------- */

struct stop_str {
    size_t len;                      /* bytes, [1, KVS_STOP_MAX_LEN] */
    size_t state;                    /* longest prefix of str that is a suffix of the stream */
    char str[KVS_STOP_MAX_LEN];      /* the stop string (not NUL-terminated) */
    uint16_t fail[KVS_STOP_MAX_LEN]; /* fail[i]: longest proper border of str[0, i] */
};

struct kvs_stop {
    int n;                                   /* stop strings */
    size_t total;                            /* bytes fed since new/reset */
    bool matched;                            /* a stop string completed */
    size_t emit_len;                         /* last answer of kvs_stop_feed */
    struct stop_str s[KVS_STOP_MAX_STRINGS]; /* (n) */
};

int kvs_stop_validate(const char *const *stops, int n, char *err, size_t errlen)
{
    if (n < 0 || n > KVS_STOP_MAX_STRINGS) {
        return invalid(err, errlen, "stop strings: %d given, must be in [0, %d]", n,
                       KVS_STOP_MAX_STRINGS);
    }
    if (n > 0 && stops == NULL) {
        return invalid(err, errlen, "stop strings: NULL array for %d strings", n);
    }
    for (int i = 0; i < n; i++) {
        if (stops[i] == NULL) {
            return invalid(err, errlen, "stop string %d: NULL", i);
        }
        size_t len = strnlen(stops[i], KVS_STOP_MAX_LEN + 1);
        if (len == 0 || len > KVS_STOP_MAX_LEN) {
            return invalid(err, errlen, "stop string %d: length %s%zu, must be in [1, %d] bytes", i,
                           len > KVS_STOP_MAX_LEN ? "> " : "",
                           len > KVS_STOP_MAX_LEN ? (size_t)KVS_STOP_MAX_LEN : len,
                           KVS_STOP_MAX_LEN);
        }
    }
    if (err != NULL && errlen > 0) {
        err[0] = '\0';
    }
    return KVS_OK;
}

kvs_stop *kvs_stop_new(const char *const *stops, int n)
{
    char err[160];
    if (kvs_stop_validate(stops, n, err, sizeof err) < 0) {
        KVS_ERROR("stop: %s", err);
        return NULL;
    }
    kvs_stop *m = calloc(1, sizeof *m);
    if (m == NULL) {
        return NULL;
    }
    m->n = n;
    for (int i = 0; i < n; i++) {
        struct stop_str *st = &m->s[i];
        st->len = strlen(stops[i]);
        memcpy(st->str, stops[i], st->len);
        st->fail[0] = 0;
        size_t k = 0;
        for (size_t j = 1; j < st->len; j++) {
            while (k > 0 && st->str[j] != st->str[k]) {
                k = st->fail[k - 1];
            }
            if (st->str[j] == st->str[k]) {
                k++;
            }
            st->fail[j] = (uint16_t)k;
        }
    }
    return m;
}

void kvs_stop_destroy(kvs_stop **s)
{
    if (s == NULL || *s == NULL) {
        return;
    }
    free(*s);
    *s = NULL;
}

void kvs_stop_reset(kvs_stop *s)
{
    assert(s != NULL);
    s->total = 0;
    s->matched = false;
    s->emit_len = 0;
    for (int i = 0; i < s->n; i++) {
        s->s[i].state = 0;
    }
}

bool kvs_stop_feed(kvs_stop *s, const char *bytes, size_t len, size_t *emit_len)
{
    assert(s != NULL && emit_len != NULL && (bytes != NULL || len == 0));
    if (s->matched) {
        *emit_len = s->emit_len;
        return true;
    }
    for (size_t b = 0; b < len; b++) {
        char ch = bytes[b];
        s->total++;
        size_t longest = 0; /* longest stop string completing at this byte */
        for (int i = 0; i < s->n; i++) {
            struct stop_str *st = &s->s[i];
            while (st->state > 0 && ch != st->str[st->state]) {
                st->state = st->fail[st->state - 1];
            }
            if (ch == st->str[st->state]) {
                st->state++;
            }
            if (st->state == st->len) {
                longest = st->len > longest ? st->len : longest;
                st->state = st->fail[st->state - 1];
            }
        }
        if (longest > 0) {
            s->matched = true;
            s->emit_len = s->total - longest;
            *emit_len = s->emit_len;
            return true;
        }
    }
    size_t held = 0;
    for (int i = 0; i < s->n; i++) {
        held = s->s[i].state > held ? s->s[i].state : held;
    }
    s->emit_len = s->total - held;
    *emit_len = s->emit_len;
    return false;
}
