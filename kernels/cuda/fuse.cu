/* Fewer launches per forward: ops held back and fused, and CUDA graphs of whole forwards.
 *
 * Fusion. A decode step is ~17 kernels per layer, most of them a few microseconds of work
 * each; between two kernels the GPU drains and refills. These patterns of the forward are
 * joined, by holding an op back until the next op shows whether it can join, or through the
 * optional fused op rope_store (kernels/backend.h):
 *   - GEMV matmuls (few rows) reading the same x (q, k, v): one launch over all of them;
 *   - two GEMV matmuls followed by swiglu(their outputs) (gate, up): one kernel reads both
 *     weight rows and writes silu(g) * u, g and u (each buffer ends as the contract says);
 *   - a GEMV matmul writing y followed by add(x, y) (the residual adds after the output
 *     and down projections): the GEMV adds each output to x as it writes it;
 *   - rope(q), rope(k), kv_store(k, v): one kernel (rope_store; part "rope");
 *   - many rows (GEMMs; part "gemm"): rmsnorm writes its output in bf16 too, for the GEMMs
 *     that read it; the output / down projections accumulate into x in the GEMM, and the
 *     feed-forward block keeps gate / up in bf16 (the optional ops matmul_add and ffn,
 *     gemm.cu). This part rounds gate and up to bf16, so its results are not the same bits
 *     as without it (the parity tests hold it to the same tolerances);
 *   - add(x, y) followed by rmsnorm(x): one kernel per row (off by default: faster alone, but
 *     slower inside a decode step at 1K: 6.29 vs 5.25 ms with every kernel launched early,
 *     5.47 vs 5.26 with only the GEMVs early; part "add").
 * Each output is computed in the same order as unfused, so the results are the same bits.
 * Any other op, upload, download, sync and free launch what is held first (kvs_cuda_flush),
 * so stream order is kept; errors of a held op surface at that point. KVS_CUDA_FUSE (parts,
 * kvs_cuda_env_parts): 0 none, unset = gemv+rope+gemm, all = every part.
 *
 * Graphs. The forward (worker/forward.c) brackets its layers with kvs_cuda_graph_begin /
 * _end and runs them up to three times:
 *   1. probe: every launch site hashes its kernel and arguments (kvs_cuda_launch_ok) and
 *      launches nothing; host arrays (token ids, positions, gather rows) are copied into a
 *      pinned stage at offsets that the same forward shape reproduces;
 *   2. a graph with that hash exists: upload the stage (one copy) and launch the graph; done.
 *      Otherwise the layers run again eagerly (first sight of the hash) or, when the previous
 *      forward had the same hash, under stream capture (checked against the probe's hash),
 *      and the instantiated graph is kept (KVS_CUDA_MAX_GRAPHS, least recently used out).
 * Kernels read everything per step from device memory (row slots, contexts, block tables),
 * so one graph serves every decode step of one batch shape at any context length.
 * KVS_CUDA_GRAPHS=0 turns graphs off. */
#include "kernels/cuda/cuda_impl.h"

#include <stdlib.h>
#include <string.h>

#define HASH_SEED 0x6a09e667f3bcc908ull

static uint64_t mix(uint64_t h, uint64_t v)
{
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    h *= 0xff51afd7ed558ccdull;
    return h ^ (h >> 33);
}

int kvs_cuda_flush(struct kvs_cuda *c)
{
    if (c->n_pend_mm > 0) {
        return kvs_cuda_gemv_flush(c, NULL);
    }
    if (c->pend_add_x != NULL) {
        return kvs_cuda_add_flush(c, NULL, 0, 0, 0.0f, NULL);
    }
    return 0;
}

bool kvs_cuda_launch_ok(struct kvs_cuda *c, uint32_t site, const uint64_t *args, int n)
{
    if (c->gmode == KVS_CUDA_G_OFF) {
        return true;
    }
    uint64_t h = mix(c->ghash, site);
    for (int i = 0; i < n; i++) {
        h = mix(h, args[i]);
    }
    c->ghash = h;
    return c->gmode != KVS_CUDA_G_PROBE;
}

