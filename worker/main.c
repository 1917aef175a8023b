/* kvs-worker: serve one engine's sessions over the wire protocol (docs/PROTOCOL.md).
 *
 *   kvs-worker --model PATH [--listen tcp://127.0.0.1:7710] [--data-dir DIR]
 *              [--fsync always|everysec|no] [--threads N] [--cells N] [--device DEV]
 *              [--batch-tokens N] [--append-chunk N] [--target-step-ms T] [--overcommit R]
 *              [--insecure | --curve-secret FILE [--curve-clients FILE]]
 *              [--coordinator EP[,EP...] [--coordinator-key FILE|Z85] [--worker-id ID]
 *               [--advertise EP]]
 *
 * With --curve-secret FILE (a Z85 secret key, `kvstream keygen`) clients must speak CURVE
 * with the matching public key; --curve-clients FILE (one Z85 public key a line) admits only
 * those clients. A non-loopback --listen needs --curve-secret or --insecure.
 *
 * With --coordinator the worker registers with the cluster's coordinator, heartbeats its
 * load and stops serving when it loses both the coordinator and its lease
 * (worker/coordlink.h); its --data-dir DIR is then the shared root of every worker's
 * directory: its own sessions live in DIR/ID (restored at start) and session.adopt
 * {from: W} takes a session from DIR/W. Without --coordinator nothing of this happens.
 *
 * Prints one line "kvs-worker: listening on ENDPOINT" on standard
 * output when ready (a port of * in --listen picks a free one: read it from this line).
 * SIGTERM / SIGINT: stop taking requests, let the scheduler finish for up to 2 s, cancel the
 * rest, close the logs,
 * exit 0. Exit status: 0 clean shutdown, 1 start-up failure (reason on stderr), 2 usage.
 */
#include "common/curve.h"
#include "common/log.h"
#include "common/status.h"
#include "worker/coordlink.h"
#include "worker/server.h"
#include "worker/session.h"

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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
            "      --insecure          allow a non-loopback address without CURVE\n"
            "      --curve-secret FILE CURVE: the server's Z85 secret key (kvstream keygen)\n"
            "      --curve-clients FILE  CURVE: only these client public keys (one a line)\n"
            "  -d, --data-dir DIR      session logs and snapshots; restored at start\n"
            "      --fsync POLICY      always (default) | everysec | no\n"
            "  -t, --threads N         CPU threads (default: all)\n"
            "  -c, --cells N           KV capacity in cells (default: the model's context)\n"
            "      --device DEV        cpu (default), cuda or cuda:N\n"
            "      --batch-tokens N    rows per scheduler step (default: the engine's batch)\n"
            "      --append-chunk N    rows of one append per step (default 64)\n"
            "      --target-step-ms T  scheduler step time the row budget aims at (default 100)\n"
            "      --overcommit R      admit session budgets against capacity x R (1..16; default 1 = off)\n"
            "      --coordinator EP    register with the cluster's coordinator (EP[,EP...])\n"
            "      --coordinator-key K the coordinator's CURVE public key (FILE or Z85)\n"
            "      --worker-id ID      this worker's id in the cluster (default HOSTNAME-PORT)\n"
            "      --advertise EP      the endpoint clients reach it at (default: the bound one)\n"
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

