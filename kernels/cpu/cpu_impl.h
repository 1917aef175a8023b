/* Internals shared by the CPU backend's files (not a public header).
 *
 * ISA levels: the backend picks one level when it is created (the best the CPU supports,
 * lowered by KVS_CPU_ISA=scalar|avx2|avx512) and uses that level's kernel table for every
 * op. Results may differ between levels; within one level every kernel is batch-invariant
 * (see kernels/backend.h).
 *
 * Quantized matmuls first quantize each activation row to struct kvs_cpu_q8 blocks (32
 * values, per-block f32 scale, round to nearest even), then take integer dot products
 * against the weight blocks: y = sum_b dw_b * dx_b * isum_b (+ m_b * sx_b for Q4_1,
 * - 8 * dw_b * sx_b for Q4_0), summed over blocks b in order.
 */
#ifndef KVS_CPU_IMPL_H
#define KVS_CPU_IMPL_H

#include "common/status.h"
#include "kernels/backend.h"
#include "kernels/cpu/threadpool.h"
#include "kernels/dtype.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__FAST_MATH__)
#error "the CPU backend relies on IEEE evaluation order; do not build it with -ffast-math"
#endif

enum kvs_cpu_isa {
    KVS_CPU_ISA_SCALAR = 0, /* portable C */
    KVS_CPU_ISA_AVX2 = 1,   /* AVX2 + FMA + F16C */
    KVS_CPU_ISA_AVX512 = 2, /* AVX-512 F/BW/VL/DQ + VNNI (integer dots via vpdpbusd) */
};

/* The best level this CPU supports, lowered (never raised) by KVS_CPU_ISA. */
int kvs_cpu_isa_detect(void);
/* "scalar", "avx2", "avx512". */
const char *kvs_cpu_isa_name(int isa);

#define KVS_QK 32 /* elements per quantized block */
#define KVS_QG 8  /* blocks per group of the regrouped rows below */

/* Quantized activations, 8 blocks (256 values) per group; x ~= d[j] * q[j][i]. A row of n
 * values takes ceil(n / 256) groups; blocks past the row's end are zero (q, d, s = 0). */
struct kvs_cpu_q8g {
    int8_t q[KVS_QG][KVS_QK]; /* round(x / d), ties to even */
    float d[KVS_QG];          /* scales: max|x| / 127 rounded to f16 (0 for all-zero blocks) */
    float s[KVS_QG];          /* d * sum(q) rounded to f16: for the Q4_1 / Q4_0 offset terms */
};

/* Regrouped quantized weight rows (what weight_load keeps in kvs_weight.data; the row size
 * is GGUF's): each group of up to 8 blocks (n = 8, or fewer in the row's last group) holds
 * the blocks' quants (n x 16 bytes for Q4_0/Q4_1, n x 32 for Q8_0), then their f16 scales
 * d (n x 2 bytes), then for Q4_1 their f16 mins m (n x 2). Group g starts at byte
 * 8 * g * block_bytes of the row. Quant bytes keep GGUF's order (low nibbles = elements
 * 0..15, high nibbles = 16..31). */
struct kvs_cpu_rg {
    const uint8_t *qs;  /* (n, 16 or 32) */
    const uint16_t *d;  /* (n) f16 */
    const uint16_t *m;  /* (n) f16, Q4_1 only (else NULL) */
    int n;              /* blocks in the group */
};

static inline int kvs_cpu_quant_bytes(uint32_t type)
{
    return type == KVS_DTYPE_Q8_0 ? 32 : 16;
}

static inline int kvs_cpu_block_bytes(uint32_t type)
{
    return type == KVS_DTYPE_Q8_0 ? 34 : (type == KVS_DTYPE_Q4_1 ? 20 : 18);
}

