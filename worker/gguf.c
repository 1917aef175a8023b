/* GGUF reader: parse and validate the whole header of a memory-mapped file once, then serve
 * read-only views. Every length read from the file is checked against the bytes that remain
 * before it is used, and every allocation is proportional to a count already proven to fit
 * in the file, so a hostile file costs at most a few times its own size in memory. */
#include "worker/gguf.h"

#include "common/status.h"
#include "kernels/dtype.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAGIC 0x46554747u /* "GGUF" read as a little-endian u32 */
#define GGUF_DEFAULT_ALIGNMENT 32u
#define GGUF_MAX_COUNT (1u << 24) /* n_kv, n_tensors: far above any real model */

/* Smallest possible encodings, used to bound counts by the bytes that remain. */
#define GGUF_MIN_KV_BYTES 13     /* u64 key length + u32 type + 1-byte value */
#define GGUF_MIN_TENSOR_BYTES 32 /* u64 name length + u32 n_dims + u64 ne + u32 type + u64 off */

struct gguf_kv {
    const char *key;         /* NUL-terminated copy in g->names */
    uint64_t key_len;        /* bytes, without the NUL */
    enum kvs_gguf_type type; /* value type */
    const uint8_t *val;      /* scalar value, or string bytes, in the mapping */
    uint64_t len;            /* STRING: bytes */
    kvs_gguf_arr arr;        /* ARRAY only; arr.str_off owned here for STRING arrays */
};

struct kvs_gguf {
    const uint8_t *base;      /* file bytes: the mapping or the caller's buffer */
    size_t size;              /* bytes */
    void *map;                /* mmap'ed region (NULL for open_memory) */
    uint32_t version;         /* 2 or 3 */
    uint32_t alignment;       /* bytes, power of two */
    uint64_t data_offset;     /* start of the tensor data section, bytes from base */
    uint64_t n_kv;            /* metadata entries */
    struct gguf_kv *kvs;      /* [n_kv] */
    uint64_t n_tensors;       /* tensors */
    kvs_gguf_tensor *tensors; /* [n_tensors] */
    char *names;              /* arena: all keys and tensor names, NUL-terminated */
    uint32_t *kv_index;       /* hash slots [kv_cap]: kv index + 1, 0 = empty */
    uint64_t kv_cap;          /* power of two */
    uint32_t *tensor_index;   /* hash slots [tensor_cap]: tensor index + 1, 0 = empty */
    uint64_t tensor_cap;      /* power of two */
};

/* ---- name tables ---- */

static const char *const gguf_type_names[] = {
    [KVS_GGUF_UINT8] = "uint8",     [KVS_GGUF_INT8] = "int8",     [KVS_GGUF_UINT16] = "uint16",
    [KVS_GGUF_INT16] = "int16",     [KVS_GGUF_UINT32] = "uint32", [KVS_GGUF_INT32] = "int32",
    [KVS_GGUF_FLOAT32] = "float32", [KVS_GGUF_BOOL] = "bool",     [KVS_GGUF_STRING] = "string",
    [KVS_GGUF_ARRAY] = "array",     [KVS_GGUF_UINT64] = "uint64", [KVS_GGUF_INT64] = "int64",
    [KVS_GGUF_FLOAT64] = "float64",
};

const char *kvs_gguf_type_name(enum kvs_gguf_type t)
{
    if ((unsigned)t < sizeof gguf_type_names / sizeof gguf_type_names[0]) {
        return gguf_type_names[t];
    }
    return "unknown";
}

/* ggml type ids we do not load, named in error messages so the user knows what they have. */
static const char *ggml_type_name(uint32_t type)
{
    static const char *const names[] = {
        "F32",      "F16",      "Q4_0",    "Q4_1",  "Q4_2",   "Q4_3",  "Q5_0",  "Q5_1",
        "Q8_0",     "Q8_1",     "Q2_K",    "Q3_K",  "Q4_K",   "Q5_K",  "Q6_K",  "Q8_K",
        "IQ2_XXS",  "IQ2_XS",   "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS",
        "I8",       "I16",      "I32",     "I64",   "F64",    "IQ1_M", "BF16",  "Q4_0_4_4",
        "Q4_0_4_8", "Q4_0_8_8", "TQ1_0",   "TQ2_0",
    };
    if (type < sizeof names / sizeof names[0]) {
        return names[type];
    }
    return "unknown";
}

/* Bytes of one scalar of type t; 0 for STRING, ARRAY and unknown types. */
static uint64_t scalar_size(uint32_t t)
{
    switch (t) {
    case KVS_GGUF_UINT8:
    case KVS_GGUF_INT8:
    case KVS_GGUF_BOOL:
        return 1;
    case KVS_GGUF_UINT16:
    case KVS_GGUF_INT16:
        return 2;
    case KVS_GGUF_UINT32:
    case KVS_GGUF_INT32:
    case KVS_GGUF_FLOAT32:
        return 4;
    case KVS_GGUF_UINT64:
    case KVS_GGUF_INT64:
    case KVS_GGUF_FLOAT64:
        return 8;
    default:
        return 0;
    }
}

/* ---- little-endian loads (the mapping may be unaligned) ---- */

