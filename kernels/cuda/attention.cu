/* Paged attention over bf16 KV for mixed batches (prefill chunks and decode rows together).
 *
 * Default path: the FlashAttention-2 kernel (attn_fa_kernel, below the decode path) for head
 * dims that are multiples of 16 up to 128. The tensor-core (WMMA) and decode paths described
 * next are the previous kernels, used with KVS_CUDA_ATTN=old or where the flash kernel does
 * not apply (group sizes it cannot tile, misaligned q).
 *
 * Row r attends to cells 0..row_ctx[r]-1 of its seq, cell c living in block
 * tables[row_table[r] + c / block_size]. GQA: query head h reads KV head h / G.
 *
 * Tensor-core path (head_dim a multiple of 16, at most 128, G dividing 64): a block of 4
 * warps takes one KV head and a tile of 64 query vectors = 64/G consecutive batch rows x G
 * heads (so the KV a tile reads is shared by all its rows and heads). Consecutive rows with
 * the same block table (one seq's chunk) form a sub-tile that streams its KV once, 64 cells
 * at a time: S = Q K^T (WMMA bf16, fp32), scale and per-row causal mask, online softmax
 * (fp32 max, sum and rescale, P rounded to bf16), O += P V (WMMA). Rows of different seqs in
 * one tile are handled one sub-tile after another.
 *
 * Split over the context (flash decoding): when the batch gives fewer tiles than twice the
 * SMs, grid.z splits each sub-tile's KV tiles evenly; each split writes (acc, m, l) and a
 * combine kernel merges them: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M).
 *
 * Decode path (at most KVS_CUDA_DECODE_MAX_ROWS rows): CUDA cores, one block per (row, KV
 * head, split), many splits; see attn_decode_kernel.
 *
 * Fallback (other head dims or group sizes): one warp per (row, head, split), fp32 all the
 * way, cell by cell. Both paths raise the device flag on a block id outside the pool or a
 * row without context (reported by sync). */
#include "kernels/cuda/attention_impl.h"

#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <mma.h>

using namespace nvcuda;

#define TILE_Q 64     /* query vectors per block */
#define ATT_WARPS 4   /* each warp owns 16 query vectors */
#define ATT_THREADS (ATT_WARPS * 32)
#define MAX_TC_DIM 128

/* ---- tensor-core path ---------------------------------------------------------------------- */

#define CH_MAX (TILE_C * MAX_TC_DIM / 8 / ATT_THREADS) /* 16-byte chunks per thread per tile */

struct tc_smem {
    int ldq, lds, ldp, ldo;  /* leading dims (elements) */
    size_t q, k, v, s, p, o, st, total; /* byte offsets */
};

static __host__ __device__ inline size_t align128(size_t x)
{
    return (x + 127) & ~(size_t)127;
}

static __host__ __device__ inline tc_smem tc_layout(int hd)
{
    tc_smem L;
    L.ldq = hd + 8;     /* bf16 rows of Q, K, V: 16-byte multiple, breaks bank alignment */
    L.lds = TILE_C + 4; /* f32 scores */
    L.ldp = TILE_C + 8; /* bf16 probabilities */
    L.ldo = hd + 4;     /* f32 output accumulators */
    size_t off = 0;
    L.q = off; off = align128(off + (size_t)TILE_Q * L.ldq * 2);
    L.k = off; off = align128(off + (size_t)TILE_C * L.ldq * 2);
    L.v = off; off = align128(off + (size_t)TILE_C * L.ldq * 2);
    L.s = off; off = align128(off + (size_t)ATT_WARPS * 16 * L.lds * 4);
    L.p = off; off = align128(off + (size_t)ATT_WARPS * 16 * L.ldp * 2);
    L.o = off; off = align128(off + (size_t)ATT_WARPS * 16 * L.ldo * 4);
    L.st = off; off = align128(off + (size_t)ATT_WARPS * 16 * 3 * 4); /* m, l, corr */
    L.total = off;
    return L;
}

/* Load KV tile kt of a sub-tile (cells kt*64 ..) into registers; cells past n_ctx are zero.
 * Block ids first, all loads in flight at once, then the K/V loads (no chain of latencies). */
static __device__ __forceinline__ void tc_fetch(const attn_args &a, const __nv_bfloat16 *kb,
                                                const __nv_bfloat16 *vb,
                                                const int32_t *__restrict__ table, int32_t n_ctx,
                                                int32_t kt, uint4 (&rk)[CH_MAX],
                                                uint4 (&rv)[CH_MAX])
{
    const int cpr = a.hd / 8;
    int32_t blk[CH_MAX];
#pragma unroll
    for (int u = 0; u < CH_MAX; u++) {
        int j = threadIdx.x + u * ATT_THREADS;
        int32_t c = kt * TILE_C + j / cpr;
        blk[u] = (j < TILE_C * cpr && c < n_ctx) ? __ldg(table + c / a.block_size) : -2;
    }
    bool bad = false;
#pragma unroll
    for (int u = 0; u < CH_MAX; u++) {
        int j = threadIdx.x + u * ATT_THREADS;
        int32_t c = kt * TILE_C + j / cpr;
        rk[u] = make_uint4(0, 0, 0, 0);
        rv[u] = make_uint4(0, 0, 0, 0);
        if (blk[u] >= 0 && blk[u] < a.n_block) {
            size_t off = (size_t)blk[u] * a.block_stride + (size_t)(c % a.block_size) * a.hd +
                         (size_t)(j % cpr) * 8;
            rk[u] = __ldg((const uint4 *)(kb + off));
            rv[u] = __ldg((const uint4 *)(vb + off));
        } else if (blk[u] != -2) {
            bad = true;
        }
    }
    if (bad) {
        *a.flag = 1;
    }
}

static __device__ __forceinline__ void tc_store(const attn_args &a, const tc_smem &L,
                                                unsigned char *sm, const uint4 (&rk)[CH_MAX],
                                                const uint4 (&rv)[CH_MAX])
{
    const int cpr = a.hd / 8;
    __nv_bfloat16 *sK = (__nv_bfloat16 *)(sm + L.k), *sV = (__nv_bfloat16 *)(sm + L.v);
#pragma unroll
    for (int u = 0; u < CH_MAX; u++) {
        int j = threadIdx.x + u * ATT_THREADS;
        if (j < TILE_C * cpr) {
            int cell = j / cpr, part = j % cpr;
            *(uint4 *)(sK + cell * L.ldq + part * 8) = rk[u];
            *(uint4 *)(sV + cell * L.ldq + part * 8) = rv[u];
        }
    }
}

