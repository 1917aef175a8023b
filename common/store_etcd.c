/* The etcd store (common/store.h): etcd 3.4's v3 JSON gateway over libcurl, JSON by jansson,
 * base64 by libsodium. One curl handle per store (calls are serialized) and one per watch,
 * whose thread keeps a streaming POST /v3/watch open and reconnects with a backoff.
 *
 * Every call has a deadline (CURLOPT_TIMEOUT_MS; connect within it too), a reply bigger than
 * REPLY_MAX is cut off in the write callback (CURLOPT_MAXFILESIZE does not cover chunked
 * replies), and every reply is validated (common/store_etcd.h says what the gateway sends).
 * With several endpoints a call that cannot reach one tries the next. */
#include "common/store_etcd.h"
#include "common/store_impl.h"

#include "common/log.h"
#include "common/status.h"

#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define REPLY_MAX (16u << 20)    /* bytes of one reply */
#define WATCH_MSG_MAX (4u << 20) /* bytes of one watch stream message */
#define MAX_ENDPOINTS 8
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 1000

struct etcd {
    struct kvs_store base;
    pthread_mutex_t mu; /* serializes calls on curl */
    CURL *curl;
    struct curl_slist *headers;     /* Content-Type: application/json */
    char *endpoints[MAX_ENDPOINTS]; /* "http://host:port", no trailing slash */
    int n_endpoints;
    atomic_int current;         /* the endpoint that answered last */
    int timeout_ms;             /* per call */
    pthread_mutex_t watches_mu; /* guards watches */
    struct etcd_watch *watches; /* live watches (their threads use this store) */
};

/* ---- parsing (common/store_etcd.h) ---- */

int kvs_etcd_int64(const json_t *obj, const char *field, int64_t *out)
{
    *out = 0;
    json_t *v = json_object_get(obj, field);
    if (v == NULL || json_is_null(v)) {
        return KVS_OK; /* the gateway leaves zero out */
    }
    if (json_is_integer(v)) {
        *out = json_integer_value(v);
        return KVS_OK;
    }
    if (!json_is_string(v)) {
        return KVS_BAD_FORMAT;
    }
    const char *s = json_string_value(v);
    char *end;
    errno = 0;
    long long x = strtoll(s, &end, 10);
    if (s[0] == '\0' || *end != '\0' || errno == ERANGE ||
        (s[0] != '-' && (s[0] < '0' || s[0] > '9'))) {
        return KVS_BAD_FORMAT;
    }
    *out = x;
    return KVS_OK;
}

int kvs_etcd_parse_revision(const json_t *reply, int64_t *revision)
{
    *revision = 0;
    json_t *h = json_object_get(reply, "header");
    if (!json_is_object(h)) {
        return KVS_BAD_FORMAT;
    }
    return kvs_etcd_int64(h, "revision", revision);
}

static int b64_field(const json_t *obj, const char *field, bool required, char **out, size_t *len)
{
    *out = NULL;
    *len = 0;
    json_t *v = json_object_get(obj, field);
    if (v == NULL) {
        if (required) {
            return KVS_BAD_FORMAT;
        }
        *out = calloc(1, 1);
        return *out ? KVS_OK : KVS_NO_MEMORY;
    }
    if (!json_is_string(v)) {
        return KVS_BAD_FORMAT;
    }
    return kvs_store_b64_decode(json_string_value(v), json_string_length(v), out, len);
}

int kvs_etcd_parse_kv(const json_t *obj, struct kvs_store_kv *kv)
{
    memset(kv, 0, sizeof *kv);
    if (!json_is_object(obj)) {
        return KVS_BAD_FORMAT;
    }
    size_t key_len;
    int rc = b64_field(obj, "key", true, &kv->key, &key_len);
    if (rc == KVS_OK && (key_len == 0 || strlen(kv->key) != key_len)) {
        rc = KVS_BAD_FORMAT; /* empty, or a NUL inside: not a key this store writes */
    }
    if (rc == KVS_OK) {
        rc = b64_field(obj, "value", false, &kv->value, &kv->value_len);
    }
    if (rc == KVS_OK && (kvs_etcd_int64(obj, "create_revision", &kv->create_revision) < 0 ||
                         kvs_etcd_int64(obj, "mod_revision", &kv->mod_revision) < 0 ||
                         kvs_etcd_int64(obj, "version", &kv->version) < 0 ||
                         kvs_etcd_int64(obj, "lease", &kv->lease) < 0)) {
        rc = KVS_BAD_FORMAT;
    }
    if (rc < 0) {
        kvs_store_kv_free(kv);
    }
    return rc;
}

