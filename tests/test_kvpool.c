/* KV pool: capacity from a memory budget, block accounting, forks sharing blocks,
 * copy-on-write of a shared partial tail (its cells copied), reserve failures that leave
 * everything as it was, trim and release. */
#include <check.h>
#include <string.h>

#include "common/status.h"
#include "kernels/dtype.h"
#include "worker/kvpool.h"

static kvs_backend *be;
static kvs_pool *pool;

static void setup(void)
{
    be = kvs_backend_cpu_new(1);
    ck_assert_ptr_nonnull(be);
    struct kvs_kv_layout lay = {.n_layer = 2, .n_block = 8, .block_size = 16, .n_kv_head = 2,
                                .head_dim = 8, .dtype = KVS_DTYPE_F32};
    ck_assert_int_eq(kvs_pool_new(be, &lay, &pool), 0);
}

static void teardown(void)
{
    kvs_pool_destroy(&pool);
    ck_assert_ptr_null(pool);
    kvs_backend_destroy(&be);
}

START_TEST(test_capacity)
{
    size_t cell = kvs_pool_cell_bytes(30, 3, 64, KVS_DTYPE_F16);
    ck_assert_uint_eq(cell, 2u * 30 * 3 * 64 * 2);
    ck_assert_int_eq(kvs_pool_blocks_for_bytes(cell * 16 * 10 + 5, 16, cell), 10);
    ck_assert_int_eq(kvs_pool_blocks_for_bytes(cell * 15, 16, cell), 0);
    ck_assert_int_eq(kvs_pool_capacity_cells(pool), 128);
    ck_assert_int_eq(kvs_pool_n_free(pool), 8);
}
END_TEST

START_TEST(test_reserve_commit_release)
{
    kvs_seq *s = kvs_pool_seq_new(pool);
    ck_assert_int_eq(kvs_pool_seq_blocks_needed(pool, s, 17), 2);
    ck_assert_int_eq(kvs_pool_seq_reserve(pool, s, 17), 0);
    ck_assert_int_eq(s->n_blocks, 2);
    ck_assert_int_eq(s->n_cells, 0);
    kvs_pool_seq_commit(pool, s, 17);
    ck_assert_int_eq(kvs_seq_slot(s, 16, 16), s->table[1] * 16);
    ck_assert_int_eq(kvs_pool_n_free(pool), 6);
    /* more than the pool holds: refused, nothing changed */
    ck_assert_int_eq(kvs_pool_seq_reserve(pool, s, 200), KVS_CAPACITY);
    ck_assert_int_eq(s->n_blocks, 2);
    ck_assert_int_eq(kvs_pool_n_free(pool), 6);
    /* over-reserve, then trim back to the committed length */
    ck_assert_int_eq(kvs_pool_seq_reserve(pool, s, 40), 0);
    ck_assert_int_eq(s->n_blocks, 4);
    kvs_pool_seq_trim(pool, s);
    ck_assert_int_eq(s->n_blocks, 2);
    kvs_pool_seq_release(pool, &s);
    ck_assert_ptr_null(s);
    ck_assert_int_eq(kvs_pool_n_free(pool), 8);
    kvs_pool_seq_release(pool, &s); /* NULL is fine */
}
END_TEST

START_TEST(test_fork_and_cow)
{
    kvs_seq *a = kvs_pool_seq_new(pool);
    ck_assert_int_eq(kvs_pool_seq_reserve(pool, a, 20), 0);
    kvs_pool_seq_commit(pool, a, 20); /* one full block + 4 cells in the tail */
    kvs_seq *b = kvs_pool_seq_fork(pool, a);
    ck_assert_int_eq(b->n_cells, 20);
    ck_assert_int_eq(kvs_pool_refcount(pool, a->table[0]), 2);
    ck_assert_int_eq(kvs_pool_refcount(pool, a->table[1]), 2);
    ck_assert_int_eq(kvs_pool_n_free(pool), 6); /* a fork takes no blocks */
    /* b writes: its shared partial tail is copied first (one fresh block) */
    ck_assert_int_eq(kvs_pool_seq_blocks_needed(pool, b, 1), 1);
    ck_assert_int_eq(kvs_pool_seq_reserve(pool, b, 1), 0);
    ck_assert_int_ne(b->table[1], a->table[1]);
    ck_assert_int_eq(b->table[0], a->table[0]);
    ck_assert_int_eq(kvs_pool_refcount(pool, a->table[1]), 1);
    ck_assert_int_eq(kvs_pool_refcount(pool, b->table[1]), 1);
    ck_assert_int_eq(kvs_pool_n_free(pool), 5);
    /* a fork at a block boundary shares everything and copies nothing */
    kvs_seq *c = kvs_pool_seq_new(pool);
    ck_assert_int_eq(kvs_pool_seq_reserve(pool, c, 16), 0);
    kvs_pool_seq_commit(pool, c, 16);
    kvs_seq *d = kvs_pool_seq_fork(pool, c);
    ck_assert_int_eq(kvs_pool_seq_blocks_needed(pool, d, 1), 1); /* a new block, no copy */
    kvs_pool_seq_release(pool, &a);
    kvs_pool_seq_release(pool, &b);
    kvs_pool_seq_release(pool, &c);
    kvs_pool_seq_release(pool, &d);
    ck_assert_int_eq(kvs_pool_n_free(pool), 8);
}
END_TEST

START_TEST(test_cow_needs_a_free_block)
{
    kvs_seq *a = kvs_pool_seq_new(pool);
    ck_assert_int_eq(kvs_pool_seq_reserve(pool, a, 8 * 16 - 3), 0);
    kvs_pool_seq_commit(pool, a, 8 * 16 - 3); /* every block used; tail partly filled */
    kvs_seq *b = kvs_pool_seq_fork(pool, a);
    ck_assert_int_eq(kvs_pool_n_free(pool), 0);
    /* a's tail is shared: writing needs a copy, and no block is free */
    ck_assert_int_eq(kvs_pool_seq_reserve(pool, a, 1), KVS_CAPACITY);
    ck_assert_int_eq(kvs_pool_refcount(pool, a->table[7]), 2);
    kvs_pool_seq_release(pool, &b);
    /* now a owns its tail again: it can write in place */
    ck_assert_int_eq(kvs_pool_seq_reserve(pool, a, 3), 0);
    ck_assert_int_eq(kvs_pool_seq_reserve(pool, a, 4), KVS_CAPACITY);
    kvs_pool_seq_release(pool, &a);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("kvpool");
    TCase *tc = tcase_create("pool");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_capacity);
    tcase_add_test(tc, test_reserve_commit_release);
    tcase_add_test(tc, test_fork_and_cow);
    tcase_add_test(tc, test_cow_needs_a_free_block);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