static __global__ void __launch_bounds__(ATT_THREADS) attn_tc_kernel(attn_args a)
{
    extern __shared__ __align__(128) unsigned char sm[];
    const tc_smem L = tc_layout(a.hd);
    __nv_bfloat16 *sQ = (__nv_bfloat16 *)(sm + L.q);
    __nv_bfloat16 *sK = (__nv_bfloat16 *)(sm + L.k), *sV = (__nv_bfloat16 *)(sm + L.v);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *sS = (float *)(sm + L.s) + warp * 16 * L.lds;
    __nv_bfloat16 *sP = (__nv_bfloat16 *)(sm + L.p) + warp * 16 * L.ldp;
    float *sO = (float *)(sm + L.o) + warp * 16 * L.ldo;
    float *sM = (float *)(sm + L.st) + warp * 48, *sL = sM + 16, *sC = sM + 32;

    const int32_t rows_per_tile = TILE_Q / a.group;
    const int32_t t0 = blockIdx.x * rows_per_tile;
    const int32_t t1 = min(t0 + rows_per_tile, a.n_rows);
    const int32_t kvh = blockIdx.y, split = blockIdx.z, hd = a.hd;
    const __nv_bfloat16 *kb = a.k + (size_t)kvh * a.head_stride;
    const __nv_bfloat16 *vb = a.v + (size_t)kvh * a.head_stride;

    for (int32_t start = t0; start < t1;) {
        const int32_t end = sub_tile_end(a, start, t1);
        const int32_t *table = a.tables + a.row_table[start];
        int32_t n_ctx = 0;
        for (int32_t r = start; r < end; r++) {
            n_ctx = max(n_ctx, a.row_ctx[r]);
        }
        int32_t kt0, kt1;
        split_range(n_ctx, a.n_split, split, &kt0, &kt1);

        /* Q of the sub-tile's rows (others zero), state reset */
        __syncthreads(); /* the previous sub-tile is done with shared memory */
        for (int e = threadIdx.x; e < TILE_Q * hd; e += ATT_THREADS) {
            int qi = e / hd, d = e % hd;
            int32_t row = t0 + qi / a.group;
            float x = 0.0f;
            if (row >= start && row < end) {
                x = a.q[((int64_t)row * a.n_head + kvh * a.group + qi % a.group) * hd + d];
            }
            sQ[qi * L.ldq + d] = __float2bfloat16_rn(x);
        }
        for (int e = lane; e < 16 * hd; e += 32) {
            sO[(e / hd) * L.ldo + e % hd] = 0.0f;
        }
        if (lane < 16) {
            sM[lane] = -INFINITY;
            sL[lane] = 0.0f;
        }
        /* does this warp own any query of the sub-tile? (warp-uniform) */
        const int32_t w_row0 = t0 + (warp * 16) / a.group, w_row1 = t0 + (warp * 16 + 15) / a.group;
        const bool active = w_row1 >= start && w_row0 < end;

        uint4 rk[CH_MAX], rv[CH_MAX];
        if (kt0 < kt1) {
            tc_fetch(a, kb, vb, table, n_ctx, kt0, rk, rv);
        }
        for (int32_t kt = kt0; kt < kt1; kt++) {
            __syncthreads(); /* everyone is done with the previous K/V tile */
            tc_store(a, L, sm, rk, rv);
            __syncthreads();
            if (kt + 1 < kt1) {
                tc_fetch(a, kb, vb, table, n_ctx, kt + 1, rk, rv); /* in flight during compute */
            }
            if (!active) {
                continue;
            }
            /* S = Q_w K^T: 16 queries x 64 cells */
            for (int j = 0; j < TILE_C / 16; j++) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> fs;
                wmma::fill_fragment(fs, 0.0f);
                for (int kk = 0; kk < hd / 16; kk++) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fq;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fk;
                    wmma::load_matrix_sync(fq, sQ + warp * 16 * L.ldq + kk * 16, L.ldq);
                    wmma::load_matrix_sync(fk, sK + j * 16 * L.ldq + kk * 16, L.ldq);
                    wmma::mma_sync(fs, fq, fk, fs);
                }
                wmma::store_matrix_sync(sS + j * 16, fs, L.lds, wmma::mem_row_major);
            }
            __syncwarp();
            /* online softmax: lanes 2i and 2i+1 share query i, 32 cells each */
            {
                const int qi = lane >> 1, half = lane & 1;
                const int32_t row = t0 + (warp * 16 + qi) / a.group;
                const int32_t ctx = (row >= start && row < end) ? a.row_ctx[row] : 0;
                float sv[32];
                float tmax = -INFINITY;
#pragma unroll
                for (int i = 0; i < 32; i++) {
                    int col = half * 32 + i;
                    int32_t c = kt * TILE_C + col;
                    float s = c < ctx ? sS[qi * L.lds + col] * a.scale : -INFINITY;
                    sv[i] = s;
                    tmax = fmaxf(tmax, s);
                }
                tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
                const float m_old = sM[qi];
                const float m_new = fmaxf(m_old, tmax);
                float corr = 1.0f, sum = 0.0f;
                if (m_new != -INFINITY) {
                    corr = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
                }
#pragma unroll
                for (int i = 0; i < 32; i++) {
                    float p = sv[i] == -INFINITY ? 0.0f : expf(sv[i] - m_new);
                    __nv_bfloat16 pb = __float2bfloat16_rn(p);
                    sP[qi * L.ldp + half * 32 + i] = pb;
                    sum += __bfloat162float(pb); /* l sums what multiplies V */
                }
                sum += __shfl_xor_sync(0xffffffffu, sum, 1);
                __syncwarp();
                if (half == 0) {
                    sM[qi] = m_new;
                    sL[qi] = sL[qi] * corr + sum;
                    sC[qi] = corr;
                }
            }
            __syncwarp();
            for (int e = lane; e < 16 * hd; e += 32) {
                sO[(e / hd) * L.ldo + e % hd] *= sC[e / hd];
            }
            __syncwarp();
            /* O_w += P V: 16 queries x hd */
            for (int j = 0; j < hd / 16; j++) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> fo;
                wmma::load_matrix_sync(fo, sO + j * 16, L.ldo, wmma::mem_row_major);
                for (int kk = 0; kk < TILE_C / 16; kk++) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fp;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fv;
                    wmma::load_matrix_sync(fp, sP + kk * 16, L.ldp);
                    wmma::load_matrix_sync(fv, sV + kk * 16 * L.ldq + j * 16, L.ldq);
                    wmma::mma_sync(fo, fp, fv, fo);
                }
                wmma::store_matrix_sync(sO + j * 16, fo, L.ldo, wmma::mem_row_major);
            }
            __syncwarp();
        }
        __syncwarp();
        /* results of the warp's queries that belong to the sub-tile */
        for (int e = lane; e < 16 * hd; e += 32) {
            int qi = e / hd, d = e % hd;
            int qt = warp * 16 + qi;
            int32_t row = t0 + qt / a.group;
            if (row >= start && row < end) {
                write_result(a, row, kvh * a.group + qt % a.group, split, d,
                             sO[qi * L.ldo + d], sM[qi], sL[qi]);
            }
        }
        start = end;
    }
}

