/* The demo's surroundings: `kvstream up` as a child process, and the scheduler metrics of a
 * worker's status reply (see client/cli/demo.h). */
#include "client/cli/demo.h"

#include "common/wire.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#define READY_PREFIX "kvstream up: listening on "
#define PROGRESS_S 3.0   /* a "still loading" line this often */
#define STOP_WAIT_S 15.0 /* up's own shutdown takes the worker's drain (2 s) and a flush */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path) != 0 && errno != ENOENT ? -1 : 0;
}

static void remove_tmp(struct kvs_demo_up *u)
{
    if (u->tmp_dir[0] != '\0') {
        nftw(u->tmp_dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
        u->tmp_dir[0] = '\0';
    }
}

/* The worker's last line in the log (its reason, when it did not start), else the last
 * non-empty line, for an error message. */
static void last_log_line(const char *path, char *out, size_t size)
{
    out[0] = '\0';
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        return;
    }
    char line[512];
    bool worker = false;
    while (fgets(line, sizeof line, f) != NULL) {
        line[strcspn(line, "\r\n")] = '\0';
        bool w = strncmp(line, "kvs-worker", 10) == 0;
        if (line[0] != '\0' && (w || !worker)) {
            snprintf(out, size, "%s", line);
            worker = worker || w;
        }
    }
    fclose(f);
}

void kvs_demo_up_reason(const struct kvs_demo_up *u, char *out, size_t size)
{
    last_log_line(u->log_path, out, size);
}

/* Wait for pid until deadline (seconds of now_s): 0 with its *status, -1 when it still runs,
 * -2 when it cannot be waited for. */
static int wait_until(pid_t pid, double deadline, int *status)
{
    for (;;) {
        pid_t r = waitpid(pid, status, WNOHANG);
        if (r == pid || (r < 0 && errno != EINTR)) {
            return r == pid ? 0 : -2;
        }
        if (now_s() >= deadline) {
            return -1;
        }
        usleep(20000);
    }
}

int kvs_demo_up_stop(struct kvs_demo_up *u)
{
    int rc = 0;
    if (u->pid > 0) {
        int status = 0;
        kill(u->pid, SIGTERM);
        int w = wait_until(u->pid, now_s() + STOP_WAIT_S, &status);
        if (w == -1) {
            kill(u->pid, SIGKILL); /* its worker gets SIGTERM as up dies (parent-death signal) */
            waitpid(u->pid, &status, 0);
            rc = -1;
        } else if (w == 0) {
            rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        }
        u->pid = 0;
    }
    if (u->out_fd >= 0) {
        close(u->out_fd);
        u->out_fd = -1;
    }
    remove_tmp(u);
    return rc;
}

/* Read from fd into line[*len..] until a newline: 1 a complete line (NUL-terminated, no
 * newline), 0 not yet, -1 end of file. */
static int read_line(int fd, char *line, size_t size, size_t *len)
{
    for (;;) {
        char ch;
        ssize_t n = read(fd, &ch, 1);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && errno == EAGAIN) {
            return 0;
        }
        if (n <= 0) {
            return -1;
        }
        if (ch == '\n') {
            line[*len] = '\0';
            *len = 0;
            return 1;
        }
        if (*len + 1 < size) {
            line[(*len)++] = ch;
        }
    }
}

/* Stop the child and say why it did not come up, with the log's last line (the worker's
 * reason, usually). */
static int fail_start(struct kvs_demo_up *u, char *err, size_t errlen, const char *why)
{
    char last[512];
    last_log_line(u->log_path, last, sizeof last);
    kvs_demo_up_stop(u);
    snprintf(err, errlen, "%s%s%s", why, last[0] != '\0' ? ": " : "", last);
    return -1;
}

