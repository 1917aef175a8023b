#include "kvpool.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "common/status.h"
#include "kernels/dtype.h"

struct kvs_pool {
    kvs_backend *backend;         /* borrowed; owns the storage below */
    kvs_kv_cache *kv;             /* K/V storage of all blocks, backend memory */
    struct kvs_kv_layout layout;  /* shape of kv */
    int32_t block_size;           /* cells per block */
    int32_t n_blocks;             /* blocks in the pool */
    int32_t *refcount;            /* (n_blocks) seqs referencing each block; 0 = free */
    int32_t *free_stack;          /* (n_blocks) ids of free blocks, top at n_free - 1 */
    int32_t n_free;               /* entries of free_stack */
    /* prefix index: full, immutable blocks found by a keyed hash chain of their tokens */
    uint64_t key;                 /* random per pool: chain hashes are not predictable */
    uint64_t *hash;               /* (n_blocks) chain hash of an indexed block */
    int32_t *tokens;              /* (n_blocks, block_size) tokens of an indexed block */
    uint8_t *indexed;             /* (n_blocks) 1 = in the index */
    int32_t *map;                 /* (map_cap) block id or -1 (empty) / -2 (deleted) */
    int32_t map_cap;              /* power of two >= 2 * n_blocks */
    int32_t *lru_prev, *lru_next; /* (n_blocks) cached blocks (indexed, refcount 0), oldest first */
    int32_t lru_head, lru_tail;   /* -1 when empty */
    int32_t n_cached;             /* blocks in the LRU */
    int32_t n_indexed_in_use;     /* indexed blocks with refcount > 0 */
    struct kvs_pool_stats stats;
};

size_t kvs_pool_cell_bytes(int32_t n_layer, int32_t n_kv_head, int32_t head_dim, uint32_t dtype)
{
    size_t elem = dtype == KVS_DTYPE_F32 ? 4 : 2;
    return 2 * (size_t)n_layer * (size_t)n_kv_head * (size_t)head_dim * elem;
}

int32_t kvs_pool_blocks_for_bytes(size_t budget_bytes, int32_t block_size, size_t cell_bytes)
{
    if (block_size < 1 || cell_bytes == 0) {
        return 0;
    }
    size_t n = budget_bytes / (cell_bytes * (size_t)block_size);
    return n > INT32_MAX / 2 ? INT32_MAX / 2 : (int32_t)n;
}

int kvs_pool_new(kvs_backend *b, const struct kvs_kv_layout *layout, kvs_pool **out)
{
    *out = NULL;
    if (layout->n_block < 1 || layout->block_size < 1) {
        return KVS_INVALID_ARGUMENT;
    }
    kvs_pool *p = calloc(1, sizeof *p);
    if (p == NULL) {
        return KVS_NO_MEMORY;
    }
    p->backend = b;
    p->layout = *layout;
    p->block_size = layout->block_size;
    p->n_blocks = layout->n_block;
    p->refcount = calloc((size_t)p->n_blocks, sizeof *p->refcount);
    p->free_stack = malloc((size_t)p->n_blocks * sizeof *p->free_stack);
    p->map_cap = 16;
    while (p->map_cap < 2 * p->n_blocks) {
        p->map_cap *= 2;
    }
    p->hash = calloc((size_t)p->n_blocks, sizeof *p->hash);
    p->tokens = malloc((size_t)p->n_blocks * (size_t)p->block_size * sizeof *p->tokens);
    p->indexed = calloc((size_t)p->n_blocks, 1);
    p->map = malloc((size_t)p->map_cap * sizeof *p->map);
    p->lru_prev = malloc((size_t)p->n_blocks * sizeof *p->lru_prev);
    p->lru_next = malloc((size_t)p->n_blocks * sizeof *p->lru_next);
    if (p->refcount == NULL || p->free_stack == NULL || p->hash == NULL || p->tokens == NULL ||
        p->indexed == NULL || p->map == NULL || p->lru_prev == NULL || p->lru_next == NULL) {
        goto fail;
    }
    for (int32_t i = 0; i < p->map_cap; i++) {
        p->map[i] = -1;
    }
    p->lru_head = p->lru_tail = -1;
    if (getrandom(&p->key, sizeof p->key, 0) != (ssize_t)sizeof p->key) {
        p->key = (uint64_t)(uintptr_t)p ^ 0x9e3779b97f4a7c15ull;
    }
    /* Lowest ids on top, so a fresh pool hands out blocks 0, 1, 2, ... */
    for (int32_t i = 0; i < p->n_blocks; i++) {
        p->free_stack[i] = p->n_blocks - 1 - i;
    }
    p->n_free = p->n_blocks;
    int rc = b->ops->kv_new(b, layout, &p->kv);
    if (rc < 0) {
        kvs_pool_destroy(&p);
        return rc;
    }
    *out = p;
    return KVS_OK;
fail:
    kvs_pool_destroy(&p);
    return KVS_NO_MEMORY;
}

