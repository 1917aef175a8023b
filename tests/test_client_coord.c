/* libkvstream through a coordinator: a real kvs-coordinator (embedded store in a temporary
 * directory, --shared-data-dir, short leases) in front of two real kvs-workers started with
 * --coordinator (each registers and heartbeats by itself), the default model.
 *
 *   - the client tells the coordinator from a worker by its hello and keeps the same API:
 *     create (placed by the coordinator, held by the worker it chose), info, append, query,
 *     flash, list (the directory), status (the ready workers summed), close (both);
 *   - the data path goes to the worker directly: the session is on exactly one worker, whose
 *     own session.list shows it;
 *   - refusals: a model no worker serves (MODEL_MISMATCH), a bad model, a name taken
 *     (ALREADY_EXISTS), a session its worker refuses (CONTEXT_FULL: the placement is taken
 *     back, the name is free again);
 *   - a worker SIGKILLed: the coordinator restores its session on the other worker and the
 *     same client goes on (re-located) with every acknowledged append in order; a flash
 *     watch on it is taken up on the new worker and gets the answers computed there;
 *   - a standby coordinator (a small ROUTER of this test answering NOT_LEADER with the real
 *     leader's endpoint) is followed to the leader. */
#include "client/include/kvstream.h"
#include "tests/testutil.h"

#include <check.h>
#include <errno.h>
#include <msgpack.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

struct proc {
    pid_t pid;
    FILE *out;          /* its standard output (the ready line) */
    char endpoint[256];
};

static char g_model[600];
static char g_worker_bin[1024], g_coord_bin[1024];
static char g_tmp[256];           /* this run's scratch dir */
static struct proc g_coord;       /* the coordinator of every test */
static struct proc g_workers[2];  /* "wa", "wb" */
static const char *const g_ids[2] = {"wa", "wb"};

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* fork/exec argv with stdout on a pipe and stderr appended to log; 0 once it printed its
 * "listening on EP" line. */
static int proc_start(struct proc *p, char *const argv[], const char *log)
{
    int fds[2];
    if (pipe(fds) != 0) {
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        return -1;
    }
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        dup2(fds[1], STDOUT_FILENO);
        close(fds[0]);
        close(fds[1]);
        FILE *e = freopen(log, "a", stderr);
        (void)e;
        execv(argv[0], argv);
        _exit(127);
    }
    close(fds[1]);
    p->pid = pid;
    p->out = fdopen(fds[0], "r");
    char line[512];
    if (p->out == NULL || fgets(line, sizeof line, p->out) == NULL) {
        return -1;
    }
    char *at = strstr(line, "listening on ");
    if (at == NULL) {
        return -1;
    }
    at += strlen("listening on ");
    at[strcspn(at, "\r\n")] = '\0';
    snprintf(p->endpoint, sizeof p->endpoint, "%s", at);
    return 0;
}

