/* x86 SIMD kernels, a template included by matmul_avx2.c and matmul_avx512.c (not a header
 * of its own). The includer defines:
 *   KVS_X86_NAME(s)  symbol suffixing, e.g. s##_avx2
 *   KVS_X86_VNNI     1 to take u8 x s8 dot products with vpdpbusd (AVX512-VNNI, 256-bit)
 *   KVS_X86_TILE_R, KVS_X86_TILE_C   rows x outputs of the multi-row quantized tile
 *   KVS_X86_PAIRED_Q4 1 when the includer defines its own Q4_0 tile (pair-packed rows)
 *
 * Per-element order (the batch-invariance contract, identical in every tile shape):
 *   quantized: acc (8 lanes) = fma(set1(dw_b * dx_b), cvt(isum8_b), acc) for blocks b in
 *              order, where isum8_b lane i = sum of products 4i..4i+3 of the block (exact
 *              integers, the same from maddubs+madd and from vpdpbusd);
 *              Q4_1: ms (a scalar) = fma(mw_b, sx_b, ms) for blocks b in order,
 *              y = hsum(acc) + ms: llama.cpp's ggml_vec_dot_q4_1_q8_1 on x86, bit for bit;
 *              Q4_0: per group of 8 blocks ms (8 lanes, lane j = block j of each group) =
 *              fma(dw8, sx8, ms), y = hsum(acc) - 8 * hsum(ms).
 *   float:     four 8-lane accumulators a_j over k = 32i + 8j + lane, then k-chunks of 8 in
 *              a_0, y = hsum((a_0 + a_1) + (a_2 + a_3)), then the k % 8 tail one by one.
 *   hsum(v):   (lo128 + hi128), then (+ movehl), then (+ lane 1).
 */
#include <immintrin.h>
#include <math.h>

#define KVS_INLINE static inline __attribute__((always_inline))

KVS_INLINE float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* lane i = sum_{j<4} u[4i+j] * s[4i+j], u unsigned bytes, s signed bytes */
KVS_INLINE __m256i dot_u8s8(__m256i u, __m256i s)
{
#if KVS_X86_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* 16 bytes of nibbles -> 32 bytes: low nibbles (elements 0..15), then high (16..31). */
KVS_INLINE __m256i unpack_q4(const uint8_t *qs)
{
    __m128i t = _mm_loadu_si128((const __m128i *)qs);
    __m256i v = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0f));
}

KVS_INLINE float f16(uint16_t h)
{
    return _cvtsh_ss(h);
}

static void KVS_X86_NAME(quantize_q8)(const float *x, struct kvs_cpu_q8g *out, int64_t n)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const int64_t nb = n / KVS_QK;
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * KVS_QK;
        struct kvs_cpu_q8g *grp = &out[b / KVS_QG];
        const int j = (int)(b % KVS_QG);
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        float d = amax / 127.0f;
        float id = amax != 0.0f ? 127.0f / amax : 0.0f; /* as llama.cpp's x86 path */
        __m256 vid = _mm256_set1_ps(id);
        /* cvtps rounds to nearest even, as nearbyintf in the scalar level */
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        int32_t sum = _mm_cvtsi128_si32(s4);
        __m256i p0 = _mm256_packs_epi32(i0, i1); /* 0-3 8-11 4-7 12-15 */
        __m256i p1 = _mm256_packs_epi32(i2, i3); /* 16-19 24-27 20-23 28-31 */
        __m256i p = _mm256_packs_epi16(p0, p1);
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)grp->q[j], p);
        /* d and s rounded through f16 as llama.cpp's Q8_1 blocks store them */
        grp->d[j] = _cvtsh_ss(_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT));
        grp->s[j] = _cvtsh_ss(_cvtss_sh(d * (float)sum, _MM_FROUND_TO_NEAREST_INT));
    }
    kvs_cpu_q8g_pad(out, nb);
}

/* 8 f16 values (n <= 8 of them; lanes >= n are 0) -> f32 lanes. Reads 16 bytes even when
 * n < 8: weight_load leaves 64 bytes of slack after the last row. */
KVS_INLINE __m256 load_f16x8(const uint16_t *p, int n)
{
    __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    if (n == KVS_QG) {
        return v;
    }
    const __m256 lane = _mm256_setr_ps(0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f);
    return _mm256_and_ps(v, _mm256_cmp_ps(lane, _mm256_set1_ps((float)n), _CMP_LT_OQ));
}