static uint16_t ld16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t ld32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint64_t ld64(const uint8_t *p)
{
    return (uint64_t)ld32(p) | ((uint64_t)ld32(p + 4) << 32);
}

static float ldf32(const uint8_t *p)
{
    uint32_t u = ld32(p);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static double ldf64(const uint8_t *p)
{
    uint64_t u = ld64(p);
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

/* ---- errors ---- */

/* A printable, bounded rendering of a name from the file (for error messages). */
static const char *printable(char *buf, size_t bufsz, const char *s, uint64_t len)
{
    size_t max = bufsz - 4;
    size_t n = 0;
    for (uint64_t i = 0; i < len && n < max; i++) {
        unsigned char c = (unsigned char)s[i];
        buf[n++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
    }
    if (len > max) {
        memcpy(buf + n, "...", 3);
        n += 3;
    }
    buf[n] = '\0';
    return buf;
}

/* ---- the cursor ---- */

struct reader {
    const uint8_t *p; /* file bytes */
    size_t size;      /* bytes */
    size_t pos;       /* next byte to read */
    char *err;
    size_t errlen;
};

static size_t remaining(const struct reader *r)
{
    return r->size - r->pos;
}

/* Check that n more bytes exist; on failure write a message naming `what`. */
static bool need(struct reader *r, uint64_t n, const char *what)
{
    if (n > remaining(r)) {
        kvs_errf(r->err, r->errlen,
               "file truncated: %s at offset %zu needs %llu bytes but only %zu remain "
               "(file size %zu)",
               what, r->pos, (unsigned long long)n, remaining(r), r->size);
        return false;
    }
    return true;
}

static bool rd_u32(struct reader *r, uint32_t *v, const char *what)
{
    if (!need(r, 4, what)) {
        return false;
    }
    *v = ld32(r->p + r->pos);
    r->pos += 4;
    return true;
}

static bool rd_u64(struct reader *r, uint64_t *v, const char *what)
{
    if (!need(r, 8, what)) {
        return false;
    }
    *v = ld64(r->p + r->pos);
    r->pos += 8;
    return true;
}

/* A string: u64 length + bytes. On success *s points into the file. */
static bool rd_str(struct reader *r, const char **s, uint64_t *len, const char *what)
{
    size_t at = r->pos;
    if (!rd_u64(r, len, what)) {
        return false;
    }
    if (*len > remaining(r)) {
        kvs_errf(r->err, r->errlen,
               "%s at offset %zu: string length %llu exceeds the %zu bytes left in the file", what,
               at, (unsigned long long)*len, remaining(r));
        return false;
    }
    *s = (const char *)(r->p + r->pos);
    r->pos += (size_t)*len;
    return true;
}

/* ---- hash index over (ptr, len) names ---- */

static uint64_t hash_name(const char *s, uint64_t len)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (uint64_t i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

static uint64_t index_cap(uint64_t n)
{
    uint64_t cap = 16;
    while (cap < 2 * n) {
        cap *= 2;
    }
    return cap;
}

typedef const char *(*name_at_fn)(const kvs_gguf *g, uint64_t i, uint64_t *len);

static const char *kv_name_at(const kvs_gguf *g, uint64_t i, uint64_t *len)
{
    *len = g->kvs[i].key_len;
    return g->kvs[i].key;
}

static const char *tensor_name_at(const kvs_gguf *g, uint64_t i, uint64_t *len)
{
    *len = strlen(g->tensors[i].name);
    return g->tensors[i].name;
}

/* Find name in the index: returns the entry index, or -1. */
static int64_t index_find(const kvs_gguf *g, const uint32_t *slots, uint64_t cap,
                          name_at_fn name_at, const char *s, uint64_t len)
{
    if (slots == NULL) {
        return -1;
    }
    for (uint64_t h = hash_name(s, len) & (cap - 1);; h = (h + 1) & (cap - 1)) {
        uint32_t v = slots[h];
        if (v == 0) {
            return -1;
        }
        uint64_t nl;
        const char *n = name_at(g, v - 1, &nl);
        if (nl == len && memcmp(n, s, len) == 0) {
            return (int64_t)(v - 1);
        }
    }
}

/* Insert entry i; returns false if an entry with the same name is present. */
static bool index_insert(const kvs_gguf *g, uint32_t *slots, uint64_t cap, name_at_fn name_at,
                         uint64_t i)
{
    uint64_t len;
    const char *s = name_at(g, i, &len);
    for (uint64_t h = hash_name(s, len) & (cap - 1);; h = (h + 1) & (cap - 1)) {
        uint32_t v = slots[h];
        if (v == 0) {
            slots[h] = (uint32_t)(i + 1);
            return true;
        }
        uint64_t nl;
        const char *n = name_at(g, v - 1, &nl);
        if (nl == len && memcmp(n, s, len) == 0) {
            return false;
        }
    }
}

/* ---- parsing ---- */

struct name_view {
    const char *ptr; /* in the file */
    uint64_t len;    /* bytes */
};

static int parse_header(struct reader *r, kvs_gguf *g)
{
    uint32_t magic;
    if (!rd_u32(r, &magic, "magic")) {
        return KVS_BAD_FORMAT;
    }
    if (magic != GGUF_MAGIC) {
        char m[8];
        kvs_errf(r->err, r->errlen, "not a GGUF file (magic '%s', expected 'GGUF')",
               printable(m, sizeof m, (const char *)r->p, 4));
        return KVS_BAD_FORMAT;
    }
    if (!rd_u32(r, &g->version, "version")) {
        return KVS_BAD_FORMAT;
    }
    if (g->version == 1) {
        kvs_errf(r->err, r->errlen, "GGUF version 1 is not supported (need 2 or 3)");
        return KVS_UNSUPPORTED;
    }
    if (g->version != 2 && g->version != 3) {
        bool swapped = (g->version & 0xffffu) == 0 && g->version != 0;
        kvs_errf(r->err, r->errlen, "GGUF version %u is not supported (need 2 or 3)%s", g->version,
               swapped ? "; big-endian files are not supported" : "");
        return KVS_UNSUPPORTED;
    }
    if (!rd_u64(r, &g->n_tensors, "tensor count") || !rd_u64(r, &g->n_kv, "metadata count")) {
        return KVS_BAD_FORMAT;
    }
    size_t left = remaining(r);
    if (g->n_kv > left / GGUF_MIN_KV_BYTES) {
        kvs_errf(r->err, r->errlen,
               "metadata count %llu cannot fit in the %zu bytes left in the file "
               "(at least %d bytes each)",
               (unsigned long long)g->n_kv, left, GGUF_MIN_KV_BYTES);
        return KVS_BAD_FORMAT;
    }
    if (g->n_tensors > left / GGUF_MIN_TENSOR_BYTES ||
        g->n_kv * GGUF_MIN_KV_BYTES + g->n_tensors * GGUF_MIN_TENSOR_BYTES > left) {
        kvs_errf(r->err, r->errlen,
               "tensor count %llu cannot fit in the %zu bytes left in the file "
               "(at least %d bytes each)",
               (unsigned long long)g->n_tensors, left, GGUF_MIN_TENSOR_BYTES);
        return KVS_BAD_FORMAT;
    }
    if (g->n_kv > GGUF_MAX_COUNT || g->n_tensors > GGUF_MAX_COUNT) {
        kvs_errf(r->err, r->errlen, "%llu metadata entries and %llu tensors exceed the limit %u",
               (unsigned long long)g->n_kv, (unsigned long long)g->n_tensors, GGUF_MAX_COUNT);
        return KVS_UNSUPPORTED;
    }
    return KVS_OK;
}

/* Parse one value of type `type` at r->pos into kv (key already set). */
static int parse_value(struct reader *r, struct gguf_kv *kv, const char *key)
{
    char what[160];
    if (kv->type == KVS_GGUF_STRING) {
        snprintf(what, sizeof what, "value of key '%s'", key);
        const char *s;
        if (!rd_str(r, &s, &kv->len, what)) {
            return KVS_BAD_FORMAT;
        }
        kv->val = (const uint8_t *)s;
        return KVS_OK;
    }
    if (kv->type != KVS_GGUF_ARRAY) {
        uint64_t sz = scalar_size(kv->type);
        if (sz == 0) {
            kvs_errf(r->err, r->errlen, "key '%s' has unknown value type %u", key,
                   (unsigned)kv->type);
            return KVS_BAD_FORMAT;
        }
        snprintf(what, sizeof what, "value of key '%s'", key);
        if (!need(r, sz, what)) {
            return KVS_BAD_FORMAT;
        }
        kv->val = r->p + r->pos;
        if (kv->type == KVS_GGUF_BOOL && kv->val[0] > 1) {
            kvs_errf(r->err, r->errlen, "key '%s': bool value %u is not 0 or 1", key,
                   (unsigned)kv->val[0]);
            return KVS_BAD_FORMAT;
        }
        r->pos += (size_t)sz;
        return KVS_OK;
    }

    /* array: u32 element type + u64 count + elements */
    uint32_t et;
    uint64_t n;
    snprintf(what, sizeof what, "array header of key '%s'", key);
    if (!rd_u32(r, &et, what) || !rd_u64(r, &n, what)) {
        return KVS_BAD_FORMAT;
    }
    if (et == KVS_GGUF_ARRAY) {
        kvs_errf(r->err, r->errlen, "key '%s': arrays of arrays are not supported", key);
        return KVS_UNSUPPORTED;
    }
    kv->arr.type = (enum kvs_gguf_type)et;
    kv->arr.n = n;
    kv->arr.data = r->p + r->pos;
    if (et == KVS_GGUF_STRING) {
        if (n > remaining(r) / 8) {
            kvs_errf(r->err, r->errlen,
                   "key '%s': array of %llu strings cannot fit in the %zu bytes left in "
                   "the file",
                   key, (unsigned long long)n, remaining(r));
            return KVS_BAD_FORMAT;
        }
        uint64_t *off = malloc((size_t)(n > 0 ? n : 1) * sizeof *off);
        if (off == NULL) {
            kvs_errf(r->err, r->errlen, "out of memory for the %llu strings of key '%s'",
                   (unsigned long long)n, key);
            return KVS_NO_MEMORY;
        }
        kv->arr.str_off = off;
        size_t start = r->pos;
        for (uint64_t i = 0; i < n; i++) {
            off[i] = r->pos - start;
            const char *s;
            uint64_t len;
            snprintf(what, sizeof what, "string %llu of key '%s'", (unsigned long long)i, key);
            if (!rd_str(r, &s, &len, what)) {
                return KVS_BAD_FORMAT;
            }
        }
        return KVS_OK;
    }
    uint64_t sz = scalar_size(et);
    if (sz == 0) {
        kvs_errf(r->err, r->errlen, "key '%s': array has unknown element type %u", key, et);
        return KVS_BAD_FORMAT;
    }
    if (n > remaining(r) / sz) {
        kvs_errf(r->err, r->errlen,
               "key '%s': array of %llu %s values (%llu bytes each) exceeds the %zu bytes "
               "left in the file",
               key, (unsigned long long)n, kvs_gguf_type_name((enum kvs_gguf_type)et),
               (unsigned long long)sz, remaining(r));
        return KVS_BAD_FORMAT;
    }
    if (et == KVS_GGUF_BOOL) {
        for (uint64_t i = 0; i < n; i++) {
            if (r->p[r->pos + i] > 1) {
                kvs_errf(r->err, r->errlen, "key '%s': bool element %llu is %u, not 0 or 1", key,
                       (unsigned long long)i, (unsigned)r->p[r->pos + i]);
                return KVS_BAD_FORMAT;
            }
        }
    }
    r->pos += (size_t)(n * sz);
    return KVS_OK;
}

static int parse_kvs(struct reader *r, kvs_gguf *g, struct name_view *keys)
{
    for (uint64_t i = 0; i < g->n_kv; i++) {
        struct gguf_kv *kv = &g->kvs[i];
        char what[64], name[100];
        snprintf(what, sizeof what, "key of metadata entry %llu", (unsigned long long)i);
        if (!rd_str(r, &keys[i].ptr, &keys[i].len, what)) {
            return KVS_BAD_FORMAT;
        }
        printable(name, sizeof name, keys[i].ptr, keys[i].len);
        if (keys[i].len == 0) {
            kvs_errf(r->err, r->errlen, "metadata entry %llu has an empty key",
                   (unsigned long long)i);
            return KVS_BAD_FORMAT;
        }
        if (memchr(keys[i].ptr, '\0', (size_t)keys[i].len) != NULL) {
            kvs_errf(r->err, r->errlen, "key '%s' contains a NUL byte", name);
            return KVS_BAD_FORMAT;
        }
        uint32_t type;
        snprintf(what, sizeof what, "type of key '%.40s'", name);
        if (!rd_u32(r, &type, what)) {
            return KVS_BAD_FORMAT;
        }
        if (type > KVS_GGUF_FLOAT64) {
            kvs_errf(r->err, r->errlen, "key '%s' has unknown value type %u", name, type);
            return KVS_BAD_FORMAT;
        }
        kv->type = (enum kvs_gguf_type)type;
        kv->key = keys[i].ptr; /* file view until the names arena is built */
        kv->key_len = keys[i].len;
        int rc = parse_value(r, kv, name);
        if (rc < 0) {
            return rc;
        }
    }
    return KVS_OK;
}

static int parse_tensor_infos(struct reader *r, kvs_gguf *g, struct name_view *names,
                              uint64_t *offsets)
{
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        kvs_gguf_tensor *t = &g->tensors[i];
        char what[160], name[100];
        snprintf(what, sizeof what, "name of tensor %llu", (unsigned long long)i);
        if (!rd_str(r, &names[i].ptr, &names[i].len, what)) {
            return KVS_BAD_FORMAT;
        }
        printable(name, sizeof name, names[i].ptr, names[i].len);
        if (names[i].len == 0) {
            kvs_errf(r->err, r->errlen, "tensor %llu has an empty name", (unsigned long long)i);
            return KVS_BAD_FORMAT;
        }
        if (memchr(names[i].ptr, '\0', (size_t)names[i].len) != NULL) {
            kvs_errf(r->err, r->errlen, "tensor name '%s' contains a NUL byte", name);
            return KVS_BAD_FORMAT;
        }
        snprintf(what, sizeof what, "info of tensor '%s'", name);
        if (!rd_u32(r, &t->n_dims, what)) {
            return KVS_BAD_FORMAT;
        }
        if (t->n_dims < 1 || t->n_dims > KVS_GGUF_MAX_DIMS) {
            kvs_errf(r->err, r->errlen, "tensor '%s' has %u dimensions (allowed 1..%d)", name,
                   t->n_dims, KVS_GGUF_MAX_DIMS);
            return KVS_BAD_FORMAT;
        }
        t->n_elem = 1;
        bool overflow = false;
        for (uint32_t d = 0; d < KVS_GGUF_MAX_DIMS; d++) {
            t->ne[d] = 1;
        }
        for (uint32_t d = 0; d < t->n_dims; d++) {
            if (!rd_u64(r, &t->ne[d], what)) {
                return KVS_BAD_FORMAT;
            }
        }
        for (uint32_t d = 0; d < t->n_dims; d++) {
            if (t->ne[d] == 0) {
                kvs_errf(r->err, r->errlen, "tensor '%s' has a zero-sized dimension", name);
                return KVS_BAD_FORMAT;
            }
            if (t->ne[d] > (uint64_t)INT64_MAX || t->n_elem > (uint64_t)INT64_MAX / t->ne[d]) {
                overflow = true;
            } else {
                t->n_elem *= t->ne[d];
            }
        }
        if (overflow) {
            kvs_errf(r->err, r->errlen, "tensor '%s': the element count overflows", name);
            return KVS_BAD_FORMAT;
        }
        uint64_t off;
        if (!rd_u32(r, &t->type, what) || !rd_u64(r, &off, what)) {
            return KVS_BAD_FORMAT;
        }
        if (!kvs_dtype_is_supported(t->type)) {
            kvs_errf(r->err, r->errlen,
                   "tensor '%s' has unsupported type %u (%s); supported: F32, F16, BF16, "
                   "Q8_0, Q4_0, Q4_1",
                   name, t->type, ggml_type_name(t->type));
            return KVS_UNSUPPORTED;
        }
        uint64_t row_bytes;
        if (!kvs_dtype_row_bytes(t->type, t->ne[0], &row_bytes)) {
            kvs_errf(r->err, r->errlen,
                   "tensor '%s': row length %llu is not a multiple of the %s block size %u", name,
                   (unsigned long long)t->ne[0], kvs_dtype_name(t->type),
                   kvs_dtype_block_elems(t->type));
            return KVS_BAD_FORMAT;
        }
        uint64_t n_rows = t->n_elem / t->ne[0];
        if (row_bytes != 0 && n_rows > UINT64_MAX / row_bytes) {
            kvs_errf(r->err, r->errlen, "tensor '%s': the byte size overflows", name);
            return KVS_BAD_FORMAT;
        }
        t->nbytes = row_bytes * n_rows;
        t->data = NULL; /* set by place_data once the data section's start is known */
        offsets[i] = off;
    }
    return KVS_OK;
}

/* Copy every key and tensor name into one arena as NUL-terminated strings. */
static int build_names(kvs_gguf *g, const struct name_view *tnames, char *err, size_t errlen)
{
    uint64_t total = 1;
    for (uint64_t i = 0; i < g->n_kv; i++) {
        total += g->kvs[i].key_len + 1; /* names are disjoint file ranges: no overflow */
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        total += tnames[i].len + 1;
    }
    g->names = malloc((size_t)total);
    if (g->names == NULL) {
        kvs_errf(err, errlen, "out of memory for %llu bytes of names", (unsigned long long)total);
        return KVS_NO_MEMORY;
    }
    char *p = g->names;
    for (uint64_t i = 0; i < g->n_kv; i++) {
        memcpy(p, g->kvs[i].key, (size_t)g->kvs[i].key_len);
        p[g->kvs[i].key_len] = '\0';
        g->kvs[i].key = p;
        p += g->kvs[i].key_len + 1;
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        memcpy(p, tnames[i].ptr, (size_t)tnames[i].len);
        p[tnames[i].len] = '\0';
        g->tensors[i].name = p;
        p += tnames[i].len + 1;
    }
    return KVS_OK;
}

static int build_indexes(kvs_gguf *g, char *err, size_t errlen)
{
    char name[100];
    g->kv_cap = index_cap(g->n_kv);
    g->tensor_cap = index_cap(g->n_tensors);
    g->kv_index = calloc((size_t)g->kv_cap, sizeof *g->kv_index);
    g->tensor_index = calloc((size_t)g->tensor_cap, sizeof *g->tensor_index);
    if (g->kv_index == NULL || g->tensor_index == NULL) {
        kvs_errf(err, errlen, "out of memory for the name indexes");
        return KVS_NO_MEMORY;
    }
    for (uint64_t i = 0; i < g->n_kv; i++) {
        if (!index_insert(g, g->kv_index, g->kv_cap, kv_name_at, i)) {
            kvs_errf(err, errlen, "duplicate key '%s'",
                   printable(name, sizeof name, g->kvs[i].key, g->kvs[i].key_len));
            return KVS_BAD_FORMAT;
        }
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        if (!index_insert(g, g->tensor_index, g->tensor_cap, tensor_name_at, i)) {
            const char *t = g->tensors[i].name;
            kvs_errf(err, errlen, "duplicate tensor name '%s'",
                   printable(name, sizeof name, t, strlen(t)));
            return KVS_BAD_FORMAT;
        }
    }
    return KVS_OK;
}

static int read_alignment(kvs_gguf *g, char *err, size_t errlen)
{
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    int64_t i = kvs_gguf_find_key(g, "general.alignment");
    if (i < 0) {
        return KVS_OK;
    }
    const struct gguf_kv *kv = &g->kvs[i];
    if (kv->type != KVS_GGUF_UINT32) {
        kvs_errf(err, errlen, "general.alignment has type %s, expected uint32",
               kvs_gguf_type_name(kv->type));
        return KVS_BAD_FORMAT;
    }
    uint32_t a = ld32(kv->val);
    if (a == 0 || (a & (a - 1)) != 0) {
        kvs_errf(err, errlen, "general.alignment %u is not a power of two", a);
        return KVS_BAD_FORMAT;
    }
    g->alignment = a;
    return KVS_OK;
}

/* Find the data section after the tensor infos and point every tensor into it. */
static int place_data(kvs_gguf *g, size_t info_end, const uint64_t *offsets, char *err,
                      size_t errlen)
{
    char name[100];
    uint64_t a = g->alignment;
    uint64_t start = ((uint64_t)info_end + a - 1) / a * a; /* info_end, a < 2^32: no overflow */
    g->data_offset = start;
    if (g->n_tensors == 0) {
        return KVS_OK; /* a vocab-only file may end without the padding */
    }
    if (start > g->size) {
        kvs_errf(err, errlen,
               "the data section (at offset %llu, aligned to %llu) starts past the end of "
               "the file (size %zu)",
               (unsigned long long)start, (unsigned long long)a, g->size);
        return KVS_BAD_FORMAT;
    }
    uint64_t avail = g->size - start;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        kvs_gguf_tensor *t = &g->tensors[i];
        printable(name, sizeof name, t->name, strlen(t->name));
        uint64_t off = offsets[i];
        if (off % a != 0) {
            kvs_errf(err, errlen,
                   "tensor '%s': data offset %llu is not a multiple of the "
                   "alignment %llu",
                   name, (unsigned long long)off, (unsigned long long)a);
            return KVS_BAD_FORMAT;
        }
        if (off > avail || t->nbytes > avail - off) {
            kvs_errf(err, errlen,
                   "tensor '%s': data [offset %llu, %llu bytes] lies outside the file "
                   "(size %zu)",
                   name, (unsigned long long)(start + (off > UINT64_MAX - start ? 0 : off)),
                   (unsigned long long)t->nbytes, g->size);
            return KVS_BAD_FORMAT;
        }
        t->data = g->base + start + off;
    }
    return KVS_OK;
}

static void free_contents(kvs_gguf *g)
{
    if (g->kvs != NULL) {
        for (uint64_t i = 0; i < g->n_kv; i++) {
            free((void *)g->kvs[i].arr.str_off);
        }
    }
    free(g->kvs);
    free(g->tensors);
    free(g->names);
    free(g->kv_index);
    free(g->tensor_index);
    if (g->map != NULL) {
        munmap(g->map, g->size);
    }
    free(g);
}

/* Parse and validate base[0..size); takes ownership of map (munmapped on failure). */
static int open_common(const void *base, size_t size, void *map, kvs_gguf **out, char *err,
                       size_t errlen)
{
    struct name_view *keys = NULL, *tnames = NULL;
    uint64_t *offsets = NULL;
    int rc = KVS_NO_MEMORY;
    *out = NULL;
    kvs_gguf *g = calloc(1, sizeof *g);
    if (g == NULL) {
        kvs_errf(err, errlen, "out of memory");
        if (map != NULL) {
            munmap(map, size);
        }
        return KVS_NO_MEMORY;
    }
    g->base = base;
    g->size = size;
    g->map = map;
    struct reader r = {.p = base, .size = size, .pos = 0, .err = err, .errlen = errlen};

    rc = parse_header(&r, g);
    if (rc < 0) {
        goto fail;
    }
    /* Counts are bounded by the file size above, so these allocations are too. */
    size_t nkv = (size_t)(g->n_kv > 0 ? g->n_kv : 1);
    size_t nt = (size_t)(g->n_tensors > 0 ? g->n_tensors : 1);
    g->kvs = calloc(nkv, sizeof *g->kvs);
    keys = calloc(nkv, sizeof *keys);
    g->tensors = calloc(nt, sizeof *g->tensors);
    tnames = calloc(nt, sizeof *tnames);
    offsets = calloc(nt, sizeof *offsets);
    if (g->kvs == NULL || keys == NULL || g->tensors == NULL || tnames == NULL || offsets == NULL) {
        kvs_errf(err, errlen, "out of memory for %llu metadata entries and %llu tensors",
               (unsigned long long)g->n_kv, (unsigned long long)g->n_tensors);
        rc = KVS_NO_MEMORY;
        goto fail;
    }
    if ((rc = parse_kvs(&r, g, keys)) < 0 ||
        (rc = parse_tensor_infos(&r, g, tnames, offsets)) < 0 ||
        (rc = build_names(g, tnames, err, errlen)) < 0 ||
        (rc = build_indexes(g, err, errlen)) < 0 || (rc = read_alignment(g, err, errlen)) < 0 ||
        (rc = place_data(g, r.pos, offsets, err, errlen)) < 0) {
        goto fail;
    }
    free(keys);
    free(tnames);
    free(offsets);
    *out = g;
    return KVS_OK;

fail:
    free(keys);
    free(tnames);
    free(offsets);
    free_contents(g);
    return rc;
}

int kvs_gguf_open_memory(const void *data, size_t size, kvs_gguf **out, char *err, size_t errlen)
{
    if (data == NULL && size > 0) {
        kvs_errf(err, errlen, "no data");
        *out = NULL;
        return KVS_INVALID_ARGUMENT;
    }
    return open_common(data != NULL ? data : "", size, NULL, out, err, errlen);
}

int kvs_gguf_open(const char *path, kvs_gguf **out, char *err, size_t errlen)
{
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        kvs_errf(err, errlen, "cannot open: %s", strerror(errno));
        return errno == ENOENT ? KVS_NOT_FOUND : KVS_IO;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        kvs_errf(err, errlen, "cannot stat: %s", strerror(errno));
        close(fd);
        return KVS_IO;
    }
    if (!S_ISREG(st.st_mode)) {
        kvs_errf(err, errlen, "not a regular file");
        close(fd);
        return KVS_IO;
    }
    if (st.st_size < 24) {
        close(fd);
        kvs_errf(err, errlen, "file too small for a GGUF header (%lld bytes, need 24)",
               (long long)st.st_size);
        return KVS_BAD_FORMAT;
    }
    size_t size = (size_t)st.st_size;
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int saved = errno;
    close(fd);
    if (map == MAP_FAILED) {
        kvs_errf(err, errlen, "cannot map %zu bytes: %s", size, strerror(saved));
        return KVS_IO;
    }
    return open_common(map, size, map, out, err, errlen);
}

void kvs_gguf_destroy(kvs_gguf **g)
{
    if (g == NULL || *g == NULL) {
        return;
    }
    free_contents(*g);
    *g = NULL;
}

/* ---- accessors ---- */

uint32_t kvs_gguf_version(const kvs_gguf *g)
{
    return g->version;
}

uint64_t kvs_gguf_file_size(const kvs_gguf *g)
{
    return g->size;
}

uint32_t kvs_gguf_alignment(const kvs_gguf *g)
{
    return g->alignment;
}

uint64_t kvs_gguf_data_offset(const kvs_gguf *g)
{
    return g->data_offset;
}

uint64_t kvs_gguf_n_kv(const kvs_gguf *g)
{
    return g->n_kv;
}

int64_t kvs_gguf_find_key(const kvs_gguf *g, const char *key)
{
    return index_find(g, g->kv_index, g->kv_cap, kv_name_at, key, strlen(key));
}

const char *kvs_gguf_key(const kvs_gguf *g, uint64_t i)
{
    assert(i < g->n_kv);
    return g->kvs[i].key;
}

enum kvs_gguf_type kvs_gguf_kv_type(const kvs_gguf *g, uint64_t i)
{
    assert(i < g->n_kv);
    return g->kvs[i].type;
}

/* An integer-typed scalar as a sign flag and magnitude; false for non-integer types. */
static bool scalar_int(enum kvs_gguf_type t, const uint8_t *p, bool *neg, uint64_t *mag)
{
    int64_t s;
    *neg = false;
    switch (t) {
    case KVS_GGUF_UINT8:
        *mag = p[0];
        return true;
    case KVS_GGUF_UINT16:
        *mag = ld16(p);
        return true;
    case KVS_GGUF_UINT32:
        *mag = ld32(p);
        return true;
    case KVS_GGUF_UINT64:
        *mag = ld64(p);
        return true;
    case KVS_GGUF_INT8:
        s = (int8_t)p[0];
        break;
    case KVS_GGUF_INT16:
        s = (int16_t)ld16(p);
        break;
    case KVS_GGUF_INT32:
        s = (int32_t)ld32(p);
        break;
    case KVS_GGUF_INT64:
        s = (int64_t)ld64(p);
        break;
    default:
        return false;
    }
    *neg = s < 0;
    *mag = s < 0 ? (uint64_t)0 - (uint64_t)s : (uint64_t)s;
    return true;
}

static const struct gguf_kv *find_kv(const kvs_gguf *g, const char *key)
{
    int64_t i = kvs_gguf_find_key(g, key);
    return i < 0 ? NULL : &g->kvs[i];
}

int kvs_gguf_get_u64(const kvs_gguf *g, const char *key, uint64_t *out)
{
    const struct gguf_kv *kv = find_kv(g, key);
    bool neg;
    uint64_t mag;
    if (kv == NULL) {
        return KVS_NOT_FOUND;
    }
    if (!scalar_int(kv->type, kv->val, &neg, &mag) || neg) {
        return KVS_TYPE_MISMATCH;
    }
    *out = mag;
    return KVS_OK;
}

int kvs_gguf_get_u32(const kvs_gguf *g, const char *key, uint32_t *out)
{
    uint64_t v;
    int rc = kvs_gguf_get_u64(g, key, &v);
    if (rc < 0) {
        return rc;
    }
    if (v > UINT32_MAX) {
        return KVS_TYPE_MISMATCH;
    }
    *out = (uint32_t)v;
    return KVS_OK;
}

int kvs_gguf_get_i64(const kvs_gguf *g, const char *key, int64_t *out)
{
    const struct gguf_kv *kv = find_kv(g, key);
    bool neg;
    uint64_t mag;
    if (kv == NULL) {
        return KVS_NOT_FOUND;
    }
    if (!scalar_int(kv->type, kv->val, &neg, &mag)) {
        return KVS_TYPE_MISMATCH;
    }
    if (neg) {
        *out = mag == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)mag;
    } else if (mag > (uint64_t)INT64_MAX) {
        return KVS_TYPE_MISMATCH;
    } else {
        *out = (int64_t)mag;
    }
    return KVS_OK;
}

