/* coordinator/coord + kvs-coordinator: driven over real ZeroMQ sockets by raw DEALER clients
 * playing workers, clients and admins. In process on the embedded store: registration,
 * placement by budget (best fit, model, cordon, affinity, refusal with a reason), the
 * directory (locate, close, duplicates), hostile input, the failure rule (unhealthy, then
 * down only once the lease expired), placements surviving a restart on the store's file;
 * with threads playing workers (register, heartbeat, answer the coordinator's orders): a down
 * worker's sessions restored on others (session.adopt: done, answer lost and sent again,
 * NOT_FOUND kept with the reason, CAPACITY tried again, no room anywhere) and admin.drain
 * (session.release then adopt; a release refused; an adopt that fails puts it back).
 * As processes against a real etcd: two kvs-coordinator binaries, the standby redirects,
 * SIGKILL of the leader, the standby takes over within the TTL and knows the placements.
 * Without /usr/bin/etcd the program exits 77 (skipped) and says so. */
#include "common/status.h"
#include "common/store.h"
#include "common/wire.h"
#include "coordinator/coord.h"
#include "etcd_rig.h"

#include <check.h>
#include <msgpack.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#define MODEL_A "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
#define MODEL_B "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
#define MODEL_C "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"

static struct etcd_rig g_etcd;
static void *g_zctx;

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

/* ---- a raw DEALER peer ---- */

struct peer {
    void *sock;
    uint64_t next_id;
    msgpack_unpacked reply; /* the last reply */
};

static void peer_open(struct peer *p, const char *endpoint)
{
    memset(p, 0, sizeof *p);
    p->sock = zmq_socket(g_zctx, ZMQ_DEALER);
    ck_assert_ptr_nonnull(p->sock);
    int linger = 0;
    zmq_setsockopt(p->sock, ZMQ_LINGER, &linger, sizeof linger);
    ck_assert_int_eq(zmq_connect(p->sock, endpoint), 0);
    p->next_id = 1;
    msgpack_unpacked_init(&p->reply);
}

static void peer_close(struct peer *p)
{
    msgpack_unpacked_destroy(&p->reply);
    zmq_close(p->sock);
}

/* Send raw frames: an empty delimiter and payload[0..n). */
static void send_raw(struct peer *p, const void *payload, size_t n)
{
    ck_assert_int_ge(zmq_send(p->sock, "", 0, ZMQ_SNDMORE), 0);
    ck_assert_int_ge(zmq_send(p->sock, payload, n, 0), 0);
}

/* Receive one reply into p->reply (5 s at most); returns its top-level map. */
static const msgpack_object *recv_reply(struct peer *p)
{
    zmq_pollitem_t it = {p->sock, 0, ZMQ_POLLIN, 0};
    ck_assert_msg(zmq_poll(&it, 1, 5000) == 1, "no reply in 5 s");
    char delim[8], buf[1 << 16];
    ck_assert_int_eq(zmq_recv(p->sock, delim, sizeof delim, 0), 0);
    int n = zmq_recv(p->sock, buf, sizeof buf, 0);
    ck_assert_int_gt(n, 0);
    ck_assert_int_le(n, (int)sizeof buf);
    size_t off = 0;
    ck_assert_int_eq(msgpack_unpack_next(&p->reply, buf, (size_t)n, &off), MSGPACK_UNPACK_SUCCESS);
    ck_assert_int_eq(p->reply.data.type, MSGPACK_OBJECT_MAP);
    return &p->reply.data;
}

/* A string field copied to a static buffer ("" when absent). */
static const char *str(const msgpack_object *map, const char *key)
{
    static char buf[4][512];
    static int i;
    i = (i + 1) % 4;
    const msgpack_object *v = kvs_wire_map_get(map, key);
    buf[i][0] = '\0';
    if (v != NULL && v->type == MSGPACK_OBJECT_STR && v->via.str.size < sizeof buf[i]) {
        memcpy(buf[i], v->via.str.ptr, v->via.str.size);
        buf[i][v->via.str.size] = '\0';
    }
    return buf[i];
}

static int64_t num(const msgpack_object *map, const char *key)
{
    const msgpack_object *v = kvs_wire_map_get(map, key);
    ck_assert_msg(v != NULL, "no field '%s'", key);
    if (v->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        return v->via.i64;
    }
    ck_assert_int_eq(v->type, MSGPACK_OBJECT_POSITIVE_INTEGER);
    return (int64_t)v->via.u64;
}

/* The error code of a reply, "" when it is not an error. */
static const char *code(const msgpack_object *r)
{
    return str(kvs_wire_map_get(r, "error"), "code");
}

static const char *message(const msgpack_object *r)
{
    return str(kvs_wire_map_get(r, "error"), "message");
}

/* Send {"id", "op", fields...} and return the reply. Fields are given as pairs
 * "s:key", const char * | "u:key", uint64_t | "a:key", (int n, const uint64_t *) ended by
 * NULL. */
static const msgpack_object *rpc(struct peer *p, const char *op, ...)
{
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    va_list ap;
    int n = 0;
    va_start(ap, op);
    for (const char *k = va_arg(ap, const char *); k != NULL; k = va_arg(ap, const char *)) {
        if (k[0] == 'a') {
            (void)va_arg(ap, int);
            (void)va_arg(ap, const uint64_t *);
        } else if (k[0] == 's') {
            (void)va_arg(ap, const char *);
        } else {
            (void)va_arg(ap, uint64_t);
        }
        n++;
    }
    va_end(ap);
    uint64_t id = p->next_id++;
    msgpack_pack_map(&pk, 2 + n);
    msgpack_pack_str_with_body(&pk, "id", 2);
    msgpack_pack_uint64(&pk, id);
    msgpack_pack_str_with_body(&pk, "op", 2);
    msgpack_pack_str_with_body(&pk, op, strlen(op));
    va_start(ap, op);
    for (const char *k = va_arg(ap, const char *); k != NULL; k = va_arg(ap, const char *)) {
        msgpack_pack_str_with_body(&pk, k + 2, strlen(k + 2));
        if (k[0] == 's') {
            const char *v = va_arg(ap, const char *);
            msgpack_pack_str_with_body(&pk, v, strlen(v));
        } else if (k[0] == 'a') {
            int cnt = va_arg(ap, int);
            const uint64_t *v = va_arg(ap, const uint64_t *);
            msgpack_pack_array(&pk, (size_t)cnt);
            for (int i = 0; i < cnt; i++) {
                msgpack_pack_uint64(&pk, v[i]);
            }
        } else {
            msgpack_pack_uint64(&pk, va_arg(ap, uint64_t));
        }
    }
    va_end(ap);
    send_raw(p, sb.data, sb.size);
    msgpack_sbuffer_destroy(&sb);
    const msgpack_object *r = recv_reply(p);
    ck_assert_int_eq(num(r, "id"), (int64_t)id);
    return r;
}

#define U(x) ((uint64_t)(x))

static void reg(struct peer *p, const char *id, const char *ep, const char *model, uint64_t cells)
{
    const msgpack_object *r = rpc(p, "worker.register", "s:worker", id, "s:endpoint", ep, "s:model",
                                  model, "u:cells_total", cells, "s:device", "cpu", NULL);
    ck_assert_msg(code(r)[0] == '\0', "register %s: %s %s", id, code(r), message(r));
}

static void heartbeat(struct peer *p, const char *id)
{
    const msgpack_object *r =
        rpc(p, "worker.heartbeat", "s:worker", id, "u:cells_free", U(100), NULL);
    ck_assert_msg(code(r)[0] == '\0', "heartbeat %s: %s %s", id, code(r), message(r));
}

/* Create a session and return the worker it was placed on ("" + the code on error). */
static const char *create(struct peer *p, const char *session, uint64_t cells, const char *model,
                          uint64_t prefix_hash)
{
    const msgpack_object *r = rpc(p, "session.create", "s:session", session, "u:cells", cells,
                                  "s:model", model, "u:prefix_hash", prefix_hash, NULL);
    if (code(r)[0] != '\0') {
        return code(r);
    }
    ck_assert_str_eq(str(r, "session"), session);
    return str(r, "worker");
}

/* ---- an in-process coordinator ---- */

struct running {
    kvs_coord *c;
    pthread_t th;
};

static void *coord_main(void *arg)
{
    kvs_coord_run(arg);
    return NULL;
}

static void wait_leader(struct peer *p)
{
    int64_t t0 = now_ms();
    while (now_ms() - t0 < 10000) {
        const msgpack_object *r = rpc(p, "coord.status", NULL);
        const msgpack_object *l = kvs_wire_map_get(r, "leader");
        if (l != NULL && l->type == MSGPACK_OBJECT_BOOLEAN && l->via.boolean) {
            return;
        }
        sleep_ms(20);
    }
    ck_abort_msg("no leader in 10 s");
}

