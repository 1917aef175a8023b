/* worker/flashcache: the I/O thread's copy of the published flash answers and versions, and
 * the watchers: fresh vs stale answers, resume from a version, one push per answer version,
 * watchers dropped when a push cannot be delivered, limits, session close. Replies are
 * captured by the send callback and decoded with msgpack-c. */
#include "common/status.h"
#include "worker/flashcache.h"

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SENT 256

struct sent {
    char peer[16];
    char *data;           /* a copy of the reply (msgpack-c's strings point into it) */
    msgpack_unpacked msg; /* the reply map */
};

static struct sent sent[MAX_SENT];
static int n_sent;
static int n_unstored;          /* delivered past MAX_SENT (counted, not kept) */
static const char *refuse_peer; /* sends to this peer fail (gone or full) */

static bool capture(const void *ident, size_t ident_len, const void *data, size_t len, void *user)
{
    (void)user;
    char peer[16];
    snprintf(peer, sizeof peer, "%.*s", (int)ident_len, (const char *)ident);
    if (refuse_peer != NULL && strcmp(peer, refuse_peer) == 0) {
        return false;
    }
    if (n_sent == MAX_SENT) {
        n_unstored++;
        return true;
    }
    struct sent *s = &sent[n_sent++];
    snprintf(s->peer, sizeof s->peer, "%s", peer);
    s->data = malloc(len);
    ck_assert_ptr_nonnull(s->data);
    memcpy(s->data, data, len);
    msgpack_unpacked_init(&s->msg);
    size_t off = 0;
    ck_assert_int_eq(msgpack_unpack_next(&s->msg, s->data, len, &off), MSGPACK_UNPACK_SUCCESS);
    ck_assert_uint_eq(off, len);
    ck_assert_int_eq(s->msg.data.type, MSGPACK_OBJECT_MAP);
    return true;
}

static void reset_sent(void)
{
    for (int i = 0; i < n_sent; i++) {
        msgpack_unpacked_destroy(&sent[i].msg);
        free(sent[i].data);
    }
    n_sent = 0;
    n_unstored = 0;
    refuse_peer = NULL;
}

static const msgpack_object *field(int i, const char *key)
{
    const msgpack_object_map *m = &sent[i].msg.data.via.map;
    for (uint32_t k = 0; k < m->size; k++) {
        const msgpack_object *ko = &m->ptr[k].key;
        if (ko->type == MSGPACK_OBJECT_STR && ko->via.str.size == strlen(key) &&
            memcmp(ko->via.str.ptr, key, ko->via.str.size) == 0) {
            return &m->ptr[k].val;
        }
    }
    return NULL;
}

static uint64_t field_u(int i, const char *key)
{
    const msgpack_object *o = field(i, key);
    ck_assert_ptr_nonnull(o);
    ck_assert_int_eq(o->type, MSGPACK_OBJECT_POSITIVE_INTEGER);
    return o->via.u64;
}

static bool field_b(int i, const char *key)
{
    const msgpack_object *o = field(i, key);
    ck_assert_ptr_nonnull(o);
    ck_assert_int_eq(o->type, MSGPACK_OBJECT_BOOLEAN);
    return o->via.boolean;
}

static void field_s(int i, const char *key, const char *want)
{
    const msgpack_object *o = field(i, key);
    ck_assert_ptr_nonnull(o);
    ck_assert_int_eq(o->type, MSGPACK_OBJECT_STR);
    ck_assert_int_eq((int)o->via.str.size, (int)strlen(want));
    ck_assert(memcmp(o->via.str.ptr, want, o->via.str.size) == 0);
}

/* The error code of sent[i] ("" when it is not an error). */
static const char *error_code(int i)
{
    static char buf[32];
    const msgpack_object *e = field(i, "error");
    buf[0] = '\0';
    for (uint32_t k = 0; e != NULL && e->type == MSGPACK_OBJECT_MAP && k < e->via.map.size; k++) {
        const msgpack_object *ko = &e->via.map.ptr[k].key, *v = &e->via.map.ptr[k].val;
        if (ko->type == MSGPACK_OBJECT_STR && ko->via.str.size == 4 &&
            memcmp(ko->via.str.ptr, "code", 4) == 0 && v->type == MSGPACK_OBJECT_STR &&
            v->via.str.size < sizeof buf) {
            memcpy(buf, v->via.str.ptr, v->via.str.size);
            buf[v->via.str.size] = '\0';
        }
    }
    return buf;
}

