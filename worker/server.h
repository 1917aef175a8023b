/* The kvs-worker server: the wire protocol (docs/PROTOCOL.md) on a ZeroMQ ROUTER socket in
 * front of one engine and its sessions.
 *
 * Two threads, one owner per state, talking by messages over an inproc PAIR:
 *   I/O thread (the caller of kvs_server_run): owns the ROUTER socket. Receives, checks the
 *     envelope, pre-validates and decodes each payload (common/wire.h), answers bad input,
 *     hello and ping itself, answers BUSY when the engine queue is full, and forwards the
 *     other requests as [peer identity][payload]. Relays replies from the engine thread to
 *     the peers ([identity][""][payload]); a reply to a peer that is gone or not reading
 *     is dropped and logged (ROUTER_MANDATORY, non-blocking sends).
 *   engine thread: owns the kvs_engine and kvs_sessions. Decodes the forwarded request,
 *     runs it with the synchronous session API, sends replies (streamed query tokens one
 *     message each) as [identity][payload][final flag].
 *
 * Shutdown (kvs_server_stop, e.g. from a SIGTERM handler): the I/O thread stops taking
 * requests (new ones are answered CANCELLED), the engine finishes the request in progress,
 * answers the ones still queued with CANCELLED, closes the sessions (logs flushed and closed)
 * and exits; the I/O thread flushes the last replies and kvs_server_run returns 0.
 */
#ifndef KVS_SERVER_H
#define KVS_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/engine.h"
#include "worker/sesslog.h"

#define KVS_SERVER_QUEUE_MAX 64 /* requests forwarded to the engine and not yet finished */

struct kvs_server_opts {
    const char *listen;            /* ZeroMQ endpoint, e.g. tcp://127.0.0.1:7710 (port * = any) */
    bool insecure;                 /* allow a non-loopback listen address (no CURVE yet) */
    const char *data_dir;          /* session logs and snapshots; NULL = in memory only */
    enum kvs_fsync_policy fsync;   /* for the session logs */
    struct kvs_engine_opts engine; /* model, threads, cells */
    int32_t queue_max;             /* 0 = KVS_SERVER_QUEUE_MAX */
};

typedef struct kvs_server kvs_server;

/* Open the engine, restore the sessions found in data_dir, and bind. 0 and *out (free with
 * kvs_server_destroy), or KVS_INVALID_ARGUMENT (non-loopback address without insecure, bad
 * endpoint), KVS_IO (bind failed, data dir unusable), an engine error; err says why.
 * Call from the thread that will call kvs_server_run. */
int kvs_server_new(const struct kvs_server_opts *o, kvs_server **out, char *err, size_t errlen);

/* The endpoint actually bound (with the port chosen when it was "*"); borrowed. */
const char *kvs_server_endpoint(const kvs_server *srv);

/* Serve until kvs_server_stop. Starts the engine thread, runs the I/O loop on the calling
 * thread, and returns 0 after a clean shutdown (or a negative status if the sockets fail). */
int kvs_server_run(kvs_server *srv);

/* Ask kvs_server_run to shut down. Async-signal-safe (sets a flag the loop polls). */
void kvs_server_stop(kvs_server *srv);

/* Free everything; accepts NULL; nulls *srv. Not while kvs_server_run is running. */
void kvs_server_destroy(kvs_server **srv);

/* True when endpoint names a loopback or local transport (tcp to 127.x / [::1] / localhost,
 * ipc://, inproc://). */
bool kvs_server_endpoint_is_local(const char *endpoint);

#endif
