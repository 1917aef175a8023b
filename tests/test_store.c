/* common/store: one contract, two implementations. The same tests run against the embedded
 * store (in memory and on a file) and against a real etcd 3.4 started on loopback ports;
 * then the etcd reply parser against recorded gateway replies (tests/data/etcd/, including
 * the fields the gateway leaves out), the embedded store's file, and an etcd outage.
 * Without /usr/bin/etcd the program exits 77 (skipped) and says so. */
#include "common/status.h"
#include "common/store.h"
#include "common/store_etcd.h"
#include "etcd_rig.h"
#include "testutil.h"

#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static struct etcd_rig g_etcd;
static const char *g_url; /* the store under test: "mem:", "file:..." or etcd's URL */
static char g_file_url[300];
static kvs_store *s;
static char err[512];
static char pfx[128]; /* a key prefix of this test alone (etcd outlives tests) */

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static const char *k(const char *suffix)
{
    static char buf[4][256];
    static int i;
    i = (i + 1) % 4;
    snprintf(buf[i], sizeof buf[i], "%s%s", pfx, suffix);
    return buf[i];
}

static void open_store(void)
{
    s = kvs_store_open(g_url, 2000, err, sizeof err);
    ck_assert_msg(s != NULL, "%s: %s", g_url, err);
    static int n;
    snprintf(pfx, sizeof pfx, "/t/%d-%d-%ld/", (int)getpid(), n++, (long)time(NULL));
}

static void close_store(void)
{
    kvs_store_destroy(&s);
    ck_assert_ptr_null(s);
}

/* ---- the contract ---- */

START_TEST(test_put_get_revisions)
{
    int64_t r1, r2, r3;
    ck_assert_int_eq(kvs_store_put(s, k("a"), "one", 3, 0, &r1, err, sizeof err), 0);
    struct kvs_store_kv kv;
    ck_assert_int_eq(kvs_store_get(s, k("a"), &kv, err, sizeof err), 0);
    ck_assert_str_eq(kv.key, k("a"));
    ck_assert_uint_eq(kv.value_len, 3);
    ck_assert_str_eq(kv.value, "one");
    ck_assert_int_eq(kv.create_revision, r1);
    ck_assert_int_eq(kv.mod_revision, r1);
    ck_assert_int_eq(kv.version, 1);
    ck_assert_int_eq(kv.lease, 0);
    kvs_store_kv_free(&kv);

    ck_assert_int_eq(kvs_store_put(s, k("a"), "two!", 4, 0, &r2, err, sizeof err), 0);
    ck_assert_int_gt(r2, r1);
    ck_assert_int_eq(kvs_store_get(s, k("a"), &kv, err, sizeof err), 0);
    ck_assert_str_eq(kv.value, "two!");
    ck_assert_int_eq(kv.create_revision, r1);
    ck_assert_int_eq(kv.mod_revision, r2);
    ck_assert_int_eq(kv.version, 2);
    kvs_store_kv_free(&kv);

    /* An empty value (etcd leaves "value" out) and binary bytes survive. */
    ck_assert_int_eq(kvs_store_put(s, k("empty"), NULL, 0, 0, &r3, err, sizeof err), 0);
    ck_assert_int_eq(kvs_store_get(s, k("empty"), &kv, err, sizeof err), 0);
    ck_assert_uint_eq(kv.value_len, 0);
    ck_assert_str_eq(kv.value, "");
    kvs_store_kv_free(&kv);
    const char bin[5] = {0, 1, (char)0xff, '\n', 0};
    ck_assert_int_eq(kvs_store_put(s, k("bin"), bin, 5, 0, NULL, err, sizeof err), 0);
    ck_assert_int_eq(kvs_store_get(s, k("bin"), &kv, err, sizeof err), 0);
    ck_assert_uint_eq(kv.value_len, 5);
    ck_assert_mem_eq(kv.value, bin, 5);
    kvs_store_kv_free(&kv);

    ck_assert_int_eq(kvs_store_get(s, k("absent"), &kv, err, sizeof err), KVS_NOT_FOUND);
    ck_assert_ptr_null(kv.key);
}
END_TEST

START_TEST(test_range_and_delete)
{
    const char *names[] = {"w/b", "w/a", "w/ab", "w0", "v", "w/c"};
    for (int i = 0; i < 6; i++) {
        ck_assert_int_eq(
            kvs_store_put(s, k(names[i]), names[i], strlen(names[i]), 0, NULL, err, sizeof err), 0);
    }
    struct kvs_store_range r;
    ck_assert_int_eq(kvs_store_range(s, k("w/"), true, &r, err, sizeof err), 0);
    ck_assert_uint_eq(r.n, 4); /* w/a w/ab w/b w/c, sorted; not w0, not v */
    ck_assert_str_eq(r.kvs[0].key, k("w/a"));
    ck_assert_str_eq(r.kvs[1].key, k("w/ab"));
    ck_assert_str_eq(r.kvs[2].key, k("w/b"));
    ck_assert_str_eq(r.kvs[3].key, k("w/c"));
    ck_assert_str_eq(r.kvs[3].value, "w/c");
    int64_t rev = r.revision;
    ck_assert_int_gt(rev, 1);
    kvs_store_range_free(&r);
    ck_assert_int_eq(kvs_store_range(s, k("nothing/"), true, &r, err, sizeof err), 0);
    ck_assert_uint_eq(r.n, 0); /* etcd leaves "kvs" out */
    ck_assert_int_eq(r.revision, rev);
    kvs_store_range_free(&r);

    int64_t n = -1;
    ck_assert_int_eq(kvs_store_delete(s, k("w/a"), true, &n, err, sizeof err), 0);
    ck_assert_int_eq(n, 2); /* w/a and w/ab */
    ck_assert_int_eq(kvs_store_delete(s, k("w/zzz"), false, &n, err, sizeof err), 0);
    ck_assert_int_eq(n, 0);
    ck_assert_int_eq(kvs_store_range(s, k(""), true, &r, err, sizeof err), 0);
    ck_assert_uint_eq(r.n, 4);             /* v w/b w/c w0 */
    ck_assert_int_eq(r.revision, rev + 1); /* one revision for the prefix delete, none for 0 */
    kvs_store_range_free(&r);
    ck_assert_int_eq(kvs_store_delete(s, k("w0"), false, &n, err, sizeof err), 0);
    ck_assert_int_eq(n, 1);
}
END_TEST