/* ---- quantized tiles: R activation rows x C weight rows, one group of 8 blocks at a time.
 * Per element: sc = dw8 * dx8 (8 blocks' scale products), then for each block j in order
 * acc = fma(broadcast(sc[j]), cvt(isum8_j), acc) and (Q4_1) msum = fma(mw_j, sx_j, msum);
 * y = hsum(acc) + msum. Q4_0: once per group ms = fma(dw8, sx8, ms), y = hsum(acc) -
 * 8 hsum(ms); Q8_0: y = hsum(acc). */

/* Q4_1's offset chains msum(r, c) = fma(mw_cj, sx_rj, msum(r, c)), blocks j in order. A
 * tile of 4 rows runs them in the lanes of one xmm per column, with the activation sums of
 * the group transposed once per group (st[j] = sx of rows 0..3 at block j); fewer rows run
 * them as scalars. The chains are independent of acc's, so they run after a group's blocks. */
/* st[j] = (a[j], b[j], c[j], d[j]) for j < 8 */
KVS_INLINE void transpose4x8(const float *pa, const float *pb, const float *pc, const float *pd,
                             __m128 st[8])
{
    __m256 a = _mm256_loadu_ps(pa), b = _mm256_loadu_ps(pb);
    __m256 c = _mm256_loadu_ps(pc), d = _mm256_loadu_ps(pd);
    __m256 t0 = _mm256_unpacklo_ps(a, b), t1 = _mm256_unpackhi_ps(a, b);
    __m256 t2 = _mm256_unpacklo_ps(c, d), t3 = _mm256_unpackhi_ps(c, d);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
    st[0] = _mm256_castps256_ps128(u0);
    st[1] = _mm256_castps256_ps128(u1);
    st[2] = _mm256_castps256_ps128(u2);
    st[3] = _mm256_castps256_ps128(u3);
    st[4] = _mm256_extractf128_ps(u0, 1);
    st[5] = _mm256_extractf128_ps(u1, 1);
    st[6] = _mm256_extractf128_ps(u2, 1);
    st[7] = _mm256_extractf128_ps(u3, 1);
}

/* Q4_1's offset chains of one group, after the group's blocks of every column (mwf[c] =
 * the group's mins of column c): 4 rows in xmm lanes (one vector per column, the rows'
 * sums transposed), 1 row x 4 columns in xmm lanes (the mins transposed), else scalars. */
