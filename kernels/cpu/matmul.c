/* y = x W^T (+ bias) for every weight type: dispatch, activation quantization, and the
 * portable scalar kernels.
 *
 * Batch invariance: the work is split over output columns only (never over K), each
 * (row, output) element is computed by one kernel call in a fixed order over K, and every
 * kernel of one ISA level (the 1-row and the tiled multi-row variants alike) performs the
 * same sequence of floating-point operations per element. Activation rows are quantized
 * independently of each other.
 */
#include "kernels/cpu/cpu_impl.h"

#include <assert.h>
#include <math.h>
#include <stdlib.h>

/* ---- scalar kernels --------------------------------------------------------------------- */

static void quantize_q8_scalar(const float *x, struct kvs_cpu_q8g *out, int64_t n)
{
    int64_t nb = n / KVS_QK;
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * KVS_QK;
        struct kvs_cpu_q8g *g = &out[b / KVS_QG];
        int j = (int)(b % KVS_QG);
        float amax = 0.0f;
        for (int i = 0; i < KVS_QK; i++) {
            float a = fabsf(xb[i]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.0f;
        float id = amax != 0.0f ? 127.0f / amax : 0.0f; /* as llama.cpp's x86 path */
        int32_t sum = 0;
        for (int i = 0; i < KVS_QK; i++) {
            int32_t q = (int32_t)nearbyintf(xb[i] * id);
            q = q > 127 ? 127 : (q < -127 ? -127 : q);
            g->q[j][i] = (int8_t)q;
            sum += q;
        }
        /* d and s are rounded through fp16 as llama.cpp's Q8_1/Q8_0 blocks store them, so
         * quantized models match llama.cpp's numerics (q itself uses the f32 d, as there) */
        g->d[j] = kvs_cpu_f16_to_f32(kvs_cpu_f32_to_f16(d));
        g->s[j] = kvs_cpu_f16_to_f32(kvs_cpu_f32_to_f16(d * (float)sum));
    }
    kvs_cpu_q8g_pad(out, nb);
}

static void gemm_f32_scalar(const struct kvs_weight *w, const void *xv, int32_t n_rows, int64_t o0,
                            int64_t o1, const float *bias, float *y, int64_t ldy)
{
    const float *x = xv;
    int64_t n = w->n_in;
    for (int64_t o = o0; o < o1; o++) {
        const float *wr = (const float *)((const uint8_t *)w->data + o * w->row_bytes);
        for (int32_t r = 0; r < n_rows; r++) {
            const float *xr = x + r * n;
            float acc = 0.0f;
            for (int64_t k = 0; k < n; k++) {
                acc += wr[k] * xr[k];
            }
            y[r * ldy + o] = bias != NULL ? acc + bias[o] : acc;
        }
    }
}

static void gemm_f16_scalar(const struct kvs_weight *w, const void *xv, int32_t n_rows, int64_t o0,
                            int64_t o1, const float *bias, float *y, int64_t ldy)
{
    const float *x = xv;
    int64_t n = w->n_in;
    for (int64_t o = o0; o < o1; o++) {
        const uint16_t *wr = (const uint16_t *)((const uint8_t *)w->data + o * w->row_bytes);
        for (int32_t r = 0; r < n_rows; r++) {
            const float *xr = x + r * n;
            float acc = 0.0f;
            for (int64_t k = 0; k < n; k++) {
                acc += kvs_cpu_f16_to_f32(wr[k]) * xr[k];
            }
            y[r * ldy + o] = bias != NULL ? acc + bias[o] : acc;
        }
    }
}

static void gemm_bf16_scalar(const struct kvs_weight *w, const void *xv, int32_t n_rows,
                             int64_t o0, int64_t o1, const float *bias, float *y, int64_t ldy)
{
    const float *x = xv;
    int64_t n = w->n_in;
    for (int64_t o = o0; o < o1; o++) {
        const uint16_t *wr = (const uint16_t *)((const uint8_t *)w->data + o * w->row_bytes);
        for (int32_t r = 0; r < n_rows; r++) {
            const float *xr = x + r * n;
            float acc = 0.0f;
            for (int64_t k = 0; k < n; k++) {
                acc += kvs_cpu_bf16_to_f32(wr[k]) * xr[k];
            }
            y[r * ldy + o] = bias != NULL ? acc + bias[o] : acc;
        }
    }
}

/* Quantized weights at the scalar level: per element, for each block b in order,
 * acc = acc + (dw * dx) * isum, ms = ms + mw * sx; y = acc + ms (Q4_0: mw = dw, y = acc - 8 ms). */
static void gemm_q_scalar(const struct kvs_weight *w, const void *xv, int32_t n_rows, int64_t o0,
                          int64_t o1, const float *bias, float *y, int64_t ldy)
{
    const struct kvs_cpu_q8g *x = xv;
    const uint32_t type = w->type;
    const int64_t nb = w->n_in / KVS_QK, ng = (nb + KVS_QG - 1) / KVS_QG;
    for (int64_t o = o0; o < o1; o++) {
        const uint8_t *row = (const uint8_t *)w->data + o * w->row_bytes;
        for (int32_t r = 0; r < n_rows; r++) {
            const struct kvs_cpu_q8g *xr = x + r * ng;
            float acc = 0.0f, ms = 0.0f;
            for (int64_t g = 0; g < ng; g++) {
                struct kvs_cpu_rg rg = kvs_cpu_rg_group(type, row, nb, g);
                for (int j = 0; j < rg.n; j++) {
                    const int8_t *xq = xr[g].q[j];
                    int32_t isum = 0;
                    if (type == KVS_DTYPE_Q8_0) {
                        const int8_t *wq = (const int8_t *)rg.qs + j * 32;
                        for (int i = 0; i < KVS_QK; i++) {
                            isum += (int32_t)wq[i] * xq[i];
                        }
                    } else {
                        const uint8_t *qs = rg.qs + j * 16;
                        for (int i = 0; i < 16; i++) {
                            isum += (int32_t)(qs[i] & 0x0f) * xq[i];
                            isum += (int32_t)(qs[i] >> 4) * xq[i + 16];
                        }
                    }
                    float dw = kvs_cpu_f16_to_f32(rg.d[j]);
                    acc = acc + dw * xr[g].d[j] * (float)isum;
                    if (type == KVS_DTYPE_Q4_1) {
                        ms = ms + kvs_cpu_f16_to_f32(rg.m[j]) * xr[g].s[j];
                    } else if (type == KVS_DTYPE_Q4_0) {
                        ms = ms + dw * xr[g].s[j];
                    }
                }
            }
            float v = type == KVS_DTYPE_Q4_0 ? acc - 8.0f * ms : acc + ms;
            y[r * ldy + o] = bias != NULL ? v + bias[o] : v;
        }
    }
}

/* ---- scalar attention helpers ------------------------------------------------------------ */

static void scale_scalar(float *acc, float c, int32_t n)
{
    for (int32_t i = 0; i < n; i++) {
        acc[i] *= c;
    }
}

static void axpy_f32_scalar(float *acc, float p, const float *v, int32_t n)
{
    for (int32_t i = 0; i < n; i++) {
        acc[i] += p * v[i];
    }
}

static void exp_shift_scalar(float *s, int32_t n, float m)
{
    for (int32_t i = 0; i < n; i++) {
        s[i] = expf(s[i] - m);
    }
}

static void scores16_scalar(const float *q, const float *k, int32_t nc, int32_t hd, float scale,
                            float *out)
{
    for (int32_t i = 0; i < nc; i++) {
        float lane[16] = {0};
        for (int32_t d = 0; d < hd; d++) {
            lane[d % 16] = lane[d % 16] + k[(int64_t)i * hd + d] * q[d];
        }
        out[i] = kvs_cpu_reduce16(lane) * scale;
    }
}

static void pv16_scalar(float *acc, const float *p, int32_t ps, const float *v, int64_t vs,
                        int32_t n, int32_t hd)
{
    for (int32_t t = 0; t < n; t++) {
        axpy_f32_scalar(acc, p[(int64_t)t * ps], v + (int64_t)t * vs, hd);
    }
}

static void lanes16_scalar(const float *lanes, int32_t hd, float *out)
{
    for (int32_t d = 0; d < hd; d++) {
        float x[16];
        for (int l = 0; l < 16; l++) {
            x[l] = lanes[(int64_t)l * hd + d];
        }
        out[d] = kvs_cpu_reduce16(x);
    }
}

static void round_f16_scalar(float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        x[i] = kvs_cpu_f16_to_f32(kvs_cpu_f32_to_f16(x[i]));
    }
}