START_TEST(test_bad_arguments)
{
    ck_assert_int_eq(kvs_store_put(s, "", "x", 1, 0, NULL, err, sizeof err), KVS_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(err, "empty key"));
    char *big = calloc(1, KVS_STORE_MAX_VALUE + 1);
    ck_assert_int_eq(
        kvs_store_put(s, k("big"), big, KVS_STORE_MAX_VALUE + 1, 0, NULL, err, sizeof err),
        KVS_TOO_LARGE);
    free(big);
    char longkey[KVS_STORE_MAX_KEY + 2];
    memset(longkey, 'k', sizeof longkey - 1);
    longkey[sizeof longkey - 1] = '\0';
    ck_assert_int_eq(kvs_store_put(s, longkey, "x", 1, 0, NULL, err, sizeof err),
                     KVS_INVALID_ARGUMENT);
    int64_t id;
    ck_assert_int_eq(kvs_store_lease_grant(s, 0, &id, NULL, err, sizeof err), KVS_INVALID_ARGUMENT);
    ck_assert_int_eq(kvs_store_lease_keepalive(s, -3, NULL, err, sizeof err), KVS_INVALID_ARGUMENT);
    /* A put bound to a lease that does not exist. */
    ck_assert_int_eq(kvs_store_put(s, k("l"), "x", 1, 987654321, NULL, err, sizeof err),
                     KVS_NOT_FOUND);
}
END_TEST

START_TEST(test_txn_compare_and_swap)
{
    char key[256];
    snprintf(key, sizeof key, "%s", k("leader"));
    /* Create-if-absent: create_revision == 0. */
    struct kvs_store_cmp absent = {
        .key = key, .target = KVS_STORE_CREATE, .result = KVS_STORE_EQUAL, .number = 0};
    struct kvs_store_op put_a = {
        .type = KVS_STORE_OP_PUT, .key = key, .value = "A", .value_len = 1};
    struct kvs_store_op put_b = {
        .type = KVS_STORE_OP_PUT, .key = key, .value = "B", .value_len = 1};
    struct kvs_store_op mark = {
        .type = KVS_STORE_OP_PUT, .key = k("lost"), .value = "1", .value_len = 1};
    bool ok = false;
    int64_t rev1, rev2;
    ck_assert_int_eq(kvs_store_txn(s, &absent, 1, &put_a, 1, NULL, 0, &ok, &rev1, err, sizeof err),
                     0);
    ck_assert(ok);
    /* Second time the compare fails (etcd leaves "succeeded" out): the failure branch runs. */
    ck_assert_int_eq(kvs_store_txn(s, &absent, 1, &put_b, 1, &mark, 1, &ok, &rev2, err, sizeof err),
                     0);
    ck_assert(!ok);
    ck_assert_int_eq(rev2, rev1 + 1); /* the failure branch's put */
    struct kvs_store_kv kv;
    ck_assert_int_eq(kvs_store_get(s, key, &kv, err, sizeof err), 0);
    ck_assert_str_eq(kv.value, "A");
    ck_assert_int_eq(kv.create_revision, rev1);
    kvs_store_kv_free(&kv);
    ck_assert_int_eq(kvs_store_get(s, k("lost"), &kv, err, sizeof err), 0);
    kvs_store_kv_free(&kv);

    /* A fence: guarded by the create revision, a write goes through... */
    struct kvs_store_cmp fence = {
        .key = key, .target = KVS_STORE_CREATE, .result = KVS_STORE_EQUAL, .number = rev1};
    struct kvs_store_op w = {
        .type = KVS_STORE_OP_PUT, .key = k("data"), .value = "v1", .value_len = 2};
    ck_assert_int_eq(kvs_store_txn(s, &fence, 1, &w, 1, NULL, 0, &ok, NULL, err, sizeof err), 0);
    ck_assert(ok);
    /* ... and once the key is deleted and re-created, the old token is refused. */
    ck_assert_int_eq(kvs_store_delete(s, key, false, NULL, err, sizeof err), 0);
    ck_assert_int_eq(kvs_store_txn(s, &absent, 1, &put_b, 1, NULL, 0, &ok, NULL, err, sizeof err),
                     0);
    ck_assert(ok);
    int64_t before;
    struct kvs_store_range r;
    ck_assert_int_eq(kvs_store_range(s, k("data"), false, &r, err, sizeof err), 0);
    before = r.revision;
    kvs_store_range_free(&r);
    ck_assert_int_eq(kvs_store_txn(s, &fence, 1, &w, 1, NULL, 0, &ok, &rev2, err, sizeof err), 0);
    ck_assert(!ok);
    ck_assert_int_eq(rev2, before); /* nothing changed, no revision */

    /* Value and mod-revision compares, LESS / GREATER / NOT_EQUAL. */
    struct kvs_store_cmp cmps[3] = {
        {.key = key,
         .target = KVS_STORE_VALUE,
         .result = KVS_STORE_EQUAL,
         .value = "B",
         .value_len = 1},
        {.key = key, .target = KVS_STORE_MOD, .result = KVS_STORE_GREATER, .number = rev1},
        {.key = key, .target = KVS_STORE_VERSION, .result = KVS_STORE_LESS, .number = 2},
    };
    ck_assert_int_eq(kvs_store_txn(s, cmps, 3, NULL, 0, NULL, 0, &ok, NULL, err, sizeof err), 0);
    ck_assert(ok);
    cmps[0].result = KVS_STORE_NOT_EQUAL;
    ck_assert_int_eq(kvs_store_txn(s, cmps, 3, NULL, 0, NULL, 0, &ok, NULL, err, sizeof err), 0);
    ck_assert(!ok);
    /* A value compare on an absent key fails whatever the result asked. */
    struct kvs_store_cmp nv = {.key = k("nokey"),
                               .target = KVS_STORE_VALUE,
                               .result = KVS_STORE_NOT_EQUAL,
                               .value = "x",
                               .value_len = 1};
    ck_assert_int_eq(kvs_store_txn(s, &nv, 1, NULL, 0, NULL, 0, &ok, NULL, err, sizeof err), 0);
    ck_assert(!ok);

    /* Several ops in one txn are one revision; a prefix delete inside a txn. */
    struct kvs_store_op two[2] = {
        {.type = KVS_STORE_OP_PUT, .key = k("m/1"), .value = "1", .value_len = 1},
        {.type = KVS_STORE_OP_PUT, .key = k("m/2"), .value = "2", .value_len = 1},
    };
    ck_assert_int_eq(kvs_store_txn(s, NULL, 0, two, 2, NULL, 0, &ok, &rev1, err, sizeof err), 0);
    ck_assert(ok);
    ck_assert_int_eq(kvs_store_range(s, k("m/"), true, &r, err, sizeof err), 0);
    ck_assert_uint_eq(r.n, 2);
    ck_assert_int_eq(r.kvs[0].mod_revision, rev1);
    ck_assert_int_eq(r.kvs[1].mod_revision, rev1);
    kvs_store_range_free(&r);
    struct kvs_store_op del = {.type = KVS_STORE_OP_DELETE, .key = k("m/"), .prefix = true};
    ck_assert_int_eq(kvs_store_txn(s, NULL, 0, &del, 1, NULL, 0, &ok, NULL, err, sizeof err), 0);
    ck_assert_int_eq(kvs_store_range(s, k("m/"), true, &r, err, sizeof err), 0);
    ck_assert_uint_eq(r.n, 0);
    kvs_store_range_free(&r);
}
END_TEST

