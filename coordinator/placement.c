/* Placement policy (coordinator/placement.h): filter, prefer a prefix hit, best fit, id. */
#include "coordinator/placement.h"

#include "common/status.h"

#include <string.h>

static const char *const state_names[] = {"ready", "cordoned", "draining", "unhealthy"};

const char *kvs_worker_state_name(enum kvs_worker_state s)
{
    return (unsigned)s < sizeof state_names / sizeof *state_names ? state_names[s] : "?";
}

int kvs_worker_state_parse(const char *name)
{
    for (size_t i = 0; name != NULL && i < sizeof state_names / sizeof *state_names; i++) {
        if (strcmp(name, state_names[i]) == 0) {
            return (int)i;
        }
    }
    return -1;
}

static bool has_prefix(const struct kvs_worker_info *w, uint64_t hash)
{
    if (hash == 0) {
        return false;
    }
    for (size_t i = 0; i < w->n_prefix_hashes; i++) {
        if (w->prefix_hashes[i] == hash) {
            return true;
        }
    }
    return false;
}

int64_t kvs_placement_cells_reserved(const struct kvs_worker_info *w, int64_t n_cells)
{
    if (w->block_size <= 0) {
        return n_cells;
    }
    return ((n_cells + w->block_size - 1) / w->block_size + 1) * w->block_size;
}

/* Whether candidate a beats b (both eligible), a_left and b_left cells left over on each. */
static bool better(const struct kvs_worker_info *a, bool a_hit, int64_t a_left,
                   const struct kvs_worker_info *b, bool b_hit, int64_t b_left)
{
    if (a_hit != b_hit) {
        return a_hit;
    }
    if (a_left != b_left) {
        return a_left < b_left; /* best fit: least left over */
    }
    return strcmp(a->id, b->id) < 0;
}

int kvs_placement_choose(const struct kvs_worker_info *workers, size_t n,
                         const struct kvs_placement_request *rq, struct kvs_placement *out,
                         char *reason, size_t reason_len)
{
    if (rq->n_cells <= 0 || rq->model_sha256 == NULL || rq->model_sha256[0] == '\0') {
        kvs_errf(reason, reason_len,
                 "placement: a budget of %lld cells and a model are "
                 "required",
                 (long long)rq->n_cells);
        return KVS_INVALID_ARGUMENT;
    }
    size_t n_ready = 0, n_model = 0, n_not_ready = 0, best = n;
    bool best_hit = false;
    int64_t max_free = -1, best_left = 0;
    for (size_t i = 0; i < n; i++) {
        const struct kvs_worker_info *w = &workers[i];
        if (w->state != KVS_WORKER_READY) {
            n_not_ready++;
            continue;
        }
        n_ready++;
        if (w->model_sha256 == NULL || strcmp(w->model_sha256, rq->model_sha256) != 0) {
            continue;
        }
        n_model++;
        if (w->n_cells_free > max_free) {
            max_free = w->n_cells_free;
        }
        int64_t left = w->n_cells_free - kvs_placement_cells_reserved(w, rq->n_cells);
        if (left < 0) {
            continue;
        }
        bool hit = has_prefix(w, rq->prefix_hash);
        if (best == n || better(w, hit, left, &workers[best], best_hit, best_left)) {
            best = i;
            best_hit = hit;
            best_left = left;
        }
    }
    if (best < n) {
        out->index = best;
        out->prefix_hit = best_hit;
        out->n_cells_left = best_left;
        return KVS_OK;
    }
    if (n_ready == 0) {
        kvs_errf(reason, reason_len,
                 "no worker can take a session: %zu registered, none ready (%zu cordoned, "
                 "draining or unhealthy)",
                 n, n_not_ready);
        return KVS_UNAVAILABLE;
    }
    if (n_model == 0) {
        kvs_errf(reason, reason_len, "no ready worker serves model %.16s... (%zu ready)",
                 rq->model_sha256, n_ready);
        return KVS_MODEL_MISMATCH;
    }
    kvs_errf(reason, reason_len,
             "no worker has %lld free cells for the session (a worker reserves whole blocks, "
             "plus one): the most free on a ready worker serving its model is %lld (%zu such "
             "workers)",
             (long long)rq->n_cells, (long long)max_free, n_model);
    return KVS_CAPACITY;
}
