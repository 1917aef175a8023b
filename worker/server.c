/* kvs-worker's server: the I/O thread (ROUTER, flash cache, watchers) and the lifecycle;
 * the engine thread is in server_engine.c. See worker/server.h and docs/PROTOCOL.md. */
#include "worker/server_impl.h"

#include "common/log.h"
#include "common/status.h"
#include "common/sdnotify.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- helpers ------------------------------------------------------------------------------ */

static void setopt_int(void *s, int opt, int v)
{
    if (zmq_setsockopt(s, opt, &v, sizeof v) != 0) {
        KVS_WARN("server: zmq_setsockopt(%d) failed: %s", opt, zmq_strerror(errno));
    }
}

bool kvs_srv_send_frames(void *sock, const void *const *data, const size_t *len, int n)
{
    for (int i = 0; i < n; i++) {
        if (zmq_send(sock, data[i], len[i], i + 1 < n ? ZMQ_SNDMORE : 0) < 0) {
            KVS_ERROR("server: inproc send failed: %s", zmq_strerror(errno));
            return false;
        }
    }
    return true;
}

int kvs_srv_recv_parts(void *sock, zmq_msg_t *parts, int n_max)
{
    int n = 0;
    for (;;) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, sock, n == 0 ? ZMQ_DONTWAIT : 0) < 0) {
            zmq_msg_close(&m);
            if (n == 0 && errno == EAGAIN) {
                return 0;
            }
            if (errno == EINTR && n > 0) {
                continue;
            }
            for (int i = 0; i < n && i < n_max; i++) {
                zmq_msg_close(&parts[i]);
            }
            return n == 0 && errno == EINTR ? 0 : -1;
        }
        bool more = zmq_msg_more(&m);
        if (n < n_max) {
            parts[n] = m;
        } else {
            zmq_msg_close(&m);
        }
        n++;
        if (!more) {
            return n;
        }
    }
}

void kvs_srv_close_parts(zmq_msg_t *parts, int n, int n_max)
{
    for (int i = 0; i < n && i < n_max; i++) {
        zmq_msg_close(&parts[i]);
    }
}

/* ---- I/O thread ------------------------------------------------------------------------------ */

/* Send [identity][""][b] to a peer without blocking. 0, or the errno of a lost reply:
 * EHOSTUNREACH (the peer is gone), EAGAIN (it is not reading: its send queue is full). */
