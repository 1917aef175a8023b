/* kvstream keygen: make a CURVE key pair for kvs-worker / kvs-coordinator (--curve-secret)
 * and their clients (--server-key, --curve-clients): PREFIX.key holds the secret key (mode
 * 0600), PREFIX.pub the public one, each one 40-character Z85 line as ZeroMQ's tools write. */
#include "client/cli/cmd.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <getopt.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#define CMD "keygen"

static void usage(FILE *f)
{
    fprintf(f, "usage: kvstream keygen [--out PREFIX]\n"
               "\n"
               "Make a CURVE key pair: PREFIX.key (the secret key, mode 0600: give it to the\n"
               "server's --curve-secret) and PREFIX.pub (the public key: the clients'\n"
               "--server-key, or a line of a server's --curve-clients list).\n"
               "\n"
               "  -O, --out PREFIX   file name prefix (default: kvstream)\n"
               "  -h, --help         this help\n");
}

/* Write key and a newline to path, created with mode (refusing to replace a file). */
static int write_key(const char *path, const char *key, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd < 0) {
        kvs_cli_error(CMD, "cannot create %s: %s", path, strerror(errno));
        return -1;
    }
    char line[64];
    int n = snprintf(line, sizeof line, "%s\n", key);
    bool ok = write(fd, line, (size_t)n) == n;
    ok = close(fd) == 0 && ok;
    if (!ok) {
        kvs_cli_error(CMD, "cannot write %s: %s", path, strerror(errno));
        unlink(path);
        return -1;
    }
    return 0;
}

int kvs_cmd_keygen(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"out", required_argument, NULL, 'O'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *prefix = "kvstream";
    int opt;
    optind = 1;
    while ((opt = getopt_long(argc, argv, "O:h", longopts, NULL)) != -1) {
        switch (opt) {
        case 'O': prefix = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc || prefix[0] == '\0') {
        usage(stderr);
        return 2;
    }
    if (!zmq_has("curve")) {
        kvs_cli_error(CMD, "this libzmq was built without CURVE (zmq_has(\"curve\") is 0); "
                           "install a libzmq built with libsodium");
        return 1;
    }
    char pub[41], sec[41], pub_path[4096], sec_path[4096];
    if ((size_t)snprintf(pub_path, sizeof pub_path, "%s.pub", prefix) >= sizeof pub_path ||
        (size_t)snprintf(sec_path, sizeof sec_path, "%s.key", prefix) >= sizeof sec_path) {
        kvs_cli_error(CMD, "--out is too long");
        return 2;
    }
    if (zmq_curve_keypair(pub, sec) != 0) {
        kvs_cli_error(CMD, "zmq_curve_keypair: %s", zmq_strerror(errno));
        return 1;
    }
    if (write_key(sec_path, sec, 0600) < 0) {
        return 1;
    }
    if (write_key(pub_path, pub, 0644) < 0) {
        unlink(sec_path);
        return 1;
    }
    printf("%s: secret key (keep it: --curve-secret)\n%s: public key %s\n", sec_path, pub_path,
           pub);
    return 0;
}