void kvs_pool_destroy(kvs_pool **pool)
{
    if (pool == NULL || *pool == NULL) {
        return;
    }
    kvs_pool *p = *pool;
    if (p->kv != NULL) {
        p->backend->ops->kv_destroy(p->backend, &p->kv);
    }
    free(p->refcount);
    free(p->free_stack);
    free(p->hash);
    free(p->tokens);
    free(p->indexed);
    free(p->map);
    free(p->lru_prev);
    free(p->lru_next);
    free(p);
    *pool = NULL;
}

kvs_kv_cache *kvs_pool_kv(const kvs_pool *pool)
{
    return pool->kv;
}

const struct kvs_kv_layout *kvs_pool_layout(const kvs_pool *pool)
{
    return &pool->layout;
}

int32_t kvs_pool_block_size(const kvs_pool *pool)
{
    return pool->block_size;
}

int32_t kvs_pool_n_blocks(const kvs_pool *pool)
{
    return pool->n_blocks;
}

int32_t kvs_pool_n_free(const kvs_pool *pool)
{
    return pool->n_free + pool->n_cached;
}

int64_t kvs_pool_capacity_cells(const kvs_pool *pool)
{
    return (int64_t)pool->n_blocks * pool->block_size;
}

int32_t kvs_pool_refcount(const kvs_pool *pool, int32_t block)
{
    assert(block >= 0 && block < pool->n_blocks);
    return pool->refcount[block];
}

static void lru_remove(kvs_pool *p, int32_t b)
{
    int32_t pr = p->lru_prev[b], nx = p->lru_next[b];
    if (pr >= 0) {
        p->lru_next[pr] = nx;
    } else {
        p->lru_head = nx;
    }
    if (nx >= 0) {
        p->lru_prev[nx] = pr;
    } else {
        p->lru_tail = pr;
    }
    p->n_cached--;
}

static void lru_push(kvs_pool *p, int32_t b)
{
    p->lru_prev[b] = p->lru_tail;
    p->lru_next[b] = -1;
    if (p->lru_tail >= 0) {
        p->lru_next[p->lru_tail] = b;
    } else {
        p->lru_head = b;
    }
    p->lru_tail = b;
    p->n_cached++;
}

static int32_t map_slot(const kvs_pool *p, uint64_t h)
{
    return (int32_t)(h & (uint64_t)(p->map_cap - 1));
}

static void index_remove(kvs_pool *p, int32_t b)
{
    int32_t i = map_slot(p, p->hash[b]);
    while (p->map[i] != -1) {
        if (p->map[i] == b) {
            p->map[i] = -2;
            break;
        }
        i = (i + 1) & (p->map_cap - 1);
    }
    p->indexed[b] = 0;
}

