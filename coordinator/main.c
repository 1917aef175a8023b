/* kvs-coordinator: the cluster's registry of workers, directory of sessions and placement
 * (docs/PROTOCOL.md "Coordinator", docs/CLUSTER.md).
 *
 *   kvs-coordinator [--listen tcp://127.0.0.1:7700] [--store URL] [--cluster NAME]
 *                   [--leader-ttl S] [--worker-ttl S] [--heartbeat-ms MS] [--insecure]
 *                   [--shared-data-dir] [--move-timeout-ms MS]
 *                   [--curve-secret FILE [--curve-clients FILE]] [--worker-key FILE|Z85]
 *
 * --curve-secret makes the socket a CURVE server (clients and workers need its public key);
 * --curve-clients admits only the listed client public keys; --worker-key is the workers'
 * public key (when they run with --curve-secret) for the session moves it asks of them.
 *
 * --shared-data-dir says that the workers' --data-dir is one root on storage that every worker
 * reaches (each keeps its sessions in ROOT/<its id>; on one machine it always is): then the
 * sessions of a worker declared down are restored on other workers (session.adopt) and
 * admin.drain moves sessions. Without it a down worker's sessions wait for it (UNAVAILABLE).
 *
 * --store is file:PATH (the embedded store, one coordinator), mem: (nothing persisted) or
 * http://HOST:PORT[,...] (etcd's gateway: several coordinators, one leads). Prints
 * "kvs-coordinator: listening on ENDPOINT" on standard output when ready (a port of * picks a
 * free one). SIGTERM / SIGINT: resign the leadership, exit 0. Exit status: 0 clean
 * shutdown, 1 start-up failure (reason on stderr), 2 usage.
 */
#include "common/curve.h"
#include "common/log.h"
#include "common/status.h"
#include "coordinator/coord.h"

#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static kvs_coord *g_coord; /* for the signal handler */

static void on_signal(int sig)
{
    (void)sig;
    if (g_coord != NULL) {
        kvs_coord_stop(g_coord);
    }
}

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: kvs-coordinator [options]\n"
        "  -l, --listen EP         ZeroMQ endpoint (default tcp://127.0.0.1:7700; port * = any)\n"
        "      --insecure          allow a non-loopback address without CURVE\n"
        "      --curve-secret FILE CURVE: the server's Z85 secret key (kvstream keygen)\n"
        "      --curve-clients FILE  CURVE: only these client public keys (one a line)\n"
        "      --worker-key K      the workers' CURVE public key (FILE or Z85)\n"
        "  -s, --store URL         file:PATH | mem: | http://HOST:PORT[,...] (etcd)\n"
        "                          (default file:kvstream-cluster.json)\n"
        "  -c, --cluster NAME      keys live under /kvstream/NAME/ (default: default)\n"
        "      --leader-ttl S      leader lease, seconds (default 5)\n"
        "      --worker-ttl S      worker lease, seconds (default 10)\n"
        "      --heartbeat-ms MS   worker heartbeat interval (default 1000)\n"
        "      --shared-data-dir   the workers' --data-dir is one root every worker reaches:\n"
        "                          restore a down worker's sessions on others, allow drain\n"
        "      --move-timeout-ms MS  wait for a worker's answer to a restore/release before\n"
        "                          sending it again, 3 times (default 30000)\n"
        "  -h, --help\n");
}

static int parse_int(const char *s, int min, int max, int *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < min || v > max) {
        return KVS_INVALID_ARGUMENT;
    }
    *out = (int)v;
    return 0;
}

int main(int argc, char **argv)
{
    struct kvs_coord_opts o = {.listen = "tcp://127.0.0.1:7700",
                               .store_url = "file:kvstream-cluster.json"};
    static const struct option longopts[] = {
        {"listen", required_argument, 0, 'l'},
        {"insecure", no_argument, 0, 'I'},
        {"store", required_argument, 0, 's'},
        {"cluster", required_argument, 0, 'c'},
        {"leader-ttl", required_argument, 0, 'L'},
        {"worker-ttl", required_argument, 0, 'W'},
        {"heartbeat-ms", required_argument, 0, 'H'},
        {"shared-data-dir", no_argument, 0, 'S'},
        {"move-timeout-ms", required_argument, 0, 'M'},
        {"help", no_argument, 0, 'h'},
        {"curve-secret", required_argument, 0, 'K'},
        {"curve-clients", required_argument, 0, 'C'},
        {"worker-key", required_argument, 0, 'P'},
        {0, 0, 0, 0},
    };
    const char *curve_secret_arg = NULL, *worker_key_arg = NULL;
    char curve_secret[KVS_CURVE_KEY_Z85 + 1], worker_key[KVS_CURVE_KEY_Z85 + 1], kerr[512];
    int ch;
    while ((ch = getopt_long(argc, argv, "l:s:c:h", longopts, NULL)) != -1) {
        switch (ch) {
        case 'l':
            o.listen = optarg;
            break;
        case 'I':
            o.insecure = true;
            break;
        case 's':
            o.store_url = optarg;
            break;
        case 'c':
            o.cluster = optarg;
            break;
        case 'L':
        case 'W':
            if (parse_int(optarg, 2, 600, ch == 'L' ? &o.leader_ttl_s : &o.worker_ttl_s) < 0) {
                fprintf(stderr, "kvs-coordinator: --%s must be 2..600 seconds\n",
                        ch == 'L' ? "leader-ttl" : "worker-ttl");
                return 2;
            }
            break;
        case 'H':
            if (parse_int(optarg, 10, 60000, &o.heartbeat_ms) < 0) {
                fprintf(stderr, "kvs-coordinator: --heartbeat-ms must be 10..60000\n");
                return 2;
            }
            break;
        case 'S':
            o.shared_data_dir = true;
            break;
        case 'M':
            if (parse_int(optarg, 100, 3600000, &o.move_timeout_ms) < 0) {
                fprintf(stderr, "kvs-coordinator: --move-timeout-ms must be 100..3600000\n");
                return 2;
            }
            break;
        case 'K':
            curve_secret_arg = optarg;
            break;
        case 'C':
            o.curve_clients = optarg;
            break;
        case 'P':
            worker_key_arg = optarg;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc) {
        usage(stderr);
        return 2;
    }
    if (curve_secret_arg != NULL) {
        if (kvs_curve_key_load(curve_secret_arg, curve_secret, kerr, sizeof kerr) < 0) {
            fprintf(stderr, "kvs-coordinator: --curve-secret: %s\n", kerr);
            return 2;
        }
        o.curve_secret = curve_secret;
    }
    if (worker_key_arg != NULL) {
        if (kvs_curve_key_load(worker_key_arg, worker_key, kerr, sizeof kerr) < 0) {
            fprintf(stderr, "kvs-coordinator: --worker-key: %s\n", kerr);
            return 2;
        }
        o.worker_key = worker_key;
    }
    char err[1024] = "";
    kvs_coord *c = NULL;
    int rc = kvs_coord_new(&o, &c, err, sizeof err);
    if (rc < 0) {
        fprintf(stderr, "kvs-coordinator: %s (%s)\n", err, kvs_status_name(rc));
        return 1;
    }
    g_coord = c;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    printf("kvs-coordinator: listening on %s\n", kvs_coord_endpoint(c));
    fflush(stdout);
    rc = kvs_coord_run(c);
    g_coord = NULL;
    kvs_coord_destroy(&c, false);
    return rc < 0 ? 1 : 0;
}