int kvs_demo_up_start(const struct kvs_demo_up_opts *o, struct kvs_demo_up *u, char *err,
                      size_t errlen)
{
    memset(u, 0, sizeof *u);
    u->out_fd = -1;
    const char *tmp = getenv("TMPDIR");
    snprintf(u->tmp_dir, sizeof u->tmp_dir, "%s/kvstream-demo.XXXXXX",
             tmp != NULL && tmp[0] != '\0' ? tmp : "/tmp");
    if (mkdtemp(u->tmp_dir) == NULL) {
        snprintf(err, errlen, "cannot create a temporary directory in %s: %s",
                 tmp != NULL && tmp[0] != '\0' ? tmp : "/tmp", strerror(errno));
        u->tmp_dir[0] = '\0';
        return -1;
    }
    if (snprintf(u->log_path, sizeof u->log_path, "%s/up.log", u->tmp_dir) >=
            (int)sizeof u->log_path ||
        snprintf(u->data_dir, sizeof u->data_dir, "%s%s", o->data_dir ? o->data_dir : u->tmp_dir,
                 o->data_dir ? "" : "/data") >= (int)sizeof u->data_dir) {
        snprintf(err, errlen, "the data dir's path is too long");
        remove_tmp(u);
        return -1;
    }
    const char *args[20];
    int n = 0;
    args[n++] = "kvstream", args[n++] = "up";
    args[n++] = "--listen", args[n++] = "tcp://127.0.0.1:0";
    args[n++] = "--data-dir", args[n++] = u->data_dir;
    args[n++] = "--fsync", args[n++] = "everysec"; /* a demo: an append waits for no disk */
    if (o->model != NULL) {
        args[n++] = "--model", args[n++] = o->model;
    }
    if (o->threads != NULL) {
        args[n++] = "--threads", args[n++] = o->threads;
    }
    if (o->device != NULL) {
        args[n++] = "--device", args[n++] = o->device;
    }
    args[n] = NULL;

    int log_fd = open(u->log_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    int out[2] = {-1, -1};
    if (log_fd < 0 || pipe2(out, O_CLOEXEC) != 0) {
        snprintf(err, errlen, "cannot set up the child's output: %s", strerror(errno));
        if (log_fd >= 0) {
            close(log_fd);
        }
        remove_tmp(u);
        return -1;
    }
    fflush(stdout);
    fflush(stderr);
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        /* Only async-signal-safe calls until exec: this process may have other threads. */
        setpgid(0, 0);
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent) {
            _exit(127); /* the parent died before the death signal was armed */
        }
        sigset_t all;
        sigemptyset(&all);
        sigprocmask(SIG_SETMASK, &all, NULL);
        dup2(out[1], STDOUT_FILENO);
        dup2(log_fd, STDERR_FILENO);
        execv("/proc/self/exe", (char *const *)args);
        static const char msg[] = "kvstream demo: cannot run /proc/self/exe\n";
        ssize_t w = write(STDERR_FILENO, msg, sizeof msg - 1);
        (void)w;
        _exit(127);
    }
    int fork_errno = errno;
    close(out[1]);
    close(log_fd);
    if (pid < 0) {
        close(out[0]);
        remove_tmp(u);
        snprintf(err, errlen, "fork: %s", strerror(fork_errno));
        return -1;
    }
    u->pid = pid;
    u->out_fd = out[0];
    fcntl(u->out_fd, F_SETFL, fcntl(u->out_fd, F_GETFL) | O_NONBLOCK);

    double t0 = now_s(), next_progress = t0 + PROGRESS_S;
    char line[1024];
    size_t len = 0;
    for (;;) {
        if (o->stop != NULL && atomic_load(o->stop) != 0) {
            return fail_start(u, err, errlen, "interrupted while the cluster was starting");
        }
        double t = now_s();
        if (t - t0 > o->timeout_s) {
            char why[128];
            snprintf(why, sizeof why, "the cluster did not come up within %.0f s (stopped it)",
                     o->timeout_s);
            return fail_start(u, err, errlen, why);
        }
        if (t >= next_progress) {
            printf("kvstream demo: waiting for the worker to load the model (%.0f s)\n", t - t0);
            fflush(stdout);
            next_progress += PROGRESS_S;
        }
        struct pollfd p = {.fd = u->out_fd, .events = POLLIN};
        if (poll(&p, 1, 200) <= 0) {
            continue; /* a timeout, or a signal: check again */
        }
        int r;
        while ((r = read_line(u->out_fd, line, sizeof line, &len)) == 1) {
            if (strncmp(line, READY_PREFIX, strlen(READY_PREFIX)) != 0) {
                continue; /* up's other lines: its help for a person at a terminal */
            }
            const char *ep = line + strlen(READY_PREFIX);
            size_t n_ep = strcspn(ep, " ");
            if (n_ep == 0 || n_ep >= sizeof u->endpoint) {
                return fail_start(u, err, errlen, "kvstream up printed a bad endpoint");
            }
            memcpy(u->endpoint, ep, n_ep);
            u->endpoint[n_ep] = '\0';
            return 0;
        }
        if (r < 0) {
            return fail_start(u, err, errlen, "kvstream up exited before it was ready");
        }
    }
}