static void f16_to_f32_scalar(const uint16_t *x, float *out, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        out[i] = kvs_cpu_f16_to_f32(x[i]);
    }
}

static void swiglu_scalar(const float *gate, const float *up, int64_t n, float *out)
{
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

static void f32_to_f16_scalar(const float *x, uint16_t *out, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        out[i] = kvs_cpu_f32_to_f16(x[i]);
    }
}

const struct kvs_cpu_kernels kvs_cpu_kernels_scalar = {
    .isa = KVS_CPU_ISA_SCALAR,
    .quantize_q8 = quantize_q8_scalar,
    .gemm_f32 = gemm_f32_scalar,
    .gemm_f16 = gemm_f16_scalar,
    .gemm_bf16 = gemm_bf16_scalar,
    .gemm_q8_0 = gemm_q_scalar,
    .gemm_q4_0 = gemm_q_scalar,
    .gemm_q4_1 = gemm_q_scalar,
    .exp_shift = exp_shift_scalar,
    .scores16 = scores16_scalar,
    .pv16 = pv16_scalar,
    .lanes16 = lanes16_scalar,
    .round_f16 = round_f16_scalar,
    .f16_to_f32 = f16_to_f32_scalar,
    .swiglu = swiglu_scalar,
    .scale = scale_scalar,
    .f32_to_f16 = f32_to_f16_scalar,
};