START_TEST(test_leases)
{
    int64_t id, ttl, got;
    ck_assert_int_eq(kvs_store_lease_grant(s, 2, &id, &ttl, err, sizeof err), 0);
    ck_assert_int_gt(id, 0);
    ck_assert_int_ge(ttl, 2);
    ck_assert_int_eq(kvs_store_put(s, k("w/1"), "alive", 5, id, NULL, err, sizeof err), 0);
    struct kvs_store_kv kv;
    ck_assert_int_eq(kvs_store_get(s, k("w/1"), &kv, err, sizeof err), 0);
    ck_assert_int_eq(kv.lease, id);
    kvs_store_kv_free(&kv);
    /* Kept alive past its TTL, the key stays. */
    for (int i = 0; i < 6; i++) {
        sleep_ms(500);
        ck_assert_int_eq(kvs_store_lease_keepalive(s, id, &got, err, sizeof err), 0);
        ck_assert_int_eq(got, ttl);
    }
    ck_assert_int_eq(kvs_store_get(s, k("w/1"), &kv, err, sizeof err), 0);
    kvs_store_kv_free(&kv);
    /* Left alone, it expires and takes its key along; keep-alive then says NOT_FOUND (etcd:
     * by leaving TTL out). */
    int rc = 0;
    for (int i = 0; i < 80 && rc == 0; i++) {
        sleep_ms(100);
        rc = kvs_store_get(s, k("w/1"), &kv, err, sizeof err);
        kvs_store_kv_free(&kv);
    }
    ck_assert_int_eq(rc, KVS_NOT_FOUND);
    ck_assert_int_eq(kvs_store_lease_keepalive(s, id, &got, err, sizeof err), KVS_NOT_FOUND);
    ck_assert_ptr_nonnull(strstr(err, "not found"));

    /* Revoke deletes at once; a second revoke is NOT_FOUND. */
    ck_assert_int_eq(kvs_store_lease_grant(s, 30, &id, NULL, err, sizeof err), 0);
    ck_assert_int_eq(kvs_store_put(s, k("w/2"), "x", 1, id, NULL, err, sizeof err), 0);
    ck_assert_int_eq(kvs_store_put(s, k("w/3"), "y", 1, id, NULL, err, sizeof err), 0);
    ck_assert_int_eq(kvs_store_lease_revoke(s, id, err, sizeof err), 0);
    struct kvs_store_range r;
    ck_assert_int_eq(kvs_store_range(s, k("w/"), true, &r, err, sizeof err), 0);
    ck_assert_uint_eq(r.n, 0);
    kvs_store_range_free(&r);
    ck_assert_int_eq(kvs_store_lease_revoke(s, id, err, sizeof err), KVS_NOT_FOUND);
}
END_TEST

static void expect_event(kvs_store_watch *w, enum kvs_store_event_type type, const char *key,
                         const char *value, int64_t rev)
{
    struct kvs_store_event ev;
    ck_assert_int_eq(kvs_store_watch_next(w, &ev, 10000), 1);
    ck_assert_int_eq(ev.type, type);
    ck_assert_str_eq(ev.kv.key, key);
    if (value != NULL) {
        ck_assert_str_eq(ev.kv.value, value);
    }
    if (rev > 0) {
        ck_assert_int_eq(ev.kv.mod_revision, rev);
    }
    kvs_store_event_free(&ev);
}

START_TEST(test_watch)
{
    kvs_store_watch *w = kvs_store_watch_new(s, k("s/"), 0, err, sizeof err);
    ck_assert_msg(w != NULL, "%s", err);
    for (int i = 0; i < 100 && !kvs_store_watch_connected(w); i++) {
        sleep_ms(20);
    }
    ck_assert(kvs_store_watch_connected(w));
    int64_t r1, r2, r3;
    ck_assert_int_eq(kvs_store_put(s, k("s/1"), "a", 1, 0, &r1, err, sizeof err), 0);
    ck_assert_int_eq(kvs_store_put(s, k("other"), "b", 1, 0, NULL, err, sizeof err), 0);
    ck_assert_int_eq(kvs_store_put(s, k("s/2"), "c", 1, 0, &r2, err, sizeof err), 0);
    ck_assert_int_eq(kvs_store_delete(s, k("s/1"), false, NULL, err, sizeof err), 0);
    struct kvs_store_range r;
    ck_assert_int_eq(kvs_store_range(s, k("s/"), true, &r, err, sizeof err), 0);
    r3 = r.revision;
    kvs_store_range_free(&r);
    expect_event(w, KVS_STORE_PUT, k("s/1"), "a", r1);
    expect_event(w, KVS_STORE_PUT, k("s/2"), "c", r2);
    expect_event(w, KVS_STORE_DELETE, k("s/1"), NULL, r3);
    struct kvs_store_event ev;
    ck_assert_int_eq(kvs_store_watch_next(w, &ev, 200), 0); /* nothing else under s/ */
    kvs_store_watch_destroy(&w);
    ck_assert_ptr_null(w);

    /* From an old revision: the history is replayed. */
    w = kvs_store_watch_new(s, k("s/"), r1, err, sizeof err);
    ck_assert_msg(w != NULL, "%s", err);
    expect_event(w, KVS_STORE_PUT, k("s/1"), "a", r1);
    expect_event(w, KVS_STORE_PUT, k("s/2"), "c", r2);
    expect_event(w, KVS_STORE_DELETE, k("s/1"), NULL, r3);
    kvs_store_watch_destroy(&w);

    /* After a compaction past r1, a watch from r1 re-lists: RESET, then what exists. */
    ck_assert_int_eq(kvs_store_compact(s, r3, err, sizeof err), 0);
    w = kvs_store_watch_new(s, k("s/"), r1, err, sizeof err);
    ck_assert_msg(w != NULL, "%s", err);
    ck_assert_int_eq(kvs_store_watch_next(w, &ev, 10000), 1);
    ck_assert_int_eq(ev.type, KVS_STORE_RESET);
    ck_assert_int_ge(ev.kv.mod_revision, r3);
    kvs_store_event_free(&ev);
    expect_event(w, KVS_STORE_PUT, k("s/2"), "c", r2);
    /* ... and then goes on live. */
    ck_assert_int_eq(kvs_store_put(s, k("s/3"), "d", 1, 0, &r1, err, sizeof err), 0);
    expect_event(w, KVS_STORE_PUT, k("s/3"), "d", r1);
    kvs_store_watch_destroy(&w);
    /* A compacted revision cannot be compacted again. */
    ck_assert_int_eq(kvs_store_compact(s, r3, err, sizeof err), KVS_OUT_OF_RANGE);

    /* A store closed under a live watch: the watch stops (UNAVAILABLE), nothing crashes. */
    kvs_store *other = kvs_store_open(strncmp(g_url, "file:", 5) == 0 ? "mem:" : g_url, 0, err,
                                      sizeof err);
    ck_assert_ptr_nonnull(other);
    w = kvs_store_watch_new(other, k("z/"), 0, err, sizeof err);
    ck_assert_msg(w != NULL, "%s", err);
    kvs_store_destroy(&other);
    ck_assert_int_eq(kvs_store_watch_next(w, &ev, 100), KVS_UNAVAILABLE);
    kvs_store_watch_destroy(&w);
}
END_TEST