/* ---- scheduler metrics ------------------------------------------------------------------------
 */

/* An unsigned integer field (a non-negative int of any encoding); false when absent. */
static bool mp_u64(const msgpack_object *m, const char *key, uint64_t *v)
{
    const msgpack_object *o = kvs_wire_map_get(m, key);
    if (o != NULL && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
        *v = o->via.u64;
        return true;
    }
    return false;
}

static bool mp_f64(const msgpack_object *m, const char *key, double *v)
{
    const msgpack_object *o = kvs_wire_map_get(m, key);
    if (o != NULL && (o->type == MSGPACK_OBJECT_FLOAT64 || o->type == MSGPACK_OBJECT_FLOAT32)) {
        *v = o->via.f64;
        return true;
    }
    if (o != NULL && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
        *v = (double)o->via.u64;
        return true;
    }
    return false;
}

/* One request {id: 1, op} over a socket of our own, and its reply, kept alive together. */
struct raw_reply {
    void *ctx, *sock;
    zmq_msg_t msg;          /* the payload frame (the unpacked object may point into it) */
    msgpack_unpacked up;
    const msgpack_object *m; /* the reply map, once received */
};

static void raw_free(struct raw_reply *r)
{
    msgpack_unpacked_destroy(&r->up);
    zmq_msg_close(&r->msg);
    if (r->sock != NULL) {
        zmq_close(r->sock);
    }
    if (r->ctx != NULL) {
        zmq_ctx_term(r->ctx);
    }
    memset(r, 0, sizeof *r);
}

/* Send {id: 1, op} to endpoint and read the reply into r (free with raw_free, also on
 * error). 0, or -1 with a reason in err. */
