/* kvstream up: a single-node cluster in the foreground.
 *
 * Starts an embedded coordinator, kvs-coordinator with its embedded store in
 * DATA_DIR/cluster.store, listening on --listen (the endpoint clients use), then one
 * kvs-worker per device (--device cuda: one per GPU the NVIDIA driver lists; cpu or cuda:N:
 * one) on an ephemeral loopback port with --coordinator pointing at it and DATA_DIR as the
 * workers' shared data root (worker ID keeps its sessions in DATA_DIR/ID: cpu0, cuda0, ...;
 * they come back at the next start, and the coordinator's placements with them). Both
 * programs are found next to this binary (the build tree and an install put them side by
 * side; $KVS_COORDINATOR and $KVS_WORKER override). `up` waits until every worker has
 * registered with the coordinator at its new endpoint and heartbeats (admin.workers), prints
 * the endpoints, forwards SIGINT / SIGTERM to every child and exits when they have exited:
 * with 0 after a clean stop, or with the status of a child that exited by itself (the others
 * are stopped then). */
#include "client/cli/cmd.h"
#include "client/cli/remote.h"

#include "common/wire.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <msgpack.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#define CMD "up"
#define COORD_READY "kvs-coordinator: listening on "
#define WORKER_READY "kvs-worker: listening on "
#define MAX_WORKERS 16
#define REGISTER_WAIT_MS 60000 /* how long the workers may take to register */

enum { OPT_DEVICE = KVS_CLI_OPT_FIRST_LOCAL, OPT_LISTEN, OPT_DATA_DIR, OPT_CELLS, OPT_FSYNC };

struct child {
    const char *what;         /* "kvs-coordinator", "kvs-worker" */
    char id[32];              /* worker id ("cpu0", "cuda1"); "" for the coordinator */
    char device[32];          /* --device of a worker */
    pid_t pid;                /* 0 once reaped */
    int out;                  /* its standard output (read end), -1 when closed */
    char endpoint[512];       /* from its ready line */
    int status;               /* exit status once reaped, as kvstream reports it */
};

static struct child g_kids[1 + MAX_WORKERS]; /* [0] = the coordinator */
static int g_n_kids;
static volatile sig_atomic_t g_pids[1 + MAX_WORKERS]; /* for the signal handler */
static volatile sig_atomic_t g_signal = 0;            /* the last signal received */

static void on_signal(int sig)
{
    g_signal = sig;
    for (int i = 0; i < 1 + MAX_WORKERS; i++) {
        if (g_pids[i] > 0) {
            kill((pid_t)g_pids[i], sig);
        }
    }
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvstream up [-m MODEL] [--device cpu|cuda|cuda:N] [--listen EP]\n"
            "                   [--data-dir DIR] [-t THREADS] [--cells N]\n"
            "                   [--fsync always|everysec|no]\n"
            "\n"
            "Run a single-node kvstream cluster in the foreground: a coordinator (kvs-coordinator,\n"
            "with its cluster state in DIR/cluster.store) in front of one kvs-worker per device.\n"
            "Prints 'kvstream up: listening on EP' (the coordinator: clients connect there and\n"
            "then talk to the workers directly) once every worker has registered; Ctrl-C (or\n"
            "SIGTERM) shuts everything down cleanly. Sessions are kept in the data dir and come\n"
            "back at the next start.\n"
            "\n"
            "  -m, --model PATH        GGUF model (default: the SmolLM2-135M-Instruct cache copy)\n"
            "      --device DEV        cpu (default: one worker), cuda (one worker per GPU) or\n"
            "                          cuda:N (one worker on GPU N)\n"
            "      --listen EP         the coordinator's endpoint (default "
            KVS_CLIENT_DEFAULT_ENDPOINT ";\n"
            "                          port 0 picks a free one, printed when ready); workers\n"
            "                          listen on free loopback ports\n"
            "      --data-dir DIR      cluster state, session logs and snapshots (default\n"
            "                          ~/.local/share/kvstream)\n"
            "  -t, --threads N         CPU threads per worker (default: all)\n"
            "      --cells N           KV capacity of each worker in cells (default: the model's\n"
            "                          context)\n"
            "      --fsync POLICY      always (default), everysec or no\n"
            "  -h, --help              this help\n"
            "\n"
            "Exit status: 0 after a clean shutdown; a program's own status when it stopped by\n"
            "itself (the others are stopped then); 1 when the cluster cannot start; 2 for a\n"
            "bad command line.\n");
}