/* Publish an answer of name at version whose body is {"answer": text, "version": version}. */
static void publish(kvs_flashcache *c, const char *session, const char *name, uint64_t version,
                    const char *text)
{
    kvs_wire_buf b;
    kvs_wire_buf_init(&b);
    kvs_wire_pack_cstr(&b.pk, "answer"), kvs_wire_pack_cstr(&b.pk, text);
    kvs_wire_pack_cstr(&b.pk, "version"), msgpack_pack_uint64(&b.pk, version);
    ck_assert_int_eq(kvs_flashcache_answer(c, session, name, version, b.sb.data, b.sb.size, 2), 0);
    kvs_wire_buf_destroy(&b);
}

static kvs_flashcache *fc;

static void setup(void)
{
    fc = kvs_flashcache_new(capture, NULL);
    ck_assert_ptr_nonnull(fc);
}

static void teardown(void)
{
    kvs_flashcache_destroy(&fc);
    ck_assert_ptr_null(fc);
    kvs_flashcache_destroy(&fc); /* accepts NULL */
    reset_sent();
}

START_TEST(test_get_fresh_and_stale)
{
    kvs_wire_buf out;
    kvs_wire_buf_init(&out);
    ck_assert(!kvs_flashcache_get(fc, "s", "last", true, 1, &out)); /* unknown session */
    kvs_flashcache_version(fc, "s", 1);
    ck_assert(!kvs_flashcache_get(fc, "s", "last", true, 1, &out)); /* no answer yet */
    publish(fc, "s", "last", 1, "189.2");
    ck_assert(kvs_flashcache_get(fc, "s", "last", false, 7, &out));
    ck_assert(capture("p", 1, out.sb.data, out.sb.size, NULL));
    ck_assert_uint_eq(field_u(0, "id"), 7);
    ck_assert(field_b(0, "fresh"));
    field_s(0, "answer", "189.2");
    ck_assert_uint_eq(kvs_flashcache_hits(fc), 1);
    /* the session moves on: the answer is stale, only allow_stale gets it */
    kvs_flashcache_version(fc, "s", 2);
    ck_assert(!kvs_flashcache_get(fc, "s", "last", false, 8, &out));
    ck_assert(kvs_flashcache_get(fc, "s", "last", true, 9, &out));
    ck_assert(capture("p", 1, out.sb.data, out.sb.size, NULL));
    ck_assert(!field_b(1, "fresh"));
    ck_assert_uint_eq(kvs_flashcache_hits(fc), 1);
    /* a version never goes back; an answer newer than the version moves it */
    kvs_flashcache_version(fc, "s", 1);
    ck_assert(!kvs_flashcache_get(fc, "s", "last", false, 10, &out));
    publish(fc, "s", "last", 3, "189.4");
    ck_assert(kvs_flashcache_get(fc, "s", "last", false, 11, &out));
    /* unregistered: gone from the cache */
    kvs_flashcache_unregister(fc, "s", "last");
    ck_assert(!kvs_flashcache_get(fc, "s", "last", true, 12, &out));
    kvs_wire_buf_destroy(&out);
}
END_TEST