START_TEST(test_watch_lease_expiry)
{
    kvs_store_watch *w = kvs_store_watch_new(s, k("w/"), 0, err, sizeof err);
    ck_assert_msg(w != NULL, "%s", err);
    int64_t id;
    ck_assert_int_eq(kvs_store_lease_grant(s, 1, &id, NULL, err, sizeof err), 0);
    ck_assert_int_eq(kvs_store_put(s, k("w/dead"), "x", 1, id, NULL, err, sizeof err), 0);
    expect_event(w, KVS_STORE_PUT, k("w/dead"), "x", 0);
    /* Nobody keeps it alive: the expiry is seen as a DELETE by watchers. */
    expect_event(w, KVS_STORE_DELETE, k("w/dead"), NULL, 0);
    kvs_store_watch_destroy(&w);
}
END_TEST

/* ---- the embedded store's file ---- */

START_TEST(test_embedded_file_reopen)
{
    char path[300], log[320];
    snprintf(path, sizeof path, "%s", g_file_url + 5);
    snprintf(log, sizeof log, "%s.log", path);
    unlink(path);
    unlink(log);
    kvs_store *f = kvs_store_open(g_file_url, 0, err, sizeof err);
    ck_assert_msg(f != NULL, "%s", err);
    ck_assert_str_eq(kvs_store_kind(f), "embedded");
    int64_t rev, id;
    ck_assert_int_eq(kvs_store_put(f, "/k/1", "v1", 2, 0, NULL, err, sizeof err), 0);
    ck_assert_int_eq(kvs_store_lease_grant(f, 3, &id, NULL, err, sizeof err), 0);
    ck_assert_int_eq(kvs_store_put(f, "/k/2", "\0\1", 2, id, &rev, err, sizeof err), 0);
    kvs_store_destroy(&f);

    f = kvs_store_open(g_file_url, 0, err, sizeof err);
    ck_assert_msg(f != NULL, "%s", err);
    struct kvs_store_range r;
    ck_assert_int_eq(kvs_store_range(f, "/k/", true, &r, err, sizeof err), 0);
    ck_assert_uint_eq(r.n, 2);
    ck_assert_int_eq(r.revision, rev);
    ck_assert_mem_eq(r.kvs[1].value, "\0\1", 2);
    ck_assert_int_eq(r.kvs[1].lease, id);
    kvs_store_range_free(&r);
    /* The lease came back (full TTL) and expires on its own. */
    ck_assert_int_eq(kvs_store_lease_keepalive(f, id, NULL, err, sizeof err), 0);
    /* New leases do not reuse the id. */
    int64_t id2;
    ck_assert_int_eq(kvs_store_lease_grant(f, 3, &id2, NULL, err, sizeof err), 0);
    ck_assert_int_ne(id2, id);
    /* A watch from before the reopen re-lists. */
    kvs_store_watch *w = kvs_store_watch_new(f, "/k/", rev - 1, err, sizeof err);
    struct kvs_store_event ev;
    ck_assert_int_eq(kvs_store_watch_next(w, &ev, 1000), 1);
    ck_assert_int_eq(ev.type, KVS_STORE_RESET);
    kvs_store_event_free(&ev);
    kvs_store_watch_destroy(&w);
    int rc = 0;
    for (int i = 0; i < 60 && rc == 0; i++) {
        sleep_ms(100);
        struct kvs_store_kv kv;
        rc = kvs_store_get(f, "/k/2", &kv, err, sizeof err);
        kvs_store_kv_free(&kv);
    }
    ck_assert_int_eq(rc, KVS_NOT_FOUND);
    kvs_store_destroy(&f);

    /* The expiry was persisted too. */
    f = kvs_store_open(g_file_url, 0, err, sizeof err);
    ck_assert_int_eq(kvs_store_range(f, "/k/", true, &r, err, sizeof err), 0);
    ck_assert_uint_eq(r.n, 1);
    kvs_store_range_free(&r);
    kvs_store_destroy(&f);

    /* A damaged file is refused with a reason, never half-loaded. */
    FILE *fp = fopen(path, "w");
    fputs("{\"format\":\"kvstream-store-1\",\"revision\":3,", fp);
    fclose(fp);
    f = kvs_store_open(g_file_url, 0, err, sizeof err);
    ck_assert_ptr_null(f);
    ck_assert_ptr_nonnull(strstr(err, path));
    fp = fopen(path, "w");
    fputs("{\"format\":\"kvstream-store-1\",\"log_seq\":0,\"revision\":3,\"next_lease\":1,"
          "\"leases\":[],"
          "\"kvs\":[{\"key\":\"/a\",\"value\":\"!!\",\"create_revision\":2,"
          "\"mod_revision\":2,\"version\":1,\"lease\":0}]}",
          fp);
    fclose(fp);
    f = kvs_store_open(g_file_url, 0, err, sizeof err);
    ck_assert_ptr_null(f);
    ck_assert_ptr_nonnull(strstr(err, "bad key record 0"));
    unlink(path);
    unlink(log);
}
END_TEST