static void start(struct running *run, struct kvs_coord_opts *o)
{
    char err[512];
    o->listen = "tcp://127.0.0.1:*";
    ck_assert_msg(kvs_coord_new(o, &run->c, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(pthread_create(&run->th, NULL, coord_main, run->c), 0);
}

static void stop(struct running *run, bool crash)
{
    kvs_coord_stop(run->c);
    pthread_join(run->th, NULL);
    kvs_coord_destroy(&run->c, crash);
}

static kvs_store *g_store;

static void setup(void)
{
    g_zctx = zmq_ctx_new();
    char err[256];
    g_store = kvs_store_open("mem:", 0, err, sizeof err);
    ck_assert_ptr_nonnull(g_store);
}

static void teardown(void)
{
    kvs_store_destroy(&g_store);
    zmq_ctx_term(g_zctx);
}

START_TEST(test_placement_and_directory)
{
    struct kvs_coord_opts o = {.store = g_store, .cluster = "t1"};
    struct running run;
    start(&run, &o);
    struct peer w, cl;
    peer_open(&w, kvs_coord_endpoint(run.c));
    peer_open(&cl, kvs_coord_endpoint(run.c));
    wait_leader(&cl);

    const msgpack_object *r = rpc(&cl, "hello", NULL);
    ck_assert_str_eq(str(r, "server"), "kvs-coordinator");
    reg(&w, "w1", "tcp://127.0.0.1:7711", MODEL_A, 4096);
    reg(&w, "w2", "tcp://127.0.0.1:7712", MODEL_A, 8192);
    reg(&w, "w3", "tcp://127.0.0.1:7713", MODEL_A, 2048);
    reg(&w, "w4", "tcp://127.0.0.1:7714", MODEL_B, 8192);

    /* Best fit by free cells. */
    ck_assert_str_eq(create(&cl, "s1", 1000, MODEL_A, 0), "w3");
    ck_assert_str_eq(create(&cl, "s2", 1500, MODEL_A, 0), "w1"); /* w3 has 1048 left */
    ck_assert_str_eq(create(&cl, "s3", 5000, MODEL_A, 0), "w2");
    /* Model match. */
    ck_assert_str_eq(create(&cl, "s5", 100, MODEL_B, 0), "w4");
    ck_assert_str_eq(create(&cl, "s6", 100, MODEL_C, 0), "MODEL_MISMATCH");
    /* Nothing fits: refused with a reason. */
    r = rpc(&cl, "session.create", "s:session", "s4", "u:cells", U(9000), "s:model", MODEL_A, NULL);
    ck_assert_str_eq(code(r), "CAPACITY");
    ck_assert_int_eq(num(kvs_wire_map_get(r, "error"), "status"), KVS_CAPACITY);
    ck_assert_ptr_nonnull(strstr(message(r), "9000 free cells"));
    ck_assert_ptr_nonnull(strstr(message(r), "is 3192")); /* w2: 8192 - 5000 */
    /* A name is placed once. */
    ck_assert_str_eq(create(&cl, "s1", 10, MODEL_A, 0), "ALREADY_EXISTS");

    /* Locate: the owner's endpoint, for the client to talk to directly. */
    r = rpc(&cl, "session.locate", "s:session", "s2", NULL);
    ck_assert_str_eq(str(r, "worker"), "w1");
    ck_assert_str_eq(str(r, "endpoint"), "tcp://127.0.0.1:7711");
    ck_assert_int_eq(num(r, "cells"), 1500);
    ck_assert_str_eq(str(r, "worker_state"), "ready");
    r = rpc(&cl, "session.locate", "s:session", "nope", NULL);
    ck_assert_str_eq(code(r), "NOT_FOUND");

    /* Cordon: w2 gets nothing new; uncordon brings it back. */
    r = rpc(&cl, "admin.cordon", "s:worker", "w2", NULL);
    ck_assert_str_eq(str(r, "state"), "cordoned");
    ck_assert_str_eq(create(&cl, "s7", 3000, MODEL_A, 0), "CAPACITY");
    r = rpc(&cl, "admin.uncordon", "s:worker", "w2", NULL);
    ck_assert_str_eq(str(r, "state"), "ready");
    ck_assert_str_eq(create(&cl, "s7", 3000, MODEL_A, 0), "w2");
    r = rpc(&cl, "admin.cordon", "s:worker", "w9", NULL);
    ck_assert_str_eq(code(r), "NOT_FOUND");

    /* Prefix affinity: a worker that has the prefix cached wins over a tighter fit. */
    const uint64_t cached[] = {77, 78};
    r = rpc(&w, "worker.heartbeat", "s:worker", "w2", "u:cells_free", U(100), "a:prefix_hashes", 2,
            cached, NULL);
    ck_assert_str_eq(code(r), "");
    ck_assert_str_eq(create(&cl, "s8", 100, MODEL_A, 77), "w2");
    ck_assert_str_eq(create(&cl, "s9", 100, MODEL_A, 0), "w3");

    /* The admin view: budgets placed per worker. */
    r = rpc(&cl, "admin.workers", NULL);
    const msgpack_object *ws = kvs_wire_map_get(r, "workers");
    ck_assert_uint_eq(ws->via.array.size, 4);
    int seen = 0;
    for (uint32_t i = 0; i < ws->via.array.size; i++) {
        const msgpack_object *x = &ws->via.array.ptr[i];
        if (strcmp(str(x, "worker"), "w2") == 0) {
            ck_assert_int_eq(num(x, "cells_placed"), 8100);
            ck_assert_int_eq(num(x, "cells_free"), 92);
            ck_assert_int_eq(num(x, "sessions"), 3);
            ck_assert_int_eq(num(x, "prefixes"), 2);
            ck_assert_str_eq(str(x, "state"), "ready");
            seen++;
        }
    }
    ck_assert_int_eq(seen, 1);
    r = rpc(&cl, "admin.sessions", NULL);
    ck_assert_uint_eq(kvs_wire_map_get(r, "sessions")->via.array.size, 7);

    /* Close frees the budget. */
    r = rpc(&cl, "session.close", "s:session", "s1", NULL);
    ck_assert_str_eq(code(r), "");
    r = rpc(&cl, "session.locate", "s:session", "s1", NULL);
    ck_assert_str_eq(code(r), "NOT_FOUND");
    ck_assert_str_eq(create(&cl, "s10", 1900, MODEL_A, 0), "w3"); /* 2048 - 100 free */
    r = rpc(&cl, "session.close", "s:session", "s1", NULL);
    ck_assert_str_eq(code(r), "NOT_FOUND");

    /* The store holds every placement under the cluster's prefix. */
    struct kvs_store_range rg;
    char err[256];
    ck_assert_int_eq(kvs_store_range(g_store, "/kvstream/t1/sessions/", true, &rg, err, sizeof err),
                     0);
    ck_assert_uint_eq(rg.n, 7);
    ck_assert_str_eq(rg.kvs[0].key, "/kvstream/t1/sessions/s10");
    ck_assert_ptr_nonnull(strstr(rg.kvs[0].value, "\"worker\":\"w3\""));
    kvs_store_range_free(&rg);

    peer_close(&w);
    peer_close(&cl);
    stop(&run, false);
}
END_TEST

/* What a budget costs on a worker that sent its block size (worker.register, minor 2): whole
 * blocks plus one, as kvs-worker reserves it (worker/session.c), so that a placement is never
 * refused by the worker; a worker that did not send it is counted by the budget. Best fit
 * compares what is left after the reservation. */
START_TEST(test_block_size_accounting)
{
    struct kvs_coord_opts o = {.store = g_store, .cluster = "blocks"};
    struct running run;
    start(&run, &o);
    struct peer w, cl;
    peer_open(&w, kvs_coord_endpoint(run.c));
    peer_open(&cl, kvs_coord_endpoint(run.c));
    wait_leader(&cl);
    const msgpack_object *r =
        rpc(&w, "worker.register", "s:worker", "b16", "s:endpoint", "tcp://127.0.0.1:7721",
            "s:model", MODEL_A, "u:cells_total", U(4096), "u:block_size", U(16), NULL);
    ck_assert_msg(code(r)[0] == '\0', "%s %s", code(r), message(r));
    /* 4096 cells = 256 blocks; 496 cells = 31 + 1 blocks: eight fill it exactly. */
    for (int i = 0; i < 8; i++) {
        char id[16];
        snprintf(id, sizeof id, "e%d", i);
        ck_assert_str_eq(create(&cl, id, 496, MODEL_A, 0), "b16");
    }
    ck_assert_str_eq(create(&cl, "e8", 1, MODEL_A, 0), "CAPACITY"); /* 1 cell = 2 blocks */
    r = rpc(&cl, "admin.workers", NULL);
    const msgpack_object *ws = kvs_wire_map_get(r, "workers");
    ck_assert_int_eq(num(&ws->via.array.ptr[0], "cells_placed"), 4096);
    ck_assert_int_eq(num(&ws->via.array.ptr[0], "block_size"), 16);
    ck_assert_int_eq(num(&ws->via.array.ptr[0], "cells_free"), 0);
    /* A closed session gives back what it reserved. */
    r = rpc(&cl, "session.close", "s:session", "e0", NULL);
    ck_assert_msg(code(r)[0] == '\0', "%s %s", code(r), message(r));
    ck_assert_str_eq(create(&cl, "e0b", 496, MODEL_A, 0), "b16");
    ck_assert_str_eq(create(&cl, "e9", 1, MODEL_A, 0), "CAPACITY");

    /* A worker without block_size (minor < 2): budgets count as themselves. */
    reg(&w, "old", "tcp://127.0.0.1:7722", MODEL_A, 1000);
    ck_assert_str_eq(create(&cl, "o1", 1000, MODEL_A, 0), "old");
    /* Best fit by what is left after the reservation: 300 cells reserve 384 on b64 (6 blocks
     * of 64: 1600 left) and 300 on roomy (1650 left): b64, where counting budgets alone
     * (1684 left) would have chosen roomy. */
    r = rpc(&w, "worker.register", "s:worker", "b64", "s:endpoint", "tcp://127.0.0.1:7723",
            "s:model", MODEL_B, "u:cells_total", U(1984), "u:block_size", U(64), NULL);
    ck_assert_msg(code(r)[0] == '\0', "%s %s", code(r), message(r));
    reg(&w, "roomy", "tcp://127.0.0.1:7724", MODEL_B, 1950);
    ck_assert_str_eq(create(&cl, "f1", 300, MODEL_B, 0), "b64");
    /* Registering again with another block size recounts its sessions (384 -> 320 + 16). */
    r = rpc(&w, "worker.register", "s:worker", "b64", "s:endpoint", "tcp://127.0.0.1:7723",
            "s:model", MODEL_B, "u:cells_total", U(1984), "u:block_size", U(16), NULL);
    ck_assert_msg(code(r)[0] == '\0', "%s %s", code(r), message(r));
    r = rpc(&cl, "admin.workers", NULL);
    ws = kvs_wire_map_get(r, "workers");
    bool seen = false;
    for (uint32_t i = 0; i < ws->via.array.size; i++) {
        if (strcmp(str(&ws->via.array.ptr[i], "worker"), "b64") == 0) {
            ck_assert_int_eq(num(&ws->via.array.ptr[i], "cells_placed"), 320);
            seen = true;
        }
    }
    ck_assert(seen);
    /* A block size out of range is refused. */
    r = rpc(&w, "worker.register", "s:worker", "bad", "s:endpoint", "tcp://127.0.0.1:7725",
            "s:model", MODEL_A, "u:cells_total", U(4096), "u:block_size", U(0), NULL);
    ck_assert_str_eq(code(r), "INVALID_ARGUMENT");
    peer_close(&w);
    peer_close(&cl);
    stop(&run, false);
}
END_TEST

/* The worker's lease is renewed on heartbeats (off the request loop), so the lease_age_ms
 * of a heartbeat's reply stays within about a heartbeat interval (1 s by default), however
 * long the TTL (10 s): it used to be renewed every TTL/3, which let the age reach 3.3 s and
 * ate that much of the worker's stop-serving margin (TTL minus TTL/3). */
START_TEST(test_lease_renewed_per_heartbeat)
{
    struct kvs_coord_opts o = {.store = g_store, .cluster = "renew"};
    struct running run;
    start(&run, &o);
    struct peer w;
    peer_open(&w, kvs_coord_endpoint(run.c));
    wait_leader(&w);
    reg(&w, "w1", "tcp://127.0.0.1:7731", MODEL_A, 4096);
    int64_t t0 = now_ms(), max_age = 0;
    while (now_ms() - t0 < 4000) {
        const msgpack_object *r =
            rpc(&w, "worker.heartbeat", "s:worker", "w1", "u:cells_free", U(4096), NULL);
        ck_assert_msg(code(r)[0] == '\0', "%s %s", code(r), message(r));
        int64_t age = num(r, "lease_age_ms");
        max_age = age > max_age ? age : max_age;
        sleep_ms(200);
    }
    ck_assert_msg(max_age < 1000, "lease_age_ms reached %lld with heartbeats every 200 ms",
                  (long long)max_age);
    peer_close(&w);
    stop(&run, false);
}
END_TEST

START_TEST(test_hostile_input)
{
    struct kvs_coord_opts o = {.store = g_store, .cluster = "t2"};
    struct running run;
    start(&run, &o);
    struct peer p;
    peer_open(&p, kvs_coord_endpoint(run.c));
    wait_leader(&p);
    const msgpack_object *r;

    /* Not msgpack; a 5-byte array header claiming 4 G elements; not a map. */
    send_raw(&p, "\xc1garbage", 8);
    r = recv_reply(&p);
    ck_assert_str_eq(code(r), "BAD_FORMAT");
    ck_assert_int_eq(num(r, "id"), 0);
    send_raw(&p, "\xdd\xff\xff\xff\xff", 5);
    r = recv_reply(&p);
    ck_assert_str_ne(code(r), "");
    send_raw(&p, "\x93\x01\x02\x03", 4);
    r = recv_reply(&p);
    ck_assert_str_eq(code(r), "BAD_FORMAT");
    /* One frame instead of two. */
    ck_assert_int_ge(zmq_send(p.sock, "\x80", 1, 0), 0);
    r = recv_reply(&p);
    ck_assert_str_eq(code(r), "BAD_FORMAT");

    r = rpc(&p, "launch.missiles", NULL);
    ck_assert_str_eq(code(r), "UNSUPPORTED");
    r = rpc(&p, "worker.register", "s:worker", "w1", "s:endpoint", "tcp://127.0.0.1:1", NULL);
    ck_assert_str_eq(code(r), "INVALID_ARGUMENT");
    ck_assert_ptr_nonnull(strstr(message(r), "'model'"));
    r = rpc(&p, "worker.register", "s:worker", "../etc", "s:endpoint", "tcp://127.0.0.1:1",
            "s:model", MODEL_A, "u:cells_total", U(1), NULL);
    ck_assert_str_eq(code(r), "INVALID_ARGUMENT");
    ck_assert_ptr_nonnull(strstr(message(r), "'worker'"));
    r = rpc(&p, "worker.register", "s:worker", "w1", "s:endpoint", "http://evil", "s:model",
            MODEL_A, "u:cells_total", U(1), NULL);
    ck_assert_ptr_nonnull(strstr(message(r), "'endpoint'"));
    r = rpc(&p, "worker.register", "s:worker", "w1", "s:endpoint", "tcp://127.0.0.1:1", "s:model",
            "XYZ", "u:cells_total", U(1), NULL);
    ck_assert_ptr_nonnull(strstr(message(r), "'model'"));
    r = rpc(&p, "worker.register", "s:worker", "w1", "s:endpoint", "tcp://127.0.0.1:1", "s:model",
            MODEL_A, "u:cells_total", U(1) << 50, NULL);
    ck_assert_ptr_nonnull(strstr(message(r), "out of range"));
    r = rpc(&p, "session.create", "s:session", "s1", "u:cells", U(0), "s:model", MODEL_A, NULL);
    ck_assert_str_eq(code(r), "INVALID_ARGUMENT");
    r = rpc(&p, "session.create", "s:session", "s1", "s:cells", "many", "s:model", MODEL_A, NULL);
    ck_assert_ptr_nonnull(strstr(message(r), "'cells'"));
    uint64_t many[1100] = {0};
    r = rpc(&p, "worker.heartbeat", "s:worker", "w1", "u:cells_free", U(1), "a:prefix_hashes", 1100,
            many, NULL);
    ck_assert_str_eq(code(r), "TOO_LARGE");
    r = rpc(&p, "worker.heartbeat", "s:worker", "ghost", "u:cells_free", U(1), NULL);
    ck_assert_str_eq(code(r), "NOT_FOUND");
    ck_assert_ptr_nonnull(strstr(message(r), "register"));
    /* No worker at all: a session is refused, saying so. */
    r = rpc(&p, "session.create", "s:session", "s1", "u:cells", U(10), "s:model", MODEL_A, NULL);
    ck_assert_str_eq(code(r), "UNAVAILABLE");
    ck_assert_ptr_nonnull(strstr(message(r), "0 registered"));

    /* A duplicate key is refused. */
    const char dup[] = "\x83\xa2id\x05\xa2op\xa4ping\xa2id\x06";
    send_raw(&p, dup, sizeof dup - 1);
    r = recv_reply(&p);
    ck_assert_str_eq(code(r), "BAD_FORMAT");
    ck_assert_ptr_nonnull(strstr(message(r), "twice"));

    /* Still alive and well. */
    r = rpc(&p, "ping", NULL);
    ck_assert(kvs_wire_map_get(r, "pong")->via.boolean);
    peer_close(&p);
    stop(&run, false);
}
END_TEST

START_TEST(test_worker_failure_rule)
{
    struct kvs_coord_opts o = {.store = g_store,
                               .cluster = "t3",
                               .worker_ttl_s = 2,
                               .heartbeat_ms = 200,
                               .unhealthy_ms = 600};
    struct running run;
    start(&run, &o);
    struct peer w, cl;
    peer_open(&w, kvs_coord_endpoint(run.c));
    peer_open(&cl, kvs_coord_endpoint(run.c));
    wait_leader(&cl);
    reg(&w, "w1", "tcp://127.0.0.1:7711", MODEL_A, 1000);
    reg(&w, "w2", "tcp://127.0.0.1:7712", MODEL_A, 5000);
    ck_assert_str_eq(create(&cl, "s1", 500, MODEL_A, 0), "w1");

    /* w1 goes silent; w2 keeps heartbeating. */
    int64_t t0 = now_ms();
    while (now_ms() - t0 < 900) {
        heartbeat(&w, "w2");
        sleep_ms(100);
    }
    /* Unhealthy: no new sessions, but its sessions are still located on it. */
    ck_assert_str_eq(create(&cl, "s2", 100, MODEL_A, 0), "w2");
    const msgpack_object *r = rpc(&cl, "session.locate", "s:session", "s1", NULL);
    ck_assert_str_eq(code(r), "");
    ck_assert_str_eq(str(r, "worker"), "w1");
    ck_assert_str_eq(str(r, "worker_state"), "unhealthy");

    /* Down only once its lease expired as well: then the session is reported unavailable
     * (kept in the directory, never dropped). */
    bool down = false;
    while (now_ms() - t0 < 6000 && !down) {
        heartbeat(&w, "w2");
        r = rpc(&cl, "session.locate", "s:session", "s1", NULL);
        down = strcmp(code(r), "UNAVAILABLE") == 0;
        sleep_ms(100);
    }
    ck_assert(down);
    int64_t took = now_ms() - t0;
    ck_assert_int_ge(took, 2000); /* not before the lease TTL */
    ck_assert_ptr_nonnull(strstr(message(r), "'w1' is down"));
    ck_assert_ptr_nonnull(strstr(message(r), "without --shared-data-dir"));
    r = rpc(&cl, "admin.sessions", NULL);
    ck_assert_uint_eq(kvs_wire_map_get(r, "sessions")->via.array.size, 2);
    /* Moving sessions needs the shared data dir. */
    r = rpc(&cl, "admin.drain", "s:worker", "w2", NULL);
    ck_assert_str_eq(code(r), "UNAVAILABLE");
    ck_assert_ptr_nonnull(strstr(message(r), "--shared-data-dir"));
    /* A late heartbeat is told to register again; after that it serves again. */
    r = rpc(&w, "worker.heartbeat", "s:worker", "w1", "u:cells_free", U(1), NULL);
    ck_assert_str_eq(code(r), "NOT_FOUND");
    reg(&w, "w1", "tcp://127.0.0.1:7711", MODEL_A, 1000);
    r = rpc(&cl, "session.locate", "s:session", "s1", NULL);
    ck_assert_str_eq(str(r, "worker"), "w1");
    ck_assert_str_eq(str(r, "worker_state"), "ready");
    /* It still carries s1's budget. */
    ck_assert_str_eq(create(&cl, "s3", 600, MODEL_A, 0), "w2");
    peer_close(&w);
    peer_close(&cl);
    stop(&run, false);
}
END_TEST

START_TEST(test_placements_survive_restart)
{
    char path[128], url[160], log[160];
    snprintf(path, sizeof path, "/tmp/kvs-coord-%d.json", (int)getpid());
    snprintf(url, sizeof url, "file:%s", path);
    snprintf(log, sizeof log, "%s.log", path);
    unlink(path);
    unlink(log);
    struct kvs_coord_opts o = {.store_url = url, .cluster = "t4"};
    struct running run;
    start(&run, &o);
    struct peer p;
    peer_open(&p, kvs_coord_endpoint(run.c));
    wait_leader(&p);
    reg(&p, "w1", "tcp://127.0.0.1:7711", MODEL_A, 1000);
    ck_assert_str_eq(create(&p, "keep-me", 700, MODEL_A, 0), "w1");
    peer_close(&p);
    stop(&run, false);

    start(&run, &o);
    peer_open(&p, kvs_coord_endpoint(run.c));
    wait_leader(&p);
    /* Known before the worker is back; the worker's budget too once it registers. */
    const msgpack_object *r = rpc(&p, "session.locate", "s:session", "keep-me", NULL);
    ck_assert_str_eq(code(r), "");
    ck_assert_str_eq(str(r, "worker"), "w1");
    reg(&p, "w1", "tcp://127.0.0.1:7711", MODEL_A, 1000);
    ck_assert_str_eq(create(&p, "too-big", 400, MODEL_A, 0), "CAPACITY");
    peer_close(&p);
    stop(&run, false);
    unlink(path);
    unlink(log);
}
END_TEST

/* ---- re-placement and drain, with raw ZeroMQ peers playing workers ---- */

/* A worker played by a thread: a DEALER to the coordinator (register, a heartbeat every
 * 100 ms unless silent) and a ROUTER that answers the coordinator's orders. How it answers
 * depends on the session's name:
 *   nf-*     session.adopt with `from`: NOT_FOUND (the files are not there); without `from`
 *            (from its own directory) it works
 *   cap-*    session.adopt: CAPACITY the first time, then adopted
 *   lost-*   session.adopt: adopted, but the first answer is never sent (the coordinator sends
 *            it again, gets ALREADY_EXISTS, asks session.info)
 *   norel-*  session.release: UNSUPPORTED (as a worker without the op answers)
 *   mute-*   session.adopt: no answer at all while `mute` is set
 *   junk-*   session.adopt: first a frame that is not msgpack, three frames, a map without
 *            an id and an answer to another id, then the answer
 *   anything else: done.
 * Every order is logged as "op session from" for the test to read. */
struct fake {
    char id[32];
    char model[65];
    char coord[128];
    char endpoint[128]; /* its ROUTER */
    void *router;       /* bound by fake_start, then used by the thread only */
    uint64_t cells;
    pthread_t th;
    volatile int stop, silent, mute;
    pthread_mutex_t mu;
    char log[64][200];
    int n_log;
    char open[32][64]; /* sessions it holds (adopted) */
    int n_open;
    int cap_seen, lost_seen;
};

/* The request's str field (or "") into out. */
static void req_str(const msgpack_object *m, const char *key, char *out, size_t cap)
{
    const msgpack_object *v = kvs_wire_map_get(m, key);
    out[0] = '\0';
    if (v != NULL && v->type == MSGPACK_OBJECT_STR && v->via.str.size < cap) {
        memcpy(out, v->via.str.ptr, v->via.str.size);
        out[v->via.str.size] = '\0';
    }
}

static void fake_send(void *sock, zmq_msg_t *ident, const msgpack_sbuffer *sb)
{
    zmq_send(sock, zmq_msg_data(ident), zmq_msg_size(ident), ZMQ_SNDMORE);
    zmq_send(sock, "", 0, ZMQ_SNDMORE);
    zmq_send(sock, sb->data, sb->size, 0);
}

static bool fake_holds(struct fake *f, const char *s)
{
    for (int i = 0; i < f->n_open; i++) {
        if (strcmp(f->open[i], s) == 0) {
            return true;
        }
    }
    return false;
}

/* Answer one order read from the ROUTER. */
static void fake_order(struct fake *f, void *router)
{
    zmq_msg_t ident, delim, body;
    zmq_msg_init(&ident);
    zmq_msg_init(&delim);
    zmq_msg_init(&body);
    zmq_msg_recv(&ident, router, 0);
    zmq_msg_recv(&delim, router, 0);
    zmq_msg_recv(&body, router, 0);
    msgpack_unpacked up;
    msgpack_unpacked_init(&up);
    size_t off = 0;
    msgpack_unpack_next(&up, zmq_msg_data(&body), zmq_msg_size(&body), &off);
    char op[32], session[64], from[64];
    req_str(&up.data, "op", op, sizeof op);
    req_str(&up.data, "session", session, sizeof session);
    req_str(&up.data, "from", from, sizeof from);
    uint64_t id = kvs_wire_map_get(&up.data, "id")->via.u64;
    pthread_mutex_lock(&f->mu);
    if (f->n_log < 64) {
        snprintf(f->log[f->n_log++], 200, "%s %s %s", op, session, from);
    }
    const char *err = NULL;
    bool answer = true;
    if (strcmp(op, "session.adopt") == 0) {
        if (strncmp(session, "nf-", 3) == 0 && from[0] != '\0') {
            err = "NOT_FOUND";
        } else if (strncmp(session, "cap-", 4) == 0 && f->cap_seen++ == 0) {
            err = "CAPACITY";
        } else if (strncmp(session, "mute-", 5) == 0 && f->mute) {
            answer = false;
        } else if (fake_holds(f, session)) {
            err = "ALREADY_EXISTS";
        } else {
            snprintf(f->open[f->n_open++], 64, "%s", session);
            answer = !(strncmp(session, "lost-", 5) == 0 && f->lost_seen++ == 0);
        }
    } else if (strcmp(op, "session.release") == 0) {
        if (strncmp(session, "norel-", 6) == 0) {
            err = "UNSUPPORTED";
        }
    } else if (strcmp(op, "session.info") == 0) {
        err = fake_holds(f, session) ? NULL : "NOT_FOUND";
    }
    pthread_mutex_unlock(&f->mu);
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, err != NULL ? 2 : 3);
    msgpack_pack_str_with_body(&pk, "id", 2);
    msgpack_pack_uint64(&pk, id);
    if (err != NULL) {
        int status = strcmp(err, "NOT_FOUND") == 0     ? KVS_NOT_FOUND
                     : strcmp(err, "CAPACITY") == 0    ? KVS_CAPACITY
                     : strcmp(err, "UNSUPPORTED") == 0 ? KVS_UNSUPPORTED
                                                       : KVS_ALREADY_EXISTS;
        msgpack_pack_str_with_body(&pk, "error", 5);
        msgpack_pack_map(&pk, 3);
        msgpack_pack_str_with_body(&pk, "code", 4);
        msgpack_pack_str_with_body(&pk, err, strlen(err));
        msgpack_pack_str_with_body(&pk, "status", 6);
        msgpack_pack_int(&pk, status);
        msgpack_pack_str_with_body(&pk, "message", 7);
        msgpack_pack_str_with_body(&pk, "said the fake", 13);
    } else {
        msgpack_pack_str_with_body(&pk, "session", 7);
        msgpack_pack_str_with_body(&pk, session, strlen(session));
        msgpack_pack_str_with_body(&pk, "version", 7);
        msgpack_pack_uint64(&pk, 7);
    }
    if (answer && strncmp(session, "junk-", 5) == 0) {
        zmq_send(router, zmq_msg_data(&ident), zmq_msg_size(&ident), ZMQ_SNDMORE);
        zmq_send(router, "", 0, ZMQ_SNDMORE);
        zmq_send(router, "\xc1garbage", 8, 0);
        zmq_send(router, zmq_msg_data(&ident), zmq_msg_size(&ident), ZMQ_SNDMORE);
        zmq_send(router, "", 0, ZMQ_SNDMORE);
        zmq_send(router, "\x80", 1, ZMQ_SNDMORE);
        zmq_send(router, "\x80", 1, 0);
        zmq_send(router, zmq_msg_data(&ident), zmq_msg_size(&ident), ZMQ_SNDMORE);
        zmq_send(router, "", 0, ZMQ_SNDMORE);
        zmq_send(router, "\x81\xa7version\x07", 10, 0);
        zmq_send(router, zmq_msg_data(&ident), zmq_msg_size(&ident), ZMQ_SNDMORE);
        zmq_send(router, "", 0, ZMQ_SNDMORE);
        zmq_send(router, "\x81\xa2id\xcd\x30\x39", 7, 0); /* {"id": 12345} */
    }
    if (answer && (err != NULL || strncmp(op, "session.adopt", 13) != 0 ||
                   strncmp(session, "mute-", 5) != 0 || !f->mute)) {
        fake_send(router, &ident, &sb);
    }
    msgpack_sbuffer_destroy(&sb);
    msgpack_unpacked_destroy(&up);
    zmq_msg_close(&ident);
    zmq_msg_close(&delim);
    zmq_msg_close(&body);
}

static void *fake_main(void *arg)
{
    struct fake *f = arg;
    void *dealer = zmq_socket(g_zctx, ZMQ_DEALER);
    void *router = f->router;
    int linger = 0;
    zmq_setsockopt(dealer, ZMQ_LINGER, &linger, sizeof linger);
    zmq_connect(dealer, f->coord);
    int64_t last_hb = 0;
    uint64_t rid = 0;
    bool registered = false;
    while (!f->stop) {
        int64_t now = now_ms();
        if (!f->silent && now - last_hb >= 100) {
            msgpack_sbuffer sb;
            msgpack_sbuffer_init(&sb);
            msgpack_packer pk;
            msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
            msgpack_pack_map(&pk, registered ? 4 : 6);
            msgpack_pack_str_with_body(&pk, "id", 2);
            msgpack_pack_uint64(&pk, ++rid);
            msgpack_pack_str_with_body(&pk, "op", 2);
            const char *op = registered ? "worker.heartbeat" : "worker.register";
            msgpack_pack_str_with_body(&pk, op, strlen(op));
            msgpack_pack_str_with_body(&pk, "worker", 6);
            msgpack_pack_str_with_body(&pk, f->id, strlen(f->id));
            if (registered) {
                msgpack_pack_str_with_body(&pk, "cells_free", 10);
                msgpack_pack_uint64(&pk, f->cells);
            } else {
                msgpack_pack_str_with_body(&pk, "endpoint", 8);
                msgpack_pack_str_with_body(&pk, f->endpoint, strlen(f->endpoint));
                msgpack_pack_str_with_body(&pk, "model", 5);
                msgpack_pack_str_with_body(&pk, f->model, 64);
                msgpack_pack_str_with_body(&pk, "cells_total", 11);
                msgpack_pack_uint64(&pk, f->cells);
            }
            zmq_send(dealer, "", 0, ZMQ_SNDMORE);
            zmq_send(dealer, sb.data, sb.size, 0);
            msgpack_sbuffer_destroy(&sb);
            registered = true; /* a NOT_FOUND answer below sets it back */
            last_hb = now;
        }
        zmq_pollitem_t it[2] = {{dealer, 0, ZMQ_POLLIN, 0}, {router, 0, ZMQ_POLLIN, 0}};
        zmq_poll(it, 2, 20);
        if (it[0].revents & ZMQ_POLLIN) {
            char buf[4096];
            zmq_recv(dealer, buf, sizeof buf, 0);
            int n = zmq_recv(dealer, buf, sizeof buf, 0);
            msgpack_unpacked up;
            msgpack_unpacked_init(&up);
            size_t off = 0;
            if (n > 0 && n <= (int)sizeof buf &&
                msgpack_unpack_next(&up, buf, (size_t)n, &off) == MSGPACK_UNPACK_SUCCESS) {
                char ecode[32];
                req_str(kvs_wire_map_get(&up.data, "error"), "code", ecode, sizeof ecode);
                if (strcmp(ecode, "NOT_FOUND") == 0) {
                    registered = false; /* declared down: register again */
                }
            }
            msgpack_unpacked_destroy(&up);
        }
        if (it[1].revents & ZMQ_POLLIN) {
            fake_order(f, router);
        }
    }
    zmq_close(dealer);
    zmq_close(router);
    return NULL;
}

/* Bind the fake's ROUTER here (its endpoint is known before it registers), then hand it to
 * the thread (a socket may move between threads across pthread_create's barrier). */
static void fake_start(struct fake *f, const char *id, const char *coord, uint64_t cells)
{
    memset(f, 0, sizeof *f);
    snprintf(f->id, sizeof f->id, "%s", id);
    snprintf(f->model, sizeof f->model, "%s", MODEL_A);
    snprintf(f->coord, sizeof f->coord, "%s", coord);
    f->cells = cells;
    pthread_mutex_init(&f->mu, NULL);
    f->router = zmq_socket(g_zctx, ZMQ_ROUTER);
    int linger = 0;
    zmq_setsockopt(f->router, ZMQ_LINGER, &linger, sizeof linger);
    ck_assert_int_eq(zmq_bind(f->router, "tcp://127.0.0.1:*"), 0);
    size_t len = sizeof f->endpoint;
    zmq_getsockopt(f->router, ZMQ_LAST_ENDPOINT, f->endpoint, &len);
    ck_assert_int_eq(pthread_create(&f->th, NULL, fake_main, f), 0);
}

static void fake_stop(struct fake *f)
{
    f->stop = 1;
    pthread_join(f->th, NULL);
    pthread_mutex_destroy(&f->mu);
}

/* How many logged orders start with prefix. */
static int fake_count(struct fake *f, const char *prefix)
{
    pthread_mutex_lock(&f->mu);
    int n = 0;
    for (int i = 0; i < f->n_log; i++) {
        n += strncmp(f->log[i], prefix, strlen(prefix)) == 0;
    }
    pthread_mutex_unlock(&f->mu);
    return n;
}

/* Wait until admin.workers says worker is in state. */
static void wait_state(struct peer *p, const char *worker, const char *state)
{
    int64_t t0 = now_ms();
    while (now_ms() - t0 < 10000) {
        const msgpack_object *ws = kvs_wire_map_get(rpc(p, "admin.workers", NULL), "workers");
        for (uint32_t i = 0; i < ws->via.array.size; i++) {
            const msgpack_object *x = &ws->via.array.ptr[i];
            if (strcmp(str(x, "worker"), worker) == 0 && strcmp(str(x, "state"), state) == 0) {
                return;
            }
        }
        sleep_ms(20);
    }
    ck_abort_msg("worker %s not %s in 10 s", worker, state);
}

/* Poll locate until it answers worker (true), or its error message contains want (false);
 * fails after timeout_ms. */
static bool wait_locate(struct peer *p, const char *session, const char *worker, const char *want,
                        int timeout_ms)
{
    int64_t t0 = now_ms();
    const msgpack_object *r = NULL;
    while (now_ms() - t0 < timeout_ms) {
        r = rpc(p, "session.locate", "s:session", session, NULL);
        if (worker != NULL && strcmp(code(r), "") == 0 && strcmp(str(r, "worker"), worker) == 0) {
            return true;
        }
        if (want != NULL && strstr(message(r), want) != NULL) {
            return false;
        }
        sleep_ms(50);
    }
    ck_abort_msg("session %s: not on %s nor '%s' in %d ms; last: %s %s %s", session,
                 worker ? worker : "-", want ? want : "-", timeout_ms, code(r), message(r),
                 str(r, "worker"));
    return false;
}

/* A down worker's sessions restored on another: done; an answer lost (sent again, then
 * ALREADY_EXISTS and session.info); NOT_FOUND (kept with the reason, not tried again); no
 * room anywhere; CAPACITY (tried again later); the worker back serves what was left. */
START_TEST(test_restore_orders)
{
    struct kvs_coord_opts o = {.store = g_store,
                               .cluster = "t5",
                               .worker_ttl_s = 2,
                               .heartbeat_ms = 100,
                               .unhealthy_ms = 400,
                               .shared_data_dir = true,
                               .move_timeout_ms = 300};
    struct running run;
    start(&run, &o);
    struct peer cl;
    peer_open(&cl, kvs_coord_endpoint(run.c));
    wait_leader(&cl);
    struct fake w1, w2;
    fake_start(&w1, "w1", kvs_coord_endpoint(run.c), 10000);
    wait_state(&cl, "w1", "ready");
    ck_assert_str_eq(create(&cl, "plain", 1000, MODEL_A, 0), "w1");
    ck_assert_str_eq(create(&cl, "lost-1", 1000, MODEL_A, 0), "w1");
    ck_assert_str_eq(create(&cl, "nf-1", 500, MODEL_A, 0), "w1");
    ck_assert_str_eq(create(&cl, "cap-1", 500, MODEL_A, 0), "w1");
    ck_assert_str_eq(create(&cl, "junk-1", 10, MODEL_A, 0), "w1");
    ck_assert_str_eq(create(&cl, "zbig", 2500, MODEL_A, 0), "w1");
    fake_start(&w2, "w2", kvs_coord_endpoint(run.c), 4000);
    wait_state(&cl, "w2", "ready");

    int64_t t0 = now_ms();
    w1.silent = 1;
    ck_assert(wait_locate(&cl, "plain", "w2", NULL, 10000));
    int64_t took = now_ms() - t0;
    ck_assert_int_ge(took, 1300); /* its lease (2 s, renewed every 2/3 s) expired first */
    ck_assert_int_eq(fake_count(&w2, "session.adopt plain w1"), 1);
    /* The answer lost: sent again, ALREADY_EXISTS, session.info says it is open there. */
    ck_assert(wait_locate(&cl, "lost-1", "w2", NULL, 5000));
    ck_assert_int_eq(fake_count(&w2, "session.adopt lost-1 w1"), 2);
    ck_assert_int_eq(fake_count(&w2, "session.info lost-1"), 1);
    /* NOT_FOUND: kept on w1 with the reason; not sent again. */
    ck_assert(!wait_locate(&cl, "nf-1", NULL, "failed: NOT_FOUND: said the fake", 5000));
    const msgpack_object *r = rpc(&cl, "session.locate", "s:session", "nf-1", NULL);
    ck_assert_str_eq(code(r), "UNAVAILABLE");
    ck_assert_ptr_nonnull(strstr(message(r), "'w1' is down"));
    ck_assert_ptr_nonnull(strstr(message(r), "restart worker 'w1'"));
    /* No room on w2 for the big one (placed last: sessions go in id order; 4000 - 3000 on
     * w2 then, and never more than 2000 free). */
    ck_assert(!wait_locate(&cl, "zbig", NULL, "no worker can take it now (CAPACITY", 5000));
    /* CAPACITY from the worker: tried again after a while, then restored. */
    ck_assert(wait_locate(&cl, "cap-1", "w2", NULL, 10000));
    ck_assert_int_eq(fake_count(&w2, "session.adopt cap-1 w1"), 2);
    ck_assert_int_eq(fake_count(&w2, "session.adopt nf-1 w1"), 1);
    /* Replies that are not protocol, or not to the order, are ignored; the answer counts. */
    ck_assert(wait_locate(&cl, "junk-1", "w2", NULL, 5000));
    ck_assert_int_eq(fake_count(&w2, "session.adopt junk-1 w1"), 1);

    /* The store: the new placements, no order left outstanding; the failure recorded. */
    struct kvs_store_kv kv;
    char err[256];
    ck_assert_int_eq(kvs_store_get(g_store, "/kvstream/t5/sessions/plain", &kv, err, sizeof err),
                     0);
    ck_assert_ptr_nonnull(strstr(kv.value, "\"worker\":\"w2\""));
    ck_assert_ptr_null(strstr(kv.value, "\"from\""));
    kvs_store_kv_free(&kv);
    ck_assert_int_eq(kvs_store_get(g_store, "/kvstream/t5/sessions/nf-1", &kv, err, sizeof err), 0);
    ck_assert_ptr_nonnull(strstr(kv.value, "\"worker\":\"w1\""));
    ck_assert_ptr_nonnull(strstr(kv.value, "NOT_FOUND"));
    kvs_store_kv_free(&kv);
    r = rpc(&cl, "admin.sessions", NULL);
    const msgpack_object *ss = kvs_wire_map_get(r, "sessions");
    ck_assert_uint_eq(ss->via.array.size, 6);
    for (uint32_t i = 0; i < ss->via.array.size; i++) {
        const msgpack_object *x = &ss->via.array.ptr[i];
        bool left =
            strcmp(str(x, "session"), "nf-1") == 0 || strcmp(str(x, "session"), "zbig") == 0;
        ck_assert_str_eq(str(x, "state"), left ? "unavailable" : "ok");
        ck_assert_str_eq(str(x, "worker"), left ? "w1" : "w2");
    }

    /* w1 back: it serves what could not be moved (it restores its own directory at start). */
    w1.silent = 0;
    ck_assert(wait_locate(&cl, "nf-1", "w1", NULL, 5000));
    ck_assert(wait_locate(&cl, "zbig", "w1", NULL, 5000));
    r = rpc(&cl, "admin.sessions", NULL);
    ss = kvs_wire_map_get(r, "sessions");
    for (uint32_t i = 0; i < ss->via.array.size; i++) {
        ck_assert_str_eq(str(&ss->via.array.ptr[i], "state"), "ok");
        ck_assert_ptr_null(kvs_wire_map_get(&ss->via.array.ptr[i], "error"));
    }
    peer_close(&cl);
    stop(&run, false);
    fake_stop(&w1);
    fake_stop(&w2);
}
END_TEST

/* admin.drain: each session released on the old worker then adopted on another; a release
 * refused leaves it where it is; an adopt that fails puts it back on the old worker. */
START_TEST(test_drain)
{
    struct kvs_coord_opts o = {.store = g_store,
                               .cluster = "t6",
                               .worker_ttl_s = 2,
                               .heartbeat_ms = 100,
                               .unhealthy_ms = 400,
                               .shared_data_dir = true,
                               .move_timeout_ms = 300};
    struct running run;
    start(&run, &o);
    struct peer cl;
    peer_open(&cl, kvs_coord_endpoint(run.c));
    wait_leader(&cl);
    struct fake w1, w2;
    fake_start(&w1, "w1", kvs_coord_endpoint(run.c), 10000);
    wait_state(&cl, "w1", "ready");
    ck_assert_str_eq(create(&cl, "d1", 1000, MODEL_A, 0), "w1");
    ck_assert_str_eq(create(&cl, "norel-1", 1000, MODEL_A, 0), "w1");
    ck_assert_str_eq(create(&cl, "nf-2", 1000, MODEL_A, 0), "w1");
    fake_start(&w2, "w2", kvs_coord_endpoint(run.c), 4000);
    wait_state(&cl, "w2", "ready");

    const msgpack_object *r = rpc(&cl, "admin.drain", "s:worker", "w1", NULL);
    ck_assert_msg(code(r)[0] == '\0', "%s %s", code(r), message(r));
    ck_assert_str_eq(str(r, "worker"), "w1");
    ck_assert_str_eq(str(r, "state"), "draining");
    ck_assert_int_eq(num(r, "moved"), 1);
    ck_assert_int_eq(num(r, "failed"), 2);
    const msgpack_object *mv = kvs_wire_map_get(r, "moves");
    ck_assert_uint_eq(mv->via.array.size, 3);
    const msgpack_object *m0 = &mv->via.array.ptr[0], *m1 = &mv->via.array.ptr[1],
                         *m2 = &mv->via.array.ptr[2];
    ck_assert_str_eq(str(m0, "session"), "d1");
    ck_assert_str_eq(str(m0, "from"), "w1");
    ck_assert_str_eq(str(m0, "to"), "w2");
    ck_assert(kvs_wire_map_get(m0, "ok")->via.boolean);
    ck_assert_str_eq(str(m1, "session"), "nf-2");
    ck_assert(!kvs_wire_map_get(m1, "ok")->via.boolean);
    ck_assert_ptr_nonnull(strstr(str(m1, "error"), "NOT_FOUND"));
    ck_assert_ptr_nonnull(strstr(str(m1, "error"), "put back on 'w1'"));
    ck_assert_ptr_null(strstr(str(m1, "error"), "failed too"));
    ck_assert_str_eq(str(m2, "session"), "norel-1");
    ck_assert(!kvs_wire_map_get(m2, "ok")->via.boolean);
    ck_assert_ptr_nonnull(strstr(str(m2, "error"), "UNSUPPORTED"));

    /* What the workers were told, in order. */
    ck_assert_int_eq(fake_count(&w1, "session.release d1"), 1);
    ck_assert_int_eq(fake_count(&w2, "session.adopt d1 w1"), 1);
    ck_assert_int_eq(fake_count(&w1, "session.release nf-2"), 1);
    ck_assert_int_eq(fake_count(&w2, "session.adopt nf-2 w1"), 1);
    ck_assert_int_eq(fake_count(&w1, "session.adopt nf-2 "), 1); /* back, from its own dir */
    ck_assert_int_eq(fake_count(&w1, "session.release norel-1"), 1);
    ck_assert_int_eq(fake_count(&w2, "session.adopt norel-1"), 0);

    r = rpc(&cl, "session.locate", "s:session", "d1", NULL);
    ck_assert_str_eq(str(r, "worker"), "w2");
    r = rpc(&cl, "session.locate", "s:session", "norel-1", NULL);
    ck_assert_str_eq(str(r, "worker"), "w1");
    ck_assert_str_eq(str(r, "worker_state"), "draining");
    r = rpc(&cl, "session.locate", "s:session", "nf-2", NULL);
    ck_assert_str_eq(str(r, "worker"), "w1");
    /* Draining: nothing new on w1 (w2 has 3000 left, w1 8000). */
    ck_assert_str_eq(create(&cl, "new", 100, MODEL_A, 0), "w2");
    ck_assert_str_eq(create(&cl, "new2", 5000, MODEL_A, 0), "CAPACITY");
    /* Budgets followed the sessions. */
    const msgpack_object *ws = kvs_wire_map_get(rpc(&cl, "admin.workers", NULL), "workers");
    for (uint32_t i = 0; i < ws->via.array.size; i++) {
        const msgpack_object *x = &ws->via.array.ptr[i];
        bool one = strcmp(str(x, "worker"), "w1") == 0;
        ck_assert_int_eq(num(x, "cells_placed"), one ? 2000 : 1100);
        ck_assert_str_eq(str(x, "state"), one ? "draining" : "ready");
    }
    r = rpc(&cl, "admin.drain", "s:worker", "w9", NULL);
    ck_assert_str_eq(code(r), "NOT_FOUND");
    r = rpc(&cl, "admin.drain", "s:worker", "../x", NULL);
    ck_assert_str_eq(code(r), "INVALID_ARGUMENT");
    r = rpc(&cl, "admin.drain", NULL);
    ck_assert_str_eq(code(r), "INVALID_ARGUMENT");
    /* Uncordon ends the draining state. */
    r = rpc(&cl, "admin.uncordon", "s:worker", "w1", NULL);
    ck_assert_str_eq(str(r, "state"), "ready");
    ck_assert_str_eq(create(&cl, "new3", 5000, MODEL_A, 0), "w1");
    peer_close(&cl);
    stop(&run, false);
    fake_stop(&w1);
    fake_stop(&w2);
}
END_TEST

/* A restore order never answered stays recorded on its new worker; the next leader (here the
 * coordinator restarted on the same store file) sends it again. */
START_TEST(test_order_outlives_leader)
{
    char path[128], url[160], log[160];
    snprintf(path, sizeof path, "/tmp/kvs-coord-order-%d.json", (int)getpid());
    snprintf(url, sizeof url, "file:%s", path);
    snprintf(log, sizeof log, "%s.log", path);
    unlink(path);
    unlink(log);
    struct kvs_coord_opts o = {.store_url = url,
                               .cluster = "t7",
                               .leader_ttl_s = 2,
                               .worker_ttl_s = 2,
                               .heartbeat_ms = 100,
                               .unhealthy_ms = 400,
                               .shared_data_dir = true,
                               .move_timeout_ms = 200};
    struct running run;
    start(&run, &o);
    char ep[128];
    snprintf(ep, sizeof ep, "%s", kvs_coord_endpoint(run.c));
    struct peer cl;
    peer_open(&cl, ep);
    wait_leader(&cl);
    struct fake w1, w2;
    fake_start(&w1, "w1", ep, 10000);
    wait_state(&cl, "w1", "ready");
    ck_assert_str_eq(create(&cl, "mute-1", 1000, MODEL_A, 0), "w1");
    fake_start(&w2, "w2", ep, 4000);
    w2.mute = 1;
    wait_state(&cl, "w2", "ready");
    w1.silent = 1;
    /* Three sends, no answer: the order stays outstanding on w2, reported. */
    ck_assert(
        !wait_locate(&cl, "mute-1", NULL, "no answer to its restore order on worker 'w2'", 10000));
    ck_assert_int_eq(fake_count(&w2, "session.adopt mute-1 w1"), 3);
    const msgpack_object *r = rpc(&cl, "admin.sessions", NULL);
    ck_assert_str_eq(str(&kvs_wire_map_get(r, "sessions")->via.array.ptr[0], "state"), "moving");
    peer_close(&cl);
    stop(&run, false);

    w2.mute = 0;
    o.listen = ep; /* the workers reconnect to the same address */
    char err[512];
    ck_assert_msg(kvs_coord_new(&o, &run.c, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(pthread_create(&run.th, NULL, coord_main, run.c), 0);
    peer_open(&cl, ep);
    wait_leader(&cl);
    ck_assert(wait_locate(&cl, "mute-1", "w2", NULL, 10000));
    ck_assert_int_eq(fake_count(&w2, "session.adopt mute-1 w1"), 4);
    peer_close(&cl);
    stop(&run, false);
    fake_stop(&w1);
    fake_stop(&w2);
    unlink(path);
    unlink(log);
}
END_TEST

/* ---- two kvs-coordinator processes on a real etcd ---- */

struct proc {
    pid_t pid;
    char endpoint[128];
};

static void spawn(struct proc *pr, const char *bin, const char *store)
{
    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);
    pr->pid = fork();
    ck_assert_int_ge(pr->pid, 0);
    if (pr->pid == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        execl(bin, "kvs-coordinator", "--listen", "tcp://127.0.0.1:*", "--store", store,
              "--cluster", "proc", "--leader-ttl", "2", (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    FILE *f = fdopen(fds[0], "r");
    char line[256] = "";
    ck_assert_msg(fgets(line, sizeof line, f) != NULL, "kvs-coordinator printed nothing");
    fclose(f);
    ck_assert_int_eq(sscanf(line, "kvs-coordinator: listening on %127s", pr->endpoint), 1);
}

START_TEST(test_failover_processes)
{
    const char *bin = getenv("KVS_COORDINATOR");
    ck_assert_msg(bin != NULL, "KVS_COORDINATOR (the kvs-coordinator binary) is not set: run "
                               "through ctest");
    struct proc a, b;
    spawn(&a, bin, g_etcd.url);
    struct peer pa, pb;
    peer_open(&pa, a.endpoint);
    wait_leader(&pa);
    spawn(&b, bin, g_etcd.url);
    peer_open(&pb, b.endpoint);

    /* The standby answers with the leader's address. */
    const msgpack_object *r =
        rpc(&pb, "session.create", "s:session", "x", "u:cells", U(1), "s:model", MODEL_A, NULL);
    ck_assert_str_eq(code(r), "NOT_LEADER");
    ck_assert_str_eq(str(kvs_wire_map_get(r, "error"), "leader"), a.endpoint);
    r = rpc(&pb, "coord.status", NULL);
    ck_assert(!kvs_wire_map_get(r, "leader")->via.boolean);
    ck_assert_str_eq(str(r, "store"), "etcd");

    reg(&pa, "w1", "tcp://127.0.0.1:7711", MODEL_A, 4096);
    ck_assert_str_eq(create(&pa, "s1", 1000, MODEL_A, 0), "w1");

    /* SIGKILL the leader: the standby takes over within the lease TTL. */
    int64_t t0 = now_ms();
    kill(a.pid, SIGKILL);
    waitpid(a.pid, NULL, 0);
    int64_t took = -1;
    while (now_ms() - t0 < 10000) {
        r = rpc(&pb, "coord.status", NULL);
        if (kvs_wire_map_get(r, "leader")->via.boolean) {
            took = now_ms() - t0;
            break;
        }
        sleep_ms(20);
    }
    fprintf(stderr,
            "test_coord: the standby kvs-coordinator took over %lld ms after the "
            "leader's SIGKILL (leader TTL 2 s)\n",
            (long long)took);
    ck_assert_int_ge(took, 0);
    ck_assert_int_le(took, 2000 + 1500);
    /* The placement survived; the worker re-registers with the new leader. */
    r = rpc(&pb, "session.locate", "s:session", "s1", NULL);
    ck_assert_str_eq(str(r, "worker"), "w1");
    reg(&pb, "w1", "tcp://127.0.0.1:7711", MODEL_A, 4096);
    ck_assert_str_eq(create(&pb, "s2", 3000, MODEL_A, 0), "w1");
    ck_assert_str_eq(create(&pb, "s3", 100, MODEL_A, 0), "CAPACITY"); /* 96 left */

    peer_close(&pa);
    peer_close(&pb);
    kill(b.pid, SIGTERM);
    int status = -1;
    waitpid(b.pid, &status, 0);
    ck_assert(WIFEXITED(status));
    ck_assert_int_eq(WEXITSTATUS(status), 0);
}
END_TEST

/* etcd stopped past the leader's TTL and started again: the leader keeps answering from
 * memory (heartbeats, locate), what needs the store fails with UNAVAILABLE and a reason,
 * nobody is declared down, and everything works again once etcd is back. */
START_TEST(test_etcd_outage)
{
    struct kvs_coord_opts o = {.store_url = g_etcd.url,
                               .cluster = "outage",
                               .leader_ttl_s = 2,
                               .worker_ttl_s = 2,
                               .heartbeat_ms = 200,
                               .unhealthy_ms = 600};
    struct running run;
    start(&run, &o);
    struct peer w, cl;
    peer_open(&w, kvs_coord_endpoint(run.c));
    peer_open(&cl, kvs_coord_endpoint(run.c));
    wait_leader(&cl);
    int64_t token = num(rpc(&cl, "coord.status", NULL), "token");
    reg(&w, "w1", "tcp://127.0.0.1:7711", MODEL_A, 4096);
    ck_assert_str_eq(create(&cl, "s1", 1000, MODEL_A, 0), "w1");

    etcd_rig_stop(&g_etcd);
    int64_t t0 = now_ms();
    int refused = 0;
    while (now_ms() - t0 < 4000) { /* twice the TTLs */
        heartbeat(&w, "w1");
        const msgpack_object *r = rpc(&cl, "session.locate", "s:session", "s1", NULL);
        ck_assert_str_eq(str(r, "worker"), "w1");
        ck_assert_str_eq(str(r, "worker_state"), "ready");
        if (refused == 0) {
            r = rpc(&cl, "session.create", "s:session", "s2", "u:cells", U(100), "s:model", MODEL_A,
                    NULL);
            ck_assert_str_eq(code(r), "UNAVAILABLE");
            ck_assert_ptr_nonnull(strstr(message(r), "cannot record the placement"));
            ck_assert_ptr_nonnull(strstr(message(r), "etcd unavailable"));
            refused++;
        }
        sleep_ms(150);
    }
    ck_assert_int_eq(etcd_rig_start(&g_etcd), 0);
    /* Back: the same leadership (etcd restored the lease), the worker never went down. */
    const char *placed = "";
    t0 = now_ms();
    while (now_ms() - t0 < 5000) {
        heartbeat(&w, "w1");
        placed = create(&cl, "s2", 100, MODEL_A, 0);
        if (strcmp(placed, "UNAVAILABLE") != 0) {
            break;
        }
        sleep_ms(100);
    }
    ck_assert_str_eq(placed, "w1");
    const msgpack_object *r = rpc(&cl, "coord.status", NULL);
    ck_assert(kvs_wire_map_get(r, "leader")->via.boolean);
    ck_assert_int_eq(num(r, "token"), token);
    for (int i = 0; i < 10; i++) { /* past the worker TTL again: its lease is alive */
        heartbeat(&w, "w1");
        sleep_ms(150);
    }
    r = rpc(&cl, "session.locate", "s:session", "s1", NULL);
    ck_assert_str_eq(code(r), "");
    peer_close(&w);
    peer_close(&cl);
    stop(&run, false);
}
END_TEST

/* The outage test restarts etcd in its own (forked) process: stop that one at the end. */
static void etcd_teardown_outage(void)
{
    zmq_ctx_term(g_zctx);
    etcd_rig_stop(&g_etcd);
}

static void etcd_setup(void)
{
    g_zctx = zmq_ctx_new();
}

static void etcd_teardown(void)
{
    zmq_ctx_term(g_zctx);
}

int main(void)
{
    if (!etcd_rig_available()) {
        fprintf(stderr,
                "test_coord: %s is not installed (apt-get install etcd-server); "
                "skipping: the failover test needs it\n",
                ETCD_RIG_BIN);
        return 77;
    }
    Suite *su = suite_create("coord");
    TCase *tc = tcase_create("embedded");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_placement_and_directory);
    tcase_add_test(tc, test_block_size_accounting);
    tcase_add_test(tc, test_lease_renewed_per_heartbeat);
    tcase_add_test(tc, test_hostile_input);
    tcase_add_test(tc, test_worker_failure_rule);
    tcase_add_test(tc, test_placements_survive_restart);
    tcase_add_test(tc, test_restore_orders);
    tcase_add_test(tc, test_drain);
    tcase_add_test(tc, test_order_outlives_leader);
    tcase_set_timeout(tc, 60);
    suite_add_tcase(su, tc);
    SRunner *sr = srunner_create(su);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);

    if (etcd_rig_start(&g_etcd) < 0) {
        etcd_rig_destroy(&g_etcd);
        return 1;
    }
    su = suite_create("coord (etcd)");
    tc = tcase_create("processes");
    tcase_add_checked_fixture(tc, etcd_setup, etcd_teardown);
    tcase_add_test(tc, test_failover_processes);
    tcase_set_timeout(tc, 60);
    suite_add_tcase(su, tc);
    tc = tcase_create("outage"); /* last: it restarts etcd */
    tcase_add_checked_fixture(tc, etcd_setup, etcd_teardown_outage);
    tcase_add_test(tc, test_etcd_outage);
    tcase_set_timeout(tc, 60);
    suite_add_tcase(su, tc);
    sr = srunner_create(su);
    srunner_run_all(sr, CK_NORMAL);
    failed += srunner_ntests_failed(sr);
    srunner_free(sr);
    etcd_rig_destroy(&g_etcd);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
