#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sodium.h>

#include "common/log.h"
#include "common/status.h"
#include "kernels/dtype.h"
#ifdef KVS_HAVE_CUDA
#include "kernels/cuda/cuda.h"
#endif

struct loader {
    kvs_model *m;
    char *err;
    size_t errlen;
    kvs_model_progress_fn progress;
    void *user;
    uint64_t done;  /* bytes handed to the backend so far */
    uint64_t total; /* bytes of all tensors */
};

static int load_matrix(struct loader *ld, const char *name, struct kvs_weight *w)
{
    const kvs_gguf_tensor *t = kvs_gguf_find_tensor(ld->m->gguf, name);
    if (t == NULL) {
        snprintf(ld->err, ld->errlen, "missing tensor '%s'", name);
        return KVS_BAD_FORMAT;
    }
    if (t->n_dims != 2) {
        snprintf(ld->err, ld->errlen, "tensor '%s' has %u dims, expected 2", name, t->n_dims);
        return KVS_BAD_FORMAT;
    }
    w->type = t->type;
    w->n_in = (int64_t)t->ne[0];
    w->n_out = (int64_t)t->ne[1];
    w->row_bytes = (size_t)(t->nbytes / t->ne[1]);
    kvs_backend *b = ld->m->backend;
    int rc = b->ops->weight_load(b, w, t->data);
    if (rc < 0) {
        snprintf(ld->err, ld->errlen, "cannot load tensor '%s' on the %s backend: %s", name,
                 b->ops->name, kvs_status_message(rc));
        return rc;
    }
    ld->done += t->nbytes;
    if (ld->progress != NULL) {
        ld->progress(ld->done, ld->total, ld->user);
    }
    return KVS_OK;
}

/* A 1-D tensor of n elements (any float type) as f32 in backend memory. */
static int load_vector(struct loader *ld, const char *name, int64_t n, float **out)
{
    const kvs_gguf_tensor *t = kvs_gguf_find_tensor(ld->m->gguf, name);
    if (t == NULL) {
        snprintf(ld->err, ld->errlen, "missing tensor '%s'", name);
        return KVS_BAD_FORMAT;
    }
    if ((int64_t)t->n_elem != n) {
        snprintf(ld->err, ld->errlen, "tensor '%s' has %llu elements, expected %lld", name,
                 (unsigned long long)t->n_elem, (long long)n);
        return KVS_BAD_FORMAT;
    }
    float *host = malloc((size_t)n * sizeof *host);
    if (host == NULL) {
        return KVS_NO_MEMORY;
    }
    kvs_dequantize(t->type, t->data, host, (uint64_t)n);
    kvs_backend *b = ld->m->backend;
    float *dev = b->ops->alloc(b, (size_t)n * sizeof *dev);
    int rc = dev == NULL ? KVS_NO_MEMORY : b->ops->upload(b, dev, host, (size_t)n * sizeof *dev);
    free(host);
    if (rc < 0) {
        b->ops->free(b, dev);
        return rc;
    }
    ld->done += t->nbytes;
    *out = dev;
    return KVS_OK;
}

/* Llama 3 frequency divisors: from the rope_freqs tensor when the file has one, else from
 * the rope scaling metadata (the same formula transformers uses for rope_type "llama3"). */
