/* kvs-coordinator's core: a ROUTER socket for workers, clients and admins (docs/PROTOCOL.md,
 * "Coordinator"), the worker registry, the session directory, placement
 * (coordinator/placement.h) and leader election with fencing (coordinator/leader.h) over
 * the cluster store (common/store.h; layout in docs/CLUSTER.md).
 *
 * One thread runs kvs_coord_run: poll the socket, answer requests, and every tick check the
 * leadership and the workers' health. The election runs on the leader module's thread.
 * Only the leader answers registry and directory requests; a standby answers them with
 * NOT_LEADER and the leader's endpoint (hello, ping and coord.status work on both). Through
 * a store outage the leader keeps answering from memory (heartbeats, locate, admin views):
 * no one can take over meanwhile, and every write is fenced anyway, so what needs the store
 * fails with UNAVAILABLE and works again once it is back.
 *
 * Accounting: a worker's free cells for placement are its pool (cells_total) minus the
 * budgets of the sessions the coordinator placed on it. The coordinator is the only path
 * by which sessions are admitted in a cluster, so this is exact and does not lag behind
 * heartbeats; heartbeat figures (used, reserved, queue, load) are kept for admin views.
 *
 * Failure rule (DESIGN.md, Known pitfalls): a worker whose heartbeats stopped for
 * unhealthy_ms is unhealthy (gets no new sessions, its sessions are still located on it);
 * it is down only when, in addition, its lease in the store has expired (its key is gone).
 * A down worker's sessions are answered UNAVAILABLE with the reason, never dropped from the
 * directory. With shared_data_dir they are restored on other workers (coordinator/moves.c:
 * placement, a fenced record of the new placement, then session.adopt to the new worker);
 * a restore that fails leaves the session recorded on its down worker with the error, which
 * locate reports. admin.drain moves a worker's sessions one by one the same way, after the
 * worker released each one (session.release).
 */
#ifndef KVS_COORD_H
#define KVS_COORD_H

#include "common/store.h"

#include <stdbool.h>
#include <stddef.h>

typedef struct kvs_coord kvs_coord;

struct kvs_coord_opts {
    const char *listen;    /* ZeroMQ endpoint (tcp://127.0.0.1:7700; port * = any) */
    bool insecure;         /* allow a non-loopback address without CURVE */
    const char *curve_secret;  /* Z85 secret key: the ROUTER is a CURVE server (NULL = none) */
    const char *curve_clients; /* file of allowed client public keys (NULL = any client that
                                * knows the server's key) */
    const char *worker_key;    /* the workers' Z85 public key: session moves talk to them as
                                * a CURVE client (NULL = plain) */
    const char *store_url; /* kvs_store_open URL (file:PATH, mem:, http://...) */
    kvs_store *store;      /* or a store to borrow (tests: two coordinators, one store) */
    const char *cluster;   /* the cluster's name: keys live under /kvstream/<cluster>/ */
    int leader_ttl_s;      /* the leader lease, seconds (0 = 5) */
    int worker_ttl_s;      /* a worker's lease, seconds (0 = 10) */
    int heartbeat_ms;      /* the interval workers are told to heartbeat at (0 = 1000) */
    int unhealthy_ms;      /* no heartbeat for this long = unhealthy (0 = 3 x heartbeat) */
    bool shared_data_dir;  /* the workers' --data-dir is one root on storage every worker
                            * reaches (each keeps ROOT/<its id>): a down worker's sessions are
                            * restored on other workers (session.adopt) and admin.drain can
                            * move sessions; off = a down worker's sessions wait for it */
    int move_timeout_ms;   /* one request to a worker (adopt, release) before it is sent
                            * again, 3 attempts (0 = 30000: an adopt replays the log) */
};

/* Open the store, bind the socket, start the election. 0 with *out, or INVALID_ARGUMENT
 * (options, a store URL that makes no sense), IO (bind, a store file that cannot be read or
 * is damaged), NO_MEMORY, with err. */
int kvs_coord_new(const struct kvs_coord_opts *o, kvs_coord **out, char *err, size_t errlen);

/* Serve until kvs_coord_stop. 0, or INTERNAL when the socket fails. */
int kvs_coord_run(kvs_coord *c);

/* Ask kvs_coord_run to return (async-signal-safe). */
void kvs_coord_stop(kvs_coord *c);

/* The bound endpoint (the port resolved), also this coordinator's id in the election. */
const char *kvs_coord_endpoint(const kvs_coord *c);

/* Whether this coordinator leads now (thread-safe). */
bool kvs_coord_is_leader(kvs_coord *c);

/* Stop the election (resigning when leading, unless crash is true: then the lease is left
 * to expire, as after a SIGKILL), close the socket and the store. Accepts NULL, nulls *c.
 * Call after kvs_coord_run returned. */
void kvs_coord_destroy(kvs_coord **c, bool crash);

#endif
