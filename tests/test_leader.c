/* coordinator/leader: two contenders on one store (embedded, then a real etcd): one leads,
 * the other stands by; when the leader stops renewing, the standby takes over within the
 * TTL; the stale leader's fenced write is refused by the store; a resignation hands over at
 * once. Without /usr/bin/etcd the program exits 77 (skipped) and says so. */
#include "common/status.h"
#include "common/store.h"
#include "coordinator/leader.h"
#include "etcd_rig.h"

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define TTL_S 2

static struct etcd_rig g_etcd;
static const char *g_url;
static kvs_store *s1, *s2; /* one handle per contender (the same one when embedded) */
static char err[512];
static char key[128], data_key[128];

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void setup(void)
{
    s1 = kvs_store_open(g_url, 2000, err, sizeof err);
    ck_assert_msg(s1 != NULL, "%s", err);
    if (strcmp(kvs_store_kind(s1), "embedded") == 0) {
        s2 = s1;
    } else {
        s2 = kvs_store_open(g_url, 2000, err, sizeof err);
        ck_assert_msg(s2 != NULL, "%s", err);
    }
    static int n;
    snprintf(key, sizeof key, "/kvstream/t%d-%d/leader", (int)getpid(), n);
    snprintf(data_key, sizeof data_key, "/kvstream/t%d-%d/sessions/s1", (int)getpid(), n++);
}

static void teardown(void)
{
    if (s2 != s1) {
        kvs_store_destroy(&s2);
    }
    kvs_store_destroy(&s1);
}

START_TEST(test_failover_and_fence)
{
    kvs_leader *a = kvs_leader_new(s1, key, "coord-a", TTL_S, err, sizeof err);
    kvs_leader *b = kvs_leader_new(s2, key, "coord-b", TTL_S, err, sizeof err);
    ck_assert_ptr_nonnull(a);
    ck_assert_ptr_nonnull(b);

    /* One leads, the other stands by and knows who leads. */
    ck_assert_int_eq(kvs_leader_step(a, err, sizeof err), 1);
    ck_assert_int_eq(kvs_leader_step(b, err, sizeof err), 0);
    ck_assert(kvs_leader_is_leader(a));
    ck_assert(!kvs_leader_is_leader(b));
    int64_t token_a = kvs_leader_token(a);
    ck_assert_int_gt(token_a, 0);
    ck_assert_int_eq(kvs_leader_token(b), 0);
    char who[64];
    kvs_leader_current(b, who, sizeof who);
    ck_assert_str_eq(who, "coord-a");

    /* The leader writes; the standby cannot. */
    ck_assert_int_eq(kvs_leader_put(a, data_key, "owner=w1", 8, 0, err, sizeof err), 0);
    ck_assert_int_eq(kvs_leader_put(b, data_key, "owner=w2", 8, 0, err, sizeof err),
                     KVS_NOT_LEADER);
    ck_assert_ptr_nonnull(strstr(err, "not the leader"));

    /* Renewals keep the leadership past the TTL. */
    for (int i = 0; i < 5; i++) {
        sleep_ms(500);
        ck_assert_int_eq(kvs_leader_step(a, err, sizeof err), 1);
        ck_assert_int_eq(kvs_leader_step(b, err, sizeof err), 0);
    }

    /* The standby runs its election thread; the leader "dies": it stops renewing. */
    ck_assert_int_eq(kvs_leader_start(b, err, sizeof err), 0);
    int64_t t0 = now_ms();
    int64_t took = -1;
    while (now_ms() - t0 < 10000) {
        if (kvs_leader_is_leader(b)) {
            took = now_ms() - t0;
            break;
        }
        sleep_ms(20);
    }
    ck_assert_msg(took >= 0, "the standby did not take over in 10 s");
    /* Within the TTL of the last renewal (plus the store's expiry tick and a step). */
    fprintf(stderr,
            "test_leader (%s): standby took over %lld ms after the leader's last "
            "renewal (TTL %d s)\n",
            kvs_store_kind(s1), (long long)took, TTL_S);
    ck_assert_int_le(took, TTL_S * 1000 + 1500);
    int64_t token_b = kvs_leader_token(b);
    ck_assert_int_gt(token_b, token_a);

    /* The old leader no longer calls itself leader (it has not renewed)... */
    ck_assert(!kvs_leader_is_leader(a));
    /* ... and its write, fenced by its old token, is refused by the store. */
    ck_assert_int_eq(kvs_leader_put(a, data_key, "owner=stale", 11, 0, err, sizeof err),
                     KVS_NOT_LEADER);
    ck_assert_ptr_nonnull(strstr(err, "stale"));
    struct kvs_store_kv kv;
    ck_assert_int_eq(kvs_store_get(s1, data_key, &kv, err, sizeof err), 0);
    ck_assert_str_eq(kv.value, "owner=w1");
    kvs_store_kv_free(&kv);
    /* The new leader writes. */
    ck_assert_int_eq(kvs_leader_put(b, data_key, "owner=w3", 8, 0, err, sizeof err), 0);
    /* A fenced txn with a compare of the caller's that fails is not a fence failure. */
    struct kvs_store_cmp cmp = {.key = data_key,
                                .target = KVS_STORE_VALUE,
                                .result = KVS_STORE_EQUAL,
                                .value = "nope",
                                .value_len = 4};
    struct kvs_store_op del = {.type = KVS_STORE_OP_DELETE, .key = data_key};
    bool ok = true;
    ck_assert_int_eq(kvs_leader_txn(b, &cmp, 1, &del, 1, &ok, NULL, err, sizeof err), 0);
    ck_assert(!ok);
    ck_assert(kvs_leader_is_leader(b));

    /* The old leader steps again: it stands by now. */
    ck_assert_int_eq(kvs_leader_step(a, err, sizeof err), 0);
    kvs_leader_current(a, who, sizeof who);
    ck_assert_str_eq(who, "coord-b");

    /* A resignation hands over without waiting for the TTL. */
    kvs_leader_destroy(&b, true);
    ck_assert_ptr_null(b);
    int64_t t1 = now_ms();
    int rc = 0;
    while (rc != 1 && now_ms() - t1 < 3000) {
        rc = kvs_leader_step(a, err, sizeof err);
        sleep_ms(20);
    }
    ck_assert_int_eq(rc, 1);
    ck_assert_int_lt(now_ms() - t1, 1000);
    ck_assert_int_gt(kvs_leader_token(a), token_b);
    ck_assert_int_eq(kvs_leader_delete(a, data_key, false, err, sizeof err), 0);
    kvs_leader_destroy(&a, true);
    kvs_leader_destroy(&a, true); /* NULL is fine */
}
END_TEST