/* Group g of a regrouped row of nb blocks. */
static inline struct kvs_cpu_rg kvs_cpu_rg_group(uint32_t type, const uint8_t *row, int64_t nb,
                                                 int64_t g)
{
    struct kvs_cpu_rg r;
    int64_t left = nb - g * KVS_QG;
    r.n = left < KVS_QG ? (int)left : KVS_QG;
    r.qs = row + g * KVS_QG * kvs_cpu_block_bytes(type);
    r.d = (const uint16_t *)(r.qs + r.n * kvs_cpu_quant_bytes(type));
    r.m = type == KVS_DTYPE_Q4_1 ? r.d + r.n : NULL;
    return r;
}

/* At the AVX-512 level, Q4_0/Q4_1 rows are further pair-packed in place: in each group the
 * 32 quant bytes of blocks j, j+1 (j even, j + 1 < n) become byte i = element i of block j
 * | element i of block j+1 << 4; an odd last block keeps GGUF's nibble order. */
void kvs_cpu_pair_q4(uint32_t type, void *data, int64_t n_out, int64_t n_in, size_t row_bytes);

static inline bool kvs_cpu_paired_q4(int isa, uint32_t type)
{
    return isa == KVS_CPU_ISA_AVX512 && type == KVS_DTYPE_Q4_0;
}

/* Zero the blocks of the last group past nb (a row's padding). */
static inline void kvs_cpu_q8g_pad(struct kvs_cpu_q8g *groups, int64_t nb)
{
    struct kvs_cpu_q8g *g = &groups[nb / KVS_QG];
    for (int j = (int)(nb % KVS_QG); j > 0 && j < KVS_QG; j++) {
        memset(g->q[j], 0, KVS_QK);
        g->d[j] = 0.0f;
        g->s[j] = 0.0f;
    }
}

/* Regroup n_out GGUF rows (row_bytes each) of a quantized type from src into dst. */
void kvs_cpu_regroup(uint32_t type, const void *src, void *dst, int64_t n_out, int64_t n_in,
                     size_t row_bytes);

/* GGUF weight blocks (kernels/dtype.h), as the host data arrives. */
struct kvs_cpu_block_q8_0 {
    uint16_t d;
    int8_t q[32];
};
struct kvs_cpu_block_q4_0 {
    uint16_t d;
    uint8_t qs[16];
};
struct kvs_cpu_block_q4_1 {
    uint16_t d;
    uint16_t m;
    uint8_t qs[16];
};
_Static_assert(sizeof(struct kvs_cpu_block_q8_0) == 34, "Q8_0 block");
_Static_assert(sizeof(struct kvs_cpu_block_q4_0) == 18, "Q4_0 block");
_Static_assert(sizeof(struct kvs_cpu_block_q4_1) == 20, "Q4_1 block");

/* Compute y[r * ldy + o] for rows r in [0, n_rows) and outputs o in [o0, o1). x is the
 * f32 activations (float weights), row r at x + r * n_in, or the kvs_cpu_q8g groups
 * (quantized weights), row r at x + r * ng (ng = ceil(n_in / 256)); for Q4_1 the groups are
 * followed by the activation sums of each quad of rows transposed: floats, quad q, group g,
 * block j, row i (< 4) at ((q * ng + g) * 8 + j) * 4 + i. bias may be NULL. */
typedef void (*kvs_cpu_gemm_fn)(const struct kvs_weight *w, const void *x, int32_t n_rows,
                                int64_t o0, int64_t o1, const float *bias, float *y,
                                int64_t ldy);

/* One ISA level's kernels. Every function computes each output element in an order that
 * depends only on that element's inputs. */
