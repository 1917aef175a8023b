/* The worker's link to the coordinator: see worker/coordlink.h. The thread's loop is the
 * table of contents: poll the DEALER, take a reply, check the fence, send what is due. */
#include "worker/coordlink.h"

#include "common/curve.h"
#include "common/log.h"
#include "common/status.h"
#include "common/wire.h"

#include <errno.h>
#include <msgpack.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#define MAX_COORDS 8       /* endpoints in --coordinator */
#define EP_MAX 255         /* bytes of an endpoint */
#define REPLY_WAIT_MS 1500 /* a request unanswered this long: the coordinator is away */
#define RETRY_MIN_MS 100   /* registration retries back off from here ... */
#define RETRY_MAX_MS 2000  /* ... to here */
#define DEFAULT_HEARTBEAT_MS 1000
#define DEFAULT_TTL_S 10

struct kvs_coordlink {
    struct kvs_coordlink_opts o;
    char worker[65];            /* worker id */
    char advertise[EP_MAX + 1]; /* endpoint clients use */
    char device[64];
    char coords[MAX_COORDS][EP_MAX + 1]; /* --coordinator list */
    int n_coords;
    char current[EP_MAX + 1]; /* the endpoint the socket is connected to */
    int next_coord;           /* index in coords of the next one to try */
    void *zctx, *sock;
    bool curve;                                /* the socket is a CURVE client */
    char coord_key[KVS_CURVE_KEY_Z85 + 1];     /* coordinator's public key (Z85) */
    char curve_pub[KVS_CURVE_KEY_Z85 + 1];     /* ours: public ... */
    char curve_sec[KVS_CURVE_KEY_Z85 + 1];     /* ... and secret */
    pthread_t th;
    bool started;
    atomic_int stop;
    kvs_wire_buf out;
    /* the protocol's state (the link's thread) */
    uint64_t next_id;
    uint64_t pending_id;   /* request awaiting its reply (0 = none) */
    bool pending_register; /* ... and whether it is a registration */
    int64_t pending_sent_ms;
    bool registered; /* with the coordinator we talk to */
    bool ever_registered;
    bool fenced;
    int64_t heartbeat_ms, ttl_ms;
    int64_t next_send_ms;     /* when the next register / heartbeat is due */
    int64_t retry_ms;         /* the registration backoff */
    int64_t last_reply_ms;    /* last successful register / heartbeat reply */
    int64_t lease_renewed_ms; /* conservative date of the lease's last renewal */
    uint64_t last_rows;       /* for tokens/s */
    int64_t last_rows_ms;
    double load; /* tokens/s over the last beat */
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static bool valid_id(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 64 || s[0] == '.') {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-')) {
            return false;
        }
    }
    return true;
}

static bool valid_endpoint(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > EP_MAX || (strncmp(s, "tcp://", 6) != 0 && strncmp(s, "ipc://", 6) != 0)) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        if ((unsigned char)s[i] <= ' ' || s[i] == 0x7f) {
            return false;
        }
    }
    return true;
}

static void setopt_int(void *s, int opt, int v)
{
    if (zmq_setsockopt(s, opt, &v, sizeof v) != 0) {
        KVS_WARN("coordlink: zmq_setsockopt(%d) failed: %s", opt, zmq_strerror(errno));
    }
}

