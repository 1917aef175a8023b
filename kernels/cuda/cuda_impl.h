/* Internals shared by the CUDA backend's files (C++ / CUDA only): the context, the check
 * macros and each op family's entry points. One .cu per op family:
 *   backend.cu    the ops table, memory, sync, scratch, lifecycle, bench ceilings
 *   weights.cu    weight_load (device dequantization to bf16), random weights, get_rows
 *   gemm.cu       matmul: GEMV kernel for a few rows, cuBLAS for more
 *   norm_rope.cu  rmsnorm, rope, swiglu, add, gather
 *   kv.cu         KV storage: new, destroy, copy_block, store
 *   attention.cu  paged attention (tensor cores, split over the context) and its combine
 *   fuse.cu       ops held back and fused (q/k/v GEMVs, gate/up GEMVs + swiglu, add +
 *                 rmsnorm) and CUDA graphs of whole forwards (probe, capture, replay)
 */
#ifndef KVS_CUDA_IMPL_H
#define KVS_CUDA_IMPL_H

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <string.h>

#include "kernels/cuda/cuda.h"

extern "C" {
#include "common/log.h"
#include "common/status.h"
#include "kernels/dtype.h"
}

/* Check a CUDA runtime call: log the call and the runtime's message once, return KVS_DEVICE. */
#define CU_TRY(call)                                                                       \
    do {                                                                                   \
        cudaError_t cu_e_ = (call);                                                        \
        if (cu_e_ != cudaSuccess) {                                                        \
            KVS_ERROR("cuda: %s: %s (%s:%d)", #call, cudaGetErrorString(cu_e_), __FILE__,  \
                      __LINE__);                                                           \
            return KVS_DEVICE;                                                             \
        }                                                                                  \
    } while (0)

/* After every kernel launch. */
#define CU_LAUNCHED() CU_TRY(cudaGetLastError())

#define CUBLAS_TRY(call)                                                                   \
    do {                                                                                   \
        cublasStatus_t cb_s_ = (call);                                                     \
        if (cb_s_ != CUBLAS_STATUS_SUCCESS) {                                              \
            KVS_ERROR("cuda: %s: cuBLAS status %d (%s:%d)", #call, (int)cb_s_, __FILE__,   \
                      __LINE__);                                                           \
            return KVS_DEVICE;                                                             \
        }                                                                                  \
    } while (0)

/* A grow-only device buffer: steady state never allocates. */
struct kvs_cuda_buf {
    void *p;      /* device memory */
    size_t bytes; /* allocated */
};

/* A grow-only device buffer that mirrors a small host array, re-uploaded only when the host
 * contents change (positions and ids repeat across the layers of one forward). */
struct kvs_cuda_mirror {
    struct kvs_cuda_buf dev; /* device copy */
    void *host;              /* host copy of what dev holds */
    size_t bytes;            /* valid bytes in both */
    size_t host_cap;         /* allocated bytes of host */
};

/* Parts of the fusion and early-launch switches (KVS_CUDA_FUSE, KVS_CUDA_PDL). */
#define KVS_CUDA_PART_GEMV 1  /* GEMV matmuls */
#define KVS_CUDA_PART_OTHER 2 /* the add (fusion); norm, rope, kv_store, attention (PDL) */
#define KVS_CUDA_PART_ROPE 4  /* rope q, rope k and kv_store as one kernel (fusion) */
#define KVS_CUDA_PART_GEMM 8  /* the GEMM path's bf16 activations (gemm.cu; fusion only) */
#define KVS_CUDA_FUSE_DEFAULT                                                                  \
    (KVS_CUDA_PART_GEMV | KVS_CUDA_PART_ROPE | KVS_CUDA_PART_GEMM) /* fuse.cu: not the add */

/* One matmul of the GEMV path, held back so that the next op can join it (fuse.cu). */
struct kvs_cuda_mm {
    const __nv_bfloat16 *W; /* (n_out, n_in) bf16 */
    const float *bias;      /* (n_out) or NULL */
    float *y;               /* (n_rows, n_out) */
    int64_t n_out;
};