static int io_reply(kvs_server *srv, const void *ident, size_t ident_len, const void *data,
                    size_t len)
{
    if (zmq_send(srv->router, ident, ident_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) {
        int e = errno;
        /* every later piece of a stream to a gone peer lands here too: debug level only */
        if (e == EHOSTUNREACH) {
            KVS_DEBUG("server: reply to a gone peer dropped");
        } else {
            KVS_WARN("server: reply dropped (%s)", zmq_strerror(e));
        }
        return e;
    }
    if (zmq_send(srv->router, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
        zmq_send(srv->router, data, len, ZMQ_DONTWAIT) < 0) {
        int e = errno;
        KVS_WARN("server: reply dropped mid-message (%s)", zmq_strerror(e));
        return e;
    }
    return 0;
}

static bool fc_send(const void *ident, size_t ident_len, const void *data, size_t len, void *user)
{
    return io_reply(user, ident, ident_len, data, len) == 0;
}

static void io_error(kvs_server *srv, const zmq_msg_t *ident, uint64_t id, int status,
                     const char *msg)
{
    kvs_wire_encode_error(&srv->out, id, status, msg, -1);
    io_reply(srv, zmq_msg_data((zmq_msg_t *)ident), zmq_msg_size((zmq_msg_t *)ident),
             srv->out.sb.data, srv->out.sb.size);
}

static void io_send_out(kvs_server *srv, zmq_msg_t *ident)
{
    io_reply(srv, zmq_msg_data(ident), zmq_msg_size(ident), srv->out.sb.data, srv->out.sb.size);
}

static void io_hello(kvs_server *srv, zmq_msg_t *ident, const struct kvs_wire_request *rq)
{
    uint32_t best = 0;
    for (int i = 0; i < rq->n_versions; i++) {
        if (rq->versions[i] <= KVS_WIRE_VERSION && rq->versions[i] > best) {
            best = rq->versions[i];
        }
    }
    if (best == 0) {
        io_error(srv, ident, rq->id, KVS_UNSUPPORTED, "no common protocol version (worker: 1)");
        return;
    }
    msgpack_packer *pk = &srv->out.pk;
    kvs_wire_buf_clear(&srv->out);
    msgpack_pack_map(pk, 6);
    pack_key(pk, "id"), msgpack_pack_uint64(pk, rq->id);
    pack_key(pk, "version"), msgpack_pack_uint32(pk, best);
    pack_key(pk, "minor"), msgpack_pack_uint32(pk, KVS_WIRE_MINOR);
    pack_key(pk, "server"), kvs_wire_pack_cstr(pk, "kvs-worker");
    pack_key(pk, "server_version"), kvs_wire_pack_cstr(pk, SERVER_VERSION);
    pack_key(pk, "limits"), msgpack_pack_map(pk, 7);
    pack_key(pk, "max_frame"), msgpack_pack_uint32(pk, KVS_WIRE_MAX_FRAME);
    pack_key(pk, "max_depth"), msgpack_pack_uint32(pk, KVS_WIRE_MAX_DEPTH);
    pack_key(pk, "max_objects"), msgpack_pack_uint32(pk, KVS_WIRE_MAX_OBJECTS);
    pack_key(pk, "max_string"), msgpack_pack_uint32(pk, KVS_WIRE_MAX_STRING);
    pack_key(pk, "max_tokens_per_append"), msgpack_pack_uint32(pk, KVS_WIRE_MAX_TOKENS);
    pack_key(pk, "max_stops"), msgpack_pack_uint32(pk, KVS_WIRE_MAX_STOPS);
    pack_key(pk, "max_answer_tokens"), msgpack_pack_uint32(pk, KVS_WIRE_MAX_ANSWER_TOKENS);
    io_send_out(srv, ident);
}

/* Forward a request to the engine: [ident][payload][t_recv]. */
static bool io_forward(kvs_server *srv, zmq_msg_t *ident, zmq_msg_t *payload, double t_recv)
{
    if (zmq_msg_send(ident, srv->pair_io, ZMQ_SNDMORE) < 0 ||
        zmq_msg_send(payload, srv->pair_io, ZMQ_SNDMORE) < 0 ||
        zmq_send(srv->pair_io, &t_recv, sizeof t_recv, 0) < 0) {
        KVS_ERROR("server: io -> engine send failed: %s", zmq_strerror(errno));
        return false;
    }
    srv->in_flight++;
    return true;
}

/* One message from the ROUTER: [identity][""][payload] expected. */
static void io_handle(kvs_server *srv, zmq_msg_t *parts, int n_parts, bool stopping)
{
    double t_recv = kvs_now();
    zmq_msg_t *ident = &parts[0];
    if (n_parts != 3 || zmq_msg_size(&parts[1]) != 0) {
        io_error(srv, ident, 0, KVS_BAD_FORMAT, "expected the frames [\"\", payload]");
        return;
    }
    struct kvs_wire_request rq;
    char err[256];
    int rc =
        kvs_wire_decode(zmq_msg_data(&parts[2]), zmq_msg_size(&parts[2]), &rq, err, sizeof err);
    if (rc < 0) {
        KVS_DEBUG("server: bad request id=%llu: %s", (unsigned long long)rq.id, err);
        io_error(srv, ident, rq.id, rc, err);
    } else if (rq.op == KVS_OP_PING) {
        kvs_wire_buf_clear(&srv->out);
        msgpack_pack_map(&srv->out.pk, 2);
        pack_key(&srv->out.pk, "id"), msgpack_pack_uint64(&srv->out.pk, rq.id);
        pack_key(&srv->out.pk, "pong"), msgpack_pack_true(&srv->out.pk);
        io_send_out(srv, ident);
    } else if (rq.op == KVS_OP_HELLO) {
        io_hello(srv, ident, &rq);
    } else if (kvs_srv_fence_reason(srv) != NULL) {
        io_error(srv, ident, rq.id, KVS_UNAVAILABLE, kvs_srv_fence_reason(srv));
    } else if (stopping) {
        io_error(srv, ident, rq.id, KVS_CANCELLED, "worker shutting down");
    } else if (rq.op == KVS_OP_FLASH_GET &&
               kvs_flashcache_get(srv->fc, rq.session, rq.name, rq.allow_stale, rq.id, &srv->out)) {
        io_send_out(srv, ident); /* the fast path: a cached answer */
        atomic_store(&srv->io_flash_hits, kvs_flashcache_hits(srv->fc));
    } else if (rq.op == KVS_OP_FLASH_WATCH) {
        rc = kvs_flashcache_watch(srv->fc, zmq_msg_data(ident), zmq_msg_size(ident), rq.id,
                                  rq.session, rq.has_after_version, rq.after_version, err,
                                  sizeof err);
        if (rc < 0) {
            io_error(srv, ident, rq.id, rc, err);
        }
    } else if (rq.op == KVS_OP_CANCEL &&
               kvs_flashcache_unwatch(srv->fc, zmq_msg_data(ident), zmq_msg_size(ident), rq.target,
                                      "watch cancelled")) {
        kvs_wire_buf_clear(&srv->out);
        msgpack_pack_map(&srv->out.pk, 2);
        pack_key(&srv->out.pk, "id"), msgpack_pack_uint64(&srv->out.pk, rq.id);
        pack_key(&srv->out.pk, "cancelled"), msgpack_pack_int(&srv->out.pk, 1);
        io_send_out(srv, ident);
    } else if (rq.op != KVS_OP_CANCEL && srv->in_flight >= srv->queue_max) {
        snprintf(err, sizeof err, "engine queue full (%d requests)", srv->queue_max);
        io_error(srv, ident, rq.id, KVS_BUSY, err);
    } else if (!io_forward(srv, ident, &parts[2], t_recv)) {
        io_error(srv, ident, rq.id, KVS_INTERNAL, "could not queue the request");
    }
    atomic_store(&srv->io_in_flight, srv->in_flight);
    atomic_store(&srv->io_watchers, kvs_flashcache_n_watchers(srv->fc));
    atomic_store(&srv->io_watchers_dropped, kvs_flashcache_dropped(srv->fc));
    kvs_wire_request_free(&rq);
}

static void msg_str(zmq_msg_t *m, char *out, size_t cap)
{
    size_t n = zmq_msg_size(m) < cap - 1 ? zmq_msg_size(m) : cap - 1;
    memcpy(out, zmq_msg_data(m), n);
    out[n] = '\0';
}

static uint64_t msg_u64(zmq_msg_t *m)
{
    uint64_t v = 0;
    if (zmq_msg_size(m) == sizeof v) {
        memcpy(&v, zmq_msg_data(m), sizeof v);
    }
    return v;
}

/* Handle the engine's messages. Returns true when the engine has exited. */
static bool io_from_engine(kvs_server *srv)
{
    for (;;) {
        zmq_msg_t p[6];
        int n = kvs_srv_recv_parts(srv->pair_io, p, 6);
        if (n <= 0) {
            return false;
        }
        char kind = zmq_msg_size(&p[0]) == 1 ? *(const char *)zmq_msg_data(&p[0]) : 0;
        char session[KVS_SESSION_ID_MAX + 1], name[KVS_WIRE_NAME_MAX + 1];
        bool exited = false;
        if (kind == MSG_REPLY && n == 4) {
            bool final = *(const uint8_t *)zmq_msg_data(&p[3]) == 1;
            int e = io_reply(srv, zmq_msg_data(&p[1]), zmq_msg_size(&p[1]), zmq_msg_data(&p[2]),
                             zmq_msg_size(&p[2]));
            if (final) {
                srv->in_flight--;
            } else if (e == EHOSTUNREACH || e == EAGAIN) {
                /* a stream to a gone peer (stop all its work), or to one that does not read
                 * (it would see a gap: stop its streams) */
                char why = e == EHOSTUNREACH ? PEER_GONE : PEER_SLOW;
                if (zmq_send(srv->pair_io, zmq_msg_data(&p[1]), zmq_msg_size(&p[1]), ZMQ_SNDMORE) <
                        0 ||
                    zmq_send(srv->pair_io, &why, 1, 0) < 0) {
                    KVS_ERROR("server: io -> engine send failed: %s", zmq_strerror(errno));
                }
            }
        } else if (kind == MSG_VERSION && n == 3) {
            msg_str(&p[1], session, sizeof session);
            kvs_flashcache_version(srv->fc, session, msg_u64(&p[2]));
        } else if (kind == MSG_FLASH && n == 6 && zmq_msg_size(&p[4]) == sizeof(uint32_t)) {
            uint32_t n_keys;
            memcpy(&n_keys, zmq_msg_data(&p[4]), sizeof n_keys);
            msg_str(&p[1], session, sizeof session);
            msg_str(&p[2], name, sizeof name);
            kvs_flashcache_answer(srv->fc, session, name, msg_u64(&p[3]), zmq_msg_data(&p[5]),
                                  zmq_msg_size(&p[5]), n_keys);
            atomic_store(&srv->io_watchers_dropped, kvs_flashcache_dropped(srv->fc));
        } else if (kind == MSG_UNREG && n == 3) {
            msg_str(&p[1], session, sizeof session);
            msg_str(&p[2], name, sizeof name);
            kvs_flashcache_unregister(srv->fc, session, name);
        } else if (kind == MSG_CLOSED && (n == 2 || n == 3)) {
            msg_str(&p[1], session, sizeof session);
            if (n == 3) { /* released to another worker (session.release) */
                kvs_flashcache_release(srv->fc, session);
            } else {
                kvs_flashcache_close(srv->fc, session);
            }
        } else if (kind == MSG_EXIT) {
            exited = true;
        } else {
            KVS_ERROR("server: unexpected engine message ('%c', %d parts)", kind ? kind : '?', n);
        }
        kvs_srv_close_parts(p, n, 6);
        atomic_store(&srv->io_in_flight, srv->in_flight);
        atomic_store(&srv->io_watchers, kvs_flashcache_n_watchers(srv->fc));
        if (exited) {
            return true;
        }
    }
}

int kvs_server_run(kvs_server *srv)
{
    pthread_t th;
    if (pthread_create(&th, NULL, kvs_srv_engine_main, srv) != 0) {
        KVS_ERROR("server: cannot start the engine thread");
        return KVS_INTERNAL;
    }
    bool stop_sent = false, engine_done = false;
    int rc = 0;
    int64_t wd_ms = kvs_sd_watchdog_ms(), wd_last = 0; /* systemd's watchdog, if any */
    kvs_sd_notify("READY=1");
    while (!engine_done) {
        if (wd_ms > 0) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            int64_t now = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
            if (now - wd_last >= wd_ms / 2) {
                kvs_sd_notify("WATCHDOG=1");
                wd_last = now;
            }
        }
        if (srv->stop_requested && !stop_sent) {
            KVS_INFO("server: shutting down (%d requests in flight, %d watches)", srv->in_flight,
                     kvs_flashcache_n_watchers(srv->fc));
            atomic_store(&srv->stopping, 1);
            kvs_sd_notify("STOPPING=1");
            kvs_flashcache_end_all(srv->fc, KVS_CANCELLED, "worker shutting down");
            if (zmq_send(srv->pair_io, "", 0, 0) < 0) {
                KVS_ERROR("server: stop send failed: %s", zmq_strerror(errno));
            }
            stop_sent = true;
        }
        if (!srv->io_fenced && kvs_srv_fence_reason(srv) != NULL) {
            kvs_flashcache_end_all(srv->fc, KVS_UNAVAILABLE, kvs_srv_fence_reason(srv));
            zmq_send(srv->pair_io, "F", 1, 0); /* wake the engine: it cancels its work */
            srv->io_fenced = true;
        }
        zmq_pollitem_t items[2] = {{srv->router, 0, ZMQ_POLLIN, 0},
                                   {srv->pair_io, 0, ZMQ_POLLIN, 0}};
        if (zmq_poll(items, 2, 100) < 0) {
            if (errno == EINTR) {
                continue;
            }
            KVS_ERROR("server: zmq_poll: %s", zmq_strerror(errno));
            rc = KVS_INTERNAL;
            break;
        }
        /* engine messages first: a version published before a reply is known before the
         * next request is read */
        if (items[1].revents & ZMQ_POLLIN) {
            engine_done = io_from_engine(srv);
        }
        if (items[0].revents & ZMQ_POLLIN) {
            for (int i = 0; i < RECV_BATCH; i++) {
                zmq_msg_t parts[3];
                int n = kvs_srv_recv_parts(srv->router, parts, 3);
                if (n <= 0) {
                    break;
                }
                if (n >= 1 && zmq_msg_size(&parts[0]) <= IDENT_MAX) {
                    io_handle(srv, parts, n, stop_sent);
                }
                kvs_srv_close_parts(parts, n, 3);
            }
        }
    }
    if (!engine_done) { /* the loop failed: stop the engine anyway */
        atomic_store(&srv->stopping, 1);
        zmq_send(srv->pair_io, "", 0, 0);
    }
    pthread_join(th, NULL);
    KVS_INFO("server: stopped");
    return rc;
}

void kvs_server_stop(kvs_server *srv)
{
    srv->stop_requested = 1;
}

void kvs_server_fence(kvs_server *srv, const char *why)
{
    int expected = 0;
    if (!atomic_compare_exchange_strong(&srv->fenced, &expected, 1)) {
        return; /* fenced already: the first reason stands */
    }
    snprintf(srv->fence_why, sizeof srv->fence_why, "%s", why ? why : "stopped serving");
    for (char *p = srv->fence_why; *p; p++) {
        if (*p == '\n') {
            *p = ' ';
        }
    }
    atomic_store(&srv->fenced, 2);
    KVS_ERROR("server: %s", srv->fence_why);
}

bool kvs_server_fenced(kvs_server *srv)
{
    return atomic_load(&srv->fenced) != 0;
}

void kvs_server_serve_until(kvs_server *srv, int64_t until_ms)
{
    atomic_store(&srv->serve_until_ms, until_ms);
}

const char *kvs_srv_fence_reason(kvs_server *srv)
{
    int64_t until = atomic_load(&srv->serve_until_ms);
    if (until > 0 && atomic_load(&srv->fenced) == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        int64_t now = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
        if (now > until) {
            kvs_server_fence(srv, "stopped serving: no reply from the coordinator and the "
                                  "lease not renewed for the lease TTL minus the margin: the "
                                  "sessions may be restored elsewhere; restart the worker to "
                                  "serve again");
        }
    }
    return atomic_load(&srv->fenced) == 2 ? srv->fence_why : NULL;
}

void kvs_server_load(kvs_server *srv, struct kvs_server_load *out)
{
    out->cells_total = kvs_pool_capacity_cells(srv->e->pool);
    out->block_size = kvs_pool_block_size(srv->e->pool);
    out->cells_used = atomic_load(&srv->load_cells_used);
    out->cells_reserved = atomic_load(&srv->load_cells_reserved);
    out->cells_free = atomic_load(&srv->load_cells_free);
    out->sessions = atomic_load(&srv->load_sessions);
    out->queue = atomic_load(&srv->io_in_flight);
    out->rows = atomic_load(&srv->load_rows);
}

const char *kvs_server_model_sha256(const kvs_server *srv)
{
    return srv->model_sha256;
}

const char *kvs_server_endpoint(const kvs_server *srv)
{
    return srv->endpoint;
}

int kvs_server_new(const struct kvs_server_opts *o, kvs_server **out, char *err, size_t errlen)
{
    *out = NULL;
    if (o->listen == NULL || o->listen[0] == '\0') {
        snprintf(err, errlen, "no listen endpoint");
        return KVS_INVALID_ARGUMENT;
    }
    int rc = kvs_curve_check_listen(o->listen, o->insecure, o->curve_secret, o->curve_clients,
                                    err, errlen);
    if (rc < 0) {
        return rc;
    }
    kvs_server *srv = calloc(1, sizeof *srv);
    if (srv == NULL) {
        snprintf(err, errlen, "out of memory");
        return KVS_NO_MEMORY;
    }
    srv->queue_max = o->queue_max > 0 ? o->queue_max : KVS_SERVER_QUEUE_MAX;
    srv->live.next = srv->live.prev = &srv->live;
    atomic_init(&srv->stopping, 0);
    atomic_init(&srv->io_in_flight, 0);
    atomic_init(&srv->io_watchers, 0);
    atomic_init(&srv->io_flash_hits, 0);
    atomic_init(&srv->io_watchers_dropped, 0);
    atomic_init(&srv->fenced, 0);
    atomic_init(&srv->serve_until_ms, 0);
    atomic_init(&srv->load_cells_used, 0);
    atomic_init(&srv->load_cells_reserved, 0);
    atomic_init(&srv->load_cells_free, 0);
    atomic_init(&srv->load_sessions, 0);
    atomic_init(&srv->load_rows, 0);
    kvs_wire_buf_init(&srv->out);
    kvs_wire_buf_init(&srv->eout);
    rc = KVS_NO_MEMORY;
    srv->data_dir = o->data_dir ? strdup(o->data_dir) : NULL;
    srv->data_root = o->data_root ? strdup(o->data_root) : NULL;
    if ((o->data_dir && !srv->data_dir) || (o->data_root && !srv->data_root)) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    srv->fc = kvs_flashcache_new(fc_send, srv);
    if (srv->fc == NULL) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    rc = kvs_engine_open(&o->engine, &srv->e, err, errlen);
    if (rc < 0) {
        goto fail;
    }
    rc = kvs_model_sha256(srv->e->model, srv->model_sha256);
    if (rc < 0) {
        snprintf(err, errlen, "cannot hash the model file");
        goto fail;
    }
    struct kvs_sessions_opts so = {o->data_dir, o->fsync};
    rc = kvs_sessions_new(srv->e, &so, &srv->S);
    if (rc < 0) {
        snprintf(err, errlen, "cannot open the data dir %s", o->data_dir ? o->data_dir : "-");
        goto fail;
    }
    srv->sched_opts = o->sched;
    rc = kvs_sched_new(srv->S, &srv->sched_opts, &srv->sc);
    if (rc < 0) {
        snprintf(err, errlen, "cannot create the scheduler");
        goto fail;
    }
    if (srv->sched_opts.max_batch_tokens <= 0 ||
        srv->sched_opts.max_batch_tokens > kvs_forward_max_rows(srv->e->fw)) {
        srv->sched_opts.max_batch_tokens = kvs_forward_max_rows(srv->e->fw); /* as sched does */
    }
    if (o->data_dir != NULL) {
        char rerr[2048] = "";
        int n = kvs_sessions_restore(srv->S, rerr, sizeof rerr);
        if (n < 0) {
            snprintf(err, errlen, "cannot list the data dir %s", o->data_dir);
            rc = n;
            goto fail;
        }
        if (rerr[0] != '\0') {
            KVS_WARN("server: sessions not restored: %s", rerr);
        }
        KVS_INFO("server: restored %d sessions from %s", n, o->data_dir);
    }

    srv->zctx = zmq_ctx_new();
    srv->router = srv->zctx ? zmq_socket(srv->zctx, ZMQ_ROUTER) : NULL;
    srv->pair_io = srv->zctx ? zmq_socket(srv->zctx, ZMQ_PAIR) : NULL;
    srv->pair_eng = srv->zctx ? zmq_socket(srv->zctx, ZMQ_PAIR) : NULL;
    if (srv->router == NULL || srv->pair_io == NULL || srv->pair_eng == NULL) {
        snprintf(err, errlen, "zmq: %s", zmq_strerror(errno));
        rc = KVS_INTERNAL;
        goto fail;
    }
    kvs_router_options(srv->router);
    if (o->curve_secret != NULL) { /* the allow-list answers before the first handshake */
        rc = kvs_curve_server_setup(srv->router, o->curve_secret, err, errlen);
        if (rc < 0) {
            goto fail;
        }
        if (o->curve_clients != NULL) {
            srv->zap = kvs_curve_zap_start(srv->zctx, o->curve_clients, err, errlen);
            if (srv->zap == NULL) {
                rc = KVS_INVALID_ARGUMENT;
                goto fail;
            }
        }
    }
    if (zmq_bind(srv->router, o->listen) != 0) {
        snprintf(err, errlen, "cannot bind %s: %s", o->listen, zmq_strerror(errno));
        rc = KVS_IO;
        goto fail;
    }
    size_t len = sizeof srv->endpoint;
    zmq_getsockopt(srv->router, ZMQ_LAST_ENDPOINT, srv->endpoint, &len);
    char pair_ep[64];
    snprintf(pair_ep, sizeof pair_ep, PAIR_ENDPOINT_FMT, (void *)srv);
    setopt_int(srv->pair_io, ZMQ_SNDHWM, 0);
    setopt_int(srv->pair_io, ZMQ_RCVHWM, 0);
    setopt_int(srv->pair_eng, ZMQ_SNDHWM, 0);
    setopt_int(srv->pair_eng, ZMQ_RCVHWM, 0);
    if (zmq_bind(srv->pair_io, pair_ep) != 0 || zmq_connect(srv->pair_eng, pair_ep) != 0) {
        snprintf(err, errlen, "inproc pair: %s", zmq_strerror(errno));
        rc = KVS_INTERNAL;
        goto fail;
    }
    *out = srv;
    return 0;
fail:
    kvs_server_destroy(&srv);
    return rc < 0 ? rc : KVS_INTERNAL;
}

void kvs_server_destroy(kvs_server **psrv)
{
    if (psrv == NULL || *psrv == NULL) {
        return;
    }
    kvs_server *srv = *psrv;
    int zero = 0;
    if (srv->router) {
        zmq_close(srv->router);
    }
    if (srv->pair_io) {
        zmq_setsockopt(srv->pair_io, ZMQ_LINGER, &zero, sizeof zero);
        zmq_close(srv->pair_io);
    }
    if (srv->pair_eng) {
        zmq_setsockopt(srv->pair_eng, ZMQ_LINGER, &zero, sizeof zero);
        zmq_close(srv->pair_eng);
    }
    kvs_curve_zap_stop(&srv->zap); /* closes its socket: before zmq_ctx_term */
    if (srv->zctx) {
        zmq_ctx_term(srv->zctx);
    }
    kvs_srv_engine_free(srv);
    kvs_sched_destroy(&srv->sc);
    kvs_sessions_destroy(&srv->S);
    kvs_engine_destroy(&srv->e);
    kvs_flashcache_destroy(&srv->fc);
    kvs_wire_buf_destroy(&srv->out);
    kvs_wire_buf_destroy(&srv->eout);
    free(srv->data_dir);
    free(srv->data_root);
    free(srv);
    *psrv = NULL;
}