/* The program `name` next to this executable, or $env. */
static int find_program(const char *name, const char *env_name, char *path, size_t size)
{
    const char *env = getenv(env_name);
    if (env != NULL && env[0] != '\0') {
        snprintf(path, size, "%s", env);
        return access(path, X_OK) == 0 ? 0 : -1;
    }
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) {
        return -1;
    }
    self[n] = '\0';
    char *slash = strrchr(self, '/');
    if (slash == NULL) {
        return -1;
    }
    *slash = '\0';
    if (snprintf(path, size, "%s/%s", self, name) >= (int)size) {
        return -1;
    }
    return access(path, X_OK) == 0 ? 0 : -1;
}

/* mkdir -p */
static int make_dirs(const char *dir)
{
    char buf[PATH_MAX];
    if (snprintf(buf, sizeof buf, "%s", dir) >= (int)sizeof buf) {
        return -1;
    }
    for (char *p = buf + 1; *p != '\0'; p++) {
        if (*p == '/') {
            *p = '\0';
            if (mkdir(buf, 0700) != 0 && errno != EEXIST) {
                return -1;
            }
            *p = '/';
        }
    }
    return mkdir(buf, 0700) != 0 && errno != EEXIST ? -1 : 0;
}

/* The GPUs the NVIDIA driver lists (/proc/driver/nvidia/gpus/<bus id>); 0 when none. */
static int count_gpus(void)
{
    DIR *d = opendir("/proc/driver/nvidia/gpus");
    if (d == NULL) {
        return 0;
    }
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        n += e->d_name[0] != '.';
    }
    closedir(d);
    return n;
}

/* Start args[0] with its standard output on a pipe (own process group: a terminal's Ctrl-C
 * reaches it once, through us; it does not outlive us). */
static int spawn(struct child *k, int slot, const char *const *args)
{
    int out[2];
    if (pipe2(out, O_CLOEXEC) != 0) {
        kvs_cli_error(CMD, "pipe: %s", strerror(errno));
        return -1;
    }
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) {
        kvs_cli_error(CMD, "fork: %s", strerror(errno));
        close(out[0]);
        close(out[1]);
        return -1;
    }
    if (pid == 0) {
        setpgid(0, 0);
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        signal(SIGPIPE, SIG_DFL);
        dup2(out[1], STDOUT_FILENO);
        execv(args[0], (char *const *)args);
        fprintf(stderr, "kvstream up: cannot run %s: %s\n", args[0], strerror(errno));
        _exit(127);
    }
    close(out[1]);
    k->pid = pid;
    k->out = out[0];
    g_pids[slot] = pid;
    if (g_signal != 0) { /* a signal that came before the pid was known */
        kill(pid, g_signal);
    }
    return 0;
}

/* Wait for k to exit and keep its status (as ours: a signal we forwarded is a clean stop). */
static void reap(struct child *k, int slot)
{
    int status = 0;
    while (waitpid(k->pid, &status, 0) < 0) {
        if (errno != EINTR) {
            status = 1 << 8;
            break;
        }
    }
    if (WIFEXITED(status)) {
        k->status = WEXITSTATUS(status);
    } else if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        k->status = g_signal != 0 && sig == g_signal ? 0 : 128 + sig;
    } else {
        k->status = 1;
    }
    k->pid = 0;
    g_pids[slot] = 0;
}

/* Read k's first line that starts with ready: its endpoint. 0, or -1 when it exited first
 * (lines before it are printed: they are the program's to say). */
static int read_ready(struct child *k, const char *ready)
{
    char line[1024];
    size_t len = 0;
    for (;;) {
        char ch;
        ssize_t n = read(k->out, &ch, 1);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return -1;
        }
        if (ch != '\n') {
            if (len + 1 < sizeof line) {
                line[len++] = ch;
            }
            continue;
        }
        line[len] = '\0';
        len = 0;
        if (strncmp(line, ready, strlen(ready)) == 0) {
            const char *ep = line + strlen(ready);
            if (ep[0] == '\0' || strlen(ep) >= sizeof k->endpoint) {
                return -1;
            }
            snprintf(k->endpoint, sizeof k->endpoint, "%s", ep);
            return 0;
        }
        printf("%s\n", line);
    }
}