static int proc_stop(struct proc *p, int sig)
{
    if (p->pid <= 0) {
        return -1;
    }
    kill(p->pid, sig);
    int status = 0;
    while (waitpid(p->pid, &status, 0) < 0 && errno == EINTR) {
    }
    p->pid = 0;
    if (p->out != NULL) {
        fclose(p->out);
        p->out = NULL;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static int worker_start(int i)
{
    char root[400], log[400];
    snprintf(root, sizeof root, "%s/data", g_tmp);
    snprintf(log, sizeof log, "%s/%s.log", g_tmp, g_ids[i]);
    mkdir(root, 0700);
    char *argv[] = {g_worker_bin,  "--model",     g_model,        "--listen",
                    "tcp://127.0.0.1:0", "--threads", "1",        "--cells",
                    "4096",        "--data-dir",  root,           "--fsync",
                    "always",      "--coordinator", g_coord.endpoint, "--worker-id",
                    (char *)g_ids[i], NULL};
    return proc_start(&g_workers[i], argv, log);
}

static kvs_client *connect_to(const char *ep, int32_t timeout_ms)
{
    struct kvs_client_opts o = {.timeout_ms = timeout_ms, .connect_timeout_ms = 10000};
    kvs_client *c = NULL;
    char err[256] = "";
    int rc = kvs_client_connect(ep, &o, &c, err, sizeof err);
    ck_assert_msg(rc == 0, "connect %s: %s (%s)", ep, err, kvs_status_name(rc));
    return c;
}

#define OK(c, call)                                                                        \
    do {                                                                                   \
        int rc_ = (call);                                                                  \
        ck_assert_msg(rc_ == 0, "%s: %s (%s)", #call, kvs_client_error(c),                \
                      kvs_status_name(rc_));                                               \
    } while (0)

#define FAILS(c, want, call)                                                               \
    do {                                                                                   \
        int rc_ = (call);                                                                  \
        ck_assert_msg(rc_ == (want), "%s: got %s (%s), want %s", #call,                    \
                      kvs_status_name(rc_), kvs_client_error(c), kvs_status_name(want));   \
        ck_assert_msg(kvs_client_error(c)[0] != '\0', "%s: no message", #call);            \
    } while (0)

/* Wait until the coordinator's status counts `want` ready workers' cells (4096 each). */
static void wait_ready(int want)
{
    kvs_client *c = connect_to(g_coord.endpoint, 2000);
    struct kvs_client_status st = {0};
    for (int i = 0; i < 300; i++) {
        if (kvs_client_status(c, &st) == 0 && st.cells_total == 4096 * want) {
            break;
        }
        sleep_ms(100);
    }
    ck_assert_msg(st.cells_total == 4096 * want, "%d workers not ready: %s (cells %lld)", want,
                  kvs_client_error(c), (long long)st.cells_total);
    kvs_client_destroy(&c);
}

/* Which worker (index) holds session, asked of each worker directly; -1 when none. */
static int holder(const char *session)
{
    int at = -1;
    for (int i = 0; i < 2; i++) {
        if (g_workers[i].pid <= 0) {
            continue;
        }
        kvs_client *w = connect_to(g_workers[i].endpoint, 5000);
        char **names = NULL;
        int32_t n = 0;
        OK(w, kvs_client_session_list(w, &names, &n));
        for (int32_t j = 0; j < n; j++) {
            if (strcmp(names[j], session) == 0) {
                ck_assert_msg(at < 0, "session %s on two workers", session);
                at = i;
            }
        }
        kvs_client_names_free(&names, n);
        kvs_client_destroy(&w);
    }
    return at;
}

static bool listed(kvs_client *c, const char *session)
{
    char **names = NULL;
    int32_t n = 0;
    OK(c, kvs_client_session_list(c, &names, &n));
    bool found = false;
    for (int32_t j = 0; j < n; j++) {
        found = found || strcmp(names[j], session) == 0;
    }
    kvs_client_names_free(&names, n);
    return found;
}

/* ---- the API through a coordinator ---------------------------------------------------------- */

START_TEST(test_sessions_through_coordinator)
{
    kvs_client *c = connect_to(g_coord.endpoint, 30000);
    double rtt = -1;
    OK(c, kvs_client_ping(c, &rtt)); /* answered by the coordinator */
    ck_assert(rtt >= 0);
    struct kvs_client_status st;
    OK(c, kvs_client_status(c, &st));
    ck_assert_int_eq(st.cells_total, 2 * 4096);
    ck_assert_int_eq(strlen(st.model_sha256), 64);
    ck_assert(st.n_ctx > 0);

    struct kvs_client_session_info in;
    OK(c, kvs_client_session_create(c, "c1", &(struct kvs_client_session_opts){.cells = 1024},
                                    &in));
    ck_assert_int_eq(in.cells_budget, 1024);
    int at = holder("c1");
    ck_assert_msg(at >= 0, "c1 is on no worker");
    ck_assert(listed(c, "c1"));
    FAILS(c, KVS_ALREADY_EXISTS,
          kvs_client_session_create(c, "c1", &(struct kvs_client_session_opts){.cells = 64},
                                    NULL));

    struct kvs_client_append_result r;
    OK(c, kvs_client_append(c, "c1", "AAPL 189.20", 11, &r));
    ck_assert_int_eq(r.version, 1);
    OK(c, kvs_client_append(c, "c1", "AAPL 190.10", 11, &r));
    ck_assert_int_eq(r.version, 2);
    OK(c, kvs_client_session_info(c, "c1", &in));
    ck_assert_int_eq(in.appends, 2);
    ck_assert_int_eq(in.cells_budget, 1024);
    struct kvs_client_answer a = {0}, b = {0};
    OK(c, kvs_client_query(c, "c1", "Last AAPL price:",
                           &(struct kvs_client_query_opts){.max_tokens = 6}, NULL, NULL, &a));
    ck_assert_int_eq(a.version, 2);
    OK(c, kvs_client_flash_register(c, "c1", "last", "Last AAPL price:",
                                    &(struct kvs_client_flash_opts){.query.max_tokens = 6}));
    OK(c, kvs_client_flash_get(c, "c1", "last", false, &b));
    ck_assert_int_eq(a.n_tokens, b.n_tokens);
    ck_assert(memcmp(a.tokens, b.tokens, (size_t)a.n_tokens * sizeof *a.tokens) == 0);
    kvs_client_answer_free(&a);
    kvs_client_answer_free(&b);

    /* the same session as its worker sees it, asked directly */
    kvs_client *w = connect_to(g_workers[at].endpoint, 5000);
    OK(w, kvs_client_session_info(w, "c1", &in));
    ck_assert_int_eq(in.appends, 2);
    kvs_client_destroy(&w);

    /* a second session: the budget placed, the worker's default when 0 */
    int rc = kvs_client_session_create(c, "c2", NULL, &in);
    if (st.n_ctx - 512 <= 4096) { /* fits the other worker */
        ck_assert_msg(rc == 0, "default budget: %s", kvs_client_error(c));
        ck_assert_int_eq(in.cells_budget, st.n_ctx - 512);
        OK(c, kvs_client_session_close(c, "c2"));
    } else {
        /* the default (n_ctx - 512) does not fit a 4096-cell worker: said by the coordinator */
        ck_assert_msg(rc == KVS_CAPACITY, "default budget: %s (%s)", kvs_status_name(rc),
                      kvs_client_error(c));
        ck_assert(!listed(c, "c2"));
    }

    OK(c, kvs_client_session_close(c, "c1"));
    ck_assert(!listed(c, "c1"));
    ck_assert_int_eq(holder("c1"), -1);
    FAILS(c, KVS_NOT_FOUND, kvs_client_session_info(c, "c1", &in));
    FAILS(c, KVS_NOT_FOUND, kvs_client_session_close(c, "c1"));
    FAILS(c, KVS_NOT_FOUND, kvs_client_append(c, "c1", "x", 1, NULL));
    kvs_client_destroy(&c);
}
END_TEST

START_TEST(test_refusals)
{
    kvs_client *c = connect_to(g_coord.endpoint, 30000);
    static const char zeros[] =
        "0000000000000000000000000000000000000000000000000000000000000000";
    FAILS(c, KVS_MODEL_MISMATCH,
          kvs_client_session_create(
              c, "r1", &(struct kvs_client_session_opts){.cells = 64, .model = zeros}, NULL));
    FAILS(c, KVS_INVALID_ARGUMENT,
          kvs_client_session_create(
              c, "r1", &(struct kvs_client_session_opts){.cells = 64, .model = "abc"}, NULL));
    FAILS(c, KVS_CAPACITY,
          kvs_client_session_create(c, "r1", &(struct kvs_client_session_opts){.cells = 5000},
                                    NULL));
    ck_assert_msg(strstr(kvs_client_error(c), "4096") != NULL, /* the largest free count */
                  "%s", kvs_client_error(c));
    /* the worker refuses it (a prefix larger than the budget): the placement is taken back */
    const char *prefix = "A prefix that is certainly longer than eight tokens, by a wide margin.";
    FAILS(c, KVS_CONTEXT_FULL,
          kvs_client_session_create(
              c, "r1", &(struct kvs_client_session_opts){.cells = 8, .prefix = prefix}, NULL));
    ck_assert(!listed(c, "r1"));
    ck_assert_int_eq(holder("r1"), -1);
    OK(c, kvs_client_session_create(c, "r1", &(struct kvs_client_session_opts){.cells = 64},
                                    NULL));
    OK(c, kvs_client_session_close(c, "r1"));
    kvs_client_destroy(&c);
}
END_TEST

/* ---- a worker dies: the session is restored elsewhere and found again ------------------------ */

START_TEST(test_worker_killed_session_found_again)
{
    kvs_client *c = connect_to(g_coord.endpoint, 20000);
    OK(c, kvs_client_session_create(c, "k1", &(struct kvs_client_session_opts){.cells = 512},
                                    NULL));
    const char *recs[] = {"T 1", "T 2", "T 3", "T 4", "T 5", "T 6"};
    for (int i = 0; i < 3; i++) {
        OK(c, kvs_client_append(c, "k1", recs[i], strlen(recs[i]), NULL));
    }
    int at = holder("k1");
    ck_assert(at >= 0);
    ck_assert_int_eq(proc_stop(&g_workers[at], SIGKILL), -1);
    /* The next calls wait (re-locating with back-off) until the coordinator declared the
     * worker down (lease TTL 2 s) and restored k1 on the other one. */
    for (int i = 3; i < 6; i++) {
        struct kvs_client_append_result r;
        OK(c, kvs_client_append(c, "k1", recs[i], strlen(recs[i]), &r));
        ck_assert_int_eq(r.version, (uint64_t)i + 1);
        ck_assert(!r.duplicate);
    }
    ck_assert_int_eq(holder("k1"), 1 - at);
    struct kvs_client_dump d = {0};
    OK(c, kvs_client_session_dump(c, "k1", &d));
    ck_assert_str_eq(d.text, "T 1\nT 2\nT 3\nT 4\nT 5\nT 6\n");
    kvs_client_dump_free(&d);
    OK(c, kvs_client_session_close(c, "k1"));
    kvs_client_destroy(&c);
    /* the killed worker comes back (its id, a new port) for the other tests */
    ck_assert_int_eq(worker_start(at), 0);
    wait_ready(2);
}
END_TEST

/* ---- a watch follows its session to the worker it was restored on ----------------------- */

struct watcher {
    kvs_client *c;
    atomic_llong last_version;    /* highest answer version seen */
    int64_t until;                /* stop once an answer at this version came */
    int rc;
};

static bool on_answer(const struct kvs_client_answer *a, void *user)
{
    struct watcher *w = user;
    if ((long long)a->version > atomic_load(&w->last_version)) {
        atomic_store(&w->last_version, (long long)a->version);
    }
    return (int64_t)a->version < w->until;
}

static void *watch_main(void *arg)
{
    struct watcher *w = arg;
    w->rc = kvs_client_flash_watch(w->c, "wt", "last", 0, on_answer, w);
    return NULL;
}

static bool wait_version(struct watcher *w, long long v, int ms)
{
    for (int i = 0; i < ms / 50 && atomic_load(&w->last_version) < v; i++) {
        sleep_ms(50);
    }
    return atomic_load(&w->last_version) >= v;
}

START_TEST(test_watch_follows_restore)
{
    kvs_client *c = connect_to(g_coord.endpoint, 20000);
    OK(c, kvs_client_session_create(c, "wt", &(struct kvs_client_session_opts){.cells = 512},
                                    NULL));
    OK(c, kvs_client_flash_register(c, "wt", "last", "Last:",
                                    &(struct kvs_client_flash_opts){.query.max_tokens = 2}));
    OK(c, kvs_client_append(c, "wt", "A 1", 3, NULL));
    struct watcher w = {.c = connect_to(g_coord.endpoint, 20000), .until = 3};
    atomic_init(&w.last_version, -1);
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, watch_main, &w), 0);
    ck_assert_msg(wait_version(&w, 1, 30000), "the watch got no answer at version 1");
    int at = holder("wt");
    ck_assert(at >= 0);
    ck_assert_int_eq(proc_stop(&g_workers[at], SIGKILL), -1);
    OK(c, kvs_client_append(c, "wt", "A 2", 3, NULL)); /* waits for the restore */
    ck_assert_int_eq(holder("wt"), 1 - at);
    OK(c, kvs_client_append(c, "wt", "A 3", 3, NULL));
    bool got = wait_version(&w, 3, 60000);
    if (!got) {
        kvs_client_cancel(w.c);
    }
    pthread_join(th, NULL);
    ck_assert_msg(got, "the watch stopped at version %lld (%s)", atomic_load(&w.last_version),
                  kvs_client_error(w.c));
    ck_assert_msg(w.rc == 0, "watch: %s (%s)", kvs_status_name(w.rc), kvs_client_error(w.c));
    kvs_client_destroy(&w.c);
    OK(c, kvs_client_session_close(c, "wt"));
    kvs_client_destroy(&c);
    ck_assert_int_eq(worker_start(at), 0);
    wait_ready(2);
}
END_TEST

/* ---- NOT_LEADER ------------------------------------------------------------------------------- */

struct standby {
    void *ctx, *sock;
    char endpoint[256];
    const char *leader;
    pthread_t thread;
    atomic_int stop, not_leader; /* NOT_LEADER replies sent */
};

/* A standby coordinator: hello as kvs-coordinator (leader: false), NOT_LEADER to the rest. */
static void *standby_main(void *arg)
{
    struct standby *s = arg;
    while (!atomic_load(&s->stop)) {
        zmq_pollitem_t it = {s->sock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&it, 1, 50) <= 0) {
            continue;
        }
        zmq_msg_t f[3];
        int n = 0;
        bool more = true;
        while (more && n < 3) {
            zmq_msg_init(&f[n]);
            zmq_msg_recv(&f[n], s->sock, 0);
            more = zmq_msg_more(&f[n]);
            n++;
        }
        msgpack_unpacked up;
        msgpack_unpacked_init(&up);
        uint64_t id = 0;
        bool hello = false;
        if (n == 3 && msgpack_unpack_next(&up, zmq_msg_data(&f[2]), zmq_msg_size(&f[2]),
                                          NULL) == MSGPACK_UNPACK_SUCCESS &&
            up.data.type == MSGPACK_OBJECT_MAP) {
            for (uint32_t i = 0; i < up.data.via.map.size; i++) {
                const msgpack_object_kv *kv = &up.data.via.map.ptr[i];
                if (kv->key.via.str.size == 2 && memcmp(kv->key.via.str.ptr, "id", 2) == 0) {
                    id = kv->val.via.u64;
                }
                if (kv->key.via.str.size == 2 && memcmp(kv->key.via.str.ptr, "op", 2) == 0) {
                    hello = kv->val.via.str.size == 5 &&
                            memcmp(kv->val.via.str.ptr, "hello", 5) == 0;
                }
            }
        }
        msgpack_unpacked_destroy(&up);
        msgpack_sbuffer sb;
        msgpack_sbuffer_init(&sb);
        msgpack_packer pk;
        msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
#define KEY(s) (msgpack_pack_str(&pk, strlen(s)), msgpack_pack_str_body(&pk, s, strlen(s)))
        if (hello) {
            msgpack_pack_map(&pk, 4);
            KEY("id"), msgpack_pack_uint64(&pk, id);
            KEY("version"), msgpack_pack_uint32(&pk, 1);
            KEY("server"), KEY("kvs-coordinator");
            KEY("leader"), msgpack_pack_false(&pk);
        } else {
            msgpack_pack_map(&pk, 2);
            KEY("id"), msgpack_pack_uint64(&pk, id);
            KEY("error");
            msgpack_pack_map(&pk, 4);
            KEY("code"), KEY("NOT_LEADER");
            KEY("status"), msgpack_pack_int(&pk, KVS_NOT_LEADER);
            KEY("message"), KEY("this coordinator is standing by");
            KEY("leader"), KEY(s->leader);
            atomic_fetch_add(&s->not_leader, 1);
        }
#undef KEY
        zmq_send(s->sock, zmq_msg_data(&f[0]), zmq_msg_size(&f[0]), ZMQ_SNDMORE);
        zmq_send(s->sock, "", 0, ZMQ_SNDMORE);
        zmq_send(s->sock, sb.data, sb.size, 0);
        msgpack_sbuffer_destroy(&sb);
        for (int i = 0; i < n; i++) {
            zmq_msg_close(&f[i]);
        }
    }
    return NULL;
}

