/* Leader election and fencing (coordinator/leader.h). */
#include "coordinator/leader.h"

#include "common/log.h"
#include "common/status.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ID_MAX 256

struct kvs_leader {
    kvs_store *store; /* borrowed */
    char *key;
    char id[ID_MAX];
    int ttl_s;
    pthread_mutex_t mu;   /* guards the fields below (never held across store calls) */
    int64_t lease;        /* our lease, 0 = none */
    int64_t token;        /* create_revision of our leader key, 0 = not leading */
    int64_t renewed_ms;   /* monotonic time of the last successful renewal */
    char current[ID_MAX]; /* the leader's id as last seen */
    pthread_t thread;
    bool started;
    atomic_bool stop;
    pthread_cond_t cv; /* wakes the thread to stop */
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* How long before its lease could have expired a leader stops calling itself leader. */
static int64_t margin_ms(const kvs_leader *l)
{
    int64_t m = (int64_t)l->ttl_s * 1000 / 3;
    return m < 1000 ? 1000 : m;
}

kvs_leader *kvs_leader_new(kvs_store *store, const char *key, const char *id, int ttl_s, char *err,
                           size_t errlen)
{
    if (store == NULL || key == NULL || key[0] == '\0' || id == NULL || id[0] == '\0' ||
        strlen(id) >= ID_MAX || ttl_s < 2 || ttl_s > 600) {
        kvs_errf(err, errlen,
                 "leader: needs a store, a key, an id of 1..%d bytes and a TTL "
                 "of 2..600 s (got %d)",
                 ID_MAX - 1, ttl_s);
        return NULL;
    }
    kvs_leader *l = calloc(1, sizeof *l);
    if (l == NULL || (l->key = strdup(key)) == NULL) {
        free(l);
        kvs_errf(err, errlen, "leader: out of memory");
        return NULL;
    }
    l->store = store;
    snprintf(l->id, sizeof l->id, "%s", id);
    l->ttl_s = ttl_s;
    pthread_mutex_init(&l->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&l->cv, &ca);
    pthread_condattr_destroy(&ca);
    return l;
}

static void lose(kvs_leader *l, const char *why)
{
    pthread_mutex_lock(&l->mu);
    if (l->token != 0) {
        KVS_WARN("leader: '%s' is no longer leader of %s (%s)", l->id, l->key, why);
    }
    l->token = 0;
    pthread_mutex_unlock(&l->mu);
}

/* The standby half of a step: make sure we have a lease, then try to create the key. */
static int try_acquire(kvs_leader *l, char *err, size_t errlen)
{
    pthread_mutex_lock(&l->mu);
    int64_t lease = l->lease;
    pthread_mutex_unlock(&l->mu);
    if (lease != 0) {
        int rc = kvs_store_lease_keepalive(l->store, lease, NULL, err, errlen);
        if (rc == KVS_NOT_FOUND) {
            lease = 0; /* expired: take a new one below */
        } else {
            KVS_TRY(rc);
        }
    }
    if (lease == 0) {
        KVS_TRY(kvs_store_lease_grant(l->store, l->ttl_s, &lease, NULL, err, errlen));
    }
    pthread_mutex_lock(&l->mu);
    l->lease = lease;
    l->renewed_ms = now_ms();
    pthread_mutex_unlock(&l->mu);
    struct kvs_store_cmp absent = {
        .key = l->key, .target = KVS_STORE_CREATE, .result = KVS_STORE_EQUAL, .number = 0};
    struct kvs_store_op put = {.type = KVS_STORE_OP_PUT,
                               .key = l->key,
                               .value = l->id,
                               .value_len = strlen(l->id),
                               .lease = lease};
    bool won = false;
    int64_t rev = 0;
    int rc = kvs_store_txn(l->store, &absent, 1, &put, 1, NULL, 0, &won, &rev, err, errlen);
    if (rc == KVS_NOT_FOUND) {
        pthread_mutex_lock(&l->mu);
        l->lease = 0; /* expired between the renewal and the txn */
        pthread_mutex_unlock(&l->mu);
    }
    KVS_TRY(rc);
    if (won) {
        pthread_mutex_lock(&l->mu);
        l->token = rev; /* the put's revision = the key's create_revision */
        l->renewed_ms = now_ms();
        snprintf(l->current, sizeof l->current, "%s", l->id);
        pthread_mutex_unlock(&l->mu);
        KVS_INFO("leader: '%s' leads %s (token %lld)", l->id, l->key, (long long)rev);
        return 1;
    }
    struct kvs_store_kv kv;
    if (kvs_store_get(l->store, l->key, &kv, NULL, 0) == KVS_OK) {
        pthread_mutex_lock(&l->mu);
        snprintf(l->current, sizeof l->current, "%.*s", (int)kv.value_len, kv.value);
        pthread_mutex_unlock(&l->mu);
        kvs_store_kv_free(&kv);
    }
    return 0;
}

int kvs_leader_step(kvs_leader *l, char *err, size_t errlen)
{
    pthread_mutex_lock(&l->mu);
    int64_t token = l->token, lease = l->lease;
    pthread_mutex_unlock(&l->mu);
    if (token == 0) {
        return try_acquire(l, err, errlen);
    }
    int rc = kvs_store_lease_keepalive(l->store, lease, NULL, err, errlen);
    if (rc == KVS_NOT_FOUND) {
        pthread_mutex_lock(&l->mu);
        l->lease = 0;
        pthread_mutex_unlock(&l->mu);
        lose(l, "its lease expired");
        return try_acquire(l, err, errlen);
    }
    KVS_TRY(rc);
    pthread_mutex_lock(&l->mu);
    l->renewed_ms = now_ms();
    pthread_mutex_unlock(&l->mu);
    return kvs_leader_is_leader(l) ? 1 : 0;
}

bool kvs_leader_is_leader(kvs_leader *l)
{
    pthread_mutex_lock(&l->mu);
    bool leading =
        l->token != 0 && now_ms() < l->renewed_ms + (int64_t)l->ttl_s * 1000 - margin_ms(l);
    pthread_mutex_unlock(&l->mu);
    return leading;
}

int64_t kvs_leader_token(kvs_leader *l)
{
    pthread_mutex_lock(&l->mu);
    int64_t token = l->token;
    pthread_mutex_unlock(&l->mu);
    return kvs_leader_is_leader(l) ? token : 0;
}

int64_t kvs_leader_held_token(kvs_leader *l)
{
    pthread_mutex_lock(&l->mu);
    int64_t token = l->token;
    pthread_mutex_unlock(&l->mu);
    return token;
}

void kvs_leader_current(kvs_leader *l, char *buf, size_t len)
{
    pthread_mutex_lock(&l->mu);
    snprintf(buf, len, "%s", l->current);
    pthread_mutex_unlock(&l->mu);
}

/* ---- fenced writes ---- */

#define FENCED_MAX_CMP 16

int kvs_leader_txn(kvs_leader *l, const struct kvs_store_cmp *cmp, size_t n_cmp,
                   const struct kvs_store_op *ok, size_t n_ok, bool *succeeded, int64_t *revision,
                   char *err, size_t errlen)
{
    *succeeded = false;
    pthread_mutex_lock(&l->mu);
    int64_t token = l->token; /* the leadership this write runs under */
    pthread_mutex_unlock(&l->mu);
    if (token == 0) {
        kvs_errf(err, errlen, "'%s' is not the leader of %s", l->id, l->key);
        return KVS_NOT_LEADER;
    }
    if (n_cmp >= FENCED_MAX_CMP) {
        kvs_errf(err, errlen, "leader: more than %d compares in a fenced txn", FENCED_MAX_CMP - 1);
        return KVS_TOO_LARGE;
    }
    struct kvs_store_cmp all[FENCED_MAX_CMP];
    all[0] = (struct kvs_store_cmp){
        .key = l->key, .target = KVS_STORE_CREATE, .result = KVS_STORE_EQUAL, .number = token};
    if (n_cmp > 0) {
        memcpy(&all[1], cmp, n_cmp * sizeof *cmp);
    }
    KVS_TRY(kvs_store_txn(l->store, all, n_cmp + 1, ok, n_ok, NULL, 0, succeeded, revision, err,
                          errlen));
    if (*succeeded) {
        return KVS_OK;
    }
    /* Which compare failed? The fence, unless the key still carries our token. */
    struct kvs_store_kv kv;
    int rc = kvs_store_get(l->store, l->key, &kv, err, errlen);
    bool fenced = rc == KVS_NOT_FOUND || (rc == KVS_OK && kv.create_revision != token);
    kvs_store_kv_free(&kv);
    if (rc < 0 && rc != KVS_NOT_FOUND) {
        return rc;
    }
    if (fenced) {
        pthread_mutex_lock(&l->mu);
        if (l->token == token) {
            l->token = 0;
        }
        pthread_mutex_unlock(&l->mu);
        KVS_WARN("leader: a write of '%s' was fenced off (token %lld is stale)", l->id,
                 (long long)token);
        kvs_errf(err, errlen, "'%s' is not the leader of %s any more (token %lld is stale)", l->id,
                 l->key, (long long)token);
        return KVS_NOT_LEADER;
    }
    return KVS_OK;
}

int kvs_leader_put(kvs_leader *l, const char *key, const void *value, size_t len, int64_t lease,
                   char *err, size_t errlen)
{
    struct kvs_store_op op = {
        .type = KVS_STORE_OP_PUT, .key = key, .value = value, .value_len = len, .lease = lease};
    bool ok;
    return kvs_leader_txn(l, NULL, 0, &op, 1, &ok, NULL, err, errlen);
}

int kvs_leader_delete(kvs_leader *l, const char *key, bool prefix, char *err, size_t errlen)
{
    struct kvs_store_op op = {.type = KVS_STORE_OP_DELETE, .key = key, .prefix = prefix};
    bool ok;
    return kvs_leader_txn(l, NULL, 0, &op, 1, &ok, NULL, err, errlen);
}

/* ---- the election thread ---- */

/* Sleep up to ms, or less when stopped. */
static void nap(kvs_leader *l, int64_t ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&l->mu);
    if (!atomic_load(&l->stop)) {
        pthread_cond_timedwait(&l->cv, &l->mu, &ts);
    }
    pthread_mutex_unlock(&l->mu);
}