START_TEST(test_watch_push_resume_and_close)
{
    char err[128];
    ck_assert_int_eq(kvs_flashcache_watch(fc, "a", 1, 5, "nope", false, 0, err, sizeof err),
                     KVS_NOT_FOUND);
    ck_assert_int_eq(n_sent, 0); /* the caller answers the error */
    kvs_flashcache_version(fc, "s", 4);
    publish(fc, "s", "x", 3, "old");
    publish(fc, "s", "y", 4, "new");
    /* resume after version 3: only y at once */
    ck_assert_int_eq(kvs_flashcache_watch(fc, "a", 1, 5, "s", true, 3, err, sizeof err), 0);
    ck_assert_int_eq(n_sent, 2);
    ck_assert_uint_eq(field_u(0, "seq"), 0);
    ck_assert(field_b(0, "watching"));
    ck_assert_uint_eq(field_u(0, "version"), 4);
    ck_assert_uint_eq(field_u(1, "seq"), 1);
    field_s(1, "name", "y");
    field_s(1, "session", "s");
    ck_assert(field_b(1, "fresh"));
    /* without after_version: nothing at once */
    ck_assert_int_eq(kvs_flashcache_watch(fc, "b", 1, 6, "s", false, 0, err, sizeof err), 0);
    ck_assert_int_eq(n_sent, 3);
    ck_assert_int_eq(kvs_flashcache_n_watchers(fc), 2);
    /* a new answer goes to both watchers, each with its own id and seq */
    publish(fc, "s", "x", 5, "newer");
    ck_assert_int_eq(n_sent, 5);
    for (int i = 3; i < 5; i++) {
        bool is_a = strcmp(sent[i].peer, "a") == 0;
        ck_assert_uint_eq(field_u(i, "id"), is_a ? 5 : 6);
        ck_assert_uint_eq(field_u(i, "seq"), is_a ? 2 : 1);
        field_s(i, "answer", "newer");
    }
    /* the same version again (computed twice): pushed once */
    publish(fc, "s", "x", 5, "newer");
    ck_assert_int_eq(n_sent, 5);
    /* another session's answers do not reach them */
    kvs_flashcache_version(fc, "t", 1);
    publish(fc, "t", "x", 1, "other");
    ck_assert_int_eq(n_sent, 5);
    /* cancel of a's watch: CANCELLED with seq and done; only the owner can */
    ck_assert(!kvs_flashcache_unwatch(fc, "b", 1, 5, "cancelled"));
    ck_assert(kvs_flashcache_unwatch(fc, "a", 1, 5, "cancelled"));
    ck_assert_int_eq(n_sent, 6);
    ck_assert_uint_eq(field_u(5, "seq"), 3);
    ck_assert(field_b(5, "done"));
    ck_assert_ptr_nonnull(field(5, "error"));
    /* the session closes: b's watch ends with NOT_FOUND; the cache forgets the session */
    kvs_flashcache_close(fc, "s");
    ck_assert_int_eq(n_sent, 7);
    ck_assert_str_eq(sent[6].peer, "b");
    ck_assert(field_b(6, "done"));
    ck_assert_str_eq(error_code(6), "NOT_FOUND");
    ck_assert_int_eq(kvs_flashcache_n_watchers(fc), 0);
    ck_assert_int_eq(kvs_flashcache_watch(fc, "b", 1, 9, "s", false, 0, err, sizeof err),
                     KVS_NOT_FOUND);
}
END_TEST

/* session.release (the session moves to another worker): its watches end MOVED, as the
 * worker answers its later requests (PROTOCOL.md §5), not NOT_FOUND. */
START_TEST(test_release_ends_watches_moved)
{
    char err[128];
    kvs_flashcache_version(fc, "s", 1);
    ck_assert_int_eq(kvs_flashcache_watch(fc, "a", 1, 3, "s", false, 0, err, sizeof err), 0);
    kvs_flashcache_version(fc, "t", 1);
    ck_assert_int_eq(kvs_flashcache_watch(fc, "b", 1, 4, "t", false, 0, err, sizeof err), 0);
    int before = n_sent;
    kvs_flashcache_release(fc, "s");
    ck_assert_int_eq(n_sent, before + 1);
    ck_assert_str_eq(sent[before].peer, "a");
    ck_assert_uint_eq(field_u(before, "id"), 3);
    ck_assert(field_b(before, "done"));
    ck_assert_str_eq(error_code(before), "MOVED");
    ck_assert_int_eq(kvs_flashcache_n_watchers(fc), 1); /* t's watch goes on */
    ck_assert_int_eq(kvs_flashcache_watch(fc, "a", 1, 5, "s", false, 0, err, sizeof err),
                     KVS_NOT_FOUND);
}
END_TEST

