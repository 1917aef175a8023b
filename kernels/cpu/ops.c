/* Element-wise and row-wise ops: embedding rows, RMSNorm, RoPE, SwiGLU, add, gather.
 *
 * Each output element depends only on its own row's inputs, computed in a fixed order, so
 * these ops are batch-invariant at every ISA level (they are plain C, the same at all
 * levels). Row-parallel where a batch is large enough to pay for waking the workers. */
#include "kernels/cpu/cpu_impl.h"

#include <assert.h>
#include <math.h>

/* ---- get_rows ------------------------------------------------------------------------------ */

/* Dequantize one row of n elements (n a multiple of the type's block), in the layout
 * weight_load keeps (paired: Q4 pair-packed rows of the AVX-512 level). */
static void dequantize_row(uint32_t type, const void *src, float *dst, int64_t n, bool paired)
{
    switch (type) {
    case KVS_DTYPE_F32:
        memcpy(dst, src, (size_t)n * sizeof(float));
        break;
    case KVS_DTYPE_F16:
        for (int64_t i = 0; i < n; i++) {
            dst[i] = kvs_cpu_f16_to_f32(((const uint16_t *)src)[i]);
        }
        break;
    case KVS_DTYPE_BF16:
        for (int64_t i = 0; i < n; i++) {
            dst[i] = kvs_cpu_bf16_to_f32(((const uint16_t *)src)[i]);
        }
        break;
    case KVS_DTYPE_Q8_0:
    case KVS_DTYPE_Q4_0:
    case KVS_DTYPE_Q4_1: { /* regrouped rows (cpu_impl.h) */
        int64_t nb = n / KVS_QK;
        for (int64_t g = 0; g < (nb + KVS_QG - 1) / KVS_QG; g++) {
            struct kvs_cpu_rg rg = kvs_cpu_rg_group(type, src, nb, g);
            for (int j = 0; j < rg.n; j++) {
                float *o = dst + (g * KVS_QG + j) * KVS_QK;
                float d = kvs_cpu_f16_to_f32(rg.d[j]);
                if (type == KVS_DTYPE_Q8_0) {
                    const int8_t *q = (const int8_t *)rg.qs + j * 32;
                    for (int i = 0; i < KVS_QK; i++) {
                        o[i] = d * (float)q[i];
                    }
                } else if (paired && j + 1 - (j & 1) < rg.n) { /* in a pair: j even or odd */
                    const uint8_t *qs = rg.qs + (j & ~1) * 16;
                    float m = type == KVS_DTYPE_Q4_1 ? kvs_cpu_f16_to_f32(rg.m[j]) : 0.0f;
                    int off = type == KVS_DTYPE_Q4_0 ? 8 : 0, shift = (j & 1) ? 4 : 0;
                    for (int i = 0; i < 32; i++) {
                        o[i] = d * (float)(((qs[i] >> shift) & 0x0f) - off) + m;
                    }
                } else {
                    const uint8_t *qs = rg.qs + j * 16;
                    float m = type == KVS_DTYPE_Q4_1 ? kvs_cpu_f16_to_f32(rg.m[j]) : 0.0f;
                    int off = type == KVS_DTYPE_Q4_0 ? 8 : 0;
                    for (int i = 0; i < 16; i++) {
                        o[i] = d * (float)((qs[i] & 0x0f) - off) + m;
                        o[i + 16] = d * (float)((qs[i] >> 4) - off) + m;
                    }
                }
            }
        }
        break;
    }
    default:
        assert(!"unsupported type");
    }
}

int kvs_cpu_get_rows(kvs_backend *b, const struct kvs_weight *table, const int32_t *host_ids,
                     int32_t n, float *out)
{
    const struct kvs_cpu *c = b->ctx;
    assert(table != NULL && table->data != NULL && (host_ids != NULL || n == 0));
    for (int32_t i = 0; i < n; i++) {
        if (host_ids[i] < 0 || host_ids[i] >= table->n_out) {
            return KVS_OUT_OF_RANGE;
        }
    }
    for (int32_t i = 0; i < n; i++) {
        const uint8_t *row = (const uint8_t *)table->data + (size_t)host_ids[i] * table->row_bytes;
        dequantize_row(table->type, row, out + (int64_t)i * table->n_in, table->n_in,
                       kvs_cpu_paired_q4(c->k->isa, table->type));
    }
    return 0;
}

/* ---- rmsnorm ------------------------------------------------------------------------------- */

struct rmsnorm_job {
    const float *x, *w;
    float *out;
    int32_t dim;
    float eps;
};

