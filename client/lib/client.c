/* libkvstream: connections, request ids, calls with timeouts, retries, back-off, MOVED and
 * NOT_LEADER, and reading validated replies. The operations themselves are in ops.c; what is
 * particular to a coordinator (locating sessions) is in cluster.c. */
#include "client/lib/client_impl.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define ID_OFFSET 9                /* request bytes: map32 (5) + "id" (3) + 0xcf, then the id */
#define BUSY_BACKOFF_MS 10         /* first wait after BUSY; doubles up to the next */
#define BUSY_BACKOFF_MAX_MS 500
#define BUSY_RETRY_MS 2000         /* BUSY answers are retried for this long at most */
#define POLL_SLICE_MS 50           /* how often a wait looks at the cancel flag */
#define ABANDON_WAIT_MS 1000       /* how long a cancelled stream waits for its final reply */
#define LEADER_HOPS 4              /* NOT_LEADER redirects followed per call */
#define FAILOVER_BACKOFF_MS 100    /* first wait when no leader is known; doubles up to 1 s */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t client_now_ms(void)
{
    return now_ms();
}

static void sleep_ms(int64_t ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

bool client_sleep(kvs_client *c, int64_t ms)
{
    for (int64_t slept = 0; slept < ms && !atomic_load(&c->cancel); slept += POLL_SLICE_MS) {
        sleep_ms(POLL_SLICE_MS < ms - slept ? POLL_SLICE_MS : ms - slept);
    }
    return !atomic_load(&c->cancel);
}

int client_fail(kvs_client *c, int status, const char *fmt, ...)
{
    int n = snprintf(c->err, sizeof c->err, "%s: ", kvs_status_name(status));
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err + n, sizeof c->err - (size_t)n, fmt, ap);
    va_end(ap);
    return status;
}

/* 64 random bits, never 0 (the kernel's, else the clock and pid). */
static uint64_t random_id(void)
{
    uint64_t v = 0;
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (read(fd, &v, sizeof v) != (ssize_t)sizeof v) {
            v = 0;
        }
        close(fd);
    }
    if (v == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        v = ((uint64_t)ts.tv_sec * 1000000007u) ^ (uint64_t)ts.tv_nsec ^
            ((uint64_t)getpid() << 32);
    }
    return v != 0 ? v : 1;
}

/* ---- sockets -------------------------------------------------------------------------------- */

static void setopt_int(void *s, int opt, int v)
{
    (void)zmq_setsockopt(s, opt, &v, sizeof v); /* every option here exists in libzmq >= 4.3 */
}

static void conn_close(struct client_conn *k)
{
    if (k->sock != NULL) {
        zmq_close(k->sock);
        k->sock = NULL;
    }
}