static int32_t take_block(kvs_pool *p)
{
    int32_t b;
    if (p->n_free > 0) {
        b = p->free_stack[--p->n_free];
    } else {
        /* reclaim the least recently used cached prefix block */
        assert(p->n_cached > 0);
        b = p->lru_head;
        lru_remove(p, b);
        index_remove(p, b);
        p->stats.reclaimed++;
    }
    assert(p->refcount[b] == 0);
    p->refcount[b] = 1;
    return b;
}

static void unref_block(kvs_pool *p, int32_t b)
{
    assert(p->refcount[b] > 0);
    if (--p->refcount[b] == 0) {
        if (p->indexed[b]) {
            p->n_indexed_in_use--;
            lru_push(p, b); /* kept for a later hit until the space is needed */
        } else {
            p->free_stack[p->n_free++] = b;
        }
    }
}

static void ref_block(kvs_pool *p, int32_t b)
{
    if (p->refcount[b]++ == 0) {
        assert(p->indexed[b]);
        lru_remove(p, b);
        p->n_indexed_in_use++;
    }
}

static int grow_table(kvs_seq *s, int32_t need)
{
    if (need <= s->cap_blocks) {
        return KVS_OK;
    }
    int32_t cap = s->cap_blocks > 0 ? s->cap_blocks : 8;
    while (cap < need) {
        cap *= 2;
    }
    int32_t *t = realloc(s->table, (size_t)cap * sizeof *t);
    if (t == NULL) {
        return KVS_NO_MEMORY;
    }
    s->table = t;
    s->cap_blocks = cap;
    return KVS_OK;
}

kvs_seq *kvs_pool_seq_new(kvs_pool *pool)
{
    (void)pool;
    return calloc(1, sizeof(kvs_seq));
}

kvs_seq *kvs_pool_seq_fork(kvs_pool *pool, const kvs_seq *src)
{
    return kvs_pool_seq_fork_n(pool, src, src->n_cells);
}

kvs_seq *kvs_pool_seq_fork_n(kvs_pool *pool, const kvs_seq *src, int32_t n_cells)
{
    assert(n_cells >= 0 && n_cells <= src->n_cells);
    kvs_seq *s = calloc(1, sizeof *s);
    if (s == NULL) {
        return NULL;
    }
    /* Share only blocks holding the visible cells; the rest stays with src. */
    int32_t used = (n_cells + pool->block_size - 1) / pool->block_size;
    if (grow_table(s, used) < 0) {
        free(s);
        return NULL;
    }
    if (used > 0) {
        memcpy(s->table, src->table, (size_t)used * sizeof *s->table);
    }
    for (int32_t i = 0; i < used; i++) {
        ref_block(pool, s->table[i]);
    }
    s->n_blocks = used;
    s->n_cells = n_cells;
    return s;
}

void kvs_pool_seq_release(kvs_pool *pool, kvs_seq **seq)
{
    if (seq == NULL || *seq == NULL) {
        return;
    }
    kvs_seq *s = *seq;
    for (int32_t i = 0; i < s->n_blocks; i++) {
        unref_block(pool, s->table[i]);
    }
    free(s->table);
    free(s);
    *seq = NULL;
}

/* True when the block holding cell n_cells (the next one written) is shared and already
 * holds cells of this seq, so writing into it needs a private copy first. */
static bool tail_needs_copy(const kvs_pool *p, const kvs_seq *s)
{
    if (s->n_cells % p->block_size == 0) {
        return false; /* the next cell starts a new block */
    }
    int32_t tail = s->n_cells / p->block_size;
    assert(tail < s->n_blocks);
    return p->refcount[s->table[tail]] > 1;
}

int32_t kvs_pool_seq_blocks_needed(const kvs_pool *pool, const kvs_seq *seq, int32_t n)
{
    assert(n >= 0);
    int64_t end = (int64_t)seq->n_cells + n;
    int64_t blocks = (end + pool->block_size - 1) / pool->block_size;
    int64_t fresh = blocks > seq->n_blocks ? blocks - seq->n_blocks : 0;
    if (n > 0 && tail_needs_copy(pool, seq)) {
        fresh++;
    }
    return fresh > INT32_MAX ? INT32_MAX : (int32_t)fresh;
}

