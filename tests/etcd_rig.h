/* A real etcd for tests: Debian's /usr/bin/etcd (etcd-server 3.4) started on loopback
 * ephemeral ports in a temporary directory, waited for until it answers, stopped and started
 * again (outages) and killed at the end. Header-only; include once per test program.
 *
 * A test program that needs it calls etcd_rig_available() first and exits 77 (skipped, with
 * the reason on stderr) when /usr/bin/etcd is not installed. */
#ifndef KVS_TEST_ETCD_RIG_H
#define KVS_TEST_ETCD_RIG_H

#include "common/store.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define ETCD_RIG_BIN "/usr/bin/etcd"

struct etcd_rig {
    char dir[256]; /* temporary directory: data/ and etcd.log */
    int client_port, peer_port;
    char url[64]; /* http://127.0.0.1:CLIENT */
    pid_t pid;    /* 0 when stopped */
};

static inline bool etcd_rig_available(void)
{
    return access(ETCD_RIG_BIN, X_OK) == 0;
}

/* A port the kernel considers free right now (bind to 0, read it back, close). */
static inline int etcd_rig_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int port = -1;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0) {
        port = ntohs(a.sin_port);
    }
    if (fd >= 0) {
        close(fd);
    }
    return port;
}

/* Start etcd (again, on the same ports and data when it ran before) and wait up to 15 s for
 * it to answer a range. 0, or -1 with the reason on stderr. */
static inline int etcd_rig_start(struct etcd_rig *r)
{
    if (r->dir[0] == '\0') {
        snprintf(r->dir, sizeof r->dir, "/tmp/kvs-etcd-XXXXXX");
        if (mkdtemp(r->dir) == NULL) {
            perror("etcd_rig: mkdtemp");
            return -1;
        }
        r->client_port = etcd_rig_free_port();
        do {
            r->peer_port = etcd_rig_free_port();
        } while (r->peer_port == r->client_port);
        snprintf(r->url, sizeof r->url, "http://127.0.0.1:%d", r->client_port);
    }
    char data[300], log[300], client[64], peer[64], cluster[96];
    snprintf(data, sizeof data, "%s/data", r->dir);
    snprintf(log, sizeof log, "%s/etcd.log", r->dir);
    snprintf(client, sizeof client, "http://127.0.0.1:%d", r->client_port);
    snprintf(peer, sizeof peer, "http://127.0.0.1:%d", r->peer_port);
    snprintf(cluster, sizeof cluster, "kvs=%s", peer);
    pid_t pid = fork();
    if (pid < 0) {
        perror("etcd_rig: fork");
        return -1;
    }
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execl(ETCD_RIG_BIN, "etcd", "--name", "kvs", "--data-dir", data, "--listen-client-urls",
              client, "--advertise-client-urls", client, "--listen-peer-urls", peer,
              "--initial-advertise-peer-urls", peer, "--initial-cluster", cluster,
              "--heartbeat-interval", "50", "--election-timeout", "500", (char *)NULL);
        _exit(127);
    }
    r->pid = pid;
    char err[256];
    kvs_store *s = kvs_store_open(r->url, 300, err, sizeof err);
    for (int i = 0; s != NULL && i < 150; i++) {
        struct kvs_store_range rg;
        int rc = kvs_store_range(s, "/", false, &rg, err, sizeof err);
        kvs_store_range_free(&rg);
        if (rc == 0) {
            kvs_store_destroy(&s);
            return 0;
        }
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid) {
            fprintf(stderr, "etcd_rig: etcd exited (status %d); see %s\n", status, log);
            r->pid = 0;
            kvs_store_destroy(&s);
            return -1;
        }
        struct timespec ts = {0, 100 * 1000000L};
        nanosleep(&ts, NULL);
    }
    fprintf(stderr, "etcd_rig: etcd at %s did not answer in 15 s: %s (log %s)\n", r->url, err, log);
    kvs_store_destroy(&s);
    return -1;
}

/* Whether pid has died (a zombie counts: its sockets are closed). */
static inline bool etcd_rig_dead(pid_t pid)
{
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        return true;
    }
    bool dead = fgets(buf, sizeof buf, f) != NULL && strstr(buf, ") Z") != NULL;
    fclose(f);
    return dead;
}

/* Stop etcd (SIGKILL, as a crash: its data directory stays) and wait until it is gone. Works
 * from a forked test process too (etcd is then not its child: it waits on /proc). */
static inline void etcd_rig_stop(struct etcd_rig *r)
{
    if (r->pid > 0) {
        kill(r->pid, SIGKILL);
        if (waitpid(r->pid, NULL, 0) != r->pid) {
            for (int i = 0; i < 500 && !etcd_rig_dead(r->pid); i++) {
                struct timespec ts = {0, 10 * 1000000L};
                nanosleep(&ts, NULL);
            }
        }
        r->pid = 0;
    }
}

/* Stop etcd and remove its directory. */
static inline void etcd_rig_destroy(struct etcd_rig *r)
{
    etcd_rig_stop(r);
    if (r->dir[0] != '\0' && getenv("KVS_KEEP_ETCD") == NULL) {
        char cmd[300];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", r->dir);
        if (system(cmd) != 0) {
            fprintf(stderr, "etcd_rig: could not remove %s\n", r->dir);
        }
    }
    r->dir[0] = '\0';
}

#endif