static int rope_factors(struct loader *ld)
{
    kvs_model *m = ld->m;
    const struct kvs_hparams *hp = &m->hp;
    int32_t half = (int32_t)hp->rope_dim / 2;
    const kvs_gguf_tensor *t =
        m->gguf != NULL ? kvs_gguf_find_tensor(m->gguf, "rope_freqs.weight") : NULL;
    if (t == NULL && hp->rope_scaling != KVS_ROPE_SCALING_LLAMA3) {
        return KVS_OK;
    }
    m->rope_factors = malloc((size_t)half * sizeof *m->rope_factors);
    if (m->rope_factors == NULL) {
        return KVS_NO_MEMORY;
    }
    if (t != NULL) {
        if ((int64_t)t->n_elem != half) {
            snprintf(ld->err, ld->errlen, "rope_freqs.weight has %llu elements, expected %d",
                     (unsigned long long)t->n_elem, half);
            return KVS_BAD_FORMAT;
        }
        kvs_dequantize(t->type, t->data, m->rope_factors, (uint64_t)half);
        return KVS_OK;
    }
    double lo = (double)hp->rope_scaling_orig_ctx / hp->rope_scaling_low_freq;
    double hi = (double)hp->rope_scaling_orig_ctx / hp->rope_scaling_high_freq;
    for (int32_t i = 0; i < half; i++) {
        double freq = pow(hp->rope_freq_base, -2.0 * i / hp->rope_dim);
        double wavelen = 2.0 * M_PI / freq;
        double f;
        if (wavelen < hi) {
            f = 1.0;
        } else if (wavelen > lo) {
            f = hp->rope_scaling_factor;
        } else {
            double smooth = ((double)hp->rope_scaling_orig_ctx / wavelen - hp->rope_scaling_low_freq) /
                            (hp->rope_scaling_high_freq - hp->rope_scaling_low_freq);
            f = 1.0 / ((1.0 - smooth) / hp->rope_scaling_factor + smooth);
        }
        m->rope_factors[i] = (float)f;
    }
    return KVS_OK;
}

int kvs_model_load(const char *path, kvs_backend *b, kvs_model_progress_fn progress,
                   void *user, kvs_model **out, char *err, size_t errlen)
{
    *out = NULL;
    char scratch[8];
    if (err == NULL || errlen == 0) {
        err = scratch;
        errlen = sizeof scratch;
    }
    err[0] = '\0';
    kvs_model *m = calloc(1, sizeof *m);
    if (m == NULL) {
        return KVS_NO_MEMORY;
    }
    m->backend = b;
    snprintf(m->path, sizeof m->path, "%s", path);
    struct loader ld = {.m = m, .err = err, .errlen = errlen, .progress = progress, .user = user};
    int rc = kvs_gguf_open(path, &m->gguf, err, errlen);
    if (rc < 0) {
        goto fail;
    }
    rc = kvs_hparams_from_gguf(m->gguf, &m->hp, err, errlen);
    if (rc < 0) {
        goto fail;
    }
    rc = kvs_hparams_check_tensors(m->gguf, &m->hp, err, errlen);
    if (rc < 0) {
        goto fail;
    }
    const struct kvs_hparams *hp = &m->hp;
    for (uint64_t i = 0; i < kvs_gguf_n_tensors(m->gguf); i++) {
        ld.total += kvs_gguf_tensor_at(m->gguf, i)->nbytes;
    }

    rc = load_matrix(&ld, "token_embd.weight", &m->tok_embd);
    if (rc < 0) {
        goto fail;
    }
    if (kvs_gguf_find_tensor(m->gguf, "output.weight") != NULL) {
        rc = load_matrix(&ld, "output.weight", &m->output);
        if (rc < 0) {
            goto fail;
        }
    } else {
        m->output = m->tok_embd;
        m->output_is_tied = 1;
    }
    rc = load_vector(&ld, "output_norm.weight", hp->n_embd, &m->output_norm);
    if (rc < 0) {
        goto fail;
    }
    m->layers = calloc(hp->n_layer, sizeof *m->layers);
    if (m->layers == NULL) {
        rc = KVS_NO_MEMORY;
        goto fail;
    }
    int64_t q_dim = (int64_t)hp->n_head * hp->head_dim;
    int64_t kv_dim = (int64_t)hp->n_head_kv * hp->head_dim;
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        struct kvs_layer *L = &m->layers[l];
        char name[96];
#define TENSOR(suffix) (snprintf(name, sizeof name, "blk.%u.%s", l, suffix), name)
        if ((rc = load_vector(&ld, TENSOR("attn_norm.weight"), hp->n_embd, &L->attn_norm)) < 0 ||
            (rc = load_matrix(&ld, TENSOR("attn_q.weight"), &L->wq)) < 0 ||
            (rc = load_matrix(&ld, TENSOR("attn_k.weight"), &L->wk)) < 0 ||
            (rc = load_matrix(&ld, TENSOR("attn_v.weight"), &L->wv)) < 0 ||
            (rc = load_matrix(&ld, TENSOR("attn_output.weight"), &L->wo)) < 0 ||
            (rc = load_vector(&ld, TENSOR("ffn_norm.weight"), hp->n_embd, &L->ffn_norm)) < 0 ||
            (rc = load_matrix(&ld, TENSOR("ffn_gate.weight"), &L->w_gate)) < 0 ||
            (rc = load_matrix(&ld, TENSOR("ffn_up.weight"), &L->w_up)) < 0 ||
            (rc = load_matrix(&ld, TENSOR("ffn_down.weight"), &L->w_down)) < 0) {
            goto fail;
        }
        if (hp->has_qkv_bias) {
            if ((rc = load_vector(&ld, TENSOR("attn_q.bias"), q_dim, &L->bq)) < 0 ||
                (rc = load_vector(&ld, TENSOR("attn_k.bias"), kv_dim, &L->bk)) < 0 ||
                (rc = load_vector(&ld, TENSOR("attn_v.bias"), kv_dim, &L->bv)) < 0) {
                goto fail;
            }
        }
#undef TENSOR
    }
    rc = rope_factors(&ld);
    if (rc < 0) {
        goto fail;
    }
    m->rope = (struct kvs_rope){
        .n_dims = (int32_t)hp->rope_dim,
        .style = hp->rope_style == KVS_HP_ROPE_NEOX ? KVS_ROPE_NEOX : KVS_ROPE_NORM,
        .freq_base = hp->rope_freq_base,
        .freq_scale = hp->rope_scaling == KVS_ROPE_SCALING_LINEAR && hp->rope_scaling_factor > 0
                          ? 1.0f / hp->rope_scaling_factor
                          : 1.0f,
        .freq_factors = m->rope_factors,
    };
    *out = m;
    return KVS_OK;