/* Open k's socket to k->endpoint: the options of PROTOCOL.md section 1. */
static int conn_open(kvs_client *c, struct client_conn *k)
{
    conn_close(k);
    k->sock = zmq_socket(c->zctx, ZMQ_DEALER);
    if (k->sock == NULL) {
        return client_fail(c, KVS_INTERNAL, "zmq_socket: %s", zmq_strerror(errno));
    }
    setopt_int(k->sock, ZMQ_LINGER, 0);
    setopt_int(k->sock, ZMQ_HEARTBEAT_IVL, 250);
    setopt_int(k->sock, ZMQ_HEARTBEAT_TIMEOUT, 1000);
    setopt_int(k->sock, ZMQ_HEARTBEAT_TTL, 1000);
    setopt_int(k->sock, ZMQ_HANDSHAKE_IVL, 2000);
    setopt_int(k->sock, ZMQ_SNDHWM, 1000);
    setopt_int(k->sock, ZMQ_RCVHWM, 1000);
    setopt_int(k->sock, ZMQ_RECONNECT_IVL, 100);
    setopt_int(k->sock, ZMQ_RECONNECT_IVL_MAX, 1000);
    /* A worker socket behind a coordinator queues nothing while it has no connection: a
     * send waits for one (or finds the worker unreachable), and a lost one is seen. */
    setopt_int(k->sock, ZMQ_IMMEDIATE, k->immediate ? 1 : 0);
    int64_t maxmsg = CLIENT_MAX_REPLY;
    zmq_setsockopt(k->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    char why[256];
    int rc = c->curve ? kvs_curve_client_setup(k->sock, c->curve_server, c->curve_pub,
                                               c->curve_sec, why, sizeof why)
                      : 0;
    if (rc < 0) {
        conn_close(k);
        return client_fail(c, rc, "%s", why);
    }
    if (zmq_connect(k->sock, k->endpoint) != 0) {
        int e = errno;
        conn_close(k);
        return client_fail(c, e == ENOMEM ? KVS_NO_MEMORY : KVS_INVALID_ARGUMENT,
                           "cannot connect to '%s': %s", k->endpoint, zmq_strerror(e));
    }
    return 0;
}

/* The socket to endpoint: an open one, or a free (or least recently used) slot opened now.
 * Slot 0 is the home endpoint and is never given away. */
static int conn_get(kvs_client *c, const char *endpoint, struct client_conn **out)
{
    struct client_conn *victim = NULL;
    for (int i = 0; i < CLIENT_MAX_CONNS; i++) {
        struct client_conn *k = &c->conns[i];
        if (k->endpoint[0] != '\0' && strcmp(k->endpoint, endpoint) == 0) {
            if (k->sock == NULL) {
                KVS_TRY(conn_open(c, k));
            }
            k->last_used = c->n_calls;
            *out = k;
            return 0;
        }
        if (i > 0 && (victim == NULL || k->endpoint[0] == '\0' ||
                      (victim->endpoint[0] != '\0' && k->last_used < victim->last_used))) {
            victim = k;
        }
    }
    if (strlen(endpoint) >= CLIENT_ENDPOINT_MAX) {
        return client_fail(c, KVS_INVALID_ARGUMENT, "endpoint longer than %d bytes",
                           CLIENT_ENDPOINT_MAX - 1);
    }
    conn_close(victim);
    snprintf(victim->endpoint, sizeof victim->endpoint, "%s", endpoint);
    victim->immediate = c->coord;
    int rc = conn_open(c, victim);
    if (rc < 0) {
        victim->endpoint[0] = '\0';
        return rc;
    }
    victim->last_used = c->n_calls;
    *out = victim;
    return 0;
}

/* ---- routes (MOVED) -------------------------------------------------------------------------- */

struct client_route *client_route_find(kvs_client *c, const char *session)
{
    for (int32_t i = 0; i < c->n_routes; i++) {
        if (strcmp(c->routes[i].session, session) == 0) {
            return &c->routes[i];
        }
    }
    return NULL;
}

void client_route_drop(kvs_client *c, const char *session)
{
    struct client_route *r = client_route_find(c, session);
    if (r != NULL) {
        free(r->session);
        *r = c->routes[--c->n_routes];
    }
}

void client_route_set(kvs_client *c, const char *session, const char *endpoint)
{
    struct client_route *r = client_route_find(c, session);
    if (r == NULL) {
        if (c->n_routes == CLIENT_MAX_ROUTES) { /* drop the least recently used */
            int32_t old = 0;
            for (int32_t i = 1; i < c->n_routes; i++) {
                if (c->routes[i].last_used < c->routes[old].last_used) {
                    old = i;
                }
            }
            client_route_drop(c, c->routes[old].session);
        }
        if (c->n_routes == c->cap_routes) {
            int32_t cap = c->cap_routes ? c->cap_routes * 2 : 16;
            struct client_route *nr = realloc(c->routes, (size_t)cap * sizeof *nr);
            if (nr == NULL) {
                return; /* no route: the next call is redirected again */
            }
            c->routes = nr;
            c->cap_routes = cap;
        }
        char *s = strdup(session);
        if (s == NULL) {
            return;
        }
        r = &c->routes[c->n_routes++];
        r->session = s;
    }
    snprintf(r->endpoint, sizeof r->endpoint, "%s", endpoint);
    r->last_used = c->n_calls;
}

/* ---- append numbering ------------------------------------------------------------------------ */

struct client_seq *client_seq_of(kvs_client *c, const char *session)
{
    for (int32_t i = 0; i < c->n_seqs; i++) {
        if (strcmp(c->seqs[i].session, session) == 0) {
            return &c->seqs[i];
        }
    }
    if (c->n_seqs == CLIENT_MAX_SEQS) {
        /* Forget the oldest entry: a later append to it starts over at 1 and may be refused
         * OUT_OF_ORDER (4,096 sessions per client is past any realistic use). */
        free(c->seqs[0].session);
        memmove(&c->seqs[0], &c->seqs[1], (size_t)(c->n_seqs - 1) * sizeof c->seqs[0]);
        c->n_seqs--;
    }
    if (c->n_seqs == c->cap_seqs) {
        int32_t cap = c->cap_seqs ? c->cap_seqs * 2 : 16;
        struct client_seq *ns = realloc(c->seqs, (size_t)cap * sizeof *ns);
        if (ns == NULL) {
            return NULL;
        }
        c->seqs = ns;
        c->cap_seqs = cap;
    }
    char *s = strdup(session);
    if (s == NULL) {
        return NULL;
    }
    c->seqs[c->n_seqs] = (struct client_seq){.session = s};
    return &c->seqs[c->n_seqs++];
}

/* ---- requests ------------------------------------------------------------------------------- */

static void put_raw(kvs_client *c, const void *p, size_t n)
{
    msgpack_sbuffer_write(&c->req.sb, p, n);
}

int client_req_hold(kvs_client *c, struct client_held *h)
{
    h->size = c->req.sb.size;
    h->keys = c->req_keys;
    h->data = malloc(h->size > 0 ? h->size : 1);
    if (h->data == NULL) {
        return client_fail(c, KVS_NO_MEMORY, "out of memory");
    }
    memcpy(h->data, c->req.sb.data, h->size);
    return 0;
}

void client_req_restore(kvs_client *c, struct client_held *h)
{
    kvs_wire_buf_clear(&c->req);
    put_raw(c, h->data, h->size);
    c->req_keys = h->keys;
    free(h->data);
    h->data = NULL;
}

void client_req_begin(kvs_client *c, const char *op)
{
    kvs_wire_buf_clear(&c->req);
    /* map32 with its count patched at send time, then "id": uint64 patched per attempt */
    static const uint8_t head[ID_OFFSET] = {0xdf, 0, 0, 0, 0, 0xa2, 'i', 'd', 0xcf};
    static const uint8_t zero[8] = {0};
    put_raw(c, head, sizeof head);
    put_raw(c, zero, sizeof zero);
    c->req_keys = 1;
    client_req_cstr(c, "op", op);
    /* Engine operations carry the wait as a deadline: the worker drops work nobody waits for
     * (hello, ping, cancel and flash.watch ignore it). */
    if (strcmp(op, "hello") != 0 && strcmp(op, "ping") != 0 && strcmp(op, "cancel") != 0 &&
        strcmp(op, "flash.watch") != 0) {
        uint32_t d = (uint32_t)c->timeout_ms;
        client_req_u64(c, "deadline_ms",
                       d < KVS_WIRE_MAX_DEADLINE_MS ? d : KVS_WIRE_MAX_DEADLINE_MS);
    }
}

static void req_key(kvs_client *c, const char *key)
{
    kvs_wire_pack_cstr(&c->req.pk, key);
    c->req_keys++;
}

void client_req_str(kvs_client *c, const char *key, const char *s, size_t n)
{
    req_key(c, key);
    msgpack_pack_str(&c->req.pk, n);
    msgpack_pack_str_body(&c->req.pk, s, n);
}

void client_req_cstr(kvs_client *c, const char *key, const char *s)
{
    client_req_str(c, key, s, strlen(s));
}

void client_req_u64(kvs_client *c, const char *key, uint64_t v)
{
    req_key(c, key);
    msgpack_pack_uint64(&c->req.pk, v);
}

void client_req_f64(kvs_client *c, const char *key, double v)
{
    req_key(c, key);
    msgpack_pack_double(&c->req.pk, v);
}

void client_req_bool(kvs_client *c, const char *key, bool v)
{
    req_key(c, key);
    if (v) {
        msgpack_pack_true(&c->req.pk);
    } else {
        msgpack_pack_false(&c->req.pk);
    }
}

void client_req_array(kvs_client *c, const char *key, size_t n)
{
    req_key(c, key);
    msgpack_pack_array(&c->req.pk, n);
}

static void put_be(uint8_t *p, uint64_t v, int bytes)
{
    for (int i = bytes - 1; i >= 0; i--) {
        p[i] = (uint8_t)(v & 0xff);
        v >>= 8;
    }
}

/* Send the built request with a fresh id on k. */
static int req_send(kvs_client *c, struct client_conn *k, uint64_t *id)
{
    uint8_t *p = (uint8_t *)c->req.sb.data;
    if (c->req.sb.size > KVS_WIRE_MAX_FRAME) {
        return client_fail(c, KVS_TOO_LARGE, "request of %zu bytes exceeds the %u-byte frame limit",
                           c->req.sb.size, KVS_WIRE_MAX_FRAME);
    }
    if (k->immediate) {
        /* Nothing is queued without a connection: wait for one, briefly. A worker that
         * accepts none got nothing, so the caller may locate the session again. */
        int64_t wait = c->timeout_ms < CLIENT_CONNECT_WAIT_MS ? c->timeout_ms
                                                              : CLIENT_CONNECT_WAIT_MS;
        int64_t until = now_ms() + wait;
        for (;;) {
            zmq_pollitem_t it = {k->sock, 0, ZMQ_POLLOUT, 0};
            int64_t left = until - now_ms();
            if (zmq_poll(&it, 1, left < POLL_SLICE_MS ? (left > 0 ? left : 0) : POLL_SLICE_MS) >
                0) {
                break;
            }
            if (atomic_load(&c->cancel)) {
                return client_fail(c, KVS_CANCELLED, "cancelled");
            }
            if (now_ms() >= until) {
                return client_fail(c, KVS_UNAVAILABLE,
                                   "cannot reach the worker at %s (no connection in %lld ms)",
                                   k->endpoint, (long long)wait);
            }
        }
    }
    *id = c->next_id++;
    put_be(p + 1, c->req_keys, 4);
    put_be(p + ID_OFFSET, *id, 8);
    if (zmq_send(k->sock, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
        zmq_send(k->sock, p, c->req.sb.size, ZMQ_DONTWAIT) < 0) {
        if (errno == EAGAIN) { /* the HWM is full: the peer is not reading */
            return client_fail(c, KVS_TIMEOUT, "cannot send to %s: its queue is full",
                               k->endpoint);
        }
        return client_fail(c, KVS_INTERNAL, "send to %s: %s", k->endpoint, zmq_strerror(errno));
    }
    return 0;
}

/* ---- replies -------------------------------------------------------------------------------- */

bool mp_u64(const msgpack_object *o, uint64_t *v)
{
    if (o == NULL || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER) {
        return false;
    }
    *v = o->via.u64;
    return true;
}

bool mp_i64(const msgpack_object *o, int64_t *v)
{
    if (o != NULL && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 <= INT64_MAX) {
        *v = (int64_t)o->via.u64;
        return true;
    }
    if (o != NULL && o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        *v = o->via.i64;
        return true;
    }
    return false;
}

bool mp_f64(const msgpack_object *o, double *v)
{
    int64_t i;
    if (o != NULL && (o->type == MSGPACK_OBJECT_FLOAT64 || o->type == MSGPACK_OBJECT_FLOAT32)) {
        *v = o->via.f64;
        return true;
    }
    if (mp_i64(o, &i)) {
        *v = (double)i;
        return true;
    }
    return false;
}

bool mp_bool(const msgpack_object *o, bool *v)
{
    if (o == NULL || o->type != MSGPACK_OBJECT_BOOLEAN) {
        return false;
    }
    *v = o->via.boolean;
    return true;
}

bool mp_str(const msgpack_object *o, const char **s, size_t *n)
{
    if (o == NULL || o->type != MSGPACK_OBJECT_STR) {
        return false;
    }
    *s = o->via.str.ptr;
    *n = o->via.str.size;
    return true;
}

static int missing(kvs_client *c, const char *key, const char *type)
{
    return client_fail(c, KVS_BAD_FORMAT, "reply field '%s' missing or not %s", key, type);
}

int rep_u64(kvs_client *c, const msgpack_object *m, const char *key, uint64_t *v)
{
    return mp_u64(kvs_wire_map_get(m, key), v) ? 0 : missing(c, key, "an unsigned integer");
}

int rep_i64(kvs_client *c, const msgpack_object *m, const char *key, int64_t *v)
{
    return mp_i64(kvs_wire_map_get(m, key), v) ? 0 : missing(c, key, "an integer");
}

int rep_f64(kvs_client *c, const msgpack_object *m, const char *key, double *v)
{
    return mp_f64(kvs_wire_map_get(m, key), v) ? 0 : missing(c, key, "a number");
}

int rep_bool(kvs_client *c, const msgpack_object *m, const char *key, bool *v)
{
    return mp_bool(kvs_wire_map_get(m, key), v) ? 0 : missing(c, key, "a boolean");
}

int rep_strbuf(kvs_client *c, const msgpack_object *m, const char *key, char *buf, size_t size)
{
    const char *s;
    size_t n;
    if (!mp_str(kvs_wire_map_get(m, key), &s, &n)) {
        return missing(c, key, "a string");
    }
    if (n >= size) {
        n = size - 1;
    }
    memcpy(buf, s, n);
    buf[n] = '\0';
    return 0;
}

void kvs_client_names_free(char ***names, int32_t n)
{
    if (names == NULL || *names == NULL) {
        return;
    }
    for (int32_t i = 0; i < n; i++) {
        free((*names)[i]);
    }
    free(*names);
    *names = NULL;
}

int rep_names(kvs_client *c, const msgpack_object *m, const char *key, const char *field,
              char ***names, int32_t *n)
{
    const msgpack_object *a = kvs_wire_map_get(m, key);
    if (a == NULL || a->type != MSGPACK_OBJECT_ARRAY) {
        return missing(c, key, "an array");
    }
    uint32_t count = a->via.array.size;
    char **v = calloc(count + 1, sizeof *v);
    if (v == NULL) {
        return client_fail(c, KVS_NO_MEMORY, "out of memory for %u names", count);
    }
    for (uint32_t i = 0; i < count; i++) {
        const msgpack_object *e = &a->via.array.ptr[i];
        const char *s;
        size_t len;
        if (!mp_str(field != NULL ? kvs_wire_map_get(e, field) : e, &s, &len) ||
            (v[i] = strndup(s, len)) == NULL) {
            kvs_client_names_free(&v, (int32_t)i);
            return field != NULL ? client_fail(c, KVS_BAD_FORMAT,
                                               "reply field '%s': element %u has no string '%s'",
                                               key, i, field)
                                 : client_fail(c, KVS_BAD_FORMAT,
                                               "reply field '%s': element %u is not a string",
                                               key, i);
        }
    }
    *names = v;
    *n = (int32_t)count;
    return 0;
}

static void reply_release(kvs_client *c)
{
    if (c->have_reply) {
        msgpack_unpacked_destroy(&c->up);
        zmq_msg_close(&c->reply_msg);
        c->have_reply = false;
    }
}

/* Turn an error reply into its status and message; MOVED also records the owner. */
static int reply_error(kvs_client *c, const msgpack_object *e)
{
    int64_t status = KVS_INTERNAL;
    const char *code = "?", *msg = "";
    size_t code_n = 1, msg_n = 0;
    if (!mp_i64(kvs_wire_map_get(e, "status"), &status) || status >= 0 || status < INT32_MIN) {
        status = KVS_INTERNAL;
    }
    mp_str(kvs_wire_map_get(e, "code"), &code, &code_n);
    mp_str(kvs_wire_map_get(e, "message"), &msg, &msg_n);
    c->moved_owner[0] = '\0';
    c->leader[0] = '\0';
    const char *owner;
    size_t owner_n;
    if (status == KVS_MOVED && mp_str(kvs_wire_map_get(e, "owner"), &owner, &owner_n) &&
        owner_n > 0 && owner_n < sizeof c->moved_owner) {
        memcpy(c->moved_owner, owner, owner_n);
        c->moved_owner[owner_n] = '\0';
    }
    if (status == KVS_NOT_LEADER && mp_str(kvs_wire_map_get(e, "leader"), &owner, &owner_n) &&
        owner_n > 0 && owner_n < sizeof c->leader) {
        memcpy(c->leader, owner, owner_n);
        c->leader[owner_n] = '\0';
    }
    snprintf(c->err, sizeof c->err, "%.*s: %.*s", (int)(code_n > 64 ? 64 : code_n), code,
             (int)(msg_n > 400 ? 400 : msg_n), msg);
    return (int)status;
}

/* Receive every frame of one waiting message. 1 with the payload in *payload (to close) when
 * it is ["", payload]; -1 for another layout (all of it consumed); 0 when nothing waits. */
static int recv_frames(void *sock, zmq_msg_t *payload)
{
    int n = 0;
    bool more = true, delim_ok = false;
    zmq_msg_init(payload);
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            break; /* a message's frames arrive together: only the first read can miss */
        }
        more = zmq_msg_more(&m);
        if (n == 0) {
            delim_ok = zmq_msg_size(&m) == 0;
        }
        if (n == 1) {
            zmq_msg_move(payload, &m);
        }
        zmq_msg_close(&m);
        n++;
    }
    if (n == 2 && delim_ok) {
        return 1;
    }
    zmq_msg_close(payload);
    return n == 0 ? 0 : -1;
}