/* ---- decode path: few rows, CUDA cores, many splits ---------------------------------------- */

/* grid (n_rows, n_kv_head, n_split), 4 warps. A "lane group" of hd/8 lanes takes one cell at a
 * time (each lane 8 dims: one 16-byte load of K and one of V), for all G query heads of the
 * KV head at once (G a template argument: 1, 2, 4 or 8); the groups of the block stride over the split's cells, each keeping its own
 * online softmax (m, l, acc), merged through shared memory at the end. Memory-bound: every K
 * and V byte of the row's context is read once per KV head. */
#define DEC_THREADS 128

/* Fold one cell (its K and V slices, already loaded) into the group's online softmax. */
template <int G>
static __device__ __forceinline__ void dec_cell(const uint4 &kr, const uint4 &vr, int lpc,
                                                unsigned gmask,
                                                const float (&q)[G][8], float (&acc)[G][8],
                                                float (&m)[G], float (&l)[G])
{
    float kf[8], vf[8];
    const __nv_bfloat162 *k2 = (const __nv_bfloat162 *)&kr, *v2 = (const __nv_bfloat162 *)&vr;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 t = __bfloat1622float2(k2[i]), u = __bfloat1622float2(v2[i]);
        kf[2 * i] = t.x;
        kf[2 * i + 1] = t.y;
        vf[2 * i] = u.x;
        vf[2 * i + 1] = u.y;
    }
#pragma unroll
    for (int g = 0; g < G; g++) {
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            s += q[g][i] * kf[i];
        }
        for (int o = lpc / 2; o > 0; o >>= 1) {
            s += __shfl_xor_sync(gmask, s, o, lpc);
        }
        float mn = fmaxf(m[g], s);
        float corr = __expf(m[g] - mn); /* 0 when m was -inf */
        float p = __expf(s - mn);
        l[g] = l[g] * corr + p;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            acc[g][i] = acc[g][i] * corr + p * vf[i];
        }
        m[g] = mn;
    }
}

template <int G>
static __global__ void __launch_bounds__(DEC_THREADS) attn_decode_kernel(attn_args a)
{
    extern __shared__ __align__(16) float dsm[]; /* (n_groups, G, hd + 2) */
    const int32_t row = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z, hd = a.hd;
    const int lpc = hd / 8, n_groups = DEC_THREADS / lpc;
    const int grp = threadIdx.x / lpc, gl = threadIdx.x % lpc; /* group, lane in group */
    /* groups of one warp may leave the cell loop at different steps: shuffles name only the
     * group's own lanes */
    const unsigned gmask =
        lpc == 32 ? 0xffffffffu : ((1u << lpc) - 1u) << ((threadIdx.x & 31) / lpc * lpc);
    const int32_t n_ctx = a.row_ctx[row];
    const int32_t *__restrict__ table = a.tables + a.row_table[row];
    const __nv_bfloat16 *kb = a.k + (size_t)kvh * a.head_stride + gl * 8;
    const __nv_bfloat16 *vb = a.v + (size_t)kvh * a.head_stride + gl * 8;
    float q[G][8], acc[G][8], m[G], l[G];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            acc[g][i] = 0.0f;
            q[g][i] = a.q[((int64_t)row * a.n_head + kvh * G + g) * hd + gl * 8 + i] * a.scale;
        }
    }
    int32_t kt0, kt1;
    split_range(n_ctx, a.n_split, split, &kt0, &kt1);
    const int32_t c1 = min(kt1 * TILE_C, n_ctx);
    bool bad = false;
    /* two cells per group per step: both loads in flight before either is used */
    for (int32_t c = kt0 * TILE_C + grp; c < c1; c += 2 * n_groups) {
        const int32_t c2 = c + n_groups;
        int32_t b1 = __ldg(table + c / a.block_size);
        int32_t b2 = c2 < c1 ? __ldg(table + c2 / a.block_size) : -2;
        bool ok1 = b1 >= 0 && b1 < a.n_block, ok2 = b2 >= 0 && b2 < a.n_block;
        bad |= !ok1 || (b2 != -2 && !ok2);
        uint4 k1 = make_uint4(0, 0, 0, 0), v1 = k1, k2 = k1, v2 = k1;
        if (ok1) {
            size_t off = (size_t)b1 * a.block_stride + (size_t)(c % a.block_size) * hd;
            k1 = __ldg((const uint4 *)(kb + off));
            v1 = __ldg((const uint4 *)(vb + off));
        }
        if (ok2) {
            size_t off = (size_t)b2 * a.block_stride + (size_t)(c2 % a.block_size) * hd;
            k2 = __ldg((const uint4 *)(kb + off));
            v2 = __ldg((const uint4 *)(vb + off));
        }
        /* the whole group shares c, so ok1/ok2 are uniform within the group */
        if (ok1) {
            dec_cell<G>(k1, v1, lpc, gmask, q, acc, m, l);
        }
        if (ok2) {
            dec_cell<G>(k2, v2, lpc, gmask, q, acc, m, l);
        }
    }
    if (bad) {
        *a.flag = 1;
    }
    /* merge the groups: each writes its state, then threads own (g, d) outputs */
    const int stride = hd + 2;
