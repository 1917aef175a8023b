/* kvs-worker: serve one engine's sessions over the wire protocol (docs/PROTOCOL.md).
 *
 *   kvs-worker --model PATH [--listen tcp://127.0.0.1:7710] [--data-dir DIR]
 *              [--fsync always|everysec|no] [--threads N] [--cells N] [--device DEV]
 *              [--batch-tokens N] [--append-chunk N] [--target-step-ms T] [--overcommit R]
 *              [--insecure]
 *
 * Prints one line "kvs-worker: listening on ENDPOINT" on standard
 * output when ready (a port of * in --listen picks a free one: read it from this line).
 * SIGTERM / SIGINT: stop taking requests, let the scheduler finish for up to 2 s, cancel the
 * rest, close the logs,
 * exit 0. Exit status: 0 clean shutdown, 1 start-up failure (reason on stderr), 2 usage.
 */
#include "common/log.h"
#include "common/status.h"
#include "worker/server.h"
#include "worker/session.h"

#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static kvs_server *g_server; /* for the signal handler */

static void on_signal(int sig)
{
    (void)sig;
    if (g_server != NULL) {
        kvs_server_stop(g_server);
    }
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvs-worker --model PATH [options]\n"
            "  -m, --model PATH        GGUF model file (or synthetic:NAME)\n"
            "  -l, --listen EP         ZeroMQ endpoint (default tcp://127.0.0.1:7710; port * = any)\n"
            "      --insecure          allow a non-loopback address (no CURVE encryption yet)\n"
            "  -d, --data-dir DIR      session logs and snapshots; restored at start\n"
            "      --fsync POLICY      always (default) | everysec | no\n"
            "  -t, --threads N         CPU threads (default: all)\n"
            "  -c, --cells N           KV capacity in cells (default: the model's context)\n"
            "      --device DEV        cpu (default), cuda or cuda:N\n"
            "      --batch-tokens N    rows per scheduler step (default: the engine's batch)\n"
            "      --append-chunk N    rows of one append per step (default 64)\n"
            "      --target-step-ms T  scheduler step time the row budget aims at (default 100)\n"
            "      --overcommit R      admit session budgets against capacity x R (1..16; default 1 = off)\n"
            "  -h, --help\n");
}

static int parse_i64(const char *s, int64_t min, int64_t max, int64_t *out)
{
    char *end;
    long long v = strtoll(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < min || v > max) {
        return KVS_INVALID_ARGUMENT;
    }
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    struct kvs_server_opts o = {0};
    o.listen = "tcp://127.0.0.1:7710";
    o.fsync = KVS_FSYNC_ALWAYS;
    static const struct option longopts[] = {
        {"model", required_argument, 0, 'm'},  {"listen", required_argument, 0, 'l'},
        {"insecure", no_argument, 0, 'I'},     {"data-dir", required_argument, 0, 'd'},
        {"fsync", required_argument, 0, 'F'},  {"threads", required_argument, 0, 't'},
        {"cells", required_argument, 0, 'c'},  {"help", no_argument, 0, 'h'},
        {"device", required_argument, 0, 'D'},
        {"batch-tokens", required_argument, 0, 'B'},
        {"append-chunk", required_argument, 0, 'A'},
        {"target-step-ms", required_argument, 0, 'T'},
        {"overcommit", required_argument, 0, 'O'},
        {0, 0, 0, 0},
    };
    int c;
    int64_t v;
    while ((c = getopt_long(argc, argv, "m:l:d:t:c:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'm': o.engine.model_path = optarg; break;
        case 'l': o.listen = optarg; break;
        case 'I': o.insecure = true; break;
        case 'D': o.engine.device = optarg; break;
        case 'd': o.data_dir = optarg; break;
        case 'F':
            if (kvs_fsync_policy_parse(optarg, &o.fsync) < 0) {
                fprintf(stderr, "kvs-worker: --fsync must be always, everysec or no\n");
                return 2;
            }
            break;
        case 't':
            if (parse_i64(optarg, 0, 1024, &v) < 0) {
                fprintf(stderr, "kvs-worker: --threads must be 0..1024\n");
                return 2;
            }
            o.engine.n_threads = (int32_t)v;
            break;
        case 'c':
            if (parse_i64(optarg, 0, INT64_C(1) << 40, &v) < 0) {
                fprintf(stderr, "kvs-worker: --cells must be a non-negative integer\n");
                return 2;
            }
            o.engine.n_cells = v;
            break;
        case 'B':
        case 'A':
            if (parse_i64(optarg, 1, 1 << 20, &v) < 0) {
                fprintf(stderr, "kvs-worker: --%s must be 1..1048576\n",
                        c == 'B' ? "batch-tokens" : "append-chunk");
                return 2;
            }
            if (c == 'B') {
                o.sched.max_batch_tokens = (int32_t)v;
            } else {
                o.sched.append_chunk = (int32_t)v;
            }
            break;
        case 'T':
        case 'O': {
            char *end;
            double x = strtod(optarg, &end);
            bool ok = *optarg != '\0' && *end == '\0' &&
                      (c == 'T' ? x > 0 && x <= 60000 : x >= 1 && x <= KVS_SCHED_OVERCOMMIT_MAX);
            if (!ok) {
                fprintf(stderr, "kvs-worker: %s\n",
                        c == 'T' ? "--target-step-ms must be in (0, 60000]"
                                 : "--overcommit must be in [1, 16]");
                return 2;
            }
            if (c == 'T') {
                o.sched.target_step_ms = x;
            } else {
                o.sched.overcommit = (float)x;
            }
            break;
        }
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (o.engine.model_path == NULL || optind != argc) {
        usage(stderr);
        return 2;
    }

    char err[1024] = "";
    kvs_server *srv = NULL;
    int rc = kvs_server_new(&o, &srv, err, sizeof err);
    if (rc < 0) {
        fprintf(stderr, "kvs-worker: %s (%s)\n", err, kvs_status_name(rc));
        return 1;
    }
    g_server = srv;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    printf("kvs-worker: listening on %s\n", kvs_server_endpoint(srv));
    fflush(stdout);
    rc = kvs_server_run(srv);
    g_server = NULL;
    kvs_server_destroy(&srv);
    return rc < 0 ? 1 : 0;
}