int kvs_etcd_parse_range(const json_t *reply, struct kvs_store_range *out)
{
    memset(out, 0, sizeof *out);
    KVS_TRY(kvs_etcd_parse_revision(reply, &out->revision));
    json_t *kvs = json_object_get(reply, "kvs");
    if (kvs == NULL) {
        return KVS_OK; /* no match */
    }
    if (!json_is_array(kvs)) {
        return KVS_BAD_FORMAT;
    }
    size_t n = json_array_size(kvs);
    if (n == 0) {
        return KVS_OK;
    }
    out->kvs = calloc(n, sizeof *out->kvs);
    if (out->kvs == NULL) {
        return KVS_NO_MEMORY;
    }
    for (size_t i = 0; i < n; i++) {
        KVS_TRY(kvs_etcd_parse_kv(json_array_get(kvs, i), &out->kvs[i]));
        out->n++;
    }
    return KVS_OK;
}

int kvs_etcd_parse_delete(const json_t *reply, int64_t *deleted, int64_t *revision)
{
    KVS_TRY(kvs_etcd_parse_revision(reply, revision));
    if (kvs_etcd_int64(reply, "deleted", deleted) < 0 || *deleted < 0) {
        return KVS_BAD_FORMAT;
    }
    return KVS_OK;
}

int kvs_etcd_parse_txn(const json_t *reply, bool *succeeded, int64_t *revision)
{
    *succeeded = false;
    KVS_TRY(kvs_etcd_parse_revision(reply, revision));
    json_t *v = json_object_get(reply, "succeeded");
    if (v != NULL && !json_is_boolean(v)) {
        return KVS_BAD_FORMAT;
    }
    *succeeded = v != NULL && json_is_true(v);
    return KVS_OK;
}

int kvs_etcd_parse_lease_grant(const json_t *reply, int64_t *id, int64_t *ttl)
{
    if (kvs_etcd_int64(reply, "ID", id) < 0 || kvs_etcd_int64(reply, "TTL", ttl) < 0 || *id <= 0 ||
        *ttl <= 0) {
        return KVS_BAD_FORMAT;
    }
    return KVS_OK;
}

int kvs_etcd_parse_keepalive(const json_t *reply, int64_t *ttl)
{
    *ttl = 0;
    json_t *r = json_object_get(reply, "result");
    if (!json_is_object(r) || kvs_etcd_int64(r, "TTL", ttl) < 0) {
        return KVS_BAD_FORMAT;
    }
    return *ttl > 0 ? KVS_OK : KVS_NOT_FOUND;
}

int kvs_etcd_parse_error(long http_status, const json_t *reply, char *err, size_t errlen)
{
    const char *msg = NULL;
    int64_t code = -1;
    if (json_is_object(reply)) {
        json_t *m = json_object_get(reply, "message");
        if (!json_is_string(m)) {
            m = json_object_get(reply, "error");
        }
        msg = json_is_string(m) ? json_string_value(m) : NULL;
        if (json_object_get(reply, "code") != NULL && kvs_etcd_int64(reply, "code", &code) < 0) {
            code = -1;
        }
    }
    int rc;
    switch (code) {
    case 3: /* InvalidArgument */
        rc = KVS_INVALID_ARGUMENT;
        break;
    case 4:  /* DeadlineExceeded */
    case 8:  /* ResourceExhausted: NOSPACE (database full) */
    case 14: /* Unavailable */
        rc = KVS_UNAVAILABLE;
        break;
    case 5: /* NotFound */
        rc = KVS_NOT_FOUND;
        break;
    case 11: /* OutOfRange: compacted */
        rc = KVS_OUT_OF_RANGE;
        break;
    default:
        rc = http_status == 429 || http_status >= 500 ? KVS_UNAVAILABLE
             : http_status == 404                     ? KVS_NOT_FOUND
             : http_status == 400                     ? KVS_INVALID_ARGUMENT
                                                      : KVS_BAD_FORMAT;
        break;
    }
    kvs_errf(err, errlen, "etcd: HTTP %ld%s: %s", http_status,
             http_status == 429 ? " (database full, NOSPACE)" : "", msg ? msg : "no error message");
    return rc;
}

void kvs_etcd_watch_msg_free(struct kvs_etcd_watch_msg *msg)
{
    if (msg == NULL) {
        return;
    }
    for (size_t i = 0; i < msg->n_events; i++) {
        kvs_store_event_free(&msg->events[i]);
    }
    free(msg->events);
    memset(msg, 0, sizeof *msg);
}