static int raw_call(const char *endpoint, const char *op, int timeout_ms, struct raw_reply *r,
                    char *err, size_t errlen)
{
    memset(r, 0, sizeof *r);
    zmq_msg_init(&r->msg);
    msgpack_unpacked_init(&r->up);
    char request[64];
    size_t n_op = strlen(op);
    if (n_op > 31) {
        snprintf(err, errlen, "%s: op too long", op);
        return -1;
    }
    memcpy(request, "\x82\xa2id\x01\xa2op", 8); /* {"id": 1, "op": <fixstr>} */
    request[8] = (char)(0xa0 | n_op);
    memcpy(request + 9, op, n_op);
    r->ctx = zmq_ctx_new();
    r->sock = r->ctx != NULL ? zmq_socket(r->ctx, ZMQ_DEALER) : NULL;
    if (r->sock == NULL) {
        snprintf(err, errlen, "%s: cannot create a socket: %s", op, zmq_strerror(zmq_errno()));
        return -1;
    }
    int linger = 0;
    int64_t max_size = KVS_WIRE_MAX_FRAME + 64;
    zmq_setsockopt(r->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(r->sock, ZMQ_MAXMSGSIZE, &max_size, sizeof max_size);
    if (zmq_connect(r->sock, endpoint) != 0 || zmq_send(r->sock, "", 0, ZMQ_SNDMORE) != 0 ||
        zmq_send(r->sock, request, 9 + n_op, 0) != (int)(9 + n_op)) {
        snprintf(err, errlen, "%s: cannot send to %s: %s", op, endpoint,
                 zmq_strerror(zmq_errno()));
        return -1;
    }
    zmq_pollitem_t item = {.socket = r->sock, .events = ZMQ_POLLIN};
    if (zmq_poll(&item, 1, timeout_ms) <= 0) {
        snprintf(err, errlen, "%s: no reply from %s within %d ms", op, endpoint, timeout_ms);
        return -1;
    }
    /* two frames: the empty delimiter, then the payload */
    int n_parts = 0;
    size_t n_delim = 1;
    for (bool more = true; more; n_parts++) {
        zmq_msg_close(&r->msg);
        zmq_msg_init(&r->msg);
        if (zmq_msg_recv(&r->msg, r->sock, 0) < 0) {
            snprintf(err, errlen, "%s: %s", op, zmq_strerror(zmq_errno()));
            return -1;
        }
        more = zmq_msg_more(&r->msg);
        if (n_parts == 0) {
            n_delim = zmq_msg_size(&r->msg);
        }
    }
    const uint8_t *buf = zmq_msg_data(&r->msg);
    size_t n = zmq_msg_size(&r->msg);
    if (n_parts != 2 || n_delim != 0 || kvs_wire_prevalidate(buf, n, NULL, 0) != 0 ||
        msgpack_unpack_next(&r->up, (const char *)buf, n, NULL) != MSGPACK_UNPACK_SUCCESS) {
        snprintf(err, errlen, "%s: the reply of %s is not one valid protocol message", op,
                 endpoint);
        return -1;
    }
    r->m = &r->up.data;
    return 0;
}

/* The error of a reply: false when it is none; else its code and message. */
static bool reply_error(const msgpack_object *m, char code[32], char *msg, size_t size)
{
    const msgpack_object *e = kvs_wire_map_get(m, "error");
    if (e == NULL) {
        return false;
    }
    const msgpack_object *c = kvs_wire_map_get(e, "code"), *text = kvs_wire_map_get(e, "message");
    bool has_text = text != NULL && text->type == MSGPACK_OBJECT_STR;
    bool has_code = c != NULL && c->type == MSGPACK_OBJECT_STR && c->via.str.size < 32;
    snprintf(msg, size, "%.*s", has_text ? (int)text->via.str.size : 0,
             has_text ? text->via.str.ptr : "");
    snprintf(code, 32, "%.*s", has_code ? (int)c->via.str.size : 5,
             has_code ? c->via.str.ptr : "ERROR");
    return true;
}

/* Add the scheduler metrics of one worker's status reply m to s. */
static int add_sched(const msgpack_object *m, struct kvs_demo_sched *s, char *err, size_t errlen)
{
    static const char *const classes[KVS_DEMO_N_CLASSES] = {"decode", "question", "append",
                                                            "flash"};
    const msgpack_object *sc = kvs_wire_map_get(m, "scheduler"), *fl = kvs_wire_map_get(m, "flash");
    const msgpack_object *rows = kvs_wire_map_get(sc, "rows");
    struct kvs_demo_sched w = {0};
    uint64_t last = 0, most = 0;
    bool ok = mp_u64(sc, "steps", &w.steps) && mp_f64(sc, "occupancy", &w.occupancy) &&
              mp_u64(sc, "last_n_seqs", &last) && mp_u64(sc, "max_n_seqs", &most) &&
              mp_u64(fl, "evaluations", &w.flash_evaluations) &&
              mp_u64(fl, "wasted", &w.flash_wasted) && mp_u64(fl, "hits", &w.flash_hits) &&
              mp_u64(fl, "misses", &w.flash_misses);
    for (int i = 0; ok && i < KVS_DEMO_N_CLASSES; i++) {
        ok = mp_u64(rows, classes[i], &w.rows[i]);
    }
    if (!ok) {
        snprintf(err, errlen, "status: the reply lacks the scheduler metrics (a worker of "
                              "protocol 1.0?)");
        return -1;
    }
    s->steps += w.steps;
    for (int i = 0; i < KVS_DEMO_N_CLASSES; i++) {
        s->rows[i] += w.rows[i];
    }
    s->occupancy = (s->occupancy * s->n_workers + w.occupancy) / (s->n_workers + 1);
    s->last_n_seqs += (int64_t)last;
    s->max_n_seqs = (int64_t)most > s->max_n_seqs ? (int64_t)most : s->max_n_seqs;
    s->flash_evaluations += w.flash_evaluations;
    s->flash_wasted += w.flash_wasted;
    s->flash_hits += w.flash_hits;
    s->flash_misses += w.flash_misses;
    s->n_workers++;
    return 0;
}

int kvs_demo_sched_status(const char *endpoint, int timeout_ms, struct kvs_demo_sched *s, char *err,
                          size_t errlen)
{
    memset(s, 0, sizeof *s);
    char code[32], msg[256];
    struct raw_reply r;
    int rc = raw_call(endpoint, "status", timeout_ms, &r, err, errlen);
    bool refused = rc == 0 && reply_error(r.m, code, msg, sizeof msg);
    if (rc == 0 && !refused) {
        rc = add_sched(r.m, s, err, errlen); /* a worker */
    } else if (refused && strcmp(code, "UNSUPPORTED") != 0) {
        snprintf(err, errlen, "status: %s: %s", code, msg);
        rc = -1;
    } else if (refused) {
        /* a coordinator: ask each of its ready workers */
        raw_free(&r);
        rc = raw_call(endpoint, "admin.workers", timeout_ms, &r, err, errlen);
        refused = rc == 0 && reply_error(r.m, code, msg, sizeof msg);
        const msgpack_object *ws = rc == 0 ? kvs_wire_map_get(r.m, "workers") : NULL;
        if (rc == 0 && (refused || ws == NULL || ws->type != MSGPACK_OBJECT_ARRAY)) {
            snprintf(err, errlen, "admin.workers: %s: %s", refused ? code : "BAD_FORMAT",
                     refused ? msg : "no workers array");
            rc = -1;
        }
        for (uint32_t i = 0; rc == 0 && i < ws->via.array.size; i++) {
            const msgpack_object *w = &ws->via.array.ptr[i];
            const msgpack_object *ep = kvs_wire_map_get(w, "endpoint");
            const msgpack_object *state = kvs_wire_map_get(w, "state");
            if (ep == NULL || ep->type != MSGPACK_OBJECT_STR || ep->via.str.size >= 256 ||
                state == NULL || state->type != MSGPACK_OBJECT_STR ||
                state->via.str.size != 5 || memcmp(state->via.str.ptr, "ready", 5) != 0) {
                continue;
            }
            char wep[256];
            memcpy(wep, ep->via.str.ptr, ep->via.str.size);
            wep[ep->via.str.size] = '\0';
            struct raw_reply wr;
            rc = raw_call(wep, "status", timeout_ms, &wr, err, errlen);
            if (rc == 0 && reply_error(wr.m, code, msg, sizeof msg)) {
                snprintf(err, errlen, "status of %s: %s: %s", wep, code, msg);
                rc = -1;
            }
            if (rc == 0) {
                rc = add_sched(wr.m, s, err, errlen);
            }
            raw_free(&wr);
        }
        if (rc == 0 && s->n_workers == 0) {
            snprintf(err, errlen, "admin.workers: no ready worker");
            rc = -1;
        }
    }
    raw_free(&r);
    return rc;
}
