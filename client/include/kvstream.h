/* libkvstream: the C client of a kvstream cluster or worker (docs/PROTOCOL.md, protocol
 * version 1.1).
 *
 * A kvs_client is one logical connection: a ZeroMQ DEALER socket to the endpoint given to
 * kvs_client_connect (its "home"), plus one socket per worker that its sessions live on.
 * Home may be a coordinator (kvs-coordinator, what `kvstream up` listens with) or a worker;
 * the hello reply says which, and the API is the same for both:
 *   - a worker: every request goes to it, unless a MOVED reply pointed a session elsewhere
 *     (that session is routed there from then on, as Redis Cluster clients do);
 *   - a coordinator (PROTOCOL.md section 9): a session's requests go to its worker directly
 *     (the coordinator stays off the data path). The client asks the coordinator where the
 *     session lives once (session.locate) and routes it there; when that worker answers
 *     NOT_FOUND, UNAVAILABLE or MOVED, or cannot be reached, it asks again, with back-off
 *     for up to timeout_ms, so that a session the coordinator restored on another worker
 *     after a failure (or moved by a drain) is found again. A standby coordinator's
 *     NOT_LEADER is followed to the leader it names (during a failover, with no leader yet,
 *     the call waits for one for up to timeout_ms). Session create and close go through
 *     both (the coordinator places the session, the worker holds it), session list and
 *     status ask the coordinator (and its ready workers).
 *
 *     kvs_client *c = NULL;
 *     char err[256];
 *     if (kvs_client_connect("tcp://127.0.0.1:7700", NULL, &c, err, sizeof err) < 0) ...
 *     kvs_client_session_create(c, "ticks", NULL, NULL);
 *     kvs_client_append(c, "ticks", "AAPL 189.2", 10, NULL);
 *     struct kvs_client_answer a = {0};
 *     if (kvs_client_query(c, "ticks", "Last AAPL price:", NULL, NULL, NULL, &a) == 0) ...
 *     kvs_client_answer_free(&a);
 *     kvs_client_destroy(&c);
 *
 * Errors. Every call returns 0 (KVS_OK) or a negative status of common/status.h: the code the
 * worker answered (NOT_FOUND, CONTEXT_FULL, ...) or one found by the library (TIMEOUT: no
 * answer in time; INVALID_ARGUMENT: a bad argument caught before sending; BAD_FORMAT or
 * TOO_LARGE: a reply that is not valid protocol; NO_MEMORY; INTERNAL: libzmq failed). A status
 * unknown to this library is returned as the worker sent it. kvs_client_error() gives the
 * one-line message of the last failed call, "CODE: reason" (the worker's code and message for
 * an error reply). Output structs are written only on success.
 *
 * Timeouts, retries, reconnects. Every call waits at most timeout_ms for each attempt, and
 * tells the worker so (`deadline_ms`: the worker drops work nobody waits for). When an
 * attempt times out the socket is closed and a fresh one connected (stale replies can never
 * be matched to a later request). Calls that change nothing (ping, status, info, list, flash
 * get/list) and appends (which carry the client id and a per-session sequence number and so
 * are applied once however often they are sent) are then sent again, up to `retries` more
 * times; the others (create, close, query, flash register/unregister) return KVS_TIMEOUT at
 * once. A TIMEOUT answered by the worker is treated the same way. A BUSY answer (nothing was
 * done) is retried with back-off for up to 2 s (or timeout_ms if shorter), then returned.
 * A call therefore returns within (1 + retries) x timeout_ms + 2 s. KVS_TIMEOUT (or
 * KVS_CANCELLED) from an append means its outcome is unknown: it was applied once or not at
 * all. The next append to that session is accepted either way: if the worker answers it
 * OUT_OF_ORDER (so the timed-out one was never applied), the library sends it again with the
 * timed-out one's number.
 *
 * MOVED. A worker that does not own a session answers MOVED with the owner's endpoint; the
 * library connects there, resends, and routes that session there from then on (up to
 * max_redirects hops per call). A route is dropped when its worker stops answering.
 * Behind a coordinator a request is sent to a worker only once a connection to it is up
 * (waiting up to 2 s, else the worker is unreachable and the session is located again), and
 * a connection lost while waiting for the answer ends the attempt at once (as a timeout).
 *
 * Thread-safety and ownership. A kvs_client is used by one thread at a time: give each thread
 * its own client, or hold a mutex around every call. The exception is kvs_client_cancel,
 * which any thread (or a callback) may call at any time. Callbacks run on the calling thread,
 * inside the call, and may not call other functions on the same client (except cancel).
 * Strings passed in are borrowed for the duration of the call. Memory returned in output
 * structs belongs to the caller, who frees it with the matching *_free function. Different
 * clients share nothing and may be used concurrently.
 */