int kvs_etcd_parse_watch(const json_t *msg_json, struct kvs_etcd_watch_msg *msg, char *err,
                         size_t errlen)
{
    memset(msg, 0, sizeof *msg);
    json_t *e = json_object_get(msg_json, "error");
    if (e != NULL) {
        kvs_etcd_parse_error(200, json_is_object(e) ? e : msg_json, err, errlen);
        return KVS_UNAVAILABLE;
    }
    json_t *r = json_object_get(msg_json, "result");
    if (!json_is_object(r)) {
        return KVS_BAD_FORMAT;
    }
    json_t *h = json_object_get(r, "header");
    if (h != NULL && kvs_etcd_int64(h, "revision", &msg->revision) < 0) {
        return KVS_BAD_FORMAT;
    }
    json_t *created = json_object_get(r, "created"), *canceled = json_object_get(r, "canceled");
    if ((created != NULL && !json_is_boolean(created)) ||
        (canceled != NULL && !json_is_boolean(canceled)) ||
        kvs_etcd_int64(r, "compact_revision", &msg->compact_revision) < 0) {
        return KVS_BAD_FORMAT;
    }
    msg->created = json_is_true(created);
    msg->canceled = json_is_true(canceled) || msg->compact_revision > 0;
    json_t *events = json_object_get(r, "events");
    if (events == NULL) {
        return KVS_OK;
    }
    if (!json_is_array(events)) {
        return KVS_BAD_FORMAT;
    }
    size_t n = json_array_size(events);
    msg->events = calloc(n ? n : 1, sizeof *msg->events);
    if (msg->events == NULL) {
        return KVS_NO_MEMORY;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *ev = json_array_get(events, i);
        json_t *type = json_object_get(ev, "type");
        struct kvs_store_event *out = &msg->events[i];
        if (type == NULL) {
            out->type = KVS_STORE_PUT; /* PUT is 0: left out */
        } else if (json_is_string(type) && strcmp(json_string_value(type), "DELETE") == 0) {
            out->type = KVS_STORE_DELETE;
        } else if (json_is_string(type) && strcmp(json_string_value(type), "PUT") == 0) {
            out->type = KVS_STORE_PUT;
        } else {
            return KVS_BAD_FORMAT;
        }
        KVS_TRY(kvs_etcd_parse_kv(json_object_get(ev, "kv"), &out->kv));
        msg->n_events++;
    }
    return KVS_OK;
}

/* ---- HTTP ---- */

struct reply_buf {
    char *data;
    size_t len, cap;
    size_t limit;
    bool too_large;
};

static size_t on_reply(char *p, size_t size, size_t nmemb, void *ud)
{
    struct reply_buf *b = ud;
    size_t add = size * nmemb;
    if (b->len + add > b->limit) {
        b->too_large = true;
        return CURL_WRITEFUNC_ERROR;
    }
    if (b->len + add + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + add + 1) {
            cap *= 2;
        }
        char *d = realloc(b->data, cap);
        if (d == NULL) {
            b->too_large = true;
            return CURL_WRITEFUNC_ERROR;
        }
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, add);
    b->len += add;
    b->data[b->len] = '\0';
    return add;
}

static bool transport_error(CURLcode c)
{
    return c == CURLE_COULDNT_CONNECT || c == CURLE_COULDNT_RESOLVE_HOST ||
           c == CURLE_OPERATION_TIMEDOUT || c == CURLE_SEND_ERROR || c == CURLE_RECV_ERROR ||
           c == CURLE_GOT_NOTHING || c == CURLE_PARTIAL_FILE;
}

/* POST body to path on the first endpoint that answers; *reply = the parsed JSON object of a
 * 200 reply (caller decrefs). Errors: UNAVAILABLE (no endpoint reachable, timeout, NOSPACE),
 * TOO_LARGE, BAD_FORMAT, or the status of an etcd error reply. */
