/* ZeroMQ CURVE keys, socket setup and the ZAP allow-list handler. See common/curve.h. */
#include "common/curve.h"

#include "common/log.h"
#include "common/status.h"
#include "common/wire.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <zmq.h>

#define ZAP_ENDPOINT "inproc://zeromq.zap.01" /* fixed by ZeroMQ RFC 27 */
#define ZAP_POLL_MS 100                        /* how often the handler looks at `stop` */
#define ZAP_MAX_KEYS 65536                     /* client keys in one allow-list */

static void router_opt(void *s, int opt, int v)
{
    if (zmq_setsockopt(s, opt, &v, sizeof v) != 0) {
        KVS_WARN("zmq_setsockopt(%d) failed: %s", opt, zmq_strerror(errno));
    }
}

void kvs_router_options(void *router)
{
    int64_t maxmsg = KVS_WIRE_MAX_FRAME + 64;
    if (zmq_setsockopt(router, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg) != 0) {
        KVS_WARN("zmq_setsockopt(ZMQ_MAXMSGSIZE) failed: %s", zmq_strerror(errno));
    }
    router_opt(router, ZMQ_ROUTER_MANDATORY, 1);
    router_opt(router, ZMQ_HEARTBEAT_IVL, 250);
    router_opt(router, ZMQ_HEARTBEAT_TIMEOUT, 1000);
    router_opt(router, ZMQ_HEARTBEAT_TTL, 1000);
    router_opt(router, ZMQ_HANDSHAKE_IVL, 2000);
    router_opt(router, ZMQ_SNDHWM, 1000);
    router_opt(router, ZMQ_RCVHWM, 1000);
    router_opt(router, ZMQ_LINGER, 500);
}

bool kvs_endpoint_is_local(const char *ep)
{
    if (strncmp(ep, "ipc://", 6) == 0 || strncmp(ep, "inproc://", 9) == 0) {
        return true;
    }
    if (strncmp(ep, "tcp://", 6) != 0) {
        return false;
    }
    const char *host = ep + 6;
    const char *colon = strrchr(host, ':');
    if (colon == NULL) {
        return false;
    }
    size_t n = (size_t)(colon - host);
    if (strchr(host, ';') != NULL) { /* "src;dst" forms: refuse, keep the rule simple */
        return false;
    }
    return (n >= 4 && strncmp(host, "127.", 4) == 0) ||
           (n == 9 && strncmp(host, "localhost", 9) == 0) ||
           (n == 5 && strncmp(host, "[::1]", 5) == 0) || (n == 2 && strncmp(host, "lo", 2) == 0);
}

int kvs_curve_check_listen(const char *listen, bool insecure, const char *secret,
                           const char *clients, char *err, size_t errlen)
{
    if (!insecure && secret == NULL && !kvs_endpoint_is_local(listen)) {
        kvs_errf(err, errlen,
                 "refusing to listen on %s: not a loopback address and no CURVE key "
                 "(give --curve-secret, or --insecure to accept the risk)",
                 listen);
        return KVS_INVALID_ARGUMENT;
    }
    if (clients != NULL && secret == NULL) {
        kvs_errf(err, errlen, "a client key list needs a CURVE secret key");
        return KVS_INVALID_ARGUMENT;
    }
    return 0;
}

bool kvs_curve_available(void)
{
    return zmq_has("curve") != 0;
}

static bool z85_key_valid(const char *z85)
{
    uint8_t bin[32];
    return strlen(z85) == KVS_CURVE_KEY_Z85 && zmq_z85_decode(bin, z85) != NULL;
}

/* The first non-blank word of s into out (at most cap-1 bytes); its length, or -1 when it is
 * longer. */
static int first_word(const char *s, char *out, size_t cap)
{
    while (*s == ' ' || *s == '\t' || *s == '\r' || *s == '\n') {
        s++;
    }
    size_t n = strcspn(s, " \t\r\n");
    if (n >= cap) {
        return -1;
    }
    memcpy(out, s, n);
    out[n] = '\0';
    return (int)n;
}

int kvs_curve_key_load(const char *arg, char out[KVS_CURVE_KEY_Z85 + 1], char *err,
                       size_t errlen)
{
    out[0] = '\0';
    if (!kvs_curve_available()) {
        kvs_errf(err, errlen, "this libzmq was built without CURVE (zmq_has(\"curve\") is 0)");
        return KVS_UNSUPPORTED;
    }
    struct stat st;
    if (stat(arg, &st) != 0) { /* not a file: the key itself */
        if (!z85_key_valid(arg)) {
            /* not echoed: it may be a mistyped secret key */
            kvs_errf(err, errlen, "neither a file nor a 40-character Z85 key (%zu characters)",
                     strlen(arg));
            return KVS_INVALID_ARGUMENT;
        }
        memcpy(out, arg, KVS_CURVE_KEY_Z85 + 1);
        return 0;
    }
    FILE *f = fopen(arg, "r");
    char buf[256];
    size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
    if (f == NULL) {
        kvs_errf(err, errlen, "cannot read key file %s: %s", arg, strerror(errno));
        return KVS_INVALID_ARGUMENT;
    }
    fclose(f);
    buf[n] = '\0';
    if (first_word(buf, out, KVS_CURVE_KEY_Z85 + 1) != KVS_CURVE_KEY_Z85 || !z85_key_valid(out)) {
        out[0] = '\0';
        kvs_errf(err, errlen, "key file %s does not hold a 40-character Z85 key", arg);
        return KVS_INVALID_ARGUMENT;
    }
    return 0;
}