int kvs_cuda_host_array(struct kvs_cuda *c, struct kvs_cuda_mirror *m, int slot,
                        const void *host, size_t bytes, const void **dev)
{
    if (c->gmode == KVS_CUDA_G_OFF) {
        KVS_TRY(kvs_cuda_mirror_set(c, m, host, bytes));
        *dev = m->dev.p;
        return 0;
    }
    size_t at = c->stage_at[slot];
    if (c->stage_len[slot] != bytes || memcmp(c->stage + at, host, bytes) != 0) {
        at = (c->stage_off + 15) & ~(size_t)15;
        if (at + bytes > KVS_CUDA_STAGE_BYTES) {
            c->gbad = 1; /* too large for the stage: this forward runs eagerly */
            *dev = c->dstage.p;
            return 0;
        }
        memcpy(c->stage + at, host, bytes);
        c->stage_off = at + bytes;
        c->stage_at[slot] = at;
        c->stage_len[slot] = bytes;
    }
    *dev = (const unsigned char *)c->dstage.p + at;
    return 0;
}

static void reset_forward(struct kvs_cuda *c, int mode)
{
    c->gmode = mode;
    c->gbad = 0;
    kvs_cuda_xb_drop(c); /* each pass starts from the same state */
    c->ghash = mix(HASH_SEED, (uint64_t)c->pdl); /* early launch is part of a graph's nodes */
    c->stage_off = 0;
    memset(c->stage_len, 0, sizeof c->stage_len);
}

static int env_off(const char *name)
{
    const char *e = getenv(name);
    return e != NULL && strcmp(e, "0") == 0;
}

/* KVS_CUDA_FUSE / KVS_CUDA_PDL: "0" none; parts joined by '+': "gemv" (KVS_CUDA_PART_GEMV),
 * "add" or "other" (KVS_CUDA_PART_OTHER), "rope" (KVS_CUDA_PART_ROPE), "gemm"
 * (KVS_CUDA_PART_GEMM), e.g. "gemv+rope";
 * "all" (or any other word) every part. Unset: def. */
int kvs_cuda_env_parts(const char *name, int def)
{
    const char *e = getenv(name);
    if (e == NULL) {
        return def;
    }
    if (strcmp(e, "0") == 0) {
        return 0;
    }
    int parts = 0;
    for (const char *p = e; *p != '\0';) {
        const char *q = strchr(p, '+');
        size_t n = q != NULL ? (size_t)(q - p) : strlen(p);
        if (n == 4 && strncmp(p, "gemv", 4) == 0) {
            parts |= KVS_CUDA_PART_GEMV;
        } else if ((n == 3 && strncmp(p, "add", 3) == 0) || (n == 5 && strncmp(p, "other", 5) == 0)) {
            parts |= KVS_CUDA_PART_OTHER;
        } else if (n == 4 && strncmp(p, "rope", 4) == 0) {
            parts |= KVS_CUDA_PART_ROPE;
        } else if (n == 4 && strncmp(p, "gemm", 4) == 0) {
            parts |= KVS_CUDA_PART_GEMM;
        } else {
            return KVS_CUDA_PART_GEMV | KVS_CUDA_PART_OTHER | KVS_CUDA_PART_ROPE |
                   KVS_CUDA_PART_GEMM;
        }
        p += n + (q != NULL);
    }
    return parts;
}