static int post(struct etcd *e, CURL *h, const char *path, json_t *body, json_t **reply, char *err,
                size_t errlen)
{
    *reply = NULL;
    char *text = json_dumps(body, JSON_COMPACT);
    if (text == NULL) {
        kvs_errf(err, errlen, "etcd: out of memory");
        return KVS_NO_MEMORY;
    }
    struct reply_buf b = {.limit = REPLY_MAX};
    CURLcode c = CURLE_COULDNT_CONNECT;
    long http = 0;
    char url[512];
    int first = atomic_load(&e->current);
    for (int k = 0; k < e->n_endpoints; k++) {
        int idx = (first + k) % e->n_endpoints;
        snprintf(url, sizeof url, "%s%s", e->endpoints[idx], path);
        b.len = 0;
        curl_easy_reset(h);
        curl_easy_setopt(h, CURLOPT_URL, url);
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, text);
        curl_easy_setopt(h, CURLOPT_HTTPHEADER, e->headers);
        curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_reply);
        curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
        curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)e->timeout_ms);
        curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long)e->timeout_ms);
        curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
        c = curl_easy_perform(h);
        if (!transport_error(c)) {
            atomic_store(&e->current, idx);
            break;
        }
    }
    free(text);
    int rc = KVS_OK;
    if (b.too_large) {
        kvs_errf(err, errlen, "etcd: reply to %s over %u bytes", path, REPLY_MAX);
        rc = KVS_TOO_LARGE;
    } else if (c != CURLE_OK) {
        kvs_errf(err, errlen, "etcd unavailable: %s%s: %s", url,
                 e->n_endpoints > 1 ? " (and every other endpoint)" : "", curl_easy_strerror(c));
        rc = KVS_UNAVAILABLE;
    } else {
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &http);
        json_error_t jerr;
        json_t *j = b.len ? json_loadb(b.data, b.len, JSON_REJECT_DUPLICATES, &jerr) : NULL;
        if (http != 200) {
            rc = kvs_etcd_parse_error(http, j, err, errlen);
            json_decref(j);
        } else if (!json_is_object(j)) {
            kvs_errf(err, errlen, "etcd: reply to %s is not a JSON object", path);
            json_decref(j);
            rc = KVS_BAD_FORMAT;
        } else {
            *reply = j;
        }
    }
    free(b.data);
    return rc;
}

static int call(struct etcd *e, const char *path, json_t *body, json_t **reply, char *err,
                size_t errlen)
{
    if (body == NULL) {
        kvs_errf(err, errlen, "etcd: out of memory");
        return KVS_NO_MEMORY;
    }
    pthread_mutex_lock(&e->mu);
    int rc = post(e, e->curl, path, body, reply, err, errlen);
    pthread_mutex_unlock(&e->mu);
    json_decref(body);
    return rc;
}

static int bad_reply(const char *what, int rc, char *err, size_t errlen)
{
    if (rc == KVS_BAD_FORMAT) {
        kvs_errf(err, errlen, "etcd: malformed %s reply", what);
    } else if (rc == KVS_NO_MEMORY) {
        kvs_errf(err, errlen, "etcd: out of memory");
    }
    return rc;
}

/* ---- JSON builders ---- */

static json_t *b64_json(const void *p, size_t n)
{
    char *s = kvs_store_b64_encode(p, n);
    json_t *j = s ? json_string(s) : NULL;
    free(s);
    return j;
}

static json_t *i64_json(int64_t v)
{
    char s[32];
    snprintf(s, sizeof s, "%" PRId64, v);
    return json_string(s);
}

/* Set "key" (and "range_end" for a prefix) on obj. An empty prefix is every key:
 * key "\0", range_end "\0". */
static json_t *with_range(json_t *obj, const char *key, bool prefix)
{
    if (obj == NULL) {
        return NULL;
    }
    if (prefix && key[0] == '\0') {
        json_object_set_new(obj, "key", b64_json("", 1));
    } else {
        json_object_set_new(obj, "key", b64_json(key, strlen(key)));
    }
    if (prefix) {
        size_t n;
        char *end = kvs_store_prefix_end(key, &n);
        if (end == NULL) {
            json_decref(obj);
            return NULL;
        }
        json_object_set_new(obj, "range_end", b64_json(end, n));
        free(end);
    }
    return obj;
}

static json_t *put_json(const char *key, const void *value, size_t len, int64_t lease)
{
    json_t *o = with_range(json_object(), key, false);
    if (o != NULL) {
        json_object_set_new(o, "value", b64_json(value, len));
        if (lease != 0) {
            json_object_set_new(o, "lease", i64_json(lease));
        }
    }
    return o;
}

/* ---- the ops ---- */

#define ETCD(s) ((struct etcd *)(s))

static int t_put(kvs_store *s, const char *key, const void *value, size_t len, int64_t lease,
                 int64_t *revision, char *err, size_t errlen)
{
    json_t *reply;
    KVS_TRY(call(ETCD(s), "/v3/kv/put", put_json(key, value, len, lease), &reply, err, errlen));
    int rc = kvs_etcd_parse_revision(reply, revision);
    json_decref(reply);
    return bad_reply("put", rc, err, errlen);
}

static int range_with(struct etcd *e, CURL *h, const char *key, bool prefix,
                      struct kvs_store_range *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    json_t *body = with_range(json_object(), key, prefix), *reply;
    if (body == NULL) {
        return KVS_NO_MEMORY;
    }
    int rc = post(e, h, "/v3/kv/range", body, &reply, err, errlen);
    json_decref(body);
    if (rc < 0) {
        return rc;
    }
    rc = kvs_etcd_parse_range(reply, out);
    json_decref(reply);
    return bad_reply("range", rc, err, errlen);
}