/* Copy what k writes on stdout to ours; false at end of file. */
static bool relay(struct child *k)
{
    char buf[4096];
    ssize_t n = read(k->out, buf, sizeof buf);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
        return true;
    }
    if (n <= 0) {
        close(k->out);
        k->out = -1;
        return false;
    }
    fwrite(buf, 1, (size_t)n, stdout);
    fflush(stdout);
    return true;
}

/* ---- registration --------------------------------------------------------------------------- */

static bool mp_is(const msgpack_object *o, const char *s)
{
    return o != NULL && o->type == MSGPACK_OBJECT_STR && o->via.str.size == strlen(s) &&
           memcmp(o->via.str.ptr, s, o->via.str.size) == 0;
}

/* Whether the workers reply lists worker k at its new endpoint, ready and heard from. */
static bool registered(const msgpack_object *workers, const struct child *k)
{
    for (uint32_t i = 0; i < workers->via.array.size; i++) {
        const msgpack_object *w = &workers->via.array.ptr[i];
        const msgpack_object *age = kvs_wire_map_get(w, "heartbeat_age_ms");
        if (mp_is(kvs_wire_map_get(w, "worker"), k->id) &&
            mp_is(kvs_wire_map_get(w, "endpoint"), k->endpoint) &&
            mp_is(kvs_wire_map_get(w, "state"), "ready") && age != NULL &&
            age->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
            return true;
        }
    }
    return false;
}

/* One admin.workers round trip on sock: 1 when every worker is registered, 0 not yet (or no
 * answer: a coordinator still electing itself answers NOT_LEADER). */
static int all_registered(void *sock, uint64_t id)
{
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 2);
    kvs_wire_pack_cstr(&pk, "id");
    msgpack_pack_uint64(&pk, id);
    kvs_wire_pack_cstr(&pk, "op");
    kvs_wire_pack_cstr(&pk, "admin.workers");
    int sent = zmq_send(sock, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) == 0 &&
               zmq_send(sock, sb.data, sb.size, ZMQ_DONTWAIT) == (int)sb.size;
    msgpack_sbuffer_destroy(&sb);
    if (!sent) {
        return 0;
    }
    zmq_pollitem_t it = {sock, 0, ZMQ_POLLIN, 0};
    int done = 0;
    while (zmq_poll(&it, 1, 1000) > 0) {
        zmq_msg_t f[2];
        int n = 0;
        bool more = true;
        while (more) {
            zmq_msg_t m;
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, sock, 0) < 0) {
                zmq_msg_close(&m);
                break;
            }
            more = zmq_msg_more(&m);
            if (n < 2) {
                zmq_msg_init(&f[n]);
                zmq_msg_move(&f[n], &m);
                n++;
            }
            zmq_msg_close(&m);
        }
        msgpack_unpacked up;
        msgpack_unpacked_init(&up);
        const uint8_t *data = n == 2 ? zmq_msg_data(&f[1]) : NULL;
        size_t len = n == 2 ? zmq_msg_size(&f[1]) : 0;
        char why[128];
        bool mine = false;
        if (data != NULL && kvs_wire_prevalidate(data, len, why, sizeof why) == 0 &&
            msgpack_unpack_next(&up, (const char *)data, len, NULL) == MSGPACK_UNPACK_SUCCESS) {
            const msgpack_object *rid = kvs_wire_map_get(&up.data, "id");
            mine = rid != NULL && rid->type == MSGPACK_OBJECT_POSITIVE_INTEGER &&
                   rid->via.u64 == id;
            const msgpack_object *w = kvs_wire_map_get(&up.data, "workers");
            if (mine && w != NULL && w->type == MSGPACK_OBJECT_ARRAY) {
                done = 1;
                for (int i = 1; i < g_n_kids && done; i++) {
                    done = registered(w, &g_kids[i]);
                }
            }
        }
        msgpack_unpacked_destroy(&up);
        for (int i = 0; i < n; i++) {
            zmq_msg_close(&f[i]);
        }
        if (mine) {
            break;
        }
    }
    return done;
}