#define KVS_CUDA_MAX_PEND_MM 3 /* q, k, v share their x */
#define KVS_CUDA_MAX_GRAPHS 16 /* instantiated forward graphs kept (least recently used out) */
#define KVS_CUDA_STAGE_BYTES ((size_t)1 << 20) /* pinned stage of one forward's host arrays */

/* Graph modes of one forward (kvs_cuda_graph_begin / _end, fuse.cu). */
enum kvs_cuda_gmode {
    KVS_CUDA_G_OFF = 0, /* ops launch as they come */
    KVS_CUDA_G_PROBE,   /* ops hash their launches and stage host arrays, launch nothing */
    KVS_CUDA_G_CAPTURE, /* ops launch into a stream capture (and hash, to check the probe) */
};

/* Slots of host arrays staged per forward (the same array is staged once per forward). */
enum { KVS_CUDA_STAGE_IDS, KVS_CUDA_STAGE_POS, KVS_CUDA_STAGE_FREQ, KVS_CUDA_STAGE_IDX,
       KVS_CUDA_N_STAGE };

struct kvs_cuda_graph {
    uint64_t key;          /* hash of the launches it holds */
    cudaGraphExec_t exec;  /* NULL = free entry */
    uint64_t last_use;     /* graph_clock at its last launch */
};

/* The key of the angle table rope_store reads (norm_rope.cu): the pass it was made in, the
 * rows' positions (host copy) and the rope parameters. */
struct kvs_cuda_rope_tab {
    uint64_t gen;      /* c->fwd_gen when made; 0 = none */
    uint64_t ff_gen;   /* c->rope_ff_gen when made */
    int32_t *pos;      /* host copy of the positions */
    size_t pos_cap;    /* bytes allocated at pos */
    int32_t n_rows, half;
    const void *d_pos, *d_ff;
    uint64_t theta_scale, freq_scale; /* bits */
};

