/* libkvstream: flash.watch (PROTOCOL.md section 5), resumed after a lost connection.
 *
 * A watch is a streamed request that never ends by itself, so silence is normal and cannot
 * mean a lost connection. The socket's monitor reports a disconnection (the worker exited,
 * or heartbeats stopped for a second); the watch is then subscribed again on a fresh socket
 * with `after_version` = the highest version received, and the worker replays the latest
 * answer of each flash query newer than that. A watch silent for timeout_ms is renewed the
 * same way (cancel, subscribe again), since a worker drops a watcher it cannot push to
 * without a word. Behind a coordinator the session is located before each subscription
 * that has no route: a watch whose worker went away, stopped serving (UNAVAILABLE) or lost
 * the session (NOT_FOUND) is taken up on the worker the coordinator names next (the one it
 * restored the session on), and ends NOT_FOUND only when the coordinator no longer places
 * the session or names the same worker again. */
#include "client/lib/client_impl.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define WATCH_SLICE_MS 50 /* how often the loop looks at the monitor and the cancel flag */

struct monitor {
    void *pair;                    /* receives the socket's events; NULL when off */
    void *watched;                 /* the socket it monitors */
};

static void monitor_stop(struct monitor *mon)
{
    if (mon->watched != NULL) {
        zmq_socket_monitor(mon->watched, NULL, 0);
        mon->watched = NULL;
    }
    if (mon->pair != NULL) {
        zmq_close(mon->pair);
        mon->pair = NULL;
    }
}

static int monitor_start(kvs_client *c, struct monitor *mon, void *sock)
{
    static atomic_uint counter; /* distinct inproc names (the context is per client anyway) */
    char ep[96];
    snprintf(ep, sizeof ep, "inproc://kvs-client-monitor-%p-%u", (void *)c,
             atomic_fetch_add(&counter, 1));
    if (zmq_socket_monitor(sock, ep, ZMQ_EVENT_DISCONNECTED) != 0) {
        return client_fail(c, KVS_INTERNAL, "zmq_socket_monitor: %s", zmq_strerror(errno));
    }
    mon->watched = sock;
    mon->pair = zmq_socket(c->zctx, ZMQ_PAIR);
    int zero = 0;
    if (mon->pair == NULL || zmq_setsockopt(mon->pair, ZMQ_LINGER, &zero, sizeof zero) != 0 ||
        zmq_connect(mon->pair, ep) != 0) {
        monitor_stop(mon);
        return client_fail(c, KVS_INTERNAL, "monitor socket: %s", zmq_strerror(errno));
    }
    return 0;
}

/* True when the monitored socket lost its connection since the last look. */
static bool monitor_disconnected(struct monitor *mon)
{
    bool lost = false;
    for (;;) {
        zmq_msg_t ev;
        zmq_msg_init(&ev);
        if (zmq_msg_recv(&ev, mon->pair, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&ev);
            return lost;
        }
        if (zmq_msg_size(&ev) >= 2) {
            uint16_t event;
            memcpy(&event, zmq_msg_data(&ev), sizeof event);
            lost = lost || (event & ZMQ_EVENT_DISCONNECTED) != 0;
        }
        bool more = zmq_msg_more(&ev);
        zmq_msg_close(&ev);
        while (more) { /* the endpoint frame */
            zmq_msg_init(&ev);
            more = zmq_msg_recv(&ev, mon->pair, ZMQ_DONTWAIT) >= 0 && zmq_msg_more(&ev);
            zmq_msg_close(&ev);
        }
    }
}

