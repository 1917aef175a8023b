/* Internals of the attention kernels shared by attention.cu and attention_sm90a.cu: the
 * launch arguments, the split and sub-tile helpers, the result writer and the cp.async
 * wrappers. */
#ifndef KVS_ATTENTION_IMPL_H
#define KVS_ATTENTION_IMPL_H
#include "kernels/cuda/cuda_impl.h"

#define TILE_C 64    /* KV cells per step (the split unit) */
#define MAX_SPLIT 64 /* splits over the context */

struct attn_args {
    const float *q;             /* (n_rows, n_head, hd) */
    float *out;                 /* (n_rows, n_head, hd) */
    float *partial;             /* (n_rows, n_head, n_split, hd + 2): acc, m, l */
    const __nv_bfloat16 *k, *v; /* this layer's K and V */
    const int32_t *row_ctx, *row_table, *tables;
    int *flag;
    int32_t n_rows, n_head, n_kv_head, hd, group, block_size, n_block, n_split;
    int32_t bs_shift; /* log2(block_size) when a power of two, else -1 */
    int32_t heavy_first; /* flash kernels: blocks take their row tiles last first (below) */
    const void *tmap;    /* the wgmma kernel's TMA maps of K and V (kvs_kv_cache.tmap) ... */
    int32_t tma_row0;    /* ... and this layer's first 16-cell row in them */
    size_t head_stride, block_stride; /* elements */
    float scale;
};

/* The row tile and KV head of a flash-attention block (grid: tiles x KV heads x splits). With
 * heavy_first the blocks go out in the order last row tile first, its KV heads together: a
 * sequence's later rows attend to more cells, so the longest blocks start first and the
 * short ones fill the last wave (a 2048-row chunk is 512 blocks of 1 to 16 KV tiles at its
 * start of context). */
static __device__ __forceinline__ void fa_block_unit(const attn_args &a, int32_t *tile,
                                                     int32_t *kvh)
{
    if (!a.heavy_first) {
        *tile = blockIdx.x;
        *kvh = blockIdx.y;
        return;
    }
    const int32_t u = blockIdx.x + blockIdx.y * gridDim.x; /* launch order within a split */
    *tile = gridDim.x - 1 - u / gridDim.y;
    *kvh = u % gridDim.y;
}

/* Rows [*start, *end) of [t0, t1) with the same block table as row *start. */
static __device__ __forceinline__ int32_t sub_tile_end(const attn_args &a, int32_t start,
                                                       int32_t t1)
{
    int32_t tab = a.row_table[start], end = start + 1;
    while (end < t1 && a.row_table[end] == tab) {
        end++;
    }
    return end;
}

/* The KV tiles [*kt0, *kt1) that split s of a context of n_ctx cells covers. */
static __device__ __forceinline__ void split_range(int32_t n_ctx, int32_t n_split, int32_t s,
                                                   int32_t *kt0, int32_t *kt1)
{
    int32_t n_tiles = (n_ctx + TILE_C - 1) / TILE_C;
    int32_t per = (n_tiles + n_split - 1) / n_split;
    *kt0 = min(s * per, n_tiles);
    *kt1 = min(*kt0 + per, n_tiles);
}

/* Write one query's result: final (normalized) or this split's partial. */
static __device__ __forceinline__ void write_result(const attn_args &a, int32_t row, int32_t head,
                                                    int32_t split, int32_t d, float acc, float m,
                                                    float l)
{
    if (a.n_split == 1) {
        if (l == 0.0f) {
            if (d == 0) {
                *a.flag = 2; /* a row with no context */
            }
            a.out[((int64_t)row * a.n_head + head) * a.hd + d] = 0.0f;
        } else {
            a.out[((int64_t)row * a.n_head + head) * a.hd + d] = acc / l;
        }
        return;
    }
    float *p = a.partial + (((int64_t)row * a.n_head + head) * a.n_split + split) * (a.hd + 2);
    p[d] = acc;
    if (d == 0) {
        p[a.hd] = m;
        p[a.hd + 1] = l;
    }
}

static __device__ __forceinline__ uint32_t smem_u32(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

static __device__ __forceinline__ void cp_async16(void *dst, const void *src, bool full)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)),
                 "l"(src), "r"(full ? 16 : 0));
}

static __device__ __forceinline__ void cp_async_commit()
{
    asm volatile("cp.async.commit_group;\n" ::);
}

template <int N>
static __device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

static __device__ __forceinline__ uint32_t pack_bf16(float lo, float hi)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *(uint32_t *)&v;
}

/* Flash kernels (attention.cu, attention_sm90a.cu): a tile's QV query vectors are QV / G
 * consecutive rows x the G query heads of KV head kvh. */

/* Store the tile's queries of rows [start, end) as bf16 (zeros for the other vectors) at
 * base + off(query vector, dim) bytes, 4 dims a store. */
template <int QV, int HD, int THREADS, typename Off>
static __device__ __forceinline__ void fa_store_q(const attn_args &a, int32_t t0, int32_t start,
                                                  int32_t end, int32_t kvh, unsigned char *base,
                                                  Off off)
{
    const int32_t G = a.group;
    for (int e = threadIdx.x; e < QV * HD / 4; e += THREADS) {
        const int qi = e / (HD / 4), d = (e % (HD / 4)) * 4;
        const int32_t row = t0 + qi / G;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (row >= start && row < end) {
            x = *(const float4 *)(a.q + ((int64_t)row * a.n_head + kvh * G + qi % G) * HD + d);
        }
        uint2 p;
        p.x = pack_bf16(x.x, x.y);
        p.y = pack_bf16(x.z, x.w);
        *(uint2 *)(base + off(qi, d)) = p;
    }
}