/* HOSTNAME-PORT from a --listen with a fixed port; -1 when it has none. */
static int default_worker_id(const char *listen, char *out, size_t cap)
{
    const char *colon = strrchr(listen, ':');
    char *end;
    long port = colon ? strtol(colon + 1, &end, 10) : 0;
    if (colon == NULL || *end != '\0' || port <= 0 || port > 65535) {
        return -1;
    }
    char host[64] = "worker";
    if (gethostname(host, sizeof host) < 0) {
        snprintf(host, sizeof host, "worker");
    }
    host[sizeof host - 1] = '\0';
    for (char *p = host; *p; p++) { /* keep to the id's charset */
        bool ok = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                  (*p >= '0' && *p <= '9') || *p == '.' || *p == '_' || *p == '-';
        *p = ok ? *p : '-';
    }
    snprintf(out, cap, "%s-%ld", host[0] == '.' ? "w" : host, port);
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
        {"coordinator", required_argument, 0, 'C'},
        {"worker-id", required_argument, 0, 'W'},
        {"advertise", required_argument, 0, 'V'},
        {"curve-secret", required_argument, 0, 'S'},
        {"curve-clients", required_argument, 0, 'K'},
        {"coordinator-key", required_argument, 0, 'P'},
        {0, 0, 0, 0},
    };
    const char *coordinator = NULL, *worker_id = NULL, *advertise = NULL;
    const char *curve_secret_arg = NULL, *coordinator_key_arg = NULL;
    char curve_secret[KVS_CURVE_KEY_Z85 + 1], coordinator_key[KVS_CURVE_KEY_Z85 + 1];
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
        case 'C': coordinator = optarg; break;
        case 'W': worker_id = optarg; break;
        case 'V': advertise = optarg; break;
        case 'S': curve_secret_arg = optarg; break;
        case 'K': o.curve_clients = optarg; break;
        case 'P': coordinator_key_arg = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (o.engine.model_path == NULL || optind != argc) {
        usage(stderr);
        return 2;
    }

    if (coordinator == NULL && (worker_id != NULL || advertise != NULL ||
                                coordinator_key_arg != NULL)) {
        fprintf(stderr, "kvs-worker: --worker-id, --advertise and --coordinator-key need "
                        "--coordinator\n");
        return 2;
    }
    if (o.curve_clients != NULL && curve_secret_arg == NULL) {
        fprintf(stderr, "kvs-worker: --curve-clients needs --curve-secret\n");
        return 2;
    }
    char kerr[512];
    if (curve_secret_arg != NULL) {
        if (kvs_curve_key_load(curve_secret_arg, curve_secret, kerr, sizeof kerr) < 0) {
            fprintf(stderr, "kvs-worker: --curve-secret: %s\n", kerr);
            return 2;
        }
        o.curve_secret = curve_secret;
    }
    if (coordinator_key_arg != NULL &&
        kvs_curve_key_load(coordinator_key_arg, coordinator_key, kerr, sizeof kerr) < 0) {
        fprintf(stderr, "kvs-worker: --coordinator-key: %s\n", kerr);
        return 2;
    }
    char id_buf[80], own_dir[4096];
    if (coordinator != NULL && worker_id == NULL) {
        if (default_worker_id(o.listen, id_buf, sizeof id_buf) < 0) {
            fprintf(stderr, "kvs-worker: --worker-id is needed when --listen does not name a "
                            "fixed port\n");
            return 2;
        }
        worker_id = id_buf;
    }
    if (coordinator != NULL && o.data_dir != NULL) {
        /* the shared root: this worker's sessions in ROOT/ID, the others' next to it */
        if (mkdir(o.data_dir, 0700) < 0 && errno != EEXIST) {
            fprintf(stderr, "kvs-worker: cannot create %s: %s\n", o.data_dir, strerror(errno));
            return 1;
        }
        if ((size_t)snprintf(own_dir, sizeof own_dir, "%s/%s", o.data_dir, worker_id) >=
            sizeof own_dir) {
            fprintf(stderr, "kvs-worker: --data-dir too long\n");
            return 2;
        }
        o.data_root = o.data_dir;
        o.data_dir = own_dir;
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

    kvs_coordlink *link = NULL;
    if (coordinator != NULL) {
        struct kvs_coordlink_opts lo = {.coordinators = coordinator,
                                        .worker_id = worker_id,
                                        .advertise =
                                            advertise ? advertise : kvs_server_endpoint(srv),
                                        .device = o.engine.device ? o.engine.device : "cpu",
                                        .srv = srv,
                                        .coordinator_key =
                                            coordinator_key_arg ? coordinator_key : NULL,
                                        .curve_secret = o.curve_secret};
        rc = kvs_coordlink_start(&lo, &link, err, sizeof err);
        if (rc < 0) {
            fprintf(stderr, "kvs-worker: %s (%s)\n", err, kvs_status_name(rc));
            g_server = NULL;
            kvs_server_destroy(&srv);
            return rc == KVS_INVALID_ARGUMENT ? 2 : 1;
        }
    }
    printf("kvs-worker: listening on %s\n", kvs_server_endpoint(srv));
    fflush(stdout);
    rc = kvs_server_run(srv);
    kvs_coordlink_stop(&link);
    g_server = NULL;
    kvs_server_destroy(&srv);
    return rc < 0 ? 1 : 0;
}