void kvs_cuda_read_env(struct kvs_cuda *c)
{
    const char *e = getenv("KVS_CUDA_ATTN");
    c->env_attn_old = e != NULL && strcmp(e, "old") == 0;
    e = getenv("KVS_CUDA_FA_WARPS");
    c->env_fa_warps = e != NULL && (strcmp(e, "4") == 0 || strcmp(e, "8") == 0) ? e[0] - '0' : 0;
    e = getenv("KVS_CUDA_SPLIT_TILES");
    c->env_split_tiles = e != NULL && atoi(e) > 0 ? atoi(e) : 1;
    e = getenv("KVS_CUDA_WGMMA");
    c->env_wgmma = e == NULL ? 128 : strcmp(e, "64") == 0 ? 64 : strcmp(e, "128") == 0 ? 128 : 0;
    e = getenv("KVS_CUDA_WG_MB");
    c->env_wg_mb = e == NULL || strcmp(e, "0") != 0; /* default on: 1853 -> 1783 ms */
    e = getenv("KVS_CUDA_WG_TMA");
    c->env_wg_tma = e == NULL ? 2 : strcmp(e, "0") == 0 ? 0 : strcmp(e, "1") == 0 ? 1 : 2;
    e = getenv("KVS_CUDA_FA_ORDER");
    c->env_fa_heavy_first = e == NULL || strcmp(e, "0") != 0;
    e = getenv("KVS_CUDA_GEMV");
    c->env_gemv_rpw2 = e != NULL && strcmp(e, "rpw2") == 0;
}

extern "C" int kvs_cuda_graph_begin(kvs_backend *b, int32_t n_seqs, int32_t n_rows,
                                    int32_t max_ctx)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    KVS_TRY(kvs_cuda_flush(c));
    kvs_cuda_xb_drop(c);
    c->fwd_gen++;
    c->n_seqs_hint = n_seqs > 0 ? n_seqs : 0;
    c->max_ctx_hint = max_ctx > 0 ? max_ctx : 0;
    kvs_cuda_read_env(c);
    c->fuse = kvs_cuda_env_parts("KVS_CUDA_FUSE", KVS_CUDA_FUSE_DEFAULT);
    /* early launch of every kernel helps the multi-row forwards (TTFT 32K 9.39 vs 9.69 ms
     * with GEMVs only) and costs a decode step ~0.1 ms (bench/NOTES.md): GEMVs only there */
    const bool decode = n_seqs > 0 && n_rows == n_seqs;
    c->pdl = kvs_cuda_env_parts("KVS_CUDA_PDL", decode ? KVS_CUDA_PART_GEMV
                                                        : KVS_CUDA_PART_GEMV | KVS_CUDA_PART_OTHER);
    c->gmode = KVS_CUDA_G_OFF;
    if (env_off("KVS_CUDA_GRAPHS")) {
        return 0;
    }
    if (c->stage == NULL) {
        void *h = NULL;
        if (cudaHostAlloc(&h, KVS_CUDA_STAGE_BYTES, cudaHostAllocDefault) != cudaSuccess) {
            (void)cudaGetLastError();
            KVS_WARN("cuda: no pinned stage for graphs; forwards run without them");
            return 0;
        }
        c->stage = (unsigned char *)h;
        KVS_TRY(kvs_cuda_buf_reserve(&c->dstage, KVS_CUDA_STAGE_BYTES));
        CU_TRY(cudaEventCreateWithFlags(&c->stage_ev, cudaEventDisableTiming));
        CU_TRY(cudaEventRecord(c->stage_ev, c->stream));
    }
    CU_TRY(cudaEventSynchronize(c->stage_ev)); /* the last graph's upload has read the stage */
    reset_forward(c, KVS_CUDA_G_PROBE);
    return 0;
}

static struct kvs_cuda_graph *graph_find(struct kvs_cuda *c, uint64_t key)
{
    for (int i = 0; i < KVS_CUDA_MAX_GRAPHS; i++) {
        if (c->graphs[i].exec != NULL && c->graphs[i].key == key) {
            return &c->graphs[i];
        }
    }
    return NULL;
}

static int graph_launch(struct kvs_cuda *c, struct kvs_cuda_graph *g)
{
    if (c->stage_off > 0) {
        CU_TRY(cudaMemcpyAsync(c->dstage.p, c->stage, c->stage_off, cudaMemcpyHostToDevice,
                               c->stream));
    }
    CU_TRY(cudaEventRecord(c->stage_ev, c->stream));
    CU_TRY(cudaGraphLaunch(g->exec, c->stream));
    g->last_use = ++c->graph_clock;
    c->n_graph_launch++;
    return 0;
}