int kvs_pool_seq_reserve(kvs_pool *pool, kvs_seq *seq, int32_t n)
{
    if (n <= 0) {
        return KVS_OK;
    }
    /* Plan: count, check, grow the table; nothing shared is touched until all succeed. */
    int64_t end = (int64_t)seq->n_cells + n;
    if (end > (int64_t)INT32_MAX - pool->block_size) {
        return KVS_OUT_OF_RANGE;
    }
    int32_t blocks = (int32_t)((end + pool->block_size - 1) / pool->block_size);
    int32_t needed = kvs_pool_seq_blocks_needed(pool, seq, n);
    if (needed > pool->n_free + pool->n_cached) {
        return KVS_CAPACITY;
    }
    if (grow_table(seq, blocks) < 0) {
        return KVS_NO_MEMORY;
    }
    /* Apply. */
    if (tail_needs_copy(pool, seq)) {
        int32_t tail = seq->n_cells / pool->block_size;
        int32_t old = seq->table[tail];
        int32_t copy = take_block(pool);
        int rc = pool->backend->ops->kv_copy_block(pool->backend, pool->kv, old, copy);
        if (rc < 0) {
            unref_block(pool, copy);
            return rc;
        }
        seq->table[tail] = copy;
        unref_block(pool, old);
    }
    while (seq->n_blocks < blocks) {
        seq->table[seq->n_blocks++] = take_block(pool);
    }
    return KVS_OK;
}

void kvs_pool_seq_commit(kvs_pool *pool, kvs_seq *seq, int32_t n)
{
    assert(n >= 0);
    assert((int64_t)seq->n_cells + n <= (int64_t)seq->n_blocks * pool->block_size);
    seq->n_cells += n;
}

void kvs_pool_seq_trim(kvs_pool *pool, kvs_seq *seq)
{
    int32_t used = (seq->n_cells + pool->block_size - 1) / pool->block_size;
    while (seq->n_blocks > used) {
        unref_block(pool, seq->table[--seq->n_blocks]);
    }
}

int kvs_pool_seq_slide(kvs_pool *pool, kvs_seq *seq, int32_t first, int32_t n_evict,
                       kvs_pool_shift_fn shift, void *user)
{
    kvs_pool_seq_trim(pool, seq);
    int32_t bs = pool->block_size;
    int32_t used = seq->n_blocks;
    if (first < 0 || n_evict < 1 || first + n_evict > used ||
        (first + n_evict < used && seq->n_cells < (first + n_evict) * bs)) {
        return KVS_INVALID_ARGUMENT;
    }
    /* The evicted blocks go back first; then each kept block is copied, shifted, into a
     * fresh block and its old reference dropped, so one free block is enough. */
    int32_t free_after = pool->n_free;
    for (int32_t i = first; i < first + n_evict; i++) {
        free_after += pool->refcount[seq->table[i]] == 1;
    }
    int32_t shared_kept = 0; /* kept blocks whose old copy stays alive with another seq */
    for (int32_t i = first + n_evict; i < used; i++) {
        shared_kept += pool->refcount[seq->table[i]] > 1;
    }
    if (first + n_evict < used && free_after < 1 + shared_kept) {
        return KVS_CAPACITY;
    }
    int32_t evicted_cells = seq->n_cells - first * bs < n_evict * bs ? seq->n_cells - first * bs
                                                                     : n_evict * bs;
    for (int32_t i = first; i < first + n_evict; i++) {
        unref_block(pool, seq->table[i]);
    }
    int32_t out = first;
    for (int32_t i = first + n_evict; i < used; i++) {
        int32_t old = seq->table[i];
        int32_t fresh = take_block(pool);
        int rc = shift(old, fresh, user);
        if (rc < 0) {
            unref_block(pool, fresh);
            for (int32_t j = i; j < used; j++) {
                unref_block(pool, seq->table[j]);
            }
            seq->n_blocks = out;
            seq->n_cells = out * bs;
            return rc;
        }
        seq->table[out++] = fresh;
        unref_block(pool, old);
    }
    seq->n_blocks = out;
    seq->n_cells -= evicted_cells;
    return KVS_OK;
}

