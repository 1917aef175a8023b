/* The kvs-worker server: the wire protocol (docs/PROTOCOL.md) on a ZeroMQ ROUTER socket in
 * front of one engine, its sessions and its scheduler.
 *
 * Two threads, one owner per state, talking by messages over an inproc PAIR:
 *   I/O thread (the caller of kvs_server_run): owns the ROUTER socket and the flash cache
 *     (worker/flashcache.h). Receives, checks the envelope, pre-validates and decodes each
 *     payload (common/wire.h), answers bad input, hello and ping itself, flash.get of a
 *     cached fresh answer, flash.watch and the cancel of a watch; answers BUSY when the
 *     engine queue is full, and forwards the other requests as [identity][payload][time
 *     received]. Relays replies from the engine thread to the peers; a reply to a peer that
 *     is gone or not reading is dropped and logged (ROUTER_MANDATORY, non-blocking sends),
 *     and a stream to a gone peer makes the engine cancel that peer's work.
 *   engine thread: owns the kvs_engine, the kvs_sessions and the kvs_sched. Its loop: take
 *     every request the I/O thread queued, run one scheduler step while there is work
 *     (block on the pair when there is none), then run the requests that were waiting for
 *     their session to settle. Appends of text and stateful queries become scheduler jobs
 *     (their deadline_ms the job's deadline); their callbacks send the replies (streamed
 *     query tokens one message each). Everything else runs synchronously between steps;
 *     the operations that need a settled session (close, snapshot, dump, flash register and
 *     get, stateless query, append of raw tokens) wait in a deferred queue until the
 *     session's appends in progress are done, and later requests to that session wait
 *     behind them (a close waits for an idle scheduler, and holds every new request
 *     meanwhile: queued flash evaluations reference the session). cancel finds the target
 *     by (peer, id) among the scheduled and deferred requests. The engine publishes every
 *     session version and flash answer to the I/O thread (the flash cache's input).
 *
 * Shutdown (kvs_server_stop, e.g. from a SIGTERM handler): the I/O thread stops taking
 * requests (new ones are answered CANCELLED) and ends the watches; the engine cancels the
 * deferred requests, lets the scheduler finish for up to 2 s, cancels what is left, closes
 * the sessions (logs flushed and closed) and exits; the I/O thread flushes the last replies
 * and kvs_server_run returns 0.
 */
#ifndef KVS_SERVER_H
#define KVS_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/engine.h"
#include "worker/sched.h"
#include "worker/sesslog.h"

#define KVS_SERVER_QUEUE_MAX 64 /* requests forwarded to the engine and not yet finished */

struct kvs_server_opts {
    const char *listen;            /* ZeroMQ endpoint, e.g. tcp://127.0.0.1:7710 (port * = any) */
    bool insecure;                 /* allow a non-loopback listen address without CURVE */
    const char *curve_secret;      /* Z85 secret key: the ROUTER is a CURVE server (NULL = no
                                    * CURVE; then only loopback unless insecure) */
    const char *curve_clients;     /* file of allowed client public keys, one Z85 key a line
                                    * (NULL = any client that knows the server's key) */
    const char *data_dir;          /* session logs and snapshots; NULL = in memory only */
    const char *data_root;         /* shared root of the workers' data dirs: session.adopt
                                    * {from: W} takes the session from data_root/W (NULL =
                                    * only from data_dir itself) */
    enum kvs_fsync_policy fsync;   /* for the session logs */
    struct kvs_engine_opts engine; /* model, threads, cells */
    int32_t queue_max;             /* 0 = KVS_SERVER_QUEUE_MAX */
    struct kvs_sched_opts sched;   /* step budget, append chunk (zeros = the defaults) */
};

typedef struct kvs_server kvs_server;

/* Open the engine, restore the sessions found in data_dir, and bind. 0 and *out (free with
 * kvs_server_destroy), or KVS_INVALID_ARGUMENT (non-loopback address without insecure or
 * curve_secret, a bad key or client key list, bad
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

/* A worker's load, for the coordinator's heartbeats (worker/coordlink.h). */
struct kvs_server_load {
    int64_t cells_total;    /* the pool */
    int64_t block_size;     /* cells per block of the pool (a session reserves whole blocks) */
    int64_t cells_used;     /* in referenced blocks */
    int64_t cells_reserved; /* promised to sessions and running queries */
    int64_t cells_free;     /* neither */
    int32_t sessions;       /* open sessions */
    int32_t queue;          /* requests forwarded to the engine and not finished */
    uint64_t rows;          /* tokens computed since start, every class (scheduler rows) */
};

/* The load as the engine thread last published it (after every pass of its loop).
 * Thread-safe; may lag a scheduler step behind. */
void kvs_server_load(kvs_server *srv, struct kvs_server_load *out);

/* The model file's SHA-256 (64 lowercase hex digits); borrowed. Thread-safe. */
const char *kvs_server_model_sha256(const kvs_server *srv);

/* Stop serving for good (the ownership rule, worker/coordlink.h): from now on every request
 * but hello and ping is answered UNAVAILABLE with why (copied, one line), watches end with
 * it, and the engine cancels its queued and running work with it (an append already written
 * to its log still completes). Once the scheduler is idle the engine lets go of every
 * session (kvs_session_release: log synced and closed, files kept), which drops the log
 * locks so another worker can adopt them. Thread-safe; the first call's reason is kept,
 * later calls do nothing. */
void kvs_server_fence(kvs_server *srv, const char *why);
bool kvs_server_fenced(kvs_server *srv);

/* Serve only until until_ms (CLOCK_MONOTONIC milliseconds; 0 = no limit): past it, the
 * first request (or scheduler pass) to notice fences the server as kvs_server_fence does.
 * The coordinator link moves it forward with every reply, so a worker that was paused
 * (SIGSTOP) past its lease fences itself before it serves anything. Thread-safe. */
void kvs_server_serve_until(kvs_server *srv, int64_t until_ms);

#endif
