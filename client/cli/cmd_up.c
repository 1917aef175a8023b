/* kvstream up: a single-node cluster in the foreground.
 *
 * Starts the kvs-worker found next to this binary (the build tree and an install both put
 * them side by side; $KVS_WORKER overrides), waits until it answers a ping, prints the
 * endpoint, forwards SIGINT / SIGTERM to it and exits with its exit status. The worker keeps
 * its session logs and snapshots in --data-dir and restores what it finds there. */
#include "client/cli/cmd.h"
#include "client/cli/remote.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define CMD "up"
#define READY_PREFIX "kvs-worker: listening on "
#define PING_TRIES 50                /* x 200 ms: how long the worker may take to answer */

enum { OPT_DEVICE = KVS_CLI_OPT_FIRST_LOCAL, OPT_LISTEN, OPT_DATA_DIR, OPT_CELLS, OPT_FSYNC };

static volatile sig_atomic_t g_child = 0;   /* the worker's pid once started */
static volatile sig_atomic_t g_signal = 0;  /* the last signal received */

static void on_signal(int sig)
{
    g_signal = sig;
    if (g_child > 0) {
        kill((pid_t)g_child, sig);
    }
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvstream up [-m MODEL] [--device cpu|cuda:N] [--listen EP] [--data-dir DIR]\n"
            "                   [-t THREADS] [--cells N] [--fsync always|everysec|no]\n"
            "\n"
            "Run a single-node kvstream cluster in the foreground: one kvs-worker serving the\n"
            "model. Prints 'kvstream up: listening on EP' once the worker answers; Ctrl-C (or\n"
            "SIGTERM) shuts it down cleanly. Sessions are kept in the data dir and come back\n"
            "at the next start.\n"
            "\n"
            "  -m, --model PATH        GGUF model (default: the SmolLM2-135M-Instruct cache copy)\n"
            "      --device DEV        cpu (default), cuda or cuda:N\n"
            "      --listen EP         endpoint (default " KVS_CLIENT_DEFAULT_ENDPOINT "; port 0\n"
            "                          picks a free one, printed when ready)\n"
            "      --data-dir DIR      session logs and snapshots (default\n"
            "                          ~/.local/share/kvstream)\n"
            "  -t, --threads N         CPU threads (default: all)\n"
            "      --cells N           KV capacity in cells (default: the model's context)\n"
            "      --fsync POLICY      always (default), everysec or no\n"
            "  -h, --help              this help\n"
            "\n"
            "Exit status: the worker's (0 after a clean shutdown), 1 when it cannot start,\n"
            "2 for a bad command line.\n");
}

/* The kvs-worker next to this executable, or $KVS_WORKER. */
static int find_worker(char *path, size_t size)
{
    const char *env = getenv("KVS_WORKER");
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
    if (snprintf(path, size, "%s/kvs-worker", self) >= (int)size) {
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

/* Wait for the worker to exit and turn its status into ours. */
static int reap(pid_t pid)
{
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) {
            return 1;
        }
    }
    if (WIFEXITED(status)) {
        return WEXITSTATUS(status);
    }
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        /* the signal we forwarded is a clean stop requested by the person */
        return g_signal != 0 && sig == g_signal ? 0 : 128 + sig;
    }
    return 1;
}

/* Copy what the worker writes on stdout to ours; false at end of file. */
static bool relay(int fd)
{
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
        return true;
    }
    if (n <= 0) {
        return false;
    }
    fwrite(buf, 1, (size_t)n, stdout);
    fflush(stdout);
    return true;
}