/* Wait on k for the reply to id until deadline (ms). Replies to other ids (answers to earlier
 * attempts that timed out) are dropped. 0 and *reply, or an error status. */
static int recv_reply(kvs_client *c, struct client_conn *k, uint64_t id, int64_t deadline,
                      const msgpack_object **reply)
{
    c->from_worker = false;
    c->lost = false;
    for (;;) {
        if (atomic_load(&c->cancel)) {
            c->from_worker = false;
            return client_fail(c, KVS_CANCELLED, "cancelled");
        }
        int64_t left = deadline - now_ms();
        if (left <= 0) {
            return client_fail(c, KVS_TIMEOUT, "no reply from %s within the timeout",
                               k->endpoint);
        }
        zmq_pollitem_t it = {k->sock, 0, ZMQ_POLLIN, 0};
        int n = zmq_poll(&it, 1, left < POLL_SLICE_MS ? left : POLL_SLICE_MS);
        if (n < 0 && errno != EINTR) {
            return client_fail(c, KVS_INTERNAL, "zmq_poll: %s", zmq_strerror(errno));
        }
        if (n <= 0 && k->immediate) {
            /* An immediate socket without a connection cannot send: the worker went away
             * (heartbeats, or its process closed the connection) with the request. */
            int events = 0;
            size_t len = sizeof events;
            if (zmq_getsockopt(k->sock, ZMQ_EVENTS, &events, &len) == 0 &&
                !(events & (ZMQ_POLLOUT | ZMQ_POLLIN))) {
                c->lost = true;
                return client_fail(c, KVS_TIMEOUT, "lost the connection to %s", k->endpoint);
            }
        }
        if (n <= 0) {
            continue;
        }
        reply_release(c);
        int got = recv_frames(k->sock, &c->reply_msg);
        if (got == 0) {
            continue;
        }
        if (got < 0) {
            return client_fail(c, KVS_BAD_FORMAT, "reply from %s is not [\"\", payload]",
                               k->endpoint);
        }
        const uint8_t *data = zmq_msg_data(&c->reply_msg);
        size_t len = zmq_msg_size(&c->reply_msg);
        char why[200];
        int rc = kvs_wire_prevalidate(data, len, why, sizeof why);
        if (rc < 0) {
            zmq_msg_close(&c->reply_msg);
            return client_fail(c, rc, "bad reply from %s: %s", k->endpoint, why);
        }
        msgpack_unpacked_init(&c->up);
        size_t off = 0;
        if (msgpack_unpack_next(&c->up, (const char *)data, len, &off) != MSGPACK_UNPACK_SUCCESS) {
            msgpack_unpacked_destroy(&c->up);
            zmq_msg_close(&c->reply_msg);
            return client_fail(c, KVS_BAD_FORMAT, "reply from %s does not unpack", k->endpoint);
        }
        c->have_reply = true;
        const msgpack_object *m = &c->up.data;
        uint64_t rid = 0;
        if (!mp_u64(kvs_wire_map_get(m, "id"), &rid) || rid != id) {
            continue; /* a stale reply (or an id-0 complaint about an earlier one) */
        }
        const msgpack_object *e = kvs_wire_map_get(m, "error");
        if (e != NULL) {
            c->from_worker = true; /* an answer, so a TIMEOUT here is the worker's */
            return reply_error(c, e);
        }
        *reply = m;
        return 0;
    }
}