struct kvs_cpu_kernels {
    int isa;
    /* x (n) -> ceil(n / 256) groups; n a multiple of 32 */
    void (*quantize_q8)(const float *x, struct kvs_cpu_q8g *out, int64_t n);
    kvs_cpu_gemm_fn gemm_f32, gemm_f16, gemm_bf16, gemm_q8_0, gemm_q4_0, gemm_q4_1;
    /* attention in llama.cpp's CPU order (attention.c), rows of hd floats:
     * scores16: out[i] = dot16(q, k + i * hd) * scale, where dot16 runs 16 lanes (lane =
     *   d % 16, a chain over d in order per lane) summed by kvs_cpu_reduce16's tree
     * pv16: acc[d] = acc[d] + p[t * ps] * v[t * vs + d] for t < n in order (fused at the x86
     *   levels): one lane of the P.V chains
     * lanes16: out[d] = kvs_cpu_reduce16 of lanes[l * hd + d] over l */
    void (*scores16)(const float *q, const float *k, int32_t nc, int32_t hd, float scale,
                     float *out);
    void (*pv16)(float *acc, const float *p, int32_t ps, const float *v, int64_t vs, int32_t n,
                 int32_t hd);
    void (*lanes16)(const float *lanes, int32_t hd, float *out);
    /* x = f16_to_f32(f32_to_f16(x)) (round to nearest even), n elements */
    void (*round_f16)(float *x, int64_t n);
    /* out = f16 x widened to f32 (exact), n elements */
    void (*f16_to_f32)(const uint16_t *x, float *out, int64_t n);
    /* out[i] = gate[i] / (1 + exp(-gate[i])) * up[i] with the level's exp */
    void (*swiglu)(const float *gate, const float *up, int64_t n, float *out);
    /* acc = acc * c (n) */
    void (*scale)(float *acc, float c, int32_t n);
    /* s[i] = exp(s[i] - m), in place (the level's exp: libm expf, or a vector one: at the
     * AVX-512 level llama.cpp's ggml_v_expf, lane for lane) */
    void (*exp_shift)(float *s, int32_t n, float m);
    /* f32 -> f16 (round to nearest even) */
    void (*f32_to_f16)(const float *x, uint16_t *out, int64_t n);
};

extern const struct kvs_cpu_kernels kvs_cpu_kernels_scalar;
#if defined(__x86_64__)
extern const struct kvs_cpu_kernels kvs_cpu_kernels_avx2;
extern const struct kvs_cpu_kernels kvs_cpu_kernels_avx512;
#endif

/* Per-thread scratch for attention. */
struct kvs_cpu_thread_scratch {
    float *scores; /* (cap_scores) a query, 16 lanes of outputs, scores, a tile's K and V */
    int64_t cap_scores;
};

/* Attention scratch shared by the threads of one call (kernels/cpu/attention.c). */
struct kvs_cpu_attn_scratch {
    int32_t *idx;  /* (cap_idx) first row of each tile */
    int64_t cap_idx;
};

/* x[0] + ... + x[15] in the order of _mm512_reduce_add_ps (GCC's): lanes i + 8 onto i, then
 * i + 4 onto i, then (0 + 2) + (1 + 3). */
static inline float kvs_cpu_reduce16(const float *x)
{
    float t3[8], t6[4];
    for (int i = 0; i < 8; i++) {
        t3[i] = x[i + 8] + x[i];
    }
    for (int i = 0; i < 4; i++) {
        t6[i] = t3[i + 4] + t3[i];
    }
    return (t6[0] + t6[2]) + (t6[1] + t6[3]);
}

/* The backend context (kvs_backend.ctx). */
struct kvs_cpu {
    const struct kvs_cpu_kernels *k; /* the chosen ISA level's kernels */
    kvs_threadpool *pool;
    int32_t n_threads;
    struct kvs_cpu_q8g *qx; /* (cap_qx) quantized activations of the current matmul */
    int64_t cap_qx;         /* groups */
    float *rope_cs;         /* (cap_rope) cos/sin table: (n_rows, n_dims / 2, 2) */
    int64_t cap_rope;       /* floats */
    int32_t *rope_pos;      /* (cap_rope_pos) positions the table was made for */
    int64_t cap_rope_pos;
    int32_t rope_rows;      /* rows in the table; 0 = none */
    struct kvs_rope rope_key; /* parameters the table was made for (freq_factors by value) */
    float rope_factors[512];  /* copy of freq_factors (n_dims / 2 <= 512) */
    struct kvs_cpu_thread_scratch *ts; /* (n_threads) */
    struct kvs_cpu_attn_scratch attn;  /* grown by attention, freed with the context */
};

