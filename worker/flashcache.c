/* The I/O thread's flash cache and watchers; see worker/flashcache.h. */
#include "worker/flashcache.h"

#include "common/status.h"
#include "worker/sesslog.h" /* KVS_SESSION_ID_MAX */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define IDENT_MAX 256 /* bytes of a ROUTER peer identity (libzmq: 255) */

struct answer {
    char name[KVS_WIRE_NAME_MAX + 1];
    uint64_t version; /* the session version it was computed at */
    uint8_t *body;    /* (len) encoded key/value pairs of the reply map (owned) */
    size_t len;
    uint32_t n_keys; /* pairs in body */
};

struct sess {
    char id[KVS_SESSION_ID_MAX + 1];
    uint64_t version; /* the session's current version, as published */
    struct answer *a; /* (n) latest answer per flash query */
    int32_t n, cap;
};

struct watcher {
    uint8_t ident[IDENT_MAX];
    size_t ident_len;
    uint64_t id; /* the flash.watch request */
    char session[KVS_SESSION_ID_MAX + 1];
    int64_t seq; /* of the next piece */
};

struct kvs_flashcache {
    kvs_flashcache_send_fn send;
    void *user;
    struct sess **s; /* (n_s) */
    int32_t n_s, cap_s;
    struct watcher *w; /* (n_w), KVS_FLASHCACHE_WATCHERS_MAX allocated */
    int32_t n_w;
    uint64_t hits;    /* fresh answers served */
    uint64_t dropped; /* watchers dropped because a push failed */
    kvs_wire_buf buf; /* pushes */
};

kvs_flashcache *kvs_flashcache_new(kvs_flashcache_send_fn send, void *user)
{
    kvs_flashcache *c = calloc(1, sizeof *c);
    if (c == NULL) {
        return NULL;
    }
    c->w = calloc(KVS_FLASHCACHE_WATCHERS_MAX, sizeof *c->w);
    if (c->w == NULL) {
        free(c);
        return NULL;
    }
    c->send = send;
    c->user = user;
    kvs_wire_buf_init(&c->buf);
    return c;
}

static void sess_free(struct sess *s)
{
    for (int32_t i = 0; i < s->n; i++) {
        free(s->a[i].body);
    }
    free(s->a);
    free(s);
}

void kvs_flashcache_destroy(kvs_flashcache **cp)
{
    if (cp == NULL || *cp == NULL) {
        return;
    }
    kvs_flashcache *c = *cp;
    for (int32_t i = 0; i < c->n_s; i++) {
        sess_free(c->s[i]);
    }
    free(c->s);
    free(c->w);
    kvs_wire_buf_destroy(&c->buf);
    free(c);
    *cp = NULL;
}

static int32_t sess_index(const kvs_flashcache *c, const char *id)
{
    for (int32_t i = 0; i < c->n_s; i++) {
        if (strcmp(c->s[i]->id, id) == 0) {
            return i;
        }
    }
    return -1;
}

static struct sess *sess_find(const kvs_flashcache *c, const char *id)
{
    int32_t i = sess_index(c, id);
    return i < 0 ? NULL : c->s[i];
}

static struct answer *answer_find(struct sess *s, const char *name)
{
    for (int32_t i = 0; i < s->n; i++) {
        if (strcmp(s->a[i].name, name) == 0) {
            return &s->a[i];
        }
    }
    return NULL;
}

static struct sess *sess_get(kvs_flashcache *c, const char *id)
{
    struct sess *s = sess_find(c, id);
    if (s != NULL) {
        return s;
    }
    if (strlen(id) > KVS_SESSION_ID_MAX) {
        return NULL;
    }
    if (c->n_s == c->cap_s) {
        int32_t cap = c->cap_s ? 2 * c->cap_s : 16;
        struct sess **v = realloc(c->s, (size_t)cap * sizeof *v);
        if (v == NULL) {
            return NULL;
        }
        c->s = v;
        c->cap_s = cap;
    }
    s = calloc(1, sizeof *s);
    if (s == NULL) {
        return NULL;
    }
    snprintf(s->id, sizeof s->id, "%s", id);
    c->s[c->n_s++] = s;
    return s;
}

int kvs_flashcache_version(kvs_flashcache *c, const char *session, uint64_t version)
{
    struct sess *s = sess_get(c, session);
    if (s == NULL) {
        return KVS_NO_MEMORY;
    }
    if (version > s->version) {
        s->version = version;
    }
    return KVS_OK;
}

static void remove_watcher(kvs_flashcache *c, int32_t i)
{
    c->w[i] = c->w[--c->n_w];
}