/* Read the worker's first line: its endpoint. 0, or -1 when it exited first. */
static int read_ready(int fd, char *endpoint, size_t size)
{
    char line[1024];
    size_t len = 0;
    for (;;) {
        char ch;
        ssize_t n = read(fd, &ch, 1);
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
        if (strncmp(line, READY_PREFIX, strlen(READY_PREFIX)) == 0) {
            const char *ep = line + strlen(READY_PREFIX);
            if (strlen(ep) >= size) {
                return -1;
            }
            memcpy(endpoint, ep, strlen(ep) + 1);
            return 0;
        }
        printf("%s\n", line); /* anything before it is the worker's to say */
    }
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
    const char *model = NULL, *device = NULL, *listen = KVS_CLIENT_DEFAULT_ENDPOINT;
    const char *data_dir = NULL, *threads = NULL, *cells = NULL, *fsync_policy = NULL;
    long v;
    optind = 0;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":m:t:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case OPT_DEVICE:
            if (strcmp(optarg, "cpu") != 0 && strncmp(optarg, "cuda", 4) != 0) {
                kvs_cli_error(CMD, "--device must be cpu, cuda or cuda:N, got '%s'", optarg);
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
    char worker[PATH_MAX], dir[PATH_MAX];
    if (find_worker(worker, sizeof worker) < 0) {
        kvs_cli_error(CMD, "no executable kvs-worker next to this kvstream (nor $KVS_WORKER); "
                           "build the kvs-worker target or install both");
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

    const char *args[24];
    int n = 0;
    args[n++] = worker;
    args[n++] = "--model", args[n++] = model;
    args[n++] = "--listen", args[n++] = listen;
    args[n++] = "--data-dir", args[n++] = data_dir;
    if (device != NULL) {
        args[n++] = "--device", args[n++] = device;
    }
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

    int out[2];
    if (pipe2(out, O_CLOEXEC) != 0) {
        kvs_cli_error(CMD, "pipe: %s", strerror(errno));
        return KVS_EXIT_FAILED;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) {
        kvs_cli_error(CMD, "fork: %s", strerror(errno));
        return KVS_EXIT_FAILED;
    }
    if (pid == 0) {
        /* Own process group: a terminal's Ctrl-C reaches the worker once, through us. */
        setpgid(0, 0);
        prctl(PR_SET_PDEATHSIG, SIGTERM); /* and it does not outlive us */
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        signal(SIGPIPE, SIG_DFL);
        dup2(out[1], STDOUT_FILENO);
        execv(worker, (char *const *)args);
        fprintf(stderr, "kvstream up: cannot run %s: %s\n", worker, strerror(errno));
        _exit(127);
    }
    g_child = pid;
    close(out[1]);
    if (g_signal != 0) { /* a signal that came before g_child was set */
        kill(pid, g_signal);
    }

    char endpoint[512];
    if (read_ready(out[0], endpoint, sizeof endpoint) < 0) {
        int st = reap(pid);
        if (g_signal == 0) {
            kvs_cli_error(CMD, "kvs-worker exited before it was ready (status %d)", st);
        }
        close(out[0]);
        return st != 0 ? st : KVS_EXIT_FAILED;
    }
    /* Ready when it answers a ping over the wire, not just when it says so. */
    bool answered = false;
    for (int i = 0; i < PING_TRIES && !answered && g_signal == 0; i++) {
        struct kvs_client_opts o = {.timeout_ms = 200, .connect_timeout_ms = 200, .retries = -1,
                                    .name = "kvstream-up"};
        kvs_client *cl = NULL;
        if (kvs_client_connect(endpoint, &o, &cl, NULL, 0) == 0) {
            answered = kvs_client_ping(cl, NULL) == 0;
        }
        kvs_client_destroy(&cl);
    }
    if (!answered && g_signal == 0) {
        kvs_cli_error(CMD, "kvs-worker at %s does not answer a ping; stopping it", endpoint);
        kill(pid, SIGTERM);
    } else if (answered) {
        printf("kvstream up: listening on %s (data dir %s)\n", endpoint, data_dir);
        printf("kvstream up: export KVSTREAM_ENDPOINT=%s; Ctrl-C stops\n", endpoint);
        fflush(stdout);
    }
    while (relay(out[0])) {
    }
    close(out[0]);
    int st = reap(pid);
    return answered ? st : (st != 0 ? st : KVS_EXIT_FAILED);
}
