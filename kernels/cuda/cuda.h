/* The CUDA backend and device discovery, usable from C. Built only when nvcc is found
 * (KVS_HAVE_CUDA).
 *
 * Any error from the CUDA runtime while counting devices (no driver, no GPU, a driver older
 * than the runtime) means "no GPU": callers fall back to the CPU, and GPU tests skip with a
 * message that carries the runtime's own reason.
 *
 * The backend (kvs_backend_cuda_new) implements kernels/backend.h on one device and one
 * stream. Its choices, where the contract leaves room:
 *   - weights: every matrix lives on the device as bf16 (n_out, n_in) row-major, whatever its
 *     file type (F32/F16/BF16/Q8_0/Q4_0/Q4_1 are dequantized on the device at load);
 *     w->type and w->row_bytes keep the file's values, w->data points at the bf16 matrix.
 *   - matmul: bf16 operands, fp32 accumulation; up to KVS_CUDA_GEMV_MAX_ROWS rows through a
 *     bandwidth-bound GEMV kernel reading x in f32, more through cuBLAS (x rounded to bf16).
 *   - KV: bf16 only (layout dtype must be KVS_DTYPE_BF16), laid out as the CPU's:
 *     (n_layer, n_block, n_kv_head, block_size, head_dim) for K and for V.
 *   - attention: a FlashAttention-2 kernel on tensor cores (mma.sync; bf16 Q, K, P, V; fp32
 *     scores and accumulators) for head dims that are multiples of 16 up to 128, split over
 *     the context (flash decoding) when the batch alone does not fill the GPU; a plain fp32
 *     kernel for other head dims. KVS_CUDA_ATTN=old selects the previous kernels (CUDA-core
 *     decode for at most KVS_CUDA_DECODE_MAX_ROWS rows, WMMA tiles) for comparison.
 *   - bad indices inside backend memory (row_slot, block tables) cannot be checked on the
 *     host without a round trip: kernels skip them and raise a device flag that the next
 *     sync() reports as KVS_OUT_OF_RANGE.
 * Not batch-invariant: cuBLAS picks kernels by shape, so a row's logits can differ in the
 * last bits with the batch it shares (parity is tested with tolerances instead).
 */
#ifndef KVS_CUDA_H
#define KVS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "kernels/backend.h"

#define KVS_CUDA_GEMV_MAX_ROWS 8   /* matmuls of at most this many rows skip cuBLAS */
#define KVS_CUDA_DECODE_MAX_ROWS 8 /* attention batches of at most this many rows: decode path */

/* Number of usable CUDA devices (>= 0). On any runtime error returns 0 and writes the
 * runtime's message into why (if whylen > 0). */
int kvs_cuda_device_count(char *why, size_t whylen);

/* Name and compute capability of device dev into buf ("NVIDIA H200 (sm_90)").
 * 0, or a negative kvs_status (KVS_NO_DEVICE) with the reason in buf. */
int kvs_cuda_device_name(int dev, char *buf, size_t len);

/* A self-check that the toolkit, driver and device work end to end: runs one kernel
 * (y = a*x + y over n elements) on dev and compares with the host result.
 * 0, KVS_NO_DEVICE or KVS_DEVICE (reason in why). */
int kvs_cuda_selfcheck(int dev, char *why, size_t whylen);

/* Create the CUDA backend on device dev (its own stream, cuBLAS handle and scratch).
 * Returns NULL with the reason in err (no device, bad index, runtime failure). Caller frees
 * with kvs_backend_destroy. One thread drives it. */
kvs_backend *kvs_backend_cuda_new(int dev, char *err, size_t errlen);

/* True when b is a CUDA backend. */
int kvs_backend_is_cuda(const kvs_backend *b);

/* Fill w (n_in, n_out set by the caller) with random bf16 weights generated on the device:
 * element i (row-major) = kvs_synth_value(seed, i, scale) (worker/model.c has the same
 * function on the host, so a synthetic model is identical on every backend). Sets w->type to
 * BF16, row_bytes, data. 0, KVS_NO_MEMORY or KVS_DEVICE. Free with ops->weight_free. */
int kvs_cuda_weight_random(kvs_backend *b, struct kvs_weight *w, uint64_t seed, float scale);

/* Device memory in bytes: free and total (cudaMemGetInfo). 0 or KVS_DEVICE. */
int kvs_cuda_mem_info(kvs_backend *b, size_t *free_bytes, size_t *total_bytes);

/* CUDA graphs of a forward's layers (kernels/cuda/fuse.cu says how). The forward calls
 *     kvs_cuda_graph_begin(b, n_seqs, n_rows, max_ctx);
 *     do { rc = <issue the layers' ops>; } while (kvs_cuda_graph_end(b, &rc) == 1);
 * graph_end returns 1 when the ops must be issued again (the backend then runs them eagerly
 * or captures them), 0 when they are issued (as a graph or eagerly) with the final status in
 * *rc. Between the two, ops must not be called with host arrays that change between passes,
 * nor upload, download or sync. Hints about the batch, 0 = unknown, hold until graph_end:
 * n_seqs (distinct sequences) picks the attention tiles: 128 query vectors per tile when the
 * batch has at least 64 query vectors per sequence on average (a question, a prefill chunk),
 * else 64 (rows of many sequences, which would leave most of a larger tile idle); max_ctx
 * (the longest row context) caps the attention's split count (attention.cu); n_rows ==
 * n_seqs (decode steps) launches only the GEMVs early, unless KVS_CUDA_PDL says otherwise.
 * KVS_CUDA_GRAPHS=0 makes begin record only the hints. 0 or KVS_DEVICE. */
int kvs_cuda_graph_begin(kvs_backend *b, int32_t n_seqs, int32_t n_rows, int32_t max_ctx);
int kvs_cuda_graph_end(kvs_backend *b, int *rc);
/* Forwards launched as graphs and graphs captured so far (benchmarks). */
void kvs_cuda_graph_counts(kvs_backend *b, uint64_t *launched, uint64_t *captured);

/* Ceilings for the benchmarks, measured on b's device and stream (medians of reps):
 * seconds of one cuBLAS bf16 GEMM (m, n, k) with fp32 accumulation and bf16 output, and of
 * one device-to-device copy of bytes. 0 or a negative status. */
int kvs_cuda_bench_gemm(kvs_backend *b, int m, int n, int k, int reps, double *seconds);
int kvs_cuda_bench_copy(kvs_backend *b, size_t bytes, int reps, double *seconds);

#ifdef __cplusplus
}
#endif

#endif
