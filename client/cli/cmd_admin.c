/* kvstream admin workers|sessions|describe|cordon|uncordon|drain|top: the cluster as the
 * coordinator sees it (docs/PROTOCOL.md §9). Talks to the coordinator with a plain DEALER
 * socket and the wire codec (common/wire.h): one request at a time, matched by id; a standby
 * coordinator's NOT_LEADER is followed to the leader it names. */
#include "client/cli/cmd.h"
#include "client/cli/remote.h"

#include "common/status.h"
#include "common/wire.h"

#include <errno.h>
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

enum { OPT_ONCE = KVS_CLI_OPT_FIRST_LOCAL, OPT_INTERVAL };

#define ADMIN_TIMEOUT_MS 5000 /* default --timeout of admin requests */
#define MAX_REDIRECTS 3       /* NOT_LEADER hops followed */

static void usage(FILE *f)
{
    fprintf(
        f, "usage: kvstream admin workers\n"
           "       kvstream admin sessions\n"
           "       kvstream admin describe SESSION|WORKER\n"
           "       kvstream admin cordon|uncordon|drain WORKER\n"
           "       kvstream admin top [--once] [--interval MS]\n"
           "\n"
           "Ask the cluster's coordinator (kvs-coordinator) about its workers and sessions.\n"
           "cordon: the worker keeps its sessions and gets no new ones; uncordon undoes it;\n"
           "drain: move its sessions to other workers (by restore from the shared data dir;\n"
           "it exits 1 when a move failed, the session then staying where it was). top: a\n"
           "refreshing view of cells, sessions and tokens/s per worker.\n"
           "\n"
           "  -e, --endpoint EP       the coordinator (default: $KVSTREAM_ENDPOINT, else\n"
           "                          " KVS_CLIENT_DEFAULT_ENDPOINT ")\n"
           "  -o, --output FMT        table (default) or json (one JSON object per line)\n"
           "      --timeout MS        wait at most MS for each answer (default 5000; drain\n"
           "                          waits for every move: default 600000)\n"
           "      --once              top: print one view and exit\n"
           "      --interval MS       top: refresh every MS (default 1000)\n"
           "  -h, --help              this help\n"
           "\n"
           "-o json prints the coordinator's reply: workers {workers: [{worker, endpoint,\n"
           "device, model, state, cells_total, cells_placed, cells_used, cells_free, sessions,\n"
           "queue, load, heartbeat_age_ms, prefixes}]}; sessions {sessions: [{session, worker,\n"
           "cells}], truncated}; describe {worker: {...}, sessions: [...]} or {session: {...},\n"
           "worker: {...}}; cordon/uncordon {worker, state}; drain {worker, state, moved, failed,\n"
           "moves: [{session, from, to, ok, error}]}; top: one workers object per view.\n"
           "Exit codes: see 'kvstream --help' (4: no such worker or session).\n");
}

/* ---- a small coordinator client ---- */

struct admin {
    struct kvs_cli_remote r;
    char endpoint[256]; /* where the socket is connected (the leader, after a redirect) */
    void *zctx, *sock;
    uint64_t next_id;
    kvs_wire_buf out;
};