fail:
    if (err[0] == '\0') {
        snprintf(err, errlen, "%s", kvs_status_message(rc));
    }
    kvs_model_destroy(&m);
    return rc;
}

/* ---- synthetic models ------------------------------------------------------------------------ */

struct synth_shape {
    const char *name;
    uint32_t n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab, n_ctx;
    float rope_base;
    int tied;
};

static const struct synth_shape synth_shapes[] = {
    {"llama3-8b", 32, 4096, 32, 8, 14336, 128256, 131072, 500000.0f, 0},
    {"llama3-1b", 16, 2048, 32, 8, 8192, 128256, 131072, 500000.0f, 1},
    {"tiny", 2, 256, 4, 2, 512, 1024, 8192, 500000.0f, 0},
};

/* Weight element i of the tensor with this seed, as bf16 bits: a splitmix64 hash of
 * (seed, i) -> uniform in [-1, 1) with 24 bits -> times scale -> round to nearest even.
 * kernels/cuda/weights.cu has the same function for the device, bit for bit. */
static uint16_t synth_value(uint64_t seed, uint64_t i, float scale)
{
    uint64_t z = (seed ^ (i * 0xD1B54A32D192ED03ull)) + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    float u = (float)(z >> 40) * (1.0f / 16777216.0f);
    float v = (2.0f * u - 1.0f) * scale; /* 2u - 1 is exact */
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static int synth_matrix(kvs_backend *b, struct kvs_weight *w, int64_t n_out, int64_t n_in,
                        uint64_t seed, float scale)
{
    *w = (struct kvs_weight){.type = KVS_DTYPE_BF16, .n_in = n_in, .n_out = n_out,
                             .row_bytes = (size_t)n_in * 2};
#ifdef KVS_HAVE_CUDA
    if (kvs_backend_is_cuda(b)) {
        return kvs_cuda_weight_random(b, w, seed, scale);
    }
#endif
    size_t n = (size_t)n_in * (size_t)n_out;
    uint16_t *host = malloc(n * sizeof *host);
    if (host == NULL) {
        return KVS_NO_MEMORY;
    }
    for (size_t i = 0; i < n; i++) {
        host[i] = synth_value(seed, i, scale);
    }
    int rc = b->ops->weight_load(b, w, host);
    free(host);
    return rc;
}

static int synth_ones(kvs_backend *b, int64_t n, float **out)
{
    float *host = malloc((size_t)n * sizeof *host);
    if (host == NULL) {
        return KVS_NO_MEMORY;
    }
    for (int64_t i = 0; i < n; i++) {
        host[i] = 1.0f;
    }
    float *dev = b->ops->alloc(b, (size_t)n * sizeof *dev);
    int rc = dev == NULL ? KVS_NO_MEMORY : b->ops->upload(b, dev, host, (size_t)n * sizeof *dev);
    free(host);
    if (rc < 0) {
        b->ops->free(b, dev);
        return rc;
    }
    *out = dev;
    return KVS_OK;
}

int kvs_model_is_synthetic(const char *name)
{
    return name != NULL && strncmp(name, "synthetic:", 10) == 0;
}

int kvs_model_synthetic(const char *name, kvs_backend *b, kvs_model **out, char *err,
                        size_t errlen)
{
    *out = NULL;
    char scratch[8];
    if (err == NULL || errlen == 0) {
        err = scratch;
        errlen = sizeof scratch;
    }
    err[0] = '\0';
    const struct synth_shape *sh = NULL;
    for (size_t i = 0; kvs_model_is_synthetic(name) && i < sizeof synth_shapes / sizeof synth_shapes[0]; i++) {
        if (strcmp(name + 10, synth_shapes[i].name) == 0) {
            sh = &synth_shapes[i];
        }
    }
    if (sh == NULL) {
        snprintf(err, errlen,
                 "unknown model '%s' (synthetic:llama3-8b, synthetic:llama3-1b, synthetic:tiny)",
                 name);
        return KVS_NOT_FOUND;
    }
    kvs_model *m = calloc(1, sizeof *m);
    if (m == NULL) {
        return KVS_NO_MEMORY;
    }
    m->backend = b;
    snprintf(m->path, sizeof m->path, "%s", name);
    struct kvs_hparams *hp = &m->hp;
    hp->arch = KVS_ARCH_LLAMA;
    snprintf(hp->arch_name, sizeof hp->arch_name, "llama");
    snprintf(hp->name, sizeof hp->name, "%s", name);
    hp->n_layer = sh->n_layer;
    hp->n_embd = sh->n_embd;
    hp->n_head = sh->n_head;
    hp->n_head_kv = sh->n_head_kv;
    hp->head_dim = sh->n_embd / sh->n_head;
    hp->n_ff = sh->n_ff;
    hp->n_vocab = sh->n_vocab;
    hp->n_ctx_train = sh->n_ctx;
    hp->rope_freq_base = sh->rope_base;
    hp->rope_dim = hp->head_dim;
    hp->rope_style = KVS_HP_ROPE_NORM;
    hp->rope_scaling = KVS_ROPE_SCALING_LLAMA3;
    hp->rope_scaling_factor = 8.0f;
    hp->rope_scaling_low_freq = 1.0f;
    hp->rope_scaling_high_freq = 4.0f;
    hp->rope_scaling_orig_ctx = 8192;
    hp->norm_eps = 1e-5f;
    hp->tied_embeddings = sh->tied != 0;
    hp->file_type = -1;
    struct loader ld = {.m = m, .err = err, .errlen = errlen};
    int64_t E = hp->n_embd, FF = hp->n_ff, QD = (int64_t)hp->n_head * hp->head_dim;
    int64_t KVD = (int64_t)hp->n_head_kv * hp->head_dim;
    /* uniform in [-a, a] with a = sqrt(3 / n_in): unit-variance outputs for unit inputs */
    float se = sqrtf(3.0f / (float)E), sff = sqrtf(3.0f / (float)FF), sq = sqrtf(3.0f / (float)QD);
    int rc = synth_matrix(b, &m->tok_embd, hp->n_vocab, E, 0x100, 1.0f);
    if (rc == 0 && sh->tied) {
        m->output = m->tok_embd;
        m->output_is_tied = 1;
    } else if (rc == 0) {
        rc = synth_matrix(b, &m->output, hp->n_vocab, E, 0x101, se);
    }
    if (rc == 0) {
        rc = synth_ones(b, E, &m->output_norm);
    }
    if (rc == 0) {
        m->layers = calloc(hp->n_layer, sizeof *m->layers);
        rc = m->layers == NULL ? KVS_NO_MEMORY : 0;
    }
    for (uint32_t l = 0; rc == 0 && l < hp->n_layer; l++) {
        struct kvs_layer *L = &m->layers[l];
        uint64_t s = 0x1000 + (uint64_t)l * 16;
        if ((rc = synth_ones(b, E, &L->attn_norm)) < 0 ||
            (rc = synth_matrix(b, &L->wq, QD, E, s + 0, se)) < 0 ||
            (rc = synth_matrix(b, &L->wk, KVD, E, s + 1, se)) < 0 ||
            (rc = synth_matrix(b, &L->wv, KVD, E, s + 2, se)) < 0 ||
            (rc = synth_matrix(b, &L->wo, E, QD, s + 3, sq)) < 0 ||
            (rc = synth_ones(b, E, &L->ffn_norm)) < 0 ||
            (rc = synth_matrix(b, &L->w_gate, FF, E, s + 4, se)) < 0 ||
            (rc = synth_matrix(b, &L->w_up, FF, E, s + 5, se)) < 0 ||
            (rc = synth_matrix(b, &L->w_down, E, FF, s + 6, sff)) < 0) {
            break;
        }
    }
    if (rc == 0) {
        rc = rope_factors(&ld);
    }
    if (rc == 0) {
        rc = b->ops->sync(b);
    }
    if (rc < 0) {
        if (err[0] == '\0') {
            snprintf(err, errlen, "cannot create %s on the %s backend: %s", name, b->ops->name,
                     kvs_status_message(rc));
        }
        kvs_model_destroy(&m);
        return rc;
    }
    m->rope = (struct kvs_rope){
        .n_dims = (int32_t)hp->rope_dim,
        .style = KVS_ROPE_NORM,
        .freq_base = hp->rope_freq_base,
        .freq_scale = 1.0f,
        .freq_factors = m->rope_factors,
    };
    *out = m;
    return KVS_OK;
}

static void free_weight(kvs_backend *b, struct kvs_weight *w)
{
    if (w->data != NULL || w->extra != NULL) {
        b->ops->weight_free(b, w);
    }
}

void kvs_model_destroy(kvs_model **mp)
{
    if (mp == NULL || *mp == NULL) {
        return;
    }
    kvs_model *m = *mp;
    kvs_backend *b = m->backend;
    if (m->layers != NULL) {
        for (uint32_t l = 0; l < m->hp.n_layer; l++) {
            struct kvs_layer *L = &m->layers[l];
            b->ops->free(b, L->attn_norm);
            b->ops->free(b, L->ffn_norm);
            b->ops->free(b, L->bq);
            b->ops->free(b, L->bk);
            b->ops->free(b, L->bv);
            free_weight(b, &L->wq);
            free_weight(b, &L->wk);
            free_weight(b, &L->wv);
            free_weight(b, &L->wo);
            free_weight(b, &L->w_gate);
            free_weight(b, &L->w_up);
            free_weight(b, &L->w_down);
        }
        free(m->layers);
    }
    if (!m->output_is_tied) {
        free_weight(b, &m->output);
    }
    free_weight(b, &m->tok_embd);
    b->ops->free(b, m->output_norm);
    free(m->rope_factors);
    kvs_gguf_destroy(&m->gguf);
    free(m);
    *mp = NULL;
}

int kvs_model_sha256(const kvs_model *m, char hex[65])
{
    FILE *f = fopen(m->path, "rb");
    if (f == NULL) {
        return KVS_IO;
    }
    crypto_hash_sha256_state st;
    crypto_hash_sha256_init(&st);
    unsigned char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) {
        crypto_hash_sha256_update(&st, buf, n);
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        return KVS_IO;
    }
    unsigned char digest[crypto_hash_sha256_BYTES];
    crypto_hash_sha256_final(&st, digest);
    for (size_t i = 0; i < sizeof digest; i++) {
        snprintf(hex + 2 * i, 3, "%02x", digest[i]);
    }
    return KVS_OK;
}