int kvs_gguf_get_f32(const kvs_gguf *g, const char *key, float *out)
{
    const struct gguf_kv *kv = find_kv(g, key);
    bool neg;
    uint64_t mag;
    if (kv == NULL) {
        return KVS_NOT_FOUND;
    }
    if (kv->type == KVS_GGUF_FLOAT32) {
        *out = ldf32(kv->val);
    } else if (kv->type == KVS_GGUF_FLOAT64) {
        *out = (float)ldf64(kv->val);
    } else if (scalar_int(kv->type, kv->val, &neg, &mag)) {
        *out = neg ? -(float)mag : (float)mag;
    } else {
        return KVS_TYPE_MISMATCH;
    }
    return KVS_OK;
}

/* The entry key of exactly type t: 0, KVS_NOT_FOUND or KVS_TYPE_MISMATCH. */
static int find_typed(const kvs_gguf *g, const char *key, enum kvs_gguf_type t,
                      const struct gguf_kv **out)
{
    const struct gguf_kv *kv = find_kv(g, key);
    if (kv == NULL) {
        return KVS_NOT_FOUND;
    }
    if (kv->type != t) {
        return KVS_TYPE_MISMATCH;
    }
    *out = kv;
    return KVS_OK;
}

int kvs_gguf_get_bool(const kvs_gguf *g, const char *key, bool *out)
{
    const struct gguf_kv *kv;
    KVS_TRY(find_typed(g, key, KVS_GGUF_BOOL, &kv));
    *out = kv->val[0] != 0;
    return KVS_OK;
}