/* ---- calls ---------------------------------------------------------------------------------- */

int client_recv(kvs_client *c, struct client_conn *k, uint64_t id, int32_t wait_ms,
                const msgpack_object **reply)
{
    c->from_worker = false;
    return recv_reply(c, k, id, now_ms() + wait_ms, reply);
}

int client_send(kvs_client *c, struct client_conn *k, uint64_t *id)
{
    KVS_TRY(req_send(c, k, id));
    c->cur_id = *id;
    c->cur_conn = k;
    c->cur_deadline = now_ms() + c->timeout_ms;
    return 0;
}

int client_conn_for(kvs_client *c, const char *session, struct client_conn **k)
{
    struct client_route *r = session != NULL ? client_route_find(c, session) : NULL;
    if (r == NULL && session != NULL && c->coord) {
        KVS_TRY(client_locate(c, session));
        r = client_route_find(c, session);
        if (r == NULL) {
            return client_fail(c, KVS_NO_MEMORY, "out of memory for a route");
        }
    }
    return conn_get(c, r != NULL ? r->endpoint : c->conns[0].endpoint, k);
}

int client_conn_reset(kvs_client *c, struct client_conn *k)
{
    reply_release(c);
    return conn_open(c, k);
}

void client_call_begin(kvs_client *c)
{
    c->err[0] = '\0';
    c->n_calls++;
    atomic_store(&c->cancel, 0); /* a cancel between calls does not reach this one */
}

