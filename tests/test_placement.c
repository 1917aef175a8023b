/* coordinator/placement: best fit by free cells, prefix affinity, model match, never on a
 * cordoned / draining / unhealthy worker, deterministic ties, and a reason when nothing fits. */
#include "common/status.h"
#include "coordinator/placement.h"

#include <check.h>
#include <stdlib.h>
#include <string.h>

#define MODEL_A "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
#define MODEL_B "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"

static char reason[256];

static struct kvs_worker_info worker(const char *id, const char *model, int64_t free_cells,
                                     enum kvs_worker_state st)
{
    return (struct kvs_worker_info){.id = id,
                                    .model_sha256 = model,
                                    .n_cells_capacity = 8192,
                                    .n_cells_free = free_cells,
                                    .state = st};
}

static size_t choose(const struct kvs_worker_info *w, size_t n, const char *model, int64_t cells,
                     uint64_t prefix, int expect_rc)
{
    struct kvs_placement_request rq = {
        .model_sha256 = model, .n_cells = cells, .prefix_hash = prefix};
    struct kvs_placement p = {.index = 999};
    int rc = kvs_placement_choose(w, n, &rq, &p, reason, sizeof reason);
    ck_assert_msg(rc == expect_rc, "rc %d, expected %d (%s)", rc, expect_rc, reason);
    return rc == 0 ? p.index : (size_t)-1;
}

START_TEST(test_best_fit)
{
    struct kvs_worker_info w[3] = {
        worker("w0", MODEL_A, 4000, KVS_WORKER_READY),
        worker("w1", MODEL_A, 1200, KVS_WORKER_READY),
        worker("w2", MODEL_A, 2500, KVS_WORKER_READY),
    };
    ck_assert_uint_eq(choose(w, 3, MODEL_A, 1000, 0, 0), 1); /* tightest that fits */
    ck_assert_uint_eq(choose(w, 3, MODEL_A, 1200, 0, 0), 1); /* exactly fits */
    ck_assert_uint_eq(choose(w, 3, MODEL_A, 1201, 0, 0), 2);
    ck_assert_uint_eq(choose(w, 3, MODEL_A, 3000, 0, 0), 0);
    struct kvs_placement_request rq = {.model_sha256 = MODEL_A, .n_cells = 2000};
    struct kvs_placement p;
    ck_assert_int_eq(kvs_placement_choose(w, 3, &rq, &p, reason, sizeof reason), 0);
    ck_assert_uint_eq(p.index, 2);
    ck_assert_int_eq(p.n_cells_left, 500);
    ck_assert(!p.prefix_hit);
}
END_TEST

START_TEST(test_prefix_affinity)
{
    const uint64_t cached0[] = {11, 22}, cached2[] = {33, 22};
    struct kvs_worker_info w[3] = {
        worker("w0", MODEL_A, 6000, KVS_WORKER_READY),
        worker("w1", MODEL_A, 1500, KVS_WORKER_READY),
        worker("w2", MODEL_A, 5000, KVS_WORKER_READY),
    };
    w[0].prefix_hashes = cached0, w[0].n_prefix_hashes = 2;
    w[2].prefix_hashes = cached2, w[2].n_prefix_hashes = 2;
    /* The hit wins over a tighter fit. */
    ck_assert_uint_eq(choose(w, 3, MODEL_A, 1000, 11, 0), 0);
    /* Two hits: best fit among them. */
    ck_assert_uint_eq(choose(w, 3, MODEL_A, 1000, 22, 0), 2);
    /* No hit anywhere: plain best fit. */
    ck_assert_uint_eq(choose(w, 3, MODEL_A, 1000, 44, 0), 1);
    /* A hit on a worker without room does not count. */
    ck_assert_uint_eq(choose(w, 3, MODEL_A, 5500, 33, 0), 0);
    /* prefix hash 0 means "no prefix", even if a worker lists 0. */
    const uint64_t zero[] = {0};
    w[2].prefix_hashes = zero, w[2].n_prefix_hashes = 1;
    ck_assert_uint_eq(choose(w, 3, MODEL_A, 1000, 0, 0), 1);
    struct kvs_placement_request rq = {.model_sha256 = MODEL_A, .n_cells = 10, .prefix_hash = 11};
    struct kvs_placement p;
    ck_assert_int_eq(kvs_placement_choose(w, 3, &rq, &p, reason, sizeof reason), 0);
    ck_assert(p.prefix_hit);
}
END_TEST