static void *election_main(void *arg)
{
    kvs_leader *l = arg;
    kvs_store_watch *w = NULL;
    int64_t period = (int64_t)l->ttl_s * 1000 / 3;
    char err[256];
    while (!atomic_load(&l->stop)) {
        int rc = kvs_leader_step(l, err, sizeof err);
        if (rc < 0) {
            KVS_WARN("leader: '%s': %s", l->id, err);
        }
        if (rc == 1) {
            kvs_store_watch_destroy(&w);
            nap(l, period);
            continue;
        }
        /* Stand by: wake on the key's DELETE, or after a period at the latest. */
        if (w == NULL) {
            w = kvs_store_watch_new(l->store, l->key, 0, err, sizeof err);
        }
        if (w == NULL) {
            nap(l, period > 1000 ? 1000 : period);
            continue;
        }
        int64_t until = now_ms() + period;
        while (!atomic_load(&l->stop) && now_ms() < until) {
            struct kvs_store_event ev;
            int got = kvs_store_watch_next(w, &ev, 100);
            bool gone = got == 1 && strcmp(ev.kv.key, l->key) == 0 && ev.type != KVS_STORE_PUT;
            kvs_store_event_free(&ev);
            if (got < 0) {
                kvs_store_watch_destroy(&w);
                break;
            }
            if (gone) {
                break;
            }
        }
    }
    kvs_store_watch_destroy(&w);
    return NULL;
}