int kvs_gguf_get_str(const kvs_gguf *g, const char *key, kvs_gguf_str *out)
{
    const struct gguf_kv *kv;
    KVS_TRY(find_typed(g, key, KVS_GGUF_STRING, &kv));
    out->ptr = (const char *)kv->val;
    out->len = kv->len;
    return KVS_OK;
}

int kvs_gguf_get_arr(const kvs_gguf *g, const char *key, kvs_gguf_arr *out)
{
    const struct gguf_kv *kv;
    KVS_TRY(find_typed(g, key, KVS_GGUF_ARRAY, &kv));
    *out = kv->arr;
    return KVS_OK;
}

kvs_gguf_str kvs_gguf_arr_str(const kvs_gguf_arr *a, uint64_t i)
{
    assert(a->type == KVS_GGUF_STRING && i < a->n);
    const uint8_t *p = (const uint8_t *)a->data + a->str_off[i];
    kvs_gguf_str s = {.ptr = (const char *)(p + 8), .len = ld64(p)};
    return s;
}

double kvs_gguf_arr_f64(const kvs_gguf_arr *a, uint64_t i)
{
    assert(i < a->n);
    uint64_t sz = scalar_size(a->type);
    assert(sz != 0);
    const uint8_t *p = (const uint8_t *)a->data + i * sz;
    bool neg;
    uint64_t mag;
    if (a->type == KVS_GGUF_FLOAT32) {
        return ldf32(p);
    }
    if (a->type == KVS_GGUF_FLOAT64) {
        return ldf64(p);
    }
    if (a->type == KVS_GGUF_BOOL) {
        return p[0] != 0;
    }
    if (scalar_int(a->type, p, &neg, &mag)) {
        return neg ? -(double)mag : (double)mag;
    }
    return 0.0;
}

