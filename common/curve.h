/* ZeroMQ CURVE for kvstream's servers and their clients (docs/PROTOCOL.md section 1).
 *
 * Keys are Z85 text as ZeroMQ's tools write them: 40 characters for a 32-byte key. A key
 * file holds one key (surrounding white space is ignored). A server (kvs-worker,
 * kvs-coordinator) sets its secret key on its ROUTER; a client sets the server's public key
 * and its own key pair on its DEALER. Without an allow-list any client that knows the
 * server's public key gets in; with one (kvs_curve_zap_start) only the listed client keys do.
 */
#ifndef KVS_COMMON_CURVE_H
#define KVS_COMMON_CURVE_H

#include <stdbool.h>
#include <stddef.h>

#define KVS_CURVE_KEY_Z85 40 /* characters of a Z85 key, without the NUL */

/* True when endpoint names a loopback or local transport: ipc://, inproc://, or tcp:// to
 * 127.x, [::1], localhost or the lo interface. */
bool kvs_endpoint_is_local(const char *endpoint);

/* The listen rule of kvstream's servers (kvs-worker, kvs-coordinator): a non-loopback listen
 * endpoint needs a CURVE secret key or insecure; a client allow-list needs a secret key.
 * 0, or KVS_INVALID_ARGUMENT with the reason in err. */
int kvs_curve_check_listen(const char *listen, bool insecure, const char *secret,
                           const char *clients, char *err, size_t errlen);

/* The options every kvstream server sets on its ROUTER before binding (docs/PROTOCOL.md §1):
 * ZMQ_MAXMSGSIZE from the frame limit, ROUTER_MANDATORY, heartbeats (250 ms, 1 s timeout
 * and TTL), a 2 s handshake limit, high-water marks of 1,000 and a 500 ms linger. */
void kvs_router_options(void *router);

/* Whether this libzmq was built with CURVE. */
bool kvs_curve_available(void);

/* Read a Z85 key from arg: the key itself (40 characters) or the name of a file that holds
 * it. Returns 0 and the key in out (NUL-terminated), or KVS_INVALID_ARGUMENT (not a key, no
 * such file) or KVS_UNSUPPORTED (libzmq without CURVE), with the reason in err. */
int kvs_curve_key_load(const char *arg, char out[KVS_CURVE_KEY_Z85 + 1], char *err,
                       size_t errlen);

/* Make sock (not yet bound) a CURVE server with the Z85 secret key. Returns 0 or
 * KVS_INVALID_ARGUMENT / KVS_UNSUPPORTED with the reason in err. */
int kvs_curve_server_setup(void *sock, const char *secret_z85, char *err, size_t errlen);

/* Make sock (not yet connected) a CURVE client of the server with the Z85 public key
 * server_z85, with the client key pair (public_z85, secret_z85). Same returns. */
int kvs_curve_client_setup(void *sock, const char *server_z85, const char *public_z85,
                           const char *secret_z85, char *err, size_t errlen);

/* The ZAP handler: a thread answering ZeroMQ's authentication requests of every CURVE
 * socket of zctx: 200 for the client public keys listed in clients_path (one Z85 key per
 * line; blank lines and lines starting with '#' are skipped), 400 for the others. Start it
 * before the server socket binds, stop it before zmq_ctx_term. Returns the handler (stop
 * with kvs_curve_zap_stop) or NULL with the reason in err (unreadable file, a bad key, no
 * key at all, the ZAP endpoint taken). */
typedef struct kvs_curve_zap kvs_curve_zap;
kvs_curve_zap *kvs_curve_zap_start(void *zctx, const char *clients_path, char *err,
                                   size_t errlen);

/* Stop the handler's thread and close its socket; accepts NULL and nulls the pointer. */
void kvs_curve_zap_stop(kvs_curve_zap **z);

#endif