static int t_range(kvs_store *s, const char *key, bool prefix, struct kvs_store_range *out,
                   char *err, size_t errlen)
{
    struct etcd *e = ETCD(s);
    pthread_mutex_lock(&e->mu);
    int rc = range_with(e, e->curl, key, prefix, out, err, errlen);
    pthread_mutex_unlock(&e->mu);
    return rc;
}

static int t_del(kvs_store *s, const char *key, bool prefix, int64_t *n_deleted, char *err,
                 size_t errlen)
{
    json_t *reply;
    KVS_TRY(call(ETCD(s), "/v3/kv/deleterange", with_range(json_object(), key, prefix), &reply, err,
                 errlen));
    int64_t rev;
    int rc = kvs_etcd_parse_delete(reply, n_deleted, &rev);
    json_decref(reply);
    return bad_reply("deleterange", rc, err, errlen);
}

static int t_compact(kvs_store *s, int64_t revision, char *err, size_t errlen)
{
    json_t *body = json_object(), *reply;
    if (body != NULL) {
        json_object_set_new(body, "revision", i64_json(revision));
    }
    KVS_TRY(call(ETCD(s), "/v3/kv/compaction", body, &reply, err, errlen));
    json_decref(reply);
    return KVS_OK;
}

static const char *const target_names[] = {"CREATE", "MOD", "VERSION", "VALUE"};
static const char *const result_names[] = {"EQUAL", "NOT_EQUAL", "LESS", "GREATER"};

static json_t *ops_json(const struct kvs_store_op *ops, size_t n)
{
    json_t *arr = json_array();
    for (size_t i = 0; arr != NULL && i < n; i++) {
        json_t *op;
        if (ops[i].type == KVS_STORE_OP_PUT) {
            op = json_pack("{so}", "request_put",
                           put_json(ops[i].key, ops[i].value, ops[i].value_len, ops[i].lease));
        } else {
            op = json_pack("{so}", "request_delete_range",
                           with_range(json_object(), ops[i].key, ops[i].prefix));
        }
        if (op == NULL || json_array_append_new(arr, op) < 0) {
            json_decref(arr);
            return NULL;
        }
    }
    return arr;
}

static int t_txn(kvs_store *s, const struct kvs_store_cmp *cmp, size_t n_cmp,
                 const struct kvs_store_op *ok, size_t n_ok, const struct kvs_store_op *fail,
                 size_t n_fail, bool *succeeded, int64_t *revision, char *err, size_t errlen)
{
    json_t *compares = json_array();
    for (size_t i = 0; compares != NULL && i < n_cmp; i++) {
        json_t *c = with_range(json_object(), cmp[i].key, false);
        if (c == NULL) {
            json_decref(compares);
            compares = NULL;
            break;
        }
        json_object_set_new(c, "target", json_string(target_names[cmp[i].target]));
        json_object_set_new(c, "result", json_string(result_names[cmp[i].result]));
        switch (cmp[i].target) {
        case KVS_STORE_CREATE:
            json_object_set_new(c, "create_revision", i64_json(cmp[i].number));
            break;
        case KVS_STORE_MOD:
            json_object_set_new(c, "mod_revision", i64_json(cmp[i].number));
            break;
        case KVS_STORE_VERSION:
            json_object_set_new(c, "version", i64_json(cmp[i].number));
            break;
        case KVS_STORE_VALUE:
            json_object_set_new(c, "value", b64_json(cmp[i].value, cmp[i].value_len));
            break;
        }
        json_array_append_new(compares, c);
    }
    json_t *body = compares ? json_pack("{sososo}", "compare", compares, "success",
                                        ops_json(ok, n_ok), "failure", ops_json(fail, n_fail))
                            : NULL;
    json_t *reply;
    KVS_TRY(call(ETCD(s), "/v3/kv/txn", body, &reply, err, errlen));
    int rc = kvs_etcd_parse_txn(reply, succeeded, revision);
    json_decref(reply);
    return bad_reply("txn", rc, err, errlen);
}

static int t_lease_grant(kvs_store *s, int64_t ttl_s, int64_t *id, int64_t *granted_ttl, char *err,
                         size_t errlen)
{
    json_t *reply;
    KVS_TRY(call(ETCD(s), "/v3/lease/grant", json_pack("{so}", "TTL", i64_json(ttl_s)), &reply, err,
                 errlen));
    int rc = kvs_etcd_parse_lease_grant(reply, id, granted_ttl);
    json_decref(reply);
    return bad_reply("lease grant", rc, err, errlen);
}