#pragma unroll
    for (int g = 0; g < G; g++) {
        float *st = dsm + ((size_t)grp * G + g) * stride;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            st[gl * 8 + i] = acc[g][i];
        }
        if (gl == 0) {
            st[hd] = m[g];
            st[hd + 1] = l[g];
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < G * hd; e += DEC_THREADS) {
        int g = e / hd, d = e % hd;
        float M = -INFINITY;
        for (int k = 0; k < n_groups; k++) {
            const float *st = dsm + ((size_t)k * G + g) * stride;
            if (st[hd + 1] > 0.0f) {
                M = fmaxf(M, st[hd]);
            }
        }
        float Ls = 0.0f, o = 0.0f;
        for (int k = 0; k < n_groups; k++) {
            const float *st = dsm + ((size_t)k * G + g) * stride;
            if (st[hd + 1] > 0.0f) {
                float w = __expf(st[hd] - M);
                Ls += st[hd + 1] * w;
                o += st[d] * w;
            }
        }
        write_result(a, row, kvh * G + g, split, d, o, M, Ls);
    }
}

/* ---- fallback: one warp per (row, head, split), fp32 -------------------------------------- */

#define SIMPLE_MAX_PER_LANE 32 /* head_dim <= 1024 */

static __global__ void attn_simple_kernel(attn_args a)
{
    const int lane = threadIdx.x;
    const int32_t row = blockIdx.x / a.n_head, head = blockIdx.x % a.n_head, split = blockIdx.y;
    const int32_t kvh = head / a.group, hd = a.hd;
    const int32_t n_ctx = a.row_ctx[row];
    const int32_t *table = a.tables + a.row_table[row];
    const float *q = a.q + ((int64_t)row * a.n_head + head) * hd;
    const __nv_bfloat16 *kb = a.k + (size_t)kvh * a.head_stride;
    const __nv_bfloat16 *vb = a.v + (size_t)kvh * a.head_stride;
    float qr[SIMPLE_MAX_PER_LANE], acc[SIMPLE_MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < SIMPLE_MAX_PER_LANE; i++) {
        int d = lane + 32 * i;
        qr[i] = d < hd ? q[d] : 0.0f;
        acc[i] = 0.0f;
    }
    int32_t kt0, kt1;
    split_range(n_ctx, a.n_split, split, &kt0, &kt1);
    int32_t c0 = kt0 * TILE_C, c1 = min(kt1 * TILE_C, n_ctx);
    float m = -INFINITY, l = 0.0f;
    for (int32_t c = c0; c < c1; c++) {
        int32_t blk = table[c / a.block_size];
        if (blk < 0 || blk >= a.n_block) {
            if (lane == 0) {
                *a.flag = 1;
            }
            continue;
        }
        size_t off = (size_t)blk * a.block_stride + (size_t)(c % a.block_size) * hd;
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < SIMPLE_MAX_PER_LANE; i++) {
            int d = lane + 32 * i;
            if (d < hd) {
                s += qr[i] * __bfloat162float(kb[off + d]);
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            s += __shfl_xor_sync(0xffffffffu, s, o);
        }
        s *= a.scale;
        float mn = fmaxf(m, s);
        float corr = m == -INFINITY ? 0.0f : expf(m - mn);
        float p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int i = 0; i < SIMPLE_MAX_PER_LANE; i++) {
            int d = lane + 32 * i;
            if (d < hd) {
                acc[i] = acc[i] * corr + p * __bfloat162float(vb[off + d]);
            }
        }
        m = mn;
    }
#pragma unroll
    for (int i = 0; i < SIMPLE_MAX_PER_LANE; i++) {
        int d = lane + 32 * i;
        if (d < hd) {
            write_result(a, row, head, split, d, acc[i], m, l);
        }
    }
}

/* ---- FlashAttention-2 path: mma.sync m16n8k16, registers hold S, P, O ---------------------- */

/* A block of 4 warps takes one KV head and a tile of query vectors (rows x the G heads of the
 * KV head), streams the sub-tile's KV in 64-cell tiles through two shared-memory stages filled
 * by cp.async (block-table addressing per cell, zero fill past the context), and keeps the
 * online softmax in registers:
 *   KVW = false: 16 query vectors per warp (8 warps = 128 vectors for head dims 64 and 128,
 *                else 4 warps = 64), warp w owns vectors 16w..16w+15 and all 64 cells of a
 *                tile; more vectors per block read each K/V tile for more rows (a 32-row
 *                question of a GQA-4 model reads its context once, not twice).
 *   KVW = true:  16 query vectors (few rows: decode, short questions), every warp owns all 16
 *                vectors and cells 16w..16w+15 of each tile; the four warps' states are merged
 *                through shared memory at the end.
 * S = Q K^T (bf16 in, fp32 out), scaled into the log2 domain, masked per row (cell < ctx),
 * P = exp2(S - m) rounded to bf16 and fed to P V straight from the S registers (the
 * accumulator layout of m16n8k16 is the A layout of the next product). Partials (split > 1)
 * store m in natural-log units for the shared combine kernel. */
#define FA_TC 64 /* cells per tile */

static __device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

static __device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

static __device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4],
                                                uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

static __host__ __device__ constexpr int fa_ld(int hd)
{
    return hd + 8; /* bf16 row stride: 16-byte multiple, rows land on distinct bank groups */
}

static __host__ __device__ constexpr int fa_stages(bool kvw)
{
    return kvw ? 3 : 2; /* KVW streams (decode): more tiles in flight */
}

/* Query vectors per block: 16 for KVW, 16 per warp otherwise. */
static __host__ __device__ constexpr int fa_qv(bool kvw, int nw)
{
    return kvw ? 16 : 16 * nw;
}

static __host__ __device__ constexpr size_t fa_smem(int hd, bool kvw, int nw)
{
    /* Q, then the stages of K and V; the KVW merge reuses the K/V area */
    return ((size_t)fa_qv(kvw, nw) + 2 * fa_stages(kvw) * FA_TC) * fa_ld(hd) * 2;
}

/* Issue the cp.async loads of KV tile kt (cells kt*64 ..) into stage buffers sK, sV (rows of
 * LD elements). */
template <int HD, int THREADS>
static __device__ __forceinline__ void fa_load(const attn_args &a, const __nv_bfloat16 *kb,
                                               const __nv_bfloat16 *vb,
                                               const int32_t *__restrict__ table, int32_t n_ctx,
                                               int32_t kt, __nv_bfloat16 *sK, __nv_bfloat16 *sV)
{
    constexpr int LD = fa_ld(HD);
    fa_load_tile<FA_TC, HD, THREADS>(a, kb, vb, table, n_ctx, kt, (unsigned char *)sK,
                                     (unsigned char *)sV, [](int cell, int part) {
                                         return (uint32_t)((cell * LD + part * 8) * 2);
                                     });
}

