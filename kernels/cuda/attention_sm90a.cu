/* Paged flash attention on Hopper's warpgroup MMA (wgmma), for prefill chunks and questions:
 * head dim 128, 64 query vectors a warpgroup and two warpgroups a block sharing its K/V
 * tiles, KV tiles of TC cells (64 or 128) in shared memory with the 128-byte swizzle that
 * wgmma reads. (One warpgroup a block, two blocks a multiprocessor, was measured slower:
 * 2192 vs 1920 ms stateless 32K.)
 *
 * The same algorithm, tiling of rows, splits and results as attn_fa_kernel's 8-warp variant
 * (attention.cu): only the products move from mma.sync (each warp reading K and V fragments
 * out of shared memory with ldmatrix, 16 query vectors per K/V read) to wgmma (a warpgroup's
 * 64 query vectors per read, operands straight from shared memory, asynchronous). S = Q K^T
 * takes Q and K from shared memory (both K-major); O += P V takes P from registers (the S
 * accumulator layout of a warp is the A fragment layout, as with mma.sync) and V from
 * shared memory as an N-major operand (V's cells are rows with the head dims contiguous).
 *
 * Shared memory layout (bytes), every matrix as 64-dim halves of 128-byte rows, the 16-byte
 * chunk c of row r stored at chunk c ^ (r % 8) (the 128-byte swizzle; halves 1024-aligned):
 *   Q: half h at h * 128 rows * 128; K and V of stage s: half h at h * TC * 128.
 * Descriptors: K-major (Q, K): stride 1024 between 8-row groups, a k-step of 16 dims is +32
 * bytes inside a 128-byte row, the second half is the next 64 dims. N-major (V): stride 1024
 * between 8-cell groups (the k direction), 'leading' offset TC * 128 between the two halves
 * (the n direction), a k-step of 16 cells is +2048 bytes.
 *
 * Loads (by default): a ninth warp, the producer, issues each K/V tile by TMA (tensor maps of
 * the pool made at KV creation, kv.cu; a lane a 16-cell block, 2 KiB boxes landing in the
 * swizzled layout above) into three stages, and the two warpgroups only compute: they wait
 * on a stage's "full" mbarrier (transaction bytes) and release it on its "empty" one after P
 * V. Measured against the loads issued by consumer warp 0 (KVS_CUDA_WG_TMA=1) and cp.async by
 * every thread (=0): stateless 32K fill 1334 vs 1464 vs 1492 ms (bench/results, S4-G).
 *
 * Compiled for sm_90a only (wgmma); kvs_cuda_wg_kernel returns NULL elsewhere. */
#include "kernels/cuda/attention_impl.h"

#include <math.h>

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || !defined(__CUDA_ARCH__)
#define KVS_WG_ON 1
#endif

#define WG_HD 128

#define WG_NWG 2 /* warpgroups a block */

/* KV stages: 64-cell tiles 3 (128 KiB), 128-cell tiles 2; the mbarrier pipeline (MB) 3 with
 * one tile loaded ahead (224 KiB with 128-cell tiles), so that a warp may run a tile ahead of
 * another (the stage it refills was released two tiles ago). */
static __host__ __device__ constexpr int wg_stages(int tc, bool mb)
{
    return mb || tc == 64 ? 3 : 2;
}

static __host__ __device__ constexpr size_t wg_smem(int tc, bool mb)
{
    /* Q (64 query vectors a warpgroup), then per stage K and V; + 1024 to align the start */
    return (size_t)64 * WG_NWG * WG_HD * 2 + (size_t)wg_stages(tc, mb) * 2 * tc * WG_HD * 2 +
           1024;
}

#if defined(KVS_WG_ON)
// clang-format off
/* D (m64n64, f32) (+)= A (smem desc, K-major) x B (smem desc, K-major), bf16. */
static __device__ __forceinline__ void wg_mma_ss_n64(float (&d)[32], uint64_t da, uint64_t db,
                                                   int accumulate)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "l"(da), "l"(db), "r"(accumulate));
}