static int t_lease_keepalive(kvs_store *s, int64_t id, int64_t *ttl, char *err, size_t errlen)
{
    json_t *reply;
    KVS_TRY(call(ETCD(s), "/v3/lease/keepalive", json_pack("{so}", "ID", i64_json(id)), &reply, err,
                 errlen));
    int rc = kvs_etcd_parse_keepalive(reply, ttl);
    json_decref(reply);
    if (rc == KVS_NOT_FOUND) {
        kvs_errf(err, errlen, "etcd: lease %" PRId64 " not found (expired or revoked)", id);
        return rc;
    }
    return bad_reply("lease keepalive", rc, err, errlen);
}

static int t_lease_revoke(kvs_store *s, int64_t id, char *err, size_t errlen)
{
    json_t *reply;
    KVS_TRY(call(ETCD(s), "/v3/lease/revoke", json_pack("{so}", "ID", i64_json(id)), &reply, err,
                 errlen));
    json_decref(reply);
    return KVS_OK;
}

/* ---- watch: a thread per watch holding a streaming POST /v3/watch ---- */

struct etcd_watch {
    struct etcd *e;
    kvs_store_watch *w;
    pthread_t thread;
    atomic_bool stop;
    CURL *curl;
    int64_t next_rev;      /* the first revision not yet delivered */
    bool relist;           /* the last stream was cancelled for compaction */
    bool created;          /* the current stream is established */
    struct reply_buf line; /* bytes of the stream message being received */
    char err[256];
    struct etcd_watch *next; /* the store's list of live watches */
};

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

/* Handle one complete stream message. false = abort the stream. */
static bool on_watch_message(struct etcd_watch *ew, const char *text, size_t n)
{
    json_error_t jerr;
    json_t *j = json_loadb(text, n, JSON_REJECT_DUPLICATES, &jerr);
    struct kvs_etcd_watch_msg msg;
    int rc = j ? kvs_etcd_parse_watch(j, &msg, ew->err, sizeof ew->err) : KVS_BAD_FORMAT;
    json_decref(j);
    if (rc < 0) {
        if (rc == KVS_BAD_FORMAT) {
            KVS_WARN("etcd watch on '%s': malformed stream message; reconnecting", ew->w->prefix);
        } else {
            KVS_WARN("etcd watch on '%s': %s; reconnecting", ew->w->prefix, ew->err);
        }
        kvs_etcd_watch_msg_free(&msg);
        return false;
    }
    if (msg.created) {
        ew->created = true;
        kvs_store_watch_set_connected(ew->w, true);
    }
    for (size_t i = 0; i < msg.n_events; i++) {
        int64_t rev = msg.events[i].kv.mod_revision;
        if (rev < ew->next_rev) {
            continue; /* already delivered before a reconnect */
        }
        kvs_store_watch_push(ew->w, &msg.events[i]);
    }
    /* etcd sends a revision's events in one message: go on after the last one. */
    if (msg.n_events > 0 && msg.events[msg.n_events - 1].kv.mod_revision >= ew->next_rev) {
        ew->next_rev = msg.events[msg.n_events - 1].kv.mod_revision + 1;
    }
    bool go_on = !msg.canceled;
    if (msg.compact_revision > 0) {
        KVS_INFO("etcd watch on '%s': revision %" PRId64 " compacted (at %" PRId64 "); re-listing",
                 ew->w->prefix, ew->next_rev, msg.compact_revision);
        ew->relist = true;
    }
    kvs_etcd_watch_msg_free(&msg);
    return go_on;
}

static size_t on_watch_bytes(char *p, size_t size, size_t nmemb, void *ud)
{
    struct etcd_watch *ew = ud;
    size_t add = size * nmemb;
    if (on_reply(p, 1, add, &ew->line) != add) {
        KVS_WARN("etcd watch on '%s': a stream message over %u bytes; reconnecting", ew->w->prefix,
                 WATCH_MSG_MAX);
        return CURL_WRITEFUNC_ERROR;
    }
    /* The gateway ends every message with a newline. */
    char *nl;
    while ((nl = memchr(ew->line.data, '\n', ew->line.len)) != NULL) {
        size_t n = (size_t)(nl - ew->line.data);
        bool ok = n == 0 || on_watch_message(ew, ew->line.data, n);
        memmove(ew->line.data, nl + 1, ew->line.len - n - 1);
        ew->line.len -= n + 1;
        if (!ok) {
            return CURL_WRITEFUNC_ERROR;
        }
    }
    return add;
}