#define Q_MSUM_GROUP(TYPE)                                                                     \
    if (TYPE == KVS_DTYPE_Q4_1) {                                                              \
        if (R == 4) {                                                                          \
            const float *st = xst + g * KVS_QG * 4; /* st + 4 j: rows' sums at block j */ \
            if (gn == KVS_QG) { /* unrolled: the columns' chains interleave */               \
                _Pragma("GCC unroll 8") for (int j = 0; j < KVS_QG; j++)                      \
                {                                                                              \
                    _Pragma("GCC unroll 4") for (int c = 0; c < C; c++)                       \
                    {                                                                          \
                        msv[c] = _mm_fmadd_ps(_mm_set1_ps(mwf[c][j]), _mm_loadu_ps(st + 4 * j),     \
                                              msv[c]);                                         \
                    }                                                                          \
                }                                                                              \
            } else {                                                                           \
                for (int j = 0; j < gn; j++) {                                                 \
                    _Pragma("GCC unroll 4") for (int c = 0; c < C; c++)                       \
                    {                                                                          \
                        msv[c] = _mm_fmadd_ps(_mm_set1_ps(mwf[c][j]), _mm_loadu_ps(st + 4 * j),     \
                                              msv[c]);                                         \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
        } else if (R == 1 && C == 4) {                                                         \
            __m128 mt[8];                                                                      \
            transpose4x8(mwf[0], mwf[1], mwf[2], mwf[3], mt);                                  \
            const float *xs = x[g].s;                                                          \
            if (gn == KVS_QG) {                                                                \
                _Pragma("GCC unroll 8") for (int j = 0; j < KVS_QG; j++)                      \
                {                                                                              \
                    msv[0] = _mm_fmadd_ps(mt[j], _mm_set1_ps(xs[j]), msv[0]);                  \
                }                                                                              \
            } else {                                                                           \
                for (int j = 0; j < gn; j++) {                                                 \
                    msv[0] = _mm_fmadd_ps(mt[j], _mm_set1_ps(xs[j]), msv[0]);                  \
                }                                                                              \
            }                                                                                  \
        } else {                                                                               \
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                               \
            {                                                                                  \
                const float *xs = x[r * ldx + g].s;                                            \
                _Pragma("GCC unroll 4") for (int c = 0; c < C; c++)                           \
                {                                                                              \
                    for (int j = 0; j < gn; j++) {                                             \
                        msum[r][c] = fmaf(mwf[c][j], xs[j], msum[r][c]);                       \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }

/* msum(r, c) once the groups are done */
#define Q_MSUM_FINAL()                                                                         \
    if (R == 4) {                                                                              \
        _Pragma("GCC unroll 4") for (int c = 0; c < C; c++)                                   \
        {                                                                                      \
            float t[4];                                                                        \
            _mm_storeu_ps(t, msv[c]);                                                          \
            _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++)                               \
            {                                                                                  \
                msum[r][c] = t[r];                                                             \
            }                                                                                  \
        }                                                                                      \
    } else if (R == 1 && C == 4) {                                                             \
        float t[4];                                                                            \
        _mm_storeu_ps(t, msv[0]);                                                              \
        _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++)                                   \
        {                                                                                      \
            msum[0][c] = t[c];                                                                 \
        }                                                                                      \
    }

/* the scale products of the tile's rows for one column and group, in memory: the blocks
 * broadcast them straight from there into their fma */
#define Q_SCALES(TYPE)                                                                         \
    const __m256 dw = load_f16x8(rg.d, rg.n);                                                  \
    if (TYPE == KVS_DTYPE_Q4_1) {                                                              \
        _mm256_storeu_ps(mwf[c], load_f16x8(rg.m, rg.n));                                      \
    }                                                                                          \
    float scm[4][KVS_QG];                                                                      \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                       \
    {                                                                                          \
        const struct kvs_cpu_q8g *xg = &x[r * ldx + g];                                        \
        _mm256_storeu_ps(scm[r], _mm256_mul_ps(dw, _mm256_loadu_ps(xg->d)));                   \
        if (TYPE == KVS_DTYPE_Q4_0) {                                                          \
            ms[r][c] = _mm256_fmadd_ps(dw, _mm256_loadu_ps(xg->s), ms[r][c]);                  \
        }                                                                                      \
    }

#define Q_BLOCK_Q4(j)                                                                          \
    {                                                                                          \
        __m256i wq = unpack_q4(rg.qs + (j) * 16);                                              \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                   \
        {                                                                                      \
            __m256i xq = _mm256_loadu_si256((const __m256i *)x[r * ldx + g].q[j]);             \
            __m256 isum = _mm256_cvtepi32_ps(dot_u8s8(wq, xq));                                \
            acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(scm[r][j]), isum, acc[r][c]);           \
        }                                                                                      \
    }

#define Q_BLOCK_Q8(j)                                                                          \
    {                                                                                          \
        __m256i wq = _mm256_loadu_si256((const __m256i *)(rg.qs + (j) * 32));                  \
        __m256i wa = _mm256_abs_epi8(wq);                                                      \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                   \
        {                                                                                      \
            __m256i xq = _mm256_loadu_si256((const __m256i *)x[r * ldx + g].q[j]);             \
            __m256 isum = _mm256_cvtepi32_ps(dot_u8s8(wa, _mm256_sign_epi8(xq, wq)));          \
            acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(scm[r][j]), isum, acc[r][c]);           \
        }                                                                                      \
    }

/* TYPE: enum kvs_dtype; BLOCK: Q_BLOCK_Q4 or Q_BLOCK_Q8 */
#define Q_TILE(NAME, TYPE, BLOCK)                                                              \
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
                    BLOCK(0) BLOCK(1) BLOCK(2) BLOCK(3) BLOCK(4) BLOCK(5) BLOCK(6) BLOCK(7)     \
                } else {                                                                       \
                    for (int j = 0; j < rg.n; j++) {                                           \
                        BLOCK(j)                                                               \
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
                } else if (TYPE == KVS_DTYPE_Q4_0) {                                           \
                    v = v - 8.0f * hsum8(ms[r][c]);                                            \
                }                                                                              \
                out[r * ldo + c] = v;                                                          \
            }                                                                                  \
        }                                                                                      \
    }