static int set_key(void *sock, int opt, const char *z85, const char *what, char *err,
                   size_t errlen)
{
    if (z85 == NULL || !z85_key_valid(z85)) {
        kvs_errf(err, errlen, "the %s is not a 40-character Z85 key", what);
        return KVS_INVALID_ARGUMENT;
    }
    if (zmq_setsockopt(sock, opt, z85, KVS_CURVE_KEY_Z85) != 0) {
        kvs_errf(err, errlen, "cannot set the %s: %s", what, zmq_strerror(errno));
        return errno == EINVAL ? KVS_UNSUPPORTED : KVS_INVALID_ARGUMENT;
    }
    return 0;
}

int kvs_curve_server_setup(void *sock, const char *secret_z85, char *err, size_t errlen)
{
    int one = 1;
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVER, &one, sizeof one) != 0) {
        kvs_errf(err, errlen, "cannot make a CURVE server: %s", zmq_strerror(errno));
        return KVS_UNSUPPORTED;
    }
    return set_key(sock, ZMQ_CURVE_SECRETKEY, secret_z85, "server secret key", err, errlen);
}

int kvs_curve_client_setup(void *sock, const char *server_z85, const char *public_z85,
                           const char *secret_z85, char *err, size_t errlen)
{
    KVS_TRY(set_key(sock, ZMQ_CURVE_SERVERKEY, server_z85, "server public key", err, errlen));
    KVS_TRY(set_key(sock, ZMQ_CURVE_PUBLICKEY, public_z85, "client public key", err, errlen));
    return set_key(sock, ZMQ_CURVE_SECRETKEY, secret_z85, "client secret key", err, errlen);
}

/* ---- the ZAP handler (ZeroMQ RFC 27) ---------------------------------------------------- */

struct kvs_curve_zap {
    void *sock;          /* REP bound to ZAP_ENDPOINT; used by the thread only once started */
    pthread_t thread;
    atomic_int stop;     /* set by kvs_curve_zap_stop */
    uint8_t (*keys)[32]; /* allowed client public keys, n_keys of them */
    int32_t n_keys;
};

static bool zap_allowed(const kvs_curve_zap *z, const zmq_msg_t *key)
{
    if (zmq_msg_size((zmq_msg_t *)key) != 32) {
        return false;
    }
    for (int32_t i = 0; i < z->n_keys; i++) {
        if (memcmp(z->keys[i], zmq_msg_data((zmq_msg_t *)key), 32) == 0) {
            return true;
        }
    }
    return false;
}

/* Answer one request: frames version, request id, domain, address, identity, mechanism,
 * credentials... Anything malformed is answered 400 when it can be answered at all. */
static void zap_answer(kvs_curve_zap *z)
{
    enum { MAX_PARTS = 8 };
    zmq_msg_t parts[MAX_PARTS], extra;
    int n = 0, kept = 0, more = 1;
    while (more) { /* frames past MAX_PARTS are read into `extra` and dropped */
        zmq_msg_t *m = kept < MAX_PARTS ? &parts[kept] : &extra;
        zmq_msg_init(m);
        if (zmq_msg_recv(m, z->sock, 0) < 0) {
            zmq_msg_close(m);
            for (int i = 0; i < kept; i++) {
                zmq_msg_close(&parts[i]);
            }
            return;
        }
        more = zmq_msg_more(m);
        n++;
        if (m == &extra) {
            zmq_msg_close(m);
        } else {
            kept++;
        }
    }
    bool ok = n >= 7 && zmq_msg_size(&parts[0]) == 3 &&
              memcmp(zmq_msg_data(&parts[0]), "1.0", 3) == 0 &&
              zmq_msg_size(&parts[5]) == 5 && memcmp(zmq_msg_data(&parts[5]), "CURVE", 5) == 0 &&
              zap_allowed(z, &parts[6]);
    const char *code = ok ? "200" : "400";
    const char *text = ok ? "OK" : "client key not allowed";
    zmq_send(z->sock, "1.0", 3, ZMQ_SNDMORE);
    if (n >= 2) {
        zmq_send(z->sock, zmq_msg_data(&parts[1]), zmq_msg_size(&parts[1]), ZMQ_SNDMORE);
    } else {
        zmq_send(z->sock, "", 0, ZMQ_SNDMORE);
    }
    zmq_send(z->sock, code, 3, ZMQ_SNDMORE);
    zmq_send(z->sock, text, strlen(text), ZMQ_SNDMORE);
    zmq_send(z->sock, "", 0, ZMQ_SNDMORE); /* user id */
    zmq_send(z->sock, "", 0, 0);           /* metadata */
    if (!ok) {
        KVS_INFO("curve: refused a client (not in the allow-list)");
    }
    for (int i = 0; i < kept; i++) {
        zmq_msg_close(&parts[i]);
    }
}