struct kvs_cuda {
    int dev;                       /* device index */
    cudaStream_t stream;           /* every op runs on it */
    cublasHandle_t cublas;         /* bound to stream */
    int n_sm;                      /* multiprocessors */
    int cc;                        /* compute capability, major * 10 + minor */
    size_t smem_optin;             /* max dynamic shared memory per block */
    size_t attn_smem_set;          /* dynamic shared memory the attention kernel may use */
    const void *fa_set[32];        /* flash-attention kernels whose smem limit was raised */
    int fa_per_sm[32];             /* ... and their resident blocks per SM */
    int n_fa_set;
    int *d_flag;                   /* device: bad-index flag raised by kernels (see cuda.h) */
    struct kvs_cuda_buf xb;        /* bf16 copy of a matmul's x ... */
    const float *xb_src;           /* ... of this f32 activation (NULL: none), valid until an
                                    * op writes device memory (kvs_cuda_xb_drop) */
    int64_t xb_n;                  /* ... elements */
    struct kvs_cuda_buf partial;   /* attention split partials */
    struct kvs_cuda_buf blockbuf;  /* one KV block in the canonical layout (read/write) */
    struct kvs_cuda_mirror pos;    /* rope positions */
    struct kvs_cuda_mirror freq;   /* rope per-frequency divisors (f32) */
    struct kvs_cuda_mirror ids;    /* get_rows ids */
    struct kvs_cuda_mirror idx;    /* gather indices */
    void *cublas_ws;               /* cuBLAS workspace (set explicitly: graph capture) */
    float rope_ff[512];            /* the last rope call's frequency divisors ... */
    struct kvs_rope rope_key;      /* ... for these parameters */
    int rope_valid;
    uint64_t rope_ff_gen;          /* rope_ff rewritten (counter) */
    struct kvs_cuda_rope_tab rtab; /* what rope_tab holds (norm_rope.cu, rope_table) */
    struct kvs_cuda_buf rope_tab;  /* (cos, sin) per (row, frequency) for rope_store */
    uint64_t fwd_gen;              /* forward passes begun (graph_begin, graph_end) */
    int32_t n_seqs_hint;           /* distinct sequences of this forward's batch, 0 = unknown */
    int32_t max_ctx_hint;          /* longest row context of this forward, 0 = unknown */
    /* variant switches, read at creation and at each kvs_cuda_graph_begin (a getenv per op
     * call cost a decode step ~200 environment scans): KVS_CUDA_ATTN=old, KVS_CUDA_FA_WARPS
     * (4 or 8, else 0), KVS_CUDA_SPLIT_TILES (>= 1, default 1), KVS_CUDA_GEMV=rpw2,
     * KVS_CUDA_WGMMA (0, 64 or 128 (default)) */
    bool env_attn_old;
    int env_fa_warps;
    int env_split_tiles;
    int env_wgmma;                 /* KVS_CUDA_WGMMA: 0 off, else KV tile cells (64, 128) */
    bool env_wg_mb;                /* KVS_CUDA_WG_MB (default 1): stages handed over by
                                    * mbarriers in the wgmma kernel; 0: a block barrier a tile */
    int env_wg_tma;                /* KVS_CUDA_WG_TMA (default 2): the wgmma kernel's K/V
                                    * tiles by TMA from a producer warp (1: from warp 0,
                                    * 0: cp.async by every thread) */
    bool env_fa_heavy_first;       /* KVS_CUDA_FA_ORDER (default 1): flash blocks last row
                                    * tile first (attention_impl.h, fa_block_unit) */
    bool env_gemv_rpw2;
    /* fusion (fuse.cu): ops held back until the next op says whether it can join them */
    int fuse;                                      /* KVS_CUDA_PART_* held and fused */
    int pdl;                                       /* KVS_CUDA_PART_* launched early (PDL) */
    int n_pend_mm;                                 /* GEMV matmuls held, same x and rows */
    struct kvs_cuda_mm pend_mm[KVS_CUDA_MAX_PEND_MM];
    const float *pend_x;                           /* their x (n_rows, n_in) */
    int32_t pend_rows;
    float *pend_res;                               /* residual the held GEMV adds into */
    int64_t pend_n_in;
    float *pend_add_x;                             /* an add held back (x += y, n), or NULL */
    const float *pend_add_y;
    int64_t pend_add_n;
    /* CUDA graphs of whole forwards (fuse.cu) */
    int gmode;                                     /* enum kvs_cuda_gmode */
    int gbad;                                      /* this probe / capture cannot be used */
    uint64_t ghash;                                /* hash of this forward's launches so far */
    uint64_t gkey;                                 /* the probe's hash, while capturing */
    uint64_t gmiss;                                /* hash of the last forward run eagerly */
    uint64_t graph_clock;                          /* forwards launched as graphs */
    struct kvs_cuda_graph graphs[KVS_CUDA_MAX_GRAPHS];
    unsigned char *stage;                          /* pinned host, KVS_CUDA_STAGE_BYTES */
    struct kvs_cuda_buf dstage;                    /* its device twin */
    size_t stage_off;                              /* bytes of stage used by this forward */
    size_t stage_at[KVS_CUDA_N_STAGE];             /* offset of each slot's last array ... */
    size_t stage_len[KVS_CUDA_N_STAGE];            /* ... and its bytes (0 = none yet) */
    cudaEvent_t stage_ev;                          /* the stage's last upload is done */
    uint64_t n_graph_launch, n_graph_capture;      /* counters for the benchmark */
};

static inline struct kvs_cuda *kvs_cuda_ctx(kvs_backend *b)
{
    return (struct kvs_cuda *)b->ctx;
}

/* backend.cu */
int kvs_cuda_buf_reserve(struct kvs_cuda_buf *buf, size_t bytes);
void kvs_cuda_buf_free(struct kvs_cuda_buf *buf);
/* Make m's device copy hold host[0..bytes); uploads on c's stream only when it changed. */
int kvs_cuda_mirror_set(struct kvs_cuda *c, struct kvs_cuda_mirror *m, const void *host,
                        size_t bytes);
void kvs_cuda_mirror_free(struct kvs_cuda_mirror *m);

/* fuse.cu: held-back ops, graph modes, staged host arrays */
int kvs_cuda_env_parts(const char *name, int def);
/* Read the variant switches into c (env_*). */
void kvs_cuda_read_env(struct kvs_cuda *c);
/* Launch what is held back (in the current graph mode). Every op that is not a GEMV matmul,
 * an add or an rmsnorm calls it first, as do upload, download, sync and free. */
