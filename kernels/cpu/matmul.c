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
#include "kernels/dtype.h"

#include <assert.h>
#include <math.h>
#include <stdlib.h>

/* ---- scalar kernels --------------------------------------------------------------------- */

static void quantize_q8_scalar(const float *x, struct kvs_cpu_q8 *out, int64_t n)
{
    for (int64_t b = 0; b < n / KVS_QK; b++) {
        const float *xb = x + b * KVS_QK;
        float amax = 0.0f;
        for (int j = 0; j < KVS_QK; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.0f;
        float id = amax != 0.0f ? 127.0f / amax : 0.0f; /* as llama.cpp's x86 path */
        int32_t sum = 0;
        for (int j = 0; j < KVS_QK; j++) {
            int32_t q = (int32_t)nearbyintf(xb[j] * id);
            q = q > 127 ? 127 : (q < -127 ? -127 : q);
            out[b].q[j] = (int8_t)q;
            sum += q;
        }
        /* d and s are rounded through fp16 as llama.cpp's Q8_1/Q8_0 blocks store them, so
         * quantized models match llama.cpp's numerics (q itself uses the f32 d, as there) */
        out[b].d = kvs_fp16_to_fp32(kvs_fp32_to_fp16(d));
        out[b].s = kvs_fp16_to_fp32(kvs_fp32_to_fp16(d * (float)sum));
    }
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

static void gemm_q8_0_scalar(const struct kvs_weight *w, const void *xv, int32_t n_rows,
                             int64_t o0, int64_t o1, const float *bias, float *y, int64_t ldy)
{
    const struct kvs_cpu_q8 *x = xv;
    int64_t nb = w->n_in / KVS_QK;
    for (int64_t o = o0; o < o1; o++) {
        const struct kvs_cpu_block_q8_0 *wb =
            (const void *)((const uint8_t *)w->data + o * w->row_bytes);
        for (int32_t r = 0; r < n_rows; r++) {
            const struct kvs_cpu_q8 *xb = x + r * nb;
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                int32_t isum = 0;
                for (int j = 0; j < KVS_QK; j++) {
                    isum += (int32_t)wb[b].q[j] * xb[b].q[j];
                }
                acc += kvs_cpu_f16_to_f32(wb[b].d) * xb[b].d * (float)isum;
            }
            y[r * ldy + o] = bias != NULL ? acc + bias[o] : acc;
        }
    }
}

static void gemm_q4_0_scalar(const struct kvs_weight *w, const void *xv, int32_t n_rows,
                             int64_t o0, int64_t o1, const float *bias, float *y, int64_t ldy)
{
    const struct kvs_cpu_q8 *x = xv;
    int64_t nb = w->n_in / KVS_QK;
    for (int64_t o = o0; o < o1; o++) {
        const struct kvs_cpu_block_q4_0 *wb =
            (const void *)((const uint8_t *)w->data + o * w->row_bytes);
        for (int32_t r = 0; r < n_rows; r++) {
            const struct kvs_cpu_q8 *xb = x + r * nb;
            float acc = 0.0f, ms = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                int32_t isum = 0;
                for (int j = 0; j < 16; j++) {
                    isum += (int32_t)(wb[b].qs[j] & 0x0f) * xb[b].q[j];
                    isum += (int32_t)(wb[b].qs[j] >> 4) * xb[b].q[j + 16];
                }
                float dw = kvs_cpu_f16_to_f32(wb[b].d);
                acc += dw * xb[b].d * (float)isum;
                ms += dw * xb[b].s;
            }
            float v = acc - 8.0f * ms;
            y[r * ldy + o] = bias != NULL ? v + bias[o] : v;
        }
    }
}

static void gemm_q4_1_scalar(const struct kvs_weight *w, const void *xv, int32_t n_rows,
                             int64_t o0, int64_t o1, const float *bias, float *y, int64_t ldy)
{
    const struct kvs_cpu_q8 *x = xv;
    int64_t nb = w->n_in / KVS_QK;
    for (int64_t o = o0; o < o1; o++) {
        const struct kvs_cpu_block_q4_1 *wb =
            (const void *)((const uint8_t *)w->data + o * w->row_bytes);
        for (int32_t r = 0; r < n_rows; r++) {
            const struct kvs_cpu_q8 *xb = x + r * nb;
            float acc = 0.0f, ms = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                int32_t isum = 0;
                for (int j = 0; j < 16; j++) {
                    isum += (int32_t)(wb[b].qs[j] & 0x0f) * xb[b].q[j];
                    isum += (int32_t)(wb[b].qs[j] >> 4) * xb[b].q[j + 16];
                }
                acc += kvs_cpu_f16_to_f32(wb[b].d) * xb[b].d * (float)isum;
                ms += kvs_cpu_f16_to_f32(wb[b].m) * xb[b].s;
            }
            float v = acc + ms;
            y[r * ldy + o] = bias != NULL ? v + bias[o] : v;
        }
    }
}

/* ---- scalar attention helpers ------------------------------------------------------------ */

static float dot_f32_scalar(const float *q, const float *k, int32_t n)
{
    float acc = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        acc += q[i] * k[i];
    }
    return acc;
}

static float dot_f16_scalar(const float *q, const uint16_t *k, int32_t n)
{
    float acc = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        acc += q[i] * kvs_cpu_f16_to_f32(k[i]);
    }
    return acc;
}

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

static void axpy_f16_scalar(float *acc, float p, const uint16_t *v, int32_t n)
{
    for (int32_t i = 0; i < n; i++) {
        acc[i] += p * kvs_cpu_f16_to_f32(v[i]);
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
    .gemm_q8_0 = gemm_q8_0_scalar,
    .gemm_q4_0 = gemm_q4_0_scalar,
    .gemm_q4_1 = gemm_q4_1_scalar,
    .dot_f32 = dot_f32_scalar,
    .dot_f16 = dot_f16_scalar,
    .scale = scale_scalar,
    .axpy_f32 = axpy_f32_scalar,
    .axpy_f16 = axpy_f16_scalar,
    .f32_to_f16 = f32_to_f16_scalar,
};

/* ---- dispatch ------------------------------------------------------------------------------ */

struct quant_job {
    const struct kvs_cpu_kernels *k;
    const float *x;         /* (n_rows, n_in) */
    struct kvs_cpu_q8 *qx;  /* (n_rows, n_in / 32) */
    int64_t n_in;
};

static void quant_range(void *arg, int64_t r0, int64_t r1, int32_t ith)
{
    const struct quant_job *j = arg;
    int64_t nb = j->n_in / KVS_QK;
    for (int64_t r = r0; r < r1; r++) {
        j->k->quantize_q8(j->x + r * j->n_in, j->qx + r * nb, j->n_in);
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
        int64_t nb = w->n_in / KVS_QK;
        KVS_TRY(kvs_cpu_scratch_reserve((void **)&c->qx, &c->cap_qx, (int64_t)n_rows * nb,
                                        sizeof(struct kvs_cpu_q8)));
        struct quant_job qj = {.k = k, .x = x, .qx = c->qx, .n_in = w->n_in};
        /* a row takes ~n_in ns: only batches are worth waking the workers for */
        kvs_threadpool_for(c->pool, n_rows, 4, quant_range, &qj);
        xin = c->qx;
    }
    struct gemm_job gj = {.fn = fn, .w = w, .x = xin, .n_rows = n_rows, .bias = bias, .y = y};
    /* grains of 16 outputs keep the tiles (4 outputs wide) whole; 2+ grains per thread */
    kvs_threadpool_for(c->pool, w->n_out, 16, gemm_range, &gj);
    return 0;
}
