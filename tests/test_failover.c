/* Failover with real processes: a kvs-coordinator (embedded store, --shared-data-dir) and
 * kvs-workers with the default model registered through --coordinator, sharing one data root.
 *
 *   restore      a session created through the coordinator on worker A and appended to
 *                (fsync always); SIGKILL of A with one more append in flight; after the lease
 *                TTL the coordinator restores it on worker B: locate answers B, session.dump
 *                there holds every acknowledged append in order (and the one in flight or
 *                not), the client's retry of the one in flight is applied exactly once, a
 *                retried acknowledged append is answered as a duplicate.
 *   unreachable  the only other worker has another data root: its adopt fails NOT_FOUND, the
 *                session is reported UNAVAILABLE with that reason and kept in the directory;
 *                worker A restarted (same id and root) restores it and locate answers A again;
 *                admin.drain of A to that worker fails NOT_FOUND and A takes the session
 *                back (session.adopt without from): still served there, with all its data.
 *   (restore)    then a third worker on the shared root and admin.drain of B: the session
 *                is released on B and adopted by the third with every append.
 *
 * Each runs on the embedded store and, when /usr/bin/etcd is installed, on a real etcd.
 * The binaries are found next to this program (the build directory) or through KVS_WORKER
 * and KVS_COORDINATOR. Without the default model the program exits 77 and says so. */
#include "common/wire.h"
#include "etcd_rig.h"
#include "testutil.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <msgpack.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#define TTL_S 2 /* the workers' lease: failure detection takes about this plus a heartbeat */

static char g_worker_bin[PATH_MAX], g_coord_bin[PATH_MAX], g_model[PATH_MAX];
static char g_tmp[256]; /* this test's directory: data roots and the processes' logs */
static struct etcd_rig g_etcd;
static const char *g_stores[2] = {"mem:", NULL}; /* the cluster stores tried: embedded, etcd */
static int g_n_stores = 1;
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

/* ---- processes ---- */

struct proc {
    pid_t pid;
    char endpoint[128];
};

/* Run argv with stderr appended to log; 0 once it printed "...listening on EP". */
static void spawn(struct proc *p, const char *log, char *const argv[])
{
    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);
    p->pid = fork();
    ck_assert_int_ge(p->pid, 0);
    if (p->pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* a failed check must not leave it running */
        dup2(fds[1], STDOUT_FILENO);
        close(fds[0]);
        close(fds[1]);
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);
        if (fd >= 0) {
            dup2(fd, STDERR_FILENO);
            close(fd);
        }
        execv(argv[0], argv);
        _exit(127);
    }
    close(fds[1]);
    FILE *f = fdopen(fds[0], "r");
    char line[512] = "";
    ck_assert_msg(fgets(line, sizeof line, f) != NULL, "%s printed nothing (see %s)", argv[0], log);
    fclose(f);
    const char *at = strstr(line, "listening on ");
    ck_assert_msg(at != NULL, "%s: unexpected first line '%s'", argv[0], line);
    snprintf(p->endpoint, sizeof p->endpoint, "%s", at + strlen("listening on "));
    p->endpoint[strcspn(p->endpoint, "\r\n")] = '\0';
}

static void proc_kill(struct proc *p, int sig)
{
    if (p->pid > 0) {
        kill(p->pid, sig);
        while (waitpid(p->pid, NULL, 0) < 0 && errno == EINTR) {
        }
        p->pid = 0;
    }
}

/* A coordinator on store (a cluster of its own: name), with the leader lease TTL leader_ttl
 * (seconds, as text). */
static void start_coordinator_ttl(struct proc *p, const char *store, const char *name,
                                  const char *leader_ttl)
{
    char log[400];
    snprintf(log, sizeof log, "%s/coordinator-%s.err", g_tmp, name);
    char *argv[] = {
        g_coord_bin,    "--listen",          "tcp://127.0.0.1:*", "--store",
        (char *)store,  "--cluster",         (char *)name,        "--worker-ttl",
        "2",            "--heartbeat-ms",    "200",               "--shared-data-dir",
        "--move-timeout-ms", "20000",        "--leader-ttl",      (char *)leader_ttl,
        NULL};
    spawn(p, log, argv);
}

static void start_coordinator(struct proc *p, const char *store, const char *name)
{
    start_coordinator_ttl(p, store, name, "5");
}

static void start_worker(struct proc *p, const char *id, const char *root, const char *coord)
{
    char log[600];
    snprintf(log, sizeof log, "%s-%s.err", root, id);
    char *argv[] = {g_worker_bin,
                    "--model",
                    g_model,
                    "--listen",
                    "tcp://127.0.0.1:*",
                    "--worker-id",
                    (char *)id,
                    "--coordinator",
                    (char *)coord,
                    "--data-dir",
                    (char *)root,
                    "--fsync",
                    "always",
                    "--threads",
                    "1",
                    "--cells",
                    "4096",
                    NULL};
    spawn(p, log, argv);
}