int kvs_leader_start(kvs_leader *l, char *err, size_t errlen)
{
    if (l->started) {
        return KVS_OK;
    }
    atomic_store(&l->stop, false);
    if (pthread_create(&l->thread, NULL, election_main, l) != 0) {
        kvs_errf(err, errlen, "leader: cannot start the election thread");
        return KVS_NO_MEMORY;
    }
    l->started = true;
    return KVS_OK;
}

void kvs_leader_stop(kvs_leader *l)
{
    if (!l->started) {
        return;
    }
    pthread_mutex_lock(&l->mu);
    atomic_store(&l->stop, true);
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
    pthread_join(l->thread, NULL);
    l->started = false;
}

void kvs_leader_destroy(kvs_leader **pl, bool resign)
{
    if (pl == NULL || *pl == NULL) {
        return;
    }
    kvs_leader *l = *pl;
    kvs_leader_stop(l);
    if (resign && l->lease != 0) {
        char err[256];
        if (kvs_store_lease_revoke(l->store, l->lease, err, sizeof err) < 0 && l->token != 0) {
            KVS_WARN("leader: '%s' could not resign: %s (the lease expires in %d s)", l->id, err,
                     l->ttl_s);
        }
    }
    pthread_cond_destroy(&l->cv);
    pthread_mutex_destroy(&l->mu);
    free(l->key);
    free(l);
    *pl = NULL;
}
