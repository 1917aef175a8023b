/* What `kvstream demo` needs around libkvstream: the single-node cluster it starts as a
 * child process (`kvstream up` on a free loopback port: a coordinator and its workers), and
 * the scheduler metrics of the workers' `status` replies, which struct kvs_client_status does
 * not carry (read here from the replies themselves, docs/PROTOCOL.md §5 status). Used by
 * client/cli/cmd_demo.c only. */
#ifndef KVS_CLI_DEMO_H
#define KVS_CLI_DEMO_H

#include <limits.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* ---- the child cluster ---------------------------------------------------------------------- */

struct kvs_demo_up_opts {
    const char *model;    /* -m for `up`; NULL = up's default */
    const char *threads;  /* -t; NULL = all */
    const char *device;   /* --device; NULL = cpu */
    const char *data_dir; /* --data-dir; NULL = a fresh temporary one, removed by stop */
    double timeout_s;     /* how long the worker may take to come up */
    atomic_int *stop;     /* non-zero (a signal came): abandon the wait; may be NULL */
};

struct kvs_demo_up {
    pid_t pid;              /* of `kvstream up`; 0 = none */
    int out_fd;             /* read end of its standard output (not read after the ready line:
                               up prints nothing more) */
    char endpoint[256];     /* where its worker listens, once up */
    char tmp_dir[PATH_MAX]; /* ours to remove ("" = none): the log, and the data dir unless given */
    char data_dir[PATH_MAX];
    char log_path[PATH_MAX]; /* up's and the worker's standard error */
};

/* Run `/proc/self/exe up --listen tcp://127.0.0.1:0 --data-dir DIR ...` in its own process
 * group (so a terminal's Ctrl-C reaches it only through us; it also gets SIGTERM if this
 * thread dies), and read its standard output until "kvstream up: listening on EP", printing
 * a progress line every few seconds. Returns 0 with u->endpoint set; or -1 with a one-line
 * reason in err (it exited first: its last log line; no line within opts->timeout_s; *stop
 * was set; fork or pipe failed), the child then already stopped and reaped and the
 * temporary directory removed. Call from the main thread, with SIGINT and SIGTERM blocked in
 * every thread (the child unblocks them). */
int kvs_demo_up_start(const struct kvs_demo_up_opts *opts, struct kvs_demo_up *u, char *err,
                      size_t errlen);

/* Why the child stopped, as far as its log says: the worker's last line, else the last line
 * ("" when none). Any thread, while u lives. */
void kvs_demo_up_reason(const struct kvs_demo_up *u, char *out, size_t size);

/* SIGTERM the child, wait for it (up waits for its worker; after 15 s it is killed), and
 * remove the temporary directory. Returns up's exit status (0 after a clean stop), or -1
 * when it had to be killed. Accepts a u that was never started. */
int kvs_demo_up_stop(struct kvs_demo_up *u);

/* ---- scheduler metrics of `status` ------------------------------------------------------------
 */

enum { KVS_DEMO_DECODE, KVS_DEMO_QUESTION, KVS_DEMO_APPEND, KVS_DEMO_FLASH, KVS_DEMO_N_CLASSES };

struct kvs_demo_sched {
    uint64_t steps;                    /* steps that ran a forward */
    uint64_t rows[KVS_DEMO_N_CLASSES]; /* rows computed per class, cumulative */
    double occupancy;                  /* rows of the last step / its row budget */
    int64_t last_n_seqs;               /* sequences in the last step */
    int64_t max_n_seqs;                /* in any step */
    uint64_t flash_evaluations;        /* flash answers computed */
    uint64_t flash_wasted;             /* of those, superseded before they completed */
    uint64_t flash_hits, flash_misses; /* flash.get fresh from the cache / not */
    int32_t n_workers;                 /* whose metrics these are (summed; occupancy: mean) */
};

/* The scheduler metrics of the worker at endpoint (its `status`, over a socket of our own),
 * or, when endpoint is a coordinator (it refuses `status` UNSUPPORTED), of each worker that
 * its `admin.workers` lists ready, summed. 0, or -1 with a one-line reason in err (no reply
 * within timeout_ms, an error reply, a malformed reply or a missing field). Any thread. */
int kvs_demo_sched_status(const char *endpoint, int timeout_ms, struct kvs_demo_sched *s, char *err,
                          size_t errlen);

#endif