/* Push a's reply piece to watcher i; false (and the watcher is gone) when it failed. */
static bool push(kvs_flashcache *c, int32_t i, const struct sess *s, const struct answer *a)
{
    struct watcher *w = &c->w[i];
    msgpack_packer *pk = &c->buf.pk;
    kvs_wire_buf_clear(&c->buf);
    msgpack_pack_map(pk, 5 + a->n_keys);
    kvs_wire_pack_cstr(pk, "id"), msgpack_pack_uint64(pk, w->id);
    kvs_wire_pack_cstr(pk, "seq"), msgpack_pack_int64(pk, w->seq);
    kvs_wire_pack_cstr(pk, "session"), kvs_wire_pack_cstr(pk, s->id);
    kvs_wire_pack_cstr(pk, "name"), kvs_wire_pack_cstr(pk, a->name);
    kvs_wire_pack_cstr(pk, "fresh");
    if (a->version == s->version) {
        msgpack_pack_true(pk);
    } else {
        msgpack_pack_false(pk);
    }
    msgpack_sbuffer_write(&c->buf.sb, (const char *)a->body, a->len);
    if (!c->send(w->ident, w->ident_len, c->buf.sb.data, c->buf.sb.size, c->user)) {
        c->dropped++;
        remove_watcher(c, i);
        return false;
    }
    w->seq++;
    return true;
}

int kvs_flashcache_answer(kvs_flashcache *c, const char *session, const char *name,
                          uint64_t version, const void *body, size_t len, uint32_t n_keys)
{
    struct sess *s = sess_get(c, session);
    if (s == NULL || strlen(name) > KVS_WIRE_NAME_MAX) {
        return KVS_NO_MEMORY;
    }
    if (version > s->version) {
        s->version = version;
    }
    struct answer *a = answer_find(s, name);
    if (a != NULL && a->version >= version) {
        /* older than what we have, or the same version computed twice (a flash.get that
         * computed it while the scheduler's evaluation was under way): pushed once */
        return KVS_OK;
    }
    uint8_t *copy = malloc(len > 0 ? len : 1);
    if (copy == NULL) {
        return KVS_NO_MEMORY;
    }
    memcpy(copy, body, len);
    if (a == NULL) {
        if (s->n == s->cap) {
            int32_t cap = s->cap ? 2 * s->cap : 4;
            struct answer *v = realloc(s->a, (size_t)cap * sizeof *v);
            if (v == NULL) {
                free(copy);
                return KVS_NO_MEMORY;
            }
            s->a = v;
            s->cap = cap;
        }
        a = &s->a[s->n++];
        memset(a, 0, sizeof *a);
        snprintf(a->name, sizeof a->name, "%s", name);
    }
    free(a->body);
    a->body = copy;
    a->len = len;
    a->n_keys = n_keys;
    a->version = version;
    for (int32_t i = 0; i < c->n_w;) {
        if (strcmp(c->w[i].session, session) != 0 || push(c, i, s, a)) {
            i++;
        }
    }
    return KVS_OK;
}

void kvs_flashcache_unregister(kvs_flashcache *c, const char *session, const char *name)
{
    struct sess *s = sess_find(c, session);
    struct answer *a = s != NULL ? answer_find(s, name) : NULL;
    if (a != NULL) {
        free(a->body);
        *a = s->a[--s->n];
    }
}

/* End watcher i with an error reply (seq, done) and remove it. */
static void end_watch(kvs_flashcache *c, int32_t i, int status, const char *why)
{
    struct watcher *w = &c->w[i];
    kvs_wire_encode_error(&c->buf, w->id, status, why, w->seq);
    c->send(w->ident, w->ident_len, c->buf.sb.data, c->buf.sb.size, c->user);
    remove_watcher(c, i);
}

/* End every watch of session with status and why; forget its answers. */
static void end_session(kvs_flashcache *c, const char *session, int status, const char *why)
{
    for (int32_t i = 0; i < c->n_w;) {
        if (strcmp(c->w[i].session, session) == 0) {
            end_watch(c, i, status, why);
        } else {
            i++;
        }
    }
    int32_t k = sess_index(c, session);
    if (k >= 0) {
        sess_free(c->s[k]);
        c->s[k] = c->s[--c->n_s];
    }
}

void kvs_flashcache_close(kvs_flashcache *c, const char *session)
{
    char why[KVS_SESSION_ID_MAX + 32];
    snprintf(why, sizeof why, "session '%s' closed", session);
    end_session(c, session, KVS_NOT_FOUND, why);
}

void kvs_flashcache_release(kvs_flashcache *c, const char *session)
{
    char why[KVS_SESSION_ID_MAX + 80];
    snprintf(why, sizeof why, "session '%s' was released to another worker: locate it again",
             session);
    end_session(c, session, KVS_MOVED, why);
}