template <int HD, bool KVW, int NW>
static __global__ void __launch_bounds__(NW * 32) attn_fa_kernel(attn_args a)
{
    kvs_pdl_wait();
    kvs_pdl_trigger(); /* after the wait: see kvs_pdl_trigger */
    constexpr int THREADS = NW * 32;
    constexpr int LD = fa_ld(HD), QV = fa_qv(KVW, NW); /* query vectors per block */
    constexpr int NT = KVW ? 2 : 8;                   /* 8-cell n-tiles per warp per tile */
    constexpr int KS = HD / 16, DT = HD / 8;          /* k-steps over dims; 8-dim output tiles */
    constexpr int S = fa_stages(KVW);
    extern __shared__ __align__(128) unsigned char fsm[];
    __nv_bfloat16 *sQ = (__nv_bfloat16 *)fsm;
    __nv_bfloat16 *sKV = sQ + QV * LD; /* stage s: K at sKV + 2s*64*LD, V after it */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int qb = KVW ? 0 : warp * 16;      /* the warp's first query vector */
    const int cb = KVW ? warp * 16 : 0;      /* the warp's first cell within a tile */
    const int32_t G = a.group, rows_per_tile = QV / G;
    int32_t tile, kvh;
    fa_block_unit(a, &tile, &kvh);
    const int32_t t0 = tile * rows_per_tile;
    const int32_t t1 = min(t0 + rows_per_tile, a.n_rows);
    const int32_t split = blockIdx.z;
    const __nv_bfloat16 *kb = a.k + (size_t)kvh * a.head_stride;
    const __nv_bfloat16 *vb = a.v + (size_t)kvh * a.head_stride;
    const float sl2 = a.scale * 1.4426950408889634f; /* scores in log2 units */

    for (int32_t start = t0; start < t1;) {
        const int32_t end = sub_tile_end(a, start, t1);
        const int32_t *table = a.tables + a.row_table[start];
        int32_t n_ctx = 0;
        for (int32_t r = start; r < end; r++) {
            n_ctx = max(n_ctx, a.row_ctx[r]);
        }
        int32_t kt0, kt1;
        split_range(n_ctx, a.n_split, split, &kt0, &kt1);

        __syncthreads(); /* the previous sub-tile is done with shared memory */
#pragma unroll
        for (int s = 0; s < S - 1; s++) {
            if (kt0 + s < kt1) {
                __nv_bfloat16 *nk = sKV + (size_t)s * 2 * FA_TC * LD;
                fa_load<HD, THREADS>(a, kb, vb, table, n_ctx, kt0 + s, nk, nk + FA_TC * LD);
            }
            cp_async_commit(); /* one group per tile, empty or not */
        }
        /* Q of the sub-tile's rows (others zero) */
        fa_store_q<QV, HD, THREADS>(a, t0, start, end, kvh, (unsigned char *)sQ,
                                    [](int qi, int d) { return (qi * LD + d) * 2; });
        int32_t ctx[2]; /* of this thread's two query vectors */
        fa_row_ctx(a, t0, start, end, qb, lane, ctx);
        const bool active = KVW || (__any_sync(0xffffffffu, ctx[0] > 0 || ctx[1] > 0));
        __syncthreads();
        uint32_t qf[KS][4];
#pragma unroll
        for (int ks = 0; ks < KS; ks++) {
            ldsm_x4(qf[ks], sQ + (qb + (lane & 15)) * LD + ks * 16 + (lane >> 4) * 8);
        }
        float o[DT][4];
#pragma unroll
        for (int i = 0; i < DT; i++) {
            o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
        }
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

        for (int32_t kt = kt0; kt < kt1; kt++) {
            const int st = (kt - kt0) % S;
            cp_async_wait<S - 2>(); /* tile kt has landed (this thread's part) */
            __syncthreads();        /* ... everyone's; and tile kt-1's stage is free */
            if (kt + S - 1 < kt1) {
                __nv_bfloat16 *nk = sKV + (size_t)((st + S - 1) % S) * 2 * FA_TC * LD;
                fa_load<HD, THREADS>(a, kb, vb, table, n_ctx, kt + S - 1, nk, nk + FA_TC * LD);
            }
            cp_async_commit();
            const __nv_bfloat16 *sK = sKV + (size_t)st * 2 * FA_TC * LD;
            const __nv_bfloat16 *sV = sK + FA_TC * LD;
            const int32_t c_first = kt * FA_TC + cb; /* the warp's first cell */
            if (active) {
                float s[NT][4];
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
                }
#pragma unroll
                for (int ks = 0; ks < KS; ks++) {
#pragma unroll
                    for (int np = 0; np < NT / 2; np++) {
                        uint32_t b[4];
                        ldsm_x4(b, sK + (cb + np * 16 + (lane & 7) + (lane >> 4) * 8) * LD +
                                       ks * 16 + ((lane >> 3) & 1) * 8);
                        mma_bf16(s[2 * np], qf[ks], b[0], b[1]);
                        mma_bf16(s[2 * np + 1], qf[ks], b[2], b[3]);
                    }
                }
                /* mask (only where a row's context ends inside the warp's cells), row max
                 * of the raw scores; the scale goes into the exponent's fma below */
                float mx[2] = {-INFINITY, -INFINITY};
                const bool whole = c_first + NT * 8 <= min(ctx[0], ctx[1]);
                if (__all_sync(0xffffffffu, whole)) {
#pragma unroll
                    for (int j = 0; j < NT; j++) {
                        mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
                        mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
                    }
                } else {
#pragma unroll
                    for (int j = 0; j < NT; j++) {
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int h = e >> 1;
                            const int32_t c = c_first + j * 8 + (lane & 3) * 2 + (e & 1);
                            const float v = c < ctx[h] ? s[j][e] : -INFINITY;
                            s[j][e] = v;
                            mx[h] = fmaxf(mx[h], v);
                        }
                    }
                }
                float corr[2], base[2];
                fa_online_max(mx, m, l, sl2, corr, base);
#pragma unroll
                for (int i = 0; i < DT; i++) {
                    o[i][0] *= corr[0];
                    o[i][1] *= corr[0];
                    o[i][2] *= corr[1];
                    o[i][3] *= corr[1];
                }
                /* P = exp2(S scale - m), bf16, as A fragments; l sums P in f32 */
                uint32_t pf[NT / 2][4];
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    float p[4];
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        p[e] = exp2f(fmaf(s[j][e], sl2, -base[e >> 1]));
                    }
                    l[0] += p[0] + p[1];
                    l[1] += p[2] + p[3];
                    pf[j >> 1][(j & 1) * 2 + 0] = pack_bf16(p[0], p[1]);
                    pf[j >> 1][(j & 1) * 2 + 1] = pack_bf16(p[2], p[3]);
                }
                /* O += P V */