/* ---- dispatch ------------------------------------------------------------------------------ */

struct quant_job {
    const struct kvs_cpu_kernels *k;
    const float *x;         /* (n_rows, n_in) */
    struct kvs_cpu_q8g *qx; /* (n_rows, ceil(n_in / 256)) */
    int64_t n_in;
};

static void quant_range(void *arg, int64_t r0, int64_t r1, int32_t ith)
{
    const struct quant_job *j = arg;
    int64_t ng = (j->n_in / KVS_QK + KVS_QG - 1) / KVS_QG;
    for (int64_t r = r0; r < r1; r++) {
        j->k->quantize_q8(j->x + r * j->n_in, j->qx + r * ng, j->n_in);
    }
}

void kvs_cpu_pair_q4(uint32_t type, void *data, int64_t n_out, int64_t n_in, size_t row_bytes)
{
    const int64_t nb = n_in / KVS_QK, ng = (nb + KVS_QG - 1) / KVS_QG;
    for (int64_t o = 0; o < n_out; o++) {
        uint8_t *row = (uint8_t *)data + o * row_bytes;
        for (int64_t g = 0; g < ng; g++) {
            struct kvs_cpu_rg rg = kvs_cpu_rg_group(type, row, nb, g);
            for (int j = 0; j + 2 <= rg.n; j += 2) {
                uint8_t *qs = (uint8_t *)rg.qs + j * 16, ea[32], eb[32];
                for (int i = 0; i < 16; i++) {
                    ea[i] = qs[i] & 0x0f;
                    ea[i + 16] = qs[i] >> 4;
                    eb[i] = qs[16 + i] & 0x0f;
                    eb[i + 16] = qs[16 + i] >> 4;
                }
                for (int i = 0; i < 32; i++) {
                    qs[i] = (uint8_t)(ea[i] | (eb[i] << 4));
                }
            }
        }
    }
}

void kvs_cpu_regroup(uint32_t type, const void *src, void *dst, int64_t n_out, int64_t n_in,
                     size_t row_bytes)
{
    const int64_t nb = n_in / KVS_QK, ng = (nb + KVS_QG - 1) / KVS_QG;
    const int qb = kvs_cpu_quant_bytes(type), bb = kvs_cpu_block_bytes(type);
    const int qoff = type == KVS_DTYPE_Q4_1 ? 4 : 2; /* GGUF block: d, (m), quants */
    for (int64_t o = 0; o < n_out; o++) {
        const uint8_t *in = (const uint8_t *)src + o * row_bytes;
        uint8_t *out = (uint8_t *)dst + o * row_bytes;
        for (int64_t g = 0; g < ng; g++) {
            struct kvs_cpu_rg rg = kvs_cpu_rg_group(type, out, nb, g);
            uint8_t *qs = (uint8_t *)rg.qs;
            for (int j = 0; j < rg.n; j++) {
                const uint8_t *blk = in + (g * KVS_QG + j) * bb;
                memcpy(qs + j * qb, blk + qoff, (size_t)qb);
                memcpy((uint8_t *)rg.d + 2 * j, blk, 2);
                if (rg.m != NULL) {
                    memcpy((uint8_t *)rg.m + 2 * j, blk + 2, 2);
                }
            }
        }
    }
}