/* Signal etcd's process (SIGSTOP: it hangs, every call to it times out; SIGCONT). */
static void etcd_signal(int sig)
{
    ck_assert_int_gt(g_etcd.pid, 0);
    ck_assert_int_eq(kill(g_etcd.pid, sig), 0);
}

/* ---- a raw DEALER peer ---- */

struct peer {
    void *sock;
    uint64_t next_id;
    msgpack_unpacked reply;
    char buf[1 << 20];
};

static struct peer *peer_new(const char *endpoint)
{
    struct peer *p = calloc(1, sizeof *p);
    ck_assert_ptr_nonnull(p);
    p->sock = zmq_socket(g_zctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(p->sock, ZMQ_LINGER, &linger, sizeof linger);
    ck_assert_int_eq(zmq_connect(p->sock, endpoint), 0);
    p->next_id = 1;
    msgpack_unpacked_init(&p->reply);
    return p;
}

static void peer_free(struct peer **pp)
{
    msgpack_unpacked_destroy(&(*pp)->reply);
    zmq_close((*pp)->sock);
    free(*pp);
    *pp = NULL;
}

/* A string field copied into a rotating static buffer ("" when absent). */
static const char *str(const msgpack_object *map, const char *key)
{
    static char buf[4][1024];
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

static uint64_t num(const msgpack_object *map, const char *key)
{
    const msgpack_object *v = kvs_wire_map_get(map, key);
    ck_assert_msg(v != NULL && v->type == MSGPACK_OBJECT_POSITIVE_INTEGER, "no uint '%s'", key);
    return v->via.u64;
}

static const char *code(const msgpack_object *r)
{
    return str(kvs_wire_map_get(r, "error"), "code");
}

static const char *message(const msgpack_object *r)
{
    return str(kvs_wire_map_get(r, "error"), "message");
}

/* Send {"id", "op", fields} ("s:key", const char * | "u:key", uint64_t, ended by NULL);
 * returns the request's id. */
static uint64_t send_req(struct peer *p, const char *op, va_list ap0)
{
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    va_list ap;
    int n = 0;
    va_copy(ap, ap0);
    for (const char *k = va_arg(ap, const char *); k != NULL; k = va_arg(ap, const char *)) {
        k[0] == 's' ? (void)va_arg(ap, const char *) : (void)va_arg(ap, uint64_t);
        n++;
    }
    va_end(ap);
    uint64_t id = p->next_id++;
    msgpack_pack_map(&pk, 2 + n);
    msgpack_pack_str_with_body(&pk, "id", 2);
    msgpack_pack_uint64(&pk, id);
    msgpack_pack_str_with_body(&pk, "op", 2);
    msgpack_pack_str_with_body(&pk, op, strlen(op));
    va_copy(ap, ap0);
    for (const char *k = va_arg(ap, const char *); k != NULL; k = va_arg(ap, const char *)) {
        msgpack_pack_str_with_body(&pk, k + 2, strlen(k + 2));
        if (k[0] == 's') {
            const char *v = va_arg(ap, const char *);
            msgpack_pack_str_with_body(&pk, v, strlen(v));
        } else {
            msgpack_pack_uint64(&pk, va_arg(ap, uint64_t));
        }
    }
    va_end(ap);
    ck_assert_int_ge(zmq_send(p->sock, "", 0, ZMQ_SNDMORE), 0);
    ck_assert_int_ge(zmq_send(p->sock, sb.data, sb.size, 0), 0);
    msgpack_sbuffer_destroy(&sb);
    return id;
}

/* Send a request and return its reply (30 s at most: a worker's adopt or dump may take a
 * while); replies to other requests are skipped. */
static const msgpack_object *rpc(struct peer *p, const char *op, ...)
{
    va_list ap;
    va_start(ap, op);
    uint64_t id = send_req(p, op, ap);
    va_end(ap);
    for (;;) {
        zmq_pollitem_t it = {p->sock, 0, ZMQ_POLLIN, 0};
        ck_assert_msg(zmq_poll(&it, 1, 30000) == 1, "no reply to %s in 30 s", op);
        char delim[8];
        ck_assert_int_eq(zmq_recv(p->sock, delim, sizeof delim, 0), 0);
        int len = zmq_recv(p->sock, p->buf, sizeof p->buf, 0);
        ck_assert_int_gt(len, 0);
        ck_assert_int_le(len, (int)sizeof p->buf);
        size_t off = 0;
        ck_assert_int_eq(msgpack_unpack_next(&p->reply, p->buf, (size_t)len, &off),
                         MSGPACK_UNPACK_SUCCESS);
        const msgpack_object *r = &p->reply.data;
        if (num(r, "id") == id) {
            return r;
        }
    }
}

/* Send a request and do not wait for its reply. */
static void post(struct peer *p, const char *op, ...)
{
    va_list ap;
    va_start(ap, op);
    send_req(p, op, ap);
    va_end(ap);
}

#define U(x) ((uint64_t)(x))

/* ---- the cluster's view ---- */

/* Wait until admin.workers lists n workers, all ready; the model's SHA-256 into model. */
static void wait_workers(struct peer *coord, int n, char *model)
{
    int64_t t0 = now_ms();
    while (now_ms() - t0 < 30000) {
        const msgpack_object *r = rpc(coord, "admin.workers", NULL);
        const msgpack_object *ws = kvs_wire_map_get(r, "workers");
        int ready = 0;
        for (uint32_t i = 0; ws != NULL && i < ws->via.array.size; i++) {
            const msgpack_object *w = &ws->via.array.ptr[i];
            ready += strcmp(str(w, "state"), "ready") == 0;
            snprintf(model, 65, "%s", str(w, "model"));
        }
        if (ready == n) {
            return;
        }
        sleep_ms(100);
    }
    ck_abort_msg("%d workers did not become ready in 30 s", n);
}

/* Appends "tick NNNN price P" with client id 4242 and client_seq 1..n; checks each is
 * acknowledged; returns the last version. */
static uint64_t append_ticks(struct peer *w, const char *session, int first, int n)
{
    uint64_t version = 0;
    for (int i = first; i < first + n; i++) {
        char text[64];
        snprintf(text, sizeof text, "tick %04d price %d.%02d", i, 100 + i, i % 100);
        const msgpack_object *r = rpc(w, "session.append", "s:session", session, "s:text", text,
                                      "u:client_id", U(4242), "u:client_seq", U(i), NULL);
        ck_assert_msg(code(r)[0] == '\0', "append %d: %s %s", i, code(r), message(r));
        ck_assert(!kvs_wire_map_get(r, "duplicate")->via.boolean);
        version = num(r, "version");
    }
    return version;
}

/* What session.dump's text must be after ticks 1..n (raw format: each record then "\n"). */
static void expected_text(char *buf, size_t cap, int n)
{
    size_t len = 0;
    buf[0] = '\0';
    for (int i = 1; i <= n; i++) {
        len += (size_t)snprintf(buf + len, cap - len, "tick %04d price %d.%02d\n", i, 100 + i,
                                i % 100);
        ck_assert_uint_lt(len, cap);
    }
}

/* Poll locate until it answers a worker other than not_on (or until the deadline). The last
 * reply's worker, or "" and the last error in why. */
static int64_t g_restoring_ms; /* when wait_located first saw "being restored", or -1 */

static const char *wait_located(struct peer *coord, const char *session, const char *not_on,
                                int timeout_ms, char *why, size_t whylen)
{
    static char worker[80];
    int64_t t0 = now_ms();
    worker[0] = '\0';
    g_restoring_ms = -1;
    while (now_ms() - t0 < timeout_ms) {
        const msgpack_object *r = rpc(coord, "session.locate", "s:session", session, NULL);
        if (code(r)[0] == '\0' && strcmp(str(r, "worker"), not_on) != 0) {
            snprintf(worker, sizeof worker, "%s", str(r, "worker"));
            return worker;
        }
        if (g_restoring_ms < 0 && strstr(message(r), "being restored") != NULL) {
            g_restoring_ms = now_ms();
        }
        snprintf(why, whylen, "%s: %s", code(r)[0] ? code(r) : "on",
                 code(r)[0] ? message(r) : str(r, "worker"));
        sleep_ms(100);
    }
    return worker;
}

static void mkdirs(const char *root)
{
    ck_assert_msg(mkdir(root, 0700) == 0 || errno == EEXIST, "mkdir %s: %s", root, strerror(errno));
}

/* ---- tests ---- */

START_TEST(test_restore_on_other_worker)
{
    const char *store = g_stores[_i];
    fprintf(stderr, "test_failover: restore, store %s\n", store);
    char root[300], name[32];
    snprintf(root, sizeof root, "%s/data-%d", g_tmp, _i);
    snprintf(name, sizeof name, "restore-%d", _i);
    mkdirs(root);
    struct proc co, wa, wb;
    start_coordinator(&co, store, name);
    start_worker(&wa, "wa", root, co.endpoint);
    start_worker(&wb, "wb", root, co.endpoint);
    struct peer *coord = peer_new(co.endpoint);
    char model[65];
    wait_workers(coord, 2, model);

    /* Created through the coordinator, then on the worker it names. */
    const msgpack_object *r = rpc(coord, "session.create", "s:session", "ticks", "s:model", model,
                                  "u:cells", U(1024), NULL);
    ck_assert_msg(code(r)[0] == '\0', "%s %s", code(r), message(r));
    char owner[80], owner_ep[128];
    snprintf(owner, sizeof owner, "%s", str(r, "worker"));
    snprintf(owner_ep, sizeof owner_ep, "%s", str(r, "endpoint"));
    struct proc *victim = strcmp(owner, "wa") == 0 ? &wa : &wb;
    const char *other = strcmp(owner, "wa") == 0 ? "wb" : "wa";
    ck_assert_str_eq(owner_ep, victim->endpoint);
    struct peer *w = peer_new(owner_ep);
    r = rpc(w, "session.create", "s:session", "ticks", "u:cells", U(1024), NULL);
    ck_assert_msg(code(r)[0] == '\0', "%s %s", code(r), message(r));
    const int n = 24;
    uint64_t version = append_ticks(w, "ticks", 1, n);

    /* SIGKILL of its worker mid-stream (append n + 1 sent, not answered): after the lease
     * TTL the session is restored on the other. */
    char text[64];
    snprintf(text, sizeof text, "tick %04d price %d.%02d", n + 1, 100 + n + 1, (n + 1) % 100);
    post(w, "session.append", "s:session", "ticks", "s:text", text, "u:client_id", U(4242),
         "u:client_seq", U(n + 1), NULL);
    int64_t t0 = now_ms();
    proc_kill(victim, SIGKILL);
    peer_free(&w);
    char why[1200] = "";
    const char *now_on = wait_located(coord, "ticks", owner, 30000, why, sizeof why);
    int64_t took = now_ms() - t0;
    fprintf(stderr,
            "test_failover: session 'ticks' (%d appends) served by '%s' %lld ms after the "
            "SIGKILL of '%s' (worker lease TTL %d s; its restore order seen after %lld ms)\n",
            n, now_on, (long long)took, owner, TTL_S,
            (long long)(g_restoring_ms < 0 ? -1 : g_restoring_ms - t0));
    ck_assert_msg(now_on[0] != '\0', "not restored in 30 s; last locate: %s", why);
    ck_assert_str_eq(now_on, other);
    /* not before its lease could expire (renewed every TTL/3) */
    ck_assert_int_ge(took, TTL_S * 1000 * 2 / 3 - 200);

    /* Every acknowledged append, in order, on the new worker, and at most the one in flight. */
    r = rpc(coord, "session.locate", "s:session", "ticks", NULL);
    struct peer *w2 = peer_new(str(r, "endpoint"));
    r = rpc(w2, "session.dump", "s:session", "ticks", NULL);
    ck_assert_msg(code(r)[0] == '\0', "dump: %s %s", code(r), message(r));
    static char want[8192], want_more[8192];
    expected_text(want, sizeof want, n);
    expected_text(want_more, sizeof want_more, n + 1);
    bool in_flight_applied = strcmp(str(r, "text"), want_more) == 0;
    ck_assert_msg(in_flight_applied || strcmp(str(r, "text"), want) == 0, "dump: '%s'",
                  str(r, "text"));
    ck_assert_uint_eq(num(r, "version"), version + (in_flight_applied ? 1 : 0));
    /* The idempotency table came along: the last append it holds, sent again, is answered
     * as a duplicate (not applied, not OUT_OF_ORDER). */
    char last[64];
    int last_seq = in_flight_applied ? n + 1 : n;
    snprintf(last, sizeof last, "tick %04d price %d.%02d", last_seq, 100 + last_seq,
             last_seq % 100);
    r = rpc(w2, "session.append", "s:session", "ticks", "s:text", last, "u:client_id", U(4242),
            "u:client_seq", U(last_seq), NULL);
    ck_assert_msg(code(r)[0] == '\0', "%s %s", code(r), message(r));
    ck_assert(kvs_wire_map_get(r, "duplicate")->via.boolean);
    ck_assert_uint_eq(num(r, "version"), version + (in_flight_applied ? 1 : 0));
    /* The client retries the one in flight: applied exactly once in either case. */
    r = rpc(w2, "session.append", "s:session", "ticks", "s:text", text, "u:client_id", U(4242),
            "u:client_seq", U(n + 1), NULL);
    ck_assert_msg(code(r)[0] == '\0', "%s %s", code(r), message(r));
    fprintf(stderr,
            "test_failover: the append in flight at the SIGKILL was %s; its retry: duplicate %d\n",
            in_flight_applied ? "applied" : "lost (never acknowledged)",
            (int)kvs_wire_map_get(r, "duplicate")->via.boolean);
    ck_assert(kvs_wire_map_get(r, "duplicate")->via.boolean == in_flight_applied);
    version = num(r, "version");
    r = rpc(w2, "session.dump", "s:session", "ticks", NULL);
    ck_assert_str_eq(str(r, "text"), want_more);
    ck_assert_uint_gt(append_ticks(w2, "ticks", n + 2, 1), version);
    peer_free(&w2);

    /* The directory: on the other worker, nothing left in flight; the dead one is down. */
    r = rpc(coord, "admin.sessions", NULL);
    const msgpack_object *ss = kvs_wire_map_get(r, "sessions");
    ck_assert_uint_eq(ss->via.array.size, 1);
    ck_assert_str_eq(str(&ss->via.array.ptr[0], "worker"), other);
    ck_assert_str_eq(str(&ss->via.array.ptr[0], "state"), "ok");
    r = rpc(coord, "admin.workers", NULL);
    const msgpack_object *ws = kvs_wire_map_get(r, "workers");
    for (uint32_t i = 0; i < ws->via.array.size; i++) {
        const msgpack_object *x = &ws->via.array.ptr[i];
        ck_assert_str_eq(str(x, "state"), strcmp(str(x, "worker"), owner) == 0 ? "down" : "ready");
    }

    /* A drain of the new owner to a third worker on the shared root moves the session with
     * every append (session.release there, session.adopt on the third). */
    struct proc wc;
    start_worker(&wc, "wc", root, co.endpoint);
    wait_workers(coord, 2, model);
    int64_t t1 = now_ms();
    r = rpc(coord, "admin.drain", "s:worker", other, NULL);
    ck_assert_msg(code(r)[0] == '\0', "%s %s", code(r), message(r));
    fprintf(stderr, "test_failover: drain of '%s': moved %llu, failed %llu in %lld ms\n", other,
            (unsigned long long)num(r, "moved"), (unsigned long long)num(r, "failed"),
            (long long)(now_ms() - t1));
    ck_assert_uint_eq(num(r, "moved"), 1);
    ck_assert_uint_eq(num(r, "failed"), 0);
    const msgpack_object *m0 = &kvs_wire_map_get(r, "moves")->via.array.ptr[0];
    ck_assert_str_eq(str(m0, "session"), "ticks");
    ck_assert_str_eq(str(m0, "from"), other);
    ck_assert_str_eq(str(m0, "to"), "wc");
    r = rpc(coord, "session.locate", "s:session", "ticks", NULL);
    ck_assert_str_eq(str(r, "worker"), "wc");
    ck_assert_str_eq(str(r, "endpoint"), wc.endpoint);
    struct peer *w3 = peer_new(wc.endpoint);
    r = rpc(w3, "session.dump", "s:session", "ticks", NULL);
    expected_text(want_more, sizeof want_more, n + 2);
    ck_assert_str_eq(str(r, "text"), want_more);
    ck_assert_uint_gt(append_ticks(w3, "ticks", n + 3, 1), 0);
    peer_free(&w3);
    /* The drained worker answers MOVED for it now. */
    w2 = peer_new(other[1] == 'a' ? wa.endpoint : wb.endpoint);
    r = rpc(w2, "session.info", "s:session", "ticks", NULL);
    ck_assert_str_eq(code(r), "MOVED");
    peer_free(&w2);

    peer_free(&coord);
    proc_kill(&wa, SIGTERM);
    proc_kill(&wb, SIGTERM);
    proc_kill(&wc, SIGTERM);
    proc_kill(&co, SIGTERM);
}
END_TEST

START_TEST(test_data_dir_not_reachable)
{
    const char *store = g_stores[_i];
    fprintf(stderr, "test_failover: unreachable, store %s\n", store);
    char root[300], elsewhere[300], name[32];
    snprintf(root, sizeof root, "%s/kept-%d", g_tmp, _i);
    snprintf(elsewhere, sizeof elsewhere, "%s/elsewhere-%d", g_tmp, _i);
    snprintf(name, sizeof name, "unreachable-%d", _i);
    mkdirs(root);
    mkdirs(elsewhere);
    struct proc co, wa, wc;
    start_coordinator(&co, store, name);
    start_worker(&wa, "wa", root, co.endpoint);
    struct peer *coord = peer_new(co.endpoint);
    char model[65];
    wait_workers(coord, 1, model);
    const msgpack_object *r = rpc(coord, "session.create", "s:session", "kept", "s:model", model,
                                  "u:cells", U(1024), NULL);
    ck_assert_str_eq(str(r, "worker"), "wa");
    struct peer *w = peer_new(wa.endpoint);
    r = rpc(w, "session.create", "s:session", "kept", "u:cells", U(1024), NULL);
    ck_assert_msg(code(r)[0] == '\0', "%s %s", code(r), message(r));
    append_ticks(w, "kept", 1, 3);
    peer_free(&w);
    /* The only other worker keeps its data under another root. */
    start_worker(&wc, "wc", elsewhere, co.endpoint);
    wait_workers(coord, 2, model);

    proc_kill(&wa, SIGKILL);
    /* Down, restored on wc, which cannot find it: reported, with the reason, and kept. */
    int64_t t0 = now_ms();
    bool reported = false;
    while (now_ms() - t0 < 30000 && !reported) {
        r = rpc(coord, "session.locate", "s:session", "kept", NULL);
        /* still located on wa while it is only unhealthy; never on wc */
        ck_assert_str_ne(str(r, "worker"), "wc");
        reported = strstr(message(r), "restore on worker 'wc' failed: NOT_FOUND") != NULL;
        sleep_ms(100);
    }
    fprintf(stderr, "test_failover: locate after a restore that could not reach the files: %s\n",
            message(r));
    ck_assert_msg(reported, "last locate: %s %s", code(r), message(r));
    ck_assert_str_eq(code(r), "UNAVAILABLE");
    ck_assert_ptr_nonnull(strstr(message(r), "'wa' is down"));
    ck_assert_ptr_nonnull(strstr(message(r), "the session is kept"));
    r = rpc(coord, "admin.sessions", NULL);
    const msgpack_object *s0 = &kvs_wire_map_get(r, "sessions")->via.array.ptr[0];
    ck_assert_str_eq(str(s0, "session"), "kept");
    ck_assert_str_eq(str(s0, "worker"), "wa");
    ck_assert_str_eq(str(s0, "state"), "unavailable");
    ck_assert_ptr_nonnull(strstr(str(s0, "error"), "NOT_FOUND"));
    /* Not tried again and again: it stays that way. */
    sleep_ms(1500);
    r = rpc(coord, "session.locate", "s:session", "kept", NULL);
    ck_assert_ptr_nonnull(strstr(message(r), "NOT_FOUND"));

    /* Its worker comes back (same id and root): it serves the session again. */
    start_worker(&wa, "wa", root, co.endpoint);
    char why[1200] = "";
    const char *on = wait_located(coord, "kept", "", 30000, why, sizeof why);
    ck_assert_msg(strcmp(on, "wa") == 0, "not back on wa: %s (%s)", on, why);
    w = peer_new(wa.endpoint);
    r = rpc(w, "session.dump", "s:session", "kept", NULL);
    static char want[1024];
    expected_text(want, sizeof want, 3);
    ck_assert_str_eq(str(r, "text"), want);
    r = rpc(coord, "admin.sessions", NULL);
    s0 = &kvs_wire_map_get(r, "sessions")->via.array.ptr[0];
    ck_assert_str_eq(str(s0, "state"), "ok");
    ck_assert_ptr_null(kvs_wire_map_get(s0, "error"));

    /* A drain of wa: released there, but wc cannot reach the files (NOT_FOUND), so wa takes
     * it back from its own directory: it stays on wa, served, with all its data. */
    wait_workers(coord, 2, model);
    r = rpc(coord, "admin.drain", "s:worker", "wa", NULL);
    ck_assert_msg(code(r)[0] == '\0', "%s %s", code(r), message(r));
    const char *drain_err = str(&kvs_wire_map_get(r, "moves")->via.array.ptr[0], "error");
    fprintf(stderr,
            "test_failover: drain of 'wa' to a worker that cannot reach its files: moved %llu, "
            "failed %llu: %s\n",
            (unsigned long long)num(r, "moved"), (unsigned long long)num(r, "failed"), drain_err);
    ck_assert_uint_eq(num(r, "failed"), 1);
    ck_assert_ptr_nonnull(strstr(drain_err, "restore on 'wc' failed: NOT_FOUND"));
    ck_assert_ptr_nonnull(strstr(drain_err, "put back on 'wa'"));
    ck_assert_ptr_null(strstr(drain_err, "failed too"));
    r = rpc(coord, "session.locate", "s:session", "kept", NULL);
    ck_assert_str_eq(str(r, "worker"), "wa");
    ck_assert_str_eq(str(r, "worker_state"), "draining");
    ck_assert_uint_gt(append_ticks(w, "kept", 4, 1), 0);
    r = rpc(w, "session.dump", "s:session", "kept", NULL);
    expected_text(want, sizeof want, 4);
    ck_assert_str_eq(str(r, "text"), want);
    peer_free(&w);

    peer_free(&coord);
    proc_kill(&wa, SIGTERM);
    proc_kill(&wc, SIGTERM);
    proc_kill(&co, SIGTERM);
}
END_TEST

/* etcd hangs (SIGSTOP, not killed: every store call waits for its timeout) for longer than
 * the workers' lease TTL: the coordinator answers heartbeats, locates and admin views from
 * memory, so every worker keeps serving (a query answers) and nothing is re-placed; a write
 * that needs the store is refused at once with UNAVAILABLE. SIGCONT: writes succeed again
 * (session.create) without operator action, the session still where it was. */
START_TEST(test_etcd_paused)
{
    if (g_etcd.pid <= 0) {
        fprintf(stderr, "test_failover: etcd paused: no etcd, skipped\n");
        return;
    }
    fprintf(stderr, "test_failover: etcd paused, store %s\n", g_etcd.url);
    char root[300];
    snprintf(root, sizeof root, "%s/paused", g_tmp);
    mkdirs(root);
    struct proc co, wa, wb;
    /* The leader lease outlives the hang: etcd's lessor runs on when it is resumed and would
     * revoke a lease that expired meanwhile, costing the leadership (a re-election) instead
     * of testing that heartbeats are answered through the hang. */
    start_coordinator_ttl(&co, g_etcd.url, "paused", "15");
    start_worker(&wa, "wa", root, co.endpoint);
    start_worker(&wb, "wb", root, co.endpoint);
    struct peer *coord = peer_new(co.endpoint);
    char model[65];
    wait_workers(coord, 2, model);
    const msgpack_object *r = rpc(coord, "session.create", "s:session", "held", "s:model", model,
                                  "u:cells", U(1024), NULL);
    ck_assert_msg(code(r)[0] == '\0', "%s %s", code(r), message(r));
    char owner[80], owner_ep[128];
    snprintf(owner, sizeof owner, "%s", str(r, "worker"));
    snprintf(owner_ep, sizeof owner_ep, "%s", str(r, "endpoint"));
    struct peer *w = peer_new(owner_ep);
    r = rpc(w, "session.create", "s:session", "held", "u:cells", U(1024), NULL);
    ck_assert_msg(code(r)[0] == '\0', "%s %s", code(r), message(r));
    append_ticks(w, "held", 1, 3);

    /* 3 x the lease TTL; the workers stop serving after TTL minus the margin (1 s) of
     * silence from the coordinator. */
    const int pause_ms = 3 * TTL_S * 1000;
    etcd_signal(SIGSTOP);
    int64_t t0 = now_ms(), slowest = 0;
    bool create_refused = false;
    int n_queries = 0;
    while (now_ms() - t0 < pause_ms) {
        int64_t t1 = now_ms();
        r = rpc(coord, "admin.workers", NULL);
        const msgpack_object *ws = kvs_wire_map_get(r, "workers");
        ck_assert_ptr_nonnull(ws);
        ck_assert_int_eq(ws->via.array.size, 2);
        for (uint32_t i = 0; i < ws->via.array.size; i++) {
            const char *state = str(&ws->via.array.ptr[i], "state");
            ck_assert_msg(strcmp(state, "ready") == 0, "%s is %s with etcd paused",
                          str(&ws->via.array.ptr[i], "worker"), state);
        }
        r = rpc(coord, "session.locate", "s:session", "held", NULL);
        ck_assert_msg(code(r)[0] == '\0', "locate: %s %s", code(r), message(r));
        ck_assert_str_eq(str(r, "worker"), owner);
        int64_t took = now_ms() - t1;
        slowest = took > slowest ? took : slowest;
        r = rpc(w, "query", "s:session", "held", "s:question", "last tick?", "u:max_tokens", U(2),
                NULL);
        ck_assert_msg(code(r)[0] == '\0', "query %lld ms into the pause: %s %s",
                      (long long)(now_ms() - t0), code(r), message(r));
        n_queries++;
        if (!create_refused && now_ms() - t0 > 2000) {
            t1 = now_ms();
            r = rpc(coord, "session.create", "s:session", "during", "s:model", model, "u:cells",
                    U(256), NULL);
            ck_assert_str_eq(code(r), "UNAVAILABLE");
            ck_assert_msg(now_ms() - t1 < 1000, "a refused create took %lld ms",
                          (long long)(now_ms() - t1));
            create_refused = true;
        }
        sleep_ms(200);
    }
    etcd_signal(SIGCONT);
    fprintf(stderr,
            "test_failover: etcd paused %d ms: %d queries answered, admin.workers + locate "
            "answered in %lld ms at most\n",
            pause_ms, n_queries, (long long)slowest);
    ck_assert(create_refused);
    ck_assert_msg(slowest < 1000, "the coordinator took %lld ms to answer", (long long)slowest);

    /* Back: a write goes through again (after its leases' renewals catch up). */
    int64_t t2 = now_ms();
    for (;;) {
        r = rpc(coord, "session.create", "s:session", "after", "s:model", model, "u:cells", U(256),
                NULL);
        if (code(r)[0] == '\0') {
            break;
        }
        ck_assert_msg(now_ms() - t2 < 15000, "session.create after etcd came back: %s %s", code(r),
                      message(r));
        sleep_ms(200);
    }
    fprintf(stderr, "test_failover: session.create succeeded %lld ms after SIGCONT\n",
            (long long)(now_ms() - t2));
    /* Nothing was re-placed; the session is served where it was. */
    sleep_ms(2 * TTL_S * 1000);
    r = rpc(coord, "session.locate", "s:session", "held", NULL);
    ck_assert_msg(code(r)[0] == '\0', "locate: %s %s", code(r), message(r));
    ck_assert_str_eq(str(r, "worker"), owner);
    r = rpc(w, "query", "s:session", "held", "s:question", "last tick?", "u:max_tokens", U(2),
            NULL);
    ck_assert_msg(code(r)[0] == '\0', "query after the pause: %s %s", code(r), message(r));
    append_ticks(w, "held", 4, 1);
    peer_free(&w);
    peer_free(&coord);
    proc_kill(&wa, SIGTERM);
    proc_kill(&wb, SIGTERM);
    proc_kill(&co, SIGTERM);
}
END_TEST

/* The coordinator counts a budget as the worker reserves it (whole blocks of 16 cells plus
 * one): with a pool of 4,096 cells (256 blocks), eight sessions of 496 cells (31 + 1 blocks
 * each) fill it exactly, and both the coordinator and the worker accept all eight; a ninth of
 * 64 cells (5 blocks) fits neither, and the coordinator says so itself (CAPACITY) instead of
 * placing a session that the worker would then refuse. */
START_TEST(test_exact_fit)
{
    const char *store = g_stores[_i];
    fprintf(stderr, "test_failover: exact fit, store %s\n", store);
    char root[300], name[32];
    snprintf(root, sizeof root, "%s/fit-%d", g_tmp, _i);
    snprintf(name, sizeof name, "fit-%d", _i);
    mkdirs(root);
    struct proc co, wa;
    start_coordinator(&co, store, name);
    start_worker(&wa, "wa", root, co.endpoint);
    struct peer *coord = peer_new(co.endpoint);
    char model[65];
    wait_workers(coord, 1, model);
    struct peer *w = peer_new(wa.endpoint);
    for (int i = 0; i < 8; i++) {
        char id[32];
        snprintf(id, sizeof id, "fit%d", i);
        const msgpack_object *r = rpc(coord, "session.create", "s:session", id, "s:model", model,
                                      "u:cells", U(496), NULL);
        ck_assert_msg(code(r)[0] == '\0', "coordinator, session %d: %s %s", i, code(r), message(r));
        r = rpc(w, "session.create", "s:session", id, "u:cells", U(496), NULL);
        ck_assert_msg(code(r)[0] == '\0', "worker, session %d: %s %s", i, code(r), message(r));
    }
    const msgpack_object *r = rpc(w, "status", NULL);
    ck_assert_uint_eq(num(kvs_wire_map_get(r, "capacity"), "cells_free"), 0);
    r = rpc(coord, "session.create", "s:session", "ninth", "s:model", model, "u:cells", U(64),
            NULL);
    ck_assert_msg(strcmp(code(r), "CAPACITY") == 0, "a ninth session: %s %s (worker '%s')", code(r),
                  message(r), str(r, "worker"));
    r = rpc(w, "session.create", "s:session", "ninth", "u:cells", U(64), NULL);
    ck_assert_str_eq(code(r), "CAPACITY"); /* the worker agrees */
    r = rpc(coord, "admin.workers", NULL);
    const msgpack_object *ws = kvs_wire_map_get(r, "workers");
    ck_assert_int_eq(ws->via.array.size, 1);
    ck_assert_uint_eq(num(&ws->via.array.ptr[0], "block_size"), 16);
    ck_assert_uint_eq(num(&ws->via.array.ptr[0], "cells_placed"), 4096);
    peer_free(&w);
    peer_free(&coord);
    proc_kill(&wa, SIGTERM);
    proc_kill(&co, SIGTERM);
}
END_TEST

static void setup(void)
{
    g_zctx = zmq_ctx_new();
}

static void teardown(void)
{
    zmq_ctx_term(g_zctx);
}

/* name next to this program, unless the environment says otherwise. */
static void find_bin(char *out, const char *env, const char *name)
{
    const char *e = getenv(env);
    if (e != NULL) {
        snprintf(out, PATH_MAX, "%s", e);
        return;
    }
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    self[n > 0 ? n : 0] = '\0';
    char *slash = strrchr(self, '/');
    if (slash != NULL) {
        *slash = '\0';
    }
    snprintf(out, PATH_MAX, "%.3000s/%s", self, name);
}

int main(void)
{
    snprintf(g_model, sizeof g_model, "%s", kvs_test_default_model());
    if (access(g_model, R_OK) != 0) {
        fprintf(stderr,
                "test_failover: the default model %s is missing (scripts/setup.sh fetches it): "
                "skipped\n",
                g_model);
        return 77;
    }
    find_bin(g_worker_bin, "KVS_WORKER", "kvs-worker");
    find_bin(g_coord_bin, "KVS_COORDINATOR", "kvs-coordinator");
    if (access(g_worker_bin, X_OK) != 0 || access(g_coord_bin, X_OK) != 0) {
        fprintf(stderr,
                "test_failover: %s or %s is missing: build both (cmake --build DIR --target "
                "kvs-worker kvs-coordinator) or set KVS_WORKER / KVS_COORDINATOR\n",
                g_worker_bin, g_coord_bin);
        return 1;
    }
    snprintf(g_tmp, sizeof g_tmp, "/tmp/kvs-failover-XXXXXX");
    if (mkdtemp(g_tmp) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    if (!etcd_rig_available()) {
        fprintf(stderr,
                "test_failover: %s is not installed (apt-get install etcd-server): the "
                "etcd runs are skipped, the embedded store's run\n",
                ETCD_RIG_BIN);
    } else if (etcd_rig_start(&g_etcd) < 0) {
        etcd_rig_destroy(&g_etcd);
        return 1;
    } else {
        g_stores[g_n_stores++] = g_etcd.url;
    }
    Suite *su = suite_create("failover");
    TCase *tc = tcase_create("processes");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_loop_test(tc, test_restore_on_other_worker, 0, g_n_stores);
    tcase_add_loop_test(tc, test_data_dir_not_reachable, 0, g_n_stores);
    tcase_set_timeout(tc, 120);
    suite_add_tcase(su, tc);
    /* the coordinator's findings (CK_RUN_CASE=coordinator runs these alone) */
    TCase *tc2 = tcase_create("coordinator");
    tcase_add_checked_fixture(tc2, setup, teardown);
    tcase_add_loop_test(tc2, test_exact_fit, 0, g_n_stores);
    tcase_add_test(tc2, test_etcd_paused);
    tcase_set_timeout(tc2, 120);
    suite_add_tcase(su, tc2);
    SRunner *sr = srunner_create(su);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    etcd_rig_destroy(&g_etcd);
    if (failed == 0) {
        char cmd[300];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_tmp);
        if (system(cmd) != 0) {
            fprintf(stderr, "test_failover: could not remove %s\n", g_tmp);
        }
    } else {
        fprintf(stderr, "test_failover: logs kept in %s\n", g_tmp);
    }
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
