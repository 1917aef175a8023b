/* The compute backend interface: the one door the forward pass goes through.
 *
 * A backend is a table of function pointers (struct kvs_backend_ops) plus a context. The
 * CPU backend (kernels/cpu/) is the reference and runs everywhere; the CUDA backend
 * (kernels/cuda/) implements the same table. Every pointer passed to an op lives in the
 * backend's memory (host memory for the CPU, device memory for CUDA) unless the comment
 * says "host". Activations are f32, row-major, rows contiguous.
 *
 * Ops are issued in order on the backend's stream; an op may return before its work is
 * done (CUDA). kvs_backend_sync() waits for all of it. Ops return 0 or a negative
 * kvs_status (KVS_DEVICE for a runtime failure, KVS_INVALID_ARGUMENT for a bad shape);
 * argument bugs are asserted.
 *
 * BATCH INVARIANCE (CPU backend, and the reason kvstream can test everything exactly): each
 * output element is computed with a reduction order that depends only on that element's
 * own inputs, never on how many rows share the call, where a row sits in the batch, how
 * many threads run, or how a sequence was chunked or forked. In particular matmul walks K
 * in a fixed order per output element, and attention walks a row's context cells in
 * position order, block by block, with a fixed online-softmax update; a long row's context
 * is cut into fixed segments (1024 cells on the CPU, a function of the row's own length
 * only) whose partial results are merged in position order.
 *
 * Thread-safety: one thread drives a backend (the worker's scheduler thread); the backend
 * may use its own threads internally.
 */
#ifndef KVS_BACKEND_H
#define KVS_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct kvs_backend kvs_backend;
typedef struct kvs_kv_cache kvs_kv_cache; /* backend-owned KV storage, opaque */

/* A 2-D weight matrix W of shape (n_out, n_in): row o holds the n_in inputs of output o,
 * stored in `type` blocks (enum kvs_dtype), as in GGUF (ne[0] = n_in, ne[1] = n_out). */
struct kvs_weight {
    uint32_t type;    /* enum kvs_dtype */
    int64_t n_in;     /* columns, the reduction dimension (ne[0]) */
    int64_t n_out;    /* rows (ne[1]) */
    size_t row_bytes; /* bytes of one row in `type` */
    void *data;       /* backend memory in the backend's own form, owned by the backend after
                       * weight_load (the CPU backend regroups quantized rows: only ops may
                       * read it) */
    void *extra;      /* backend-private form (repacked, converted); NULL if none */
};

enum kvs_rope_style {
    KVS_ROPE_NORM = 0, /* rotate pairs (2i, 2i+1): llama */
    KVS_ROPE_NEOX = 1, /* rotate pairs (i, i + n_dims/2): qwen2 */
};

struct kvs_rope {
    int32_t n_dims;             /* rotated dims per head (<= head_dim, even) */
    int32_t style;              /* enum kvs_rope_style */
    float freq_base;            /* theta base, e.g. 10000 or 500000 */
    float freq_scale;           /* linear scaling: position * freq_scale (1 = none) */
    const float *freq_factors;  /* host, n_dims/2 divisors of each frequency (llama3), or NULL */
};

/* Shape of the KV pool's storage: n_block blocks of block_size cells, per layer. */
struct kvs_kv_layout {
    int32_t n_layer;    /* layers */
    int32_t n_block;    /* blocks in the pool */
    int32_t block_size; /* cells per block */
    int32_t n_kv_head;  /* KV heads */
    int32_t head_dim;   /* dims per head */
    uint32_t dtype;     /* enum kvs_dtype of stored K and V: F32, F16 (CPU) or BF16 (CUDA) */
};

/* Where each row of a batch reads and writes KV. All arrays in backend memory (upload them
 * with kvs_backend_upload once per batch). Row r is a token of some sequence at logical
 * position p: it writes its K/V into cell row_slot[r], and attends to cells 0..row_ctx[r]-1
 * of its sequence (row_ctx[r] = p + 1 for causal attention), whose blocks are
 * tables[row_table[r] + c / block_size] for cell c. Rows of one sequence in one batch share
 * a table. Stores happen before attention within a layer, so a row sees the rows before it
 * in the same batch exactly as if they had been computed earlier. */