int kvs_cuda_flush(struct kvs_cuda *c);
/* Each launch site calls this with its kernel's arguments before launching: hashes them in
 * the graph modes; false when probing (the site must not launch). */
bool kvs_cuda_launch_ok(struct kvs_cuda *c, uint32_t site, const uint64_t *args, int n);
/* A device copy of host[0..bytes) for a kernel of this op: c's mirror m outside the graph
 * modes, the pinned stage (one upload before the graph runs) inside them. */
int kvs_cuda_host_array(struct kvs_cuda *c, struct kvs_cuda_mirror *m, int slot,
                        const void *host, size_t bytes, const void **dev);
void kvs_cuda_graphs_free(struct kvs_cuda *c);
/* gemm.cu: launch the held-back GEMV matmuls as one kernel (fused with swiglu when
 * swiglu_out != NULL: the two held matmuls are gate and up). */
int kvs_cuda_gemv_flush(struct kvs_cuda *c, float *swiglu_out);
/* gemm.cu: swiglu right after the gate and up GEMVs, fused with them: 1 = done, 0 = not
 * applicable (the caller runs it), or a negative status. */
int kvs_cuda_swiglu_fused(struct kvs_cuda *c, const float *gate, const float *up, int64_t n,
                          float *out);
/* gemm.cu: x += y fused into the one held GEMV that writes y: 1 = done, 0 = not applicable,
 * or a negative status. */
int kvs_cuda_add_into_gemv(struct kvs_cuda *c, float *x, const float *y, int64_t n);
/* norm_rope.cu: launch the held-back add (fused with the rmsnorm when rms_w != NULL). */
int kvs_cuda_add_flush(struct kvs_cuda *c, const float *rms_w, int32_t n_rows, int32_t dim,
                       float eps, float *out);

/* The bf16 copy in c->xb of the f32 activation x (n elements) when it holds one: rmsnorm
 * writes it beside its f32 output for a GEMM-path matmul to take, and a matmul that converts
 * its x leaves it for the next matmul of the same x (q, k, v). Every op that writes device
 * memory drops it first (except a matmul whose y does not overlap x), as do alloc, free,
 * upload and a forward's start, so it never stands for stale f32 data. */
static inline const __nv_bfloat16 *kvs_cuda_xb_of(const struct kvs_cuda *c, const float *x,
                                                  int64_t n)
{
    return c->xb_src == x && c->xb_n == n ? (const __nv_bfloat16 *)c->xb.p : NULL;
}
static inline void kvs_cuda_xb_drop(struct kvs_cuda *c)
{
    c->xb_src = NULL;
}

/* weights.cu */
int kvs_cuda_weight_load(kvs_backend *b, struct kvs_weight *w, const void *host_data);
void kvs_cuda_weight_free(kvs_backend *b, struct kvs_weight *w);
int kvs_cuda_get_rows(kvs_backend *b, const struct kvs_weight *table, const int32_t *host_ids,
                      int32_t n, float *out);

/* gemm.cu */
int kvs_cuda_matmul(kvs_backend *b, const struct kvs_weight *w, const float *x, int32_t n_rows,
                    const float *bias, float *y);
int kvs_cuda_matmul_add(kvs_backend *b, const struct kvs_weight *w, const float *x,
                        int32_t n_rows, float *tmp, float *y);
int kvs_cuda_ffn(kvs_backend *b, const struct kvs_weight *w_gate, const struct kvs_weight *w_up,
                 const struct kvs_weight *w_down, const float *h, int32_t n_rows, float *gate,
                 float *up, float *tmp, float *x);

/* norm_rope.cu */
int kvs_cuda_rmsnorm(kvs_backend *b, const float *x, const float *w, int32_t n_rows,
                     int32_t dim, float eps, float *out);
int kvs_cuda_rope(kvs_backend *b, float *x, int32_t n_rows, int32_t n_heads, int32_t head_dim,
                  const int32_t *host_pos, const struct kvs_rope *rope);
int kvs_cuda_swiglu(kvs_backend *b, const float *gate, const float *up, int64_t n, float *out);
int kvs_cuda_add(kvs_backend *b, float *x, const float *y, int64_t n);
int kvs_cuda_gather(kvs_backend *b, const float *x, const int32_t *host_idx, int32_t n,
                    int32_t dim, float *out);

