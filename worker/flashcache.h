/* The I/O thread's flash cache: what the engine thread published about flash answers, and
 * the flash watchers (docs/PROTOCOL.md, flash.get and flash.watch).
 *
 * The engine publishes each session's version (on create, restore and every applied
 * append), each new flash answer (as the encoded entries of its reply map: answer, tokens,
 * version, ...), an unregistered flash query and a closed session. The cache keeps the
 * latest answer per (session, name) and the version per session, so that the I/O thread
 * answers a flash.get of a fresh answer itself, and pushes every new answer to the
 * session's watchers. Everything arrives over the one inproc pair in the order the engine
 * sent it, so the cache never knows a version the engine does not have yet, and a client
 * that got an append's acknowledgement finds the cache at that version or later.
 *
 * Watchers: a push is sent without blocking; one that cannot be delivered (peer gone, or its
 * send queue full: the ROUTER's SNDHWM) drops the watcher at once. Limits:
 * KVS_FLASHCACHE_WATCHERS_MAX per worker, KVS_FLASHCACHE_WATCHERS_PER_PEER per connection.
 *
 * Thread-safety: none; the I/O thread owns it. Replies leave through the send callback.
 */
#ifndef KVS_FLASHCACHE_H
#define KVS_FLASHCACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/wire.h"

#define KVS_FLASHCACHE_WATCHERS_MAX 1024    /* flash watches per worker */
#define KVS_FLASHCACHE_WATCHERS_PER_PEER 64 /* per connection (ROUTER identity) */

typedef struct kvs_flashcache kvs_flashcache;

/* Send data[0..len) to the peer ident; false when it could not be queued (gone or full). */
typedef bool (*kvs_flashcache_send_fn)(const void *ident, size_t ident_len, const void *data,
                                       size_t len, void *user);

/* A cache that replies through send(user). NULL on OOM. Free with kvs_flashcache_destroy. */
kvs_flashcache *kvs_flashcache_new(kvs_flashcache_send_fn send, void *user);
/* Frees everything (watchers get no message: end them first); accepts NULL; nulls *c. */
void kvs_flashcache_destroy(kvs_flashcache **c);

/* The engine's publications. 0 or KVS_NO_MEMORY (the cache then lacks the entry: a later
 * flash.get goes to the engine, which is always correct). */
int kvs_flashcache_version(kvs_flashcache *c, const char *session, uint64_t version);
/* A new answer of name at version: body[0..len) holds n_keys encoded key/value pairs of the
 * reply map (copied). Pushes it to the session's watchers. */
int kvs_flashcache_answer(kvs_flashcache *c, const char *session, const char *name,
                          uint64_t version, const void *body, size_t len, uint32_t n_keys);
void kvs_flashcache_unregister(kvs_flashcache *c, const char *session, const char *name);
/* The session is closed: its watches end with a NOT_FOUND error reply (seq, done). */
void kvs_flashcache_close(kvs_flashcache *c, const char *session);
/* The session was released to another worker (session.release): its watches end with a
 * MOVED error reply (seq, done), as its later requests are answered; locate it again. */
void kvs_flashcache_release(kvs_flashcache *c, const char *session);

/* flash.get of request id: when the cache holds name's answer at the session's current
 * version (or any answer, with allow_stale), encodes the reply into out and returns true;
 * false: the engine must answer. */
bool kvs_flashcache_get(kvs_flashcache *c, const char *session, const char *name, bool allow_stale,
                        uint64_t id, kvs_wire_buf *out);

/* flash.watch: subscribe peer ident's request id to session. Sends the confirmation
 * (seq 0) and, with has_after, the latest answer of each flash query newer than after.
 * 0, KVS_NOT_FOUND (session unknown), KVS_BUSY (limits), KVS_NO_MEMORY; err says why (the
 * caller answers the error). */
int kvs_flashcache_watch(kvs_flashcache *c, const void *ident, size_t ident_len, uint64_t id,
                         const char *session, bool has_after, uint64_t after, char *err,
                         size_t errlen);
/* cancel of a watch: ends watch id of ident with CANCELLED. True when there was one. */
bool kvs_flashcache_unwatch(kvs_flashcache *c, const void *ident, size_t ident_len, uint64_t id,
                            const char *why);
/* End every watch with status (shutdown). */
void kvs_flashcache_end_all(kvs_flashcache *c, int status, const char *why);

int32_t kvs_flashcache_n_watchers(const kvs_flashcache *c);
uint64_t kvs_flashcache_hits(const kvs_flashcache *c);    /* fresh answers served */
uint64_t kvs_flashcache_dropped(const kvs_flashcache *c); /* watchers dropped (gone/slow) */

#endif