int64_t kvs_gguf_arr_i64(const kvs_gguf_arr *a, uint64_t i)
{
    assert(i < a->n);
    uint64_t sz = scalar_size(a->type);
    assert(sz != 0);
    const uint8_t *p = (const uint8_t *)a->data + i * sz;
    bool neg;
    uint64_t mag;
    if (a->type == KVS_GGUF_FLOAT32 || a->type == KVS_GGUF_FLOAT64) {
        double d = a->type == KVS_GGUF_FLOAT32 ? ldf32(p) : ldf64(p);
        if (!(d == d)) {
            return 0; /* NaN */
        }
        if (d >= 9223372036854775807.0) {
            return INT64_MAX;
        }
        if (d <= -9223372036854775808.0) {
            return INT64_MIN;
        }
        return (int64_t)d;
    }
    if (a->type == KVS_GGUF_BOOL) {
        return p[0] != 0;
    }
    if (scalar_int(a->type, p, &neg, &mag)) {
        if (neg) {
            return mag == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)mag;
        }
        return mag > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)mag;
    }
    return 0;
}

/* ---- tensors ---- */

uint64_t kvs_gguf_n_tensors(const kvs_gguf *g)
{
    return g->n_tensors;
}

const kvs_gguf_tensor *kvs_gguf_find_tensor(const kvs_gguf *g, const char *name)
{
    int64_t i = index_find(g, g->tensor_index, g->tensor_cap, tensor_name_at, name, strlen(name));
    return i < 0 ? NULL : &g->tensors[i];
}

const kvs_gguf_tensor *kvs_gguf_tensor_at(const kvs_gguf *g, uint64_t i)
{
    assert(i < g->n_tensors);
    return &g->tensors[i];
}