/* kv.cu */
struct kvs_kv_cache {
    struct kvs_kv_layout layout;
    size_t head_stride;  /* elements of one KV head's cells in one block: block_size * head_dim */
    size_t block_stride; /* elements of one block of one layer: n_kv_head * head_stride */
    size_t layer_stride; /* elements of one layer: n_block * block_stride */
    __nv_bfloat16 *k, *v; /* (n_layer, n_block, n_kv_head, block_size, head_dim) each */
    void *tmap;           /* device: two TMA tensor maps (K, V) over the 16-cell rows of all
                           * layers, 64-dim x 16-cell boxes with the 128-byte swizzle, for the
                           * wgmma attention; NULL where the shape or the GPU has none */
};
int kvs_cuda_kv_new(kvs_backend *b, const struct kvs_kv_layout *layout, kvs_kv_cache **out);
void kvs_cuda_kv_destroy(kvs_backend *b, kvs_kv_cache **kv);
int kvs_cuda_kv_copy_block(kvs_backend *b, kvs_kv_cache *kv, int32_t src, int32_t dst);
int kvs_cuda_kv_read_block(kvs_backend *b, kvs_kv_cache *kv, int32_t block, void *host_buf);
int kvs_cuda_kv_write_block(kvs_backend *b, kvs_kv_cache *kv, int32_t block,
                            const void *host_buf);
int kvs_cuda_kv_store(kvs_backend *b, kvs_kv_cache *kv, int32_t layer, const float *k,
                      const float *v, const struct kvs_attn_batch *ab);
/* norm_rope.cu: rope q and k, store k and v (backend.h, rope_store) */
int kvs_cuda_rope_store(kvs_backend *b, kvs_kv_cache *kv, int32_t layer, float *q,
                        int32_t n_head, float *k, const float *v, int32_t n_kv_head,
                        int32_t head_dim, const int32_t *host_pos, const struct kvs_rope *rope,
                        const struct kvs_attn_batch *ab);

/* attention.cu */
int kvs_cuda_attention(kvs_backend *b, kvs_kv_cache *kv, int32_t layer, const float *q,
                       int32_t n_head, float scale, const struct kvs_attn_batch *ab, float *out);

/* Programmatic dependent launch (sm_90): a kernel launched with the PDL attribute may start
 * while the one before it finishes; it must call kvs_pdl_wait() before reading anything that
 * kernel writes, and before writing anything. kvs_pdl_trigger() lets the next kernel start
 * (once every block of this one has called it or exited). Both are no-ops otherwise. */
static __device__ __forceinline__ void kvs_pdl_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/* Where to trigger: a GEMV triggers at its start (the small kernel after it may launch and
 * wait), every other kernel only after its kvs_pdl_wait(). A kernel that triggers before its
 * own wait lets the kernel after it launch too, and that one the next: a chain of kernels
 * launched early whose waiting blocks took the multiprocessors from the GEMV still running
 * (a decode step at 1K went from 5.0 to 6.2 ms once no plain launch broke the chain). */
static __device__ __forceinline__ void kvs_pdl_trigger()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* Launch kernel on c's stream, as a programmatic dependent launch when c->pdl has part: only
 * for kernels that call kvs_pdl_wait() before touching global memory. */
template <typename K, typename... Args>
static inline cudaError_t kvs_cuda_launch(struct kvs_cuda *c, int part, K kernel, dim3 grid,
                                          dim3 block, size_t smem, Args... args)
{
    cudaLaunchConfig_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = c->stream;
    cudaLaunchAttribute at[1];
    memset(at, 0, sizeof at);
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = (c->pdl & part) != 0 ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, args...);
}

/* The bits of a float, for hashing launch arguments on the host. */
static inline uint64_t kvs_cuda_fbits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* Blocks for n elements at threads per block, capped for grid-stride loops. */
static inline unsigned kvs_cuda_blocks(int64_t n, int threads)
{
    int64_t g = (n + threads - 1) / threads;
    return (unsigned)(g < 1 ? 1 : (g > 65535 * 16 ? 65535 * 16 : g));
}

#endif
