/* AVX-512 level kernels: the x86 template with vpdpbusd (AVX512-VNNI on 256-bit vectors)
 * for the integer dots and 32 vector registers for wider tiles. The integer block sums are
 * the same as the AVX2 level's; only the tile shapes differ. */
#if defined(__x86_64__)
#pragma GCC target("avx512vnni")
#endif

#include "kernels/cpu/cpu_impl.h"

#if defined(__x86_64__)

#define KVS_X86_NAME(s) s##_avx512
#define KVS_X86_VNNI 1
#define KVS_X86_TILE_R 4 /* 32 registers: 4 rows x 2 outputs */
#define KVS_X86_TILE_C 2
#define KVS_X86_PAIRED_Q4 1
#define KVS_X86_SCORES_NQ 3 /* queries per scores tile: 24 accumulators */
#define KVS_X86_PV_NQ 4     /* weight rows per pv tile */
#include "kernels/cpu/matmul_x86.h"

/* Q4_0 on pair-packed rows (kvs_cpu_pair_q4): the 32 bytes of blocks j, j+1 of a group hold
 * element i of block j in the low nibble of byte i and element i of block j+1 in the high
 * nibble, so [bytes & 15 | bytes >> 4 & 15] is the 64 elements in order and one 512-bit
 * vpdpbusd against the activation's q[j], q[j+1] (64 contiguous bytes) gives lanes 0..7 =
 * block j (lane i = products 4i..4i+3), 8..15 = block j+1. An odd last block of a short
 * group keeps GGUF's nibble order and takes the same path with a zero partner.
 * Per element, the order of the AVX2 level (matmul_x86.h): the 16 lanes of a pair's isum are
 * two blocks' 8 lanes, folded into one 8-lane acc = fma(set1(sc_j), lo, acc), then
 * fma(set1(sc_j+1), hi, acc); ms (8 lanes) = fma(dw8, sx8, ms) per group,
 * y = hsum8(acc) - 8 hsum8(ms). Q4_1 takes the template's tile with 4 x 2 tiles (measured
 * faster than pairs once its chain is llama.cpp's single 8-lane one: 5.3 vs 6.0 ms for
 * 512 x 576 x 576 on one thread). */
KVS_INLINE __m512i unpack_q4_pair(const uint8_t *qs)
{
    __m256i t = _mm256_loadu_si256((const __m256i *)qs);
    __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(t), _mm256_srli_epi16(t, 4), 1);
    return _mm512_and_si512(z, _mm512_set1_epi8(0x0f));
}

KVS_INLINE __m512i unpack_q4_single(const uint8_t *qs)
{
    return _mm512_zextsi256_si512(unpack_q4(qs));
}

#define Q_PAIR(TYPE, jp, UNPACK)                                                               \
    {                                                                                          \
        const __m512i wq = UNPACK(rg.qs + (jp) * 16);                                          \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                   \
        {                                                                                      \
            __m512i xq = _mm512_loadu_si512((const void *)x[r * ldx + g].q[jp]);               \
            __m512 isum = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, xq)); \
            acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(scm[r][jp]),                            \
                                        _mm512_castps512_ps256(isum), acc[r][c]);              \
            if ((jp) + 1 < rg.n) {                                                             \
                acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(scm[r][(jp) + 1]),                  \
                                            _mm512_extractf32x8_ps(isum, 1), acc[r][c]);       \
            }                                                                                  \
        }                                                                                      \
    }

#define Q_TILE_PAIRED(NAME, TYPE)                                                              \
    KVS_INLINE void NAME(const uint8_t *w, size_t row_bytes, const struct kvs_cpu_q8g *x,     \
                         const float *xst, int64_t ldx, int64_t nb, const int R, const int C,  \
                         float *out, int64_t ldo)                                              \
    {                                                                                          \
        __m256 acc[4][4], ms[4][4];                                                            \
        float msum[4][4];                                                                      \
        __m128 msv[4];                                                                         \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                   \
        {                                                                                      \
            _Pragma("GCC unroll 8") for (int c = 0; c < C; c++)                               \
            {                                                                                  \
                acc[r][c] = _mm256_setzero_ps();                                               \
                ms[r][c] = _mm256_setzero_ps();                                                \
                msum[r][c] = 0.0f;                                                             \
                msv[c] = _mm_setzero_ps();                                                     \
            }                                                                                  \
        }                                                                                      \
        const int64_t ng = (nb + KVS_QG - 1) / KVS_QG;                                         \
        for (int64_t g = 0; g < ng; g++) {                                                     \
            float mwf[4][KVS_QG];                                                              \
            const int gn = nb - g * KVS_QG < KVS_QG ? (int)(nb - g * KVS_QG) : KVS_QG;         \
            _Pragma("GCC unroll 8") for (int c = 0; c < C; c++)                               \
            {                                                                                  \
                const struct kvs_cpu_rg rg = kvs_cpu_rg_group(TYPE, w + c * row_bytes, nb, g); \
                Q_SCALES(TYPE)                                                                 \
                if (rg.n == KVS_QG) {                                                          \
                    Q_PAIR(TYPE, 0, unpack_q4_pair) Q_PAIR(TYPE, 2, unpack_q4_pair)                \
                    Q_PAIR(TYPE, 4, unpack_q4_pair) Q_PAIR(TYPE, 6, unpack_q4_pair)                \
                } else {                                                                       \
                    int jp = 0;                                                                \
                    for (; jp + 2 <= rg.n; jp += 2) {                                          \
                        Q_PAIR(TYPE, jp, unpack_q4_pair)                                           \
                    }                                                                          \
                    if (jp < rg.n) {                                                           \
                        Q_PAIR(TYPE, jp, unpack_q4_single)                                         \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
            Q_MSUM_GROUP(TYPE)                                                                 \
        }                                                                                      \
        Q_MSUM_FINAL()                                                                         \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                   \
        {                                                                                      \
            _Pragma("GCC unroll 8") for (int c = 0; c < C; c++)                               \
            {                                                                                  \
                float v = hsum8(acc[r][c]);                                                    \
                if (TYPE == KVS_DTYPE_Q4_1) {                                                  \
                    v = v + msum[r][c];                                                        \
                } else {                                                                       \
                    v = v - 8.0f * hsum8(ms[r][c]);                                            \
                }                                                                              \
                out[r * ldo + c] = v;                                                          \
            }                                                                                  \
        }                                                                                      \
    }

Q_TILE_PAIRED(tile_q4_0, KVS_DTYPE_Q4_0)
GEMM_Q_DRIVER(gemm_q4_0, tile_q4_0)

const struct kvs_cpu_kernels kvs_cpu_kernels_avx512 = {
    .isa = KVS_CPU_ISA_AVX512,
    .quantize_q8 = quantize_q8_avx512,
    .gemm_f32 = gemm_f32_avx512,
    .gemm_f16 = gemm_f16_avx512,
    .gemm_bf16 = gemm_bf16_avx512,
    .gemm_q8_0 = gemm_q8_0_avx512,
    .gemm_q4_0 = gemm_q4_0_avx512,
    .gemm_q4_1 = gemm_q4_1_avx512,
    .exp_shift = exp_shift_avx512,
    .scores16 = scores16_avx512,
    .pv16 = pv16_avx512,
    .lanes16 = lanes16_avx512,
    .round_f16 = round_f16_avx512,
    .f16_to_f32 = f16_to_f32_avx512,
    .swiglu = swiglu_avx512,
    .scale = scale_avx512,
    .f32_to_f16 = f32_to_f16_avx512,
};

#endif