Q_TILE(tile_q4_1, KVS_DTYPE_Q4_1, Q_BLOCK_Q4)
#if !KVS_X86_PAIRED_Q4
Q_TILE(tile_q4_0, KVS_DTYPE_Q4_0, Q_BLOCK_Q4)
#endif
Q_TILE(tile_q8_0, KVS_DTYPE_Q8_0, Q_BLOCK_Q8)

/* Decode streams every weight byte once: the hardware prefetchers lose the short row
 * streams, so single-row tiles prefetch the rows two tiles ahead (measured: the 1-row
 * token's matmuls are latency-bound without it). */
#ifndef KVS_PF_ROWS
#define KVS_PF_ROWS 8 /* rows ahead */
#endif

KVS_INLINE void prefetch_rows(const uint8_t *p, size_t bytes)
{
    for (size_t off = 0; off < bytes; off += 64) {
        _mm_prefetch((const char *)p + off, _MM_HINT_T0);
    }
}

/* Drive a tile function over rows [0, n_rows) x outputs [o0, o1): groups of TILE_R rows
 * take TILE_R x TILE_C tiles over panels of 16 outputs, single rows take 1 x 4 tiles. */
#define GEMM_Q_DRIVER(NAME, TILE)                                                              \
    static void KVS_X86_NAME(NAME)(const struct kvs_weight *w, const void *xv, int32_t n_rows, \
                                   int64_t o0, int64_t o1, const float *bias, float *y,       \
                                   int64_t ldy)                                               \
    {                                                                                          \
        const struct kvs_cpu_q8g *x = xv;                                                      \
        const uint8_t *wd = w->data;                                                           \
        const size_t rb = w->row_bytes;                                                        \
        const int64_t nb = w->n_in / KVS_QK, ng = (nb + KVS_QG - 1) / KVS_QG;                  \
        const float *xst = (const float *)(x + (int64_t)n_rows * ng); /* Q4_1: quads' sums */  \
        for (int64_t ob = o0; ob < o1; ob += 16) {                                             \
            int64_t oe = ob + 16 < o1 ? ob + 16 : o1;                                          \
            int32_t r = 0;                                                                     \
            for (; r + KVS_X86_TILE_R <= n_rows; r += KVS_X86_TILE_R) {                        \
                int64_t o = ob;                                                                \
                for (; o + KVS_X86_TILE_C <= oe; o += KVS_X86_TILE_C) {                        \
                    TILE(wd + o * rb, rb, x + r * ng, xst + (r / 4) * ng * 32, ng, nb,         \
                         KVS_X86_TILE_R, KVS_X86_TILE_C, y + r * ldy + o, ldy);                \
                }                                                                              \
                for (; o < oe; o++) {                                                          \
                    TILE(wd + o * rb, rb, x + r * ng, xst + (r / 4) * ng * 32, ng, nb,         \
                         KVS_X86_TILE_R, 1, y + r * ldy + o, ldy);                             \
                }                                                                              \
            }                                                                                  \
            for (; r < n_rows; r++) {                                                          \
                int64_t o = ob;                                                                \
                for (; o + 4 <= oe; o += 4) {                                                  \
                    if (r == 0 && o + KVS_PF_ROWS + 4 <= w->n_out) {                           \
                        prefetch_rows(wd + (o + KVS_PF_ROWS) * rb, 4 * rb);                    \
                    }                                                                          \
                    TILE(wd + o * rb, rb, x + r * ng, NULL, ng, nb, 1, 4, y + r * ldy + o, ldy); \
                }                                                                              \
                for (; o < oe; o++) {                                                          \
                    TILE(wd + o * rb, rb, x + r * ng, NULL, ng, nb, 1, 1, y + r * ldy + o, ldy); \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        if (bias != NULL) {                                                                    \
            for (int32_t r = 0; r < n_rows; r++) {                                             \
                for (int64_t o = o0; o < o1; o++) {                                            \
                    y[r * ldy + o] += bias[o];                                                 \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }

GEMM_Q_DRIVER(gemm_q4_1, tile_q4_1)
#if !KVS_X86_PAIRED_Q4 /* else the includer brings its own Q4_0 tile */
GEMM_Q_DRIVER(gemm_q4_0, tile_q4_0)
#endif
GEMM_Q_DRIVER(gemm_q8_0, tile_q8_0)

/* ---- float weights: R activation rows x 1 weight row ------------------------------------- */

KVS_INLINE __m256 load8_f32(const void *p, int64_t k)
{
    return _mm256_loadu_ps((const float *)p + k);
}
KVS_INLINE __m256 load8_f16(const void *p, int64_t k)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + k)));
}
KVS_INLINE __m256 load8_bf16(const void *p, int64_t k)
{
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
KVS_INLINE float load1_f32(const void *p, int64_t k)
{
    return ((const float *)p)[k];
}
KVS_INLINE float load1_f16(const void *p, int64_t k)
{
    return f16(((const uint16_t *)p)[k]);
}
KVS_INLINE float load1_bf16(const void *p, int64_t k)
{
    return kvs_cpu_bf16_to_f32(((const uint16_t *)p)[k]);
}

#define GEMM_F_TILE(T)                                                                         \
    KVS_INLINE void tile_##T(const void *wr, const float *x, int64_t ldx, int64_t n, const int R, \
                             float *out, int64_t ldo)                                          \
    {                                                                                          \
        __m256 a[4][4];                                                                        \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                   \
        {                                                                                      \
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++)                               \
            {                                                                                  \
                a[r][j] = _mm256_setzero_ps();                                                 \
            }                                                                                  \
        }                                                                                      \
        int64_t k = 0;                                                                         \
        for (; k + 32 <= n; k += 32) {                                                         \
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++)                               \
            {                                                                                  \
                __m256 wv = load8_##T(wr, k + 8 * j);                                          \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                           \
                {                                                                              \
                    a[r][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * ldx + k + 8 * j),    \
                                              a[r][j]);                                        \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        for (; k + 8 <= n; k += 8) {                                                           \
            __m256 wv = load8_##T(wr, k);                                                      \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                               \
            {                                                                                  \
                a[r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * ldx + k), a[r][0]);      \
            }                                                                                  \
        }                                                                                      \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                   \
        {                                                                                      \
            float v = hsum8(_mm256_add_ps(_mm256_add_ps(a[r][0], a[r][1]),                     \
                                          _mm256_add_ps(a[r][2], a[r][3])));                   \
            for (int64_t kk = k; kk < n; kk++) {                                               \
                v = v + load1_##T(wr, kk) * x[r * ldx + kk];                                   \
            }                                                                                  \
            out[r * ldo] = v;                                                                  \
        }                                                                                      \
    }                                                                                          \
    static void KVS_X86_NAME(gemm_##T)(const struct kvs_weight *w, const void *xv,             \
                                       int32_t n_rows, int64_t o0, int64_t o1,                 \
                                       const float *bias, float *y, int64_t ldy)               \
    {                                                                                          \
        const float *x = xv;                                                                   \
        const int64_t n = w->n_in;                                                             \
        for (int32_t rb = 0; rb < n_rows; rb += 32) {                                          \
            int32_t re = rb + 32 < n_rows ? rb + 32 : n_rows;                                  \
            for (int64_t o = o0; o < o1; o++) {                                                \
                const void *wr = (const uint8_t *)w->data + o * w->row_bytes;                  \
                int32_t r = rb;                                                                \
                for (; r + 2 <= re; r += 2) {                                                  \
                    tile_##T(wr, x + r * n, n, n, 2, y + r * ldy + o, ldy);                    \
                }                                                                              \
                for (; r < re; r++) {                                                          \
                    tile_##T(wr, x + r * n, n, n, 1, y + r * ldy + o, ldy);                    \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        if (bias != NULL) {                                                                    \
            for (int32_t r = 0; r < n_rows; r++) {                                             \
                for (int64_t o = o0; o < o1; o++) {                                            \
                    y[r * ldy + o] += bias[o];                                                 \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }

GEMM_F_TILE(f32)
GEMM_F_TILE(f16)
GEMM_F_TILE(bf16)

/* ---- attention helpers --------------------------------------------------------------------- */

static void KVS_X86_NAME(scale)(float *acc, float c, int32_t n)
{
    __m256 vc = _mm256_set1_ps(c);
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(acc + i, _mm256_mul_ps(_mm256_loadu_ps(acc + i), vc));
    }
    for (; i < n; i++) {
        acc[i] = acc[i] * c;
    }
}

static void KVS_X86_NAME(f32_to_f16)(const float *x, uint16_t *out, int64_t n)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm_storeu_si128((__m128i *)(out + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; i++) {
        out[i] = kvs_cpu_f32_to_f16(x[i]);
    }
}

/* ---- vector exp and the attention block kernels -------------------------------------------- */

#if KVS_X86_VNNI
/* exp(x) for 8 lanes, lane for lane llama.cpp's ggml_v_expf for AVX-512 (ggml-cpu/vec.h), so
 * that the softmax weights and SiLU match its CPU backend bit for bit: n = round(x log2 e)
 * by the 1.5 * 2^23 trick, b = x - n ln2 (two-part ln2), a degree-5 polynomial, scalef by n;
 * |n| > 192 gives 0 (n <= 0) or inf. */
KVS_INLINE __m256 exp8(__m256 x)
{
    const __m256 r = _mm256_set1_ps(0x1.8p23f);
    const __m256 z = _mm256_fmadd_ps(x, _mm256_set1_ps(0x1.715476p+0f), r);
    const __m256 n = _mm256_sub_ps(z, r);
    const __m256 b = _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.7f7d1cp-20f),
                                      _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.62e4p-1f), x));
    const __mmask8 d = _mm256_cmp_ps_mask(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), n),
                                          _mm256_set1_ps(192), _CMP_GT_OQ);
    const __m256 u = _mm256_mul_ps(b, b);
    const __m256 j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(0x1.0e4020p-7f), b,
                                        _mm256_set1_ps(0x1.573e2ep-5f)),
                        u,
                        _mm256_fmadd_ps(_mm256_set1_ps(0x1.555e66p-3f), b,
                                        _mm256_set1_ps(0x1.fffdb6p-2f))),
        u, _mm256_fmadd_ps(_mm256_set1_ps(0x1.ffffecp-1f), b, _mm256_set1_ps(1.0f)));
    const __m256 res = _mm256_scalef_ps(j, n);
    if (d == 0) {
        return res;
    }
    const __m256 alt = _mm256_mask_blend_ps(_mm256_cmp_ps_mask(n, _mm256_setzero_ps(), _CMP_LE_OQ),
                                            _mm256_set1_ps(INFINITY), _mm256_setzero_ps());
    return _mm256_mask_blend_ps(d, res, alt);
}
#else
/* exp(x) for 8 lanes: n = round(x log2 e), r = x - n ln2 (two-part ln2), Cephes' degree-6
 * polynomial for e^r, times 2^n; ~2 ulp against expf; 0 below -87.3, x clamped at 88. */
