/* The KV pool: a worker's KV memory as fixed-size blocks of cells, and seqs that view it.
 *
 * Metadata lives here (refcounts, free list, block hashes and tokens); the K/V storage
 * itself is a kvs_kv_cache owned by the backend. A block is the unit of allocation,
 * sharing and transfer; a cell (one token position in every layer) is the unit of capacity.
 *
 * A seq is a block table plus a length: cell c of a seq lives in block table[c / block_size]
 * at offset c % block_size. Seqs share blocks by reference (fork). A full block is
 * immutable; writing into a shared, partially filled tail block first copies it
 * (copy-on-write), so a fork never disturbs its parent.
 *
 * Growing a seq is plan-then-apply: kvs_pool_seq_reserve either secures every block the
 * next n cells need (copying a shared tail) or changes nothing and returns KVS_CAPACITY.
 * The caller then runs the forward pass, which writes the cells, and kvs_pool_seq_commit
 * advances the length.
 *
 * Thread-safety: none; the pool belongs to the thread that drives the engine.
 */
#ifndef KVS_KVPOOL_H
#define KVS_KVPOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/backend.h"

#define KVS_POOL_DEFAULT_BLOCK_SIZE 16

typedef struct kvs_pool kvs_pool;

struct kvs_pool_stats {
    uint64_t indexed_blocks;  /* blocks ever added to the prefix index */
    uint64_t hit_blocks;      /* blocks shared from the index instead of computed */
    uint64_t reclaimed;       /* cached (unreferenced, indexed) blocks taken back for space */
};

typedef struct kvs_seq {
    int32_t *table;    /* (cap_blocks) block ids in position order */
    int32_t n_blocks;  /* blocks referenced by table */
    int32_t cap_blocks;/* allocated entries of table */
    int32_t n_cells;   /* committed length in cells (= tokens) */
} kvs_seq;

/* Bytes of KV one cell takes: 2 (K and V) * n_layer * n_kv_head * head_dim * dtype size. */
size_t kvs_pool_cell_bytes(int32_t n_layer, int32_t n_kv_head, int32_t head_dim, uint32_t dtype);

/* Create a pool of n_block blocks of block_size cells whose storage (layout->n_block must
 * equal n_block) is allocated on backend b. Returns 0 and *out, or KVS_NO_MEMORY /
 * KVS_INVALID_ARGUMENT (n_block < 1, block_size < 1). Caller frees with kvs_pool_destroy.
 * The backend must outlive the pool. */
int kvs_pool_new(kvs_backend *b, const struct kvs_kv_layout *layout, kvs_pool **out);
void kvs_pool_destroy(kvs_pool **pool);

/* Number of blocks that fit in budget_bytes for this layout (0 if none). */
int32_t kvs_pool_blocks_for_bytes(size_t budget_bytes, int32_t block_size, size_t cell_bytes);

kvs_kv_cache *kvs_pool_kv(const kvs_pool *pool);
const struct kvs_kv_layout *kvs_pool_layout(const kvs_pool *pool);
int32_t kvs_pool_block_size(const kvs_pool *pool);
int32_t kvs_pool_n_blocks(const kvs_pool *pool);
int32_t kvs_pool_n_free(const kvs_pool *pool);          /* blocks free or reclaimable */
int32_t kvs_pool_n_cached(const kvs_pool *pool);        /* unreferenced indexed blocks (LRU) */
int32_t kvs_pool_n_indexed_in_use(const kvs_pool *pool);/* indexed blocks some seq references */
const struct kvs_pool_stats *kvs_pool_stats(const kvs_pool *pool);
int64_t kvs_pool_capacity_cells(const kvs_pool *pool);   /* n_blocks * block_size */
int32_t kvs_pool_refcount(const kvs_pool *pool, int32_t block);

/* A new empty seq. Returns NULL on allocation failure. Release with kvs_pool_seq_release. */
kvs_seq *kvs_pool_seq_new(kvs_pool *pool);

/* A fork of src: same length, shares all of src's blocks (refcounts +1). NULL on
 * allocation failure (nothing changed). */
kvs_seq *kvs_pool_seq_fork(kvs_pool *pool, const kvs_seq *src);

/* A fork of the first n_cells cells of src (n_cells <= src->n_cells): the view a query
 * takes while src is still being extended by an append in progress. NULL on failure. */