START_TEST(test_not_leader_is_followed)
{
    struct standby s = {.leader = g_coord.endpoint};
    s.ctx = zmq_ctx_new();
    s.sock = zmq_socket(s.ctx, ZMQ_ROUTER);
    int zero = 0;
    zmq_setsockopt(s.sock, ZMQ_LINGER, &zero, sizeof zero);
    ck_assert_int_eq(zmq_bind(s.sock, "tcp://127.0.0.1:*"), 0);
    size_t len = sizeof s.endpoint;
    zmq_getsockopt(s.sock, ZMQ_LAST_ENDPOINT, s.endpoint, &len);
    ck_assert_int_eq(pthread_create(&s.thread, NULL, standby_main, &s), 0);

    kvs_client *c = connect_to(s.endpoint, 10000);
    OK(c, kvs_client_session_create(c, "n1", &(struct kvs_client_session_opts){.cells = 64},
                                    NULL));
    ck_assert_int_eq(atomic_load(&s.not_leader), 1); /* once: then the leader is home */
    ck_assert_str_eq(kvs_client_endpoint(c), g_coord.endpoint);
    OK(c, kvs_client_append(c, "n1", "x", 1, NULL));
    OK(c, kvs_client_session_close(c, "n1"));
    ck_assert_int_eq(atomic_load(&s.not_leader), 1);
    kvs_client_destroy(&c);

    atomic_store(&s.stop, 1);
    pthread_join(s.thread, NULL);
    zmq_close(s.sock);
    zmq_ctx_term(s.ctx);
}
END_TEST