KVS_INLINE __m256 exp8(__m256 x)
{
    const __m256 lo = _mm256_set1_ps(-87.3f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i n = _mm256_cvtps_epi32(fx);
    __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
    return _mm256_andnot_ps(under, _mm256_mul_ps(y, p2));
}
#endif

/* the tail of an array through an 8-lane buffer, so every element takes the vector path */
KVS_INLINE __m256 load_tail(const float *p, int n)
{
    float t[8] = {0};
    memcpy(t, p, (size_t)n * sizeof(float));
    return _mm256_loadu_ps(t);
}

static void KVS_X86_NAME(exp_shift)(float *s, int32_t n, float m)
{
    __m256 vm = _mm256_set1_ps(m);
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(s + i, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm)));
    }
    if (i < n) {
        float t[8];
        _mm256_storeu_ps(t, exp8(_mm256_sub_ps(load_tail(s + i, n - i), vm)));
        memcpy(s + i, t, (size_t)(n - i) * sizeof(float));
    }
}

static void KVS_X86_NAME(swiglu)(const float *gate, const float *up, int64_t n, float *out)
{
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 e = exp8(_mm256_sub_ps(zero, g));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)),
                                                _mm256_loadu_ps(up + i)));
    }
    if (i < n) {
        float t[8];
        __m256 g = load_tail(gate + i, (int)(n - i));
        __m256 e = exp8(_mm256_sub_ps(zero, g));
        _mm256_storeu_ps(t, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)),
                                          load_tail(up + i, (int)(n - i))));
        memcpy(out + i, t, (size_t)(n - i) * sizeof(float));
    }
}