#pragma unroll
                for (int kk = 0; kk < NT / 2; kk++) {
#pragma unroll
                    for (int dp = 0; dp < DT / 2; dp++) {
                        uint32_t b[4];
                        ldsm_x4_t(b, sV + (cb + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD +
                                         dp * 16 + (lane >> 4) * 8);
                        mma_bf16(o[2 * dp], pf[kk], b[0], b[1]);
                        mma_bf16(o[2 * dp + 1], pf[kk], b[2], b[3]);
                    }
                }
            }
        }
        cp_async_wait<0>();
        __syncthreads(); /* every warp is done with the K/V stages (the KVW merge reuses them) */
        /* row sums across the quad */
#pragma unroll
        for (int h = 0; h < 2; h++) {
            l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
            l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        }
        const float ln2 = 0.6931471805599453f;
        if (!KVW) {
            if (active) {
                fa_write_rows<DT>(a, t0, start, end, kvh, split, qb, lane,
                                  [&](int i, int k) { return o[i][k]; }, m, l);
            }
        } else {
            /* merge the four warps (each saw a quarter of every tile) through shared memory */
            float *mg = (float *)sKV; /* (4 warps, 16 vectors, HD + 2) */
            constexpr int MS = HD + 2;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int qv = (lane >> 2) + 8 * h;
                float *st = mg + (warp * 16 + qv) * MS;
#pragma unroll
                for (int i = 0; i < DT; i++) {
                    st[i * 8 + (lane & 3) * 2] = o[i][2 * h];
                    st[i * 8 + (lane & 3) * 2 + 1] = o[i][2 * h + 1];
                }
                if ((lane & 3) == 0) {
                    st[HD] = m[h];
                    st[HD + 1] = l[h];
                }
            }
            __syncthreads();
            for (int e = threadIdx.x; e < 16 * HD; e += THREADS) {
                const int qv = e / HD, d = e % HD;
                const int32_t row = t0 + qv / G;
                if (row < start || row >= end) {
                    continue;
                }
                float M = -INFINITY;
#pragma unroll
                for (int w = 0; w < 4; w++) {
                    const float *st = mg + (w * 16 + qv) * MS;
                    if (st[HD + 1] > 0.0f) {
                        M = fmaxf(M, st[HD]);
                    }
                }
                float Ls = 0.0f, acc = 0.0f;
#pragma unroll
                for (int w = 0; w < 4; w++) {
                    const float *st = mg + (w * 16 + qv) * MS;
                    if (st[HD + 1] > 0.0f) {
                        const float wt = exp2f(st[HD] - M);
                        Ls += st[HD + 1] * wt;
                        acc += st[d] * wt;
                    }
                }
                write_result(a, row, kvh * G + qv % G, split, d, acc, M * ln2, Ls);
            }
        }
        start = end;
    }
}

template <int HD>
static fa_fn fa_pick(bool kvw)
{
    return kvw ? attn_fa_kernel<HD, true, 4> : attn_fa_kernel<HD, false, 4>;
}

/* The kernel for head dim hd (a multiple of 16 up to 128) with nw warps (4; or 8 for head
 * dims 64 and 128 without KVW: 128 query vectors share each K/V tile), or NULL. */
static fa_fn fa_kernel_for(int hd, bool kvw, int nw)
{
    if (nw == 8 && !kvw) {
        return hd == 128 ? attn_fa_kernel<128, false, 8>
               : hd == 64 ? attn_fa_kernel<64, false, 8>
                          : NULL;
    }
    switch (hd) {
    case 16: return fa_pick<16>(kvw);
    case 32: return fa_pick<32>(kvw);
    case 48: return fa_pick<48>(kvw);
    case 64: return fa_pick<64>(kvw);
    case 80: return fa_pick<80>(kvw);
    case 96: return fa_pick<96>(kvw);
    case 112: return fa_pick<112>(kvw);
    case 128: return fa_pick<128>(kvw);
    default: return NULL;
    }
}

/* ---- combine -------------------------------------------------------------------------------- */

/* One block per (row, head): the splits' maxima and weights go through shared memory (one
 * load per split, in parallel), then each thread sums its dims over the splits with the
 * loads unrolled. (Looping over the splits three times per thread, each a dependent L2
 * round trip, cost ~30 us per layer at 33 splits.) Same sums, same order as before. */
static __global__ void __launch_bounds__(128) attn_combine_kernel(attn_args a)
{
    kvs_pdl_wait();
    kvs_pdl_trigger(); /* after the wait: see kvs_pdl_trigger */
    __shared__ float sw[MAX_SPLIT], sl[MAX_SPLIT]; /* per split: m (then weight), l */
    __shared__ float sM, sL;
    const int32_t rh = blockIdx.x; /* row * n_head + head */
    const int32_t ns = a.n_split, ps_len = a.hd + 2;
    const float *p = a.partial + (int64_t)rh * ns * ps_len;
    for (int s = threadIdx.x; s < ns; s += blockDim.x) {
        sw[s] = p[(int64_t)s * ps_len + a.hd];
        sl[s] = p[(int64_t)s * ps_len + a.hd + 1];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float M = -INFINITY;
        for (int s = 0; s < ns; s++) {
            if (sl[s] > 0.0f) {
                M = fmaxf(M, sw[s]);
            }
        }
        float Lsum = 0.0f;
        for (int s = 0; s < ns; s++) {
            if (sl[s] > 0.0f) {
                Lsum += sl[s] * expf(sw[s] - M);
            }
        }
        sM = M;
        sL = Lsum;
    }
    __syncthreads();
    const float M = sM, Lsum = sL;
    for (int s = threadIdx.x; s < ns; s += blockDim.x) {
        sw[s] = sl[s] > 0.0f ? expf(sw[s] - M) : 0.0f;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < a.hd; d += blockDim.x) {
        float o = 0.0f;
#pragma unroll 8
        for (int s = 0; s < ns; s++) {
            if (sl[s] > 0.0f) {
                o += p[(int64_t)s * ps_len + d] * sw[s];
            }
        }
        if (Lsum > 0.0f) {
            a.out[(int64_t)rh * a.hd + d] = o / Lsum;
        } else {
            a.out[(int64_t)rh * a.hd + d] = 0.0f;
            if (d == 0) {
                *a.flag = 2; /* a row with no context */
            }
        }
    }
}