/* D (m64n128, f32) (+)= A (smem desc, K-major) x B (smem desc, K-major), bf16. */
static __device__ __forceinline__ void wg_mma_ss_n128(float (&d)[64], uint64_t da, uint64_t db,
                                                   int accumulate)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "l"(da), "l"(db), "r"(accumulate));
}

/* D (m64n128, f32) += A (registers: bf16 fragments) x B (smem desc, MN-major), bf16. */
static __device__ __forceinline__ void wg_mma_rs_n128_tb(float (&d)[64], const uint32_t (&ra)[4],
                                                      uint64_t db)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "r"(ra[0]), "r"(ra[1]), "r"(ra[2]), "r"(ra[3]), "l"(db), "r"(1));
}
// clang-format on

static __device__ __forceinline__ void wg_fence()
{
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

static __device__ __forceinline__ void wg_commit()
{
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

static __device__ __forceinline__ void wg_wait0()
{
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}

/* mbarriers in shared memory (MB pipeline). */
static __device__ __forceinline__ void mb_init(uint64_t *bar, int count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count)
                 : "memory");
}

static __device__ __forceinline__ void mb_inval(uint64_t *bar)
{
    asm volatile("mbarrier.inval.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}

static __device__ __forceinline__ void mb_arrive(uint64_t *bar)
{
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(
                     smem_u32(bar))
                 : "memory");
}

/* Arrive once this thread's cp.async operations so far have completed. */
static __device__ __forceinline__ void mb_arrive_cp_async(uint64_t *bar)
{
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar))
                 : "memory");
}

/* Wait until the phase of the given parity has completed. */
static __device__ __forceinline__ void mb_wait(uint64_t *bar, uint32_t parity)
{
    asm volatile("{\n.reg .pred p;\nWAIT_%=:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
                 "@!p bra WAIT_%=;\n}\n" ::"r"(smem_u32(bar)),
                 "r"(parity)
                 : "memory");
}

/* 2^x on the special-function unit alone: exp2f adds a range test and two multiplies a call
 * to keep results below 2^-126 (denormal) exact; softmax weights that small flush to 0. */
static __device__ __forceinline__ float ex2_ftz(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

/* Arrive once on bar, expecting bytes more of transactions (TMA copies) in this phase. */
static __device__ __forceinline__ void mb_arrive_expect_tx(uint64_t *bar, uint32_t bytes)
{
    const uint32_t b = smem_u32(bar);
    asm volatile("{\n.reg .b64 st;\n"
                 "mbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(b),
                 "r"(bytes)
                 : "memory");
}

/* TMA: the box at (x, y) of the tensor map at tmap (global memory) into dst (shared), counted
 * on bar's transactions. */
static __device__ __forceinline__ void tma_load_2d(void *dst, const void *tmap, int32_t x,
                                                   int32_t y, uint64_t *bar)
{
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(smem_u32(dst)),
                 "l"((uint64_t)(uintptr_t)tmap), "r"(x), "r"(y), "r"(smem_u32(bar))
                 : "memory");
}