START_TEST(test_embedded_write_failure_changes_nothing)
{
    char dir[] = "/tmp/kvs-store-ro-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    char url[300], log[320];
    snprintf(url, sizeof url, "file:%s/state.json", dir);
    snprintf(log, sizeof log, "%s/state.json.log", dir);
    kvs_store *f = kvs_store_open(url, 0, err, sizeof err);
    ck_assert_int_eq(kvs_store_put(f, "/a", "1", 1, 0, NULL, err, sizeof err), 0);
    /* No byte more fits in any file (root ignores modes, not RLIMIT_FSIZE). */
    struct stat st;
    ck_assert_int_eq(stat(log, &st), 0);
    struct rlimit old, lim;
    getrlimit(RLIMIT_FSIZE, &old);
    lim = old;
    lim.rlim_cur = (rlim_t)st.st_size;
    signal(SIGXFSZ, SIG_IGN);
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &lim), 0);
    ck_assert_int_eq(kvs_store_put(f, "/a", "2", 1, 0, NULL, err, sizeof err), KVS_IO);
    ck_assert_ptr_nonnull(strstr(err, "cannot write"));
    ck_assert_int_eq(kvs_store_delete(f, "/a", false, NULL, err, sizeof err), KVS_IO);
    int64_t id;
    ck_assert_int_eq(kvs_store_lease_grant(f, 5, &id, NULL, err, sizeof err), KVS_IO);
    struct kvs_store_kv kv;
    ck_assert_int_eq(kvs_store_get(f, "/a", &kv, err, sizeof err), 0);
    ck_assert_str_eq(kv.value, "1");
    ck_assert_int_eq(kv.version, 1);
    kvs_store_kv_free(&kv);
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &old), 0);
    /* The log holds no trace of the failed records: a reopen sees the same state. */
    ck_assert_int_eq(kvs_store_put(f, "/b", "3", 1, 0, NULL, err, sizeof err), 0);
    kvs_store_destroy(&f);
    f = kvs_store_open(url, 0, err, sizeof err);
    ck_assert_msg(f != NULL, "%s", err);
    ck_assert_int_eq(kvs_store_get(f, "/a", &kv, err, sizeof err), 0);
    ck_assert_str_eq(kv.value, "1");
    kvs_store_kv_free(&kv);
    kvs_store_destroy(&f);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}
END_TEST

static void append_file(const char *path, const char *text)
{
    FILE *fp = fopen(path, "a");
    ck_assert_ptr_nonnull(fp);
    fputs(text, fp);
    fclose(fp);
}

static off_t file_size(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? st.st_size : -1;
}

/* The log: one record per change, a snapshot when it outgrows the last one, a torn last
 * record cut off, damage refused, records already in the snapshot skipped. */
START_TEST(test_embedded_log)
{
    char dir[] = "/tmp/kvs-store-log-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    char url[320], path[300], log[320], saved[320], cmd[2048];
    snprintf(path, sizeof path, "%s/state.json", dir);
    snprintf(url, sizeof url, "file:%s", path);
    snprintf(log, sizeof log, "%s.log", path);
    snprintf(saved, sizeof saved, "%s/saved.log", dir);
    kvs_store *f = kvs_store_open(url, 0, err, sizeof err);
    ck_assert_int_eq(kvs_store_put(f, "/a", "old", 3, 0, NULL, err, sizeof err), 0);
    ck_assert_int_eq(file_size(path), -1); /* only a log so far */
    kvs_store_destroy(&f);
    snprintf(cmd, sizeof cmd, "cp '%s' '%s'", log, saved);
    ck_assert_int_eq(system(cmd), 0);

    /* 400 records of ~300 bytes: the log passes 64 KiB and a snapshot takes over. */
    f = kvs_store_open(url, 0, err, sizeof err);
    char value[200];
    memset(value, 'v', sizeof value);
    char key[32];
    int64_t rev = 0;
    ck_assert_int_eq(kvs_store_put(f, "/a", "new", 3, 0, NULL, err, sizeof err), 0);
    for (int i = 0; i < 400; i++) {
        snprintf(key, sizeof key, "/k/%03d", i);
        ck_assert_int_eq(kvs_store_put(f, key, value, sizeof value, 0, &rev, err, sizeof err), 0);
    }
    ck_assert_int_gt(file_size(path), 64 << 10);
    ck_assert_int_lt(file_size(log), 64 << 10);
    kvs_store_destroy(&f);

    /* A crash between the snapshot's rename and the log's truncation leaves old records
     * ahead of the new ones: they are skipped (else "/a" would go back to "old"). */
    snprintf(cmd, sizeof cmd, "cat '%s' '%s' > '%s.new' && mv '%s.new' '%s'", saved, log, log, log,
             log);
    ck_assert_int_eq(system(cmd), 0);
    f = kvs_store_open(url, 0, err, sizeof err);
    ck_assert_msg(f != NULL, "%s", err);
    struct kvs_store_kv kv;
    ck_assert_int_eq(kvs_store_get(f, "/a", &kv, err, sizeof err), 0);
    ck_assert_str_eq(kv.value, "new");
    kvs_store_kv_free(&kv);
    struct kvs_store_range r;
    ck_assert_int_eq(kvs_store_range(f, "/k/", true, &r, err, sizeof err), 0);
    ck_assert_uint_eq(r.n, 400);
    ck_assert_int_eq(r.revision, rev);
    kvs_store_range_free(&r);
    ck_assert_int_eq(kvs_store_delete(f, "/k/1", true, NULL, err, sizeof err), 0);
    kvs_store_destroy(&f);

    /* A torn last record (a write that never finished, never acknowledged) is cut off. */
    off_t good = file_size(log);
    append_file(log, "{\"rev\":99,\"put\":[{\"key\":\"/to");
    f = kvs_store_open(url, 0, err, sizeof err);
    ck_assert_msg(f != NULL, "%s", err);
    ck_assert_int_eq(file_size(log), good);
    ck_assert_int_eq(kvs_store_range(f, "/k/", true, &r, err, sizeof err), 0);
    ck_assert_uint_eq(r.n, 300); /* the prefix delete was replayed */
    kvs_store_range_free(&r);
    kvs_store_destroy(&f);

    /* Damage inside the log is refused, with the line. */
    append_file(log, "not json\n");
    ck_assert_ptr_null(kvs_store_open(url, 0, err, sizeof err));
    ck_assert_ptr_nonnull(strstr(err, "damaged record at line"));
    ck_assert_int_eq(truncate(log, good), 0);
    append_file(log, "{\"seq\":1,\"rev\":1,\"next_lease\":1}\n"); /* seq going back */
    ck_assert_ptr_null(kvs_store_open(url, 0, err, sizeof err));
    ck_assert_int_eq(truncate(log, good), 0);
    f = kvs_store_open(url, 0, err, sizeof err);
    ck_assert_msg(f != NULL, "%s", err);
    kvs_store_destroy(&f);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}
END_TEST