int client_call(kvs_client *c, const char *session, int flags, const msgpack_object **reply)
{
    client_call_begin(c);
    if (c->coord && session != NULL) {
        return client_session_call(c, session, flags, reply);
    }
    return client_call_to(c, session, NULL, flags, reply);
}

int client_call_to(kvs_client *c, const char *session, const char *endpoint, int flags,
                   const msgpack_object **reply)
{
    int32_t attempts = 1 + (flags & CALL_RETRY ? (c->retries > 0 ? c->retries : 0) : 0);
    int32_t redirects = 0, leader_hops = 0;
    int64_t start = now_ms();
    int64_t busy_end = start + (c->timeout_ms < BUSY_RETRY_MS ? c->timeout_ms : BUSY_RETRY_MS);
    int64_t backoff = BUSY_BACKOFF_MS, failover_backoff = FAILOVER_BACKOFF_MS;
    for (;;) {
        struct client_route *r =
            session != NULL && endpoint == NULL ? client_route_find(c, session) : NULL;
        struct client_conn *k = NULL;
        int rc = conn_get(c, endpoint != NULL ? endpoint
                             : r != NULL      ? r->endpoint
                                              : c->conns[0].endpoint,
                          &k);
        if (rc < 0) {
            return rc;
        }
        if (r != NULL) {
            r->last_used = c->n_calls;
        }
        uint64_t id;
        KVS_TRY(req_send(c, k, &id));
        c->cur_id = id;
        c->cur_conn = k;
        c->cur_deadline = now_ms() + c->timeout_ms;
        c->from_worker = false;
        rc = recv_reply(c, k, id, c->cur_deadline, reply);
        if (rc == KVS_TIMEOUT) {
            if (!c->from_worker) {
                /* A fresh socket: nothing of this attempt can be mistaken for a later reply. */
                char why[sizeof c->err];
                snprintf(why, sizeof why, "%s", c->err);
                conn_open(c, k);
                if (session != NULL && r != NULL) {
                    client_route_drop(c, session); /* its worker is silent: ask home again */
                    if (c->coord) {
                        snprintf(c->err, sizeof c->err, "%s", why);
                        return rc; /* home is the coordinator: the caller locates it */
                    }
                }
                snprintf(c->err, sizeof c->err, "%s", why);
            }
            if (--attempts > 0) {
                continue;
            }
            return rc;
        }
        if (rc == KVS_NOT_LEADER && k == &c->conns[0]) {
            /* A standby coordinator: go to the leader it names; during a failover there may
             * be none for up to the leader lease: wait for one (nothing was done). */
            if (c->leader[0] != '\0' && strcmp(c->leader, c->conns[0].endpoint) != 0 &&
                leader_hops < LEADER_HOPS) {
                leader_hops++;
                snprintf(c->conns[0].endpoint, sizeof c->conns[0].endpoint, "%s", c->leader);
                KVS_TRY(conn_open(c, &c->conns[0]));
                continue;
            }
            if (now_ms() + failover_backoff < start + c->timeout_ms) {
                char why[sizeof c->err];
                snprintf(why, sizeof why, "%s", c->err);
                if (!client_sleep(c, failover_backoff)) {
                    atomic_store(&c->cancel, 0);
                    return client_fail(c, KVS_CANCELLED, "cancelled (last answer: %s)", why);
                }
                failover_backoff = failover_backoff * 2 > 1000 ? 1000 : failover_backoff * 2;
                continue;
            }
            return rc;
        }
        if (rc == KVS_BUSY && now_ms() + backoff < busy_end) {
            char why[sizeof c->err];
            snprintf(why, sizeof why, "%s", c->err);
            for (int64_t slept = 0; slept < backoff && !atomic_load(&c->cancel);
                 slept += POLL_SLICE_MS) {
                sleep_ms(POLL_SLICE_MS < backoff - slept ? POLL_SLICE_MS : backoff - slept);
            }
            if (atomic_load(&c->cancel)) {
                atomic_store(&c->cancel, 0);
                return client_fail(c, KVS_CANCELLED, "cancelled (last answer: %s)", why);
            }
            backoff = backoff * 2 > BUSY_BACKOFF_MAX_MS ? BUSY_BACKOFF_MAX_MS : backoff * 2;
            continue;
        }
        if (rc == KVS_MOVED && c->moved_owner[0] != '\0' && redirects < c->max_redirects) {
            redirects++;
            if (session != NULL) {
                client_route_set(c, session, c->moved_owner);
                if (client_route_find(c, session) != NULL) {
                    continue;
                }
            }
            /* no session to route (or no memory for the route): this call goes there */
            struct client_conn *to;
            KVS_TRY(conn_get(c, c->moved_owner, &to));
            KVS_TRY(req_send(c, to, &id));
            c->cur_id = id;
            c->cur_conn = to;
            c->cur_deadline = now_ms() + c->timeout_ms;
            rc = recv_reply(c, to, id, c->cur_deadline, reply);
        }
        if (rc == KVS_CANCELLED && !c->from_worker) {
            /* kvs_client_cancel: tell the worker, and read nothing of this request later */
            client_abandon(c);
            return client_fail(c, KVS_CANCELLED, "cancelled");
        }
        if (rc == 0) {
            c->err[0] = '\0'; /* an attempt that failed before does not count */
        }
        return rc;
    }
}