/* Generic-proxy writes (st.shared, cp.async) before wgmma (the async proxy) reads them. */
static __device__ __forceinline__ void fence_proxy_async()
{
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

/* A shared-memory matrix descriptor, 128-byte swizzle. */
static __device__ __forceinline__ uint64_t wg_desc(const void *p, uint32_t lbo, uint32_t sbo)
{
    const uint64_t addr = smem_u32(p);
    return ((addr & 0x3FFFF) >> 4) | ((uint64_t)((lbo >> 4) & 0x3FFF) << 16) |
           ((uint64_t)((sbo >> 4) & 0x3FFF) << 32) | ((uint64_t)1 << 62);
}

/* Byte offset of (row, dim) in a swizzled matrix of n_rows rows of WG_HD dims. */
static __device__ __forceinline__ uint32_t wg_off(int row, int dim, int n_rows)
{
    const int half = dim >> 6, chunk = (dim & 63) >> 3;
    return (uint32_t)(half * n_rows * 128 + row * 128 + ((chunk ^ (row & 7)) << 4) +
                      ((dim & 7) << 1));
}

/* cp.async of KV tile kt (cells kt * TC ..) into sK, sV, for the pool's default 16-cell
 * blocks and 256 threads: thread t always takes dims (t % 16) * 8.. of cells t / 16 + 16 u,
 * i.e. cell t / 16 of the tile's u-th block, so its destinations are fixed offsets (+2048
 * bytes a block: the swizzle repeats every 8 rows) and its sources one table entry and one
 * multiply-add a block. (The general loop below spent ~30 instructions a 16-byte chunk on
 * cell, block and swizzle arithmetic.) */
template <int TC>
static __device__ __forceinline__ void wg_load16(const attn_args &a, const __nv_bfloat16 *kb,
                                                 const __nv_bfloat16 *vb,
                                                 const int32_t *__restrict__ table,
                                                 int32_t n_ctx, int32_t kt, unsigned char *sK,
                                                 unsigned char *sV)
{
    const int cell = threadIdx.x >> 4, part = threadIdx.x & 15;
    const uint32_t d0 = wg_off(cell, part * 8, TC);
    const size_t so = (size_t)cell * WG_HD + part * 8;
    const int32_t b0 = kt * (TC / 16);
    bool bad = false;
#pragma unroll
    for (int u = 0; u < TC / 16; u++) {
        const int32_t c = (b0 + u) * 16 + cell;
        const __nv_bfloat16 *ks = kb, *vs = vb;
        bool ok = false;
        if (c < n_ctx) {
            const int32_t blk = __ldg(table + b0 + u);
            ok = blk >= 0 && blk < a.n_block;
            bad |= !ok;
            if (ok) {
                const size_t off = (size_t)blk * a.block_stride + so;
                ks = kb + off;
                vs = vb + off;
            }
        }
        cp_async16(sK + d0 + u * 2048, ks, ok);
        cp_async16(sV + d0 + u * 2048, vs, ok);
    }
    if (bad) {
        *a.flag = 1;
    }
}

/* KV tile kt by TMA, issued by one warp: lane u < TC / 16 takes the tile's u-th 16-cell
 * block: if it lies below n_ctx, the two 64-dim halves of its K and of its V (2 KiB boxes,
 * 128-byte swizzle, landing where wg_off puts them). Each of those lanes arrives on bar once,
 * expecting its bytes (bar counts TC / 16 arrivals). Blocks past n_ctx are not loaded: their
 * cells keep finite values (the stages are zeroed at the kernel's start, then hold earlier
 * tiles), which the mask gives zero weight. */
template <int TC>
static __device__ __forceinline__ void wg_tma_tile(const attn_args &a,
                                                   const int32_t *__restrict__ table,
                                                   int32_t n_ctx, int32_t kt, int32_t kvh,
                                                   unsigned char *sK, unsigned char *sV,
                                                   uint64_t *bar)
{
    const int u = threadIdx.x & 31;
    if (u >= TC / 16) {
        return;
    }
    const int32_t b = kt * (TC / 16) + u;
    int32_t row = -1;
    if (b * 16 < n_ctx) {
        const int32_t blk = __ldg(table + b);
        if (blk >= 0 && blk < a.n_block) {
            row = a.tma_row0 + (blk * a.n_kv_head + kvh) * 16;
        } else {
            *a.flag = 1;
        }
    }
    mb_arrive_expect_tx(bar, row >= 0 ? 4 * 2048 : 0);
    if (row >= 0) {
        const unsigned char *tk = (const unsigned char *)a.tmap, *tv = tk + 128;
        tma_load_2d(sK + u * 2048, tk, 0, row, bar);
        tma_load_2d(sK + TC * 128 + u * 2048, tk, 64, row, bar);
        tma_load_2d(sV + u * 2048, tv, 0, row, bar);
        tma_load_2d(sV + TC * 128 + u * 2048, tv, 64, row, bar);
    }
}

/* cp.async of KV tile kt (cells kt * TC ..) into sK, sV: any block size, any thread count. */
template <int TC, int THREADS>
static __device__ __forceinline__ void wg_load(const attn_args &a, const __nv_bfloat16 *kb,
                                               const __nv_bfloat16 *vb,
                                               const int32_t *__restrict__ table, int32_t n_ctx,
                                               int32_t kt, unsigned char *sK, unsigned char *sV)
{
    fa_load_tile<TC, WG_HD, THREADS>(a, kb, vb, table, n_ctx, kt, sK, sV, [](int cell, int part) {
        return wg_off(cell, part * 8, TC);
    });
}
#endif

/* MB: the stages are handed over through mbarriers instead of a block barrier a tile: "full"
 * (every thread's cp.async of the tile has landed: cp.async.mbarrier.arrive) and "empty"
 * (every warp is done reading the stage), so warps are no longer held in step every tile
 * (ncu: "Stall Barrier" was the largest stall of the barrier loop). */
/* Threads of a block: two warpgroups, and with TMA == 2 a producer warp that only loads. */
static __host__ __device__ constexpr int wg_threads(int tma)
{
    return WG_NWG * 128 + (tma == 2 ? 32 : 0);
}

/* TMA: 0 cp.async by every thread; 1 TMA issued by warp 0 (a lane a block) between its own
 * GEMMs; 2 TMA issued by a ninth warp that does nothing else, so no consumer waits for a
 * stage to be released before its own next GEMM (the loader of 1 waited for the other
 * warpgroup's P V there). */
template <int TC, bool MB, int TMA>
static __global__ void __launch_bounds__(wg_threads(TMA), 1) attn_wg_kernel(attn_args a)
{
#if defined(KVS_WG_ON) && defined(__CUDA_ARCH__)
    kvs_pdl_wait();
    kvs_pdl_trigger(); /* after the wait: see kvs_pdl_trigger */
    constexpr int NWG = WG_NWG;
    constexpr int S = wg_stages(TC, MB);
    constexpr int LA = MB ? S - 2 : S - 1; /* tiles loaded ahead of the one in use */
    __shared__ __align__(8) uint64_t full_bar[S], empty_bar[S]; /* MB */
    bool bars_live = false;                                     /* MB, thread 0 */
    constexpr int WG_QV = 64 * NWG, WG_THREADS = 128 * NWG; /* query vectors, threads */
    constexpr int NT = TC / 8;     /* 8-cell column tiles of S per warp */
    constexpr int DT = WG_HD / 8;  /* 8-dim column tiles of O */
    constexpr int KQ = WG_HD / 16; /* k-steps of S = Q K^T */
    constexpr int KP = TC / 16;    /* k-steps of O += P V */
    constexpr uint32_t QB = WG_QV * WG_HD * 2, KVB = TC * WG_HD * 2; /* bytes */
    extern __shared__ unsigned char wsm_raw[];
    unsigned char *sQ =
        (unsigned char *)(((uintptr_t)wsm_raw + 1023) & ~(uintptr_t)1023); /* 1024-aligned */
    unsigned char *sKV = sQ + QB; /* stage s: K at sKV + 2s KVB, V after it */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wg = warp >> 2;
    constexpr int NTHREADS = wg_threads(TMA);
    const bool producer = TMA == 2 && warp == NWG * 4; /* the loading warp (TMA == 2) */
    const int qb = warp * 16; /* the warp's first query vector */
    const int32_t G = a.group, rows_per_tile = WG_QV / G;
    int32_t tile, kvh;
    fa_block_unit(a, &tile, &kvh);
    const int32_t t0 = tile * rows_per_tile;
    const int32_t t1 = min(t0 + rows_per_tile, a.n_rows);
    const int32_t split = blockIdx.z;
    const __nv_bfloat16 *kb = a.k + (size_t)kvh * a.head_stride;
    const __nv_bfloat16 *vb = a.v + (size_t)kvh * a.head_stride;
    const float sl2 = a.scale * 1.4426950408889634f; /* scores in log2 units */
    const bool fast16 = WG_THREADS == 256 && a.block_size == 16; /* wg_load16's case */
    static_assert(!TMA || MB, "TMA tiles are handed over by mbarriers");
    if (TMA) { /* the stages zeroed once: cells never loaded are finite (wg_tma_tile) */
        uint4 *z = (uint4 *)sKV;
        for (int i = threadIdx.x; i < S * 2 * (int)KVB / 16; i += NTHREADS) {
            z[i] = make_uint4(0, 0, 0, 0);
        }
        fence_proxy_async();
    }

    for (int32_t start = t0; start < t1;) {
        const int32_t end = sub_tile_end(a, start, t1);
        const int32_t *table = a.tables + a.row_table[start];
        int32_t n_ctx = 0;
        for (int32_t r = start; r < end; r++) {
            n_ctx = max(n_ctx, a.row_ctx[r]);
        }
        /* this split's KV tiles of TC cells */
        const int32_t n_tiles = (n_ctx + TC - 1) / TC;
        const int32_t per = (n_tiles + a.n_split - 1) / a.n_split;
        const int32_t kt0 = min(split * per, n_tiles), kt1 = min(kt0 + per, n_tiles);

        __syncthreads(); /* the previous sub-tile is done with shared memory */
        if (MB) { /* fresh barriers for this sub-tile's tiles */
            if (threadIdx.x == 0) {
                for (int s = 0; s < S; s++) {
                    if (bars_live) {
                        mb_inval(&full_bar[s]);
                        mb_inval(&empty_bar[s]);
                    }
                    mb_init(&full_bar[s], TMA ? TC / 16 : WG_THREADS);
                    mb_init(&empty_bar[s], WG_THREADS / 32);
                }
                bars_live = true;
            }
            __syncthreads();
        }
        /* cp.async of tile kt into stage st (MB: arriving on its "full" barrier) */
        auto load_tile = [&](int32_t kt, int st) {
            unsigned char *nk = sKV + (size_t)st * 2 * KVB;
            if constexpr (TMA) {
                wg_tma_tile<TC>(a, table, n_ctx, kt, kvh, nk, nk + KVB, &full_bar[st]);
                return;
            }
            if (fast16) {
                wg_load16<TC>(a, kb, vb, table, n_ctx, kt, nk, nk + KVB);
            } else {
                wg_load<TC, WG_THREADS>(a, kb, vb, table, n_ctx, kt, nk, nk + KVB);
            }
            if (MB) {
                mb_arrive_cp_async(&full_bar[st]);
            }
        };
        uint32_t full_par = 0, empty_par = 0; /* MB: the parity each stage's next wait expects */
        if (TMA == 2) { /* the producer: the first S tiles now, the rest below */
            if (producer) {
                for (int32_t kt = kt0; kt < min(kt0 + S, kt1); kt++) {
                    load_tile(kt, (kt - kt0) % S);
                }
            }
        } else {
#pragma unroll
            for (int s = 0; s < LA; s++) {
                if (kt0 + s < kt1 && (!TMA || warp == 0)) {
                    load_tile(kt0 + s, s);
                }
                cp_async_commit(); /* one group per tile, empty or not */
            }
        }
        /* Q of the sub-tile's rows (others zero), swizzled */
        int32_t ctx[2]; /* of this thread's two query vectors */
        if (!producer) {
            fa_store_q<WG_QV, WG_HD, WG_THREADS>(
                a, t0, start, end, kvh, sQ, [](int qi, int d) { return wg_off(qi, d, WG_QV); });
            fa_row_ctx(a, t0, start, end, qb, lane, ctx);
        }
        fence_proxy_async();
        __syncthreads();
        if (producer) { /* every later tile once the consumers have released its stage */
            for (int32_t kt = kt0 + S; kt < kt1; kt++) {
                const int st = (kt - kt0) % S;
                mb_wait(&empty_bar[st], (empty_par >> st) & 1);
                empty_par ^= 1u << st;
                load_tile(kt, st);
            }
            start = end;
            continue;
        }
        float o[DT * 4];
#pragma unroll
        for (int i = 0; i < DT * 4; i++) {
            o[i] = 0.0f;
        }
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
        const unsigned char *qw = sQ + wg * 64 * 128; /* this warpgroup's 64 query vectors */
        auto stage = [&](int32_t kt) { return sKV + (size_t)((kt - kt0) % S) * 2 * KVB; };
        float s[NT * 4];
        uint32_t pf[KP][4];
        /* issue S = Q K^T of tile kt: 8 k-steps of 16 dims */
        auto issue_s = [&](int32_t kt) {
            const unsigned char *sk = stage(kt);
#pragma unroll
            for (int kk = 0; kk < KQ; kk++) {
                const uint64_t dq = wg_desc(qw + (kk >> 2) * QB / 2 + (kk & 3) * 32, 16, 1024);
                const uint64_t dk = wg_desc(sk + (kk >> 2) * (KVB / 2) + (kk & 3) * 32, 16, 1024);
                if constexpr (TC == 64) {
                    wg_mma_ss_n64(s, dq, dk, kk > 0);
                } else {
                    wg_mma_ss_n128(s, dq, dk, kk > 0);
                }
            }
            wg_commit();
        };
        /* issue O += P V of tile kt: k-steps of 16 cells */
        auto issue_pv = [&](int32_t kt) {
            const unsigned char *sv = stage(kt) + KVB;
#pragma unroll
            for (int kk = 0; kk < KP; kk++) {
                wg_mma_rs_n128_tb(o, pf[kk], wg_desc(sv + kk * 16 * 128, KVB / 2, 1024));
            }
            wg_commit();
        };
        auto scores = [&](int32_t kt) {
            wg_fence();
            issue_s(kt);
            wg_wait0();
        };
        float corr[2]; /* O's rescale of the tile in softmax_a, applied in softmax_b */
        /* mask (only where a row's context ends inside the tile), online softmax: s becomes
         * P = exp2(S scale - m) in f32 (l sums it) */
        auto softmax_a = [&](int32_t kt) {
            const int32_t c_first = kt * TC; /* warps share all of a tile's cells */
            float mx[2] = {-INFINITY, -INFINITY};
            const bool whole = c_first + TC <= min(ctx[0], ctx[1]);
            if (!__all_sync(0xffffffffu, whole)) {
#pragma unroll
                for (int j = 0; j < NT; j++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int32_t c = c_first + j * 8 + (lane & 3) * 2 + (e & 1);
                        s[4 * j + e] = c < ctx[e >> 1] ? s[4 * j + e] : -INFINITY;
                    }
                }
            }
            /* row maxima as a tree (a chain of NT dependent maxima per row stalled on
             * latency with two warps a scheduler) */
            {
                float t[2][NT];
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    t[0][j] = fmaxf(s[4 * j], s[4 * j + 1]);
                    t[1][j] = fmaxf(s[4 * j + 2], s[4 * j + 3]);
                }
                static_assert(NT == 8 || NT == 16, "tree of 8 or 16 maxima");
                if constexpr (NT == 16) {
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        t[0][j] = fmaxf(t[0][j], t[0][j + 8]);
                        t[1][j] = fmaxf(t[1][j], t[1][j + 8]);
                    }
                }
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    t[0][j] = fmaxf(t[0][j], t[0][j + 4]);
                    t[1][j] = fmaxf(t[1][j], t[1][j + 4]);
                }
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    t[0][j] = fmaxf(t[0][j], t[0][j + 2]);
                    t[1][j] = fmaxf(t[1][j], t[1][j + 2]);
                }
                t[0][0] = fmaxf(t[0][0], t[0][1]);
                t[1][0] = fmaxf(t[1][0], t[1][1]);
                mx[0] = t[0][0];
                mx[1] = t[1][0];
            }
            float base[2];
            fa_online_max(mx, m, l, sl2, corr, base);
            float ls[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
            for (int j = 0; j < NT; j++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    s[4 * j + e] = ex2_ftz(fmaf(s[4 * j + e], sl2, -base[e >> 1]));
                }
                ls[0][j & 3] += s[4 * j] + s[4 * j + 1]; /* four partial sums a row */
                ls[1][j & 3] += s[4 * j + 2] + s[4 * j + 3];
            }
            l[0] += (ls[0][0] + ls[0][1]) + (ls[0][2] + ls[0][3]);
            l[1] += (ls[1][0] + ls[1][1]) + (ls[1][2] + ls[1][3]);
        };
        /* O rescaled by softmax_a's corr, P as bf16 A fragments for P V. Past a row's first
         * tiles its maximum seldom moves: corr is then exactly 1 for the warp's 16 query
         * vectors and the 64 multiplies are skipped (the same bits) */
        auto softmax_b = [&]() {
            if (__any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) {
#pragma unroll
                for (int i = 0; i < DT; i++) {
                    o[4 * i] *= corr[0];
                    o[4 * i + 1] *= corr[0];
                    o[4 * i + 2] *= corr[1];
                    o[4 * i + 3] *= corr[1];
                }
            }
#pragma unroll
            for (int j = 0; j < NT; j++) {
                pf[j >> 1][(j & 1) * 2 + 0] = pack_bf16(s[4 * j], s[4 * j + 1]);
                pf[j >> 1][(j & 1) * 2 + 1] = pack_bf16(s[4 * j + 2], s[4 * j + 3]);
            }
        };
        auto pv = [&](int32_t kt) {
            wg_fence();
            issue_pv(kt);
            wg_wait0();
        };
        auto wait_full = [&](int st) {
            mb_wait(&full_bar[st], (full_par >> st) & 1); /* everyone's part has landed */
            full_par ^= 1u << st;
            fence_proxy_async(); /* ... visible to wgmma */
        };

        for (int32_t kt = kt0; kt < kt1; kt++) {
            const int st = (kt - kt0) % S;
            if (MB) {
                wait_full(st);
            } else {
                cp_async_wait<LA - 1>(); /* tile kt has landed (this thread's part) */
                fence_proxy_async();     /* ... visible to wgmma */
                __syncthreads();         /* ... everyone's; and the stage loaded next is free */
            }
            /* MB: S of this tile goes to the tensor cores first, then the next tile's loads
             * are issued while it runs */
            if (MB) {
                wg_fence();
                issue_s(kt);
            }
            if (TMA != 2 && kt + LA < kt1 && (!TMA || warp == 0)) { /* TMA 1: warp 0 loads */
                const int sn = (kt + LA - kt0) % S;
                if (MB && kt + LA - S >= kt0) { /* its previous tile is read by every warp */
                    mb_wait(&empty_bar[sn], (empty_par >> sn) & 1);
                    empty_par ^= 1u << sn;
                }
                load_tile(kt + LA, sn);
            }
            cp_async_commit();
            if (MB) {
                wg_wait0();
            } else {
                scores(kt);
            }
            softmax_a(kt);
            softmax_b();
            pv(kt);
            if (MB) { /* this warp is done reading the stage */
                __syncwarp();
                if (lane == 0) {
                    mb_arrive(&empty_bar[st]);
                }
            }
        }
        cp_async_wait<0>();
        /* row sums across the quad */
#pragma unroll
        for (int h = 0; h < 2; h++) {
            l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
            l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        }
        fa_write_rows<DT>(a, t0, start, end, kvh, split, qb, lane,
                          [&](int i, int k) { return o[4 * i + k]; }, m, l);
        start = end;
    }
#endif
}

fa_fn kvs_cuda_wg_kernel(int tc, bool mb, int tma, size_t *smem, int *threads)
{
    *smem = wg_smem(tc, mb);
    *threads = wg_threads(0);
    if (mb && tma != 0 && tc == 128) {
        *threads = wg_threads(tma);
        return tma == 2 ? attn_wg_kernel<128, true, 2> : attn_wg_kernel<128, true, 1>;
    }
    if (mb) {
        return tc == 128  ? attn_wg_kernel<128, true, 0>
               : tc == 64 ? attn_wg_kernel<64, true, 0>
                          : NULL;
    }
    return tc == 128  ? attn_wg_kernel<128, false, 0>
           : tc == 64 ? attn_wg_kernel<64, false, 0>
                      : NULL;
}