struct kvs_attn_batch {
    int32_t n_rows;
    const int32_t *row_slot;  /* (n_rows) block * block_size + offset of the row's own cell */
    const int32_t *row_ctx;   /* (n_rows) cells the row attends to, its own included */
    const int32_t *row_table; /* (n_rows) index into tables of the row's block table */
    const int32_t *tables;    /* concatenated block tables */
};

struct kvs_backend_ops {
    const char *name; /* "cpu", "cuda" */

    /* ---- memory ---- */
    void *(*alloc)(kvs_backend *b, size_t bytes); /* NULL on failure; 64-byte aligned */
    void (*free)(kvs_backend *b, void *ptr);      /* accepts NULL */
    int (*upload)(kvs_backend *b, void *dst, const void *host_src, size_t bytes);
    int (*download)(kvs_backend *b, void *host_dst, const void *src, size_t bytes);
    int (*sync)(kvs_backend *b);

    /* Take a weight from host memory (the mapped GGUF tensor, rows of w->type) into the
     * backend's preferred form; fills w->data / w->extra. The host data may be unmapped
     * after the call (the backend copies what it keeps). */
    int (*weight_load)(kvs_backend *b, struct kvs_weight *w, const void *host_data);
    void (*weight_free)(kvs_backend *b, struct kvs_weight *w);

    /* ---- KV storage ---- */
    int (*kv_new)(kvs_backend *b, const struct kvs_kv_layout *layout, kvs_kv_cache **out);
    void (*kv_destroy)(kvs_backend *b, kvs_kv_cache **kv);
    /* Copy all layers' cells of block src into block dst (copy-on-write of a tail). */
    int (*kv_copy_block)(kvs_backend *b, kvs_kv_cache *kv, int32_t src, int32_t dst);
    /* Optional (NULL = unsupported: snapshots, migration and SLIDE are then refused).
     * Read / write one block in the canonical layout, whatever the backend keeps inside:
     * for each layer l: K[cell][kv_head][head_dim] then V[cell][kv_head][head_dim], in the
     * layout's dtype; kvs_kv_block_bytes() bytes in all. host_buf is host memory. */
    int (*kv_read_block)(kvs_backend *b, kvs_kv_cache *kv, int32_t block, void *host_buf);
    int (*kv_write_block)(kvs_backend *b, kvs_kv_cache *kv, int32_t block,
                          const void *host_buf);

    /* ---- compute ---- */
    /* out[i] = dequantized row ids[i] of table (embedding gather); ids in host memory. */
    int (*get_rows)(kvs_backend *b, const struct kvs_weight *table, const int32_t *host_ids,
                    int32_t n, float *out);
    /* y = x W^T (+ bias): x (n_rows, n_in), y (n_rows, n_out), bias (n_out) or NULL. */
    int (*matmul)(kvs_backend *b, const struct kvs_weight *w, const float *x, int32_t n_rows,
                  const float *bias, float *y);
    /* out = x / sqrt(mean(x^2) + eps) * w, per row of dim. out may equal x. */
    int (*rmsnorm)(kvs_backend *b, const float *x, const float *w, int32_t n_rows, int32_t dim,
                   float eps, float *out);
    /* Rotate x (n_rows, n_heads, head_dim) in place at positions pos (host, n_rows). */
    int (*rope)(kvs_backend *b, float *x, int32_t n_rows, int32_t n_heads, int32_t head_dim,
                const int32_t *host_pos, const struct kvs_rope *rope);
    /* out = silu(gate) * up, n elements. out may equal gate. */
    int (*swiglu)(kvs_backend *b, const float *gate, const float *up, int64_t n, float *out);
    /* x += y, n elements. */
    int (*add)(kvs_backend *b, float *x, const float *y, int64_t n);
    /* out (n, dim) = rows idx (host, n) of x (., dim). */
    int (*gather)(kvs_backend *b, const float *x, const int32_t *host_idx, int32_t n,
                  int32_t dim, float *out);
    /* Write k, v (n_rows, n_kv_head, head_dim) of layer into cells ab->row_slot. */
    int (*kv_store)(kvs_backend *b, kvs_kv_cache *kv, int32_t layer, const float *k,
                    const float *v, const struct kvs_attn_batch *ab);
    /* out (n_rows, n_head, head_dim) = softmax(q k^T * scale) v over each row's context
     * cells; q (n_rows, n_head, head_dim); GQA: head h reads KV head h / (n_head/n_kv_head). */
    int (*attention)(kvs_backend *b, kvs_kv_cache *kv, int32_t layer, const float *q,
                     int32_t n_head, float scale, const struct kvs_attn_batch *ab, float *out);