/* Whether any child exited (reaped then). */
static bool any_exited(void)
{
    for (int i = 0; i < g_n_kids; i++) {
        int status;
        if (g_kids[i].pid > 0 && waitpid(g_kids[i].pid, &status, WNOHANG) == g_kids[i].pid) {
            g_kids[i].status = WIFEXITED(status) ? WEXITSTATUS(status)
                                                 : 128 + (WIFSIGNALED(status) ? WTERMSIG(status)
                                                                              : 0);
            g_kids[i].pid = 0;
            g_pids[i] = 0;
            return true;
        }
    }
    return false;
}

/* Wait until every worker has registered with the coordinator at its endpoint. 0, or -1
 * (a child exited, a signal, or the time ran out). */
static int wait_registered(void)
{
    void *ctx = zmq_ctx_new();
    void *sock = ctx != NULL ? zmq_socket(ctx, ZMQ_DEALER) : NULL;
    int rc = -1;
    if (sock == NULL || zmq_connect(sock, g_kids[0].endpoint) != 0) {
        kvs_cli_error(CMD, "cannot connect to the coordinator at %s: %s", g_kids[0].endpoint,
                      zmq_strerror(errno));
        goto out;
    }
    int zero = 0;
    int64_t maxmsg = KVS_WIRE_MAX_FRAME;
    zmq_setsockopt(sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (uint64_t id = 1; g_signal == 0; id++) {
        if (all_registered(sock, id)) {
            rc = 0;
            break;
        }
        if (any_exited()) {
            kvs_cli_error(CMD, "a program of the cluster exited before every worker registered");
            break;
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if ((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000 >
            REGISTER_WAIT_MS) {
            kvs_cli_error(CMD, "the workers did not register with the coordinator at %s in %d s",
                          g_kids[0].endpoint, REGISTER_WAIT_MS / 1000);
            break;
        }
        struct timespec ts = {0, 100 * 1000000L};
        nanosleep(&ts, NULL);
    }
out:
    if (sock != NULL) {
        zmq_close(sock);
    }
    if (ctx != NULL) {
        zmq_ctx_term(ctx);
    }
    return rc;
}

/* ---- the command ---------------------------------------------------------------------------- */

/* Stop every child still running, wait for all, and return the exit status of `up`:
 * the first child's nonzero status when one exited by itself, else 0. */
static int shut_down(int first_status)
{
    for (int i = 0; i < g_n_kids; i++) {
        if (g_kids[i].pid > 0) {
            kill(g_kids[i].pid, SIGTERM);
        }
    }
    int st = first_status;
    for (int i = 0; i < g_n_kids; i++) {
        if (g_kids[i].pid > 0) {
            reap(&g_kids[i], i);
        }
        if (g_kids[i].out >= 0) {
            while (relay(&g_kids[i])) {
            }
        }
        if (st == 0 && g_signal != 0) {
            st = g_kids[i].status; /* a clean stop: each program's own status counts */
        }
    }
    return st;
}

int kvs_cmd_up(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"model", required_argument, NULL, 'm'},
        {"device", required_argument, NULL, OPT_DEVICE},
        {"listen", required_argument, NULL, OPT_LISTEN},
        {"data-dir", required_argument, NULL, OPT_DATA_DIR},
        {"threads", required_argument, NULL, 't'},
        {"cells", required_argument, NULL, OPT_CELLS},
        {"fsync", required_argument, NULL, OPT_FSYNC},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *model = NULL, *device = "cpu", *listen = KVS_CLIENT_DEFAULT_ENDPOINT;
    const char *data_dir = NULL, *threads = NULL, *cells = NULL, *fsync_policy = NULL;
    long v;
    optind = 0;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":m:t:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case OPT_DEVICE:
            if (strcmp(optarg, "cpu") != 0 && strcmp(optarg, "cuda") != 0 &&
                !(strncmp(optarg, "cuda:", 5) == 0 &&
                  kvs_cli_parse_long(optarg + 5, 0, MAX_WORKERS - 1, &v) == 0)) {
                kvs_cli_error(CMD, "--device must be cpu, cuda or cuda:N (N < %d), got '%s'",
                              MAX_WORKERS, optarg);
                return KVS_EXIT_USAGE;
            }
            device = optarg;
            break;
        case OPT_LISTEN: listen = optarg; break;
        case OPT_DATA_DIR: data_dir = optarg; break;
        case 't':
            if (kvs_cli_parse_long(optarg, 1, 1024, &v) < 0) {
                kvs_cli_error(CMD, "-t must be an integer in [1, 1024], got '%s'", optarg);
                return KVS_EXIT_USAGE;
            }
            threads = optarg;
            break;
        case OPT_CELLS:
            if (kvs_cli_parse_long(optarg, 1, 1L << 40, &v) < 0) {
                kvs_cli_error(CMD, "--cells must be a positive integer, got '%s'", optarg);
                return KVS_EXIT_USAGE;
            }
            cells = optarg;
            break;
        case OPT_FSYNC: fsync_policy = optarg; break;
        case 'h': usage(stdout); return KVS_EXIT_OK;
        case ':':
            kvs_cli_error(CMD, "option '%s' needs a value", argv[optind - 1]);
            return KVS_EXIT_USAGE;
        default:
            kvs_cli_error(CMD, "unknown option '%s' (try --help)", argv[optind - 1]);
            return KVS_EXIT_USAGE;
        }
    }
    if (optind < argc) {
        kvs_cli_error(CMD, "unexpected argument '%s' (try --help)", argv[optind]);
        return KVS_EXIT_USAGE;
    }
    char worker_bin[PATH_MAX], coord_bin[PATH_MAX], dir[PATH_MAX], store[PATH_MAX + 16];
    if (find_program("kvs-worker", "KVS_WORKER", worker_bin, sizeof worker_bin) < 0) {
        kvs_cli_error(CMD, "no executable kvs-worker next to this kvstream (nor $KVS_WORKER); "
                           "build the kvs-worker target or install both");
        return KVS_EXIT_FAILED;
    }
    if (find_program("kvs-coordinator", "KVS_COORDINATOR", coord_bin, sizeof coord_bin) < 0) {
        kvs_cli_error(CMD, "no executable kvs-coordinator next to this kvstream (nor "
                           "$KVS_COORDINATOR); build the kvs-coordinator target or install it");
        return KVS_EXIT_FAILED;
    }
    if (model == NULL) {
        model = kvs_cli_default_model();
    }
    if (data_dir == NULL) {
        const char *home = getenv("HOME");
        snprintf(dir, sizeof dir, "%s/.local/share/kvstream", home != NULL ? home : "/root");
        data_dir = dir;
    }
    if (make_dirs(data_dir) < 0) {
        kvs_cli_error(CMD, "cannot create the data dir %s: %s", data_dir, strerror(errno));
        return KVS_EXIT_FAILED;
    }
    if (snprintf(store, sizeof store, "file:%s/cluster.store", data_dir) >= (int)sizeof store) {
        kvs_cli_error(CMD, "the data dir's path is too long");
        return KVS_EXIT_USAGE;
    }

    /* The workers: one per device. */
    int n_workers = 1;
    g_n_kids = 1;
    g_kids[0] = (struct child){.what = "kvs-coordinator", .out = -1};
    if (strcmp(device, "cuda") == 0) {
        n_workers = count_gpus();
        if (n_workers == 0) {
            n_workers = 1; /* no driver listing: the worker says what it finds */
        }
        n_workers = n_workers > MAX_WORKERS ? MAX_WORKERS : n_workers;
    }
    for (int i = 0; i < n_workers; i++) {
        struct child *k = &g_kids[g_n_kids++];
        *k = (struct child){.what = "kvs-worker", .out = -1};
        if (strcmp(device, "cpu") == 0) {
            snprintf(k->id, sizeof k->id, "cpu0");
            snprintf(k->device, sizeof k->device, "cpu");
        } else if (strcmp(device, "cuda") == 0) {
            snprintf(k->id, sizeof k->id, "cuda%d", i);
            snprintf(k->device, sizeof k->device, "cuda:%d", i);
        } else {
            snprintf(k->id, sizeof k->id, "cuda%s", device + 5);
            snprintf(k->device, sizeof k->device, "%s", device);
        }
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    /* The coordinator first: the workers are told where it is. */
    const char *cargs[] = {coord_bin, "--listen", listen, "--store", store, "--shared-data-dir",
                           NULL};
    if (spawn(&g_kids[0], 0, cargs) < 0) {
        return KVS_EXIT_FAILED;
    }
    if (read_ready(&g_kids[0], COORD_READY) < 0) {
        int st = shut_down(0);
        if (g_signal == 0) {
            kvs_cli_error(CMD, "kvs-coordinator exited before it was ready (status %d)",
                          g_kids[0].status);
        }
        return st != 0 ? st : (g_kids[0].status != 0 ? g_kids[0].status : KVS_EXIT_FAILED);
    }
    for (int i = 1; i < g_n_kids && g_signal == 0; i++) {
        struct child *k = &g_kids[i];
        const char *args[32];
        int n = 0;
        args[n++] = worker_bin;
        args[n++] = "--model", args[n++] = model;
        args[n++] = "--listen", args[n++] = "tcp://127.0.0.1:0";
        args[n++] = "--data-dir", args[n++] = data_dir;
        args[n++] = "--coordinator", args[n++] = g_kids[0].endpoint;
        args[n++] = "--worker-id", args[n++] = k->id;
        args[n++] = "--device", args[n++] = k->device;
        if (threads != NULL) {
            args[n++] = "--threads", args[n++] = threads;
        }
        if (cells != NULL) {
            args[n++] = "--cells", args[n++] = cells;
        }
        if (fsync_policy != NULL) {
            args[n++] = "--fsync", args[n++] = fsync_policy;
        }
        args[n] = NULL;
        if (spawn(k, i, args) < 0 || read_ready(k, WORKER_READY) < 0) {
            if (k->pid > 0) {
                reap(k, i);
            }
            int status = k->status;
            int st = shut_down(0);
            if (g_signal == 0) {
                kvs_cli_error(CMD, "kvs-worker %s exited before it was ready (status %d)",
                              k->id, status);
            }
            return st != 0 ? st : (status != 0 ? status : KVS_EXIT_FAILED);
        }
    }
    if (g_signal != 0 || wait_registered() < 0) {
        int st = shut_down(0);
        return g_signal != 0 ? st : KVS_EXIT_FAILED;
    }
    for (int i = 1; i < g_n_kids; i++) {
        printf("kvstream up: worker %s (%s) at %s\n", g_kids[i].id, g_kids[i].device,
               g_kids[i].endpoint);
    }
    printf("kvstream up: listening on %s (data dir %s)\n", g_kids[0].endpoint, data_dir);
    printf("kvstream up: export KVSTREAM_ENDPOINT=%s; Ctrl-C stops\n", g_kids[0].endpoint);
    fflush(stdout);

    /* Relay their output until one of them exits; then stop the others. */
    for (;;) {
        struct pollfd p[1 + MAX_WORKERS];
        int n = 0;
        for (int i = 0; i < g_n_kids; i++) {
            p[i] = (struct pollfd){.fd = g_kids[i].out, .events = POLLIN};
            n += g_kids[i].out >= 0;
        }
        if (n == 0) {
            break;
        }
        if (poll(p, (nfds_t)g_n_kids, 500) < 0 && errno != EINTR) {
            break;
        }
        bool ended = false;
        for (int i = 0; i < g_n_kids; i++) {
            if (g_kids[i].out >= 0 && (p[i].revents & (POLLIN | POLLHUP | POLLERR))) {
                ended = !relay(&g_kids[i]) || ended;
            }
        }
        if (ended || any_exited()) {
            break; /* a program closed its output: it is exiting */
        }
    }
    /* A program that exited by itself (not asked by a signal) decides the status, and the
     * others are stopped. */
    int first = 0;
    for (int i = 0; i < g_n_kids; i++) {
        if (g_kids[i].pid > 0 && g_kids[i].out < 0) {
            reap(&g_kids[i], i);
        }
        if (g_kids[i].pid == 0 && g_signal == 0) {
            kvs_cli_error(CMD, "%s%s%s exited (status %d): stopping the cluster",
                          g_kids[i].what, g_kids[i].id[0] ? " " : "", g_kids[i].id,
                          g_kids[i].status);
            first = g_kids[i].status;
            break;
        }
    }
    return shut_down(first);
}