int client_next(kvs_client *c, const msgpack_object **reply)
{
    int rc = recv_reply(c, c->cur_conn, c->cur_id, c->cur_deadline, reply);
    if (rc == KVS_TIMEOUT) {
        char why[sizeof c->err];
        snprintf(why, sizeof why, "%s", c->err);
        client_abandon(c);
        snprintf(c->err, sizeof c->err, "%s", why);
    }
    return rc;
}

void client_abandon(kvs_client *c)
{
    struct client_conn *k = c->cur_conn;
    uint64_t target = c->cur_id;
    atomic_store(&c->cancel, 0);
    char why[sizeof c->err];
    snprintf(why, sizeof why, "%s", c->err);
    client_req_begin(c, "cancel");
    client_req_u64(c, "target", target);
    uint64_t id;
    bool clean = false;
    if (req_send(c, k, &id) == 0) {
        /* Wait for the stream's last message (its done, or its CANCELLED error). */
        int64_t deadline = now_ms() + ABANDON_WAIT_MS;
        const msgpack_object *m;
        while (!clean) {
            c->from_worker = false;
            int rc = recv_reply(c, k, target, deadline, &m);
            bool done = false;
            if (rc == 0) { /* a single reply, or a stream's piece unless it is the last */
                done = kvs_wire_map_get(m, "seq") == NULL;
                mp_bool(kvs_wire_map_get(m, "done"), &done);
            }
            if (rc < 0 && c->from_worker) {
                done = true; /* an error reply (CANCELLED, as a rule) ends a stream */
            }
            if (done) {
                clean = true;
            } else if (rc < 0) {
                break; /* silence, or a reply that is not protocol */
            }
        }
    }
    if (!clean) {
        conn_open(c, k);
    }
    atomic_store(&c->cancel, 0);
    snprintf(c->err, sizeof c->err, "%s", why);
}