static int on_watch_progress(void *ud, curl_off_t a, curl_off_t b, curl_off_t c, curl_off_t d)
{
    struct etcd_watch *ew = ud;
    return atomic_load(&ew->stop) ? 1 : 0;
}

/* Re-list the prefix after a compaction: RESET, a PUT per key, go on after its revision. */
static int relist(struct etcd_watch *ew)
{
    struct kvs_store_range r;
    int rc = range_with(ew->e, ew->curl, ew->w->prefix, true, &r, ew->err, sizeof ew->err);
    if (rc < 0) {
        kvs_store_range_free(&r);
        return rc;
    }
    struct kvs_store_event ev = {.type = KVS_STORE_RESET};
    struct kvs_store_kv none = {.key = ew->w->prefix, .value = "", .mod_revision = r.revision};
    rc = kvs_store_kv_copy(&ev.kv, &none);
    if (rc == KVS_OK) {
        kvs_store_watch_push(ew->w, &ev);
        for (size_t i = 0; i < r.n; i++) {
            ev = (struct kvs_store_event){.type = KVS_STORE_PUT, .kv = r.kvs[i]};
            memset(&r.kvs[i], 0, sizeof r.kvs[i]);
            kvs_store_watch_push(ew->w, &ev);
        }
        ew->next_rev = r.revision + 1;
        ew->relist = false;
    }
    kvs_store_range_free(&r);
    return rc;
}

static void stream_once(struct etcd_watch *ew)
{
    struct etcd *e = ew->e;
    json_t *req = with_range(json_object(), ew->w->prefix, true);
    if (req == NULL) {
        return;
    }
    json_object_set_new(req, "start_revision", i64_json(ew->next_rev));
    json_t *body = json_pack("{so}", "create_request", req);
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    if (text == NULL) {
        return;
    }
    char url[512];
    snprintf(url, sizeof url, "%s/v3/watch", e->endpoints[atomic_load(&e->current)]);
    ew->line.len = 0;
    ew->created = false;
    CURL *h = ew->curl;
    curl_easy_reset(h);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, text);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, e->headers);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_watch_bytes);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, ew);
    curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_watch_progress);
    curl_easy_setopt(h, CURLOPT_XFERINFODATA, ew);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long)e->timeout_ms);
    curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    CURLcode c = curl_easy_perform(h);
    free(text);
    if (!atomic_load(&ew->stop) && !ew->relist) {
        KVS_DEBUG("etcd watch on '%s' ended: %s", ew->w->prefix, curl_easy_strerror(c));
        if (transport_error(c)) {
            /* Try the next endpoint on the next round. */
            atomic_store(&e->current, (atomic_load(&e->current) + 1) % e->n_endpoints);
        }
    }
}

static void *watch_main(void *arg)
{
    struct etcd_watch *ew = arg;
    int backoff = BACKOFF_MIN_MS;
    while (!atomic_load(&ew->stop)) {
        if (ew->relist && relist(ew) < 0) {
            KVS_WARN("etcd watch on '%s': re-list failed: %s", ew->w->prefix, ew->err);
        } else if (!ew->relist) {
            stream_once(ew);
            kvs_store_watch_set_connected(ew->w, false);
            if (ew->created) {
                backoff = BACKOFF_MIN_MS; /* it worked for a while: retry soon */
            }
            if (ew->relist) {
                continue;
            }
        }
        for (int t = 0; t < backoff && !atomic_load(&ew->stop); t += 50) {
            sleep_ms(50);
        }
        backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
    }
    return NULL;
}

/* Stop the thread and free ew. Called with e->watches_mu held, ew already off the list. */
static void watch_free(struct etcd_watch *ew)
{
    atomic_store(&ew->stop, true);
    pthread_join(ew->thread, NULL);
    curl_easy_cleanup(ew->curl);
    free(ew->line.data);
    ew->w->impl = NULL;
    ew->w->impl_stop = NULL;
    free(ew);
}

static void t_watch_stop(kvs_store_watch *w)
{
    struct etcd_watch *ew = w->impl;
    struct etcd *e = ew->e;
    pthread_mutex_lock(&e->watches_mu);
    for (struct etcd_watch **p = &e->watches; *p != NULL; p = &(*p)->next) {
        if (*p == ew) {
            *p = ew->next;
            break;
        }
    }
    watch_free(ew);
    pthread_mutex_unlock(&e->watches_mu);
}