static void sleep_until(const struct timespec *t0, int32_t ms)
{
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    int64_t spent = (int64_t)(t1.tv_sec - t0->tv_sec) * 1000 + (t1.tv_nsec - t0->tv_nsec) / 1000000;
    int64_t left = ms - spent;
    if (left > 0) {
        struct timespec ts = {left / 1000, (long)(left % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
    }
}

/* Outcomes of one subscription. */
enum watch_end { WATCH_DONE, WATCH_LOST, WATCH_REFRESH, WATCH_FAILED };

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Subscribe once and deliver pieces until the caller stops (DONE), the connection or the
 * worker goes away (LOST: resubscribe) or an error ends the watch (FAILED, *rc set). */
static enum watch_end watch_once(kvs_client *c, const char *session, const char *name,
                                 int64_t *resume, kvs_client_watch_fn cb, void *user,
                                 int *rc, bool *subscribed)
{
    *subscribed = false;
    struct client_conn *k;
    struct monitor mon = {0};
    enum watch_end end = WATCH_FAILED;
    *rc = client_conn_for(c, session, &k);
    if (*rc < 0) {
        return WATCH_FAILED;
    }
    *rc = monitor_start(c, &mon, k->sock);
    if (*rc < 0) {
        return WATCH_FAILED;
    }
    client_req_begin(c, "flash.watch");
    client_req_cstr(c, "session", session);
    if (*resume >= 0) {
        client_req_u64(c, "after_version", (uint64_t)*resume);
    }
    uint64_t id;
    const msgpack_object *m;
    *rc = client_send(c, k, &id);
    if (*rc == 0) {
        *rc = client_recv(c, k, id, c->timeout_ms, &m);
    }
    if (*rc == KVS_MOVED && c->moved_owner[0] != '\0') {
        end = WATCH_FAILED; /* the caller follows it */
        goto out;
    }
    if (*rc == KVS_TIMEOUT || (*rc == KVS_CANCELLED && !atomic_load(&c->cancel))) {
        end = WATCH_LOST; /* silent, or shutting down: try again */
        goto out;
    }
    if (*rc == KVS_CANCELLED) { /* kvs_client_cancel while subscribing */
        client_abandon(c);
        end = WATCH_DONE;
        *rc = 0;
        goto out;
    }
    if (*rc < 0) {
        goto out;
    }
    bool watching = false;
    uint64_t version = 0, seq = 1;
    if (!mp_bool(kvs_wire_map_get(m, "watching"), &watching) || !watching ||
        !mp_u64(kvs_wire_map_get(m, "seq"), &seq) || seq != 0 ||
        !mp_u64(kvs_wire_map_get(m, "version"), &version)) {
        *rc = client_fail(c, KVS_BAD_FORMAT, "flash.watch: the first piece is not {seq: 0, "
                                             "watching: true, version}");
        goto out;
    }
    if (*resume < 0) {
        *resume = (int64_t)version; /* a resubscription replays what came after this */
    }
    *subscribed = true;
    int64_t last_heard = mono_ms();
    for (uint64_t expect = 1;;) {
        if (atomic_load(&c->cancel)) {
            client_abandon(c);
            *rc = 0;
            end = WATCH_DONE;
            goto out;
        }
        *rc = client_recv(c, k, id, WATCH_SLICE_MS, &m);
        if (*rc == KVS_TIMEOUT && !c->from_worker) {
            if (monitor_disconnected(&mon) || c->lost) {
                end = WATCH_LOST;
                goto out;
            }
            if (mono_ms() - last_heard >= c->timeout_ms) {
                /* Silent for a while: the worker may have dropped this watch (a push it
                 * could not queue, PROTOCOL.md section 7) without a word. Cancel it and
                 * subscribe again from the last version: nothing is lost or repeated. */
                client_req_begin(c, "cancel");
                client_req_u64(c, "target", id);
                uint64_t cancel_id;
                *rc = client_send(c, k, &cancel_id);
                end = *rc == 0 ? WATCH_REFRESH : WATCH_LOST;
                goto out;
            }
            continue;
        }
        last_heard = mono_ms();
        if (*rc == KVS_CANCELLED && atomic_load(&c->cancel)) {
            continue; /* handled at the top of the loop */
        }
        if (*rc == KVS_CANCELLED) {
            end = WATCH_LOST; /* the worker is shutting down: resume on its successor */
            goto out;
        }
        if (*rc < 0) {
            goto out;
        }
        if (!mp_u64(kvs_wire_map_get(m, "seq"), &seq) || seq != expect) {
            *rc = client_fail(c, KVS_BAD_FORMAT, "flash.watch: seq %llu, expected %llu",
                              (unsigned long long)seq, (unsigned long long)expect);
            end = WATCH_LOST; /* a piece was lost: resubscribe from what we have */
            goto out;
        }
        expect++;
        struct kvs_client_answer a = {0};
        *rc = client_read_answer(c, m, true, &a);
        if (*rc < 0) {
            goto out;
        }
        if ((int64_t)a.version > *resume) {
            *resume = (int64_t)a.version;
        }
        bool go_on = true;
        if (name == NULL || strcmp(name, a.name) == 0) {
            go_on = cb(&a, user);
        }
        kvs_client_answer_free(&a);
        if (!go_on) {
            client_abandon(c);
            *rc = 0;
            end = WATCH_DONE;
            goto out;
        }
    }
out:
    monitor_stop(&mon);
    if (end == WATCH_LOST) {
        client_conn_reset(c, k);
    }
    return end;
}

int kvs_client_flash_watch(kvs_client *c, const char *session, const char *name,
                           int64_t after_version, kvs_client_watch_fn cb, void *user)
{
    c->err[0] = '\0';
    atomic_store(&c->cancel, 0);
    if (!client_ident_ok(session, KVS_WIRE_SESSION_MAX, true)) {
        return client_fail(c, KVS_INVALID_ARGUMENT,
                           "session id must be 1..128 bytes of [A-Za-z0-9._-], not starting "
                           "with '.'");
    }
    if (name != NULL && !client_ident_ok(name, KVS_WIRE_NAME_MAX, false)) {
        return client_fail(c, KVS_INVALID_ARGUMENT,
                           "flash query name must be 1..64 bytes of [A-Za-z0-9._-]");
    }
    if (cb == NULL || after_version < KVS_CLIENT_WATCH_NEW) {
        return client_fail(c, KVS_INVALID_ARGUMENT,
                           "flash watch: a callback and after_version >= -1 are needed");
    }
    int64_t resume = after_version;
    int32_t failures = 0, redirects = 0, relocates = 0;
    /* behind a coordinator: until when a session whose worker went away is sought (set at
     * the first failure after a subscription; the coordinator needs a lease TTL to declare
     * a worker down and restore its sessions elsewhere) */
    int64_t seek_end = 0;
    char missing_at[CLIENT_ENDPOINT_MAX] = ""; /* a worker that answered NOT_FOUND */
    char missing_err[sizeof c->err] = "";
    for (;;) {
        struct timespec t0;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        int rc = 0;
        bool subscribed = false;
        if (c->coord && client_route_find(c, session) == NULL) {
            rc = client_locate(c, session);
            struct client_route *r = rc == 0 ? client_route_find(c, session) : NULL;
            if (r != NULL && missing_at[0] != '\0' && strcmp(r->endpoint, missing_at) == 0) {
                snprintf(c->err, sizeof c->err, "%s", missing_err);
                return KVS_NOT_FOUND; /* the worker the directory names does not hold it */
            }
            if (rc == KVS_UNAVAILABLE) {
                /* its worker is down and the session waits to be restored elsewhere */
                if (seek_end == 0) {
                    seek_end = mono_ms() + (int64_t)(c->retries + 1) * c->timeout_ms;
                }
                if (mono_ms() >= seek_end) {
                    return rc;
                }
                sleep_until(&t0, c->timeout_ms < 500 ? c->timeout_ms : 500);
                continue;
            }
            if (rc < 0) {
                return rc;
            }
        }
        enum watch_end end = watch_once(c, session, name, &resume, cb, user, &rc, &subscribed);
        if (end == WATCH_REFRESH) {
            failures = 0;
            continue;
        }
        if (end == WATCH_DONE) {
            atomic_store(&c->cancel, 0);
            c->err[0] = '\0';
            return 0;
        }
        if (end == WATCH_FAILED && rc == KVS_MOVED && c->moved_owner[0] != '\0' &&
            redirects < c->max_redirects) {
            redirects++;
            client_route_set(c, session, c->moved_owner);
            continue;
        }
        if (subscribed) {
            relocates = 0;
            seek_end = 0;
            missing_at[0] = '\0';
        }
        if (end == WATCH_FAILED && c->coord && (rc == KVS_NOT_FOUND || rc == KVS_UNAVAILABLE) &&
            (rc == KVS_UNAVAILABLE ? seek_end == 0 || mono_ms() < seek_end
                                   : relocates < c->max_redirects)) {
            /* The worker lost it, stopped serving or cannot be reached: locate it again. */
            relocates++;
            if (seek_end == 0) {
                seek_end = mono_ms() + (int64_t)(c->retries + 1) * c->timeout_ms;
            }
            struct client_route *r = client_route_find(c, session);
            if (rc == KVS_NOT_FOUND && r != NULL) {
                snprintf(missing_at, sizeof missing_at, "%s", r->endpoint);
                snprintf(missing_err, sizeof missing_err, "%s", c->err);
            }
            client_route_drop(c, session);
            if (rc == KVS_UNAVAILABLE) {
                sleep_until(&t0, c->timeout_ms < 500 ? c->timeout_ms : 500);
            }
            continue;
        }
        if (end == WATCH_FAILED) {
            return rc;
        }
        if (c->coord) {
            client_route_drop(c, session); /* lost: ask where it lives now */
        }
        /* Lost. A subscription that worked starts the count over; each failed attempt takes
         * at least timeout_ms, so a restarting worker has (retries + 1) x timeout_ms. */
        if (subscribed) {
            failures = 0;
            continue;
        }
        if (failures++ >= c->retries) {
            char last[sizeof c->err];
            snprintf(last, sizeof last, "%s", c->err[0] != '\0' ? c->err : "connection lost");
            return client_fail(c, KVS_TIMEOUT,
                               "flash watch: the worker did not take the watch back in %d "
                               "attempts (last: %s)",
                               failures, last);
        }
        sleep_until(&t0, c->timeout_ms);
    }
}