static void *zap_main(void *arg)
{
    kvs_curve_zap *z = arg;
    bool failed = false;
    while (!atomic_load(&z->stop)) {
        zmq_pollitem_t item = {z->sock, 0, ZMQ_POLLIN, 0};
        int rc = zmq_poll(&item, 1, ZAP_POLL_MS);
        if (rc < 0 && errno != EINTR) {
            /* Keep the socket bound: with no ZAP handler at all libzmq admits every client,
             * while unanswered requests fail the handshakes (closed, not open). */
            if (!failed) {
                KVS_ERROR("curve: ZAP poll failed: %s (refusing clients)", zmq_strerror(errno));
            }
            failed = true;
            struct timespec ts = {0, ZAP_POLL_MS * 1000000L};
            nanosleep(&ts, NULL);
            continue;
        }
        if (rc > 0) {
            zap_answer(z);
        }
    }
    int zero = 0;
    zmq_setsockopt(z->sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_close(z->sock);
    z->sock = NULL;
    return NULL;
}

static int zap_load_keys(kvs_curve_zap *z, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        kvs_errf(err, errlen, "cannot read the client key list %s: %s", path, strerror(errno));
        return KVS_INVALID_ARGUMENT;
    }
    int rc = 0, line_no = 0;
    int32_t cap = 0;
    char line[512], word[KVS_CURVE_KEY_Z85 + 2];
    while (rc == 0 && fgets(line, sizeof line, f) != NULL) {
        line_no++;
        int n = first_word(line, word, sizeof word);
        if (n == 0 || (n > 0 && word[0] == '#')) {
            continue;
        }
        if (n != KVS_CURVE_KEY_Z85 || !z85_key_valid(word)) {
            kvs_errf(err, errlen, "%s:%d: not a 40-character Z85 public key", path, line_no);
            rc = KVS_INVALID_ARGUMENT;
        } else if (z->n_keys >= ZAP_MAX_KEYS) {
            kvs_errf(err, errlen, "%s: more than %d keys", path, ZAP_MAX_KEYS);
            rc = KVS_INVALID_ARGUMENT;
        } else {
            if (z->n_keys == cap) {
                cap = cap ? 2 * cap : 16;
                void *k = realloc(z->keys, (size_t)cap * sizeof *z->keys);
                if (k == NULL) {
                    kvs_errf(err, errlen, "out of memory");
                    rc = KVS_NO_MEMORY;
                    break;
                }
                z->keys = k;
            }
            zmq_z85_decode(z->keys[z->n_keys++], word);
        }
    }
    fclose(f);
    if (rc == 0 && z->n_keys == 0) {
        kvs_errf(err, errlen, "the client key list %s holds no key", path);
        rc = KVS_INVALID_ARGUMENT;
    }
    return rc;
}

kvs_curve_zap *kvs_curve_zap_start(void *zctx, const char *clients_path, char *err,
                                   size_t errlen)
{
    kvs_curve_zap *z = calloc(1, sizeof *z);
    if (z == NULL) {
        kvs_errf(err, errlen, "out of memory");
        return NULL;
    }
    atomic_init(&z->stop, 0);
    if (zap_load_keys(z, clients_path, err, errlen) < 0) {
        goto fail;
    }
    z->sock = zmq_socket(zctx, ZMQ_REP);
    if (z->sock == NULL || zmq_bind(z->sock, ZAP_ENDPOINT) != 0) {
        kvs_errf(err, errlen, "cannot bind %s: %s", ZAP_ENDPOINT, zmq_strerror(errno));
        goto fail;
    }
    /* the thread owns the socket from here (pthread_create is the memory barrier) */
    if (pthread_create(&z->thread, NULL, zap_main, z) != 0) {
        kvs_errf(err, errlen, "cannot start the ZAP thread");
        goto fail;
    }
    KVS_INFO("curve: %d client keys allowed (%s)", z->n_keys, clients_path);
    return z;
fail:
    if (z->sock != NULL) {
        zmq_close(z->sock);
    }
    free(z->keys);
    free(z);
    return NULL;
}

void kvs_curve_zap_stop(kvs_curve_zap **pz)
{
    if (pz == NULL || *pz == NULL) {
        return;
    }
    kvs_curve_zap *z = *pz;
    atomic_store(&z->stop, 1);
    pthread_join(z->thread, NULL);
    free(z->keys);
    free(z);
    *pz = NULL;
}