static void KVS_X86_NAME(round_f16)(float *x, int64_t n)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);
        _mm256_storeu_ps(x + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; i++) {
        x[i] = kvs_cpu_f16_to_f32(kvs_cpu_f32_to_f16(x[i]));
    }
}

static void KVS_X86_NAME(f16_to_f32)(const uint16_t *x, float *out, int64_t n)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
    }
    for (; i < n; i++) {
        out[i] = f16(x[i]);
    }
}

/* ---- attention in llama.cpp's CPU order (attention.c) ------------------------------------ */

/* Scores of nc cells (cell i at k[i]) in llama.cpp's order for an f16 cache (its tinyBLAS
 * f16 kernel on 512-bit vectors): per cell a 16-lane fma chain over the dims (lane = d % 16,
 * as two 8-lane halves lo = lanes 0..7, hi = 8..15), then the lanes' sum by
 * _mm512_reduce_add_ps's tree: u = lo + hi, (u0 + u4, ..) as hsum8, then * scale. Eight cells
 * at a time, their hsum8 trees side by side. hd a multiple of 16 (64: q held in registers);
 * else the dims past the last whole 16 are added one by one after the tree. */
KVS_INLINE __m256 hsum8x8(const __m256 u[8])
{
    /* lane c = hsum8(u[c]): (l_i + l_i+4), then (w0 + w2) + (w1 + w3) */
    __m256 x04 = _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[4], 0x20),
                               _mm256_permute2f128_ps(u[0], u[4], 0x31));
    __m256 x15 = _mm256_add_ps(_mm256_permute2f128_ps(u[1], u[5], 0x20),
                               _mm256_permute2f128_ps(u[1], u[5], 0x31));
    __m256 x26 = _mm256_add_ps(_mm256_permute2f128_ps(u[2], u[6], 0x20),
                               _mm256_permute2f128_ps(u[2], u[6], 0x31));
    __m256 x37 = _mm256_add_ps(_mm256_permute2f128_ps(u[3], u[7], 0x20),
                               _mm256_permute2f128_ps(u[3], u[7], 0x31));
    __m256 w01 = _mm256_add_ps(_mm256_shuffle_ps(x04, x15, 0x44),
                               _mm256_shuffle_ps(x04, x15, 0xee));
    __m256 w23 = _mm256_add_ps(_mm256_shuffle_ps(x26, x37, 0x44),
                               _mm256_shuffle_ps(x26, x37, 0xee));
    return _mm256_add_ps(_mm256_shuffle_ps(w01, w23, 0x88), _mm256_shuffle_ps(w01, w23, 0xdd));
}