int main(void)
{
    snprintf(g_model, sizeof g_model, "%s", kvs_test_default_model());
    if (access(g_model, R_OK) != 0) {
        fprintf(stderr, "test_client_coord: the default model %s is missing (scripts/setup.sh "
                        "fetches it): skipped\n",
                g_model);
        return 77;
    }
    const char *wb = getenv("KVS_WORKER"), *cb = getenv("KVS_COORDINATOR");
    if (wb == NULL || cb == NULL || access(wb, X_OK) != 0 || access(cb, X_OK) != 0) {
        fprintf(stderr, "test_client_coord: KVS_WORKER and KVS_COORDINATOR must name the "
                        "built kvs-worker and kvs-coordinator (ctest sets them)\n");
        return 1;
    }
    snprintf(g_worker_bin, sizeof g_worker_bin, "%s", wb);
    snprintf(g_coord_bin, sizeof g_coord_bin, "%s", cb);
    snprintf(g_tmp, sizeof g_tmp, "/tmp/kvs-test-client-coord-XXXXXX");
    if (mkdtemp(g_tmp) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    char store[400], log[400];
    snprintf(store, sizeof store, "file:%s/cluster.store", g_tmp);
    snprintf(log, sizeof log, "%s/coordinator.log", g_tmp);
    char *argv[] = {g_coord_bin,        "--listen",     "tcp://127.0.0.1:*", "--store",
                    store,              "--worker-ttl", "2",                 "--leader-ttl",
                    "2",                "--heartbeat-ms", "200",             "--shared-data-dir",
                    "--move-timeout-ms", "20000",       NULL};
    if (proc_start(&g_coord, argv, log) != 0) {
        fprintf(stderr, "test_client_coord: kvs-coordinator did not start (see %s)\n", log);
        return 1;
    }
    for (int i = 0; i < 2; i++) {
        if (worker_start(i) != 0) {
            fprintf(stderr, "test_client_coord: kvs-worker %s did not start (see %s)\n",
                    g_ids[i], g_tmp);
            return 1;
        }
    }
    Suite *su = suite_create("client_coord");
    TCase *tc = tcase_create("client_coord");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_sessions_through_coordinator);
    tcase_add_test(tc, test_refusals);
    tcase_add_test(tc, test_not_leader_is_followed);
    tcase_add_test(tc, test_worker_killed_session_found_again);
    tcase_add_test(tc, test_watch_follows_restore);
    suite_add_tcase(su, tc);
    SRunner *sr = srunner_create(su);
    srunner_set_fork_status(sr, CK_NOFORK); /* the tests share (and restart) the processes */
    /* the workers register by themselves: wait for both before the first test */
    kvs_client *c = NULL;
    struct kvs_client_opts o = {.timeout_ms = 2000, .connect_timeout_ms = 10000};
    int ready = 0;
    if (kvs_client_connect(g_coord.endpoint, &o, &c, NULL, 0) == 0) {
        struct kvs_client_status st;
        for (int i = 0; i < 300 && !ready; i++) {
            ready = kvs_client_status(c, &st) == 0 && st.cells_total == 2 * 4096;
            if (!ready) {
                sleep_ms(100);
            }
        }
    }
    kvs_client_destroy(&c);
    int failed = 1;
    if (!ready) {
        fprintf(stderr, "test_client_coord: the workers did not register (see %s)\n", g_tmp);
    } else {
        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
    }
    srunner_free(sr);
    for (int i = 0; i < 2; i++) {
        if (g_workers[i].pid > 0 && proc_stop(&g_workers[i], SIGTERM) != 0) {
            fprintf(stderr, "test_client_coord: worker %s did not exit 0 after SIGTERM\n",
                    g_ids[i]);
            failed++;
        }
    }
    if (proc_stop(&g_coord, SIGTERM) != 0) {
        fprintf(stderr, "test_client_coord: the coordinator did not exit 0 after SIGTERM\n");
        failed++;
    }
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_tmp);
    if (failed == 0 && system(cmd) != 0) {
        fprintf(stderr, "test_client_coord: could not remove %s\n", g_tmp);
    }
    return failed == 0 ? 0 : 1;
}