kvs_seq *kvs_pool_seq_fork_n(kvs_pool *pool, const kvs_seq *src, int32_t n_cells);

/* Drop a seq's references (blocks whose refcount reaches 0 return to the free list) and
 * free it. Accepts NULL and *seq == NULL; sets *seq to NULL. */
void kvs_pool_seq_release(kvs_pool *pool, kvs_seq **seq);

/* Blocks that reserving n more cells for seq would take from the free list (new blocks,
 * plus one when a shared partial tail must be copied). Changes nothing. */
int32_t kvs_pool_seq_blocks_needed(const kvs_pool *pool, const kvs_seq *seq, int32_t n);

/* Make cells [n_cells, n_cells + n) of seq writable: copy a shared partial tail block,
 * append fresh blocks. On KVS_CAPACITY (not enough free blocks) or KVS_NO_MEMORY nothing
 * has changed. Does not change n_cells. */
int kvs_pool_seq_reserve(kvs_pool *pool, kvs_seq *seq, int32_t n);

/* Advance seq's length by n cells (written by the forward pass). The cells must have been
 * reserved (asserted). */
void kvs_pool_seq_commit(kvs_pool *pool, kvs_seq *seq, int32_t n);

/* Drop blocks past the committed length (unused reservations). */
void kvs_pool_seq_trim(kvs_pool *pool, kvs_seq *seq);

/* Called by kvs_pool_seq_slide to write block src's cells, shifted, into fresh block dst. */
typedef int (*kvs_pool_shift_fn)(int32_t src, int32_t dst, void *user);

/* Sliding eviction: drop n_evict blocks of seq starting at table index first (all cells
 * after them move n_evict * block_size positions down) and replace every later block by a
 * fresh copy written by shift (which re-rotates the keys). Blocks before first are kept
 * as they are; no block that another seq references is modified. Needs at most one free
 * block at any moment (evicted blocks are released first). Returns 0, KVS_INVALID_ARGUMENT
 * (first / n_evict outside the committed blocks), KVS_CAPACITY (no block to copy into:
 * the evicted blocks were all shared), or shift's error; on error the seq is unchanged
 * only if nothing was evicted yet (KVS_INVALID_ARGUMENT / KVS_CAPACITY before the first
 * copy); a shift error mid-way leaves the seq consistent but shorter (truncated at the
 * failed block) and is logged. */
int kvs_pool_seq_slide(kvs_pool *pool, kvs_seq *seq, int32_t first, int32_t n_evict,
                       kvs_pool_shift_fn shift, void *user);

/* ---- prefix index ----
 * Full blocks of pinned prefixes are indexed by a keyed hash chain of their tokens:
 * h_i = XXH3(tokens of block i, seed = h_{i-1} ^ key), key random per pool. A hit is
 * confirmed by comparing the tokens before the block is shared. Indexed blocks are
 * immutable; when no seq references one any more it stays cached (LRU) and is reclaimed
 * only when a fresh block is needed and the free list is empty. */

uint64_t kvs_pool_chain_hash(const kvs_pool *pool, uint64_t prev, const int32_t *tokens);
/* The indexed block with this chain hash and these block_size tokens, or -1. */
int32_t kvs_pool_lookup(const kvs_pool *pool, uint64_t hash, const int32_t *tokens);
/* Start an empty seq with the longest run of leading full blocks of tokens[0..n) found in
 * the index (shared, refcounts +1). Returns the cells it now holds (a multiple of the block
 * size; 0 if none). */
int32_t kvs_pool_seq_share_prefix(kvs_pool *pool, kvs_seq *seq, const int32_t *tokens, int32_t n);
bool kvs_pool_is_indexed(const kvs_pool *pool, int32_t block);
/* Index the full blocks of seq holding tokens[0..n) (only those not indexed yet). */
void kvs_pool_seq_index(kvs_pool *pool, const kvs_seq *seq, const int32_t *tokens, int32_t n);

/* The cell index (block * block_size + offset) that holds position pos of seq; pos must be
 * inside the reserved blocks (asserted). */
static inline int32_t kvs_seq_slot(const kvs_seq *seq, int32_t pos, int32_t block_size)
{
    return seq->table[pos / block_size] * block_size + pos % block_size;
}

#endif