int32_t kvs_pool_n_cached(const kvs_pool *pool)
{
    return pool->n_cached;
}

int32_t kvs_pool_n_indexed_in_use(const kvs_pool *pool)
{
    return pool->n_indexed_in_use;
}

const struct kvs_pool_stats *kvs_pool_stats(const kvs_pool *pool)
{
    return &pool->stats;
}

uint64_t kvs_pool_chain_hash(const kvs_pool *pool, uint64_t prev, const int32_t *tokens)
{
    return XXH3_64bits_withSeed(tokens, (size_t)pool->block_size * sizeof *tokens,
                                prev ^ pool->key);
}

int32_t kvs_pool_lookup(const kvs_pool *pool, uint64_t hash, const int32_t *tokens)
{
    int32_t i = map_slot(pool, hash);
    while (pool->map[i] != -1) {
        int32_t b = pool->map[i];
        /* a hash hit is confirmed by the tokens before the block is shared */
        if (b >= 0 && pool->hash[b] == hash &&
            memcmp(pool->tokens + (size_t)b * pool->block_size, tokens,
                   (size_t)pool->block_size * sizeof *tokens) == 0) {
            return b;
        }
        i = (i + 1) & (pool->map_cap - 1);
    }
    return -1;
}

int32_t kvs_pool_seq_share_prefix(kvs_pool *pool, kvs_seq *seq, const int32_t *tokens, int32_t n)
{
    assert(seq->n_cells == 0 && seq->n_blocks == 0);
    int32_t bs = pool->block_size, hits = 0;
    uint64_t h = 0;
    for (int32_t i = 0; (i + 1) * bs <= n; i++) {
        h = kvs_pool_chain_hash(pool, h, tokens + (size_t)i * bs);
        int32_t b = kvs_pool_lookup(pool, h, tokens + (size_t)i * bs);
        if (b < 0 || grow_table(seq, i + 1) < 0) {
            break;
        }
        ref_block(pool, b);
        seq->table[seq->n_blocks++] = b;
        hits++;
    }
    seq->n_cells = hits * bs;
    pool->stats.hit_blocks += (uint64_t)hits;
    return hits * bs;
}

void kvs_pool_seq_index(kvs_pool *pool, const kvs_seq *seq, const int32_t *tokens, int32_t n)
{
    int32_t bs = pool->block_size;
    uint64_t h = 0;
    for (int32_t i = 0; (i + 1) * bs <= n && (i + 1) * bs <= seq->n_cells; i++) {
        h = kvs_pool_chain_hash(pool, h, tokens + (size_t)i * bs);
        int32_t b = seq->table[i];
        if (pool->indexed[b]) {
            continue;
        }
        if (kvs_pool_lookup(pool, h, tokens + (size_t)i * bs) >= 0) {
            continue; /* an equal block is indexed already (computed twice): keep that one */
        }
        pool->hash[b] = h;
        memcpy(pool->tokens + (size_t)b * bs, tokens + (size_t)i * bs, (size_t)bs * sizeof *tokens);
        pool->indexed[b] = 1;
        pool->n_indexed_in_use++;
        int32_t k = map_slot(pool, h);
        while (pool->map[k] >= 0) {
            k = (k + 1) & (pool->map_cap - 1);
        }
        pool->map[k] = b;
        pool->stats.indexed_blocks++;
    }
}

bool kvs_pool_is_indexed(const kvs_pool *pool, int32_t block)
{
    assert(block >= 0 && block < pool->n_blocks);
    return pool->indexed[block] != 0;
}