/* ---- lifecycle ------------------------------------------------------------------------------- */

int kvs_client_connect(const char *endpoint, const struct kvs_client_opts *opts,
                       kvs_client **out, char *err, size_t errlen)
{
    *out = NULL;
    struct kvs_client_opts o = {0};
    if (opts != NULL) {
        o = *opts;
    }
    if (endpoint == NULL) {
        endpoint = getenv("KVSTREAM_ENDPOINT");
        if (endpoint == NULL || endpoint[0] == '\0') {
            endpoint = KVS_CLIENT_DEFAULT_ENDPOINT;
        }
    }
    if (endpoint[0] == '\0' || strlen(endpoint) >= CLIENT_ENDPOINT_MAX) {
        kvs_errf(err, errlen, "endpoint must be 1..%d bytes", CLIENT_ENDPOINT_MAX - 1);
        return KVS_INVALID_ARGUMENT;
    }
    if (o.timeout_ms < 0 || o.connect_timeout_ms < 0 || o.max_redirects < 0) {
        kvs_errf(err, errlen, "timeouts and max_redirects must be >= 0");
        return KVS_INVALID_ARGUMENT;
    }
    if ((o.curve_public_key == NULL) != (o.curve_secret_key == NULL) ||
        (o.curve_public_key != NULL && o.curve_server_key == NULL)) {
        kvs_errf(err, errlen, "a CURVE key pair needs both keys and curve_server_key");
        return KVS_INVALID_ARGUMENT;
    }
    const char *keys[3] = {o.curve_server_key, o.curve_public_key, o.curve_secret_key};
    for (int i = 0; i < 3; i++) {
        if (keys[i] != NULL && strlen(keys[i]) != KVS_CURVE_KEY_Z85) {
            kvs_errf(err, errlen, "a CURVE key must be %d characters of Z85", KVS_CURVE_KEY_Z85);
            return KVS_INVALID_ARGUMENT;
        }
    }
    if (o.curve_server_key != NULL && !kvs_curve_available()) {
        kvs_errf(err, errlen, "this libzmq was built without CURVE");
        return KVS_UNSUPPORTED;
    }
    kvs_client *c = calloc(1, sizeof *c);
    if (c == NULL) {
        kvs_errf(err, errlen, "out of memory");
        return KVS_NO_MEMORY;
    }
    if (o.curve_server_key != NULL) {
        c->curve = true;
        memcpy(c->curve_server, o.curve_server_key, KVS_CURVE_KEY_Z85 + 1);
        if (o.curve_public_key != NULL) {
            memcpy(c->curve_pub, o.curve_public_key, KVS_CURVE_KEY_Z85 + 1);
            memcpy(c->curve_sec, o.curve_secret_key, KVS_CURVE_KEY_Z85 + 1);
        } else if (zmq_curve_keypair(c->curve_pub, c->curve_sec) != 0) {
            kvs_errf(err, errlen, "zmq_curve_keypair: %s", zmq_strerror(errno));
            free(c);
            return KVS_INTERNAL;
        }
    }
    c->timeout_ms = o.timeout_ms > 0 ? o.timeout_ms : 30000;
    c->retries = o.retries == 0 ? 2 : (o.retries < 0 ? 0 : o.retries);
    c->max_redirects = o.max_redirects > 0 ? o.max_redirects : 4;
    /* a random id stays below 2^63 so that it survives JSON and signed 64-bit tools */
    c->client_id = o.client_id != 0 ? o.client_id : (random_id() >> 1 | 1);
    c->next_id = (random_id() & 0xffffff) + 1; /* ids that rarely look alike across clients */
    atomic_init(&c->cancel, 0);
    kvs_wire_buf_init(&c->req);
    snprintf(c->conns[0].endpoint, sizeof c->conns[0].endpoint, "%s", endpoint);
    c->zctx = zmq_ctx_new();
    if (c->zctx == NULL) {
        kvs_errf(err, errlen, "zmq_ctx_new: %s", zmq_strerror(errno));
        kvs_client_destroy(&c);
        return KVS_INTERNAL;
    }
    int rc = conn_open(c, &c->conns[0]);
    if (rc < 0) {
        kvs_errf(err, errlen, "%s", c->err);
        kvs_client_destroy(&c);
        return rc;
    }
    /* hello: the worker answers, and speaks version 1 */
    int32_t saved_timeout = c->timeout_ms;
    c->timeout_ms = o.connect_timeout_ms > 0 ? o.connect_timeout_ms : 5000;
    client_req_begin(c, "hello");
    client_req_array(c, "versions", 1);
    msgpack_pack_uint32(&c->req.pk, KVS_WIRE_VERSION);
    client_req_cstr(c, "client", o.name != NULL ? o.name : "libkvstream");
    const msgpack_object *m;
    int32_t saved_retries = c->retries;
    c->retries = 0;
    rc = client_call(c, NULL, 0, &m);
    c->retries = saved_retries;
    c->timeout_ms = saved_timeout;
    uint64_t version = 0;
    if (rc == 0) {
        rc = rep_u64(c, m, "version", &version);
        if (!mp_u64(kvs_wire_map_get(m, "minor"), &c->minor)) {
            c->minor = 0;
        }
        /* A coordinator (PROTOCOL.md section 9) says so: its sessions are located. */
        const char *server;
        size_t server_n;
        c->coord = mp_str(kvs_wire_map_get(m, "server"), &server, &server_n) &&
                   server_n == strlen("kvs-coordinator") &&
                   memcmp(server, "kvs-coordinator", server_n) == 0;
    }
    if (rc == 0 && version != KVS_WIRE_VERSION) {
        rc = client_fail(c, KVS_UNSUPPORTED, "the worker chose protocol version %llu",
                         (unsigned long long)version);
    }
    if (rc < 0) {
        if (rc == KVS_TIMEOUT) {
            kvs_errf(err, errlen, "no answer from %s within %d ms (is a coordinator or worker running there?)",
                     endpoint, o.connect_timeout_ms > 0 ? o.connect_timeout_ms : 5000);
        } else {
            kvs_errf(err, errlen, "%s", c->err);
        }
        kvs_client_destroy(&c);
        return rc;
    }
    c->err[0] = '\0';
    *out = c;
    return 0;
}