START_TEST(test_undeliverable_watcher_dropped)
{
    char err[128];
    kvs_flashcache_version(fc, "s", 1);
    ck_assert_int_eq(kvs_flashcache_watch(fc, "a", 1, 1, "s", false, 0, err, sizeof err), 0);
    ck_assert_int_eq(kvs_flashcache_watch(fc, "b", 1, 1, "s", false, 0, err, sizeof err), 0);
    refuse_peer = "a"; /* gone, or its queue is full */
    publish(fc, "s", "x", 2, "v2");
    ck_assert_int_eq(kvs_flashcache_n_watchers(fc), 1);
    ck_assert_uint_eq(kvs_flashcache_dropped(fc), 1);
    refuse_peer = NULL;
    int before = n_sent;
    publish(fc, "s", "x", 3, "v3");
    ck_assert_int_eq(n_sent, before + 1); /* b only */
    ck_assert_str_eq(sent[n_sent - 1].peer, "b");
    /* a subscription whose confirmation cannot be delivered keeps nothing */
    refuse_peer = "c";
    ck_assert_int_eq(kvs_flashcache_watch(fc, "c", 1, 1, "s", false, 0, err, sizeof err), 0);
    ck_assert_int_eq(kvs_flashcache_n_watchers(fc), 1);
}
END_TEST

START_TEST(test_limits)
{
    char err[128];
    kvs_flashcache_version(fc, "s", 1);
    for (int i = 0; i < KVS_FLASHCACHE_WATCHERS_PER_PEER; i++) {
        ck_assert_int_eq(
            kvs_flashcache_watch(fc, "a", 1, (uint64_t)i + 1, "s", false, 0, err, sizeof err), 0);
    }
    ck_assert_int_eq(kvs_flashcache_watch(fc, "a", 1, 1000, "s", false, 0, err, sizeof err),
                     KVS_BUSY);
    ck_assert_int_eq(kvs_flashcache_watch(fc, "b", 1, 1, "s", false, 0, err, sizeof err), 0);
    /* the same request id twice on one connection */
    ck_assert_int_eq(kvs_flashcache_watch(fc, "b", 1, 1, "s", false, 0, err, sizeof err),
                     KVS_ALREADY_EXISTS);
    reset_sent();
    /* the worker-wide limit, over many connections */
    int ok = KVS_FLASHCACHE_WATCHERS_PER_PEER + 1;
    for (int p = 0; ok < KVS_FLASHCACHE_WATCHERS_MAX; p++) {
        char peer[16];
        snprintf(peer, sizeof peer, "p%d", p);
        for (int i = 0; i < 10 && ok < KVS_FLASHCACHE_WATCHERS_MAX; i++, ok++) {
            ck_assert_int_eq(kvs_flashcache_watch(fc, peer, strlen(peer), (uint64_t)i + 1, "s",
                                                  false, 0, err, sizeof err),
                             0);
        }
        reset_sent();
    }
    ck_assert_int_eq(kvs_flashcache_n_watchers(fc), KVS_FLASHCACHE_WATCHERS_MAX);
    ck_assert_int_eq(kvs_flashcache_watch(fc, "z", 1, 1, "s", false, 0, err, sizeof err), KVS_BUSY);
    reset_sent();
    kvs_flashcache_end_all(fc, KVS_CANCELLED, "shutting down");
    ck_assert_int_eq(kvs_flashcache_n_watchers(fc), 0);
    ck_assert_int_eq(n_sent + n_unstored, KVS_FLASHCACHE_WATCHERS_MAX); /* each one ended */
    ck_assert(field_b(0, "done"));
}
END_TEST

int main(void)
{
    Suite *s = suite_create("flashcache");
    TCase *tc = tcase_create("core");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_get_fresh_and_stale);
    tcase_add_test(tc, test_watch_push_resume_and_close);
    tcase_add_test(tc, test_release_ends_watches_moved);
    tcase_add_test(tc, test_undeliverable_watcher_dropped);
    tcase_add_test(tc, test_limits);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