struct gemm_job {
    kvs_cpu_gemm_fn fn;
    const struct kvs_weight *w;
    const void *x;
    int32_t n_rows;
    const float *bias;
    float *y;
};

static void gemm_range(void *arg, int64_t o0, int64_t o1, int32_t ith)
{
    const struct gemm_job *j = arg;
    j->fn(j->w, j->x, j->n_rows, o0, o1, j->bias, j->y, j->w->n_out);
}

int kvs_cpu_matmul(kvs_backend *b, const struct kvs_weight *w, const float *x, int32_t n_rows,
                   const float *bias, float *y)
{
    struct kvs_cpu *c = b->ctx;
    const struct kvs_cpu_kernels *k = c->k;
    assert(w != NULL && w->data != NULL && x != NULL && y != NULL && n_rows >= 0);
    if (n_rows == 0) {
        return 0;
    }
    kvs_cpu_gemm_fn fn = NULL;
    bool quantized = false;
    switch (w->type) {
    case KVS_DTYPE_F32:
        fn = k->gemm_f32;
        break;
    case KVS_DTYPE_F16:
        fn = k->gemm_f16;
        break;
    case KVS_DTYPE_BF16:
        fn = k->gemm_bf16;
        break;
    case KVS_DTYPE_Q8_0:
        fn = k->gemm_q8_0;
        quantized = true;
        break;
    case KVS_DTYPE_Q4_0:
        fn = k->gemm_q4_0;
        quantized = true;
        break;
    case KVS_DTYPE_Q4_1:
        fn = k->gemm_q4_1;
        quantized = true;
        break;
    default:
        return KVS_UNSUPPORTED;
    }
    const void *xin = x;
    if (quantized) {
        if (w->n_in % KVS_QK != 0) {
            return KVS_INVALID_ARGUMENT;
        }
        int64_t ng = (w->n_in / KVS_QK + KVS_QG - 1) / KVS_QG;
        /* the groups, then (Q4_1) the sums of each quad of rows transposed (cpu_impl.h) */
        int64_t n_st = w->type == KVS_DTYPE_Q4_1 ? (int64_t)(n_rows / 4) * ng * 32 : 0;
        int64_t n_extra = (n_st * (int64_t)sizeof(float) + (int64_t)sizeof(struct kvs_cpu_q8g) - 1) /
                          (int64_t)sizeof(struct kvs_cpu_q8g);
        KVS_TRY(kvs_cpu_scratch_reserve((void **)&c->qx, &c->cap_qx,
                                        (int64_t)n_rows * ng + n_extra,
                                        sizeof(struct kvs_cpu_q8g)));
        struct quant_job qj = {.k = k, .x = x, .qx = c->qx, .n_in = w->n_in};
        /* a row takes ~n_in ns: only batches are worth waking the workers for */
        kvs_threadpool_for(c->pool, n_rows, 4, quant_range, &qj);
        float *st = (float *)(c->qx + (int64_t)n_rows * ng);
        for (int64_t q = 0; q < (n_st > 0 ? n_rows / 4 : 0); q++) {
            for (int64_t g = 0; g < ng; g++) {
                for (int jj = 0; jj < KVS_QG; jj++) {
                    for (int r = 0; r < 4; r++) {
                        st[((q * ng + g) * KVS_QG + jj) * 4 + r] = c->qx[(q * 4 + r) * ng + g].s[jj];
                    }
                }
            }
        }
        xin = c->qx;
    }
    struct gemm_job gj = {.fn = fn, .w = w, .x = xin, .n_rows = n_rows, .bias = bias, .y = y};
    /* grains of 16 outputs keep the tiles (4 outputs wide) whole; 2+ grains per thread */
    kvs_threadpool_for(c->pool, w->n_out, 16, gemm_range, &gj);
    return 0;
}