START_TEST(test_open_errors)
{
    ck_assert_ptr_null(kvs_store_open("ftp://x", 0, err, sizeof err));
    ck_assert_ptr_nonnull(strstr(err, "not file:PATH"));
    ck_assert_ptr_null(kvs_store_open("file:", 0, err, sizeof err));
    ck_assert_ptr_null(kvs_store_open("http://a:1,gopher://b", 0, err, sizeof err));
    ck_assert_ptr_nonnull(strstr(err, "bad endpoint"));
    kvs_store_destroy(NULL);
}
END_TEST

/* ---- etcd's gateway, recorded ---- */

static json_t *recorded(const char *name)
{
    char path[512];
    snprintf(path, sizeof path, "%s/tests/data/etcd/%s", kvs_test_source_dir(), name);
    json_error_t jerr;
    json_t *j = json_load_file(path, JSON_DISABLE_EOF_CHECK, &jerr);
    ck_assert_msg(j != NULL, "%s: %s", path, jerr.text);
    return j;
}

START_TEST(test_parse_recorded)
{
    struct kvs_store_range r;
    json_t *j = recorded("range_empty.json"); /* no "kvs" */
    ck_assert_int_eq(kvs_etcd_parse_range(j, &r), 0);
    ck_assert_uint_eq(r.n, 0);
    ck_assert_int_eq(r.revision, 9);
    kvs_store_range_free(&r);
    json_decref(j);

    j = recorded("range_two.json"); /* the second key's empty value is left out */
    ck_assert_int_eq(kvs_etcd_parse_range(j, &r), 0);
    ck_assert_uint_eq(r.n, 2);
    ck_assert_str_eq(r.kvs[0].key, "/a/1");
    ck_assert_str_eq(r.kvs[0].value, "hello");
    ck_assert_int_eq(r.kvs[0].create_revision, 2);
    ck_assert_int_eq(r.kvs[0].mod_revision, 11);
    ck_assert_int_eq(r.kvs[0].version, 2);
    ck_assert_str_eq(r.kvs[1].key, "/a/2");
    ck_assert_uint_eq(r.kvs[1].value_len, 0);
    ck_assert_int_eq(r.kvs[1].lease, 0);
    kvs_store_range_free(&r);
    json_decref(j);

    bool ok = true;
    int64_t rev, n, id, ttl;
    j = recorded("txn_failed.json"); /* no "succeeded" */
    ck_assert_int_eq(kvs_etcd_parse_txn(j, &ok, &rev), 0);
    ck_assert(!ok);
    json_decref(j);
    j = recorded("txn_succeeded.json");
    ck_assert_int_eq(kvs_etcd_parse_txn(j, &ok, &rev), 0);
    ck_assert(ok);
    ck_assert_int_eq(rev, 12);
    json_decref(j);

    j = recorded("deleterange_none.json"); /* no "deleted" */
    ck_assert_int_eq(kvs_etcd_parse_delete(j, &n, &rev), 0);
    ck_assert_int_eq(n, 0);
    json_decref(j);
    j = recorded("deleterange_one.json");
    ck_assert_int_eq(kvs_etcd_parse_delete(j, &n, &rev), 0);
    ck_assert_int_eq(n, 1);
    ck_assert_int_eq(rev, 13);
    json_decref(j);

    j = recorded("lease_grant.json");
    ck_assert_int_eq(kvs_etcd_parse_lease_grant(j, &id, &ttl), 0);
    ck_assert_int_eq(id, 2324035714762261541LL); /* int64 as a string, exact */
    ck_assert_int_eq(ttl, 2);                    /* asked 1: etcd's minimum */
    json_decref(j);
    j = recorded("lease_keepalive.json");
    ck_assert_int_eq(kvs_etcd_parse_keepalive(j, &ttl), 0);
    ck_assert_int_eq(ttl, 2);
    json_decref(j);
    j = recorded("lease_keepalive_expired.json"); /* no "TTL": the lease is lost */
    ck_assert_int_eq(kvs_etcd_parse_keepalive(j, &ttl), KVS_NOT_FOUND);
    json_decref(j);

    char e[256];
    j = recorded("lease_revoke_not_found.json");
    ck_assert_int_eq(kvs_etcd_parse_error(404, j, e, sizeof e), KVS_NOT_FOUND);
    ck_assert_ptr_nonnull(strstr(e, "requested lease not found"));
    json_decref(j);
    j = recorded("put_nospace.json");
    ck_assert_int_eq(kvs_etcd_parse_error(429, j, e, sizeof e), KVS_UNAVAILABLE);
    ck_assert_ptr_nonnull(strstr(e, "NOSPACE"));
    ck_assert_ptr_nonnull(strstr(e, "database space exceeded"));
    json_decref(j);
    j = recorded("error_bad_base64.json");
    ck_assert_int_eq(kvs_etcd_parse_error(400, j, e, sizeof e), KVS_INVALID_ARGUMENT);
    json_decref(j);
    ck_assert_int_eq(kvs_etcd_parse_error(502, NULL, e, sizeof e), KVS_UNAVAILABLE);
}
END_TEST

/* Feed a recorded stream (one JSON message per line) through the watch parser. */
START_TEST(test_parse_recorded_watch)
{
    char path[512];
    snprintf(path, sizeof path, "%s/tests/data/etcd/watch_events.txt", kvs_test_source_dir());
    size_t len;
    char *text = kvs_test_read_file(path, &len);
    ck_assert_ptr_nonnull(text);
    char *save = NULL;
    struct kvs_etcd_watch_msg m;
    char e[256];
    int line = 0;
    for (char *l = strtok_r(text, "\n", &save); l != NULL; l = strtok_r(NULL, "\n", &save)) {
        json_t *j = json_loads(l, 0, NULL);
        ck_assert_ptr_nonnull(j);
        ck_assert_int_eq(kvs_etcd_parse_watch(j, &m, e, sizeof e), 0);
        if (line == 0) {
            ck_assert(m.created);
            ck_assert_uint_eq(m.n_events, 0);
        } else if (line == 1) { /* a PUT has no "type" */
            ck_assert_uint_eq(m.n_events, 1);
            ck_assert_int_eq(m.events[0].type, KVS_STORE_PUT);
            ck_assert_str_eq(m.events[0].kv.key, "/w/9");
            ck_assert_str_eq(m.events[0].kv.value, "nine");
            ck_assert_int_eq(m.events[0].kv.mod_revision, 14);
        } else {
            ck_assert_int_eq(m.events[0].type, KVS_STORE_DELETE);
            ck_assert_int_eq(m.events[0].kv.mod_revision, 15);
            ck_assert_uint_eq(m.events[0].kv.value_len, 0);
        }
        kvs_etcd_watch_msg_free(&m);
        json_decref(j);
        line++;
    }
    ck_assert_int_eq(line, 3);
    free(text);

    json_t *j = recorded("watch_compacted.txt"); /* first line: created; read the second */
    json_decref(j);
    snprintf(path, sizeof path, "%s/tests/data/etcd/watch_compacted.txt", kvs_test_source_dir());
    text = kvs_test_read_file(path, &len);
    char *second = strchr(text, '\n') + 1;
    j = json_loads(second, JSON_DISABLE_EOF_CHECK, NULL);
    ck_assert_int_eq(kvs_etcd_parse_watch(j, &m, e, sizeof e), 0);
    ck_assert(m.canceled);
    ck_assert_int_eq(m.compact_revision, 13);
    ck_assert_int_eq(m.revision, 0); /* header without revision */
    kvs_etcd_watch_msg_free(&m);
    json_decref(j);
    free(text);
}
END_TEST