static int admin_connect(struct admin *a, const char *ep)
{
    if (a->sock != NULL) {
        zmq_close(a->sock);
    }
    a->sock = zmq_socket(a->zctx, ZMQ_DEALER);
    if (a->sock == NULL) {
        kvs_cli_error(a->r.cmd, "zmq: %s", zmq_strerror(errno));
        return KVS_EXIT_FAILED;
    }
    int zero = 0;
    int64_t maxmsg = KVS_WIRE_MAX_FRAME + 64;
    zmq_setsockopt(a->sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(a->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    if (zmq_connect(a->sock, ep) != 0) {
        kvs_cli_error(a->r.cmd, "bad endpoint '%s': %s", ep, zmq_strerror(errno));
        return KVS_EXIT_USAGE;
    }
    snprintf(a->endpoint, sizeof a->endpoint, "%s", ep);
    return KVS_EXIT_OK;
}

/* msgpack -> JSON (the reply's shape, for -o json and the tables). NULL for what JSON lacks. */
static json_t *to_json(const msgpack_object *o)
{
    switch (o->type) {
    case MSGPACK_OBJECT_NIL:
        return json_null();
    case MSGPACK_OBJECT_BOOLEAN:
        return json_boolean(o->via.boolean);
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        return json_integer(o->via.u64 > INT64_MAX ? INT64_MAX : (json_int_t)o->via.u64);
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
        return json_integer(o->via.i64);
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
        return json_real(o->via.f64);
    case MSGPACK_OBJECT_STR:
        return json_stringn(o->via.str.ptr, o->via.str.size);
    case MSGPACK_OBJECT_ARRAY: {
        json_t *v = json_array();
        for (uint32_t i = 0; i < o->via.array.size; i++) {
            json_array_append_new(v, to_json(&o->via.array.ptr[i]));
        }
        return v;
    }
    case MSGPACK_OBJECT_MAP: {
        json_t *v = json_object();
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            const msgpack_object *k = &o->via.map.ptr[i].key;
            if (k->type == MSGPACK_OBJECT_STR) {
                char key[80];
                size_t n = k->via.str.size < sizeof key - 1 ? k->via.str.size : sizeof key - 1;
                memcpy(key, k->via.str.ptr, n);
                key[n] = '\0';
                json_object_set_new(v, key, to_json(&o->via.map.ptr[i].val));
            }
        }
        return v;
    }
    default:
        return json_null();
    }
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Send {id, op[, key: value]} and wait for its reply. KVS_OK and *reply (json_decref it), or
 * the failed status with the message in err (and the error's code in code). */
static int call(struct admin *a, const char *op, const char *key, const char *value, json_t **reply,
                char *code, char *err, size_t errlen)
{
    *reply = NULL;
    code[0] = '\0';
    for (int hop = 0; hop <= MAX_REDIRECTS; hop++) {
        uint64_t id = ++a->next_id;
        kvs_wire_buf_clear(&a->out);
        msgpack_packer *pk = &a->out.pk;
        msgpack_pack_map(pk, key ? 3 : 2);
        kvs_wire_pack_cstr(pk, "id"), msgpack_pack_uint64(pk, id);
        kvs_wire_pack_cstr(pk, "op"), kvs_wire_pack_cstr(pk, op);
        if (key) {
            kvs_wire_pack_cstr(pk, key), kvs_wire_pack_cstr(pk, value);
        }
        if (zmq_send(a->sock, "", 0, ZMQ_SNDMORE) < 0 ||
            zmq_send(a->sock, a->out.sb.data, a->out.sb.size, 0) < 0) {
            snprintf(err, errlen, "cannot send to %s: %s", a->endpoint, zmq_strerror(errno));
            return KVS_INTERNAL;
        }
        int64_t deadline = now_ms() + a->r.timeout_ms;
        json_t *j = NULL;
        while (j == NULL) {
            int64_t left = deadline - now_ms();
            zmq_pollitem_t it = {a->sock, 0, ZMQ_POLLIN, 0};
            int n = left > 0 ? zmq_poll(&it, 1, (long)left) : 0;
            if (n < 0 && errno == EINTR) {
                continue;
            }
            if (n <= 0) {
                snprintf(err, errlen,
                         "no answer from the coordinator at %s in %d ms (is kvs-coordinator "
                         "running? set --endpoint)",
                         a->endpoint, a->r.timeout_ms);
                return KVS_TIMEOUT;
            }
            zmq_msg_t parts[2];
            int np = 0;
            bool more = true;
            while (more) {
                zmq_msg_t m;
                zmq_msg_init(&m);
                if (zmq_msg_recv(&m, a->sock, 0) < 0) {
                    zmq_msg_close(&m);
                    break;
                }
                more = zmq_msg_more(&m);
                if (np < 2) {
                    parts[np] = m;
                } else {
                    zmq_msg_close(&m);
                }
                np++;
            }
            if (np == 2 && zmq_msg_size(&parts[0]) == 0 &&
                kvs_wire_prevalidate(zmq_msg_data(&parts[1]), zmq_msg_size(&parts[1]), NULL, 0) ==
                    0) {
                msgpack_unpacked u;
                msgpack_unpacked_init(&u);
                if (msgpack_unpack_next(&u, zmq_msg_data(&parts[1]), zmq_msg_size(&parts[1]),
                                        NULL) == MSGPACK_UNPACK_SUCCESS) {
                    json_t *r = to_json(&u.data);
                    json_t *rid = json_object_get(r, "id");
                    if (json_is_integer(rid) && (uint64_t)json_integer_value(rid) == id) {
                        j = r;
                    } else {
                        json_decref(r); /* a late reply to an earlier request */
                    }
                }
                msgpack_unpacked_destroy(&u);
            }
            for (int i = 0; i < np && i < 2; i++) {
                zmq_msg_close(&parts[i]);
            }
        }
        json_t *e = json_object_get(j, "error");
        if (e == NULL) {
            json_object_del(j, "id");
            *reply = j;
            return KVS_OK;
        }
        const char *c = json_string_value(json_object_get(e, "code"));
        const char *msg = json_string_value(json_object_get(e, "message"));
        const char *leader = json_string_value(json_object_get(e, "leader"));
        json_t *st = json_object_get(e, "status");
        int status = json_is_integer(st) ? (int)json_integer_value(st) : KVS_INTERNAL;
        snprintf(code, 32, "%s", c ? c : "?");
        snprintf(err, errlen, "%s (%s)", msg ? msg : "refused", c ? c : "?");
        if (status == KVS_NOT_LEADER && leader != NULL && leader[0] != '\0' &&
            strcmp(leader, a->endpoint) != 0 && hop < MAX_REDIRECTS) {
            char to[256];
            snprintf(to, sizeof to, "%s", leader);
            json_decref(j); /* leader pointed into it */
            if (admin_connect(a, to) != KVS_EXIT_OK) {
                return KVS_INTERNAL;
            }
            continue; /* ask the leader */
        }
        json_decref(j);
        return status < 0 ? status : KVS_INTERNAL;
    }
    return KVS_NOT_LEADER;
}

/* call, printing the failure; an exit code. */
static int call_or_fail(struct admin *a, const char *op, const char *key, const char *value,
                        json_t **reply)
{
    char code[32], err[1024];
    int rc = call(a, op, key, value, reply, code, err, sizeof err);
    if (rc == KVS_OK) {
        return KVS_EXIT_OK;
    }
    if (rc == KVS_UNSUPPORTED && strcmp(op, "admin.drain") == 0) {
        kvs_cli_error(a->r.cmd,
                      "the coordinator at %s has no drain operation yet (UNSUPPORTED); "
                      "'kvstream admin cordon %s' stops new placements on it",
                      a->endpoint, value ? value : "WORKER");
    } else {
        kvs_cli_error(a->r.cmd, "%s", err);
    }
    return kvs_cli_exit_code(rc);
}

/* ---- output ---- */

static const char *jstr(json_t *o, const char *k)
{
    const char *s = json_string_value(json_object_get(o, k));
    return s ? s : "-";
}

static long long jint(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    return json_is_integer(v) ? (long long)json_integer_value(v)
           : json_is_real(v)  ? (long long)json_real_value(v)
                              : 0;
}

static void print_workers_table(json_t *workers)
{
    printf("%-20s %-10s %-26s %-8s %8s %8s %8s %8s %8s %6s %9s %8s\n", "WORKER", "STATE",
           "ENDPOINT", "DEVICE", "CELLS", "PLACED", "USED", "FREE", "SESSIONS", "QUEUE", "TOK/S",
           "HB_MS");
    size_t i;
    json_t *w;
    json_array_foreach(workers, i, w)
    {
        json_t *load = json_object_get(w, "load");
        printf("%-20s %-10s %-26s %-8s %8lld %8lld %8lld %8lld %8lld %6lld %9.1f %8lld\n",
               jstr(w, "worker"), jstr(w, "state"), jstr(w, "endpoint"), jstr(w, "device"),
               jint(w, "cells_total"), jint(w, "cells_placed"), jint(w, "cells_used"),
               jint(w, "cells_free"), jint(w, "sessions"), jint(w, "queue"),
               json_is_number(load) ? json_number_value(load) : 0.0, jint(w, "heartbeat_age_ms"));
    }
}

static void print_sessions_table(json_t *sessions)
{
    printf("%-32s %-20s %10s %-12s %s\n", "SESSION", "WORKER", "CELLS", "STATE", "ERROR");
    size_t i;
    json_t *s;
    json_array_foreach(sessions, i, s)
    {
        printf("%-32s %-20s %10lld %-12s %s\n", jstr(s, "session"), jstr(s, "worker"),
               jint(s, "cells"), jstr(s, "state"),
               json_object_get(s, "error") ? jstr(s, "error") : "");
    }
}

static json_t *find_by(json_t *arr, const char *key, const char *value)
{
    size_t i;
    json_t *o;
    json_array_foreach(arr, i, o)
    {
        if (strcmp(jstr(o, key), value) == 0) {
            return o;
        }
    }
    return NULL;
}

static void print_fields(const char *indent, json_t *o)
{
    const char *k;
    json_t *v;
    json_object_foreach(o, k, v)
    {
        char *s = json_is_string(v) ? NULL : json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
        printf("%s%-18s %s\n", indent, k, s ? s : json_string_value(v));
        free(s);
    }
}

/* ---- subcommands ---- */

static int cmd_list(struct admin *a, bool workers)
{
    json_t *rep;
    int rc = call_or_fail(a, workers ? "admin.workers" : "admin.sessions", NULL, NULL, &rep);
    if (rc != KVS_EXIT_OK) {
        return rc;
    }
    if (a->r.json) {
        kvs_cli_print_json(rep);
        return KVS_EXIT_OK;
    }
    if (workers) {
        print_workers_table(json_object_get(rep, "workers"));
    } else {
        print_sessions_table(json_object_get(rep, "sessions"));
        if (json_is_true(json_object_get(rep, "truncated"))) {
            printf("(truncated: the coordinator lists 65,536 sessions at most)\n");
        }
    }
    json_decref(rep);
    return KVS_EXIT_OK;
}

static int cmd_describe(struct admin *a, const char *name)
{
    json_t *wr, *sr;
    int rc = call_or_fail(a, "admin.workers", NULL, NULL, &wr);
    if (rc != KVS_EXIT_OK) {
        return rc;
    }
    rc = call_or_fail(a, "admin.sessions", NULL, NULL, &sr);
    if (rc != KVS_EXIT_OK) {
        json_decref(wr);
        return rc;
    }
    json_t *workers = json_object_get(wr, "workers"), *sessions = json_object_get(sr, "sessions");
    json_t *out = json_object();
    json_t *w = find_by(workers, "worker", name);
    json_t *s = w == NULL ? find_by(sessions, "session", name) : NULL;
    if (w != NULL) {
        json_t *mine = json_array();
        size_t i;
        json_t *x;
        json_array_foreach(sessions, i, x)
        {
            if (strcmp(jstr(x, "worker"), name) == 0) {
                json_array_append(mine, x);
            }
        }
        json_object_set(out, "worker", w);
        json_object_set_new(out, "sessions", mine);
    } else if (s != NULL) {
        json_object_set(out, "session", s);
        json_t *owner = find_by(workers, "worker", jstr(s, "worker"));
        json_object_set(out, "worker", owner ? owner : json_null());
    }
    json_decref(wr);
    json_decref(sr);
    if (w == NULL && s == NULL) {
        json_decref(out);
        kvs_cli_error(a->r.cmd, "no worker or session named '%s' (NOT_FOUND)", name);
        return KVS_EXIT_NOT_FOUND;
    }
    if (a->r.json) {
        kvs_cli_print_json(out);
        return KVS_EXIT_OK;
    }
    if (w != NULL) {
        printf("worker %s\n", name);
        print_fields("  ", json_object_get(out, "worker"));
        printf("sessions (%zu)\n", json_array_size(json_object_get(out, "sessions")));
        size_t i;
        json_t *x;
        json_array_foreach(json_object_get(out, "sessions"), i, x)
        {
            printf("  %-32s %10lld cells\n", jstr(x, "session"), jint(x, "cells"));
        }
    } else {
        printf("session %s\n", name);
        print_fields("  ", json_object_get(out, "session"));
        json_t *owner = json_object_get(out, "worker");
        if (json_is_object(owner)) {
            printf("on worker %s\n", jstr(owner, "worker"));
            print_fields("  ", owner);
        } else {
            printf("on worker %s (not registered with this coordinator)\n",
                   jstr(json_object_get(out, "session"), "worker"));
        }
    }
    json_decref(out);
    return KVS_EXIT_OK;
}

static int cmd_set_state(struct admin *a, const char *op, const char *worker)
{
    json_t *rep;
    int rc = call_or_fail(a, op, "worker", worker, &rep);
    if (rc != KVS_EXIT_OK) {
        return rc;
    }
    if (a->r.json) {
        rc = jint(rep, "failed") > 0 ? KVS_EXIT_FAILED : KVS_EXIT_OK; /* a drain's failures */
        kvs_cli_print_json(rep);
        return rc;
    }
    printf("worker %s: %s\n", jstr(rep, "worker"), jstr(rep, "state"));
    json_t *moves = json_object_get(rep, "moves");
    if (json_is_array(moves)) { /* a drain: what moved where */
        printf("moved %lld, failed %lld\n", jint(rep, "moved"), jint(rep, "failed"));
        size_t i;
        json_t *m;
        json_array_foreach(moves, i, m)
        {
            printf("  %-32s %s -> %s  %s%s\n", jstr(m, "session"), jstr(m, "from"), jstr(m, "to"),
                   json_is_true(json_object_get(m, "ok")) ? "ok" : "FAILED: ",
                   json_is_true(json_object_get(m, "ok")) ? "" : jstr(m, "error"));
        }
    }
    rc = jint(rep, "failed") > 0 ? KVS_EXIT_FAILED : KVS_EXIT_OK;
    json_decref(rep);
    return rc;
}

static int cmd_top(struct admin *a, bool once, long interval_ms)
{
    bool tty = isatty(STDOUT_FILENO) && !a->r.json && !once;
    for (;;) {
        json_t *rep;
        int rc = call_or_fail(a, "admin.workers", NULL, NULL, &rep);
        if (rc != KVS_EXIT_OK) {
            return rc;
        }
        json_t *workers = json_object_get(rep, "workers");
        if (a->r.json) {
            kvs_cli_print_json(rep);
        } else {
            long long total = 0, used = 0, placed = 0, sessions = 0;
            double load = 0;
            size_t i;
            json_t *w;
            json_array_foreach(workers, i, w)
            {
                total += jint(w, "cells_total");
                used += jint(w, "cells_used");
                placed += jint(w, "cells_placed");
                sessions += jint(w, "sessions");
                json_t *l = json_object_get(w, "load");
                load += json_is_number(l) ? json_number_value(l) : 0;
            }
            if (tty) {
                printf("\033[H\033[2J");
            }
            time_t t = time(NULL);
            char when[32];
            strftime(when, sizeof when, "%H:%M:%S", localtime(&t));
            printf("kvstream top  %s  coordinator %s  workers %zu  sessions %lld  cells "
                   "%lld/%lld placed, %lld used  %.1f tok/s\n\n",
                   when, a->endpoint, json_array_size(workers), sessions, placed, total, used,
                   load);
            print_workers_table(workers);
            json_decref(rep);
        }
        fflush(stdout);
        if (once) {
            return KVS_EXIT_OK;
        }
        struct timespec ts = {interval_ms / 1000, (interval_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
}

int kvs_cmd_admin(int argc, char **argv)
{
    struct admin a;
    memset(&a, 0, sizeof a);
    kvs_cli_remote_init(&a.r, "admin");
    a.r.timeout_ms = ADMIN_TIMEOUT_MS;
    static const struct option longopts[] = {
        KVS_CLI_REMOTE_LONGOPTS,
        {"once", no_argument, NULL, OPT_ONCE},
        {"interval", required_argument, NULL, OPT_INTERVAL},
        {NULL, 0, NULL, 0},
    };
    bool once = false, timeout_set = false;
    long interval = 1000;
    optind = 0;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":" KVS_CLI_REMOTE_SHORTOPTS, longopts, NULL)) != -1) {
        if (c == 'o' && strcmp(optarg, "table") == 0) {
            a.r.json = false;
            continue;
        }
        if (c == 'h') {
            usage(stdout);
            return KVS_EXIT_OK;
        }
        int h = kvs_cli_remote_opt(&a.r, c, optarg);
        if (h < 0) {
            return KVS_EXIT_USAGE;
        }
        if (h > 0) {
            timeout_set = timeout_set || c == KVS_CLI_OPT_TIMEOUT;
            continue;
        }
        if (c == OPT_ONCE) {
            once = true;
        } else if (c == OPT_INTERVAL) {
            if (kvs_cli_parse_long(optarg, 100, 3600000, &interval) < 0) {
                kvs_cli_error("admin", "--interval must be 100..3600000 ms, got '%s'", optarg);
                return KVS_EXIT_USAGE;
            }
        } else {
            return kvs_cli_bad_option(&a.r, c, argv);
        }
    }
    int n_pos = argc - optind;
    const char *sub = n_pos > 0 ? argv[optind] : NULL;
    const char *arg = n_pos > 1 ? argv[optind + 1] : NULL;
    static const char *const one_arg[] = {"describe", "cordon", "uncordon", "drain"};
    int want = 1;
    bool known = sub != NULL && (strcmp(sub, "workers") == 0 || strcmp(sub, "sessions") == 0 ||
                                 strcmp(sub, "top") == 0);
    for (size_t i = 0; sub != NULL && i < sizeof one_arg / sizeof one_arg[0]; i++) {
        if (strcmp(sub, one_arg[i]) == 0) {
            known = true;
            want = 2;
        }
    }
    if (!known || n_pos != want) {
        if (sub == NULL) {
            kvs_cli_error("admin", "a subcommand is needed (see 'kvstream admin --help')");
        } else if (!known) {
            kvs_cli_error("admin", "unknown subcommand '%s' (see 'kvstream admin --help')", sub);
        } else {
            kvs_cli_error("admin", "'%s' takes %s", sub,
                          want == 2 ? "one argument (a name)" : "no argument");
        }
        return KVS_EXIT_USAGE;
    }
    if ((once || interval != 1000) && strcmp(sub, "top") != 0) {
        kvs_cli_error("admin", "--once and --interval are options of 'top'");
        return KVS_EXIT_USAGE;
    }
    if (strcmp(sub, "drain") == 0 && !timeout_set) {
        a.r.timeout_ms = 600000; /* the reply comes when every session was moved */
    }
    char cmd[32];
    snprintf(cmd, sizeof cmd, "admin %s", sub);
    a.r.cmd = cmd;
    a.zctx = zmq_ctx_new();
    if (a.zctx == NULL) {
        kvs_cli_error(cmd, "zmq: %s", zmq_strerror(errno));
        return KVS_EXIT_FAILED;
    }
    kvs_wire_buf_init(&a.out);
    int rc = admin_connect(&a, a.r.endpoint);
    if (rc == KVS_EXIT_OK) {
        if (strcmp(sub, "workers") == 0 || strcmp(sub, "sessions") == 0) {
            rc = cmd_list(&a, sub[0] == 'w');
        } else if (strcmp(sub, "describe") == 0) {
            rc = cmd_describe(&a, arg);
        } else if (strcmp(sub, "cordon") == 0) {
            rc = cmd_set_state(&a, "admin.cordon", arg);
        } else if (strcmp(sub, "uncordon") == 0) {
            rc = cmd_set_state(&a, "admin.uncordon", arg);
        } else if (strcmp(sub, "drain") == 0) {
            rc = cmd_set_state(&a, "admin.drain", arg);
        } else {
            rc = cmd_top(&a, once, interval);
        }
    }
    if (a.sock != NULL) {
        zmq_close(a.sock);
    }
    zmq_ctx_term(a.zctx);
    kvs_wire_buf_destroy(&a.out);
    return rc;
}