static int t_watch_start(kvs_store *s, kvs_store_watch *w, int64_t start_rev, char *err,
                         size_t errlen)
{
    struct etcd *e = ETCD(s);
    struct etcd_watch *ew = calloc(1, sizeof *ew);
    if (ew == NULL || (ew->curl = curl_easy_init()) == NULL) {
        free(ew);
        kvs_errf(err, errlen, "etcd: out of memory");
        return KVS_NO_MEMORY;
    }
    ew->e = e;
    ew->w = w;
    ew->line.limit = WATCH_MSG_MAX;
    ew->next_rev = start_rev;
    if (start_rev == 0) {
        /* "From now": pin now to a revision so that a reconnect loses nothing. */
        struct kvs_store_range r;
        int rc = range_with(e, ew->curl, "/", false, &r, err, errlen);
        ew->next_rev = r.revision + 1;
        kvs_store_range_free(&r);
        if (rc < 0) {
            curl_easy_cleanup(ew->curl);
            free(ew);
            return rc;
        }
    }
    w->impl = ew;
    if (pthread_create(&ew->thread, NULL, watch_main, ew) != 0) {
        curl_easy_cleanup(ew->curl);
        free(ew);
        w->impl = NULL;
        kvs_errf(err, errlen, "etcd: cannot start the watch thread");
        return KVS_NO_MEMORY;
    }
    w->impl_stop = t_watch_stop;
    pthread_mutex_lock(&e->watches_mu);
    ew->next = e->watches;
    e->watches = ew;
    pthread_mutex_unlock(&e->watches_mu);
    return KVS_OK;
}

/* ---- open / destroy ---- */

static void t_destroy(kvs_store *s)
{
    struct etcd *e = ETCD(s);
    /* Watches still open (a caller that broke the contract, or a failed test): stop their
     * threads now, so nothing runs on freed memory; the watches only drain what they have. */
    pthread_mutex_lock(&e->watches_mu);
    while (e->watches != NULL) {
        struct etcd_watch *ew = e->watches;
        e->watches = ew->next;
        kvs_store_watch *w = ew->w;
        watch_free(ew);
        kvs_store_watch_fail(w);
    }
    pthread_mutex_unlock(&e->watches_mu);
    pthread_mutex_destroy(&e->watches_mu);
    curl_easy_cleanup(e->curl);
    curl_slist_free_all(e->headers);
    for (int i = 0; i < e->n_endpoints; i++) {
        free(e->endpoints[i]);
    }
    pthread_mutex_destroy(&e->mu);
    free(e);
}

static const struct kvs_store_ops etcd_ops = {
    .kind = "etcd",
    .destroy = t_destroy,
    .put = t_put,
    .range = t_range,
    .del = t_del,
    .compact = t_compact,
    .txn = t_txn,
    .lease_grant = t_lease_grant,
    .lease_keepalive = t_lease_keepalive,
    .lease_revoke = t_lease_revoke,
    .watch_start = t_watch_start,
};

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static void curl_init_once(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
}

kvs_store *kvs_store_etcd_open(const char *endpoints, int timeout_ms, char *err, size_t errlen)
{
    pthread_once(&curl_once, curl_init_once);
    struct etcd *e = calloc(1, sizeof *e);
    if (e == NULL) {
        kvs_errf(err, errlen, "etcd: out of memory");
        return NULL;
    }
    e->base.ops = &etcd_ops;
    e->timeout_ms = timeout_ms;
    pthread_mutex_init(&e->mu, NULL);
    pthread_mutex_init(&e->watches_mu, NULL);
    const char *p = endpoints;
    while (*p != '\0') {
        const char *comma = strchr(p, ',');
        size_t n = comma ? (size_t)(comma - p) : strlen(p);
        while (n > 0 && p[n - 1] == '/') {
            n--;
        }
        if (e->n_endpoints == MAX_ENDPOINTS || n < 8 || n > 400 ||
            (strncmp(p, "http://", 7) != 0 && strncmp(p, "https://", 8) != 0)) {
            kvs_errf(err, errlen, "etcd: bad endpoint list '%s' (at most %d http:// URLs)",
                     endpoints, MAX_ENDPOINTS);
            t_destroy(&e->base);
            return NULL;
        }
        e->endpoints[e->n_endpoints] = strndup(p, n);
        if (e->endpoints[e->n_endpoints++] == NULL) {
            kvs_errf(err, errlen, "etcd: out of memory");
            t_destroy(&e->base);
            return NULL;
        }
        p = comma ? comma + 1 : p + strlen(p);
    }
    e->curl = curl_easy_init();
    e->headers = curl_slist_append(NULL, "Content-Type: application/json");
    if (e->n_endpoints == 0 || e->curl == NULL || e->headers == NULL) {
        kvs_errf(err, errlen, "etcd: no endpoint in '%s' or out of memory", endpoints);
        t_destroy(&e->base);
        return NULL;
    }
    return &e->base;
}