/* (Re)connect a fresh DEALER to ep: replies still queued for the old one are dropped. */
static int connect_to(kvs_coordlink *l, const char *ep)
{
    if (l->sock != NULL) {
        zmq_close(l->sock);
    }
    l->sock = zmq_socket(l->zctx, ZMQ_DEALER);
    if (l->sock == NULL) {
        KVS_ERROR("coordlink: zmq_socket: %s", zmq_strerror(errno));
        return KVS_INTERNAL;
    }
    int64_t maxmsg = KVS_WIRE_MAX_FRAME + 64;
    zmq_setsockopt(l->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    setopt_int(l->sock, ZMQ_LINGER, 0);
    setopt_int(l->sock, ZMQ_HEARTBEAT_IVL, 250);
    setopt_int(l->sock, ZMQ_HEARTBEAT_TIMEOUT, 1000);
    setopt_int(l->sock, ZMQ_HEARTBEAT_TTL, 1000);
    setopt_int(l->sock, ZMQ_SNDHWM, 16);
    setopt_int(l->sock, ZMQ_RCVHWM, 16);
    char err[256];
    if (l->curve && kvs_curve_client_setup(l->sock, l->coord_key, l->curve_pub, l->curve_sec,
                                           err, sizeof err) < 0) {
        KVS_ERROR("coordlink: %s", err);
        return KVS_INTERNAL;
    }
    if (zmq_connect(l->sock, ep) != 0) {
        KVS_ERROR("coordlink: cannot connect to %s: %s", ep, zmq_strerror(errno));
        return KVS_INVALID_ARGUMENT;
    }
    snprintf(l->current, sizeof l->current, "%s", ep);
    l->pending_id = 0;
    return KVS_OK;
}

/* The next coordinator of the list (after one did not answer). */
static void rotate(kvs_coordlink *l)
{
    const char *ep = l->coords[l->next_coord];
    l->next_coord = (l->next_coord + 1) % l->n_coords;
    connect_to(l, ep);
    l->registered = false;
}

static void pack_kv_str(msgpack_packer *pk, const char *k, const char *v)
{
    kvs_wire_pack_cstr(pk, k);
    kvs_wire_pack_cstr(pk, v);
}

static void pack_kv_i64(msgpack_packer *pk, const char *k, int64_t v)
{
    kvs_wire_pack_cstr(pk, k);
    msgpack_pack_int64(pk, v < 0 ? 0 : v);
}

static void send_request(kvs_coordlink *l, bool reg, int64_t now)
{
    kvs_server *srv = l->o.srv;
    struct kvs_server_load ld;
    kvs_server_load(srv, &ld);
    kvs_wire_buf_clear(&l->out);
    msgpack_packer *pk = &l->out.pk;
    uint64_t id = ++l->next_id;
    if (reg) {
        msgpack_pack_map(pk, 8);
        kvs_wire_pack_cstr(pk, "id"), msgpack_pack_uint64(pk, id);
        pack_kv_str(pk, "op", "worker.register");
        pack_kv_str(pk, "worker", l->worker);
        pack_kv_str(pk, "endpoint", l->advertise);
        pack_kv_str(pk, "model", kvs_server_model_sha256(srv));
        pack_kv_i64(pk, "cells_total", ld.cells_total);
        /* how the coordinator counts what a budget reserves here (PROTOCOL.md §9) */
        pack_kv_i64(pk, "block_size", ld.block_size);
        pack_kv_str(pk, "device", l->device);
    } else {
        if (l->last_rows_ms > 0 && now > l->last_rows_ms && ld.rows >= l->last_rows) {
            l->load = (double)(ld.rows - l->last_rows) * 1e3 / (double)(now - l->last_rows_ms);
        }
        l->last_rows = ld.rows;
        l->last_rows_ms = now;
        msgpack_pack_map(pk, 9);
        kvs_wire_pack_cstr(pk, "id"), msgpack_pack_uint64(pk, id);
        pack_kv_str(pk, "op", "worker.heartbeat");
        pack_kv_str(pk, "worker", l->worker);
        pack_kv_i64(pk, "cells_free", ld.cells_free);
        pack_kv_i64(pk, "cells_used", ld.cells_used);
        pack_kv_i64(pk, "cells_reserved", ld.cells_reserved);
        pack_kv_i64(pk, "queue", ld.queue);
        pack_kv_i64(pk, "sessions", ld.sessions);
        kvs_wire_pack_cstr(pk, "load"), msgpack_pack_double(pk, l->load);
    }
    if (zmq_send(l->sock, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
        zmq_send(l->sock, l->out.sb.data, l->out.sb.size, ZMQ_DONTWAIT) < 0) {
        /* not connected yet (HWM with no peer): counts as unanswered */
        KVS_DEBUG("coordlink: %s not sent to %s: %s", reg ? "register" : "heartbeat", l->current,
                  zmq_strerror(errno));
    }
    l->pending_id = id;
    l->pending_register = reg;
    l->pending_sent_ms = now;
}

/* ---- replies ---- */

static bool get_i64(const msgpack_object *m, const char *key, int64_t *out)
{
    const msgpack_object *v = kvs_wire_map_get(m, key);
    if (v != NULL && v->type == MSGPACK_OBJECT_POSITIVE_INTEGER && v->via.u64 <= INT64_MAX) {
        *out = (int64_t)v->via.u64;
        return true;
    }
    if (v != NULL && v->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        *out = v->via.i64;
        return true;
    }
    return false;
}

static void get_str(const msgpack_object *m, const char *key, char *out, size_t cap)
{
    const msgpack_object *v = kvs_wire_map_get(m, key);
    out[0] = '\0';
    if (v != NULL && v->type == MSGPACK_OBJECT_STR && v->via.str.size < cap) {
        memcpy(out, v->via.str.ptr, v->via.str.size);
        out[v->via.str.size] = '\0';
    }
}

/* An error reply to our pending request. */
static void on_error(kvs_coordlink *l, const msgpack_object *e, int64_t now)
{
    char code[32], msg[512], leader[EP_MAX + 1];
    get_str(e, "code", code, sizeof code);
    get_str(e, "message", msg, sizeof msg);
    get_str(e, "leader", leader, sizeof leader);
    const char *what = l->pending_register ? "worker.register" : "worker.heartbeat";
    if (strcmp(code, "NOT_LEADER") == 0) {
        if (leader[0] != '\0' && valid_endpoint(leader) && strcmp(leader, l->current) != 0) {
            KVS_INFO("coordlink: %s is standing by; registering with the leader %s", l->current,
                     leader);
            connect_to(l, leader);
            l->next_send_ms = now;
        } else {
            l->next_send_ms = now + l->retry_ms; /* a failover in progress: wait */
            l->retry_ms = l->retry_ms * 2 > RETRY_MAX_MS ? RETRY_MAX_MS : l->retry_ms * 2;
        }
        l->registered = false;
        return;
    }
    if (strcmp(code, "NOT_FOUND") == 0 && !l->pending_register) {
        KVS_WARN("coordlink: %s: %s; registering again", what, msg);
        l->registered = false;
        l->next_send_ms = now;
        return;
    }
    /* UNAVAILABLE (the store), MODEL_MISMATCH, INVALID_ARGUMENT, TOO_LARGE: logged, retried
     * with a backoff (an operator may fix the cluster meanwhile). */
    KVS_WARN("coordlink: %s refused by %s: %s (%s); retrying in %lld ms", what, l->current, msg,
             code, (long long)l->retry_ms);
    if (l->pending_register) {
        l->next_send_ms = now + l->retry_ms;
        l->retry_ms = l->retry_ms * 2 > RETRY_MAX_MS ? RETRY_MAX_MS : l->retry_ms * 2;
    }
}

/* Silence after which the worker stops serving: the lease TTL minus a margin (TTL/3, at
 * least 1 s), so it stops before its lease can expire. */
static int64_t fence_limit(const kvs_coordlink *l)
{
    int64_t margin = l->ttl_ms / 3 > 1000 ? l->ttl_ms / 3 : 1000;
    return l->ttl_ms - margin;
}

static void on_reply(kvs_coordlink *l, const uint8_t *data, size_t len, int64_t now)
{
    char err[256];
    if (kvs_wire_prevalidate(data, len, err, sizeof err) < 0) {
        KVS_WARN("coordlink: a reply from %s is not protocol: %s", l->current, err);
        return;
    }
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    if (msgpack_unpack_next(&u, (const char *)data, len, NULL) != MSGPACK_UNPACK_SUCCESS) {
        msgpack_unpacked_destroy(&u);
        return;
    }
    const msgpack_object *m = &u.data;
    int64_t id = 0;
    if (!get_i64(m, "id", &id) || (uint64_t)id != l->pending_id || l->pending_id == 0) {
        msgpack_unpacked_destroy(&u); /* a late reply to a request given up on */
        return;
    }
    /* Dated at the request's send time, not at receipt: a reply that waited in the
     * socket while this process was paused proves nothing about now. */
    int64_t sent = l->pending_sent_ms;
    l->pending_id = 0;
    const msgpack_object *e = kvs_wire_map_get(m, "error");
    if (e != NULL) {
        on_error(l, e, now);
    } else if (l->pending_register) {
        int64_t hb = 0, ttl = 0;
        if (get_i64(m, "heartbeat_ms", &hb) && hb >= 10 && hb <= 60000) {
            l->heartbeat_ms = hb;
        }
        if (get_i64(m, "lease_ttl_s", &ttl) && ttl >= 1 && ttl <= 3600) {
            l->ttl_ms = ttl * 1000;
        }
        KVS_INFO("coordlink: worker '%s' registered with %s (heartbeat %lld ms, lease %lld s)",
                 l->worker, l->current, (long long)l->heartbeat_ms, (long long)(l->ttl_ms / 1000));
        l->registered = l->ever_registered = true;
        l->retry_ms = RETRY_MIN_MS;
        l->last_reply_ms = sent;
        l->lease_renewed_ms = sent; /* granted or renewed while answering */
        l->next_send_ms = now + l->heartbeat_ms;
    } else {
        int64_t age = 0;
        l->last_reply_ms = sent;
        if (get_i64(m, "lease_age_ms", &age) && age >= 0) {
            int64_t renewed = sent - age;
            if (renewed > l->lease_renewed_ms) {
                l->lease_renewed_ms = renewed;
            }
        }
    }
    msgpack_unpacked_destroy(&u);
    if (l->ever_registered) {
        /* the server itself refuses past this point, whichever thread notices first */
        int64_t last =
            l->last_reply_ms > l->lease_renewed_ms ? l->last_reply_ms : l->lease_renewed_ms;
        kvs_server_serve_until(l->o.srv, last + fence_limit(l));
    }
}

/* The ownership rule (see the header). */
static void check_fence(kvs_coordlink *l, int64_t now)
{
    if (!l->ever_registered || l->fenced) {
        return;
    }
    int64_t limit = fence_limit(l);
    int64_t silent = now - l->last_reply_ms, lease_age = now - l->lease_renewed_ms;
    if (silent <= limit || lease_age <= limit) {
        return;
    }
    char why[448];
    snprintf(why, sizeof why,
             "worker '%s' stopped serving: no reply from the coordinator for %lld ms and its "
             "lease not renewed for %lld ms (TTL %lld s): its sessions may be restored "
             "elsewhere; restart it to serve again",
             l->worker, (long long)silent, (long long)lease_age, (long long)(l->ttl_ms / 1000));
    kvs_server_fence(l->o.srv, why);
    l->fenced = true;
}

static void *link_main(void *arg)
{
    kvs_coordlink *l = arg;
    rotate(l);
    l->next_send_ms = now_ms();
    while (!atomic_load(&l->stop)) {
        int64_t now = now_ms();
        long wait = l->fenced ? 200 : (long)(l->next_send_ms - now);
        wait = wait < 0 ? 0 : wait > 100 ? 100 : wait;
        zmq_pollitem_t it = {l->sock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&it, 1, wait) < 0 && errno != EINTR) {
            KVS_ERROR("coordlink: zmq_poll: %s", zmq_strerror(errno));
            break;
        }
        now = now_ms();
        /* take the replies: [""][payload] */
        while (it.revents & ZMQ_POLLIN) {
            zmq_msg_t parts[2];
            int n = 0;
            for (;;) {
                zmq_msg_t m;
                zmq_msg_init(&m);
                if (zmq_msg_recv(&m, l->sock, ZMQ_DONTWAIT) < 0) {
                    zmq_msg_close(&m);
                    break;
                }
                bool more = zmq_msg_more(&m);
                if (n < 2) {
                    parts[n] = m;
                } else {
                    zmq_msg_close(&m);
                }
                n++;
                if (!more) {
                    break;
                }
            }
            if (n == 0) {
                break;
            }
            if (n == 2 && zmq_msg_size(&parts[0]) == 0 && !l->fenced) {
                on_reply(l, zmq_msg_data(&parts[1]), zmq_msg_size(&parts[1]), now);
            }
            for (int i = 0; i < n && i < 2; i++) {
                zmq_msg_close(&parts[i]);
            }
        }
        check_fence(l, now);
        if (l->fenced) {
            continue; /* no more heartbeats: the coordinator declares it down */
        }
        /* a request unanswered: that coordinator is away, try the next one */
        if (l->pending_id != 0 && now - l->pending_sent_ms > REPLY_WAIT_MS) {
            KVS_WARN("coordlink: no answer from %s in %d ms", l->current, REPLY_WAIT_MS);
            rotate(l);
            l->next_send_ms = now;
        }
        if (l->pending_id == 0 && now >= l->next_send_ms) {
            send_request(l, !l->registered, now);
            if (l->registered) {
                l->next_send_ms = now + l->heartbeat_ms;
            } else {
                l->next_send_ms = now + REPLY_WAIT_MS; /* the reply sets the real one */
            }
        }
    }
    return NULL;
}

int kvs_coordlink_start(const struct kvs_coordlink_opts *o, kvs_coordlink **out, char *err,
                        size_t errlen)
{
    *out = NULL;
    if (o->srv == NULL || o->worker_id == NULL || !valid_id(o->worker_id)) {
        kvs_errf(err, errlen,
                 "worker id '%s': 1..64 bytes of [A-Za-z0-9._-], not starting "
                 "with '.'",
                 o->worker_id ? o->worker_id : "");
        return KVS_INVALID_ARGUMENT;
    }
    if (o->advertise == NULL || !valid_endpoint(o->advertise)) {
        kvs_errf(err, errlen, "advertised endpoint '%s': tcp://... or ipc://..., 1..%d bytes",
                 o->advertise ? o->advertise : "", EP_MAX);
        return KVS_INVALID_ARGUMENT;
    }
    if (o->device != NULL && strlen(o->device) > 63) {
        kvs_errf(err, errlen, "device name longer than 63 bytes");
        return KVS_INVALID_ARGUMENT;
    }
    kvs_coordlink *l = calloc(1, sizeof *l);
    if (l == NULL) {
        return KVS_NO_MEMORY;
    }
    l->o = *o;
    snprintf(l->worker, sizeof l->worker, "%s", o->worker_id);
    snprintf(l->advertise, sizeof l->advertise, "%s", o->advertise);
    snprintf(l->device, sizeof l->device, "%s", o->device ? o->device : "cpu");
    const char *p = o->coordinators ? o->coordinators : "";
    while (*p != '\0') {
        const char *comma = strchr(p, ',');
        size_t n = comma ? (size_t)(comma - p) : strlen(p);
        if (l->n_coords == MAX_COORDS || n == 0 || n > EP_MAX) {
            break;
        }
        memcpy(l->coords[l->n_coords], p, n);
        l->coords[l->n_coords][n] = '\0';
        if (!valid_endpoint(l->coords[l->n_coords])) {
            break;
        }
        l->n_coords++;
        p += n + (comma ? 1 : 0);
        if (comma && *p == '\0') {
            break;
        }
    }
    if (l->n_coords == 0 || *p != '\0') {
        kvs_errf(err, errlen,
                 "--coordinator '%s': 1..%d endpoints tcp://... or ipc://... "
                 "separated by commas",
                 o->coordinators ? o->coordinators : "", MAX_COORDS);
        free(l);
        return KVS_INVALID_ARGUMENT;
    }
    if (o->coordinator_key != NULL) {
        l->curve = true;
        bool ok = strlen(o->coordinator_key) == KVS_CURVE_KEY_Z85;
        if (ok) {
            memcpy(l->coord_key, o->coordinator_key, KVS_CURVE_KEY_Z85 + 1);
        }
        if (ok && o->curve_secret != NULL) {
            ok = strlen(o->curve_secret) == KVS_CURVE_KEY_Z85 &&
                 zmq_curve_public(l->curve_pub, o->curve_secret) == 0;
            memcpy(l->curve_sec, o->curve_secret, ok ? KVS_CURVE_KEY_Z85 + 1 : 1);
        } else if (ok) {
            ok = zmq_curve_keypair(l->curve_pub, l->curve_sec) == 0;
        }
        if (!ok) {
            kvs_errf(err, errlen, "the coordinator's or the worker's CURVE key is not usable");
            free(l);
            return KVS_INVALID_ARGUMENT;
        }
    }
    l->heartbeat_ms = DEFAULT_HEARTBEAT_MS;
    l->ttl_ms = DEFAULT_TTL_S * 1000;
    l->retry_ms = RETRY_MIN_MS;
    atomic_init(&l->stop, 0);
    kvs_wire_buf_init(&l->out);
    l->zctx = zmq_ctx_new();
    if (l->zctx == NULL) {
        kvs_errf(err, errlen, "zmq: %s", zmq_strerror(errno));
        kvs_wire_buf_destroy(&l->out);
        free(l);
        return KVS_INTERNAL;
    }
    if (pthread_create(&l->th, NULL, link_main, l) != 0) {
        kvs_errf(err, errlen, "cannot start the coordinator link's thread");
        kvs_coordlink_stop(&l);
        return KVS_INTERNAL;
    }
    l->started = true;
    *out = l;
    return KVS_OK;
}

void kvs_coordlink_stop(kvs_coordlink **pl)
{
    if (pl == NULL || *pl == NULL) {
        return;
    }
    kvs_coordlink *l = *pl;
    atomic_store(&l->stop, 1);
    if (l->started) {
        pthread_join(l->th, NULL);
    }
    if (l->sock != NULL) {
        zmq_close(l->sock);
    }
    if (l->zctx != NULL) {
        zmq_ctx_term(l->zctx);
    }
    kvs_wire_buf_destroy(&l->out);
    free(l);
    *pl = NULL;
}