/* Grow a 64-byte aligned scratch buffer to at least `need` elements of `elem` bytes; keeps
 * nothing. Returns 0 or KVS_NO_MEMORY. */
int kvs_cpu_scratch_reserve(void **buf, int64_t *cap, int64_t need, size_t elem);

/* Ops (cpu_backend.c fills the vtable with these). */
int kvs_cpu_matmul(kvs_backend *b, const struct kvs_weight *w, const float *x, int32_t n_rows,
                   const float *bias, float *y);
int kvs_cpu_get_rows(kvs_backend *b, const struct kvs_weight *table, const int32_t *host_ids,
                     int32_t n, float *out);
int kvs_cpu_rmsnorm(kvs_backend *b, const float *x, const float *w, int32_t n_rows, int32_t dim,
                    float eps, float *out);
int kvs_cpu_rope(kvs_backend *b, float *x, int32_t n_rows, int32_t n_heads, int32_t head_dim,
                 const int32_t *host_pos, const struct kvs_rope *rope);
int kvs_cpu_swiglu(kvs_backend *b, const float *gate, const float *up, int64_t n, float *out);
int kvs_cpu_add(kvs_backend *b, float *x, const float *y, int64_t n);
int kvs_cpu_gather(kvs_backend *b, const float *x, const int32_t *host_idx, int32_t n,
                   int32_t dim, float *out);
int kvs_cpu_kv_new(kvs_backend *b, const struct kvs_kv_layout *layout, kvs_kv_cache **out);
void kvs_cpu_kv_destroy(kvs_backend *b, kvs_kv_cache **kv);
int kvs_cpu_kv_copy_block(kvs_backend *b, kvs_kv_cache *kv, int32_t src, int32_t dst);
int kvs_cpu_kv_read_block(kvs_backend *b, kvs_kv_cache *kv, int32_t block, void *host_buf);
int kvs_cpu_kv_write_block(kvs_backend *b, kvs_kv_cache *kv, int32_t block,
                           const void *host_buf);
int kvs_cpu_kv_store(kvs_backend *b, kvs_kv_cache *kv, int32_t layer, const float *k,
                     const float *v, const struct kvs_attn_batch *ab);
int kvs_cpu_attention(kvs_backend *b, kvs_kv_cache *kv, int32_t layer, const float *q,
                      int32_t n_head, float scale, const struct kvs_attn_batch *ab, float *out);

/* Scalar half-precision conversions (round to nearest even), usable from every file. */
static inline float kvs_cpu_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13); /* inf / nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalize */
        int e = -1;
        do {
            e++;
            man <<= 1;
        } while ((man & 0x400) == 0);
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t kvs_cpu_f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) { /* inf / nan */
        return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 | ((ax >> 13) & 0x3ff) : 0));
    }
    if (ax >= 0x477ff000u) { /* rounds to >= 65520: overflow */
        return (uint16_t)(sign | 0x7c00);
    }
    if (ax < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        if (ax < 0x33000000u) {
            return (uint16_t)sign; /* < 2^-25: rounds to zero */
        }
        uint32_t e = ax >> 23;
        uint32_t m = (ax & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e; /* 14..24 */
        uint32_t r = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) {
            r++;
        }
        return (uint16_t)(sign | r);
    }
    uint32_t r = ax + 0xfff + ((ax >> 13) & 1); /* round to nearest even */
    r -= 0x38000000u;                            /* rebias 127 -> 15 */
    return (uint16_t)(sign | (r >> 13));
}

static inline float kvs_cpu_bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#endif