static void KVS_X86_NAME(scores16)(const float *q, const float *k, int32_t nc, int32_t hd,
                                   float scale, float *out)
{
    const int32_t hd16 = hd / 16 * 16;
    for (int32_t i = 0; i < nc; i += 8) {
        __m256 u[8];
        if (hd == 64) {
            const __m256 q0 = _mm256_loadu_ps(q), q1 = _mm256_loadu_ps(q + 8);
            const __m256 q2 = _mm256_loadu_ps(q + 16), q3 = _mm256_loadu_ps(q + 24);
            const __m256 q4 = _mm256_loadu_ps(q + 32), q5 = _mm256_loadu_ps(q + 40);
            const __m256 q6 = _mm256_loadu_ps(q + 48), q7 = _mm256_loadu_ps(q + 56);
            _Pragma("GCC unroll 8") for (int c = 0; c < 8; c++)
            {
                const float *kc = k + (int64_t)(i + c < nc ? i + c : i) * hd;
                const __m256 z = _mm256_setzero_ps(); /* fma from +0, as the chain starts */
                __m256 lo = _mm256_fmadd_ps(_mm256_loadu_ps(kc), q0, z);
                __m256 hi = _mm256_fmadd_ps(_mm256_loadu_ps(kc + 8), q1, z);
                lo = _mm256_fmadd_ps(_mm256_loadu_ps(kc + 16), q2, lo);
                hi = _mm256_fmadd_ps(_mm256_loadu_ps(kc + 24), q3, hi);
                lo = _mm256_fmadd_ps(_mm256_loadu_ps(kc + 32), q4, lo);
                hi = _mm256_fmadd_ps(_mm256_loadu_ps(kc + 40), q5, hi);
                lo = _mm256_fmadd_ps(_mm256_loadu_ps(kc + 48), q6, lo);
                hi = _mm256_fmadd_ps(_mm256_loadu_ps(kc + 56), q7, hi);
                u[c] = _mm256_add_ps(hi, lo);
            }
        } else {
            _Pragma("GCC unroll 8") for (int c = 0; c < 8; c++)
            {
                const float *kc = k + (int64_t)(i + c < nc ? i + c : i) * hd;
                __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
                for (int32_t d = 0; d < hd16; d += 16) {
                    lo = _mm256_fmadd_ps(_mm256_loadu_ps(kc + d), _mm256_loadu_ps(q + d), lo);
                    hi = _mm256_fmadd_ps(_mm256_loadu_ps(kc + d + 8), _mm256_loadu_ps(q + d + 8),
                                         hi);
                }
                u[c] = _mm256_add_ps(hi, lo);
            }
        }
        float t[8];
        _mm256_storeu_ps(t, hsum8x8(u));
        for (int c = 0; c < 8 && i + c < nc; c++) {
            float v = t[c];
            for (int32_t d = hd16; d < hd; d++) {
                v = v + k[(int64_t)(i + c) * hd + d] * q[d];
            }
            out[i + c] = v * scale;
        }
    }
}