static void rmsnorm_range(void *arg, int64_t r0, int64_t r1, int32_t ith)
{
    const struct rmsnorm_job *j = arg;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->x + r * j->dim;
        float *o = j->out + r * j->dim;
        double sum = 0.0; /* in element order, as llama.cpp's ggml_float sum */
        for (int32_t i = 0; i < j->dim; i++) {
            sum += (double)(x[i] * x[i]);
        }
        float mean = (float)(sum / j->dim);
        float scale = 1.0f / sqrtf(mean + j->eps);
        for (int32_t i = 0; i < j->dim; i++) {
            o[i] = (x[i] * scale) * j->w[i];
        }
    }
}

int kvs_cpu_rmsnorm(kvs_backend *b, const float *x, const float *w, int32_t n_rows, int32_t dim,
                    float eps, float *out)
{
    struct kvs_cpu *c = b->ctx;
    assert(x != NULL && w != NULL && out != NULL && n_rows >= 0 && dim > 0);
    struct rmsnorm_job j = {.x = x, .w = w, .out = out, .dim = dim, .eps = eps};
    kvs_threadpool_for(c->pool, n_rows, 16, rmsnorm_range, &j);
    return 0;
}

/* ---- rope ---------------------------------------------------------------------------------- */

struct rope_job {
    float *x;
    const float *cs; /* (n_rows, n_dims / 2, 2) cos, sin */
    int32_t n_heads, head_dim, n_dims, style;
};

/* x0' = fma(x0, cos, -(x1 sin)), x1' = fma(x0, sin, x1 cos) (the inner products rounded):
 * what llama.cpp's compiled CPU rope computes (found by comparing its tensors), so that a
 * quantized model's q and k match its bits. fmaf is one instruction where the ISA level has
 * FMA (rope_range_fma), a libm call elsewhere. */
static inline __attribute__((always_inline)) void rope_rows(const struct rope_job *j, int64_t r0,
                                                            int64_t r1)
{
    int32_t half = j->n_dims / 2;
    for (int64_t r = r0; r < r1; r++) {
        const float *cs = j->cs + r * j->n_dims;
        for (int32_t h = 0; h < j->n_heads; h++) {
            float *x = j->x + (r * j->n_heads + h) * j->head_dim;
            for (int32_t i = 0; i < half; i++) {
                float c = cs[2 * i], s = cs[2 * i + 1];
                int32_t i0 = j->style == KVS_ROPE_NEOX ? i : 2 * i;
                int32_t i1 = j->style == KVS_ROPE_NEOX ? i + half : 2 * i + 1;
                float x0 = x[i0], x1 = x[i1];
                float x1s = x1 * s, x1c = x1 * c;
                x[i0] = fmaf(x0, c, -x1s);
                x[i1] = fmaf(x0, s, x1c);
            }
        }
    }
}

static void rope_range(void *arg, int64_t r0, int64_t r1, int32_t ith)
{
    rope_rows(arg, r0, r1);
}

#if defined(__x86_64__)
__attribute__((target("fma"))) static void rope_range_fma(void *arg, int64_t r0, int64_t r1,
                                                          int32_t ith)
{
    rope_rows(arg, r0, r1);
}
#endif

