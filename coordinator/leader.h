/* Coordinator leader election and fencing on the cluster store (common/store.h).
 *
 * Election: each contender holds a lease of ttl_s seconds and tries a txn "if the leader key
 * does not exist (create_revision == 0), put it = my id, bound to my lease". The winner
 * keeps its lease alive; when it dies (or stops renewing) the lease expires, the key goes,
 * the standbys see the DELETE on their watch and try again. After an etcd outage the lease
 * comes back with its full TTL, so a leader that lived through the outage stays leader.
 *
 * Fencing: the leader key's create_revision is the fencing token; it is new for every
 * leadership (a revision is never reused). Every coordinator write goes through
 * kvs_leader_txn, a txn that also compares the leader key's create_revision with the token:
 * a coordinator that lost leadership without noticing (paused, partitioned, its lease
 * expired while etcd's lease bugs of 3.4 kept it believing otherwise) has its write
 * refused by the store itself with NOT_LEADER.
 *
 * Stepping down: a leader that has not renewed its lease for ttl minus a margin (a third of
 * the TTL, at least 1 s) stops calling itself leader (kvs_leader_is_leader) even before it
 * learns that the key is gone, so it never acts after a standby could have taken over.
 *
 * Use: kvs_leader_new, then either kvs_leader_start (a thread runs the election; poll
 * kvs_leader_is_leader) or call kvs_leader_step yourself. Thread-safety: every function may
 * be called from any thread.
 */
#ifndef KVS_LEADER_H
#define KVS_LEADER_H

#include "common/store.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct kvs_leader kvs_leader;

/* A contender for key (e.g. "/kvstream/c1/leader") under the name id (stored as the key's
 * value: how clients and standbys learn who leads), with leases of ttl_s seconds (2..600).
 * store is borrowed and must outlive the contender. NULL with a reason on bad arguments. */
kvs_leader *kvs_leader_new(kvs_store *store, const char *key, const char *id, int ttl_s, char *err,
                           size_t errlen);

/* Stop the thread if started; a leader resigns (revokes its lease, so the key goes now and
 * a standby takes over without waiting for the TTL) unless resign is false (a crash, for
 * tests). Accepts NULL; nulls *l. */
void kvs_leader_destroy(kvs_leader **l, bool resign);

/* One round: a leader renews its lease (NOT_FOUND from the store = leadership lost); a
 * standby grants itself a lease if it has none and tries the create-if-absent txn.
 * Returns 1 when leading after the round, 0 when standing by, or a store error (e.g.
 * UNAVAILABLE: nothing changes, a leader stays leader until its deadline). */
int kvs_leader_step(kvs_leader *l, char *err, size_t errlen);

/* Run the election on a thread: a leader renews every ttl/3; a standby waits on a watch of
 * the key (at most ttl/3) and steps when it is deleted. 0, or NO_MEMORY. */
int kvs_leader_start(kvs_leader *l, char *err, size_t errlen);
/* Stop that thread without resigning (the lease then expires on its own). */
void kvs_leader_stop(kvs_leader *l);

/* Whether this contender leads now (and renewed within ttl minus the margin). */
bool kvs_leader_is_leader(kvs_leader *l);
/* The fencing token of the current leadership (the key's create_revision), 0 when not
 * leading. */
int64_t kvs_leader_token(kvs_leader *l);
/* The token this contender holds even if it could not renew lately (the store is away): 0
 * once it knows it lost (its lease expired, or a fenced write was refused). For answering
 * from memory through a store outage, when no one can take over anyway; a write is fenced
 * whatever this says. */
int64_t kvs_leader_held_token(kvs_leader *l);

/* The id of the leader as last seen (this contender's id when leading, "" when unknown),
 * copied into buf[0..len). */
void kvs_leader_current(kvs_leader *l, char *buf, size_t len);

/* A fenced write: the txn (cmp[0..n_cmp) / ok[0..n_ok), no failure ops) applied only if
 * this contender still holds the leadership it was given: NOT_LEADER when it does not (the
 * store's leader key was re-created or is gone; the contender then stands by), otherwise
 * what kvs_store_txn returns (*succeeded false when one of the caller's compares failed).
 * Use the token it ran under: kvs_leader_token() at the time of the call. */
int kvs_leader_txn(kvs_leader *l, const struct kvs_store_cmp *cmp, size_t n_cmp,
                   const struct kvs_store_op *ok, size_t n_ok, bool *succeeded, int64_t *revision,
                   char *err, size_t errlen);

/* Fenced put and delete (kvs_leader_txn with one op and no compares of the caller). */
int kvs_leader_put(kvs_leader *l, const char *key, const void *value, size_t len, int64_t lease,
                   char *err, size_t errlen);
int kvs_leader_delete(kvs_leader *l, const char *key, bool prefix, char *err, size_t errlen);

#endif