START_TEST(test_model_match)
{
    struct kvs_worker_info w[3] = {
        worker("w0", MODEL_B, 1000, KVS_WORKER_READY),
        worker("w1", MODEL_A, 7000, KVS_WORKER_READY),
        worker("w2", NULL, 1000, KVS_WORKER_READY), /* registered without a model */
    };
    ck_assert_uint_eq(choose(w, 3, MODEL_A, 500, 0, 0), 1);
    ck_assert_uint_eq(choose(w, 3, MODEL_B, 500, 0, 0), 0);
    const char *model_c = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
    choose(w, 3, model_c, 500, 0, KVS_MODEL_MISMATCH);
    ck_assert_ptr_nonnull(strstr(reason, "no ready worker serves model cccccccccccccccc"));
    /* A model is matched exactly, not by prefix. */
    choose(w, 3, "aaaa", 500, 0, KVS_MODEL_MISMATCH);
}
END_TEST

START_TEST(test_cordon_drain_unhealthy)
{
    struct kvs_worker_info w[4] = {
        worker("w0", MODEL_A, 1000, KVS_WORKER_CORDONED),
        worker("w1", MODEL_A, 1100, KVS_WORKER_DRAINING),
        worker("w2", MODEL_A, 1200, KVS_WORKER_UNHEALTHY),
        worker("w3", MODEL_A, 9000, KVS_WORKER_READY),
    };
    const uint64_t cached[] = {5};
    w[0].prefix_hashes = cached, w[0].n_prefix_hashes = 1;
    /* Even with a prefix hit and the best fit, a not-ready worker is never chosen. */
    ck_assert_uint_eq(choose(w, 4, MODEL_A, 900, 5, 0), 3);
    w[3].state = KVS_WORKER_CORDONED;
    choose(w, 4, MODEL_A, 900, 5, KVS_UNAVAILABLE);
    ck_assert_ptr_nonnull(strstr(reason, "none ready"));
    ck_assert_ptr_nonnull(strstr(reason, "4 registered"));
    ck_assert_str_eq(kvs_worker_state_name(KVS_WORKER_DRAINING), "draining");
    ck_assert_int_eq(kvs_worker_state_parse("unhealthy"), KVS_WORKER_UNHEALTHY);
    ck_assert_int_eq(kvs_worker_state_parse("Ready"), -1);
    ck_assert_str_eq(kvs_worker_state_name((enum kvs_worker_state)9), "?");
}
END_TEST

START_TEST(test_ties_are_deterministic)
{
    struct kvs_worker_info w[3] = {
        worker("w-b", MODEL_A, 2000, KVS_WORKER_READY),
        worker("w-c", MODEL_A, 2000, KVS_WORKER_READY),
        worker("w-a", MODEL_A, 2000, KVS_WORKER_READY),
    };
    /* The smallest id, wherever it is in the array. */
    ck_assert_uint_eq(choose(w, 3, MODEL_A, 100, 0, 0), 2);
    struct kvs_worker_info r[3] = {w[2], w[1], w[0]};
    ck_assert_uint_eq(choose(r, 3, MODEL_A, 100, 0, 0), 0);
    ck_assert_str_eq(r[0].id, "w-a");
}
END_TEST

START_TEST(test_nothing_fits)
{
    struct kvs_worker_info w[2] = {
        worker("w0", MODEL_A, 300, KVS_WORKER_READY),
        worker("w1", MODEL_A, 700, KVS_WORKER_READY),
    };
    choose(w, 2, MODEL_A, 701, 0, KVS_CAPACITY);
    ck_assert_ptr_nonnull(strstr(reason, "701 free cells"));
    ck_assert_ptr_nonnull(strstr(reason, "is 700"));
    choose(NULL, 0, MODEL_A, 1, 0, KVS_UNAVAILABLE);
    ck_assert_ptr_nonnull(strstr(reason, "0 registered"));
    choose(w, 2, MODEL_A, 0, 0, KVS_INVALID_ARGUMENT);
    choose(w, 2, NULL, 10, 0, KVS_INVALID_ARGUMENT);
    /* A negative free count (a worker over-reserved) never fits. */
    w[1].n_cells_free = -5;
    choose(w, 2, MODEL_A, 301, 0, KVS_CAPACITY);
}
END_TEST

static Suite *placement_suite(void)
{
    Suite *s = suite_create("placement");
    TCase *tc = tcase_create("policy");
    tcase_add_test(tc, test_best_fit);
    tcase_add_test(tc, test_prefix_affinity);
    tcase_add_test(tc, test_model_match);
    tcase_add_test(tc, test_cordon_drain_unhealthy);
    tcase_add_test(tc, test_ties_are_deterministic);
    tcase_add_test(tc, test_nothing_fits);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(placement_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