int kvs_cpu_rope(kvs_backend *b, float *x, int32_t n_rows, int32_t n_heads, int32_t head_dim,
                 const int32_t *host_pos, const struct kvs_rope *rope)
{
    struct kvs_cpu *c = b->ctx;
    assert(x != NULL && rope != NULL && n_rows >= 0 && n_heads > 0);
    if (rope->n_dims <= 0 || rope->n_dims % 2 != 0 || rope->n_dims > head_dim ||
        (rope->style != KVS_ROPE_NORM && rope->style != KVS_ROPE_NEOX)) {
        return KVS_INVALID_ARGUMENT;
    }
    if (n_rows == 0) {
        return 0;
    }
    /* The angles as llama.cpp's CPU backend makes them (ggml_rope_cache_init), in f32:
     * theta_0 = pos, theta_i+1 = theta_i * base^(-2 / n_dims) (powf), each divided by its
     * freq_factor and times freq_scale, then sinf / cosf. A fixed formula per (pos, i), so a
     * position's rotation never depends on its batch; less exact than double angles at long
     * positions (the recurrence's rounding grows with i and pos), but the same bits as the
     * reference engine for quantized models. The table is kept for the next call with the
     * same positions and parameters (q and k of every layer of one forward). */
    int32_t half = rope->n_dims / 2;
    if (half > (int32_t)(sizeof c->rope_factors / sizeof c->rope_factors[0])) {
        return KVS_INVALID_ARGUMENT;
    }
    bool same = c->rope_rows == n_rows && c->rope_key.n_dims == rope->n_dims &&
                c->rope_key.freq_base == rope->freq_base &&
                c->rope_key.freq_scale == rope->freq_scale &&
                (c->rope_key.freq_factors != NULL) == (rope->freq_factors != NULL) &&
                (rope->freq_factors == NULL ||
                 memcmp(c->rope_factors, rope->freq_factors, (size_t)half * sizeof(float)) == 0) &&
                memcmp(c->rope_pos, host_pos, (size_t)n_rows * sizeof(int32_t)) == 0;
    if (!same) {
        KVS_TRY(kvs_cpu_scratch_reserve((void **)&c->rope_cs, &c->cap_rope,
                                        (int64_t)n_rows * rope->n_dims, sizeof(float)));
        KVS_TRY(kvs_cpu_scratch_reserve((void **)&c->rope_pos, &c->cap_rope_pos, n_rows,
                                        sizeof(int32_t)));
        const float theta_scale = powf(rope->freq_base, -2.0f / (float)rope->n_dims);
        for (int32_t r = 0; r < n_rows; r++) {
            float *cs = c->rope_cs + (int64_t)r * rope->n_dims;
            float theta = (float)host_pos[r];
            for (int32_t i = 0; i < half; i++) {
                float ff = rope->freq_factors != NULL ? rope->freq_factors[i] : 1.0f;
                float t = rope->freq_scale * (theta / ff);
                cs[2 * i] = cosf(t);
                cs[2 * i + 1] = sinf(t);
                theta *= theta_scale;
            }
        }
        memcpy(c->rope_pos, host_pos, (size_t)n_rows * sizeof(int32_t));
        c->rope_key = *rope;
        if (rope->freq_factors != NULL) {
            memcpy(c->rope_factors, rope->freq_factors, (size_t)half * sizeof(float));
        }
        c->rope_rows = n_rows;
    }
    struct rope_job j = {.x = x,
                         .cs = c->rope_cs,
                         .n_heads = n_heads,
                         .head_dim = head_dim,
                         .n_dims = rope->n_dims,
                         .style = rope->style};
#if defined(__x86_64__)
    kvs_threadpool_range_fn fn = c->k->isa >= KVS_CPU_ISA_AVX2 ? rope_range_fma : rope_range;
    kvs_threadpool_for(c->pool, n_rows, 8, fn, &j);
#else
    kvs_threadpool_for(c->pool, n_rows, 8, rope_range, &j);
#endif
    return 0;
}

/* ---- element-wise --------------------------------------------------------------------------- */

struct ew_job {
    const float *a, *b;
    float *out;
};

struct swiglu_job {
    const struct kvs_cpu_kernels *k;
    const float *gate, *up;
    float *out;
};

static void swiglu_range(void *arg, int64_t i0, int64_t i1, int32_t ith)
{
    const struct swiglu_job *j = arg;
    j->k->swiglu(j->gate + i0, j->up + i0, i1 - i0, j->out + i0);
}

int kvs_cpu_swiglu(kvs_backend *b, const float *gate, const float *up, int64_t n, float *out)
{
    struct kvs_cpu *c = b->ctx;
    assert(gate != NULL && up != NULL && out != NULL && n >= 0);
    struct swiglu_job j = {.k = c->k, .gate = gate, .up = up, .out = out};
    /* grains of 8 keep every element on the vector path (the tail path gives the same bits,
     * but this keeps pieces aligned) */
    kvs_threadpool_for(c->pool, n, 8192, swiglu_range, &j);
    return 0;
}

static void add_range(void *arg, int64_t i0, int64_t i1, int32_t ith)
{
    const struct ew_job *j = arg;
    for (int64_t i = i0; i < i1; i++) {
        j->out[i] = j->out[i] + j->b[i];
    }
}

int kvs_cpu_add(kvs_backend *b, float *x, const float *y, int64_t n)
{
    struct kvs_cpu *c = b->ctx;
    assert(x != NULL && y != NULL && n >= 0);
    struct ew_job j = {.b = y, .out = x};
    kvs_threadpool_for(c->pool, n, 65536, add_range, &j);
    return 0;
}

int kvs_cpu_gather(kvs_backend *b, const float *x, const int32_t *host_idx, int32_t n,
                   int32_t dim, float *out)
{
    assert(x != NULL && out != NULL && (host_idx != NULL || n == 0) && dim >= 0);
    for (int32_t i = 0; i < n; i++) {
        if (host_idx[i] < 0) {
            return KVS_OUT_OF_RANGE;
        }
        memmove(out + (int64_t)i * dim, x + (int64_t)host_idx[i] * dim, (size_t)dim * sizeof(float));
    }
    return 0;
}