/* Hostile or wrong-shaped replies are refused, never trusted. */
START_TEST(test_parse_malformed)
{
    const char *bad_ranges[] = {
        "{}",                                                   /* no header */
        "{\"header\":{\"revision\":\"12x\"}}",                  /* not a number */
        "{\"header\":{\"revision\":\"99999999999999999999\"}}", /* over int64 */
        "{\"header\":{\"revision\":true}}",
        "{\"header\":{},\"kvs\":{}}",                     /* not an array */
        "{\"header\":{},\"kvs\":[{\"value\":\"aGk=\"}]}", /* no key */
        "{\"header\":{},\"kvs\":[{\"key\":\"not base64!\"}]}",
        "{\"header\":{},\"kvs\":[{\"key\":\"L2E=\",\"value\":\"aGk\"}]}", /* unpadded */
        "{\"header\":{},\"kvs\":[{\"key\":\"AGE=\"}]}",                   /* NUL in the key */
        "{\"header\":{},\"kvs\":[{\"key\":\"\"}]}",                       /* empty key */
        "{\"header\":{},\"kvs\":[{\"key\":\"L2E=\",\"version\":[]}]}",
    };
    for (size_t i = 0; i < sizeof bad_ranges / sizeof *bad_ranges; i++) {
        json_t *j = json_loads(bad_ranges[i], 0, NULL);
        ck_assert_ptr_nonnull(j);
        struct kvs_store_range r;
        ck_assert_msg(kvs_etcd_parse_range(j, &r) == KVS_BAD_FORMAT, "%s", bad_ranges[i]);
        kvs_store_range_free(&r);
        json_decref(j);
    }
    json_t *j = json_loads("{\"header\":{},\"succeeded\":\"yes\"}", 0, NULL);
    bool ok;
    int64_t rev, id, ttl;
    ck_assert_int_eq(kvs_etcd_parse_txn(j, &ok, &rev), KVS_BAD_FORMAT);
    json_decref(j);
    j = json_loads("{\"header\":{},\"ID\":\"-5\",\"TTL\":\"2\"}", 0, NULL);
    ck_assert_int_eq(kvs_etcd_parse_lease_grant(j, &id, &ttl), KVS_BAD_FORMAT);
    json_decref(j);
    j = json_loads("{\"header\":{}}", 0, NULL); /* keep-alive without "result" */
    ck_assert_int_eq(kvs_etcd_parse_keepalive(j, &ttl), KVS_BAD_FORMAT);
    json_decref(j);
    struct kvs_etcd_watch_msg m;
    char e[128];
    j = json_loads("{\"result\":{\"events\":[{\"type\":\"EXPLODE\",\"kv\":{\"key\":\"L2E=\"}}]}}",
                   0, NULL);
    ck_assert_int_eq(kvs_etcd_parse_watch(j, &m, e, sizeof e), KVS_BAD_FORMAT);
    kvs_etcd_watch_msg_free(&m);
    json_decref(j);
    j = json_loads("{\"error\":{\"grpc_code\":14,\"message\":\"etcdserver: no leader\"}}", 0, NULL);
    ck_assert_int_eq(kvs_etcd_parse_watch(j, &m, e, sizeof e), KVS_UNAVAILABLE);
    ck_assert_ptr_nonnull(strstr(e, "no leader"));
    kvs_etcd_watch_msg_free(&m);
    json_decref(j);
}
END_TEST

/* ---- etcd outage ---- */

START_TEST(test_etcd_outage)
{
    int64_t id;
    ck_assert_int_eq(kvs_store_put(s, k("before"), "1", 1, 0, NULL, err, sizeof err), 0);
    ck_assert_int_eq(kvs_store_lease_grant(s, 5, &id, NULL, err, sizeof err), 0);
    kvs_store_watch *w = kvs_store_watch_new(s, k("o/"), 0, err, sizeof err);
    ck_assert_msg(w != NULL, "%s", err);
    for (int i = 0; i < 100 && !kvs_store_watch_connected(w); i++) {
        sleep_ms(20);
    }

    /* A hung etcd (SIGSTOP): every call ends at its deadline with a clear error. */
    kvs_store *quick = kvs_store_open(g_etcd.url, 300, err, sizeof err);
    ck_assert_ptr_nonnull(quick);
    ck_assert_int_eq(kill(g_etcd.pid, SIGSTOP), 0);
    struct timespec h0, h1;
    clock_gettime(CLOCK_MONOTONIC, &h0);
    /* (Outside the test's prefix: the put may still be applied once etcd resumes.) */
    ck_assert_int_eq(kvs_store_put(quick, "/hung", "x", 1, 0, NULL, err, sizeof err),
                     KVS_UNAVAILABLE);
    clock_gettime(CLOCK_MONOTONIC, &h1);
    ck_assert_int_eq(kill(g_etcd.pid, SIGCONT), 0);
    double waited = (double)(h1.tv_sec - h0.tv_sec) + (h1.tv_nsec - h0.tv_nsec) * 1e-9;
    ck_assert_msg(waited >= 0.25 && waited < 1.5, "waited %.2f s for a 0.3 s deadline", waited);
    ck_assert_msg(strstr(err, "etcd unavailable") != NULL && strstr(err, "imeout") != NULL, "%s",
                  err);
    kvs_store_destroy(&quick);

    etcd_rig_stop(&g_etcd);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    ck_assert_int_eq(kvs_store_put(s, k("during"), "2", 1, 0, NULL, err, sizeof err),
                     KVS_UNAVAILABLE);
    ck_assert_ptr_nonnull(strstr(err, "etcd unavailable"));
    struct kvs_store_range r;
    ck_assert_int_eq(kvs_store_range(s, k(""), true, &r, err, sizeof err), KVS_UNAVAILABLE);
    ck_assert_int_eq(kvs_store_lease_keepalive(s, id, NULL, err, sizeof err), KVS_UNAVAILABLE);
    /* A new watch "from now" cannot pin "now": refused with the reason. */
    ck_assert_ptr_null(kvs_store_watch_new(s, k("o/"), 0, err, sizeof err));
    ck_assert_ptr_nonnull(strstr(err, "etcd unavailable"));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    /* Failing is quick (connection refused), and bounded by the timeout in any case. */
    ck_assert_int_lt(t1.tv_sec - t0.tv_sec, 7);
    for (int i = 0; i < 100 && kvs_store_watch_connected(w); i++) {
        sleep_ms(20);
    }
    ck_assert(!kvs_store_watch_connected(w));

    ck_assert_int_eq(etcd_rig_start(&g_etcd), 0);
    ck_assert_int_eq(kvs_store_put(s, k("after"), "3", 1, 0, NULL, err, sizeof err), 0);
    ck_assert_int_eq(kvs_store_range(s, k(""), true, &r, err, sizeof err), 0);
    ck_assert_uint_eq(r.n, 2); /* before, after */
    kvs_store_range_free(&r);
    /* The lease survived the outage (etcd gives it its full TTL again). */
    ck_assert_int_eq(kvs_store_lease_keepalive(s, id, NULL, err, sizeof err), 0);
    /* The watch reconnected by itself and sees new changes. */
    int64_t rev;
    ck_assert_int_eq(kvs_store_put(s, k("o/x"), "4", 1, 0, &rev, err, sizeof err), 0);
    expect_event(w, KVS_STORE_PUT, k("o/x"), "4", rev);
    ck_assert(kvs_store_watch_connected(w));
    kvs_store_watch_destroy(&w);
}
END_TEST