bool kvs_flashcache_get(kvs_flashcache *c, const char *session, const char *name, bool allow_stale,
                        uint64_t id, kvs_wire_buf *out)
{
    struct sess *s = sess_find(c, session);
    struct answer *a = s != NULL ? answer_find(s, name) : NULL;
    if (a == NULL) {
        return false;
    }
    bool fresh = a->version == s->version;
    if (!fresh && !allow_stale) {
        return false;
    }
    c->hits += fresh;
    msgpack_packer *pk = &out->pk;
    kvs_wire_buf_clear(out);
    msgpack_pack_map(pk, 2 + a->n_keys);
    kvs_wire_pack_cstr(pk, "id"), msgpack_pack_uint64(pk, id);
    kvs_wire_pack_cstr(pk, "fresh");
    if (fresh) {
        msgpack_pack_true(pk);
    } else {
        msgpack_pack_false(pk);
    }
    msgpack_sbuffer_write(&out->sb, (const char *)a->body, a->len);
    return true;
}

int kvs_flashcache_watch(kvs_flashcache *c, const void *ident, size_t ident_len, uint64_t id,
                         const char *session, bool has_after, uint64_t after, char *err,
                         size_t errlen)
{
    struct sess *s = sess_find(c, session);
    if (s == NULL) {
        snprintf(err, errlen, "session '%s' not found", session);
        return KVS_NOT_FOUND;
    }
    if (ident_len > IDENT_MAX) {
        snprintf(err, errlen, "peer identity too long");
        return KVS_INVALID_ARGUMENT;
    }
    int32_t mine = 0;
    for (int32_t i = 0; i < c->n_w; i++) {
        if (c->w[i].ident_len == ident_len && memcmp(c->w[i].ident, ident, ident_len) == 0) {
            if (c->w[i].id == id) {
                snprintf(err, errlen, "request %llu is already a watch", (unsigned long long)id);
                return KVS_ALREADY_EXISTS;
            }
            mine++;
        }
    }
    if (mine >= KVS_FLASHCACHE_WATCHERS_PER_PEER || c->n_w >= KVS_FLASHCACHE_WATCHERS_MAX) {
        snprintf(err, errlen, "too many flash watches (%d per connection, %d per worker)",
                 KVS_FLASHCACHE_WATCHERS_PER_PEER, KVS_FLASHCACHE_WATCHERS_MAX);
        return KVS_BUSY;
    }
    struct watcher *w = &c->w[c->n_w];
    memset(w, 0, sizeof *w);
    memcpy(w->ident, ident, ident_len);
    w->ident_len = ident_len;
    w->id = id;
    snprintf(w->session, sizeof w->session, "%s", session);
    msgpack_packer *pk = &c->buf.pk;
    kvs_wire_buf_clear(&c->buf);
    msgpack_pack_map(pk, 4);
    kvs_wire_pack_cstr(pk, "id"), msgpack_pack_uint64(pk, id);
    kvs_wire_pack_cstr(pk, "seq"), msgpack_pack_int64(pk, 0);
    kvs_wire_pack_cstr(pk, "watching"), msgpack_pack_true(pk);
    kvs_wire_pack_cstr(pk, "version"), msgpack_pack_uint64(pk, s->version);
    if (!c->send(ident, ident_len, c->buf.sb.data, c->buf.sb.size, c->user)) {
        return KVS_OK; /* gone already: nothing to keep */
    }
    w->seq = 1;
    int32_t idx = c->n_w++;
    if (has_after) {
        for (int32_t k = 0; k < s->n; k++) {
            if (s->a[k].version > after && !push(c, idx, s, &s->a[k])) {
                break;
            }
        }
    }
    return KVS_OK;
}

bool kvs_flashcache_unwatch(kvs_flashcache *c, const void *ident, size_t ident_len, uint64_t id,
                            const char *why)
{
    for (int32_t i = 0; i < c->n_w; i++) {
        struct watcher *w = &c->w[i];
        if (w->id == id && w->ident_len == ident_len && memcmp(w->ident, ident, ident_len) == 0) {
            end_watch(c, i, KVS_CANCELLED, why);
            return true;
        }
    }
    return false;
}

void kvs_flashcache_end_all(kvs_flashcache *c, int status, const char *why)
{
    while (c->n_w > 0) {
        end_watch(c, c->n_w - 1, status, why);
    }
}

int32_t kvs_flashcache_n_watchers(const kvs_flashcache *c)
{
    return c->n_w;
}

uint64_t kvs_flashcache_hits(const kvs_flashcache *c)
{
    return c->hits;
}

uint64_t kvs_flashcache_dropped(const kvs_flashcache *c)
{
    return c->dropped;
}