void kvs_client_destroy(kvs_client **pc)
{
    if (pc == NULL || *pc == NULL) {
        return;
    }
    kvs_client *c = *pc;
    reply_release(c);
    for (int i = 0; i < CLIENT_MAX_CONNS; i++) {
        conn_close(&c->conns[i]);
    }
    if (c->zctx != NULL) {
        zmq_ctx_term(c->zctx);
    }
    for (int32_t i = 0; i < c->n_routes; i++) {
        free(c->routes[i].session);
    }
    free(c->routes);
    for (int32_t i = 0; i < c->n_seqs; i++) {
        free(c->seqs[i].session);
    }
    free(c->seqs);
    kvs_wire_buf_destroy(&c->req);
    free(c);
    *pc = NULL;
}

const char *kvs_client_error(const kvs_client *c)
{
    return c->err;
}

const char *kvs_client_endpoint(const kvs_client *c)
{
    return c->conns[0].endpoint;
}

uint64_t kvs_client_id(const kvs_client *c)
{
    return c->client_id;
}

void kvs_client_set_timeout(kvs_client *c, int32_t timeout_ms)
{
    if (timeout_ms > 0) {
        c->timeout_ms = timeout_ms;
    }
}

int kvs_client_reconnect(kvs_client *c)
{
    reply_release(c);
    for (int i = 0; i < CLIENT_MAX_CONNS; i++) {
        if (c->conns[i].endpoint[0] != '\0') {
            KVS_TRY(conn_open(c, &c->conns[i]));
        }
    }
    return 0;
}

void kvs_client_cancel(kvs_client *c)
{
    atomic_store(&c->cancel, 1);
}