    /* ---- lifecycle ---- */
    /* Free the backend's context and b itself (kvs_backend_destroy calls it). Weights and
     * KV caches must have been freed before. */
    void (*destroy)(kvs_backend *b);

    /* ---- optional fused ops (NULL: the caller runs the ops they stand for) ---- */
    /* rope(q, n_head), rope(k, n_kv_head) at host_pos, then kv_store(k, v): the same bits as
     * those three calls, in one pass (a decode step runs it once per layer). */
    int (*rope_store)(kvs_backend *b, kvs_kv_cache *kv, int32_t layer, float *q, int32_t n_head,
                      float *k, const float *v, int32_t n_kv_head, int32_t head_dim,
                      const int32_t *host_pos, const struct kvs_rope *rope,
                      const struct kvs_attn_batch *ab);
    /* y += x W^T (no bias): matmul into tmp (n_rows, n_out), then add(y, tmp). tmp is scratch
     * the backend may leave undefined; x and y do not overlap tmp or each other. A backend
     * may keep the product's intermediate in its own precision (CUDA, many rows: accumulated
     * straight into y by the GEMM). */
    int (*matmul_add)(kvs_backend *b, const struct kvs_weight *w, const float *x,
                      int32_t n_rows, float *tmp, float *y);
    /* The SwiGLU feed-forward block's matmuls: x += (silu(h Wg^T) * (h Wu^T)) Wd^T, as
     * matmul(w_gate, h -> gate), matmul(w_up, h -> up), swiglu(gate, up -> gate),
     * matmul(w_down, gate -> tmp), add(x, tmp). gate, up (n_rows, n_ff) and tmp (n_rows,
     * n_embd) are scratch the backend may leave undefined; none overlaps h or x. CUDA keeps
     * gate and up in bf16 past the GEMV path (many rows). */
    int (*ffn)(kvs_backend *b, const struct kvs_weight *w_gate, const struct kvs_weight *w_up,
               const struct kvs_weight *w_down, const float *h, int32_t n_rows, float *gate,
               float *up, float *tmp, float *x);
};

struct kvs_backend {
    const struct kvs_backend_ops *ops;
    void *ctx;         /* the implementation's state */
    int32_t n_threads; /* CPU: worker threads; other backends: 1 */
};

/* Bytes of one block in the canonical layout of kv_read_block / kv_write_block. */
static inline size_t kvs_kv_block_bytes(const struct kvs_kv_layout *l)
{
    size_t elem = l->dtype == 0 /* KVS_DTYPE_F32 */ ? 4 : 2;
    return 2 * (size_t)l->n_layer * (size_t)l->block_size * (size_t)l->n_kv_head *
           (size_t)l->head_dim * elem;
}

/* Create the CPU backend with n_threads (0 = number of online CPUs). Returns NULL on
 * failure. Caller frees with kvs_backend_destroy. */
kvs_backend *kvs_backend_cpu_new(int32_t n_threads);

/* The CPU backend's kernel level ("scalar", "avx2", "avx512"): the best the CPU supports,
 * lowered by the environment variable KVS_CPU_ISA=scalar|avx2|avx512 read at
 * kvs_backend_cpu_new. Results may differ between levels; within one level every op is
 * batch-invariant. b must be a CPU backend. */
const char *kvs_backend_cpu_isa(const kvs_backend *b);

/* Destroy any backend; accepts NULL and *b == NULL; sets *b to NULL. */
void kvs_backend_destroy(kvs_backend **b);

#endif