#ifndef KVSTREAM_H
#define KVSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h" /* enum kvs_status, kvs_status_name(), kvs_status_message() */

#ifdef __cplusplus
extern "C" {
#endif

#define KVS_CLIENT_DEFAULT_ENDPOINT "tcp://127.0.0.1:7700"

typedef struct kvs_client kvs_client;

struct kvs_client_opts {
    int32_t timeout_ms;         /* per attempt of every call; 0 = 30000 */
    int32_t connect_timeout_ms; /* for the hello of kvs_client_connect; 0 = 5000 */
    int32_t retries;            /* extra attempts of a retryable call after a timeout; 0 = 2,
                                   < 0 = none */
    int32_t max_redirects;      /* MOVED replies followed per call; 0 = 4 */
    uint64_t client_id;         /* appends' client id; 0 = a random one (below 2^63) */
    const char *name;           /* sent in hello as `client`; NULL = "libkvstream" */
    /* CURVE (PROTOCOL.md section 1): with curve_server_key every socket the client opens
     * (home and workers) encrypts and authenticates the server; NULL = plain. Keys are
     * 40-character Z85 text, copied at connect. A server with the wrong key, or one without
     * CURVE, never answers: calls time out. */
    const char *curve_server_key; /* the servers' public key (coordinator and workers) */
    const char *curve_public_key; /* this client's key pair; both NULL = a fresh pair made */
    const char *curve_secret_key; /*   at connect (a server's allow-list needs a fixed one) */
};

/* Connect to endpoint (NULL = $KVSTREAM_ENDPOINT, else KVS_CLIENT_DEFAULT_ENDPOINT), a
 * coordinator or a worker, and say hello (protocol version 1). opts may be NULL (defaults).
 * Returns 0 and *out (free with kvs_client_destroy), or INVALID_ARGUMENT (bad endpoint,
 * options or CURVE key), UNSUPPORTED (CURVE asked of a libzmq without it), TIMEOUT (no answer within connect_timeout_ms), UNSUPPORTED (no common protocol
 * version), NO_MEMORY or INTERNAL, with a one-line reason in err (may be NULL). */
int kvs_client_connect(const char *endpoint, const struct kvs_client_opts *opts,
                       kvs_client **out, char *err, size_t errlen);

/* Close every socket and free the client; accepts NULL and nulls the pointer. */
void kvs_client_destroy(kvs_client **c);

/* The message of the last failed call on c ("" after a success). Borrowed until the next
 * call on c. */
const char *kvs_client_error(const kvs_client *c);

/* The home endpoint (borrowed until the next call on c: a NOT_LEADER redirect changes it to
 * the leader's). */
const char *kvs_client_endpoint(const kvs_client *c);

/* The client id its appends carry. */
uint64_t kvs_client_id(const kvs_client *c);

/* Per-attempt timeout of later calls, in ms (> 0). */
void kvs_client_set_timeout(kvs_client *c, int32_t timeout_ms);

/* Close and reopen every socket now (routes are kept). 0, or INTERNAL. */
int kvs_client_reconnect(kvs_client *c);

/* Ask the call in progress on c to stop: it sends `cancel` for its request and returns
 * KVS_CANCELLED (a watch returns 0); the worker stops a queued or running query or append
 * (an append already in the session's log is still applied). Without a call in progress the
 * next call is not affected. Any thread may call this while c lives (kvs_client_destroy must
 * not run concurrently with it). */
void kvs_client_cancel(kvs_client *c);

/* ---- worker ------------------------------------------------------------------------------ */

/* Round trip of a ping (answered by the worker's I/O thread, or the coordinator), in ms in
 * *rtt_ms (may be NULL). */
int kvs_client_ping(kvs_client *c, double *rtt_ms);

struct kvs_client_status {
    char model_sha256[65];  /* hex */
    int64_t n_ctx;          /* cells one session may use */
    int64_t n_vocab;
    int64_t cells_total;    /* KV capacity */
    int64_t cells_free;
    int64_t sessions;
    int64_t queue_max;      /* engine queue bound */
};

/* The worker's status. Through a coordinator: that of its ready workers (the first one's
 * model, n_ctx, n_vocab and queue_max; cells and sessions summed), UNAVAILABLE when none is
 * ready. */
int kvs_client_status(kvs_client *c, struct kvs_client_status *st);

/* ---- sessions ---------------------------------------------------------------------------- */

struct kvs_client_session_opts {
    const char *prefix;     /* fixed text before the data (NULL = none) */
    int64_t cells;          /* KV budget; 0 = the worker's default */
    int32_t query_reserve;  /* cells kept for questions and answers; 0 = the default (512) */
    bool chat;              /* format "chat" (records as chat turns) instead of "raw" */
    bool slide;             /* policy "slide" (evict old data) instead of "reject" */
    const char *model;      /* through a coordinator: the SHA-256 (64 lowercase hex) of the
                               model the session needs; NULL = the one model its ready
                               workers serve (INVALID_ARGUMENT when they serve several).
                               Ignored by a worker. */
};

struct kvs_client_session_info {
    uint64_t version;       /* acknowledged appends so far (the session's version) */
    uint64_t appends;       /* acknowledged appends */
    int64_t prefix_tokens;
    int64_t data_tokens;    /* tokens appended and not evicted */
    int64_t cells_used;
    int64_t cells_budget;
    int64_t evicted_tokens;
    int32_t flash_queries;
    char format[8];         /* "raw" | "chat" */
    char policy[8];         /* "reject" | "slide" */
};

/* Create a session. opts may be NULL. On success *info (may be NULL) has version, cells_used
 * and cells_budget set, the rest zero. Errors: ALREADY_EXISTS, CAPACITY, CONTEXT_FULL (prefix
 * larger than the budget), INVALID_ARGUMENT (bad name: 1..128 bytes of [A-Za-z0-9._-]).
 * Through a coordinator the session is placed first (a budget of 0 is the chosen worker's
 * default, n_ctx minus the query reserve, asked of a worker first), then created on its
 * worker; when the worker refuses it the placement is taken back. Also MODEL_MISMATCH (no
 * ready worker serves the model), UNAVAILABLE (no worker ready, or the placement could not
 * be recorded). Never sent again after a timeout (TIMEOUT: it may exist). */
int kvs_client_session_create(kvs_client *c, const char *session,
                              const struct kvs_client_session_opts *opts,
                              struct kvs_client_session_info *info);

int kvs_client_session_info(kvs_client *c, const char *session,
                            struct kvs_client_session_info *info);

/* Close a session: its KV, log and snapshot are removed. NOT_FOUND if absent. Through a
 * coordinator: closed on its worker, then its placement removed (also when its worker had
 * lost it). */
int kvs_client_session_close(kvs_client *c, const char *session);

/* The worker's session ids (through a coordinator: every session it places): *names is an
 * array of *n strings; free with kvs_client_names_free. */
int kvs_client_session_list(kvs_client *c, char ***names, int32_t *n);
void kvs_client_names_free(char ***names, int32_t n);

/* Write a snapshot now (compact: also truncate the log). UNSUPPORTED without --data-dir. */
int kvs_client_session_snapshot(kvs_client *c, const char *session, bool compact);

/* Everything a session holds (for tests and audits). Free with kvs_client_dump_free. */
struct kvs_client_dump {
    uint64_t version;
    int64_t prefix_tokens;      /* the first prefix_tokens of tokens are the prefix's */
    int32_t *tokens;            /* every recorded token id, as the context holds them now */
    int64_t n_tokens;
    char *text;                 /* the data part decoded (raw: each record + "\n") */
    size_t len;                 /* bytes of text */
};

/* TOO_LARGE when the session does not fit in one reply frame; UNSUPPORTED from a worker of
 * protocol 1.0. */
int kvs_client_session_dump(kvs_client *c, const char *session, struct kvs_client_dump *d);
void kvs_client_dump_free(struct kvs_client_dump *d);

struct kvs_client_append_result {
    uint64_t version;       /* session version after the append */
    int64_t cells;          /* cells used now */
    int32_t n_tokens;       /* tokens added */
    int32_t evicted;        /* cells evicted (policy slide) */
    bool duplicate;         /* the worker had applied this (client id, sequence) already */
};

/* Append text[0..len) as one record (framed by the session's data template), or token ids.
 * Carries the client id and the next sequence number for (client, session); retried on
 * timeout with the same number. r may be NULL. Errors: NOT_FOUND, CONTEXT_FULL, TOO_LARGE,
 * INVALID_ARGUMENT (empty, or ids outside the vocabulary), IO, TIMEOUT (outcome unknown). */
int kvs_client_append(kvs_client *c, const char *session, const char *text, size_t len,
                      struct kvs_client_append_result *r);
int kvs_client_append_tokens(kvs_client *c, const char *session, const int32_t *ids,
                             int32_t n, struct kvs_client_append_result *r);

/* Continue the numbering of an earlier process that used the same client id: the next
 * append to session carries last_seq + 1. Without it a session's first append carries 1. */
int kvs_client_set_append_seq(kvs_client *c, const char *session, uint64_t last_seq);

/* ---- queries ----------------------------------------------------------------------------- */

struct kvs_client_query_opts {
    int32_t max_tokens;         /* 1..4096; 0 = 64 */
    bool stateless;             /* baseline: re-prefill the recorded context */
    float temperature;          /* 0 = greedy (the default) */
    int32_t top_k;              /* 0 = off */
    float top_p;                /* 0 = off (1) */
    float min_p;                /* 0 = off */
    float repeat_penalty;       /* 0 = off (1) */
    uint64_t seed;
    const char *const *stops;   /* up to 8 stop strings of 1..64 bytes (borrowed), or NULL */
    int32_t n_stops;
};

/* An answer (query, flash get, flash watch). Free with kvs_client_answer_free. */
struct kvs_client_answer {
    char *text;                 /* NUL-terminated answer text */
    size_t len;                 /* bytes of text */
    int32_t *tokens;            /* answer token ids */
    int32_t n_tokens;
    uint64_t version;           /* session version it was computed at */
    int64_t context_tokens;     /* tokens of context it saw */
    int32_t question_tokens;
    double ttft_ms;             /* worker-measured time to the first token */
    double total_ms;            /* worker-measured total */
    bool fresh;                 /* flash: computed at the session's current version */
    char name[68];              /* flash: the query's name ("" for a query) */
};

/* Free what a owns and zero it; accepts a zeroed answer. */
void kvs_client_answer_free(struct kvs_client_answer *a);

/* Called for each streamed piece: the newly complete text (may be empty; not NUL-terminated)
 * and the token that completed it (-1 for a last piece that only flushes text held back
 * while it could still become a stop string). Return false to cancel the query. */
typedef bool (*kvs_client_token_fn)(int32_t token, const char *text, size_t len, void *user);

/* Ask question about session. opts may be NULL (greedy, 64 tokens). With cb NULL one reply
 * is awaited; with cb the answer is streamed to cb token by token, then the result is written
 * to *a as well. The session is not modified. Errors: NOT_FOUND, BUSY (no query reserve),
 * CONTEXT_FULL, INVALID_ARGUMENT, TIMEOUT, CANCELLED (cb returned false or kvs_client_cancel;
 * *a is not written). Never retried after a timeout (use a larger timeout for long answers). */
int kvs_client_query(kvs_client *c, const char *session, const char *question,
                     const struct kvs_client_query_opts *opts, kvs_client_token_fn cb,
                     void *user, struct kvs_client_answer *a);

/* ---- flash queries ----------------------------------------------------------------------- */

struct kvs_client_flash_opts {
    struct kvs_client_query_opts query; /* stateless ignored */
    int32_t every_tokens;       /* re-evaluate after this many new tokens; 0 = every append */
    int32_t min_interval_ms;    /* at most once per this interval; 0 = no limit */
};

/* Register a standing question, evaluated at once and kept fresh as data arrives. opts may
 * be NULL. Errors: NOT_FOUND, ALREADY_EXISTS, TOO_LARGE (more than 32), INVALID_ARGUMENT. */
int kvs_client_flash_register(kvs_client *c, const char *session, const char *name,
                              const char *question, const struct kvs_client_flash_opts *opts);
int kvs_client_flash_unregister(kvs_client *c, const char *session, const char *name);
int kvs_client_flash_list(kvs_client *c, const char *session, char ***names, int32_t *n);

/* The latest answer of a flash query. allow_stale: return the cached answer even if the
 * session moved on (a->fresh says which); otherwise the worker brings it up to date first. */
int kvs_client_flash_get(kvs_client *c, const char *session, const char *name,
                         bool allow_stale, struct kvs_client_answer *a);

/* Called for each pushed flash answer (a is borrowed for the call). Return false to stop. */
typedef bool (*kvs_client_watch_fn)(const struct kvs_client_answer *a, void *user);

#define KVS_CLIENT_WATCH_NEW (-1) /* after_version: only answers computed from now on */

/* Watch a session's flash queries (name NULL = all of them) and pass each pushed answer to
 * cb. after_version >= 0 first replays the latest answer of each flash query whose version
 * is > after_version (0 = every current answer; resume with the highest version seen);
 * KVS_CLIENT_WATCH_NEW only passes answers computed from now on. Blocks until cb returns
 * false or kvs_client_cancel (then returns 0), or an error: NOT_FOUND (no such session, or
 * it was closed), BUSY (the worker's watch limits), UNSUPPORTED (a protocol 1.0 worker).
 * When the connection drops or the worker shuts down, the watch is resumed on a fresh socket
 * from the highest version seen (answers superseded meanwhile are not replayed), trying
 * `retries` + 1 times, timeout_ms each, before it returns TIMEOUT. A watch that heard nothing
 * for timeout_ms is renewed the same way (a worker drops a watcher that does not keep up,
 * without a word), so nothing is missed; keep callbacks short all the same. */
int kvs_client_flash_watch(kvs_client *c, const char *session, const char *name,
                           int64_t after_version, kvs_client_watch_fn cb, void *user);

#ifdef __cplusplus
}
#endif

#endif