START_TEST(test_bad_arguments)
{
    ck_assert_ptr_null(kvs_leader_new(s1, key, "x", 1, err, sizeof err));
    ck_assert_ptr_nonnull(strstr(err, "TTL"));
    ck_assert_ptr_null(kvs_leader_new(s1, "", "x", 5, err, sizeof err));
    ck_assert_ptr_null(kvs_leader_new(NULL, key, "x", 5, err, sizeof err));
}
END_TEST

/* Two threads racing for the key: exactly one wins. */
START_TEST(test_one_winner)
{
    kvs_leader *c[4];
    for (int i = 0; i < 4; i++) {
        char id[16];
        snprintf(id, sizeof id, "c%d", i);
        c[i] = kvs_leader_new(i % 2 ? s2 : s1, key, id, TTL_S, err, sizeof err);
        ck_assert_int_eq(kvs_leader_start(c[i], err, sizeof err), 0);
    }
    sleep_ms(1000);
    int leaders = 0;
    for (int i = 0; i < 4; i++) {
        leaders += kvs_leader_is_leader(c[i]);
    }
    ck_assert_int_eq(leaders, 1);
    for (int i = 0; i < 4; i++) {
        kvs_leader_destroy(&c[i], true);
    }
}
END_TEST

static int run(const char *name)
{
    Suite *su = suite_create(name);
    TCase *tc = tcase_create("election");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_failover_and_fence);
    tcase_add_test(tc, test_bad_arguments);
    tcase_add_test(tc, test_one_winner);
    tcase_set_timeout(tc, 60);
    suite_add_tcase(su, tc);
    SRunner *sr = srunner_create(su);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed;
}

int main(void)
{
    if (!etcd_rig_available()) {
        fprintf(stderr,
                "test_leader: %s is not installed (apt-get install etcd-server); "
                "skipping: elections against etcd cannot run\n",
                ETCD_RIG_BIN);
        return 77;
    }
    g_url = "mem:";
    int failed = run("leader (embedded)");
    if (etcd_rig_start(&g_etcd) < 0) {
        etcd_rig_destroy(&g_etcd);
        return 1;
    }
    g_url = g_etcd.url;
    failed += run("leader (etcd)");
    etcd_rig_destroy(&g_etcd);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
