/* The coordinator's store calls off its request loop (coordinator/storeq.h): a thread that
 * runs queued jobs one at a time, a list of finished ones, and the store's health as seen
 * from both. */
#include "coordinator/storeq.h"

#include "common/status.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct kvs_storeq {
    kvs_store *store; /* borrowed */
    pthread_t thread;
    pthread_mutex_t mu; /* guards every field below */
    pthread_cond_t cv;  /* a job was queued, or stop */
    bool stop;
    struct kvs_storeq_job *todo; /* ring of cap: queued jobs */
    size_t todo_head, n_todo;
    struct kvs_storeq_job *done; /* ring of cap: finished jobs */
    size_t done_head, n_done;
    size_t cap;
    bool running;          /* the thread is in a store call */
    int64_t running_since; /* monotonic ms, when running */
    bool last_unavailable; /* the last call that finished failed with UNAVAILABLE */
};

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void run_job(kvs_store *store, struct kvs_storeq_job *j)
{
    j->err[0] = '\0';
    switch (j->kind) {
    case KVS_STOREQ_KEEPALIVE:
        j->status = kvs_store_lease_keepalive(store, j->lease, NULL, j->err, sizeof j->err);
        break;
    case KVS_STOREQ_GET: {
        struct kvs_store_kv kv;
        j->status = kvs_store_get(store, j->key, &kv, j->err, sizeof j->err);
        kvs_store_kv_free(&kv);
        break;
    }
    default:
        j->status = KVS_INVALID_ARGUMENT;
        break;
    }
}

static void *queue_main(void *arg)
{
    kvs_storeq *q = arg;
    pthread_mutex_lock(&q->mu);
    for (;;) {
        while (!q->stop && q->n_todo == 0) {
            pthread_cond_wait(&q->cv, &q->mu);
        }
        if (q->stop) {
            break;
        }
        struct kvs_storeq_job j = q->todo[q->todo_head];
        q->todo_head = (q->todo_head + 1) % q->cap;
        q->n_todo--;
        q->running = true;
        q->running_since = j.started_ms = mono_ms();
        pthread_mutex_unlock(&q->mu);
        run_job(q->store, &j);
        pthread_mutex_lock(&q->mu);
        q->running = false;
        q->last_unavailable = j.status == KVS_UNAVAILABLE;
        /* room is guaranteed: queued + running + done never exceed cap */
        q->done[(q->done_head + q->n_done) % q->cap] = j;
        q->n_done++;
    }
    pthread_mutex_unlock(&q->mu);
    return NULL;
}

kvs_storeq *kvs_storeq_new(kvs_store *store, size_t cap)
{
    kvs_storeq *q = calloc(1, sizeof *q);
    if (q == NULL) {
        return NULL;
    }
    q->store = store;
    q->cap = cap > 0 ? cap : 1;
    q->todo = calloc(q->cap, sizeof *q->todo);
    q->done = calloc(q->cap, sizeof *q->done);
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    if (q->todo == NULL || q->done == NULL ||
        pthread_create(&q->thread, NULL, queue_main, q) != 0) {
        pthread_cond_destroy(&q->cv);
        pthread_mutex_destroy(&q->mu);
        free(q->todo);
        free(q->done);
        free(q);
        return NULL;
    }
    return q;
}

void kvs_storeq_destroy(kvs_storeq **pq)
{
    if (pq == NULL || *pq == NULL) {
        return;
    }
    kvs_storeq *q = *pq;
    pthread_mutex_lock(&q->mu);
    q->stop = true;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
    pthread_join(q->thread, NULL);
    pthread_cond_destroy(&q->cv);
    pthread_mutex_destroy(&q->mu);
    free(q->todo);
    free(q->done);
    free(q);
    *pq = NULL;
}

int kvs_storeq_push(kvs_storeq *q, const struct kvs_storeq_job *job)
{
    pthread_mutex_lock(&q->mu);
    if (q->n_todo + q->n_done + (q->running ? 1 : 0) >= q->cap) {
        pthread_mutex_unlock(&q->mu);
        return KVS_BUSY;
    }
    struct kvs_storeq_job *j = &q->todo[(q->todo_head + q->n_todo) % q->cap];
    *j = *job;
    j->status = 0;
    j->started_ms = 0;
    j->err[0] = '\0';
    q->n_todo++;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
    return KVS_OK;
}

bool kvs_storeq_pop_done(kvs_storeq *q, struct kvs_storeq_job *out)
{
    pthread_mutex_lock(&q->mu);
    bool any = q->n_done > 0;
    if (any) {
        *out = q->done[q->done_head];
        q->done_head = (q->done_head + 1) % q->cap;
        q->n_done--;
    }
    pthread_mutex_unlock(&q->mu);
    return any;
}

size_t kvs_storeq_pending(kvs_storeq *q)
{
    pthread_mutex_lock(&q->mu);
    size_t n = q->n_todo + (q->running ? 1 : 0);
    pthread_mutex_unlock(&q->mu);
    return n;
}

bool kvs_storeq_healthy(kvs_storeq *q, int64_t now, int64_t stall_ms)
{
    pthread_mutex_lock(&q->mu);
    bool stalled = q->running && now - q->running_since > stall_ms;
    bool ok = !stalled && !q->last_unavailable;
    pthread_mutex_unlock(&q->mu);
    return ok;
}

void kvs_storeq_note(kvs_storeq *q, int status)
{
    pthread_mutex_lock(&q->mu);
    q->last_unavailable = status == KVS_UNAVAILABLE;
    pthread_mutex_unlock(&q->mu);
}