/* Several endpoints: one that refuses connections is skipped, the call goes to the next. */
START_TEST(test_etcd_endpoints)
{
    int dead = etcd_rig_free_port();
    char urls[256];
    snprintf(urls, sizeof urls, "http://127.0.0.1:%d,%s", dead, g_etcd.url);
    kvs_store *m = kvs_store_open(urls, 500, err, sizeof err);
    ck_assert_msg(m != NULL, "%s", err);
    int64_t rev;
    ck_assert_int_eq(kvs_store_put(m, k("multi"), "1", 1, 0, &rev, err, sizeof err), 0);
    struct kvs_store_kv kv;
    ck_assert_int_eq(kvs_store_get(m, k("multi"), &kv, err, sizeof err), 0);
    ck_assert_int_eq(kv.mod_revision, rev);
    kvs_store_kv_free(&kv);
    kvs_store_destroy(&m);
    /* Only dead endpoints: UNAVAILABLE naming them. */
    snprintf(urls, sizeof urls, "http://127.0.0.1:%d,http://127.0.0.1:%d", dead, dead);
    m = kvs_store_open(urls, 500, err, sizeof err);
    ck_assert_int_eq(kvs_store_put(m, k("multi"), "1", 1, 0, NULL, err, sizeof err),
                     KVS_UNAVAILABLE);
    ck_assert_ptr_nonnull(strstr(err, "every other endpoint"));
    kvs_store_destroy(&m);
}
END_TEST

/* The outage test restarts etcd in its own (forked) process: stop that one at the end. */
static void close_store_and_etcd(void)
{
    close_store();
    etcd_rig_stop(&g_etcd);
}

/* ---- suites ---- */

static void add_contract(TCase *tc)
{
    tcase_add_checked_fixture(tc, open_store, close_store);
    tcase_add_test(tc, test_put_get_revisions);
    tcase_add_test(tc, test_range_and_delete);
    tcase_add_test(tc, test_bad_arguments);
    tcase_add_test(tc, test_txn_compare_and_swap);
    tcase_add_test(tc, test_leases);
    tcase_add_test(tc, test_watch);
    tcase_add_test(tc, test_watch_lease_expiry);
    tcase_set_timeout(tc, 60);
}

static Suite *store_suite(void)
{
    Suite *su = suite_create("store");
    TCase *tc = tcase_create("parse");
    tcase_add_test(tc, test_parse_recorded);
    tcase_add_test(tc, test_parse_recorded_watch);
    tcase_add_test(tc, test_parse_malformed);
    tcase_add_test(tc, test_open_errors);
    suite_add_tcase(su, tc);
    tc = tcase_create("embedded_file");
    tcase_add_test(tc, test_embedded_file_reopen);
    tcase_add_test(tc, test_embedded_write_failure_changes_nothing);
    tcase_add_test(tc, test_embedded_log);
    suite_add_tcase(su, tc);
    return su;
}

static int run(Suite *su)
{
    SRunner *sr = srunner_create(su);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed;
}

static Suite *contract_suite(const char *name)
{
    Suite *su = suite_create(name);
    TCase *tc = tcase_create("contract");
    add_contract(tc);
    suite_add_tcase(su, tc);
    return su;
}

int main(void)
{
    if (!etcd_rig_available()) {
        fprintf(stderr,
                "test_store: %s is not installed (apt-get install etcd-server); "
                "skipping: the etcd half of the contract cannot run\n",
                ETCD_RIG_BIN);
        return 77;
    }
    snprintf(g_file_url, sizeof g_file_url, "file:/tmp/kvs-store-%d.json", (int)getpid());
    int failed = run(store_suite());
    g_url = "mem:";
    failed += run(contract_suite("embedded (mem:)"));
    g_url = g_file_url;
    failed += run(contract_suite("embedded (file:)"));
    unlink(g_file_url + 5);
    char log[320];
    snprintf(log, sizeof log, "%s.log", g_file_url + 5);
    unlink(log);

    if (etcd_rig_start(&g_etcd) < 0) {
        etcd_rig_destroy(&g_etcd);
        fprintf(stderr, "test_store: could not start etcd\n");
        return 1;
    }
    g_url = g_etcd.url;
    Suite *su = contract_suite("etcd");
    TCase *tc = tcase_create("endpoints");
    tcase_add_checked_fixture(tc, open_store, close_store);
    tcase_add_test(tc, test_etcd_endpoints);
    suite_add_tcase(su, tc);
    tc = tcase_create("outage");
    tcase_add_checked_fixture(tc, open_store, close_store_and_etcd);
    tcase_add_test(tc, test_etcd_outage);
    tcase_set_timeout(tc, 60);
    suite_add_tcase(su, tc);
    failed += run(su);
    etcd_rig_destroy(&g_etcd);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