/* The contexts of this thread's two query vectors (qb + lane / 4 and + 8; an mma fragment's
 * rows): 0 outside the sub-tile [start, end). */
static __device__ __forceinline__ void fa_row_ctx(const attn_args &a, int32_t t0, int32_t start,
                                                  int32_t end, int qb, int lane, int32_t (&ctx)[2])
{
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int32_t row = t0 + (qb + (lane >> 2) + 8 * h) / a.group;
        ctx[h] = (row >= start && row < end) ? a.row_ctx[row] : 0;
    }
}

/* cp.async of KV tile kt (cells kt * TC ..) of a sequence whose blocks are listed in table:
 * the 16-byte chunk (cell, part) of K and of V to sK / sV + dst(cell, part) bytes, zeros past
 * n_ctx; a block id outside the pool raises the device flag and loads zeros. */
template <int TC, int HD, int THREADS, typename Dst>
static __device__ __forceinline__ void fa_load_tile(const attn_args &a, const __nv_bfloat16 *kb,
                                                    const __nv_bfloat16 *vb,
                                                    const int32_t *__restrict__ table,
                                                    int32_t n_ctx, int32_t kt, unsigned char *sK,
                                                    unsigned char *sV, Dst dst)
{
    constexpr int CPR = HD / 8; /* 16-byte chunks per cell */
    bool bad = false;
#pragma unroll
    for (int u = 0; u < (TC * CPR + THREADS - 1) / THREADS; u++) {
        const int j = threadIdx.x + u * THREADS;
        if (TC * CPR % THREADS != 0 && j >= TC * CPR) {
            break;
        }
        const int cell = j / CPR, part = j % CPR;
        const int32_t c = kt * TC + cell;
        const __nv_bfloat16 *ks = kb, *vs = vb;
        bool ok = false;
        if (c < n_ctx) {
            const int32_t bi = a.bs_shift >= 0 ? c >> a.bs_shift : c / a.block_size;
            const int32_t bc = a.bs_shift >= 0 ? c & (a.block_size - 1) : c % a.block_size;
            const int32_t blk = __ldg(table + bi);
            ok = blk >= 0 && blk < a.n_block;
            bad |= !ok;
            if (ok) {
                const size_t off = (size_t)blk * a.block_stride + (size_t)bc * HD + part * 8;
                ks = kb + off;
                vs = vb + off;
            }
        }
        const uint32_t d = dst(cell, part);
        cp_async16(sK + d, ks, ok);
        cp_async16(sV + d, vs, ok);
    }
    if (bad) {
        *a.flag = 1;
    }
}

/* One online-softmax step for this thread's two rows, given the maxima mx of its raw scores
 * in the new tile: the row maxima across the quad, the new running maxima m (log2 units,
 * scores times sl2), base (0 for a row with no score yet), the rescale corr of the old O and
 * l (l is rescaled here; O by the caller). */
static __device__ __forceinline__ void fa_online_max(float (&mx)[2], float (&m)[2],
                                                     float (&l)[2], float sl2,
                                                     float (&corr)[2], float (&base)[2])
{
#pragma unroll
    for (int h = 0; h < 2; h++) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        const float mn = fmaxf(m[h], mx[h] * sl2);
        base[h] = mn == -INFINITY ? 0.0f : mn;
        corr[h] = exp2f(m[h] - base[h]); /* 0 when m was -inf */
        m[h] = mn;
        l[h] *= corr[h];
    }
}

/* Write this thread's part of a warp's O, an mma accumulator: o_at(i, 2h + e) is element e of
 * row half h in 8-dim column tile i; for the rows of the sub-tile, with m in log2 units and
 * l already summed across the quad. */
template <int DT, typename OAt>
static __device__ __forceinline__ void fa_write_rows(const attn_args &a, int32_t t0,
                                                     int32_t start, int32_t end, int32_t kvh,
                                                     int32_t split, int qb, int lane, OAt o_at,
                                                     const float (&m)[2], const float (&l)[2])
{
    const float ln2 = 0.6931471805599453f;
    const int32_t G = a.group;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int qv = qb + (lane >> 2) + 8 * h;
        const int32_t row = t0 + qv / G;
        if (row >= start && row < end) {
#pragma unroll
            for (int i = 0; i < DT; i++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    write_result(a, row, kvh * G + qv % G, split, i * 8 + (lane & 3) * 2 + e,
                                 o_at(i, 2 * h + e), m[h] * ln2, l[h]);
                }
            }
        }
    }
}

typedef void (*fa_fn)(attn_args);

/* attention_sm90a.cu: the Hopper (wgmma) flash kernel for head dim 128 and 128 query vectors
 * a tile (two warpgroups), tc cells a KV tile (64 or 128), mb: stages handed over through
 * mbarriers instead of a block barrier a tile, and its dynamic shared memory; NULL for other
 * tile sizes. */
fa_fn kvs_cuda_wg_kernel(int tc, bool mb, int tma, size_t *smem, int *threads);

#endif