/* ---- entry ------------------------------------------------------------------------------------ */

/* The graph-mode check of one attention launch (and its combine): the kernel and every
 * argument that a launch takes from the host. */
static bool launch_ok(struct kvs_cuda *c, const void *kernel, const attn_args &a)
{
    const uint64_t args[] = {(uint64_t)(uintptr_t)kernel,   (uint64_t)(uintptr_t)a.q,
                             (uint64_t)(uintptr_t)a.out,    (uint64_t)(uintptr_t)a.partial,
                             (uint64_t)(uintptr_t)a.k,      (uint64_t)(uintptr_t)a.row_ctx,
                             (uint64_t)(uintptr_t)a.row_table, (uint64_t)(uintptr_t)a.tables,
                             (uint64_t)a.n_rows,            (uint64_t)a.n_head,
                             (uint64_t)a.n_split,           kvs_cuda_fbits(a.scale),
                             (uint64_t)a.heavy_first};
    return kvs_cuda_launch_ok(c, 0x500, args, 13);
}

int kvs_cuda_attention(kvs_backend *b, kvs_kv_cache *kv, int32_t layer, const float *q,
                       int32_t n_head, float scale, const struct kvs_attn_batch *ab, float *out)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    kvs_cuda_xb_drop(c); /* device memory is written */
    assert(kv != NULL && q != NULL && ab != NULL && out != NULL);
    const struct kvs_kv_layout *l = &kv->layout;
    if (layer < 0 || layer >= l->n_layer) {
        return KVS_OUT_OF_RANGE;
    }
    if (n_head <= 0 || n_head % l->n_kv_head != 0 || l->head_dim > 32 * SIMPLE_MAX_PER_LANE) {
        return KVS_INVALID_ARGUMENT;
    }
    KVS_TRY(kvs_cuda_flush(c));
    if (ab->n_rows == 0) {
        return 0;
    }
    attn_args a;
    memset(&a, 0, sizeof a);
    a.q = q;
    a.out = out;
    a.partial = NULL;
    a.k = kv->k + (size_t)layer * kv->layer_stride;
    a.v = kv->v + (size_t)layer * kv->layer_stride;
    a.tmap = kv->tmap;
    a.tma_row0 = kv->tmap != NULL ? layer * l->n_block * l->n_kv_head * l->block_size : 0;
    a.row_ctx = ab->row_ctx;
    a.row_table = ab->row_table;
    a.tables = ab->tables;
    a.flag = c->d_flag;
    a.n_rows = ab->n_rows;
    a.n_head = n_head;
    a.n_kv_head = l->n_kv_head;
    a.hd = l->head_dim;
    a.group = n_head / l->n_kv_head;
    a.block_size = l->block_size;
    a.n_block = l->n_block;
    a.head_stride = kv->head_stride;
    a.block_stride = kv->block_stride;
    a.scale = scale;
    a.bs_shift = -1;
    for (int s = 0; s < 31; s++) {
        if ((1 << s) == a.block_size) {
            a.bs_shift = s;
        }
    }

    /* flash-attention path (mma.sync, cp.async): head dims a multiple of 16 up to 128; KVW
     * (warps split the KV tile) when the batch has few query vectors. KVS_CUDA_ATTN=old
     * selects the previous kernels (decode on CUDA cores, WMMA tiles) for comparison. */
    const bool use_old = c->env_attn_old;
    const bool kvw = (int64_t)a.n_rows * a.group <= 32 && 16 % a.group == 0;
    /* 8 warps (128 query vectors a tile) where that kernel exists and the batch has >= 64
     * query vectors per sequence (cuda.h, kvs_cuda_graph_begin; without a hint: >= 256
     * vectors); KVS_CUDA_FA_WARPS=4 or 8 forces the choice */
    const int64_t n_vec = (int64_t)a.n_rows * a.group;
    int nw = c->n_seqs_hint > 0 ? (n_vec >= 64 * (int64_t)c->n_seqs_hint ? 8 : 4)
                                : (n_vec >= 256 ? 8 : 4);
    if (c->env_fa_warps != 0) {
        nw = c->env_fa_warps;
    }
    nw = kvw ? 4 : nw;
    fa_fn fa = NULL;
    if (!use_old && (uintptr_t)q % 16 == 0 && a.scale > 0.0f) { /* row max of raw scores */
        if (nw == 8 && (fa_qv(kvw, nw) % a.group != 0 || fa_smem(a.hd, kvw, nw) > c->smem_optin ||
                        fa_kernel_for(a.hd, kvw, nw) == NULL)) {
            nw = 4;
        }
        if ((kvw || fa_qv(kvw, nw) % a.group == 0) && fa_smem(a.hd, kvw, nw) <= c->smem_optin) {
            fa = fa_kernel_for(a.hd, kvw, nw);
        }
    }
    size_t smem = fa != NULL ? fa_smem(a.hd, kvw, nw) : 0;
    int threads = nw * 32;
    /* Hopper: the wgmma kernel (attention_sm90a.cu) for head dim 128 where the 8-warp tile
     * applies (two warpgroups, the same 128 query vectors); KVS_CUDA_WGMMA=0 keeps the
     * mma.sync kernel */
    if (fa != NULL && nw == 8 && !kvw && a.hd == 128 && c->cc == 90 && c->env_wgmma != 0) {
        size_t wsm = 0;
        const int tma = c->env_wg_mb && a.tmap != NULL ? c->env_wg_tma : 0;
        int wthreads = 0;
        fa_fn wg = kvs_cuda_wg_kernel(c->env_wgmma, c->env_wg_mb, tma, &wsm, &wthreads);
        if (wg != NULL && wsm <= c->smem_optin) {
            fa = wg;
            smem = wsm;
            threads = wthreads;
        }
    }
    if (fa != NULL) {
        int per_sm = 0;
        for (int i = 0; i < c->n_fa_set; i++) {
            if (c->fa_set[i] == (const void *)fa) {
                per_sm = c->fa_per_sm[i];
            }
        }
        if (per_sm == 0) {
            CU_TRY(cudaFuncSetAttribute(fa, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)smem));
            CU_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fa, threads, smem));
            per_sm = per_sm < 1 ? 1 : per_sm;
            if (c->n_fa_set < 32) {
                c->fa_per_sm[c->n_fa_set] = per_sm;
                c->fa_set[c->n_fa_set++] = (const void *)fa;
            }
        }
        const int32_t rpt = fa_qv(kvw, nw) / a.group;
        const int64_t tiles = (a.n_rows + rpt - 1) / rpt;
        const int64_t n_units = tiles * a.n_kv_head;
        const int64_t want = (int64_t)per_sm * c->n_sm;
        /* whole waves: units * n_split <= one wave of resident blocks */
        a.n_split = n_units >= want ? 1 : (int32_t)(want / n_units);
        if (a.n_split > MAX_SPLIT) {
            a.n_split = MAX_SPLIT;
        }
        /* and at least KVS_CUDA_SPLIT_TILES (1) KV tiles a split over the bucket of the
         * batch's longest context (kvs_cuda_graph_begin's hint), the bucket (pow2/2, pow2]
         * counted from its low end, so that one graph serves the whole bucket: at 1K, 33
         * splits left half the blocks without a tile and gave the combine 33 partials
         * (decode 1K, H200: 1, 2, 4, 8, 16 tiles a split 4.97, 5.02, 5.15, 5.41, 5.90 ms) */
        if (c->max_ctx_hint > 0 && a.n_split > 1) {
            int64_t pow2 = 64;
            while (pow2 < c->max_ctx_hint) {
                pow2 *= 2;
            }
            const int64_t per = c->env_split_tiles;
            const int64_t cap = pow2 / 2 / FA_TC / per;
            a.n_split = (int32_t)(cap < 1 ? 1 : cap < a.n_split ? cap : a.n_split);
        }
        if (a.n_split > 1) {
            size_t need = (size_t)a.n_rows * n_head * a.n_split * (a.hd + 2) * sizeof(float);
            KVS_TRY(kvs_cuda_buf_reserve(&c->partial, need));
            a.partial = (float *)c->partial.p;
        }
        dim3 grid((unsigned)tiles, (unsigned)a.n_kv_head, (unsigned)a.n_split);
        a.heavy_first = c->env_fa_heavy_first;
        if (!launch_ok(c, (const void *)fa, a)) {
            return 0;
        }
        CU_TRY(kvs_cuda_launch(c, KVS_CUDA_PART_OTHER, fa, grid, dim3((unsigned)threads), smem, a));
        if (a.n_split > 1) {
            CU_TRY(kvs_cuda_launch(c, KVS_CUDA_PART_OTHER, attn_combine_kernel,
                                   dim3((unsigned)(a.n_rows * n_head)), dim3(128), 0, a));
        }
        return 0;
    }

    /* decode path: few rows (each row reads its own KV), head dims whose 8-dim slices tile a
     * warp, GQA groups up to DEC_MAX_G */
    const bool dec = a.n_rows <= KVS_CUDA_DECODE_MAX_ROWS && a.hd % 8 == 0 &&
                     32 % (a.hd / 8) == 0 &&
                     (a.group == 1 || a.group == 2 || a.group == 4 || a.group == 8);
    const bool tc = !dec && a.hd % 16 == 0 && a.hd <= MAX_TC_DIM && TILE_Q % a.group == 0 &&
                    tc_layout(a.hd).total <= c->smem_optin;
    int64_t n_units = dec  ? (int64_t)a.n_rows * a.n_kv_head
                      : tc ? (int64_t)((a.n_rows + TILE_Q / a.group - 1) / (TILE_Q / a.group)) *
                                 a.n_kv_head
                           : (int64_t)a.n_rows * n_head / 4;
    int64_t want = (dec ? 4 : 2) * (int64_t)c->n_sm;
    a.n_split = n_units >= want ? 1 : (int32_t)((want + n_units - 1) / n_units);
    if (a.n_split > MAX_SPLIT) {
        a.n_split = MAX_SPLIT;
    }
    if (a.n_split > 1) {
        size_t need = (size_t)a.n_rows * n_head * a.n_split * (a.hd + 2) * sizeof(float);
        KVS_TRY(kvs_cuda_buf_reserve(&c->partial, need));
        a.partial = (float *)c->partial.p;
    }
    if (!launch_ok(c, dec ? (const void *)attn_decode_kernel<1> : tc ? (const void *)attn_tc_kernel
                                                                   : (const void *)attn_simple_kernel,
                   a)) {
        return 0;
    }
    if (dec) {
        size_t smem = (size_t)(DEC_THREADS / (a.hd / 8)) * a.group * (a.hd + 2) * sizeof(float);
        dim3 grid((unsigned)a.n_rows, (unsigned)a.n_kv_head, (unsigned)a.n_split);
        switch (a.group) {
        case 1: attn_decode_kernel<1><<<grid, DEC_THREADS, smem, c->stream>>>(a); break;
        case 2: attn_decode_kernel<2><<<grid, DEC_THREADS, smem, c->stream>>>(a); break;
        case 4: attn_decode_kernel<4><<<grid, DEC_THREADS, smem, c->stream>>>(a); break;
        default: attn_decode_kernel<8><<<grid, DEC_THREADS, smem, c->stream>>>(a); break;
        }
    } else if (tc) {
        size_t smem = tc_layout(a.hd).total;
        if (!c->attn_smem_set) {
            CU_TRY(cudaFuncSetAttribute(attn_tc_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
            c->attn_smem_set = smem;
        } else if (smem > c->attn_smem_set) {
            CU_TRY(cudaFuncSetAttribute(attn_tc_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
            c->attn_smem_set = smem;
        }
        dim3 grid((unsigned)((a.n_rows + TILE_Q / a.group - 1) / (TILE_Q / a.group)),
                  (unsigned)a.n_kv_head, (unsigned)a.n_split);
        attn_tc_kernel<<<grid, ATT_THREADS, smem, c->stream>>>(a);
    } else {
        dim3 grid((unsigned)(a.n_rows * n_head), (unsigned)a.n_split);
        attn_simple_kernel<<<grid, 32, 0, c->stream>>>(a);
    }
    CU_LAUNCHED();
    if (a.n_split > 1) {
        attn_combine_kernel<<<(unsigned)(a.n_rows * n_head), 128, 0, c->stream>>>(a);
        CU_LAUNCHED();
    }
    return 0;
}