/* acc[d] = fma(v[t][d], p[t * ps], acc[d]) for t = 0 .. n-1 in order (row t at v + t * vs):
 * one lane of llama.cpp's 16-lane P.V chains (attention.c), 64 dims at a time in registers. */
static void KVS_X86_NAME(pv16)(float *acc, const float *p, int32_t ps, const float *v, int64_t vs,
                               int32_t n, int32_t hd)
{
    int32_t d = 0;
    for (; d + 64 <= hd; d += 64) {
        __m256 a[8];
        _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++)
        {
            a[i] = _mm256_loadu_ps(acc + d + 8 * i);
        }
        for (int32_t t = 0; t < n; t++) {
            const float *vi = v + (int64_t)t * vs + d;
            __m256 vp = _mm256_set1_ps(p[(int64_t)t * ps]);
            _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++)
            {
                a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(vi + 8 * i), vp, a[i]);
            }
        }
        _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++)
        {
            _mm256_storeu_ps(acc + d + 8 * i, a[i]);
        }
    }
    for (; d + 8 <= hd; d += 8) {
        __m256 a0 = _mm256_loadu_ps(acc + d);
        for (int32_t t = 0; t < n; t++) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + (int64_t)t * vs + d),
                                 _mm256_set1_ps(p[(int64_t)t * ps]), a0);
        }
        _mm256_storeu_ps(acc + d, a0);
    }
    for (; d < hd; d++) {
        float a = acc[d];
        for (int32_t t = 0; t < n; t++) {
            a = fmaf(v[(int64_t)t * vs + d], p[(int64_t)t * ps], a);
        }
        acc[d] = a;
    }
}

/* out[d] = kvs_cpu_reduce16 of lanes[l * hd + d] over l < 16, 8 dims at a time */
static void KVS_X86_NAME(lanes16)(const float *lanes, int32_t hd, float *out)
{
    int32_t d = 0;
    for (; d + 8 <= hd; d += 8) {
        __m256 t3[8], t6[4];
        _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++)
        {
            t3[i] = _mm256_add_ps(_mm256_loadu_ps(lanes + (int64_t)(i + 8) * hd + d),
                                  _mm256_loadu_ps(lanes + (int64_t)i * hd + d));
        }
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++)
        {
            t6[i] = _mm256_add_ps(t3[i + 4], t3[i]);
        }
        _mm256_storeu_ps(out + d, _mm256_add_ps(_mm256_add_ps(t6[0], t6[2]),
                                                _mm256_add_ps(t6[1], t6[3])));
    }
    for (; d < hd; d++) {
        float x[16];
        for (int l = 0; l < 16; l++) {
            x[l] = lanes[(int64_t)l * hd + d];
        }
        out[d] = kvs_cpu_reduce16(x);
    }
}