/* Keep exec under key, in a free entry or the least recently used one. */
static struct kvs_cuda_graph *graph_keep(struct kvs_cuda *c, uint64_t key, cudaGraphExec_t exec)
{
    struct kvs_cuda_graph *g = &c->graphs[0];
    for (int i = 0; i < KVS_CUDA_MAX_GRAPHS; i++) {
        struct kvs_cuda_graph *e = &c->graphs[i];
        if (e->exec == NULL) {
            g = e;
            break;
        }
        if (e->last_use < g->last_use) {
            g = e;
        }
    }
    if (g->exec != NULL) {
        cudaGraphExecDestroy(g->exec);
    }
    g->key = key;
    g->exec = exec;
    g->last_use = c->graph_clock;
    return g;
}

extern "C" int kvs_cuda_graph_end(kvs_backend *b, int *rc)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    int frc = kvs_cuda_flush(c); /* held-back ops belong to this pass */
    c->fwd_gen++;                /* a next pass issues its launches afresh */
    if (*rc == 0 && frc < 0) {
        *rc = frc;
    }
    const int mode = c->gmode;
    c->gmode = KVS_CUDA_G_OFF;
    if (mode == KVS_CUDA_G_OFF) {
        c->n_seqs_hint = 0; /* the forward is done */
    }
    if (mode == KVS_CUDA_G_PROBE) {
        if (*rc < 0) {
            c->n_seqs_hint = 0;
            return 0; /* the same host checks fail in an eager run */
        }
        if (c->gbad) {
            return 1;
        }
        struct kvs_cuda_graph *g = graph_find(c, c->ghash);
        if (g != NULL) {
            *rc = graph_launch(c, g);
            c->n_seqs_hint = 0;
            return 0;
        }
        if (c->ghash != c->gmiss) {
            c->gmiss = c->ghash; /* first sight: eagerly; capture if the next is the same */
            return 1;
        }
        const uint64_t key = c->ghash;
        if (cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
            (void)cudaGetLastError();
            return 1;
        }
        reset_forward(c, KVS_CUDA_G_CAPTURE);
        c->gkey = key;
        return 1;
    }
    if (mode == KVS_CUDA_G_CAPTURE) {
        cudaGraph_t graph = NULL;
        cudaError_t e = cudaStreamEndCapture(c->stream, &graph);
        bool ok = *rc == 0 && e == cudaSuccess && graph != NULL && !c->gbad &&
                  c->ghash == c->gkey;
        cudaGraphExec_t exec = NULL;
        if (ok && cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) {
            ok = false;
            exec = NULL;
        }
        if (graph != NULL) {
            cudaGraphDestroy(graph);
        }
        if (!ok) {
            (void)cudaGetLastError();
            KVS_DEBUG("cuda: forward capture not used (%s, status %d); running it eagerly",
                      cudaGetErrorString(e), *rc);
            c->gmiss = 0;
            *rc = 0;
            return 1;
        }
        c->n_graph_capture++;
        *rc = graph_launch(c, graph_keep(c, c->gkey, exec));
        c->n_seqs_hint = 0;
        return 0;
    }
    return 0;
}

extern "C" void kvs_cuda_graph_counts(kvs_backend *b, uint64_t *launched, uint64_t *captured)
{
    struct kvs_cuda *c = kvs_cuda_ctx(b);
    *launched = c->n_graph_launch;
    *captured = c->n_graph_capture;
}

void kvs_cuda_graphs_free(struct kvs_cuda *c)
{
    for (int i = 0; i < KVS_CUDA_MAX_GRAPHS; i++) {
        if (c->graphs[i].exec != NULL) {
            cudaGraphExecDestroy(c->graphs[i].exec);
            c->graphs[i].exec = NULL;
        }
    }
    if (c->stage != NULL) {
        cudaFreeHost(c->stage);
        c->stage = NULL;
    }
    kvs_cuda_buf_free(&c->dstage);
    if (c->stage_ev != NULL) {
        cudaEventDestroy(c->stage_ev);
        c->stage_ev = NULL;
    }
}
