/* The worker's link to the coordinator (docs/PROTOCOL.md §9, docs/CLUSTER.md): registration,
 * heartbeats, and the worker's half of the failure rule.
 *
 * A thread of its own with a ZMQ_DEALER socket (the server's ROUTER is the I/O thread's):
 *   register   worker.register {worker, endpoint, model, cells_total, device} at start, after
 *              NOT_FOUND to a heartbeat (not registered with this leader, or declared down),
 *              and with a new leader (NOT_LEADER carries its endpoint: the link reconnects
 *              there). A coordinator that does not answer in time is replaced by the next of
 *              the list (--coordinator EP[,EP...]).
 *   heartbeat  worker.heartbeat every heartbeat_ms (the register reply says how often) with
 *              the server's load (kvs_server_load: cells used/reserved/free, queue depth,
 *              sessions) and tokens/s computed from the scheduler's rows between two beats.
 *   fence      the ownership rule: when the link has heard no reply for TTL minus a margin
 *              (TTL/3, at least 1 s) AND the last reply's lease_age_ms says the lease was not
 *              renewed in that time either, the coordinator may soon declare this worker down
 *              and restore its sessions elsewhere, so the worker stops serving first
 *              (kvs_server_fence: requests answered UNAVAILABLE, the reason logged) and stops
 *              heartbeating; once its scheduler is idle it closes the sessions' logs (files
 *              kept: their locks released for the adopting worker). A session never has two
 *              owners. A fenced worker stays fenced: restart it to serve again (it restores
 *              what is still in its directory). Through a store outage the leader goes on
 *              answering heartbeats, so nothing is fenced.
 *
 * Replies are dated by their request's send time and the lease renewal by that time minus
 * the reply's lease_age_ms (never later than the real renewal); the server refuses on its own
 * past the deadline this gives (kvs_server_serve_until), so a worker paused past it (SIGSTOP)
 * serves nothing when it resumes, whichever thread runs first. The coordinator renews a lease
 * on heartbeats (about one renewal per heartbeat, off its request loop: docs/CLUSTER.md), so
 * while the store answers, the lease was renewed within about a heartbeat of the last reply
 * and the worker stops nearly the whole margin before its lease can expire; besides, the
 * coordinator restores only after the lease expired, and an adopt is refused while the old
 * owner still holds the log's lock.
 *
 * Thread-safety: kvs_coordlink_start and kvs_coordlink_stop from one thread (main); the link
 * reads the server through its thread-safe calls only.
 */
#ifndef KVS_COORDLINK_H
#define KVS_COORDLINK_H

#include <stddef.h>

#include "worker/server.h"

typedef struct kvs_coordlink kvs_coordlink;

struct kvs_coordlink_opts {
    const char *coordinators; /* "tcp://H:P[,...]": any coordinator (a standby redirects) */
    const char *worker_id;    /* 1..64 bytes of [A-Za-z0-9._-], not starting with '.' */
    const char *advertise;    /* the endpoint clients reach this worker at */
    const char *device;       /* "cpu", "cuda:0", ... (NULL = "cpu") */
    kvs_server *srv;          /* borrowed; must outlive the link */
    const char *coordinator_key; /* the coordinators' Z85 CURVE public key: the link is a
                                  * CURVE client (NULL = plain) */
    const char *curve_secret;    /* the worker's own Z85 secret key, its CURVE identity
                                  * toward the coordinator (NULL = a fresh key pair) */
};

/* Start the link's thread. 0 and *out (stop with kvs_coordlink_stop), or
 * KVS_INVALID_ARGUMENT (a bad id, endpoint, list or key: err says which), KVS_NO_MEMORY,
 * KVS_INTERNAL (ZeroMQ or the thread). The first registration happens on the thread: a
 * coordinator that is not up yet is retried with a backoff while the worker serves. */
int kvs_coordlink_start(const struct kvs_coordlink_opts *o, kvs_coordlink **out, char *err,
                        size_t errlen);

/* Stop the thread, close the socket, free; accepts NULL; nulls *l. Nothing is sent (the
 * lease expires by itself: the coordinator learns of a clean stop the same way as of a
 * crash). */
void kvs_coordlink_stop(kvs_coordlink **l);

#endif
